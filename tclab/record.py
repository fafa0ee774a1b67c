"""Record how every token changes between denoising steps, block by block (token redundancy).

This is the measuring instrument of ``shared/docs/tokencache.md`` section 1 (TokenCache, Lou et al.,
arXiv 2409.18523). A DiT block ``l`` maps its input ``x_l`` to ``x_{l+1} = x_l + u_l``; for every
step ``s``, block ``l``, row ``b`` of the transformer batch and token ``i`` (all norms over the
hidden width C, computed in float32):

- ``out_change = ||x_{l+1}^s[i] - x_{l+1}^{s-1}[i]|| / (||x_{l+1}^{s-1}[i]|| + eps)``: how far the
  token's state after block l moved since the last step (NaN at s = 0);
- ``update_change = ||u_l^s[i] - u_l^{s-1}[i]|| / (||u_l^{s-1}[i]|| + eps)``: how stale a cached
  update would be, the quantity caching errs by (NaN at s = 0);
- ``update_ratio = ||u_l^s[i]|| / (||x_l^s[i]|| + eps)``: how much block l changes the token at all
  (exists at s = 0 too, and is stored there);
- ``cos = <u_l^s[i], u_l^{s-1}[i]> / (max(||u_l^s[i]||, eps) * max(||u_l^{s-1}[i]||, eps))``:
  direction stability (NaN at s = 0; 0 for a zero update, as ``torch.nn.functional.cosine_similarity``).

Usage::

    with record_token_changes(model.transformer, model_identity=model.identity()) as rec:
        sample(model, labels, SampleConfig(num_steps=50))
    record = rec.record                      # a TokenChangeRecord
    record.mean_over("update_change")        # (steps, blocks) mean over cond samples and tokens
    record.save(run_dir / "token_changes.npz")

**Step 0 is stored.** The step axis holds every executed step, so ``record.out_change[s]`` *is*
step ``s`` (no off-by-one between the array index and the step index). At step 0 only
``update_ratio`` exists; the three change measures are NaN there (use the ``nan*`` reductions, as
``mean_over`` does). ``record.steps`` holds the step indices, ``record.timesteps`` the scheduler's
timestep values ``t(s)``: never use one for the other.

**Where step and t come from.** Inside :func:`tclab.sampling.sample` the sampler's
``current_step()`` gives the step index, ``t`` and a ``run_id`` that changes with every batch
(chunk); a new ``run_id`` resets the previous-step state and the new batch's rows are appended
along the sample axis. Outside it (e.g. diffusers' ``DiTPipeline``) the recorder **falls back to
counting transformer forward calls** with ``tclab.steps.StepTracker``, the rule all of tclab uses:
the n-th call of a run is step n, ``t`` is read from the ``timestep`` argument, and a new run starts
when the input's shape or the class labels change or ``t`` goes *up* (a new trajectory starts from
high noise). That fallback assumes one transformer
call per scheduler step (true for DDIM, DPM-Solver++, Euler; not for Heun-style two-call steps).

**CFG.** tclab's sampler and DiTPipeline run ``[cond rows; uncond rows]`` in one batch. Both halves
are recorded, on separate rows: ``record.branch[r]`` is ``'cond'`` or ``'uncond'`` and
``record.sample_id[r]`` links a conditional row to its unconditional twin. Every reduction and
``to_frame`` takes a ``branch`` and never averages the two together. ``record.class_labels[r]`` is
the class the sample was asked for: an unconditional row carries its twin's class (the model was
fed the null label 1000 for it). Outside the sampler a batch counts as CFG when its second half is
all null labels and its first half is not (``tclab.steps.is_cfg_batch``).

**Hooks.** Plain torch forward hooks (``register_forward_pre_hook(..., with_kwargs=True)`` on the
transformer for ``timestep``/``class_labels``, ``register_forward_hook(..., with_kwargs=True)`` on
each block), not diffusers' ``HookRegistry``: (1) torch hooks wrap ``Module.__call__``, so they see
each block's real input and output even when a diffusers hook (``tclab.cache``) has replaced the
block's ``forward`` -- the recorder measures what actually ran; (2) removal by handle restores the
modules' hook dicts exactly, whereas a registry stays attached to the module; (3) house style keeps
diffusers' hook API inside ``tclab/cache/hooks.py``. The hooks return ``None`` and never change
outputs; they are removed when the ``with`` block ends, also on an exception.

**Hot path and memory.** Per block and step, the hook does the (rows, N, C) work only: three
subtractions into preallocated scratch (``u = x_{l+1} - x_l``, ``dx = x_{l+1}^s - x_{l+1}^{s-1}``,
``du = dx_{l+1} - dx_l``, which equals ``u^s - u^{s-1}``) and two norm calls (one over the stacked
``[u, dx, du]``, one for ``||x_{l+1}||``; ``||x_l||`` is block l-1's). Differences are taken in the
model's dtype, norms accumulate in float32.
Once per step, the transformer's post-hook turns the (L, rows, N) norms of all blocks into the four
measures with a dozen small ops; the cosine comes from the same norms
(``<a, b> = (|a|^2 + |b|^2 - |a - b|^2) / 2``), so there is no dot product and no stored copy of
``u^{s-1}``. The previous step is kept as references to the blocks' own inputs and outputs (the
tensors the model made anyway: ``L + 1`` of shape (rows, N, C) in a plain DiT) plus 6 scratch
tensors of that shape, e.g. DiT-XL/2, 16 samples with CFG (32 rows), float32:
35 x 32 x 256 x 1152 x 4 B = 1.3 GB on the model's device. Measures go into a per-batch buffer on
the device (preallocated from ``StepContext.num_steps`` when known, grown by doubling otherwise) and
move to the CPU once per batch, so inside tclab's sampler the hooks never wait for the GPU (the
fallback reads ``t`` with one sync per step). The hooks rely on blocks not modifying their input or
output tensors in place after returning (true of diffusers' blocks).

**Storage precision.** Measures are stored as float32 by default: DiT-XL/2 at 50 steps holds
50 x 28 x 256 x 4 measures = 1.43 M values per row, 5.7 MB per (sample, branch), i.e. 0.73 GB for
64 samples with CFG. ``storage_dtype=torch.float16`` halves that, at the price of 3 significant
digits: fine for the change ratios, but ``cos`` near 1 is quantised to steps of 4.9e-4 (cosines of
0.9995 and 0.99999 become the same number) and ratios above 65504 (only when ``||x|| ~ 0``)
become ``inf``; use it for large sweeps that do not study direction stability.

**Records that outgrow memory.** ``stream_to=FOLDER`` writes each batch, when it finishes, to a
*record store* (:mod:`tclab.record_store`: one ``.npy`` + JSON manifest per batch and rank, written
atomically, plus each rank's metadata) and keeps nothing of it in RAM, so a study over thousands of
samples needs the memory of one batch. Rows carry their *global* sample index (``sample_offset=lo``
for a rank recording samples ``[lo, hi)``), so several torchrun ranks can write into one folder at
once (``rank=``) and read back in sample order. ``open_record(FOLDER)`` reads lazily:
``.select(steps=, blocks=, samples=, branch=)`` is an in-memory ``TokenChangeRecord`` of just that part
(every analysis function takes it), ``.mean_over`` and ``.to_frame`` work chunk by chunk, and
``merge_record_stores`` joins folders by hard links::

    with record_token_changes(model.transformer, model_identity=model.identity(),
                              stream_to=run_dir / "changes", rank=rank, sample_offset=lo) as rec:
        sample(model, labels[lo:hi], SampleConfig(num_steps=50))
    store = open_record(run_dir / "changes")        # or rec.store; rec.record is refused
    store.mean_over("update_change")                # (steps, blocks), streamed
    store.select(blocks=[3], samples=range(100))    # a TokenChangeRecord of block 3, samples 0..99

A batch is written when the next one starts (or the ``with`` block ends), in the transformer's
pre-hook: one device->host copy as before, then the chunk's bytes at disk speed, once per batch. The
record class itself, its ``save``/``load`` and the store live in :mod:`tclab.record_store` (numpy
only, no torch); this module re-exports them.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

# the record itself and its stores live in tclab.record_store (which needs no torch); re-exported here
from .record_store import (AXES, BRANCHES, MEASURES, RecordStore, RecordStoreWriter, TokenChangeRecord,
                           _json_dict, merge_record_stores, open_record, quiet_nan_warnings)
from .steps import NULL_CLASS, StepTracker, bind_model_call, dit_blocks

__all__ = ["AXES", "BRANCHES", "MEASURES", "RecordStore", "RecordStoreWriter", "TokenChangeRecord",
           "TokenChangeRecorder", "merge_record_stores", "open_record", "quiet_nan_warnings", "record_token_changes"]

_OUT, _UPD, _RATIO, _COS = range(4)  # slot of each measure in the per-step device buffer


# ---- finding the blocks -----------------------------------------------------------------------

def _token_grid(transformer: torch.nn.Module) -> tuple[int, int]:
    cfg = getattr(transformer, "config", None)
    size, patch = getattr(cfg, "sample_size", None), getattr(cfg, "patch_size", None)
    if size is None or patch is None:
        raise TypeError(f"{type(transformer).__name__} has no config.sample_size / config.patch_size, so the "
                        "token grid is unknown; record_token_changes needs a DiT-like config "
                        "(DiTTransformer2DModel.config has both)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return h // patch, w // patch


# ---- the recorder -----------------------------------------------------------------------------

class _RunState:
    """Everything about the batch now running; dropped when the next batch (run) starts.

    Keeps only the previous step: per block the reference to its output ``x_{l+1}^{s-1}`` and its
    input ``x_l^{s-1}`` (the same tensor as block l-1's output when blocks are chained, so L+1
    tensors in all), the (rows, N) norms of the previous and the current step, and two
    (3, rows, N, C) scratch buffers that alternate between blocks.
    """

    __slots__ = ("key", "source", "rows", "num_blocks", "buf", "steps_done", "step", "last_step", "last_t",
                 "row_labels", "row_branch", "row_ids", "x_prev", "xin_prev", "prev_step",
                 "chained_prev", "norms", "scratch", "ran", "has_prev", "chained", "last_out", "last_block",
                 "last_has_dx", "pending")

    def __init__(self, key, source, rows, num_blocks):
        self.key, self.source, self.rows, self.num_blocks = key, source, rows, num_blocks
        self.buf: torch.Tensor | None = None  # (capacity, L, 4, rows, N) measures of this batch
        self.steps_done = 0
        self.step = -1
        self.last_step = -1
        self.last_t = math.nan
        self.x_prev = [None] * num_blocks  # block outputs x_{l+1}^{s-1}, (rows, N, C) each (references)
        self.xin_prev = [None] * num_blocks  # block inputs x_l^{s-1} (references)
        self.prev_step = [-2] * num_blocks  # the step at which each block last ran
        self.chained_prev = [False] * num_blocks  # was block l's input block l-1's output at that step
        self.norms: torch.Tensor | None = None  # (2, L, 5, rows, N) float32, slot s % 2 = step s
        self.scratch: list[torch.Tensor] | None = None  # 2 x (3, rows, N, C): [u, dx, du] of alternate blocks
        self.ran = [False] * num_blocks  # this step: did block l run, had it a previous step, was it chained
        self.has_prev = [False] * num_blocks
        self.chained = [False] * num_blocks
        self.last_out, self.last_block = None, -1  # the output of the block that ran last, and its index
        self.last_has_dx = False
        self.pending = False  # norms of the current step not yet turned into measures


# slots of the per-step norm buffer; A, DX, DU adjacent so one norm call fills them
_A, _DX, _DU, _NOUT, _NIN = range(5)


class TokenChangeRecorder:
    """State of one :func:`record_token_changes` context; ``.record`` is the result after it ends
    (``.store`` when it streamed to disk).

    Not created directly: use ``with record_token_changes(transformer) as recorder``.
    """

    def __init__(self, transformer: torch.nn.Module, eps: float = 1e-6, model_identity: dict | None = None,
                 data_identity: dict | None = None, storage_dtype: torch.dtype = torch.float32,
                 stream_to: str | os.PathLike | None = None, rank: int = 0, sample_offset: int = 0):
        self.blocks = dit_blocks(transformer, "record_token_changes")
        self.grid = _token_grid(transformer)
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (it keeps the ratios finite), got {eps}")
        if storage_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"storage_dtype must be torch.float32 or torch.float16, got {storage_dtype}")
        self.transformer = transformer
        self.eps = float(eps)
        self.storage_dtype = storage_dtype
        self.num_tokens = self.grid[0] * self.grid[1]
        if model_identity is None:
            model_identity = {"class": type(transformer).__name__, "blocks": len(self.blocks),
                              "token_grid": list(self.grid)}
        self.model_identity = _json_dict("model_identity", model_identity)
        self.data_identity = _json_dict("data_identity", data_identity)
        self._handles: list = []
        self._tracker = StepTracker()
        self._run: _RunState | None = None
        self._chunks: list[dict] = []  # finished batches: values (S_r, L, 4, R_r, N) + row metadata
        self._ref_t: list[float] = []  # t of each step index, shared by all batches of the record
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
            raise ValueError(f"sample_offset must be an int >= 0 (the global index of the first sample), "
                             f"got {sample_offset!r}")
        self._next_id = sample_offset  # sample_id of the next batch's first sample
        self._in_forward = False
        self._closed = False
        self._record: TokenChangeRecord | None = None
        self.stream_to = None if stream_to is None else Path(stream_to)
        self._writer: RecordStoreWriter | None = None  # set: finished batches go to disk, not to _chunks
        if self.stream_to is not None:
            self._writer = RecordStoreWriter(
                self.stream_to, rank, grid=self.grid, num_blocks=len(self.blocks),
                dtype="float16" if storage_dtype == torch.float16 else "float32", eps=self.eps,
                model_identity=self.model_identity, data_identity=self.data_identity)
        elif rank != 0:
            raise ValueError(f"rank={rank} names this process's files in a record store; it needs stream_to=FOLDER "
                             "(an in-memory record has no files): pass stream_to, or drop rank")

    # -- attach / detach --
    def _attach(self) -> None:
        try:
            self._handles.append(self.transformer.register_forward_pre_hook(self._on_forward, with_kwargs=True))
            self._handles.append(self.transformer.register_forward_hook(self._on_forward_end, with_kwargs=True,
                                                                        always_call=True))
            for l, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_hook(self._block_hook(l), with_kwargs=True))
        except BaseException:
            self._detach()
            raise

    def _detach(self, finished: bool = True) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._in_forward = False
        self._closed = True
        if not finished and self._writer is not None:
            self._run = None  # the `with` block raised: a batch cut short is not streamed (re-record it)
        self._finish_run()

    # -- results --
    @property
    def record(self) -> TokenChangeRecord:
        """The finished record (available once the ``with`` block has ended)."""
        self._refuse_if_streamed("record")
        if not self._closed:
            raise RuntimeError("the record is complete only after the `with record_token_changes(...)` block "
                               "ends; call recorder.result() for a snapshot of what ran so far")
        if self._record is None:
            self._record = self.result()
        return self._record

    def result(self) -> TokenChangeRecord:
        """A record of everything recorded so far (all finished batches plus the running one)."""
        self._refuse_if_streamed("result()")
        chunks = list(self._chunks)
        if self._run is not None and self._run.steps_done:
            chunks.append(self._chunk_of(self._run, copy=True))
        if not chunks:
            raise RuntimeError("nothing was recorded: the transformer was not called inside "
                               "record_token_changes(...); run the sampler inside the `with` block")
        s = max(c["values"].shape[0] for c in chunks)
        r = sum(c["values"].shape[3] for c in chunks)
        data = np.full((4, s, len(self.blocks), r, self.num_tokens), np.nan,
                       dtype=np.float16 if self.storage_dtype == torch.float16 else np.float32)
        r0 = 0
        for c in chunks:
            v = c["values"]  # (S_r, L, 4, R_r, N)
            data[:, : v.shape[0], :, r0: r0 + v.shape[3]] = v.transpose(2, 0, 1, 3, 4)
            r0 += v.shape[3]
        ref_t = (self._ref_t + [math.nan] * s)[:s]
        sources = sorted({c["source"] for c in chunks}, reverse=True)
        return TokenChangeRecord(
            **{m: data[k] for k, m in enumerate(MEASURES)},
            steps=np.arange(s), timesteps=np.array([math.nan if t is None else t for t in ref_t]),
            grid=self.grid, class_labels=np.concatenate([c["labels"] for c in chunks]),
            branch=np.concatenate([c["branch"] for c in chunks]),
            sample_id=np.concatenate([c["ids"] for c in chunks]),
            eps=self.eps, model_identity=self.model_identity, data_identity=self.data_identity,
            step_source="+".join(sources),
        )

    @property
    def store(self) -> RecordStore:
        """The record store this recording streams to, opened for lazy reading (its finished batches;
        with several ranks writing into the folder, theirs too)."""
        if self._writer is None:
            raise RuntimeError("this recording is held in memory (no stream_to=...): use recorder.record")
        return open_record(self.stream_to)

    @property
    def written(self) -> list[Path]:
        """Manifests of the chunks this recorder has written (empty without ``stream_to``)."""
        return [] if self._writer is None else list(self._writer.written)

    def _refuse_if_streamed(self, what: str) -> None:
        if self._writer is not None:
            raise RuntimeError(f"this recording streamed its batches to {self.stream_to} and keeps none in memory, "
                               f"so it has no recorder.{what}; read it with recorder.store or "
                               f"tclab.record.open_record({str(self.stream_to)!r}), and .select(...) a part")

    # -- runs (batches) --
    def _chunk_of(self, run: _RunState, copy: bool) -> dict:
        v = run.buf[: run.steps_done]  # (S_r, L, 4, R_r, N)
        copy = copy or run.steps_done < run.buf.shape[0]  # do not keep the unused capacity alive
        v = v.to("cpu", copy=copy).numpy()  # the one device->host transfer of this batch
        return {"values": v, "labels": run.row_labels, "branch": run.row_branch, "ids": run.row_ids,
                "source": run.source}

    def _finish_run(self) -> None:
        if self._run is not None and self._run.steps_done:
            chunk = self._chunk_of(self._run, copy=False)
            if self._writer is None:
                self._chunks.append(chunk)
            else:
                self._stream(chunk)
        self._run = None

    def _stream(self, chunk: dict) -> None:
        """Write a finished batch to the store; nothing of it stays in memory."""
        v = chunk["values"]  # (S_r, L, 4, R_r, N)
        self._writer.write_chunk(v.transpose(2, 0, 1, 3, 4), sample_id=chunk["ids"], branch=chunk["branch"],
                                 class_labels=chunk["labels"], step_source=chunk["source"],
                                 timesteps=[math.nan if t is None else t for t in self._ref_t])

    def _start_run(self, key, source, x: torch.Tensor, labels, cfg: bool, batch: int, num_steps: int | None):
        self._finish_run()
        rows = x.shape[0]
        run = _RunState(key, source, rows, len(self.blocks))
        lab = (labels.detach().reshape(-1).to("cpu", torch.int64).numpy() if torch.is_tensor(labels)
               else np.full(rows, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1))
        if len(lab) == 1 and rows > 1:
            lab = np.repeat(lab, rows)
        if cfg:  # rows [0, B) conditional, [B, 2B) their unconditional twins, as tclab's sampler / DiTPipeline
            if rows != 2 * batch:
                raise ValueError(f"the sampler says this is a CFG batch of {batch} samples, so the transformer "
                                 f"should get {2 * batch} rows, but it got {rows}; is something else calling the "
                                 "transformer inside the sampler's step?")
            ids = np.arange(self._next_id, self._next_id + batch)
            run.row_ids = np.concatenate([ids, ids])
            run.row_branch = np.array(["cond"] * batch + ["uncond"] * batch)
            run.row_labels = np.concatenate([lab[:batch], lab[:batch]])
            self._next_id += batch
        else:
            run.row_ids = np.arange(self._next_id, self._next_id + rows)
            run.row_branch = np.where(lab == NULL_CLASS, "uncond", "cond")
            run.row_labels = lab
            self._next_id += rows
        cap = num_steps if num_steps else 16
        run.buf = torch.full((cap, len(self.blocks), 4, rows, self.num_tokens), math.nan,
                             dtype=self.storage_dtype, device=x.device)
        self._run = run
        return run

    # -- hooks --
    def _on_forward(self, module, args, kwargs):
        """Transformer pre-hook: work out step, t, run and rows; once per forward call."""
        a = bind_model_call(args, kwargs)
        x, labels = a["hidden_states"], a.get("class_labels")
        ctx = self._tracker(x, a.get("timestep"), labels)  # the sampler's step, or worked out from the calls
        run = self._run
        if run is None or run.key != ctx.run_id:
            source = "sampler" if ctx.source == "sampler" else "forward-count"
            run = self._start_run(ctx.run_id, source, x, labels, ctx.cfg, ctx.batch, ctx.num_steps or None)
        step, t = ctx.step, float(ctx.t)
        if step <= run.last_step:
            raise RuntimeError(f"the transformer was called twice for step {step} of one batch; "
                               "record_token_changes expects one transformer call per sampling step")
        self._check_t(step, t)
        run.step, run.last_step, run.last_t = step, step, t
        cap = run.buf.shape[0]
        if step >= cap:  # step count unknown (fallback) or exceeded: grow the buffer by doubling
            more = torch.full((max(cap, step + 1 - cap),) + run.buf.shape[1:], math.nan, dtype=run.buf.dtype,
                              device=run.buf.device)
            run.buf = torch.cat([run.buf, more])
        run.steps_done = step + 1
        run.last_out, run.last_block, run.last_has_dx, run.pending = None, -1, False, True
        run.ran = [False] * run.num_blocks
        self._in_forward = True

    def _on_forward_end(self, module, args, kwargs, output):
        """Transformer post-hook (always called): turn this step's norms into the four measures."""
        self._in_forward = False
        run = self._run
        if run is not None and run.pending:
            run.pending = False
            if output is not None:  # None: the forward raised; the interrupted step stays NaN
                with torch.no_grad():
                    self._finish_step(run)

    def _check_t(self, step: int, t: float) -> None:
        ref = self._ref_t
        while len(ref) <= step:
            ref.append(None)
        if ref[step] is None or (math.isnan(ref[step]) and math.isnan(t)):
            ref[step] = t
        elif not math.isclose(ref[step], t, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"step {step} ran at t={t}, but an earlier batch of this recording ran step {step} at "
                             f"t={ref[step]}: one TokenChangeRecord maps each step index to one timestep value; "
                             "record sampling calls with another num_steps, scheduler or SDEdit strength in their "
                             "own record_token_changes(...) context")

    def _block_hook(self, l: int):
        def hook(module, args, kwargs, output):
            if not self._in_forward or self._run is None:
                return None  # the block ran outside a transformer forward (e.g. a trainer calling it): ignore
            x_in = args[0] if args else kwargs.get("hidden_states")
            if not torch.is_tensor(output) or not torch.is_tensor(x_in) or output.shape != x_in.shape \
                    or output.dim() != 3 or output.shape[1] != self.num_tokens:
                got = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
                raise TypeError(f"block {l} ({type(module).__name__}) mapped hidden_states of shape "
                                f"{tuple(x_in.shape) if torch.is_tensor(x_in) else type(x_in).__name__} to {got}; "
                                f"record_token_changes needs DiT blocks mapping (B, N={self.num_tokens}, C) to the "
                                "same shape, like diffusers' BasicTransformerBlock")
            if output.shape[0] != self._run.rows:
                raise RuntimeError(f"block {l} got {output.shape[0]} rows but this batch has {self._run.rows}")
            with torch.no_grad():
                self._norm_block(l, x_in, output)
            return None
        return hook

    def _norm_block(self, l: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        """Hot path, per block: the (rows, N, C) work -- 3 subtractions and 2-3 norm calls."""
        run, s = self._run, self._run.step
        if run.scratch is None or run.scratch[0].dtype != x_out.dtype or run.scratch[0].device != x_out.device:
            run.scratch = [torch.empty((3,) + tuple(x_out.shape), dtype=x_out.dtype, device=x_out.device)
                           for _ in range(2)]
        if run.norms is None or run.norms.device != x_out.device:
            run.norms = torch.empty((2, run.num_blocks, 5) + tuple(x_out.shape[:2]), dtype=torch.float32,
                                    device=x_out.device)
        # float32 inputs accumulate in float32 already; half/bfloat16 ones are upcast inside the norm
        kw = {} if x_out.dtype == torch.float32 else {"dtype": torch.float32}
        norm = torch.linalg.vector_norm
        work = run.scratch[l % 2]  # (3, R, N, C): u, dx, du of this block
        other = run.scratch[(l + 1) % 2]  # the same of block l-1 at this step
        cur = run.norms[s % 2, l]  # (5, R, N)
        # block l's input is block l-1's output (always, in a plain DiT)
        chained = x_in is run.last_out and run.last_block == l - 1
        has_prev = run.prev_step[l] == s - 1  # the previous step of this batch ran this block

        torch.sub(x_out, x_in, out=work[0])  # u_l^s
        if has_prev:
            torch.sub(x_out, run.x_prev[l], out=work[1])  # dx = x_{l+1}^s - x_{l+1}^{s-1}
            if chained and run.chained_prev[l] and run.last_has_dx:
                torch.sub(work[1], other[1], out=work[2])  # du_l = dx_{l+1} - dx_l = u_l^s - u_l^{s-1}
            else:
                torch.sub(x_in, run.xin_prev[l], out=work[2])
                torch.sub(work[1], work[2], out=work[2])
            norm(work, dim=-1, out=cur[_A:_DU + 1], **kw)  # (3, R, N) ||u||, ||dx||, ||du|| in one call
        else:
            norm(work[0], dim=-1, out=cur[_A], **kw)
        norm(x_out, dim=-1, out=cur[_NOUT], **kw)
        if not chained:  # chained inputs take block l-1's ||x_out|| in _finish_step
            norm(x_in, dim=-1, out=cur[_NIN], **kw)

        run.ran[l], run.has_prev[l], run.chained[l] = True, has_prev, chained
        run.x_prev[l], run.xin_prev[l], run.prev_step[l], run.chained_prev[l] = x_out, x_in, s, chained
        run.last_out, run.last_block, run.last_has_dx = x_out, l, has_prev

    def _finish_step(self, run: _RunState) -> None:
        """Once per step: the (L, rows, N) arithmetic of all blocks at once, into the device buffer."""
        s, eps, nb = run.step, self.eps, run.num_blocks
        cur, prev = run.norms[s % 2], run.norms[(s - 1) % 2]  # (L, 5, R, N) each
        out = run.buf[s]  # (L, 4, R, N)
        ran, has_prev, chained = run.ran, run.has_prev, run.chained
        if all(ran) and chained == [False] + [True] * (nb - 1):  # a plain DiT: x_l = block l-1's output
            cur[1:, _NIN] = cur[:-1, _NOUT]
        else:
            for l in range(nb):
                if ran[l] and chained[l]:
                    cur[l, _NIN] = cur[l - 1, _NOUT]
        a = cur[:, _A]  # (L, R, N) ||u_l^s||
        torch.div(a, cur[:, _NIN] + eps, out=out[:, _RATIO])
        if any(has_prev):
            a_p, d_u = prev[:, _A], cur[:, _DU]  # ||u_l^{s-1}||, ||u_l^s - u_l^{s-1}||
            torch.div(cur[:, _DX], prev[:, _NOUT] + eps, out=out[:, _OUT])
            torch.div(d_u, a_p + eps, out=out[:, _UPD])
            # <u, u'> = (|u|^2 + |u'|^2 - |u - u'|^2) / 2: the cosine needs no dot product
            num = torch.addcmul(a * a, a_p, a_p).addcmul_(d_u, d_u, value=-1.0)
            den = a.clamp_min(eps).mul_(a_p.clamp_min(eps)).mul_(2.0)
            torch.div(num, den, out=out[:, _COS])
            out[:, _COS].clamp_(-1.0, 1.0)
        for l in range(nb):  # irregular cases only (a block skipped, a gap in the steps)
            if not ran[l]:
                out[l] = math.nan
            elif not has_prev[l]:
                out[l, [_OUT, _UPD, _COS]] = math.nan


@contextmanager
def record_token_changes(transformer: torch.nn.Module, eps: float = 1e-6, model_identity: dict | None = None,
                         data_identity: dict | None = None, *, storage_dtype: torch.dtype = torch.float32,
                         stream_to: str | os.PathLike | None = None, rank: int = 0,
                         sample_offset: int = 0) -> Iterator[TokenChangeRecorder]:
    """Record ``out_change``, ``update_change``, ``update_ratio`` and ``cos`` of every block and token
    while the ``with`` block samples; see the module docstring for definitions and choices.

    Args:
        transformer: a diffusers ``DiTTransformer2DModel`` (``loaded.transformer``) or any module with a
            ``transformer_blocks`` ModuleList of blocks mapping (B, N, C) -> (B, N, C) and a config with
            ``sample_size`` and ``patch_size`` (for the token grid).
        eps: added to the denominators (and the floor of the norms in ``cos``).
        model_identity, data_identity: provenance stored in the record (e.g. ``loaded.identity()``);
            JSON values only. Without ``model_identity`` the class, block count and grid are stored.
        storage_dtype: ``torch.float32`` (default) or ``torch.float16`` for large sweeps (halves memory,
            quantises ``cos`` near 1; the computation is float32 either way).
        stream_to: a folder: write each batch to this record store (``tclab.record_store``) when it
            finishes and keep none in memory; read it with ``recorder.store`` / ``open_record(folder)``.
            A batch cut short by an exception is not written. Default None: the record is held in memory.
        rank: with ``stream_to``, this process's rank (its files are ``rankNNNNN*``; several ranks may
            write into one folder at once).
        sample_offset: the global index of the first sample recorded here: rows get ``sample_id``
            ``sample_offset, sample_offset + 1, ...`` (a rank recording samples [lo, hi) passes lo).

    Yields:
        a ``TokenChangeRecorder``; after the block, ``recorder.record`` is the ``TokenChangeRecord``
        (``recorder.store`` the ``RecordStore`` when streaming).

    The hooks are removed when the block ends, whatever happens inside it. Several batches (the
    sampler's chunks, several ``sample`` or pipeline calls) append rows; they must share the
    step -> t mapping.
    """
    recorder = TokenChangeRecorder(transformer, eps, model_identity, data_identity, storage_dtype,
                                   stream_to=stream_to, rank=rank, sample_offset=sample_offset)
    recorder._attach()
    finished = False
    try:
        yield recorder
        finished = True
    finally:
        recorder._detach(finished)
