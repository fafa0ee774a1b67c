"""Quality gates of scheduled jobs (``tclab.gates``), the recommended-setting (rollback) file and the
``on_failure`` alerts (``tclab.jobs``).

Most tests check gates on synthetic summaries and planted run folders: no notebook runs. One
module-scoped fixture runs a tiny notebook (no torch; it writes a headline PSNR it is given) three
times through ``tclab schedule run``, as a team's nightly would:

1. ``psnr: 32``  -> every gate passes, exit 0, the recommended-setting file is written;
2. ``psnr: 25``  -> ``psnr_min`` fails: exit 3, ``GATE FAILED`` line, ``gates.json``, the index mark,
   the recommended file unchanged byte for byte, the job's alert script receives the JSON;
3. ``fail: true`` -> the job fails to run: exit 1, the file's own ``on_failure`` is called.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from tclab import gates, jobs, runs

# ---- synthetic summaries -------------------------------------------------------------------------------------

CACHE = {"scorer": "learned-static", "selection": "global", "kv": "all", "rho": 0.25, "schedule": "tprr"}


def inhouse(psnr: float = 31.0, half: float | None = 0.5, **extra) -> dict:
    """A notebook-05-like summary: flat headline with intervals, details.recommendation."""
    head = {"psnr": psnr, "ssim": 0.93, "ssim_ci_low": 0.91, "ssim_ci_high": 0.95, "flop_ratio": 0.5,
            "flop_speedup": 2.0, "time_ratio": 0.8, "time_ratio_ci_low": 0.7, "time_ratio_ci_high": 0.9,
            "time_speedup": 1.25, "class_consistency_full": 0.9, "class_consistency_cached": 0.88,
            "class_consistency_change": -0.02, "class_consistency_change_ci_low": -0.06,
            "class_consistency_change_ci_high": 0.02, "worst_psnr": 24.0, "recommendation": "rho=0.25"}
    if half is not None:
        head.update(psnr_ci_low=psnr - half, psnr_ci_high=psnr + half)
    head.update(extra)
    return {"headline": head, "details": {"recommendation": {"name": "rho=0.25", "cache": CACHE,
                                                             "source": "ablation run", "origin": "x"}},
            "identity": {"model": "shapes-dit", "model_weights_sha256": "ab" * 32}}


def sweep(best_psnr: float = 30.0) -> dict:
    """A notebooks-02-04-like summary: the best point under budget."""
    best = {"name": "learned-static rho=0.2", "flop_ratio": 0.4, "time_ratio": 0.625, "psnr": best_psnr,
            "psnr_ci": [best_psnr - 1, best_psnr + 1], "ssim": 0.9, "class_consistency": 0.8,
            "config": {"name": "learned-static rho=0.2", "cache": CACHE}}
    head = {"best_under_budget": best["name"], "best_flop_ratio": 0.4, "best_time_ratio": 0.625,
            "best_psnr": best_psnr, "best_class_consistency": 0.8, "full_compute_class_consistency": 0.85,
            "best_psnr_ci_low": best_psnr - 1, "best_psnr_ci_high": best_psnr + 1,
            "best_time_ratio_ci_low": 0.5, "best_time_ratio_ci_high": 0.8}
    return {"version": 2, "headline": head, "best_under_budget": best}


def check(gate_map: dict, summary: dict, previous: dict | None = None, compared_with: str | None = None):
    return gates.evaluate_gates(gates.GateSpec.from_dict(gate_map), summary, previous, job="nightly",
                                compared_with=compared_with)


def only(report: gates.GateReport) -> gates.GateResult:
    [result] = report.results
    return result


# ---- gates on synthetic summaries ---------------------------------------------------------------------------

def test_every_named_gate_passes_on_a_good_run():
    report = check({"psnr_min": 30, "ssim_min": 0.9, "class_consistency_drop_max": 0.05, "speedup_min": 1.8,
                    "time_speedup_min": 1.05, "worst_image_psnr_min": 22}, inhouse(31.0))
    assert report.status == "passed" and report.passed and report.failed == []
    by_name = {r.name: r for r in report.results}
    assert list(by_name) == ["psnr_min", "ssim_min", "class_consistency_drop_max", "flop_speedup_min",
                             "time_speedup_min", "worst_image_psnr_min"]          # speedup_min is flop_speedup_min
    assert by_name["psnr_min"].by == pytest.approx(1.0) and by_name["psnr_min"].interval == (30.5, 31.5)
    assert "whole interval [30.5, 31.5] dB clear of it" in by_name["psnr_min"].note
    # the drop is -change, its interval flipped; time_speedup's interval is 1/time_ratio's, flipped
    assert by_name["class_consistency_drop_max"].value == pytest.approx(0.02)
    assert by_name["class_consistency_drop_max"].interval == pytest.approx((-0.02, 0.06))
    assert by_name["time_speedup_min"].interval == pytest.approx((1 / 0.9, 1 / 0.7))
    assert all(r.by >= 0 for r in report.results)


def test_a_gate_fails_when_its_whole_interval_is_past_the_threshold_and_says_by_how_much():
    r = only(check({"psnr_min": 30}, inhouse(27.1, half=1.1)))
    assert not r.passed and r.by == pytest.approx(-2.9) and r.interval == pytest.approx((26.0, 28.2))
    assert r.note == "psnr 27.1 dB < 30 dB by 2.9 dB, its whole interval [26, 28.2] dB below: fails"
    report = check({"psnr_min": 30, "ssim_min": 0.9}, inhouse(27.1, half=1.1))
    assert report.status == "failed" and [g.name for g in report.failed] == ["psnr_min"]
    assert report.failed_text().startswith("psnr_min: psnr 27.1 dB < 30 dB by 2.9 dB")


def test_a_point_past_the_threshold_whose_interval_reaches_it_passes_with_a_note():
    r = only(check({"psnr_min": 30}, inhouse(29.1, half=1.3)))
    assert r.passed and r.by == pytest.approx(-0.9) and r.not_proven
    assert r.note == "psnr: point 29.1 dB < 30 dB but the interval [27.8, 30.4] dB reaches the threshold: " \
                     "passes, not proven"
    # and the other way round: a point inside whose interval reaches past is noted too
    r = only(check({"psnr_min": 30}, inhouse(30.3, half=1.0)))
    assert r.passed and r.not_proven and "reaches below 30 dB: passes, not proven" in r.note


def test_without_an_interval_the_point_decides():
    r = only(check({"worst_image_psnr_min": 25}, inhouse()))
    assert not r.passed and r.interval is None and r.by == pytest.approx(-1.0)
    assert "worst_psnr 24 dB < 25 dB by 1 dB (no interval recorded, judged on the point): fails" == r.note
    assert only(check({"psnr_min": 31}, inhouse(31.0, half=None))).passed    # at the threshold: passes


def test_a_missing_figure_fails_the_gate_and_says_which():
    r = only(check({"psnr_min": 30}, {"headline": {"ssim": 0.9}}))
    assert not r.passed and r.value is None and r.by is None
    assert "no 'psnr'" in r.note and "not measured, so the gate fails" in r.note
    r = only(check({"psnr_min": 30}, inhouse(psnr=None, half=None)))           # PSNR inf is written as null
    assert not r.passed and "recorded psnr as null" in r.note
    r = only(check({"class_consistency_drop_max": 0.05}, {"headline": {"class_consistency_change": None}}))
    assert not r.passed and "is a classifier configured?" in r.note
    assert check({"min": {"ssim": 0.5}}, {}).status == "failed"                 # no summary.json at all


def test_psnr_drop_against_the_last_good_run_combines_both_intervals_in_quadrature():
    previous = inhouse(31.0, half=0.5)
    r = only(check({"psnr_drop_max": 1.0}, inhouse(29.0, half=0.5), previous, compared_with="RUN-A"))
    half = math.sqrt(0.5 ** 2 + 0.5 ** 2)
    assert not r.passed and r.value == pytest.approx(2.0) and r.by == pytest.approx(-1.0)
    assert r.interval == pytest.approx((2.0 - half, 2.0 + half)) and r.figure == "psnr drop"
    assert "from 31 dB in RUN-A to 29 dB" in r.note and "half-widths combined in quadrature" in r.note
    # wider intervals: the drop may be noise, so it passes, not proven
    r = only(check({"psnr_drop_max": 1.0}, inhouse(29.0, half=1.5), inhouse(31.0, half=1.5), "RUN-A"))
    assert r.passed and r.not_proven
    # a small drop passes; no earlier good run passes with a note (there is nothing to drop from)
    assert only(check({"psnr_drop_max": 1.0}, inhouse(30.5), previous, "RUN-A")).passed
    r = only(check({"psnr_drop_max": 1.0}, inhouse(20.0), None))
    assert r.passed and "no earlier good run" in r.note
    # generic: drop_max and rise_max on any headline figure
    report = check({"drop_max": {"ssim": 0.01}, "rise_max": {"time_ratio": 0.05}},
                   inhouse(ssim=0.85, ssim_ci_low=0.84, ssim_ci_high=0.86, time_ratio=1.05, time_ratio_ci_low=1.04,
                           time_ratio_ci_high=1.06),
                   inhouse(), "RUN-A")
    assert [(g.name, g.passed) for g in report.results] == [("drop_max.ssim", False), ("rise_max.time_ratio", False)]


def test_a_sweeps_gates_read_its_best_point_under_budget():
    report = check({"psnr_min": 29, "flop_speedup_min": 2.5, "time_speedup_min": 1.5, "ssim_min": 0.85,
                    "class_consistency_drop_max": 0.1, "worst_image_psnr_min": 20}, sweep(30.0))
    by_name = {r.name: r for r in report.results}
    assert by_name["psnr_min"].figure == "best_psnr" and by_name["psnr_min"].interval == (29.0, 31.0)
    assert by_name["flop_speedup_min"].value == pytest.approx(2.5) and by_name["flop_speedup_min"].passed
    assert by_name["time_speedup_min"].interval == pytest.approx((1.25, 2.0))
    assert by_name["ssim_min"].passed and by_name["class_consistency_drop_max"].value == pytest.approx(0.05)
    worst = by_name["worst_image_psnr_min"]
    assert not worst.passed and "records no worst image" in worst.note


@pytest.mark.parametrize("gate_map, complaint", [
    ({"psnr_mn": 30}, "unknown gate 'psnr_mn' (did you mean 'psnr_min'?)"),
    ({"speed_min": 2}, "did you mean 'speedup_min'?"),
    ({"psnr_min": float("nan")}, "'psnr_min' must be a finite number, got nan"),
    ({"psnr_min": "30"}, "'psnr_min' must be a finite number"),
    ({"psnr_min": True}, "'psnr_min' must be a finite number, got True"),
    ({"min": {"ssim": float("inf")}}, "min.ssim must be a finite number"),
    ({"min": 0.9}, "'min' must be a mapping 'headline figure: threshold'"),
    ({"speedup_min": 1.5, "flop_speedup_min": 2}, "'speedup_min' and 'flop_speedup_min' are the same gate"),
    ({}, "must be a non-empty mapping"),
])
def test_unknown_gates_and_bad_values_are_refused(gate_map, complaint):
    with pytest.raises(gates.GateSpecError) as info:
        gates.GateSpec.from_dict(gate_map)
    assert complaint in str(info.value)


def test_gates_json_has_the_agreed_layout_and_reads_back(tmp_path):
    report = check({"psnr_min": 30, "psnr_drop_max": 1}, inhouse(27.1, half=1.1), inhouse(31.0), "RUN-A")
    path = gates.write_gate_report(tmp_path, report)
    data = json.loads(path.read_text())
    assert path.name == "gates.json" and list(data) == ["version", "job", "status", "checked_utc",
                                                        "compared_with", "gates"]
    assert data["version"] == 1 and data["job"] == "nightly" and data["status"] == "failed"
    assert data["compared_with"] == "RUN-A" and data["checked_utc"].endswith("Z")
    assert list(data["gates"][0]) == ["name", "figure", "threshold", "value", "interval", "passed", "by", "note"]
    assert data["gates"][0]["interval"] == [26.0, 28.2] and data["gates"][0]["passed"] is False
    assert gates.read_gate_report(tmp_path) == report
    assert not list(tmp_path.glob(".*.tmp"))                                    # written atomically
    with pytest.raises(gates.GateReportError, match="layout version 2"):
        gates.GateReport.from_dict({**data, "version": 2})
    with pytest.raises(gates.GateReportError, match="disagrees"):
        gates.GateReport.from_dict({**data, "status": "passed"})


# ---- the last good run, planted run folders -------------------------------------------------------------------

def plant(reports: Path, name: str, status: str = "ok", psnr: float = 31.0, gate: str | None = None,
          notebook: str = "tiny_gated", tag: str = "nightly") -> Path:
    d = reports / name
    d.mkdir(parents=True)
    start = f"{name[:4]}-{name[4:6]}-{name[6:8]}T{name[9:11]}:{name[11:13]}:{name[13:15]}Z"
    (d / "provenance.json").write_text(json.dumps({"status": status, "notebook": f"notebooks/{notebook}.ipynb",
                                                   "tag": tag, "start_utc": start}))
    (d / "summary.json").write_text(json.dumps(inhouse(psnr)))
    if gate is not None:
        (d / "gates.json").write_text(json.dumps({"version": 1, "job": tag, "status": gate, "checked_utc": start,
                                                  "compared_with": None, "gates": []}))
    return d


def test_the_last_good_run_is_the_newest_that_passed_its_gates(tmp_path):
    reports = tmp_path / "reports"
    ungated = plant(reports, "20260101T000000Z_tiny_gated_nightly")                     # before the job had gates
    assert gates.last_good_run(reports, "tiny_gated", "nightly") == ungated          # none gated yet: the last ok
    passed = plant(reports, "20260102T000000Z_tiny_gated_nightly", gate="passed")
    plant(reports, "20260103T000000Z_tiny_gated_nightly", gate="failed")                # a gate failed: never the base
    plant(reports, "20260104T000000Z_tiny_gated_nightly_FAILED", status="failed")
    plant(reports, "20260105T000000Z_tiny_gated_other", gate="passed", tag="other")     # another job
    plant(reports, "20260106T000000Z_tiny_gated_v2_nightly", gate="passed", notebook="tiny_gated_v2")
    current = plant(reports, "20260107T000000Z_tiny_gated_nightly", gate="passed")
    assert gates.last_good_run(reports, "tiny_gated", "nightly", exclude=current.name) == passed
    assert gates.last_good_run(reports, "tiny_gated", "nobody") is None


# ---- the recommended-setting (rollback) file ----------------------------------------------------------------

def test_the_recommended_file_is_written_on_a_pass_and_left_byte_for_byte_on_a_failure(tmp_path):
    path = tmp_path / "reports" / "recommended" / "nightly.json"
    assert gates.default_recommended_file(tmp_path / "reports", "nightly") == path
    good_run = tmp_path / "reports" / "20260101T000000Z_05_inhouse_report_nightly"
    passed = check({"psnr_min": 30}, inhouse(31.0))
    written = gates.write_recommended(path, "nightly", good_run, inhouse(31.0), passed)
    data = json.loads(path.read_text())
    assert written is not None and list(data)[:8] == ["version", "job", "name", "setting", "from_run", "passed_utc",
                                                      "gates", "figures"]
    assert data["version"] == 1 and data["job"] == "nightly" and data["name"] == "rho=0.25"
    assert data["setting"] == CACHE and data["from_run"] == good_run.name
    assert data["passed_utc"] == passed.checked_utc and data["gates"] == [r.to_dict() for r in passed.results]
    assert data["figures"]["psnr"] == 31.0 and data["figures"]["flop_ratio"] == 0.5
    assert data["identity"]["model_weights_sha256"] == "ab" * 32
    assert gates.read_recommended(path) == written
    before, stat = path.read_bytes(), path.stat()
    failed = check({"psnr_min": 30}, inhouse(25.0))
    assert gates.write_recommended(path, "nightly", good_run.with_name("bad"), inhouse(25.0), failed) is None
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stat.st_mtime_ns
    # a sweep's setting is its best point's cache; a run with no setting (notebook 01) writes nothing
    assert gates.run_setting(sweep()) == ("learned-static rho=0.2", CACHE)
    assert gates.run_figures(sweep())["psnr"] == 30.0
    assert gates.write_recommended(tmp_path / "none.json", "x", good_run, {"headline": {"psnr": 40}},
                                   check({"psnr_min": 30}, {"headline": {"psnr": 40}})) is None
    assert not (tmp_path / "none.json").exists()


# ---- jobs files with gates and alerts (no kernel) --------------------------------------------------------------

PARAMS_CELL = 'run_dir = None\npsnr = 32.0\nfail = False\n'


def write_notebook(path: Path) -> Path:
    """A thin notebook (no torch) that writes an in-house-report-like summary with the PSNR it is given."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Tiny gated study\nDo quality gates work?"),
        nbformat.v4.new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from tclab import runs\nrun = runs.open_run(run_dir)"),
        nbformat.v4.new_code_cell('if fail:\n    raise RuntimeError("boom on purpose")'),
        nbformat.v4.new_code_cell(
            'run.write_summary({"headline": {"psnr": psnr, "psnr_ci_low": psnr - 0.5, "psnr_ci_high": psnr + 0.5,\n'
            '                                "flop_ratio": 0.5, "flop_speedup": 2.0, "recommendation": "rho=0.25"},\n'
            f'                  "details": {{"recommendation": {{"name": "rho=0.25", "cache": {CACHE!r}}}}}}})'),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


#: The team's alert command: saves what it received (stdin, the TCLAB_* environment) to alert-N.json.
ALERT_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    from pathlib import Path

    out = Path(sys.argv[1])
    out.mkdir(exist_ok=True)
    n = len(list(out.glob("alert-*.json"))) + 1
    (out / f"alert-{n}.json").write_text(json.dumps({
        "stdin": sys.stdin.read(), "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("TCLAB_")}}))
    sys.exit(int(os.environ.get("ALERT_EXIT", "0")))
""")


def write_jobs(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    write_notebook(tmp_path / "notebooks" / "tiny_gated.ipynb")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "alert.py").write_text(ALERT_SCRIPT)
    return tmp_path


def gated_job(**extra) -> dict:
    return {"name": "nightly", "notebook": "../notebooks/tiny_gated.ipynb", "gates": {"psnr_min": 30}, **extra}


@pytest.mark.parametrize("content, complaints", [
    ({"reports": "../r", "jobs": [gated_job(gates={"psnr_mn": 30})]},
     ["'gates': unknown gate 'psnr_mn' (did you mean 'psnr_min'?)"]),
    ({"reports": "../r", "jobs": [gated_job(gates={"psnr_min": "high"})]}, ["'psnr_min' must be a finite number"]),
    ({"reports": "../r", "jobs": [{**gated_job(recommended_file="x.json"), "gates": None}]}, ["must be a non-empty"]),
    ({"reports": "../r", "jobs": [{"name": "n", "notebook": "../notebooks/tiny_gated.ipynb",
                                   "recommended_file": "x.json"}]}, ["'recommended_file' needs 'gates'"]),
    ({"reports": "../r", "jobs": [gated_job(on_failure=["python", 3])]}, ["'on_failure' must be a command"]),
    ({"reports": "../r", "jobs": [gated_job()], "on_failure": {"mail": "x"}}, ["'on_failure' must be a command"]),
    ({"reports": "../r", "jobs": [gated_job(name="a/b")]}, ["not a plain file name", "set 'recommended_file'"]),
    ({"reports": "../r", "jobs": [gated_job(recommended_file="s.json"),
                                  gated_job(name="two", recommended_file="s.json")]},
     ["is also job 'nightly''s"]),
    ({"reports": "../r", "jobs": [gated_job(gate={"psnr_min": 3})]}, ["unknown key 'gate'", "gates, on_failure"]),
])
def test_jobs_files_with_bad_gates_or_alerts_are_refused_before_anything_runs(project, content, complaints):
    path = write_jobs(project / "jobs" / "j.yaml", content)
    with pytest.raises(jobs.JobsFileError) as info:
        jobs.load_jobs(path)
    for c in complaints:
        assert c in str(info.value)


def test_a_jobs_file_reads_gates_alerts_and_the_recommended_file(project):
    path = write_jobs(project / "jobs" / "j.yaml", {
        "reports": "../reports", "on_failure": "echo file-wide", "jobs": [
            gated_job(gates={"psnr_min": 30, "speedup_min": 1.8}),
            gated_job(name="own", on_failure=["python", "alert.py"], recommended_file="../deploy/setting.json"),
            {"name": "quiet", "notebook": "../notebooks/tiny_gated.ipynb", "on_failure": None}]})
    nightly, own, quiet = jobs.load_jobs(path).jobs
    assert nightly.gates == gates.GateSpec(psnr_min=30.0, flop_speedup_min=1.8)
    assert nightly.on_failure == "echo file-wide"                                   # the file's
    assert nightly.recommended_file == project / "reports" / "recommended" / "nightly.json"
    assert own.on_failure == ["python", "alert.py"]                                 # the job's wins
    assert own.recommended_file == project / "deploy" / "setting.json"              # relative to the jobs file
    assert quiet.gates is None and quiet.recommended_file is None and quiet.on_failure is None   # turned off


def test_the_exit_status_says_failed_to_run_before_gate_failed():
    def r(status):
        return jobs.JobResult("j", status, 1.0, None)

    assert jobs.exit_status([r("ok"), r("ok")]) == jobs.EXIT_OK == 0
    assert jobs.exit_status([r("ok"), r("gate_failed")]) == jobs.EXIT_GATE_FAILED == 3
    assert jobs.exit_status([r("gate_failed"), r("failed")]) == jobs.EXIT_JOB_FAILED == 1
    assert jobs.EXIT_BAD_FILE == 2


def alert_setup(project: Path, command) -> tuple[jobs.JobsFile, jobs.Job, jobs.JobResult]:
    path = write_jobs(project / "jobs" / "j.yaml", {"reports": "../reports", "jobs": [gated_job(on_failure=command)]})
    plan = jobs.load_jobs(path)
    report = check({"psnr_min": 30}, inhouse(25.0))
    result = jobs.JobResult("nightly", "gate_failed", 2.0, project / "reports" / "RUN", {"psnr": 25.0}, gates=report,
                            recommended_file=plan.jobs[0].recommended_file, recommended_from="GOOD-RUN")
    return plan, plan.jobs[0], result


def test_an_alert_command_gets_the_json_on_stdin_and_in_its_environment(project):
    plan, job, result = alert_setup(project, [sys.executable, "alert.py", "received"])
    warnings: list[str] = []
    assert jobs._send_alert(plan, job, result, warnings.append) == "sent" and warnings == []
    got = json.loads((project / "jobs" / "received" / "alert-1.json").read_text())   # cwd: the jobs file's folder
    doc = json.loads(got["stdin"])
    assert json.loads(got["env"]["TCLAB_ALERT_JSON"]) == doc
    assert doc["status"] == "gate_failed" and doc["failed_gates"] == ["psnr_min"]
    assert doc["recommended_setting_kept_from"] == "GOOD-RUN" and doc["headline"] == {"psnr": 25.0}
    assert got["env"]["TCLAB_FAILED_GATES"] == "psnr_min" and got["env"]["TCLAB_STATUS"] == "gate_failed"
    assert got["env"]["TCLAB_JOB"] == "nightly" and got["env"]["TCLAB_REPORTS"] == str(project / "reports")


def test_a_failing_or_hanging_alert_command_only_warns(project, monkeypatch):
    plan, job, result = alert_setup(project, f"{sys.executable} alert.py received; echo 'smtp down' >&2; exit 7")
    warnings: list[str] = []
    outcome = jobs._send_alert(plan, job, result, warnings.append)
    assert warnings == [outcome] and "job 'nightly': on_failure command" in outcome
    assert "exited 7: smtp down" in outcome and "exit status are unchanged" in outcome
    assert (project / "jobs" / "received" / "alert-1.json").is_file()              # a string runs in the shell
    monkeypatch.setattr(jobs, "ALERT_TIMEOUT_S", 0.5)
    plan, job, result = alert_setup(project, "sleep 30 & wait")
    outcome = jobs._send_alert(plan, job, result, warnings.append)
    assert "did not finish within 0.5 s and was stopped" in outcome
    plan, job, result = alert_setup(project, ["./no-such-alert"])
    assert "could not be started" in jobs._send_alert(plan, job, result, None)


def test_before_any_pass_the_line_says_no_setting_has_passed_yet(project, monkeypatch):
    # the notebook run is stood in for by a planted run folder: run_jobs' gate step is what is tested
    path = write_jobs(project / "jobs" / "j.yaml", {"reports": "../reports", "jobs": [gated_job()]})
    planted = plant(project / "reports", "20260101T000000Z_tiny_gated_nightly", psnr=25.0)
    monkeypatch.setattr(jobs, "_run_job", lambda plan, job, bar: jobs.JobResult(job.name, "ok", 1.0, planted,
                                                                                 {"psnr": 25.0}))
    lines: list[str] = []
    [result] = jobs.run_jobs(path, echo=lines.append)
    assert result.gate_failed and result.recommended_from is None and not result.recommended_updated
    assert lines == [result.summary_line()] and lines[0].startswith("GATE FAILED nightly")
    assert lines[0].endswith("; no setting has passed yet")
    assert not (project / "reports" / "recommended").exists()
    assert gates.read_gate_report(planted).status == "failed"


def test_a_job_stopped_by_a_signal_still_sends_its_alert(project, monkeypatch):
    path = write_jobs(project / "jobs" / "j.yaml", {"reports": "../reports", "jobs": [
        gated_job(on_failure=[sys.executable, "alert.py", "received"]), gated_job(name="later")]})

    def stopped(plan, job, bar):
        raise runs.RunStopped("stopped by SIGTERM", 15)

    monkeypatch.setattr(jobs, "_run_job", stopped)
    with pytest.raises(jobs.SchedulerStopped) as info:
        jobs.run_jobs(path, echo=None)
    first, later = info.value.results
    assert first.status == "failed" and first.alert == "sent" and later.status == "skipped" and later.alert is None
    [alert] = (project / "jobs" / "received").glob("alert-*.json")
    got = json.loads(alert.read_text())
    assert json.loads(got["stdin"])["error"] == "stopped by SIGTERM" and got["env"]["TCLAB_RUN_DIR"] == ""


# ---- end to end: a gated job through `tclab schedule run` -------------------------------------------------------

def schedule(path: Path) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = jobs.cli_schedule_run(str(path))
    return rc, out.getvalue().strip().splitlines(), err.getvalue()


@pytest.fixture(scope="module")
def nightly(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("gated")
    write_notebook(base / "notebooks" / "tiny_gated.ipynb")
    (base / "jobs").mkdir()
    (base / "jobs" / "alert.py").write_text(ALERT_SCRIPT)

    def night(**params) -> Path:
        return write_jobs(base / "jobs" / "night.yaml", {
            "reports": "../reports",
            "on_failure": [sys.executable, "alert.py", "file-alerts"],        # the file's: jobs without their own
            "jobs": [{"name": "nightly", "notebook": "../notebooks/tiny_gated.ipynb", "params": params,
                      "gates": {"psnr_min": 30, "flop_speedup_min": 1.8, "psnr_drop_max": 10},
                      **({"on_failure": [sys.executable, "alert.py", "job-alerts"]} if "psnr" in params else {})}]})

    reports = base / "reports"
    recommended = reports / "recommended" / "nightly.json"
    ns = SimpleNamespace(base=base, reports=reports, recommended=recommended)
    ns.rc1, ns.out1, ns.err1 = schedule(night(psnr=32.0))
    ns.rec_bytes, ns.rec_mtime = recommended.read_bytes(), recommended.stat().st_mtime_ns
    ns.rc2, ns.out2, ns.err2 = schedule(night(psnr=25.0))
    ns.rc3, ns.out3, ns.err3 = schedule(night(fail=True))
    ns.folders = sorted(d for d in reports.iterdir() if d.is_dir() and d.name.startswith("20"))
    return ns


def test_a_passing_run_writes_the_recommended_setting(nightly):
    assert nightly.rc1 == 0, (nightly.out1, nightly.err1)
    line = nightly.out1[0]
    assert line.startswith("ok") and "gates passed (3)" in line and "recommended setting updated" in line
    first = nightly.folders[0]
    assert json.loads((first / "gates.json").read_text())["status"] == "passed"
    data = json.loads(nightly.rec_bytes)
    assert data["from_run"] == first.name and data["setting"] == CACHE and data["name"] == "rho=0.25"
    assert [g["name"] for g in data["gates"]] == ["psnr_min", "flop_speedup_min", "psnr_drop_max"]


def test_a_failed_gate_end_to_end_line_index_file_and_alert(nightly):
    first, second = nightly.folders[0], nightly.folders[1]
    # exit 3: every job ran, a gate failed
    assert nightly.rc2 == jobs.EXIT_GATE_FAILED == 3, (nightly.out2, nightly.err2)
    line, total = nightly.out2
    assert line.startswith("GATE FAILED nightly") and str(second) in line
    assert "1 gate failed: psnr_min: psnr 25 dB < 30 dB by 5 dB, its whole interval [24.5, 25.5] dB below: fails" \
        in line
    assert line.endswith(f"; recommended setting kept from {first.name}")
    assert total.startswith("0 of 1 job(s) ok, 0 failed, 1 failed a quality gate")
    # the run is kept (not _FAILED), its verdict beside it; the drop gate compared with the passed run
    assert not second.name.endswith(runs.FAILED_SUFFIX)
    verdict = json.loads((second / "gates.json").read_text())
    assert verdict["status"] == "failed" and verdict["compared_with"] == first.name
    assert [(g["name"], g["passed"]) for g in verdict["gates"]] == [
        ("psnr_min", False), ("flop_speedup_min", True), ("psnr_drop_max", True)]
    assert verdict["gates"][0]["by"] == -5.0 and verdict["gates"][2]["value"] == 7.0      # drop 32 -> 25
    # the index marks it (rendered from the run table, which read gates.json)
    page = (nightly.reports / "index.html").read_text()
    assert second.name in page and page.count("GATE FAILED") >= 1
    # the recommended setting is the last one that passed, byte for byte, untouched
    assert nightly.recommended.read_bytes() == nightly.rec_bytes
    assert nightly.recommended.stat().st_mtime_ns == nightly.rec_mtime
    # the job's own alert command got the JSON (the file's on_failure is not called for it)
    got = json.loads((nightly.base / "jobs" / "job-alerts" / "alert-1.json").read_text())
    doc = json.loads(got["stdin"])
    assert doc == json.loads(got["env"]["TCLAB_ALERT_JSON"])
    assert doc["version"] == 1 and doc["job"] == "nightly" and doc["status"] == "gate_failed"
    assert doc["run_dir"] == str(second) and doc["error"] is None and doc["summary_line"] == line
    assert doc["failed_gates"] == ["psnr_min"] and doc["gates"] == verdict["gates"]
    assert doc["headline"]["psnr"] == 25.0 and doc["recommended_setting_kept_from"] == first.name
    assert doc["recommended_file"] == str(nightly.recommended)
    assert doc["index"] == str(nightly.reports / "index.html") and doc["jobs_file"].endswith("night.yaml")
    assert got["env"]["TCLAB_RUN_DIR"] == str(second) and got["env"]["TCLAB_FAILED_GATES"] == "psnr_min"


def test_a_job_that_fails_to_run_exits_1_and_calls_the_files_alert(nightly):
    assert nightly.rc3 == jobs.EXIT_JOB_FAILED == 1, (nightly.out3, nightly.err3)
    line = nightly.out3[0]
    assert line.startswith("FAILED") and "RuntimeError: boom on purpose" in line
    assert line.endswith(f"; recommended setting kept from {nightly.folders[0].name}")
    assert nightly.recommended.read_bytes() == nightly.rec_bytes
    [alert] = (nightly.base / "jobs" / "file-alerts").glob("alert-*.json")
    got = json.loads(alert.read_text())
    doc = json.loads(got["stdin"])
    assert doc["status"] == "failed" and got["env"]["TCLAB_STATUS"] == "failed"
    assert doc["error"] == "RuntimeError: boom on purpose" and doc["gates"] == [] and doc["failed_gates"] == []
    assert doc["run_dir"].endswith(runs.FAILED_SUFFIX) and not (Path(doc["run_dir"]) / "gates.json").exists()
    assert len(list((nightly.base / "jobs" / "job-alerts").glob("alert-*.json"))) == 1   # one alert per failure
