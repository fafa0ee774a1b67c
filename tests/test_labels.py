"""The one label rule (tclab.labels): team folders onto a model's classes, by name, alias, id or mapping."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tclab.classifier import ShapesClassifier, SmallCNN, class_consistency
from tclab.data import load_image_folder
from tclab.labels import LabelSpecError, normalise, resolve_labels
from tclab.models import NULL_CLASS

IMAGENET_LIKE = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark", "crane", "crane",
                 "Red_Fox, Vulpes vulpes"]


def folder(root, classes, per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return load_image_folder(root, 8)


def model_with(pixel_dit, names):
    return dataclasses.replace(pixel_dit, class_names=names)


def rows(label_map):
    return {r.folder: (r.class_id, r.how) for r in label_map.rows}


def test_normalise_ignores_case_spaces_underscores_hyphens():
    assert normalise("Red_Fox") == normalise(" red  fox ") == normalise("RED-fox") == "red fox"


def test_auto_matches_names_aliases_ids_and_leaves_the_rest_unconditional(pixel_dit, tmp_path):
    s = folder(tmp_path / "set", ["Goldfish", "red fox", "Great_White-Shark", "4", "1234", "crane", "zebra"])
    m = resolve_labels(s, model_with(pixel_dit, IMAGENET_LIKE))
    got = rows(m)
    assert got["Goldfish"] == (1, "alias")               # "goldfish, Carassius auratus": an alias, any case
    assert got["red fox"] == (5, "alias")                # underscores in the model's name do not matter
    assert got["Great_White-Shark"] == (2, "name")       # the whole name, other separators
    assert got["4"] == (4, "class id")                   # integer folder names are class ids
    assert got["1234"] == (None, "unconditional")        # ... below the model's class count only
    assert got["crane"] == (None, "unconditional")       # two classes are called crane: ambiguous, not guessed
    assert "ambiguous" in m.rows[[r.folder for r in m.rows].index("crane")].note
    assert got["zebra"] == (None, "unconditional")
    assert m.class_ids == [1, 2, 4, 5] and m.conditional and m.sample_classes == [1, 2, 4, 5]
    labels = m.labels_for(s)
    assert labels.tolist().count(NULL_CLASS) == 6  # three unmatched folders x 2 images
    table = m.table()
    assert table.index.name == "folder" and list(table.columns) == ["images", "class_id", "class_name", "how", "note"]
    assert table.loc["Goldfish", "class_name"] == "goldfish, Carassius auratus" and table.loc["Goldfish", "class_id"] == 1
    assert all(len(n) <= 50 for n in table["note"])  # fits a report's table cell uncut
    assert "to condition a folder on a class" in m.describe()
    json.dumps(m.to_dict())  # plain values for summary.json


def test_a_folder_set_the_model_cannot_match_is_sampled_unconditionally(pixel_dit, tmp_path):
    s = folder(tmp_path / "set", ["cats", "dogs"])
    for model in (pixel_dit, model_with(pixel_dit, None)):
        m = resolve_labels(s, model)
        assert not m.conditional and m.sample_classes is None
        assert set(m.labels_for(s).tolist()) == {NULL_CLASS}
        assert "class-consistency is not measured" in m.describe()
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(flat / "a.png")
    m = resolve_labels(load_image_folder(flat, 8), pixel_dit)
    assert [r.folder for r in m.rows] == [None] and m.labels_for(load_image_folder(flat, 8)).tolist() == [NULL_CLASS]


def test_unconditional_and_mappings_inline_and_in_files(pixel_dit, tmp_path):
    s = folder(tmp_path / "set", ["Our Cats", "our_dogs", "misc"])
    model = model_with(pixel_dit, IMAGENET_LIKE)
    assert not resolve_labels(s, model, "unconditional").conditional
    inline = resolve_labels(s, model, {"Our Cats": "goldfish", "our_dogs": 3})
    assert rows(inline) == {"Our Cats": (1, "mapping"), "our_dogs": (3, "mapping"), "misc": (None, "unconditional")}
    (tmp_path / "m.yaml").write_text("Our Cats: goldfish\nour_dogs: 3\n")
    (tmp_path / "m.json").write_text(json.dumps({"Our Cats": "goldfish", "our_dogs": 3}))
    (tmp_path / "m.csv").write_text("folder,class\nOur Cats,goldfish\nour_dogs,3\n")
    for f in ("m.yaml", "m.json", "m.csv"):
        m = resolve_labels(s, model, str(tmp_path / f))
        assert rows(m) == rows(inline) and m.spec == f"file {tmp_path / f}"
        assert m.sha256() == inline.sha256()  # the same mapping, whatever the file type


@pytest.mark.parametrize("spec, match", [
    ({"Our Cat": 1}, r"names folder\(s\) 'Our Cat' \(did you mean 'Our Cats'\?\)"),
    ({"Our Cats": "goldfsh"}, r"'goldfsh', which is not a class of the model; close matches: \['goldfish, Carassius"),
    ({"Our Cats": 6}, r"class id 6, but the model's class ids are 0\.\.5"),
    ({"Our Cats": "crane"}, r"matches classes \[3, 4\]; give the class id"),
    ({"Our Cats": True}, "give a class id or a class name"),
    (3.5, "labels must be 'auto', 'unconditional', a mapping"),
    ("no-such-mapping.yaml", r"labels mapping file 'no-such-mapping.yaml' not found: looked at "),
    ("binary.yaml", r"is not UTF-8 text \(is it an image\?\)"),
    (".", r"is a folder"),
])
def test_bad_mappings_are_refused_naming_the_entry_and_the_fix(pixel_dit, tmp_path, spec, match):
    s = folder(tmp_path / "set", ["Our Cats"])
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    if isinstance(spec, str) and not spec.startswith("no-such"):
        spec = str(tmp_path / spec)
    with pytest.raises((LabelSpecError, FileNotFoundError), match=match):
        resolve_labels(s, model_with(pixel_dit, IMAGENET_LIKE), spec)


def test_class_consistency_counts_only_the_classes_the_classifier_knows():
    torch.manual_seed(0)
    clf = ShapesClassifier(SmallCNN(2, width=4).eval(), ["goldfish", "fox"], class_ids=[1, 5])
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    pred = clf.predict_ids(images)
    assert set(pred.tolist()) <= {1, 5}
    labels = torch.tensor([pred[0].item(), pred[1].item(), NULL_CLASS, NULL_CLASS, 3, pred[5].item()])
    cc = class_consistency(clf, images, labels)
    assert cc["n"] == 3 and cc["n_unknown"] == 3 and cc["accuracy"] == 1.0  # unmapped and unknown left out
    assert class_consistency(clf, images, torch.full((6,), NULL_CLASS))["accuracy"] is None


def test_yaml_mapping_keys_stay_folder_names(pixel_dit, tmp_path):
    s = folder(tmp_path / "set", ["007", "no"])
    (tmp_path / "m.yaml").write_text("007: 4\nno: 3\n")  # YAML 1.1 would read these keys as 7 and False
    m = resolve_labels(s, model_with(pixel_dit, IMAGENET_LIKE), str(tmp_path / "m.yaml"))
    assert rows(m) == {"007": (4, "mapping"), "no": (3, "mapping")}



def test_a_mapping_naming_a_missing_folder_is_refused_before_any_kernel(tmp_path, capsys):
    """`tclab run` refuses a labels mapping whose folder the images lack with exit 2 and a did-you-mean,
    before a run folder or a kernel exists (it used to fail inside the kernel, leaving a FAILED run)."""
    from tclab import cli

    images = tmp_path / "set"
    folder(images, ["Golden Retriever", "cats"])
    reports = tmp_path / "reports"
    rc = cli.main(["run", "01", "-p", "images", str(images), "-p", "labels", '{"Golden Retrievr": 207}',
                   "--reports", str(reports)])
    err = capsys.readouterr().err
    assert rc == 2 and "'Golden Retrievr' (did you mean 'Golden Retriever'?)" in err
    assert not reports.exists() or not any(p for p in reports.iterdir() if p.name != "index.html")
