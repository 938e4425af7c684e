"""Drift accumulators merge exactly: counts over any split of the values, merged, are the
counts of all the values at once (the fan-out's partial states rely on it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from treeserve.model.reference import compute_reference
from treeserve.monitoring import drift

pytestmark = pytest.mark.unit


def references(seed: int, n_ref: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    X = np.column_stack(
        [
            rng.normal(size=n_ref),
            rng.lognormal(0.0, 6.0, n_ref) * rng.choice([-1.0, 1.0], n_ref),
            rng.integers(0, 4, n_ref).astype(float),
        ]
    )
    ref = compute_reference(X, ["a", "b", "c"], ["float", "float", "c"], None)
    return list(ref["features"])


def current(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.column_stack(
        [
            rng.normal(0.3, 1.2, n),
            # 2**-40..2**40 and subnormals: float64 sums of these round, differently per batch
            rng.lognormal(0.0, 9.0, n) * rng.choice([-1.0, 1.0], n),
            rng.integers(0, 6, n).astype(float),  # codes 4, 5: new categories
        ]
    ).astype(np.float32)
    X[::13, 0] = np.nan
    X[::17, 2] = np.nan
    X[:50, 1] = np.float32(1e-42) * np.arange(50)  # zero and subnormals
    X[50:60, 0] = np.float32(np.inf)
    return X


def accumulate(ref: dict[str, Any], parts: list[np.ndarray]) -> drift.FeatureAccumulator:
    out = drift.FeatureAccumulator(ref)
    for part in parts:
        acc = drift.FeatureAccumulator(ref)
        acc.add(part)
        restored = drift.FeatureAccumulator(ref)
        restored.load(acc.state())
        out.merge(restored)
    return out


@pytest.mark.parametrize("n_ref", [800, 6000])  # the whole reference as points; quantiles
@pytest.mark.parametrize("splits", [2, 7, 40])
def test_merged_accumulators_equal_one_pass(n_ref: int, splits: int) -> None:
    X = current(1, 30_000)
    rng = np.random.default_rng(splits)
    cuts = np.sort(rng.choice(np.arange(1, X.shape[0]), splits - 1, replace=False))
    for j, ref in enumerate(references(0, n_ref)):
        whole = drift.FeatureAccumulator(ref)
        whole.add(X[:, j])
        parts = accumulate(ref, np.split(X[:, j], cuts))
        a, b = drift.compare_feature(whole), drift.compare_feature(parts)
        assert a == b, ref["name"]
        assert whole.sum == parts.sum or (np.isnan(whole.sum) and np.isnan(parts.sum))
        if not whole.categorical:
            assert np.array_equal(whole.segment_sums(), parts.segment_sums())
            assert whole.wasserstein() == parts.wasserstein()
            assert whole.ks() == parts.ks()


def test_the_sum_is_exact() -> None:
    """The per-exponent sums give the correctly rounded sum (math.fsum of the values)."""
    import math

    X = current(2, 20_000)[:, 1]
    acc = drift.FeatureAccumulator(references(0, 800)[1])
    for part in np.array_split(X, 9):
        acc.add(part)
    assert acc.sum == math.fsum(X.astype(np.float64).tolist())
    assert float(X.astype(np.float64).sum()) != acc.sum  # plain float64 sums round here


def test_segment_sums_are_each_segments_correctly_rounded_sum() -> None:
    """Per support segment (u_{j-1}, u_j], the sum of the current values in it, rounded once
    (math.fsum of the values themselves), over values spanning 60 binades: segments of one,
    two and more exponents alike."""
    import math

    rng = np.random.default_rng(17)
    for trial in range(40):
        scale = 10.0 ** float(rng.integers(-20, 20))
        ref_values = (rng.standard_cauchy(3000) * scale).astype(np.float32)
        ref = compute_reference(
            ref_values.reshape(-1, 1).astype(np.float64), ["f"], ["float"], None
        )
        acc = drift.FeatureAccumulator(ref["features"][0])
        current = (rng.standard_cauchy(4000) * scale).astype(np.float32)
        current[rng.random(4000) < 0.05] = 0.0
        for part in np.array_split(current, 3):
            acc.add(part)
        segment = np.searchsorted(acc.support, current, side="left")  # (u_{j-1}, u_j]
        expected = np.array(
            [
                math.fsum(current[segment == j].astype(np.float64).tolist())
                for j in range(acc.support.size + 1)
            ]
        )
        got = acc.segment_sums()
        assert np.array_equal(got, expected), trial
        parts = np.diff(np.flatnonzero(np.diff(acc.seg_keys[0] // drift.N_BUCKETS, prepend=-1)))
        if trial == 0:
            assert (parts == 2).any()  # every branch is taken
            assert (parts > 2).any()
