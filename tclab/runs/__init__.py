"""Run folders: execute a parameterised notebook into a self-describing, never-overwritten folder.

Every experiment in tclab ends up as one folder under ``reports/``::

    reports/
      index.html                                   # all runs, newest first (rewritten after every run)
      runs.sqlite                                  # the run table: one row per run, per sweep variant
      20250614T103015Z_01_token_changes_smoke/     # <UTC start>_<notebook stem>_<tag>
        01_token_changes.ipynb                     # the executed notebook (outputs included)
        report.html                                # the same, rendered without code cells
        params.yaml                                # every parameter the run used (defaults + overrides)
        provenance.json                            # who/what/when: versions, git commit, host, times
        summary.json                               # written by the notebook: headline numbers, identity
        *.png, *.csv, ...                          # figures and data the notebook wrote
      20250614T104500Z_01_token_changes_smoke_FAILED/   # a run whose notebook raised
        error.txt                                  # the exception, plain text
        ...                                        # whatever it wrote before it failed

Three ways to make a run folder:

* ``tclab run NOTEBOOK -p NAME VALUE`` (or :func:`run_notebook`) executes the notebook with
  papermill. The folder is built aside in ``reports/.staging/`` and renamed into place only when
  the notebook finished, so ``reports/`` never holds half a run, a good run is never overwritten,
  and a failure becomes a clearly marked ``*_FAILED`` folder.
* "Run All" in JupyterLab: the notebook's ``run_dir`` parameter is ``None``, so
  :func:`open_run` makes a fresh ``reports/<time>_<stem>_interactive/`` folder itself.
* A command (``tclab evaluate``, ``tclab sample``) calls :func:`command_run`: the same folder, named
  ``<time>_<command>_<tag>``, with ``command`` in provenance.json where a notebook run has ``notebook``.

Every run that ends is synced into the run table ``reports/runs.sqlite`` (:mod:`.run_table`), and
index.html is rendered from that table.

How a notebook cooperates (the cells, in order; see also ``docs`` and the house style)::

    # [cell tagged "parameters"] only literals; names equal config field names
    run_dir = None          # papermill injects the run folder here; None = make one (interactive)
    num_steps = 10

    # [setup cell]
    from tclab import runs
    run = runs.open_run(run_dir)

    # [plots] any matplotlib figure
    run.save_figure(fig, "token_changes")          # -> <run>/token_changes.png

    # [data] any file, by name inside the run folder
    frame.to_csv(run.path("changes.csv"))

    # [last cell] headline numbers show in reports/index.html; identity goes to provenance.json
    run.write_summary({"headline": {"psnr": psnr, "speedup": speedup},
                       "identity": {"images_manifest_sha256": manifest_hash}})

Nothing here runs at import time; papermill and nbconvert are imported only when a notebook is
executed or rendered.

The package, one module per job; a module imports only those above it in this list (no cycles)::

    parameters.py   the parameters cell, -p/-f values and files, notebook and preset names
    origin.py       provenance: clock, git commit, environment, the provenance record, parameters_hash
    layout.py       a run folder's names (staging, _FAILED, report.html, ...) and its JSON files
    index.py        RunInfo, read_run, list_runs, render_index: a run folder as the index reads it, the page
    run_table.py    the run table reports/runs.sqlite (sync, rebuild, table, find_run) and write_index from it
    folder.py       RunContext and open_run, the reports folder, marking dead runs' leftovers
    execution.py    run_notebook: papermill, staging, signals and timeouts, report.html, atomic publish

Everything is re-exported here: use ``from tclab import runs; runs.X``. To patch what a module uses,
patch it where it is used (``tclab.runs.execution.render_html``), not here.
"""

from __future__ import annotations

# Re-exports (the noqa marks them as such): the public API, and the private names other tclab modules and tests
# use through ``runs.``: jobs (_safe_name, _stoppable), cli (_find_reports_dir), tests/test_index_page.py (_href,
# format_duration, format_figure).
from ..paths import PROJECT_ROOT  # noqa: F401
from .parameters import (  # noqa: F401
    NOTEBOOKS_DIRNAME, PARAMS_DIRNAME, RUN_DIR_PARAMETER, ParameterError, ParameterType, check_parameter_values,
    load_parameters, notebook_parameter_types, notebook_parameters, parse_parameter_value, project_notebooks_dir,
    read_yaml, resolve_notebook, resolve_params_file, validate_parameters)
from .origin import KEY_PACKAGES, environment, git_state, parameters_hash, provenance  # noqa: F401
from .layout import (  # noqa: F401
    FAILED_SUFFIX, KERNEL_LOG, PROGRESS_LOG, REPORT_NAME, STAGING_DIRNAME, _safe_name, read_json)
from .index import (  # noqa: F401
    GATES_FILE, HUMAN_VERDICT_FILE, INDEX_FIGURES, RUN_STATUSES, RunInfo, _href, format_duration, format_figure, list_runs, read_run, render_index)
from .run_table import (  # noqa: F401
    TABLE_NAME, RunFilter, RunTableError, find_run, rebuild, refresh_index, rows, run_rows, sync, table, table_path,
    write_index)
from .folder import (  # noqa: F401
    MIN_FREE_BYTES, REPORTS_DIR_ENV, STAGING_GRACE_S, RunContext, _find_reports_dir, check_reports_writable,
    clean_dead_runs, command_run, open_run)
from .execution import (  # noqa: F401
    RunFailedError, RunStopped, RunTimeout, _stoppable, render_html, run_notebook)

__all__ = [
    "RUN_DIR_PARAMETER", "STAGING_DIRNAME", "FAILED_SUFFIX", "REPORT_NAME",
    "ParameterError", "RunFailedError", "RunContext", "RunInfo",
    "notebook_parameters", "validate_parameters", "check_parameter_values", "notebook_parameter_types",
    "parse_parameter_value", "load_parameters",
    "parameters_hash", "resolve_notebook", "resolve_params_file", "project_notebooks_dir", "PROJECT_ROOT",
    "run_notebook", "open_run", "provenance", "environment", "git_state",
    "list_runs", "write_index", "render_html", "table", "find_run", "sync", "rebuild", "RunFilter", "RunTableError",
]
