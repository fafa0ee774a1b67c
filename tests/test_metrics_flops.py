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
