"""A team's own DiT and image folder, end to end, run as a user would: the `tclab` command in a folder of
theirs (not the repository), relative paths, every notebook (issue 13, point 7).

Two stand-ins, both tiny latent ``DiTPipeline`` folders with an ``AutoencoderKL`` and learned sigma
(built by ``tests/standins.py``, nothing downloaded), and a class-folder image set named after the
team's own categories, with odd files among the images:

- ``nameless``: no ``id2label``, 4 blocks, an 8x8 token grid; its folders match nothing, so every
  image is sampled unconditionally and class-consistency is not measured;
- ``imagenet``: a 1000-class ``id2label`` like facebook/DiT-XL-2-256's, two of whose names (one an
  alias, one in other case and separators) are folders of the set; the third folder matches nothing.

The workflow is the README's: check-images -> 01 -> train-predictor -> 02, 03, 04 (small) -> 05 with
``recommendation: auto``. Every step must exit 0 and its summary must hold real figures.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.standins import imagenet_like_labels, write_latent_pipeline, write_team_folder

STEPS = "6"  # sampling steps of every run: short, but enough for TPRR(3, 2) and a 1.25x budget
SWEEP = ["-p", "num_steps", STEPS, "-p", "quality_samples", "3", "-p", "timing_batch", "1", "-p", "budget", "0.8",
         "-p", "reductions", "[1.25]", "-p", "fewer_steps", "[3]", "-p", "fora_intervals", "[2]", "-p", "peers", "[]"]
STANDINS = {
    "nameless": None,
    "imagenet": imagenet_like_labels(1000, {3: "red stripes, striped thing", 7: "Blob-Things"}),
}


def tclab_command() -> list[str]:
    exe = shutil.which("tclab")
    return [exe] if exe else [sys.executable, "-c", "import sys; from tclab.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module", params=sorted(STANDINS))
def team(request, tmp_path_factory):
    """Run the whole workflow once per stand-in; returns (name, work folder, {step: completed process})."""
    work = tmp_path_factory.mktemp(f"team-{request.param}")
    write_latent_pipeline(work / "our-dit", id2label=STANDINS[request.param], num_layers=4, sample_size=16)
    write_team_folder(work / "our images")
    env = {**os.environ, "TCLAB_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("TCLAB_REPORTS_DIR", None)  # runs go where the user says: --reports reports
    weights = Path(__file__).resolve().parents[1] / "tclab" / "weights"
    before = sorted(p.name for p in weights.iterdir())
    run = ["run", "--reports", "reports", "-p", "model", "our-dit", "-p", "images", "our images"]
    steps = {
        "check-images": ["check-images", "our images"],
        "01": [*run, "01", "-p", "num_steps", STEPS, "-p", "num_samples", "2", "-p", "sdedit_images", "3"],
        "train-predictor": ["train-predictor", "--model", "our-dit", "--kind", "both", "--images", "our images",
                            "--steps", "20", "--num-steps", STEPS, "--num-samples", "2", "--max-gap", "2",
                            "--eval-pairs", "4"],
        "02": [*run, "02", *SWEEP, "-p", "scorers", "[learned-static, learned-dynamic, random]", "-p", "rhos", "[0.1]",
               "-p", "k1", "3", "-p", "k2", "2"],
        "03": [*run, "03", *SWEEP, "-p", "selections", "[global, uniform]", "-p", "rhos", "[0.1]",
               "-p", "full_end_blocks", "[]", "-p", "k1", "3", "-p", "k2", "2"],
        "04": [*run, "04", *SWEEP, "-p", "tprr", "[[3, 2, 0.5]]", "-p", "round_robin", "[2]", "-p", "percentile", "[2]",
               "-p", "importance_samples", "1"],
        "05": [*run, "05", "-p", "num_steps", STEPS, "-p", "num_images", "4", "-p", "timing_batch", "1",
               "-p", "budget", "0.8", "-p", "recommendation", "auto"],
    }
    done = {}
    for step, args in steps.items():
        proc = subprocess.run([*tclab_command(), *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
        done[step] = proc
        assert proc.returncode == 0, f"{request.param}: `tclab {' '.join(args)}` exited {proc.returncode}:\n" \
                                     f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(p.name for p in weights.iterdir()) == before, "a run wrote into the package's source tree"
    return request.param, work, done


def run_folder(work: Path, notebook: str) -> Path:
    (folder,) = [p for p in (work / "reports").iterdir() if p.is_dir() and f"_{notebook}" in p.name]
    return folder


def summary(work: Path, notebook: str) -> dict:
    return json.loads((run_folder(work, notebook) / "summary.json").read_text())


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_check_images_lists_the_odd_files(team):
    _, _, done = team
    out = done["check-images"].stdout
    assert "15 usable images" in out and "3 skipped" in out
    assert "broken.png" in out and "empty.jpg" in out and "notes.txt" in out


def test_01_maps_the_folders_and_measures_redundancy(team):
    name, work, _ = team
    s = summary(work, "01_token_redundancy")
    assert finite(s["headline"]["adjacent_rank_corr"]) and finite(s["headline"]["sdedit_adjacent_rank_corr"])
    rows = {r["folder"]: r for r in s["labels"]["rows"]}
    assert set(rows) == {"Red Stripes", "blob_things", "chequer-board (v2)"}
    if name == "nameless":
        assert all(r["class_id"] is None for r in rows.values())
    else:
        assert rows["Red Stripes"]["class_id"] == 3 and rows["Red Stripes"]["how"] == "alias"
        assert rows["blob_things"]["class_id"] == 7 and rows["blob_things"]["how"] == "name"
        assert rows["chequer-board (v2)"]["class_id"] is None
    html = (run_folder(work, "01_token_redundancy") / "report.html").read_text()
    assert "chequer-board (v2)" in html  # the per-folder table is in the report


def test_train_predictor_writes_both_kinds_into_the_store_with_their_check(team):
    _, work, done = team
    out = done["train-predictor"].stdout
    files = sorted((work / "home" / "models").glob("*/predictor-*.safetensors"))
    assert [f.name for f in files] == ["predictor-dynamic.safetensors", "predictor-static.safetensors"]
    assert out.count("check: blended-output relative MSE") == 2 and str(work / "home") in out


@pytest.mark.parametrize("notebook", ["02_ablation_predictor", "03_ablation_block_selection", "04_ablation_tprr"])
def test_ablations_use_this_models_predictor_and_hold_real_figures(team, notebook):
    name, work, _ = team
    folder = run_folder(work, notebook)
    frame = pd.read_csv(folder / "sweep.csv")
    frame["error"] = frame["error"].astype("string").fillna("")
    assert (frame["error"] == "").all(), frame.loc[frame["error"] != "", ["name", "error"]].to_string()
    learned = frame[frame["config"].str.contains("learned-static")]
    assert len(learned) and learned["psnr"].map(finite).all() and learned["flop_ratio"].lt(1).all()
    store = str(work / "home" / "models")
    assert learned["config"].str.contains(store, regex=False).all()  # the store's file, not the shipped one
    head = json.loads((folder / "summary.json").read_text())["headline"]
    assert head["best_under_budget"] and finite(head["best_psnr"]) and finite(head["best_flop_ratio"])
    if name == "imagenet":  # two mapped folders: a classifier was trained on them and measured the samples
        assert finite(head["full_compute_class_consistency"])
    else:
        assert head["full_compute_class_consistency"] is None


def test_05_recommends_from_the_ablation_runs_of_this_model_and_measures_it(team):
    name, work, _ = team
    s = summary(work, "05_inhouse_report")
    head = s["headline"]
    assert head["recommendation_source"] == "ablation run" and head["within_budget"] is not False
    assert head["usable_images"] == 15 and head["bad_images"] == 3 and head["images_used"] == 4
    for key in ("flop_ratio", "time_ratio", "psnr", "ssim", "worst_psnr"):
        assert finite(head[key]), key
    assert head["fid_cached"] is None and head["fid_reason"].startswith("not computed: 4 images")
    assert finite(head["kid_cached"]) and finite(head["kid_std_cached"])
    assert head["mapped_folders"] == (0 if name == "nameless" else 2)
    if name == "imagenet":
        assert finite(head["class_consistency_cached"]) and head["class_consistency_n"] >= 1
    else:
        assert head["class_consistency_cached"] is None
    assert s["labels"]["rows"][0]["folder"] == "Red Stripes"
