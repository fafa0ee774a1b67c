"""Notebook parameters: the ``parameters`` cell as a contract, checked before any kernel starts.

Owns reading a notebook's ``parameters`` cell (names, literal defaults, annotated or implied types),
refusing unknown names, wrong types and NaN/infinity (:class:`ParameterError`), reading ``-p NAME
VALUE`` values and ``-f`` parameter files, and turning what a user types (``01``, ``smoke``) into
the notebook and preset files meant. The leaf of :mod:`tclab.runs`: it imports nothing else of it.
"""

from __future__ import annotations

import ast
import datetime as _dt
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..paths import PROJECT_ROOT


#: The parameter papermill injects to tell a notebook which folder it writes into.
RUN_DIR_PARAMETER = "run_dir"

# YAML 1.1 reads "1e-3" as a string (it wants "1.0e-3"); people typing -p lr 1e-3 mean a float.
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ParameterError(ValueError):
    """A parameter name or value the notebook cannot take; raised before anything runs."""


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
