"""The committed notebooks: house-style checks (no kernel) and one real execution of notebook 01.

Executing a notebook starts a Jupyter kernel (seconds), so notebook 01 runs once, module-scoped,
through ``tclab.runs.run_notebook`` with tiny parameters, into a temporary reports folder.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml

from tclab import analysis, runs
from tclab.data import load_image_folder
from tclab.record import TokenChangeRecord

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NB01 = ROOT / "notebooks" / "01_token_redundancy.ipynb"
TINY = {"num_samples": 3, "num_steps": 4, "sdedit_images": 3}
FIGURES = ("images", "change_heatmap", "change_curves", "token_maps_samples", "token_maps_sdedit",
           "change_distribution", "rank_correlation", "samples_vs_sdedit")


# ---- static checks (no kernel) --------------------------------------------------------------------

def test_there_are_notebooks():
    assert NB01 in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_house_style(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    params = runs.notebook_parameters(path)  # one 'parameters' cell of literals with run_dir
    assert params["run_dir"] is None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                               ast.Lambda))]
        assert not defs, f"{path.name}: define functions in tclab, not in the notebook ({cell.source[:60]!r})"


def notebook_of(preset: Path) -> Path:
    """notebooks/params/NN_*.yaml belongs to the notebook notebooks/NN_*.ipynb."""
    matches = [p for p in NOTEBOOKS if p.name[:3] == preset.name[:3]]
    assert len(matches) == 1, f"{preset.name}: no single notebook numbered {preset.name[:2]}"
    return matches[0]


@pytest.mark.parametrize("preset", sorted((ROOT / "notebooks" / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_use_only_their_notebooks_parameters(preset):
    values = runs.load_parameters(preset)
    nb = notebook_of(preset)
    runs.validate_parameters(values, runs.notebook_parameters(nb), notebook=nb.name)
    assert values


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_smoke_preset_equals_the_notebook_defaults(path):
    defaults = {k: v for k, v in runs.notebook_parameters(path).items() if k != "run_dir"}
    smoke = ROOT / "notebooks" / "params" / f"{path.name[:2]}_smoke.yaml"
    assert smoke.is_file(), f"{path.name} has no smoke preset {smoke.name}"
    assert yaml.safe_load(smoke.read_text()) == defaults


# ---- one execution ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run01(tmp_path_factory):
    """Notebook 01 run as a user types it, `tclab run 01 -f smoke -p ...`, from a folder that is not the
    project: the bare number and preset name resolve against the project's notebooks/ folder."""
    import contextlib
    import io

    from tclab import cli

    reports, elsewhere = tmp_path_factory.mktemp("reports"), tmp_path_factory.mktemp("elsewhere")
    args = ["run", "01", "-f", "smoke", *[a for k, v in TINY.items() for a in ("-p", k, str(v))],
            "--reports", str(reports), "--tag", "test"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(elsewhere)
        rc = cli.main(args)
    lines = out.getvalue().strip().splitlines()
    assert rc == 0 and lines, f"tclab {' '.join(args)} exited {rc}: {lines}"
    assert not any(elsewhere.iterdir())                        # nothing written where it was called from
    return Path(lines[-1])


def test_notebook_01_writes_a_complete_run_folder(run01):
    assert run01.is_dir() and not run01.name.endswith(runs.FAILED_SUFFIX)
    assert (run01 / runs.REPORT_NAME).is_file()
    for name in FIGURES:
        assert (run01 / f"{name}.png").stat().st_size > 1000, name
    prov = json.loads((run01 / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["parameters"]["num_steps"] == 4
    executed = nbformat.read(run01 / "01_token_redundancy.ipynb", as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_notebook_01_summary(run01):
    s = json.loads((run01 / "summary.json").read_text())
    head = s["headline"]
    for k in ("frac_tokens_below_5pct", "top10pct_change_share", "adjacent_rank_corr", "far_rank_corr",
              "suggested_tprr_split", "obs1_holds", "obs2_holds", "obs3_holds", "sdedit_frac_tokens_below_5pct"):
        assert k in head, k
    assert 0 <= head["frac_tokens_below_5pct"] <= 1 and 0 <= head["sdedit_frac_tokens_below_5pct"] <= 1
    assert 0.1 <= head["top10pct_change_share"] <= 1  # the top 10% carry at least their equal share
    assert -1 <= head["adjacent_rank_corr"] <= 1
    assert 0 < head["suggested_tprr_split"] < 1  # 4 steps: phase 2 starts at step 2 or 3
    assert head["suggested_tprr_split"] in (0.5, 0.75)
    assert set(s["figures"]) >= {f"{n}.png" for n in FIGURES}
    assert s["record"]["steps"] == 4 and s["record"]["samples"] == 3
    # SDEdit at strength 0.6 of 4 steps runs round(2.4) = 2 steps: one change step, so obs 2/3 are undetermined
    assert s["sdedit"]["record"]["steps"] == 2
    assert s["sdedit"]["observations"]["out_change"]["adjacent_steps_correlated"]["holds"] is None
    # every headline number carries its interval over the 3 samples (issue #19)
    for k in ("frac_tokens_below_5pct", "top10pct_change_share", "adjacent_rank_corr", "phase_mean_ratio"):
        lo, hi = s["intervals"][f"{k}_ci"]
        assert lo <= hi and (head[f"{k}_ci_low"], head[f"{k}_ci_high"]) == (lo, hi) and head[f"{k}_n"] == 3, k
    # the report's first screen: a verdict per observation and trajectory set, as the analysis found: the
    # point verdict where the bootstrap over samples finds it stable, else "within noise"
    from tclab.report import WITHIN_NOISE, ReportSummary, verdict_of

    first = ReportSummary.from_dict(s["report"])
    expected = [WITHIN_NOISE if head[f"obs{i}_stable"] is False else verdict_of(head[f"obs{i}_holds"]) for i in (1, 2, 3)]
    assert [f.verdict for f in first.findings[:3]] == [head[f"obs{i}_verdict"] for i in (1, 2, 3)] == expected
    assert all("N = 3 samples" in f.text for f in first.findings[:3])
    assert first.findings[4].verdict == "not measured" and len(first.findings) == 6
    page = (run01 / runs.REPORT_NAME).read_text()
    assert page.count('class="badge ') == 6 and '<figure class="tclab-figure"' in page

    # identity names exactly the in-house images traced
    image_set = analysis.choose_balanced_images(load_image_folder(ROOT / "data" / "shapes", 32, limit=3), 3)
    assert s["identity"]["images_used_manifest_sha256"] == image_set.manifest_hash()
    assert "images_manifest_sha256" not in s["identity"]   # that names a whole folder (05, 02-04), not a subset
    assert s["identity"]["images_used"] == 3


def test_notebook_01_saves_records_that_match_the_summary(run01):
    rec = TokenChangeRecord.load(run01 / "record_samples.npz")
    sd = TokenChangeRecord.load(run01 / "record_sdedit.npz")
    assert (rec.num_steps, len(rec.rows("cond")), rec.grid) == (4, 3, (16, 16))
    assert len(sd.rows("cond")) == 3 and sd.data_identity["usable"] == 3
    s = json.loads((run01 / "summary.json").read_text())
    again = analysis.summarise_redundancy(rec, sdedit_record=sd)["headline"]
    assert again == pytest.approx(s["headline"])  # the summary is reproducible from the saved records
    assert np.isfinite(rec.out_change[1:]).all()
