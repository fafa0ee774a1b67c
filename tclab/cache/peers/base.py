"""What every external peer shares: the handle, the cache context, the checks and the registry.

A peer is one file (``fbcache.py`` is the model) holding a config dataclass, a handle class that
installs the published hooks (:meth:`PeerHandle._install`) and one :func:`register_peer` call. The
handle here does the rest: it recognises sampling runs, resets the peer's state at each, supplies
diffusers' cache context around every transformer call (:data:`PEER_CONTEXT_HOOK`), refuses a
transformer that already carries caching, and removes everything it added.

Nothing here imports diffusers' hook machinery at import time: the context hook class is built on
first use and the requirement checks import lazily.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...models import LoadedDiT
from ...steps import StepTracker, bind_model_call, dit_blocks
from ..methods import (BUILTIN_METHODS, METHODS, PEER_CONTEXT_HOOK, TOKEN_CACHE_MODEL_HOOK, CachingHandle,
                       common_stats, drop_plain_forward, register_method)


class PeerUnavailableError(RuntimeError):
    """A peer cannot run here (missing package, unsupported model); the message says why and what to do."""


# ---- shared checks ---------------------------------------------------------------------------------

def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """Refuse ``value`` unless it is an integer (not a bool) >= ``minimum``; for configs' ``__post_init__``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def diffusers_has(*names: str) -> str | None:
    """None if ``diffusers.hooks`` exports all ``names`` (and the cache context the harness sets), else the
    reason it does not: the software requirement of a peer built on diffusers' hooks."""
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


def _dit_reason(transformer: torch.nn.Module, label: str) -> str | None:
    """What every peer needs from the model: diffusers' DiT block list."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not all(isinstance(b, BasicTransformerBlock) for b in blocks):
        return (f"{label}'s transformer ({type(transformer).__name__}) has no transformer_blocks list of "
                "BasicTransformerBlock; the peers are wired for diffusers' DiTTransformer2DModel")
    return None


def peer_target(target) -> tuple[LoadedDiT | None, torch.nn.Module, str]:
    """``target`` (a ``LoadedDiT`` or a bare transformer) -> (the LoadedDiT or None, the transformer, the
    name messages use: the LoadedDiT's name, else the transformer's class name)."""
    transformer = getattr(target, "transformer", target)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"a peer is applied to a LoadedDiT or a DiTTransformer2DModel, got {type(target).__name__}")
    model = target if transformer is not target else None
    return model, transformer, getattr(model, "name", None) or type(transformer).__name__


def tensor_bytes(*roots: Any) -> int:
    """Bytes of the distinct tensors that ``roots`` hold: each root is a tensor, a dict / list / tuple
    (walked), or a state object (its attributes walked, one object deep). For ``cache_bytes``."""
    seen: set[int] = set()
    total = 0
    stack = []
    for root in roots:
        is_container = isinstance(root, (torch.Tensor, dict, list, tuple))
        stack.append(root if is_container or not hasattr(root, "__dict__") else list(vars(root).values()))
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                total += value.nelement() * value.element_size()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


# ---- the context, around every transformer call ----------------------------------------------------

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


# ---- the handle ------------------------------------------------------------------------------------

class PeerHandle(CachingHandle):
    """One peer applied to one model. ``remove()`` undoes it exactly; ``reset()`` forgets the cache.

    Attributes:
        name / method: the peer's registered name (a key of ``PEERS``).
        model: the ``LoadedDiT`` it was applied to, or None when given a bare transformer.
        transformer: the ``DiTTransformer2DModel`` it is applied to.
        config: the peer's options (its ``*PeerConfig`` dataclass).
        calls / runs: transformer calls seen and sampling runs recognised since ``apply``.

    A peer's handle class implements ``_install`` (register the published hooks), ``_uninstall``
    (undo what removing hooks by name does not), ``_reset_state`` (forget the cache at a new run) and
    optionally ``_set_context``, ``_after_call``, ``_check_config``, ``_work_stats`` and ``_extra_stats``.
    """

    def __init__(self, name: str, target, config):
        model, transformer, label = peer_target(target)
        super().__init__(transformer, config)
        self.method = self.name = name
        self.model = model
        self.label = label  # the model's name in messages
        self.calls = 0
        self.runs = 0
        self._tracker = StepTracker()
        self._run_key = None
        self._timestep: float | None = None
        self._force_new_run = False
        self._created_registries: list[torch.nn.Module] = []  # modules that had no _diffusers_hook
        self._hooks: list[tuple[torch.nn.Module, str]] = []  # (module, hook name) we registered

    # ---- subclass interface
    @classmethod
    def _check_config(cls, config, transformer: torch.nn.Module, label: str) -> None:
        """Refuse options that cannot work on this transformer (before anything is touched)."""

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

    def _work_stats(self) -> dict:
        """Any of ``full_steps``, ``cached_steps``, ``compute_fraction``, ``cache_bytes`` the peer can say."""
        return {}

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
        """``STATS_KEYS`` (None where the peer cannot say), then ``peer``, ``options`` and the peer's own counts."""
        return common_stats(self.name, calls=self.calls, runs=self.runs, **self._work_stats(), peer=self.name,
                            options=dataclasses.asdict(self.config), **self._extra_stats())

    def remove(self) -> None:
        """Remove the peer: hooks by name, patches undone, created registries deleted. Idempotent."""
        if self.removed:
            return
        tr = self.transformer
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
        return f"PeerHandle({self.name!r} on {self.label!r}, {self.config}, {state})"

    # ---- helpers for subclasses
    def _blocks(self) -> torch.nn.ModuleList:
        return dit_blocks(self.transformer, "an external peer")

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
        tr = self.transformer
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


class DiffusersPeer(PeerHandle):
    """A peer made of diffusers hooks registered by name on sub-modules of the transformer."""

    def _reset_state(self) -> None:
        for module, hook_name in self._hooks:
            hook = module._diffusers_hook.get_hook(hook_name)
            if hook is not None and hook._is_stateful:
                hook.reset_state(module)

    def _state_managers(self) -> list:
        """The distinct diffusers ``StateManager`` s the peer's hooks keep their state in."""
        from diffusers.hooks.hooks import StateManager

        out = {}
        for module, hook_name in self._hooks:
            hook = module._diffusers_hook.get_hook(hook_name)
            for attr in vars(hook).values():
                if isinstance(attr, StateManager):
                    out[id(attr)] = attr
        return list(out.values())

    def _set_context(self, context) -> None:
        for manager in self._state_managers():
            manager.set_context(context)

    def _state_objects(self) -> list:
        """The objects holding the cached tensors: every state of every context of the hooks' state
        managers (``StateManager._state_cache``: diffusers keeps one state per context name)."""
        return [s for m in self._state_managers() for s in m._state_cache.values()]

    def _cache_bytes(self) -> int:
        return tensor_bytes(*self._state_objects())

    def _work_stats(self) -> dict:
        # full_steps / cached_steps / compute_fraction stay None unless a peer counts them (fbcache does):
        # a diffusers hook decides inside itself whether it computes, forecasts or broadcasts, and reports
        # nothing per call, and such a step still runs every block's norms, adaLN, gating and residual
        # adds, so it is neither a full nor a skipped call. The FLOP counter (tclab.metrics.count_flops)
        # measures what ran.
        return {"cache_bytes": self._cache_bytes()}

    def _extra_stats(self) -> dict:
        return {"hooked_modules": len(self._hooks)}

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


# ---- the registry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerSpec:
    """One registered peer (see :func:`register_peer`)."""

    name: str
    config_class: type
    handle_class: type
    requirement: Callable[[], str | None] | None = None
    model_requirement: Callable[[torch.nn.Module, str], str | None] | None = None
    label: str = ""


_SPECS: dict[str, PeerSpec] = {}

#: Every registered peer's name -> its apply function ``(model, **options) -> PeerHandle``, in
#: registration order (the built-ins first: fbcache, taylorseer, pab, dbcache).
PEERS: dict[str, Callable[..., PeerHandle]] = {}


def register_peer(name: str, config_class: type, handle_class: type,
                  requirement: Callable[[], str | None] | None = None,
                  model_requirement: Callable[[torch.nn.Module, str], str | None] | None = None,
                  label: str | None = None) -> Callable[..., PeerHandle]:
    """Register an external peer; returns its apply function ``(model, **options) -> PeerHandle``.

    Args:
        name: the peer's name in ``PEERS``, ``peer_status``, ``apply_peer`` and ``available_methods()``.
        config_class: its options dataclass (the docstring is the knob's manual: which way for speed,
            which for quality, and where the method comes from).
        handle_class: a :class:`PeerHandle` subclass (usually of :class:`DiffusersPeer`), built as
            ``handle_class(name, model_or_transformer, config)``.
        requirement: ``() -> reason or None``: is the software there (packages, diffusers API)?
        model_requirement: ``(transformer, label) -> reason or None``: does this model have what the
            peer needs (beyond diffusers' DiT block list, checked for every peer)?
        label: a short human name for tables (default ``"peer NAME"``).

    The peer is also registered as a caching method, so ``apply_caching(model, config_class(...))``
    applies it like TokenCache.
    """
    if not isinstance(handle_class, type) or not issubclass(handle_class, PeerHandle):
        raise TypeError(f"register_peer({name!r}, ...): handle_class must be a PeerHandle subclass, "
                        f"got {handle_class!r}")
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"register_peer({name!r}, ...): config_class must be a dataclass (its fields are the options)")
    old = _SPECS.get(name)
    if old is not None and (old.config_class, old.handle_class) != (config_class, handle_class):
        raise ValueError(f"a peer named {name!r} is already registered ({old.config_class.__name__}); "
                         "pick another name or unregister_peer it first")

    def apply(model, **options) -> PeerHandle:
        return _apply(name, model, _make_config(name, options))

    apply.__name__ = apply.__qualname__ = f"apply_{name}"
    apply.__module__ = config_class.__module__
    label = label or f"peer {name}"
    apply.__doc__ = (f"Apply the external peer {name!r} ({label}) to ``model`` (a LoadedDiT or a "
                     f"DiTTransformer2DModel); returns its handle. Options: ``{config_class.__name__}``.")
    register_method(name, config_class, lambda target, config: _apply(name, target, config), takes_model=True)
    _SPECS[name] = PeerSpec(name, config_class, handle_class, requirement, model_requirement, label)
    PEERS[name] = apply
    return apply


def unregister_peer(name: str) -> None:
    """Forget a peer registered with :func:`register_peer` (built-in peers stay)."""
    if name not in _SPECS:
        raise KeyError(f"unknown peer {name!r}; peers are {sorted(PEERS)}")
    if name in BUILTIN_METHODS:
        raise ValueError(f"{name!r} is a built-in peer; it cannot be unregistered")
    del _SPECS[name], PEERS[name]
    METHODS.unregister(name)


def peer_names() -> list[str]:
    """The registered peers' names, in ``PEERS`` order, installed packages' own (entry points of
    ``tclab.methods``) included: they are imported here, so they register."""
    METHODS.load_all()
    return list(PEERS)


def peer_label(name: str) -> str:
    """Peer ``name``'s short human name for tables (``register_peer(label=...)``)."""
    return _spec(name).label


def _spec(name: str) -> PeerSpec:
    if name not in _SPECS:
        raise KeyError(f"unknown peer {name!r}; peers are {sorted(PEERS)}")
    return _SPECS[name]


def _reason(spec: PeerSpec, transformer: torch.nn.Module | None, label: str) -> str | None:
    """Why ``spec`` cannot run (on ``transformer`` if given), or None."""
    try:
        reason = spec.requirement() if spec.requirement else None
        if reason is None and transformer is not None:
            reason = _dit_reason(transformer, label)
            if reason is None and spec.model_requirement is not None:
                reason = spec.model_requirement(transformer, label)
    except Exception as e:  # a broken install is a reason too, never a crash of the listing
        reason = f"checking {spec.name} failed: {type(e).__name__}: {e}"
    return reason


def peer_status(model=None) -> dict[str, str]:
    """Every peer in ``PEERS`` -> ``"ok"`` or the reason it cannot run (and how to fix it).

    Without ``model`` (a ``LoadedDiT`` or a transformer) only the software is checked (installed
    packages, diffusers API); with it, also whether the model has what the peer needs (e.g. 2+
    blocks for FBCache). Nothing is imported from optional packages: cache-dit is looked up, not imported.
    """
    transformer, label = None, ""
    if model is not None:
        _, transformer, label = peer_target(model)
    return {name: _reason(spec, transformer, label) or "ok" for name, spec in _SPECS.items()}


def _public_path(cls: type) -> str:
    module = "tclab.cache.peers" if cls.__module__.startswith("tclab.cache.peers") else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _make_config(name: str, options: dict):
    cls = _spec(name).config_class
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for peer {name!r}; its options are {known} "
                        f"(see {_public_path(cls)})")
    return cls(**options)


def _apply(name: str, target, config) -> PeerHandle:
    """Check, install, return the handle; on any failure nothing is left on the transformer."""
    spec = _spec(name)
    _, tr, label = peer_target(target)
    reason = _reason(spec, tr, label)
    if reason is not None:
        raise PeerUnavailableError(f"peer {name!r} cannot run on {label}: {reason}")
    spec.handle_class._check_config(config, tr, label)
    registry = getattr(tr, "_diffusers_hook", None)
    if registry is not None:
        other = registry.get_hook(PEER_CONTEXT_HOOK)
        if other is not None:
            raise RuntimeError(f"peer {other.handle.name!r} is already applied to {label}; call its "
                               "handle.remove() first (one peer at a time)")
        if registry.get_hook(TOKEN_CACHE_MODEL_HOOK) is not None:
            raise RuntimeError(f"a tclab token cache is applied to {label}; call "
                               "tclab.cache.remove_token_cache(model.transformer) before applying a peer")
    if getattr(tr, "_is_cached", False):
        raise RuntimeError(f"{label}'s transformer is already cached by cache-dit; call "
                           "cache_dit.disable_cache(transformer) first")
    handle = spec.handle_class(name, target, config)
    try:
        handle._install()
        handle._attach_context_hook()
    except BaseException:
        handle.remove()
        raise
    return handle


def peer_config(name: str) -> type:
    """The options dataclass of peer ``name`` (its docstring documents every knob)."""
    return _spec(name).config_class


def apply_peer(name: str, model, **options) -> PeerHandle:
    """Apply external peer ``name`` to ``model`` (a ``LoadedDiT`` or a bare ``DiTTransformer2DModel``)
    and return its handle (``remove()`` undoes it).

    Raises:
        KeyError: ``name`` is not in ``PEERS`` (the message lists them).
        TypeError / ValueError: an unknown or invalid option (the message lists the valid ones).
        PeerUnavailableError: the peer cannot run here; the message gives ``peer_status``'s reason.
        RuntimeError: another peer or a tclab token cache is already applied to the model.
    """
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; peers are {sorted(PEERS)} (peer_status() says which can run)")
    return _apply(name, model, _make_config(name, options))
