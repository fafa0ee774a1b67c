"""Stand-ins for a team's own model and image folder, written to disk the way a team hands them over.

Nothing is downloaded: every model is built here with random (seeded) weights and saved with
diffusers' own ``save_pretrained``, so the folders have exactly the layout of a real checkpoint
(``facebook/DiT-XL-2-256``: ``model_index.json`` with ``id2label``, ``transformer/``, ``vae/``,
``scheduler/``), only tiny. Used by the tests and, from the command line, to try tclab by hand::

    python tests/standins.py /tmp/standin            # writes /tmp/standin/{latent-dit,images}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_transformer(*, in_channels: int = 4, learned_sigma: bool = True, sample_size: int = 16, patch_size: int = 2,
                     num_layers: int = 4, heads: int = 2, head_dim: int = 8, num_embeds_ada_norm: int = 1000,
                     seed: int = 0):
    """A random DiT transformer: ``sample_size // patch_size`` tokens a side, ``num_layers`` blocks."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                                 out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=num_layers,
                                 sample_size=sample_size, patch_size=patch_size,
                                 num_embeds_ada_norm=num_embeds_ada_norm).eval()


def make_vae(*, latent_channels: int = 4, downsample: int = 2, seed: int = 0):
    """A random ``AutoencoderKL`` that downsamples by ``downsample`` (a power of 2)."""
    from diffusers import AutoencoderKL

    levels = int(np.log2(downsample)) + 1
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=4,
                         sample_size=32).eval()


def write_latent_pipeline(folder: str | Path, *, id2label: dict[int, str] | None = None, downsample: int = 2,
                          hub_transformer_config: bool = False, **transformer_kwargs) -> Path:
    """A full ``DiTPipeline`` folder (transformer, AutoencoderKL, DDIM scheduler, optional ``id2label``).

    ``id2label`` is written the way ``facebook/DiT-XL-2-256`` has it: string keys, comma-separated
    aliases in the names ("goldfish, Carassius auratus"). With ``hub_transformer_config`` the
    transformer's ``config.json`` is the one the hub checkpoints carry (saved before diffusers had
    ``DiTTransformer2DModel``): class ``Transformer2DModel`` with its extra keys.
    """
    from diffusers import DDIMScheduler, DiTPipeline

    from tclab.models import default_scheduler_config

    folder = Path(folder)
    pipe = DiTPipeline(transformer=make_transformer(**transformer_kwargs),
                       vae=make_vae(latent_channels=transformer_kwargs.get("in_channels", 4), downsample=downsample),
                       scheduler=DDIMScheduler(**default_scheduler_config()))
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    if id2label is not None:
        index["id2label"] = {str(k): v for k, v in id2label.items()}
    else:
        index.pop("id2label", None)
    if hub_transformer_config:
        index["transformer"] = ["diffusers", "Transformer2DModel"]
        cfg_file = folder / "transformer" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(_class_name="Transformer2DModel", _diffusers_version="0.12.0.dev0", cross_attention_dim=None,
                   num_vector_embeds=None, only_cross_attention=False, use_linear_projection=False)
        cfg_file.write_text(json.dumps(cfg, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_transformer_folder(folder: str | Path, **transformer_kwargs) -> Path:
    """A transformer-only folder (``config.json`` + safetensors), pixel space unless told otherwise."""
    kwargs = {"in_channels": 3, "learned_sigma": False, **transformer_kwargs}
    make_transformer(**kwargs).save_pretrained(Path(folder), safe_serialization=True)
    return Path(folder)


def imagenet_like_labels(n: int = 1000, named: dict[int, str] | None = None) -> dict[int, str]:
    """An ``id2label`` of ``n`` classes like ImageNet's (aliases after commas), with ``named`` overrides."""
    labels = {k: f"class {k:04d}, synthetic category {k}" for k in range(n)}
    labels.update(named or {})
    return labels


def _shape_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A simple coloured picture of one of a few kinds, so a classifier has something to learn."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    base = rng.uniform(0.0, 0.3, size=3)
    fg = rng.uniform(0.6, 1.0, size=3)
    if kind == "stripes":
        mask = (np.sin(xx * 30 + rng.uniform(0, 6)) > 0)
    elif kind == "blob":
        mask = (xx ** 2 + yy ** 2) < rng.uniform(0.04, 0.12)
    else:  # "checker"
        mask = ((np.floor(xx * 6) + np.floor(yy * 6)) % 2) == 0
    img = np.where(mask[..., None], fg, base) + rng.normal(0, 0.03, size=(size, size, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def write_team_folder(folder: str | Path, classes: dict[str, str] | None = None, per_class: int = 4,
                      size: int = 40, seed: int = 0, odd_files: bool = True) -> Path:
    """A class-folder image set named after a team's own categories (``{folder name: picture kind}``).

    With ``odd_files``: a grayscale PNG, an RGBA PNG, a JPEG of another size, a corrupt file, an empty
    file and a text file among the images, and a hidden file, as real folders have.
    """
    folder = Path(folder)
    classes = classes or {"Red Stripes": "stripes", "blob_things": "blob", "chequer-board (v2)": "checker"}
    rng = np.random.default_rng(seed)
    for name, kind in classes.items():
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _shape_image(kind, size, rng).save(d / f"img {i:02d}.png")
    if odd_files:
        first = folder / next(iter(classes))
        _shape_image(classes[first.name], size, rng).convert("L").save(first / "gray.png")
        _shape_image(classes[first.name], size, rng).convert("RGBA").save(first / "alpha.png")
        _shape_image(classes[first.name], size + 24, rng).save(first / "photo.JPG", quality=90)
        (first / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        (first / "empty.jpg").write_bytes(b"")
        (first / "notes.txt").write_text("not an image\n")
        (first / ".DS_Store").write_bytes(b"\x00\x01")
    return folder


if __name__ == "__main__":  # pragma: no cover - a by-hand helper
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "standin")
    print(write_latent_pipeline(out / "latent-dit"))
    print(write_team_folder(out / "images"))
