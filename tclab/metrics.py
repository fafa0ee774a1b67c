"""Measurements as pure functions: compute cost (FLOPs, wall-clock) and image quality.

Cost follows the spec (tokencache.md section 5): FLOPs are counted on what actually ran, with
``torch.utils.flop_counter.FlopCounterMode`` as a scoped context (never estimated from shapes), and
wall-clock is a median over repeated runs with the baseline re-run in the same process, interleaved.

FLOP convention: torch counts a multiply-add as 2 FLOPs. The DiT paper's "Gflops" are
multiply-accumulates (fvcore), so ``GMACs = FLOPs / 2`` is the number to compare with its table.
Counted: matrix products (linear layers, the patch-embedding convolution, attention's two batched
matmuls). Not counted, as in fvcore: norms, softmax, activations, elementwise adds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU flash kernel SDPA picks here;
    # the FLOPs are those of the two matmuls (Q K^T and P V), as for the other kernels.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}


# The DiT paper's Table 4 ("Gflops", counted as multiply-accumulates) per forward of one image.
PAPER_GMACS = {("DiT-S/2", 256): 6.06, ("DiT-B/2", 256): 23.01, ("DiT-L/2", 256): 80.71, ("DiT-XL/2", 256): 118.64,
               ("DiT-XL/2", 512): 524.60}


@dataclass
class FlopCount:
    """FLOPs of what ran, total and per top-level operator."""

    flops: int
    by_op: dict[str, int]

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


class count_flops:
    """Context manager counting the FLOPs of everything run inside it.

    >>> with count_flops() as fc:
    ...     model(x)
    >>> fc.result.gmacs
    """

    def __enter__(self) -> "count_flops":
        self._mode = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
        self._mode.__enter__()
        self.result: FlopCount | None = None
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        counts = self._mode.get_flop_counts().get("Global", {})
        self.result = FlopCount(flops=int(self._mode.get_total_flops()),
                                by_op={str(k).replace("aten.", ""): int(v) for k, v in counts.items()})


@torch.no_grad()
def transformer_forward_flops(transformer, batch: int = 1) -> FlopCount:
    """FLOPs of one forward of a DiT transformer on ``batch`` random latents (one timestep, class 0)."""
    cfg = transformer.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=transformer.dtype,
                    device=transformer.device)
    t = torch.full((batch,), 500, dtype=torch.long, device=transformer.device)
    y = torch.zeros(batch, dtype=torch.long, device=transformer.device)
    with count_flops() as fc:
        transformer(x, timestep=t, class_labels=y)
    return fc.result


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Wall-clock of several callables, run interleaved (a, b, a, b, ...) after ``warmup`` rounds.

    Interleaving puts every variant under the same machine conditions (thermal state, other load),
    so ratios between them are meaningful even on a busy machine. Report the median.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing(name, []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].seconds.append(time.perf_counter() - t0)
    return out
