"""Sample grids and the class-consistency evaluation of a model (``tclab sample`` / ``tclab evaluate``).

Each call writes a new folder ``<out>/<UTC timestamp>_<model>/`` (built aside, renamed when
complete, so a failed call never leaves half a result and never touches an earlier one).
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .models import load_dit
from .sampling import SampleConfig, sample, save_grid


def _new_folder(out: str | Path, model_name: str) -> tuple[Path, Path]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = model_name.replace("/", "-").replace("@", "-")
    final = Path(out) / f"{stamp}_{safe}"
    stage = Path(out) / f".{final.name}.partial"
    stage.mkdir(parents=True, exist_ok=False)
    return stage, final


def _finish(stage: Path, final: Path) -> Path:
    n = 1
    target = final
    while target.exists():  # two runs in the same second: never overwrite
        target = final.with_name(f"{final.name}-{n}")
        n += 1
    stage.rename(target)
    return target


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: an equal share of every class."""
    return torch.arange(num_samples) % num_classes


def sample_grid(model_spec: str, config: SampleConfig, num_samples: int, out: str | Path) -> Path:
    """Sample a class-balanced grid (one column per class) and write ``grid.png`` + ``samples.json``."""
    model = load_dit(model_spec)
    labels = balanced_labels(num_samples, model.num_classes if model.class_names else 8)
    stage, final = _new_folder(out, model.name)
    try:
        res = sample(model, labels, config)
        ncol = len(model.class_names) if model.class_names else 8
        save_grid(res.images, stage / "grid.png", nrow=ncol, scale=max(1, 128 // model.resolution))
        info = {"model": model.identity(), "config": config.__dict__, "labels": labels.tolist(),
                "seconds": round(res.seconds, 2), "column_classes": model.class_names}
        (stage / "samples.json").write_text(json.dumps(info, indent=2))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _finish(stage, final) / "grid.png"


def evaluate_class_consistency(model_spec: str, config: SampleConfig, num_samples: int, out: str | Path,
                               classifier_path: str | None = None) -> dict:
    """Sample ``num_samples`` class-balanced images and measure class-consistency with the classifier."""
    from .classifier import SHIPPED_CLASSIFIER, ShapesClassifier, class_consistency

    model = load_dit(model_spec)
    if not model.class_names:
        raise ValueError(f"{model.name} has no class names; class-consistency needs a class-conditional model "
                         "trained on a labelled image set")
    clf = ShapesClassifier.load(classifier_path or SHIPPED_CLASSIFIER)
    labels = balanced_labels(num_samples, model.num_classes)
    stage, final = _new_folder(out, model.name)
    try:
        t0 = time.perf_counter()
        res = sample(model, labels, config)
        cc = class_consistency(clf, res.images, labels, model.class_names)
        save_grid(res.images[: 8 * len(model.class_names)], stage / "grid.png", nrow=len(model.class_names),
                  scale=max(1, 128 // model.resolution))
        result = {"class_consistency": cc["accuracy"], "per_class": cc["per_class"], "n": cc["n"],
                  "seconds": round(time.perf_counter() - t0, 1), "sampling_seconds": round(res.seconds, 1),
                  "classifier": str(classifier_path or SHIPPED_CLASSIFIER),
                  "classifier_val_accuracy": clf.val_accuracy, "model": model.identity(),
                  "config": config.__dict__}
        (stage / "result.json").write_text(json.dumps(result, indent=2))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result["out"] = str(_finish(stage, final))
    return result
