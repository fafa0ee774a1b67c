"""Exact tests for tclab.cache.select: hand-worked masks, budget, per-sample independence, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tclab.cache.select import METHODS, kept_fraction, select_tokens, token_budget

# One sample, L = 3 blocks, N = 4 tokens. Block means: 0.45, 0.575, 0.35 -> block order 1, 0, 2.
TABLE = torch.tensor([[
    [0.90, 0.10, 0.50, 0.30],   # block 0
    [0.20, 0.80, 0.70, 0.60],   # block 1
    [0.40, 0.05, 0.95, 0.00],   # block 2
]])  # (1, 3, 4)


def as_mask(rows) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.bool)  # (1, L, N)


# ---- hand-worked masks on TABLE -----------------------------------------------------------------

@pytest.mark.parametrize("method, rho, kwargs, expected", [
    # rho 0.5 -> budget 6
    ("uniform", 0.5, {}, [[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 1, 0]]),     # top 2 of each block
    ("adaptive", 0.5, {}, [[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]),    # block 1 full, block 0 top 2
    ("global", 0.5, {}, [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]]),      # .95 .9 .8 .7 .6 .5
    # rho 0.4 -> budget round(4.8) = 5: uniform gives 2, 2, 1 (remainder to the lowest blocks)
    ("uniform", 0.4, {}, [[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]]),
    ("adaptive", 0.4, {}, [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]),
    ("global", 0.4, {}, [[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0]]),
    # rho 0.25 -> budget 3
    ("uniform", 0.25, {}, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
    ("adaptive", 0.25, {}, [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]]),   # only a partial block 1
    ("global", 0.25, {}, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
    # rho 0.75 -> budget 9: adaptive = blocks 1 and 0 full, block 2 its top 1
    ("adaptive", 0.75, {}, [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]]),
    ("uniform", 0.75, {}, [[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]]),
    ("global", 0.75, {}, [[1, 0, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0]]),
    # forced first block (4 pairs) + 2 left for blocks 1, 2
    ("uniform", 0.5, {"full_first": 1}, [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0]]),
    ("adaptive", 0.5, {"full_first": 1}, [[1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]]),
    ("global", 0.5, {"full_first": 1}, [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0]]),
    # forced last block + 2 left for blocks 0, 1
    ("uniform", 0.5, {"full_last": 1}, [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]),
    ("adaptive", 0.5, {"full_last": 1}, [[0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]]),
    ("global", 0.5, {"full_last": 1}, [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]),
])
def test_hand_worked_masks(method, rho, kwargs, expected):
    mask = select_tokens(TABLE, rho, method, **kwargs)
    assert mask.dtype == torch.bool and mask.shape == (1, 3, 4)
    assert torch.equal(mask, as_mask(expected))


@pytest.mark.parametrize("method", METHODS)
def test_forced_blocks_beyond_budget_leave_nothing_for_the_rest(method):
    # forced 8 pairs > budget 6: block 1 computes nothing, the step computes more than rho
    mask = select_tokens(TABLE, 0.5, method, full_first=1, full_last=1)
    assert torch.equal(mask, as_mask([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]))


@pytest.mark.parametrize("method", METHODS)
def test_rho_extremes_and_forced_blocks(method):
    scores = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(0))
    assert select_tokens(scores, 1.0, method).all()
    assert not select_tokens(scores, 0.0, method).any()
    only_last = select_tokens(scores, 0.0, method, full_last=1)
    assert only_last[:, -1].all() and not only_last[:, :-1].any()
    # overlapping forced ranges are a union; full_first = L forces everything
    assert select_tokens(scores, 0.0, method, full_first=3, full_last=3).all()
    assert select_tokens(scores, 0.0, method, full_first=4).all()


def test_default_method_is_global():
    assert torch.equal(select_tokens(TABLE, 0.5), select_tokens(TABLE, 0.5, "global"))


# ---- budget -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho, L, N, expected", [
    (0.5, 3, 4, 6), (0.4, 3, 4, 5), (0.25, 2, 5, 3),   # 2.5 rounds half up to 3
    (0.15, 2, 5, 2),                                    # 0.15 * 10 = 1.4999999999999998 -> still 2
    (0.0, 28, 256, 0), (1.0, 28, 256, 7168), (0.3, 28, 256, 2150),
])
def test_token_budget(rho, L, N, expected):
    assert token_budget(rho, L, N) == expected


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "many-ties"])
def test_budget_is_exact_per_sample(method, discrete):
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        B, L, N = (int(torch.randint(1, 7, (1,), generator=gen)) for _ in range(3))
        scores = torch.rand(B, L, N, generator=gen)
        if discrete:
            scores = (scores * 3).floor() / 2  # values {0, .5, 1}: lots of ties
        rho = float(torch.rand(1, generator=gen))
        first, last = int(torch.randint(0, L + 1, (1,), generator=gen)) // 2, int(L > 2)
        mask = select_tokens(scores, rho, method, full_first=first, full_last=last)
        n_forced = len(set(range(first)) | set(range(L - last, L)))
        expected = max(token_budget(rho, L, N), n_forced * N)
        assert mask.sum(dim=(1, 2)).tolist() == [expected] * B, (method, B, L, N, rho, first, last)


def test_method_structure_on_random_scores():
    scores = torch.rand(4, 6, 10, generator=torch.Generator().manual_seed(2))  # (B, L, N)
    rho = 0.37  # budget 22
    uni = select_tokens(scores, rho, "uniform")
    per_block = uni.sum(-1)  # (B, L)
    assert per_block.tolist() == [[4, 4, 4, 4, 3, 3]] * 4  # 22 = 6 * 3 + 4, same for every sample
    ada = select_tokens(scores, rho, "adaptive")
    counts = ada.sum(-1)  # (B, L)
    for b in range(4):
        assert sorted(counts[b].tolist()) == [0, 0, 0, 2, 10, 10]  # two full blocks + one partial
        means = scores[b].mean(-1)
        full_blocks = set((counts[b] == 10).nonzero().squeeze(1).tolist())
        assert full_blocks == set(means.topk(2).indices.tolist())
    glo = select_tokens(scores, rho, "global")
    for b in range(4):  # every kept score beats every dropped one
        assert scores[b][glo[b]].min() > scores[b][~glo[b]].max()


# ---- per-sample independence --------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("forced", [{}, {"full_first": 1, "full_last": 1}])
def test_each_sample_depends_only_on_its_own_scores(method, forced):
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 5, 8, generator=gen)
    base = select_tokens(scores, 0.4, method, **forced)
    for trial in range(10):
        other = scores.clone()
        other[1] = torch.rand(5, 8, generator=gen) ** (trial + 1)  # reshape sample 1's distribution
        changed = select_tokens(other, 0.4, method, **forced)
        assert torch.equal(changed[0], base[0]) and torch.equal(changed[2], base[2])
    # and the batch equals the samples run one at a time
    alone = torch.cat([select_tokens(scores[b:b + 1], 0.4, method, **forced) for b in range(3)])
    assert torch.equal(alone, base)


def test_samples_get_different_masks_from_different_scores():
    scores = torch.stack([TABLE[0], TABLE[0].flip(0)])  # sample 1: blocks in reverse order
    mask = select_tokens(scores, 0.5, "adaptive")
    assert mask[0, 1].all() and mask[1, 1].all()  # block 1 is the most important in both
    assert mask[0, 0].sum() == 2 and mask[0, 2].sum() == 0
    assert mask[1, 2].sum() == 2 and mask[1, 0].sum() == 0  # old block 0 now sits at index 2


# ---- tie-breaking -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, expected", [
    ("global", [[1, 1, 1], [0, 0, 0]]),     # lower block first, then lower token
    ("adaptive", [[1, 1, 1], [0, 0, 0]]),   # equal means: lower block ranks first
    ("uniform", [[1, 1, 0], [1, 0, 0]]),    # 3 = 2 + 1, remainder to block 0; lower tokens first
])
def test_all_equal_scores_break_ties_by_index(method, expected):
    scores = torch.full((1, 2, 3), 0.5)
    assert torch.equal(select_tokens(scores, 0.5, method), as_mask(expected))


def test_global_ties_prefer_higher_score_then_block_then_token():
    scores = torch.tensor([[[0.2, 0.6, 0.6], [0.6, 0.1, 0.6]]])  # four 0.6s, budget 3
    assert torch.equal(select_tokens(scores, 0.5, "global"), as_mask([[0, 1, 1], [1, 0, 0]]))
    scores = torch.tensor([[[0.2, 0.6, 0.6], [0.6, 0.9, 0.6]]])  # the 0.9 goes first, then two 0.6s
    assert torch.equal(select_tokens(scores, 0.5, "global"), as_mask([[0, 1, 1], [0, 1, 0]]))


def test_within_block_ties_prefer_lower_token():
    scores = torch.tensor([[[0.5, 0.7, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]])  # budget 2 per block (rho .5)
    assert torch.equal(select_tokens(scores, 0.5, "uniform"), as_mask([[1, 1, 0, 0], [1, 1, 0, 0]]))
    assert torch.equal(select_tokens(scores, 0.375, "adaptive"), as_mask([[1, 1, 1, 0], [0, 0, 0, 0]]))


def reference_mask(scores: torch.Tensor, rho: float, method: str, full_first: int = 0, full_last: int = 0):
    """The documented rules as plain Python loops and sorted() keys, one sample at a time."""
    B, L, N = scores.shape
    forced = set(range(full_first)) | set(range(L - full_last, L))
    free = [l for l in range(L) if l not in forced]
    remaining = max(0, token_budget(rho, L, N) - len(forced) * N)
    out = torch.zeros(B, L, N, dtype=torch.bool)
    for b in range(B):
        w = scores[b].tolist()
        for l in forced:
            out[b, l] = True
        if method == "global":
            pairs = sorted(((l, i) for l in free for i in range(N)), key=lambda p: (-w[p[0]][p[1]], p[0], p[1]))
            for l, i in pairs[:remaining]:
                out[b, l, i] = True
            continue
        if method == "uniform":
            counts = {l: remaining // len(free) + (j < remaining % len(free)) for j, l in enumerate(free)}
        else:  # adaptive
            by_mean = sorted(free, key=lambda l: (-float(scores[b, l].float().mean()), l))
            counts = {l: min(N, max(0, remaining - j * N)) for j, l in enumerate(by_mean)}
        for l, k in counts.items():
            for i in sorted(range(N), key=lambda i: (-w[l][i], i))[:k]:
                out[b, l, i] = True
    return out


@pytest.mark.parametrize("method", METHODS)
def test_matches_plain_python_reference_with_many_ties(method):
    # 40 tokens x 4 blocks of values in {0, .5, 1}: large enough that an unstable sort reorders ties
    gen = torch.Generator().manual_seed(4)
    for rho, first, last in [(0.3, 0, 0), (0.55, 1, 0), (0.8, 0, 1), (0.45, 1, 1)]:
        scores = (torch.rand(2, 4, 40, generator=gen) * 3).floor() / 2  # (B, L, N)
        expected = reference_mask(scores, rho, method, first, last)
        assert torch.equal(select_tokens(scores, rho, method, first, last), expected), (rho, first, last)


# ---- dtype / device / kept_fraction ---------------------------------------------------------------

def test_low_precision_scores_and_output_type():
    mask = select_tokens(TABLE.to(torch.bfloat16), 0.5, "global")
    assert mask.dtype == torch.bool and mask.device == TABLE.device
    assert mask.sum().item() == 6


def test_kept_fraction():
    assert kept_fraction(select_tokens(TABLE, 0.4, "global")) == pytest.approx(5 / 12)
    assert kept_fraction(np.array([True, False, False, False])) == 0.25
    with pytest.raises(TypeError, match="bool"):
        kept_fraction(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        kept_fraction(torch.zeros(0, dtype=torch.bool))


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, kwargs, error, pattern", [
    (TABLE[0], {}, ValueError, r"shape \(batch, blocks, tokens\), got \(3, 4\).*scores\[None\]"),
    (TABLE.numpy(), {}, ValueError, r"tensor of shape"),
    ((TABLE * 10).long(), {}, TypeError, r"floating point"),
    (TABLE * 2, {}, ValueError, r"\[0, 1\] with no NaN; found 5 values outside.*sigmoid"),
    (TABLE - 0.5, {}, ValueError, r"\[0, 1\] with no NaN"),
    (TABLE.masked_fill(TABLE > 0.85, float("nan")), {}, ValueError, r"found 2 values outside"),
    (torch.zeros(1, 0, 4), {}, ValueError, r"at least one"),
    (TABLE, {"rho": 1.5}, ValueError, r"rho must be a number in \[0, 1\].*1\.5"),
    (TABLE, {"rho": -0.1}, ValueError, r"rho must be"),
    (TABLE, {"rho": float("nan")}, ValueError, r"rho must be"),
    (TABLE, {"method": "topk"}, ValueError, r"unknown selection method 'topk'.*uniform.*adaptive.*global"),
    (TABLE, {"full_first": -1}, ValueError, r"full_first must be an integer in \[0, 3\]"),
    (TABLE, {"full_last": 4}, ValueError, r"full_last must be an integer in \[0, 3\]"),
    (TABLE, {"full_last": 1.0}, ValueError, r"full_last must be an integer"),
])
def test_validation_errors(scores, kwargs, error, pattern):
    kwargs = {"rho": 0.5, **kwargs}
    with pytest.raises(error, match=pattern):
        select_tokens(scores, **kwargs)
