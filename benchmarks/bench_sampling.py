"""Sampling wall-clock of the embedded model: N images x S steps (CFG on), median of repeats.

    python benchmarks/bench_sampling.py [--model shapes-dit] [--samples 8] [--steps 50] [--repeats 3] [--device cuda]

Prints the median, the per-step time and the transformer's share; figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tclab.models import load_dit
from tclab.sampling import SampleConfig, sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-dit")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the total is timed after the images reach the host)")
    a = p.parse_args()
    model = load_dit(a.model).to(a.device)
    labels = torch.arange(a.samples) % model.num_classes
    cfg = SampleConfig(num_steps=a.steps, guidance_scale=a.guidance, batch_size=a.samples)
    sample(model, labels, SampleConfig(num_steps=2, batch_size=a.samples), progress=False)  # warm-up
    runs = [sample(model, labels, cfg, progress=False) for _ in range(a.repeats)]
    total = statistics.median(r.seconds for r in runs)
    tr = statistics.median(r.transformer_seconds for r in runs)
    on_gpu = a.device.startswith("cuda")
    where = torch.cuda.get_device_name(a.device) if on_gpu else f"torch threads {torch.get_num_threads()}"
    share = "" if on_gpu else f", transformer {100 * tr / total:.0f}% of it"  # no sync per call on a GPU
    print(f"{model.name}: {a.samples} images x {a.steps} steps (guidance {a.guidance}), {where}: median "
          f"{total:.2f} s over {a.repeats} runs ({1000 * total / a.steps:.1f} ms/step{share})")


if __name__ == "__main__":
    main()
