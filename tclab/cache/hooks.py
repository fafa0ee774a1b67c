"""Cached execution of a DiT: ``apply_token_cache`` / ``remove_token_cache`` (TokenCache, arXiv 2409.18523).

This is the only tclab module that knows diffusers' hook API (``ModelHook``, ``HookRegistry``). The
method, as specified in ``shared/docs/tokencache.md`` section 2:

Each sampling step ``s`` is **full** or **cached** (``TokenCacheConfig.schedule``; step 0 is full).

- Full step: every block runs its own, untouched ``forward``; the hook stores the residual update
  ``u_l = x_{l+1} - x_l`` of every token (and, with ``reuse="output"``, ``x_{l+1}``) plus whatever the
  scorer needs (``TokenScorer.needs``).
- Cached step: the scorer scores every (row, block, token) and ``select_tokens`` picks the kept set
  ``K_l`` of each row under ``rho``. Block ``l`` then, on gathered tensors (real savings need real
  gathering; the computation itself is ``tclab.anatomy.block_packed``, beside the DiT's other parts):

  1. adaLN modulation as usual (per row: ``norm1.emb`` -> ``norm1.linear``);
  2. kept tokens: ``norm1`` + modulation, queries from them; keys/values (``kv``) from all current
     tokens (``"all"``) or from the kept tokens only (``"kept"``); ``F.scaled_dot_product_attention``;
     gated residual; ``norm3`` (diffusers' name for DiT's second norm) + modulation + MLP + gated
     residual: ``x_{l+1}[K] = x_l[K] + u_new[K]``, and the cache stores ``u_new[K]``;
  3. other tokens (``reuse``): ``x_l[i] + u_cached[i]`` (``"update"``), ``x_{l+1,cached}[i]``
     (``"output"``) or ``x_l[i] + u_hat[i]``, the token's update extrapolated from its own history
     (``"forecast"``, ``tclab.cache.forecast``; computed tokens push their new update onto it);
  4. no kept token in any row: the block is skipped (FORA's block caching is this case for all blocks).

**Per-row decisions.** Every row of the batch (a sample; the cond and uncond halves of a CFG batch are
different rows) gets its own mask from its own scores, so rows keep different numbers of tokens. The
kept (row, token) pairs are *packed* into one (T, C) tensor: norms, modulation, projections and the MLP
run on exactly the kept tokens, with no padding. Attention alone needs rows: it runs on a layout padded
to the fullest row's count ``K``; padded query slots are computed and dropped, and with ``kv="kept"``
padded key slots are masked out, so no row's result depends on another row's decision.

**Where the step comes from.** Inside ``tclab.sampling.sample`` the ``StepContext`` says the step, the
number of steps and the run id (a new id resets the cache). Inside diffusers' ``DiTPipeline`` there is
no context: ``tclab.steps.StepTracker`` works out the step, the run and the CFG layout from the calls
(one rule for all of tclab; see ``tclab.steps``), and the number of steps comes from
``TokenCacheConfig.num_steps`` (or is inferred from the first two timesteps, with a warning).
``state.reset_state()`` makes the next call start a new run.

Decisions (scheduling, scoring, selection, index building: Python branching and host syncs) are fenced
off from ``torch.compile`` with ``torch.compiler.disable``; the per-block tensor work is plain torch.
With ``static_shapes=True`` (``tclab.cache.static``) every row keeps the same count per block, plans are
built on the device without host syncs (precomputed per run for a step-static scorer such as
``learned-static``), and a cached step has fixed shapes, so ``compile_transformer`` can capture it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

# the block computation on gathered tokens lives in the DiT's anatomy; compute_block_tokens is re-exported
from ..anatomy import (BlockPlan, attention_received, block_forward, block_packed,  # noqa: F401
                       compute_block_tokens, plan_from_counts)
from ..steps import StepContext, StepTracker, bind_block_call, bind_model_call, current_step, dit_blocks
from .methods import (PEER_CONTEXT_HOOK, TOKEN_CACHE_BLOCK_HOOK, TOKEN_CACHE_MODEL_HOOK, CachingHandle, common_stats,
                      drop_plain_forward, register_method)
from .config import TokenCacheConfig
from .forecast import make_room, newton_forecast
from .schedule import make_schedule
from .static import StaticRunPlans, check_scores, extrapolate_timesteps, is_compiled, static_counts, static_plans
from .scorers import EPS, ScoreContext, TokenScorer, make_scorer, relative_change
from .select import rank_desc, select_tokens




# ---- state ----------------------------------------------------------------------------------------

class BlockCacheState:
    """What block ``l`` remembers between steps. Rows are batch rows (CFG halves included).

    Fields (None until filled): ``u`` (B, N, C) last computed update of each token; ``out`` (B, N, C)
    last computed output (``reuse="output"``); ``u_full`` (B, N, C) the update at the last full step;
    ``change`` / ``ratio`` / ``attention`` (B, N) and ``age`` (B, N) int for the scorers;
    ``probe_u`` (B, N, C) the oracle's true update at this step. See ``tclab.cache.scorers``.
    With ``reuse="forecast"`` (or a scorer that needs ``"trend"``) also the per-token history
    (``tclab.cache.forecast``): ``older`` the earlier computed updates (B, N, C) each, most recent first,
    and ``steps`` (B, N) float the step each of ``u, *older`` was computed at (NaN = not yet).
    """

    def __init__(self) -> None:
        self.reset_state()

    def reset_state(self) -> None:
        self.u = self.out = self.u_full = None
        self.change = self.ratio = self.attention = self.age = None
        self.probe_u = self.probe_x = None
        self.older: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.out, self.u_full, self.change, self.ratio,
                                                          self.attention, self.age, self.probe_u, self.probe_x,
                                                          *self.older, *self.steps) if t is not None)


@dataclass
class StepRecord:
    """Accounting of one transformer call: which step, full or cached, how much was computed."""

    run_id: int
    step: int
    t: float
    full: bool
    kept_fraction: float  # computed (row, block, token) fraction; 1.0 in a full step
    kept_per_block: list[float]  # (L,) mean over rows
    padded_fraction: float = 0.0  # padded query slots in attention (the only padded work), / all pairs
    probe: bool = False  # a full probe forward ran first (oracle): its cost is not a saving


@dataclass
class TokenCacheState:
    """The cache of one transformer, returned by ``apply_token_cache``. ``reset_state()`` forgets every
    cached tensor and makes the next call start a new run (the cache is also cleared by itself when a
    new run starts); ``history``
    (one ``StepRecord`` per transformer call) is kept across runs until ``clear_history()``."""

    config: TokenCacheConfig
    num_blocks: int
    scorer: TokenScorer | None
    blocks: list[BlockCacheState] = field(default_factory=list)
    history: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.blocks = [BlockCacheState() for _ in range(self.num_blocks)]
        self.needs = frozenset() if self.scorer is None or self.config.skips_all_blocks else frozenset(self.scorer.needs)
        # older computed updates each token keeps (tclab.cache.forecast): the forecast's order, or 1 for a
        # scorer that reads the trend (how fast a token was changing)
        cfg = self.config
        self.history_depth = max(cfg.forecast_order if cfg.reuse == "forecast" else 0, 1 if "trend" in self.needs else 0)
        self.tracker = StepTracker(self.config.num_steps)  # the step of calls from outside tclab's sampler
        self.reset_state()

    def reset_state(self) -> None:
        """Forget every cached tensor; the next call starts a new run."""
        self.tracker.reset()
        self._clear()

    def _clear(self) -> None:
        for b in self.blocks:
            b.reset_state()
        if self.scorer is not None:
            self.scorer.reset_state()
        self.run_id: int | None = None
        self.step: StepContext | None = None
        self.schedule: np.ndarray | None = None
        self.phase: str | None = None  # None (not inside a call), "full", "cached", "probe"
        self.plans: list[BlockPlan] | None = None
        self.static_run = StaticRunPlans()  # static_shapes: the run's counts and precomputed plans
        self.rows = self.num_tokens = 0
        self.grid: tuple[int, int] = (0, 0)
        self.full_steps_done = 0

    # ---- reading -----------------------------------------------------------------------------------

    def stacked(self, name: str) -> torch.Tensor:
        """A per-block field over all blocks, ``(B, L, N[, C])``."""
        return torch.stack([getattr(b, name) for b in self.blocks], dim=1)

    def kept_fractions(self, run_id: int | None = None) -> list[float]:
        """Computed fraction of (row, block, token) pairs of every recorded call (1.0 = full step)."""
        return [r.kept_fraction for r in self.history if run_id is None or r.run_id == run_id]

    def summary(self) -> dict:
        """Accounting over ``history``: steps, full steps, mean kept fraction of cached steps and the
        compute fraction of block-token work over all steps (1.0 = full compute; excludes scorer and
        probe cost, which the FLOP counter sees)."""
        h = self.history
        cached = [r.kept_fraction for r in h if not r.full]
        return {"calls": len(h), "full_steps": sum(r.full for r in h), "cached_steps": len(cached),
                "mean_kept_cached": float(np.mean(cached)) if cached else None,
                "compute_fraction": float(np.mean([r.kept_fraction for r in h])) if h else None,
                "probe_steps": sum(r.probe for r in h), "cache_bytes": self.cache_bytes()}

    def cache_bytes(self) -> int:
        return sum(b.nbytes() for b in self.blocks)

    def reused_update(self, index: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """What block ``index`` gives a token it does not compute at the current step, as an update
        (B, N, C): the cached update (``reuse="update"``), its forecast (``"forecast"``), or the cached
        output minus the block's input ``x`` (``"output"``; ``x`` required)."""
        b, reuse = self.blocks[index], self.config.reuse
        if reuse == "forecast":
            return newton_forecast([b.u, *b.older], b.steps, float(self.step.step))
        if reuse == "output":
            if x is None:
                raise ValueError("reused_update: reuse='output' needs the block's input x")
            return b.out - x
        return b.u

    def clear_history(self) -> None:
        self.history.clear()


# ---- hooks ------------------------------------------------------------------------------------------

class TokenCacheModelHook(ModelHook):
    """On the transformer: decides per call whether the step is full or cached, runs the scorer and the
    selection, and (oracle) the probe forward. The block hooks do the per-block work."""

    _is_stateful = True

    def __init__(self, state: TokenCacheState):
        super().__init__()
        self.state = state
        self._t_first = math.nan  # pipeline runs without TokenCacheConfig.num_steps: inferring it
        self._inferred_steps: int | None = None

    def new_forward(self, module, *args, **kwargs):
        a = bind_model_call(args, kwargs)
        x, timestep, labels = a["hidden_states"], a.get("timestep"), a.get("class_labels")
        st = self.state
        try:
            probe = self._begin_step(module, x, timestep, labels)
            if probe:  # oracle: a full forward first, so the scorer can read the true updates
                st.phase = "probe"
                self.fn_ref.original_forward(*args, **kwargs)
                st.phase = "cached"
                self._plan_cached_step(module, x, timestep, labels, probe=True)
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            st.phase = None
            st.plans = None
            for b in st.blocks:
                b.probe_u = b.probe_x = None

    def reset_state(self, module):
        self.state.reset_state()
        return module

    # -- decisions (Python branching, host syncs): kept out of torch.compile --------------------------

    @torch.compiler.disable
    def _begin_step(self, module, x, timestep, labels) -> bool:
        """Work out the step, reset on a new run, pick full or cached; returns True when a probe must
        run before scoring (oracle)."""
        st, cfg = self.state, self.state.config
        ctx = current_step()
        if ctx is None:
            ctx = self._pipeline_context(x, timestep, labels)
        if ctx.run_id != st.run_id:
            st._clear()
            st.run_id = ctx.run_id
        p = module.config.patch_size
        rows, grid = x.shape[0], (x.shape[-2] // p, x.shape[-1] // p)
        if st.step is not None and (rows, grid) != (st.rows, st.grid):
            raise RuntimeError(f"token cache: the batch changed from {st.rows} rows / grid {st.grid} to {rows} rows / "
                               f"grid {grid} within one sampling step run (step {ctx.step} of run {ctx.run_id}); "
                               "is something else calling the transformer inside the sampler's step?")
        st.step, st.rows, st.grid, st.num_tokens = ctx, rows, grid, grid[0] * grid[1]
        full = ctx.step == 0 or st.full_steps_done == 0
        if not full and ctx.num_steps:
            if st.schedule is None or len(st.schedule) != ctx.num_steps:
                st.schedule = make_schedule(cfg.schedule, ctx.num_steps, **cfg.schedule_params())
            full = ctx.step >= len(st.schedule) or bool(st.schedule[ctx.step])
        elif not full:
            full = True  # number of steps not known yet: cannot place the schedule
        if full:
            st.phase = "full"
            st.full_steps_done += 1
            L = st.num_blocks
            st.history.append(StepRecord(ctx.run_id, ctx.step, ctx.t, True, 1.0, [1.0] * L))
            return False
        st.phase = "cached"
        if "probe" in st.needs:
            return True
        self._plan_cached_step(module, x, timestep, labels, probe=False)
        return False

    @torch.compiler.disable
    def _plan_cached_step(self, module, x, timestep, labels, probe: bool) -> None:
        """Scores -> masks (B, L, N) -> per-block packing plans, with two host syncs for all blocks.

        With ``static_shapes=True`` (``tclab.cache.static``) instead: every row keeps ``k_l`` tokens in block
        ``l`` (counts fixed at the run's first cached step), plans built on the device with no host sync; a
        step-static scorer (``static_per_step``) is scored for every cached step of the run at its first
        one, and later cached steps only look their plans up."""
        st, cfg = self.state, self.state.config
        B, L, N = st.rows, st.num_blocks, st.num_tokens
        if cfg.static_shapes and not cfg.skips_all_blocks:
            run, ctx = st.static_run, st.step
            plans = run.lookup(ctx.step, ctx.t)  # precomputed (step-static scorer) for this step and timestep
            if plans is None:
                scores = self._score(module, x, timestep, labels, ctx)  # (B, L, N)
                if run.counts is None:  # the run's first cached step: check the scores, fix the counts (syncs)
                    check_scores(scores)
                    run.counts = static_counts(cfg.rho, L, N, cfg.selection, cfg.full_first_blocks,
                                               cfg.full_last_blocks, scores)
                plans = static_plans(scores, run.counts, cfg.kv)  # on the device, no host sync
                if not run.tried_precompute:
                    run.tried_precompute = True
                    if getattr(st.scorer, "static_per_step", False) and not probe:
                        self._precompute_static_plans(module, x, timestep, labels)
            st.plans = plans
            st.history.append(StepRecord(ctx.run_id, ctx.step, ctx.t, False, sum(run.counts) / (L * N),
                                         [k / N for k in run.counts], padded_fraction=0.0, probe=probe))
            return
        if is_compiled(module) and not cfg.skips_all_blocks:
            warnings.warn("token cache: the transformer is compiled but static_shapes=False: every cached step has "
                          "new shapes and recompiles (or falls back to eager); use "
                          "TokenCacheConfig(static_shapes=True) with tclab.cache.static.compile_transformer",
                          stacklevel=2)
        if cfg.skips_all_blocks:
            keep = torch.zeros(B, L, N, dtype=torch.bool, device=x.device)  # FORA: nothing is computed
        else:
            scores = self._score(module, x, timestep, labels, st.step)  # (B, L, N)
            keep = select_tokens(scores, cfg.rho, cfg.selection, cfg.full_first_blocks, cfg.full_last_blocks)
        counts = keep.sum(dim=-1)  # (B, L) kept tokens per row and block
        counts_cpu = counts.cpu()  # host sync 1 of the step
        nz = keep.transpose(0, 1).nonzero()  # (T_all, 3) [block, row, token], sorted: host sync 2
        per_block = counts_cpu.sum(dim=0).tolist()  # (L,) kept pairs of each block
        plans = [plan_from_counts(keep[:, l], seg[:, 1:], counts[:, l], counts_cpu[:, l].tolist(), cfg.kv)
                 for l, seg in enumerate(torch.split(nz, per_block))]
        st.plans = plans
        total = B * L * N
        padded = sum(p.K * B - p.T for p in plans if p.pad_flat is not None)  # attention-only padding
        st.history.append(StepRecord(
            st.step.run_id, st.step.step, st.step.t, False, float(counts_cpu.sum()) / total,
            (counts_cpu.float().mean(dim=0) / N).tolist(), padded_fraction=padded / total, probe=probe))

    def _score(self, module, x, timestep, labels, step: StepContext) -> torch.Tensor:
        """The scorer's (B, L, N) scores for this call's input at ``step`` (this step, or a later one of the
        run when precomputing a step-static scorer), shape-checked."""
        st, cfg = self.state, self.state.config
        sctx = ScoreContext(step=step, state=st, transformer=module, hidden_states=x, timestep=timestep,
                            class_labels=labels)
        scores = st.scorer.score(sctx)  # (B, L, N)
        if tuple(scores.shape) != (st.rows, st.num_blocks, st.num_tokens):
            raise ValueError(f"scorer {cfg.scorer_name!r} returned scores of shape {tuple(scores.shape)}; "
                             f"expected (rows, blocks, tokens) = {(st.rows, st.num_blocks, st.num_tokens)}")
        return scores

    def _precompute_static_plans(self, module, x, timestep, labels) -> None:
        """static_shapes with a step-static scorer, at the run's first cached step: score every later cached
        step of the schedule and store its plans (``StaticRunPlans.precomputed``). Their timesteps are
        extrapolated from this step's and the previous one's (every row shares the step's timestep, as in
        tclab's sampler and DiTPipeline); each later step checks its real timestep before using them."""
        st, cfg, ctx = self.state, self.state.config, self.state.step
        prev = st.history[-1] if st.history else None  # the previous call's record: step - 1 of this run?
        later = [s for s in range(ctx.step + 1, len(st.schedule)) if not st.schedule[s]]
        if prev is None or prev.run_id != ctx.run_id or prev.step != ctx.step - 1 or not later:
            return
        t_in = torch.as_tensor(timestep, device=x.device)
        for s, t in extrapolate_timesteps(prev.t, ctx.t, ctx.step, later).items():
            scores = self._score(module, x, torch.full_like(t_in, t), labels, dataclasses.replace(ctx, step=s, t=t))
            check_scores(scores)  # once per step of the run, here at its first cached step (a sync each)
            st.static_run.precomputed[s] = (t, static_plans(scores, st.static_run.counts, cfg.kv))

    def _pipeline_context(self, x, timestep, labels) -> StepContext:
        """Outside tclab's sampler (e.g. diffusers' ``DiTPipeline``): the ``StepTracker``'s context, with
        the number of steps from ``TokenCacheConfig.num_steps`` or inferred from the first two timesteps."""
        cfg = self.state.config
        if timestep is None:
            raise ValueError("token cache: the transformer was called without `timestep`; DiT needs it")
        ctx = self.state.tracker(x, timestep, labels)
        if cfg.num_steps:
            return ctx
        if ctx.step == 0:
            self._t_first, self._inferred_steps = ctx.t, None
        elif ctx.step == 1:
            d = self._t_first - ctx.t
            if d <= 0:
                raise ValueError(f"token cache: cannot infer the number of steps from timesteps {self._t_first} -> "
                                 f"{ctx.t}; set TokenCacheConfig.num_steps to the pipeline's num_inference_steps")
            self._inferred_steps = int(round(self._t_first / d)) + 1
            warnings.warn(f"token cache: no step context and no TokenCacheConfig.num_steps; inferred "
                          f"num_steps={self._inferred_steps} from the first two timesteps (exact for evenly spaced "
                          "timesteps ending at 0, e.g. DDIM 'leading'); set num_steps to be sure", stacklevel=2)
        return dataclasses.replace(ctx, num_steps=self._inferred_steps or 0)


class TokenCacheBlockHook(ModelHook):
    """On block ``l``: full steps run the block's own forward and refresh the cache; cached steps run
    ``compute_block_tokens`` on the kept tokens and reuse the cache for the rest."""

    def __init__(self, state: TokenCacheState, index: int):
        super().__init__()
        self.state = state
        self.index = index

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        phase = st.phase
        if phase is None:  # called outside a cached transformer call: behave as the plain block
            return self.fn_ref.original_forward(*args, **kwargs)
        a = bind_block_call(args, kwargs)
        x = a["hidden_states"]  # (B, N, C)
        if phase != "cached":
            out = self.fn_ref.original_forward(*args, **kwargs)  # (B, N, C), the block untouched
            if phase == "full":
                self._refresh(module, x, out, a.get("timestep"), a.get("class_labels"))
            else:  # probe
                st.blocks[self.index].probe_u, st.blocks[self.index].probe_x = out - x, x
            return out
        if a.get("attention_mask") is not None or a.get("encoder_hidden_states") is not None:
            raise NotImplementedError("token cache: DiT blocks take no attention mask or encoder states; "
                                      "this block was called with one")
        return self._cached(module, x, a.get("timestep"), a.get("class_labels"))

    def _refresh(self, block, x, out, timestep, labels) -> None:
        """Full step: store the update of every token and what the scorer needs."""
        b, cfg, needs = self.state.blocks[self.index], self.state.config, self.state.needs
        u = out - x  # (B, N, C)
        if "history" in needs:
            b.change = None if b.u_full is None else relative_change(u, b.u_full)  # (B, N)
            b.ratio = u.float().norm(dim=-1) / (x.float().norm(dim=-1) + EPS)  # (B, N)
            b.u_full = u = u.contiguous()
        if "attention" in needs:
            b.attention = attention_received(block, x, timestep, labels)  # (B, N)
        if "age" in needs:
            b.age = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)  # (B, N)
        depth = self.state.history_depth
        if depth:  # every token was computed at this step: the history rotates by one place
            step = float(self.state.step.step)
            if not b.steps:  # the run's first full step: no older values yet (NaN steps)
                b.older = [torch.zeros_like(u) for _ in range(depth)]
                b.steps = [torch.full(x.shape[:2], math.nan, device=x.device) for _ in range(depth + 1)]
            else:
                b.older = [b.u, *b.older[:-1]]  # the last computed update becomes the first older one
                b.steps = [b.steps[-1], *b.steps[:-1]]  # the oldest steps' buffer holds this step's
            b.steps[0].fill_(step)
        b.u = u.contiguous()
        b.out = out.contiguous() if cfg.reuse == "output" else None

    def _cached(self, block, x, timestep, labels) -> torch.Tensor:
        st = self.state
        b, plan, reuse = st.blocks[self.index], st.plans[self.index], st.config.reuse
        # (B, N, C) the cached update, or its forecast to this step (tclab.cache.forecast); None for "output"
        reused = None if reuse == "output" else st.reused_update(self.index)
        if "path" in st.needs and plan.K:  # oracle-error: the same budget, the tokens chosen along this path
            plan = st.plans[self.index] = self._path_plan(block, x, timestep, labels, plan,
                                                          b.out - x if reused is None else reused)
        if b.age is not None:
            b.age = torch.where(plan.keep, 0, b.age + 1)  # (B, N)
        # (B, N, C) what non-kept tokens get; contiguous, as kept rows are written into its (B*N, C) view
        # (block 0's input comes from the patch embedding as a transposed view)
        base = b.out if reused is None else (x + reused).contiguous()
        if plan.K == 0:  # no row keeps a token: skip the block
            return base
        out_k, x_k = block_packed(block, x, plan, timestep, labels, st.config.kv)  # (T, C) each
        B, N, C = x.shape
        if reuse != "forecast" or st.config.forecast_history == "computed":  # the cache stores u_new[K]
            if b.u is b.u_full:  # copy-on-write: keep the last full step's updates for the history
                b.u = b.u.clone()
            if b.steps:  # the computed tokens' histories move back one place, then take this step's update
                make_room([b.u, *b.older], b.steps, plan.flat)
                b.steps[0].view(B * N).index_fill_(0, plan.flat, float(st.step.step))
            b.u.view(B * N, C).index_copy_(0, plan.flat, out_k - x_k)
        out = base if reuse != "output" else base.clone()  # (B, N, C); "output" keeps b.out intact
        out.view(B * N, C).index_copy_(0, plan.flat, out_k)  # kept tokens: x_l[K] + u_new[K]
        if reuse == "output":
            b.out = out
        return out


    @torch.compiler.disable
    def _path_plan(self, block, x, timestep, labels, plan: BlockPlan, reused: torch.Tensor) -> BlockPlan:
        """The plan with each row's kept count unchanged but its tokens re-chosen by the exact error of
        reusing ``reused`` (B, N, C, what a non-computed token gets, as an update) on this block's actual
        input (the cached path): the ``"path"`` need of ``oracle-error``."""
        u_true = block_forward(block, x, timestep, labels) - x  # (B, N, C) the block on every token
        err = (u_true.float() - reused.float()).norm(dim=-1)  # (B, N)
        counts = plan.keep.sum(dim=-1)  # (B,)
        keep = rank_desc(err) < counts[:, None]  # (B, N) each row's top-count errors
        return plan_from_counts(keep, keep.nonzero(), counts, counts.cpu().tolist(), self.state.config.kv)


# ---- apply / remove ---------------------------------------------------------------------------------

def _blocks_of(transformer) -> list[BasicTransformerBlock]:
    blocks = dit_blocks(transformer, "apply_token_cache")
    if not hasattr(getattr(transformer, "config", None), "patch_size"):
        raise TypeError(f"apply_token_cache expects a diffusers DiTTransformer2DModel (with transformer_blocks and "
                        f"a patch_size config), got {type(transformer).__name__} without config.patch_size")
    for i, blk in enumerate(blocks):
        if not isinstance(blk, BasicTransformerBlock) or blk.norm_type != "ada_norm_zero" or blk.attn2 is not None:
            raise TypeError(f"block {i} is not a DiT block (BasicTransformerBlock, norm_type='ada_norm_zero', no "
                            "cross-attention); token caching re-implements exactly that block")
        at = blk.attn1
        if at.norm_q is not None or at.group_norm is not None or at.spatial_norm is not None or \
                at.residual_connection or at.rescale_output_factor != 1.0 or blk.pos_embed is not None:
            raise TypeError(f"block {i}'s attention has features DiT lacks (qk-norm, group norm, residual, "
                            "rescale or positional embedding); token caching does not support it")
        if not isinstance(at.processor, (AttnProcessor2_0, AttnProcessor)):
            warnings.warn(f"block {i} uses attention processor {type(at.processor).__name__}; in cached steps the "
                          "token cache computes plain scaled-dot-product attention instead", stacklevel=3)
    return list(blocks)


def apply_token_cache(transformer, config: TokenCacheConfig | dict | None = None) -> TokenCacheState:
    """Attach TokenCache-style cached execution to a DiT transformer (``DiTTransformer2DModel``).

    Works inside ``tclab.sampling.sample`` and inside diffusers' ``DiTPipeline`` (see the module
    docstring). With ``config.enabled=False`` nothing is attached (outputs stay bit-identical) and an
    inert state is returned. Applying twice raises; ``remove_token_cache`` undoes it.

    Returns:
        TokenCacheState: the live cache (``reset_state()``, ``history``, ``summary()``).
    """
    if config is None:
        config = TokenCacheConfig()
    elif isinstance(config, dict):
        config = TokenCacheConfig.from_dict(config)
    elif not isinstance(config, TokenCacheConfig):
        raise TypeError(f"config must be a TokenCacheConfig or a dict, got {type(config).__name__}")
    blocks = _blocks_of(transformer)
    existing = getattr(transformer, "_diffusers_hook", None)  # looked at, not created: a disabled cache adds nothing
    if existing is not None and existing.get_hook(TOKEN_CACHE_MODEL_HOOK) is not None:
        raise RuntimeError("a token cache is already applied to this transformer; call its handle's remove() "
                           "(or tclab.cache.remove_token_cache(transformer)) first")
    if existing is not None and existing.get_hook(PEER_CONTEXT_HOOK) is not None:
        raise RuntimeError("an external caching peer (tclab.cache.peers) is applied to this transformer; "
                           "call its handle's remove() before applying a token cache")
    if not config.enabled:
        return TokenCacheState(config=config, num_blocks=len(blocks), scorer=None)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    forced = min(len(blocks), config.full_first_blocks + config.full_last_blocks)
    if forced and config.rho < forced / len(blocks):
        warnings.warn(f"token cache: rho={config.rho:g} is below the share of the forced-full blocks ({forced} of "
                      f"{len(blocks)} = {forced / len(blocks):.3g}); cached steps compute exactly those blocks and rho "
                      "has no effect. Raise rho or force fewer blocks", stacklevel=2)
    scorer = None if config.skips_all_blocks else make_scorer(config, transformer)
    state = TokenCacheState(config=config, num_blocks=len(blocks), scorer=scorer)
    for i, blk in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(blk).register_hook(TokenCacheBlockHook(state, i),
                                                                      TOKEN_CACHE_BLOCK_HOOK)
    registry.register_hook(TokenCacheModelHook(state), TOKEN_CACHE_MODEL_HOOK)
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()
    return state


def remove_token_cache(transformer) -> None:
    """Remove the token cache hooks (by name) from the transformer and its blocks; a no-op if none."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(TOKEN_CACHE_MODEL_HOOK, recurse=False)
    for blk in getattr(transformer, "transformer_blocks", []):
        if hasattr(blk, "_diffusers_hook"):
            blk._diffusers_hook.remove_hook(TOKEN_CACHE_BLOCK_HOOK, recurse=False)
    if hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()
    # Leave no trace: an emptied registry (and the instance ``forward`` it wrapped) would make the
    # next library that patches ``forward`` (cache-dit, say) believe someone else owns it.
    for module in (transformer, *getattr(transformer, "transformer_blocks", [])):
        reg = getattr(module, "_diffusers_hook", None)
        if reg is not None and not reg.hooks:
            del module._diffusers_hook
            drop_plain_forward(module)


def get_token_cache_state(transformer) -> TokenCacheState | None:
    """The live state of the token cache applied to ``transformer``, or None."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(TOKEN_CACHE_MODEL_HOOK) if registry is not None else None
    return hook.state if hook is not None else None


# ---- the one caching interface (tclab.cache.methods) ---------------------------------------------------

class TokenCacheHandle(CachingHandle):
    """TokenCache (every ``TokenCacheConfig``, FORA included) behind ``apply_caching``'s interface;
    ``state`` is the ``TokenCacheState`` that ``apply_token_cache`` returns."""

    method = "tokencache"

    def __init__(self, transformer, config: TokenCacheConfig):
        super().__init__(transformer, config)  # apply_caching gives the bare transformer
        self.state = apply_token_cache(transformer, config)

    def reset(self) -> None:
        if self.removed:
            raise RuntimeError("this token cache was removed; apply it again with tclab.cache.apply_caching")
        self.state.reset_state()

    def stats(self) -> dict:
        s = self.state.summary()
        full, cached = s.pop("full_steps"), s.pop("cached_steps")
        return common_stats(self.method, calls=s.pop("calls"), runs=len({r.run_id for r in self.state.history}),
                            full_steps=full, cached_steps=cached, compute_fraction=s.pop("compute_fraction"),
                            cache_bytes=s.pop("cache_bytes"), **s)

    def remove(self) -> None:
        if not self.removed and get_token_cache_state(self.transformer) is self.state:
            remove_token_cache(self.transformer)
        if not self.removed:
            self.state.reset_state()  # drop the cached tensors; the history stays for stats()
        self.removed = True


register_method("tokencache", TokenCacheConfig, TokenCacheHandle)
