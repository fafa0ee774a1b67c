"""Distribution metrics (FID, KID), feature extractors and the ADM evaluator export, on known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tclab.data import load_image_folder
from tclab.features import (ClassifierFeatures, FeatureExtractor, FIDInceptionV3, InceptionV3Features,
                            load_inception_weights)
from tclab.metrics import (distribution_quality, export_adm_npz, feature_statistics, frechet_distance,
                           frechet_distance_from_statistics, kernel_inception_distance)

SHAPES = Path(__file__).resolve().parents[1] / "data" / "shapes"


# ---- FID --------------------------------------------------------------------------------------

def test_fid_of_identical_gaussian_statistics_is_exactly_zero():
    mu, sigma = np.array([1.0, -2.0, 3.0]), np.diag([0.5, 2.0, 4.0])
    assert frechet_distance_from_statistics(mu, sigma, mu, sigma) == 0.0


def test_fid_of_diagonal_gaussians_matches_the_closed_form():
    # diagonal covariances commute, so Tr(sqrt(S1 S2)) = sum sqrt(s1_i s2_i) and
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.0, 3.0])
    s1, s2 = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()   # 1+0+4+16 + 1+1+0+0.25
    assert expected == pytest.approx(23.25)
    assert frechet_distance_from_statistics(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_full_covariance_against_a_rotated_copy():
    # a rotation R keeps the eigenvalues: S2 = R S1 R^T. For 2x2 with S1 = diag(a, b) and a 90 degree
    # rotation, S2 = diag(b, a): back to the diagonal closed form.
    a, b = 3.0, 0.5
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    s2 = rot @ np.diag([a, b]) @ rot.T
    expected = 2 * (np.sqrt(a) - np.sqrt(b)) ** 2
    assert frechet_distance_from_statistics(np.zeros(2), np.diag([a, b]), np.zeros(2), s2) == pytest.approx(expected)


def test_fid_of_a_set_against_itself_is_about_zero_and_grows_with_a_shift():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(frechet_distance(f, f)) < 1e-6
    mu, sigma = feature_statistics(f)
    assert mu.shape == (16,) and sigma.shape == (16, 16)
    # shifting every feature by 0.5 adds |shift|^2 = 16 * 0.25 = 4 and nothing else
    assert frechet_distance(f, f + 0.5) == pytest.approx(4.0, abs=1e-6)


def test_fid_handles_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))   # singular covariances
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 0


def test_fid_refuses_mismatched_features():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros((5, 3)) + np.arange(3), np.random.default_rng(0).normal(size=(5, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(5), np.zeros(5))


# ---- KID --------------------------------------------------------------------------------------

def test_kid_is_about_zero_for_a_set_against_itself_and_larger_for_a_shifted_set():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 8))
    same = kernel_inception_distance(f, rng.permutation(f), subsets=20, subset_size=100, seed=0)
    shifted = kernel_inception_distance(f, f + 1.0, subsets=20, subset_size=100, seed=0)
    assert abs(same["mean"]) < 0.05 * shifted["mean"]
    assert shifted["mean"] > 10 * same["std"] and shifted["std"] >= 0
    assert same["subsets"] == 20 and same["subset_size"] == 100


def test_kid_of_a_single_subset_matches_a_hand_computation():
    # m = 2, D = 1: k(x, y) = (xy + 1)^3. a = {0, 1}, b = {1, 2}.
    # mean_{i!=j} k(a) = k(0,1) = 1; mean_{i!=j} k(b) = k(1,2) = 27;
    # mean k(a, b) = (k(0,1) + k(0,2) + k(1,1) + k(1,2)) / 4 = (1 + 1 + 8 + 27) / 4 = 9.25
    a, b = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    r = kernel_inception_distance(a, b, subsets=1, subset_size=2)
    assert r["mean"] == pytest.approx(1 + 27 - 2 * 9.25) and r["std"] == 0.0


def test_kid_caps_the_subset_size_at_the_smaller_set_and_is_seeded():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(50, 4))
    r1 = kernel_inception_distance(a, b, subsets=5, subset_size=1000, seed=3)
    assert r1["subset_size"] == 30
    assert r1 == kernel_inception_distance(a, b, subsets=5, subset_size=1000, seed=3)


# ---- ADM evaluator export ---------------------------------------------------------------------

def test_adm_npz_round_trip(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 8, 6) * 2 - 1
    images[0, :, 0, 0] = torch.tensor([-1.0, 0.0, 1.0])
    path = export_adm_npz(images, tmp_path / "sub" / "samples.npz", labels=torch.arange(5))
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        arr = z["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (5, 8, 6, 3)       # NHWC, as the evaluator reads it
        assert arr[0, 0, 0].tolist() == [0, 128, 255]                   # -1 -> 0, 0 -> 127.5 -> 128, 1 -> 255
        expected = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(arr, expected)
        assert z["arr_1"].tolist() == [0, 1, 2, 3, 4]
    # uint8 NHWC passes through unchanged, without labels
    again = export_adm_npz(arr, tmp_path / "ref.npz")
    with np.load(again) as z:
        assert z.files == ["arr_0"] and np.array_equal(z["arr_0"], arr)
    with pytest.raises(ValueError, match=r"\*\.npz"):
        export_adm_npz(images, tmp_path / "samples.bin")


# ---- feature extractors -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_set():
    return load_image_folder(SHAPES, 32)


def test_classifier_features_separate_real_images_from_shuffled_noise(shapes_set):
    ext = ClassifierFeatures()
    assert isinstance(ext, FeatureExtractor) and ext.comparable_to_published is False
    assert "NOT comparable to published FID" in ext.name
    real = shapes_set.images                                        # (300, 3, 32, 32), class-sorted
    half_a, half_b = real[0::2], real[1::2]                         # two class-balanced halves
    gen = torch.Generator().manual_seed(0)
    flat = real.flatten(2)                                          # same pixels, positions shuffled per image
    noise = torch.stack([f[:, torch.randperm(f.shape[1], generator=gen)] for f in flat]).view_as(real)

    fa = ext(half_a)
    assert fa.shape == (150, 128) and fa.dtype == np.float64
    fid_real = frechet_distance(fa, ext(half_b))
    fid_noise = frechet_distance(fa, ext(noise))
    assert fid_real * 10 < fid_noise, (fid_real, fid_noise)

    q = distribution_quality(half_a, half_b, ext, kid_subsets=10, kid_subset_size=100)
    qn = distribution_quality(half_a, ext(noise), ext, kid_subsets=10, kid_subset_size=100)  # precomputed features
    assert q["fid"] == pytest.approx(fid_real)
    assert q["kid_mean"] < qn["kid_mean"] and qn["fid"] == pytest.approx(fid_noise)
    assert q["extractor"] == ext.name and q["comparable_to_published"] is False
    assert "never with published" in q["note"]
    assert q["n_images"] == 150 and q["n_reference"] == 150 and q["feature_dim"] == 128
    assert len(q["extractor_identity"]["weights_sha256"]) == 64


def test_extractor_refuses_the_wrong_image_layout():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ClassifierFeatures()(torch.zeros(2, 32, 32, 3))


def test_inception_weights_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads.*pt_inception-2015-12-05"):
        InceptionV3Features(tmp_path / "nope.pth")


def test_inception_weights_with_the_wrong_layout_are_refused(tmp_path):
    p = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="not the pytorch-fid FID Inception layout"):
        load_inception_weights(p)


def test_fid_inception_architecture_matches_the_published_network():
    # torchvision's inception_v3 has 27,161,264 parameters; without its aux classifier (3,326,696)
    # and 1000-class head (2,049,000) the backbone the FID features come from has 21,785,568.
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == 21_785_568
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in net.state_dict()   # pytorch-fid tensor names


def test_inception_features_load_local_weights_and_give_2048_dims(tmp_path):
    # the real weights are not in the repository; a round trip through both accepted formats proves
    # the loader and the preprocessing path (random weights, so the values themselves mean nothing)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = FIDInceptionV3().eval()
    state = {**ref.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    f_pth = InceptionV3Features(tmp_path / "w.pth")(images)
    f_st = InceptionV3Features(tmp_path / "w.safetensors")(images)
    assert f_pth.shape == (2, 2048) and f_pth.dtype == np.float64
    np.testing.assert_allclose(f_pth, f_st)
    ext = InceptionV3Features(tmp_path / "w.pth")
    assert ext.comparable_to_published is True and ext.identity()["weights_sha256"]
