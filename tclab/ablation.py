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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .cache import TokenCacheConfig, apply_caching
from .cache.config import fora_config
from .cache.methods import method_config
from .cache.peers import PEERS, peer_names
from .labels import balanced_labels
from .metrics import count_flops, distribution_quality, mse, psnr, ssim
from .report import DOES_NOT_HOLD, HOLDS, NOT_MEASURED, Finding, ReportSummary, format_number, key_numbers_from
from .sampling import SampleConfig, sample
from .sweep_summary import CostView, SweepIdentity, SweepSettingsRecord, SweepSummary

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

def reference_variants(num_steps: int, fora_intervals: Sequence[int] = (2, 3), fewer_steps: Sequence[int] = (25, 17),
                       peers: Sequence[str] | str = DEFAULT_PEERS) -> list[Variant]:
    """Full compute and the reference points every ablation plot shows: fewer sampling steps (the
    cheapest rival: same FLOPs per step, fewer steps), FORA (block-level caching, round-robin) and the
    external peers (diffusers' cache hooks, cache-dit): ``peers="registered"`` (the notebooks' default)
    is every registered peer, a team's own included. ``fewer_steps`` values >= ``num_steps`` are
    dropped (they would not save anything)."""
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
    return out


def predictor_variants(scorers: Sequence[str], rhos: Sequence[float], base: dict | None = None) -> list[Variant]:
    """Which tokens: one curve per scorer (``learned-static``, ``learned-dynamic``, ``oracle``,
    ``prev-change``, ``toca``, ``random``), one point per keep ratio ``rho``; everything else from
    ``base`` (TokenCacheConfig fields)."""
    base = dict(base or {})
    return [Variant(f"{s} {_budget_label(r)}", str(s), cache={**base, "scorer": str(s), "rho": float(r)},
                    knob=_budget_label(r)) for s in scorers for r in rhos]


def block_selection_variants(selections: Sequence[str], rhos: Sequence[float], base: dict | None = None,
                             full_end_blocks: Sequence[int] = (), full_end_selection: str = "global") -> list[Variant]:
    """Which blocks: one curve per selection method (``uniform``, ``adaptive``, ``global``) and, for each
    k in ``full_end_blocks``, a curve of ``full_end_selection`` with the first and last k blocks
    always full. One point per ``rho``."""
    base = dict(base or {})
    out = [Variant(f"{s} {_budget_label(r)}", str(s), cache={**base, "selection": str(s), "rho": float(r)},
                   knob=_budget_label(r)) for s in selections for r in rhos]
    for k in full_end_blocks:
        curve = f"{full_end_selection} + first/last {int(k)} full"
        out += [Variant(f"{curve} {_budget_label(r)}", curve,
                        cache={**base, "selection": full_end_selection, "rho": float(r),
                               "full_first_blocks": int(k), "full_last_blocks": int(k)},
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
            pairs are timed; the median of each is used.
        quality_batch: images per forward in the quality run.
        sdedit_strength: with ``init_images`` in :func:`run_sweep`: how far the images are noised.
        classes: the model class ids the quality samples cycle over (e.g. the classes a team's folders
            map to, ``tclab.labels.LabelMap.class_ids``); None = ``0..K-1`` over the model's classes.
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

    def __post_init__(self) -> None:
        if self.classes is not None:
            if (not isinstance(self.classes, (list, tuple)) or not self.classes
                    or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.classes)):
                raise ValueError(f"classes must be a non-empty list of class ids (integers >= 0) or None, "
                                 f"got {self.classes!r}")
            self.classes = [int(c) for c in self.classes]
        for name in ("quality_samples", "timing_batch", "timing_repeats", "quality_batch"):
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
    under ``"full compute"``), their class ``labels``, and the settings."""

    frame: Any  # pandas.DataFrame
    images: dict[str, torch.Tensor]
    labels: torch.Tensor
    settings: SweepSettings
    variants: list[Variant]

    @property
    def full_images(self) -> torch.Tensor:
        return self.images[FULL_COMPUTE]

    def per_image_error(self, name: str) -> dict[str, np.ndarray]:
        """Per-image PSNR / SSIM / MSE of variant ``name`` against full compute (same seeds)."""
        if name not in self.images:
            raise KeyError(f"no images of {name!r}: it failed or is not in this sweep (see frame['error']); "
                           f"variants with images: {sorted(self.images)}")
        a, b = self.images[name], self.full_images
        return {"psnr": psnr(a, b).numpy(), "ssim": ssim(a, b).numpy(), "mse": mse(a, b).numpy()}


def _run(model, variant: Variant, labels: torch.Tensor, config: SampleConfig, init_images=None):
    detach = variant.attach(model)
    try:
        if variant.num_steps is not None:
            config = SampleConfig(**{**config.__dict__, "num_steps": variant.num_steps})
        return sample(model, labels, config, init_images=init_images, progress=False)
    finally:
        detach()


def _time_pair(model, variant: Variant, settings: SweepSettings, labels: torch.Tensor,
               init_images=None) -> tuple[float, float]:
    """Median seconds of (full compute, variant) on the timing batch.

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
    for i in range(settings.timing_repeats):
        if i % 2 == 0:
            full.append(once(full_compute()))
            var.append(once(variant))
        else:
            var.append(once(variant))
            full.append(once(full_compute()))
    return statistics.median(full), statistics.median(var)


def run_sweep(model, variants: Sequence[Variant], settings: SweepSettings | None = None, classifier=None,
              extractor=None, reference_images=None, labels: torch.Tensor | None = None,
              init_images: torch.Tensor | None = None, lpips_model=None, progress: bool = True) -> SweepResult:
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
    knob, flop_ratio, flop_speedup, gflops_per_image, time_ratio, time_speedup, t_full_s,
    t_variant_s, realisation`` ((1 - time ratio) / (1 - FLOP ratio): the share of saved FLOPs that
    became saved time), ``psnr, ssim, mse, lpips, class_consistency, fid, kid, error, config`` (JSON);
    quality columns that were not measured are NaN.
    """
    import pandas as pd
    from .progress import progress_bar

    settings = settings or SweepSettings()
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
    # warm-up: first calls allocate and pick kernels; keep that out of every timed run
    sample(model, t_labels, settings.sample_config(num_steps=2, batch_size=settings.timing_batch),
           init_images=t_init, progress=False)

    rows, images = [], {}
    full_flops = None
    bar = progress_bar(variants, desc="sweep", unit="variant", disable=not progress)
    for v in bar:
        bar.set_postfix_str(v.name[:40])
        row = {"name": v.name, "curve": v.curve, "family": v.family, "knob": v.knob,
               "config": json.dumps(v.describe(), sort_keys=True, default=str), "error": ""}
        try:
            with count_flops() as fc:
                res = _run(model, v, labels, settings.sample_config(), init_images)
            flops = fc.result.flops
            if full_flops is None:
                full_flops = flops
            imgs = res.images
            images[v.name] = imgs
            row["gflops_per_image"] = flops / len(labels) / 1e9
            row["flop_ratio"] = flops / full_flops
            t_full, t_var = _time_pair(model, v, settings, t_labels, t_init)
            row["t_full_s"], row["t_variant_s"] = t_full, t_var
            row["time_ratio"] = t_var / t_full
            full = images[FULL_COMPUTE]
            row["psnr"] = float(psnr(imgs, full).mean())
            row["ssim"] = float(ssim(imgs, full).mean())
            row["mse"] = float(mse(imgs, full).mean())
            if lpips_model is not None:
                from .lpips import lpips_distance

                row["lpips"] = float(lpips_distance(imgs, full, lpips_model).mean())
            if classifier is not None and bool(known.any()):  # only samples of classes it knows
                hit = classifier.predict_ids(imgs[known]) == labels[known]
                row["class_consistency"] = float(hit.float().mean())
                row["class_consistency_n"] = int(known.sum())
            if extractor is not None:
                dq = distribution_quality(imgs, ref_feats, extractor, kid_subset_size=min(1000, len(imgs)))
                # FID below its floor (feature dimension + 1 images per set) is NaN with the reason
                row["fid"] = np.nan if dq["fid"] is None else dq["fid"]
                row["fid_reason"] = dq["fid_reason"] or ""
                row["kid"], row["kid_std"] = dq["kid_mean"], dq["kid_std"]
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
    saved = 1 - frame["flop_ratio"]
    frame["realisation"] = np.where(saved > 1e-9, (1 - frame["time_ratio"]) / saved.where(saved > 1e-9), np.nan)
    first = ["name", "curve", "family", "knob", "flop_ratio", "flop_speedup", "time_ratio", "time_speedup",
             "realisation", "psnr", "ssim", "mse", "lpips", "class_consistency", "fid", "kid", "gflops_per_image",
             "t_full_s", "t_variant_s", "error"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    return SweepResult(frame=frame, images=images, labels=labels, settings=settings, variants=list(variants))


# ---- reading a sweep ----------------------------------------------------------------------------------

def _usable(frame, cost: str, quality: str):
    ok = frame["error"].fillna("") == ""
    return ok & np.isfinite(frame[cost].astype(float)) & np.isfinite(frame[quality].astype(float))


def pareto_front(frame, cost: str = "flop_ratio", quality: str = "psnr", exclude_reference: bool = True):
    """Boolean Series: True where no other point has lower-or-equal cost and better-or-equal quality
    (one of them strictly). Full compute is left out by default (its paired quality is perfect by
    construction); failed points and points without the quality are never on the front."""
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


def _check_column(frame, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        raise ValueError(f"unknown column {name!r}; choose one of {list(allowed)}")
    if name not in frame:
        raise ValueError(f"the sweep has no {name!r} column (was it measured? e.g. FID needs an extractor)")


def best_under_budget(frame, budget: float, cost: str = "flop_ratio", quality: str = "psnr",
                      families: Sequence[str] = ("ablation",)) -> dict | None:
    """The best point (by ``quality``) among ``families`` whose ``cost`` is at most ``budget`` (e.g.
    ``budget=0.5`` = at least 2x cheaper than full compute). None when no point fits. Ties go to
    the cheaper point."""
    _check_column(frame, cost, COST_COLUMNS)
    _check_column(frame, quality, QUALITY_COLUMNS)
    check_budget(budget, "cost ratio")
    m = _usable(frame, cost, quality) & frame["family"].isin(list(families)) & (frame[cost] <= budget)
    if not m.any():
        return None
    sub = frame[m]
    sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
    order = np.lexsort((sub[cost].to_numpy(float), -sign * sub[quality].to_numpy(float)))
    return _plain_row(sub.iloc[order[0]])


def _plain_row(row) -> dict:
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
    if isinstance(out.get("config"), str):
        out["config"] = json.loads(out["config"])
    out.pop("traceback", None)
    return out


def compare_at_reductions(frame, reductions: Sequence[float] = (2, 3), cost: str = "flop_ratio",
                          quality: str = "psnr", also: Sequence[str] = ("class_consistency",),
                          families: Sequence[str] = ("ablation",)):
    """Which curve wins at each cost reduction (2 = half the cost of full compute)?

    For every reduction r and every curve among ``families``: the curve's best point (by ``quality``)
    with ``cost <= 1/r``. Returns a frame ``reduction, curve, name, <cost>, <quality>, <also...>,
    rank`` (rank 1 = winner; curves with no point within the budget get rank NaN and say so in
    ``name``). Measured points only: a curve is not credited with a quality it was never seen at.
    """
    import pandas as pd

    rows = []
    for r in reductions:
        if not r > 1:
            raise ValueError(f"reductions must be > 1 (2 = half the cost), got {r!r}")
        for curve, sub in frame[frame["family"].isin(list(families))].groupby("curve", sort=False):
            best = best_under_budget(sub, 1.0 / r, cost, quality, families=families)
            row = {"reduction": float(r), "curve": curve}
            if best is None:
                row.update({"name": "no point within budget", cost: np.nan, quality: np.nan, **{a: np.nan for a in also}})
            else:
                row.update({"name": best["name"], cost: best[cost], quality: best[quality],
                            **{a: best.get(a) if best.get(a) is not None else np.nan for a in also}})
            rows.append(row)
    out = pd.DataFrame(rows, columns=["reduction", "curve", "name", cost, quality, *also])
    sign = 1.0 if HIGHER_IS_BETTER[quality] else -1.0
    out["rank"] = out.groupby("reduction")[quality].rank(ascending=sign < 0, method="min")
    out["tied"] = out.duplicated(["reduction", "rank"], keep=False) & out["rank"].notna()
    # equal quality: the cheaper point ranks first (as in best_under_budget)
    return out.sort_values(["reduction", "rank", cost], na_position="last").reset_index(drop=True)


def headline(frame, reductions: Sequence[float] = (2, 3), budget: float = 0.5, cost: str = "flop_ratio",
             quality: str = "psnr") -> dict:
    """The numbers a reader wants first, as plain values for ``summary.json``: per reduction the
    winning curve, its point, its PSNR and class-consistency and its margin over the runner-up, and
    the best baseline or peer at the same reduction; full compute's class-consistency; the best point under ``budget`` (ablated variants only,
    and over every family including baselines and peers); the Pareto points."""
    comp = compare_at_reductions(frame, reductions, cost, quality)
    full = frame[frame["name"] == FULL_COMPUTE]
    full_cc = float(full["class_consistency"].iloc[0]) if len(full) and "class_consistency" in full else float("nan")
    out: dict[str, Any] = {"cost": cost, "quality": quality, "budget": budget,
                           "full_compute_class_consistency": finite_or_none(full_cc)}
    for r in reductions:
        sub = comp[(comp["reduction"] == float(r)) & comp["rank"].notna()].sort_values(["rank", cost], kind="stable")
        key = f"at_{r:g}x"
        if sub.empty:
            out[key] = {"winner": None, "note": f"no ablated variant reached {r:g}x lower {cost}"}
            continue
        w = sub.iloc[0]
        d = {"winner": w["curve"], "point": w["name"], cost: finite_or_none(w[cost]), quality: finite_or_none(w[quality]),
             "class_consistency": finite_or_none(w.get("class_consistency")),
             "tied_with": sub[(sub["rank"] == w["rank"]) & (sub["curve"] != w["curve"])]["curve"].tolist()}
        if len(sub) > 1:
            ru = sub.iloc[1]
            d.update({"runner_up": ru["curve"], f"{quality}_margin": finite_or_none(w[quality] - ru[quality]),
                      "class_consistency_margin": finite_or_none(w.get("class_consistency", np.nan) - ru.get("class_consistency", np.nan))})
        out[key] = d
        ref = best_under_budget(frame, 1.0 / r, cost, quality, families=("baseline", "peer"))
        if ref is not None:
            out[key]["best_reference"] = {"name": ref["name"], cost: ref[cost], quality: ref[quality],
                                          "class_consistency": ref.get("class_consistency")}
    best = best_under_budget(frame, budget, cost, quality)
    overall = best_under_budget(frame, budget, cost, quality, families=("ablation", "baseline", "peer"))
    keep = ("name", "curve", "family", "flop_ratio", "time_ratio", "psnr", "ssim", "class_consistency", "config")
    out["best_under_budget"] = {k: best[k] for k in keep if k in best} if best else None
    out["best_under_budget_any_method"] = {k: overall[k] for k in keep if k in overall} if overall else None
    out["pareto_points"] = frame.loc[pareto_front(frame, cost, quality), "name"].tolist()
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


def table(frame, columns: Sequence[str] = ("name", "curve", "family", "flop_ratio", "time_ratio", "realisation",
                                              "psnr", "ssim", "lpips", "class_consistency", "fid", "kid", "kid_std",
                                              "fid_n", "error"),
          decimals: int = 3):
    """The sweep as a readable table (rounded; columns that were not measured are left out), with
    ``pareto_flops`` / ``pareto_time`` marking the PSNR Pareto points against each cost. Where FID
    was asked for but its sets were below the floor, the ``fid`` cell says "not computed: N images,
    needs at least M" instead of a number."""
    fid_reasons = frame["fid_reason"].fillna("").astype(str) if "fid_reason" in frame else None
    refused = fid_reasons is not None and (fid_reasons != "").any()
    cols = [c for c in columns if c in frame and not (frame[c].isna().all() and c in QUALITY_COLUMNS)
            or (c == "fid" and refused)]
    out = frame[cols].copy()
    out["pareto_flops"] = pareto_front(frame, "flop_ratio", "psnr")
    out["pareto_time"] = pareto_front(frame, "time_ratio", "psnr")
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
    first screen (:func:`sweep_report`).
    """
    frame = result.frame
    identity = None
    if model is not None or image_set is not None:
        identity = SweepIdentity(model=model.name if model is not None else None,
                                 model_weights_sha256=model.identity()["weights_sha256"] if model is not None else None,
                                 images_manifest_sha256=image_set.manifest_hash() if image_set is not None else None)
    # a hand-made frame may lack columns a sweep always has (ssim, ...): read as absent, written as null
    views = {key: CostView.from_dict(headline(frame, reductions, budget, cost, "psnr"), key, cost, complete=False)
             for key, cost in (("flops", "flop_ratio"), ("wall_clock", "time_ratio"))}
    summary = SweepSummary(
        **views,
        settings=SweepSettingsRecord.from_dict(asdict(result.settings)),
        points=tuple(_plain_row(r) for _, r in frame.iterrows()), identity=identity,
        labels=dict(labels) if labels is not None else None)
    return replace(summary, report=sweep_report(summary, reductions))


def is_tokencache_curve(curve: str) -> bool:
    """Whether an ablated curve is TokenCache's own choice on its axis (the paper's method): the learned
    Cache Predictor (which tokens), adaptive block selection (which blocks), TPRR (when)."""
    return curve in ("learned-static", "learned-dynamic", "adaptive") or curve.startswith("TPRR")


def _db(v) -> str:
    return "-" if v is None else f"{format_number(v, 'dB')} dB"


def sweep_report(summary: SweepSummary | Mapping[str, Any], reductions: Sequence[float] = (2, 3)):
    """The first screen of an ablation report (:class:`tclab.report.ReportSummary`) from
    :func:`summarise_sweep`'s summary (or its JSON form). Per cost reduction r: does TokenCache's own
    choice on this axis (:func:`is_tokencache_curve`) win among the ablated variants, and does the best
    ablated point beat the best rival (fewer steps, FORA, peers) at the same FLOPs; within the budget:
    the recommended point, and whether its FLOP saving shows up in wall-clock."""
    if not isinstance(summary, SweepSummary):
        summary = SweepSummary.from_dict(summary)
    findings = []
    for r in reductions:
        d = summary.flops.at(r)
        within = f"at most 1/{r:g} of full compute's FLOPs"
        if d is None or not d.winner:
            findings.append(Finding(f"No ablated variant reached {r:g}x fewer FLOPs.", NOT_MEASURED,
                                    f"a measured point {within}", f"at {r:g}x fewer FLOPs"))
            continue
        ours = any(is_tokencache_curve(c) for c in (d.winner, *d.tied_with))
        runner = (f", {d.psnr_margin:.2f} dB ahead of {d.runner_up}" if d.runner_up and d.psnr_margin is not None
                  else "")
        cc = d.class_consistency
        findings.append(Finding(
            f"The best ablated variant is {d.winner} ({d.point}: {_db(d.psnr)}"
            + (f", class-consistency {cc:.0%}" if cc is not None else "") + f"){runner}.",
            HOLDS if ours else DOES_NOT_HOLD,
            f"TokenCache's own choice (learned predictor / adaptive blocks / TPRR) has the highest PSNR vs full "
            f"compute among the ablated variants {within}", f"at {r:g}x fewer FLOPs"))
        ref = d.best_reference
        if ref and ref.psnr is not None and d.psnr is not None:
            beats = d.psnr > ref.psnr
            findings.append(Finding(
                f"The best rival at the same cost is {ref.name} at {_db(ref.psnr)}: the best ablated "
                f"variant is {abs(d.psnr - ref.psnr):.1f} dB {'above' if beats else 'below'} it.",
                HOLDS if beats else DOES_NOT_HOLD,
                f"the best ablated variant beats every baseline and peer (fewer steps, FORA, external caches) {within}",
                f"at {r:g}x fewer FLOPs"))
        else:
            findings.append(Finding("No baseline or peer was measured at this cost.", NOT_MEASURED,
                                    f"a baseline or peer {within}", f"at {r:g}x fewer FLOPs"))
    best, budget = summary.best_under_budget, summary.flops.budget
    group = f"within the budget ({budget:g} of full compute's FLOPs)" if budget is not None else "within the budget"
    if best:
        tr = best.time_ratio
        findings.append(Finding(
            f"The recommended setting is {best.name}: {best.flop_ratio:.2f}x the FLOPs and "
            + (f"{tr:.2f}x the wall-clock of full compute" if tr is not None else "wall-clock not measured")
            + f", {_db(best.psnr)}.",
            NOT_MEASURED if tr is None else (HOLDS if tr < 1 else DOES_NOT_HOLD),
            "its FLOP saving shows in wall-clock: time ratio below 1 (median of interleaved runs against full "
            "compute, this machine)", group))
    else:
        findings.append(Finding("No ablated variant fits the budget.", NOT_MEASURED,
                                "a measured point within the FLOP budget", group))
    if summary.failed_points:
        findings.append(Finding(f"{summary.failed_points} of {len(summary.points)} points failed; their errors are in "
                                "the sweep table.", DOES_NOT_HOLD, "every point of the sweep ran", "the sweep"))
    spec = [("best_under_budget", "recommended setting (within the budget)", ""),
            ("best_flop_ratio", "its FLOPs (of full compute)", "x"),
            ("best_time_ratio", "its wall-clock (of full compute)", "x"),
            ("best_psnr", "its PSNR vs full compute", "dB"),
            ("best_class_consistency", "its class-consistency", "%"),
            ("full_compute_class_consistency", "full compute's class-consistency", "%")]
    for r in reductions:
        t = f"{r:g}x"
        spec += [(f"winner_at_{t}_flops", f"best ablated variant at {t} fewer FLOPs", ""),
                 (f"psnr_at_{t}", "its PSNR", "dB"),
                 (f"psnr_best_reference_at_{t}", f"best rival's PSNR at {t} fewer FLOPs", "dB")]
    spec += [("points", "points measured", ""), ("failed_points", "points that failed", "")]
    numbers = [k for k in key_numbers_from(summary.headline, spec) if k.value is not None]
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
    :meth:`summarise` (``summary``) and :meth:`write_summary`.
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

    def plan(self, variants: Sequence[Variant], fora_intervals: Sequence[int] = (2, 3),
             fewer_steps: Sequence[int] = (25, 17), peers: Sequence[str] | str = DEFAULT_PEERS) -> None:
        """The points to measure: ``variants`` (the ablation's own) and the :func:`reference_variants`
        every plot shows, each learned scorer pointed at the predictor file :func:`open_study` checked.
        Prints the run folder, the model's identity and what will be measured."""
        from .prepare import with_predictor_paths

        planned = [*variants, *reference_variants(self.settings.num_steps, fora_intervals, fewer_steps, peers)]
        self.variants = with_predictor_paths(planned, self.predictors)
        print(self.run.dir)
        print(self.model.identity())
        print(f"{len(self.variants)} points; settings {self.settings}")

    def measure(self):
        """Run the planned points in one harness (:func:`run_sweep`) and save the table as ``sweep.csv``.
        Returns the points that failed (``name``, ``error``; empty when every point ran)."""
        if not self.variants:
            raise RuntimeError("nothing to measure: call plan(variants) first")
        self.result = run_sweep(self.model, self.variants, self.settings, classifier=self.classifier)
        frame = self.result.frame
        frame.to_csv(self.run.path("sweep.csv"), index=False)
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

    def write_summary(self):
        """Write ``summary.json`` (the summary's ``to_dict()``) into the run folder; returns its path."""
        if self.summary is None:
            raise RuntimeError("no summary yet: call summarise(budget, reductions) first")
        return self.run.write_summary(self.summary.to_dict())


def open_study(notebook: str, run_dir: str | None, model, images, labels, settings: SweepSettings,
               scorers: Sequence[str] = (), classifier: str | None = None, predictor: Any = "auto",
               train_missing: bool = True) -> AblationStudy:
    """Everything an ablation notebook needs before it measures, in this order: load ``model`` (a
    ``load_dit`` spec, or a ``LoadedDiT``), load ``images`` and map its folders onto the model's
    classes (``labels``, :func:`tclab.prepare.load_images`), sample those classes (``settings.classes``,
    unless set), find (or, with ``train_missing``, train) the predictor of each learned scorer among
    ``scorers`` and the class-consistency ``classifier`` (:mod:`tclab.prepare`), and open the run folder
    ``run_dir`` (None: a new one under reports/) for ``notebook``."""
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
    return AblationStudy(dit, prepared, settings, clf, predictors, run)
