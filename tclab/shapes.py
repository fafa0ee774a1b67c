"""The synthetic stand-in for an in-house image set: coloured shapes on smooth backgrounds.

A company hands tclab a folder with one sub-folder per class of image files. Nothing real can be
shipped or downloaded here, so this module *makes* such a folder, deterministically from a seed.

Why shapes: the images have real structure a DiT must learn (six object classes, each with varied
position, size, rotation and colour) while most of each picture is smooth background. That split
between a few tokens that matter and many that do not is exactly what token caching exploits, so
the redundancy analysis has something true to find.

Every image is drawn at 4x resolution and downsampled with a Lanczos filter (anti-aliased edges).
The same ``(seed, class, index)`` always gives the same pixels, whatever else is generated.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("disc", "ring", "square", "triangle", "cross", "star")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapesConfig:
    """How the stand-in set is drawn.

    Args:
        resolution: side of the square output images in pixels (the embedded DiT uses 32).
        per_class: images generated per class.
        seed: master seed; each image derives its own generator from (seed, class, index).
        min_size / max_size: object radius as a fraction of the image side.
        gradient_prob: chance that the background is a two-colour linear gradient, not flat.
    """

    resolution: int = 32
    per_class: int = 50
    seed: int = 1
    min_size: float = 0.20
    max_size: float = 0.40
    gradient_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution={self.resolution} is too small; use at least 8 pixels")
        if self.per_class < 1:
            raise ValueError(f"per_class={self.per_class} must be at least 1")
        if not 0 < self.min_size <= self.max_size < 0.5:
            raise ValueError("need 0 < min_size <= max_size < 0.5 (fractions of the image side)")


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple[float, float, float]:
    """A random colour as (h, s, v), each in [0, 1]."""
    return rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)


def _rgb(hsv: tuple[float, float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(*hsv)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, side: int, gradient_prob: float) -> tuple[Image.Image, float]:
    """A flat or linear-gradient background; returns the image and its mean value (brightness)."""
    c1 = _colour(rng, (0.0, 0.45), (0.15, 0.95))
    if rng.uniform() < gradient_prob:
        c2 = (c1[0] + rng.uniform(-0.15, 0.15)) % 1.0, c1[1], float(np.clip(c1[2] + rng.uniform(-0.35, 0.35), 0.1, 1.0))
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:side, 0:side] / (side - 1) - 0.5
        w = np.clip((xs * math.cos(angle) + ys * math.sin(angle)) + 0.5, 0, 1)[..., None]  # (side, side, 1)
        a, b = np.array(_rgb(c1), float), np.array(_rgb(c2), float)
        pixels = (1 - w) * a + w * b  # (side, side, 3)
        return Image.fromarray(pixels.astype(np.uint8)), (c1[2] + c2[2]) / 2
    return Image.new("RGB", (side, side), _rgb(c1)), c1[2]


def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    if name == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "ring":
        w = r * 0.38  # thick enough to survive downsampling to 32 px
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(w)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.05] * 4, rot), fill=fill)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.15] * 3, rot), fill=fill)
    elif name == "cross":
        arm = r * 0.36  # half-width of each bar
        for a in (rot, rot + math.pi / 2):
            dx, dy, px, py = math.cos(a) * r, math.sin(a) * r, -math.sin(a) * arm, math.cos(a) * arm
            draw.polygon([(cx - dx + px, cy - dy + py), (cx + dx + px, cy + dy + py),
                          (cx + dx - px, cy + dy - py), (cx - dx - px, cy - dy - py)], fill=fill)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.15, r * 0.5] * 5, rot), fill=fill)
    else:  # pragma: no cover - guarded by CLASSES
        raise ValueError(f"unknown shape {name!r}; known: {CLASSES}")


def make_shape_image(config: ShapesConfig, class_index: int, index: int) -> Image.Image:
    """Draw image ``index`` of class ``class_index``; pure function of (config, class, index)."""
    rng = np.random.default_rng([config.seed, class_index, index])
    side = config.resolution * SUPERSAMPLE
    img, bg_value = _background(rng, side, config.gradient_prob)
    r = rng.uniform(config.min_size, config.max_size) * side
    cx, cy = rng.uniform(r, side - r), rng.uniform(r, side - r)
    # Object brightness is pushed away from the background's so the shape is always visible.
    hue, sat, _ = _colour(rng, (0.55, 1.0), (0.0, 1.0))
    val = rng.uniform(0.75, 1.0) if bg_value < 0.55 else rng.uniform(0.05, 0.35)
    draw = ImageDraw.Draw(img)
    _draw_shape(draw, CLASSES[class_index], cx, cy, r, rng.uniform(0, 2 * math.pi), _rgb((hue, sat, val)))
    return img.resize((config.resolution, config.resolution), Image.LANCZOS)


def write_shapes_dataset(out_dir: str | Path, config: ShapesConfig = ShapesConfig(), progress: bool = True) -> Path:
    """Write the stand-in set as ``out_dir/<class>/<class>_<index>.png``; refuses a non-empty folder."""
    from .progress import progress_bar

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder or delete it first")
    jobs = [(c, i) for c in range(len(CLASSES)) for i in range(config.per_class)]
    for c, i in progress_bar(jobs, desc="drawing shapes", disable=not progress, unit="img"):
        path = out / CLASSES[c] / f"{CLASSES[c]}_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_shape_image(config, c, i).save(path, optimize=True)
    return out
