"""LPIPS, the learned perceptual image distance, from local weight files only.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") compares two images through the activations of an ImageNet classifier: each of five
layers is normalised to unit length along its channels, the squared difference is weighted per
channel by a 1x1 "lin" layer fitted to human 2AFC judgements, averaged over space, and the five
layers are summed. 0 means identical; larger means more different to a human eye. Here it is a
*paired* metric, like PSNR and SSIM: a cached sample against its same-seed full-compute sample
(``tclab.metrics.paired_quality(..., lpips_model=...)``).

This is the reference ``lpips`` package's default, ``lpips.LPIPS(net="alex", version="0.1")``,
rebuilt in plain torch (no torchvision) and computing the same numbers (tests/test_lpips.py checks
it against the package). It needs two files that you copy onto the machine yourself; tclab never
downloads anything:

- the AlexNet backbone: torchvision's ImageNet checkpoint ``alexnet-owt-7be5be79.pth``
  (``AlexNet_Weights.IMAGENET1K_V1``; torch hub caches it as
  ``~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth`` on a machine that has used it).
  A full AlexNet state dict or one holding only ``features.*`` is accepted;
- the lin layers: ``weights/v0.1/alex.pth`` from the ``lpips`` package (inside its wheel on PyPI,
  or ``lpips/weights/v0.1/alex.pth`` in richzhang/PerceptualSimilarity).

Scores are comparable to published LPIPS numbers only with exactly those two files (and the
same image size: LPIPS depends on resolution). :meth:`LPIPS.identity` records both paths and
sha256 hashes and says whether the files are byte-identical to the published ones. With other
backbone or lin weights (random ones in the tests, a v0.0 lin file) the number is a different
metric that merely has the same formula.

Image size. AlexNet shrinks its input 16-fold (a stride-4 convolution and two stride-2 max pools
before relu3), so its second max pool needs images of at least :data:`MIN_NATIVE_SIZE` = 31 px
per side. From 31 px up, images go in at their own size, exactly as the reference does; at
tclab's 32 x 32 that gives relu1 7x7, relu2 3x3 and relu3-5 1x1 maps (coarse, but computed,
and equal to what ``lpips`` returns for 32 px images). The reference fails on anything smaller;
here such pairs are upsampled bilinearly (``align_corners=False``) so their shorter side is
``upsample_to`` px (64 by default, the size of the 2AFC patches LPIPS was fitted on), which
:meth:`LPIPS.identity` records. Pass ``upsample_to=None`` to get an error instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .features import _sha256

__all__ = ["LPIPS", "alexnet_features", "load_lpips", "lpips_distance", "ALEXNET_WEIGHTS_NAME",
           "LIN_WEIGHTS_NAME", "MIN_NATIVE_SIZE", "LAYER_CHANNELS"]

#: torchvision's ImageNet AlexNet checkpoint; the 8 hex digits are the start of its sha256.
ALEXNET_WEIGHTS_NAME = "alexnet-owt-7be5be79.pth"
_ALEXNET_SHA256_PREFIX = "7be5be79"
#: The lin-layer file of the lpips package (``lpips/weights/v0.1/alex.pth``, e.g. in lpips 0.1.4).
LIN_WEIGHTS_NAME = "weights/v0.1/alex.pth"
_LIN_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"

#: Channels of relu1..relu5, the five layers LPIPS compares.
LAYER_CHANNELS = (64, 192, 384, 256, 256)
# Index in ``alexnet_features()`` of relu1..relu5: the reference slices features[0:2], [2:5],
# [5:8], [8:10], [10:12] and reads each slice's output. The final max pool (index 12) is unused.
_RELU_INDICES = (1, 4, 7, 9, 11)
#: Smallest image side the network accepts: below it the second max pool gets a 2x2 map.
MIN_NATIVE_SIZE = 31

# LPIPS v0.1 maps [-1, 1] images to roughly ImageNet-normalised ones: (x - shift) / scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # added to the channel norm, as the reference's normalize_tensor


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features``, layer for layer, so its state dict keys match (random init)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),    # 0
        nn.ReLU(inplace=True),                                     # 1  relu1
        nn.MaxPool2d(kernel_size=3, stride=2),                     # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2),              # 3
        nn.ReLU(inplace=True),                                     # 4  relu2
        nn.MaxPool2d(kernel_size=3, stride=2),                     # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1),             # 6
        nn.ReLU(inplace=True),                                     # 7  relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1),             # 8
        nn.ReLU(inplace=True),                                     # 9  relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1),             # 10
        nn.ReLU(inplace=True),                                     # 11 relu5
        nn.MaxPool2d(kernel_size=3, stride=2),                     # 12 (not used by LPIPS)
    )


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone: ``model(a, b) -> (N,)`` distances.

    Built with random weights; :func:`load_lpips` fills it from the two local files. ``a`` and
    ``b`` are ``(N, 3, H, W)`` images in [-1, 1] (tclab's convention and LPIPS's; values outside
    are clipped, as tclab's other metrics do). Pairs smaller than 31 px per side are upsampled
    so their shorter side is ``upsample_to`` (see the module docs); ``None`` makes them an error.

    All parameters are frozen. The reference's lin layers carry a dropout that is off in eval
    mode; here there is none, so train and eval mode compute the same thing. Gradients still flow
    to the inputs (the forward is differentiable), but :func:`lpips_distance` runs without them.
    """

    def __init__(self, upsample_to: int | None = 64):
        super().__init__()
        if upsample_to is not None and upsample_to < MIN_NATIVE_SIZE:
            raise ValueError(f"upsample_to={upsample_to}: AlexNet needs at least {MIN_NATIVE_SIZE} px per side; "
                             "use 64 (the LPIPS patch size) or None")
        self.upsample_to = upsample_to
        self.features = alexnet_features()
        # lins[k]: 1x1 conv, C_k -> 1, no bias (the reference's lin{k}.model.1)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LAYER_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.backbone_weights: str | None = None
        self.lin_weights: str | None = None
        self._sha256: dict[str, str] = {}

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The size an ``h x w`` image is given to the network (itself, or upsampled; see the class docs)."""
        short = min(h, w)
        if short >= MIN_NATIVE_SIZE:
            return h, w
        if self.upsample_to is None:
            raise ValueError(f"LPIPS with AlexNet needs images of at least {MIN_NATIVE_SIZE} x {MIN_NATIVE_SIZE} px, "
                             f"got {h} x {w}; build the model with upsample_to=64 to upsample small images")
        if short < 1:
            raise ValueError(f"cannot compute LPIPS on empty {h} x {w} images")
        # integer arithmetic, so the shorter side lands exactly on upsample_to
        return ((self.upsample_to if h == short else round(h * self.upsample_to / short)),
                (self.upsample_to if w == short else round(w * self.upsample_to / short)))

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1..relu5 of the scaled image ``x`` (B, 3, H, W) in [-1, 1]: five (B, C_k, H_k, W_k) maps."""
        h = (x - self.shift) / self.scale                                  # (B, 3, H, W)
        out = []
        for i, layer in enumerate(self.features[:_RELU_INDICES[-1] + 1]):
            h = layer(h)
            if i in _RELU_INDICES:
                out.append(h)                # (B, 64, H/4, W/4) ... (B, 256, H/16, W/16), roughly
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS compares image pairs of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        size = self.input_size(a.shape[-2], a.shape[-1])
        a, b = a.clamp(-1, 1), b.clamp(-1, 1)
        if size != tuple(a.shape[-2:]):
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        total = 0
        for fa, fb, lin in zip(self.layers(a), self.layers(b), self.lins):
            fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS)   # (B, C_k, H_k, W_k), unit along C
            fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS)
            total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))          # (B, 1)
        return total[:, 0]                                                 # (B,)

    def identity(self) -> dict[str, Any]:
        """What to record next to an LPIPS number: the weights (paths, sha256) and the resize rule."""
        published = (self._sha256.get("backbone", "").startswith(_ALEXNET_SHA256_PREFIX)
                     and self._sha256.get("lin") == _LIN_SHA256)
        resize = (f"native size from {MIN_NATIVE_SIZE} px per side (as the lpips package); smaller images "
                  + (f"upsampled bilinearly (align_corners=False) to shorter side {self.upsample_to} px"
                     if self.upsample_to is not None else "refused"))
        return {"name": "LPIPS v0.1, AlexNet (Zhang et al. 2018)",
                "backbone_weights": self.backbone_weights, "backbone_weights_sha256": self._sha256.get("backbone"),
                "lin_weights": self.lin_weights, "lin_weights_sha256": self._sha256.get("lin"),
                "published_weights": published, "input": "(N, 3, H, W) in [-1, 1], clipped", "resize": resize}

    def __repr__(self) -> str:
        return f"<LPIPS alex v0.1 backbone={self.backbone_weights!r} lin={self.lin_weights!r}>"


# ---- loading ------------------------------------------------------------------------------------

def _read_state_dict(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found. tclab never downloads weights: {fix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - not a safetensors file
            raise ValueError(f"cannot read {what} {str(path)!r} as safetensors: {e}") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt file, pickled code, not a torch file
            raise ValueError(f"cannot read {what} {str(path)!r} as a torch state dict with weights_only=True "
                             f"(tclab never unpickles code): {e}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _check(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path, what: str,
           fix: str, held: list[str]) -> None:
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if k in state and tuple(state[k].shape) != tuple(s)]
    if missing or wrong:
        raise ValueError(f"{str(path)!r} is not {what}: {len(missing)} of {len(expected)} tensors missing "
                         f"(e.g. {missing[:3]}), {len(wrong)} with wrong shapes (e.g. {wrong[:3]}); the file holds "
                         f"keys like {held[:4]}. {fix}")


def load_lpips(backbone_weights: str | Path, lin_weights: str | Path, *, upsample_to: int | None = 64,
               device: str | torch.device = "cpu") -> LPIPS:
    """An :class:`LPIPS` filled from two local files; never downloads.

    Args:
        backbone_weights: torchvision's AlexNet checkpoint (``alexnet-owt-7be5be79.pth``): a full
            AlexNet state dict (only ``features.*`` is used) or one of ``alexnet().features`` alone
            (keys ``features.0.weight`` or ``0.weight``).
        lin_weights: the lpips package's ``weights/v0.1/alex.pth`` (keys ``lin0.model.1.weight`` ...
            ``lin4.model.1.weight``).
        upsample_to: shorter side, in px, that images under 31 px are upsampled to (``None``: refuse them).
        device: where the network runs.

    Files are read with ``torch.load(weights_only=True)`` (or as ``.safetensors``), which refuses
    pickled code. Every tensor must be there with torchvision's / lpips's shape, else the error
    names the file, what is missing or misshapen, and which file to use instead.
    """
    model = LPIPS(upsample_to=upsample_to)
    bpath, lpath = Path(backbone_weights).expanduser(), Path(lin_weights).expanduser()
    bfix = (f"copy torchvision's ImageNet AlexNet checkpoint {ALEXNET_WEIGHTS_NAME} (AlexNet_Weights.IMAGENET1K_V1) "
            "onto this machine and pass its path as backbone_weights")
    lfix = (f"copy the lpips package's {LIN_WEIGHTS_NAME} (inside the lpips wheel on PyPI) onto this machine "
            "and pass its path as lin_weights")

    state = _read_state_dict(bpath, "AlexNet backbone weights", bfix)
    held = list(state)
    if not any(k.startswith("features.") for k in state):  # saved from alexnet().features: "0.weight", ...
        state = {f"features.{k}": v for k, v in state.items()}
    # torchvision's names throughout, so the errors read like the file; classifier.* is not needed
    expected = {f"features.{k}": v.shape for k, v in model.features.state_dict().items()}
    swapped = " It holds LPIPS lin layers: are the two arguments swapped?" if "lin0.model.1.weight" in held else ""
    _check(state, expected, bpath, "a torchvision AlexNet checkpoint (features.0.weight ... features.10.bias)",
           f"Use {ALEXNET_WEIGHTS_NAME}, or a state dict of torchvision's alexnet() or alexnet().features.{swapped}",
           held)
    model.features.load_state_dict({k[len("features."):]: state[k] for k in expected})

    lins = _read_state_dict(lpath, "LPIPS lin weights", lfix)
    expected = {f"lin{k}.model.1.weight": torch.Size((1, c, 1, 1)) for k, c in enumerate(LAYER_CHANNELS)}
    swapped = (" It holds AlexNet layers: are the two arguments swapped?"
               if any(k.startswith("features.") for k in lins) else "")
    _check(lins, expected, lpath, "the LPIPS v0.1 AlexNet lin file (lin0.model.1.weight ... lin4.model.1.weight)",
           f"Use the lpips package's {LIN_WEIGHTS_NAME} (not vgg.pth or squeeze.pth).{swapped}", list(lins))
    for k, lin in enumerate(model.lins):
        lin.weight.copy_(lins[f"lin{k}.model.1.weight"])

    model.backbone_weights, model.lin_weights = str(bpath), str(lpath)
    model._sha256 = {"backbone": _sha256(bpath), "lin": _sha256(lpath)}
    return model.to(device)


# ---- the paired metric ------------------------------------------------------------------------

def lpips_distance(a: torch.Tensor, b: torch.Tensor, model: LPIPS, batch_size: int = 64) -> torch.Tensor:
    """Per-image LPIPS between ``a`` and ``b``, both ``(N, 3, H, W)`` in [-1, 1]: ``(N,)`` float64.

    Runs without gradients, ``batch_size`` pairs at a time, on the model's device, in its dtype
    (float32); the result comes back on ``a``'s device. Identical images give exactly 0; the
    distance is symmetric. See :class:`LPIPS` for sizes and :meth:`LPIPS.identity` for what to record.
    """
    if not isinstance(model, LPIPS):
        raise TypeError(f"model must be a tclab.lpips.LPIPS (from load_lpips(backbone, lin)), "
                        f"got {type(model).__name__}")
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"lpips_distance: {name} must be a (N, 3, H, W) image tensor in [-1, 1], got {shape}")
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    model.input_size(a.shape[-2], a.shape[-1])             # a too-small image fails here, before any work
    p = next(model.parameters())
    out = []
    with torch.no_grad():
        for i in range(0, len(a), batch_size):
            xa = a[i:i + batch_size].to(device=p.device, dtype=p.dtype)
            xb = b[i:i + batch_size].to(device=p.device, dtype=p.dtype)
            out.append(model(xa, xb))                                      # (B,)
    if not out:
        return torch.zeros(0, dtype=torch.float64, device=a.device)
    return torch.cat(out).to(device=a.device, dtype=torch.float64)
