"""The artefact store and what a run on a team's model prepares: predictors and classifiers found by identity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from tclab import artefacts, prepare
from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
from tclab.cache.hooks import get_token_cache_state
from tclab.cache.predictor import PredictorMismatchError, PredictorNotFoundError, default_predictor_path
from tclab.cache.train import PredictorTrainConfig, train_predictor
from tclab.cli import main
from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.sampling import SampleConfig, sample
from tests.conftest import tiny_transformer


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(artefacts.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def tiny(seed=0, names=("a", "b", "c")):
    return LoadedDiT(name=f"tiny-{seed}", transformer=tiny_transformer(3, 3, seed=seed), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=True, source=f"test seed {seed}",
                     class_names=list(names))


def quick(kind="learned-static", **kw):
    return PredictorTrainConfig(kind=kind, num_steps=3, num_samples=1, steps=2, batch_size=2, max_gap=1,
                                eval_pairs=2, guidance_scale=1.0, **kw)


def test_home_is_the_users_cache_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv(artefacts.HOME_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert artefacts.tclab_home() == tmp_path / "xdg" / "tclab"
    monkeypatch.setenv(artefacts.HOME_ENV, str(tmp_path / "mine"))
    assert artefacts.tclab_home() == tmp_path / "mine"


def test_a_trained_predictor_is_found_again_by_the_weights_alone(home):
    model = tiny()
    path = train_predictor(model, quick(), progress=False)
    assert path == home / "models" / artefacts.model_key(model.transformer) / "predictor-static.safetensors"
    assert (path.parent / "model.json").is_file()
    # the same weights in another module object (as after loading them again) find it with no path given
    again = tiny()
    assert again.transformer is not model.transformer
    apply_token_cache(again.transformer, TokenCacheConfig(scorer="learned-static", schedule="round-robin", interval=2))
    try:
        sample(again, [0], SampleConfig(num_steps=3, guidance_scale=1.0), progress=False)
        assert get_token_cache_state(again.transformer).scorer.meta["model"]["name"] == "tiny-0"
    finally:
        remove_token_cache(again.transformer)
    # other weights never do: refused when the cache is applied, saying how to make theirs
    other = tiny(seed=1)
    with pytest.raises(PredictorNotFoundError, match=f"weights {artefacts.model_key(other.transformer)}.*train-predictor"):
        apply_token_cache(other.transformer, TokenCacheConfig(scorer="learned-static"))
    assert get_token_cache_state(other.transformer) is None
    # and a file of the first model, pointed at explicitly, is refused naming both
    with pytest.raises(PredictorMismatchError, match="tiny-0"):
        apply_token_cache(other.transformer, TokenCacheConfig(scorer="learned-static",
                                                              scorer_options={"path": str(path)}))


def test_the_embedded_model_finds_its_shipped_predictors(home):
    from tclab.models import load_dit

    tr = load_dit("shapes-dit").transformer
    for kind in ("learned-static", "learned-dynamic"):
        assert artefacts.find_predictor(tr, kind) == default_predictor_path(kind)
    assert not home.exists()  # nothing was written for it


def test_ensure_predictors_trains_what_is_missing_once(home, capsys):
    model = tiny()
    with pytest.raises(PredictorNotFoundError, match="train_missing=True"):
        prepare.ensure_predictors(model, ["learned-static"], train_missing=False)
    got = prepare.ensure_predictors(model, ["learned-static", "learned-dynamic"], num_steps=3, smoke_steps=2,
                                    guidance_scale=1.0, progress=False)
    out = capsys.readouterr().out
    assert out.count("training a smoke-sized one") == 2 and "vs" in out and "random ones" in out
    assert set(got) == {"learned-static", "learned-dynamic"} and all(p.is_file() for p in got.values())
    mtime = got["learned-static"].stat().st_mtime_ns
    again = prepare.ensure_predictors(model, ["learned-static"], num_steps=3, progress=False)
    assert again["learned-static"] == got["learned-static"] and got["learned-static"].stat().st_mtime_ns == mtime
    assert "training" not in capsys.readouterr().out
    # the paths go into exactly the learned points of a sweep
    from tclab.ablation import predictor_variants

    variants = prepare.with_predictor_paths(predictor_variants(["learned-static", "random"], [0.5]), got)
    assert variants[0].cache["scorer_options"] == {"path": str(got["learned-static"])}
    assert "scorer_options" not in variants[1].cache or not variants[1].cache["scorer_options"]
    # a given file of another model is refused before anything runs
    with pytest.raises(PredictorMismatchError):
        prepare.ensure_predictors(tiny(seed=1), ["learned-static"], predictor=str(got["learned-static"]))
    # listed by `tclab artefacts`
    frame = artefacts.list_artefacts()
    assert sorted(frame["kind"]) == ["learned-dynamic", "learned-static"] and set(frame["belongs_to"]) == {"tiny-0"}
    assert main(["artefacts"]) == 0
    listing = capsys.readouterr().out
    assert str(home) in listing and "blended-output rel. MSE" in listing


def write_folder(root, classes, per_class=6):
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = np.zeros((16, 16, 3), np.uint8)
            a[..., k % 3] = 200  # one colour per class: learnable
            Image.fromarray(np.clip(a + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_classifier_is_trained_on_mapped_folders_kept_and_found_again(home, tmp_path, capsys):
    model = tiny(names=("tench", "Goldfish, Carassius auratus", "shark"))
    root = write_folder(tmp_path / "set", ["goldfish", "Shark", "unknown things"])
    prepared = prepare.load_images(str(root), model)
    assert prepared.label_map.class_ids == [1, 2]
    assert prepare.classifier_for(model, None, prepared.image_set, prepared.label_map, train_missing=False) is None
    assert "set train_missing=True" in capsys.readouterr().out
    clf = prepare.classifier_for(model, None, prepared.image_set, prepared.label_map, train_missing=True,
                                 progress=False)
    assert clf.model_class_ids == [1, 2] and clf.class_names == ["Goldfish, Carassius auratus", "shark"]
    assert clf.val_accuracy is not None and clf.info["held_out"] == 2  # every 5th image of each class
    stored = artefacts.classifier_path(prepared.image_set, prepared.label_map, model.resolution)
    assert stored.is_file()
    capsys.readouterr()
    again = prepare.classifier_for(model, None, prepared.image_set, prepared.label_map, train_missing=True)
    assert "this image set and label mapping" in capsys.readouterr().out
    assert torch.equal(again.predict_ids(prepared.image_set.images), clf.predict_ids(prepared.image_set.images))
    # another mapping of the same folder is another classifier
    other = prepare.load_images(str(root), model, labels={"goldfish": 0})
    assert artefacts.classifier_path(other.image_set, other.label_map, model.resolution) != stored
    # nothing mapped: not measured, and why
    none = prepare.load_images(str(root), model, labels="unconditional")
    assert prepare.classifier_for(model, None, none.image_set, none.label_map, train_missing=True) is None
    assert "no image folder maps to the model's classes" in capsys.readouterr().out
    assert "classifier" in set(artefacts.list_artefacts()["kind"])


def test_train_classifier_cli_with_a_model_writes_to_the_store(home, tmp_path, monkeypatch, capsys):
    from tests.standins import write_transformer_folder

    write_transformer_folder(tmp_path / "dit", sample_size=8)
    root = write_folder(tmp_path / "set", ["3", "7"])
    monkeypatch.chdir(tmp_path)
    assert main(["train-classifier", "--images", "set", "--model", "dit", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "mapped classes [3, 7]" in out and str(home / "classifiers") in out
    assert root.is_dir()
    assert main(["train-classifier", "--images", "set"]) == 2  # without --model it needs --out
