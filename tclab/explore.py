"""The token-change explorer: look at one record's per-token maps step by step, block by block.

A :class:`tclab.record.TokenChangeRecord` holds a (step, block, row, token) array per measure; the
figures of :mod:`tclab.plots` show a few chosen slices of it. This module lets a reader move through
*all* of them, in two forms:

- :func:`explore` (also reachable as ``tclab.explore(...)``: this module is callable) returns an
  ipywidgets widget for JupyterLab (needs a running kernel). Sliders pick the step and block,
  drop-downs the measure, branch and sample, two sliders the token; it shows the token-change map
  over the sample's image, that token's change over every step and block, and the per-step mean
  change, with the current step marked on both.
- :func:`static_explorer` returns an object whose ``_repr_html_()`` is one self-contained HTML
  fragment (vanilla JavaScript, no external URLs): the maps are embedded, quantised to uint8, so
  it works in the HTML reports, opened from ``file://``, without a kernel.

Both use one colour scale per measure (:func:`colour_scale`: 0, or the 1st percentile if that is
negative, to the 99th percentile over the whole record), so maps of different steps, blocks and
samples compare; values above the top are drawn in the top colour.

Images. ``images[i]`` is the image of sample id ``i``: (N, 3, H, W) in [-1, 1], as
``SampleResult.images``. Notebooks save them beside the record under one naming rule,
``record_X.npz`` -> ``record_X_images.npz`` (:func:`save_record_images`); :func:`explore`,
:func:`static_explorer` and :func:`open_record` load them from there when they are given a record's
path. :func:`find_record` / :func:`open_record` find the newest run folder holding a record
(notebook 06).

Nothing here changes global state: figures are ``matplotlib.figure.Figure`` drawn by
``FigureCanvasAgg`` (no pyplot, no backend switch), and ipywidgets is imported only when a widget
is built, so ``import tclab.explore`` stays light.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import sys
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .models import NULL_CLASS
from .plots import CHANGE_LABEL, STEP_LABEL
from .record import BRANCHES, MEASURES, TokenChangeRecord, quiet_nan_warnings

#: Change measures: NaN at step 0 (no previous step).
CHANGE_MEASURES = ("out_change", "update_change", "cos")
#: Suffix of the images file beside a record: ``record_X.npz`` -> ``record_X_images.npz``.
IMAGES_SUFFIX = "_images"
#: The colormap of every map (matplotlib's name), as in ``tclab.plots.plot_token_maps``.
CMAP = "magma"
#: Quantised map value meaning "no value" (NaN: step 0 of a change measure); values use 0..254.
NAN_CODE = 255
_LEVELS = 254
_IMAGES_FORMAT = "tclab.RecordImages"
_PERCENTILE_SAMPLE = 2_000_000  # values drawn for the colour-scale percentiles of a big record


# ---- inputs: records, images, colour scales --------------------------------------------------------

def images_path(record_path: str | os.PathLike) -> Path:
    """Where the images of the record at ``record_path`` live: ``record_X.npz`` -> ``record_X_images.npz``."""
    p = Path(record_path)
    return p.with_name(p.stem + IMAGES_SUFFIX + ".npz")


def _rgb_uint8(images) -> np.ndarray:
    """(N, 3 or 1, H, W) in [-1, 1] (torch or numpy) -> (N, H, W, 3) uint8."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) in [-1, 1] (as SampleResult.images), got shape {a.shape}")
    a = np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a
    return np.rint(np.clip((a.transpose(0, 2, 3, 1) + 1) * 127.5, 0, 255)).astype(np.uint8)


def save_record_images(record_path: str | os.PathLike, images) -> Path:
    """Save the images a record belongs to beside it (``record_X_images.npz``); returns that path.

    ``images[i]`` must be sample id ``i`` ((N, 3, H, W) in [-1, 1], e.g. ``SampleResult.images``:
    the final images for pure samples, the SDEdit outputs for SDEdit traces). Stored as uint8
    (N, H, W, 3), which is all a display needs (1/4 of float32). Written to a temporary name first.
    """
    out = images_path(record_path)
    rgb = _rgb_uint8(images)
    meta = {"format": _IMAGES_FORMAT, "version": 1, "layout": "(N, H, W, 3) uint8; 0..255 = -1..1",
            "record": Path(record_path).name}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, meta_json=np.array(json.dumps(meta)), images=rgb)
    os.replace(tmp, out)
    return out


def load_record_images(record_path: str | os.PathLike) -> np.ndarray | None:
    """The images saved beside the record at ``record_path`` as (N, 3, H, W) float32 in [-1, 1], or None."""
    p = images_path(record_path)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        if "images" not in z.files or "meta_json" not in z.files:
            raise ValueError(f"{p} is not a tclab images file (no images/meta_json entries); delete it or "
                             "rewrite it with tclab.explore.save_record_images")
        rgb = z["images"]
    return rgb.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def _as_record(record, images):
    """(TokenChangeRecord, images or None, record path or None) from a record or a record's path."""
    if isinstance(record, (str, os.PathLike)):
        path = Path(record)
        rec = TokenChangeRecord.load(path)
        return rec, (load_record_images(path) if images is None else images), path
    if not isinstance(record, TokenChangeRecord):
        raise TypeError(f"record must be a TokenChangeRecord or the path of a saved one (.npz), got "
                        f"{type(record).__name__}")
    return record, images, None


def _check_images(record: TokenChangeRecord, images) -> np.ndarray | None:
    """images as (N, H, W, 3) uint8, after checking there is exactly one per sample id."""
    if images is None:
        return None
    rgb = _rgb_uint8(images)
    need = int(record.sample_id.max()) + 1 if record.num_rows else 0
    if len(rgb) != need:
        raise ValueError(f"{len(rgb)} images for a record of sample ids 0..{need - 1}: images[i] must be the image "
                         f"of sample id i, one per sample ({need}); pass the images of the sample() call that "
                         "was recorded (SampleResult.images), or images=None for the maps alone")
    return rgb


def colour_scale(record: TokenChangeRecord, measure: str) -> tuple[float, float]:
    """(lo, hi) of the colour scale of ``measure``, shared by every step, block, sample and branch.

    ``hi`` is the 99th percentile of the finite values (so a few outliers do not wash the maps out),
    ``lo`` is 0, or the 1st percentile where that is negative (``cos``). A record of more than 2 M
    values is read through a fixed random subset of 2 M, which moves a percentile by well under 1%.
    """
    a = record.measure(measure).reshape(-1)
    if a.size > _PERCENTILE_SAMPLE:
        a = a[np.random.default_rng(0).integers(0, a.size, _PERCENTILE_SAMPLE)]
    a = a[np.isfinite(a)].astype(np.float64)
    if a.size == 0:
        return 0.0, 1.0
    lo = min(0.0, float(np.percentile(a, 1)))
    hi = float(np.percentile(a, 99))
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0) * 1e-3 if hi == lo else lo + 1.0
    return lo, hi


def quantise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> uint8 codes: ``lo..hi`` (clipped) onto 0..254, NaN onto 255 (:data:`NAN_CODE`).

    Decode with ``lo + code / 254 * (hi - lo)``; the error is at most ``(hi - lo) / 508`` inside the scale.
    """
    v = np.asarray(values, np.float64)
    q = np.rint((np.clip(v, lo, hi) - lo) / (hi - lo) * _LEVELS)
    q = np.where(np.isnan(v), NAN_CODE, q)
    return q.astype(np.uint8)


@functools.cache
def _lut() -> np.ndarray:
    """(255, 3) uint8 colours of the codes 0..254 (matplotlib's colormap table, read, not registered)."""
    import matplotlib

    return np.rint(matplotlib.colormaps[CMAP](np.linspace(0, 1, _LEVELS + 1))[:, :3] * 255).astype(np.uint8)


def _sample_name(record: TokenChangeRecord, sample: int, branch: str) -> str:
    """'sample 3: star' (class name from the model identity), 'sample 3: class 281', or 'sample 3: no class'."""
    label = int(record.class_labels[record.row_of(sample, branch)])
    names = record.model_identity.get("class_names") or []
    if 0 <= label < len(names):
        return f"sample {sample}: {names[label]}"
    return f"sample {sample}: " + (f"class {label}" if label >= 0 and label != NULL_CLASS else "no class")


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _check_measure(measure: str, what: str = "measure") -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown {what} {measure!r}; choose one of {list(MEASURES)}")
    return measure


# ---- the interactive widget -----------------------------------------------------------------------

def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_map_png(values: np.ndarray, scale: tuple[float, float], image: np.ndarray | None = None,
                   alpha: float = 0.6, size: int = 320, token: tuple[int, int] | None = None) -> bytes:
    """One token-change map as PNG bytes: the (H, W) ``values`` in the colormap, over ``image``.

    ``image`` ((h, w, 3) uint8, any size) is resized to the map's pixel size (bilinear) and the map
    is laid over it with opacity ``alpha`` (one flat cell per token, nearest-neighbour); without an
    image the map is opaque on grey. NaN cells are transparent. ``token`` = (row, col) is outlined in cyan.
    numpy + PIL only: a few milliseconds, fast enough to follow a slider.
    """
    from PIL import Image, ImageDraw

    h, w = values.shape
    cell = max(1, round(size / max(h, w)))
    q = quantise(values, *scale)  # (H, W)
    rgba = np.zeros((h, w, 4), np.uint8)
    ok = q != NAN_CODE
    rgba[ok, :3] = _lut()[q[ok]]
    rgba[ok, 3] = round(255 * (alpha if image is not None else 1.0))
    out = (w * cell, h * cell)
    over = Image.fromarray(rgba, "RGBA").resize(out, Image.NEAREST)
    base = (Image.fromarray(image).convert("RGBA").resize(out, Image.BILINEAR) if image is not None
            else Image.new("RGBA", out, (221, 221, 221, 255)))
    comp = Image.alpha_composite(base, over)
    if token is not None:
        r, c = token
        ImageDraw.Draw(comp).rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                                       outline=(0, 255, 255, 255), width=max(1, min(3, cell // 6)))
    return _png(np.asarray(comp.convert("RGB")))


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _new_figure(w_in: float, h_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w_in, h_in), dpi=90, layout="constrained")


def render_colorbar_png(measure: str, scale: tuple[float, float], height: int = 320) -> bytes:
    """The colour bar of ``measure``'s scale as PNG bytes (the top end is clipped: 'extend' arrow)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = _new_figure(1.0, height / 90)
    ax = fig.add_subplot()
    fig.colorbar(ScalarMappable(Normalize(*scale), colormaps[CMAP]), cax=ax, extend="max", extendfrac=0.03)
    ax.set_ylabel(CHANGE_LABEL[measure] + " (99th pct clip)", fontsize=7)
    ax.tick_params(labelsize=7)
    return _figure_png(fig)


def render_token_png(record: TokenChangeRecord, measure: str, row: int, token: int, step: int, block: int,
                     scale: tuple[float, float], title: str = "") -> bytes:
    """One token's ``measure`` over every step (x) and block (y) as a heatmap, current step and block marked."""
    from matplotlib import colormaps

    vals = record.measure(measure)[:, :, row, token].astype(np.float64).T  # (L, S)
    s_n, l_n = record.num_steps, record.num_blocks
    fig = _new_figure(4.8, 2.5)
    ax = fig.add_subplot()
    cmap = colormaps[CMAP].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=scale[0], vmax=scale[1], aspect="auto",
                   interpolation="nearest", origin="lower", extent=(-0.5, s_n - 0.5, -0.5, l_n - 0.5))
    ax.axvline(step, color="cyan", lw=1.5)
    ax.add_patch(_rect(step - 0.5, block - 0.5))
    ax.set_xlabel(STEP_LABEL, fontsize=8)
    ax.set_ylabel("block", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, extend="max", shrink=0.9).ax.tick_params(labelsize=7)
    return _figure_png(fig)


def _rect(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, fill=False, ec="cyan", lw=1.5)


def render_curve_png(record: TokenChangeRecord, measure: str, sample: int, branch: str, step: int, block: int) -> bytes:
    """Per-step mean of ``measure`` over tokens: this sample's current block, its mean over blocks,
    and the current block's mean over all samples of the branch; the current step marked."""
    row = record.row_of(sample, branch)
    a = record.measure(measure)[:, :, row].astype(np.float64)  # (S, L, N)
    with np.errstate(invalid="ignore"), quiet_nan_warnings():
        this = np.nanmean(a, axis=2)  # (S, L)
        every = record.mean_over(measure, ("sample", "token"), branch)  # (S, L)
    steps = record.steps
    fig = _new_figure(4.8, 2.3)
    ax = fig.add_subplot()
    ax.plot(steps, this[:, block], "-o", ms=3, color="C0", label=f"sample {sample}, block {block}")
    with quiet_nan_warnings():
        ax.plot(steps, np.nanmean(this, axis=1), "--", color="C1", label=f"sample {sample}, mean of blocks")
    ax.plot(steps, every[:, block], ":", color="0.4", label=f"all {branch} samples, block {block}")
    ax.axvline(step, color="cyan", lw=1.5)
    if np.isfinite(this[step, block]):
        ax.plot([step], [this[step, block]], "o", ms=7, mfc="none", mec="k")
    ax.set_xlim(-0.5, record.num_steps - 0.5)
    ax.set_xlabel(STEP_LABEL, fontsize=8)
    ax.set_ylabel(f"mean {measure} over tokens", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="best", frameon=False)
    return _figure_png(fig)


@functools.cache
def _explorer_class():
    """Build the widget class on first use, so ipywidgets is imported only when a widget is made."""
    import ipywidgets as w

    class TokenChangeExplorer(w.VBox):
        """The interactive token-change explorer (see :func:`tclab.explore.explore`).

        Controls (ipywidgets, each with its ``description``): ``step`` and ``block`` (IntSlider),
        ``measure`` (Dropdown of the four measures), ``branch`` (ToggleButtons of the branches
        present), ``sample`` (Dropdown of sample ids), ``token_row`` and ``token_col`` (IntSlider:
        the token whose history is plotted, outlined on the map), ``opacity`` (FloatSlider of the
        overlay; disabled without images).

        Views: ``map_image`` (ipywidgets.Image, PNG: the map over the image), ``colorbar_image``
        (the measure's colour scale), ``token_plot`` (the token's change over every step and block),
        ``curve_plot`` (per-step mean change), ``readout`` (HTML: step, t, block, measure, means).

        Also: ``record``, ``images`` ((N, H, W, 3) uint8 or None), ``scales`` ({measure: (lo, hi)}),
        ``current_map()`` (the (H, W) values shown), ``token`` (flat token index) and ``update()``
        (redraw; called by every control change).
        """

        def __init__(self, record: TokenChangeRecord, images: np.ndarray | None, *, measure: str, branch: str,
                     step: int | None, block: int, sample: int | None, token: tuple[int, int] | None,
                     size: int):
            have = [b for b in BRANCHES if (record.branch == b).any()]
            if branch not in have:
                raise ValueError(f"branch {branch!r} is not in this record; it has {have}")
            s_n, l_n = record.num_steps, record.num_blocks
            step = (1 if s_n > 1 else 0) if step is None else int(step)
            if not 0 <= step < s_n:
                raise ValueError(f"step {step} out of range: this record has step indices 0..{s_n - 1}")
            if not 0 <= block < l_n:
                raise ValueError(f"block {block} out of range: the model has {l_n} blocks (0..{l_n - 1})")
            ids = [int(i) for i in np.sort(record.sample_id[record.rows(branch)])]
            sample = ids[0] if sample is None else int(sample)
            if sample not in ids:
                raise ValueError(f"sample {sample} is not in the {branch!r} rows; sample ids are {ids[0]}..{ids[-1]}")
            h, wd = record.grid
            if token is None:  # start on the token that changes most (mean over steps) at this block
                with np.errstate(invalid="ignore"), quiet_nan_warnings():
                    mean = np.nanmean(record.measure(measure)[:, block, record.row_of(sample, branch)], axis=0)
                flat = int(np.nanargmax(mean)) if np.isfinite(mean).any() else 0
                token = divmod(flat, wd)
            if not (0 <= token[0] < h and 0 <= token[1] < wd):
                raise ValueError(f"token {token} is off the {h}x{wd} token grid")
            self.record, self.images, self._size, self.scales, self._colorbars = record, images, size, {}, {}
            style = {"description_width": "70px"}
            lay = w.Layout(width="300px")
            self.step = w.IntSlider(value=step, min=0, max=s_n - 1, description="step", style=style, layout=lay)
            self.block = w.IntSlider(value=block, min=0, max=l_n - 1, description="block", style=style, layout=lay)
            self.measure = w.Dropdown(options=list(MEASURES), value=measure, description="measure", style=style,
                                      layout=lay)
            self.branch = w.ToggleButtons(options=have, value=branch, description="branch",
                                          layout=w.Layout(width="auto"), style={**style, "button_width": "72px"})
            self.sample = w.Dropdown(options=self._sample_options(branch), value=sample, description="sample",
                                     style=style, layout=lay)
            self.token_row = w.IntSlider(value=int(token[0]), min=0, max=h - 1, description="token row",
                                         style=style, layout=lay)
            self.token_col = w.IntSlider(value=int(token[1]), min=0, max=wd - 1, description="token col",
                                         style=style, layout=lay)
            self.opacity = w.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05, description="overlay",
                                         style=style, layout=lay, disabled=images is None)
            fixed = w.Layout(flex="none", object_fit="contain")  # never stretched by the plots beside them
            self.map_image = w.Image(format="png", layout=fixed)
            self.colorbar_image = w.Image(format="png", layout=w.Layout(flex="none", object_fit="contain"))
            self.token_plot = w.Image(format="png")
            self.curve_plot = w.Image(format="png")
            self.readout = w.HTML()
            caption = w.HTML("<b>Token-change explorer</b>: the per-token change of the chosen block between "
                             "adjacent steps, over the sample's final image. Move <i>step</i> and <i>block</i>; "
                             "pick a token with <i>token row/col</i> (outlined in cyan) to see its history. One "
                             "colour scale per measure, clipped at its 99th percentile.")
            controls = w.HBox([w.VBox([self.step, self.block, self.measure, self.sample]),
                               w.VBox([self.token_row, self.token_col, self.opacity, self.branch])])
            views = w.HBox([self.map_image, self.colorbar_image, w.VBox([self.token_plot, self.curve_plot])],
                           layout=w.Layout(align_items="flex-start"))
            super().__init__(children=[caption, controls, self.readout, views])
            for c in (self.step, self.block, self.measure, self.sample, self.token_row, self.token_col, self.opacity):
                c.observe(self._changed, names="value")
            self.branch.observe(self._branch_changed, names="value")
            self.update()

        def _sample_options(self, branch: str) -> list[tuple[str, int]]:
            ids = np.sort(self.record.sample_id[self.record.rows(branch)])
            return [(_sample_name(self.record, int(i), branch), int(i)) for i in ids]

        @property
        def token(self) -> int:
            """The selected token's flat index (row * W + col)."""
            return self.token_row.value * self.record.grid[1] + self.token_col.value

        def scale(self, measure: str | None = None) -> tuple[float, float]:
            m = measure or self.measure.value
            if m not in self.scales:
                self.scales[m] = colour_scale(self.record, m)
            return self.scales[m]

        def current_map(self) -> np.ndarray:
            """The (H, W) map shown: ``record.token_map(measure, step, block, sample, branch)``."""
            return self.record.token_map(self.measure.value, self.step.value, self.block.value, self.sample.value,
                                         self.branch.value)

        def _branch_changed(self, change) -> None:
            keep = self.sample.value
            opts = self._sample_options(change["new"])
            with self.sample.hold_trait_notifications():
                self.sample.options = opts
                self.sample.value = keep if keep in [v for _, v in opts] else opts[0][1]
            self.update()

        def _changed(self, change) -> None:
            self.update()

        def update(self) -> None:
            """Redraw every view from the controls' current values."""
            rec, m, s, b = self.record, self.measure.value, self.step.value, self.block.value
            i, br = self.sample.value, self.branch.value
            row = rec.row_of(i, br)
            values = self.current_map()
            scale = self.scale(m)
            img = self.images[i] if self.images is not None else None
            self.map_image.value = render_map_png(values, scale, img, self.opacity.value, self._size,
                                                  (self.token_row.value, self.token_col.value))
            if m not in self._colorbars:
                self._colorbars[m] = render_colorbar_png(m, scale, self._size)
            self.colorbar_image.value = self._colorbars[m]
            r, c = self.token_row.value, self.token_col.value
            self.token_plot.value = render_token_png(rec, m, row, self.token, s, b, scale,
                                                     title=f"token (row {r}, col {c}) of sample {i}: {m} "
                                                           "per step and block")
            self.curve_plot.value = render_curve_png(rec, m, i, br, s, b)
            t = rec.timesteps[s]
            with np.errstate(invalid="ignore"), quiet_nan_warnings():
                mean = float(np.nanmean(values))
            why = " (no previous step at s = 0)" if s == 0 and m in CHANGE_MEASURES else ""
            self.readout.value = (f"<code>step {s}, t = {_fmt(t)}, block {b}, {m}, {br}, "
                                  f"{_sample_name(rec, i, br)}: map mean {_fmt(mean)}{why}; token ({r}, {c}) = "
                                  f"{_fmt(float(values[r, c]))}</code>")

        def __repr__(self) -> str:  # the text/plain of a display: one line, not the trait dump
            return ("Interactive token-change explorer: it needs a running Jupyter kernel "
                    f"(tclab.explore.static_explorer makes a kernel-free one). Record: {self.record!r}")

    TokenChangeExplorer.__qualname__ = "TokenChangeExplorer"
    return TokenChangeExplorer


def explore(record: TokenChangeRecord | str | os.PathLike, images=None, *, measure: str = "out_change",
            branch: str = "cond", step: int | None = None, block: int = 0, sample: int | None = None,
            token: tuple[int, int] | None = None, size: int = 320):
    """An ipywidgets explorer of ``record`` for JupyterLab; see :class:`TokenChangeExplorer`'s attributes.

    Args:
        record: a TokenChangeRecord, or the path of a saved one (its images are loaded from beside it
            when ``images`` is None and ``record_X_images.npz`` exists).
        images: (N, 3, H, W) in [-1, 1], ``images[i]`` = sample id ``i`` (``SampleResult.images``), or
            None for the maps alone.
        measure, branch, step, block, sample, token: where to start (step None = 1, the first step with
            a change; sample None = the first; token None = the token changing most at that block).
        size: the map's size in pixels (long side).

    Needs a running kernel; the HTML reports use :func:`static_explorer`.
    """
    rec, images, _ = _as_record(record, images)
    _check_measure(measure)
    rgb = _check_images(rec, images)
    return _explorer_class()(rec, rgb, measure=measure, branch=branch, step=step, block=block, sample=sample,
                             token=token, size=size)


# ---- the kernel-free explorer ---------------------------------------------------------------------

_CSS_ROW = "display:flex;flex-wrap:wrap;gap:4px 16px;align-items:center;margin:4px 0"

_JS = r"""
(function () {
  var root = document.getElementById("%(uid)s");
  if (!root || root.getAttribute("data-ready")) return;
  root.setAttribute("data-ready", "1");
  var D = JSON.parse(root.querySelector("script.tclab-data").textContent);
  function bytes(s) { var b = atob(s), a = new Uint8Array(b.length); for (var i = 0; i < b.length; i++) a[i] = b.charCodeAt(i); return a; }
  function q(c) { return root.querySelector("." + c); }
  var maps = {}; D.measures.forEach(function (m) { maps[m] = bytes(D.maps[m]); });
  var lut = bytes(D.lut);
  var H = D.grid[0], W = D.grid[1], N = H * W, S = D.steps.length, L = D.blocks.length;
  var step = q("tclab-step"), block = q("tclab-block"), meas = q("tclab-measure"), samp = q("tclab-sample");
  var alpha = q("tclab-alpha"), canvas = q("tclab-map"), out = q("tclab-readout");
  var ctx = canvas.getContext("2d");
  var off = document.createElement("canvas"); off.width = W; off.height = H;
  var octx = off.getContext("2d"), od = octx.createImageData(W, H);
  var imgs = D.images ? D.images.map(function (src) { var im = new Image(); im.onload = draw; im.src = "data:image/png;base64," + src; return im; }) : null;
  function fmt(v) { return (v === null || v === undefined || !isFinite(v)) ? "n/a" : String(parseFloat(Number(v).toPrecision(4))); }
  function legend() {
    var m = meas.value, sc = D.scales[m];
    q("tclab-hi").textContent = "\u2265 " + fmt(sc[1]);
    q("tclab-lo").textContent = fmt(sc[0]);
    q("tclab-unit").textContent = "colour: " + D.labels[m] + ", " + fmt(sc[0]) + " to \u2265 " + fmt(sc[1]) +
      " (one scale for every step, block and sample; clipped at the 99th percentile); uncoloured = no value";
  }
  function draw() {
    var m = meas.value, si = +samp.value, s = +step.value, b = +block.value;
    var a = imgs ? (+alpha.value) / 100 : 1, arr = maps[m], base = ((si * S + s) * L + b) * N, d = od.data;
    for (var i = 0; i < N; i++) {
      var v = arr[base + i], o = 4 * i;
      if (v === 255) { d[o + 3] = 0; continue; }
      d[o] = lut[3 * v]; d[o + 1] = lut[3 * v + 1]; d[o + 2] = lut[3 * v + 2]; d[o + 3] = Math.round(255 * a);
    }
    octx.putImageData(od, 0, 0);
    ctx.fillStyle = "#dddddd"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    var im = imgs ? imgs[si] : null;
    if (im && im.complete && im.naturalWidth) { ctx.imageSmoothingEnabled = true; ctx.drawImage(im, 0, 0, canvas.width, canvas.height); }
    ctx.imageSmoothingEnabled = false; ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
    var mean = D.means[m][(si * S + s) * L + b], sv = D.steps[s];
    out.textContent = "step " + sv + ", t = " + fmt(D.t[s]) + ", block " + D.blocks[b] + ", " + m + ", " +
      samp.options[samp.selectedIndex].text + ": map mean " + fmt(mean) +
      ((mean === null && D.change.indexOf(m) >= 0 && sv === 0) ? " (no previous step at s = 0)" : "");
  }
  var cb = q("tclab-colorbar"), cbx = cb.getContext("2d"), n = lut.length / 3;
  for (var y = 0; y < cb.height; y++) {
    var k = Math.min(n - 1, Math.floor((1 - y / cb.height) * n));
    cbx.fillStyle = "rgb(" + lut[3 * k] + "," + lut[3 * k + 1] + "," + lut[3 * k + 2] + ")"; cbx.fillRect(0, y, cb.width, 1);
  }
  [step, block, alpha].forEach(function (e) { if (e) e.addEventListener("input", draw); });
  [meas, samp].forEach(function (e) { e.addEventListener("change", function () { legend(); draw(); }); });
  legend(); draw();
})();
"""


@dataclass
class StaticExplorer:
    """A kernel-free explorer: ``_repr_html_()`` is one self-contained HTML fragment (see :func:`static_explorer`).

    Attributes (what is embedded): ``measures``, ``samples`` (sample ids), ``steps`` (step indices),
    ``blocks`` (block indices; fewer than the model's when subsampled), ``scales`` ({measure: (lo, hi)}),
    ``branch``, ``payload_bytes`` (embedded data, base64 text included), ``caption``.
    """

    measures: list[str]
    samples: list[int]
    steps: list[int]
    blocks: list[int]
    scales: dict[str, tuple[float, float]]
    branch: str
    payload_bytes: int
    caption: str
    canvas: tuple[int, int]
    _data_json: str
    _has_images: bool
    _sample_names: list[str]

    def _repr_html_(self) -> str:
        """The fragment, with fresh element ids on every call (two explorers in a page never clash)."""
        uid = "tclab-explorer-" + uuid.uuid4().hex[:12]
        s0 = 1 if len(self.steps) > 1 and self.steps[0] == 0 else 0
        cw, ch = self.canvas
        alpha = ('<label>overlay <input type="range" class="tclab-alpha" min="0" max="100" value="60" '
                 'aria-label="overlay opacity"></label>' if self._has_images else "")
        return (
            f'<div class="tclab-explorer" id="{uid}" style="font:13px sans-serif;max-width:100%;margin:6px 0">'
            f'<div class="tclab-caption" style="margin:0 0 4px 0">{_esc(self.caption)}</div>'
            f'<div style="{_CSS_ROW}">'
            f'<label>step <input type="range" class="tclab-step" min="0" max="{len(self.steps) - 1}" value="{s0}" '
            f'step="1" aria-label="step"></label>'
            f'<label>block <input type="range" class="tclab-block" min="0" max="{len(self.blocks) - 1}" value="0" '
            f'step="1" aria-label="block"></label>'
            f'<label>measure <select class="tclab-measure">{_options((m, m) for m in self.measures)}</select></label>'
            f'<label>sample <select class="tclab-sample">{_options(enumerate(self._sample_names))}</select></label>'
            f'{alpha}</div>'
            f'<div style="display:flex;gap:6px;align-items:flex-start">'
            f'<canvas class="tclab-map" width="{cw}" height="{ch}" style="flex:none;border:1px solid #bbb;'
            f'max-width:calc(100% - 70px);height:auto"></canvas>'
            f'<div class="tclab-legend" style="flex:none;display:flex;flex-direction:column;height:{ch}px;'
            f'font-size:11px"><span class="tclab-hi"></span>'
            f'<canvas class="tclab-colorbar" width="14" height="256" style="flex:1;min-height:0;width:14px;'
            f'border:1px solid #bbb"></canvas><span class="tclab-lo"></span></div></div>'
            f'<div class="tclab-unit" style="font-size:11px;color:#444"></div>'
            f'<div class="tclab-readout" style="font-family:monospace;font-size:12px;margin-top:4px"></div>'
            f'<script type="application/json" class="tclab-data">{self._data_json}</script>'
            f'<script>{_JS % {"uid": uid}}</script>'
            f'</div>')

    def __repr__(self) -> str:  # text/plain beside the HTML: one line, not the embedded data
        return (f"StaticExplorer({len(self.samples)} samples x {len(self.steps)} steps x {len(self.blocks)} blocks of "
                f"{self.measures}, {self.payload_bytes / 1e6:.2f} MB embedded; display it in Jupyter or .save(path))")

    def to_html(self) -> str:
        """The fragment (as ``_repr_html_``)."""
        return self._repr_html_()

    def save(self, path: str | os.PathLike, title: str = "Token-change explorer") -> Path:
        """Write a standalone HTML page holding the fragment (opens from file://)."""
        p = Path(path)
        p.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title></head>"
                     f"<body>{self._repr_html_()}</body></html>\n", encoding="utf-8")
        return p


def _options(pairs) -> str:
    return "".join(f'<option value="{v}">{_esc(t)}</option>' for v, t in pairs)


def _esc(text: str) -> str:
    return html.escape(str(text))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _b64_len(n: int) -> int:
    return 4 * math.ceil(n / 3)


def _even(n: int, k: int) -> list[int]:
    """k indices spread evenly over 0..n-1, both ends kept (k <= n: the rounded values are distinct)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return [int(i) for i in np.rint(np.linspace(0, n - 1, k)).astype(int)]


def static_explorer(record: TokenChangeRecord | str | os.PathLike, images=None, max_samples: int = 4,
                    measures: Sequence[str] = ("out_change", "update_change"), *, branch: str = "cond",
                    samples: Sequence[int] | None = None, max_payload_bytes: int = 4_000_000,
                    image_size: int = 256, canvas_size: int = 320) -> StaticExplorer:
    """A kernel-free explorer of ``record`` for the HTML reports (display it, or ``.save(path)``).

    Embeds, for each of ``measures``, the (step, block, token) maps of up to ``max_samples`` samples
    of ``branch``, quantised to uint8 on the measure's colour scale (:func:`colour_scale`,
    :func:`quantise`) and base64-encoded, the exact mean of every map, and each sample's image
    (``images``, as in :func:`explore`) as a PNG of at most ``image_size`` pixels. The page's
    sliders and drop-downs redraw a canvas; no kernel, no network.

    Size: when the embedded data would exceed ``max_payload_bytes`` (base64 text), blocks are
    subsampled evenly (first and last kept), and if one block is still too much, steps too; the
    fragment's caption says so. Fewer samples or measures keep every block.

    DOM (a browser test relies on it): ``div.tclab-explorer`` holding ``input[type=range].tclab-step``,
    ``input[type=range].tclab-block``, ``select.tclab-measure``, ``select.tclab-sample``,
    ``canvas.tclab-map``, ``.tclab-readout`` (step, t, block, measure, map mean) and ``.tclab-caption``;
    ``input.tclab-alpha`` (overlay opacity) when images are given. The data sit in
    ``script.tclab-data`` (JSON: ``maps[measure]`` = base64 of (samples, steps, blocks, tokens) uint8,
    255 = NaN; ``scales``, ``steps``, ``blocks``, ``t``, ``means``, ``images``).
    """
    rec, images, _ = _as_record(record, images)
    measures = [measures] if isinstance(measures, str) else list(measures)
    if not measures:
        raise ValueError(f"measures is empty; give one or more of {list(MEASURES)}")
    for m in measures:
        _check_measure(m, "measure in measures")
    if len(set(measures)) != len(measures):
        raise ValueError(f"measures {measures} lists a measure twice")
    rows = rec.rows(branch)  # raises for a branch the record lacks
    ids = [int(i) for i in rec.sample_id[rows]]
    if samples is None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        samples = ids[:max_samples]
    else:
        samples = [int(i) for i in samples]
        bad = [i for i in samples if i not in ids]
        if bad or not samples:
            raise ValueError(f"sample id(s) {bad} are not in the {branch!r} rows of this record (ids "
                             f"{min(ids)}..{max(ids)}); pass ids from record.sample_id, or samples=None")
    rgb = None
    if images is not None:
        rgb = _rgb_uint8(images)
        missing = [i for i in samples if i >= len(rgb)]
        if missing:
            raise ValueError(f"sample id(s) {missing} have no image: {len(rgb)} images given, and images[i] must "
                             "be the image of sample id i; pass the images of the recorded sample() call "
                             "(SampleResult.images), or images=None for the maps alone")
        rgb = _check_images(rec, images)
    pngs = [_b64(_png(_thumb(rgb[i], image_size))) for i in samples] if rgb is not None else []
    img_bytes = sum(len(p) + 3 for p in pngs)

    s_all, l_all, n_tok, n_s, n_m = rec.num_steps, rec.num_blocks, rec.num_tokens, len(samples), len(measures)

    def cost(ns: int, nl: int) -> int:  # base64 maps + means (at most 13 characters a number) + images
        return n_m * (_b64_len(n_s * ns * nl * n_tok) + 13 * n_s * ns * nl + 20) + img_bytes

    nl = max((k for k in range(1, l_all + 1) if cost(s_all, k) <= max_payload_bytes), default=0)
    if nl:
        steps_i, blocks_i = list(range(s_all)), _even(l_all, nl)
    else:
        ns = max((k for k in range(2, s_all + 1) if cost(k, 1) <= max_payload_bytes), default=0)
        if not ns:
            raise ValueError(f"max_payload_bytes={max_payload_bytes} cannot hold even 2 steps of one block for "
                             f"{n_s} samples x {n_m} measures; raise it, or lower max_samples / measures")
        steps_i, blocks_i = _even(s_all, ns), [0]
    scales = {m: colour_scale(rec, m) for m in measures}
    sel_rows = [rec.row_of(i, branch) for i in samples]
    maps, means = {}, {}
    for m in measures:
        a = rec.measure(m)[np.ix_(steps_i, blocks_i, sel_rows)]  # (S', L', n, N)
        a = np.ascontiguousarray(a.transpose(2, 0, 1, 3))  # (n, S', L', N): sample, step, block, token
        maps[m] = _b64(quantise(a, *scales[m]).tobytes())
        with np.errstate(invalid="ignore"), quiet_nan_warnings():
            mu = np.nanmean(a.astype(np.float64), axis=3).reshape(-1)
        means[m] = [float(f"{v:.5g}") if math.isfinite(v) else None for v in mu]
    data = {"version": 1, "grid": list(rec.grid), "measures": measures, "maps": maps, "means": means,
            "scales": {m: list(scales[m]) for m in measures}, "steps": [int(rec.steps[s]) for s in steps_i],
            "t": [float(rec.timesteps[s]) if math.isfinite(rec.timesteps[s]) else None for s in steps_i],
            "blocks": blocks_i, "samples": samples, "branch": branch, "images": pngs or None,
            "lut": _b64(_lut().tobytes()), "labels": {m: CHANGE_LABEL[m] for m in measures},
            "change": list(CHANGE_MEASURES)}
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    payload = sum(len(v) for v in maps.values()) + len(json.dumps(means)) + img_bytes
    over = ", drawn over each sample's final image" if rgb is not None else ""
    caption = (f"Token-change explorer (no kernel needed): the per-token change of one block between adjacent "
               f"steps{over} ({rec.grid[0]}x{rec.grid[1]} tokens, {branch} branch); move the step and block "
               "sliders, pick a measure and a sample. One colour scale per measure, clipped at its 99th "
               "percentile.")
    if len(blocks_i) < l_all:
        caption += (f" Blocks subsampled to keep the embedded data under {max_payload_bytes / 1e6:g} MB: "
                    f"{len(blocks_i)} of {l_all} ({', '.join(map(str, blocks_i))}).")
    if len(steps_i) < s_all:
        caption += f" Steps subsampled too: {len(steps_i)} of {s_all}."
    h, w = rec.grid
    cw, ch = (canvas_size, max(1, round(canvas_size * h / w))) if w >= h else (max(1, round(canvas_size * w / h)),
                                                                                canvas_size)
    return StaticExplorer(measures=measures, samples=samples, steps=[int(rec.steps[s]) for s in steps_i],
                          blocks=blocks_i, scales=scales, branch=branch, payload_bytes=payload, caption=caption,
                          canvas=(cw, ch), _data_json=text, _has_images=rgb is not None,
                          _sample_names=[_sample_name(rec, i, branch) for i in samples])


def _thumb(rgb: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8, shrunk (area average) so its long side is at most ``size``."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if max(h, w) <= size:
        return rgb
    im = Image.fromarray(rgb)
    im.thumbnail((size, size), Image.BOX)
    return np.asarray(im)


# ---- finding a record (notebook 06) ----------------------------------------------------------------

def _is_images_file(p: Path) -> bool:
    """``record_X_images.npz`` beside ``record_X.npz`` is that record's images, not a record."""
    return p.stem.endswith(IMAGES_SUFFIX) and p.with_name(p.stem[: -len(IMAGES_SUFFIX)] + ".npz").is_file()


def records_in(folder: str | os.PathLike) -> list[Path]:
    """The ``record_*.npz`` files of a run folder (images files left out), the most recently written first."""
    d = Path(folder)
    files = [p for p in d.glob("record_*.npz") if p.is_file() and not _is_images_file(p)]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def find_record(run_folder: str | os.PathLike | None = None, record: str = "auto",
                reports_dir: str | os.PathLike | None = None) -> Path | None:
    """The path of the record file to explore, or None when no run folder holds one.

    Args:
        run_folder: a run folder (a path, or a run's folder name inside ``reports_dir``), a record
            ``.npz`` itself, or None = the newest run folder in ``reports_dir`` (as ``reports/index.html``
            orders them; failed runs skipped) that holds a ``record_*.npz`` (that ``record``, when named).
        record: the file in that folder, by name (``"record_sdedit.npz"`` or ``"record_sdedit"``), or
            ``"auto"`` = the record written last (notebook 01: its SDEdit record; 05: ``record_sdedit.npz``).
        reports_dir: the reports folder; needed when ``run_folder`` is None or a bare run name.

    Raises FileNotFoundError (naming what is there) when a given folder or record is missing.
    """
    from . import runs
    from .paths import resolve_path

    if run_folder is None:
        if reports_dir is None:
            raise ValueError("give run_folder, or reports_dir to search for the newest run folder with a record")
        name = None if record == "auto" else _record_name(record)
        for info in runs.list_runs(reports_dir):  # newest first
            have = records_in(info.path) if info.status != "failed" else []
            if have and (name is None or any(p.name == name for p in have)):
                return _pick(info.path, record, have)
        return None
    p = Path(run_folder).expanduser()
    if not p.is_absolute():
        cand = resolve_path(p, "run_folder", must_exist=False)
        if not cand.exists() and reports_dir is not None and (Path(reports_dir) / p).exists():
            cand = Path(reports_dir) / p
        p = cand
    if p.is_file() and p.suffix == ".npz":
        return p
    if not p.is_dir():
        where = f" or in the reports folder {reports_dir}" if reports_dir is not None else ""
        raise FileNotFoundError(f"run_folder {str(run_folder)!r}: no folder at {p}{where}; give a run folder of "
                                "notebook 01 or 05 (or None for the newest one holding a record)")
    return _pick(p, record)


def _record_name(record: str) -> str:
    return record if record.endswith(".npz") else record + ".npz"


def _pick(folder: Path, record: str, have: list[Path] | None = None) -> Path:
    have = records_in(folder) if have is None else have
    if record == "auto":
        if not have:
            raise FileNotFoundError(f"run folder {folder.name} holds no record_*.npz; pick a run of notebook 01 or 05")
        return have[0]
    name = _record_name(record)
    p = folder / name
    if not p.is_file():
        raise FileNotFoundError(f"no record {name!r} in run folder {folder.name}; it holds "
                                f"{[q.name for q in have] or 'no record_*.npz'} (or use record='auto')")
    return p


@dataclass
class OpenedRecord:
    """The record to explore, its images, and where they came from (:func:`open_record`)."""

    record: TokenChangeRecord
    images: np.ndarray | None  # (N, 3, H, W) float32 in [-1, 1], or None
    path: Path | None  # the record file read (or written, when recorded now)
    how: str  # one sentence for the reader

    def describe(self) -> str:
        return f"{self.how}\n{self.record!r}; images: {'yes' if self.images is not None else 'none saved'}"

    def summary(self) -> dict[str, Any]:
        """For ``run.write_summary``: which record was opened (folder and file names, no absolute paths).

        ``report`` (:class:`tclab.report.ReportSummary`) has key numbers and no findings: an explorer
        answers no yes/no question, it shows the maps.
        """
        from .report import KeyNumber, ReportSummary

        r = self.record
        info = {"record": self.path.name if self.path else None,
                "run_folder": self.path.parent.name if self.path else None, "how": self.how,
                "steps": r.num_steps, "blocks": r.num_blocks, "samples": int((r.branch == "cond").sum()),
                "grid": list(r.grid), "model": r.model_identity.get("name"), "images": self.images is not None}
        head = {k: info[k] for k in ("record", "run_folder", "steps", "blocks", "samples")}
        numbers = [KeyNumber("record", "record opened", head["record"]),
                   KeyNumber("run_folder", "from run folder", head["run_folder"]),
                   KeyNumber("steps", "steps", head["steps"]), KeyNumber("blocks", "blocks", head["blocks"]),
                   KeyNumber("samples", "samples (conditional rows)", head["samples"])]
        report = ReportSummary(key_numbers=numbers, index_keys=["record", "steps"],
                               question="Which tokens change, where on the image, at which step and in which block?")
        return {"headline": head, "opened": info, "report": report.to_dict(),
                "identity": {"model": r.model_identity.get("name"),
                             "model_weights_sha256": r.model_identity.get("weights_sha256")}}


def open_record(run_folder: str | os.PathLike | None = None, record: str = "auto",
                reports_dir: str | os.PathLike | None = None, *, save_to: str | os.PathLike | None = None,
                model: str = "shapes-dit", num_steps: int = 10, num_samples: int = 3) -> OpenedRecord:
    """:func:`find_record`, then load the record and its images; with nothing to find, record one now.

    The fallback (no run folder in ``reports_dir`` holds a record, e.g. a fresh clone) samples
    ``num_samples`` class-balanced samples of ``model`` over ``num_steps`` DDIM steps with CFG 4 and
    the recorder attached (seconds on the embedded model), and saves record and images into
    ``save_to`` (the calling notebook's run folder) as ``record_samples.npz`` / ``record_samples_images.npz``.
    """
    path = find_record(run_folder, record, reports_dir)
    if path is not None:
        rec, imgs, _ = _as_record(path, None)
        return OpenedRecord(rec, imgs, path, f"Opened {path.name} of run {path.parent.name}.")
    from .analysis import choose_sample_labels
    from .models import load_dit
    from .record import record_token_changes
    from .sampling import SampleConfig, sample

    dit = load_dit(model)
    labels = choose_sample_labels(num_samples, dit.num_classes)
    with record_token_changes(dit.transformer, model_identity=dit.identity()) as recorder:
        result = sample(dit, labels, SampleConfig(num_steps=num_steps), progress=False)
    rec, imgs = recorder.record, result.images.numpy()
    out = None
    if save_to is not None:
        out = rec.save(Path(save_to) / "record_samples.npz")
        save_record_images(out, imgs)
    how = (f"No run folder in the reports folder holds a record yet, so one was recorded now: {num_samples} "
           f"samples of {model} over {num_steps} steps" + (f", saved as {out.name}." if out else "."))
    return OpenedRecord(rec, imgs, out, how)


# ---- `tclab.explore(...)`: the module is callable ------------------------------------------------------

class _CallableModule(types.ModuleType):
    """``tclab.explore`` is this module *and* its main function: ``tclab.explore(record)`` calls
    :func:`explore`, while ``tclab.explore.static_explorer`` and the rest stay reachable. (A
    package attribute cannot be both a submodule and a function; making the module callable keeps
    one name for the feature.)"""

    def __call__(self, record, images=None, **kwargs):
        return explore(record, images, **kwargs)


def __getattr__(name: str):
    if name == "TokenChangeExplorer":  # built on first use (imports ipywidgets)
        return _explorer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallableModule
