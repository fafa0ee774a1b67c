"""``reports/index.html``: every run folder of a reports folder on one page.

Owns reading a run folder defensively into :class:`RunInfo` (:func:`read_run`, :func:`list_runs`;
a corrupt file never raises), the figures each run shows (``tclab.report.KeyNumber``, picked from
summary.json), the comparison with the previous good run of the same notebook and tag, and
rendering the page (:func:`render_index`; :func:`tclab.runs.run_table.write_index` writes it from
the run table). Reads folders through :mod:`.layout`; never writes into a run folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..report import KeyNumber, format_duration, format_number, unit_suffix
from ..report import format_value as format_figure  # the index's name for it
from .layout import FAILED_SUFFIX, REPORT_NAME, _TIME_FORMAT, _read_json_noting, is_run_folder
from .origin import _iso, _utc_now


INDEX_FIGURES = 3   # headline figures per run on the index: enough to recognise the answer, few enough to scan
RUN_STATUSES = ("ok", "failed", "running", "unknown")


@dataclass
class RunInfo:
    """One run folder as index.html sees it, read defensively from provenance.json and summary.json.

    A missing or corrupt file never raises: the run is listed with what is known, and ``problems``
    says what could not be read. A scheduled job runs under its name as tag (``tclab.jobs``), so
    ``group`` (notebook, tag) is one job's history.
    """

    path: Path
    status: str                  # "ok", "failed", "running" (interactive, unfinished) or "unknown"
    notebook: str                # the notebook's stem
    tag: str
    start_utc: str               # ISO 8601 UTC; from the folder name when provenance lacks it; "" if unknown
    headline: dict[str, Any]
    report: str | None           # file name of the HTML report inside the folder, if any
    error: str | None = None     # provenance's one-line error of a failed run
    model: str | None = None     # the ``model`` parameter (a load_dit spec or a model folder)
    model_sha256: str | None = None    # identity.model_weights_sha256
    images: str | None = None    # the ``images`` parameter (an image folder, or "shapes")
    images_sha256: str | None = None   # identity.images_manifest_sha256
    duration_s: float | None = None
    figures: list[KeyNumber] = field(default_factory=list)   # what the index shows, in order
    problems: list[str] = field(default_factory=list)        # e.g. "summary.json is not valid JSON"
    gate_status: str | None = None   # gates.json of a scheduled job's quality gates: "passed", "failed"; None: none
    gate_notes: list[str] = field(default_factory=list)      # one line per failed gate
    human: dict[str, Any] | None = None   # ratings_summary.json: the blind A/B human verdict (tclab.rating)

    @property
    def gate_failed(self) -> bool:
        return self.gate_status == "failed"

    @property
    def group(self) -> tuple[str, str]:
        """Runs of the same notebook and tag are the same question asked again over time."""
        return (self.notebook, self.tag)

    def value_of(self, key: str) -> Any:
        """The value of figure ``key`` in this run (a shown figure, else its headline entry); None if absent."""
        return next((f.value for f in self.figures if f.key == key), self.headline.get(key))


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _text(v: Any) -> str | None:
    """A provenance/summary value as display text; None for missing or empty."""
    if v is None:
        return None
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s.strip() or None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _parse_iso(s: str | None) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None
    except ValueError:
        return None
    return t.replace(tzinfo=_dt.timezone.utc) if t is not None and t.tzinfo is None else t


def _start_from_folder_name(name: str) -> str:
    """'20260614T103015Z_nb_tag' -> '2026-06-14T10:30:15.000Z'; '' when the name carries no start time."""
    try:
        t = _dt.datetime.strptime(name.split("_", 1)[0], _TIME_FORMAT).replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return ""
    return _iso(t)


def _key_figures(summary: dict[str, Any], headline: dict[str, Any]) -> list[KeyNumber]:
    """The figures the index shows for a run.

    summary.json ``report.key_numbers`` (``[{"key", "label", "value", "unit"}]``, written for the report)
    picked and ordered by ``report.index_keys``; without ``index_keys``, the first key numbers. Older runs
    without key numbers: the first numeric, bool or string ``headline`` entries, labelled by their key.
    """
    report = _dict(summary.get("report"))
    numbers = report.get("key_numbers") if isinstance(report.get("key_numbers"), list) else []
    by_key = {n["key"]: n for n in numbers if isinstance(n, dict) and isinstance(n.get("key"), str)}
    keys = report.get("index_keys")
    chosen = ([by_key[k] for k in keys if isinstance(k, str) and k in by_key] if isinstance(keys, list) and keys
              else list(by_key.values()))   # no index_keys (or none given): the first key numbers
    if chosen:
        return [KeyNumber(n["key"], _text(n.get("label")) or n["key"], n.get("value"), _text(n.get("unit")) or "",
                          _text(n.get("note")) or "") for n in chosen[:INDEX_FIGURES]]
    return [KeyNumber(str(k), str(k), v) for k, v in headline.items()
            if isinstance(v, (int, float, str, bool))][:INDEX_FIGURES]


def _safe_file(d: Path, name: str | None) -> str | None:
    """``name`` if it is a plain file name of an existing file in ``d`` (never a path out of it)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    return name if (d / name).is_file() else None


def read_run(d: Path) -> RunInfo:
    """One run folder as :class:`RunInfo`; never raises on missing or corrupt provenance.json/summary.json."""
    problems: list[str] = []
    prov = _read_json_noting(d / "provenance.json", problems)
    summary = _read_json_noting(d / "summary.json", problems)
    status = _text(prov.get("status")) or ("failed" if d.name.endswith(FAILED_SUFFIX) else "unknown")
    nb = _text(prov.get("notebook")) or _text(prov.get("command"))   # a notebook run, or tclab evaluate/sample
    params = _dict(prov.get("parameters"))
    identity = {**_dict(prov.get("identity")), **_dict(summary.get("identity"))}
    headline = _dict(summary.get("headline"))
    start = _text(prov.get("start_utc")) or _start_from_folder_name(d.name)
    duration = _number(prov.get("duration_s"))
    if duration is None:   # an interactive run records only its start and end
        t0, t1 = _parse_iso(start), _parse_iso(_text(prov.get("end_utc")))
        duration = (t1 - t0).total_seconds() if t0 and t1 and t1 >= t0 else None
    return RunInfo(
        path=d, status=status, notebook=Path(nb).stem if nb else "?", tag=_text(prov.get("tag")) or "",
        start_utc=start, headline=headline,
        report=_safe_file(d, _text(prov.get("report"))) or _safe_file(d, REPORT_NAME),
        error=_text(prov.get("error")),
        model=_text(params.get("model")) or _text(identity.get("model")),
        model_sha256=_text(identity.get("model_weights_sha256")),
        images=_text(params.get("images")), images_sha256=_text(identity.get("images_manifest_sha256")),
        duration_s=duration, figures=_key_figures(summary, headline), problems=problems,
        **_gates_of(_read_json_noting(d / GATES_FILE, problems)),
        human=_read_json_noting(d / HUMAN_VERDICT_FILE, problems) or None)


#: A scheduled job's gate verdict inside its run folder (``tclab.gates``), and the human verdict (``tclab.rating``).
GATES_FILE = "gates.json"
HUMAN_VERDICT_FILE = "ratings_summary.json"


def _gates_of(gates: dict[str, Any]) -> dict[str, Any]:
    """gates.json as RunInfo's ``gate_status`` and ``gate_notes`` (a line per failed gate)."""
    status = _text(gates.get("status"))
    if status not in ("passed", "failed"):
        return {}
    rows = [g for g in gates.get("gates") or [] if isinstance(g, dict)]
    notes = [f"{g.get('name')}: {_text(g.get('note')) or 'failed'}" for g in rows if g.get("passed") is False]
    return {"gate_status": status, "gate_notes": notes}


def list_runs(reports_dir: str | os.PathLike) -> list[RunInfo]:
    """All run folders under ``reports_dir``, newest first. Staging and hidden folders are skipped.

    A run folder is one holding provenance.json or summary.json (readable or not).
    """
    reports = Path(reports_dir)
    runs: list[RunInfo] = []
    if not reports.is_dir():
        return runs
    for d in reports.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        if not is_run_folder(d):
            continue
        runs.append(read_run(d))
    runs.sort(key=lambda r: (r.start_utc, r.path.name), reverse=True)
    return runs


def _when(iso: str) -> str:
    """'2025-06-14T10:30:15.123Z' -> '2025-06-14 10:30:15' for the index (full value in provenance)."""
    return iso.replace("T", " ")[:19] if iso else "?"


def _delta(now: Any, before: Any, unit: str = "", key: str = "") -> tuple[str, bool]:
    """(text, moved): '+16' / '-0.02' / '=' / 'changed' for a figure against its previous value."""
    if _number(now) is not None and _number(before) is not None:
        d = now - before
        if d == 0:
            return "=", False
        text = format_number(abs(d), unit, key)
        if float(text) == 0:               # a real but invisible change at this rounding
            return "\u2248", True
        return ("+" if d > 0 else "-") + text, True
    return ("=", False) if now == before else ("changed", True)


def _short_name(value: str, max_len: int = 28) -> str:
    """A model or image-set spec for a table cell: a path's last folder name, at most ``max_len`` long."""
    parts = [p for p in re.split(r"[\\/]+", value) if p]
    return _clip(parts[-1] if parts else value, max_len)


_INDEX_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em 1.5em;
       color: #1f2328; background: #fff; }
h1 { font-size: 1.55em; margin: 0 0 .15em; } h2 { font-size: 1.2em; margin: 1.8em 0 .25em; }
p { margin: .3em 0 .7em; max-width: 75em; } .lead { color: #444; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; border: 1px solid #d8dee4; border-radius: 6px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: .45em .65em; text-align: left; vertical-align: top; border-bottom: 1px solid #eaeef2; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; border-bottom: 1px solid #d8dee4; }
tbody tr:last-child td { border-bottom: none; } tbody tr:hover { background: #f8faff; }
td.nowrap, .nowrap { white-space: nowrap; } td.num { text-align: right; white-space: nowrap; }
#jobs td:nth-child(3), #jobs td:nth-child(4), #jobs td:nth-child(5) { text-align: right; }
.status { display: inline-block; padding: 0 .55em; border-radius: 1em; font-size: .85em; font-weight: 600; }
.status.ok { background: #dcf3e3; color: #116329; } .status.failed { background: #ffe3e6; color: #a40e26; }
.status.running { background: #fff1c2; color: #7a5c00; }
.status.gate { background: #a40e26; color: #fff; margin-top: .25em; } .status.unknown { background: #eaeef2; color: #57606a; }
.err { color: #a40e26; font-size: .85em; max-width: 24em; overflow-wrap: anywhere; margin-top: .2em; }
.warn { color: #7a5c00; font-size: .85em; max-width: 24em; margin-top: .2em; }
.hash { color: #6e7781; font-size: .85em; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .92em; }
td.tag { max-width: 12em; } td.tag code { overflow-wrap: break-word; } td.spec span, td.spec { white-space: nowrap; }
.vs { font-size: .85em; color: #57606a; margin-top: .25em; }
ul.figs { margin: 0; padding: 0; list-style: none; min-width: 14em; } ul.figs li { margin: 0 0 .1em; }
.lbl { color: #57606a; }
.delta { font-size: .82em; padding: 0 .3em; border-radius: 3px; color: #6e7781; white-space: nowrap; }
.delta.moved { background: #fff1c2; color: #5c4500; }
.muted { color: #8c959f; } td.links a { display: block; }
.filters { display: flex; flex-wrap: wrap; gap: .5em 1em; align-items: center; margin: .8em 0 .6em; }
.filters input[type=search] { width: 22em; max-width: 100%; padding: .3em .5em; font: inherit; }
.filters select { padding: .25em; font: inherit; } #f-count { color: #57606a; }
[hidden] { display: none !important; }
th.sort { cursor: pointer; user-select: none; } th.sort:hover { background: #eef1f4; }
th.sort::after { content: " \\2195"; color: #afb8c1; }
th[aria-sort=ascending]::after { content: " \\25b2"; color: #57606a; }
th[aria-sort=descending]::after { content: " \\25bc"; color: #57606a; }
.note { color: #57606a; font-size: .9em; }
"""

# Filter and sort without a server (works from file://; no external resources). Without JavaScript the
# filter controls stay hidden and the tables keep their newest-first order.
_INDEX_JS = """
(function () {
  "use strict";
  var each = function (list, f) { Array.prototype.forEach.call(list, f); };
  var runs = document.getElementById("runs"), box = document.getElementById("filters");
  if (runs && box) {
    var text = document.getElementById("f-text"), status = document.getElementById("f-status"),
        notebook = document.getElementById("f-notebook"), count = document.getElementById("f-count");
    var rows = Array.prototype.filter.call(runs.tBodies[0].rows, function (r) { return r.hasAttribute("data-status"); });
    var apply = function () {
      var q = text.value.trim().toLowerCase(), s = status.value, n = notebook.value, shown = 0;
      rows.forEach(function (tr) {
        var hay = (tr.textContent + " " + (tr.getAttribute("data-search") || "")).toLowerCase();
        var keep = (!q || hay.indexOf(q) >= 0) && (!s || tr.getAttribute("data-status") === s) &&
                   (!n || tr.getAttribute("data-notebook") === n);
        tr.hidden = !keep;
        if (keep) { shown += 1; }
      });
      count.textContent = shown === rows.length ? rows.length + " runs" : "showing " + shown + " of " + rows.length + " runs";
    };
    each([text, status, notebook], function (el) { el.addEventListener("input", apply); el.addEventListener("change", apply); });
    box.hidden = false;
    apply();
  }
  var NUM = /^[-+]?(\\d+\\.?\\d*|\\.\\d+)([eE][-+]?\\d+)?$/;
  var key = function (td) {
    if (!td) { return ""; }
    var v = td.getAttribute("data-sort");
    return (v === null ? td.textContent : v).trim();
  };
  var compare = function (a, b) {          // empty values last; numbers as numbers; text naturally
    if (a === "" || b === "") { return a === b ? 0 : (a === "" ? 1 : -1); }
    if (NUM.test(a) && NUM.test(b)) { return parseFloat(a) - parseFloat(b); }
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  };
  each(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells, body = table.tBodies[0];
    each(heads, function (th, col) {
      if (th.classList.contains("nosort")) { return; }
      th.classList.add("sort");
      th.tabIndex = 0;
      th.title = (th.title ? th.title + " " : "") + "(click to sort)";
      var sort = function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        each(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var rs = Array.prototype.slice.call(body.rows);
        rs.sort(function (x, y) {
          var a = key(x.cells[col]), b = key(y.cells[col]);
          return (a === "" || b === "") ? compare(a, b) : dir * compare(a, b);
        });
        rs.forEach(function (r) { body.appendChild(r); });
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sort(); }
      });
    });
  });
})();
"""


@contextlib.contextmanager
def index_lock(reports: Path):
    """The reports folder's index lock (``.index.lock``): held by whoever reads the runs and rewrites the page, so
    of two runs ending together the one that writes last has read both."""
    import fcntl

    lock = os.open(reports / ".index.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _replace_atomically(out: Path, text: str, locked: bool = False) -> None:
    """Write ``out`` through a unique temporary file in its folder, under the index lock (``locked``: the caller
    holds it): concurrent writers never tear the file nor trip over each other's temporary file."""
    import tempfile

    with contextlib.nullcontext() if locked else index_lock(out.parent):
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _href(run: RunInfo, file: str | None = None) -> str:
    """A link into a run folder relative to index.html's folder (the one holding the run folders):
    valid wherever the reports folder is copied or mounted, and from file://."""
    from urllib.parse import quote

    return quote(run.path.name) + "/" + (quote(file) if file else "")


def _a(run: RunInfo, file: str | None, label: str, title: str | None = None) -> str:
    e = html.escape
    tip = f' title="{e(title)}"' if title else ""
    return f'<a href="{e(_href(run, file))}"{tip}>{e(label)}</a>'


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _status_class(run: RunInfo) -> str:
    return run.status if run.status in RUN_STATUSES else "unknown"


def _spec_cell(value: str | None, sha: str | None, what: str) -> str:
    """A model or image-set cell: the short name (the full spec in a tooltip), then the first 8 hex digits
    of its hash, which tell two models or image sets of one name apart."""
    e = html.escape
    if not value and not sha:
        return '<td class="spec" data-sort=""><span class="muted">-</span></td>'
    parts = []
    if value:
        short = _short_name(value)
        parts.append(f'<span title="{e(value)}">{e(short)}</span>' if short != value else e(short))
    if sha:
        parts.append(f'<code class="hash" title="{e(what)} sha256 {e(sha)}">{e(sha[:8])}</code>')
    return f'<td class="spec" data-sort="{e(_short_name(value) if value else sha or "")}">{"<br>".join(parts)}</td>'


def _figures_html(run: RunInfo, prev: RunInfo | None) -> str:
    """``label: value unit`` per figure; with ``prev``, each figure's change since that run, compactly."""
    e = html.escape
    items = []
    for f in run.figures:
        text = format_number(f.value, f.unit, f.key)
        shown = _clip(text, 40)
        tip = "; ".join(t for t in (text if shown != text else "", f.note) if t)   # the full value, its interval
        value = f'<b title="{e(tip)}">{e(shown)}</b>' if tip else f"<b>{e(text)}</b>"
        unit = e(unit_suffix(f.unit)) if text != "-" and not isinstance(f.value, (bool, str)) else ""
        delta = ""
        if prev is not None and (f.key in prev.headline or any(p.key == f.key for p in prev.figures)):
            before = prev.value_of(f.key)
            d, moved = _delta(f.value, before, f.unit, f.key)
            tip = f"was {format_figure(before, f.unit, f.key)} in the previous good run ({_when(prev.start_utc)})"
            delta = f' <span class="delta{" moved" if moved else ""}" title="{e(tip)}">{e(d)}</span>'
        items.append(f'<li><span class="lbl">{e(f.label)}:</span> <span class="nowrap">{value}{unit}{delta}</span></li>')
    return f'<ul class="figs">{"".join(items)}</ul>' if items else '<span class="muted">-</span>'


def _human_html(run: RunInfo) -> str:
    """The blind A/B human verdict beside the metrics (ratings_summary.json, tclab.rating), or nothing."""
    h = run.human or {}
    share, lo, hi = (_number(h.get(k)) for k in ("preference_full", "preference_full_ci_low", "preference_full_ci_high"))
    e = html.escape
    if share is None:   # nobody rated yet, or every judgement was "same"
        n = _number(h.get("judgements"))
        return (f'<div class="vs human" title="{e(_text(h.get("sentence")) or "")}">people (blind A/B): all {n:.0f} '
                "judgements 'same', neither image preferred</div>" if n else "")
    raters = h.get("raters")
    n_raters = len(raters) if isinstance(raters, list) else _number(raters)
    interval = f" [{lo:.0%}, {hi:.0%}]" if lo is not None and hi is not None else ""
    full, cached, same = (_number(h.get(k)) for k in ("full_preferred", "cached_preferred", "same"))
    counts = (f" ({full:.0f} of {full + cached:.0f} choices" + (f", {same:.0f} same" if same else "")
              + (f"; {n_raters:.0f} rater{'s' if n_raters != 1 else ''}" if n_raters is not None else "") + ")"
              if full is not None and cached is not None else "")
    text = f"people (blind A/B) prefer full compute in {share:.0%}{interval}{counts}"
    # the verdict is on the claim "people do not see the cached images as worse" (tclab.rating)
    verdict = {"holds": "no loss seen", "does not hold": "people see a loss", "within noise": "undecided"}.get(
        _text(h.get("verdict")) or "", _text(h.get("verdict")))
    badge = f' <span class="delta{" moved" if verdict == "people see a loss" else ""}">{e(verdict)}</span>' if verdict else ""
    return f'<div class="vs human" title="{e(_text(h.get("sentence")) or "")}">{e(text)}{badge}</div>'


def _run_row(run: RunInfo, prev: RunInfo | None) -> str:
    e = html.escape
    status = _status_class(run)
    notes = f'<div class="err" title="{e(run.error)}">{e(_clip(run.error, 160))}</div>' if run.error else ""
    if run.gate_failed:   # the run finished, and a quality gate of its job failed: kept, and marked
        notes += '<div><span class="status gate">GATE FAILED</span></div>' + "".join(
            f'<div class="err" title="{e(n)}">{e(_clip(n, 160))}</div>' for n in run.gate_notes)
    elif run.gate_status == "passed":
        notes += '<div class="vs">gates passed</div>'
    notes += "".join(f'<div class="warn">{e(p)}</div>' for p in run.problems)
    started = _a(run, run.report, _when(run.start_utc), "open the report" if run.report else "open the run folder")
    if prev is not None:   # what the changes after the figures compare with
        vs = ('<div class="vs">vs ' if run.figures else '<div class="vs">last good: ') + _a(
            prev, prev.report, _when(prev.start_utc), f"previous successful run of this notebook+tag: {prev.path.name}"
        ) + "</div>"
    else:
        vs = '<div class="vs muted">first run of this notebook+tag</div>' if run.figures else ""
    links = [_a(run, run.report, "report")] if run.report else []
    links.append(_a(run, None, "folder", run.path.name))
    if (run.path / "error.txt").is_file():
        links.append(_a(run, "error.txt", "error.txt", "the full error and traceback"))
    search = " ".join(s for s in (run.path.name, run.model, run.images, run.model_sha256, run.images_sha256,
                                  run.error) if s)
    duration = "" if run.duration_s is None else f"{run.duration_s:.3f}"
    return (f'<tr data-status="{status}" data-notebook="{e(run.notebook)}" data-search="{e(search)}">'
            f'<td class="nowrap" data-sort="{e(run.start_utc)}">{started}</td>'
            f'<td>{e(run.notebook)}</td><td class="tag"><code>{e(run.tag)}</code></td>'
            f'{_spec_cell(run.model, run.model_sha256, "model weights")}'
            f'{_spec_cell(run.images, run.images_sha256, "image manifest")}'
            f'<td data-sort="{status}"><span class="status {status}">{e(run.status)}</span>{notes}</td>'
            f'<td class="num" data-sort="{duration}">{e(format_duration(run.duration_s))}</td>'
            f'<td>{_figures_html(run, prev)}{_human_html(run)}{vs}</td>'
            f'<td class="links nowrap">{"".join(links)}</td></tr>')


def _job_cell(run: RunInfo | None, figures: bool = False) -> str:
    e = html.escape
    if run is None:
        return '<td data-sort=""><span class="muted">none yet</span></td>'
    badge = "" if run.status == "ok" else f' <span class="status {_status_class(run)}">{e(run.status)}</span>'
    figs = _figures_html(run, None) if figures and run.figures else ""
    return f'<td data-sort="{e(run.start_utc)}">{_a(run, run.report, _when(run.start_utc))}{badge}{figs}</td>'


def _good(run: RunInfo) -> bool:
    """A good run to compare with: it finished, and no quality gate of its job refused it."""
    return run.status == "ok" and not run.gate_failed


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_index(runs: list[RunInfo], now: _dt.datetime | None = None) -> str:
    """The HTML of index.html for ``runs`` (newest first, as :func:`list_runs` gives them)."""
    e = html.escape
    now = now or _utc_now()
    rows = []
    for i, run in enumerate(runs):
        prev = next((r for r in runs[i + 1:] if r.group == run.group and _good(r)), None)
        rows.append(_run_row(run, prev))

    groups: dict[tuple[str, str], list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    group_rows = "".join(
        f"<tr><td>{e(nb)}</td><td><code>{e(tag)}</code></td><td>{len(rs)}</td>"
        f"<td>{sum(r.status == 'ok' for r in rs)}</td><td>{sum(r.status == 'failed' for r in rs)}</td>"
        f"{_job_cell(rs[0])}{_job_cell(next((r for r in rs if _good(r)), None), figures=True)}</tr>"
        for (nb, tag), rs in sorted(groups.items()))

    tally = ", ".join(f"{n} {s}" for s in RUN_STATUSES if (n := sum(_status_class(r) == s for r in runs)))
    notebooks = sorted({r.notebook for r in runs})
    lead = (f"{_plural(len(runs), 'run')} of {len(notebooks)} {'notebook or command' if len(notebooks) == 1 else 'notebooks or commands'} in this folder, newest first"
            f"{f' ({tally})' if tally else ''}. Rewritten after every run; this copy {_when(_iso(now))} UTC.")
    status_options = "".join(f'<option value="{s}">{s}</option>' for s in RUN_STATUSES
                             if any(_status_class(r) == s for r in runs))
    notebook_options = "".join(f'<option value="{e(n)}">{e(n)}</option>' for n in notebooks)
    code = "first 8 hex digits of the SHA-256 of"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tclab runs</title><style>{_INDEX_CSS}</style></head>
<body>
<h1>tclab runs</h1>
<p class="lead">{e(lead)}</p>
<div id="filters" class="filters" hidden>
<label>Filter <input type="search" id="f-text" placeholder="any text: notebook, tag, model, error..." autocomplete="off"></label>
<label>status <select id="f-status"><option value="">all</option>{status_options}</select></label>
<label>notebook <select id="f-notebook"><option value="">all</option>{notebook_options}</select></label>
<span id="f-count" aria-live="polite"></span>
</div>
<div class="scroll">
<table id="runs" class="sortable">
<thead><tr><th aria-sort="descending" title="when the run started; the link opens its report">started (UTC)</th>
<th>notebook</th><th title="the run's tag; a scheduled job's runs carry the job's name">tag</th>
<th title="the model parameter; the code is the {code} the weights">model</th>
<th title="the images parameter; the code is the {code} the image-set manifest">image set</th>
<th>status</th><th>duration</th>
<th class="nosort" title="from summary.json; the small mark is the change since the previous successful run of the same notebook and tag">headline figures</th>
<th class="nosort">links</th></tr></thead>
<tbody>
{''.join(rows) or '<tr><td colspan="9" class="muted">no runs yet</td></tr>'}
</tbody>
</table>
</div>
<p class="note">This page is rendered from the run table <code>runs.sqlite</code> beside it (one row per run, one per
variant of a sweep), which <code>tclab runs list|show|compare</code> and <code>tclab.runs.table()</code> query.
Headline figures come from each run's summary.json. The small mark after a figure is its change
since the previous successful run of the same notebook and tag, named under the figures (hover for the old value; a
change there means the code, data or settings changed the answer). Model and image-set codes are the {code} the weights and of the
image-set manifest: the same name with another code is another model or image set.</p>
<h2>By notebook and tag</h2>
<p class="note">One row per question asked over time: a scheduled job (<code>tclab schedule</code>) runs under its
name as tag, so each job is one row.</p>
<div class="scroll">
<table id="jobs" class="sortable">
<thead><tr><th>notebook</th><th>tag</th><th>runs</th><th>ok</th><th>failed</th><th>latest</th>
<th>last good</th></tr></thead>
<tbody>
{group_rows or '<tr><td colspan="7" class="muted">no runs yet</td></tr>'}
</tbody>
</table>
</div>
<script>{_INDEX_JS}</script>
</body></html>
"""
