"""``reports/index.html`` (``tclab.runs.write_index``) read as a team would read it.

Run folders are built by hand (provenance.json + summary.json, no kernel), once per module:

* two good runs and a failed one of job ``nightly`` (05_inhouse_report), with ``report.key_numbers``
  and ``report.index_keys``, a long model path and image-set hashes;
* an older run that has only a ``headline`` (no key numbers);
* a run whose folder name, tag and parameters hold ``<``, ``&``, quotes, ``#``, ``?`` and non-ASCII;
* a run whose summary.json is not JSON, and one whose provenance.json is not JSON.

The page is parsed with ``html.parser`` (cells, tooltips, hrefs) and, where Playwright and Chromium
are installed, driven in headless Chromium (filter, sort, width at 1280 px, console errors).
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

from tclab import runs

MODEL = "/data/models/facebook/DiT-XL-2-256"
MODEL_SHA = "ab12cd34" + "e" * 56
IMAGES = "/srv/inhouse/images/set_a/"
IMAGES_SHA = "9f8e7d6c" + "0" * 56
HOSTILE = "20260112T100000Z_odd_<b>&\"q'é #?x"
HOSTILE_TAG = "<script>alert(1)</script> & \"é\""


def key_numbers(psnr: float, flop_ratio: float, speedup: float) -> dict:
    return {"key_numbers": [  # listed in another order than index_keys, with one the index must not show
        {"key": "speedup", "label": "speed-up", "value": speedup, "unit": "x"},
        {"key": "points", "label": "points measured", "value": 12, "unit": ""},
        {"key": "psnr", "label": "PSNR vs full compute", "value": psnr, "unit": "dB",
         "note": f"95% CI {psnr - 1:.1f} to {psnr + 1:.1f} dB, N = 48"},
        {"key": "flop_ratio", "label": "FLOP ratio", "value": flop_ratio, "unit": ""},
    ], "index_keys": ["psnr", "flop_ratio", "speedup"]}


def make_run(reports: Path, name: str, prov: dict | str | None, summary: dict | str | None = None,
             files: tuple[str, ...] = ("report.html",)) -> Path:
    d = reports / name
    d.mkdir(parents=True)
    for what, content in (("provenance.json", prov), ("summary.json", summary)):
        if content is not None:
            (d / what).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    for f in files:
        (d / f).write_text(f"{f} of {name}", encoding="utf-8")
    return d


def prov(notebook: str, tag: str, start: str, *, status: str = "ok", duration: float | None = 30.0,
         model: str = "shapes-dit", images: str = "shapes", identity: dict | None = None, **extra) -> dict:
    return {"status": status, "notebook": f"/repo/notebooks/{notebook}.ipynb", "tag": tag, "start_utc": start,
            "duration_s": duration, "parameters": {"model": model, "images": images, "num_steps": 4},
            "identity": identity or {}, "report": "report.html", **extra}


def build_reports(reports: Path) -> SimpleNamespace:
    ident = {"model_weights_sha256": MODEL_SHA, "images_manifest_sha256": IMAGES_SHA}
    nb = "05_inhouse_report"
    first = make_run(reports, f"20260110T090000Z_{nb}_nightly",
                     prov(nb, "nightly", "2026-01-10T09:00:00.000Z", duration=185.0, model=MODEL, images=IMAGES,
                          identity=ident),
                     {"headline": {"psnr": 30.91}, "identity": ident, "report": key_numbers(30.91, 0.5, 1.9)})
    second = make_run(reports, f"20260111T090000Z_{nb}_nightly",
                      prov(nb, "nightly", "2026-01-11T09:00:00.000Z", duration=192.4, model=MODEL, images=IMAGES,
                           identity=ident),
                      {"headline": {"psnr": 31.52}, "identity": ident, "report": key_numbers(31.52, 0.4812, 2.07)})
    failed = make_run(reports, f"20260112T090000Z_{nb}_nightly_FAILED",
                      prov(nb, "nightly", "2026-01-12T09:00:00.000Z", status="failed", duration=3900.0, model=MODEL,
                           images=IMAGES, report=None, error="RuntimeError: CUDA out of memory on step 7"),
                      files=("error.txt",))
    older = make_run(reports, "20260105T080000Z_01_token_redundancy_smoke",
                     prov("01_token_redundancy", "smoke", "2026-01-05T08:00:00.000Z", duration=41.2),
                     {"headline": {"psnr_cached": 28.123456, "curve": [1, 2], "model": "shapes-dit",
                                   "few_tokens_change_a_lot": True, "fourth": 4}})
    hostile = make_run(reports, HOSTILE,
                       prov("odd <nb> & é", HOSTILE_TAG, "2026-01-12T10:00:00.000Z", model='a<b>&"c/dé',
                            images="imgs & <more>"),
                       {"headline": {"note <b>": "x & y"}})
    corrupt = make_run(reports, "20260113T090000Z_01_token_redundancy_smoke",
                       prov("01_token_redundancy", "smoke", "2026-01-13T09:00:00.000Z", duration=50.0),
                       '{"headline": {"psnr": 3', files=())
    no_prov = make_run(reports, "20260114T090000Z_03_ablation_block_selection_x", "not json at all",
                       {"headline": {"points": 3}}, files=())
    index = runs.write_index(reports)
    return SimpleNamespace(reports=reports, index=index, page=index.read_text(encoding="utf-8"), first=first,
                           second=second, failed=failed, older=older, hostile=hostile, corrupt=corrupt,
                           no_prov=no_prov)


class _Page(HTMLParser):
    """The tables of index.html as rows of cells (text, tooltips, hrefs), plus every href on the page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[dict]] = {}
        self.hrefs: list[str] = []
        self.scripts: list[str] = []
        self._table = self._row = self._cell = None
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = {"attrs": a, "cells": []}
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"attrs": a, "text": "", "titles": [], "hrefs": []}
            self._row["cells"].append(self._cell)
        if self._cell is not None:
            if "title" in a:
                self._cell["titles"].append(a["title"])
            if tag == "a":
                self._cell["hrefs"].append(a.get("href"))
            if tag in ("li", "br", "div"):
                self._cell["text"] += "\n"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        elif self._cell is not None:
            self._cell["text"] += data


COLUMNS = ["started (UTC)", "notebook", "tag", "model", "image set", "status", "duration", "headline figures",
           "links"]
FIRST = "first run of this notebook+tag"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> SimpleNamespace:
    s = build_reports(tmp_path_factory.mktemp("index") / "reports")
    parsed = _Page()
    parsed.feed(s.page)
    s.parsed = parsed
    head, *body = parsed.tables["runs"]
    s.header = [c["text"].strip() for c in head["cells"]]
    s.rows, s.order = {}, []
    for r in body:   # by run folder name, read back from the row's "folder" link
        links = r["cells"][COLUMNS.index("links")]
        folder = unquote(next(h for h in links["hrefs"] if h.endswith("/") and h.count("/") == 1)[:-1])
        s.rows[folder] = {col: cell for col, cell in zip(COLUMNS, r["cells"])} | {"_attrs": r["attrs"]}
        s.order.append(folder)
    return s


def text(cell: dict) -> str:
    return re.sub(r"[ \t]+", " ", cell["text"]).strip()


def figure_lines(cell: dict) -> list[str]:
    return [line.strip() for line in text(cell).splitlines() if line.strip()]


# ---- the runs table ----------------------------------------------------------------------------

def test_one_row_per_run_newest_first_with_the_columns_a_team_needs(site):
    assert site.header == COLUMNS
    assert len(site.rows) == 7
    starts = [site.rows[n]["started (UTC)"]["attrs"]["data-sort"] for n in site.order]
    assert starts == sorted(starts, reverse=True)
    assert site.order[0] == site.no_prov.name   # unreadable provenance: the start comes from the folder name
    assert starts[0] == "2026-01-14T09:00:00.000Z"
    assert "7 runs of 4 notebooks or commands in this folder, newest first (5 ok, 1 failed, 1 unknown)" in site.page


def test_model_and_image_set_show_short_names_full_values_and_hash_codes(site):
    row = site.rows[site.second.name]
    model, images = row["model"], row["image set"]
    assert text(model).split() == ["DiT-XL-2-256", "ab12cd34"]
    assert MODEL in model["titles"] and any(MODEL_SHA in t for t in model["titles"])
    assert text(images).split() == ["set_a", "9f8e7d6c"]
    assert IMAGES in images["titles"] and any(IMAGES_SHA in t for t in images["titles"])
    older = site.rows[site.older.name]
    assert text(older["model"]) == "shapes-dit" and text(older["image set"]) == "shapes"  # no hash: none shown
    info = next(r for r in runs.list_runs(site.reports) if r.path == site.second)
    assert (info.model, info.model_sha256, info.images, info.images_sha256) == (MODEL, MODEL_SHA, IMAGES, IMAGES_SHA)
    assert info.duration_s == 192.4 and info.group == ("05_inhouse_report", "nightly")


def test_headline_figures_follow_index_keys_in_order_with_units_and_rounding(site):
    cell = site.rows[site.second.name]["headline figures"]
    assert figure_lines(cell) == ["PSNR vs full compute: 31.5\u2009dB +0.6", "FLOP ratio: 0.48 -0.02",
                                  "speed-up: 2.07\u00d7 +0.17", "vs 2026-01-10 09:00:00"]
    assert cell["hrefs"] == [f"{site.first.name}/report.html"]   # the run the changes compare with
    assert [f.key for f in next(r for r in runs.list_runs(site.reports) if r.path == site.second).figures] == \
        ["psnr", "flop_ratio", "speedup"]
    titles = site.rows[site.second.name]["headline figures"]["titles"]
    assert "was 30.9\u2009dB in the previous good run (2026-01-10 09:00:00)" in titles
    assert "95% CI 30.5 to 32.5 dB, N = 48" in titles            # a figure's interval, on hover
    # the first run of the job has nothing to compare with
    assert figure_lines(site.rows[site.first.name]["headline figures"]) == [
        "PSNR vs full compute: 30.9\u2009dB", "FLOP ratio: 0.50", "speed-up: 1.90\u00d7", FIRST]


def test_older_runs_show_their_first_three_scalar_headline_entries(site):
    lines = figure_lines(site.rows[site.older.name]["headline figures"])
    assert lines == ["psnr_cached: 28.1", "model: shapes-dit", "few_tokens_change_a_lot: yes", FIRST]  # no list


def test_a_failed_run_shows_its_status_error_and_error_file(site):
    row = site.rows[site.failed.name]
    assert row["status"]["attrs"]["data-sort"] == "failed" and row["_attrs"]["data-status"] == "failed"
    assert text(row["status"]).splitlines() == ["failed", "RuntimeError: CUDA out of memory on step 7"]
    assert 'class="status failed">failed<' in site.page
    assert row["links"]["hrefs"] == [f"{site.failed.name}/", f"{site.failed.name}/error.txt"]  # no report
    assert text(row["duration"]) == "1 h 05 min"
    # no figures, but the job's last good run is named
    assert figure_lines(row["headline figures"]) == ["-", "last good: 2026-01-11 09:00:00"]
    assert row["headline figures"]["hrefs"] == [f"{site.second.name}/report.html"]


def test_corrupt_files_do_not_break_the_page(site):
    row = site.rows[site.corrupt.name]
    assert text(row["status"]).splitlines() == ["ok", "summary.json is not valid JSON"]
    assert figure_lines(row["headline figures"]) == ["-", "last good: 2026-01-05 08:00:00"]
    assert text(row["duration"]) == "50 s"
    row = site.rows[site.no_prov.name]
    assert text(row["status"]).splitlines() == ["unknown", "provenance.json is not valid JSON"]
    assert figure_lines(row["headline figures"]) == ["points: 3", FIRST] and text(row["notebook"]) == "?"
    assert site.page.rstrip().endswith("</html>")


def test_odd_characters_are_escaped_everywhere(site):
    row = site.rows[HOSTILE]
    assert text(row["tag"]) == HOSTILE_TAG and text(row["notebook"]) == "odd <nb> & é"
    assert text(row["model"]) == "dé" and 'a<b>&"c/dé' in row["model"]["titles"]
    assert text(row["image set"]) == "imgs & <more>"
    assert figure_lines(row["headline figures"]) == ["note <b>: x & y", FIRST]
    assert "<script>alert" not in site.page and "&lt;script&gt;alert(1)&lt;/script&gt;" in site.page
    assert HOSTILE not in site.page.replace("&amp;", "&")   # never raw: escaped in text, quoted in hrefs
    assert len(site.parsed.scripts) == 1   # the page's own script only


def test_every_link_is_relative_and_resolves_to_an_existing_file(site):
    hrefs = site.parsed.hrefs
    assert len(hrefs) > 20
    base = site.index.parent.resolve()
    for href in hrefs:
        parts = urlsplit(href)
        assert not parts.scheme and not parts.netloc and not href.startswith("/") and ".." not in href, href
        target = (base / unquote(parts.path)).resolve()
        assert target.exists(), href
        assert target == base or base in target.parents, href
    assert f"{runs._href(runs.read_run(site.hostile))}report.html" in hrefs
    assert "%3C" in runs._href(runs.read_run(site.hostile))   # '<' in a folder name is URL-quoted


@pytest.mark.parametrize("seconds, shown", [
    (None, "-"), (0.42, "0.4 s"), (4.24, "4.2 s"), (41.2, "41 s"), (59.6, "1 min 00 s"), (192.4, "3 min 12 s"),
    (3599.4, "59 min 59 s"), (3900, "1 h 05 min"), (90061, "25 h 01 min"), (float("nan"), "-"), (-1, "-")])
def test_durations_read_like_a_person_wrote_them(seconds, shown):
    assert runs.format_duration(seconds) == shown


@pytest.mark.parametrize("value, unit, key, shown", [
    (31.5234, "dB", "psnr", "31.5\u2009dB"), (0.4812, "", "flop_ratio", "0.48"), (2.0711, "x", "speedup", "2.07\u00d7"),
    (0.123456, "", "lpips", "0.123"), (12345.6, "", "n", "12346"), (1.5e-5, "", "eps", "1.5e-05"),
    (7, "", "points", "7"), (True, "", "ok", "yes"), (None, "dB", "psnr", "-"), ("tprr n=4", "", "best", "tprr n=4"),
    (float("nan"), "dB", "psnr", "-"), (0.1517, "%", "share", "15.2\u2009%")])
def test_figures_are_rounded_for_reading(value, unit, key, shown):
    assert runs.format_figure(value, unit, key) == shown


def test_the_script_is_inline_and_reaches_nothing_outside(site):
    (script,) = site.parsed.scripts
    assert "filter" in script and "aria-sort" in script
    assert not re.search(r"https?:|//[a-z]|\bimport\b|fetch\(|XMLHttpRequest", script)
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|<img\b|https?://", site.page)
    # without JavaScript the (useless) filter controls stay hidden
    assert '<div id="filters" class="filters" hidden>' in site.page


# ---- the per-job table --------------------------------------------------------------------------

def test_the_job_table_has_one_row_per_notebook_and_tag_with_latest_and_last_good(site):
    body = site.parsed.tables["jobs"][1:]
    rows = {(text(r["cells"][0]), text(r["cells"][1])): r["cells"] for r in body}
    assert len(rows) == 4
    cells = rows[("05_inhouse_report", "nightly")]
    assert [text(c) for c in cells[2:5]] == ["3", "2", "1"]
    assert cells[5]["hrefs"] == [f"{site.failed.name}/"] and "failed" in text(cells[5])
    assert cells[6]["hrefs"] == [f"{site.second.name}/report.html"]
    assert "PSNR vs full compute: 31.5\u2009dB" in text(cells[6])
    assert [text(c) for c in rows[("01_token_redundancy", "smoke")][2:5]] == ["2", "2", "0"]


def test_an_empty_reports_folder_says_so(tmp_path):
    page = runs.write_index(tmp_path / "reports").read_text()
    assert "0 runs of 0 notebooks" in page and "no runs yet" in page


# ---- in a browser --------------------------------------------------------------------------------

def test_the_page_filters_sorts_and_fits_1280px_in_a_browser(site, page, tmp_path):
    visible = "document.querySelectorAll('#runs tbody tr:not([hidden])').length"
    column = ("i => Array.from(document.querySelectorAll('#runs tbody tr:not([hidden])'))"
              ".map(r => r.cells[i].getAttribute('data-sort'))")
    problems = page.console_errors
    page.goto(site.index.resolve().as_uri())
    assert page.is_visible("#f-text") and page.evaluate(visible) == 7
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)

    page.fill("#f-text", "redundancy")             # matches the notebook column
    assert page.evaluate(visible) == 2 and page.inner_text("#f-count") == "showing 2 of 7 runs"
    page.fill("#f-text", "ab12cd34")               # a model hash code (the failed run has none)
    assert page.evaluate(visible) == 2
    page.fill("#f-text", "cuda out of memory")     # the error line, case-insensitive
    assert page.evaluate(visible) == 1
    page.fill("#f-text", "")
    page.select_option("#f-status", "failed")
    assert page.evaluate(visible) == 1
    page.select_option("#f-status", "")
    page.select_option("#f-notebook", "05_inhouse_report")
    assert page.evaluate(visible) == 3
    page.select_option("#f-notebook", "")
    assert page.evaluate(visible) == 7

    started = COLUMNS.index("started (UTC)")
    before = page.evaluate(column, started)
    assert before == sorted(before, reverse=True)
    page.click("#runs th:has-text('started')")       # newest first -> oldest first
    assert page.evaluate(column, started) == sorted(before)
    page.click("#runs th:has-text('duration')")      # numbers sort as numbers, not as text
    durations = page.evaluate(column, COLUMNS.index("duration"))
    numbers = [float(d) for d in durations if d]
    assert numbers == sorted(numbers) and numbers[-1] == 3900.0 and durations[-1] == ""  # unknown last
    page.click("#runs th:has-text('duration')")
    assert [float(d) for d in page.evaluate(column, COLUMNS.index("duration")) if d] == sorted(numbers)[::-1]
    page.click("#jobs th:has-text('runs')")
    job_runs = page.evaluate("Array.from(document.querySelectorAll('#jobs tbody tr')).map(r => r.cells[2].textContent)")
    assert [int(n) for n in job_runs] == sorted(int(n) for n in job_runs)
    assert problems == []


def test_the_page_reads_without_javascript(site, browser):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(site.index.resolve().as_uri())
        assert not page.is_visible("#filters")
        assert page.locator("#runs tbody tr").count() == 7
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    finally:
        context.close()


def test_key_numbers_without_index_keys_show_the_first_key_numbers(tmp_path):
    """An empty index_keys (ReportSummary's default) falls back to the first key numbers, not the headline."""
    d = tmp_path / "20260101T000000Z_99_x_t"
    d.mkdir()
    (d / "provenance.json").write_text('{"status": "ok", "notebook": "99_x.ipynb", "tag": "t"}')
    (d / "summary.json").write_text('{"headline": {"raw": 1}, "report": {"version": 1, "index_keys": [], '
                                    '"key_numbers": [{"key": "psnr", "label": "PSNR", "value": 30.0, "unit": "dB"}]}}')
    (run,) = runs.list_runs(tmp_path)
    assert [(f.key, f.label) for f in run.figures] == [("psnr", "PSNR")]
