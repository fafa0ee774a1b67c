"""What a run on a team's model needs before it measures anything: images, labels, predictors, a classifier.

Every notebook and command that takes a model and an image folder goes through here, so the rules
are the same everywhere:

- :func:`load_images`: the image folder as the user typed it (``tclab.paths``), validated
  (``tclab.data``), with its label map onto the model's classes (``tclab.labels``), printed;
  :func:`select_images`: a class-balanced subset of it, labelled with the model's classes;
- :func:`ensure_predictors`: the Cache Predictor of *this* model's weights for each learned scorer,
  found in the artefact store (``tclab.artefacts``) or, with ``train_missing``, trained now at a
  smoke size (with a progress bar) and kept there, so the first run on a new model just works;
- :func:`classifier_for`: the class-consistency classifier of these images and labels (shipped, a
  given file, the store's, or trained now), or None with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

LEARNED = ("learned-static", "learned-dynamic")
#: Scorers that mix in a learned predictor: scorer -> the predictor kind it reads (``scorer_options["path"]``).
USES_PREDICTOR = {"learned-static": "learned-static", "learned-dynamic": "learned-dynamic",
                  "staleness-learned": "learned-static"}
AUTO = "auto"


@dataclass
class PreparedImages:
    """An image folder checked at the model's resolution, and how its folders map onto the model."""

    image_set: Any  # tclab.data.ImageSet (labels = folder index, as loaded)
    label_map: Any  # tclab.labels.LabelMap

    @property
    def labels(self) -> torch.Tensor:
        """(N,) model labels of every image (class id or the null class)."""
        return self.label_map.labels_for(self.image_set)

    def balanced(self, count: int):
        """A class-balanced subset of ``count`` images (round robin over the folders) whose ``labels`` are
        the model's: what is sampled (:func:`select_images`)."""
        return select_images(self.image_set, None, count, label_map=self.label_map)

    def summary(self) -> dict:
        return {**self.image_set.summary(), "labels": self.label_map.to_dict()}


def load_images(images: str | Path, model, labels: Any = "auto", limit: int | None = None,
                progress: bool = False) -> PreparedImages:
    """Load ``images`` (a path as the user typed it, or ``"shapes"``) at ``model.resolution`` and map its
    folders onto the model's classes (:func:`tclab.labels.resolve_labels`); prints the per-folder table."""
    from .data import load_image_folder
    from .labels import resolve_labels
    from .paths import resolve_images

    image_set = load_image_folder(resolve_images(images), model.resolution, limit=limit, progress=progress)
    label_map = resolve_labels(image_set, model, labels)
    print(label_map.describe())
    return PreparedImages(image_set, label_map)


def select_images(image_set, model, count: int, labels: Any = "auto", label_map=None):
    """A class-balanced subset of ``count`` images (round robin over the folders, file order within a
    folder: :func:`tclab.analysis.choose_balanced_images`), as a new ImageSet whose ``labels`` are the
    model's (class id, or the null class for a folder sampled unconditionally: :mod:`tclab.labels`,
    ``labels`` or a ready ``label_map``) and whose ``manifest_hash()`` names exactly the images used."""
    import dataclasses

    from .analysis import choose_balanced_images
    from .labels import resolve_labels

    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"num_images must be an integer >= 1 (images to run through the model), got {count!r}")
    label_map = label_map if label_map is not None else resolve_labels(image_set, model, labels)
    subset = choose_balanced_images(image_set, count)
    return dataclasses.replace(subset, labels=label_map.labels_for(subset))


# ---- Cache Predictors ------------------------------------------------------------------------------------

def learned_kinds(scorers: Sequence[Any]) -> list[str]:
    """The learned predictor kinds ``scorers`` (names, or TokenCacheConfig dicts) read, in order
    (:data:`USES_PREDICTOR`: ``staleness-learned`` reads ``learned-static``)."""
    out = []
    for s in scorers:
        name = USES_PREDICTOR.get(s.get("scorer") if isinstance(s, Mapping) else s)
        if name is not None and name not in out:
            out.append(name)
    return out


def ensure_predictors(model, kinds: Sequence[str], predictor: Any = AUTO, train_missing: bool = True,
                      num_steps: int = 50, scheduler: str = "ddim", guidance_scale: float = 4.0,
                      images: str | None = None, labels: Any = "auto", smoke_steps: int = 120,
                      progress: bool = True) -> dict[str, Path]:
    """The predictor file of each learned ``kind`` for ``model``: ``{kind: path}``.

    ``predictor``: ``"auto"`` (this model's, shipped or in the artefact store), the path of one file
    (used for the kind it holds), or ``{kind: path}``. A missing one is trained now when
    ``train_missing`` (a smoke-sized run, ``smoke_steps`` optimiser steps on trajectories of
    ``num_steps`` steps, plus SDEdit traces of ``images``), else
    :class:`tclab.cache.predictor.PredictorNotFoundError` says how to make it. Every file is loaded
    against the model here, so a predictor of other weights is refused before any sweep starts.
    """
    from .artefacts import find_predictor, predictor_path
    from .cache.predictor import find_predictor_for, load_predictor, read_predictor_meta
    from .paths import resolve_path

    given: dict[str, Path] = {}
    if isinstance(predictor, Mapping):
        bad = sorted(set(predictor) - set(LEARNED))
        if bad:
            raise ValueError(f"predictor: keys {bad} are not predictor kinds; use {list(LEARNED)}")
        given = {k: resolve_path(v, what=f"{k} predictor file") for k, v in predictor.items()}
    elif predictor not in (None, AUTO):
        path = resolve_path(predictor, what="predictor file")
        try:
            given = {read_predictor_meta(path)["kind"]: path}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for non-files
            raise ValueError(f"predictor {str(predictor)!r} ({path}) is not a tclab predictor file: {e}") from None
    out: dict[str, Path] = {}
    for kind in kinds:
        found = given.get(kind) or find_predictor(model.transformer, kind)
        if found is not None:
            path = found
        elif train_missing:
            path = train_smoke_predictor(model, kind, num_steps=num_steps, scheduler=scheduler,
                                         guidance_scale=guidance_scale, images=images, labels=labels,
                                         steps=smoke_steps, progress=progress)
        else:
            find_predictor_for(model.transformer, kind)  # raises PredictorNotFoundError with the fix
            path = predictor_path(model.transformer, kind)
        load_predictor(path, model.transformer, kind=kind)  # refuses other weights / another shape now
        out[kind] = Path(path)
        print(f"{kind} predictor: {path}")
    return out


def train_smoke_predictor(model, kind: str, num_steps: int, scheduler: str = "ddim", guidance_scale: float = 4.0,
                          images: str | None = None, labels: Any = "auto", steps: int = 120,
                          progress: bool = True) -> Path:
    """Train a small ``kind`` predictor for ``model`` into the artefact store (``tclab train-predictor``
    with smoke settings) and return its file; prints its check against random masks."""
    from .cache.train import PredictorTrainConfig, train_predictor

    gap = max(1, min(3, num_steps - 1))
    cfg = PredictorTrainConfig(kind=kind, num_steps=max(2, num_steps), scheduler=scheduler,
                               guidance_scale=guidance_scale, num_samples=4, images=images, labels=labels,
                               num_images=4, steps=steps, batch_size=4, max_gap=gap, eval_pairs=8)
    print(f"no {kind} predictor for this model yet: training a smoke-sized one ({steps} optimiser steps on "
          f"{num_steps}-step trajectories); `tclab train-predictor --model ... --kind {kind}` trains a full one")
    path = train_predictor(model, cfg, progress=progress)
    print(describe_predictor(path))
    return path


def describe_predictor(path: str | Path) -> str:
    """One line: the file, the model it belongs to, and its check against random masks at equal budget."""
    from .cache.predictor import read_predictor_meta

    meta = read_predictor_meta(path)
    m, ev = meta.get("model", {}), (meta.get("train") or {}).get("evaluation")
    check = (f"blended-output relative MSE {ev['rel_mse_predictor']:.3f} with its top-{ev['rho']:g} tokens vs "
             f"{ev['rel_mse_random']:.3f} with random ones at the same budget ({ev['pairs']} step pairs; lower "
             "is better)" if ev else "no check run (eval_pairs=0)")
    return (f"{meta['kind']} predictor of {m.get('name', '?')} (weights {str(m.get('weights_fingerprint'))[:16]}): "
            f"{path}\n  check: {check}")


def with_predictor_paths(variants: Sequence[Any], paths: Mapping[str, Path]) -> list:
    """``variants`` (``tclab.ablation.Variant`` s, or dicts of TokenCacheConfig fields) with
    ``scorer_options={"path": ...}`` set on every learned-scorer point, so a sweep uses exactly the
    files :func:`ensure_predictors` checked."""
    import dataclasses

    def fill(cache: Mapping) -> dict:
        kind = USES_PREDICTOR.get(cache.get("scorer"))
        if kind not in paths:
            return dict(cache)
        return {**cache, "scorer_options": {**(cache.get("scorer_options") or {}), "path": str(paths[kind])}}

    out = []
    for v in variants:
        if isinstance(v, Mapping):
            out.append(fill(v))
        elif v.cache is not None:
            out.append(dataclasses.replace(v, cache=fill(v.cache)))
        else:
            out.append(v)
    return out


# ---- the class-consistency classifier ----------------------------------------------------------------------

def classifier_for(model, path: str | None = None, image_set=None, label_map=None, train_missing: bool = False,
                   progress: bool = True):
    """The class-consistency classifier for ``model``, or None (saying why) when there is none.

    In order: the file at ``path`` (``tclab train-classifier``); the shipped shapes classifier when the
    model's classes are its classes; the artefact store's classifier of ``image_set`` with ``label_map``
    (:func:`tclab.labels.resolve_labels`); with ``train_missing``, one trained now on the mapped folders
    of ``image_set`` (with a held-out check) and kept in the store. Without mapped classes
    class-consistency cannot be measured: None, and the message says so.
    """
    from .classifier import SHIPPED_CLASSIFIER, ShapesClassifier

    if path is not None:
        from .paths import resolve_path

        clf = ShapesClassifier.load(resolve_path(path, what="classifier file"))
        if clf.class_ids is None and list(clf.class_names) != list(model.class_names or []):
            raise ValueError(f"classifier {path} knows {clf.class_names}, the model {model.class_names}; "
                             "train the classifier on the model's image set (tclab train-classifier --model ...)")
        return clf
    shipped = ShapesClassifier.load(SHIPPED_CLASSIFIER)
    if list(shipped.class_names) == list(model.class_names or []) and (
            label_map is None or not label_map.conditional or set(label_map.class_ids) <= set(shipped.model_class_ids)):
        return shipped
    if label_map is None or image_set is None or not label_map.conditional:
        why = ("no image folder maps to the model's classes" if label_map is not None
               else "no classifier given and the shipped one knows other classes")
        print(f"class-consistency not measured: {why}; give class folders that match the model's classes (or a "
              "labels mapping), or a classifier trained with `tclab train-classifier --images DIR --model MODEL`")
        return None
    from .artefacts import classifier_path

    stored = classifier_path(image_set, label_map, model.resolution)
    if stored.is_file():
        print(f"class-consistency classifier: {stored} (this image set and label mapping)")
        return ShapesClassifier.load(stored)
    if not train_missing:
        print(f"class-consistency not measured: no classifier for this image set and label mapping at {stored}; "
              "set train_missing=True, or run `tclab train-classifier --images DIR --model MODEL`")
        return None
    clf = train_classifier_for(model, image_set, label_map, progress=progress)
    print(f"class-consistency classifier trained on {image_set.root} ({len(clf.class_names)} mapped classes, "
          f"held-out accuracy {clf.val_accuracy if clf.val_accuracy is None else round(clf.val_accuracy, 3)}); "
          f"kept in {clf.save(stored)}")
    return clf


def train_classifier_for(model, image_set, label_map, epochs: int = 30, holdout: float = 0.2, seed: int = 0,
                         progress: bool = True):
    """Train a classifier on the mapped folders of ``image_set`` (at ``model.resolution``), holding out
    every ``1/holdout``-th image of each class for its check when each class has at least 5 images."""
    import dataclasses

    from .classifier import ClassifierConfig, train_classifier

    step = max(2, round(1 / holdout)) if holdout else 0
    per_class: dict[str | None, int] = {}
    val_idx, train_idx = [], []
    for i, r in enumerate(image_set.records):
        if label_map.class_of(r.class_name) == label_map.null_class:
            continue  # an unmapped folder teaches the classifier nothing
        k = per_class[r.class_name] = per_class.get(r.class_name, 0) + 1
        (val_idx if step and k % step == 0 else train_idx).append(i)
    enough = bool(step and per_class and min(per_class.values()) >= 5)

    def subset(idx):
        t = torch.tensor(idx, dtype=torch.long)
        return dataclasses.replace(image_set, images=image_set.images[t], labels=image_set.labels[t],
                                   records=[image_set.records[i] for i in idx])

    train_set, val_set = (subset(train_idx), subset(val_idx)) if enough else (image_set, None)
    clf = train_classifier(train_set, val_set, ClassifierConfig(epochs=epochs, seed=seed), progress=progress,
                           label_map=label_map)
    clf.info = {"images_root": str(image_set.root), "manifest_sha256": image_set.manifest_hash(),
                "labels_sha256": label_map.sha256(), "resolution": int(model.resolution),
                "held_out": len(val_idx) if enough else 0}
    return clf


