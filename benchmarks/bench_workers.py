"""Notebook 02's smoke sweep at 1 and at 2 torchrun workers, side by side in one process tree (issue 18).

    python benchmarks/bench_workers.py                      # the smoke preset, one round of each
    python benchmarks/bench_workers.py --rounds 2 --json out.json

Each configuration executes the real notebook (``tclab.runs.run_notebook``, papermill) with the
02 smoke preset and ``workers`` set, into a temporary reports folder; the figure is the duration
papermill recorded for the ``study.measure()`` cell (the sweep), and the whole notebook's time. The
configurations run interleaved, round by round:

- ``1 worker, default threads``: the kernel measures, with torch's own thread count (both cores);
- ``1 worker, 1 thread``: the same with ``OMP_NUM_THREADS=1``, the per-worker baseline;
- ``2 workers``: the sweep on two torchrun processes (gloo), one thread each.

Speed-up = time of a 1-worker configuration / time of 2 workers; efficiency = speed-up / 2 against
the 1-thread baseline. The cost model for N devices is then written out from the per-unit seconds the
2-worker run recorded (``summary.json`` -> ``world.seconds``): each device takes the next unit when it
is free (as ``ShardFolder.claimed``), plus the measured fixed cost (start-up and merge); once as
measured, once with the units' slow-down from sharing this machine's two cores divided out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_ablation_predictor.ipynb"
CONFIGS = {"1 worker, default threads": (1, None), "1 worker, 1 thread": (1, "1"), "2 workers": (2, None)}


def run_once(params: dict, workers: int, omp: str | None, reports: Path) -> dict:
    import nbformat

    from tclab import runs

    old = os.environ.get("OMP_NUM_THREADS")
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    try:
        t0 = time.perf_counter()
        run_dir = runs.run_notebook(NOTEBOOK, {**params, "workers": workers}, reports_dir=reports,
                                    tag=f"bench-w{workers}-t{omp or 'default'}", progress_bar=False)
        total = time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    nb = nbformat.read(run_dir / NOTEBOOK.name, as_version=4)
    (measure,) = [c for c in nb.cells if c.cell_type == "code" and c.source.strip() == "study.measure()"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"sweep_s": float(measure.metadata["papermill"]["duration"]), "notebook_s": total,
            "world": summary.get("world"), "points": summary["headline"]["points"]}


def makespan(seconds: list[float], n: int) -> float:
    """When the last of ``n`` devices is done if each takes the next unit when it is free, in unit order (what
    ``ShardFolder.claimed`` does)."""
    free = [0.0] * n
    for t in seconds:
        i = free.index(min(free))
        free[i] += t
    return max(free)


def cost_model(world: dict, alone_s: float | None = None, ns=(1, 2, 4, 8, 16, 64)) -> list[dict]:
    """Predicted sweep seconds on N devices from the per-unit seconds of a worker run: the fixed cost (start-up,
    model load, warm-up: launch-to-end minus the busiest worker's units) plus the claim schedule's makespan.
    ``alone_s``: the sweep's time in one process with one worker's resources; the units' sum over it is the
    slow-down the workers suffered from sharing the machine, divided out in ``predicted_s_alone`` (devices
    that share nothing, e.g. one GPU each)."""
    sec = world["seconds"]
    units = [u[2] for u in sec["units"]]
    fixed = sec["launch_to_end"] - makespan(units, world["world_size"])
    share = sum(units) / alone_s if alone_s else 1.0
    rows = []
    for n in ns:
        rows.append({"devices": n, "predicted_s": round(fixed + makespan(units, n), 1),
                     "predicted_s_alone": round(fixed + makespan([u / share for u in units], n), 1),
                     "of_which_fixed_s": round(fixed, 1)})
    for key in ("predicted_s", "predicted_s_alone"):
        for r in rows:
            r[key.replace("predicted", "speedup")] = round(rows[0][key] / r[key], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=str(ROOT / "notebooks" / "params" / "02_smoke.yaml"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--from-json", default=None, help="print the tables of an earlier run's --json file; run nothing")
    a = ap.parse_args()
    if a.from_json:
        report(json.loads(Path(a.from_json).read_text())["results"])
        return
    params = yaml.safe_load(Path(a.preset).read_text())
    results: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="tclab-bench-workers-") as tmp:
        for r in range(a.rounds):
            for name, (workers, omp) in CONFIGS.items():
                res = run_once(params, workers, omp, Path(tmp) / "reports")
                results[name].append(res)
                print(f"round {r + 1}: {name:28s} sweep {res['sweep_s']:7.1f} s   notebook {res['notebook_s']:7.1f} s"
                      f"   ({res['points']} points)", flush=True)
    report(results, a.json)


def report(results: dict[str, list[dict]], json_out: str | None = None) -> None:
    rounds = len(results["2 workers"])
    for r in range(rounds):   # the speed-up of each round: its configurations ran one after another
        two_r = results["2 workers"][r]["sweep_s"]
        print(f"round {r + 1}: 2 workers against " + ", ".join(
            f"{k}: {results[k][r]['sweep_s'] / two_r:.2f}x" for k in CONFIGS if k != "2 workers"))
    med = {k: statistics.median(x["sweep_s"] for x in v) for k, v in results.items()}
    nb = {k: statistics.median(x["notebook_s"] for x in v) for k, v in results.items()}
    two = med["2 workers"]
    print(f"\nnotebook 02 smoke sweep on {os.cpu_count()} cores (median of {rounds} round(s)):")
    print(f"{'configuration':28s} {'sweep s':>8s} {'notebook s':>11s} {'speed-up of 2 workers':>22s} {'efficiency':>11s}")
    for k in CONFIGS:
        s = med[k] / two
        print(f"{k:28s} {med[k]:8.1f} {nb[k]:11.1f} {s:22.2f} {s / 2:11.2f}" if k != "2 workers" else
              f"{k:28s} {med[k]:8.1f} {nb[k]:11.1f} {'':>22s} {'':>11s}")
    world = results["2 workers"][-1]["world"]
    units = [u[2] for u in world["seconds"]["units"]]
    alone = med["1 worker, 1 thread"]
    model = cost_model(world, alone)
    print(f"\ncost model from the 2-worker run's {len(units)} units ({sum(units):.1f} unit-seconds; the sweep took "
          f"{alone:.1f} s in one 1-thread process, so sharing 2 cores slowed each unit {sum(units) / alone:.2f}x; "
          f"the longest unit, {max(units):.1f} s, bounds the sweep at any number of devices):")
    print(f"  {'devices':>7s} {'as measured (s)':>16s} {'speed-up':>9s} {'devices that share nothing (s)':>31s} "
          f"{'speed-up':>9s}")
    for row in model:
        print(f"  {row['devices']:7d} {row['predicted_s']:16.1f} {row['speedup_s']:9.2f} {row['predicted_s_alone']:31.1f} "
              f"{row['speedup_s_alone']:9.2f}")
    print(f"  (each includes the fixed {model[0]['of_which_fixed_s']:.1f} s of start-up and merge)")
    if json_out:
        Path(json_out).write_text(json.dumps({"results": results, "median_sweep_s": med, "cost_model": model}, indent=1))


if __name__ == "__main__":
    main()
