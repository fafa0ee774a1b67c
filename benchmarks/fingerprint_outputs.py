"""Fixed-seed fingerprints of tclab's outputs, to show a refactoring changed no number.

    python benchmarks/fingerprint_outputs.py > before.txt      # at the old commit
    python benchmarks/fingerprint_outputs.py > after.txt       # at the new one
    diff before.txt after.txt                                  # empty = byte-identical

Each line is ``what: sha256[:16]`` of the raw bytes of one output, computed on the embedded model
(``shapes-dit``) with fixed seeds: the sampler's images (with and without guidance), every TokenCache
scorer and FORA under tclab's sampler, TokenCache and the recorder inside diffusers' ``DiTPipeline``
(with and without guidance, two runs in a row, so the run-boundary rules are exercised), every external
peer that runs here, a recorder run under the sampler, and the quality columns of a small sweep.
Only public entry points are used, so the script runs unchanged on both sides of a refactoring.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch


PEER_COUNTS = ("calls", "runs", "skipped_calls", "computed_calls", "hooked_modules")


def sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if torch.is_tensor(a):
            a = a.detach().cpu().contiguous().numpy()
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def record_sha(r) -> str:
    return sha(r.out_change, r.update_change, r.update_ratio, r.cos, r.timesteps, r.class_labels, r.sample_id) + \
        f" {r.step_source} " + "".join("c" if b == "cond" else "u" for b in r.branch)


def main() -> None:
    from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
    from tclab.cache.config import fora_config
    from tclab.models import load_dit
    from tclab.record import record_token_changes
    from tclab.sampling import SampleConfig, sample

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # thread count can change float summation order
    model = load_dit()
    tr = model.transformer
    labels = [0, 1, 2, 3]
    cfg = SampleConfig(num_steps=10, seed=3, batch_size=4)
    out = {}
    out["sampler, guidance 4"] = sha(sample(model, labels, cfg, progress=False).images)
    out["sampler, no guidance"] = sha(sample(model, labels, SampleConfig(num_steps=10, seed=3, guidance_scale=1.0),
                                             progress=False).images)

    def cached(config, name, **kw):
        state = apply_token_cache(tr, config)
        try:
            images = sample(model, labels, kw.get("sample_config", cfg), progress=False).images
            out[name] = sha(images) + " " + str({k: v for k, v in state.summary().items() if k != "cache_bytes"})
        finally:
            remove_token_cache(tr)

    for scorer in ("prev-change", "random", "toca", "oracle", "learned-static", "learned-dynamic"):
        try:
            cached(TokenCacheConfig(rho=0.3, scorer=scorer), f"tokencache {scorer}")
        except Exception as e:  # noqa: BLE001 (a scorer missing on one side is itself a difference)
            out[f"tokencache {scorer}"] = f"error {type(e).__name__}: {e}"
    cached(TokenCacheConfig(rho=0.3, scorer="prev-change", selection="uniform", schedule="round-robin"),
           "tokencache uniform round-robin")
    cached(TokenCacheConfig(rho=0.3, scorer="prev-change", reuse="output", kv="kept"), "tokencache output kept")
    cached(fora_config(3), "fora 3")

    # inside diffusers' DiTPipeline: no step context; two calls in a row
    for guidance in (4.0, 1.0):
        pipe = model.pipeline()
        for num_steps in (None, 8):
            state = apply_token_cache(tr, TokenCacheConfig(rho=0.3, scorer="prev-change", num_steps=num_steps))
            try:
                imgs = []
                for seed in (1, 2):
                    g = torch.Generator().manual_seed(seed)
                    imgs.append(pipe(class_labels=labels, num_inference_steps=8, guidance_scale=guidance,
                                     generator=g, output_type="np").images)
                out[f"pipeline tokencache g{guidance} num_steps={num_steps}"] = sha(*imgs) + " " + str(
                    {k: v for k, v in state.summary().items() if k != "cache_bytes"})
            finally:
                remove_token_cache(tr)
        with record_token_changes(tr) as rec:
            for seed in (1, 2):
                g = torch.Generator().manual_seed(seed)
                pipe(class_labels=labels, num_inference_steps=8, guidance_scale=guidance, generator=g,
                     output_type="np")
        r = rec.record
        out[f"pipeline recorder g{guidance}"] = record_sha(r)

    from tclab.cache.peers import apply_peer, peer_status

    for name, status in peer_status(model).items():
        if status != "ok":
            out[f"peer {name}"] = "unavailable"
            continue
        handle = apply_peer(name, model)
        try:
            a = sample(model, labels, cfg, progress=False).images
            pipe = model.pipeline()
            b = pipe(class_labels=labels, num_inference_steps=8, generator=torch.Generator().manual_seed(1),
                     output_type="np").images
            stats = handle.stats()  # the counts every version reports (stats() has gained keys since)
            out[f"peer {name}"] = sha(a, b) + " " + str({k: stats[k] for k in PEER_COUNTS if k in stats})
        finally:
            handle.remove()

    with record_token_changes(tr) as rec:
        sample(model, labels, cfg, progress=False)
    r = rec.record
    out["recorder, sampler"] = record_sha(r)

    from tclab.ablation import SweepSettings, predictor_variants, reference_variants, run_sweep

    settings = SweepSettings(num_steps=10, quality_samples=4, timing_batch=1, timing_repeats=1, quality_batch=4)
    variants = reference_variants(10, fora_intervals=(3,), fewer_steps=(5,)) + predictor_variants(
        ["prev-change", "random"], [0.3])
    result = run_sweep(model, variants, settings, progress=False)
    quality = [c for c in ("name", "flop_ratio", "psnr", "ssim", "mse", "error") if c in result.frame.columns]
    frame = result.frame[quality]
    out["sweep quality columns"] = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()[:16]
    out["sweep images"] = sha(*[result.images[k] for k in sorted(result.images)])
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
