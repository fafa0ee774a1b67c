"""How much wall-clock does ``record_token_changes`` add to sampling? (target: at most 3%)

Plain sampling and recorded sampling of the same model, labels and seed run in one process,
interleaved (plain, recorded, plain, recorded, ...) after warm-up, so drift in machine load hits
both alike; the script prints both medians, their ratio and the median of the per-pair ratios.
The recorded time includes entering/leaving the context and building the ``TokenChangeRecord``
(reported separately too). Measure on an idle machine: a busy one makes both medians noisy.

Run from the repository root with tclab importable (``pip install -e .`` or ``PYTHONPATH=.``)::

    PYTHONPATH=. python benchmarks/bench_record_overhead.py          # embedded shapes-dit, 50 steps, 8 samples
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_record_overhead.py --steps 5 --samples 2  # quick
    PYTHONPATH=. python benchmarks/bench_record_overhead.py --model DiT-XL/2 --samples 16 --dtype bfloat16  # GPU

``--model`` takes anything ``tclab.models.load_dit`` takes (``shapes-dit``, a preset such as ``DiT-S/2``,
a local folder) plus ``shapes-dit-untrained``: the embedded architecture with random weights, for
when the embedded weights have not been built yet (timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tclab.models import (LoadedDiT, ModelSpecError, PixelSpaceVAE, default_scheduler_config,
                          embedded_transformer_config, load_dit)
from tclab.record import record_token_changes
from tclab.sampling import SampleConfig, sample

TARGET = 0.03  # recording may add at most 3% wall-clock


def load_model(spec: str, resolution: int, dtype: torch.dtype) -> LoadedDiT:
    """``load_dit(spec)``, plus ``shapes-dit-untrained`` (the embedded architecture, random weights)."""
    if spec == "shapes-dit-untrained":
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        tr = DiTTransformer2DModel(**embedded_transformer_config()).to(dtype).eval().requires_grad_(False)
        return LoadedDiT(name=spec, transformer=tr, vae=PixelSpaceVAE(latent_channels=3),
                         scheduler_config=default_scheduler_config(), trained=False,
                         source="embedded architecture, random weights (UNTRAINED)")
    try:
        return load_dit(spec, resolution=resolution, dtype=dtype)
    except ModelSpecError as e:
        raise SystemExit(f"{e}\n-> until the embedded weights exist, pass --model shapes-dit-untrained "
                         "(same architecture, random weights) or a preset such as --model DiT-S/2") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plain(model, labels, cfg) -> float:
    dev = model.transformer.device
    _sync(dev)
    t0 = time.perf_counter()
    sample(model, labels, cfg, progress=False)
    _sync(dev)
    return time.perf_counter() - t0


def run_recorded(model, labels, cfg, storage_dtype) -> tuple[float, float, object]:
    """Seconds for the whole recorded run, seconds spent building the record, the record."""
    dev = model.transformer.device
    _sync(dev)
    t0 = time.perf_counter()
    with record_token_changes(model.transformer, model_identity=model.identity(),
                              storage_dtype=storage_dtype) as rec:
        sample(model, labels, cfg, progress=False)
    t1 = time.perf_counter()
    record = rec.record
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, record


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes-dit", help="load_dit spec, or shapes-dit-untrained")
    p.add_argument("--resolution", type=int, default=256, help="image size for presets (256 or 512)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--samples", type=int, default=8, help="images per run")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: all)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (> 1 doubles the batch)")
    p.add_argument("--repeats", type=int, default=5, help="timed (plain, recorded) pairs")
    p.add_argument("--warmup", type=int, default=1, help="untimed (plain, recorded) pairs first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--storage", default="float32", choices=["float32", "float16"], help="record storage dtype")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, args.resolution, dtype)
    model.to(args.device)
    labels = [i % model.num_classes for i in range(args.samples)]
    cfg = SampleConfig(num_steps=args.steps, guidance_scale=args.guidance, seed=0,
                       batch_size=args.batch_size or args.samples)
    storage = getattr(torch, args.storage)

    for _ in range(args.warmup):
        run_plain(model, labels, cfg)
        run_recorded(model, labels, cfg, storage)
    plain, recorded, build = [], [], []
    record = None
    for _ in range(args.repeats):
        plain.append(run_plain(model, labels, cfg))
        sec, b, record = run_recorded(model, labels, cfg, storage)
        recorded.append(sec)
        build.append(b)

    med_p, med_r = statistics.median(plain), statistics.median(recorded)
    pair = statistics.median(r / q for r, q in zip(recorded, plain))
    ratio = med_r / med_p
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    out = {
        "model": model.name, "trained": model.trained, "blocks": len(model.transformer.transformer_blocks),
        "token_grid": list(model.token_grid), "device": str(model.transformer.device), "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(), "steps": args.steps, "samples": args.samples,
        "batch_size": cfg.batch_size, "guidance": args.guidance, "repeats": args.repeats,
        "plain_s": plain, "recorded_s": recorded, "build_record_s": build,
        "plain_median_s": med_p, "recorded_median_s": med_r, "ratio_of_medians": ratio,
        "median_pair_ratio": pair, "overhead": ratio - 1, "target": TARGET, "within_target": ratio - 1 <= TARGET,
        "record_mb": record.nbytes / 2 ** 20, "load_average": list(load),
    }
    trained = "trained" if model.trained else "UNTRAINED"
    print(f"model {model.name} ({out['blocks']} blocks, grid {model.token_grid}, {trained}) on {out['device']} "
          f"{args.dtype}, {out['torch_threads']} torch threads")
    print(f"{args.samples} samples x {args.steps} steps, batch {cfg.batch_size}, guidance {args.guidance}; "
          f"{args.warmup} warm-up + {args.repeats} interleaved pairs")
    print(f"plain     median {med_p:8.3f} s   {['%.3f' % x for x in plain]}")
    print(f"recorded  median {med_r:8.3f} s   {['%.3f' % x for x in recorded]}  (of which building the record "
          f"{statistics.median(build) * 1e3:.1f} ms; record {out['record_mb']:.1f} MB)")
    print(f"ratio of medians {ratio:.4f} (median pair ratio {pair:.4f}): overhead {100 * (ratio - 1):+.2f}% "
          f"-> {'within' if out['within_target'] else 'OVER'} the {100 * TARGET:.0f}% target")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}: report figures measured on an idle machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
