"""Drift and data-quality statistics of current traffic against a version's reference.

Current data is streamed in (:class:`FeatureAccumulator.add`, one float32 column per capture
file, NaN missing); only counts are kept, so memory does not grow with the number of rows. Then
:func:`compare_feature` gives one feature's statistics and :func:`assess` makes the decisions.

Statistics (reference layout in :mod:`treeserve.model.reference`):

- **PSI** over the reference bins (numeric: open-ended quantile bins; categorical: the reference
  categories, plus one bin for new/other categories) plus one bin for missing values:
  ``sum((c - r) * ln(c / r))`` on proportions, an empty bin's proportion replaced by
  ``PSI_EPS`` (1e-4) so the sum stays finite.
- **Jensen-Shannon distance** (base 2, in [0, 1]) over the same bins, as
  ``scipy.spatial.distance.jensenshannon(r, c, base=2)``; it needs no epsilon.
- **Kolmogorov-Smirnov** (numeric, non-missing values) two-sample test against the reference's
  quantiles (k = min(2000, n) of the whole reference; every value for n <= 2000). The statistic
  is computed exactly against them from counts of current values below and at each quantile
  (the supremum of the ECDF difference is attained at those points), without keeping the
  current values; since the quantiles' ECDF is within 1/(2k) of the reference's, it is within
  ``ks_bound`` = 1/(2k) of ``scipy.stats.ks_2samp(full reference, current).statistic`` (0 for
  n <= 2000). p-value: when the quantiles are the whole reference and at most 10,000 current
  values came in, they are kept and ``ks_2samp`` itself computes it (``method="auto"``: exact);
  else scipy's asymptotic ``kstwo.sf(D, round(m n / (m + n)))`` with m the full reference's
  size. References written before the quantiles hold a 1000-value random sample: KS runs
  against it exactly as it did (m = the sample's size), with no bound.
- **Wasserstein** (numeric): W1 between the reference's quantiles and the current values, from
  per-run counts and sums (:meth:`FeatureAccumulator.wasserstein` states the error bound), and
  ``wasserstein_normed`` = W1 / max(reference std, 0.001), Evidently's "normed" distance.
- **Chi-squared** test of homogeneity (categorical) on the 2 x k table reference vs current over
  categories (+ new/other, + missing), no continuity correction, empty columns dropped; equals
  ``scipy.stats.chi2_contingency(table, correction=False)``.
- **Missing-rate change**, **share out of the reference range** (numeric), **new categories**.

Decisions (:func:`assess`), by each feature's rule (:func:`resolve_rules`: ``DRIFT_METHOD`` /
``DRIFT_THRESHOLD``, overridden by the manifest's ``drift`` section; docs/monitoring.md). One
p-value per feature (KS for numeric features, chi-squared for categorical ones and for numeric
features without usable quantiles) is adjusted with Benjamini-Hochberg across the features (and
separately across prediction columns). With at least ``MIN_ROWS`` (30) current rows, under
``psi`` (the default) a feature drifts when its adjusted p-value is below ``ALPHA`` (0.05)
*and* its PSI is at least the threshold (default ``PSI_MODERATE``, 0.1): the test makes a small
sample need a large effect, the PSI floor keeps a huge sample from flagging a shift too small
to matter. Under ``ks`` it drifts when the KS statistic is at least the threshold (SageMaker
Model Monitor's rule), under ``wasserstein`` when the normed Wasserstein distance is
(Evidently's); categorical features keep the psi rule. ``PSI_MAJOR`` (0.25) marks a drifted
feature major. Data-quality flags (missing-rate increase, out of range) need both an absolute
excess and a one-sided binomial test against the reference rate at ``ALPHA``, so they also
account for sample size. Every number is finite; what cannot be computed is ``None``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from treeserve.settings import DEFAULT_DRIFT_THRESHOLD, DriftRule, drift_rule_problem

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

PSI_EPS = 1e-4
PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
ALPHA = 0.05
EXACT_KS_MAX_N = 10_000  # scipy's ks_2samp(method="auto") is exact up to here
MIN_ROWS = 30  # fewer current rows than this never make a drift verdict
MISSING_TOLERANCE = 0.05  # absolute increase of the missing rate worth a flag
RANGE_TOLERANCE = 0.01  # share of values outside the reference range worth a flag
MAX_LISTED_CATEGORIES = 20
WASSERSTEIN_MIN_NORM = 0.001  # Evidently's floor on the reference's standard deviation


# --- statistics on binned counts ---------------------------------------------------------------


def _proportions(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def psi(reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike) -> float:
    """Population stability index of two count vectors over the same bins."""
    r = np.maximum(_proportions(reference_counts), PSI_EPS)
    c = np.maximum(_proportions(current_counts), PSI_EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two count vectors."""
    p = _proportions(reference_counts)
    q = _proportions(current_counts)
    m = (p + q) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
        kq = np.where(q > 0, q * np.log2(np.where(q > 0, q, 1.0) / np.where(m > 0, m, 1.0)), 0.0)
    js = (kp.sum() + kq.sum()) / 2.0
    return float(math.sqrt(min(max(js, 0.0), 1.0)))


def chi2_homogeneity(
    reference_counts: npt.ArrayLike, current_counts: npt.ArrayLike
) -> tuple[float, float, int]:
    """Chi-squared test that two count vectors come from one distribution: (stat, p, dof)."""
    table = np.vstack(
        [np.asarray(reference_counts, np.float64), np.asarray(current_counts, np.float64)]
    )
    table = table[:, table.sum(axis=0) > 0]
    rows = table.sum(axis=1)
    if table.shape[1] < 2 or np.any(rows == 0):
        return 0.0, 1.0, max(table.shape[1] - 1, 0)
    expected = np.outer(rows, table.sum(axis=0)) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    dof = table.shape[1] - 1
    return stat, float(np.clip(stats.chi2.sf(stat, dof), 0.0, 1.0)), dof


def ks_asymptotic_pvalue(d: float, n1: int, n2: int) -> float:
    """scipy's two-sided asymptotic KS p-value for sample sizes ``n1``, ``n2``."""
    en = float(n1) * float(n2) / (float(n1) + float(n2))
    return float(np.clip(stats.kstwo.sf(d, np.round(en)), 0.0, 1.0))


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, clipped to 1)."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(adjusted, 0.0, 1.0)
    return [float(v) for v in out]


def binom_excess_pvalue(k: int, n: int, rate: float) -> float:
    """One-sided p-value of seeing at least ``k`` of ``n`` when the true rate is ``rate``."""
    if n <= 0 or k <= 0:
        return 1.0
    rate = min(max(rate, 1e-9), 1.0)
    return float(np.clip(stats.binom.sf(k - 1, n, rate), 0.0, 1.0))


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else ``None`` (JSON holds no NaN or infinity)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


# --- streaming accumulators --------------------------------------------------------------------

# Exact sums of float32 values: values of one float32 exponent e are multiples of 2**(e-23)
# below 2**(e+1) in magnitude, so float64 sums up to 2**29 of them exactly, in any order.
# Bucket 0: zero, subnormals and exponent -126 (multiples of 2**-149); 1..253: exponents
# -125..127; 254/255: +inf/-inf.
N_BUCKETS = 256
_POWERS = np.ldexp(np.float32(1.0), np.arange(-125, 128)).astype(np.float32)
_NO_STARTS = np.zeros(0, dtype=np.int64)
SEGMENT_COMPACT = 1 << 16  # (key, sum) runs gathered per column before they are folded


def _runs(values: F32, starts: npt.NDArray[np.int64]) -> tuple[I64, I64, npt.NDArray[np.float64]]:
    """Runs of sorted, present ``values`` that share one exponent bucket and lie between
    consecutive ``starts``: (run starts, their buckets, their exact float64 sums)."""
    n = values.size
    zero_lo = int(np.searchsorted(values, np.float32(0.0), side="left"))
    zero_hi = int(np.searchsorted(values, np.float32(0.0), side="right"))
    cuts = [starts, np.zeros(1, np.int64)]
    if zero_lo:  # negatives: a bucket ends at each -2**k between their largest and smallest
        lo, hi = np.searchsorted(_POWERS, [-values[zero_lo - 1], -values[0]], side="left")
        cuts.append(np.searchsorted(values, -_POWERS[lo : hi + 1], side="right"))
        cuts.append(np.searchsorted(values[:1], [-np.inf], side="right"))
    if zero_hi < n:  # positives: a bucket starts at each 2**k between their smallest and largest
        lo, hi = np.searchsorted(_POWERS, [values[zero_hi], values[-1]], side="left")
        cuts.append(np.searchsorted(values, _POWERS[lo : hi + 1], side="left"))
        cuts.append(np.searchsorted(values, [np.inf], side="left"))
    run = np.sort(np.concatenate(cuts).astype(np.int64, copy=False))
    run = run[np.concatenate(([True], run[1:] != run[:-1])) & (run < n)]
    first = values[run]
    _, exponent = np.frexp(np.abs(first))
    buckets = np.clip(exponent.astype(np.int64) + 125, 0, 253)
    buckets[first == 0] = 0  # a run from zero holds the subnormals after it
    buckets[np.isposinf(first)] = 254
    buckets[np.isneginf(first)] = 255
    return run, buckets, np.add.reduceat(values, run, dtype=np.float64)


def _exact_total(parts: npt.NDArray[np.float64]) -> float:
    """The correctly rounded sum of exact parts (math.fsum: independent of their order)."""
    finite_parts = parts[np.isfinite(parts)]
    total = math.fsum(finite_parts.tolist())
    special = parts[~np.isfinite(parts)]
    return float(total + special.sum()) if special.size else total


class FeatureAccumulator:
    """Counts of one feature's current values against its reference FeatureStats."""

    def __init__(self, reference: dict[str, Any]) -> None:
        self.ref = reference
        self.categorical = reference.get("kind") == "categorical"
        self.n = 0
        self.n_missing = 0
        # The values' sum, exactly: one float64 per float32 exponent (see _runs), so any
        # partition of the values into batches gives the same sum (a fan-out merges them).
        self.sums = np.zeros(N_BUCKETS, dtype=np.float64)
        self.min = math.inf
        self.max = -math.inf
        if self.categorical:
            self.categories = np.asarray(reference.get("categories") or [], dtype=np.float32)
            self.cat_counts = np.zeros(self.categories.size + 1, dtype=np.int64)  # + new/other
            self.new: dict[float, int] = {}
            return
        self.edges = np.asarray(reference.get("edges") or [], dtype=np.float32)
        self.bins = np.zeros(self.edges.size + 1, dtype=np.int64)
        # The reference's ECDF for KS and Wasserstein: its quantiles (treeserve.model.reference:
        # within 1/(2k) of the full reference's ECDF everywhere), or, in references written
        # before them, a random sample of at most 1000 values.
        quantiles = reference.get("quantiles")
        self.legacy_sample = quantiles is None and reference.get("sample") is not None
        points = np.sort(
            np.asarray(
                quantiles if quantiles is not None else (reference.get("sample") or []),
                dtype=np.float32,
            )
        )
        self.sample = points  # what ks_2samp is given when the points are the whole reference
        self.sample_size = int(points.size)
        n_ref = reference.get("n")
        ref_present = int(n_ref) - int(reference.get("n_missing") or 0) if n_ref is not None else 0
        # The points are the reference itself (every value, or the legacy sample that KS ran
        # against): then ks_2samp(points, current) is the test; else the points summarise
        # ref_present values and the p-value is scipy's asymptotic one for that size.
        self.exact_reference = self.legacy_sample or self.sample_size >= ref_present
        self.ref_size = self.sample_size if self.exact_reference else ref_present
        self.support, ref_le = np.unique(points, return_counts=True)
        self.ref_weights = ref_le.astype(np.float64)
        self.ref_cdf = np.cumsum(ref_le) / max(self.sample_size, 1)
        # Per support value u_j: current values <= u_j and < u_j (cumulative, so batches add
        # up), and (Wasserstein) the sum of the current values in (u_{j-1}, u_j] for j = 0..K
        # (u_{-1} = -inf, u_K = +inf), exactly: sparse (segment * N_BUCKETS + exponent bucket)
        # keys and their exact sums, compacted now and then (:meth:`segment_sums`).
        self.cum_le = np.zeros(self.support.size, dtype=np.int64)
        self.cum_lt = np.zeros(self.support.size, dtype=np.int64)
        self.seg_keys: list[I64] = []
        self.seg_vals: list[npt.NDArray[np.float64]] = []
        self._seg_pending = 0
        # Current values kept for ks_2samp's exact p-value (only against the whole reference).
        self.kept: list[F32] | None = [] if self.exact_reference else None
        self.kept_n = 0
        lo, hi = reference.get("min"), reference.get("max")
        self.ref_min = np.float32(lo) if lo is not None else None
        self.ref_max = np.float32(hi) if hi is not None else None
        self.out_of_range = 0

    def add(self, column: F32) -> None:
        """Account for a batch of current values (float32, NaN missing)."""
        self.add_sorted(np.sort(column))

    def add_sorted(self, column: F32) -> None:
        """:meth:`add` for a batch already sorted ascending (NaN last, as ``np.sort`` puts it).

        Sorting once lets every count be a search of the few reference points (edges, sample
        values) in the batch, instead of a search of every value among them.
        """
        present = int(np.searchsorted(column, np.float32(np.nan), side="left"))
        values = column[:present]
        self.n += int(column.size)
        self.n_missing += int(column.size - present)
        if present == 0:
            return
        self.min = min(self.min, float(values[0]))
        self.max = max(self.max, float(values[-1]))
        if self.categorical:
            _, buckets, sums = _runs(values, _NO_STARTS)
            self.sums += np.bincount(buckets, weights=sums, minlength=N_BUCKETS)
            self._add_categories(values)
            return
        # Bin i is (e[i-1], e[i]]: the values <= e[i] less those <= e[i-1].
        at_or_below = np.searchsorted(values, self.edges, side="right")
        self.bins += np.diff(at_or_below, prepend=0, append=present)
        if self.ref_min is not None and self.ref_max is not None:
            below = int(np.searchsorted(values, self.ref_min, side="left"))
            above = present - int(np.searchsorted(values, self.ref_max, side="right"))
            self.out_of_range += below + above
        if self.support.size:
            self._add_to_support(values)
        else:
            _, buckets, sums = _runs(values, _NO_STARTS)
            self.sums += np.bincount(buckets, weights=sums, minlength=N_BUCKETS)
        if self.kept is not None:
            self.kept_n += present
            if self.kept_n > EXACT_KS_MAX_N:
                self.kept = None  # scipy is asymptotic above this size: counts suffice
            else:
                self.kept.append(values.copy())

    def _add_to_support(self, values: F32) -> None:
        lt = np.searchsorted(values, self.support, side="left")
        # Values equal to a support point are rare in continuous data: search those alone.
        tied = np.flatnonzero(values[np.minimum(lt, values.size - 1)] == self.support)
        le = lt.copy()
        if tied.size:
            le[tied] = np.searchsorted(values, self.support[tied], side="right")
        self.cum_lt += lt
        self.cum_le += le
        # One pass sums runs of values that share a segment and an exponent: each run's sum is
        # exact, and so is the total (and each segment's) kept per exponent bucket.
        starts, buckets, sums = _runs(values, le)
        self.sums += np.bincount(buckets, weights=sums, minlength=N_BUCKETS)
        segment = np.searchsorted(le, starts, side="right")
        self.seg_keys.append(segment * N_BUCKETS + buckets)
        self.seg_vals.append(sums)
        self._seg_pending += starts.size
        if self._seg_pending > SEGMENT_COMPACT:
            self._compact()

    def _compact(self, *, force: bool = False) -> None:
        """Fold the per-batch (key, sum) runs into one sorted array of distinct keys (sums of
        one segment and exponent are exact, so the order of folding changes nothing)."""
        if len(self.seg_keys) <= (0 if force else 1):
            return
        keys, inverse = np.unique(np.concatenate(self.seg_keys), return_inverse=True)
        vals = np.bincount(inverse, weights=np.concatenate(self.seg_vals)).astype(np.float64)
        self.seg_keys, self.seg_vals = [keys], [vals]
        self._seg_pending = int(keys.size)

    @property
    def sum(self) -> float:
        """The sum of the present values (correctly rounded: the same for any batching)."""
        return _exact_total(self.sums)

    def segment_sums(self) -> npt.NDArray[np.float64]:
        """Sum of the current values in each segment (u_{j-1}, u_j], j = 0..K, correctly
        rounded."""
        out = np.zeros(self.support.size + 1, dtype=np.float64)
        self._compact(force=True)
        if not self.seg_keys:
            return out
        keys, vals = self.seg_keys[0], self.seg_vals[0]
        segment = keys // N_BUCKETS
        first = np.flatnonzero(np.diff(segment, prepend=-1))
        stops = np.append(first[1:], segment.size)
        parts = stops - first
        out[segment[first]] = vals[first]
        # Two exact parts (values of two exponents): one IEEE addition is their correctly
        # rounded sum, as math.fsum's (a zero sum is +0.0 in both: the parts are of two
        # exponents, so it can only come from x + -x).
        two = first[parts == 2]
        out[segment[two]] = vals[two] + vals[two + 1]
        many = parts > 2  # more: their exact, rounded sum
        for start, stop in zip(first[many].tolist(), stops[many].tolist(), strict=True):
            out[segment[start]] = _exact_total(vals[start:stop])
        return out

    # -- merging (monitoring fans a long window out; drift statistics of the union) ---------

    def merge(self, other: FeatureAccumulator) -> None:
        """Add ``other``'s counts (of the same reference column) to these."""
        self.n += other.n
        self.n_missing += other.n_missing
        self.sums += other.sums
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if self.categorical:
            self.cat_counts += other.cat_counts
            for code, k in other.new.items():
                self.new[code] = self.new.get(code, 0) + k
            return
        self.bins += other.bins
        self.out_of_range += other.out_of_range
        self.cum_le += other.cum_le
        self.cum_lt += other.cum_lt
        self.seg_keys.extend(other.seg_keys)
        self.seg_vals.extend(other.seg_vals)
        self._compact()
        if self.kept is not None:
            if other.kept is None or self.kept_n + other.kept_n > EXACT_KS_MAX_N:
                self.kept = None
            else:
                self.kept.extend(other.kept)
                self.kept_n += other.kept_n

    def state(self) -> dict[str, npt.NDArray[Any]]:
        """The counts as arrays (:meth:`load` reads them back), for a partial state."""
        out: dict[str, npt.NDArray[Any]] = {
            "n": np.array([self.n, self.n_missing], dtype=np.int64),
            "sums": self.sums,
            "range": np.array([self.min, self.max], dtype=np.float64),
        }
        if self.categorical:
            out["cat_counts"] = self.cat_counts
            out["new"] = np.array(list(self.new.items()), dtype=np.float64).reshape(-1, 2)
            return out
        self._compact(force=True)
        out["bins"] = self.bins
        out["out_of_range"] = np.array([self.out_of_range], dtype=np.int64)
        out["cum_le"] = self.cum_le
        out["cum_lt"] = self.cum_lt
        out["seg_keys"] = self.seg_keys[0] if self.seg_keys else np.zeros(0, np.int64)
        out["seg_vals"] = self.seg_vals[0] if self.seg_vals else np.zeros(0, np.float64)
        if self.kept is not None:
            out["kept"] = np.concatenate(self.kept) if self.kept else np.zeros(0, np.float32)
        return out

    def load(self, state: dict[str, npt.NDArray[Any]]) -> None:
        """Set the counts from :meth:`state`'s arrays (on a fresh accumulator)."""
        self.n, self.n_missing = (int(v) for v in state["n"])
        self.sums = np.asarray(state["sums"], dtype=np.float64).copy()
        self.min, self.max = (float(v) for v in state["range"])
        if self.categorical:
            self.cat_counts = np.asarray(state["cat_counts"], dtype=np.int64).copy()
            self.new = {float(c): int(k) for c, k in np.asarray(state["new"]).tolist()}
            return
        self.bins = np.asarray(state["bins"], dtype=np.int64).copy()
        self.out_of_range = int(state["out_of_range"][0])
        self.cum_le = np.asarray(state["cum_le"], dtype=np.int64).copy()
        self.cum_lt = np.asarray(state["cum_lt"], dtype=np.int64).copy()
        keys = np.asarray(state["seg_keys"], dtype=np.int64)
        self.seg_keys = [keys] if keys.size else []
        self.seg_vals = [np.asarray(state["seg_vals"], dtype=np.float64)] if keys.size else []
        self._seg_pending = int(keys.size)
        if "kept" in state and self.kept is not None:
            kept = np.asarray(state["kept"], dtype=np.float32)
            self.kept, self.kept_n = [kept], int(kept.size)
        else:
            self.kept = None

    def _add_categories(self, values: F32) -> None:
        codes, counts = np.unique(values, return_counts=True)
        pos = np.searchsorted(self.categories, codes)
        pos_c = np.minimum(pos, max(self.categories.size - 1, 0))
        known = (
            (self.categories[pos_c] == codes)
            if self.categories.size
            else np.zeros(codes.size, bool)
        )
        np.add.at(self.cat_counts, pos[known], counts[known])
        self.cat_counts[-1] += int(counts[~known].sum())
        for code, count in zip(codes[~known].tolist(), counts[~known].tolist(), strict=True):
            self.new[code] = self.new.get(code, 0) + count

    # -- results ----------------------------------------------------------------------------

    def ks(self) -> tuple[float, float, str] | None:
        """(statistic, p-value, method) against the reference's points, or None.

        Exact (``ks_2samp`` itself) when the points are the whole reference and at most
        EXACT_KS_MAX_N current values came in; else the statistic from the counts and scipy's
        asymptotic p-value for the full reference's size.
        """
        m, n = self.ref_size, self.n - self.n_missing
        if m == 0 or n == 0:
            return None
        le = self.cum_le / n  # current ECDF at each support value
        lt = self.cum_lt / n  # current ECDF just below each support value
        prev = np.concatenate([[0.0], self.ref_cdf[:-1]])
        d = max(float(np.max(np.abs(self.ref_cdf - le))), float(np.max(lt - prev)), 0.0)
        if self.kept is not None and self.exact_reference:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = stats.ks_2samp(self.sample, np.concatenate(self.kept), method="auto")
            return float(res.statistic), float(np.clip(res.pvalue, 0.0, 1.0)), "exact"
        return d, ks_asymptotic_pvalue(d, m, n), "asymp"

    @property
    def ks_bound(self) -> float | None:
        """Bound on |KS statistic - scipy's on the full reference| (None: a legacy sample)."""
        if self.legacy_sample or self.sample_size == 0:
            return None
        return 0.0 if self.exact_reference else 1.0 / (2.0 * self.sample_size)

    def wasserstein(self) -> tuple[float, float | None] | None:
        """(W1 distance, bound on its error) against the reference's points, or None.

        W1 is computed exactly between the points (weight 1/k each) and the current values
        with each run of values strictly between two consecutive points replaced by one atom
        at its mean. That changes nothing where the reference ECDF (constant there) stays on
        one side of the current ECDF, and at most ``count / n * width / 2`` where it crosses
        it; the bound adds those terms and, for a reference summarised by k < n quantiles,
        ``(max - min) / (2k)`` (treeserve.model.reference). The bound is None against a legacy
        random sample, whose own distance from the reference no bound covers.
        """
        n = self.n - self.n_missing
        if self.support.size == 0 or n == 0:
            return None
        u = self.support.astype(np.float64)
        le, lt = self.cum_le.astype(np.float64), self.cum_lt.astype(np.float64)
        at_u = le - lt
        # Runs strictly between consecutive points: below u_0, (u_j, u_{j+1}), above u_last;
        # segment j is (u_{j-1}, u_j], so a run's sum is its segment's less the values at u_j.
        counts = np.concatenate([[lt[0]], lt[1:] - le[:-1], [n - le[-1]]])
        sums = self.segment_sums() - np.concatenate([at_u * u, [0.0]])
        lo = np.concatenate([[-np.inf], u])
        hi = np.concatenate([u, [np.inf]])
        empty_at = np.concatenate([[u[0]], u])  # a finite place for runs of no values
        means = np.clip(np.where(counts > 0, sums / np.maximum(counts, 1.0), empty_at), lo, hi)
        values = np.concatenate([u, means])
        weights = np.concatenate([at_u, np.maximum(counts, 0.0)])
        distance = float(stats.wasserstein_distance(u, values, self.ref_weights, weights))
        inner = counts[1:-1]
        level = self.ref_cdf[:-1]  # the reference ECDF on [u_j, u_{j+1})
        crossing = (le[:-1] / n < level) & (level < lt[1:] / n)
        bound = float(np.sum(np.where(crossing, inner / n * np.diff(u) / 2.0, 0.0)))
        if self.legacy_sample:
            return distance, None
        if not self.exact_reference:
            lo_ref, hi_ref = self.ref.get("min"), self.ref.get("max")
            if lo_ref is None or hi_ref is None:
                return distance, None
            bound += (float(hi_ref) - float(lo_ref)) / (2.0 * self.sample_size)
        return distance, bound


def _current_summary(acc: FeatureAccumulator) -> dict[str, float | None]:
    present = acc.n - acc.n_missing
    return {
        "min": finite(acc.min) if present else None,
        "max": finite(acc.max) if present else None,
        "mean": finite(acc.sum / present) if present else None,
    }


def compare_feature(acc: FeatureAccumulator) -> dict[str, Any]:
    """One feature's statistics (no decisions yet; see :func:`assess`)."""
    ref = acc.ref
    n, n_missing = acc.n, acc.n_missing
    missing_rate = n_missing / n if n else 0.0
    ref_rate = ref.get("missing_rate")
    out: dict[str, Any] = {
        "name": ref.get("name"),
        "kind": "categorical" if acc.categorical else "numeric",
        "n": n,
        "n_missing": n_missing,
        "missing_rate": missing_rate,
        "reference_missing_rate": finite(ref_rate),
        "reference_present": (
            int(ref["n"]) - int(ref.get("n_missing") or 0) if ref.get("n") is not None else None
        ),
        "missing_rate_change": finite(missing_rate - ref_rate) if ref_rate is not None else None,
        "current": _current_summary(acc),
        "psi": None,
        "js_distance": None,
        "test": None,
        "p_value": None,
        "statistic": None,
        "ks_statistic": None,
        "ks_bound": None,
        "wasserstein_distance": None,
        "wasserstein_normed": None,
        "wasserstein_bound": None,
    }
    has_counts = (
        ref.get("counts") if not acc.categorical else ref.get("category_counts")
    ) is not None
    ref_missing = int(ref.get("n_missing") or 0)
    if acc.categorical:
        cur = np.concatenate([acc.cat_counts, [n_missing]])
        values = ref.get("category_values")
        labels = [_label(c, values) for c in acc.categories.tolist()] + ["other/new", "missing"]
        new = sorted(acc.new.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: by code
        other = int(ref.get("other_count") or 0)
        out["new_categories"] = (
            [_label(c, values) for c, _ in new[:MAX_LISTED_CATEGORIES]] if not other else []
        )
        out["new_category_share"] = (
            sum(v for _, v in new) / (n - n_missing) if (n - n_missing) and not other else 0.0
        )
        refc = (
            np.concatenate([ref["category_counts"], [other, ref_missing]]).astype(np.int64)
            if has_counts
            else None
        )
    else:
        cur = np.concatenate([acc.bins, [n_missing]])
        labels = [*_bin_labels(acc.edges), "missing"]
        present = n - n_missing
        out["out_of_range_share"] = (
            acc.out_of_range / present if present and acc.ref_min is not None else None
        )
        refc = (
            np.concatenate([ref["counts"], [ref_missing]]).astype(np.int64) if has_counts else None
        )
    out["chart"] = {
        "labels": labels,
        "current": [float(v) for v in _proportions(cur)],
        "reference": [float(v) for v in _proportions(refc)] if refc is not None else None,
    }
    if refc is None or n == 0 or refc.sum() == 0:
        return out
    out["psi"] = finite(psi(refc, cur))
    out["js_distance"] = finite(js_distance(refc, cur))
    ks = None if acc.categorical else acc.ks()
    if ks is not None:
        out.update(test="ks", statistic=finite(ks[0]), p_value=finite(ks[1]), ks_method=ks[2])
        out.update(ks_statistic=finite(ks[0]), ks_bound=acc.ks_bound)
        w = acc.wasserstein()
        if w is not None:
            norm = max(float(ref.get("std") or 0.0), WASSERSTEIN_MIN_NORM)
            out["wasserstein_distance"] = finite(w[0])
            out["wasserstein_normed"] = finite(w[0] / norm)
            out["wasserstein_bound"] = finite(w[1] / norm) if w[1] is not None else None
    else:
        stat, p, dof = chi2_homogeneity(refc, cur)
        out.update(test="chi2", statistic=finite(stat), p_value=finite(p), dof=dof)
    return out


def _label(code: float, values: list[Any] | None = None) -> str:
    """A category by its value (the model's training categories), else by its code."""
    if float(code).is_integer():
        if values and 0 <= int(code) < len(values):
            return str(values[int(code)])
        return str(int(code))
    return repr(code)


def _bin_labels(edges: F32) -> list[str]:
    e = [f"{v:.4g}" for v in edges.tolist()]
    if not e:
        return ["all"]
    return [f"<= {e[0]}"] + [f"({a}, {b}]" for a, b in itertools.pairwise(e)] + [f"> {e[-1]}"]


def resolve_rules(
    columns: Sequence[dict[str, Any]],
    section: dict[str, Any] | None,
    default: DriftRule,
    *,
    overrides: bool = True,
) -> list[DriftRule]:
    """Each column's DriftRule: the manifest's ``drift.features[name]``, else its
    ``drift.default``, else ``default`` (DRIFT_METHOD/DRIFT_THRESHOLD).

    An override inherits a field it leaves out; a threshold only with the method it belongs
    to (a new method without a threshold gets DEFAULT_DRIFT_THRESHOLD). ``ks`` and
    ``wasserstein`` are numeric rules: a categorical column keeps the psi rule (at PSI_MODERATE
    unless the inherited rule is psi or its own override sets a threshold). ``overrides=False`` (prediction
    columns) applies only ``drift.default``.
    """
    section = section or {}
    base = _merge(default, section.get("default"))
    per_feature = (section.get("features") or {}) if overrides else {}
    rules: list[DriftRule] = []
    categorical_base = base if base.method == "psi" else DriftRule("psi", PSI_MODERATE)
    for column in columns:
        override = per_feature.get(str(column.get("name")))
        if column.get("kind") == "categorical":
            rule = _merge(categorical_base, override)
            rules.append(rule if rule.method == "psi" else categorical_base)
        else:
            rules.append(_merge(base, override))
    return rules


def _merge(base: DriftRule, override: Any) -> DriftRule:
    if not isinstance(override, dict) or not override:
        return base
    method = override.get("method", base.method)
    if "threshold" in override:
        threshold = override["threshold"]
    else:
        threshold = base.threshold if method == base.method else DEFAULT_DRIFT_THRESHOLD
    if drift_rule_problem(method, threshold) is not None:  # refused at refresh; never here
        return base
    return DriftRule(method, float(threshold))


def assess(
    results: list[dict[str, Any]],
    rules: Sequence[DriftRule] | None = None,
    *,
    alpha: float = ALPHA,
) -> list[dict[str, Any]]:
    """Add ``p_adjusted``, ``rule``, ``drifted``, ``severity`` and quality ``flags``.

    ``rules``: one per result (:func:`resolve_rules`); None: the psi rule at PSI_MODERATE.
    With at least MIN_ROWS current rows, ``psi`` drifts when the Benjamini-Hochberg-adjusted
    p-value is below ``alpha`` and PSI >= threshold; ``ks`` when the KS statistic >= threshold;
    ``wasserstein`` when the normed Wasserstein distance >= threshold. A drifted feature is
    ``major`` when its PSI >= PSI_MAJOR, else ``moderate``.
    """
    if rules is None:
        rules = [DriftRule("psi", PSI_MODERATE)] * len(results)
    if len(rules) != len(results):
        raise ValueError(f"{len(rules)} drift rules for {len(results)} results")
    tested = [i for i, r in enumerate(results) if r.get("p_value") is not None]
    adjusted = benjamini_hochberg([results[i]["p_value"] for i in tested])
    for r in results:
        r["p_adjusted"] = None
    for i, p in zip(tested, adjusted, strict=True):
        results[i]["p_adjusted"] = p
    for r, rule in zip(results, rules, strict=True):
        value = r.get("psi")
        enough = int(r["n"]) >= MIN_ROWS
        if rule.method == "psi":
            significant = r["p_adjusted"] is not None and r["p_adjusted"] < alpha
            hit = significant and value is not None and value >= rule.threshold
        else:
            measured = r.get("ks_statistic" if rule.method == "ks" else "wasserstein_normed")
            hit = measured is not None and measured >= rule.threshold
        r["rule"] = rule.to_dict()
        r["drifted"] = bool(enough and hit)
        r["severity"] = (
            ("major" if value is not None and value >= PSI_MAJOR else "moderate")
            if r["drifted"]
            else "none"
        )
        r["flags"] = _quality_flags(r, alpha)
    return results


def _quality_flags(r: dict[str, Any], alpha: float) -> list[str]:
    flags: list[str] = []
    n, k = int(r["n"]), int(r["n_missing"])
    ref_rate = r.get("reference_missing_rate")
    if n and ref_rate is not None:
        excess = k / n - ref_rate
        if excess > MISSING_TOLERANCE and binom_excess_pvalue(k, n, max(ref_rate, 1e-3)) < alpha:
            flags.append("missing_rate")
    share = r.get("out_of_range_share")
    present = n - k
    if share is not None and share > RANGE_TOLERANCE and present:
        outside = round(share * present)
        # m reference values leave about 2 / (m + 1) of new draws outside their range
        m = int(r.get("reference_present") or 0)
        if binom_excess_pvalue(outside, present, 2.0 / (m + 1.0)) < alpha:
            flags.append("out_of_range")
    if r.get("new_categories"):
        flags.append("new_categories")
    return flags
