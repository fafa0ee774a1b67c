"""train-dit: a short run exports a loadable model; --init-from starts from an exported model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tclab.models import EMBEDDED_DIR, load_dit
from tclab.train_dit import TrainDiTConfig, train_dit


def _weights(folder):
    return load_file(str(next((folder / "transformer").glob("*.safetensors"))))


def test_init_from_starts_at_the_shipped_weights(tmp_path):
    # lr 0: the optimiser changes nothing, so the export must equal the model it started from.
    cfg = TrainDiTConfig(images="data/shapes", out=str(tmp_path / "m"), steps=1, batch_size=2, lr=0.0,
                         init_from=str(EMBEDDED_DIR))
    out = train_dit(cfg, progress=False)
    a, b = _weights(out), _weights(EMBEDDED_DIR)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_dit(str(out)).class_names == load_dit("shapes-dit").class_names
    meta, parent = (json.loads((f / "tclab_model.json").read_text()) for f in (out, EMBEDDED_DIR))
    assert meta["init_model"]["train_config"] == parent["train_config"]
    assert meta["total_steps"] == parent.get("total_steps", parent["steps"]) + 1
    assert meta["init_model"]["weights_sha256"] == load_dit("shapes-dit").meta["weights_sha256"]



def test_cli_lr_reaches_the_optimiser(tmp_path, capsys):
    # --lr 0 from the shipped weights must export them unchanged; the 3e-4 default would move them.
    from tclab.cli import main

    out = tmp_path / "m"
    assert main(["train-dit", "--images", "data/shapes", "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--lr", "0", "--init-from", str(EMBEDDED_DIR)]) == 0
    a, b = _weights(out), _weights(EMBEDDED_DIR)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "tclab_model.json").read_text())["train_config"]["lr"] == 0.0

def test_short_run_from_scratch_differs_and_exports_atomically(tmp_path):
    out = train_dit(TrainDiTConfig(images="data/shapes", out=str(tmp_path / "m"), steps=2, batch_size=2),
                    progress=False)
    a, b = _weights(out), _weights(EMBEDDED_DIR)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.training", "m"]  # no staging leftovers


def test_init_from_refuses_a_mismatched_target(tmp_path):
    with pytest.raises(ValueError, match="trained for 'v_prediction'"):
        train_dit(TrainDiTConfig(images="data/shapes", out=str(tmp_path / "m"), steps=1, batch_size=2,
                                 init_from=str(EMBEDDED_DIR), prediction_type="epsilon"), progress=False)


def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    from tclab.train_dit import lr_at

    cfg = TrainDiTConfig(steps=1000, lr=1e-3, warmup=100, cooldown=400)
    assert lr_at(cfg, 0) == pytest.approx(1e-5)
    assert lr_at(cfg, 99) == lr_at(cfg, 600) == pytest.approx(1e-3)
    assert lr_at(cfg, 800) == pytest.approx(0.5e-3)
    assert lr_at(cfg, 999) == pytest.approx(1e-3 / 400) and lr_at(cfg, 1000) == 0.0
    assert lr_at(TrainDiTConfig(steps=1000, lr=1e-3, warmup=100), 999) == pytest.approx(1e-3)  # no cool-down
    with pytest.raises(ValueError, match="cooldown=-1"):
        lr_at(TrainDiTConfig(cooldown=-1), 0)
    with pytest.raises(ValueError, match="lr=-0.001"):
        lr_at(TrainDiTConfig(lr=-1e-3), 0)


def test_bad_learning_rate_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="lr=-0.001"):
        train_dit(TrainDiTConfig(images="data/shapes", out=str(tmp_path / "m"), lr=-1e-3), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_min_snr_weights_cap_the_clean_timesteps_and_leave_noisy_ones_whole():
    from tclab.train_dit import loss_weights

    acp = torch.tensor([0.999, 5 / 6, 0.5, 0.01])  # SNR 999, 5, 1, ~0.0101
    assert torch.equal(loss_weights(acp, "v_prediction", None), torch.ones(4))
    w = loss_weights(acp, "v_prediction", 5.0)
    snr = acp / (1 - acp)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert w[0] < 0.01 and w[1] == pytest.approx(5 / 6) and w[2] == pytest.approx(0.5)
    assert torch.allclose(loss_weights(acp, "epsilon", 5.0)[1:], torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="snr_gamma=0"):
        loss_weights(acp, "v_prediction", 0)


def test_min_snr_run_records_gamma(tmp_path):
    out = train_dit(TrainDiTConfig(images="data/shapes", out=str(tmp_path / "m"), steps=2, batch_size=2,
                                   snr_gamma=5.0), progress=False)
    assert json.loads((out / "tclab_model.json").read_text())["train_config"]["snr_gamma"] == 5.0


def test_resumed_run_keeps_the_lineage_of_the_weights_it_started_from(tmp_path):
    # --init-from A, interrupted, then A is replaced (e.g. by an export of this very run): the export
    # must still name the weights the run started from, as read when they were loaded.
    import shutil

    start = tmp_path / "start"
    shutil.copytree(EMBEDDED_DIR, start)
    original = json.loads((start / "tclab_model.json").read_text())
    cfg = dict(images="data/shapes", out=str(tmp_path / "m"), batch_size=2, init_from=str(start), checkpoint_every=1)
    train_dit(TrainDiTConfig(steps=1, **cfg), progress=False)
    (start / "tclab_model.json").write_text(json.dumps({**original, "steps": 999, "total_steps": 999}))
    out = train_dit(TrainDiTConfig(steps=2, **cfg), resume=True, progress=False)
    meta = json.loads((out / "tclab_model.json").read_text())
    assert meta["init_model"]["steps"] == original["steps"]
    assert meta["total_steps"] == original.get("total_steps", original["steps"]) + 2


def test_timestep_sampling_uniform_is_unchanged_and_the_mix_moves_draws_to_middle_noise():
    from tclab.models import default_scheduler_config
    from tclab.train_dit import _alphas_cumprod, sample_timesteps

    acp = _alphas_cumprod(default_scheduler_config())
    # uniform draws exactly what the loop drew before the option existed (shipped runs resume unchanged)
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_timesteps("uniform", acp, 64, a), torch.randint(0, 1000, (64,), generator=b))
    t = sample_timesteps("lognormal-mix", acp, 20000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    sigma = ((1 - acp[t]) / acp[t]).sqrt()
    assert 0.62 < (t < 500).float().mean() < 0.72  # uniform: 0.50
    assert 0.22 < (sigma > 5).float().mean() < 0.30  # uniform: 0.43
    with pytest.raises(ValueError, match="t_sampling='cosine'"):
        sample_timesteps("cosine", acp, 1, torch.Generator())


def test_lognormal_mix_maps_a_noise_level_to_its_nearest_timestep(monkeypatch):
    from tclab import train_dit as td
    from tclab.models import default_scheduler_config

    acp = td._alphas_cumprod(default_scheduler_config())
    sigmas = ((1 - acp) / acp).sqrt()
    target = 400
    # ln sigma drawn exactly at timestep 400's level (std 0), every sample from the log-normal half
    monkeypatch.setattr(td, "LOGNORMAL_MEAN", float(sigmas[target].log()))
    monkeypatch.setattr(td, "LOGNORMAL_STD", 0.0)
    g = torch.Generator().manual_seed(0)
    t = td.sample_timesteps("lognormal-mix", acp, 4000, g)
    mixed = t[t == target].numel() / t.numel()
    assert 0.45 < mixed < 0.56  # half the draws (plus uniform's 1/1000 chance)


def test_bad_t_sampling_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="t_sampling='edm'"):
        train_dit(TrainDiTConfig(images="data/shapes", out=str(tmp_path / "m"), t_sampling="edm"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_t_sampling_is_recorded(tmp_path):
    from tclab.cli import main

    out = tmp_path / "m"
    assert main(["train-dit", "--images", "data/shapes", "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--t-sampling", "lognormal-mix"]) == 0
    assert json.loads((out / "tclab_model.json").read_text())["train_config"]["t_sampling"] == "lognormal-mix"
