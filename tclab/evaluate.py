"""Sampling a model at scale: sample grids, ``--npz`` files for FID, class-consistency, token-change
records (``tclab sample`` / ``tclab evaluate`` / ``tclab record``), sharded over torchrun ranks where
they run under torchrun (:mod:`tclab.distributed`).

``evaluate_sdedit_consistency`` (``tclab evaluate --sdedit-from DIR``) is the diagnosis behind a low
figure: it noises real images of each class to several strengths and denoises them conditioned on
their own class, so the strength at which a class stops surviving shows which noise levels the model
has not learned for it.

Each call (but ``record_to_store``, which writes a record store) writes a new run folder
``<reports>/<UTC start>_<command>_<tag>/`` like a notebook's, with provenance (:func:`_publish`,
:func:`tclab.runs.command_run`): built aside, renamed when complete, so a failed call never leaves
half a result and never touches an earlier one; it appears in the run table and index.html.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from .labels import balanced_labels
from .models import load_dit
from .sampling import SampleConfig, sample, save_grid


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _model_identity(model) -> dict:
    return {"model": model.name, "model_weights_sha256": model.meta.get("weights_sha256")}


def _publish(out: str | Path | None, command: str, tag: str, parameters: dict, identity: dict, build, figures,
             start: datetime) -> dict:
    """Run ``build(folder) -> result`` into a new run folder ``<out>/<UTC start>_<command>_<tag>/``
    (``out`` None: the reports folder ``tclab run`` uses) via :func:`tclab.runs.command_run`: it holds
    ``result.json`` (the whole result), ``summary.json`` (``figures(result)``, a list of ``(key, label,
    value, unit)``, as the headline the run table and index.html show; ``identity``), ``params.yaml`` and
    ``provenance.json``, and is built aside, so a failed call leaves nothing and never touches an
    earlier run. The result gets ``out``: the folder."""
    from . import runs

    def fill(run) -> dict:
        result = build(run.dir)
        (run.dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
        numbers = figures(result)
        run.write_summary({"headline": {k: v for k, _, v, _ in numbers}, "identity": identity,
                           "report": {"key_numbers": [{"key": k, "label": label, "value": v, "unit": unit}
                                                      for k, label, v, unit in numbers]}})
        return result

    folder, result = runs.command_run(command, parameters, fill, reports_dir=out, tag=tag, start=start)
    result["out"] = str(folder)
    return result


def sample_grid(model_spec: str, config: SampleConfig, num_samples: int, out: str | Path | None = None) -> Path:
    """Sample a class-balanced grid (one column per class) into a new run folder (:func:`_publish`; ``out``
    None: the reports folder) with ``grid.png`` and ``samples.json``; returns the grid's path."""
    start = _now()
    model = load_dit(model_spec)
    labels = balanced_labels(num_samples, model.num_classes if model.class_names else 8)

    def build(stage: Path) -> dict:
        res = sample(model, labels, config)
        ncol = len(model.class_names) if model.class_names else 8
        save_grid(res.images, stage / "grid.png", nrow=ncol, scale=max(1, 128 // model.resolution))
        info = {"model": model.identity(), "config": config.__dict__, "labels": labels.tolist(),
                "seconds": round(res.seconds, 2), "column_classes": model.class_names}
        (stage / "samples.json").write_text(json.dumps(info, indent=2))
        return {"num_samples": num_samples, "seconds": info["seconds"]}

    result = _publish(out, "sample", model.name, {"model": model_spec, "num_samples": num_samples, **config.__dict__},
                      _model_identity(model), build,
                      lambda r: [("num_samples", "samples", r["num_samples"], ""),
                                 ("seconds", "sampling time", r["seconds"], "s")], start)
    return Path(result["out"]) / "grid.png"


def sample_npz(model_spec: str, config: SampleConfig, num_samples: int, out: str | Path, resume: bool = False,
               shard_size: int | None = None, progress: bool = True,
               reports_dir: str | Path | None = None) -> Path | None:
    """Sample ``num_samples`` images into ``out`` (``.npz``, the ADM evaluator's layout: ``arr_0`` uint8
    (N, H, W, 3), and the labels in ``arr_1``; :func:`tclab.metrics.export_adm_npz`), sharded over the torchrun ranks this process belongs to
    (:mod:`tclab.distributed`; alone it is the one rank).

    Sample ``i`` has class ``i % K`` (K = the model's classes; 1000 for an ImageNet DiT: 50 of each in
    50,000) and noise from its own generator seeded by ``(config.seed, i)``
    (:func:`tclab.sampling.per_sample_noise`), so the file is byte-identical at any world size. Units are
    shards of ``shard_size`` samples (default ``config.batch_size``), finished ones written atomically to
    ``<out>.shards/``; ``resume`` skips those. Rank 0 merges when every shard is there, writes ``out``
    atomically (and ``<out>.json``: model, settings, world), removes the shards and records the run in a
    run folder of ``reports_dir`` (default: the reports folder ``tclab run`` uses; :func:`_publish`); it
    returns ``out``, the other ranks None. An existing ``out`` is never overwritten."""
    import numpy as np

    from .data import images_to_uint8
    from .metrics import export_adm_npz
    from .distributed import ShardFolder, barrier, close_world, init_world, shard_bounds, write_atomic
    from .progress import progress_bar
    from .sampling import per_sample_noise

    start = _now()
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--npz {out}: give a file name ending in .npz (the ADM evaluator's format)")
    if out.exists():
        raise FileExistsError(f"{out} exists; it is never overwritten: choose another name or delete it")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    world = init_world()
    try:
        model = load_dit(model_spec).to(world.device)
        labels = balanced_labels(num_samples, model.num_classes)
        bounds = shard_bounds(num_samples, shard_size or config.batch_size)
        folder = ShardFolder(out.with_name(out.name + ".shards"))
        plan = {"model": model.identity(), "config": config.__dict__, "num_samples": num_samples,
                "units": len(bounds), "labels": "i % num_classes", "num_classes": model.num_classes,
                "noise": "per sample, seeded (seed, i)"}
        folder.start(plan, world, resume)
        t0 = time.perf_counter()
        bar = progress_bar(total=len(bounds), initial=len(folder.done()), desc=f"sampling (rank {world.rank})",
                           unit="shard", disable=not (progress and world.is_main))
        for u in folder.claimed(len(bounds), world):
            lo, hi = bounds[u]
            res = sample(model, labels[lo:hi], config, progress=False,
                         start=(per_sample_noise(model, config.seed, range(lo, hi)), None))
            folder.write(u, {"arr": images_to_uint8(res.images), "labels": labels[lo:hi].numpy(), "lo": lo, "hi": hi})
            bar.n = len(folder.done())
            bar.refresh()
        bar.close()
        described = world.describe()   # every rank takes part: it gathers the devices
        barrier(world)
        if not world.is_main:
            return None
        missing = folder.missing(len(bounds))
        if missing:
            raise RuntimeError(f"shards {missing[:8]}{'...' if len(missing) > 8 else ''} of {len(bounds)} are missing "
                               f"from {folder.path}; nothing was merged: run again with --resume")
        parts = [folder.read(u) for u in range(len(bounds))]
        arr = np.concatenate([p_["arr"] for p_ in parts])
        labs = np.concatenate([p_["labels"] for p_ in parts])
        export_adm_npz(arr, out, labels=labs)   # arr_0 images, arr_1 labels: as ADM's sampling script writes them
        info = {"model": model.identity(), "config": config.__dict__, "num_samples": num_samples,
                "shape": list(arr.shape), "labels": "i % num_classes", "num_classes": model.num_classes,
                "noise": "per sample, seeded (seed, i): identical at any world size",
                **described, "seconds": round(time.perf_counter() - t0, 1), "resumed": resume}
        write_atomic(out.with_name(out.name + ".json"), lambda f: f.write(json.dumps(info, indent=2).encode()))
        folder.remove()
        params = {"model": model_spec, "num_samples": num_samples, **config.__dict__, "npz": str(out.resolve()),
                  "shard_size": shard_size or config.batch_size, "resume": resume}
        _publish(reports_dir, "sample-npz", model.name, params, _model_identity(model),
                 lambda stage: {**info, "npz": str(out.resolve())},
                 lambda r: [("num_samples", "samples", r["num_samples"], ""), ("seconds", "time", r["seconds"], "s"),
                            ("npz", "file", r["npz"], "")], start)
        return out
    finally:
        close_world(world)


def record_to_store(model_spec: str, config: SampleConfig, num_samples: int, out: str | Path, resume: bool = False,
                    progress: bool = True) -> Path | None:
    """Record the token changes of ``num_samples`` samples from noise into the record store ``out``
    (:mod:`tclab.record_store`), sharded over the torchrun ranks this process belongs to: each rank
    records its shards of ``config.batch_size`` samples, one streamed chunk each (the memory of one batch,
    whatever ``num_samples``), sample ``i`` with class ``i % K`` and noise seeded by ``(config.seed, i)``
    as in :func:`sample_npz`, so the store reads back the same at any world size. ``resume`` skips the
    shards whose samples the store holds already; without it an existing store is refused. Rank 0 returns
    ``out`` once every shard is in, the other ranks None. ``tclab record``."""
    from .distributed import barrier, close_world, init_world, my_units, shard_bounds
    from .progress import progress_bar
    from .record import open_record, record_token_changes
    from .record_store import StoreError
    from .sampling import per_sample_noise

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} exists and is not empty; it is never overwritten: pass --resume to continue a "
                              "recording that stopped, or choose another folder")
    world = init_world()
    try:
        model = load_dit(model_spec).to(world.device)
        labels = balanced_labels(num_samples, model.num_classes)
        bounds = shard_bounds(num_samples, config.batch_size)
        done: set[int] = set()
        if resume and out.is_dir() and any(out.iterdir()):
            try:
                done = {int(i) for i in open_record(out).sample_id}
            except StoreError as e:
                if "no committed chunk" not in str(e):
                    raise
        barrier(world)   # every rank has read what is done before any writes more
        todo = [u for u in my_units(len(bounds), world) if not set(range(*bounds[u])) <= done]
        bar = progress_bar(total=len(todo), desc=f"recording (rank {world.rank})", unit="shard",
                           disable=not (progress and world.is_main))
        for u in todo:
            lo, hi = bounds[u]
            with record_token_changes(model.transformer, model_identity=model.identity(), stream_to=out,
                                      rank=world.rank, sample_offset=lo):
                sample(model, labels[lo:hi], config, progress=False,
                       start=(per_sample_noise(model, config.seed, range(lo, hi)), None))
            bar.update(1)
        bar.close()
        barrier(world)
        if not world.is_main:
            return None
        have = {int(i) for i in open_record(out).sample_id}
        if have != set(range(num_samples)):
            raise RuntimeError(f"{out} lacks samples {sorted(set(range(num_samples)) - have)[:8]} after every rank "
                               "finished; run again with --resume")
        return out
    finally:
        close_world(world)


@contextmanager
def _npz_images_file(path: str | Path):
    """The ``arr_0`` member of an ADM-layout ``.npz``, opened and checked: yields ``(file at the first row,
    shape)``."""
    import zipfile

    import numpy as np

    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e}); give the samples written by `tclab sample --npz` "
                         "or the ADM evaluator's reference batch") from None
    with zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{path} has no arr_0 (it holds {zf.namelist()[:4]}); the ADM layout keeps the images "
                             "in arr_0 as (N, H, W, 3) uint8")
        if zf.getinfo("arr_0.npy").compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path} is compressed (np.savez_compressed); write it with np.savez to read it in "
                             "parts")
        with zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ValueError(f"{path}: arr_0 is {dtype} {shape}; the ADM layout is (N, H, W, 3) uint8")
            yield f, shape


def npz_length(path: str | Path) -> int:
    """How many images an ADM-layout ``.npz`` holds (from its header; nothing else is read)."""
    with _npz_images_file(path) as (_, shape):
        return shape[0]


def npz_images(path: str | Path, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows ``[lo, hi)`` of an ADM-layout ``.npz`` (``arr_0``: (N, H, W, 3) uint8) as (n, 3, H, W) in [-1, 1],
    read without loading the rest (a 50,000-image 256 px set is 9.8 GB); ``hi`` None = to the end. The
    member must be uncompressed (``np.savez``, as ADM and tclab write it)."""
    import numpy as np

    with _npz_images_file(path) as (f, shape):
        hi = shape[0] if hi is None else min(hi, shape[0])
        row = int(np.prod(shape[1:]))
        f.seek(f.tell() + lo * row)
        a = np.frombuffer(f.read((hi - lo) * row), dtype=np.uint8).reshape(hi - lo, *shape[1:])
    return torch.from_numpy(a.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1   # (n, 3, H, W)


def evaluate_distribution(samples: str | Path, reference: str | Path, out: str | Path, inception: str | Path | None = None,
                          classifier: str | Path | None = None, shard_size: int = 500, kid_subset_size: int = 1000,
                          seed: int = 0) -> dict | None:
    """FID and KID of the images in the ``.npz`` ``samples`` against those of ``reference`` (ADM layout both),
    in the feature space of ``inception`` (the FID InceptionV3 from a local file: comparable to published
    FID given their protocol) or of the small classifier (``classifier``, default the shipped one; labelled
    NOT comparable). Sharded over the torchrun ranks this process belongs to: each rank extracts the
    features of its shards of ``shard_size`` images of both files, read in parts (:func:`npz_images`),
    and rank 0 gathers them in order, computes FID and KID (:mod:`tclab.metrics`), writes ``result.json``
    into a new folder under ``out`` and returns the result; the other ranks return None. The features of
    an image do not depend on the world size, so neither does the result."""
    import numpy as np

    from .distributed import all_gather, close_world, init_world, my_units, shard_bounds
    from .features import ClassifierFeatures, InceptionV3Features
    from .metrics import fid_floor_reason, frechet_distance, kernel_inception_distance
    from .progress import progress_bar

    start = _now()
    sizes = {name: npz_length(path) for name, path in (("samples", samples), ("reference", reference))}
    world = init_world()
    try:
        extractor = (InceptionV3Features(inception, device=world.device) if inception is not None
                     else ClassifierFeatures(classifier))
        t0 = time.perf_counter()
        jobs = [(name, lo, hi) for name, path in (("samples", samples), ("reference", reference))
                for lo, hi in shard_bounds(sizes[name], shard_size)]
        mine = my_units(len(jobs), world)
        bar = progress_bar(total=len(mine), desc=f"features (rank {world.rank})", unit="shard",
                           disable=not world.is_main)
        feats = {}
        for u in mine:
            name, lo, hi = jobs[u]
            feats[u] = extractor(npz_images(samples if name == "samples" else reference, lo, hi)).astype(np.float32)
            bar.update(1)
        bar.close()
        gathered = {u: f for part in all_gather(world, feats) for u, f in part.items()}
        described = world.describe()
        if not world.is_main:
            return None
        fa = np.concatenate([gathered[u] for u, j in enumerate(jobs) if j[0] == "samples"]).astype(np.float64)
        fb = np.concatenate([gathered[u] for u, j in enumerate(jobs) if j[0] == "reference"]).astype(np.float64)
        reason = fid_floor_reason(len(fa), len(fb), fa.shape[1])
        kid = kernel_inception_distance(fa, fb, subset_size=kid_subset_size, seed=seed)
        result = {"fid": None if reason else frechet_distance(fa, fb), "fid_reason": reason or "",
                  "kid": kid["mean"], "kid_std": kid["std"], "kid_subsets": kid["subsets"],
                  "kid_subset_size": kid["subset_size"], "n_samples": len(fa), "n_reference": len(fb),
                  "samples": str(Path(samples).resolve()), "reference": str(Path(reference).resolve()),
                  "extractor": extractor.identity(), "seconds": round(time.perf_counter() - t0, 1), **described}
        params = {"samples": str(samples), "reference": str(reference), "inception": inception and str(inception),
                  "classifier": classifier and str(classifier), "shard_size": shard_size,
                  "kid_subset_size": kid_subset_size, "seed": seed}
        return _publish(out, "evaluate-fid", "inception" if inception is not None else "classifier-features", params,
                        {}, lambda stage: result,
                        lambda r: [("fid", "FID", r["fid"], ""), ("kid", "KID", r["kid"], ""),
                                   ("n_samples", "samples", r["n_samples"], "")], start)
    finally:
        close_world(world)


def _classifier_and_classes(model, classifier_path: str | None, images: str | Path | None, labels, limit=None):
    """The classifier and the class ids to evaluate: a given file, else the shipped one for the embedded
    classes, else the classifier of ``images`` and its label map (trained now and kept in the artefact
    store when missing). Returns (classifier, class ids, prepared images or None)."""
    from .classifier import SHIPPED_CLASSIFIER, ShapesClassifier
    from .prepare import classifier_for, load_images

    prepared = load_images(images, model, labels, limit=limit) if images is not None else None
    if classifier_path is not None or prepared is None:
        clf = classifier_for(model, classifier_path) if classifier_path else ShapesClassifier.load(SHIPPED_CLASSIFIER)
        if clf.class_ids is None and list(clf.class_names) != list(model.class_names or []):
            raise ValueError(f"the {'given' if classifier_path else 'shipped'} classifier knows {clf.class_names}, not "
                             f"the classes of {model.name}; pass --images YOUR_FOLDER (a classifier is trained on its "
                             "folders mapped onto the model's classes) or --classifier FILE")
        ids = clf.model_class_ids
        if prepared is not None and prepared.label_map.conditional:
            ids = [c for c in prepared.label_map.class_ids if c in set(ids)]
        return clf, ids, prepared
    if not prepared.label_map.conditional:
        raise ValueError(f"no folder of {images} maps to a class of {model.name}, so class-consistency cannot be "
                         "measured; name the folders as the model's classes or give --labels MAPPING.yaml")
    clf = classifier_for(model, None, prepared.image_set, prepared.label_map, train_missing=True)
    return clf, prepared.label_map.class_ids, prepared


def evaluate_class_consistency(model_spec: str, config: SampleConfig, num_samples: int, out: str | Path,
                               classifier_path: str | None = None, images: str | Path | None = None,
                               labels="auto") -> dict | None:
    """Sample ``num_samples`` images balanced over the classes the classifier knows (with ``images``:
    the model classes its folders map to, :mod:`tclab.labels`) and measure class-consistency.

    Sharded over the torchrun ranks this process belongs to (:mod:`tclab.distributed`; alone it is the
    one rank): each rank samples and classifies its shards of ``config.batch_size`` samples, each shard
    with its rows of the whole run's starting noise, so the figures are the same at any world size. Rank 0
    prepares the classifier first (the others then read it), merges the predictions, writes the folder
    and returns the result; the other ranks return None."""
    from .classifier import class_consistency
    from .distributed import all_gather, barrier, close_world, init_world, my_units, shard_bounds
    from .sampling import sampling_start

    start = _now()
    world = init_world()
    try:
        model = load_dit(model_spec).to(world.device)
        if not world.is_main:
            barrier(world)   # rank 0 trains a missing classifier into the artefact store first
        clf, ids, prepared = _classifier_and_classes(model, classifier_path, images, labels)
        if world.is_main:
            barrier(world)
        labels_t = torch.tensor(ids, dtype=torch.long)[balanced_labels(num_samples, len(ids))]
        known = clf.knows(labels_t)
        grid_n = 8 * len(ids)
        t0 = time.perf_counter()
        noise, _ = sampling_start(model, num_samples, config.seed)
        bounds = shard_bounds(num_samples, config.batch_size)
        mine, seconds = [], 0.0
        for u in my_units(len(bounds), world):
            lo, hi = bounds[u]
            res = sample(model, labels_t[lo:hi], config, start=(noise[lo:hi], None), progress=world.is_main)
            seconds += res.seconds
            k = known[lo:hi]
            pred = clf.predict_ids(res.images[k]) if bool(k.any()) else torch.zeros(0, dtype=torch.long)
            mine.append({"lo": lo, "pred": pred, "grid": res.images[: max(0, grid_n - lo)]})
        parts = sorted((p for rank_parts in all_gather(world, mine) for p in rank_parts), key=lambda p: p["lo"])
        described = world.describe()
        if not world.is_main:
            return None
        cc = class_consistency(clf, None, labels_t, model.class_names,
                               predictions=torch.cat([p["pred"] for p in parts]))

        def build(stage: Path) -> dict:
            save_grid(torch.cat([p["grid"] for p in parts])[:grid_n], stage / "grid.png", nrow=len(ids),
                      scale=max(1, 128 // model.resolution))
            return {"class_consistency": cc["accuracy"], "per_class": cc["per_class"], "n": cc["n"],
                    "classes": ids, "seconds": round(time.perf_counter() - t0, 1), "sampling_seconds": round(seconds, 1),
                    "classifier": str(classifier_path or ("shipped" if images is None else "artefact store")),
                    "classifier_val_accuracy": clf.val_accuracy, "model": model.identity(), "config": config.__dict__,
                    **described}

        identity = _model_identity(model)
        if prepared is not None:
            identity["images_manifest_sha256"] = prepared.image_set.manifest_hash()
        params = {"model": model_spec, "num_samples": num_samples, **config.__dict__,
                  "classifier": classifier_path, "images": images and str(images),
                  "labels": labels if isinstance(labels, str) else str(labels)}
        return _publish(out, "evaluate", model.name, params, identity, build,
                        lambda r: [("class_consistency", "class-consistency", r["class_consistency"], "%"),
                                   ("n", "samples classified", r["n"], ""), ("seconds", "time", r["seconds"], "s")],
                        start)
    finally:
        close_world(world)


DEFAULT_SDEDIT_STRENGTHS = (0.3, 0.5, 0.7, 0.85, 1.0)
GRID_PER_CLASS = 2  # images of each class in sdedit_grid.png


def evaluate_sdedit_consistency(model_spec: str, images: str | Path, config: SampleConfig, out: str | Path,
                                strengths=DEFAULT_SDEDIT_STRENGTHS, per_class: int = 16,
                                classifier_path: str | None = None, labels="auto") -> dict:
    """Class-consistency of SDEdit from real images (``per_class`` of each folder of ``images`` that maps
    to a model class, :mod:`tclab.labels`) at each of ``strengths``; writes ``result.json``,
    ``sdedit_consistency.png`` (per class vs strength) and ``sdedit_grid.png`` (top row: real images,
    ``GRID_PER_CLASS`` per class; then one row per strength), so one can see how a class is lost: a wrong
    shape, or the right shape with ragged edges."""
    import dataclasses

    from .classifier import class_consistency

    start = _now()
    strengths = [float(x) for x in strengths]
    if not strengths or any(not 0.0 < x <= 1.0 for x in strengths):
        raise ValueError(f"strengths {strengths}: give one or more values in (0, 1]")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    model = load_dit(model_spec)
    clf, ids, prepared = _classifier_and_classes(model, classifier_path, images, labels, limit=per_class)
    if not prepared.label_map.conditional:
        raise ValueError(f"no folder of {images} maps to a class of {model.name}; the SDEdit diagnosis conditions "
                         "each image on its class: name the folders as the model's classes or give --labels")
    lab = prepared.labels
    keep = torch.isin(lab, torch.tensor(ids, dtype=torch.long)).nonzero().flatten()
    data = dataclasses.replace(prepared.image_set, images=prepared.image_set.images[keep], labels=lab[keep],
                               records=[prepared.image_set.records[i] for i in keep.tolist()])
    names = [prepared.label_map.class_name_of(c) for c in ids]
    # the grid shows the first GRID_PER_CLASS images of each class: the real one, then one row per strength
    shown = torch.cat([torch.nonzero(data.labels == c).flatten()[:GRID_PER_CLASS] for c in ids])

    def build(stage: Path) -> dict:
        t0 = time.perf_counter()
        rows, grid = [], [data.images[shown]]
        for strength in strengths:
            cfg = SampleConfig(**{**config.__dict__, "sdedit_strength": strength})
            res = sample(model, data.labels, cfg, init_images=data.images)
            cc = class_consistency(clf, res.images, data.labels, model.class_names)
            rows.append({"strength": strength, "class_consistency": cc["accuracy"], "per_class": cc["per_class"]})
            grid.append(res.images[shown])
        real = class_consistency(clf, data.images, data.labels, model.class_names)
        _plot_sdedit(rows, names, stage / "sdedit_consistency.png", model.name)
        save_grid(torch.cat(grid), stage / "sdedit_grid.png", nrow=len(shown), scale=3)
        return {"rows": rows, "real_images": real["accuracy"], "n": len(data.labels), "images": str(images),
                "labels": prepared.label_map.to_dict(), "seconds": round(time.perf_counter() - t0, 1),
                "model": model.identity(), "config": config.__dict__,
                "classifier": str(classifier_path or "shipped or artefact store")}

    identity = {**_model_identity(model), "images_manifest_sha256": prepared.image_set.manifest_hash()}
    params = {"model": model_spec, "images": str(images), **config.__dict__, "strengths": strengths,
              "per_class": per_class, "classifier": classifier_path,
              "labels": labels if isinstance(labels, str) else str(labels)}
    return _publish(out, "evaluate-sdedit", model.name, params, identity, build,
                    lambda r: [("real_images", "class-consistency of the real images", r["real_images"], "%"),
                               *((f"class_consistency_at_{row['strength']:g}", f"at strength {row['strength']:g}",
                                  row["class_consistency"], "%") for row in (r["rows"][0], r["rows"][-1]))], start)


def _plot_sdedit(rows: list[dict], class_names: list[str], path: Path, model_name: str) -> None:
    from matplotlib.figure import Figure   # no pyplot: the caller's backend is left as it is

    x = [r["strength"] for r in rows]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for name in class_names:
        ax.plot(x, [r["per_class"][name] for r in rows], marker="o", label=name)
    ax.plot(x, [r["class_consistency"] for r in rows], "k--", lw=2, label="all")
    ax.set(xlabel="SDEdit strength (1 = from pure noise)", ylabel="class-consistency", ylim=(-0.02, 1.02),
           title=f"{model_name}: which noise levels keep each class")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
