"""Figures of token redundancy: each function takes records (and images) and RETURNS a figure.

Readable without the code: every axis says what it shows and in which unit; a step axis is the
step index ``s`` (0 = first, noisiest step) and, where it helps, a second axis on the opposite side
gives the scheduler's timestep value ``t`` of the same steps (never one axis for both). Change is
the relative change of :mod:`tclab.record` (``||dx|| / ||x||``; 0.05 = 5%).

The functions use ``matplotlib.pyplot`` so figures show inline in notebooks; nothing is set at
import (no backend, no style, no rc flags). Without a display, matplotlib picks its Agg backend
by itself; scripts that save many figures should ``plt.close(fig)`` them. Save with
``run.save_figure(fig, name)`` (:mod:`tclab.runs`).

Every statistical figure is drawn in one look, :data:`THEME` (a seaborn style, context and
palette), applied only while that figure is built (its own keys set and put back): your own rcParams and
style are the same before and after, and your other figures never take tclab's look. Seaborn draws
where it computes something for the figure (the step x block heatmap, the histograms and ECDFs);
curves and Pareto points whose intervals tclab computed itself (bootstrap over samples, paired
sweeps) are drawn with matplotlib, so the bands shown are exactly the ones the reports quote.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from . import analysis

if TYPE_CHECKING:
    from .record import TokenChangeRecord

CHANGE_LABEL = {
    "out_change": "relative change of block output ||Δx||/||x||",
    "update_change": "relative change of block update ||Δu||/||u||",
    "update_ratio": "update ratio ||u||/||x|| (block importance)",
    "cos": "cosine of update with previous step's",
}
STEP_LABEL = "step index s (0 = noisiest)"
T_LABEL = "timestep t (scheduler value)"

#: The one look of tclab's figures: seaborn's ``style`` / ``context`` (fonts scaled by ``font_scale``)
#: / ``palette`` (the colour cycle: ``C0``, ``C1``, ... and :func:`curve_colors`), then ``rc`` on top
#: (tick marks kept on the step and timestep axes, where a tick says which step is which ``t``).
#: ``curve_order``: the palette's colours in the order :func:`curve_colors` hands them to a sweep's
#: curves, the most distinct first (colorblind's vermilion, next to its orange, comes late).
#: Applied per figure, never globally: see :func:`theme_rc`.
THEME = MappingProxyType({
    "style": "whitegrid",
    "context": "notebook",
    "font_scale": 0.85,
    "palette": "colorblind",
    "curve_order": (0, 1, 2, 4, 5, 9, 3, 7, 6, 8),
    "rc": MappingProxyType({"xtick.bottom": True, "ytick.left": True, "xtick.major.size": 3.5,
                            "ytick.major.size": 3.5, "axes.edgecolor": ".6", "legend.framealpha": 0.85}),
})


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _sns():
    import seaborn as sns

    return sns


def theme_palette() -> list:
    """The colours of :data:`THEME`'s palette, in cycle order (RGB tuples)."""
    return list(_sns().color_palette(THEME["palette"]))


def theme_rc() -> dict:
    """The rcParams of :data:`THEME`, e.g. for ``with matplotlib.rc_context(theme_rc()):`` in your own code.
    Every figure function here sets them around its own drawing and puts them back; nothing stays set."""
    from cycler import cycler

    sns = _sns()
    rc = {**sns.axes_style(THEME["style"]), **sns.plotting_context(THEME["context"], THEME["font_scale"])}
    rc["axes.prop_cycle"] = cycler(color=theme_palette())
    rc.update(THEME["rc"])
    return rc


def _themed(fn):
    """Build the figure with :func:`theme_rc` set: every artist (ticks and their labels included:
    matplotlib makes later ticks from the first) takes the theme, and the caller's rcParams are restored
    on the way out, so the figure keeps tclab's look when shown later under the caller's own style."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib as mpl

        # Not matplotlib.rc_context: it restores *every* rcParam, the backend too, and entered before pyplot
        # has resolved its backend (the first figure of a kernel), it puts back the "not yet chosen" marker,
        # so Jupyter's inline backend is dropped and the next figures of the notebook are never shown.
        # Only the theme's own keys are set, and put back.
        rc = theme_rc()
        _plt()
        saved = {k: mpl.rcParams[k] for k in rc}
        mpl.rcParams.update(rc)
        try:
            return fn(*args, **kwargs)
        finally:
            mpl.rcParams.update(saved)

    return wrapper


def _records(records) -> dict[str, TokenChangeRecord]:
    if hasattr(records, "out_change") and hasattr(records, "timesteps"):  # one TokenChangeRecord
        return {"": records}
    if not isinstance(records, Mapping) or not records:
        raise TypeError("pass a TokenChangeRecord or a non-empty dict {label: TokenChangeRecord}")
    return dict(records)


def _to_rgb(images) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] (torch or numpy) -> (N, H, W, 3) floats in [0, 1] for imshow."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got shape {a.shape}")
    return np.clip((a.transpose(0, 2, 3, 1) + 1) / 2, 0, 1)


def _tick_steps(steps: np.ndarray, max_ticks: int = 11) -> np.ndarray:
    """Every step when there are few, else every k-th step from 0 (k = 2, 5, 10, ...: round numbers)."""
    if len(steps) <= max_ticks:
        return steps
    span = int(steps[-1] - steps[0])
    stride = next(k for k in (2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000) if span / k < max_ticks)
    return steps[(steps - steps[0]) % stride == 0]


def _add_timestep_axis(ax, record: TokenChangeRecord, which: str = "x", offset: float = 0.0) -> None:
    """A second axis (top for x, right for y) labelling the same steps with their timestep ``t``
    (``offset``: where step s sits is s + offset, e.g. 0.5 for the cell centres of a seaborn heatmap)."""
    t = record.timesteps
    if not np.isfinite(t).all():
        return  # t unknown: leave the step axis alone rather than print NaNs
    ticks = _tick_steps(record.steps)
    sec = ax.secondary_xaxis("top") if which == "x" else ax.secondary_yaxis("right")
    (sec.set_xticks if which == "x" else sec.set_yticks)(ticks + offset, [f"{t[s]:g}" for s in ticks])
    (sec.set_xlabel if which == "x" else sec.set_ylabel)(T_LABEL)


def _step_ticks(ax, record: TokenChangeRecord, which: str = "x", offset: float = 0.0) -> None:
    ticks = _tick_steps(record.steps)
    (ax.set_xticks if which == "x" else ax.set_yticks)(ticks + offset, [f"{int(s)}" for s in ticks])


# ---- step x block -------------------------------------------------------------------------------

@_themed
def plot_change_heatmap(record: TokenChangeRecord, measures: Sequence[str] = analysis.CHANGE_MEASURES,
                        branch: str = "cond", title: str | None = None):
    """Step x block heatmap of the mean change (over samples and tokens), one panel per measure
    (``seaborn.heatmap``: one cell per (step, block), with thin white lines between cells where the
    cells are large enough to take them).

    Rows are step indices (step 0 is blank: no previous step), columns blocks; the right axis gives
    each step's timestep t. Bright cells are where tokens move most between adjacent steps.
    """
    plt, sns = _plt(), _sns()
    measures = [measures] if isinstance(measures, str) else list(measures)
    fig, axes = plt.subplots(1, len(measures), figsize=(4.6 * len(measures), 0.28 * record.num_steps + 2.4),
                             squeeze=False, layout="constrained")
    for ax, m in zip(axes[0], measures):
        mat = record.mean_over(m, ("sample", "token"), branch)  # (S, L); NaN rows (step 0) are left blank
        # the colour bar below its own panel: on the left it sat against the neighbour's timestep axis
        few = record.num_steps <= 30 and record.num_blocks <= 16  # cells wide enough for separating lines
        sns.heatmap(mat, ax=ax, cmap="magma", linewidths=0.4 if few else 0, linecolor="white",
                    xticklabels=False, yticklabels=False, square=False,
                    cbar_kws=dict(label=f"mean {CHANGE_LABEL.get(m, m)}", shrink=0.9, location="bottom", pad=0.02,
                                  aspect=30))
        ax.grid(False)  # the cells are the grid (the theme's lines would show through the blank step-0 row)
        ax.set_xlabel("block index l (0 = first)")
        ax.set_ylabel(STEP_LABEL)
        blocks = _tick_steps(np.arange(record.num_blocks), max_ticks=16)  # every block, or every k-th of many
        ax.set_xticks(blocks + 0.5, [str(b) for b in blocks])
        _step_ticks(ax, record, "y", offset=0.5)
        _add_timestep_axis(ax, record, "y", offset=0.5)
        for s in np.flatnonzero(~np.isfinite(mat).any(axis=1)):
            ax.text(record.num_blocks / 2, s + 0.5, "no previous step" if s == 0 else "not recorded",
                    ha="center", va="center", fontsize=7, color="0.45")
        ax.set_title(m)
    fig.suptitle(title or f"Mean change between adjacent steps, per step and block ({branch} branch)")
    return fig


# ---- curves -------------------------------------------------------------------------------------

@_themed
def plot_change_curves(record: TokenChangeRecord, measure: str = "out_change", branch: str = "cond",
                       title: str | None = None):
    """Left: per-step mean change (one thin line per block, bold = all blocks, with its 95 % bootstrap
    band over samples) with the detected two-phase split (dashed line) and the phase means, and the
    split fitted without the final step (dotted) where it differs. Right: per-block importance (mean
    update ratio, bars) and per-block mean change (markers)."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained", width_ratios=(1.6, 1))
    per_block = record.mean_over(measure, ("sample", "token"), branch)  # (S, L)
    band = analysis.per_step_mean_change_interval(record, measure, branch)
    curve = band["mean"]  # (S,)
    steps = record.steps
    cmap = plt.get_cmap("viridis")
    for l in range(record.num_blocks):
        ax.plot(steps, per_block[:, l], lw=1, alpha=0.8, color=cmap(l / max(1, record.num_blocks - 1)),
                label=f"block {l}")
    ax.plot(steps, curve, color="black", lw=2.5, marker="o", ms=3, label="all blocks")
    if np.isfinite(band["low"]).any():
        ax.fill_between(steps, band["low"], band["high"], color="black", alpha=0.15, lw=0,
                        label=f"95% interval over the {band['samples']} samples")
    split = analysis.detect_phase_split(curve, steps)
    if split["split_step"] is not None:
        s2 = split["split_step"]
        ax.axvline(s2 - 0.5, color="tab:red", ls="--", lw=1.5,
                   label=f"phase split: phase 2 starts at s={s2} ({s2 / record.num_steps:.0%})")
        (a0, a1), (b0, b1) = split["phase1_steps"], split["phase2_steps"]
        ax.hlines([split["phase1_mean"], split["phase2_mean"]], [a0 - 0.4, b0 - 0.4], [a1 + 0.4, b1 + 0.4],
                  colors="tab:red", lw=3, alpha=0.5, label="phase means")
        finite = np.flatnonzero(np.isfinite(curve))
        if len(finite) >= 3:  # the split without the final step, which often jumps (t = 0)
            wo = analysis.detect_phase_split(curve[finite[:-1]], steps[finite[:-1]])
            if wo["split_step"] is not None and wo["split_step"] != s2:
                ax.axvline(wo["split_step"] - 0.5, color="tab:orange", ls=":", lw=1.8,
                           label=f"split without the final step: s={wo['split_step']}")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(f"mean {CHANGE_LABEL.get(measure, measure)}")
    _step_ticks(ax, record)
    _add_timestep_axis(ax, record, "x")
    ax.legend(fontsize=7, ncol=2)

    imp = analysis.measure_block_importance(record, branch)
    blocks = np.arange(record.num_blocks)
    bx.bar(blocks, imp["update_ratio"], color="0.75", label="mean update ratio ||u||/||x||")
    bx.set_xlabel("block index l (0 = first)")
    bx.set_ylabel("mean update ratio ||u||/||x|| (importance)")
    bx.set_xticks(blocks)
    bx.grid(False, axis="x")
    cx = bx.twinx()
    cx.grid(False)  # one grid per panel (the bars' axis), not two that do not line up
    for m, mk in zip(analysis.CHANGE_MEASURES, ("o", "s")):
        cx.plot(blocks, imp[m], marker=mk, lw=1.5, label=f"mean {m} (steps > 0)")
    cx.set_ylabel("mean relative change between steps")
    h1, l1 = bx.get_legend_handles_labels()
    h2, l2 = cx.get_legend_handles_labels()
    bx.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
    fig.suptitle(title or f"Where along the trajectory (left: per step) and in which blocks (right) tokens change "
                 f"({measure}, {branch})")
    return fig


# ---- token maps ---------------------------------------------------------------------------------

def plot_token_maps(record: TokenChangeRecord, images, measure: str = "out_change", steps: Sequence[int] | None = None,
                    blocks: Sequence[int] | None = None, samples: Sequence[int] | None = None, branch: str = "cond",
                    title: str | None = None):
    """The per-token change on the token grid (e.g. 16x16) next to the image it belongs to.

    One row per sample id (``images[i]`` is sample id ``i``: (N, 3, H, W) in [-1, 1], e.g.
    ``SampleResult.images``); first column the final image, then one map per (step, block). Defaults:
    three steps spread over s > 0 (early, middle, last), the first and last block, up to 4 samples.
    One colour scale for the whole figure (clipped at the 99th percentile) so panels compare.
    """
    plt = _plt()
    rgb = _to_rgb(images)
    vals, valid_steps = analysis.select_change_steps(record, measure, branch)
    if steps is None:
        pick = np.unique(np.round(np.linspace(0, len(valid_steps) - 1, min(3, len(valid_steps)))).astype(int))
        steps = [int(valid_steps[i]) for i in pick]
    blocks = [0, record.num_blocks - 1] if blocks is None else list(blocks)
    blocks = sorted(set(b % record.num_blocks for b in blocks))
    ids = np.sort(record.sample_id[record.rows(branch)])
    samples = ids[: min(4, len(ids))].tolist() if samples is None else list(samples)
    if max(samples) >= len(rgb):
        raise ValueError(f"sample id {max(samples)} has no image: {len(rgb)} images given (images[i] must be "
                         "sample id i, as returned by the sample() call that was recorded)")
    panels = [(s, b) for s in steps for b in blocks]
    maps = np.stack([[record.token_map(measure, s, b, i, branch) for s, b in panels] for i in samples])
    vmax = float(np.nanpercentile(maps, 99)) if np.isfinite(maps).any() else 1.0
    ncol = 1 + len(panels)
    fig, axes = plt.subplots(len(samples), ncol, figsize=(1.7 * ncol + 1.0, 1.75 * len(samples) + 0.9),
                             squeeze=False, layout="constrained")
    t = record.timesteps
    im = None
    for r, i in enumerate(samples):
        ax = axes[r, 0]
        ax.imshow(rgb[i], interpolation="nearest")
        ax.set_title(f"sample {i} (class {record.class_labels[record.row_of(i, branch)]})", fontsize=8)
        for c, (s, b) in enumerate(panels, start=1):
            ax = axes[r, c]
            im = ax.imshow(maps[r, c - 1], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            if r == 0:
                tt = f", t={t[s]:g}" if np.isfinite(t[s]) else ""
                ax.set_title(f"s={s}{tt}\nblock {b}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1, 1].set_xlabel(f"token grid {record.grid[0]}x{record.grid[1]} (one cell = one patch)", fontsize=8,
                           loc="left")
    fig.colorbar(im, ax=axes[:, 1:], label=CHANGE_LABEL.get(measure, measure), shrink=0.8)
    fig.suptitle(title or f"Which tokens change: {measure} per token vs the previous step ({branch})")
    return fig


# ---- distribution -------------------------------------------------------------------------------

@_themed
def plot_change_distribution(record: TokenChangeRecord, measures: Sequence[str] = analysis.CHANGE_MEASURES,
                             thresholds: Sequence[float] = analysis.THRESHOLDS, branch: str = "cond",
                             title: str | None = None):
    """Distribution of the per-token change over all (step > 0, block, sample, token): a log-x
    histogram (left) and the cumulative fraction below each value (right) with the 1% / 5% / 10%
    thresholds marked and the fraction below each written in the legend (``seaborn.histplot`` with
    log-spaced bins, ``seaborn.ecdfplot``). Values at or below 0 sit in the lowest bin."""
    plt, sns = _plt(), _sns()
    measures = [measures] if isinstance(measures, str) else list(measures)
    fig, (hx, cx) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for k, m in enumerate(measures):
        vals, _ = analysis.select_change_steps(record, m, branch)
        v = vals[np.isfinite(vals)]
        pos = v[v > 0]
        lo = max(pos.min(), 1e-6) if len(pos) else 1e-6
        hi = max(v.max(), lo * 10)
        x = np.clip(v, lo, None)
        # 59 log-spaced bins from the smallest positive change; each measure's bars sum to 1
        sns.histplot(x=x, ax=hx, bins=59, binrange=(np.log10(lo), np.log10(hi)), log_scale=True, stat="probability",
                     element="step", fill=False, lw=1.5, color=f"C{k}", label=m)
        fr = ", ".join(f"<{th:.0%}: {np.mean(v < th):.1%}" for th in thresholds)
        sns.ecdfplot(x=x, ax=cx, log_scale=True, lw=1.5, color=f"C{k}", label=f"{m} ({fr})")
    for ax in (hx, cx):
        ax.set_xscale("log")
        for th, ls in zip(thresholds, (":", "--", "-.")):
            ax.axvline(th, color="0.4", ls=ls, lw=1)
        ax.set_xlabel("relative change between adjacent steps (log scale; 0.05 = 5%)")
    hx.set_ylabel("fraction of (step, block, sample, token) entries")
    cx.set_ylabel("cumulative fraction below x")
    cx.set_ylim(0, 1)
    hx.legend(fontsize=8)
    cx.legend(fontsize=7, loc="upper left")
    hx.set_title("histogram (grey lines: 1%, 5%, 10%)")
    cx.set_title("cumulative distribution")
    fig.suptitle(title or f"How much tokens change between adjacent steps ({branch} branch, steps s > 0)")
    return fig


# ---- rank correlation ---------------------------------------------------------------------------

@_themed
def plot_rank_correlation(records, measure: str = "out_change", branch: str = "cond", title: str | None = None):
    """Left: Spearman rank correlation of per-token change maps at steps s and s + d vs the step
    distance d (mean over blocks, samples and s, with its 95 % bootstrap band over samples; thin
    lines per block). Right: the share of the top-20% changing tokens of step s still in the top 20%
    at s + d, with the chance level. ``records`` is a record or {label: record} (e.g. pure samples
    and SDEdit traces, overlaid)."""
    plt = _plt()
    recs = _records(records)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    chance = None
    ticks: set[int] = set()
    for k, (label, rec) in enumerate(recs.items()):
        color = f"C{k}"
        rc = analysis.rank_correlation_by_distance(rec, measure, None, branch)
        ov = analysis.measure_top_token_overlap(rec, measure, 0.2, None, branch)
        if not rc["distances"]:
            continue
        ticks |= {int(d) for d in rc["distances"]} | {int(d) for d in ov["distances"]}
        d = np.asarray(rc["distances"])
        by_block = np.asarray(rc["by_block"])  # (D, L)
        for l in range(by_block.shape[1]):
            ax.plot(d, by_block[:, l], color=color, lw=0.7, alpha=0.35)
        ax.plot(d, rc["mean"], color=color, lw=2.2, marker="o", label=f"{label} mean over blocks".strip())
        ci = np.asarray([[np.nan, np.nan] if c is None else c for c in rc["mean_ci"]], dtype=float)  # (D, 2)
        if np.isfinite(ci).any():
            ax.fill_between(d, ci[:, 0], ci[:, 1], color=color, alpha=0.2, lw=0,
                            label=f"{label} 95% interval over {rc['samples']} samples".strip())
        bx.plot(ov["distances"], ov["overlap"], color=color, lw=2.2, marker="o", label=(label or measure))
        chance = ov["chance"]
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.xaxis.set_major_locator(FixedLocator(sorted(ticks)))    # the distances measured, as whole numbers
        a.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
        a.xaxis.set_minor_locator(NullLocator())
        a.set_xlabel("step distance d (steps s and s + d)")
    ax.axhline(0, color="0.4", lw=1)
    ax.set_ylabel("Spearman rank correlation of token change maps")
    ax.set_ylim(-0.2, 1.0)
    ax.legend(fontsize=8, title="thin lines: single blocks; bands: bootstrap over samples", title_fontsize=7)
    if chance is not None:
        bx.axhline(chance, color="0.4", ls="--", lw=1, label=f"chance ({chance:.0%})")
    bx.set_ylabel("share of top-20% tokens still top-20%")
    bx.set_ylim(0, 1)
    bx.legend(fontsize=8)
    ax.set_title("does the last step predict which tokens change?")
    bx.set_title("recall of a 'previous change' predictor")
    fig.suptitle(title or f"Persistence of the change pattern over steps ({measure}, {branch})")
    return fig


# ---- pure samples vs SDEdit ---------------------------------------------------------------------

@_themed
def plot_trace_comparison(records, measure: str = "out_change", branch: str = "cond",
                          threshold: float = 0.05, title: str | None = None):
    """Several recordings side by side (e.g. pure samples vs SDEdit traces of in-house images), on a
    shared **timestep t** axis (step indices differ: an SDEdit trace starts part-way down):
    mean change per step (with its 95 % bootstrap band over samples), the fraction of tokens below
    ``threshold`` per step, and the CDF."""
    plt, sns = _plt(), _sns()
    recs = _records(records)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    for k, (label, rec) in enumerate(recs.items()):
        t = rec.timesteps
        band = analysis.per_step_mean_change_interval(rec, measure, branch)
        dist = analysis.summarise_change_distribution(rec, measure, (threshold,), (0.5,), branch)
        ps = dist["per_step"]
        color = f"C{k}"
        name = label or measure
        axes[0].plot(t, band["mean"], marker="o", ms=3, color=color, label=name)
        if np.isfinite(band["low"]).any():
            axes[0].fill_between(t, band["low"], band["high"], color=color, alpha=0.2, lw=0)
        axes[1].plot(ps["t"], ps[f"below_{analysis.pct_label(threshold)}"], marker="o", ms=3, color=color, label=name)
        vals, _ = analysis.select_change_steps(rec, measure, branch)
        v = vals[np.isfinite(vals)]
        sns.ecdfplot(x=np.clip(v, 1e-6, None), ax=axes[2], log_scale=True, color=color,
                     label=f"{name} ({np.mean(v < threshold):.1%} < {threshold:.0%})")
    for ax in axes[:2]:
        ax.set_xlabel(f"{T_LABEL}; noisy (left) to clean (right)")
        if not ax.xaxis_inverted():
            ax.invert_xaxis()
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"mean {CHANGE_LABEL.get(measure, measure)}")
    axes[1].set_ylabel(f"fraction of tokens changing < {threshold:.0%}")
    axes[1].set_ylim(0, 1)
    axes[2].set_xscale("log")
    axes[2].axvline(threshold, color="0.4", ls="--", lw=1)
    axes[2].set_xlabel("relative change between adjacent steps (log scale)")
    axes[2].set_ylabel("cumulative fraction below x")
    axes[2].legend(fontsize=8)
    axes[0].set_title("mean change per step (bands: 95% over samples)")
    axes[1].set_title(f"tokens that barely change (< {threshold:.0%})")
    axes[2].set_title("distribution over all steps > 0")
    fig.suptitle(title or f"Same model, different trajectories ({measure}, {branch})")
    return fig


def plot_image_rows(rows: Mapping[str, object], max_images: int = 8, title: str | None = None):
    """Rows of images, one row per label (e.g. 'pure samples', 'in-house input', 'SDEdit output');
    each value is (N, 3, H, W) in [-1, 1]. The first ``max_images`` of each row are shown."""
    plt = _plt()
    rows = {k: _to_rgb(v)[:max_images] for k, v in rows.items()}
    ncol = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.3 * ncol + 1.4, 1.45 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# ---- quality against cost (ablation sweeps, tclab.ablation) ------------------------------------------

_FAMILY_MARKER = {"ablation": "o", "baseline": "s", "peer": "^", "reference": "*"}
PSNR_DISPLAY_CAP = 60.0  # dB; paired PSNR of identical images is 100 (metrics.psnr's cap)


def curve_colors(frame) -> dict[str, object]:
    """One colour per curve of a sweep, fixed for every panel of a figure, all different: ablated curves
    first, then baselines and peers, from :data:`THEME`'s palette (the same whatever style is active);
    more curves than the palette has colours get evenly spaced hues (``husl``) instead."""
    abl = [c for c in dict.fromkeys(frame.loc[frame["family"] == "ablation", "curve"])]
    rest = [c for c in dict.fromkeys(frame.loc[~frame["family"].isin(["ablation", "reference"]), "curve"])]
    names = abl + rest
    palette = theme_palette()
    order = [i for i in THEME["curve_order"] if i < len(palette)]
    palette = [palette[i] for i in order] + [c for i, c in enumerate(palette) if i not in order]
    if len(names) > len(palette):
        palette = list(_sns().color_palette("husl", len(names)))
    return dict(zip(names, palette))


def distribution_caption(frame) -> str | None:
    """What an FID/KID figure must state: N, the reference N and the feature extractor, e.g.
    "N = 256 images per point vs 300 reference; features: tclab-smallcnn-shipped (...); KID +- std over 100
    subsets of 256", plus why FID is missing where it was not computed. None when the sweep has no FID/KID."""
    if "fid_n" not in frame or not frame["fid_n"].notna().any():
        return None
    row = frame[frame["fid_n"].notna()].iloc[0]
    ns = sorted({int(n) for n in frame["fid_n"].dropna()})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    text = (f"N = {n} images per point vs {int(row['fid_n_reference'])} reference; features: {row['fid_extractor']}; "
            f"KID +- std over {int(row['kid_subsets'])} subsets of {int(row['kid_subset_size'])}")
    reasons = frame["fid_reason"].fillna("").astype(str) if "fid_reason" in frame else None
    if reasons is not None and (reasons != "").any():
        text += "\nFID " + reasons[reasons != ""].iloc[0].split(" (", 1)[0]
    return text


def _errors(sub, column: str) -> np.ndarray | None:
    """Asymmetric error-bar lengths ``(2, n)`` from ``<column>_ci_low`` / ``_high``; None without them."""
    lo, hi = f"{column}_ci_low", f"{column}_ci_high"
    if lo not in sub or hi not in sub:
        return None
    v = sub[column].to_numpy(float)
    err = np.vstack([v - sub[lo].to_numpy(float), sub[hi].to_numpy(float) - v])
    err = np.where(np.isfinite(err), np.maximum(err, 0.0), 0.0)
    return err if err.any() else None


@_themed
def plot_pareto(frame, cost: str = "flop_ratio", quality: str = "psnr", budget: float | None = None, ax=None,
                title: str | None = None, legend: bool = True, colors: Mapping[str, object] | None = None,
                ties: Mapping[str, str] | None = None):
    """Quality against cost for every point of a sweep (``tclab.ablation.run_sweep(...).frame``).

    Every point is a marker: ablated variants circles, baselines squares, external peers triangles,
    one colour per curve (``colors``, default :func:`curve_colors`). Each curve's line joins only
    its own Pareto-efficient points (what that variant achieves at each cost: a curve whose points
    differ in several knobs is not drawn as if one knob moved). The Pareto front over all points
    (``tclab.ablation.pareto_front``) is the dashed black staircase with ringed points. Full compute
    is the dotted vertical line at cost 1 (its paired PSNR / SSIM are perfect by construction; for
    class-consistency and FID its value is also a dotted horizontal line). ``budget`` shades the
    costs over it. Failed points are left out (they are in the table with their error).

    Uncertainty, where the frame has it (``run_sweep`` writes ``<m>_ci_low`` / ``_high``): error bars
    of each point's quality interval (KID: its bootstrap interval) and, against wall-clock, of its time
    ratio's interval; the timing noise floor (full compute against itself) is a hatched band around 1.
    ``ties`` (``tclab.ablation.pareto_ties``: point -> the cheaper front point it cannot be told from)
    draws those front points with a dotted ring: on the front on point estimates only."""
    from .ablation import COST_LABELS, FULL_COMPUTE, HIGHER_IS_BETTER, QUALITY_LABELS, _usable, pareto_front

    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    else:
        fig = ax.figure
    colors = dict(colors) if colors is not None else curve_colors(frame)
    capped = False
    if quality == "psnr" and (frame["psnr"] >= PSNR_DISPLAY_CAP).any():
        # identical outputs score 100 dB (the metric's cap): draw them on the top edge of the
        # informative range, so that range is not squashed into the bottom of the panel
        live = frame[(frame["family"] != "reference") & (frame["psnr"] < PSNR_DISPLAY_CAP)]["psnr"].dropna()
        top = float(live.max() + 0.15 * (live.max() - live.min()) + 1) if len(live) else PSNR_DISPLAY_CAP
        capped = bool((frame.loc[frame["family"] != "reference", "psnr"] >= PSNR_DISPLAY_CAP).any())
        keep = frame["psnr"] < PSNR_DISPLAY_CAP
        frame = frame.assign(**{c: frame[c].where(keep, top) for c in ("psnr", "psnr_ci_low", "psnr_ci_high")
                                if c in frame})
    ok = _usable(frame, cost, quality)
    pts = frame[ok & (frame["family"] != "reference")]
    for curve, sub in pts.groupby("curve", sort=False):
        fam = sub["family"].iloc[0]
        col = colors.get(curve, "gray")
        own = sub[pareto_front(sub, cost, quality)].sort_values(cost)
        ax.plot(own[cost], own[quality], color=col, lw=1.2 if fam == "ablation" else 0.8,
                ls="-" if fam == "ablation" else ":", alpha=0.9)
        ax.scatter(sub[cost], sub[quality], marker=_FAMILY_MARKER.get(fam, "o"), color=col,
                   s=36 if fam == "ablation" else 48, label=curve, alpha=0.9, zorder=3)
        yerr = _errors(sub, quality)
        if yerr is None and quality == "kid" and "kid_std" in sub:   # an older frame: KID's spread over its subsets
            yerr = sub["kid_std"].to_numpy(float)
        xerr = _errors(sub, cost) if cost == "time_ratio" else None
        if yerr is not None or xerr is not None:
            ax.errorbar(sub[cost], sub[quality], yerr=yerr, xerr=xerr, fmt="none", ecolor=col, elinewidth=0.8,
                        alpha=0.45, zorder=2)
    front = pareto_front(frame, cost, quality)
    fr = frame[front].sort_values(cost)
    if len(fr):
        # the front as a staircase: quality achievable at each cost by the best point not costlier
        ax.step(fr[cost], fr[quality], where="post", color="k", ls="--", lw=1, label="Pareto front")
        tied = fr["name"].isin(list(ties or {}))
        ax.scatter(fr.loc[~tied, cost], fr.loc[~tied, quality], s=110, facecolors="none", edgecolors="k", lw=1.2,
                   zorder=5)
        if tied.any():
            ax.scatter(fr.loc[tied, cost], fr.loc[tied, quality], s=110, facecolors="none", edgecolors="k", lw=1.0,
                       linestyles=":", zorder=5, label="on the front within noise (tie with a cheaper point)")
    if cost == "time_ratio" and "noise_floor_low" in frame and frame["noise_floor_low"].notna().any():
        lo, hi = float(frame["noise_floor_low"].dropna().iloc[0]), float(frame["noise_floor_high"].dropna().iloc[0])
        ax.axvspan(lo, hi, facecolor="none", edgecolor="0.6", hatch="///", lw=0,
                   label=f"timing noise floor ({lo:.2f}-{hi:.2f}: full vs full)")
    full = frame[(frame["name"] == FULL_COMPUTE) & ok]
    ax.axvline(1.0, color="gray", ls=":", lw=1)
    ax.annotate(FULL_COMPUTE, (1.0, 1.0), xycoords=("data", "axes fraction"), ha="right", va="top", fontsize=7,
                color="gray", rotation=90)
    if len(full) and quality in ("class_consistency", "fid", "kid"):
        ax.axhline(float(full[quality].iloc[0]), color="gray", ls=":", lw=1)
    if budget is not None:
        ax.axvspan(budget, max(1.05, float(np.nanmax(frame[cost].to_numpy(float))) + 0.05), color="0.85",
                   alpha=0.35, lw=0, label=f"over budget ({cost.split('_')[0]} > {budget:g})")
    ax.set_xlabel(COST_LABELS.get(cost, cost) + "  (lower = cheaper)")
    arrow = "higher = better" if HIGHER_IS_BETTER.get(quality, True) else "lower = better"
    ax.set_ylabel(f"{QUALITY_LABELS.get(quality, quality)}  ({arrow})")
    caption = distribution_caption(frame) if quality in ("fid", "kid") else None
    if caption:   # every distribution figure states N and the feature extractor
        ax.annotate(caption, (0.01, 0.01), xycoords="axes fraction", va="bottom", fontsize=6, color="gray")
    if capped:
        ax.annotate(f"points on the top line: >= {PSNR_DISPLAY_CAP:g} dB (output ~identical to full compute)",
                    (0.01, 0.99), xycoords="axes fraction", va="top", fontsize=7, color="gray")
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=7, loc="best", ncol=2)
    return fig


@_themed
def plot_pareto_grid(sweep, budget: float | None = None, qualities: Sequence[str] = ("psnr", "class_consistency"),
                     title: str | None = None):
    """Quality against FLOPs (left) and against wall-clock (right), one row per quality measure:
    the same points on both cost axes, so a FLOP saving that wall-clock does not deliver shows.
    ``sweep``: a ``tclab.ablation.SweepResult`` (error bars, the noise floor, and the front's ties from
    its paired tests) or its frame (error bars and noise floor only)."""
    from .ablation import SweepResult, pareto_ties

    frame = sweep.frame if isinstance(sweep, SweepResult) else sweep
    plt = _plt()
    requested = list(qualities)
    qualities = [q for q in qualities if q in frame and frame[q].notna().any()]
    if not qualities:
        why = ""
        if "fid" in requested and "fid_reason" in frame and (frame["fid_reason"].fillna("") != "").any():
            why = f"; FID {frame.loc[frame['fid_reason'].fillna('') != '', 'fid_reason'].iloc[0]}"
        raise ValueError(f"none of the quality columns {requested} was measured in this sweep (class-consistency "
                         f"needs a classifier, FID/KID an extractor and reference images in run_sweep){why}")
    fig, axes = plt.subplots(len(qualities), 2, figsize=(13, 4.4 * len(qualities)), squeeze=False,
                             layout="constrained")
    colors = curve_colors(frame)
    for r, q in enumerate(qualities):
        for c, cost in enumerate(("flop_ratio", "time_ratio")):
            ties = pareto_ties(sweep, cost, q) if isinstance(sweep, SweepResult) and q in ("psnr", "ssim", "mse", "lpips",
                                                                                           "class_consistency") else None
            plot_pareto(frame, cost, q, budget=budget, ax=axes[r, c], legend=False, colors=colors, ties=ties)
    handles, labels = [], []
    for ax in axes.flat:  # one legend for the figure, with every curve that appears in any panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


# ---- full compute against cached, image by image (tclab.inhouse) ---------------------------------------

def plot_paired_images(inputs, full, cached, column_titles: Sequence[str] | None = None, max_images: int = 8,
                       title: str | None = None, labels: Sequence[str] = ("in-house input", "full compute", "cached")):
    """Four rows, one column per image: the input (e.g. an in-house image SDEdit started from), the
    full-compute output, the cached output (same seed), and ``|cached - full|`` as a heat map.

    ``inputs``, ``full``, ``cached``: (N, 3, H, W) in [-1, 1], image ``i`` the same case in each.
    The difference is the per-pixel mean over RGB of ``|cached - full|`` on the 0-1 pixel scale (0.1 =
    10% of the pixel range), on one colour scale for the whole figure (0 to the 99th percentile of the
    shown differences), so columns compare. ``column_titles`` (e.g. file name and PSNR) go above the
    columns; the first ``max_images`` are shown."""
    plt = _plt()
    rgb = [_to_rgb(x)[:max_images] for x in (inputs, full, cached)]
    n = len(rgb[1])
    if not (len(rgb[0]) == n == len(rgb[2])) or n == 0:
        raise ValueError(f"inputs, full and cached must hold the same non-zero number of images; got "
                         f"{len(rgb[0])}, {len(rgb[1])}, {len(rgb[2])} (first {max_images} shown)")
    if column_titles is not None and len(column_titles) < n:
        raise ValueError(f"{len(column_titles)} column titles for {n} images: give one per image")
    diff = np.abs(rgb[2] - rgb[1]).mean(axis=-1)  # (n, H, W) on the 0-1 pixel scale
    vmax = max(float(np.percentile(diff, 99)), 1 / 255)
    fig, axes = plt.subplots(4, n, figsize=(1.45 * n + 1.6, 6.4 + (0.35 if column_titles is not None else 0)),
                             squeeze=False, layout="constrained")
    im = None
    for c in range(n):
        for r in range(3):
            axes[r, c].imshow(rgb[r][c], interpolation="nearest")
        im = axes[3, c].imshow(diff[c], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        if column_titles is not None:
            axes[0, c].set_title(str(column_titles[c]), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, label in enumerate([*labels, "|cached - full|"]):
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.colorbar(im, ax=axes[3, :], label="mean |difference| (0-1 pixel scale)", shrink=0.9, location="right")
    if title:
        fig.suptitle(title)
    return fig
