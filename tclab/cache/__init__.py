"""TokenCache: cached execution of DiT blocks (Lou et al., arXiv 2409.18523; spec: shared/docs/tokencache.md).

    >>> from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
    >>> state = apply_token_cache(model.transformer, TokenCacheConfig(rho=0.25))
    >>> sample(model, labels, SampleConfig(num_steps=50))   # cached steps follow the schedule
    >>> state.summary()
    >>> remove_token_cache(model.transformer)

- ``config``: ``TokenCacheConfig`` (every knob, validated) and ``fora_config`` (block caching baseline);
- ``hooks``: ``apply_token_cache`` / ``remove_token_cache`` and the state objects;
- ``scorers``: which tokens (``TokenScorer`` interface, heuristics, ``register_scorer``);
- ``schedule`` / ``select``: pure functions for when (full steps) and which (block, token) pairs.
"""

from .config import TokenCacheConfig, fora_config
from .hooks import (
    TOKEN_CACHE_BLOCK_HOOK,
    TOKEN_CACHE_MODEL_HOOK,
    BlockCacheState,
    StepRecord,
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
    "TokenCacheConfig", "fora_config", "apply_token_cache", "remove_token_cache", "get_token_cache_state",
    "TokenCacheState", "BlockCacheState", "StepRecord", "compute_block_tokens", "TOKEN_CACHE_MODEL_HOOK",
    "TOKEN_CACHE_BLOCK_HOOK", "TokenScorer", "ScoreContext", "PrevChangeScorer", "RandomScorer", "OracleScorer",
    "TocaScorer", "register_scorer", "make_scorer", "available_scorers", "make_schedule", "select_tokens",
]
