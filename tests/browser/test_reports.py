"""Every notebook's report, read in a real browser (headless Chromium) as its reader would.

One tiny run of each notebook goes into a shared temporary reports folder (02-04 before 05, so the
in-house report recommends from them, as on a team's machine). Each report.html is loaded and must
have: no console error, no broken image, nothing wider than the page outside a scroll box, the
summary section with verdict badges, every figure the run saved, and (01, 05) a kernel-free
explorer whose map changes when its slider moves. Screenshots of each first screen go to
``$TCLAB_SCREENSHOTS`` (else the test's temporary folder; see conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tclab import runs

ROOT = Path(__file__).resolve().parents[2]
TINY_ABLATION = {"num_steps": 4, "quality_samples": 3, "timing_batch": 1, "timing_repeats": 1, "fewer_steps": [2],
                 "fora_intervals": [2], "budget": 0.7, "reductions": [1.5, 2], "peers": ["fbcache"]}
TINY = {
    "01_token_redundancy": {"num_samples": 3, "num_steps": 4, "sdedit_images": 3},
    "02_ablation_predictor": {**TINY_ABLATION, "rhos": [0.5, 0.1], "scorers": ["learned-static", "random"]},
    "03_ablation_block_selection": {**TINY_ABLATION, "rhos": [0.5], "selections": ["adaptive", "global"],
                                    "full_end_blocks": []},
    "04_ablation_tprr": {**TINY_ABLATION, "tprr": [[2, 1, 0.5]], "round_robin": [2], "percentile": []},
    "05_inhouse_report": {"num_steps": 5, "num_images": 3, "timing_batch": 1, "timing_repeats": 1, "worst_k": 2},
}
WITH_EXPLORER = ("01_token_redundancy", "05_inhouse_report")


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    """{notebook: run folder} of one tiny run of each notebook, in notebook order."""
    folder = tmp_path_factory.mktemp("browser-reports")
    out = {}
    for name, params in TINY.items():
        params = {k: v for k, v in params.items() if k in runs.notebook_parameters(ROOT / "notebooks" / f"{name}.ipynb")}
        out[name] = runs.run_notebook(ROOT / "notebooks" / f"{name}.ipynb", params, reports_dir=folder, tag="browser",
                                      progress_bar=False)
    return out


#: Elements allowed to be wider than the page: they scroll inside their own box.
_OVERFLOW_JS = """() => {
  const w = window.innerWidth, bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('.tclab-table-scroll, .interactive, pre, details:not([open])')) continue;
    const r = el.getBoundingClientRect();
    if (r.width && r.right > w + 1) bad.push(el.tagName + '.' + el.className + ' right=' + Math.round(r.right));
  }
  return {scrollWidth: document.documentElement.scrollWidth, width: w, bad: bad.slice(0, 5)};
}"""


def report_problems(page, run_dir: Path) -> list[str]:
    """What a reader would trip over in this report (an empty list when none)."""
    problems = [f"console error: {e}" for e in page.console_errors]
    broken = page.eval_on_selector_all("img", "els => els.filter(i => !(i.complete && i.naturalWidth > 0))"
                                              ".map(i => i.getAttribute('src').slice(0, 60))")
    problems += [f"broken image: {b}" for b in broken]
    o = page.evaluate(_OVERFLOW_JS)
    if o["scrollWidth"] > o["width"] or o["bad"]:
        problems.append(f"wider than the page ({o['scrollWidth']} > {o['width']} px): {o['bad']}")
    if not page.query_selector("#tclab-summary h1"):
        problems.append("no summary section (#tclab-summary with the title)")
    badges = page.eval_on_selector_all("#tclab-summary .badge", "els => els.map(e => e.textContent)")
    if not badges or set(badges) - {"holds", "does not hold", "within noise", "not measured"}:
        problems.append(f"summary verdict badges missing or unknown: {badges}")
    if not page.query_selector("#tclab-summary table.key-numbers"):
        problems.append("no headline table in the summary")
    saved = json.loads((run_dir / "summary.json").read_text()).get("figures", [])
    shown = page.eval_on_selector_all("figure.tclab-figure img", "els => els.length")
    if shown < len(saved):
        problems.append(f"{len(saved)} figures saved ({saved}) but {shown} shown")
    if ".staging" in page.content():
        problems.append("a transient .staging path is in the report")
    return problems


@pytest.mark.parametrize("name", list(TINY))
def test_report_reads_well_in_a_browser(name, reports, page, screenshots_dir):
    run_dir = reports[name]
    page.goto((run_dir / runs.REPORT_NAME).as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(screenshots_dir / f"report_{name}.png"))
    problems = report_problems(page, run_dir)
    assert not problems, f"{run_dir / runs.REPORT_NAME}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", WITH_EXPLORER)
def test_the_kernel_free_explorer_responds(name, reports, page, screenshots_dir):
    page.goto((reports[name] / runs.REPORT_NAME).as_uri())
    explorer = page.wait_for_selector(".tclab-explorer", timeout=10_000)
    canvas = explorer.query_selector("canvas.tclab-map")
    before = canvas.evaluate("c => c.toDataURL()")
    readout = explorer.query_selector(".tclab-readout").inner_text()
    step = explorer.query_selector("input.tclab-step")
    step.evaluate("s => { s.value = s.max; s.dispatchEvent(new Event('input', {bubbles: true})); }")
    page.wait_for_function("([c, b]) => c.toDataURL() !== b", arg=[canvas, before], timeout=5_000)
    assert explorer.query_selector(".tclab-readout").inner_text() != readout
    explorer.scroll_into_view_if_needed()
    explorer.screenshot(path=str(screenshots_dir / f"explorer_{name}.png"))
    assert not page.console_errors


def test_a_missing_figure_fails_the_check(reports, page, tmp_path):
    """The check above is not blind: a report whose figure is gone (here: its image replaced by a link to
    a file that does not exist) and a page wider than the screen are both caught."""
    run_dir = reports["01_token_redundancy"]
    html = (run_dir / runs.REPORT_NAME).read_text()
    start = html.index('src="data:image/png;base64,')
    end = html.index('"', start + 5)
    broken = html[:start] + 'src="change_heatmap_missing.png"' + html[end + 1:]
    broken = broken.replace("</main>", '<div style="width:3000px">wide</div></main>')
    copy = tmp_path / run_dir.name
    copy.mkdir()
    (copy / "summary.json").write_text((run_dir / "summary.json").read_text())
    (copy / runs.REPORT_NAME).write_text(broken)
    page.goto((copy / runs.REPORT_NAME).as_uri())
    page.wait_for_load_state("load")
    problems = report_problems(page, copy)
    assert any(p.startswith("broken image") for p in problems), problems
    assert any(p.startswith("wider than the page") for p in problems), problems


def test_the_index_lists_every_run_with_its_model_and_figures(reports, page, screenshots_dir):
    index = next(iter(reports.values())).parent / "index.html"
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(screenshots_dir / "index.png"))
    rows = page.eval_on_selector_all("#runs tbody tr", "rs => rs.map(r => r.innerText)")
    assert len(rows) == len(reports), rows
    for name, row in zip(reversed(list(reports)), rows):          # newest first
        assert name in row and "shapes-dit" in row and "ok" in row, row
    o = page.evaluate(_OVERFLOW_JS)
    assert o["scrollWidth"] <= o["width"], o
    assert not page.console_errors
