"""In-house image sets: find, validate, decode and preprocess a folder of images.

Layouts accepted (the way teams hand data over):
- **class folders**: ``root/<class name>/<image>``; classes are the sub-folder names in sorted
  order, so class index ``k`` is ``class_names[k]`` (the embedded DiT was trained on this order);
- **flat**: ``root/<image>``, unlabelled (label -1).

Every file is checked. A bad one (empty, not an image, corrupt or truncated, smaller than
``min_side``, over the pixel limit, unreadable, a broken link, a pipe or other non-file) is listed
with the reason in ``ImageSet.skipped`` and left out; so is a class folder that cannot be read or
holds no files, and a folder named like an image. The run goes on. A missing folder, or one where
nothing is usable, raises ``ImageSetError`` saying what was found.
Odd modes (grayscale, RGBA, palette, 16-bit, CMYK) are converted to RGB; transparency is
composited over white; EXIF orientation is applied. Images are resized (shorter side to the
resolution, Lanczos) and center-cropped, then scaled to [-1, 1] as the DiT expects.

File and folder names that are not valid UTF-8 (on Linux, Python hands them over with surrogate
escapes) are kept: the file is read under its real name and hashed by its real bytes, while every
``path`` and ``class_name`` shown or written (records, skipped list, summary, manifest CSV/JSON) is
:func:`printable_name`'s escaped form, e.g. ``cats/bad\\xff.png``.

Decompression bombs: an image with more than ``max_pixels`` pixels (default
:data:`DEFAULT_MAX_PIXELS`, or the environment variable ``TCLAB_MAX_PIXELS``) is skipped, judged
from the file header before anything is decoded. A JPEG over :data:`DRAFT_ABOVE_PIXELS` is decoded
at a reduced scale (libjpeg's DCT scaling, ``Image.draft``) keeping the shorter side at least twice
the resolution, so the full-size decode is never held; other formats are decoded in full (PIL has no
reduced decode for them) and must fit under the pixel limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import stat
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .env import MAX_PIXELS_ENV

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_MIN_SIDE = 16
# 64 megapixels: above nearly every camera's photos (61 MP full frame, 48-50 MP phones; a 200 MP
# phone mode needs the variable), well below the 156 MP (12500x12500) PNG of issue 14 and PIL's own
# error at ~179 MP; ~192 MB decoded as RGB, ~0.5 GB for a 16-bit image while it is converted.
DEFAULT_MAX_PIXELS = 64_000_000
# JPEGs with more pixels than this are decoded at 1/2, 1/4 or 1/8 scale (never below twice the
# resolution); smaller ones are decoded in full, so ordinary sets preprocess bit for bit as before.
DRAFT_ABOVE_PIXELS = 16_000_000
_READ_CHUNK = 1 << 20


class ImageSetError(ValueError):
    """The image folder cannot be used at all (missing, empty, nothing valid)."""


def printable_name(name: str) -> str:
    """``name`` as it is shown and written: safe to print and to encode as UTF-8 (CSV, strict JSON).

    Ordinary names come back unchanged. A byte that is not UTF-8 (Python's surrogate escape,
    ``'\\udcff'`` for byte ``0xff``) becomes ``\\xff``; a lone surrogate (Windows) ``\\ud800``; a
    control character (newline, tab, ESC) ``\\n``, ``\\t``, ``\\x1b``, so a name cannot break a line
    of output or drive the terminal. Only the shown form is escaped: files are still opened and hashed
    under their real names."""
    if name.isprintable():
        return name
    out = []
    for ch in name:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # surrogate escape of one undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        elif unicodedata.category(ch) == "Cc":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"))
        else:
            out.append(ch)
    return "".join(out)


def _name_bytes(text: str) -> bytes:
    """The bytes of a name as the file system holds it (``os.fsencode`` on Linux, on every platform):
    plain UTF-8 for ordinary names, the original bytes back for surrogate-escaped ones."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (Windows names)
        return text.encode("utf-8", "surrogatepass")


@dataclass
class BadImage:
    path: str  # relative to the set's root, printable (folders end with "/")
    reason: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ImageRecord:
    path: str  # relative to the set's root, printable (printable_name)
    class_name: str | None  # printable
    label: int
    width: int  # of the file (after EXIF orientation), not of a reduced decode
    height: int
    mode: str
    sha256: str
    # the real relative name when it differs from ``path`` (a name that is not UTF-8): what the
    # file is opened and hashed by; None when ``path`` is the real name
    fs_path: str | None = field(default=None, repr=False)


MANIFEST_COLUMNS = ["path", "class_name", "label", "width", "height", "mode", "sha256"]


@dataclass
class ImageSet:
    """A validated, preprocessed image set.

    ``images`` is ``(N, 3, R, R)`` float32 in [-1, 1]; ``labels`` is ``(N,)`` int64 (-1 when flat).
    """

    root: Path
    resolution: int
    class_names: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    records: list[ImageRecord]
    skipped: list[BadImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def manifest(self):
        """A pandas frame: one row per usable image (path, class, size, mode, sha256), names printable."""
        import pandas as pd

        return pd.DataFrame([{c: getattr(r, c) for c in MANIFEST_COLUMNS} for r in self.records],
                            columns=MANIFEST_COLUMNS)

    def manifest_hash(self) -> str:
        """sha256 over (path, class, file hash) of every usable image: the set's identity.

        The path is hashed by its real bytes (so two names that print alike still differ); for UTF-8
        names these are the bytes of ``path``, which keeps the hash of every ordinary set unchanged."""
        h = hashlib.sha256()
        for r in self.records:
            name = r.path if r.fs_path is None else r.fs_path
            h.update(_name_bytes(f"{name}\t{r.class_name}\t{r.sha256}\n"))
        return h.hexdigest()

    def summary(self) -> dict:
        counts = {}
        for r in self.records:
            counts[r.class_name or "(unlabelled)"] = counts.get(r.class_name or "(unlabelled)", 0) + 1
        return {
            "root": printable_name(str(self.root)),
            "usable": len(self.records),
            "skipped": len(self.skipped),
            "classes": self.class_names,
            "per_class": counts,
            "manifest_sha256": self.manifest_hash(),
        }


# ---- finding the files ---------------------------------------------------------------------------

_SPECIAL_KINDS = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def _kind(path: Path) -> tuple[str, str]:
    """``("dir" | "file" | "skip", reason)`` for one directory entry, following symbolic links.

    Never opens the entry (opening a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path):
            try:
                target = printable_name(os.readlink(path))
            except OSError:
                target = "?"
            what = "a loop of symbolic links" if e.errno == errno.ELOOP else "a broken symbolic link"
            return "skip", f"{what} (points to {target}, which cannot be reached); fix the link or remove it"
        return "skip", f"cannot be examined ({e.strerror or e}); check the permissions of the folders above it"
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    if stat.S_ISREG(st.st_mode):
        return "file", ""
    what = next((name for test, name in _SPECIAL_KINDS if test(st.st_mode)), "not a regular file")
    return "skip", (f"not a regular file but {what}; only image files are read: replace it with the image file "
                    "or remove it")


def _unreadable_folder(rel: str, e: OSError) -> BadImage:
    return BadImage(rel + "/", f"folder cannot be read ({e.strerror or e}), so none of its images are used; "
                               f"give read permission (chmod -R u+rX on it) or remove it")


def _walk_class_folder(d: Path, root: Path, cls: str, files: list, skipped: list[BadImage]) -> None:
    """Every file under ``d`` in sorted path order (as ``sorted(d.rglob("*"))`` gave before), into
    ``files``; what cannot be used, with the reason, into ``skipped``. Sub-folders are followed (hidden
    ones too, as before), links to folders are not (no loops); hidden files are ignored."""
    rel = printable_name(str(d.relative_to(root)))
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        skipped.append(_unreadable_folder(rel, e))
        return
    for e in entries:
        p = Path(e.path)
        try:
            real_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            real_dir = False
        if real_dir:
            _walk_class_folder(p, root, cls, files, skipped)
            continue
        if e.name.startswith("."):
            continue
        kind, reason = _kind(p)
        shown = printable_name(str(p.relative_to(root)))
        if kind == "file":
            files.append((p, cls))
        elif kind == "dir":  # a symbolic link to a folder
            skipped.append(BadImage(shown, "a symbolic link to a folder, not followed (it could loop); "
                                           "link or copy the image files themselves"))
        else:
            skipped.append(BadImage(shown, reason))


def _list_files(root: Path) -> tuple[list[tuple[Path, str | None]], list[BadImage]]:
    """All candidate files with their (printable) class name (None when flat), and what was skipped up
    front: entries that are not files, folders that cannot be read or are empty."""
    shown_root = printable_name(str(root))
    if not root.exists():
        raise ImageSetError(f"image folder {shown_root} does not exist; pass the path of a folder of images")
    if not root.is_dir():
        raise ImageSetError(f"{shown_root} is a file, not a folder; pass the folder that holds the images")
    try:
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise ImageSetError(f"cannot read image folder {shown_root} ({e.strerror or e}); "
                            "give read permission (chmod u+rx on it) or pass another folder") from None
    kinds = {p: _kind(p) for p in entries}
    skipped: list[BadImage] = []
    files: list[tuple[Path, str | None]] = []
    subdirs = []
    for p in entries:
        kind, reason = kinds[p]
        if kind == "dir" and p.suffix.lower() in IMAGE_SUFFIXES:
            skipped.append(BadImage(printable_name(p.name) + "/", f"a folder named like an image file "
                                    f"(suffix {printable_name(p.suffix)}), not taken as a class folder; rename it "
                                    "(class folders are named after the class) or remove it"))
        elif kind == "dir":
            subdirs.append(p)
        elif kind == "skip":
            skipped.append(BadImage(printable_name(p.name), reason))
    if subdirs:
        for p in entries:
            if kinds[p][0] == "file":
                skipped.append(BadImage(printable_name(p.name), "file beside class folders (not in any class)"))
        for d in subdirs:
            before = len(files), len(skipped)
            _walk_class_folder(d, root, printable_name(d.name), files, skipped)
            if (len(files), len(skipped)) == before:
                skipped.append(BadImage(printable_name(d.name) + "/", "class folder holds no files, so the class "
                                        "is left out; put its images in it or remove it"))
    else:
        files = [(p, None) for p in entries if kinds[p][0] == "file"]
    return files, skipped


# ---- decoding one file ---------------------------------------------------------------------------

def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit: ``max_pixels`` if given, else ``$TCLAB_MAX_PIXELS``, else DEFAULT_MAX_PIXELS."""
    if max_pixels is not None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a whole number of pixels >= 1, got {max_pixels!r}")
        return max_pixels
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise ImageSetError(f"{MAX_PIXELS_ENV}={text!r} is not a whole number of pixels >= 1; set it like "
                            f"{MAX_PIXELS_ENV}=200000000, or unset it for the default {DEFAULT_MAX_PIXELS}")
    return int(value)


class _Skip(ValueError):
    """One file is unusable; the message is the reason shown beside its name."""


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_pixel_limit(limit: int | None):
    """PIL's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``: a warning above it, an error
    above twice it; ~89 / ~179 MP by default) set to ``limit`` while held, its warning silenced (the
    caller applies its own limit). A process-wide PIL setting: taken under a lock, restored on exit."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise _Skip(f"over the pixel limit: {w}x{h} = {w * h:,} px (read from the header, not decoded), the "
                    f"limit is {max_pixels:,} px, a guard against decompression bombs; if the image is genuine, "
                    f"raise it: {MAX_PIXELS_ENV}={w * h} or max_pixels={w * h}")


def _open_for_reading(path: Path):
    try:
        return open(path, "rb")
    except PermissionError:
        raise _Skip("cannot be read: permission denied; give read permission (chmod u+r on it) "
                    "or remove it") from None
    except IsADirectoryError:
        raise _Skip("is a folder, not a file") from None
    except FileNotFoundError:
        raise _Skip("vanished or is a broken symbolic link (no file at that name when read)") from None
    except OSError as e:
        raise _Skip(f"cannot be read ({e.strerror or e}); check the file and the disk") from None


def _decode(path: Path, min_side: int, max_pixels: int, resolution: int | None):
    """(RGB image, original mode, (width, height) of the file, sha256 of its bytes), or ValueError."""
    with _open_for_reading(path) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Skip("not a regular file; only image files are read")
        if st.st_size == 0:
            raise _Skip("empty file (0 bytes)")
        try:
            # the header's size against our limit, with PIL's check off so that the limit can be raised
            # past PIL's and the reason gives the real size; nothing is decoded yet
            with _pil_pixel_limit(None), Image.open(fh) as probe:
                _check_pixels(probe.size, max_pixels)
            with _pil_pixel_limit(max_pixels):  # PIL's check stays on (at 2x) as a backstop while decoding
                fh.seek(0)
                with Image.open(fh) as probe:
                    probe.verify()  # structure check: catches many corrupt files cheaply
                fh.seek(0)
                sha = hashlib.sha256()
                while chunk := fh.read(_READ_CHUNK):
                    sha.update(chunk)
                fh.seek(0)
                with Image.open(fh) as im:
                    full = im.size
                    drafted = (resolution is not None and im.format == "JPEG"
                               and full[0] * full[1] > DRAFT_ABOVE_PIXELS)
                    if drafted:  # DCT-scaled decode (1/2, 1/4, 1/8): the full-size image is never held
                        im.draft(None, (2 * resolution, 2 * resolution))
                    im.load()  # full decode: catches truncated data
                    orientation = im.getexif().get(0x0112, 1)
                    im = ImageOps.exif_transpose(im)
                    mode = im.mode
                    rgb = _to_rgb(im)
        except _Skip:
            raise
        except UnidentifiedImageError:
            raise _Skip(f"not an image (no decoder recognises it; suffix {printable_name(path.suffix) or 'none'})"
                        ) from None
        except Image.DecompressionBombError as e:
            raise _Skip(f"over the pixel limit while decoding ({e}); the limit is {max_pixels:,} px, a guard against "
                        f"decompression bombs: raise it with {MAX_PIXELS_ENV} if the image is genuine") from None
        except OSError as e:
            if e.errno is not None:  # the operating system failed the read (EIO, ...), not the decoder
                raise _Skip(f"cannot be read ({e.strerror or e}); check the file and the disk") from None
            raise _Skip(f"corrupt or truncated image: {e}") from None
        except (SyntaxError, EOFError) as e:
            raise _Skip(f"corrupt or truncated image: {e}") from None
        except MemoryError:
            raise _Skip(f"too large to decode in the memory available; lower the pixel limit ({MAX_PIXELS_ENV}) "
                        "or shrink the image") from None
        except Exception as e:  # any other decoder failure on a hostile file: this file only, not the set
            raise _Skip(f"corrupt image (the decoder failed: {type(e).__name__}: {e})") from None
    # the file's own size: after a reduced decode, the header's size turned as EXIF turned the pixels
    size = rgb.size if not drafted else (full[::-1] if orientation in (5, 6, 7, 8) else full)
    if min(size) < min_side:
        raise _Skip(f"too small: {size[0]}x{size[1]} px, the floor is {min_side} px per side")
    return rgb, mode, size, sha.hexdigest()


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def preprocess(im: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> (3, R, R) float32 in [-1, 1]: shorter side resized, center crop."""
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return a.transpose(2, 0, 1)


def read_image(path: Path, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int | None = None,
               resolution: int | None = None) -> tuple[Image.Image, str]:
    """Open, decode and validate one file; returns (RGB image, original mode).

    ``max_pixels``: files with more pixels are refused from the header, before decoding (default:
    ``$TCLAB_MAX_PIXELS``, else DEFAULT_MAX_PIXELS). ``resolution``: when given, a JPEG over
    DRAFT_ABOVE_PIXELS is decoded at a reduced scale whose shorter side stays >= 2 x ``resolution``
    (so the image returned can be smaller than the file). Raises ``ValueError`` with a human reason
    for any file that is not a usable image.
    """
    rgb, mode, _, _ = _decode(Path(path), min_side, resolve_max_pixels(max_pixels), resolution)
    return rgb, mode


def load_image_folder(
    root: str | Path,
    resolution: int,
    min_side: int = DEFAULT_MIN_SIDE,
    limit: int | None = None,
    progress: bool = False,
    max_pixels: int | None = None,
) -> ImageSet:
    """Validate and load every image under ``root`` (see the module docstring for layouts).

    Args:
        root: the folder.
        resolution: output side in pixels (the model's ``sample_size * vae factor``).
        min_side: files with a side smaller than this are skipped as too small.
        limit: keep at most this many usable images (in deterministic order) per class.
        progress: show a progress bar.
        max_pixels: files with more pixels are skipped (a guard against decompression bombs, judged
            from the header). Default: the environment variable ``TCLAB_MAX_PIXELS``, else
            DEFAULT_MAX_PIXELS (64 megapixels). Raise it for genuine huge scans.
    """
    from .progress import progress_bar

    max_pixels = resolve_max_pixels(max_pixels)  # a bad $TCLAB_MAX_PIXELS fails before any work
    root = Path(root).expanduser()
    files, skipped = _list_files(root)
    class_names = sorted({c for _, c in files if c is not None})
    label_of = {c: k for k, c in enumerate(class_names)}
    arrays, records, per_class = [], [], {}
    for f, cls in progress_bar(files, desc=f"checking {printable_name(root.name)}", disable=not progress, unit="img"):
        real = str(f.relative_to(root))
        rel = printable_name(real)
        if limit is not None and per_class.get(cls, 0) >= limit:
            continue
        try:
            rgb, mode, (width, height), sha256 = _decode(f, min_side, max_pixels, resolution)
        except ValueError as e:
            skipped.append(BadImage(rel, str(e)))
            continue
        arrays.append(preprocess(rgb, resolution))
        per_class[cls] = per_class.get(cls, 0) + 1
        records.append(ImageRecord(rel, cls, label_of.get(cls, -1) if cls else -1, width, height, mode, sha256,
                                   fs_path=None if real == rel else real))
    if not records:
        reasons = "; ".join(str(b) for b in skipped[:5]) or "the folder holds no files"
        raise ImageSetError(f"no usable image in {printable_name(str(root))} ({len(skipped)} skipped: {reasons}). "
                            "Point at a folder of PNG/JPEG files, flat or one sub-folder per class.")
    # a class folder none of whose files decoded is not a class (it would get a label and no images)
    kept = [c for c in class_names if per_class.get(c, 0) > 0]
    if kept != class_names:
        for c in class_names:
            if c not in kept:
                skipped.append(BadImage(f"{c}/", "no usable image in this class folder (every file above was "
                                                 "skipped); it is left out of the classes"))
        relabel = {c: k for k, c in enumerate(kept)}
        records = [dataclasses.replace(r, label=relabel[r.class_name]) if r.class_name is not None else r
                   for r in records]
        class_names = kept
    return ImageSet(
        root=root,
        resolution=resolution,
        class_names=class_names,
        images=torch.from_numpy(np.stack(arrays)),
        labels=torch.tensor([r.label for r in records], dtype=torch.long),
        records=records,
        skipped=skipped,
    )


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the form PNGs and metrics use."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a.permute(0, 2, 3, 1).cpu().numpy()
