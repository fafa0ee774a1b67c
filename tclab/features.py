"""Feature extractors for distribution metrics (FID, KID): images in, one feature vector per image out.

FID and KID compare two image sets through the statistics of their features, so the numbers mean
something only *within one feature space*. Every extractor therefore says what it is:

- ``name``: printed next to every FID/KID it produced (``distribution_quality`` copies it into its
  result, and from there into summary.json and the reports);
- ``comparable_to_published``: ``True`` only for the FID InceptionV3 features that papers use.
  A FID from any other extractor is a *relative* number: fine for "did caching move the
  distribution, and more than the other setting?", meaningless next to a paper's FID.

Two extractors ship:

:class:`InceptionV3Features`
    The 2048-d pool features of the FID InceptionV3 (the TensorFlow 2015-12-05 graph as ported by
    pytorch-fid, file ``pt_inception-2015-12-05-6726825d.pth``), built here from its layer table and
    loaded from a **local** weights file you give (``.pth`` via ``torch.load(weights_only=True)``, or
    the same tensors converted to ``.safetensors``). Nothing is ever downloaded. Comparability with
    a paper also needs the paper's protocol: 50,000 samples against the same reference batch
    (DiT: ImageNet 256, ADM evaluator). For exactly that protocol write the samples with
    :func:`tclab.metrics.export_adm_npz` and run the ADM evaluator (``evaluations/evaluator.py`` in
    openai/guided-diffusion); its TensorFlow graph is the one the DiT/TokenCache/ToCa numbers used,
    and pytorch-fid agrees with it closely but not to the last digit.

:class:`ClassifierFeatures`
    The pooled 128-d features of the shipped ``SmallCNN`` class-consistency classifier (or one you
    trained on your reference set with ``tclab train-classifier``). Needs no download and suits
    small in-house images; **not** comparable to published FID.

The feature dimension D also sets how many images FID needs: at least D + 1 in each set, so the
sample covariance can be full rank (129 for ClassifierFeatures, 2049 for InceptionV3); below that
``tclab.metrics.distribution_quality`` reports FID as not computed, with the reason (see
``tclab.metrics.fid_min_images``), and KID, which has no such floor, with its std over subsets.

Write your own by subclassing :class:`FeatureExtractor` and implementing ``_features``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureExtractor", "ClassifierFeatures", "InceptionV3Features", "FIDInceptionV3",
           "load_inception_weights", "INCEPTION_WEIGHTS_NAME"]

#: The file pytorch-fid and torchmetrics download (sha256 starts with 6726825d); get it once, by hand.
INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureExtractor:
    """Base class: ``extractor(images) -> (N, D) float64`` features.

    ``images`` is ``(N, 3, H, W)`` in [-1, 1], the package's image convention (``load_image_folder``
    and the samplers both produce it). Subclasses implement :meth:`_features` on one float32 batch
    and set ``name`` and ``comparable_to_published``; batching, ``no_grad`` and the float64
    conversion happen here.
    """

    name: str = "unnamed feature extractor"
    comparable_to_published: bool = False
    batch_size: int = 64

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"{self.name}: expected images as a (N, 3, H, W) tensor in [-1, 1], got {shape}")
        if len(images) == 0:
            raise ValueError(f"{self.name}: got an empty image set")
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                out.append(self._features(images[i:i + self.batch_size].float()).double().cpu().numpy())
        return np.concatenate(out)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What to record next to a number this extractor produced (name, flag, weights)."""
        return {"name": self.name, "comparable_to_published": self.comparable_to_published}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---- the shipped small classifier --------------------------------------------------------------

class ClassifierFeatures(FeatureExtractor):
    """Pooled features of a ``SmallCNN`` (``ShapesClassifier.net.embed``): 4 x width dims (128 shipped).

    Args:
        classifier: a ``ShapesClassifier``, a path to its safetensors file, or ``None`` for the
            shipped one (trained on ``data/shapes-train``). For your own image domain train one on
            the reference set (``tclab train-classifier --images REF``): features of a classifier
            that never saw such images say little about them.
        batch_size: images per forward.

    Cheap (milliseconds for hundreds of 32 px images), offline, and sensitive to what this
    classifier learned to tell apart (shape, colour layout). Not InceptionV3: its FID is labelled
    ``NOT comparable to published FID`` everywhere it appears.
    """

    comparable_to_published = False

    def __init__(self, classifier=None, batch_size: int = 256):
        from .classifier import SHIPPED_CLASSIFIER, ShapesClassifier

        self.weights: str | None = None
        if classifier is None or isinstance(classifier, (str, Path)):
            path = Path(classifier) if classifier is not None else SHIPPED_CLASSIFIER
            classifier = ShapesClassifier.load(path)
            self.weights = str(path)
        self.classifier = classifier
        self.batch_size = batch_size
        which = "shipped" if self.weights == str(SHIPPED_CLASSIFIER) else "custom"
        self.name = f"tclab-smallcnn-{which} (NOT comparable to published FID)"

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        net = self.classifier.net.eval()
        return net.embed(batch)                                  # (B, 4w)

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        if self.weights is not None:
            out.update(weights=self.weights, weights_sha256=_sha256(Path(self.weights)))
        return out


# ---- FID InceptionV3 ---------------------------------------------------------------------------
# The network of the TensorFlow FID graph (inception-2015-12-05) in the module names of
# torchvision's Inception3, which is how pytorch-fid's weights file names its tensors. Differences
# from torchvision's ImageNet Inception, all from the TF graph: 1008 output classes (unused here),
# average pools that ignore padding (count_include_pad=False), and max pooling in the last block's
# pool branch. Only the layers up to the 2048-d global average pool are built.

class _Conv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in TF) -> ReLU; pytorch-fid's ``BasicConv2d``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool divides by the number of real (unpadded) pixels in the window
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1 (64+64+96+pool channels)."""

    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _ReduceB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2 (384+96+cin channels)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1); 4 x 192 = 768 channels out."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = _Conv(c7, c7, **h), _Conv(c7, 192, **v)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **v), _Conv(c7, c7, **h)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **v), _Conv(c7, 192, **h)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg3(x))], 1)


class _ReduceD(nn.Module):
    """17 -> 8 reduction: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2 (320+192+cin channels)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads: 320 + 768 + 768 + 192 = 2048 channels out.

    ``pool`` is "avg" (Mixed_7b) or "max" (Mixed_7c): the TF FID graph max-pools in its last block.
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        h, v = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **h), _Conv(384, 384, **v)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **h), _Conv(384, 384, **v)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 up to its global average pool: (B, 3, 299, 299) in [-1, 1] -> (B, 2048).

    Random weights until :func:`load_inception_weights` fills it. Shapes along the way (299 input):
    stem -> (B, 64, 73, 73) -> (B, 192, 35, 35) -> Mixed_5* (B, 288, 35, 35) -> Mixed_6* (B, 768, 17, 17)
    -> Mixed_7* (B, 2048, 8, 8) -> mean over space.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, "avg"), _MixedE(2048, "max")

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs pytorch-fid calls blocks 0-3 (the last before pooling)."""
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        s0 = x                                                              # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        s1 = x                                                              # (B, 192, 35, 35)
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = m(x)
        s2 = x                                                              # (B, 768, 17, 17)
        for m in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = m(x)
        return [s0, s1, s2, x]                                              # last: (B, 2048, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1].mean(dim=(2, 3))                          # (B, 2048)


def load_inception_weights(path: str | Path, model: FIDInceptionV3 | None = None) -> FIDInceptionV3:
    """Fill a :class:`FIDInceptionV3` from a local weights file; never downloads.

    Accepts pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with
    ``torch.load(weights_only=True)``, which refuses pickled code) or the same tensors saved as
    ``.safetensors``. The classifier head (``fc.*``) is ignored. Every backbone tensor must be
    present with the right shape; otherwise the error lists what is missing, which is what a file
    from a different port (torch-fidelity, Keras, torchvision's ImageNet Inception) looks like.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights {str(path)!r} not found. tclab never downloads weights: fetch "
            f"{INCEPTION_WEIGHTS_NAME} once (pytorch-fid's GitHub release 'fid_weights'), copy it to this "
            "machine and pass its path; or use ClassifierFeatures() for a local, non-comparable FID.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt file, pickled code, not a torch file
            raise ValueError(f"cannot read {str(path)!r} as a torch state dict with weights_only=True: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")

    model = model if model is not None else FIDInceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if k in state and tuple(state[k].shape) != tuple(s)]
    if missing or wrong:
        raise ValueError(
            f"{str(path)!r} is not the pytorch-fid FID Inception layout ({INCEPTION_WEIGHTS_NAME}): "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(wrong)} with wrong shapes "
            f"(e.g. {wrong[:3]}). Use that file, or convert yours to its tensor names.")
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    return model.eval()


class InceptionV3Features(FeatureExtractor):
    """2048-d pool features of the FID InceptionV3, loaded from a local file (see the module docs).

    Preprocessing follows pytorch-fid: images are quantised to 8 bits first (``quantize``; its
    inputs are PNG/JPEG files, and generated samples are saved as 8-bit images), scaled to [0, 1],
    resized to 299 x 299 bilinearly (``align_corners=False``) and mapped to [-1, 1]. On a CPU this
    is about 6 GFLOPs per image: minutes for thousands of images.
    """

    comparable_to_published = True

    def __init__(self, weights: str | Path, batch_size: int = 50, device: str | torch.device = "cpu",
                 quantize: bool = True):
        self.weights = str(Path(weights).expanduser())
        self.net = load_inception_weights(self.weights).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.quantize = quantize
        self.name = "InceptionV3 pool3 (FID, pytorch-fid port of the TF 2015-12-05 graph)"

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        x = (batch.to(self.device).clamp(-1, 1) + 1) / 2                   # (B, 3, H, W) in [0, 1]
        if self.quantize:
            x = (x * 255).round() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)                                          # (B, 2048)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "weights": self.weights, "weights_sha256": _sha256(Path(self.weights))}
