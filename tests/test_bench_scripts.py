"""benchmarks/bench_cache.py's execution-path options and benchmarks/gpu_check.sh: seconds, nothing timed or compiled."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def bench_cache():
    spec = importlib.util.spec_from_file_location("bench_cache", ROOT / "benchmarks" / "bench_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _help(mod, capsys) -> str:
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    return capsys.readouterr().out


def test_help_lists_the_execution_path_options(bench_cache, capsys):
    text = " ".join(_help(bench_cache, capsys).split())  # argparse wraps lines
    for opt in ("--paths", "--cached-step", "--compile-mode", "dynamic, static, dynamic-compiled, static-compiled"):
        assert opt in text


def test_paths_are_parsed_in_order_and_checked(bench_cache):
    assert bench_cache.parse_paths("static-compiled, dynamic,static-compiled") == ["static-compiled", "dynamic"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown path"):
        bench_cache.parse_paths("dynamic,fast")
    with pytest.raises(argparse.ArgumentTypeError):
        bench_cache.parse_paths(" , ")


def test_gpu_check_is_valid_bash_and_passes_only_options_bench_cache_has(bench_cache, capsys):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(GPU_CHECK)], check=True)
    script = GPU_CHECK.read_text()
    assert "timeout" in script and "${OUT:-/tmp/gpu_check}" in script and "DRY" in script
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", script[script.index("BENCH=("):]))
    assert {"--paths", "--cached-step", "--part", "--out"} <= used
    text = _help(bench_cache, capsys)
    assert not [opt for opt in used if opt not in text], "gpu_check.sh passes an option bench_cache.py lacks"
