"""report.html: the summary schema, number formatting, the page layout built from an executed notebook,
and the findings each summariser derives from its own summary."""

from __future__ import annotations

import base64
import io
import re

import nbformat
import pytest

from tclab import ablation, inhouse, report
from tclab.report import DOES_NOT_HOLD, HOLDS, NOT_MEASURED, Finding, KeyNumber, ReportSummary


# ---- schema -------------------------------------------------------------------------------------

def test_report_summary_round_trips_and_checks_itself():
    rs = ReportSummary(findings=[Finding("x is 3.", HOLDS, "x > 2", "group")],
                       key_numbers=[KeyNumber("x", "the x", 3.0, "dB")], index_keys=["x"], question="Is x big?")
    again = ReportSummary.from_dict(rs.to_dict())
    assert again == rs
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        Finding("x", "maybe", "c")
    with pytest.raises(ValueError, match=r"index_keys \['y'\]"):
        ReportSummary(key_numbers=[KeyNumber("x", "x", 1)], index_keys=["y"])
    with pytest.raises(ValueError, match="layout version 99"):
        ReportSummary.from_dict({**rs.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="malformed"):
        ReportSummary.from_dict({"version": report.REPORT_SUMMARY_VERSION, "findings": [{"text": "no verdict"}]})


@pytest.mark.parametrize("value, unit, text", [
    (31.234, "dB", "31.2\u2009dB"), (0.1517, "%", "15.2\u2009%"), (0.4812, "x", "0.48\u00d7"), (3.0, "", "3"),
    (True, "", "yes"), (None, "dB", "-"), (float("nan"), "", "-"), (12345.6, "", "12346"), ("global", "", "global"),
    (0.000123, "", "0.000123"),
])
def test_numbers_are_formatted_for_readers(value, unit, text):
    assert report.format_value(value, unit) == text


@pytest.mark.parametrize("seconds, text", [(0.4, "0.4 s"), (41, "41 s"), (192, "3 min 12 s"), (3900, "1 h 05 min"),
                                           (None, "-")])
def test_durations(seconds, text):
    assert report.format_duration(seconds) == text


# ---- the page -----------------------------------------------------------------------------------

def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


STAGING = "/reports/.staging/20260101T000000Z_99_demo_x"
FINAL = "/reports/20260101T000000Z_99_demo_x"


def _executed(tmp_path):
    v4 = nbformat.v4
    nb = v4.new_notebook()
    params = v4.new_code_cell("model = 'm'")
    params.metadata["tags"] = ["parameters"]
    fig = v4.new_code_cell("fig = plot(); run.save_figure(fig, 'a')")
    fig.outputs = [v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure size 4x3>"}),
                   v4.new_output("stream", name="stderr",
                                 text="sweep:  40%|####      | 2/5 [00:01<00:02, 1.1variant/s]\r"
                                      "UserWarning: something worth knowing\n")]
    second = v4.new_code_cell("fig2 = plot()")
    second.outputs = [v4.new_output("display_data", data={"image/png": _png()})]
    table = v4.new_code_cell("frame")
    table.outputs = [v4.new_output("execute_result", data={
        "text/html": "<table class=\"dataframe\"><tr><th>name</th><th>psnr</th><th>flop_ratio</th></tr>"
                     "<tr><td>a</td><td>30.1</td><td>0.5</td></tr></table>", "text/plain": "frame"},
        execution_count=3)]
    printed = v4.new_code_cell("print(run.dir)")
    printed.outputs = [v4.new_output("stream", name="stdout", text=f"{STAGING}\nall good\n")]
    nb.cells = [v4.new_markdown_cell("# 99 Demo: is x big?\n\nA longer introduction about [x](https://example.org)."),
                params, v4.new_markdown_cell("Where x is large: the map of x. More words here."), fig, second,
                v4.new_markdown_cell("Every point, with its PSNR and cost."), table,
                v4.new_markdown_cell("Where the run went."), printed]
    path = tmp_path / "demo.ipynb"
    nbformat.write(nb, path)
    return path


SUMMARY = {
    "identity": {"model_weights_sha256": "ab" * 32, "images_manifest_sha256": "cd" * 32, "images_used": 6},
    "report": ReportSummary(findings=[Finding("x is 3.", HOLDS, "x above 2", "samples"),
                                      Finding("y is 1.", DOES_NOT_HOLD, "y above 2", "samples"),
                                      Finding("z was not run.", NOT_MEASURED, "z above 2", "images")],
                            key_numbers=[KeyNumber("x", "the x", 31.23, "dB")], index_keys=["x"]).to_dict(),
}
PROV = {"start_utc": "2026-01-01T00:00:00.000Z", "duration_s": 192.0, "tag": "demo", "tclab_version": "0.1.0",
        "git": {"commit": "0123456789abcdef", "dirty": True}}


@pytest.fixture
def page(tmp_path):
    out = report.render_report(_executed(tmp_path), tmp_path / "report.html", summary=SUMMARY, provenance=PROV,
                               params={"model": "m", "images": "/data/set", "scheduler": "ddim", "num_steps": 10,
                                       "guidance_scale": 4.0}, overridden={"images"},
                               run_name="20260101T000000Z_99_demo_x", replacements={STAGING: FINAL})
    return out.read_text()


def test_the_summary_comes_first_with_verdicts_numbers_and_identity(page):
    summary = page[page.index('id="tclab-summary"'):page.index('id="figures"')]
    assert "<h1>99 Demo: is x big?</h1>" in summary
    assert [m for m in re.findall(r'class="badge ([a-z-]+)"', summary)] == ["holds", "does-not-hold", "not-measured"]
    assert "x above 2" in summary and "samples" in summary and "images" in summary
    assert "31.2\u2009dB" in summary                                          # the key number, with its unit
    for shown in ("abababababab", "cdcdcdcdcdcd", "6 images used", "2026-01-01 00:00:00 UTC", "3 min 12 s",
                  "commit 0123456789 with uncommitted changes", "/data/set", "ddim, 10 steps, guidance 4"):
        assert shown in summary, shown


def test_figures_are_numbered_and_captioned_by_the_sentence_before_them(page):
    captions = re.findall(r"<figcaption><b>Figure (\d+)\.</b> ([^<]*)</figcaption>", page)
    assert captions == [("1", "Where x is large: the map of x."), ("2", "Where x is large: the map of x.")]
    assert page.count('src="data:image/png;base64,') == 2                     # embedded: the file can be mailed


def test_tables_scroll_in_their_own_box_with_units_in_headers(page):
    tables = page[page.index('id="tables"'):page.index('id="details"')]
    assert '<b>Table 1.</b> Every point, with its PSNR and cost.' in tables
    assert '<div class="tclab-table-scroll"><table class="dataframe">' in tables
    assert "<th>PSNR (dB)</th>" in tables and "<th>FLOPs (\u00d7 full)</th>" in tables


def test_no_console_noise_no_transient_path_code_hidden(page):
    body = page[:page.index('<details class="warnings">')]
    assert "UserWarning" not in body and "variant/s" not in page                # progress bars are dropped
    warnings = page[page.index('<details class="warnings">'):]
    assert "UserWarning: something worth knowing" in warnings and "<details class=\"warnings\"><summary>" in page
    assert STAGING not in page and FINAL in page
    assert '<pre class="code">fig = plot(); run.save_figure(fig, &#x27;a&#x27;)</pre>' in page
    assert ".code { display: none; }" in page and 'id="tclab-show-code"' in page
    assert not re.search(r'(src|href)="https?://[^"]*\.(js|css)', page)          # nothing loaded from the network
    assert "set for this run" in page


def test_a_failed_run_says_so_first(tmp_path):
    out = report.render_report(_executed(tmp_path), tmp_path / "r.html", summary={}, provenance=PROV,
                               error=f"ValueError: bad image in {STAGING}", replacements={STAGING: FINAL})
    page = out.read_text()
    summary = page[page.index('id="tclab-summary"'):page.index('id="figures"')]
    assert "This run failed" in summary and FINAL in summary and STAGING not in page
    assert "wrote no findings" in summary


def test_an_unreadable_summary_is_reported_not_hidden(tmp_path):
    out = report.render_report(_executed(tmp_path), tmp_path / "r.html", summary={"report": {"version": 0}})
    assert "The summary could not be read" in out.read_text()


# ---- findings of each summariser ------------------------------------------------------------------

def _sweep_summary(winner="learned-static", psnr=30.0, ref_psnr=32.0, time_ratio=0.7):
    at2 = {"winner": winner, "point": f"{winner} rho=0.1", "psnr": psnr, "class_consistency": 0.8, "tied_with": [],
           "runner_up": "random", "psnr_margin": 1.5,
           "best_reference": {"name": "FORA(2)", "psnr": ref_psnr, "flop_ratio": 0.5}}
    best = {"name": f"{winner} rho=0.1", "flop_ratio": 0.45, "time_ratio": time_ratio, "psnr": psnr}
    head = {"winner_at_2x_flops": winner, "psnr_at_2x": psnr, "budget_flop_ratio": 0.5,
            "best_under_budget": best["name"], "best_flop_ratio": 0.45, "best_time_ratio": time_ratio,
            "best_psnr": psnr, "points": 10, "failed_points": 0}
    return {"flops": {"at_2x": at2, "at_3x": {"winner": None}}, "headline": head, "best_under_budget": best}


def test_sweep_findings_follow_the_numbers():
    rs = ablation.sweep_report(_sweep_summary(), reductions=(2, 3))
    verdicts = [(f.group, f.verdict) for f in rs.findings]
    assert verdicts[0] == ("at 2x fewer FLOPs", HOLDS)               # the learned predictor wins among scorers
    assert verdicts[1] == ("at 2x fewer FLOPs", DOES_NOT_HOLD)       # ... but FORA(2) is 2 dB better
    assert "2.0 dB below" in rs.findings[1].text
    assert verdicts[2] == ("at 3x fewer FLOPs", NOT_MEASURED)
    assert verdicts[3][1] == HOLDS and "0.70x the wall-clock" in rs.findings[3].text
    assert rs.index_keys == ["best_under_budget", "best_flop_ratio", "best_psnr"]
    rival_wins = ablation.sweep_report(_sweep_summary(winner="random", psnr=33.0, time_ratio=1.2), reductions=(2,))
    assert [f.verdict for f in rival_wins.findings] == [DOES_NOT_HOLD, HOLDS, DOES_NOT_HOLD]


def test_inhouse_findings_follow_the_numbers():
    head = {"usable_images": 30, "bad_images": 2, "mapped_folders": 3, "recommendation": "tc", "flop_ratio": 0.6,
            "recommendation_source": "given", "recommendation_from": None, "within_budget": False,
            "budget_flop_ratio": 0.5, "time_ratio": 0.9, "time_speedup": 1.11, "psnr": 28.0, "worst_psnr": 20.0,
            "ssim": 0.9, "class_consistency_full": 0.8, "class_consistency_cached": 0.78, "class_consistency_n": 30,
            "images_used": 30}
    rs = inhouse.inhouse_report({"headline": head, "details": {"image_check": {"classes": ["a", "b", "c"]}}})
    assert [f.verdict for f in rs.findings] == [DOES_NOT_HOLD, DOES_NOT_HOLD, DOES_NOT_HOLD, HOLDS, HOLDS]
    assert rs.findings[0].group == "the answer" and "Do not cache with tc yet" in rs.findings[0].text
    assert "over the FLOP budget" in rs.findings[0].text and "not faster" not in rs.findings[0].text
    assert "2 files skipped" in rs.findings[1].text and "78% cached vs 80%" in rs.findings[4].text
    head.update(within_budget=True)
    rs = inhouse.inhouse_report({"headline": head, "details": {"measurement": {"settings": {"timing_repeats": 1}}}})
    assert rs.findings[0].verdict == HOLDS and rs.findings[0].text.startswith("Cache tokens with tc")
    assert "fewer than 3 one slow run can decide it" in rs.findings[3].criterion
    head.update(class_consistency_cached=0.6, within_budget=None, time_ratio=2.0)
    rs = inhouse.inhouse_report({"headline": head, "details": {}})
    assert [f.verdict for f in rs.findings][2:] == [NOT_MEASURED, DOES_NOT_HOLD, DOES_NOT_HOLD]
    assert "2.00x slower" in rs.findings[3].text and rs.findings[0].verdict == DOES_NOT_HOLD


def test_findings_read_well_when_a_number_could_not_be_measured():
    from tclab.analysis import _observation_sentence

    short = _observation_sentence("adjacent_steps_correlated",
                                  {"holds": False, "adjacent_rank_corr": 0.59, "far_distance": None, "far_rank_corr": None})
    assert "None" not in short and "too few steps" in short
    head = {"usable_images": 3, "bad_images": 0, "recommendation": "tc", "flop_ratio": 0.6, "within_budget": True,
            "recommendation_source": "measured here", "recommendation_from": "measured here", "budget_flop_ratio": 0.7,
            "time_ratio": None, "psnr": 28.0, "worst_psnr": 20.0, "ssim": 0.9}
    rs = inhouse.inhouse_report({"headline": head, "details": {}})
    assert "measured here, measured here" not in rs.findings[2].text and rs.findings[3].verdict == NOT_MEASURED
    assert rs.findings[0].verdict == NOT_MEASURED                      # wall-clock missing: not decided
