"""Uncertainty for every number tclab reports: intervals, paired tests, the timing noise floor.

A leaf (numpy and the standard library only). Each function says what it computes and what it
assumes. The conventions, shared by all of them:

- ``confidence`` is a fraction in (0, 1), e.g. 0.95; resampling is seeded (``seed``), so a report
  rebuilt from the same numbers carries the same intervals.
- Samples are the unit of resampling: one value per generated image (PSNR, LPIPS, 0/1 "classed
  right"), or one per timing round. Methods compared on the same seeds are compared *paired*.
- NaNs are refused (``nans="raise"``, the default) or dropped (``nans="drop"``) and counted in
  ``Interval.dropped``; they are never silently averaged away.
- A result is an :class:`Interval`; ``to_dict(name)`` gives the ``summary.json`` keys of issue #19:
  ``{name: estimate, name_ci: [low, high], name_n: n}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import numpy as np

#: Bootstrap resamples are drawn in chunks of at most this many values, to bound memory.
_CHUNK_VALUES = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its ``confidence`` interval [low, high], from ``n`` samples.

    ``method`` names how the interval was made (``"percentile bootstrap"``, ``"wilson"``, ...);
    ``dropped`` counts NaNs left out. From fewer than two samples there is no interval: low and
    high are NaN (``None`` in ``to_dict``).
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float
    method: str
    dropped: int = 0

    def contains(self, value: float) -> bool:
        """low <= value <= high (False when there is no interval)."""
        return bool(self.low <= value <= self.high)

    def to_dict(self, name: str) -> dict:
        """``{name: estimate, name_ci: [low, high], name_n: n}``, JSON-ready (NaN becomes None).

        >>> Interval(1.5, 1.0, 2.0, 24, 0.95, "wilson").to_dict("psnr")
        {'psnr': 1.5, 'psnr_ci': [1.0, 2.0], 'psnr_n': 24}
        """
        def num(x):
            return None if math.isnan(x) else float(x)
        return {name: num(self.estimate), f"{name}_ci": [num(self.low), num(self.high)], f"{name}_n": int(self.n)}


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_difference`: the mean of ``a - b`` with its interval, and a p-value.

    ``distinguishable`` is True when the interval excludes 0 *and* the p-value is below
    1 - confidence: only then may a summary name a winner. Both, because at a handful of samples the
    percentile bootstrap is too narrow while the exact sign-flip test is not (at n = 4 it cannot go
    below p = 1/8); from about 15 samples on the two agree almost always.
    """

    difference: Interval
    p_value: float
    p_method: str

    @property
    def distinguishable(self) -> bool:
        alpha = 1 - self.difference.confidence
        return not self.difference.contains(0.0) and self.p_value <= alpha + 1e-12

    def to_dict(self, name: str) -> dict:
        out = self.difference.to_dict(name)
        return {**out, f"{name}_p": float(self.p_value), f"{name}_distinguishable": self.distinguishable}


# ---- checks shared by every function ---------------------------------------------------------

def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        hint = f" (did you mean {confidence / 100:g}?)" if 1 < confidence < 100 else ""
        raise ValueError(f"confidence must be a fraction in (0, 1), e.g. 0.95; got {confidence!r}{hint}")


def _samples(values, what: str, nans: str = "raise") -> tuple[np.ndarray, int]:
    """``values`` as a 1-D float array, and how many NaNs were dropped."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{what} must be one value per sample (1-D); got shape {x.shape}")
    bad = np.isnan(x)
    if bad.any():
        if nans == "raise":
            raise ValueError(f"{what} holds {int(bad.sum())} NaN(s) of {x.size}: remove them, or pass "
                             f"nans='drop' to leave them out (the count is kept in Interval.dropped)")
        if nans != "drop":
            raise ValueError(f"nans must be 'raise' or 'drop'; got {nans!r}")
        x = x[~bad]
    if x.size == 0:
        raise ValueError(f"{what} is empty: an interval needs at least one sample")
    return x, int(bad.sum())


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _resampled(x: np.ndarray, statistic: Callable, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``statistic`` of ``resamples`` resamples of ``x`` with replacement (vectorised when it takes ``axis``)."""
    if resamples < 1:
        raise ValueError(f"resamples must be a positive integer; got {resamples!r}")
    chunk = max(1, _CHUNK_VALUES // x.size)
    out = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, resamples - start), x.size))
        try:
            out.append(np.asarray(statistic(x[idx], axis=1), dtype=float))
        except TypeError:  # a statistic without an ``axis`` argument
            out.append(np.array([statistic(row) for row in x[idx]], dtype=float))
    return np.concatenate(out)


def _percentile_interval(x, estimate, boot, confidence, method, dropped) -> Interval:
    if x.size < 2:
        return Interval(float(estimate), math.nan, math.nan, int(x.size), confidence, method, dropped)
    low, high = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(float(estimate), float(low), float(high), int(x.size), confidence, method, dropped)


# ---- intervals -------------------------------------------------------------------------------

def bootstrap_ci(values, statistic: Callable = np.mean, confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0, *, nans: str = "raise") -> Interval:
    """Percentile-bootstrap interval of ``statistic(values)``: resample the samples with replacement
    ``resamples`` times and take the central ``confidence`` share of the resampled statistics.

    Assumes the samples are independent draws (one per image / seed). For the mean of n < ~20 samples
    the percentile interval is somewhat too narrow (coverage about 90 % at n = 10 for a nominal 95 %);
    state N beside it. Use :func:`wilson_interval` for a share of successes.

    >>> bootstrap_ci([30.1, 31.4, 29.8, 30.9, 30.5]).to_dict("psnr")["psnr_n"]
    5
    """
    _check_confidence(confidence)
    x, dropped = _samples(values, "values", nans)
    boot = _resampled(x, statistic, resamples, np.random.default_rng(seed))
    return _percentile_interval(x, statistic(x), boot, confidence, "percentile bootstrap", dropped)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion ``successes / n`` (e.g. class-consistency).

    Assumes n independent trials with one success probability. Unlike the normal ("Wald") interval it
    stays inside [0, 1] and is not empty at 0 or n successes.

    >>> wilson_interval(208, 256).low > 0.75
    True
    """
    _check_confidence(confidence)
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got successes={successes!r}, n={n!r}")
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, int(n), confidence, "wilson")


def ratio_ci(numerator_samples, denominator_samples, confidence: float = 0.95, resamples: int = 2000,
             seed: int = 0, *, paired: bool = True) -> Interval:
    """Interval of a time ratio, e.g. ``t_variant / t_full`` (below 1: faster).

    ``paired=True`` (the default; tclab times interleaved rounds, ``metrics.time_interleaved``): the
    i-th numerator and denominator come from the same round, so the estimate is the median of the
    per-round ratios and rounds are resampled whole; drift between rounds (load, heat) cancels.
    ``paired=False``: the two sets are independent; the estimate is median(num) / median(den), each
    set resampled on its own. Medians, not means, because a stray slow run should not move the ratio.

    >>> ratio_ci([0.5, 0.52, 0.49], [1.0, 1.01, 0.99]).estimate
    0.5
    """
    _check_confidence(confidence)
    num, _ = _samples(numerator_samples, "numerator_samples")
    den, _ = _samples(denominator_samples, "denominator_samples")
    if (den <= 0).any() or (num < 0).any():
        raise ValueError("timings must be positive seconds (denominator > 0, numerator >= 0)")
    rng = np.random.default_rng(seed)
    if paired:
        if num.size != den.size:
            raise ValueError(f"paired timings need one numerator per denominator; got {num.size} and "
                             f"{den.size} (pass paired=False for independent sets)")
        r = num / den
        boot = _resampled(r, np.median, resamples, rng)
        return _percentile_interval(r, np.median(r), boot, confidence, "paired bootstrap of median ratio", 0)
    boot = _resampled(num, np.median, resamples, rng) / _resampled(den, np.median, resamples, rng)
    fewer = num if num.size < den.size else den  # n: the smaller set limits what is known
    return _percentile_interval(fewer, np.median(num) / np.median(den), boot, confidence,
                                "bootstrap of ratio of medians", 0)


# ---- resampling whole samples of a structured measurement -------------------------------------

def bootstrap_weights(n: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """(resamples, n) integers: how many times each of ``n`` samples is drawn in each bootstrap resample.

    Each row sums to ``n``. For a measurement with more axes than samples (a token-change record is
    ``[step, block, sample, token]``) resample the *samples* and keep the rest: a statistic that is a
    function of per-sample sums (a mean over everything, a ratio of sums, a per-step curve) of one
    resample is ``weights @ per_sample_sums``, with no copy of the data per resample. The draws are
    those of :func:`bootstrap_ci` at the same ``seed``: weighting the per-sample values of a mean
    gives exactly its resampled means.

    >>> bootstrap_weights(4, 3).sum(axis=1).tolist()
    [4, 4, 4]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be the number of samples (an integer >= 1); got {n!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be a positive integer; got {resamples!r}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_VALUES // n)  # the chunks of _resampled, so the draws are the same
    out = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))  # (r, n) drawn sample indices
        rows = np.arange(idx.shape[0])[:, None] * n
        out.append(np.bincount((idx + rows).ravel(), minlength=idx.size).reshape(idx.shape))
    return np.concatenate(out)


def percentile_interval(estimate: float, resampled, n: int, confidence: float = 0.95,
                        method: str = "percentile bootstrap") -> Interval:
    """The central ``confidence`` share of ``resampled`` statistics around ``estimate``, from ``n`` samples.

    Resamples whose statistic is NaN (undefined on that resample, e.g. a correlation of constant
    maps) are left out and counted in ``dropped``; with fewer than two samples, or fewer than two
    defined resamples, there is no interval (NaN bounds).
    """
    _check_confidence(confidence)
    r = np.asarray(resampled, dtype=float).ravel()
    bad = np.isnan(r)
    r = r[~bad]
    if n < 2 or r.size < 2:
        return Interval(float(estimate), math.nan, math.nan, int(n), confidence, method, int(bad.sum()))
    low, high = np.quantile(r, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(float(estimate), float(low), float(high), int(n), confidence, method, int(bad.sum()))


def bootstrap_over_samples(statistic: Callable[[np.ndarray], np.ndarray], n: int, confidence: float = 0.95,
                           resamples: int = 2000, seed: int = 0, *, vectorised: bool = True) -> Interval:
    """Percentile-bootstrap interval of a statistic of ``n`` samples that is not a function of one
    value per sample: resample the samples with replacement, recompute the statistic, take the
    central ``confidence`` share.

    ``statistic(weights)`` gets how many times each sample is in the data set: all ones (shape
    (n,)) for the estimate, a :func:`bootstrap_weights` row for a resample. ``vectorised=True``: it
    also takes the (resamples, n) matrix at once and returns (resamples,) values (true of
    ``weights @ per_sample_sums / weights @ per_sample_counts``); otherwise it is called once per
    resample (``np.repeat(np.arange(n), w)`` gives the drawn sample indices of a row).

    >>> x = np.array([1.0, 2.0, 6.0])
    >>> bootstrap_over_samples(lambda w: w @ x / w.sum(-1), 3).estimate
    3.0
    """
    _check_confidence(confidence)
    w = bootstrap_weights(n, resamples, seed)
    estimate = float(statistic(np.ones(n, dtype=np.int64)))
    if vectorised:
        boot = np.asarray(statistic(w), dtype=float)
        if boot.shape != (resamples,):
            raise ValueError(f"a vectorised statistic must map (resamples, n) weights to (resamples,) values; "
                             f"got shape {boot.shape} (pass vectorised=False to call it once per resample)")
    else:
        boot = np.array([statistic(row) for row in w], dtype=float)
    return percentile_interval(estimate, boot, n, confidence, "percentile bootstrap over samples")


def verdict_agreement(resampled_verdicts, verdict) -> float:
    """The share of resamples whose verdict equals ``verdict`` (the point estimate's): 1.0 = every
    resample gives the same answer. For a verdict "statistic >= threshold" at most
    ``(1 - confidence) / 2`` of the resamples disagree exactly when the ``confidence`` percentile
    interval lies on the verdict's side of the threshold.

    >>> verdict_agreement([True, True, False, True], True)
    0.75
    """
    v = np.asarray(resampled_verdicts)
    if v.size == 0:
        raise ValueError("no resampled verdicts to compare with")
    return float(np.mean(v == verdict))


# ---- paired comparison -----------------------------------------------------------------------

def paired_difference(a, b, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> PairedTest:
    """Compare two methods measured on the same samples (same seeds): ``d_i = a_i - b_i``.

    Gives the mean difference with its paired-bootstrap interval (``distinguishable`` when it
    excludes 0) and a two-sided sign-flip permutation p-value: under "no difference" each d_i is as
    likely to be +d_i as -d_i; exact (all 2^n sign patterns) while 2^n <= ``resamples`` (n <= 10 at
    the default), else ``resamples`` random ones. Assumes the pairs are independent of each other;
    works for 0/1 outcomes (classed right or not) too.

    >>> a = [31.0, 30.2, 29.9, 30.8, 30.4, 31.2, 29.5, 30.0]
    >>> paired_difference(a, [x - 0.9 for x in a]).distinguishable
    True
    """
    _check_confidence(confidence)
    a_, _ = _samples(a, "a")
    b_, _ = _samples(b, "b")
    if a_.size != b_.size:
        raise ValueError(f"a and b must hold one value per shared sample; got {a_.size} and {b_.size} values")
    d = a_ - b_
    rng = np.random.default_rng(seed)
    interval = _percentile_interval(d, d.mean(), _resampled(d, np.mean, resamples, rng), confidence,
                                    "paired bootstrap of mean difference", 0)
    observed = abs(d.mean()) - 1e-12 * max(1.0, np.abs(d).max())  # ties count as "as extreme"
    if 2 ** d.size <= resamples:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        p, how = float(np.mean(np.abs(signs @ d) / d.size >= observed)), "exact sign-flip permutation"
    else:
        signs = rng.choice([-1.0, 1.0], size=(resamples, d.size))
        hits = int(np.sum(np.abs(signs @ d) / d.size >= observed))
        p, how = (1 + hits) / (1 + resamples), f"sign-flip permutation ({resamples} flips)"
    return PairedTest(interval, min(1.0, p), how)


def paired_proportion_difference(a_hits, b_hits, confidence: float = 0.95) -> Interval:
    """Interval of p_a - p_b for two 0/1 outcomes on the same samples (e.g. classed right by the cached
    and by the full-compute image of each seed): Newcombe's hybrid score interval for paired
    proportions (Newcombe 1998, method 10), built from the Wilson intervals of both shares and their
    correlation (with its continuity correction, so agreeing samples do not make the interval vanish). Unlike a bootstrap of the per-sample differences it does not shrink to [0, 0] when no
    sample changed: with n samples that all agree it still allows a change of about a Wilson width,
    so "no drop" needs enough samples to be claimed.

    >>> iv = paired_proportion_difference([1] * 6, [1] * 6)
    >>> round(iv.low, 2), iv.high
    (-0.39, 0.39)
    """
    _check_confidence(confidence)
    a, _ = _samples(a_hits, "a_hits")
    b, _ = _samples(b_hits, "b_hits")
    if a.size != b.size:
        raise ValueError(f"a_hits and b_hits must hold one 0/1 outcome per shared sample; got {a.size} and {b.size}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("a_hits and b_hits must be 0/1 outcomes (1 = success)")
    n = int(a.size)
    both, only_a = int(np.sum((a == 1) & (b == 1))), int(np.sum((a == 1) & (b == 0)))
    only_b, neither = int(np.sum((a == 0) & (b == 1))), int(np.sum((a == 0) & (b == 0)))
    wa, wb = wilson_interval(both + only_a, n, confidence), wilson_interval(both + only_b, n, confidence)
    pa, pb = wa.estimate, wb.estimate
    den = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    # the correlation of the two outcomes, with Newcombe's correction ad - bc - n/2 (floored at 0) where it is
    # positive: uncorrected, samples that all agree (no discordant pair) give phi = 1 and an interval of width 0
    cross = both * neither - only_a * only_b
    if cross > 0:
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(den) if den > 0 else 0.0
    d = pa - pb
    lower = math.sqrt(max(0.0, (pa - wa.low) ** 2 - 2 * phi * (pa - wa.low) * (wb.high - pb) + (wb.high - pb) ** 2))
    upper = math.sqrt(max(0.0, (wa.high - pa) ** 2 - 2 * phi * (wa.high - pa) * (pb - wb.low) + (pb - wb.low) ** 2))
    return Interval(d, max(-1.0, d - lower), min(1.0, d + upper), n, confidence, "Newcombe paired score (method 10)")


def is_tie(a, b, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> bool:
    """True when a and b (paired, same samples) cannot be told apart (see ``PairedTest.distinguishable``)."""
    return not paired_difference(a, b, confidence, resamples, seed).distinguishable


# ---- timing noise floor ----------------------------------------------------------------------

def noise_floor(full_vs_full_ratios, confidence: float = 0.95) -> Interval:
    """The spread of time ratios that measuring full compute against itself produces.

    Each ratio is one full-compute timing over another, run alongside the real comparison. The true
    value is 1 and neither side is "first", so the floor is symmetric on a log scale:
    [1/f, f] with f = the ``confidence`` quantile of max(r, 1/r). ``estimate`` is the median ratio
    (away from 1 points at an order effect such as warm-up). Compare like with like: if reported
    ratios are medians over k rounds, pass full-vs-full medians over k rounds (single rounds give a
    wider, more cautious floor). From up to 1 / (1 - confidence) ratios (20 at 0.95) it is their widest.

    >>> noise_floor([1.0, 1.1, 0.95]).contains(1.08)
    True
    """
    _check_confidence(confidence)
    r, _ = _samples(full_vs_full_ratios, "full_vs_full_ratios")
    if (r <= 0).any():
        raise ValueError("full-vs-full ratios must be positive")
    f = float(np.quantile(np.maximum(r, 1 / r), confidence, method="higher"))  # never below a measured ratio
    return Interval(float(np.median(r)), 1 / f, f, int(r.size), confidence, "full-vs-full noise floor")


def within_noise(ratio: float, floor: Interval) -> bool:
    """True when ``ratio`` lies inside the noise floor: flag it, do not report it as a speed-up or slow-down."""
    return floor.contains(float(ratio))


# ---- how many samples ------------------------------------------------------------------------

def samples_needed(per_sample_differences_or_std, difference: float, confidence: float = 0.95,
                   power: float = 0.8) -> int:
    """Paired samples needed to resolve a mean difference of ``difference`` (two-sided test).

    Normal approximation: n = ((z_{1-alpha/2} + z_power) * sd / difference)^2, with sd the standard
    deviation of the per-sample differences (pass the differences of a pilot run, or sd itself). It
    assumes sd is known, so it runs a little low below ~30 samples. For two independent groups pass
    sqrt(2) * the per-group sd; the answer is then per group. Half the difference: about 4x the samples.

    >>> samples_needed(1.0, 0.5)
    32
    """
    _check_confidence(confidence)
    if not 0 < power < 1:
        raise ValueError(f"power must be a fraction in (0, 1), e.g. 0.8; got {power!r}")
    if not difference or not math.isfinite(difference):
        raise ValueError(f"difference must be a finite non-zero effect size; got {difference!r}")
    given = np.asarray(per_sample_differences_or_std, dtype=float)
    if given.ndim == 0:
        sd = float(given)
    else:
        d, _ = _samples(given, "per_sample_differences")
        if d.size < 2:
            raise ValueError("need at least two per-sample differences to estimate their spread")
        sd = float(d.std(ddof=1))
    if not sd >= 0 or not math.isfinite(sd):
        raise ValueError(f"the standard deviation must be finite and >= 0; got {sd!r}")
    n = ((_z(confidence) + NormalDist().inv_cdf(power)) * sd / abs(difference)) ** 2
    return max(2, math.ceil(n - 1e-9))
