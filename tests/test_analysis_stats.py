"""Intervals and stable verdicts of the redundancy analysis (issue #19, item 4), on records whose answers
are planted by construction.

Every record here is built so the per-sample value of the statistic is known exactly: a token change map
whose top 10 % carry a share q (two tokens of value a = 9q / (1 - q) among 18 of value 1), cyclic shifts
of a ramp whose Spearman correlation is 1 - 6k(N - k) / (N^2 - 1), per-step curves made of levels. The
mean of any resample then lies between the smallest and the largest planted value, so an interval
outside that range, or a verdict the planted values do not support, is a bug.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from tclab import analysis
from tclab.record import TokenChangeRecord
from tclab.report import DOES_NOT_HOLD, HOLDS, NOT_MEASURED, WITHIN_NOISE, ReportSummary
from tclab.stats import (bootstrap_ci, bootstrap_over_samples, bootstrap_weights, percentile_interval,
                         verdict_agreement)


def record_of(out, timesteps=None) -> TokenChangeRecord:
    """A record (cond rows only) from a (S, L, B, N) ``out_change`` array; step 0 is NaN as the recorder makes it."""
    out = np.array(out, dtype=np.float32)
    s, _, b, n = out.shape
    out[0] = np.nan
    t = np.linspace(900, 0, s) if timesteps is None else np.asarray(timesteps, float)
    return TokenChangeRecord(out_change=out, update_change=out.copy(), update_ratio=np.full(out.shape, 0.5, np.float32),
                             cos=np.where(np.isnan(out), np.nan, 0.9).astype(np.float32), steps=np.arange(s),
                             timesteps=t, grid=(1, n), class_labels=np.arange(b) % 3, branch=np.array(["cond"] * b),
                             sample_id=np.arange(b))


def concentrated(shares, steps=3, blocks=2, n=20) -> TokenChangeRecord:
    """Sample i's every map: its top 10 % (2 of 20 tokens) carry exactly ``shares[i]`` of the change."""
    maps = []
    for q in shares:
        m = np.ones(n)
        m[[3, 11]] = 9 * q / (1 - q)  # 2a / (2a + 18) = q
        maps.append(m)
    a = np.asarray(maps)  # (B, N)
    return record_of(np.broadcast_to(a[None, None], (steps, blocks, *a.shape)))


def shifted_ramps(shifts, steps=10, blocks=2, n=256) -> TokenChangeRecord:
    """Sample i's map at step s is a ramp cyclically shifted by s * shifts[i] tokens (0.05 .. 1, all distinct)."""
    ramp = np.linspace(0.05, 1.0, n)
    a = np.stack([[np.roll(ramp, s * c) for c in shifts] for s in range(steps)])  # (S, B, N)
    return record_of(np.broadcast_to(a[:, None], (steps, blocks, len(shifts), n)))


def spearman_of_shift(k: int, n: int = 256) -> float:
    """Spearman correlation of 0..n-1 and its cyclic shift by k: n - k ranks move by k, k ranks by n - k."""
    k %= n
    return 1 - 6 * k * (n - k) * n / (n * (n * n - 1))


def curves(levels) -> TokenChangeRecord:
    """(B, S) per-sample per-step mean change: every block and token of sample i at step s holds levels[i][s]."""
    a = np.asarray(levels, dtype=float).T  # (S, B)
    return record_of(np.broadcast_to(a[:, None, :, None], (a.shape[0], 2, a.shape[1], 8)))


# ---- tclab.stats: resampling whole samples --------------------------------------------------------

def test_bootstrap_weights_are_the_draws_of_bootstrap_ci():
    x = np.random.default_rng(1).normal(size=9)
    w = bootstrap_weights(9, 500, seed=4)
    assert w.shape == (500, 9) and (w.sum(axis=1) == 9).all() and (w >= 0).all()
    mean = bootstrap_ci(x, resamples=500, seed=4)
    weighted = bootstrap_over_samples(lambda w: w @ x / w.sum(-1), 9, resamples=500, seed=4)
    looped = bootstrap_over_samples(lambda w: np.mean(np.repeat(x, w)), 9, resamples=500, seed=4, vectorised=False)
    for got in (weighted, looped):
        assert (got.estimate, got.low, got.high, got.n) == pytest.approx((mean.estimate, mean.low, mean.high, 9))
    assert not np.array_equal(w, bootstrap_weights(9, 500, seed=5))  # the seed matters


def test_percentile_interval_leaves_out_undefined_resamples_and_needs_two_samples():
    iv = percentile_interval(2.0, [np.nan, 1.0, 2.0, 3.0, np.nan], 5)
    assert iv.dropped == 2 and 1.0 <= iv.low < iv.high <= 3.0
    one = percentile_interval(2.0, [1.0, 2.0, 3.0], 1)
    assert math.isnan(one.low) and one.to_dict("x") == {"x": 2.0, "x_ci": [None, None], "x_n": 1}
    with pytest.raises(ValueError, match="vectorised"):
        bootstrap_over_samples(lambda w: np.zeros(3) if w.ndim == 2 else 0.0, 4, resamples=10)  # 3 values, not 10
    assert verdict_agreement([True, False, True, True], True) == 0.75


# ---- observation 1 --------------------------------------------------------------------------------

def test_a_planted_concentration_far_above_the_threshold_is_a_stable_holds():
    planted = np.linspace(0.55, 0.65, 12)
    obs = analysis.check_few_tokens_change_a_lot(concentrated(planted))
    assert obs["top10pct_share"] == pytest.approx(planted.mean(), rel=1e-5)
    lo, hi = obs["top10pct_share_ci"]
    assert planted.min() - 1e-6 <= lo < planted.mean() < hi <= planted.max() + 1e-6  # resample means stay inside
    assert hi - lo < 0.05 and obs["top10pct_share_n"] == 12 and obs["samples"] == 12
    assert obs["holds"] is True and obs["agreement"] == 1.0 and obs["stable"] is True and obs["outcome"] == HOLDS
    assert obs["verdict"].startswith("HOLDS") and f"[{100 * lo:.1f}, {100 * hi:.1f}]" in obs["verdict"]
    assert "stable: 100% of 2000 bootstrap resamples of the 12 samples agree" in obs["verdict"]


def test_a_concentration_at_the_threshold_is_within_noise():
    # three samples at 0.16 and three at 0.35: the mean 0.255 clears 0.25, but a resample does only when it
    # draws at least three 0.35s (m / 6 * 0.19 + 0.16 >= 0.25), in 42 of 64 equally likely cases
    obs = analysis.check_few_tokens_change_a_lot(concentrated([0.16, 0.35] * 3))
    assert obs["holds"] is True and obs["top10pct_share"] == pytest.approx(0.255, rel=1e-5)
    lo, hi = obs["top10pct_share_ci"]
    assert 0.16 - 1e-6 <= lo < 0.25 < hi <= 0.35 + 1e-6  # the interval straddles the criterion
    assert obs["agreement"] == pytest.approx(42 / 64, abs=0.04)
    assert obs["stable"] is False and obs["outcome"] == WITHIN_NOISE
    assert obs["verdict"].startswith("WITHIN NOISE (point estimate: holds)")
    s = analysis.summarise_redundancy(concentrated([0.16, 0.35] * 3))
    head = s["headline"]
    assert head["obs1_holds"] is True and head["obs1_stable"] is False and head["obs1_verdict"] == WITHIN_NOISE
    first = ReportSummary.from_dict(s["report"]).findings[0]
    assert first.verdict == WITHIN_NOISE and "within noise" in first.text and "N = 6 samples" in first.text
    assert "97.5% of 2000 bootstrap resamples" in first.criterion


def test_equal_samples_give_a_zero_width_interval_and_one_sample_none():
    same = analysis.check_few_tokens_change_a_lot(concentrated([0.4] * 5))
    assert same["top10pct_share_ci"] == pytest.approx([0.4, 0.4], rel=1e-5) and same["stable"] is True
    one = analysis.check_few_tokens_change_a_lot(concentrated([0.4]))
    assert one["top10pct_share_ci"] == [None, None] or all(math.isnan(v) for v in one["top10pct_share_ci"])
    assert one["stable"] is None and one["agreement"] is None and one["outcome"] == HOLDS  # nothing to resample
    assert "1 sample: no interval" in one["verdict"]


def test_the_concentration_interval_covers_the_population_mean_at_about_the_nominal_rate():
    # per-sample shares ~ U(0.3, 0.5): the population mean is 0.4. 200 trials of 20 samples: a 95 % interval
    # covers it in about 93 % of them (the percentile bootstrap is a little narrow at n = 20); the bounds
    # allow that plus four binomial standard deviations (1.7 points) of simulation noise.
    rng = np.random.default_rng(0)
    boot = analysis.BootstrapConfig(resamples=1000)
    hits = 0
    for trial in range(200):
        obs = analysis.check_few_tokens_change_a_lot(concentrated(rng.uniform(0.3, 0.5, 20), steps=2, blocks=1),
                                                     bootstrap=dataclasses.replace(boot, seed=trial))
        lo, hi = obs["top10pct_share_ci"]
        hits += lo <= 0.4 <= hi
    assert 0.86 <= hits / 200 <= 0.99


def test_the_fractions_below_thresholds_carry_intervals_over_samples():
    # sample i: a share p_i of its tokens move 1 % (below 5 %), the rest 50 %
    maps = [np.r_[np.full(k, 0.01), np.full(20 - k, 0.5)] for k in (2, 4, 6, 8)]
    a = np.asarray(maps)
    d = analysis.summarise_change_distribution(record_of(np.broadcast_to(a[None, None], (3, 2, 4, 20))))
    assert d["fraction_below"]["below_5pct"] == pytest.approx(0.25) and d["samples"] == 4
    lo, hi = d["fraction_below_ci"]["below_5pct"]
    assert 0.1 <= lo < 0.25 < hi <= 0.4


# ---- observation 2 --------------------------------------------------------------------------------

def test_planted_rank_correlations_are_inside_their_intervals_and_the_verdict_is_stable():
    shifts = [1, 1, 2, 2, 3, 3]
    obs = analysis.check_adjacent_steps_correlated(shifted_ramps(shifts))
    planted = np.array([spearman_of_shift(c) for c in shifts])
    assert obs["adjacent_rank_corr"] == pytest.approx(planted.mean(), abs=1e-6)
    far = np.array([spearman_of_shift(8 * c) for c in shifts])  # steps 1..9: the far distance is 8
    assert obs["far_distance"] == 8 and obs["far_rank_corr"] == pytest.approx(far.mean(), abs=1e-6)
    lo, hi = obs["adjacent_rank_corr_ci"]
    assert planted.min() - 1e-9 <= lo <= planted.mean() <= hi <= planted.max() + 1e-9
    assert obs["rank_corr_decay_ci"][0] > 0.05  # decays, and surely so
    assert obs["holds"] is True and obs["stable"] is True and obs["outcome"] == HOLDS
    rc = obs["rank_corr_by_distance"]
    assert len(rc["mean_ci"]) == len(rc["distances"]) == 4 and rc["samples"] == 6
    assert all(c[0] <= m <= c[1] for m, c in zip(rc["mean"], rc["mean_ci"]))


def test_an_adjacent_correlation_at_the_threshold_is_within_noise():
    # shifts 20 and 28 of a 256-token ramp: correlations 0.568 and 0.416 (both decay by more than 0.05 at
    # distance 8), mean 0.492 < 0.5; a resample reaches 0.5 with four or more shift-20 samples: 22 of 64
    obs = analysis.check_adjacent_steps_correlated(shifted_ramps([20, 28] * 3))
    assert obs["adjacent_rank_corr"] == pytest.approx((spearman_of_shift(20) + spearman_of_shift(28)) / 2, abs=1e-6)
    assert obs["holds"] is False and obs["agreement"] == pytest.approx(42 / 64, abs=0.04)
    assert obs["stable"] is False and obs["outcome"] == WITHIN_NOISE
    lo, hi = obs["adjacent_rank_corr_ci"]
    assert lo < 0.5 < hi


# ---- observation 3 --------------------------------------------------------------------------------

def test_a_phase_split_made_by_the_final_step_alone_is_flagged():
    # what the 10-step smoke run shows: a flat-ish curve and a jump at the final step (t = 0)
    rng = np.random.default_rng(2)
    base = np.r_[np.nan, 0.2 + 0.02 * np.sin(np.arange(8)), 0.6]  # steps 0..9
    obs = analysis.check_uneven_over_trajectory(curves(base * rng.uniform(0.95, 1.05, (6, 1))))
    assert obs["split_step"] == 9 and obs["holds"] is True and obs["stable"] is True and obs["outcome"] == HOLDS
    w = obs["without_final_step"]
    assert w["dropped_step"] == 9 and w["holds"] is False and w["phase_mean_ratio"] < 1.5
    assert w["phase_mean_ratio_ci"][1] < 1.5 and w["stable"] is True
    assert obs["driven_by_final_step"] is True and obs["driven_by_steps"] == [9]
    assert "driven by the final step (s = 9, t = 0)" in obs["verdict"]
    s = analysis.summarise_redundancy(curves(base * rng.uniform(0.95, 1.05, (6, 1))))
    assert s["headline"]["obs3_driven_by_final_step"] is True and s["headline"]["obs3_holds_without_final_step"] is False
    third = ReportSummary.from_dict(s["report"]).findings[2]
    assert third.verdict == HOLDS and "driven by the final step (s = 9, t = 0)" in third.text
    assert "does not hold" in third.text  # what it would be without that step


def test_two_real_phases_do_not_depend_on_any_single_step():
    levels = np.r_[np.nan, np.full(5, 0.05), np.full(4, 0.3)]
    obs = analysis.check_uneven_over_trajectory(curves([levels] * 4))
    assert obs["holds"] is True and obs["split_step"] == 6
    assert obs["driven_by_steps"] == [] and obs["driven_by_final_step"] is False
    assert obs["without_final_step"]["holds"] is True and obs["without_final_step"]["phase_mean_ratio"] == pytest.approx(6)
    assert "driven" not in obs["verdict"] and "Without the final step (s = 9, t = 0)" in obs["verdict"]


def test_a_verdict_one_middle_step_decides_names_that_step():
    # phase 2 = 1.8, 1.45, 1.45, 1.45 over phase 1 = 1: ratio 1.54 >= 1.5, but 1.45 without step 6;
    # without any other step it stays >= 1.5 (1.57 without a 1.45, 1.54 without a phase-1 step)
    levels = np.r_[np.nan, 1, 1, 1, 1, 1, 1.8, 1.45, 1.45, 1.45]
    obs = analysis.check_uneven_over_trajectory(curves([levels] * 3), min_variance_explained=0.5)
    assert obs["holds"] is True and obs["phase_mean_ratio"] == pytest.approx(1.5375)
    assert obs["driven_by_steps"] == [6] and obs["driven_by_final_step"] is False
    loo = dict(zip(obs["leave_one_step_out"]["step"], obs["leave_one_step_out"]["holds"]))
    assert loo[6] is False and all(loo[s] for s in loo if s != 6)
    assert "leaving out step 6 (t = 300) alone flips it" in obs["verdict"]


def test_the_phase_ratio_interval_lies_between_the_samples_own_ratios():
    # sample i: level a_i before step 5, b_i from it; any resample's ratio of means lies between min and max b_i / a_i
    a = np.array([0.10, 0.12, 0.08, 0.11, 0.09])
    b = np.array([0.40, 0.42, 0.30, 0.50, 0.33])
    levels = [np.r_[np.nan, np.full(4, ai), np.full(5, bi)] for ai, bi in zip(a, b)]
    obs = analysis.check_uneven_over_trajectory(curves(levels))
    assert obs["split_step"] == 5 and obs["phase_mean_ratio"] == pytest.approx(b.mean() / a.mean(), rel=1e-5)
    lo, hi = obs["phase_mean_ratio_ci"]
    assert (b / a).min() - 1e-6 <= lo <= obs["phase_mean_ratio"] <= hi <= (b / a).max() + 1e-6
    assert obs["variance_explained_ci"] == pytest.approx([1.0, 1.0])  # two flat phases in every resample
    band = analysis.per_step_mean_change_interval(curves(levels))
    assert np.isnan(band["low"][0]) and (band["low"][1:] <= band["mean"][1:] + 1e-9).all()
    assert band["low"][1] >= a.min() - 1e-6 and band["high"][9] <= b.max() + 1e-6


def test_too_few_steps_leave_observation_3_not_measured():
    obs = analysis.check_uneven_over_trajectory(curves([[np.nan, 0.2]] * 3))
    assert obs["holds"] is None and obs["outcome"] == NOT_MEASURED and obs["without_final_step"] is None
    three = analysis.check_uneven_over_trajectory(curves([[np.nan, 0.1, 0.5]] * 3))
    assert three["without_final_step"] is None  # one point left without the final step: nothing to split


# ---- the summary and the report -------------------------------------------------------------------

def test_the_summary_carries_intervals_beside_every_headline_number():
    rng = np.random.default_rng(5)
    rec = record_of(rng.random((8, 2, 5, 16)))
    s = analysis.summarise_redundancy(rec, sdedit_record=record_of(rng.random((5, 2, 4, 16))))
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    head, iv = s["headline"], s["intervals"]
    assert all(isinstance(v, (int, float, bool, str, type(None))) for v in head.values())  # run.write_summary's rule
    for name in ("frac_tokens_below_5pct", "top10pct_change_share", "gini", "adjacent_rank_corr", "far_rank_corr",
                 "phase_mean_ratio", "phase_variance_explained", "phase_mean_ratio_without_final_step",
                 "sdedit_top10pct_change_share", "sdedit_adjacent_rank_corr"):
        lo, hi = iv[f"{name}_ci"]
        assert head[name] == iv[name] and (head[f"{name}_ci_low"], head[f"{name}_ci_high"]) == (lo, hi), name
        assert lo <= hi and iv[f"{name}_n"] == head[f"{name}_n"] == (4 if name.startswith("sdedit") else 5), name
    assert iv["bootstrap"]["resamples"] == 2000 and iv["bootstrap"]["min_agreement"] == pytest.approx(0.975)
    for i in (1, 2, 3):
        assert head[f"obs{i}_verdict"] in (HOLDS, DOES_NOT_HOLD, WITHIN_NOISE, NOT_MEASURED)
        expected = (WITHIN_NOISE if head[f"obs{i}_stable"] is False
                    else {True: HOLDS, False: DOES_NOT_HOLD, None: NOT_MEASURED}[head[f"obs{i}_holds"]])
        assert head[f"obs{i}_verdict"] == expected
    report = ReportSummary.from_dict(s["report"])
    assert [f.verdict for f in report.findings[:3]] == [head[f"obs{i}_verdict"] for i in (1, 2, 3)]
    assert all("N = 5 samples" in f.text and "[" in f.text for f in report.findings[:3])
    notes = {k.key: k.note for k in report.key_numbers}
    assert notes["top10pct_change_share"].startswith("95% CI ") and notes["adjacent_rank_corr"].endswith(", N = 5")
    lo, hi = iv["phase_mean_ratio_ci"]
    assert notes["phase_mean_ratio"] == f"95% CI {lo:.2f} to {hi:.2f}\u00d7, N = 5"
    table = analysis.tabulate_intervals(s)
    assert set(table["trajectories"]) == {"pure samples", "SDEdit"} and (table["ci_low"] <= table["ci_high"]).all()
    again = analysis.summarise_redundancy(rec, sdedit_record=record_of(np.random.default_rng(5).random((8, 2, 5, 16))))
    assert again["intervals"]["adjacent_rank_corr_ci"] == iv["adjacent_rank_corr_ci"]  # seeded: the same again
    other = analysis.summarise_redundancy(rec, bootstrap=analysis.BootstrapConfig(seed=1))
    assert other["intervals"]["adjacent_rank_corr_ci"] != iv["adjacent_rank_corr_ci"]
    assert "within noise" in analysis.describe_observations(s).splitlines()[0]


def test_findings_of_a_summary_written_before_the_intervals_still_read_well():
    old = {"holds": True, "top10pct_share": 0.3, "top20pct_share": 0.45, "gini": 0.3}
    text = analysis._observation_sentence("few_tokens_change_a_lot", old)
    assert text == "The top 10 % of tokens carry 30.0% of the change (top 20 %: 45.0%; Gini 0.30)."
    part = {"primary_measure": "out_change", "observations": {"out_change": {
        "few_tokens_change_a_lot": old, "adjacent_steps_correlated": {"holds": None, "verdict": "UNDETERMINED: x."},
        "uneven_over_trajectory": {"holds": False, "split_step": 3, "phase_mean_ratio": 1.2}}}}
    assert [f.verdict for f in analysis.observation_findings(part, "g")] == [HOLDS, NOT_MEASURED, DOES_NOT_HOLD]


def test_bootstrap_settings_are_checked():
    with pytest.raises(ValueError, match="fraction"):
        analysis.BootstrapConfig(confidence=95)
    with pytest.raises(ValueError, match="positive integer"):
        analysis.BootstrapConfig(resamples=0)
    few = analysis.check_few_tokens_change_a_lot(concentrated([0.16, 0.35] * 3),
                                                 bootstrap=analysis.BootstrapConfig(resamples=300))
    assert few["resamples"] == 300 and "of 300 bootstrap resamples" in few["verdict"]
