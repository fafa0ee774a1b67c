"""tclab.steps: the one answer to "which step is this?" for every hook (cache, peers, recorder, training).

The rule for calls from outside tclab's sampler is tested here once; then inside diffusers'
``DiTPipeline`` (with and without CFG), and the three consumers are checked to agree on it.
"""

from __future__ import annotations

import pytest
import torch

from tclab.steps import (NULL_CLASS, StepContext, StepTracker, bind_block_call, bind_model_call, current_step,
                         dit_blocks, is_cfg_batch, running, timestep_value)


def x(rows=2, grid=4):
    return torch.zeros(rows, 4, grid, grid)


def calls(tracker, ts, rows=2, labels=None, grid=4):
    inp = x(rows, grid)
    return [tracker(inp, torch.tensor([t] * rows), labels) for t in ts]


def test_the_samplers_context_is_authoritative():
    tracker = StepTracker(num_steps=3)
    given = StepContext(step=7, t=11.0, num_steps=9, cfg=True, batch=1, run_id=42)
    with running(given):
        assert current_step() is given
        assert tracker(x(), torch.tensor([999.0, 999.0]), None) is given
    assert current_step() is None


def test_calls_count_steps_and_a_rising_timestep_starts_a_new_run():
    tracker = StepTracker()
    ctxs = calls(tracker, [900, 600, 300, 0, 900, 450])
    assert [c.step for c in ctxs] == [0, 1, 2, 3, 0, 1]
    ids = [c.run_id for c in ctxs]
    assert ids[0] == ids[3] != ids[4] == ids[5]
    assert all(i < 0 for i in ids), "runs found from calls have negative ids, never a sampler's"
    assert {c.source for c in ctxs} == {"calls"} and ctxs[1].t == 600.0 and ctxs[0].num_steps == 0


def test_an_equal_timestep_is_the_next_step_of_the_same_run():
    ctxs = calls(StepTracker(), [900, 900, 500, 500])  # second-order schedulers repeat t
    assert [c.step for c in ctxs] == [0, 1, 2, 3] and len({c.run_id for c in ctxs}) == 1


def test_a_new_shape_or_new_labels_start_a_new_run():
    tracker = StepTracker()
    a = calls(tracker, [900, 600], rows=2)
    b = calls(tracker, [300], rows=4)  # t went down, but the batch changed
    c = calls(tracker, [200], rows=4, grid=2)
    y1, y2 = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 3, 5])
    d = calls(tracker, [100], rows=4, labels=y1, grid=2) + calls(tracker, [50], rows=4, labels=y1.clone(), grid=2)
    e = calls(tracker, [40], rows=4, labels=y2, grid=2)
    assert [z.step for z in a + b + c + d + e] == [0, 1, 0, 0, 0, 1, 0]
    assert len({z.run_id for z in a + b + c + d + e}) == 5


def test_a_known_number_of_steps_ends_a_run_and_reset_starts_one():
    tracker = StepTracker(num_steps=2)
    ctxs = calls(tracker, [900, 800, 700, 600])  # decreasing throughout: only the count separates runs
    assert [c.step for c in ctxs] == [0, 1, 0, 1] and ctxs[0].num_steps == 2
    assert ctxs[1].run_id != ctxs[2].run_id
    tracker = StepTracker()
    first = calls(tracker, [900])
    tracker.reset()
    again = calls(tracker, [800])
    assert again[0].step == 0 and again[0].run_id != first[0].run_id


@pytest.mark.parametrize("labels, cfg", [
    ([3, 7, NULL_CLASS, NULL_CLASS], True),  # DiTPipeline's [asked; null]
    ([3, NULL_CLASS, NULL_CLASS, NULL_CLASS], True),  # an asked null label in the first half is still CFG
    ([NULL_CLASS] * 4, False),  # all null: unconditional sampling
    ([3, 7, 1, 2], False),
    ([3, NULL_CLASS, 7], False),  # odd rows
    (None, False),
])
def test_the_cfg_rule(labels, cfg):
    y = None if labels is None else torch.tensor(labels)
    rows = len(labels) if labels else 4
    assert is_cfg_batch(y, rows) is cfg
    ctx = StepTracker()(x(rows), torch.tensor([1.0] * rows), y)
    assert ctx.cfg is cfg and ctx.batch == (rows // 2 if cfg else rows)


def test_arguments_bind_by_position_or_keyword_and_timesteps_read_as_floats():
    h, t, y = torch.zeros(1), torch.tensor([5]), torch.tensor([1])
    assert bind_model_call((h, t), {"class_labels": y}) == {"hidden_states": h, "timestep": t, "class_labels": y}
    assert bind_block_call((h,), {"timestep": t})["timestep"] is t
    assert bind_block_call((h, None, None, None, t, None, y), {})["class_labels"] is y
    assert timestep_value(torch.tensor([7, 7])) == 7.0 and timestep_value(3) == 3.0
    assert timestep_value(None) != timestep_value(None)  # NaN


def test_dit_blocks_names_what_it_found():
    with pytest.raises(TypeError, match="not a DiT: it has no `transformer_blocks`.*children are \\['a'\\]"):
        dit_blocks(_module_with_child("a"))
    bad = torch.nn.Module()
    bad.transformer_blocks = torch.nn.ModuleList()
    with pytest.raises(TypeError, match="non-empty"):
        dit_blocks(bad)


def _module_with_child(name):
    m = torch.nn.Module()
    m.add_module(name, torch.nn.Identity())
    return m


# ---- inside diffusers' DiTPipeline -------------------------------------------------------------------

def _pipeline_contexts(model, guidance, runs=2, steps=4):
    tracker = StepTracker()
    seen = []
    handle = model.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tracker(**{k: v for k, v in bind_model_call(args, kwargs).items()
                                                       if k in ("hidden_states", "timestep", "class_labels")})),
        with_kwargs=True)
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    try:
        for seed in range(runs):
            pipe(class_labels=[1, 2, 3], guidance_scale=guidance, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(seed), output_type="np")
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_inside_dit_pipeline(latent_dit, guidance):
    seen = _pipeline_contexts(latent_dit, guidance)
    assert [c.step for c in seen] == [0, 1, 2, 3] * 2
    assert len({c.run_id for c in seen[:4]}) == 1 and seen[0].run_id != seen[4].run_id
    assert {c.cfg for c in seen} == {guidance > 1} and {c.batch for c in seen} == {3}
    assert all(a.t > b.t for a, b in zip(seen[:3], seen[1:4]))


def test_cache_peer_and_recorder_agree_on_the_runs_of_a_pipeline(latent_dit):
    """The three consumers read one rule: same steps, same run boundaries, same CFG rows."""
    from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
    from tclab.cache.peers import apply_peer
    from tclab.record import record_token_changes

    pipe = latent_dit.pipeline()
    pipe.set_progress_bar_config(disable=True)

    def two_runs():
        for seed in (0, 1):
            pipe(class_labels=[1, 2], guidance_scale=4.0, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(seed), output_type="np")

    state = apply_token_cache(latent_dit.transformer, TokenCacheConfig(rho=0.5, num_steps=4))
    try:
        with record_token_changes(latent_dit.transformer) as rec:
            two_runs()
    finally:
        remove_token_cache(latent_dit.transformer)
    handle = apply_peer("fbcache", latent_dit)
    try:
        two_runs()
        peer_runs = handle.runs
    finally:
        handle.remove()
    r = rec.record
    cache_steps = [h.step for h in state.history]
    assert cache_steps == [0, 1, 2, 3, 0, 1, 2, 3]
    assert len({h.run_id for h in state.history}) == 2 == peer_runs
    assert r.num_steps == 4 and r.num_rows == 8  # two runs of [2 cond; 2 uncond] rows
    assert list(r.branch) == ["cond", "cond", "uncond", "uncond"] * 2 and r.step_source == "forward-count"
