"""Paths as a user types them: where a relative model or image path is read from, and the built-in names.

A relative path (``-p images data/our-set``, ``model = "models/dit"``) means what it means in the
user's shell, wherever the code that opens it runs:

- under ``tclab run`` (and ``tclab schedule run``) the notebook's kernel works in the notebook's own
  folder, so the runner passes its caller's folder in ``$TCLAB_CALLER_CWD`` and paths are read from
  there (a jobs file's paths: from the jobs file's folder);
- in a notebook opened by hand in JupyterLab (working directory = ``notebooks/`` of the checkout),
  relative paths are read from the **repository root**, so the same text works in both places;
- everywhere else (the CLI, a script, a test), from the working directory.

Built-in names, valid anywhere (defined here, so that modules below ``tclab.models`` can tell a name
from a path): the models :data:`BUILTIN_MODELS` (``shapes-dit`` and the DiT presets, loaded by
``tclab.models.load_dit``) and the image set ``shapes``, the committed stand-in set (``data/shapes`` of
the checkout; written by ``tclab make-images`` into the artefact store when tclab is installed without
its checkout). To use a folder that happens to be called ``shapes``, write ``./shapes``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .env import CALLER_CWD_ENV, HOME_ENV

PACKAGE_DIR = Path(__file__).resolve().parent
#: The folder holding the ``tclab`` package: the repository root in a source checkout (``pip install -e .``).
PROJECT_ROOT = PACKAGE_DIR.parent
#: The stand-in image set's built-in name, and how it is made when the checkout's copy is absent.
STAND_IN_IMAGES = "shapes"
STAND_IN_SPEC = {"per_class": 50, "seed": 1, "resolution": 32}
#: The model names that are not folders: the embedded model and the words that mean it, and the DiT
#: architecture presets named as in the DiT repo (``tclab.models.PRESETS`` holds one factory a name;
#: ``tests/test_models.py`` keeps the two lists equal).
EMBEDDED_MODEL = "shapes-dit"
EMBEDDED_ALIASES = ("embedded", "default")
PRESET_MODELS = tuple(f"DiT-{size}/{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8))
BUILTIN_MODELS = frozenset({EMBEDDED_MODEL, *EMBEDDED_ALIASES, *PRESET_MODELS})


class PathNotFoundError(FileNotFoundError):
    """A path the user gave does not exist; the message says where it was looked for and why there."""


def tclab_home() -> Path:
    """The artefact store's folder (``tclab.artefacts``): ``$TCLAB_HOME``, else ``$XDG_CACHE_HOME/tclab``,
    else ``~/.cache/tclab`` (not created here)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "tclab"


def repo_root() -> Path | None:
    """The source checkout tclab runs from (editable install), or None for an installed package."""
    root = PROJECT_ROOT
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def base_dir() -> tuple[Path, str]:
    """The folder relative paths are read from, and why (a phrase for messages)."""
    caller = os.environ.get(CALLER_CWD_ENV)
    if caller:
        return Path(caller), "the folder `tclab run` was called from"
    cwd = Path.cwd()
    root = repo_root()
    if root is not None and cwd.resolve() == (root / "notebooks").resolve():
        return root, "the repository root (this notebook runs in the checkout's notebooks/ folder)"
    return cwd, "the working directory"


def resolve_path(path: str | os.PathLike, what: str = "path", must_exist: bool = True) -> Path:
    """``path`` as the user meant it: ``~`` expanded, a relative path read from :func:`base_dir`.

    Raises :class:`PathNotFoundError` naming the absolute path looked at (and why there) when
    ``must_exist`` and nothing is there.
    """
    if not isinstance(path, (str, os.PathLike)) or str(path).strip() == "":
        raise TypeError(f"{what} must be a path (text), got {type(path).__name__} {path!r}")
    p = Path(path).expanduser()
    if p.is_absolute():
        if must_exist and not p.exists():
            raise PathNotFoundError(f"{what} {str(path)!r} not found: nothing at {p}")
        return p
    base, why = base_dir()
    full = (base / p).resolve()
    if must_exist and not full.exists():
        raise PathNotFoundError(f"{what} {str(path)!r} not found: looked at {full} (relative paths are read from "
                                f"{why}, {base}); give an absolute path or one relative to that folder")
    return full


def stand_in_images() -> Path:
    """The stand-in image set: the checkout's ``data/shapes``, else made once in the artefact store."""
    root = repo_root()
    if root is not None and (root / "data" / STAND_IN_IMAGES).is_dir():
        return root / "data" / STAND_IN_IMAGES
    from .shapes import ShapesConfig, write_shapes_dataset

    out = tclab_home() / "data" / STAND_IN_IMAGES
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        write_shapes_dataset(tmp, ShapesConfig(**STAND_IN_SPEC))
        tmp.replace(out)
    return out


def resolve_images(images: str | os.PathLike) -> Path:
    """An image-folder parameter: the built-in ``"shapes"`` or a path (see :func:`resolve_path`)."""
    if isinstance(images, str) and images == STAND_IN_IMAGES:
        return stand_in_images()
    return resolve_path(images, what="image folder")


#: Notebook parameters that name a path, and what must be there: checked by :func:`check_path_parameters`
#: before a kernel starts, so a mistyped path is refused at once (not in a failed run). Values that are
#: built-in names (``shapes``, :data:`BUILTIN_MODELS`, ``auto``) are not paths.
PATH_PARAMETERS = {"images": "folder", "model": "folder", "labels": "file", "classifier": "file",
                   "inception_weights": "file", "predictor": "file"}
_NOT_PATHS = {"images": {STAND_IN_IMAGES}, "labels": {"auto", "unconditional"}, "predictor": {"auto"}}


@contextlib.contextmanager
def reading_from(caller_cwd: str | os.PathLike | None = None) -> Iterator[None]:
    """Relative paths are read from ``caller_cwd`` (default: the working directory) inside the block, and
    in any process started in it (``$TCLAB_CALLER_CWD``); the previous value comes back afterwards."""
    old = os.environ.get(CALLER_CWD_ENV)
    os.environ[CALLER_CWD_ENV] = str(Path(caller_cwd or os.getcwd()).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CALLER_CWD_ENV, None)
        else:
            os.environ[CALLER_CWD_ENV] = old


def check_path_parameters(params: dict, caller_cwd: str | os.PathLike | None = None) -> None:
    """Refuse a path parameter that names nothing, reading relative paths from ``caller_cwd`` (as the
    kernel will). Raises :class:`PathNotFoundError` naming the parameter and where it looked."""
    with reading_from(caller_cwd):
        for name, kind in PATH_PARAMETERS.items():
            value = params.get(name)
            if not isinstance(value, str) or value.strip().lower() in _NOT_PATHS.get(name, set()):
                continue
            if name == "model" and value in BUILTIN_MODELS:  # as written (case and all), as load_dit reads it
                continue
            path = resolve_path(value, what=f"parameter {name!r}", must_exist=True)
            if kind == "folder" and not path.is_dir():
                raise PathNotFoundError(f"parameter {name!r}: {path} is a file; give a folder")
            if kind == "file" and path.is_dir():
                raise PathNotFoundError(f"parameter {name!r}: {path} is a folder; give a file")
