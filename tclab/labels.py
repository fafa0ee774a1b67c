"""Which model class is each image folder? One rule for every command, notebook and training path.

A team's image set has folders named after *its* categories ("Red Stripes", "goldfish", "207",
"flat folder of PNGs"); its DiT has class ids ``0..K-1`` (and maybe names: ``id2label`` of
``model_index.json``, or tclab's own metadata) plus the null class used for unconditional sampling.
:func:`resolve_labels` maps one onto the other and says, per folder, what it did:

``labels="auto"`` (the default)
    each class folder is matched to the model's class names, insensitive to case and to spaces,
    underscores and hyphens, and against every comma-separated alias (ImageNet's labels read
    "goldfish, Carassius auratus"); a folder whose name is an integer is that class id. A folder that
    matches nothing (or several classes) is sampled **unconditionally** (the null class) and says so;
    nothing is refused. Subsets of the model's classes are normal.
``labels="unconditional"``
    every image is sampled with the null class.
a mapping ``{folder: class id or class name}`` (inline, or a path to a YAML / JSON / CSV file)
    exactly those folders are conditioned; a folder left out is sampled unconditionally. A mapping
    that names an unknown folder or class is refused with the close matches.

The result, a :class:`LabelMap`, gives each image's model class id (:meth:`LabelMap.labels_for`), the
per-folder table for reports (:meth:`LabelMap.table`) and a plain dict for ``summary.json`` and
provenance (:meth:`LabelMap.to_dict`). Class-consistency is only measured over mapped classes
(:attr:`LabelMap.class_ids`).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .models import NULL_CLASS

AUTO = "auto"
UNCONDITIONAL = "unconditional"
#: ``FolderLabel.how`` values.
BY_NAME, BY_ALIAS, BY_INDEX, BY_MAPPING = "name", "alias", "class id", "mapping"
NOT_MATCHED = "unconditional"


class LabelSpecError(ValueError):
    """The ``labels`` parameter cannot be used: the message names the bad entry and the fix."""


@dataclass(frozen=True)
class FolderLabel:
    """One class folder (``folder=None`` for a flat set): its images and the model class it is sampled as.

    ``class_id`` is None when the folder is sampled unconditionally (the null class); ``how`` says why
    (``"name"``, ``"alias"``, ``"class id"``, ``"mapping"`` or ``"unconditional"``) and ``note`` adds
    the detail a person needs (which alias matched, why nothing did).
    """

    folder: str | None
    images: int
    class_id: int | None
    class_name: str | None
    how: str
    note: str = ""


@dataclass
class LabelMap:
    """How an image set's folders map onto a model's classes (see the module docstring)."""

    rows: list[FolderLabel]
    spec: str  # "auto", "unconditional", "mapping" or "file <path>"
    null_class: int
    model_classes: int  # the model's number of (conditional) classes

    def class_of(self, folder: str | None) -> int:
        """The label a folder's images are sampled with: its class id, or the null class."""
        for r in self.rows:
            if r.folder == folder:
                return self.null_class if r.class_id is None else r.class_id
        raise KeyError(f"folder {folder!r} is not in this label map ({[r.folder for r in self.rows]})")

    def labels_for(self, image_set) -> torch.Tensor:
        """(N,) int64: every image's model label (class id, or the null class), in the set's order."""
        return torch.tensor([self.class_of(r.class_name) for r in image_set.records], dtype=torch.long)

    def conditional_mask(self, image_set) -> torch.Tensor:
        """(N,) bool: which images have a mapped class (the ones class-consistency is measured on)."""
        return self.labels_for(image_set) != self.null_class

    @property
    def mapped(self) -> list[FolderLabel]:
        return [r for r in self.rows if r.class_id is not None]

    @property
    def class_ids(self) -> list[int]:
        """The distinct model class ids the folders map to, ascending."""
        return sorted({r.class_id for r in self.mapped})

    @property
    def conditional(self) -> bool:
        return bool(self.mapped)

    @property
    def sample_classes(self) -> list[int] | None:
        """The class ids to sample the model's own images with: the mapped ones, or None (all of the
        model's classes) when no folder is mapped (``SweepSettings.classes``)."""
        return self.class_ids or None

    def class_name_of(self, class_id: int) -> str:
        for r in self.mapped:
            if r.class_id == class_id:
                return r.class_name or str(class_id)
        return str(class_id)

    def table(self):
        """The per-folder table (indexed by folder): images, class id, class name, how matched, note."""
        import pandas as pd

        frame = pd.DataFrame([{"folder": "(flat folder)" if r.folder is None else r.folder, "images": r.images,
                               "class_id": r.class_id, "class_name": r.class_name, "how": r.how, "note": r.note}
                              for r in self.rows], columns=["folder", "images", "class_id", "class_name", "how", "note"])
        frame["class_id"] = frame["class_id"].astype("Int64")  # ids, not floats, beside the missing ones
        return frame.set_index("folder")

    def to_dict(self) -> dict:
        """Plain values for ``summary.json`` and provenance."""
        return {"spec": self.spec, "null_class": self.null_class, "mapped_folders": len(self.mapped),
                "folders": len(self.rows), "class_ids": self.class_ids, "sha256": self.sha256(),
                "rows": [asdict(r) for r in self.rows]}

    def sha256(self) -> str:
        """Identity of the mapping (folder -> class id), e.g. for keying a classifier trained on it."""
        text = "\n".join(f"{r.folder}\t{r.class_id}" for r in self.rows)
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def describe(self) -> str:
        """Readable lines: what the folders were mapped to, and what that means for the run."""
        n_img = sum(r.images for r in self.rows)
        n_map = sum(r.images for r in self.mapped)
        head = (f"labels ({self.spec}): {len(self.mapped)} of {len(self.rows)} folder(s) mapped to model classes "
                f"({n_map} of {n_img} images)")
        if len(self.mapped) < len(self.rows):
            head += f"; the rest are sampled unconditionally (null class {self.null_class})"
        if not self.conditional:
            head = (f"labels ({self.spec}): no folder is mapped to a model class, so every image is sampled "
                    f"unconditionally (null class {self.null_class}) and class-consistency is not measured")
        width = max([len(str(r.folder)) for r in self.rows] + [13])
        lines = [head]
        for r in self.rows:
            name = "(flat folder)" if r.folder is None else r.folder
            cls = "unconditional" if r.class_id is None else f"{r.class_id} {r.class_name or ''}".strip()
            cls = cls if len(cls) <= 40 else cls[:37] + "..."
            lines.append(f"  {name:{width}s} {r.images:5d} img -> {cls:40s} ({r.how}{': ' + r.note if r.note else ''})")
        if len(self.mapped) < len(self.rows) and not self.spec.startswith(("unconditional",)):
            lines.append("  to condition a folder on a class: name it as one of the model's classes (or its id), "
                         "or pass labels={folder: class id or name} (or a mapping file)")
        return "\n".join(lines)


# ---- matching ------------------------------------------------------------------------------------------

def normalise(name: str) -> str:
    """Case, spaces, underscores and hyphens do not matter: ``"Red_Fox"`` == ``"red fox"``."""
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().casefold()


def _aliases(name: str) -> list[str]:
    return [a for a in (normalise(p) for p in str(name).split(",")) if a]


def model_class_names(model) -> list[str] | None:
    """The model's class names in id order (``id2label`` or tclab metadata), or None."""
    return list(model.class_names) if getattr(model, "class_names", None) else None


def model_num_classes(model) -> int:
    """Number of conditional classes: the names' count, else the label embedding's size."""
    names = model_class_names(model)
    if names:
        return len(names)
    return int(getattr(model.transformer.config, "num_embeds_ada_norm", None) or NULL_CLASS)


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: an equal share of every class (the labels of samples drawn from noise)."""
    return torch.arange(num_samples) % num_classes


def _class_index(names: list[str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    full: dict[str, list[int]] = {}
    alias: dict[str, list[int]] = {}
    for k, n in enumerate(names):
        full.setdefault(normalise(n), []).append(k)
        for a in _aliases(n):
            alias.setdefault(a, []).append(k)
    return full, alias


def _match_auto(folder: str, names: list[str] | None, n_classes: int,
                index: tuple[dict, dict] | None) -> tuple[int | None, str, str]:
    """(class id or None, how, note) for one folder name under the ``auto`` rule."""
    if re.fullmatch(r"\d+", folder.strip()):
        k = int(folder.strip())
        if k < n_classes:
            return k, BY_INDEX, "folder name is a class id"
        return None, NOT_MATCHED, f"class id {k} >= the model's {n_classes} classes"
    if not names:
        return None, NOT_MATCHED, "the model has no class names (no id2label)"
    full, alias = index
    key = normalise(folder)
    for table, how in ((full, BY_NAME), (alias, BY_ALIAS)):
        hits = sorted(set(table.get(key, [])))
        if len(hits) == 1:
            return hits[0], how, "" if how == BY_NAME else f"matched {key!r}"
        if len(hits) > 1:
            return None, NOT_MATCHED, f"ambiguous: matches classes {hits}"
    close = difflib.get_close_matches(key, list(alias), n=1, cutoff=0.8)
    hint = f" (closest: {names[alias[close[0]][0]]!r})" if close else ""
    return None, NOT_MATCHED, f"no class of that name{hint}"


def load_label_spec(spec: Any) -> Any:
    """``"auto"`` / ``"unconditional"`` / a mapping as given; a path is read (YAML, JSON or a CSV with
    columns ``folder,class``). Relative paths are the caller's (see :func:`tclab.paths.resolve_path`)."""
    if spec is None:
        return AUTO
    if isinstance(spec, Mapping):
        return dict(spec)
    if not isinstance(spec, (str, Path)):
        raise LabelSpecError(f"labels must be 'auto', 'unconditional', a mapping {{folder: class}} or the path of a "
                             f"mapping file, got {type(spec).__name__} {spec!r}")
    if isinstance(spec, str) and spec.strip().lower() in (AUTO, UNCONDITIONAL):
        return spec.strip().lower()
    from .paths import resolve_path

    path = resolve_path(spec, what="labels mapping file", must_exist=True)
    if path.is_dir():
        raise LabelSpecError(f"labels {str(spec)!r} is a folder ({path}); give a YAML, JSON or CSV mapping file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LabelSpecError(f"labels file {path} is not UTF-8 text (is it an image?); give a YAML, JSON or CSV "
                             "file of folder: class lines") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["folder", "class"]:
            rows = rows[1:]
        bad = [i + 1 for i, r in enumerate(rows) if r and len(r) < 2]
        if bad:
            raise LabelSpecError(f"{path}: line(s) {bad} need two columns, folder,class")
        out = {r[0].strip(): r[1].strip() for r in rows if r}
    elif path.suffix.lower() == ".json":
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabelSpecError(f"{path} is not valid JSON ({e}); write {{\"folder\": class id or name}}") from None
    else:
        import yaml

        try:  # BaseLoader: every key and value stays text, so folder "007" or "no" is not turned into 7 or False
            out = yaml.load(text, Loader=yaml.BaseLoader)
        except yaml.YAMLError as e:
            raise LabelSpecError(f"{path} is not valid YAML ({e}); write one `folder: class` per line") from None
    if not isinstance(out, dict):
        raise LabelSpecError(f"{path} must hold a mapping {{folder: class id or class name}}, got {type(out).__name__}")
    return {"__file__": str(path), **out}


def resolve_labels(image_set, model, labels: Any = AUTO) -> LabelMap:
    """Map the folders of ``image_set`` (:class:`tclab.data.ImageSet`) onto ``model``'s classes.

    ``labels``: ``"auto"``, ``"unconditional"``, a mapping ``{folder: class id or name}`` or the path of
    a YAML / JSON / CSV mapping file (see the module docstring). Raises :class:`LabelSpecError` for a
    mapping that names an unknown folder or class, with the close matches.
    """
    spec = load_label_spec(labels)
    names = model_class_names(model)
    n_classes = model_num_classes(model)
    counts: dict[str | None, int] = {}
    for r in image_set.records:
        counts[r.class_name] = counts.get(r.class_name, 0) + 1
    folders = list(image_set.class_names) if image_set.labelled else [None]
    rows: list[FolderLabel] = []
    null = int(getattr(model, "null_class", NULL_CLASS))

    if not image_set.labelled:
        rows = [FolderLabel(None, counts.get(None, 0), None, None, NOT_MATCHED, "flat folder: no classes")]
        label = "unconditional" if spec == UNCONDITIONAL else (AUTO if spec == AUTO else "mapping")
        if isinstance(spec, dict) and {k for k in spec if k != "__file__"}:
            raise LabelSpecError(f"labels maps folders {sorted(k for k in spec if k != '__file__')}, but "
                                 f"{image_set.root} is a flat folder (no class sub-folders); use labels='auto' or "
                                 "put the images in one sub-folder per class")
        return LabelMap(rows, label, null, n_classes)

    if spec == UNCONDITIONAL:
        rows = [FolderLabel(f, counts.get(f, 0), None, None, NOT_MATCHED, "labels='unconditional'") for f in folders]
        return LabelMap(rows, UNCONDITIONAL, null, n_classes)

    if spec == AUTO:
        index = _class_index(names) if names else None
        for f in folders:
            k, how, note = _match_auto(f, names, n_classes, index)
            rows.append(FolderLabel(f, counts.get(f, 0), k, names[k] if names and k is not None else None, how, note))
        return LabelMap(rows, AUTO, null, n_classes)

    source = spec.pop("__file__", None)
    unknown = [k for k in spec if str(k) not in folders]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), [str(f) for f in folders], n=2)
            hints.append(repr(k) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise LabelSpecError(f"labels{' file ' + source if source else ''} names folder(s) {', '.join(hints)} that "
                             f"{image_set.root} does not have; its class folders are {folders}")
    index = _class_index(names) if names else ({}, {})
    mapping = {str(k): v for k, v in spec.items()}
    for f in folders:
        if f not in mapping:
            rows.append(FolderLabel(f, counts.get(f, 0), None, None, NOT_MATCHED, "not in the mapping"))
            continue
        k = _class_from_value(mapping[f], f, names, n_classes, index)
        rows.append(FolderLabel(f, counts.get(f, 0), k, names[k] if names and k is not None else None,
                                BY_MAPPING if k is not None else NOT_MATCHED,
                                "" if k is not None else "mapped to unconditional"))
    return LabelMap(rows, f"file {source}" if source else "mapping", null, n_classes)


def _class_from_value(value: Any, folder: str, names: list[str] | None, n_classes: int, index) -> int | None:
    """A mapping's value (class id, class name or alias, or 'unconditional'/null) -> class id or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in (UNCONDITIONAL, "none", "null", "")):
        return None
    if isinstance(value, bool):
        raise LabelSpecError(f"labels: folder {folder!r} maps to {value!r}; give a class id or a class name")
    if isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"\d+", value.strip())):
        k = int(value)
        if not 0 <= k < n_classes:
            raise LabelSpecError(f"labels: folder {folder!r} maps to class id {k}, but the model's class ids are "
                                 f"0..{n_classes - 1}")
        return k
    if not isinstance(value, str):
        raise LabelSpecError(f"labels: folder {folder!r} maps to {value!r} ({type(value).__name__}); give a class "
                             "id or a class name")
    if not names:
        raise LabelSpecError(f"labels: folder {folder!r} maps to class name {value!r}, but the model has no class "
                             "names (no id2label); give class ids")
    full, alias = index
    key = normalise(value)
    for table in (full, alias):
        hits = sorted(set(table.get(key, [])))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise LabelSpecError(f"labels: class name {value!r} (folder {folder!r}) matches classes {hits}; give the "
                                 "class id instead")
    close = difflib.get_close_matches(key, list(alias), n=3)
    hint = f"; close matches: {[names[alias[c][0]] for c in close]}" if close else ""
    raise LabelSpecError(f"labels: folder {folder!r} maps to {value!r}, which is not a class of the model{hint}")


def check_label_folders(params: dict, caller_cwd: str | os.PathLike | None = None) -> None:
    """Notebook parameters whose ``labels`` mapping (inline or a file) names a class folder that ``images``
    lacks are refused before a kernel starts, with the close matches (the classes are checked against
    the model in the kernel). Relative paths are read from ``caller_cwd``, as the kernel will."""
    from .paths import reading_from, resolve_images

    labels, images = params.get("labels"), params.get("images")
    if labels is None or images is None or (isinstance(labels, str)
                                            and labels.strip().lower() in (AUTO, UNCONDITIONAL)):
        return
    with reading_from(caller_cwd):
        spec = load_label_spec(labels)
        if not isinstance(spec, dict):
            return
        root = resolve_images(images)
    if not root.is_dir():
        return
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    named = [str(k) for k in spec if k != "__file__"]
    if not folders:
        return  # a flat folder: resolve_labels explains that a mapping needs class folders
    unknown = [k for k in named if k not in folders]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, folders, n=2)
            hints.append(repr(k) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise LabelSpecError(f"parameter 'labels' names folder(s) {', '.join(hints)} that {root} does not have; its "
                             f"class folders are {folders}")
