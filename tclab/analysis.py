"""Token redundancy analysis: test TokenCache's three observations on a recorded trajectory.

TokenCache (Lou et al., arXiv 2409.18523) rests on three observations about how the tokens of a
DiT change between adjacent denoising steps (``shared/docs/tokencache.md`` section 1). This module
*tests* them on any :class:`tclab.record.TokenChangeRecord` instead of assuming them:

1. **few tokens change a lot** (:func:`check_few_tokens_change_a_lot`): many tokens change little
   between adjacent steps while a minority change a lot -> the share of the total change carried
   by the top 10% / 20% of tokens and the Gini coefficient, per (step, block, sample);
2. **which tokens change is predictable** (:func:`check_adjacent_steps_correlated`): the Spearman
   rank correlation of a block's per-token change map at step ``s`` and at step ``s + d`` is high for
   ``d = 1`` and decays with ``d`` (so the last step predicts the next one, not just "the shape
   tokens always move");
3. **change is uneven over the trajectory** (:func:`check_uneven_over_trajectory`): the per-step mean
   change has two phases; :func:`detect_phase_split` finds them with a two-segment fit and the split
   becomes a suggestion for the ``tprr(K1, K2, split)`` schedule (spec section 3, "When").

:func:`summarise_redundancy` runs everything and returns the JSON-ready ``summary`` dict a notebook
writes with ``run.write_summary``. All functions are pure (numpy / scipy / pandas): they read the
record and never change it.

Conventions (as in :mod:`tclab.record`): arrays are ``[step, block, sample, token]``; ``step`` is the
0-based step index (0 = first, noisiest step) and ``t`` the scheduler's timestep value; the two are
never used for one another. Change measures are NaN at step 0 (there is no previous step), so every
statistic here uses the steps ``s > 0`` that hold values. Only one CFG branch is analysed at a time
(``branch='cond'`` by default): the conditional and unconditional halves are never averaged.
Thresholds such as "below 5%" are on the *relative* change ``||dx|| / ||x||`` (0.05 = 5%).

**Uncertainty** (issue #19). Every measure behind a verdict carries a percentile-bootstrap interval
over the record's **samples** (the images / seeds, the sample axis of the ``cond`` branch): the
samples are drawn with replacement and the statistic is recomputed, steps, blocks and tokens kept
whole (:class:`BootstrapConfig`; seeded, so a summary rebuilt from the same record is the same).
Keys follow :meth:`tclab.stats.Interval.to_dict`: ``<name>``, ``<name>_ci`` = [low, high],
``<name>_n`` = samples. Each observation's verdict is recomputed on every resample: ``agreement``
is the share that agree with the point verdict, and the verdict is ``stable`` when at least
``(1 + confidence) / 2`` (97.5 %) agree -- for a one-threshold verdict exactly when the 95 %
interval lies on one side of the threshold. An unstable verdict is reported as "within noise"
(``outcome``, one of :data:`tclab.report.VERDICTS`), not as holds or does not hold. Observation 3 is
also fitted without the final step (``without_final_step``) and with each single step left out:
a verdict that one step decides names it (``driven_by_steps``, ``driven_by_final_step``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .report import NOT_MEASURED, WITHIN_NOISE, Finding, ReportSummary, key_numbers_from, verdict_of
from .stats import Interval, bootstrap_weights, percentile_interval, verdict_agreement

if TYPE_CHECKING:  # only for annotations: importing this module needs numpy, not torch
    from .record import TokenChangeRecord

#: "Changed little" thresholds on the relative change ||dx|| / ||x|| (1%, 5%, 10%).
THRESHOLDS = (0.01, 0.05, 0.10)
#: Quantiles of the per-token change reported in the distribution.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
#: Shares of tokens whose part of the total change observation 1 reports (top 10%, top 20%).
TOP_FRACTIONS = (0.1, 0.2)
#: The two change measures of the record (the other two, update_ratio and cos, are not "change").
CHANGE_MEASURES = ("out_change", "update_change")

OBSERVATION_NAMES = {
    "few_tokens_change_a_lot": "1. many tokens change little, a minority change a lot",
    "adjacent_steps_correlated": "2. which tokens change is correlated between adjacent steps",
    "uneven_over_trajectory": "3. the amount of change is uneven over the trajectory (two phases)",
}


# ---- uncertainty: the bootstrap over samples ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    """How each redundancy measure gets its interval, and when a verdict counts as stable.

    The unit of resampling is the **sample** (one generated image or traced in-house image: a row of
    the analysed branch). Each of ``resamples`` resamples draws as many samples as the record holds,
    with replacement, and recomputes the statistic on them; steps, blocks and tokens stay whole
    (they are the structure being measured, and the tokens of one image are not independent draws).

    - ``resamples``: 2000 (the default of :mod:`tclab.stats`). Every statistic here is a function
      of per-sample sums, so a resample costs a (resamples x samples) matrix product: the whole
      summary of notebook 01's smoke run takes well under a second more than without intervals.
    - ``confidence``: 0.95, the intervals' level.
    - ``seed``: every measure of a record is resampled with the same draws, so joint verdicts
      (observation 2's "high and decays") are decided on the same resampled samples.

    A verdict is **stable** when at least :attr:`min_agreement` = ``(1 + confidence) / 2`` (97.5 %)
    of the resamples give the point estimate's verdict. For a verdict "statistic >= threshold" that
    is when the ``confidence`` interval lies wholly on one side of the threshold, so a printed
    interval that straddles the criterion never sits beside a stable verdict (95 % agreement
    would allow that: it is the 90 % interval's rule).
    """

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(f"resamples must be a positive integer, e.g. 2000; got {self.resamples!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be a fraction in (0, 1), e.g. 0.95; got {self.confidence!r}")

    @property
    def min_agreement(self) -> float:
        return (1 + self.confidence) / 2

    def weights(self, num_samples: int) -> np.ndarray:
        """(resamples, samples) how often each sample is drawn per resample (:func:`tclab.stats.bootstrap_weights`)."""
        return bootstrap_weights(num_samples, self.resamples, self.seed)

    def interval(self, estimate: float, resampled, num_samples: int) -> Interval:
        return percentile_interval(estimate, resampled, num_samples, self.confidence,
                                   "percentile bootstrap over samples")


def _sample_totals(values: np.ndarray, sample_axis: int = 2, keep_axis: int | None = None):
    """Per-sample sums and counts of the non-NaN entries of ``values``, over every axis but
    ``sample_axis`` (and ``keep_axis``, kept as the second axis): (B,) or (B, K) each. The mean of
    any set of samples is then ``w @ sums / w @ counts`` (``w``: how often each sample is in it)."""
    a = np.asarray(values, dtype=np.float64)
    axes = [sample_axis] + ([keep_axis] if keep_axis is not None else [])
    a = np.moveaxis(a, axes, list(range(len(axes))))
    a = a.reshape(a.shape[: len(axes)] + (-1,))
    ok = ~np.isnan(a)
    return np.where(ok, a, 0.0).sum(axis=-1), ok.sum(axis=-1).astype(np.float64)


def _weighted_mean(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The mean of the samples weighted by ``weights`` ((R, B) or (B,)), from :func:`_sample_totals`."""
    num, den = weights @ sums, weights @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _stability(holds: bool | None, resampled_holds, num_samples: int, boot: BootstrapConfig) -> dict:
    """``agreement`` (share of resamples with the point verdict), ``stable`` and the report ``outcome``.

    Undetermined (``holds`` None): not measured. One sample: there is nothing to resample, so no
    stability (``stable`` None) and the point verdict stands, said so in the sentence.
    """
    out = {"samples": int(num_samples), "resamples": boot.resamples, "confidence": boot.confidence,
           "min_agreement": boot.min_agreement, "agreement": None, "stable": None}
    if holds is None:
        return {**out, "outcome": NOT_MEASURED}
    if num_samples < 2:
        return {**out, "outcome": verdict_of(holds)}
    agreement = verdict_agreement(resampled_holds, holds)
    stable = bool(agreement >= boot.min_agreement - 1e-12)
    return {**out, "agreement": agreement, "stable": stable, "outcome": verdict_of(holds) if stable else WITHIN_NOISE}


def _verdict_word(holds: bool, stability: Mapping) -> str:
    """The opening word of a verdict sentence: HOLDS, DOES NOT HOLD or WITHIN NOISE (with the point verdict)."""
    point = "HOLDS" if holds else "DOES NOT HOLD"
    if stability.get("stable") is False:
        return f"WITHIN NOISE (point estimate: {point.lower()})"
    return point


def _stability_text(stability: Mapping) -> str:
    """How the bootstrap judged the verdict, in words (for the verdict sentences and findings)."""
    n, agree = stability.get("samples"), stability.get("agreement")
    if agree is None:
        return (f"{n} sample: no interval, stability not tested" if n is not None and n < 2 else "")
    share = f"{agree:.0%} of {stability.get('resamples')} bootstrap resamples of the {n} samples agree"
    if stability.get("stable"):
        return f"stable: {share}"
    return f"not stable: {share} (stable needs {stability.get('min_agreement', 0.975):.1%})"


def _with_ci(value, ci, fmt: str = ".2f", suffix: str = "") -> str:
    """``value`` formatted, then its interval: ``15.2% [14.1, 16.3]``, ``3.24x [3.01, 3.52]``, ``0.62 [0.55, 0.68]``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = format(value, fmt) + suffix
    if not ci or len(ci) != 2 or any(v is None or not math.isfinite(v) for v in ci):
        return text
    if fmt.endswith("%"):  # the value carries the %, its interval the same digits without it
        lo, hi = (format(100 * v, fmt[:-1] + "f") for v in ci)
    else:
        lo, hi = (format(v, fmt) for v in ci)
    return f"{text} [{lo}, {hi}]"


# ---- small helpers -----------------------------------------------------------------------------

def pct_label(fraction: float) -> str:
    """0.05 -> '5pct', 0.125 -> '12.5pct': the suffix used in summary keys."""
    return f"{fraction * 100:g}pct"


def select_change_steps(record: TokenChangeRecord, measure: str = "out_change",
                        branch: str = "cond") -> tuple[np.ndarray, np.ndarray]:
    """Which steps carry values of ``measure``, and those values.

    Returns ``(values, steps)``: ``values`` is (S', L, B, N) float64 for the S' steps with at least
    one non-NaN value (for the change measures: every step but 0), ``steps`` the (S',) step indices.
    Raises if no step has values (e.g. a one-step record): nothing can be said about change then.
    """
    a = record.select(measure, branch).astype(np.float64)  # (S, L, B, N)
    has = ~np.isnan(a).all(axis=(1, 2, 3))
    if not has.any():
        raise ValueError(f"the record holds no {measure!r} values for branch {branch!r} (it has {record.num_steps} "
                         "step(s); change needs at least 2 steps): sample with more steps")
    return a[has], record.steps[has]


def timestep_of(record: TokenChangeRecord, step: int | None) -> float | None:
    """The timestep value ``t`` of step index ``step`` (None if unknown)."""
    if step is None or not 0 <= step < record.num_steps:
        return None
    t = float(record.timesteps[step])
    return None if math.isnan(t) else t


def to_plain(obj):
    """Numpy scalars/arrays -> Python numbers/lists, NaN/inf -> None, tuples -> lists (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _nanmean(a, axis=None):
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.sum(~np.isnan(a), axis=axis)
        s = np.nansum(a, axis=axis)
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


# ---- experiment design (which samples, which images) -------------------------------------------

def choose_sample_labels(num_samples: int, num_classes: int, classes: Sequence[int] | None = None) -> list[int]:
    """Class labels for ``num_samples`` samples: cycle through ``classes`` (None = all classes).

    0, 1, ..., C-1, 0, 1, ... gives every class an equal share, so per-class effects do not tilt the
    averages. Raises if a class is out of range.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not classes:
        raise ValueError("classes is empty; give class indices or None for all classes")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class index(es) {bad} out of range: the model has classes 0..{num_classes - 1}")
    return [classes[i % len(classes)] for i in range(num_samples)]


def choose_balanced_images(image_set, count: int):
    """A class-balanced subset of ``count`` images of a :class:`tclab.data.ImageSet` (round robin over
    classes, file order within a class), as a new ImageSet whose ``manifest_hash()`` names exactly
    the images used. ``count`` larger than the set keeps every image."""
    if count < 1:
        raise ValueError(f"the number of images must be >= 1, got {count}")
    labels = image_set.labels.tolist()
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    order: list[int] = []
    queues = [list(g) for _, g in sorted(groups.items())]
    while len(order) < min(count, len(labels)):
        for q in queues:
            if q and len(order) < count:
                order.append(q.pop(0))
    return dataclasses.replace(image_set, images=image_set.images[order], labels=image_set.labels[order],
                               records=[image_set.records[i] for i in order])


# ---- the distribution of change ----------------------------------------------------------------

def summarise_change_distribution(record: TokenChangeRecord, measure: str = "out_change",
                                  thresholds: Sequence[float] = THRESHOLDS, quantiles: Sequence[float] = QUANTILES,
                                  branch: str = "cond", bootstrap: BootstrapConfig | None = None) -> dict:
    """How much do tokens change between adjacent steps? Fractions below thresholds, quantiles.

    Over every (step > 0, block, sample, token) entry of ``measure``: the fraction of entries below
    each threshold (e.g. ``below_5pct`` = share of token updates that moved less than 5% of the
    token's norm: candidates for reuse), the same per step (a fraction below a threshold that grows
    or shrinks over the trajectory hints at phases), quantiles, mean and median.

    Returns a dict: ``measure``, ``entries``, ``fraction_below`` {label: float} with
    ``fraction_below_ci`` {label: [low, high]} (bootstrap over samples, ``samples`` of them),
    ``quantiles`` {'q50': float, ...}, ``mean``, ``median``, ``per_step`` {'step': [...], 't': [...],
    'mean': [...], 'below_5pct': [...], ...} (steps with values only).
    """
    boot = bootstrap or BootstrapConfig()
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    ok = ~np.isnan(vals)
    flat = vals[ok]
    per_step_n = ok.sum(axis=(1, 2, 3))  # (S',)
    num_samples = vals.shape[2]
    weights = boot.weights(num_samples)  # (R, B)
    out = {"measure": measure, "branch": branch, "entries": int(flat.size), "thresholds": list(thresholds),
           "samples": num_samples, "fraction_below": {}, "fraction_below_ci": {}, "quantiles": {},
           "mean": float(flat.mean()), "median": float(np.median(flat)),
           "per_step": {"step": steps.tolist(), "t": [timestep_of(record, int(s)) for s in steps],
                        "mean": _nanmean(vals, axis=(1, 2, 3)).tolist()}}
    for th in thresholds:
        key = f"below_{pct_label(th)}"
        out["fraction_below"][key] = float((flat < th).mean())
        below = np.where(ok, vals < th, np.nan)  # (S', L, B, N) 1 / 0 per entry, NaN where no value
        sums, counts = _sample_totals(below)
        ci = boot.interval(out["fraction_below"][key], _weighted_mean(weights, sums, counts), num_samples)
        out["fraction_below_ci"][key] = [ci.low, ci.high]
        out["per_step"][key] = ((vals < th).sum(axis=(1, 2, 3)) / np.maximum(per_step_n, 1)).tolist()
    for q, v in zip(quantiles, np.quantile(flat, list(quantiles))):
        out["quantiles"][f"q{q * 100:g}"] = float(v)
    return out


# ---- observation 1: concentration ----------------------------------------------------------------

def _concentration_maps(vals: np.ndarray, top_fractions: Sequence[float]) -> tuple[dict, np.ndarray, int]:
    """Top-q shares {label: (S', L, B)} and Gini (S', L, B) of each token change map of ``vals``
    (S', L, B, N); NaN for a map with a NaN or a zero sum. Also how many maps were valid."""
    n = vals.shape[-1]
    desc = -np.sort(-vals, axis=-1)  # (S', L, B, N) largest first; NaN sorts last
    total = desc.sum(axis=-1)  # (S', L, B); NaN if any token is NaN
    valid = np.isfinite(total) & (total > 0)
    total = np.where(valid, total, np.nan)
    csum = np.cumsum(desc, axis=-1)
    shares = {pct_label(q): csum[..., max(1, math.ceil(q * n)) - 1] / total for q in top_fractions}  # (S', L, B)
    asc = desc[..., ::-1]  # ascending
    i = np.arange(1, n + 1, dtype=np.float64)
    gini = (np.sum((2 * i - n - 1) * asc, axis=-1)) / (n * total)  # (S', L, B)
    return shares, gini, int(valid.sum())


def measure_change_concentration(record: TokenChangeRecord, measure: str = "out_change",
                                 top_fractions: Sequence[float] = TOP_FRACTIONS, branch: str = "cond") -> dict:
    """Is the change carried by a few tokens? Top-k shares and Gini of each token change map.

    For every (step > 0, block, sample) the N per-token values are sorted; the *top-q share* is the
    part of their sum carried by the ``ceil(q * N)`` largest (uniform change gives exactly q; one
    token carrying everything gives 1), and the *Gini coefficient* is 0 for equal change and
    (N - 1) / N when one token carries it all. Maps with a NaN or a zero sum are skipped.

    Returns ``top_share`` {'10pct': mean share, ...}, ``gini`` (means over all maps),
    ``top_share_by_step`` / ``gini_by_step`` (per step > 0, lists), ``top_share_by_block`` /
    ``gini_by_block`` (per block), ``maps`` (how many maps were used) and ``uniform_share``
    {'10pct': 0.1, ...} (what equal change would give, for comparison).
    """
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    return _concentration_summary(vals, steps, measure, branch, top_fractions)


def _concentration_summary(vals: np.ndarray, steps: np.ndarray, measure: str, branch: str,
                           top_fractions: Sequence[float], maps_of: tuple | None = None) -> dict:
    """:func:`measure_change_concentration`'s dict; ``maps_of``: :func:`_concentration_maps` of ``vals`` if known."""
    n = vals.shape[-1]
    shares, gini, maps = _concentration_maps(vals, top_fractions) if maps_of is None else maps_of
    out = {"measure": measure, "branch": branch, "steps": steps.tolist(), "maps": maps,
           "tokens_per_map": n, "top_share": {}, "top_share_by_step": {}, "top_share_by_block": {},
           "uniform_share": {}}
    for q in top_fractions:
        key = pct_label(q)
        out["top_share"][key] = float(_nanmean(shares[key]))
        out["top_share_by_step"][key] = _nanmean(shares[key], axis=(1, 2)).tolist()
        out["top_share_by_block"][key] = _nanmean(shares[key], axis=(0, 2)).tolist()
        out["uniform_share"][key] = max(1, math.ceil(q * n)) / n
    out["gini"] = float(_nanmean(gini))
    out["gini_by_step"] = _nanmean(gini, axis=(1, 2)).tolist()
    out["gini_by_block"] = _nanmean(gini, axis=(0, 2)).tolist()
    return out


def check_few_tokens_change_a_lot(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                                  min_top10_share: float = 0.25, bootstrap: BootstrapConfig | None = None) -> dict:
    """Observation 1: do many tokens change little while a minority change a lot?

    Verdict: holds when the top 10% of tokens of a (step, block, sample) map carry on average at
    least ``min_top10_share`` of its total change (default 0.25, 2.5x the 0.10 of equal change; an
    exponential spread of change gives 0.33, a uniform spread on [0, max] gives 0.19). The Gini
    coefficient and the fractions below 1/5/10% are reported beside it. Every number carries its
    interval over samples (``top10pct_share_ci``, ...); the verdict is recomputed on each resample
    (``agreement``, ``stable``; ``outcome`` is "within noise" when it is not stable).
    """
    boot = bootstrap or BootstrapConfig()
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    maps_of = _concentration_maps(vals, TOP_FRACTIONS)
    shares, gini_maps, _ = maps_of
    conc = _concentration_summary(vals, steps, measure, branch, TOP_FRACTIONS, maps_of)
    dist = summarise_change_distribution(record, measure, THRESHOLDS, QUANTILES, branch, boot)
    top10, top20, gini = conc["top_share"]["10pct"], conc["top_share"]["20pct"], conc["gini"]
    holds = bool(np.isfinite(top10) and top10 >= min_top10_share)

    num_samples = vals.shape[2]
    weights = boot.weights(num_samples)  # (R, B)
    resampled = {k: _weighted_mean(weights, *_sample_totals(a)) for k, a in
                 (("top10pct_share", shares["10pct"]), ("top20pct_share", shares["20pct"]), ("gini", gini_maps))}
    intervals = {}
    for name, est in (("top10pct_share", top10), ("top20pct_share", top20), ("gini", gini)):
        intervals.update(boot.interval(est, resampled[name], num_samples).to_dict(name))
    with np.errstate(invalid="ignore"):
        stability = _stability(holds, resampled["top10pct_share"] >= min_top10_share, num_samples, boot)

    below5 = dist["fraction_below"]["below_5pct"]
    stab = _stability_text(stability)
    verdict = (f"{_verdict_word(holds, stability)} for {measure}: the top 10% of tokens carry "
               f"{_with_ci(top10, intervals['top10pct_share_ci'], '.1%')} of the change (equal change: 10%; criterion "
               f">= {min_top10_share:.0%}), the top 20% carry {_with_ci(top20, intervals['top20pct_share_ci'], '.1%')}, "
               f"Gini {_with_ci(gini, intervals['gini_ci'])}; "
               f"{_with_ci(below5, dist['fraction_below_ci']['below_5pct'], '.1%')} of token updates move < 5%"
               + (f"; {stab}." if stab else "."))
    return {"observation": OBSERVATION_NAMES["few_tokens_change_a_lot"], "measure": measure, "holds": holds,
            "verdict": verdict, "criterion": {"min_top10_share": min_top10_share},
            "top10pct_share": top10, "top20pct_share": top20, "gini": gini, **intervals, **stability,
            "fraction_below": dist["fraction_below"], "fraction_below_ci": dist["fraction_below_ci"],
            "median_change": dist["median"], "q90_change": dist["quantiles"].get("q90"),
            "top10pct_share_by_block": conc["top_share_by_block"]["10pct"],
            "top10pct_share_by_step": conc["top_share_by_step"]["10pct"], "steps": conc["steps"]}


# ---- observation 2: persistence of the pattern -------------------------------------------------

def _default_distances(max_d: int) -> list[int]:
    out, d = [], 1
    while d <= max_d:
        out.append(d)
        d *= 2
    return out


def _normalised_ranks(vals: np.ndarray) -> np.ndarray:
    """Ranks along the token axis, centred and scaled to unit norm (a map with a NaN -> all NaN).

    The dot product of two such vectors is their Spearman correlation; a constant map (zero rank
    variance) gives NaN, which the averages skip.
    """
    from scipy.stats import rankdata

    r = rankdata(vals, axis=-1, nan_policy="propagate")  # (..., N), ties averaged
    r = r - r.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(r, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, r / np.where(norm > 0, norm, 1.0), np.nan)


def _pairs(steps: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (i, j) in ``steps`` with steps[j] - steps[i] == d."""
    pos = {int(s): k for k, s in enumerate(steps)}
    ij = [(pos[s], pos[s + d]) for s in pos if s + d in pos]
    if not ij:
        return np.zeros(0, int), np.zeros(0, int)
    i, j = np.array(ij).T
    return i, j


def _rank_correlations(record: TokenChangeRecord, measure: str, distances: Sequence[int] | None,
                       branch: str) -> tuple[dict[int, np.ndarray], dict, int]:
    """{distance d: (P, L, B) Spearman correlation of each (s, block, sample)'s map with step s + d}
    for the distances that have pairs, the adjacent correlation per step, and the number of samples."""
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    z = _normalised_ranks(vals)  # (S', L, B, N)
    max_d = int(steps.max() - steps.min()) if len(steps) > 1 else 0
    distances = _default_distances(max_d) if distances is None else [int(d) for d in distances]
    if any(d < 1 for d in distances):
        raise ValueError(f"distances must be >= 1 step, got {list(distances)}")
    corrs = {}
    for d in distances:
        i, j = _pairs(steps, d)
        if len(i):
            corrs[d] = np.sum(z[i] * z[j], axis=-1)  # (P, L, B) Spearman correlation per (s, block, sample)
    i, j = _pairs(steps, 1)
    adj = _nanmean(np.sum(z[i] * z[j], axis=-1), axis=(1, 2)) if len(i) else np.zeros(0)
    return corrs, {"step": steps[j].tolist(), "corr": adj.tolist()}, vals.shape[2]


def rank_correlation_by_distance(record: TokenChangeRecord, measure: str = "out_change",
                                 distances: Sequence[int] | None = None, branch: str = "cond",
                                 bootstrap: BootstrapConfig | None = None) -> dict:
    """Does the map of *which* tokens change persist from step to step, and for how long?

    For every block and sample, the per-token change map at step ``s`` is compared with the map of
    the same block and sample at step ``s + d`` by Spearman rank correlation (1 = the same order of
    tokens, 0 = unrelated). Averaged over blocks, samples and starting steps ``s`` (all ``s > 0``
    with ``s + d`` recorded), for each distance ``d`` (default 1, 2, 4, 8, ... up to the longest
    available). High at ``d = 1`` means the last step predicts the next (the premise of reusing a
    token's cached update); a slow decay with ``d`` says the ranking mostly reflects a fixed spatial
    layout rather than a short memory.

    Returns ``distances``, ``mean`` (per distance) with ``mean_ci`` ([low, high] per distance,
    bootstrap over the ``samples``), ``std`` (over the (s, block, sample) triples), ``pairs`` (number
    of triples), ``by_block`` ([distance][block] means) and ``adjacent_by_step`` {'step': s,
    'corr': mean corr of steps s-1 and s} for the adjacent pairs.
    """
    return _rank_correlation_summary(*_rank_correlations(record, measure, distances, branch), measure, branch,
                                     bootstrap or BootstrapConfig())


def _rank_correlation_summary(corrs: Mapping[int, np.ndarray], adjacent: dict, num_samples: int, measure: str,
                              branch: str, boot: BootstrapConfig) -> dict:
    weights = boot.weights(num_samples)
    out = {"measure": measure, "branch": branch, "samples": num_samples, "distances": [], "mean": [],
           "mean_ci": [], "std": [], "pairs": [], "by_block": []}
    for d, corr in corrs.items():
        mean = float(_nanmean(corr))
        ci = boot.interval(mean, _weighted_mean(weights, *_sample_totals(corr)), num_samples)
        out["distances"].append(d)
        out["mean"].append(mean)
        out["mean_ci"].append([ci.low, ci.high])
        out["std"].append(float(np.nanstd(corr)) if np.isfinite(corr).any() else math.nan)
        out["pairs"].append(int(np.isfinite(corr).sum()))
        out["by_block"].append(_nanmean(corr, axis=(0, 2)).tolist())
    out["adjacent_by_step"] = adjacent
    return out


def measure_top_token_overlap(record: TokenChangeRecord, measure: str = "out_change", top_fraction: float = 0.2,
                              distances: Sequence[int] | None = None, branch: str = "cond") -> dict:
    """How many of the tokens that change most at step ``s`` are again among the top at ``s + d``?

    The practical form of observation 2: a ``prev-change`` predictor computes the top
    ``top_fraction`` tokens of the last step; this is its recall. Chance level is ``top_fraction``.
    Returns ``distances``, ``overlap`` (mean fraction, per distance) and ``chance``.
    """
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    n = vals.shape[-1]
    k = max(1, math.ceil(top_fraction * n))
    order = np.argsort(-np.nan_to_num(vals, nan=-np.inf), axis=-1, kind="stable")[..., :k]  # (S', L, B, k)
    top = np.zeros(vals.shape, dtype=bool)
    np.put_along_axis(top, order, True, axis=-1)
    bad = np.isnan(vals).any(axis=-1)  # (S', L, B) maps with a missing token
    max_d = int(steps.max() - steps.min()) if len(steps) > 1 else 0
    distances = _default_distances(max_d) if distances is None else [int(d) for d in distances]
    out = {"measure": measure, "top_fraction": top_fraction, "chance": k / n, "distances": [], "overlap": []}
    for d in distances:
        i, j = _pairs(steps, d)
        if len(i) == 0:
            continue
        ov = (top[i] & top[j]).sum(axis=-1) / k  # (P, L, B)
        ov = np.where(bad[i] | bad[j], np.nan, ov)
        out["distances"].append(d)
        out["overlap"].append(float(_nanmean(ov)))
    return out


def check_adjacent_steps_correlated(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                                    min_adjacent_corr: float = 0.5, min_decay: float = 0.05,
                                    bootstrap: BootstrapConfig | None = None) -> dict:
    """Observation 2: is which tokens change strongly correlated between adjacent steps?

    Verdict: holds when the mean Spearman correlation of adjacent steps' change maps is at least
    ``min_adjacent_corr`` (default 0.5) **and** exceeds the correlation at the largest recorded
    distance by at least ``min_decay`` (default 0.05): the last step is a better predictor than an
    old one, which is what a step-to-step cache exploits. Undetermined (``holds`` None) when the
    record has fewer than two steps with change values. The correlations and their difference
    (``rank_corr_decay``) carry intervals over samples; both conditions are recomputed on each
    resample (``agreement``, ``stable``, ``outcome``).
    """
    boot = bootstrap or BootstrapConfig()
    corrs, adjacent, num_samples = _rank_correlations(record, measure, None, branch)
    rc = _rank_correlation_summary(corrs, adjacent, num_samples, measure, branch, boot)
    ov = measure_top_token_overlap(record, measure, 0.2, None, branch)
    name = OBSERVATION_NAMES["adjacent_steps_correlated"]
    if not rc["distances"] or rc["distances"][0] != 1:
        return {"observation": name, "measure": measure, "holds": None,
                "verdict": f"UNDETERMINED for {measure}: fewer than two consecutive steps with change values.",
                "adjacent_rank_corr": None, "far_rank_corr": None, "far_distance": None,
                "adjacent_rank_corr_ci": None, "far_rank_corr_ci": None, "rank_corr_decay": None,
                "rank_corr_decay_ci": None, **_stability(None, [], num_samples, boot),
                "rank_corr_by_distance": rc, "top20pct_overlap": ov}
    adj, far, far_d = rc["mean"][0], rc["mean"][-1], rc["distances"][-1]
    has_far = len(rc["distances"]) > 1
    decays = bool(has_far and adj - far >= min_decay)
    high = bool(np.isfinite(adj) and adj >= min_adjacent_corr)
    holds = high and decays

    weights = boot.weights(num_samples)  # (R, B)
    adj_r = _weighted_mean(weights, *_sample_totals(corrs[1]))  # (R,)
    far_r = _weighted_mean(weights, *_sample_totals(corrs[far_d])) if has_far else np.full_like(adj_r, np.nan)
    intervals = {**boot.interval(adj, adj_r, num_samples).to_dict("adjacent_rank_corr"),
                 **(boot.interval(far, far_r, num_samples).to_dict("far_rank_corr") if has_far else
                    {"far_rank_corr": None, "far_rank_corr_ci": None, "far_rank_corr_n": num_samples}),
                 **(boot.interval(adj - far, adj_r - far_r, num_samples).to_dict("rank_corr_decay") if has_far else
                    {"rank_corr_decay": None, "rank_corr_decay_ci": None, "rank_corr_decay_n": num_samples})}
    with np.errstate(invalid="ignore"):
        holds_r = (adj_r >= min_adjacent_corr) & (adj_r - far_r >= min_decay)  # NaN: False
    stability = _stability(holds, holds_r, num_samples, boot)

    trend = (f"falls to {_with_ci(far, intervals['far_rank_corr_ci'])} at distance {far_d} steps" if has_far
             else "no longer distance recorded")
    stab = _stability_text(stability)
    verdict = (f"{_verdict_word(holds, stability)} for {measure}: rank correlation of adjacent steps' "
               f"change maps {_with_ci(adj, intervals['adjacent_rank_corr_ci'])} (criterion >= {min_adjacent_corr}), "
               f"{trend} ({'decays' if decays else 'does not decay by'} >= {min_decay}); "
               f"{ov['overlap'][0]:.0%} of the top-20% tokens stay top-20% at the next step (chance {ov['chance']:.0%})"
               + (f"; {stab}." if stab else "."))
    return {"observation": name, "measure": measure, "holds": holds, "verdict": verdict,
            "criterion": {"min_adjacent_corr": min_adjacent_corr, "min_decay": min_decay},
            **intervals, "adjacent_rank_corr": adj, "far_rank_corr": far if has_far else None,
            "far_distance": far_d if has_far else None, "decays_with_distance": decays, **stability,
            "rank_corr_by_distance": rc, "top20pct_overlap": ov}


# ---- observation 3: phases -----------------------------------------------------------------------

def per_step_mean_change(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond") -> np.ndarray:
    """(S,) mean of ``measure`` over blocks, samples and tokens per step index (NaN at step 0)."""
    return _nanmean(record.select(measure, branch), axis=(1, 2, 3))


def _fit_two_phases(y: np.ndarray, min_phase_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best two-segment fit of each row of ``y`` (R, P), all finite, P >= 2 (see :func:`detect_phase_split`).

    Returns ``kb`` (R,) the size of the first segment, ``sse`` (R,) its within-segment sum of squares
    and ``sse0`` (R,) that of one segment, both of the fitted (clipped, for P >= 20) rows.
    """
    y = np.asarray(y, dtype=np.float64)
    p = y.shape[1]
    # fit on a winsorised copy (5th-95th percentile) of longer curves, so one outlying step cannot
    # decide the split; the phase means are of the measured values (callers take them from y)
    if p >= 20:
        lo, hi = np.quantile(y, [0.05, 0.95], axis=1)  # (R,) each
        yf = np.clip(y, lo[:, None], hi[:, None])
    else:
        yf = y
    c1, c2 = np.cumsum(yf, axis=1), np.cumsum(yf * yf, axis=1)  # (R, P)
    m = max(1, int(round(min_phase_fraction * p)))
    if 2 * m > p:
        m = max(1, p // 2)
    k = np.arange(m, p - m + 1)  # allowed sizes of the first segment
    n2 = p - k
    s1, q1 = c1[:, k - 1], c2[:, k - 1]  # (R, K)
    s2, q2 = c1[:, -1:] - s1, c2[:, -1:] - q1
    sse = np.maximum((q1 - s1 * s1 / k) + (q2 - s2 * s2 / n2), 0.0)  # (R, K) within-segment sums of squares
    best = np.argmin(np.round(sse, 12), axis=1)  # round: float noise must not decide ties (first one wins)
    rows = np.arange(len(y))
    sse0 = np.sum((yf - yf.mean(axis=1, keepdims=True)) ** 2, axis=1)
    return k[best], sse[rows, best], sse0


def detect_phase_split(curve: Sequence[float], steps: Sequence[int] | None = None,
                       min_phase_fraction: float = 0.1) -> dict:
    """Where does a per-step curve switch level? The best two-segment (piecewise constant) fit.

    Tries every split of the finite points into a first and a second segment (each non-empty) and
    keeps the one with the least within-segment sum of squares (the first such split on ties): an
    exact 1-D two-means fit in O(S). ``steps`` gives the step index of each point (default 0..S-1);
    NaN points (step 0 of a change curve) are left out. Each phase holds at least
    ``min_phase_fraction`` of the points (at least one), and curves of 20 points or more are fitted
    after clipping to their 5th-95th percentiles: without both, a single outlying step (the last
    step of a sampler often jumps) would be "a phase", and the suggested TPRR split 0.98. ``sse``
    and ``variance_explained`` are of the fitted (clipped) curve, the phase means of the measured one.
    Short curves (10 steps: 9 points, phases of one point allowed) are not protected by the clipping:
    :func:`check_uneven_over_trajectory` therefore also fits without the final step and says when
    one step decides the verdict.

    Returns ``split_step`` (the step index where phase 2 starts), ``phase1_steps`` / ``phase2_steps``
    [first, last], ``phase1_mean``, ``phase2_mean``, ``sse``, ``sse_one_phase`` and
    ``variance_explained`` (1 - sse / sse_one_phase: 1 = two flat phases, ~0.75 = a straight ramp,
    0 = no structure). With fewer than two finite points every value is None.
    """
    y = np.asarray(curve, dtype=np.float64)
    idx = np.arange(len(y)) if steps is None else np.asarray(steps)
    if idx.shape != y.shape:
        raise ValueError(f"steps has shape {idx.shape} but curve has shape {y.shape}")
    keep = np.isfinite(y)
    y, idx = y[keep], idx[keep]
    none = {"split_step": None, "phase1_steps": None, "phase2_steps": None, "phase1_mean": None,
            "phase2_mean": None, "sse": None, "sse_one_phase": None, "variance_explained": None}
    if len(y) < 2:
        return none
    kb, sse, sse0 = (float(v[0]) for v in _fit_two_phases(y[None], min_phase_fraction))
    kb = int(kb)
    return {"split_step": int(idx[kb]), "phase1_steps": [int(idx[0]), int(idx[kb - 1])],
            "phase2_steps": [int(idx[kb]), int(idx[-1])], "phase1_mean": float(y[:kb].mean()),
            "phase2_mean": float(y[kb:].mean()), "sse": sse, "sse_one_phase": sse0,
            "variance_explained": float(1 - sse / sse0) if sse0 > 0 else None}


def _phase_ratio(m1: float, m2: float) -> float:
    """The busier phase's mean change over the quieter one's (inf when the quieter one is 0)."""
    return max(m1, m2) / min(m1, m2) if min(m1, m2) > 0 else math.inf


def _phase_numbers(curves: np.ndarray, min_phase_ratio: float, min_variance_explained: float):
    """Phase ratio, variance explained and verdict of each row of ``curves`` (R, P), finite: (R,) each.
    The same rule as :func:`check_uneven_over_trajectory` on one curve (missing variance explained counts 0)."""
    kb, sse, sse0 = _fit_two_phases(curves)
    p, rows = curves.shape[1], np.arange(len(curves))
    cy = np.cumsum(curves, axis=1)
    s1 = cy[rows, kb - 1]
    m1, m2 = s1 / kb, (cy[:, -1] - s1) / (p - kb)
    lo, hi = np.minimum(m1, m2), np.maximum(m1, m2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
        r2 = np.where(sse0 > 0, 1 - sse / np.where(sse0 > 0, sse0, 1.0), np.nan)
    holds = (ratio >= min_phase_ratio) & (np.nan_to_num(r2, nan=0.0) >= min_variance_explained)
    return ratio, r2, holds


def _resampled_phase_numbers(curves: np.ndarray, steps: np.ndarray, min_phase_ratio: float,
                             min_variance_explained: float):
    """:func:`_phase_numbers` of resampled curves (R, P), which may miss a step where no drawn sample
    has a value: those rows are fitted one by one on their finite points."""
    bad = ~np.isfinite(curves).all(axis=1)
    if not bad.any():
        return _phase_numbers(curves, min_phase_ratio, min_variance_explained)
    ratio, r2, holds = (np.full(len(curves), np.nan), np.full(len(curves), np.nan), np.zeros(len(curves), bool))
    good = ~bad
    if good.any():
        ratio[good], r2[good], holds[good] = _phase_numbers(curves[good], min_phase_ratio, min_variance_explained)
    for r in np.flatnonzero(bad):
        sp = detect_phase_split(curves[r], steps)
        if sp["split_step"] is not None:
            ratio[r] = _phase_ratio(sp["phase1_mean"], sp["phase2_mean"])
            r2[r] = np.nan if sp["variance_explained"] is None else sp["variance_explained"]
            holds[r] = ratio[r] >= min_phase_ratio and np.nan_to_num(r2[r], nan=0.0) >= min_variance_explained
    return ratio, r2, holds


def _phase_verdict(split: Mapping, min_phase_ratio: float, min_variance_explained: float):
    """(ratio, variance explained, holds) of one :func:`detect_phase_split` result; holds None without a split."""
    if split["split_step"] is None:
        return None, None, None
    ratio = _phase_ratio(split["phase1_mean"], split["phase2_mean"])
    r2 = split["variance_explained"] if split["variance_explained"] is not None else 0.0
    return ratio, split["variance_explained"], bool(ratio >= min_phase_ratio and r2 >= min_variance_explained)


def per_step_mean_change_interval(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                                  bootstrap: BootstrapConfig | None = None) -> dict:
    """The per-step mean change with its interval over samples (for bands in figures).

    Returns ``step`` (S,), ``mean`` (S,) as :func:`per_step_mean_change`, ``low`` / ``high`` (S,) the
    bootstrap interval at ``confidence`` (NaN at step 0 and with one sample), ``samples``.
    """
    boot = bootstrap or BootstrapConfig()
    curve = per_step_mean_change(record, measure, branch)  # (S,)
    sums, counts = _sample_totals(record.select(measure, branch), 2, 0)  # (B, S) each
    num_samples = sums.shape[0]
    low, high = np.full(len(curve), np.nan), np.full(len(curve), np.nan)
    if num_samples >= 2:
        resampled = _weighted_mean(boot.weights(num_samples), sums, counts)  # (R, S)
        for s in np.flatnonzero(np.isfinite(curve)):
            ci = boot.interval(curve[s], resampled[:, s], num_samples)
            low[s], high[s] = ci.low, ci.high
    return {"step": record.steps, "mean": curve, "low": low, "high": high, "samples": num_samples}


def check_uneven_over_trajectory(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                                 min_phase_ratio: float = 1.5, min_variance_explained: float = 0.5,
                                 bootstrap: BootstrapConfig | None = None) -> dict:
    """Observation 3: is the amount of change uneven over the trajectory, in two phases?

    Fits two phases to the per-step mean change (:func:`detect_phase_split`). Verdict: holds when
    the phases' mean change differs by at least ``min_phase_ratio`` (default 1.5x) and the split
    explains at least ``min_variance_explained`` of the curve's variance (default 0.5).

    Robustness: the phase ratio and variance explained carry intervals over samples, the split
    being refitted on each resampled curve (``agreement``, ``stable``, ``outcome``). The fit is
    repeated without the final step (``without_final_step``: its ratio with interval, verdict and
    stability; the last step of a sampler, t = 0, often jumps) and with each single step left out
    (``leave_one_step_out``): ``driven_by_steps`` lists the steps whose removal alone flips the
    verdict, ``driven_by_final_step`` says whether the final step is one of them.

    The TPRR suggestion (spec ``tprr(K1, K2, split)``): ``split = split_step / S``, so that
    ``ceil(split * S)`` is the first step of phase 2; the phase with the *smaller* change can use
    the longer full-step interval (``longer_interval_phase``: 'first' means K1 > K2, the order the
    paper's summaries report). For an SDEdit record, S and the split refer to the shortened
    trajectory that was run.
    """
    boot = bootstrap or BootstrapConfig()
    curve = per_step_mean_change(record, measure, branch)  # (S,)
    split = detect_phase_split(curve, record.steps)
    name = OBSERVATION_NAMES["uneven_over_trajectory"]
    sums, counts = _sample_totals(record.select(measure, branch), 2, 0)  # (B, S) per sample and step
    num_samples = sums.shape[0]
    base = {"observation": name, "measure": measure, "per_step_mean": curve.tolist(),
            "steps": record.steps.tolist(), "t": [timestep_of(record, int(s)) for s in record.steps], **split}
    if split["split_step"] is None:
        return {**base, "holds": None, "verdict": f"UNDETERMINED for {measure}: fewer than two steps with change "
                "values, no phases to find.", "suggested_tprr_split": None, "longer_interval_phase": None,
                "phase_mean_ratio": None, "phase_mean_ratio_ci": None, "variance_explained_ci": None,
                "split_fraction": None, "split_t": None, "without_final_step": None, "leave_one_step_out": None,
                "driven_by_steps": [], "driven_by_final_step": None, **_stability(None, [], num_samples, boot)}
    ratio, r2_point, holds = _phase_verdict(split, min_phase_ratio, min_variance_explained)
    m1, m2 = split["phase1_mean"], split["phase2_mean"]

    # the bootstrap: resampled per-step curves, each refitted
    pos = np.flatnonzero(np.isfinite(curve))  # the steps with values (all but step 0)
    steps = record.steps[pos]
    weights = boot.weights(num_samples)
    curves = _weighted_mean(weights, sums, counts)[:, pos]  # (R, P)
    ratio_r, r2_r, holds_r = _resampled_phase_numbers(curves, steps, min_phase_ratio, min_variance_explained)
    intervals = {**boot.interval(ratio, ratio_r, num_samples).to_dict("phase_mean_ratio"),
                 **boot.interval(np.nan if r2_point is None else r2_point, r2_r, num_samples)
                 .to_dict("variance_explained")}
    intervals["variance_explained"] = r2_point
    stability = _stability(holds, holds_r, num_samples, boot)
    band = per_step_mean_change_interval(record, measure, branch, boot)

    # leave one step out (the final step among them), refitted on the point curve
    loo = {"step": [], "holds": [], "phase_mean_ratio": [], "split_step": []}
    for k in range(len(pos)):
        keep = np.delete(pos, k)
        sp = detect_phase_split(curve[keep], record.steps[keep])
        r, _, h = _phase_verdict(sp, min_phase_ratio, min_variance_explained)
        loo["step"].append(int(steps[k]))
        loo["holds"].append(h)
        loo["phase_mean_ratio"].append(r)
        loo["split_step"].append(sp["split_step"])
    driven = [s for s, h in zip(loo["step"], loo["holds"]) if h is not None and h != holds]
    final_step = int(steps[-1])
    without = None
    if len(pos) >= 3:  # without the final step: at least two points left to split
        sp = detect_phase_split(curve[pos[:-1]], steps[:-1])
        r, ve, h = _phase_verdict(sp, min_phase_ratio, min_variance_explained)
        ratio_w, r2_w, holds_w = _resampled_phase_numbers(curves[:, :-1], steps[:-1], min_phase_ratio,
                                                          min_variance_explained)
        without = {"dropped_step": final_step, "dropped_t": timestep_of(record, final_step), "holds": h,
                   "split_step": sp["split_step"], "phase1_mean": sp["phase1_mean"], "phase2_mean": sp["phase2_mean"],
                   **boot.interval(r, ratio_w, num_samples).to_dict("phase_mean_ratio"),
                   **boot.interval(np.nan if ve is None else ve, r2_w, num_samples).to_dict("variance_explained"),
                   **_stability(h, holds_w, num_samples, boot)}
        without["phase_mean_ratio"], without["variance_explained"] = r, ve
    driven_final = None if without is None else bool(without["holds"] is not None and without["holds"] != holds)

    s_split = split["split_step"]
    frac = s_split / record.num_steps
    t_split = timestep_of(record, s_split)
    longer = "first" if m1 < m2 else "second"
    finite = curve[np.isfinite(curve)]
    cv = float(finite.std() / finite.mean()) if finite.mean() > 0 else None
    t_text = f", t = {t_split:g}" if t_split is not None else ""
    out = {**base, "holds": holds,
           "criterion": {"min_phase_ratio": min_phase_ratio, "min_variance_explained": min_variance_explained},
           "split_fraction": frac, "split_t": t_split, **intervals, **stability,
           "per_step_mean_ci": [[lo, hi] for lo, hi in zip(band["low"].tolist(), band["high"].tolist())],
           "without_final_step": without, "leave_one_step_out": loo, "driven_by_steps": driven,
           "driven_by_final_step": driven_final,
           "suggested_tprr_split": frac, "longer_interval_phase": longer, "coefficient_of_variation": cv}
    stab = _stability_text(stability)
    robust = _robustness_sentence(out)
    out["verdict"] = (
        f"{_verdict_word(holds, stability)} for {measure}: two phases split at step {s_split} of "
        f"{record.num_steps} ({frac:.0%} of the trajectory{t_text}); mean change {m1:.3g} before vs {m2:.3g} after "
        f"({_with_ci(ratio, intervals['phase_mean_ratio_ci'], '.2f', 'x')}, criterion >= {min_phase_ratio}x), the split "
        f"explains {_with_ci(r2_point, intervals['variance_explained_ci'], '.0%')} of the per-step variance (criterion "
        f">= {min_variance_explained:.0%})" + (f"; {stab}" if stab else "") + ". " + (f"{robust} " if robust else "")
        + f"Suggested tprr split {frac:.2f} with the longer interval in the {longer} phase.")
    return out


def _step_t(obs: Mapping, step: int) -> float | None:
    """The timestep ``t`` of a step of an observation-3 dict (its ``steps`` and ``t`` lists), None if unknown."""
    t = dict(zip(obs.get("steps") or [], obs.get("t") or [])).get(step)
    return t if isinstance(t, (int, float)) else None


def _robustness_sentence(obs: Mapping) -> str:
    """Observation 3 without the final step, and which single steps decide its verdict, in words."""
    w = obs.get("without_final_step")
    if not w or w.get("holds") is None or obs.get("holds") is None:
        return ""
    final, t_final = w["dropped_step"], _step_t(obs, w["dropped_step"])
    final_name = f"s = {final}" + (f", t = {t_final:g}" if t_final is not None else "")
    ratio = _with_ci(w.get("phase_mean_ratio"), w.get("phase_mean_ratio_ci"), ".2f", "x")
    answer = ("holds" if w["holds"] else "does not hold") + (" (within noise)" if w.get("stable") is False else "")
    if obs.get("driven_by_final_step"):
        text = (f"The verdict is driven by the final step ({final_name}): without it the phase ratio is {ratio} "
                f"(split at step {w.get('split_step')}) and the observation {answer}.")
    else:
        text = f"Without the final step ({final_name}) the phase ratio is {ratio} and the observation {answer}."
    others = [s for s in obs.get("driven_by_steps") or [] if s != final]
    if others:
        names = " or ".join(f"step {s}" + (f" (t = {_step_t(obs, s):g})" if _step_t(obs, s) is not None else "")
                            for s in others[:3]) + (" or others" if len(others) > 3 else "")
        text += (f" Leaving out {names} alone flips the verdict as well." if obs.get("driven_by_final_step")
                 else f" The verdict is driven by single steps: leaving out {names} alone flips it.")
    return text


# ---- blocks -------------------------------------------------------------------------------------

def measure_block_importance(record: TokenChangeRecord, branch: str = "cond") -> dict:
    """Which blocks matter? Mean ``update_ratio`` (how much a block changes its tokens at all) per block.

    A block with a small update ratio barely moves its input: skipping it costs little (the
    ``adaptive`` block selection of TokenCache v1 caches the least important blocks first). Also
    per block: the mean ``out_change`` and ``update_change`` over steps > 0 (how stale a cached value
    of that block gets in one step). ``order`` lists blocks from most to least important.
    """
    ratio = record.mean_over("update_ratio", ("step", "sample", "token"), branch)  # (L,)
    out = {"update_ratio": ratio.tolist(), "order": np.argsort(-ratio, kind="stable").tolist()}
    for m in CHANGE_MEASURES:
        out[m] = record.mean_over(m, ("step", "sample", "token"), branch).tolist()  # (L,), NaN steps skipped
    return out


def tabulate_per_step(record: TokenChangeRecord, thresholds: Sequence[float] = THRESHOLDS, branch: str = "cond"):
    """A per-step table (pandas DataFrame): step index, t, mean change, fractions below thresholds,
    adjacent rank correlation (with the step before) for both change measures, and the mean
    update ratio. One row per step index; step 0 has NaN change columns."""
    import pandas as pd

    df = pd.DataFrame({"step": record.steps, "t": record.timesteps})
    for m in CHANGE_MEASURES:
        a = record.select(m, branch).astype(np.float64)  # (S, L, B, N)
        ok = ~np.isnan(a)
        n = ok.sum(axis=(1, 2, 3))
        df[f"{m}_mean"] = _nanmean(a, axis=(1, 2, 3))
        for th in thresholds:
            df[f"{m}_below_{pct_label(th)}"] = np.where(n > 0, (a < th).sum(axis=(1, 2, 3)) / np.maximum(n, 1),
                                                        np.nan)
        rc = rank_correlation_by_distance(record, m, [1], branch)["adjacent_by_step"] \
            if record.num_steps > 2 else {"step": [], "corr": []}
        corr = np.full(record.num_steps, np.nan)
        corr[np.asarray(rc["step"], dtype=int)] = rc["corr"]
        df[f"{m}_rank_corr_prev"] = corr
    df["update_ratio_mean"] = _nanmean(record.select("update_ratio", branch), axis=(1, 2, 3))
    return df


# ---- everything ---------------------------------------------------------------------------------

def describe_record(record: TokenChangeRecord, branch: str = "cond") -> dict:
    """What the record holds: sizes, step -> t mapping, classes, provenance (JSON-ready)."""
    rows = record.rows(branch)
    return {"steps": record.num_steps, "blocks": record.num_blocks, "samples": int(len(rows)),
            "rows": record.num_rows, "grid": list(record.grid), "tokens": record.num_tokens, "branch": branch,
            "cfg": bool((record.branch == "uncond").any()), "timesteps": record.timesteps.tolist(),
            "class_labels": record.class_labels[rows].tolist(), "step_source": record.step_source,
            "model_identity": record.model_identity, "data_identity": record.data_identity}


def analyse_record(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                   bootstrap: BootstrapConfig | None = None) -> dict:
    """Every analysis of one record: distribution (both change measures), the three observations
    (for both change measures; ``measure`` is the primary one the headline uses), block importance,
    and ``bootstrap`` (how the intervals were made). Plain JSON values; NaN becomes None."""
    if measure not in CHANGE_MEASURES:
        raise ValueError(f"measure must be one of {list(CHANGE_MEASURES)} (a change between steps), got {measure!r}")
    boot = bootstrap or BootstrapConfig()
    out = {"primary_measure": measure, "record": describe_record(record, branch), "distribution": {},
           "observations": {}, "bootstrap": _bootstrap_description(boot)}
    for m in CHANGE_MEASURES:
        out["distribution"][m] = summarise_change_distribution(record, m, branch=branch, bootstrap=boot)
        out["observations"][m] = {
            "few_tokens_change_a_lot": check_few_tokens_change_a_lot(record, m, branch, bootstrap=boot),
            "adjacent_steps_correlated": check_adjacent_steps_correlated(record, m, branch, bootstrap=boot),
            "uneven_over_trajectory": check_uneven_over_trajectory(record, m, branch, bootstrap=boot),
        }
    out["block_importance"] = measure_block_importance(record, branch)
    return to_plain(out)


def _bootstrap_description(boot: BootstrapConfig) -> dict:
    return {"method": "percentile bootstrap over samples", "unit": "sample (image / seed)",
            "resamples": boot.resamples, "confidence": boot.confidence, "seed": boot.seed,
            "min_agreement": boot.min_agreement}


def _headline_of(analysis: dict, prefix: str = "") -> dict:
    m = analysis["primary_measure"]
    obs = analysis["observations"][m]
    o1, o2, o3 = obs["few_tokens_change_a_lot"], obs["adjacent_steps_correlated"], obs["uneven_over_trajectory"]
    fb = analysis["distribution"][m]["fraction_below"]
    return {f"{prefix}frac_tokens_below_5pct": fb["below_5pct"], f"{prefix}top10pct_change_share": o1["top10pct_share"],
            f"{prefix}adjacent_rank_corr": o2["adjacent_rank_corr"], f"{prefix}far_rank_corr": o2["far_rank_corr"],
            f"{prefix}suggested_tprr_split": o3["suggested_tprr_split"],
            f"{prefix}phase_mean_ratio": o3["phase_mean_ratio"]}


def _headline_intervals(analysis: Mapping) -> dict[str, tuple]:
    """{headline number: (value, [low, high] or None, samples)} of an :func:`analyse_record` result."""
    m = analysis["primary_measure"]
    obs = analysis["observations"][m]
    o1, o2, o3 = obs["few_tokens_change_a_lot"], obs["adjacent_steps_correlated"], obs["uneven_over_trajectory"]
    dist = analysis["distribution"][m]
    n = analysis["record"]["samples"]
    without = o3.get("without_final_step") or {}
    return {"frac_tokens_below_5pct": (dist["fraction_below"]["below_5pct"],
                                       (dist.get("fraction_below_ci") or {}).get("below_5pct"), n),
            "top10pct_change_share": (o1["top10pct_share"], o1.get("top10pct_share_ci"), n),
            "gini": (o1["gini"], o1.get("gini_ci"), n),
            "adjacent_rank_corr": (o2["adjacent_rank_corr"], o2.get("adjacent_rank_corr_ci"), n),
            "far_rank_corr": (o2["far_rank_corr"], o2.get("far_rank_corr_ci"), n),
            "rank_corr_decay": (o2.get("rank_corr_decay"), o2.get("rank_corr_decay_ci"), n),
            "phase_mean_ratio": (o3["phase_mean_ratio"], o3.get("phase_mean_ratio_ci"), n),
            "phase_variance_explained": (o3.get("variance_explained"), o3.get("variance_explained_ci"), n),
            "phase_mean_ratio_without_final_step": (without.get("phase_mean_ratio"),
                                                    without.get("phase_mean_ratio_ci"), n)}


def _verdict_keys(analysis: Mapping, prefix: str = "") -> dict:
    """``obsN_verdict`` (the report's verdict: holds / does not hold / within noise / not measured),
    ``obsN_stable``, ``obsN_agreement`` and observation 3's robustness flags, flat."""
    m = analysis["primary_measure"]
    obs = analysis["observations"][m]
    out = {}
    for i, key in enumerate(OBSERVATION_NAMES, start=1):
        o = obs[key]
        out[f"{prefix}obs{i}_verdict"] = o.get("outcome") or verdict_of(o.get("holds"))
        out[f"{prefix}obs{i}_stable"] = o.get("stable")
        out[f"{prefix}obs{i}_agreement"] = o.get("agreement")
    o3 = obs["uneven_over_trajectory"]
    out[f"{prefix}obs3_holds_without_final_step"] = (o3.get("without_final_step") or {}).get("holds")
    out[f"{prefix}obs3_driven_by_final_step"] = o3.get("driven_by_final_step")
    out[f"{prefix}obs3_driven_by_one_step"] = None if o3.get("holds") is None else bool(o3.get("driven_by_steps"))
    return out


def _flat_intervals(numbers: Mapping[str, tuple], prefix: str = "") -> dict:
    """``<name>_ci_low``, ``<name>_ci_high``, ``<name>_n``: the intervals as the flat scalars a headline holds."""
    out = {}
    for name, (_, ci, n) in numbers.items():
        lo, hi = ci if ci else (None, None)
        out.update({f"{prefix}{name}_ci_low": lo, f"{prefix}{name}_ci_high": hi, f"{prefix}{name}_n": n})
    return out


def _listed_intervals(numbers: Mapping[str, tuple], prefix: str = "") -> dict:
    """``<name>``, ``<name>_ci`` = [low, high], ``<name>_n`` (issue #19's layout, :meth:`Interval.to_dict`)."""
    out = {}
    for name, (value, ci, n) in numbers.items():
        out.update({f"{prefix}{name}": value, f"{prefix}{name}_ci": list(ci) if ci else None, f"{prefix}{name}_n": n})
    return out


#: The SDEdit numbers the headline carries (beside the pure samples' ones).
_SDEDIT_HEADLINE = ("frac_tokens_below_5pct", "top10pct_change_share", "adjacent_rank_corr")


def summarise_redundancy(record: TokenChangeRecord, sdedit_record: TokenChangeRecord | None = None,
                         measure: str = "out_change", branch: str = "cond",
                         bootstrap: BootstrapConfig | None = None) -> dict:
    """The redundancy notebook's ``summary``: do the three observations hold on this model?

    ``record`` holds pure samples (from noise); ``sdedit_record`` (optional) the same model denoising
    noised in-house images (SDEdit), so the answer can be checked on the data the team cares about.
    Keys:

    - ``headline``: flat scalars for ``reports/index.html`` (primary ``measure``): ``frac_tokens_below_5pct``,
      ``top10pct_change_share``, ``gini``, ``adjacent_rank_corr``, ``far_rank_corr``, ``far_distance``,
      ``suggested_tprr_split``, ``phase_mean_ratio``, ``obs1_holds``/``obs2_holds``/``obs3_holds`` (the
      point verdicts: True/False/None); ``obsN_verdict`` (what the report shows: holds, does not hold,
      within noise, not measured), ``obsN_stable``, ``obsN_agreement``; ``rank_corr_decay``,
      ``phase_variance_explained``, ``phase_mean_ratio_without_final_step``,
      ``obs3_holds_without_final_step``, ``obs3_driven_by_final_step``, ``obs3_driven_by_one_step``;
      every number with an interval also as ``<name>_ci_low``, ``<name>_ci_high``, ``<name>_n`` (a
      headline holds single values only); with SDEdit ``sdedit_frac_tokens_below_5pct``,
      ``sdedit_top10pct_change_share``, ``sdedit_adjacent_rank_corr`` (with their intervals),
      ``sdedit_suggested_tprr_split`` and ``sdedit_obsN_verdict``;
    - ``intervals``: each headline number as ``<name>``, ``<name>_ci`` [low, high], ``<name>_n``
      (``sdedit_<name>`` for the SDEdit record), with ``bootstrap`` (method, resamples, confidence,
      seed, the agreement a stable verdict needs);
    - ``primary_measure``, ``observations`` {measure: {observation: verdict dict}} (verdicts as
      sentences with the numbers and intervals, ``holds`` True/False/None, ``outcome``,
      ``agreement``, ``stable``, ``<name>_ci``), ``distribution`` {measure: ...},
      ``block_importance``, ``record`` (what was analysed), ``bootstrap``;
    - ``sdedit``: the same analysis of the SDEdit record (no headline), and ``comparison``
      {number: {'samples': x, 'sdedit': y}}.

    Everything is plain JSON (floats, ints, bools, strings, lists, dicts; NaN -> None).
    """
    boot = bootstrap or BootstrapConfig()
    main = analyse_record(record, measure, branch, boot)
    obs = main["observations"][measure]
    head = _headline_of(main)
    o1 = obs["few_tokens_change_a_lot"]
    head.update(gini=o1["gini"], far_distance=obs["adjacent_steps_correlated"]["far_distance"],
                obs1_holds=o1["holds"], obs2_holds=obs["adjacent_steps_correlated"]["holds"],
                obs3_holds=obs["uneven_over_trajectory"]["holds"])
    numbers = _headline_intervals(main)
    head.update({k: v for k, (v, _, _) in numbers.items() if k not in head})
    head.update(_verdict_keys(main))
    head.update(_flat_intervals(numbers))
    intervals = {**_listed_intervals(numbers), "bootstrap": main["bootstrap"]}
    summary = {"headline": head, "intervals": intervals, **main}
    if sdedit_record is not None:
        sd = analyse_record(sdedit_record, measure, branch, boot)
        sd_head = _headline_of(sd, "sdedit_")
        sd_numbers = {k: v for k, v in _headline_intervals(sd).items() if k in _SDEDIT_HEADLINE}
        for k in ("sdedit_frac_tokens_below_5pct", "sdedit_top10pct_change_share", "sdedit_adjacent_rank_corr",
                  "sdedit_suggested_tprr_split"):
            head[k] = sd_head[k]
        head.update({k: v for k, v in _verdict_keys(sd, "sdedit_").items() if k.endswith("_verdict")})
        head.update(_flat_intervals(sd_numbers, "sdedit_"))
        intervals.update(_listed_intervals(_headline_intervals(sd), "sdedit_"))
        summary["sdedit"] = sd
        summary["comparison"] = {k: {"samples": v, "sdedit": sd_head["sdedit_" + k]}
                                 for k, v in _headline_of(main).items()}
    summary = to_plain(summary)
    summary["report"] = redundancy_report(summary).to_dict()
    return summary


def tabulate_intervals(summary: Mapping):
    """The headline numbers of a :func:`summarise_redundancy` summary with their intervals, one row
    per number and set of trajectories (pandas DataFrame: ``trajectories``, ``number``, ``value``,
    ``ci_low``, ``ci_high``, ``n``): what the verdicts rest on, for the notebook."""
    import pandas as pd

    parts = [("pure samples", summary)] + ([("SDEdit", summary["sdedit"])] if "sdedit" in summary else [])
    rows = []
    for label, part in parts:
        for name, (value, ci, n) in _headline_intervals(part).items():
            lo, hi = ci if ci else (None, None)
            rows.append({"trajectories": label, "number": name, "value": value, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows, columns=["trajectories", "number", "value", "ci_low", "ci_high", "n"])


#: Short names of the observations for a report's findings.
_OBSERVATION_SHORT = {
    "few_tokens_change_a_lot": "1. Few tokens carry most of the change",
    "adjacent_steps_correlated": "2. Which tokens change is predictable from the last step",
    "uneven_over_trajectory": "3. Change is uneven over the trajectory",
}


def _criterion_text(key: str, criterion: Mapping, obs: Mapping | None = None) -> str:
    """The rule of an observation's verdict, in words, and (given the verdict dict) when it counts as stable."""
    if key == "few_tokens_change_a_lot":
        text = (f"the top 10 % of tokens carry at least {criterion.get('min_top10_share', 0.25):.0%} of the total "
                "change (10 % if every token changed equally)")
    elif key == "adjacent_steps_correlated":
        text = (f"rank correlation of adjacent steps' change maps at least {criterion.get('min_adjacent_corr', 0.5):g}, "
                f"and at least {criterion.get('min_decay', 0.05):g} lower at the far distance")
    else:
        text = (f"a two-phase split with a mean-change ratio of at least {criterion.get('min_phase_ratio', 1.5):g}x that "
                f"explains at least {criterion.get('min_variance_explained', 0.5):.0%} of the per-step variance")
    if obs and obs.get("resamples") and obs.get("min_agreement") is not None:
        text += (f"; it stands when at least {obs['min_agreement']:.1%} of {obs['resamples']} bootstrap resamples of "
                 "the samples agree, else it is within noise")
    return text


def _agreement_text(obs: Mapping) -> str:
    """``N = 6 samples, 100% of resamples agree`` (or why there is no such check); '' for old summaries."""
    n, agree = obs.get("samples"), obs.get("agreement")
    if n is None:
        return ""
    if agree is None:
        return f"N = {n} sample{'s' if n != 1 else ''}" + (": no interval" if n < 2 else "")
    if obs.get("stable"):
        return f"N = {n} samples, {agree:.0%} of resamples agree"
    return f"N = {n} samples, only {agree:.0%} of resamples agree: within noise"


def _observation_sentence(key: str, obs: Mapping) -> str:
    """One sentence with the numbers behind an observation's verdict, their intervals and stability."""
    def num(name: str, fmt: str = ".2f", suffix: str = "") -> str:
        return _with_ci(obs.get(name), obs.get(f"{name}_ci"), fmt, suffix)

    if obs.get("holds") is None:
        return str(obs.get("verdict", "")).split(": ", 1)[-1]
    agree = _agreement_text(obs)
    tail = f" ({agree})" if agree else ""
    if key == "few_tokens_change_a_lot":
        return (f"The top 10 % of tokens carry {num('top10pct_share', '.1%')} of the change "
                f"(top 20 %: {num('top20pct_share', '.1%')}; Gini {num('gini')}" + (f"; {agree}" if agree else "")
                + ").")
    if key == "adjacent_steps_correlated":
        far = (f"{obs['far_distance']} steps apart, {num('far_rank_corr')}" if obs.get("far_distance") is not None
               and obs.get("far_rank_corr") is not None else "too few steps to measure it further apart")
        return f"Adjacent steps' change maps have rank correlation {num('adjacent_rank_corr')}; {far}{tail}."
    t = obs.get("split_t")
    m1, m2 = obs.get("phase1_mean"), obs.get("phase2_mean")
    busier = ("the later phase changes {r} as much as the earlier one" if m1 is None or m2 is None or m2 >= m1
              else "the earlier phase changes {r} as much as the later one")
    robust = _robustness_sentence(obs)
    return (f"The change splits into two phases at step {obs.get('split_step', '?')}"
            + (f" (t = {t:g})" if isinstance(t, (int, float)) else "")
            + "; " + busier.format(r=num("phase_mean_ratio", ".2f", "x")) + tail + "."
            + (f" {robust}" if robust else ""))


def observation_findings(part: Mapping, group: str) -> list[Finding]:
    """The three observations of a :func:`analyse_record` result as report findings under ``group``:
    the verdict is the bootstrap's ``outcome`` (within noise when the point verdict is not stable)."""
    m = part["primary_measure"]
    out = []
    for key, short in _OBSERVATION_SHORT.items():
        obs = part["observations"][m][key]
        verdict = obs.get("outcome") or verdict_of(obs.get("holds"))  # summaries before issue #19: no outcome
        out.append(Finding(f"{short}. {_observation_sentence(key, obs)}", verdict,
                           _criterion_text(key, obs.get("criterion") or {}, obs), group))
    return out


def redundancy_report(summary: Mapping):
    """The first screen of a redundancy report (:class:`tclab.report.ReportSummary`) from a
    :func:`summarise_redundancy` summary: each observation's verdict on the pure samples and, when
    traced, on SDEdit of the in-house images; the numbers behind them with their intervals."""
    rec = summary["record"]
    findings = observation_findings(summary, f"the model's own samples ({rec['samples']} samples, "
                                              f"{rec['steps']} steps, {summary['primary_measure']})")
    if "sdedit" in summary:
        sd = summary["sdedit"]["record"]
        findings += observation_findings(summary["sdedit"], f"SDEdit of the in-house images ({sd['samples']} images, "
                                                             f"{sd['steps']} steps)")
    head = summary["headline"]
    far = head.get("far_distance")
    spec = [("top10pct_change_share", "share of the change carried by the top 10 % of tokens", "%"),
            ("frac_tokens_below_5pct", "token updates that move less than 5 %", "%"),
            ("adjacent_rank_corr", "rank correlation of adjacent steps' change maps", ""),
            ("far_rank_corr", f"the same at a distance of {far} steps" if far else "the same at a far distance", ""),
            ("phase_mean_ratio", "mean change, busier phase over quieter phase", "x"),
            ("phase_mean_ratio_without_final_step", "the same, fitted without the final step", "x"),
            ("suggested_tprr_split", "suggested TPRR split (share of the steps)", ""),
            ("sdedit_top10pct_change_share", "SDEdit: share of the change carried by the top 10 %", "%"),
            ("sdedit_adjacent_rank_corr", "SDEdit: rank correlation of adjacent steps", "")]
    confidence = (summary.get("bootstrap") or {}).get("confidence", 0.95)
    return ReportSummary(findings=findings, key_numbers=key_numbers_from(head, spec, confidence),
                         index_keys=["top10pct_change_share", "adjacent_rank_corr", "phase_mean_ratio"],
                         question="Do TokenCache's three observations (few tokens change a lot; which ones is "
                                  "predictable; change comes in phases) hold on this model and these images?")


def describe_observations(summary: dict) -> str:
    """The verdicts of a :func:`summarise_redundancy` summary as readable lines (for the notebook), with
    their intervals and whether the bootstrap over samples finds them stable."""
    lines = []
    boot = summary.get("bootstrap")
    if boot:
        lines.append(f"intervals: {boot['confidence']:.0%} {boot['method']} ({boot['resamples']} resamples); a verdict "
                     f"is stable when at least {boot['min_agreement']:.1%} of the resamples agree, else within noise")
    parts = [("pure samples", summary)] + ([("SDEdit of in-house images", summary["sdedit"])]
                                           if "sdedit" in summary else [])
    for label, part in parts:
        m = part["primary_measure"]
        lines.append(f"== {label} ({part['record']['samples']} samples, {part['record']['steps']} steps) ==")
        for key, name in OBSERVATION_NAMES.items():
            lines.append(f"{name}\n    {m}: {part['observations'][m][key]['verdict']}")
            for other, obs in part["observations"].items():
                if other != m:
                    lines.append(f"    {other}: {obs[key]['verdict']}")
    return "\n".join(lines)
