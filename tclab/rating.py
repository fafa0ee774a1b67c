"""Blind human A/B rating of full compute against cached images, and the verdict of the raters.

PSNR and SSIM say how far the cached images are from full compute's; only people can say whether
that difference is *worse*. This module turns an in-house report's images into a blind A/B test:

1. :func:`write_rating_set` (notebook 05, one call) writes ``<run>/rating/``:

   - ``pairs.json``: one entry per pair (``"p01"``...): the image index, its source file and class,
     and the two image files shown as ``left`` and ``right``. Nothing in it says which is which.
   - ``key.json``: the unblinding key (per pair, which side is full compute and which cached) and
     how the order was drawn: a balanced random order (half the pairs have full compute on the left,
     which half drawn by ``numpy.random.default_rng(seed)``, the seed recorded there), so a rater
     who leans to one side moves no verdict. The rating page and the widget never read it.
   - ``images/<random hex>.png``: the images, under neutral names (a name does not reveal the side).
   - ``rate.html``: the kernel-free rating page, self-contained (images as data URIs, no external
     resource, works from ``file://``), without the key. It keeps a rater's progress in the
     browser's ``localStorage`` and exports the ratings as JSON and CSV.

2. Raters judge each pair "left better", "same" or "right better", optionally with a score (how
   clear the difference is, 1 = barely visible ... 5 = obvious) and a note: in JupyterLab with the
   widget (``tclab.rate(run_folder)``, :mod:`tclab.rating_widget`), which appends every judgement to
   ``<run>/ratings/widget_<rater>_<hash>.jsonl`` as it is made; or on the page, whose export
   :func:`import_ratings` (``tclab ratings import FILE --run RUN``) checks and adds to
   ``<run>/ratings/``. One record per judgement (:class:`Judgement`); a rater who changes a
   judgement appends a new record, and the latest one per (rater, pair) counts.

3. :func:`human_verdict` maps each judgement through the key ("full compute preferred", "same",
   "cached preferred") and states the raters' preference for full compute with its interval, a
   sign test, the agreement between raters and the worst-rated pairs; :func:`write_verdict` writes
   it to ``<run>/ratings_summary.json`` and re-renders ``report.html`` with a "Human rating (blind
   A/B)" section right after the first screen.

The statistics (:func:`human_verdict`): the preference for full compute is the share of non-tie
judgements that prefer it, with a Wilson score interval whose ``n`` is divided by the design effect
of judgements clustered by pair (several raters judging one pair are not independent samples);
with one judgement per pair it is the plain Wilson interval, and when every judgement prefers the
same side (where the variance cannot measure the clustering) each pair counts once. Wilson rather than a bootstrap over
pairs because a report has a handful of pairs: a bootstrap over six pairs collapses to a single
point when every judgement agrees and covers too little below about twenty clusters, while Wilson
stays inside [0, 1] and keeps its width at 0 or n successes. The sign test is over pairs (each
pair's net preference, ties dropped), so it is valid however many raters judged a pair. Agreement
is over the pairs with at least two raters: pairwise percent agreement and Fleiss' kappa.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import hashlib
import html
import io
import json
import math
import os
import re
import secrets
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .files import write_atomic
from .report import DOES_NOT_HOLD, HOLDS, NOT_MEASURED, WITHIN_NOISE, format_value
from .stats import wilson_interval

#: Folder of the rating set inside a run folder, and its files.
RATING_DIR = "rating"
PAIRS_NAME = "pairs.json"
KEY_NAME = "key.json"
PAGE_NAME = "rate.html"
IMAGES_DIR = "images"
#: Folder of the judgements inside a run folder (``*.jsonl`` and ``*.json``, one record per judgement).
RATINGS_DIR = "ratings"
#: The verdict the run table reads.
SUMMARY_NAME = "ratings_summary.json"
#: A judgement's choices, and where it came from.
CHOICES = ("left", "same", "right")
SOURCES = ("widget", "page", "import")
#: What a judgement means once the key is applied.
FULL, SAME, CACHED = "full", "same", "cached"
OUTCOMES = (FULL, SAME, CACHED)
SCORES = (1, 2, 3, 4, 5)
#: ``format`` of the page's JSON export and of ratings_summary.json.
EXPORT_FORMAT = "tclab.ratings"
SUMMARY_FORMAT = "tclab.ratings_summary"
FORMAT_VERSION = 1
#: The verdict "raters do not see the cached images as worse" holds when the interval of the
#: preference for full compute lies below 0.5 + this margin (no more than a slight preference).
PREFERENCE_MARGIN = 0.15
#: CSV columns of the page's export (and of a CSV given to :func:`import_ratings`).
CSV_COLUMNS = ("set_id", "run", "pair", "choice", "score", "note", "rater", "time_utc", "source")
#: Markers around the section in report.html (so a re-render replaces it, never doubles it).
_SECTION_START, _SECTION_END = "<!-- tclab-human-rating -->", "<!-- /tclab-human-rating -->"
_DISPLAY_PX = 360  # the long side an image is shown at (integer upscaling of small images)


# ---- the rating set --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RatingImages:
    """The images to rate: ``full[i]`` and ``cached[i]`` were made from the same input and seed.

    ``full``, ``cached``: (N, 3, H, W) in [-1, 1] (torch or numpy); ``files``: the source file of
    each (relative to the image folder), ``classes``: its class name or None; ``cached_name``: the
    cached setting's name (goes to key.json only).
    """

    full: Any
    cached: Any
    files: Sequence[str]
    classes: Sequence[str | None]
    cached_name: str = "cached"


def rating_images(measured) -> RatingImages:
    """:class:`RatingImages` of an :class:`tclab.inhouse.InhouseMeasurement` (its full compute and
    cached outputs, same seeds; files and classes from the image set's manifest records)."""
    if isinstance(measured, RatingImages):
        return measured
    recs = measured.images.records
    return RatingImages(full=measured.full_images, cached=measured.cached_images, files=[r.path for r in recs],
                        classes=[r.class_name for r in recs], cached_name=str(measured.name))


@dataclass(frozen=True)
class RatingPair:
    """One pair as ``pairs.json`` holds it: id, image index, source file and class, the two image files."""

    pair: str
    image: int
    file: str
    cls: str | None
    left: str
    right: str

    def to_dict(self) -> dict:
        return {"pair": self.pair, "image": self.image, "file": self.file, "class": self.cls, "left": self.left,
                "right": self.right}


@dataclass
class RatingSet:
    """A run's rating set (``<run>/rating/``): its id, the run's name and the pairs, without the key."""

    run_dir: Path
    set_id: str
    run: str
    pairs: list[RatingPair]

    @property
    def folder(self) -> Path:
        return self.run_dir / RATING_DIR

    @property
    def page(self) -> Path:
        return self.folder / PAGE_NAME

    def pair_ids(self) -> list[str]:
        return [p.pair for p in self.pairs]

    def describe(self) -> str:
        return (f"blind A/B rating set {self.set_id} of run {self.run}: {len(self.pairs)} pairs in random left/right "
                f"order; rate them in {RATING_DIR}/{PAGE_NAME} (then `tclab ratings import FILE --run RUN`) or in "
                "JupyterLab with tclab.rate(run folder)")

    def __repr__(self) -> str:
        return self.describe()

    def _repr_html_(self) -> str:
        """A small table (the report keeps it under Tables), its first row the link to the page."""
        e = html.escape
        rows = [("rating page", f'<a href="{RATING_DIR}/{PAGE_NAME}">{RATING_DIR}/{PAGE_NAME}</a> (open it from the '
                                "run folder; no kernel needed; export the ratings when done)"),
                ("pairs", f"{len(self.pairs)}, each image of full compute against cached in random left/right order"),
                ("set id", e(self.set_id)),
                ("add a page's export", e(f"tclab ratings import FILE --run {self.run}")),
                ("in JupyterLab", e("tclab.rate(run folder)"))]
        body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
        return f'<table class="tclab-rating-set">{body}</table>'


def _rgb_uint8(images) -> np.ndarray:
    """(N, 3 or 1, H, W) in [-1, 1] (torch or numpy) -> (N, H, W, 3) uint8: the explorer's conversion, so the
    rated images are the pixels the report's explorer shows."""
    from .explore import _rgb_uint8 as to_uint8

    return to_uint8(images)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pair_id(i: int, n: int) -> str:
    return f"p{i + 1:0{max(2, len(str(n)))}d}"


def _run_name_of(run) -> tuple[Path, str]:
    d = Path(run.dir if hasattr(run, "dir") else run)
    return d, d.name


def balanced_order(n: int, seed: int) -> np.ndarray:
    """Which pairs show full compute on the left (bool (n,)): a random half of them (for odd ``n``, the
    extra one on a side drawn too), which half drawn by ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    k = n // 2 + (int(rng.integers(0, 2)) if n % 2 else 0)
    left = np.zeros(n, bool)
    left[rng.permutation(n)[:k]] = True
    return left


def write_rating_set(run, measured, *, seed: int | None = None, max_pairs: int | None = None) -> RatingSet:
    """Write the blind A/B rating set of ``measured``'s images into ``<run>/rating/`` (see the module docstring).

    Args:
        run: the run (a ``tclab.runs.RunContext``) or its folder.
        measured: an :class:`tclab.inhouse.InhouseMeasurement` (its full compute and cached outputs) or
            :class:`RatingImages`.
        seed: the seed of the left/right order; None = a fresh random one (recorded in key.json either way).
        max_pairs: rate only the first this many images (None = every one).

    Writing it again replaces the set (a new set id: exports of the old set no longer import); refused
    once the run holds ratings (``<run>/ratings/``), which belong to the set they were made on.
    """
    images = rating_images(measured)
    full, cached = _rgb_uint8(images.full), _rgb_uint8(images.cached)
    if full.shape != cached.shape:
        raise ValueError(f"full compute and cached images differ in shape: {full.shape} vs {cached.shape}; they must "
                         "be the same inputs made with the same seeds")
    n = len(full)
    if len(images.files) != n or len(images.classes) != n:
        raise ValueError(f"{n} image pairs but {len(images.files)} file names and {len(images.classes)} classes: give "
                         "one of each per image")
    if max_pairs is not None:
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
            raise ValueError(f"max_pairs must be an integer >= 1 or None, got {max_pairs!r}")
        n = min(n, max_pairs)
    if n < 1:
        raise ValueError("no images to rate: the measurement holds no image pairs")
    seed = secrets.randbits(32) if seed is None else int(seed)
    full_left = balanced_order(n, seed)
    run_dir, run_name = _run_name_of(run)
    rated = sorted(p.name for p in (run_dir / RATINGS_DIR).glob("*.json*")) if (run_dir / RATINGS_DIR).is_dir() else []
    if rated:
        raise ValueError(f"run folder {run_dir.name} already holds ratings of its rating set ({', '.join(rated)}): a new "
                         "set would pair them with other images; write the new set into a new run folder")
    folder = run_dir / RATING_DIR
    (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for old in (folder / IMAGES_DIR).glob("*.png"):   # a set written again: no stale image stays
        old.unlink()
    set_id = secrets.token_hex(8)
    pairs, key, uris = [], {}, []
    for i in range(n):
        sides = {"left": full[i] if full_left[i] else cached[i], "right": cached[i] if full_left[i] else full[i]}
        names, shown = {}, {}
        for side in ("left", "right"):   # written left first: the files' order on disk says nothing either
            png = _png(sides[side])
            names[side] = f"{secrets.token_hex(8)}.png"
            write_atomic(folder / IMAGES_DIR / names[side], lambda f, b=png: f.write(b))
            shown[side] = _data_uri(png)
        pid = _pair_id(i, n)
        cls = images.classes[i]
        pairs.append(RatingPair(pid, i, str(images.files[i]), None if cls is None else str(cls), names["left"],
                                names["right"]))
        full_side = "left" if full_left[i] else "right"
        cached_side = "right" if full_left[i] else "left"
        key[pid] = {"full": full_side, "cached": cached_side, "full_image": names[full_side],
                    "cached_image": names[cached_side]}
        uris.append(shown)
    rs = RatingSet(run_dir, set_id, run_name, pairs)
    # the key first: a set (pairs.json, with its new set id) never exists without its own key, and a key of
    # another set is refused by its set id (human_verdict), so a write cut short cannot unblind with an old key
    _write_json(folder / KEY_NAME, {
        "version": FORMAT_VERSION, "set_id": set_id, "run": run_name, "seed": seed,
        "order": ("balanced: full compute on the left in a random half of the pairs (n // 2, plus one more on a "
                  "random side for odd n), the half chosen by numpy.random.default_rng(seed).permutation(n) "
                  "(tclab.rating.balanced_order)"),
        "full": "full compute", "cached": images.cached_name, "pairs": key})
    _write_json(folder / PAIRS_NAME, {"version": FORMAT_VERSION, "set_id": set_id, "run": run_name,
                                      "pairs": [p.to_dict() for p in pairs]})
    page = rating_page_html(rs, uris)
    write_atomic(folder / PAGE_NAME, lambda f: f.write(page.encode("utf-8")))
    return rs


def _write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=1, allow_nan=False)
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no {path.name} at {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} cannot be read as JSON ({e})") from None


def read_rating_set(run_dir: str | os.PathLike) -> RatingSet:
    """The rating set of run folder ``run_dir`` (``rating/pairs.json``); FileNotFoundError without one."""
    run_dir = Path(run_dir)
    p = run_dir / RATING_DIR / PAIRS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no rating set ({RATING_DIR}/{PAIRS_NAME}); it is written by "
                                "notebook 05 (tclab.rating.write_rating_set): rate a run of 05_inhouse_report")
    d = _read_json(p, "the rating set")
    try:
        pairs = [RatingPair(str(x["pair"]), int(x["image"]), str(x["file"]), x.get("class"), str(x["left"]),
                            str(x["right"])) for x in d["pairs"]]
        return RatingSet(run_dir, str(d["set_id"]), str(d.get("run") or run_dir.name), pairs)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p} is not a tclab rating set (missing or bad field: {e}); write it again with "
                         "tclab.rating.write_rating_set") from None


def read_key(run_dir: str | os.PathLike, set_id: str | None = None) -> dict[str, dict]:
    """The unblinding key of the run's rating set: ``{pair: {"full": side, "cached": side, ...}}``; with
    ``set_id``, a key written for another set is refused (ValueError)."""
    p = Path(run_dir) / RATING_DIR / KEY_NAME
    d = _read_json(p, "the rating key")
    if set_id is not None and isinstance(d, Mapping) and str(d.get("set_id")) != set_id:
        raise ValueError(f"{p} is the key of rating set {d.get('set_id')!r}, not of this run's set {set_id!r}: the set "
                         "was written again without its key (a write cut short); write the rating set again")
    pairs = d.get("pairs") if isinstance(d, Mapping) else None
    if not isinstance(pairs, Mapping) or any(v.get("full") not in ("left", "right") for v in pairs.values()):
        raise ValueError(f"{p} is not a tclab rating key (per pair, which side is full compute)")
    return {str(k): dict(v) for k, v in pairs.items()}


# ---- judgements ------------------------------------------------------------------------------------

def utc_now() -> str:
    """Now, UTC, ISO 8601 to the millisecond with a ``Z`` (as the page's ``Date.toISOString()``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: Any) -> _dt.datetime:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"time_utc {text!r} is not an ISO 8601 time")
    t = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class Judgement:
    """One judgement of one pair by one rater (one line of a ratings file).

    ``choice``: "left" / "same" / "right" (which side looks better); ``score``: how clear the
    difference is, 1 (barely visible) to 5 (obvious), or None; ``note``: free text; ``time_utc``:
    ISO 8601; ``source``: "widget", "page" or "import".
    """

    pair: str
    choice: str
    rater: str
    time_utc: str
    score: int | None = None
    note: str = ""
    source: str = "import"

    def to_dict(self) -> dict:
        return {"pair": self.pair, "choice": self.choice, "score": self.score, "note": self.note, "rater": self.rater,
                "time_utc": self.time_utc, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], pairs: Iterable[str] | None = None, *,
                  default_source: str = "import", default_rater: str | None = None) -> "Judgement":
        """A checked judgement from a record; ValueError saying what is wrong (``pairs``: the set's pair ids)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a judgement must be an object with pair, choice, rater, time_utc; got {d!r}")
        pair = str(d.get("pair") or "").strip()
        if not pair:
            raise ValueError("no pair id")
        if pairs is not None and pair not in set(pairs):
            raise ValueError(f"unknown pair id {pair!r}")
        choice = str(d.get("choice") or "").strip().lower()
        if choice not in CHOICES:
            raise ValueError(f"choice {d.get('choice')!r} of pair {pair}: must be one of {list(CHOICES)}")
        rater = d.get("rater")
        rater = " ".join(str(rater).split()) if rater is not None else ""
        rater = rater or (" ".join(str(default_rater).split()) if default_rater else "")
        if not rater:
            raise ValueError(f"pair {pair}: no rater name (every judgement needs the rater's name)")
        score = d.get("score")
        if score in (None, "", "null", "None"):
            score = None
        else:
            try:
                f = float(score)
            except (TypeError, ValueError):
                f = float("nan")
            if not (f.is_integer() and int(f) in SCORES) or isinstance(score, bool):
                raise ValueError(f"score {score!r} of pair {pair}: must be an integer 1-5 or empty")
            score = int(f)
        time_utc = d.get("time_utc")
        try:
            _parse_time(time_utc)
        except (ValueError, TypeError):
            raise ValueError(f"time_utc {time_utc!r} of pair {pair}: not an ISO 8601 time "
                             "(e.g. 2026-01-31T12:00:00Z)") from None
        source = str(d.get("source") or default_source)
        if source not in SOURCES:
            raise ValueError(f"source {source!r} of pair {pair}: must be one of {list(SOURCES)}")
        note = d.get("note")
        return cls(pair=pair, choice=choice, rater=rater, time_utc=str(time_utc).strip(), score=score,
                   note="" if note is None else str(note), source=source)


def _safe(text: str, n: int = 32) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:n] or "rater"


def widget_ratings_path(run_dir: str | os.PathLike, rater: str) -> Path:
    """``<run>/ratings/widget_<rater>_<hash>.jsonl``: the file the widget appends ``rater``'s judgements to
    (a rater's next session appends to it too; the hash keeps "Anna B" and "Anna-B" apart)."""
    name = " ".join(rater.split()).casefold()   # one rater, one file: names compare without case
    return Path(run_dir) / RATINGS_DIR / f"widget_{_safe(name)}_{hashlib.sha1(name.encode()).hexdigest()[:6]}.jsonl"


def append_judgement(run_dir: str | os.PathLike, judgement: Judgement, path: str | os.PathLike | None = None) -> Path:
    """Append one judgement to ``path`` (default :func:`widget_ratings_path`) as one JSON line, written in
    a single ``write`` to a file opened for appending and flushed to disk: two writers never interleave
    within a line, and a crash leaves at most one cut-short line (readers leave it out, with a warning;
    the next record starts on a line of its own)."""
    rs = read_rating_set(run_dir)
    j = Judgement.from_dict(judgement.to_dict(), rs.pair_ids())
    out = Path(path) if path is not None else widget_ratings_path(run_dir, j.rater)
    out.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(j.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size:   # a crash mid-line: start on a fresh line so the new record stays readable
            with open(out, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return out


def _records_of_file(p: Path) -> list[Mapping]:
    """The records of one ratings file: JSON lines (``.jsonl``), or a JSON export / list (``.json``)."""
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        out = []
        for no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:   # the remnant of a write cut short (a crash): not a judgement, left out
                warnings.warn(f"{p}, line {no}: not a JSON record (a write cut short?), left out", stacklevel=3)
        return out
    d = json.loads(text)
    return list(d.get("ratings", [])) if isinstance(d, Mapping) else list(d)


def read_judgements(run_dir: str | os.PathLike) -> list[Judgement]:
    """Every judgement in ``<run>/ratings/*.jsonl`` and ``*.json``, checked against the rating set (in file
    name order, then line order). A bad record raises ValueError naming its file."""
    rs = read_rating_set(run_dir)
    ids = rs.pair_ids()
    out = []
    folder = Path(run_dir) / RATINGS_DIR
    files = sorted([*folder.glob("*.jsonl"), *folder.glob("*.json")]) if folder.is_dir() else []
    for p in files:
        try:
            out += [Judgement.from_dict(r, ids) for r in _records_of_file(p)]
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    return out


def latest_judgements(judgements: Iterable[Judgement]) -> list[Judgement]:
    """The judgement that counts per (rater, pair): the latest by ``time_utc`` (a later record of equal time
    wins). Rater names compare without case and surrounding space."""
    best: dict[tuple[str, str], tuple[_dt.datetime, int, Judgement]] = {}
    for i, j in enumerate(judgements):
        k = (j.rater.casefold(), j.pair)
        t = _parse_time(j.time_utc)
        if k not in best or (t, i) >= best[k][:2]:
            best[k] = (t, i, j)
    return [v[2] for v in sorted(best.values(), key=lambda v: (v[2].pair, v[2].rater.casefold()))]


# ---- importing the page's export -------------------------------------------------------------------

def _read_export(file: Path) -> tuple[dict, list[dict]]:
    """(header, records) of a page export: JSON (``{"format": "tclab.ratings", "set_id", ..., "ratings": [...]}``)
    or CSV (columns :data:`CSV_COLUMNS`; set_id and run in every row)."""
    suffix = file.suffix.lower()
    if suffix == ".json":
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{file} is not valid JSON ({e}); give the .json or .csv file the rating page exported") \
                from None
        if not isinstance(d, Mapping) or d.get("format") != EXPORT_FORMAT or not isinstance(d.get("ratings"), list):
            raise ValueError(f"{file} is not a ratings export of a tclab rating page (it needs \"format\": "
                             f"\"{EXPORT_FORMAT}\", a set_id and a ratings list); export it again from rate.html")
        return {k: d.get(k) for k in ("set_id", "run", "rater")}, [dict(r) for r in d["ratings"]]
    if suffix == ".csv":
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("set_id", "pair", "choice", "rater", "time_utc") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{file}: CSV without the column(s) {missing}; a rating page's CSV export has "
                                 f"{list(CSV_COLUMNS)}")
            rows = list(reader)
        ids = {r.get("set_id") or "" for r in rows}
        if len(ids) > 1:
            raise ValueError(f"{file} mixes ratings of {len(ids)} rating sets ({sorted(ids)}); import one set's export")
        runs_ = {r.get("run") or "" for r in rows}
        return {"set_id": ids.pop() if ids else None, "run": runs_.pop() if len(runs_) == 1 else None,
                "rater": None}, rows
    raise ValueError(f"{file}: give the .json or .csv file the rating page exported (got a {suffix or 'suffix-less'} "
                     "file)")


def import_ratings(run_dir: str | os.PathLike, file: str | os.PathLike) -> Path:
    """Check a rating page's export (``file``: its JSON or CSV) and add it to ``<run>/ratings/``; returns
    the path written (``ratings/page_<rater>_<hash>.jsonl``), then updates the verdict and the report
    (:func:`write_verdict`).

    Refused with ValueError, nothing written: a file of another rating set (its ``set_id`` is not this
    run's: the error names the run it belongs to), unknown pair ids, a choice other than left / same /
    right, a score outside 1-5, a missing rater or time, no ratings at all. Importing the same file
    again writes nothing new and returns the file it went to (the latest judgement per rater and
    pair counts anyway).
    """
    run_dir, file = Path(run_dir), Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no ratings file at {file}; give the .json or .csv the rating page exported")
    rs = read_rating_set(run_dir)
    head, records = _read_export(file)
    if not head.get("set_id"):
        raise ValueError(f"{file} names no rating set (set_id); export it again from the run's {RATING_DIR}/{PAGE_NAME}")
    if head["set_id"] != rs.set_id:
        other = head.get("run") or "the run it belongs to"
        raise ValueError(f"{file} rates rating set {head['set_id']} of run {head.get('run') or '(unnamed)'}, but run "
                         f"{run_dir.name} has rating set {rs.set_id}: import it into {other} "
                         "(tclab ratings import FILE --run THAT_RUN)")
    if not records:
        raise ValueError(f"{file} holds no ratings: rate at least one pair before exporting")
    checked, problems = [], []
    for i, r in enumerate(records, 1):
        try:
            checked.append(Judgement.from_dict(r, rs.pair_ids(), default_rater=head.get("rater")))
        except ValueError as e:
            problems.append(f"rating {i}: {e}")
    if problems:
        unknown = sorted({m.group(1) for p in problems if (m := re.search(r"unknown pair id '([^']*)'", p))})
        hint = (f" (the set has pairs {rs.pair_ids()[0]}..{rs.pair_ids()[-1]})" if unknown else "")
        raise ValueError(f"{file}: {len(problems)} bad rating(s), nothing imported{hint}:\n  "
                         + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    text = "".join(json.dumps(j.to_dict(), ensure_ascii=False) + "\n" for j in checked)
    raters = sorted({j.rater for j in checked}, key=str.casefold)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    out = run_dir / RATINGS_DIR / f"page_{_safe('+'.join(raters))}_{digest}.jsonl"
    if not out.is_file():
        write_atomic(out, lambda f: f.write(text.encode("utf-8")))
    write_verdict(run_dir)
    return out


# ---- the verdict -----------------------------------------------------------------------------------

def fleiss_kappa(counts) -> float | None:
    """Fleiss' kappa of a (subjects, categories) table of counts (``counts[i, j]``: raters who put subject
    ``i`` in category ``j``). Subjects may have different numbers of raters (each needs at least 2;
    others are left out): P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)), P = mean P_i, p_j = share of
    all ratings in category j, P_e = sum p_j^2, kappa = (P - P_e) / (1 - P_e). None when no subject has
    two raters or every rating is in one category (P_e = 1: agreement is perfect but kappa undefined)."""
    c = np.asarray(counts, dtype=float)
    if c.ndim != 2:
        raise ValueError(f"counts must be a (subjects, categories) table, got shape {c.shape}")
    c = c[c.sum(axis=1) >= 2]
    if not len(c):
        return None
    n_i = c.sum(axis=1)
    p_i = (c * (c - 1)).sum(axis=1) / (n_i * (n_i - 1))
    p_j = c.sum(axis=0) / c.sum()
    p_e = float((p_j ** 2).sum())
    if p_e >= 1 - 1e-12:
        return None
    return float((p_i.mean() - p_e) / (1 - p_e))


def sign_test_p(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test of ``wins`` against ``losses`` (ties already left out): the probability,
    under no preference (p = 1/2), of a split at least as lopsided. None when both are 0."""
    m = wins + losses
    if m == 0:
        return None
    k = max(wins, losses)
    tail = sum(math.comb(m, i) for i in range(k, m + 1)) / 2 ** m
    return float(min(1.0, 2 * tail))


@dataclass
class WorstPair:
    """A pair with judgements against the cached image, unblinded: image files of both sides, the counts."""

    pair: str
    image: int
    file: str
    cls: str | None
    full_preferred: int
    same: int
    cached_preferred: int
    full_image: str
    cached_image: str
    notes: list[str] = field(default_factory=list)
    full_side: str = ""   # where the raters saw full compute ("left" / "right"): the notes speak of sides

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d


@dataclass
class HumanVerdict:
    """What the raters said, unblinded (:func:`human_verdict`); ``to_dict`` is ratings_summary.json.

    Counts are of the judgements that count (the latest per rater and pair). ``preference_full``: the
    share of non-tie judgements preferring full compute, with its Wilson interval
    (``preference_full_ci_low`` / ``_high``, at ``confidence``) over ``preference_n_effective``
    judgements (``n`` over ``design_effect``, the design effect of clustering by pair, at least 1;
    when every judgement prefers the same side, one per pair); ``ties_share``: "same" judgements
    among all; ``sign_test_p``: the exact two-sided sign test over pairs (each pair's net
    preference; ``sign_test_pairs`` pairs had one). Agreement over
    the ``pairs_multi_rated`` pairs with at least two raters: ``percent_agreement`` (share of rater
    pairs on one pair that agree, averaged over pairs) and ``fleiss_kappa``; None with fewer.
    ``mean_score_full`` / ``mean_score_cached``: mean score (how clear the difference was, 1-5) of the
    judgements preferring full compute / the cached image; ``worst``: the pairs with the most
    judgements preferring full compute. ``verdict`` is a :mod:`tclab.report` verdict of the finding
    "raters do not see the cached images as worse", stated in ``sentence`` under ``criterion``.
    """

    set_id: str
    run: str
    pairs_in_set: int
    judgements: int = 0
    raters: list[str] = field(default_factory=list)
    pairs_rated: int = 0
    full_preferred: int = 0
    same: int = 0
    cached_preferred: int = 0
    preference_full: float | None = None
    preference_full_ci_low: float | None = None
    preference_full_ci_high: float | None = None
    preference_n_effective: float | None = None
    design_effect: float | None = None
    confidence: float = 0.95
    interval_method: str = ("Wilson score interval over the non-tie judgements, n divided by the design effect of "
                            "judgements clustered by pair")
    ties_share: float | None = None
    sign_test_p: float | None = None
    sign_test_pairs: int = 0
    pairs_multi_rated: int = 0
    percent_agreement: float | None = None
    fleiss_kappa: float | None = None
    scored: int = 0
    mean_score_full: float | None = None
    mean_score_cached: float | None = None
    worst: list[WorstPair] = field(default_factory=list)
    verdict: str = NOT_MEASURED
    sentence: str = ""
    criterion: str = ""
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst"] = [w.to_dict() for w in self.worst]
        return {"format": SUMMARY_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HumanVerdict":
        if not isinstance(d, Mapping) or d.get("format") != SUMMARY_FORMAT or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {SUMMARY_FORMAT} version {FORMAT_VERSION} summary")
        d = dict(d)
        d.pop("format")
        worst = []
        for w in d.pop("worst", []):
            w = dict(w)
            w["cls"] = w.pop("class", None)
            worst.append(WorstPair(**w))
        return cls(**d, worst=worst)


def human_verdict(run_dir: str | os.PathLike, confidence: float = 0.95, worst_k: int = 3) -> HumanVerdict:
    """The raters' verdict on run ``run_dir``'s rating set (see :class:`HumanVerdict` and the module docstring)."""
    run_dir = Path(run_dir)
    rs = read_rating_set(run_dir)
    key = read_key(run_dir, rs.set_id)
    missing = [p for p in rs.pair_ids() if p not in key]
    if missing:
        raise ValueError(f"the rating key {RATING_DIR}/{KEY_NAME} lacks pairs {missing}: the set and its key do not "
                         "belong together; write the rating set again")
    js = latest_judgements(read_judgements(run_dir))
    v = HumanVerdict(set_id=rs.set_id, run=run_dir.name, pairs_in_set=len(rs.pairs), confidence=confidence)
    outcome = {FULL: 0, SAME: 0, CACHED: 0}
    per_pair: dict[str, dict[str, int]] = {p: {FULL: 0, SAME: 0, CACHED: 0} for p in rs.pair_ids()}
    notes: dict[str, list[str]] = {p: [] for p in rs.pair_ids()}
    scores: dict[str, list[int]] = {FULL: [], CACHED: []}
    for j in js:
        o = SAME if j.choice == "same" else (FULL if j.choice == key[j.pair]["full"] else CACHED)
        outcome[o] += 1
        per_pair[j.pair][o] += 1
        if j.note.strip():
            notes[j.pair].append(f"{j.rater}: {j.note.strip()}")
        if j.score is not None and o != SAME:
            scores[o].append(j.score)
    v.judgements = len(js)
    v.raters = sorted({j.rater.casefold(): j.rater for j in js}.values(), key=str.casefold)   # one per name, any case
    v.pairs_rated = sum(1 for c in per_pair.values() if sum(c.values()))
    v.full_preferred, v.same, v.cached_preferred = outcome[FULL], outcome[SAME], outcome[CACHED]
    v.scored = sum(1 for j in js if j.score is not None)
    v.mean_score_full = float(np.mean(scores[FULL])) if scores[FULL] else None
    v.mean_score_cached = float(np.mean(scores[CACHED])) if scores[CACHED] else None
    if js:
        v.ties_share = outcome[SAME] / len(js)
    n = outcome[FULL] + outcome[CACHED]
    if n:
        p = outcome[FULL] / n
        y = np.array([c[FULL] for c in per_pair.values() if c[FULL] + c[CACHED]], float)
        m = np.array([c[FULL] + c[CACHED] for c in per_pair.values() if c[FULL] + c[CACHED]], float)
        if 0 < p < 1:   # the cluster-robust variance of p over its binomial variance (Kish's design effect)
            deff = max(1.0, float(((y - p * m) ** 2).sum() / n ** 2) / (p * (1 - p) / n))
        else:   # at 0% or 100% the variance cannot tell how alike a pair's judgements are: take them as fully
            deff = n / len(m)   # alike (each pair counts once), the cautious end
        n_eff = max(1.0, n / deff)
        ci = wilson_interval(p * n_eff, n_eff, confidence)
        v.preference_full, v.preference_full_ci_low, v.preference_full_ci_high = p, ci.low, ci.high
        v.preference_n_effective, v.design_effect = n_eff, deff
    net = [c[FULL] - c[CACHED] for c in per_pair.values()]
    v.sign_test_pairs = sum(1 for d in net if d)
    v.sign_test_p = sign_test_p(sum(1 for d in net if d > 0), sum(1 for d in net if d < 0))
    multi = [[c[o] for o in OUTCOMES] for c in per_pair.values() if sum(c.values()) >= 2]
    v.pairs_multi_rated = len(multi)
    if multi:
        a = np.array(multi, float)
        k = a.sum(axis=1)
        v.percent_agreement = float(((a * (a - 1)).sum(axis=1) / (k * (k - 1))).mean())
        v.fleiss_kappa = fleiss_kappa(a)
    by_id = {p.pair: p for p in rs.pairs}
    against = sorted((p for p, c in per_pair.items() if c[FULL]),
                     key=lambda p: (-per_pair[p][FULL], -(per_pair[p][FULL] - per_pair[p][CACHED]), p))
    v.worst = [WorstPair(p, by_id[p].image, by_id[p].file, by_id[p].cls, per_pair[p][FULL], per_pair[p][SAME],
                         per_pair[p][CACHED], key[p]["full_image"], key[p]["cached_image"], notes[p], key[p]["full"])
               for p in against[:worst_k]]
    v.verdict, v.sentence, v.criterion = _verdict_sentence(v)
    return v


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _verdict_sentence(v: HumanVerdict) -> tuple[str, str, str]:
    top = 0.5 + PREFERENCE_MARGIN
    criterion = (f"raters do not see the cached images as worse: the {v.confidence:.0%} interval of the preference for "
                 f"full compute lies below {top:.0%} (at most a slight preference); does not hold when it lies above "
                 "50%; within noise otherwise")
    if not v.judgements:
        return NOT_MEASURED, f"No ratings yet: none of the {v.pairs_in_set} pairs has been rated.", criterion
    who = (f"{v.judgements} judgement{'s' if v.judgements != 1 else ''} of {v.pairs_rated} of {v.pairs_in_set} pairs by "
           f"{len(v.raters)} rater{'s' if len(v.raters) != 1 else ''}")
    if v.preference_full is None:
        return (WITHIN_NOISE, f"All {who} were 'same': no rater preferred either image, so there is no preference to "
                f"put an interval on.", criterion)
    lo, hi = v.preference_full_ci_low, v.preference_full_ci_high
    ties = f", {v.same} 'same'" if v.same else ""
    p_text = f"; sign test over pairs p = {v.sign_test_p:.2g}" if v.sign_test_p is not None else ""
    head = (f"Raters preferred full compute in {_pct(v.preference_full)} [{_pct(lo)}, {_pct(hi)}] of the "
            f"{v.full_preferred + v.cached_preferred} judgements that preferred one image ({who}{ties}{p_text})")
    if lo > 0.5:
        return DOES_NOT_HOLD, head + ": they see the cached images as worse.", criterion
    if hi < top:
        return HOLDS, head + ": the cached images look as good as full compute's to them.", criterion
    return WITHIN_NOISE, head + ": too few judgements to tell a real preference from chance.", criterion


# ---- ratings_summary.json and the report section ---------------------------------------------------

def _executed_notebook(run_dir: Path) -> Path | None:
    prov = _read_json_quiet(run_dir / "provenance.json")
    name = prov.get("executed_notebook")
    if name and (run_dir / name).is_file():
        return run_dir / name
    found = sorted(run_dir.glob("*.ipynb"))
    return found[0] if len(found) == 1 else None


def _read_json_quiet(p: Path) -> dict:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _staging_dir_of(executed: Path) -> str | None:
    """The folder the notebook ran in (papermill's injected ``run_dir``), to map it to the run folder."""
    import ast

    try:
        nb = json.loads(executed.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for cell in nb.get("cells", []):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell.get("source", ""))
            try:
                for node in ast.parse(src).body:
                    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "run_dir" for t in node.targets):
                        value = ast.literal_eval(node.value)
                        return str(value) if value else None
            except (SyntaxError, ValueError):
                return None
    return None


def render_report_with_verdict(run_dir: str | os.PathLike, verdict: HumanVerdict) -> Path | None:
    """Re-render ``<run>/report.html`` from the run's executed notebook (``tclab.runs.render_html``, with the
    summary, provenance and parameters it was first rendered with) and put the "Human rating (blind A/B)"
    section right after the first screen; written atomically. A run without an executed notebook keeps
    its report.html, the section replaced in place. Returns the report's path, or None without either."""
    from . import runs

    run_dir = Path(run_dir)
    out = run_dir / runs.REPORT_NAME
    executed = _executed_notebook(run_dir)
    if executed is not None:
        prov = _read_json_quiet(run_dir / "provenance.json")
        summary = _read_json_quiet(run_dir / "summary.json")
        params = prov.get("parameters")
        if not isinstance(params, dict):
            import yaml

            try:
                params = yaml.safe_load((run_dir / "params.yaml").read_text()) or {}
            except (OSError, yaml.YAMLError):
                params = {}
        staged = _staging_dir_of(executed)
        replacements = {staged: str(run_dir)} if staged and staged != str(run_dir) else {}
        tmp = run_dir / f".{runs.REPORT_NAME}.{os.getpid()}.render.tmp"
        try:
            runs.render_html(executed, tmp, title=run_dir.name, params=params,
                             overridden=list((prov.get("overrides") or {}).keys()), summary=summary, provenance=prov,
                             replacements=replacements, error=prov.get("error"))
            page = tmp.read_text(encoding="utf-8")
        finally:
            tmp.unlink(missing_ok=True)
    elif out.is_file():
        page = out.read_text(encoding="utf-8")
    else:
        return None
    page = insert_section(page, report_section_html(run_dir, verdict))
    return write_atomic(out, lambda f: f.write(page.encode("utf-8")))


def insert_section(page: str, section: str) -> str:
    """``page`` (a report.html) with ``section`` right after the first screen (``<section id="summary">``),
    replacing an earlier one, and a link to it in the table of contents."""
    a, b = page.find(_SECTION_START), page.find(_SECTION_END)
    if a >= 0 and b > a:
        page = page[:a] + page[b + len(_SECTION_END):]
    page = page.replace(' <a href="#human-rating">Human rating</a>', "")
    start = page.find('<section id="summary">')
    end = page.find("</section>", start) + len("</section>") if start >= 0 else -1
    if end < len("</section>"):   # not a tclab report layout: put it first in <main>, or at the top of <body>
        m = re.search(r"<main[^>]*>|<body[^>]*>", page)
        end = m.end() if m else 0
    page = page[:end] + "\n" + _SECTION_START + section + _SECTION_END + page[end:]
    return page.replace('<a href="#summary">Summary</a>',
                        '<a href="#summary">Summary</a> <a href="#human-rating">Human rating</a>', 1)


_SECTION_CSS = """
.tclab-rating td.num { white-space: nowrap; }
.tclab-rating .worst { display: flex; flex-wrap: wrap; gap: 1.2em 2em; margin: 0.8em 0; }
.tclab-rating .worst-pair { border: 1px solid var(--line, #d9dee5); border-radius: 6px; padding: 0.6em 0.8em; }
.tclab-rating .worst-pair figure { display: inline-block; margin: 0.3em 0.6em 0 0; text-align: center; }
.tclab-rating .worst-pair img { width: 128px; height: 128px; image-rendering: pixelated; display: block;
  border: 1px solid var(--line, #d9dee5); }
.tclab-rating .worst-pair figcaption { margin: 0.2em 0 0; }
.tclab-rating .worst-pair ul { margin: 0.3em 0 0; padding-left: 1.2em; font-size: 0.9em; max-width: 22em; }
.tclab-rating .worst-pair .meta { max-width: 22em; }
"""


def report_section_html(run_dir: str | os.PathLike, verdict: HumanVerdict) -> str:
    """The report's "Human rating (blind A/B)" section: the verdict sentence with its badge, the numbers
    with the interval, the agreement, and the worst-rated pairs' images, labelled."""
    run_dir = Path(run_dir)
    e = html.escape
    v = verdict
    badge = f'<span class="badge {v.verdict.replace(" ", "-")}">{e(v.verdict)}</span>'
    link = f'<a href="{RATING_DIR}/{PAGE_NAME}">{RATING_DIR}/{PAGE_NAME}</a>'
    how = (f"<p class=\"meta\">Pairs of the same input and seed, full compute and cached in random left/right order, "
           f"rated without knowing which is which, in {link} (export, then <code>tclab ratings import FILE --run "
           f"{e(run_dir.name)}</code>) or in JupyterLab (<code>tclab.rate(run folder)</code>). Rate before reading on: "
           "the worst-rated pairs below are shown labelled.</p>")
    parts = [f'<section id="human-rating" class="tclab-rating"><style>{_SECTION_CSS}</style>',
             "<h2>Human rating (blind A/B)</h2>",
             f'<table class="findings"><tr><th>verdict</th><th>finding</th><th>criterion</th></tr><tr>'
             f'<td class="verdict">{badge}</td><td>{e(v.sentence)}</td><td class="criterion">{e(v.criterion)}</td>'
             "</tr></table>", how]
    if v.judgements:
        conf = f"{v.confidence:.0%}"
        ci = (f"{conf} CI {format_value(v.preference_full_ci_low, '%')} to {format_value(v.preference_full_ci_high, '%')}"
              f" (Wilson, effective N = {v.preference_n_effective:.3g} of {v.full_preferred + v.cached_preferred} "
              f"judgements; design effect of clustering by pair {v.design_effect:.2f})"
              if v.preference_full is not None else "no judgement preferred one image")
        rows = [
            ("preference for full compute (of judgements preferring one image)", format_value(v.preference_full, "%"),
             ci),
            ("judgements: full compute / same / cached preferred",
             f"{v.full_preferred} / {v.same} / {v.cached_preferred}",
             f"ties {format_value(v.ties_share, '%')} of {v.judgements}; the latest judgement per rater and pair counts"),
            ("sign test over pairs (two-sided, exact)",
             "-" if v.sign_test_p is None else f"p = {v.sign_test_p:.2g}",
             f"{v.sign_test_pairs} pair(s) with a net preference"),
            ("pairs rated", f"{v.pairs_rated} of {v.pairs_in_set}", ""),
            ("raters", str(len(v.raters)), ", ".join(v.raters)),
            ("agreement between raters (pairwise)", format_value(v.percent_agreement, "%"),
             f"over {v.pairs_multi_rated} pair(s) with two or more raters" if v.pairs_multi_rated else
             "needs a pair rated by two or more raters"),
            ("Fleiss' kappa", "-" if v.fleiss_kappa is None else f"{v.fleiss_kappa:.2f}",
             ("1 = full agreement, 0 = what chance gives; low, even negative, when nearly every judgement falls in "
              "one category (chance agreement is then high)" if v.fleiss_kappa is not None else
              ("undefined: every judgement in one category" if v.pairs_multi_rated else ""))),
        ]
        if v.scored:
            rows.append(("how clear the difference was (1-5), mean",
                         f"{'-' if v.mean_score_full is None else f'{v.mean_score_full:.1f}'} / "
                         f"{'-' if v.mean_score_cached is None else f'{v.mean_score_cached:.1f}'}",
                         f"when full compute / the cached image was preferred; {v.scored} scored judgement(s)"))
        parts.append('<table class="key-numbers"><tr><th>human rating</th><th class="num">value</th><th></th></tr>'
                     + "".join(f'<tr><td>{e(a)}</td><td class="num">{e(b)}</td><td class="meta">{e(c)}</td></tr>'
                               for a, b, c in rows) + "</table>")
    if v.worst:
        psnr = _per_image_psnr(run_dir)
        parts.append('<h3>The worst-rated pairs (most judgements for full compute over cached)</h3><div class="worst">')
        folder = run_dir / RATING_DIR / IMAGES_DIR
        for w in v.worst:
            figs = "".join(f'<figure><img src="{_file_uri(folder / name)}" alt="{e(label)}, pair {e(w.pair)}">'
                           f"<figcaption>{e(label)}</figcaption></figure>"
                           for label, name in (("full compute", w.full_image), ("cached", w.cached_image)))
            extra = f", PSNR {psnr[w.image]:.1f} dB" if w.image in psnr else ""
            notes = "".join(f"<li>{e(n)}</li>" for n in w.notes)
            seen = (f"; raters saw full compute on the {w.full_side}, cached on the "
                    f"{'right' if w.full_side == 'left' else 'left'}" if w.full_side else "")
            parts.append(f'<div class="worst-pair"><b>{e(w.pair)}</b> <span class="meta">{e(w.file)}'
                         f"{', ' + e(w.cls) if w.cls else ''}{extra}</span><br>{figs}<div class=\"meta\">full compute "
                         f"preferred {w.full_preferred}, same {w.same}, cached preferred {w.cached_preferred}"
                         f"{e(seen)}</div>"
                         + (f"<ul>{notes}</ul>" if notes else "") + "</div>")
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _file_uri(path: Path) -> str:
    try:
        return _data_uri(path.read_bytes())
    except OSError:
        return ""


def _per_image_psnr(run_dir: Path) -> dict[int, float]:
    rows = (_read_json_quiet(run_dir / "summary.json").get("details") or {}).get("per_image") or []
    out = {}
    for r in rows:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out[int(r["index"])] = float(r["psnr"])
    return out


def write_verdict(run_dir: str | os.PathLike, confidence: float = 0.95, worst_k: int = 3) -> HumanVerdict:
    """:func:`human_verdict` of the run, written to ``<run>/ratings_summary.json`` (atomically), and the run's
    report.html re-rendered with the "Human rating (blind A/B)" section (:func:`render_report_with_verdict`).
    Returns the verdict. Called by :func:`import_ratings` and by the widget's "finish" button."""
    import fcntl

    run_dir = Path(run_dir)
    # one writer at a time (two imports, an import and the widget's finish): each reads every judgement and
    # writes the summary and report from them, so the last one to finish has seen all the others
    lock = os.open(run_dir / ".ratings.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        v = human_verdict(run_dir, confidence, worst_k)
        _write_json(run_dir / SUMMARY_NAME, v.to_dict())
        render_report_with_verdict(run_dir, v)
    finally:
        os.close(lock)
    from . import runs

    runs.refresh_index(run_dir.parent)   # the verdict shows on index.html and in the run table at once
    return v


def read_verdict(run_dir: str | os.PathLike) -> HumanVerdict | None:
    """``<run>/ratings_summary.json`` as a :class:`HumanVerdict`, or None when the run has none (or it is unreadable)."""
    d = _read_json_quiet(Path(run_dir) / SUMMARY_NAME)
    try:
        return HumanVerdict.from_dict(d) if d else None
    except (TypeError, ValueError):
        return None


# ---- the kernel-free page --------------------------------------------------------------------------

_PAGE_CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; margin: 0; background: #fff; }
main { max-width: 1000px; margin: 0 auto; padding: 1.2em 1.5em 3em; }
h1 { font-size: 1.45em; margin: 0.2em 0; }
.meta { color: #5f6b7a; font-size: 0.9em; }
.row { display: flex; flex-wrap: wrap; align-items: center; gap: 0.6em 1.2em; margin: 0.8em 0; }
#tclab-rater { font-size: 1em; padding: 0.3em 0.5em; width: 16em; }
#tclab-counter { font-weight: 600; }
.pair { display: flex; gap: 2em; justify-content: center; margin: 1em 0; }
.pair figure { margin: 0; text-align: center; }
.pair img { display: block; border: 1px solid #d9dee5; background: #eee; }
.pair figcaption { margin-top: 0.3em; font-weight: 600; color: #5f6b7a; }
button { font-size: 1em; padding: 0.45em 1em; border: 1px solid #9aa6b5; border-radius: 5px; background: #f5f7fa;
         cursor: pointer; }
button:disabled { opacity: 0.45; cursor: default; }
button.tclab-choice.chosen { background: #2f5da8; color: #fff; border-color: #2f5da8; }
.choices { justify-content: center; }
#tclab-note { width: 100%; min-height: 3em; font: inherit; padding: 0.3em; }
#tclab-status { min-height: 1.4em; }
.row.scores { gap: 0.4em 0.9em; } .scores label { cursor: pointer; }
"""

_PAGE_JS = r"""
(function () {
  'use strict';
  const data = JSON.parse(document.getElementById('tclab-rating-data').textContent);
  const storeKey = 'tclab-rating/' + data.set_id;
  const $ = (id) => document.getElementById(id);
  let state = {rater: '', by: {}, pos: {}};
  try { const s = JSON.parse(localStorage.getItem(storeKey) || 'null'); if (s && s.by) state = s; } catch (e) {}
  const save = () => { try { localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) {} };
  const clean = (s) => s.replace(/\s+/g, ' ').trim();
  const raterKey = () => clean(state.rater).toLowerCase();
  const mine = () => state.by[raterKey()] || (state.by[raterKey()] = {});
  let i = 0;

  function show() {
    const r = clean(state.rater), p = data.pairs[i], done = r ? Object.keys(mine()).length : 0;
    $('tclab-counter').textContent = 'pair ' + (i + 1) + ' of ' + data.pairs.length + ' (' + p.pair + ')'
      + (p.class ? ' \u00b7 ' + p.class : '') + ' \u00b7 rated ' + done + ' of ' + data.pairs.length;
    for (const side of ['left', 'right']) {
      const img = $('tclab-' + side);
      img.src = p[side]; img.width = data.display[0]; img.height = data.display[1];
    }
    const rec = r ? mine()[p.pair] : null;
    document.querySelectorAll('.tclab-choice').forEach((b) => {
      b.disabled = !r; b.classList.toggle('chosen', !!rec && rec.choice === b.dataset.choice);
    });
    document.querySelectorAll('input.tclab-score').forEach((x) => {
      x.checked = rec ? String(rec.score === null ? '' : rec.score) === x.value : x.value === '';
    });
    $('tclab-note').value = rec ? rec.note : '';
    $('tclab-prev').disabled = i === 0;
    $('tclab-next').disabled = i === data.pairs.length - 1;
    $('tclab-export').disabled = !r || !done;
    $('tclab-status').textContent = !r ? 'Enter your name to start.'
      : (done === data.pairs.length ? 'All ' + done + ' pairs rated: export your ratings.' : '');
  }
  function score() {
    const x = document.querySelector('input.tclab-score:checked');
    return x && x.value ? Number(x.value) : null;
  }
  function record(choice) {
    if (!clean(state.rater)) return;
    const p = data.pairs[i], old = mine()[p.pair];
    if (!choice && !old) return;
    mine()[p.pair] = {pair: p.pair, choice: choice || old.choice, score: score(), note: $('tclab-note').value,
                      rater: clean(state.rater), time_utc: new Date().toISOString(), source: 'page'};
    save(); show();
  }
  function go(k) { i = Math.max(0, Math.min(data.pairs.length - 1, k)); state.pos[raterKey()] = i; save(); show(); }
  function csvCell(v) { v = v === null || v === undefined ? '' : String(v); return '"' + v.replace(/"/g, '""') + '"'; }
  function download(name, text, type) {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([text], {type: type}));
    a.download = name; document.body.appendChild(a); a.click(); a.remove();
  }
  function exportRatings() {
    const r = clean(state.rater), now = new Date().toISOString();
    const ratings = data.pairs.map((p) => mine()[p.pair]).filter(Boolean);
    const out = {format: 'tclab.ratings', version: 1, set_id: data.set_id, run: data.run, rater: r,
                 exported_utc: now, pairs_in_set: data.pairs.length, ratings: ratings};
    const stem = 'ratings_' + data.run + '_' + r.replace(/[^A-Za-z0-9_-]+/g, '-') + '_'
      + now.replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
    const cols = ['set_id', 'run', 'pair', 'choice', 'score', 'note', 'rater', 'time_utc', 'source'];
    const rows = ratings.map((x) => cols.map((c) => csvCell(c === 'set_id' ? data.set_id : c === 'run' ? data.run : x[c])).join(','));
    download(stem + '.json', JSON.stringify(out, null, 1), 'application/json');
    download(stem + '.csv', [cols.join(',')].concat(rows).join('\r\n') + '\r\n', 'text/csv');
    $('tclab-status').textContent = 'Exported ' + ratings.length + ' rating(s) as ' + stem + '.json and .csv: give '
      + 'either to `tclab ratings import FILE --run ' + data.run + '`.';
  }
  $('tclab-rater').value = state.rater || '';
  $('tclab-rater').addEventListener('input', (ev) => {
    state.rater = ev.target.value; i = state.pos[raterKey()] || 0; save(); show();
  });
  document.querySelectorAll('.tclab-choice').forEach((b) => b.addEventListener('click', () => record(b.dataset.choice)));
  document.querySelectorAll('input.tclab-score').forEach((x) => x.addEventListener('change', () => record(null)));
  $('tclab-note').addEventListener('change', () => record(null));
  $('tclab-prev').addEventListener('click', () => go(i - 1));
  $('tclab-next').addEventListener('click', () => go(i + 1));
  $('tclab-export').addEventListener('click', exportRatings);
  document.addEventListener('keydown', (ev) => {
    if (ev.target.closest('input[type=text], textarea')) return;
    const k = {a: 'left', s: 'same', d: 'right'}[ev.key];
    if (k) record(k);
    else if (ev.key === 'ArrowLeft') go(i - 1);
    else if (ev.key === 'ArrowRight') go(i + 1);
  });
  i = state.rater ? (state.pos[raterKey()] || 0) : 0;
  show();
})();
"""


def _display_size(h: int, w: int, target: int = _DISPLAY_PX) -> tuple[int, int, bool]:
    """(width, height, pixelated) an (h, w) image is shown at: upscaled by a whole factor (nearest
    neighbour, so the rater sees the pixels the model made) or shrunk to fit ``target``."""
    s = target / max(h, w)
    if s >= 2:
        k = int(s)
        return w * k, h * k, True
    return max(1, round(w * min(1.0, s))), max(1, round(h * min(1.0, s))), False


def rating_page_html(rating_set: RatingSet, images: Sequence[Mapping[str, str]]) -> str:
    """The self-contained rating page of ``rating_set`` (``images[i]``: ``{"left": data URI, "right": data URI}``
    of pair ``i``). It holds the pairs in their blind order and nothing of the key.

    DOM (the browser test relies on it): ``#tclab-rater`` (text input), ``#tclab-counter``,
    ``img#tclab-left`` / ``img#tclab-right``, ``button.tclab-choice[data-choice=left|same|right]``,
    ``input.tclab-score`` (radio, values "" and 1-5), ``#tclab-note``, ``#tclab-prev``, ``#tclab-next``,
    ``#tclab-export`` (downloads ``ratings_<run>_<rater>_<time>.json`` and ``.csv``), ``#tclab-status``.
    Progress is kept in ``localStorage`` under ``tclab-rating/<set id>``, per rater name.
    """
    first = images[0]["left"] if images else ""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(first.split(",", 1)[1]))) as im:
        w, h = im.size
    dw, dh, pixelated = _display_size(h, w)
    data = {"version": FORMAT_VERSION, "set_id": rating_set.set_id, "run": rating_set.run, "display": [dw, dh],
            "pairs": [{"pair": p.pair, "class": p.cls, "left": im_["left"], "right": im_["right"]}
                      for p, im_ in zip(rating_set.pairs, images)]}
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    e = html.escape
    css = _PAGE_CSS + (".pair img { image-rendering: pixelated; }" if pixelated else "")
    scores = "".join(f'<label><input type="radio" name="tclab-score" class="tclab-score" value="{s}"> {s}</label>'
                     for s in SCORES)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Blind A/B rating: {e(rating_set.run)}</title><style>{css}</style></head>
<body><main>
<h1>Blind A/B rating</h1>
<p class="meta">run {e(rating_set.run)} &middot; rating set {e(rating_set.set_id)} &middot; {len(rating_set.pairs)} pairs</p>
<p>Each pair shows one input image made twice, with the same seed, by two settings of the model. Which one looks
better? The two are placed left and right at random, and nothing on this page says which setting made which. Your
answers are kept in this browser as you go; when you are done, press <b>export</b> and send the file.</p>
<div class="row"><label for="tclab-rater">Your name</label><input id="tclab-rater" type="text" autocomplete="name">
<span id="tclab-counter"></span></div>
<div class="pair"><figure><img id="tclab-left" alt="left image"><figcaption>left</figcaption></figure>
<figure><img id="tclab-right" alt="right image"><figcaption>right</figcaption></figure></div>
<div class="row choices">
<button class="tclab-choice" data-choice="left" title="key a">left better</button>
<button class="tclab-choice" data-choice="same" title="key s">same</button>
<button class="tclab-choice" data-choice="right" title="key d">right better</button></div>
<div class="row scores"><span>How clear is the difference? (optional)</span>
<label><input type="radio" name="tclab-score" class="tclab-score" value="" checked> no score</label>{scores}
<span class="meta">1 = barely visible, 5 = obvious</span></div>
<div class="row"><textarea id="tclab-note" placeholder="note (optional): what differs, what looks wrong"></textarea></div>
<div class="row"><button id="tclab-prev">&larr; previous</button><button id="tclab-next">next &rarr;</button>
<button id="tclab-export">export</button><span id="tclab-status" class="meta"></span></div>
<p class="meta">Keys: a = left better, s = same, d = right better, &larr; / &rarr; = previous / next pair.</p>
</main>
<script type="application/json" id="tclab-rating-data">{text}</script>
<script>{_PAGE_JS}</script></body></html>
"""
