"""tclab.runs.export: run folders into a real local MLflow store (read back with MLflow's own client) and
into TensorBoard event files (read back with TensorBoard's EventAccumulator).

The run folders are written by hand here (two runs of notebook 01 on different models, a sweep of
notebook 02 with its points, a failed run); no notebook is executed. A test that needs mlflow or
tensorboard skips, naming the install command, when the package is missing; under ``CI=true`` it
fails instead (the ``export`` extra must be installed there).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tclab.runs.export import (
    EXPORT_PINS, INSTALL_HINT, ExportError, check_tracking_uri, expand_run_dirs, export_mlflow, export_tensorboard)
from tests.conftest import in_ci

MODEL_A, MODEL_B = "shapes-dit", "/models/tiny-dit"
SHA_A, SHA_B = "a" * 64, "b" * 64


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # ValueError: blocked in sys.modules
        return False


def _require(*modules: str) -> None:
    """Skip the calling test when a tracker package is missing, naming the install command; fail under CI=true."""
    missing = [m for m in modules if not _installed(m)]
    if not missing:
        return
    msg = f"{', '.join(missing)} not installed: {INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: the tracker export tests must run there, not skip)", pytrace=False)
    pytest.skip(msg)


def _png(path: Path, value: int, size=(12, 8)) -> None:
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _run_folder(reports: Path, name: str, *, notebook: str, status: str = "ok", parameters: dict | None = None,
                headline: dict | None = None, points: list | None = None, figures: tuple[str, ...] = (),
                start: str = "2026-12-01T10:00:00.000Z", end: str = "2026-12-01T10:03:20.500Z",
                error: str | None = None, model_sha: str | None = SHA_A, with_summary: bool = True) -> Path:
    d = reports / name
    d.mkdir(parents=True)
    prov = {"status": status, "run": name, "mode": "tclab run", "notebook": f"/repo/notebooks/{notebook}.ipynb",
            "tag": name.split("_")[-1] if status == "ok" else name.split("_")[-2], "parameters": parameters or {},
            "start_utc": start, "end_utc": end, "duration_s": 200.5, "identity": {},
            "git": {"commit": "c0ffee" * 6 + "abcd", "dirty": False}, "hostname": "box", "tclab_version": "0.1.0"}
    if error:
        prov["error"] = error
        (d / "error.txt").write_text(error + "\nTraceback ...\n")
    (d / "provenance.json").write_text(json.dumps(prov, indent=2))
    if with_summary:
        summary = {"headline": headline or {}, "figures": [f"{f}.png" for f in figures],
                   "identity": {"model_weights_sha256": model_sha, "images_manifest_sha256": "f" * 64},
                   "report": {"question": "Do tokens change little between steps?",
                              "findings": [{"text": "Most tokens change by under 5%.", "verdict": "holds"}]}}
        if points is not None:
            summary["points"] = points
        (d / "summary.json").write_text(json.dumps(summary, indent=2))
    for i, f in enumerate(figures):
        _png(d / f"{f}.png", 40 * (i + 1))
    (d / "report.html").write_text(f"<html><body><h1>{name}</h1></body></html>")
    (d / "params.yaml").write_text("model: x\n")
    (d / "table.csv").write_text("a,b\n1,2\n")
    (d / "record.npz").write_bytes(b"not copied")       # large data stays in the run folder
    (d / f"{notebook}.ipynb").write_text("{}")
    return d


POINTS = [
    {"name": "full compute", "curve": "full compute", "family": "reference", "knob": "", "flop_ratio": 1.0,
     "time_ratio": 1.01, "psnr": 100.0, "ssim": 1.0, "class_consistency": 0.8, "lpips": None,
     "time_within_noise": True, "psnr_ci": [100.0, 100.0], "error": "", "config": {"cache": None}},
    {"name": "learned-static rho=0.2", "curve": "learned-static", "family": "ablation", "knob": "rho=0.2",
     "flop_ratio": 0.45, "time_ratio": 0.5, "psnr": 24.0, "ssim": 0.79, "class_consistency": 0.75,
     "time_within_noise": False, "psnr_ci": [22.6, 25.4], "error": "",
     "config": {"cache": {"rho": 0.2, "scorer": "learned-static"}, "name": "learned-static rho=0.2"}},
    {"name": "peer dbcache", "curve": "peer dbcache", "family": "peer", "knob": "", "flop_ratio": None,
     "psnr": None, "error": "PeerUnavailableError: cache-dit is not installed", "config": {"peer": "dbcache"}},
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    """Four run folders: notebook 01 on two models, a notebook 02 sweep with 3 points, a failed run."""
    r = tmp_path_factory.mktemp("reports")
    long_value = "x" * 7000
    _run_folder(r, "20261201T100000Z_01_token_redundancy_full", notebook="01_token_redundancy",
                parameters={"model": MODEL_A, "images": "shapes", "num_steps": 50, "classes": None,
                            "rhos": [0.4, 0.2], "cache": {"rho": 0.2, "kv": "all"}, "note": long_value,
                            "odd key!": 1},
                headline={"frac_tokens_below_5pct": 0.55, "gini": 0.11, "far_distance": 32, "obs1_holds": False,
                          "obs2_holds": True, "obs1_verdict": "does not hold", "broken": float("nan"),
                          "huge": float("inf")},
                figures=("change_heatmap", "change_curves"))
    _run_folder(r, "20261201T110000Z_01_token_redundancy_full", notebook="01_token_redundancy",
                parameters={"model": MODEL_B, "images": "shapes", "num_steps": 50},
                headline={"frac_tokens_below_5pct": 0.61, "gini": 0.09, "obs1_holds": True},
                figures=("change_heatmap",), model_sha=SHA_B,
                start="2026-12-01T11:00:00.000Z", end="2026-12-01T11:01:00.000Z")
    _run_folder(r, "20261201T120000Z_02_ablation_predictor_full", notebook="02_ablation_predictor",
                parameters={"model": MODEL_A, "images": "shapes", "rhos": [0.4, 0.2]},
                headline={"psnr_at_2x": 24.0, "best_under_budget": "learned-static rho=0.2", "points": 3},
                points=POINTS, figures=("pareto",),
                start="2026-12-01T12:00:00.000Z", end="2026-12-01T13:00:00.000Z")
    _run_folder(r, "20261201T140000Z_05_inhouse_report_recheck_FAILED", notebook="05_inhouse_report",
                status="failed", parameters={"model": MODEL_A}, error="RuntimeError: out of memory",
                with_summary=False, start="2026-12-01T14:00:00.000Z", end="2026-12-01T14:00:20.000Z")
    (r / ".staging").mkdir()                                          # never a run
    (r / "not_a_run").mkdir()
    return r


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, experiment: str = "tclab", kind: str | None = "run") -> list:
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if kind is None or r.data.tags.get("tclab.kind") == kind]


def _ms(iso: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


@pytest.fixture(scope="module")
def store(reports, tmp_path_factory):
    """The four folders exported once to a fresh sqlite store: (uri, result, client)."""
    _require("mlflow", "sqlalchemy", "alembic")
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'store' / 'mlflow.db'}"
    result = export_mlflow(expand_run_dirs([reports]), uri)
    return uri, result, _client(uri)


# ---- MLflow ------------------------------------------------------------------------------------------------

def test_the_mlflow_store_holds_one_run_per_folder_read_back_with_mlflows_client(store, reports):
    uri, result, client = store
    names = sorted(p.name for p in reports.iterdir() if p.name.startswith("2026"))
    assert [e.run_dir.name for e in result] == names                    # oldest first
    assert all(e.created and not e.replaced for e in result)
    runs = {r.info.run_name: r for r in _runs(client)}
    assert sorted(runs) == names
    assert {e.run_id for e in result} == {r.info.run_id for r in runs.values()}
    # the experiment's artefacts lie beside the database, not in the current folder
    exp = client.get_experiment_by_name("tclab")
    assert exp.artifact_location == (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()


def test_two_runs_of_notebook_01_on_two_models(store):
    _, _, client = store
    exp = client.get_experiment_by_name("tclab")
    found = client.search_runs([exp.experiment_id], filter_string="tags.`tclab.notebook` = '01_token_redundancy'")
    assert len(found) == 2
    by_model = {r.data.tags["tclab.model"]: r for r in found}
    assert set(by_model) == {MODEL_A, MODEL_B}
    a, b = by_model[MODEL_A], by_model[MODEL_B]
    assert (a.data.tags["tclab.model_sha256"], b.data.tags["tclab.model_sha256"]) == (SHA_A, SHA_B)
    assert a.data.params["model"] == MODEL_A and b.data.params["model"] == MODEL_B
    assert a.data.metrics["frac_tokens_below_5pct"] == pytest.approx(0.55)
    assert b.data.metrics["frac_tokens_below_5pct"] == pytest.approx(0.61)
    assert b.data.metrics["obs1_holds"] == 1.0 and a.data.metrics["obs1_holds"] == 0.0
    # tags: the idempotency key, notebook, tag, status, images, git commit (MLflow's own source tag too)
    t = a.data.tags
    assert t["tclab.run"] == a.info.run_name == "20261201T100000Z_01_token_redundancy_full"
    assert (t["tclab.tag"], t["tclab.status"], t["tclab.images"]) == ("full", "ok", "shapes")
    assert t["tclab.images_sha256"] == "f" * 64
    assert t["tclab.git_commit"] == t["mlflow.source.git.commit"] == "c0ffee" * 6 + "abcd"
    assert "Most tokens change by under 5%." in t["mlflow.note.content"]   # the run's description
    # start and end from provenance
    assert a.info.start_time == _ms("2026-12-01T10:00:00.000Z")
    assert a.info.end_time == _ms("2026-12-01T10:03:20.500Z")
    assert a.info.status == "FINISHED"


def test_metrics_are_the_numeric_headline_and_params_the_parameters_within_mlflows_limits(store):
    _, _, client = store
    run = next(r for r in _runs(client) if r.info.run_name == "20261201T100000Z_01_token_redundancy_full")
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    assert m == {"frac_tokens_below_5pct": 0.55, "gini": 0.11, "far_distance": 32.0, "obs1_holds": 0.0,
                 "obs2_holds": 1.0}                                        # NaN, inf and words are no metrics
    assert t["headline.obs1_verdict"] == "does not hold"                   # the words are tags
    assert p["num_steps"] == "50" and p["classes"] == "null" and p["rhos"] == "[0.4, 0.2]"
    assert p["cache.rho"] == "0.2" and p["cache.kv"] == "all"              # nested parameters flattened
    assert p["odd key_"] == "1"                                            # a key MLflow refuses, made valid
    assert len(p["note"]) == 6000 and p["note"].endswith("[cut; see provenance.json]")


def test_artefacts_are_the_report_the_json_files_figures_and_tables(store, reports):
    _, _, client = store
    run = next(r for r in _runs(client) if r.info.run_name == "20261201T100000Z_01_token_redundancy_full")
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"report.html", "summary.json", "provenance.json", "params.yaml", "change_heatmap.png",
                     "change_curves.png", "table.csv"}
    local = Path(client.download_artifacts(run.info.run_id, "change_heatmap.png"))
    assert local.read_bytes() == (reports / run.info.run_name / "change_heatmap.png").read_bytes()
    assert Path(run.data.tags["mlflow.source.name"]).name == "01_token_redundancy.ipynb"
    report = Path(client.download_artifacts(run.info.run_id, "report.html")).read_text()
    assert "20261201T100000Z_01_token_redundancy_full" in report


def test_a_sweep_has_one_child_run_per_point(store):
    _, result, client = store
    parent = next(r for r in _runs(client) if r.info.run_name == "20261201T120000Z_02_ablation_predictor_full")
    exported = next(e for e in result if e.run_id == parent.info.run_id)
    exp = client.get_experiment_by_name("tclab")
    kids = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    kids = sorted(kids, key=lambda k: int(k.data.tags["tclab.point"]))
    assert [k.info.run_id for k in kids] == exported.point_run_ids
    assert [k.info.run_name for k in kids] == [p["name"] for p in POINTS]
    full, ls, peer = kids
    assert ls.data.params["name"] == "learned-static rho=0.2" and ls.data.params["curve"] == "learned-static"
    assert ls.data.params["family"] == "ablation" and ls.data.params["knob"] == "rho=0.2"
    assert ls.data.params["config.cache.rho"] == "0.2" and "config.name" not in ls.data.params
    assert ls.data.metrics == pytest.approx({"flop_ratio": 0.45, "time_ratio": 0.5, "psnr": 24.0, "ssim": 0.79,
                                             "class_consistency": 0.75, "time_within_noise": 0.0,
                                             "psnr_ci_low": 22.6, "psnr_ci_high": 25.4})
    assert full.data.metrics["time_within_noise"] == 1.0 and "lpips" not in full.data.metrics
    assert ls.info.status == full.info.status == "FINISHED"
    assert peer.info.status == "FAILED" and "cache-dit" in peer.data.tags["tclab.error"]
    assert all(k.data.tags["tclab.run"] == parent.info.run_name for k in kids)
    assert parent.data.metrics["psnr_at_2x"] == 24.0
    assert parent.data.tags["headline.best_under_budget"] == "learned-static rho=0.2"
    assert "pareto.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_failed_run_is_failed_in_mlflow(store):
    _, _, client = store
    run = next(r for r in _runs(client) if r.info.run_name.endswith("_FAILED"))
    assert run.info.status == "FAILED"
    assert run.data.tags["tclab.status"] == "failed"
    assert run.data.tags["tclab.error"] == "RuntimeError: out of memory"
    assert "out of memory" in run.data.tags["mlflow.note.content"]
    assert run.info.end_time == _ms("2026-12-01T14:00:20.000Z")
    assert {"error.txt", "report.html", "provenance.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_exporting_again_adds_nothing_and_a_changed_folder_replaces_its_run(reports, tmp_path):
    _require("mlflow", "sqlalchemy", "alembic")
    import shutil

    r = tmp_path / "reports"
    shutil.copytree(reports, r)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = export_mlflow(expand_run_dirs([r]), uri, experiment="again")
    client = _client(uri)
    before = {x.info.run_id for x in _runs(client, "again", kind=None)}
    assert len(before) == 4 + 3                                           # four runs, three points

    second = export_mlflow(expand_run_dirs([r]), uri, experiment="again")
    assert [e.created for e in second] == [False] * 4
    assert [e.run_id for e in second] == [e.run_id for e in first]
    assert second[2].point_run_ids == first[2].point_run_ids
    assert {x.info.run_id for x in _runs(client, "again", kind=None)} == before

    # a changed folder (its summary rewritten) replaces its MLflow run: still one per folder
    sweep = r / "20261201T120000Z_02_ablation_predictor_full"
    s = json.loads((sweep / "summary.json").read_text())
    s["headline"]["psnr_at_2x"] = 25.0
    s["points"] = s["points"][:2]
    (sweep / "summary.json").write_text(json.dumps(s))
    third = export_mlflow(expand_run_dirs([r]), uri, experiment="again")
    assert [(e.created, e.replaced) for e in third] == [(False, False)] * 2 + [(True, True)] + [(False, False)]
    runs = _runs(client, "again")
    assert len(runs) == 4
    assert next(x for x in runs if x.info.run_id == third[2].run_id).data.metrics["psnr_at_2x"] == 25.0
    assert len(_runs(client, "again", kind="point")) == 2                 # the old points went with their run

    # an export cut short (no completion tag) is redone, not kept beside the new one
    client.delete_tag(third[0].run_id, "tclab.export_complete")
    fourth = export_mlflow(expand_run_dirs([r]), uri, experiment="again")
    assert fourth[0].created and fourth[0].run_id != third[0].run_id and not fourth[0].replaced
    assert len(_runs(client, "again")) == 4


def test_the_file_store_is_refused_with_the_fix_or_used_when_allowed(reports, tmp_path, monkeypatch):
    _require("mlflow")
    one = [reports / "20261201T110000Z_01_token_redundancy_full"]
    uri = (tmp_path / "fs").as_uri()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        export_mlflow(one, uri)
    except ExportError as e:                      # MLflow 3: the file store is in maintenance mode
        assert "sqlite:///" in str(e) and "MLFLOW_ALLOW_FILE_STORE=true" in str(e)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        export_mlflow(one, uri)
    runs = _runs(_client(uri))
    assert [r.info.run_name for r in runs] == ["20261201T110000Z_01_token_redundancy_full"]
    assert "report.html" in {a.path for a in _client(uri).list_artifacts(runs[0].info.run_id)}


# ---- wrong inputs (no tracker needed) ------------------------------------------------------------------------

def test_tracking_uris_local_stores_and_explicit_servers_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert check_tracking_uri(f"sqlite:///{tmp_path}/a/b.db") == f"sqlite:///{tmp_path}/a/b.db"
    assert check_tracking_uri("file:fs") == (tmp_path / "fs").as_uri()
    assert check_tracking_uri("file:///tmp/x") == "file:///tmp/x"
    assert check_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"   # only when given
    with pytest.raises(ExportError, match=r"sqlite:///mlruns/mlflow\.db"):
        check_tracking_uri("mlruns")
    with pytest.raises(ExportError, match="not supported"):
        check_tracking_uri("databricks://profile")
    with pytest.raises(ExportError, match="database file"):
        check_tracking_uri("sqlite://")
    with pytest.raises(ExportError, match="on this machine"):
        check_tracking_uri("file://otherhost/x")
    with pytest.raises(ExportError, match="give a tracking URI"):
        check_tracking_uri("")


def test_a_folder_that_is_not_a_run_folder_is_refused_before_anything_is_written(reports, tmp_path):
    db = tmp_path / "m.db"
    good = reports / "20261201T110000Z_01_token_redundancy_full"
    with pytest.raises(ExportError, match="not_a_run"):
        export_mlflow([good, reports / "not_a_run"], f"sqlite:///{db}")
    with pytest.raises(ExportError, match="not_a_run"):
        export_tensorboard([good, reports / "not_a_run"], tmp_path / "tb")
    assert not db.exists() and not (tmp_path / "tb").exists()
    with pytest.raises(ExportError, match="no such folder"):
        expand_run_dirs([tmp_path / "missing"])
    with pytest.raises(ExportError, match="not a run folder"):
        expand_run_dirs([reports / "not_a_run"])
    assert expand_run_dirs([good, reports]).count(good) == 1 and len(expand_run_dirs([reports])) == 4


def test_a_missing_package_names_the_install_command(reports, tmp_path, monkeypatch):
    one = [reports / "20261201T110000Z_01_token_redundancy_full"]
    monkeypatch.setitem(sys.modules, "mlflow", None)          # import mlflow -> ImportError
    with pytest.raises(ExportError, match=r"pip install 'tclab\[export\]'") as e:
        export_mlflow(one, f"sqlite:///{tmp_path / 'm.db'}")
    assert "mlflow-skinny==" in str(e.value)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ExportError, match=r"pip install 'tclab\[export\]'"):
        export_tensorboard(one, tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    assert any(p.startswith("mlflow-skinny==") for p in EXPORT_PINS)


# ---- TensorBoard -------------------------------------------------------------------------------------------

def _events(d: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text_of(acc, tag: str) -> str:
    return acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def test_tensorboard_event_files_hold_scalars_images_and_text(reports, tmp_path):
    _require("tensorboard")
    logdir = tmp_path / "tb"
    dirs = expand_run_dirs([reports])
    out = export_tensorboard(dirs, logdir)
    assert out == [logdir / d.name for d in dirs]
    assert sorted(p.name for p in logdir.iterdir()) == sorted(d.name for d in dirs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no staging left

    a = _events(logdir / "20261201T100000Z_01_token_redundancy_full")
    tags = a.Tags()
    assert {"headline/frac_tokens_below_5pct", "headline/gini", "headline/obs2_holds"} <= set(tags["scalars"])
    assert "headline/broken" not in tags["scalars"] and "headline/huge" not in tags["scalars"]
    (s,) = a.Scalars("headline/frac_tokens_below_5pct")
    assert (s.step, s.value) == (0, pytest.approx(0.55))
    assert s.wall_time == pytest.approx(_ms("2026-12-01T10:03:20.500Z") / 1000)
    assert a.Scalars("headline/obs2_holds")[0].value == 1.0
    assert set(tags["images"]) == {"figures/change_heatmap", "figures/change_curves"}
    img = a.Images("figures/change_curves")[0]
    src = reports / "20261201T100000Z_01_token_redundancy_full" / "change_curves.png"
    assert img.encoded_image_string == src.read_bytes() and (img.width, img.height) == (12, 8)
    assert {"run/parameters", "run/identity", "run/headline", "run/description"} <= set(tags["tensors"])
    assert f"| model | {MODEL_A} |" in _text_of(a, "run/parameters")
    assert SHA_A in _text_of(a, "run/identity")
    assert "_hparams_/experiment" in a.PluginTagToContent("hparams")

    sweep = _events(logdir / "20261201T120000Z_02_ablation_predictor_full")
    psnr = sweep.Scalars("points/psnr")
    assert [(e.step, e.value) for e in psnr] == [(0, 100.0), (1, 24.0)]        # the failed point has none
    assert [e.step for e in sweep.Scalars("points/flop_ratio")] == [0, 1]
    assert [e.value for e in sweep.Scalars("points/psnr_ci_low")] == pytest.approx([100.0, 22.6])
    assert "| 1 | learned-static rho=0.2 |" in _text_of(sweep, "run/points")

    failed = _events(logdir / "20261201T140000Z_05_inhouse_report_recheck_FAILED")
    assert "out of memory" in _text_of(failed, "run/identity")
    assert failed.Tags()["scalars"] == []


def test_tensorboard_export_again_keeps_one_copy_per_run(reports, tmp_path):
    _require("tensorboard")
    import shutil

    r = tmp_path / "reports"
    shutil.copytree(reports, r)
    logdir = tmp_path / "tb"
    one = r / "20261201T110000Z_01_token_redundancy_full"
    export_tensorboard([one], logdir)
    first = sorted((logdir / one.name).iterdir())
    export_tensorboard([one], logdir)                                      # unchanged: left as it is
    assert sorted((logdir / one.name).iterdir()) == first

    s = json.loads((one / "summary.json").read_text())
    s["headline"]["gini"] = 0.5
    (one / "summary.json").write_text(json.dumps(s))
    export_tensorboard([one], logdir)                                      # changed: replaced whole
    events = [p for p in (logdir / one.name).iterdir() if p.name.startswith("events.")]
    assert len(events) == 1
    assert [e.value for e in _events(logdir / one.name).Scalars("headline/gini")] == [0.5]
    assert [p.name for p in logdir.iterdir()] == [one.name]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_command_lines_defaults_are_hidden_folders_of_the_reports_folder(tmp_path):
    from tclab.runs.export import default_logdir, default_tracking_uri

    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/.mlflow/mlflow.db"
    assert check_tracking_uri(default_tracking_uri(tmp_path)) == default_tracking_uri(tmp_path)
    assert default_logdir(tmp_path) == tmp_path / ".tensorboard"


def test_a_missing_tracker_package_skips_here_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no_such_tracker not installed: pip install 'tclab\[export\]'"):
        _require("no_such_tracker")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _require("no_such_tracker")
