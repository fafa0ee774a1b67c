"""Every method in one harness on the embedded model: FLOPs, wall-clock, realisation, quality.

    python benchmarks/bench_methods.py [--steps 50] [--batch 8] [--repeats 3] [--quality-samples 48]
                                       [--only NAME ...] [--markdown benchmarks/methods_table.md]

For each method (full compute, fewer steps, FORA, TokenCache variants, heuristic scorers, external
peers) on ``shapes-dit`` at ``--steps`` DDIM steps with guidance 4:

- FLOP ratio: FLOPs counted on what actually ran over a whole sampling run of ``--batch`` images
  (``tclab.metrics.count_flops``), divided by the full-compute run's;
- time ratio: median wall-clock of ``--repeats`` runs of ``--batch`` images, the full-compute baseline
  re-run in the same process and interleaved with the method (full, method, full, method, ...);
- realisation = (1 - time ratio) / (1 - FLOP ratio) (1 = every FLOP saved is time saved);
- quality on ``--quality-samples`` class-balanced samples, same seeds as full compute: PSNR / SSIM
  against the full-compute images, and class-consistency by the shipped classifier.

A method that cannot run (an external peer that is not installed, say) is listed with its reason.
The table it prints is what ``benchmarks/RESULTS.md`` records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from tclab.cache import TokenCacheConfig, apply_caching
from tclab.cache.config import fora_config
from tclab.cache.methods import method_config
from tclab.cache.peers import peer_label, peer_names
from tclab.classifier import ShapesClassifier, class_consistency
from tclab.labels import balanced_labels
from tclab.metrics import count_flops, paired_quality
from tclab.models import load_dit
from tclab.sampling import SampleConfig, sample


@dataclass
class Method:
    """A way to sample: ``attach(model) -> detach callable`` around tclab's sampler, or fewer steps."""

    name: str
    family: str
    attach: Callable | None = None  # model -> detach(); None = plain model
    steps: int | None = None  # override of the number of steps (the fewer-steps baseline)
    note: str = ""


def caching(config) -> Callable:
    """Attach any caching method's config (TokenCache, FORA, a peer's) through the one interface."""
    def attach(model):
        return apply_caching(model, config).remove

    return attach


def token_cache(config: TokenCacheConfig) -> Callable:
    return caching(config)


def peer(name: str, **options) -> Callable:
    return caching(method_config(name, **options))


def build_methods(steps: int) -> list[Method]:
    tc = dict(kv="kept", selection="global", schedule="tprr", k1=3, k2=2, split=0.5)
    out = [Method("full compute", "reference")]
    for n in (25, 17):
        out.append(Method(f"fewer steps ({n})", "baseline", steps=n))
    for k in (2, 3):
        out.append(Method(f"FORA (interval {k})", "baseline", token_cache(fora_config(k))))
    for scorer, rhos in (("learned-static", (0.5, 0.25, 0.1)), ("learned-dynamic", (0.25,)),
                         ("prev-change", (0.5, 0.25, 0.1))):
        for rho in rhos:
            out.append(Method(f"TokenCache {scorer} rho={rho}", "tokencache",
                              token_cache(TokenCacheConfig(rho=rho, scorer=scorer, **tc))))
    # Fewer full steps: where a 2x wall-clock saving has to come from (with TPRR(3, 2) ~42% of the
    # steps are full, which caps the saving near 2x however few tokens cached steps compute).
    for sched, label in ((dict(schedule="tprr", k1=5, k2=3), "tprr(5,3)"),
                         (dict(schedule="round-robin", interval=4), "round-robin(4)")):
        for rho in (0.25, 0.1):
            for kv in ("kept", "all"):
                out.append(Method(f"TokenCache learned-static {label} rho={rho}" + (" kv=all" if kv == "all" else ""),
                                  "tokencache", token_cache(TokenCacheConfig(rho=rho, scorer="learned-static",
                                                                             **{**tc, **sched, "kv": kv}))))
    out.append(Method("TokenCache learned-static rho=0.25 kv=all", "tokencache",
                      token_cache(TokenCacheConfig(rho=0.25, scorer="learned-static", **{**tc, "kv": "all"}))))
    for scorer in ("toca", "random", "oracle"):
        out.append(Method(f"scorer {scorer} rho=0.25", "heuristic",
                          token_cache(TokenCacheConfig(rho=0.25, scorer=scorer, **tc))))
    out += [Method(peer_label(name), "peer", peer(name)) for name in peer_names()]  # every registered peer
    return out


@dataclass
class Row:
    name: str
    family: str
    flop_ratio: float = float("nan")
    time_ratio: float = float("nan")
    t_method: float = float("nan")
    t_full: float = float("nan")
    psnr: float = float("nan")
    ssim: float = float("nan")
    class_consistency: float = float("nan")
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def realisation(self) -> float:
        if not self.flop_ratio < 1:
            return float("nan")
        return (1 - self.time_ratio) / (1 - self.flop_ratio)


def run_method(model, method: Method, labels, cfg: SampleConfig, progress: bool = False):
    """Sample ``labels`` with ``method`` attached (and removed afterwards, whatever happens)."""
    detach = method.attach(model) if method.attach else None
    try:
        c = cfg if method.steps is None else SampleConfig(**{**cfg.__dict__, "num_steps": method.steps})
        return sample(model, labels, c, progress=progress)
    finally:
        if detach is not None:
            detach()


def measure(model, method: Method, args, full_flops: float, full_images, labels_q, clf) -> Row:
    row = Row(method.name, method.family)
    cfg = SampleConfig(num_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch, seed=args.seed)
    labels_t = balanced_labels(args.batch, model.num_classes)
    try:
        with count_flops() as fc:
            run_method(model, method, labels_t, cfg)
        row.flop_ratio = fc.result.flops / full_flops
        full_m = Method("full compute", "reference")
        t_full, t_meth = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run_method(model, full_m, labels_t, cfg)
            t_full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_method(model, method, labels_t, cfg)
            t_meth.append(time.perf_counter() - t0)
        row.t_full, row.t_method = statistics.median(t_full), statistics.median(t_meth)
        row.time_ratio = row.t_method / row.t_full
        qcfg = SampleConfig(**{**cfg.__dict__, "batch_size": 64})
        imgs = run_method(model, method, labels_q, qcfg).images
        q = paired_quality(imgs, full_images)
        row.psnr, row.ssim = q["psnr"], q["ssim"]
        row.class_consistency = class_consistency(clf, imgs, labels_q, model.class_names)["accuracy"]
    except Exception as e:  # a method that cannot run is reported, never dropped
        row.error = f"{type(e).__name__}: {e}"
        if args.verbose:
            traceback.print_exc()
    return row


def format_table(rows: list[Row], args) -> str:
    head = ("| method | FLOP ratio | time ratio | realisation | speed-up (time) | PSNR vs full (dB) | SSIM | "
            "class-consistency |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | — | — | — | — | — | — | cannot run: {r.error} |")
            continue
        real = "—" if r.name == "full compute" else f"{r.realisation:.2f}"
        lines.append(f"| {r.name} | {r.flop_ratio:.3f} | {r.time_ratio:.3f} | {real} | {1 / r.time_ratio:.2f}x | "
                     f"{'ref' if r.name == 'full compute' else f'{r.psnr:.2f}'} | {r.ssim:.3f} | "
                     f"{r.class_consistency:.3f} |")
    return "\n".join(lines)


def merge_tables(paths: list[str], args) -> str:
    """One table from several runs' JSON (full compute once, then methods in the harness's order)."""
    order = [m.name for m in build_methods(args.steps)]
    rows: dict[str, Row] = {}
    for path in paths:
        with open(path) as f:
            for d in json.load(f)["rows"]:
                d.pop("realisation", None)
                rows.setdefault(d["name"], Row(**d))
    return format_table(sorted(rows.values(), key=lambda r: order.index(r.name) if r.name in order else 99), args)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-dit")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=8, help="images per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality-samples", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="substrings of method names to run (full compute always runs)")
    p.add_argument("--skip", nargs="*", help="substrings of method names not to run")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--json", help="also write all rows as JSON")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only print the table of earlier runs' --json files (e.g. parts run on two cores)")
    args = p.parse_args(argv)
    if args.merge:
        print(merge_tables(args.merge, args))
        return

    model = load_dit(args.model)
    clf = ShapesClassifier.load()
    methods = build_methods(args.steps)
    if args.only:
        methods = [m for m in methods if m.name == "full compute" or any(s in m.name for s in args.only)]
    if args.skip:
        methods = [m for m in methods if not any(s in m.name for s in args.skip)]
    labels_t = balanced_labels(args.batch, model.num_classes)
    labels_q = balanced_labels(args.quality_samples, model.num_classes)
    cfg = SampleConfig(num_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch, seed=args.seed)
    sample(model, labels_t, SampleConfig(**{**cfg.__dict__, "num_steps": 3}), progress=False)  # warm-up
    with count_flops() as fc:
        sample(model, labels_t, cfg, progress=False)
    full_flops = fc.result.flops
    full_images = sample(model, labels_q, SampleConfig(**{**cfg.__dict__, "batch_size": 64}), progress=False).images
    print(f"model {model.name}, weights sha256 {model.identity()['weights_sha256'][:16]}")
    print(f"{model.name}: {args.steps} steps, guidance {args.guidance}, timing batch {args.batch} x {args.repeats} "
          f"repeats (interleaved with full compute), quality on {args.quality_samples} samples; torch threads "
          f"{torch.get_num_threads()}; full compute {full_flops / args.batch / 1e9:.1f} GFLOPs per image", flush=True)
    rows = []
    for m in methods:
        r = measure(model, m, args, full_flops, full_images, labels_q, clf)
        rows.append(r)
        status = r.error or (f"FLOPs {r.flop_ratio:.3f} time {r.time_ratio:.3f} real {r.realisation:.2f} "
                             f"PSNR {r.psnr:.2f} cc {r.class_consistency:.3f}")
        print(f"  {m.name:<45} {status}", flush=True)
        if args.json:  # after every method, so a long run that is stopped keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"model": model.identity(), "args": vars(args),
                           "rows": [{**r.__dict__, "realisation": r.realisation} for r in rows]}, f, indent=2)
    table = format_table(rows, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
