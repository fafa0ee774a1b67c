"""Cached execution (tclab.cache): the contract suite and the invariants of shared/docs/tokencache.md s.2.

Tiny DiTs (conftest) keep every test in milliseconds. The invariants:
- caching disabled -> bit-identical to the plain model; remove -> bit-identical, no hooks left;
- keep-all (rho=1) -> every cached block equals the plain block at float32 round-off;
- runs repeat (state resets), rows are independent (no leakage through padding), FORA skips blocks,
  and it all works inside diffusers' DiTPipeline.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import tclab.cache.hooks as hooks_mod
from tclab.cache import (
    TOKEN_CACHE_BLOCK_HOOK,
    TOKEN_CACHE_MODEL_HOOK,
    TocaScorer,
    TokenCacheConfig,
    TokenScorer,
    apply_token_cache,
    compute_block_tokens,
    fora_config,
    get_token_cache_state,
    remove_token_cache,
)
from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.sampling import SampleConfig, make_scheduler, sample
from tests.conftest import tiny_transformer

ATOL = 2e-5  # float32 round-off of a re-ordered block computation on these tiny widths


@pytest.fixture
def dit3() -> LoadedDiT:
    """A 3-block pixel DiT on 8x8x3 images (4x4 token grid), 3 classes: blocks enough for global selection."""
    return LoadedDiT(name="tiny3", transformer=tiny_transformer(3, 3, layers=3, seed=1), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test",
                     class_names=["a", "b", "c"])


def run(model, labels=(0, 1), steps=6, guidance=2.0, **kw):
    return sample(model, list(labels), SampleConfig(num_steps=steps, guidance_scale=guidance, **kw), progress=False)


def block_inputs(tr, rows=4, seed=0):
    """Random block input (B, N, C), timesteps and labels for direct block tests."""
    g = torch.Generator().manual_seed(seed)
    blk = tr.transformer_blocks[0]
    N = (tr.config.sample_size // tr.config.patch_size) ** 2
    x = torch.randn(rows, N, blk.dim, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.randint(0, 3, (rows,), generator=g)
    return blk, x, t, y


def no_cache_hooks(tr) -> bool:
    names = [n for m in [tr, *tr.transformer_blocks] if hasattr(m, "_diffusers_hook")
             for n in m._diffusers_hook.hooks]
    return TOKEN_CACHE_MODEL_HOOK not in names and TOKEN_CACHE_BLOCK_HOOK not in names


# ---- config -------------------------------------------------------------------------------------

def test_config_validates_every_field():
    with pytest.raises(ValueError, match=r"kv='some'.*\['all', 'kept'\]"):
        TokenCacheConfig(kv="some")
    with pytest.raises(ValueError, match=r"reuse='outputs'.*did you mean 'output'"):
        TokenCacheConfig(reuse="outputs")
    with pytest.raises(ValueError, match=r"rho must be a number in \[0, 1\], got 1.5"):
        TokenCacheConfig(rho=1.5)
    with pytest.raises(ValueError, match="selection='best'"):
        TokenCacheConfig(selection="best")
    with pytest.raises(ValueError, match="schedule='rr'"):
        TokenCacheConfig(schedule="rr")
    with pytest.raises(ValueError, match="interval must be >= 1, got 0"):
        TokenCacheConfig(interval=0)
    with pytest.raises(TypeError, match="full_first_blocks must be an integer"):
        TokenCacheConfig(full_first_blocks=1.5)
    with pytest.raises(ValueError, match="split must be a number in"):
        TokenCacheConfig(split=2)
    with pytest.raises(ValueError, match="scorer='learned'"):
        TokenCacheConfig(scorer="learned")
    with pytest.raises(ValueError, match="needs step_importance"):
        TokenCacheConfig(schedule="percentile")
    with pytest.raises(ValueError, match=r"unknown TokenCacheConfig key\(s\): 'rh0' \(did you mean 'rho'\?\)"):
        TokenCacheConfig.from_dict({"rh0": 0.3})
    cfg = TokenCacheConfig.from_dict({"rho": 0.25, "kv": "kept"})
    assert TokenCacheConfig.from_dict(cfg.to_dict()) == cfg
    f = fora_config(3)
    assert f.rho == 0 and f.schedule == "round-robin" and f.interval == 3 and f.skips_all_blocks


def test_scorer_options_and_availability(dit3, monkeypatch):
    from tclab.cache.registry import SCORERS

    with pytest.raises(ValueError, match=r"does not take option\(s\) \['bogus'\]"):
        apply_token_cache(dit3.transformer, TokenCacheConfig(scorer="toca", scorer_options={"bogus": 1}))
    assert no_cache_hooks(dit3.transformer)
    # a named scorer whose provider module is absent: a clear error, nothing attached
    monkeypatch.setattr(SCORERS, "_entries", {k: v for k, v in SCORERS._entries.items()
                                                if not k.startswith("learned")})
    monkeypatch.setitem(SCORERS.builtin, "learned-static", "tclab.cache.no_such_module")
    with pytest.raises(ValueError, match="'learned-static' is not available"):
        apply_token_cache(dit3.transformer, TokenCacheConfig(scorer="learned-static"))
    assert no_cache_hooks(dit3.transformer)


# ---- the block re-implementation ------------------------------------------------------------------

@pytest.mark.parametrize("kv", ["all", "kept"])
def test_block_on_all_tokens_equals_diffusers_block(dit3, kv):
    """Keep-all: compute_block_tokens over every token == BasicTransformerBlock.forward (round-off)."""
    blk, x, t, y = block_inputs(dit3.transformer)
    ref = blk(x, timestep=t, class_labels=y)
    idx = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    torch.testing.assert_close(compute_block_tokens(blk, x, idx, t, y, kv=kv), ref, rtol=0, atol=ATOL)
    perm = torch.stack([torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(i)) for i in range(4)])
    torch.testing.assert_close(compute_block_tokens(blk, x, perm, t, y, kv=kv), torch.gather(
        ref, 1, perm[..., None].expand(-1, -1, x.shape[-1])), rtol=0, atol=ATOL)


def test_block_on_kept_tokens(dit3):
    """kv='all': kept outputs are the full block's outputs for those tokens. kv='kept': the block run on
    the kept tokens alone, as if they were the whole sequence."""
    blk, x, t, y = block_inputs(dit3.transformer)
    idx = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:5] for i in range(4)])
    gat = lambda a: torch.gather(a, 1, idx[..., None].expand(-1, -1, a.shape[-1]))  # noqa: E731
    torch.testing.assert_close(compute_block_tokens(blk, x, idx, t, y, kv="all"),
                               gat(blk(x, timestep=t, class_labels=y)), rtol=0, atol=ATOL)
    torch.testing.assert_close(compute_block_tokens(blk, x, idx, t, y, kv="kept"),
                               blk(gat(x), timestep=t, class_labels=y), rtol=0, atol=ATOL)


def test_padding_never_leaks_between_rows(dit3):
    """Row 0 keeps 3 tokens, row 1 keeps 9, so attention pads row 0 to 9 slots. Row 0's outputs must
    equal row 0 computed alone; without the key mask (the bug this guards against) they would not."""
    blk, x, t, y = block_inputs(dit3.transformer, rows=2)
    idx = torch.stack([torch.arange(9), torch.arange(7, 16)])  # (2, 9)
    valid = torch.arange(9)[None] < torch.tensor([[3], [9]])  # (2, 9) row 0: only its first 3 are kept
    alone = compute_block_tokens(blk, x[:1], idx[:1, :3], t[:1], y[:1], kv="kept")  # (1, 3, C)
    padded = compute_block_tokens(blk, x, idx, t, y, kv="kept", valid=valid)  # (2, 9, C)
    torch.testing.assert_close(padded[:1, :3], alone, rtol=0, atol=ATOL)
    assert (padded[0, 3:] == 0).all()  # padding entries are not computed

    keep = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, idx, valid)
    counts = keep.sum(1)
    plan = hooks_mod.plan_from_counts(keep, keep.nonzero(), counts, counts.tolist(), "kept")
    assert plan.pad_flat is not None and plan.key_valid is not None and plan.T == 12
    plan.key_valid = None  # leaky: row 0 attends to its 6 empty padding slots
    leaky, _ = hooks_mod.block_packed(blk, x, plan, t, y, kv="kept")  # (12, C), row 0 first
    assert (leaky[:3] - alone[0]).abs().max() > 1e-3


# ---- whole-run invariants ------------------------------------------------------------------------

def test_disabled_is_bit_identical_and_attaches_nothing(dit3):
    ref = run(dit3)
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(enabled=False, rho=0.1))
    assert no_cache_hooks(dit3.transformer) and get_token_cache_state(dit3.transformer) is None
    out = run(dit3)
    assert torch.equal(out.images, ref.images) and torch.equal(out.latents, ref.latents)
    assert state.history == []


def test_apply_twice_raises_and_remove_restores(dit3):
    tr = dit3.transformer
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([500, 500]), torch.tensor([0, 1])
    before = tr(x, timestep=t, class_labels=y).sample
    apply_token_cache(tr, TokenCacheConfig(rho=0.3))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_token_cache(tr, TokenCacheConfig())
    run(dit3)
    remove_token_cache(tr)
    assert no_cache_hooks(tr) and get_token_cache_state(tr) is None
    assert torch.equal(tr(x, timestep=t, class_labels=y).sample, before)
    ref = run(dit3)
    apply_token_cache(tr, TokenCacheConfig(rho=0.3))  # applies again after removal
    remove_token_cache(tr)
    assert torch.equal(run(dit3).images, ref.images)


@pytest.mark.parametrize("kv", ["all", "kept"])
@pytest.mark.parametrize("reuse", ["update", "output"])
def test_keep_all_every_cached_block_equals_plain_block(dit3, kv, reuse):
    """rho=1 with every step after the first cached: each cached block's output equals the plain
    block's on the same input, and the whole run equals the plain run, at round-off."""
    tr = dit3.transformer
    ref = run(dit3, steps=5)
    state = apply_token_cache(tr, TokenCacheConfig(rho=1.0, kv=kv, reuse=reuse, schedule="round-robin",
                                                   interval=100, scorer="random"))
    checked = []

    def check(block, args, kwargs, out):
        if state.phase == "cached":
            plain = type(block).forward(block, args[0], **kwargs)
            torch.testing.assert_close(out, plain, rtol=0, atol=ATOL)
            checked.append(1)

    handles = [b.register_forward_hook(check, with_kwargs=True) for b in tr.transformer_blocks]
    out = run(dit3, steps=5)
    for h in handles:
        h.remove()
    assert len(checked) == 4 * 3  # 4 cached steps x 3 blocks
    assert [r.full for r in state.history] == [True, False, False, False, False]
    assert state.kept_fractions() == [1.0] * 5
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=1e-4)


def test_runs_repeat_and_state_resets(dit3):
    for scorer in ["prev-change", "random", "toca", "oracle"]:
        state = apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.3, scorer=scorer, kv="kept"))
        a, b = run(dit3, steps=7), run(dit3, steps=7)
        assert torch.equal(a.images, b.images), scorer
        runs = [r.run_id for r in state.history]
        assert len(set(runs)) == 2 and [r.step for r in state.history] == list(range(7)) * 2
        # several batches in one call: every chunk is a new run starting with a full step
        state.clear_history()
        run(dit3, labels=(0, 1, 2), steps=4, batch_size=2)
        assert [(r.step, r.full) for r in state.history][::4] == [(0, True), (0, True)]
        remove_token_cache(dit3.transformer)


def test_cached_run_differs_and_accounts(dit3):
    ref = run(dit3, steps=8)
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.25, schedule="round-robin", interval=4))
    out = run(dit3, steps=8)
    assert not torch.allclose(out.latents, ref.latents, atol=1e-4)
    full = [r.full for r in state.history]
    assert full == [True, False, False, False, True, False, False, False]
    for r in state.history:
        if not r.full:
            assert r.kept_fraction == pytest.approx(0.25, abs=0.01) and len(r.kept_per_block) == 3
    s = state.summary()
    assert s["full_steps"] == 2 and s["cached_steps"] == 6 and s["cache_bytes"] > 0


def test_kv_modes_and_reuse_modes_differ(dit3):
    outs = {}
    for kv in ["all", "kept"]:
        for reuse in ["update", "output"]:
            apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.4, kv=kv, reuse=reuse, scorer="random"))
            outs[kv, reuse] = run(dit3, steps=6).latents
            remove_token_cache(dit3.transformer)
            assert torch.isfinite(outs[kv, reuse]).all()
    assert not torch.allclose(outs["all", "update"], outs["kept", "update"], atol=1e-5)
    assert not torch.allclose(outs["all", "update"], outs["all", "output"], atol=1e-5)


@pytest.mark.parametrize("reuse", ["update", "output"])
def test_reuse_semantics_by_hand(dit3, reuse):
    """rho=0: a skipped block returns x + u_cached ("update") or its last computed output ("output")."""
    tr = dit3.transformer
    seen = []  # (phase, block index, input, output)
    state = apply_token_cache(tr, fora_config(interval=10, reuse=reuse))
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.append((state.phase, i, a[0], o)))
               for i, b in enumerate(tr.transformer_blocks)]
    run(dit3, steps=2)
    for h in handles:
        h.remove()
    full = {i: (x, o) for p, i, x, o in seen if p == "full"}
    for p, i, x, o in seen:
        if p == "cached":
            fx, fo = full[i]
            expect = x + (fo - fx) if reuse == "update" else fo
            assert torch.equal(o, expect)


@pytest.mark.parametrize("selection", ["adaptive", "uniform", "global"])
def test_selections_run_and_rows_may_skip_a_block(dit3, selection):
    """adaptive: a row may keep nothing in a block another row computes (padding-only rows stay finite)."""
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.4, kv="kept", selection=selection,
                                                                 scorer="random", full_last_blocks=1))
    out = run(dit3, labels=(0, 1, 2), steps=6)
    assert torch.isfinite(out.latents).all()
    for r in state.history:
        assert r.full or r.kept_per_block[-1] == 1.0  # the last block is forced full


def test_all_full_schedule_is_bit_identical(dit3):
    """interval=1: every step is full, so blocks run untouched, whatever the scorer keeps on the side."""
    ref = run(dit3)
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(scorer="toca", schedule="round-robin", interval=1))
    out = run(dit3)
    assert torch.equal(out.images, ref.images) and all(r.full for r in state.history)
    recv = state.blocks[0].attention  # (B, N) ToCa's received attention sums to 1 per row
    torch.testing.assert_close(recv.sum(-1), torch.ones(recv.shape[0]))


def test_fora_skips_every_block_in_cached_steps(dit3):
    calls = []
    handles = [b.ff.register_forward_hook(lambda *a: calls.append(1)) for b in dit3.transformer.transformer_blocks]
    state = apply_token_cache(dit3.transformer, fora_config(interval=3))
    assert state.scorer is None  # FORA needs no scores
    run(dit3, steps=7)
    full_steps = [r.step for r in state.history if r.full]
    assert full_steps == [0, 3, 6] and len(calls) == 3 * len(full_steps)
    assert all(r.kept_fraction == 0.0 for r in state.history if not r.full)
    for h in handles:
        h.remove()


def test_rows_are_independent(dit3, monkeypatch):
    """Changing sample 1's label changes neither sample 0's masks nor its output, with per-row token
    counts that differ (global selection), so sample 0's rows are padded; a leaky variant (padding
    keys not masked) is caught by the same comparison."""
    masks = []
    real_select = hooks_mod.select_tokens
    monkeypatch.setattr(hooks_mod, "select_tokens", lambda *a, **k: masks.append(real_select(*a, **k)) or masks[-1])
    cfg = TokenCacheConfig(rho=0.4, kv="kept", selection="global", scorer="prev-change", schedule="round-robin",
                           interval=3)

    def go(labels):
        masks.clear()
        apply_token_cache(dit3.transformer, cfg)
        try:
            res = run(dit3, labels=labels, steps=7)
        finally:
            remove_token_cache(dit3.transformer)
        return res, [m.clone() for m in masks]

    (a, ma), (b, mb) = go((0, 1)), go((0, 2))
    rows0 = [0, 2]  # CFG layout [cond 0, cond 1, uncond 0, uncond 1]: sample 0 is rows 0 and 2
    assert len(ma) == 4 and all(torch.equal(x[rows0], y[rows0]) for x, y in zip(ma, mb))
    torch.testing.assert_close(a.latents[0], b.latents[0], rtol=1e-5, atol=1e-5)  # round-off: K differs
    assert not torch.allclose(a.latents[1], b.latents[1], atol=1e-3)
    counts = torch.stack([m.sum(-1) for m in mb])  # (steps, B, L)
    assert (counts[:, rows0] < counts.amax(dim=1, keepdim=True)[:, [0, 0]]).any(), "no padding was exercised"
    assert (counts[:, rows0] > 0).any()

    real_block = hooks_mod.block_packed
    monkeypatch.setattr(hooks_mod, "block_packed",  # drop the key mask
                        lambda blk, x, plan, *a: real_block(blk, x, dataclasses.replace(plan, key_valid=None), *a))
    (c, _), (d, _) = go((0, 1)), go((0, 2))
    leak = (c.latents[0] - d.latents[0]).abs().max()
    assert leak > 100 * 1e-5 * c.latents[0].abs().max(), leak  # far above round-off: the comparison catches it


def test_custom_scorer_plugs_in(dit3):
    class FirstTokens(TokenScorer):
        name = "first-tokens"

        def __init__(self):
            self.calls = 0

        def score(self, ctx):
            self.calls += 1
            B, L, N = ctx.shape
            assert ctx.step.cfg and ctx.step.batch == 2 and ctx.grid == (4, 4)
            return torch.linspace(1, 0, N).expand(B, L, N)

    scorer = FirstTokens()
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.25, selection="uniform", scorer=scorer,
                                                                 schedule="round-robin", interval=2))
    run(dit3, steps=4)
    assert scorer.calls == 2 and state.history[1].kept_per_block == [0.25] * 3

    class Bad(TokenScorer):
        def score(self, ctx):
            return torch.zeros(1, 1, 1)

    remove_token_cache(dit3.transformer)
    apply_token_cache(dit3.transformer, TokenCacheConfig(scorer=Bad(), schedule="round-robin", interval=2))
    with pytest.raises(ValueError, match="expected \\(rows, blocks, tokens\\)"):
        run(dit3, steps=2)


def test_oracle_probe_is_recorded(dit3):
    state = apply_token_cache(dit3.transformer, TokenCacheConfig(rho=0.3, scorer="oracle", schedule="round-robin", interval=10))
    run(dit3, steps=3)
    assert [r.probe for r in state.history] == [False, True, True]
    assert all(b.probe_u is None for b in state.blocks)  # freed after the step


def test_toca_scores_keep_one_token_per_cell():
    st = types.SimpleNamespace(grid=(4, 4), blocks=[types.SimpleNamespace(
        attention=torch.rand(2, 16, generator=torch.Generator().manual_seed(i)),
        age=torch.zeros(2, 16, dtype=torch.long)) for i in range(3)])
    s = TocaScorer().score(types.SimpleNamespace(state=st))  # (2, 3, 16)
    assert s.shape == (2, 3, 16) and s.min() >= 0 and s.max() <= 1
    top4 = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(4, dim=-1).indices, True)
    cells = top4.reshape(2, 3, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 4, 4)  # (B, L, cell, 4)
    assert cells.any(-1).all()  # with N/4 kept tokens every 2x2 cell keeps exactly one


# ---- diffusers' DiTPipeline -----------------------------------------------------------------------

def pipe_run(model, steps=6, guidance=4.0):
    pipe = model.pipeline(make_scheduler("ddim", model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=[3, 7], guidance_scale=guidance, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(5), output_type="np").images


def test_inside_dit_pipeline(latent_dit, recwarn):
    import numpy as np

    ref = pipe_run(latent_dit)
    apply_token_cache(latent_dit.transformer, TokenCacheConfig(enabled=False))
    np.testing.assert_array_equal(pipe_run(latent_dit), ref)

    state = apply_token_cache(latent_dit.transformer, TokenCacheConfig(rho=0.25, num_steps=6, schedule="round-robin",
                                                                       interval=3))
    a, b = pipe_run(latent_dit), pipe_run(latent_dit)
    assert np.abs(a - ref).max() > 1e-4
    np.testing.assert_array_equal(a, b)  # the second call is a new run: the call count reset the cache
    assert [(r.step, r.full) for r in state.history[:6]] == [(0, True), (1, False), (2, False), (3, True),
                                                             (4, False), (5, False)]
    assert [r.step for r in state.history[6:]] == list(range(6)) and state.history[0].run_id < 0
    remove_token_cache(latent_dit.transformer)

    # without num_steps: inferred from the first two timesteps (DDIM 'leading' spacing: exact), with a warning
    state = apply_token_cache(latent_dit.transformer, TokenCacheConfig(rho=0.25, schedule="round-robin", interval=3))
    with pytest.warns(UserWarning, match="inferred num_steps=6"):
        c = pipe_run(latent_dit)
    np.testing.assert_array_equal(c, a)
    state.reset_state()
    np.testing.assert_array_equal(pipe_run(latent_dit), a)
    remove_token_cache(latent_dit.transformer)
    np.testing.assert_array_equal(pipe_run(latent_dit), ref)


def test_token_cache_refuses_a_transformer_carrying_a_peer(pixel_dit):
    from tclab.cache.peers import apply_peer

    handle = apply_peer("fbcache", pixel_dit)
    with pytest.raises(RuntimeError, match="external caching peer"):
        apply_token_cache(pixel_dit.transformer, TokenCacheConfig())
    handle.remove()
    state = apply_token_cache(pixel_dit.transformer, TokenCacheConfig())  # fine once the peer is gone
    assert state is not None
    remove_token_cache(pixel_dit.transformer)


def test_rho_below_the_forced_blocks_share_is_warned(pixel_dit):
    """2 blocks, first 1 forced full: rho < 0.5 cannot be honoured (the forced block alone is half the pairs)."""
    import warnings as _w

    from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache

    with pytest.warns(UserWarning, match=r"rho=0.2 is below the share of the forced-full blocks \(1 of 2 = 0.5\)"):
        apply_token_cache(pixel_dit.transformer, TokenCacheConfig(rho=0.2, full_first_blocks=1))
    remove_token_cache(pixel_dit.transformer)
    with _w.catch_warnings():
        _w.simplefilter("error")
        apply_token_cache(pixel_dit.transformer, TokenCacheConfig(rho=0.6, full_first_blocks=1))  # no warning
    remove_token_cache(pixel_dit.transformer)


def test_a_scorer_registered_by_name_is_usable_by_name_everywhere(dit3, monkeypatch):
    """The documented way to add a scorer: register it, then name it in a config and in a sweep."""
    from tclab import ablation
    from tclab.cache import available_scorers, register_scorer
    from tclab.cache.registry import SCORERS

    class CornerScorer(TokenScorer):          # scores the first tokens highest: easy to check by hand
        name = "corner"
        needs = frozenset()

        def score(self, ctx):
            B, L, N = ctx.shape
            return torch.linspace(1, 0, N, device=ctx.device).expand(B, L, N)

    monkeypatch.setattr(SCORERS, "_entries", dict(SCORERS._entries))   # the registration ends with the test
    with pytest.raises(ValueError, match="'corner' is not a valid choice"):
        TokenCacheConfig(scorer="corner")
    register_scorer("corner", lambda config, **options: CornerScorer())
    assert "corner" in available_scorers()
    config = TokenCacheConfig(scorer="corner", rho=0.5)                     # valid by name now
    state = apply_token_cache(dit3.transformer, config)
    assert type(state.scorer).__name__ == "CornerScorer"
    remove_token_cache(dit3.transformer)
    (variant,) = ablation.predictor_variants(["corner"], [0.5])             # and in a sweep's variants
    assert variant.curve == "corner" and TokenCacheConfig(**variant.cache).scorer == "corner"
