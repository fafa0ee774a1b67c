"""The run table ``reports/runs.sqlite`` (``tclab.runs.table``) and ``tclab runs list|show|compare|rebuild``.

Run folders are written by hand here (provenance.json + summary.json in the form ``tclab run`` leaves them),
so each rule is checked without a kernel: rows follow the folders (added, rewritten, removed), sweeps give
variant rows, concurrent writers lose nothing, a corrupt or read-only table is handled, index.html is
rendered from the table, and the command line shows and compares runs. Notebook and command runs end to end
are in tests/test_notebooks.py and tests/test_evaluate.py.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from tclab import cli, runs

SHA_A, SHA_B = "a" * 64, "b" * 64


def write_run(reports: Path, name: str, *, notebook: str = "01_token_redundancy", status: str = "ok",
              model: str = "shapes-dit", sha: str = SHA_A, headline: dict | None = None, summary: dict | None = None,
              params: dict | None = None, start: str | None = None, command: str | None = None) -> Path:
    d = reports / name
    d.mkdir(parents=True)
    start = start or f"{name[:4]}-{name[4:6]}-{name[6:8]}T{name[9:11]}:{name[11:13]}:{name[13:15]}.000Z"
    prov = {"status": status, "tag": name.split("_")[-1], "start_utc": start, "duration_s": 12.5,
            "parameters": {"model": model, "images": "shapes", "num_steps": 10, **(params or {})},
            "git": {"commit": "c0ffee" * 6}, "hostname": "box", "tclab_version": "0.1.0"}
    prov.update({"command": command} if command else {"notebook": f"/repo/notebooks/{notebook}.ipynb"})
    if status == "failed":
        prov["error"] = "ValueError: the images folder is empty"
    (d / "provenance.json").write_text(json.dumps(prov))
    if summary is None:
        summary = {"headline": headline if headline is not None else {"top10_share": 0.146, "rank_corr": 0.53},
                   "identity": {"model_weights_sha256": sha, "images_manifest_sha256": "9" * 64},
                   "report": {"key_numbers": [{"key": "top10_share", "label": "top-10% share",
                                               "value": (headline or {}).get("top10_share", 0.146), "unit": "%"}]}}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def sweep_summary(best: str = "learned-static rho=0.2") -> dict:
    """A sweep summary the way tclab.ablation.summarise_sweep writes one, without its version (read as incomplete)."""
    point = {"name": best, "curve": "learned-static", "family": "ablation", "knob": "rho", "flop_ratio": 0.45,
             "time_ratio": 0.5, "psnr": 24.0, "psnr_ci": [22.6, 25.4], "ssim": 0.79, "class_consistency": 0.75,
             "error": "", "config": {"name": best, "cache": {"scorer": "learned-static", "rho": 0.2}}}
    full = {"name": "full compute", "curve": "full compute", "family": "reference", "knob": "", "flop_ratio": 1.0,
            "time_ratio": 1.0, "psnr": 100.0, "error": "", "config": {"name": "full compute", "cache": None}}
    failed = {"name": "toca rho=0.1", "curve": "toca", "family": "ablation", "knob": "rho", "flop_ratio": None,
              "psnr": None, "error": "RuntimeError: out of memory", "config": {"name": "toca rho=0.1", "cache": None}}
    return {"headline": {}, "points": [full, point, failed],
            "best_under_budget": {k: point[k] for k in ("name", "curve", "family", "flop_ratio", "time_ratio", "psnr",
                                                        "psnr_ci", "ssim", "class_consistency", "config")},
            "settings": {"num_steps": 50, "scheduler": "ddim", "guidance_scale": 4.0, "seed": 0},
            "identity": {"model_weights_sha256": SHA_A}}


@pytest.fixture
def reports(tmp_path):
    r = tmp_path / "reports"
    write_run(r, "20261201T100000Z_01_token_redundancy_smoke", model="shapes-dit", sha=SHA_A,
              headline={"top10_share": 0.146, "rank_corr": 0.53})
    write_run(r, "20261201T110000Z_01_token_redundancy_smoke", model="/teams/vision/latent-dit", sha=SHA_B,
              headline={"top10_share": 0.31, "rank_corr": 0.40})
    write_run(r, "20261201T120000Z_02_ablation_predictor_smoke", notebook="02_ablation_predictor",
              summary=sweep_summary())
    write_run(r, "20261201T130000Z_05_inhouse_report_nightly_FAILED", notebook="05_inhouse_report", status="failed")
    return r


def test_one_row_per_run_with_identity_parameters_and_headline(reports):
    frame = runs.table(reports)
    assert list(frame["run"]) == sorted(frame["run"], reverse=True)   # newest first
    assert len(frame) == 4 and (reports / runs.TABLE_NAME).is_file()
    latent = frame[frame["model"] == "/teams/vision/latent-dit"].iloc[0]
    assert latent["notebook"] == "01_token_redundancy" and latent["kind"] == "notebook"
    assert latent["model_sha256"] == SHA_B and latent["status"] == "ok" and latent["duration_s"] == 12.5
    assert latent["headline.top10_share"] == 0.31 and latent["param.num_steps"] == 10
    failed = frame[frame["status"] == "failed"].iloc[0]
    assert failed["error"] == "ValueError: the images folder is empty"


def test_filters_by_notebook_model_status_and_date(reports):
    assert len(runs.table(reports, notebook="01")) == 2
    assert len(runs.table(reports, notebook="01_token_redundancy")) == 2
    assert list(runs.table(reports, model="latent")["model_sha256"]) == [SHA_B]
    assert list(runs.table(reports, model="bbbb")["model_sha256"]) == [SHA_B]   # a hash prefix
    assert list(runs.table(reports, status="failed")["notebook"]) == ["05_inhouse_report"]
    assert len(runs.table(reports, since="2026-12-01T11:30")) == 2
    assert len(runs.table(reports, until="2026-12-01")) == 4   # a date bounds up to its end
    assert runs.table(reports, notebook="03").empty
    with pytest.raises(runs.RunTableError, match="unknown filter"):
        runs.table(reports, colour="red")
    with pytest.raises(runs.RunTableError, match="not a date"):
        runs.table(reports, since="yesterday")


def test_a_sweep_gives_one_variant_row_per_point_and_its_recommendation(reports):
    v = runs.table(reports, variants=True)
    assert list(v["name"]) == ["full compute", "learned-static rho=0.2", "toca rho=0.1"]
    assert list(v["best_under_budget"]) == [False, True, False]
    assert v.iloc[1]["psnr_ci_low"] == 22.6 and v.iloc[1]["config"]["cache"]["rho"] == 0.2
    assert v.iloc[2]["error"] == "RuntimeError: out of memory"
    (row,) = runs.rows(reports, notebook="02")
    assert row["best_under_budget"]["name"] == "learned-static rho=0.2" and row["settings"]["num_steps"] == 50


def test_the_table_follows_the_folders_added_rewritten_and_removed(reports):
    assert len(runs.rows(reports)) == 4
    d = write_run(reports, "20261201T140000Z_01_token_redundancy_smoke", headline={"top10_share": 0.2})
    assert len(runs.rows(reports)) == 5
    summary = json.loads((d / "summary.json").read_text())
    summary["headline"]["top10_share"] = 0.25
    (d / "summary.json").write_text(json.dumps(summary) + " ")   # another size: re-read
    assert runs.find_run(reports, d.name)["headline"]["top10_share"] == 0.25
    import shutil

    shutil.rmtree(d)
    assert d.name not in {r["run"] for r in runs.rows(reports)}


def test_rebuild_gives_the_same_rows_and_replaces_a_corrupt_table(reports, capsys):
    before = runs.rows(reports)
    (reports / runs.TABLE_NAME).write_bytes(b"this is not an SQLite file at all" * 100)
    assert runs.rows(reports) == before   # rebuilt from the folders, with a warning
    assert "rebuilding it from the run folders" in capsys.readouterr().err
    runs.rebuild(reports)
    assert runs.rows(reports) == before


def test_a_read_only_table_is_read_into_memory_without_writing(reports, monkeypatch):
    runs.sync(reports)
    write_run(reports, "20261201T150000Z_01_token_redundancy_late")   # newer than the table
    before = (reports / runs.TABLE_NAME).read_bytes()
    import tclab.runs.run_table as table_module

    real = table_module._connect

    def read_only(path):   # as a shared copy someone else owns (root may write anywhere, so simulate it)
        if str(path) == ":memory:":
            return real(path)
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        con.row_factory = sqlite3.Row
        return con

    monkeypatch.setattr(table_module, "_connect", read_only)
    assert len(runs.rows(reports)) == 5                      # the new folder is seen
    assert (reports / runs.TABLE_NAME).read_bytes() == before   # and nothing was written


def _sync_in_child(args):
    reports, i = args
    d = write_run(Path(reports), f"20261202T0000{i:02d}Z_01_token_redundancy_w{i}")
    runs.sync(reports, only=[d])
    runs.write_index(reports)
    return d.name


def test_concurrent_runs_ending_together_all_land_in_the_table(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        names = pool.map(_sync_in_child, [(str(reports), i) for i in range(12)])
    con = sqlite3.connect(reports / runs.TABLE_NAME)
    assert sorted(r[0] for r in con.execute("SELECT run FROM runs")) == sorted(names)
    con.close()
    page = (reports / "index.html").read_text()
    assert sum(name in page for name in names) == 12


def test_index_html_is_rendered_from_the_table(reports):
    runs.write_index(reports)
    con = sqlite3.connect(reports / runs.TABLE_NAME)
    con.execute("UPDATE runs SET tag = 'renamed-in-the-table' WHERE run LIKE '%latent%' OR model LIKE '%latent%'")
    con.commit()
    con.close()
    runs.write_index(reports)   # the folders did not change, so the row is not re-read: the page shows the table
    assert "renamed-in-the-table" in (reports / "index.html").read_text()


def test_a_command_run_is_listed_as_its_command(tmp_path):
    reports = tmp_path / "reports"
    write_run(reports, "20261201T100000Z_evaluate_shapes-dit", command="evaluate",
              headline={"class_consistency": 0.8})
    (row,) = runs.rows(reports)
    assert row["kind"] == "command" and row["notebook"] == "evaluate"
    assert runs.table(reports, notebook="evaluate")["headline.class_consistency"].tolist() == [0.8]


def test_runs_list_show_and_compare_on_the_command_line(reports, capsys):
    assert cli.main(["runs", "list", "--reports", str(reports), "--notebook", "01"]) == 0
    out = capsys.readouterr().out
    assert "latent-dit" in out and "shapes-dit" in out and "2 run(s)" in out and "top-10% share 31" in out
    assert cli.main(["runs", "show", "T120000Z", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert "* learned-static rho=0.2" in out and "RuntimeError: out of memory" in out
    assert cli.main(["runs", "compare", "T100000Z_01", "T110000Z_01", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "shapes-dit (aaaaaaaa)" in lines["model"] and "latent-dit (bbbbbbbb)" in lines["model"]
    assert "parameters that differ" in out and "/teams/vision/latent-dit" in out
    share = next(line for line in out.splitlines() if "top-10% share" in line)
    assert "14.6" in share and "31" in share and "+16.4" in share     # B - A, in the figure's unit


def test_runs_commands_refuse_bad_input_with_exit_2(reports, capsys):
    assert cli.main(["runs", "show", "nothing-like-this", "--reports", str(reports)]) == 2
    assert "no run in" in capsys.readouterr().err
    assert cli.main(["runs", "show", "_01_token", "--reports", str(reports)]) == 2
    assert "2 runs in" in capsys.readouterr().err
    assert cli.main(["runs", "list", "--reports", str(reports / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runs_list_writes_csv_and_parquet_and_rebuild_reports_the_count(reports, tmp_path, capsys):
    import pandas as pd

    assert cli.main(["runs", "list", "--reports", str(reports), "--parquet", str(tmp_path / "r.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 4
    assert cli.main(["runs", "list", "--reports", str(reports), "--csv", str(tmp_path / "r.csv"), "--limit", "2"]) == 0
    assert len(pd.read_csv(tmp_path / "r.csv")) == 2
    capsys.readouterr()
    assert cli.main(["runs", "rebuild", "--reports", str(reports)]) == 0
    assert "4 run(s)" in capsys.readouterr().out


def test_a_command_run_that_fails_publishes_nothing_and_one_that_ends_is_in_the_table(tmp_path):
    reports = tmp_path / "reports"
    write_run(reports, "20261201T100000Z_01_token_redundancy_smoke")
    runs.sync(reports)

    def broken(run):
        (run.dir / "half.txt").write_text("half a result")
        raise RuntimeError("the sampler ran out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        runs.command_run("evaluate", {"model": "m"}, broken, reports_dir=reports, tag="m")
    assert sorted(p.name for p in reports.iterdir() if p.is_dir()) == ["20261201T100000Z_01_token_redundancy_smoke"]
    assert len(runs.rows(reports)) == 1

    def good(run):
        run.write_summary({"headline": {"fid": 12.5}, "identity": {"model_weights_sha256": SHA_B}})
        return {"fid": 12.5}

    folder, result = runs.command_run("evaluate-fid", {"samples": "a.npz"}, good, reports_dir=reports, tag="inception")
    assert result == {"fid": 12.5} and folder.name.endswith("_evaluate-fid_inception")
    row = runs.find_run(reports, folder.name)
    assert row["kind"] == "command" and row["status"] == "ok" and row["model_sha256"] == SHA_B
    assert row["parameters"] == {"samples": "a.npz"} and row["headline"] == {"fid": 12.5}
    assert folder.name in (reports / "index.html").read_text()


def test_a_failed_gate_is_marked_in_the_table_and_on_the_index(reports):
    """gates.json (written after the run by its job's quality gates, tclab.gates) is read like the rest."""
    d = reports / "20261201T110000Z_01_token_redundancy_smoke"
    runs.write_index(reports)
    assert "GATE FAILED" not in (reports / "index.html").read_text()
    (d / "gates.json").write_text(json.dumps({"version": 1, "job": "smoke", "status": "failed", "gates": [
        {"name": "min.rank_corr", "figure": "rank_corr", "threshold": 0.5, "value": 0.4, "interval": [0.35, 0.45],
         "passed": False, "by": 0.05, "note": "0.4 < 0.5 and the whole interval [0.35, 0.45] is below"},
        {"name": "max.top10_share", "figure": "top10_share", "threshold": 0.5, "value": 0.31, "interval": None,
         "passed": True, "by": 0.19, "note": ""}]}))
    runs.write_index(reports)   # the new file is seen: the row is re-read
    row = runs.find_run(reports, d.name)
    assert row["gate_status"] == "failed" and row["gates"]["gates"][0]["passed"] is False
    assert list(runs.table(reports, status="ok")["gate_status"].fillna("-")) == ["-", "failed", "-"]
    page = (reports / "index.html").read_text()
    cell = page[page.index(d.name):][:4000]
    assert "GATE FAILED" in cell and "min.rank_corr: 0.4 &lt; 0.5 and the whole interval" in cell
