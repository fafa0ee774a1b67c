"""FLOPs counted on what runs, checked against the DiT paper's table."""

import pytest
import torch

from tclab.metrics import PAPER_GMACS, count_flops, time_interleaved, transformer_forward_flops
from tclab.models import load_dit


@pytest.mark.parametrize("preset", ["DiT-S/2", "DiT-B/2"])
def test_presets_match_dit_paper_within_one_percent(preset):
    g = transformer_forward_flops(load_dit(preset).transformer).gmacs
    assert abs(g / PAPER_GMACS[(preset, 256)] - 1) < 0.01


def test_attention_is_counted():
    fc = transformer_forward_flops(load_dit("DiT-S/2").transformer)
    attn = sum(v for k, v in fc.by_op.items() if "attention" in k)
    # two matmuls of (N x N x C) per block: 2 * 256^2 * 384 MACs * 12 blocks
    assert attn / 2 == 2 * 256**2 * 384 * 12


def test_count_flops_of_a_linear_by_hand():
    lin = torch.nn.Linear(10, 20, bias=False)
    with count_flops() as fc:
        lin(torch.randn(3, 10))
    assert fc.result.flops == 2 * 3 * 10 * 20


def test_time_interleaved_runs_each_variant():
    calls = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(t["a"].seconds) == 3 and t["b"].median >= 0


# ---- paired quality --------------------------------------------------------------------------

from tclab.metrics import mse, paired_quality, psnr, ssim  # noqa: E402


def test_psnr_of_a_known_shift():
    a = torch.zeros(2, 3, 16, 16)  # 0.5 on the [0, 1] scale
    b = a + 0.2  # +0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    torch.testing.assert_close(mse(a, b), torch.full((2,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0, dtype=torch.float64))
    assert psnr(a, a).tolist() == [100.0, 100.0]


def test_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    noisy = (a + 0.5 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    small = ssim(a, (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(-1, 1))
    big = ssim(a, noisy)
    assert (big < small).all() and (small < 1).all()
    torch.testing.assert_close(ssim(a, noisy), ssim(noisy, a))  # symmetric


def test_ssim_of_a_constant_offset_by_hand():
    # Flat images: variances are 0, so SSIM = (2 mx my + c1) / (mx^2 + my^2 + c1).
    a, b = torch.full((1, 3, 16, 16), 0.0), torch.full((1, 3, 16, 16), 0.2)  # 0.5 and 0.6 on [0, 1]
    c1 = 0.01**2
    expect = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert abs(float(ssim(a, b)) - expect) < 1e-9


def test_paired_quality_refuses_shape_mismatch():
    import pytest

    with pytest.raises(ValueError, match="equal shapes"):
        paired_quality(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8))
