"""Progress bars that suit where they are shown.

``progress_bar(...)`` is ``tqdm.auto.tqdm`` in a terminal and in JupyterLab (there a widget, since
``ipywidgets`` is installed). Two other places:

* **A kernel started by ``tclab run``** (or a scheduled job): a cell's output becomes the report, so
  bars never write there. They write one status line per update (at most two a second) to the file
  named by ``$TCLAB_PROGRESS_FILE``, which the runner's :class:`ProgressFollower` shows on the
  console beside papermill's cell count: one line redrawn in place on a terminal, or, in a log
  file, a line each time the outermost bar advances, at most one every ``MIN_STEP_S`` seconds (one per
  variant of a sweep), a line when an outermost loop ends, and otherwise at most one a minute.
* **Anywhere else that cannot redraw a line** (stderr sent to a log file): the bar updates at most
  every ``QUIET_INTERVAL_S`` seconds (plus its first and last line).
"""

from __future__ import annotations

import functools
import io
import os
import sys
import threading
import time
from pathlib import Path

from .env import CALLER_CWD_ENV, PROGRESS_FILE_ENV

QUIET_INTERVAL_S = 60.0
#: In a log, a step of the outermost loop gets its own line only this long after the previous line
#: (a sweep's variants: yes; the steps of a sampling loop that takes a second: no).
MIN_STEP_S = 5.0
_FIELD_SEP = "\t"


def _redraws_in_place() -> bool:
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


@functools.cache
def _file_bar_class():
    """The tqdm subclass of a runner's kernel, built once (tqdm is imported only when a bar is made)."""
    from tqdm.std import tqdm as std_tqdm

    class FileBar(std_tqdm):
        """A bar that reports to the runner's progress file instead of the cell's output."""

        def __init__(self, *args, progress_file: str, **kwargs):
            self._progress_file = progress_file
            kwargs["file"] = io.StringIO()          # tqdm's own writes go nowhere: display() reports
            total = kwargs.get("total")
            if total is None and args and hasattr(args[0], "__len__"):
                total = len(args[0])
            if total is not None and total <= 100:   # short loops (variants of a sweep): every step counts
                kwargs.setdefault("mininterval", 0)
                kwargs.setdefault("miniters", 1)
            kwargs.setdefault("mininterval", 0.5)
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            self._report("open")
            return True

        def close(self):
            if self.disable or getattr(self, "_reported_done", False):
                return super().close()
            super().close()
            self._report("done")
            self._reported_done = True

        def _report(self, state: str) -> None:
            text = " ".join(self.__str__().split())
            line = _FIELD_SEP.join((str(id(self)), state, str(self.n), str(self.total or ""), text))
            try:
                with open(self._progress_file, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass  # progress is a courtesy: a full or vanished file must not fail the computation

    return FileBar


def progress_bar(*args, **kwargs):
    """A tqdm bar for where it is shown (see the module docstring); same arguments as ``tqdm``."""
    target = os.environ.get(PROGRESS_FILE_ENV)
    if target and "file" not in kwargs:
        return _file_bar_class()(*args, progress_file=target, **kwargs)
    from tqdm.auto import tqdm

    if not _redraws_in_place():
        kwargs.setdefault("mininterval", QUIET_INTERVAL_S)
        kwargs.setdefault("maxinterval", QUIET_INTERVAL_S * 10)
    return tqdm(*args, **kwargs)


class _CellStream(io.TextIOBase):
    """What papermill's cell bar writes to: the latest frame is kept for the follower's line."""

    def __init__(self, follower: "ProgressFollower"):
        self._follower = follower

    def write(self, s: str) -> int:
        frames = [f.strip() for f in s.replace("\n", "\r").split("\r") if f.strip()]
        if frames:
            self._follower._set_cells(frames[-1])
        return len(s)

    def flush(self) -> None:
        pass


class ProgressFollower:
    """The console side of a runner's progress: papermill's cell count and the kernel's bars, as
    one line (see the module docstring). Use as a context manager around the execution; ``cells``
    is the stream to give papermill's bar (``progress_bar={"file": follower.cells}``)."""

    def __init__(self, path: str | os.PathLike, stream=None, label: str = "", poll_s: float = 0.5,
                 quiet_interval_s: float = QUIET_INTERVAL_S, min_step_s: float = MIN_STEP_S):
        self.path = Path(path)
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.poll_s = poll_s
        self.quiet_interval_s = quiet_interval_s
        self.min_step_s = min_step_s
        self.redraw = bool(getattr(self.stream, "isatty", lambda: False)())
        self.cells = _CellStream(self)
        self._cells_text = ""
        self._bars: dict[str, tuple[int, str]] = {}   # bar id -> (count, text), in order of appearance
        self._offset = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_len = 0
        self._last_line = ""
        self._last_print = 0.0

    # -- inputs --
    def _set_cells(self, text: str) -> None:
        text = text.replace("Executing:", "cells").strip()
        with self._lock:
            self._cells_text = text
        self._show(force=False)

    def _read(self) -> bool:
        """Take in new lines of the progress file; True when the outermost bar moved or a bar closed."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return False
        end = chunk.rfind("\n")
        if end < 0:
            return False
        self._offset += len(chunk[: end + 1].encode("utf-8"))
        moved = False
        with self._lock:
            for line in chunk[: end + 1].splitlines():
                parts = line.split(_FIELD_SEP, 4)
                if len(parts) != 5:
                    continue
                bar, state, n, _total, text = parts
                outer = next(iter(self._bars), bar)     # the first open bar is the outermost loop
                if state == "done":
                    self._bars.pop(bar, None)
                    if bar == outer:                     # a finished loop keeps its line; inner bars vanish
                        self._print_line(self._compose(extra=text))
                    continue
                count = int(n) if n.isdigit() else 0
                before = self._bars.get(bar, (None, ""))[0]
                self._bars[bar] = (count, text)
                if bar == outer and before is not None and count != before:
                    moved = True
        return moved

    # -- output --
    def _compose(self, extra: str = "") -> str:
        if not (self._cells_text or self._bars or extra):
            return ""                                   # nothing running: no line of just the label
        parts = [self.label] if self.label else []
        if self._cells_text:
            parts.append(self._cells_text)
        parts += [t for _, t in self._bars.values()]
        if extra:
            parts.append(extra)
        return " | ".join(parts)

    def _print_line(self, line: str) -> None:
        """A permanent line (a finished bar, or a log line)."""
        if self.redraw:
            self.stream.write("\r" + line.ljust(self._last_len) + "\n")
            self._last_len = 0
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_print = time.monotonic()
        self._last_line = line

    def _show(self, force: bool) -> None:
        with self._lock:   # papermill's thread and the poll thread both show: one writer at a time
            self._show_locked(force)

    def _show_locked(self, force: bool) -> None:
        line = self._compose()
        if not line:
            return
        if self.redraw:
            width = 200
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
                width = columns - 1 if columns > 20 else width   # a terminal of unknown size says 0
            except (OSError, ValueError, AttributeError):
                pass
            line = line[:width]
            self.stream.write("\r" + line.ljust(self._last_len))
            self.stream.flush()
            self._last_len = len(line)
        elif line != self._last_line:
            quiet = time.monotonic() - self._last_print
            if quiet >= self.quiet_interval_s or (force and quiet >= self.min_step_s):
                self._print_line(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            moved = self._read()
            self._show(force=moved)

    def __enter__(self) -> "ProgressFollower":
        self._thread = threading.Thread(target=self._loop, name="tclab-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._read()
        with self._lock:
            line = self._compose()
            if not self.redraw and line and line != self._last_line:   # a log ends with where the run got to
                self._print_line(line)
            if self.redraw and self._last_len:
                self.stream.write("\r" + " " * self._last_len + "\r")
                self.stream.flush()
