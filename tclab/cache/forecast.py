"""Forecasting reuse: extrapolate a token's cached update to the current step (``reuse="forecast"``).

TokenCache reuses a token's last computed update verbatim, so in a cached step it is stale by as many
steps as have passed since the token was computed. TaylorSeer (Liu et al., arXiv 2503.06923) instead
extrapolates a *block's* features from their finite differences at the last full steps. tclab applies
the idea per token: each token keeps its last ``order + 1`` computed updates and the steps ``s`` they
were computed at (tokens computed in a cached step refresh their own history, so the steps differ
from token to token), and a token that is not computed now gets the Newton interpolation polynomial
through those points, evaluated at the current step:

    order 1:  u_hat = u0 + (s - s0) * f[s0, s1]
    order 2:  u_hat = order 1 + (s - s0) (s - s1) * f[s0, s1, s2]

with ``f[s0, s1] = (u0 - u1) / (s0 - s1)`` and ``f[s0, s1, s2] = (f[s0, s1] - f[s1, s2]) / (s0 - s2)``
(``u0`` the most recent value). It is exact when the update is a polynomial of that order in the
step. A token that has fewer computed values than the order needs uses the highest order it has
(order 0 is plain reuse). Steps are step *indices* (0 = first), never timestep values.

Pure tensor functions; the engine (``tclab.cache.hooks``) holds the history and calls them.
"""

from __future__ import annotations

from typing import Sequence

import torch


def newton_forecast(values: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], at: float) -> torch.Tensor:
    """Extrapolate per token to step ``at``.

    Args:
        values: ``order + 1`` tensors (B, N, C), the most recent first (``u0, u1, ...``).
        steps: as many tensors (B, N) of the steps each value was computed at, strictly decreasing along
            the list where known; NaN where a token has no such value yet (its order drops).
        at: the step to forecast (> every known step).

    Returns:
        (B, N, C) the forecast; equals ``values[0]`` for a token with no older value.
    """
    if len(values) != len(steps) or not values:
        raise ValueError(f"newton_forecast needs one step tensor per value, got {len(values)} values and "
                         f"{len(steps)} step tensors")
    u0 = values[0]
    out = u0.float()
    if len(values) == 1:
        return out.to(u0.dtype)
    s0 = steps[0].float()
    # divided differences of the known points; an unknown point's difference is masked to 0 below
    # (steps are replaced by harmless values first, so no NaN reaches the arithmetic)
    known = [torch.isfinite(s) for s in steps]  # (B, N) each
    safe = [torch.where(k, s.float(), s0 - 1 - i) for i, (k, s) in enumerate(zip(known, steps))]
    diff1 = [(values[i].float() - values[i + 1].float()) / (safe[i] - safe[i + 1])[..., None]
             for i in range(len(values) - 1)]  # f[s_i, s_{i+1}], (B, N, C) each
    weight = (at - safe[0])[..., None]  # (B, N, 1): (s - s0)
    ok = known[0] & known[1]
    out = out + torch.where(ok[..., None], weight * diff1[0], 0.0)
    if len(values) > 2:
        diff2 = (diff1[0] - diff1[1]) / (safe[0] - safe[2])[..., None]  # f[s0, s1, s2]
        weight = weight * (at - safe[1])[..., None]  # (s - s0)(s - s1)
        ok = ok & known[2]
        out = out + torch.where(ok[..., None], weight * diff2, 0.0)
    if len(values) > 3:
        raise ValueError(f"newton_forecast supports order 1 and 2, got {len(values) - 1}")
    return out.to(u0.dtype)


def make_room(values: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Age the history of the (row * N + token) pairs ``flat`` (T,) by one place, in place: each older
    entry receives the one before it (the oldest is dropped), so the caller can then write a newly
    computed value into ``values[0]`` / ``steps[0]`` at those pairs. ``values`` (B, N, C) and ``steps``
    (B, N) are the history, most recent first (a cached step's computed tokens; a full step, which
    refreshes every token, just rotates the lists)."""
    B, N, C = values[0].shape
    for j in range(len(values) - 1, 0, -1):
        values[j].view(B * N, C).index_copy_(0, flat, values[j - 1].reshape(B * N, C).index_select(0, flat))
        steps[j].view(B * N).index_copy_(0, flat, steps[j - 1].reshape(B * N).index_select(0, flat))
