"""The run table: every run folder of a reports folder as rows of ``<reports>/runs.sqlite``, to query.

Teams compare runs over weeks ("did last night's model change the redundancy?", "which setting won on
every model?"). Each run folder stays the record of what happened; this table is its index, one flat
row per run (``runs``) and, for sweeps (notebooks 02-04), one row per measured variant
(``variants``). It is derived data: :func:`sync` brings it up to date with the folders (a run added,
rewritten or removed since), :func:`rebuild` recreates it from them, and every run that ends (a
notebook under ``tclab run``, one run by hand in JupyterLab, ``tclab evaluate``/``sample``, a
scheduled job) syncs it before ``index.html`` is rendered *from it* (:func:`write_index`).

Why SQLite, not a Parquet file: runs end concurrently (scheduled jobs, two notebooks, torchrun
commands) and each adds its row. SQLite gives that for free, a transaction per writer under a file
lock, readers never see half a write, and it ships with Python. A Parquet file cannot be appended
to: every writer would rewrite the whole file under a lock of our own. For a Parquet copy, for
pyarrow or Spark, ``table().to_parquet(F)`` or ``tclab runs list --parquet F``. The journal is
SQLite's default rollback journal (not WAL, which needs shared memory that network file systems
do not give), and a writer waits up to :data:`BUSY_TIMEOUT_S` for another.

Read it with :func:`table` (a pandas frame: one row per run, ``param.<name>`` and
``headline.<name>`` columns flattened out; ``variants=True`` for the variant rows), the command line
(``tclab runs list|show|compare|rebuild``) or any SQLite client. A reports folder you may not write
(a shared, read-only copy) is read into memory instead; a table file that is not a database is
rebuilt, with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..report import KeyNumber
from ..sweep_summary import SweepSummary, SweepSummaryError
from .index import (GATES_FILE, HUMAN_VERDICT_FILE, RunInfo, _gates_of, _replace_atomically, index_lock, read_run,
                    render_index)
from .layout import _find_reports_dir, _read_json_noting, is_run_folder
from .origin import _iso

#: The table's file inside the reports folder.
TABLE_NAME = "runs.sqlite"
#: The table's layout; a file of another version is rebuilt from the folders (it is derived data).
TABLE_VERSION = 1
#: Seconds a writer waits for another writer's transaction before giving up.
BUSY_TIMEOUT_S = 60.0

# name, SQLite type, what it is. The runs table, one row per run folder.
RUN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "TEXT PRIMARY KEY", "the run folder's name: <UTC start>_<notebook or command>_<tag>[_FAILED]"),
    ("kind", "TEXT", "'notebook' or 'command' (tclab evaluate / sample)"),
    ("notebook", "TEXT", "the notebook's stem, or the command ('evaluate', 'sample')"),
    ("tag", "TEXT", "the run's tag; a scheduled job's runs carry the job's name"),
    ("status", "TEXT", "ok, failed, running (interactive, unfinished) or unknown"),
    ("start_utc", "TEXT", "ISO 8601 UTC"),
    ("end_utc", "TEXT", "ISO 8601 UTC"),
    ("duration_s", "REAL", "seconds"),
    ("model", "TEXT", "the model parameter: a load_dit spec or a model folder"),
    ("model_sha256", "TEXT", "SHA-256 of the model weights"),
    ("images", "TEXT", "the images parameter: an image folder, or 'shapes'"),
    ("images_sha256", "TEXT", "SHA-256 of the image set's manifest"),
    ("parameters", "TEXT", "JSON: every parameter the run used"),
    ("headline", "TEXT", "JSON: summary.json's flat headline figures"),
    ("figures", "TEXT", "JSON: the key figures the index shows (key, label, value, unit, note)"),
    ("settings", "TEXT", "JSON: a sweep's settings (num_steps, seed, ...), else null"),
    ("best_under_budget", "TEXT", "JSON: a sweep's recommended point (name, cost, quality, config), else null"),
    ("summary_error", "TEXT", "why a sweep's summary.json could not be read, else null"),
    ("report", "TEXT", "the report's file name inside the folder"),
    ("error", "TEXT", "a failed run's one-line error"),
    ("problems", "TEXT", "JSON: what could not be read from the folder"),
    ("gate_status", "TEXT", "a scheduled job's quality gates (gates.json): 'passed', 'failed' (GATE FAILED), else null"),
    ("gates", "TEXT", "JSON: gates.json, each gate with its figure, threshold, value, interval and note"),
    ("human_verdict", "TEXT", "JSON: ratings_summary.json, the blind A/B human verdict (tclab.rating), else null"),
    ("git_commit", "TEXT", "the tclab checkout's commit"),
    ("hostname", "TEXT", "where it ran"),
    ("tclab_version", "TEXT", ""),
    ("stamp", "TEXT", "the folder files' sizes and times when the row was read: a change re-reads it"),
)

# The variants table, one row per point of a sweep's table (summary.json ``points``).
VARIANT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "TEXT", "the run folder"),
    ("point", "INTEGER", "the point's row in the sweep table, from 0"),
    ("name", "TEXT", "the variant, e.g. 'learned-static rho=0.2'"),
    ("curve", "TEXT", "its curve in the Pareto plot"),
    ("family", "TEXT", "ablation, reference (full compute, fewer steps) or peer"),
    ("knob", "TEXT", "the knob turned along its curve"),
    ("flop_ratio", "REAL", "FLOPs / full compute's"),
    ("time_ratio", "REAL", "wall-clock / full compute's"),
    ("psnr", "REAL", "dB against full compute, same seeds"),
    ("psnr_ci_low", "REAL", ""), ("psnr_ci_high", "REAL", ""),
    ("ssim", "REAL", ""), ("lpips", "REAL", ""),
    ("class_consistency", "REAL", "fraction of samples classified as their class"),
    ("fid", "REAL", ""), ("kid", "REAL", ""),
    ("error", "TEXT", "why this point failed, else ''"),
    ("best_under_budget", "INTEGER", "1 for the sweep's recommended point (summary.json best_under_budget)"),
    ("config", "TEXT", "JSON: the point's config (cache: the TokenCache setting, null for references)"),
)

_VARIANT_NUMBERS = ("flop_ratio", "time_ratio", "psnr", "ssim", "lpips", "class_consistency", "fid", "kid")


class RunTableError(ValueError):
    """A query the run table cannot answer (an unknown run, an ambiguous name); the message says which."""


def table_path(reports_dir: str | os.PathLike) -> Path:
    return Path(reports_dir) / TABLE_NAME


# ---- reading a run folder into rows ----------------------------------------------------------------

def _stamp(d: Path) -> str:
    """What changes when a run folder's record changes: the size and time of provenance.json, summary.json,
    gates.json (written after the run by its job's gates) and ratings_summary.json (after people rated it)."""
    parts = []
    for name in ("provenance.json", "summary.json", GATES_FILE, HUMAN_VERDICT_FILE):
        try:
            st = (d / name).stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:-")
    return ";".join(parts)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _json(v: Any) -> str:
    return json.dumps(v, default=str, sort_keys=False)


def run_rows(d: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run row and the variant rows of run folder ``d`` (:data:`RUN_COLUMNS`, :data:`VARIANT_COLUMNS`).

    Read through :func:`tclab.runs.read_run`, so a corrupt or missing file never raises: the row says
    what could not be read in ``problems``. A sweep's summary is read as a
    :class:`tclab.sweep_summary.SweepSummary`; one it cannot read keeps its run row, with the reason in
    ``summary_error`` and no variant rows.
    """
    d = Path(d)
    info = read_run(d)
    prov = _read_json_noting(d / "provenance.json", [])
    raw = _read_json_noting(d / "summary.json", [])
    settings = summary_error = best_point = None
    variants: list[dict[str, Any]] = []
    if "points" in raw or "best_under_budget" in raw:   # a sweep (tclab.ablation.summarise_sweep)
        try:
            sweep = SweepSummary.from_dict(raw, source=d / "summary.json")
        except SweepSummaryError as e:
            summary_error = str(e)
        else:
            settings = ({k: v for k, v in sweep.settings.to_dict().items() if v is not None}   # what it recorded
                        if sweep.settings else None)
            best_point = sweep.best_under_budget.to_dict() if sweep.best_under_budget else None
            best = sweep.best_under_budget.name if sweep.best_under_budget else None
            variants = [_variant_row(info.path.name, i, p, best) for i, p in enumerate(sweep.points or ())]
    git = prov.get("git") if isinstance(prov.get("git"), dict) else {}
    row = {
        "run": d.name, "kind": "command" if prov.get("command") else "notebook", "notebook": info.notebook,
        "tag": info.tag, "status": info.status, "start_utc": info.start_utc or None,
        "end_utc": prov.get("end_utc") if isinstance(prov.get("end_utc"), str) else None,
        "duration_s": info.duration_s, "model": info.model, "model_sha256": info.model_sha256,
        "images": info.images, "images_sha256": info.images_sha256,
        "parameters": _json(prov.get("parameters") if isinstance(prov.get("parameters"), dict) else {}),
        "headline": _json(info.headline),
        "figures": _json([{"key": f.key, "label": f.label, "value": f.value, "unit": f.unit, "note": f.note}
                          for f in info.figures]),
        "settings": _json(settings) if settings is not None else None, "summary_error": summary_error,
        "best_under_budget": _json(best_point) if best_point is not None else None,
        "report": info.report, "error": info.error, "problems": _json(info.problems),
        "gate_status": info.gate_status,
        "gates": _json(gates) if (gates := _read_json_noting(d / GATES_FILE, [])) else None,
        "human_verdict": _json(info.human) if info.human else None,
        "git_commit": git.get("commit") if isinstance(git.get("commit"), str) else None,
        "hostname": prov.get("hostname") if isinstance(prov.get("hostname"), str) else None,
        "tclab_version": prov.get("tclab_version") if isinstance(prov.get("tclab_version"), str) else None,
        "stamp": _stamp(d),
    }
    return row, variants


def _variant_row(run: str, i: int, p: Any, best: str | None) -> dict[str, Any]:
    p = p if isinstance(p, dict) else {}
    ci = p.get("psnr_ci") if isinstance(p.get("psnr_ci"), list) and len(p["psnr_ci"]) == 2 else [None, None]
    text = {k: p.get(k) if isinstance(p.get(k), str) else "" for k in ("name", "curve", "family", "knob", "error")}
    return {"run": run, "point": i, **{k: text[k] for k in ("name", "curve", "family", "knob")},
            **{k: _finite(p.get(k)) for k in _VARIANT_NUMBERS},
            "psnr_ci_low": _finite(ci[0]), "psnr_ci_high": _finite(ci[1]), "error": text["error"],
            "best_under_budget": int(best is not None and text["name"] == best),
            "config": _json(p.get("config")) if p.get("config") is not None else None}


def _run_folders(reports: Path) -> list[Path]:
    """The run folders of ``reports``, as :func:`tclab.runs.list_runs` finds them (a folder, not hidden, with
    provenance.json or summary.json), without reading them: a sync reads only the folders that changed."""
    if not reports.is_dir():
        return []
    return [d for d in reports.iterdir() if not d.name.startswith(".") and is_run_folder(d)]


# ---- the SQLite file -----------------------------------------------------------------------------

def _schema(con: sqlite3.Connection) -> None:
    cols = ", ".join(f"{n} {t}" for n, t, _ in RUN_COLUMNS)
    vcols = ", ".join(f"{n} {t}" for n, t, _ in VARIANT_COLUMNS)
    con.executescript(f"""
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE IF NOT EXISTS runs ({cols});
        CREATE TABLE IF NOT EXISTS variants ({vcols}, PRIMARY KEY (run, point));
        CREATE INDEX IF NOT EXISTS runs_by_notebook ON runs (notebook, start_utc);
        CREATE INDEX IF NOT EXISTS runs_by_model ON runs (model_sha256);
    """)
    con.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(TABLE_VERSION),))


def _connect(path: Path | str) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    con.row_factory = sqlite3.Row
    return con


def _version(con: sqlite3.Connection) -> int | None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return int(row[0]) if row and str(row[0]).isdigit() else None


def _upsert(con: sqlite3.Connection, row: dict[str, Any], variants: list[dict[str, Any]]) -> None:
    names = [n for n, _, _ in RUN_COLUMNS]
    con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [row[n] for n in names])
    con.execute("DELETE FROM variants WHERE run = ?", (row["run"],))
    vnames = [n for n, _, _ in VARIANT_COLUMNS]
    con.executemany(f"INSERT INTO variants ({', '.join(vnames)}) VALUES ({', '.join('?' * len(vnames))})",
                    [[v[n] for n in vnames] for v in variants])


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")   # take the write lock now: two syncs never interleave
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _fill(con: sqlite3.Connection, reports: Path, only: Sequence[Path] | None = None) -> int:
    """Bring the table in ``con`` up to date with the folders (``only``: just these); returns rows written."""
    written = 0
    with _transaction(con):   # the folders are listed and the rows read under the write lock: no row a writer
        # added meanwhile is taken for a removed folder
        folders = {p.name: p for p in (only if only is not None else _run_folders(reports))}
        known = {r["run"]: r["stamp"] for r in con.execute("SELECT run, stamp FROM runs")}
        if only is None:   # folders removed (or renamed) since: their rows go
            for gone in set(known) - set(folders):
                con.execute("DELETE FROM runs WHERE run = ?", (gone,))
                con.execute("DELETE FROM variants WHERE run = ?", (gone,))
        for name, d in folders.items():
            if not d.is_dir():
                continue
            if known.get(name) == _stamp(d):
                continue
            _upsert(con, *run_rows(d))
            written += 1
    return written


def _in_memory(reports: Path) -> sqlite3.Connection:
    con = _connect(":memory:")
    _schema(con)
    _fill(con, reports)
    return con


def _warn(message: str) -> None:
    print(f"tclab: {message}", file=sys.stderr)


def rebuild(reports_dir: str | os.PathLike) -> Path:
    """Recreate ``<reports>/runs.sqlite`` from the run folders. A table that is a usable database is emptied and
    refilled in one transaction (readers see the old rows or the new ones; other processes keep writing to the
    same file); one that is not (garbage, another layout) is built aside and renamed over it, with the mode of
    the old file (a group-shared folder stays shared). A failed rebuild leaves the old table."""
    reports = Path(reports_dir)
    if not reports.is_dir():
        raise FileNotFoundError(f"reports folder {reports} does not exist; pass the folder your runs are in "
                                "(--reports DIR)")
    path = table_path(reports)
    if path.is_file() and _usable(path):
        con = _connect(path)
        try:
            with _transaction(con):
                con.execute("DELETE FROM runs")
                con.execute("DELETE FROM variants")
            _fill(con, reports)
        finally:
            con.close()
        return path
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=reports, prefix=f".{TABLE_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        con = _connect(tmp)
        try:
            _schema(con)
            _fill(con, reports)
        finally:
            con.close()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usable(path: Path) -> bool:
    """Whether ``path`` is a run table of this layout (then it is refilled in place, never replaced)."""
    try:
        con = _connect(path)
        try:
            return _version(con) == TABLE_VERSION and _columns(con) == [n for n, _, _ in RUN_COLUMNS]
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False


def _open(reports: Path, only: Sequence[Path] | None = None) -> sqlite3.Connection:
    """The reports folder's table, synced with its folders (``only``: just these). A file of another layout,
    or one that is not a database, is rebuilt; a folder that cannot be written is read into memory."""
    path = table_path(reports)
    if not reports.is_dir():
        return _in_memory(reports)
    for attempt in (0, 1):
        try:
            con = _connect(path)
            try:
                version = _version(con)
                if version is None and path.stat().st_size > 0 and not _has_tables(con):
                    raise sqlite3.DatabaseError("no tclab tables")
                if version not in (None, TABLE_VERSION):
                    raise sqlite3.DatabaseError(f"layout version {version}, this tclab writes {TABLE_VERSION}")
                if version is not None and _columns(con) != [n for n, _, _ in RUN_COLUMNS]:
                    raise sqlite3.DatabaseError("its runs table has other columns than this tclab writes")
                _schema(con)
                _fill(con, reports, only)
                return con
            except BaseException:
                con.close()
                raise
        except sqlite3.OperationalError as e:
            if "readonly" in str(e) or "unable to open" in str(e) or not os.access(reports, os.W_OK):
                # a read-only copy of someone's reports: read the folders, write nothing
                _warn(f"{path} cannot be written here ({e}); reading the run folders into memory instead")
                return _in_memory(reports)
            raise RunTableError(f"the run table {path} is busy or unusable ({e}; a writer waits {BUSY_TIMEOUT_S:g} s "
                                "for another): try again, or recreate it with `tclab runs rebuild`") from e
        except sqlite3.DatabaseError as e:
            if attempt:
                raise
            _warn(f"{path} could not be used ({e}); rebuilding it from the run folders")
            rebuild(reports)
    raise AssertionError("unreachable")


def _columns(con: sqlite3.Connection) -> list[str]:
    return [r[1] for r in con.execute("PRAGMA table_info(runs)")]


def _has_tables(con: sqlite3.Connection) -> bool:
    return bool(con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone())


def sync(reports_dir: str | os.PathLike, only: Sequence[str | os.PathLike] | None = None) -> Path:
    """Bring ``<reports>/runs.sqlite`` up to date with the run folders (``only``: just these run folders,
    e.g. the one that just ended) and return its path. Safe to call from many processes at once."""
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    con = _open(reports, [Path(p) for p in only] if only is not None else None)
    con.close()
    return table_path(reports)


def write_index(reports_dir: str | os.PathLike) -> Path:
    """Sync the run table, then rewrite ``<reports_dir>/index.html`` from it (:func:`tclab.runs.render_index`).

    Runs table: start (links the report), notebook, tag, model and image set (short names, hash codes),
    status (with a failed run's error), duration, two or three headline figures (summary.json
    ``report.key_numbers`` picked by ``report.index_keys``, else the first ``headline`` entries) with
    their change since the previous *successful* run of the same notebook and tag, and links (report,
    folder, error.txt). All links are relative to the reports folder. Written atomically; a corrupt
    run folder is listed with what could be read.
    """
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    out = reports / "index.html"
    with index_lock(reports):   # read and write as one: the last writer has read every run that ended before it
        con = _open(reports)
        try:
            infos = [_info_from_row(reports, r)
                     for r in con.execute("SELECT * FROM runs ORDER BY start_utc DESC, run DESC")]
        finally:
            con.close()
        _replace_atomically(out, render_index(infos), locked=True)
    return out


def refresh_index(reports_dir: str | os.PathLike) -> Path | None:
    """:func:`write_index` after a run was published: a problem with the table or the page (a locked or broken
    runs.sqlite, a full disk) is a warning naming the fix, never a failure of the run that just ended."""
    try:
        return write_index(reports_dir)
    except (sqlite3.Error, OSError, RunTableError) as e:
        _warn(f"the run is complete, but index.html and the run table of {reports_dir} could not be updated "
              f"({type(e).__name__}: {e}); `tclab runs rebuild --reports {reports_dir}` brings them up to date")
        return None


def _loads(text: Any, default: Any) -> Any:
    if not isinstance(text, str):
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _info_from_row(reports: Path, r: sqlite3.Row) -> RunInfo:
    """A runs row as the :class:`RunInfo` the index renders."""
    figures = [KeyNumber(f.get("key", ""), f.get("label", ""), f.get("value"), f.get("unit") or "", f.get("note") or "")
               for f in _loads(r["figures"], []) if isinstance(f, dict)]
    return RunInfo(path=reports / r["run"], status=r["status"] or "unknown", notebook=r["notebook"] or "?",
                   tag=r["tag"] or "", start_utc=r["start_utc"] or "", headline=_loads(r["headline"], {}),
                   report=r["report"], error=r["error"], model=r["model"], model_sha256=r["model_sha256"],
                   images=r["images"], images_sha256=r["images_sha256"], duration_s=r["duration_s"],
                   figures=figures, problems=_loads(r["problems"], []),
                   **_gates_of(gates if isinstance(gates := _loads(r["gates"], {}), dict) else {}),
                   human=_loads(r["human_verdict"], None))


# ---- querying ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFilter:
    """Which runs a query keeps; every given field must match (None: any).

    ``notebook``: the stem or its number prefix ('01', '01_token_redundancy'); ``model``: a substring
    of the model spec or a prefix of its weights hash; ``tag``, ``status``: exact; ``since``/``until``:
    ISO dates or times (UTC) bounding the start.
    """

    notebook: str | None = None
    model: str | None = None
    images: str | None = None
    tag: str | None = None
    status: str | None = None
    since: str | None = None
    until: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        if self.notebook:
            stem = Path(self.notebook).name.removesuffix(".ipynb")   # 01, 01_token_redundancy(.ipynb), a path
            clauses.append("(notebook = ? OR notebook LIKE ? ESCAPE '\\')")
            args += [stem, _like_prefix(stem) + "\\_%"]
        if self.model:
            clauses.append("(instr(model, ?) > 0 OR model_sha256 LIKE ? ESCAPE '\\')")
            args += [self.model, _like_prefix(self.model) + "%"]
        if self.images:
            clauses.append("(instr(images, ?) > 0 OR images_sha256 LIKE ? ESCAPE '\\')")
            args += [self.images, _like_prefix(self.images) + "%"]
        for col in ("tag", "status"):
            if getattr(self, col):
                clauses.append(f"{col} = ?")
                args.append(getattr(self, col))
        if self.since:
            clauses.append("start_utc >= ?")
            args.append(_iso_bound(self.since, "since"))
        if self.until:
            clauses.append("start_utc < ?")
            args.append(_iso_bound(self.until, "until", end=True))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _iso_bound(text: str, what: str, end: bool = False) -> str:
    """'2026-12-01' or '2026-12-01T10:00' -> the ISO text start_utc compares with; a bad date is refused."""
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RunTableError(f"--{what} {text!r} is not a date; give YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)") from None
    if end and len(text) <= 10:   # a whole day: up to its end
        t += _dt.timedelta(days=1)
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return _iso(t.replace(tzinfo=_dt.timezone.utc))


def _frame(con: sqlite3.Connection, sql: str, args: Sequence[Any]):
    import pandas as pd

    rows = [dict(r) for r in con.execute(sql, args)]
    return pd.DataFrame(rows)


def table(reports_dir: str | os.PathLike | None = None, *, variants: bool = False,
          filter: RunFilter | None = None, **where: Any):
    """The run table of ``reports_dir`` (default: where ``tclab run`` writes) as a pandas DataFrame, newest first.

    One row per run: the columns of :data:`RUN_COLUMNS` (without the JSON text of ``parameters`` and
    ``headline``), then one column per parameter (``param.<name>``), per headline figure
    (``headline.<name>``) and per figure of the human verdict, where people rated it (``human.<name>``). With ``variants=True``: one row per variant of the sweeps (:data:`VARIANT_COLUMNS`,
    ``config`` parsed), with its run's notebook, tag, model and start. Keep runs with :class:`RunFilter`'s
    fields as keywords: ``table(notebook="01", model="shapes-dit")``.
    """
    import pandas as pd

    reports = Path(reports_dir) if reports_dir is not None else _find_reports_dir()
    clause, args = _filter(filter, where).where()
    con = _open(reports)
    try:
        if variants:
            frame = _frame(con, "SELECT v.*, r.notebook, r.tag, r.status, r.model, r.model_sha256, r.images_sha256, "
                                "r.start_utc FROM variants v JOIN runs r ON r.run = v.run"
                                + clause + " ORDER BY r.start_utc DESC, v.run DESC, v.point", args)
            if not frame.empty:
                frame["config"] = [_loads(c, None) for c in frame["config"]]
                frame["best_under_budget"] = frame["best_under_budget"].astype(bool)
            return frame
        frame = _frame(con, f"SELECT * FROM runs{clause} ORDER BY start_utc DESC, run DESC", args)
    finally:
        con.close()
    if frame.empty:
        return pd.DataFrame(columns=[n for n, _, _ in RUN_COLUMNS if n not in ("parameters", "headline")])
    params = pd.json_normalize([_loads(p, {}) for p in frame["parameters"]], max_level=0).add_prefix("param.")
    heads = pd.json_normalize([_loads(h, {}) for h in frame["headline"]], max_level=0).add_prefix("headline.")
    frame = frame.drop(columns=["parameters", "headline"])
    for col in ("figures", "problems", "settings", "best_under_budget", "gates", "human_verdict"):
        frame[col] = [_loads(v, None) for v in frame[col]]
    human = pd.json_normalize([{k: v for k, v in (h or {}).items() if not isinstance(v, (dict, list))}
                               for h in frame["human_verdict"]], max_level=0).add_prefix("human.")
    return pd.concat([frame, params, heads, human], axis=1)


def rows(reports_dir: str | os.PathLike, *, filter: RunFilter | None = None, **where: Any) -> list[dict[str, Any]]:
    """The runs rows of ``reports_dir`` as plain dicts, newest first, for code (:func:`table` is for people):
    JSON columns parsed, missing values None (never NaN), each with its ``variants`` rows in point order."""
    flt = _filter(filter, where)
    clause, args = flt.where()
    con = _open(Path(reports_dir))
    try:
        return [_row_dict(con, r) for r in con.execute(f"SELECT * FROM runs{clause} ORDER BY start_utc DESC, run DESC",
                                                        args)]
    finally:
        con.close()


def _filter(flt: RunFilter | None, where: dict[str, Any]) -> RunFilter:
    if flt is not None and where:
        raise RunTableError(f"give filter=RunFilter(...) or the filters {sorted(where)} as keywords, not both")
    try:
        return flt or RunFilter(**where)
    except TypeError:
        known = ", ".join(RunFilter.__dataclass_fields__)
        raise RunTableError(f"unknown filter in {sorted(where)}; the filters are {known}") from None


def find_run(reports_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """The runs row of run ``name``: a folder name, or a part of one that only one run has (its start time,
    a tag); raises :class:`RunTableError` naming the candidates when none or several match."""
    reports = Path(reports_dir)
    con = _open(reports)
    try:
        exact = con.execute("SELECT * FROM runs WHERE run = ?", (name,)).fetchone()
        if exact is not None:
            return _row_dict(con, exact)
        hits = con.execute("SELECT * FROM runs WHERE instr(run, ?) > 0 ORDER BY start_utc DESC", (name,)).fetchall()
        if len(hits) == 1:
            return _row_dict(con, hits[0])
    finally:
        con.close()
    if not hits:
        raise RunTableError(f"no run in {reports} is called {name!r} or has it in its name; "
                            "`tclab runs list` shows them")
    shown = ", ".join(h["run"] for h in hits[:6]) + (", ..." if len(hits) > 6 else "")
    raise RunTableError(f"{len(hits)} runs in {reports} have {name!r} in their name ({shown}); give more of it")


def _row_dict(con: sqlite3.Connection, r: sqlite3.Row) -> dict[str, Any]:
    row = dict(r)
    for col, default in (("parameters", {}), ("headline", {}), ("figures", []), ("problems", []), ("settings", None),
                         ("best_under_budget", None), ("gates", None), ("human_verdict", None)):
        row[col] = _loads(row[col], default)
    vs = [dict(v) for v in con.execute("SELECT * FROM variants WHERE run = ? ORDER BY point", (row["run"],))]
    for v in vs:
        v["config"] = _loads(v["config"], None)
    row["variants"] = vs
    return row
