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
2-worker run recorded (``summary.json`` -> ``world.seconds``): the same round-robin deal as
``tclab.distributed.my_units``, phase 1 (full compute) then phase 2, plus the measured fixed cost
(start-up and merge).
"""

from __future__ import annotations

import argparse
import json
import os
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
    """The busiest rank's seconds when units are dealt round-robin to ``n`` ranks (``my_units``)."""
    return max(sum(seconds[r::n]) for r in range(n)) if seconds else 0.0


def cost_model(world: dict, ns=(1, 2, 4, 8, 16, 64)) -> list[dict]:
    sec = world["seconds"]
    units = [u[2] for u in sec["units"]]
    first = sec["phase_1_units"]
    p1, p2 = units[:first], units[first:]
    busy = makespan(p1, world["world_size"]) + makespan(p2, world["world_size"])
    fixed = sec["launch_to_end"] - busy      # start-up (interpreters, model load, warm-up) and the barriers
    rows = []
    for n in ns:
        t = fixed + makespan(p1, n) + makespan(p2, n)
        rows.append({"devices": n, "predicted_s": round(t, 1), "of_which_fixed_s": round(fixed, 1),
                     "speedup_vs_1": None})
    t1 = rows[0]["predicted_s"]
    for r in rows:
        r["speedup_vs_1"] = round(t1 / r["predicted_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=str(ROOT / "notebooks" / "params" / "02_smoke.yaml"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    params = yaml.safe_load(Path(a.preset).read_text())
    results: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="tclab-bench-workers-") as tmp:
        for r in range(a.rounds):
            for name, (workers, omp) in CONFIGS.items():
                res = run_once(params, workers, omp, Path(tmp) / "reports")
                results[name].append(res)
                print(f"round {r + 1}: {name:28s} sweep {res['sweep_s']:7.1f} s   notebook {res['notebook_s']:7.1f} s"
                      f"   ({res['points']} points)", flush=True)
    med = {k: sorted(x["sweep_s"] for x in v)[len(v) // 2] for k, v in results.items()}
    nb = {k: sorted(x["notebook_s"] for x in v)[len(v) // 2] for k, v in results.items()}
    two = med["2 workers"]
    print(f"\nnotebook 02 smoke sweep on {os.cpu_count()} cores (median of {a.rounds} round(s)):")
    print(f"{'configuration':28s} {'sweep s':>8s} {'notebook s':>11s} {'speed-up of 2 workers':>22s} {'efficiency':>11s}")
    for k in CONFIGS:
        s = med[k] / two
        print(f"{k:28s} {med[k]:8.1f} {nb[k]:11.1f} {s:22.2f} {s / 2:11.2f}" if k != "2 workers" else
              f"{k:28s} {med[k]:8.1f} {nb[k]:11.1f} {'':>22s} {'':>11s}")
    world = results["2 workers"][-1]["world"]
    model = cost_model(world)
    print("\ncost model from the 2-worker run's per-unit seconds (round-robin deal, fixed cost as measured):")
    for row in model:
        print(f"  {row['devices']:3d} devices: {row['predicted_s']:7.1f} s (fixed {row['of_which_fixed_s']:.1f} s), "
              f"speed-up {row['speedup_vs_1']:.2f}")
    units = [u[2] for u in world["seconds"]["units"]]
    print(f"  {len(units)} units, {sum(units):.1f} unit-seconds in all; the longest unit {max(units):.1f} s bounds "
          "the sweep at any number of devices")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "median_sweep_s": med, "cost_model": model}, indent=1))


if __name__ == "__main__":
    main()
