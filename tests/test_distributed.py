"""Scale-out on torchrun (``tclab.distributed``): 1 rank = 2 ranks (gloo, CPU) for ``sample --npz`` and for a
sweep's quality columns, a killed rank fails the run without a merged result, and ``--resume`` finishes it
with the same file as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tclab.distributed import ShardFolder, World, my_units, shard_bounds, write_atomic
from tests.standins import imagenet_like_labels, write_latent_pipeline

NPZ_ARGS = ["--steps", "4", "--batch-size", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory) -> Path:
    """A latent DiTPipeline folder (AutoencoderKL, 1000 ImageNet-like classes): unlike the embedded model."""
    return write_latent_pipeline(tmp_path_factory.mktemp("model") / "team-dit", id2label=imagenet_like_labels())


def _tclab(*args, cwd, check=True, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "tclab", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def test_units_are_dealt_round_robin_and_shards_cover_every_sample():
    assert [my_units(5, World(rank=r, world_size=2)) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert shard_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="shard size"):
        shard_bounds(4, 0)


def test_a_shard_folder_resumes_only_the_same_plan(tmp_path):
    folder, world = ShardFolder(tmp_path / "s"), World()
    folder.start({"units": 3, "seed": 1}, world, resume=False)
    folder.write(1, {"x": torch.ones(2)})
    assert folder.done() == {1} and folder.missing(3) == [0, 2]
    with pytest.raises(ValueError, match="pass --resume to continue"):
        folder.start({"units": 3, "seed": 1}, world, resume=False)
    with pytest.raises(ValueError, match=r"other settings \(seed differ\)"):
        folder.start({"units": 3, "seed": 2}, world, resume=True)
    folder.start({"units": 3, "seed": 1}, world, resume=True)
    assert torch.equal(folder.read(1)["x"], torch.ones(2))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("a team's file")
    with pytest.raises(ValueError, match="not a tclab shard folder"):
        ShardFolder(tmp_path / "other").start({"units": 1}, world, resume=False)
    assert (tmp_path / "other" / "keep.txt").read_text() == "a team's file"


def test_an_interrupted_atomic_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "unit.pt"
    target.write_bytes(b"old")

    def half(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["unit.pt"]


def test_sample_npz_is_byte_identical_at_one_and_two_ranks(latent_model, tmp_path):
    _tclab("sample", "--model", str(latent_model), "--num-samples", "6", *NPZ_ARGS, "--npz", "one.npz", cwd=tmp_path)
    _tclab("sample", "--model", str(latent_model), "--num-samples", "6", *NPZ_ARGS, "--npz", "two.npz",
           "--workers", "2", cwd=tmp_path)
    (a, la), (b, lb) = _npz(tmp_path / "one.npz"), _npz(tmp_path / "two.npz")
    assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3)   # the ADM evaluator's layout: NHWC uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb) and la.tolist() == [0, 1, 2, 3, 4, 5]
    assert a.std() > 0   # real images, not a constant
    one, two = (json.loads((tmp_path / f"{n}.npz.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"], two["backend"], len(two["devices"])) == (1, 2, "gloo", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "one.npz.json", "two.npz", "two.npz.json"]
    # sample i depends on the seed and i only: the first 4 of a 6-sample run are a 4-sample run
    _tclab("sample", "--model", str(latent_model), "--num-samples", "4", *NPZ_ARGS, "--npz", "four.npz", cwd=tmp_path)
    assert np.array_equal(_npz(tmp_path / "four.npz")[0], a[:4])
    # another batch size changes the CPU kernels' float rounding, not the samples: at most one level of 255
    _tclab("sample", "--model", str(latent_model), "--num-samples", "6", "--steps", "4", "--batch-size", "3",
           "--seed", "7", "--npz", "b3.npz", cwd=tmp_path)
    assert np.abs(_npz(tmp_path / "b3.npz")[0].astype(int) - a).max() <= 1


def test_sample_npz_never_overwrites_and_names_its_options(tmp_path, monkeypatch, capsys):
    from tclab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.npz").write_bytes(b"a good result")
    assert main(["sample", "--num-samples", "2", "--steps", "2", "--npz", "s.npz"]) == 2
    assert "never overwritten" in capsys.readouterr().err and (tmp_path / "s.npz").read_bytes() == b"a good result"
    assert main(["sample", "--num-samples", "2", "--npz", "s.png"]) == 2
    assert "ending in .npz" in capsys.readouterr().err
    assert main(["sample", "--num-samples", "2", "--workers", "2"]) == 2
    assert "go with --npz" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker ``rank`` (a process below the launcher whose environment says RANK=rank)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and str(launcher.pid) in \
                _ancestors(int(proc.name)):
            return int(proc.name)
    return None


def _ancestors(pid: int) -> list[str]:
    out = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        out.append(str(pid))
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker's pid through /proc (Linux)")
def test_killing_a_rank_fails_the_run_and_resume_gives_the_uninterrupted_file(latent_model, tmp_path):
    args = ["sample", "--model", str(latent_model), "--num-samples", "24", "--steps", "8", "--batch-size", "1",
            "--seed", "3"]
    _tclab(*args, "--npz", "whole.npz", cwd=tmp_path)
    launcher = subprocess.Popen([sys.executable, "-m", "tclab", *args, "--npz", "cut.npz", "--workers", "2"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shards = tmp_path / "cut.npz.shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("unit-*.pt"))) < 2:
        time.sleep(0.05)
    pid = _worker_pid(launcher, 1)
    assert pid is not None, "rank 1 was not found running"
    os.kill(pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    done = len(list(shards.glob("unit-*.pt")))
    assert 2 <= done < 24, f"the kill came too late to be mid-run ({done} of 24 shards done)"
    assert launcher.returncode == 1
    assert "worker rank 1 was killed by SIGKILL" in err and "its log: " in err and "resume" in err
    log = Path(err.split("its log: ")[1].split(";")[0])
    assert log.is_file() and log.parent.name == "1"
    assert not (tmp_path / "cut.npz").exists()   # nothing merged that looks complete
    _tclab(*args, "--npz", "cut.npz", "--workers", "2", "--resume", cwd=tmp_path)
    whole, cut = _npz(tmp_path / "whole.npz"), _npz(tmp_path / "cut.npz")
    assert np.array_equal(whole[0], cut[0]) and np.array_equal(whole[1], cut[1])
    assert not shards.exists()


def test_a_sweeps_quality_columns_are_identical_at_one_and_two_workers():
    from tclab.ablation import SweepSettings, predictor_variants, reference_variants, run_sweep
    from tclab.classifier import SHIPPED_CLASSIFIER, ShapesClassifier
    from tclab.models import load_dit

    model = load_dit("shapes-dit")
    # 6 samples in shards of 4: each variant is two units, so the ranks share every variant's samples
    settings = SweepSettings(num_steps=6, quality_samples=6, quality_batch=4, timing_batch=2, timing_repeats=1,
                             noise_pairs=2)
    variants = [*predictor_variants(["random", "prev-change"], [0.5]), *reference_variants(6, (2,), (3,), peers=[])]
    clf = ShapesClassifier.load(SHIPPED_CLASSIFIER)
    one, two = (run_sweep(model, variants, settings, classifier=clf, workers=w, progress=False) for w in (1, 2))
    quality = ["name", "flop_ratio", "gflops_per_image", "psnr", "psnr_ci_low", "psnr_ci_high", "ssim", "mse",
               "class_consistency", "class_consistency_ci_low", "error"]
    assert one.frame[quality].equals(two.frame[quality])
    assert all(torch.equal(one.images[n], two.images[n]) for n in one.images) and len(one.images) == 5
    assert one.frame["psnr"].iloc[1:].between(5, 99).all()   # real comparisons, not full compute against itself
    assert two.world["world_size"] == 2 and two.world["backend"] == "gloo" and one.world["world_size"] == 1
    assert two.frame["time_ratio"].notna().all() and set(two.timings) == set(one.timings)


def test_a_failing_point_is_kept_with_its_error_on_workers():
    from tclab.ablation import SweepSettings, Variant, run_sweep
    from tclab.models import load_dit

    # the point fails when it runs (its predictor file is not there), in a worker: kept as a row with its error
    bad = Variant("missing predictor", "learned-static",
                  cache={"scorer": "learned-static", "rho": 0.5,
                         "scorer_options": {"path": "/nonexistent/predictor.safetensors"}})
    settings = SweepSettings(num_steps=3, quality_samples=2, quality_batch=2, timing_batch=1, timing_repeats=1,
                             noise_pairs=1)
    result = run_sweep(load_dit("shapes-dit"), [bad], settings, workers=2, progress=False)
    row = result.frame.set_index("name").loc["missing predictor"]
    assert "nonexistent" in row["error"] and np.isnan(row["psnr"])
    assert result.frame.set_index("name").loc["full compute", "error"] == ""


def test_evaluate_gives_the_same_class_consistency_at_one_and_two_ranks(tmp_path):
    args = ["evaluate", "--num-samples", "12", "--steps", "4", "--batch-size", "4", "--out"]
    _tclab(*args, "one", cwd=tmp_path)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tclab", *args, "two"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (one,), (two,) = (list((tmp_path / d).glob("*/result.json")) for d in ("one", "two"))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["class_consistency"], a["per_class"], a["n"]) == (b["class_consistency"], b["per_class"], b["n"])
    assert a["n"] == 12 and (a["world_size"], b["world_size"], b["backend"]) == (1, 2, "gloo")
    assert (one.parent / "grid.png").stat().st_size > 0 and (two.parent / "grid.png").stat().st_size > 0


def test_a_record_streamed_by_two_ranks_reads_back_as_one_ranks(latent_model, tmp_path):
    from tclab.record import open_record

    args = ["record", "--model", str(latent_model), "--num-samples", "5", "--steps", "3", "--batch-size", "2"]
    _tclab(*args, "--out", "one", cwd=tmp_path)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tclab", *args, "--out", "two"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = open_record(tmp_path / "one"), open_record(tmp_path / "two")
    assert (one.ranks, two.ranks, len(two.chunks)) == ([0], [0, 1], 3)   # shards [0, 2), [2, 4), [4, 5)
    assert one.select() == two.select() and one.num_samples == 5
    assert np.isfinite(one.select().update_change[1:]).all()
    # resumed over a finished store: nothing is recorded twice
    _tclab(*args, "--out", "two", "--resume", cwd=tmp_path)
    assert len(open_record(tmp_path / "two").chunks) == 3
    refused = _tclab(*args, "--out", "two", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr


def test_fid_and_kid_of_npz_files_are_the_same_at_one_and_two_ranks(tmp_path):
    from tclab.evaluate import npz_images, npz_length
    from tclab.metrics import export_adm_npz

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (150, 32, 32, 3), dtype=np.uint8)
    export_adm_npz(ref, tmp_path / "ref.npz")
    export_adm_npz(np.clip(ref[:140].astype(int) + rng.integers(-40, 40, (140, 32, 32, 3)), 0, 255).astype(np.uint8),
                   tmp_path / "samples.npz")
    # read in parts, without the rest of the file: the same rows as a whole load
    assert npz_length(tmp_path / "ref.npz") == 150
    part = npz_images(tmp_path / "ref.npz", 37, 41)
    assert part.shape == (4, 3, 32, 32) and torch.equal(part, torch.from_numpy(ref[37:41]).permute(0, 3, 1, 2).float()
                                                        / 127.5 - 1)
    args = ["evaluate", "--fid", "samples.npz", "--reference", "ref.npz", "--batch-size", "32"]
    _tclab(*args, "--out", "one", cwd=tmp_path)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tclab", *args, "--out", "two"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (a,), (b,) = ([json.loads(p.read_text()) for p in (tmp_path / d).glob("*/result.json")] for d in ("one", "two"))
    assert a["fid"] == b["fid"] and a["kid"] == b["kid"] and a["fid"] > 0 and (a["n_samples"], a["n_reference"]) == (140, 150)
    assert "NOT comparable" in a["extractor"]["name"] and (a["world_size"], b["world_size"]) == (1, 2)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=ref)
    refused = _tclab("evaluate", "--fid", "packed.npz", "--reference", "ref.npz", "--out", "x", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "compressed" in refused.stderr and not (tmp_path / "x").exists()
