"""The environment variables tclab reads or sets, in one place (a leaf: it imports nothing).

Each name is imported from here by the module that uses it (and is still importable from that module's
old home, e.g. ``tclab.paths.CALLER_CWD_ENV``).
"""

#: The folder ``tclab run`` (or ``tclab schedule run``) was called from, set for the kernel it starts:
#: relative paths are read from there (``tclab.paths``), and progress bars know their output is a report.
CALLER_CWD_ENV = "TCLAB_CALLER_CWD"
#: Set by the runner for the kernel it starts: the file the kernel's progress bars report to (``tclab.progress``).
PROGRESS_FILE_ENV = "TCLAB_PROGRESS_FILE"
#: The artefact store's folder (default ``$XDG_CACHE_HOME/tclab``; ``tclab.paths.tclab_home``).
HOME_ENV = "TCLAB_HOME"
#: The most pixels an image may have before it is skipped (``tclab.data.resolve_max_pixels``).
MAX_PIXELS_ENV = "TCLAB_MAX_PIXELS"
#: Where run folders and ``index.html`` go when ``--reports`` is not given (``tclab.runs``).
REPORTS_DIR_ENV = "TCLAB_REPORTS_DIR"
#: Any value but empty or ``0``: the CLI prints the traceback of a failure (as ``--debug``).
DEBUG_ENV = "TCLAB_DEBUG"
