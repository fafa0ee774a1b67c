"""``tclab``: a thin command-line front end; each sub-command calls one package function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_make_images(a: argparse.Namespace) -> int:
    from .shapes import ShapesConfig, write_shapes_dataset

    out = write_shapes_dataset(a.out, ShapesConfig(resolution=a.resolution, per_class=a.per_class, seed=a.seed))
    print(out)
    return 0


def _cmd_train_dit(a: argparse.Namespace) -> int:
    from .train_dit import TrainDiTConfig, train_dit

    cfg = TrainDiTConfig(images=a.images, out=a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed)
    print(train_dit(cfg, resume=a.resume))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tclab", description="Token caching workbench for diffusion transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-images", help="write the synthetic stand-in image set (class sub-folders of PNGs)")
    s.add_argument("out", help="new or empty folder to write")
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--resolution", type=int, default=32)
    s.add_argument("--seed", type=int, default=1)
    s.set_defaults(func=_cmd_make_images)

    s = sub.add_parser("train-dit", help="train the small class-conditional DiT on an image folder")
    s.add_argument("--images", default="data/shapes-train")
    s.add_argument("--out", default="tclab/weights/shapes-dit")
    s.add_argument("--steps", type=int, default=4000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(func=_cmd_train_dit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
