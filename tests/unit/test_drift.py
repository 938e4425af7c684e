"""Drift statistics against scipy and independent computations; decisions; edge cases."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from infra import drift_rules
from scipy import stats
from scipy.spatial.distance import jensenshannon

from tests.conftest import ROOT
from tests.unit.test_reference import walk_numbers
from treeserve.model.reference import (
    QUANTILES,
    categorical_stats,
    compute_reference,
    numeric_stats,
    reference_quantiles,
)
from treeserve.monitoring import drift
from treeserve.monitoring.drift import MIN_ROWS
from treeserve.settings import DriftRule

pytestmark = pytest.mark.unit

TOL = 1e-9


def independent_psi(ref_counts: np.ndarray, cur_counts: np.ndarray, eps: float = 1e-4) -> float:
    """PSI written out term by term, no vectorisation shared with the module."""
    total_r, total_c = float(sum(ref_counts)), float(sum(cur_counts))
    out = 0.0
    for r, c in zip(ref_counts, cur_counts, strict=True):
        pr = r / total_r if r else eps
        pc = c / total_c if c else eps
        pr, pc = max(pr, eps), max(pc, eps)
        out += (pc - pr) * math.log(pc / pr)
    return out


def run(reference: dict[str, Any], current: np.ndarray, batches: int = 3) -> dict[str, Any]:
    acc = drift.FeatureAccumulator(reference)
    for part in np.array_split(np.asarray(current, dtype=np.float32), batches):
        acc.add(part)
    return drift.compare_feature(acc)


def binned(reference: dict[str, Any], current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference and current counts per bin (+ missing), computed without the module."""
    edges = np.asarray(reference["edges"], dtype=np.float32)
    cur = np.asarray(current, dtype=np.float32)
    present = cur[~np.isnan(cur)]
    bounds = [-np.inf, *edges.tolist(), np.inf]
    counts = [
        int(np.sum((present > lo) & (present <= hi))) for lo, hi in itertools.pairwise(bounds)
    ]
    return (
        np.array([*reference["counts"], reference["n_missing"]]),
        np.array([*counts, int(np.isnan(cur).sum())]),
    )


@pytest.mark.parametrize(
    ("n", "method"), [(7, "exact"), (800, "exact"), (9_000, "exact"), (25_000, "asymp")]
)
def test_numeric_statistics_agree_with_scipy_and_independent_psi_js(n: int, method: str) -> None:
    rng = np.random.default_rng(n)
    # 1882 present values: at most QUANTILES, so the quantiles are the whole reference and KS
    # is exactly scipy's (larger references: test_ks_against_the_full_reference_within_bound).
    ref_values = rng.normal(size=2000).round(2)  # rounded: ties inside and across samples
    ref_values[::17] = np.nan
    reference = numeric_stats("x", "float", ref_values)
    current = (rng.normal(0.1, 1.1, size=n)).round(2)
    current[::13] = np.nan
    result = run(reference, current)
    full = ref_values[~np.isnan(ref_values)].astype(np.float32)
    assert len(reference["quantiles"]) == full.size
    present = current[~np.isnan(current)].astype(np.float32)
    expected = stats.ks_2samp(full, present)
    assert result["test"] == "ks"
    assert result["ks_method"] == method
    assert abs(result["statistic"] - expected.statistic) < TOL
    assert result["ks_statistic"] == result["statistic"]
    assert result["ks_bound"] == 0.0
    assert abs(result["p_value"] - expected.pvalue) < TOL
    w = stats.wasserstein_distance(full, present) / np.float32(reference["std"])
    assert abs(result["wasserstein_normed"] - w) <= result["wasserstein_bound"] + TOL
    ref_counts, cur_counts = binned(reference, current)
    assert abs(result["psi"] - independent_psi(ref_counts, cur_counts)) < TOL
    assert abs(result["js_distance"] - jensenshannon(ref_counts, cur_counts, base=2)) < TOL


def test_streamed_ks_statistic_equals_scipy_without_keeping_values() -> None:
    rng = np.random.default_rng(5)
    reference = numeric_stats("x", "float", rng.normal(size=500).round(1))
    current = rng.normal(0.3, size=4000).round(1).astype(np.float32)
    acc = drift.FeatureAccumulator(reference)
    for part in np.array_split(current, 7):
        acc.add(part)
    acc.kept = None  # force the count-based path on a size scipy would still do exactly
    d, p, method = acc.ks() or (0.0, 0.0, "")
    expected = stats.ks_2samp(np.asarray(reference["quantiles"], dtype=np.float32), current)
    assert method == "asymp"
    assert abs(d - expected.statistic) < TOL
    assert abs(p - drift.ks_asymptotic_pvalue(expected.statistic, 500, 4000)) < TOL
    assert abs(p - stats.ks_2samp(reference["quantiles"], current, method="asymp").pvalue) < TOL


def test_categorical_chi2_psi_js_and_new_categories() -> None:
    rng = np.random.default_rng(2)
    ref_codes = rng.choice([0, 1, 2, 3], p=[0.4, 0.3, 0.2, 0.1], size=2000).astype(float)
    ref_codes[:40] = np.nan
    reference = categorical_stats("colour", ref_codes)
    current = rng.choice([0, 1, 2, 3, 7], p=[0.3, 0.3, 0.2, 0.1, 0.1], size=900).astype(float)
    current[:5] = np.nan
    result = run(reference, current)
    assert result["kind"] == "categorical"
    assert result["new_categories"] == ["7"]
    present = current[~np.isnan(current)]
    assert result["new_category_share"] == pytest.approx(np.mean(present == 7))
    # columns: categories 0..3, other/new, missing
    ref_counts = np.array([*reference["category_counts"], 0, reference["n_missing"]])
    new = int(np.sum(present == 7))
    cur_counts = np.array([*(int(np.sum(present == c)) for c in range(4)), new, 5])
    table = np.vstack([ref_counts, cur_counts])
    table = table[:, table.sum(axis=0) > 0]
    chi2, p, dof, _ = stats.chi2_contingency(table, correction=False)
    assert result["test"] == "chi2"
    assert abs(result["statistic"] - chi2) < TOL
    assert abs(result["p_value"] - p) < TOL
    assert result["dof"] == dof
    assert abs(result["psi"] - independent_psi(ref_counts, cur_counts)) < TOL
    assert abs(result["js_distance"] - jensenshannon(ref_counts, cur_counts, base=2)) < TOL
    assessed = drift.assess([result])[0]
    assert "new_categories" in assessed["flags"]


def test_benjamini_hochberg_agrees_with_scipy() -> None:
    p = np.random.default_rng(0).uniform(size=40) ** 3
    ours = drift.benjamini_hochberg(p.tolist())
    assert np.allclose(ours, stats.false_discovery_control(p, method="bh"), atol=TOL, rtol=0)
    assert drift.benjamini_hochberg([]) == []


def _features(X: np.ndarray, Y: np.ndarray, types: list[str] | None = None) -> list[dict[str, Any]]:
    names = [f"f{j}" for j in range(X.shape[1])]
    ref = compute_reference(X, names, types, None)
    results = []
    for j, feature in enumerate(ref["features"]):
        acc = drift.FeatureAccumulator(feature)
        acc.add(np.asarray(Y[:, j], dtype=np.float32))
        results.append(drift.compare_feature(acc))
    return drift.assess(results)


def test_planted_shift_in_one_feature_is_flagged_and_only_that_one() -> None:
    rng = np.random.default_rng(11)
    X = rng.normal(size=(4000, 8))
    Y = rng.normal(size=(3000, 8))
    Y[:, 5] += 0.8  # the planted shift
    results = _features(X, Y)
    assert [r["name"] for r in results if r["drifted"]] == ["f5"]
    shifted = results[5]
    assert shifted["psi"] >= drift.PSI_MAJOR
    assert shifted["severity"] == "major"
    assert shifted["p_adjusted"] < drift.ALPHA


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_shift_is_not_flagged_at_default_thresholds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(4000, 10))
    X[:, 9] = rng.integers(0, 5, size=4000)
    Y = rng.normal(size=(2000, 10))
    Y[:, 9] = rng.integers(0, 5, size=2000)
    results = _features(X, Y, ["float"] * 9 + ["c"])
    assert not any(r["drifted"] for r in results)
    assert all(r["flags"] == [] for r in results)
    assert all(r["psi"] < drift.PSI_MODERATE for r in results)


def assert_finite(result: dict[str, Any]) -> None:
    assert all(math.isfinite(v) for v in walk_numbers(result))


@pytest.mark.parametrize(
    ("name", "ref_col", "cur_col"),
    [
        ("constant both", np.full(100, 3.0), np.full(50, 3.0)),
        ("constant reference, moved current", np.full(100, 3.0), np.full(50, 4.0)),
        ("empty bins", np.arange(100.0), np.full(30, 5.0)),
        ("all missing current", np.arange(100.0), np.full(20, np.nan)),
        ("all missing reference", np.full(100, np.nan), np.arange(20.0)),
        ("all missing both", np.full(10, np.nan), np.full(10, np.nan)),
        ("one row", np.arange(100.0), np.array([42.0])),
        ("one reference row", np.array([1.0]), np.arange(20.0)),
        ("huge values", np.array([1e30, -1e30, 0.0]), np.array([3e38, -3e38])),
    ],
)
def test_edge_cases_never_nan_or_inf(name: str, ref_col: np.ndarray, cur_col: np.ndarray) -> None:
    for stats_of in (lambda c: numeric_stats("x", "float", c), lambda c: categorical_stats("x", c)):
        reference = stats_of(ref_col)
        result = drift.assess([run(reference, cur_col, batches=1)])[0]
        assert_finite(result)
        assert isinstance(result["drifted"], bool)


def test_edge_case_decisions() -> None:
    ref = numeric_stats("x", "float", np.random.default_rng(0).normal(size=500))
    one = drift.assess([run(ref, np.array([40.0]), batches=1)])[0]
    assert not one["drifted"], "one row is never enough evidence of drift"
    gone = drift.assess([run(ref, np.full(200, np.nan))])[0]
    assert gone["psi"] > drift.PSI_MAJOR
    assert "missing_rate" in gone["flags"]
    assert gone["statistic"] is not None  # chi-squared over bins + missing when KS cannot run
    assert gone["test"] == "chi2"
    assert gone["drifted"]
    outside = drift.assess([run(ref, np.full(300, 99.0))])[0]
    assert outside["out_of_range_share"] == 1.0
    assert "out_of_range" in outside["flags"]
    assert outside["drifted"]
    empty = drift.compare_feature(drift.FeatureAccumulator(ref))
    assert empty["n"] == 0
    assert empty["psi"] is None
    assert empty["p_value"] is None
    assert not drift.assess([empty])[0]["drifted"]


def test_model_only_reference_reports_shares_without_statistics() -> None:
    reference = {"name": "x", "kind": "numeric", "edges": [0.0, 1.0], "counts": None}
    result = run(reference, np.array([-1.0, 0.5, 0.7, 2.0, np.nan]), batches=2)
    assert result["psi"] is None
    assert result["p_value"] is None
    assert result["chart"]["reference"] is None
    assert result["chart"]["current"] == pytest.approx([0.2, 0.4, 0.2, 0.2])
    assert not drift.assess([result])[0]["drifted"]


# --- the reference quantiles: KS and Wasserstein against the full reference --------------------


REFERENCES = {
    "normal 5000": lambda rng: rng.normal(size=5000),
    "rounded 20000 (ties)": lambda rng: rng.normal(size=20_000).round(1),
    "lognormal 60000": lambda rng: rng.lognormal(0.0, 1.5, size=60_000),
    "five values 8000": lambda rng: rng.integers(0, 5, size=8000).astype(float),
}


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize("shift", [0.0, 0.05, 0.3])
def test_ks_against_the_full_reference_within_bound(name: str, shift: float) -> None:
    rng = np.random.default_rng(len(name))
    full = REFERENCES[name](rng).astype(np.float32)
    current = (REFERENCES[name](rng)[:12_000] + shift).astype(np.float32)
    reference = numeric_stats("x", "float", full)
    k = len(reference["quantiles"])
    assert k == QUANTILES < full.size
    result = run(reference, current, batches=4)
    exact = stats.ks_2samp(full, current)
    bound = 1.0 / (2 * k)
    assert result["ks_bound"] == bound
    assert abs(result["ks_statistic"] - exact.statistic) <= bound + TOL
    # p-value: scipy's asymptotic one for the full reference's size, at our statistic
    assert result["ks_method"] == "asymp"
    assert result["p_value"] == pytest.approx(
        drift.ks_asymptotic_pvalue(result["ks_statistic"], full.size, current.size), abs=TOL
    )
    w_exact = stats.wasserstein_distance(full, current) / max(float(np.std(full)), 0.001)
    error = abs(result["wasserstein_normed"] - w_exact)
    assert error <= result["wasserstein_bound"] + 1e-6
    assert error < 1e-3  # in practice far inside the bound
    if not name.startswith(("lognormal", "five")):  # wide gaps between quantiles: a loose bound
        assert result["wasserstein_bound"] < 0.02


def test_quantiles_ecdf_is_the_reference_ecdf_rounded_to_1_over_k() -> None:
    full = np.sort(np.random.default_rng(3).normal(size=7001).round(2).astype(np.float32))
    q = reference_quantiles(full, 500)
    points = np.unique(full)
    f = np.searchsorted(full, points, side="right") / full.size
    f_q = np.searchsorted(q, points, side="right") / q.size
    assert np.array_equal(f_q, np.floor(500 * f + 0.5) / 500)
    assert np.max(np.abs(f_q - f)) <= 1 / (2 * 500)


def test_old_references_with_a_sample_are_still_read() -> None:
    rng = np.random.default_rng(8)
    sample = np.sort(rng.normal(size=1000).astype(np.float32))
    reference = numeric_stats("x", "float", rng.normal(size=5000))
    del reference["quantiles"]
    reference["sample"] = sample.tolist()  # as references written before the quantiles
    current = rng.normal(0.2, size=3000).astype(np.float32)
    result = run(reference, current)
    expected = stats.ks_2samp(sample, current)
    assert result["ks_method"] == "exact"
    assert abs(result["ks_statistic"] - expected.statistic) < TOL
    assert abs(result["p_value"] - expected.pvalue) < TOL
    assert result["ks_bound"] is None  # a random sample: no deterministic bound
    w = stats.wasserstein_distance(sample, current) / np.float32(reference["std"])
    assert abs(result["wasserstein_normed"] - w) < 0.01
    assert result["wasserstein_bound"] is None


# --- drift rules: psi (the default), ks (SageMaker's), wasserstein (Evidently's) ---------------


def _planted(seed: int, f5: float, f3: float) -> list[dict[str, Any]]:
    """5,000 reference rows, 10,000 current: f5 and f3 shifted (in sd), f9 scaled by 1.2."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(5000, 10))
    Y = rng.normal(size=(10_000, 10))
    Y[:, 5] += f5
    Y[:, 9] *= 1.2
    Y[:, 3] += f3
    ref = compute_reference(X, [f"f{j}" for j in range(10)], None, None)
    results = []
    for j, feature in enumerate(ref["features"]):
        acc = drift.FeatureAccumulator(feature)
        for part in np.array_split(Y[:, j].astype(np.float32), 3):
            acc.add(part)
        results.append(drift.compare_feature(acc))
    return results


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    ("method", "flagged"),
    [("psi", ["f5"]), ("ks", ["f5"]), ("wasserstein", ["f3", "f5", "f9"])],
)
def test_each_method_flags_the_planted_shifts_it_should_and_nothing_else(
    seed: int, method: str, flagged: list[str]
) -> None:
    # Margins kept wide (f5 +0.4 sd, f3 +0.15 sd) so every seed lands on the same side of 0.1;
    # the documented table (docs/monitoring.md) uses the issue's +0.3 / +0.1.
    results = _planted(seed, f5=0.4, f3=0.15)
    rule = DriftRule(method, 0.1)  # type: ignore[arg-type]
    assessed = drift.assess(results, [rule] * len(results))
    assert [r["name"] for r in assessed if r["drifted"]] == flagged
    for r in assessed:
        assert r["rule"] == {"method": method, "threshold": 0.1}
        assert r["flags"] == []
        for key in ("psi", "js_distance", "ks_statistic", "wasserstein_normed"):
            assert isinstance(r[key], float), key  # all four statistics, every numeric feature


def test_thresholds_move_the_verdicts() -> None:
    results = _planted(4, f5=0.4, f3=0.15)
    strict = drift.assess(results, [DriftRule("ks", 0.05)] * 10)
    assert {"f5", "f3", "f9"} <= {r["name"] for r in strict if r["drifted"]}
    lax = drift.assess(results, [DriftRule("wasserstein", 0.5)] * 10)
    assert not any(r["drifted"] for r in lax)
    psi_low = drift.assess(results, [DriftRule("psi", 0.02)] * 10)
    assert {r["name"] for r in psi_low if r["drifted"]} >= {"f5", "f3", "f9"}


def test_manifest_overrides_per_feature_and_default() -> None:
    results = _planted(5, f5=0.4, f3=0.15)
    columns = [{"name": f"f{j}", "kind": "numeric"} for j in range(10)]
    section = {
        "default": {"method": "ks"},
        "features": {
            "f5": {"threshold": 0.5},  # inherits ks: D about 0.16 < 0.5
            "f3": {"method": "wasserstein"},  # its default threshold 0.1
            "f9": {"method": "wasserstein", "threshold": 0.12},
        },
    }
    rules = drift.resolve_rules(columns, section, DriftRule("psi", 0.3))
    assert rules[0] == DriftRule("ks", 0.1)  # the manifest's default, method's own threshold
    assert rules[5] == DriftRule("ks", 0.5)
    assert rules[3] == DriftRule("wasserstein", 0.1)
    assert rules[9] == DriftRule("wasserstein", 0.12)
    assessed = drift.assess(results, rules)
    assert [r["name"] for r in assessed if r["drifted"]] == ["f3", "f9"]
    assert assessed[5]["rule"] == {"method": "ks", "threshold": 0.5}
    # Without the manifest section, the environment's rule applies to every feature.
    assert drift.resolve_rules(columns, None, DriftRule("ks", 0.2)) == [DriftRule("ks", 0.2)] * 10
    # Same method inherited: so is the threshold.
    inherit = drift.resolve_rules(columns[:1], {"features": {"f0": {}}}, DriftRule("ks", 0.2))
    assert inherit == [DriftRule("ks", 0.2)]


def test_categorical_features_keep_the_psi_rule_under_numeric_methods() -> None:
    columns = [{"name": "c", "kind": "categorical"}, {"name": "x", "kind": "numeric"}]
    rules = drift.resolve_rules(columns, {"features": {"c": {"threshold": 0.3}}}, DriftRule("ks"))
    assert rules == [DriftRule("psi", 0.3), DriftRule("ks", 0.1)]
    rules = drift.resolve_rules(columns, None, DriftRule("wasserstein", 0.2))
    assert rules == [DriftRule("psi", drift.PSI_MODERATE), DriftRule("wasserstein", 0.2)]
    rng = np.random.default_rng(6)
    reference = categorical_stats("c", rng.integers(0, 4, size=3000).astype(float))
    moved = run(reference, rng.choice(4, p=[0.7, 0.1, 0.1, 0.1], size=2000).astype(float))
    assessed = drift.assess([moved], [DriftRule("psi", drift.PSI_MODERATE)])[0]
    assert assessed["drifted"]
    assert assessed["ks_statistic"] is None
    assert assessed["wasserstein_normed"] is None


def test_numeric_methods_need_min_rows() -> None:
    ref = numeric_stats("x", "float", np.random.default_rng(0).normal(size=500))
    few = run(ref, np.full(MIN_ROWS - 1, 50.0), batches=1)
    for method in ("ks", "wasserstein"):
        assert not drift.assess([dict(few)], [DriftRule(method, 0.1)])[0]["drifted"]  # type: ignore[arg-type]
    many = run(ref, np.full(MIN_ROWS, 50.0), batches=1)
    for method in ("ks", "wasserstein"):
        assert drift.assess([dict(many)], [DriftRule(method, 0.1)])[0]["drifted"]  # type: ignore[arg-type]


def test_docs_side_by_side_table_is_what_the_code_computes() -> None:
    text = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    table = text.split("<!-- drift-table:start -->\n")[1].split("<!-- drift-table:end -->")[0]
    assert table == drift_rules.table()
    sweep = text.split("<!-- drift-sweep:start -->\n```\n")[1].split("```\n<!-- drift-sweep")[0]
    assert sweep == drift_rules.sweep(20)
    # The anchors' verdicts on the documented seed, as the page states them.
    _, flagged = drift_rules.verdicts(*drift_rules.planted(drift_rules.SEED))
    assert flagged == {"psi": [], "ks": ["f5"], "wasserstein": ["f3", "f5", "f9"]}
