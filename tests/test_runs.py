"""Run folders (``tclab.runs`` and ``tclab run``).

A tiny notebook (no torch; matplotlib on Agg) is written with nbformat and executed three times by
a module-scoped fixture, because each papermill execution starts a kernel (seconds):

1. ``run_notebook(..., tag="smoke")``             -> a good run
2. ``tclab run -f file -p ... --tag smoke``      -> a second good run of the same notebook+tag
3. ``tclab run -p fail true --tag smoke``         -> the notebook raises: a *_FAILED folder

The other tests need no kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from tclab import cli, runs

PARAMS_CELL = 'run_dir = None\nnum_steps = 2\nscale = 0.5\nmodel = "tiny"\nfail = False\n'
DEFAULTS = {"num_steps": 2, "scale": 0.5, "model": "tiny", "fail": False}


def write_notebook(path: Path, params_source: str = PARAMS_CELL) -> Path:
    """A thin notebook that cooperates with tclab.runs the way real ones should."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Tiny study\nDoes the test harness work?"),
        nbformat.v4.new_code_cell(params_source, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\n'
                                  "from tclab import runs\nrun = runs.open_run(run_dir)"),
        nbformat.v4.new_code_cell('if fail:\n    raise RuntimeError("boom on purpose")'),
        nbformat.v4.new_code_cell(
            'print("out" + "put-" + str(num_steps * 10))\n'
            "fig, ax = plt.subplots(figsize=(2, 2))\n"
            "ax.plot(range(num_steps), [scale * i for i in range(num_steps)])\n"
            'run.save_figure(fig, "curve")\n'
            'run.path("values.csv").write_text("step,value\\n" + "".join(f"{i},{scale * i}\\n" '
            "for i in range(num_steps)))"),
        nbformat.v4.new_code_cell('run.write_summary({"headline": {"loss": num_steps * scale, "model": model},\n'
                                  '                   "identity": {"manifest_sha256": "abc123"}})'),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def cli_run(*args: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = cli.main(["run", *args])
        except SystemExit as e:   # argparse errors
            rc = e.code
    return rc, out.getvalue().strip().splitlines()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("runs")
    nb = write_notebook(base / "notebooks" / "tiny_study.ipynb")
    reports = base / "reports"

    good = runs.run_notebook(nb, {"num_steps": 4}, reports, tag="smoke", progress_bar=False)
    good_digest = tree_digest(good)

    preset = base / "preset.yaml"
    preset.write_text(yaml.safe_dump({"num_steps": 6, "scale": 2.0, "model": "from-file"}))
    rc2, out2 = cli_run(str(nb), "-f", str(preset), "-p", "scale", "3", "-p", "model", "shapes-dit",
                        "--reports", str(reports), "--tag", "smoke")

    rc3, out3 = cli_run(str(nb), "-p", "fail", "true", "--reports", str(reports), "--tag", "smoke")
    return SimpleNamespace(nb=nb, reports=reports, good=good, good_digest=good_digest,
                           rc2=rc2, out2=out2, second=Path(out2[-1]) if out2 else None,
                           rc3=rc3, out3=out3, failed=Path(out3[-1]) if out3 else None)


# ---- executed runs ------------------------------------------------------------------------------

def test_good_run_folder_holds_every_expected_file(executed):
    d = executed.good
    assert d.parent == executed.reports and d.name.endswith("_tiny_study_smoke")
    names = {p.name for p in d.iterdir()}
    assert {"tiny_study.ipynb", "report.html", "params.yaml", "provenance.json", "summary.json",
            "curve.png", "values.csv"} <= names
    assert not any(n.startswith(".") or n.endswith(".tmp") for n in names), names
    assert (d / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "values.csv").read_text().splitlines()[-1] == "3,1.5"   # num_steps=4, scale=0.5


def test_params_yaml_holds_defaults_merged_with_overrides(executed):
    used = yaml.safe_load((executed.good / "params.yaml").read_text())
    assert used == {**DEFAULTS, "num_steps": 4}
    assert "run_dir" not in used


def test_summary_written_by_the_notebook(executed):
    summary = json.loads((executed.good / "summary.json").read_text())
    assert summary["headline"] == {"loss": 2.0, "model": "tiny"}
    assert summary["figures"] == ["curve.png"]


def test_report_html_has_outputs_and_hides_code(executed):
    import re

    page = (executed.good / "report.html").read_text()
    assert "output-40" in page                          # the printed output is there...
    shown = re.sub(r'<pre class="code">.*?</pre>', "", page, flags=re.S)
    assert "str(num_steps * 10)" not in shown           # ...the code that printed it only behind "show code"
    assert "str(num_steps * 10)" in page and ".code { display: none; }" in page
    assert "save_figure" not in shown and "matplotlib.use" not in shown
    assert "Tiny study" in page                         # markdown stays
    assert 'id="tclab-summary"' in page and "wrote no findings" in page  # no report entry in its summary


def test_provenance_records_versions_git_times_params_and_identity(executed):
    prov = json.loads((executed.good / "provenance.json").read_text())
    assert prov["status"] == "ok"
    assert prov["tclab_version"]
    assert prov["hostname"]
    assert set(runs.KEY_PACKAGES) <= set(prov["environment"]["packages"])
    assert prov["environment"]["packages"]["papermill"]
    assert prov["environment_source"] == "kernel"       # the notebook opened its run
    assert prov["parameters"] == {**DEFAULTS, "num_steps": 4} and prov["overrides"] == {"num_steps": 4}
    assert prov["start_utc"] <= prov["end_utc"]
    assert prov["identity"] == {"manifest_sha256": "abc123"}
    assert prov["git"] is None or len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool)
    assert prov["notebook_sha256"] == hashlib.sha256(executed.nb.read_bytes()).hexdigest()


def test_cli_prints_run_folder_last_and_p_overrides_f(executed):
    assert executed.rc2 == 0
    assert executed.second.is_dir() and executed.second != executed.good
    used = yaml.safe_load((executed.second / "params.yaml").read_text())
    # num_steps from the file, scale and model from -p (which beats the file), fail from the notebook
    assert used == {"num_steps": 6, "scale": 3, "model": "shapes-dit", "fail": False}
    assert isinstance(used["scale"], int)


def test_failing_notebook_leaves_a_marked_folder_and_exits_nonzero(executed):
    assert executed.rc3 not in (0, None)
    d = executed.failed
    assert d.is_dir() and d.name.endswith(runs.FAILED_SUFFIX)
    error = (d / "error.txt").read_text()
    assert "RuntimeError" in error and "boom on purpose" in error
    partial = nbformat.read(d / "tiny_study.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in partial.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
    assert not (d / "summary.json").exists() and not (d / "curve.png").exists()   # it stopped at the raise
    assert json.loads((d / "provenance.json").read_text())["status"] == "failed"
    # earlier good runs are untouched
    assert tree_digest(executed.good) == executed.good_digest


def test_index_lists_runs_newest_first_with_status_and_change(executed):
    page = (executed.reports / "index.html").read_text()
    pos = [page.find(d.name + "/") for d in (executed.failed, executed.second, executed.good)]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), pos
    assert 'class="status failed">failed<' in page and 'class="status ok">ok<' in page
    assert "boom on purpose" in page
    # the second run (loss 6*3=18) is compared with the first of the same notebook+tag (loss 2.0)
    second_row = page.split(f'data-search="{executed.second.name}', 1)[1].split("</tr>", 1)[0]
    assert "<b>18</b>" in second_row and 'title="was 2 in the previous good run' in second_row
    assert ">+16</span>" in second_row and f'href="{executed.good.name}/report.html"' in second_row
    assert "first run of this notebook+tag" in page


def test_no_staging_leftovers(executed):
    staging = executed.reports / runs.STAGING_DIRNAME
    assert not staging.exists() or not any(staging.iterdir())
    assert {p.name for p in executed.reports.iterdir()} - {".index.lock"} == {"runs.sqlite",  # the lock target stays
        "index.html", executed.good.name, executed.second.name, executed.failed.name}


# ---- refusals before anything runs ---------------------------------------------------------------

def test_unknown_parameter_refused_before_anything_runs(tmp_path):
    nb = write_notebook(tmp_path / "tiny_study.ipynb")
    reports = tmp_path / "reports"
    with pytest.raises(runs.ParameterError) as err:
        runs.run_notebook(nb, {"num_step": 3}, reports)
    msg = str(err.value)
    assert "'num_step'" in msg and "did you mean 'num_steps'" in msg
    assert "num_steps, scale, model, fail" in msg
    assert not reports.exists()

    preset = tmp_path / "bad.yaml"
    preset.write_text("colour: red\n")
    assert cli_run(str(nb), "-f", str(preset), "--reports", str(reports))[0] == 2
    assert cli_run(str(nb), "-p", "bogus", "1", "--reports", str(reports))[0] == 2
    assert not reports.exists()


def test_run_dir_is_reserved(tmp_path):
    nb = write_notebook(tmp_path / "tiny_study.ipynb")
    with pytest.raises(runs.ParameterError, match="run_dir"):
        runs.run_notebook(nb, {"run_dir": "/elsewhere"}, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_notebook_parameters_reads_literal_defaults_in_order(tmp_path):
    nb = write_notebook(tmp_path / "a.ipynb", PARAMS_CELL + "sizes = (1, 2)  # a tuple\nlr: float = 1e-3\n")
    got = runs.notebook_parameters(nb)
    assert list(got) == ["run_dir", "num_steps", "scale", "model", "fail", "sizes", "lr"]
    assert got["sizes"] == (1, 2) and got["lr"] == 1e-3 and got["run_dir"] is None


@pytest.mark.parametrize("source, complaint", [
    ("run_dir = None\nsteps = 2 * 5\n", "non-literal default"),
    ("run_dir = None\nimport os\n", "not 'name = literal'"),
    ("num_steps = 2\n", "does not declare 'run_dir'"),
    ("run_dir = None\nx = (\n", "not valid Python"),
])
def test_notebook_parameters_refuses_bad_cells(tmp_path, source, complaint):
    nb = write_notebook(tmp_path / "a.ipynb", source)
    with pytest.raises(runs.ParameterError, match=complaint.replace("(", r"\(")):
        runs.notebook_parameters(nb)


def test_notebook_without_parameters_cell_is_refused(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, tmp_path / "a.ipynb")
    with pytest.raises(runs.ParameterError, match="no cell tagged 'parameters'"):
        runs.notebook_parameters(tmp_path / "a.ipynb")


# ---- parameter parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("10", 10), ("0.5", 0.5), ("1e-3", 1e-3), ("-2E4", -2e4), ("true", True), ("false", False),
    ("null", None), ("shapes-dit", "shapes-dit"), ("'10'", "10"), ("[1, 2]", [1, 2]), ("", ""),
    ("2024-01-01", "2024-01-01"),
])
def test_p_values_are_yaml_scalars(text, value):
    got = runs.parse_parameter_value(text)
    assert got == value and type(got) is type(value)


def test_p_overrides_f(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("num_steps: 6\nmodel: from-file\n")
    assert runs.load_parameters(f, [("model", "shapes-dit"), ("scale", "2")]) == {
        "num_steps": 6, "model": "shapes-dit", "scale": 2}
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(runs.ParameterError, match="must hold a mapping"):
        runs.load_parameters(tmp_path / "list.yaml")
    with pytest.raises(runs.ParameterError, match="not found"):
        runs.load_parameters(tmp_path / "missing.yaml")


def test_default_tag_is_a_stable_parameters_hash():
    a = runs.parameters_hash({"x": 1, "y": (1, 2)})
    assert a == runs.parameters_hash({"y": [1, 2], "x": 1}) and len(a) == 8
    assert a != runs.parameters_hash({"x": 2, "y": (1, 2)})


# ---- the notebook side, interactively ------------------------------------------------------------

def test_reports_dir_environment_variable_wins(tmp_path, monkeypatch):
    (tmp_path / "proj" / "notebooks").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path / "proj" / "notebooks")
    monkeypatch.setenv(runs.REPORTS_DIR_ENV, str(tmp_path / "elsewhere"))
    run = runs.open_run(None, notebook="x.ipynb")
    assert run.dir.parent == tmp_path / "elsewhere"
    monkeypatch.delenv(runs.REPORTS_DIR_ENV)
    assert runs.open_run(None, notebook="x.ipynb").dir.parent == tmp_path / "proj" / "reports"


def test_the_test_session_never_writes_into_the_projects_reports():
    import os

    assert os.environ.get(runs.REPORTS_DIR_ENV), "conftest.py must point notebook runs away from reports/"
    assert not os.environ[runs.REPORTS_DIR_ENV].startswith(str(Path(__file__).resolve().parents[1] / "reports"))


def test_open_run_interactive_makes_its_own_folder(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "pyproject.toml").write_text("")
    nb = write_notebook(tmp_path / "notebooks" / "tiny_study.ipynb")
    monkeypatch.chdir(tmp_path / "notebooks")            # JupyterLab's working directory
    monkeypatch.delenv(runs.REPORTS_DIR_ENV, raising=False)  # the suite sets it (conftest.py)
    run = runs.open_run(None, notebook=str(nb))
    assert not run.managed and run.dir.parent == tmp_path / "reports"
    assert run.dir.name.endswith("_tiny_study_interactive")
    assert yaml.safe_load((run.dir / "params.yaml").read_text()) == DEFAULTS
    assert json.loads((run.dir / "provenance.json").read_text())["status"] == "running"

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert run.save_figure(fig, "line").read_bytes()[:4] == b"\x89PNG"
    plt.close(fig)
    with pytest.raises(ValueError, match="inside the run folder"):
        run.path("../escape.txt")
    with pytest.raises(TypeError, match="headline values"):
        run.write_summary({"headline": {"curve": [1, 2, 3]}})

    run.write_summary({"headline": {"psnr": 31.5}, "identity": {"images": "h"}})
    prov = json.loads((run.dir / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["identity"] == {"images": "h"} and prov["end_utc"]
    index = (tmp_path / "reports" / "index.html").read_text()
    assert run.dir.name in index and "psnr" in index

    again = runs.open_run("", notebook=str(nb))       # a second Run All never reuses the folder
    assert again.dir != run.dir


def test_open_run_managed_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        runs.open_run(tmp_path / "nope")
    run = runs.open_run(str(tmp_path))
    assert run.managed and run.dir == tmp_path


# ---- notebook and preset names as a user types them (no kernel) ----------------------------------

PROJECT = Path(__file__).resolve().parents[1]
NB01 = PROJECT / "notebooks" / "01_token_redundancy.ipynb"


@pytest.mark.parametrize("typed", ["01", "1", "01_token_redundancy", "01_token_redundancy.ipynb", "01_token",
                                   "notebooks/01_token_redundancy.ipynb", str(NB01)])
def test_a_notebook_is_found_by_number_name_file_name_or_path_from_any_folder(typed, tmp_path):
    # tmp_path is not the project: bare names are looked up in the project's notebooks/, found from the package
    assert runs.resolve_notebook(typed, cwd=tmp_path) == NB01.resolve()


def test_a_path_that_exists_from_the_working_directory_wins(tmp_path):
    mine = write_notebook(tmp_path / "01_token_redundancy.ipynb")
    assert runs.resolve_notebook("01_token_redundancy.ipynb", cwd=tmp_path) == mine.resolve()
    assert runs.resolve_notebook("01", cwd=tmp_path) == NB01.resolve()    # "01" is no file here: the project's
    (tmp_path / "sub").mkdir()
    assert runs.resolve_notebook("../01_token_redundancy.ipynb", cwd=tmp_path / "sub") == mine.resolve()


def test_an_unknown_notebook_lists_the_notebooks_that_exist(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        runs.resolve_notebook("07", cwd=tmp_path)
    msg = str(err.value)
    assert msg.startswith("notebook '07' not found: looked at ") and str(tmp_path / "07") in msg
    assert all(p.stem in msg for p in (PROJECT / "notebooks").glob("*.ipynb"))
    assert "tclab run 01" in msg
    with pytest.raises(FileNotFoundError, match="Did you mean 05_inhouse_report"):
        runs.resolve_notebook("inhouse_report", cwd=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"looked at .*elsewhere/x\.ipynb"):
        runs.resolve_notebook("elsewhere/x.ipynb", cwd=tmp_path)   # a path with a folder is never matched by name


def test_names_resolve_in_a_given_notebooks_folder_and_ambiguity_is_refused(tmp_path):
    folder = tmp_path / "nbs"
    for name in ("01_alpha", "02_beta", "12_gamma", "12_delta"):
        write_notebook(folder / f"{name}.ipynb")
    find = lambda n: runs.resolve_notebook(n, cwd=tmp_path, notebooks_dir=folder).name  # noqa: E731
    assert find("2") == find("02") == find("02_beta") == find("02_b") == "02_beta.ipynb"
    assert find("01_ALPHA.ipynb") == "01_alpha.ipynb"           # case does not matter
    with pytest.raises(FileNotFoundError, match="ambiguous: it matches 12_delta, 12_gamma"):
        find("12")
    with pytest.raises(FileNotFoundError, match="not found.*01_alpha, 02_beta, 12_delta, 12_gamma"):
        find("3")
    with pytest.raises(FileNotFoundError, match="no notebooks folder at"):
        runs.resolve_notebook("01", cwd=tmp_path, notebooks_dir=tmp_path / "missing")


@pytest.mark.parametrize("typed", ["smoke", "smoke.yaml", "01_smoke", "01_smoke.yaml",
                                   "notebooks/params/01_smoke.yaml", str(PROJECT / "notebooks/params/01_smoke.yaml")])
def test_a_preset_is_found_by_name_or_path(typed, tmp_path):
    assert runs.resolve_params_file(typed, NB01, cwd=tmp_path) == (PROJECT / "notebooks/params/01_smoke.yaml").resolve()


def test_a_params_file_from_the_working_directory_wins_and_unknown_presets_are_listed(tmp_path):
    (tmp_path / "smoke.yaml").write_text("num_steps: 3\n")
    assert runs.resolve_params_file("smoke.yaml", NB01, cwd=tmp_path) == (tmp_path / "smoke.yaml").resolve()
    assert runs.resolve_params_file("full", NB01, cwd=tmp_path).name == "01_full.yaml"
    with pytest.raises(runs.ParameterError) as err:
        runs.resolve_params_file("tiny", NB01, cwd=tmp_path)
    msg = str(err.value)
    assert msg.startswith("parameter file 'tiny' not found: looked at ")
    assert "smoke (01_smoke.yaml)" in msg and "full (01_full.yaml)" in msg and "-f smoke" in msg
    with pytest.raises(runs.ParameterError, match="notebooks/params/smoke.yaml"):
        runs.resolve_params_file("notebooks/params/smoke.yaml", NB01, cwd=tmp_path)


def test_cli_refuses_unknown_names_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, _ = cli_run("no_such_notebook", "--reports", str(tmp_path / "reports"))
    err = capsys.readouterr().err
    assert rc == 2 and "notebook 'no_such_notebook' not found" in err and "01_token_redundancy" in err
    rc, _ = cli_run("01", "-f", "nonsense", "--reports", str(tmp_path / "reports"))
    err = capsys.readouterr().err
    assert rc == 2 and "parameter file 'nonsense' not found" in err and "smoke (01_smoke.yaml)" in err
    assert not (tmp_path / "reports").exists()


def _help_texts(parser) -> list[str]:
    import argparse

    out = [parser.description or ""]
    for action in parser._actions:
        out.append(action.help or "")
        if isinstance(action, argparse._SubParsersAction):
            out += [c.help or "" for c in action._choices_actions]
            for sub in action.choices.values():
                out += _help_texts(sub)
    return out


# files the help cites although a fresh checkout lacks them, each with the command that writes it
MADE_BY_A_COMMAND = {"data/shapes-train": "tclab make-images data/shapes-train"}


def test_every_file_a_help_text_cites_exists():
    import re

    cited = []
    for text in _help_texts(cli.build_parser()):
        for path in re.findall(r"(?<![\w/$])(?:notebooks|data|jobs|tclab/weights|docs|benchmarks)/[\w./-]*\w", text):
            if "<" in text[text.find(path):text.find(path) + len(path) + 1]:
                continue   # a placeholder such as tclab/weights/<model>-...
            cited.append(path)
            if path in MADE_BY_A_COMMAND:
                assert MADE_BY_A_COMMAND[path] in text, f"help cites {path} but not how to make it: {text!r}"
            else:
                assert (PROJECT / path).exists(), f"a help text cites {path}, which does not exist: {text!r}"
    assert "notebooks/params/01_smoke.yaml" in cited and "jobs/example.yaml" in cited


def test_after_a_stop_the_dead_kernels_unretrieved_task_prints_no_traceback(tmp_path):
    """A stopped run kills its kernel on purpose; an nbclient task still waiting on it ends with DeadKernelError
    when it is garbage-collected, and asyncio would print that traceback (at a moment that depends on timing:
    the flaky 'Traceback' in tests/faults' stop test). Other unretrieved task errors must still show."""
    script = tmp_path / "tasks.py"
    script.write_text(
        "import asyncio, gc\nfrom nbclient.exceptions import DeadKernelError\n"
        "from tclab.runs.execution import _quiet_dead_kernel_tasks\n_quiet_dead_kernel_tasks()\n"
        "async def dead():\n    raise DeadKernelError('Kernel died')\n"
        "async def real():\n    raise ValueError('a real problem')\n"
        "loop = asyncio.new_event_loop()\na, b = loop.create_task(dead()), loop.create_task(real())\n"
        "loop.run_until_complete(asyncio.sleep(0.05))\ndel a, b\ngc.collect()\n")
    err = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60).stderr
    assert "DeadKernelError" not in err and "ValueError: a real problem" in err
