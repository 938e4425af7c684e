"""Peak memory of one refresh of a package, measured in a process of its own.

``python -m tests.reliability.refresh_peak PACKAGE`` runs the refresh pipeline
(:class:`treeserve.refresh.pipeline.RefreshService`: read, validate with the sandbox child, reference
statistics, holdout gate, register, promote) on the package's bytes, with an in-memory registry,
and prints JSON: the outcome, this process's peak RSS (Linux /proc) and the sandbox child's (its
own VmHWM, read from /proc every 20 ms while it runs: getrusage would count the pages the fork
shared). On Lambda both count against the refresh function's MemorySize at once, so their sum
bounds what the function needs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

from treeserve.refresh.pipeline import RefreshService, UploadEvent, UploadObject
from treeserve.registry.model_registry import ModelRegistry
from treeserve.registry.store import InMemoryRegistryStore
from treeserve.settings import Settings

MiB = 1 << 20


class FileSource:
    """The package file as the upload (what S3UploadSource returns: the object's bytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, event: UploadEvent, max_bytes: int) -> UploadObject:
        return UploadObject(self.path.read_bytes(), None)


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kb(pid: int | str, field: str) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class ChildPeak(threading.Thread):
    """The highest VmHWM of any child process seen while running, and the highest sum of this
    process's RSS and its children's at one sample (what the function holds at once)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0
        self.together_kb = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.02):
            try:
                tasks = os.listdir(f"/proc/{me}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    children = Path(f"/proc/{me}/task/{tid}/children").read_text().split()
                except OSError:
                    continue
                together = _status_kb(me, "VmRSS:")
                for pid in children:
                    self.peak_kb = max(self.peak_kb, _status_kb(pid, "VmHWM:"))
                    together += _status_kb(pid, "VmRSS:")
                self.together_kb = max(self.together_kb, together)


def main(path: str) -> int:
    package = Path(path)
    store = InMemoryRegistryStore()
    service = RefreshService(Settings("bucket-peak"), store=store, source=FileSource(package))
    watcher = ChildPeak()
    watcher.start()
    started = time.perf_counter()
    outcome = service.process("bucket-peak", "incoming/default/model.tar.gz", "etag")
    watcher.stop.set()
    watcher.join()
    result = {
        "status": outcome.status,
        "code": outcome.code,
        "message": outcome.message[:300],
        "seconds": round(time.perf_counter() - started, 1),
        "package_mb": round(package.stat().st_size / MiB, 1),
        "parent_peak_mb": round(_peak_mb(), 1),
        "child_peak_mb": round(watcher.peak_kb / 1024, 1),
        "together_peak_mb": round(watcher.together_kb / 1024, 1),
    }
    if outcome.version is not None:  # the child's own reading, as the manifest records it
        manifest = ModelRegistry(store, "default").manifest(outcome.version)
        measured = float(manifest.validation.get("sandbox_peak_mb") or 0)
        result["child_peak_mb"] = max(result["child_peak_mb"], measured)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
