"""Static-shape cached steps (tclab.cache.static; spec section 6, "Static shapes") and their compilation.

The invariants:
- the counts follow select_tokens' rules (uniform exactly; global/adaptive: the rule on the row mean);
- with uniform selection the static plans *are* the dynamic plans, and a whole cached run is bit-identical;
- static plans are built with no host sync (dynamo's full-graph capture fails on any data-dependent sync), and
  a whole static cached step after the run's first reads no tensor back to the host (the dynamic one does);
- a step-static scorer (learned-static) is scored for the whole run at its first cached step, gives the same
  output as scoring every step, and survives timesteps the engine could not extrapolate;
- ``compile_transformer`` (inductor, dynamic=False) gives the eager output within float round-off and
  compiles each kind of step once (tests marked ``compile``: tens of seconds on one CPU core).
"""

from __future__ import annotations

import pytest
import torch

import tclab.cache.hooks as hooks_mod
from tclab.anatomy import plan_from_counts
from tclab.cache import TokenCacheConfig, TokenScorer, apply_token_cache, remove_token_cache
from tclab.cache.predictor import make_predictor
from tclab.cache.select import select_tokens, token_budget
from tclab.cache.static import (check_scores, compile_transformer, extrapolate_timesteps, static_counts, static_plans,
                                uncompile_transformer)
from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.sampling import SampleConfig, sample
from tclab.steps import StepContext, running
from tests.conftest import tiny_transformer


def tiny(layers=3, seed=1) -> LoadedDiT:
    """A pixel DiT on 8x8x3 images (4x4 token grid, N = 16), 3 classes."""
    return LoadedDiT(name="tiny", transformer=tiny_transformer(3, 3, layers=layers, seed=seed), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test",
                     class_names=["a", "b", "c"])


@pytest.fixture
def dit3() -> LoadedDiT:
    return tiny()


def run(model, steps=8, labels=(0, 1), guidance=2.0):
    return sample(model, list(labels), SampleConfig(num_steps=steps, guidance_scale=guidance), progress=False).images


def cached_run(model, steps=8, **config):
    state = apply_token_cache(model.transformer, TokenCacheConfig(schedule="round-robin", interval=3, **config))
    try:
        return run(model, steps), state
    finally:
        remove_token_cache(model.transformer)


def static_predictor(model, seed=0):
    """A learned-static predictor with random (non-zero) weights: scores vary with the timestep and token."""
    p = make_predictor("learned-static", model.transformer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in p.parameters():
            w.copy_(torch.randn(w.shape, generator=g))
    return p.eval()


def quantised_scores(shape, seed=0, levels=5):
    """Scores in [0, 1] with many ties (few distinct values): tie-breaking must match select_tokens'."""
    return torch.randint(0, levels, shape, generator=torch.Generator().manual_seed(seed)).float() / (levels - 1)


# ---- the pure functions ------------------------------------------------------------------------------

@pytest.mark.parametrize("rho,first,last", [(0.3, 0, 0), (0.37, 1, 0), (0.5, 1, 1), (0.05, 2, 1), (1.0, 0, 0),
                                            (0.0, 0, 1)])
def test_uniform_counts_are_select_tokens_counts(rho, first, last):
    L, N = 5, 16
    mask = select_tokens(quantised_scores((3, L, N)), rho, "uniform", first, last)  # (B, L, N)
    counts = static_counts(rho, L, N, "uniform", first, last)
    assert (mask.sum(-1) == torch.tensor(counts)).all()  # every row, every block


@pytest.mark.parametrize("method", ["global", "adaptive"])
def test_global_and_adaptive_counts_are_the_rule_on_the_row_mean(method):
    L, N, rho = 4, 16, 0.4
    scores = torch.rand(6, L, N, generator=torch.Generator().manual_seed(3))
    counts = static_counts(rho, L, N, method, 0, 1, scores)
    assert counts == select_tokens(scores.mean(0, keepdim=True), rho, method, 0, 1)[0].sum(-1).tolist()
    assert sum(counts) == token_budget(rho, L, N) and counts[-1] == N  # the budget met, the last block forced


@pytest.mark.parametrize("kv", ["all", "kept"])
def test_static_plans_equal_dynamic_plans_when_rows_keep_equal_counts(kv):
    B, L, N, rho = 4, 5, 16, 0.35
    scores = quantised_scores((B, L, N), seed=1)
    keep = select_tokens(scores, rho, "uniform", 1, 0)  # (B, L, N)
    plans = static_plans(scores, static_counts(rho, L, N, "uniform", 1, 0), kv)
    for l, p in enumerate(plans):
        k = keep[:, l]
        counts = k.sum(-1)
        ref = plan_from_counts(k, k.nonzero(), counts, counts.tolist(), kv)
        assert p.pad_flat is None and ref.pad_flat is None and p.key_valid is None and ref.key_valid is None
        assert p.K == ref.K and p.T == ref.T == B * p.K
        for name in ("keep", "flat", "rows"):
            assert torch.equal(getattr(p, name), getattr(ref, name)), (l, name)


def test_static_plans_keep_each_rows_top_k_with_ties_to_the_lower_token():
    B, L, N = 3, 2, 16
    scores = quantised_scores((B, L, N), seed=2, levels=3)
    counts = [5, 11]
    for l, p in enumerate(static_plans(scores, counts)):
        k = counts[l]
        assert p.K == k and p.T == B * k and p.pad_flat is None
        assert torch.equal(p.flat, p.flat.sort().values)  # rows ascending, then tokens
        for b in range(B):
            ranked = sorted(range(N), key=lambda i: (-scores[b, l, i].item(), i))  # higher score, then lower index
            assert p.keep[b].nonzero().squeeze(1).tolist() == sorted(ranked[:k])
        assert torch.equal(p.rows, torch.arange(B).repeat_interleave(k))


def test_static_plan_building_has_no_host_sync(monkeypatch):
    scores = torch.rand(4, 3, 16, generator=torch.Generator().manual_seed(0))
    counts = [3, 0, 16]
    # dynamo's full-graph capture refuses any data-dependent host sync (.item(), .tolist(), nonzero(), bool())
    capture = torch.compile(lambda s: static_plans(s, counts), backend="eager", fullgraph=True, dynamic=False)
    captured, eager = capture(scores), static_plans(scores, counts)
    assert all(torch.equal(a.flat, b.flat) and torch.equal(a.keep, b.keep) for a, b in zip(captured, eager))
    with pytest.raises(Exception, match="data-dependent|Data-dependent|nonzero|DataDependent"):
        def dynamic(s):  # the dynamic engine's plan building does sync: the check can tell
            keep = s[:, 0] > 0.5
            c = keep.sum(-1)
            return plan_from_counts(keep, keep.nonzero(), c, c.tolist(), "all")
        torch.compile(dynamic, backend="eager", fullgraph=True)(scores)
    # and, counted directly: no host read of a tensor while planning
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host sync: Tensor.{_n}"))
    static_plans(scores, counts)


def test_extrapolated_timesteps():
    assert extrapolate_timesteps(980.0, 960.0, 1, [2, 4, 49]) == {2: 940.0, 4: 900.0, 49: 0.0}
    assert extrapolate_timesteps(500.0, 500.0, 1, [2]) == {}  # not decreasing: nothing to extrapolate


def test_bad_values_raise():
    with pytest.raises(TypeError, match="static_shapes must be True or False"):
        TokenCacheConfig(static_shapes="yes")
    with pytest.raises(ValueError, match="did you mean 'static_shapes'"):
        TokenCacheConfig.from_dict({"static_shape": True})
    with pytest.raises(ValueError, match="derives the per-block counts from the scores"):
        static_counts(0.5, 3, 16, "global")
    with pytest.raises(ValueError, match="unknown selection method"):
        static_counts(0.5, 3, 16, "best")
    with pytest.raises(ValueError, match="rho must be a number in"):
        static_counts(1.5, 3, 16, "uniform")
    with pytest.raises(ValueError, match=r"scores must be \(rows, 3, 16\)"):
        static_counts(0.5, 3, 16, "global", scores=torch.rand(2, 3, 8))
    with pytest.raises(ValueError, match=r"counts must be 3 integers in \[0, 16\]"):
        static_plans(torch.rand(2, 3, 16), [1, 2, 17])
    with pytest.raises(ValueError, match=r"counts must be 3 integers"):
        static_plans(torch.rand(2, 3, 16), [1, 2])
    with pytest.raises(ValueError, match="kv='some'"):
        static_plans(torch.rand(2, 3, 16), [1, 2, 3], "some")
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\] with no NaN"):
        check_scores(torch.full((1, 2, 3), float("nan")))


# ---- the engine --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv", ["all", "kept"])
@pytest.mark.parametrize("scorer", ["random", "prev-change", "toca"])
def test_static_uniform_run_is_bit_identical_to_the_dynamic_engine(dit3, kv, scorer):
    cfg = dict(rho=0.4, selection="uniform", scorer=scorer, kv=kv, full_first_blocks=1)
    dynamic, sd = cached_run(dit3, **cfg)
    static, ss = cached_run(dit3, static_shapes=True, **cfg)
    assert torch.equal(dynamic, static)
    assert [(r.step, r.full, r.kept_fraction, r.kept_per_block) for r in ss.history] == \
        [(r.step, r.full, r.kept_fraction, r.kept_per_block) for r in sd.history]
    assert all(r.padded_fraction == 0.0 for r in ss.history)


@pytest.mark.parametrize("selection", ["global", "adaptive"])
def test_static_global_and_adaptive_keep_the_first_steps_counts_for_the_run(dit3, selection, monkeypatch):
    plans = []
    real = hooks_mod.static_plans
    monkeypatch.setattr(hooks_mod, "static_plans", lambda s, c, kv: plans.append(real(s, c, kv)) or plans[-1])
    images, state = cached_run(dit3, rho=0.4, selection=selection, scorer="prev-change", static_shapes=True)
    cached = [r for r in state.history if not r.full]
    assert len(cached) == 5 and len(plans) == 5  # prev-change is not step-static: one plan set per cached step
    assert len({tuple(r.kept_per_block) for r in cached}) == 1  # the same counts in every cached step
    B, L, N = 4, 3, 16  # 2 samples + their CFG halves
    assert all(r.kept_fraction == token_budget(0.4, L, N) / (L * N) and r.padded_fraction == 0 for r in cached)
    for step_plans in plans:
        assert [p.K for p in step_plans] == [round(k * N) for k in cached[0].kept_per_block]
        assert all(p.pad_flat is None and p.T == B * p.K for p in step_plans)
    assert torch.isfinite(images).all()


def test_learned_static_plans_are_made_once_per_run_and_equal_per_step_scoring(dit3, monkeypatch):
    predictor = static_predictor(dit3)
    calls = []  # (transformer call index, step the scores are for)
    score = predictor.score
    monkeypatch.setattr(predictor, "score", lambda ctx: calls.append((len(ctx.state.history), ctx.step.step)) or
                        score(ctx))
    cfg = dict(rho=0.3, selection="global", scorer=predictor, static_shapes=True)
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(schedule="round-robin", interval=3, **cfg))
    pre_a, pre_b = run(dit3), run(dit3)  # two runs: each precomputes at its own first cached step
    remove_token_cache(dit3.transformer)
    cached_steps = [1, 2, 4, 5, 7]  # 8 steps, a full step every 3
    assert calls == [(1, s) for s in cached_steps] + [(9, s) for s in cached_steps]  # all during call 1 of a run
    assert torch.equal(pre_a, pre_b)

    calls.clear()
    predictor.static_per_step = False  # the same scorer, scored at every cached step
    per_step, state = cached_run(dit3, **cfg)
    assert [c[1] for c in calls] == cached_steps and [c[0] for c in calls] == [1, 2, 4, 5, 7]
    assert torch.equal(pre_a, per_step)
    dynamic, _ = cached_run(dit3, **{**cfg, "static_shapes": False})
    assert not torch.equal(dynamic, per_step)  # global selection: the static counts are an approximation


def test_precomputed_plans_are_rebuilt_when_the_timesteps_are_not_evenly_spaced(dit3):
    """Outside tclab's sampler the engine extrapolates a run's timesteps; a wrong guess must cost time only."""
    tr = dit3.transformer
    ts = [999, 950, 800, 780, 500, 20]  # step 2 is not where even spacing puts it (901)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1000, 1000])

    class StepStatic(TokenScorer):
        name, static_per_step = "step-static", True

        def __init__(self):
            self.steps = []

        def score(self, ctx):
            self.steps.append(ctx.step.step)
            g = torch.Generator().manual_seed(int(ctx.timestep[0]))
            return torch.rand(ctx.shape, generator=g)  # a function of the timestep only

    def go(static_per_step):
        scorer = StepStatic()
        scorer.static_per_step = static_per_step
        state = apply_token_cache(tr, TokenCacheConfig(rho=0.4, scorer=scorer, static_shapes=True,
                                                       schedule="round-robin", interval=4))
        outs = []
        for s, t in enumerate(ts):
            with running(StepContext(step=s, t=float(t), num_steps=len(ts), cfg=True, batch=2, run_id=10_000)):
                outs.append(tr(x, timestep=torch.full((4,), t), class_labels=y).sample)
        remove_token_cache(tr)
        return torch.stack(outs), scorer.steps, state

    pre, pre_steps, state = go(True)
    per, per_steps, _ = go(False)
    assert torch.equal(pre, per)
    assert per_steps == [1, 2, 3, 5]
    assert pre_steps == [1, 2, 3, 5, 2, 3, 5]  # precomputed at step 1 (2, 3, 5 guessed wrong), then rebuilt
    assert state.static_run.precomputed == {}


HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


@pytest.mark.parametrize("scorer", ["learned-static", "prev-change", "random", "toca"])
@pytest.mark.parametrize("static", [True, False])
def test_a_static_cached_step_reads_nothing_back_to_the_host(dit3, monkeypatch, scorer, static):
    """After the run's first cached step (counts fixed, learned-static's plans made), a whole cached step,
    decisions and blocks, runs without reading a tensor on the host; the dynamic engine cannot."""
    tr = dit3.transformer
    scorer = static_predictor(dit3) if scorer == "learned-static" else scorer
    apply_token_cache(tr, TokenCacheConfig(rho=0.4, scorer=scorer, static_shapes=static, schedule="round-robin",
                                           interval=4))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1000, 1000])

    def call(s, t):
        with running(StepContext(step=s, t=float(t), num_steps=4, cfg=True, batch=2, run_id=20_000)):
            return tr(x, timestep=torch.tensor(t).expand(4), class_labels=y).sample

    call(0, 980)  # full
    call(1, 960)  # the first cached step: counts (and precomputed plans) with their syncs
    reads = []
    with monkeypatch.context() as m:
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)
            m.setattr(torch.Tensor, name, lambda *a, _n=name, _f=real, **k: reads.append(_n) or _f(*a, **k))
        call(2, 940)  # a later cached step
    remove_token_cache(tr)
    assert (reads == []) == static, reads


def test_a_compiled_transformer_with_dynamic_shapes_is_warned(dit3, monkeypatch):
    monkeypatch.setattr(hooks_mod, "is_compiled", lambda module: True)
    with pytest.warns(UserWarning, match="static_shapes=False"):
        cached_run(dit3, rho=0.4, scorer="random")


# ---- torch.compile (inductor) -------------------------------------------------------------------------

@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.compile
def test_compiled_runs_equal_eager_and_compile_each_kind_of_step_once(dynamo_reset):
    from torch._dynamo.utils import counters

    model = tiny(layers=2, seed=4)
    tr = model.transformer
    before = counters["stats"]["unique_graphs"]  # counters outlive torch._dynamo.reset()
    cfg = TokenCacheConfig(rho=0.4, selection="global", scorer=static_predictor(model), static_shapes=True,
                           schedule="round-robin", interval=3)
    plain_eager = run(model, steps=4)
    state = apply_token_cache(tr, cfg)
    cached_eager = run(model, steps=4)
    compile_transformer(tr)
    try:
        cached_compiled = run(model, steps=4)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs - before == 2  # one graph for the full steps, one for the cached steps (decisions: eager)
        cached_again = run(model, steps=4)  # a new run, same counts: no new graph
        assert counters["stats"]["unique_graphs"] == graphs
        remove_token_cache(tr)
        plain_compiled = run(model, steps=4)
    finally:
        uncompile_transformer(tr)
    # float32 round-off of fused kernels, grown over 4 denoising steps (images in [-1, 1])
    torch.testing.assert_close(cached_compiled, cached_eager, rtol=0, atol=5e-5)
    torch.testing.assert_close(cached_again, cached_compiled, rtol=0, atol=0)
    torch.testing.assert_close(plain_compiled, plain_eager, rtol=0, atol=5e-5)
    assert [r.full for r in state.history[:4]] == [True, False, False, True]
    assert run(model, steps=4).equal(plain_eager)  # uncompiled: eager again, bit for bit
