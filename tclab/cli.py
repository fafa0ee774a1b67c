"""``tclab``: a thin command-line front end; each sub-command calls one package function."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _cmd_make_images(a: argparse.Namespace) -> int:
    from .shapes import ShapesConfig, write_shapes_dataset

    out = write_shapes_dataset(a.out, ShapesConfig(resolution=a.resolution, per_class=a.per_class, seed=a.seed))
    print(out)
    return 0


def _cmd_train_dit(a: argparse.Namespace) -> int:
    from .train_dit import TrainDiTConfig, train_dit

    cfg = TrainDiTConfig(images=a.images, out=a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed,
                         init_from=a.init_from, cooldown=a.cooldown, snr_gamma=a.snr_gamma, lr=a.lr,
                         t_sampling=a.t_sampling)
    print(train_dit(cfg, resume=a.resume))
    return 0


def _cmd_train_predictor(a: argparse.Namespace) -> int:
    from .cache.train import PredictorTrainConfig, collect_trajectories, train_predictor
    from .models import load_dit
    from .prepare import describe_predictor

    kinds = ["learned-static", "learned-dynamic"] if a.kind == "both" else [a.kind]
    outs: dict[str, str | None] = {k: a.out for k in kinds}
    if a.out and len(kinds) > 1:
        if not (Path(a.out).is_dir() or a.out.endswith(("/", "\\"))):
            print("tclab train-predictor: with --kind both, --out must be a folder (each kind is written there as "
                  "<model>-predictor-<static|dynamic>.safetensors); or leave --out out to write both into the "
                  "artefact store", file=sys.stderr)
            return 2
    model = load_dit(a.model)
    if a.out and len(kinds) > 1:
        outs = {k: str(Path(a.out) / f"{model.name}-predictor-{k.split('-')[1]}.safetensors") for k in kinds}
    trajectories = None  # collected once, shared by both kinds
    for kind in kinds:
        cfg = PredictorTrainConfig(kind=kind, images=a.images, labels=a.labels, steps=a.steps, num_steps=a.num_steps,
                                   lam=a.lam, scheduler=a.scheduler, guidance_scale=a.guidance,
                                   num_samples=a.num_samples, batch_size=a.batch_size, max_gap=a.max_gap, seed=a.seed,
                                   eval_pairs=a.eval_pairs, out=outs[kind], rollout=a.rollout, schedule=a.schedule,
                                   max_seconds=a.max_seconds)
        if trajectories is None and len(kinds) > 1 and not a.resume:
            trajectories = collect_trajectories(model, cfg)
        path = train_predictor(model, cfg, resume=a.resume, trajectories=trajectories)
        print(describe_predictor(path))
    return 0


def _schedule_spec(text: str) -> dict:
    """``--schedule KIND:VALUES`` (``tclab.cache.train.parse_schedule_spec``); bad syntax is an argparse error."""
    from .cache.train import parse_schedule_spec

    try:
        return parse_schedule_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_runs_clean(a: argparse.Namespace) -> int:
    from .runs import _find_reports_dir, clean_dead_runs

    reports = Path(a.reports) if a.reports else _find_reports_dir()
    marked = clean_dead_runs(reports)
    print(f"{len(marked)} dead run(s) marked failed in {reports}" if marked else
          f"no leftovers of dead runs in {reports}")
    return 0


def _reports(a: argparse.Namespace) -> Path:
    from .runs import _find_reports_dir

    reports = Path(a.reports) if a.reports else _find_reports_dir()
    if not reports.is_dir():
        raise FileNotFoundError(f"reports folder {reports} does not exist; pass --reports DIR (the folder your runs "
                                "are in) or set $TCLAB_REPORTS_DIR")
    return reports


def _run_filter(a: argparse.Namespace):
    from .runs import RunFilter

    return RunFilter(notebook=a.notebook, model=a.model, images=a.images, tag=a.tag, status=a.status,
                     since=a.since, until=a.until)


def _cmd_runs_list(a: argparse.Namespace) -> int:
    from .runs import rows, table
    from .runs.views import list_text

    reports = _reports(a)
    if a.csv or a.parquet:
        frame = table(reports, filter=_run_filter(a))
        frame = frame.head(a.limit) if a.limit else frame
        for out, write in ((a.csv, frame.to_csv), (a.parquet, frame.to_parquet)):
            if out:
                write(out, index=False)
                print(out)
        return 0
    found = rows(reports, filter=_run_filter(a))[: a.limit or None]
    if a.json:
        print(json.dumps(found, indent=2, default=str))
    else:
        print(list_text(found, str(reports)))
    return 0


def _cmd_runs_show(a: argparse.Namespace) -> int:
    from .runs import find_run
    from .runs.views import show_text

    reports = _reports(a)
    row = find_run(reports, a.run)
    print(json.dumps(row, indent=2, default=str) if a.json else show_text(row, str(reports)))
    return 0


def _cmd_runs_compare(a: argparse.Namespace) -> int:
    from .runs import find_run
    from .runs.views import compare_text

    reports = _reports(a)
    print(compare_text(find_run(reports, a.run_a), find_run(reports, a.run_b), every_value=a.all))
    return 0


def _cmd_runs_rebuild(a: argparse.Namespace) -> int:
    from .runs import rebuild, rows, write_index

    reports = _reports(a)
    out = rebuild(reports)
    write_index(reports)
    print(f"{len(rows(reports))} run(s) in {out}; index.html rewritten from it")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .runs import rows
    from .runs.export import (default_logdir, default_tracking_uri, expand_run_dirs, export_mlflow,
                              export_tensorboard)

    reports = Path(a.reports) if a.reports else None
    filtered = any(getattr(a, k) for k in ("notebook", "model", "images", "tag", "status", "since", "until"))
    if a.runs and filtered:
        print(f"tclab export {a.tracker}: give run folders or filters (--notebook ...), not both", file=sys.stderr)
        return 2
    if filtered or not a.runs:
        reports = _reports(a)
        dirs = [reports / r["run"] for r in rows(reports, filter=_run_filter(a))]
        if not dirs:
            print(f"tclab export {a.tracker}: no run in {reports} matches; `tclab runs list` shows them",
                  file=sys.stderr)
            return 2
    else:
        dirs = expand_run_dirs(a.runs)
        reports = reports or dirs[0].parent
    if a.tracker == "mlflow":
        uri = a.tracking_uri or default_tracking_uri(reports)
        done = export_mlflow(dirs, uri, experiment=a.experiment)
        new = sum(r.created for r in done)
        print(f"{new} run(s) exported, {sum(r.replaced for r in done)} of them replacing a changed one, "
              f"{len(done) - new} already there: {uri} (experiment {a.experiment!r})")
        print(f"view: mlflow ui --backend-store-uri {uri}   (the UI needs the full mlflow package, in its own "
              "environment)")
    else:
        logdir = Path(a.logdir) if a.logdir else default_logdir(reports)
        written = export_tensorboard(dirs, logdir)
        print(f"{len(written)} run(s) in {logdir}")
        print(f"view: tensorboard --logdir {logdir}")
    return 0


def _cmd_ratings_import(a: argparse.Namespace) -> int:
    from .rating import import_ratings, read_verdict

    run = Path(a.run)
    if not run.is_dir():   # a run's name (or a unique part of it) in the reports folder, as the page prints it
        from .runs import find_run

        reports = _reports(a)
        run = reports / find_run(reports, a.run)["run"]
    out = import_ratings(run, a.file)
    verdict = read_verdict(run)
    print(f"ratings added to {run.name}: {out}")
    if verdict is not None:
        print(verdict.sentence)
    print(f"report: {run / 'report.html'}")
    return 0


def _cmd_artefacts(a: argparse.Namespace) -> int:
    from .artefacts import list_artefacts, tclab_home

    frame = list_artefacts()
    print(f"artefact store: {tclab_home()} (set $TCLAB_HOME to move it)")
    if frame.empty:
        print("  nothing yet: `tclab train-predictor --model M` and `tclab train-classifier --images DIR --model M` "
              "write here, and so do notebooks run with train_missing=True")
        return 0
    for r in frame.itertuples(index=False):
        print(f"  {r.kind:16s} {r.belongs_to:24s} key {r.key}")
        for line in (f"{r.file} ({r.bytes / 1024:.0f} KiB)", r.source, r.check):
            if line:
                print(f"  {'':16s} {line}")
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from .runs import (ParameterError, RunFailedError, load_parameters, resolve_notebook, resolve_params_file,
                       run_notebook)

    try:
        notebook = resolve_notebook(a.notebook)      # 01, 01_token_redundancy[.ipynb] or a path
        params_file = resolve_params_file(a.params_file, notebook) if a.params_file else None   # smoke or a path
        params = load_parameters(params_file, a.param)
        out = run_notebook(notebook, params, reports_dir=a.reports, tag=a.tag)
    except (ParameterError, FileNotFoundError) as e:
        print(f"tclab run: {e}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"tclab run: {e}", file=sys.stderr)
        print(e.run_dir)
        return 1
    print(f"report: {out / 'report.html'}   (all runs: {out.parent / 'index.html'})")
    print(out)
    return 0


def _cmd_train_classifier(a: argparse.Namespace) -> int:
    from .classifier import ClassifierConfig, train_classifier
    from .data import load_image_folder
    from .paths import resolve_images

    if a.model is None:  # the embedded model's recipe: folder classes in sorted order are the class ids
        if a.out is None:
            print("tclab train-classifier: without --model, give --out (the classifier's class ids are then the "
                  "folders' sorted order); with --model M it goes to the artefact store", file=sys.stderr)
            return 2
        train = load_image_folder(resolve_images(a.images), a.resolution, progress=True)
        val = load_image_folder(resolve_images(a.val_images), a.resolution) if a.val_images else None
        clf = train_classifier(train, val, ClassifierConfig(epochs=a.epochs, seed=a.seed))
        print(f"held-out accuracy: {clf.val_accuracy}" if val else "no validation set given")
        print(clf.save(a.out))
        return 0
    from .artefacts import classifier_path
    from .models import load_dit
    from .prepare import load_images, train_classifier_for

    model = load_dit(a.model)
    prepared = load_images(a.images, model, a.labels, progress=True)
    clf = train_classifier_for(model, prepared.image_set, prepared.label_map, epochs=a.epochs, seed=a.seed)
    out = clf.save(a.out or classifier_path(prepared.image_set, prepared.label_map, model.resolution))
    acc = "none held out (fewer than 5 images in a class)" if clf.val_accuracy is None else f"{clf.val_accuracy:.3f}"
    print(f"classifier of {len(clf.class_names)} mapped classes {clf.model_class_ids}: held-out accuracy {acc}")
    print(out)
    return 0


def _cmd_check_images(a: argparse.Namespace) -> int:
    from .data import ImageSetError, load_image_folder

    try:
        s = load_image_folder(a.folder, a.resolution, min_side=a.min_side, progress=True)
    except ImageSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = s.summary()
    print(f"{info['usable']} usable images in {info['root']}, {info['skipped']} skipped")
    for name, n in info["per_class"].items():
        print(f"  {name:20s} {n}")
    for bad in s.skipped:
        print(f"  skipped {bad.path}: {bad.reason}")
    print(f"manifest sha256 {info['manifest_sha256']}")
    if a.manifest:
        s.manifest().to_csv(a.manifest, index=False)
        print(f"manifest written to {a.manifest}")
    return 0


def _cmd_flops(a: argparse.Namespace) -> int:
    from .metrics import PAPER_GMACS, transformer_forward_flops
    from .models import load_dit

    m = load_dit(a.model, resolution=a.resolution)
    fc = transformer_forward_flops(m.transformer)
    print(f"{m.name}: {fc.gmacs:.2f} GMACs = {fc.gflops:.2f} GFLOPs per forward of one image "
          f"({m.token_grid[0]}x{m.token_grid[1]} tokens, {len(m.transformer.transformer_blocks)} blocks)")
    for op, n in sorted(fc.by_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:55s} {n / 2e9:10.3f} GMACs")
    paper = PAPER_GMACS.get((a.model, a.resolution))
    if paper is not None:
        print(f"DiT paper (Table 4): {paper} GMACs -> difference {100 * (fc.gmacs / paper - 1):+.2f}%")
    return 0


def _sample_config(a: argparse.Namespace):
    from .sampling import SampleConfig

    return SampleConfig(num_steps=a.steps, scheduler=a.scheduler, guidance_scale=a.guidance, seed=a.seed,
                        batch_size=a.batch_size)


def _finite_float(text: str) -> float:
    """A number option: NaN and infinity are refused (argparse's float would take them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number (NaN and infinity are not accepted)")
    return value


def _strength_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers in (0, 1], e.g. 0.3,0.5,1") from None
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every strength must be in (0, 1]")
    return values


def _cmd_sample(a: argparse.Namespace) -> int:
    from .evaluate import sample_grid, sample_npz

    if a.npz is None:
        if a.resume or a.workers != 1:
            print("tclab sample: --resume and --workers go with --npz OUT.npz (the sharded sampler)", file=sys.stderr)
            return 2
        print(sample_grid(a.model, _sample_config(a), a.num_samples, a.out))
        return 0
    if a.workers > 1:   # torchrun on this machine, one worker per CPU thread or GPU
        return _launch(a, ["sample", "--model", a.model, "--num-samples", str(a.num_samples), "--steps", str(a.steps),
                           "--scheduler", a.scheduler, "--guidance", str(a.guidance), "--seed", str(a.seed),
                           "--batch-size", str(a.batch_size), "--npz", str(Path(a.npz).resolve()),
                           *(["--resume"] if a.resume else []),
                           *(["--out", str(Path(a.out).resolve())] if a.out else [])],
                       Path(a.npz).resolve().with_name(Path(a.npz).name + ".logs"))
    out = sample_npz(a.model, _sample_config(a), a.num_samples, a.npz, resume=a.resume, reports_dir=a.out)
    if out is not None:   # rank 0 merged
        print(out)
    return 0


def _cmd_record(a: argparse.Namespace) -> int:
    from .evaluate import record_to_store

    out = record_to_store(a.model, _sample_config(a), a.num_samples, a.out, resume=a.resume)
    if out is not None:   # rank 0, once every shard is in
        from .record import open_record

        store = open_record(out)
        print(f"{store.num_samples} samples, {store.num_steps} steps, {store.num_blocks} blocks, {store.num_tokens} "
              f"tokens: {store.nbytes / 2**20:.1f} MiB in {len(store.chunks)} chunk(s) from rank(s) {store.ranks}; "
              "read it with tclab.record.open_record(FOLDER)")
        print(out)
    return 0


def _cmd_sweep_worker(a: argparse.Namespace) -> int:
    from .ablation import run_sweep_worker

    run_sweep_worker(a.work_dir, resume=a.resume)
    return 0


def _launch(a: argparse.Namespace, worker_args: list[str], log_dir: Path) -> int:
    """Run ``tclab <worker_args>`` under torchrun on ``a.workers`` local processes (``tclab.distributed``)."""
    import shutil

    from .distributed import ShardFolder, WorkerFailedError, launch_workers

    watch = ShardFolder(Path(a.npz).resolve().with_name(Path(a.npz).name + ".shards")).progress(f"{a.command} "
                                                                                                 f"({a.workers} workers)")
    try:
        launch_workers(a.workers, worker_args, log_dir, on_poll=watch)
    except WorkerFailedError as e:
        print(f"tclab {a.command}: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)
    out = Path(a.npz)
    print(out)
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_class_consistency, evaluate_distribution, evaluate_sdedit_consistency

    if (a.fid is None) != (a.reference is None):
        print("tclab evaluate: --fid SAMPLES.npz and --reference REF.npz go together", file=sys.stderr)
        return 2
    if a.fid:
        result = evaluate_distribution(a.fid, a.reference, a.out, inception=a.inception, classifier=a.classifier,
                                       shard_size=a.batch_size, seed=a.seed)
        if result is None:   # a torchrun rank other than 0
            return 0
        fid = f"{result['fid']:.4f}" if result["fid"] is not None else result["fid_reason"]
        print(f"FID {fid}; KID {result['kid']:.5f} (std {result['kid_std']:.5f}); {result['n_samples']} samples, "
              f"{result['n_reference']} reference images; features: {result['extractor']['name']}")
        print(result["out"])
        return 0
    if a.sdedit_from:
        result = evaluate_sdedit_consistency(a.model, a.sdedit_from, _sample_config(a), a.out, a.strengths,
                                             a.per_class, a.classifier, labels=a.labels)
        for r in result["rows"]:
            per = " ".join(f"{k} {v:.2f}" for k, v in r["per_class"].items())
            print(f"strength {r['strength']:.2f}: class-consistency {r['class_consistency']:.3f} ({per})")
        print(f"real images: {result['real_images']:.3f} ({result['n']} images, {result['seconds']} s)")
        print(result["out"])
        return 0
    result = evaluate_class_consistency(a.model, _sample_config(a), a.num_samples, a.out, a.classifier,
                                        images=a.images, labels=a.labels)
    if result is None:   # a torchrun rank other than 0: rank 0 merges and prints
        return 0
    print(json.dumps({k: result[k] for k in ("class_consistency", "per_class", "seconds")}, indent=2))
    print(result["out"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tclab", description="Token caching workbench for diffusion transformers.",
        epilog="Exit status: 0 done; 1 it ran and failed (e.g. a notebook raised: see the run's error.txt); 2 nothing "
               "could run (a bad model, image folder, parameter or file; the message names it and the fix); `schedule run`: 3 "
               "when every job ran but a quality gate failed. "
               "--debug (or TCLAB_DEBUG=1) also prints the traceback.")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-images", help="write the synthetic stand-in image set (class sub-folders of PNGs)")
    s.add_argument("out", help="new or empty folder to write")
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--resolution", type=int, default=32)
    s.add_argument("--seed", type=int, default=1)
    s.set_defaults(func=_cmd_make_images)

    s = sub.add_parser("train-dit", help="train the small class-conditional DiT on an image folder")
    s.add_argument("--images", default="data/shapes-train",
                   help="image folder, one sub-folder per class (default data/shapes-train, which is not committed: "
                        "write it first with `tclab make-images data/shapes-train --per-class 400 --seed 0`)")
    s.add_argument("--out", default="tclab/weights/shapes-dit")
    s.add_argument("--steps", type=int, default=4000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lr", type=_finite_float, default=3e-4,
                   help="AdamW peak learning rate (default 3e-4; lower suits continuing a trained model)")
    s.add_argument("--cooldown", type=int, default=0,
                   help="decay the learning rate linearly to 0 over the last N steps (default 0: constant)")
    s.add_argument("--snr-gamma", type=_finite_float, default=None,
                   help="Min-SNR-gamma loss weighting (e.g. 5; default: plain MSE)")
    s.add_argument("--t-sampling", default="uniform", choices=["uniform", "lognormal-mix"],
                   help="how training timesteps are drawn (lognormal-mix: half of them around sigma = 1, "
                        "see TrainDiTConfig)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.add_argument("--init-from", help="start from an exported model folder (e.g. tclab/weights/shapes-dit)")
    s.set_defaults(func=_cmd_train_dit)

    s = sub.add_parser("train-predictor", help="train the learned Cache Predictor (TokenCache) on a frozen DiT; it is "
                                              "kept in the artefact store ($TCLAB_HOME), where the scorers find it")
    s.add_argument("--model", default="shapes-dit", help="'shapes-dit', a local DiT folder or a preset")
    s.add_argument("--kind", default="learned-static", choices=("learned-static", "learned-dynamic", "both"))
    s.add_argument("--images", default=None, help="image folder whose SDEdit traces are added to the trajectories")
    s.add_argument("--labels", default="auto",
                   help="how --images folders map onto the model's classes: auto (default), unconditional, or a "
                        "YAML/JSON/CSV mapping file (folder: class id or name)")
    s.add_argument("--steps", type=int, default=300, help="optimiser steps")
    s.add_argument("--num-steps", type=int, default=50, help="sampling steps of the training trajectories")
    s.add_argument("--lambda", dest="lam", type=_finite_float, default=1.0, help="compute penalty (higher = fewer tokens)")
    s.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm++", "euler"))
    s.add_argument("--guidance", type=_finite_float, default=4.0)
    s.add_argument("--num-samples", type=int, default=6, help="trajectories sampled from noise")
    s.add_argument("--batch-size", type=int, default=4, help="step pairs per optimiser step")
    s.add_argument("--max-gap", type=int, default=1, help="pairs (s-g, s) with g up to this (1 = adjacent)")
    s.add_argument("--rollout", type=int, default=0, metavar="K",
                   help="rollout training: windows of up to K cached steps after a full step, the cache evolving as "
                        "in the engine (0 = one-step pairs, the default; --batch-size then counts windows)")
    s.add_argument("--schedule", type=_schedule_spec, default=None, metavar="KIND:VALUES",
                   help="with --rollout: the schedule the cache will run with; windows start at its full steps and "
                        "stop before the next one. tprr:K1,K2,SPLIT (e.g. tprr:6,4,0.5), round-robin:K, or "
                        "name=value pairs (tprr:k1=6,k2=4,split=0.5,force_last=1). Default: windows start anywhere")
    s.add_argument("--max-seconds", type=_finite_float, default=None,
                   help="stop after this many seconds of training (--steps stays the upper bound)")
    s.add_argument("--eval-pairs", type=int, default=16, help="pairs for the predictor-vs-random check (0 = skip)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="predictor file (a folder with --kind both); default: this model's "
                                               "place in the artefact store ($TCLAB_HOME, see `tclab artefacts`)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(func=_cmd_train_predictor)

    s = sub.add_parser("run", help="execute a parameterised notebook into a new reports/ run folder")
    s.add_argument("notebook", help="the notebook: its number (01), its name (01_token_redundancy, with or "
                                    "without .ipynb) in the project's notebooks/ folder, or a path to an .ipynb "
                                    "(a path that exists from the working directory wins); its 'parameters' cell "
                                    "defines the valid names")
    s.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="set a parameter; VALUE is read as YAML (10 -> int, true -> bool, text -> str)")
    s.add_argument("-f", "--params-file", metavar="PRESET_OR_YAML",
                   help="parameters from a YAML mapping: a preset of the notebook by name (-f smoke, -f full: "
                        "notebooks/params/01_smoke.yaml, notebooks/params/01_full.yaml for notebook 01) or a path "
                        "to a YAML file; -p wins")
    s.add_argument("--reports", help="folder for run folders and index.html (default: $TCLAB_REPORTS_DIR if set, "
                                     "else reports/ in the nearest folder up from the working directory that holds "
                                     "pyproject.toml or .git, else ./reports)")
    s.add_argument("--tag", help="short name for this setting (default: a hash of the parameters)")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("train-classifier", help="train the class-consistency classifier on real images")
    s.add_argument("--images", default="data/shapes-train",
                   help="class folders of real images (default data/shapes-train: `tclab make-images data/shapes-train "
                        "--per-class 400 --seed 0` writes it); 'shapes' is the committed stand-in set")
    s.add_argument("--model", default=None,
                   help="the model whose classes the folders map to (--labels); the classifier then answers in its "
                        "class ids and goes to the artefact store, keyed by these images and labels")
    s.add_argument("--labels", default="auto", help="with --model: auto (default), unconditional, "
                                                                        "or a mapping file")
    s.add_argument("--val-images", default=None, help="held-out folder (without --model; with it, every 5th image "
                                                      "of each class is held out)")
    s.add_argument("--resolution", type=int, default=32, help="without --model (with it: the model's resolution)")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="classifier file (default with --model: the artefact store; the "
                                               "shipped one is tclab/weights/shapes-classifier.safetensors)")
    s.set_defaults(func=_cmd_train_classifier)

    s = sub.add_parser("check-images", help="validate an image folder; exit 2 when nothing is usable")
    s.add_argument("folder")
    s.add_argument("--resolution", type=int, default=32, help="preprocessing size (does not affect checks)")
    s.add_argument("--min-side", type=int, default=16, help="smaller images are skipped as too small")
    s.add_argument("--manifest", help="also write the manifest (path, class, size, sha256) to this CSV")
    s.set_defaults(func=_cmd_check_images)

    s = sub.add_parser("flops", help="FLOPs of one transformer forward, counted on what runs")
    s.add_argument("model", help="'shapes-dit', a preset such as DiT-XL/2, or a local diffusers folder")
    s.add_argument("--resolution", type=int, default=256, choices=(256, 512), help="for presets")
    s.set_defaults(func=_cmd_flops)

    for name, func, helptext in (("sample", _cmd_sample, "sample a class-balanced grid and save it"),
                                 ("evaluate", _cmd_evaluate, "class-consistency of generated samples"),
                                 ("record", _cmd_record, "record every block's token changes into an on-disk record "
                                                         "store, a batch at a time (sharded under torchrun)")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", default="shapes-dit",
                       help="'shapes-dit' (default), a local diffusers folder, or an untrained preset")
        s.add_argument("--num-samples", type=int, default=256 if name == "evaluate" else 48,
                       help="images, class-balanced (default: %(default)s)")
        s.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
        s.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm++", "euler"),
                       help="default: %(default)s")
        s.add_argument("--guidance", type=_finite_float, default=4.0,
                       help="classifier-free guidance scale; 1 turns it off (default: %(default)s)")
        s.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: %(default)s)")
        s.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
        if name == "record":
            s.add_argument("--out", required=True, help="the record store folder to write (new or empty)")
            s.add_argument("--resume", action="store_true", help="continue a recording that stopped: skip the "
                                                                 "shards whose samples the store holds")
        else:
            s.add_argument("--out", default=None,
                           help="reports folder: each run writes a new run folder <UTC>_<command>_<model> there, "
                                "listed in its index.html and run table (default: as `tclab run`)")
        if name == "sample":
            s.add_argument("--npz", metavar="OUT.npz", default=None,
                           help="instead of a grid: write the samples to OUT.npz in the ADM evaluator's layout (arr_0 "
                                "uint8 NHWC, plus labels), sample i of class i %% K with noise seeded by (seed, i), so "
                                "the file is the same at any world size; shards under torchrun (see README)")
            s.add_argument("--resume", action="store_true",
                           help="with --npz: continue a run that stopped, skipping the shards it finished")
            s.add_argument("--workers", type=int, default=1,
                           help="with --npz: start torchrun with this many worker processes on this machine "
                                "(default 1: this process; under your own torchrun leave it at 1)")
        if name == "evaluate":
            s.add_argument("--classifier", default=None, help="classifier weights (default: the shipped one for "
                                                              "shapes-dit, else the one of --images)")
            s.add_argument("--images", default=None,
                           help="your class folders: sample the model classes they map to, and measure with the "
                                "classifier trained on them (trained now and kept in $TCLAB_HOME if missing)")
            s.add_argument("--labels", default="auto",
                           help="how folders map onto the model's classes: auto (default), or a mapping file")
            s.add_argument("--sdedit-from", metavar="DIR",
                           help="diagnosis instead of sampling from noise: SDEdit real images of each class "
                                "(DIR has one sub-folder per class) at --strengths, conditioned on their class")
            s.add_argument("--strengths", type=_strength_list, default="0.3,0.5,0.7,0.85,1.0",
                           help="with --sdedit-from: comma-separated, each in (0, 1]")
            s.add_argument("--per-class", type=int, default=16, help="with --sdedit-from: images per class")
            s.add_argument("--fid", metavar="SAMPLES.npz", default=None,
                           help="instead of sampling: FID and KID of these images (ADM layout, e.g. from `tclab sample "
                                "--npz`) against --reference; sharded under torchrun, --batch-size images a shard")
            s.add_argument("--reference", metavar="REF.npz", default=None, help="with --fid: the reference images")
            s.add_argument("--inception", metavar="FILE", default=None,
                           help="with --fid: the FID InceptionV3 weights, a local file (pt_inception-2015-12-05-"
                                "6726825d.pth); default: the small classifier's features, NOT comparable to published FID")
        s.set_defaults(func=func)
    s = sub.add_parser("sweep-worker", help="one torchrun rank of a sweep measured with workers > 1 (started by "
                                            "tclab itself: run_sweep(..., workers=N), notebooks' workers parameter)")
    s.add_argument("work_dir", help="the sweep's work folder (its sweep_plan.pt)")
    s.add_argument("--resume", action="store_true", help="skip the units already finished in the folder")
    s.set_defaults(func=_cmd_sweep_worker)
    _add_runs_parser(sub)

    s = sub.add_parser("artefacts", help="list the Cache Predictors and classifiers trained for your models and "
                                         "image sets ($TCLAB_HOME)")
    s.set_defaults(func=_cmd_artefacts)
    _add_schedule_parser(sub)
    return p


def _add_run_filters(s, reports_help: str) -> None:
    s.add_argument("--reports", help=reports_help)
    s.add_argument("--notebook", help="a notebook's stem or number (01, 05_inhouse_report) or a command (evaluate)")
    s.add_argument("--model", help="part of the model spec, or the start of its weights hash")
    s.add_argument("--images", help="part of the image-set spec, or the start of its manifest hash")
    s.add_argument("--tag", help="the run's tag (a scheduled job's name)")
    s.add_argument("--status", choices=("ok", "failed", "running", "unknown"))
    s.add_argument("--since", metavar="DATE", help="started on or after, UTC: YYYY-MM-DD[THH:MM]")
    s.add_argument("--until", metavar="DATE", help="started before (a date: up to its end), UTC")


def _add_export_parser(sub, reports_help: str) -> None:
    s = sub.add_parser("export", help="copy runs into an experiment tracker: a local MLflow store or TensorBoard "
                                      "event files (pip install 'tclab[export]')")
    esub = s.add_subparsers(dest="tracker", required=True)
    for tracker, helptext in (("mlflow", "one MLflow run per run folder (a sweep's variants as child runs), with "
                                         "parameters, metrics, figures and the report as artefacts"),
                              ("tensorboard", "event files per run folder: headline scalars, the sweep's points, "
                                              "figures, parameters")):
        s = esub.add_parser(tracker, help=helptext)
        s.add_argument("runs", nargs="*", metavar="RUN_OR_REPORTS",
                       help="run folders, or reports folders (all their runs); default: every run of --reports, or "
                            "those the filters keep")
        _add_run_filters(s, reports_help)
        if tracker == "mlflow":
            s.add_argument("--tracking-uri", help="sqlite:///PATH.db (default: <reports>/.mlflow/mlflow.db), "
                                                  "file:PATH, or an http(s):// server you name")
            s.add_argument("--experiment", default="tclab", help="MLflow experiment (default: %(default)s)")
        else:
            s.add_argument("--logdir", help="event files go to LOGDIR/<run folder>/ (default: <reports>/.tensorboard)")
        s.set_defaults(func=_cmd_export)


def _add_runs_parser(sub) -> None:
    s = sub.add_parser("runs", help="the run table (reports/runs.sqlite): list, show, compare runs; rebuild it; "
                                    "clean the leftovers of dead runs")
    rsub = s.add_subparsers(dest="runs_command", required=True)
    reports_help = "reports folder (default: as `tclab run`: $TCLAB_REPORTS_DIR, else reports/ of this project)"
    s = rsub.add_parser("list", help="the runs, newest first, with their headline figures (filter with the options)")
    _add_run_filters(s, reports_help)
    s.add_argument("--limit", type=int, default=0, help="at most this many (newest first)")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the rows as JSON")
    out.add_argument("--csv", metavar="FILE", help="write the table (one column per parameter and figure) as CSV")
    out.add_argument("--parquet", metavar="FILE", help="write it as Parquet")
    s.set_defaults(func=_cmd_runs_list)
    s = rsub.add_parser("show", help="everything the table holds about one run: figures, parameters, variants")
    s.add_argument("run", help="its folder name, or a part of it only this run has (e.g. its start time)")
    s.add_argument("--reports", help=reports_help)
    s.add_argument("--json", action="store_true", help="as JSON")
    s.set_defaults(func=_cmd_runs_show)
    s = rsub.add_parser("compare", help="two runs side by side: models, differing parameters, headline figures, B - A")
    s.add_argument("run_a", help="run A (folder name or a unique part of it)")
    s.add_argument("run_b", help="run B")
    s.add_argument("--reports", help=reports_help)
    s.add_argument("--all", action="store_true", help="list every headline value, also those equal in both runs")
    s.set_defaults(func=_cmd_runs_compare)
    s = rsub.add_parser("rebuild", help="recreate runs.sqlite from the run folders (and index.html from it)")
    s.add_argument("--reports", help=reports_help)
    s.set_defaults(func=_cmd_runs_rebuild)
    s = rsub.add_parser("clean", help="mark every staged run whose process is gone as FAILED (listed in index.html); "
                                      "live runs are left alone")
    s.add_argument("--reports", help=reports_help)
    s.set_defaults(func=_cmd_runs_clean)
    _add_export_parser(sub, reports_help)
    s = sub.add_parser("ratings", help="blind A/B ratings of an in-house report's images by people (tclab.rating)")
    rsub = s.add_subparsers(dest="ratings_command", required=True)
    s = rsub.add_parser("import", help="add a file exported from a run's rating/rate.html page to that run: its "
                                       "ratings/, ratings_summary.json, the report's human verdict, the run table")
    s.add_argument("file", help="the .json or .csv the page exported")
    s.add_argument("--run", required=True, help="the run the rating set belongs to: its folder, or its name (or a "
                                                "unique part of it) in --reports")
    s.add_argument("--reports", help="reports folder of --run given by name (default: as `tclab run`)")
    s.set_defaults(func=_cmd_ratings_import)


def _cmd_schedule_run(a: argparse.Namespace) -> int:
    from .jobs import cli_schedule_run

    return cli_schedule_run(a.jobs_file, dry_run=a.dry_run)


def _add_schedule_parser(sub) -> None:
    s = sub.add_parser("schedule", help="scheduled reports: run the jobs of a YAML jobs file (for cron/systemd)")
    ssub = s.add_subparsers(dest="schedule_command", required=True)
    s = ssub.add_parser("run", help="run every job in order into the file's reports folder; exit 0 if every job ran "
                                    "and passed its gates, 1 if a job failed to run, 3 if a quality gate failed, 2 if "
                                    "the file is invalid or another schedule run holds the folder",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""exit status:
  0      every job ran and passed its quality gates
  1      a job failed to run (raised, timed out, gates could not be checked); wins over 3
  2      nothing ran: invalid jobs file, or the reports folder is locked or unwritable
  3      every job ran, but a quality gate failed (runs kept, marked GATE FAILED;
         the recommended setting stays the last one that passed)
  128+N  stopped by signal N (143: SIGTERM, 129: SIGHUP)
per job in the jobs file: gates: {psnr_min: 30, flop_speedup_min: 1.8, psnr_drop_max: 1.0, ...};
on_failure: COMMAND (per job or for the whole file) gets the summary as JSON on stdin and in TCLAB_ALERT_JSON""")
    s.add_argument("jobs_file", help="YAML jobs file (see jobs/example.yaml); paths in it are relative to its folder")
    s.add_argument("--dry-run", action="store_true", help="check the file and print the plan; run nothing")
    s.set_defaults(func=_cmd_schedule_run)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the input was wrong (exit 2, one message naming it); anything else is a failure."""
    import json as _json

    import yaml

    from .data import ImageSetError
    from .labels import LabelSpecError
    from .models import ModelSpecError
    from .runs import ParameterError

    # ValueError: the configs (SampleConfig, TokenCacheConfig, ...) refuse bad values with it, naming the field.
    # TypeError is not here: outside the checks that raise the classes above it means a bug.
    return (ModelSpecError, ImageSetError, LabelSpecError, ParameterError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, _json.JSONDecodeError, yaml.YAMLError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command: the one error boundary of the command line.

    A wrong input (model spec, image folder, labels, parameter, file, YAML/JSON, permissions) prints one
    line ``tclab <command>: <what was wrong and the fix>`` and exits 2; a disk that is full or another
    OS error, or an unexpected error, prints one line and exits 1. The traceback is printed only with
    ``--debug`` or ``TCLAB_DEBUG=1`` (a notebook's is always in its run's ``error.txt``).
    """
    import errno
    import os
    import traceback

    from .env import DEBUG_ENV

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    name = f"tclab {args.command}"
    from .runs import RunStopped

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; a run in progress is marked failed in its reports folder", file=sys.stderr)
        return 130
    except RunStopped as e:
        print(f"{name}: {e}; the run in progress is marked failed in its reports folder", file=sys.stderr)
        return 128 + (e.signum or 15)
    except _user_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"{name}: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            traceback.print_exc()
        what = "the disk is full" if e.errno == errno.ENOSPC else "an operating-system error"
        print(f"{name}: {what}: {_one_line(e)}; nothing finished was overwritten", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the boundary: one line, never a raw traceback
        if debug:
            traceback.print_exc()
        print(f"{name}: failed with {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback; "
              "if the input looks right, it is a bug in tclab)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(text.split()) if len(text) < 2000 else " ".join(text.split())[:2000] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
