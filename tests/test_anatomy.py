"""tclab.anatomy against diffusers' own code, on small random DiTs.

Exact (``torch.equal``) where anatomy runs diffusers' ops in diffusers' order: the modulation chunks, the
block on all tokens, the output head and the whole forward. At float32 round-off (``assert_close``,
``ATOL``) where the op order differs: the packed block (``block_packed`` / ``compute_block_tokens``) runs
its projections on (T, C) packed rows instead of (B, N, C), so matrix products are blocked differently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel

from tclab import anatomy
from tclab.anatomy import (
    block_forward,
    block_packed,
    compute_block_tokens,
    dit_forward,
    embed_tokens,
    gather_tokens,
    modulation,
    output_head,
    plan_from_counts,
    token_grid,
)

ATOL = 2e-5  # float32 round-off of a re-ordered block computation on these tiny widths
NUM_CLASSES = 10


def small_dit(sample_size=8, patch_size=2, out_channels=8, layers=2, seed=0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_layers=layers, sample_size=sample_size, patch_size=patch_size, in_channels=4,
                               out_channels=out_channels, num_attention_heads=2, attention_head_dim=8,
                               num_embeds_ada_norm=NUM_CLASSES).eval()
    with torch.no_grad():  # adaLN-Zero starts every block and the head at zero: randomise, or nothing is tested
        g = torch.Generator().manual_seed(seed + 100)
        for p in tr.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # outputs of order 1-10
    return tr


# Learned sigma (C_out = 2 C_in) on a 4x4 grid, and learned sigma off (C_out = C_in) on a 3x3 grid of 4x4
# patches (N = 9: a grid that is no power of two, and a patch size other than 2).
DITS = {"sigma-4x4": dict(), "no-sigma-3x3": dict(sample_size=12, patch_size=4, out_channels=4, layers=3, seed=1)}


@pytest.fixture(params=list(DITS))
def dit(request) -> DiTTransformer2DModel:
    return small_dit(**DITS[request.param])


def model_inputs(tr, rows=4, seed=0, cfg=False):
    """Latents (B, C_in, H*p, W*p), timesteps (B,), labels (B,). ``cfg``: a CFG batch, rows [y; null]
    with one timestep per pair, as the sampler builds it."""
    g = torch.Generator().manual_seed(seed)
    s = tr.config.sample_size
    x = torch.randn(rows, tr.config.in_channels, s, s, generator=g)
    if cfg:
        half = rows // 2
        t = torch.randint(0, 1000, (half,), generator=g).repeat(2)
        y = torch.cat([torch.randint(0, NUM_CLASSES, (half,), generator=g), torch.full((half,), NUM_CLASSES)])
        x = torch.cat([x[:half], x[:half]])
    else:
        t = torch.randint(0, 1000, (rows,), generator=g)
        y = torch.randint(0, NUM_CLASSES, (rows,), generator=g)
    return x, t, y


def block_inputs(tr, rows=4, seed=0, cfg=False):
    """A random block input (B, N, C) with timesteps and labels."""
    x, t, y = model_inputs(tr, rows, seed, cfg)
    H, W = token_grid(tr)
    tokens = torch.randn(rows, H * W, tr.transformer_blocks[0].dim, generator=torch.Generator().manual_seed(seed + 1))
    if cfg:
        tokens = torch.cat([tokens[: rows // 2]] * 2)
    return tokens, t, y


# ---- 1. the token grid -----------------------------------------------------------------------------

def test_token_grid_and_embedding(dit):
    x, _, _ = model_inputs(dit)
    H, W = token_grid(dit)
    p = anatomy.patch_size(dit)
    assert (H * p, W * p) == tuple(x.shape[-2:]) and token_grid(dit, x) == (H, W)
    assert token_grid(dit, torch.zeros(1, 4, 2 * p, 5 * p)) == (2, 5)
    tokens = embed_tokens(dit, x)
    assert tokens.shape == (4, H * W, dit.transformer_blocks[0].dim)


# ---- 2. adaLN-Zero -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [False, True])
def test_modulation_equals_ada_layer_norm_zero(dit, cfg):
    """The six chunks, and AdaLayerNormZero's own outputs (normed, modulated input and the other four)."""
    x, t, y = block_inputs(dit, cfg=cfg)
    for blk in dit.transformer_blocks:
        with torch.no_grad():
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(blk, t, y, x.dtype)
            ref_h, ref_gate_msa, ref_shift_mlp, ref_scale_mlp, ref_gate_mlp = blk.norm1(x, t, y, hidden_dtype=x.dtype)
            emb = blk.norm1.linear(blk.norm1.silu(blk.norm1.emb(t, y, hidden_dtype=x.dtype)))
        assert all(c.shape == (x.shape[0], x.shape[-1]) for c in (shift_msa, scale_msa, gate_mlp))
        for mine, ref in zip((gate_msa, shift_mlp, scale_mlp, gate_mlp),
                             (ref_gate_msa, ref_shift_mlp, ref_scale_mlp, ref_gate_mlp)):
            assert torch.equal(mine, ref)
        assert torch.equal(torch.cat([shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp], 1), emb)
        assert torch.equal(anatomy.modulate(blk.norm1.norm(x), shift_msa[:, None], scale_msa[:, None]), ref_h)
    if cfg:  # the two halves of a CFG batch get different modulation (different labels)
        assert not torch.equal(shift_msa[:2], shift_msa[2:])


# ---- 3. the block ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [False, True])
def test_block_forward_equals_basic_transformer_block(dit, cfg):
    x, t, y = block_inputs(dit, cfg=cfg)
    with torch.no_grad():
        for blk in dit.transformer_blocks:
            ref = blk(x, timestep=t, class_labels=y)
            out = block_forward(blk, x, t, y)
            assert torch.equal(out, ref)  # exact: diffusers' ops in diffusers' order
            x = ref


def test_block_forward_with_feed_forward_chunking(dit):
    x, t, y = block_inputs(dit)
    blk = dit.transformer_blocks[0]
    blk.set_chunk_feed_forward(x.shape[1], dim=1)  # diffusers' enable_forward_chunking: one chunk
    try:
        with torch.no_grad():
            assert torch.equal(block_forward(blk, x, t, y), blk(x, timestep=t, class_labels=y))
    finally:
        blk.set_chunk_feed_forward(None, 0)


@pytest.mark.parametrize("kv", ["all", "kept"])
@pytest.mark.parametrize("cfg", [False, True])
def test_compute_block_tokens_on_all_tokens_equals_the_block(dit, kv, cfg):
    """Keep-all: every token computed, in any order, equals the block (round-off: packed op order)."""
    x, t, y = block_inputs(dit, cfg=cfg)
    B, N, _ = x.shape
    with torch.no_grad():
        for blk in dit.transformer_blocks:
            ref = blk(x, timestep=t, class_labels=y)
            idx = torch.arange(N).expand(B, -1)
            torch.testing.assert_close(compute_block_tokens(blk, x, idx, t, y, kv=kv), ref, rtol=0, atol=ATOL)
            perm = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(i)) for i in range(B)])
            torch.testing.assert_close(compute_block_tokens(blk, x, perm, t, y, kv=kv), gather_tokens(ref, perm),
                                       rtol=0, atol=ATOL)


@pytest.mark.parametrize("cfg", [False, True])
def test_packed_subset_equals_the_blocks_rows(dit, cfg):
    """Rows keeping different numbers of tokens (padded attention), kv='all': the packed outputs are the
    full block's outputs at those (row, token) pairs, and the packed inputs are the inputs there.
    kv='kept': each row computed as if its kept tokens were the whole sequence."""
    x, t, y = block_inputs(dit, cfg=cfg)
    B, N, C = x.shape
    g = torch.Generator().manual_seed(7)
    counts = [N // 2, 1, N - 1, N // 3][:B]
    keep = torch.zeros(B, N, dtype=torch.bool)
    for b, c in enumerate(counts):
        keep[b, torch.randperm(N, generator=g)[:c]] = True
    cnt = keep.sum(1)
    with torch.no_grad():
        for blk in dit.transformer_blocks:
            ref = blk(x, timestep=t, class_labels=y)  # (B, N, C)
            plan = plan_from_counts(keep, keep.nonzero(), cnt, cnt.tolist(), "all")
            assert plan.T == sum(counts) and plan.K == max(counts) and plan.pad_flat is not None
            out_k, x_k = block_packed(blk, x, plan, t, y, kv="all")  # (T, C) each
            torch.testing.assert_close(out_k, ref[keep], rtol=0, atol=ATOL)
            assert torch.equal(x_k, x[keep])
            plan = plan_from_counts(keep, keep.nonzero(), cnt, cnt.tolist(), "kept")
            out_k, _ = block_packed(blk, x, plan, t, y, kv="kept")
            alone = torch.cat([blk(x[b:b + 1, keep[b]], timestep=t[b:b + 1], class_labels=y[b:b + 1])[0]
                               for b in range(B)])  # (T, C) rows ascending, tokens ascending
            torch.testing.assert_close(out_k, alone, rtol=0, atol=ATOL)


def test_a_row_keeping_nothing(dit):
    """A row with no kept token contributes nothing and disturbs no other row (kv='kept' attends to
    its padding, which must not give NaN)."""
    x, t, y = block_inputs(dit, rows=2)
    N = x.shape[1]
    keep = torch.zeros(2, N, dtype=torch.bool)
    keep[1, ::2] = True
    cnt = keep.sum(1)
    with torch.no_grad():
        blk = dit.transformer_blocks[0]
        for kv in ("all", "kept"):
            plan = plan_from_counts(keep, keep.nonzero(), cnt, cnt.tolist(), kv)
            out_k, _ = block_packed(blk, x, plan, t, y, kv=kv)
            assert out_k.shape == (int(cnt.sum()), x.shape[-1]) and torch.isfinite(out_k).all()
            src = x[1:] if kv == "all" else x[1:, keep[1]]
            ref = blk(src, timestep=t[1:], class_labels=y[1:])[0]
            torch.testing.assert_close(out_k, ref[keep[1]] if kv == "all" else ref, rtol=0, atol=ATOL)


# ---- 4. received attention --------------------------------------------------------------------------

def test_attention_received_is_the_column_mean_of_the_attention_map(dit, monkeypatch):
    x, t, y = block_inputs(dit)
    B, N, C = x.shape
    blk = dit.transformer_blocks[0]
    with torch.no_grad():
        recv = anatomy.attention_received(blk, x, t, y)  # (B, N)
        h, *_ = blk.norm1(x, t, y, hidden_dtype=x.dtype)
        heads, d = blk.attn1.heads, C // blk.attn1.heads
        q = blk.attn1.to_q(h).view(B, N, heads, d).transpose(1, 2)
        k = blk.attn1.to_k(h).view(B, N, heads, d).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1).mean(dim=(1, 2))  # (B, N)
        monkeypatch.setattr(anatomy, "ATTENTION_CHUNK", 2)  # the chunked path gives the same map
        chunked = anatomy.attention_received(blk, x, t, y)
    assert recv.shape == (B, N)
    torch.testing.assert_close(recv, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(recv.sum(-1), torch.ones(B), rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, recv, rtol=0, atol=1e-6)


# ---- 5. and 6. the output head and the whole model ----------------------------------------------------

@pytest.mark.parametrize("cfg", [False, True])
def test_dit_forward_equals_the_model(dit, cfg):
    x, t, y = model_inputs(dit, cfg=cfg)
    with torch.no_grad():
        ref = dit(x, timestep=t, class_labels=y).sample
        out = dit_forward(dit, x, t, y)
        tokens = embed_tokens(dit, x)
        for blk in dit.transformer_blocks:
            tokens = blk(tokens, timestep=t, class_labels=y)
        head = output_head(dit, tokens, t, y)
    s = dit.config.sample_size
    assert out.shape == ref.shape == (x.shape[0], dit.out_channels, s, s)
    assert torch.equal(out, ref)  # exact: the same ops in the same order
    assert torch.equal(head, ref)
    if cfg:
        assert not torch.equal(out[:2], out[2:])  # same latents, different labels


def test_unpatchify_places_each_patch(dit):
    """Token i = (row i // W, column i % W); its p*p*C_out values are the patch's (p, p, C_out) pixels."""
    H, W = token_grid(dit)
    p, c = anatomy.patch_size(dit), dit.out_channels
    x = torch.randn(2, H * W, p * p * c)
    img = anatomy.unpatchify(x, p, c)
    for i in (0, W + 1, H * W - 1):
        r, col = divmod(i, W)
        patch = img[:, :, r * p:(r + 1) * p, col * p:(col + 1) * p]  # (2, C_out, p, p)
        assert torch.equal(patch, x[:, i].view(2, p, p, c).permute(0, 3, 1, 2))


# ---- the module is a leaf ------------------------------------------------------------------------------

def test_anatomy_imports_nothing_from_tclab():
    tree = ast.parse(Path(anatomy.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative and imported <= {"__future__", "math", "dataclasses", "torch", "diffusers"}, imported
