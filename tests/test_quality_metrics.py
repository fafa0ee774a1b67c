"""Distribution metrics (FID, KID), feature extractors and the ADM evaluator export, on known values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tclab.data import load_image_folder
from tclab.features import (ClassifierFeatures, FeatureExtractor, FIDInceptionV3, InceptionV3Features,
                            load_inception_weights)
from tclab.metrics import (FID_FLOOR_RULE, distribution_quality, export_adm_npz, feature_statistics,
                           fid_floor_reason, fid_min_images, frechet_distance, frechet_distance_from_statistics,
                           kernel_inception_distance)

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


# ---- the FID floor, KID's spread, and how sweeps and reports carry them -----------------------------

class FirstPixels(FeatureExtractor):
    """Features = the first ``dim`` values of each image: a D you choose, so the floor is known."""

    def __init__(self, dim: int):
        self.dim, self.name = dim, f"first-{dim}-pixels"

    def _features(self, batch):
        return batch.flatten(1)[:, : self.dim]                      # (B, dim)


def test_the_fid_floor_is_the_feature_dimension_plus_one():
    # the N - 1 sample covariance of N vectors has rank <= N - 1: full rank in D dims needs N >= D + 1
    assert fid_min_images(128) == 129 and fid_min_images(2048) == 2049 and fid_min_images(1) == 2
    assert "feature dimension + 1" in FID_FLOOR_RULE
    f = np.random.default_rng(0).normal(size=(9, 8))
    assert np.linalg.matrix_rank(np.cov(f[:8], rowvar=False)) == 7            # N = D: singular
    assert np.linalg.matrix_rank(np.cov(f, rowvar=False)) == 8                # N = D + 1: full rank
    assert fid_floor_reason(129, 129, 128) is None
    assert fid_floor_reason(128, 500, 128).startswith("not computed: 128 images, needs at least 129")
    assert fid_floor_reason(500, 40, 128).startswith("not computed: 40 reference images, needs at least 129")
    assert fid_floor_reason(6, 40, 128).startswith("not computed: 6 images and 40 reference images, needs at least 129")
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="positive integer"):
            fid_min_images(bad)


def test_distribution_quality_below_the_floor_gives_none_with_the_reason():
    torch.manual_seed(0)
    ref = np.random.default_rng(0).normal(size=(50, 4))              # (M, D) precomputed, D = 4: floor 5
    q = distribution_quality(torch.randn(4, 3, 2, 2), ref, FirstPixels(4), kid_subsets=10)
    assert q["fid"] is None and q["fid_min_images"] == 5
    assert q["fid_reason"].startswith("not computed: 4 images, needs at least 5")
    assert "feature dimension + 1" in q["fid_reason"]
    assert (q["n_images"], q["n_reference"], q["feature_dim"], q["extractor"]) == (4, 50, 4, "first-4-pixels")
    assert np.isfinite(q["kid_mean"]) and q["kid_std"] >= 0                   # KID has no such floor

    at_floor = distribution_quality(torch.randn(5, 3, 2, 2), ref, FirstPixels(4), kid_subsets=10)
    assert at_floor["fid_reason"] is None
    assert isinstance(at_floor["fid"], float) and np.isfinite(at_floor["fid"]) and at_floor["fid"] >= 0

    small_ref = distribution_quality(torch.randn(20, 3, 2, 2), ref[:3], FirstPixels(4), kid_subsets=10)
    assert small_ref["fid"] is None and small_ref["fid_reason"].startswith("not computed: 3 reference images")


def test_kid_std_over_two_subsets_matches_a_hand_computation():
    # a = {0, 1} (always the whole set), b = {1, 2, 2}, m = 2, D = 1, k(x, y) = (xy + 1)^3.
    # b-subset {1, 2}: MMD^2 = k(0,1) + k(1,2) - 2 (1 + 1 + 8 + 27) / 4 = 1 + 27 - 18.5 = 9.5
    # b-subset {2, 2}: MMD^2 = k(0,1) + k(2,2) - 2 (1 + 1 + 27 + 27) / 4 = 1 + 125 - 28 = 98
    # over 2 subsets: (mean, population std) is (9.5, 0), (98, 0) or, one of each, (53.75, 44.25)
    a, b = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0], [2.0]])
    outcomes = {(9.5, 0.0), (98.0, 0.0), (53.75, 44.25)}
    got = [kernel_inception_distance(a, b, subsets=2, subset_size=2, seed=s) for s in range(12)]
    assert all((round(r["mean"], 9), round(r["std"], 9)) in outcomes for r in got), got
    assert any(r["std"] == pytest.approx(44.25) and r["mean"] == pytest.approx(53.75) for r in got)


def test_kid_std_is_non_negative_and_shrinks_with_larger_subsets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8)) + 0.3
    small = kernel_inception_distance(a, b, subsets=30, subset_size=20, seed=0)
    large = kernel_inception_distance(a, b, subsets=30, subset_size=500, seed=0)
    assert 0 <= large["std"] and large["std"] * 2 < small["std"], (small, large)


@pytest.fixture(scope="module")
def sweep_below_the_floor():
    """A sweep on the tiny DiT with 3 samples and 4-d features (floor 5): FID refused, KID measured."""
    from tests.conftest import tiny_transformer
    from tclab import ablation as A
    from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config

    model = LoadedDiT(name="tiny-pixel", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                      scheduler_config=default_scheduler_config(), trained=False, source="test",
                      class_names=["a", "b", "c"])
    settings = A.SweepSettings(num_steps=4, quality_samples=3, timing_batch=1, timing_repeats=1, guidance_scale=2.0)
    variants = A.reference_variants(4, fora_intervals=[2], fewer_steps=[], peers=[])
    torch.manual_seed(0)
    return A.run_sweep(model, variants, settings, extractor=FirstPixels(4), reference_images=torch.rand(40, 3, 8, 8),
                       progress=False)


def test_sweep_frame_and_table_say_fid_was_not_computed(sweep_below_the_floor):
    from tclab import ablation as A

    f = sweep_below_the_floor.frame
    assert len(f) == 2 and (f["error"] == "").all()
    assert f["fid"].isna().all()                                     # NaN, never a fake number
    assert f["fid_reason"].str.startswith("not computed: 3 images, needs at least 5").all()
    assert (f["fid_n"] == 3).all() and (f["fid_n_reference"] == 40).all() and (f["fid_min_images"] == 5).all()
    assert (f["fid_extractor"] == "first-4-pixels").all()
    assert np.isfinite(f["kid"]).all() and (f["kid_std"] >= 0).all() and (f["kid_subset_size"] == 3).all()
    t = A.table(f)
    assert t["fid"].tolist() == ["not computed: 3 images, needs at least 5"] * 2
    assert "kid_std" in t and (t["fid_n"] == 3).all()
    points = A.summarise_sweep(sweep_below_the_floor, budget=0.9, reductions=(1.5,))["points"]
    assert all(p["fid"] is None and p["fid_reason"].startswith("not computed") for p in points)


def test_distribution_figures_state_n_and_the_feature_extractor(sweep_below_the_floor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tclab import plots

    f = sweep_below_the_floor.frame
    caption = plots.distribution_caption(f)
    assert "N = 3 images per point vs 40 reference" in caption and "features: first-4-pixels" in caption
    assert "FID not computed: 3 images, needs at least 5" in caption
    fig = plots.plot_pareto(f, "flop_ratio", "kid")
    assert any(caption == t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    assert plots.distribution_caption(f.drop(columns=["fid_n"])) is None      # a sweep without FID/KID
    with pytest.raises(ValueError, match="FID not computed: 3 images, needs at least 5"):
        plots.plot_pareto_grid(f, qualities=("fid",))
