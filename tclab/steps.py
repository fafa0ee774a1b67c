"""Which denoising step is running: one answer for every hook in tclab.

Caching (``tclab.cache``), the external peers, the recorder (``tclab.record``) and predictor training
all need, on every transformer call, the step index, the timestep, whether the batch is a CFG batch
and whether a new sampling run has started. This leaf module (torch only) is the one place that
answers it.

**Inside tclab's sampler** (``tclab.sampling.sample``) the answer is given: the sampler wraps each
transformer call in :func:`running`, and :func:`current_step` returns its :class:`StepContext`
(``source="sampler"``, a positive ``run_id`` per batch chunk).

**Outside it** (diffusers' ``DiTPipeline``, a bare ``transformer(x, t, y)`` call) a
:class:`StepTracker` works it out from the call itself, with one rule for all of tclab:

- *a new run starts* on the first call, after :meth:`StepTracker.reset`, when the input's shape
  (rows, channels, grid) or the class labels change, when the timestep goes **up** (within a run it
  decreases; an equal value, as second-order schedulers repeat, is the next step of the same run), or
  when the run has had ``num_steps`` calls (when the caller knows the number of steps);
- *a CFG batch* is DiTPipeline's layout: an even number of rows whose second half carries only the
  null label (:data:`NULL_CLASS`) and whose first half does not (an all-null batch is unconditional
  sampling, not CFG); decided once per run;
- steps count calls from 0 within a run; runs found this way get negative ``run_id``\\ s
  (``source="calls"``), so they never collide with the sampler's.

Also here: the binding of ``DiTTransformer2DModel.forward`` / ``BasicTransformerBlock.forward``
arguments given by position or keyword (:func:`bind_model_call`, :func:`bind_block_call`) and the
block list of a DiT (:func:`dit_blocks`).
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import torch

NULL_CLASS = 1000  # DiT's null (unconditional) label; DiTPipeline hard-codes it for the CFG half

MODEL_ARGS = ("hidden_states", "timestep", "class_labels", "cross_attention_kwargs", "return_dict")
BLOCK_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
              "cross_attention_kwargs", "class_labels", "added_cond_kwargs")


@dataclass(frozen=True)
class StepContext:
    """Which denoising step is running. ``step`` is the 0-based index (0 = first executed, noisiest
    step), ``t`` the timestep value, ``num_steps`` the run's length (0 when unknown), ``cfg`` whether
    the rows are ``[cond; uncond]`` halves, ``batch`` the samples not counting the unconditional
    copies, ``run_id`` the run (positive: tclab's sampler; negative: found by :class:`StepTracker`)."""

    step: int
    t: float
    num_steps: int
    cfg: bool
    batch: int
    run_id: int
    source: str = "sampler"  # "sampler" (given by tclab's sampler) or "calls" (worked out by a StepTracker)


_STEP: ContextVar[StepContext | None] = ContextVar("tclab_step", default=None)
_SAMPLER_RUN_IDS = itertools.count(1)
_TRACKED_RUN_IDS = itertools.count(-1, -1)


def current_step() -> StepContext | None:
    """The step tclab's sampler is running now, or None outside ``tclab.sampling.sample``."""
    return _STEP.get()


def next_run_id() -> int:
    """A fresh run id for the sampler (one per batch chunk)."""
    return next(_SAMPLER_RUN_IDS)


@contextmanager
def running(ctx: StepContext) -> Iterator[StepContext]:
    """Make ``ctx`` the :func:`current_step` while the block runs (the sampler's side)."""
    token = _STEP.set(ctx)
    try:
        yield ctx
    finally:
        _STEP.reset(token)


# ---- argument binding -------------------------------------------------------------------------

def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def bind_model_call(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``DiTTransformer2DModel.forward``'s arguments by name, however they were passed."""
    return _bind(MODEL_ARGS, args, kwargs)


def bind_block_call(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``BasicTransformerBlock.forward``'s arguments by name, however they were passed."""
    return _bind(BLOCK_ARGS, args, kwargs)


def timestep_value(timestep) -> float:
    """The first timestep of a call as a float (NaN when none was given)."""
    if timestep is None:
        return math.nan
    if torch.is_tensor(timestep):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else math.nan
    if isinstance(timestep, (list, tuple)):
        return float(timestep[0]) if timestep else math.nan
    return float(timestep)


def is_cfg_batch(labels, rows: int) -> bool:
    """DiTPipeline's CFG layout: even rows, the second half all null labels, the first half not."""
    if not torch.is_tensor(labels) or labels.numel() != rows or rows % 2:
        return False
    null = labels.reshape(-1) == NULL_CLASS
    return bool(null[rows // 2:].all()) and not bool(null[: rows // 2].all())


# ---- the block list ---------------------------------------------------------------------------

def dit_blocks(transformer, who: str = "tclab") -> torch.nn.ModuleList:
    """The transformer's block list (``transformer_blocks``), or a TypeError saying what was found."""
    name = type(transformer).__name__
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        children = [n for n, _ in transformer.named_children()] if isinstance(transformer, torch.nn.Module) else []
        raise TypeError(f"{name} is not a DiT: it has no `transformer_blocks` (its children are {children}). "
                        f"{who} needs a diffusers DiTTransformer2DModel (or a model with a "
                        "`transformer_blocks` ModuleList of blocks mapping hidden_states (B, N, C) -> (B, N, C)); "
                        "pass `loaded.transformer`, not the pipeline or the LoadedDiT")
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"{name}.transformer_blocks is a {type(blocks).__name__} of length "
                        f"{len(blocks) if hasattr(blocks, '__len__') else '?'}; expected a non-empty "
                        "torch.nn.ModuleList of DiT blocks (BasicTransformerBlock)")
    return blocks


# ---- outside the sampler ----------------------------------------------------------------------

class StepTracker:
    """The :class:`StepContext` of each transformer call, inside tclab's sampler or not.

    ``tracker(hidden_states, timestep, class_labels)`` once per transformer call returns the
    sampler's context when there is one, else the context worked out by the rule in the module
    docstring. ``num_steps`` (when the caller knows the run length) also ends a run after that many
    calls and is reported as ``StepContext.num_steps`` (else 0). ``reset()`` makes the next call start
    a new run.
    """

    def __init__(self, num_steps: int | None = None):
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        self._run_id: int | None = None
        self._calls = 0  # calls of the current run
        self._t_prev = math.nan
        self._shape: tuple | None = None
        self._labels = None
        self._cfg = False

    def new_run(self, hidden_states: torch.Tensor, t: float, class_labels) -> bool:
        """Whether this call (outside the sampler) starts a new run, by the one rule."""
        return (self._run_id is None or tuple(hidden_states.shape) != self._shape
                or not _same_labels(class_labels, self._labels) or t > self._t_prev
                or (self.num_steps is not None and self._calls >= self.num_steps))

    def __call__(self, hidden_states: torch.Tensor, timestep, class_labels) -> StepContext:
        ctx = current_step()
        if ctx is not None:
            return ctx
        t = timestep_value(timestep)
        rows = hidden_states.shape[0]
        if self.new_run(hidden_states, t, class_labels):
            self._run_id = next(_TRACKED_RUN_IDS)
            self._calls = 0
            self._shape = tuple(hidden_states.shape)
            self._labels = class_labels
            self._cfg = is_cfg_batch(class_labels, rows)
        step = self._calls
        self._calls += 1
        self._t_prev = t
        return StepContext(step=step, t=t, num_steps=self.num_steps or 0, cfg=self._cfg,
                           batch=rows // 2 if self._cfg else rows, run_id=self._run_id, source="calls")


def _same_labels(a, b) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) != torch.is_tensor(b):
        return False
    if not torch.is_tensor(a):
        return a == b
    if a.shape != b.shape or a.device != b.device:
        return False
    return bool(torch.equal(a, b))
