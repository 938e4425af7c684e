"""The drift rules side by side on planted shifts: the table in docs/monitoring.md.

5,000 reference rows and 10,000 current rows of 10 standard normal features (numpy's
``default_rng(SEED)``: reference first, then current); in the current rows f5 is shifted by
+0.3 sd, f9 scaled by 1.2 and f3 shifted by +0.1 sd. For every feature it prints treeserve's
statistics (streamed through :class:`treeserve.monitoring.drift.FeatureAccumulator` against
the reference statistics refresh stores) beside scipy's on the full reference, and the verdict
of each ``DRIFT_METHOD`` at ``DRIFT_THRESHOLD=0.1``:

- ``psi``: treeserve's default (Benjamini-Hochberg-adjusted KS p < 0.05 and PSI >= 0.1);
- ``ks``: SageMaker Model Monitor's default numeric rule, the L-infinity distance of the two
  CDFs (``scipy.stats.ks_2samp(...).statistic``) >= 0.1;
- ``wasserstein``: Evidently's default for references of more than 1,000 rows,
  ``scipy.stats.wasserstein_distance(ref, cur) / max(np.std(ref), 0.001)`` >= 0.1.

It also shows the KS statistic against a 1,000-value random sample of the reference, as
references written before the quantiles stored it. ``--seeds N`` adds how often each verdict
comes out the same way over seeds 0..N-1 (the shifts sit near the thresholds on purpose).

Run: ``python -m infra.drift_rules [--seeds 20]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import numpy as np
from scipy import stats

from treeserve.model.reference import compute_reference
from treeserve.monitoring import drift
from treeserve.settings import DRIFT_METHODS, DriftRule

SEED = 0
REFERENCE_ROWS = 5000
CURRENT_ROWS = 10_000
FEATURES = 10
THRESHOLD = 0.1
SHIFTS = {5: "+0.3 sd", 9: "x1.2 scale", 3: "+0.1 sd"}
OLD_SAMPLE_SIZE = 1000
OLD_SAMPLE_SEED = 20261129  # as treeserve.model.reference drew the sample before quantiles


def planted(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, current) rows with the three planted changes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(REFERENCE_ROWS, FEATURES))
    Y = rng.normal(size=(CURRENT_ROWS, FEATURES))
    Y[:, 5] += 0.3
    Y[:, 9] *= 1.2
    Y[:, 3] += 0.1
    return X.astype(np.float32), Y.astype(np.float32)


def verdicts(X: np.ndarray, Y: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """treeserve's per-feature results and, per method, the features it flags."""
    ref = compute_reference(X, [f"f{j}" for j in range(FEATURES)], None, None)
    results = []
    for j, feature in enumerate(ref["features"]):
        acc = drift.FeatureAccumulator(feature)
        for part in np.array_split(Y[:, j], 4):  # streamed in batches, as capture files come
            acc.add(part)
        results.append(drift.compare_feature(acc))
    flagged: dict[str, list[str]] = {}
    for method in DRIFT_METHODS:
        rule = DriftRule(method, THRESHOLD)
        assessed = drift.assess(copy.deepcopy(results), [rule] * FEATURES)
        flagged[method] = [r["name"] for r in assessed if r["drifted"]]
    return drift.assess(results), flagged


def old_sample_ks(column: np.ndarray, current: np.ndarray) -> float:
    rng = np.random.default_rng(OLD_SAMPLE_SEED)
    sample = column[rng.choice(column.size, size=OLD_SAMPLE_SIZE, replace=False)]
    return float(stats.ks_2samp(sample, current).statistic)


def table(seed: int = SEED) -> str:
    """The markdown table of docs/monitoring.md."""
    X, Y = planted(seed)
    results, flagged = verdicts(X, Y)
    head = (
        "| feature | change | PSI | KS p (BH) | `psi` | KS D | KS D, scipy | KS D, old sample "
        "| `ks` | normed W | normed W, scipy | `wasserstein` |"
    )
    lines = [head, "|" + " --- |" * 12]
    for j, r in enumerate(results):
        full, cur = X[:, j], Y[:, j]
        d_scipy = float(stats.ks_2samp(full, cur).statistic)
        w_scipy = float(stats.wasserstein_distance(full, cur)) / max(float(np.std(full)), 0.001)
        mark = {m: ("**drift**" if r["name"] in flagged[m] else "-") for m in DRIFT_METHODS}
        lines.append(
            f"| {r['name']} | {SHIFTS.get(j, 'none')} | {r['psi']:.3f} | {r['p_adjusted']:.1e} "
            f"| {mark['psi']} | {r['ks_statistic']:.4f} | {d_scipy:.4f} "
            f"| {old_sample_ks(full, cur):.4f} | {mark['ks']} | {r['wasserstein_normed']:.4f} "
            f"| {w_scipy:.4f} | {mark['wasserstein']} |"
        )
    return "\n".join(lines) + "\n"


def sweep(seeds: int) -> str:
    """How often each method flags each planted feature over seeds 0..seeds-1."""
    counts: dict[str, dict[str, int]] = {
        m: dict.fromkeys(("f3", "f5", "f9", "other"), 0) for m in DRIFT_METHODS
    }
    for seed in range(seeds):
        _, flagged = verdicts(*planted(seed))
        for method, names in flagged.items():
            for name in names:
                counts[method][name if name in counts[method] else "other"] += 1
    lines = [f"flagged over seeds 0..{seeds - 1} (of {seeds}):"]
    for method, c in counts.items():
        lines.append(
            f"  {method:<12} f5 {c['f5']}, f9 {c['f9']}, f3 {c['f3']}, unshifted {c['other']}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--seeds", type=int, default=0, help="also sweep seeds 0..N-1")
    args = parser.parse_args(argv)
    sys.stdout.write(table(args.seed))
    if args.seeds:
        sys.stdout.write("\n" + sweep(args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
