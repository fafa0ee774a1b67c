"""Where a run came from (its provenance), so a result can be traced and repeated.

Owns the clock of runs (UTC, ISO 8601), the code (:func:`git_state`: commit, dirtiness), the
environment (:func:`environment`: interpreter, host, :data:`KEY_PACKAGES` versions), the
provenance record built from them (:func:`provenance`), and :func:`parameters_hash`, the short
hash of a parameter set that tags runs of equal settings. Writes nothing; imports only
:mod:`.parameters`. (Named ``origin``, not ``provenance``, so the module does not shadow the
:func:`provenance` function that ``tclab.runs`` exports.)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from .parameters import _plain


#: Packages whose versions every provenance.json records (read from metadata, never imported).
KEY_PACKAGES = ("torch", "diffusers", "numpy", "papermill", "nbformat", "nbconvert", "matplotlib",
                "pandas", "pyyaml")


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
    from .. import __version__

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


def parameters_hash(params: Mapping[str, Any], length: int = 8) -> str:
    """A short, stable hash of a parameter set: the default tag, so equal settings group together."""
    canon = json.dumps(_plain(dict(params)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:length]
