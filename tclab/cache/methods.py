"""One caching interface: every method is a config dataclass, applied by one function.

    >>> from tclab.cache import apply_caching, TokenCacheConfig
    >>> from tclab.cache.peers import FirstBlockCachePeerConfig
    >>> handle = apply_caching(model.transformer, TokenCacheConfig(rho=0.25))   # or a peer's config
    >>> sample(model, labels, SampleConfig(num_steps=50))
    >>> handle.stats()        # the same accounting for every method
    >>> handle.reset()        # forget the cache; the next call starts a new run
    >>> handle.remove()       # the transformer is exactly as before

A method is registered once (:func:`register_method`: its name, its config dataclass, the function
that applies it); :func:`apply_caching` finds it from the config's type, so adding a method is one
file with its config and its apply function, plus that registration. The built-in methods are known
by name before their modules load (:data:`BUILTIN_METHODS`), as the scorers are; a package's own
methods are found through its entry points in :data:`ENTRY_POINT_GROUP` (so notebook kernels and
scheduled jobs know them too).

Every handle (:class:`CachingHandle`) has ``method``, ``config``, ``transformer``, ``reset()``,
``stats()`` and ``remove()`` (idempotent); it is also a context manager that removes on exit.
``stats()`` always holds :data:`STATS_KEYS`:

- ``method``: the registered name; ``calls``: transformer calls seen; ``runs``: sampling runs;
- ``full_steps`` / ``cached_steps``: calls that computed everything / that reused something;
- ``compute_fraction``: computed (row, block, token) work over all calls, 1.0 = full compute;
- ``cache_bytes``: memory the cache holds now;

each None where a method cannot say it (e.g. TaylorSeer's hooks do not report which calls they
forecast); the FLOP counter (``tclab.metrics.count_flops``) measures every method alike.

This module is the leaf of ``tclab.cache``'s hook plumbing: the hook names every method registers,
the check that a transformer carries no other caching, and the removal helper all of them share.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .registry import entry_point_providers, import_provider

#: The entry-point group a package declares its caching methods in, as scorers are declared in
#: ``tclab.scorers`` (see ``tclab.cache.registry``): ``mine = "my_team.caching"``.
ENTRY_POINT_GROUP = "tclab.methods"

TOKEN_CACHE_MODEL_HOOK = "tclab_token_cache"
TOKEN_CACHE_BLOCK_HOOK = "tclab_token_cache_block"
PEER_CONTEXT_HOOK = "tclab_peer_context"

#: The keys every handle's ``stats()`` has (None where a method cannot say).
STATS_KEYS = ("method", "calls", "runs", "full_steps", "cached_steps", "compute_fraction", "cache_bytes")

#: Built-in method -> the module that registers it when imported.
BUILTIN_METHODS = {
    "tokencache": "tclab.cache.hooks",
    "fbcache": "tclab.cache.peers.fbcache", "taylorseer": "tclab.cache.peers.taylorseer",
    "pab": "tclab.cache.peers.pab", "dbcache": "tclab.cache.peers.dbcache",
}


class CachingHandle:
    """One caching method applied to one transformer (see the module docstring)."""

    method: str = "base"

    def __init__(self, transformer: torch.nn.Module, config: Any):
        self.transformer = transformer
        self.config = config
        self.removed = False

    def reset(self) -> None:  # pragma: no cover - interface
        """Forget every cached tensor; the next call starts a new run."""
        raise NotImplementedError

    def stats(self) -> dict:  # pragma: no cover - interface
        """The accounting so far: :data:`STATS_KEYS`, then what the method adds."""
        raise NotImplementedError

    def remove(self) -> None:  # pragma: no cover - interface
        """Take the method off: the module tree, its attributes and its outputs are as before. Idempotent."""
        raise NotImplementedError

    def __enter__(self) -> "CachingHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r}, {self.config}, {'removed' if self.removed else 'applied'})"


def common_stats(method: str, **values) -> dict:
    """A ``stats()`` dict: every :data:`STATS_KEYS` entry (None unless given), then the extras."""
    out = {k: None for k in STATS_KEYS}
    out.update(values)
    out["method"] = method
    return out


class MethodRegistry:
    """Caching methods by name and by config type; ``providers`` maps built-in names (and installed
    packages' entry points of ``group``) to the modules that register them."""

    def __init__(self, providers: dict[str, str], group: str | None = None):
        self.builtin = dict(providers)
        self.group = group
        self._by_name: dict[str, tuple[type, Callable[..., CachingHandle]]] = {}

    @property
    def providers(self) -> dict[str, str]:
        found = entry_point_providers(self.group) if self.group else {}
        return {**found, **self.builtin}

    def register(self, name: str, config_class: type, apply: Callable[..., CachingHandle]) -> None:
        """``apply(transformer, config) -> CachingHandle`` is what :func:`apply_caching` calls for a
        ``config_class`` instance; ``transformer`` is what the caller gave (a ``DiTTransformer2DModel``
        or a ``LoadedDiT``, whose ``.transformer`` it is)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a method name must be a non-empty string, got {name!r}")
        if not isinstance(config_class, type) or not callable(apply):
            raise TypeError(f"register_method({name!r}, config_class, apply): config_class must be a class and "
                            f"apply a callable (transformer, config) -> CachingHandle")
        for other, (cls, _) in self._by_name.items():
            if cls is config_class and other != name:
                raise ValueError(f"{config_class.__name__} is already the config of method {other!r}")
        self._by_name[name] = (config_class, apply)

    def unregister(self, name: str) -> None:
        """Forget a registered method (a test's or a session's own); built-in names cannot be dropped."""
        if name in self.builtin:
            raise ValueError(f"{name!r} is a built-in caching method; it cannot be unregistered")
        self._by_name.pop(name, None)

    def _load(self, name: str) -> None:
        module = None if name in self._by_name else self.providers.get(name)
        if module:
            import_provider(module)

    def load_builtins(self) -> None:
        for name in self.providers:
            self._load(name)

    def registered(self) -> dict[str, type]:
        """The methods loaded now: name -> config class."""
        return {name: cls for name, (cls, _) in self._by_name.items()}

    def names(self) -> list[str]:
        """Every method name: registered ones and built-ins not loaded yet."""
        return sorted(set(self._by_name) | set(self.providers))

    def config_class(self, name: str) -> type:
        self._load(name)
        if name not in self._by_name:
            raise KeyError(f"unknown caching method {name!r}; methods are {self.names()}")
        return self._by_name[name][0]

    def for_config(self, config: Any) -> tuple[str, Callable[..., CachingHandle]]:
        """The (name, apply) of the method whose config class ``config`` is an instance of."""
        self.load_builtins()
        for name, (cls, apply) in self._by_name.items():
            if type(config) is cls:
                return name, apply
        for name, (cls, apply) in self._by_name.items():
            if isinstance(config, cls):
                return name, apply
        known = ", ".join(f"{n} ({c.__name__})" for n, (c, _) in sorted(self._by_name.items()))
        raise TypeError(f"{type(config).__name__} is not the config of a registered caching method; give one of: "
                        f"{known}, or register yours with tclab.cache.register_method(name, ConfigClass, apply)")


#: The method registry every part of tclab reads.
METHODS = MethodRegistry(BUILTIN_METHODS, ENTRY_POINT_GROUP)


def register_method(name: str, config_class: type, apply: Callable[..., CachingHandle]) -> None:
    """Register a caching method (see the module docstring)."""
    METHODS.register(name, config_class, apply)


def available_methods() -> list[str]:
    """The names of every caching method :func:`apply_caching` knows."""
    return METHODS.names()


def method_config(name: str, **options) -> Any:
    """The config of method ``name`` built from ``options``, validated: an unknown option is refused
    with the list of the method's options."""
    cls = METHODS.config_class(name)
    if hasattr(cls, "from_dict"):  # TokenCacheConfig: its own did-you-mean validation
        return cls.from_dict(options)
    if dataclasses.is_dataclass(cls):
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method {name!r}; its options are {known} "
                            f"(see {cls.__module__}.{cls.__name__})")
    return cls(**options)


def apply_caching(transformer, config) -> CachingHandle:
    """Apply the caching method ``config`` belongs to (``TokenCacheConfig``, a peer's config, or a
    registered method's) to ``transformer`` (a ``DiTTransformer2DModel``, or a ``LoadedDiT``)."""
    _, apply = METHODS.for_config(config)
    return apply(transformer, config)  # as given: a peer names the LoadedDiT in its messages


def caching_on(transformer) -> str | None:
    """What tclab-known caching the transformer carries now ("a token cache", a peer, cache-dit), or None."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        if registry.get_hook(TOKEN_CACHE_MODEL_HOOK) is not None:
            return "a tclab token cache"
        peer = registry.get_hook(PEER_CONTEXT_HOOK)
        if peer is not None:
            return f"the external peer {peer.handle.method!r}"
    if getattr(transformer, "_is_cached", False):
        return "cache-dit's cache"
    return None


def check_no_caching(transformer, what: str) -> None:
    """Refuse to apply ``what`` on a transformer that already carries caching (one method at a time)."""
    present = caching_on(transformer)
    if present is not None:
        raise RuntimeError(f"{present} is already applied to this transformer; remove it (handle.remove(), or "
                           f"tclab.cache.remove_token_cache(transformer)) before applying {what}")


def drop_plain_forward(module: torch.nn.Module) -> None:
    """Delete an instance ``forward`` that is just the class's own (left behind by hook removal)."""
    fwd = module.__dict__.get("forward")
    if fwd is not None and getattr(fwd, "__self__", None) is module and \
            getattr(fwd, "__func__", None) is type(module).forward:
        del module.forward
