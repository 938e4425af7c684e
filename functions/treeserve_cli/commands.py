"""CLI commands: ``treeserve publish``, ``status``, ``promote``, ``rollback``, ``alias``,
``route``.

Each takes the parsed ``argparse`` namespace (see :mod:`treeserve_cli.cli`) and returns an exit code.
Results go to stdout; progress, spinners and errors to stderr. Expected failures raise
:class:`~treeserve.errors.TreeserveError` with a message that says what to do; ``cli.main``
prints it on one line and exits 1.

``publish`` exit codes: 0 uploaded (or, with ``--wait``, promoted, registered or a duplicate of
an existing version), 2 rejected, 3 no verdict before ``--timeout``, 1 any other error.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import re
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, TextIO

from treeserve.errors import StorageAccessDenied, StorageUnavailable, TreeserveError
from treeserve.registry.model_registry import (
    ALIAS_RULE,
    CHAMPION,
    ModelRegistry,
    Pointer,
    PointerUnreadable,
    model_names,
    upload_id,
    valid_alias,
)
from treeserve.registry.routing import Canary, Routing, RoutingInvalid, Shadow
from treeserve.registry.store import S3RegistryStore
from treeserve.settings import MODEL_NAME_RULE, Settings, valid_model_name

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_REJECTED: Final = 2
EXIT_TIMEOUT: Final = 3

# Seconds between two looks at the outcome record while --wait waits (tests shorten it).
POLL_SECONDS = 1.0
PROGRESS_MIN_BYTES: Final = 1 << 20  # smaller uploads finish before a progress line helps
# The refresh function refuses larger uploads (treeserve.package.Limits.max_upload_bytes).
MAX_UPLOAD_BYTES: Final = 256 << 20
STATUS_VERSIONS: Final = 20
STATUS_REJECTIONS: Final = 10
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_GZIP_MAGIC = b"\x1f\x8b"
_SAVE_HINT = "save the model with booster.save_model('model.ubj') (or 'model.json')"


class UsageError(TreeserveError):
    """Local input the command cannot use (a file, an option); the message says the fix."""


# --- shared plumbing -----------------------------------------------------------------------------


def _target(args: argparse.Namespace) -> tuple[Settings, str, S3RegistryStore, ModelRegistry]:
    settings = Settings.from_env(bucket=getattr(args, "bucket", None))
    name = getattr(args, "name", None) or settings.model_name
    if not valid_model_name(name):
        raise UsageError(
            f"model name {name!r} is not valid: use {MODEL_NAME_RULE} (--name or MODEL_NAME)"
        )
    store = S3RegistryStore(settings.model_bucket)
    return settings, name, store, ModelRegistry(store, name)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _mb(n: float) -> str:
    return f"{n / (1 << 20):.1f} MB"


def _pointer_line(name: str, pointer: Pointer) -> str:
    previous = f"previous: {pointer.previous}" if pointer.previous is not None else "first"
    return (
        f"version {pointer.version} of {name} is in service "
        f"({previous}; promoted {pointer.promoted_at}; sha256 {pointer.sha256[:12]})"
    )


# --- publish: local checks and packing -----------------------------------------------------------


def _readable(path_text: str, what: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UsageError(f"{what} {path_text!r} does not exist: check the path")
    if not path.is_file():
        raise UsageError(f"{what} {path_text!r} is not a file")
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise UsageError(f"{what} {path_text!r} cannot be read: {exc.strerror}") from None
    return path


def _model_kind(path: Path) -> str:
    """``ubj``, ``json`` or ``targz``, from the name, checked against the first bytes."""
    name = path.name.lower()
    with path.open("rb") as fh:
        head = fh.read(4)
    if not head:
        raise UsageError(f"{path} is empty: {_SAVE_HINT}")
    if head.startswith(_PICKLE_MAGIC):
        raise UsageError(
            f"{path} is a pickle/joblib file, which treeserve never loads (unpickling runs "
            f"code): {_SAVE_HINT}"
        )
    if name.endswith((".tar.gz", ".tgz")):
        if not head.startswith(_GZIP_MAGIC):
            raise UsageError(f"{path} is not gzip-compressed: pack it with `tar czf`")
        return "targz"
    if name.endswith(".ubj"):
        return "ubj"
    if name.endswith(".json"):
        return "json"
    raise UsageError(
        f"{path.name}: MODEL must be a .ubj or .json XGBoost model or a .tar.gz package; "
        f"{_SAVE_HINT}"
    )


def _csv_header(path: Path, what: str) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text: save it as a UTF-8 CSV") from None
    except csv.Error as exc:
        raise UsageError(f"{what} {path} is not a readable CSV: {exc}") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise UsageError(
            f"{what} {path} is empty or has an empty first line: its first line must be a "
            "header of feature names"
        )
    if all(_is_number(h) for h in header):
        raise UsageError(
            f"{what} {path} has no header (its first line is numbers): add a first line with "
            "the feature names, e.g. df.to_csv(path, index=False)"
        )
    return header


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pack(
    model: Path,
    kind: str,
    reference: Path | None,
    holdout: Path | None,
    manifest: dict[str, Any],
) -> IO[bytes]:
    """A gzip tarball of the model and its CSVs, in a temporary file (no links, no owners)."""
    members: list[tuple[str, Path | bytes]] = [(f"model.{kind}", model)]
    if reference is not None:
        members.append(("reference.csv", reference))
    if holdout is not None:
        members.append(("holdout.csv", holdout))
    if manifest:
        members.append(("manifest.json", json.dumps(manifest).encode()))
    return _tarball(members)


def _repack(package: Path, extra: dict[str, Any]) -> IO[bytes]:
    """The package with ``extra`` merged into its manifest.json (``--class-names``)."""
    members: list[tuple[str, Path | bytes]] = []
    manifest: dict[str, Any] = {}
    try:
        with tarfile.open(package, mode="r:gz") as tar:
            for info in tar:
                handle = tar.extractfile(info) if info.isreg() else None
                if handle is None:
                    continue  # directories; links and devices the refresh would refuse anyway
                data = handle.read()
                if PurePosixPath(info.name).name == "manifest.json":
                    manifest = json.loads(data.decode("utf-8-sig"))
                else:
                    members.append((PurePosixPath(info.name).name, data))
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise UsageError(f"{package} cannot be read as a package: {exc}") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{package}: manifest.json must be a JSON object")
    members.append(("manifest.json", json.dumps({**manifest, **extra}).encode()))
    return _tarball(members)


def _tarball(members: list[tuple[str, Path | bytes]]) -> IO[bytes]:
    out = tempfile.TemporaryFile()  # noqa: SIM115 - returned open; the caller closes it
    now = int(time.time())
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for arcname, source in members:
            info = tarfile.TarInfo(arcname)
            info.mtime, info.mode = now, 0o644
            if isinstance(source, bytes):
                info.size = len(source)
                tar.addfile(info, io.BytesIO(source))
            else:
                # Read through the path so a symlinked input is packed as a regular file.
                info.size = source.stat().st_size
                with source.open("rb") as fh:
                    tar.addfile(info, fh)
    out.seek(0)
    return out


def _key_for(name: str, filename: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", filename).strip("-.") or "model"
    return f"incoming/{name}/{stamp}-{safe}"


class _Progress:
    """``upload_fileobj`` callback (called from several threads): one line on stderr."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.done = 0
        self.tty = stream.isatty()
        self._lock = threading.Lock()
        self._shown = -1

    def __call__(self, chunk: int) -> None:
        with self._lock:
            self.done += chunk
            percent = min(100, self.done * 100 // max(1, self.total))
            # A terminal gets a live line; a log gets a line every 25%.
            step = percent if self.tty else percent // 25 * 25
            if step == self._shown:
                return
            self._shown = step
            line = f"uploading {self.label}  {_mb(self.done)} / {_mb(self.total)}  {percent:3d}%"
            self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
            if self.tty and percent >= 100:
                self.stream.write("\n")
            self.stream.flush()


def publish(args: argparse.Namespace) -> int:
    """Pack and upload a model to ``incoming/<name>/``; with ``--wait``, print the verdict."""
    model = _readable(args.model, "MODEL")
    kind = _model_kind(model)
    if args.label and not args.holdout:
        raise UsageError("--label names the label column of --holdout: pass --holdout CSV too")
    if args.holdout and not args.label:
        raise UsageError("--holdout needs --label COL: the name of its label column")
    reference = _readable(args.reference, "--reference") if args.reference else None
    holdout = _readable(args.holdout, "--holdout") if args.holdout else None
    if kind == "targz" and (reference or holdout):
        raise UsageError(
            f"{model.name} is already a package: put reference.csv/holdout.csv (and a "
            "manifest.json with the label) inside it, or publish the bare model.ubj with "
            "--reference/--holdout"
        )
    if reference is not None:
        _csv_header(reference, "--reference")
    if holdout is not None:
        header = _csv_header(holdout, "--holdout")
        if args.label not in header:
            raise UsageError(
                f"--label {args.label!r} is not a column of {holdout}: its columns are "
                f"{', '.join(header[:20])}{' ...' if len(header) > 20 else ''}"
            )
    if args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    manifest: dict[str, Any] = {"label": args.label} if holdout is not None else {}
    if args.class_names is not None:
        manifest["class_names"] = _class_names(args.class_names)

    settings, name, store, registry = _target(args)
    if kind == "targz" and manifest:
        body: IO[bytes] = _repack(model, manifest)
        filename = model.name
    elif manifest or reference is not None:
        body = _pack(model, kind, reference, holdout, manifest)
        filename = re.sub(r"\.(ubj|json)$", "", model.name, flags=re.IGNORECASE) + ".tar.gz"
    else:
        body, filename = model.open("rb"), model.name
    with body:
        size = body.seek(0, io.SEEK_END)
        body.seek(0)
        if size > MAX_UPLOAD_BYTES:
            raise UsageError(
                f"the upload is {_mb(size)}, more than the {_mb(MAX_UPLOAD_BYTES)} the refresh "
                "function accepts: publish a smaller model or a smaller reference/holdout sample"
            )
        with suppress(StorageAccessDenied):
            # A publisher may be allowed to write incoming/ without s3:ListBucket: let the
            # upload itself say whether access is denied.
            store.check_bucket()
        key = _key_for(name, filename)
        progress = _Progress(filename, size, sys.stderr) if size >= PROGRESS_MIN_BYTES else None
        etag = store.upload(key, body, callback=progress)
    uid = upload_id(key, etag)
    _out(f"uploaded s3://{settings.model_bucket}/{key}")
    _out(f"etag {etag}")
    _out(f"upload id {uid}")
    if not args.wait:
        _out(
            f"the refresh function validates it now; see the verdict with "
            f"`treeserve status --name {name}` (or publish with --wait)"
        )
        return EXIT_OK
    return _wait(
        registry, uid, bucket=settings.model_bucket, key=key, name=name, timeout=args.timeout
    )


def _class_names(text: str) -> list[str]:
    """``--class-names a,b,c``: the label of class 0, 1, 2 (what /predict answers as labels)."""
    names = [part.strip() for part in text.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise UsageError(
            f"--class-names {text!r}: give one distinct, non-empty name per class, in class "
            "order, separated by commas (e.g. --class-names benign,malignant)"
        )
    return names


# --- publish --wait ------------------------------------------------------------------------------


def _wait(
    registry: ModelRegistry, uid: str, *, bucket: str, key: str, name: str, timeout: float
) -> int:
    started = time.monotonic()
    tty = sys.stderr.isatty()
    spinner = itertools.cycle("|/-\\")
    if not tty:
        _err(f"waiting up to {timeout:.0f}s for the verdict of the refresh function ...")
    try:
        while True:
            verdict = _verdict(registry, uid)
            elapsed = time.monotonic() - started
            if verdict is not None:
                break
            if elapsed >= timeout:
                if tty:
                    sys.stderr.write("\r\033[K")
                _err(
                    f"no verdict after {timeout:.0f}s: the refresh function may still be working, "
                    f"or did not run (is s3://{bucket}/incoming/ wired to it?). Check "
                    f"`treeserve status --name {name}` or the function's logs"
                )
                return EXIT_TIMEOUT
            if tty:
                sys.stderr.write(f"\r{next(spinner)} waiting for the verdict  {elapsed:4.0f}s")
                sys.stderr.flush()
            time.sleep(min(POLL_SECONDS, max(0.0, timeout - elapsed)))
    finally:
        if tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    return _print_verdict(verdict, bucket, key, name)


def _verdict(registry: ModelRegistry, uid: str) -> dict[str, Any] | None:
    try:
        outcome = registry.outcome(uid)
        if outcome is not None:
            return outcome
        # A rejection record alone is a verdict too (the outcome record follows it).
        rejection = registry.rejection(uid)
    except StorageUnavailable:
        return None  # transient: look again at the next tick
    if rejection is None:
        return None
    return {"status": "rejected", "code": rejection.get("code"), "message": rejection.get("reason")}


def _print_verdict(verdict: dict[str, Any], bucket: str, key: str, name: str) -> int:
    status = verdict.get("status")
    version = verdict.get("version")
    code = verdict.get("code")
    message = verdict.get("message") or verdict.get("reason") or ""
    if status == "promoted":
        _out(f"promoted: version {version} of {name} is in service")
        if message:
            _out(f"  {message}")
        return EXIT_OK
    if status == "registered":
        _out(f"registered: version {version} of {name}, not promoted ({code}): {message}")
        _out(f"  put it in service with: treeserve promote {version} --name {name}")
        return EXIT_OK
    if status == "duplicate":
        _out(f"duplicate: the same model is already version {version} of {name}; {message}")
        return EXIT_OK
    if status == "rejected":
        _out(f"rejected: {code}: {message}")
        _out(f"  the upload is kept at s3://{bucket}/{key}")
        return EXIT_REJECTED
    _out(f"{status}: {code}: {message}")
    return EXIT_ERROR


# --- status, promote, rollback -------------------------------------------------------------------


def _metrics_text(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        parts.append(f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}")
    return " ".join(parts) or "-"


def _footprint_text(fp: dict[str, Any] | None) -> str:
    """``peak/budget MB, load s`` of a version's footprint (``-`` for versions before it)."""
    if not fp:
        return "-"
    return (
        f"{fp.get('peak_mb', 0):g}/{fp.get('budget_mb', 0):g} MB "
        f"{fp.get('inference_load_seconds', 0):.2g} s"
    )


def _models_summary(store: S3RegistryStore) -> list[dict[str, Any]]:
    """Every model of the registry: the version in service, its aliases, how many versions."""
    summary = []
    for model in model_names(store):
        registry = ModelRegistry(store, model)
        try:
            pointer = registry.current()
            serving: int | str | None = None if pointer is None else pointer.version
        except PointerUnreadable:
            serving = "broken pointer"
        summary.append(
            {
                "name": model,
                "in_service": serving,
                "aliases": {a: p.version for a, p in sorted(registry.aliases().items())},
                "versions": len(registry.versions()),
            }
        )
    return summary


def status(args: argparse.Namespace) -> int:
    """Every model (version in service, aliases, versions); then one model's version in service,
    aliases, versions, and recent rejections with their reasons."""
    settings, name, store, registry = _target(args)
    store.check_bucket()
    models = _models_summary(store)
    aliases = {a: p.version for a, p in sorted(registry.aliases().items())}
    problem: str | None = None
    try:
        pointer = registry.current()
    except PointerUnreadable as unreadable:
        pointer, problem = None, str(unreadable)
    if pointer is not None:
        problem = registry.pointer_problem(pointer)
    versions = registry.versions()
    shown = list(reversed(versions))[:STATUS_VERSIONS]
    rows: list[dict[str, Any]] = []
    for v in shown:
        m = registry.manifest(v)
        rows.append(
            {
                "version": v,
                "created_at": m.created_at,
                "objective": m.objective,
                "task": m.task,
                "sha256": m.sha256,
                "num_features": m.num_features,
                "holdout_metrics": m.holdout_metrics,
                "metrics": m.metrics,
                "source_key": (m.source or {}).get("key"),
                "footprint": m.footprint,
            }
        )
    rejections = registry.rejections(limit=STATUS_REJECTIONS)
    try:
        routing: Routing | None = registry.routing()
        routing_problem = None
    except PointerUnreadable as unreadable:
        routing, routing_problem = None, str(unreadable)
    if args.json:
        _out(
            json.dumps(
                {
                    "model": name,
                    "bucket": settings.model_bucket,
                    "models": models,
                    "current": pointer.to_dict() if pointer else None,
                    "aliases": aliases,
                    "pointer_problem": problem,
                    "routing": routing.to_dict() if routing is not None else None,
                    "routing_problem": routing_problem,
                    "versions_total": len(versions),
                    "versions": rows,
                    "rejections": rejections,
                },
                indent=2,
                default=str,
            )
        )
        return EXIT_OK

    _out(f"models in s3://{settings.model_bucket}/registry/ ({len(models)}):")
    if models:
        _out(f"  {'NAME':<24} {'IN SERVICE':<16} {'VERSIONS':<9} ALIASES")
    for row in models:
        serving = "-" if row["in_service"] is None else str(row["in_service"])
        named = " ".join(f"{a}={v}" for a, v in row["aliases"].items()) or "-"
        _out(f"  {row['name']:<24} {serving:<16} {row['versions']:<9} {named}")
    _out("")
    _out(f"model {name} in s3://{settings.model_bucket}/registry/{name}/")
    if problem is not None:
        # Warm inference environments keep what they loaded; new ones load nothing until the
        # pointer is repaired.
        hint = f" (e.g. `treeserve promote {versions[-1]} --name {name}`)" if versions else ""
        _out(f"in service: BROKEN POINTER: {problem}{hint}")
    elif pointer is None:
        _out("in service: none (put a version in service with `treeserve promote VERSION`)")
    else:
        previous = "" if pointer.previous is None else f"; previous {pointer.previous}"
        _out(
            f"in service: version {pointer.version} (promoted {pointer.promoted_at}{previous}; "
            f"sha256 {pointer.sha256[:12]})"
        )
    if aliases:
        _out("aliases: " + ", ".join(f"{a} -> version {v}" for a, v in aliases.items()))
    else:
        _out(f"aliases: none (set one with `treeserve alias set ALIAS VERSION --name {name}`)")
    if routing_problem is not None:
        _out(f"routing: BROKEN ({routing_problem}); the champion answers every request")
    elif routing is not None:
        for line in _routing_lines(registry, routing):
            _out(line)
    _out("")
    if not versions:
        _out(f"versions: none yet (publish one with `treeserve publish MODEL --name {name}`)")
    else:
        more = len(versions) - len(shown)
        _out(f"versions ({len(versions)}{f', newest {len(shown)} shown' if more else ''}):")
        _out(
            f"    {'VERSION':<8} {'CREATED':<28} {'OBJECTIVE':<18} {'SHA256':<12}  "
            f"{'FOOTPRINT':<24}  HOLDOUT"
        )
        for row in rows:
            mark = "*" if pointer is not None and row["version"] == pointer.version else " "
            _out(
                f"  {mark} {row['version']:<8} {row['created_at'] or '-':<28} "
                f"{row['objective']:<18} {row['sha256'][:12]:<12}  "
                f"{_footprint_text(row['footprint']):<24}  "
                f"{_metrics_text(row['holdout_metrics'])}"
            )
        _out(
            "  FOOTPRINT: peak MB in the inference function (load, or loaded + one explain at "
            "the row limit) / the MB one model may use; load seconds there"
        )
    _out("")
    if not rejections:
        _out("rejections: none")
    else:
        _out(f"recent rejections ({len(rejections)}):")
        for r in rejections:
            source = r.get("source") or {}
            _out(f"  {r.get('rejected_at', '-')}  {r.get('code')}  {source.get('key', '-')}")
            _out(f"      {r.get('reason', '')}")
    return EXIT_OK


def promote(args: argparse.Namespace) -> int:
    """Put a version in service (compare-and-swap on current.json), after showing the latest
    live evidence for it (the newest monitoring report's challenger comparison)."""
    _, name, store, registry = _target(args)
    if args.version < 1:
        raise UsageError("VERSION is a positive integer (see `treeserve status`)")
    # Imported here: the comparison's module brings scipy and the predictor, which only this
    # command (and monitor) needs.
    from treeserve.monitoring.challenger import latest_evidence, summary_lines  # noqa: PLC0415

    found = latest_evidence(store, name, args.version)
    if found is None:
        _out(f"live evidence: none for version {args.version} in the latest monitoring report")
    else:
        key, entry = found
        _out(f"live evidence (s3://{store.bucket}/{key}):")
        for line in summary_lines({"challengers": [entry]}):
            _out(f"  {line}")
        if entry.get("reason"):
            _out(f"  {entry['reason']}")
    pointer = registry.promote(args.version)
    _out(f"promoted: {_pointer_line(name, pointer)}")
    return EXIT_OK


def alias(args: argparse.Namespace) -> int:
    """``alias set ALIAS VERSION`` / ``alias clear ALIAS`` (compare-and-swap on the alias)."""
    _, name, _, registry = _target(args)
    if not valid_alias(args.alias) or args.alias == CHAMPION:
        raise UsageError(
            f"alias {args.alias!r} is not valid: use {ALIAS_RULE}; {CHAMPION!r} is the version "
            "in service (move it with `treeserve promote`)"
        )
    if args.action == "set":
        if args.version is None or args.version < 1:
            raise UsageError("alias set needs VERSION, a positive integer (see `treeserve status`)")
        pointer = registry.set_alias(args.alias, args.version)
        _out(
            f"alias {args.alias} of {name} -> version {pointer.version} (set {pointer.promoted_at})"
        )
        _out(f"  served at /models/{name}@{args.alias}/predict")
        return EXIT_OK
    if args.version is not None:
        raise UsageError("alias clear takes no VERSION")
    if registry.clear_alias(args.alias):
        _out(f"alias {args.alias} of {name} cleared")
    else:
        _out(f"alias {args.alias} of {name} was not set; nothing to do")
    return EXIT_OK


def rollback(args: argparse.Namespace) -> int:
    """Move the pointer back to the previous version, or to ``--to VERSION``; the routing that
    sent live traffic to the version rolled back from is cleared (and printed)."""
    _, name, _, registry = _target(args)
    pointer, cleared = registry.rollback_clearing(to=args.to)
    _out(f"rolled back: {_pointer_line(name, pointer)}")
    if cleared:
        _out(
            f"routing cleared: {', '.join(cleared)} (it sent traffic to version "
            f"{pointer.previous}); see `treeserve route --name {name}`"
        )
    return EXIT_OK


# --- routing -----------------------------------------------------------------------------------


def _routing_lines(registry: ModelRegistry, routing: Routing) -> list[str]:
    """What ``route`` and ``status`` print of a routing: each part, the version its alias names."""
    name = registry.name

    def target(alias: str) -> str:
        try:
            pointer = registry.alias(alias)
        except PointerUnreadable:
            pointer = None
        if pointer is None:
            return f"{alias} (NOT SET: the champion answers instead)"
        return f"{alias} -> version {pointer.version}"

    if not routing.active:
        return [f"routing: none (every request of {name} is answered by the champion)"]
    lines = [f"routing (set {routing.set_at or '-'}):"]
    if routing.canary is not None:
        lines.append(
            f"  canary: {target(routing.canary.alias)}, {routing.canary.percent:g}% of unpinned "
            "requests (by row ids, else x-request-id)"
        )
    if routing.shadow is not None:
        lines.append(
            f"  shadow: {target(routing.shadow.alias)}, scores {routing.shadow.sample:g} of the "
            "champion's captured rows (never answers)"
        )
    return lines


def route(args: argparse.Namespace) -> int:
    """``route --canary ALIAS PERCENT`` / ``--shadow ALIAS SAMPLE`` / ``--off``: change the
    model's routing.json (compare-and-swap; each option replaces its part) and print it; with
    no option, print it."""
    _, name, _, registry = _target(args)
    if args.off and (args.canary or args.shadow):
        raise UsageError("--off clears the whole routing: give it alone, or drop it")
    try:
        canary = None if args.canary is None else Canary(args.canary[0], _number(args.canary[1]))
        shadow = None if args.shadow is None else Shadow(args.shadow[0], _number(args.shadow[1]))
    except RoutingInvalid as exc:
        raise UsageError(f"{exc} (see `treeserve route --help`)") from None
    if args.off or canary is not None or shadow is not None:

        def compute(seen: Routing) -> Routing:
            if args.off:
                return Routing()
            return Routing(canary or seen.canary, shadow or seen.shadow)

        routing = registry.set_routing(compute)
        verb = "cleared" if args.off else "set"
        _out(f"routing of {name} {verb} (registry/{name}/routing.json):")
    else:
        routing = registry.routing()
    for line in _routing_lines(registry, routing):
        _out(line)
    if routing.active:
        _out(
            f"  inference picks it up within MODEL_REFRESH_SECONDS; stop with "
            f"`treeserve route --name {name} --off`"
        )
    return EXIT_OK


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a number (see `treeserve route --help`)") from None
