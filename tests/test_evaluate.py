"""tclab evaluate: class-consistency of generated samples, and the SDEdit diagnosis from real images."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tclab import runs
from tclab.cli import main
from tclab.evaluate import evaluate_class_consistency, evaluate_sdedit_consistency
from tclab.sampling import SampleConfig


def test_class_consistency_writes_one_complete_folder(tmp_path):
    res = evaluate_class_consistency("shapes-dit", SampleConfig(num_steps=2, batch_size=12), 12, tmp_path)
    assert 0.0 <= res["class_consistency"] <= 1.0 and res["n"] == 12
    assert set(res["per_class"]) == {"cross", "disc", "ring", "square", "star", "triangle"}
    (folder,) = (p for p in tmp_path.iterdir() if p.is_dir())   # beside it: index.html and the run table
    assert folder.name.endswith("_evaluate_shapes-dit") and str(folder) == res["out"]
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "params.yaml", "provenance.json", "result.json",
                                                        "summary.json"]
    assert json.loads((folder / "result.json").read_text())["class_consistency"] == res["class_consistency"]
    # self-describing like a notebook's run: provenance, and a row in the run table and on the index
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["command"] == "evaluate" and prov["parameters"]["num_samples"] == 12
    assert prov["identity"]["model_weights_sha256"] and prov["duration_s"] > 0
    (row,) = runs.rows(tmp_path)
    assert row["notebook"] == "evaluate" and row["kind"] == "command" and row["model"] == "shapes-dit"
    assert row["headline"]["class_consistency"] == res["class_consistency"]
    assert folder.name in (tmp_path / "index.html").read_text()


def test_sdedit_of_barely_noised_real_images_keeps_their_class(tmp_path):
    # strength 0.04 of 50 steps: 2 denoising steps from sigma ~0.14, so the classes must survive
    res = evaluate_sdedit_consistency("shapes-dit", "data/shapes", SampleConfig(num_steps=50), tmp_path,
                                      strengths=[0.04], per_class=2)
    assert res["n"] == 12 and res["real_images"] == 1.0
    assert res["rows"][0]["strength"] == 0.04 and res["rows"][0]["class_consistency"] >= 11 / 12
    folder = tmp_path / res["out"].split("/")[-1]
    assert (folder / "sdedit_consistency.png").stat().st_size > 0 and (folder / "result.json").exists()
    # the grid: 2 real images per class (12 columns), then one row per strength; 32 px + 2 px padding, x3
    with Image.open(folder / "sdedit_grid.png") as grid:
        assert grid.size == ((12 * 34 + 2) * 3, (2 * 34 + 2) * 3)


def test_sdedit_refuses_a_folder_of_other_classes_and_writes_nothing(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "imgs" / cls / "a.png")
    with pytest.raises(ValueError, match=r"no folder of .*imgs maps to a class of shapes-dit"):
        evaluate_sdedit_consistency("shapes-dit", tmp_path / "imgs", SampleConfig(), tmp_path / "out")
    with pytest.raises(ValueError, match="strengths"):
        evaluate_sdedit_consistency("shapes-dit", "data/shapes", SampleConfig(), tmp_path / "out", strengths=[1.5])
    assert not (tmp_path / "out").exists()


def test_sdedit_of_a_teams_folders_maps_them_and_trains_their_classifier(tmp_path, capsys):
    for cls in ("Discs", "RINGS", "misc"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
    for i, f in enumerate(sorted((Path("data/shapes/disc")).iterdir())[:5]):
        shutil.copy(f, tmp_path / "imgs" / "Discs" / f"{i}.png")
    for i, f in enumerate(sorted((Path("data/shapes/ring")).iterdir())[:5]):
        shutil.copy(f, tmp_path / "imgs" / "RINGS" / f"{i}.png")
        shutil.copy(f, tmp_path / "imgs" / "misc" / f"{i}.png")
    labels = tmp_path / "map.yaml"
    labels.write_text("Discs: disc\nRINGS: ring\n")
    result = evaluate_sdedit_consistency("shapes-dit", tmp_path / "imgs", SampleConfig(num_steps=4), tmp_path / "out",
                                         strengths=[0.5], per_class=5, labels=str(labels))
    assert result["n"] == 10  # misc is not mapped: left out
    assert set(result["rows"][0]["per_class"]) == {"disc", "ring"}
    assert result["labels"]["class_ids"] == [1, 2]


def test_cli_sdedit_prints_a_row_per_strength(tmp_path, capsys):
    assert main(["evaluate", "--sdedit-from", "data/shapes", "--strengths", "0.04,0.08", "--per-class", "1",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "strength 0.04: class-consistency" in text and "strength 0.08: class-consistency" in text
    with pytest.raises(SystemExit):
        main(["evaluate", "--sdedit-from", "data/shapes", "--strengths", "0,1"])
    assert "every strength must be in (0, 1]" in capsys.readouterr().err
