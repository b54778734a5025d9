"""Paired comparisons of two runs scored on the same items (problems, evaluation windows).

Both arms are scored on the same items, so item difficulty cancels: the uncertainty of a difference
is that of the per-item differences, far smaller than two independent intervals would suggest.

* :func:`paired_bootstrap_mean_diff`: nonparametric bootstrap over items (Efron & Tibshirani 1993,
  *An Introduction to the Bootstrap*, ch. 13 percentile intervals; its use for paired system
  comparisons: Koehn 2004, "Statistical significance tests for machine translation evaluation").
  Every resample draws ``n`` item indices with replacement; the statistic is recomputed on it for both
  arms with the same indices; the 95% interval is the 2.5th and 97.5th percentiles of the resampled
  statistic.
* :func:`paired_bootstrap_ppl`: the same resampling of windows for a ratio-of-sums statistic,
  perplexity ``exp(sum nll / sum tokens)`` recomputed for both arms on each resample; reports the
  difference and the ratio of the two perplexities.
* :func:`bootstrap_value`: one run's mean or perplexity with the same percentile interval over its items
  (used to say whether a published number lies inside a run's own uncertainty).
* :func:`mcnemar_exact`: exact (conditional binomial) McNemar test for paired binary outcomes
  (McNemar 1947; exact form: Fagerland, Lydersen & Laake 2013, BMC Med. Res. Methodol. 13:91):
  ``b`` = items passed by A only, ``c`` = by B only; under H0 ``b ~ Binomial(b + c, 1/2)``;
  two-sided ``p = min(1, 2 * P(X <= min(b, c)))``, and ``p = 1`` when ``b + c = 0``.

Everything is deterministic for a given seed (``numpy.random.default_rng(seed)``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
_CHUNK_CELLS = 1 << 21  # indices drawn per chunk (16 MiB of int64): bounds memory for many items


@dataclass(frozen=True)
class BootstrapCI:
    """A statistic of the paired items and its bootstrap percentile interval.

    Attributes:
        observed: the statistic on the items as they are (e.g. mean(B) - mean(A)).
        low / high: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the
            statistic over the resamples (numpy's default linear interpolation).
        n_items: items paired.
        n_resamples: bootstrap resamples.
        confidence: nominal coverage of ``[low, high]``.
        seed: seed of the resampling.
    """

    observed: float
    low: float
    high: float
    n_items: int
    n_resamples: int
    confidence: float
    seed: int

    def contains(self, value: float) -> bool:
        """True when ``low <= value <= high`` (e.g. a difference of 0: within noise)."""
        return self.low <= value <= self.high


@dataclass(frozen=True)
class PplComparison:
    """Perplexities of two arms on the same windows (A = baseline, B = the other run).

    Attributes:
        ppl_a / ppl_b: ``exp(sum nll / sum tokens)`` of each arm over the paired windows.
        diff: ``ppl_b - ppl_a`` with its interval.
        ratio: ``ppl_b / ppl_a`` with its interval (same resamples).
    """

    ppl_a: float
    ppl_b: float
    diff: BootstrapCI
    ratio: BootstrapCI


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of paired binary outcomes.

    Attributes:
        b: items passed by A only.
        c: items passed by B only.
        p_value: two-sided exact p (see the module docstring).
    """

    b: int
    c: int
    p_value: float


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    return arr


def _check_pair(a: np.ndarray, b: np.ndarray, n_resamples: int, confidence: float) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired arms must have the same items: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("no paired items")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def resample_indices(n_items: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``range(n_items)`` (with replacement), in chunks of shape (k, n_items).

    The chunk size depends on ``n_items`` only, so a given (n_items, n_resamples, seed) always yields
    the same resamples.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n_items, 1))
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n_items, size=(min(chunk, n_resamples - start), n_items))


def _interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def paired_bootstrap_mean_diff(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_resamples: int = N_RESAMPLES,
    seed: int = 0, confidence: float = CONFIDENCE,
) -> BootstrapCI:
    """Difference of means ``mean(b) - mean(a)`` over paired items, with a paired bootstrap interval.

    Args:
        a: per-item values of arm A (the baseline), e.g. per-problem pass@1 estimates ``c/n``.
        b: the same items' values in arm B, in the same order.
        n_resamples: bootstrap resamples.
        seed: seed of ``numpy.random.default_rng``.
        confidence: nominal coverage of the percentile interval.

    Returns:
        :class:`BootstrapCI` of the difference; identical arms give exactly ``[0, 0]``.

    Raises:
        ValueError: the arms differ in length, are empty, or the settings are out of range.
    """
    a_arr, b_arr = _as_1d(a, "a"), _as_1d(b, "b")
    _check_pair(a_arr, b_arr, n_resamples, confidence)
    d = b_arr - a_arr
    stats = np.concatenate([d[idx].mean(axis=1) for idx in resample_indices(d.shape[0], n_resamples, seed)])
    low, high = _interval(stats, confidence)
    return BootstrapCI(float(d.mean()), low, high, int(d.shape[0]), n_resamples, confidence, seed)


def _ppl(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # a broken model's perplexity overflows to inf, as the metric does
        return np.exp(nll / tokens)


def paired_bootstrap_ppl(
    nll_a: Sequence[float] | np.ndarray, tokens_a: Sequence[float] | np.ndarray,
    nll_b: Sequence[float] | np.ndarray, tokens_b: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE,
) -> PplComparison:
    """Perplexity difference and ratio of two arms over paired windows, with paired bootstrap intervals.

    Perplexity is a ratio of sums, ``exp(sum_w nll_w / sum_w n_w)``, not a mean of per-window values,
    so each resample of window indices recomputes both sums for both arms before taking ``exp``.

    Args:
        nll_a / tokens_a: per-window summed NLL and scored-token counts of arm A (the baseline).
        nll_b / tokens_b: the same windows in arm B, same order.
        n_resamples / seed / confidence: as in :func:`paired_bootstrap_mean_diff`.

    Returns:
        :class:`PplComparison`; identical arms give a difference of exactly ``[0, 0]`` and a ratio
        of exactly ``[1, 1]``.

    Raises:
        ValueError: the arms differ in length, are empty, count no token, or the settings are out of range.
    """
    named = {"nll_a": nll_a, "tokens_a": tokens_a, "nll_b": nll_b, "tokens_b": tokens_b}
    na, ta, nb, tb = (_as_1d(x, name) for name, x in named.items())
    for x in (ta, nb, tb):
        _check_pair(na, x, n_resamples, confidence)
    if ta.sum() <= 0 or tb.sum() <= 0:
        raise ValueError("no scored tokens")
    ppl_a, ppl_b = float(_ppl(na.sum(), ta.sum())), float(_ppl(nb.sum(), tb.sum()))
    diffs, ratios = [], []
    for idx in resample_indices(na.shape[0], n_resamples, seed):
        ra = _ppl(na[idx].sum(axis=1), ta[idx].sum(axis=1))
        rb = _ppl(nb[idx].sum(axis=1), tb[idx].sum(axis=1))
        diffs.append(rb - ra)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append(rb / ra)
    common = (int(na.shape[0]), n_resamples, confidence, seed)
    d_lo, d_hi = _interval(np.concatenate(diffs), confidence)
    r_lo, r_hi = _interval(np.concatenate(ratios), confidence)
    ratio = ppl_b / ppl_a if math.isfinite(ppl_a) else math.nan
    return PplComparison(
        ppl_a, ppl_b,
        BootstrapCI(ppl_b - ppl_a, d_lo, d_hi, *common), BootstrapCI(ratio, r_lo, r_hi, *common),
    )


def bootstrap_value(items: Sequence, n_resamples: int = N_RESAMPLES, seed: int = 0,
                    confidence: float = CONFIDENCE) -> BootstrapCI:
    """One run's metric with a bootstrap interval over its items: the mean of numeric items (pass@1 per
    problem), or the perplexity ``exp(sum nll / sum tokens)`` of ``[nll, tokens]`` window items.

    Raises:
        ValueError: no items, or the settings are out of range.
    """
    if len(items) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in items):
        nll, tok = _as_1d([x[0] for x in items], "nll"), _as_1d([x[1] for x in items], "tokens")
        _check_pair(nll, tok, n_resamples, confidence)
        stats = np.concatenate([_ppl(nll[i].sum(axis=1), tok[i].sum(axis=1))
                                for i in resample_indices(nll.shape[0], n_resamples, seed)])
        value = float(_ppl(nll.sum(), tok.sum()))
    else:
        v = _as_1d(items, "items")
        _check_pair(v, v, n_resamples, confidence)
        stats = np.concatenate([v[i].mean(axis=1) for i in resample_indices(v.shape[0], n_resamples, seed)])
        value = float(v.mean())
    low, high = _interval(stats, confidence)
    return BootstrapCI(value, low, high, len(items), n_resamples, confidence, seed)


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    """True when every value is 0 or 1 (pass/fail outcomes, e.g. pass@1 of one greedy sample)."""
    arr = np.asarray(values, dtype=np.float64)
    return bool(np.isin(arr, (0.0, 1.0)).all())


def binom_half_cdf_exact(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)`` in exact rational arithmetic:
    ``sum_{i<=k} C(n, i) / 2^n``."""
    if k < 0:
        return 0.0
    return float(Fraction(sum(math.comb(n, i) for i in range(min(k, n) + 1)), 2**n))


def _binom_half_cdf(k: int, n: int) -> float:
    try:
        from scipy.stats import binom
    except ImportError:  # scipy comes with scikit-learn; exact integer arithmetic otherwise
        return binom_half_cdf_exact(k, n)
    return float(binom.cdf(k, n, 0.5))


def mcnemar_exact(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> McNemar:
    """Exact two-sided McNemar test of paired binary outcomes (see the module docstring).

    Args:
        a: per-item outcomes of arm A, each 0 or 1.
        b: the same items' outcomes in arm B.

    Returns:
        :class:`McNemar` with the discordant counts and ``p = min(1, 2 * P(X <= min(b, c)))``,
        ``X ~ Binomial(b + c, 1/2)``; ``p = 1`` when there is no discordant item.

    Raises:
        ValueError: the arms differ in length or a value is not 0/1.
    """
    a_arr, b_arr = _as_1d(a, "a"), _as_1d(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired arms must have the same items: {a_arr.shape[0]} vs {b_arr.shape[0]}")
    if not (is_binary(a_arr) and is_binary(b_arr)):
        raise ValueError("McNemar's test needs binary (0/1) outcomes")
    only_a = int(np.sum((a_arr == 1) & (b_arr == 0)))
    only_b = int(np.sum((a_arr == 0) & (b_arr == 1)))
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_half_cdf(min(only_a, only_b), n))
    return McNemar(only_a, only_b, p)
