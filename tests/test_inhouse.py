"""tclab.inhouse: the in-house report's logic, on hand-written reports folders and a tiny DiT.

The auto-recommendation is tested on fake run folders whose provenance.json / summary.json are
written here (the form ``tclab.runs.run_notebook`` and ``tclab.ablation.summarise_sweep`` write), so
each rule (other model, failed run, over budget, superseded, not a TokenCache setting) is checked
in isolation. Measurement tests use the 2-block pixel-space DiT of conftest (8x8 images, classes
a/b/c) on a tiny image folder written here: seconds on one core.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tclab import inhouse, runs
from tclab.ablation import FULL_COMPUTE, SweepSettings
from tclab.analysis import choose_balanced_images
from tclab.data import load_image_folder
from tclab.features import ClassifierFeatures
from tclab.labels import resolve_labels
from tclab.models import NULL_CLASS
from tclab.sweep_summary import SCHEMA_VERSION

SHA = "a" * 64
OTHER_SHA = "b" * 64
STATIC = {"scorer": "learned-static", "selection": "global", "rho": 0.1, "schedule": "tprr", "k1": 5, "k2": 3,
          "split": 0.5}
TINY_SETTINGS = dict(num_steps=4, quality_samples=3, timing_batch=1, timing_repeats=1)


# ---- fake reports folders -----------------------------------------------------------------------------

def best_point(name="learned-static rho=0.1", flop_ratio=0.45, psnr=30.0, cache=STATIC):
    return {"name": name, "curve": name.split()[0], "family": "ablation", "flop_ratio": flop_ratio,
            "time_ratio": flop_ratio + 0.05, "psnr": psnr, "ssim": 0.9, "class_consistency": 0.8,
            "config": {"name": name, "cache": None if cache is None else dict(cache)}}


def write_run(reports: Path, start: str, notebook: str, status: str = "ok", sha: str | None = SHA,
              best: dict | None = None, num_steps: int = 4, tag: str = "smoke", summary: dict | None = None) -> str:
    """A run folder as ``tclab run`` leaves it; ``start`` like '20260101T000000Z'. Returns its name. Its
    summary.json is ``summary``, else an unversioned one from before (only the parts the recommendation reads)."""
    name = f"{start}_{notebook}_{tag}" + (runs.FAILED_SUFFIX if status == "failed" else "")
    d = reports / name
    d.mkdir(parents=True)
    iso = f"{start[:4]}-{start[4:6]}-{start[6:8]}T{start[9:11]}:{start[11:13]}:{start[13:15]}Z"
    (d / "provenance.json").write_text(json.dumps({"status": status, "notebook": f"/x/notebooks/{notebook}.ipynb",
                                                   "tag": tag, "start_utc": iso}))
    if summary is None:
        summary = {"headline": {}, "best_under_budget": best if best is not None else best_point(),
                   "settings": {"num_steps": num_steps, "scheduler": "ddim", "guidance_scale": 4.0},
                   "identity": {"model": "m", "model_weights_sha256": sha}}
    (d / "summary.json").write_text(json.dumps(summary))
    return name


def verdicts(considered):
    return {r["run"]: r["verdict"] for r in considered}


def test_picks_the_highest_psnr_across_the_three_ablation_notebooks(tmp_path):
    a = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor", best=best_point("p", 0.45, 25.0))
    b = write_run(tmp_path, "20260102T000000Z", "03_ablation_block_selection", best=best_point("b", 0.40, 28.0))
    c = write_run(tmp_path, "20260103T000000Z", "04_ablation_tprr", best=best_point("t", 0.30, 27.0))
    best, considered = inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5)
    assert best["run"] == b and best["name"] == "b" and best["psnr"] == 28.0 and best["cache"] == STATIC
    v = verdicts(considered)
    assert v[b].startswith("chosen") and v[a] == "eligible" and v[c] == "eligible"
    assert [r["run"] for r in considered] == [c, b, a]  # newest first


def test_other_model_failed_and_over_budget_runs_are_ignored(tmp_path):
    wrong = write_run(tmp_path, "20260105T000000Z", "02_ablation_predictor", sha=OTHER_SHA,
                      best=best_point("w", 0.3, 40))
    failed = write_run(tmp_path, "20260104T000000Z", "03_ablation_block_selection", status="failed",
                       best=best_point("f", 0.3, 39))
    over = write_run(tmp_path, "20260103T000000Z", "04_ablation_tprr", best=best_point("o", 0.6, 38))
    good = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor", best=best_point("g", 0.45, 20))
    best, considered = inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5)
    assert best["run"] == good and best["name"] == "g"
    v = verdicts(considered)
    assert "another model" in v[wrong] and "status 'failed'" in v[failed] and "exceeds the budget 0.5" in v[over]
    # the same folder with a looser budget takes the over-budget run (it has the best PSNR left)
    assert inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.7)[0]["run"] == over


def test_only_the_newest_successful_run_of_a_notebook_counts(tmp_path):
    old = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor", best=best_point("old", 0.4, 35))
    new = write_run(tmp_path, "20260102T000000Z", "02_ablation_predictor", best=best_point("new", 0.4, 22))
    write_run(tmp_path, "20260103T000000Z", "02_ablation_predictor", status="failed", best=best_point("x", 0.4, 50))
    best, considered = inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5)
    assert best["run"] == new
    assert f"superseded by the newer run {new}" in verdicts(considered)[old]


def test_points_that_are_not_usable_token_cache_settings_are_not_eligible(tmp_path):
    base = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor",
                     best=best_point("FORA", 0.3, 30, cache=None))
    typo = write_run(tmp_path, "20260102T000000Z", "03_ablation_block_selection",
                     best=best_point("typo", 0.3, 30, cache={**STATIC, "rhoo": 0.1}))
    pct = write_run(tmp_path, "20260103T000000Z", "04_ablation_tprr", num_steps=10, best=best_point(
        "percentile(3)", 0.4, 30,
        cache={**STATIC, "schedule": "percentile", "n_full": 3, "step_importance": [1.0] * 10}))
    write_run(tmp_path, "20260104T000000Z", "01_token_redundancy")  # not an ablation notebook: not even listed
    anon = write_run(tmp_path, "20260105T000000Z", "02_ablation_predictor", sha=None)
    best, considered = inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5, num_steps=4)
    assert best is None
    v = verdicts(considered)
    assert len(v) == 4 and "names no model" in v[anon]
    assert "not a TokenCache setting" in v[base]
    assert "rhoo" in v[typo] and "did you mean 'rho'" in v[typo]
    assert "sampled with 10 steps, this report samples 4" in v[pct]
    # with the matching step count the percentile point is eligible
    assert inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5, num_steps=10)[0]["run"] == pct


def test_nothing_to_find(tmp_path):
    assert inhouse.find_ablation_recommendation(tmp_path / "missing", SHA, 0.5) == (None, [])
    run = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor")
    best, considered = inhouse.find_ablation_recommendation(tmp_path, None, 0.5)  # an untrained preset: no hash
    assert best is None and "no weights hash" in verdicts(considered)[run]
    with pytest.raises(ValueError, match="budget must be a positive FLOP ratio"):
        inhouse.find_ablation_recommendation(tmp_path, SHA, 0)


def test_reports_folder_of_a_staged_and_an_interactive_run(tmp_path):
    staged = tmp_path / runs.STAGING_DIRNAME / "20260101T000000Z_05_inhouse_report_x"
    staged.mkdir(parents=True)
    assert inhouse.reports_folder(runs.RunContext(dir=staged, managed=True)) == tmp_path.resolve()
    assert inhouse.reports_folder(runs.RunContext(dir=tmp_path / "r", managed=True)) == tmp_path.resolve()
    ctx = runs.RunContext(dir=tmp_path / "r", managed=False, reports_dir=tmp_path / "elsewhere")
    assert inhouse.reports_folder(ctx) == tmp_path / "elsewhere"


def test_reads_the_summary_summarise_sweep_writes(tmp_path):
    from tclab import ablation

    class Model:
        name = "m"

        def identity(self):
            return {"weights_sha256": SHA}

    rows = [("full compute", "full compute", "reference", 1.0, 1.0, 100.0, None),
            ("learned-static rho=0.1", "learned-static", "ablation", 0.45, 0.5, 31.0, STATIC),
            ("FORA (interval 3)", "FORA", "baseline", 0.4, 0.45, 33.0, None)]
    frame = pd.DataFrame([{"name": n, "curve": c, "family": f, "flop_ratio": fr, "time_ratio": tr, "psnr": q,
                           "ssim": 0.9, "class_consistency": 0.8, "error": "",
                           "config": json.dumps({"name": n, "cache": cache})} for n, c, f, fr, tr, q, cache in rows])
    sweep = ablation.SweepResult(frame, {}, torch.zeros(0), SweepSettings(**TINY_SETTINGS), [])
    summary = ablation.summarise_sweep(sweep, 0.5, (2,), model=Model()).to_dict()
    assert summary["version"] == SCHEMA_VERSION
    run = write_run(tmp_path, "20260101T000000Z", "03_ablation_block_selection", summary=summary)
    best, considered = inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5, num_steps=4)
    assert best["run"] == run and best["name"] == "learned-static rho=0.1" and best["cache"] == STATIC
    assert best["settings"].num_steps == 4 and best["time_ratio"] == 0.5


def test_a_summary_it_cannot_read_is_ignored_with_the_file_and_field(tmp_path):
    other = write_run(tmp_path, "20260103T000000Z", "02_ablation_predictor",
                      summary={"version": 99, "best_under_budget": best_point("v99", 0.3, 40)})
    typo = write_run(tmp_path, "20260102T000000Z", "03_ablation_block_selection",
                     summary={"best_under_budget": {**best_point("t", 0.3, 40), "psnr": "40 dB"}})
    good = write_run(tmp_path, "20260101T000000Z", "04_ablation_tprr")
    best, considered = inhouse.find_ablation_recommendation(tmp_path, SHA, budget=0.5)
    assert best["run"] == good
    v = verdicts(considered)
    assert v[other].startswith(f"ignored: {tmp_path / other / 'summary.json'}: version is 99")
    assert v[typo].startswith("ignored: ") and "best_under_budget.psnr must be a number or null, got '40 dB'" in v[typo]


# ---- recommend() ------------------------------------------------------------------------------------

@pytest.fixture
def hashed_dit(pixel_dit):
    """The tiny pixel DiT with a weights hash, so ablation runs can be matched to it."""
    return dataclasses.replace(pixel_dit, meta={"weights_sha256": SHA})


def test_a_given_setting_is_used_as_given(hashed_dit, tmp_path):
    write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor")  # ignored: the setting is given
    rec = inhouse.recommend(hashed_dit, {"rho": 0.3, "scorer": "random"}, tmp_path)
    assert rec.source == inhouse.GIVEN and rec.within_budget is None and not rec.considered
    assert rec.cache["rho"] == 0.3 and rec.cache["scorer"] == "random" and rec.cache["kv"] == "all"
    assert rec.variant().name == "recommended: " + rec.name and "random global rho=0.3" in rec.name
    with pytest.raises(ValueError, match=r"unknown TokenCacheConfig key\(s\): 'rhoo' \(did you mean 'rho'\?\)"):
        inhouse.recommend(hashed_dit, {"rhoo": 0.3}, tmp_path)
    for bad in ("Auto", ["auto"], None):
        with pytest.raises(ValueError, match="'auto' or a dict of TokenCacheConfig fields"):
            inhouse.recommend(hashed_dit, bad, tmp_path)


def test_auto_takes_the_ablation_run_and_says_so(hashed_dit, tmp_path):
    write_run(tmp_path, "20260102T000000Z", "03_ablation_block_selection", sha=OTHER_SHA, best=best_point("w", 0.3, 40))
    run = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor", num_steps=4)
    # a newer, better run at another step count (a smoke run, the test suite): neither chosen nor superseding
    quick = write_run(tmp_path, "20260103T000000Z", "02_ablation_predictor", num_steps=10, best=best_point("q", 0.3, 45))
    rec = inhouse.recommend(hashed_dit, "auto", tmp_path, budget=0.5, settings=SweepSettings(**TINY_SETTINGS))
    assert "sampled with 10 steps, this report samples 4" in verdicts(rec.considered)[quick]
    assert (rec.source, rec.origin, rec.name, rec.within_budget) == (inhouse.FROM_ABLATION_RUN, run,
                                                                     "learned-static rho=0.1", True)
    assert run in rec.reason and "highest PSNR (30.00 dB)" in rec.reason
    assert rec.source_metrics["flop_ratio"] == 0.45 and rec.candidates is None
    text = rec.describe()
    assert "path: ablation run" in text and "another model" in text
    assert rec.to_dict()["origin"] == run and json.dumps(rec.to_dict())


def test_auto_falls_back_to_measuring_the_candidates(hashed_dit, tmp_path):
    over = write_run(tmp_path, "20260101T000000Z", "02_ablation_predictor", best=best_point("o", 0.995, 30))
    cands = [{"scorer": "random", "rho": 0.5, "schedule": "round-robin", "interval": 2},
             {"scorer": "prev-change", "rho": 0.25, "schedule": "round-robin", "interval": 2}]
    settings = SweepSettings(**TINY_SETTINGS)
    rec = inhouse.recommend(hashed_dit, "auto", tmp_path, budget=0.99, candidates=cands, settings=settings)
    assert rec.source == inhouse.MEASURED_HERE and rec.origin == inhouse.MEASURED_HERE and rec.within_budget
    assert "none of the 1 ablation run(s)" in rec.reason and "measured here" in rec.reason
    assert "exceeds the budget" in verdicts(rec.considered)[over]
    table = rec.table()
    assert len(table) == 2 and table["chosen"].sum() == 1 and (table["flop_ratio"] < 1).all()
    chosen = table[table["chosen"]].iloc[0]
    assert chosen["name"] == rec.name and chosen["psnr"] == pytest.approx(table["psnr"].max(), abs=1e-3)
    assert rec.cache == inhouse.TokenCacheConfig.from_dict(cands[list(table["name"]).index(rec.name)]).to_dict()

    # a budget nothing meets: the cheapest candidate that ran, flagged as over budget
    rec = inhouse.recommend(hashed_dit, "auto", tmp_path, budget=0.01, candidates=cands, settings=settings)
    assert rec.within_budget is False and "none reached FLOP ratio <= 0.01" in rec.reason
    assert rec.name == rec.table().sort_values("flop_ratio")["name"].iloc[0]
    assert "WARNING" in rec.describe()


def test_fallback_errors_name_the_bad_candidate(hashed_dit, tmp_path):
    settings = SweepSettings(**TINY_SETTINGS)
    with pytest.raises(ValueError, match=r"candidates\[1\].*did you mean 'rho'"):
        inhouse.recommend(hashed_dit, "auto", tmp_path, candidates=[{"rho": 0.5}, {"rhoo": 0.5}], settings=settings)
    with pytest.raises(ValueError, match="non-empty list of dicts"):
        inhouse.recommend(hashed_dit, "auto", tmp_path, candidates={"rho": 0.5}, settings=settings)
    # this 2-block model has no predictor of its own: every candidate fails, one short line each
    with pytest.raises(RuntimeError, match=r"(?s)every candidate failed.*PredictorNotFoundError.*train-predictor") as e:
        inhouse.recommend(hashed_dit, "auto", tmp_path, candidates=[{"scorer": "learned-static"}], settings=settings)
    assert max(len(line) for line in str(e.value).splitlines()) <= 400  # was one 2,000-character line


def test_percentile_settings_are_fitted_to_the_sdedit_steps():
    pct = {**STATIC, "schedule": "percentile", "n_full": 5, "step_importance": [float(i) for i in range(10)]}
    cache, note = inhouse.fit_cache_to_sdedit(pct, num_steps=10, strength=0.6)
    assert cache["step_importance"] == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0] and cache["n_full"] == 3
    assert "last 6 of 10 steps" in note
    assert inhouse.fit_cache_to_sdedit(pct, 10, 1.0) == (inhouse.TokenCacheConfig.from_dict(pct).to_dict(), None)
    assert inhouse.fit_cache_to_sdedit(STATIC, 10, 0.6)[1] is None
    with pytest.raises(ValueError, match="has 10 values but this report samples num_steps=50"):
        inhouse.fit_cache_to_sdedit(pct, 50, 0.6)


# ---- the image set -----------------------------------------------------------------------------------

def write_images(root: Path, classes=("a", "b", "c"), per_class=3, bad=True) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = np.full((16, 16, 3), rng.integers(0, 255, 3), np.uint8)
            a[4:12, 4:12] = rng.integers(0, 255, 3)
            Image.fromarray(a).save(root / c / f"{c}_{i}.png")
    if bad:
        (root / classes[0] / "empty.png").write_bytes(b"")
        (root / classes[1] / "notes.png").write_text("not an image")
    return root


def test_the_image_check_lists_every_bad_file(tmp_path):
    s = load_image_folder(write_images(tmp_path / "set"), 8)
    table = inhouse.bad_images_table(s)
    assert sorted(table["path"]) == ["a/empty.png", "b/notes.png"]
    assert table.set_index("path").loc["a/empty.png", "reason"] == "empty file (0 bytes)"
    text = inhouse.describe_image_set(s)
    assert "9 usable image(s), 2 skipped" in text and s.manifest_hash() in text and "a " in text
    clean = load_image_folder(write_images(tmp_path / "clean", bad=False), 8)
    assert inhouse.bad_images_table(clean).empty and "every file is a usable image" in inhouse.describe_image_set(clean)


def test_class_folders_are_mapped_onto_the_model_classes(pixel_dit, tmp_path):
    s = load_image_folder(write_images(tmp_path / "set", classes=("a", "c")), 8)
    reordered = dataclasses.replace(pixel_dit, class_names=["c", "b", "a"])
    label_map = resolve_labels(s, reordered)
    used = inhouse.select_images(s, reordered, 4, label_map=label_map)
    assert [r.class_name for r in used.records] == ["a", "c", "a", "c"]  # round robin, file order
    assert used.labels.tolist() == [2, 0, 2, 0]
    assert used.manifest_hash() == choose_balanced_images(s, 4).manifest_hash()  # same files, same order
    table = inhouse.class_table(s, used, label_map).set_index("folder")
    assert table.loc["a", "model_class_id"] == 2 and table.loc["c", "used_in_report"] == 2
    assert table.loc["a", "usable_in_folder"] == 3 and table.loc["a", "how"] == "name"  # its empty file was skipped

    unnamed = dataclasses.replace(pixel_dit, class_names=None)
    digits = load_image_folder(write_images(tmp_path / "digits", classes=("0", "7"), bad=False), 8)
    assert resolve_labels(digits, unnamed).labels_for(digits).tolist() == [0, 0, 0, 7, 7, 7]
    # named folders and a model without names: sampled unconditionally, with the reason
    names_only = resolve_labels(s, unnamed)
    assert not names_only.conditional and set(names_only.labels_for(s).tolist()) == {NULL_CLASS}
    assert "no class names" in names_only.rows[0].note


def test_image_folders_that_do_not_fit_the_model_are_sampled_unconditionally(pixel_dit, tmp_path):
    s = load_image_folder(write_images(tmp_path / "set", classes=("a", "bb", "zebra")), 8)
    used = inhouse.select_images(s, pixel_dit, 3)
    assert used.labels.tolist() == [0, NULL_CLASS, NULL_CLASS]  # a is class 0; bb and zebra match nothing
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(flat / "x.png")
    assert inhouse.select_images(load_image_folder(flat, 8), pixel_dit, 3).labels.tolist() == [NULL_CLASS]
    ok = load_image_folder(write_images(tmp_path / "ok"), 8)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_images must be an integer >= 1"):
            inhouse.select_images(ok, pixel_dit, bad)


def test_describe_redundancy_names_the_sdedit_record():
    fake = {"primary_measure": "out_change", "record": {"samples": 3, "steps": 4},
            "observations": {"out_change": {k: {"verdict": "v"} for k in
                                            ("few_tokens_change_a_lot", "adjacent_steps_correlated",
                                             "uneven_over_trajectory")}}}
    text = inhouse.describe_redundancy(fake)
    assert text.startswith("== SDEdit of the in-house images (3 samples, 4 steps) ==") and "pure samples" not in text


# ---- measurement, worst cases, summary ------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured_report(tmp_path_factory):
    """One measurement of a given setting on 6 tiny in-house images (the tiny DiT of conftest)."""
    from tests.conftest import tiny_transformer
    from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config

    model = LoadedDiT(name="tiny-pixel", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                      scheduler_config=default_scheduler_config(), trained=False, source="test",
                      class_names=["a", "b", "c"], meta={"weights_sha256": SHA})
    image_set = load_image_folder(write_images(tmp_path_factory.mktemp("imgs") / "set"), 8)
    used = inhouse.select_images(image_set, model, 6)
    # 8 steps (SDEdit runs 5): with fewer, this random model's cached and full outputs coincide
    settings = SweepSettings(**{**TINY_SETTINGS, "num_steps": 8, "quality_samples": 6, "timing_batch": 2})
    rec = inhouse.recommend(model, {"rho": 0.25, "scorer": "random", "schedule": "round-robin", "interval": 2},
                            tmp_path_factory.mktemp("reports"), settings=settings)
    measured = inhouse.measure_on_images(model, rec, settings, used, extractor=ClassifierFeatures(),
                                         reference_images=image_set.images)
    return model, image_set, used, rec, measured


def test_measurement_pairs_full_compute_and_the_recommendation(measured_report):
    _, image_set, used, rec, measured = measured_report
    frame = measured.result.frame
    assert frame["name"].tolist() == [FULL_COMPUTE, rec.variant_name] and (frame["error"] == "").all()
    assert measured.cached_images.shape == measured.full_images.shape == measured.inputs.shape == (6, 3, 8, 8)
    row = measured.row()
    assert 0 < row["flop_ratio"] < 1 and row["time_ratio"] > 0 and row["psnr"] < 100
    assert row["fid_comparable"] is False and "NOT comparable to published FID" in row["fid_extractor"]
    table = measured.table()
    assert table.loc["FLOP ratio (/ full compute)", "recommended"] == pytest.approx(row["flop_ratio"], abs=1e-3)
    assert any("NOT comparable to published FID" in i for i in table.index)
    # 6 images against 9 in 128-d features: below the FID floor (129 per set), so no FID, but KID and its std
    refused = "not computed: 6 images and 9 reference images, needs at least 129"
    assert np.isnan(row["fid"]) and row["fid_reason"].startswith(refused) and row["fid_n"] == 6
    fid_row = [i for i in table.index if i.startswith("FID")]
    assert len(fid_row) == 1 and "N = 6 vs 9 reference" in fid_row[0] and fid_row[0].endswith(refused)
    assert table.loc[fid_row[0], [FULL_COMPUTE, "recommended"]].isna().all()
    assert (table.loc[fid_row[0], [f"{FULL_COMPUTE} CI", "recommended CI"]] == "").all()   # no FID, no interval
    assert (table.loc["KID std over subsets", [FULL_COMPUTE, "recommended"]] >= 0).all()
    # every measured figure has its interval beside it, and it holds the figure
    lo, hi = json.loads(table.loc["PSNR vs full compute (dB)", "recommended CI"])
    assert lo <= row["psnr"] <= hi and lo < hi
    floor = [i for i in table.index if i.startswith("timing noise floor")]
    assert len(floor) == 1 and table.loc[floor[0], f"{FULL_COMPUTE} CI"].startswith("[")
    text = measured.describe()
    assert "the last 5 of 8 ddim steps" in text and "NOT comparable to published FID" in text
    assert f"FID {refused}" in text and "N = 6 image(s) per setting against 9 reference" in text


def test_worst_images_are_the_lowest_psnr_with_their_files(measured_report):
    _, image_set, used, _, measured = measured_report
    per = measured.per_image()
    assert len(per) == 6 and per["path"].tolist() == [r.path for r in used.records]
    worst = measured.worst(2)
    assert worst["rank"].tolist() == [1, 2] and worst["psnr"].tolist() == sorted(per["psnr"])[:2]
    assert all(Path(f).is_file() for f in worst["file"]) and all(Path(f).is_absolute() for f in worst["file"])
    assert f"PSNR {worst['psnr'][0]:.1f} dB" in worst["title"][0]
    assert len(measured.worst(50)) == 6
    inp, full, cached = measured.images_of(worst["index"])
    i = int(worst["index"][0])
    assert torch.equal(inp[0], used.images[i]) and torch.equal(cached[0], measured.cached_images[i])
    with pytest.raises(ValueError, match="worst_k must be an integer >= 1"):
        measured.worst(0)


def test_summary_headline_is_flat_and_identity_pins_the_inputs(measured_report):
    model, image_set, used, rec, measured = measured_report
    worst = measured.worst(2)
    redundancy = {"headline": {"frac_tokens_below_5pct": 0.2, "adjacent_rank_corr": 0.7, "obs1_holds": True,
                               "obs2_holds": True, "obs3_holds": None}}
    label_map = resolve_labels(image_set, model)
    s = inhouse.summarise_report(model, image_set, used, redundancy, rec, measured, worst, label_map)
    head = s["headline"]
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in head.values())
    assert (head["usable_images"], head["bad_images"], head["images_used"]) == (9, 2, 6)
    assert head["recommendation_source"] == "given" and head["recommendation"] == rec.name
    assert head["flop_speedup"] == pytest.approx(1 / head["flop_ratio"])
    assert head["worst_psnr"] == pytest.approx(worst["psnr"][0]) and head["worst_psnr"] <= head["psnr"]
    assert head["class_consistency_full"] is None  # no classifier: not measured, and None rather than NaN
    # below the FID floor: None plus the reason, never a number; KID with its spread over subsets
    assert head["fid_full"] is None and head["fid_cached"] is None and head["fid_comparable_to_published"] is False
    assert head["fid_reason"] == "not computed: 6 images and 9 reference images, needs at least 129"
    assert (head["fid_n"], head["fid_n_reference"]) == (6, 9)
    assert head["kid_std_full"] >= 0 and head["kid_std_cached"] >= 0 and math.isfinite(head["kid_cached"])
    m = s["details"]["measurement"]
    assert m["fid_min_images"] == 129 and "feature dimension + 1" in m["fid_floor_rule"]
    assert m["fid_reason"].startswith(head["fid_reason"]) and m["kid_subset_size"] == 6
    assert s["identity"] == {"model": "tiny-pixel", "model_weights_sha256": SHA,
                             "images_manifest_sha256": image_set.manifest_hash(),
                             "images_used_manifest_sha256": used.manifest_hash(), "images_used": 6,
                             "labels_sha256": label_map.sha256()}
    assert head["mapped_folders"] == 3 and [r["class_id"] for r in s["labels"]["rows"]] == [0, 1, 2]
    assert {b["path"] for b in s["details"]["image_check"]["bad_files"]} == {"a/empty.png", "b/notes.png"}
    assert "NOT comparable" in s["details"]["measurement"]["fid_note"]
    text = json.dumps(s, allow_nan=False)  # strict JSON: no NaN anywhere
    assert math.isfinite(json.loads(text)["headline"]["psnr"])


def test_plot_paired_images(measured_report):
    import matplotlib.pyplot as plt

    from tclab import plots

    _, _, _, _, m = measured_report
    fig = plots.plot_paired_images(m.inputs, m.full_images, m.cached_images, column_titles=list("abcdef"), max_images=4)
    assert len(fig.axes) == 4 * 4 + 1 and fig.axes[0].get_title() == "a"
    plt.close(fig)
    with pytest.raises(ValueError, match="same non-zero number of images"):
        plots.plot_paired_images(m.inputs[:2], m.full_images[:3], m.cached_images[:3])
    with pytest.raises(ValueError, match="one per image"):
        plots.plot_paired_images(m.inputs, m.full_images, m.cached_images, column_titles=["x"])


def test_feature_extractor_is_labelled_and_never_downloads(tmp_path):
    ext = inhouse.feature_extractor()
    assert isinstance(ext, ClassifierFeatures) and "NOT comparable to published FID" in ext.name
    with pytest.raises(FileNotFoundError, match="inception_weights .*missing.pth' not found: nothing at "):
        inhouse.feature_extractor(tmp_path / "missing.pth")
