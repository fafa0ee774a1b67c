"""What ``summary.json`` of an ablation run (notebooks 02-04) holds: a typed, versioned :class:`SweepSummary`.

:func:`tclab.ablation.summarise_sweep` builds one from a sweep; the notebook writes
:meth:`SweepSummary.to_dict` to ``summary.json``; readers (the in-house report's recommendation,
``tclab.inhouse``; the first screen of the report, ``tclab.ablation.sweep_report``) read a file back
with :meth:`SweepSummary.from_dict` (or :meth:`SweepSummary.read`) and use its attributes, never a
chain of ``dict.get``. The JSON layout, version :data:`SCHEMA_VERSION`::

    version                 this layout's number
    headline                flat numbers for reports/index.html, derived from flops / wall_clock / points
                            (scalars only: an interval is ``<name>_ci_low`` / ``<name>_ci_high`` there)
    flops, wall_clock       a CostView each: the winners at every cost reduction, the best point within
                            the budget (ablated variants only, and over every method), the Pareto points
    best_under_budget       the recommended point (flops.best_under_budget): what notebook 05 reads
    settings                the sweep's SweepSettings
    points                  every row of the sweep table, as plain values
    identity                the model's weights hash, the manifest hash of the image set (when known)
    report                  the report's first screen (tclab.report.ReportSummary)
    labels                  how the image folders map onto the model's classes (tclab.labels.LabelMap)
    figures                 the figures the run saved (added by RunContext.write_summary)
    noise_floor             the timing noise floor: full compute against itself, measured alongside
    resolution              how many samples would resolve given differences, from the measured spread

Uncertainty (version 2): every figure ``<name>`` of a point or a view has ``<name>_ci: [low, high]`` at
``settings.confidence`` and, for per-sample means, ``<name>_n`` beside it. Differences between points
are paired tests on the shared seeds; ``winner`` is named only when distinguishable, ``leader`` is the
best point estimate, ``tied_with`` lists what cannot be told from it.

Summaries written before the layout had a number (no ``version`` key) are read too: a part they lack
is read as absent (None, or empty). A summary of another version, or a part of the wrong type, raises
:class:`SweepSummaryError` naming the file and the field. Top-level keys tclab does not own (a
notebook may add its own) are kept as they are in ``extra``.

The module imports only :mod:`tclab.report` (a leaf), so anything can read a summary without the
sweep machinery (torch, the caches). Its ``settings`` mirror ``tclab.ablation.SweepSettings`` field
by field (a test checks that they agree) instead of importing it, which would make ablation and this
module import each other.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .report import ReportSummary

#: Version of the ``summary.json`` layout of an ablation run; bump it when a field changes meaning.
#: 2 (issue #19): intervals beside every figure (``<name>_ci``, ``<name>_n``), paired tests, ties; a
#: ``winner`` is named only when distinguishable (``leader`` is the best point estimate).
SCHEMA_VERSION = 2
#: Older layouts :meth:`SweepSummary.from_dict` still reads, as incomplete (absent parts are None). In
#: version 1 ``winner`` was the best point estimate, untested: it is read as ``leader``.
READABLE_VERSIONS = (1, 2)
#: The quality every view of a sweep summary ranks by (``tclab.ablation.summarise_sweep``).
QUALITY = "psnr"
#: The two cost views: JSON key -> the sweep column each ranks cost by.
COST_VIEWS = {"flops": "flop_ratio", "wall_clock": "time_ratio"}
#: The keys of a best point (``tclab.ablation.headline``), in their JSON order.
POINT_KEYS = ("name", "curve", "family", "flop_ratio", "time_ratio", "time_ratio_ci", "time_within_noise", "psnr",
              "psnr_ci", "psnr_n", "ssim", "class_consistency", "class_consistency_ci", "tied_with", "tested", "config")

_AT_KEY = re.compile(r"at_(?P<r>.+)x")


class SweepSummaryError(ValueError):
    """A sweep summary this tclab cannot read: another layout version, or a part of the wrong type."""


# ---- reading one JSON object, field by field ------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_interval(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(x is None or _is_number(x) for x in v)


class _Part:
    """One JSON object of a summary (``where`` names it, e.g. ``flops.at_2x``), read key by key. Every
    error names the file (``source``) and the field. ``complete``: a versioned summary, in which every
    part this layout always writes must be there; an unversioned one may lack any."""

    def __init__(self, d: Any, where: str, source: str, complete: bool):
        self.where, self.source, self.complete = where, source, complete
        if not isinstance(d, Mapping):
            raise self.error(f"must be a JSON object, got {type(d).__name__}")
        self.d, self.seen = d, set()

    def child(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, what: str, key: str | None = None) -> SweepSummaryError:
        name = self.child(key) if key is not None else (self.where or "the summary")
        return SweepSummaryError(f"{self.source}: {name} {what}")

    def has(self, key: str) -> bool:
        return key in self.d

    def take(self, key: str, check: Callable[[Any], bool], what: str, required: bool = True,
             nullable: bool = True) -> Any:
        """``d[key]`` when it passes ``check`` (or is null, where null is allowed); None when absent."""
        self.seen.add(key)
        if key not in self.d:
            if required and self.complete:
                raise self.error(f"is missing (layout version {SCHEMA_VERSION} always writes it)", key)
            return None
        v = self.d[key]
        if v is None and nullable:
            return None
        if not check(v):
            raise self.error(f"must be {what}{' or null' if nullable else ''}, got {v!r}", key)
        return v

    def text(self, key: str, **kw) -> str | None:
        return self.take(key, lambda v: isinstance(v, str), "text", **kw)

    def number(self, key: str, **kw) -> float | None:
        return self.take(key, _is_number, "a number", **kw)

    def integer(self, key: str, **kw) -> int | None:
        return self.take(key, _is_int, "an integer", **kw)

    def obj(self, key: str, **kw) -> Mapping | None:
        return self.take(key, lambda v: isinstance(v, Mapping), "a JSON object", **kw)

    def flag(self, key: str, **kw) -> bool | None:
        return self.take(key, lambda v: isinstance(v, bool), "true or false", **kw)

    def interval(self, key: str, **kw) -> tuple[float | None, float | None] | None:
        """``[low, high]`` (either may be null: no interval from fewer than two samples)."""
        v = self.take(key, _is_interval, "an interval [low, high]", **kw)
        return None if v is None else (v[0], v[1])

    def names(self, key: str, **kw) -> tuple[str, ...] | None:
        v = self.take(key, _is_str_list, "a list of names", **kw)
        return None if v is None else tuple(v)

    def finish(self, extra_ok: bool = False) -> dict:
        """Refuse keys this layout does not have (``extra_ok``: return them instead)."""
        unknown = {k: v for k, v in self.d.items() if k not in self.seen}
        if unknown and not extra_ok:
            raise self.error(f"has unknown key(s) {sorted(unknown)}; layout version {SCHEMA_VERSION} has "
                             f"{sorted(self.seen)}")
        return unknown


def _flat_interval(flat: dict, name: str, interval) -> None:
    """``flat[name_ci_low]``, ``flat[name_ci_high]``: an interval as two scalars (a headline holds scalars)."""
    lo, hi = interval if interval is not None else (None, None)
    flat[f"{name}_ci_low"], flat[f"{name}_ci_high"] = lo, hi


def _plain(v: Any) -> Any:
    """A part's value in its JSON form: tuples (intervals, names) as lists."""
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return copy.deepcopy(v)


# ---- the parts ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BestPoint:
    """The best point within a budget: a row of the sweep table (``tclab.ablation.best_under_budget``).

    ``config`` is the variant as ``tclab.ablation.Variant.describe`` wrote it (``cache`` holds its
    ``TokenCacheConfig`` fields; None for full compute, a baseline without one, or a peer).
    """

    name: str
    curve: str | None = None
    family: str | None = None
    flop_ratio: float | None = None
    time_ratio: float | None = None
    time_ratio_ci: tuple[float | None, float | None] | None = None
    time_within_noise: bool | None = None       # inside the sweep's full-vs-full noise floor
    psnr: float | None = None
    psnr_ci: tuple[float | None, float | None] | None = None
    psnr_n: int | None = None
    ssim: float | None = None
    class_consistency: float | None = None
    class_consistency_ci: tuple[float | None, float | None] | None = None
    tied_with: tuple[str, ...] = ()              # points within the budget it cannot be told from (PSNR)
    tested: bool | None = None                   # False: no per-sample values, nothing could be tested
    config: Mapping[str, Any] | None = None

    @property
    def cache(self) -> dict | None:
        """The point's ``TokenCacheConfig`` fields, or None when it is not a TokenCache setting."""
        cache = (self.config or {}).get("cache")
        return dict(cache) if cache is not None else None

    def to_dict(self) -> dict:
        return {k: _plain(getattr(self, k)) for k in POINT_KEYS}

    @classmethod
    def _read(cls, p: _Part) -> "BestPoint":
        kw = {"name": p.text("name", nullable=False)}
        for k in ("curve", "family"):
            kw[k] = p.text(k)
        for k in ("flop_ratio", "time_ratio", "psnr", "ssim", "class_consistency"):
            kw[k] = p.number(k)
        for k in ("time_ratio_ci", "psnr_ci", "class_consistency_ci"):
            kw[k] = p.interval(k)
        kw["psnr_n"] = p.integer("psnr_n")
        kw["time_within_noise"], kw["tested"] = p.flag("time_within_noise"), p.flag("tested")
        kw["tied_with"] = p.names("tied_with") or ()
        config = p.obj("config")
        if config is not None:
            c = _Part(config, p.child("config"), p.source, p.complete)
            c.obj("cache", required=False)   # null for a baseline or peer; its fields are checked where used
            kw["config"] = copy.deepcopy(dict(config))
        p.finish()
        return cls(**kw)


@dataclass(frozen=True)
class RivalPoint:
    """The best baseline or peer (fewer steps, FORA, external caches) at a cost reduction."""

    name: str
    cost_ratio: float | None = None  # its cost in the view's ``cost`` column
    psnr: float | None = None
    class_consistency: float | None = None
    psnr_ci: tuple[float | None, float | None] | None = None
    # the leading ablated point's paired PSNR margin over it (positive: the ablated point is better)
    margin: float | None = None
    margin_ci: tuple[float | None, float | None] | None = None
    margin_p: float | None = None
    distinguishable: bool | None = None         # None: not tested

    def to_dict(self, cost: str) -> dict:
        return {"name": self.name, cost: self.cost_ratio, QUALITY: self.psnr, f"{QUALITY}_ci": _plain(self.psnr_ci),
                "class_consistency": self.class_consistency, "margin": self.margin,
                "margin_ci": _plain(self.margin_ci), "margin_p": self.margin_p, "distinguishable": self.distinguishable}

    @classmethod
    def _read(cls, p: _Part, cost: str) -> "RivalPoint":
        out = cls(name=p.text("name", nullable=False), cost_ratio=p.number(cost), psnr=p.number(QUALITY),
                  class_consistency=p.number("class_consistency"), psnr_ci=p.interval(f"{QUALITY}_ci"),
                  margin=p.number("margin"), margin_ci=p.interval("margin_ci"), margin_p=p.number("margin_p"),
                  distinguishable=p.flag("distinguishable"))
        p.finish()
        return out


@dataclass(frozen=True)
class ReductionResult:
    """Which ablated curve leads at ``reduction``-times lower cost, and whether the lead is real
    (``tclab.ablation.headline``'s ``at_<r>x``).

    ``leader`` is None (and ``note`` says why) when no ablated point is that cheap. Otherwise: the
    leading curve on point estimates and its ``point``, cost (``cost_ratio``), PSNR and class-consistency
    with their intervals; the curves ``tied_with`` it (a paired test on the shared seeds cannot tell them
    apart); ``winner``: the leader, only when it is distinguishable from every other curve (None when
    tied, or when nothing could be tested: ``tested`` False); the ``runner_up`` and the margins over it
    (PSNR with its interval and p-value), and the best baseline or peer at the same cost
    (``best_reference``, with the leader's paired margin over it).
    """

    reduction: float
    leader: str | None = None
    winner: str | None = None
    tested: bool | None = None
    note: str | None = None
    point: str | None = None
    cost_ratio: float | None = None
    psnr: float | None = None
    psnr_ci: tuple[float | None, float | None] | None = None
    psnr_n: int | None = None
    class_consistency: float | None = None
    class_consistency_ci: tuple[float | None, float | None] | None = None
    tied_with: tuple[str, ...] = ()
    runner_up: str | None = None
    psnr_margin: float | None = None
    psnr_margin_ci: tuple[float | None, float | None] | None = None
    psnr_margin_p: float | None = None
    class_consistency_margin: float | None = None
    class_consistency_margin_ci: tuple[float | None, float | None] | None = None
    best_reference: RivalPoint | None = None

    @property
    def key(self) -> str:
        return f"at_{self.reduction:g}x"

    def to_dict(self, cost: str) -> dict:
        if self.leader is None:
            return {"leader": None, "winner": None, "note": self.note}
        out = {"leader": self.leader, "winner": self.winner, "tested": self.tested, "point": self.point,
               cost: self.cost_ratio, QUALITY: self.psnr, f"{QUALITY}_ci": _plain(self.psnr_ci),
               f"{QUALITY}_n": self.psnr_n, "class_consistency": self.class_consistency,
               "class_consistency_ci": _plain(self.class_consistency_ci), "tied_with": list(self.tied_with)}
        if self.runner_up is not None:
            out.update({"runner_up": self.runner_up, f"{QUALITY}_margin": self.psnr_margin,
                        f"{QUALITY}_margin_ci": _plain(self.psnr_margin_ci), f"{QUALITY}_margin_p": self.psnr_margin_p,
                        "class_consistency_margin": self.class_consistency_margin,
                        "class_consistency_margin_ci": _plain(self.class_consistency_margin_ci)})
        if self.best_reference is not None:
            out["best_reference"] = self.best_reference.to_dict(cost)
        return out

    @classmethod
    def _read(cls, p: _Part, reduction: float, cost: str) -> "ReductionResult":
        if p.complete:
            leader, winner = p.text("leader"), p.text("winner")
        else:   # version 1 (or none): its "winner" was the best point estimate, untested
            leader = p.text("leader", required=False) or p.text("winner")
            winner = p.text("winner") if p.has("leader") else None
        if leader is None:
            out = cls(reduction, note=p.text("note"))
            p.finish()
            return out
        kw: dict[str, Any] = {"winner": winner, "tested": p.flag("tested"), "point": p.text("point"),
                              "cost_ratio": p.number(cost), "psnr": p.number(QUALITY),
                              "psnr_ci": p.interval(f"{QUALITY}_ci"), "psnr_n": p.integer(f"{QUALITY}_n"),
                              "class_consistency": p.number("class_consistency"),
                              "class_consistency_ci": p.interval("class_consistency_ci"),
                              "tied_with": p.names("tied_with") or ()}
        if p.has("runner_up") or not p.complete:
            ru = p.complete   # with a runner-up, a versioned summary has every margin
            kw.update(runner_up=p.text("runner_up", required=False),
                      psnr_margin=p.number(f"{QUALITY}_margin", required=ru),
                      psnr_margin_ci=p.interval(f"{QUALITY}_margin_ci", required=ru),
                      psnr_margin_p=p.number(f"{QUALITY}_margin_p", required=ru),
                      class_consistency_margin=p.number("class_consistency_margin", required=ru),
                      class_consistency_margin_ci=p.interval("class_consistency_margin_ci", required=ru))
        ref = p.obj("best_reference", required=False)
        if ref is not None:
            kw["best_reference"] = RivalPoint._read(_Part(ref, p.child("best_reference"), p.source, p.complete), cost)
        p.finish()
        return cls(reduction, leader, **kw)


@dataclass(frozen=True)
class CostView:
    """The sweep against one cost (``cost``: ``"flop_ratio"`` or ``"time_ratio"``), ranked by PSNR: the
    output of ``tclab.ablation.headline``. ``reductions``: one :class:`ReductionResult` per cost
    reduction asked for, in order; ``best_under_budget``: the best ablated point within ``budget``,
    ``best_under_budget_any_method`` the best over every family (baselines and peers included)."""

    cost: str
    budget: float | None = None
    full_compute_class_consistency: float | None = None
    reductions: tuple[ReductionResult, ...] = ()
    best_under_budget: BestPoint | None = None
    best_under_budget_any_method: BestPoint | None = None
    pareto_points: tuple[str, ...] = ()
    #: Pareto points whose gain over the next cheaper front point is within noise: {point: cheaper point}
    pareto_ties: Mapping[str, str] = field(default_factory=dict)
    quality: str = QUALITY

    def at(self, reduction: float) -> ReductionResult | None:
        """The result at ``reduction`` (2 = half the cost), or None when it was not asked for."""
        return next((r for r in self.reductions if r.reduction == float(reduction)), None)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"cost": self.cost, "quality": self.quality, "budget": self.budget,
                               "full_compute_class_consistency": self.full_compute_class_consistency}
        out.update({r.key: r.to_dict(self.cost) for r in self.reductions})
        out["best_under_budget"] = self.best_under_budget.to_dict() if self.best_under_budget else None
        out["best_under_budget_any_method"] = (self.best_under_budget_any_method.to_dict()
                                               if self.best_under_budget_any_method else None)
        out["pareto_points"] = list(self.pareto_points)
        out["pareto_ties"] = dict(self.pareto_ties)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str, cost: str, source: str = "summary",
                  complete: bool = True) -> "CostView":
        """Read ``tclab.ablation.headline``'s dict (``where`` names it in errors, e.g. ``"flops"``)."""
        p = _Part(d, where, source, complete)
        stored = p.text("cost", nullable=False)
        if stored is not None and stored != cost:
            raise p.error(f"ranks cost by {stored!r}; this view is {cost!r}", "cost")
        quality = p.text("quality", nullable=False)
        if quality is not None and quality != QUALITY:
            raise p.error(f"ranks by {quality!r}; a sweep summary ranks by {QUALITY!r}", "quality")
        kw: dict[str, Any] = {"budget": p.number("budget"),
                              "full_compute_class_consistency": p.number("full_compute_class_consistency")}
        reductions = []
        for key in d:
            m = _AT_KEY.fullmatch(str(key))
            if m is None:
                continue
            try:
                r = float(m["r"])
            except ValueError:
                raise p.error("is not a cost reduction (at_<number>x)", key) from None
            part = p.obj(key, nullable=False)
            reductions.append(ReductionResult._read(_Part(part, p.child(key), source, complete), r, cost))
        kw["reductions"] = tuple(reductions)
        for k in ("best_under_budget", "best_under_budget_any_method"):
            best = p.obj(k)
            kw[k] = BestPoint._read(_Part(best, p.child(k), source, complete)) if best is not None else None
        kw["pareto_points"] = p.names("pareto_points") or ()
        ties = p.take("pareto_ties", lambda v: isinstance(v, Mapping) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()), "a map of point names", nullable=False)
        kw["pareto_ties"] = dict(ties or {})
        p.finish()
        return cls(cost=cost, **kw)


@dataclass(frozen=True)
class SweepSettingsRecord:
    """``tclab.ablation.SweepSettings`` as a summary records it, field by field (None: a field an older
    summary does not have)."""

    num_steps: int | None = None
    scheduler: str | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    quality_samples: int | None = None
    timing_batch: int | None = None
    timing_repeats: int | None = None
    quality_batch: int | None = None
    sdedit_strength: float | None = None
    classes: tuple[int, ...] | None = None
    confidence: float | None = None
    resamples: int | None = None
    noise_pairs: int | None = None

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "settings", source: str = "summary",
                  complete: bool = True) -> "SweepSettingsRecord":
        p = _Part(d, where, source, complete)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "scheduler":
                kw[f.name] = p.text(f.name, nullable=False)
            elif f.name == "classes":
                v = p.take(f.name, lambda v: isinstance(v, list) and all(_is_int(c) for c in v), "a list of class ids")
                kw[f.name] = tuple(v) if v is not None else None
            elif f.name in ("guidance_scale", "sdedit_strength", "confidence"):
                kw[f.name] = p.number(f.name, nullable=False)
            else:
                kw[f.name] = p.integer(f.name, nullable=False)
        p.finish()
        return cls(**kw)


@dataclass(frozen=True)
class SweepIdentity:
    """What pins a sweep's inputs beyond its parameters (copied into provenance.json)."""

    model: str | None = None
    model_weights_sha256: str | None = None   # None for an untrained preset
    images_manifest_sha256: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.model is not None or self.model_weights_sha256 is not None:
            out.update(model=self.model, model_weights_sha256=self.model_weights_sha256)
        if self.images_manifest_sha256 is not None:
            out["images_manifest_sha256"] = self.images_manifest_sha256
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "summary") -> "SweepIdentity":
        p = _Part(d, "identity", source, complete=False)   # which keys it has depends on what was given
        out = cls(*(p.text(k) for k in ("model", "model_weights_sha256", "images_manifest_sha256")))
        p.finish()
        return out


# ---- the summary ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepSummary:
    """Everything ``summary.json`` of an ablation run holds (see the module docstring for the layout)."""

    flops: CostView
    wall_clock: CostView
    settings: SweepSettingsRecord | None = None
    points: tuple[Mapping[str, Any], ...] = ()
    identity: SweepIdentity | None = None
    report: ReportSummary | None = None
    labels: Mapping[str, Any] | None = None
    figures: tuple[str, ...] | None = None
    #: the sweep's timing noise floor: {"time_ratio": median full-vs-full ratio, "time_ratio_ci": [low, high],
    #: "time_ratio_n": ratios} (``tclab.ablation.timing_noise_floor``); None when not measured
    noise_floor: Mapping[str, Any] | None = None
    #: how many samples would resolve given differences (``tclab.ablation.samples_needed_table`` rows)
    resolution: tuple[Mapping[str, Any], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    @property
    def best_under_budget(self) -> BestPoint | None:
        """The recommended point: the best ablated point within the FLOP budget."""
        return self.flops.best_under_budget

    @property
    def reductions(self) -> tuple[float, ...]:
        return tuple(r.reduction for r in self.flops.reductions)

    @property
    def failed_points(self) -> int:
        return sum(1 for p in self.points if (p.get("error") or "") != "")

    @property
    def headline(self) -> dict[str, Any]:
        """The flat numbers for ``reports/index.html``: per reduction r the winning curve (FLOPs and
        wall-clock; None when tied), the leader and the curves tied with it, its PSNR, class-consistency
        and PSNR margin, the best rival and its PSNR; the budget and the best point within it (and the
        points tied with it); the timing noise floor; full compute's class-consistency; points and
        failures; then every interval as ``<name>_ci_low`` / ``<name>_ci_high``."""
        flat: dict[str, Any] = {}
        ci: dict[str, Any] = {}      # the intervals go after every number, so a short listing shows the numbers
        for d in self.flops.reductions:
            tag = f"{d.reduction:g}x"
            clock = self.wall_clock.at(d.reduction)
            flat[f"winner_at_{tag}_flops"] = d.winner
            flat[f"leader_at_{tag}_flops"] = d.leader
            flat[f"tied_at_{tag}_flops"] = ", ".join(d.tied_with) or None
            flat[f"psnr_at_{tag}"] = d.psnr
            _flat_interval(ci, f"psnr_at_{tag}", d.psnr_ci)
            flat[f"psnr_margin_at_{tag}"] = d.psnr_margin
            _flat_interval(ci, f"psnr_margin_at_{tag}", d.psnr_margin_ci)
            flat[f"class_consistency_at_{tag}"] = d.class_consistency
            flat[f"winner_at_{tag}_wall_clock"] = clock.winner if clock else None
            flat[f"best_reference_at_{tag}"] = d.best_reference.name if d.best_reference else None
            flat[f"psnr_best_reference_at_{tag}"] = d.best_reference.psnr if d.best_reference else None
        best = self.best_under_budget
        flat["budget_flop_ratio"] = self.flops.budget
        flat["best_under_budget"] = best.name if best else None
        for k in ("flop_ratio", "time_ratio", "psnr", "class_consistency"):
            flat[f"best_{k}"] = getattr(best, k) if best else None
        for k in ("time_ratio", "psnr", "class_consistency"):
            _flat_interval(ci, f"best_{k}", getattr(best, f"{k}_ci") if best else None)
        ci["best_psnr_n"] = best.psnr_n if best else None
        flat["best_time_within_noise"] = best.time_within_noise if best else None
        flat["best_tied_with"] = (", ".join(best.tied_with) or None) if best else None
        flat["time_noise_floor"] = (self.noise_floor or {}).get("time_ratio")   # median full-vs-full ratio
        _flat_interval(ci, "time_noise_floor", (self.noise_floor or {}).get("time_ratio_ci"))
        flat["full_compute_class_consistency"] = self.flops.full_compute_class_consistency
        flat["points"] = len(self.points)
        flat["failed_points"] = self.failed_points
        flat.update(ci)
        return flat

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, in the order ``summary.json`` has always had them (``version`` first)."""
        best = self.best_under_budget
        out: dict[str, Any] = {"version": self.version, "headline": self.headline, "flops": self.flops.to_dict(),
                               "wall_clock": self.wall_clock.to_dict(),
                               "best_under_budget": best.to_dict() if best else None}
        if self.settings is not None:
            out["settings"] = self.settings.to_dict()
        out["points"] = [copy.deepcopy(dict(p)) for p in self.points]
        if self.identity is not None:
            out["identity"] = self.identity.to_dict()
        if self.report is not None:
            out["report"] = self.report.to_dict()
        if self.labels is not None:
            out["labels"] = copy.deepcopy(dict(self.labels))
        if self.figures is not None:
            out["figures"] = list(self.figures)
        out["noise_floor"] = copy.deepcopy(dict(self.noise_floor)) if self.noise_floor is not None else None
        out["resolution"] = [copy.deepcopy(dict(r)) for r in self.resolution]
        out.update(copy.deepcopy(dict(self.extra)))
        return out

    def __getitem__(self, key: str) -> Any:
        """``summary[key]``: the JSON form's part (``to_dict()[key]``), for code written against the dict."""
        return self.to_dict()[key]

    @classmethod
    def read(cls, path: str | Path) -> "SweepSummary":
        """The summary in the file ``path`` (a run folder's ``summary.json``)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SweepSummaryError(f"{path}: cannot read a sweep summary: {e}") from None
        return cls.from_dict(d, source=path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | Path | None = None) -> "SweepSummary":
        """The summary :meth:`to_dict` wrote (or an unversioned one from before). ``source`` (the file)
        is named in every error. Raises :class:`SweepSummaryError` on another version or a malformed part."""
        src = str(source) if source is not None else "sweep summary"
        if not isinstance(d, Mapping):
            raise SweepSummaryError(f"{src}: a sweep summary is a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version is not None and (not _is_int(version) or version not in READABLE_VERSIONS):
            raise SweepSummaryError(
                f"{src}: version is {version!r}; this tclab reads sweep summaries of layout versions "
                f"{list(READABLE_VERSIONS)} (and unversioned ones from before): re-run the ablation notebook with "
                "this tclab")
        complete = version == SCHEMA_VERSION   # older layouts: read what they have, absent parts are None
        p = _Part(d, "", src, complete)
        p.seen.add("version")
        views = {}
        for key, cost in COST_VIEWS.items():
            view = p.obj(key, nullable=False)
            views[key] = (CostView.from_dict(view, key, cost, src, complete) if view is not None
                          else CostView(cost=cost))
        top = p.obj("best_under_budget")
        top_best = BestPoint._read(_Part(top, "best_under_budget", src, complete)) if top is not None else None
        if "best_under_budget" in (d.get("flops") or {}):
            if top_best != views["flops"].best_under_budget:
                raise p.error("differs from flops.best_under_budget (it is the same point)", "best_under_budget")
        elif top_best is not None:   # an older summary without the FLOP view: its recommended point is here
            views["flops"] = dataclasses.replace(views["flops"], best_under_budget=top_best)
        settings = p.obj("settings", nullable=False)
        points = p.take("points", lambda v: isinstance(v, list) and all(isinstance(r, Mapping) for r in v),
                        "a list of JSON objects (one per sweep row)", nullable=False)
        identity = p.obj("identity", required=False, nullable=False)
        report = p.obj("report", required=False, nullable=False)
        try:
            report = ReportSummary.from_dict(report) if report is not None else None
        except ValueError as e:
            raise p.error(f"cannot be read: {e}", "report") from None
        labels = p.obj("labels", required=False, nullable=False)
        figures = p.names("figures", required=False)
        floor = p.obj("noise_floor")
        resolution = p.take("resolution", lambda v: isinstance(v, list) and all(isinstance(r, Mapping) for r in v),
                            "a list of JSON objects", nullable=False)
        headline = p.obj("headline", nullable=False)
        out = cls(flops=views["flops"], wall_clock=views["wall_clock"],
                  settings=SweepSettingsRecord.from_dict(settings, "settings", src, complete) if settings is not None
                  else None,
                  points=tuple(copy.deepcopy(dict(r)) for r in points or ()),
                  identity=SweepIdentity.from_dict(identity, src) if identity is not None else None,
                  report=report, labels=copy.deepcopy(dict(labels)) if labels is not None else None,
                  figures=figures, noise_floor=copy.deepcopy(dict(floor)) if floor is not None else None,
                  resolution=tuple(copy.deepcopy(dict(r)) for r in resolution or ()),
                  extra=copy.deepcopy(p.finish(extra_ok=True)),
                  # the layout it was read as: written back, an older summary keeps its number (and is read
                  # leniently again), so it is never passed off as a complete summary of this layout
                  version=version if version is not None else 1)
        if complete and dict(headline) != out.headline:
            derived = out.headline
            bad = sorted(k for k in set(headline) | set(derived) if headline.get(k, "?") != derived.get(k, "?"))
            raise p.error(f"disagrees with flops / wall_clock / points at {bad} (the headline is derived from "
                          "them; it is not edited by hand)", "headline")
        return out
