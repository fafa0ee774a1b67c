"""A small CNN classifier for class-consistency: does a sample look like the class it was asked for?

Trained on the *real* images of a labelled set (the stand-in shapes, or a team's own folders), then
used to label generated samples. Class-consistency = fraction of samples the classifier assigns to
their conditioning class. It is a sanity check of conditional generation that needs no downloaded
weights; it is not a published metric, so it is only comparable between runs of the same classifier.

Labels: a classifier predicts indices ``0..K-1`` of its ``class_names``; ``class_ids[k]`` is the
*model's* class id of output ``k`` (a team's 3 folders mapped onto ImageNet ids 1, 207, 980 by
:func:`tclab.labels.resolve_labels`). :meth:`ShapesClassifier.predict_ids` answers in model ids, so
class-consistency compares like with like and is measured only on samples of the classes it knows.

The shipped classifier (``tclab/weights/shapes-classifier.safetensors``) was made with
``tclab train-classifier --images data/shapes-train --val-images data/shapes``; a team's goes to the
artefact store (``tclab.artefacts.classifier_path``), keyed by its image set and label mapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHIPPED_CLASSIFIER = Path(__file__).parent / "weights" / "shapes-classifier.safetensors"


class SmallCNN(nn.Module):
    """Three conv stages and global average pooling: works at any input resolution >= 8."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4w) pooled features (also usable as an FID feature space)."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@dataclass
class ClassifierConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    seed: int = 0


@dataclass
class ShapesClassifier:
    """A trained classifier with the class names it predicts (in index order)."""

    net: SmallCNN
    class_names: list[str]
    val_accuracy: float | None = None
    class_ids: list[int] | None = None  # model class id of each output; None = 0..K-1
    info: dict | None = None  # what it was trained on (images root, manifest, labels), for the store

    @property
    def model_class_ids(self) -> list[int]:
        return list(self.class_ids) if self.class_ids is not None else list(range(len(self.class_names)))

    @torch.no_grad()
    def predict_ids(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N,) predicted *model* class ids."""
        return torch.tensor(self.model_class_ids, dtype=torch.long)[self.predict(images)]

    def knows(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which conditioning labels are classes this classifier can recognise."""
        return torch.isin(torch.as_tensor(labels).cpu(), torch.tensor(self.model_class_ids, dtype=torch.long))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N,) predicted class indices."""
        self.net.eval()
        return torch.cat([self.net(images[i:i + batch_size].float()).argmax(1)
                          for i in range(0, len(images), batch_size)])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        meta = {"class_names": json.dumps(self.class_names), "width": str(self.net.head.in_features // 4),
                "val_accuracy": json.dumps(self.val_accuracy), "class_ids": json.dumps(self.class_ids),
                "info": json.dumps(self.info)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path = SHIPPED_CLASSIFIER) -> "ShapesClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"classifier weights {path} not found; train one with `tclab train-classifier`")
        meta = read_classifier_meta(path)
        names = meta["class_names"]
        net = SmallCNN(len(names), width=int(meta["width"]))
        net.load_state_dict(load_file(str(path)))
        return cls(net.eval(), names, meta.get("val_accuracy"), meta.get("class_ids"), meta.get("info"))


def read_classifier_meta(path: str | Path) -> dict:
    """The header of a classifier file: class names and ids, width, held-out accuracy, what it was trained on."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); is it a `tclab train-classifier` file?") from None
    if "class_names" not in raw or "width" not in raw:
        raise ValueError(f"{path} has no classifier metadata; is it written by `tclab train-classifier`?")
    out = {"class_names": json.loads(raw["class_names"]), "width": int(raw["width"]),
           "val_accuracy": json.loads(raw.get("val_accuracy", "null")),
           "class_ids": json.loads(raw.get("class_ids", "null")), "info": json.loads(raw.get("info", "null"))}
    out.update({k: v for k, v in (out["info"] or {}).items() if k not in out})
    return out


def train_classifier(train_set, val_set=None, config: ClassifierConfig = ClassifierConfig(),
                     progress: bool = True, label_map=None) -> ShapesClassifier:
    """Train ``SmallCNN`` on a labelled ``ImageSet`` (flip augmentation); report held-out accuracy.

    With ``label_map`` (:class:`tclab.labels.LabelMap` of ``train_set`` onto a model): only the images
    of mapped folders are used, the outputs are the mapped model classes (``class_ids``), and
    ``val_set`` (mapped with the same folder names) may be None.
    """
    from .progress import progress_bar

    if not train_set.labelled:
        raise ValueError(f"{train_set.root} has no class folders; a classifier needs labelled images")
    class_ids = None
    if label_map is not None:
        if not label_map.conditional:
            raise ValueError(f"no folder of {train_set.root} is mapped to a model class (labels {label_map.spec}); "
                             "a classifier needs at least one mapped class")
        train_set, names, class_ids = _mapped_subset(train_set, label_map)
        if val_set is not None:
            val_set = _mapped_subset(val_set, label_map)[0]
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = SmallCNN(len(class_ids) if class_ids is not None else len(train_set.class_names), config.width)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    n = len(train_set)
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    bar = progress_bar(total=steps, desc="train-classifier", disable=not progress, unit="step")
    for _ in range(config.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, config.batch_size):
            idx = perm[i:i + config.batch_size]
            x, y = train_set.images[idx], train_set.labels[idx]
            x = torch.where((torch.rand(len(x), generator=gen) < 0.5)[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if class_ids is not None:
        clf = ShapesClassifier(net.eval(), names, class_ids=class_ids)
    else:
        clf = ShapesClassifier(net.eval(), list(train_set.class_names))
    if val_set is not None and class_ids is not None:
        clf.val_accuracy = float((clf.predict(val_set.images) == val_set.labels).float().mean())
    elif val_set is not None:
        if list(val_set.class_names) != clf.class_names:
            raise ValueError(f"validation classes {val_set.class_names} differ from training classes {clf.class_names}")
        clf.val_accuracy = float((clf.predict(val_set.images) == val_set.labels).float().mean())
    return clf


def _mapped_subset(image_set, label_map):
    """The images of mapped folders, relabelled 0..K-1 over the distinct mapped class ids; the class
    names and ids of those outputs."""
    import dataclasses

    ids = label_map.class_ids
    lab = label_map.labels_for(image_set)
    keep = torch.isin(lab, torch.tensor(ids, dtype=torch.long))
    idx = keep.nonzero().flatten()
    out_of = {c: k for k, c in enumerate(ids)}
    sub = dataclasses.replace(image_set, images=image_set.images[idx],
                              labels=torch.tensor([out_of[int(lab[i])] for i in idx], dtype=torch.long),
                              records=[image_set.records[i] for i in idx.tolist()])
    return sub, [label_map.class_name_of(c) for c in ids], ids


def class_consistency(classifier: ShapesClassifier, images: torch.Tensor | None, labels: torch.Tensor,
                      model_class_names: list[str] | None = None, predictions: torch.Tensor | None = None) -> dict:
    """Fraction of ``images`` classified as their conditioning ``labels`` (model class ids), overall and
    per class, over the images whose label the classifier knows (``n``; ``n_unknown`` were left out).

    ``model_class_names`` (the generator's class order) is checked against a classifier without
    ``class_ids`` (outputs = the model's classes in order), so a label index means the same class to both.
    ``predictions``: the classifier's ids of the images whose label it knows, made already (e.g. shard by
    shard on several processes, ``tclab.evaluate``); ``images`` is then not needed.
    """
    if (classifier.class_ids is None and model_class_names is not None
            and list(model_class_names) != classifier.class_names):
        raise ValueError(f"model classes {model_class_names} and classifier classes {classifier.class_names} "
                         "differ; train the classifier on the model's image set")
    labels = torch.as_tensor(labels).cpu()
    known = classifier.knows(labels)
    if not bool(known.any()):
        return {"accuracy": None, "per_class": {}, "n": 0, "n_unknown": int(len(labels))}
    pred = classifier.predict_ids(images[known]) if predictions is None else torch.as_tensor(predictions).cpu()
    lab = labels[known]
    hit = (pred == lab).float()
    name_of = dict(zip(classifier.model_class_ids, classifier.class_names))
    per_class = {name_of[c]: float(hit[lab == c].mean()) for c in lab.unique().tolist()}
    return {"accuracy": float(hit.mean()), "per_class": per_class, "n": int(known.sum()),
            "n_unknown": int((~known).sum())}
