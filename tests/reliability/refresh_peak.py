"""Peak memory of one refresh of a package, measured in a process of its own.

``python -m tests.reliability.refresh_peak PACKAGE`` runs the refresh pipeline
(:class:`treeserve.refresh.RefreshService`: read, validate with the sandbox child, reference
statistics, holdout gate, register, promote) on the package's bytes, with an in-memory registry,
and prints JSON: the outcome, this process's peak RSS (Linux /proc) and the sandbox child's (as
the child measured it, in the manifest's validation report: getrusage would count the pages the
fork shared). On Lambda both count against the refresh function's MemorySize at once, so their
sum bounds what the function needs.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from treeserve.refresh import RefreshService, UploadEvent, UploadObject
from treeserve.registry import InMemoryRegistryStore, ModelRegistry
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


def main(path: str) -> int:
    package = Path(path)
    store = InMemoryRegistryStore()
    service = RefreshService(Settings("bucket-peak"), store=store, source=FileSource(package))
    started = time.perf_counter()
    outcome = service.process("bucket-peak", "incoming/default/model.tar.gz", "etag")
    result = {
        "status": outcome.status,
        "code": outcome.code,
        "message": outcome.message[:300],
        "seconds": round(time.perf_counter() - started, 1),
        "package_mb": round(package.stat().st_size / MiB, 1),
        "parent_peak_mb": round(_peak_mb(), 1),
    }
    if outcome.version is not None:
        manifest = ModelRegistry(store, "default").manifest(outcome.version)
        result["child_peak_mb"] = manifest.validation.get("sandbox_peak_mb")
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
