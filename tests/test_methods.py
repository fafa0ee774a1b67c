"""One caching interface for the external peers: the registry is the one list of peers, a new peer is
one file plus its ``register_peer`` call, and ``apply_caching(transformer, SomePeerConfig())`` is
``apply_peer(name, model, ...)``.

The toy peer below is the whole recipe for a new peer (what ``tclab/cache/peers/fbcache.py`` does for
First-Block Cache): a config dataclass with a teaching docstring, a handle class whose ``_install``
registers a diffusers ``ModelHook`` by name, and one ``register_peer`` call (here in a fixture, which
unregisters it again so no test sees it after).
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from tests.conftest import tiny_transformer
from diffusers.hooks import ModelHook

from tclab.cache import apply_caching, available_methods
from tclab.cache.methods import BUILTIN_METHODS, STATS_KEYS, CachingHandle, method_config
from tclab.cache.peers import (PEERS, DiffusersPeer, PeerHandle, PeerUnavailableError, apply_peer, peer_config,
                               peer_label, peer_names, peer_status, register_peer, unregister_peer)
from tclab.cache.peers.base import tensor_bytes
from tclab.sampling import SampleConfig, sample

SAMPLING = SampleConfig(num_steps=6, guidance_scale=3.0, seed=3)
LABELS = [0, 2]
# Settings that make each built-in peer skip work on a random tiny DiT (as in tests/test_peers.py).
LOOSE = {
    "fbcache": dict(threshold=10.0),
    "taylorseer": dict(cache_interval=3, disable_cache_before_step=2),
    "pab": dict(block_skip_range=3, timestep_skip_range=(0, 1000)),
    "dbcache": dict(residual_diff_threshold=10.0, max_warmup_steps=2),
}


def runnable(name: str, model) -> None:
    status = peer_status(model)[name]
    if status != "ok":
        pytest.skip(f"{name} cannot run here: {status}")


def run(model) -> torch.Tensor:
    return sample(model, LABELS, SAMPLING, progress=False).images


def snapshot(transformer: torch.nn.Module) -> dict:
    return {name: (type(m), sorted(vars(m)), sorted(m._modules)) for name, m in transformer.named_modules()}


# ---- a toy peer, defined entirely here ------------------------------------------------------------

TOY_HOOK = "toy_skip_last_block"


@dataclass
class SkipLastBlockConfig:
    """Skip-last-block: a toy peer that reuses the last block's residual on most calls.

    On the first call of a run and then on every ``every``-th call, the last block runs and its
    residual ``x_L - x_{L-1}`` is stored; on the other calls it is skipped and ``x_L = x_{L-1} +
    stored residual``. Source: none, a test of the registry (see tests/test_methods.py).

    Args:
        every: run the last block once every this many calls. **Speed: raise it**; **quality: lower
            it** (1 = never skip).
    """

    every: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1, got {self.every!r}")


class SkipLastBlockHook(ModelHook):
    _is_stateful = True

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.skipped = 0  # over the handle's life, for stats()
        self.reset_state(None)

    def reset_state(self, module):
        self.count, self.residual = 0, None
        return module

    def new_forward(self, module, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # (B, N, C)
        skip = self.residual is not None and self.count % self.every != 0
        self.count += 1
        if skip:
            self.skipped += 1
            return x + self.residual
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.residual = out - x
        return out


class SkipLastBlockPeer(DiffusersPeer):
    __doc__ = SkipLastBlockConfig.__doc__

    def _install(self) -> None:
        last = self._blocks()[-1]
        self._hook = SkipLastBlockHook(self.config.every)
        self._registry(last).register_hook(self._hook, TOY_HOOK)
        self._hooks.append((last, TOY_HOOK))  # reset and removed by name by DiffusersPeer

    def _work_stats(self) -> dict:
        n, skipped = len(self._blocks()), self._hook.skipped
        return {"full_steps": self.calls - skipped, "cached_steps": skipped,
                "compute_fraction": (self.calls * n - skipped) / (self.calls * n) if self.calls else None,
                "cache_bytes": tensor_bytes(self._hook.residual)}


@pytest.fixture
def toy():
    """The toy peer registered under "toy" for one test, then unregistered."""
    apply_toy = register_peer("toy", SkipLastBlockConfig, SkipLastBlockPeer, label="toy skip-last-block")
    try:
        yield apply_toy
    finally:
        unregister_peer("toy")
    assert "toy" not in PEERS and "toy" not in available_methods()


def test_a_peer_defined_in_a_test_is_usable_by_name_and_by_config(pixel_dit, toy):
    assert list(PEERS)[-1] == "toy" and peer_names()[-1] == "toy" and peer_label("toy") == "toy skip-last-block"
    assert peer_status()["toy"] == peer_status(pixel_dit)["toy"] == "ok"
    assert peer_config("toy") is SkipLastBlockConfig and "toy" in available_methods()
    before = snapshot(pixel_dit.transformer)
    plain = run(pixel_dit)

    handle = apply_peer("toy", pixel_dit, every=2)
    by_name = run(pixel_dit)
    stats = handle.stats()
    handle.remove()
    assert set(STATS_KEYS) <= set(stats) and stats["method"] == stats["peer"] == "toy"
    n = SAMPLING.num_steps  # calls 1, 3, 5 of the run skip the last block: 3 of 6 calls, 1 of 2 blocks
    assert (stats["calls"], stats["runs"], stats["full_steps"], stats["cached_steps"]) == (n, 1, n // 2, n // 2)
    assert stats["compute_fraction"] == pytest.approx(0.75) and stats["cache_bytes"] > 0
    assert stats["options"] == {"every": 2}
    assert not torch.equal(by_name, plain) and snapshot(pixel_dit.transformer) == before

    for target in (pixel_dit.transformer, pixel_dit):  # the one interface, on a bare transformer or a LoadedDiT
        with apply_caching(target, SkipLastBlockConfig(every=2)) as h:
            assert isinstance(h, SkipLastBlockPeer) and h.method == "toy"
            torch.testing.assert_close(run(pixel_dit), by_name, rtol=0, atol=0)
        assert h.removed and snapshot(pixel_dit.transformer) == before
    exact = toy(pixel_dit, every=1)  # the apply function register_peer returned; every=1 never skips
    assert torch.equal(run(pixel_dit), plain) and exact.stats()["cached_steps"] == 0
    exact.remove()


def test_toy_peer_option_errors_and_one_at_a_time(pixel_dit, toy):
    with pytest.raises(TypeError, match=r"\['every'\].*test_methods.SkipLastBlockConfig"):
        apply_peer("toy", pixel_dit, evry=2)  # the message lists the options and where they are documented
    with pytest.raises(ValueError, match="every must be"):
        method_config("toy", every=0)
    handle = toy(pixel_dit)
    with pytest.raises(RuntimeError, match="'toy' is already applied"):
        apply_peer("fbcache", pixel_dit)
    handle.remove()


def test_registration_refuses_clashes(toy):
    @dataclass
    class Other:
        """x"""

    with pytest.raises(ValueError, match="already registered"):
        register_peer("toy", Other, SkipLastBlockPeer)
    with pytest.raises(ValueError, match="already the name of a caching method"):
        register_peer("tokencache", Other, SkipLastBlockPeer)
    with pytest.raises(TypeError, match="PeerHandle subclass"):
        register_peer("other", Other, CachingHandle)
    with pytest.raises(ValueError, match="built-in"):
        unregister_peer("fbcache")
    with pytest.raises(KeyError, match="unknown peer"):
        unregister_peer("nope")
    assert "other" not in PEERS and "tokencache" not in PEERS


def test_an_unregistered_peer_is_gone_everywhere(pixel_dit):
    register_peer("toy", SkipLastBlockConfig, SkipLastBlockPeer)
    unregister_peer("toy")
    assert "toy" not in PEERS and "toy" not in peer_status() and "toy" not in available_methods()
    with pytest.raises(KeyError, match="unknown peer 'toy'"):
        apply_peer("toy", pixel_dit)
    with pytest.raises(TypeError, match="not the config of a registered caching method"):
        apply_caching(pixel_dit.transformer, SkipLastBlockConfig())
    assert not hasattr(pixel_dit.transformer, "_diffusers_hook")


# ---- the built-in peers through the one interface --------------------------------------------------

def test_the_registry_lists_the_built_in_peers_in_order_each_from_its_own_module():
    assert list(PEERS)[:4] == ["fbcache", "taylorseer", "pab", "dbcache"] == list(peer_status())[:4]
    for name in PEERS:
        module = BUILTIN_METHODS[name]
        assert module == f"tclab.cache.peers.{name}" and peer_config(name).__module__ == module
        assert importlib.import_module(module).__dict__[f"apply_{name}"] is PEERS[name]
        assert name in available_methods()


def test_importing_the_peers_imports_no_optional_package():
    code = "import sys, tclab.cache.peers as p; p.peer_status(); assert 'cache_dit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fixture", ["latent_dit", "pixel_dit"])
@pytest.mark.parametrize("name", list(LOOSE))
def test_apply_caching_with_a_peer_config_equals_apply_peer(request, fixture, name):
    model = request.getfixturevalue(fixture)
    runnable(name, model)
    plain = run(model)
    handle = apply_peer(name, model, **LOOSE[name])
    ours = run(model)
    by_name = handle.stats()
    handle.remove()
    with apply_caching(model.transformer, peer_config(name)(**LOOSE[name])) as h:
        assert isinstance(h, PeerHandle) and isinstance(h, CachingHandle) and h.method == h.name == name
        assert h.transformer is model.transformer and h.model is None  # a bare transformer: no LoadedDiT
        torch.testing.assert_close(run(model), ours, rtol=0, atol=0)
        by_config = h.stats()
    assert not torch.equal(ours, plain)  # the setting skips work, so the comparison means something
    assert by_config == by_name


@pytest.mark.parametrize("name", list(LOOSE))
def test_every_peer_fills_the_common_stats(pixel_dit, name):
    runnable(name, pixel_dit)
    handle = apply_peer(name, pixel_dit, **LOOSE[name])
    assert handle.model is pixel_dit and handle.transformer is pixel_dit.transformer
    empty = handle.stats()
    run(pixel_dit)
    stats = handle.stats()
    handle.remove()
    assert list(stats)[:len(STATS_KEYS)] == list(STATS_KEYS) and list(empty) == list(stats)
    assert stats["method"] == stats["peer"] == name and stats["options"] == dataclasses.asdict(handle.config)
    assert (stats["calls"], stats["runs"]) == (SAMPLING.num_steps, 1) and empty["compute_fraction"] is None
    assert isinstance(stats["cache_bytes"], int) and stats["cache_bytes"] > 0
    n = len(pixel_dit.transformer.transformer_blocks)
    if name in ("fbcache", "dbcache"):  # skipped calls run block 0 (fbcache) / the Fn + Bn blocks (dbcache)
        probe = 1 if name == "fbcache" else handle.config.Fn_compute_blocks + handle.config.Bn_compute_blocks
        assert stats["full_steps"] == stats["computed_calls"] and stats["cached_steps"] == stats["skipped_calls"] > 0
        expected = (stats["computed_calls"] * n + stats["skipped_calls"] * probe) / (stats["calls"] * n)
        assert stats["compute_fraction"] == pytest.approx(expected) and stats["compute_fraction"] < 1
    else:  # their hooks do not report per call what they computed
        assert stats["full_steps"] is stats["cached_steps"] is stats["compute_fraction"] is None
        assert stats["hooked_modules"] > 0


def test_a_peer_on_a_bare_transformer_names_its_class_in_messages():
    one_block = tiny_transformer(3, 3, layers=1)
    assert "DiTTransformer2DModel has 1" in peer_status(one_block)["fbcache"]
    with pytest.raises(PeerUnavailableError, match="cannot run on DiTTransformer2DModel: first-block cache needs"):
        apply_peer("fbcache", one_block)
    with pytest.raises(PeerUnavailableError, match="cannot run on DiTTransformer2DModel"):
        apply_caching(one_block, peer_config("fbcache")())
    with pytest.raises(TypeError, match="LoadedDiT or a DiTTransformer2DModel"):
        apply_peer("pab", "not a model")
    assert not hasattr(one_block, "_diffusers_hook")
