"""Does token caching save wall-clock, not just FLOPs? (TokenCache, arXiv 2409.18523; spec section 5.)

For each keep ratio ``rho`` and each ``kv`` mode this prints:

- FLOP ratio  = FLOPs(cached) / FLOPs(full), counted on what actually ran (``FlopCounterMode`` via
  ``tclab.metrics.count_flops``; scorer, selection and K/V-for-all-tokens costs included);
- time ratio  = median wall-clock(cached) / median wall-clock(full), the full-compute baseline re-run
  in the same process, interleaved with the cached runs;
- realisation = (1 - time ratio) / (1 - FLOP ratio): the share of the FLOP saving that shows up as
  time saved (1 = all of it; target >= 0.9).

Two settings:

(a) ``forward``: one cached forward of an architecture preset (default ``DiT-XL/2``, random weights,
    batch 2), right after a full forward that fills the cache: the engine's efficiency on its own.
(b) ``sampling``: a whole sampling run (default: the embedded ``shapes-dit`` at 50 steps; until its
    weights exist, ``DiT-S/2``) with the config's schedule, so full steps dilute the saving.

Where the time goes (``--profile``): gathers/scatters of (B, K, C) rows, the per-block modulation
(computed per block, as the plain DiT does), the index building (one sort and one host sync per
step), scoring/selection, and with ``kv="all"`` the K/V projections of every token, which keep about
2/12 of a block's linear FLOPs however few tokens are kept (so ``kv="all"``'s FLOP ratio has a floor).

Execution paths (``--paths``, comma-separated; default ``dynamic``, which is this script's original
measurement, output unchanged):

- ``dynamic``: the engine's per-row selection (``TokenCacheConfig(static_shapes=False)``), eager;
- ``static``: static-shape cached steps (``static_shapes=True``, ``tclab.cache.static``), eager;
- ``static-compiled``: static shapes, transformer compiled (``tclab.cache.static.compile_transformer``:
  inductor, ``dynamic=False``, ``--compile-mode``);
- ``dynamic-compiled``: the dynamic engine compiled. Only a diagnostic: in a real run every cached step has
  new shapes and recompiles (the engine warns); in the forward part the identical input of every round
  gives the same shapes, so it looks better there than it could in a sampling run.

With any compiled path a compiled full-compute baseline (a copy of the transformer, compiled) runs
interleaved with the eager one; compiled paths are compared with the compiled full compute (the line's
``vs full eager`` gives the ratio to the eager one). A compiled path runs on its own copy of the
transformer with its cache applied once (dynamo's graphs belong to the hooks ``apply_token_cache``
made); eager paths apply and remove their cache around each timed run, as before. Compilation happens
in warm-up calls before the timed rounds: ``compile ... s`` lines give its seconds (the first warm-up
minus the second) and the number of graphs dynamo made; the timed rounds are checked for recompiles.
In the forward part a compiled path's untimed full step runs eagerly (``torch.compiler.set_stance``),
so only its cached-step graph is compiled; in the sampling part everything of a compiled path is
compiled, as a user would run it. FLOP ratios of a compiled path are those of its eager counterpart
(the FLOP counter runs eagerly). ``--cached-step 2`` times the run's second cached step (steady state:
with static shapes the first cached step also fixes the run's counts, one host sync) instead of its
first. Times are taken with ``torch.cuda.synchronize`` around each timed call on a CUDA device.
``--out`` is rewritten after every measured setting, so a run cut short keeps what it measured.

Develop with small settings (``--small``); the reference measurement wants an idle machine::

    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py --small     # (PYTHONPATH=. if tclab is not installed)
    python benchmarks/bench_cache.py --part forward --repeats 7
    python benchmarks/bench_cache.py --part sampling --steps 50 --repeats 3
    python benchmarks/bench_cache.py --part forward --forward-batch 8 --kv all --rhos 0.25 0.1 --device cuda \\
        --paths dynamic,static,static-compiled --cached-step 2      # benchmarks/gpu_check.sh runs this
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
from tclab.cache.static import compile_transformer
from tclab.metrics import count_flops
from tclab.models import EMBEDDED_DIR, load_dit
from tclab.sampling import SampleConfig, sample

#: execution paths of a cached forward / run (module docstring, ``--paths``)
PATHS = ("dynamic", "static", "dynamic-compiled", "static-compiled")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_paths(text: str) -> list[str]:
    """``"dynamic,static-compiled"`` -> ``["dynamic", "static-compiled"]`` (order kept, duplicates dropped)."""
    paths = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise argparse.ArgumentTypeError(f"unknown path(s) {bad or text!r}; choose from {', '.join(PATHS)}")
    return paths


def _static(path: str) -> bool:
    return path.startswith("static")


def _compiled(path: str) -> bool:
    return path.endswith("-compiled")


def _graphs() -> int:
    """Graphs dynamo has made in this process (-1 when this torch does not say)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return -1


def _compile(module, mode: str | None) -> None:
    """``compile_transformer`` with dynamo's per-function graph limit raised: every compiled copy (full
    compute, one per path and setting) adds graphs to the same functions, past the default of 8."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    compile_transformer(module, mode=mode)


def _eager():
    """Run a compiled module eagerly inside this context (``torch.compiler.set_stance``; a no-op on a torch
    without it, where the call then runs compiled)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def _warm(fn, device: torch.device) -> tuple[float, int, float]:
    """Two warm-up calls of a compiled variant: (compile seconds = first - second, graphs made, second)."""
    g0 = _graphs()
    secs = []
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        secs.append(time.perf_counter() - t0)
    return secs[0] - secs[1], (_graphs() - g0) if g0 >= 0 else -1, secs[1]


def realisation(flop_ratio: float, time_ratio: float) -> float:
    return (1 - time_ratio) / (1 - flop_ratio) if flop_ratio < 1 else float("nan")


def _row(label: str, flop_ratio: float, t_cached: float, t_full: float, extra: str = "", width: int = 22) -> dict:
    tr = t_cached / t_full
    r = realisation(flop_ratio, tr)
    print(f"  {label:<{width}} FLOP ratio {flop_ratio:6.3f}  time ratio {tr:6.3f}  realisation {r:6.2f}  "
          f"(cached {t_cached * 1e3:8.1f} ms, full {t_full * 1e3:8.1f} ms){extra}", flush=True)
    return {"label": label, "flop_ratio": flop_ratio, "time_ratio": tr, "realisation": r,
            "t_cached": t_cached, "t_full": t_full}


# ---- (a) one cached forward --------------------------------------------------------------------------

@torch.no_grad()
def _full_compiled_row(med: dict, kv: str, rho: float, width: int, **extra) -> dict:
    """Print and return the row of the compiled full run against the eager one (medians ``med``)."""
    tc, te = med["full-compiled"], med["full"]
    print(f"  {f'kv={kv} rho={rho} full-compiled':<{width}} time ratio vs full eager {tc / te:6.3f}  "
          f"(compiled {tc * 1e3:8.1f} ms, eager {te * 1e3:8.1f} ms)", flush=True)
    return {"label": f"kv={kv} rho={rho} full-compiled", "path": "full-compiled", "kv": kv, "rho": rho,
            "flop_ratio": 1.0, "time_ratio": tc / te, "t_cached": tc, "t_full": te, **extra}


def _path_variants(configs: dict, eager, compiled, device, label: str, check=None) -> tuple[dict, dict]:
    """The timed callables of each cached path: ``eager(config)``, or ``compiled(config)`` warmed up first
    (its compilation outside the timed rounds; ``check(path, fn)`` gives the largest difference from its
    eager twin). A path that fails to compile is dropped with a message. Returns (variants, compile info)."""
    variants, info = {}, {}
    for p, config in configs.items():
        if not _compiled(p):
            variants[p] = eager(config)
            continue
        try:
            fn = compiled(config)
            c_s, c_g, _ = _warm(fn, device)
            d = check(p, fn) if check is not None else None
        except Exception as e:  # noqa: BLE001 - report it, keep the other paths
            print(f"  {p} {label} dropped: {type(e).__name__}: {e}", flush=True)
            continue
        info[p] = {"compile_s": c_s, "graphs": c_g, **({} if d is None else {"max_abs_diff_vs_eager": d})}
        print(f"  compile: {p} {label}: {c_s:.1f} s, {c_g} graph(s)"
              + ("" if d is None else f"; images vs its eager path: max |difference| {d:.2e}"), flush=True)
        variants[p] = fn
    return variants, info


def bench_forward(model_spec: str, batch: int, rhos, kvs, repeats: int, device: torch.device, scorer: str,
                  profile: bool = False, resolution: int = 256, paths=("dynamic",), cached_step: int = 1,
                  compile_mode: str | None = None, rows: list | None = None, save=lambda: None) -> list[dict]:
    m = load_dit(model_spec, resolution=resolution)
    tr = m.transformer.to(device)
    cfg = tr.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)
    t = torch.full((batch,), 500, device=device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    paths = list(paths)
    labelled = paths != ["dynamic"] or cached_step != 1  # the original measurement prints as it always did
    n = cached_step + 1  # calls of a run: a full one, then cached ones; the last one is timed
    print(f"(a) one cached forward: {m.name}, batch {batch}, {len(tr.transformer_blocks)} blocks, "
          f"{(cfg.sample_size // cfg.patch_size) ** 2} tokens, device {device}, scorer {scorer}"
          + (f", paths {','.join(paths)}, cached step {cached_step} of the run timed" if labelled else ""), flush=True)

    def plain():
        tr(x, timestep=t, class_labels=y)

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    def eager_cached(config):  # the cache applied for one run and removed again, as this script always did
        def fn():
            apply_token_cache(tr, config)
            for _ in range(n - 1):
                plain()  # the run's full step (and, with --cached-step 2, its first cached step), not timed
            dt = timed(plain)  # the cached step
            remove_token_cache(tr)
            return dt
        return fn

    def compiled_cached(config):  # its own copy, its cache applied once: the graphs belong to these hooks
        mc = copy.deepcopy(tr)
        apply_token_cache(mc, config)
        _compile(mc, compile_mode)

        def call():
            mc(x, timestep=t, class_labels=y)

        def fn():
            with _eager():
                call()  # the run's full step: eager and untimed, so no full-step graph to compile
            for _ in range(n - 2):
                call()
            return timed(call)
        return fn

    with count_flops() as fc:
        plain()
    full_flops = fc.result.flops
    rows = [] if rows is None else rows
    width = 40 if labelled else 22
    full_c = None
    if any(_compiled(p) for p in paths):
        try:
            full_c = copy.deepcopy(tr)
            _compile(full_c, compile_mode)
            c_s, c_g, _ = _warm(lambda: full_c(x, timestep=t, class_labels=y), device)
            print(f"  compile: full forward {c_s:.1f} s, {c_g} graph(s)", flush=True)
            rows.append({"label": "compile full-compiled", "path": "full-compiled", "compile_s": c_s, "graphs": c_g,
                         "batch": batch, "model": m.name})
        except Exception as e:  # noqa: BLE001 - report it and keep the eager measurements
            print(f"  compiled paths dropped: compiling the full forward failed: {type(e).__name__}: {e}", flush=True)
            paths, full_c = [p for p in paths if not _compiled(p)], None
    for kv in kvs:
        for rho in rhos:
            # call 0 of a run is full (fills the cache), calls 1.. cached: an n-step "run" in pipeline mode
            configs = {p: TokenCacheConfig(rho=rho, kv=kv, scorer=scorer, schedule="round-robin", interval=n,
                                           num_steps=n, static_shapes=_static(p)) for p in paths}
            counted = {}  # "dynamic" / "static" -> (FLOP ratio, kept fraction, cache MiB), counted eagerly
            for p, config in configs.items():
                kind = "static" if _static(p) else "dynamic"
                if kind in counted:
                    continue
                try:
                    state = apply_token_cache(tr, config)
                    for _ in range(n - 1):
                        plain()  # full step (and earlier cached steps), not counted
                    with count_flops() as fc:
                        plain()  # the cached step
                    assert state.history[-1].full is False
                    counted[kind] = (fc.result.flops / full_flops, state.history[-1].kept_fraction,
                                     state.cache_bytes() / 2**20)
                except Exception as e:  # noqa: BLE001 - report it, keep the other paths
                    print(f"  {kind} paths kv={kv} rho={rho} dropped: {type(e).__name__}: {e}", flush=True)
                finally:
                    remove_token_cache(tr)
            configs = {p: c for p, c in configs.items() if ("static" if _static(p) else "dynamic") in counted}
            variants = {"full": lambda: timed(plain)}
            if full_c is not None:
                variants["full-compiled"] = lambda: timed(lambda: full_c(x, timestep=t, class_labels=y))
            paths, compiled_info = _path_variants(configs, eager_cached, compiled_cached, device, f"kv={kv} rho={rho}")
            variants.update(paths)
            times = {name: [] for name in variants}
            g0 = _graphs()
            for i in range(repeats + 1):  # interleaved: full, (full compiled,) each path, ...; round 0 is warm-up
                for name, fn in list(variants.items()):
                    try:
                        dt = fn()
                    except Exception as e:  # noqa: BLE001 - drop the failing path, keep the others
                        if name == "full":
                            raise
                        print(f"  {name} kv={kv} rho={rho} dropped: {type(e).__name__}: {e}", flush=True)
                        remove_token_cache(tr)
                        del variants[name], times[name]
                        continue
                    if i:
                        times[name].append(dt)
            med = {name: statistics.median(v) for name, v in times.items()}
            if "full-compiled" in med:
                rows.append(_full_compiled_row(med, kv, rho, width, batch=batch, model=m.name))
            for p in paths:
                if p not in med:
                    continue
                flop_ratio, kept, cache_mb = counted["static" if _static(p) else "dynamic"]
                extra = f"  kept {kept:.3f}, cache {cache_mb:.0f} MiB"
                base = "full-compiled" if _compiled(p) else "full"
                if _compiled(p):
                    extra += f", vs full eager {med[p] / med['full']:.3f}"
                rows.append(_row(f"kv={kv} rho={rho}" + (f" {p}" if labelled else ""), flop_ratio, med[p], med[base],
                                 extra=extra, width=width))
                rows[-1].update(kv=kv, rho=rho, kept=kept, cache_mib=cache_mb)
                if labelled:
                    rows[-1].update(path=p, baseline=base, t_full_eager=med["full"],
                                    t_full_compiled=med.get("full-compiled"), cached_step=cached_step, batch=batch,
                                    model=m.name, seconds=times[p], **compiled_info.get(p, {}))
            if g0 >= 0 and _graphs() > g0:
                print(f"  warning: dynamo made {_graphs() - g0} graph(s) during the timed rounds (a compiled path "
                      "recompiled: its times include compilation)", flush=True)
            del variants
            save()
    if profile:
        _profile_cached_forward(tr, plain, TokenCacheConfig(rho=rhos[-1], kv=kvs[0], scorer=scorer,
                                                            schedule="round-robin", interval=2, num_steps=2))
    return rows


def _profile_cached_forward(tr, call, config) -> None:
    from torch.profiler import ProfilerActivity, profile

    apply_token_cache(tr, config)
    call()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        call()
    remove_token_cache(tr)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\nwhere the time goes in one cached forward (kv={config.kv}, rho={config.rho}):")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


# ---- (b) a whole sampling run ------------------------------------------------------------------------

@torch.no_grad()
def bench_sampling(model_spec: str | None, steps: int, batch: int, guidance: float, rhos, kvs, repeats: int,
                   device: torch.device, scorer: str, schedule: dict, paths=("dynamic",),
                   compile_mode: str | None = None, rows: list | None = None, save=lambda: None) -> list[dict]:
    if model_spec is None:
        model_spec = "shapes-dit" if (EMBEDDED_DIR / "transformer").is_dir() else "DiT-S/2"
    m = load_dit(model_spec).to(device)
    n_classes = m.num_classes
    labels = [i % n_classes for i in range(batch)]
    sc = SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=batch, seed=0)
    paths = list(paths)
    labelled = paths != ["dynamic"]  # the original measurement prints as it always did
    print(f"\n(b) sampling: {m.name} ({'trained' if m.trained else 'UNTRAINED'}), {steps} steps, batch {batch}, "
          f"guidance {guidance}, device {device}, scorer {scorer}, schedule {schedule}"
          + (f", paths {','.join(paths)}" if labelled else ""), flush=True)

    def run(model):
        _sync(device)
        return sample(model, labels, sc, progress=False)

    def plain():
        return run(m)

    def timed(model) -> tuple[float, object]:
        t0 = time.perf_counter()
        res = run(model)
        _sync(device)
        return time.perf_counter() - t0, res

    def eager_cached(config):  # the cache applied for one run and removed again, as this script always did
        def fn():
            apply_token_cache(m.transformer, config)
            out = timed(m)
            remove_token_cache(m.transformer)
            return out
        return fn

    def compiled_copy(config=None):  # its own copy (cache applied once) compiled: the graphs belong to its hooks
        mc = dataclasses.replace(m, transformer=copy.deepcopy(m.transformer))
        if config is not None:
            apply_token_cache(mc.transformer, config)
        _compile(mc.transformer, compile_mode)
        return lambda: timed(mc)

    def max_diff(a, b) -> float:
        return (a.images.float() - b.images.float()).abs().max().item()

    with count_flops() as fc:
        full_res = plain()
    full_flops = fc.result.flops
    rows = [] if rows is None else rows
    width = 40 if labelled else 22
    full_c = None
    if any(_compiled(p) for p in paths):
        try:
            full_c = compiled_copy()
            c_s, c_g, _ = _warm(full_c, device)
            d = max_diff(full_c()[1], full_res)
            print(f"  compile: full run {c_s:.1f} s, {c_g} graph(s); images vs eager: max |difference| {d:.2e}",
                  flush=True)
            rows.append({"label": "compile full-compiled", "path": "full-compiled", "compile_s": c_s, "graphs": c_g,
                         "max_abs_diff_vs_eager": d, "model": m.name})
        except Exception as e:  # noqa: BLE001 - report it and keep the eager measurements
            print(f"  compiled paths dropped: compiling the full run failed: {type(e).__name__}: {e}", flush=True)
            paths, full_c = [p for p in paths if not _compiled(p)], None
    for kv in kvs:
        for rho in rhos:
            configs = {p: TokenCacheConfig(rho=rho, kv=kv, scorer=scorer, static_shapes=_static(p), **schedule)
                       for p in paths}
            counted = {}  # "dynamic" / "static" -> (FLOP ratio, compute fraction, images), counted eagerly
            for p, config in configs.items():
                kind = "static" if _static(p) else "dynamic"
                if kind in counted:
                    continue
                try:
                    state = apply_token_cache(m.transformer, config)
                    with count_flops() as fc:
                        res = sample(m, labels, sc, progress=False)
                    counted[kind] = (fc.result.flops / full_flops, state.summary()["compute_fraction"], res)
                except Exception as e:  # noqa: BLE001 - report it, keep the other paths
                    print(f"  {kind} paths kv={kv} rho={rho} dropped: {type(e).__name__}: {e}", flush=True)
                finally:
                    remove_token_cache(m.transformer)
            configs = {p: c for p, c in configs.items() if ("static" if _static(p) else "dynamic") in counted}
            variants = {"full": lambda: timed(m)}
            if full_c is not None:
                variants["full-compiled"] = full_c
            paths, compiled_info = _path_variants(
                configs, eager_cached, compiled_copy, device, f"kv={kv} rho={rho}",
                check=lambda p, fn: max_diff(fn()[1], counted["static" if _static(p) else "dynamic"][2]))
            variants.update(paths)
            wall = {name: [] for name in variants}
            model_s = {name: [] for name in variants}
            g0 = _graphs()
            for i in range(repeats + 1):  # interleaved; round 0 is warm-up
                for name, fn in list(variants.items()):
                    try:
                        dt, res = fn()
                    except Exception as e:  # noqa: BLE001 - drop the failing path, keep the others
                        if name == "full":
                            raise
                        print(f"  {name} kv={kv} rho={rho} dropped: {type(e).__name__}: {e}", flush=True)
                        remove_token_cache(m.transformer)
                        del variants[name], wall[name], model_s[name]
                        continue
                    if i:
                        wall[name].append(dt)
                        model_s[name].append(res.transformer_seconds)
            med = {k: statistics.median(v) for k, v in wall.items()}
            med_model = {k: statistics.median(v) for k, v in model_s.items()}
            if "full-compiled" in med:
                rows.append(_full_compiled_row(med, kv, rho, width, model=m.name))
            for p in paths:
                if p not in med:
                    continue
                flop_ratio, frac, _ = counted["static" if _static(p) else "dynamic"]
                base = "full-compiled" if _compiled(p) else "full"
                extra = (f"  compute fraction {frac:.3f}, transformer-only time ratio "
                         f"{med_model[p] / med_model[base]:.3f}")
                if _compiled(p):
                    extra += f", vs full eager {med[p] / med['full']:.3f}"
                rows.append(_row(f"kv={kv} rho={rho}" + (f" {p}" if labelled else ""), flop_ratio, med[p], med[base],
                                 extra=extra, width=width))
                rows[-1].update(kv=kv, rho=rho, compute_fraction=frac)
                if labelled:
                    rows[-1].update(path=p, baseline=base, t_full_eager=med["full"],
                                    t_full_compiled=med.get("full-compiled"), model=m.name, steps=steps, batch=batch,
                                    guidance=guidance, seconds=wall[p], **compiled_info.get(p, {}))
            if g0 >= 0 and _graphs() > g0:
                print(f"  warning: dynamo made {_graphs() - g0} graph(s) during the timed rounds (a compiled path "
                      "recompiled: its times include compilation)", flush=True)
            del variants
            save()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["forward", "sampling", "both"], default="both")
    ap.add_argument("--small", action="store_true", help="smoke settings: DiT-S/2 forward, 8-step sampling")
    ap.add_argument("--forward-model", default="DiT-XL/2")
    ap.add_argument("--forward-batch", type=int, default=2)
    ap.add_argument("--sampling-model", default=None, help="default: shapes-dit if its weights exist, else DiT-S/2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    ap.add_argument("--kv", nargs="+", default=["all", "kept"], choices=["all", "kept"])
    ap.add_argument("--scorer", default="prev-change")
    ap.add_argument("--schedule", default="tprr", choices=["tprr", "round-robin"])
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="profile one cached forward of setting (a)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the rows as JSON here (rewritten after every measured setting)")
    ap.add_argument("--paths", type=parse_paths, default=["dynamic"], metavar="P[,P...]",
                    help=f"execution paths to time against full compute, comma-separated, of {', '.join(PATHS)} "
                         "(default: dynamic, the original measurement). static = TokenCacheConfig(static_shapes="
                         "True); *-compiled = tclab.cache.static.compile_transformer, timed against a compiled full "
                         "compute, compile seconds printed apart (module docstring)")
    ap.add_argument("--cached-step", type=int, default=1, choices=[1, 2],
                    help="forward part: time the run's first (default) or second cached step (steady state)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the compiled paths (default: None, inductor's default; e.g. "
                         "max-autotune-no-cudagraphs)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.small:
        a.forward_model, a.forward_batch, a.steps, a.batch, a.repeats = "DiT-S/2", 2, 8, 2, 3
        a.sampling_model = a.sampling_model or "DiT-S/2"
    schedule = {"schedule": a.schedule} if a.schedule == "tprr" else {"schedule": "round-robin",
                                                                     "interval": a.interval}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})" if device.type == "cuda" else ""))
    out = {"meta": {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                    "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}}

    def save() -> None:
        if a.out:
            import json

            a.out.write_text(json.dumps(out, indent=1))

    if a.part in ("forward", "both"):
        out["forward"] = []
        bench_forward(a.forward_model, a.forward_batch, a.rhos, a.kv, a.repeats, device, a.scorer,
                      profile=a.profile, paths=a.paths, cached_step=a.cached_step, compile_mode=a.compile_mode,
                      rows=out["forward"], save=save)
    if a.part in ("sampling", "both"):
        out["sampling"] = []
        bench_sampling(a.sampling_model, a.steps, a.batch, a.guidance, a.rhos, a.kv, a.repeats, device, a.scorer,
                       schedule, paths=a.paths, compile_mode=a.compile_mode, rows=out["sampling"], save=save)
    save()


if __name__ == "__main__":
    main()
