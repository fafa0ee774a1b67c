"""The in-house report: given a model and a team's image folder, the one report the team reads.

``notebooks/05_inhouse_report.ipynb`` is built from this module. In order, the report answers:

1. **Is the image set usable?** Every file checked (:func:`tclab.data.load_image_folder`), per-class
   counts, every skipped file with its reason (:func:`bad_images_table`), the manifest hash; then a
   class-balanced subset whose folders are mapped onto the model's classes by the one label rule of
   :mod:`tclab.labels` (:func:`tclab.prepare.select_images`, :func:`class_table`).
2. **Is there redundancy to exploit on these images?** The token-change recorder around an SDEdit
   run of the subset, tested with :func:`tclab.analysis.summarise_redundancy` (TokenCache's three
   observations, ``shared/docs/tokencache.md`` section 1).
3. **Which TokenCache setting?** :func:`recommend` takes the setting the team gave, or
   (``"auto"``) the best point within the FLOP budget of the latest ablation runs of *this* model
   (notebooks 02-04, :func:`find_ablation_recommendation`), or, when none fits, measures a short list
   of candidates here (:func:`measure_candidates`). The :class:`Recommendation` says which path was
   taken and why.
4. **What does it buy and cost on these images?** :func:`measure_on_images`: SDEdit of every
   selected image with full compute and with the recommendation, in one ``tclab.ablation.run_sweep``
   harness (FLOPs counted on what ran, interleaved wall-clock, paired PSNR/SSIM/MSE, class-consistency,
   FID/KID labelled by their feature space).
5. / 6. **What does it look like, and where is it worst?** :meth:`InhouseMeasurement.per_image` and
   :meth:`InhouseMeasurement.worst` (file paths from the manifest) for the figures of
   :func:`tclab.plots.plot_paired_images`.
7. :func:`summarise_report`: ``summary.json`` (flat headline, details, identity).

Selection and evaluation use different images on purpose: the fallback picks among candidates on
the model's own class-conditional samples (as the ablation notebooks do), and the pick is then
measured on the team's images, so the reported quality is not the maximum of several noisy tries
on the same images.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import runs
from .ablation import (FULL_COMPUTE, SweepResult, SweepSettings, Variant, best_under_budget, check_budget,
                       describe_world, finite_or_none, interval_text, noise_floor_note, run_sweep)
from .analysis import observation_findings, to_plain
from .cache import TokenCacheConfig
from .metrics import FID_FLOOR_RULE
from .prepare import select_images  # noqa: F401 (re-exported: its home was here; tests call it)
from .report import (DOES_NOT_HOLD, HOLDS, NOT_MEASURED, WITHIN_NOISE, Finding, KeyNumber, ReportSummary,
                     key_numbers_from, verdict_of)
from .stats import paired_proportion_difference, samples_needed
from .sweep_summary import SweepSettingsRecord, SweepSummaryError

#: The ablation notebooks whose ``summary.json["best_under_budget"]`` the "auto" recommendation reads.
ABLATION_NOTEBOOKS = ("02_ablation_predictor", "03_ablation_block_selection", "04_ablation_tprr")

#: Candidates measured when no ablation run fits: the spec's defaults (learned-static scorer, global
#: selection, TPRR) at two keep ratios and two TPRR interval pairs. The longer intervals (5, 3) are
#: what reaches 2x fewer FLOPs with ``kv="all"`` (K/V projections stay full in cached steps).
DEFAULT_CANDIDATES = (
    {"scorer": "learned-static", "selection": "global", "kv": "all", "rho": 0.25, "schedule": "tprr",
     "k1": 3, "k2": 2, "split": 0.5},
    {"scorer": "learned-static", "selection": "global", "kv": "all", "rho": 0.1, "schedule": "tprr",
     "k1": 3, "k2": 2, "split": 0.5},
    {"scorer": "learned-static", "selection": "global", "kv": "all", "rho": 0.25, "schedule": "tprr",
     "k1": 5, "k2": 3, "split": 0.5},
    {"scorer": "learned-static", "selection": "global", "kv": "all", "rho": 0.1, "schedule": "tprr",
     "k1": 5, "k2": 3, "split": 0.5},
)

#: ``Recommendation.source`` values: which path chose the setting.
FROM_ABLATION_RUN = "ablation run"
MEASURED_HERE = "measured here"
GIVEN = "given"
RECOMMENDED_PREFIX = "recommended: "


# ---- 1. the image set ---------------------------------------------------------------------------------

def bad_images_table(image_set):
    """Every file of ``image_set`` (a :class:`tclab.data.ImageSet`) that was skipped, with the reason:
    a pandas frame ``path`` (relative to the folder), ``reason``. Empty when every file was usable."""
    import pandas as pd

    return pd.DataFrame([{"path": b.path, "reason": b.reason} for b in image_set.skipped], columns=["path", "reason"])


def describe_image_set(image_set) -> str:
    """The check of an image folder as readable lines: usable and skipped counts, per-class counts,
    the manifest hash (sha256 over path, class and file hash of every usable image)."""
    info = image_set.summary()
    lines = [f"{info['root']}: {info['usable']} usable image(s), {info['skipped']} skipped"
             + ("" if info["skipped"] else " (every file is a usable image)")]
    if image_set.labelled:
        lines.append(f"{len(image_set.class_names)} class folder(s):")
        lines += [f"  {name:24s} {n}" for name, n in info["per_class"].items()]
    else:
        lines.append("flat folder: no class sub-folders, so no labels")
    lines.append(f"manifest sha256 {info['manifest_sha256']}")
    return "\n".join(lines)


def class_table(image_set, used, label_map):
    """Per folder: usable images, the model class it is sampled as (and how that was decided), images
    used in the report."""
    import pandas as pd

    counts: dict[str | None, int] = {}
    for r in used.records:
        counts[r.class_name] = counts.get(r.class_name, 0) + 1
    rows = []
    for r in label_map.rows:
        rows.append({"folder": "(flat folder)" if r.folder is None else r.folder, "usable_in_folder": r.images,
                     "model_class_id": r.class_id, "model_class_name": r.class_name,
                     "how": r.how + (f": {r.note}" if r.note else ""), "used_in_report": counts.get(r.folder, 0)})
    frame = pd.DataFrame(rows)
    frame["model_class_id"] = frame["model_class_id"].astype("Int64")  # ids, not 281.0, beside the unmapped ones
    return frame


# ---- 2. redundancy ---------------------------------------------------------------------------------------

def describe_redundancy(redundancy: dict) -> str:
    """The verdicts of ``tclab.analysis.summarise_redundancy(record)`` on an SDEdit record, as readable
    lines (:func:`tclab.analysis.describe_observations`, which calls a primary record "pure samples",
    relabelled for what was recorded here)."""
    from .analysis import describe_observations

    return describe_observations(redundancy).replace("== pure samples (", "== SDEdit of the in-house images (", 1)


# ---- 3. the recommendation -------------------------------------------------------------------------------

def reports_folder(run) -> Path:
    """The reports folder a run lives in (where the ablation runs are): the run folder's parent, or,
    under ``tclab run`` (the run is built in ``<reports>/.staging/``), the staging folder's parent."""
    if getattr(run, "reports_dir", None) is not None:
        return Path(run.reports_dir)
    parent = Path(run.dir).resolve().parent
    return parent.parent if parent.name == runs.STAGING_DIRNAME else parent


def describe_cache(cache: Mapping[str, Any]) -> str:
    """A short label of a TokenCacheConfig dict, e.g. ``learned-static global rho=0.1 kv=all tprr(5,3,0.5)``."""
    c = TokenCacheConfig.from_dict(dict(cache))
    if c.schedule == "tprr":
        when = f"tprr({c.k1},{c.k2},{c.split:g})"
    elif c.schedule == "round-robin":
        when = f"round-robin({c.interval})"
    else:
        when = f"percentile({c.n_full})"
    extra = "".join(f" {k}={getattr(c, k)}" for k in ("full_first_blocks", "full_last_blocks", "force_last_steps")
                    if getattr(c, k))
    return f"{c.scorer_name} {c.selection} rho={c.rho:g} kv={c.kv} {when}{extra}"


def sdedit_steps(num_steps: int, strength: float) -> int:
    """Steps an SDEdit run executes (as :func:`tclab.sampling.sample`): the last ``strength`` of them."""
    return max(1, round(num_steps * strength))


def fit_cache_to_sdedit(cache: Mapping[str, Any], num_steps: int, strength: float) -> tuple[dict, str | None]:
    """The TokenCacheConfig dict to use on SDEdit runs of ``num_steps`` at ``strength``, and a note when
    it had to change.

    Round-robin and TPRR schedules are relative to the run's own steps and carry over unchanged. A
    ``percentile`` schedule holds one importance per step of the *full* trajectory; SDEdit runs only
    its last ``k`` steps, so the importances of those steps are kept and ``n_full`` is scaled by
    ``k / num_steps`` (the same share of full steps). A percentile schedule measured for another
    number of steps cannot be mapped and raises ``ValueError``.
    """
    cfg = TokenCacheConfig.from_dict(dict(cache))
    out = cfg.to_dict()
    if cfg.schedule != "percentile":
        return out, None
    w = list(cfg.step_importance or [])
    if len(w) != num_steps:
        raise ValueError(f"the percentile schedule's step_importance has {len(w)} values but this report samples "
                         f"num_steps={num_steps}; measure it for {num_steps} steps (notebook 04) or use a tprr "
                         "schedule")
    k = sdedit_steps(num_steps, strength)
    if k == num_steps:
        return out, None
    n = max(1, min(k, round(cfg.n_full * k / num_steps)))
    out.update(step_importance=w[num_steps - k:], n_full=n)
    TokenCacheConfig.from_dict(out)
    return out, (f"percentile schedule fitted to SDEdit: the importances of the last {k} of {num_steps} steps, "
                 f"n_full {cfg.n_full} -> {n}")


@dataclass
class Recommendation:
    """The TokenCache setting the report measures, and where it came from.

    Attributes:
        name: a short label of the setting (the ablation point's name, or :func:`describe_cache`).
        cache: its ``TokenCacheConfig`` fields (validated).
        source: which path chose it: ``"ablation run"`` (auto, from notebooks 02-04), ``"measured here"``
            (auto, nothing fitted, candidates measured in this run) or ``"given"`` (the parameter).
        origin: the source run's folder name, ``"measured here"``, or ``"given"``.
        reason: why this path was taken, in a sentence (printed and written to summary.json).
        budget: the FLOP-ratio budget (cost of a cached run / full compute).
        within_budget: whether the source measured it within ``budget`` (None when given: not checked).
        source_metrics: FLOP / time ratio, PSNR, class-consistency as the source measured them.
        considered: one dict per ablation run looked at, with its verdict (auto only).
        candidates: the candidate sweep's frame (``"measured here"`` only).
        notes: caveats (other settings at the source, ...).
    """

    name: str
    cache: dict
    source: str
    origin: str
    reason: str
    budget: float
    within_budget: bool | None = None
    source_metrics: dict = field(default_factory=dict)
    considered: list[dict] = field(default_factory=list)
    candidates: Any = None  # pandas.DataFrame | None
    notes: list[str] = field(default_factory=list)

    @property
    def variant_name(self) -> str:
        """The recommendation's row name in the measurement sweep."""
        return RECOMMENDED_PREFIX + self.name

    def variant(self, cache: Mapping[str, Any] | None = None) -> Variant:
        """The recommendation as a sweep point (``cache`` overrides its config, e.g. fitted to SDEdit)."""
        return Variant(self.variant_name, "recommended", "ablation", cache=dict(cache or self.cache),
                       knob=self.name)

    def describe(self) -> str:
        """Readable lines: the setting, the path taken and why, the source's numbers, caveats."""
        lines = [f"recommended setting: {self.name}", f"  setting: {describe_cache(self.cache)}",
                 f"  path: {self.source}" + (f" ({self.origin})" if self.origin != self.source else ""),
                 f"  why: {self.reason}"]
        m = {k: v for k, v in self.source_metrics.items() if v is not None}
        if m:
            lines.append("  as measured at the source: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
        if self.within_budget is False:
            lines.append(f"  WARNING: no measured setting reached FLOP ratio <= {self.budget:g}; this is the cheapest "
                         "one that ran. Raise the budget or add cheaper candidates (lower rho, longer intervals).")
        lines.append(f"  TokenCacheConfig: {self.cache}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.considered:
            lines.append(f"  ablation runs considered ({len(self.considered)}, newest first):")
            lines += [f"    {r['run']} ({r['notebook']}): {r.get('verdict', '')}" for r in self.considered]
        return "\n".join(lines)

    def table(self):
        """What the choice was made from: the ablation runs considered (auto), the candidate points
        (measured here), or a one-row frame (given)."""
        import pandas as pd

        if self.candidates is not None:
            cols = ["name", "flop_ratio", "time_ratio", "psnr", "ssim", "class_consistency", "error"]
            out = self.candidates[[c for c in cols if c in self.candidates]].copy()
            out.insert(1, "chosen", out["name"] == self.name)
            return out[out["name"] != FULL_COMPUTE].round(3).reset_index(drop=True)
        if self.considered:
            return pd.DataFrame(self.considered)
        return pd.DataFrame([{"name": self.name, "source": self.source, "config": self.cache}])

    def to_dict(self) -> dict:
        """Plain values for summary.json."""
        out = {k: getattr(self, k) for k in ("name", "source", "origin", "reason", "budget", "within_budget",
                                             "source_metrics", "considered", "notes", "cache")}
        if self.candidates is not None:
            out["candidates"] = self.table().to_dict(orient="records")
        return to_plain(out)


def _short(sha: Any) -> str:
    return f"{str(sha)[:12]}..." if sha else "none"


def find_ablation_recommendation(reports_dir: str | Path, weights_sha256: str | None, budget: float,
                                 num_steps: int | None = None,
                                 notebooks: Sequence[str] = ABLATION_NOTEBOOKS) -> tuple[dict | None, list[dict]]:
    """The best TokenCache setting the ablation notebooks found for this model within ``budget``.

    Reads the run table of ``reports_dir`` (``tclab.runs.rows``: the rows of ``notebooks``, each with the
    point its sweep recommended, ``best_under_budget``). Per notebook, only the **most
    recent successful** run of this model at this report's ``num_steps`` counts (runs at another step
    count are ignored; status ``ok`` and weights hash ``model_sha256 == weights_sha256``): older runs are
    superseded, since code and settings move on. A sweep whose summary.json the table could not read as
    a :class:`tclab.sweep_summary.SweepSummary` is ignored, the reason in its verdict. Its recommended
    point is eligible when its ``config.cache`` is a TokenCache setting (not null: not a baseline or
    peer) that still validates, its ``flop_ratio <= budget`` and it has a PSNR; a ``percentile``
    schedule must also have been measured for ``num_steps`` steps. Among eligible points the highest
    PSNR wins (ties: the lower FLOP ratio).

    Returns ``(best, considered)``: ``best`` is ``{"run", "notebook", "name", "cache", "flop_ratio",
    "time_ratio", "psnr", "class_consistency", "settings"}`` (``settings``: the run's
    ``SweepSettingsRecord``, or None) or None, and ``considered`` one dict per run looked at (``run``,
    ``notebook``, ``status``, ``name``, ``flop_ratio``, ``psnr``, ``verdict``).
    """
    check_budget(budget, "FLOP ratio")
    considered: list[dict] = []
    eligible: list[dict] = []
    newest: dict[str, str] = {}
    for info in runs.rows(reports_dir):   # newest first
        if info["notebook"] not in notebooks:
            continue
        best = info["best_under_budget"]
        row = {"run": info["run"], "notebook": info["notebook"], "status": info["status"],
               "name": best["name"] if best else None,
               "flop_ratio": finite_or_none(best["flop_ratio"]) if best else None,
               "psnr": finite_or_none(best["psnr"]) if best else None}
        considered.append(row)
        sha = info["model_sha256"]
        if info["status"] != "ok":
            row["verdict"] = f"ignored: run status {info['status']!r}, not 'ok'"
            continue
        if info["summary_error"]:
            row["verdict"] = f"ignored: {info['summary_error']}"
            continue
        if info["gate_status"] == "failed":   # it ran, but its scheduled job's quality gates refused it
            row["verdict"] = "ignored: GATE FAILED (its job's quality gates refused this run; see its gates.json)"
            continue
        if weights_sha256 is None:
            row["verdict"] = "ignored: this model has no weights hash (an untrained preset), so no run can be matched"
            continue
        if sha is None:
            row["verdict"] = "ignored: its summary.json names no model (identity.model_weights_sha256 missing)"
            continue
        if sha != weights_sha256:
            row["verdict"] = f"ignored: another model (weights {_short(sha)}, this model {_short(weights_sha256)})"
            continue
        try:
            settings = SweepSettingsRecord.from_dict(info["settings"], complete=False) if info["settings"] else None
        except SweepSummaryError as e:   # a row written by another tclab version
            row["verdict"] = f"ignored: its sweep settings cannot be read ({e})"
            continue
        run_steps = settings.num_steps if settings else None
        if num_steps is not None and run_steps is not None and run_steps != num_steps:
            # a setting's cost and quality depend on the step count: a quick run at other settings
            # (a smoke preset, the test suite) must neither be chosen nor hide a matching older run
            row["verdict"] = f"ignored: sampled with {run_steps} steps, this report samples {num_steps}"
            continue
        if info["notebook"] in newest:
            row["verdict"] = f"ignored: superseded by the newer run {newest[info['notebook']]} of the same notebook"
            continue
        newest[info["notebook"]] = info["run"]
        cache = (best["config"] or {}).get("cache") if best else None
        if best is None:
            row["verdict"] = "not eligible: its sweep had no TokenCache point within its own budget"
        elif cache is None:
            row["verdict"] = "not eligible: its best point is not a TokenCache setting (config.cache is null)"
        elif row["flop_ratio"] is None or row["flop_ratio"] > budget:
            row["verdict"] = f"not eligible: FLOP ratio {row['flop_ratio']} exceeds the budget {budget:g}"
        elif row["psnr"] is None:
            row["verdict"] = "not eligible: no PSNR measured"
        else:
            try:
                cfg = TokenCacheConfig.from_dict(cache)
                if cfg.schedule == "percentile" and num_steps is not None \
                        and len(cfg.step_importance or []) != num_steps:
                    raise ValueError(f"percentile schedule measured for {len(cfg.step_importance or [])} "
                                     f"steps, this report samples {num_steps}")
            except (TypeError, ValueError) as e:
                row["verdict"] = f"not eligible: {e}"
                continue
            row["verdict"] = "eligible"
            eligible.append({"run": info["run"], "notebook": info["notebook"], "name": best["name"],
                             "cache": dict(cache), "flop_ratio": row["flop_ratio"],
                             "time_ratio": finite_or_none(best["time_ratio"]), "psnr": row["psnr"],
                             "class_consistency": finite_or_none(best["class_consistency"]), "settings": settings})
    if not eligible:
        return None, considered
    chosen = sorted(eligible, key=lambda e: (-e["psnr"], e["flop_ratio"]))[0]
    for row in considered:
        if row["run"] == chosen["run"]:
            row["verdict"] = "chosen: highest PSNR among the eligible points"
    return chosen, considered


def _candidate_variants(candidates: Sequence[Mapping[str, Any]]) -> list[Variant]:
    if isinstance(candidates, Mapping) or not isinstance(candidates, (list, tuple)) or not candidates:
        raise ValueError(f"candidates must be a non-empty list of dicts of TokenCacheConfig fields, got {candidates!r}")
    out, seen = [], set()
    for i, cand in enumerate(candidates):
        if not isinstance(cand, Mapping):
            raise ValueError(f"candidates[{i}] must be a dict of TokenCacheConfig fields, got {cand!r}")
        try:
            name = describe_cache(cand)
        except (TypeError, ValueError) as e:
            raise ValueError(f"candidates[{i}] {dict(cand)!r}: {e}") from None
        if name in seen:
            raise ValueError(f"candidates[{i}] repeats the setting {name!r}; list each setting once")
        seen.add(name)
        out.append(Variant(name, "candidates", "ablation", cache=dict(cand), knob=name))
    return out


def measure_candidates(model, candidates: Sequence[Mapping[str, Any]], settings: SweepSettings, budget: float,
                       classifier=None, progress: bool = False, workers: int = 1) -> tuple[dict | None, SweepResult]:
    """Measure ``candidates`` (dicts of TokenCacheConfig fields) against full compute on ``model``'s own
    class-balanced samples (``settings.quality_samples`` of them, from noise, as the ablation
    notebooks do) and pick :func:`tclab.ablation.best_under_budget` (highest PSNR with FLOP ratio
    <= ``budget``). Returns ``(best row or None, the sweep)``. Bad candidates raise before anything runs."""
    variants = _candidate_variants(candidates)
    result = run_sweep(model, variants, settings, classifier=classifier, progress=progress, workers=workers)
    return best_under_budget(result.frame, budget), result


def recommend(model, recommendation: str | Mapping[str, Any], reports_dir: str | Path, budget: float = 0.5,
              candidates: Sequence[Mapping[str, Any]] = DEFAULT_CANDIDATES, settings: SweepSettings | None = None,
              classifier=None, progress: bool = True, workers: int = 1) -> Recommendation:
    """Decide which TokenCache setting the report measures.

    Args:
        model: the ``LoadedDiT``.
        recommendation: a dict of ``TokenCacheConfig`` fields (the team's own setting: used as given;
            unknown keys raise), or ``"auto"``: first :func:`find_ablation_recommendation` in
            ``reports_dir`` (the latest ablation runs 02-04 of this exact model), and when nothing
            there fits, :func:`measure_candidates` on this model with ``candidates``.
        reports_dir: the reports folder (:func:`reports_folder` of the run).
        budget: the FLOP-ratio budget (0.5 = at least 2x fewer FLOPs than full compute).
        candidates: the fallback's settings (dicts of TokenCacheConfig fields).
        settings: sampling and measurement of the fallback sweep (its ``num_steps`` also checks that a
            percentile schedule from an ablation run fits).
        classifier: class-consistency classifier for the fallback sweep (or None).
        workers: torchrun processes that measure the fallback sweep (``tclab.ablation.run_sweep``).

    Returns a :class:`Recommendation` whose ``source``, ``origin`` and ``reason`` say which path was
    taken and why. When even the candidates miss the budget, the cheapest candidate that ran is
    returned with ``within_budget=False`` (the report says so loudly); when none ran, ``RuntimeError``.
    """
    check_budget(budget, "FLOP ratio")
    settings = settings or SweepSettings()
    if isinstance(recommendation, Mapping):
        try:
            cfg = TokenCacheConfig.from_dict(dict(recommendation))
        except (TypeError, ValueError) as e:
            raise ValueError(f"recommendation {dict(recommendation)!r} is not a valid TokenCache setting: {e}. "
                             "Pass a dict of TokenCacheConfig fields, or 'auto'") from None
        cache = cfg.to_dict()
        return Recommendation(name=describe_cache(cache), cache=cache, source=GIVEN, origin=GIVEN,
                              reason="the setting was given (parameter recommendation); it is measured, not chosen",
                              budget=float(budget))
    if recommendation != "auto":
        raise ValueError(f"recommendation must be 'auto' or a dict of TokenCacheConfig fields (e.g. "
                         f"{{'rho': 0.25, 'scorer': 'learned-static'}}), got {recommendation!r}")

    sha = model.identity().get("weights_sha256")
    best, considered = find_ablation_recommendation(reports_dir, sha, budget, settings.num_steps)
    if best is not None:
        notes = []
        src = best["settings"]   # the source run's SweepSettingsRecord (None in a summary without settings)
        differs = {k: (getattr(src, k), getattr(settings, k)) for k in ("num_steps", "scheduler", "guidance_scale")
                   if src is not None and getattr(src, k) is not None and getattr(src, k) != getattr(settings, k)}
        if differs:
            notes.append("the source run sampled with other settings ("
                         + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in differs.items())
                         + "): its ranking may not transfer exactly; the numbers below are measured here")
        n_ok = sum(r.get("verdict", "").startswith(("eligible", "chosen")) for r in considered)
        return Recommendation(
            name=str(best["name"]), cache=TokenCacheConfig.from_dict(best["cache"]).to_dict(),
            source=FROM_ABLATION_RUN, origin=best["run"], budget=float(budget), within_budget=True,
            reason=(f"auto: the ablation run {best['run']} ({best['notebook']}) of this model (weights "
                    f"{_short(sha)}) has the highest PSNR ({best['psnr']:.2f} dB) among {n_ok} eligible point(s) "
                    f"with FLOP ratio <= {budget:g} in {reports_dir}"),
            source_metrics={k: best[k] for k in ("flop_ratio", "time_ratio", "psnr", "class_consistency")},
            considered=considered, notes=notes)

    why = (f"no successful run of {', '.join(ABLATION_NOTEBOOKS)} in {reports_dir}" if not considered else
           f"none of the {len(considered)} ablation run(s) in {reports_dir} offers a TokenCache setting of this model "
           f"within FLOP ratio {budget:g} (each run and its verdict are listed below)")
    variants = _candidate_variants(candidates)  # refuse bad candidates before the sweep runs
    pick, result = measure_candidates(model, [v.cache for v in variants], settings, budget, classifier, progress,
                                      workers)
    frame = result.frame
    ok = frame[(frame["name"] != FULL_COMPUTE) & (frame["error"].fillna("") == "")]
    within = pick is not None
    if pick is None:
        if ok.empty:
            failed = frame.loc[frame["name"] != FULL_COMPUTE, ["name", "error"]]
            errors = "\n".join(f"  {n}: {_first_line(e)}" for n, e in failed.itertuples(index=False))
            raise RuntimeError(f"{why}, and every candidate failed on this model:\n{errors}\nFix the candidates (a "
                               "learned scorer needs this model's predictor: train_missing=True in the notebook, or "
                               "`tclab train-predictor --model ...`) or pass recommendation as a dict")
        pick = ok.sort_values(["flop_ratio", "psnr"], ascending=[True, False]).iloc[0].to_dict()
    name = str(pick["name"])
    cache = next(v.cache for v in variants if v.name == name)
    reason = (f"auto: {why}, so {len(variants)} candidate setting(s) were measured here on {settings.quality_samples} "
              f"class-conditional samples of the model ({settings.num_steps} steps); "
              + (f"{name} has the highest PSNR with FLOP ratio <= {budget:g}" if within else
                 f"none reached FLOP ratio <= {budget:g}, so the cheapest one that ran is shown"))
    return Recommendation(
        name=name, cache=TokenCacheConfig.from_dict(cache).to_dict(), source=MEASURED_HERE, origin=MEASURED_HERE,
        reason=reason, budget=float(budget), within_budget=within,
        source_metrics={k: finite_or_none(pick.get(k)) for k in ("flop_ratio", "time_ratio", "psnr", "class_consistency")},
        considered=considered, candidates=frame)


def _first_line(text: str, limit: int = 300) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---- 4. measurement on the in-house images -----------------------------------------------------------

def feature_extractor(inception_weights: str | Path | None = None, classifier=None):
    """The FID/KID feature space: ``InceptionV3Features(inception_weights)`` (the published FID space;
    a local file, never downloaded) when a path is given, else ``ClassifierFeatures(classifier)`` (the
    small class-consistency CNN: a ``ShapesClassifier``, its file, or None for the shipped one; offline,
    labelled NOT comparable to published FID). A relative path is the user's (``tclab.paths``)."""
    from .features import ClassifierFeatures, InceptionV3Features

    if inception_weights is not None:
        from .paths import PathNotFoundError, resolve_path

        try:
            path = resolve_path(inception_weights, what="inception_weights")
        except PathNotFoundError as e:
            raise PathNotFoundError(f"{e}; give the local path of pt_inception-2015-12-05-6726825d.pth, or None "
                                    "for the offline classifier features") from None
        return InceptionV3Features(path)
    return ClassifierFeatures(classifier)


@dataclass
class InhouseMeasurement:
    """Full compute against the recommendation on the in-house images (SDEdit, same seeds).

    ``result`` is the ``tclab.ablation.SweepResult`` (rows ``"full compute"`` and ``name``),
    ``images`` the ImageSet of the inputs (``images.images[i]`` is the input of output ``i``),
    ``notes`` what was adapted for SDEdit.
    """

    result: SweepResult
    name: str
    images: Any  # tclab.data.ImageSet
    notes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> torch.Tensor:
        return self.images.images

    @property
    def full_images(self) -> torch.Tensor:
        return self.result.full_images

    @property
    def cached_images(self) -> torch.Tensor:
        return self.result.images[self.name]

    def describe(self) -> str:
        """What was measured, in a few lines: images, steps, timing protocol, FID feature space, notes."""
        st, rec = self.result.settings, self.row()
        lines = [f"{len(self.images)} in-house image(s), SDEdit at strength {st.sdedit_strength:g}: the last "
                 f"{sdedit_steps(st.num_steps, st.sdedit_strength)} of {st.num_steps} {st.scheduler} steps, "
                 f"guidance {st.guidance_scale:g}, seed {st.seed}",
                 f"wall-clock: median of {st.timing_repeats} interleaved (full compute, cached) run(s) of "
                 f"{st.timing_batch} image(s) each, full compute re-run beside the cached runs",
                 describe_world(self.result.world)]
        if isinstance(rec.get("fid_extractor"), str):
            lines.append(f"FID/KID feature space: {rec['fid_extractor']}"
                         + ("" if rec.get("fid_comparable") else ": NOT comparable to published FID"))
            lines.append(f"FID/KID on N = {int(rec['fid_n'])} image(s) per setting against "
                         f"{int(rec['fid_n_reference'])} reference image(s); KID as mean +- std over "
                         f"{int(rec['kid_subsets'])} subsets of {int(rec['kid_subset_size'])}")
            if rec.get("fid_reason"):
                lines.append(f"FID {rec['fid_reason']}")
        else:
            lines.append("FID/KID: not measured (no feature extractor)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def row(self, name: str | None = None) -> dict:
        """One row of the sweep frame as a dict (default: the recommendation's)."""
        frame = self.result.frame
        return frame[frame["name"] == (name or self.name)].iloc[0].to_dict()

    def table(self, decimals: int = 3):
        """Speed and quality, one row per measure, columns ``full compute`` and ``recommended``, each with
        its interval (``... CI``: "[low, high]" at the sweep's confidence; bootstrap over the images,
        Wilson for class-consistency, paired-bootstrap for the time ratio). Wall-clock is the median of
        the interleaved timed runs (both from the recommendation's pairs); the timing noise floor (full
        compute against itself) is a row of its own, and a time ratio inside it is marked "within noise".
        FID/KID name their feature space and N (images per setting vs reference images). FID below its
        floor (feature dimension + 1 images per set) is NaN, its row named "... not computed: N images,
        needs at least M"; KID's std over its subsets is a row of its own."""
        import pandas as pd

        full, rec = self.row(FULL_COMPUTE), self.row()
        fid_label, kid_label = "FID vs the in-house images", "KID vs the in-house images"
        if "fid_extractor" in rec and isinstance(rec.get("fid_extractor"), str):
            n = f"N = {int(rec['fid_n'])} vs {int(rec['fid_n_reference'])} reference"
            fid_label += f" [{rec['fid_extractor']}; {n}]"
            kid_label += (f" [{n}; mean over {int(rec['kid_subsets'])} subsets of {int(rec['kid_subset_size'])}]")
            if rec.get("fid_reason"):
                fid_label += ": " + str(rec["fid_reason"]).split(" (", 1)[0]
        rows = [
            ("GFLOPs per image (counted)", full["gflops_per_image"], rec["gflops_per_image"]),
            ("FLOP ratio (/ full compute)", 1.0, rec["flop_ratio"]),
            ("FLOP speed-up", 1.0, rec["flop_speedup"]),
            (f"wall-clock s per run of {self.result.settings.timing_batch} image(s) (median)",
             rec["t_full_s"], rec["t_variant_s"]),
            ("wall-clock ratio (/ full compute)", 1.0, rec["time_ratio"]),
            ("wall-clock speed-up", 1.0, rec["time_speedup"]),
            ("PSNR vs full compute (dB)", None, rec["psnr"]),
            ("SSIM vs full compute", 1.0, rec["ssim"]),
            ("MSE vs full compute", 0.0, rec["mse"]),
            ("class-consistency", full.get("class_consistency"), rec.get("class_consistency")),
            (fid_label, full.get("fid"), rec.get("fid")),
            (kid_label, full.get("kid"), rec.get("kid")),
            ("KID std over subsets", full.get("kid_std"), rec.get("kid_std")),
        ]
        intervals = {"wall-clock ratio (/ full compute)": "time_ratio", "PSNR vs full compute (dB)": "psnr",
                     "SSIM vs full compute": "ssim", "MSE vs full compute": "mse", "class-consistency": "class_consistency",
                     fid_label: "fid", kid_label: "kid"}

        def ci(r, measure):
            m = intervals.get(measure)
            lo, hi = (r.get(f"{m}_ci_low"), r.get(f"{m}_ci_high")) if m else (None, None)
            if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
                return ""
            return f"[{lo:.{decimals}f}, {hi:.{decimals}f}]"

        out = pd.DataFrame(rows, columns=["measure", FULL_COMPUTE, "recommended"]).set_index("measure")
        out = out.astype(float).round(decimals)
        out.insert(1, f"{FULL_COMPUTE} CI", [ci(full, m) if m != "wall-clock ratio (/ full compute)" else ""
                                            for m in out.index])
        out["recommended CI"] = [ci(rec, m) for m in out.index]
        floor = self.result.noise_floor
        if floor is not None:   # full compute against itself: its median ratio, and the spread of its pairs
            out.loc[f"timing noise floor: full vs full ({floor.n} pairs; within noise between)"] = [
                floor.estimate, f"[{floor.low:.{decimals}f}, {floor.high:.{decimals}f}]", None, ""]
            if rec.get("time_within_noise"):
                out.loc["wall-clock ratio (/ full compute)", "recommended CI"] += " within noise"
        return out

    def _class_hits(self):
        full = self.result.samples.get(FULL_COMPUTE, {}).get("class_hit")
        cached = self.result.samples.get(self.name, {}).get("class_hit")
        if full is None or cached is None:
            return None
        keep = ~(np.isnan(full) | np.isnan(cached))
        return (cached[keep], full[keep]) if keep.sum() >= 2 else None

    def class_consistency_change(self):
        """Cached minus full compute class-consistency, paired image by image: a ``tclab.stats.Interval``
        (Newcombe's paired score interval, ``tclab.stats.paired_proportion_difference``: it does not
        shrink to nothing when no image changed class); None when class-consistency was not measured."""
        hits = self._class_hits()
        if hits is None:
            return None
        return paired_proportion_difference(*hits, confidence=self.result.settings.confidence)

    def images_needed(self, tolerance: float = 0.05, power: float = 0.8) -> int | None:
        """About how many images would show, with confidence, that caching loses at most ``tolerance`` of
        class-consistency. From the spread of the per-image changes measured here when some image changed
        class (``tclab.stats.samples_needed``); when none did, the images that make the paired interval
        of "no change" narrower than the tolerance (z^2 (1 - tolerance) / tolerance: about 73 at 5 points).
        None when class-consistency was not measured."""
        hits = self._class_hits()
        if hits is None:
            return None
        d = hits[0] - hits[1]
        conf = self.result.settings.confidence
        if d.std() > 0:
            return samples_needed(d, tolerance, conf, power)
        z = NormalDist().inv_cdf(0.5 + conf / 2)
        return math.ceil(z * z * (1 - tolerance) / tolerance)

    def per_image(self):
        """Per image: index, file path (relative to the folder, from the manifest), class, and PSNR / SSIM /
        MSE of the cached output against the full-compute output."""
        import pandas as pd

        err = self.result.per_image_error(self.name)
        recs = self.images.records
        return pd.DataFrame({"index": np.arange(len(recs)), "path": [r.path for r in recs],
                             "class": [r.class_name for r in recs], "sha256": [r.sha256 for r in recs],
                             "psnr": err["psnr"].astype(float), "ssim": err["ssim"].astype(float),
                             "mse": err["mse"].astype(float)})

    def worst(self, k: int):
        """The ``k`` images with the lowest PSNR of cached against full compute (worst first), with the full
        file path and a ``title`` for figures. ``k`` larger than the set keeps every image."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"worst_k must be an integer >= 1 (how many worst images to show), got {k!r}")
        table = self.per_image().sort_values(["psnr", "index"], kind="stable").head(k).reset_index(drop=True)
        table.insert(0, "rank", np.arange(1, len(table) + 1))
        root = Path(self.images.root).resolve()
        table["file"] = [str(root / p) for p in table["path"]]
        table["title"] = [f"#{r} {Path(p).name}\n{c}, PSNR {v:.1f} dB"
                          for r, p, c, v in zip(table["rank"], table["path"], table["class"], table["psnr"])]
        return table

    def images_of(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs, full, cached)`` of the images at ``indices`` (e.g. ``worst(k)["index"]``)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.inputs[idx], self.full_images[idx], self.cached_images[idx]


def measure_on_images(model, rec: Recommendation, settings: SweepSettings, images, classifier=None,
                      extractor=None, reference_images: torch.Tensor | None = None,
                      progress: bool = True, workers: int = 1) -> InhouseMeasurement:
    """SDEdit every image of ``images`` (an ImageSet from :func:`tclab.prepare.select_images`) with full compute and with
    the recommendation, in one ``tclab.ablation.run_sweep`` harness: FLOPs counted on what ran,
    wall-clock of ``settings.timing_batch`` images (median of ``settings.timing_repeats`` interleaved
    pairs, baseline re-run in this process), paired PSNR/SSIM/MSE, class-consistency (``classifier``),
    FID/KID against ``reference_images`` (default: the inputs) in ``extractor``'s feature space.

    The recommendation's config is first fitted to SDEdit (:func:`fit_cache_to_sdedit`). Raises
    ``RuntimeError`` when the recommendation fails on these images (the sweep would only record it).
    """
    cache, note = fit_cache_to_sdedit(rec.cache, settings.num_steps, settings.sdedit_strength)
    if extractor is not None and reference_images is None:
        reference_images = images.images
    result = run_sweep(model, [rec.variant(cache)], settings, classifier=classifier, extractor=extractor,
                       reference_images=reference_images if extractor is not None else None,
                       labels=images.labels, init_images=images.images, progress=progress, workers=workers)
    row = result.frame[result.frame["name"] == rec.variant_name].iloc[0]
    if row["error"]:
        raise RuntimeError(f"the recommended setting {rec.name!r} failed on the in-house images: {row['error']}. "
                           "Pass another setting as recommendation (a dict of TokenCacheConfig fields)")
    notes = [note] if note else []
    if rec.budget is not None and float(row["flop_ratio"]) > rec.budget + 1e-9:
        notes.append(f"WARNING: on these SDEdit runs the setting costs FLOP ratio {float(row['flop_ratio']):.3f}, over the "
                     f"budget {rec.budget:g} it met at its source: SDEdit runs only the last "
                     f"{sdedit_steps(settings.num_steps, settings.sdedit_strength)} steps and the first is always full. "
                     "Choose a cheaper setting (lower rho, longer intervals) for this use")
    return InhouseMeasurement(result=result, name=rec.variant_name, images=images, notes=notes)


# ---- 7. summary.json ----------------------------------------------------------------------------------

def summarise_report(model, image_set, used, redundancy: dict, rec: Recommendation, measured: InhouseMeasurement,
                     worst, label_map=None) -> dict:
    """Everything ``summary.json`` of the in-house report holds (plain JSON values).

    ``headline`` (flat scalars for ``reports/index.html``): the image check (``usable_images``,
    ``bad_images``, ``images_used``), redundancy verdicts on the SDEdit traces, the recommendation
    (``recommendation``, ``recommendation_source``, ``recommendation_from``; ``within_budget`` as
    measured on these images, ``source_within_budget`` as the source measured it), and its
    measurement on the images (FLOP / time ratios and speed-ups, PSNR, SSIM, class-consistency and
    FID/KID of full compute and cached, ``worst_psnr``). ``details``: the image check with every bad file,
    the redundancy analysis, the recommendation with the runs or candidates it was chosen from, the
    measurement rows, per-image errors and the worst images. ``labels``: how the folders were mapped
    onto the model's classes (``label_map``, :mod:`tclab.labels`). ``identity``: the manifest hashes of
    the folder and of the images used, and the model's weights hash.
    """
    full, row = measured.row(FULL_COMPUTE), measured.row()
    per_image = measured.per_image()
    red = redundancy.get("headline", {})
    head = {
        "usable_images": len(image_set), "bad_images": len(image_set.skipped), "images_used": len(used),
        "frac_tokens_below_5pct": red.get("frac_tokens_below_5pct"),
        "adjacent_rank_corr": red.get("adjacent_rank_corr"),
        "obs1_holds": red.get("obs1_holds"), "obs2_holds": red.get("obs2_holds"), "obs3_holds": red.get("obs3_holds"),
        # the verdicts with their stability (holds / does not hold / within noise / not measured)
        "obs1_verdict": red.get("obs1_verdict"), "obs2_verdict": red.get("obs2_verdict"),
        "obs3_verdict": red.get("obs3_verdict"), "obs3_driven_by_final_step": red.get("obs3_driven_by_final_step"),
        "recommendation": rec.name, "recommendation_source": rec.source, "recommendation_from": rec.origin,
        # measured here, on these images: SDEdit runs fewer steps (step 0 always full), so a setting
        # chosen within budget on full trajectories can cost more here; the source's verdict is kept apart
        "within_budget": (None if rec.budget is None or row["flop_ratio"] is None
                          else bool(row["flop_ratio"] <= rec.budget + 1e-9)),
        "source_within_budget": rec.within_budget, "budget_flop_ratio": rec.budget,
        "flop_ratio": row["flop_ratio"], "time_ratio": row["time_ratio"],
        "flop_speedup": row["flop_speedup"], "time_speedup": row["time_speedup"],
        "psnr": row["psnr"], "ssim": row["ssim"],
        "mapped_folders": len(label_map.mapped) if label_map is not None else None,
        "class_consistency_full": full.get("class_consistency"),
        "class_consistency_cached": row.get("class_consistency"),
        "class_consistency_n": row.get("class_consistency_n"),
        # FID is None below its floor (feature dimension + 1 images per set) and fid_reason says why
        "fid_full": full.get("fid"), "fid_cached": row.get("fid"),
        "fid_reason": str(row["fid_reason"]).split(" (", 1)[0] if row.get("fid_reason") else None,
        "kid_full": full.get("kid"), "kid_cached": row.get("kid"),
        "kid_std_full": full.get("kid_std"), "kid_std_cached": row.get("kid_std"),
        "fid_n": row.get("fid_n"), "fid_n_reference": row.get("fid_n_reference"),
        "fid_comparable_to_published": row.get("fid_comparable"),
        "worst_psnr": float(per_image["psnr"].min()),
    }
    # uncertainty: every figure's interval beside it (<name>_ci_low / _high; N = images_used), paired tests
    conf = measured.result.settings.confidence
    for key, r, col in (("flop_ratio", row, None), ("time_ratio", row, "time_ratio"), ("psnr", row, "psnr"),
                        ("ssim", row, "ssim"), ("class_consistency_full", full, "class_consistency"),
                        ("class_consistency_cached", row, "class_consistency"), ("fid_full", full, "fid"),
                        ("fid_cached", row, "fid"), ("kid_full", full, "kid"), ("kid_cached", row, "kid")):
        if col is not None:
            head[f"{key}_ci_low"] = finite_or_none(r.get(f"{col}_ci_low"))
            head[f"{key}_ci_high"] = finite_or_none(r.get(f"{col}_ci_high"))
    head["psnr_n"] = row.get("psnr_n")
    head["confidence"] = conf
    head["time_within_noise"] = row.get("time_within_noise")
    floor = measured.result.noise_floor
    head["time_noise_floor"] = floor.estimate if floor is not None else None
    head["time_noise_floor_ci_low"] = floor.low if floor is not None else None
    head["time_noise_floor_ci_high"] = floor.high if floor is not None else None
    change = measured.class_consistency_change()
    head["class_consistency_change"] = change.estimate if change else None
    head["class_consistency_change_ci_low"] = finite_or_none(change.low) if change else None
    head["class_consistency_change_ci_high"] = finite_or_none(change.high) if change else None
    head["images_needed_for_5_points"] = measured.images_needed(CLASS_CONSISTENCY_TOLERANCE)
    frame = measured.result.frame.drop(columns=[c for c in ("traceback",) if c in measured.result.frame])
    fid_note = None
    if isinstance(row.get("fid_extractor"), str) and not row.get("fid_comparable"):
        fid_note = ("FID/KID in a local feature space: NOT comparable to published FID; compare only between runs "
                    "with the same extractor, reference images and image count")
    details = {
        "image_check": {**image_set.summary(), "bad_files": bad_images_table(image_set).to_dict(orient="records")},
        "images_used": {**used.summary(), "files": [r.path for r in used.records]},
        "redundancy": redundancy,
        "recommendation": rec.to_dict(),
        "measurement": {"settings": dataclasses.asdict(measured.result.settings), "notes": measured.notes,
                        "fid_extractor": row.get("fid_extractor"),
                        "fid_note": fid_note,
                        "fid_reason": row.get("fid_reason") or None,
                        "fid_min_images": row.get("fid_min_images"), "fid_floor_rule": FID_FLOOR_RULE,
                        "fid_n": row.get("fid_n"), "fid_n_reference": row.get("fid_n_reference"),
                        "kid_subsets": row.get("kid_subsets"), "kid_subset_size": row.get("kid_subset_size"),
                        "rows": frame.to_dict(orient="records")},
        "per_image": per_image.to_dict(orient="records"),
        "worst": worst.drop(columns=["title"]).to_dict(orient="records"),
    }
    identity = {"model": model.name, "model_weights_sha256": model.identity().get("weights_sha256"),
                "images_manifest_sha256": image_set.manifest_hash(),
                "images_used_manifest_sha256": used.manifest_hash(), "images_used": len(used),
                "labels_sha256": label_map.sha256() if label_map is not None else None}
    labels = label_map.to_dict() if label_map is not None else None
    out = to_plain({"headline": head, "details": details, "labels": labels, "identity": identity,
                    "world": measured.result.world})   # where it was measured (tclab.distributed)
    out["report"] = inhouse_report(out).to_dict()
    return out


#: How far below full compute the cached images' class-consistency may fall for the report's verdict.
CLASS_CONSISTENCY_TOLERANCE = 0.05


def _ci(h: Mapping[str, Any], key: str, unit: str) -> str:
    """" [low, high]" of headline figure ``key`` (its ``_ci_low`` / ``_ci_high``), or "" without one."""
    return interval_text((h.get(f"{key}_ci_low"), h.get(f"{key}_ci_high")), unit)



def inhouse_report(summary: Mapping[str, Any]):
    """The first screen of the in-house report (:class:`tclab.report.ReportSummary`) from
    :func:`summarise_report`'s summary: is the image set usable, is there redundancy on these images
    (the three observations on their SDEdit traces), which setting, and what it buys and costs here."""
    h, details = summary["headline"], summary["details"]
    check = details.get("image_check", {})
    folders = len(check.get("classes") or []) or None
    findings = [Finding(   # the answer goes first, once the setting's findings below are known
        f"{h['usable_images']} usable images" + (f" in {folders} folders" if folders else "")
        + (f", {h['mapped_folders']} of them mapped to model classes" if h.get("mapped_folders") is not None and folders
           else "") + (f"; {h['bad_images']} files skipped (each with its reason under Tables)." if h["bad_images"]
           else "; no file skipped."),
        HOLDS if h["bad_images"] == 0 else DOES_NOT_HOLD, "every file in the folder is a usable image",
        "the image set")]
    red = details.get("redundancy") or {}
    if red.get("observations"):
        rec = red["record"]
        findings += observation_findings(red, f"redundancy on SDEdit traces of these images ({rec['samples']} images, "
                                               f"{rec['steps']} steps)")
    group = "the recommended setting on these images"
    budget = h.get("budget_flop_ratio")
    setting = [Finding(
        f"Recommended: {h['recommendation']} ({h['recommendation_source']}"
        + (f", {h['recommendation_from']}" if h.get("recommendation_from") not in (None, "", h["recommendation_source"])
           else "") + f"): {h['flop_ratio']:.2f}x "
        "the FLOPs of full compute on these images.",
        verdict_of(h.get("within_budget")),
        f"within the FLOP budget ({budget:g} of full compute)" if budget is not None else "within a FLOP budget (none set)",
        group)]
    tr = h.get("time_ratio")
    pairs = ((details.get("measurement") or {}).get("settings") or {}).get("timing_repeats")
    span = _ci(h, "time_ratio", "x")
    floor = _ci(h, "time_noise_floor", "x")
    if tr is None:
        speed = "Wall-clock was not measured."
    elif h.get("time_within_noise"):
        speed = (f"Its wall-clock is within noise of full compute's: {tr:.2f}x{span}, against a noise floor of"
                 f"{floor or ' (not measured)'} from full compute timed against itself.")
    elif tr < 1:
        speed = f"It takes {tr:.2f}x{span} the wall-clock of full compute ({1 / tr:.2f}x faster)."
    else:
        speed = f"It takes {tr:.2f}x{span} the wall-clock of full compute ({tr:.2f}x slower)."
    setting.append(Finding(
        speed, NOT_MEASURED if tr is None else (WITHIN_NOISE if h.get("time_within_noise") else
                                                 (HOLDS if tr < 1 else DOES_NOT_HOLD)),
        "wall-clock below full compute's, beyond the timing noise floor (full compute against itself): median of "
        + (f"{pairs} interleaved pair(s) on this machine" + ("; with fewer than 3 one slow run can decide it "
                                                               "(raise timing_repeats)" if pairs and pairs < 3 else "")
           if pairs else "interleaved pairs on this machine"), group))
    full, cached, n = h.get("class_consistency_full"), h.get("class_consistency_cached"), h.get("class_consistency_n")
    quality = (f"PSNR {h['psnr']:.1f} dB{_ci(h, 'psnr', 'dB')} against full compute (worst image "
               f"{h['worst_psnr']:.1f} dB), SSIM {h['ssim']:.2f}")
    tol = CLASS_CONSISTENCY_TOLERANCE
    if full is not None and cached is not None:
        lo, hi = h.get("class_consistency_change_ci_low"), h.get("class_consistency_change_ci_high")
        change = h.get("class_consistency_change")
        text = (f"{quality}; class-consistency {cached:.0%}{_ci(h, 'class_consistency_cached', '%')} cached vs "
                f"{full:.0%}{_ci(h, 'class_consistency_full', '%')} full compute (N = {n})")
        if change is not None and lo is not None and hi is not None:
            text += f"; paired change {change * 100:+.0f} points [{lo * 100:+.0f}, {hi * 100:+.0f}]"
            if lo >= -tol - 1e-12:
                verdict = HOLDS
            elif hi < -tol:
                verdict = DOES_NOT_HOLD
            else:
                verdict = WITHIN_NOISE
                need = h.get("images_needed_for_5_points")
                text += (f": the interval holds both a drop of more than {tol * 100:.0f} points and none"
                         + (f"; about {need} images would settle whether it loses more than {tol * 100:.0f} points"
                            if need else ""))
        else:   # no paired values (an older summary): the point estimates
            verdict = HOLDS if cached >= full - tol else DOES_NOT_HOLD
        setting.append(Finding(text + ".", verdict,
                               f"class-consistency of the cached images at most {tol:.0%} below full compute's, "
                               "with confidence (the paired interval of the change lies above -"
                               f"{tol * 100:.0f} points; within noise when it straddles that line)", group))
    else:
        setting.append(Finding(f"{quality}; class-consistency not measured (no folder maps to a model class).",
                                NOT_MEASURED, "class-consistency of the cached images close to full compute's", group))
    # the answer to the report's question, from the findings on the setting: cache only when all of them hold
    if all(f.verdict == HOLDS for f in setting):
        answer = Finding(f"Cache tokens with {h['recommendation']}: within the budget, faster, and as class-consistent "
                         "as full compute on these images.", HOLDS, "every finding on the recommended setting holds",
                         "the answer")
    elif any(f.verdict == DOES_NOT_HOLD for f in setting):
        failed = [name for f, name in zip(setting, ("over the FLOP budget", "not faster", "loses class-consistency"))
                  if f.verdict == DOES_NOT_HOLD]
        answer = Finding(f"Do not cache with {h['recommendation']} yet on these images: it is " + ", ".join(failed)
                         + " (see below; try another setting or budget).", DOES_NOT_HOLD,
                         "every finding on the recommended setting holds", "the answer")
    elif any(f.verdict == WITHIN_NOISE for f in setting):
        unsure = [name for f, name in zip(setting, ("the FLOP budget", "the speed-up", "the class-consistency"))
                  if f.verdict == WITHIN_NOISE]
        answer = Finding(f"Not decided for {h['recommendation']}: " + " and ".join(unsure) + " cannot be told from "
                         "noise on these images (see below: more images or timing pairs would decide it).",
                         WITHIN_NOISE, "every finding on the recommended setting holds", "the answer")
    else:
        answer = Finding(f"Not decided for {h['recommendation']}: some of its findings could not be measured.",
                         NOT_MEASURED, "every finding on the recommended setting holds", "the answer")
    findings = [answer, *findings, *setting]
    spec = [("recommendation", "recommended setting", ""), ("flop_ratio", "FLOPs (of full compute)", "x"),
            ("time_ratio", "wall-clock (of full compute)", "x"),
            ("time_noise_floor", "full compute against itself (timing noise floor)", "x"),
            ("psnr", "PSNR vs full compute", "dB"),
            ("worst_psnr", "worst image's PSNR", "dB"), ("ssim", "SSIM vs full compute", ""),
            ("class_consistency_full", "class-consistency, full compute", "%"),
            ("class_consistency_cached", "class-consistency, cached", "%"),
            ("fid_full", "FID, full compute", ""), ("fid_cached", "FID, cached", ""),
            ("usable_images", "usable images", ""), ("images_used", "images measured", "")]
    numbers = [k for k in key_numbers_from(h, spec, h.get("confidence") or 0.95) if k.value is not None]
    numbers = [dataclasses.replace(k, note=noise_floor_note(h.get("time_noise_floor_ci_low"),
                                                            h.get("time_noise_floor_ci_high")))
               if k.key == "time_noise_floor" else k for k in numbers]
    if h.get("fid_full") is None and h.get("fid_reason"):
        numbers.append(KeyNumber("fid_reason", "FID", h["fid_reason"]))
    return ReportSummary(findings=findings, key_numbers=numbers, index_keys=["recommendation", "flop_ratio", "psnr"])
