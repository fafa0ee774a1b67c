from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from tclab.sampling import SampleConfig, current_step, make_scheduler, sample


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_matches_diffusers_dit_pipeline(latent_dit, scheduler, guidance, device):
    """With nothing attached, tclab's loop reproduces DiTPipeline exactly (same seed, scheduler, CFG), on
    the CPU and, where there is one, on a CUDA device (both draw the noise from a generator on it)."""
    latent_dit.to(device)
    labels = [3, 7, 1]
    pipe = latent_dit.pipeline(make_scheduler(scheduler, latent_dit.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=6,
               generator=torch.Generator(device).manual_seed(5), output_type="np").images  # (N, H, W, 3) in [0, 1]
    ours = sample(latent_dit, labels, SampleConfig(num_steps=6, scheduler=scheduler, guidance_scale=guidance,
                                                   seed=5), progress=False)
    ours01 = (ours.images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # the pipeline's own mapping
    assert ours01.shape == ref.shape
    np.testing.assert_array_equal(ours01, ref)


class _GaussianOracle:
    """The exact noise prediction when every pixel of the data is N(mu, s^2): E[eps | x_t] =
    sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = alpha_bar(t), with t's sigma interpolated as
    diffusers' Euler does (so fractional timesteps are exact too)."""

    def __init__(self, scheduler_config, mu, s):
        ac = make_scheduler("ddim", scheduler_config).alphas_cumprod.double()
        self.sigmas, self.mu, self.s = ((1 - ac) / ac).sqrt().numpy(), mu, s

    def sigma(self, t) -> float:
        return float(np.interp(float(t), np.arange(len(self.sigmas)), self.sigmas))

    def __call__(self, x, timestep=None, class_labels=None, **_):
        a = torch.tensor([1 / (1 + self.sigma(t) ** 2) for t in timestep], dtype=torch.float64)[:, None, None, None]
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)
        return SimpleNamespace(sample=eps.to(x.dtype))


@pytest.mark.parametrize("scheduler,tolerance", [("ddim", 0.03), ("dpm++", 0.01), ("euler", 0.03)])
def test_samplers_solve_the_probability_flow_of_gaussian_data(pixel_dit, monkeypatch, scheduler, tolerance):
    """With the exact noise prediction for Gaussian data, the probability-flow ODE has a closed form:
    in sigma space x(0) = mu + (x_start - mu) s / sqrt(s^2 + sigma_start^2). Each sampler must land on it
    and get closer with more steps. This checks what parity with DiTPipeline cannot: DiTPipeline skips
    ``init_noise_sigma`` and steps from the scaled input, so its Euler output is wrong; one that did
    the same would collapse every pixel towards mu (mean error ~0.24 here)."""
    mu, s = 0.2, 0.3
    oracle = _GaussianOracle(pixel_dit.scheduler_config, mu, s)
    monkeypatch.setattr(pixel_dit.transformer, "forward", oracle)
    labels = [0, 1, 2, 0]
    z = randn_tensor((4, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    errors = {}
    for steps in (10, 50):
        res = sample(pixel_dit, labels, SampleConfig(num_steps=steps, scheduler=scheduler, guidance_scale=4.0,
                                                     seed=3), progress=False)
        sched = make_scheduler(scheduler, pixel_dit.scheduler_config)
        sched.set_timesteps(steps)
        sigma0 = oracle.sigma(sched.timesteps[0])
        x_start = z * float(sched.init_noise_sigma)
        if scheduler != "euler":  # DDIM and DPM++ carry x_t = sqrt(a) x; Euler carries x itself
            x_start = x_start * (1 + sigma0 ** 2) ** 0.5
        expected = (mu + (x_start - mu) * s / (s ** 2 + sigma0 ** 2) ** 0.5).clamp(-1, 1)
        errors[steps] = float((res.images.double() - expected).abs().mean())
    assert errors[50] < tolerance, errors
    assert errors[50] < errors[10] / 3, errors


def test_step_context_seen_by_transformer(pixel_dit):
    seen = []
    pixel_dit.transformer.register_forward_pre_hook(lambda m, a: seen.append(current_step()))
    res = sample(pixel_dit, [0, 1], SampleConfig(num_steps=4, guidance_scale=2.0), progress=False)
    assert [c.step for c in seen] == [0, 1, 2, 3]
    assert [c.t for c in seen] == res.timesteps and res.timesteps[0] > res.timesteps[-1]
    assert all(c.cfg and c.batch == 2 and c.num_steps == 4 for c in seen)
    assert len({c.run_id for c in seen}) == 1
    assert current_step() is None


def test_batching_does_not_change_samples(pixel_dit):
    a = sample(pixel_dit, [0, 1, 2, 0, 1], SampleConfig(num_steps=3, batch_size=5), progress=False)
    b = sample(pixel_dit, [0, 1, 2, 0, 1], SampleConfig(num_steps=3, batch_size=2), progress=False)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)


def test_sdedit_runs_the_tail_of_the_trajectory(pixel_dit):
    images = torch.zeros(2, 3, 8, 8)
    res = sample(pixel_dit, [0, 1], SampleConfig(num_steps=10, sdedit_strength=0.3), init_images=images,
                 progress=False)
    assert len(res.timesteps) == 3 and res.timesteps[0] < 999 * 0.35


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_schedulers_run(pixel_dit, scheduler):
    res = sample(pixel_dit, [2], SampleConfig(num_steps=3, scheduler=scheduler), progress=False)
    assert torch.isfinite(res.images).all() and res.images.shape == (1, 3, 8, 8)


def test_bad_labels_and_config_are_refused(pixel_dit):
    with pytest.raises(ValueError, match="out of range"):
        sample(pixel_dit, [5], SampleConfig(num_steps=2), progress=False)
    with pytest.raises(ValueError, match="unknown scheduler"):
        SampleConfig(scheduler="heun")
