"""A small CNN classifier for class-consistency: does a sample look like the class it was asked for?

Trained on the *real* images of a labelled set (the stand-in shapes, or a team's own folders), then
used to label generated samples. Class-consistency = fraction of samples the classifier assigns to
their conditioning class. It is a sanity check of conditional generation that needs no downloaded
weights; it is not a published metric, so it is only comparable between runs of the same classifier.

The shipped classifier (``tclab/weights/shapes-classifier.safetensors``) was made with
``tclab train-classifier --images data/shapes-train --val-images data/shapes``.
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

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N,) predicted class indices."""
        self.net.eval()
        return torch.cat([self.net(images[i:i + batch_size].float()).argmax(1)
                          for i in range(0, len(images), batch_size)])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        meta = {"class_names": json.dumps(self.class_names), "width": str(self.net.head.in_features // 4),
                "val_accuracy": json.dumps(self.val_accuracy)}
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path = SHIPPED_CLASSIFIER) -> "ShapesClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"classifier weights {path} not found; train one with `tclab train-classifier`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        names = json.loads(meta["class_names"])
        net = SmallCNN(len(names), width=int(meta["width"]))
        net.load_state_dict(load_file(str(path)))
        return cls(net.eval(), names, json.loads(meta.get("val_accuracy", "null")))


def train_classifier(train_set, val_set=None, config: ClassifierConfig = ClassifierConfig(),
                     progress: bool = True) -> ShapesClassifier:
    """Train ``SmallCNN`` on a labelled ``ImageSet`` (flip augmentation); report held-out accuracy."""
    from tqdm.auto import tqdm

    if not train_set.labelled:
        raise ValueError(f"{train_set.root} has no class folders; a classifier needs labelled images")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = SmallCNN(len(train_set.class_names), config.width)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    n = len(train_set)
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    bar = tqdm(total=steps, desc="train-classifier", disable=not progress, unit="step")
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
    clf = ShapesClassifier(net.eval(), list(train_set.class_names))
    if val_set is not None:
        if list(val_set.class_names) != clf.class_names:
            raise ValueError(f"validation classes {val_set.class_names} differ from training classes {clf.class_names}")
        clf.val_accuracy = float((clf.predict(val_set.images) == val_set.labels).float().mean())
    return clf


def class_consistency(classifier: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor,
                      model_class_names: list[str] | None = None) -> dict:
    """Fraction of ``images`` classified as their conditioning ``labels``, overall and per class.

    ``model_class_names`` (the generator's class order) is checked against the classifier's so a
    label index means the same class to both.
    """
    if model_class_names is not None and list(model_class_names) != classifier.class_names:
        raise ValueError(f"model classes {model_class_names} and classifier classes {classifier.class_names} "
                         "differ; train the classifier on the model's image set")
    pred = classifier.predict(images)
    hit = (pred == labels).float()
    per_class = {classifier.class_names[c]: float(hit[labels == c].mean())
                 for c in labels.unique().tolist()}
    return {"accuracy": float(hit.mean()), "per_class": per_class, "n": len(labels)}

