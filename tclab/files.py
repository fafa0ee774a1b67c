"""Writing a file all at once (a leaf: it imports nothing of tclab).

Every result tclab keeps on disk while other processes may read it (a record store's chunks, a
torchrun rank's finished units, a merged ``.npz``'s sidecar) goes through :func:`write_atomic`, so a
reader sees the old file, the whole new one, or none; never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """``write(f)`` into a hidden temporary file of ``path``'s folder (``.NAME.PID.tmp``; the folder is made if
    missing), flush it to disk, then rename it over ``path``. On any error the temporary file is removed and
    ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
