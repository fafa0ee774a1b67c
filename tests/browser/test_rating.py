"""The blind A/B rating in a real browser (issue #21, part 3): the kernel-free page ``rating/rate.html``
opened from ``file://`` in headless Chromium, and the ``tclab.rate`` widget in a real JupyterLab.

The page: two raters enter their names and click a choice (some with a score and a note) on every
pair; the page must keep each rater's progress over a reload, show nothing that tells the sides
apart, and export JSON and CSV that parse back to exactly the clicks made. Both exports are imported
with ``tclab.rating.import_ratings`` and the verdict and the report's section are checked against
the clicks mapped through the key. The widget: its buttons are clicked in JupyterLab and every click
must be in the rater's ``ratings/widget_*.jsonl`` within seconds. Screenshots (``rating_page.png``,
``rating_widget.png``, ``rating_report.png``) go to ``$TCLAB_SCREENSHOTS`` (else the test's tmp dir).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from pathlib import Path

import nbformat
import pytest

from tclab import rating

from test_jupyterlab import _KERNEL_READY_JS, KERNEL_IDLE_S, REPO, _run_all_cells, jupyterlab_server  # tests/browser/
from tests.test_rating import executed_run

pytestmark = pytest.mark.browser

#: Each rater's clicks, pair by pair (p01..p04): choice, score ("" = none), note.
CLICKS = {
    "Ann": [("left", "4", "the disc edge is ragged"), ("same", "", ""), ("right", "2", ""), ("left", "", "")],
    "Bob": [("left", "5", ""), ("right", "", 'blurred, "smeared"'), ("right", "", ""), ("same", "1", "")],
}
REACT_S = 20


def _downloads(page, click) -> list:
    """Click, then wait for the page's two downloads (JSON and CSV); returns them."""
    got = []

    def note(download):
        got.append(download)

    page.on("download", note)
    click()
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    page.remove_listener("download", note)
    assert len(got) == 2, f"export gave {len(got)} download(s), not a JSON and a CSV: {[d.suggested_filename for d in got]}"
    return got


def _rate_all(page, rater: str, screenshot: Path | None = None) -> None:
    page.fill("#tclab-rater", rater)
    from playwright.sync_api import expect

    expect(page.locator("#tclab-counter")).to_contain_text("rated 0 of 4")
    for k, (choice, score, note) in enumerate(CLICKS[rater]):
        expect(page.locator("#tclab-counter")).to_contain_text(f"pair {k + 1} of 4")
        if score:
            page.check(f'input.tclab-score[value="{score}"]')
        if note:
            page.fill("#tclab-note", note)
        page.click(f'button.tclab-choice[data-choice="{choice}"]')
        expect(page.locator(f'button.tclab-choice[data-choice="{choice}"]')).to_have_class(re.compile("chosen"))
        if screenshot is not None and k == 1:
            page.screenshot(path=str(screenshot))
        if k < 3:
            page.click("#tclab-next")
    expect(page.locator("#tclab-counter")).to_contain_text("rated 4 of 4")


def _parse(downloads, tmp: Path) -> tuple[dict, list[dict], dict[str, Path]]:
    """The page's two exports saved under ``tmp``: (the JSON, the CSV's rows, {suffix: file})."""
    by = {}
    for d in downloads:
        p = tmp / d.suggested_filename
        d.save_as(p)
        by[p.suffix] = p
    assert set(by) == {".json", ".csv"}, list(by)
    data = json.loads(by[".json"].read_text())
    rows = list(csv.DictReader(io.StringIO(by[".csv"].read_text())))
    return data, rows, by


def test_the_rating_page_records_clicks_exports_and_imports(page, tmp_path, screenshots_dir):
    from playwright.sync_api import expect

    run = executed_run(tmp_path)   # a run folder with a rating set of 4 pairs and its report.html
    rs = rating.read_rating_set(run)
    page.goto((run / "rating" / "rate.html").as_uri())
    page.wait_for_load_state("load")
    assert page.eval_on_selector_all("img", "els => els.every(i => i.complete && i.naturalWidth > 0)")
    expect(page.locator("button.tclab-choice").first).to_be_disabled()   # no name, no judgement
    text = page.inner_text("body").lower()
    assert "full" not in text and "cached" not in text   # nothing on the page tells the sides apart

    _rate_all(page, "Ann", screenshots_dir / "rating_page.png")
    # progress survives a reload (localStorage), per rater
    page.reload()
    expect(page.locator("#tclab-counter")).to_contain_text("rated 4 of 4")
    assert page.input_value("#tclab-rater") == "Ann"
    ann = _parse(_downloads(page, lambda: page.click("#tclab-export")), tmp_path)
    _rate_all(page, "Bob")
    bob = _parse(_downloads(page, lambda: page.click("#tclab-export")), tmp_path)
    assert not page.console_errors, page.console_errors

    for rater, (data, rows, files) in (("Ann", ann), ("Bob", bob)):
        assert data["format"] == rating.EXPORT_FORMAT and data["set_id"] == rs.set_id and data["run"] == run.name
        assert data["rater"] == rater and data["pairs_in_set"] == 4
        got = [(r["pair"], r["choice"], "" if r["score"] is None else str(r["score"]), r["note"]) for r in data["ratings"]]
        assert got == [(f"p0{k + 1}", c, s, n) for k, (c, s, n) in enumerate(CLICKS[rater])]
        assert all(r["rater"] == rater and r["source"] == "page" for r in data["ratings"])
        assert all(rating._parse_time(r["time_utc"]) for r in data["ratings"])
        assert [(r["set_id"], r["run"], r["pair"], r["choice"], r["score"], r["note"]) for r in rows] == [
            (rs.set_id, run.name, p, c, s, n) for p, c, s, n in got]
        assert files[".json"].name.startswith(f"ratings_{run.name}_{rater}_")

    # into the run: Ann's JSON, Bob's CSV
    rating.import_ratings(run, ann[2][".json"])
    rating.import_ratings(run, bob[2][".csv"])
    key = rating.read_key(run)
    expect_out = {"full": 0, "same": 0, "cached": 0}
    for clicks in CLICKS.values():
        for k, (c, _, _) in enumerate(clicks):
            expect_out["same" if c == "same" else ("full" if key[f"p0{k + 1}"]["full"] == c else "cached")] += 1
    v = rating.read_verdict(run)
    assert (v.full_preferred, v.same, v.cached_preferred) == (expect_out["full"], expect_out["same"], expect_out["cached"])
    assert v.raters == ["Ann", "Bob"] and v.pairs_multi_rated == 4 and v.percent_agreement is not None

    page.goto((run / "report.html").as_uri())
    section = page.locator("#human-rating")
    expect(section).to_contain_text("Human rating (blind A/B)")
    expect(section).to_contain_text(v.sentence)
    assert page.eval_on_selector_all("#human-rating img", "els => els.every(i => i.complete && i.naturalWidth > 0)")
    section.screenshot(path=str(screenshots_dir / "rating_report.png"))
    assert not page.console_errors, page.console_errors


def _rating_notebook(folder: Path, run: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Rate the pairs"),
                nbformat.v4.new_code_cell(f"import tclab\n\ntclab.rate({str(run)!r})")]
    folder.mkdir(parents=True)
    nbformat.write(nb, folder / "rate.ipynb")
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _wait_lines(path: Path, n: int, what: str) -> list[dict]:
    deadline = time.monotonic() + REACT_S
    while len(_lines(path)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} has {len(_lines(path))} record(s), not {n}, {REACT_S} s after {what}")
        time.sleep(0.2)
    return _lines(path)


def test_the_rating_widget_saves_each_click_in_jupyterlab(page, tmp_path, screenshots_dir, monkeypatch):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    run = executed_run(tmp_path / "runs")
    # the kernel imports this checkout's tclab (an installed one elsewhere may lack tclab.rating)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebooks = _rating_notebook(tmp_path / "rate_notebooks", run)
    saved = rating.widget_ratings_path(run, "Dana")
    with jupyterlab_server(tmp_path / "lab", notebooks) as lab:
        try:
            page.goto(lab.lab_url(f"{notebooks.name}/rate.ipynb"), wait_until="domcontentloaded", timeout=60_000)
            expect(page.locator(".jp-NotebookPanel")).to_be_visible(timeout=KERNEL_IDLE_S * 1000)
            _run_all_cells(page)
            widget = page.locator(".tclab-rating-widget")
            expect(widget).to_be_visible(timeout=180_000)
            page.wait_for_function(_KERNEL_READY_JS, timeout=KERNEL_IDLE_S * 1000)
            left = widget.locator(".tclab-rate-left")
            expect(left).to_be_disabled()
            rater = widget.locator(".tclab-rate-rater input")
            rater.fill("Dana")
            rater.press("Enter")   # continuous_update=False: the value goes to the kernel on Enter
            expect(left).to_be_enabled(timeout=REACT_S * 1000)
            left.click()
            first = _wait_lines(saved, 1, "clicking 'left better'")
            widget.locator(".tclab-rate-next").click()
            expect(widget.locator(".tclab-rate-counter")).to_contain_text("pair 2 of 4", timeout=REACT_S * 1000)
            widget.locator(".tclab-rate-score button", has_text=re.compile(r"^4$")).click()
            widget.locator(".tclab-rate-right").click()
            second = _wait_lines(saved, 2, "a score of 4 and 'right better'")
            expect(widget.locator(".tclab-rate-counter")).to_contain_text("rated 2 of 4", timeout=REACT_S * 1000)
            widget.locator(".tclab-rate-same").scroll_into_view_if_needed()
            widget.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(300)
            page.screenshot(path=str(screenshots_dir / "rating_widget.png"))
            widget.locator(".tclab-rate-finish").click()
            expect(widget.locator(".tclab-rate-status")).to_contain_text("Verdict", timeout=REACT_S * 1000)
            assert not [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "Traceback" in t]
        except (AssertionError, PlaywrightError) as e:
            page.screenshot(path=str(screenshots_dir / "rating_widget_failure.png"))
            pytest.fail(f"{e}\n\nJupyterLab log tail:\n{lab.log_tail()}", pytrace=False)
    assert [(r["pair"], r["choice"], r["score"], r["rater"], r["source"]) for r in first] == [
        ("p01", "left", None, "Dana", "widget")]
    assert [(r["pair"], r["choice"], r["score"]) for r in second[1:]] == [("p02", "right", 4)]
    v = rating.read_verdict(run)
    assert v is not None and v.judgements == 2 and v.raters == ["Dana"]
    assert 'id="human-rating"' in (run / "report.html").read_text()
