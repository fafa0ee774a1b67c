"""The user artefact store: what tclab trains for a team's model and images, found again by identity.

A Cache Predictor belongs to a model's *weights*; a class-consistency classifier to an *image set*
and the label mapping it was trained with. Both are kept outside the installed package, in
``$TCLAB_HOME`` (default ``$XDG_CACHE_HOME/tclab``, i.e. ``~/.cache/tclab``)::

    $TCLAB_HOME/
      models/<model key>/model.json                      name, source, fingerprint, blocks, token grid
      models/<model key>/predictor-static.safetensors    tclab train-predictor (header: how it was trained)
      models/<model key>/predictor-dynamic.safetensors
      classifiers/<images key>-<labels key>-r<res>.safetensors   tclab train-classifier
      data/shapes/                                        the stand-in image set, if the checkout has none

``<model key>`` is the first 16 hex digits of :func:`tclab.models.weights_fingerprint` (a
sha256 over the transformer's parameters), so the same weights loaded from any folder find their
predictor, and other weights never do. The embedded model's shipped files stay in
``tclab/weights/``; :func:`find_predictor` looks there first when the weights are the shipped ones.
``tclab artefacts`` lists the store (:func:`list_artefacts`).

Layering: the store sits below what it stores. ``tclab.cache.predictor`` (which makes and loads the
predictors) imports this module to find them, never the reverse, so a predictor file's kinds, name and
JSON header (:func:`read_predictor_meta`) are defined here and re-exported there. A classifier file's
header is read through ``tclab.classifier``, which does not import the store.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

from .env import HOME_ENV  # noqa: F401 (importable from here, as before)
from .paths import EMBEDDED_MODEL, PACKAGE_DIR, tclab_home

KEY_LEN = 16
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# ---- predictor files: their kinds, the shipped ones, their header ------------------------------------

KINDS = ("learned-static", "learned-dynamic")
FORMAT = "tclab-cache-predictor"
FORMAT_VERSION = 1
META_KEY = "tclab_predictor"
#: The shipped predictors of the embedded model (beside its weights).
WEIGHTS_DIR = PACKAGE_DIR / "weights"


def check_predictor_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown predictor kind {kind!r}; choose one of {list(KINDS)}")


def default_predictor_path(kind: str, model_name: str = EMBEDDED_MODEL) -> Path:
    """Where ``tclab train-predictor`` puts (and the registered scorers look for) a model's predictor:
    ``tclab/weights/<model>-predictor-<static|dynamic>.safetensors``."""
    check_predictor_kind(kind)
    return WEIGHTS_DIR / f"{model_name}-predictor-{kind.split('-')[1]}.safetensors"


def read_predictor_meta(path: str | Path) -> dict:
    """The JSON header of a predictor file (no tensors are read)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is a safetensors file without tclab predictor metadata; is it a predictor "
                         "written by `tclab train-predictor`?")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported predictor format {meta.get('format')!r} version {meta.get('version')}; "
                         f"this tclab reads {FORMAT!r} up to version {FORMAT_VERSION}")
    return meta


# ---- the store, keyed by the weights ---------------------------------------------------------------------

def fingerprint(transformer) -> str:
    """The transformer's weights fingerprint (computed once per module object; weights are frozen)."""
    from .models import weights_fingerprint  # here, not at the top: importing the store stays light (no diffusers)

    fp = _FINGERPRINTS.get(transformer)
    if fp is None:
        fp = _FINGERPRINTS[transformer] = weights_fingerprint(transformer)
    return fp


def model_key(transformer) -> str:
    return fingerprint(transformer)[:KEY_LEN]


def model_dir(transformer) -> Path:
    return tclab_home() / "models" / model_key(transformer)


def predictor_file_name(kind: str) -> str:
    check_predictor_kind(kind)
    return f"predictor-{kind.split('-')[1]}.safetensors"


def predictor_path(transformer, kind: str) -> Path:
    """Where this model's ``kind`` predictor lives in the store (whether or not it exists yet)."""
    return model_dir(transformer) / predictor_file_name(kind)


def record_model(model) -> Path:
    """Write ``model.json`` (name, source, fingerprint, shape) for a ``LoadedDiT``; returns its folder."""
    from .models import model_signature  # light import of the store, as in fingerprint

    d = model_dir(model.transformer)
    d.mkdir(parents=True, exist_ok=True)
    info = {"name": model.name, "source": model.source, "weights_fingerprint": fingerprint(model.transformer),
            "weights_sha256": (model.meta or {}).get("weights_sha256"), **model_signature(model.transformer)}
    tmp = d / "model.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(d / "model.json")
    return d


def shipped_predictor(transformer, kind: str) -> Path | None:
    """The shipped predictor file of ``kind`` when ``transformer`` holds the weights it was trained on."""
    path = default_predictor_path(kind)
    if not path.is_file():
        return None
    try:
        want = read_predictor_meta(path).get("model", {}).get("weights_fingerprint")
    except ValueError:
        return None
    return path if want and want == fingerprint(transformer) else None


def find_predictor(transformer, kind: str) -> Path | None:
    """This model's ``kind`` predictor: the shipped one for the embedded weights, else the store's; None."""
    shipped = shipped_predictor(transformer, kind)
    if shipped is not None:
        return shipped
    path = predictor_path(transformer, kind)
    return path if path.is_file() else None


def classifier_path(image_set, label_map, resolution: int) -> Path:
    """Where the classifier of this image set, label mapping and resolution lives in the store."""
    key = f"{image_set.manifest_hash()[:KEY_LEN]}-{label_map.sha256()[:8]}-r{int(resolution)}"
    return tclab_home() / "classifiers" / f"{key}.safetensors"


def list_artefacts(home: Path | None = None):
    """Every artefact in the store as a pandas frame: kind, model (or image set), key, file, size, check."""
    import pandas as pd

    from .classifier import read_classifier_meta  # torch: imported when the store is listed, not with it

    home = Path(home) if home is not None else tclab_home()
    rows = []
    for d in sorted((home / "models").glob("*")) if (home / "models").is_dir() else []:
        info = {}
        if (d / "model.json").is_file():
            try:
                info = json.loads((d / "model.json").read_text())
            except json.JSONDecodeError:
                info = {"name": "(unreadable model.json)"}
        for f in sorted(d.glob("predictor-*.safetensors")):
            try:
                meta = read_predictor_meta(f)
                ev = (meta.get("train") or {}).get("evaluation") or {}
                check = (f"blended-output rel. MSE {ev['rel_mse_predictor']:.3f} vs random masks "
                         f"{ev['rel_mse_random']:.3f} at rho={ev['rho']:g}" if ev else "no check recorded")
                kind = meta.get("kind", "?")
            except (ValueError, OSError) as e:
                check, kind = f"unreadable: {e}", "?"
            rows.append({"kind": kind, "belongs_to": info.get("name", "?"), "source": info.get("source", ""),
                         "key": d.name, "file": str(f), "bytes": f.stat().st_size, "check": check})
    for f in sorted((home / "classifiers").glob("*.safetensors")) if (home / "classifiers").is_dir() else []:
        try:
            meta = read_classifier_meta(f)
            acc = meta.get("val_accuracy")
            check = f"held-out accuracy {acc:.3f}" if isinstance(acc, (int, float)) else "no held-out check"
            src = meta.get("images_root", "")
            names = meta.get("class_names")
        except (ValueError, OSError) as e:
            check, src, names = f"unreadable: {e}", "", None
        rows.append({"kind": "classifier", "belongs_to": f"{len(names or [])} classes" if names else "?", "source": src,
                     "key": f.stem, "file": str(f), "bytes": f.stat().st_size, "check": check})
    return pd.DataFrame(rows, columns=["kind", "belongs_to", "source", "key", "file", "bytes", "check"])
