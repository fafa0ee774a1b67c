"""Image-folder loading: layouts, odd modes, bad files listed and skipped, clear errors."""

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tclab.cli import main
from tclab.data import ImageSetError, load_image_folder, preprocess, read_image


def _png(path, size=(40, 30), mode="RGB", color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def messy_folder(tmp_path):
    """Two classes with good images in odd modes, plus every kind of bad file."""
    root = tmp_path / "set"
    _png(root / "cats" / "a_rgb.png")
    _png(root / "cats" / "b_gray.png", mode="L", color=128)
    _png(root / "cats" / "c_rgba.png", mode="RGBA", color=(0, 0, 255, 0))  # fully transparent -> white
    pal = Image.new("P", (32, 32))
    pal.putpalette([0, 255, 0] * 256)
    pal.save(root / "dogs" / "d_palette.png") if (root / "dogs").mkdir(parents=True) is None else None
    Image.fromarray(np.full((24, 24), 65535, np.uint16)).save(root / "dogs" / "e_16bit.png")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(root / "dogs" / "f_cmyk.jpg")
    (root / "dogs" / "g_empty.png").write_bytes(b"")
    (root / "dogs" / "h_text.png").write_text("this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (root / "dogs" / "i_truncated.jpg").write_bytes(buf.getvalue()[:200])
    _png(root / "dogs" / "j_tiny.png", size=(8, 8))
    (root / "stray.png").write_bytes(b"")  # a file beside the class folders
    return root


def test_good_images_loaded_bad_ones_listed(messy_folder):
    s = load_image_folder(messy_folder, resolution=16)
    assert s.class_names == ["cats", "dogs"]
    assert [r.path for r in s.records] == ["cats/a_rgb.png", "cats/b_gray.png", "cats/c_rgba.png",
                                           "dogs/d_palette.png", "dogs/e_16bit.png", "dogs/f_cmyk.jpg"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.images.shape == (6, 3, 16, 16) and s.images.dtype == torch.float32
    assert s.images.min() >= -1 and s.images.max() <= 1
    reasons = {b.path: b.reason for b in s.skipped}
    assert set(reasons) == {"dogs/g_empty.png", "dogs/h_text.png", "dogs/i_truncated.jpg", "dogs/j_tiny.png",
                            "stray.png"}
    assert "empty" in reasons["dogs/g_empty.png"]
    assert "not an image" in reasons["dogs/h_text.png"]
    assert "corrupt" in reasons["dogs/i_truncated.jpg"] or "truncated" in reasons["dogs/i_truncated.jpg"]
    assert "too small" in reasons["dogs/j_tiny.png"]
    assert "beside class folders" in reasons["stray.png"]


def test_modes_convert_to_the_right_colours(messy_folder):
    s = load_image_folder(messy_folder, resolution=16)
    px = {r.path: s.images[i, :, 8, 8].tolist() for i, r in enumerate(s.records)}
    assert px["cats/c_rgba.png"] == [1.0, 1.0, 1.0]  # transparent composited over white
    assert px["cats/b_gray.png"][0] == px["cats/b_gray.png"][1] == px["cats/b_gray.png"][2]
    assert px["dogs/e_16bit.png"] == [1.0, 1.0, 1.0]  # 65535 -> 255 -> +1
    assert px["dogs/d_palette.png"] == [-1.0, 1.0, -1.0]  # pure green palette entry


def test_manifest_and_hash(messy_folder):
    s = load_image_folder(messy_folder, resolution=16)
    m = s.manifest()
    assert list(m.columns) == ["path", "class_name", "label", "width", "height", "mode", "sha256"]
    first = messy_folder / "cats" / "a_rgb.png"
    assert m.loc[0, "sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert (m.loc[0, "width"], m.loc[0, "height"], m.loc[4, "mode"]) == (40, 30, "I;16")
    h1 = s.manifest_hash()
    _png(messy_folder / "cats" / "z_new.png")
    assert load_image_folder(messy_folder, resolution=16).manifest_hash() != h1


def test_flat_folder_is_unlabelled(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    s = load_image_folder(tmp_path, resolution=8)
    assert s.class_names == [] and s.labels.tolist() == [-1, -1] and not s.labelled


def test_missing_empty_and_all_bad_folders_raise(tmp_path):
    with pytest.raises(ImageSetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16)
    with pytest.raises(ImageSetError, match="no usable image"):
        load_image_folder(tmp_path, 16)
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(ImageSetError, match="x.png: not an image"):
        load_image_folder(tmp_path, 16)


def test_preprocess_resizes_shorter_side_and_center_crops():
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (20, 0, 40, 20))  # white middle third
    a = preprocess(im, 10)  # shorter side 20 -> 10, width 30, crop the middle 10
    assert a.shape == (3, 10, 10)
    assert np.allclose(a[:, :, 2:-2], 1.0, atol=0.05)  # only the white third survives (edges: filter ringing)
    assert a[:, :, 0].mean() > 0.5


def test_read_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif)
    rgb, _ = read_image(p)
    assert rgb.size == (20, 40)


def test_check_images_cli_reports_and_exit_codes(messy_folder, tmp_path, capsys):
    assert main(["check-images", str(messy_folder), "--manifest", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert "6 usable images" in out and "5 skipped" in out and "dogs/h_text.png: not an image" in out
    assert (tmp_path / "m.csv").read_text().count("\n") == 7
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check-images", str(empty)]) == 2
    assert "no usable image" in capsys.readouterr().err


def test_committed_standin_set_is_intact():
    s = load_image_folder("data/shapes", resolution=32)
    assert s.class_names == ["cross", "disc", "ring", "square", "star", "triangle"]
    assert len(s) == 300 and not s.skipped
    assert torch.bincount(s.labels).tolist() == [50] * 6
