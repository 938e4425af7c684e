"""`make bench`: every benchmark side by side in one run, as ratios.

The machine is shared and noisy, so each section times treeserve next to a baseline measured
in the same run and reports the ratio of medians; absolute times are shown for context only.
Sections: inference (warm latency and cold start), refresh (event to promoted vs XGBoost load),
monitoring (1,000,000 captured rows vs numpy reading the same data), artifact sizes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

SECTIONS = {
    "inference": "infra.bench_inference",
    "refresh": "infra.bench_refresh",
    "monitoring": "infra.bench_monitoring",
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
    for name in args.sections or list(SECTIONS):
        print(f"\n===== {name} =====", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(SECTIONS[name])
        entry = module.bench if name == "artifacts" else module.main
        try:
            entry()
        except Exception as exc:  # one broken section must not hide the others' figures
            failed.append(name)
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
