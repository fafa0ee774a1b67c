"""Uncertainty in sweeps and reports (issue #19), on hand-made sweeps with known answers.

A sweep's per-sample values are planted: two curves whose PSNR differs by a known amount per sample
(a real difference, or none), timings whose full-vs-full spread is known. The readers must find the
planted difference, not find one where there is none, and flag a timing inside the noise floor.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from tclab import ablation as A
from tclab import inhouse
from tclab.report import DOES_NOT_HOLD, HOLDS, WITHIN_NOISE
from tclab.sweep_summary import SweepSummary

N = 24


def _row(name, curve, family, flop, time, psnr, cc=None):
    return {"name": name, "curve": curve, "family": family, "knob": "", "flop_ratio": flop, "time_ratio": time,
            "psnr": psnr, "ssim": 0.9, "mse": 0.01, "lpips": np.nan, "class_consistency": np.nan if cc is None else cc,
            "fid": np.nan,
            "kid": np.nan, "error": "", "config": json.dumps({"name": name, "cache": {"rho": 0.1}})}


def planted_sweep(gap: float, seed: int = 0) -> A.SweepResult:
    """Curves 'a' and 'b' at the same cost; b's PSNR is a's minus ``gap`` on every sample, plus noise of
    sd 0.3 dB (the per-sample spread between points: a paired test resolves ~0.2 dB at N = 24)."""
    rng = np.random.default_rng(seed)
    base = 25 + rng.normal(0, 2.0, N)                  # samples differ a lot from each other ...
    a = base + rng.normal(0, 0.2, N)
    b = base - gap + rng.normal(0, 0.2, N)             # ... but a and b move together: paired
    c = base - 3 + rng.normal(0, 0.2, N)               # a third curve, clearly behind
    samples = {A.FULL_COMPUTE: {"psnr": np.full(N, 100.0)}, "a 1": {"psnr": a}, "b 1": {"psnr": b},
               "c 1": {"psnr": c}, "FORA": {"psnr": base - gap / 2 + rng.normal(0, 0.2, N)}}
    rows = [_row(A.FULL_COMPUTE, A.FULL_COMPUTE, "reference", 1.0, 1.0, 100.0),
            _row("a 1", "a", "ablation", 0.45, 0.5, a.mean()), _row("b 1", "b", "ablation", 0.44, 0.5, b.mean()),
            _row("c 1", "c", "ablation", 0.43, 0.5, c.mean()),
            _row("FORA", "FORA", "baseline", 0.45, 0.46, samples["FORA"]["psnr"].mean())]
    frame = pd.DataFrame(rows)
    for name, per in samples.items():
        for k, v in A.quality_columns(per, A.SweepSettings()).items():
            frame.loc[frame["name"] == name, k] = v
    return A.SweepResult(frame, {}, torch.zeros(N), A.SweepSettings(quality_samples=N), [], samples=samples)


@pytest.mark.parametrize("seed", range(3))
def test_a_planted_difference_is_found_and_named_the_winner(seed):
    res = planted_sweep(gap=1.0, seed=seed)
    h = A.headline(res, (2,), budget=0.5)["at_2x"]
    assert h["leader"] == h["winner"] == "a" and h["tied_with"] == [] and h["tested"] is True
    assert h["runner_up"] == "b" and h["psnr_margin_ci"][0] > 0 and h["psnr_margin_p"] < 0.05
    assert h["psnr_margin_ci"][0] < 1.0 < h["psnr_margin_ci"][1]       # the interval covers the planted 1 dB
    best = A.best_under_budget(res, 0.5)
    assert best["name"] == "a 1" and best["tied_with"] == [] and best["tested"] is True


@pytest.mark.parametrize("seed", range(3))
def test_no_difference_is_a_tie_and_no_winner_is_named(seed):
    res = planted_sweep(gap=0.0, seed=seed)
    h = A.headline(res, (2,), budget=0.5)["at_2x"]
    assert h["leader"] in ("a", "b") and h["winner"] is None
    assert h["tied_with"] == [("b" if h["leader"] == "a" else "a")]   # c is 3 dB behind: not tied
    comp = A.compare_at_reductions(res, (2,)).set_index("curve")
    assert comp.loc["c", "tied"] == False and comp.loc["c", "p_value"] < 0.01   # noqa: E712
    best = A.best_under_budget(res, 0.5)
    assert best["tied_with"] == [n for n in ("b 1", "a 1") if n != best["name"]]


def test_the_rival_comparison_is_paired_too():
    close = A.headline(planted_sweep(gap=0.0), (2,), budget=0.5)["at_2x"]["best_reference"]
    assert close["name"] == "FORA" and close["distinguishable"] is False    # FORA sits between a and b
    far = A.headline(planted_sweep(gap=2.0), (2,), budget=0.5)["at_2x"]["best_reference"]
    assert far["distinguishable"] is True and far["margin_ci"][0] > 0        # a is 1 dB above FORA


def test_a_bare_frame_names_no_winner():
    h = A.headline(planted_sweep(gap=1.0).frame, (2,), budget=0.5)["at_2x"]
    assert h["leader"] == "a" and h["winner"] is None and h["tested"] is False


def test_pareto_ties_mark_a_front_point_ahead_on_point_estimates_only():
    rng = np.random.default_rng(0)
    base = 25 + rng.normal(0, 2.0, N)
    wobble = rng.normal(0, 0.4, N)
    wobble -= wobble.mean()                                   # exactly zero mean: p2 is ahead by 0.05 dB only
    samples = {A.FULL_COMPUTE: {"psnr": np.full(N, 100.0)}, "p1": {"psnr": base}, "p2": {"psnr": base + 0.05 + wobble},
               "p3": {"psnr": base + 2 + rng.normal(0, 0.2, N)}}
    frame = pd.DataFrame([_row(A.FULL_COMPUTE, A.FULL_COMPUTE, "reference", 1.0, 1.0, 100.0)]
                         + [_row(n, "x", "ablation", c, c, samples[n]["psnr"].mean())
                            for n, c in (("p1", 0.3), ("p2", 0.4), ("p3", 0.5))])
    res = A.SweepResult(frame, {}, torch.zeros(N), A.SweepSettings(), [], samples=samples)
    assert frame.loc[A.pareto_front(res), "name"].tolist() == ["p1", "p2", "p3"]   # all on the front ...
    assert A.pareto_ties(res) == {"p2": "p1"}                  # ... but p2's 0.05 dB over p1 is noise; p3's 2 dB is not
    assert A.table(res).set_index("name").loc["p2", "pareto_flops"] == "tie with p1"
    assert A.pareto_ties(frame) == {}                          # a bare frame: nothing to test


def test_the_noise_floor_flags_an_identical_pair_and_not_a_real_speed_up():
    rng = np.random.default_rng(0)
    full = list(1.0 + rng.normal(0, 0.02, 6))
    timings = {A.FULL_COMPUTE: {"full": full, "variant": [f * (1 + rng.normal(0, 0.02)) for f in full]}}
    floor = A.timing_noise_floor(timings)
    assert floor.n == 6 and floor.low < 1 < floor.high and floor.high < 1.2
    frame = pd.DataFrame({"name": [A.FULL_COMPUTE, "same", "fast"], "flop_ratio": [1.0, 0.5, 0.5],
                          "time_ratio": [1.0, 1.0 + (floor.high - 1) / 2, 0.5],
                          "time_ratio_ci_low": [0.99, 0.99, 0.48], "time_ratio_ci_high": [1.01, 1.05, 0.52]})
    A.add_timing_columns(frame, floor)
    assert frame["time_within_noise"].tolist() == [True, True, False]
    assert frame.loc[2, "realisation_ci_low"] == pytest.approx((1 - 0.52) / 0.5)   # realisation carries its interval
    assert frame.loc[2, "realisation_ci_high"] == pytest.approx((1 - 0.48) / 0.5)
    # a ratio outside the floor whose own interval still holds 1 is not a measured change either
    wide = pd.DataFrame({"name": ["x"], "flop_ratio": [0.5], "time_ratio": [0.8], "time_ratio_ci_low": [0.7],
                         "time_ratio_ci_high": [1.1]})
    A.add_timing_columns(wide, floor)
    assert wide["time_within_noise"].tolist() == [True]


def test_a_real_sweep_flags_full_compute_against_itself(tmp_path):
    from tests.conftest import tiny_transformer
    from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config

    model = LoadedDiT(name="tiny", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                      scheduler_config=default_scheduler_config(), trained=False, source="test", class_names=["a", "b", "c"])
    st = A.SweepSettings(num_steps=4, quality_samples=4, timing_batch=1, timing_repeats=2, noise_pairs=4, guidance_scale=2.0)
    res = A.run_sweep(model, A.reference_variants(4, fora_intervals=[2], fewer_steps=[2], peers=[]), st, progress=False)
    f = res.frame.set_index("name")
    assert len(res.timings[A.FULL_COMPUTE]["full"]) == 4 and len(res.timings["FORA (interval 2)"]["full"]) == 2
    # the floor: full compute's 4 own pairs, and each later variant's second full run over its first
    assert res.noise_floor is not None and res.noise_floor.n == 4 + 2
    assert len(A.full_vs_full_ratios(res.timings)) == 6
    assert f.loc[A.FULL_COMPUTE, "time_within_noise"] == True                 # noqa: E712  (identical pair)
    assert (f["psnr_n"] == 4).all() and (f["psnr_ci_low"] <= f["psnr"]).all() and (f["psnr"] <= f["psnr_ci_high"]).all()
    assert set(res.samples) == set(f.index) and res.samples["fewer steps (2)"]["psnr"].shape == (4,)
    shown = A.table(res).set_index("name")
    assert shown.loc["fewer steps (2)", "psnr"].count("[") == 1 and shown.loc[A.FULL_COMPUTE, "time_noise"] == "within noise"
    summary = A.summarise_sweep(res, 0.6, (1.5,))
    d = summary.to_dict()
    assert d["noise_floor"]["time_ratio_n"] == 6 and len(d["noise_floor"]["time_ratio_ci"]) == 2
    point = next(p for p in d["points"] if p["name"] == "fewer steps (2)")
    assert point["psnr_n"] == 4 and len(point["psnr_ci"]) == 2 and "psnr_ci_low" not in point
    assert SweepSummary.from_dict(json.loads(json.dumps(d))) == summary


def test_samples_needed_follows_the_measured_spread():
    res = planted_sweep(gap=1.0)
    table = A.samples_needed_table(res, {"psnr": 0.5}).set_index("metric")
    # the spread of per-sample differences between a, b, c is about sqrt(2) * 0.2 dB: few samples resolve 0.5 dB
    assert 0.2 < table.loc["psnr", "sd_median"] < 0.4 and table.loc["psnr", "needed_median"] <= 8
    assert table.loc["psnr", "resolves"] == True                               # noqa: E712
    tight = A.samples_needed_table(res, {"psnr": 0.05})
    assert tight["needed_median"].iloc[0] > 25 * table.loc["psnr", "needed_median"]   # 10x smaller: ~100x more
    assert tight["resolves"].iloc[0] == False and "too few" in A.describe_resolution(tight)   # noqa: E712


def test_a_version_1_summary_reads_its_winner_as_the_untested_leader():
    res = planted_sweep(gap=1.0)
    d = A.summarise_sweep(res, 0.5, (2,)).to_dict()
    old = copy.deepcopy(d)
    old["version"] = 1
    at = old["flops"]["at_2x"]
    for k in ("leader", "tested", "psnr_ci", "psnr_n", "class_consistency_ci", "psnr_margin_ci", "psnr_margin_p",
              "class_consistency_margin_ci"):
        at.pop(k, None)
    back = SweepSummary.from_dict(old)
    assert back.flops.at(2).leader == "a" and back.flops.at(2).winner is None   # no "leader" key: v1's winner, untested
    assert back.flops.at(2).psnr_margin_ci is None


@pytest.mark.parametrize("cached, verdict", [
    ([1] * 80, HOLDS),                           # 80 images, none changed class: a drop over 5 points is ruled out
    ([1] * 20, WITHIN_NOISE),                    # 20 images, none changed: too few to rule out a 5-point drop
    ([1] * 12 + [0] * 8, DOES_NOT_HOLD),         # 8 of 20 lost: a drop of 40 points, clearly over 5
    ([1] * 18 + [0] * 2, WITHIN_NOISE),          # 2 of 20 lost: could be 0, could be more than 5 points
])
def test_inhouse_class_consistency_verdict_uses_the_paired_interval(cached, verdict):
    from tclab.stats import paired_proportion_difference

    full = np.ones(len(cached))
    change = paired_proportion_difference(np.asarray(cached, float), full)
    h = {"class_consistency_full": 1.0, "class_consistency_cached": float(np.mean(cached)),
         "class_consistency_n": len(cached), "class_consistency_change": change.estimate,
         "class_consistency_change_ci_low": change.low, "class_consistency_change_ci_high": change.high,
         "images_needed_for_5_points": 73}
    summary = {"headline": {"usable_images": 20, "bad_images": 0, "mapped_folders": 2, "recommendation": "x",
                            "recommendation_source": "given", "flop_ratio": 0.4, "budget_flop_ratio": 0.5,
                            "within_budget": True, "time_ratio": 0.5, "time_within_noise": False, "psnr": 30.0,
                            "worst_psnr": 20.0, "ssim": 0.9, **h}, "details": {}}
    findings = inhouse.inhouse_report(summary).findings
    cc = next(f for f in findings if "class-consistency" in f.text and f.group.startswith("the recommended"))
    assert cc.verdict == verdict
    answer = findings[0]
    assert answer.verdict == {HOLDS: HOLDS, DOES_NOT_HOLD: DOES_NOT_HOLD, WITHIN_NOISE: WITHIN_NOISE}[verdict]


def test_a_summary_with_nothing_within_the_budget_still_has_its_headline():
    s = A.summarise_sweep(planted_sweep(gap=1.0), budget=0.1, reductions=(2,))
    h = s.headline
    assert h["best_under_budget"] is None and h["best_tied_with"] is None and h["best_psnr_ci_low"] is None
    assert h["leader_at_2x_flops"] == "a" and list(h).index("psnr_at_2x_ci_low") > list(h).index("failed_points")
    assert SweepSummary.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_pareto_ties_are_tested_from_the_last_real_step_not_the_previous_tie():
    # three front points 0.3 dB apart: each step alone is noise, but two steps add up to a real gain
    rng = np.random.default_rng(3)
    base = 25 + rng.normal(0, 2.0, N)
    samples = {A.FULL_COMPUTE: {"psnr": np.full(N, 100.0)}}
    for i, name in enumerate(("p1", "p2", "p3")):
        wobble = rng.normal(0, 0.6, N)
        samples[name] = {"psnr": base + 0.3 * i + wobble - wobble.mean()}
    frame = pd.DataFrame([_row(A.FULL_COMPUTE, A.FULL_COMPUTE, "reference", 1.0, 1.0, 100.0)]
                         + [_row(n, "x", "ablation", c, c, samples[n]["psnr"].mean())
                            for n, c in (("p1", 0.3), ("p2", 0.4), ("p3", 0.5))])
    res = A.SweepResult(frame, {}, torch.zeros(N), A.SweepSettings(), [], samples=samples)
    comparer = A._frame_and_comparer(res)[1]
    assert not comparer.test("p2", "p1", "psnr").distinguishable and comparer.test("p3", "p1", "psnr").distinguishable
    assert not comparer.test("p3", "p2", "psnr").distinguishable    # tested step by step, both would be ties
    assert A.pareto_ties(res) == {"p2": "p1"}          # p3 is a real gain over p1, the last real step


def test_the_paired_tests_use_the_runs_seed():
    res = planted_sweep(gap=0.0)
    a = A._frame_and_comparer(res)[1]
    b = A._frame_and_comparer(A.SweepResult(res.frame, {}, res.labels, A.SweepSettings(seed=7), [],
                                            samples=res.samples))[1]
    assert a.seed == 0 and b.seed == 7 and b.resamples == 2000
    assert a.test("a 1", "b 1", "psnr").difference.low != b.test("a 1", "b 1", "psnr").difference.low


def test_one_curve_without_per_sample_values_is_not_named_the_winner():
    res = planted_sweep(gap=1.0)
    only = res.frame[res.frame["name"].isin([A.FULL_COMPUTE, "a 1"])].reset_index(drop=True)
    with_values = A.headline(A.SweepResult(only, {}, res.labels, res.settings, [], samples=res.samples), (2,))["at_2x"]
    assert with_values["winner"] == "a" and with_values["tested"] is True    # alone, and its values are there
    without = A.headline(A.SweepResult(only, {}, res.labels, res.settings, [], samples={}), (2,))["at_2x"]
    assert without["leader"] == "a" and without["winner"] is None and without["tested"] is False
    report = A.sweep_report(A.summarise_sweep(A.SweepResult(only, {}, res.labels, res.settings, [], samples={}),
                                              0.5, (2,)), (2,))
    shown = {k.key: k.value for k in report.key_numbers}
    assert shown["winner_at_2x_flops"] == "not tested"                       # not "none (tied)": nothing is tied
    tied = A.sweep_report(A.summarise_sweep(planted_sweep(gap=0.0), 0.5, (2,)), (2,))
    assert {k.key: k.value for k in tied.key_numbers}["winner_at_2x_flops"] == "none (tied)"


def test_paired_proportions_do_not_claim_no_change_from_a_few_agreeing_samples():
    from tclab.stats import paired_proportion_difference

    widths = [paired_proportion_difference([1] * n, [1] * n).low for n in (6, 20, 80)]
    assert widths[0] < widths[1] < widths[2] < 0 and widths[2] > -0.05 > widths[1]
    # half classed right by both, half by neither, none changed: still no claim of "no drop" from 6 images
    mixed = paired_proportion_difference([1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0])
    assert mixed.low < -0.2 and mixed.high > 0.2
    rng = np.random.default_rng(0)
    covered, trials = 0, 400
    for _ in range(trials):   # coverage of the true change (0.72 + 0.01 - 0.8 = -0.07) at n = 40
        full = rng.random(40) < 0.8
        cached = np.where(full, rng.random(40) >= 0.1, rng.random(40) < 0.05)
        iv = paired_proportion_difference(cached.astype(float), full.astype(float))
        covered += iv.low <= -0.07 <= iv.high
    assert 0.9 <= covered / trials <= 0.99
    with pytest.raises(ValueError, match="0/1"):
        paired_proportion_difference([0.5, 1], [1, 1])
