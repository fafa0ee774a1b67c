"""Scheduled reports: run a list of notebook jobs into ``reports/`` (``tclab schedule run JOBS.yaml``).

A jobs file names the reports folder and the jobs, run in order::

    # jobs/nightly.yaml
    reports: ../reports                  # run folders and index.html go here
    jobs:
      - name: redundancy-smoke           # also the run tag (unless 'tag' is given)
        notebook: ../notebooks/01_token_redundancy.ipynb
        params_file: ../notebooks/params/01_smoke.yaml   # optional preset, as `tclab run -f`
        params: {num_steps: 10}          # optional; wins over params_file, as `tclab run -p`
        tag: smoke                       # optional; default: the job's name
        timeout: 1800                    # optional, seconds; default: the file's 'timeout', else none
      - name: inhouse-nightly
        notebook: ../notebooks/05_inhouse_report.ipynb
        gates:                           # optional quality gates on the run's headline (tclab.gates)
          psnr_min: 30                   #   dB vs full compute; fails only if its whole interval is below
          class_consistency_drop_max: 0.05
          flop_speedup_min: 1.8          #   alias speedup_min
          time_speedup_min: 1.2
          worst_image_psnr_min: 22
          psnr_drop_max: 1.0             #   dB, against the job's last good run
          min: {ssim: 0.9}               #   any headline figure; also max, drop_max, rise_max
        recommended_file: ../deploy/tokencache.json   # optional; default <reports>/recommended/<name>.json
        on_failure: [python, alerts/chat.py]          # optional; wins over the file's on_failure
    on_failure: 'mail -s "tclab nightly" team@example.com'  # optional, every job's; a string runs in the shell

A top-level ``timeout: SECONDS`` is the default for every job. A job past its timeout is stopped
(its kernel too), marked FAILED ("timed out after ..."), and the next job runs, so one hung job
cannot block the schedule. SIGTERM (systemd's ``TimeoutStartSec``, ``kill``) or SIGHUP stops the
current job cleanly (marked FAILED, "stopped by SIGTERM"), prints a summary line for every job (the
rest: "skipped: scheduler stopped"), rewrites the index, and exits 143 (SIGHUP: 129).

**Paths.** Every relative path is read from the folder holding the jobs file (absolute paths and
``~`` work too), so the file means the same from cron, systemd or any working directory:
``reports``, ``notebook`` and ``params_file`` here, and path parameters such as ``images`` or
``model`` in the notebook (the runner hands it this folder, ``tclab.paths``). ``images: shapes``
names the committed stand-in set.

**What a run does.**

1. Reads and checks the whole file before anything runs: unknown keys are refused (the valid
   ones are named), every notebook and params file must exist, every parameter name must be one
   the notebook's ``parameters`` cell defines (:func:`tclab.runs.validate_parameters`), job names
   must be unique. All problems are reported together (:class:`JobsFileError`).
2. Takes an exclusive lock on ``<reports>/.tclab-schedule.lock`` (``fcntl.flock``, non-blocking):
   a second ``tclab schedule run`` on the same reports folder stops at once with
   :class:`ScheduleLockedError` naming the holder, rather than interleaving with the first. The
   kernel drops the lock when the holding process exits, however it exits, so a crash leaves no
   stale lock to clean up (the file itself stays; it is just a lock target).
3. Runs each job with :func:`tclab.runs.run_notebook` under the job's tag. A failing job becomes
   a ``*_FAILED`` run folder and the next job still runs; earlier good runs are never touched.
   Because the tag defaults to the job's name, index.html shows each job's runs over time as one
   notebook+tag group, with its headline numbers compared against the previous good run.
4. A job with ``gates`` is judged right after its run finished (:mod:`tclab.gates`): every gate is
   checked on the run's summary.json (and, for ``*_drop_max`` / ``rise_max``, against the job's last
   good run), the verdict goes into the run folder as ``gates.json``, and a failed gate marks the run
   ``GATE FAILED`` in index.html and the run table. The run is kept either way. Only a run that
   passed replaces the job's *recommended setting* (``recommended_file``, default
   ``<reports>/recommended/<job name>.json``: the TokenCache setting, the run it came from, its gates
   and figures; written atomically), so a failed gate leaves the file byte for byte as it was and
   the deployment that reads it keeps the last setting that passed. The summary line of a gate
   failure starts ``GATE FAILED``, names each failed gate and by how much, and says which run the
   recommended setting is kept from ("no setting has passed yet" before the first pass).
5. A job that failed to run or failed a gate calls its ``on_failure`` command, else the file's
   (``on_failure: null`` in a job turns the file's off for it): a string runs through ``/bin/sh``, a
   list as argv, in the jobs file's folder, for at most 60 s (its process group is stopped after).
   It gets the alert as JSON (:func:`alert_document`: version, job, status ``failed`` or
   ``gate_failed``, run_dir, error, summary_line, gates, failed_gates, compared_with, headline,
   recommended_file, recommended_setting_kept_from, index, reports, jobs_file) on stdin and in
   ``TCLAB_ALERT_JSON``, plus ``TCLAB_JOB``, ``TCLAB_STATUS``, ``TCLAB_RUN_DIR``, ``TCLAB_REPORTS`` and
   ``TCLAB_FAILED_GATES`` (comma-separated names). Mail, chat or monitoring plug in here; tclab knows
   no service. A command that fails, cannot start or times out prints one warning line (stderr)
   naming it; it never changes the exit status nor stops the next job.
6. Rewrites ``<reports>/index.html`` and returns one :class:`JobResult` per job; the CLI prints
   their summary lines and exits with (:func:`exit_status`)::

       0      every job ran and passed its gates
       1      a job failed to run (raised, timed out, its gates could not be checked); wins over 3
       3      every job ran, and a quality gate failed (the runs are kept, marked GATE FAILED)
       2      nothing ran: the jobs file is invalid, or the reports folder is locked or unwritable
       128+N  stopped by signal N (143: SIGTERM, 129: SIGHUP)

Not locked against: a hand-started ``tclab run`` into the same folder. That is safe anyway (every
run folder is staged and renamed into place), it only is not serialised with the schedule.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


from . import gates as _gates
from . import runs
from .runs.execution import _signals_deferred   # not re-exported by tclab.runs: the run finisher's own guard

__all__ = ["TOP_LEVEL_KEYS", "JOB_KEYS", "LOCK_NAME", "EXIT_OK", "EXIT_JOB_FAILED", "EXIT_BAD_FILE",
           "EXIT_GATE_FAILED", "ALERT_TIMEOUT_S", "ALERT_VERSION", "Job", "JobsFile", "JobResult", "JobsFileError",
           "ScheduleLockedError", "load_jobs", "reports_lock", "run_jobs", "alert_document", "exit_status"]

#: Keys a jobs file may hold at the top level (reports and jobs required).
TOP_LEVEL_KEYS = ("reports", "jobs", "timeout", "on_failure")
#: Keys a job may hold: name and notebook required, the rest optional.
JOB_KEYS = ("name", "notebook", "params", "params_file", "tag", "timeout", "gates", "on_failure", "recommended_file")
#: The lock file inside the reports folder.
LOCK_NAME = ".tclab-schedule.lock"

#: Exit statuses of ``tclab schedule run`` (a signal N: 128 + N).
EXIT_OK = 0              # every job ran and passed its gates
EXIT_JOB_FAILED = 1      # a job failed to run (wins over a failed gate)
EXIT_BAD_FILE = 2        # nothing ran: the jobs file is invalid, the reports folder is locked or unwritable
EXIT_GATE_FAILED = 3     # every job ran, and a quality gate of one failed
#: Seconds an ``on_failure`` command may take before it is stopped (its whole process group).
ALERT_TIMEOUT_S = 60.0
#: The layout of the JSON document an ``on_failure`` command receives.
ALERT_VERSION = 1


class JobsFileError(ValueError):
    """The jobs file cannot be run as written; raised before any job runs. Lists every problem."""


class ScheduleLockedError(RuntimeError):
    """Another scheduled run holds the lock on this reports folder."""


@dataclass
class Job:
    """One checked job: absolute notebook path, merged parameters (params_file, then params), tag."""

    name: str
    notebook: Path
    params: dict[str, Any]
    tag: str
    timeout_s: float | None = None
    gates: "_gates.GateSpec | None" = None          # None: the job has no quality gates
    on_failure: str | list[str] | None = None       # the job's alert command, else the file's, else None
    recommended_file: Path | None = None            # where a gated job's recommended setting goes


@dataclass
class JobsFile:
    path: Path
    reports: Path
    jobs: list[Job]


@dataclass
class JobResult:
    """The outcome of one job. ``run_dir`` is None only if the job failed before making a folder.

    ``status``: ``"ok"`` (ran, and passed its gates if it has any), ``"gate_failed"`` (ran, a gate
    failed: the run is kept, marked GATE FAILED), ``"failed"`` (did not run to the end) or
    ``"skipped"``. For a gated job, ``recommended_from`` is the run its recommended-setting file
    names after this job (None: no setting has passed yet) and ``recommended_updated`` whether this
    run replaced it. ``alert``: None (no command called), ``"sent"``, or why the command failed.
    """

    name: str
    status: str                          # "ok", "gate_failed", "failed" or "skipped"
    seconds: float
    run_dir: Path | None
    headline: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    gates: "_gates.GateReport | None" = None
    recommended_file: Path | None = None
    recommended_from: str | None = None
    recommended_updated: bool = False
    recommended_note: str | None = None  # the recommended file could not be read (it is left as it is)
    alert: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def gate_failed(self) -> bool:
        return self.status == "gate_failed"

    def _recommended_text(self) -> str:
        if self.recommended_file is None:
            return ""
        if self.recommended_note:
            return self.recommended_note
        if self.ok:   # passed: it replaced the setting, or the run recommends none (nothing to say)
            return f"recommended setting updated from this run: {self.recommended_file}" \
                if self.recommended_updated else ""
        if self.recommended_from:
            return f"recommended setting kept from {self.recommended_from}"
        return "no setting has passed yet"

    def summary_line(self, max_numbers: int = 6) -> str:
        """``ok      redundancy-smoke   41.2s  reports/2025..._smoke  frac_small=0.81 rho=0.93``; a gate
        failure: ``GATE FAILED inhouse  63.0s  reports/...  psnr_min: psnr 27.1 dB < 30 dB by 2.9 dB ...;
        recommended setting kept from <run>``."""
        items = list(self.headline.items())
        numbers = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:max_numbers])
        if len(items) > max_numbers:
            numbers += f" (+{len(items) - max_numbers} more)"
        if self.ok:
            tail = numbers
            if self.gates is not None:
                unsure = [r.name for r in self.gates.not_proven]
                tail += f"  gates passed ({len(self.gates.results)}" + (
                    f"; not proven: {', '.join(unsure)})" if unsure else ")")
        elif self.gate_failed:
            failed = self.gates.failed if self.gates is not None else []
            tail = (f"{len(failed)} gate{'s' if len(failed) != 1 else ''} failed: "
                    + (self.gates.failed_text() if self.gates is not None else ""))
        elif self.status == "failed":
            tail = f"error: {self.error}"
        else:
            tail = f"skipped: {self.error}"
        if (rec := self._recommended_text()) and self.status != "skipped":
            tail += f"; {rec}" if not self.ok else f"  {rec}"
        label = "ok" if self.ok else "GATE FAILED" if self.gate_failed else self.status.upper()
        return (f"{label:7s} {self.name}  {self.seconds:.1f}s  "
                f"{self.run_dir if self.run_dir is not None else '(no run folder)'}  {tail}").rstrip()


# ---- reading and checking a jobs file -----------------------------------------------------------

def _resolve(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _unknown_keys(found, valid, where: str) -> str | None:
    unknown = [str(k) for k in found if k not in valid]
    if not unknown:
        return None
    return f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; " \
           f"valid keys are {', '.join(valid)}"


def _timeout(value: Any, where: str, problems: list[str]) -> float | None:
    """A timeout in seconds (a positive, finite number) or None; a bad one is added to ``problems``."""
    import math

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        problems.append(f"{where} must be a positive number of seconds (e.g. 1800), got {value!r}")
        return None
    return float(value)


def _command(value: Any, where: str, problems: list[str]) -> str | list[str] | None:
    """An ``on_failure`` command: a non-empty string (run by the shell) or list of strings (argv)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) and a for a in value):
        return list(value)
    problems.append(f"{where} must be a command: a string run by the shell (e.g. 'python alert.py') or a list "
                    f"of arguments (e.g. [python, alert.py]), got {value!r}")
    return None


def load_jobs(jobs_file: str | os.PathLike) -> JobsFile:
    """Read and check a jobs file (see the module docstring); nothing runs and nothing is written.

    Raises :class:`JobsFileError` listing every problem found, so one edit fixes them all.
    """
    path = Path(jobs_file).expanduser()
    data = runs.read_yaml(path, "jobs file", JobsFileError)
    if not isinstance(data, dict):
        raise JobsFileError(f"jobs file {str(path)!r} must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)} "
                            f"(got a {type(data).__name__}); see jobs/example.yaml")
    base = path.resolve().parent
    problems: list[str] = []
    if (msg := _unknown_keys(data, TOP_LEVEL_KEYS, str(path))):
        problems.append(msg)
    default_timeout = _timeout(data.get("timeout"), f"{path}: 'timeout'", problems)
    default_alert = _command(data.get("on_failure"), f"{path}: 'on_failure'", problems)
    if not data.get("reports"):
        problems.append(f"{path}: 'reports' is missing: the folder (relative to the jobs file) for run folders")
    reports = _resolve(data.get("reports") or ".", base)
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        problems.append(f"{path}: 'jobs' must be a non-empty list of jobs (each a mapping with "
                        f"{', '.join(JOB_KEYS)})")
        raw_jobs = []

    jobs: list[Job] = []
    seen: set[str] = set()
    recommended_by: dict[Path, str] = {}     # a recommended-setting file -> the job writing it
    for i, raw in enumerate(raw_jobs):
        where = f"{path} job {i + 1}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping with keys {', '.join(JOB_KEYS)}, got {raw!r}")
            continue
        name = raw.get("name")
        if isinstance(name, str) and name.strip():
            where = f"{path} job {i + 1} ({name!r})"
        if (msg := _unknown_keys(raw, JOB_KEYS, where)):
            problems.append(msg)
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: 'name' is missing (a short, unique text; it is also the run tag)")
            continue
        if name in seen:
            problems.append(f"{where}: the name {name!r} is used twice; job names must be unique")
        seen.add(name)
        tag = raw.get("tag", name)
        try:
            runs._safe_name(str(tag), "tag")
        except runs.ParameterError as e:
            problems.append(f"{where}: {e}")
            continue
        if not raw.get("notebook"):
            problems.append(f"{where}: 'notebook' is missing (path to the .ipynb, relative to the jobs file)")
            continue
        notebook = _resolve(raw["notebook"], base)
        if not notebook.is_file():
            problems.append(f"{where}: notebook {str(notebook)!r} not found (paths are relative to the "
                            f"jobs file's folder {str(base)!r})")
            continue
        params_raw = raw.get("params") or {}
        if not isinstance(params_raw, dict):
            problems.append(f"{where}: 'params' must be a mapping 'name: value', got {params_raw!r}")
            continue
        from .labels import LabelSpecError   # here, not at import: it loads torch

        try:
            params_file = _resolve(raw["params_file"], base) if raw.get("params_file") else None
            merged = runs.load_parameters(params_file)
            merged.update({str(k): v for k, v in params_raw.items()})
            runs.validate_parameters(merged, runs.notebook_parameters(notebook), notebook=f"notebook {str(notebook)!r}")
            runs.check_parameter_values(merged, notebook)
            from .paths import check_path_parameters

            check_path_parameters(merged, base)
            if "labels" in merged:
                from .labels import check_label_folders

                check_label_folders({**runs.notebook_parameters(notebook), **merged}, base)
        except (runs.ParameterError, FileNotFoundError, LabelSpecError) as e:
            problems.append(f"{where}: {e}")
            continue
        timeout = _timeout(raw.get("timeout"), f"{where}: 'timeout'", problems) if "timeout" in raw else default_timeout
        alert = _command(raw.get("on_failure"), f"{where}: 'on_failure'", problems)
        spec = recommended = None
        if "gates" in raw:
            try:
                spec = _gates.GateSpec.from_dict(raw["gates"], f"{where}: 'gates'")
            except _gates.GateSpecError as e:
                problems.append(str(e))
        if raw.get("recommended_file") and "gates" not in raw:
            problems.append(f"{where}: 'recommended_file' needs 'gates': only a run that passed its gates may "
                            "replace the recommended setting")
        elif spec is not None:
            if raw.get("recommended_file"):
                recommended = _resolve(raw["recommended_file"], base)
            elif runs._safe_name(name, "job name", max_len=200) == name:
                recommended = _gates.default_recommended_file(reports, name)
            else:
                problems.append(f"{where}: the job name {name!r} is not a plain file name, so it cannot name its "
                                "recommended-setting file; set 'recommended_file' (relative to the jobs file)")
            if recommended is not None and recommended in recommended_by:
                problems.append(f"{where}: recommended_file {str(recommended)!r} is also job "
                                f"{recommended_by[recommended]!r}'s; each gated job needs its own")
            elif recommended is not None:
                recommended_by[recommended] = name
        jobs.append(Job(name=name, notebook=notebook, params=merged, tag=str(tag), timeout_s=timeout, gates=spec,
                        on_failure=alert if "on_failure" in raw else default_alert, recommended_file=recommended))

    if problems:
        raise JobsFileError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in {path}; "
                            "nothing was run:\n  - " + "\n  - ".join(problems))
    return JobsFile(path=path.resolve(), reports=reports, jobs=jobs)


# ---- the lock -----------------------------------------------------------------------------------

@contextlib.contextmanager
def reports_lock(reports_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<reports_dir>/.tclab-schedule.lock`` exclusively, or raise :class:`ScheduleLockedError`.

    ``fcntl.flock`` with ``LOCK_NB``: never waits. The holder's pid, host and start time are written
    into the file for the error message. The lock belongs to the open file, so the kernel releases
    it when the process ends, even on a crash or ``kill -9``.
    """
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    lock_path = reports / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = Path(lock_path).read_text(errors="replace").strip() or "unknown process"
            raise ScheduleLockedError(
                f"another 'tclab schedule run' is writing to {reports} ({holder}); nothing was run. "
                "Wait for it to finish, or point this jobs file at another 'reports' folder. "
                f"The lock ({lock_path}) is released automatically when that process exits.") from None
        os.ftruncate(fd, 0)
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}, started {started}\n".encode())
        yield lock_path
    finally:
        os.close(fd)   # releases the flock


# ---- running --------------------------------------------------------------------------------------

def _warn_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_jobs(jobs_file: str | os.PathLike | JobsFile, *, echo: Callable[[str], None] | None = print,
             progress_bar: bool = False, warn: Callable[[str], None] | None = _warn_stderr) -> list[JobResult]:
    """Check the jobs file, take the reports lock, run every job in order; one result per job.

    ``echo`` receives each job's summary line as soon as the job ends (``None``: silent); ``warn``
    a line when an ``on_failure`` command fails (default: stderr). A failing or timed-out job does
    not stop the others; check ``all(r.ok for r in results)`` (``r.gate_failed``: ran, a gate failed).
    A gated job's gates are checked right after its run (``gates.json`` in the run folder) and its
    recommended-setting file is replaced only when they passed; then a failed or gate-failed job's
    ``on_failure`` command is called. Raises :class:`JobsFileError` (bad file) or
    :class:`ScheduleLockedError` (folder busy) before any job runs. ``reports/index.html`` is
    rewritten at the end. SIGTERM / SIGHUP stop the current job (marked FAILED; its alert is still
    sent), skip the rest and raise :class:`SchedulerStopped` with every job's result, after the index
    is written and the lock released. ``jobs_file`` may also be the :class:`JobsFile` of :func:`load_jobs`.
    """
    plan = jobs_file if isinstance(jobs_file, JobsFile) else load_jobs(jobs_file)
    runs.check_reports_writable(plan.reports)  # nothing can run into an unwritable or full folder: say so once
    results: list[JobResult] = []
    stopped: runs.RunStopped | None = None
    with reports_lock(plan.reports), runs._stoppable():
        for job in plan.jobs:
            if stopped is not None:
                result = JobResult(job.name, "skipped", 0.0, None, {}, f"scheduler {stopped}")
            else:
                t0 = time.perf_counter()
                try:
                    result = _run_job(plan, job, progress_bar)
                except runs.RunStopped as e:  # the scheduler was told to stop: this job failed, the rest skip
                    stopped = e
                    result = JobResult(job.name, "failed", time.perf_counter() - t0, _latest_failed(plan, job), {},
                                       str(e))
                if job.gates is not None:
                    with _signals_deferred() as received:   # quick, and the verdict must not be cut in half
                        result = _judge(plan, job, result)
                    if received and stopped is None:
                        stopped = runs.RunStopped(f"stopped by {received[0].name}", int(received[0]))
            results.append(result)
            if echo is not None:
                echo(result.summary_line())
            if result.status in ("failed", "gate_failed") and job.on_failure is not None:
                try:
                    result.alert = _send_alert(plan, job, result, warn)
                except runs.RunStopped as e:   # stopped while the alert ran: its process group is gone
                    result.alert = f"interrupted: {e}"
                    stopped = stopped or e
        runs.refresh_index(plan.reports)
    if stopped is not None:
        raise SchedulerStopped(results, stopped)
    return results


def _run_job(plan: JobsFile, job: Job, progress_bar: bool) -> JobResult:
    t0 = time.perf_counter()
    run_dir: Path | None = None
    error: str | None = None
    try:
        run_dir = runs.run_notebook(job.notebook, job.params, plan.reports, tag=job.tag, progress_bar=progress_bar,
                                    caller_cwd=plan.path.parent, timeout_s=job.timeout_s)
    except runs.RunFailedError as e:
        run_dir = e.run_dir
        error = runs.read_json(run_dir / "provenance.json").get("error") or str(e)
    except Exception as e:  # noqa: BLE001 - one broken job (disk, kernel) must not stop the rest
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    summary = runs.read_json(run_dir / "summary.json") if run_dir is not None else {}
    headline = summary.get("headline") if isinstance(summary.get("headline"), dict) else {}
    return JobResult(job.name, "failed" if error else "ok", seconds, run_dir, headline, error)


def _judge(plan: JobsFile, job: Job, result: JobResult) -> JobResult:
    """A gated job after its run: check the gates (a run that finished), write ``gates.json``, replace the
    recommended-setting file only if they passed, and say which run it names now. A failure of this
    machinery (a disk error) fails the job: a verdict nobody could write must not look like a pass."""
    assert job.gates is not None and job.recommended_file is not None
    result.recommended_file = job.recommended_file
    if result.ok and result.run_dir is not None:
        try:
            summary = runs.read_json(result.run_dir / "summary.json")
            base = _gates.last_good_run(plan.reports, job.notebook.resolve().stem, job.tag,
                                        exclude=result.run_dir.name) if job.gates.compares else None
            previous = runs.read_json(base / "summary.json") if base is not None else None
            report = _gates.evaluate_gates(job.gates, summary, previous, job=job.name,
                                           compared_with=base.name if base is not None else None)
            _gates.write_gate_report(result.run_dir, report)
            result.gates = report
        except Exception as e:  # noqa: BLE001 - a broken verdict must not stop the other jobs
            result.status, result.error = "failed", f"quality gates could not be checked: {type(e).__name__}: {e}"
        else:
            if not report.passed:
                result.status = "gate_failed"
            else:
                try:
                    result.recommended_updated = _gates.write_recommended(
                        job.recommended_file, job.name, result.run_dir, summary, report) is not None
                except Exception as e:  # noqa: BLE001 - the deployment keeps the old setting: say so, loudly
                    result.status, result.error = "failed", (
                        f"passed its gates, but the recommended setting could not be written to "
                        f"{job.recommended_file}: {type(e).__name__}: {e}")
            with contextlib.suppress(Exception):   # the index shows the mark now (and again at the end)
                runs.refresh_index(plan.reports)
    try:
        current = _gates.read_recommended(job.recommended_file)
        result.recommended_from = current.from_run if current is not None else None
    except _gates.RecommendedFileError as e:
        result.recommended_note = f"recommended file unreadable, left as it is ({e})"
    return result


# ---- alerts ---------------------------------------------------------------------------------------------

def alert_document(plan: JobsFile, job: Job, result: JobResult) -> dict[str, Any]:
    """The JSON an ``on_failure`` command receives (stdin, and ``TCLAB_ALERT_JSON``), version :data:`ALERT_VERSION`."""
    gates = result.gates.to_dict()["gates"] if result.gates is not None else []
    return {
        "version": ALERT_VERSION, "job": job.name, "status": result.status,
        "run_dir": str(result.run_dir) if result.run_dir is not None else None,
        "error": result.error, "summary_line": result.summary_line(),
        "gates": gates, "failed_gates": [g["name"] for g in gates if not g["passed"]],
        "compared_with": result.gates.compared_with if result.gates is not None else None,
        "headline": result.headline,
        "recommended_file": str(result.recommended_file) if result.recommended_file is not None else None,
        "recommended_setting_kept_from": None if result.recommended_updated else result.recommended_from,
        "index": str(plan.reports / "index.html"), "reports": str(plan.reports), "jobs_file": str(plan.path),
    }


def _send_alert(plan: JobsFile, job: Job, result: JobResult, warn: Callable[[str], None] | None) -> str:
    """Run the job's ``on_failure`` command (cwd: the jobs file's folder) with the alert JSON on stdin and in
    the environment; "sent", or the warning given (a failing command never changes the job's outcome)."""
    doc = alert_document(plan, job, result)
    text = json.dumps(doc, default=str)
    if len(text) >= 100_000:   # Linux allows 128 KiB a variable: the environment's copy drops the headline
        in_env = json.dumps({**doc, "headline": "(too long for the environment: read stdin)"}, default=str)
    else:
        in_env = text
    env = {**os.environ, "TCLAB_ALERT_JSON": in_env, "TCLAB_JOB": job.name, "TCLAB_STATUS": result.status,
           "TCLAB_RUN_DIR": doc["run_dir"] or "", "TCLAB_REPORTS": str(plan.reports),
           "TCLAB_FAILED_GATES": ",".join(doc["failed_gates"])}
    shown = job.on_failure if isinstance(job.on_failure, str) else " ".join(job.on_failure)
    problem = None
    try:
        proc = subprocess.Popen(job.on_failure, shell=isinstance(job.on_failure, str), cwd=plan.path.parent,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)   # its own process group: a timeout stops all of it
    except OSError as e:
        problem = f"could not be started ({e.strerror or e})"
    else:
        try:
            _, err = proc.communicate(text.encode("utf-8"), timeout=ALERT_TIMEOUT_S)
            if proc.returncode != 0:
                tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
                problem = f"exited {proc.returncode}" + (f": {' | '.join(tail)}" if tail else "")
        except subprocess.TimeoutExpired:
            problem = f"did not finish within {ALERT_TIMEOUT_S:g} s and was stopped"
            _kill_group(proc)
        finally:
            if proc.poll() is None:   # interrupted (the scheduler was stopped): leave nothing running
                _kill_group(proc)
    if problem is None:
        return "sent"
    line = (f"tclab schedule run: warning: job {job.name!r}: on_failure command {shown!r} {problem}; "
            "the job's outcome and the exit status are unchanged")
    if warn is not None:
        warn(line)
    return line


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop an alert command and everything it started (its own session), and reap it."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.communicate(timeout=10)


def _latest_failed(plan: JobsFile, job: Job) -> Path | None:
    stem = runs._safe_name(job.notebook.stem, "notebook name", max_len=80)
    failed = sorted(plan.reports.glob(f"*_{stem}_{job.tag}*{runs.FAILED_SUFFIX}"))
    return failed[-1] if failed else None


class SchedulerStopped(BaseException):
    """``run_jobs`` was stopped by a signal; ``results`` holds every job (the rest "skipped")."""

    def __init__(self, results: list[JobResult], cause: "runs.RunStopped"):
        super().__init__(str(cause))
        self.results, self.signum = results, cause.signum


def _main_summary(results: list[JobResult], reports: Path) -> str:
    failed = sum(r.status == "failed" for r in results)
    gated = sum(r.gate_failed for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    return (f"{sum(r.ok for r in results)} of {len(results)} job(s) ok, {failed} failed"
            + (f", {gated} failed a quality gate" if gated else "")
            + (f", {skipped} skipped" if skipped else "") + f"; index: {reports / 'index.html'}")


def exit_status(results: list[JobResult]) -> int:
    """:data:`EXIT_JOB_FAILED` if a job failed to run, else :data:`EXIT_GATE_FAILED` if a gate failed, else 0."""
    if any(r.status in ("failed", "skipped") for r in results):
        return EXIT_JOB_FAILED
    return EXIT_GATE_FAILED if any(r.gate_failed for r in results) else EXIT_OK


def cli_schedule_run(jobs_file: str, dry_run: bool = False) -> int:
    """``tclab schedule run``: exit 0 if every job ran and passed its gates, 1 if a job failed to run, 3 if
    every job ran but a quality gate failed, 2 if nothing could run, 128 + N when stopped by signal N."""
    try:
        plan = load_jobs(jobs_file)
        if dry_run:
            print(f"{jobs_file}: {len(plan.jobs)} job(s) into {plan.reports}")
            for job in plan.jobs:
                print(f"  {job.name}: {job.notebook} tag={job.tag} params={job.params}")
                if job.gates is not None:
                    print(f"    gates: {job.gates.to_dict()}; recommended setting: {job.recommended_file}")
                if job.on_failure is not None:
                    print(f"    on_failure: {job.on_failure!r}")
            return EXIT_OK
        results = run_jobs(plan)
    except (JobsFileError, ScheduleLockedError) as e:
        print(f"tclab schedule run: {e}", file=sys.stderr)
        return EXIT_BAD_FILE
    except SchedulerStopped as e:
        print(_main_summary(e.results, plan.reports) + f"; stopped: {e}", file=sys.stderr)
        return 128 + (e.signum or 15)
    print(_main_summary(results, plan.reports))
    return exit_status(results)
