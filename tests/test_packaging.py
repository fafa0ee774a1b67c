"""The install paths agree: pyproject.toml, environment.yml, README and CI call the same things."""

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins():
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(p["dependencies"]) | set(p["optional-dependencies"]["test"])


def test_environment_yml_installs_exactly_the_pyproject_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(x for x in pip if not x.startswith("-e")) == _pyproject_pins()
    assert "-e ." in pip


def test_every_dependency_is_pinned_and_no_torchvision():
    pins = _pyproject_pins()
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", p) for p in pins), pins
    assert "torch==2.13.0" in pins
    assert not any(p.startswith("torchvision") for p in pins)


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    install_and_run, test = _readme_commands()
    assert "\n" not in install_and_run.strip() and "\n" not in test.strip()
    assert "pip install" in install_and_run and "tclab" in install_and_run
    assert "pytest" in test
    assert test.strip() in (ROOT / ".ci" / "run").read_text()


def test_ci_installs_every_reference_and_tracker_the_tests_need():
    """The parity and export tests fail under CI=true when a package is missing: CI must install them all."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("parity", "export"):
        assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", p) for p in extras[name]), extras[name]
        assert not any(p.startswith("torchvision") for p in extras[name])
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[parity,export]"' in ci
    assert "pip install --no-deps torch-fidelity==0.4.0 " in ci and f"{extras['lpips-reference'][0]}" in ci


def test_committed_notebooks_carry_no_outputs():
    nbs = list((ROOT / "notebooks").glob("*.ipynb"))
    for nb in nbs:
        cells = json.loads(nb.read_text())["cells"]
        for c in cells:
            if c["cell_type"] == "code":
                assert not c.get("outputs") and c.get("execution_count") is None, f"{nb.name} has outputs"
