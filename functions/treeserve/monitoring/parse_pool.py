"""Capture files parsed in worker processes, for monitoring runs with more than one CPU.

Parsing a capture file (:func:`treeserve.captures.fast_split`: a regular expression, orjson,
``np.fromiter``) holds the GIL for all but a few milliseconds, so threads cannot share it; on a
machine or Lambda size with two or more vCPUs, processes can. Workers are forked when the run
starts (Lambda has no ``/dev/shm``, so no ``multiprocessing.Queue`` or ``Pool``; a ``Pipe`` is a
socketpair and works there). Each one receives inflated capture files over its pipe and answers
with the file's :class:`~treeserve.captures.Split`: a JSON header and the arrays' raw bytes.
Nothing is pickled, and workers touch neither S3 nor the registry: every storage call, and every
fault a test injects into one, stays in the calling process.

Answers are taken in the order the files were sent, so a run gives the same report with and
without workers. A file the fast path cannot take comes back marked for the general path; a
worker that fails (killed, out of memory, a bug) sends its files, and every later one, back to
be parsed in the calling process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import orjson

from treeserve.captures import Group, Split, fast_split

logger = logging.getLogger(__name__)

LAMBDA_MB_PER_VCPU = 1769
# A capture file is at most MAX_CAPTURE_FILE_BYTES inflated, which parses in a few seconds; a
# worker silent for this long is stuck, and its files are parsed in the calling process.
ANSWER_TIMEOUT_SECONDS = 60.0


def default_workers(configured: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Parse workers for this environment: ``configured`` when given (``MONITORING_WORKERS``
    through :class:`~treeserve.settings.Settings`; 0 or 1: parse in the calling process); else on
    Lambda one per vCPU its memory size buys (3008 MB: 2), on other Linux one per CPU this
    process may run on, up to 4 (0 with one CPU); 0 elsewhere."""
    env = os.environ if env is None else env
    if configured is not None:
        count = configured
    elif env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip().isdigit():
        # Lambda shows more CPUs than it grants: compute is one vCPU per 1769 MB.
        count = min(4, round(int(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"]) / LAMBDA_MB_PER_VCPU))
    elif sys.platform == "linux":  # elsewhere (macOS) forking a process is not safe
        count = min(4, len(os.sched_getaffinity(0)))
    else:
        count = 0
    return count if count >= 2 else 0


# --- the wire format ---------------------------------------------------------------------------


def encode_split(split: Split, **extra: Any) -> list[bytes]:
    """``split`` as messages: a JSON header (with ``extra`` fields), then each group's arrays
    (and ids)."""
    groups: list[dict[str, Any]] = []
    parts: list[bytes] = []
    for g in split.groups:
        X = np.ascontiguousarray(g.X, dtype=np.float32)
        parts.append(X.tobytes())
        pwidth = None
        if g.P is not None:
            P = np.ascontiguousarray(g.P, dtype=np.float32)
            pwidth = P.shape[1]
            parts.append(P.tobytes())
        ids_format = None
        if g.ids is not None:
            # Plain-string ids as bytes hold no newline (treeserve.monitoring.pipeline._ROW_ID).
            ids_format = "lines" if g.ids_are_bytes else "json"
            parts.append(b"\n".join(g.ids) if g.ids_are_bytes else orjson.dumps(g.ids))
        groups.append(
            {
                "version": g.version,
                "rows": X.shape[0],
                "width": X.shape[1],
                "pwidth": pwidth,
                "ids": ids_format,
            }
        )
    header = {
        **extra,
        "out_of_window": split.out_of_window,
        "groups": groups,
        "parts": len(parts),
    }
    return [orjson.dumps(header), *parts]


def decode_split(header: Mapping[str, Any], parts: list[bytes]) -> Split:
    """The inverse of :func:`encode_split` (``header`` already parsed)."""
    groups: list[Group] = []
    it = iter(parts)
    for g in header["groups"]:
        n, width = int(g["rows"]), int(g["width"])
        X = np.frombuffer(next(it), dtype=np.float32).reshape(n, width)
        P = None
        if g["pwidth"] is not None:
            P = np.frombuffer(next(it), dtype=np.float32).reshape(n, int(g["pwidth"]))
        ids: list[Any] | None = None
        if g["ids"] == "lines":
            ids = next(it).split(b"\n")
        elif g["ids"] == "json":
            ids = orjson.loads(next(it))
        if ids is not None and len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} rows")
        groups.append(Group(int(g["version"]), X, P, ids, g["ids"] == "lines"))
    return Split(int(header["out_of_window"]), groups)


def _status_kb(field_name: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:  # not Linux
        pass
    return 0


def _serve(
    conn: Connection, inherited: list[Connection], start_key: bytes, end_key: bytes, with_ids: bool
) -> None:
    """A worker's loop: a file in, its split (or a verdict) out, until the pipe closes."""
    # The fork copied the caller's ends of this worker's pipe and of the earlier workers'
    # pipes; holding them would keep those pipes open when the caller closes its ends.
    for other in inherited:
        other.close()
    # Memory of its own: the peak resident set less what the fork shared with the caller at
    # the start (those pages are counted once by the kernel, as by Lambda's memory limit).
    shared_kb = _status_kb("VmRSS")
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            split = fast_split(raw, start_key, end_key, with_ids=with_ids)
            own_kb = _status_kb("VmHWM") - shared_kb
            if split is None:
                messages = [orjson.dumps({"general": True, "own_kb": own_kb})]
            else:
                messages = encode_split(split, own_kb=own_kb)
        except Exception as exc:  # the caller parses the file itself
            messages = [orjson.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]})]
        del raw
        try:
            for message in messages:
                conn.send_bytes(message)
        except OSError:  # the caller stopped listening (its run ended or failed)
            return


# --- the pool ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Parsed:
    """A file back from the pool: ``split`` from the fast path; else ``general`` says the fast
    path cannot take it (parse it by the general path) or, False, that it was not parsed at all
    (parse it in the calling process from scratch)."""

    raw: bytes
    split: Split | None
    general: bool = False


@dataclass
class ParsePool:
    """Forked parse workers; :meth:`put` files in order, take :class:`Parsed` results in order.

    ``own_kb``: each worker's peak memory of its own so far (peak resident set less the pages
    the fork shared with the caller)."""

    workers: int
    start_key: bytes
    end_key: bytes
    with_ids: bool
    broken: bool = False
    own_kb: list[int] = field(default_factory=list)
    _conns: list[Connection] = field(default_factory=list)
    _procs: list[Any] = field(default_factory=list)
    _pending: deque[tuple[int, bytes]] = field(default_factory=deque)
    _sent: int = 0

    def __post_init__(self) -> None:
        context = multiprocessing.get_context("fork")
        try:
            for _ in range(self.workers):
                mine, theirs = context.Pipe(duplex=True)
                proc = context.Process(
                    target=_serve,
                    args=(
                        theirs,
                        [*self._conns, mine],
                        self.start_key,
                        self.end_key,
                        self.with_ids,
                    ),
                    name="treeserve-parse",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)
                self.own_kb.append(0)
        except (OSError, ValueError) as exc:  # no fork here, or no resources: parse here
            logger.warning("parse workers not started", extra={"error": str(exc)[:200]})
            self.close()
            self.broken = True

    def put(self, raw: bytes) -> list[Parsed]:
        """Hand ``raw`` to the next worker; returns the files finished meanwhile, in order.

        A worker holds at most one file: sending it a second one before its answer was read
        could block both ends on full pipes.
        """
        done: list[Parsed] = []
        while self._pending and (self.broken or len(self._pending) >= len(self._conns)):
            done.append(self._take())
        if self.broken:
            done.append(Parsed(raw, None))
            return done
        index = self._sent % len(self._conns)
        try:
            self._conns[index].send_bytes(raw)
        except OSError as exc:
            self._break(f"send failed: {exc}")
            done.extend(self.drain())
            done.append(Parsed(raw, None))
            return done
        self._sent += 1
        self._pending.append((index, raw))
        return done

    @property
    def waiting(self) -> int:
        """Files handed over and not yet taken back."""
        return len(self._pending)

    def drain(self) -> list[Parsed]:
        """Every file still with a worker, in order."""
        return [self._take() for _ in range(len(self._pending))]

    def _take(self) -> Parsed:
        index, raw = self._pending.popleft()
        if self.broken:
            return Parsed(raw, None)
        conn = self._conns[index]
        try:
            if not conn.poll(ANSWER_TIMEOUT_SECONDS):
                raise TimeoutError(f"no answer in {ANSWER_TIMEOUT_SECONDS:g} s")
            header = orjson.loads(conn.recv_bytes())
            self.own_kb[index] = max(self.own_kb[index], int(header.get("own_kb", 0)))
            if "error" in header:
                logger.warning("parse worker failed on a file", extra={"error": header["error"]})
                return Parsed(raw, None)
            if header.get("general"):
                return Parsed(raw, None, general=True)
            parts = [conn.recv_bytes() for _ in range(int(header["parts"]))]
            return Parsed(raw, decode_split(header, parts))
        except (EOFError, OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self._break(f"{type(exc).__name__}: {exc}")
            return Parsed(raw, None)

    def _break(self, why: str) -> None:
        logger.warning("parse workers stopped; parsing in this process", extra={"error": why})
        self.broken = True
        self._stop()

    def _stop(self) -> None:
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def close(self) -> None:
        """Stop the workers (they exit when their pipe closes)."""
        if not self.broken:
            self._stop()
        self._conns.clear()
        self._procs.clear()
