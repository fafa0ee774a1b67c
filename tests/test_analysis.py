"""tclab.analysis and tclab.plots on hand-made TokenChangeRecords whose answers are known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tclab import analysis, plots
from tclab.data import ImageRecord, ImageSet
from tclab.record import TokenChangeRecord


def make_record(out, update=None, ratio=None, timesteps=None, grid=None, uncond=None) -> TokenChangeRecord:
    """A record from a (S, L, B, N) ``out_change`` array (cond rows); step 0 is set to NaN as the recorder does.

    ``uncond``: an optional array of the same shape for unconditional twin rows (CFG layout).
    """
    out = np.array(out, dtype=np.float32)
    s, l, b, n = out.shape
    update = out.copy() if update is None else np.array(update, dtype=np.float32)
    ratio = np.full(out.shape, 0.5, np.float32) if ratio is None else np.array(ratio, dtype=np.float32)
    cos = np.full(out.shape, 0.9, np.float32)
    arrays = [out, update, ratio, cos]
    branch, ids = ["cond"] * b, list(range(b))
    if uncond is not None:
        u = np.array(uncond, dtype=np.float32)
        arrays = [np.concatenate([a, u], axis=2) for a in arrays]
        branch, ids = branch + ["uncond"] * b, ids + ids
    for a in arrays[:2] + arrays[3:]:
        a[0] = np.nan  # change measures do not exist at step 0
    grid = grid or (1, n)
    t = np.linspace(900, 0, s) if timesteps is None else np.asarray(timesteps, float)
    return TokenChangeRecord(out_change=arrays[0], update_change=arrays[1], update_ratio=arrays[2], cos=arrays[3],
                             steps=np.arange(s), timesteps=t, grid=grid, class_labels=np.arange(len(branch)) % 3,
                             branch=np.array(branch), sample_id=np.array(ids))


def tile(per_step_token, blocks=2, samples=2):
    """(S, N) values -> (S, L, B, N), the same map in every block and sample."""
    a = np.asarray(per_step_token, dtype=np.float64)
    return np.broadcast_to(a[:, None, None, :], (a.shape[0], blocks, samples, a.shape[1])).copy()


# ---- distribution --------------------------------------------------------------------------------

def test_fractions_below_thresholds_are_exact_and_step0_is_excluded():
    tokens = np.array([0.005, 0.03, 0.07, 0.5] * 4)  # a quarter below 1%, half below 5%, three quarters below 10%
    rec = make_record(tile(np.tile(tokens, (5, 1))))
    d = analysis.summarise_change_distribution(rec, "out_change")
    assert d["entries"] == 4 * 2 * 2 * 16  # steps 1..4 only: step 0 is NaN
    assert d["fraction_below"] == pytest.approx({"below_1pct": 0.25, "below_5pct": 0.5, "below_10pct": 0.75})
    assert d["per_step"]["step"] == [1, 2, 3, 4]
    assert d["per_step"]["t"] == pytest.approx(list(rec.timesteps[1:]))
    assert d["per_step"]["below_5pct"] == pytest.approx([0.5] * 4)
    assert d["quantiles"]["q10"] == pytest.approx(0.005)
    assert d["mean"] == pytest.approx(tokens.mean(), rel=1e-6)


def test_fraction_below_per_step_follows_the_steps():
    vals = np.zeros((3, 8))
    vals[1] = 0.02  # step 1: every token below 5%
    vals[2] = 0.2  # step 2: none
    d = analysis.summarise_change_distribution(make_record(tile(vals)))
    assert d["per_step"]["below_5pct"] == pytest.approx([1.0, 0.0])
    assert d["fraction_below"]["below_5pct"] == pytest.approx(0.5)


def test_a_record_without_change_values_raises_with_a_hint():
    rec = make_record(tile(np.ones((1, 4))))  # one step: everything NaN
    with pytest.raises(ValueError, match="at least 2 steps"):
        analysis.summarise_change_distribution(rec)


# ---- observation 1 ------------------------------------------------------------------------------

def test_concentration_of_equal_change_and_of_one_token():
    n = 20
    equal = make_record(tile(np.ones((4, n))))
    c = analysis.measure_change_concentration(equal)
    assert c["top_share"]["10pct"] == pytest.approx(0.1)
    assert c["top_share"]["20pct"] == pytest.approx(0.2)
    assert c["gini"] == pytest.approx(0.0, abs=1e-12)
    one = np.zeros((4, n))
    one[:, 7] = 3.0
    c1 = analysis.measure_change_concentration(make_record(tile(one)))
    assert c1["top_share"]["10pct"] == pytest.approx(1.0)
    assert c1["gini"] == pytest.approx((n - 1) / n)
    assert analysis.check_few_tokens_change_a_lot(make_record(tile(one)))["holds"] is True
    verdict = analysis.check_few_tokens_change_a_lot(equal)
    assert verdict["holds"] is False and "DOES NOT HOLD" in verdict["verdict"]


def test_gini_of_a_known_vector():
    # values 1, 2, 3, 4: G = sum_i (2i - n - 1) x_i / (n sum x) = (-3 - 2 + 3 + 12) / (4 * 10) = 0.25
    c = analysis.measure_change_concentration(make_record(tile(np.tile([4.0, 1.0, 3.0, 2.0], (3, 1)))))
    assert c["gini"] == pytest.approx(0.25)
    assert c["gini_by_block"] == pytest.approx([0.25, 0.25])


# ---- observation 2 ------------------------------------------------------------------------------

def test_repeated_maps_have_rank_correlation_one_but_no_decay():
    rng = np.random.default_rng(0)
    base = rng.permutation(32) + 1.0
    vals = np.stack([base * (s + 1) for s in range(9)])  # values change, the order of tokens does not
    rec = make_record(tile(vals))
    rc = analysis.rank_correlation_by_distance(rec)
    assert rc["distances"] == [1, 2, 4]  # steps 1..8: the longest distance is 7
    assert rc["mean"] == pytest.approx([1.0, 1.0, 1.0])
    assert rc["adjacent_by_step"]["step"] == list(range(2, 9))
    v = analysis.check_adjacent_steps_correlated(rec)
    assert v["adjacent_rank_corr"] == pytest.approx(1.0)
    assert v["decays_with_distance"] is False and v["holds"] is False  # a fixed layout is not a short memory
    assert v["top20pct_overlap"]["overlap"] == pytest.approx([1.0, 1.0, 1.0])


def test_reversed_order_every_step_gives_minus_one_then_plus_one():
    base = np.arange(1.0, 17.0)
    vals = np.stack([base if s % 2 else base[::-1] for s in range(6)])
    rc = analysis.rank_correlation_by_distance(make_record(tile(vals)), distances=[1, 2, 3])
    assert rc["mean"] == pytest.approx([-1.0, 1.0, -1.0])


def test_drifting_maps_are_correlated_next_step_and_decay_with_distance():
    rng = np.random.default_rng(1)
    n, steps = 256, 17
    maps = [rng.normal(size=n)]
    for _ in range(steps - 1):  # AR(1): corr(s, s+d) = 0.9**d
        maps.append(0.9 * maps[-1] + math.sqrt(1 - 0.81) * rng.normal(size=n))
    vals = np.exp(np.stack(maps))  # positive "change" values, same ranks as the AR(1) maps
    v = analysis.check_adjacent_steps_correlated(make_record(tile(vals, blocks=2, samples=3)))
    assert v["holds"] is True
    assert 0.8 < v["adjacent_rank_corr"] < 0.97
    assert v["far_distance"] == 8 and v["far_rank_corr"] < 0.7
    means = v["rank_corr_by_distance"]["mean"]
    assert all(a > b for a, b in zip(means, means[1:]))  # monotone decay 1 > 2 > 4 > 8


def test_independent_maps_are_uncorrelated():
    rng = np.random.default_rng(2)
    v = analysis.check_adjacent_steps_correlated(make_record(rng.random((12, 3, 4, 64))))
    assert abs(v["adjacent_rank_corr"]) < 0.05
    assert v["holds"] is False
    ov = v["top20pct_overlap"]
    assert abs(ov["overlap"][0] - ov["chance"]) < 0.05


def test_constant_maps_are_skipped_not_counted_as_correlated():
    vals = np.ones((5, 16))
    vals[3] = np.arange(16)  # only step 3 has any order
    rc = analysis.rank_correlation_by_distance(make_record(tile(vals)), distances=[1])
    assert rc["pairs"] == [0]  # every adjacent pair involves a constant map: undefined, not 0 or 1


# ---- observation 3 ------------------------------------------------------------------------------

def test_detect_phase_split_finds_an_exact_two_phase_curve():
    curve = [np.nan, 1, 1, 1, 1, 5, 5, 5, 5, 5]
    sp = analysis.detect_phase_split(curve)
    assert sp["split_step"] == 5
    assert sp["phase1_steps"] == [1, 4] and sp["phase2_steps"] == [5, 9]
    assert sp["phase1_mean"] == pytest.approx(1) and sp["phase2_mean"] == pytest.approx(5)
    assert sp["variance_explained"] == pytest.approx(1.0)
    assert analysis.detect_phase_split([3.0, 1.0], steps=[7, 8])["split_step"] == 8
    assert analysis.detect_phase_split([np.nan, 2.0])["split_step"] is None


def test_detect_phase_split_on_a_noisy_step_and_a_ramp():
    rng = np.random.default_rng(3)
    curve = np.r_[np.full(30, 0.1), np.full(20, 0.4)] + rng.normal(0, 0.01, 50)
    assert analysis.detect_phase_split(curve)["split_step"] == 30
    ramp = analysis.detect_phase_split(np.arange(100.0))
    assert ramp["split_step"] == 50 and ramp["variance_explained"] == pytest.approx(0.75, abs=0.01)


def test_one_outlying_last_step_is_not_a_phase():
    # what the embedded model's final DDIM step looks like: a flat-ish curve and one big jump at the end
    curve = np.r_[np.nan, np.full(25, 0.2), np.full(23, 0.1), 3.0]
    sp = analysis.detect_phase_split(curve)
    assert sp["split_step"] == 26  # the real change of level, not step 49
    assert sp["phase2_mean"] == pytest.approx((23 * 0.1 + 3.0) / 24)  # means of the measured values


@pytest.mark.parametrize("low_first", [True, False])
def test_uneven_trajectory_gives_the_tprr_split(low_first):
    levels = np.r_[np.full(6, 0.05), np.full(4, 0.3)] if low_first else np.r_[np.full(6, 0.3), np.full(4, 0.05)]
    vals = np.broadcast_to(levels[:, None], (10, 16)) * np.linspace(0.5, 1.5, 16)  # token spread, same means
    t = np.arange(10)[::-1] * 100.0 + 1
    rec = make_record(tile(vals), timesteps=t)
    v = analysis.check_uneven_over_trajectory(rec)
    assert v["holds"] is True
    assert v["split_step"] == 6 and v["split_t"] == pytest.approx(t[6])
    assert v["suggested_tprr_split"] == pytest.approx(0.6)
    assert math.ceil(round(v["suggested_tprr_split"] * 10, 9)) == 6  # tprr_schedule's first step of phase 2
    assert v["longer_interval_phase"] == ("first" if low_first else "second")
    assert v["phase_mean_ratio"] == pytest.approx(6.0)


def test_flat_trajectory_does_not_show_phases():
    rng = np.random.default_rng(4)
    vals = 0.2 + rng.normal(0, 0.002, (12, 16))
    v = analysis.check_uneven_over_trajectory(make_record(tile(vals)))
    assert v["holds"] is False and v["phase_mean_ratio"] < 1.1


# ---- blocks, tables, summary --------------------------------------------------------------------

def test_block_importance_orders_blocks_by_update_ratio():
    out = np.ones((3, 3, 2, 4))
    ratio = np.broadcast_to(np.array([0.2, 0.9, 0.5])[None, :, None, None], out.shape)
    imp = analysis.measure_block_importance(make_record(out, ratio=ratio))
    assert imp["update_ratio"] == pytest.approx([0.2, 0.9, 0.5])
    assert imp["order"] == [1, 2, 0]


def test_summary_is_plain_json_with_headline_and_ignores_the_uncond_branch():
    rng = np.random.default_rng(5)
    cond = rng.random((6, 2, 3, 16))
    rec = make_record(cond, uncond=cond * 100 + 7)  # wildly different twins: must not leak into cond numbers
    alone = make_record(cond)
    s = analysis.summarise_redundancy(rec, sdedit_record=alone)
    text = json.dumps(s, allow_nan=False)  # strict JSON: NaN became None
    assert json.loads(text) == s
    head = s["headline"]
    for k in ("frac_tokens_below_5pct", "top10pct_change_share", "gini", "adjacent_rank_corr", "far_rank_corr",
              "suggested_tprr_split", "obs1_holds", "obs2_holds", "obs3_holds", "sdedit_adjacent_rank_corr"):
        assert k in head
    assert all(isinstance(v, (int, float, bool, str, type(None))) for v in head.values())
    ref = analysis.summarise_redundancy(alone)["headline"]
    assert {k: head[k] for k in ref} == ref  # the uncond rows changed nothing
    assert head["sdedit_adjacent_rank_corr"] == ref["adjacent_rank_corr"]
    assert set(s["observations"]) == {"out_change", "update_change"}
    assert s["comparison"]["adjacent_rank_corr"]["samples"] == ref["adjacent_rank_corr"]
    assert s["record"]["samples"] == 3 and s["record"]["cfg"] is True
    assert "HOLD" in analysis.describe_observations(s)


def test_two_step_record_is_undetermined_not_an_error():
    rec = make_record(np.random.default_rng(6).random((2, 2, 2, 8)))
    s = analysis.summarise_redundancy(rec)
    obs = s["observations"]["out_change"]
    assert obs["adjacent_steps_correlated"]["holds"] is None
    assert obs["uneven_over_trajectory"]["holds"] is None
    assert s["headline"]["suggested_tprr_split"] is None
    json.dumps(s, allow_nan=False)


def test_per_step_table():
    vals = np.zeros((4, 8))
    vals[1:] = [[0.02] * 8, [0.2] * 8, [0.04] * 4 + [0.5] * 4]
    df = analysis.tabulate_per_step(make_record(tile(vals)))
    assert list(df["step"]) == [0, 1, 2, 3]
    assert np.isnan(df.loc[0, "out_change_below_5pct"])
    assert list(df["out_change_below_5pct"][1:]) == pytest.approx([1.0, 0.0, 0.5])
    assert "update_change_rank_corr_prev" in df and "update_ratio_mean" in df


def test_choose_sample_labels():
    assert analysis.choose_sample_labels(7, 3) == [0, 1, 2, 0, 1, 2, 0]
    assert analysis.choose_sample_labels(4, 6, classes=[5, 2]) == [5, 2, 5, 2]
    with pytest.raises(ValueError, match="out of range"):
        analysis.choose_sample_labels(2, 3, classes=[3])


def test_choose_balanced_images_round_robins_over_classes():
    labels = [0, 0, 0, 1, 1, 2]
    recs = [ImageRecord(f"c{c}/{i}.png", f"c{c}", c, 8, 8, "RGB", f"sha{i}") for i, c in enumerate(labels)]
    full = ImageSet(root=None, resolution=8, class_names=["c0", "c1", "c2"], images=torch.arange(6.0)[:, None],
                    labels=torch.tensor(labels), records=recs)
    sub = analysis.choose_balanced_images(full, 4)
    assert sub.labels.tolist() == [0, 1, 2, 0]
    assert sub.images[:, 0].tolist() == [0.0, 3.0, 5.0, 1.0]
    assert [r.path for r in sub.records] == ["c0/0.png", "c1/3.png", "c2/5.png", "c0/1.png"]
    assert sub.manifest_hash() != full.manifest_hash()
    assert len(analysis.choose_balanced_images(full, 100)) == 6


# ---- plots --------------------------------------------------------------------------------------

def test_plots_return_figures():
    import matplotlib

    matplotlib.use("Agg", force=False)  # tests need no display
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    rng = np.random.default_rng(7)
    rec = make_record(rng.random((6, 3, 2, 16)), grid=(4, 4))
    other = make_record(rng.random((4, 3, 2, 16)), grid=(4, 4), timesteps=[300, 200, 100, 0])
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    figs = [
        plots.plot_change_heatmap(rec),
        plots.plot_change_curves(rec),
        plots.plot_token_maps(rec, images),
        plots.plot_token_maps(rec, images, steps=[2], blocks=[-1], samples=[1]),
        plots.plot_change_distribution(rec),
        plots.plot_rank_correlation({"a": rec, "b": other}),
        plots.plot_trace_comparison({"a": rec, "b": other}),
        plots.plot_image_rows({"x": images, "y": images[:1]}),
    ]
    try:
        assert all(isinstance(f, Figure) for f in figs)
        heat = figs[0]
        assert any("step index s" in ax.get_ylabel() for ax in heat.axes)
        secondary = [c for ax in heat.axes for c in ax.child_axes]  # the t axis is a secondary axis of the s axis
        assert any("timestep t" in c.get_ylabel() for c in secondary)
        with pytest.raises(ValueError, match="has no image"):
            plots.plot_token_maps(rec, images[:1])
    finally:
        for f in figs:
            plt.close(f)
