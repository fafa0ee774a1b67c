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
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .report import Finding, ReportSummary, key_numbers_from, verdict_of

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
                                  branch: str = "cond") -> dict:
    """How much do tokens change between adjacent steps? Fractions below thresholds, quantiles.

    Over every (step > 0, block, sample, token) entry of ``measure``: the fraction of entries below
    each threshold (e.g. ``below_5pct`` = share of token updates that moved less than 5% of the
    token's norm: candidates for reuse), the same per step (a fraction below a threshold that grows
    or shrinks over the trajectory hints at phases), quantiles, mean and median.

    Returns a dict: ``measure``, ``entries``, ``fraction_below`` {label: float}, ``quantiles``
    {'q50': float, ...}, ``mean``, ``median``, ``per_step`` {'step': [...], 't': [...],
    'mean': [...], 'below_5pct': [...], ...} (steps with values only).
    """
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    ok = ~np.isnan(vals)
    flat = vals[ok]
    per_step_n = ok.sum(axis=(1, 2, 3))  # (S',)
    out = {"measure": measure, "branch": branch, "entries": int(flat.size), "thresholds": list(thresholds),
           "fraction_below": {}, "quantiles": {}, "mean": float(flat.mean()), "median": float(np.median(flat)),
           "per_step": {"step": steps.tolist(), "t": [timestep_of(record, int(s)) for s in steps],
                        "mean": _nanmean(vals, axis=(1, 2, 3)).tolist()}}
    for th in thresholds:
        key = f"below_{pct_label(th)}"
        out["fraction_below"][key] = float((flat < th).mean())
        out["per_step"][key] = ((vals < th).sum(axis=(1, 2, 3)) / np.maximum(per_step_n, 1)).tolist()
    for q, v in zip(quantiles, np.quantile(flat, list(quantiles))):
        out["quantiles"][f"q{q * 100:g}"] = float(v)
    return out


# ---- observation 1: concentration ----------------------------------------------------------------

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
    n = vals.shape[-1]
    desc = -np.sort(-vals, axis=-1)  # (S', L, B, N) largest first; NaN sorts last
    total = desc.sum(axis=-1)  # (S', L, B); NaN if any token is NaN
    valid = np.isfinite(total) & (total > 0)
    total = np.where(valid, total, np.nan)
    csum = np.cumsum(desc, axis=-1)
    out = {"measure": measure, "branch": branch, "steps": steps.tolist(), "maps": int(valid.sum()),
           "tokens_per_map": n, "top_share": {}, "top_share_by_step": {}, "top_share_by_block": {},
           "uniform_share": {}}
    for q in top_fractions:
        k = max(1, math.ceil(q * n))
        share = csum[..., k - 1] / total  # (S', L, B)
        key = pct_label(q)
        out["top_share"][key] = float(_nanmean(share))
        out["top_share_by_step"][key] = _nanmean(share, axis=(1, 2)).tolist()
        out["top_share_by_block"][key] = _nanmean(share, axis=(0, 2)).tolist()
        out["uniform_share"][key] = k / n
    asc = desc[..., ::-1]  # ascending
    i = np.arange(1, n + 1, dtype=np.float64)
    gini = (np.sum((2 * i - n - 1) * asc, axis=-1)) / (n * total)  # (S', L, B)
    out["gini"] = float(_nanmean(gini))
    out["gini_by_step"] = _nanmean(gini, axis=(1, 2)).tolist()
    out["gini_by_block"] = _nanmean(gini, axis=(0, 2)).tolist()
    return out


def check_few_tokens_change_a_lot(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                                  min_top10_share: float = 0.25) -> dict:
    """Observation 1: do many tokens change little while a minority change a lot?

    Verdict: holds when the top 10% of tokens of a (step, block, sample) map carry on average at
    least ``min_top10_share`` of its total change (default 0.25, 2.5x the 0.10 of equal change; an
    exponential spread of change gives 0.33, a uniform spread on [0, max] gives 0.19). The Gini
    coefficient and the fractions below 1/5/10% are reported beside it.
    """
    conc = measure_change_concentration(record, measure, TOP_FRACTIONS, branch)
    dist = summarise_change_distribution(record, measure, THRESHOLDS, QUANTILES, branch)
    top10, top20, gini = conc["top_share"]["10pct"], conc["top_share"]["20pct"], conc["gini"]
    holds = bool(np.isfinite(top10) and top10 >= min_top10_share)
    below5 = dist["fraction_below"]["below_5pct"]
    verdict = (f"{'HOLDS' if holds else 'DOES NOT HOLD'} for {measure}: the top 10% of tokens carry "
               f"{top10:.1%} of the change (equal change: 10%; criterion >= {min_top10_share:.0%}), the top 20% "
               f"carry {top20:.1%}, Gini {gini:.2f}; {below5:.1%} of token updates move < 5%.")
    return {"observation": OBSERVATION_NAMES["few_tokens_change_a_lot"], "measure": measure, "holds": holds,
            "verdict": verdict, "criterion": {"min_top10_share": min_top10_share},
            "top10pct_share": top10, "top20pct_share": top20, "gini": gini,
            "fraction_below": dist["fraction_below"], "median_change": dist["median"],
            "q90_change": dist["quantiles"].get("q90"),
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


def rank_correlation_by_distance(record: TokenChangeRecord, measure: str = "out_change",
                                 distances: Sequence[int] | None = None, branch: str = "cond") -> dict:
    """Does the map of *which* tokens change persist from step to step, and for how long?

    For every block and sample, the per-token change map at step ``s`` is compared with the map of
    the same block and sample at step ``s + d`` by Spearman rank correlation (1 = the same order of
    tokens, 0 = unrelated). Averaged over blocks, samples and starting steps ``s`` (all ``s > 0``
    with ``s + d`` recorded), for each distance ``d`` (default 1, 2, 4, 8, ... up to the longest
    available). High at ``d = 1`` means the last step predicts the next (the premise of reusing a
    token's cached update); a slow decay with ``d`` says the ranking mostly reflects a fixed spatial
    layout rather than a short memory.

    Returns ``distances``, ``mean`` (per distance), ``std`` (over the (s, block, sample) triples),
    ``pairs`` (number of triples), ``by_block`` ([distance][block] means) and ``adjacent_by_step``
    {'step': s, 'corr': mean corr of steps s-1 and s} for the adjacent pairs.
    """
    vals, steps = select_change_steps(record, measure, branch)  # (S', L, B, N)
    z = _normalised_ranks(vals)  # (S', L, B, N)
    max_d = int(steps.max() - steps.min()) if len(steps) > 1 else 0
    distances = _default_distances(max_d) if distances is None else [int(d) for d in distances]
    if any(d < 1 for d in distances):
        raise ValueError(f"distances must be >= 1 step, got {list(distances)}")
    out = {"measure": measure, "branch": branch, "distances": [], "mean": [], "std": [], "pairs": [],
           "by_block": []}
    for d in distances:
        i, j = _pairs(steps, d)
        if len(i) == 0:
            continue
        corr = np.sum(z[i] * z[j], axis=-1)  # (P, L, B) Spearman correlation per (s, block, sample)
        out["distances"].append(d)
        out["mean"].append(float(_nanmean(corr)))
        out["std"].append(float(np.nanstd(corr)) if np.isfinite(corr).any() else math.nan)
        out["pairs"].append(int(np.isfinite(corr).sum()))
        out["by_block"].append(_nanmean(corr, axis=(0, 2)).tolist())
    i, j = _pairs(steps, 1)
    adj = _nanmean(np.sum(z[i] * z[j], axis=-1), axis=(1, 2)) if len(i) else np.zeros(0)
    out["adjacent_by_step"] = {"step": steps[j].tolist(), "corr": adj.tolist()}
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
                                    min_adjacent_corr: float = 0.5, min_decay: float = 0.05) -> dict:
    """Observation 2: is which tokens change strongly correlated between adjacent steps?

    Verdict: holds when the mean Spearman correlation of adjacent steps' change maps is at least
    ``min_adjacent_corr`` (default 0.5) **and** exceeds the correlation at the largest recorded
    distance by at least ``min_decay`` (default 0.05): the last step is a better predictor than an
    old one, which is what a step-to-step cache exploits. Undetermined (``holds`` None) when the
    record has fewer than two steps with change values.
    """
    rc = rank_correlation_by_distance(record, measure, None, branch)
    ov = measure_top_token_overlap(record, measure, 0.2, None, branch)
    name = OBSERVATION_NAMES["adjacent_steps_correlated"]
    if not rc["distances"] or rc["distances"][0] != 1:
        return {"observation": name, "measure": measure, "holds": None,
                "verdict": f"UNDETERMINED for {measure}: fewer than two consecutive steps with change values.",
                "adjacent_rank_corr": None, "far_rank_corr": None, "far_distance": None,
                "rank_corr_by_distance": rc, "top20pct_overlap": ov}
    adj, far, far_d = rc["mean"][0], rc["mean"][-1], rc["distances"][-1]
    decays = bool(len(rc["distances"]) > 1 and adj - far >= min_decay)
    high = bool(np.isfinite(adj) and adj >= min_adjacent_corr)
    holds = high and decays
    trend = (f"falls to {far:.2f} at distance {far_d} steps" if len(rc["distances"]) > 1
             else "no longer distance recorded")
    verdict = (f"{'HOLDS' if holds else 'DOES NOT HOLD'} for {measure}: rank correlation of adjacent steps' "
               f"change maps {adj:.2f} (criterion >= {min_adjacent_corr}), {trend} "
               f"({'decays' if decays else 'does not decay by'} >= {min_decay}); "
               f"{ov['overlap'][0]:.0%} of the top-20% tokens stay top-20% at the next step (chance {ov['chance']:.0%}).")
    return {"observation": name, "measure": measure, "holds": holds, "verdict": verdict,
            "criterion": {"min_adjacent_corr": min_adjacent_corr, "min_decay": min_decay},
            "adjacent_rank_corr": adj, "far_rank_corr": far if len(rc["distances"]) > 1 else None,
            "far_distance": far_d if len(rc["distances"]) > 1 else None, "decays_with_distance": decays,
            "rank_corr_by_distance": rc, "top20pct_overlap": ov}


# ---- observation 3: phases -----------------------------------------------------------------------

def per_step_mean_change(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond") -> np.ndarray:
    """(S,) mean of ``measure`` over blocks, samples and tokens per step index (NaN at step 0)."""
    return _nanmean(record.select(measure, branch), axis=(1, 2, 3))


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
    # fit on a winsorised copy (5th-95th percentile) of longer curves, so one outlying step cannot
    # decide the split; the phase means below are of the measured values
    yf = np.clip(y, *np.quantile(y, [0.05, 0.95])) if len(y) >= 20 else y
    c1, c2 = np.cumsum(yf), np.cumsum(yf * yf)
    m = max(1, int(round(min_phase_fraction * len(y))))
    if 2 * m > len(y):
        m = max(1, len(y) // 2)
    k = np.arange(m, len(y) - m + 1)  # allowed sizes of the first segment
    n2 = len(y) - k
    s1, q1 = c1[k - 1], c2[k - 1]
    s2, q2 = c1[-1] - s1, c2[-1] - q1
    sse = (q1 - s1 * s1 / k) + (q2 - s2 * s2 / n2)  # (S-1,) within-segment sums of squares
    sse = np.maximum(sse, 0.0)
    best = int(np.argmin(np.round(sse, 12)))  # round: float noise must not decide ties
    kb = int(k[best])
    sse0 = float(np.sum((yf - yf.mean()) ** 2))
    return {"split_step": int(idx[kb]), "phase1_steps": [int(idx[0]), int(idx[kb - 1])],
            "phase2_steps": [int(idx[kb]), int(idx[-1])], "phase1_mean": float(y[:kb].mean()),
            "phase2_mean": float(y[kb:].mean()), "sse": float(sse[best]), "sse_one_phase": sse0,
            "variance_explained": float(1 - sse[best] / sse0) if sse0 > 0 else None}


def check_uneven_over_trajectory(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                                 min_phase_ratio: float = 1.5, min_variance_explained: float = 0.5) -> dict:
    """Observation 3: is the amount of change uneven over the trajectory, in two phases?

    Fits two phases to the per-step mean change (:func:`detect_phase_split`). Verdict: holds when
    the phases' mean change differs by at least ``min_phase_ratio`` (default 1.5x) and the split
    explains at least ``min_variance_explained`` of the curve's variance (default 0.5).

    The TPRR suggestion (spec ``tprr(K1, K2, split)``): ``split = split_step / S``, so that
    ``ceil(split * S)`` is the first step of phase 2; the phase with the *smaller* change can use
    the longer full-step interval (``longer_interval_phase``: 'first' means K1 > K2, the order the
    paper's summaries report). For an SDEdit record, S and the split refer to the shortened
    trajectory that was run.
    """
    curve = per_step_mean_change(record, measure, branch)  # (S,)
    split = detect_phase_split(curve, record.steps)
    name = OBSERVATION_NAMES["uneven_over_trajectory"]
    base = {"observation": name, "measure": measure, "per_step_mean": curve.tolist(),
            "steps": record.steps.tolist(), "t": [timestep_of(record, int(s)) for s in record.steps], **split}
    if split["split_step"] is None:
        return {**base, "holds": None, "verdict": f"UNDETERMINED for {measure}: fewer than two steps with change "
                "values, no phases to find.", "suggested_tprr_split": None, "longer_interval_phase": None,
                "phase_mean_ratio": None, "split_fraction": None, "split_t": None}
    m1, m2 = split["phase1_mean"], split["phase2_mean"]
    ratio = max(m1, m2) / min(m1, m2) if min(m1, m2) > 0 else math.inf
    r2 = split["variance_explained"] if split["variance_explained"] is not None else 0.0
    holds = bool(ratio >= min_phase_ratio and r2 >= min_variance_explained)
    s_split = split["split_step"]
    frac = s_split / record.num_steps
    t_split = timestep_of(record, s_split)
    longer = "first" if m1 < m2 else "second"
    finite = curve[np.isfinite(curve)]
    cv = float(finite.std() / finite.mean()) if finite.mean() > 0 else None
    t_text = f", t = {t_split:g}" if t_split is not None else ""
    verdict = (f"{'HOLDS' if holds else 'DOES NOT HOLD'} for {measure}: two phases split at step {s_split} of "
               f"{record.num_steps} ({frac:.0%} of the trajectory{t_text}); mean change {m1:.3g} before vs {m2:.3g} "
               f"after ({ratio:.2f}x, criterion >= {min_phase_ratio}x), the split explains {r2:.0%} of the per-step "
               f"variance (criterion >= {min_variance_explained:.0%}). Suggested tprr split {frac:.2f} with the "
               f"longer interval in the {longer} phase.")
    return {**base, "holds": holds, "verdict": verdict,
            "criterion": {"min_phase_ratio": min_phase_ratio, "min_variance_explained": min_variance_explained},
            "split_fraction": frac, "split_t": t_split, "phase_mean_ratio": ratio,
            "suggested_tprr_split": frac, "longer_interval_phase": longer, "coefficient_of_variation": cv}


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


def analyse_record(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond") -> dict:
    """Every analysis of one record: distribution (both change measures), the three observations
    (for both change measures; ``measure`` is the primary one the headline uses), block importance.
    Plain JSON values; NaN becomes None."""
    if measure not in CHANGE_MEASURES:
        raise ValueError(f"measure must be one of {list(CHANGE_MEASURES)} (a change between steps), got {measure!r}")
    out = {"primary_measure": measure, "record": describe_record(record, branch), "distribution": {},
           "observations": {}}
    for m in CHANGE_MEASURES:
        out["distribution"][m] = summarise_change_distribution(record, m, branch=branch)
        out["observations"][m] = {
            "few_tokens_change_a_lot": check_few_tokens_change_a_lot(record, m, branch),
            "adjacent_steps_correlated": check_adjacent_steps_correlated(record, m, branch),
            "uneven_over_trajectory": check_uneven_over_trajectory(record, m, branch),
        }
    out["block_importance"] = measure_block_importance(record, branch)
    return to_plain(out)


def _headline_of(analysis: dict, prefix: str = "") -> dict:
    m = analysis["primary_measure"]
    obs = analysis["observations"][m]
    o1, o2, o3 = obs["few_tokens_change_a_lot"], obs["adjacent_steps_correlated"], obs["uneven_over_trajectory"]
    fb = analysis["distribution"][m]["fraction_below"]
    return {f"{prefix}frac_tokens_below_5pct": fb["below_5pct"], f"{prefix}top10pct_change_share": o1["top10pct_share"],
            f"{prefix}adjacent_rank_corr": o2["adjacent_rank_corr"], f"{prefix}far_rank_corr": o2["far_rank_corr"],
            f"{prefix}suggested_tprr_split": o3["suggested_tprr_split"],
            f"{prefix}phase_mean_ratio": o3["phase_mean_ratio"]}


def summarise_redundancy(record: TokenChangeRecord, sdedit_record: TokenChangeRecord | None = None,
                         measure: str = "out_change", branch: str = "cond") -> dict:
    """The redundancy notebook's ``summary``: do the three observations hold on this model?

    ``record`` holds pure samples (from noise); ``sdedit_record`` (optional) the same model denoising
    noised in-house images (SDEdit), so the answer can be checked on the data the team cares about.
    Keys:

    - ``headline``: flat scalars for ``reports/index.html`` (primary ``measure``): ``frac_tokens_below_5pct``,
      ``top10pct_change_share``, ``gini``, ``adjacent_rank_corr``, ``far_rank_corr``, ``far_distance``,
      ``suggested_tprr_split``, ``phase_mean_ratio``, ``obs1_holds``/``obs2_holds``/``obs3_holds``,
      and with SDEdit ``sdedit_frac_tokens_below_5pct``, ``sdedit_top10pct_change_share``,
      ``sdedit_adjacent_rank_corr``, ``sdedit_suggested_tprr_split``;
    - ``primary_measure``, ``observations`` {measure: {observation: verdict dict}} (verdicts as
      sentences with the numbers, ``holds`` True/False/None), ``distribution`` {measure: ...},
      ``block_importance``, ``record`` (what was analysed);
    - ``sdedit``: the same analysis of the SDEdit record (no headline), and ``comparison``
      {number: {'samples': x, 'sdedit': y}}.

    Everything is plain JSON (floats, ints, bools, strings, lists, dicts; NaN -> None).
    """
    main = analyse_record(record, measure, branch)
    obs = main["observations"][measure]
    head = _headline_of(main)
    o1 = obs["few_tokens_change_a_lot"]
    head.update(gini=o1["gini"], far_distance=obs["adjacent_steps_correlated"]["far_distance"],
                obs1_holds=o1["holds"], obs2_holds=obs["adjacent_steps_correlated"]["holds"],
                obs3_holds=obs["uneven_over_trajectory"]["holds"])
    summary = {"headline": head, **main}
    if sdedit_record is not None:
        sd = analyse_record(sdedit_record, measure, branch)
        sd_head = _headline_of(sd, "sdedit_")
        for k in ("sdedit_frac_tokens_below_5pct", "sdedit_top10pct_change_share", "sdedit_adjacent_rank_corr",
                  "sdedit_suggested_tprr_split"):
            head[k] = sd_head[k]
        summary["sdedit"] = sd
        summary["comparison"] = {k: {"samples": v, "sdedit": sd_head["sdedit_" + k]}
                                 for k, v in _headline_of(main).items()}
    summary = to_plain(summary)
    summary["report"] = redundancy_report(summary).to_dict()
    return summary


#: Short names of the observations for a report's findings.
_OBSERVATION_SHORT = {
    "few_tokens_change_a_lot": "1. Few tokens carry most of the change",
    "adjacent_steps_correlated": "2. Which tokens change is predictable from the last step",
    "uneven_over_trajectory": "3. Change is uneven over the trajectory",
}


def _criterion_text(key: str, criterion: Mapping) -> str:
    """The rule of an observation's verdict, in words."""
    if key == "few_tokens_change_a_lot":
        return (f"the top 10 % of tokens carry at least {criterion.get('min_top10_share', 0.25):.0%} of the total "
                "change (10 % if every token changed equally)")
    if key == "adjacent_steps_correlated":
        return (f"rank correlation of adjacent steps' change maps at least {criterion.get('min_adjacent_corr', 0.5):g}, "
                f"and at least {criterion.get('min_decay', 0.05):g} lower at the far distance")
    return (f"a two-phase split with a mean-change ratio of at least {criterion.get('min_phase_ratio', 1.5):g}x that "
            f"explains at least {criterion.get('min_variance_explained', 0.5):.0%} of the per-step variance")


def _observation_sentence(key: str, obs: Mapping) -> str:
    """One sentence with the numbers behind an observation's verdict."""
    def num(name: str, fmt: str = ".2f") -> str:
        v = obs.get(name)
        return "-" if v is None else format(v, fmt)

    if obs.get("holds") is None:
        return str(obs.get("verdict", "")).split(": ", 1)[-1]
    if key == "few_tokens_change_a_lot":
        return (f"The top 10 % of tokens carry {num('top10pct_share', '.1%')} of the change "
                f"(top 20 %: {num('top20pct_share', '.1%')}; Gini {num('gini')}).")
    if key == "adjacent_steps_correlated":
        far = (f"{obs['far_distance']} steps apart, {num('far_rank_corr')}" if obs.get("far_distance") is not None
               and obs.get("far_rank_corr") is not None else "too few steps to measure it further apart")
        return f"Adjacent steps' change maps have rank correlation {num('adjacent_rank_corr')}; {far}."
    t = obs.get("split_t")
    m1, m2 = obs.get("phase1_mean"), obs.get("phase2_mean")
    busier = ("the later phase changes {r}x as much as the earlier one" if m1 is None or m2 is None or m2 >= m1
              else "the earlier phase changes {r}x as much as the later one")
    return (f"The change splits into two phases at step {obs.get('split_step', '?')}"
            + (f" (t = {t:g})" if isinstance(t, (int, float)) else "")
            + "; " + busier.format(r=num("phase_mean_ratio", ".2g")) + ".")


def observation_findings(part: Mapping, group: str) -> list[Finding]:
    """The three observations of a :func:`analyse_record` result as report findings under ``group``."""
    m = part["primary_measure"]
    out = []
    for key, short in _OBSERVATION_SHORT.items():
        obs = part["observations"][m][key]
        out.append(Finding(f"{short}. {_observation_sentence(key, obs)}", verdict_of(obs.get("holds")),
                           _criterion_text(key, obs.get("criterion") or {}), group))
    return out


def redundancy_report(summary: Mapping):
    """The first screen of a redundancy report (:class:`tclab.report.ReportSummary`) from a
    :func:`summarise_redundancy` summary: each observation's verdict on the pure samples and, when
    traced, on SDEdit of the in-house images; the numbers behind them."""
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
            ("suggested_tprr_split", "suggested TPRR split (share of the steps)", ""),
            ("sdedit_top10pct_change_share", "SDEdit: share of the change carried by the top 10 %", "%"),
            ("sdedit_adjacent_rank_corr", "SDEdit: rank correlation of adjacent steps", "")]
    return ReportSummary(findings=findings, key_numbers=key_numbers_from(head, spec),
                         index_keys=["top10pct_change_share", "adjacent_rank_corr", "phase_mean_ratio"],
                         question="Do TokenCache's three observations (few tokens change a lot; which ones is "
                                  "predictable; change comes in phases) hold on this model and these images?")


def describe_observations(summary: dict) -> str:
    """The verdicts of a :func:`summarise_redundancy` summary as readable lines (for the notebook)."""
    lines = []
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
