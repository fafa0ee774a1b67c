"""Run folders: execute a parameterised notebook into a self-describing, never-overwritten folder.

Every experiment in tclab ends up as one folder under ``reports/``::

    reports/
      index.html                                   # all runs, newest first (rewritten after every run)
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

Two ways to make a run folder:

* ``tclab run NOTEBOOK -p NAME VALUE`` (or :func:`run_notebook`) executes the notebook with
  papermill. The folder is built aside in ``reports/.staging/`` and renamed into place only when
  the notebook finished, so ``reports/`` never holds half a run, a good run is never overwritten,
  and a failure becomes a clearly marked ``*_FAILED`` folder.
* "Run All" in JupyterLab: the notebook's ``run_dir`` parameter is ``None``, so
  :func:`open_run` makes a fresh ``reports/<time>_<stem>_interactive/`` folder itself.

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
"""

from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import difflib
import hashlib
import html
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from .paths import PROJECT_ROOT
from .report import format_duration, format_number, render_report, unit_suffix
from .report import format_value as format_figure  # the index's name for it

__all__ = [
    "RUN_DIR_PARAMETER", "STAGING_DIRNAME", "FAILED_SUFFIX", "REPORT_NAME",
    "ParameterError", "RunFailedError", "RunContext", "RunInfo",
    "notebook_parameters", "validate_parameters", "check_parameter_values", "notebook_parameter_types",
    "parse_parameter_value", "load_parameters",
    "parameters_hash", "resolve_notebook", "resolve_params_file", "project_notebooks_dir", "PROJECT_ROOT",
    "run_notebook", "open_run", "provenance", "environment", "git_state",
    "list_runs", "write_index", "render_html",
]

#: The parameter papermill injects to tell a notebook which folder it writes into.
RUN_DIR_PARAMETER = "run_dir"
#: Runs are assembled in ``<reports>/.staging/<name>/`` and renamed into place when complete.
STAGING_DIRNAME = ".staging"
#: Suffix of the folder a failed run leaves behind.
FAILED_SUFFIX = "_FAILED"
#: The code-free HTML rendering of the executed notebook, inside each run folder.
REPORT_NAME = "report.html"
#: Packages whose versions every provenance.json records (read from metadata, never imported).
KEY_PACKAGES = ("torch", "diffusers", "numpy", "papermill", "nbformat", "nbconvert", "matplotlib",
                "pandas", "pyyaml")

_TIME_FORMAT = "%Y%m%dT%H%M%SZ"   # sorts lexically in time order, safe in file names
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# YAML 1.1 reads "1e-3" as a string (it wants "1.0e-3"); people typing -p lr 1e-3 mean a float.
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ParameterError(ValueError):
    """A parameter name or value the notebook cannot take; raised before anything runs."""


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


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

def _read_notebook(notebook: str | os.PathLike):
    import nbformat

    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"notebook {str(path)!r} not found; give the path to an .ipynb file")
    return nbformat.read(path, as_version=4)


def _parameters_cell(nb, where: str):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ParameterError(
            f"{where} has no cell tagged 'parameters'. Put the run's knobs (literals only, and "
            f"'{RUN_DIR_PARAMETER} = None') in one code cell and give it the tag 'parameters' "
            "(JupyterLab: property inspector > Cell Tags).")
    if len(cells) > 1:
        raise ParameterError(f"{where} has {len(cells)} cells tagged 'parameters'; keep exactly one")
    return cells[0]


def notebook_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The notebook's parameters and their defaults, in the order its ``parameters`` cell sets them.

    The cell tagged ``parameters`` is the contract between a notebook and ``tclab run``: the names
    it assigns are the only names ``-p``/``-f`` may set, and its values are the defaults. House
    style says it holds only literals (numbers, strings, booleans, ``None``, lists, tuples, dicts),
    so the defaults are read with :func:`ast.literal_eval` without running anything. The result
    includes ``run_dir``, which every cooperating notebook must declare (``run_dir = None``).

    Raises :class:`ParameterError` if there is no such cell, if it is not plain Python, if it does
    something other than assign literals to names, or if it lacks ``run_dir``.
    """
    where = f"notebook {str(notebook)!r}"
    cell = _parameters_cell(_read_notebook(notebook), where)
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as e:
        raise ParameterError(f"the parameters cell of {where} is not valid Python: {e}") from None
    out: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            name, value = stmt.target.id, stmt.value
        else:
            raise ParameterError(
                f"the parameters cell of {where} line {stmt.lineno} is not 'name = literal': "
                f"{ast.get_source_segment(cell.source, stmt)!r}. Keep only literal assignments there "
                "and move computation to the next cell.")
        try:
            out[name] = ast.literal_eval(value)
        except ValueError:
            raise ParameterError(
                f"parameter {name!r} in {where} has a non-literal default "
                f"{ast.get_source_segment(cell.source, value)!r}; use a literal (number, string, "
                "bool, None, list, dict) and derive other values in a later cell.") from None
    if RUN_DIR_PARAMETER not in out:
        raise ParameterError(
            f"{where} does not declare '{RUN_DIR_PARAMETER}' in its parameters cell; add "
            f"'{RUN_DIR_PARAMETER} = None' there and open the run with "
            f"'run = runs.open_run({RUN_DIR_PARAMETER})' so tclab can tell it where to write.")
    return out


def validate_parameters(params: Mapping[str, Any], valid: Iterable[str], notebook: str = "the notebook") -> None:
    """Refuse any name in ``params`` that the notebook's parameters cell does not define.

    Papermill itself would inject an unknown name silently and the notebook would ignore it, so
    a typo (``num_step``) would run the default and look like a result. ``run_dir`` is refused
    too: tclab sets it. The error lists the valid names and the nearest match.
    """
    valid = [v for v in valid if v != RUN_DIR_PARAMETER]
    if RUN_DIR_PARAMETER in params:
        raise ParameterError(f"'{RUN_DIR_PARAMETER}' is set by tclab run (the run folder); do not pass it")
    unknown = [k for k in params if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)} for {notebook}; "
            f"its parameters cell defines: {', '.join(valid) or '(none)'}")


#: Type names a parameters cell may annotate with (``classes: list | None = None``, ``reductions: list[float]``).
_TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "None": type(None)}


@dataclass(frozen=True)
class ParameterType:
    """What a parameter accepts: ``types`` (None = anything) and, for lists, ``element`` types."""

    types: tuple[type, ...] | None
    element: tuple[type, ...] | None = None


def _annotation(node: ast.AST, where: str, name: str) -> ParameterType:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        a, b = _annotation(node.left, where, name), _annotation(node.right, where, name)
        return ParameterType(a.types + b.types, a.element or b.element)
    if isinstance(node, ast.Constant) and node.value is None:
        return ParameterType((type(None),))
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "list":
        return ParameterType((list,), _annotation(node.slice, where, name).types)
    if isinstance(node, ast.Name) and node.id in _TYPE_NAMES:
        t = _TYPE_NAMES[node.id]
        return ParameterType((int, float) if t is float else (t,))
    raise ParameterError(f"parameter {name!r} in {where} is annotated {ast.unparse(node)!r}; use int, float, str, "
                         "bool, list, list[float], dict and None joined by |")


def _of_default(value: Any) -> ParameterType:
    """An unannotated parameter takes values like its default: an int default integers, a float default
    numbers, a list default a list whose elements are like the default's (when those share one type)."""
    if value is None:
        return ParameterType(None)
    if isinstance(value, bool):
        return ParameterType((bool,))
    if isinstance(value, int):
        return ParameterType((int,))
    if isinstance(value, float):
        return ParameterType((int, float))
    if isinstance(value, (list, tuple)):
        kinds = {_of_default(v).types for v in value}
        element = kinds.pop() if len(kinds) == 1 else None
        return ParameterType((list,), element if element != (dict,) else None)
    return ParameterType((type(value),))


def notebook_parameter_types(notebook: str | os.PathLike,
                             defaults: Mapping[str, Any] | None = None) -> dict[str, ParameterType]:
    """What each parameter accepts: its annotation in the parameters cell (``labels: str | dict =
    "auto"``), else the type of its default (see :func:`_of_default`; ``defaults``: the notebook's,
    when already read)."""
    where = f"notebook {str(notebook)!r}"
    tree = ast.parse(_parameters_cell(_read_notebook(notebook), where).source)
    defaults = notebook_parameters(notebook) if defaults is None else defaults
    out: dict[str, ParameterType] = {}
    for stmt in tree.body:
        name = stmt.targets[0].id if isinstance(stmt, ast.Assign) else stmt.target.id
        out[name] = _annotation(stmt.annotation, where, name) if isinstance(stmt, ast.AnnAssign) else \
            _of_default(defaults[name])
    return out


def _non_finite(value: Any, path: str) -> str | None:
    """The first NaN or infinity inside ``value`` (numbers, lists, dicts), as a readable path."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = enumerate(value) if isinstance(value, (list, tuple)) else value.items() if isinstance(value, dict) else ()
    for k, v in items:
        hit = _non_finite(v, f"{path}[{k!r}]")
        if hit:
            return hit
    return None


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, tuple):
        return list in types
    return isinstance(value, types)


def _type_text(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(names[t] for t in types if not (t is int and float in types))


def check_parameter_values(params: Mapping[str, Any], notebook: str | os.PathLike) -> None:
    """Refuse a value of the wrong type for its parameter, and any NaN or infinity, before a kernel starts.

    Types come from :func:`notebook_parameter_types`. Ranges (``num_steps >= 1``) are checked by the
    configs the notebook builds, naming the field.
    """
    defaults = notebook_parameters(notebook)
    types = notebook_parameter_types(notebook, defaults)
    where = f"notebook {Path(notebook).name}"
    for name, value in params.items():
        bad = _non_finite(value, name)
        if bad:
            raise ParameterError(f"parameter {bad} of {where} is {value!r}: NaN and infinity are not accepted; "
                                 f"give a finite number (default: {defaults.get(name)!r})")
        want = types.get(name, ParameterType(None))
        if want.types is not None and not _is(value, want.types):
            raise ParameterError(f"parameter {name!r} of {where} must be {_type_text(want.types)}, got "
                                 f"{type(value).__name__} {value!r} (default: {defaults.get(name)!r}); -p reads its "
                                 "value as YAML: 10 is an integer, 0.5 a number, abc text, [1, 2] a list")
        if want.element is not None and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if not _is(v, want.element):
                    raise ParameterError(f"parameter {name}[{i}] of {where} must be {_type_text(want.element)}, "
                                         f"got {type(v).__name__} {v!r} (default: {defaults.get(name)!r})")


def parse_parameter_value(text: str) -> Any:
    """Read a ``-p NAME VALUE`` value as a YAML scalar, the way papermill's ``-y`` would.

    ``10`` -> int, ``0.5`` and ``1e-3`` -> float, ``true``/``false`` -> bool, ``null`` -> None,
    ``[1, 2]`` -> list, ``shapes-dit`` -> str. Quote to force a string: ``-p name "'10'"``.
    An empty value stays the empty string (write ``null`` for None); YAML dates stay strings.
    """
    if text == "":
        return ""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _SCI_FLOAT.fullmatch(text.strip()):
        return float(text)
    if isinstance(value, (_dt.date, _dt.datetime)):
        return text
    return value


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """Parse a YAML file; a missing file or invalid YAML raises ``error`` naming ``what`` and the path."""
    if not path.is_file():
        raise error(f"{what} {str(path)!r} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{what} {str(path)!r} is not valid YAML: {e}") from None


def load_parameters(param_file: str | os.PathLike | None = None,
                    overrides: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
    """Merge a YAML parameter file (``-f``) and ``-p NAME VALUE`` pairs; ``-p`` wins.

    The file must hold a mapping ``name: value`` (the presets in ``notebooks/params/*.yaml``).
    The result holds only what was asked for; the notebook's defaults fill the rest at run time.
    """
    merged: dict[str, Any] = {}
    if param_file is not None:
        path = Path(param_file)
        loaded = read_yaml(path, "parameter file", ParameterError)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ParameterError(f"parameter file {str(path)!r} must hold a mapping 'name: value', "
                                 f"got a {type(loaded).__name__}")
        merged.update({str(k): v for k, v in loaded.items()})
    for name, text in overrides:
        try:
            merged[name] = parse_parameter_value(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ParameterError(f"-p {name} {text!r} is not a valid YAML value ({problem}); quote text, write lists "
                                 "as [1, 2] and mappings as '{a: 1, b: 2}'") from None
    return merged


# --------------------------------------------------------------------------------------------
# Notebook and parameter-file names as a user types them
# --------------------------------------------------------------------------------------------

# PROJECT_ROOT (tclab.paths): the folder holding the tclab package, where notebooks/ and notebooks/params/ live.
NOTEBOOKS_DIRNAME = "notebooks"
PARAMS_DIRNAME = "params"


def project_notebooks_dir() -> Path:
    """``notebooks/`` of the project this tclab was imported from (it need not exist)."""
    return PROJECT_ROOT / NOTEBOOKS_DIRNAME


def _notebook_number(stem: str) -> str | None:
    head = stem.split("_", 1)[0]
    return head if head.isdigit() else None


def _list_names(paths: Iterable[Path]) -> str:
    names = [p.stem for p in paths]
    return ", ".join(names) if names else "(none)"


def resolve_notebook(name: str | os.PathLike, *, cwd: str | os.PathLike | None = None,
                     notebooks_dir: str | os.PathLike | None = None) -> Path:
    """The notebook ``name`` means, as an absolute path; ``tclab run NAME`` calls this.

    In order, the first that exists wins:

    1. ``name`` as a path relative to ``cwd`` (default: the working directory), or absolute:
       a file the user points at is always the one run.
    2. A relative path with a folder part (``notebooks/01_token_redundancy.ipynb``) relative to the
       project root, so the README's commands work from any working directory.
    3. A bare name, looked up in ``notebooks_dir`` (default: the project's ``notebooks/``, found
       from where this package is installed): the file name (``01_token_redundancy.ipynb``), its
       stem (``01_token_redundancy``), its number (``01`` or ``1``), or a prefix of the stem that
       names one notebook (``01_token``).

    Raises ``FileNotFoundError`` saying where it looked and listing the notebooks that exist (with
    close matches first) when nothing matches, or the candidates when a name is ambiguous.
    """
    text = os.fspath(name).strip()
    if not text:
        raise FileNotFoundError("no notebook given; name one of the project's notebooks "
                                f"({_list_names(sorted(project_notebooks_dir().glob('*.ipynb')))}) or give a path")
    here = Path(cwd) if cwd is not None else Path.cwd()
    folder = Path(notebooks_dir) if notebooks_dir is not None else project_notebooks_dir()
    typed = Path(text).expanduser()
    direct = typed if typed.is_absolute() else here / typed
    if direct.is_file():
        return direct.resolve()
    if direct.is_dir():
        raise FileNotFoundError(f"notebook {text!r} is a folder ({direct.resolve()}); give an .ipynb file in it "
                                f"({_list_names(sorted(direct.glob('*.ipynb')))})")
    available = sorted(folder.glob("*.ipynb")) if folder.is_dir() else []
    looked = [str(direct.resolve())]
    if not typed.is_absolute() and len(typed.parts) > 1:
        at_root = PROJECT_ROOT / typed
        if at_root.is_file():
            return at_root.resolve()
        looked.append(str(at_root))
    elif not typed.is_absolute():
        stem = text[:-len(".ipynb")] if text.lower().endswith(".ipynb") else text
        key = stem.lower()
        matches = [p for p in available if p.stem.lower() == key]
        if not matches and stem.isdigit():
            matches = [p for p in available if _notebook_number(p.stem) is not None
                       and int(_notebook_number(p.stem)) == int(stem)]
        if not matches:
            matches = [p for p in available if p.stem.lower().startswith(key)]
        if len(matches) == 1:
            return matches[0].resolve()
        if len(matches) > 1:
            raise FileNotFoundError(f"notebook {text!r} is ambiguous: it matches {_list_names(matches)} in "
                                    f"{folder}; give more of the name, e.g. {matches[0].stem}")
        looked.append(f"{folder}{os.sep}{stem}*.ipynb")
    if not folder.is_dir():
        where = (f"there is no notebooks folder at {folder} (tclab is imported from {PROJECT_ROOT}, which is not "
                 "a source checkout): give the path to the .ipynb")
    else:
        close = difflib.get_close_matches(Path(text).stem, [p.stem for p in available], n=3, cutoff=0.4)
        hint = f"Did you mean {' or '.join(close)}? " if close else ""
        where = (f"{hint}The notebooks in {folder} are: {_list_names(available)}. Name one by its number "
                 "(tclab run 01), its name (tclab run 01_token_redundancy) or give a path to an .ipynb file")
    raise FileNotFoundError(f"notebook {text!r} not found: looked at {' and '.join(looked)}. {where}")


def resolve_params_file(name: str | os.PathLike, notebook: str | os.PathLike, *,
                        cwd: str | os.PathLike | None = None) -> Path:
    """The parameter file ``tclab run NOTEBOOK -f NAME`` means, as an absolute path.

    ``NAME`` as a path relative to ``cwd`` (or absolute) wins if it exists; a relative path with a
    folder part is then tried relative to the project root (``-f notebooks/params/01_smoke.yaml``
    from anywhere). A bare name is a preset in the notebook's ``params/`` folder (next to the
    notebook): ``smoke`` or ``01_smoke`` (with or without ``.yaml``) both mean
    ``notebooks/params/01_smoke.yaml`` for notebook 01. Raises :class:`ParameterError` saying where
    it looked and listing the notebook's presets.
    """
    text = os.fspath(name).strip()
    nb = Path(notebook)
    here = Path(cwd) if cwd is not None else Path.cwd()
    params_dir = nb.resolve().parent / PARAMS_DIRNAME
    number = _notebook_number(nb.stem)
    typed = Path(text).expanduser()
    direct = typed if typed.is_absolute() else here / typed
    if direct.is_file():
        return direct.resolve()
    looked = [str(direct.resolve())]
    if text and not typed.is_absolute() and len(typed.parts) > 1:
        at_root = PROJECT_ROOT / typed
        if at_root.is_file():
            return at_root.resolve()
        looked.append(str(at_root))
    elif text and not typed.is_absolute():
        stem = re.sub(r"\.ya?ml$", "", text, flags=re.IGNORECASE)
        names = [stem] + ([f"{number}_{stem}"] if number and not stem.startswith(f"{number}_") else [])
        for n in names:
            for ext in (".yaml", ".yml"):
                if (params_dir / (n + ext)).is_file():
                    return (params_dir / (n + ext)).resolve()
        looked.append(" or ".join(str(params_dir / (n + ".yaml")) for n in names))
    own = sorted(params_dir.glob(f"{number}_*.y*ml")) if number and params_dir.is_dir() else []
    presets = ", ".join(f"{p.stem[len(number) + 1:]} ({p.name})" for p in own) if own else "(none)"
    raise ParameterError(f"parameter file {text!r} not found: looked at {' and '.join(looked)}. Presets of "
                         f"{nb.stem} in {params_dir}: {presets}; give one by name (-f smoke) or a path to a YAML file")


def _plain(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, so YAML/JSON/hashes see plain data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return value


def parameters_hash(params: Mapping[str, Any], length: int = 8) -> str:
    """A short, stable hash of a parameter set: the default tag, so equal settings group together."""
    canon = json.dumps(_plain(dict(params)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:length]


def _safe_name(text: str, what: str, max_len: int = 40) -> str:
    clean = _NAME_UNSAFE.sub("-", str(text)).strip("-._")[:max_len]
    if not clean:
        raise ParameterError(f"{what} {text!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return clean


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------

def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Commit and dirtiness of the git checkout holding ``path`` (default: the tclab sources).

    ``dirty`` counts untracked files too: an uncommitted new module changes what ran. Uses
    ``--no-optional-locks`` so it never contends with someone committing. ``None`` outside git.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(where), *args], capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
        root = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [line for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed_files": len(changed), "repo": root}


def environment() -> dict[str, Any]:
    """Where this Python process runs: interpreter, platform, host, and :data:`KEY_PACKAGES` versions."""
    from . import __version__

    return {
        "tclab_version": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": {name: _package_version(name) for name in KEY_PACKAGES},
    }


def provenance(**extra: Any) -> dict[str, Any]:
    """A provenance record for this process: :func:`environment` plus :func:`git_state` plus ``extra``.

    :func:`run_notebook` adds notebook, parameters, times, status and the ``identity`` block the
    notebook put in summary.json; the environment is the kernel's when the notebook opened its run
    (the kernel is what ran the code), else the runner's.
    """
    env = environment()
    return {"tclab_version": env["tclab_version"], "git": git_state(), "hostname": env["hostname"],
            "environment": env, **extra}


# --------------------------------------------------------------------------------------------
# The notebook side: RunContext
# --------------------------------------------------------------------------------------------

_KERNEL_ENV_FILE = ".kernel_environment.json"   # written by open_run under papermill, merged + removed


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
                write_index(self.reports_dir)
        return out


REPORTS_DIR_ENV = "TCLAB_REPORTS_DIR"


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


# --------------------------------------------------------------------------------------------
# The runner side: run_notebook
# --------------------------------------------------------------------------------------------

def _unique_path(p: Path) -> Path:
    """``p``, or ``p-2``, ``p-3``... whichever does not exist yet: a run never lands on another."""
    if not p.exists():
        return p
    i = 2
    while p.with_name(f"{p.name}-{i}").exists():
        i += 1
    return p.with_name(f"{p.name}-{i}")


@contextlib.contextmanager
def _kernel_imports_this_tclab(caller_cwd: str | os.PathLike | None = None) -> Iterator[None]:
    """Let the kernel import the same tclab as this process, and read relative paths as the caller meant.

    The kernel is a separate process started with a copy of ``os.environ`` and its working
    directory set to the notebook's folder, so a source checkout on ``sys.path`` here is invisible
    there. Prepending the checkout to PYTHONPATH while the kernel starts fixes that. The caller's
    folder goes to ``$TCLAB_CALLER_CWD`` (``tclab.paths``), so ``-p images data/set`` means what it
    means in the caller's shell. Both variables are restored afterwards so nothing leaks.
    """
    from .paths import reading_from

    root, old = str(PROJECT_ROOT), os.environ.get("PYTHONPATH")
    with _environment({"PYTHONPATH": root if not old else root + os.pathsep + old}), reading_from(caller_cwd):
        yield


KERNEL_LOG = "kernel.log"
#: The kernel's progress bars, one status line per update (tclab.progress); kept only for failed runs.
PROGRESS_LOG = "progress.log"


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


_PID_FILE = ".runner.pid"


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
        write_index(reports)
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
    from .paths import check_path_parameters

    # a mistyped path, or a labels mapping naming a folder the images lack: refused now, not in the kernel
    check_path_parameters(dict(params), caller_cwd)
    if "labels" in params:
        from .labels import check_label_folders

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
    from .progress import PROGRESS_FILE_ENV, ProgressFollower

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
    write_index(reports)

    if error is not None:
        if not isinstance(error, Exception):   # KeyboardInterrupt, SystemExit: keep their meaning
            raise error
        raise RunFailedError(f"notebook {notebook} failed: {_summary_line(error)}; see {final / 'error.txt'}",
                             final) from error
    return final


# --------------------------------------------------------------------------------------------
# reports/index.html
# --------------------------------------------------------------------------------------------

INDEX_FIGURES = 3   # headline figures per run on the index: enough to recognise the answer, few enough to scan
RUN_STATUSES = ("ok", "failed", "running", "unknown")


@dataclass
class KeyFigure:
    """One headline figure of a run as the index shows it: ``label: value unit``.

    ``key`` is the stable name (a ``report.key_numbers`` key or a ``headline`` key of summary.json);
    the index compares figures of the same key across runs of one notebook+tag.
    """

    key: str
    label: str
    value: Any
    unit: str = ""


@dataclass
class RunInfo:
    """One run folder as index.html sees it, read defensively from provenance.json and summary.json.

    A missing or corrupt file never raises: the run is listed with what is known, and ``problems``
    says what could not be read. A scheduled job runs under its name as tag (``tclab.jobs``), so
    ``group`` (notebook, tag) is one job's history.
    """

    path: Path
    status: str                  # "ok", "failed", "running" (interactive, unfinished) or "unknown"
    notebook: str                # the notebook's stem
    tag: str
    start_utc: str               # ISO 8601 UTC; from the folder name when provenance lacks it; "" if unknown
    headline: dict[str, Any]
    report: str | None           # file name of the HTML report inside the folder, if any
    error: str | None = None     # provenance's one-line error of a failed run
    model: str | None = None     # the ``model`` parameter (a load_dit spec or a model folder)
    model_sha256: str | None = None    # identity.model_weights_sha256
    images: str | None = None    # the ``images`` parameter (an image folder, or "shapes")
    images_sha256: str | None = None   # identity.images_manifest_sha256
    duration_s: float | None = None
    figures: list[KeyFigure] = field(default_factory=list)   # what the index shows, in order
    problems: list[str] = field(default_factory=list)        # e.g. "summary.json is not valid JSON"

    @property
    def group(self) -> tuple[str, str]:
        """Runs of the same notebook and tag are the same question asked again over time."""
        return (self.notebook, self.tag)

    def value_of(self, key: str) -> Any:
        """The value of figure ``key`` in this run (a shown figure, else its headline entry); None if absent."""
        return next((f.value for f in self.figures if f.key == key), self.headline.get(key))


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


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _text(v: Any) -> str | None:
    """A provenance/summary value as display text; None for missing or empty."""
    if v is None:
        return None
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s.strip() or None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _parse_iso(s: str | None) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None
    except ValueError:
        return None
    return t.replace(tzinfo=_dt.timezone.utc) if t is not None and t.tzinfo is None else t


def _start_from_folder_name(name: str) -> str:
    """'20260614T103015Z_nb_tag' -> '2026-06-14T10:30:15.000Z'; '' when the name carries no start time."""
    try:
        t = _dt.datetime.strptime(name.split("_", 1)[0], _TIME_FORMAT).replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return ""
    return _iso(t)


def _key_figures(summary: dict[str, Any], headline: dict[str, Any]) -> list[KeyFigure]:
    """The figures the index shows for a run.

    summary.json ``report.key_numbers`` (``[{"key", "label", "value", "unit"}]``, written for the report)
    picked and ordered by ``report.index_keys``; without ``index_keys``, the first key numbers. Older runs
    without key numbers: the first numeric, bool or string ``headline`` entries, labelled by their key.
    """
    report = _dict(summary.get("report"))
    numbers = report.get("key_numbers") if isinstance(report.get("key_numbers"), list) else []
    by_key = {n["key"]: n for n in numbers if isinstance(n, dict) and isinstance(n.get("key"), str)}
    keys = report.get("index_keys")
    chosen = ([by_key[k] for k in keys if isinstance(k, str) and k in by_key] if isinstance(keys, list) and keys
              else list(by_key.values()))   # no index_keys (or none given): the first key numbers
    if chosen:
        return [KeyFigure(n["key"], _text(n.get("label")) or n["key"], n.get("value"), _text(n.get("unit")) or "")
                for n in chosen[:INDEX_FIGURES]]
    return [KeyFigure(str(k), str(k), v) for k, v in headline.items()
            if isinstance(v, (int, float, str, bool))][:INDEX_FIGURES]


def _safe_file(d: Path, name: str | None) -> str | None:
    """``name`` if it is a plain file name of an existing file in ``d`` (never a path out of it)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    return name if (d / name).is_file() else None


def read_run(d: Path) -> RunInfo:
    """One run folder as :class:`RunInfo`; never raises on missing or corrupt provenance.json/summary.json."""
    problems: list[str] = []
    prov = _read_json_noting(d / "provenance.json", problems)
    summary = _read_json_noting(d / "summary.json", problems)
    status = _text(prov.get("status")) or ("failed" if d.name.endswith(FAILED_SUFFIX) else "unknown")
    nb = _text(prov.get("notebook"))
    params = _dict(prov.get("parameters"))
    identity = {**_dict(prov.get("identity")), **_dict(summary.get("identity"))}
    headline = _dict(summary.get("headline"))
    start = _text(prov.get("start_utc")) or _start_from_folder_name(d.name)
    duration = _number(prov.get("duration_s"))
    if duration is None:   # an interactive run records only its start and end
        t0, t1 = _parse_iso(start), _parse_iso(_text(prov.get("end_utc")))
        duration = (t1 - t0).total_seconds() if t0 and t1 and t1 >= t0 else None
    return RunInfo(
        path=d, status=status, notebook=Path(nb).stem if nb else "?", tag=_text(prov.get("tag")) or "",
        start_utc=start, headline=headline,
        report=_safe_file(d, _text(prov.get("report"))) or _safe_file(d, REPORT_NAME),
        error=_text(prov.get("error")),
        model=_text(params.get("model")) or _text(identity.get("model")),
        model_sha256=_text(identity.get("model_weights_sha256")),
        images=_text(params.get("images")), images_sha256=_text(identity.get("images_manifest_sha256")),
        duration_s=duration, figures=_key_figures(summary, headline), problems=problems)


def list_runs(reports_dir: str | os.PathLike) -> list[RunInfo]:
    """All run folders under ``reports_dir``, newest first. Staging and hidden folders are skipped.

    A run folder is one holding provenance.json or summary.json (readable or not).
    """
    reports = Path(reports_dir)
    runs: list[RunInfo] = []
    if not reports.is_dir():
        return runs
    for d in reports.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        if not ((d / "provenance.json").exists() or (d / "summary.json").exists()):
            continue   # not a run folder
        runs.append(read_run(d))
    runs.sort(key=lambda r: (r.start_utc, r.path.name), reverse=True)
    return runs


def _when(iso: str) -> str:
    """'2025-06-14T10:30:15.123Z' -> '2025-06-14 10:30:15' for the index (full value in provenance)."""
    return iso.replace("T", " ")[:19] if iso else "?"


def _delta(now: Any, before: Any, unit: str = "", key: str = "") -> tuple[str, bool]:
    """(text, moved): '+16' / '-0.02' / '=' / 'changed' for a figure against its previous value."""
    if _number(now) is not None and _number(before) is not None:
        d = now - before
        if d == 0:
            return "=", False
        text = format_number(abs(d), unit, key)
        if float(text) == 0:               # a real but invisible change at this rounding
            return "\u2248", True
        return ("+" if d > 0 else "-") + text, True
    return ("=", False) if now == before else ("changed", True)


def _short_name(value: str, max_len: int = 28) -> str:
    """A model or image-set spec for a table cell: a path's last folder name, at most ``max_len`` long."""
    parts = [p for p in re.split(r"[\\/]+", value) if p]
    return _clip(parts[-1] if parts else value, max_len)


_INDEX_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em 1.5em;
       color: #1f2328; background: #fff; }
h1 { font-size: 1.55em; margin: 0 0 .15em; } h2 { font-size: 1.2em; margin: 1.8em 0 .25em; }
p { margin: .3em 0 .7em; max-width: 75em; } .lead { color: #444; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; border: 1px solid #d8dee4; border-radius: 6px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: .45em .65em; text-align: left; vertical-align: top; border-bottom: 1px solid #eaeef2; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; border-bottom: 1px solid #d8dee4; }
tbody tr:last-child td { border-bottom: none; } tbody tr:hover { background: #f8faff; }
td.nowrap, .nowrap { white-space: nowrap; } td.num { text-align: right; white-space: nowrap; }
#jobs td:nth-child(3), #jobs td:nth-child(4), #jobs td:nth-child(5) { text-align: right; }
.status { display: inline-block; padding: 0 .55em; border-radius: 1em; font-size: .85em; font-weight: 600; }
.status.ok { background: #dcf3e3; color: #116329; } .status.failed { background: #ffe3e6; color: #a40e26; }
.status.running { background: #fff1c2; color: #7a5c00; } .status.unknown { background: #eaeef2; color: #57606a; }
.err { color: #a40e26; font-size: .85em; max-width: 24em; overflow-wrap: anywhere; margin-top: .2em; }
.warn { color: #7a5c00; font-size: .85em; max-width: 24em; margin-top: .2em; }
.hash { color: #6e7781; font-size: .85em; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .92em; }
td.tag { max-width: 12em; } td.tag code { overflow-wrap: break-word; } td.spec span, td.spec { white-space: nowrap; }
.vs { font-size: .85em; color: #57606a; margin-top: .25em; }
ul.figs { margin: 0; padding: 0; list-style: none; min-width: 14em; } ul.figs li { margin: 0 0 .1em; }
.lbl { color: #57606a; }
.delta { font-size: .82em; padding: 0 .3em; border-radius: 3px; color: #6e7781; white-space: nowrap; }
.delta.moved { background: #fff1c2; color: #5c4500; }
.muted { color: #8c959f; } td.links a { display: block; }
.filters { display: flex; flex-wrap: wrap; gap: .5em 1em; align-items: center; margin: .8em 0 .6em; }
.filters input[type=search] { width: 22em; max-width: 100%; padding: .3em .5em; font: inherit; }
.filters select { padding: .25em; font: inherit; } #f-count { color: #57606a; }
[hidden] { display: none !important; }
th.sort { cursor: pointer; user-select: none; } th.sort:hover { background: #eef1f4; }
th.sort::after { content: " \\2195"; color: #afb8c1; }
th[aria-sort=ascending]::after { content: " \\25b2"; color: #57606a; }
th[aria-sort=descending]::after { content: " \\25bc"; color: #57606a; }
.note { color: #57606a; font-size: .9em; }
"""

# Filter and sort without a server (works from file://; no external resources). Without JavaScript the
# filter controls stay hidden and the tables keep their newest-first order.
_INDEX_JS = """
(function () {
  "use strict";
  var each = function (list, f) { Array.prototype.forEach.call(list, f); };
  var runs = document.getElementById("runs"), box = document.getElementById("filters");
  if (runs && box) {
    var text = document.getElementById("f-text"), status = document.getElementById("f-status"),
        notebook = document.getElementById("f-notebook"), count = document.getElementById("f-count");
    var rows = Array.prototype.filter.call(runs.tBodies[0].rows, function (r) { return r.hasAttribute("data-status"); });
    var apply = function () {
      var q = text.value.trim().toLowerCase(), s = status.value, n = notebook.value, shown = 0;
      rows.forEach(function (tr) {
        var hay = (tr.textContent + " " + (tr.getAttribute("data-search") || "")).toLowerCase();
        var keep = (!q || hay.indexOf(q) >= 0) && (!s || tr.getAttribute("data-status") === s) &&
                   (!n || tr.getAttribute("data-notebook") === n);
        tr.hidden = !keep;
        if (keep) { shown += 1; }
      });
      count.textContent = shown === rows.length ? rows.length + " runs" : "showing " + shown + " of " + rows.length + " runs";
    };
    each([text, status, notebook], function (el) { el.addEventListener("input", apply); el.addEventListener("change", apply); });
    box.hidden = false;
    apply();
  }
  var NUM = /^[-+]?(\\d+\\.?\\d*|\\.\\d+)([eE][-+]?\\d+)?$/;
  var key = function (td) {
    if (!td) { return ""; }
    var v = td.getAttribute("data-sort");
    return (v === null ? td.textContent : v).trim();
  };
  var compare = function (a, b) {          // empty values last; numbers as numbers; text naturally
    if (a === "" || b === "") { return a === b ? 0 : (a === "" ? 1 : -1); }
    if (NUM.test(a) && NUM.test(b)) { return parseFloat(a) - parseFloat(b); }
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  };
  each(document.querySelectorAll("table.sortable"), function (table) {
    var heads = table.tHead.rows[0].cells, body = table.tBodies[0];
    each(heads, function (th, col) {
      if (th.classList.contains("nosort")) { return; }
      th.classList.add("sort");
      th.tabIndex = 0;
      th.title = (th.title ? th.title + " " : "") + "(click to sort)";
      var sort = function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        each(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var rs = Array.prototype.slice.call(body.rows);
        rs.sort(function (x, y) {
          var a = key(x.cells[col]), b = key(y.cells[col]);
          return (a === "" || b === "") ? compare(a, b) : dir * compare(a, b);
        });
        rs.forEach(function (r) { body.appendChild(r); });
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sort(); }
      });
    });
  });
})();
"""


def _replace_atomically(out: Path, text: str) -> None:
    """Write ``out`` through a unique temporary file in its folder, under a lock: concurrent writers
    (two runs ending together) never tear the file nor trip over each other's temporary file."""
    import fcntl
    import tempfile

    lock = os.open(out.parent / ".index.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        os.close(lock)


def _href(run: RunInfo, file: str | None = None) -> str:
    """A link into a run folder relative to index.html's folder (the one holding the run folders):
    valid wherever the reports folder is copied or mounted, and from file://."""
    from urllib.parse import quote

    return quote(run.path.name) + "/" + (quote(file) if file else "")


def _a(run: RunInfo, file: str | None, label: str, title: str | None = None) -> str:
    e = html.escape
    tip = f' title="{e(title)}"' if title else ""
    return f'<a href="{e(_href(run, file))}"{tip}>{e(label)}</a>'


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _status_class(run: RunInfo) -> str:
    return run.status if run.status in RUN_STATUSES else "unknown"


def _spec_cell(value: str | None, sha: str | None, what: str) -> str:
    """A model or image-set cell: the short name (the full spec in a tooltip), then the first 8 hex digits
    of its hash, which tell two models or image sets of one name apart."""
    e = html.escape
    if not value and not sha:
        return '<td class="spec" data-sort=""><span class="muted">-</span></td>'
    parts = []
    if value:
        short = _short_name(value)
        parts.append(f'<span title="{e(value)}">{e(short)}</span>' if short != value else e(short))
    if sha:
        parts.append(f'<code class="hash" title="{e(what)} sha256 {e(sha)}">{e(sha[:8])}</code>')
    return f'<td class="spec" data-sort="{e(_short_name(value) if value else sha or "")}">{"<br>".join(parts)}</td>'


def _figures_html(run: RunInfo, prev: RunInfo | None) -> str:
    """``label: value unit`` per figure; with ``prev``, each figure's change since that run, compactly."""
    e = html.escape
    items = []
    for f in run.figures:
        text = format_number(f.value, f.unit, f.key)
        shown = _clip(text, 40)
        value = f'<b title="{e(text)}">{e(shown)}</b>' if shown != text else f"<b>{e(text)}</b>"
        unit = e(unit_suffix(f.unit)) if text != "-" and not isinstance(f.value, (bool, str)) else ""
        delta = ""
        if prev is not None and (f.key in prev.headline or any(p.key == f.key for p in prev.figures)):
            before = prev.value_of(f.key)
            d, moved = _delta(f.value, before, f.unit, f.key)
            tip = f"was {format_figure(before, f.unit, f.key)} in the previous good run ({_when(prev.start_utc)})"
            delta = f' <span class="delta{" moved" if moved else ""}" title="{e(tip)}">{e(d)}</span>'
        items.append(f'<li><span class="lbl">{e(f.label)}:</span> <span class="nowrap">{value}{unit}{delta}</span></li>')
    return f'<ul class="figs">{"".join(items)}</ul>' if items else '<span class="muted">-</span>'


def _run_row(run: RunInfo, prev: RunInfo | None) -> str:
    e = html.escape
    status = _status_class(run)
    notes = f'<div class="err" title="{e(run.error)}">{e(_clip(run.error, 160))}</div>' if run.error else ""
    notes += "".join(f'<div class="warn">{e(p)}</div>' for p in run.problems)
    started = _a(run, run.report, _when(run.start_utc), "open the report" if run.report else "open the run folder")
    if prev is not None:   # what the changes after the figures compare with
        vs = ('<div class="vs">vs ' if run.figures else '<div class="vs">last good: ') + _a(
            prev, prev.report, _when(prev.start_utc), f"previous successful run of this notebook+tag: {prev.path.name}"
        ) + "</div>"
    else:
        vs = '<div class="vs muted">first run of this notebook+tag</div>' if run.figures else ""
    links = [_a(run, run.report, "report")] if run.report else []
    links.append(_a(run, None, "folder", run.path.name))
    if (run.path / "error.txt").is_file():
        links.append(_a(run, "error.txt", "error.txt", "the full error and traceback"))
    search = " ".join(s for s in (run.path.name, run.model, run.images, run.model_sha256, run.images_sha256,
                                  run.error) if s)
    duration = "" if run.duration_s is None else f"{run.duration_s:.3f}"
    return (f'<tr data-status="{status}" data-notebook="{e(run.notebook)}" data-search="{e(search)}">'
            f'<td class="nowrap" data-sort="{e(run.start_utc)}">{started}</td>'
            f'<td>{e(run.notebook)}</td><td class="tag"><code>{e(run.tag)}</code></td>'
            f'{_spec_cell(run.model, run.model_sha256, "model weights")}'
            f'{_spec_cell(run.images, run.images_sha256, "image manifest")}'
            f'<td data-sort="{status}"><span class="status {status}">{e(run.status)}</span>{notes}</td>'
            f'<td class="num" data-sort="{duration}">{e(format_duration(run.duration_s))}</td>'
            f'<td>{_figures_html(run, prev)}{vs}</td>'
            f'<td class="links nowrap">{"".join(links)}</td></tr>')


def _job_cell(run: RunInfo | None, figures: bool = False) -> str:
    e = html.escape
    if run is None:
        return '<td data-sort=""><span class="muted">none yet</span></td>'
    badge = "" if run.status == "ok" else f' <span class="status {_status_class(run)}">{e(run.status)}</span>'
    figs = _figures_html(run, None) if figures and run.figures else ""
    return f'<td data-sort="{e(run.start_utc)}">{_a(run, run.report, _when(run.start_utc))}{badge}{figs}</td>'


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_index(runs: list[RunInfo], now: _dt.datetime | None = None) -> str:
    """The HTML of index.html for ``runs`` (newest first, as :func:`list_runs` gives them)."""
    e = html.escape
    now = now or _utc_now()
    rows = []
    for i, run in enumerate(runs):
        prev = next((r for r in runs[i + 1:] if r.group == run.group and r.status == "ok"), None)
        rows.append(_run_row(run, prev))

    groups: dict[tuple[str, str], list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    group_rows = "".join(
        f"<tr><td>{e(nb)}</td><td><code>{e(tag)}</code></td><td>{len(rs)}</td>"
        f"<td>{sum(r.status == 'ok' for r in rs)}</td><td>{sum(r.status == 'failed' for r in rs)}</td>"
        f"{_job_cell(rs[0])}{_job_cell(next((r for r in rs if r.status == 'ok'), None), figures=True)}</tr>"
        for (nb, tag), rs in sorted(groups.items()))

    tally = ", ".join(f"{n} {s}" for s in RUN_STATUSES if (n := sum(_status_class(r) == s for r in runs)))
    notebooks = sorted({r.notebook for r in runs})
    lead = (f"{_plural(len(runs), 'run')} of {_plural(len(notebooks), 'notebook')} in this folder, newest first"
            f"{f' ({tally})' if tally else ''}. Rewritten after every run; this copy {_when(_iso(now))} UTC.")
    status_options = "".join(f'<option value="{s}">{s}</option>' for s in RUN_STATUSES
                             if any(_status_class(r) == s for r in runs))
    notebook_options = "".join(f'<option value="{e(n)}">{e(n)}</option>' for n in notebooks)
    code = "first 8 hex digits of the SHA-256 of"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>tclab runs</title><style>{_INDEX_CSS}</style></head>
<body>
<h1>tclab runs</h1>
<p class="lead">{e(lead)}</p>
<div id="filters" class="filters" hidden>
<label>Filter <input type="search" id="f-text" placeholder="any text: notebook, tag, model, error..." autocomplete="off"></label>
<label>status <select id="f-status"><option value="">all</option>{status_options}</select></label>
<label>notebook <select id="f-notebook"><option value="">all</option>{notebook_options}</select></label>
<span id="f-count" aria-live="polite"></span>
</div>
<div class="scroll">
<table id="runs" class="sortable">
<thead><tr><th aria-sort="descending" title="when the run started; the link opens its report">started (UTC)</th>
<th>notebook</th><th title="the run's tag; a scheduled job's runs carry the job's name">tag</th>
<th title="the model parameter; the code is the {code} the weights">model</th>
<th title="the images parameter; the code is the {code} the image-set manifest">image set</th>
<th>status</th><th>duration</th>
<th class="nosort" title="from summary.json; the small mark is the change since the previous successful run of the same notebook and tag">headline figures</th>
<th class="nosort">links</th></tr></thead>
<tbody>
{''.join(rows) or '<tr><td colspan="9" class="muted">no runs yet</td></tr>'}
</tbody>
</table>
</div>
<p class="note">Headline figures come from each run's summary.json. The small mark after a figure is its change
since the previous successful run of the same notebook and tag, named under the figures (hover for the old value; a
change there means the code, data or settings changed the answer). Model and image-set codes are the {code} the weights and of the
image-set manifest: the same name with another code is another model or image set.</p>
<h2>By notebook and tag</h2>
<p class="note">One row per question asked over time: a scheduled job (<code>tclab schedule</code>) runs under its
name as tag, so each job is one row.</p>
<div class="scroll">
<table id="jobs" class="sortable">
<thead><tr><th>notebook</th><th>tag</th><th>runs</th><th>ok</th><th>failed</th><th>latest</th>
<th>last good</th></tr></thead>
<tbody>
{group_rows or '<tr><td colspan="7" class="muted">no runs yet</td></tr>'}
</tbody>
</table>
</div>
<script>{_INDEX_JS}</script>
</body></html>
"""


def write_index(reports_dir: str | os.PathLike) -> Path:
    """Rewrite ``<reports_dir>/index.html``: every run, newest first, then one row per notebook+tag.

    Runs table: start (links the report), notebook, tag, model and image set (short names, hash codes),
    status (with a failed run's error), duration, two or three headline figures (summary.json
    ``report.key_numbers`` picked by ``report.index_keys``, else the first ``headline`` entries) with
    their change since the previous *successful* run of the same notebook and tag, and links (report,
    folder, error.txt). All links are relative to the reports folder. A small inline script (no
    external resources) filters and sorts the tables; without it the page still reads in order.
    Written atomically; a corrupt run folder is listed with what could be read.
    """
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    out = reports / "index.html"
    _replace_atomically(out, render_index(list_runs(reports)))
    return out
