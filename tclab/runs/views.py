"""The run table as text for a terminal: ``tclab runs list``, ``tclab runs show``, ``tclab runs compare``.

Each view takes rows of :func:`tclab.runs.rows` (plain dicts) and returns the text to print; the
command line only prints it. Figures are rounded as on the reports (``tclab.report.format_value``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from ..report import format_duration, format_value
from .index import _delta   # the index's rule for a figure's change: '+0.3', '=', '\u2248' (too small to show)

#: Headline figures a listed run shows (as on index.html).
LIST_FIGURES = 3


def _short(value: Any, n: int = 24) -> str:
    """A model or image-set spec: the last path component, at most ``n`` characters."""
    if value is None or value == "":
        return "-"
    parts = [p for p in re.split(r"[\\/]+", str(value)) if p]
    text = parts[-1] if parts else str(value)
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _spec(value: Any, sha: Any) -> str:
    return f"{_short(value, 40)} ({str(sha)[:8]})" if sha else _short(value, 40)


def _figure_text(f: Mapping[str, Any]) -> str:
    return f"{f.get('label') or f.get('key')} {format_value(f.get('value'), f.get('unit') or '', f.get('key') or '')}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def list_text(rows: Sequence[Mapping[str, Any]], where: str) -> str:
    """One line per run, newest first: start, notebook or command, tag, status, model, images, duration, figures."""
    if not rows:
        return f"no runs match in {where}"
    body = [[(r["start_utc"] or "?").replace("T", " ")[:19], r["notebook"], r["tag"],
             r["status"] + (" GATE FAILED" if r["gate_status"] == "failed" else "") + (" !" if r["problems"] else ""),
             _short(r["model"]), _short(r["images"]),
             format_duration(r["duration_s"]),
             "; ".join(_figure_text(f) for f in r["figures"][:LIST_FIGURES]) or "-"] for r in rows]
    names = "\n".join(f"  {i + 1:>3}. {r['run']}" for i, r in enumerate(rows))
    return (_table(["started (UTC)", "notebook", "tag", "status", "model", "images", "duration", "headline"], body)
            + f"\n\n{len(rows)} run(s) in {where}; their folders (give one, or a unique part of it, to "
              f"`tclab runs show` / `compare`):\n{names}")


def show_text(r: Mapping[str, Any], where: str) -> str:
    """Everything the table holds about one run."""
    lines = [f"{r['run']}  ({where})",
             f"  {'notebook' if r['kind'] == 'notebook' else 'command'}: {r['notebook']}   tag: {r['tag']}   "
             f"status: {r['status']}",
             f"  started {r['start_utc'] or '?'}, took {format_duration(r['duration_s'])}"
             + (f"; ran on {r['hostname']}" if r["hostname"] else "")
             + (f", tclab {r['tclab_version']}" if r["tclab_version"] else "")
             + (f", commit {r['git_commit'][:10]}" if r["git_commit"] else ""),
             f"  model:  {_spec(r['model'], r['model_sha256'])}", f"  images: {_spec(r['images'], r['images_sha256'])}"]
    if r["error"]:
        lines.append(f"  error: {r['error']}")
    if r["gate_status"]:
        gates = (r["gates"] or {}).get("gates") or []
        lines.append(f"  quality gates of job {(r['gates'] or {}).get('job')!r}: "
                     f"{'GATE FAILED' if r['gate_status'] == 'failed' else r['gate_status']}")
        lines += [f"    {'ok  ' if g.get('passed') else 'FAIL'} {g.get('name')}: {g.get('note')}"
                  for g in gates if isinstance(g, dict)]
    if r["human_verdict"]:
        lines.append(f"  people (blind A/B): {r['human_verdict'].get('sentence')}")
    for p in r["problems"]:
        lines.append(f"  could not read: {p}")
    if r["summary_error"]:
        lines.append(f"  sweep summary not read: {r['summary_error']}")
    if r["figures"]:
        lines.append("headline figures:")
        lines += [f"  {_figure_text(f)}" for f in r["figures"]]
    rest = {k: v for k, v in r["headline"].items() if k not in {f.get("key") for f in r["figures"]}}
    if rest:
        lines.append("other headline values:")
        lines += [f"  {k}: {format_value(v, '', k)}" for k, v in rest.items()]
    if r["parameters"]:
        lines.append("parameters:")
        lines += [f"  {k}: {json.dumps(v, default=str)}" for k, v in r["parameters"].items()]
    if r["variants"]:
        lines.append(f"variants ({len(r['variants'])}; * = the sweep's recommended point):")
        body = [[("* " if v["best_under_budget"] else "  ") + v["name"], format_value(v["flop_ratio"], "x", "ratio"),
                 format_value(v["time_ratio"], "x", "ratio"), format_value(v["psnr"], "dB", "psnr"),
                 format_value(v["class_consistency"], "", "class_consistency"), v["error"] or ""] for v in r["variants"]]
        lines.append(_indent(_table(["variant", "FLOPs", "time", "PSNR", "class-cons.", "error"], body)))
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def compare_text(a: Mapping[str, Any], b: Mapping[str, Any], every_value: bool = False) -> str:
    """Two runs side by side: what they ran on, the parameters that differ, their headline figures and B - A
    (the key figures always; the other headline values where they differ, or all with ``every_value``);
    for two sweeps, their variants matched by name."""
    head = ["", f"A: {a['run']}", f"B: {b['run']}"]
    ident = [["notebook", a["notebook"], b["notebook"]], ["tag", a["tag"], b["tag"]],
             ["status", *(r["status"] + (" GATE FAILED" if r["gate_status"] == "failed" else "") for r in (a, b))],
             ["model", _spec(a["model"], a["model_sha256"]), _spec(b["model"], b["model_sha256"])],
             ["images", _spec(a["images"], a["images_sha256"]), _spec(b["images"], b["images_sha256"])],
             ["started", a["start_utc"] or "?", b["start_utc"] or "?"],
             ["duration", format_duration(a["duration_s"]), format_duration(b["duration_s"])]]
    out = [_table(head, ident)]
    keys = list(dict.fromkeys([*a["parameters"], *b["parameters"]]))
    differ = [[k, json.dumps(a["parameters"].get(k, "(not set)"), default=str),
               json.dumps(b["parameters"].get(k, "(not set)"), default=str)]
              for k in keys if a["parameters"].get(k) != b["parameters"].get(k)]
    out.append("parameters that differ:\n" + (_indent(_table(["parameter", "A", "B"], differ)) if differ
                                             else "  none: same parameters"))
    labels = {f.get("key"): f for f in [*b["figures"], *a["figures"]]}   # A's label and unit win
    fig_keys = list(dict.fromkeys([f.get("key") for f in [*a["figures"], *b["figures"]]]
                                  + [k for k in [*a["headline"], *b["headline"]]]))
    body, same = [], 0
    key_figures = {f.get("key") for f in [*a["figures"], *b["figures"]]}
    for k in fig_keys:
        f = labels.get(k, {"key": k, "label": k, "unit": ""})
        va = next((x.get("value") for x in a["figures"] if x.get("key") == k), a["headline"].get(k))
        vb = next((x.get("value") for x in b["figures"] if x.get("key") == k), b["headline"].get(k))
        if va is None and vb is None:
            continue
        unit = f.get("unit") or ""
        delta = _delta(vb, va, unit, k)[0] if va is not None and vb is not None else "(one run only)"
        if delta == "=" and k not in key_figures and not every_value:
            same += 1
            continue
        body.append([f.get("label") or k, format_value(va, unit, k), format_value(vb, unit, k), delta])
    out.append("headline figures (the key figures, then the other values that differ):\n"
               + (_indent(_table(["figure", "A", "B", "B - A"], body)) if body else "  none in either run")
               + (f"\n  {same} other value(s) are equal in both (--all lists them)" if same else ""))
    if a["variants"] or b["variants"]:
        va = {v["name"]: v for v in a["variants"]}
        vb = {v["name"]: v for v in b["variants"]}
        names = list(dict.fromkeys([*va, *vb]))
        rows = [[n, *(format_value(v["flop_ratio"], "x", "ratio") if v else "-" for v in (va.get(n), vb.get(n))),
                 *(format_value(v["psnr"], "dB", "psnr") if v else "-" for v in (va.get(n), vb.get(n)))] for n in names]
        out.append("variants (matched by name):\n"
                   + _indent(_table(["variant", "FLOPs A", "FLOPs B", "PSNR A", "PSNR B"], rows)))
    return "\n\n".join(out)
