"""First-Block Cache (FBCache), run by diffusers' own hooks (``apply_first_block_cache``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DiffusersPeer, diffusers_has, register_peer


@dataclass
class FirstBlockCachePeerConfig:
    """First-Block Cache (FBCache): ParaAttention's dynamic caching, run by diffusers' hooks.

    Source: https://github.com/chengzeyi/ParaAttention (README, "First Block Cache"); a simpler,
    model-agnostic relative of TeaCache (arXiv 2411.19108). diffusers: ``FirstBlockCacheConfig``,
    ``apply_first_block_cache``.

    Every call runs block 0 and measures how much its residual ``r = x_1 - x_0`` moved since the
    last *fully computed* call: ``mean|r - r_full| / mean|r_full|`` over the whole batch. Above
    ``threshold``: blocks 1..L-1 run and the cache stores their combined residual
    ``x_L - x_1``. At or below: blocks 1..L-1 are skipped and ``x_L = x_1 + cached residual``.
    The first call of a run always computes.

    Args:
        threshold: the relative change below which the rest of the network is skipped.
            **Speed: raise it** (more steps skipped); **quality: lower it** (0 = never skip).
            diffusers' default 0.05; ParaAttention suggests ~0.08-0.12 for FLUX at 28 steps. The
            scale is model-specific: read the measured change (``tclab.record``) to pick it.

    Stats: ``full_steps`` / ``cached_steps`` are the calls that ran all blocks / skipped blocks
    1..L-1; ``compute_fraction = (computed * L + skipped * 1) / (calls * L)`` in blocks, because
    block 0 always runs (it is the probe); ``cache_bytes`` sums the stored head output, head residual
    and tail residual.
    """

    threshold: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")


class FirstBlockCachePeer(DiffusersPeer):
    __doc__ = FirstBlockCachePeerConfig.__doc__

    def __init__(self, name, target, config: FirstBlockCachePeerConfig):
        super().__init__(name, target, config)
        self.skipped_calls = 0
        self._num_blocks = len(self._blocks())

    def _install(self) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        blocks = list(self._blocks())
        fresh = [b for b in blocks if not hasattr(b, "_diffusers_hook")]
        apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=float(self.config.threshold)))
        self._created_registries.extend(fresh)
        self._adopt(blocks, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK))
        self._leader = blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)

    def _after_call(self) -> None:
        state = self._leader.state_manager.get_state()
        self.skipped_calls += int(not state.should_compute)

    def _work_stats(self) -> dict:
        computed, skipped, n = self.calls - self.skipped_calls, self.skipped_calls, self._num_blocks
        return {"full_steps": computed, "cached_steps": skipped,
                "compute_fraction": (computed * n + skipped) / (self.calls * n) if self.calls else None,
                "cache_bytes": self._cache_bytes()}

    def _extra_stats(self) -> dict:
        return {"skipped_calls": self.skipped_calls,
                "computed_calls": self.calls - self.skipped_calls}


def _two_blocks(transformer: torch.nn.Module, label: str) -> str | None:
    n = len(transformer.transformer_blocks)
    if n < 2:
        return (f"first-block cache needs at least 2 blocks (a head that always runs and a tail that "
                f"stores the residual); {label} has {n}")
    return None


apply_fbcache = register_peer(
    "fbcache", FirstBlockCachePeerConfig, FirstBlockCachePeer,
    requirement=lambda: diffusers_has("FirstBlockCacheConfig", "apply_first_block_cache"),
    model_requirement=_two_blocks, label="diffusers first-block cache")
