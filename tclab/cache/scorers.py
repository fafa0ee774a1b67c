"""Which tokens to compute: token scorers behind one interface (TokenCache, arXiv 2409.18523).

In a cached step the engine (``tclab.cache.hooks``) asks the configured scorer for scores
``w[b, l, i]`` in [0, 1], **high = compute** (``b`` a batch row, CFG halves included; ``l`` a block;
``i`` a token of the ``H x W`` grid), then ``tclab.cache.select.select_tokens`` turns them into masks
under the budget ``rho``. Spec: ``shared/docs/tokencache.md`` section 3, "Which tokens".

**The interface** (:class:`TokenScorer`): a scorer declares in ``needs`` what the engine must keep for
it, and implements ``score(ctx) -> (B, L, N)``; ``reset_state()`` is called when a new run starts.
``ctx`` is a :class:`ScoreContext`: the step (``StepContext``: ``step``, ``t``, ``num_steps``, ``cfg``,
``run_id``), the model input, timestep and labels, the transformer, and a read-only view of the
engine's cache (:class:`CacheView`, a Protocol the engine's ``TokenCacheState`` satisfies; a scorer
needs nothing else of the engine, so it can be written and tested alone), whose per-block fields
(:class:`BlockView`) a scorer may read (never write):

==============  =====================  ==================================================================
need            state field (block l)  what it holds
==============  =====================  ==================================================================
(always)        ``u``                  (B, N, C) last computed residual update of every token
``"history"``   ``change``             (B, N) ``||u^s - u^s'|| / ||u^s'||`` between the last two full steps
                                       (None until the second full step)
``"history"``   ``ratio``              (B, N) ``||u|| / ||x||`` at the last full step (``update_ratio``)
``"attention"`` ``attention``          (B, N) attention each token received at the last full step
                                       (mean over heads and queries; sums to 1 over tokens)
``"age"``       ``age``                (B, N) cached steps since the token was last computed
``"probe"``     ``probe_u``            (B, N, C) the true update at *this* step, from a full forward the
                                       engine runs first (only for the oracles: it costs a full step);
                                       ``probe_x`` (B, N, C) the block's input on that forward
``"trend"``     ``older``, ``steps``   the token's earlier computed updates (B, N, C) each and the steps
                                       ``(B, N)`` of ``u, *older`` (NaN = not yet): how fast it changes
``"path"``      (none)                 the engine re-chooses each block's kept tokens *along the cached
                                       path*, by the exact error of reuse there (``oracle-error``)
==============  =====================  ==================================================================

``state.reused_update(l, x)`` is what block ``l`` would give a token it does not compute at this step,
as an update (the cached one, or its forecast with ``reuse="forecast"``).

``state.stacked(name)`` gives a field over all blocks as ``(B, L, N[, C])``. Whatever a scorer computes
runs inside the transformer call, so its cost shows in every FLOP and time figure (as the spec asks
for ``learned-dynamic``).

**Writing a new scorer** (the learned predictors of ``tclab.cache.predictor`` do this)::

    class MyScorer(TokenScorer):
        name = "mine"
        needs = frozenset()
        def score(self, ctx):                       # -> (B, L, N) in [0, 1]
            B, L, N = ctx.shape
            return torch.full((B, L, N), 0.5, device=ctx.device)

    register_scorer("mine", lambda config, **options: MyScorer(**options))

or pass an instance directly: ``TokenCacheConfig(scorer=MyScorer())``.

The heuristics here (for ablation): ``prev-change``, ``random``, ``oracle``, ``toca``, and the
staleness-aware ones (tclab's, ``shared/docs/tokencache.md`` section 6): ``staleness`` (expected error of
reuse), ``staleness-learned`` (times the learned importance) and ``oracle-error`` (the real upper bound).

Which oracle is which: ``oracle`` scores the *relative* change ``||u_now - u_cached|| / ||u_cached||``
on the fully computed path; it is what the paper's analysis measures, but it is **not** an upper bound
(a small update that changes by 100 % matters less than a large one that changes by 10 %; measured on
the embedded model it is no better than learned-static). ``oracle-error`` scores the *absolute* error
of the update that would actually be reused (forecast included), and then, block by block along the
cached path, keeps the tokens whose reuse would err most there: the best any scorer can do with the
same per-block budget, greedily (block by block, not jointly over blocks and steps).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..steps import StepContext

NEEDS = frozenset({"history", "attention", "age", "probe", "trend", "path"})
EPS = 1e-6


def relative_change(new: torch.Tensor, old: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``||new[i] - old[i]|| / (||old[i]|| + eps)`` over the last dim: (..., C) -> (...), in float32."""
    new, old = new.float(), old.float()
    return (new - old).norm(dim=-1) / (old.norm(dim=-1) + eps)


def squash(r: torch.Tensor) -> torch.Tensor:
    """Map a non-negative ratio to [0, 1) monotonically, ``r / (1 + r)``: keeps the ranking across
    blocks (what global selection compares) and meets ``select_tokens``' [0, 1] contract."""
    r = r.clamp_min(0)
    return r / (1 + r)


class BlockView(Protocol):
    """What the cache holds for one block (see the table in the module docstring); read-only."""

    u: torch.Tensor | None  # (B, N, C)
    change: torch.Tensor | None  # (B, N)
    ratio: torch.Tensor | None  # (B, N)
    attention: torch.Tensor | None  # (B, N)
    age: torch.Tensor | None  # (B, N)
    probe_u: torch.Tensor | None  # (B, N, C)


class CacheView(Protocol):
    """The part of the engine's state a scorer may read: the batch's shape and each block's fields."""

    rows: int  # B, CFG halves included
    num_blocks: int  # L
    num_tokens: int  # N
    grid: tuple[int, int]  # (H, W), N = H * W
    blocks: Sequence[BlockView]

    def stacked(self, name: str) -> torch.Tensor:  # a field over all blocks, (B, L, N[, C])
        ...


class ScorerConfig(Protocol):
    """The part of a config ``make_scorer`` reads (``TokenCacheConfig`` has it)."""

    scorer: Any  # a registered name or a TokenScorer instance
    scorer_options: dict
    seed: int


@dataclass
class ScoreContext:
    """What a scorer sees when asked for scores (see the module docstring)."""

    step: StepContext
    state: CacheView
    transformer: torch.nn.Module
    hidden_states: torch.Tensor  # (B, C_in, H_px, W_px) the transformer's input at this step
    timestep: torch.Tensor  # (B,)
    class_labels: torch.Tensor | None  # (B,)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, L, N): rows (CFG halves included), blocks, tokens."""
        return self.state.rows, self.state.num_blocks, self.state.num_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return self.state.grid

    @property
    def device(self) -> torch.device:
        return self.hidden_states.device

    def tokens(self) -> torch.Tensor:
        """The patch-embedded input tokens (B, N, C) (runs ``transformer.pos_embed``; its cost counts)."""
        return self.transformer.pos_embed(self.hidden_states)


class TokenScorer:
    """Base class of token scorers: ``score(ctx) -> (B, L, N)`` in [0, 1], high = compute.

    Attributes:
        name: the option name (``TokenCacheConfig.scorer``).
        needs: subset of ``{"history", "attention", "age", "probe"}``: what the engine keeps for it.
    """

    name: str = "base"
    needs: frozenset = frozenset()

    def reset_state(self) -> None:
        """Forget everything from the previous run (called when a new run starts)."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement score(ctx) -> (B, L, N) in [0, 1]")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PrevChangeScorer(TokenScorer):
    """``prev-change``: tokens whose update changed most between the last two full steps are computed.

    Uses the paper's observation (2): which tokens change is strongly correlated between nearby steps.
    Score = ``squash(||u^s - u^s'|| / ||u^s'||)`` for the last two full steps ``s' < s``. Before the
    second full step there is no change to measure; the score is then ``squash(update_ratio)`` at the
    first full step (how much the block moves the token at all), a tclab choice.
    """

    name = "prev-change"
    needs = frozenset({"history"})

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        blocks = ctx.state.blocks
        if all(b.change is not None for b in blocks):
            r = torch.stack([b.change for b in blocks], dim=1)  # (B, L, N)
        else:
            r = torch.stack([b.ratio for b in blocks], dim=1)  # (B, L, N)
        return squash(r)


class RandomScorer(TokenScorer):
    """``random``: uniform random scores from a generator seeded with ``seed`` at every run start
    (so two identical runs choose the same tokens). A control: any useful scorer must beat it."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.reset_state()

    def reset_state(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.rand(ctx.shape, generator=self._gen).to(ctx.device)  # (B, L, N), drawn on CPU


class OracleScorer(TokenScorer):
    """``oracle``: the true ``update_change`` at this step, ``squash(||u_now - u_cached|| /
    ||u_cached||)``, i.e. exactly the error reusing each cached update would make.

    ``u_now`` comes from a full forward the engine runs before scoring (need ``"probe"``), along the
    fully computed path at this step. An upper bound for any scorer, **not deployable**: the probe
    costs a full step, so an oracle run is slower than full compute and its FLOPs include the probe
    (never report them as savings).
    """

    name = "oracle"
    needs = frozenset({"probe"})

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        r = torch.stack([relative_change(b.probe_u, b.u) for b in ctx.state.blocks], dim=1)  # (B, L, N)
        return squash(r)


class TocaScorer(TokenScorer):
    """``toca``: ToCa's token scores (Zou et al., "Accelerating Diffusion Transformers with Token-wise
    Feature Caching", arXiv 2410.05317), adapted to the class-conditional DiT.

    score = (attention_weight * a + age_weight * g) / (attention_weight + age_weight), then a cell bonus:
      - ``a``: attention the token *received* at the last full step (ToCa's self-attention influence:
        the column sum of the attention map, averaged over heads), divided by its max over tokens;
      - ``g = age / (age + 1)``: how long the token has been cached (ToCa's cache frequency): stale
        tokens are pulled back into computation;
      - in every ``cell x cell`` cell of the token grid the highest-scored token gets ``+cell_bonus``
        (ToCa's spatial uniformity); the total is divided by ``1 + cell_bonus`` to stay in [0, 1]. With
        the default bonus 1 every cell winner outranks every non-winner, so each 2x2 cell keeps at
        least one token whenever a block keeps at least N/4 tokens.

    Simplifications (tclab's): DiT has no cross-attention, so ToCa's cross-attention entropy term is
    dropped; attention is measured at full steps only (ToCa also refreshes it for tokens computed in
    cached steps), at the cost of an extra Q/K projection and ``QK^T`` per block in full steps (counted).
    """

    name = "toca"
    needs = frozenset({"attention", "age"})

    def __init__(self, attention_weight: float = 1.0, age_weight: float = 0.5, cell: int = 2,
                 cell_bonus: float = 1.0):
        if attention_weight < 0 or age_weight < 0 or attention_weight + age_weight <= 0:
            raise ValueError(f"toca: attention_weight and age_weight must be >= 0 and not both 0, got "
                             f"{attention_weight}, {age_weight}")
        if cell < 1 or cell_bonus < 0:
            raise ValueError(f"toca: cell must be >= 1 and cell_bonus >= 0, got cell={cell}, cell_bonus={cell_bonus}")
        self.attention_weight, self.age_weight = float(attention_weight), float(age_weight)
        self.cell, self.cell_bonus = int(cell), float(cell_bonus)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        st = ctx.state
        a = torch.stack([b.attention for b in st.blocks], dim=1).float()  # (B, L, N)
        a = a / a.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        age = torch.stack([b.age for b in st.blocks], dim=1).float()  # (B, L, N)
        g = age / (age + 1)
        s = (self.attention_weight * a + self.age_weight * g) / (self.attention_weight + self.age_weight)
        if self.cell_bonus > 0 and self.cell > 1:
            s = (s + self.cell_bonus * self._cell_winners(s, st.grid)) / (1 + self.cell_bonus)
        return s.clamp(0, 1)

    def _cell_winners(self, s: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """1.0 at the highest-scored token of every ``cell x cell`` cell of the grid, else 0. (B, L, N)"""
        B, L, N = s.shape
        H, W = grid
        c = self.cell
        Hp, Wp = -(-H // c) * c, -(-W // c) * c  # grid padded up to whole cells
        g = F.pad(s.reshape(B * L, 1, H, W), (0, Wp - W, 0, Hp - H), value=-1.0)  # (BL, 1, Hp, Wp)
        _, arg = F.max_pool2d(g, c, return_indices=True)  # (BL, 1, Hp/c, Wp/c), flat index into Hp*Wp
        win = torch.zeros(B * L, Hp * Wp, device=s.device, dtype=s.dtype)
        win.scatter_(1, arg.reshape(B * L, -1), 1.0)
        return win.reshape(B * L, Hp, Wp)[:, :H, :W].reshape(B, L, N)


def _row_scale(err: torch.Tensor) -> torch.Tensor:
    """(B, L, N) non-negative errors -> [0, 1) scores, one scale per row: ``squash(err / mean)``. One scale
    over all blocks keeps the errors comparable across blocks (what global selection ranks)."""
    return squash(err / err.flatten(1).mean(1).clamp_min(1e-12)[:, None, None])


class StalenessScorer(TokenScorer):
    """``staleness``: tokens whose cached update is expected to be most wrong now are computed.

    expected error of reuse = age x rate, per (row, block, token):
      - age = steps since the token was last computed (``s - steps[0]``);
      - rate = ``||u - u_older|| / (steps[0] - steps[1])``, how fast its update was changing between its
        last two computed values (need ``"trend"``). A token with one computed value so far (before its
        second) gets ``||u||`` as its rate: unknown change is taken as large, so it is computed early.

    Absolute (not relative) errors in the residual stream, one scale per row (``_row_scale``), so global
    selection compares blocks by what their reuse costs. With ``reuse="forecast"`` it still ranks by
    the error of verbatim reuse: the tokens that change fastest and have been unseen longest are those a
    forecast gets most wrong, too. Free at run time: a few elementwise ops per block.

    ``importance`` in [0, 1] mixes in a learned score ``w`` (the Cache Predictor, ``learned-static``):
    ``score = squash(err)^(1 - importance) * w^importance`` (``staleness-learned``: 0.5); ``path`` is
    the predictor file (default: the model's own, as ``learned-static`` finds it).
    """

    name = "staleness"
    needs = frozenset({"trend"})

    def __init__(self, importance: float = 0.0, learned: TokenScorer | None = None):
        if isinstance(importance, bool) or not isinstance(importance, (int, float)) or not 0 <= importance <= 1:
            raise ValueError(f"staleness: importance must be a number in [0, 1] (0 = age x rate alone, 1 = the "
                             f"learned score alone), got {importance!r}")
        if importance > 0 and learned is None:
            raise ValueError("staleness: importance > 0 needs the learned scorer to mix in")
        self.importance, self.learned = float(importance), learned

    def reset_state(self) -> None:
        if self.learned is not None:
            self.learned.reset_state()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        now = float(ctx.step.step)
        errs = []
        for b in ctx.state.blocks:
            u, older, (s0, s1) = b.u.float(), b.older[0].float(), b.steps[:2]
            known = torch.isfinite(s1)  # (B, N) a second computed value exists
            rate = torch.where(known, (u - older).norm(dim=-1) / torch.where(known, s0 - s1, 1.0),
                               u.norm(dim=-1))  # (B, N)
            errs.append((now - s0) * rate)
        s = _row_scale(torch.stack(errs, dim=1))  # (B, L, N)
        if self.importance > 0:
            w = self.learned.score(ctx).float().clamp(0, 1)
            s = s.pow(1 - self.importance) * w.pow(self.importance)
        return s.clamp(0, 1)


class OracleErrorScorer(TokenScorer):
    """``oracle-error``: the real upper bound of token choice (not deployable; see the module docstring).

    1. A full forward runs first (need ``"probe"``); each block's scores are the absolute error of the
       update that would be reused, ``||u_now - reused||`` (``state.reused_update``), on one scale per row:
       the per-block budget of the step follows from them under ``selection``.
    2. Along the cached path (need ``"path"``), each block then recomputes the true update of its *actual*
       input and keeps, within that budget, the tokens whose reuse errs most there.

    It costs the probe and every block's full computation on top of the cached step: slower than full
    compute, and its FLOPs include both (never report them as a saving).
    """

    name = "oracle-error"
    needs = frozenset({"probe", "path"})

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        st = ctx.state
        err = torch.stack([(b.probe_u.float() - st.reused_update(l, b.probe_x).float()).norm(dim=-1)
                           for l, b in enumerate(st.blocks)], dim=1)  # (B, L, N)
        return _row_scale(err)


# ---- registry: option name -> factory(config, **scorer_options) ----------------------------------

# The registry itself lives in the leaf module tclab.cache.registry (configs validate against it).
from .registry import SCORERS, available_scorers, register_scorer  # noqa: E402


def make_scorer(config: ScorerConfig, transformer=None) -> TokenScorer:
    """The scorer a config names (or the instance it holds), with its options checked. A factory that
    takes a ``transformer`` keyword gets the model the scorer is for (the learned predictors use it to
    find the predictor of *these* weights)."""
    if not isinstance(config.scorer, str):
        return config.scorer
    name = config.scorer
    factory = SCORERS.factory(name)   # imports the provider of a built-in name the first time
    opts = dict(config.scorer_options)
    target = getattr(factory, "options_of", factory)
    params = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [p for p in params if p not in ("config", "transformer")]
        bad = sorted(set(opts) - set(valid))
        if bad:
            raise ValueError(f"scorer {name!r} does not take option(s) {bad}; its options are {valid}")
    if "transformer" in opts:
        raise ValueError(f"scorer {name!r}: 'transformer' is not an option; the engine passes the model itself")
    if "transformer" in inspect.signature(factory).parameters:
        return factory(config, transformer=transformer, **opts)
    return factory(config, **opts)


def _options_of(cls: type) -> Callable[..., Any]:
    def factory(config, **opts):
        return cls(**opts)
    factory.options_of = cls  # what make_scorer checks scorer_options against
    return factory


register_scorer("prev-change", _options_of(PrevChangeScorer))
register_scorer("oracle", _options_of(OracleScorer))
register_scorer("toca", _options_of(TocaScorer))


def _random_factory(config, seed: int | None = None):
    return RandomScorer(seed=config.seed if seed is None else seed)


register_scorer("random", _random_factory)
register_scorer("oracle-error", _options_of(OracleErrorScorer))


def _staleness_factory(default_importance: float):
    def factory(config, importance: float = default_importance, path: str | None = None, *, transformer=None):
        """``scorer_options``: ``importance`` (weight of the learned score, 0..1) and ``path`` (its predictor
        file; default: the model's own ``learned-static``)."""
        learned = None
        if isinstance(importance, (int, float)) and not isinstance(importance, bool) and importance > 0:
            learned = SCORERS.factory("learned-static")(config, path=path, transformer=transformer)
        return StalenessScorer(importance=importance, learned=learned)
    return factory


register_scorer("staleness", _staleness_factory(0.0))
register_scorer("staleness-learned", _staleness_factory(0.5))
