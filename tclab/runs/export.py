"""Export run folders to experiment trackers: a local MLflow store and TensorBoard event files.

A run folder stays the record; a tracker gets a copy to browse, filter and compare runs in::

    from tclab.runs.export import export_mlflow, export_tensorboard, expand_run_dirs
    export_mlflow(expand_run_dirs(["reports"]), "sqlite:///mlruns/mlflow.db")
    export_tensorboard(expand_run_dirs(["reports"]), "tb")

Both are optional (``pip install 'tclab[export]'``); mlflow and tensorboard are imported only inside
the functions here, and a missing one is an :class:`ExportError` that names the install command.

MLflow (:func:`export_mlflow`)
    One MLflow run per run folder, named as the folder, in one experiment ("tclab" unless told).
    Tags: ``tclab.run`` (the folder name: the key that makes exporting again a no-op), notebook or
    command, tag, status, model and images with their sha256, the git commit (also as MLflow's own
    ``mlflow.source.git.commit``), and each string headline entry as ``headline.<key>``. Params: the
    run's parameters from provenance.json, flattened (``a.b``) and stringified (lists as JSON), values
    over MLflow's 6000 characters cut with a marker (provenance.json, an artefact, has them whole).
    Metrics: every numeric headline entry (bools as 0/1; NaN and infinities skipped). The run's
    description is the report's question and findings (or the error of a failed run). Start and end
    times are the run's own; a failed run is FAILED. Artefacts: report.html, summary.json,
    provenance.json, params.yaml, error.txt, the figures (``*.png``) and the tables (``*.csv``).

    A sweep (summary.json ``points``: one dict per variant) adds one *child run* per point, nested
    under its run in MLflow's runs table: params name, curve, family, knob and the variant's config;
    metrics flop_ratio, time_ratio, psnr, ssim, class_consistency, ... (``x_ci`` as ``x_ci_low`` and
    ``x_ci_high``). Child runs rather than ``psnr/<variant>`` metric keys because MLflow compares runs,
    not keys: selected child runs go straight into its scatter chart (flop_ratio against psnr is the
    sweep's Pareto plot) and its parallel-coordinates view, and the parent's metrics stay the headline
    (a 33-point sweep would otherwise add some 500 metric keys to the parent).

    Exporting again changes nothing for a folder already exported whole with the same content
    (``created=False``). A folder whose provenance.json, summary.json or artefacts changed since (an
    interactive run that finished) or whose export was cut short replaces its MLflow run and children
    (``replaced=True``): the old ones are deleted, so the store never holds a folder twice.

    MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY=true`` unless set otherwise).
    Tracking URIs: ``sqlite:///PATH.db`` (recommended; artefacts go to ``mlartifacts/`` beside the
    database), ``file:PATH`` (MLflow 3 keeps the file store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true`` is set: the error says so), and ``http(s)://`` servers, only when
    passed explicitly (nothing here defaults to a remote server; the export itself is offline).

TensorBoard (:func:`export_tensorboard`)
    Event files in ``<logdir>/<folder name>/``: each numeric headline entry as the scalar
    ``headline/<key>`` (step 0), each sweep metric as ``points/<metric>`` with the point's index as
    its step (the table ``run/points`` names the indices), the figures as images ``figures/<stem>``
    (their PNG bytes as written), parameters, identity, headline, findings and error as text, and the
    parameters with the numeric headline in TensorBoard's HParams dashboard. A folder is written aside
    and renamed into place whole; exporting again skips an unchanged folder and replaces a changed one.

Layer "run folders": imports only :mod:`.index`, :mod:`.layout` and tclab's leaves.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlparse

from .index import RunInfo, _parse_iso, list_runs, read_run
from .layout import REPORT_NAME, is_run_folder, read_json

#: What ``pip install 'tclab[export]'`` brings (pyproject.toml's ``export`` extra).
EXPORT_PINS = ("mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1", "tensorboard==2.21.0")
INSTALL_HINT = "pip install 'tclab[export]'  (or: pip install " + " ".join(EXPORT_PINS) + ")"

DEFAULT_EXPERIMENT = "tclab"
#: Where the command line keeps the trackers' copies unless told: hidden folders of the reports folder, so
#: git ignores them (reports/* is) and index.html never lists them as runs.
MLFLOW_DIRNAME = ".mlflow"
TENSORBOARD_DIRNAME = ".tensorboard"
#: The artefact folder beside a sqlite store's database (MLflow's own name for a server's artefact root).
SQLITE_ARTIFACTS_DIRNAME = "mlartifacts"
#: Files copied into a tracker besides the figures (``*.png``) and tables (``*.csv``).
ARTEFACT_FILES = (REPORT_NAME, "summary.json", "provenance.json", "params.yaml", "error.txt")
ARTEFACT_SUFFIXES = (".png", ".csv")
#: What a run folder's ``status`` becomes in MLflow.
MLFLOW_STATUS = {"ok": "FINISHED", "failed": "FAILED", "running": "RUNNING", "unknown": "FINISHED"}
#: The marker file inside a TensorBoard run folder: which run folder, at which content, it holds.
TB_MARKER = ".tclab-export.json"

# MLflow's limits (mlflow.utils.validation), fixed here so the cutting never depends on its internals.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_BATCH = 100                       # params + tags per log_batch request (metrics: 1000)
_CUT = " ...[cut; see provenance.json]"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- /]+")   # MLflow also takes ':' except on Windows
_COMPLETE_TAG = "tclab.export_complete"
_FINGERPRINT_TAG = "tclab.fingerprint"
_KIND_TAG = "tclab.kind"           # "run" for a run folder, "point" for a sweep point's child run


class ExportError(ValueError):
    """A wrong input to an export (not a run folder, a tracking URI it cannot use, a missing package);
    the message names the fix. A ValueError, so the command line reports it in one line (exit 2)."""


@dataclass
class ExportedRun:
    """One run folder in an MLflow store after :func:`export_mlflow`."""

    run_dir: Path
    run_id: str                          # the MLflow run id
    experiment_id: str
    created: bool                        # False: it was there already, exported whole, unchanged
    replaced: bool = False               # created anew over an earlier export of changed content
    status: str = "FINISHED"             # the MLflow status it has
    point_run_ids: list[str] = field(default_factory=list)   # child runs, one per sweep point, in order


# ---------------------------------------------------------------------------------------------------------------
# Run folders as the trackers see them


def default_tracking_uri(reports_dir: str | os.PathLike) -> str:
    """``sqlite:///<reports>/.mlflow/mlflow.db``: the local store ``tclab export mlflow`` uses unless told."""
    return f"sqlite:///{(Path(reports_dir) / MLFLOW_DIRNAME / 'mlflow.db').resolve()}"


def default_logdir(reports_dir: str | os.PathLike) -> Path:
    """``<reports>/.tensorboard``: the logdir ``tclab export tensorboard`` uses unless told."""
    return Path(reports_dir) / TENSORBOARD_DIRNAME


def expand_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders from command-line paths, in the order given: a run folder is itself, a reports folder its
    runs (oldest first; staging and hidden folders skipped); a folder named twice counts once.

    Raises :class:`ExportError` for a path that is neither (naming it), or when nothing is left.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run_folder(p):
            out.append(p)
        elif p.is_dir() and (runs := list_runs(p)):
            out.extend(r.path for r in reversed(runs))
        elif not p.exists():
            raise ExportError(f"{p}: no such folder; give run folders (reports/<UTC>_<notebook>_<tag>/) or a "
                              "reports folder")
        else:
            raise ExportError(f"{p} is not a run folder (it holds neither provenance.json nor summary.json) nor "
                              "a reports folder with run folders in it")
    seen: set[Path] = set()
    unique = [d for d in out if not (d.resolve() in seen or seen.add(d.resolve()))]
    if not unique:
        raise ExportError("no run folders to export")
    return unique


def _check_run_dirs(run_dirs: Iterable[str | os.PathLike]) -> list[Path]:
    dirs = [Path(d) for d in run_dirs]
    bad = [str(d) for d in dirs if not is_run_folder(d)]
    if bad:
        raise ExportError(f"not a run folder (no provenance.json nor summary.json): {', '.join(bad)}; nothing was "
                          "exported. Pass run folders (reports/<UTC>_<notebook>_<tag>/) or use expand_run_dirs on "
                          "a reports folder")
    names = [d.name for d in dirs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:   # the folder name is the key in both trackers
        raise ExportError(f"two run folders of the same name: {', '.join(twice)}; export them to separate stores")
    return dirs


@dataclass
class _Run:
    """What both trackers need of one run folder."""

    path: Path
    info: RunInfo
    provenance: dict[str, Any]
    summary: dict[str, Any]
    fingerprint: str
    start_ms: int
    end_ms: int | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def command(self) -> str | None:
        c = self.provenance.get("command")
        return " ".join(map(str, c)) if isinstance(c, list) else (str(c) if c else None)

    @property
    def notebook(self) -> str | None:
        return self.info.notebook if self.provenance.get("notebook") else None

    @property
    def git_commit(self) -> str | None:
        git = self.provenance.get("git")
        return str(git["commit"]) if isinstance(git, dict) and git.get("commit") else None

    @property
    def points(self) -> list[dict[str, Any]]:
        pts = self.summary.get("points")
        return [p for p in pts if isinstance(p, dict)] if isinstance(pts, list) else []


def _artefacts(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.name in ARTEFACT_FILES or p.suffix.lower() in ARTEFACT_SUFFIXES))


def _fingerprint(d: Path) -> str:
    """What a tracker copy depends on: provenance.json and summary.json as bytes, the artefacts' names and sizes."""
    h = hashlib.sha256()
    for name in ("provenance.json", "summary.json"):
        p = d / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    for p in _artefacts(d):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()[:32]


def _ms(t: _dt.datetime) -> int:
    return int(round(t.timestamp() * 1000))


def _load(d: Path) -> _Run:
    info = read_run(d)
    prov, summary = read_json(d / "provenance.json"), read_json(d / "summary.json")
    t0 = _parse_iso(info.start_utc)
    start = _ms(t0) if t0 else int(d.stat().st_mtime * 1000)
    t1 = _parse_iso(prov.get("end_utc") if isinstance(prov.get("end_utc"), str) else None)
    if t1 is not None:
        end: int | None = max(_ms(t1), start)
    elif info.duration_s is not None:
        end = start + int(round(info.duration_s * 1000))
    else:
        end = None if info.status == "running" else start
    return _Run(d, info, prov, summary, _fingerprint(d), start, end)


def _finite(v: Any) -> float | None:
    """A metric value: a finite number, a bool as 0/1; None for anything else."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    """The metric entries of a flat dict: numbers and bools; ``[low, high]`` lists as ``k_low``/``k_high``."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if (x := _finite(v)) is not None:
            out[str(k)] = x
        elif isinstance(v, (list, tuple)) and len(v) == 2 and str(k).endswith("_ci"):
            for side, item in zip(("low", "high"), v):
                if (x := _finite(item)) is not None:
                    out[f"{k}_{side}"] = x
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict stays a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _text(v: Any) -> str:
    """A param or tag value: strings as they are, anything else as JSON (lists, null, true/false)."""
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - len(_CUT)] + _CUT


def _key(k: str) -> str:
    """A name MLflow takes for a param, metric or tag: its characters, no empty or '..' path segments, <= 250."""
    k = _KEY_UNSAFE.sub("_", k)
    parts = [p if p not in (".", "..") else "_" for p in k.split("/") if p]
    return ("/".join(parts) or "_")[:_MAX_KEY]


def _unique_keys(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Keys made valid, a clash (two keys that sanitise alike) kept apart with a ``~N`` suffix."""
    out: dict[str, Any] = {}
    for k, v in items:
        key = base = _key(k)
        i = 2
        while key in out:
            key = f"{base[:_MAX_KEY - 4]}~{i}"
            i += 1
        out[key] = v
    return out


def _description(run: _Run) -> str:
    """The MLflow run's description (markdown): what it asked, what it found, or why it failed."""
    lines: list[str] = []
    what = run.command or (f"notebook {run.info.notebook}" if run.notebook else None)
    lines.append(f"tclab run folder `{run.name}`" + (f" ({what}, tag `{run.info.tag}`)" if what else ""))
    if run.info.model or run.info.images:
        lines.append(f"model `{run.info.model or '?'}`, images `{run.info.images or '?'}`")
    if run.info.error:
        lines.append(f"**{run.info.status}**: {run.info.error}")
    report = run.summary.get("report") if isinstance(run.summary.get("report"), dict) else {}
    if isinstance(report.get("question"), str) and report["question"].strip():
        lines.append(f"**Question**: {report['question'].strip()}")
    findings = [f for f in report.get("findings", []) if isinstance(f, dict) and f.get("text")] \
        if isinstance(report.get("findings"), list) else []
    if findings:
        lines.append("**Findings**:\n\n" + "\n".join(
            f"- {f['verdict']}: {f['text']}" if f.get("verdict") else f"- {f['text']}" for f in findings))
    lines.append(f"The report is the artefact `{REPORT_NAME}`." if (run.path / REPORT_NAME).is_file()
                 else "This run has no report.")
    return _cut("\n\n".join(lines), _MAX_TAG_VALUE)


def _run_tags(run: _Run) -> dict[str, str]:
    i = run.info
    tags: dict[str, Any] = {
        "tclab.run": run.name, _KIND_TAG: "run", "tclab.status": i.status, "tclab.tag": i.tag,
        "tclab.notebook": run.notebook, "tclab.command": run.command,
        "tclab.model": i.model, "tclab.model_sha256": i.model_sha256,
        "tclab.images": i.images, "tclab.images_sha256": i.images_sha256,
        "tclab.git_commit": run.git_commit, "tclab.error": i.error,
        "tclab.duration_s": None if i.duration_s is None else f"{i.duration_s:.3f}",
        "tclab.hostname": run.provenance.get("hostname"),
        "tclab.tclab_version": run.provenance.get("tclab_version"),
        "tclab.points": str(len(run.points)) if run.points else None,
        _FINGERPRINT_TAG: run.fingerprint,
        "mlflow.source.name": run.command or (str(run.provenance.get("notebook")) if run.notebook else run.name),
        "mlflow.source.type": "NOTEBOOK" if run.notebook else "LOCAL",
        "mlflow.source.git.commit": run.git_commit,
        "mlflow.note.content": _description(run),
    }
    git = run.provenance.get("git")
    if isinstance(git, dict) and "dirty" in git:
        tags["tclab.git_dirty"] = _text(git["dirty"])
    for k, v in i.headline.items():   # the headline's words (winner, verdicts): filterable, e.g. tags.`headline.x`
        if isinstance(v, str) and v:
            tags[f"headline.{k}"] = v
    return {_key(k): _cut(_text(v), _MAX_TAG_VALUE) for k, v in tags.items() if v not in (None, "")}


def _run_params(run: _Run) -> dict[str, str]:
    params = run.provenance.get("parameters")
    flat = _flatten(params) if isinstance(params, dict) else {}
    return {k: _cut(_text(v), _MAX_PARAM_VALUE) for k, v in _unique_keys(flat.items()).items()}


def _point_label(p: dict[str, Any], i: int) -> str:
    return str(p.get("name") or p.get("label") or f"point {i}")


def _point_params(p: dict[str, Any], i: int) -> dict[str, str]:
    flat: dict[str, Any] = {"index": i, "name": _point_label(p, i)}
    for k, v in p.items():   # the words of a point (curve, family, knob, ...); its numbers are metrics
        if k in ("config", "error", "name") or str(k).endswith("_ci") or _finite(v) is not None:
            continue
        if v not in (None, "", [], {}):
            flat[str(k)] = v
    if isinstance(p.get("config"), dict):   # the variant's settings; not again what the point says itself
        flat.update({f"config.{k}": v for k, v in _flatten(p["config"]).items() if p.get(k, object()) != v})
    return {k: _cut(_text(v), _MAX_PARAM_VALUE) for k, v in _unique_keys(flat.items()).items()
            if v not in (None, "")}


# ---------------------------------------------------------------------------------------------------------------
# MLflow


def _import_mlflow():
    # offline: MLflow 3 otherwise sends usage telemetry to its makers (a user's explicit setting wins)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ExportError(f"exporting to MLflow needs MLflow ({e.name or e} is not installed): "
                          f"{INSTALL_HINT}") from None
    return MlflowClient


def check_tracking_uri(uri: str) -> str:
    """``uri`` as :func:`export_mlflow` uses it: a local path made absolute; refuses what it cannot use.

    ``sqlite:///PATH.db`` (relative to the current folder; ``sqlite:////abs/PATH.db`` absolute),
    ``file:PATH`` / ``file:///abs/PATH``, and ``http(s)://HOST`` (an MLflow server; never a default).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ExportError("give a tracking URI: sqlite:///PATH/mlflow.db (a local store) or file:PATH")
    uri = uri.strip()
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        if not uri.lower().startswith("sqlite:///") or uri[len("sqlite:///"):] in ("", ":memory:"):
            raise ExportError(f"{uri!r}: a sqlite store needs a database file: sqlite:///PATH/mlflow.db "
                              "(relative) or sqlite:////ABSOLUTE/PATH/mlflow.db")
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser()
        return f"sqlite:///{db.resolve()}"
    if scheme == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ExportError(f"{uri!r}: a file store must be on this machine (file:PATH or file:///ABSOLUTE/PATH)")
        return Path(unquote(parsed.path)).expanduser().resolve().as_uri()
    if scheme in ("http", "https"):
        return uri
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        raise ExportError(f"{uri!r} is a path, not a tracking URI: use sqlite:///{uri.rstrip('/')}"
                          f"{'' if uri.endswith('.db') else '/mlflow.db'} (recommended) or file:{uri}")
    raise ExportError(f"tracking URI scheme {scheme!r} is not supported: use sqlite:///PATH/mlflow.db or file:PATH "
                      "(local stores), or pass an http(s):// MLflow server explicitly")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's store emits SQLAlchemy deprecation warnings and INFO lines about creating its tables (its own
    and alembic's loggers) that say nothing about the export; errors and warnings still show."""
    import logging

    with contextlib.suppress(ImportError):
        import mlflow  # noqa: F401 (it sets its loggers' levels on import: import first, then quieten them)
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\..*")
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _client(uri: str):
    MlflowClient = _import_mlflow()
    if uri.startswith("sqlite:"):
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError as e:
            raise ExportError(f"a sqlite MLflow store needs {e.name} (mlflow-skinny does not bring it): "
                              f"{INSTALL_HINT}") from None
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as e:   # a store MLflow will not open (the file store, a newer schema, ...)
        text = str(e)
        if uri.startswith("file:") and ("maintenance mode" in text or "MLFLOW_ALLOW_FILE_STORE" in text):
            path = Path(urlparse(uri).path)
            raise ExportError(f"the installed MLflow no longer writes a file store ({uri}) unless "
                              f"MLFLOW_ALLOW_FILE_STORE=true is set: use --tracking-uri sqlite:///{path}/mlflow.db "
                              "instead (recommended), or set MLFLOW_ALLOW_FILE_STORE=true") from None
        first = text.splitlines()[0] if text else ""
        raise ExportError(f"cannot open the MLflow store {uri}: {type(e).__name__}: {first}") from e


def _experiment_id(client, uri: str, name: str) -> str:
    if not name or not str(name).strip():
        raise ExportError("the MLflow experiment needs a name")
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise ExportError(f"the MLflow experiment {name!r} is deleted in {uri}: restore it (mlflow experiments "
                              "restore) or export to another experiment name")
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):   # beside the database, not the current folder's ./mlruns (MLflow's default)
        location = (Path(uri[len("sqlite:///"):]).parent / SQLITE_ARTIFACTS_DIRNAME).as_uri()
    return client.create_experiment(name, artifact_location=location, tags={"tclab": "run folders"})


def _exported(client, experiment_id: str) -> dict[str, list[Any]]:
    """The active tclab runs of the experiment by folder name (one query, paged; no quoting of names)."""
    by_name: dict[str, list[Any]] = {}
    for r in _search_all(client, experiment_id, f"tags.`{_KIND_TAG}` = 'run'"):
        by_name.setdefault(r.data.tags.get("tclab.run", ""), []).append(r)
    return by_name


def _search_all(client, experiment_id: str, filter_string: str) -> list[Any]:
    """Every active run of the experiment that ``filter_string`` matches, page by page."""
    found: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _children(client, experiment_id: str, run_id: str) -> list[Any]:
    """A run's child runs (its sweep points), in point order."""
    kids = _search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = '{run_id}'")
    return sorted(kids, key=lambda c: int(c.data.tags.get("tclab.point", "0") or 0))


def _delete_with_children(client, experiment_id: str, run_id: str) -> None:
    for c in _children(client, experiment_id, run_id):
        client.delete_run(c.info.run_id)
    client.delete_run(run_id)


def _log(client, run_id: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str],
         timestamp: int) -> None:
    from mlflow.entities import Metric, Param, RunTag

    ps = [Param(k, v) for k, v in params.items()]
    ts = [RunTag(k, v) for k, v in tags.items()]
    ms = [Metric(k, v, timestamp, 0) for k, v in metrics.items()]
    for i in range(0, len(ps), _BATCH):
        client.log_batch(run_id, params=ps[i:i + _BATCH])
    for i in range(0, len(ts), _BATCH):
        client.log_batch(run_id, tags=ts[i:i + _BATCH])
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i:i + 1000])


def _export_points(client, experiment_id: str, run: _Run, parent_id: str) -> list[str]:
    ids = []
    for i, p in enumerate(run.points):
        error = p.get("error") if isinstance(p.get("error"), str) else ""
        tags = {"mlflow.parentRunId": parent_id, "tclab.run": run.name, _KIND_TAG: "point", "tclab.point": str(i),
                "mlflow.source.name": run.name}
        if error:
            tags["tclab.error"] = _cut(error, _MAX_TAG_VALUE)
            tags["mlflow.note.content"] = _cut(f"This point failed: {error}", _MAX_TAG_VALUE)
        child = client.create_run(experiment_id, start_time=run.start_ms, tags=tags,
                                  run_name=_point_label(p, i)[:_MAX_KEY])
        cid = child.info.run_id
        metrics = _unique_keys(_numbers({k: v for k, v in p.items() if k != "config"}).items())
        _log(client, cid, _point_params(p, i), metrics, {}, run.end_ms or run.start_ms)
        client.set_terminated(cid, "FAILED" if error else "FINISHED", end_time=run.end_ms or run.start_ms)
        ids.append(cid)
    return ids


def _export_one(client, experiment_id: str, run: _Run) -> tuple[str, list[str]]:
    tags = _run_tags(run)
    status = MLFLOW_STATUS.get(run.info.status, "FINISHED")
    created = client.create_run(experiment_id, start_time=run.start_ms, tags={_KIND_TAG: "run", "tclab.run": run.name},
                                run_name=run.name)
    rid = created.info.run_id
    try:
        metrics = _unique_keys(_numbers(run.info.headline).items())
        _log(client, rid, _run_params(run), metrics, tags, run.end_ms or run.start_ms)
        for p in _artefacts(run.path):
            client.log_artifact(rid, str(p))
        children = _export_points(client, experiment_id, run, rid)
        if status != "RUNNING":
            client.set_terminated(rid, status, end_time=run.end_ms)
        client.set_tag(rid, _COMPLETE_TAG, "1")   # last: a run without it is a cut-short export, redone next time
    except BaseException:
        with contextlib.suppress(Exception):
            _delete_with_children(client, experiment_id, rid)
        raise
    return rid, children


def export_mlflow(run_dirs: Iterable[str | os.PathLike], tracking_uri: str,
                  experiment: str = DEFAULT_EXPERIMENT) -> list[ExportedRun]:
    """Copy run folders into an MLflow store: one MLflow run each (plus a child run per sweep point).

    ``tracking_uri``: ``sqlite:///PATH.db`` (recommended), ``file:PATH`` (needs MLFLOW_ALLOW_FILE_STORE=true
    with MLflow 3), or an explicit ``http(s)://`` server. Every folder is checked before anything is written.
    A folder already exported whole with the same content is left as it is (``created=False``); one that
    changed, or whose export was cut short, replaces its old MLflow run (``replaced=True``). Returns one
    :class:`ExportedRun` per folder, in the order given. Raises :class:`ExportError` for a wrong input.
    """
    dirs = _check_run_dirs(run_dirs)
    uri = check_tracking_uri(tracking_uri)
    runs = [_load(d) for d in dirs]
    with _quiet():
        client = _client(uri)
        experiment_id = _experiment_id(client, uri, experiment)
        existing = _exported(client, experiment_id)
        out: list[ExportedRun] = []
        for run in runs:
            before = existing.get(run.name, [])
            same = [r for r in before if r.data.tags.get(_COMPLETE_TAG) == "1"
                    and r.data.tags.get(_FINGERPRINT_TAG) == run.fingerprint]
            if same:
                keep = same[0]
                order = _children(client, experiment_id, keep.info.run_id)
                for extra in before:   # a duplicate (two exports at once): keep one
                    if extra.info.run_id != keep.info.run_id:
                        _delete_with_children(client, experiment_id, extra.info.run_id)
                out.append(ExportedRun(run.path, keep.info.run_id, experiment_id, created=False,
                                       status=keep.info.status, point_run_ids=[c.info.run_id for c in order]))
                continue
            replaced = any(r.data.tags.get(_COMPLETE_TAG) == "1" for r in before)
            for old in before:
                _delete_with_children(client, experiment_id, old.info.run_id)
            rid, children = _export_one(client, experiment_id, run)
            out.append(ExportedRun(run.path, rid, experiment_id, created=True, replaced=replaced,
                                   status=MLFLOW_STATUS.get(run.info.status, "FINISHED"), point_run_ids=children))
    return out


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard


def _import_tensorboard():
    try:
        import tensorboard  # noqa: F401
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError as e:
        raise ExportError(f"exporting to TensorBoard needs the tensorboard package ({e.name or e} is not "
                          f"installed): {INSTALL_HINT}") from None
    return SummaryWriter, Summary, hparams


def _md_table(rows: Iterable[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    def cell(v: Any) -> str:
        return _text(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _text_summary(tag: str, markdown: str):
    """A text-dashboard entry named ``tag`` itself (torch's add_text appends ``/text_summary``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="text", content=TextPluginData(version=0).SerializeToString()))
    tensor = TensorProto(dtype="DT_STRING", string_val=[markdown.encode("utf-8")],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])


def _png_summary(Summary, tag: str, png: Path):
    from PIL import Image

    data = png.read_bytes()
    with Image.open(png) as im:
        w, h = im.size
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(im.mode, 3)
    return Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
        height=h, width=w, colorspace=channels, encoded_image_string=data))])


def _write_tensorboard(run: _Run, out: Path) -> None:
    SummaryWriter, Summary, hparams = _import_tensorboard()
    wall = (run.end_ms or run.start_ms) / 1000.0
    writer = SummaryWriter(log_dir=str(out), flush_secs=3600)
    try:
        fw = writer._get_file_writer()
        i = run.info
        headline = _unique_keys(_numbers(i.headline).items())
        for k, v in headline.items():
            writer.add_scalar(f"headline/{k}", v, 0, walltime=wall)
        points = run.points
        for n, p in enumerate(points):
            for k, v in _unique_keys(_numbers({k: v for k, v in p.items() if k != "config"}).items()).items():
                writer.add_scalar(f"points/{k}", v, n, walltime=wall)
        texts: dict[str, str] = {"run/description": _description(run)}
        identity = [("run folder", run.name), ("status", i.status), ("notebook", run.notebook),
                    ("command", run.command),
                    ("tag", i.tag), ("start (UTC)", i.start_utc), ("duration (s)", i.duration_s),
                    ("model", i.model), ("model sha256", i.model_sha256), ("images", i.images),
                    ("images sha256", i.images_sha256), ("git commit", run.git_commit), ("error", i.error)]
        texts["run/identity"] = _md_table([r for r in identity if r[1] not in (None, "")], ("", ""))
        params = run.provenance.get("parameters") if isinstance(run.provenance.get("parameters"), dict) else {}
        if params:
            texts["run/parameters"] = _md_table(sorted(_flatten(params).items()), ("parameter", "value"))
        if i.headline:
            texts["run/headline"] = _md_table(i.headline.items(), ("headline", "value"))
        if points:
            cols = [c for c in ("flop_ratio", "time_ratio", "psnr", "ssim", "class_consistency")
                    if any(c in p for p in points)]
            texts["run/points"] = _md_table([(n, _point_label(p, n), *(p.get(c) for c in cols))
                                             for n, p in enumerate(points)], ("step", "point", *cols))
        for tag, md in texts.items():
            fw.add_summary(_text_summary(tag, md), 0, wall)
        for png in (p for p in _artefacts(run.path) if p.suffix.lower() == ".png"):
            try:
                fw.add_summary(_png_summary(Summary, f"figures/{_key(png.stem)}", png), 0, wall)
            except OSError:   # not a readable PNG: the other figures still go
                continue
        # HParams dashboard: the run's parameters against its numeric headline (one row per run folder)
        hp = {k: (v if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))
                  else _text(v)) for k, v in _flatten(params).items()}
        hp.update({"tclab.run": run.name, "tclab.status": i.status})
        for summary in hparams(hp, {f"headline/{k}": v for k, v in headline.items()}):
            fw.add_summary(summary, 0, wall)
    finally:
        writer.close()


def export_tensorboard(run_dirs: Iterable[str | os.PathLike], logdir: str | os.PathLike) -> list[Path]:
    """Write TensorBoard event files for run folders: ``<logdir>/<folder name>/`` each; returns those folders.

    Every folder is checked before anything is written. A run's folder is written aside and renamed into
    place whole; exporting again leaves an unchanged one as it is and replaces a changed one (never two
    copies of a run). Raises :class:`ExportError` for a wrong input or a missing tensorboard package.
    """
    dirs = _check_run_dirs(run_dirs)
    _import_tensorboard()
    root = Path(logdir)
    root.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for d in dirs:
        run = _load(d)
        target = root / run.name
        marker = read_json(target / TB_MARKER)
        if marker.get("fingerprint") == run.fingerprint and marker.get("run") == run.name:
            out.append(target)
            continue
        # staged beside the logdir, not in it: TensorBoard would list a half-written folder as a run
        stage = Path(tempfile.mkdtemp(prefix=f".{root.name}.{run.name}.", dir=root.resolve().parent))
        try:
            _write_tensorboard(run, stage)
            (stage / TB_MARKER).write_text(json.dumps({"run": run.name, "fingerprint": run.fingerprint,
                                                       "source": str(d.resolve()), "written": time.time()}) + "\n")
            if target.exists():
                old = stage.with_name(stage.name + ".old")
                os.replace(target, old)
                os.replace(stage, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, target)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        out.append(target)
    return out
