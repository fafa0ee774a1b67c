"""Parity of tclab's metrics with the reference implementations, on random tensors and on real images.

References (the ``parity`` extra, and two packages installed with ``--no-deps``, see ``REFERENCES``):

- PSNR: ``skimage.metrics.peak_signal_noise_ratio`` and torchmetrics' ``peak_signal_noise_ratio``;
- SSIM: ``skimage.metrics.structural_similarity`` (Gaussian weights, sigma 1.5, population
  covariances), ``pytorch_msssim.ssim`` and torchmetrics' ``structural_similarity_index_measure``;
- FID's Frechet term: torch-fidelity's ``fid_statistics_to_metric`` and torchmetrics'
  ``FrechetInceptionDistance`` fed the same features;
- KID: torch-fidelity's ``kid_features_to_metric`` and torchmetrics' ``KernelInceptionDistance``,
  on the whole sets and on the same random subsets;
- the FID InceptionV3: torch-fidelity's ``FeatureExtractorInceptionV3`` with the same random
  weights (written to tmp_path; nothing is downloaded). LPIPS: tests/test_lpips.py.

"Real images" are the stand-in image set ``data/shapes`` (300 PNGs, 32 px) and perturbed copies.

torch-fidelity's metadata asks for torchvision (which would pull a CUDA torch); the modules used
here need none of it, but its package ``__init__`` imports torchvision's datasets, transforms and
models. So it is imported behind an empty stand-in ``torchvision`` (as tests/test_lpips.py does for
lpips), which is removed again before torchmetrics is imported: torchmetrics then finds the
torch-fidelity already imported and no torchvision. The torch_fidelity, torchmetrics and stand-in
modules leave ``sys.modules`` again at the end of the file. A missing reference skips, with the command that installs
it; under ``CI=true`` it fails (``tests.conftest.require_reference``).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tclab.data import images_to_uint8, load_image_folder
from tclab.features import ClassifierFeatures, FIDInceptionV3, InceptionV3Features
from tclab.metrics import frechet_distance, kernel_inception_distance, psnr, ssim
from tests.conftest import require_reference

SHAPES = Path(__file__).resolve().parents[1] / "data" / "shapes"

#: import name -> the command that installs the pinned reference (what the skip/failure message says).
REFERENCES = {
    "skimage": 'pip install scikit-image==0.26.0  (or: pip install -e ".[parity]")',
    "pytorch_msssim": 'pip install pytorch-msssim==1.0.0  (or: pip install -e ".[parity]")',
    "torchmetrics": 'pip install torchmetrics==1.9.0  (or: pip install -e ".[parity]")',
    "torch_fidelity": "pip install --no-deps torch-fidelity==0.4.0",
}
_STANDIN_ROOTS = ("torchvision", "torch_fidelity", "torchmetrics")


def reference(module: str) -> None:
    """Skip (fail under CI=true) when ``module`` is not installed; the caller imports it."""
    require_reference(module, REFERENCES[module])


# ---- importing torch-fidelity and torchmetrics behind a stand-in torchvision ---------------------------------

def _torchvision_standin() -> dict[str, types.ModuleType]:
    """Empty modules under the names torch-fidelity's ``__init__`` imports (datasets, transforms, models)."""
    mods = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.models", "torchvision.datasets",
                                                      "torchvision.transforms", "torchvision.transforms.functional")}
    for cls in ("CIFAR10", "CIFAR100", "STL10"):                  # base classes of torch_fidelity.datasets
        setattr(mods["torchvision.datasets"], cls, type(cls, (), {}))
    for name, mod in mods.items():
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(mods[parent], child, mod)
    return mods


@pytest.fixture(scope="module")
def _imports():
    """Import torch-fidelity's modules (where installed) behind the stand-in, which is gone again on return.

    Yields them (None without torch-fidelity); at the end of the file every module imported under
    torch_fidelity, torchmetrics and torchvision leaves ``sys.modules``.
    """
    import importlib.util

    before = set(sys.modules)
    mods = None
    if importlib.util.find_spec("torch_fidelity") is not None:
        real_tv = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "torchvision"}
        sys.modules.update(_torchvision_standin())
        try:
            import torch_fidelity.feature_extractor_inceptionv3 as fe
            import torch_fidelity.metric_fid as mfid
            import torch_fidelity.metric_kid as mkid
        finally:
            for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
                del sys.modules[k]
            sys.modules.update(real_tv)
        mods = types.SimpleNamespace(fe=fe, fid=mfid, kid=mkid)
    yield mods
    for k in set(sys.modules) - before:
        if k.split(".")[0] in _STANDIN_ROOTS:
            del sys.modules[k]


@pytest.fixture
def fidelity(_imports):
    """torch-fidelity's ``feature_extractor_inceptionv3`` (``fe``), ``metric_fid`` and ``metric_kid``."""
    reference("torch_fidelity")
    return _imports


@pytest.fixture
def tm(_imports):
    """torchmetrics' functions and classes used here (its ``image`` package imports torch-fidelity where installed,
    so that comes first, behind the stand-in)."""
    reference("torchmetrics")
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    return types.SimpleNamespace(psnr=peak_signal_noise_ratio, ssim=structural_similarity_index_measure,
                                 FID=FrechetInceptionDistance, KID=KernelInceptionDistance, poly_mmd=poly_mmd)


# ---- images ------------------------------------------------------------------------------------------------

def random_pairs(n, h, w, seed):
    """Two independent uniform (N, 3, H, W) tensors in [-1, 1], and the first with noise added."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, n, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1
    return a, b, (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)


@pytest.fixture(scope="module")
def shapes32():
    return load_image_folder(SHAPES, 32).images                          # (300, 3, 32, 32) float32 in [-1, 1]


def real_pairs(images, seed=0):
    """Real images against: a noisy copy, a blurred copy, and other real images of the set."""
    x = images.double()
    g = torch.Generator().manual_seed(seed)
    noisy = (x + 0.08 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    k = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return [(x, noisy), (x, blurred), (x, x.roll(1, dims=0))]


def to01(x):
    return ((x.double() + 1) / 2).clamp(0, 1)


def image_cases(shapes32):
    """(name, a, b) on the [-1, 1] scale: random tensors of several sizes and real images."""
    cases = []
    for n, h, w, seed in ((4, 32, 32, 0), (3, 24, 40, 1), (2, 11, 64, 2)):
        a, b, noisy = random_pairs(n, h, w, seed)
        cases += [(f"random {h}x{w}", a, b), (f"random+noise {h}x{w}", a, noisy)]
    picks = shapes32[torch.arange(0, 300, 25)]                           # 12 images, 2 of each class
    cases += [(f"shapes {k}", a, b) for k, (a, b) in zip(("noise", "blur", "other"), real_pairs(picks))]
    return cases


# ---- PSNR and SSIM -----------------------------------------------------------------------------------------

def test_psnr_matches_skimage(shapes32):
    reference("skimage")
    from skimage.metrics import peak_signal_noise_ratio

    for name, a, b in image_cases(shapes32):
        ours = psnr(a, b)
        x, y = to01(a), to01(b)
        expect = [peak_signal_noise_ratio(y[i].numpy(), x[i].numpy(), data_range=1.0) for i in range(len(x))]
        torch.testing.assert_close(ours, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-12, msg=name)
        assert (ours > 5).all() and (ours < 60).all(), name               # no capped / degenerate values


def test_psnr_matches_torchmetrics(shapes32, tm):
    for name, a, b in image_cases(shapes32):
        expect = tm.psnr(to01(a), to01(b), data_range=1.0, reduction="none", dim=(1, 2, 3))
        # torchmetrics converts log(x) to dB with the float32 constant 10 / log(10): 1e-7 relative
        torch.testing.assert_close(psnr(a, b), expect.double(), rtol=2e-7, atol=0, msg=name)


def test_ssim_matches_skimage(shapes32):
    reference("skimage")
    from skimage.metrics import structural_similarity

    for name, a, b in image_cases(shapes32):
        ours = ssim(a, b)
        x, y = to01(a), to01(b)
        # skimage truncates its Gaussian at 3.5 sigma: the same 11 taps, normalised the same way
        expect = [structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0) for i in range(len(x))]
        torch.testing.assert_close(ours, torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-12, msg=name)
        assert ((ours > -1) & (ours < 1)).all(), name


def test_ssim_matches_pytorch_msssim(shapes32):
    reference("pytorch_msssim")
    import pytorch_msssim

    gauss64 = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5**2))
    gauss64 = (gauss64 / gauss64.sum()).reshape(1, 1, 1, 11).expand(3, 1, 1, 11)
    for name, a, b in image_cases(shapes32):
        ours, x, y = ssim(a, b), to01(a), to01(b)
        # pytorch_msssim builds its window in float32 (4e-6 off at most here); given a float64 one it agrees
        expect = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
        torch.testing.assert_close(ours, expect, rtol=0, atol=1e-5, msg=name)
        expect = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False, win=gauss64)
        torch.testing.assert_close(ours, expect, rtol=0, atol=1e-12, msg=f"float64 window, {name}")


def test_ssim_matches_torchmetrics_inside_the_border(shapes32, tm):
    """torchmetrics (1.9) reflect-pads the images and averages the SSIM map over the whole image, borders
    included (0.0004-0.3 away from the valid-region mean on these sizes); the map's interior, the windows
    that lie inside the image, is tclab's SSIM."""
    for name, a, b in image_cases(shapes32):
        _, full = tm.ssim(to01(a), to01(b), gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0,
                          reduction="none", return_full_image=True)
        torch.testing.assert_close(ssim(a, b), full[..., 5:-5, 5:-5].mean((1, 2, 3)), rtol=0, atol=1e-12, msg=name)


# ---- FID's Frechet term and KID, on the same features -------------------------------------------------------

@pytest.fixture(scope="module")
def real_features(shapes32):
    """128-d features of the shipped classifier on the shapes set: even-indexed images vs noisy odd-indexed ones."""
    ext = ClassifierFeatures()
    a = ext(shapes32[0::2])
    noisy = (shapes32[1::2] + 0.15 * torch.randn(shapes32[1::2].shape, generator=torch.Generator().manual_seed(0)))
    return a, ext(noisy.clamp(-1, 1))                                     # (150, 128) each, float64


def feature_cases(real_features):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(32, 32)) / 6
    return [("random 32-d", rng.normal(size=(300, 32)), rng.normal(size=(250, 32)) @ (np.eye(32) + mix) + 0.3),
            ("random 64-d relu", np.maximum(rng.normal(size=(200, 64)), 0),
             np.maximum(rng.normal(size=(220, 64)) + 0.2, 0)),
            ("shapes classifier 128-d", *real_features)]


class _Given(torch.nn.Module):
    """A torchmetrics "feature extractor" that hands back its input: the features are computed already."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def test_frechet_distance_matches_torch_fidelity(real_features, fidelity):
    for name, a, b in feature_cases(real_features):
        stats = [fidelity.fid.fid_features_to_statistics(torch.from_numpy(f)) for f in (a, b)]
        expect = fidelity.fid.fid_statistics_to_metric(*stats, verbose=False)[fidelity.fid.KEY_METRIC_FID]
        ours = frechet_distance(a, b)
        assert ours > 0.05, name
        # torch-fidelity takes Tr sqrt(S1 S2) from eigenvalues, tclab from scipy's sqrtm: 4e-14 relative here
        assert ours == pytest.approx(expect, rel=1e-10, abs=0), name


def test_frechet_distance_matches_torchmetrics(real_features, tm):
    for name, a, b in feature_cases(real_features):
        metric = tm.FID(feature=_Given(a.shape[1])).double()            # its own mean / covariance sums
        metric.update(torch.from_numpy(a), real=True)
        metric.update(torch.from_numpy(b), real=False)
        # eigenvalues again, and covariances from running sums: 1e-12 relative here
        assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-10, abs=0), name


def _kid_on(x, y):
    """tclab's KID on exactly these two subsets (subset size = set size: the whole set, any order)."""
    return kernel_inception_distance(x, y, subsets=1, subset_size=len(x))["mean"]


def test_kid_matches_torch_fidelity_on_whole_sets_and_on_its_subsets(real_features, fidelity):
    for name, a, b in feature_cases(real_features):
        m = min(len(a), len(b))
        a_, b_ = a[:m], b[:m]
        kw = dict(kid_subsets=3, kid_subset_size=m, rng_seed=0, verbose=False)
        ref = fidelity.kid.kid_features_to_metric(torch.from_numpy(a_), torch.from_numpy(b_), **kw)
        ours = kernel_inception_distance(a_, b_, subsets=3, subset_size=m, seed=0)
        assert ours["mean"] == pytest.approx(ref[fidelity.kid.KEY_METRIC_KID_MEAN], rel=1e-10, abs=1e-13), name
        assert ours["std"] == pytest.approx(0, abs=1e-9)
        assert ref[fidelity.kid.KEY_METRIC_KID_STD] == pytest.approx(0, abs=1e-9)
        # subsets smaller than the sets: draw torch-fidelity's subsets (np.random.RandomState(seed).choice,
        # one draw per set and round) and score each with tclab
        size, rounds = 50, 8
        kw = dict(kid_subsets=rounds, kid_subset_size=size, rng_seed=7, verbose=False)
        ref = fidelity.kid.kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), **kw)
        rs = np.random.RandomState(7)
        per = [_kid_on(a[rs.choice(len(a), size, replace=False)], b[rs.choice(len(b), size, replace=False)])
               for _ in range(rounds)]
        assert np.mean(per) == pytest.approx(ref[fidelity.kid.KEY_METRIC_KID_MEAN], rel=1e-10, abs=1e-13), name
        assert np.std(per) == pytest.approx(ref[fidelity.kid.KEY_METRIC_KID_STD], rel=1e-8, abs=1e-13), name


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kid_matches_torchmetrics_on_whole_sets_and_on_its_subsets(real_features, tm):
    for name, a, b in feature_cases(real_features):
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        m = min(len(a), len(b))
        assert _kid_on(a[:m], b[:m]) == pytest.approx(float(tm.poly_mmd(ta[:m], tb[:m])), rel=1e-10, abs=1e-13), name
        # the metric class: subsets drawn with torch.randperm from the global generator, replayed here
        size, rounds = 40, 6
        metric = tm.KID(feature=_Given(a.shape[1]), subsets=rounds, subset_size=size)
        metric.update(ta, real=True)
        metric.update(tb, real=False)
        torch.manual_seed(11)
        mean, std = metric.compute()
        torch.manual_seed(11)
        per = []
        for _ in range(rounds):
            ia, ib = torch.randperm(len(a))[:size].numpy(), torch.randperm(len(b))[:size].numpy()
            per.append(_kid_on(a[ia], b[ib]))
        assert np.mean(per) == pytest.approx(float(mean), rel=1e-10, abs=1e-13), name
        assert np.std(per) == pytest.approx(float(std), rel=1e-8, abs=1e-13), name


# ---- the FID InceptionV3 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A file of random, well-scaled FID InceptionV3 weights that both tclab and torch-fidelity load.

    Kaiming-normal convolutions and BatchNorm statistics taken from one batch of noise, so that every
    layer's output depends on the input (default-initialised weights give features that barely do).
    The tensor names are pytorch-fid's, which torch-fidelity's port shares; its classifier ``fc``,
    which tclab ignores, is added so that torch-fidelity's strict ``load_state_dict`` accepts the file.
    """
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    g = torch.Generator().manual_seed(0)
    net = FIDInceptionV3()
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, generator=g)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None                                           # running stats = this batch's
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5, generator=g)
            torch.nn.init.normal_(mod.bias, 0.0, 0.1, generator=g)
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299, generator=g) * 2 - 1)
    state = net.eval().state_dict()
    fc = {"fc.weight": torch.randn(1008, 2048, generator=g) * 0.01, "fc.bias": torch.zeros(1008)}
    torch.save({**state, **fc}, path)
    return path


@pytest.fixture(scope="module")
def inception_inputs(shapes32):
    """8-bit images: random at 299 px, real at 299 px (the shapes set resized by load_image_folder), real at 32 px."""
    g = torch.Generator().manual_seed(1)
    rand299 = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)
    real299 = load_image_folder(SHAPES, 299, limit=1).images[[0, 3]]     # 2 of the 6 classes
    real32 = shapes32[[5, 130, 260]]
    to_u8 = lambda x: torch.from_numpy(images_to_uint8(x)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return {"random 299": rand299, "shapes 299": to_u8(real299), "shapes 32": to_u8(real32),
            "random 48": torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8, generator=g)}


def _from_u8(x):
    return x.float() / 127.5 - 1                                          # 8-bit -> tclab's [-1, 1] images


def _torch_fidelity_inception(fidelity, weights):
    return fidelity.fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=str(weights))


def test_inception_network_equals_torch_fidelity_bit_for_bit(inception_weights, inception_inputs, fidelity):
    """The same weights, and torch-fidelity's own resized and scaled input fed to tclab's network."""
    ref = _torch_fidelity_inception(fidelity, inception_weights)
    ours = InceptionV3Features(inception_weights).net
    assert set(ref.state_dict()) - set(ours.state_dict()) == {"fc.weight", "fc.bias"}
    with torch.no_grad():
        for name, x in inception_inputs.items():
            z = fidelity.fe.interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            got, expect = ours((z - 128) / 128), ref(x)[0]
            assert got.shape == (len(x), 2048)
            assert torch.equal(got, expect), f"{name}: max |diff| {(got - expect).abs().max():.3g}"
            assert (expect[0] - expect[1]).abs().max() > 1e-2 * expect.abs().max(), name  # they depend on the image


def test_inception_features_match_torch_fidelity_up_to_its_resize(inception_weights, inception_inputs, fidelity,
                                                                  monkeypatch):
    """tclab's whole extractor (8-bit quantisation, resize, scaling, network) against torch-fidelity's.

    The two protocols differ in two documented ways. The input scaling: torch-fidelity maps 8-bit
    values by ``(x - 128) / 128``, tclab (as pytorch-fid) by ``x / 127.5 - 1``; torch-fidelity's first
    layer is refitted to that here (its convolution has no padding, so ``W' = W * 128 / 127.5`` and
    ``running_mean' = running_mean - 0.5 / 127.5 * sum(W)``, per output channel, give the same output).
    The resize: tclab resizes as pytorch-fid does (``F.interpolate``, bilinear, half-pixel centres),
    torch-fidelity emulates TensorFlow 1's ``resize_bilinear`` (no half-pixel offset). At 299 px neither
    resizes and the features agree; at other sizes they agree once torch-fidelity's resize is replaced
    by pytorch-fid's, and differ by 1-5 % of the largest feature without that (so a tclab FID is
    pytorch-fid's number, not torch-fidelity's).
    """
    ref = _torch_fidelity_inception(fidelity, inception_weights)
    ours = InceptionV3Features(inception_weights)
    with torch.no_grad():
        conv, bn = ref.Conv2d_1a_3x3.conv, ref.Conv2d_1a_3x3.bn
        bn.running_mean -= conv.weight.sum((1, 2, 3)) * (0.5 / 127.5)
        conv.weight *= 128 / 127.5
        tf_resized = {name: ref(x)[0].double() for name, x in inception_inputs.items() if "299" not in name}
        monkeypatch.setattr(fidelity.fe, "interpolate_bilinear_2d_like_tensorflow1x",
                            lambda x, size, align_corners: F.interpolate(x, size=size, mode="bilinear",
                                                                         align_corners=False))
        for name, x in inception_inputs.items():
            got = torch.from_numpy(ours(_from_u8(x)))
            expect = ref(x)[0].double()
            # float32 rounding (scaling before / after the resize, the folded first layer): at most 1.7e-4
            # here, on features up to 800 (real images) or 2.3 (the 299 px noise the BatchNorms were fitted to)
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=3e-4, msg=name)
            if name in tf_resized:
                rel = (got - tf_resized[name]).abs().max() / expect.abs().max()
                assert rel > 5e-3, f"{name}: TF1-style and pytorch resizes agree to {rel:.2g}?"
