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

This module is also the bottom of ``tclab.cache``'s hook plumbing: the hook names the built-in
methods register (each refuses to go on a transformer that carries another's) and the removal
helper all of them share.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch

from .registry import ProviderRegistry, import_provider

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


class MethodRegistry(ProviderRegistry):
    """Caching methods by name and by config type: ``(config class, apply)`` entries; ``providers``
    maps built-in names (and installed packages' entry points of ``group``) to their modules."""

    def __init__(self, builtin: dict[str, str], group: str | None = None):
        super().__init__(builtin, group)
        self._takes_model: set[str] = set()

    def register(self, name: str, config_class: type, apply: Callable[..., CachingHandle], *,
                 takes_model: bool = False) -> None:
        """``apply(transformer, config) -> CachingHandle`` is what :func:`apply_caching` calls for a
        ``config_class`` instance, with the bare ``DiTTransformer2DModel`` (``takes_model=True``: with
        what the caller gave, a ``LoadedDiT`` or a transformer, e.g. to name the model in messages)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a method name must be a non-empty string, got {name!r}")
        if not isinstance(config_class, type) or not callable(apply):
            raise TypeError(f"register_method({name!r}, config_class, apply): config_class must be a class and "
                            f"apply a callable (transformer, config) -> CachingHandle")
        for other, (cls, _) in self._entries.items():
            if cls is config_class and other != name:
                raise ValueError(f"{config_class.__name__} is already the config of method {other!r}")
        old = self._entries.get(name)
        if old is not None and old[0] is not config_class:
            raise ValueError(f"{name!r} is already the name of a caching method ({old[0].__name__}); pick another "
                             "name (or unregister it first)")
        if name in self.builtin and self.builtin[name] not in (config_class.__module__,
                                                               getattr(apply, "__module__", None)):
            raise ValueError(f"{name!r} is already the name of a caching method (built in, from "
                             f"{self.builtin[name]}); pick another name")
        self._entries[name] = (config_class, apply)
        if takes_model:
            self._takes_model.add(name)
        else:
            self._takes_model.discard(name)

    def unregister(self, name: str) -> None:
        """Forget a registered method (a test's or a session's own); built-in names cannot be dropped."""
        if name in self.builtin:
            raise ValueError(f"{name!r} is a built-in caching method; it cannot be unregistered")
        self._entries.pop(name, None)
        self._takes_model.discard(name)

    def load_all(self) -> None:
        """Import the built-in methods' modules, then installed packages' entry points. A package whose
        entry point fails to import is skipped with a warning naming it: one broken plugin must not
        stop every other method."""
        for name in self.builtin:
            self._load(name)
        for name, target in self.providers.items():
            if name in self._entries or name in self.builtin:
                continue
            try:
                import_provider(target)
            except Exception as e:  # noqa: BLE001 (a third party's import error, reported not raised)
                warnings.warn(f"caching method {name!r} (entry point {target!r} of group {self.group!r}) could not "
                              f"be imported and is skipped: {type(e).__name__}: {e}", stacklevel=3)

    def takes_model(self, name: str) -> bool:
        return name in self._takes_model

    def registered(self) -> dict[str, type]:
        """The methods loaded now: name -> config class."""
        return {name: cls for name, (cls, _) in self._entries.items()}

    def config_class(self, name: str) -> type:
        self._load(name)
        if name not in self._entries:
            raise KeyError(f"unknown caching method {name!r}; methods are {self.names()}")
        return self._entries[name][0]

    def for_config(self, config: Any) -> tuple[str, Callable[..., CachingHandle]]:
        """The (name, apply) of the method whose config class ``config`` is an instance of: among the
        methods loaded, then the built-ins, then installed packages' (imported only when needed)."""
        found = self._match(config)
        if found is None:
            self.load_all()
            found = self._match(config)
        if found is not None:
            return found
        known = ", ".join(f"{n} ({c.__name__})" for n, (c, _) in sorted(self._entries.items()))
        raise TypeError(f"{type(config).__name__} is not the config of a registered caching method; give one of: "
                        f"{known}, or register yours with tclab.cache.register_method(name, ConfigClass, apply)")


    def _match(self, config: Any) -> tuple[str, Callable[..., CachingHandle]] | None:
        """The loaded method whose config class is ``type(config)``, else one ``config`` is an instance of."""
        exact = [(n, apply) for n, (cls, apply) in self._entries.items() if type(config) is cls]
        inherited = [(n, apply) for n, (cls, apply) in self._entries.items() if isinstance(config, cls)]
        return (exact or inherited or [None])[0]


#: The method registry every part of tclab reads.
METHODS = MethodRegistry(BUILTIN_METHODS, ENTRY_POINT_GROUP)


def register_method(name: str, config_class: type, apply: Callable[..., CachingHandle], *,
                    takes_model: bool = False) -> None:
    """Register a caching method (see the module docstring); ``apply(transformer, config)`` gets the
    bare transformer unless ``takes_model`` (then whatever the caller gave, e.g. a ``LoadedDiT``)."""
    METHODS.register(name, config_class, apply, takes_model=takes_model)


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
    name, apply = METHODS.for_config(config)
    if METHODS.takes_model(name):  # e.g. the peers, which name the LoadedDiT in their messages
        return apply(transformer, config)
    return apply(getattr(transformer, "transformer", transformer), config)


def drop_plain_forward(module: torch.nn.Module) -> None:
    """Delete an instance ``forward`` that is just the class's own (left behind by hook removal)."""
    fwd = module.__dict__.get("forward")
    if fwd is not None and getattr(fwd, "__self__", None) is module and \
            getattr(fwd, "__func__", None) is type(module).forward:
        del module.forward
