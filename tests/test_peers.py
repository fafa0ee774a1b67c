"""External peers (tclab.cache.peers) on tiny DiTs: they run in tclab's sampler and in DiTPipeline,
really skip work, are exact at their never-skip settings, and remove() leaves the model as it was.

Work is counted as calls of the ``nn.Linear`` layers inside the blocks, not calls of the blocks: the
diffusers hooks replace a block's ``forward``, and torch forward hooks on the block itself fire
whether or not that replacement ran the block's body.

The ``dbcache`` cases need the optional cache-dit package (``pip install --no-deps cache-dit==1.5.3``)
and are skipped with ``pytest.importorskip`` where it is not installed.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from tests.conftest import tiny_transformer
from diffusers import DiTPipeline

from tclab.cache.methods import STATS_KEYS
from tclab.cache.peers import PEERS, PeerUnavailableError, apply_peer, peer_config, peer_status
from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.sampling import SampleConfig, current_step, sample

# Settings that make each peer skip a lot on a random tiny DiT (quality is not the point here) ...
LOOSE = {
    "fbcache": dict(threshold=10.0),
    "taylorseer": dict(cache_interval=3, disable_cache_before_step=2),
    "pab": dict(block_skip_range=3, timestep_skip_range=(0, 1000)),
    "dbcache": dict(residual_diff_threshold=10.0, max_warmup_steps=2),
}
# ... and settings at which each peer computes everything, so it must equal the plain model bit for bit.
NEVER_SKIP = {
    "fbcache": dict(threshold=0.0),
    "taylorseer": dict(cache_interval=1),
    "pab": dict(block_skip_range=1),
    "dbcache": dict(residual_diff_threshold=0.0, max_warmup_steps=0),
}
CFG = SampleConfig(num_steps=8, guidance_scale=3.0, seed=1)
LABELS = [0, 2, 1]


def need(name: str) -> None:
    if name == "dbcache":
        pytest.importorskip("cache_dit", reason="optional peer: pip install --no-deps cache-dit==1.5.3")


@pytest.fixture(params=["pixel_dit", "latent_dit"])
def dit(request) -> LoadedDiT:
    return request.getfixturevalue(request.param)


@contextmanager
def count_linear_calls(model: LoadedDiT):
    """Count forward calls of every nn.Linear inside the transformer blocks (the work that ran)."""
    box = {"n": 0}

    def bump(*_):
        box["n"] += 1

    handles = [m.register_forward_hook(bump) for m in model.transformer.transformer_blocks.modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


def snapshot(model: LoadedDiT) -> dict:
    """Every module's type, attribute names and children, plus the state dict's keys."""
    tree = {name: (type(m), sorted(vars(m)), sorted(m._modules)) for name, m in model.transformer.named_modules()}
    return {"tree": tree, "state": sorted(model.transformer.state_dict())}


def run_sampler(model: LoadedDiT, config: SampleConfig = CFG):
    with count_linear_calls(model) as work:
        images = sample(model, LABELS, config, progress=False).images
    return images, work["n"]


def run_pipeline(model: LoadedDiT):
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with count_linear_calls(model) as work:
        images = pipe(class_labels=LABELS, guidance_scale=CFG.guidance_scale, num_inference_steps=CFG.num_steps,
                      generator=torch.Generator().manual_seed(CFG.seed), output_type="np").images
    return images, work["n"]


def to_pipeline_range(images: torch.Tensor) -> np.ndarray:
    """tclab's images in [-1, 1] (N, 3, H, W) -> DiTPipeline's numpy output, with the pipeline's own mapping."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# ---- status and errors -------------------------------------------------------------------------------

def test_peer_status_lists_every_peer_with_ok_or_a_reason(pixel_dit):
    for status in (peer_status(), peer_status(pixel_dit)):
        assert list(status) == list(PEERS)  # the registry is the one list (order: tests/test_methods.py)
        for name, s in status.items():
            assert s == "ok" or (isinstance(s, str) and len(s) > 20), (name, s)
    # diffusers' own hooks are always there in the pinned diffusers
    assert all(peer_status(pixel_dit)[n] == "ok" for n in PEERS if n != "dbcache")
    expected = "ok" if importlib.util.find_spec("cache_dit") else "not installed"
    assert expected in peer_status(pixel_dit)["dbcache"]


def test_unavailable_peer_raises_with_the_reason_and_touches_nothing():
    one_block = LoadedDiT(name="one-block", transformer=tiny_transformer(3, 3, layers=1), vae=PixelSpaceVAE(),
                          scheduler_config=default_scheduler_config(), trained=False, source="test")
    reason = peer_status(one_block)["fbcache"]
    assert "at least 2 blocks" in reason
    before = snapshot(one_block)
    with pytest.raises(PeerUnavailableError, match="at least 2 blocks"):
        apply_peer("fbcache", one_block)
    assert snapshot(one_block) == before
    assert peer_status(one_block)["pab"] == "ok"  # the others still run on one block


def test_missing_cache_dit_is_reported_not_dropped(pixel_dit, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "cache_dit" else real(name, *a, **k))
    reason = peer_status(pixel_dit)["dbcache"]
    assert "cache-dit is not installed" in reason and "pip install" in reason
    with pytest.raises(PeerUnavailableError, match="cache-dit is not installed"):
        apply_peer("dbcache", pixel_dit)
    assert not hasattr(pixel_dit.transformer, "_diffusers_hook")


def test_bad_names_and_options_fail_clearly(pixel_dit):
    with pytest.raises(KeyError, match="fbcache"):
        apply_peer("teacache", pixel_dit)
    with pytest.raises(TypeError, match="threshold"):
        apply_peer("fbcache", pixel_dit, treshold=0.1)  # typo: the message lists the real option
    with pytest.raises(ValueError, match="modules"):
        apply_peer("taylorseer", pixel_dit, modules=("attn2",))
    with pytest.raises(ValueError, match="timestep_skip_range"):
        apply_peer("pab", pixel_dit, timestep_skip_range=(800, 100))
    assert not hasattr(pixel_dit.transformer, "_diffusers_hook")


def test_one_peer_at_a_time(pixel_dit):
    h = apply_peer("fbcache", pixel_dit)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_peer("pab", pixel_dit)
    h.remove()
    h.remove()  # idempotent
    apply_peer("pab", pixel_dit).remove()


def test_peer_refuses_a_model_with_a_token_cache(pixel_dit):
    from tclab.cache import apply_token_cache, remove_token_cache

    apply_token_cache(pixel_dit.transformer)
    with pytest.raises(RuntimeError, match="remove_token_cache"):
        apply_peer("fbcache", pixel_dit)
    remove_token_cache(pixel_dit.transformer)
    apply_peer("fbcache", pixel_dit).remove()


def test_diffusers_hooks_alone_fail_on_dit_without_the_context(pixel_dit):
    """Why the harness exists: DiT has no CacheMixin, so diffusers' stateful hooks find no cache context."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(pixel_dit.transformer, FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="No cache context"):
        sample(pixel_dit, LABELS, CFG, progress=False)


def test_every_peer_has_a_documented_config():
    for name in PEERS:
        doc = peer_config(name).__doc__
        assert "Speed" in doc and "uality" in doc, name  # says which way to turn the knob
        assert "arXiv" in doc or "github.com" in doc, name  # and where the method comes from


# ---- behaviour of each peer ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PEERS))
def test_peer_in_sampler_skips_work_and_removes_exactly(dit, name):
    need(name)
    before = snapshot(dit)
    plain, plain_work = run_sampler(dit)
    handle = apply_peer(name, dit, **LOOSE[name])
    cached, work = run_sampler(dit)
    again, work_again = run_sampler(dit)
    assert torch.isfinite(cached).all()
    assert work < plain_work, f"{name} did not skip any Linear call ({work} vs {plain_work})"
    torch.testing.assert_close(again, cached, rtol=0, atol=0)  # state is reset between runs
    assert work_again == work
    assert not torch.equal(cached, plain)  # skipping at this setting changes the result
    stats = handle.stats()
    assert stats["peer"] == name and stats["runs"] == 2 and stats["calls"] == 2 * CFG.num_steps
    assert set(STATS_KEYS) <= set(stats) and stats["method"] == name
    handle.remove()
    restored, restored_work = run_sampler(dit)
    assert torch.equal(restored, plain) and restored_work == plain_work
    assert snapshot(dit) == before


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_in_dit_pipeline_matches_the_sampler(dit, name):
    need(name)
    plain, plain_work = run_pipeline(dit)
    handle = apply_peer(name, dit, **LOOSE[name])
    ours, _ = run_sampler(dit)
    images, work = run_pipeline(dit)
    images_again, _ = run_pipeline(dit)  # a second pipeline call is recognised as a new run
    assert np.isfinite(images).all()
    assert work < plain_work
    np.testing.assert_array_equal(images, to_pipeline_range(ours))  # same context in both harnesses
    np.testing.assert_array_equal(images_again, images)
    assert handle.stats()["runs"] == 3
    handle.remove()
    np.testing.assert_array_equal(run_pipeline(dit)[0], plain)


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_at_never_skip_setting_is_exact(pixel_dit, name):
    need(name)
    plain, plain_work = run_sampler(pixel_dit)
    handle = apply_peer(name, pixel_dit, **NEVER_SKIP[name])
    cached, work = run_sampler(pixel_dit)
    handle.remove()
    assert torch.equal(cached, plain) and work == plain_work


@pytest.mark.parametrize("name", ["fbcache", "dbcache"])
def test_skip_counters_agree_with_the_work(pixel_dit, name):
    need(name)
    handle = apply_peer(name, pixel_dit, **LOOSE[name])
    run_sampler(pixel_dit)
    stats = handle.stats()
    handle.remove()
    assert stats["skipped_calls"] > 0 and stats["skipped_calls"] + stats["computed_calls"] == stats["calls"]


def test_batch_chunks_are_separate_runs(pixel_dit):
    """tclab's sampler splits labels into chunks of batch_size (here 2 + 1 rows): each chunk is a new run,
    so no state of one chunk (whose batch is a different shape) leaks into the next."""
    handle = apply_peer("fbcache", pixel_dit, **LOOSE["fbcache"])
    chunked, _ = run_sampler(pixel_dit, SampleConfig(num_steps=4, guidance_scale=3.0, batch_size=2))
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(chunked).all() and chunked.shape[0] == len(LABELS)
    assert stats["runs"] == 2 and stats["skipped_calls"] == 2 * (4 - 1)  # every step but each chunk's first


def test_taylorseer_forecasts_on_the_documented_steps(pixel_dit):
    """Full steps 0..b-1, then s with (s - b - 1) % N == 0: count attn1 computations per step."""
    handle = apply_peer("taylorseer", pixel_dit, cache_interval=3, disable_cache_before_step=2, modules=("attn1",))
    computed = []
    q = pixel_dit.transformer.transformer_blocks[0].attn1.to_q
    hook = q.register_forward_hook(lambda *_: computed.append(current_step().step))
    sample(pixel_dit, LABELS, SampleConfig(num_steps=10, guidance_scale=3.0), progress=False)
    hook.remove()
    handle.remove()
    assert computed == [s for s in range(10) if s < 2 or (s - 2 - 1) % 3 == 0] == [0, 1, 3, 6, 9]


def test_pab_only_broadcasts_inside_the_timestep_range(pixel_dit):
    handle = apply_peer("pab", pixel_dit, block_skip_range=100, timestep_skip_range=(300, 700))
    ts = []
    q = pixel_dit.transformer.transformer_blocks[0].attn1.to_q
    hook = q.register_forward_hook(lambda *_: ts.append(current_step().t))
    res = sample(pixel_dit, LABELS, SampleConfig(num_steps=10, guidance_scale=3.0), progress=False)
    hook.remove()
    handle.remove()
    inside = [t for t in res.timesteps if 300 < t < 700]
    assert inside and all(t not in ts for t in inside[1:])  # only the first call inside the range computes
    assert all(t in ts for t in res.timesteps if not 300 < t < 700)


def test_dbcache_leaves_dit_pipeline_class_alone(pixel_dit):
    pytest.importorskip("cache_dit", reason="optional peer: pip install --no-deps cache-dit==1.5.3")
    call = DiTPipeline.__call__
    handle = apply_peer("dbcache", pixel_dit, **LOOSE["dbcache"])
    assert DiTPipeline.__call__ is call and not hasattr(DiTPipeline, "_is_cached")
    handle.remove()
    assert DiTPipeline.__call__ is call


def test_methods_in_sequence_leave_the_model_as_they_found_it(pixel_dit):
    """A sweep runs token caches and every peer one after another on one model: each must leave no
    trace (regression: an emptied hook registry left by remove_token_cache made cache-dit keep its
    patched forward after remove(), and every later run failed)."""
    from tclab.cache import apply_token_cache, fora_config, remove_token_cache

    before = snapshot(pixel_dit)
    plain, _ = run_sampler(pixel_dit)
    order = ["tokencache", *[n for n in PEERS if n != "dbcache"], "tokencache"]
    try:
        import cache_dit  # noqa: F401
        order = ["tokencache", "dbcache", *order[1:], "dbcache", "tokencache"]
    except ImportError:
        pass
    for name in order:
        if name == "tokencache":
            apply_token_cache(pixel_dit.transformer, fora_config(2))
            run_sampler(pixel_dit)
            remove_token_cache(pixel_dit.transformer)
        else:
            handle = apply_peer(name, pixel_dit, **LOOSE[name])
            run_sampler(pixel_dit)
            handle.remove()
        assert snapshot(pixel_dit) == before, f"{name} left a trace on the transformer"
        restored, _ = run_sampler(pixel_dit)
        assert torch.equal(restored, plain), f"after {name} the plain model no longer gives its own output"
