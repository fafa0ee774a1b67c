"""Run folders outside the kernel runner: the notebook's side, the reports folder, dead runs' leftovers.

Owns :class:`RunContext` and :func:`open_run` (the folder as a notebook sees it: file names inside
it, figures, ``summary.json``; and, run by hand in JupyterLab, the fresh unstaged folder with its
own provenance), which reports folder a run goes to (``$TCLAB_REPORTS_DIR`` or ``reports/`` at the
project root), whether it can be written (:func:`check_reports_writable`), and marking the staged
folders of killed runs as failed (:func:`clean_dead_runs`). Refreshes the index after it changes
the folder, so it imports :mod:`.index`; it never imports :mod:`.execution`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .run_table import refresh_index
from .layout import (_KERNEL_ENV_FILE, _PID_FILE, _TIME_FORMAT, FAILED_SUFFIX, STAGING_DIRNAME, _safe_name,
                     _unique_path, _write_json, read_json)
from .origin import _iso, _utc_now, environment, provenance
from .parameters import RUN_DIR_PARAMETER, ParameterError, _plain, notebook_parameters


@dataclass
class RunContext:
    """The run folder as a notebook sees it. Get one from :func:`open_run`.

    ``dir`` is where everything goes. Under ``tclab run`` it is the staging folder, which is
    renamed when the notebook ends, so refer to files by name (``run.path("x.csv")``) rather than
    storing absolute paths in results. ``managed`` is True under ``tclab run`` and False for a run
    folder the notebook made itself (JupyterLab "Run All").
    """

    dir: Path
    managed: bool
    notebook: str | None = None
    reports_dir: Path | None = None
    figures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dir.name

    def path(self, name: str) -> Path:
        """The path of file ``name`` inside the run folder (sub-folders are created).

        Refuses absolute names and names that climb out with ``..``: everything a run writes stays
        in its folder, which is what makes the folder self-describing.
        """
        p = Path(name)
        if p.is_absolute() or ".." in p.parts or not p.parts:
            raise ValueError(f"run file name {name!r} must be relative and stay inside the run folder, "
                             "e.g. 'changes.csv' or 'figures/step_10.png'")
        out = self.dir / p
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def save_figure(self, fig, name: str, dpi: int = 120) -> Path:
        """Save a matplotlib figure as ``<name>.png`` in the run folder and return the path.

        The figure is not closed, so it still displays in the notebook (and so in report.html).
        """
        if Path(name).suffix.lower() not in ("", ".png"):
            raise ValueError(f"figure name {name!r}: figures are saved as PNG; drop the suffix or use .png")
        out = self.path(name if name.lower().endswith(".png") else name + ".png")
        fig.savefig(out, dpi=dpi, bbox_inches="tight")
        self.figures.append(out.name)
        return out

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write ``summary.json``: the run's results in one small, machine-readable file.

        Two keys have a meaning to tclab (everything else is yours):

        * ``headline``: a flat dict of the few numbers (or short strings) that answer the
          notebook's question; ``reports/index.html`` shows them and their change since the
          previous run of the same notebook and tag.
        * ``identity``: what pins the inputs beyond the parameters (an image-set manifest hash,
          the weights' hash); copied into provenance.json.

        numpy scalars/arrays are converted; other non-JSON values raise with a hint.
        """
        if not isinstance(summary, Mapping):
            raise TypeError(f"summary must be a dict, got {type(summary).__name__}")
        summary = dict(summary)
        for key in ("headline", "identity"):
            if key in summary and not isinstance(summary[key], Mapping):
                raise TypeError(f"summary[{key!r}] must be a dict of name -> value, got {type(summary[key]).__name__}")
        headline = _plain(summary.get("headline", {}))
        bad = [k for k, v in headline.items() if not isinstance(v, (int, float, str, bool, type(None)))]
        if bad:
            raise TypeError(f"headline values must be single numbers or short strings; {bad} are not. "
                            "Put tables and arrays elsewhere in the summary or in a data file.")
        if self.figures and "figures" not in summary:
            summary["figures"] = list(self.figures)
        out = self.path("summary.json")
        _write_json(out, summary)
        if not self.managed:   # nobody else will finish this folder's provenance: do it here
            prov_path = self.dir / "provenance.json"
            prov = json.loads(prov_path.read_text()) if prov_path.is_file() else provenance()
            end = _utc_now()
            prov.update(status="ok", end_utc=_iso(end), identity=summary.get("identity", {}))
            _write_json(prov_path, prov)
            if self.reports_dir is not None:
                refresh_index(self.reports_dir)
        return out


from ..env import REPORTS_DIR_ENV  # noqa: E402,F401 (where `tclab run` writes unless told)
from .layout import _find_reports_dir  # noqa: E402,F401 (its home is layout; used here and re-exported)


def _interactive_notebook_name() -> str | None:
    # jupyter_server >= 2 tells the kernel which notebook it serves; VS Code sets a global.
    session = os.environ.get("JPY_SESSION_NAME", "")
    if session.endswith(".ipynb"):
        return session
    try:
        from IPython import get_ipython

        ip = get_ipython()
        if ip is not None and ip.user_ns.get("__vsc_ipynb_file__"):
            return str(ip.user_ns["__vsc_ipynb_file__"])
    except ImportError:
        pass
    return None


def open_run(run_dir: str | os.PathLike | None = None, *, notebook: str | None = None,
             params: Mapping[str, Any] | None = None, reports_dir: str | os.PathLike | None = None,
             tag: str = "interactive") -> RunContext:
    """Open the run folder a notebook writes into; call it once, right after the parameters.

    Under ``tclab run``, ``run_dir`` is the folder papermill injected: it exists, and tclab writes
    params.yaml, provenance.json and report.html around what the notebook writes.

    Run by hand (``run_dir`` is ``None`` or ``""``), it makes a new folder
    ``<reports>/<UTC time>_<notebook stem>_<tag>/`` (``reports`` at the project root, found by
    walking up from the working directory to pyproject.toml or .git) and writes provenance.json
    there itself; :meth:`RunContext.write_summary` completes it and refreshes index.html. The
    notebook's name comes from ``notebook=`` or from Jupyter; its parameters are read from the
    saved notebook file unless you pass ``params=`` (unsaved edits to the cell are not seen).
    Such a folder is not staged: one that never reached write_summary shows as "running".
    """
    if run_dir not in (None, ""):
        d = Path(run_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"run_dir {str(d)!r} does not exist; leave run_dir = None when running "
                                    "the notebook by hand and a fresh folder is made under reports/")
        # Record the kernel's own environment: it, not the tclab run process, executes the code.
        _write_json(d / _KERNEL_ENV_FILE, environment())
        # A report is read, not scrolled in a kernel: table cells show their whole text (file names, skip
        # reasons), not pandas' 50 characters and "...". This kernel is the run's own, started for it.
        import pandas as pd

        pd.set_option("display.max_colwidth", None)
        return RunContext(dir=d, managed=True)

    nb_path = notebook or _interactive_notebook_name()
    stem = _safe_name(Path(nb_path).stem, "notebook name") if nb_path else "notebook"
    reports = Path(reports_dir) if reports_dir is not None else _find_reports_dir()
    start = _utc_now()
    d = _unique_path(reports / f"{start.strftime(_TIME_FORMAT)}_{stem}_{_safe_name(tag, 'tag')}")
    d.mkdir(parents=True)
    if params is None and nb_path and Path(nb_path).is_file():
        with contextlib.suppress(ParameterError):
            params = notebook_parameters(nb_path)
    used = {k: v for k, v in (params or {}).items() if k != RUN_DIR_PARAMETER}
    (d / "params.yaml").write_text(yaml.safe_dump(_plain(used), sort_keys=False))
    _write_json(d / "provenance.json", provenance(
        status="running", mode="interactive", run=d.name, notebook=nb_path, tag=tag,
        parameters=_plain(used), start_utc=_iso(start), end_utc=None))
    return RunContext(dir=d, managed=False, notebook=nb_path, reports_dir=reports)


def command_run(command: str, parameters: Mapping[str, Any], fill, *, reports_dir: str | os.PathLike | None = None,
                tag: str = "cli", start: _dt.datetime | None = None) -> tuple[Path, Any]:
    """A run folder for a command (``tclab evaluate``, ``tclab sample``), like a notebook's: ``fill(run)``
    writes into ``run`` (a :class:`RunContext`; it ends with ``run.write_summary(...)``) and returns the
    command's result; tclab adds ``params.yaml`` and ``provenance.json`` (``command``, ``parameters``,
    times, identity) and publishes ``<reports>/<UTC start>_<command>_<tag>/`` into the run table and
    index.html. Built aside in ``<reports>/.staging/`` and renamed into place when complete; if ``fill``
    raises, the staged folder is removed and nothing is published. Returns (the folder, the result).
    ``start``: when the command began (default now), so the duration counts its whole work."""
    reports = Path(reports_dir) if reports_dir is not None else _find_reports_dir()
    check_reports_writable(reports)
    start = start or _utc_now()
    name = f"{start.strftime(_TIME_FORMAT)}_{_safe_name(command, 'command')}_{_safe_name(tag, 'tag')}"
    staging = _unique_path(reports / STAGING_DIRNAME / name)
    staging.mkdir(parents=True)
    (staging / _PID_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        result = fill(RunContext(dir=staging, managed=True, reports_dir=reports))
        summary = read_json(staging / "summary.json")
        used = _plain(dict(parameters))
        (staging / "params.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
        final = _unique_path(reports / name)
        end = _utc_now()
        _write_json(staging / "provenance.json", provenance(
            status="ok", run=final.name, mode="command", command=command, tag=tag, parameters=used,
            start_utc=_iso(start), end_utc=_iso(end), duration_s=round((end - start).total_seconds(), 3),
            identity=summary.get("identity", {})))
        (staging / _PID_FILE).unlink()
        os.rename(staging, final)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            (reports / STAGING_DIRNAME).rmdir()   # only if empty: another run may be staging
    refresh_index(reports)
    return final, result


#: Free space a reports folder must have before a run starts (a run writes figures, records, notebooks).
MIN_FREE_BYTES = 64 * 2**20


def check_reports_writable(reports: Path) -> None:
    """Refuse a reports folder that cannot be written, or that is (nearly) full, before any work starts."""
    import shutil
    import tempfile

    try:
        reports.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=reports, prefix=".tclab-write-check-"):
            pass
    except OSError as e:
        raise ParameterError(f"reports folder {reports} cannot be written ({e.strerror or e}); pass --reports DIR "
                             "(or set $TCLAB_REPORTS_DIR) to a folder you can write") from None
    free = shutil.disk_usage(reports).free
    if free < MIN_FREE_BYTES:
        raise ParameterError(f"reports folder {reports} has only {free / 2**20:.0f} MiB free (a run needs at least "
                             f"{MIN_FREE_BYTES // 2**20} MiB); free some space or pass --reports DIR elsewhere")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_dead_runs(reports_dir: str | os.PathLike, echo: Any = print) -> list[Path]:
    """Mark the leftovers of dead runs: every ``<reports>/.staging/`` folder whose runner process is gone
    (killed, crashed, machine rebooted) becomes ``<name>_FAILED`` with ``error.txt`` saying so, and is
    listed in index.html. Folders of live runs are left alone. Returns the folders it marked."""
    reports = Path(reports_dir)
    staging_root = reports / STAGING_DIRNAME
    marked: list[Path] = []
    if not staging_root.is_dir():
        return marked
    for d in sorted(p for p in staging_root.iterdir() if p.is_dir()):
        try:
            fields = (d / _PID_FILE).read_text().split()
            pid, host = int(fields[0]), (fields[1] if len(fields) > 1 else socket.gethostname())
        except (OSError, ValueError, IndexError):
            pid, host = None, socket.gethostname()
        if host != socket.gethostname():
            continue  # a run of another machine on a shared folder: its process cannot be checked from here
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        if pid is None and time.time() - d.stat().st_mtime < STAGING_GRACE_S:
            continue  # just made by a run that has not written its pid yet
        try:
            marked.append(_mark_dead(reports, d, pid))
        except FileNotFoundError:
            continue  # another cleaner, or the run itself, moved it first
        if echo is not None:
            echo(f"tclab: a dead run's leftovers were marked failed: {marked[-1]} ({_dead_reason(pid)})")
    if marked:
        with contextlib.suppress(OSError):
            staging_root.rmdir()
        refresh_index(reports)
    return marked


#: A staged folder without a runner pid younger than this is a run starting, not a leftover.
STAGING_GRACE_S = 120.0


def _dead_reason(pid: int | None) -> str:
    return (f"the process running it (pid {pid}) is gone: it was killed or crashed before the run ended"
            if pid is not None else "it has no runner pid: left by an old or crashed run")


def _mark_dead(reports: Path, d: Path, pid: int | None) -> Path:
    """Move the staged folder ``d`` of a dead run to ``<name>_FAILED`` with error.txt and provenance."""
    reason = _dead_reason(pid)
    (d / "error.txt").write_text(f"{reason}; marked FAILED by a later run on {_iso(_utc_now())}\n")
    prov_path = d / "provenance.json"
    prov = read_json(prov_path) if prov_path.is_file() else {}
    prov.update(status="failed", error=reason)
    final = _unique_path(reports / (d.name + FAILED_SUFFIX))
    prov["run"] = final.name
    _write_json(prov_path, prov)
    with contextlib.suppress(FileNotFoundError):
        (d / _PID_FILE).unlink()
    os.rename(d, final)
    return final
