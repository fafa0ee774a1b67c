"""Progress bars that suit where they are shown.

``progress_bar(...)`` is ``tqdm.auto.tqdm``: a live bar in a terminal, a widget in JupyterLab. When
nothing can redraw a line in place (a notebook executed by ``tclab run`` or a scheduler, or output
sent to a log file), every update would become a new line of the report or log, so the bar then
updates at most every ``QUIET_INTERVAL_S`` seconds (plus its first and last line).
"""

from __future__ import annotations

import sys

QUIET_INTERVAL_S = 60.0


def _redraws_in_place() -> bool:
    import os

    from .paths import CALLER_CWD_ENV

    if os.environ.get(CALLER_CWD_ENV):  # a kernel started by `tclab run` / a scheduler: its output is a report
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        shell = None
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        return True  # JupyterLab: a widget, or a line redrawn in place
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(*args, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)``, throttled to one line a minute where lines cannot be redrawn."""
    from tqdm.auto import tqdm

    if not _redraws_in_place():
        kwargs.setdefault("mininterval", QUIET_INTERVAL_S)
        kwargs.setdefault("maxinterval", QUIET_INTERVAL_S * 10)
    return tqdm(*args, **kwargs)
