"""The three ablation notebooks, each executed once under papermill with tiny parameters into a
temporary reports folder, and their run folders and summary.json checked against the sweep they saved."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tclab import ablation, runs
from tclab.cache.peers import PEERS
from tclab.models import load_dit

ROOT = Path(__file__).resolve().parent.parent
TINY = {"num_steps": 4, "quality_samples": 3, "timing_batch": 1, "timing_repeats": 1, "fewer_steps": [2],
        "fora_intervals": [2], "budget": 0.7, "reductions": [1.5, 2]}
CASES = {
    "02_ablation_predictor": {"rhos": [0.5, 0.1]},
    "03_ablation_block_selection": {"rhos": [0.5, 0.1]},
    # 04 measures its sweep on two torchrun workers (gloo, one CPU thread each)
    "04_ablation_tprr": {"tprr": [[2, 1, 0.5], [1, 2, 0.5]], "round_robin": [2], "percentile": [2],
                         "importance_samples": 1, "workers": 2},
}
# the curves each notebook must measure (its ablated variants) with the defaults of its other parameters
CURVES = {
    "02_ablation_predictor": {"learned-static", "learned-dynamic", "oracle", "oracle-error", "staleness",
                              "staleness-learned", "prev-change", "toca", "random", "FORA + forecast"},
    "03_ablation_block_selection": {"uniform", "adaptive", "global", "global + first/last 1 full",
                                    "global static shapes", "FORA + forecast"},
    "04_ablation_tprr": {"TPRR long interval first", "TPRR long interval last", "round-robin", "percentile",
                         "FORA + forecast"},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def executed(request, tmp_path_factory):
    name = request.param
    reports = tmp_path_factory.mktemp("reports")
    run_dir = runs.run_notebook(ROOT / "notebooks" / f"{name}.ipynb", {**TINY, **CASES[name]}, reports_dir=reports,
                                tag="test", progress_bar=False)
    return name, run_dir


def test_run_folder_is_complete(executed):
    name, run_dir = executed
    assert run_dir.is_dir() and not run_dir.name.endswith(runs.FAILED_SUFFIX)
    for f in ("report.html", "summary.json", "sweep.csv", "pareto.png", "samples.png", "provenance.json"):
        assert (run_dir / f).stat().st_size > 500, f
    nb = nbformat.read(run_dir / f"{name}.ipynb", as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_sweep_has_every_curve_and_reference_point(executed):
    name, run_dir = executed
    f = pd.read_csv(run_dir / "sweep.csv", keep_default_na=False)
    assert set(f.loc[f["family"] == "ablation", "curve"]) == CURVES[name]
    names = set(f["name"])
    assert {"full compute", "fewer steps (2)", "FORA (interval 2)", "FORA + forecast(1) (interval 2)",
            "TaylorSeer (interval 2, order 1)"} <= names  # tclab's forecasting and the tuned rival
    assert {f"peer {p}" for p in PEERS} <= names  # every registered peer, reported even if not installed
    ok = f[f["error"] == ""]
    try:
        import cache_dit  # noqa: F401
        may_fail = set()
    except ImportError:
        may_fail = {"peer dbcache"}  # the optional peer: reported as not installed
    assert set(f.loc[f["error"] != "", "name"]) <= may_fail, f.loc[f["error"] != "", ["name", "error"]]
    assert (ok["flop_ratio"].astype(float) > 0).all() and (ok["time_ratio"].astype(float) > 0).all()
    full = ok[ok["name"] == "full compute"].iloc[0]
    assert float(full["flop_ratio"]) == 1.0 and float(full["psnr"]) == 100.0
    assert 0 <= float(full["class_consistency"]) <= 1  # the shipped classifier was used
    assert float(ok.loc[ok["name"] == "fewer steps (2)", "flop_ratio"].iloc[0]) == pytest.approx(0.5)


def test_summary_agrees_with_the_saved_sweep(executed):
    name, run_dir = executed
    s = json.loads((run_dir / "summary.json").read_text())
    f = pd.read_csv(run_dir / "sweep.csv", keep_default_na=False)
    h = s["headline"]
    assert h["points"] == len(f) and h["budget_flop_ratio"] == 0.7
    assert h["failed_points"] == int((f["error"] != "").sum())
    best = s["best_under_budget"]
    usable = f[(f["family"] == "ablation") & (f["error"] == "")].copy()
    usable["flop_ratio"] = usable["flop_ratio"].astype(float)
    usable["psnr"] = usable["psnr"].astype(float)
    within = usable[usable["flop_ratio"] <= 0.7]
    if within.empty:
        assert best is None and h["best_under_budget"] is None
    else:
        top = within[within["psnr"] == within["psnr"].max()]  # equal schedules can tie: the cheaper wins
        assert best["psnr"] == pytest.approx(top["psnr"].iloc[0])
        assert best["name"] in set(top.loc[top["flop_ratio"] == top["flop_ratio"].min(), "name"])
        assert best["flop_ratio"] <= 0.7 and best["config"]["cache"] is not None
        ablation.Variant(best["name"], best["curve"], cache=best["config"]["cache"])  # a valid TokenCache config
    for r in ("1.5x", "2x"):
        w = h[f"winner_at_{r}_flops"]
        assert w is None or w in CURVES[name]
    assert s["identity"]["model_weights_sha256"] == load_dit("shapes-dit").identity()["weights_sha256"]
    assert len(s["points"]) == len(f) and s["settings"]["num_steps"] == 4
    from tclab.report import ReportSummary

    first = ReportSummary.from_dict(s["report"])       # the report's first screen follows the headline
    groups = [x.group for x in first.findings]
    assert groups[0] == "at 1.5x fewer FLOPs" and any(g.startswith("within the budget") for g in groups)
    if h["winner_at_2x_flops"] is None:
        assert any(x.verdict == "not measured" and x.group == "at 2x fewer FLOPs" for x in first.findings)
    assert s["identity"]["images_manifest_sha256"]


def test_the_report_states_where_the_sweep_ran(executed):
    name, run_dir = executed
    world = json.loads((run_dir / "summary.json").read_text())["world"]
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    workers = CASES[name].get("workers", 1)
    assert world["world_size"] == workers and len(world["devices"]) == workers
    if workers > 1:
        assert world["backend"] == "gloo" and f"Measured by {workers} torchrun workers (gloo)" in html
        assert not (run_dir / "workers").exists()   # the workers' plan, units and logs go once merged
    else:
        assert "Measured in one process" in html
