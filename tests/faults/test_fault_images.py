"""Fault suite, image sets (issue 14, point 4): hostile names, unreadable files and folders, links,
pipes, decompression bombs, huge images. Each test builds the bad folder in ``tmp_path`` and checks
what was skipped and why (the entry names the file; the reason says the fix or the limit), that the
rest of the set is usable, and that the manifest, its hash, the summary and the check-images report
can still be written as UTF-8 CSV and strict JSON.

Tests may run as root, where ``chmod 000`` does not stop a read: unreadable files and folders are
therefore also simulated by making ``open`` / ``os.scandir`` raise ``PermissionError`` for one path;
the real chmod variant runs wherever chmod does stop reads (not root, or root without
CAP_DAC_OVERRIDE: ``setpriv --inh-caps=-dac_override,-dac_read_search
--bounding-set=-dac_override,-dac_read_search -- python -m pytest tests/faults``).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import signal
import struct
import zlib

import pytest
from PIL import Image, ImageDraw

from tclab import data
from tclab.cli import main
from tclab.data import ImageSetError, load_image_folder, read_image
from tclab.inhouse import bad_images_table, describe_image_set

MANIFEST_COLUMNS = ["path", "class_name", "label", "width", "height", "mode", "sha256"]


def _skip_if_chmod_does_not_block(path):
    """As root (with CAP_DAC_OVERRIDE) chmod 000 stops nothing: such runs rely on the patched variant."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        return
    os.chmod(path, 0o755)
    pytest.skip("chmod 000 does not stop reads here (root); the patched variant covers this fault")


def _png(path, size=(40, 30), color=(200, 10, 10)):
    """A small valid PNG at ``path`` (str, bytes or Path; bytes for names that are not UTF-8)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        Image.new("RGB", size, color).save(f, "PNG")
    return path


def _png_claiming(path, width, height):
    """A 1x1 PNG whose header claims ``width x height``: a decompression bomb's header, ~70 bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length and type
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))  # CRC over type + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(b))
    return path


def assert_usable(s, usable: int):
    """The set holds ``usable`` images and everything that shows or writes it works: manifest (as UTF-8
    CSV), manifest hash, summary (strict JSON, UTF-8), the in-house report's lines and skipped table."""
    assert len(s) == usable == s.images.shape[0] == s.labels.shape[0]
    m = s.manifest()
    assert len(m) == usable and list(m.columns) == MANIFEST_COLUMNS
    m.to_csv(io.BytesIO(), index=False, encoding="utf-8")
    assert len(s.manifest_hash()) == 64
    text = json.dumps(s.summary(), allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")  # strict: a surrogate-escaped name would raise here
    assert json.loads(text)["usable"] == usable
    describe_image_set(s).encode("utf-8")
    bad_images_table(s).to_csv(io.BytesIO(), index=False, encoding="utf-8")
    for b in s.skipped:
        str(b).encode("utf-8")


def skipped(s) -> dict[str, str]:
    return {b.path: b.reason for b in s.skipped}


# ---- names ------------------------------------------------------------------------------------

def test_non_utf8_file_name_kept_escaped_and_hashed_by_its_bytes(tmp_path, capsys):
    root = os.fsencode(tmp_path / "set")
    _png(root + b"/cats/ok.png")
    _png(root + b"/cats/bad\xff.png", color=(1, 2, 3))
    s = load_image_folder(os.fsdecode(root), 16)
    assert not s.skipped
    assert [r.path for r in s.records] == ["cats/bad\\xff.png", "cats/ok.png"]  # shown escaped
    bad = s.records[0]
    assert bad.fs_path == "cats/bad\udcff.png" and os.fsencode(bad.fs_path) == b"cats/bad\xff.png"
    assert hashlib.sha256((tmp_path / "set" / bad.fs_path).read_bytes()).hexdigest() == bad.sha256
    expected = hashlib.sha256()
    for r, name in zip(s.records, [b"cats/bad\xff.png", b"cats/ok.png"]):
        expected.update(name + f"\t{r.class_name}\t{r.sha256}\n".encode())
    assert s.manifest_hash() == expected.hexdigest()  # over the real bytes of the name: deterministic
    assert_usable(s, 2)
    # a UTF-8 name that prints the same (a literal backslash) is a different set
    twin = tmp_path / "twin"
    _png(str(twin / "cats" / "ok.png"))
    _png(str(twin / "cats" / "bad\\xff.png"), color=(1, 2, 3))
    t = load_image_folder(twin, 16)
    assert [r.path for r in t.records] == [r.path for r in s.records] and t.manifest_hash() != s.manifest_hash()
    # the check-images report prints it and writes the CSV manifest
    csv = tmp_path / "m.csv"
    assert main(["check-images", os.fsdecode(root), "--manifest", str(csv)]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")
    assert "2 usable images" in out and s.manifest_hash() in out
    assert "cats/bad\\xff.png" in csv.read_text(encoding="utf-8")


def test_non_utf8_folder_name_is_a_class_shown_escaped(tmp_path):
    root = os.fsencode(tmp_path / "set")
    _png(root + b"/caf\xe9/a.png")  # latin-1 'cafe' with an accent
    _png(root + b"/dogs/b.png")
    s = load_image_folder(os.fsdecode(root), 16)
    assert s.class_names == ["caf\\xe9", "dogs"] and s.labels.tolist() == [0, 1]
    assert s.records[0].path == "caf\\xe9/a.png" and s.records[0].class_name == "caf\\xe9"
    assert s.summary()["per_class"] == {"caf\\xe9": 1, "dogs": 1}
    assert_usable(s, 2)


def test_control_characters_in_names_cannot_break_lines(tmp_path, capsys):
    root = tmp_path / "set"
    _png(str(root / "a\nb.png"))
    _png(str(root / "esc\x1b[31m.png"))
    _png(str(root / "tab\t.png"))
    bad_root = tmp_path / "bad"
    (bad_root / "x\ny.png").parent.mkdir(parents=True)
    (bad_root / "x\ny.png").write_text("not an image")
    _png(str(bad_root / "ok.png"))
    s = load_image_folder(root, 16)
    assert sorted(r.path for r in s.records) == ["a\\nb.png", "esc\\x1b[31m.png", "tab\\t.png"]
    assert_usable(s, 3)
    b = load_image_folder(bad_root, 16)
    assert list(skipped(b)) == ["x\\ny.png"] and "not an image" in skipped(b)["x\\ny.png"]
    assert main(["check-images", str(bad_root)]) == 0
    out = capsys.readouterr().out
    assert "skipped x\\ny.png: not an image" in out and "\x1b" not in out


# ---- unreadable things --------------------------------------------------------------------------

def _deny(monkeypatch, target, *funcs):
    """Make ``module.func(path)`` raise PermissionError for ``target`` only (what chmod 000 does)."""
    target = os.fspath(target)
    for module, name in funcs:
        real = getattr(module, name)

        def denied(p, *a, _real=real, **k):
            if isinstance(p, (str, bytes, os.PathLike)) and os.fsdecode(p) == target:
                raise PermissionError(13, "Permission denied", target)
            return _real(p, *a, **k)

        monkeypatch.setattr(module, name, denied)


@pytest.mark.parametrize("how", ["patched", "chmod"])
def test_unreadable_file_is_listed_with_the_fix(tmp_path, monkeypatch, how):
    root = tmp_path / "set"
    secret = _png(root / "cats" / "secret.png")
    _png(root / "cats" / "ok.png")
    _png(root / "dogs" / "ok.png")
    if how == "chmod":
        secret.chmod(0)
        _skip_if_chmod_does_not_block(secret)
    else:
        _deny(monkeypatch, secret, (builtins, "open"))
    s = load_image_folder(root, 16)
    assert list(skipped(s)) == ["cats/secret.png"]
    reason = skipped(s)["cats/secret.png"]
    assert "permission denied" in reason and "chmod u+r" in reason
    assert str(s.skipped[0]).startswith("cats/secret.png: ")
    assert [r.path for r in s.records] == ["cats/ok.png", "dogs/ok.png"] and s.class_names == ["cats", "dogs"]
    assert_usable(s, 2)


@pytest.mark.parametrize("how", ["patched", "chmod"])
def test_unreadable_class_folder_is_listed_not_dropped(tmp_path, monkeypatch, how):
    root = tmp_path / "set"
    _png(root / "cats" / "a.png")
    _png(root / "dogs" / "b.png")
    _png(root / "dogs" / "sub" / "c.png")
    _png(root / "dogs" / "sub" / "d.png")
    if how == "chmod":
        (root / "dogs" / "sub").chmod(0)
        _skip_if_chmod_does_not_block(root / "dogs" / "sub")
    else:
        _deny(monkeypatch, root / "dogs" / "sub", (os, "scandir"), (os, "listdir"))
    try:
        s = load_image_folder(root, 16)
    finally:
        (root / "dogs" / "sub").chmod(0o755)
    reason = skipped(s)["dogs/sub/"]
    assert list(skipped(s)) == ["dogs/sub/"]
    assert "cannot be read" in reason and "none of its images" in reason and "chmod -R u+rX" in reason
    assert [r.path for r in s.records] == ["cats/a.png", "dogs/b.png"]
    assert_usable(s, 2)
    # a whole class folder unreadable: the class is listed as skipped, the others still load
    _deny(monkeypatch, root / "cats", (os, "scandir"), (os, "listdir"))
    s2 = load_image_folder(root, 16)
    assert "cats/" in skipped(s2) and s2.class_names == ["dogs"]
    assert_usable(s2, 3 if how == "chmod" else 1)  # chmod: dogs/sub is readable again by now


def test_unreadable_root_folder_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    root = tmp_path / "set"
    _png(root / "a.png")
    _deny(monkeypatch, root, (os, "scandir"), (os, "listdir"))
    with pytest.raises(ImageSetError, match=r"cannot read image folder .*set.*chmod u\+rx"):
        load_image_folder(root, 16)
    assert main(["check-images", str(root)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image folder" in err and "Traceback" not in err


class _FailingDisk:
    """A file whose reads fail with EIO past the first 40 bytes (a bad sector, a dropped network mount)."""

    def __init__(self, f):
        self._f = f

    def read(self, n=-1):
        if self._f.tell() >= 40:
            raise OSError(errno.EIO, "Input/output error")
        return self._f.read(n if n is None or n < 0 else min(n, 40 - self._f.tell()))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_read_error_is_named_as_a_read_error_not_corruption(tmp_path, monkeypatch):
    root = tmp_path / "set"
    flaky = _png(root / "flaky.png", size=(64, 64))
    _png(root / "ok.png")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: _FailingDisk(real_open(p, *a, **k))
                        if os.fspath(p) == os.fspath(flaky) else real_open(p, *a, **k))
    s = load_image_folder(root, 16)
    assert list(skipped(s)) == ["flaky.png"]
    assert skipped(s)["flaky.png"] == "cannot be read (Input/output error); check the file and the disk"
    assert_usable(s, 1)


def test_decoder_failure_of_any_kind_skips_that_file_only(tmp_path, monkeypatch):
    """A decoder bug on a hostile file (PIL has raised KeyError / TypeError on broken EXIF) is that
    file's reason, not a crash of the whole set."""
    root = tmp_path / "set"
    _png(root / "odd_exif.png", size=(41, 31))  # the size marks the file whose EXIF breaks the decoder
    _png(root / "ok.png")
    real = data.ImageOps.exif_transpose

    def fragile(im, *a, **k):
        if im.size == (41, 31):
            raise KeyError(274)
        return real(im, *a, **k)

    monkeypatch.setattr(data.ImageOps, "exif_transpose", fragile)
    s = load_image_folder(root, 16)
    assert list(skipped(s)) == ["odd_exif.png"]
    assert skipped(s)["odd_exif.png"] == "corrupt image (the decoder failed: KeyError: 274)"
    assert_usable(s, 1)


# ---- links, pipes, folders named like files -----------------------------------------------------

def test_broken_symlink_and_link_loop_are_skipped_with_reason(tmp_path):
    root = tmp_path / "set"
    _png(root / "ok.png")
    os.symlink(tmp_path / "gone.png", root / "broken.png")
    os.symlink("loop.png", root / "loop.png")
    _png(tmp_path / "elsewhere" / "real.png")
    os.symlink(tmp_path / "elsewhere" / "real.png", root / "linked.png")  # a good link is followed
    s = load_image_folder(root, 16)
    assert set(skipped(s)) == {"broken.png", "loop.png"}
    assert "broken symbolic link" in skipped(s)["broken.png"] and "gone.png" in skipped(s)["broken.png"]
    assert "loop of symbolic links" in skipped(s)["loop.png"]
    assert all("fix the link or remove it" in r for r in skipped(s).values())
    assert [r.path for r in s.records] == ["linked.png", "ok.png"] and not s.labelled
    assert_usable(s, 2)


def test_folder_named_like_an_image_does_not_turn_a_flat_set_into_classes(tmp_path):
    root = tmp_path / "set"
    _png(root / "a.png")
    _png(root / "b.jpg")
    _png(root / "photo.png" / "inner.png")
    s = load_image_folder(root, 16)
    assert not s.labelled and [r.path for r in s.records] == ["a.png", "b.jpg"]
    assert list(skipped(s)) == ["photo.png/"]
    assert "named like an image file" in skipped(s)["photo.png/"] and "rename it" in skipped(s)["photo.png/"]
    assert_usable(s, 2)


def test_fifo_is_skipped_without_opening_it(tmp_path):
    root = tmp_path / "set"
    _png(root / "cats" / "a.png")
    os.mkfifo(root / "cats" / "pipe.png")  # opening it for reading would block forever

    def hung(*_):
        raise AssertionError("load_image_folder blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        s = load_image_folder(root, 16)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert list(skipped(s)) == ["cats/pipe.png"] and "named pipe (FIFO)" in skipped(s)["cats/pipe.png"]
    assert_usable(s, 1)


def test_link_to_folder_and_empty_class_folder_are_listed(tmp_path):
    root = tmp_path / "set"
    _png(root / "cats" / "a.png")
    (root / "empty").mkdir()
    _png(root / "dogs" / "b.png")
    os.symlink(root / "cats", root / "dogs" / "loop")
    s = load_image_folder(root, 16)
    assert skipped(s)["dogs/loop"].startswith("a symbolic link to a folder, not followed")
    assert "holds no files" in skipped(s)["empty/"]
    assert s.class_names == ["cats", "dogs"] and set(skipped(s)) == {"dogs/loop", "empty/"}
    assert_usable(s, 2)


# ---- decompression bombs and huge images --------------------------------------------------------

@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MP (past PIL's warning), 400 MP (past PIL's error)
def test_over_the_pixel_limit_is_refused_from_the_header(tmp_path, side):
    root = tmp_path / "set"
    _png(root / "ok.png")
    bomb = _png_claiming(root / "bomb.png", side, side)
    assert bomb.stat().st_size < 200
    s = load_image_folder(root, 16)
    reason = skipped(s)["bomb.png"]
    assert f"{side}x{side} = {side * side:,} px" in reason and "not decoded" in reason
    assert f"the limit is {data.DEFAULT_MAX_PIXELS:,} px" in reason
    assert f"TCLAB_MAX_PIXELS={side * side}" in reason and f"max_pixels={side * side}" in reason
    assert_usable(s, 1)
    with pytest.raises(ValueError, match="over the pixel limit"):
        read_image(bomb)


def test_pixel_limit_from_env_var_and_argument(tmp_path, monkeypatch, capsys):
    root = tmp_path / "set"
    _png(root / "big.png", size=(40, 30))  # 1200 px
    _png(root / "small.png", size=(30, 30))  # 900 px
    monkeypatch.setenv("TCLAB_MAX_PIXELS", "1000")
    s = load_image_folder(root, 16)
    assert list(skipped(s)) == ["big.png"]
    assert "the limit is 1,000 px" in skipped(s)["big.png"] and "TCLAB_MAX_PIXELS=1200" in skipped(s)["big.png"]
    assert_usable(s, 1)
    assert main(["check-images", str(root)]) == 0
    assert "skipped big.png: over the pixel limit" in capsys.readouterr().out
    assert len(load_image_folder(root, 16, max_pixels=1200)) == 2  # the argument beats the variable
    monkeypatch.setenv("TCLAB_MAX_PIXELS", "1_200")
    assert len(load_image_folder(root, 16)) == 2
    monkeypatch.setenv("TCLAB_MAX_PIXELS", "")
    assert data.resolve_max_pixels() == data.DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("value", ["lots", "nan", "inf", "0", "-5", "1.5"])
def test_bad_pixel_limit_env_var_is_an_error_naming_it(tmp_path, monkeypatch, capsys, value):
    _png(tmp_path / "set" / "a.png")
    monkeypatch.setenv("TCLAB_MAX_PIXELS", value)
    with pytest.raises(ImageSetError, match=rf"TCLAB_MAX_PIXELS='{value}' is not a whole number"):
        load_image_folder(tmp_path / "set", 16)
    assert main(["check-images", str(tmp_path / "set")]) == 2
    assert "TCLAB_MAX_PIXELS" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_pixels must be"):
        load_image_folder(tmp_path / "set", 16, max_pixels=0)


def test_own_limit_replaces_pils_and_restores_it(tmp_path, monkeypatch):
    """A limit raised past PIL's own (here PIL's set to 1,000 px: 100x100 would be a PIL error) is
    honoured, and PIL's setting is back afterwards."""
    _png(tmp_path / "set" / "a.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    s = load_image_folder(tmp_path / "set", 16)
    assert not s.skipped and Image.MAX_IMAGE_PIXELS == 1000
    assert_usable(s, 1)


def _big_jpeg(path, size=(5000, 4000), orientation=None):
    """A 20 MP JPEG (over DRAFT_ABOVE_PIXELS): left half white, right half dark blue."""
    im = Image.new("RGB", size, (10, 20, 120))
    ImageDraw.Draw(im).rectangle((0, 0, size[0] // 2, size[1]), fill=(255, 255, 255))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90, exif=exif)
    return path


def test_huge_allowed_jpeg_is_decoded_at_reduced_scale(tmp_path):
    root = tmp_path / "set"
    big = _big_jpeg(root / "big.jpg")
    _big_jpeg(root / "turned.jpg", orientation=6)  # rotate 90 degrees on display
    assert 5000 * 4000 > data.DRAFT_ABOVE_PIXELS
    reduced, _ = read_image(big, resolution=64)
    assert reduced.size == (625, 500)  # 1/8 scale: shorter side 500 >= 2 x 64, never the 20 MP decode
    full, _ = read_image(big)
    assert full.size == (5000, 4000)
    s = load_image_folder(root, 64)
    assert [(r.path, r.width, r.height) for r in s.records] == [("big.jpg", 5000, 4000), ("turned.jpg", 4000, 5000)]
    # same picture as the full decode: white left, blue right (to within JPEG and filter error)
    expected = data.preprocess(full, 64)
    assert abs(s.images[0].numpy() - expected).max() < 0.05
    assert s.images[1, :, 5, 32].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.05)  # turned: white on top
    assert s.images[1, 2, 60, 32] < 0  # and blue below
    assert_usable(s, 2)


def test_check_images_prints_every_fault_with_its_reason(tmp_path, monkeypatch, capsys):
    """All the faults above in one class-folder set, through the command line."""
    root = os.fsencode(tmp_path / "set")
    _png(root + b"/cats/ok.png")
    _png(root + b"/cats/name\xff.png")
    _png(root + b"/dogs/ok.png")
    _png_claiming(tmp_path / "set" / "dogs" / "bomb.png", 20_000, 20_000)
    os.symlink("nowhere.png", tmp_path / "set" / "dogs" / "broken.png")
    os.mkfifo(tmp_path / "set" / "dogs" / "pipe.png")
    _png(tmp_path / "set" / "dogs" / "secret.png")
    _deny(monkeypatch, tmp_path / "set" / "dogs" / "secret.png", (builtins, "open"))
    _png(tmp_path / "set" / "locked" / "x.png")
    _deny(monkeypatch, tmp_path / "set" / "locked", (os, "scandir"), (os, "listdir"))
    csv = tmp_path / "m.csv"
    assert main(["check-images", os.fsdecode(root), "--manifest", str(csv)]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")
    assert "3 usable images" in out and "5 skipped" in out
    for path, words in [("dogs/bomb.png", "over the pixel limit"),
                        ("dogs/broken.png", "a broken symbolic link"),
                        ("dogs/pipe.png", "not a regular file but a named pipe"),
                        ("dogs/secret.png", "cannot be read: permission denied"),
                        ("locked/", "folder cannot be read")]:
        assert f"skipped {path}: {words}" in out
    assert "cats/name\\xff.png" in csv.read_text(encoding="utf-8")


def test_a_class_folder_none_of_whose_files_decode_is_not_a_class(tmp_path):
    import numpy as np
    from PIL import Image

    from tclab.data import load_image_folder

    for i in range(3):
        (tmp_path / "set" / "goldfish").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "set" / "goldfish" / f"{i}.png")
    (tmp_path / "set" / "broken").mkdir()
    (tmp_path / "set" / "broken" / "x.png").write_bytes(b"junk")
    s = load_image_folder(tmp_path / "set", 8)
    assert s.class_names == ["goldfish"] and s.labels.tolist() == [0, 0, 0]
    assert any(b.path == "broken/" and "left out of the classes" in b.reason for b in s.skipped)

