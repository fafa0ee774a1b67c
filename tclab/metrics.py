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


# ---- paired image quality (against the same-seed full-compute output) ------------------------

def _to01(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> float64 in [0, 1] (metrics are computed in float64)."""
    return ((x.double() + 1) / 2).clamp(0, 1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale: (N,)."""
    return (_to01(a) - _to01(b)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] scale: (N,). Identical images give ``max_db``."""
    m = mse(a, b)
    return torch.where(m > 0, 10 * torch.log10(1.0 / m.clamp_min(1e-300)), torch.full_like(m, max_db)).clamp(max=max_db)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): Gaussian window, per channel, valid region, [0, 1] scale: (N,).

    The window shrinks to the image side for images smaller than ``window`` pixels.
    """
    x, y = _to01(a), _to01(b)
    n, c, h, w = x.shape
    k = min(window, h, w)
    g = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(c, 1, k, k)  # (C, 1, k, k) depthwise

    def blur(z):
        return torch.nn.functional.conv2d(z, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def paired_quality(test: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and MSE of ``test`` images against same-seed ``reference`` images."""
    if test.shape != reference.shape:
        raise ValueError(f"paired metrics need equal shapes, got {tuple(test.shape)} and {tuple(reference.shape)}")
    return {"psnr": float(psnr(test, reference).mean()), "ssim": float(ssim(test, reference).mean()),
            "mse": float(mse(test, reference).mean())}
