"""tclab.plots' one look (plots.THEME): applied per figure, never globally.

A user's rcParams and style are the same before and after any tclab figure, a figure keeps tclab's
look when it is drawn later under the user's style (the lazily made ticks included), and the
statistical figures keep what they say: labels, timestep axes, colour-bar labels, intervals, legends.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from tclab import plots
from tclab.record import TokenChangeRecord

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg", force=False)  # tests need no display
import matplotlib.pyplot as plt  # noqa: E402


def record(steps=6, blocks=3, samples=2, tokens=16, seed=0) -> TokenChangeRecord:
    rng = np.random.default_rng(seed)
    out = rng.random((steps, blocks, samples, tokens)).astype(np.float32) * 0.3 + 0.01
    arrays = [out, out * 1.5, np.full_like(out, 0.5), np.full_like(out, 0.9)]
    for a in (arrays[0], arrays[1], arrays[3]):
        a[0] = np.nan  # no change at step 0, as the recorder stores it
    return TokenChangeRecord(out_change=arrays[0], update_change=arrays[1], update_ratio=arrays[2], cos=arrays[3],
                             steps=np.arange(steps), timesteps=np.linspace(900, 0, steps), grid=(4, 4),
                             class_labels=np.arange(samples) % 3, branch=np.array(["cond"] * samples),
                             sample_id=np.arange(samples))


def sweep_frame() -> pd.DataFrame:
    rows = [("full compute", "full compute", "reference", 1.0, 1.0, 100.0, 0.9),
            ("a hi", "a", "ablation", 0.6, 0.7, 30.0, 0.8), ("a lo", "a", "ablation", 0.3, 0.35, 20.0, 0.6),
            ("b hi", "b", "ablation", 0.45, 0.5, 25.0, 0.85), ("FORA", "FORA", "baseline", 0.5, 0.52, 26.0, 0.8),
            ("peer x", "peer x", "peer", 0.55, 0.6, 24.0, 0.7)]
    f = pd.DataFrame(rows, columns=["name", "curve", "family", "flop_ratio", "time_ratio", "psnr", "class_consistency"])
    f["error"] = ""
    f["config"] = [json.dumps({"name": n}) for n in f["name"]]
    for m, w in (("psnr", 1.5), ("class_consistency", 0.05), ("time_ratio", 0.04)):
        f[f"{m}_ci_low"], f[f"{m}_ci_high"] = f[m] - w, f[m] + w
    f["noise_floor_low"], f["noise_floor_high"] = 0.95, 1.05
    return f


REC, OTHER = record(), record(steps=4, seed=1)
FIGURES = {
    "heatmap": lambda: plots.plot_change_heatmap(REC),
    "curves": lambda: plots.plot_change_curves(REC),
    "distribution": lambda: plots.plot_change_distribution(REC),
    "rank_correlation": lambda: plots.plot_rank_correlation({"a": REC, "b": OTHER}),
    "trace_comparison": lambda: plots.plot_trace_comparison({"a": REC, "b": OTHER}),
    "pareto": lambda: plots.plot_pareto(sweep_frame(), "time_ratio", "psnr", budget=0.5),
    "pareto_grid": lambda: plots.plot_pareto_grid(sweep_frame(), budget=0.5),
    "token_maps": lambda: plots.plot_token_maps(REC, np.zeros((2, 3, 8, 8), np.float32)),
}


def _snapshot() -> dict:
    return {k: repr(v) for k, v in matplotlib.rcParams.items()}


@pytest.mark.parametrize("name", list(FIGURES))
def test_a_figure_leaves_the_callers_rcparams_as_they_were(name):
    with plt.rc_context({"font.size": 13.0, "axes.facecolor": "#fafad2", "lines.linewidth": 3.0}):  # a user's style
        before = _snapshot()
        fig = FIGURES[name]()
        fig.savefig(io.BytesIO(), format="png")
        after = _snapshot()
        plt.close(fig)
    assert after == before, sorted(k for k in before if before[k] != after[k])


def test_theme_rc_is_the_seaborn_theme_and_nothing_global():
    import seaborn as sns

    rc = plots.theme_rc()
    assert rc["axes.facecolor"] == sns.axes_style(plots.THEME["style"])["axes.facecolor"]
    assert rc["axes.labelsize"] == pytest.approx(sns.plotting_context(plots.THEME["context"],
                                                                      plots.THEME["font_scale"])["axes.labelsize"])
    assert [tuple(c) for c in rc["axes.prop_cycle"].by_key()["color"]] == [tuple(c) for c in plots.theme_palette()]
    before = _snapshot()
    plots.theme_rc()
    assert _snapshot() == before
    with pytest.raises(TypeError):
        plots.THEME["style"] = "dark"  # one theme, read-only: no global switch to flip


def test_a_figure_drawn_later_under_the_users_style_keeps_the_tclab_look():
    user = {"axes.facecolor": "#fafad2", "xtick.labelsize": 3.0, "ytick.labelsize": 3.0, "xtick.color": "red"}
    theme = plots.theme_rc()
    with plt.rc_context(user):
        fig = plots.plot_change_curves(REC)
        fig.canvas.draw()  # as a notebook shows it: after the function returned, under the user's rc
    try:
        ax = fig.axes[0]
        assert matplotlib.colors.same_color(ax.get_facecolor(), theme["axes.facecolor"])
        sizes = {t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()}
        assert sizes and all(sz == pytest.approx(theme["xtick.labelsize"]) for sz in sizes), sizes
        assert ax.xaxis.get_major_ticks()[0].tick1line.get_color() != "red"
    finally:
        plt.close(fig)


def test_a_callers_axes_keeps_its_style_and_gets_tclabs_curve_colours():
    user = {"axes.facecolor": "#fafad2", "axes.labelsize": 15.0}
    with plt.rc_context(user):
        fig, (mine, ax) = plt.subplots(1, 2)
        mine.set_xlabel("mine")
        before = _snapshot()
        out = plots.plot_pareto(sweep_frame(), "flop_ratio", "psnr", ax=ax, legend=False)
        assert _snapshot() == before
    try:
        assert out is fig and ax.get_ylabel().startswith("PSNR")
        # the axes are the caller's (made under the caller's style, which they keep); the points tclab adds
        # have tclab's curve colours (the theme's palette)
        for axes in (mine, ax):
            assert axes.xaxis.label.get_fontsize() == 15.0 and matplotlib.colors.same_color(axes.get_facecolor(),
                                                                                              "#fafad2")
        colors = plots.curve_colors(sweep_frame())
        points = [c for c in ax.collections if c.get_label() in colors]
        assert points and all(np.allclose(c.get_facecolor()[0][:3], matplotlib.colors.to_rgb(colors[c.get_label()]))
                              for c in points)
    finally:
        plt.close(fig)


def test_the_heatmap_keeps_its_axes_colour_bars_and_timestep_axis():
    fig = plots.plot_change_heatmap(REC)
    try:
        panels = [ax for ax in fig.axes if ax.get_ylabel().startswith("step index s")]
        assert len(panels) == 2 and {ax.get_title() for ax in panels} == {"out_change", "update_change"}
        for ax in panels:
            assert ax.get_xlabel() == "block index l (0 = first)"
            # step s sits at the centre of its row, labelled s; the t axis labels the same rows
            assert [t.get_text() for t in ax.get_yticklabels()] == [str(s) for s in REC.steps]
            np.testing.assert_allclose(ax.get_yticks(), REC.steps + 0.5)
            (sec,) = ax.child_axes
            assert "timestep t" in sec.get_ylabel()
            np.testing.assert_allclose(sec.get_yticks(), REC.steps + 0.5)
            assert [t.get_text() for t in sec.get_yticklabels()] == [f"{t:g}" for t in REC.timesteps]
            assert any(t.get_text() == "no previous step" for t in ax.texts)
            mesh = ax.collections[0]
            mat = REC.mean_over(ax.get_title(), ("sample", "token"), "cond")
            np.testing.assert_allclose(np.ma.filled(mesh.get_array(), np.nan).reshape(mat.shape), mat)
        bars = [ax for ax in fig.axes if ax.get_xlabel().startswith("mean relative change")]
        assert len(bars) == 2  # each panel's colour bar, labelled with its measure
    finally:
        plt.close(fig)


def test_the_distribution_is_seaborns_histogram_and_ecdf_of_the_same_values():
    fig = plots.plot_change_distribution(REC, measures="out_change")
    try:
        hx, cx = fig.axes[:2]
        v = REC.select("out_change", "cond")[1:].ravel()
        v = v[np.isfinite(v)]
        (hist,) = [ln for ln in hx.lines if ln.get_label() == "out_change"]
        edges, heights = np.asarray(hist.get_xdata()), np.asarray(hist.get_ydata())[:-1]
        np.testing.assert_allclose(edges, np.geomspace(v.min(), v.max(), 60), rtol=1e-6)  # 59 log-spaced bins
        expected = np.histogram(v, bins=edges)[0] / len(v)  # the share of entries per bin: sums to 1
        np.testing.assert_allclose(heights, expected, atol=1e-12)
        assert hx.get_xscale() == cx.get_xscale() == "log"
        (ecdf,) = [ln for ln in cx.lines if ln.get_label().startswith("out_change")]
        y = np.asarray(ecdf.get_ydata(), float)
        assert y[-1] == pytest.approx(1.0) and np.all(np.diff(y) >= 0)
        assert f"<5%: {np.mean(v < 0.05):.1%}" in ecdf.get_label()
        assert [t.get_text() for t in hx.get_legend().get_texts()] == ["out_change"]
        assert hx.get_ylabel().startswith("fraction of") and cx.get_ylabel() == "cumulative fraction below x"
    finally:
        plt.close(fig)


def test_pareto_keeps_error_bars_budget_noise_floor_and_distinct_curve_colours():
    f = sweep_frame()
    colors = plots.curve_colors(f)
    assert list(colors) == ["a", "b", "FORA", "peer x"]
    assert len({matplotlib.colors.to_hex(c) for c in colors.values()}) == 4  # never a shared colour
    with plt.rc_context({"axes.prop_cycle": matplotlib.cycler(color=["k"])}):
        assert plots.curve_colors(f) == colors  # the theme's palette, whatever style is active
    fig = plots.plot_pareto(f, "time_ratio", "psnr", budget=0.5)
    try:
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert {"a", "b", "FORA", "peer x", "Pareto front"} <= set(labels)
        assert any(s.startswith("over budget") for s in labels)
        assert any(s.startswith("timing noise floor") for s in labels)
        assert any(isinstance(c, matplotlib.collections.LineCollection) for c in ax.collections)  # the error bars
    finally:
        plt.close(fig)
