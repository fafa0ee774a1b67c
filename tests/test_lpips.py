"""LPIPS from local files: the metric's properties, the loader's errors, and parity with the lpips package.

Weight files are random and written to tmp_path by the tests (none are committed). The parity test
runs the reference ``lpips`` package with a stand-in ``torchvision`` module, so that both
implementations use the same random AlexNet backbone and the package's real v0.1 lin weights, on
random tensors and on the stand-in image set ``data/shapes``. Without ``lpips`` installed it is skipped,
with the install command; under ``CI=true`` it fails (``tests.conftest.require_reference``).
"""

from __future__ import annotations

import ast
import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tclab
import tclab.lpips
from tclab.data import load_image_folder
from tclab.lpips import LAYER_CHANNELS, LPIPS, MIN_NATIVE_SIZE, load_lpips, lpips_distance
from tclab.metrics import paired_quality
from tests.conftest import require_reference


def torchvision_alexnet_features() -> nn.Sequential:
    """``torchvision.models.alexnet().features``, written out here independently of tclab's copy."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def random_backbone(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return torchvision_alexnet_features()


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random weights in every accepted layout: full AlexNet, features-only (two namings), lin layers."""
    d = tmp_path_factory.mktemp("lpips_weights")
    feats = random_backbone().state_dict()                                   # "0.weight", ...
    # A full AlexNet state dict also holds the classifier; the loader ignores it, so small stand-in
    # tensors under torchvision's names do (the real ones are 57M parameters).
    full = {**{f"features.{k}": v for k, v in feats.items()},
            "classifier.1.weight": torch.zeros(2, 2), "classifier.1.bias": torch.zeros(2),
            "classifier.6.weight": torch.zeros(3, 2), "classifier.6.bias": torch.zeros(3)}
    g = torch.Generator().manual_seed(1)
    # non-negative, as the published lin weights (training clamps them at 0)
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LAYER_CHANNELS)}
    out = {"full": d / "alexnet-full.pth", "features": d / "alexnet-features.pth",
           "bare": d / "alexnet-bare.safetensors", "lin": d / "alex.pth"}
    torch.save(full, out["full"])
    torch.save({f"features.{k}": v for k, v in feats.items()}, out["features"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in feats.items()}, str(out["bare"]))
    torch.save(lins, out["lin"])
    return out


@pytest.fixture(scope="module")
def model(files) -> LPIPS:
    return load_lpips(files["full"], files["lin"])


def images(n=4, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---- the metric --------------------------------------------------------------------------------

def test_identical_images_give_exactly_zero(model):
    a = images(3, 32)
    assert lpips_distance(a, a, model).tolist() == [0.0, 0.0, 0.0]
    b = images(3, 64, seed=1)
    assert lpips_distance(b, b.clone(), model).tolist() == [0.0, 0.0, 0.0]


def test_symmetric_and_positive(model):
    a, b = images(4, 48, seed=1), images(4, 48, seed=2)
    d = lpips_distance(a, b, model)
    torch.testing.assert_close(d, lpips_distance(b, a, model), rtol=1e-6, atol=0)
    assert (d > 0).all()
    model.train()                       # no dropout anywhere: train mode computes the same thing
    try:
        torch.testing.assert_close(lpips_distance(a, b, model), d, rtol=0, atol=0)
    finally:
        model.eval()


def test_grows_with_noise_strength(model):
    g = torch.Generator().manual_seed(3)
    # smooth images (8x8 upsampled), so added noise is a change the network sees at every layer
    a = F.interpolate(torch.rand(4, 3, 8, 8, generator=g) * 1.6 - 0.8, size=(64, 64), mode="bilinear")
    noise = torch.randn(a.shape, generator=g)
    d = torch.stack([lpips_distance(a, (a + s * noise).clamp(-1, 1), model) for s in (0.02, 0.1, 0.3, 0.8)])
    assert (d[1:] > d[:-1]).all(), d                                         # (strengths, images)
    assert (d[0] > 0).all()


def test_one_distance_per_image_independent_of_batching(model):
    a, b = images(5, 32, seed=4), images(5, 32, seed=5)
    d = lpips_distance(a, b, model)
    assert d.shape == (5,) and d.dtype == torch.float64
    one_by_one = torch.cat([lpips_distance(a[i:i + 1], b[i:i + 1], model) for i in range(5)])
    torch.testing.assert_close(d, one_by_one, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lpips_distance(a, b, model, batch_size=2), d, rtol=1e-5, atol=1e-7)
    assert len(set(d.tolist())) == 5                                         # really per image


def test_values_outside_range_are_clipped(model):
    a, b = images(2, 32, seed=6), images(2, 32, seed=7)
    torch.testing.assert_close(lpips_distance(a * 3, b, model), lpips_distance((a * 3).clamp(-1, 1), b, model))
    assert not torch.equal(lpips_distance(a * 3, b, model), lpips_distance(a, b, model))


def test_small_images_are_upsampled_as_documented(files, model):
    a, b = images(2, 16, seed=8), images(2, 16, seed=9)
    up = lambda x: F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(lpips_distance(a, b, model), lpips_distance(up(a), up(b), model))
    assert model.input_size(20, 40) == (64, 128) and model.input_size(32, 32) == (32, 32)
    assert model.input_size(MIN_NATIVE_SIZE, 100) == (MIN_NATIVE_SIZE, 100)

    strict = load_lpips(files["features"], files["lin"], upsample_to=None)
    assert lpips_distance(images(1, 31), images(1, 31, seed=1), strict).shape == (1,)   # smallest native size
    with pytest.raises(ValueError, match=r"at least 31 x 31 px, got 30 x 40.*upsample_to=64"):
        lpips_distance(torch.zeros(1, 3, 30, 40), torch.zeros(1, 3, 30, 40), strict)
    with pytest.raises(ValueError, match="at least 31 px"):
        LPIPS(upsample_to=16)


def test_input_checks(model):
    with pytest.raises(ValueError, match="equal shapes"):
        lpips_distance(images(2), images(3), model)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        lpips_distance(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), model)
    with pytest.raises(TypeError, match="load_lpips"):
        lpips_distance(images(1), images(1), object())


# ---- loading -----------------------------------------------------------------------------------

def test_every_backbone_layout_gives_the_same_result(files, model):
    a, b = images(3, 40, seed=10), images(3, 40, seed=11)
    d = lpips_distance(a, b, model)                                          # from the full state dict
    for layout in ("features", "bare"):
        other = load_lpips(files[layout], files["lin"])
        torch.testing.assert_close(lpips_distance(a, b, other), d, rtol=0, atol=0)


def test_identity_records_files_hashes_and_resizing(files, model):
    ident = model.identity()
    assert ident["backbone_weights"] == str(files["full"]) and ident["lin_weights"] == str(files["lin"])
    assert ident["backbone_weights_sha256"] == sha256(files["full"])
    assert ident["lin_weights_sha256"] == sha256(files["lin"])
    assert ident["published_weights"] is False                              # random weights
    assert "upsampled bilinearly" in ident["resize"] and "64" in ident["resize"]
    assert LPIPS(upsample_to=None).identity()["resize"].endswith("refused")


def test_missing_files_say_what_to_copy(files, tmp_path):
    gone = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*never downloads.*alexnet-owt-7be5be79\.pth"):
        load_lpips(gone, files["lin"])
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*never downloads.*weights/v0\.1/alex\.pth"):
        load_lpips(files["full"], gone)


def test_wrong_keys_are_listed(files, tmp_path):
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, bad)
    with pytest.raises(ValueError, match=r"resnet\.pth.*10 of 10 tensors missing.*features\.0\.weight.*conv1\.weight"):
        load_lpips(bad, files["lin"])
    with pytest.raises(ValueError, match=r"resnet\.pth.*5 of 5 tensors missing.*lin0\.model\.1\.weight"):
        load_lpips(files["full"], bad)
    # the two files given the wrong way round
    with pytest.raises(ValueError, match="arguments swapped"):
        load_lpips(files["lin"], files["full"])
    with pytest.raises(ValueError, match="arguments swapped"):
        load_lpips(files["full"], files["features"])


def test_wrong_shapes_are_listed(files, tmp_path):
    state = torch.load(files["features"], weights_only=True)
    state["features.3.weight"] = torch.zeros(192, 32, 5, 5)
    bad = tmp_path / "narrow.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"narrow\.pth.*1 with wrong shapes.*features\.3\.weight \(192, 32, 5, 5\) "
                                         r"!= \(192, 64, 5, 5\)"):
        load_lpips(bad, files["lin"])
    lins = torch.load(files["lin"], weights_only=True)
    lins["lin2.model.1.weight"] = torch.zeros(1, 256, 1, 1)                 # e.g. a VGG lin file
    torch.save(lins, bad)
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight \(1, 256, 1, 1\) != \(1, 384, 1, 1\)"):
        load_lpips(files["full"], bad)


class _Payload:  # stands for any pickled object a weights file should not carry
    pass


def test_pickled_code_is_refused(files, tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"features.0.weight": _Payload()}, bad)
    with pytest.raises(ValueError, match=r"pickled\.pth.*weights_only=True"):
        load_lpips(bad, files["lin"])


def test_tclab_never_imports_torchvision():
    for path in Path(tclab.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torchvision" for n in names), f"{path} imports torchvision"


# ---- in paired_quality -------------------------------------------------------------------------

def test_paired_quality_adds_lpips_only_when_given_a_model(model):
    a, b = images(3, 32, seed=12), images(3, 32, seed=13)
    plain = paired_quality(a, b)
    assert set(plain) == {"psnr", "ssim", "mse"}
    q = paired_quality(a, b, lpips_model=model)
    assert set(q) == {"psnr", "ssim", "mse", "lpips"}
    assert all(q[k] == plain[k] for k in plain)
    assert q["lpips"] == pytest.approx(float(lpips_distance(a, b, model).mean()), rel=1e-12)
    assert paired_quality(a, a, lpips_model=model)["lpips"] == 0.0


# ---- parity with the reference implementation ---------------------------------------------------

@pytest.fixture
def reference_lpips(monkeypatch):
    """The ``lpips`` package imported with a stand-in ``torchvision`` whose AlexNet has random weights.

    ``lpips.pretrained_networks`` imports ``torchvision.models`` and takes ``alexnet(...).features``;
    the stand-in returns :func:`torchvision_alexnet_features` with seed 0. Everything imported here
    leaves ``sys.modules`` again afterwards, so no other test sees the stand-in.
    """
    backbone = random_backbone(seed=0)
    models = types.ModuleType("torchvision.models")
    models.alexnet = lambda pretrained=False, **kw: types.SimpleNamespace(features=backbone)
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    before = set(sys.modules)
    try:
        require_reference("lpips", "pip install --no-deps lpips==0.1.4  (its torchvision requirement is replaced "
                                   "by a stand-in here)")
        import lpips

        yield lpips, backbone
    finally:
        for name in set(sys.modules) - before:
            if name == "lpips" or name.startswith("lpips."):
                del sys.modules[name]


def test_parity_with_the_lpips_package(reference_lpips, tmp_path, monkeypatch):
    lpips, backbone = reference_lpips
    ref = lpips.LPIPS(net="alex", version="0.1", verbose=False)              # eval mode, real v0.1 lin weights
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    assert lin_file.is_file()
    # the same random backbone, handed to tclab as a features-only torchvision state dict
    torch.save({f"features.{k}": v for k, v in backbone.state_dict().items()}, tmp_path / "alexnet.pth")
    ours = load_lpips(tmp_path / "alexnet.pth", lin_file)
    assert not ours.identity()["published_weights"]                         # the backbone is random
    # the lin file is the published one: with a backbone file that passed as torchvision's, the flag is set
    monkeypatch.setattr(tclab.lpips, "_ALEXNET_SHA256_PREFIX", sha256(tmp_path / "alexnet.pth")[:8])
    assert ours.identity()["published_weights"]

    with torch.no_grad():
        for n, h, w in ((4, 32, 32), (3, 64, 64), (2, 48, 80), (2, MIN_NATIVE_SIZE, MIN_NATIVE_SIZE)):
            g = torch.Generator().manual_seed(h * w)
            a, b = (torch.rand(2, n, 3, h, w, generator=g) * 2 - 1).unbind(0)
            expect = ref(a, b).flatten().double()                             # (N, 1, 1, 1) -> (N,)
            got = lpips_distance(a, b, ours)
            assert (expect > 0).all()
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7, msg=f"{n}x{h}x{w}")
        # below 31 px the reference cannot run; tclab's result is the reference on the upsampled pair
        a, b = images(2, 16, seed=14), images(2, 16, seed=15)
        up = lambda x: F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
        torch.testing.assert_close(lpips_distance(a, b, ours), ref(up(a), up(b)).flatten().double(),
                                   rtol=1e-5, atol=1e-7)


def test_parity_with_the_lpips_package_on_real_images(reference_lpips, tmp_path):
    """The stand-in image set (data/shapes, 32 px native and resized to 64 px) against noisy, blurred and
    other images of the set."""
    lpips, backbone = reference_lpips
    ref = lpips.LPIPS(net="alex", version="0.1", verbose=False)
    torch.save({f"features.{k}": v for k, v in backbone.state_dict().items()}, tmp_path / "alexnet.pth")
    ours = load_lpips(tmp_path / "alexnet.pth", Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth",
                      upsample_to=None)
    shapes = Path(__file__).resolve().parents[1] / "data" / "shapes"
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for size in (32, 64):
            x = load_image_folder(shapes, size, limit=1).images                   # one image of each of 6 classes
            blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            for name, y in (("noise", (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)),
                            ("blur", blur), ("other", x.roll(1, dims=0))):
                expect = ref(x, y).flatten().double()
                assert (expect > 0).all()
                torch.testing.assert_close(lpips_distance(x, y, ours), expect, rtol=1e-5, atol=1e-7,
                                           msg=f"shapes {size} px, {name}")
