"""Pyramid Attention Broadcast (PAB), run by diffusers' own hooks (``apply_pyramid_attention_broadcast``)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import DiffusersPeer, PeerUnavailableError, check_positive_int, diffusers_has, register_peer


@dataclass
class PyramidAttentionBroadcastPeerConfig:
    """Pyramid Attention Broadcast (PAB): reuse attention outputs across neighbouring steps.

    Paper: Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast", arXiv
    2408.12588. diffusers: ``PyramidAttentionBroadcastConfig``, ``apply_pyramid_attention_broadcast``.

    Each hooked attention module (DiT: every block's self-attention ``attn1``; PAB's cross- and
    temporal-attention ranges have nothing to act on in a DiT) counts its calls. While the current
    timestep value ``t`` lies strictly inside ``timestep_skip_range``, it computes only on every
    ``block_skip_range``-th call and otherwise returns (broadcasts) its last output. Outside the
    range, and on the first call, it always computes. The MLP always runs.

    Args:
        block_skip_range: compute attention once every this many calls inside the range.
            **Speed: raise it** (2 = skip every other step); quality: lower it (1 = never skip).
        timestep_skip_range: ``(low, high)`` in *timestep values* ``t`` (not step indices), open
            interval. **Speed: widen it**; quality: narrow it. The paper skips in the middle of the
            trajectory and keeps the noisy start and the detailed end exact; diffusers' default
            (100, 800) for a 1000-step schedule.

    Stats: ``cache_bytes`` sums the broadcast attention outputs; ``full_steps``, ``cached_steps`` and
    ``compute_fraction`` are None (see ``DiffusersPeer._work_stats``).
    """

    block_skip_range: int = 2
    timestep_skip_range: tuple[float, float] = (100, 800)

    def __post_init__(self) -> None:
        check_positive_int("block_skip_range", self.block_skip_range)
        lo_hi = tuple(self.timestep_skip_range)
        if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
            raise ValueError("timestep_skip_range must be (low, high) with low < high, "
                             f"got {self.timestep_skip_range!r}")
        self.timestep_skip_range = lo_hi


class PyramidAttentionBroadcastPeer(DiffusersPeer):
    __doc__ = PyramidAttentionBroadcastPeerConfig.__doc__

    def _install(self) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
        from diffusers.models.attention_processor import Attention

        tr = self.transformer
        targets = [m for m in tr.modules() if isinstance(m, Attention)]
        fresh = [m for m in targets if not hasattr(m, "_diffusers_hook")]
        apply_pyramid_attention_broadcast(tr, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.config.block_skip_range,
            spatial_attention_timestep_skip_range=self.config.timestep_skip_range,
            current_timestep_callback=self._current_timestep))
        self._created_registries.extend(fresh)
        self._adopt(targets, (_PYRAMID_ATTENTION_BROADCAST_HOOK,))
        if not self._hooks:
            raise PeerUnavailableError("pab hooked no attention module (expected transformer_blocks.N.attn1)")

    def _state_objects(self) -> list:
        # PAB keeps its state on the hook itself (``hook.state``: iteration count and last output), not
        # in a StateManager.
        return [module._diffusers_hook.get_hook(name).state for module, name in self._hooks]


apply_pab = register_peer(
    "pab", PyramidAttentionBroadcastPeerConfig, PyramidAttentionBroadcastPeer,
    requirement=lambda: diffusers_has("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast"),
    label="diffusers pyramid attention broadcast")
