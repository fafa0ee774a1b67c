"""Forecasting reuse and the staleness-aware scorers (issue 17): ``tclab.cache.forecast``, the engine's
per-token history, ``staleness`` / ``staleness-learned`` / ``oracle-error``."""

from __future__ import annotations

import math
import types

import pytest
import torch

from tclab.cache import TOKEN_CACHE_BLOCK_HOOK, TokenCacheConfig, apply_token_cache, fora_config, make_scorer
from tclab.cache.forecast import make_room, newton_forecast
from tclab.cache.scorers import OracleErrorScorer, ScoreContext, StalenessScorer, TokenScorer, squash
from tclab.anatomy import block_forward, plan_from_counts
from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.sampling import SampleConfig, sample
from tests.conftest import tiny_transformer


@pytest.fixture
def dit3() -> LoadedDiT:
    return LoadedDiT(name="tiny3", transformer=tiny_transformer(3, 3, layers=3, seed=1), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test",
                     class_names=["a", "b", "c"])


def run(model, steps=6, labels=(0, 1)):
    return sample(model, list(labels), SampleConfig(num_steps=steps, guidance_scale=2.0), progress=False)


# ---- the pure forecast -------------------------------------------------------------------------------

def test_forecast_is_exact_on_updates_polynomial_in_the_step():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64)
    lin, quad = (lambda s: a + b * s), (lambda s: a + b * s + c * s * s)
    # every token its own steps (tokens computed in cached steps have their own history)
    s0 = torch.tensor([[9.0, 8, 7, 9, 6], [5, 9, 8, 7, 9]], dtype=torch.float64)
    s1, s2 = s0 - torch.tensor(2.0), s0 - torch.tensor(5.0)
    at = 11.0
    pts = lambda f, *ss: [f(s[..., None]) for s in ss]  # noqa: E731
    assert torch.allclose(newton_forecast(pts(lin, s0, s1), [s0, s1], at), lin(torch.tensor(at)), atol=1e-9)
    assert torch.allclose(newton_forecast(pts(quad, s0, s1, s2), [s0, s1, s2], at), quad(torch.tensor(at)), atol=1e-9)
    # order 1 is not exact on a curved update: the test above could fail
    assert not torch.allclose(newton_forecast(pts(quad, s0, s1), [s0, s1], at), quad(torch.tensor(at)), atol=1e-3)


def test_forecast_drops_to_the_order_a_token_has():
    u0, u1, u2 = torch.randn(3, 1, 3, 2)
    s0 = torch.tensor([[4.0, 4.0, 4.0]])
    s1 = torch.tensor([[2.0, math.nan, 2.0]])  # token 1: one value only -> reused verbatim
    s2 = torch.tensor([[0.0, math.nan, math.nan]])  # token 2: two values -> linear
    out = newton_forecast([u0, u1, u2], [s0, s1, s2], 5.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], u0[0, 1])
    lin = newton_forecast([u0, u1], [s0, s1], 5.0)
    torch.testing.assert_close(out[0, 2], lin[0, 2])
    assert not torch.allclose(out[0, 0], lin[0, 0])  # token 0 has all three: quadratic


def test_make_room_ages_only_the_given_pairs():
    vals = [torch.full((2, 3, 1), float(v)) for v in (3, 2, 1)]
    steps = [torch.full((2, 3), float(v)) for v in (3, 2, 1)]
    make_room(vals, steps, torch.tensor([1, 5]))  # row 0 token 1, row 1 token 2
    assert vals[1].view(-1).tolist() == [2, 3, 2, 2, 2, 3] and vals[2].view(-1).tolist() == [1, 2, 1, 1, 1, 2]
    assert steps[2].view(-1).tolist() == [1, 2, 1, 1, 1, 2]
    assert vals[0].view(-1).tolist() == [3] * 6  # the newest place is the caller's to write


# ---- the engine ----------------------------------------------------------------------------------------

def _recorded(tr, state):
    seen = []
    hs = [b.register_forward_hook(lambda m, a, o, i=i: seen.append((state.phase, state.step.step, i, a[0], o)))
          for i, b in enumerate(tr.transformer_blocks)]
    return seen, hs


@pytest.mark.parametrize("order", [1, 2])
def test_skipped_blocks_forecast_their_update_by_hand(dit3, order):
    """FORA + forecast: a skipped block returns x + the Newton extrapolation of its full steps' updates."""
    tr = dit3.transformer
    state = apply_token_cache(tr, fora_config(interval=2, reuse="forecast", forecast_order=order))
    seen, hs = _recorded(tr, state)
    run(dit3, steps=7)  # full 0, 2, 4, 6; cached 1, 3, 5
    for h in hs:
        h.remove()
    full = {(s, i): o - x for p, s, i, x, o in seen if p == "full"}
    checked = 0
    for p, s, i, x, o in seen:
        if p != "cached":
            continue
        known = sorted((fs for fs, fi in full if fi == i and fs < s), reverse=True)[:order + 1]
        if len(known) == 1:
            expect = full[(known[0], i)]
        elif len(known) == 2 or order == 1:
            (t0, t1) = known[:2]
            expect = full[(t0, i)] + (s - t0) * (full[(t0, i)] - full[(t1, i)]) / (t0 - t1)
        else:
            t0, t1, t2 = known
            d01 = (full[(t0, i)] - full[(t1, i)]) / (t0 - t1)
            d12 = (full[(t1, i)] - full[(t2, i)]) / (t1 - t2)
            expect = full[(t0, i)] + (s - t0) * d01 + (s - t0) * (s - t1) * (d01 - d12) / (t0 - t2)
        torch.testing.assert_close(o, x + expect, atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked == 3 * 3
    assert state.cache_bytes() > 0 and len(state.blocks[0].older) == order


class FixedScorer(TokenScorer):
    """Keeps the first tokens of every block (scores fall with the token index)."""

    name = "fixed"

    def score(self, ctx):
        B, L, N = ctx.shape
        return torch.linspace(1, 0, N).expand(B, L, N).contiguous()


@pytest.mark.parametrize("history", ["computed", "full"])
def test_tokens_computed_in_cached_steps_refresh_their_history_or_not(dit3, history):
    cfg = TokenCacheConfig(rho=0.25, selection="uniform", schedule="round-robin", interval=3, reuse="forecast",
                           forecast_history=history, scorer=FixedScorer())
    state = apply_token_cache(dit3.transformer, cfg)
    run(dit3, steps=6)  # full 0, 3; cached 1, 2, 4, 5 (the last: step 5)
    N = state.num_tokens
    kept = max(1, round(0.25 * N))
    for b in state.blocks:
        if history == "computed":
            assert (b.steps[0][:, :kept] == 5).all() and (b.steps[0][:, kept:] == 3).all()
            assert (b.steps[1][:, :kept] == 4).all() and (b.steps[1][:, kept:] == 0).all()
        else:  # only full steps enter the history
            assert (b.steps[0] == 3).all() and (b.steps[1] == 0).all()


def test_forecast_changes_the_output_and_runs_repeat(dit3):
    base = run(dit3, steps=8).images
    outs = {}
    for reuse in ("update", "forecast"):
        state = apply_token_cache(dit3.transformer, fora_config(interval=3, reuse=reuse))
        outs[reuse] = run(dit3, steps=8).images
        again = run(dit3, steps=8).images
        assert torch.equal(outs[reuse], again)
        from tclab.cache import remove_token_cache
        remove_token_cache(dit3.transformer)
        assert state is not None
    assert not torch.equal(outs["update"], outs["forecast"])
    assert torch.isfinite(outs["forecast"]).all() and not torch.equal(outs["forecast"], base)


def test_config_refuses_bad_forecast_knobs():
    with pytest.raises(ValueError, match="forecast_order"):
        TokenCacheConfig(reuse="forecast", forecast_order=3)
    with pytest.raises(ValueError, match="forecast_order"):
        TokenCacheConfig(forecast_order=True)
    with pytest.raises(ValueError, match="forecast_history"):
        TokenCacheConfig(reuse="forecast", forecast_history="fulll")
    with pytest.raises(ValueError, match="did you mean 'forecast'"):
        TokenCacheConfig(reuse="forcast")


# ---- the staleness-aware scorers ----------------------------------------------------------------------------

def _view(u, older, steps, now):
    blk = types.SimpleNamespace(u=u, older=[older], steps=steps)
    st = types.SimpleNamespace(rows=u.shape[0], num_blocks=1, num_tokens=u.shape[1], blocks=[blk])
    step = types.SimpleNamespace(step=now)
    return ScoreContext(step=step, state=st, transformer=None, hidden_states=torch.zeros(1), timestep=None,
                        class_labels=None)


def test_staleness_is_age_times_rate():
    u = torch.tensor([[[1.0], [1.0], [1.0], [5.0]]])  # (1, 4, 1)
    older = torch.tensor([[[0.0], [0.0], [0.5], [0.0]]])
    s0 = torch.tensor([[6.0, 2.0, 6.0, 6.0]])
    s1 = torch.tensor([[5.0, 1.0, 5.0, math.nan]])  # token 3 has one value: its rate is ||u||
    ctx = _view(u, older, [s0, s1], now=8)
    err = torch.tensor([2 * 1.0, 6 * 1.0, 2 * 0.5, 2 * 5.0])  # age x rate
    expect = squash(err / err.mean())
    torch.testing.assert_close(StalenessScorer().score(ctx)[0, 0], expect)


def test_staleness_learned_mixes_in_the_learned_score():
    u, older = torch.ones(1, 2, 1), torch.zeros(1, 2, 1)
    ctx = _view(u, older, [torch.tensor([[4.0, 4.0]]), torch.tensor([[3.0, 3.0]])], now=6)

    class Half(TokenScorer):
        def score(self, ctx):
            return torch.tensor([[[0.9, 0.1]]])

    plain = StalenessScorer().score(ctx)
    assert torch.allclose(plain[0, 0, 0], plain[0, 0, 1])  # equal age and rate: a tie
    mixed = StalenessScorer(importance=0.5, learned=Half()).score(ctx)
    assert mixed[0, 0, 0] > mixed[0, 0, 1]
    torch.testing.assert_close(mixed, (plain * torch.tensor([[[0.9, 0.1]]])).sqrt())
    with pytest.raises(ValueError, match="importance"):
        StalenessScorer(importance=1.5)


def test_staleness_scorers_run_in_the_engine(dit3):
    for name in ("staleness", "oracle-error"):
        state = apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.3, scorer=name, schedule="round-robin",
                                                                     interval=3, reuse="forecast"))
        out = run(dit3, steps=7)
        assert torch.isfinite(out.images).all()
        cached = [r for r in state.history if not r.full]
        assert cached and all(abs(r.kept_fraction - 0.3) < 0.1 for r in cached)
        assert all(r.probe for r in cached) == (name == "oracle-error")
        from tclab.cache import remove_token_cache
        remove_token_cache(dit3.transformer)
    with pytest.raises(ValueError, match="does not take option"):
        make_scorer(TokenCacheConfig(scorer="staleness", scorer_options={"weight": 1}))


def test_oracle_error_rechooses_tokens_along_the_cached_path(dit3):
    """The path plan keeps each row's count and takes the tokens whose reuse errs most on this input."""
    tr = dit3.transformer
    state = apply_token_cache(tr, TokenCacheConfig(rho=0.3, scorer="oracle-error", schedule="round-robin",
                                                   interval=2, reuse="update"))
    run(dit3, steps=3)  # leaves a filled cache and state.step = 2
    blk = tr.transformer_blocks[1]
    hook = blk._diffusers_hook.get_hook(TOKEN_CACHE_BLOCK_HOOK)
    B, N = state.rows, state.num_tokens
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, blk.dim, generator=g)
    t, y = torch.full((B,), 500), torch.tensor([0, 1, 3, 3][:B])
    keep = torch.zeros(B, N, dtype=torch.bool)
    keep[:, :3] = True  # 3 tokens per row, the wrong ones on purpose
    counts = keep.sum(-1)
    plan = hook._path_plan(blk, x, t, y, plan_from_counts(keep, keep.nonzero(), counts, counts.tolist(), "all"),
                           state.reused_update(1))
    err = ((block_forward(blk, x, t, y) - x) - state.blocks[1].u).norm(dim=-1)  # (B, N)
    want = torch.zeros_like(keep).scatter_(1, err.topk(3, dim=-1).indices, True)
    assert torch.equal(plan.keep, want) and plan.T == 3 * B
    assert isinstance(state.scorer, OracleErrorScorer)
