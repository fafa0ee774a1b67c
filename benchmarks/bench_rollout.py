"""Does rollout training make a better Cache Predictor than one-step pairs, at equal training time?
(issue #17 item 3; spec section 6, "Rollout training".)

On the embedded ``shapes-dit`` this trains two ``learned-static`` predictors on the same trajectories:

- **one-step**: today's objective (``rollout=0``: cache from step s - 1, loss at step s) for
  ``--train-steps`` optimiser steps; its training seconds are measured (the optimiser loop only);
- **rollout**: windows of up to ``--rollout`` cached steps after each full step of the schedule the cache
  runs with (TPRR(6, 4, 0.5): 5 cached steps after a full step in phase 1, 3 in phase 2), trained until the
  same number of seconds has passed (``PredictorTrainConfig.max_seconds``), so it gets fewer, dearer steps.

Both go to a temporary folder (never ``tclab/weights`` or the artefact store). Each is then run by the engine
exactly as it would be used, ``TokenCacheConfig(scorer=<predictor>, rho=R, schedule="tprr", k1=6, k2=4,
split=0.5, kv="all", selection="global")``, on ``--samples`` class-balanced images from noise (seed
``--eval-seed``: other noise than the training trajectories', seed 0), and every image is compared with the
same-seed full-compute image: PSNR (dB, higher = closer to full compute), mean with a 95 % percentile
bootstrap interval, and the paired difference rollout - one-step with its paired-bootstrap interval and
sign-flip p-value (``tclab.stats.paired_difference``; "distinguishable" only when both say so).

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py                      # 300 one-step steps, 12 images
    OMP_NUM_THREADS=1 python benchmarks/bench_rollout.py --samples 8 --train-steps 60 --out-json /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
from tclab.cache.predictor import load_predictor, read_predictor_meta
from tclab.cache.train import PredictorTrainConfig, collect_trajectories, parse_schedule_spec, train_predictor
from tclab.labels import balanced_labels
from tclab.metrics import psnr
from tclab.models import load_dit
from tclab.sampling import SampleConfig, sample
from tclab.stats import bootstrap_ci, paired_difference


def train_both(model, args, work: Path) -> dict:
    """Train one-step for ``args.train_steps`` steps, then rollout for as many seconds. Returns
    {name: {"path", "seconds", "steps", "final_rel_mse", "final_mean_w"}}."""
    schedule = parse_schedule_spec(args.schedule)
    base = dict(kind="learned-static", num_steps=args.num_steps, guidance_scale=args.guidance, lam=args.lam,
                batch_size=args.batch_size, seed=args.seed, eval_pairs=0, checkpoint_every=10**6)
    one = PredictorTrainConfig(**base, steps=args.train_steps, out=str(work / "one-step.safetensors"))
    print(f"collecting the training trajectories ({one.num_samples} samples x {args.num_steps} steps, CFG rows "
          "both) once for both", flush=True)
    trajs = collect_trajectories(model, one, progress=False)
    out = {}
    path = train_predictor(model, one, progress=False, trajectories=trajs)
    out["one-step"] = _trained(path)
    budget = out["one-step"]["seconds"]
    roll = PredictorTrainConfig(**base, steps=10**6, rollout=args.rollout, schedule=schedule, max_seconds=budget,
                                out=str(work / "rollout.safetensors"))
    path = train_predictor(model, roll, progress=False, trajectories=trajs)
    out["rollout"] = _trained(path)
    for name, r in out.items():
        print(f"  trained {name:<9} {r['steps']:5d} optimiser steps in {r['seconds']:6.1f} s  (final rel. MSE "
              f"{r['final_rel_mse']:.3f}, mean w {r['final_mean_w']:.3f}; its own loss, not comparable across the two)",
              flush=True)
    return out


def _trained(path: Path) -> dict:
    t = read_predictor_meta(path)["train"]
    return {"path": str(path), "seconds": float(t["train_seconds"]), "steps": int(t["optimizer_steps"]),
            "final_rel_mse": t["final_rel_mse"], "final_mean_w": t["final_mean_w"],
            "windows_available": t.get("windows_available")}


def evaluate(model, trained: dict, args) -> dict:
    """PSNR vs full compute of every (predictor, rho), per image."""
    schedule = parse_schedule_spec(args.schedule)
    labels = balanced_labels(args.samples, model.num_classes)
    sc = SampleConfig(num_steps=args.num_steps, guidance_scale=args.guidance, seed=args.eval_seed,
                      batch_size=args.samples)
    t0 = time.perf_counter()
    full = sample(model, labels, sc, progress=False).images
    print(f"full compute: {args.samples} images in {time.perf_counter() - t0:.1f} s", flush=True)
    tr = model.transformer
    per_image: dict[str, dict[str, list[float]]] = {}
    for name, r in trained.items():
        scorer = load_predictor(r["path"], tr)
        per_image[name] = {}
        for rho in args.rhos:
            cfg = TokenCacheConfig(scorer=scorer, rho=rho, schedule=schedule["kind"], k1=schedule["k1"],
                                   k2=schedule["k2"], split=schedule["split"], kv="all", selection="global")
            apply_token_cache(tr, cfg)
            try:
                t0 = time.perf_counter()
                imgs = sample(model, labels, sc, progress=False).images
            finally:
                remove_token_cache(tr)
            per_image[name][str(rho)] = psnr(imgs, full).tolist()
            print(f"  {name:<9} rho {rho:<4g} sampled in {time.perf_counter() - t0:.1f} s", flush=True)
    return per_image


def report(trained: dict, per_image: dict, args) -> dict:
    names = list(trained)
    rows = []
    head = f"| {'predictor':<9} | {'train steps':>11} | {'train s':>7} | {'rho':>4} | PSNR vs full, dB (95% CI) |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for rho in map(str, args.rhos):
        for name in names:
            ci = bootstrap_ci(per_image[name][rho], seed=args.seed)
            rows.append({"predictor": name, "rho": float(rho), **ci.to_dict("psnr"),
                         "train_steps": trained[name]["steps"], "train_seconds": trained[name]["seconds"]})
            lines.append(f"| {name:<9} | {trained[name]['steps']:>11d} | {trained[name]['seconds']:>7.1f} | "
                         f"{float(rho):>4g} | {f'{ci.estimate:6.2f} [{ci.low:6.2f}, {ci.high:6.2f}]':<25} |")
    diffs = []
    lines.append("")
    lines.append(f"paired difference rollout - one-step (same {args.samples} seeds; + = rollout closer to full):")
    for rho in map(str, args.rhos):
        d = paired_difference(per_image["rollout"][rho], per_image["one-step"][rho], seed=args.seed)
        diffs.append({"rho": float(rho), **d.to_dict("psnr_diff")})
        verdict = "distinguishable" if d.distinguishable else "within noise"
        lines.append(f"  rho {float(rho):<4g}: {d.difference.estimate:+6.2f} dB [{d.difference.low:+6.2f}, "
                     f"{d.difference.high:+6.2f}], p = {d.p_value:.3f} ({d.p_method}): {verdict}")
    print("\n" + "\n".join(lines), flush=True)
    return {"rows": rows, "differences": diffs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12, help="class-balanced images per setting (default 12)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="one-step optimiser steps; rollout trains for the seconds they take (default 300)")
    p.add_argument("--rollout", type=int, default=5, help="cached steps per window, at most (default 5)")
    p.add_argument("--schedule", default="tprr:6,4,0.5",
                   help="the cache's schedule, for training windows and sampling alike (tprr only; default "
                        "tprr:6,4,0.5)")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.2, 0.1], help="keep ratios (default 0.2 0.1)")
    p.add_argument("--num-steps", type=int, default=50, help="sampling steps, training and evaluation (default 50)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=4, help="pairs / windows per optimiser step (default 4)")
    p.add_argument("--lam", type=float, default=1.0, help="compute penalty lambda (default 1)")
    p.add_argument("--seed", type=int, default=0, help="training seed (trajectories, init, draws)")
    p.add_argument("--eval-seed", type=int, default=1000, help="noise seed of the evaluation images (default 1000)")
    p.add_argument("--out-json", default=None, help="write the settings, training and per-image results here")
    args = p.parse_args(argv)
    if parse_schedule_spec(args.schedule)["kind"] != "tprr":
        p.error("--schedule: this benchmark runs the cache with tprr (write tprr:K1,K2,SPLIT)")
    torch.manual_seed(0)
    model = load_dit("shapes-dit")
    print(f"{model.name} ({model.source}): {len(model.transformer.transformer_blocks)} blocks, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        trained = train_both(model, args, Path(tmp))
        per_image = evaluate(model, trained, args)
    summary = report(trained, per_image, args)
    if args.out_json:
        payload = {"settings": vars(args), "trained": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                                                       for k, v in trained.items()},
                   "psnr_per_image": per_image, **summary}
        Path(args.out_json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
