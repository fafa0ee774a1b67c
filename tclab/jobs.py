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
4. Rewrites ``<reports>/index.html`` and returns one :class:`JobResult` per job; the CLI prints
   their summary lines and exits 1 if any job failed.

Not locked against: a hand-started ``tclab run`` into the same folder. That is safe anyway (every
run folder is staged and renamed into place), it only is not serialised with the schedule.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


from . import runs

__all__ = ["TOP_LEVEL_KEYS", "JOB_KEYS", "LOCK_NAME", "Job", "JobsFile", "JobResult", "JobsFileError",
           "ScheduleLockedError", "load_jobs", "reports_lock", "run_jobs"]

#: Keys a jobs file may hold at the top level (both required).
TOP_LEVEL_KEYS = ("reports", "jobs", "timeout")
#: Keys a job may hold: name and notebook required, the rest optional.
JOB_KEYS = ("name", "notebook", "params", "params_file", "tag", "timeout")
#: The lock file inside the reports folder.
LOCK_NAME = ".tclab-schedule.lock"


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


@dataclass
class JobsFile:
    path: Path
    reports: Path
    jobs: list[Job]


@dataclass
class JobResult:
    """The outcome of one job. ``run_dir`` is None only if the job failed before making a folder."""

    name: str
    status: str                          # "ok", "failed" or "skipped"
    seconds: float
    run_dir: Path | None
    headline: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary_line(self, max_numbers: int = 6) -> str:
        """``ok      redundancy-smoke   41.2s  reports/2025..._smoke  frac_small=0.81 rho=0.93``."""
        items = list(self.headline.items())
        numbers = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:max_numbers])
        if len(items) > max_numbers:
            numbers += f" (+{len(items) - max_numbers} more)"
        tail = numbers if self.ok else f"error: {self.error}" if self.status == "failed" else f"skipped: {self.error}"
        return (f"{'ok' if self.ok else self.status.upper():7s} {self.name}  {self.seconds:.1f}s  "
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
        jobs.append(Job(name=name, notebook=notebook, params=merged, tag=str(tag), timeout_s=timeout))

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

def run_jobs(jobs_file: str | os.PathLike | JobsFile, *, echo: Callable[[str], None] | None = print,
             progress_bar: bool = False) -> list[JobResult]:
    """Check the jobs file, take the reports lock, run every job in order; one result per job.

    ``echo`` receives each job's summary line as soon as the job ends (``None``: silent). A
    failing or timed-out job does not stop the others; check ``all(r.ok for r in results)``. Raises
    :class:`JobsFileError` (bad file) or :class:`ScheduleLockedError` (folder busy) before any job
    runs. ``reports/index.html`` is rewritten at the end. SIGTERM / SIGHUP stop the current job (marked
    FAILED), skip the rest and raise :class:`SchedulerStopped` with every job's result, after the index
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
            results.append(result)
            if echo is not None:
                echo(result.summary_line())
        runs.write_index(plan.reports)
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
    skipped = sum(r.status == "skipped" for r in results)
    return (f"{sum(r.ok for r in results)} of {len(results)} job(s) ok, {failed} failed"
            + (f", {skipped} skipped" if skipped else "") + f"; index: {reports / 'index.html'}")


def cli_schedule_run(jobs_file: str, dry_run: bool = False) -> int:
    """``tclab schedule run``: exit 0 if every job succeeded, 1 if any failed, 2 if nothing could run."""
    try:
        plan = load_jobs(jobs_file)
        if dry_run:
            print(f"{jobs_file}: {len(plan.jobs)} job(s) into {plan.reports}")
            for job in plan.jobs:
                print(f"  {job.name}: {job.notebook} tag={job.tag} params={job.params}")
            return 0
        results = run_jobs(plan)
    except (JobsFileError, ScheduleLockedError) as e:
        print(f"tclab schedule run: {e}", file=sys.stderr)
        return 2
    except SchedulerStopped as e:
        print(_main_summary(e.results, plan.reports) + f"; stopped: {e}", file=sys.stderr)
        return 128 + (e.signum or 15)
    print(_main_summary(results, plan.reports))
    return 0 if all(r.ok for r in results) else 1
