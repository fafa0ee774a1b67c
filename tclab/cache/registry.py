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
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

#: Built-in scorer -> the module that registers it when imported.
BUILTIN_PROVIDERS = {
    "prev-change": "tclab.cache.scorers", "random": "tclab.cache.scorers", "oracle": "tclab.cache.scorers",
    "toca": "tclab.cache.scorers",
    "learned-static": "tclab.cache.predictor", "learned-dynamic": "tclab.cache.predictor",
}


class ScorerRegistry:
    """Scorer factories by name; ``providers`` maps a name to the module that registers it."""

    def __init__(self, providers: dict[str, str]):
        self._factories: dict[str, Callable[..., Any]] = {}
        self.providers = dict(providers)

    def register(self, name: str, factory: Callable[..., Any]) -> None:
        """Make ``TokenCacheConfig(scorer=name)`` build ``factory(config, **config.scorer_options)``."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a scorer name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"the factory of scorer {name!r} must be callable (config, **options) -> TokenScorer, "
                            f"got {factory!r}")
        self._factories[name] = factory

    def names(self) -> list[str]:
        """Every name a config may use: registered ones and built-ins not loaded yet."""
        return sorted(set(self._factories) | set(self.providers))

    def registered(self) -> list[str]:
        """The names whose factory is loaded now."""
        return sorted(self._factories)

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory of ``name``, importing its provider module first when needed."""
        module = self.providers.get(name)
        if name not in self._factories and module and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
        if name not in self._factories:
            raise ValueError(f"scorer {name!r} is not available (registered: {self.registered()}); the learned "
                             f"predictors register themselves from {module or 'their module'}, or pass a "
                             "TokenScorer instance as TokenCacheConfig.scorer")
        return self._factories[name]


#: The scorer registry every part of tclab reads.
SCORERS = ScorerRegistry(BUILTIN_PROVIDERS)


def register_scorer(name: str, factory: Callable[..., Any]) -> None:
    """Register a scorer by name (see the module docstring)."""
    SCORERS.register(name, factory)


def available_scorers() -> list[str]:
    """The names a ``TokenCacheConfig.scorer`` may take."""
    return SCORERS.names()
