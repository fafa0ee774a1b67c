"""tclab.stats on synthetic data with known answers (issue #19, item 6).

Coverage is checked by seeded simulation: 300 trials of a 95 % interval cover the true value in
285 of them on average, with a binomial standard deviation of 1.3 points; the tolerance below
(90-99 %) allows the percentile bootstrap's known small-sample narrowness (about 94 % at n = 30)
plus four standard deviations of simulation noise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tclab.stats import (Interval, bootstrap_ci, is_tie, noise_floor, paired_difference, ratio_ci,
                         samples_needed, wilson_interval, within_noise)

TRIALS = 300
COVERAGE_TOLERANCE = (0.90, 0.99)


def coverage(make_interval, truth, trials=TRIALS) -> float:
    return sum(make_interval(i).contains(truth) for i in range(trials)) / trials


# ---- intervals cover the truth at about the nominal rate ------------------------------------

def test_bootstrap_interval_of_a_mean_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(1)
    rate = coverage(lambda i: bootstrap_ci(rng.normal(30.0, 2.0, 30), resamples=1000, seed=i), 30.0)
    assert COVERAGE_TOLERANCE[0] <= rate <= COVERAGE_TOLERANCE[1], rate


def test_bootstrap_interval_of_a_median_covers_a_skewed_distributions_median():
    rng = np.random.default_rng(2)
    rate = coverage(lambda i: bootstrap_ci(rng.exponential(1.0, 40), np.median, resamples=1000, seed=i),
                    math.log(2))
    assert COVERAGE_TOLERANCE[0] <= rate <= COVERAGE_TOLERANCE[1], rate


def test_wilson_covers_a_true_proportion_at_the_nominal_rate():
    rng = np.random.default_rng(3)
    for p, n in [(0.8, 100), (0.5, 30), (0.95, 60)]:
        ks = rng.binomial(n, p, 2000)
        rate = np.mean([wilson_interval(int(k), n).contains(p) for k in ks])
        assert 0.93 <= rate <= 0.97, (p, n, rate)


def test_wilson_handles_zero_and_all_successes():
    none, every = wilson_interval(0, 20), wilson_interval(20, 20)
    assert none.estimate == none.low == 0.0 and 0.1 < none.high < 0.2
    assert every.estimate == every.high == 1.0 and 0.8 < every.low < 0.9
    assert every.low == pytest.approx(1 - none.high)


def test_paired_ratio_interval_covers_the_true_ratio():
    rng = np.random.default_rng(4)

    def one(i):  # round-to-round drift shared by both arms cancels in a paired ratio
        drift = np.exp(rng.normal(0.0, 0.3, 15))
        return ratio_ci(0.6 * drift * np.exp(rng.normal(0, 0.05, 15)), drift, resamples=1000, seed=i)
    rate = coverage(one, 0.6)
    assert COVERAGE_TOLERANCE[0] <= rate <= COVERAGE_TOLERANCE[1], rate


def test_unpaired_ratio_is_the_ratio_of_medians():
    r = ratio_ci([2.0, 2.2, 1.8, 2.1], [1.0, 1.1, 0.9], paired=False)
    assert r.estimate == pytest.approx(np.median([2.0, 2.2, 1.8, 2.1]) / 1.0)
    assert r.low < r.estimate < r.high and r.n == 3
    with pytest.raises(ValueError, match="paired=False"):
        ratio_ci([2.0, 2.2, 1.8, 2.1], [1.0, 1.1, 0.9])


# ---- paired comparison ----------------------------------------------------------------------

def test_a_paired_test_finds_a_planted_difference():
    rng = np.random.default_rng(5)
    found, covered = 0, 0
    for i in range(100):
        b = rng.normal(30.0, 3.0, 24)           # per-seed quality varies a lot...
        a = b + 0.9 + rng.normal(0, 0.5, 24)    # ...but a beats b by 0.9 on the same seed
        test = paired_difference(a, b, resamples=1000, seed=i)
        found += test.distinguishable
        covered += test.difference.contains(0.9)
    assert found == 100 and covered >= 88


def test_a_paired_test_finds_nothing_where_there_is_nothing():
    rng = np.random.default_rng(6)
    false_alarms = sum(paired_difference(rng.normal(30, 3, 24), rng.normal(30, 3, 24), resamples=1000,
                                         seed=i).distinguishable for i in range(TRIALS)) / TRIALS
    assert false_alarms <= 0.10, false_alarms
    for n in (1, 3, 24):  # the exact and the sampled p-value, and a lone pair
        same = rng.normal(30, 3, n)
        test = paired_difference(same, same.copy())
        assert not test.distinguishable and test.p_value == 1.0 and test.difference.estimate == 0.0
    assert is_tie(same, same.copy()) and not is_tie(same + 1.0, same)


def test_the_sign_flip_p_value_is_exact_for_few_samples():
    d = np.array([1.0, 2.0, 3.0, 4.0])  # all positive: 2 of the 16 sign patterns are as extreme
    test = paired_difference(d, np.zeros(4))
    assert test.p_value == pytest.approx(2 / 16) and test.p_method.startswith("exact")
    assert not test.distinguishable  # the bootstrap interval excludes 0, but 4 samples cannot show it


# ---- timing noise floor ---------------------------------------------------------------------

def test_the_noise_floor_flags_an_identical_pair():
    floor = noise_floor(np.array([2.0, 3.0, 2.5]) / np.array([2.0, 3.0, 2.5]))
    assert (floor.low, floor.high, floor.estimate) == (1.0, 1.0, 1.0)
    assert within_noise(1.0, floor) and not within_noise(0.9, floor)


def test_a_ratio_inside_the_full_vs_full_spread_is_flagged():
    rng = np.random.default_rng(7)
    floor = noise_floor(np.exp(rng.normal(0.0, 0.1, 200)))  # full vs full: about +-20 % at 95 %
    assert floor.low == pytest.approx(1 / floor.high) and 1.15 < floor.high < 1.3
    assert within_noise(1.1, floor) and within_noise(0.9, floor)
    assert not within_noise(0.5, floor) and not within_noise(2.0, floor)
    assert within_noise(3.25, noise_floor([3.25, 1.0, 0.9]))  # issue #19: full was 3.25x "slower" than itself


# ---- how many samples -----------------------------------------------------------------------

def test_samples_needed_grows_as_the_difference_shrinks():
    assert samples_needed(1.0, 0.5) == 32  # (1.96 + 0.84)^2 * (1 / 0.5)^2 = 31.4
    ns = [samples_needed(2.0, d) for d in (2.0, 1.0, 0.5, 0.25)]
    assert ns == sorted(ns)
    for bigger, smaller in zip(ns[1:], ns[2:]):
        assert smaller / bigger == pytest.approx(4, rel=0.05)
    diffs = np.random.default_rng(8).normal(0.3, 2.0, 500)
    assert samples_needed(diffs, 0.5) == samples_needed(float(diffs.std(ddof=1)), 0.5)
    assert samples_needed(1.0, 0.5, power=0.9) > samples_needed(1.0, 0.5)


# ---- determinism, the summary.json shape, errors --------------------------------------------

def test_the_same_seed_gives_the_same_interval_and_another_seed_may_not():
    x = np.random.default_rng(9).normal(0, 1, 20)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    y = x + np.random.default_rng(10).normal(0.2, 1, 20)
    assert paired_difference(y, x, seed=1) == paired_difference(y, x, seed=1)


def test_a_statistic_without_axis_is_resampled_too():
    x = np.arange(10.0)
    assert bootstrap_ci(x, lambda v: float(np.max(v) - np.min(v)), resamples=200).estimate == 9.0


def test_to_dict_gives_the_summary_json_keys():
    out = bootstrap_ci([30.1, 31.4, 29.8, 30.9, 30.5]).to_dict("psnr")
    assert set(out) == {"psnr", "psnr_ci", "psnr_n"} and out["psnr_n"] == 5
    assert out["psnr_ci"][0] < out["psnr"] < out["psnr_ci"][1]
    json.dumps(out, allow_nan=False)
    single = bootstrap_ci([30.0]).to_dict("psnr")  # one sample: a value, no interval
    assert single == {"psnr": 30.0, "psnr_ci": [None, None], "psnr_n": 1}
    test = paired_difference([1.0, 2.0, 3.0], [0.0, 2.5, 1.0]).to_dict("psnr_diff")
    assert {"psnr_diff_ci", "psnr_diff_p", "psnr_diff_distinguishable"} <= set(test)


def test_nans_are_refused_or_dropped_and_counted():
    with pytest.raises(ValueError, match="NaN.*nans='drop'"):
        bootstrap_ci([1.0, float("nan"), 2.0])
    kept = bootstrap_ci([1.0, float("nan"), 2.0, 3.0], nans="drop")
    assert kept.n == 3 and kept.dropped == 1 and kept.estimate == 2.0


@pytest.mark.parametrize("call", [
    lambda: bootstrap_ci([]),
    lambda: paired_difference([], []),
    lambda: noise_floor([]),
    lambda: ratio_ci([], [1.0]),
], ids=["bootstrap", "paired", "noise floor", "ratio"])
def test_empty_input_is_refused(call):
    with pytest.raises(ValueError, match="empty"):
        call()


def test_bad_arguments_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"did you mean 0.95"):
        bootstrap_ci([1.0, 2.0], confidence=95)
    for bad in (0, 1, -0.5):
        with pytest.raises(ValueError, match="confidence"):
            wilson_interval(3, 10, confidence=bad)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="one value per shared sample"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(np.ones((3, 2)))
    with pytest.raises(ValueError, match="difference"):
        samples_needed(1.0, 0.0)
    with pytest.raises(ValueError, match="power"):
        samples_needed(1.0, 0.5, power=80)
    with pytest.raises(ValueError, match="positive"):
        noise_floor([1.0, -1.0])
    assert isinstance(wilson_interval(3, 10), Interval)
