"""The one list of token scorers: name -> factory (a leaf: it imports nothing from tclab).

``TokenCacheConfig`` validates ``scorer=`` against :data:`SCORERS`, the engine builds scorers from
it, and ablation sweeps take whatever name it holds, so a scorer registered here is usable by name
everywhere (configs, sweeps, notebook parameters)::

    from tclab.cache import register_scorer, TokenCacheConfig
    register_scorer("mine", lambda config, **options: MyScorer(**options))
    TokenCacheConfig(scorer="mine")

The built-in names are known before their modules are imported: each names the module that
registers it (:data:`BUILTIN_PROVIDERS`), imported the first time the name is used. So validating a
config needs no torch, and the learned predictors load only when asked for.

**A team's own scorer, everywhere (notebooks and scheduled jobs too).** A notebook's kernel is a new
process, so a ``register_scorer`` call in your session does not reach it. Declare the scorer as an
entry point of your package instead, in the group :data:`ENTRY_POINT_GROUP`::

    # pyproject.toml of your package
    [project.entry-points."tclab.scorers"]
    mine = "my_team.scorers"        # a module whose import calls register_scorer("mine", ...)

Every process that has your package installed then knows ``"mine"``: ``TokenCacheConfig``, sweeps,
``scorers: [mine]`` in a notebook's parameters. The entry point is imported the first time its name
is looked up, never at ``import tclab``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Any, Callable

#: The entry-point group a package declares its scorers in (see the module docstring).
ENTRY_POINT_GROUP = "tclab.scorers"


def entry_point_providers(group: str) -> dict[str, str]:
    """Installed packages' entry points of ``group``: name -> the module (or ``module:attr``) to import."""
    try:
        return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
    except Exception:  # a broken installed distribution must not break tclab's own names
        return {}


def import_provider(target: str) -> None:
    """Import the module of a provider (``module`` or ``module:attr``; the attribute is looked up too)."""
    module, _, attr = target.partition(":")
    if importlib.util.find_spec(module) is None:
        return
    loaded = importlib.import_module(module)
    if attr:
        getattr(loaded, attr)

#: Built-in scorer -> the module that registers it when imported.
BUILTIN_PROVIDERS = {
    "prev-change": "tclab.cache.scorers", "random": "tclab.cache.scorers", "oracle": "tclab.cache.scorers",
    "toca": "tclab.cache.scorers", "staleness": "tclab.cache.scorers", "staleness-learned": "tclab.cache.scorers",
    "oracle-error": "tclab.cache.scorers",
    "learned-static": "tclab.cache.predictor", "learned-dynamic": "tclab.cache.predictor",
}


class ProviderRegistry:
    """Entries by name, known before the modules that register them are imported: ``builtin`` maps
    tclab's own names to their modules, and installed packages' entry points of ``group`` add theirs.
    The scorer registry (here) and the caching-method registry (``tclab.cache.methods``) are both one."""

    def __init__(self, builtin: dict[str, str], group: str | None = None):
        self.builtin = dict(builtin)
        self.group = group
        self._entries: dict[str, Any] = {}

    @property
    def providers(self) -> dict[str, str]:
        """Built-in names and installed packages' entry points (built-ins win a clash) -> module."""
        found = entry_point_providers(self.group) if self.group else {}
        return {**found, **self.builtin}

    def _load(self, name: str) -> str | None:
        """Import the provider of ``name`` unless it is registered already; returns the provider (or None)."""
        module = None if name in self._entries else self.providers.get(name)
        if module:
            import_provider(module)
        return module

    def names(self) -> list[str]:
        """Every name: registered ones and those whose provider is not imported yet."""
        return sorted(set(self._entries) | set(self.providers))


class ScorerRegistry(ProviderRegistry):
    """Scorer factories by name; ``providers`` maps a name to the module that registers it."""

    def register(self, name: str, factory: Callable[..., Any]) -> None:
        """Make ``TokenCacheConfig(scorer=name)`` build ``factory(config, **config.scorer_options)``."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a scorer name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"the factory of scorer {name!r} must be callable (config, **options) -> TokenScorer, "
                            f"got {factory!r}")
        self._entries[name] = factory

    def registered(self) -> list[str]:
        """The names whose factory is loaded now."""
        return sorted(self._entries)

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory of ``name``, importing its provider module first when needed."""
        module = self._load(name)
        if name not in self._entries:
            raise ValueError(f"scorer {name!r} is not available (registered: {self.registered()}); the learned "
                             f"predictors register themselves from {module or 'their module'}, or pass a "
                             "TokenScorer instance as TokenCacheConfig.scorer")
        return self._entries[name]


#: The scorer registry every part of tclab reads.
SCORERS = ScorerRegistry(BUILTIN_PROVIDERS, ENTRY_POINT_GROUP)


def register_scorer(name: str, factory: Callable[..., Any]) -> None:
    """Register a scorer by name (see the module docstring)."""
    SCORERS.register(name, factory)


def available_scorers() -> list[str]:
    """The names a ``TokenCacheConfig.scorer`` may take."""
    return SCORERS.names()
