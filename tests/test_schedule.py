"""Exact tests for tclab.cache.schedule: hand-worked full-step lists, invariants, validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tclab.cache.schedule import (SCHEDULES, make_schedule, percentile_schedule, round_robin_schedule,
                                  tprr_schedule)


def full_steps(schedule: np.ndarray) -> list[int]:
    assert schedule.dtype == np.bool_ and schedule.ndim == 1
    return np.flatnonzero(schedule).tolist()


# ---- round-robin --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps, interval, force_last, expected", [
    (7, 3, 0, [0, 3, 6]),
    (10, 4, 0, [0, 4, 8]),
    (10, 4, 2, [0, 4, 8, 9]),          # force_last adds step 9; step 8 was full already
    (10, 4, 3, [0, 4, 7, 8, 9]),
    (5, 1, 0, [0, 1, 2, 3, 4]),        # interval 1 = full compute
    (5, 10, 0, [0]),                   # interval > S: only the first step
    (5, 10, 5, [0, 1, 2, 3, 4]),       # force_last = S: everything
    (1, 3, 0, [0]),
])
def test_round_robin_exact(num_steps, interval, force_last, expected):
    sched = round_robin_schedule(num_steps, interval, force_last)
    assert sched.shape == (num_steps,)
    assert full_steps(sched) == expected


def test_round_robin_literal_array():
    np.testing.assert_array_equal(round_robin_schedule(6, 2),
                                  np.array([True, False, True, False, True, False]))


# ---- tprr ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ((10, 3, 2, 0.5), [0, 3, 5, 7, 9]),      # s2 = 5; phase 1 {0, 3}; phase 2 {5, 7, 9}
    ((10, 2, 4, 0.3), [0, 2, 3, 7]),         # s2 = 3; phase 1 {0, 2}; phase 2 {3, 7}
    ((9, 4, 2, 0.5), [0, 4, 5, 7]),          # s2 = ceil(4.5) = 5
    ((10, 3, 2, 0.0), [0, 2, 4, 6, 8]),      # split 0: round-robin(k2)
    ((10, 3, 2, 1.0), [0, 3, 6, 9]),         # split 1: round-robin(k1)
    ((100, 1000, 50, 0.07), [0, 7, 57]),     # 0.07 * 100 = 7.000000000000001 in floats: still s2 = 7
    ((12, 5, 5, 0.5), [0, 5, 6, 11]),        # phase 2 restarts its count at s2 = 6
])
def test_tprr_exact(args, expected):
    assert full_steps(tprr_schedule(*args)) == expected


def test_tprr_force_last_and_literal_array():
    expected = np.array([1, 0, 0, 1, 0, 1, 0, 1, 1, 1], dtype=bool)  # [0,3,5,7,9] + last 3
    np.testing.assert_array_equal(tprr_schedule(10, 3, 2, 0.5, force_last=3), expected)


@pytest.mark.parametrize("num_steps, interval", [(10, 2), (12, 3), (25, 4)])
def test_tprr_with_equal_intervals_is_round_robin_when_split_lands_on_a_full_step(num_steps, interval):
    # split such that s2 is a multiple of the interval: the two phases line up exactly
    split = interval / num_steps
    np.testing.assert_array_equal(tprr_schedule(num_steps, interval, interval, split),
                                  round_robin_schedule(num_steps, interval))


# ---- percentile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("importance, n_full, expected", [
    ([4, 1, 1, 1, 1], 2, [0, 1]),           # c = [0, .5, .625, .75, .875]; q = 0, .5
    ([4, 1, 1, 1, 1], 3, [0, 1, 3]),        # q = 0, 1/3, 2/3 -> steps 0, 1, 3
    ([1, 1, 2], 2, [0, 2]),                 # "spent BEFORE s": c = [0, .25, .5] -> q=.5 at step 2, not 1
    ([2, 0, 0, 0, 0], 3, [0, 1, 2]),        # targets 0, 1, 1 -> collision moves to the next free step
    ([1, 0, 0, 8, 1], 3, [0, 3, 4]),        # c = [0, .1, .1, .1, .9]; targets 0, 4, 4 -> packed at end
    ([0, 0, 0, 0, 1], 3, [0, 3, 4]),        # no step reaches q > 0: targets clamp to S-1, then pack
    ([0.1] * 10, 5, [0, 2, 4, 6, 8]),       # float round-off (c[8] = 0.7999...) still hits q = 0.8
    ([1, 2, 3, 4], 4, [0, 1, 2, 3]),        # n = S: every step
    ([1, 2, 3, 4], 1, [0]),                 # n = 1: only step 0
])
def test_percentile_exact(importance, n_full, expected):
    assert full_steps(percentile_schedule(importance, n_full)) == expected


@pytest.mark.parametrize("num_steps, interval", [(10, 2), (12, 3), (50, 5)])
def test_percentile_with_uniform_importance_is_round_robin(num_steps, interval):
    np.testing.assert_array_equal(percentile_schedule(np.ones(num_steps), num_steps // interval),
                                  round_robin_schedule(num_steps, interval))


def test_percentile_exactly_n_distinct_full_steps():
    rng = np.random.default_rng(0)
    for trial in range(200):
        S = int(rng.integers(1, 30))
        n = int(rng.integers(1, S + 1))
        w = rng.exponential(size=S) * (rng.random(S) < 0.6)  # many exact zeros -> many collisions
        w[rng.integers(S)] += 1.0  # not all zero
        sched = percentile_schedule(w, n)
        assert sched.sum() == n and sched[0], (trial, w, n)


def test_percentile_crowds_full_steps_where_importance_is():
    w = np.r_[np.full(10, 10.0), np.full(10, 1.0)]  # 10/11 of the importance in the first half
    steps = full_steps(percentile_schedule(w, 5))
    assert steps == [0, 3, 5, 7, 9]  # c[s] = s / 11 for s <= 10; q_k = k/5 -> s = ceil(11k/5)


def test_percentile_force_last_adds_on_top_and_accepts_tensors():
    sched = percentile_schedule(torch.tensor([4.0, 1, 1, 1, 1]), 2, force_last=2)
    assert full_steps(sched) == [0, 1, 3, 4]


# ---- make_schedule ------------------------------------------------------------------------------

def test_make_schedule_dispatches_by_name():
    assert set(SCHEDULES) == {"round-robin", "tprr", "percentile"}
    assert full_steps(make_schedule("round-robin", 10, interval=4, force_last=1)) == [0, 4, 8, 9]
    assert full_steps(make_schedule("tprr", 10, k1=3, k2=2, split=0.5)) == [0, 3, 5, 7, 9]
    assert full_steps(make_schedule("percentile", 5, step_importance=[4, 1, 1, 1, 1], n_full=3)) == [0, 1, 3]


def test_make_schedule_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown schedule kind 'fora'.*round-robin.*tprr.*percentile"):
        make_schedule("fora", 10, interval=2)


def test_make_schedule_unknown_and_missing_params():
    with pytest.raises(ValueError, match=r"unknown parameters \['K'\].*missing parameters \['interval'\]"):
        make_schedule("round-robin", 10, K=2)
    with pytest.raises(ValueError, match=r"missing parameters \['k2', 'split'\].*'k1', 'k2', 'split', 'force_last'"):
        make_schedule("tprr", 10, k1=3)
    with pytest.raises(ValueError, match=r"unknown parameters \['interval'\]"):  # a round-robin knob
        make_schedule("percentile", 5, step_importance=[1] * 5, n_full=2, interval=2)


def test_make_schedule_percentile_length_must_match():
    with pytest.raises(ValueError, match=r"step_importance has 4 values but num_steps=5"):
        make_schedule("percentile", 5, step_importance=[1, 1, 1, 1], n_full=2)


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, pattern", [
    (lambda: round_robin_schedule(10, 0), ValueError, r"interval must be >= 1, got 0"),
    (lambda: round_robin_schedule(0, 2), ValueError, r"num_steps must be >= 1"),
    (lambda: round_robin_schedule(10, 2.0), TypeError, r"interval must be an integer"),
    (lambda: round_robin_schedule(10, True), TypeError, r"interval must be an integer"),
    (lambda: round_robin_schedule(10, 2, force_last=11), ValueError, r"force_last=11 exceeds num_steps=10"),
    (lambda: round_robin_schedule(10, 2, force_last=-1), ValueError, r"force_last must be >= 0"),
    (lambda: tprr_schedule(10, 0, 2, 0.5), ValueError, r"k1 must be >= 1"),
    (lambda: tprr_schedule(10, 3, 0, 0.5), ValueError, r"k2 must be >= 1"),
    (lambda: tprr_schedule(10, 3, 2, 1.5), ValueError, r"split must be a number in \[0, 1\]"),
    (lambda: tprr_schedule(10, 3, 2, -0.1), ValueError, r"split must be a number in \[0, 1\]"),
    (lambda: tprr_schedule(10, 3, 2, float("nan")), ValueError, r"split must be a number in \[0, 1\]"),
    (lambda: percentile_schedule([1, 1, 1], 4), ValueError, r"n_full=4 exceeds the number of steps 3"),
    (lambda: percentile_schedule([1, 1, 1], 0), ValueError, r"n_full must be >= 1"),
    (lambda: percentile_schedule([1, -1, 1], 2), ValueError, r"non-negative; steps \[1\]"),
    (lambda: percentile_schedule([1, np.nan, np.inf], 2), ValueError, r"finite; steps \[1, 2\]"),
    (lambda: percentile_schedule([[1, 1], [1, 1]], 2), ValueError, r"1-D .* shape \(2, 2\)"),
    (lambda: percentile_schedule([], 1), ValueError, r"non-empty 1-D"),
    (lambda: percentile_schedule([0, 0, 0], 2), ValueError, r"sums to 0.*np.ones"),
])
def test_validation_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_a_registered_schedule_is_usable_by_name_in_a_config_and_the_engine(pixel_dit):
    import functools

    from tclab.cache import TokenCacheConfig, apply_caching
    from tclab.cache.schedule import register_schedule
    from tclab.sampling import SampleConfig, sample

    def every_third(num_steps, force_last=0, offset=0):
        return (np.arange(num_steps) % 3 == offset) | (np.arange(num_steps) >= num_steps - force_last)

    with pytest.raises(ValueError, match="not a valid choice"):
        TokenCacheConfig(schedule="every-third")
    register_schedule("every-third", functools.partial(every_third, offset=0))
    try:
        assert make_schedule("every-third", 6).tolist() == [True, False, False, True, False, False]
        with apply_caching(pixel_dit.transformer, TokenCacheConfig(rho=0.5, schedule="every-third")) as handle:
            sample(pixel_dit, [0, 1], SampleConfig(num_steps=6), progress=False)
            assert [r.full for r in handle.state.history] == [True, False, False, True, False, False]
    finally:
        del SCHEDULES["every-third"]
