"""Fault suite, models (issue 14, point 3): a model folder whose config, weights or JSON files are wrong
is refused with one ``ModelSpecError`` naming the file (and the keys, with how many) and the fix, and
``tclab flops`` turns it into exit 2 with one line and no traceback; never a half-random model.

Every folder is a tiny model written by ``tests.standins`` and then corrupted the way real folders go
wrong: a config edited by hand, keys renamed or dropped from the safetensors file, a truncated copy, a
git-lfs pointer, broken JSON. The last tests check what a good load records: ``weights_sha256`` is the
hash of exactly the files read, and ``trained`` means every weight came from the checkpoint.

| fault class                                         | expected behaviour                                  |
|-----------------------------------------------------|-----------------------------------------------------|
| config.json with more layers than the checkpoint    | refused: missing keys, count, num_layers hint        |
| config.json with fewer layers than the checkpoint   | refused: unused keys (no silently truncated model)   |
| checkpoint with an extra key                        | refused: the key named                               |
| checkpoint lacking one key                          | refused: the key named                               |
| checkpoint with a renamed key                       | refused: both names, missing and unused              |
| tensor of the wrong shape                           | refused: key, checkpoint shape and model shape       |
| NaN in a weight                                     | refused: the key named                               |
| weights under another file name                     | refused: the file found and the name to give it      |
| truncated / corrupt safetensors file                | refused: the file named, "copy it again"             |
| git-lfs pointer instead of weights                  | refused: "git lfs pull"                              |
| .bin holding pickled code                           | refused, the code never runs                         |
| sharded checkpoint missing a shard                  | refused: the shard named                             |
| a misspelt config key ("num_layer")                 | refused, with "did you mean 'num_layers'?"           |
| a config value of the wrong type                    | refused: config.json named                           |
| invalid JSON in each of the five JSON files         | refused: file, line and column                       |
| a JSON file holding an array (not an object)        | refused: file named, "JSON array"                    |
| config.json not UTF-8                               | refused: file named                                  |
| tclab_model.json class_names not a list of names    | refused: file named                                  |
| VAE checkpoint lacking weights                      | refused: vae/ file and keys named                    |
| VAE latent channels != transformer in_channels      | refused: both config values named                    |
| latent pipeline whose vae/ is gone                  | refused (was: 4-channel "images")                    |
| VAE with 2022 attention names (query, proj_attn)    | loads (diffusers renames them; not refused)          |
| .safetensors and .bin both present                  | loads the safetensors; hashes only it                |
| a stray extra .safetensors next to the weights      | not read, not hashed                                 |
| .bin-only folder                                    | hashed (was: weights_sha256 None)                    |
| sharded checkpoint                                  | every shard read and hashed                          |
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from tclab.cli import main
from tclab.models import EMBEDDED_DIR, ModelSpecError, load_dit
from tests.standins import make_transformer, write_latent_pipeline, write_transformer_folder

WEIGHTS = "diffusion_pytorch_model.safetensors"
BLOCK_KEYS = 19  # weights per DiT block in diffusers' DiTTransformer2DModel


def sha256(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """One pixel transformer-only folder (4 blocks) and one latent DiTPipeline folder, written once."""
    root = tmp_path_factory.mktemp("originals")
    return {"pixel": write_transformer_folder(root / "pixel", sample_size=8),
            "pipeline": write_latent_pipeline(root / "pipeline", sample_size=8)}


@pytest.fixture
def pixel(originals, tmp_path) -> Path:
    return Path(shutil.copytree(originals["pixel"], tmp_path / "pixel"))


@pytest.fixture
def pipeline(originals, tmp_path) -> Path:
    return Path(shutil.copytree(originals["pipeline"], tmp_path / "pipeline"))


# ---- corrupting a folder ------------------------------------------------------------------------

def edit_json(file: Path, **changes) -> None:
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg, indent=2))


def edit_weights(file: Path, edit: Callable[[dict], None]) -> None:
    state = load_file(file)
    edit(state)
    save_file(state, file)


def assert_refused(folder: Path, capfd, *says: str) -> str:
    """``load_dit`` raises a ModelSpecError saying each of ``says``; ``tclab flops`` exits 2 with that
    message on one line, no traceback, and none of diffusers' 'newly initialized' warnings."""
    with pytest.raises(ModelSpecError) as e:
        load_dit(str(folder))
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for s in says:
        assert s in msg, f"{s!r} not in: {msg}"
    assert len(msg) < 2000, len(msg)  # a few keys and how many, not the whole state dict
    capfd.readouterr()
    rc = main(["flops", str(folder)])
    out, err = capfd.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err and "newly initialized" not in err and "were not used" not in err
    assert says[0] in err and len(err.strip().splitlines()) == 1, err
    return msg


# ---- config and checkpoint disagree ---------------------------------------------------------------

def test_config_with_more_layers_than_the_checkpoint_is_refused(pixel, capfd):
    """Was: loaded with block 4 at random values, exit 0, trained=True."""
    edit_json(pixel / "config.json", num_layers=5)
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), str(pixel / "config.json"),
                   f"{BLOCK_KEYS} weights are missing from the checkpoint", "transformer_blocks.4.attn1.to_k.bias",
                   f"({BLOCK_KEYS - 4} more)", "num_layers=5, but the checkpoint holds 4 blocks",
                   "set num_layers to 4")


def test_config_with_fewer_layers_than_the_checkpoint_is_refused(pixel, capfd):
    """Was: a silently truncated 3-block model with the 4-block checkpoint's hash."""
    edit_json(pixel / "config.json", num_layers=3)
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), f"{BLOCK_KEYS} checkpoint weights are not in the model",
                   "transformer_blocks.3.", "num_layers=3, but the checkpoint holds 4 blocks", "set num_layers to 4")


def test_checkpoint_with_an_extra_key_is_refused(pixel, capfd):
    edit_weights(pixel / WEIGHTS, lambda sd: sd.update({"ema.shadow.weight": torch.zeros(3)}))
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), "1 checkpoint weight is not in the model",
                   "ema.shadow.weight", "use the config.json saved with these weights")


def test_checkpoint_lacking_a_key_is_refused(pixel, capfd):
    edit_weights(pixel / WEIGHTS, lambda sd: sd.pop("proj_out_2.weight"))
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), "1 weight is missing from the checkpoint",
                   "(proj_out_2.weight)", "never a partly random model")


def test_checkpoint_with_a_renamed_key_names_both_names(pixel, capfd):
    key = "transformer_blocks.2.attn1.to_q.weight"
    edit_weights(pixel / WEIGHTS, lambda sd: sd.update({key.replace("to_q", "query"): sd.pop(key)}))
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), f"1 weight is missing from the checkpoint that the config "
                   f"needs ({key})", "1 checkpoint weight is not in the model the config describes "
                   "(transformer_blocks.2.attn1.query.weight)")


def test_tensor_of_the_wrong_shape_is_refused_with_both_shapes(pixel, capfd):
    edit_weights(pixel / WEIGHTS, lambda sd: sd.update({"proj_out_2.weight": torch.zeros(5, 16)}))
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), "1 weight has the wrong shape",
                   "proj_out_2.weight: checkpoint (5, 16), model (12, 16)")


def test_nan_in_a_weight_is_refused(pixel, capfd):
    def poison(sd):
        sd["transformer_blocks.1.ff.net.2.weight"][0, 0] = float("nan")

    edit_weights(pixel / WEIGHTS, poison)
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), "1 weight holds NaN or infinity",
                   "transformer_blocks.1.ff.net.2.weight", "use an earlier or float32 checkpoint")


def test_a_misspelt_config_key_is_named_with_the_key_meant(pixel, capfd):
    """diffusers ignores a key it does not know, so "num_layer" gives the default 28 blocks."""
    cfg = json.loads((pixel / "config.json").read_text())
    cfg["num_layer"] = cfg.pop("num_layers")
    (pixel / "config.json").write_text(json.dumps(cfg))
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), f"{24 * BLOCK_KEYS} weights are missing",
                   "transformer_blocks.4.", "'num_layer' (did you mean 'num_layers'?)")


def test_a_config_value_of_the_wrong_type_is_refused(pixel, capfd):
    edit_json(pixel / "config.json", num_layers="four")
    assert_refused(pixel, capfd, str(pixel / "config.json"), "cannot build a DiTTransformer2DModel",
                   "a number written as a string")


# ---- weight files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "diffusion_pytorch_model.fp16.safetensors"])
def test_weights_under_another_file_name_are_refused_with_the_name_to_give(pixel, capfd, name):
    (pixel / WEIGHTS).rename(pixel / name)
    assert_refused(pixel, capfd, str(pixel), f"it has {name}, which diffusers does not read",
                   f"Rename the weights file to {WEIGHTS}")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_safetensors_file_is_refused(pixel, capfd, damage):
    f = pixel / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 4096)
    assert_refused(pixel, capfd, str(f), "is not a readable safetensors file", "copy it again")


def test_a_git_lfs_pointer_is_refused_with_git_lfs_pull(pixel, capfd):
    (pixel / WEIGHTS).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64
                                 + "\nsize 123456\n")
    assert_refused(pixel, capfd, str(pixel / WEIGHTS), "is a git-lfs pointer, not the weights", "git lfs pull")


def test_a_bin_with_pickled_code_is_refused_and_never_run(pixel, capfd):
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    (pixel / WEIGHTS).unlink()
    (pixel / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": Boom()}))
    msg = assert_refused(pixel, capfd, str(pixel / "diffusion_pytorch_model.bin"), "could not be read as weights",
                         "use a safetensors file")
    assert "pickled code ran" not in msg


def test_a_sharded_checkpoint_missing_a_shard_is_refused(tmp_path, capfd):
    folder = tmp_path / "sharded"
    make_transformer(in_channels=3, learned_sigma=False, sample_size=8).save_pretrained(
        folder, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(folder.glob("*-of-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    assert_refused(folder, capfd, f"{WEIGHTS}.index.json", f"lists {len(shards)} shards, but 1 of them is missing",
                   shards[-1].name, "copy every shard")


# ---- JSON files -----------------------------------------------------------------------------------

JSON_FILES = {  # file in a DiTPipeline folder -> what it is
    "transformer/config.json": "the transformer config",
    "vae/config.json": "the AutoencoderKL config",
    "model_index.json": "the pipeline's index",
    "scheduler/scheduler_config.json": "the scheduler config",
    "tclab_model.json": "tclab's model record",
}


@pytest.mark.parametrize("file", list(JSON_FILES))
def test_invalid_json_names_the_file_line_and_column(pipeline, capfd, file):
    (pipeline / file).write_text('{\n  "num_layers": 4,\n  "patch_size": 2,,\n}\n')  # the 2nd comma: line 3, column 19
    assert_refused(pipeline, capfd, str(pipeline / file), f"({JSON_FILES[file]}) is not valid JSON",
                   "at line 3, column 19", "fix the file there")


@pytest.mark.parametrize("file,value,kind", [("transformer/config.json", [1, 2], "array"),
                                             ("model_index.json", "DiTPipeline", "string"),
                                             ("scheduler/scheduler_config.json", None, "null"),
                                             ("vae/config.json", [], "array"),
                                             ("tclab_model.json", 7, "number")])
def test_a_json_file_that_is_not_an_object_is_refused(pipeline, capfd, file, value, kind):
    """Was: AttributeError: 'list' object has no attribute 'get' (config.json), naming no file."""
    (pipeline / file).write_text(json.dumps(value))
    assert_refused(pipeline, capfd, str(pipeline / file), f"holds a JSON {kind}, but must hold a JSON object")


def test_a_config_that_is_not_utf8_is_refused(pixel, capfd):
    (pixel / "config.json").write_bytes(b'{"num_layers": 4, "name": "\xff\xfe"}')
    assert_refused(pixel, capfd, str(pixel / "config.json"), "is not UTF-8 text", "restore it")


def test_class_names_that_are_not_a_list_of_names_are_refused(pixel, capfd):
    (pixel / "tclab_model.json").write_text(json.dumps({"class_names": "cats,dogs"}))
    assert_refused(pixel, capfd, str(pixel / "tclab_model.json"), "class_names must be a list of names",
                   "'cats,dogs'")


# ---- the VAE of a DiTPipeline -----------------------------------------------------------------------

def test_a_vae_checkpoint_lacking_weights_is_refused(pipeline, capfd):
    vae = pipeline / "vae" / WEIGHTS
    edit_weights(vae, lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith("decoder.conv_out")]])
    assert_refused(pipeline, capfd, str(vae), "(AutoencoderKL)", "2 weights are missing from the checkpoint",
                   "decoder.conv_out.bias, decoder.conv_out.weight")


def test_a_vae_with_old_style_attention_names_still_loads(pipeline):
    """Checkpoints of 2022 (as the SD VAE of facebook/DiT-XL-2-256) name attention query/key/value/proj_attn;
    diffusers renames them on load, and the strict check must count them as present, not refuse them."""
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(sd):
        for k in [k for k in sd if ".attentions." in k and any(o in k for o in old)]:
            new = k
            for a, b in old.items():
                new = new.replace(a, b)
            sd[new] = sd.pop(k)

    edit_weights(pipeline / "vae" / WEIGHTS, rename)
    assert "decoder.mid_block.attentions.0.query.weight" in load_file(pipeline / "vae" / WEIGHTS)
    m = load_dit(str(pipeline))
    assert m.trained and m.meta["vae_weights_sha256"] == sha256(pipeline / "vae" / WEIGHTS)


def test_a_vae_of_other_latent_channels_is_refused(pipeline, capfd):
    from tests.standins import make_vae

    make_vae(latent_channels=8).save_pretrained(pipeline / "vae", safe_serialization=True)
    assert_refused(pipeline, capfd, str(pipeline), "the VAE makes 8-channel latents", "the transformer takes 4",
                   "use the vae/ the transformer was trained with")


def test_a_latent_pipeline_without_its_vae_is_refused(pipeline, capfd):
    """Was: loaded with the identity 'VAE', so samples were 4-channel latents passed off as images."""
    shutil.rmtree(pipeline / "vae")
    assert_refused(pipeline, capfd, str(pipeline), "has no vae/ folder", "4-channel latents", "restore vae/")


# ---- what a good load records ---------------------------------------------------------------------

def test_every_weight_comes_from_the_checkpoint(pixel):
    m = load_dit(str(pixel))
    state = load_file(pixel / WEIGHTS)
    assert m.trained and set(state) == set(m.transformer.state_dict())
    for k, v in m.transformer.state_dict().items():
        assert torch.equal(v, state[k].to(v.dtype)), k


def test_safetensors_wins_over_bin_and_only_it_is_hashed(pixel):
    """Both files present, with different weights: diffusers reads the safetensors, and so does the hash."""
    other = make_transformer(in_channels=3, learned_sigma=False, sample_size=8, seed=1)
    torch.save(other.state_dict(), pixel / "diffusion_pytorch_model.bin")
    m = load_dit(str(pixel))
    assert m.meta["weights_sha256"] == sha256(pixel / WEIGHTS) and m.identity()["weights_files"] == [WEIGHTS]
    torch.testing.assert_close(m.transformer.proj_out_2.weight, load_file(pixel / WEIGHTS)["proj_out_2.weight"])


def test_a_stray_safetensors_file_is_neither_read_nor_hashed(pixel, originals):
    shutil.copy(pixel / WEIGHTS, pixel / "backup-before-finetune.safetensors")
    edit_weights(pixel / "backup-before-finetune.safetensors", lambda sd: sd["proj_out_2.weight"].zero_())
    m = load_dit(str(pixel))
    assert m.meta["weights_sha256"] == sha256(originals["pixel"] / WEIGHTS)  # as without the stray file
    assert m.transformer.proj_out_2.weight.abs().sum() > 0


def test_a_bin_only_folder_is_hashed(pixel):
    """Was: weights_sha256 None, so its predictors and reports had no weights identity."""
    m0 = load_dit(str(pixel))
    (pixel / WEIGHTS).unlink()
    m0.transformer.save_pretrained(pixel, safe_serialization=False)
    m = load_dit(str(pixel))
    assert m.meta["weights_sha256"] == sha256(pixel / "diffusion_pytorch_model.bin")
    assert m.identity()["weights_files"] == ["diffusion_pytorch_model.bin"]


def test_a_sharded_checkpoint_reads_and_hashes_every_shard(tmp_path):
    folder = tmp_path / "sharded"
    tr = make_transformer(in_channels=3, learned_sigma=False, sample_size=8)
    tr.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(folder.glob("*-of-*.safetensors"))
    m = load_dit(str(folder))
    assert len(shards) >= 2 and m.meta["weights_sha256"] == sha256(*shards)
    assert m.identity()["weights_files"] == [s.name for s in shards]
    torch.testing.assert_close(m.transformer.state_dict(), tr.state_dict(), rtol=0, atol=0)


def test_pipeline_provenance_names_transformer_and_vae_files(pipeline):
    m = load_dit(str(pipeline))
    assert m.identity()["weights_files"] == [f"transformer/{WEIGHTS}", f"vae/{WEIGHTS}"]
    assert m.meta["weights_sha256"] == sha256(pipeline / "transformer" / WEIGHTS)
    assert m.meta["vae_weights_sha256"] == sha256(pipeline / "vae" / WEIGHTS)


def test_the_embedded_models_hash_is_its_one_weights_file():
    """The artefact store is keyed by this hash: it must not change for a folder with one weights file."""
    m = load_dit("shapes-dit")
    assert m.trained and m.meta["weights_sha256"] == sha256(EMBEDDED_DIR / "transformer" / WEIGHTS)
