"""Peak memory of a token-change record that outgrows RAM: held whole, streamed to a store, read lazily
(issue 18, item 5).

Two parts, every figure measured in its own child process (peak RSS = the child's ``ru_maxrss``, so
one measurement cannot inherit another's peak; the "baseline" row is a child that only imports):

1. **1,000 samples of a DiT-S/2-sized record** (12 blocks, 16 x 16 = 256 tokens, 50 steps, CFG so
   2 rows per sample, float32: 4.92 MB per sample, 4.92 GB whole). Recording them with a real
   DiT-S/2 would take hours on a CPU, so the chunks, of exactly the shape the recorder writes for
   batches of ``--chunk-samples`` samples, are filled with random values (NaN at step 0, as recorded)
   and written through ``RecordStoreWriter.write_chunk``, the recorder's own writer. Then: the whole
   record in RAM (what the in-memory recorder holds, built by ``store.select()``) and its
   ``mean_over``; streaming the 1,000 samples into the store; ``mean_over`` streamed over the store
   (checked equal to the in-RAM mean); a one-block selection.
2. **The recorder path itself**: ``load_dit("DiT-S/2")`` (random weights, 256 px) sampled under
   ``record_token_changes`` in 16 batches of one sample (CFG: 2 rows), 4 steps each, held in RAM or
   streamed to a store. After the last step of batch 4 and of batch 16 the child notes the bytes of
   finished batches the recorder holds, its RSS and its peak RSS: in RAM the held record grows by one
   batch per batch; streamed it stays at zero and the RSS stays flat. (Many short batches, because on
   this CPU a DiT-S/2 step of 2 rows takes 0.36 s and records only 0.1 MB: the record of a real run that
   fits in the time is a few MB, near the RSS noise of the model's forward; part 1 measures the sizes
   that matter.)

Run from the repository root with tclab importable::

    OMP_NUM_THREADS=1 python benchmarks/bench_record_memory.py                 # both parts, ~2-3 min
    OMP_NUM_THREADS=1 python benchmarks/bench_record_memory.py --samples 100 --real-batches 2,4   # quick
    python benchmarks/bench_record_memory.py --skip-real --dir /big/disk       # part 1 only, store kept there

Part 1 writes ``4 * 50 * 12 * 2 * 256 * 4`` B = 4.92 MB per sample to ``--dir`` (a temporary folder by
default, deleted at the end unless ``--keep``), 4.9 GB for 1,000 samples; its in-RAM row needs about
twice the record in memory (10 GB for 1,000 samples: ``--skip-in-ram`` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def rss_mb() -> float:
    """Resident memory of this process now, MB (``VmRSS`` of /proc/self/status, in KiB), after glibc's
    ``malloc_trim(0)`` hands freed heap pages back: without it, RSS after a forward pass swings by tens of
    MB with whatever the allocator kept of the activations, hiding a record of a few MB."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    return int(kib) * 1024 / MB


# ---- part 1: synthetic chunks of a DiT-S/2 recording --------------------------------------------

def synthetic_chunks(samples: int, chunk_samples: int, steps: int, blocks: int, tokens: int, seed: int = 0):
    """Yield ``(values, sample_id, branch)`` per chunk: values (4, S, L, 2 * b, N) float32 in the
    recorder's layout (rows ``[cond; uncond]``), NaN at step 0 for the three change measures."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for lo in range(0, samples, chunk_samples):
        ids = np.arange(lo, min(samples, lo + chunk_samples))
        v = rng.random((4, steps, blocks, 2 * len(ids), tokens), dtype=np.float32)  # (4, S, L, R, N)
        v[[0, 1, 3], 0] = np.nan  # out_change, update_change, cos do not exist at step 0
        yield v, np.concatenate([ids, ids]), ["cond"] * len(ids) + ["uncond"] * len(ids)
        del v  # before the next chunk is drawn: one chunk in memory at a time


def child_write(a) -> dict:
    from tclab.record_store import RecordStoreWriter

    writer = RecordStoreWriter(a["dir"], 0, grid=(16, a["tokens"] // 16), num_blocks=a["blocks"],
                               model_identity={"name": "DiT-S/2-sized (synthetic values)"})
    timesteps = [1000.0 - 20 * s for s in range(a["steps"])]
    for values, ids, branch in synthetic_chunks(a["samples"], a["chunk_samples"], a["steps"], a["blocks"],
                                                a["tokens"]):
        writer.write_chunk(values, ids, branch, class_labels=[0] * len(ids), timesteps=timesteps)
        del values  # one chunk in memory at a time, as in the recorder
    return {"chunks": len(writer.written)}


def child_in_ram(a) -> dict:
    from tclab.record_store import open_record

    import numpy as np

    t0 = time.perf_counter()
    store = open_record(a["dir"])
    record = store.select()  # the whole record, as the in-memory recorder holds it
    held, after_load, load_s = record.nbytes, peak_rss_mb(), time.perf_counter() - t0
    t1 = time.perf_counter()
    whole = record.mean_over("update_change")
    mean_s, peak = time.perf_counter() - t1, peak_rss_mb()
    lazy = store.mean_over("update_change")  # the streamed mean must equal the in-memory one
    finite = np.isfinite(whole)
    same_nan = bool((np.isnan(whole) == np.isnan(lazy)).all())
    rel = float(np.max(np.abs(lazy[finite] - whole[finite]) / np.abs(whole[finite])))
    return {"held_mb": held / MB, "peak_after_load_mb": after_load, "load_s": load_s, "mean_s": mean_s,
            "peak_after_mean_mb": peak, "lazy_rel_diff": rel, "same_nan": same_nan}


def child_lazy_mean(a) -> dict:
    from tclab.record_store import open_record

    store = open_record(a["dir"])
    m = store.mean_over("update_change")  # (S, L), streamed chunk by chunk
    return {"result_shape": list(m.shape), "store_mb": store.nbytes / MB, "samples": store.num_samples}


def child_lazy_block(a) -> dict:
    from tclab.record_store import open_record

    part = open_record(a["dir"]).select(blocks=[5])
    return {"held_mb": part.nbytes / MB}


def child_baseline(a) -> dict:
    """What every child of its part loads anyway: numpy and the store (and torch with the model)."""
    import importlib

    importlib.import_module("tclab.record_store")
    if a.get("torch"):
        from tclab.models import load_dit

        load_dit("DiT-S/2")
    return {}


# ---- part 2: the recorder on a real DiT-S/2 ------------------------------------------------------

def child_record(a) -> dict:
    """Sample ``batches`` one-sample batches under the recorder, in RAM or streamed to ``dir``; after the
    last step of every batch, note the memory held by finished batches, the RSS now and the peak so far."""
    import torch

    from tclab.models import load_dit
    from tclab.record import record_token_changes
    from tclab.sampling import SampleConfig, sample

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_dit("DiT-S/2")
    cfg = SampleConfig(num_steps=a["steps"], guidance_scale=4.0, batch_size=1)
    labels = list(range(a["batches"]))
    stream = a["dir"] if a["stream"] else None
    after = []  # per batch: (finished batches held MB, RSS MB, peak RSS MB)

    def note(ctx, latents):
        if ctx.step == ctx.num_steps - 1:
            held = sum(c["values"].nbytes for c in rec._chunks)  # finished batches kept in memory
            after.append((held / MB, rss_mb(), peak_rss_mb()))

    with record_token_changes(model.transformer, model_identity=model.identity(), stream_to=stream) as rec:
        sample(model, labels, cfg, progress=False, on_step=note)
    out = {"after": after}
    if stream:
        store = rec.store
        out.update(chunks=len(store.chunks), store_mb=store.nbytes / MB, samples=store.num_samples)
    else:
        out.update(record_mb=rec.record.nbytes / MB)
    return out


CHILDREN = {"write": child_write, "in_ram": child_in_ram, "lazy_mean": child_lazy_mean,
            "lazy_block": child_lazy_block, "baseline": child_baseline, "record": child_record}


def run_child(name: str, **args) -> dict:
    """Run ``CHILDREN[name](args)`` in a fresh interpreter; its result plus seconds and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({"name": name, **args})],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {name} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def _child_main(spec: str) -> None:
    a = json.loads(spec)
    t0 = time.perf_counter()
    res = CHILDREN[a["name"]](a)
    res.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    print(json.dumps(res))


# ---- the tables ----------------------------------------------------------------------------------

def table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def part_synthetic(args, folder: Path) -> str:
    kw = dict(dir=str(folder / "store"), samples=args.samples, chunk_samples=args.chunk_samples, steps=args.steps,
              blocks=args.blocks, tokens=args.tokens)
    whole_mb = 4 * args.steps * args.blocks * 2 * args.samples * args.tokens * 4 / MB
    base = run_child("baseline")
    write = run_child("write", **kw)
    ram = None if args.skip_in_ram else run_child("in_ram", **kw)
    mean = run_child("lazy_mean", **kw)
    block = run_child("lazy_block", **kw)
    b = base["peak_rss_mb"]
    rows = [["baseline (imports only)", "", f"{b:.0f}", "", ""]]
    if ram is not None:
        rows += [
            [f"whole record in RAM (select() of everything: {whole_mb:.0f} MB of arrays)", f"{ram['held_mb']:.0f}",
             f"{ram['peak_after_load_mb']:.0f}", f"{ram['peak_after_load_mb'] - b:.0f}", f"{ram['load_s']:.1f}"],
            ["  ... then TokenChangeRecord.mean_over('update_change')", f"{ram['held_mb']:.0f}",
             f"{ram['peak_after_mean_mb']:.0f}", f"{ram['peak_after_mean_mb'] - b:.0f}", f"{ram['mean_s']:.1f}"],
        ]
    rows += [
        [f"streaming {args.samples} samples into a store ({write['chunks']} chunks)", "0",
         f"{write['peak_rss_mb']:.0f}", f"{write['peak_rss_mb'] - b:.0f}", f"{write['seconds']:.1f}"],
        ["lazy mean_over('update_change') over the store", "0", f"{mean['peak_rss_mb']:.0f}",
         f"{mean['peak_rss_mb'] - b:.0f}", f"{mean['seconds']:.1f}"],
        ["lazy select(blocks=[5]) (one block, both branches)", f"{block['held_mb']:.0f}",
         f"{block['peak_rss_mb']:.0f}", f"{block['peak_rss_mb'] - b:.0f}", f"{block['seconds']:.1f}"],
    ]
    title = (f"Part 1: {args.samples} samples x {args.steps} steps, {args.blocks} blocks, {args.tokens} tokens, "
             f"CFG (2 rows per sample), float32, chunks of {args.chunk_samples} samples; store on disk "
             f"{mean['store_mb']:.0f} MB")
    check = ("" if ram is None else f"\n\nThe streamed mean_over equals the in-RAM one: largest relative difference "
             f"{ram['lazy_rel_diff']:.1e}, NaN in the same places: {ram['same_nan']}.")
    return title + "\n\n" + table(rows, ["what", "record held (MB)", "peak RSS (MB)", "above baseline (MB)",
                                         "seconds"]) + check


def part_real(args, folder: Path) -> str:
    import numpy as np

    lo, hi = args.real_batches
    base = run_child("baseline", torch=True)
    rows = []
    for stream in (False, True):
        r = run_child("record", dir=str(folder / "real"), steps=args.real_steps, batches=hi, stream=stream)
        (held_lo, rss_lo, peak_lo), (held_hi, rss_hi, peak_hi) = r["after"][lo - 1], r["after"][hi - 1]
        rss = [a[1] for a in r["after"][lo - 1:hi]]
        slope = float(np.polyfit(np.arange(len(rss)), rss, 1)[0])  # MB per batch, least squares: less noisy
        where = (f"store: {r['chunks']} chunks, {r['store_mb']:.1f} MB on disk" if stream
                 else f"record: {r['record_mb']:.1f} MB")
        rows.append([f"streamed to a store ({where})" if stream else f"in RAM ({where})",
                     f"{held_lo:.2f} -> {held_hi:.2f}", f"{rss_lo:.1f} -> {rss_hi:.1f} ({rss_hi - rss_lo:+.1f})",
                     f"{slope:+.2f}",
                     f"{peak_lo:.1f} -> {peak_hi:.1f} ({peak_hi - peak_lo:+.1f})", f"{r['seconds']:.1f}"])
    title = (f"Part 2: record_token_changes on DiT-S/2 (random weights, 256 px: 12 blocks, 256 tokens), "
             f"{hi} batches of 1 sample with CFG (2 rows), {args.real_steps} steps each; memory after the last "
             f"step of batch {lo} -> of batch {hi} (baseline: imports + the model, peak {base['peak_rss_mb']:.0f} MB)")
    per_batch = 4 * args.real_steps * 12 * 2 * 256 * 4 / MB
    return title + "\n\n" + table(rows, ["record", "finished batches held (MB)", "RSS (MB)",
                                         f"RSS slope over batches {lo}..{hi} (MB/batch; one batch's record: "
                                         f"{per_batch:.2f})", "peak RSS (MB)", "seconds"])


def parse_batches(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo < hi:
        raise argparse.ArgumentTypeError(f"--real-batches LO,HI needs 1 <= LO < HI, got {text!r}")
    return lo, hi


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="samples of the synthetic record (default 1000)")
    p.add_argument("--chunk-samples", type=int, default=16, help="samples per chunk (batch), default 16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--tokens", type=int, default=256, help="a multiple of 16 (the grid is 16 x tokens/16)")
    p.add_argument("--real-steps", type=int, default=4, help="steps of each real DiT-S/2 batch (default 4)")
    p.add_argument("--real-batches", type=parse_batches, default=(4, 16),
                   help="LO,HI: record HI one-sample batches, compare memory after batch LO and HI (default 4,16)")
    p.add_argument("--skip-real", action="store_true", help="part 1 only")
    p.add_argument("--skip-in-ram", action="store_true", help="part 1 without the whole record in RAM (~2x its size)")
    p.add_argument("--skip-synthetic", action="store_true", help="part 2 only")
    p.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child_main(args.child)
    if args.tokens % 16:
        p.error("--tokens must be a multiple of 16")
    folder = Path(tempfile.mkdtemp(prefix="bench_record_memory-", dir=args.dir))
    print(f"python {sys.version.split()[0]}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"stores in {folder}\n")
    try:
        if not args.skip_synthetic:
            print(part_synthetic(args, folder) + "\n")
        if not args.skip_real:
            print(part_real(args, folder) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
