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

Develop with small settings (``--small``); the reference measurement wants an idle machine::

    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py --small     # (PYTHONPATH=. if tclab is not installed)
    python benchmarks/bench_cache.py --part forward --repeats 7
    python benchmarks/bench_cache.py --part sampling --steps 50 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
from tclab.metrics import count_flops
from tclab.models import EMBEDDED_DIR, load_dit
from tclab.sampling import SampleConfig, sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def realisation(flop_ratio: float, time_ratio: float) -> float:
    return (1 - time_ratio) / (1 - flop_ratio) if flop_ratio < 1 else float("nan")


def _row(label: str, flop_ratio: float, t_cached: float, t_full: float, extra: str = "") -> dict:
    tr = t_cached / t_full
    r = realisation(flop_ratio, tr)
    print(f"  {label:<22} FLOP ratio {flop_ratio:6.3f}  time ratio {tr:6.3f}  realisation {r:6.2f}  "
          f"(cached {t_cached * 1e3:8.1f} ms, full {t_full * 1e3:8.1f} ms){extra}", flush=True)
    return {"label": label, "flop_ratio": flop_ratio, "time_ratio": tr, "realisation": r,
            "t_cached": t_cached, "t_full": t_full}


# ---- (a) one cached forward --------------------------------------------------------------------------

@torch.no_grad()
def bench_forward(model_spec: str, batch: int, rhos, kvs, repeats: int, device: torch.device, scorer: str,
                  profile: bool = False, resolution: int = 256) -> list[dict]:
    m = load_dit(model_spec, resolution=resolution)
    tr = m.transformer.to(device)
    cfg = tr.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)
    t = torch.full((batch,), 500, device=device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    print(f"(a) one cached forward: {m.name}, batch {batch}, {len(tr.transformer_blocks)} blocks, "
          f"{(cfg.sample_size // cfg.patch_size) ** 2} tokens, device {device}, scorer {scorer}", flush=True)

    def plain():
        tr(x, timestep=t, class_labels=y)

    with count_flops() as fc:
        plain()
    full_flops = fc.result.flops
    rows = []
    for kv in kvs:
        for rho in rhos:
            # call 0 is full (fills the cache), call 1 cached: a 2-step "run" in pipeline mode
            config = TokenCacheConfig(rho=rho, kv=kv, scorer=scorer, schedule="round-robin", interval=2, num_steps=2)
            state = apply_token_cache(tr, config)
            plain()  # full step, not counted
            with count_flops() as fc:
                plain()  # the cached step
            assert state.history[-1].full is False
            cache_mb = state.cache_bytes() / 2**20
            remove_token_cache(tr)
            t_full, t_cached = [], []
            for i in range(repeats + 1):  # interleaved: plain, cached, plain, cached ...; round 0 is warm-up
                _sync(device)
                t0 = time.perf_counter()
                plain()
                _sync(device)
                dt_full = time.perf_counter() - t0
                state = apply_token_cache(tr, config)
                plain()
                _sync(device)
                t0 = time.perf_counter()
                plain()
                _sync(device)
                dt_cached = time.perf_counter() - t0
                remove_token_cache(tr)
                if i:
                    t_full.append(dt_full)
                    t_cached.append(dt_cached)
            kept = state.history[-1].kept_fraction
            rows.append(_row(f"kv={kv} rho={rho}", fc.result.flops / full_flops, statistics.median(t_cached),
                             statistics.median(t_full), extra=f"  kept {kept:.3f}, cache {cache_mb:.0f} MiB"))
            rows[-1].update(kv=kv, rho=rho, kept=kept, cache_mib=cache_mb)
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
                   device: torch.device, scorer: str, schedule: dict) -> list[dict]:
    if model_spec is None:
        model_spec = "shapes-dit" if (EMBEDDED_DIR / "transformer").is_dir() else "DiT-S/2"
    m = load_dit(model_spec).to(device)
    n_classes = m.num_classes
    labels = [i % n_classes for i in range(batch)]
    sc = SampleConfig(num_steps=steps, guidance_scale=guidance, batch_size=batch, seed=0)
    print(f"\n(b) sampling: {m.name} ({'trained' if m.trained else 'UNTRAINED'}), {steps} steps, batch {batch}, "
          f"guidance {guidance}, device {device}, scorer {scorer}, schedule {schedule}", flush=True)

    def plain():
        _sync(device)
        return sample(m, labels, sc, progress=False)

    with count_flops() as fc:
        plain()
    full_flops = fc.result.flops
    rows = []
    for kv in kvs:
        for rho in rhos:
            config = TokenCacheConfig(rho=rho, kv=kv, scorer=scorer, **schedule)
            state = apply_token_cache(m.transformer, config)
            with count_flops() as fc:
                sample(m, labels, sc, progress=False)
            remove_token_cache(m.transformer)
            frac = state.summary()["compute_fraction"]
            wall = {"full": [], "cached": []}
            model_s = {"full": [], "cached": []}
            for i in range(repeats + 1):  # interleaved; round 0 is warm-up
                for name in ("full", "cached"):
                    if name == "cached":
                        apply_token_cache(m.transformer, config)
                    t0 = time.perf_counter()
                    res = plain()
                    _sync(device)
                    dt = time.perf_counter() - t0
                    if name == "cached":
                        remove_token_cache(m.transformer)
                    if i:
                        wall[name].append(dt)
                        model_s[name].append(res.transformer_seconds)
            med = {k: statistics.median(v) for k, v in wall.items()}
            rows.append(_row(f"kv={kv} rho={rho}", fc.result.flops / full_flops, med["cached"], med["full"],
                             extra=f"  compute fraction {frac:.3f}, transformer-only time ratio "
                                   f"{statistics.median(model_s['cached']) / statistics.median(model_s['full']):.3f}"))
            rows[-1].update(kv=kv, rho=rho, compute_fraction=frac)
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
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.small:
        a.forward_model, a.forward_batch, a.steps, a.batch, a.repeats = "DiT-S/2", 2, 8, 2, 3
        a.sampling_model = a.sampling_model or "DiT-S/2"
    schedule = {"schedule": a.schedule} if a.schedule == "tprr" else {"schedule": "round-robin",
                                                                     "interval": a.interval}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    out = {}
    if a.part in ("forward", "both"):
        out["forward"] = bench_forward(a.forward_model, a.forward_batch, a.rhos, a.kv, a.repeats, device, a.scorer,
                                       profile=a.profile)
    if a.part in ("sampling", "both"):
        out["sampling"] = bench_sampling(a.sampling_model, a.steps, a.batch, a.guidance, a.rhos, a.kv, a.repeats,
                                         device, a.scorer, schedule)
    if a.out:
        import json

        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
