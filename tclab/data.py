"""In-house image sets: find, validate, decode and preprocess a folder of images.

Layouts accepted (the way teams hand data over):
- **class folders**: ``root/<class name>/<image>``; classes are the sub-folder names in sorted
  order, so class index ``k`` is ``class_names[k]`` (the embedded DiT was trained on this order);
- **flat**: ``root/<image>``, unlabelled (label -1).

Every file is checked. A bad one (empty, not an image, corrupt or truncated, smaller than
``min_side``) is listed with the reason in ``ImageSet.skipped`` and left out; the run goes on. A
missing folder, or one where nothing is usable, raises ``ImageSetError`` saying what was found.
Odd modes (grayscale, RGBA, palette, 16-bit, CMYK) are converted to RGB; transparency is
composited over white; EXIF orientation is applied. Images are resized (shorter side to the
resolution, Lanczos) and center-cropped, then scaled to [-1, 1] as the DiT expects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_MIN_SIDE = 16


class ImageSetError(ValueError):
    """The image folder cannot be used at all (missing, empty, nothing valid)."""


@dataclass
class BadImage:
    path: str
    reason: str


@dataclass
class ImageRecord:
    path: str  # relative to the set's root
    class_name: str | None
    label: int
    width: int
    height: int
    mode: str
    sha256: str


@dataclass
class ImageSet:
    """A validated, preprocessed image set.

    ``images`` is ``(N, 3, R, R)`` float32 in [-1, 1]; ``labels`` is ``(N,)`` int64 (-1 when flat).
    """

    root: Path
    resolution: int
    class_names: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    records: list[ImageRecord]
    skipped: list[BadImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def manifest(self):
        """A pandas frame: one row per usable image (path, class, size, mode, sha256)."""
        import pandas as pd

        return pd.DataFrame([r.__dict__ for r in self.records])

    def manifest_hash(self) -> str:
        """sha256 over (path, class, file hash) of every usable image: the set's identity."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.path}\t{r.class_name}\t{r.sha256}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        counts = {}
        for r in self.records:
            counts[r.class_name or "(unlabelled)"] = counts.get(r.class_name or "(unlabelled)", 0) + 1
        return {
            "root": str(self.root),
            "usable": len(self.records),
            "skipped": len(self.skipped),
            "classes": self.class_names,
            "per_class": counts,
            "manifest_sha256": self.manifest_hash(),
        }


def _list_files(root: Path) -> tuple[list[tuple[Path, str | None]], list[BadImage]]:
    """All candidate files with their class name (None when flat), and files skipped up front."""
    if not root.exists():
        raise ImageSetError(f"image folder {root} does not exist; pass the path of a folder of images")
    if not root.is_dir():
        raise ImageSetError(f"{root} is a file, not a folder; pass the folder that holds the images")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    skipped: list[BadImage] = []
    files: list[tuple[Path, str | None]] = []
    if subdirs:
        for p in entries:
            if p.is_file():
                skipped.append(BadImage(str(p.relative_to(root)), "file beside class folders (not in any class)"))
        for d in subdirs:
            for f in sorted(d.rglob("*")):
                if f.is_file() and not f.name.startswith("."):
                    files.append((f, d.name))
    else:
        files = [(p, None) for p in entries if p.is_file()]
    return files, skipped


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def preprocess(im: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> (3, R, R) float32 in [-1, 1]: shorter side resized, center crop."""
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return a.transpose(2, 0, 1)


def read_image(path: Path, min_side: int = DEFAULT_MIN_SIDE) -> tuple[Image.Image, str]:
    """Open, fully decode and validate one file; returns (RGB image, original mode).

    Raises ``ValueError`` with a human reason for any file that is not a usable image.
    """
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as probe:
            probe.verify()  # structure check: catches many corrupt files cheaply
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated data
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            rgb = _to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError(f"not an image (no decoder recognises it; suffix {path.suffix or 'none'})") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"corrupt or truncated image: {e}") from None
    if min(rgb.size) < min_side:
        raise ValueError(f"too small: {rgb.size[0]}x{rgb.size[1]} px, the floor is {min_side} px per side")
    return rgb, mode


def load_image_folder(
    root: str | Path,
    resolution: int,
    min_side: int = DEFAULT_MIN_SIDE,
    limit: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """Validate and load every image under ``root`` (see the module docstring for layouts).

    Args:
        root: the folder.
        resolution: output side in pixels (the model's ``sample_size * vae factor``).
        min_side: files with a side smaller than this are skipped as too small.
        limit: keep at most this many usable images (in deterministic order) per class.
        progress: show a progress bar.
    """
    from .progress import progress_bar

    root = Path(root).expanduser()
    files, skipped = _list_files(root)
    class_names = sorted({c for _, c in files if c is not None})
    label_of = {c: k for k, c in enumerate(class_names)}
    arrays, records, per_class = [], [], {}
    for f, cls in progress_bar(files, desc=f"checking {root.name}", disable=not progress, unit="img"):
        rel = str(f.relative_to(root))
        if limit is not None and per_class.get(cls, 0) >= limit:
            continue
        try:
            rgb, mode = read_image(f, min_side)
        except ValueError as e:
            skipped.append(BadImage(rel, str(e)))
            continue
        arrays.append(preprocess(rgb, resolution))
        per_class[cls] = per_class.get(cls, 0) + 1
        records.append(ImageRecord(rel, cls, label_of.get(cls, -1) if cls else -1, rgb.size[0], rgb.size[1],
                                   mode, hashlib.sha256(f.read_bytes()).hexdigest()))
    if not records:
        reasons = "; ".join(f"{b.path}: {b.reason}" for b in skipped[:5]) or "the folder holds no files"
        raise ImageSetError(f"no usable image in {root} ({len(skipped)} skipped: {reasons}). "
                            "Point at a folder of PNG/JPEG files, flat or one sub-folder per class.")
    return ImageSet(
        root=root,
        resolution=resolution,
        class_names=class_names,
        images=torch.from_numpy(np.stack(arrays)),
        labels=torch.tensor([r.label for r in records], dtype=torch.long),
        records=records,
        skipped=skipped,
    )


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the form PNGs and metrics use."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a.permute(0, 2, 3, 1).cpu().numpy()
