"""A run's ``report.html``: the answer first, then numbered figures, tables and details.

A report is read by someone who will not open the code, often as a mailed file. So it is one
self-contained HTML page (figures embedded, no script or style from the network) laid out as:

1. **Summary** (the first screen): the notebook's title (its question), one sentence per finding with
   a verdict badge (*holds*, *does not hold*, *not measured*) and the criterion behind it, a table of
   the few numbers that matter with their units, and what was measured: model and image set (names
   and hashes), date, duration, tclab version and commit.
2. **Figures**, numbered, each captioned by the sentence the notebook put before it.
3. **Tables**, numbered and captioned the same way, each in its own horizontal scroll box; column
   headers carry units (:data:`COLUMN_HEADERS`).
4. **Details**: the parameters, then the notebook step by step (its sentences, the text it printed,
   its code hidden behind a toggle). Warnings printed on stderr are collected, progress bars dropped,
   into one closed ``<details>`` at the very end: never a red box in the reader's way.

The summary is not typed into notebooks. The function that summarises a notebook's results
(``analysis.summarise_redundancy``, ``ablation.summarise_sweep``, ``inhouse.summarise_report``) puts a
:class:`ReportSummary` under ``summary["report"]`` in ``summary.json``, and this module renders it.
It is a leaf: it imports nothing from tclab, so every summariser can build its findings here.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: Version of the ``summary["report"]`` layout below; bump it when a field changes meaning.
REPORT_SUMMARY_VERSION = 2
#: Layouts :meth:`ReportSummary.from_dict` still reads (1: before the "within noise" verdict).
READABLE_REPORT_VERSIONS = (1, 2)

#: The verdicts a finding can have. ``WITHIN_NOISE``: measured, but the difference the criterion turns
#: on is not distinguishable from the measurement's noise (its interval holds both answers).
HOLDS, DOES_NOT_HOLD, WITHIN_NOISE, NOT_MEASURED = "holds", "does not hold", "within noise", "not measured"
VERDICTS = (HOLDS, DOES_NOT_HOLD, WITHIN_NOISE, NOT_MEASURED)


def verdict_of(holds: bool | None) -> str:
    """``True`` -> holds, ``False`` -> does not hold, ``None`` (undetermined, not run) -> not measured."""
    return NOT_MEASURED if holds is None else (HOLDS if holds else DOES_NOT_HOLD)


@dataclass(frozen=True)
class Finding:
    """One answer: a sentence with its numbers, the verdict, and the rule the verdict applies.

    ``group`` (optional) heads a run of findings about the same data (e.g. "SDEdit of in-house images").
    """

    text: str
    verdict: str
    criterion: str
    group: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


@dataclass(frozen=True)
class KeyNumber:
    """One of the few numbers that matter: ``value`` of ``headline[key]``, shown as ``label`` in ``unit``."""

    key: str
    label: str
    value: float | int | str | bool | None
    unit: str = ""
    note: str = ""


@dataclass
class ReportSummary:
    """What a report's first screen says; stored as ``summary["report"]`` (plain JSON, versioned).

    ``index_keys``: the two or three ``key_numbers`` that ``reports/index.html`` shows for the run.
    """

    findings: list[Finding] = field(default_factory=list)
    key_numbers: list[KeyNumber] = field(default_factory=list)
    index_keys: list[str] = field(default_factory=list)
    question: str = ""
    version: int = REPORT_SUMMARY_VERSION

    def __post_init__(self) -> None:
        keys = [k.key for k in self.key_numbers]
        missing = [k for k in self.index_keys if k not in keys]
        if missing:
            raise ValueError(f"index_keys {missing} are not among the key numbers {keys}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReportSummary":
        """The summary stored by :meth:`to_dict`; raises ValueError on a layout this version cannot read."""
        if not isinstance(d, Mapping):
            raise ValueError(f"summary['report'] must be a dict, got {type(d).__name__}")
        version = d.get("version")
        if version not in READABLE_REPORT_VERSIONS:
            raise ValueError(f"summary['report'] has layout version {version!r}; this tclab reads "
                             f"{list(READABLE_REPORT_VERSIONS)}")
        try:
            return cls(findings=[Finding(**f) for f in d.get("findings", [])],
                       key_numbers=[KeyNumber(**k) for k in d.get("key_numbers", [])],
                       index_keys=list(d.get("index_keys", [])), question=str(d.get("question", "")),
                       version=version)
        except TypeError as e:
            raise ValueError(f"summary['report'] is malformed: {e}") from e


def key_numbers_from(headline: Mapping[str, Any], spec: Sequence[tuple[str, str, str]],
                     confidence: float = 0.95) -> list[KeyNumber]:
    """``KeyNumber``s for the ``(key, label, unit)`` rows of ``spec`` whose key is in ``headline``. Where the
    headline has the number's interval (``<key>_ci_low`` / ``<key>_ci_high``, and ``<key>_n``), its note
    says it: "95% CI 24.1 to 25.8 dB, N = 24"."""
    out = []
    for key, label, unit in spec:
        if key not in headline:
            continue
        lo, hi, n = headline.get(f"{key}_ci_low"), headline.get(f"{key}_ci_high"), headline.get(f"{key}_n")
        note = ""
        if lo is not None and hi is not None:
            note = f"{confidence:.0%} CI {format_number(lo, unit, key)} to {format_value(hi, unit, key)}"
            if n is not None:
                note += f", N = {n}"
        out.append(KeyNumber(key, label, headline[key], unit, note))
    return out


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------

def _is_ratio(unit: str, key: str) -> bool:
    return unit.strip().lower() in ("x", "\u00d7", "ratio") or "ratio" in key.lower()


def format_number(value: Any, unit: str = "", key: str = "") -> str:
    """A value rounded for reading, without its unit: dB to 0.1, a share shown in ``%`` (``unit="%"``,
    value 0.152 -> ``15.2``) to 0.1, ratios (``unit="x"`` or a key naming a ratio) to two decimals
    (0.48), otherwise 3 significant digits, whole numbers without ``.0``; ``yes``/``no`` for booleans;
    ``-`` for a missing or non-finite value; text as it is."""
    import math

    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**6 else f"{value:.3g}"
    a = abs(value)
    if unit.strip().lower() == "db":
        return f"{value:.1f}"
    if _is_ratio(unit, key) and 0.01 <= a < 100:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        return f"{value:.3g}"
    if a >= 1000 or value.is_integer():
        return f"{value:.0f}"
    return f"{value:.3g}"


def unit_suffix(unit: str) -> str:
    """How a unit follows its number: ``x`` reads as a multiple (``0.48\u00d7``), others after a thin space."""
    if not unit:
        return ""
    return "\u00d7" if unit.strip().lower() in ("x", "\u00d7") else f"\u2009{unit}"


def format_value(value: Any, unit: str = "", key: str = "") -> str:
    """:func:`format_number` with its unit: ``31.5 dB``, ``15.2 %``, ``0.48\u00d7``, ``yes``, ``-``."""
    text = format_number(value, unit, key)
    if text == "-" or isinstance(value, (bool, str)):
        return text
    return text + unit_suffix(unit)


def format_duration(seconds: float | None) -> str:
    """A duration for people: ``4.2 s``, ``41 s``, ``3 min 12 s``, ``1 h 05 min``; ``-`` if unknown."""
    import math

    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


#: Headers with units for columns the notebooks' tables hold (a column not listed keeps its name).
COLUMN_HEADERS = {
    "flop_ratio": "FLOPs (\u00d7 full)", "time_ratio": "wall-clock (\u00d7 full)", "psnr": "PSNR (dB)",
    "psnr_margin": "PSNR margin (dB)", "ssim": "SSIM", "lpips": "LPIPS", "mse": "MSE",
    "class_consistency": "class-consistency (share)", "realisation": "realisation (share of saved FLOPs)",
    "flop_speedup": "FLOP speed-up (\u00d7)", "time_speedup": "wall-clock speed-up (\u00d7)",
    "fid": "FID", "kid": "KID", "kid_std": "KID std", "fid_n": "FID images", "seconds": "time (s)",
    "time_s": "time (s)", "gflops": "GFLOPs", "cache_bytes": "cache (bytes)",
}


def _headers_with_units(table_html: str) -> str:
    def rename(m: re.Match) -> str:
        name = html.unescape(m.group(2))
        return m.group(1) + html.escape(COLUMN_HEADERS.get(name, name)) + m.group(3)

    return re.sub(r"(<th[^>]*>)([^<]*)(</th>)", rename, table_html)


# ---------------------------------------------------------------------------------------------
# reading the executed notebook
# ---------------------------------------------------------------------------------------------

_PROGRESS_LINE = re.compile(r"\d+%\|.*\||\d+/\d+ \[\d|it/s\]|s/it\]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class _Item:
    kind: str            # "figure", "table", "explorer"
    body: str            # HTML
    caption: str
    number: int = 0


def _markdown_html(text: str) -> str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    return markdown2html_mistune(text)


def _plain_sentence(markdown: str) -> str:
    """The first sentence of a markdown cell as one line of plain text (a caption)."""
    paras = [p for p in re.split(r"\n\s*\n", markdown.strip()) if p.strip()]
    if paras and paras[0].lstrip().startswith("#"):   # a section heading: the sentence under it says more
        heading = re.sub(r"^#+\s*(\d+[.)]\s*)?", "", paras[0].strip())
        paras = paras[1:] or [heading]
    para = paras[0] if paras else ""
    para = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", para)   # [text](link) -> text
    para = " ".join(re.sub(r"[`*]", "", para).split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(])", para, maxsplit=1)[0]


def _text_of(output: Mapping[str, Any]) -> str:
    data = output.get("data", {}) if output.get("output_type") in ("execute_result", "display_data") else {}
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = data.get("text/plain", "")
    text = "".join(text) if isinstance(text, list) else str(text)
    return _ANSI.sub("", text)


def _strip_progress(text: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and not _PROGRESS_LINE.search(line)]
    return "\n".join(lines)


def _replace_all(text: str, replacements: Mapping[str, str]) -> str:
    for old, new in replacements.items():
        if old:
            text = text.replace(old, new)
    return text


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1d2330; --muted:#5f6b7a; --line:#d9dee5; --soft:#f5f7fa; --accent:#2f5da8; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0;
       line-height: 1.45; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5em 1.5em 4em; }
h1 { font-size: 1.55em; margin: 0.2em 0 0.3em; } h2 { font-size: 1.2em; margin-top: 2em;
     border-bottom: 2px solid var(--line); padding-bottom: 0.2em; } h3 { font-size: 1.02em; margin: 1.4em 0 0.4em; }
.meta { color: var(--muted); font-size: 0.9em; }
.status-failed { background: #fdecee; border: 1px solid #e3a0a8; padding: 0.6em 0.9em; border-radius: 6px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid var(--line); padding: 0.3em 0.65em; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.findings td.verdict { white-space: nowrap; } .findings td.criterion { color: var(--muted); font-size: 0.93em; }
.findings tr.group td { background: none; font-weight: 600; padding-top: 0.9em; border-bottom: none; }
.badge { display: inline-block; padding: 0.1em 0.55em; border-radius: 1em; font-size: 0.82em; font-weight: 700;
         letter-spacing: 0.02em; }
.badge.holds { background: #dcf2e1; color: #145c28; } .badge.does-not-hold { background: #fbe0e3; color: #8c1424; }
.badge.not-measured { background: #ececec; color: #555; }
.badge.within-noise { background: #fdf2d0; color: #6b4e00; }
dl.identity { display: flex; flex-wrap: wrap; gap: 0.15em 1.6em; margin: 0.3em 0 1.1em; font-size: 0.88em; }
dl.identity div { display: flex; gap: 0.4em; min-width: 0; } dl.identity dt { color: var(--muted); }
dl.identity dd { margin: 0; overflow-wrap: anywhere; }
table.key-numbers { margin-top: 1em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.88em; }
pre { white-space: pre-wrap; word-break: break-word; background: var(--soft); padding: 0.6em 0.8em;
      border-radius: 5px; margin: 0.4em 0; }
figure.tclab-figure { margin: 1.6em 0; } figure.tclab-figure img { max-width: 100%; height: auto; display: block; }
figcaption, .caption { color: var(--muted); font-size: 0.92em; margin: 0.4em 0; } figcaption b, .caption b { color: var(--ink); }
.tclab-table-scroll { overflow-x: auto; max-width: 100%; border: 1px solid var(--line); border-radius: 5px; }
.tclab-table-scroll table { margin: 0; } .tclab-table-scroll table.dataframe { border: none; }
.tclab-table-scroll thead th { white-space: nowrap; }
.tclab-table-scroll td, .tclab-table-scroll tbody th { max-width: 30em; overflow-wrap: break-word; }
a.anchor-link { visibility: hidden; margin-left: 0.3em; text-decoration: none; }
:hover > a.anchor-link { visibility: visible; }
.step h1, .step h2, .step h3 { font-size: 1.05em; border: none; margin: 1.4em 0 0.3em; }   /* the notebook's own headings, under Details */
.step { margin: 0.8em 0 1.2em; } .step .why { margin: 0.2em 0; } .step .ref { color: var(--muted); font-size: 0.9em; }
.code { display: none; } body.show-code .code { display: block; }
.toolbar { float: right; font-size: 0.88em; } .toolbar label { cursor: pointer; user-select: none; }
details.warnings { margin-top: 2em; color: var(--muted); } details.warnings summary { cursor: pointer; }
nav.toc { font-size: 0.9em; margin: 0.8em 0; } nav.toc a { margin-right: 1.2em; color: var(--accent); }
.prose { max-width: 60em; } .prose p { margin: 0.4em 0; }
.interactive { overflow-x: auto; }
"""

_TOGGLE_JS = """
document.getElementById('tclab-show-code').addEventListener('change', function (e) {
  document.body.classList.toggle('show-code', e.target.checked);
});
"""


def _badge(verdict: str) -> str:
    return f'<span class="badge {verdict.replace(" ", "-")}">{html.escape(verdict)}</span>'


def _findings_html(findings: Sequence[Finding]) -> str:
    if not findings:
        return '<p class="meta">This run states no findings.</p>'
    rows, group = [], None
    for f in findings:
        if f.group and f.group != group:
            rows.append(f'<tr class="group"><td colspan="3">{html.escape(f.group)}</td></tr>')
        group = f.group
        rows.append(f'<tr><td class="verdict">{_badge(f.verdict)}</td><td>{html.escape(f.text)}</td>'
                    f'<td class="criterion">{html.escape(f.criterion)}</td></tr>')
    return ('<table class="findings"><tr><th>verdict</th><th>finding</th><th>criterion</th></tr>'
            + "".join(rows) + "</table>")


def _key_numbers_html(numbers: Sequence[KeyNumber]) -> str:
    if not numbers:
        return ""
    rows = "".join(f'<tr><td>{html.escape(k.label)}</td><td class="num">{html.escape(format_value(k.value, k.unit))}'
                   f'</td><td class="meta">{html.escape(k.note)}</td></tr>' for k in numbers)
    return f'<table class="key-numbers"><tr><th>headline</th><th class="num">value</th><th></th></tr>{rows}</table>'


def _short(sha: Any, n: int = 12) -> str:
    return str(sha)[:n] if sha else "-"


def describe_devices(world: Mapping[str, Any]) -> str:
    """The devices of a run's ranks, counted: "2 x cpu (1 thread)", "8 x cuda:0 (NVIDIA H200)"."""
    devices = [str(d) for d in world.get("devices") or []]
    return ", ".join(f"{n} x {d}" if n > 1 else d for d, n in
                     {d: devices.count(d) for d in dict.fromkeys(devices)}.items()) or "-"


def _identity_rows(params: Mapping[str, Any], identity: Mapping[str, Any], prov: Mapping[str, Any],
                   run_name: str, world: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    rows = []
    model = params.get("model")
    if model is not None or identity.get("model_weights_sha256"):
        name = model if model is not None else identity.get("model") or "-"
        sha = identity.get("model_weights_sha256")
        rows.append(("model", f"{name}" + (f"  (weights {_short(sha)})" if sha else "")))
    images = params.get("images")
    if images is not None or identity.get("images_manifest_sha256") or identity.get("images_used_manifest_sha256"):
        used = identity.get("images_used")
        extra = [f"manifest {_short(identity['images_manifest_sha256'])}"] if identity.get("images_manifest_sha256") else []
        if used is not None and identity.get("images_used_manifest_sha256") and not identity.get("images_manifest_sha256"):
            extra += [f"{used} images used, their manifest {_short(identity['images_used_manifest_sha256'])}"]
        elif used is not None:
            extra += [f"{used} images used"]
        rows.append(("image set", f"{images if images is not None else '-'}"
                                  + (f"  ({', '.join(extra)})" if extra else "")))
    if params.get("scheduler") is not None or params.get("num_steps") is not None:
        parts = [str(params["scheduler"])] if params.get("scheduler") is not None else []
        parts += [f"{params['num_steps']} steps"] if params.get("num_steps") is not None else []
        parts += [f"guidance {params['guidance_scale']:g}"] if isinstance(params.get("guidance_scale"), (int, float)) else []
        rows.append(("sampling", ", ".join(parts)))
    if world and isinstance(world.get("world_size"), int):   # where the sweep ran (tclab.distributed)
        rows.append(("measured on", (f"{world['world_size']} torchrun workers ({world.get('backend')}): " if
                                     world["world_size"] > 1 else "one process: ") + describe_devices(world)))
    if identity.get("labels_sha256"):
        rows.append(("labels", f"{params.get('labels', 'auto')}  (mapping {_short(identity.get('labels_sha256'))})"))
    start = str(prov.get("start_utc") or "")
    if start:
        rows.append(("date", start.replace("T", " ")[:19] + " UTC"))
    duration = prov.get("duration_s")
    if isinstance(duration, (int, float)):
        rows.append(("duration", format_duration(duration)))
    git = prov.get("git") or {}
    version = prov.get("tclab_version") or (prov.get("environment") or {}).get("tclab_version")
    code = f"tclab {version or '?'}"
    if git.get("commit"):
        code += f", commit {git['commit'][:10]}" + (" with uncommitted changes" if git.get("dirty") else "")
    rows.append(("code", code))
    rows.append(("run", run_name + (f", tag {prov['tag']}" if prov.get("tag") else "")))
    return rows


def _image_src(output: Mapping[str, Any]) -> str | None:
    data = output.get("data", {})
    png = data.get("image/png")
    if png:
        png = "".join(png) if isinstance(png, list) else png
        base64.b64decode(png, validate=False)  # a corrupt payload raises here, not in the reader's browser
        return "data:image/png;base64," + png.replace("\n", "")
    return None


def render_report(executed: str | Path, out: str | Path, *, summary: Mapping[str, Any] | None = None,
                  provenance: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                  overridden: Iterable[str] = (), run_name: str = "", replacements: Mapping[str, str] | None = None,
                  error: str | None = None) -> Path:
    """Render the executed notebook ``executed`` as the report ``out`` (see the module docstring).

    ``summary``: the run's ``summary.json`` (its ``report`` entry feeds the first screen; its
    ``identity`` the hashes); ``provenance``: date, duration, tag, code version; ``params``: every
    parameter the run used (``overridden`` marks those set for this run); ``replacements``: text
    to replace in printed output (the runner maps its staging folder to the final one, so no
    transient path reaches the report); ``error``: the one-line failure of a failed run.
    """
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    summary = dict(summary or {})
    prov = dict(provenance or {})
    params = dict(params or {})
    overridden = set(overridden)
    replacements = dict(replacements or {})
    e = html.escape

    report_summary, summary_problem = None, None
    if "report" in summary:
        try:
            report_summary = ReportSummary.from_dict(summary["report"])
        except ValueError as exc:
            summary_problem = str(exc)

    # ---- walk the notebook: title, figures, tables, the step-by-step details ----
    cells = nb.cells
    title, intro = "", ""
    if cells and cells[0].cell_type == "markdown":
        first = cells[0].source.strip()
        head, _, rest = first.partition("\n")
        if head.startswith("# "):
            title, intro = head[2:].strip(), rest.strip()
        else:
            intro = first
        cells = cells[1:]
    title = title or Path(str(executed)).stem

    items: list[_Item] = []
    steps: list[str] = []
    warnings: list[str] = []
    why = last_caption = ""
    figure_no = table_no = 0
    for cell in cells:
        if cell.cell_type == "markdown":
            why = cell.source
            steps.append(f'<div class="step prose">{_markdown_html(cell.source)}</div>')
            continue
        if cell.cell_type != "code":
            continue
        if "parameters" in cell.metadata.get("tags", []) or "injected-parameters" in cell.metadata.get("tags", []):
            continue
        caption = _plain_sentence(why) if why else last_caption   # two figures after one sentence share it
        last_caption = caption
        parts = []
        if cell.source.strip():
            parts.append(f'<pre class="code">{e(cell.source)}</pre>')
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "stream" and output.get("name") == "stderr":
                text = _strip_progress(_replace_all(_text_of(output), replacements))
                if text:
                    warnings.append(text)
                continue
            if kind == "error":
                tb = _ANSI.sub("", "\n".join(output.get("traceback", [])))
                parts.append(f'<pre class="error">{e(_replace_all(tb, replacements))}</pre>')
                continue
            data = output.get("data", {}) if kind in ("execute_result", "display_data") else {}
            src = _image_src(output) if data else None
            rich = data.get("text/html")
            rich = "".join(rich) if isinstance(rich, list) else rich
            if src:
                figure_no += 1
                items.append(_Item("figure", f'<img src="{src}" alt="{e(caption or "figure")}">', caption, figure_no))
                parts.append(f'<p class="ref">&rarr; <a href="#figure-{figure_no}">Figure {figure_no}</a></p>')
            elif rich and "tclab-explorer" in rich:
                figure_no += 1
                items.append(_Item("explorer", rich, caption, figure_no))
                parts.append(f'<p class="ref">&rarr; <a href="#figure-{figure_no}">Figure {figure_no}</a> '
                             "(interactive)</p>")
            elif rich and "<table" in rich:
                table_no += 1
                body = _headers_with_units(_replace_all(rich, replacements))
                body = re.sub(r"<td>(NaN|None|nan|&lt;NA&gt;)</td>", "<td>-</td>", body)   # a missing value is a dash
                items.append(_Item("table", f'<div class="tclab-table-scroll">{body}</div>', caption, table_no))
                parts.append(f'<p class="ref">&rarr; <a href="#table-{table_no}">Table {table_no}</a></p>')
            else:
                text = _replace_all(_text_of(output), replacements).strip("\n")
                if kind == "stream":
                    text = _strip_progress(text) if _PROGRESS_LINE.search(text) else text
                if text.strip() and not (kind != "stream" and re.fullmatch(r"<[^>]*Figure[^>]*>|None", text.strip())):
                    parts.append(f"<pre>{e(text)}</pre>")
        if parts:
            steps.append('<div class="step">' + "".join(parts) + "</div>")
        why = ""

    # ---- first screen ----
    identity = summary.get("identity") if isinstance(summary.get("identity"), Mapping) else {}
    first = [f"<h1>{e(title)}</h1>"]
    if report_summary and report_summary.question:
        first.append(f'<p class="prose">{e(report_summary.question)}</p>')
    if error:
        first.append(f'<p class="status-failed"><b>This run failed:</b> {e(_replace_all(error, replacements))}. '
                     "Its findings below are missing or partial; the traceback is under Details.</p>")
    if report_summary is not None:
        first.append(_findings_html(report_summary.findings))
    elif summary_problem:
        first.append(f'<p class="status-failed">The summary could not be read: {e(summary_problem)}</p>')
    else:
        first.append('<p class="meta">This run wrote no findings (no <code>report</code> entry in '
                     "<code>summary.json</code>).</p>")
    id_rows = "".join(f"<div><dt>{e(k)}</dt><dd>{e(v)}</dd></div>" for k, v in
                      _identity_rows(params, identity, prov, run_name or Path(str(out)).parent.name,
                                     summary.get("world") if isinstance(summary.get("world"), Mapping) else None))
    first.insert(1, f'<dl class="identity">{id_rows}</dl>')
    if report_summary is not None and report_summary.key_numbers:
        first.append(_key_numbers_html(report_summary.key_numbers))

    figures = [i for i in items if i.kind in ("figure", "explorer")]
    tables = [i for i in items if i.kind == "table"]
    toc = ['<a href="#summary">Summary</a>']
    if figures:
        toc.append(f'<a href="#figures">Figures ({len(figures)})</a>')
    if tables:
        toc.append(f'<a href="#tables">Tables ({len(tables)})</a>')
    toc.append('<a href="#details">Details</a>')

    fig_html = "".join(
        f'<figure class="tclab-figure" id="figure-{i.number}">'
        + (i.body if i.kind == "figure" else f'<div class="interactive">{i.body}</div>')
        + f"<figcaption><b>Figure {i.number}.</b> {e(i.caption)}</figcaption></figure>" for i in figures)
    tab_html = "".join(
        f'<div class="tclab-table" id="table-{i.number}"><p class="caption"><b>Table {i.number}.</b> '
        f"{e(i.caption)}</p>{i.body}</div>" for i in tables)
    param_rows = "".join(
        f"<tr><td><code>{e(str(k))}</code></td><td><code>{e(_replace_all(repr(v), replacements))}</code></td>"
        f"<td class=\"meta\">{'set for this run' if k in overridden else 'default'}</td></tr>"
        for k, v in params.items())
    warn_html = ""
    if warnings:
        warn_html = (f'<details class="warnings"><summary>Warnings printed during the run ({len(warnings)})'
                     "</summary>" + "".join(f"<pre>{e(w)}</pre>" for w in warnings) + "</details>")

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{_CSS}</style></head>
<body><main>
<div class="toolbar"><label><input type="checkbox" id="tclab-show-code"> show code</label></div>
<section id="summary"><div id="tclab-summary">{''.join(first)}</div>
<nav class="toc">{' '.join(toc)}</nav></section>
{f'<section id="figures"><h2>Figures</h2>{fig_html}</section>' if figures else ''}
{f'<section id="tables"><h2>Tables</h2>{tab_html}</section>' if tables else ''}
<section id="details"><h2>Details</h2>
<h3>About this notebook</h3><div class="prose">{_markdown_html(intro) if intro else ''}</div>
<h3>Parameters</h3><div class="tclab-table-scroll"><table><tr><th>name</th><th>value</th><th></th></tr>{param_rows}</table></div>
<h3>Step by step</h3>{''.join(steps)}
{warn_html}
</section>
</main><script>{_TOGGLE_JS}</script></body></html>
"""
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out
