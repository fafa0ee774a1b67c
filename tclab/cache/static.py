"""Static-shape cached steps: the same number of kept tokens in every row, plans built on the device.

``shared/docs/tokencache.md`` section 6, "Static shapes" (tclab's option, beyond the paper). The paper's
selection (``tclab.cache.select``) lets every row of a batch keep its own number of tokens in each block,
so a cached step's shapes depend on the scores: the engine builds its per-block plans with ``nonzero()``
and two host syncs, attention runs on a padded layout, and ``torch.compile`` cannot capture a cached step
(every step has new shapes). ``TokenCacheConfig(static_shapes=True)`` replaces that with:

- **counts fixed per run**: block ``l`` keeps ``k_l`` tokens in *every* row, in every cached step of a run
  (:func:`static_counts`, host integers). No padding: ``BlockPlan.pad_flat is None``, ``K = k_l``,
  ``T = B * k_l``.

  - ``"uniform"``: exactly ``select_tokens``' uniform rule, known from ``rho``, ``L``, ``N`` and the forced
    blocks alone (the budget split evenly over the free blocks, the remainder one token each to the
    lowest-indexed free blocks; forced blocks keep all ``N``). The plans then **equal** the dynamic
    engine's: uniform selection already gives every row the same counts.
  - ``"global"`` / ``"adaptive"``: **the static-shape approximation**. The global (adaptive) rule is applied
    once per run to the *row mean* of the first cached step's scores; the per-block counts it gives are
    then used by every row and every cached step of the run. Which tokens a row keeps still follows its
    own scores (top-``k_l`` within the block); only how many each block gets is shared. The budget is met
    exactly (``sum(k_l) = floor(rho * L * N + 0.5)`` per row, as in ``select_tokens``). The cost: a row (or
    a later step) whose scores favour other blocks than the batch's first-step mean gets the mean's
    spread; ``benchmarks/bench_compile.py`` prints its quality against the dynamic engine's.

- **plans on the device** (:func:`static_plans`): one stable sort of the scores per step, a slice of the
  top ``k_l`` of each row and block, a sort of the kept indices (ascending, so ``flat`` is ordered as the
  dynamic plans are), a scatter for the mask: no host sync, no data-dependent shape. Ties are broken as
  ``select_tokens`` documents: higher score first, then lower token index.

- **step-static scorers, precomputed** (:class:`StaticRunPlans`): a scorer whose scores depend only on the
  step's timestep, the block, the token and the row's label (``learned-static``; a scorer says so with a
  class attribute ``static_per_step = True``) is asked for every cached step of the run at the run's first
  cached step; later cached steps do no scoring and no plan building at all, only a dictionary look-up.
  The engine does not know a run's future timesteps, so it extrapolates them from the last two
  (:func:`extrapolate_timesteps`: exact for the evenly spaced timesteps of DDIM, Euler and DPM-Solver++'s
  default spacings); every cached step checks its real timestep (a host float, no sync) against the one
  its plans were made for and rebuilds them if they differ, so a wrong guess costs time, never accuracy.

- **compilation** (:func:`compile_transformer`): with shapes fixed for a run, a cached step is one graph
  for ``torch.compile(dynamic=False)`` (inductor); decisions stay eager (``torch.compiler.disable`` in the
  engine fences them).

Validation of score values (range, NaN) needs a host sync, so it runs once per run (when the counts are
derived) and for each precomputed step, not in the sync-free per-step path.

A module of the leaves layer: it imports ``tclab.anatomy`` and ``tclab.cache.select`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..anatomy import BlockPlan, plan_from_indices
from .select import METHODS, _check_args, select_tokens, token_budget

__all__ = ["static_counts", "static_plans", "check_scores", "extrapolate_timesteps", "StaticRunPlans",
           "compile_transformer", "uncompile_transformer", "is_compiled"]

KV_MODES = ("all", "kept")


def check_scores(scores: torch.Tensor) -> None:
    """``select_tokens``' checks of a score tensor (B, L, N): shape, dtype, values in [0, 1], no NaN.
    One host sync."""
    _check_args(scores, 0.0, "global", 0, 0)


def _uniform_counts(rho: float, L: int, N: int, full_first: int, full_last: int) -> list[int]:
    """``select_tokens``' uniform rule, on the host."""
    forced = [l < full_first or l >= L - full_last for l in range(L)]
    free = [l for l in range(L) if not forced[l]]
    remaining = max(0, token_budget(rho, L, N) - (L - len(free)) * N)  # pairs left for the free blocks
    counts = [N if f else 0 for f in forced]
    if free and remaining:
        base, extra = divmod(remaining, len(free))
        for j, l in enumerate(free):
            counts[l] = base + (j < extra)  # the remainder goes to the lowest-indexed free blocks
    return counts


def static_counts(rho: float, num_blocks: int, num_tokens: int, method: str = "global", full_first: int = 0,
                  full_last: int = 0, scores: torch.Tensor | None = None) -> list[int]:
    """Tokens ``k_l`` every row keeps in block ``l`` in a static-shape cached step: ``(L,)`` host ints.

    ``"uniform"``: from ``rho``, ``num_blocks`` (L), ``num_tokens`` (N) and the forced blocks alone
    (``scores`` is not needed). ``"global"`` / ``"adaptive"``: the rule applied to the row mean of
    ``scores`` (B, L, N), the static-shape approximation (module docstring); one host sync. The knobs
    mean what they mean in :func:`tclab.cache.select.select_tokens`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {list(METHODS)}")
    for name, v in (("num_blocks", num_blocks), ("num_tokens", num_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if method == "uniform":
        # same checks as select_tokens, on a stand-in of the right shape (no scores needed)
        _check_args(torch.zeros(1, num_blocks, 1), rho, method, full_first, full_last)
        return _uniform_counts(rho, num_blocks, num_tokens, full_first, full_last)
    if scores is None:
        raise ValueError(f"static_counts: selection {method!r} derives the per-block counts from the scores' row "
                         "mean; pass scores (B, L, N), or use selection='uniform' (counts from rho alone)")
    if scores.dim() != 3 or tuple(scores.shape[1:]) != (num_blocks, num_tokens):
        raise ValueError(f"static_counts: scores must be (rows, {num_blocks}, {num_tokens}), got {tuple(scores.shape)}")
    mean = scores.float().mean(dim=0, keepdim=True)  # (1, L, N) the batch's mean scores
    return select_tokens(mean, rho, method, full_first, full_last)[0].sum(dim=-1).tolist()  # host sync


def static_plans(scores: torch.Tensor, counts: list[int], kv: str = "all") -> list[BlockPlan]:
    """Per-block plans of a static-shape cached step, built on the device with no host sync.

    Row ``b`` of block ``l`` keeps the ``counts[l]`` tokens with the highest ``scores[b, l]`` (ties: lower
    token index first), in ascending token order; every row keeps the same number, so no plan has padding.

    Args:
        scores: (B, L, N) token scores, high = compute (not validated here: see :func:`check_scores`).
        counts: (L,) host ints in [0, N] (:func:`static_counts`); 0 skips the block.
        kv: ``"all"`` or ``"kept"``; without padding the plans are the same for both (no key mask).
    Returns:
        ``L`` :class:`~tclab.anatomy.BlockPlan` s with ``K == counts[l]``, ``T == B * counts[l]``.
    """
    if kv not in KV_MODES:
        raise ValueError(f"kv={kv!r} is not a valid choice; choose one of {list(KV_MODES)}")
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise ValueError(f"scores must be a tensor (rows, blocks, tokens), got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    B, L, N = scores.shape
    counts = list(counts)
    if len(counts) != L or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= N for k in counts):
        raise ValueError(f"counts must be {L} integers in [0, {N}] (tokens every row keeps per block), got {counts}")
    # one stable sort for all blocks: equal scores keep their index order, so lower tokens win ties
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (B, L, N)
    return [plan_from_indices(order[:, l, :k].sort(dim=-1).values, N) for l, k in enumerate(counts)]  # (B, k) each


def extrapolate_timesteps(t_prev: float, t_now: float, step: int, steps: list[int]) -> dict[int, float]:
    """Timestep values of later ``steps`` of a run, from the timesteps of steps ``step - 1`` and ``step``,
    assuming even spacing: ``t(s) = t_now - (s - step) * (t_prev - t_now)``. Empty when the timesteps do
    not decrease (nothing sensible to extrapolate)."""
    d = t_prev - t_now
    if not (math.isfinite(d) and d > 0):
        return {}
    return {s: t_now - (s - step) * d for s in steps}


@dataclass
class StaticRunPlans:
    """What a run's static-shape cached steps share, made afresh when a run starts (the engine's plan store).

    ``counts``: (L,) tokens every row keeps per block, fixed at the run's first cached step.
    ``precomputed``: step -> (the timestep its plans were made for, the plans), for step-static scorers.
    ``tried_precompute``: the precomputation has run (or was not possible) for this run.
    """

    counts: list[int] | None = None
    precomputed: dict[int, tuple[float, list[BlockPlan]]] = field(default_factory=dict)
    tried_precompute: bool = False

    def lookup(self, step: int, t: float) -> list[BlockPlan] | None:
        """The precomputed plans of ``step`` if they were made for timestep ``t``; otherwise None, and a
        mismatch drops every precomputed plan (the extrapolated timesteps were wrong for this run)."""
        hit = self.precomputed.pop(step, None)
        if hit is None:
            return None
        if abs(hit[0] - t) <= 1e-6 * max(1.0, abs(t)):
            return hit[1]
        self.precomputed.clear()
        return None


# ---- compilation ---------------------------------------------------------------------------------------

def compile_transformer(transformer, *, backend: str = "inductor", mode: str | None = None,
                        options: dict | None = None) -> None:
    """Compile a DiT's forward in place with ``torch.compile(dynamic=False)`` (``backend``, ``mode`` and
    inductor ``options`` as ``torch.compile`` takes them).

    Works on the plain transformer and on one carrying a token cache (``apply_token_cache``, before or
    after). The whole per-call tensor work is compiled, the blocks' full-step forwards and the cached
    steps' ``block_packed`` on their plans included; the engine's decisions (schedule, scoring, selection,
    plan building) stay eager: ``torch.compiler.disable`` fences them and dynamo runs the hook around them
    eagerly. One graph per kind of step (full, cached) per run's counts: a token cache must use
    ``static_shapes=True`` (otherwise every cached step has new shapes and recompiles; the engine warns),
    and with ``"global"`` / ``"adaptive"`` selection a run whose scores give other counts compiles a new
    cached-step graph (``"uniform"`` never does). The graphs belong to the hooks ``apply_token_cache`` made:
    apply the cache once and keep it (applying it again compiles again, and dynamo stops compiling a
    function after ``torch._dynamo.config.recompile_limit`` graphs, 8 by default, falling back to eager).
    The first call of each graph compiles it (tens of seconds for the embedded model on one CPU core);
    :func:`uncompile_transformer` undoes this (compiling again later reuses the graphs).
    """
    if not hasattr(transformer, "compile"):
        raise TypeError(f"compile_transformer expects a torch.nn.Module, got {type(transformer).__name__}")
    transformer.compile(backend=backend, mode=mode, options=options, dynamic=False)


def uncompile_transformer(transformer) -> None:
    """Undo :func:`compile_transformer`: the transformer's calls run eagerly again."""
    if getattr(transformer, "_compiled_call_impl", None) is not None:
        transformer._compiled_call_impl = None


def is_compiled(transformer) -> bool:
    """True when the transformer was compiled in place (``compile_transformer`` or ``Module.compile``)."""
    return getattr(transformer, "_compiled_call_impl", None) is not None
