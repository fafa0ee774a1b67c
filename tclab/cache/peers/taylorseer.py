"""TaylorSeer, run by diffusers' own hooks (``apply_taylorseer_cache``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import DiffusersPeer, PeerUnavailableError, check_positive_int, diffusers_has, register_peer


@dataclass
class TaylorSeerPeerConfig:
    """TaylorSeer: forecast module outputs with a Taylor series instead of reusing them.

    Paper: Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with
    TaylorSeers", arXiv 2503.06923. diffusers: ``TaylorSeerCacheConfig``, ``apply_taylorseer_cache``.

    Each hooked module (default: every block's self-attention ``attn1`` and MLP ``ff``, the
    features TaylorSeer caches on DiT) runs in full steps and stores finite differences of its
    output up to ``max_order``; in forecast steps it returns ``sum_k f^(k) * d^k / k!`` (``d`` =
    steps since the last full step) without computing. adaLN modulation, gating and the residual
    adds still run, with the current step's conditioning.

    Which steps are full (step = 0-based index within the run, counted per call): steps
    ``0 .. disable_cache_before_step - 1``; then every step ``s`` with
    ``(s - disable_cache_before_step - 1) % cache_interval == 0``; and every step
    ``>= disable_cache_after_step`` if that is set. (So with the defaults 3 and 5: full at 0, 1, 2,
    4, 9, 14, ...; step 3 is already a forecast.)

    Args:
        cache_interval: one full step every ``cache_interval`` steps. **Speed: raise it**;
            quality: lower it (1 = always compute).
        max_order: highest Taylor order (1 = linear extrapolation, 2 = quadratic). Higher follows
            curved trajectories better but needs ``max_order + 1`` full steps of history, costs
            memory and can overshoot with long intervals. The paper uses 1-2.
        disable_cache_before_step: warm-up: full steps at the start. **Quality: raise it**.
        disable_cache_after_step: step index from which every step is full again (None = never).
            **Quality: set it** near the end, where fine detail forms.
        modules: which sub-modules of each block to forecast: any of ``"attn1"`` and ``"ff"``.
            Forecasting only ``("attn1",)`` is safer and saves less.
        taylor_factors_dtype: dtype of the stored factors. None (default) = the transformer's
            dtype; diffusers' own default is bfloat16, which saves memory at some accuracy.

    Not offered: diffusers' ``use_lite_mode``, which forecasts a module named ``proj_out`` and makes
    every block return zeros in forecast steps. DiT has no ``proj_out`` (it has ``proj_out_1`` and
    ``proj_out_2``) and its blocks return the full hidden state, not a residual, so the lite mode
    would zero the hidden state: it cannot work on a DiT.

    Stats: ``cache_bytes`` sums the stored Taylor factors; ``full_steps``, ``cached_steps`` and
    ``compute_fraction`` are None (see ``DiffusersPeer._work_stats``); the FLOP counter measures it.
    """

    cache_interval: int = 5
    max_order: int = 1
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    modules: tuple[str, ...] = ("attn1", "ff")
    taylor_factors_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        check_positive_int("cache_interval", self.cache_interval)
        check_positive_int("max_order", self.max_order)
        check_positive_int("disable_cache_before_step", self.disable_cache_before_step, 0)
        if self.disable_cache_after_step is not None:
            check_positive_int("disable_cache_after_step", self.disable_cache_after_step, 0)
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        self.modules = tuple(self.modules)
        bad = [m for m in self.modules if m not in ("attn1", "ff")]
        if not self.modules or bad:
            raise ValueError(f"modules must be a non-empty subset of ('attn1', 'ff'), got {self.modules!r}")


class TaylorSeerPeer(DiffusersPeer):
    __doc__ = TaylorSeerPeerConfig.__doc__

    def _install(self) -> None:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        c = self.config
        # diffusers' default patterns (^transformer_blocks.*attn, re.fullmatch) match no DiT module.
        patterns = [rf"transformer_blocks\.\d+\.{re.escape(m)}" for m in c.modules]
        tr = self.transformer
        targets = [m for n, m in tr.named_modules() if any(re.fullmatch(p, n) for p in patterns)]
        if not targets:
            raise PeerUnavailableError(f"taylorseer found no modules {c.modules} under transformer_blocks.N; "
                                       "is this a diffusers DiTTransformer2DModel?")
        fresh = [m for m in targets if not hasattr(m, "_diffusers_hook")]
        apply_taylorseer_cache(tr, TaylorSeerCacheConfig(
            cache_interval=c.cache_interval, disable_cache_before_step=c.disable_cache_before_step,
            disable_cache_after_step=c.disable_cache_after_step, max_order=c.max_order,
            taylor_factors_dtype=c.taylor_factors_dtype or tr.dtype, cache_identifiers=patterns))
        self._created_registries.extend(fresh)
        self._adopt(targets, (_TAYLORSEER_CACHE_HOOK,))


apply_taylorseer = register_peer(
    "taylorseer", TaylorSeerPeerConfig, TaylorSeerPeer,
    requirement=lambda: diffusers_has("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
    label="diffusers TaylorSeer")
