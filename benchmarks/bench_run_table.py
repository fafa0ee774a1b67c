"""How long the run table takes as a reports folder grows (issue 20): 1 to N synthetic run folders.

For N run folders (copies of a notebook-01 and a sweep summary, half each) it measures, in one process:

* ``rebuild``: building runs.sqlite from every folder (what the first run after an upgrade pays);
* ``sync, nothing new``: what every later read pays (a stat of four files per folder);
* ``sync + index after one run``: what a run that ends pays (its row, then index.html from the table);
* ``index from the folders``: the pre-table way, reading every provenance.json and summary.json;
* ``table()``: the pandas frame a notebook gets.

    python benchmarks/bench_run_table.py [--runs 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tclab import runs


def make_folders(reports: Path, n: int) -> None:
    sweep_points = [{"name": f"learned-static rho={r / 10}", "curve": "learned-static", "family": "ablation",
                     "knob": "rho", "flop_ratio": 1 - r / 12, "time_ratio": 1 - r / 13, "psnr": 40 - r,
                     "psnr_ci": [39 - r, 41 - r], "error": "", "config": {"cache": {"rho": r / 10}}}
                    for r in range(1, 30)]
    for i in range(n):
        sweep = i % 2 == 1
        name = f"2026{1 + i // 40000:02d}{1 + (i // 1440) % 28:02d}T{(i // 60) % 24:02d}{i % 60:02d}00Z_" + (
            "02_ablation_predictor" if sweep else "01_token_redundancy") + f"_job{i % 7}"
        d = reports / name
        d.mkdir()
        prov = {"status": "ok" if i % 11 else "failed", "notebook": f"/r/{name.split('_', 1)[1]}.ipynb",
                "tag": f"job{i % 7}", "start_utc": f"2026-01-01T00:00:{i % 60:02d}.000Z", "duration_s": 30.0 + i,
                "parameters": {"model": f"model-{i % 5}", "images": "shapes", "num_steps": 50, "seed": i}}
        summary = {"headline": {"psnr": 30.0 + i % 9, "flop_ratio": 0.45, "adjacent_rank_corr": 0.6},
                   "identity": {"model_weights_sha256": f"{i % 5:064x}"}}
        if sweep:
            summary.update(points=sweep_points, best_under_budget=sweep_points[5],
                           settings={"num_steps": 50, "scheduler": "ddim"})
        (d / "provenance.json").write_text(json.dumps(prov))
        (d / "summary.json").write_text(json.dumps(summary))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tclab-bench-table-"))
    try:
        print(f"{'run folders':>12} {'rebuild':>9} {'sync, none new':>15} {'sync+index, 1 new':>18} "
              f"{'index from folders':>19} {'table()':>9}")
        for n in sorted({10, 100, a.runs}):
            reports = root / f"r{n}"
            reports.mkdir()
            make_folders(reports, n)
            rebuild = timed(lambda: runs.rebuild(reports), a.repeats)
            same = timed(lambda: runs.sync(reports), a.repeats)
            counter = iter(range(10**6))

            def one_new():
                d = reports / f"20270101T0000{next(counter):02d}Z_01_token_redundancy_new"
                d.mkdir()
                (d / "provenance.json").write_text(json.dumps({"status": "ok", "notebook": "/r/01.ipynb"}))
                (d / "summary.json").write_text(json.dumps({"headline": {"psnr": 1.0}}))
                runs.sync(reports, only=[d])
                runs.write_index(reports)

            new = timed(one_new, a.repeats)
            old = timed(lambda: runs.render_index(runs.list_runs(reports)), a.repeats)
            frame = timed(lambda: runs.table(reports), a.repeats)
            print(f"{n:>12} {rebuild * 1e3:>7.0f}ms {same * 1e3:>13.1f}ms {new * 1e3:>16.0f}ms {old * 1e3:>17.0f}ms "
                  f"{frame * 1e3:>7.0f}ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
