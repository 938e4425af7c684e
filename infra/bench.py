"""`make bench`: every benchmark side by side in one run, as ratios.

The machine is shared and noisy, so each section times treeserve next to a baseline measured
in the same run and reports the ratio of medians; absolute times are shown for context only.
Sections: inference (warm latency and cold start), capture (the captured request against the
uncaptured one; a monitoring run over 100,000 rows against numpy's histograms and sorts),
refresh (event to promoted vs XGBoost load), monitoring (1,000,000 captured rows vs numpy
reading the same data), batch (the worker's rows/s against inplace_predict; peak RSS over a
1 GB object), artifact sizes. Sections that have goals print them again at the end.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

SECTIONS = {
    "inference": "infra.bench_inference",
    "capture": "infra.bench_capture",
    "refresh": "infra.bench_refresh",
    "monitoring": "infra.bench_monitoring",
    "batch": "infra.bench_batch",
    "artifacts": "infra.build",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("sections", nargs="*", help=f"sections to run: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    failed = []
    goals: dict[str, str] = {}
    for name in args.sections or list(SECTIONS):
        print(f"\n===== {name} =====", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(SECTIONS[name])
        entry = module.bench if name == "artifacts" else module.main
        try:
            result = entry()
            if isinstance(result, dict):
                goals.update(result)
        except Exception as exc:  # one broken section must not hide the others' figures
            failed.append(name)
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    if goals:
        print("\n===== goals =====")
        for what, figure in goals.items():
            print(f"{what}: {figure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
