"""Ablation sweeps: quality against cost for many ways of sampling, as one tidy table.

Spec: ``shared/docs/tokencache.md`` sections 3-5. A sweep is a list of :class:`Variant` s (one point
each: a TokenCache config, a baseline, an external peer, or full compute) run by :func:`run_sweep`
in one harness on the same labels and seeds, so every number is comparable:

- **FLOPs** counted on what actually ran (``tclab.metrics.count_flops``) over the whole quality run,
  divided by full compute's count on the same images;
- **wall-clock**: median of ``timing_repeats`` runs of ``timing_batch`` images, the full-compute
  baseline re-run in the same process and interleaved with the variant (full, variant, full, ...);
- **quality**: paired PSNR / SSIM / MSE against the same-seed full-compute images, class-consistency
  by a classifier of the reference set, and (given a feature extractor and reference images) FID/KID.

Each ablation is a *curve* (``Variant.curve``: e.g. one scorer at several budgets); every curve
keeps its own points. :func:`pareto_front` marks the points no other point beats on both cost and
quality; :func:`best_under_budget` picks the best configuration within a cost budget;
:func:`compare_at_reductions` answers "which variant wins at 2x / 3x fewer FLOPs, and by how much"
by taking, per curve, its best point within that budget (no interpolation between measured points).

The three ablation notebooks build their variants with :func:`predictor_variants`,
:func:`block_selection_variants` and :func:`schedule_variants`, plus :func:`reference_variants`
(full compute, fewer steps, FORA, the external peers) on every plot, and share every other step
through :func:`open_study` (an :class:`AblationStudy`: model, images, predictors, classifier, run folder;
plan, measure, summarise). :func:`summarise_sweep` gives their ``summary.json`` as a typed, versioned
:class:`tclab.sweep_summary.SweepSummary`; :func:`sweep_report` turns one into the report's first screen.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclasses_fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .cache import TokenCacheConfig, apply_caching
from .cache.config import fora_config
from .cache.methods import method_config
from .cache.peers import PEERS, peer_names
from .labels import balanced_labels
from .metrics import count_flops, distribution_quality, mse, psnr, ssim
from .report import (DOES_NOT_HOLD, HOLDS, NOT_MEASURED, WITHIN_NOISE, Finding, ReportSummary, describe_devices,
                     format_number, key_numbers_from)
from .sampling import SampleConfig, sample
from .stats import Interval, bootstrap_ci, noise_floor, paired_difference, ratio_ci, samples_needed, wilson_interval
from .sweep_summary import POINT_KEYS, CostView, SweepIdentity, SweepSettingsRecord, SweepSummary

FAMILIES = ("reference", "ablation", "baseline", "peer")
FULL_COMPUTE = "full compute"
QUALITY_COLUMNS = ("psnr", "ssim", "mse", "lpips", "class_consistency", "fid", "kid")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "class_consistency": True, "mse": False, "lpips": False, "fid": False,
                    "kid": False}
COST_COLUMNS = ("flop_ratio", "time_ratio")
COST_LABELS = {"flop_ratio": "FLOPs / full compute (counted)", "time_ratio": "wall-clock / full compute (median)"}
QUALITY_LABELS = {"psnr": "PSNR vs full compute (dB)", "ssim": "SSIM vs full compute", "mse": "MSE vs full compute",
                  "lpips": "LPIPS vs full compute", "class_consistency": "class-consistency",
                  "fid": "FID (see extractor note)", "kid": "KID"}
REGISTERED = "registered"  # as `peers`: every registered peer, installed packages' included (peer_names())
DEFAULT_PEERS = REGISTERED


# ---- what a point is --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One point of a sweep.

    Args:
        name: the point's label, unique within a sweep (e.g. ``"learned-static rho=0.25"``).
        curve: the line the point belongs to (e.g. ``"learned-static"``); a curve's points differ in
            one knob (the budget, an interval, ...).
        family: ``"ablation"`` (the alternatives being compared), ``"reference"`` (full compute),
            ``"baseline"`` (fewer steps, FORA) or ``"peer"`` (another team's published method).
        cache: ``TokenCacheConfig`` fields (validated when the variant is made), or None.
        peer: an external peer's name (``tclab.cache.peers``) and ``peer_options``.
        num_steps: sample with this many steps instead of the sweep's (the fewer-steps baseline).
        knob: the setting that moves the point along its curve, for tables (e.g. ``"rho=0.25"``).
    """

    name: str
    curve: str
    family: str = "ablation"
    cache: dict | None = None
    peer: str | None = None
    peer_options: dict = field(default_factory=dict)
    num_steps: int | None = None
    knob: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"variant {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.cache is not None and self.peer is not None:
            raise ValueError(f"variant {self.name!r}: give a token cache or a peer, not both")
        if self.cache is not None:
            TokenCacheConfig.from_dict(self.cache)  # unknown keys and bad values fail here, before any run
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"variant {self.name!r}: num_steps must be >= 1, got {self.num_steps}")

    def caching_config(self):
        """The config ``tclab.cache.apply_caching`` takes for this variant (a ``TokenCacheConfig`` or a
        peer's config), or None for plain sampling."""
        if self.cache is not None:
            return TokenCacheConfig.from_dict(self.cache)
        if self.peer is not None:
            return method_config(self.peer, **self.peer_options)
        return None

    def attach(self, model) -> Callable[[], None]:
        """Attach this variant's caching to ``model`` (a ``LoadedDiT``); returns the undo callable."""
        config = self.caching_config()
        if config is None:
            return lambda: None
        return apply_caching(model, config).remove

    def describe(self) -> dict:
        """Plain values for tables and ``summary.json``."""
        d = asdict(self)
        if self.cache is not None:
            d["cache"] = TokenCacheConfig.from_dict(self.cache).to_dict()
        return d


def full_compute() -> Variant:
    return Variant(FULL_COMPUTE, FULL_COMPUTE, family="reference")


def _check_unique(variants: Sequence[Variant]) -> None:
    seen: set[str] = set()
    dup = [v.name for v in variants if v.name in seen or seen.add(v.name)]
    if dup:
        raise ValueError(f"variant names must be unique within a sweep; repeated: {sorted(set(dup))}")


def _budget_label(rho: float) -> str:
    return f"rho={rho:g}"


# ---- the variants of each ablation --------------------------------------------------------------------

def _pairs(points: Sequence[Sequence[int]], what: str) -> list[tuple[int, int]]:
    """``[[interval, order], ...]`` checked: two integers >= 1 each."""
    out = []
    for p in points:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in p)):
            raise ValueError(f"each {what} point is [interval, order] (two integers >= 1), got {p!r}")
        out.append((int(p[0]), int(p[1])))
    return out


def forecast_variants(points: Sequence[Sequence[int]] = ()) -> list[Variant]:
    """tclab's block-level forecasting, one curve ("FORA + forecast"): FORA's schedule (a full step every
    ``interval`` steps, every block skipped in cached steps) with each token's update extrapolated
    (``reuse="forecast"``, order ``order``) instead of reused verbatim; ``points`` are ``[interval, order]``.
    An ablated curve (tclab's own configuration), so it competes for the leader at each cost."""
    return [Variant(f"FORA + forecast({o}) (interval {k})", "FORA + forecast",
                    cache=fora_config(k, reuse="forecast", forecast_order=o).to_dict(), knob=f"interval={k} order={o}")
            for k, o in _pairs(points, "forecast")]


def reference_variants(num_steps: int, fora_intervals: Sequence[int] = (2, 3), fewer_steps: Sequence[int] = (25, 17),
                       peers: Sequence[str] | str = DEFAULT_PEERS,
                       taylorseer: Sequence[Sequence[int]] = ()) -> list[Variant]:
    """Full compute and the reference points every ablation plot shows: fewer sampling steps (the
    cheapest rival: same FLOPs per step, fewer steps), FORA (block-level caching, round-robin) and the
    external peers (diffusers' cache hooks, cache-dit): ``peers="registered"`` (the notebooks' default)
    is every registered peer, a team's own included. ``fewer_steps`` values >= ``num_steps`` are
    dropped (they would not save anything). ``taylorseer`` adds TaylorSeer tuned to the budgets,
    ``[interval, order]`` points (one full step every ``interval``, step 0 the only warm-up step, as
    every tclab schedule has): its default (interval 5, three warm-up steps) is one point far from 2x
    and 3x, and a rival is only fair at its best."""
    if isinstance(peers, str):
        if peers != REGISTERED:
            raise ValueError(f"peers must be a list of peer names or {REGISTERED!r} (every registered peer: "
                             f"{list(PEERS)}), got {peers!r}")
        peers = peer_names()
    out = [full_compute()]
    dropped = [int(n) for n in fewer_steps if int(n) >= num_steps]
    if dropped:
        print(f"fewer-steps baseline: {dropped} not below num_steps={num_steps}, so not a saving; left out")
    for n in fewer_steps:
        if int(n) < num_steps:
            out.append(Variant(f"fewer steps ({int(n)})", "fewer steps", "baseline", num_steps=int(n), knob=f"steps={n}"))
    for k in fora_intervals:
        out.append(Variant(f"FORA (interval {int(k)})", "FORA", "baseline", cache=fora_config(int(k)).to_dict(),
                           knob=f"interval={k}"))
    for p in peers:
        out.append(Variant(f"peer {p}", f"peer {p}", "peer", peer=str(p)))
    for k, o in _pairs(taylorseer, "taylorseer"):
        out.append(Variant(f"TaylorSeer (interval {k}, order {o})", "peer taylorseer tuned", "peer", peer="taylorseer",
                           peer_options={"cache_interval": k, "max_order": o, "disable_cache_before_step": 1},
                           knob=f"interval={k} order={o}"))
    return out


def predictor_variants(scorers: Sequence[str], rhos: Sequence[float], base: dict | None = None) -> list[Variant]:
    """Which tokens: one curve per scorer (``learned-static``, ``learned-dynamic``, ``oracle``,
    ``prev-change``, ``toca``, ``random``), one point per keep ratio ``rho``; everything else from
    ``base`` (TokenCacheConfig fields)."""
    base = dict(base or {})
    return [Variant(f"{s} {_budget_label(r)}", str(s), cache={**base, "scorer": str(s), "rho": float(r)},
                    knob=_budget_label(r)) for s in scorers for r in rhos]


def block_selection_variants(selections: Sequence[str], rhos: Sequence[float], base: dict | None = None,
                             full_end_blocks: Sequence[int] = (), full_end_selection: str = "global",
                             static_selections: Sequence[str] = ()) -> list[Variant]:
    """Which blocks: one curve per selection method (``uniform``, ``adaptive``, ``global``) and, for each
    k in ``full_end_blocks``, a curve of ``full_end_selection`` with the first and last k blocks
    always full; for each of ``static_selections`` a curve "<selection> static shapes" (every row keeps
    the same count per block, ``TokenCacheConfig.static_shapes``: compile-ready, see
    ``tclab.cache.static``). One point per ``rho``."""
    base = dict(base or {})
    out = [Variant(f"{s} {_budget_label(r)}", str(s), cache={**base, "selection": str(s), "rho": float(r)},
                   knob=_budget_label(r)) for s in selections for r in rhos]
    for k in full_end_blocks:
        curve = f"{full_end_selection} + first/last {int(k)} full"
        out += [Variant(f"{curve} {_budget_label(r)}", curve,
                        cache={**base, "selection": full_end_selection, "rho": float(r),
                               "full_first_blocks": int(k), "full_last_blocks": int(k)},
                        knob=_budget_label(r)) for r in rhos]
    for sel in static_selections:
        curve = f"{sel} static shapes"
        out += [Variant(f"{curve} {_budget_label(r)}", curve,
                        cache={**base, "selection": str(sel), "rho": float(r), "static_shapes": True},
                        knob=_budget_label(r)) for r in rhos]
    return out


def schedule_variants(base: dict | None = None, tprr: Sequence[Sequence[float]] = (), round_robin: Sequence[int] = (),
                      percentile: Sequence[int] = (), step_importance: Sequence[float] | None = None) -> list[Variant]:
    """When: TPRR over its two intervals and split (``tprr``: ``[k1, k2, split]`` triples), split into
    two curves by phase order ("long interval first", the paper's reading, and "long interval last"),
    round-robin over its interval, and percentile (v2) over its number of full steps (needs
    ``step_importance``, one value per step: see :func:`measure_step_importance`). Token settings
    (rho, scorer, ...) come from ``base``."""
    base = {k: v for k, v in dict(base or {}).items() if k not in ("schedule",)}
    out = []
    for triple in tprr:
        if len(triple) != 3:
            raise ValueError(f"each tprr entry is [k1, k2, split], got {triple!r}")
        k1, k2, split = int(triple[0]), int(triple[1]), float(triple[2])
        curve = "TPRR long interval first" if k1 > k2 else ("TPRR long interval last" if k1 < k2 else "TPRR equal")
        out.append(Variant(f"tprr({k1},{k2},split={split:g})", curve,
                           cache={**base, "schedule": "tprr", "k1": k1, "k2": k2, "split": split},
                           knob=f"k1={k1} k2={k2} split={split:g}"))
    for k in round_robin:
        out.append(Variant(f"round-robin({int(k)})", "round-robin",
                           cache={**base, "schedule": "round-robin", "interval": int(k)}, knob=f"interval={k}"))
    if percentile and step_importance is None:
        raise ValueError("percentile schedules need step_importance (tclab.ablation.measure_step_importance)")
    for n in percentile:
        out.append(Variant(f"percentile({int(n)})", "percentile",
                           cache={**base, "schedule": "percentile", "n_full": int(n),
                                  "step_importance": [float(v) for v in step_importance]},
                           knob=f"n_full={n}"))
    return out


def measure_step_importance(model, settings: "SweepSettings", num_samples: int = 4) -> list[float]:
    """Mean ``update_change`` per step (what a cached update errs by), measured with the recorder on
    ``num_samples`` class-balanced samples of the sweep's settings but seed ``seed + 1`` (other noise
    than the quality run's, so the schedule is not tuned on the images it is scored on): the
    importance the percentile schedule places its full steps by. Step 0 (no previous step; always full anyway) gets the
    largest measured value."""
    from .analysis import per_step_mean_change
    from .record import record_token_changes

    labels = SweepSettings(**{**settings.__dict__, "quality_samples": num_samples}).quality_labels(model.num_classes)
    cfg = settings.sample_config(batch_size=num_samples)
    cfg = SampleConfig(**{**cfg.__dict__, "seed": settings.seed + 1})  # not the quality run's noise: no tuning on the test images
    with record_token_changes(model.transformer) as rec:
        sample(model, labels, cfg, progress=False)
    curve = per_step_mean_change(rec.record, "update_change")
    finite = curve[np.isfinite(curve)]
    fill = float(finite.max()) if finite.size else 1.0
    return [float(v) if np.isfinite(v) else fill for v in curve]


# ---- running a sweep ------------------------------------------------------------------------------------

@dataclass
class SweepSettings:
    """How every point of a sweep is sampled and measured.

    Args:
        num_steps, scheduler, guidance_scale, seed: sampling (as ``tclab.sampling.SampleConfig``).
        quality_samples: class-balanced samples for the quality metrics and the FLOP count (more =
            tighter class-consistency, linearly slower).
        timing_batch, timing_repeats: images per timed run and how many interleaved (full, variant)
            pairs are timed; the time ratio is the median of the pairs' ratios.
        noise_pairs: how many (full, full) pairs full compute's own row times (at least
            ``timing_repeats``): the sweep's timing noise floor (:func:`timing_noise_floor`).
        quality_batch: images per forward in the quality run.
        sdedit_strength: with ``init_images`` in :func:`run_sweep`: how far the images are noised.
        classes: the model class ids the quality samples cycle over (e.g. the classes a team's folders
            map to, ``tclab.labels.LabelMap.class_ids``); None = ``0..K-1`` over the model's classes.
        confidence, resamples: the level of every interval and paired test (0.95) and the bootstrap
            resamples behind them (seeded with ``seed``; :mod:`tclab.stats`).
    """

    num_steps: int = 50
    scheduler: str = "ddim"
    guidance_scale: float = 4.0
    seed: int = 0
    quality_samples: int = 24
    timing_batch: int = 4
    timing_repeats: int = 2
    quality_batch: int = 64
    sdedit_strength: float = 0.6
    classes: list[int] | None = None
    confidence: float = 0.95
    resamples: int = 2000
    noise_pairs: int = 6

    def __post_init__(self) -> None:
        if self.classes is not None:
            if (not isinstance(self.classes, (list, tuple)) or not self.classes
                    or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.classes)):
                raise ValueError(f"classes must be a non-empty list of class ids (integers >= 0) or None, "
                                 f"got {self.classes!r}")
            self.classes = [int(c) for c in self.classes]
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be a fraction in (0, 1), e.g. 0.95; got {self.confidence!r}")
        for name in ("quality_samples", "timing_batch", "timing_repeats", "quality_batch", "resamples", "noise_pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.sample_config()  # validates num_steps, scheduler

    def quality_labels(self, num_classes: int) -> torch.Tensor:
        """The class labels of the quality run: ``quality_samples`` cycling over ``classes`` (or all)."""
        if self.classes is None:
            return balanced_labels(self.quality_samples, num_classes)
        return torch.tensor(self.classes, dtype=torch.long)[balanced_labels(self.quality_samples, len(self.classes))]

    def sample_config(self, num_steps: int | None = None, batch_size: int | None = None) -> SampleConfig:
        return SampleConfig(num_steps=num_steps or self.num_steps, scheduler=self.scheduler,
                            guidance_scale=self.guidance_scale, seed=self.seed,
                            batch_size=batch_size or self.quality_batch, sdedit_strength=self.sdedit_strength)


@dataclass
class SweepResult:
    """What :func:`run_sweep` measured: ``frame`` (one row per variant, see :func:`run_sweep`), the
    quality images of every variant that ran (``images[name]``, (N, 3, H, W) in [-1, 1], full compute
    under ``"full compute"``), their class ``labels``, and the settings.

    ``samples[name]``: the per-sample values behind each quality mean (``psnr``, ``ssim``, ``mse``,
    ``lpips``, and ``class_hit``: 1 / 0 classed right or not, NaN for a class the classifier does not
    know), one per quality sample, same seeds for every variant: what paired comparisons resample.
    ``timings[name]``: ``{"full": [...], "variant": [...]}`` seconds of each timed pair.
    ``noise_floor``: the full-vs-full time ratios of this sweep (:func:`timing_noise_floor`)."""

    frame: Any  # pandas.DataFrame
    images: dict[str, torch.Tensor]
    labels: torch.Tensor
    settings: SweepSettings
    variants: list[Variant]
    samples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    timings: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    noise_floor: Interval | None = None
    #: where it ran: ``world_size``, ``backend`` and each rank's ``devices`` (``tclab.distributed.World.describe``)
    world: dict | None = None

    @property
    def full_images(self) -> torch.Tensor:
        return self.images[FULL_COMPUTE]

    def save_samples(self, path) -> None:
        """Write the per-sample values and the timings to ``path`` (``.npz``; keys ``"<point>|<metric>"``
        and ``"<point>|time_full"`` / ``"<point>|time_variant"``), so a finished run can be re-tested
        (other differences, other confidence) without sampling again: :func:`load_samples` reads it."""
        arrays = {f"{name}|{m}": np.asarray(v, float) for name, per in self.samples.items() for m, v in per.items()}
        for name, t in self.timings.items():
            arrays[f"{name}|time_full"] = np.asarray(t["full"], float)
            arrays[f"{name}|time_variant"] = np.asarray(t["variant"], float)
        np.savez_compressed(path, **arrays)

    def per_image_error(self, name: str) -> dict[str, np.ndarray]:
        """Per-image PSNR / SSIM / MSE of variant ``name`` against full compute (same seeds)."""
        if name not in self.images:
            raise KeyError(f"no images of {name!r}: it failed or is not in this sweep (see frame['error']); "
                           f"variants with images: {sorted(self.images)}")
        a, b = self.images[name], self.full_images
        return {"psnr": psnr(a, b).numpy(), "ssim": ssim(a, b).numpy(), "mse": mse(a, b).numpy()}


def load_samples(path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, list[float]]]]:
    """``(samples, timings)`` as :meth:`SweepResult.save_samples` wrote them."""
    samples: dict[str, dict[str, np.ndarray]] = {}
    timings: dict[str, dict[str, list[float]]] = {}
    with np.load(path) as z:
        for key in z.files:
            name, _, metric = key.rpartition("|")
            if metric in ("time_full", "time_variant"):
                timings.setdefault(name, {})[metric[5:]] = z[key].tolist()
            else:
                samples.setdefault(name, {})[metric] = z[key]
    return samples, timings


def load_sweep(run_dir, first: int | None = None) -> SweepResult:
    """A finished ablation run read back for re-testing: its ``sweep.csv``, the per-sample values and
    timings of ``samples.npz`` and the settings of ``summary.json`` (no images). Every reader
    (:func:`table`, :func:`headline`, :func:`compare_at_reductions`, ...) then works on it as on the
    live result. ``first``: keep only the first N samples (the same seeds a run with
    ``quality_samples=N`` drew), with the quality means and intervals recomputed from them."""
    import pandas as pd
    from pathlib import Path

    run = Path(run_dir)
    missing = [f for f in ("sweep.csv", "samples.npz", "summary.json") if not (run / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} is not a finished ablation run with per-sample values: no {', '.join(missing)} "
                                "(samples.npz is written by runs of this tclab and later)")
    frame = pd.read_csv(run / "sweep.csv", keep_default_na=True)
    for col in ("error", "knob"):   # empty text comes back from CSV as NaN
        if col in frame:
            frame[col] = frame[col].astype(object).where(frame[col].notna(), "")
    samples, timings = load_samples(run / "samples.npz")
    stored = json.loads((run / "summary.json").read_text(encoding="utf-8")).get("settings") or {}
    known = {f.name for f in dataclasses_fields(SweepSettings)}
    settings = SweepSettings(**{k: v for k, v in stored.items() if k in known and v is not None})
    if first is not None:
        if isinstance(first, bool) or not isinstance(first, int) or first < 2:
            raise ValueError(f"first must be an integer >= 2 (samples to keep), got {first!r}")
        samples = {name: {m: v[:first] for m, v in per.items()} for name, per in samples.items()}
        settings = replace(settings, quality_samples=min(first, settings.quality_samples))
        # FID / KID come from whole sets of images this file does not hold: not recomputed, so left out
        for col in [c for c in frame.columns if c.split("_")[0] in ("fid", "kid")]:
            frame[col] = np.nan if frame[col].dtype.kind == "f" else ""
        for name, per in samples.items():
            for k, v in quality_columns(per, settings).items():
                frame.loc[frame["name"] == name, k] = v
    labels = torch.zeros(settings.quality_samples, dtype=torch.long)
    floor = timing_noise_floor(timings, settings.confidence)
    if "time_within_noise" in frame:   # judged again, by this tclab's noise floor (the timings are the same)
        add_timing_columns(frame, floor)
    return SweepResult(frame=frame, images={}, labels=labels, settings=settings, variants=[], samples=samples,
                       timings=timings, noise_floor=floor)


def _run(model, variant: Variant, labels: torch.Tensor, config: SampleConfig, init_images=None, start=None):
    detach = variant.attach(model)
    try:
        if variant.num_steps is not None:
            config = SampleConfig(**{**config.__dict__, "num_steps": variant.num_steps})
        return sample(model, labels, config, init_images=init_images, progress=False, start=start)
    finally:
        detach()


def _quality_run(model, variant: Variant, labels: torch.Tensor, settings: SweepSettings, init_images=None,
                 start=None) -> tuple[torch.Tensor, int]:
    """``(images, FLOPs counted)`` of ``variant``'s quality run on ``labels`` (all of the sweep's, or one
    shard of them with that shard's ``start``); non-finite images are an error."""
    with count_flops() as fc:
        res = _run(model, variant, labels, settings.sample_config(), init_images, start)
    imgs = res.images
    if not bool(torch.isfinite(imgs).all()):
        raise FloatingPointError(f"{variant.name} produced non-finite images (NaN or inf in "
                                 f"{int((~torch.isfinite(imgs)).flatten(1).any(1).sum())} of {len(imgs)}): "
                                 "its outputs diverged, so no quality figure of it would mean anything")
    return imgs, fc.result.flops


def _warm_up(model, settings: SweepSettings, labels: torch.Tensor, init_images=None) -> None:
    """First calls allocate and pick kernels; keep that out of every timed run."""
    sample(model, labels, settings.sample_config(num_steps=2, batch_size=settings.timing_batch),
           init_images=init_images, progress=False)


def _time_pair(model, variant: Variant, settings: SweepSettings, labels: torch.Tensor,
               init_images=None, repeats: int | None = None) -> tuple[list[float], list[float]]:
    """Seconds of (full compute, variant) on the timing batch, one pair per round.

    One untimed (full, variant) pair first (each variant's first call pays its own set-up: predictor
    load, buffers), then ``timing_repeats`` pairs whose order alternates (full, variant), (variant,
    full), ... so neither side always runs second. Attach / detach are outside the clock."""
    cfg = settings.sample_config(batch_size=settings.timing_batch)
    full, var = [], []

    def once(v: Variant) -> float:
        detach = v.attach(model)
        try:
            c = cfg if v.num_steps is None else SampleConfig(**{**cfg.__dict__, "num_steps": v.num_steps})
            t0 = time.perf_counter()
            sample(model, labels, c, init_images=init_images, progress=False)
            return time.perf_counter() - t0
        finally:
            detach()

    once(full_compute())
    once(variant)
    for i in range(repeats or settings.timing_repeats):
        if i % 2 == 0:
            full.append(once(full_compute()))
            var.append(once(variant))
        else:
            var.append(once(variant))
            full.append(once(full_compute()))
    return full, var


def full_vs_full_ratios(timings: Mapping[str, Mapping[str, Sequence[float]]]) -> list[float]:
    """The time ratios of full compute against itself that a sweep measured alongside its variants,
    all timed by the same protocol as every variant:

    - full compute's own row, whose "variant" is full compute again: one ratio per pair
      (``SweepSettings.noise_pairs`` of them, at the start of the sweep);
    - for every other variant, each full-compute run of its pairs over the one before (round i + 1 over
      round i): full against full, a variant run apart, all through the sweep, so a noisy stretch at
      the start (the machine warming up, another job starting) does not decide the floor alone.

    Single-run ratios, so the floor they give is wider than the scatter of a median over
    ``timing_repeats`` pairs: a cautious floor."""
    out = []
    for name, t in timings.items():
        full, var = list(t["full"]), list(t["variant"])
        if name == FULL_COMPUTE:
            out += [v / f for f, v in zip(full, var) if f > 0]
        else:
            out += [b / a for a, b in zip(full, full[1:]) if a > 0]
    return out


def timing_noise_floor(timings: Mapping[str, Mapping[str, Sequence[float]]], confidence: float = 0.95) -> Interval | None:
    """The sweep's timing noise floor (``tclab.stats.noise_floor`` of :func:`full_vs_full_ratios`):
    a time ratio inside it is not a measured speed-up or slow-down. None without two ratios."""
    ratios = full_vs_full_ratios(timings)
    return noise_floor(ratios, confidence) if len(ratios) >= 2 else None


def _ci_columns(name: str, interval: Interval) -> dict:
    return {f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high, f"{name}_n": interval.n}


def quality_columns(per_sample: Mapping[str, np.ndarray], settings: SweepSettings) -> dict:
    """The quality columns of one sweep row from its per-sample values: the mean of each of psnr / ssim /
    mse / lpips with ``<m>_ci_low``, ``<m>_ci_high``, ``<m>_n`` (seeded percentile bootstrap over the
    samples), and class-consistency, the share of ``class_hit`` over the samples of known classes, with
    its Wilson interval."""
    out = {}
    for m in ("psnr", "ssim", "mse", "lpips"):
        if m in per_sample:
            out[m] = float(np.mean(per_sample[m]))
            out.update(_ci_columns(m, bootstrap_ci(per_sample[m], confidence=settings.confidence,
                                                   resamples=settings.resamples, seed=settings.seed)))
    hit = per_sample.get("class_hit")
    if hit is not None:
        known = hit[~np.isnan(hit)]
        if known.size:
            out["class_consistency"] = float(known.mean())
            out.update(_ci_columns("class_consistency",
                                   wilson_interval(int(known.sum()), int(known.size), settings.confidence)))
    return out


def run_sweep(model, variants: Sequence[Variant], settings: SweepSettings | None = None, classifier=None,
              extractor=None, reference_images=None, labels: torch.Tensor | None = None,
              init_images: torch.Tensor | None = None, lpips_model=None, progress: bool = True, workers: int = 1,
              work_dir=None) -> SweepResult:
    """Measure every variant on ``model`` (a ``LoadedDiT``); full compute is always measured first.

    The quality run samples ``settings.quality_samples`` class-balanced labels from noise, or the
    given ``labels``; with ``init_images`` (e.g. a team's own images, one per label) it is an SDEdit
    run of those images at ``settings.sdedit_strength`` instead, so every image is a paired test case.
    Timed runs use the first ``timing_batch`` of the same labels (and images).

    ``classifier`` (``tclab.classifier.ShapesClassifier``) adds class-consistency; ``lpips_model``
    (``tclab.lpips.load_lpips`` from local weights) adds paired LPIPS; ``extractor`` (a
    ``tclab.features.FeatureExtractor``) with ``reference_images`` adds FID / KID against them,
    labelled by ``fid_extractor`` / ``fid_comparable`` (feature space), ``fid_n`` / ``fid_n_reference``
    (the images in each set, for FID and KID alike), ``kid_std`` / ``kid_subsets`` /
    ``kid_subset_size`` (KID's spread over its subsets) and ``fid_min_images``: below that floor
    (feature dimension + 1 per set, ``tclab.metrics.fid_min_images``) ``fid`` is NaN and
    ``fid_reason`` says "not computed: N images, needs at least M". A variant that fails is kept as a row with
    its ``error`` (never dropped); the others go on.

    Returns a :class:`SweepResult` whose ``frame`` has one row per variant: ``name, curve, family,
    knob, flop_ratio, flop_speedup, gflops_per_image, time_ratio`` (the median of the pairs' ratios),
    ``time_speedup, time_within_noise`` (inside the sweep's full-vs-full noise floor, ``noise_floor_low``
    / ``_high``: not a speed-up nor a slow-down), ``t_full_s, t_variant_s`` (medians), ``realisation``
    ((1 - time ratio) / (1 - FLOP ratio): the share of saved FLOPs that became saved time), ``psnr,
    ssim, mse, lpips, class_consistency, fid, kid, error, config`` (JSON); quality columns that were
    not measured are NaN. Every measured figure ``m`` has ``m_ci_low``, ``m_ci_high`` (at
    ``settings.confidence``) and, for per-sample means, ``m_n``; the per-sample values and the timings
    are in :attr:`SweepResult.samples` / :attr:`SweepResult.timings`.

    ``workers > 1`` measures on that many torchrun processes of this machine (one CPU thread, or one GPU,
    each; ``tclab.distributed``): the work is cut into (variant, shard of ``quality_batch`` samples)
    units, each rank times its variants against full compute on its own device, and every figure is
    then made here from the units' images and timings, so the quality columns equal one process's.
    ``work_dir`` holds the plan, the finished units and the workers' logs (default: a temporary folder);
    it is removed after success and kept after a failure, whose error names the rank and its log.
    """
    import pandas as pd
    from .progress import progress_bar

    settings = settings or SweepSettings()
    check_workers(workers)
    if any(v.name == FULL_COMPUTE and v != full_compute() for v in variants):
        raise ValueError(f"a variant is named {FULL_COMPUTE!r} but is not plain full compute; rename it "
                         "(full compute is always measured first, as the reference)")
    variants = [full_compute(), *[v for v in variants if v.name != FULL_COMPUTE]]
    _check_unique(variants)
    if classifier is not None and classifier.class_ids is None and list(classifier.class_names) != list(model.class_names or []):
        raise ValueError(f"classifier classes {classifier.class_names} differ from the model's "
                         f"{model.class_names}; train the classifier on the model's image set")
    if (extractor is None) != (reference_images is None):
        raise ValueError("FID/KID need both an extractor and reference_images (or neither)")
    if labels is None:
        if init_images is not None:
            raise ValueError("init_images need their class labels (one per image)")
        labels = settings.quality_labels(model.num_classes)
    labels = torch.as_tensor(labels)
    known = classifier.knows(labels) if classifier is not None else None
    if init_images is not None and len(init_images) != len(labels):
        raise ValueError(f"{len(init_images)} init_images but {len(labels)} labels: give one label per image")
    t_labels = labels[: settings.timing_batch]
    t_init = init_images[: settings.timing_batch] if init_images is not None else None
    ref_feats = extractor(reference_images) if extractor is not None else None
    if workers > 1:   # every image and timing comes from torchrun workers; the figures are made here, as below
        measured, world = _measure_on_workers(model, variants, settings, labels, init_images, workers, work_dir,
                                              progress)
    else:
        from .distributed import World

        measured, world = None, World(device=str(model.transformer.device)).describe()
        _warm_up(model, settings, t_labels, t_init)

    rows, images, samples, timings = [], {}, {}, {}
    full_flops = None
    bar = progress_bar(variants, desc="sweep" if measured is None else "sweep: figures", unit="variant",
                       disable=not progress)
    for v in bar:
        bar.set_postfix_str(v.name[:40])
        row = {"name": v.name, "curve": v.curve, "family": v.family, "knob": v.knob,
               "config": json.dumps(v.describe(), sort_keys=True, default=str), "error": ""}
        try:
            if measured is None:
                imgs, flops = _quality_run(model, v, labels, settings, init_images)
            else:
                imgs, flops = _from_workers(measured, v.name, "quality")
            if full_flops is None:
                full_flops = flops
            images[v.name] = imgs
            row["gflops_per_image"] = flops / len(labels) / 1e9
            row["flop_ratio"] = flops / full_flops
            # full compute against itself: the sweep's noise floor, so it gets noise_pairs pairs
            if measured is None:
                t_full, t_var = _time_pair(model, v, settings, t_labels, t_init, repeats=_pairs_of(v, settings))
            else:
                t_full, t_var = _from_workers(measured, v.name, "timing")
            timings[v.name] = {"full": t_full, "variant": t_var}
            row["t_full_s"], row["t_variant_s"] = statistics.median(t_full), statistics.median(t_var)
            ratio = ratio_ci(t_var, t_full, settings.confidence, settings.resamples, settings.seed, paired=True)
            row["time_ratio"] = ratio.estimate   # the median of the pairs' ratios
            row.update(_ci_columns("time_ratio", ratio))
            full = images[FULL_COMPUTE]
            per = {"psnr": psnr(imgs, full).numpy().astype(float), "ssim": ssim(imgs, full).numpy().astype(float),
                   "mse": mse(imgs, full).numpy().astype(float)}
            if lpips_model is not None:
                from .lpips import lpips_distance

                per["lpips"] = np.asarray(lpips_distance(imgs, full, lpips_model), dtype=float).reshape(-1)
            if classifier is not None and bool(known.any()):  # only samples of classes it knows
                hit = np.full(len(labels), np.nan)
                hit[known.numpy()] = (classifier.predict_ids(imgs[known]) == labels[known]).float().numpy()
                per["class_hit"] = hit
            row.update(quality_columns(per, settings))
            samples[v.name] = per
            if extractor is not None:
                dq = distribution_quality(imgs, ref_feats, extractor, kid_subset_size=min(1000, len(imgs)),
                                          confidence=settings.confidence, seed=settings.seed)
                # FID below its floor (feature dimension + 1 images per set) is NaN with the reason
                row["fid"] = np.nan if dq["fid"] is None else dq["fid"]
                row["fid_reason"] = dq["fid_reason"] or ""
                row["kid"], row["kid_std"] = dq["kid_mean"], dq["kid_std"]
                for m in ("fid", "kid"):
                    lo, hi = dq[f"{m}_ci"] or (None, None)
                    row[f"{m}_ci_low"] = np.nan if lo is None else lo
                    row[f"{m}_ci_high"] = np.nan if hi is None else hi
                row["kid_subsets"], row["kid_subset_size"] = dq["kid_subsets"], dq["kid_subset_size"]
                row["fid_n"], row["fid_n_reference"] = dq["n_images"], dq["n_reference"]
                row["fid_min_images"] = dq["fid_min_images"]
                row["fid_extractor"], row["fid_comparable"] = dq["extractor"], dq["comparable_to_published"]
        except Exception as e:  # a point that cannot run is reported, never dropped
            if v.name == FULL_COMPUTE:
                raise
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=3)
        rows.append(row)
    bar.close()
    frame = pd.DataFrame(rows)
    for col in ("flop_ratio", "time_ratio", "gflops_per_image", "t_full_s", "t_variant_s", *QUALITY_COLUMNS):
        if col not in frame:
            frame[col] = np.nan
    frame["flop_speedup"] = 1 / frame["flop_ratio"]
    frame["time_speedup"] = 1 / frame["time_ratio"]
    floor = timing_noise_floor(timings, settings.confidence)
    add_timing_columns(frame, floor)
    first = ["name", "curve", "family", "knob", "flop_ratio", "flop_speedup", "time_ratio", "time_speedup",
             "time_within_noise", "realisation", "psnr", "ssim", "mse", "lpips", "class_consistency", "fid", "kid",
             "gflops_per_image", "t_full_s", "t_variant_s", "error"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    return SweepResult(frame=frame, images=images, labels=labels, settings=settings, variants=list(variants),
                       samples=samples, timings=timings, noise_floor=floor, world=world)


def _pairs_of(v: Variant, settings: SweepSettings) -> int | None:
    """Timed pairs of ``v``: full compute against itself is the sweep's noise floor, so it gets ``noise_pairs``."""
    return max(settings.timing_repeats, settings.noise_pairs) if v.name == FULL_COMPUTE else None


# ---- the sweep on torchrun workers (tclab.distributed) ----------------------------------------------------
#
# Work units: ("time", variant) and ("quality", variant, shard). Shards are quality_batch samples, so each is
# one of the batches a single process runs, with its rows of the whole run's starting noise: a shard's
# images are those of the one-process sweep, at any world size. No unit needs another's result, so each
# rank claims the next unclaimed unit when it is free (tclab.distributed.ShardFolder.claimed), the timing
# units (the longest) first; a rank times its variants against full compute on its own device. The
# process that launched the workers reads the units back and makes every figure from the images and
# timings exactly as the one-process sweep does (run_sweep), so the quality columns are equal.

SWEEP_PLAN = "sweep_plan.pt"


def sweep_units(variants: Sequence[Variant], num_samples: int, shard_size: int) -> list[tuple]:
    """Every unit of a worker sweep, in the order the ranks claim them: each variant's timing (full compute's,
    the noise floor, first), then each variant's quality shards."""
    from .distributed import shard_bounds

    bounds = shard_bounds(num_samples, shard_size)
    return ([("time", v.name) for v in variants]
            + [("quality", v.name, lo, hi) for v in variants for lo, hi in bounds])


def _measure_on_workers(model, variants, settings, labels, init_images, workers: int, work_dir, progress: bool):
    """Hand the sweep to ``workers`` torchrun processes (``tclab sweep-worker``) and wait; returns the
    measurements and the world they ran on. ``work_dir`` (None: a temporary folder) keeps the plan, the
    finished units and one log per rank; it is removed after success, kept (and named) after a failure."""
    import shutil
    import tempfile
    from pathlib import Path

    from .distributed import ShardFolder, launch_workers

    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="tclab-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    units = sweep_units(variants, len(labels), settings.quality_batch)
    torch.save({"model": model, "variants": list(variants), "settings": settings, "labels": labels,
                "init_images": init_images}, work / SWEEP_PLAN)
    folder = ShardFolder(work / "units")
    t0 = time.perf_counter()
    launch_workers(workers, ["sweep-worker", str(work)], work / "logs",
                   on_poll=folder.progress(f"sweep ({workers} workers)") if progress else None)
    seconds = time.perf_counter() - t0
    missing = folder.missing(len(units))
    if missing:
        raise RuntimeError(f"the workers finished but units {missing[:8]} are missing from {folder.path}")
    world = json.loads((work / "world.json").read_text(encoding="utf-8"))
    measured, unit_seconds = _read_units(folder, units, variants)   # into memory, before the folder goes
    shutil.rmtree(work, ignore_errors=True)
    # what the sweep cost, for the cost model of N devices (benchmarks/bench_workers.py)
    world["seconds"] = {"launch_to_end": round(seconds, 2), "units": unit_seconds}
    return measured, world


def _read_units(folder, units: list[tuple], variants: Sequence[Variant]) -> tuple[dict[str, dict], list]:
    """``(per variant, unit seconds)``: per variant ``quality`` (its shards' images in sample order, their FLOPs
    summed) and ``timing``, or the ``error`` one of its units recorded; each unit's ``[kind, variant, seconds]``."""
    out: dict[str, dict] = {v.name: {"quality": [], "timing": None, "error": ""} for v in variants}
    seconds = []
    for u, unit in enumerate(units):
        d, payload = out[unit[1]], folder.read(u)
        seconds.append([unit[0], unit[1], round(payload["seconds"], 3)])
        if payload["error"]:
            d["error"] = d["error"] or payload["error"]
        elif unit[0] == "time":
            d["timing"] = (payload["full"], payload["variant"])
        else:
            d["quality"].append(payload)
    for d in out.values():
        parts = sorted(d.pop("quality"), key=lambda p: p["lo"])
        if not d["error"]:
            d["quality"] = (torch.cat([p["images"] for p in parts]), sum(p["flops"] for p in parts))
    return out, seconds


def _from_workers(measured: dict[str, dict], name: str, key: str):
    """What the workers measured of ``name`` (``quality`` or ``timing``); a unit's error is raised here, so
    the point is kept with its error as in the one-process sweep."""
    if measured[name]["error"]:
        raise RuntimeError(measured[name]["error"])
    return measured[name][key]


def run_sweep_worker(work_dir, resume: bool = False) -> None:
    """One torchrun rank of a worker sweep (``tclab sweep-worker DIR``, started by :func:`run_sweep` with
    ``workers > 1``): runs its units of the plan in ``DIR`` and writes each to ``DIR/units``. A unit whose
    variant fails records the error (as the one-process sweep keeps a failed point); full compute failing
    fails the rank."""
    from pathlib import Path

    from .distributed import ShardFolder, close_world, init_world, write_atomic
    from .sampling import sampling_start

    work = Path(work_dir)
    world = init_world()
    try:
        plan = torch.load(work / SWEEP_PLAN, map_location="cpu", weights_only=False)
        model, variants, settings = plan["model"].to(world.device), plan["variants"], plan["settings"]
        labels, init_images = plan["labels"], plan["init_images"]
        units = sweep_units(variants, len(labels), settings.quality_batch)
        by_name = {v.name: v for v in variants}
        folder = ShardFolder(work / "units")
        folder.start({"units": len(units), "variants": [v.name for v in variants], "samples": len(labels),
                      "shard_size": settings.quality_batch}, world, resume)
        described = world.describe()
        if world.is_main:
            write_atomic(work / "world.json", lambda f: f.write(json.dumps(described).encode()))
        t_labels = labels[: settings.timing_batch]
        t_init = init_images[: settings.timing_batch] if init_images is not None else None
        _warm_up(model, settings, t_labels, t_init)
        noise, x0 = sampling_start(model, len(labels), settings.seed, init_images)
        for u in folder.claimed(len(units), world):
            folder.write(u, _run_unit(model, by_name[units[u][1]], units[u], settings, labels, init_images, noise, x0,
                                      t_labels, t_init))
    finally:
        close_world(world)


def _run_unit(model, v: Variant, unit: tuple, settings, labels, init_images, noise, x0, t_labels, t_init) -> dict:
    t0 = time.perf_counter()
    try:
        if unit[0] == "time":
            t_full, t_var = _time_pair(model, v, settings, t_labels, t_init, repeats=_pairs_of(v, settings))
            out = {"full": t_full, "variant": t_var, "error": ""}
        else:
            lo, hi = unit[2], unit[3]
            start = (noise[lo:hi], x0[lo:hi] if x0 is not None else None)
            imgs, flops = _quality_run(model, v, labels[lo:hi], settings,
                                       init_images[lo:hi] if init_images is not None else None, start)
            out = {"images": imgs, "flops": flops, "lo": lo, "hi": hi, "error": ""}
    except Exception as e:
        if v.name == FULL_COMPUTE:
            raise
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3)}
    out["seconds"] = time.perf_counter() - t0   # the unit's cost, for the scale-out cost model
    return out


def add_timing_columns(frame, floor: Interval | None) -> None:
    """Add ``realisation`` (with ``realisation_ci_low`` / ``_high`` from the time ratio's interval),
    ``time_within_noise`` (the time ratio lies inside the noise floor ``floor``, or its own interval holds
    1: not a measured speed-up or slow-down; None without a floor) and ``noise_floor_low`` / ``_high`` to
    a sweep frame, in place."""
    saved = 1 - frame["flop_ratio"].astype(float)
    ok = saved > 1e-9

    def share(t):
        return np.where(ok, (1 - t) / saved.where(ok), np.nan)

    frame["realisation"] = share(frame["time_ratio"].astype(float))
    if "time_ratio_ci_high" in frame:   # realisation falls as the time ratio rises
        frame["realisation_ci_low"] = share(frame["time_ratio_ci_high"].astype(float))
        frame["realisation_ci_high"] = share(frame["time_ratio_ci_low"].astype(float))
    if floor is None:
        frame["time_within_noise"] = None
        return
    frame["noise_floor_low"], frame["noise_floor_high"] = floor.low, floor.high
    lo = frame["time_ratio_ci_low"].astype(float) if "time_ratio_ci_low" in frame else frame["time_ratio"] * np.nan
    hi = frame["time_ratio_ci_high"].astype(float) if "time_ratio_ci_high" in frame else frame["time_ratio"] * np.nan
    frame["time_within_noise"] = [
        None if not np.isfinite(t) else bool(floor.contains(t) or (np.isfinite(a) and np.isfinite(b) and a <= 1 <= b))
        for t, a, b in zip(frame["time_ratio"].astype(float), lo, hi)]


# ---- reading a sweep ----------------------------------------------------------------------------------
#
# Every reader takes a sweep as a SweepResult (per-sample values: differences are tested, paired on the
# shared seeds) or as its bare frame (a hand-made table, a CSV read back: nothing can be tested, so no
# "winner" is named, only a leader on point estimates).

@dataclass(frozen=True)
class PairedComparer:
    """Paired tests between the points of one sweep (``tclab.stats.paired_difference`` on the per-sample
    values of :attr:`SweepResult.samples`: same seeds, same labels for every point)."""

    samples: Mapping[str, Mapping[str, np.ndarray]]
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0

    def values(self, name: str, quality: str) -> np.ndarray | None:
        key = "class_hit" if quality == "class_consistency" else quality
        v = self.samples.get(name, {}).get(key)
        return None if v is None else np.asarray(v, dtype=float)

    def test(self, better: str, other: str, quality: str):
        """``better`` against ``other`` on ``quality``, oriented so a positive difference means ``better``
        is better (for MSE / LPIPS: lower). None when either has no per-sample values (FID, KID)."""
        a, b = self.values(better, quality), self.values(other, quality)
        if a is None or b is None or a.shape != b.shape:
            return None
        keep = ~(np.isnan(a) | np.isnan(b))     # class_hit: samples of classes the classifier knows
        if keep.sum() < 2:
            return None
        sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
        return paired_difference(sign * a[keep], sign * b[keep], self.confidence, self.resamples, self.seed)


def _frame_and_comparer(sweep) -> tuple[Any, PairedComparer | None]:
    if isinstance(sweep, SweepResult):
        st = sweep.settings
        return sweep.frame, PairedComparer(sweep.samples, confidence=st.confidence, resamples=st.resamples, seed=st.seed)
    return sweep, None


def _usable(frame, cost: str, quality: str):
    ok = frame["error"].fillna("") == ""
    return ok & np.isfinite(frame[cost].astype(float)) & np.isfinite(frame[quality].astype(float))


def pareto_front(sweep, cost: str = "flop_ratio", quality: str = "psnr", exclude_reference: bool = True):
    """Boolean Series: True where no other point has lower-or-equal cost and better-or-equal quality
    (one of them strictly). Full compute is left out by default (its paired quality is perfect by
    construction); failed points and points without the quality are never on the front. Point
    estimates only: :func:`pareto_ties` says which steps along the front are within noise."""
    frame, _ = _frame_and_comparer(sweep)
    _check_column(frame, cost, COST_COLUMNS)
    _check_column(frame, quality, QUALITY_COLUMNS)
    sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
    cand = _usable(frame, cost, quality)
    if exclude_reference:
        cand &= frame["family"] != "reference"
    c = frame[cost].to_numpy(float)
    q = sign * frame[quality].to_numpy(float)
    idx = np.flatnonzero(cand.to_numpy())
    on = np.zeros(len(frame), dtype=bool)
    for i in idx:
        dominated = any((c[j] <= c[i] and q[j] >= q[i]) and (c[j] < c[i] or q[j] > q[i]) for j in idx if j != i)
        on[i] = not dominated
    import pandas as pd

    return pd.Series(on, index=frame.index, name="pareto")


def pareto_ties(sweep: SweepResult, cost: str = "flop_ratio", quality: str = "psnr") -> dict[str, str]:
    """Pareto points that are there on point estimates only: ``{point: cheaper point}`` for every point of
    the front whose quality gain over the last cheaper front point with a real gain (the cheapest point
    to begin with) is not distinguishable (paired test).
    Such a point costs more for a gain the sweep cannot tell from noise. Empty for a bare frame."""
    frame, comparer = _frame_and_comparer(sweep)
    if comparer is None:
        return {}
    front = frame[pareto_front(frame, cost, quality)].sort_values(cost, kind="stable")
    out = {}
    names = front["name"].tolist()
    anchor = names[0] if names else None   # the last cheaper front point whose gain was real (or the cheapest)
    for dearer in names[1:]:
        t = comparer.test(dearer, anchor, quality)
        if t is not None and not t.distinguishable:
            out[dearer] = anchor            # small steps do not add up to a tie: each is tested from the anchor
        else:
            anchor = dearer
    return out


def _check_column(frame, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        raise ValueError(f"unknown column {name!r}; choose one of {list(allowed)}")
    if name not in frame:
        raise ValueError(f"the sweep has no {name!r} column (was it measured? e.g. FID needs an extractor)")


def best_under_budget(sweep, budget: float, cost: str = "flop_ratio", quality: str = "psnr",
                      families: Sequence[str] = ("ablation",)) -> dict | None:
    """The best point (by ``quality``) among ``families`` whose ``cost`` is at most ``budget`` (e.g.
    ``budget=0.5`` = at least 2x cheaper than full compute). None when no point fits. Equal estimates
    go to the cheaper point.

    Given a :class:`SweepResult`, the row also says which other points within the budget it cannot be
    told from (``tied_with``: paired test of ``quality`` on the shared seeds, cheapest first) and
    ``tested`` (False for a bare frame: nothing could be tested)."""
    frame, comparer = _frame_and_comparer(sweep)
    _check_column(frame, cost, COST_COLUMNS)
    _check_column(frame, quality, QUALITY_COLUMNS)
    check_budget(budget, "cost ratio")
    m = _usable(frame, cost, quality) & frame["family"].isin(list(families)) & (frame[cost] <= budget)
    if not m.any():
        return None
    sub = frame[m]
    sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
    order = np.lexsort((sub[cost].to_numpy(float), -sign * sub[quality].to_numpy(float)))
    best = _plain_row(sub.iloc[order[0]])
    tied = []
    # alone within the budget: tested (vacuously) when its values are there; else as soon as a test ran
    tested = comparer is not None and len(order) == 1 and comparer.values(best["name"], quality) is not None
    if comparer is not None:
        for i in order[1:]:
            other = sub.iloc[i]["name"]
            t = comparer.test(best["name"], other, quality)
            if t is None:
                continue
            tested = True
            if not t.distinguishable:
                tied.append((float(sub.iloc[i][cost]), other))
    best["tied_with"] = [n for _, n in sorted(tied)]
    best["tested"] = tested
    return best


def _plain_row(row) -> dict:
    """A frame row as plain JSON values; ``<m>_ci_low`` / ``<m>_ci_high`` become ``<m>_ci: [low, high]``."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.floating, float)):
            out[k] = None if not math.isfinite(float(v)) else float(v)
        elif isinstance(v, np.integer):
            out[k] = int(v)
        elif isinstance(v, np.bool_):
            out[k] = bool(v)
        else:
            out[k] = v
    for k in [k for k in out if k.endswith("_n") and isinstance(out[k], float)]:
        out[k] = int(out[k])       # counts: float in a frame only because a failed row holds NaN
    intervals = {k[: -len("_ci_low")]: [out.pop(k), out.pop(k[: -len("_ci_low")] + "_ci_high", None)]
                 for k in [k for k in out if k.endswith("_ci_low")]}
    if intervals:   # each interval right after its figure ("<m>_ci" beside "<m>")
        ordered = {}
        for k, v in out.items():
            ordered[k] = v
            if k in intervals:
                ordered[f"{k}_ci"] = intervals.pop(k)
        ordered.update({f"{k}_ci": v for k, v in intervals.items()})
        out = ordered
    if isinstance(out.get("config"), str):
        out["config"] = json.loads(out["config"])
    out.pop("traceback", None)
    return out


def compare_at_reductions(sweep, reductions: Sequence[float] = (2, 3), cost: str = "flop_ratio",
                          quality: str = "psnr", also: Sequence[str] = ("class_consistency",),
                          families: Sequence[str] = ("ablation",)):
    """Which curve leads at each cost reduction (2 = half the cost of full compute), and is its lead real?

    For every reduction r and every curve among ``families``: the curve's best point (by ``quality``)
    with ``cost <= 1/r``. Returns a frame ``reduction, curve, name, <cost>, <quality>,
    <quality>_ci_low / _high, <also...>, rank`` (rank 1 = leader on point estimates; curves with no
    point within the budget get rank NaN and say so in ``name``), and per curve its paired comparison
    with the leader on the shared seeds: ``behind`` (the leader's quality minus this curve's, oriented
    so positive = the leader is better), ``behind_ci_low`` / ``_high``, ``p_value`` and ``tied``
    (not distinguishable from the leader; the leader is ``tied`` when any curve is). A bare frame
    (no per-sample values) is not tested: ``tied`` only where the estimates are equal. Measured
    points only: a curve is not credited with a quality it was never seen at.
    """
    import pandas as pd

    frame, comparer = _frame_and_comparer(sweep)
    rows = []
    for r in reductions:
        if not r > 1:
            raise ValueError(f"reductions must be > 1 (2 = half the cost), got {r!r}")
        for curve, sub in frame[frame["family"].isin(list(families))].groupby("curve", sort=False):
            best = best_under_budget(sub, 1.0 / r, cost, quality, families=families)
            row = {"reduction": float(r), "curve": curve}
            if best is None:
                row.update({"name": "no point within budget", cost: np.nan, quality: np.nan,
                            **{a: np.nan for a in also}})
            else:
                lo, hi = best.get(f"{quality}_ci") or (None, None)
                row.update({"name": best["name"], cost: best[cost], quality: best[quality],
                            f"{quality}_ci_low": np.nan if lo is None else lo,
                            f"{quality}_ci_high": np.nan if hi is None else hi,
                            **{a: best.get(a) if best.get(a) is not None else np.nan for a in also}})
            rows.append(row)
    cols = ["reduction", "curve", "name", cost, quality, f"{quality}_ci_low", f"{quality}_ci_high", *also]
    out = pd.DataFrame(rows, columns=cols)
    sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
    out["rank"] = out.groupby("reduction")[quality].rank(ascending=sign < 0, method="min")
    # equal quality: the cheaper point ranks first (as in best_under_budget)
    out = out.sort_values(["reduction", "rank", cost], na_position="last").reset_index(drop=True)
    out["behind"], out["behind_ci_low"], out["behind_ci_high"], out["p_value"] = np.nan, np.nan, np.nan, np.nan
    out["tied"] = False
    for r, sub in out[out["rank"].notna()].groupby("reduction"):
        leader = sub.index[0]
        for i in sub.index[1:]:
            t = comparer.test(out.at[leader, "name"], out.at[i, "name"], quality) if comparer else None
            if t is None:
                tied = out.at[i, "rank"] == out.at[leader, "rank"]
                out.at[i, "behind"] = sign * (out.at[leader, quality] - out.at[i, quality])
            else:
                tied = not t.distinguishable
                d = t.difference
                out.at[i, "behind"], out.at[i, "behind_ci_low"], out.at[i, "behind_ci_high"] = d.estimate, d.low, d.high
                out.at[i, "p_value"] = t.p_value
            out.at[i, "tied"] = bool(tied)
            out.at[leader, "tied"] = bool(out.at[leader, "tied"] or tied)
    return out


def _ci(v) -> list | None:
    """A ``[low, high]`` pair from a frame/plain row value, or None when the interval is unknown."""
    if not isinstance(v, (list, tuple)) or len(v) != 2 or any(x is None for x in v):
        return None
    return [float(v[0]), float(v[1])]


def headline(sweep, reductions: Sequence[float] = (2, 3), budget: float = 0.5, cost: str = "flop_ratio",
             quality: str = "psnr") -> dict:
    """The numbers a reader wants first, as plain values for ``summary.json``.

    Per reduction: the ``leader`` (best curve on point estimates), its point, PSNR and class-consistency
    with their intervals, the curves ``tied_with`` it (not distinguishable, paired test on the shared
    seeds), the ``winner`` (the leader, named only when no curve is tied with it and the sweep could be
    tested: a bare frame names none), its margin over the runner-up with the margin's interval and
    p-value, and the best baseline or peer at the same reduction with the leader's paired margin over
    it. Also full compute's class-consistency; the best point under ``budget`` (ablated variants only,
    and over every family including baselines and peers) with the points it is tied with; the Pareto
    points and the front's ties (:func:`pareto_ties`)."""
    frame, comparer = _frame_and_comparer(sweep)
    comp = compare_at_reductions(sweep, reductions, cost, quality)
    full = frame[frame["name"] == FULL_COMPUTE]
    full_cc = float(full["class_consistency"].iloc[0]) if len(full) and "class_consistency" in full else float("nan")
    out: dict[str, Any] = {"cost": cost, "quality": quality, "budget": budget,
                           "full_compute_class_consistency": finite_or_none(full_cc)}
    rows = {r["name"]: _plain_row(r) for _, r in frame.iterrows()}
    for r in reductions:
        sub = comp[(comp["reduction"] == float(r)) & comp["rank"].notna()]
        key = f"at_{r:g}x"
        if sub.empty:
            out[key] = {"leader": None, "winner": None, "note": f"no ablated variant reached {r:g}x lower {cost}"}
            continue
        w = sub.iloc[0]
        point = rows[w["name"]]
        tied = sub[sub["tied"] & (sub.index != sub.index[0])]["curve"].tolist()
        if len(sub) > 1:
            tested = comparer is not None and bool(sub.iloc[1:]["p_value"].notna().all())
        else:   # one curve: nothing to lose to, but named the winner only where its values could be tested
            tested = comparer is not None and comparer.values(w["name"], quality) is not None
        d = {"leader": w["curve"], "winner": w["curve"] if tested and not tied else None, "tested": bool(tested),
             "point": w["name"], cost: finite_or_none(w[cost]), quality: finite_or_none(w[quality]),
             f"{quality}_ci": _ci(point.get(f"{quality}_ci")), f"{quality}_n": point.get(f"{quality}_n"),
             "class_consistency": finite_or_none(w.get("class_consistency")),
             "class_consistency_ci": _ci(point.get("class_consistency_ci")), "tied_with": tied}
        if len(sub) > 1:
            ru = sub.iloc[1]
            cc = comparer.test(w["name"], ru["name"], "class_consistency") if comparer else None
            d.update({"runner_up": ru["curve"], f"{quality}_margin": finite_or_none(ru["behind"]),
                      f"{quality}_margin_ci": _ci([finite_or_none(ru["behind_ci_low"]),
                                                    finite_or_none(ru["behind_ci_high"])]),
                      f"{quality}_margin_p": finite_or_none(ru["p_value"]),
                      "class_consistency_margin": finite_or_none(w.get("class_consistency", np.nan)
                                                                 - ru.get("class_consistency", np.nan)),
                      "class_consistency_margin_ci": _ci([cc.difference.low, cc.difference.high]) if cc else None})
        out[key] = d
        ref = best_under_budget(frame, 1.0 / r, cost, quality, families=("baseline", "peer"))
        if ref is not None:
            t = comparer.test(w["name"], ref["name"], quality) if comparer else None
            out[key]["best_reference"] = {"name": ref["name"], cost: ref[cost], quality: ref[quality],
                                          f"{quality}_ci": _ci(ref.get(f"{quality}_ci")),
                                          "class_consistency": ref.get("class_consistency"),
                                          # the leader's paired margin over it (positive: the leader is better)
                                          "margin": t.difference.estimate if t else None,
                                          "margin_ci": _ci([t.difference.low, t.difference.high]) if t else None,
                                          "margin_p": t.p_value if t else None,
                                          "distinguishable": t.distinguishable if t else None}
    best = best_under_budget(sweep, budget, cost, quality)
    overall = best_under_budget(sweep, budget, cost, quality, families=("ablation", "baseline", "peer"))
    out["best_under_budget"] = {k: best.get(k) for k in POINT_KEYS} if best else None
    out["best_under_budget_any_method"] = {k: overall.get(k) for k in POINT_KEYS} if overall else None
    out["pareto_points"] = frame.loc[pareto_front(frame, cost, quality), "name"].tolist()
    out["pareto_ties"] = pareto_ties(sweep, cost, quality) if comparer else {}
    return out


def check_budget(budget, what: str = "cost ratio") -> None:
    """A budget is a positive number (a ratio to full compute: 0.5 = half); ``True`` is not one."""
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"budget must be a positive {what} (0.5 = half of full compute), got {budget!r}")


def finite_or_none(v) -> float | None:
    """``float(v)`` when it is a finite number, else None (for plain-JSON summaries)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


#: The figures :func:`table` shows with their interval, "value [low, high]".
INTERVAL_COLUMNS = ("time_ratio", "realisation", "psnr", "ssim", "lpips", "class_consistency", "fid", "kid")


def table(sweep, columns: Sequence[str] = ("name", "curve", "family", "flop_ratio", "time_ratio", "realisation",
                                              "psnr", "ssim", "lpips", "class_consistency", "fid", "kid", "kid_std",
                                              "fid_n", "error"),
          decimals: int = 3):
    """The sweep (a :class:`SweepResult`, or its frame) as a readable table for people: rounded, columns
    that were not measured left out, and each figure of :data:`INTERVAL_COLUMNS` with its interval in
    one cell, "24.98 [24.12, 25.80]" (at the sweep's confidence; ``n`` is the row's paired samples; the
    numbers themselves are in the sweep's frame). ``time_noise`` says "within noise" where the time ratio lies inside the sweep's
    full-vs-full noise floor: not a speed-up nor a slow-down. ``pareto_flops`` / ``pareto_time`` mark
    the PSNR Pareto points against each cost ("yes"), or "tie with X" where the gain over the next
    cheaper front point X is within noise (:func:`pareto_ties`). Where FID was asked for but its sets
    were below the floor, the ``fid`` cell says "not computed: N images, needs at least M"."""
    frame, comparer = _frame_and_comparer(sweep)
    fid_reasons = frame["fid_reason"].fillna("").astype(str) if "fid_reason" in frame else None
    refused = fid_reasons is not None and (fid_reasons != "").any()
    cols = [c for c in columns if c in frame and not (frame[c].isna().all() and c in QUALITY_COLUMNS)
            or (c == "fid" and refused)]
    out = frame[cols].copy()
    for c in [c for c in cols if c in INTERVAL_COLUMNS and f"{c}_ci_low" in frame]:
        v, lo, hi = (frame[k].astype(float) for k in (c, f"{c}_ci_low", f"{c}_ci_high"))
        out[c] = [("" if not np.isfinite(x) else f"{x:.{decimals}f}"
                   + (f" [{a:.{decimals}f}, {b:.{decimals}f}]" if np.isfinite(a) and np.isfinite(b) else ""))
                  for x, a, b in zip(v, lo, hi)]
    if "psnr_n" in frame and "psnr" in out:
        out.insert(out.columns.get_loc("psnr") + 1, "n", frame["psnr_n"].astype("Int64"))
    if "time_within_noise" in frame and "time_ratio" in out:
        out.insert(out.columns.get_loc("time_ratio") + 1, "time_noise",
                   ["within noise" if w is True else "" for w in frame["time_within_noise"]])
    for col, cost in (("pareto_flops", "flop_ratio"), ("pareto_time", "time_ratio")):
        on = pareto_front(frame, cost, "psnr")
        ties = pareto_ties(sweep, cost, "psnr") if comparer is not None else {}
        out[col] = [("tie with " + ties[n] if n in ties else "yes") if o else "" for n, o in zip(frame["name"], on)]
    out = out.round(decimals)
    if refused and "fid" in out:
        short = fid_reasons.str.split(" (", n=1, regex=False).str[0]   # "not computed: 6 images, needs at least 129"
        out["fid"] = [s if s else v for s, v in zip(short, out["fid"])]
    return out


def summarise_sweep(result: SweepResult, budget: float = 0.5, reductions: Sequence[float] = (2, 3),
                    model=None, image_set=None, labels: Mapping[str, Any] | None = None) -> SweepSummary:
    """Everything ``summary.json`` of an ablation run holds, as a :class:`tclab.sweep_summary.SweepSummary`
    (the run writes its ``to_dict()``).

    ``flops`` / ``wall_clock``: the full :func:`headline` against each cost; ``headline`` (flat, for
    ``reports/index.html``, derived from them): per reduction r the winning curve, its PSNR and
    class-consistency and its PSNR margin over the runner-up (FLOPs), and the best point under
    ``budget`` (its name, FLOP and time ratios, PSNR). ``best_under_budget``: the recommended
    configuration (its ``cache`` is a ``TokenCacheConfig`` dict: what ``05_inhouse_report`` reads).
    ``points``: every row of the sweep. ``identity``: the model's weights hash when ``model`` is given,
    the manifest hash of the image set whose classes were sampled when ``image_set`` is. ``labels``: how
    the image folders map onto the model's classes (``LabelMap.to_dict()``). ``report``: the report's
    first screen (:func:`sweep_report`). ``noise_floor``: :attr:`SweepResult.noise_floor`;
    ``resolution``: :func:`samples_needed_table`.
    """
    frame = result.frame
    floor = result.noise_floor
    identity = None
    if model is not None or image_set is not None:
        identity = SweepIdentity(model=model.name if model is not None else None,
                                 model_weights_sha256=model.identity()["weights_sha256"] if model is not None else None,
                                 images_manifest_sha256=image_set.manifest_hash() if image_set is not None else None)
    # a hand-made frame may lack columns a sweep always has (ssim, ...): read as absent, written as null
    views = {key: CostView.from_dict(headline(result, reductions, budget, cost, "psnr"), key, cost, complete=False)
             for key, cost in (("flops", "flop_ratio"), ("wall_clock", "time_ratio"))}
    resolution = samples_needed_table(result, reductions=reductions)
    summary = SweepSummary(
        **views, extra={"world": dict(result.world)} if result.world is not None else {},
        settings=SweepSettingsRecord.from_dict(asdict(result.settings)),
        points=tuple(_plain_row(r) for _, r in frame.iterrows()), identity=identity,
        labels=dict(labels) if labels is not None else None,
        noise_floor=floor.to_dict("time_ratio") if floor is not None else None,
        resolution=tuple(_plain_row(r) for _, r in resolution.iterrows()))
    return replace(summary, report=sweep_report(summary, reductions))


#: The differences :func:`samples_needed_table` asks about by default: 0.5 dB of PSNR, 5 points of
#: class-consistency (the sizes the ablations' conclusions turn on).
RESOLVE = {"psnr": 0.5, "class_consistency": 0.05}


def samples_needed_table(result: SweepResult, differences: Mapping[str, float] = RESOLVE, power: float = 0.8,
                         reductions: Sequence[float] = (2, 3)):
    """How many paired samples would resolve each difference in ``differences`` (e.g. 0.5 dB of PSNR),
    from the spread this sweep measured (``tclab.stats.samples_needed``, two-sided at
    ``settings.confidence``, ``power``).

    The spread is that of the per-sample differences in the comparisons the report makes: at each of
    ``reductions``, the leading curve's point against every other curve's best point
    (:func:`compare_at_reductions`); where no reduction has two curves, every pair of ablated points.
    Returns a frame ``metric, difference, samples, pairs, sd_median, needed_median, sd_p90, needed_p90,
    resolves``: the median spread over those pairs and its 90th percentile (the harder comparisons),
    the samples each needs, what this sweep had (``samples``), and whether that is enough for the
    median pair (``resolves``).
    """
    import pandas as pd

    frame, comparer = _frame_and_comparer(result)
    comp = compare_at_reductions(result, reductions)
    pairs = []
    for _, sub in comp[comp["rank"].notna()].groupby("reduction"):
        names = sub["name"].tolist()
        pairs += [(names[0], other) for other in names[1:]]
    if not pairs:
        names = frame[(frame["family"] == "ablation") & (frame["error"].fillna("") == "")]["name"].tolist()
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rows = []
    for metric, diff in differences.items():
        sds, n = [], 0
        for a, b in dict.fromkeys(pairs):
            x, y = comparer.values(a, metric), comparer.values(b, metric)
            if x is None or y is None:
                continue
            d = x - y
            d = d[~np.isnan(d)]
            if d.size >= 2:
                sds.append(float(d.std(ddof=1)))
                n = max(n, int(d.size))
        row = {"metric": metric, "difference": float(diff), "samples": n, "pairs": len(sds)}
        if sds:
            med, p90 = float(np.median(sds)), float(np.quantile(sds, 0.9))
            need = [samples_needed(sd, diff, result.settings.confidence, power) if sd > 0 else 2 for sd in (med, p90)]
            row.update(sd_median=med, needed_median=need[0], sd_p90=p90, needed_p90=need[1], resolves=bool(n >= need[0]))
        else:
            row.update(sd_median=np.nan, needed_median=None, sd_p90=np.nan, needed_p90=None, resolves=None)
        rows.append(row)
    return pd.DataFrame(rows, columns=["metric", "difference", "samples", "pairs", "sd_median", "needed_median",
                                       "sd_p90", "needed_p90", "resolves"])


def describe_resolution(table) -> str:
    """The samples-needed table in sentences, for the notebooks."""
    lines = []
    for _, r in table.iterrows():
        unit = " dB" if r["metric"] == "psnr" else ""
        size = f"{r['difference'] * 100:g} points" if r["metric"] == "class_consistency" else f"{r['difference']:g}{unit}"
        if r["needed_median"] is None or (isinstance(r["needed_median"], float) and math.isnan(r["needed_median"])):
            lines.append(f"{r['metric']}: not measured, so no estimate of the samples a {size} difference needs.")
            continue
        lines.append(f"{r['metric']}: resolving a {size} difference between two points needs about "
                     f"{int(r['needed_median'])} paired samples for a typical comparison this report makes (median spread "
                     f"{r['sd_median']:.3g}) and {int(r['needed_p90'])} for the harder ones (90th percentile); this "
                     f"sweep had {int(r['samples'])}: " + ("enough." if r["resolves"] else
                                                            "too few, so differences of that size here are within noise."))
    return "\n".join(lines)


def is_tokencache_curve(curve: str) -> bool:
    """Whether an ablated curve is TokenCache's own choice on its axis (the paper's method): the learned
    Cache Predictor (which tokens), adaptive block selection (which blocks), TPRR (when)."""
    return curve in ("learned-static", "learned-dynamic", "adaptive") or curve.startswith("TPRR")


def _db(v) -> str:
    return "-" if v is None else f"{format_number(v, 'dB')} dB"


def interval_text(ci, unit: str = "dB") -> str:
    """" [24.1, 25.8]": an interval after its number in a finding's text (``unit`` "dB", "%" or "x"), or ""
    when there is none. The ablation and the in-house reports both write their intervals with it."""
    if ci is None or ci[0] is None or ci[1] is None:
        return ""
    if unit == "%":
        return f" [{ci[0]:.0%}, {ci[1]:.0%}]"
    if unit == "x":
        return f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f" [{format_number(ci[0], unit)}, {format_number(ci[1], unit)}]"


def _p(p) -> str:
    return "" if p is None else (f", p = {p:.2g}" if p >= 0.001 else ", p < 0.001")


def _leader_finding(d, r: float, n: int | None) -> Finding:
    """Does TokenCache's own choice lead at ``r``x, and is the lead real (paired test on the shared seeds)?"""
    within = f"at most 1/{r:g} of full compute's FLOPs"
    cc = d.class_consistency
    text = (f"The best ablated variant is {d.leader} ({d.point}: {_db(d.psnr)}{interval_text(d.psnr_ci)}"
            + (f", class-consistency {cc:.0%}{interval_text(d.class_consistency_ci, '%')}" if cc is not None else "") + ")")
    if d.runner_up and d.psnr_margin is not None:
        text += f", {d.psnr_margin:.2f} dB{interval_text(d.psnr_margin_ci)} ahead of {d.runner_up}{_p(d.psnr_margin_p)}"
    group = (d.leader, *d.tied_with)
    ours = [is_tokencache_curve(c) for c in group]
    if not d.tested:
        verdict = HOLDS if any(ours) else DOES_NOT_HOLD
        text += " (not tested: no per-sample values; point estimates only)."
    elif d.tied_with:
        verdict = HOLDS if all(ours) else (DOES_NOT_HOLD if not any(ours) else WITHIN_NOISE)
        text += (f"; tied with {', '.join(d.tied_with)}: the sweep cannot tell them apart"
                 + (f" at N = {n}" if n else "") + ", so no winner is named.")
    elif d.runner_up is None:
        verdict = HOLDS if ours[0] else DOES_NOT_HOLD
        text += "; the only ablated curve this cheap."
    else:
        verdict = HOLDS if ours[0] else DOES_NOT_HOLD
        text += "; it is the winner (distinguishable from every other curve, paired test)."
    return Finding(text, verdict, "TokenCache's own choice (learned predictor / adaptive blocks / TPRR) has the highest "
                   f"PSNR vs full compute among the ablated variants {within}, distinguishably (paired test); a tie "
                   "between it and another choice is within noise", f"at {r:g}x fewer FLOPs")


def _rival_finding(d, r: float) -> Finding:
    within = f"at most 1/{r:g} of full compute's FLOPs"
    ref = d.best_reference
    criterion = (f"the best ablated variant beats every baseline and peer (fewer steps, FORA, external caches) {within}, "
                 "distinguishably (paired test on the shared seeds)")
    beats = d.psnr > ref.psnr
    if ref.margin is not None:
        beats = ref.margin > 0
        gap = f"{abs(ref.margin):.2f} dB {'above' if beats else 'below'} it (paired margin{interval_text(ref.margin_ci)}{_p(ref.margin_p)})"
    else:
        gap = f"{abs(d.psnr - ref.psnr):.1f} dB {'above' if beats else 'below'} it"
    text = (f"The best rival at the same cost is {ref.name} at {_db(ref.psnr)}{interval_text(ref.psnr_ci)}: the best ablated "
            f"variant is {gap}")
    if ref.distinguishable is None:
        return Finding(text + " (not tested: point estimates only).", HOLDS if beats else DOES_NOT_HOLD, criterion,
                       f"at {r:g}x fewer FLOPs")
    if not ref.distinguishable:
        return Finding(text + ", within noise: the two cannot be told apart.", WITHIN_NOISE, criterion,
                       f"at {r:g}x fewer FLOPs")
    return Finding(text + ".", HOLDS if beats else DOES_NOT_HOLD, criterion, f"at {r:g}x fewer FLOPs")


def _budget_finding(best, budget, floor) -> Finding:
    group = f"within the budget ({budget:g} of full compute's FLOPs)" if budget is not None else "within the budget"
    criterion = ("its FLOP saving shows in wall-clock: time ratio below 1 and outside the timing noise floor (full "
                 "compute against itself, measured in the same sweep)")
    tr = best.time_ratio
    text = (f"The recommended setting is {best.name}: {best.flop_ratio:.2f}x the FLOPs and "
            + (f"{tr:.2f}x{interval_text(best.time_ratio_ci, 'x')} the wall-clock of full compute" if tr is not None
               else "wall-clock not measured") + f", {_db(best.psnr)}{interval_text(best.psnr_ci)}")
    if best.tied_with:
        text += f"; tied on PSNR with {', '.join(best.tied_with[:3])}" + (" and more" if len(best.tied_with) > 3 else "")
    if tr is None:
        return Finding(text + ".", NOT_MEASURED, criterion, group)
    if best.time_within_noise:
        floor_text = interval_text((floor or {}).get("time_ratio_ci"), "x")
        return Finding(text + f"; its wall-clock is within noise of full compute's (noise floor{floor_text}).",
                       WITHIN_NOISE, criterion, group)
    return Finding(text + ".", HOLDS if tr < 1 else DOES_NOT_HOLD, criterion, group)


def noise_floor_note(low: float | None, high: float | None, pairs: int | None = None) -> str:
    """What the timing noise floor is, for its key number (the ablation and the in-house reports): the
    spread of the full-vs-full ratios, not an interval of the median beside it. "" without a floor."""
    if low is None or high is None:
        return ""
    return (f"median of {pairs if pairs is not None else 'the'} full-vs-full pairs; a ratio between {low:.2f} and "
            f"{high:.2f} is within noise")


def sweep_report(summary: SweepSummary | Mapping[str, Any], reductions: Sequence[float] = (2, 3)):
    """The first screen of an ablation report (:class:`tclab.report.ReportSummary`) from
    :func:`summarise_sweep`'s summary (or its JSON form). Per cost reduction r: does TokenCache's own
    choice on this axis (:func:`is_tokencache_curve`) lead among the ablated variants, distinguishably
    ("within noise" when it is tied with another choice), and does the best ablated point beat the best
    rival (fewer steps, FORA, peers) at the same FLOPs; within the budget: the recommended point, and
    whether its FLOP saving shows up in wall-clock beyond the timing noise floor; how many samples
    the sweep's differences need."""
    if not isinstance(summary, SweepSummary):
        summary = SweepSummary.from_dict(summary)
    n = summary.settings.quality_samples if summary.settings else None
    findings = []
    for r in reductions:
        d = summary.flops.at(r)
        within = f"at most 1/{r:g} of full compute's FLOPs"
        if d is None or not d.leader:
            findings.append(Finding(f"No ablated variant reached {r:g}x fewer FLOPs.", NOT_MEASURED,
                                    f"a measured point {within}", f"at {r:g}x fewer FLOPs"))
            continue
        findings.append(_leader_finding(d, r, n))
        if d.best_reference and d.best_reference.psnr is not None and d.psnr is not None:
            findings.append(_rival_finding(d, r))
        else:
            findings.append(Finding("No baseline or peer was measured at this cost.", NOT_MEASURED,
                                    f"a baseline or peer {within}", f"at {r:g}x fewer FLOPs"))
    best, budget = summary.best_under_budget, summary.flops.budget
    if best:
        findings.append(_budget_finding(best, budget, summary.noise_floor))
    else:
        group = f"within the budget ({budget:g} of full compute's FLOPs)" if budget is not None else "within the budget"
        findings.append(Finding("No ablated variant fits the budget.", NOT_MEASURED,
                                "a measured point within the FLOP budget", group))
    for row in summary.resolution:
        if row.get("metric") == "psnr" and row.get("needed_median") is not None:
            enough = bool(row.get("resolves"))
            findings.append(Finding(
                f"Resolving {row['difference']:g} dB between two points takes about {int(row['needed_median'])} paired "
                f"samples (the median spread of the comparisons above); this sweep had {row['samples']}.",
                HOLDS if enough else DOES_NOT_HOLD,
                f"the sweep has enough samples to tell apart points {row['difference']:g} dB apart (80% power)",
                "the sweep"))
    if summary.failed_points:
        findings.append(Finding(f"{summary.failed_points} of {len(summary.points)} points failed; their errors are in "
                                "the sweep table.", DOES_NOT_HOLD, "every point of the sweep ran", "the sweep"))
    spec = [("best_under_budget", "recommended setting (within the budget)", ""),
            ("best_flop_ratio", "its FLOPs (of full compute)", "x"),
            ("best_time_ratio", "its wall-clock (of full compute)", "x"),
            ("best_psnr", "its PSNR vs full compute", "dB"),
            ("best_class_consistency", "its class-consistency", "%"),
            ("full_compute_class_consistency", "full compute's class-consistency", "%")]
    no_winner = {}   # a leader but no winner: why, shown where the winner would be
    for r in reductions:
        t = f"{r:g}x"
        spec += [(f"leader_at_{t}_flops", f"best ablated variant at {t} fewer FLOPs", ""),
                 (f"winner_at_{t}_flops", "distinguishable winner there (none: tied)", ""),
                 (f"psnr_at_{t}", "its PSNR", "dB"),
                 (f"psnr_best_reference_at_{t}", f"best rival's PSNR at {t} fewer FLOPs", "dB")]
        d = summary.flops.at(r)
        if d is not None and d.leader is not None and d.winner is None:
            no_winner[f"winner_at_{t}_flops"] = "none (tied)" if d.tied_with else "not tested"
    spec += [("time_noise_floor", "full compute against itself (timing noise floor)", "x"),
             ("points", "points measured", ""), ("failed_points", "points that failed", "")]
    conf = summary.settings.confidence if summary.settings and summary.settings.confidence else 0.95
    floor = summary.noise_floor or {}
    numbers = []
    for k in key_numbers_from(summary.headline, spec, conf):
        if k.key in no_winner:
            k = replace(k, value=no_winner[k.key])
        elif k.key == "time_noise_floor":
            k = replace(k, note=noise_floor_note(*(floor.get("time_ratio_ci") or (None, None)), floor.get("time_ratio_n")))
        if k.value is not None:
            numbers.append(k)
    index = [k for k in ("best_under_budget", "best_flop_ratio", "best_psnr") if any(n.key == k for n in numbers)]
    index = index or [n.key for n in numbers[:3]]       # nothing within the budget: the first numbers there are
    return ReportSummary(findings=findings, key_numbers=numbers, index_keys=index)


def images_of_winners(result: SweepResult, budget: float, cost: str = "flop_ratio", quality: str = "psnr",
                      families: Sequence[str] = ("ablation",)) -> dict[str, torch.Tensor]:
    """``{"full compute": images, "<curve>: <point>": images, ...}``: full compute and, per curve, its
    best point within ``budget`` (curves with no point within it are left out), for image grids."""
    out = {FULL_COMPUTE: result.full_images}
    frame = result.frame
    for curve, sub in frame[frame["family"].isin(list(families))].groupby("curve", sort=False):
        best = best_under_budget(sub, budget, cost, quality, families=families)
        if best is not None and best["name"] in result.images:
            label = f"{best['name']} ({best[quality]:.1f} dB)" if quality == "psnr" else best["name"]
            out[label] = result.images[best["name"]]
    return out


# ---- the ablation notebooks (02-04) ----------------------------------------------------------------------

@dataclass
class AblationStudy:
    """One run of an ablation notebook (02-04), one step per call, so the notebook keeps only what is its
    own (its parameters, its variants, the cells that show the results).

    :func:`open_study` makes it: ``model`` (a ``LoadedDiT``), ``prepared`` (the image folder and its label
    map, ``tclab.prepare.PreparedImages``), ``settings`` (sampling the classes the folders map to),
    ``classifier`` (None: class-consistency not measured), ``predictors`` (``{kind: file}`` of the learned
    scorers) and ``run`` (the run folder, ``tclab.runs.RunContext``). Then :meth:`plan` (the notebook's
    variants and the reference points), :meth:`measure` (``result``, also ``sweep.csv``),
    :meth:`summarise` (``summary``), :meth:`uncertainty` (what the sample can resolve) and
    :meth:`write_summary`.
    """

    model: Any
    prepared: Any
    settings: SweepSettings
    classifier: Any
    predictors: dict
    run: Any
    variants: list[Variant] = field(default_factory=list)
    result: SweepResult | None = None
    summary: SweepSummary | None = None
    #: torchrun worker processes that measure the sweep (:func:`run_sweep`); 1 = this kernel
    workers: int = 1

    def plan(self, variants: Sequence[Variant], fora_intervals: Sequence[int] = (2, 3),
             fewer_steps: Sequence[int] = (25, 17), peers: Sequence[str] | str = DEFAULT_PEERS,
             taylorseer: Sequence[Sequence[int]] = ()) -> None:
        """The points to measure: ``variants`` (the ablation's own) and the :func:`reference_variants`
        every plot shows, each learned scorer pointed at the predictor file :func:`open_study` checked.
        Prints the run folder, the model's identity and what will be measured."""
        from .prepare import with_predictor_paths

        planned = [*variants, *reference_variants(self.settings.num_steps, fora_intervals, fewer_steps, peers,
                                                   taylorseer)]
        self.variants = with_predictor_paths(planned, self.predictors)
        print(self.run.dir)
        print(self.model.identity())
        print(f"{len(self.variants)} points; settings {self.settings}")

    def measure(self):
        """Run the planned points in one harness (:func:`run_sweep`) and save the table as ``sweep.csv`` and
        the per-sample values and timings behind it as ``samples.npz`` (:func:`load_samples`).
        Returns the points that failed (``name``, ``error``; empty when every point ran)."""
        if not self.variants:
            raise RuntimeError("nothing to measure: call plan(variants) first")
        work = self.run.path("workers") if self.workers > 1 else None   # removed when the sweep succeeds
        self.result = run_sweep(self.model, self.variants, self.settings, classifier=self.classifier,
                                workers=self.workers, work_dir=work)
        print(describe_world(self.result.world))
        frame = self.result.frame
        frame.to_csv(self.run.path("sweep.csv"), index=False)
        self.result.save_samples(self.run.path("samples.npz"))
        return frame[frame["error"] != ""][["name", "error"]]

    def summarise(self, budget: float = 0.5, reductions: Sequence[float] = (2, 3)) -> dict:
        """The run's :class:`tclab.sweep_summary.SweepSummary` (:func:`summarise_sweep`, with the model,
        the image set and the label map), kept in ``summary``. Prints the best point within ``budget``
        (ablated variants only, then over every method) and returns the flat headline."""
        if self.result is None:
            raise RuntimeError("nothing measured yet: call measure() first")
        self.summary = summarise_sweep(self.result, budget, reductions, model=self.model,
                                       image_set=self.prepared.image_set, labels=self.prepared.label_map.to_dict())
        for best in (self.summary.best_under_budget, self.summary.flops.best_under_budget_any_method):
            print(best.to_dict() if best is not None else None)
        return self.summary.headline

    def uncertainty(self):
        """What the sweep can and cannot resolve: prints how its intervals were made, the timing noise
        floor and, per difference of :data:`RESOLVE`, the samples it needs (:func:`describe_resolution`);
        returns the :func:`samples_needed_table`."""
        if self.result is None:
            raise RuntimeError("nothing measured yet: call measure() first")
        st, floor = self.result.settings, self.result.noise_floor
        print(f"N = {len(self.result.labels)} paired samples per point (same seeds for every point); "
              f"{st.confidence:.0%} intervals: percentile bootstrap over the samples ({st.resamples} resamples, "
              f"seed {st.seed}), Wilson for class-consistency; differences: paired bootstrap and sign-flip test.")
        if floor is not None:
            print(f"Timing noise floor: full compute against itself over {floor.n} pair(s) of {st.timing_batch} "
                  f"image(s): time ratios between {floor.low:.3f} and {floor.high:.3f} are not a speed-up or "
                  "slow-down ('within noise' in the table).")
        table = samples_needed_table(self.result, reductions=self.summary.reductions if self.summary else (2, 3))
        print(describe_resolution(table))
        return table

    def write_summary(self):
        """Write ``summary.json`` (the summary's ``to_dict()``) into the run folder; returns its path."""
        if self.summary is None:
            raise RuntimeError("no summary yet: call summarise(budget, reductions) first")
        return self.run.write_summary(self.summary.to_dict())


def open_study(notebook: str, run_dir: str | None, model, images, labels, settings: SweepSettings,
               scorers: Sequence[str] = (), classifier: str | None = None, predictor: Any = "auto",
               train_missing: bool = True, workers: int = 1) -> AblationStudy:
    """Everything an ablation notebook needs before it measures, in this order: load ``model`` (a
    ``load_dit`` spec, or a ``LoadedDiT``), load ``images`` and map its folders onto the model's
    classes (``labels``, :func:`tclab.prepare.load_images`), sample those classes (``settings.classes``,
    unless set), find (or, with ``train_missing``, train) the predictor of each learned scorer among
    ``scorers`` and the class-consistency ``classifier`` (:mod:`tclab.prepare`), and open the run folder
    ``run_dir`` (None: a new one under reports/) for ``notebook``. ``workers``: torchrun processes that
    measure the sweep (:func:`run_sweep`; 1 = this process)."""
    check_workers(workers)
    from . import prepare, runs
    from .models import LoadedDiT, load_dit

    dit = model if isinstance(model, LoadedDiT) else load_dit(model)
    prepared = prepare.load_images(images, dit, labels)
    if settings.classes is None:
        settings = replace(settings, classes=prepared.label_map.sample_classes)
    predictors = prepare.ensure_predictors(dit, prepare.learned_kinds(scorers), predictor, train_missing,
                                           num_steps=settings.num_steps, scheduler=settings.scheduler,
                                           guidance_scale=settings.guidance_scale, images=images, labels=labels)
    clf = prepare.classifier_for(dit, classifier, prepared.image_set, prepared.label_map, train_missing)
    run = runs.open_run(run_dir, notebook=notebook)
    return AblationStudy(dit, prepared, settings, clf, predictors, run, workers=workers)


def check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (torchrun processes on this machine; 1 = this process), "
                         f"got {workers!r}")


def describe_world(world: Mapping[str, Any] | None) -> str:
    """One sentence for a report: how many processes measured, with which backend, on which devices."""
    if not world:
        return "Measured in one process."
    on = describe_devices(world)
    if world.get("world_size", 1) == 1:
        return f"Measured in one process, on {on}."
    return (f"Measured by {world['world_size']} torchrun workers ({world.get('backend')}), on {on}; each timed its "
            "variants against full compute on its own device.")
