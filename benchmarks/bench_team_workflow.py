"""Wall-clock of each step of the README's "Your own model" walkthrough on a DiT-S/2-sized model.

    python benchmarks/bench_team_workflow.py [--work /tmp/tclab-team] [--per-class 12] [--threads 2]

Builds, in a scratch folder outside the repository, a latent ``DiTPipeline`` whose transformer has
DiT-S/2's shape (12 blocks, width 384, 6 heads, patch 2, 32x32x4 latents = 16x16 tokens; random
weights: nothing is downloaded) with a small random ``AutoencoderKL`` (8x downsampling, so 256 px
images; a real SD-VAE decodes more slowly), and a 3-class image folder named after made-up team
categories, then runs every step of the walkthrough with the ``tclab`` command from that folder, as a
user would, and prints one line per step: the command and its wall-clock. Every step must exit 0.
The figures go to the README and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from standins import write_latent_pipeline, write_team_folder  # noqa: E402

STEPS = [
    ("check the images", ["check-images", "our-set"]),
    ("01 redundancy", ["run", "01", "-p", "model", "our-dit", "-p", "images", "our-set"]),
    ("train both predictors", ["train-predictor", "--model", "our-dit", "--kind", "both", "--images", "our-set",
                               "--num-steps", "10", "--max-gap", "3"]),
    ("02 which tokens", ["run", "02", "-p", "model", "our-dit", "-p", "images", "our-set"]),
    ("03 which blocks", ["run", "03", "-p", "model", "our-dit", "-p", "images", "our-set"]),
    ("04 when (TPRR)", ["run", "04", "-p", "model", "our-dit", "-p", "images", "our-set"]),
    ("05 in-house report", ["run", "05", "-p", "model", "our-dit", "-p", "images", "our-set"]),
    ("list the artefacts", ["artefacts"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/tclab-team-bench", help="scratch folder (emptied first)")
    p.add_argument("--per-class", type=int, default=12, help="images per class folder")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_latent_pipeline(work / "our-dit", id2label=None, num_layers=12, heads=6, head_dim=64, sample_size=32,
                          patch_size=2, downsample=8)
    write_team_folder(work / "our-set", per_class=a.per_class, size=288)
    env = {**os.environ, "TCLAB_HOME": str(work / "home"), "OMP_NUM_THREADS": str(a.threads)}
    env.pop("TCLAB_REPORTS_DIR", None)
    exe = shutil.which("tclab") or "tclab"
    print(f"work folder {work}; {a.threads} threads; DiT-S/2-sized latent DiTPipeline (random weights), "
          f"{3 * a.per_class} images of 288 px in 3 class folders (+ 6 odd files)")
    total = 0.0
    for name, args in STEPS:
        t0 = time.perf_counter()
        proc = subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        total += dt
        status = "ok" if proc.returncode == 0 else f"EXIT {proc.returncode}"
        print(f"{name:24s} {dt:8.1f} s  {status:8s} tclab {' '.join(args)}", flush=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
            sys.exit(1)
    print(f"{'total':24s} {total:8.1f} s")


if __name__ == "__main__":
    main()
