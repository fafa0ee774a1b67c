"""Model layouts a team may hand over, each written to disk by ``standins`` and loaded back with
``load_dit(folder)``: nothing is downloaded, every model is tiny and random.

Each layout is loaded, sampled, recorded, cached and FLOP-counted, and what ``load_dit`` reports
(token grid, resolution, learned sigma, class names, blocks) is checked against how it was built:

| layout                   | folder                        | patch | grid  | resolution      | blocks | labels   |
|--------------------------|-------------------------------|-------|-------|-----------------|--------|----------|
| imagenet-pipeline        | DiTPipeline + AutoencoderKL   | 2     | 8x8   | 16 x 2 = 32     | 4      | 1000 ids |
| hub-config-pipeline      | DiTPipeline, hub's config.json| 2     | 4x4   | 8 x 4 = 32      | 4      | none     |
| latent-patch4            | DiTPipeline + AutoencoderKL   | 4     | 16x16 | 64 x 2 = 128    | 2      | none     |
| dit-xl-2-512-grid        | DiTPipeline + AutoencoderKL   | 2     | 32x32 | 64 x 8 = 512    | 2      | none     |
| pixel-patch2             | transformer only, 3 channels  | 2     | 4x4   | 8               | 4      | none     |
| pixel-patch4             | transformer only              | 4     | 8x8   | 32              | 4      | none     |
| pixel-patch8             | transformer only              | 8     | 4x4   | 32              | 4      | none     |
| pixel-2-blocks           | transformer only              | 2     | 8x8   | 16              | 2      | none     |
| pixel-28-blocks          | transformer only              | 2     | 4x4   | 8               | 28     | none     |

The real DiT-XL/2 (28 blocks, width 1152) is checked through its preset on the meta device: its
structure and FLOPs without the 9 s and 3 GB of building it with weights.

The null label: tclab (like DiTPipeline) feeds label 1000 as the unconditional class, so a DiT with
another ``num_embeds_ada_norm`` is refused at load, and ``widen_label_table`` converts one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from tests.standins import imagenet_like_labels, make_transformer, write_latent_pipeline, write_transformer_folder

from tclab.cache import TokenCacheConfig, apply_token_cache, get_token_cache_state, remove_token_cache
from tclab.metrics import PAPER_GMACS, transformer_forward_flops
from tclab.models import NULL_CLASS, PRESETS, LoadedDiT, ModelSpecError, PixelSpaceVAE, load_dit, widen_label_table
from tclab.record import record_token_changes
from tclab.sampling import SampleConfig, sample

GOLDFISH = "goldfish, Carassius auratus"
# Written in string order ("0", "1", "10", "100", ...), not id order: names must come back by id.
IMAGENET = dict(sorted(imagenet_like_labels(named={1: GOLDFISH}).items(), key=lambda kv: str(kv[0])))
LABELS = [0, 999]  # the first and the last real class; 1000 is the null label
CFG = SampleConfig(num_steps=2, guidance_scale=4.0, seed=0)  # CFG on: the null label is used


@dataclass(frozen=True)
class Layout:
    write: Callable[[Path], Path]
    grid: int  # tokens a side
    resolution: int  # image side in pixels
    blocks: int
    learned_sigma: bool
    pixel_space: bool
    class_names: bool = False  # an ImageNet-like id2label
    width: int = 16  # heads x head_dim (standins' default 2 x 8)
    patch: int = 2


LAYOUTS = {
    "imagenet-pipeline": Layout(lambda d: write_latent_pipeline(d, id2label=IMAGENET, sample_size=16, downsample=2),
                                grid=8, resolution=32, blocks=4, learned_sigma=True, pixel_space=False,
                                class_names=True),
    "hub-config-pipeline": Layout(lambda d: write_latent_pipeline(d, hub_transformer_config=True, sample_size=8,
                                                                  downsample=4, learned_sigma=False),
                                  grid=4, resolution=32, blocks=4, learned_sigma=False, pixel_space=False),
    "latent-patch4": Layout(lambda d: write_latent_pipeline(d, sample_size=64, patch_size=4, num_layers=2),
                            grid=16, resolution=128, blocks=2, learned_sigma=True, pixel_space=False, patch=4),
    "dit-xl-2-512-grid": Layout(lambda d: write_latent_pipeline(d, sample_size=64, num_layers=2, downsample=8),
                                grid=32, resolution=512, blocks=2, learned_sigma=True, pixel_space=False),
    "pixel-patch2": Layout(lambda d: write_transformer_folder(d, sample_size=8),
                           grid=4, resolution=8, blocks=4, learned_sigma=False, pixel_space=True),
    "pixel-patch4": Layout(lambda d: write_transformer_folder(d, sample_size=32, patch_size=4),
                           grid=8, resolution=32, blocks=4, learned_sigma=False, pixel_space=True, patch=4),
    "pixel-patch8": Layout(lambda d: write_transformer_folder(d, sample_size=32, patch_size=8),
                           grid=4, resolution=32, blocks=4, learned_sigma=False, pixel_space=True, patch=8),
    "pixel-2-blocks": Layout(lambda d: write_transformer_folder(d, sample_size=16, num_layers=2),
                             grid=8, resolution=16, blocks=2, learned_sigma=False, pixel_space=True),
    "pixel-28-blocks": Layout(lambda d: write_transformer_folder(d, sample_size=8, num_layers=28),
                              grid=4, resolution=8, blocks=28, learned_sigma=False, pixel_space=True),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory) -> tuple[Layout, Path]:
    """Each layout written once per module; every test loads it afresh from disk."""
    spec = LAYOUTS[request.param]
    return spec, spec.write(tmp_path_factory.mktemp(request.param))


def snapshot(transformer: torch.nn.Module) -> dict:
    """Every module's type, attribute names and children, plus the state dict's keys."""
    tree = {name: (type(m), sorted(vars(m)), sorted(m._modules)) for name, m in transformer.named_modules()}
    return {"tree": tree, "state": sorted(transformer.state_dict())}


# ---- every layout ------------------------------------------------------------------------------

def test_load_reports_the_layout(layout):
    spec, folder = layout
    m = load_dit(str(folder))
    assert m.token_grid == (spec.grid, spec.grid)
    assert m.resolution == spec.resolution and m.pixel_space == spec.pixel_space
    assert m.learned_sigma == spec.learned_sigma
    assert m.transformer.config.out_channels == (2 if spec.learned_sigma else 1) * m.latent_channels
    assert m.latent_channels == (3 if spec.pixel_space else 4)
    assert len(m.transformer.transformer_blocks) == spec.blocks == m.identity()["blocks"]
    assert m.transformer.config.patch_size == spec.patch
    assert m.trained and m.source == str(folder) and m.meta["weights_sha256"]
    if spec.class_names:  # 1000 names in id order, aliases kept whole
        assert m.class_names == [IMAGENET[k] for k in range(1000)] and m.num_classes == 1000
        assert m.class_names[1] == GOLDFISH and m.class_names[10] == "class 0010, synthetic category 10"
    else:
        assert m.class_names is None and m.num_classes == NULL_CLASS


def test_samples_images_of_the_model_resolution(layout):
    spec, folder = layout
    m = load_dit(str(folder))
    images = sample(m, LABELS, CFG, progress=False).images
    assert images.shape == (len(LABELS), 3, spec.resolution, spec.resolution)  # (B, 3, H, W)
    assert images.isfinite().all() and images.std() > 0
    assert (images.abs() <= 1).all()


def test_records_every_block_and_token(layout):
    spec, folder = layout
    m = load_dit(str(folder))
    with record_token_changes(m.transformer, model_identity=m.identity()) as rec:
        sample(m, [LABELS[-1]], CFG, progress=False)
    r = rec.record
    n = spec.grid ** 2
    assert r.out_change.shape == (CFG.num_steps, spec.blocks, 2, n)  # (step, block, row, token): cond + uncond
    assert r.num_blocks == spec.blocks and r.num_tokens == n and r.grid == (spec.grid, spec.grid)
    assert sorted(r.branch.tolist()) == ["cond", "uncond"] and r.class_labels.tolist() == [LABELS[-1]] * 2
    assert (r.update_ratio > 0).all()  # finite and positive: every block moved every token, step 0 included
    assert np.isnan(r.update_change[0]).all() and np.isfinite(r.update_change[1]).all()  # no step before step 0
    assert r.model_identity["blocks"] == spec.blocks


def test_token_cache_runs_and_removal_restores(layout):
    spec, folder = layout
    m = load_dit(str(folder))
    cfg = SampleConfig(num_steps=3, guidance_scale=4.0, seed=1)
    before, ref = snapshot(m.transformer), sample(m, LABELS, cfg, progress=False).images
    state = apply_token_cache(m.transformer, TokenCacheConfig(scorer="random", rho=0.5, schedule="round-robin",
                                                              interval=2, seed=0))
    cached = sample(m, LABELS, cfg, progress=False).images
    s = state.summary()
    assert s["calls"] == 3 and s["full_steps"] == 2 and s["cached_steps"] == 1  # steps 0 and 2 full
    assert abs(s["mean_kept_cached"] - 0.5) <= 1 / (spec.blocks * spec.grid ** 2)  # rho of the (block, token) pairs
    assert cached.shape == ref.shape and cached.isfinite().all()
    assert not torch.equal(cached, ref)  # half the pairs were reused, so the images moved
    remove_token_cache(m.transformer)
    assert get_token_cache_state(m.transformer) is None and snapshot(m.transformer) == before
    torch.testing.assert_close(sample(m, LABELS, cfg, progress=False).images, ref, rtol=0, atol=0)


def test_flops_are_counted_for_every_block_and_token(layout):
    spec, folder = layout
    m = load_dit(str(folder))
    one, two = transformer_forward_flops(m.transformer), transformer_forward_flops(m.transformer, batch=2)
    n = spec.grid ** 2
    assert one.flops > 0 and two.flops == 2 * one.flops
    attn = sum(v for k, v in one.by_op.items() if "attention" in k)
    assert attn == 2 * 2 * n * n * spec.width * spec.blocks  # Q K^T and P V: N^2 C MACs each, per block


# ---- FLOPs against token count -------------------------------------------------------------------

def test_flops_grow_with_tokens_as_the_architecture_says():
    """One architecture at 4x4 .. 32x32 tokens: F(N) = a + b N + c N^2 with b (linear layers, patch
    embedding and output projection, per token) and c (attention) known exactly, a (the per-sample
    timestep/class embeddings) the same at every N."""
    C, L, p, cin, cout = 16, 2, 2, 3, 3
    rest = []
    for grid in (4, 8, 16, 32):
        tr = make_transformer(in_channels=cin, learned_sigma=False, sample_size=grid * p, patch_size=p, num_layers=L)
        n, f = grid ** 2, transformer_forward_flops(tr).flops
        b = 2 * (L * 12 * C * C + p * p * cin * C + C * p * p * cout)  # qkv 3C^2 + out C^2 + MLP 8C^2 per block
        c = 2 * (L * 2 * C)
        rest.append(f - b * n - c * n * n)
    assert rest[0] > 0 and rest == [rest[0]] * 4, rest


# ---- the real DiT-XL/2 structure, cheaply -------------------------------------------------------------

@pytest.mark.parametrize("resolution,grid", [(256, 16), (512, 32)])
def test_dit_xl_2_preset_has_28_blocks_and_the_paper_flops(resolution, grid):
    """On the meta device (no weights are made: 0.3 s instead of 9 s and 3 GB) the preset has DiT-XL/2's
    structure, and one forward counts the DiT paper's GMACs."""
    with torch.device("meta"):
        m = load_dit("DiT-XL/2", resolution=resolution)
        gmacs = transformer_forward_flops(m.transformer).gmacs
    cfg = m.transformer.config
    assert len(m.transformer.transformer_blocks) == 28 == m.identity()["blocks"] and cfg.num_layers == 28
    assert cfg.num_attention_heads * cfg.attention_head_dim == 1152 and cfg.num_attention_heads == 16
    assert m.token_grid == (grid, grid) and m.learned_sigma and not m.trained
    assert PRESETS["DiT-XL/2"].args[:3] == (28, 1152, 16)
    assert abs(gmacs / PAPER_GMACS[("DiT-XL/2", resolution)] - 1) < 1e-3, gmacs


# ---- the null label and id2label ------------------------------------------------------------------

@pytest.mark.parametrize("n,hint", [(10, "widen_label_table"), (1001, "one of its real classes")])
def test_a_dit_whose_null_label_is_not_1000_is_refused(tmp_path, n, hint):
    """With num_embeds_ada_norm = 10, guidance's label 1000 would index past the 11-row table; with 1001,
    label 1000 is a real class and guidance would silently condition on it."""
    folder = write_transformer_folder(tmp_path / "tr", sample_size=8, num_embeds_ada_norm=n)
    with pytest.raises(ModelSpecError, match=rf"num_embeds_ada_norm={n}.*label 1000.*{hint}"):
        load_dit(str(folder))
    pipe = write_latent_pipeline(tmp_path / "pipe", sample_size=8, num_embeds_ada_norm=n)
    with pytest.raises(ModelSpecError, match=rf"transformer: the transformer has num_embeds_ada_norm={n}"):
        load_dit(str(pipe))
    with pytest.raises(ModelSpecError, match="num_embeds_ada_norm"):  # built by hand, not loaded
        LoadedDiT(name="x", transformer=make_transformer(in_channels=3, learned_sigma=False, sample_size=8,
                                                         num_embeds_ada_norm=n),
                  vae=PixelSpaceVAE(), scheduler_config={}, trained=False, source="test")


def test_widen_label_table_keeps_every_output_and_then_loads(tmp_path):
    tr = make_transformer(in_channels=3, learned_sigma=False, sample_size=8, num_embeds_ada_norm=10)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([900, 500, 20])  # (B, C, H, W)
    with torch.no_grad():
        old = tr(x, timestep=t, class_labels=torch.tensor([0, 9, 10])).sample  # 10 = its own null label
        widen_label_table(tr)
        new = tr(x, timestep=t, class_labels=torch.tensor([0, 9, NULL_CLASS])).sample
    torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert tr.config.num_embeds_ada_norm == NULL_CLASS
    assert tr.transformer_blocks[-1].norm1.emb.class_embedder.embedding_table.num_embeddings == NULL_CLASS + 1
    tr.save_pretrained(tmp_path / "tr", safe_serialization=True)
    m = load_dit(str(tmp_path / "tr"))
    assert sample(m, [0, 9], CFG, progress=False).images.isfinite().all()
    with pytest.raises(ValueError, match="fewer than 1000"):
        widen_label_table(tr)


def test_id2label_names_bound_the_labels(tmp_path):
    """Six named classes on a 1000-label DiT (as the embedded model): labels 6.. are refused (but the
    null label 1000: unconditional), and the message shows a few names, not all of a 1000-name list."""
    folder = write_latent_pipeline(tmp_path / "six", sample_size=8, id2label={k: f"c{k}, alias" for k in range(6)})
    m = load_dit(str(folder))
    assert m.class_names == [f"c{k}, alias" for k in range(6)] and m.num_classes == 6
    with pytest.raises(ValueError, match=r"out of range.*0\.\.5"):
        sample(m, [6], CFG, progress=False)
    big = load_dit(str(write_latent_pipeline(tmp_path / "big", sample_size=8, id2label=IMAGENET)))
    with pytest.raises(ValueError, match=r"\[1001\] out of range.*0\.\.999.*or 1000 for an unconditional") as e:
        sample(big, [NULL_CLASS + 1], CFG, progress=False)
    assert GOLDFISH in str(e.value) and len(str(e.value)) < 500
    # the null label itself is an unconditional sample (a folder that maps to no class)
    assert torch.isfinite(sample(big, [NULL_CLASS], CFG, progress=False).images).all()


@pytest.mark.parametrize("id2label,match", [
    ({"0": "a", "2": "c"}, r"without gaps.*lacks \[1\]"),
    ({"0": "a", "one": "b"}, r"keys must be class labels.*'one'"),
    ({str(k): f"c{k}" for k in range(NULL_CLASS + 1)}, r"1001 class names.*at most 1000"),
])
def test_a_bad_id2label_is_refused_with_what_is_wrong(tmp_path, id2label, match):
    folder = write_latent_pipeline(tmp_path / "p", sample_size=8)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": id2label}))
    with pytest.raises(ModelSpecError, match=match):
        load_dit(str(folder))
