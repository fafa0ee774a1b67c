"""Quality gates of a scheduled job: thresholds on a run's headline figures, and the rollback file.

A team that runs TokenCache in production schedules a nightly report (``tclab schedule run``,
:mod:`tclab.jobs`) and wants to know when a setting got worse, not read every report. A job's
``gates:`` mapping names the limits; after the job's run finished, :func:`evaluate_gates` checks
them against the run's ``summary.json`` and the job's last good run, :func:`write_gate_report`
writes the verdict into the run folder as ``gates.json`` (index.html and the run table mark a
failed run ``GATE FAILED``; the run itself is kept), and only a run that passed replaces the
job's *recommended setting*, a small JSON file the deployment reads (:func:`write_recommended`).
A failed gate leaves that file byte for byte as it was: the deployment keeps the last setting that
passed (rollback by not rolling forward).

The gates, in a jobs file (every value a finite number; an unknown name is refused with a
did-you-mean)::

    gates:
      psnr_min: 30                     # PSNR vs full compute, dB (interval: psnr_ci_low/high)
      ssim_min: 0.9                    # SSIM vs full compute
      class_consistency_drop_max: 0.05 # full compute's class-consistency minus the cached one's (a fraction)
      flop_speedup_min: 1.8            # full compute's FLOPs / the cached run's (alias: speedup_min)
      time_speedup_min: 1.2            # wall-clock, the same way (interval from time_ratio's)
      worst_image_psnr_min: 22         # the worst single image's PSNR, dB
      psnr_drop_max: 1.0               # PSNR may fall at most this much (dB) against the last good run
      min: {frac_tokens_below_5pct: 0.5}   # any headline figure: at least ...
      max: {fid_cached: 40}                # ... at most ...
      drop_max: {ssim: 0.02}               # ... falls at most this much against the last good run
      rise_max: {time_ratio: 0.1}          # ... rises at most this much against the last good run

Where the named gates read (the headline is ``summary.json["headline"]``, flat):

* the in-house report (notebook 05): ``psnr``, ``ssim``, ``-class_consistency_change``,
  ``flop_speedup``, ``time_speedup``, ``worst_psnr``, each with its ``<name>_ci_low/_ci_high``;
* a sweep (notebooks 02-04, a summary with ``best_under_budget``): the recommended point's figures,
  ``best_psnr``, ``best_under_budget.ssim``, ``full_compute_class_consistency - best_class_consistency``,
  ``1 / best_flop_ratio``, ``1 / best_time_ratio``; a sweep has no worst image, so
  ``worst_image_psnr_min`` fails there with a note saying so.

The rules, so that a gate never passes by accident and never fails on noise:

* **A figure the run did not record fails the gate**, with a note naming the missing figure (a
  PSNR of infinity, identical images, is written as null and fails too: say ``min`` on another figure).
* **Intervals.** Where the run recorded an interval for the figure, a gate fails only when the
  *whole* interval is past the threshold. A point past it whose interval still reaches the
  threshold passes, and the note says "passes, not proven"; a point inside whose interval reaches
  past it passes, noted "not proven" as well.
* **Drops** compare with the job's last good run: the newest earlier run of the same notebook and
  tag that finished and passed its gates, or, when no run of the job has passed gates yet, the
  newest one that finished from before it had gates (:func:`last_good_run`). The drop's interval is
  the drop plus and minus both runs' half-widths combined in quadrature (the runs are independent).
  With no earlier good run, or one without the figure, a drop gate passes with a note saying so.
* ``by`` is the margin on the point estimate, positive on the passing side: ``value - threshold``
  for a ``*_min`` gate, ``threshold - value`` for a ``*_max`` one. A failed gate has ``by < 0``.
  At the threshold exactly, a gate passes.

``gates.json`` (version :data:`GATES_VERSION`, read by index.html and the run table)::

    {"version": 1, "job": "inhouse-shapes", "status": "failed", "checked_utc": "2026-...Z",
     "compared_with": "20261201T023000Z_05_inhouse_report_inhouse-shapes",
     "gates": [{"name": "psnr_min", "figure": "psnr", "threshold": 30.0, "value": 27.1,
                "interval": [26.0, 28.2], "passed": false, "by": -2.9,
                "note": "psnr 27.1 dB < 30 dB by 2.9 dB, its whole interval [26, 28.2] dB below: fails"}]}

The recommended-setting file (version :data:`RECOMMENDED_VERSION`), default
``<reports>/recommended/<job name>.json``::

    {"version": 1, "job": "inhouse-shapes", "name": "learned-static rho=0.25 ...",
     "setting": {"scorer": "learned-static", "rho": 0.25, ...},   # TokenCacheConfig fields
     "from_run": "20261201T023000Z_05_inhouse_report_inhouse-shapes", "passed_utc": "2026-...Z",
     "gates": [...the passed gate results...], "figures": {"psnr": 31.2, "flop_ratio": 0.52, ...},
     "notebook": "05_inhouse_report", "identity": {"model_weights_sha256": ..., ...}}

This module reads run folders through :mod:`tclab.runs` and writes with :func:`tclab.files.write_atomic`;
it imports no torch, so checking gates is instant.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from . import runs
from .files import write_atomic

__all__ = ["GATES_VERSION", "GATES_FILE", "RECOMMENDED_VERSION", "RECOMMENDED_DIRNAME", "NAMED_GATES", "ALIASES",
           "GateSpec", "GateSpecError", "GateResult", "GateReport", "GateReportError", "RecommendedSetting",
           "RecommendedFileError", "evaluate_gates", "last_good_run", "read_gate_report", "write_gate_report",
           "run_setting", "run_figures", "read_recommended", "write_recommended", "default_recommended_file"]

#: The layout of ``gates.json``; bump it when a field changes meaning.
GATES_VERSION = 1
#: The verdict's file inside a run folder.
GATES_FILE = runs.GATES_FILE   # the file index.html and the run table read (tclab.runs.index)
#: The layout of the recommended-setting file.
RECOMMENDED_VERSION = 1
#: Where the recommended-setting files go inside the reports folder, one per gated job.
RECOMMENDED_DIRNAME = "recommended"

#: The named gates: name -> (the figure it checks, "min" or "max" or "drop", the unit shown in notes).
NAMED_GATES: dict[str, tuple[str, str, str]] = {
    "psnr_min": ("psnr", "min", "dB"),
    "ssim_min": ("ssim", "min", ""),
    "class_consistency_drop_max": ("class_consistency_drop", "max", ""),
    "flop_speedup_min": ("flop_speedup", "min", "x"),
    "time_speedup_min": ("time_speedup", "min", "x"),
    "worst_image_psnr_min": ("worst_psnr", "min", "dB"),
    "psnr_drop_max": ("psnr", "drop", "dB"),
}
#: Other names for named gates (the issue's wording).
ALIASES = {"speedup_min": "flop_speedup_min"}
#: The generic gates: key -> the check each of its ``{headline figure: threshold}`` entries makes.
GENERIC_GATES = {"min": "min", "max": "max", "drop_max": "drop", "rise_max": "rise"}


class GateSpecError(ValueError):
    """A job's ``gates:`` mapping cannot be checked as written; the message says what to fix."""


class GateReportError(ValueError):
    """A ``gates.json`` this tclab cannot read (another layout version, a part of the wrong type)."""


class RecommendedFileError(ValueError):
    """A recommended-setting file that exists but cannot be read as one."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> float | None:
    return float(v) if _is_number(v) and math.isfinite(v) else None


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---- the spec --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateSpec:
    """A job's quality gates (``gates:`` in a jobs file); None / empty: that gate is not checked.

    Attributes:
        psnr_min: lowest PSNR (dB) against full compute, same seeds. Turn it up to demand quality
            closer to full compute; the interval rule keeps a small image set from failing on noise.
        ssim_min: lowest SSIM against full compute (0..1).
        class_consistency_drop_max: how much lower the cached images' class-consistency may be than
            full compute's (a fraction: 0.05 = five points), the classifier's view of "same content".
        flop_speedup_min: lowest FLOP speed-up (full compute's FLOPs / the cached run's), counted on
            what ran; ``speedup_min`` is the same gate.
        time_speedup_min: lowest wall-clock speed-up; its interval comes from ``time_ratio``'s
            (``1/high .. 1/low``), so a noisy machine does not fail it.
        worst_image_psnr_min: lowest PSNR of the worst single image (notebook 05's ``worst_psnr``):
            catches a setting that is fine on average and breaks one kind of image.
        psnr_drop_max: largest PSNR fall (dB) against the job's last good run: a regression gate
            that needs no absolute number.
        min, max: ``{headline figure: threshold}`` for any flat headline figure (its interval is used
            where ``<figure>_ci_low`` / ``_ci_high`` exist).
        drop_max, rise_max: ``{headline figure: largest fall / rise}`` against the last good run.
    """

    psnr_min: float | None = None
    ssim_min: float | None = None
    class_consistency_drop_max: float | None = None
    flop_speedup_min: float | None = None
    time_speedup_min: float | None = None
    worst_image_psnr_min: float | None = None
    psnr_drop_max: float | None = None
    min: Mapping[str, float] = field(default_factory=dict)
    max: Mapping[str, float] = field(default_factory=dict)
    drop_max: Mapping[str, float] = field(default_factory=dict)
    rise_max: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str = "gates") -> "GateSpec":
        """Read a ``gates:`` mapping. Raises :class:`GateSpecError` listing every problem (unknown names
        with a did-you-mean, values that are not finite numbers, a gate given under two names)."""
        if not isinstance(d, Mapping) or not d:
            raise GateSpecError(f"{where} must be a non-empty mapping 'gate: threshold', e.g. "
                                f"{{psnr_min: 30, flop_speedup_min: 1.8}}; got {d!r}")
        valid = [*NAMED_GATES, *ALIASES, *GENERIC_GATES]
        problems: list[str] = []
        values: dict[str, Any] = {}
        given: dict[str, str] = {}      # canonical name -> the key it was given as
        for key, value in d.items():
            name = ALIASES.get(str(key), str(key))
            if str(key) not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                problems.append(f"unknown gate {str(key)!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                + f"; the gates are {', '.join(valid)}")
                continue
            if name in given:
                problems.append(f"{given[name]!r} and {key!r} are the same gate; give it once")
                continue
            given[name] = str(key)
            if name in GENERIC_GATES:
                if not isinstance(value, Mapping) or not value:
                    problems.append(f"{key!r} must be a mapping 'headline figure: threshold', e.g. "
                                    f"{{{key}: {{ssim: 0.9}}}}; got {value!r}")
                    continue
                checked = {}
                for figure, threshold in value.items():
                    if not isinstance(figure, str) or not figure:
                        problems.append(f"{key!r}: {figure!r} is not a headline figure's name")
                    elif _finite(threshold) is None:
                        problems.append(f"{key}.{figure} must be a finite number, got {threshold!r}")
                    else:
                        checked[figure] = float(threshold)
                values[name] = checked
            elif _finite(value) is None:
                problems.append(f"{key!r} must be a finite number, got {value!r}")
            else:
                values[name] = float(value)
        if problems:
            raise GateSpecError(f"{where}: " + "; ".join(problems))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The gates as given (canonical names), for ``--dry-run`` and provenance."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and v != {}:
                out[f.name] = dict(v) if isinstance(v, Mapping) else v
        return out

    def checks(self) -> list[tuple[str, str, str, float, str]]:
        """Every gate as (name, figure, check ``min|max|drop|rise``, threshold, unit), in the spec's order."""
        out = []
        for name, (figure, check, unit) in NAMED_GATES.items():
            if getattr(self, name) is not None:
                out.append((name, figure, check, getattr(self, name), unit))
        for key, check in GENERIC_GATES.items():
            for figure, threshold in getattr(self, key).items():
                out.append((f"{key}.{figure}", figure, check, threshold, ""))
        return out

    def __len__(self) -> int:
        return len(self.checks())

    @property
    def compares(self) -> bool:
        """Whether any gate compares with the job's last good run."""
        return any(check in ("drop", "rise") for _, _, check, _, _ in self.checks())


# ---- the figures of a run ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Figure:
    """One figure of a run: its value (None: not recorded), its interval, and where it was read."""

    value: float | None
    interval: tuple[float, float] | None
    source: str
    missing: str = ""       # why value is None, for the note

    def with_source(self, source: str) -> "_Figure":
        return _Figure(self.value, self.interval, source, self.missing)


def _is_sweep(summary: Mapping[str, Any]) -> bool:
    return "best_under_budget" in summary


def _interval(lo: Any, hi: Any) -> tuple[float, float] | None:
    lo, hi = _finite(lo), _finite(hi)
    return (lo, hi) if lo is not None and hi is not None and lo <= hi else None


def _headline_figure(headline: Mapping[str, Any], key: str, what: str = "") -> _Figure:
    v = headline.get(key)
    if v is None:
        why = (f"the run recorded {key} as null" if key in headline
               else f"this run's headline has no {key!r}") + (f" ({what})" if what else "")
        return _Figure(None, None, key, why)
    if _finite(v) is None:
        return _Figure(None, None, key, f"{key} is not a finite number ({v!r})")
    return _Figure(float(v), _interval(headline.get(f"{key}_ci_low"), headline.get(f"{key}_ci_high")), key)


def _inverse(f: _Figure, source: str) -> _Figure:
    """``1 / f``: a speed-up from a cost ratio (the interval flips: 1/high .. 1/low)."""
    if f.value is None:
        return _Figure(None, None, source, f.missing)
    if f.value <= 0:
        return _Figure(None, None, source, f"{f.source} is {f.value:g}: no speed-up can be read from it")
    iv = (1.0 / f.interval[1], 1.0 / f.interval[0]) if f.interval and f.interval[0] > 0 else None
    return _Figure(1.0 / f.value, iv, source)


def _named_figure(figure: str, summary: Mapping[str, Any]) -> _Figure:
    """A named gate's figure: from the in-house report's headline, or a sweep's recommended point."""
    h = summary.get("headline") if isinstance(summary.get("headline"), Mapping) else {}
    if _is_sweep(summary):
        best = summary.get("best_under_budget")
        if not isinstance(best, Mapping):
            return _Figure(None, None, "best_under_budget",
                           "the sweep has no point within its budget (best_under_budget is null)")
        if figure == "psnr":
            return _headline_figure(h, "best_psnr")
        if figure == "ssim":
            return _headline_figure(best, "ssim").with_source("best_under_budget.ssim")
        if figure == "class_consistency_drop":
            full, cached = _headline_figure(h, "full_compute_class_consistency"), _headline_figure(
                h, "best_class_consistency")
            source = "full_compute_class_consistency - best_class_consistency"
            if full.value is None or cached.value is None:
                return _Figure(None, None, source, full.missing or cached.missing)
            return _Figure(full.value - cached.value, None, source)   # not paired: no interval for the difference
        if figure == "flop_speedup":
            return _inverse(_headline_figure(h, "best_flop_ratio"), "1 / best_flop_ratio")
        if figure == "time_speedup":
            return _inverse(_headline_figure(h, "best_time_ratio"), "1 / best_time_ratio")
        if figure == "worst_psnr":
            return _Figure(None, None, "worst_psnr", "a sweep (notebooks 02-04) records no worst image; this gate "
                                                     "applies to the in-house report (notebook 05)")
    if figure == "class_consistency_drop":
        change = _headline_figure(h, "class_consistency_change", "no class-consistency was measured: is a "
                                                                  "classifier configured?")
        if change.value is None:
            return _Figure(None, None, "-class_consistency_change", change.missing)
        iv = (-change.interval[1], -change.interval[0]) if change.interval else None
        return _Figure(-change.value, iv, "-class_consistency_change")
    if figure == "time_speedup":
        ratio = _headline_figure(h, "time_ratio")
        inv = _inverse(ratio, "time_speedup")
        direct = _headline_figure(h, "time_speedup")
        if direct.value is not None:   # the report's own number, with time_ratio's interval flipped
            return _Figure(direct.value, inv.interval, "time_speedup")
        return inv.with_source("1 / time_ratio") if inv.value is not None else direct
    if figure == "flop_speedup":
        direct = _headline_figure(h, "flop_speedup")
        if direct.value is None and _finite(h.get("flop_ratio")) is not None:
            return _inverse(_headline_figure(h, "flop_ratio"), "1 / flop_ratio")
        return direct
    return _headline_figure(h, figure)


# ---- one gate's verdict ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateResult:
    """One gate checked on one run (an entry of ``gates.json``'s ``gates``).

    ``figure``: what was compared (a headline key, or how it was derived); ``value``: its point
    estimate (for a drop / rise gate: the drop / rise); ``interval``: its interval, or None;
    ``by``: the margin on the point, positive on the passing side (None when nothing was measured);
    ``note``: one sentence a reader can act on.
    """

    name: str
    figure: str
    threshold: float
    value: float | None
    interval: tuple[float, float] | None
    passed: bool
    by: float | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "figure": self.figure, "threshold": self.threshold, "value": self.value,
                "interval": list(self.interval) if self.interval else None, "passed": self.passed, "by": self.by,
                "note": self.note}

    @classmethod
    def from_dict(cls, d: Any, where: str = "gate") -> "GateResult":
        if not isinstance(d, Mapping):
            raise GateReportError(f"{where} must be an object, got {d!r}")
        iv = d.get("interval")
        if iv is not None and not (isinstance(iv, list) and len(iv) == 2 and all(_is_number(x) for x in iv)):
            raise GateReportError(f"{where}: 'interval' must be [low, high] or null, got {iv!r}")
        for key, ok in (("name", isinstance(d.get("name"), str)), ("passed", isinstance(d.get("passed"), bool)),
                        ("threshold", _is_number(d.get("threshold"))),
                        ("value", d.get("value") is None or _is_number(d.get("value"))),
                        ("by", d.get("by") is None or _is_number(d.get("by")))):
            if not ok:
                raise GateReportError(f"{where}: {key!r} has the wrong type ({d.get(key)!r})")
        return cls(name=d["name"], figure=str(d.get("figure") or ""), threshold=float(d["threshold"]),
                   value=None if d.get("value") is None else float(d["value"]),
                   interval=(float(iv[0]), float(iv[1])) if iv else None, passed=d["passed"],
                   by=None if d.get("by") is None else float(d["by"]), note=str(d.get("note") or ""))

    @property
    def not_proven(self) -> bool:
        """Passed, but the interval reaches past the threshold (the note says "not proven")."""
        return self.passed and "not proven" in self.note


def _num(v: float, unit: str = "") -> str:
    text = f"{v:.4g}"
    return f"{text} {unit}" if unit and unit != "x" else f"{text}x" if unit == "x" else text


def _iv(iv: tuple[float, float], unit: str = "") -> str:
    return f"[{iv[0]:.4g}, {iv[1]:.4g}]" + (f" {unit}" if unit and unit != "x" else "")


def _check(name: str, label: str, figure: str, kind: str, threshold: float, value: float,
           interval: tuple[float, float] | None, unit: str, extra: str = "") -> GateResult:
    """A min or max check with the interval rule (see the module docstring)."""
    value = round(value, 9)   # 29.1 - 30 is -0.9 here, not -0.8999999999999986
    if kind == "min":
        by, point_ok = round(value - threshold, 9), value >= threshold
        past = interval is not None and interval[1] < threshold        # the whole interval below
        reaches_past = interval is not None and interval[0] < threshold
        op_ok, op_bad, side = ">=", "<", "below"
    else:
        by, point_ok = round(threshold - value, 9), value <= threshold
        past = interval is not None and interval[0] > threshold        # the whole interval above
        reaches_past = interval is not None and interval[1] > threshold
        op_ok, op_bad, side = "<=", ">", "above"
    t, v, b = _num(threshold, unit), _num(value, unit), _num(abs(by), unit)
    post = f" ({extra})" if extra else ""
    if interval is None:
        passed = point_ok
        if point_ok:
            note = f"{label} {v} {op_ok} {t}" + (f", {b} to spare" if by > 0 else "")
        else:
            note = f"{label} {v} {op_bad} {t} by {b} (no interval recorded, judged on the point): fails"
    elif point_ok:
        passed = True
        note = f"{label} {v} {op_ok} {t}" + (f", {b} to spare" if by > 0 else "")
        note += (f"; its interval {_iv(interval, unit)} reaches {side} {t}: passes, not proven" if reaches_past
                 else f", its whole interval {_iv(interval, unit)} clear of it")
    elif past:
        passed = False
        note = f"{label} {v} {op_bad} {t} by {b}, its whole interval {_iv(interval, unit)} {side}: fails"
    else:
        passed = True
        note = (f"{label}: point {v} {op_bad} {t} but the interval {_iv(interval, unit)} reaches the threshold: "
                "passes, not proven")
    interval = (round(interval[0], 9), round(interval[1], 9)) if interval else None
    return GateResult(name, figure, threshold, value, interval, passed, by, note + post)


def _missing(name: str, figure: str, threshold: float, why: str) -> GateResult:
    return GateResult(name, figure, threshold, None, None, False, None,
                      f"{why}: not measured, so the gate fails (a gate never passes on a missing figure)")


def _compare(name: str, figure: str, kind: str, threshold: float, unit: str, cur: _Figure, prev: _Figure | None,
             compared_with: str | None) -> GateResult:
    """A drop or rise gate: this run against the job's last good run."""
    label, source = f"{figure} {kind}", f"{cur.source} {kind}"
    if cur.value is None:
        return _missing(name, source, threshold, cur.missing)
    if prev is None:
        return GateResult(name, source, threshold, None, None, True, None,
                          "no earlier good run of this job to compare with: passes (nothing to compare yet)")
    if prev.value is None:
        return GateResult(name, source, threshold, None, None, True, None,
                          f"the comparison run {compared_with} has no {cur.source} ({prev.missing}): passes, "
                          "nothing to compare with")
    change = prev.value - cur.value if kind == "drop" else cur.value - prev.value
    halves = [(iv[1] - iv[0]) / 2 for iv in (cur.interval, prev.interval) if iv is not None]
    interval = None
    how = f"from {_num(prev.value, unit)} in {compared_with} to {_num(cur.value, unit)}"
    if halves:
        half = math.sqrt(sum(h * h for h in halves))
        interval = (change - half, change + half)
        how += ("; interval: both runs' half-widths combined in quadrature" if len(halves) == 2 else
                f"; interval from {'this run' if cur.interval else 'the comparison run'}'s half-width alone, the "
                "other recorded none")
    return _check(name, label, source, "max", threshold, change, interval, unit, extra=how)


# ---- the report of one run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateReport:
    """Every gate of one job checked on one run: what ``gates.json`` holds (:meth:`to_dict`)."""

    job: str
    results: tuple[GateResult, ...]
    checked_utc: str
    compared_with: str | None = None
    version: int = GATES_VERSION

    @property
    def status(self) -> str:
        """``"passed"`` when every gate passed, else ``"failed"``."""
        return "passed" if all(r.passed for r in self.results) else "failed"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    @property
    def not_proven(self) -> list[GateResult]:
        return [r for r in self.results if r.not_proven]

    def failed_text(self) -> str:
        """``psnr_min: psnr 27.1 dB < 30 dB by 2.9 dB ...; worst_image_psnr_min: ...`` (for summary lines)."""
        return "; ".join(f"{r.name}: {r.note}" for r in self.failed)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "job": self.job, "status": self.status, "checked_utc": self.checked_utc,
                "compared_with": self.compared_with, "gates": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, d: Any, source: str = "gates.json") -> "GateReport":
        """Read a ``gates.json`` object; raises :class:`GateReportError` naming the file and the field."""
        if not isinstance(d, Mapping):
            raise GateReportError(f"{source}: must be a JSON object")
        if d.get("version") != GATES_VERSION:
            raise GateReportError(f"{source}: layout version {d.get('version')!r}; this tclab reads {GATES_VERSION}")
        rows = d.get("gates")
        if not isinstance(rows, list):
            raise GateReportError(f"{source}: 'gates' must be a list")
        results = tuple(GateResult.from_dict(r, f"{source} gate {i + 1}") for i, r in enumerate(rows))
        report = cls(job=str(d.get("job") or ""), results=results, checked_utc=str(d.get("checked_utc") or ""),
                     compared_with=d.get("compared_with") if isinstance(d.get("compared_with"), str) else None)
        if d.get("status") != report.status:
            raise GateReportError(f"{source}: status {d.get('status')!r} disagrees with its gates ({report.status})")
        return report


def evaluate_gates(spec: GateSpec, summary: Mapping[str, Any], previous_summary: Mapping[str, Any] | None = None,
                   *, job: str = "", compared_with: str | None = None, checked_utc: str | None = None) -> GateReport:
    """Check every gate of ``spec`` on a run's ``summary.json`` (a mapping; {} when the run wrote none).

    ``previous_summary``: the job's last good run's summary (:func:`last_good_run`), named
    ``compared_with``, for the drop / rise gates; None when there is none. Pure: reads nothing, writes nothing.
    """
    summary = summary if isinstance(summary, Mapping) else {}
    results = []
    for name, figure, check, threshold, unit in spec.checks():
        generic = "." in name
        cur = _headline_figure(summary.get("headline") or {}, figure) if generic else _named_figure(figure, summary)
        if check in ("drop", "rise"):
            prev = None
            if previous_summary is not None:
                prev = (_headline_figure(previous_summary.get("headline") or {}, figure) if generic
                        else _named_figure(figure, previous_summary))
            results.append(_compare(name, figure, check, threshold, unit, cur, prev, compared_with))
        elif cur.value is None:
            results.append(_missing(name, cur.source, threshold, cur.missing))
        else:
            results.append(_check(name, figure, cur.source, check, threshold, cur.value, cur.interval, unit))
    return GateReport(job=job, results=tuple(results), checked_utc=checked_utc or _now_utc(),
                      compared_with=compared_with)


# ---- run folders: the verdict, the last good run -----------------------------------------------------------

def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _read_json_file(path: Path, error: type[Exception]) -> Any:
    """The JSON in ``path``; None when there is no file; ``error`` naming the file when it cannot be read."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot be read ({e})") from None


def write_gate_report(run_dir: str | os.PathLike, report: GateReport) -> Path:
    """Write ``<run_dir>/gates.json`` atomically (a reader sees the old file, the new one, or none)."""
    data = _dump(report.to_dict())
    return write_atomic(Path(run_dir) / GATES_FILE, lambda f: f.write(data))


def read_gate_report(run_dir: str | os.PathLike) -> GateReport | None:
    """A run folder's gates.json; None when it has none. A corrupt one raises :class:`GateReportError`."""
    path = Path(run_dir) / GATES_FILE
    data = _read_json_file(path, GateReportError)
    return None if data is None else GateReport.from_dict(data, str(path))


def last_good_run(reports_dir: str | os.PathLike, notebook: str, tag: str, exclude: str | None = None) -> Path | None:
    """The run a job's drop / rise gates compare with, or None.

    Among the runs of ``notebook`` (its stem) and ``tag`` that finished (status ok), newest first and
    ``exclude`` (the run being judged) left out: the newest whose gates.json passed; when none has,
    the newest without a gates.json (from before the job had gates). A gate-failed run is never the
    comparison, so a slow slide cannot pass one small step at a time. Read through the run table
    (:func:`tclab.runs.rows`), or the folders when the table cannot be used.
    """
    reports = Path(reports_dir)
    try:
        names = [r["run"] for r in runs.rows(reports, tag=tag, status="ok") if r.get("notebook") == notebook]
    except Exception:  # noqa: BLE001 - a broken table must not stop a schedule: the folders say the same
        names = [i.path.name for i in runs.list_runs(reports) if i.status == "ok" and i.tag == tag
                 and i.notebook == notebook]
    ungated = None
    for name in names:
        if name == exclude:
            continue
        try:
            report = read_gate_report(reports / name)
        except GateReportError:
            continue                       # unreadable verdict: not a run to trust
        if report is not None and report.passed:
            return reports / name
        if report is None and ungated is None:
            ungated = reports / name
    return ungated


# ---- the setting a run recommends, and the rollback file ---------------------------------------------------

def run_setting(summary: Mapping[str, Any]) -> tuple[str, dict] | None:
    """(name, TokenCache setting) a run recommends, or None: notebook 05's ``details.recommendation``
    (``name``, ``cache``), a sweep's ``best_under_budget`` (``name``, ``config.cache``)."""
    details = summary.get("details")
    rec = details.get("recommendation") if isinstance(details, Mapping) else None
    if isinstance(rec, Mapping) and isinstance(rec.get("cache"), Mapping) and isinstance(rec.get("name"), str):
        return rec["name"], dict(rec["cache"])
    best = summary.get("best_under_budget")
    config = best.get("config") if isinstance(best, Mapping) else None
    if isinstance(config, Mapping) and isinstance(config.get("cache"), Mapping) and isinstance(best.get("name"), str):
        return best["name"], dict(config["cache"])
    return None


#: The figures the recommended-setting file carries: its name -> the headline key (in-house report) and
#: the key of the sweep's best point.
_SETTING_FIGURES = (("psnr", "psnr", "psnr"), ("psnr_ci_low", "psnr_ci_low", None),
                    ("psnr_ci_high", "psnr_ci_high", None), ("ssim", "ssim", "ssim"),
                    ("flop_ratio", "flop_ratio", "flop_ratio"), ("time_ratio", "time_ratio", "time_ratio"),
                    ("flop_speedup", "flop_speedup", None), ("time_speedup", "time_speedup", None),
                    ("class_consistency_full", "class_consistency_full", None),
                    ("class_consistency_cached", "class_consistency_cached", "class_consistency"),
                    ("class_consistency_change", "class_consistency_change", None),
                    ("worst_psnr", "worst_psnr", None))


def run_figures(summary: Mapping[str, Any]) -> dict[str, float]:
    """The figures of the recommended setting as the run measured them (finite numbers only)."""
    if _is_sweep(summary):
        best = summary.get("best_under_budget") if isinstance(summary.get("best_under_budget"), Mapping) else {}
        picked = {name: best.get(key) for name, _, key in _SETTING_FIGURES if key}
    else:
        h = summary.get("headline") if isinstance(summary.get("headline"), Mapping) else {}
        picked = {name: h.get(key) for name, key, _ in _SETTING_FIGURES}
    return {k: float(v) for k, v in picked.items() if _finite(v) is not None}


@dataclass(frozen=True)
class RecommendedSetting:
    """The recommended-setting file of a gated job: the last setting whose run passed every gate."""

    job: str
    name: str
    setting: dict
    from_run: str
    passed_utc: str
    gates: tuple[GateResult, ...] = ()
    figures: dict = field(default_factory=dict)
    notebook: str | None = None
    identity: dict | None = None
    version: int = RECOMMENDED_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "job": self.job, "name": self.name, "setting": self.setting,
                "from_run": self.from_run, "passed_utc": self.passed_utc, "gates": [g.to_dict() for g in self.gates],
                "figures": self.figures, "notebook": self.notebook, "identity": self.identity}

    @classmethod
    def from_dict(cls, d: Any, source: str = "recommended file") -> "RecommendedSetting":
        if not isinstance(d, Mapping):
            raise RecommendedFileError(f"{source}: must be a JSON object")
        if d.get("version") != RECOMMENDED_VERSION:
            raise RecommendedFileError(f"{source}: layout version {d.get('version')!r}; this tclab reads "
                                       f"{RECOMMENDED_VERSION}")
        for key, kind in (("job", str), ("name", str), ("setting", dict), ("from_run", str), ("passed_utc", str)):
            if not isinstance(d.get(key), kind):
                raise RecommendedFileError(f"{source}: {key!r} must be a {kind.__name__}, got {d.get(key)!r}")
        try:
            gates = tuple(GateResult.from_dict(g, f"{source} gate {i + 1}") for i, g in enumerate(d.get("gates") or []))
        except GateReportError as e:
            raise RecommendedFileError(str(e)) from None
        return cls(job=d["job"], name=d["name"], setting=dict(d["setting"]), from_run=d["from_run"],
                   passed_utc=d["passed_utc"], gates=gates, figures=dict(d.get("figures") or {}),
                   notebook=d.get("notebook"), identity=d.get("identity"))


def default_recommended_file(reports_dir: str | os.PathLike, job: str) -> Path:
    """``<reports>/recommended/<job>.json``."""
    return Path(reports_dir) / RECOMMENDED_DIRNAME / f"{job}.json"


def read_recommended(path: str | os.PathLike) -> RecommendedSetting | None:
    """The recommended-setting file at ``path``; None when there is none yet. A file that cannot be read
    as one raises :class:`RecommendedFileError` (it is never overwritten by a failing run either way)."""
    path = Path(path)
    data = _read_json_file(path, RecommendedFileError)
    return None if data is None else RecommendedSetting.from_dict(data, str(path))


def write_recommended(path: str | os.PathLike, job: str, run_dir: str | os.PathLike, summary: Mapping[str, Any],
                      report: GateReport) -> RecommendedSetting | None:
    """Replace the recommended-setting file with this run's setting, atomically, if ``report`` passed and
    the run recommends one (:func:`run_setting`); returns what was written, or None (nothing touched)."""
    setting = run_setting(summary)
    if not report.passed or setting is None:
        return None
    identity = summary.get("identity") if isinstance(summary.get("identity"), Mapping) else None
    rec = RecommendedSetting(job=job, name=setting[0], setting=setting[1], from_run=Path(run_dir).name,
                             passed_utc=report.checked_utc, gates=report.results, figures=run_figures(summary),
                             notebook=_notebook_of(run_dir), identity=dict(identity) if identity else None)
    data = _dump(rec.to_dict())
    write_atomic(path, lambda f: f.write(data))
    return rec


def _notebook_of(run_dir: str | os.PathLike) -> str | None:
    prov = runs.read_json(Path(run_dir) / "provenance.json")
    nb = prov.get("notebook")
    return Path(str(nb)).stem if nb else None
