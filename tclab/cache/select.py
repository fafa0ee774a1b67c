"""Which (block, token) pairs to compute in a cached step (TokenCache, arXiv 2409.18523).

In a cached step, block ``l`` computes only a kept set of tokens and reuses its cached update for
the rest (``shared/docs/tokencache.md``, section 2). The Cache Predictor scores every pair,
``scores[b, l, i]`` in [0, 1] with high = "compute"; :func:`select_tokens` turns the scores into a
boolean mask ``(B, L, N)`` (``True`` = compute token ``i`` in block ``l`` for sample ``b``) under
a compute budget. Pure functions of their arguments: no model, no module-level state.

The knobs (option names as in the spec, section 3 "Which blocks"):

- ``rho``: the fraction of (block, token) pairs computed in a cached step. Each sample computes
  exactly ``budget = floor(rho * L * N + 0.5)`` pairs (:func:`token_budget`, rounding half up), unless
  forced blocks alone exceed it. **Lower rho = faster**, more reuse of stale updates, lower quality;
  ``rho = 1`` is full compute, ``rho = 0`` skips every block that is not forced.
- ``method``, how the budget is spread over blocks:

  - ``"uniform"``: every block keeps (about) the same number of its highest-scored tokens,
    ``rho * N`` each. The budget is split evenly; when it does not divide, the remainder goes one
    token each to the lowest-indexed blocks. The per-block count therefore never depends on the
    scores, so it is the same for every sample of a batch (rectangular gathers).
  - ``"adaptive"`` (TokenCache v1): rank blocks by the sample's mean score; the most important
    ``floor(budget / N)`` blocks compute every token, the next one keeps its highest-scored tokens
    to use up the budget exactly, the rest compute nothing (the block is skipped and its cached
    update reused: block-level caching, as in FORA, is the special case of this).
  - ``"global"`` (TokenCache v2, default): the ``budget`` highest scores over all (block, token)
    pairs of the sample; each block's kept ratio follows from its share. It is the most flexible,
    and equals the others when the scores happen to favour their shapes.

- ``full_first = k`` / ``full_last = k``: the first / last ``k`` blocks always compute every token
  (early blocks set up features the rest build on, late blocks write the output; protecting them
  buys quality for ``k * N`` pairs each). Forced pairs count toward the budget; what is left is
  spread over the other blocks by ``method``. If the forced blocks alone exceed the budget, the
  other blocks get nothing (the step computes more than ``rho`` then).

Every decision is **per sample**: row ``b`` of the mask depends only on ``scores[b]``, so a sample's
output does not depend on what else shares its batch. Ties are broken deterministically: higher
score first, then lower block index, then lower token index (for ``"adaptive"``'s ranking of blocks:
higher mean score first, then lower block index).

Decisions with data-dependent sorting and validation belong outside ``torch.compile``d regions
(diffusers fences them off the same way); run :func:`select_tokens` eagerly and pass the mask in.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch

METHODS = ("uniform", "adaptive", "global")


def token_budget(rho: float, num_blocks: int, num_tokens: int) -> int:
    """The number of (block, token) pairs a cached step computes per sample:
    ``floor(rho * L * N + 0.5)``, i.e. ``rho * L * N`` rounded half up (Python's ``round`` would round
    2.5 down to 2). The 1e-9 guards against float noise such as 0.15 * 10 = 1.4999999999999998."""
    return min(num_blocks * num_tokens, math.floor(rho * num_blocks * num_tokens + 0.5 + 1e-9))


def rank_desc(values: torch.Tensor) -> torch.Tensor:
    """Rank along the last dim, 0 = largest; ties go to the lower index (stable sort)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _check_args(scores: torch.Tensor, rho: float, method: str, full_first: int, full_last: int) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a tensor of shape (batch, blocks, tokens), got {shape}; "
                         f"add a batch dim with scores[None] for a single sample")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point in [0, 1], got dtype {scores.dtype}")
    if min(scores.shape) == 0:
        raise ValueError(f"scores must have at least one sample, block and token, got shape {tuple(scores.shape)}")
    if isinstance(rho, bool) or not isinstance(rho, Real) or not (0 <= rho <= 1):  # NaN fails too
        raise ValueError(f"rho must be a number in [0, 1] (fraction of block-token pairs computed), got {rho!r}")
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {list(METHODS)}")
    L = scores.shape[1]
    for name, k in (("full_first", full_first), ("full_last", full_last)):
        if isinstance(k, bool) or not isinstance(k, Integral) or not 0 <= k <= L:
            raise ValueError(f"{name} must be an integer in [0, {L}] (number of blocks forced full), got {k!r}")
    # One reduction (one host sync); NaN fails the comparison and is caught here too.
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        bad = scores[~((scores >= 0) & (scores <= 1))]
        raise ValueError(f"scores must lie in [0, 1] with no NaN; found {bad.numel()} values outside, e.g. "
                         f"{bad[:3].tolist()} (apply a sigmoid or min-max normalise the predictor output)")


def select_tokens(scores: torch.Tensor, rho: float, method: str = "global",
                  full_first: int = 0, full_last: int = 0) -> torch.Tensor:
    """Bool mask ``(B, L, N)``, ``True`` = compute token ``i`` in block ``l`` for sample ``b``.

    ``scores`` ``(B, L, N)`` in [0, 1], high = compute. See the module docstring for ``rho``,
    ``method`` (``"uniform"``, ``"adaptive"``, ``"global"``), the forced blocks and tie-breaking.
    """
    _check_args(scores, rho, method, full_first, full_last)
    B, L, N = scores.shape
    device = scores.device

    forced = torch.zeros(L, dtype=torch.bool, device=device)  # (L,)
    forced[:full_first] = True
    forced[L - full_last:] = True
    free = (~forced).nonzero().squeeze(1)  # (F,) indices of the blocks the method decides
    F = free.numel()
    remaining = max(0, token_budget(rho, L, N) - (L - F) * N)  # pairs left for the free blocks

    mask = torch.zeros(B, L, N, dtype=torch.bool, device=device)  # (B, L, N)
    mask[:, forced] = True
    if F == 0 or remaining == 0:
        return mask
    s = scores[:, free]  # (B, F, N), block order preserved so "lower index" still means lower block

    if method == "uniform":
        base, extra = divmod(remaining, F)
        per_block = torch.full((F,), base, device=device)  # (F,)
        per_block[:extra] += 1  # the remainder goes to the lowest-indexed free blocks
        keep = rank_desc(s) < per_block[None, :, None]  # (B, F, N)
    elif method == "adaptive":
        n_full, rest = divmod(remaining, N)
        block_rank = rank_desc(s.float().mean(dim=-1))[:, :, None]  # (B, F, 1), 0 = most important
        token_rank = rank_desc(s)  # (B, F, N)
        keep = (block_rank < n_full) | ((block_rank == n_full) & (token_rank < rest))  # (B, F, N)
    else:  # "global"
        # Flatten block-major, so a lower flat index = lower block, then lower token: the stable
        # sort then breaks score ties exactly as documented.
        keep = (rank_desc(s.reshape(B, F * N)) < remaining).reshape(B, F, N)  # (B, F, N)
    mask[:, free] = keep
    return mask


def kept_fraction(mask) -> float:
    """Fraction of ``True`` entries of a selection mask (any shape, torch or numpy): the share of
    (block, token) pairs a cached step computes. Compare it with ``rho`` to check the budget."""
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor or array (as select_tokens returns), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.numel() == 0:
        raise ValueError("mask is empty; its kept fraction is undefined")
    return mask.sum().item() / mask.numel()
