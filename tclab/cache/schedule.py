"""When to refresh the cache: which sampling steps run in full (TokenCache, arXiv 2409.18523).

Every sampling step ``s = 0..S-1`` (0 = the first, noisiest step; these are step *indices*, never
scheduler timestep values ``t``) is either **full** (every block computes every token and the cache
is refreshed) or **cached** (blocks compute only the tokens that ``tclab.cache.select`` keeps and
reuse the rest). A schedule is a boolean array of shape ``(S,)``, ``True`` = full step. These are
pure numpy functions: no model, no state, the same answer every time.

The knobs (option names as in ``shared/docs/tokencache.md``, section 3 "When"):

- ``round-robin(K)`` -> :func:`round_robin_schedule`: a full step every ``interval = K`` steps
  (step ``s`` is full iff ``s % K == 0``); the schedule of FORA and of ToCa. **Larger K = faster**
  (about ``S / K`` full steps) but the cache grows staler between refreshes, so quality drops.
  ``K = 1`` is full compute.
- ``tprr(K1, K2, split)`` -> :func:`tprr_schedule`, **Two-Phase Round-Robin**, TokenCache v1's
  schedule and tclab's default: steps before ``s2 = ceil(split * S)`` use interval ``k1``, the rest
  interval ``k2``, and phase 2 opens with a full step at ``s2``. It lets one phase of the trajectory
  (where features change little) run with a long interval while the other refreshes often. The
  paper's summaries say the first phase uses the *longer* interval (``k1 > k2``); the redundancy
  notebook measures which phase actually changes less on a given model, so do not assume it.
- ``percentile(n)`` -> :func:`percentile_schedule`, TokenCache v2: ``n_full`` full steps placed at
  uniform quantiles of the cumulative per-step importance (e.g. the measured mean
  ``update_change`` per step), so refreshes crowd where the trajectory changes most. **Smaller n =
  faster.** Exact definition in the function's docstring.
- ``force_last = m`` (all kinds): the last ``m`` steps are full too. The final steps shape fine
  detail and a stale cache there shows directly in the image; ``m = 1..2`` costs little.

Step 0 is always full in every kind: nothing is cached before it.

``make_schedule(kind, num_steps, **params)`` dispatches by the option name, so configs can say
``{"kind": "tprr", "k1": 3, "k2": 2, "split": 0.5}``; unknown kinds or parameters raise.
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real
from typing import Callable

import numpy as np

# ``split * S`` is rounded to this many decimals before ``ceil`` so float noise such as
# 0.07 * 100 = 7.000000000000001 does not push the phase boundary one step late.
_SPLIT_DECIMALS = 9
# Absolute tolerance when comparing the normalised cumulative importance with a quantile k/n, so
# a quantile that the cumulative importance hits exactly (up to float round-off) counts as reached.
_QUANTILE_ATOL = 1e-12


# ---- validation helpers -------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}){hint}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{hint}")
    return int(value)


def _check_force_last(force_last, num_steps: int) -> int:
    m = _check_int("force_last", force_last, 0, "; it is the number of final steps forced full (0 = none)")
    if m > num_steps:
        raise ValueError(f"force_last={m} exceeds num_steps={num_steps}; pass at most num_steps "
                         f"(force_last=num_steps makes every step full)")
    return m


def _finish(full: np.ndarray, force_last: int) -> np.ndarray:
    """Apply the rules every kind shares: step 0 full, the last ``force_last`` steps full."""
    full[0] = True
    if force_last:
        full[-force_last:] = True
    return full


# ---- the schedules ------------------------------------------------------------------------------

def round_robin_schedule(num_steps: int, interval: int, force_last: int = 0) -> np.ndarray:
    """``round-robin(K)``: step ``s`` is full iff ``s % interval == 0``. Returns bool ``(S,)``.

    >>> round_robin_schedule(7, 3).nonzero()[0].tolist()
    [0, 3, 6]
    """
    S = _check_int("num_steps", num_steps, 1)
    K = _check_int("interval", interval, 1, "; interval=1 is full compute, larger is faster")
    m = _check_force_last(force_last, S)
    full = np.arange(S) % K == 0  # (S,)
    return _finish(full, m)


def tprr_schedule(num_steps: int, k1: int, k2: int, split: float, force_last: int = 0) -> np.ndarray:
    """``tprr(K1, K2, split)``, Two-Phase Round-Robin. Returns bool ``(S,)``.

    Phase 1 is steps ``s < s2`` with ``s2 = ceil(split * S)``: full iff ``s % k1 == 0``.
    Phase 2 is steps ``s >= s2``: full iff ``(s - s2) % k2 == 0``, so its first step ``s2`` is full.
    ``split = 0`` is round-robin(k2) throughout, ``split = 1`` round-robin(k1).

    >>> tprr_schedule(10, 3, 2, 0.5).nonzero()[0].tolist()   # s2 = 5
    [0, 3, 5, 7, 9]
    """
    S = _check_int("num_steps", num_steps, 1)
    K1 = _check_int("k1", k1, 1, "; it is the phase-1 interval (1 = every step full)")
    K2 = _check_int("k2", k2, 1, "; it is the phase-2 interval (1 = every step full)")
    if isinstance(split, bool) or not isinstance(split, Real) or not math.isfinite(split) or not 0 <= split <= 1:
        raise ValueError(f"split must be a number in [0, 1] (the fraction of steps in phase 1), got {split!r}")
    m = _check_force_last(force_last, S)
    s2 = math.ceil(round(float(split) * S, _SPLIT_DECIMALS))  # first step of phase 2
    s = np.arange(S)  # (S,)
    full = np.where(s < s2, s % K1 == 0, (s - s2) % K2 == 0)  # (S,)
    return _finish(full, m)


def percentile_schedule(step_importance, n_full: int, force_last: int = 0) -> np.ndarray:
    """``percentile(n)`` (TokenCache v2): ``n_full`` full steps at uniform quantiles of the cumulative
    per-step importance. Returns bool ``(S,)`` with ``S = len(step_importance)``.

    Precise definition. Let ``w[s] >= 0`` be the importance of step ``s`` and
    ``c[s] = sum(w[:s]) / sum(w)`` the fraction of all importance *already spent before* step ``s``
    (so ``c[0] = 0``, non-decreasing, ``c[S-1] <= 1``). For ``k = 0..n-1`` the target of quantile
    ``q_k = k / n`` is the first step ``s`` with ``c[s] >= q_k`` (compared with an absolute
    tolerance of 1e-12; ``S - 1`` if no step reaches it, which happens when the last step alone
    holds more than ``1 - q_k`` of the importance). ``q_0 = 0`` always targets step 0.
    Targets are non-decreasing; they become distinct steps ``a_k`` by
    ``a_0 = 0`` and ``a_k = min(max(target_k, a_{k-1} + 1), S - n + k)``: a collision moves to the
    next free step, and a run of collisions at the end is packed backwards against the last step,
    so there are always exactly ``n`` full steps (before ``force_last``, which adds the last ``m``
    steps on top; the count can then exceed ``n``).

    Read it as: a full step is placed where each ``1/n``-th slice of the importance begins. With
    uniform importance and ``n = S / K`` it equals ``round-robin(K)``.

    >>> percentile_schedule([4, 1, 1, 1, 1], 3).nonzero()[0].tolist()  # c = [0, .5, .625, .75, .875]
    [0, 1, 3]
    """
    w = np.asarray(step_importance, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"step_importance must be a non-empty 1-D sequence with one value per sampling "
                         f"step, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"step_importance must be finite; steps {np.flatnonzero(~np.isfinite(w)).tolist()} "
                         f"are NaN or inf (fill missing steps, e.g. step 0, with 0 or a measured value)")
    if np.any(w < 0):
        raise ValueError(f"step_importance must be non-negative; steps {np.flatnonzero(w < 0).tolist()} are < 0 "
                         f"(use a magnitude such as the mean update_change per step)")
    total = w.sum()
    if total <= 0:
        raise ValueError("step_importance sums to 0, so it defines no quantiles; pass np.ones(num_steps) "
                         "for evenly spaced full steps")
    S = w.size
    n = _check_int("n_full", n_full, 1, "; it is the number of full steps (1 = only step 0)")
    if n > S:
        raise ValueError(f"n_full={n} exceeds the number of steps {S}; pass n_full <= {S}")
    m = _check_force_last(force_last, S)

    spent_before = np.concatenate([[0.0], np.cumsum(w)[:-1]]) / total  # (S,) c[s], non-decreasing
    quantiles = np.arange(n) / n  # (n,) q_k
    # first s with c[s] >= q_k (searchsorted on the sorted c); S when none reaches it -> clamp to S-1
    targets = np.minimum(np.searchsorted(spent_before, quantiles - _QUANTILE_ATOL, side="left"), S - 1)
    full = np.zeros(S, dtype=bool)  # (S,)
    prev = -1
    for k, target in enumerate(targets.tolist()):
        prev = min(max(target, prev + 1), S - n + k)  # next free step, packed against the end
        full[prev] = True
    return _finish(full, m)


# ---- dispatch by option name --------------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "round-robin": round_robin_schedule,
    "tprr": tprr_schedule,
    "percentile": percentile_schedule,
}


def register_schedule(name: str, fn: Callable[..., np.ndarray]) -> None:
    """Make ``TokenCacheConfig(schedule=name)`` and ``make_schedule(name, S)`` use ``fn(num_steps,
    force_last=0) -> (S,) bool`` (True = full step). Bind other knobs with ``functools.partial``;
    ``SCHEDULES`` is the one list configs validate against."""
    if not isinstance(name, str) or not name.strip() or not callable(fn):
        raise ValueError(f"register_schedule(name, fn): a non-empty name and a callable, got {name!r}, {fn!r}")
    SCHEDULES[name] = fn


def make_schedule(kind: str, num_steps: int, **params) -> np.ndarray:
    """The schedule named ``kind`` (``"round-robin"``, ``"tprr"``, ``"percentile"``) over
    ``num_steps`` steps; ``params`` are that function's remaining arguments, by name:

    - ``round-robin``: ``interval``, optional ``force_last``
    - ``tprr``: ``k1``, ``k2``, ``split``, optional ``force_last``
    - ``percentile``: ``step_importance`` (length ``num_steps``), ``n_full``, optional ``force_last``

    Unknown kinds, unknown parameters and missing parameters raise ``ValueError`` naming the valid ones.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {list(SCHEDULES)}")
    S = _check_int("num_steps", num_steps, 1)
    fn = SCHEDULES[kind]
    sig = inspect.signature(fn).parameters
    accepted = [p for p in sig if p != "num_steps"]
    required = [p for p in accepted if sig[p].default is inspect.Parameter.empty]
    unknown = sorted(set(params) - set(accepted))
    missing = [p for p in required if p not in params]
    if unknown or missing:
        problems = "; ".join(f"{what} {names}" for what, names in
                             (("unknown parameters", unknown), ("missing parameters", missing)) if names)
        raise ValueError(f"schedule {kind!r}: {problems}. It takes {accepted} "
                         f"(required: {required}); num_steps is passed separately")
    if kind == "percentile":
        w = np.asarray(params["step_importance"])
        if w.ndim == 1 and w.size != S:  # other shapes: percentile_schedule says what is wrong
            raise ValueError(f"step_importance has {w.size} values but num_steps={S}; "
                             f"pass one importance value per sampling step")
        return fn(**params)
    return fn(S, **params)
