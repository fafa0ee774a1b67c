"""Executing a notebook into a run folder with papermill (``tclab run``, :func:`run_notebook`).

Owns the runner: checking parameters before any kernel starts, staging the folder in
``<reports>/.staging/``, starting the kernel on this tclab with the caller's working directory,
following its progress, stopping on SIGTERM / SIGHUP or a timeout (:class:`RunStopped`,
:class:`RunTimeout`), rendering ``report.html`` (:func:`render_html`, through ``tclab.report``),
writing provenance.json, renaming the finished folder into place in one atomic step (a failure
becomes ``*_FAILED`` with ``error.txt``, :class:`RunFailedError`) and refreshing the index. The top
of :mod:`tclab.runs`: nothing in the package imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from ..paths import PROJECT_ROOT
from ..report import render_report
from .folder import _find_reports_dir, check_reports_writable, clean_dead_runs
from .run_table import refresh_index
from .layout import (_KERNEL_ENV_FILE, _PID_FILE, _TIME_FORMAT, FAILED_SUFFIX, KERNEL_LOG, PROGRESS_LOG, REPORT_NAME,
                     STAGING_DIRNAME, _safe_name, _unique_path, _write_json, read_json)
from .origin import _iso, _utc_now, parameters_hash, provenance
from .parameters import (RUN_DIR_PARAMETER, _plain, _read_notebook, check_parameter_values, notebook_parameters,
                         resolve_notebook, validate_parameters)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunStopped(BaseException):
    """The run was stopped from outside (SIGTERM, SIGHUP; SIGINT stays KeyboardInterrupt): the run is
    marked FAILED with the reason and the index updated, then this propagates, so a scheduler stops too.
    A BaseException, like KeyboardInterrupt, so ``except Exception`` does not swallow it."""

    def __init__(self, reason: str, signum: int | None = None):
        super().__init__(reason)
        self.signum = signum


class RunTimeout(Exception):
    """The run took longer than its ``timeout_s``; it was stopped (kernel included) and marked FAILED."""


class RunFailedError(RuntimeError):
    """The notebook raised. ``run_dir`` is the ``*_FAILED`` folder holding ``error.txt``."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


@contextlib.contextmanager
def _kernel_imports_this_tclab(caller_cwd: str | os.PathLike | None = None) -> Iterator[None]:
    """Let the kernel import the same tclab as this process, and read relative paths as the caller meant.

    The kernel is a separate process started with a copy of ``os.environ`` and its working
    directory set to the notebook's folder, so a source checkout on ``sys.path`` here is invisible
    there. Prepending the checkout to PYTHONPATH while the kernel starts fixes that. The caller's
    folder goes to ``$TCLAB_CALLER_CWD`` (``tclab.paths``), so ``-p images data/set`` means what it
    means in the caller's shell. Both variables are restored afterwards so nothing leaks.
    """
    from ..paths import reading_from

    root, old = str(PROJECT_ROOT), os.environ.get("PYTHONPATH")
    with _environment({"PYTHONPATH": root if not old else root + os.pathsep + old}), reading_from(caller_cwd):
        yield


class _UnknownParameterFilter(logging.Filter):
    """papermill cannot read annotated parameters (``run_dir: str | None = None``) and calls each one
    "unknown"; the names were already checked against the parameters cell (validate_parameters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


@contextlib.contextmanager
def _papermill_quiet() -> Iterator[None]:
    log, f = logging.getLogger("papermill"), _UnknownParameterFilter()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


class _DeadKernelTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for nbclient's DeadKernelError: after a run was
    stopped (a signal, a timeout) its kernel is killed on purpose, and an nbclient task still waiting on it
    ends with that error when it is garbage-collected, at a moment that depends on timing (often at exit).
    That traceback says nothing the run's error.txt does not; every other asyncio message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (type(exc).__name__ == "DeadKernelError" or "DeadKernelError" in record.getMessage())


def _quiet_dead_kernel_tasks() -> None:
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DeadKernelTaskFilter) for f in log.filters):
        log.addFilter(_DeadKernelTaskFilter())


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the kernel about to start; restore after."""
    def put(items: Iterable[tuple[str, str | None]]) -> None:
        for k, v in items:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = [(k, os.environ.get(k)) for k in values]
    try:
        put(values.items())
        yield
    finally:
        put(old)


def _kernel_manager_logging_to(log_path: Path):
    """A kernel manager whose kernel writes its own stderr (start-up warnings, and the traceback it prints
    when it is shut down mid-cell) to ``log_path`` in the run folder instead of the user's terminal."""
    from jupyter_client import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(log_path, "ab") as log:  # the kernel keeps its own copy of the descriptor
                kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


@contextlib.contextmanager
def _stoppable(timeout_s: float | None = None) -> Iterator[None]:
    """While a notebook runs: SIGTERM and SIGHUP raise :class:`RunStopped`, and ``timeout_s`` (a real-time
    alarm) raises :class:`RunTimeout`, in the runner's main thread, so the run is marked FAILED and the
    kernel shut down by papermill's own clean-up. Off the main thread (where Python cannot take
    signals) nothing is installed. The previous handlers come back afterwards."""
    import signal
    import threading

    if timeout_s and threading.current_thread() is not threading.main_thread():
        raise ValueError("timeout_s needs the main thread (Python delivers the timer signal only there); run "
                         "the notebook from the main thread, or without a timeout")

    def stop(signum, frame):
        raise RunStopped(f"stopped by {signal.Signals(signum).name}", signum)

    def alarm(signum, frame):
        raise RunTimeout(f"timed out after {timeout_s:g} s (the job's timeout); the kernel was stopped")

    handlers = {signal.SIGTERM: stop, signal.SIGHUP: stop, **({signal.SIGALRM: alarm} if timeout_s else {})}
    with _handling(handlers) as installed:
        if installed and timeout_s:
            signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
        try:
            yield
        finally:
            if installed and timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def _handling(handlers: Mapping[int, Any]) -> Iterator[bool]:
    """Install ``{signal: handler}`` for the block and restore the previous handlers after it; yields
    whether they were installed (only the main thread can take signals: elsewhere nothing changes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    old = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield True
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list]:
    """SIGTERM / SIGHUP / SIGINT are recorded (into the yielded list), not acted on, until the block
    ends: for the few file moves that finish a run, which must not be cut in half."""
    import signal

    received: list = []

    def note(signum, frame):
        received.append(signal.Signals(signum))

    with _handling({sig: note for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}):
        yield received


def _error_text(exc: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        head = f"{exc.ename}: {exc.evalue}\n\nraised in cell {exc.cell_index} (execution count {exc.exec_count}):\n"
        body = "\n".join(_ANSI.sub("", line) for line in exc.traceback)
        return f"{head}{exc.source}\n\n{body}\n"
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _summary_line(exc: BaseException) -> str:
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    return f"{ename}: {evalue}".strip()


def render_html(executed: str | os.PathLike, out: str | os.PathLike, title: str | None = None,
                params: Mapping[str, Any] | None = None, overridden: Iterable[str] = (), *,
                summary: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
                replacements: Mapping[str, str] | None = None, error: str | None = None) -> Path:
    """Render an executed notebook as the run's report (:func:`tclab.report.render_report`): the
    summary from ``summary.json`` first, then numbered figures, tables and the details, code hidden."""
    return render_report(executed, out, summary=summary, provenance=provenance, params=params,
                         overridden=overridden, run_name=title or "", replacements=replacements, error=error)


def run_notebook(notebook: str | os.PathLike, params: Mapping[str, Any] | None = None,
                 reports_dir: str | os.PathLike | None = None, tag: str | None = None, *,
                 kernel_name: str | None = None, progress_bar: bool = True,
                 caller_cwd: str | os.PathLike | None = None, timeout_s: float | None = None) -> Path:
    """Execute ``notebook`` with ``params`` into a new run folder; return the folder's path.

    Relative paths among ``params`` are read from ``caller_cwd`` (default: the working directory),
    not from the notebook's folder (``tclab.paths``); a jobs file passes its own folder.

    Faults: the reports folder is checked writable (and not full) first; leftovers of dead runs there
    are marked failed (:func:`clean_dead_runs`). SIGTERM / SIGHUP mark this run FAILED and raise
    :class:`RunStopped`; past ``timeout_s`` it is stopped, marked FAILED, and :class:`RunFailedError`
    says so. If the finished folder cannot be moved into ``reports/``, the error says where it is.

    ``notebook`` is a path, or a name the project's ``notebooks/`` folder resolves (``"01"``,
    ``"01_token_redundancy"``; see :func:`resolve_notebook`).

    Steps: read the notebook's parameters cell and refuse unknown names (nothing is created if
    that fails); build ``<reports>/.staging/<UTC time>_<stem>_<tag>/`` with params.yaml (defaults
    merged with ``params``); execute with papermill, injecting ``params`` plus ``run_dir`` (the
    staging folder) and using the notebook's own folder as working directory, exactly as in
    JupyterLab; render report.html; write provenance.json; rename the folder into ``reports/``;
    rewrite ``reports/index.html``.

    ``reports_dir`` defaults to ``reports/`` at the project root (the nearest folder up from the
    working directory holding pyproject.toml or .git), the same folder :func:`open_run` uses when
    the notebook is run by hand. ``tag`` names the setting for humans (``smoke``, ``paper-fig3``); without it a short hash of
    the merged parameters is used, so runs with equal settings share a tag and index.html can
    show how their headline numbers moved between runs.

    If the notebook raises, the folder becomes ``<name>_FAILED`` with ``error.txt`` and the
    partially executed notebook, index.html lists it, and :class:`RunFailedError` is raised with
    ``run_dir`` set. Earlier runs are never touched.
    """
    import papermill as pm

    notebook = resolve_notebook(notebook)   # a path, or a name/number of the project's notebooks
    params = dict(params or {})
    defaults = notebook_parameters(notebook)
    validate_parameters(params, defaults, notebook=f"notebook {str(notebook)!r}")
    check_parameter_values(params, notebook)  # types and finiteness, before any folder or kernel
    import threading

    if timeout_s and threading.current_thread() is not threading.main_thread():
        raise ValueError("timeout_s needs the main thread (Python delivers the timer signal only there); run the "
                         "notebook from the main thread, or without a timeout")
    from ..paths import check_path_parameters

    # a mistyped path, or a labels mapping naming a folder the images lack: refused now, not in the kernel
    check_path_parameters(dict(params), caller_cwd)
    if "labels" in params:
        from ..labels import check_label_folders

        check_label_folders({**defaults, **params}, caller_cwd)
    used = {k: v for k, v in defaults.items() if k != RUN_DIR_PARAMETER}
    used.update(params)
    used = _plain(used)
    if tag is not None:
        tag_name, tag_source = _safe_name(tag, "tag"), "given"
    else:
        tag_name, tag_source = parameters_hash(used), "parameters-hash"
    stem = _safe_name(notebook.stem, "notebook name", max_len=80)
    if kernel_name is None:
        kernel_name = _read_notebook(notebook).metadata.get("kernelspec", {}).get("name") or "python3"

    reports = Path(reports_dir) if reports_dir is not None else _find_reports_dir()
    check_reports_writable(reports)
    clean_dead_runs(reports)
    start = _utc_now()
    name = f"{start.strftime(_TIME_FORMAT)}_{stem}_{tag_name}"
    staging = _unique_path(reports / STAGING_DIRNAME / name)
    staging.mkdir(parents=True)
    staging = staging.resolve()
    (staging / _PID_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    (staging / "params.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
    executed = staging / f"{stem}.ipynb"
    prov = provenance(
        status="running", mode="tclab run", run=name, notebook=str(notebook.resolve()),
        notebook_sha256=hashlib.sha256(notebook.read_bytes()).hexdigest(), tag=tag_name, tag_source=tag_source,
        parameters=used, overrides=_plain(params), kernel_name=kernel_name, start_utc=_iso(start), end_utc=None,
        argv=list(sys.argv))
    prov["environment_source"] = "runner"

    error: BaseException | None = None
    from ..progress import PROGRESS_FILE_ENV, ProgressFollower

    progress_file = staging / PROGRESS_LOG
    try:   # the kernel's bars report to progress_file (never to the report); the follower shows them here
        with _kernel_imports_this_tclab(caller_cwd), _stoppable(timeout_s), \
                _environment({PROGRESS_FILE_ENV: str(progress_file) if progress_bar else None}), \
                _papermill_quiet(), ProgressFollower(progress_file, label=stem) as follower:
            pm.execute_notebook(str(notebook), str(executed), parameters={**params, RUN_DIR_PARAMETER: str(staging)},
                                kernel_name=kernel_name, cwd=str(notebook.resolve().parent),
                                progress_bar={"file": follower.cells} if progress_bar else False,
                                kernel_manager_class=_kernel_manager_logging_to(staging / KERNEL_LOG))
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt too: the folder must still be marked failed
        error = e
        if isinstance(e, (RunStopped, RunTimeout, KeyboardInterrupt)):
            _quiet_dead_kernel_tasks()
    end = _utc_now()
    with _signals_deferred() as received:  # a signal while the folder is finished must not strand it
        final = _finish_run(notebook, reports, staging, executed, name, used, params, prov, start, end, error)
    if received:  # the folder is in place and listed: now stop as asked
        raise RunStopped(f"stopped by {received[0].name}", int(received[0]))
    return final


def _finish_run(notebook: Path, reports: Path, staging: Path, executed: Path, name: str, used: dict,
                params: Mapping[str, Any], prov: dict, start, end, error: BaseException | None) -> Path:
    """Render, write provenance, move the staged folder into place (marked FAILED if ``error``), update
    the index; raise what the run's failure calls for."""

    kernel_env = staging / _KERNEL_ENV_FILE
    if kernel_env.is_file():
        prov["environment"] = json.loads(kernel_env.read_text())
        prov["environment_source"] = "kernel"
        kernel_env.unlink()
    summary_path = staging / "summary.json"
    summary = read_json(summary_path)
    prov.update(status="failed" if error else "ok", end_utc=_iso(end),
                duration_s=round((end - start).total_seconds(), 3), identity=summary.get("identity", {}),
                executed_notebook=executed.name)
    final = _unique_path(reports / (name + (FAILED_SUFFIX if error else "")))
    if error is not None:
        prov["error"] = _summary_line(error)
    if executed.is_file():
        try:  # the report names the folder the run ends up in, never the staging one
            render_html(executed, staging / REPORT_NAME, title=final.name, params=used, overridden=params,
                        summary=summary, provenance=prov, replacements={str(staging): str(final)},
                        error=prov.get("error"))
        except Exception as e:  # noqa: BLE001 - a rendering problem must not hide the run's own result
            (staging / "render_error.txt").write_text(_error_text(e))
    prov["report"] = REPORT_NAME if (staging / REPORT_NAME).is_file() else None
    if error is not None:
        (staging / "error.txt").write_text(_error_text(error))
    elif not summary_path.is_file():
        print(f"warning: {notebook} wrote no summary.json; end it with run.write_summary({{'headline': ...}})",
              file=sys.stderr)
    log = staging / KERNEL_LOG
    if log.is_file() and not error and all("Kernel is running over TCP without encryption" in line
                                           for line in log.read_text(errors="replace").splitlines() if line.strip()):
        log.unlink()  # nothing but the kernel's usual start-up warning: not worth a file in a good run
    if not error:
        with contextlib.suppress(FileNotFoundError):
            (staging / PROGRESS_LOG).unlink()
    prov["run"] = final.name  # provenance names the folder it ends up in (a second run may take "name")
    _write_json(staging / "provenance.json", prov)
    with contextlib.suppress(FileNotFoundError):
        (staging / _PID_FILE).unlink()
    try:
        os.rename(staging, final)     # same file system: atomic, the folder appears complete or not at all
    except OSError as e:
        raise RunFailedError(f"notebook {notebook} {'failed' if error else 'finished'}, but its folder could not be "
                             f"moved into {reports} ({e.strerror or e}); the complete result is in {staging}: move "
                             "it there yourself once the folder is writable", staging) from e
    with contextlib.suppress(OSError):
        (reports / STAGING_DIRNAME).rmdir()    # only if empty: another run may be staging
    refresh_index(reports)

    if error is not None:
        if not isinstance(error, Exception):   # KeyboardInterrupt, SystemExit: keep their meaning
            raise error
        raise RunFailedError(f"notebook {notebook} failed: {_summary_line(error)}; see {final / 'error.txt'}",
                             final) from error
    return final
