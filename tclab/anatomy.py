"""A DiT's computation in one file, top to bottom as in the DiT paper, on diffusers' modules.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023, arXiv 2212.09748), section 3.2,
as diffusers' ``DiTTransformer2DModel`` holds it (blocks: ``BasicTransformerBlock`` with
``norm_type="ada_norm_zero"``). Every function here uses the model's own submodules (no weights of its
own) and reproduces diffusers' arithmetic; ``tests/test_anatomy.py`` checks each piece against
diffusers' code. The sections follow the data:

1. **the token grid**: the latent (B, C_in, H*p, W*p) is cut into p x p patches, each patch a token
   of width C, plus a fixed 2-D sin-cos position embedding: (B, N, C), N = H*W tokens;
2. **adaLN-Zero**: each block regresses six per-row vectors (shift, scale, gate for the attention
   branch and for the MLP branch) from the conditioning c = embed(t) + embed(y);
3. **the block** on all tokens (``block_forward``), and the same block on a gathered subset of tokens,
   packed into one (T, C) tensor (``block_packed``, ``compute_block_tokens``): what TokenCache's cached
   steps run (``shared/docs/tokencache.md`` section 2);
4. **received attention**: how much attention each token receives (ToCa's influence score);
5. **the output head**: final adaLN, linear decoder to p*p*C_out per token, unpatchify;
6. ``dit_forward``: the whole model from the pieces above.

Shapes: B rows (samples; the two halves of a CFG batch are different rows), N = H*W tokens on the
H x W patch grid, C hidden width, p patch size, ``heads`` attention heads of width d = C / heads,
T kept (row, token) pairs of a packed subset, K tokens of the fullest row when padded.

A leaf module: it imports torch and diffusers only, nothing from tclab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward  # diffusers is pinned
from diffusers.models.attention_processor import Attention

__all__ = [
    "patch_size", "token_grid", "embed_tokens", "conditioning", "modulation", "modulate", "self_attention",
    "block_forward", "BlockPlan", "plan_from_counts", "plan_from_indices", "gather_tokens", "to_padded", "from_padded",
    "block_packed", "compute_block_tokens", "ATTENTION_CHUNK", "attention_received", "output_head",
    "unpatchify", "dit_forward",
]


# ---- 1. the token grid ("Patchify") ----------------------------------------------------------------

def patch_size(transformer) -> int:
    """p: each token is a p x p patch of the latent (DiT-XL/2: p = 2)."""
    return transformer.config.patch_size


def token_grid(transformer, hidden_states: torch.Tensor | None = None) -> tuple[int, int]:
    """The (H, W) patch grid, N = H * W tokens: of the model's native sample size, or of the input
    ``hidden_states`` (B, C_in, H*p, W*p) when given (as DiT's forward computes it)."""
    p = patch_size(transformer)
    if hidden_states is not None:
        return hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
    s = transformer.config.sample_size  # DiT's latents are square
    return s // p, s // p


def embed_tokens(transformer, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, C_in, H*p, W*p) -> (B, N, C): a p-strided p x p convolution (one linear map per patch),
    flattened row-major over the grid (token i = row i // W, column i % W), plus the fixed 2-D sin-cos
    position embedding (``PatchEmbed``; recomputed for an input grid other than the native one)."""
    return transformer.pos_embed(hidden_states)  # (B, N, C)


# ---- 2. adaLN-Zero modulation ("DiT block design") -------------------------------------------------
# The paper's block regresses a scale gamma and shift beta for each of its two LayerNorms, and a gate
# alpha for each residual branch, from c = embed(t) + embed(y); the regressing linear layer starts at
# zero, so every block starts as the identity ("-Zero"). diffusers names them shift (beta), scale
# (gamma) and gate (alpha); "msa" is the attention branch, "mlp" the MLP branch.

def conditioning(block: BasicTransformerBlock, timestep: torch.Tensor, class_labels: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """c = embed(t) + embed(y), per row: (B, C). In the paper one embedder serves every block; diffusers
    gives each block its own ``norm1.emb`` (converted checkpoints hold the same weights in all of them).
    The label embedder maps the null label (DiT: 1000) to the unconditional embedding of CFG; in train
    mode it would also drop labels at random, so models run in eval mode."""
    return block.norm1.emb(timestep, class_labels, hidden_dtype=dtype)  # (B, C)


def modulation(block: BasicTransformerBlock, timestep: torch.Tensor, class_labels: torch.Tensor | None,
               dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """adaLN-Zero modulation of one block, per row: six (B, C) tensors, exactly as ``AdaLayerNormZero``:
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = Linear(SiLU(c)).chunk(6)."""
    n1 = block.norm1
    emb = conditioning(block, timestep, class_labels, dtype)  # (B, C)
    return n1.linear(n1.silu(emb)).chunk(6, dim=1)  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The paper's ``modulate``: h * (1 + gamma) + beta, with ``shift``/``scale`` already broadcast to
    ``h`` ((B, 1, C) for (B, N, C) tokens, (T, C) per packed token)."""
    return h * (1 + scale) + shift


# ---- 3. the block: on all tokens -------------------------------------------------------------------
#   x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
#   x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
# Both LayerNorms have no affine parameters (adaLN supplies them): ``norm1.norm`` (eps 1e-6) and
# ``norm3`` (diffusers' name for the block's second norm; the DiT config gives it eps 1e-5).

def self_attention(attn: Attention, h: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention of diffusers' ``Attention`` as its default ``AttnProcessor2_0`` runs
    it for DiT (no mask, no qk-norm, no residual, output factor 1): (B, N, C) -> (B, N, C)."""
    B = h.shape[0]
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)  # (B, N, C) each
    d = k.shape[-1] // attn.heads
    q = q.view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = k.view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, N, d)
    v = v.view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, N, d)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)  # (B, heads, N, d)
    a = a.transpose(1, 2).reshape(B, -1, attn.heads * d).to(q.dtype)  # (B, N, C)
    return attn.to_out[1](attn.to_out[0](a))  # (B, N, C) out projection, dropout


def block_forward(block: BasicTransformerBlock, x: torch.Tensor, timestep: torch.Tensor,
                  class_labels: torch.Tensor | None) -> torch.Tensor:
    """One DiT block on all tokens, as ``BasicTransformerBlock.forward`` computes it for DiT
    (``norm_type="ada_norm_zero"``, no cross-attention, default attention processor): x_l (B, N, C) ->
    x_{l+1} (B, N, C). The residual update is u_l = x_{l+1} - x_l."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(block, timestep, class_labels, x.dtype)
    h = modulate(block.norm1.norm(x), shift_msa[:, None], scale_msa[:, None])  # (B, N, C)
    x = gate_msa[:, None] * self_attention(block.attn1, h) + x  # (B, N, C) gated attention residual
    n = modulate(block.norm3(x), shift_mlp[:, None], scale_mlp[:, None])  # (B, N, C)
    if block._chunk_size is None:
        f = block.ff(n)  # (B, N, C) MLP: Linear(C, 4C), GELU (tanh), Linear(4C, C)
    else:  # diffusers' memory option (``enable_forward_chunking``): the MLP in chunks of tokens
        f = _chunked_feed_forward(block.ff, n, block._chunk_dim, block._chunk_size)
    return gate_mlp[:, None] * f + x  # (B, N, C) gated MLP residual


# ---- 3. the block: on a gathered subset of tokens (TokenCache's cached steps) ----------------------
# Real savings need real gathering: the kept (row, token) pairs of all rows are packed into one (T, C)
# tensor, so every token-wise op (norms, modulation, Q/K/V/out projections, MLP) runs on exactly the kept
# tokens, however unevenly the rows keep them. Only attention needs rows: it runs on a padded (B, K, C)
# layout (K = the fullest row's count); padded queries are computed and dropped, padded keys masked.

@dataclass
class BlockPlan:
    """Which (row, token) pairs block ``l`` computes in the current cached step, built once per step.

    Kept tokens are *packed*: the ``T`` kept pairs of all rows form one (T, C) tensor, so every token-wise
    op (norms, modulation, Q/K/V/out projections, MLP) runs on exactly the kept tokens, however unevenly
    the rows keep them. Only attention needs rows: it runs on a padded (B, K, C) layout (K = the
    fullest row's count); padded queries are computed and discarded, padded keys (``kv="kept"``) masked.
    """

    keep: torch.Tensor  # (B, N) bool, True = compute
    flat: torch.Tensor  # (T,) long, row * N + token of each kept pair; rows ascending, then tokens
    rows: torch.Tensor  # (T,) long, the row of each kept pair
    K: int  # kept tokens of the fullest row (0 = no row computes anything: skip the block)
    pad_flat: torch.Tensor | None = None  # (T,) long, row * K + rank in row: where a pair sits in the padded
    # attention layout; None when every row keeps exactly K (the packed tensor *is* the padded one)
    key_valid: torch.Tensor | None = None  # (B, K) bool, kv="kept" with padding: keys to attend to (a row
    # that keeps nothing attends to its padding: nothing of it is used, and an all-masked row gives NaN)

    @property
    def T(self) -> int:
        return self.flat.numel()


def plan_from_counts(keep: torch.Tensor, nz: torch.Tensor, counts: torch.Tensor, counts_cpu: list[int],
                     kv: str) -> BlockPlan:
    """Plan of one block from its mask ``keep`` (B, N), the (T, 2) [row, token] pairs of ``keep.nonzero()``,
    the per-row counts (B,) on device and on the host."""
    B, N = keep.shape
    K = max(counts_cpu) if counts_cpu else 0
    rows, tok = nz[:, 0], nz[:, 1]  # (T,), (T,)
    plan = BlockPlan(keep=keep, flat=rows * N + tok, rows=rows, K=K)
    if K and min(counts_cpu) < K:  # uneven rows: attention needs a padded layout
        offsets = counts.cumsum(0) - counts  # (B,) first packed position of each row
        rank = torch.arange(len(rows), device=keep.device) - offsets[rows]  # (T,) position within its row
        plan.pad_flat = rows * K + rank
        if kv == "kept":
            valid = torch.arange(K, device=keep.device)[None] < counts[:, None]  # (B, K)
            plan.key_valid = valid | (counts == 0)[:, None]
    return plan


def plan_from_indices(idx: torch.Tensor, num_tokens: int) -> BlockPlan:
    """Plan of one block in which every row keeps the same number of tokens: ``idx`` (B, k) long, the kept
    tokens of each row, distinct and ascending within a row. No padding (``pad_flat`` is None, ``K = k``,
    ``T = B * k``) and no host sync: built from shapes and device arithmetic only, so the static-shape
    cached steps (``tclab.cache.static``) can build it on the device and ``torch.compile`` can capture it."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device)  # (B,)
    keep = torch.zeros(B, num_tokens, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)  # (B, N)
    flat = (rows[:, None] * num_tokens + idx).reshape(-1)  # (T,) rows ascending, then tokens
    return BlockPlan(keep=keep, flat=flat, rows=rows.repeat_interleave(k), K=k)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, K) -> (B, K, C): the tokens ``idx`` of each row."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def to_padded(t: torch.Tensor, plan: BlockPlan, B: int) -> torch.Tensor:
    """Packed (T, C) -> padded (B, K, C) for attention (zeros at padding)."""
    if plan.pad_flat is None:
        return t.view(B, plan.K, t.shape[-1])
    return t.new_zeros(B * plan.K, t.shape[-1]).index_copy_(0, plan.pad_flat, t).view(B, plan.K, t.shape[-1])


def from_padded(t: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Padded (B, K, C) -> packed (T, C)."""
    t = t.reshape(-1, t.shape[-1])
    return t if plan.pad_flat is None else t.index_select(0, plan.pad_flat)


def block_packed(block: BasicTransformerBlock, x: torch.Tensor, plan: BlockPlan, timestep: torch.Tensor,
                 class_labels: torch.Tensor | None, kv: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """One DiT block on the kept pairs of ``plan``: returns packed outputs and inputs, both (T, C).

    ``kv="all"``: keys/values from every current token (the kept outputs then equal ``block_forward``'s
    rows for those tokens, at float32 round-off); ``kv="kept"``: from the row's kept tokens only."""
    B, N, C = x.shape
    attn = block.attn1
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(block, timestep, class_labels, x.dtype)
    r = plan.rows  # (T,) row of each kept pair: per-row modulation -> per-token
    x_k = x.reshape(B * N, C).index_select(0, plan.flat)  # (T, C)
    if kv == "all":
        h = block.norm1.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]  # (B, N, C) all tokens
        h_k = h.reshape(B * N, C).index_select(0, plan.flat)  # (T, C) queries' source
        k, v = attn.to_k(h), attn.to_v(h)  # (B, N, C) each: K/V of every current token
        mask = None
    else:
        h_k = block.norm1.norm(x_k) * (1 + scale_msa[r]) + shift_msa[r]  # (T, C)
        k, v = to_padded(attn.to_k(h_k), plan, B), to_padded(attn.to_v(h_k), plan, B)  # (B, K, C) each
        mask = None if plan.key_valid is None else plan.key_valid[:, None, None, :]  # (B, 1, 1, K)
    q = to_padded(attn.to_q(h_k), plan, B)  # (B, K, C)
    heads = attn.heads
    d = C // heads
    q = q.view(B, -1, heads, d).transpose(1, 2)  # (B, H, K, d)
    k = k.view(B, -1, heads, d).transpose(1, 2)  # (B, H, Nk, d)
    v = v.view(B, -1, heads, d).transpose(1, 2)  # (B, H, Nk, d)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, K, d)
    a = from_padded(a.transpose(1, 2).reshape(B, -1, C).to(q.dtype), plan)  # (T, C)
    a = attn.to_out[1](attn.to_out[0](a))  # (T, C) out projection, dropout
    hid = gate_msa[r] * a + x_k  # (T, C) gated attention residual (same order as diffusers)
    n = block.norm3(hid) * (1 + scale_mlp[r]) + shift_mlp[r]  # (T, C)
    return gate_mlp[r] * block.ff(n) + hid, x_k  # (T, C) gated MLP residual; the packed inputs


def compute_block_tokens(block: BasicTransformerBlock, x: torch.Tensor, idx: torch.Tensor, timestep: torch.Tensor,
                         class_labels: torch.Tensor | None, kv: str = "all",
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """DiT's block (diffusers ``BasicTransformerBlock``, ``norm_type="ada_norm_zero"``) on the tokens
    ``idx`` of each row, with the block's own submodules: returns their outputs ``x_{l+1}[idx]``. The
    cached-step engine calls the same code (``block_packed``) on its per-step plans.

    Args:
        x: (B, N, C) the block input, all tokens.
        idx: (B, K) token indices to compute per row (distinct within a row).
        kv: ``"all"``: keys/values from all N tokens (the kept outputs then equal the full block's outputs
            for those tokens); ``"kept"``: from the computed tokens of the row only.
        valid: (B, K) bool, optional: False marks padding entries of ``idx`` (not computed; zeros returned).
    Returns:
        (B, K, C) outputs of the gathered tokens.
    """
    B, N, C = x.shape
    K = idx.shape[1]
    valid = torch.ones(B, K, dtype=torch.bool, device=x.device) if valid is None else valid
    keep = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, idx, valid)  # (B, N)
    counts = keep.sum(1)  # (B,)
    plan = plan_from_counts(keep, keep.nonzero(), counts, counts.tolist(), kv)
    out, _ = block_packed(block, x, plan, timestep, class_labels, kv)  # (T, C), kept tokens in ascending order
    full = torch.zeros(B * N, C, dtype=x.dtype, device=x.device).index_copy_(0, plan.flat, out).view(B, N, C)
    return gather_tokens(full, idx) * valid[..., None]  # (B, K, C)


# ---- 4. received attention -------------------------------------------------------------------------
# How much attention each token receives from all queries of its row: the column mean of the softmax
# attention map, averaged over heads (ToCa's "influence" score: a token many others read is costly to
# leave stale). The map is (B, heads, N, N), so it is built a chunk of queries at a time.

ATTENTION_CHUNK = 256  # queries per chunk when measuring received attention (bounds the (B, H, q, N) map)


def attention_received(block: BasicTransformerBlock, x: torch.Tensor, timestep: torch.Tensor,
                       class_labels: torch.Tensor | None) -> torch.Tensor:
    """Mean attention each token receives in block ``block`` (ToCa's influence score): the column mean of
    the softmax attention map, averaged over heads; sums to 1 over tokens. x (B, N, C) -> (B, N)."""
    B, N, C = x.shape
    attn = block.attn1
    shift_msa, scale_msa = modulation(block, timestep, class_labels, x.dtype)[:2]
    h = block.norm1.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]  # (B, N, C)
    heads = attn.heads
    d = C // heads
    q = attn.to_q(h).view(B, N, heads, d).transpose(1, 2)  # (B, H, N, d)
    k = attn.to_k(h).view(B, N, heads, d).transpose(1, 2)  # (B, H, N, d)
    recv = torch.zeros(B, N, device=x.device, dtype=torch.float32)
    for lo in range(0, N, ATTENTION_CHUNK):  # chunks of queries bound the (B, H, q, N) map
        p = torch.softmax((q[:, :, lo:lo + ATTENTION_CHUNK] @ k.transpose(-1, -2)).float() / math.sqrt(d), dim=-1)
        recv += p.sum(dim=2).mean(dim=1)  # (B, N) summed over queries, mean over heads
    return recv / N


# ---- 5. the output head ("Transformer decoder") ----------------------------------------------------
# A final adaLN (shift and scale only, no gate) and a linear layer to p*p*C_out values per token, then
# the tokens are put back as patches. C_out = 2 * C_in with learned sigma (noise and variance), else C_in.

def unpatchify(x: torch.Tensor, p: int, out_channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, N, p*p*C_out) -> (B, C_out, H*p, W*p). ``grid`` (H, W) defaults to DiT's square grid,
    H = W = int(sqrt(N)), as diffusers' forward assumes."""
    if grid is None:
        h = w = int(x.shape[1] ** 0.5)
    else:
        h, w = grid
    x = x.reshape(-1, h, w, p, p, out_channels)  # (B, H, W, p, p, C_out)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C_out, H, p, W, p)
    return x.reshape(-1, out_channels, h * p, w * p)  # (B, C_out, H*p, W*p)


def output_head(transformer, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The last block's output x_L (B, N, C) -> the model output (B, C_out, H*p, W*p), exactly as
    ``DiTTransformer2DModel.forward``. The conditioning comes from block 0's embedder, read *after* the
    block loop (it matters to anything that patches ``norm1.emb``)."""
    cond = conditioning(transformer.transformer_blocks[0], timestep, class_labels, x.dtype)  # (B, C)
    shift, scale = transformer.proj_out_1(F.silu(cond)).chunk(2, dim=1)  # (B, C) each
    x = modulate(transformer.norm_out(x), shift[:, None], scale[:, None])  # (B, N, C)
    x = transformer.proj_out_2(x)  # (B, N, p*p*C_out)
    return unpatchify(x, patch_size(transformer), transformer.out_channels, grid)  # (B, C_out, H*p, W*p)


# ---- 6. the whole model ----------------------------------------------------------------------------

def dit_forward(transformer, hidden_states: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None) -> torch.Tensor:
    """``DiTTransformer2DModel(hidden_states, timestep, class_labels).sample`` from the pieces above:
    (B, C_in, H*p, W*p) -> (B, C_out, H*p, W*p). Blocks run ``block_forward`` (not the modules, so hooks
    attached to them do not run)."""
    grid = token_grid(transformer, hidden_states)  # (H, W)
    x = embed_tokens(transformer, hidden_states)  # (B, N, C)
    for block in transformer.transformer_blocks:
        x = block_forward(block, x, timestep, class_labels)  # (B, N, C)
    return output_head(transformer, x, timestep, class_labels, grid)  # (B, C_out, H*p, W*p)
