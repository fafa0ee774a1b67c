"""notebooks/05_inhouse_report.ipynb: its presets, and one real execution with tiny parameters.

The execution runs once (module-scoped) through ``tclab.runs.run_notebook`` into a temporary reports
folder that already holds four hand-written ablation runs, so the "auto" recommendation has a
known answer: only the 02 run is of this model, successful and within budget (the 03 run is over
budget, the failed 04 run and the 04 run of another model are ignored). The fallback path (nothing
fits, candidates measured here) is tested in tests/test_inhouse.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from tclab import runs
from tclab.analysis import choose_balanced_images
from tclab.data import load_image_folder
from tclab.models import load_dit
from tclab.record import TokenChangeRecord

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks" / "05_inhouse_report.ipynb"
SHAPES = ROOT / "data" / "shapes"
# num_steps 5: SDEdit at 0.6 runs 3 steps, so the record has two change steps
TINY = {"num_steps": 5, "num_images": 3, "timing_batch": 1, "timing_repeats": 1, "worst_k": 2}
FIGURES = ("change_curves", "token_maps", "side_by_side", "worst_images")
CACHE = {"scorer": "learned-static", "selection": "global", "kv": "all", "rho": 0.1, "schedule": "tprr",
         "k1": 5, "k2": 3, "split": 0.5}


def _plant(reports: Path, name: str, notebook: str, status: str, sha: str, flop_ratio: float, psnr: float,
           num_steps: int = TINY["num_steps"]) -> str:
    d = reports / name
    d.mkdir(parents=True)
    start = f"{name[:4]}-{name[4:6]}-{name[6:8]}T{name[9:11]}:{name[11:13]}:{name[13:15]}Z"
    (d / "provenance.json").write_text(json.dumps({"status": status, "notebook": f"notebooks/{notebook}.ipynb",
                                                   "tag": "smoke", "start_utc": start}))
    best = {"name": f"planted {notebook}", "curve": "x", "family": "ablation", "flop_ratio": flop_ratio,
            "time_ratio": 0.5, "psnr": psnr, "ssim": 0.8, "class_consistency": 0.5,
            "config": {"name": f"planted {notebook}", "cache": CACHE}}
    (d / "summary.json").write_text(json.dumps({
        "headline": {}, "best_under_budget": best, "settings": {"num_steps": num_steps, "scheduler": "ddim"},
        "identity": {"model": "shapes-dit", "model_weights_sha256": sha}}))
    return name


@pytest.fixture(scope="module")
def weights_sha():
    return load_dit("shapes-dit").identity()["weights_sha256"]


@pytest.fixture(scope="module")
def run05(tmp_path_factory, weights_sha):
    reports = tmp_path_factory.mktemp("reports")
    planted = {
        "chosen": _plant(reports, "20260101T000000Z_02_ablation_predictor_smoke", "02_ablation_predictor", "ok",
                         weights_sha, 0.45, 30.0),
        "over_budget": _plant(reports, "20260102T000000Z_03_ablation_block_selection_smoke",
                              "03_ablation_block_selection", "ok", weights_sha, 0.6, 35.0),
        "failed": _plant(reports, "20260103T000000Z_04_ablation_tprr_smoke_FAILED", "04_ablation_tprr", "failed",
                         weights_sha, 0.3, 40.0),
        "other_model": _plant(reports, "20260104T000000Z_04_ablation_tprr_smoke", "04_ablation_tprr", "ok",
                              "0" * 64, 0.3, 41.0),
        "other_steps": _plant(reports, "20260105T000000Z_02_ablation_predictor_smoke", "02_ablation_predictor", "ok",
                              weights_sha, 0.3, 42.0, num_steps=10),
    }
    folder = runs.run_notebook(NB, TINY, reports_dir=reports, tag="test", progress_bar=False)
    return folder, planted


# ---- presets (no kernel) ----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted((ROOT / "notebooks" / "params").glob("05_*.yaml")), ids=lambda p: p.name)
def test_presets_of_notebook_05_use_only_its_parameters(preset):
    values = runs.load_parameters(preset)
    runs.validate_parameters(values, runs.notebook_parameters(NB), notebook=NB.name)
    assert values["recommendation"] == "auto" and values["num_steps"] in (10, 50)


def test_smoke_preset_equals_the_notebook_defaults():
    defaults = {k: v for k, v in runs.notebook_parameters(NB).items() if k != "run_dir"}
    assert yaml.safe_load((ROOT / "notebooks" / "params" / "05_smoke.yaml").read_text()) == defaults


def test_full_preset_is_the_full_setting():
    full = runs.load_parameters(ROOT / "notebooks" / "params" / "05_full.yaml")
    assert (full["num_steps"], full["timing_batch"], full["timing_repeats"]) == (50, 4, 3)
    assert (full["confidence"], full["noise_pairs"]) == (0.95, 6)   # the time ratio has an interval, and a floor
    assert 24 <= full["num_images"] <= 48


# ---- one execution ----------------------------------------------------------------------------------

def test_notebook_05_writes_a_complete_run_folder(run05):
    folder, _ = run05
    assert folder.is_dir() and not folder.name.endswith(runs.FAILED_SUFFIX)
    assert (folder / runs.REPORT_NAME).is_file()
    for name in FIGURES:
        assert (folder / f"{name}.png").stat().st_size > 1000, name
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["parameters"]["num_steps"] == 5 and prov["parameters"]["num_images"] == 3
    executed = nbformat.read(folder / NB.name, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "path: ablation run" in text and "== SDEdit of the in-house images (3 samples, 3 steps) ==" in text


def test_notebook_05_recommends_from_the_right_ablation_run(run05):
    folder, planted = run05
    s = json.loads((folder / "summary.json").read_text())
    head = s["headline"]
    assert head["recommendation_source"] == "ablation run"
    assert head["recommendation_from"] == planted["chosen"]
    assert head["recommendation"] == "planted 02_ablation_predictor" and head["source_within_budget"] is True
    assert head["within_budget"] == (head["flop_ratio"] <= head["budget_flop_ratio"])  # measured on these images
    rec = s["details"]["recommendation"]
    assert rec["cache"]["rho"] == 0.1 and rec["cache"]["k1"] == 5
    v = {r["run"]: r["verdict"] for r in rec["considered"]}
    assert v[planted["chosen"]].startswith("chosen")
    assert "exceeds the budget" in v[planted["over_budget"]]
    assert "status 'failed'" in v[planted["failed"]]
    assert "another model" in v[planted["other_model"]]
    assert "sampled with 10 steps, this report samples 5" in v[planted["other_steps"]]  # newer, better, other steps


def test_notebook_05_summary_numbers(run05, weights_sha):
    folder, _ = run05
    text = (folder / "summary.json").read_text()
    s = json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}: not strict JSON"))
    head = s["headline"]
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in head.values())
    assert (head["usable_images"], head["bad_images"], head["images_used"]) == (300, 0, 3)
    assert 0 < head["flop_ratio"] < 1 and head["flop_speedup"] == pytest.approx(1 / head["flop_ratio"])
    assert head["time_ratio"] > 0 and head["time_speedup"] == pytest.approx(1 / head["time_ratio"])
    assert 5 < head["psnr"] < 100 and 0 < head["ssim"] < 1
    assert head["worst_psnr"] <= head["psnr"]
    for k in ("class_consistency_full", "class_consistency_cached"):
        assert 0 <= head[k] <= 1 and head[k] * 3 == pytest.approx(round(head[k] * 3))  # k of 3 images
    # 3 images in 128-d features are below the FID floor (129): no number, the reason instead; KID and its std stay
    assert head["fid_full"] is None and head["fid_cached"] is None and head["fid_comparable_to_published"] is False
    assert head["fid_reason"] == "not computed: 3 images, needs at least 129"
    assert (head["fid_n"], head["fid_n_reference"]) == (3, 300) and head["kid_std_cached"] >= 0
    assert "not computed: 3 images, needs at least 129" in (folder / runs.REPORT_NAME).read_text()
    assert "NOT comparable to published FID" in s["details"]["measurement"]["fid_extractor"]
    assert s["details"]["redundancy"]["record"]["steps"] == 3  # SDEdit: the last round(5 * 0.6) steps
    from tclab.report import ReportSummary, verdict_of

    first = ReportSummary.from_dict(s["report"])
    assert first.findings[0].group == "the answer" and first.findings[1].verdict == "holds"   # 300 usable, none skipped
    rec = [x for x in first.findings if x.group == "the recommended setting on these images"]
    assert rec[0].verdict == verdict_of(head["within_budget"]) and head["recommendation"] in rec[0].text
    assert first.index_keys == ["recommendation", "flop_ratio", "psnr"]
    assert set(s["figures"]) >= {f"{n}.png" for n in FIGURES}

    # identity names exactly the folder checked, the images used and the model
    folder_set = load_image_folder(SHAPES, 32)
    assert s["identity"]["images_manifest_sha256"] == folder_set.manifest_hash()
    assert s["identity"]["images_used_manifest_sha256"] == choose_balanced_images(folder_set, 3).manifest_hash()
    assert s["identity"]["model_weights_sha256"] == weights_sha
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["identity"] == s["identity"]


def test_notebook_05_data_files_agree_with_the_summary(run05):
    folder, _ = run05
    s = json.loads((folder / "summary.json").read_text())
    per = pd.read_csv(folder / "per_image.csv")
    assert len(per) == 3 and per["psnr"].min() == pytest.approx(s["headline"]["worst_psnr"])
    assert per["psnr"].mean() == pytest.approx(s["headline"]["psnr"], rel=1e-5)
    assert all((SHAPES / p).is_file() for p in per["path"])
    worst = s["details"]["worst"]
    assert [w["rank"] for w in worst] == [1, 2] and worst[0]["psnr"] <= worst[1]["psnr"]
    assert all(Path(w["file"]).is_file() for w in worst)
    m = pd.read_csv(folder / "measurement.csv")
    assert m["name"].tolist() == ["full compute", "recommended: planted 02_ablation_predictor"]
    assert len(pd.read_csv(folder / "manifest.csv")) == 300
    rec = TokenChangeRecord.load(folder / "record_sdedit.npz")
    assert rec.num_steps == 3 and len(rec.rows("cond")) == 3 and rec.data_identity["usable"] == 3
