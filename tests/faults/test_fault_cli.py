"""Fault suite, command line and parameters (issue 14, points 1 and 2): one message naming the input
and the fix, the documented exit status, no raw traceback, and nothing created for a refused run."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tclab import cli
from tclab.sampling import SampleConfig

NB01 = "01"


def run_main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, exit_code, says", [
    (["flops", "no-such-model"], 2, "model spec 'no-such-model' is neither"),
    (["sample", "--model", "no-such-model"], 2, "looked for a folder at"),
    (["evaluate", "--model", "DiT-Q/2", "--num-samples", "1"], 2, "a preset (DiT-S/2"),
    (["check-images", "/no/such/folder"], 2, "does not exist"),
    (["run", NB01, "-p", "num_steps", "abc"], 2, "'num_steps' of notebook 01_token_redundancy.ipynb must be an integer"),
    (["run", NB01, "-p", "guidance_scale", ".nan"], 2, "NaN and infinity are not accepted"),
    (["run", NB01, "-p", "guidance_scale", ".inf"], 2, "NaN and infinity are not accepted"),
    (["run", NB01, "-p", "classes", "[0, .nan]"], 2, "classes[1]"),
    (["run", NB01, "-p", "labels", "{a: "], 2, "-p labels '{a: ' is not a valid YAML value"),
    (["run", NB01, "-p", "sdedit_images", "true"], 2, "must be an integer, got bool True"),
    (["run", NB01, "-f", "no-such-preset"], 2, "no-such-preset"),
    (["run", "99"], 2, "99"),
    (["train-classifier", "--images", "shapes"], 2, "give --out"),
    (["run", NB01, "-p", "images", "no/such/set"], 2, "parameter 'images' 'no/such/set' not found: looked at"),
    (["run", NB01, "-p", "model", "no-such-dit"], 2, "parameter 'model' 'no-such-dit' not found"),
    (["run", NB01, "-p", "labels", "map.yaml"], 2, "parameter 'labels' 'map.yaml' not found"),
    (["run", NB01, "-p", "images", "a-file.txt"], 2, "is a file; give a folder"),
])
def test_bad_input_is_one_message_with_the_documented_exit_code(capsys, tmp_path, argv, exit_code, says,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file.txt").write_text("x")
    if argv[0] == "run":
        argv = [*argv, "--reports", str(tmp_path / "reports")]
    rc, out, err = run_main(capsys, *argv)
    assert rc == exit_code and says in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())  # nothing started


@pytest.mark.parametrize("option", [["--guidance", "nan"], ["--guidance", "inf"], ["--guidance=-inf"]])
def test_non_finite_number_options_are_refused_by_the_parser(capsys, option):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", *option])
    assert e.value.code == 2 and "NaN and infinity are not accepted" in capsys.readouterr().err


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), "4", True])
def test_the_sampler_refuses_non_finite_or_non_numeric_guidance(guidance):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        SampleConfig(guidance_scale=guidance)


def with_command(monkeypatch, command, func):
    """The real parser, with one sub-command's function replaced (to raise a fault on purpose)."""
    parser = cli.build_parser()
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


def test_a_disk_that_fills_up_is_one_line_exit_1(capsys, monkeypatch):
    def full(a):
        raise OSError(errno.ENOSPC, "No space left on device")

    with_command(monkeypatch, "make-images", full)
    rc, out, err = run_main(capsys, "make-images", "/tmp/x")
    assert rc == 1 and "the disk is full" in err and "Traceback" not in err


@pytest.mark.parametrize("bug", [RuntimeError("something inside broke"), TypeError("unsupported operand")])
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch, bug):
    def boom(a):
        raise bug

    with_command(monkeypatch, "flops", boom)
    rc, _, err = run_main(capsys, "flops", "shapes-dit")
    assert rc == 1 and f"failed with {type(bug).__name__}: {bug}" in err and "Traceback" not in err
    assert "it is a bug in tclab" in err
    rc, _, err = run_main(capsys, "--debug", "flops", "shapes-dit")
    assert rc == 1 and "Traceback (most recent call last)" in err
    monkeypatch.setenv("TCLAB_DEBUG", "1")
    rc, _, err = run_main(capsys, "flops", "shapes-dit")
    assert "Traceback (most recent call last)" in err


def test_a_jobs_file_with_bad_parameter_values_runs_nothing(tmp_path, capsys):
    jobs = tmp_path / "jobs.yaml"
    nb = Path(__file__).resolve().parents[2] / "notebooks" / "01_token_redundancy.ipynb"
    jobs.write_text(f"reports: reports\njobs:\n  - name: a\n    notebook: {nb}\n    params: {{guidance_scale: .nan}}\n"
                    f"  - name: b\n    notebook: {nb}\n    params: {{num_steps: ten}}\n")
    rc, out, err = run_main(capsys, "schedule", "run", str(jobs))
    assert rc == 2 and "NaN and infinity" in err + out and "must be an integer" in err + out
    assert not (tmp_path / "reports").exists() or not [p for p in (tmp_path / "reports").iterdir() if p.is_dir()]


def test_the_real_command_prints_no_traceback(tmp_path):
    exe = [sys.executable, "-c", "import sys; from tclab.cli import main; sys.exit(main())"]
    proc = subprocess.run([*exe, "flops", str(tmp_path / "missing")], capture_output=True, text=True,
                          env={**os.environ, "TCLAB_DEBUG": ""})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--debug" in subprocess.run([*exe, "--help"], capture_output=True, text=True).stdout


def test_built_in_label_specs_pass_the_path_check_in_any_case(tmp_path):
    from tclab.paths import PathNotFoundError, check_path_parameters

    check_path_parameters({"labels": "Auto", "predictor": "AUTO", "images": "shapes", "model": "DiT-S/2"}, tmp_path)
    with pytest.raises(PathNotFoundError):
        check_path_parameters({"labels": "Auto.yaml"}, tmp_path)

