"""Progress bars: live where a line can be redrawn, one line a minute in reports and logs."""

import io

from tclab import progress


def test_bars_are_throttled_where_lines_cannot_be_redrawn(monkeypatch):
    monkeypatch.setattr(progress, "_redraws_in_place", lambda: False)
    out = io.StringIO()
    bar = progress.progress_bar(total=1000, file=out)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert bar.mininterval == progress.QUIET_INTERVAL_S
    assert out.getvalue().count("\r") <= 3  # first, last: not one line per update
    monkeypatch.setattr(progress, "_redraws_in_place", lambda: True)
    assert progress.progress_bar(total=1, file=io.StringIO()).mininterval < 1


def test_a_pipe_or_log_file_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # as under a scheduler: stderr goes to a log file
    assert progress._redraws_in_place() is False


def test_a_kernel_started_by_the_runner_is_throttled_even_on_a_terminal(monkeypatch):
    from tclab.paths import CALLER_CWD_ENV

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    monkeypatch.delenv(CALLER_CWD_ENV, raising=False)
    assert progress._redraws_in_place() is True
    monkeypatch.setenv(CALLER_CWD_ENV, "/somewhere")  # set by tclab run for the kernel: its output is a report
    assert progress._redraws_in_place() is False

