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



def test_a_runner_kernels_bars_go_to_the_progress_file_not_the_cell(monkeypatch, tmp_path, capsys):
    target = tmp_path / "progress.log"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(target))
    bar = progress.progress_bar(range(3), desc="sweep", unit="variant")
    for _ in bar:
        pass
    captured = capsys.readouterr()
    assert "sweep" not in captured.err and "sweep" not in captured.out      # nothing lands in the report
    lines = [line.split("\t") for line in target.read_text().splitlines()]
    counts = [int(n) for _, state, n, _, _ in lines if state == "open"]
    assert sorted(set(counts)) == [0, 1, 2, 3] and counts == sorted(counts)   # every variant reported, in order
    assert lines[-1][1:3] == ["done", "3"] and [line[1] for line in lines].count("done") == 1
    assert lines[-1][4].startswith("sweep: 100%")


def test_the_follower_prints_one_line_per_outer_step_in_a_log(monkeypatch, tmp_path):
    target = tmp_path / "progress.log"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(target))
    out = io.StringIO()                            # not a terminal: a scheduler's log file
    with progress.ProgressFollower(target, stream=out, label="02", poll_s=0.02, quiet_interval_s=1000,
                                   min_step_s=0.05) as follower:
        follower.cells.write("\rExecuting:  50%|#####     | 5/10 [00:01<00:01, 5cell/s]")
        for _ in progress.progress_bar(range(3), desc="sweep", unit="variant"):
            inner = progress.progress_bar(total=400, desc="sampling", unit="step", leave=False)
            for _ in range(400):
                inner.update(1)
            inner.close()
            import time

            time.sleep(0.15)                       # the follower polls between variants
    lines = out.getvalue().splitlines()
    assert all(line.startswith("02 | cells  50%") for line in lines)
    sweep = [line.split("| sweep: ")[1].split("|")[0].strip() for line in lines if "| sweep: " in line]
    assert sweep[:3] == ["33%", "67%", "100%"] and "sampling" not in lines[-1]
    assert len(lines) <= 6                          # no line per inner update


def test_the_follower_redraws_one_line_on_a_terminal(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with progress.ProgressFollower(tmp_path / "none.log", stream=out, label="01") as follower:
        for i in range(3):
            follower.cells.write(f"\rExecuting: {i}/3")
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") >= 3 and "01 | cells 2/3" in text


def test_a_fast_loop_alone_does_not_print_a_line_per_step(monkeypatch, tmp_path):
    target = tmp_path / "progress.log"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(target))
    out = io.StringIO()
    with progress.ProgressFollower(target, stream=out, label="05", poll_s=0.01, quiet_interval_s=1000):
        import time

        for _ in range(3):                          # three short sampling loops, nothing around them
            for _ in progress.progress_bar(range(10), desc="sampling", unit="step"):
                time.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 4 and all("100%" in line for line in lines[-3:])   # one line as each loop ends
