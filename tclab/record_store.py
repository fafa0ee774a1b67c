"""The token-change record and where it is kept: in memory, in one file, or in a chunked folder.

A :class:`TokenChangeRecord` (made by :func:`tclab.record.record_token_changes`, whose module
docstring defines the four measures) holds arrays ``[step, block, row, token]`` in RAM and saves to one
``.npz`` file. That is fine for tens of samples; it is not for a redundancy study over thousands
(DiT-XL/2-256, 50 steps: 5.7 MB per row, so 0.73 GB for 64 samples with CFG and 11 GB for 1,000). This
module also holds the **record store**, the same record kept on disk as one file per finished batch
(chunk), which the recorder writes as it goes (``record_token_changes(..., stream_to=PATH)``) and
:func:`open_record` reads lazily, one chunk at a time.

A store is a folder::

    rank00000.json                  this rank's metadata: grid, blocks, tokens, dtype, eps, measures,
                                    the step -> t mapping so far, model and data identity
    rank00000-chunk000000.npy       one finished batch: (4, S_c, L, R_c, N) measures, in MEASURES order
    rank00000-chunk000000.json      its manifest: shape, dtype, and per row: sample_id (the *global*
                                    sample index), branch, class_labels; the step source
    rank00001.json, rank00001-chunk000000.npy, ...   another torchrun rank writing at the same time

Why this layout:

- **Several ranks at once.** Every file name carries the rank and each rank writes only its own
  files, so ranks never write the same file and need no lock; there is no shared store-level file to
  update (a read-modify-write of one would race). The reader checks that the ranks' metadata agree.
- **Atomic writes.** Every file is written to a hidden temporary name in the same folder
  (``.NAME.PID.tmp``), flushed to disk, then renamed with ``os.replace``; the chunk's manifest is
  written *after* its data, so the manifest is the commit: a chunk counts only once its manifest is
  there. Temporary files and data without a manifest (a writer killed half-way, or still writing)
  are never read; :class:`RecordStore` lists them in ``.leftovers`` and warns.
- **``.npy`` plus a JSON manifest, not ``.npz``.** An ``.npy`` file is a short header and then the raw
  array, so the reader computes where any (measure, step, block) slice lies and reads just those bytes
  with positioned reads: a selection of a few steps or one block reads only its share of the file, and
  nothing is memory-mapped (mapped pages of a large file would count as the reader's memory). An
  ``.npz`` member is read whole. Axis order (measure, step, block, row, token): the rows of one
  (measure, step, block) are contiguous, and so are consecutive blocks.
- **Global sample indices.** ``sample_id`` of a row is its sample's index in the whole study
  (``record_token_changes(..., sample_offset=lo)`` for a rank recording samples ``[lo, hi)``), so
  chunks from any number of ranks or folders merge into sample order; two chunks claiming the same
  sample are an error, not a silent overwrite.

Usage::

    with record_token_changes(model.transformer, model_identity=model.identity(),
                              stream_to=run_dir / "changes", rank=rank, sample_offset=lo) as rec:
        sample(model, labels[lo:hi], SampleConfig(num_steps=50))
    store = open_record(run_dir / "changes")     # reads only the metadata and manifests
    store.mean_over("update_change")             # (steps, blocks), streamed over the chunks
    part = store.select(blocks=[3], samples=range(100), branch="cond")   # a TokenChangeRecord
    merge_record_stores([dir_a, dir_b], run_dir / "all")   # hard links, nothing loaded

This module imports nothing of tclab (nor torch): a store can be read wherever numpy is.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .files import write_atomic

MEASURES = ("out_change", "update_change", "update_ratio", "cos")
BRANCHES = ("cond", "uncond")
AXES = ("step", "block", "sample", "token")
_FORMAT = "tclab.TokenChangeRecord"
_FORMAT_VERSION = 1
STORE_FORMAT = "tclab.TokenChangeStore"
STORE_VERSION = 1

# ---- the record -------------------------------------------------------------------------------

@dataclass(eq=False)
class TokenChangeRecord:
    """Per-token change measures of one recording, arrays indexed ``[step, block, sample, token]``.

    The *sample* axis holds the transformer's batch rows in the order they ran (for CFG batches,
    both halves); ``branch``, ``sample_id`` and ``class_labels`` say what each row is. Methods that
    take ``sample=`` mean the sample id (shared by a conditional row and its unconditional twin) and
    pick the row with ``branch=``.

    Attributes:
        out_change, update_change, update_ratio, cos: (S, L, R, N) float32 (or float16) arrays; the
            three change measures are NaN at step 0 (see the module docstring for definitions).
        steps: (S,) int64 step indices 0..S-1 (0 = first executed, noisiest step).
        timesteps: (S,) float64 scheduler timestep value ``t`` of each step (NaN if unknown).
        grid: (H, W) token grid, N = H * W; token ``i`` sits at row ``i // W``, column ``i % W``.
        class_labels: (R,) int64 class each row's sample was asked for (-1 when none was given).
        branch: (R,) ``'cond'`` / ``'uncond'``.
        sample_id: (R,) int64 sample number; a CFG pair shares it.
        eps: the epsilon of the denominators.
        model_identity, data_identity: JSON-able provenance dicts (tuples become lists).
        step_source: ``'sampler'`` (tclab's StepContext), ``'forward-count'`` (fallback) or both.
    """

    out_change: np.ndarray
    update_change: np.ndarray
    update_ratio: np.ndarray
    cos: np.ndarray
    steps: np.ndarray
    timesteps: np.ndarray
    grid: tuple[int, int]
    class_labels: np.ndarray
    branch: np.ndarray
    sample_id: np.ndarray
    eps: float = 1e-6
    model_identity: dict = field(default_factory=dict)
    data_identity: dict = field(default_factory=dict)
    step_source: str = "sampler"

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        self.steps = np.asarray(self.steps, dtype=np.int64)
        self.timesteps = np.asarray(self.timesteps, dtype=np.float64)
        self.class_labels = np.asarray(self.class_labels, dtype=np.int64)
        self.branch = np.asarray(self.branch, dtype="<U6")
        self.sample_id = np.asarray(self.sample_id, dtype=np.int64)
        self.eps = float(self.eps)
        shape = self.out_change.shape
        for m in MEASURES:
            a = getattr(self, m)
            if a.ndim != 4 or a.shape != shape:
                raise ValueError(f"measure {m!r} has shape {a.shape}; every measure must be (steps, blocks, "
                                 f"samples, tokens) = {shape}")
        s, _, r, n = shape
        if len(self.steps) != s or len(self.timesteps) != s:
            raise ValueError(f"{len(self.steps)} steps and {len(self.timesteps)} timesteps for {s} recorded steps")
        if not (len(self.class_labels) == len(self.branch) == len(self.sample_id) == r):
            raise ValueError(f"row metadata lengths (class_labels {len(self.class_labels)}, branch "
                             f"{len(self.branch)}, sample_id {len(self.sample_id)}) must all equal the {r} rows")
        if self.grid[0] * self.grid[1] != n:
            raise ValueError(f"grid {self.grid} has {self.grid[0] * self.grid[1]} tokens but the arrays have {n}")
        bad = set(self.branch.tolist()) - set(BRANCHES)
        if bad:
            raise ValueError(f"unknown branch value(s) {sorted(bad)}; rows are 'cond' or 'uncond'")
        self.model_identity = _json_dict("model_identity", self.model_identity)
        self.data_identity = _json_dict("data_identity", self.data_identity)

    # -- sizes --
    @property
    def num_steps(self) -> int:
        return self.out_change.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.out_change.shape[1]

    @property
    def num_rows(self) -> int:
        return self.out_change.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.out_change.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the four measure arrays."""
        return sum(getattr(self, m).nbytes for m in MEASURES)

    # -- selection --
    def measure(self, name: str) -> np.ndarray:
        """The (S, L, R, N) array of measure ``name`` (one of ``MEASURES``)."""
        if name not in MEASURES:
            raise ValueError(f"unknown measure {name!r}; choose one of {list(MEASURES)}")
        return getattr(self, name)

    def rows(self, branch: str = "cond") -> np.ndarray:
        """Row indices of ``branch`` ('cond' or 'uncond'), ordered by sample id."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r} (the halves are never mixed)")
        idx = np.flatnonzero(self.branch == branch)
        if len(idx) == 0:
            have = sorted(set(self.branch.tolist()))
            hint = " (no CFG batch was recorded: guidance_scale <= 1)" if branch == "uncond" else ""
            raise ValueError(f"no {branch!r} rows in this record{hint}; it has {have}")
        return idx[np.argsort(self.sample_id[idx], kind="stable")]

    def select(self, measure: str, branch: str = "cond") -> np.ndarray:
        """(S, L, samples, N) values of one branch, samples ordered by sample id."""
        return self.measure(measure)[:, :, self.rows(branch)]

    def _axes(self, axes: str | Sequence[str]) -> tuple[int, ...]:
        return _axis_positions(axes)

    def mean_over(self, measure: str, axes: str | Sequence[str] = ("sample", "token"),
                  branch: str = "cond") -> np.ndarray:
        """NaN-ignoring mean of ``measure`` over ``axes`` for one branch, in float64.

        The default gives the (steps, blocks) matrix: row ``s`` is step index ``s`` (see
        ``timesteps`` for ``t``); step 0 is NaN for the change measures.
        """
        with np.errstate(invalid="ignore"), quiet_nan_warnings():
            return np.nanmean(self.select(measure, branch), axis=self._axes(axes), dtype=np.float64)

    def quantile_over(self, measure: str, q: float | Sequence[float], axes: str | Sequence[str] = ("sample", "token"),
                      branch: str = "cond") -> np.ndarray:
        """NaN-ignoring quantile(s) ``q`` of ``measure`` over ``axes`` (e.g. the spread over tokens of
        each step x block cell: tokencache.md observation 1). Leading axis = ``q`` when it is a list."""
        a = self.select(measure, branch).astype(np.float32, copy=False)
        with quiet_nan_warnings():
            return np.nanquantile(a, q, axis=self._axes(axes))

    def row_of(self, sample: int, branch: str = "cond") -> int:
        """The row index of sample id ``sample`` in ``branch``."""
        rows = self.rows(branch)
        hit = rows[self.sample_id[rows] == sample]
        if len(hit) == 0:
            ids = self.sample_id[rows]
            raise ValueError(f"no {branch!r} row for sample {sample}; this record's {branch!r} samples are "
                             f"{ids.min()}..{ids.max()} ({len(ids)} rows)")
        return int(hit[0])

    def token_map(self, measure: str, step: int, block: int, sample: int = 0, branch: str = "cond") -> np.ndarray:
        """(H, W) map of ``measure`` over the token grid at step index ``step`` (not t), block ``block``."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} out of range: this record has step indices 0..{self.num_steps - 1} "
                             "(pass a step index, not a timestep value)")
        if not -self.num_blocks <= block < self.num_blocks:
            raise ValueError(f"block {block} out of range: the model has {self.num_blocks} blocks")
        row = self.row_of(sample, branch)
        return self.measure(measure)[step, block, row].reshape(self.grid)  # (H, W), row-major as PatchEmbed

    def to_frame(self, measures: Sequence[str] | None = None, branch: str | None = "cond"):
        """Tidy ``pandas.DataFrame``, one row per (step, block, sample, token).

        Columns: ``step`` (index), ``t`` (timestep value), ``block``, ``sample`` (sample id, shared by
        CFG twins, so cond and uncond frames join on it), ``branch``, ``class_label``, ``token``,
        ``token_row``, ``token_col``, then the measures (float32). ``branch=None`` returns both
        branches, labelled. Step 0 rows are kept (NaN change measures). Size: S*L*samples*N rows,
        e.g. 358 k rows per sample for DiT-XL/2 at 50 steps: select ``measures`` and a branch.
        """
        import pandas as pd

        measures = list(MEASURES) if measures is None else [measures] if isinstance(measures, str) else list(measures)
        for m in measures:
            self.measure(m)
        if branch is None:
            rows = np.concatenate([self.rows(b) for b in BRANCHES if (self.branch == b).any()])
        else:
            rows = self.rows(branch)
        s, nb, n = self.num_steps, self.num_blocks, self.num_tokens
        shape = (s, nb, len(rows), n)

        def col(values, axis):  # broadcast a 1-D per-axis vector over the 4-D index, flattened
            v = np.asarray(values)
            view = [1, 1, 1, 1]
            view[axis] = len(v)
            return np.broadcast_to(v.reshape(view), shape).ravel()

        tok = np.arange(n, dtype=np.int32)
        cols = {
            "step": col(self.steps.astype(np.int32), 0),
            "t": col(self.timesteps, 0),
            "block": col(np.arange(nb, dtype=np.int32), 1),
            "sample": col(self.sample_id[rows], 2),
            "branch": col(self.branch[rows].astype(object), 2),
            "class_label": col(self.class_labels[rows], 2),
            "token": col(tok, 3),
            "token_row": col(tok // self.grid[1], 3),
            "token_col": col(tok % self.grid[1], 3),
        }
        for m in measures:
            cols[m] = self.measure(m)[:, :, rows].astype(np.float32, copy=False).ravel()
        return pd.DataFrame(cols)

    # -- persistence --
    def save(self, path: str | os.PathLike) -> Path:
        """Write the record to ``path`` as one ``.npz`` file (the name is used exactly as given).

        Why npz and not parquet: the data are dense 4-D arrays, which npz stores as they are (dtype
        and bits exact, float16 included, NaN included) and reads back without a reshape; a tidy
        parquet table would repeat 9 index columns per value (about 10x the bytes) -- build it with
        ``to_frame()`` when a table is wanted. Metadata (grid, eps, identities, step source) go in a
        JSON string inside the same file, so the file is self-describing and loads without pickle.
        The write goes to a temporary name first and is then renamed: no half-written records.
        """
        path = Path(path)
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "grid": list(self.grid), "eps": self.eps,
                "model_identity": self.model_identity, "data_identity": self.data_identity,
                "step_source": self.step_source, "axes": list(AXES), "measures": list(MEASURES)}
        arrays = {m: getattr(self, m) for m in MEASURES}
        arrays.update(steps=self.steps, timesteps=self.timesteps, class_labels=self.class_labels,
                      branch=self.branch, sample_id=self.sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta_json=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenChangeRecord":
        """Read a record written by :meth:`save` (no pickle is involved)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no token-change record at {path}")
        with np.load(path, allow_pickle=False) as z:
            if "meta_json" not in z.files:
                raise ValueError(f"{path} is an npz file but not a TokenChangeRecord (no meta_json entry)")
            meta = json.loads(str(z["meta_json"]))
            if meta.get("format") != _FORMAT or meta.get("version", 0) > _FORMAT_VERSION:
                raise ValueError(f"{path} holds format {meta.get('format')!r} version {meta.get('version')}; "
                                 f"this tclab reads {_FORMAT!r} up to version {_FORMAT_VERSION}")
            arrays = {k: z[k] for k in (*MEASURES, "steps", "timesteps", "class_labels", "branch", "sample_id")}
        return cls(**arrays, grid=tuple(meta["grid"]), eps=meta["eps"], model_identity=meta["model_identity"],
                   data_identity=meta["data_identity"], step_source=meta["step_source"])

    def __eq__(self, other) -> bool:
        """Exact equality: same dtypes, same values (NaN equals NaN), same metadata."""
        if not isinstance(other, TokenChangeRecord):
            return NotImplemented
        for name in (*MEASURES, "steps", "timesteps", "class_labels", "branch", "sample_id"):
            a, b = getattr(self, name), getattr(other, name)
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return (self.grid == other.grid and self.eps == other.eps and self.step_source == other.step_source
                and self.model_identity == other.model_identity and self.data_identity == other.data_identity)

    __hash__ = None  # mutable arrays: not hashable

    def __repr__(self) -> str:
        counts = {b: int((self.branch == b).sum()) for b in BRANCHES}
        return (f"TokenChangeRecord(steps={self.num_steps}, blocks={self.num_blocks}, rows={self.num_rows} "
                f"{counts}, grid={self.grid}, dtype={self.out_change.dtype}, step_source={self.step_source!r}, "
                f"model={self.model_identity.get('name', '?')!r})")


@contextmanager
def quiet_nan_warnings():
    """Silence numpy's warnings about all-NaN slices: step 0 of the change measures is NaN by design."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice")
        warnings.filterwarnings("ignore", message="All-NaN slice")
        yield


def _json_dict(name: str, d: dict | None) -> dict:
    """``d`` as JSON will give it back (tuples -> lists), so save/load round-trips exactly."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise TypeError(f"{name} must be a dict, got {type(d).__name__}")
    try:
        return json.loads(json.dumps(d, allow_nan=True))
    except TypeError as e:
        raise TypeError(f"{name} must hold only JSON values (str, number, bool, None, list, dict): {e}; "
                        "convert paths and arrays with str() / .tolist() first") from None



def _axis_positions(axes: str | Sequence[str]) -> tuple[int, ...]:
    """Positions in ``AXES`` of the named axes (one name or several)."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ValueError(f"unknown axis {bad}; axes are {list(AXES)}")
    return tuple(AXES.index(a) for a in axes)


# ---- the record store: names, atomic writes, metadata -----------------------------------------

class StoreError(ValueError):
    """A record store folder is not what it should be (the message names the file and the fix)."""


_RANK_META = re.compile(r"rank(\d{5,})\.json")
_CHUNK = re.compile(r"rank(\d{5,})-chunk(\d{6,})\.(npy|json)")
#: The facts every rank of one store must agree on (the step -> t mapping is merged, not compared).
_META_KEYS = ("grid", "num_blocks", "num_tokens", "dtype", "eps", "measures", "model_identity", "data_identity")


def rank_meta_name(rank: int) -> str:
    """``rank00003.json``: the metadata file of rank 3."""
    return f"rank{rank:05d}.json"


def chunk_name(rank: int, chunk: int) -> str:
    """``rank00003-chunk000012``: the stem of chunk 12 of rank 3 (``.npy`` data, ``.json`` manifest)."""
    return f"rank{rank:05d}-chunk{chunk:06d}"


def _write_json(path: Path, obj: dict) -> Path:
    text = json.dumps(obj, indent=1, allow_nan=True).encode()
    return write_atomic(path, lambda f: f.write(text))


def _read_json(path: Path, what: str) -> dict:
    """A store's JSON file (rank metadata or chunk manifest), checked to be one."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{what} {path} cannot be read ({e}); tclab writes these atomically, so it was "
                         "damaged or written by something else: delete it (and, for a chunk, its .npy) and "
                         "record those samples again") from None
    if not isinstance(obj, dict) or obj.get("format") != STORE_FORMAT:
        raise StoreError(f"{what} {path} is not part of a token-change record store (format "
                         f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}, expected "
                         f"{STORE_FORMAT!r}); move it out of the store folder")
    if obj.get("version", 0) > STORE_VERSION:
        raise StoreError(f"{what} {path} is store format version {obj.get('version')}; this tclab reads up to "
                         f"version {STORE_VERSION}: upgrade tclab")
    return obj


def _merge_timesteps(known: list, new: Sequence[float], where: str) -> None:
    """Extend ``known`` (t of each step index, NaN if unknown) with ``new``; a disagreement is an error."""
    for s, t in enumerate(new):
        t = math.nan if t is None else float(t)
        if s >= len(known):
            known.append(t)
        elif math.isnan(known[s]):
            known[s] = t
        elif not math.isnan(t) and not math.isclose(known[s], t, rel_tol=1e-6, abs_tol=1e-6):
            raise StoreError(f"step {s} ran at t={t} in one part and at t={known[s]} in another ({where}): one "
                             "record maps each step index to one timestep value; write recordings with another "
                             "num_steps, scheduler or SDEdit strength into their own folder")


def _agree(metas: dict, where: str) -> dict:
    """The facts the metadata files ``metas`` ({name: meta}) share, with their step -> t mappings merged."""
    names = list(metas)
    first = metas[names[0]]
    for name in names[1:]:
        diff = [k for k in _META_KEYS if metas[name].get(k) != first.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {first.get(k)!r} vs {metas[name].get(k)!r}" for k in diff)
            raise StoreError(f"{where}: {names[0]} and {name} come from different recordings ({shown}); a store "
                             "holds one recording (one model, grid, dtype, eps): write the other into its own folder")
    merged = {k: first.get(k) for k in _META_KEYS}
    merged["timesteps"] = []
    for name in names:
        _merge_timesteps(merged["timesteps"], metas[name].get("timesteps", []), f"{where}: {name}")
    return merged


# ---- writing ----------------------------------------------------------------------------------

class RecordStoreWriter:
    """Writes one rank's chunks into a record store folder (layout: the module docstring).

    ``record_token_changes(..., stream_to=PATH, rank=r)`` makes one and calls :meth:`write_chunk` for
    every finished batch; it is also the way to write a store from arrays already at hand (the memory
    benchmark writes synthetic chunks through it). A rank that finds files of its own in the folder (a
    resumed job) checks that their metadata match and numbers its chunks after theirs: it never
    overwrites a chunk. Two processes must not share a rank.

    Args:
        path: the store folder (created if missing).
        rank: this process's rank (torchrun's ``RANK``); its files are named ``rankNNNNN*``.
        grid: (H, W) token grid, N = H * W.
        num_blocks: L, the transformer's block count.
        dtype: storage precision, ``"float32"`` or ``"float16"``.
        eps, model_identity, data_identity: as in :class:`TokenChangeRecord`.
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, *, grid: tuple[int, int], num_blocks: int,
                 dtype: str | np.dtype = "float32", eps: float = 1e-6, model_identity: dict | None = None,
                 data_identity: dict | None = None):
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
            raise ValueError(f"rank must be an int >= 0 (torchrun's RANK), got {rank!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {dtype}")
        self.path, self.rank = Path(path), int(rank)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file; a record store is a folder (one file per chunk): pass a "
                             "new folder as stream_to")
        grid = (int(grid[0]), int(grid[1]))
        self.meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "rank": self.rank, "grid": list(grid),
                     "num_blocks": int(num_blocks), "num_tokens": grid[0] * grid[1], "dtype": dtype.name,
                     "eps": float(eps), "measures": list(MEASURES),
                     "chunk_axes": ["measure", "step", "block", "row", "token"],
                     "model_identity": _json_dict("model_identity", model_identity),
                     "data_identity": _json_dict("data_identity", data_identity), "timesteps": []}
        self.path.mkdir(parents=True, exist_ok=True)
        self.next_chunk = self._resume()
        _write_json(self.meta_path, self.meta)  # the folder is a (still empty) store from now on
        self.written: list[Path] = []  # manifests of the chunks this writer committed

    @property
    def meta_path(self) -> Path:
        return self.path / rank_meta_name(self.rank)

    def _resume(self) -> int:
        """Check this rank's files already in the folder, if any; the next free chunk number."""
        if self.meta_path.exists():
            old = _read_json(self.meta_path, "rank metadata")
            _agree({self.meta_path.name + " (in the folder)": old, "this recording": self.meta}, str(self.path))
            self.meta["timesteps"] = list(old.get("timesteps", []))
        taken = [int(m.group(2)) for p in self.path.iterdir()
                 if (m := _CHUNK.fullmatch(p.name)) and int(m.group(1)) == self.rank]
        return max(taken, default=-1) + 1

    def write_chunk(self, values: np.ndarray, sample_id, branch, class_labels, timesteps: Sequence[float],
                    step_source: str = "sampler") -> Path:
        """Write one finished batch; returns its manifest's path.

        Args:
            values: (4, S_c, L, R_c, N) measures in ``MEASURES`` order, any strides (a transposed view is
                copied one measure at a time while it is written).
            sample_id: (R_c,) the *global* sample index of each row (CFG twins share it).
            branch: (R_c,) ``'cond'`` / ``'uncond'``; class_labels: (R_c,) as in TokenChangeRecord.
            timesteps: t of step indices 0, 1, ... as far as known (NaN where unknown), >= S_c values.
            step_source: ``'sampler'`` or ``'forward-count'``.
        """
        values = np.asarray(values)
        m = self.meta
        want = (4, None, m["num_blocks"], None, m["num_tokens"])
        if values.ndim != 5 or any(w is not None and w != g for w, g in zip(want, values.shape)):
            raise ValueError(f"a chunk is (4 measures, steps, {m['num_blocks']} blocks, rows, {m['num_tokens']} "
                             f"tokens), got shape {values.shape}")
        if values.dtype.name != m["dtype"]:
            raise ValueError(f"this store holds {m['dtype']}, the chunk is {values.dtype}")
        rows = _row_arrays(sample_id, branch, class_labels, values.shape[3])
        if len(timesteps) < values.shape[1]:
            raise ValueError(f"{len(timesteps)} timesteps for a chunk of {values.shape[1]} steps")
        _merge_timesteps(m["timesteps"], timesteps, f"rank {self.rank} in {self.path}")
        stem = chunk_name(self.rank, self.next_chunk)
        data, manifest = self.path / f"{stem}.npy", self.path / f"{stem}.json"
        if data.exists() or manifest.exists():
            raise StoreError(f"{data} already exists: another process is writing rank {self.rank} into "
                             f"{self.path}; every process needs its own rank")
        _write_json(self.meta_path, m)  # first: a committed chunk always finds its t mapping
        write_atomic(data, lambda f: _save_npy(f, values))
        _write_json(manifest, {"format": STORE_FORMAT, "version": STORE_VERSION, "rank": self.rank,
                               "chunk": self.next_chunk, "data": data.name, "shape": list(values.shape),
                               "dtype": values.dtype.name, "step_source": str(step_source),
                               **{k: v.tolist() for k, v in rows.items()}})  # last: the commit
        self.next_chunk += 1
        self.written.append(manifest)
        return manifest


def _save_npy(f, values: np.ndarray) -> None:
    """``values`` as an ``.npy`` file (what ``np.save`` writes), one measure at a time: a strided view (the
    recorder's (S, L, 4, R, N) buffer, transposed) costs a quarter-chunk copy, not numpy's element-wise
    ``tofile`` of a non-contiguous array (several times slower)."""
    header = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False, "shape": values.shape}
    np.lib.format.write_array_header_1_0(f, header)
    for k in range(values.shape[0]):
        f.write(np.ascontiguousarray(values[k]).data)  # (S_c, L, R_c, N) of measure k


def _row_arrays(sample_id, branch, class_labels, rows: int) -> dict:
    """The per-row metadata of a chunk, checked: (R,) arrays sample_id, branch, class_labels."""
    out = {"sample_id": np.asarray(sample_id, dtype=np.int64).reshape(-1),
           "branch": np.asarray(branch, dtype="<U6").reshape(-1),
           "class_labels": np.asarray(class_labels, dtype=np.int64).reshape(-1)}
    bad = {k: len(v) for k, v in out.items() if len(v) != rows}
    if bad:
        raise ValueError(f"row metadata lengths {bad} must all equal the chunk's {rows} rows")
    unknown = set(out["branch"].tolist()) - set(BRANCHES)
    if unknown:
        raise ValueError(f"unknown branch value(s) {sorted(unknown)}; rows are 'cond' or 'uncond'")
    return out


# ---- reading ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ChunkInfo:
    """One committed chunk of a store: its files, shape and rows (read from the manifest and the
    ``.npy`` header; the values stay on disk until :meth:`values` maps them)."""

    manifest: Path
    data: Path
    rank: int
    index: int
    shape: tuple[int, ...]  # (4, S_c, L, R_c, N)
    dtype: np.dtype
    offset: int  # where the array starts in the .npy file (after its header)
    sample_id: np.ndarray  # (R_c,) global sample index
    branch: np.ndarray  # (R_c,)
    class_labels: np.ndarray  # (R_c,)
    step_source: str

    @property
    def num_steps(self) -> int:
        return self.shape[1]

    def values(self) -> np.ndarray:
        """All (4, S_c, L, R_c, N) measures, memory-mapped read-only (``np.load``); the store's own reads
        use :meth:`read`, which maps nothing."""
        return np.load(self.data, mmap_mode="r")

    def read(self, measures: Sequence[int], steps: Sequence[int], blocks: Sequence[int],
             rows: Sequence[int]) -> np.ndarray:
        """(len(measures), len(steps), len(blocks), len(rows), N) values, read with one positioned read per
        (measure, step, run of consecutive blocks): only those bytes leave the disk (or page cache)."""
        _, n_steps, n_blocks, n_rows, n = self.shape
        rows = np.asarray(rows)
        every_row = len(rows) == n_rows and bool((rows == np.arange(n_rows)).all())
        runs = _consecutive_runs(np.asarray(blocks))
        out = np.empty((len(measures), len(steps), len(blocks), len(rows), n), dtype=self.dtype)
        buf = np.empty((max(c for _, _, c in runs), n_rows, n), dtype=self.dtype)  # (blocks of a run, R_c, N)
        row_bytes = n_rows * n * self.dtype.itemsize
        with open(self.data, "rb", buffering=0) as f:
            for i, k in enumerate(measures):
                for j, s in enumerate(steps):
                    for pos, b0, count in runs:
                        part = buf[:count]
                        f.seek(self.offset + ((k * n_steps + s) * n_blocks + b0) * row_bytes)
                        got = f.readinto(part)
                        if got != part.nbytes:
                            raise StoreError(f"{self.data} ended after {got} of {part.nbytes} bytes at measure {k}, "
                                             f"step {s}, block {b0}: it changed since the store was opened; "
                                             "open it again")
                        out[i, j, pos:pos + count] = part if every_row else part[:, rows]
        return out

    def describe(self) -> str:
        ids = self.sample_id
        return f"{self.manifest.stem} (samples {ids.min()}..{ids.max()})" if len(ids) else self.manifest.stem


def _consecutive_runs(blocks: np.ndarray) -> list[tuple[int, int, int]]:
    """``(position in blocks, first block, count)`` for each run of consecutive ascending block indices."""
    runs = []
    for pos, b in enumerate(blocks.tolist()):
        if runs and b == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, b, 1))
    return runs


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return tuple(shape), dtype, fortran, f.tell()


def _read_chunk(manifest: Path, meta: dict) -> ChunkInfo:
    """A chunk's manifest, checked against its data file and the store's metadata."""
    man = _read_json(manifest, "chunk manifest")
    data = manifest.with_name(str(man.get("data", "")))
    rows = _row_arrays(man.get("sample_id", []), man.get("branch", []), man.get("class_labels", []),
                       int((man.get("shape") or [0] * 5)[3]))
    ids = f"samples {rows['sample_id'].min()}..{rows['sample_id'].max()}" if len(rows["sample_id"]) else "no samples"
    fix = f"delete {manifest.name} and {data.name} and record {ids} again"
    if not data.is_file():
        raise StoreError(f"incomplete chunk: {manifest} names the data file {data.name}, which is missing; {fix}")
    try:
        shape, dtype, fortran, offset = _npy_header(data)
    except (OSError, ValueError) as e:
        raise StoreError(f"incomplete chunk: {data} has no readable .npy header ({e}); {fix}") from None
    size, expected = data.stat().st_size, offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise StoreError(f"incomplete chunk: {data} holds {size} bytes but its header promises {expected} "
                         f"(shape {shape}, {dtype}); the file was cut short or damaged: {fix}")
    want = [4, None, meta["num_blocks"], len(rows["sample_id"]), meta["num_tokens"]]
    if (list(shape) != man.get("shape") or fortran or dtype.name != meta["dtype"]
            or any(w is not None and w != g for w, g in zip(want, shape))):
        raise StoreError(f"chunk {data} is {shape} {dtype}, but its manifest says {man.get('shape')} and the "
                         f"store holds (4, steps, {meta['num_blocks']}, rows, {meta['num_tokens']}) {meta['dtype']}; "
                         f"{fix}")
    return ChunkInfo(manifest=manifest, data=data, rank=int(man["rank"]), index=int(man["chunk"]), shape=shape,
                     dtype=dtype, offset=offset, sample_id=rows["sample_id"], branch=rows["branch"],
                     class_labels=rows["class_labels"], step_source=str(man.get("step_source", "sampler")))


def _check_no_duplicates(chunks: Sequence[ChunkInfo], where: str) -> None:
    """Every (sample, branch) row is claimed by one chunk only."""
    if not chunks:
        return
    keys = np.concatenate([c.sample_id * 2 + (c.branch == "uncond") for c in chunks])  # (R,) one key per row
    owner = np.concatenate([np.full(len(c.sample_id), i) for i, c in enumerate(chunks)])
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts == 1).all():
        return
    dup = uniq[counts > 1]
    k = dup[0]
    claimants = sorted({chunks[i].describe() for i in owner[keys == k]})
    raise StoreError(f"{where}: {len(dup)} row(s) are claimed by two chunks, e.g. sample {k // 2} "
                     f"({'uncond' if k % 2 else 'cond'}) by {' and '.join(claimants)}; the same samples were "
                     "recorded twice: give each rank its own share with record_token_changes(..., rank=r, "
                     "sample_offset=lo) for samples [lo, hi), or delete the repeated chunk (its .npy and .json)")


class RecordStore:
    """A token-change record kept on disk as chunks (see the module docstring), read lazily.

    Opening reads only the metadata, the manifests and the ``.npy`` headers; a method reads values
    chunk by chunk, only the steps and blocks it needs (:meth:`ChunkInfo.read`). Rows are in global sample order: chunks sorted by their first
    sample index (the rows of one chunk as they ran, ``[cond; uncond]`` for CFG), whichever rank or
    folder wrote them, so a store written in one run reads back in the order of the in-RAM record.

    Attributes:
        path: the folder. chunks: the committed :class:`ChunkInfo` in row order. ranks: the ranks seen.
        leftovers: files that are not committed chunks (temporary files; data without a manifest), never read.
        sample_id, branch, class_labels: (R,) per row, as in :class:`TokenChangeRecord`.
        grid, eps, model_identity, data_identity, dtype: the recording's.
        steps, timesteps: (S,) step indices 0..S-1 and their t (S = the longest chunk).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no record store at {self.path}: the folder does not exist; write one with "
                                    f"record_token_changes(..., stream_to={str(self.path)!r}) or fix the path")
        if not self.path.is_dir():
            hint = (": it is a single-file record, read it with TokenChangeRecord.load(path)"
                    if self.path.suffix == ".npz" else "")
            raise StoreError(f"{self.path} is a file, not a record store folder{hint}")
        files = sorted(p.name for p in self.path.iterdir())
        metas = {n: _read_json(self.path / n, "rank metadata") for n in files if _RANK_META.fullmatch(n)}
        if not metas:
            seen = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "") if files else "nothing"
            raise StoreError(f"{self.path} is not a token-change record store: it has no rankNNNNN.json metadata "
                             f"(it holds {seen}); a store is written by record_token_changes(..., stream_to=...) "
                             "or RecordStoreWriter, a single-file record by TokenChangeRecord.save")
        self._metas = {int(_RANK_META.fullmatch(n).group(1)): m for n, m in metas.items()}
        self._meta = _agree(metas, str(self.path))
        self.chunks, self.leftovers = self._scan(files)
        if self.leftovers:
            shown = ", ".join(p.name for p in self.leftovers[:3]) + (", ..." if len(self.leftovers) > 3 else "")
            warnings.warn(f"{self.path}: ignoring {len(self.leftovers)} file(s) that are not committed chunks "
                          f"({shown}): temporary files or data without a manifest, left by a writer that was "
                          "killed or is still writing; they are never read. Delete them once no writer runs.",
                          stacklevel=2)
        if not self.chunks:
            raise StoreError(f"{self.path} holds no committed chunk yet (a batch's chunk is written when the "
                             "batch finishes); wait for the writers, or record into it")
        _check_no_duplicates(self.chunks, str(self.path))
        self._index_rows()

    def _scan(self, files: list[str]) -> tuple[list[ChunkInfo], list[Path]]:
        """Committed chunks (sorted by first sample, then rank and number) and leftovers."""
        manifests = {n[:-5] for n in files if n.endswith(".json") and _CHUNK.fullmatch(n)}
        chunks, leftovers = [], []
        for n in files:
            m = _CHUNK.fullmatch(n)
            if n.endswith(".tmp") or (m and n.endswith(".npy") and n[:-4] not in manifests):
                leftovers.append(self.path / n)
            elif m and n.endswith(".json"):
                if int(m.group(1)) not in self._metas:
                    raise StoreError(f"chunk {self.path / n} has no rank metadata {rank_meta_name(int(m.group(1)))}"
                                     f" in {self.path}; copy it from where the chunk came from, or delete the chunk")
                chunks.append(_read_chunk(self.path / n, self._meta))
        chunks.sort(key=lambda c: (int(c.sample_id.min()) if len(c.sample_id) else -1, c.rank, c.index))
        return chunks, leftovers

    def _index_rows(self) -> None:
        """Per-row arrays over all chunks, in row order, and where each row lives."""
        cat = np.concatenate
        self.sample_id = cat([c.sample_id for c in self.chunks])
        self.branch = cat([c.branch for c in self.chunks])
        self.class_labels = cat([c.class_labels for c in self.chunks])
        self._row_chunk = cat([np.full(len(c.sample_id), i) for i, c in enumerate(self.chunks)])
        self._row_local = cat([np.arange(len(c.sample_id)) for c in self.chunks])
        s = max(c.num_steps for c in self.chunks)
        self.steps = np.arange(s)
        t = self._meta["timesteps"]
        self.timesteps = np.array([t[i] if i < len(t) else math.nan for i in range(s)], dtype=np.float64)

    # -- sizes and facts --
    grid = property(lambda self: tuple(self._meta["grid"]))
    eps = property(lambda self: float(self._meta["eps"]))
    dtype = property(lambda self: np.dtype(self._meta["dtype"]))
    model_identity = property(lambda self: self._meta["model_identity"])
    data_identity = property(lambda self: self._meta["data_identity"])
    num_blocks = property(lambda self: int(self._meta["num_blocks"]))
    num_tokens = property(lambda self: int(self._meta["num_tokens"]))
    num_steps = property(lambda self: len(self.steps))
    num_rows = property(lambda self: len(self.sample_id))
    ranks = property(lambda self: sorted(self._metas))

    @property
    def num_samples(self) -> int:
        """Distinct samples (a CFG pair is one sample)."""
        return len(np.unique(self.sample_id))

    @property
    def nbytes(self) -> int:
        """Bytes the store takes on disk: chunk data, manifests and metadata (leftovers not counted)."""
        files = [c.data for c in self.chunks] + [c.manifest for c in self.chunks]
        files += [self.path / rank_meta_name(r) for r in self._metas]
        return sum(p.stat().st_size for p in files)

    @property
    def loaded_nbytes(self) -> int:
        """Bytes the four measure arrays of ``select()`` (everything) would take in memory."""
        return 4 * self.num_steps * self.num_blocks * self.num_rows * self.num_tokens * self.dtype.itemsize

    def __repr__(self) -> str:
        counts = {b: int((self.branch == b).sum()) for b in BRANCHES}
        return (f"RecordStore({str(self.path)!r}, samples={self.num_samples}, rows={counts}, "
                f"chunks={len(self.chunks)}, ranks={len(self._metas)}, steps={self.num_steps}, "
                f"blocks={self.num_blocks}, grid={self.grid}, dtype={self.dtype}, "
                f"on disk {self.nbytes / 1e6:.1f} MB)")

    # -- choosing what to read --
    def _positions(self, sel, n: int, what: str) -> np.ndarray:
        """Indices 0..n-1 picked by ``sel``: None (all), an int, a slice, or a sequence of ints (negative
        ones count from the end), in the order given."""
        if sel is None:
            return np.arange(n)
        if isinstance(sel, slice):
            return np.arange(n)[sel]
        idx = np.atleast_1d(np.asarray(sel))
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or len(idx) == 0:
            raise ValueError(f"{what}s must be None, an int, a slice or a non-empty sequence of ints, got {sel!r}")
        bad = idx[(idx < -n) | (idx >= n)]
        if len(bad):
            hint = " (pass step indices, not timestep values)" if what == "step" else ""
            raise ValueError(f"{what}(s) {bad.tolist()} out of range: this store has {what}s 0..{n - 1}{hint}")
        idx = idx % n
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"{what}s {sel!r} name the same {what} twice")
        return idx.astype(np.int64)

    def _rows(self, samples, branch: str | None) -> np.ndarray:
        """Row indices (in row order) of ``branch`` (None: both) and ``samples`` (ids: None, an int, a
        sequence, or a slice lo:hi meaning lo <= id < hi)."""
        keep = np.ones(self.num_rows, dtype=bool)
        if branch is not None:
            if branch not in BRANCHES:
                raise ValueError(f"branch must be 'cond', 'uncond' or None (both), got {branch!r}")
            keep &= self.branch == branch
            if not keep.any():
                raise ValueError(f"no {branch!r} rows in {self.path}; it has {sorted(set(self.branch.tolist()))}")
        if isinstance(samples, slice):
            if samples.step not in (None, 1):
                raise ValueError("a slice of samples takes no step: pass the sample ids as a list")
            lo = -math.inf if samples.start is None else samples.start
            hi = math.inf if samples.stop is None else samples.stop
            keep &= (self.sample_id >= lo) & (self.sample_id < hi)
        elif samples is not None:
            want = np.atleast_1d(np.asarray(samples))
            if want.ndim != 1 or not np.issubdtype(want.dtype, np.integer):
                raise ValueError(f"samples must be sample ids (ints), a slice or None, got {samples!r}")
            missing = np.setdiff1d(want, self.sample_id[keep])
            if len(missing):
                ids = self.sample_id[keep]
                raise ValueError(f"sample(s) {missing[:10].tolist()} are not in {self.path} (branch {branch!r}); "
                                 f"it holds ids {ids.min()}..{ids.max()} ({len(np.unique(ids))} samples)")
            keep &= np.isin(self.sample_id, want)
        rows = np.flatnonzero(keep)
        if len(rows) == 0:
            raise ValueError(f"the selection samples={samples!r}, branch={branch!r} holds no row of {self.path}")
        return rows

    def _by_chunk(self, rows: np.ndarray):
        """``(chunk, rows within the chunk, positions in rows)`` for every chunk holding some of ``rows``."""
        owner = self._row_chunk[rows]
        for ci in np.unique(owner):
            pos = np.flatnonzero(owner == ci)
            yield self.chunks[ci], self._row_local[rows[pos]], pos

    # -- reading --
    def select(self, steps=None, blocks=None, samples=None, branch: str | None = None) -> TokenChangeRecord:
        """An in-memory :class:`TokenChangeRecord` of just this selection (every analysis works on it).

        Args:
            steps: step indices (None: all; an int, a slice or a list); ``record.steps`` keeps the
                chosen indices and ``record.timesteps`` their t.
            blocks: block indices; the record's block axis then runs over these, in the order given
                (``to_frame`` below labels them with the real indices).
            samples: sample ids (None: all; an int, a list, or a slice lo:hi for lo <= id < hi).
            branch: ``'cond'``, ``'uncond'`` or None (both).

        Memory: the selection, ``4 * steps * blocks * rows * tokens * itemsize`` bytes, plus one chunk's
        share of it while that chunk is read; only the selected steps and blocks are read from disk. A step beyond a chunk's last is NaN, as in
        the recorder's own record. ``select()`` with no argument loads everything (``loaded_nbytes``).
        """
        s_idx = self._positions(steps, self.num_steps, "step")
        b_idx = self._positions(blocks, self.num_blocks, "block")
        rows = self._rows(samples, branch)
        out = np.full((4, len(s_idx), len(b_idx), len(rows), self.num_tokens), np.nan, dtype=self.dtype)
        sources = set()
        for chunk, local, pos in self._by_chunk(rows):
            have = np.flatnonzero(s_idx < chunk.num_steps)  # steps this chunk ran
            sources.add(chunk.step_source)
            if len(have):
                part = chunk.read(range(4), s_idx[have], b_idx, local)  # (4, s, b, r, N)
                out[np.ix_(range(4), have, range(len(b_idx)), pos)] = part
        return TokenChangeRecord(
            **{m: out[k] for k, m in enumerate(MEASURES)}, steps=s_idx, timesteps=self.timesteps[s_idx],
            grid=self.grid, class_labels=self.class_labels[rows], branch=self.branch[rows],
            sample_id=self.sample_id[rows], eps=self.eps, model_identity=self.model_identity,
            data_identity=self.data_identity, step_source="+".join(sorted(sources, reverse=True)))

    def to_frame(self, measures: Sequence[str] | None = None, branch: str | None = "cond", steps=None,
                 blocks=None, samples=None):
        """``TokenChangeRecord.to_frame`` of a selection (see :meth:`select`), with the real step and block
        indices in the ``step`` and ``block`` columns."""
        b_idx = self._positions(blocks, self.num_blocks, "block")
        frame = self.select(steps, b_idx, samples, branch).to_frame(measures, branch=branch)
        frame["block"] = b_idx.astype(np.int32)[frame["block"].to_numpy()]
        return frame

    def mean_over(self, measure: str, axes: str | Sequence[str] = ("sample", "token"), branch: str = "cond",
                  steps=None, blocks=None, samples=None) -> np.ndarray:
        """NaN-ignoring mean of ``measure`` over ``axes`` for one branch, in float64, streamed chunk by chunk.

        Equals ``TokenChangeRecord.mean_over`` of the whole record to float rounding (the sums are taken
        per chunk, then added). Memory: one chunk's selected values in float64 at a time, plus the result.
        A kept ``sample`` axis is ordered by sample id, as in the record.
        """
        if measure not in MEASURES:
            raise ValueError(f"unknown measure {measure!r}; choose one of {list(MEASURES)}")
        if branch not in BRANCHES:
            raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r} (the halves are never mixed)")
        k, ax = MEASURES.index(measure), _axis_positions(axes)
        s_idx = self._positions(steps, self.num_steps, "step")
        b_idx = self._positions(blocks, self.num_blocks, "block")
        rows = self._rows(samples, branch)
        sums, counts, ids = [], [], []
        for chunk, local, pos in self._by_chunk(rows):
            x = np.full((len(s_idx), len(b_idx), len(local), self.num_tokens), np.nan)  # (S, L, r, N) float64
            have = np.flatnonzero(s_idx < chunk.num_steps)
            if len(have):
                x[have] = chunk.read([k], s_idx[have], b_idx, local)[0]
            valid = ~np.isnan(x)
            x[~valid] = 0.0
            sums.append(x.sum(axis=ax, keepdims=True))
            counts.append(valid.sum(axis=ax, keepdims=True))
            ids.append(self.sample_id[rows[pos]])
            if 2 in ax:  # the sample axis is summed: keep one running total
                sums, counts = [sum(sums)], [sum(counts)]
        if 2 in ax:
            total, count = sums[0], counts[0]
        else:  # the sample axis is kept: put the chunks' samples side by side, in sample-id order
            order = np.argsort(np.concatenate(ids), kind="stable")
            total = np.concatenate(sums, axis=2)[:, :, order]
            count = np.concatenate(counts, axis=2)[:, :, order]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return mean.squeeze(axis=ax)


def open_record(path: str | os.PathLike) -> RecordStore:
    """Open the record store folder ``path`` for lazy reading (see :class:`RecordStore`)."""
    return RecordStore(path)


# ---- merging ----------------------------------------------------------------------------------

def _place(src: Path, dst: Path, mode: str) -> None:
    """Put chunk data ``src`` at ``dst``: a hard link, a rename, or a copy (written atomically)."""
    try:
        if mode == "link":
            os.link(src, dst)
        elif mode == "move":
            os.replace(src, dst)
        else:
            with open(src, "rb") as f:
                write_atomic(dst, lambda out: shutil.copyfileobj(f, out, 16 << 20))
    except OSError as e:
        if mode == "copy":
            raise
        raise StoreError(f"cannot {mode} {src} to {dst} ({e.strerror}): hard links and renames need both "
                         "folders on one file system; pass mode='copy'") from None


def merge_record_stores(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        mode: str = "link") -> RecordStore:
    """Merge record stores (e.g. one per node, or runs over different sample ranges) into the new folder
    ``out``, without loading any values.

    Every source is checked first (readable, the same recording: model, grid, dtype, eps and step -> t
    mapping; no sample in two places); then each (source, rank) becomes one rank of ``out``, renumbered
    0, 1, ... (its metadata records where it came from), its chunks' data are hard-linked (``mode="link"``,
    the default: no bytes copied, the sources stay valid), renamed (``"move"``: the sources lose them) or
    copied (``"copy"``: across file systems), and their manifests rewritten. Returns the opened result.
    """
    if mode not in ("link", "move", "copy"):
        raise ValueError(f"mode must be 'link', 'move' or 'copy', got {mode!r}")
    stores = [RecordStore(s) for s in sources]
    if not stores:
        raise ValueError("merge_record_stores needs at least one source store")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} already exists and is not an empty folder; merge into a new folder")
    if any(out.resolve() == s.path.resolve() for s in stores):
        raise StoreError(f"{out} is one of the sources; merge into a new folder")
    _agree({str(s.path): s._meta for s in stores}, "merge_record_stores")
    _check_no_duplicates([c for s in stores for c in s.chunks], "merge_record_stores")
    out.mkdir(parents=True, exist_ok=True)
    new_rank = 0
    for store in stores:
        for rank, meta in sorted(store._metas.items()):
            origin = {"store": str(store.path.resolve()), "rank": rank}
            _write_json(out / rank_meta_name(new_rank), dict(meta, rank=new_rank, merged_from=origin))
            for chunk in (c for c in store.chunks if c.rank == rank):
                stem = chunk_name(new_rank, chunk.index)
                _place(chunk.data, out / f"{stem}.npy", mode)
                man = _read_json(chunk.manifest, "chunk manifest")
                _write_json(out / f"{stem}.json", dict(man, rank=new_rank, data=f"{stem}.npy", merged_from=origin))
                if mode == "move":
                    chunk.manifest.unlink()
            if mode == "move":
                (store.path / rank_meta_name(rank)).unlink()
            new_rank += 1
    return RecordStore(out)
