"""Train the Cache Predictor on a frozen DiT (TokenCache, arXiv 2409.18523; spec section 3).

The objective of ``shared/docs/tokencache.md`` ("Which tokens", training):

1. **Data**: trajectories of the model itself, sampled with tclab's own sampler at the settings the
   cache will run at (``num_steps``, ``scheduler``, ``guidance_scale``; every CFG row, conditional and
   unconditional, is a trajectory of its own), and optionally SDEdit traces of an in-house image folder
   (``images``). For every step we keep the transformer's input, timestep, label and full output
   (:func:`collect_trajectories`; a few MB for the embedded model).
2. **A training pair** (s - g, s), ``g = 1`` by default (adjacent steps, as the spec says): step s - g is
   run fully and each block's residual update ``u_l`` is kept (the cache); step s is run with every
   block's output blended per token (:func:`forward_blended`)

       x_{l+1} = x_l + w * u_l(x_l) + (1 - w) * u_l(cached from s - g),   w = sigmoid(theta)[b, l, i]

   which is the engine's ``reuse="update"`` with a soft keep mask (with a hard 0/1 mask and
   ``kv="all"`` it *is* the engine's cached step).
3. **Loss** (tclab's choices are the defaults; the alternatives are knobs)::

       loss = rel_mse + lambda * mean(w)
       rel_mse = MSE(out_blended, out_full) / MSE(out_all_cached, out_full)   (per row, then averaged)

   The MSE is on the noise-prediction channels (learned-sigma channels are not used by the sampler).
   Dividing by the error of caching *every* token (``relative=True``) puts every step and every model
   on one scale (0 = as good as computing everything, 1 = as bad as caching everything), so one
   ``lambda`` means the same everywhere: at ``lambda = 1`` a uniform score settles near w = 0.5, larger
   ``lambda`` = fewer tokens. ``penalty="target"`` replaces ``lambda * mean(w)`` by
   ``lambda * (mean(w) - target_ratio)^2`` (the spec's target-ratio alternative). Only the ranking of
   the scores matters to the engine (it keeps the top ``rho``), so ``lambda`` mainly sets how hard the
   predictor has to separate tokens.
4. **Rollout training** (``rollout = k >= 1``, spec section 6; :func:`compute_rollout_loss`): instead of one
   pair, a *window*: full step ``s0`` fills the cache, then the cached steps ``s0 + 1 .. s0 + k`` run in turn,
   each blended with the *current* cache, which evolves as the engine's does (a token computed in a cached
   step refreshes its cached update: ``cache_l <- w * u_l(now) + (1 - w) * cache_l``). The loss is the mean
   over the window's steps of the relative MSE (each step normalised by its own all-cached error) plus
   ``lambda`` times the penalty, so the error that builds up as the cache grows stale is what is minimised.
   With ``schedule`` the windows are exactly the engine's: they start at the schedule's full steps and end
   before the next one (:func:`rollout_windows`).

The DiT is frozen (its parameters get no gradient and are restored as they were); only the predictor
learns (AdamW, constant learning rate). Runs are deterministic for a seed (one generator draws the
pairs), checkpointed every ``checkpoint_every`` steps as tensors only (``torch.load(weights_only=True)``)
and ``resume=True`` continues exactly where a run stopped (same result as an uninterrupted run). A tqdm
bar shows progress; the loss curve is saved next to the predictor (``.loss.csv``, ``.loss.png``).

Defaults train on the embedded ``shapes-dit`` in a few minutes on one CPU thread::

    tclab train-predictor --kind both          # retrains both shipped predictors
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..anatomy import embed_tokens, output_head
from ..models import NULL_CLASS, LoadedDiT, PixelSpaceVAE, default_scheduler_config
from .predictor import (
    KINDS,
    CachePredictor,
    make_predictor,
    model_signature,
    weights_fingerprint,
)
from .schedule import make_schedule

PENALTIES = ("mean", "target")
EPS = 1e-12
# Fields that do not change what a run computes step by step (a resumed run may change them).
_RUN_ONLY_FIELDS = ("steps", "checkpoint_every", "out", "eval_pairs", "max_seconds")
# Fields added after checkpoints existed: left out of the run key while at these defaults, so a checkpoint
# written before they existed still resumes (and the key of a default run is what it always was).
_KEY_DEFAULTS = {"rollout": 0, "schedule": None}
# Fields that decide the trajectories (a saved trajectory set is reused only if these match).
_DATA_FIELDS = ("num_steps", "scheduler", "guidance_scale", "num_samples", "images", "labels", "num_images",
                "sdedit_strength", "seed")


@dataclass
class PredictorTrainConfig:
    """How to train a Cache Predictor (TokenCache, arXiv 2409.18523; ``shared/docs/tokencache.md`` s.3).
    The defaults train on the embedded ``shapes-dit`` in a few minutes on one CPU thread.

    Args:
        kind (`str`, defaults to `"learned-static"`): ``"learned-static"`` (scores from step, block and
            token only: free at run time) or ``"learned-dynamic"`` (a small network on the current tokens:
            adapts to the image, costs a little at every cached step). See :mod:`tclab.cache.predictor`.
        num_steps (`int`, defaults to `50`): sampling steps of the training trajectories. Train at the step
            count you will sample with: the staleness of a cached update grows with the gap between steps.
        scheduler (`str`, defaults to `"ddim"`), guidance_scale (`float`, defaults to `4.0`): as in
            ``SampleConfig``; match the runs the cache will be used in (CFG's two halves are both learned).
        num_samples (`int`, defaults to `6`): trajectories sampled from noise (labels cycle over the
            classes the image folder maps to, else over the model's classes; with CFG each gives two rows).
            More = more varied data, slower collection.
        images (`str`, optional): an in-house image folder; adds SDEdit traces of ``num_images`` of its
            images (``sdedit_strength`` of the trajectory), so the predictor also sees real content.
        labels (defaults to `"auto"`): how the folder's classes map onto the model's
            (:func:`tclab.labels.resolve_labels`: ``"auto"``, ``"unconditional"``, a mapping or a file).
        num_images (`int`, defaults to `6`), sdedit_strength (`float`, defaults to `0.6`): see ``images``.
        steps (`int`, defaults to `300`): optimiser steps. Loss flattens after a few hundred on shapes-dit.
        batch_size (`int`, defaults to `4`): training pairs (row, step) per optimiser step; each costs
            one no-grad and one forward+backward pass of the DiT. With ``rollout`` it counts windows (each about
            ``k`` pairs' cost).
        lr (`float`, defaults to `3e-3`): AdamW learning rate (constant after a 10-step warm-up).
        lam (`float`, defaults to `1.0`): the spec's ``lambda``, weight of the compute penalty. **Higher =
            fewer tokens kept** (lower mean w); with ``relative=True`` 1.0 balances near w = 0.5.
        penalty (`str`, defaults to `"mean"`): ``"mean"``: ``lambda * mean(w)`` (the spec's); ``"target"``:
            ``lambda * (mean(w) - target_ratio)^2`` (pins the mean score; the spec's alternative).
        target_ratio (`float`, defaults to `0.5`): the mean score ``penalty="target"`` aims at (e.g. ``rho``).
        relative (`bool`, defaults to `True`): divide each row's MSE by the MSE of caching every token
            (see the module docstring); ``False`` uses the raw MSE (then ``lambda`` depends on the model).
        max_gap (`int`, defaults to `1`): pairs are (s - g, s) with g drawn from 1..max_gap. 1 = adjacent
            steps (the spec). The engine's default schedule (``tprr`` k1=3) reuses a full step's cache for
            up to 2 following steps: ``max_gap=3`` trains for that staleness too. One-step pairs only
            (``rollout=0``); a rollout window models staleness itself.
        rollout (`int`, defaults to `0`): ``0`` = one-step pairs (the spec's objective, unchanged). ``k >= 1`` =
            rollout training (module docstring, item 4): windows of up to ``k`` cached steps after a full step,
            the cache evolving across the window as in the engine, so the predictor learns which tokens keep
            the *accumulated* error down. **Set it to the longest run of cached steps the schedule has** (TPRR(6,
            4): 5); larger = the staleness of later cached steps is trained too, but each optimiser step costs
            about ``k`` one-step pairs' time. ``batch_size`` then counts windows.
        schedule (`dict`, optional): the schedule the cache will run with, as ``tclab.cache.schedule.
            make_schedule`` takes it: ``{"kind": "tprr", "k1": 6, "k2": 4, "split": 0.5}`` (``"round-robin"``
            with ``interval``; optional ``force_last``). Needs ``rollout >= 1``. Windows then start at the
            schedule's full steps (made over each trajectory's own step count: ``num_steps``, or the SDEdit
            traces' fewer steps, as the engine makes it) and span the cached steps up to the next full step,
            at most ``rollout``: exactly the windows the engine will run. ``None``: windows of exactly
            ``rollout`` cached steps start at every step (a predictor for any schedule).
        seed (`int`, defaults to `0`): fixes trajectories, predictor initialisation and pair (window) order.
        max_seconds (`float`, optional): a training-time budget: stop after the optimiser step at which
            ``max_seconds`` of training (the optimiser loop, summed over resumed parts; collecting the
            trajectories is not counted) have passed, even before ``steps`` (which stays an upper bound). It
            changes when a run stops, never what a step computes (for equal-time comparisons).
        checkpoint_every (`int`, defaults to `50`): optimiser steps between resumable checkpoints.
        eval_pairs (`int`, defaults to `16`): after training, pairs on which hard top-``rho`` masks from the
            predictor are compared with random masks (recorded in the file; 0 skips it). One-step pairs (gaps up
            to ``max_gap``) whatever ``rollout`` is: a ranking check, not the rollout objective.
        out (`str`, optional): predictor file to write; default: this model's place in the artefact store
            (``$TCLAB_HOME/models/<weights key>/predictor-<static|dynamic>.safetensors``, ``tclab.artefacts``),
            where the learned scorers find it again.
        arch (`dict`): architecture keyword arguments of the predictor (``hidden`` for static; ``width``,
            ``heads`` for dynamic); empty = the defaults.
    """

    kind: str = "learned-static"
    num_steps: int = 50
    scheduler: str = "ddim"
    guidance_scale: float = 4.0
    num_samples: int = 6
    images: str | None = None
    labels: Any = "auto"
    num_images: int = 6
    sdedit_strength: float = 0.6
    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-3
    lam: float = 1.0
    penalty: str = "mean"
    target_ratio: float = 0.5
    relative: bool = True
    max_gap: int = 1
    rollout: int = 0
    schedule: dict | None = None
    seed: int = 0
    max_seconds: float | None = None
    checkpoint_every: int = 50
    eval_pairs: int = 16
    out: str | None = None
    arch: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not a predictor kind; choose one of {list(KINDS)}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty={self.penalty!r}; choose one of {list(PENALTIES)}")
        for name, lo in (("num_steps", 2), ("num_samples", 1), ("steps", 1), ("batch_size", 1), ("max_gap", 1),
                         ("checkpoint_every", 1), ("num_images", 1), ("eval_pairs", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.max_gap >= self.num_steps:
            raise ValueError(f"max_gap={self.max_gap} needs more than {self.max_gap} sampling steps "
                             f"(num_steps={self.num_steps})")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam (the spec's lambda) must be a finite number >= 0, got {self.lam}")
        if not 0 <= self.target_ratio <= 1:
            raise ValueError(f"target_ratio must be in [0, 1], got {self.target_ratio}")
        if not 0 < self.sdedit_strength <= 1:
            raise ValueError(f"sdedit_strength must be in (0, 1], got {self.sdedit_strength}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self._check_rollout()

    def _check_rollout(self) -> None:
        r = self.rollout
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rollout must be an integer >= 0 (0 = one-step pairs, k = windows of up to k cached "
                             f"steps), got {r!r}")
        if r >= self.num_steps:
            raise ValueError(f"rollout={r} needs windows of {r + 1} steps but the trajectories have "
                             f"num_steps={self.num_steps}; use rollout <= {self.num_steps - 1}")
        if r and self.max_gap != 1:
            raise ValueError(f"max_gap={self.max_gap} is for one-step pairs (rollout=0); with rollout={r} the "
                             "window's length sets the staleness: leave max_gap at 1")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool)
                                             or not isinstance(self.max_seconds, (int, float))
                                             or not (math.isfinite(self.max_seconds) and self.max_seconds > 0)):
            raise ValueError(f"max_seconds must be a number of seconds > 0 (or None: no time limit), "
                             f"got {self.max_seconds!r}")
        if self.schedule is None:
            return
        if not r:
            raise ValueError(f"schedule={self.schedule!r} only shapes rollout windows; set rollout >= 1 (e.g. the "
                             "schedule's longest run of cached steps) or leave schedule at None")
        sched = self.schedule
        if not isinstance(sched, dict) or not isinstance(sched.get("kind"), str):
            raise ValueError(f"schedule must be a dict naming its kind and parameters as tclab.cache.schedule."
                             f"make_schedule takes them, e.g. {{'kind': 'tprr', 'k1': 6, 'k2': 4, 'split': 0.5}}; "
                             f"got {sched!r}")
        try:
            json.dumps(sched)
        except TypeError as e:
            raise ValueError(f"schedule must hold plain JSON values (numbers, strings, lists; it is recorded with the "
                             f"predictor): {e}") from None
        params = {k: v for k, v in sched.items() if k != "kind"}
        try:
            full = make_schedule(sched["kind"], self.num_steps, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"schedule={sched!r} is not a valid schedule: {e}") from None
        if full.all():
            raise ValueError(f"schedule={sched!r} makes every one of the {self.num_steps} steps full: there is no "
                             "cached step to train on; use an interval > 1")

    def run_key(self) -> str:
        """The settings a checkpoint must share with a run that resumes it."""
        d = {k: v for k, v in asdict(self).items()
             if k not in _RUN_ONLY_FIELDS and not (k in _KEY_DEFAULTS and v == _KEY_DEFAULTS[k])}
        return json.dumps(d, sort_keys=True)

    def data_key(self) -> str:
        return json.dumps({k: getattr(self, k) for k in _DATA_FIELDS}, sort_keys=True)


# ---- the forward pass with blended blocks ------------------------------------------------------------

def forward_blended(transformer, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    class_labels: torch.Tensor | None, w: torch.Tensor | None = None,
                    cached: list[torch.Tensor] | None = None,
                    record: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The DiT's forward (``DiTTransformer2DModel``) with its blocks called here, so each block's output
    can be blended with a cached update (the training harness of the spec, section 3).

    Modes:
      - ``w=None, cached=None``: the plain forward (``record=True`` also returns every block's update
        ``u_l = x_{l+1} - x_l``, (B, N, C) each: the cache of this step);
      - ``w`` (B, L, N) and ``cached`` (L tensors (B, N, C)): block l's output becomes
        ``w * x_{l+1} + (1 - w) * (x_l + u_cached)`` (= ``x_l + w u_now + (1 - w) u_cached``), written so
        that ``w = 1`` gives the plain output and ``w = 0`` the all-cached output bit for bit; with
        ``record=True`` the updates returned are each block's *own* update ``u_l(now) = block(x_l) - x_l``
        on its (blended) input, before blending: what a computed token would write into the cache
        (rollout training evolves the cache with them);
      - ``cached`` without ``w``: every block reuses its cached update (w = 0) and no block runs (cheap).

    Returns:
        (out (B, C_out, H, W) exactly as ``transformer(...).sample``, the updates or None).
    """
    tr = transformer
    x = embed_tokens(tr, hidden_states)  # (B, N, C) patch tokens + positional embedding
    updates = [] if record else None
    for l, block in enumerate(tr.transformer_blocks):
        if cached is not None and w is None:  # all cached: the block is not run
            x = x + cached[l]
            continue
        # the block module itself, called as DiT's forward calls it (its processor and any hooks run)
        out = block(x, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                    timestep=timestep, cross_attention_kwargs=None, class_labels=class_labels)  # (B, N, C)
        if record:
            updates.append(out - x)
        if w is not None:
            wl = w[:, l, :, None].to(out.dtype)  # (B, N, 1)
            out = wl * out + (1 - wl) * (x + cached[l])
        x = out
    return output_head(tr, x, timestep, class_labels), updates  # DiT's final adaLN, decoder, unpatchify


def _noise_channels(out: torch.Tensor, transformer) -> torch.Tensor:
    """The channels the sampler uses (the noise prediction; learned-sigma channels dropped)."""
    return out[:, : transformer.config.in_channels]


def _row_mse(out: torch.Tensor, target: torch.Tensor, transformer) -> torch.Tensor:
    """MSE of each row's noise prediction against ``target`` (the full output's noise channels): (B,)."""
    return (_noise_channels(out, transformer) - target).pow(2).flatten(1).mean(1)


def _penalty(mean_w: torch.Tensor, config: "PredictorTrainConfig") -> torch.Tensor:
    """The compute penalty on the mean score (module docstring): ``mean(w)``, or its squared distance to
    ``target_ratio`` with ``penalty="target"``."""
    return mean_w if config.penalty == "mean" else (mean_w - config.target_ratio) ** 2


# ---- training data: the model's own trajectories -----------------------------------------------------

@dataclass
class TrajectorySet:
    """Transformer calls of full-compute sampling runs, one row per (trajectory, step), trajectory-major
    with steps ascending (so row ``m - g`` is the same trajectory's step ``s - g`` when ``step[m] >= g``).
    A trajectory is one CFG row of one run (its conditional and unconditional halves are two)."""

    x: torch.Tensor  # (M, C_in, H, W) transformer input (after scale_model_input)
    t: torch.Tensor  # (M,) timestep value
    y: torch.Tensor  # (M,) class label (NULL_CLASS = unconditional row)
    target: torch.Tensor  # (M, C_in, H, W) full output, noise channels
    step: torch.Tensor  # (M,) step index within its trajectory (0 = first executed step)
    traj: torch.Tensor  # (M,) trajectory id

    def __len__(self) -> int:
        return len(self.step)

    def pair_rows(self) -> torch.Tensor:
        """Rows m that can end a pair (step >= 1). (P,) long."""
        return torch.nonzero(self.step >= 1).reshape(-1)

    def state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_trajectories(self) -> int:
        return int(self.traj.max()) + 1 if len(self) else 0


def _as_loaded(model) -> LoadedDiT:
    if isinstance(model, LoadedDiT):
        return model
    if isinstance(model, str):
        from ..models import load_dit

        return load_dit(model)
    if hasattr(model, "transformer_blocks") and hasattr(model, "config"):
        return LoadedDiT(name="transformer", transformer=model,
                         vae=PixelSpaceVAE(latent_channels=model.config.in_channels),
                         scheduler_config=default_scheduler_config(), trained=True, source="given transformer")
    raise TypeError(f"expected a LoadedDiT, a model spec string or a DiTTransformer2DModel, got {type(model).__name__}")


def _image_set_and_labels(model: LoadedDiT, config: "PredictorTrainConfig"):
    """The in-house image set of ``config.images`` and its label map (one rule: :mod:`tclab.labels`)."""
    from ..data import load_image_folder
    from ..labels import resolve_labels
    from ..paths import resolve_images

    data = load_image_folder(resolve_images(config.images), model.resolution, limit=None, progress=False)
    return data, resolve_labels(data, model, config.labels)


def collect_trajectories(model, config: PredictorTrainConfig, progress: bool = True) -> TrajectorySet:
    """Sample the model's own trajectories (and SDEdit traces of ``config.images``) with full compute,
    recording every transformer call. See :class:`TrajectorySet`."""
    from ..sampling import SampleConfig, sample
    from ..steps import bind_model_call, current_step
    from .hooks import get_token_cache_state

    model = _as_loaded(model)
    tr = model.transformer
    if get_token_cache_state(tr) is not None:
        raise RuntimeError("a token cache is applied to this transformer; training data must come from full "
                           "compute: call tclab.cache.remove_token_cache(transformer) first")
    calls = []

    def hook(module, args, kwargs, output):
        ctx = current_step()  # always set: the trajectories come from tclab's sampler
        a = bind_model_call(args, kwargs)
        x, t, y = a["hidden_states"], a.get("timestep"), a.get("class_labels")
        out = output.sample if hasattr(output, "sample") else output[0]
        calls.append((ctx.run_id, ctx.step, x.detach().cpu().clone(), torch.as_tensor(t).reshape(-1).cpu().clone(),
                      y.detach().cpu().clone(), _noise_channels(out, tr).detach().cpu().clone()))

    data, label_map = _image_set_and_labels(model, config) if config.images else (None, None)
    if label_map is not None and label_map.conditional:  # the classes the team cares about
        classes = label_map.class_ids
    else:
        classes = list(range(min(model.num_classes, NULL_CLASS)))
    labels = [classes[i % len(classes)] for i in range(config.num_samples)]
    sc = SampleConfig(num_steps=config.num_steps, scheduler=config.scheduler, guidance_scale=config.guidance_scale,
                      seed=config.seed, batch_size=config.num_samples, sdedit_strength=config.sdedit_strength)
    handle = tr.register_forward_hook(hook, with_kwargs=True)
    try:
        sample(model, labels, sc, progress=progress)
        if data is not None:
            print(label_map.describe())
            pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:config.num_images]
            imgs, ylab = data.images[pick], label_map.labels_for(data)[pick]
            sample(model, ylab.tolist(), SampleConfig(**{**asdict(sc), "seed": config.seed + 1,
                                                         "batch_size": len(pick)}),
                   init_images=imgs, progress=progress)
    finally:
        handle.remove()
    # (run, row) -> trajectory id in order of appearance; rows laid out trajectory-major, steps ascending
    keys, items = {}, []
    for run_id, s, x, t, y, out in calls:
        for r in range(x.shape[0]):
            tid = keys.setdefault((run_id, r), len(keys))
            items.append((tid, s, x[r], t[r if len(t) > 1 else 0], y[r], out[r]))
    items.sort(key=lambda it: (it[0], it[1]))
    return TrajectorySet(x=torch.stack([it[2] for it in items]), t=torch.stack([it[3] for it in items]),
                         y=torch.stack([it[4] for it in items]), target=torch.stack([it[5] for it in items]),
                         step=torch.tensor([it[1] for it in items]), traj=torch.tensor([it[0] for it in items]))


# ---- one loss evaluation -----------------------------------------------------------------------------

def _pair_tensors(trajs: TrajectorySet, m: torch.Tensor, g: torch.Tensor, device):
    prev = m - g
    return (trajs.x[prev].to(device), trajs.t[prev].to(device), trajs.x[m].to(device), trajs.t[m].to(device),
            trajs.y[m].to(device), trajs.target[m].to(device))


def compute_pair_loss(predictor: CachePredictor, transformer, batch, config: PredictorTrainConfig) -> dict:
    """Loss of one batch of pairs (see the module docstring): dict of ``loss`` (with grad), ``rel_mse``
    (the MSE term as used), ``mean_w``."""
    x_prev, t_prev, x_now, t_now, y, target = batch
    with torch.no_grad():
        _, cached = forward_blended(transformer, x_prev, t_prev, y, record=True)  # L x (B, N, C): step s - g
        if config.relative:
            all_cached, _ = forward_blended(transformer, x_now, t_now, y, cached=cached)  # no block runs
            err0 = _row_mse(all_cached, target, transformer)  # (B,)
    w = torch.sigmoid(predictor.logits_for(transformer, x_now, t_now, y))  # (B, L, N)
    out, _ = forward_blended(transformer, x_now, t_now, y, w=w, cached=cached)
    err = _row_mse(out, target, transformer)  # (B,)
    mse = (err / (err0 + EPS)).mean() if config.relative else err.mean()
    mean_w = w.mean()
    cost = _penalty(mean_w, config)
    return {"loss": mse + config.lam * cost, "rel_mse": mse.detach(), "mean_w": mean_w.detach()}


def _draw_pairs(trajs: TrajectorySet, rows: torch.Tensor, n: int, max_gap: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    m = rows[torch.randint(len(rows), (n,), generator=gen)]  # (n,) pair ends
    if max_gap == 1:
        return m, torch.ones_like(m)
    hi = trajs.step[m].clamp(max=max_gap)  # (n,) largest gap possible
    g = 1 + (torch.rand(n, generator=gen) * hi).long().clamp(max=hi - 1)
    return m, g


# ---- rollout training: windows of cached steps (module docstring, item 4) -----------------------------

def _trajectory_spans(trajs: TrajectorySet) -> list[tuple[int, int]]:
    """(first row, number of steps) of every trajectory of ``trajs`` (rows trajectory-major, steps 0..n-1)."""
    _, counts = torch.unique_consecutive(trajs.traj, return_counts=True)
    spans, first = [], 0
    for n in counts.tolist():
        if not torch.equal(trajs.step[first:first + n], torch.arange(n)):
            raise ValueError(f"trajectory rows {first}..{first + n - 1} do not hold steps 0..{n - 1} in order; "
                             "a TrajectorySet must be laid out trajectory-major with steps ascending")
        spans.append((first, n))
        first += n
    return spans


def _schedule_over(schedule: dict, n: int) -> np.ndarray:
    params = {k: v for k, v in schedule.items() if k != "kind"}
    try:
        return make_schedule(schedule["kind"], n, **params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"schedule={schedule!r} cannot be made over a trajectory of {n} steps (SDEdit traces have "
                         f"fewer steps than num_steps): {e}") from None


def rollout_windows(trajs: TrajectorySet, config: PredictorTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rollout window of ``trajs`` under ``config.rollout`` (k) and ``config.schedule``.

    A window is a full step ``s0`` (row ``m0``) and the cached steps ``s0 + 1 .. s0 + k_w`` after it (rows
    ``m0 + 1 .. m0 + k_w`` of the same trajectory). With a schedule (made over each trajectory's own number of
    steps, as the engine makes it for a run): windows start at its full steps and span the cached steps up to
    the next full step, at most ``k`` of them (a full step followed by another full step gives none), so a
    window never crosses a full step. Without: a window of exactly ``k`` cached steps starts at every step
    that has ``k`` steps after it.

    Returns:
        (first row ``m0`` (W,) long, cached steps ``k_w`` (W,) long, each in 1..k).
    """
    k = config.rollout
    if k < 1:
        raise ValueError(f"rollout windows need config.rollout >= 1, got {k}")
    starts: list[int] = []
    lengths: list[int] = []
    schedules: dict[int, np.ndarray] = {}
    for first, n in _trajectory_spans(trajs):
        if config.schedule is None:
            starts += [first + s0 for s0 in range(n - k)]
            lengths += [k] * max(0, n - k)
            continue
        if n not in schedules:
            schedules[n] = _schedule_over(config.schedule, n)
        full = schedules[n]  # (n,) True = full step
        for s0 in np.flatnonzero(full).tolist():
            j = 0
            while j < k and s0 + j + 1 < n and not full[s0 + j + 1]:
                j += 1
            if j:
                starts.append(first + s0)
                lengths.append(j)
    return torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)


@dataclass
class WindowBatch:
    """B rollout windows, teacher-forced from a :class:`TrajectorySet`: index 0 along dim 1 is the full step
    ``s0``, index ``j`` its ``j``-th cached step ``s0 + j``. A window shorter than ``K`` (the longest in the
    batch) is padded by repeating its last step; padded steps are never used."""

    x: torch.Tensor  # (B, K + 1, C_in, H, W) transformer inputs of the stored full-compute trajectory
    t: torch.Tensor  # (B, K + 1) timesteps
    y: torch.Tensor  # (B,) class label (one trajectory per window)
    target: torch.Tensor  # (B, K + 1, C_in, H, W) full-compute outputs, noise channels
    length: torch.Tensor  # (B,) long, cached steps k_b of each window, 1..K


def _window_tensors(trajs: TrajectorySet, starts: torch.Tensor, lengths: torch.Tensor, device) -> WindowBatch:
    K = int(lengths.max())
    offs = torch.minimum(torch.arange(K + 1)[None, :], lengths[:, None])  # (B, K + 1), padded: repeat the last
    rows = starts[:, None] + offs  # (B, K + 1)
    return WindowBatch(x=trajs.x[rows].to(device), t=trajs.t[rows].to(device), y=trajs.y[starts].to(device),
                       target=trajs.target[rows].to(device), length=lengths.to(device))


def _draw_windows(windows: tuple[torch.Tensor, torch.Tensor], n: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts, lengths = windows
    pick = torch.randint(len(starts), (n,), generator=gen)  # (n,) the same generator as the pairs
    return starts[pick], lengths[pick]


def compute_rollout_loss(predictor: CachePredictor, transformer, window: WindowBatch,
                         config: PredictorTrainConfig) -> dict:
    """Loss of a batch of rollout windows (module docstring, item 4): dict of ``loss`` (with grad), ``rel_mse``
    (the MSE term as used), ``mean_w``, ``cached_steps`` (steps scored, summed over the windows).

    For each window: the full step ``s0`` records every block's update (the cache, as ``forward_blended(...,
    record=True)``); then each cached step ``s0 + j`` in turn runs blended with ``w = sigmoid(logits at that
    step)`` against the *current* cache, and the cache evolves as the engine's does: a computed token refreshes
    its cached update, ``cache_l <- w * u_l(now) + (1 - w) * cache_l`` (the soft version of the engine's
    ``index_copy`` of the kept tokens' new updates; ``w = 0`` leaves the ``s0`` cache as it was, bit for bit).
    Gradients flow through the cache's evolution across the window (the scores at step ``s0 + 1`` are
    charged for the error they cause at ``s0 + 2 ..``).

    Inputs are **teacher-forced**: the transformer input of every step is the stored full-compute
    trajectory's (``window.x``), and each step's output is compared with that step's full output. No scheduler
    steps inside training: the loss isolates what the one-step loss misses, the *cache's* staleness building
    up across cached steps, from the drift of the latents (which would make the targets move with the
    predictor and need a sampler in the loop); the trajectory drift is left to the sampling evaluation.

    ``loss = mean over windows [mean over the window's steps of rel_mse_j] + lambda * penalty(mean w)``;
    ``rel_mse_j`` is step j's MSE divided by that step's all-cached error (every block reusing the ``s0``
    cache), as in :func:`compute_pair_loss`, and ``mean w`` is averaged the same way (per window over its
    steps, then over windows). A batch of one-step windows gives :func:`compute_pair_loss`'s loss with g = 1.
    """
    tr = transformer
    # longest first, so the windows still running at step j are a prefix of the batch
    order = torch.sort(window.length, descending=True, stable=True).indices
    x, t, y, target, length = (v[order] for v in (window.x, window.t, window.y, window.target, window.length))
    B, K = len(length), int(length.max())
    with torch.no_grad():
        _, cache0 = forward_blended(tr, x[:, 0], t[:, 0], y, record=True)  # L x (B, N, C): the full step's cache
    cache = list(cache0)
    rel_sum = torch.zeros(B, device=x.device)  # (B,) sum over each window's steps
    w_sum = torch.zeros(B, device=x.device)
    for j in range(1, K + 1):
        n = int((length >= j).sum())  # windows that have a step j
        xj, tj, yj, tgt = x[:n, j], t[:n, j], y[:n], target[:n, j]
        if config.relative:
            with torch.no_grad():
                all_cached, _ = forward_blended(tr, xj, tj, yj, cached=[c[:n] for c in cache0])  # no block runs
                err0 = _row_mse(all_cached, tgt, tr)  # (n,)
        w = torch.sigmoid(predictor.logits_for(tr, xj, tj, yj))  # (n, L, N)
        out, u_now = forward_blended(tr, xj, tj, yj, w=w, cached=[c[:n] for c in cache], record=True)
        err = _row_mse(out, tgt, tr)  # (n,)
        rel = err / (err0 + EPS) if config.relative else err
        rel_sum = rel_sum + torch.nn.functional.pad(rel, (0, B - n))
        w_sum = w_sum + torch.nn.functional.pad(w.mean((1, 2)), (0, B - n))
        if j < K:  # the engine's refresh, soft: computed tokens write their new update into the cache
            cache = [torch.cat([w[:, l, :, None].to(u.dtype) * u + (1 - w[:, l, :, None].to(u.dtype)) * c[:n], c[n:]])
                     for l, (u, c) in enumerate(zip(u_now, cache))]  # L x (B, N, C)
    steps = length.to(rel_sum.dtype)
    mse = (rel_sum / steps).mean()
    mean_w = (w_sum / steps).mean()
    cost = _penalty(mean_w, config)
    return {"loss": mse + config.lam * cost, "rel_mse": mse.detach(), "mean_w": mean_w.detach(),
            "cached_steps": int(length.sum())}


_SCHEDULE_POSITIONAL = {"tprr": ("k1", "k2", "split", "force_last"), "round-robin": ("interval", "force_last")}


def parse_schedule_spec(text: str) -> dict:
    """A schedule written on one line -> the ``schedule`` dict of :class:`PredictorTrainConfig`.

    ``KIND:V1,V2,...`` with the values in the order of the kind's parameters, or ``KIND:NAME=V,...``:
    ``"tprr:6,4,0.5"`` -> ``{"kind": "tprr", "k1": 6, "k2": 4, "split": 0.5}``; ``"round-robin:3"`` ->
    ``{"kind": "round-robin", "interval": 3}``; ``"tprr:k1=6,k2=4,split=0.5,force_last=1"``. Whether the
    values make a schedule is checked by the config (over its ``num_steps``).
    """
    from .schedule import SCHEDULES

    kind, sep, rest = str(text).strip().partition(":")
    kind = kind.strip()
    example = "e.g. tprr:6,4,0.5 (k1,k2,split), round-robin:3 (interval) or tprr:k1=6,k2=4,split=0.5"
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {text!r}: unknown kind {kind!r}; choose one of {list(SCHEDULES)} ({example})")
    if kind == "percentile":
        raise ValueError("schedule 'percentile' needs step_importance (one value per step), which does not fit on "
                         "a command line: pass schedule={'kind': 'percentile', 'step_importance': [...], 'n_full': n} "
                         "to PredictorTrainConfig in Python")
    if not sep or not rest.strip():
        raise ValueError(f"schedule {text!r} gives no parameters; write KIND:VALUES, {example}")
    names = _SCHEDULE_POSITIONAL.get(kind, ())
    out: dict = {"kind": kind}
    for i, item in enumerate(p.strip() for p in rest.split(",")):
        name, eq, value = item.partition("=")
        if not eq:
            if i >= len(names):
                raise ValueError(f"schedule {text!r}: {kind!r} takes at most {len(names)} values "
                                 f"({', '.join(names) or 'name=value pairs only'}); {example}")
            name, value = names[i], item
        name, value = name.strip(), value.strip()
        if name in out:
            raise ValueError(f"schedule {text!r} sets {name!r} twice")
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                raise ValueError(f"schedule {text!r}: {name}={value!r} is not a number; {example}") from None
    return out


@torch.no_grad()
def evaluate_predictor(predictor: CachePredictor, transformer, trajs: TrajectorySet, rho: float = 0.5,
                       num_pairs: int = 16, max_gap: int = 1, seed: int = 1234) -> dict:
    """Hard masks as the engine makes them (``select_tokens``, ``"global"``, top ``rho``; ``kv="all"``,
    ``reuse="update"``) from the predictor's scores vs from random scores, on ``num_pairs`` pairs of
    ``trajs``: relative MSE of the output (1 = caching everything). Lower than random = it ranks."""
    from .select import select_tokens

    gen = torch.Generator().manual_seed(seed)
    m, g = _draw_pairs(trajs, trajs.pair_rows(), num_pairs, max_gap, gen)
    x_prev, t_prev, x_now, t_now, y, target = _pair_tensors(trajs, m, g, transformer.device)
    _, cached = forward_blended(transformer, x_prev, t_prev, y, record=True)
    err0 = _row_mse(forward_blended(transformer, x_now, t_now, y, cached=cached)[0], target, transformer)

    def rel(scores):
        keep = select_tokens(scores, rho, "global").to(scores.dtype)  # (B, L, N) 0/1
        out, _ = forward_blended(transformer, x_now, t_now, y, w=keep, cached=cached)
        return float((_row_mse(out, target, transformer) / (err0 + EPS)).mean())

    s = torch.sigmoid(predictor.logits_for(transformer, x_now, t_now, y))
    rnd = torch.rand(s.shape, generator=gen).to(s.device)
    return {"rho": rho, "pairs": num_pairs, "rel_mse_predictor": rel(s), "rel_mse_random": rel(rnd)}


# ---- the loop ----------------------------------------------------------------------------------------------

def train_predictor(model, config: PredictorTrainConfig = PredictorTrainConfig(), resume: bool = False,
                    progress: bool = True, trajectories: TrajectorySet | None = None) -> Path:
    """Train a Cache Predictor on a frozen DiT and write it; returns the predictor file.

    Args:
        model: a ``LoadedDiT``, a model spec for ``load_dit`` (``"shapes-dit"``) or a bare DiT transformer.
        config: see :class:`PredictorTrainConfig`.
        resume: continue from the checkpoint in the work folder (``.<name>.training`` next to the output),
            refusing one made with other settings; ``config.steps`` may be raised to train longer.
        trajectories: reuse an already collected :class:`TrajectorySet` (e.g. one for both kinds).
    """
    from ..progress import progress_bar

    model = _as_loaded(model)
    tr = model.transformer
    if config.out:
        out = Path(config.out)
    else:
        from ..artefacts import predictor_path, record_model

        record_model(model)
        out = predictor_path(tr, config.kind)
    work = out.parent / f".{out.stem}.training"
    ckpt_path, traj_path = work / "checkpoint.pt", work / "trajectories.pt"
    ck = None
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        if ck["run_key"] != config.run_key():
            raise ValueError(f"the checkpoint in {work} was made with other settings ({ck['run_key']}); resume with "
                             f"the same settings (only {list(_RUN_ONLY_FIELDS)} may change), or drop --resume to "
                             "start over")
    work.mkdir(parents=True, exist_ok=True)

    if trajectories is None and traj_path.exists():
        saved = torch.load(traj_path, weights_only=True)
        if saved.get("data_key") == config.data_key() and saved.get("weights") == weights_fingerprint(tr):
            trajectories = TrajectorySet(**saved["tensors"])
    if trajectories is None:
        trajectories = collect_trajectories(model, config, progress=progress)
    torch.save({"data_key": config.data_key(), "weights": weights_fingerprint(tr),
                "tensors": trajectories.state()}, traj_path)
    rows = trajectories.pair_rows()
    if len(rows) == 0:
        raise ValueError("the trajectories hold no pair of steps; use num_steps >= 2")
    windows = rollout_windows(trajectories, config) if config.rollout else None
    if windows is not None and len(windows[0]) == 0:
        raise ValueError(f"the trajectories hold no rollout window (rollout={config.rollout}, schedule="
                         f"{config.schedule}): the schedule leaves no cached step after a full step")

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left alone
        torch.manual_seed(config.seed)
        predictor = make_predictor(config.kind, tr, **config.arch)
    predictor.train()
    opt = torch.optim.AdamW(predictor.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    step, hist, elapsed = 0, {"loss": [], "rel_mse": [], "mean_w": []}, 0.0
    if ck is not None:
        predictor.load_state_dict(ck["predictor"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        step, elapsed = int(ck["step"]), float(ck["elapsed"])
        hist = {k: ck[k].tolist() for k in hist}

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"predictor": predictor.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "step": step, "elapsed": elapsed, "run_key": config.run_key(),
                    **{k: torch.tensor(v, dtype=torch.float64) for k, v in hist.items()}}, tmp)
        tmp.replace(ckpt_path)

    was_training = tr.training
    flags = [p.requires_grad for p in tr.parameters()]
    tr.eval().requires_grad_(False)  # frozen: no gradient, no label dropout
    bar = progress_bar(total=config.steps, initial=step, desc=f"train {config.kind}", disable=not progress, unit="step")
    t0 = time.perf_counter() - elapsed

    def time_up() -> bool:  # max_seconds: checked after each optimiser step, never inside one
        return config.max_seconds is not None and elapsed >= config.max_seconds

    try:
        while step < config.steps and not time_up():
            if windows is None:  # one-step pairs (rollout=0)
                m, g = _draw_pairs(trajectories, rows, config.batch_size, config.max_gap, gen)
            else:
                starts, lengths = _draw_windows(windows, config.batch_size, gen)
            for grp in opt.param_groups:
                grp["lr"] = config.lr * min(1.0, (step + 1) / 10)
            if windows is None:
                res = compute_pair_loss(predictor, tr, _pair_tensors(trajectories, m, g, tr.device), config)
            else:
                res = compute_rollout_loss(predictor, tr, _window_tensors(trajectories, starts, lengths, tr.device),
                                           config)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            opt.step()
            step += 1
            for k in hist:
                hist[k].append(float(res[k].detach()))
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(hist['loss'][-20:]):.4f}", w=f"{np.mean(hist['mean_w'][-20:]):.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps or time_up():
                save_checkpoint()
        bar.close()
        predictor.eval().requires_grad_(False)
        evaluation = (evaluate_predictor(predictor, tr, trajectories, rho=0.5, num_pairs=config.eval_pairs,
                                         max_gap=config.max_gap, seed=config.seed + 1)
                      if config.eval_pairs else None)
    finally:
        for p, f in zip(tr.parameters(), flags):
            p.requires_grad_(f)
        tr.train(was_training)

    tail = max(1, min(50, len(hist["loss"]) // 5))
    meta = {
        "model": {**model_signature(tr), "name": model.name, "source": model.source,
                  "weights_fingerprint": weights_fingerprint(tr),
                  "weights_sha256": model.meta.get("weights_sha256") if model.meta else None},
        "train": {**{k: v for k, v in asdict(config).items() if k != "out"}, "lambda": config.lam,
                  "optimizer_steps": len(hist["loss"]), "trajectories": trajectories.num_trajectories,
                  "pairs_available": len(rows), "loss_first": hist["loss"][0],
                  "windows_available": None if windows is None else len(windows[0]),
                  "stopped_by": "max_seconds" if len(hist["loss"]) < config.steps else "steps",
                  "final_window": tail,  # final_* are means over the last `final_window` optimiser steps
                  "final_loss": float(np.mean(hist["loss"][-tail:])),
                  "final_rel_mse": float(np.mean(hist["rel_mse"][-tail:])),
                  "final_mean_w": float(np.mean(hist["mean_w"][-tail:])),
                  "train_seconds": round(elapsed, 1), "evaluation": evaluation, "torch": torch.__version__},
    }
    predictor.save(out, meta)
    _write_loss_curve(out, hist, config)
    return out


def _write_loss_curve(out: Path, hist: dict, config: PredictorTrainConfig) -> None:
    """``<out>.loss.csv`` (step, loss, rel_mse, mean_w) and ``<out>.loss.png``."""
    from matplotlib.figure import Figure

    base = out.with_suffix("")
    a = np.column_stack([np.arange(1, len(hist["loss"]) + 1), hist["loss"], hist["rel_mse"], hist["mean_w"]])
    np.savetxt(f"{base}.loss.csv", a, fmt=["%d", "%.6f", "%.6f", "%.6f"], delimiter=",",
               header="step,loss,rel_mse,mean_w", comments="")
    fig = Figure(figsize=(7, 3.5))
    ax, ax2 = fig.subplots(1, 2)
    k = max(1, len(hist["loss"]) // 30)
    for name, lab in (("loss", f"loss (rel_mse + {config.lam:g} x penalty)"), ("rel_mse", "relative MSE")):
        v = np.asarray(hist[name])
        sm = np.convolve(v, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k, sm, label=lab)
    ax.set(xlabel="optimiser step", ylabel=f"mean over {k} steps", title=f"{config.kind}: loss")
    ax.legend(fontsize=7)
    ax2.plot(np.arange(1, len(hist["mean_w"]) + 1), hist["mean_w"])
    ax2.set(xlabel="optimiser step", ylabel="mean score w", title="mean w (soft kept ratio)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(f"{base}.loss.png", dpi=110)

