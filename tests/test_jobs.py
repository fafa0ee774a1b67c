"""Scheduled reports (``tclab.jobs`` and ``tclab schedule run``).

A tiny notebook (no torch) is executed three times by a module-scoped fixture,
because every papermill execution starts a kernel (seconds):

1. ``tclab schedule run night.yaml``: job ``tiny`` succeeds, job ``broken`` (same notebook,
   ``fail: true``) raises -> exit 1, one good and one ``*_FAILED`` folder, a summary line each;
2. ``run_jobs(again.yaml)``: job ``tiny`` again, now failing -> its earlier good run is untouched and
   index.html shows both runs of job ``tiny`` as one notebook+tag group.

Everything else (validation, the lock, the path rule) needs no kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from tclab import cli, jobs, runs

PARAMS_CELL = 'run_dir = None\nnum_steps = 2\nscale = 0.5\nmodel = "tiny"\nfail = False\n'


def write_notebook(path: Path) -> Path:
    """A thin notebook (no torch, no plots) that cooperates with tclab.runs; headline loss = num_steps * scale."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Tiny study\nDo scheduled jobs work?"),
        nbformat.v4.new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from tclab import runs\nrun = runs.open_run(run_dir)"),
        nbformat.v4.new_code_cell('if fail:\n    raise RuntimeError("boom on purpose")'),
        nbformat.v4.new_code_cell('run.write_summary({"headline": {"loss": num_steps * scale, "model": model}})'),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jobs(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def cli_schedule(*args: str) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(["schedule", "run", *args])
        except SystemExit as e:   # argparse errors
            rc = e.code
    return rc, out.getvalue().strip().splitlines(), err.getvalue()


def run_folders(reports: Path) -> list[Path]:
    return sorted(d for d in reports.iterdir() if d.is_dir() and not d.name.startswith(".")) if reports.is_dir() else []


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("sched")
    write_notebook(base / "notebooks" / "tiny_study.ipynb")
    (base / "notebooks" / "params").mkdir()
    (base / "notebooks" / "params" / "quick.yaml").write_text("num_steps: 3\nscale: 2.0\n")
    # jobs files live in base/jobs/: every path below is relative to that folder
    night = write_jobs(base / "jobs" / "night.yaml", {
        "reports": "../reports",
        "jobs": [
            {"name": "tiny", "notebook": "../notebooks/tiny_study.ipynb",
             "params_file": "../notebooks/params/quick.yaml", "params": {"num_steps": 4}},
            {"name": "broken", "notebook": "../notebooks/tiny_study.ipynb", "params": {"fail": True}},
        ]})
    rc1, out1, err1 = cli_schedule(str(night))
    reports = base / "reports"
    first = run_folders(reports)
    good = next(d for d in first if not d.name.endswith(runs.FAILED_SUFFIX))
    good_digest = tree_digest(good)

    again = write_jobs(base / "jobs" / "again.yaml", {
        "reports": "../reports",
        "jobs": [{"name": "tiny", "notebook": "../notebooks/tiny_study.ipynb", "params": {"fail": True}}]})
    lines: list[str] = []
    results2 = jobs.run_jobs(again, echo=lines.append)
    return SimpleNamespace(base=base, reports=reports, rc1=rc1, out1=out1, err1=err1, first=first, good=good,
                           good_digest=good_digest, results2=results2, lines2=lines)


# ---- executed jobs ------------------------------------------------------------------------------

def test_a_failing_job_makes_the_exit_status_nonzero_and_the_others_still_run(scheduled):
    assert scheduled.rc1 == 1, (scheduled.out1, scheduled.err1)
    names = [d.name for d in scheduled.first]
    assert len(names) == 2
    assert any(n.endswith("_tiny_study_tiny") for n in names)
    assert any(n.endswith("_tiny_study_broken" + runs.FAILED_SUFFIX) for n in names)
    failed = next(d for d in scheduled.first if d.name.endswith(runs.FAILED_SUFFIX))
    assert "boom on purpose" in (failed / "error.txt").read_text()
    assert json.loads((failed / "provenance.json").read_text())["status"] == "failed"


def test_job_parameters_merge_params_file_then_params(scheduled):
    used = yaml.safe_load((scheduled.good / "params.yaml").read_text())
    assert used["num_steps"] == 4 and used["scale"] == 2.0          # params wins over params_file
    assert json.loads((scheduled.good / "provenance.json").read_text())["tag"] == "tiny"   # tag = job name


def test_summary_lines_name_status_seconds_folder_and_headline(scheduled):
    ok_line, failed_line, total = scheduled.out1
    assert ok_line.startswith("ok") and " tiny " in ok_line and str(scheduled.good) in ok_line
    assert "loss=8" in ok_line and "model=tiny" in ok_line            # headline: num_steps * scale = 4 * 2.0
    assert failed_line.startswith("FAILED") and " broken " in failed_line
    assert runs.FAILED_SUFFIX in failed_line and "RuntimeError: boom on purpose" in failed_line
    for line in (ok_line, failed_line):
        seconds = float(line.split()[2].rstrip("s"))
        assert 0 < seconds < 300
    assert total.startswith("1 of 2 job(s) ok, 1 failed") and "index.html" in total


def test_a_failed_job_never_replaces_the_last_good_report(scheduled):
    [result] = scheduled.results2
    assert not result.ok and result.run_dir.name.endswith("_tiny_study_tiny" + runs.FAILED_SUFFIX)
    assert result.error == "RuntimeError: boom on purpose"
    assert scheduled.lines2 == [result.summary_line()] and scheduled.lines2[0].startswith("FAILED")
    assert scheduled.good.is_dir() and tree_digest(scheduled.good) == scheduled.good_digest
    assert len(run_folders(scheduled.reports)) == 3


def test_index_lists_the_runs_of_each_job_as_one_group(scheduled):
    infos = runs.list_runs(scheduled.reports)
    tiny = [r for r in infos if r.tag == "tiny"]
    assert [r.status for r in tiny] == ["failed", "ok"]               # newest first
    assert {r.group for r in tiny} == {("tiny_study", "tiny")}
    page = (scheduled.reports / "index.html").read_text()
    for d in run_folders(scheduled.reports):
        assert d.name in page
    assert "<td>tiny_study</td><td><code>tiny</code></td><td>2</td><td>1</td><td>1</td>" in page
    assert not (scheduled.reports / runs.STAGING_DIRNAME).exists()


# ---- checks before anything runs (no kernel) -----------------------------------------------------

@pytest.fixture
def project(tmp_path) -> Path:
    write_notebook(tmp_path / "notebooks" / "tiny_study.ipynb")
    return tmp_path


def good_job(**extra) -> dict:
    return {"name": "tiny", "notebook": "../notebooks/tiny_study.ipynb", **extra}


@pytest.mark.parametrize("content, complaints", [
    ({"reports": "../r", "jobs": [good_job()], "report": "x"},
     ["unknown key 'report'", "valid keys are reports, jobs"]),
    ({"reports": "../r", "jobs": [good_job(parms={"num_steps": 2})]},
     ["unknown key 'parms'", "valid keys are name, notebook, params, params_file, tag"]),
    ({"reports": "../r", "jobs": [good_job(params={"num_step": 2})]},
     ["unknown parameter 'num_step' (did you mean 'num_steps'?)", "defines: num_steps, scale, model, fail"]),
    ({"reports": "../r", "jobs": [good_job(notebook="../notebooks/missing.ipynb")]},
     ["missing.ipynb' not found", "relative to the jobs file's folder"]),
    ({"reports": "../r", "jobs": [good_job(params_file="nope.yaml")]}, ["parameter file", "nope.yaml' not found"]),
    ({"reports": "../r", "jobs": [good_job(), good_job()]}, ["used twice"]),
    ({"reports": "../r", "jobs": [{"notebook": "../notebooks/tiny_study.ipynb"}]}, ["'name' is missing"]),
    ({"jobs": [good_job()]}, ["'reports' is missing"]),
    ({"reports": "../r", "jobs": []}, ["non-empty list"]),
])
def test_invalid_jobs_files_are_refused_with_what_to_fix(project, content, complaints):
    path = write_jobs(project / "jobs" / "j.yaml", content)
    with pytest.raises(jobs.JobsFileError) as info:
        jobs.load_jobs(path)
    for c in complaints:
        assert c in str(info.value)
    assert "nothing was run" in str(info.value)


def test_every_job_is_checked_before_the_first_one_runs(project):
    # job 1 is fine, job 2 has a typo and job 3 a missing notebook: nothing may run, both are reported
    path = write_jobs(project / "jobs" / "j.yaml", {"reports": "../reports", "jobs": [
        good_job(), good_job(name="typo", params={"scal": 1.0}), good_job(name="gone", notebook="x.ipynb")]})
    rc, out, err = cli_schedule(str(path))
    assert rc == 2 and out == []
    assert "2 problems" in err and "'scal'" in err and "x.ipynb" in err
    assert not (project / "reports").exists()


def test_paths_are_relative_to_the_jobs_file_not_the_working_directory(project, monkeypatch):
    path = write_jobs(project / "jobs" / "j.yaml", {"reports": "../reports", "jobs": [good_job(tag="smoke")]})
    monkeypatch.chdir(project / "notebooks")
    plan = jobs.load_jobs(Path("..") / "jobs" / "j.yaml")
    assert plan.reports == project / "reports"
    assert plan.jobs[0].notebook == project / "notebooks" / "tiny_study.ipynb"
    assert plan.jobs[0].tag == "smoke" and plan.jobs[0].params == {}
    rc, out, _ = cli_schedule("--dry-run", str(path))
    assert rc == 0 and "1 job(s)" in out[0] and "tag=smoke" in out[1]


def test_a_held_lock_refuses_a_second_run_with_a_clear_message(project):
    path = write_jobs(project / "jobs" / "j.yaml", {"reports": "../reports", "jobs": [good_job()]})
    reports = project / "reports"
    with jobs.reports_lock(reports) as lock:
        assert lock == reports / jobs.LOCK_NAME
        with pytest.raises(jobs.ScheduleLockedError, match=r"another 'tclab schedule run' is writing to .*pid \d+"):
            jobs.run_jobs(path)
        rc, out, err = cli_schedule(str(path))
        assert rc == 2 and "nothing was run" in err
        # and from another process, as cron would start it
        proc = subprocess.run([sys.executable, "-m", "tclab.cli", "schedule", "run", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "another 'tclab schedule run'" in proc.stderr
    assert run_folders(reports) == []
    with jobs.reports_lock(reports):   # released on exit: it can be taken again
        pass


def test_example_jobs_file_is_valid():
    plan = jobs.load_jobs(Path(__file__).resolve().parents[1] / "jobs" / "example.yaml")
    assert [j.notebook.name for j in plan.jobs] == ["01_token_redundancy.ipynb", "05_inhouse_report.ipynb"]
    for job in plan.jobs:
        assert job.params["images"] == "shapes"  # the built-in stand-in set, found from any folder
        assert (plan.path.parent / "../data/shapes").resolve() == __import__("tclab.paths").paths.resolve_images("shapes")
    assert plan.reports == Path(__file__).resolve().parents[1] / "reports"
