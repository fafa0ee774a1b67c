"""Loading DiTs: embedded default, local folders (pipeline and transformer-only), presets, bad folders."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTPipeline, UNet2DModel

from tclab import paths
from tclab.models import EMBEDDED_NAME, NULL_CLASS, PRESETS, ModelSpecError, load_dit
from tclab.sampling import SampleConfig, make_scheduler, sample


def test_embedded_model_loads_offline_and_is_small():
    m = load_dit(EMBEDDED_NAME)
    assert m.trained and m.pixel_space and m.token_grid == (16, 16) and m.resolution == 32
    assert m.class_names == ["cross", "disc", "ring", "square", "star", "triangle"]
    weights = list((Path(m.source) / "transformer").glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size <= 25 * 2**20
    assert m.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == NULL_CLASS + 1


def test_embedded_model_runs_in_diffusers_dit_pipeline():
    m = load_dit("embedded")
    pipe = m.pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 32, 32, 3) and 0 <= out.min() and out.max() <= 1


def test_preset_is_marked_untrained():
    m = load_dit("DiT-S/2")
    assert not m.trained and "UNTRAINED" in m.source and m.token_grid == (16, 16)
    assert len(m.transformer.transformer_blocks) == 12 and m.transformer.config.out_channels == 8
    assert set(PRESETS) >= {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"}
    with pytest.raises(ModelSpecError, match="256 or 512"):
        load_dit("DiT-S/2", resolution=300)


def test_the_built_in_model_names_of_paths_are_the_models_load_dit_knows():
    # tclab.paths tells a model name from a folder without importing tclab.models: the two lists agree
    assert set(paths.PRESET_MODELS) == set(PRESETS)
    assert paths.BUILTIN_MODELS == {EMBEDDED_NAME, "embedded", "default", *PRESETS}


def test_transformer_only_folder_round_trip(pixel_dit, tmp_path):
    pixel_dit.transformer.save_pretrained(tmp_path / "tr")
    m = load_dit(str(tmp_path / "tr"))
    assert m.pixel_space and m.trained
    x = torch.randn(1, 3, 8, 8)
    t, y = torch.tensor([10]), torch.tensor([1])
    torch.testing.assert_close(m.transformer(x, t, y).sample, pixel_dit.transformer(x, t, y).sample)


def test_pipeline_folder_with_vae_round_trip(latent_dit, tmp_path):
    pipe = latent_dit.pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    m = load_dit(str(tmp_path / "pipe"))
    assert not m.pixel_space and m.resolution == 16 and m.scheduler_config["beta_schedule"] == "linear"
    a = sample(m, [1], SampleConfig(num_steps=2), progress=False).images
    b = sample(latent_dit, [1], SampleConfig(num_steps=2), progress=False).images
    torch.testing.assert_close(a, b)


def test_not_a_dit_is_refused_with_what_was_found(tmp_path):
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    with pytest.raises(ModelSpecError, match="UNet2DModel, not a DiT"):
        load_dit(str(tmp_path / "unet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_dit(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    with pytest.raises(ModelSpecError, match="no weights"):
        load_dit(str(tmp_path / "noweights"))
    with pytest.raises(ModelSpecError, match="neither"):
        load_dit("no/such/model")


def test_latent_transformer_without_vae_is_refused(latent_dit, tmp_path):
    latent_dit.transformer.save_pretrained(tmp_path / "tr")
    with pytest.raises(ModelSpecError, match="no VAE"):
        load_dit(str(tmp_path / "tr"))


def test_pickle_weights_are_never_executed(pixel_dit, tmp_path):
    """A .bin checkpoint carrying pickled code must not run it (diffusers loads .bin weights_only)."""
    import pickle

    folder = tmp_path / "evil"
    pixel_dit.transformer.save_pretrained(folder, safe_serialization=False)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(Exception) as e:
        load_dit(str(folder))
    assert "pickled code ran" not in str(e.value)


def test_scheduler_names():
    cfg = load_dit("DiT-S/2").scheduler_config
    assert type(make_scheduler("dpm++", cfg)).__name__ == "DPMSolverMultistepScheduler"
    assert type(make_scheduler("euler", cfg)).__name__ == "EulerDiscreteScheduler"


def test_a_preset_leaves_the_callers_random_state_alone():
    import torch

    from tclab.models import load_dit

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_dit("DiT-S/8", resolution=256, seed=5)
    assert torch.equal(torch.rand(3), expected)                      # not reseeded behind the caller's back
    b = load_dit("DiT-S/8", resolution=256, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.transformer.state_dict().values(),
                                                 b.transformer.state_dict().values()))   # still seeded weights
