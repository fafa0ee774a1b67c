"""What to cache and when: ``TokenCacheConfig`` (TokenCache, arXiv 2409.18523).

One dataclass holds every knob of cached execution, named as in ``shared/docs/tokencache.md``
(sections 2-4). ``apply_token_cache(transformer, config)`` in :mod:`tclab.cache.hooks` reads it.
Every field is validated when the config is built; ``TokenCacheConfig.from_dict`` refuses keys it
does not know (a misspelt knob must not silently fall back to its default).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any, Sequence

from .registry import SCORERS
from .schedule import SCHEDULES  # the one list of schedules (register_schedule adds to it)

KV_MODES = ("all", "kept")
REUSE_MODES = ("update", "output", "forecast")
FORECAST_ORDERS = (1, 2)
FORECAST_HISTORIES = ("computed", "full")
SELECTIONS = ("global", "uniform", "adaptive")


def _choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}={value!r} is not a valid choice{hint}; choose one of {list(choices)}")


def _int(name: str, value, minimum: int, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}){what}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{what}")


def _unit(name: str, value, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}{what}")


@dataclass
class TokenCacheConfig:
    r"""Configuration of TokenCache-style cached execution of a DiT (Lou et al., "Token Caching for
    Diffusion Transformer Acceleration", arXiv 2409.18523; spec: ``shared/docs/tokencache.md``).

    Every sampling step is either **full** (every block computes every token and refreshes its cache)
    or **cached**: block ``l`` then computes only a kept set of tokens ``K_l`` and reuses its cached
    residual update ``u_l`` for the others. Three decisions make a cached step: *which tokens*
    (``scorer``), *how the budget is spread over blocks* (``rho``, ``selection``, forced blocks) and
    *when* steps are full (``schedule``). Steps are indices ``s`` (0 = first, noisiest), never timestep
    values ``t``.

    Args:
        rho (`float`, defaults to `0.5`):
            Keep ratio in cached steps: the fraction of (block, token) pairs computed. **Lower = faster**
            and staler. ``rho=1`` computes everything (only useful as a correctness check), ``rho=0``
            skips every non-forced block (block-level caching, see :func:`fora_config`).
        kv (`str`, defaults to `"all"`):
            Where a kept token's attention reads keys/values. ``"all"``: K/V projections of *all* current
            tokens (more accurate, but K/V cost stays full: the FLOP saving is smaller). ``"kept"``: only
            the kept tokens (pure token pruning, fastest).
        reuse (`str`, defaults to `"update"`):
            What a token that is not computed gets. ``"update"``: ``x_{l+1}[i] = x_l[i] + u_cached[i]``
            (the cached residual rides on the current input). ``"output"``: ``x_{l+1}[i] =
            x_{l+1,cached}[i]`` (the block's last computed output, ignoring the current input).
            ``"forecast"`` (tclab's, beyond the paper): ``x_{l+1}[i] = x_l[i] + u_hat[i]``, where ``u_hat``
            extrapolates the token's update to this step from its last computed updates and the steps they
            were computed at (Newton's divided differences of order ``forecast_order``: TaylorSeer's idea,
            arXiv 2503.06923, per token rather than per block). A token computed in a cached step refreshes
            its own history, so every token's forecast starts from its freshest values. A token with fewer
            than ``forecast_order + 1`` computed values falls back to the lower order it has (order 0 =
            ``"update"``). Costs ``forecast_order`` more (B, N, C) tensors per block (in ``cache_bytes``).
        forecast_order (`int`, defaults to `1`): ``reuse="forecast"`` only: 1 = linear extrapolation from
            the last two computed updates, 2 = quadratic from the last three. Higher order follows curved
            trajectories but amplifies noise when the history is old; 1 is the safer choice.
        forecast_history (`str`, defaults to `"computed"`): ``reuse="forecast"`` only: which computed
            updates enter a token's history. ``"computed"``: every one, those of cached steps too (the
            freshest values). ``"full"``: only full steps' (TaylorSeer's rule): a token computed in a
            cached step uses its new update there, but its forecast keeps extrapolating from full steps,
            whose points are further apart and were computed on the exact path.
        selection (`str`, defaults to `"global"`):
            How the budget is spread over blocks (``tclab.cache.select``). ``"global"`` (v2): top
            ``rho*L*N`` scores over all pairs of the sample. ``"uniform"``: every block keeps its top
            ``rho`` tokens. ``"adaptive"`` (v1): whole blocks by mean score, then cached blocks.
        full_first_blocks, full_last_blocks (`int`, default `0`):
            The first / last k blocks always compute every token (their pairs count in the budget).
        schedule (`str`, defaults to `"tprr"`):
            Which steps are full (``tclab.cache.schedule``). ``"tprr"``: Two-Phase Round-Robin, interval
            ``k1`` before ``split * S`` and ``k2`` after. ``"round-robin"``: a full step every
            ``interval`` steps. ``"percentile"``: ``n_full`` full steps at quantiles of
            ``step_importance``. **Longer intervals / fewer full steps = faster**, staler. Step 0 is
            always full.
        interval (`int`, defaults to `2`): ``round-robin`` interval K.
        k1, k2 (`int`, default `3`, `2`), split (`float`, default `0.5`): ``tprr`` parameters. The paper's
            summaries say the first phase uses the longer interval (k1 > k2); the redundancy notebook
            measures which phase really changes less.
        n_full (`int`, defaults to `20`): ``percentile``: number of full steps.
        step_importance (`list[float]`, optional): ``percentile``: importance of each step (e.g. the mean
            measured ``update_change``), one value per sampling step. Required for ``percentile``.
        force_last_steps (`int`, defaults to `0`): the last m steps are full too.
        scorer (`str` or `TokenScorer`, defaults to `"prev-change"`):
            Token scores ``(B, L, N)`` in [0, 1], high = compute (``tclab.cache.scorers``). Heuristics:
            ``"prev-change"`` (relative change of each token's update between the last two full steps;
            the default until the learned predictor exists), ``"random"`` (seeded), ``"oracle"`` (the true
            ``update_change`` now: it runs a full forward first, so it is an upper bound on quality, not a
            speed-up), ``"toca"`` (ToCa, arXiv 2410.05317). ``"learned-static"`` / ``"learned-dynamic"``
            are the spec's Cache Predictor, available once registered. A ``TokenScorer`` instance is used
            as given (the pluggable interface).
        scorer_options (`dict`): keyword arguments for the named scorer's constructor (e.g. ToCa's
            ``age_weight``); unknown keys are refused when the cache is applied.
        seed (`int`, defaults to `0`): seed of the ``"random"`` scorer (re-seeded at the start of every run,
            so runs repeat).
        num_steps (`int`, optional): number of sampling steps. Inside ``tclab.sampling.sample`` it is read
            from the step context and this is ignored. Inside diffusers' ``DiTPipeline`` (no step context)
            the hook counts transformer calls; give the pipeline's ``num_inference_steps`` here, or leave
            it ``None`` to infer it from the first two timestep values (exact for evenly spaced timesteps
            ending at 0, e.g. DDIM's default ``"leading"`` spacing; a warning says so).
        enabled (`bool`, defaults to `True`): ``False`` leaves the transformer untouched (bit-identical
            outputs): handy to switch caching off from the same config file.
        static_shapes (`bool`, defaults to `False`): tclab's option (spec section 6, "Static shapes";
            ``tclab.cache.static``). ``True``: in a cached step every row keeps the *same* number of tokens
            ``k_l`` in block ``l`` (its own top-``k_l`` by score), fixed for the whole run, so shapes never
            change between cached steps: no padding, per-block plans built on the device with no host sync,
            and ``tclab.cache.static.compile_transformer`` can capture a cached step as one graph. With
            ``selection="uniform"`` this changes nothing but the speed (uniform already keeps equal counts).
            With ``"global"`` / ``"adaptive"`` it is an approximation: the counts come from the rule applied
            once per run to the row mean of the first cached step's scores, so rows and later steps share
            that spread over blocks (**faster, slightly lower quality** than per-row counts). A step-static
            scorer (``learned-static``) is scored for the whole run at its first cached step, so later
            cached steps do no scoring and no plan building at all.

    Example:
        >>> from tclab.cache import TokenCacheConfig, apply_token_cache
        >>> state = apply_token_cache(model.transformer, TokenCacheConfig(rho=0.25, kv="kept"))
        >>> sample(model, labels, SampleConfig(num_steps=50))
        >>> state.kept_fraction()    # per step, for accounting
    """

    rho: float = 0.5
    kv: str = "all"
    reuse: str = "update"
    forecast_order: int = 1
    forecast_history: str = "computed"
    selection: str = "global"
    full_first_blocks: int = 0
    full_last_blocks: int = 0
    schedule: str = "tprr"
    interval: int = 2
    k1: int = 3
    k2: int = 2
    split: float = 0.5
    n_full: int = 20
    step_importance: list | None = None
    force_last_steps: int = 0
    scorer: Any = "prev-change"  # str | TokenScorer
    scorer_options: dict = field(default_factory=dict)
    seed: int = 0
    num_steps: int | None = None
    enabled: bool = True
    static_shapes: bool = False

    def __post_init__(self) -> None:
        _unit("rho", self.rho, " (fraction of block-token pairs computed in a cached step)")
        _choice("kv", self.kv, KV_MODES)
        _choice("reuse", self.reuse, REUSE_MODES)
        if isinstance(self.forecast_order, bool) or self.forecast_order not in FORECAST_ORDERS:
            raise ValueError(f"forecast_order must be one of {list(FORECAST_ORDERS)} (the order of the per-token "
                             f"extrapolation of reuse='forecast'), got {self.forecast_order!r}")
        _choice("forecast_history", self.forecast_history, FORECAST_HISTORIES)
        _choice("selection", self.selection, SELECTIONS)
        _int("full_first_blocks", self.full_first_blocks, 0, " (blocks at the start always computed)")
        _int("full_last_blocks", self.full_last_blocks, 0, " (blocks at the end always computed)")
        _choice("schedule", self.schedule, list(SCHEDULES))
        _int("interval", self.interval, 1, " (round-robin: a full step every `interval` steps)")
        _int("k1", self.k1, 1, " (tprr: phase-1 interval)")
        _int("k2", self.k2, 1, " (tprr: phase-2 interval)")
        _unit("split", self.split, " (tprr: fraction of the steps in phase 1)")
        _int("n_full", self.n_full, 1, " (percentile: number of full steps)")
        _int("force_last_steps", self.force_last_steps, 0, " (the last m steps are forced full)")
        _int("seed", self.seed, 0)
        if self.num_steps is not None:
            _int("num_steps", self.num_steps, 1, " (None = read from tclab's sampler or inferred)")
        if not isinstance(self.enabled, bool):
            raise TypeError(f"enabled must be True or False, got {self.enabled!r}")
        if not isinstance(self.static_shapes, bool):
            raise TypeError(f"static_shapes must be True or False (equal kept-token counts in every row of a cached "
                            f"step, for sync-free plans and torch.compile), got {self.static_shapes!r}")
        if self.step_importance is not None:
            try:
                w = [float(v) for v in self.step_importance]
            except (TypeError, ValueError):
                raise ValueError(f"step_importance must be a sequence of numbers (one per step), "
                                 f"got {self.step_importance!r}") from None
            if not w or any(not math.isfinite(v) or v < 0 for v in w):
                raise ValueError("step_importance must be a non-empty list of finite values >= 0 (one per "
                                 "sampling step, e.g. the mean update_change of each step)")
            self.step_importance = w
        if self.schedule == "percentile" and self.step_importance is None:
            raise ValueError("schedule='percentile' needs step_importance (one value per sampling step, e.g. the "
                             "mean update_change per step from the redundancy notebook); or use 'tprr'")
        if not isinstance(self.scorer_options, dict):
            raise TypeError(f"scorer_options must be a dict of keyword arguments, got {self.scorer_options!r}")
        # scorer names come from the one registry (tclab.cache.registry): a registered scorer is valid here
        if isinstance(self.scorer, str):
            _choice("scorer", self.scorer, SCORERS.names())
        elif not (callable(getattr(self.scorer, "score", None)) and hasattr(self.scorer, "needs")):
            raise TypeError(f"scorer must be one of {SCORERS.names()} or a TokenScorer instance (with .score() and "
                            f".needs), got {self.scorer!r}")

    # ---- helpers ---------------------------------------------------------------------------------

    @property
    def scorer_name(self) -> str:
        return self.scorer if isinstance(self.scorer, str) else getattr(self.scorer, "name", type(self.scorer).__name__)

    @property
    def skips_all_blocks(self) -> bool:
        """True when a cached step computes nothing (``rho=0``, no forced blocks): FORA's case. No
        scores are needed then, so the scorer is not called."""
        return self.rho == 0 and self.full_first_blocks == 0 and self.full_last_blocks == 0

    def schedule_params(self) -> dict:
        """Keyword arguments for ``tclab.cache.schedule.make_schedule(self.schedule, S, **params)``."""
        if self.schedule == "round-robin":
            p = {"interval": self.interval}
        elif self.schedule == "tprr":
            p = {"k1": self.k1, "k2": self.k2, "split": self.split}
        elif self.schedule == "percentile":
            p = {"step_importance": self.step_importance, "n_full": self.n_full}
        else:  # a registered schedule: its knobs are bound into it (register_schedule)
            p = {}
        return {**p, "force_last": self.force_last_steps}

    def to_dict(self) -> dict:
        """Plain values (a scorer instance is recorded by its name)."""
        d = asdict(self) if isinstance(self.scorer, str) else {
            f.name: getattr(self, f.name) for f in fields(self)}
        d["scorer"] = self.scorer_name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenCacheConfig":
        """Build from a plain dict (a YAML preset, notebook parameters); unknown keys are refused."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown TokenCacheConfig key(s): {', '.join(hints)}; valid keys are {names}")
        return cls(**d)


def fora_config(interval: int = 3, **overrides) -> TokenCacheConfig:
    """FORA (Selvaraju et al., arXiv 2407.01425) as a special case of TokenCache: a full step every
    ``interval`` steps (round-robin) and, in cached steps, every block reuses its cached update
    (``rho=0``, no forced blocks, ``reuse="update"``): no block runs at all. ``overrides`` set other
    fields (e.g. ``force_last_steps``)."""
    base = dict(rho=0.0, schedule="round-robin", interval=interval, reuse="update", selection="uniform",
                full_first_blocks=0, full_last_blocks=0, scorer="random")
    return TokenCacheConfig(**{**base, **overrides})
