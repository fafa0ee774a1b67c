"""The layout of a run folder: what it and the files in it are called, and how its JSON is read and written.

The contract shared by the code that writes run folders (:mod:`.folder`, :mod:`.execution`) and the
code that reads them (:mod:`.index`, ``tclab.inhouse``, ``tclab.jobs``): the folder name
``<UTC start>_<stem>_<tag>[_FAILED]``, the staging folder, the file names inside, and JSON files
written whole or not at all (:func:`_write_json`) and read without ever raising (:func:`read_json`).
It also says which reports folder a run goes to (:func:`_find_reports_dir`). No policy lives here;
it imports only :mod:`.parameters` (for :class:`ParameterError`) and ``tclab.env``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any

from ..env import REPORTS_DIR_ENV
from .parameters import ParameterError


#: Runs are assembled in ``<reports>/.staging/<name>/`` and renamed into place when complete.
STAGING_DIRNAME = ".staging"
#: Suffix of the folder a failed run leaves behind.
FAILED_SUFFIX = "_FAILED"
#: The code-free HTML rendering of the executed notebook, inside each run folder.
REPORT_NAME = "report.html"

_TIME_FORMAT = "%Y%m%dT%H%M%SZ"   # sorts lexically in time order, safe in file names
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

_PID_FILE = ".runner.pid"

_KERNEL_ENV_FILE = ".kernel_environment.json"   # written by open_run under papermill, merged + removed

KERNEL_LOG = "kernel.log"
#: The kernel's progress bars, one status line per update (tclab.progress); kept only for failed runs.
PROGRESS_LOG = "progress.log"


def is_run_folder(d: Path) -> bool:
    """A run folder is a folder holding provenance.json or summary.json (readable or not): what the index, the
    run table and the exports count as a run."""
    return d.is_dir() and ((d / "provenance.json").exists() or (d / "summary.json").exists())


def _safe_name(text: str, what: str, max_len: int = 40) -> str:
    clean = _NAME_UNSAFE.sub("-", str(text)).strip("-._")[:max_len]
    if not clean:
        raise ParameterError(f"{what} {text!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return clean


def _unique_path(p: Path) -> Path:
    """``p``, or ``p-2``, ``p-3``... whichever does not exist yet: a run never lands on another."""
    if not p.exists():
        return p
    i = 2
    while p.with_name(f"{p.name}-{i}").exists():
        i += 1
    return p.with_name(f"{p.name}-{i}")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):        # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (Path, _dt.date, _dt.datetime)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; convert it to numbers, strings, "
                    "lists or dicts before writing it to summary.json")


# provenance.json reads best with the run's identity first and the long environment block last.
_PROVENANCE_ORDER = ("status", "run", "mode", "notebook", "notebook_sha256", "tag", "tag_source", "parameters",
                     "overrides", "start_utc", "end_utc", "duration_s", "error", "identity", "tclab_version",
                     "hostname", "git")


def _write_json(path: Path, obj: Any) -> None:
    if path.name == "provenance.json":
        obj = {**{k: obj[k] for k in _PROVENANCE_ORDER if k in obj}, **obj}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def read_json(p: Path) -> dict[str, Any]:
    """A JSON object from ``p``; {} when the file is missing, unreadable or not an object."""
    return _read_json_noting(p, [])


def _read_json_noting(p: Path, problems: list[str]) -> dict[str, Any]:
    """:func:`read_json`, noting in ``problems`` why a file that exists could not be used."""
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        problems.append(f"{p.name} unreadable ({e.strerror or type(e).__name__})")
        return {}
    except ValueError:   # includes UnicodeDecodeError
        problems.append(f"{p.name} is not valid JSON")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{p.name} is not a JSON object")
        return {}
    return data


def _find_reports_dir(start: Path | None = None) -> Path:
    """``$TCLAB_REPORTS_DIR`` when set (the test suite points it at a temporary folder, so executing
    the notebooks there never adds runs to your reports), else ``reports/`` at the project root: the
    nearest folder up from ``start`` with pyproject.toml or .git."""
    if os.environ.get(REPORTS_DIR_ENV):
        return Path(os.environ[REPORTS_DIR_ENV])
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d / "reports"
    return here / "reports"
