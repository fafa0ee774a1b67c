"""Fault suite, runs and the schedule (issue 14, points 5 and 6), on real processes where it matters:
a stopped or hung run leaves a true record (FAILED, with the reason, in the index), never a stranded
or half-written folder, and the schedule goes on or stops cleanly."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from tclab import jobs, runs

TCLAB = [sys.executable, "-c", "import sys; from tclab.cli import main; sys.exit(main())"]


def write_notebook(path: Path) -> Path:
    """A notebook that says when it started, then sleeps ``sleep_s``: a hung job on demand."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Sleeper\nA notebook that hangs on purpose."),
        nbformat.v4.new_code_cell("run_dir = None\nsleep_s = 0.0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from tclab import runs\nrun = runs.open_run(run_dir)\n"
                                  'run.path("started").write_text("1")'),
        nbformat.v4.new_code_cell("import time\ntime.sleep(sleep_s)"),
        nbformat.v4.new_code_cell('run.write_summary({"headline": {"slept_s": sleep_s}})'),
    ]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def sleeper(tmp_path):
    return write_notebook(tmp_path / "sleeper.ipynb")


def wait_for(predicate, timeout=90.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def started(reports: Path) -> bool:
    return any((reports / runs.STAGING_DIRNAME).glob("*/started"))


def folders(reports: Path) -> list[Path]:
    return sorted(p for p in reports.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_run_is_marked_failed_with_the_reason(sleeper, tmp_path, sig):
    reports = tmp_path / "reports"
    proc = subprocess.Popen([*TCLAB, "run", str(sleeper), "-p", "sleep_s", "120", "--reports", str(reports)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: started(reports))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    (failed,) = folders(reports)
    assert failed.name.endswith(runs.FAILED_SUFFIX) and (failed / "started").is_file()
    prov = json.loads((failed / "provenance.json").read_text())
    assert prov["status"] == "failed" and prov["run"] == failed.name
    if sig != signal.SIGINT:
        assert f"stopped by {signal.Signals(sig).name}" in (failed / "error.txt").read_text()
    assert failed.name in (reports / "index.html").read_text()
    assert not (reports / runs.STAGING_DIRNAME).exists()  # nothing stranded
    assert "Traceback" not in err


def test_a_hung_job_times_out_and_the_next_job_runs(sleeper, tmp_path):
    (tmp_path / "jobs.yaml").write_text(
        f"reports: reports\ntimeout: 600\njobs:\n"
        f"  - {{name: hangs, notebook: {sleeper}, params: {{sleep_s: 300}}, timeout: 8}}\n"
        f"  - {{name: quick, notebook: {sleeper}}}\n")
    t0 = time.time()
    proc = subprocess.run([*TCLAB, "schedule", "run", str(tmp_path / "jobs.yaml")], capture_output=True, text=True,
                          timeout=240)
    assert time.time() - t0 < 120  # not the 300 s the first job asked for
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("FAILED  hangs") and "timed out after 8 s" in lines[0]
    assert lines[1].startswith("ok      quick")
    hung = [p for p in folders(tmp_path / "reports") if "hangs" in p.name]
    assert len(hung) == 1 and hung[0].name.endswith(runs.FAILED_SUFFIX)


def test_sigterm_stops_the_schedule_cleanly(sleeper, tmp_path):
    reports = tmp_path / "reports"
    (tmp_path / "jobs.yaml").write_text(
        f"reports: reports\njobs:\n  - {{name: first, notebook: {sleeper}, params: {{sleep_s: 300}}}}\n"
        f"  - {{name: second, notebook: {sleeper}}}\n  - {{name: third, notebook: {sleeper}}}\n")
    proc = subprocess.Popen([*TCLAB, "schedule", "run", str(tmp_path / "jobs.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: started(reports))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = out.splitlines()
    assert lines[0].startswith("FAILED  first") and "stopped by SIGTERM" in lines[0]
    assert lines[1].startswith("SKIPPED second") and "skipped: scheduler stopped by SIGTERM" in lines[1]
    assert lines[2].startswith("SKIPPED third")
    assert "0 of 3 job(s) ok, 1 failed, 2 skipped" in err
    assert (reports / "index.html").is_file() and "Traceback" not in err
    with jobs.reports_lock(reports):  # the lock was released
        pass


def test_leftovers_of_a_dead_run_are_marked_failed_and_a_live_one_is_left_alone(sleeper, tmp_path):
    reports = tmp_path / "reports"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        for name, pid in (("20260101T000000Z_x_dead", dead.pid), ("20260101T000001Z_x_live", live.pid)):
            d = reports / runs.STAGING_DIRNAME / name
            d.mkdir(parents=True)
            (d / ".runner.pid").write_text(f"{pid}\n")
            (d / "provenance.json").write_text(json.dumps({"status": "running", "run": name}))
        runs.run_notebook(sleeper, {}, reports, progress_bar=False)
        marked = reports / ("20260101T000000Z_x_dead" + runs.FAILED_SUFFIX)
        assert marked.is_dir() and f"pid {dead.pid}) is gone" in (marked / "error.txt").read_text()
        assert json.loads((marked / "provenance.json").read_text())["status"] == "failed"
        assert (reports / runs.STAGING_DIRNAME / "20260101T000001Z_x_live").is_dir()
        assert marked.name in (reports / "index.html").read_text()
    finally:
        live.kill()


def test_a_failure_at_the_final_move_keeps_the_result_and_says_where(sleeper, tmp_path, monkeypatch):
    real = os.rename

    def refuse(src, dst):
        if runs.STAGING_DIRNAME in str(src):
            raise PermissionError(13, "Permission denied")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(runs.RunFailedError, match=r"could not be moved into .*the complete result is in") as e:
        runs.run_notebook(sleeper, {}, tmp_path / "reports", progress_bar=False)
    staged = e.value.run_dir
    assert (staged / "summary.json").is_file() and (staged / "report.html").is_file()


def test_an_unwritable_or_full_reports_folder_is_refused_before_anything_runs(sleeper, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(runs.ParameterError, match="cannot be written"):
        runs.run_notebook(sleeper, {}, tmp_path / "a-file" / "reports", progress_bar=False)
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(runs.ParameterError, match="has only 1 MiB free"):
        runs.run_notebook(sleeper, {}, tmp_path / "reports", progress_bar=False)
    assert not any((tmp_path / "reports").iterdir())


def test_two_runs_with_one_tag_in_one_second_each_name_their_own_folder(sleeper, tmp_path, monkeypatch):
    import datetime as dt

    fixed = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(runs.execution, "_utc_now", lambda: fixed)
    a = runs.run_notebook(sleeper, {}, tmp_path / "reports", tag="same", progress_bar=False)
    b = runs.run_notebook(sleeper, {}, tmp_path / "reports", tag="same", progress_bar=False)
    assert a != b and b.name == a.name + "-2"
    for d in (a, b):
        assert json.loads((d / "provenance.json").read_text())["run"] == d.name


def _hammer(reports: str, n: int) -> None:
    for _ in range(n):
        runs.write_index(reports)


def test_concurrent_index_writers_never_tear_it(sleeper, tmp_path):
    reports = tmp_path / "reports"
    runs.run_notebook(sleeper, {}, reports, progress_bar=False)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(reports), 150)) for _ in range(3)]
    for p in procs:
        p.start()
    torn = 0
    while any(p.is_alive() for p in procs):
        text = (reports / "index.html").read_text()
        torn += not text.rstrip().endswith("</html>")
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0] and torn == 0
    assert not list(reports.glob(".index.html.*.tmp"))  # no temporary file left behind


def test_runs_clean_marks_dead_leftovers_from_the_command_line(tmp_path, capsys):
    from tclab.cli import main

    d = tmp_path / "reports" / runs.STAGING_DIRNAME / "20260101T000000Z_x_gone"
    d.mkdir(parents=True)  # no pid file at all: an old runner's leftovers
    young = tmp_path / "reports" / runs.STAGING_DIRNAME / "20260101T000001Z_x_starting"
    young.mkdir()  # no pid file yet, but just made: a run starting, left alone
    old = time.time() - 2 * runs.STAGING_GRACE_S
    os.utime(d, (old, old))
    assert main(["runs", "clean", "--reports", str(tmp_path / "reports")]) == 0
    assert "1 dead run(s) marked failed" in capsys.readouterr().out
    assert (tmp_path / "reports" / "20260101T000000Z_x_gone_FAILED" / "error.txt").is_file()
    assert young.is_dir()
    other_host = tmp_path / "reports" / runs.STAGING_DIRNAME / "20260101T000002Z_x_elsewhere"
    other_host.mkdir()
    (other_host / ".runner.pid").write_text("999999 some-other-machine\n")  # a shared folder: not ours to judge
    assert main(["runs", "clean", "--reports", str(tmp_path / "reports")]) == 0
    assert "no leftovers" in capsys.readouterr().out and other_host.is_dir()


def test_the_index_links_each_jobs_latest_and_last_good_run(sleeper, tmp_path):
    reports = tmp_path / "reports"
    good = runs.run_notebook(sleeper, {}, reports, tag="job", progress_bar=False)
    with pytest.raises(runs.RunFailedError):
        runs.run_notebook(sleeper, {"sleep_s": -1.0}, reports, tag="job", progress_bar=False)  # sleep(-1) raises
    page = (reports / "index.html").read_text()
    by_tag = page.split("<h2>By notebook and tag</h2>", 1)[1]
    assert 'class="status failed">failed<' in by_tag and f'href="{good.name}/report.html"' in by_tag
    assert "last good" in by_tag


def test_a_schedule_into_an_unwritable_folder_runs_nothing_and_exits_2(sleeper, tmp_path, capsys):
    from tclab.cli import main

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "jobs.yaml").write_text(f"reports: a-file/reports\njobs:\n  - {{name: a, notebook: {sleeper}}}\n")
    assert main(["schedule", "run", str(tmp_path / "jobs.yaml")]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_a_signal_while_a_run_is_being_finished_waits_until_the_folder_is_in_place(sleeper, tmp_path, monkeypatch):
    real = runs.render_html

    def render_and_get_stopped(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of finishing the run

    monkeypatch.setattr(runs.execution, "render_html", render_and_get_stopped)
    with pytest.raises(runs.RunStopped, match="SIGTERM"):
        runs.run_notebook(sleeper, {}, tmp_path / "reports", progress_bar=False)
    (done,) = folders(tmp_path / "reports")
    assert (done / "summary.json").is_file() and not (tmp_path / "reports" / runs.STAGING_DIRNAME).exists()
    assert done.name in (tmp_path / "reports" / "index.html").read_text()


def test_a_timeout_off_the_main_thread_is_refused_not_ignored(sleeper, tmp_path):
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(_try(lambda: runs.run_notebook(
        sleeper, {}, tmp_path / "reports", progress_bar=False, timeout_s=2))))
    t.start()
    t.join(120)
    assert isinstance(got[0], ValueError) and "needs the main thread" in str(got[0])


def _try(f):
    try:
        return f()
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e

