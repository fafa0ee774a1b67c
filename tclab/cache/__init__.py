"""TokenCache: cached execution of DiT blocks (Lou et al., arXiv 2409.18523; spec: shared/docs/tokencache.md).

    >>> from tclab.cache import TokenCacheConfig, apply_caching
    >>> handle = apply_caching(model.transformer, TokenCacheConfig(rho=0.25))   # or FORA, or a peer's config
    >>> sample(model, labels, SampleConfig(num_steps=50))   # cached steps follow the schedule
    >>> handle.stats()
    >>> handle.remove()

``apply_token_cache(transformer, config) -> TokenCacheState`` / ``remove_token_cache(transformer)`` are
the TokenCache-specific entry (the state holds every cached tensor and the per-call history).

- ``methods``: the one interface, ``apply_caching`` / ``CachingHandle`` / ``register_method``;
- ``config``: ``TokenCacheConfig`` (every knob, validated) and ``fora_config`` (block caching baseline);
- ``hooks``: ``apply_token_cache`` / ``remove_token_cache`` and the state objects;
- ``scorers``: which tokens (``TokenScorer`` interface, heuristics, ``register_scorer``);
- ``schedule`` / ``select``: pure functions for when (full steps) and which (block, token) pairs;
- ``peers``: other people's caching methods (FBCache, TaylorSeer, PAB, DBCache), one file each.
"""

from .config import TokenCacheConfig, fora_config
from .methods import CachingHandle, apply_caching, available_methods, register_method
from .hooks import (
    TOKEN_CACHE_BLOCK_HOOK,
    TOKEN_CACHE_MODEL_HOOK,
    BlockCacheState,
    StepRecord,
    TokenCacheHandle,
    TokenCacheState,
    apply_token_cache,
    compute_block_tokens,
    get_token_cache_state,
    remove_token_cache,
)
from .schedule import make_schedule
from .scorers import (
    OracleScorer,
    PrevChangeScorer,
    RandomScorer,
    ScoreContext,
    TocaScorer,
    TokenScorer,
    available_scorers,
    make_scorer,
    register_scorer,
)
from .select import select_tokens

__all__ = [
    "apply_caching", "CachingHandle", "register_method", "available_methods", "TokenCacheHandle", "TokenCacheConfig", "fora_config", "apply_token_cache", "remove_token_cache", "get_token_cache_state",
    "TokenCacheState", "BlockCacheState", "StepRecord", "compute_block_tokens", "TOKEN_CACHE_MODEL_HOOK",
    "TOKEN_CACHE_BLOCK_HOOK", "TokenScorer", "ScoreContext", "PrevChangeScorer", "RandomScorer", "OracleScorer",
    "TocaScorer", "register_scorer", "make_scorer", "available_scorers", "make_schedule", "select_tokens",
]
