"""Shared fixtures: tiny DiTs whose runs take milliseconds, built in the test (no weights on disk)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config


def tiny_transformer(in_channels=4, out_channels=8, sample_size=8, layers=2, seed=0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                                 out_channels=out_channels, num_layers=layers, sample_size=sample_size,
                                 patch_size=2, num_embeds_ada_norm=1000).eval()


def tiny_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16).eval()


@pytest.fixture
def latent_dit() -> LoadedDiT:
    """A 2-block latent DiT (8x8x4 latents, learned sigma) with a random 2x-downsampling VAE."""
    return LoadedDiT(name="tiny-latent", transformer=tiny_transformer(), vae=tiny_vae(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test")


@pytest.fixture
def pixel_dit() -> LoadedDiT:
    """A 2-block pixel-space DiT on 8x8x3 images with 3 classes (4x4 token grid)."""
    return LoadedDiT(name="tiny-pixel", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test",
                     class_names=["a", "b", "c"])
