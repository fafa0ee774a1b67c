"""External peers: other people's caching methods, run on the same DiT in the same harness.

Spec: ``shared/docs/tokencache.md`` section 4. TokenCache (``tclab.cache.hooks``) is tclab's own
engine; this module runs the *published* implementations of competing methods, unmodified, so a
benchmark compares against the code their authors ship rather than a re-implementation:

- ``fbcache``: First-Block Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``). Skips every
  block but the first in steps where block 0's residual barely changed.
- ``taylorseer``: TaylorSeer (arXiv 2503.06923; diffusers ``TaylorSeerCacheConfig``). In forecast
  steps, every block's attention and MLP outputs are extrapolated with a Taylor series.
- ``pab``: Pyramid Attention Broadcast (arXiv 2408.12588; diffusers
  ``PyramidAttentionBroadcastConfig``). In broadcast steps, every block's self-attention reuses its
  last output.
- ``dbcache``: DBCache (cache-dit, ``cache_dit.enable_cache``; optional: ``pip install --no-deps
  cache-dit==1.5.3``). Skips the middle blocks in steps where the first ``Fn`` blocks' residual
  barely changed; the last ``Bn`` blocks always run.

One interface::

    >>> from tclab.cache.peers import apply_peer, peer_status
    >>> peer_status(model)                        # {"fbcache": "ok", ..., "dbcache": "cache-dit is not installed ..."}
    >>> handle = apply_peer("fbcache", model, threshold=0.1)
    >>> sample(model, labels, SampleConfig(num_steps=50))     # or model.pipeline()(class_labels=labels)
    >>> handle.stats()
    >>> handle.remove()                           # the transformer is exactly as before

**The context tclab supplies.** diffusers' cache hooks keep their state in ``StateManager`` objects
that refuse to work without a *cache context*: pipelines whose transformer has ``CacheMixin`` wrap
each denoiser call in ``with transformer.cache_context("cond"):``. ``DiTTransformer2DModel`` has no
``CacheMixin`` and ``DiTPipeline`` enters no context, so the hooks alone raise "No cache context is
set". The peer therefore registers one more hook, ``PEER_CONTEXT_HOOK``, on the transformer itself
(outermost, so it runs whoever calls the model). Around every transformer call it:

1. decides whether this call starts a new sampling run. Inside ``tclab.sampling.sample`` the
   ``StepContext`` says so (a new ``run_id``; every batch chunk is its own run). Inside diffusers'
   ``DiTPipeline`` there is no context: ``tclab.steps.StepTracker`` recognises runs and CFG batches
   from the calls, by the one rule all of tclab uses (see ``tclab.steps``). ``handle.reset()`` forces
   one. On a new run it resets the peer's state (``reset_state`` of each of its hooks, or cache-dit's
   ``refresh_context``): what diffusers' pipelines get at the end of a call from
   ``maybe_free_model_hooks`` -> ``_reset_stateful_cache``, a ``CacheMixin`` method DiT lacks;
2. sets a ``CacheContext`` on the peer's ``StateManager``\\ s: name ``"cond_uncond"`` for a CFG batch
   (``[cond; uncond]`` rows in one forward, diffusers' name for batched CFG, e.g. the LTX pipelines)
   and ``"cond"`` without CFG, plus the step index, number of steps (when known) and timestep;
3. publishes the timestep to PAB's ``current_timestep_callback`` (which pipelines get from
   ``pipe.current_timestep``; DiTPipeline has none);
4. clears the context when the call returns (or raises).

Because both CFG halves run in one forward, a peer's skip decision covers the whole batch: e.g.
FBCache compares the mean residual change over all rows, cond and uncond together.

**What each hook needs from the DiT, checked.** First-block cache finds the block list by name
(``transformer_blocks`` is among diffusers' identifiers), needs at least 2 blocks (head and tail),
and looks up the block class in ``TransformerBlockRegistry``: ``BasicTransformerBlock`` is registered
as returning a single tensor (``return_hidden_states_index=0``, no encoder states), which the hook
supports. TaylorSeer's default patterns (``^transformer_blocks.*attn``, matched with ``re.fullmatch``)
match *nothing* in a DiT (the module is ``transformer_blocks.0.attn1``), so tclab passes explicit
patterns for ``attn1`` and ``ff``; its ``use_lite_mode`` is refused (see ``TaylorSeerPeerConfig``).
PAB hooks every ``Attention`` whose name contains ``transformer_blocks``: DiT's ``attn1``
(self-attention; DiT has no cross or temporal attention). cache-dit ships a DiT adapter with a patch
functor (DiT's forward reads ``transformer_blocks[0].norm1.emb`` *after* the loop, which cache-dit's
block wrapper would hide); tclab uses cache-dit's transformer-only path (a persistent context that
tclab refreshes per run) rather than its pipeline path, because the latter replaces
``DiTPipeline.__call__`` *on the class* (every DiTPipeline in the process) and never resets the
cache for tclab's own sampler, which calls the transformer directly.

**Removal restores exactly.** ``remove()`` removes every hook by name, undoes cache-dit's patch
functor (which ``cache_dit.disable_cache`` leaves in place), and deletes the hook registries and
``forward`` attributes this peer created, so the module tree, its attributes and its outputs are
bit-identical to before (``tests/test_peers.py`` checks all three).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..models import LoadedDiT
from ..steps import StepTracker, bind_model_call, dit_blocks
from .hooks import TOKEN_CACHE_MODEL_HOOK, drop_plain_forward

PEER_CONTEXT_HOOK = "tclab_peer_context"
CACHE_DIT_TESTED_VERSION = "1.5.3"


class PeerUnavailableError(RuntimeError):
    """A peer cannot run here (missing package, unsupported model); the message says why and what to do."""


# ---- options, one dataclass per peer (the docstring is the knob's manual) ---------------------------

def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


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
    """

    threshold: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"threshold must be a number >= 0, got {self.threshold!r}")


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
    """

    cache_interval: int = 5
    max_order: int = 1
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    modules: tuple[str, ...] = ("attn1", "ff")
    taylor_factors_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        _check_positive_int("cache_interval", self.cache_interval)
        _check_positive_int("max_order", self.max_order)
        _check_positive_int("disable_cache_before_step", self.disable_cache_before_step, 0)
        if self.disable_cache_after_step is not None:
            _check_positive_int("disable_cache_after_step", self.disable_cache_after_step, 0)
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        self.modules = tuple(self.modules)
        bad = [m for m in self.modules if m not in ("attn1", "ff")]
        if not self.modules or bad:
            raise ValueError(f"modules must be a non-empty subset of ('attn1', 'ff'), got {self.modules!r}")


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
    """

    block_skip_range: int = 2
    timestep_skip_range: tuple[float, float] = (100, 800)

    def __post_init__(self) -> None:
        _check_positive_int("block_skip_range", self.block_skip_range)
        lo_hi = tuple(self.timestep_skip_range)
        if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
            raise ValueError("timestep_skip_range must be (low, high) with low < high, "
                             f"got {self.timestep_skip_range!r}")
        self.timestep_skip_range = lo_hi


@dataclass
class DBCachePeerConfig:
    """DBCache (Dual Block Cache) from cache-dit, applied with ``cache_dit.enable_cache``.

    Source: https://github.com/vipshop/cache-dit (docs/DBCache.md); tested with cache-dit 1.5.3.
    Install: ``pip install --no-deps cache-dit==1.5.3`` (its ``transformers`` requirement is only
    needed for text encoders and metrics; the caching path imports without it).

    The first ``Fn_compute_blocks`` blocks always run; the relative L1 change of their residual
    against the last computed step decides, as in FBCache, whether the middle blocks run or are
    replaced by their cached residual; the last ``Bn_compute_blocks`` blocks always run and
    correct the approximated state. ``F1B0`` is FBCache; cache-dit's own default is ``F8B0``, for
    large models (it needs more blocks than most small DiTs have).

    Args:
        Fn_compute_blocks: first blocks always computed (the probe). **Quality: raise it**
            (a steadier change estimate); speed: lower it.
        Bn_compute_blocks: last blocks always computed (the corrector). **Quality: raise it**.
        residual_diff_threshold: relative change below which the middle blocks are skipped.
            **Speed: raise it**; quality: lower it. cache-dit's default 0.08.
        max_warmup_steps: steps at the start that always compute. **Quality: raise it**.
            cache-dit's default 8 (for 28-50 step runs).
        max_cached_steps: cap on cached steps per run (-1 = no cap). **Quality: set a cap**.
        max_continuous_cached_steps: cap on consecutive cached steps (-1 = no cap).
            **Quality: set it** (e.g. 2-3) to force periodic refreshes.
    """

    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1

    def __post_init__(self) -> None:
        _check_positive_int("Fn_compute_blocks", self.Fn_compute_blocks)
        _check_positive_int("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        _check_positive_int("max_warmup_steps", self.max_warmup_steps, 0)
        if not isinstance(self.residual_diff_threshold, (int, float)) or self.residual_diff_threshold < 0:
            raise ValueError(f"residual_diff_threshold must be a number >= 0, got {self.residual_diff_threshold!r}")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"{name} must be -1 (no cap) or an integer >= 1, got {v!r}")


# ---- the handle: run tracking, context, removal ----------------------------------------------------

@functools.cache
def _context_hook_class():
    """The outermost hook on the transformer, supplying the cache context around every call.

    Built on first use (a ``diffusers.hooks.ModelHook`` subclass) so importing this module does not
    import diffusers' hook machinery.
    """
    from diffusers.hooks import ModelHook

    class PeerContextHook(ModelHook):
        def __init__(self, handle: "PeerHandle"):
            super().__init__()
            self.handle = handle

        def new_forward(self, module, *args, **kwargs):
            self.handle._enter_call(args, kwargs)
            try:
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                self.handle._exit_call()

    return PeerContextHook


class PeerHandle:
    """One peer applied to one model. ``remove()`` undoes it exactly; ``reset()`` forgets the cache.

    Attributes:
        name: the peer's name in ``PEERS``.
        model: the ``LoadedDiT`` it is applied to.
        config: the peer's options (a ``*PeerConfig`` dataclass).
        calls / runs: transformer calls seen and sampling runs recognised since ``apply``.
    """

    def __init__(self, name: str, model: LoadedDiT, config):
        self.name = name
        self.model = model
        self.config = config
        self.calls = 0
        self.runs = 0
        self.removed = False
        self._tracker = StepTracker()
        self._run_key = None
        self._timestep: float | None = None
        self._force_new_run = False
        self._created_registries: list[torch.nn.Module] = []  # modules that had no _diffusers_hook
        self._hooks: list[tuple[torch.nn.Module, str]] = []  # (module, hook name) we registered

    # ---- subclass interface
    def _install(self) -> None:
        raise NotImplementedError

    def _uninstall(self) -> None:
        raise NotImplementedError

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _set_context(self, context) -> None:
        """Give the peer's state managers ``context`` (a diffusers ``CacheContext``) or None."""

    def _after_call(self) -> None:
        """Read per-call statistics (optional)."""

    def _extra_stats(self) -> dict:
        return {}

    # ---- public
    def reset(self) -> None:
        """Forget all cached state now and treat the next call as the start of a new run."""
        self._check_live()
        self._reset_state()
        self._tracker.reset()
        self._force_new_run = True

    def stats(self) -> dict:
        """What the peer did: calls, runs, options, and what the peer itself counts."""
        return {"peer": self.name, "calls": self.calls, "runs": self.runs,
                "options": dataclasses.asdict(self.config), **self._extra_stats()}

    def remove(self) -> None:
        """Remove the peer: hooks by name, patches undone, created registries deleted. Idempotent."""
        if self.removed:
            return
        tr = self.model.transformer
        registry = getattr(tr, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(PEER_CONTEXT_HOOK, recurse=False)
        self._uninstall()
        for module, hook_name in self._hooks:
            reg = getattr(module, "_diffusers_hook", None)
            if reg is not None:
                reg.remove_hook(hook_name, recurse=False)
        for module in self._created_registries:
            reg = getattr(module, "_diffusers_hook", None)
            if reg is not None and not reg.hooks:
                del module._diffusers_hook
                drop_plain_forward(module)
        if getattr(tr, "_diffusers_hook", None) is not None and hasattr(tr._diffusers_hook,
                                                                        "invalidate_child_registries_cache"):
            tr._diffusers_hook.invalidate_child_registries_cache()
        self._hooks.clear()
        self._created_registries.clear()
        self.removed = True

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{self.calls} calls, {self.runs} runs"
        return f"PeerHandle({self.name!r} on {self.model.name!r}, {self.config}, {state})"

    # ---- helpers for subclasses
    def _registry(self, module: torch.nn.Module):
        from diffusers.hooks import HookRegistry

        if not hasattr(module, "_diffusers_hook"):
            self._created_registries.append(module)
        return HookRegistry.check_if_exists_or_initialize(module)

    def _check_live(self) -> None:
        if self.removed:
            raise RuntimeError(f"this {self.name!r} peer was removed; apply it again with apply_peer")

    # ---- the context, around every transformer call
    def _attach_context_hook(self) -> None:
        tr = self.model.transformer
        self._registry(tr).register_hook(_context_hook_class()(self), PEER_CONTEXT_HOOK)
        reg = tr._diffusers_hook
        if hasattr(reg, "invalidate_child_registries_cache"):
            reg.invalidate_child_registries_cache()  # block hooks were added below the transformer

    def _enter_call(self, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks.hooks import CacheContext

        a = bind_model_call(args, kwargs)
        t = a.get("timestep")
        ctx = self._tracker(a["hidden_states"], t, a.get("class_labels"))
        if ctx.run_id != self._run_key or self._force_new_run:
            self._reset_state()
            self.runs += 1
            self._force_new_run = False
        self._run_key = ctx.run_id
        self._timestep = None if t is None else ctx.t
        self.calls += 1
        self._set_context(CacheContext("cond_uncond" if ctx.cfg else "cond", step_index=ctx.step,
                                       num_inference_steps=ctx.num_steps or None, timestep=self._timestep))

    def _exit_call(self) -> None:
        self._after_call()
        self._set_context(None)

    def _current_timestep(self) -> float:
        """PAB's ``current_timestep_callback``: the timestep value of the running call."""
        if self._timestep is None:
            raise RuntimeError("PAB asked for the timestep outside a transformer call; call the transformer "
                               "with timestep=... (tclab.sampling.sample and DiTPipeline both do)")
        return self._timestep


def _blocks(model: LoadedDiT) -> torch.nn.ModuleList:
    return dit_blocks(model.transformer, "an external peer")


# ---- diffusers' hooks --------------------------------------------------------------------------------

class _DiffusersPeer(PeerHandle):
    """A peer made of diffusers hooks registered by name on sub-modules of the transformer."""

    def _reset_state(self) -> None:
        for module, hook_name in self._hooks:
            hook = module._diffusers_hook.get_hook(hook_name)
            if hook is not None and hook._is_stateful:
                hook.reset_state(module)

    def _set_context(self, context) -> None:
        from diffusers.hooks.hooks import StateManager

        for module, hook_name in self._hooks:
            hook = module._diffusers_hook.get_hook(hook_name)
            for attr in vars(hook).values():
                if isinstance(attr, StateManager):
                    attr.set_context(context)

    def _uninstall(self) -> None:
        pass  # the hooks in self._hooks are removed by name in remove()

    def _adopt(self, modules: list[torch.nn.Module], hook_names: tuple[str, ...]) -> None:
        """Record the hooks a diffusers ``apply_*`` function registered (and which registries it created)."""
        for m in modules:
            reg = getattr(m, "_diffusers_hook", None)
            if reg is None:
                continue
            for hook_name in hook_names:
                if reg.get_hook(hook_name) is not None:
                    self._hooks.append((m, hook_name))


class FirstBlockCachePeer(_DiffusersPeer):
    __doc__ = FirstBlockCachePeerConfig.__doc__

    def __init__(self, model: LoadedDiT, config: FirstBlockCachePeerConfig):
        super().__init__("fbcache", model, config)
        self.skipped_calls = 0

    def _install(self) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        blocks = list(_blocks(self.model))
        fresh = [b for b in blocks if not hasattr(b, "_diffusers_hook")]
        apply_first_block_cache(self.model.transformer, FirstBlockCacheConfig(threshold=float(self.config.threshold)))
        self._created_registries.extend(fresh)
        self._adopt(blocks, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK))
        self._leader = blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)

    def _after_call(self) -> None:
        state = self._leader.state_manager.get_state()
        self.skipped_calls += int(not state.should_compute)

    def _extra_stats(self) -> dict:
        return {"skipped_calls": self.skipped_calls,
                "computed_calls": self.calls - self.skipped_calls}


class TaylorSeerPeer(_DiffusersPeer):
    __doc__ = TaylorSeerPeerConfig.__doc__

    def __init__(self, model: LoadedDiT, config: TaylorSeerPeerConfig):
        super().__init__("taylorseer", model, config)

    def _install(self) -> None:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        c = self.config
        # diffusers' default patterns (^transformer_blocks.*attn, re.fullmatch) match no DiT module.
        patterns = [rf"transformer_blocks\.\d+\.{re.escape(m)}" for m in c.modules]
        tr = self.model.transformer
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

    def _extra_stats(self) -> dict:
        return {"hooked_modules": len(self._hooks)}


class PyramidAttentionBroadcastPeer(_DiffusersPeer):
    __doc__ = PyramidAttentionBroadcastPeerConfig.__doc__

    def __init__(self, model: LoadedDiT, config: PyramidAttentionBroadcastPeerConfig):
        super().__init__("pab", model, config)

    def _install(self) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
        from diffusers.models.attention_processor import Attention

        tr = self.model.transformer
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

    def _extra_stats(self) -> dict:
        return {"hooked_modules": len(self._hooks)}


# ---- cache-dit ---------------------------------------------------------------------------------------

_MISSING = object()


class DBCachePeer(PeerHandle):
    __doc__ = DBCachePeerConfig.__doc__

    _PATCH_ATTRS = ("_norm1_emb", "_is_patched")  # left on the transformer by cache-dit's DiTPatchFunctor

    def __init__(self, model: LoadedDiT, config: DBCachePeerConfig):
        super().__init__("dbcache", model, config)
        self._had: dict[str, bool] = {}
        self._installed = False
        self.skipped_calls = 0
        self._cached_in_run = 0

    def _install(self) -> None:
        import cache_dit  # optional; imported only when this peer is applied

        version = importlib.metadata.version("cache-dit")
        if version != CACHE_DIT_TESTED_VERSION:
            warnings.warn(f"cache-dit {version} is installed; tclab's dbcache peer is tested with "
                          f"{CACHE_DIT_TESTED_VERSION} (its internals, which remove() undoes, may differ)", stacklevel=4)
        tr = self.model.transformer
        self._had = {a: a in tr.__dict__ or a in tr._modules for a in self._PATCH_ATTRS}
        self._saved_forward = tr.__dict__.get("forward", _MISSING)  # restored exactly on remove()
        c = self.config
        cfg = cache_dit.DBCacheConfig(
            Fn_compute_blocks=c.Fn_compute_blocks, Bn_compute_blocks=c.Bn_compute_blocks,
            residual_diff_threshold=float(c.residual_diff_threshold), max_warmup_steps=c.max_warmup_steps,
            max_cached_steps=c.max_cached_steps, max_continuous_cached_steps=c.max_continuous_cached_steps)
        # Transformer-only: cache-dit's registered "DiT" adapter (Pattern_3 + DiTPatchFunctor) inside a
        # placeholder pipeline with a persistent context, which _reset_state refreshes per run.
        cache_dit.enable_cache(tr, cache_config=cfg)
        self._installed = True
        if not getattr(tr, "_is_cached", False):
            self._uninstall()
            raise PeerUnavailableError("cache_dit.enable_cache left the DiT transformer uncached; "
                                       f"this tclab peer is tested with cache-dit {CACHE_DIT_TESTED_VERSION}")

    def _uninstall(self) -> None:
        if not self._installed:
            return
        import cache_dit

        tr = self.model.transformer
        if getattr(tr, "_is_cached", False):
            cache_dit.disable_cache(tr)
        for attr in self._PATCH_ATTRS:  # undo DiTPatchFunctor (disable_cache keeps it)
            if not self._had.get(attr):
                if attr in tr._modules:
                    del tr._modules[attr]
                elif attr in tr.__dict__:
                    delattr(tr, attr)
        # the patch functor replaces the instance forward; put back exactly what was there before
        if self._saved_forward is _MISSING:
            tr.__dict__.pop("forward", None)
        else:
            tr.forward = self._saved_forward

    def _reset_state(self) -> None:
        import cache_dit

        cache_dit.refresh_context(self.model.transformer)  # a fresh DBCache context: warm-up, residuals, counts
        self._cached_in_run = 0

    def _after_call(self) -> None:
        # cache-dit records the steps it served from cache in its context; count the new ones.
        tr = self.model.transformer
        manager, names = getattr(tr, "_context_manager", None), getattr(tr, "_context_names", None)
        if manager is None or not names:
            return
        cached = len(manager.get_context(names[0]).get_cached_steps())
        self.skipped_calls += max(0, cached - self._cached_in_run)
        self._cached_in_run = cached

    def _extra_stats(self) -> dict:
        return {"skipped_calls": self.skipped_calls, "computed_calls": self.calls - self.skipped_calls}


# ---- registry, status, apply -------------------------------------------------------------------------

def _diffusers_has(*names: str) -> str | None:
    """None if ``diffusers.hooks`` exports all ``names``, else the reason it does not."""
    import diffusers
    import diffusers.hooks as hooks
    import diffusers.hooks.hooks as hooks_core

    missing = [n for n in names if not hasattr(hooks, n)]
    if not hasattr(hooks_core, "CacheContext") or not hasattr(hooks_core.StateManager, "set_context"):
        missing.append("hooks.hooks.CacheContext / StateManager.set_context")
    if missing:
        return (f"diffusers {diffusers.__version__} lacks {', '.join(missing)}; tclab's peers are written "
                "against the diffusers tclab pins (0.42.1); reinstall tclab's dependencies")
    return None


def _cache_dit_reason() -> str | None:
    try:
        spec = importlib.util.find_spec("cache_dit")
    except (ImportError, ValueError):  # e.g. blocked with sys.modules["cache_dit"] = None
        spec = None
    if spec is None:
        return (f"cache-dit is not installed; install it with `pip install --no-deps cache-dit=="
                f"{CACHE_DIT_TESTED_VERSION}` (its transformers requirement is not needed for caching)")
    return None


def _model_reason(name: str, model: LoadedDiT | None) -> str | None:
    if model is None:
        return None
    from diffusers.models.attention import BasicTransformerBlock

    tr = model.transformer
    blocks = getattr(tr, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not all(isinstance(b, BasicTransformerBlock) for b in blocks):
        return (f"{model.name}'s transformer ({type(tr).__name__}) has no transformer_blocks list of "
                "BasicTransformerBlock; the peers are wired for diffusers' DiTTransformer2DModel")
    if name == "fbcache" and len(blocks) < 2:
        return (f"first-block cache needs at least 2 blocks (a head that always runs and a tail that "
                f"stores the residual); {model.name} has {len(blocks)}")
    if name == "dbcache" and len(blocks) < 2:  # Fn + Bn < blocks is checked against the options in apply
        return f"DBCache needs at least 2 blocks (an Fn probe and a cached middle); {model.name} has {len(blocks)}"
    return None


_REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "fbcache": lambda: _diffusers_has("FirstBlockCacheConfig", "apply_first_block_cache"),
    "taylorseer": lambda: _diffusers_has("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
    "pab": lambda: _diffusers_has("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast"),
    "dbcache": _cache_dit_reason,
}

_CONFIGS = {
    "fbcache": FirstBlockCachePeerConfig,
    "taylorseer": TaylorSeerPeerConfig,
    "pab": PyramidAttentionBroadcastPeerConfig,
    "dbcache": DBCachePeerConfig,
}

_CLASSES = {
    "fbcache": FirstBlockCachePeer,
    "taylorseer": TaylorSeerPeer,
    "pab": PyramidAttentionBroadcastPeer,
    "dbcache": DBCachePeer,
}


def peer_status(model: LoadedDiT | None = None) -> dict[str, str]:
    """Every peer in ``PEERS`` -> ``"ok"`` or the reason it cannot run (and how to fix it).

    Without ``model`` only the software is checked (installed packages, diffusers API); with it,
    also whether the model has what the peer needs (e.g. 2+ blocks for FBCache). Nothing is
    imported from optional packages: cache-dit is looked up, not imported.
    """
    out = {}
    for name in PEERS:
        try:
            reason = _REQUIREMENTS[name]() or _model_reason(name, model)
        except Exception as e:  # a broken install is a reason too, never a crash of the listing
            reason = f"checking {name} failed: {type(e).__name__}: {e}"
        out[name] = reason or "ok"
    return out


def _make_config(name: str, options: dict):
    cls = _CONFIGS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for peer {name!r}; its options are {known} "
                        f"(see tclab.cache.peers.{cls.__name__})")
    return cls(**options)


def _apply(name: str, model: LoadedDiT, **options) -> PeerHandle:
    config = _make_config(name, options)  # bad options fail before anything is touched
    reason = peer_status(model)[name]
    if reason != "ok":
        raise PeerUnavailableError(f"peer {name!r} cannot run on {model.name}: {reason}")
    if name == "dbcache":
        n = len(_blocks(model))
        if config.Fn_compute_blocks + config.Bn_compute_blocks >= n:
            raise ValueError(f"Fn_compute_blocks + Bn_compute_blocks = "
                             f"{config.Fn_compute_blocks + config.Bn_compute_blocks} leaves no block to cache "
                             f"in {model.name} ({n} blocks); lower them below {n}")
    tr = model.transformer
    registry = getattr(tr, "_diffusers_hook", None)
    if registry is not None:
        other = registry.get_hook(PEER_CONTEXT_HOOK)
        if other is not None:
            raise RuntimeError(f"peer {other.handle.name!r} is already applied to {model.name}; call its "
                               "handle.remove() first (one peer at a time)")
        if registry.get_hook(TOKEN_CACHE_MODEL_HOOK) is not None:
            raise RuntimeError(f"a tclab token cache is applied to {model.name}; call "
                               "tclab.cache.remove_token_cache(model.transformer) before applying a peer")
    if getattr(tr, "_is_cached", False):
        raise RuntimeError(f"{model.name}'s transformer is already cached by cache-dit; call "
                           "cache_dit.disable_cache(transformer) first")
    handle = _CLASSES[name](model, config)
    try:
        handle._install()
        handle._attach_context_hook()
    except BaseException:
        handle.remove()
        raise
    return handle


def apply_fbcache(model: LoadedDiT, **options) -> PeerHandle:
    """First-Block Cache via diffusers' hooks. Options: ``FirstBlockCachePeerConfig``."""
    return _apply("fbcache", model, **options)


def apply_taylorseer(model: LoadedDiT, **options) -> PeerHandle:
    """TaylorSeer (arXiv 2503.06923) via diffusers' hooks. Options: ``TaylorSeerPeerConfig``."""
    return _apply("taylorseer", model, **options)


def apply_pab(model: LoadedDiT, **options) -> PeerHandle:
    """Pyramid Attention Broadcast (arXiv 2408.12588) via diffusers' hooks.

    Options: ``PyramidAttentionBroadcastPeerConfig``."""
    return _apply("pab", model, **options)


def apply_dbcache(model: LoadedDiT, **options) -> PeerHandle:
    """cache-dit's DBCache (optional package). Options: ``DBCachePeerConfig``."""
    return _apply("dbcache", model, **options)


PEERS: dict[str, Callable[..., PeerHandle]] = {
    "fbcache": apply_fbcache,
    "taylorseer": apply_taylorseer,
    "pab": apply_pab,
    "dbcache": apply_dbcache,
}


def peer_config(name: str) -> type:
    """The options dataclass of peer ``name`` (its docstring documents every knob)."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown peer {name!r}; peers are {sorted(PEERS)}")
    return _CONFIGS[name]


def apply_peer(name: str, model: LoadedDiT, **options) -> PeerHandle:
    """Apply external peer ``name`` to ``model`` and return its handle (``remove()`` undoes it).

    Raises:
        KeyError: ``name`` is not in ``PEERS`` (the message lists them).
        TypeError / ValueError: an unknown or invalid option (the message lists the valid ones).
        PeerUnavailableError: the peer cannot run here; the message gives ``peer_status``'s reason.
        RuntimeError: another peer or a tclab token cache is already applied to the model.
    """
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; peers are {sorted(PEERS)} (peer_status() says which can run)")
    return PEERS[name](model, **options)


__all__ = [
    "PEERS", "PEER_CONTEXT_HOOK", "PeerHandle", "PeerUnavailableError", "apply_peer", "peer_status", "peer_config",
    "apply_fbcache", "apply_taylorseer", "apply_pab", "apply_dbcache", "FirstBlockCachePeerConfig",
    "TaylorSeerPeerConfig", "PyramidAttentionBroadcastPeerConfig", "DBCachePeerConfig",
    "FirstBlockCachePeer", "TaylorSeerPeer", "PyramidAttentionBroadcastPeer", "DBCachePeer",
]
