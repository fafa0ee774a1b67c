"""The denoising loop: class-conditional DiT sampling with classifier-free guidance and SDEdit.

``sample(model, class_labels, SampleConfig(...))`` runs the loop of diffusers' ``DiTPipeline`` step
for step (same noise draw, same CFG layout, same guidance arithmetic, same decode), so with nothing
attached its output equals the pipeline's for the same model, scheduler, seed and guidance
(``tests/test_sampling.py`` checks it on a small latent DiT with a random ``AutoencoderKL``).
Two deliberate differences, both no-ops for DDIM and DPM-Solver++:
- the initial noise is multiplied by ``scheduler.init_noise_sigma`` (DiTPipeline omits this, which
  breaks Euler, whose sigma_max is ~157);
- the scheduler steps the conditional half only (the pipeline steps both identical halves).

**Per-step context.** While the transformer runs, ``current_step()`` returns a ``StepContext``:
the step index ``step`` (0 = first executed, noisiest step), the scheduler's timestep value ``t``,
the number of steps, whether the batch is a CFG batch (``[cond; uncond]`` halves) and a run id
that changes with every ``sample`` call (so stateful hooks know when to reset). Instrumentation
(``tclab.record``) and caching (``tclab.cache``) read it; outside tclab's sampler it is ``None`` and
``tclab.steps.StepTracker`` works the step out from the calls (one rule, in ``tclab.steps``).

CFG batch layout, as in DiTPipeline: rows ``[0, B)`` are conditional (the asked labels), rows
``[B, 2B)`` the same latents with the null label 1000.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

# the schedulers live with the model loading (a model's noise schedule is part of it); re-exported here
from .models import NULL_CLASS, SCHEDULERS, LoadedDiT, make_scheduler  # noqa: F401
# the step context lives in the leaf tclab.steps (every hook reads it); re-exported here
from .steps import StepContext, current_step, next_run_id, running


@dataclass
class SampleConfig:
    """How to sample.

    Args:
        num_steps: denoising steps (of the full trajectory; SDEdit runs the last ``strength`` of them).
        scheduler: ``ddim`` (default, deterministic), ``dpm++`` (DPM-Solver++ 2M) or ``euler``.
        guidance_scale: classifier-free guidance; <= 1 disables CFG (half the compute).
        seed: seeds the initial noise (one generator for the whole call, as DiTPipeline).
        batch_size: samples per forward (the CFG batch is twice this).
        sdedit_strength: with ``init_images``, how far to noise them (0 = keep, 1 = pure noise).
    """

    num_steps: int = 50
    scheduler: str = "ddim"
    guidance_scale: float = 4.0
    seed: int = 0
    batch_size: int = 16
    sdedit_strength: float = 0.6

    def __post_init__(self) -> None:
        for name in ("num_steps", "seed", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
        for name in ("guidance_scale", "sdedit_strength"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}"
                                 + ("; guidance 1 (or below) turns classifier-free guidance off" if name ==
                                    "guidance_scale" else ""))
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.sdedit_strength <= 1.0:
            raise ValueError(f"sdedit_strength must be in (0, 1], got {self.sdedit_strength}")


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (N, C, L, L) final latents
    class_labels: torch.Tensor  # (N,)
    timesteps: list[float]  # t value of each executed step, in order
    seconds: float
    transformer_seconds: float = 0.0
    extras: dict = field(default_factory=dict)


def _check_labels(model: LoadedDiT, labels: torch.Tensor) -> None:
    """Every label is a class id of the model or the null label (an unconditional sample)."""
    bad = labels[((labels < 0) | (labels >= model.num_classes)) & (labels != NULL_CLASS)]
    if len(bad):
        names = [repr(c) for c in model.class_names or []]
        if len(names) > 8:  # an ImageNet id2label would fill the screen: its ends say enough
            names = [*names[:3], "...", *names[-2:]]
        names = f" ({', '.join(names)})" if names else ""
        raise ValueError(f"class label(s) {sorted(set(bad.tolist()))} out of range for {model.name}: "
                         f"valid labels are 0..{model.num_classes - 1}{names}, or {NULL_CLASS} for an "
                         "unconditional sample")


@torch.no_grad()
def sampling_start(model: LoadedDiT, n: int, seed: int, init_images: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(noise, x0)`` of an ``n``-sample call of :func:`sample`: one generator seeded with ``seed`` draws
    the noise of all ``n`` rows at once (as DiTPipeline), then encodes ``init_images`` (SDEdit) with the
    same generator; ``x0`` is None without them. On the model's device."""
    device, dtype = model.transformer.device, model.transformer.dtype
    shape = (n, model.latent_channels, model.latent_size, model.latent_size)
    generator = torch.Generator(device).manual_seed(seed)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    x0 = model.encode(init_images.to(device), generator=generator) if init_images is not None else None
    return noise, x0


def per_sample_noise(model: LoadedDiT, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """The starting noise of samples ``indices`` of a run seeded ``seed``, each from its own CPU generator
    seeded by ``(seed, i)``: sample ``i``'s noise depends on the seed and ``i`` only, not on how many samples
    the run has, how they are batched or which process draws them (``tclab sample --npz``, sharded over
    torchrun ranks). (N, C, L, L) on the model's device."""
    import hashlib

    shape = (model.latent_channels, model.latent_size, model.latent_size)
    rows = []
    for i in indices:
        key = int.from_bytes(hashlib.sha256(f"tclab-noise:{seed}:{int(i)}".encode()).digest()[:8], "little") >> 1
        rows.append(torch.randn(shape, generator=torch.Generator("cpu").manual_seed(key)))
    noise = torch.stack(rows) if rows else torch.zeros((0, *shape))
    return noise.to(model.transformer.device, model.transformer.dtype)


@torch.no_grad()
def sample(
    model: LoadedDiT,
    class_labels: Sequence[int] | torch.Tensor,
    config: SampleConfig = SampleConfig(),
    init_images: torch.Tensor | None = None,
    progress: bool = True,
    on_step: Callable[[StepContext, torch.Tensor], None] | None = None,
    start: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> SampleResult:
    """Sample one image per label (or denoise ``init_images`` with SDEdit). See the module docstring.

    ``on_step(ctx, latents)`` is called after every step with the (conditional) latents.
    ``start``: ``(noise, x0)``, the starting noise of each row and (with ``init_images``) the encoded
    images; default :func:`sampling_start` of this call. A shard of a larger run passes its rows of the
    whole run's start (``tclab.distributed``), so its samples are those of the whole run.
    """
    from .progress import progress_bar

    tr = model.transformer
    device = tr.device
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    _check_labels(model, labels)
    n = len(labels)
    if init_images is not None and len(init_images) != n:
        raise ValueError(f"{len(init_images)} init_images but {n} class labels; give one label per image")
    if start is None:
        start = sampling_start(model, n, config.seed, init_images)
    noise, x0 = start
    if len(noise) != n or (init_images is not None and (x0 is None or len(x0) != n)):
        raise ValueError(f"start: {len(noise)} noise rows for {n} class labels; give one row per label "
                         "(and the encoded init_images with them, as sampling_start returns)")
    noise = noise.to(device)
    x0 = x0.to(device) if init_images is not None else None
    cfg = config.guidance_scale > 1
    outs, all_t, t_model = [], [], 0.0
    start = time.perf_counter()
    chunks = range(0, n, config.batch_size)
    bar = progress_bar(total=len(chunks) * config.num_steps, desc="sampling", disable=not progress, unit="step")
    for lo in chunks:
        hi = min(n, lo + config.batch_size)
        sched = make_scheduler(config.scheduler, model.scheduler_config)
        sched.set_timesteps(config.num_steps)
        timesteps = sched.timesteps
        x = noise[lo:hi] * sched.init_noise_sigma
        if x0 is not None:  # SDEdit: start part-way down the trajectory from the noised image
            k = max(1, round(config.num_steps * config.sdedit_strength))
            timesteps = timesteps[config.num_steps - k:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(config.num_steps - k)
            x = sched.add_noise(x0[lo:hi], noise[lo:hi], timesteps[:1])
        y = labels[lo:hi].to(device)
        y_in = torch.cat([y, torch.full_like(y, NULL_CLASS)]) if cfg else y
        run_id = next_run_id()
        for s, t in enumerate(timesteps):
            ctx = StepContext(step=s, t=float(t), num_steps=len(timesteps), cfg=cfg, batch=hi - lo, run_id=run_id)
            x_in = torch.cat([x, x]) if cfg else x
            x_in = sched.scale_model_input(x_in, t)
            t_in = (t[None] if t.ndim == 0 else t).to(device).expand(x_in.shape[0])
            t1 = time.perf_counter()
            with running(ctx):
                pred = tr(x_in, timestep=t_in, class_labels=y_in).sample
            t_model += time.perf_counter() - t1
            c = model.latent_channels
            if cfg:  # guidance on the noise channels; learned-sigma channels are dropped below
                eps_c, eps_u = pred[: hi - lo, :c], pred[hi - lo:, :c]
                eps = eps_u + config.guidance_scale * (eps_c - eps_u)
            else:
                eps = pred[:, :c]
            x = sched.step(eps, t, x).prev_sample
            if on_step is not None:
                on_step(ctx, x)
            bar.update(1)
        bar.update(config.num_steps - len(timesteps))
        outs.append(x)
        all_t = [float(t) for t in timesteps]
    bar.close()
    latents = torch.cat(outs)
    images = model.decode(latents).clamp(-1, 1)
    return SampleResult(images=images.float().cpu(), latents=latents.cpu(), class_labels=labels,
                        timesteps=all_t, seconds=time.perf_counter() - start, transformer_seconds=t_model)


def save_grid(images: torch.Tensor, path, nrow: int = 8, scale: int = 1, pad: int = 2):
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid; returns the path."""
    import numpy as np
    from PIL import Image

    from .data import images_to_uint8

    a = images_to_uint8(images)  # (N, H, W, 3)
    n, h, w, _ = a.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, min(n, nrow) * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = a[i]
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
    return path
