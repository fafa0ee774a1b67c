"""Static shapes and torch.compile: what do sync-free, fixed-shape cached steps and inductor buy?

Spec ``shared/docs/tokencache.md`` section 6 ("Static shapes"); ``tclab.cache.static``. On the embedded
model (``shapes-dit``) with the learned-static TokenCache configuration (``rho=0.1``, ``tprr(6, 4, 0.5)``,
``kv="all"``, global selection) this prints, each variant timed interleaved with the others in one process
(round 0 a warm-up, then the median of ``--repeats`` rounds):

(a) one full forward (``2 * --batch`` rows: the CFG batch of the sampling run), eager vs compiled;
(b) one cached forward, a steady-state one (the run's second cached step, after a full step and a first
    cached step): the dynamic engine (eager), static shapes (eager), static shapes compiled;
(c) a whole ``--steps``-step DDIM sampling run of ``--batch`` images with guidance 4: full compute eager and
    compiled, cached dynamic (eager), cached static (eager), cached static compiled;
(d) quality on ``--quality-samples`` samples, paired against the same-seed full-compute images (eager):
    PSNR of the dynamic engine, of static shapes (the static-shape approximation of global selection:
    one set of per-block counts for every row and step) and of static shapes compiled.

Ratios are against the eager full compute of the same part. Compile time is printed separately: the
warm-up round of a compiled variant minus its median (the graphs are compiled on those first calls;
parts share graphs where their shapes and guards agree, so (c) mostly reuses what (b) compiled).
Compiled means ``tclab.cache.static.compile_transformer``: inductor, ``dynamic=False``; the engine's
decisions stay eager. On CPU inductor generates C++ (gcc) kernels.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --repeats 3 [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from typing import Callable

import torch

from tclab.cache import TokenCacheConfig, apply_token_cache
from tclab.cache.static import compile_transformer
from tclab.labels import balanced_labels
from tclab.metrics import psnr
from tclab.models import NULL_CLASS, load_dit, make_scheduler
from tclab.sampling import SampleConfig, sample
from tclab.steps import StepContext, next_run_id, running

CONFIG = TokenCacheConfig(scorer="learned-static", rho=0.1, schedule="tprr", k1=6, k2=4, split=0.5, kv="all",
                          selection="global")
STATIC = dataclasses.replace(CONFIG, static_shapes=True)
#: variant -> (token cache config or None for full compute, compiled)
VARIANTS = {"full eager": (None, False), "full compiled": (None, True), "cached dynamic eager": (CONFIG, False),
            "cached static eager": (STATIC, False), "cached static compiled": (STATIC, True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(model) -> dict[str, tuple]:
    """One copy of the model per variant, its cache applied (and compiled) once, for the whole benchmark:
    dynamo's graphs of a cached transformer belong to the hooks that apply_token_cache made, so applying the
    cache again would compile again. Returns name -> (LoadedDiT, TokenCacheState or None)."""
    out = {}
    for name, (config, compiled) in VARIANTS.items():
        m = model if name == "full eager" else dataclasses.replace(model, transformer=copy.deepcopy(model.transformer))
        state = apply_token_cache(m.transformer, config) if config is not None else None
        if compiled:
            compile_transformer(m.transformer)
        out[name] = (m, state)
    return out


def interleaved(variants: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, dict]:
    """Each variant returns (seconds of the part it measures, seconds of everything it ran); round 0 is the
    warm-up, where compiled variants compile: its total minus the median total is the compile time."""
    times = {name: [] for name in variants}
    for _ in range(repeats + 1):
        for name, fn in variants.items():
            times[name].append(fn())
    return {name: {"median": statistics.median(m for m, _ in t[1:]), "all": [m for m, _ in t[1:]],
                   "compile": t[0][1] - statistics.median(total for _, total in t[1:])} for name, t in times.items()}


def report(part: str, res: dict[str, dict], baseline: str = "full eager") -> list[dict]:
    base = res[baseline]["median"]
    rows = []
    for name, r in res.items():
        compile_s = r["compile"] if VARIANTS[name][1] else None
        extra = f"   compile {compile_s:7.2f} s" if compile_s is not None else ""
        print(f"  {name:<28} {r['median'] * 1e3:10.2f} ms   ratio {r['median'] / base:6.3f}{extra}", flush=True)
        rows.append({"part": part, "variant": name, "median_s": r["median"], "ratio": r["median"] / base,
                     "compile_s": compile_s, "seconds": r["all"]})
    return rows


# ---- (a) and (b): single forwards -------------------------------------------------------------------------

@torch.no_grad()
def bench_forwards(model, variants, batch: int, repeats: int, steps: int) -> list[dict]:
    device = model.transformer.device
    rows = 2 * batch  # a CFG batch: conditional rows, then their unconditional copies
    g = torch.Generator().manual_seed(0)
    C, S = model.transformer.config.in_channels, model.transformer.config.sample_size
    x = torch.randn(rows, C, S, S, generator=g).to(device)
    y = torch.cat([balanced_labels(batch, model.num_classes), torch.full((batch,), NULL_CLASS)]).to(device)
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(steps)
    ts = sched.timesteps[:3]  # step 0 full; steps 1, 2 cached under tprr(6, 4)

    def timed(tr, t) -> float:
        _sync(device)
        t0 = time.perf_counter()
        tr(x, timestep=t[None].to(device).expand(rows), class_labels=y)
        _sync(device)
        return time.perf_counter() - t0

    def full(name):
        def fn():
            dt = timed(variants[name][0].transformer, ts[0])
            return dt, dt
        return fn

    def cached(name):
        def fn():
            tr, run_id = variants[name][0].transformer, next_run_id()  # a new run: the cache starts afresh
            dts = []
            for s in range(3):
                with running(StepContext(step=s, t=float(ts[s]), num_steps=steps, cfg=True, batch=batch,
                                         run_id=run_id)):
                    dts.append(timed(tr, ts[s]))
            assert not variants[name][1].history[-1].full
            return dts[-1], sum(dts)  # measured: the run's second cached step (steady state)
        return fn

    print(f"\n(a) one full forward, {rows} rows", flush=True)
    out = report("a", interleaved({"full eager": full("full eager"), "full compiled": full("full compiled")}, repeats))
    print(f"\n(b) one cached forward (steady state: the run's second cached step), {rows} rows", flush=True)
    res = interleaved({"full eager": full("full eager"), **{n: cached(n) for n in VARIANTS if n.startswith("cached")}},
                      repeats)
    return out + report("b", res)


# ---- (c) a whole sampling run --------------------------------------------------------------------------------

@torch.no_grad()
def bench_sampling(variants, batch: int, repeats: int, steps: int, guidance: float) -> list[dict]:
    model = variants["full eager"][0]
    labels = balanced_labels(batch, model.num_classes)
    sc = SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=batch, seed=0)

    def go(name):
        def fn():
            m = variants[name][0]
            _sync(m.transformer.device)
            t0 = time.perf_counter()
            sample(m, labels, sc, progress=False)
            _sync(m.transformer.device)
            dt = time.perf_counter() - t0
            return dt, dt
        return fn

    print(f"\n(c) a whole sampling run: {steps} DDIM steps, {batch} images, guidance {guidance}", flush=True)
    return report("c", interleaved({name: go(name) for name in VARIANTS}, repeats))


# ---- (d) quality ---------------------------------------------------------------------------------------------

@torch.no_grad()
def bench_quality(variants, n: int, steps: int, guidance: float) -> list[dict]:
    model = variants["full eager"][0]
    labels = balanced_labels(n, model.num_classes)
    sc = SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=n, seed=1)
    full = sample(model, labels, sc, progress=False).images
    print(f"\n(d) quality: PSNR against full compute (eager, same seeds), {n} samples", flush=True)
    rows, images = [], {}
    for name in ("full compiled", "cached dynamic eager", "cached static eager", "cached static compiled"):
        m, state = variants[name]
        images[name] = sample(m, labels, sc, progress=False).images
        p = psnr(images[name], full)
        kept = ""
        if state is not None:
            run = [r for r in state.history if r.run_id == state.history[-1].run_id and not r.full]
            kept = "   kept per block, first cached step (mean over rows): " + \
                " ".join(f"{k:.2f}" for k in run[0].kept_per_block)
        print(f"  {name:<28} PSNR {p.mean():6.2f} dB (min {p.min():6.2f}){kept}", flush=True)
        rows.append({"part": "d", "variant": name, "psnr_mean": float(p.mean()), "psnr_min": float(p.min())})
    d = (images["cached static compiled"] - images["cached static eager"]).abs().max().item()
    print(f"  static compiled vs static eager: max |difference| {d:.2e} (images in [-1, 1])", flush=True)
    rows.append({"part": "d", "variant": "static compiled vs eager, max abs diff", "value": d})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-dit")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up round (median)")
    ap.add_argument("--batch", type=int, default=4, help="images of the sampling run (forwards: 2x rows, CFG)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--quality-samples", type=int, default=8)
    ap.add_argument("--json", help="also write all rows as JSON")
    args = ap.parse_args(argv)

    model = load_dit(args.model)
    tr = model.transformer
    print(f"model {model.name}: {len(tr.transformer_blocks)} blocks, {(tr.config.sample_size // tr.config.patch_size) ** 2}"
          f" tokens, width {tr.inner_dim}; device {tr.device}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s); config {CONFIG.scorer}, rho {CONFIG.rho}, tprr({CONFIG.k1}, {CONFIG.k2}, {CONFIG.split}), "
          f"kv {CONFIG.kv}, selection {CONFIG.selection}; {args.repeats} repeats, interleaved", flush=True)
    t0 = time.perf_counter()
    variants = build_variants(model)
    rows = bench_forwards(model, variants, args.batch, args.repeats, args.steps)
    rows += bench_sampling(variants, args.batch, args.repeats, args.steps, args.guidance)
    rows += bench_quality(variants, args.quality_samples, args.steps, args.guidance)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model.identity(), "args": vars(args), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "config": CONFIG.to_dict(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
