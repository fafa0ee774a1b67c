"""Runs as data, end to end as a user would do it (issue 20's "done when"): notebook 01 on two models, the
embedded one and a team's latent ``DiTPipeline``, run with the ``tclab`` command from a folder of the user's
(not the repository); then ``tclab runs list|compare`` show the two side by side, and ``tclab export mlflow``
puts them in a local MLflow store, read back with MLflow's own client. (``tclab evaluate``'s run folder
in the table and index: tests/test_evaluate.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_reference
from tests.standins import imagenet_like_labels, write_latent_pipeline

SMALL_01 = ["-p", "num_steps", "4", "-p", "num_samples", "2", "-p", "sdedit_images", "2"]


def tclab(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("tclab")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from tclab.cli import main; sys.exit(main())"]
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"`tclab {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n" \
                                 f"{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    work = tmp_path_factory.mktemp("team")
    write_latent_pipeline(work / "team dit", id2label=imagenet_like_labels(1000, {7: "Blob-Things"}), num_layers=4,
                          sample_size=16)
    env = {**os.environ, "TCLAB_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("TCLAB_REPORTS_DIR", None)   # runs go where the user says
    tclab("run", "01", "--reports", "reports", *SMALL_01, "--tag", "embedded", cwd=work, env=env)
    tclab("run", "01", "--reports", "reports", *SMALL_01, "-p", "model", "team dit", "--tag", "team", cwd=work, env=env)
    return work, env


def test_runs_list_and_compare_show_the_two_models_side_by_side(two_models):
    work, env = two_models
    listed = tclab("runs", "list", "--reports", "reports", "--notebook", "01", cwd=work, env=env).stdout
    assert "2 run(s)" in listed and "shapes-dit" in listed and "team dit" in listed
    out = tclab("runs", "compare", "01_token_redundancy_embedded", "01_token_redundancy_team", "--reports", "reports",
                cwd=work, env=env).stdout
    model = next(line for line in out.splitlines() if line.startswith("model"))
    assert "shapes-dit (" in model and "team dit (" in model          # both models, with their weights hashes
    assert "parameters that differ" in out and '"team dit"' in out
    figure = next(line for line in out.splitlines() if "rank correlation of adjacent steps" in line)
    a, b = json.loads((work / "reports" / runs_named(work, "embedded") / "summary.json").read_text()), \
        json.loads((work / "reports" / runs_named(work, "team") / "summary.json").read_text())
    assert f"{a['headline']['adjacent_rank_corr']:.3g}" in figure and f"{b['headline']['adjacent_rank_corr']:.3g}" in figure
    index = (work / "reports" / "index.html").read_text()
    assert runs_named(work, "embedded") in index and runs_named(work, "team") in index


def runs_named(work: Path, tag: str) -> str:
    (name,) = [p.name for p in (work / "reports").iterdir() if p.is_dir() and p.name.endswith(f"_01_token_redundancy_{tag}")]
    return name


@pytest.mark.filterwarnings("ignore:.*noload.*")   # SQLAlchemy 2.1 about MLflow's own store code
def test_the_mlflow_store_holds_both_runs(two_models):
    require_reference("mlflow", "pip install -e '.[export]'")
    work, env = two_models
    uri = f"sqlite:///{work / 'mlflow.db'}"
    out = tclab("export", "mlflow", "--reports", "reports", "--notebook", "01", "--tracking-uri", uri,
                cwd=work, env=env).stdout
    assert "2 run(s) exported" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tclab")
    found = {r.data.tags["tclab.run"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {runs_named(work, "embedded"), runs_named(work, "team")}
    team = found[runs_named(work, "team")]
    summary = json.loads((work / "reports" / runs_named(work, "team") / "summary.json").read_text())
    assert team.data.params["model"] == "team dit" and team.info.status == "FINISHED"
    assert team.data.metrics["adjacent_rank_corr"] == pytest.approx(summary["headline"]["adjacent_rank_corr"])
    assert "report.html" in {f.path for f in client.list_artifacts(team.info.run_id)}
    again = tclab("export", "mlflow", "--reports", "reports", "--tracking-uri", uri, cwd=work, env=env).stdout
    assert "2 already there" in again and len(client.search_runs([exp.experiment_id])) == 2
