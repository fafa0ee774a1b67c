"""Load a DiT: the embedded default, a user's local diffusers folder, or an untrained preset.

``load_dit(spec)`` takes one string and returns a ``LoadedDiT`` (transformer, VAE, scheduler config,
class names, identity). Specs:

- ``"shapes-dit"`` (alias ``"embedded"``): tclab's own class-conditional DiT, trained by
  ``tclab train-dit`` on the stand-in shapes set and shipped in ``tclab/weights/shapes-dit``. It
  works in pixel space (32x32x3 with patch 2 -> a 16x16 token grid, the grid of DiT-XL/2 at 256 px),
  so its "VAE" is the identity ``PixelSpaceVAE``.
- a local folder: a full ``DiTPipeline`` layout (``transformer/``, ``vae/``, ``scheduler/``), e.g. a
  user's copy of facebook/DiT-XL-2-256, or a transformer-only folder (``config.json`` + weights).
- an architecture preset, named as in the DiT repo (``DiT-S/2`` ... ``DiT-XL/8``), with random
  weights: **untrained**, for speed and FLOP studies only. ``resolution`` picks 256 or 512 px.

Weights are read from safetensors (or ``torch.load(weights_only=True)``): no pickled code runs and
nothing is downloaded (``local_files_only``). A folder is loaded strictly (``_load_strict``): a weight
the checkpoint lacks, one the config has no place for, one of the wrong shape or one holding NaN is a
``ModelSpecError`` naming the keys and the files, never a partly random model, so ``trained`` means
every weight came from the checkpoint. Broken JSON names its file, line and column
(``read_json_object``). ``weights_sha256`` hashes exactly the transformer files read
(``weight_files``: diffusers' own names, never a stray backup); ``weights_files`` lists them.

Label layout: every DiT tclab runs has ``num_embeds_ada_norm = 1000`` (DiT's ImageNet layout), whose
label 1000 is the null label of classifier-free guidance (``NULL_CLASS``, hard-coded in diffusers'
``DiTPipeline`` too); a model may use fewer real classes. Another label count is refused at load
(``check_null_class``); ``widen_label_table`` converts a model with fewer than 1000.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from .paths import EMBEDDED_ALIASES, EMBEDDED_MODEL, base_dir, resolve_path
from .steps import NULL_CLASS  # 1000: DiTPipeline hard-codes it as the unconditional label

EMBEDDED_NAME = EMBEDDED_MODEL  # "shapes-dit"; the built-in model names live in tclab.paths (BUILTIN_MODELS)
EMBEDDED_DIR = Path(__file__).parent / "weights" / EMBEDDED_NAME
META_FILE = "tclab_model.json"
IDENTITY_MAX_NAMES = 32  # identity() lists at most this many class names


class ModelSpecError(ValueError):
    """The model spec names nothing loadable; the message says what was found and what to pass."""


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """Identity 'VAE' for pixel-space DiTs, so diffusers' ``DiTPipeline`` (which always decodes
    through ``vae.decode(latents / scaling_factor)``) runs on the embedded model unchanged."""

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0, latent_channels: int = 3):
        super().__init__()
        # diffusers finds a module's device and dtype from its first tensor; give it one.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor):  # pragma: no cover - symmetry with AutoencoderKL
        return x

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        return DecoderOutput(sample=z) if return_dict else (z,)


# ---- architecture presets (DiT paper, Table 1): name -> factory(resolution) -------------------

def _dit_preset(depth: int, hidden: int, heads: int, patch: int, resolution: int = 256) -> DiTTransformer2DModel:
    if resolution not in (256, 512):
        raise ModelSpecError(f"preset resolution must be 256 or 512 px, got {resolution}")
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4, out_channels=8,
        num_layers=depth, sample_size=resolution // 8, patch_size=patch, num_embeds_ada_norm=1000,
    )


PRESETS = {
    f"DiT-{size}/{p}": partial(_dit_preset, depth, hidden, heads, p)
    for size, (depth, hidden, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                         "XL": (28, 1152, 16)}.items()
    for p in (2, 4, 8)
}


def embedded_transformer_config() -> dict:
    """The embedded model's architecture: 6 blocks, width 192, 3 heads, pixel space 32x32x3, patch 2."""
    return dict(num_attention_heads=3, attention_head_dim=64, in_channels=3, out_channels=3, num_layers=6,
                sample_size=32, patch_size=2, num_embeds_ada_norm=NULL_CLASS)


def default_scheduler_config() -> dict:
    """DDIM over DiT's training noise schedule (linear betas 1e-4..0.02, 1000 steps)."""
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=0, prediction_type="epsilon")


#: Samplers by name: the class and what it changes in the model's own noise-schedule config.
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
}


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of kind ``name`` (``ddim``, ``dpm++``, ``euler``) over the model's noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    keep = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return cls.from_config({**keep, **extra})


@dataclass
class LoadedDiT:
    """A DiT ready to sample: transformer, decoder, scheduler config and who it is."""

    name: str
    transformer: DiTTransformer2DModel
    vae: torch.nn.Module
    scheduler_config: dict
    trained: bool
    source: str
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_null_class(getattr(getattr(self.transformer, "config", None), "num_embeds_ada_norm", None), self.source)
        if self.class_names is not None and len(self.class_names) > NULL_CLASS:
            raise ModelSpecError(f"{self.source}: {len(self.class_names)} class names, but labels 0..{NULL_CLASS - 1} "
                                 f"are all a DiT has (label {NULL_CLASS} is the null label of guidance); "
                                 f"give at most {NULL_CLASS} names")

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def latent_size(self) -> int:
        return self.transformer.config.sample_size

    @property
    def pixel_space(self) -> bool:
        return isinstance(self.vae, PixelSpaceVAE)

    @property
    def resolution(self) -> int:
        """Image side in pixels (latent size times the VAE's downsampling)."""
        if self.pixel_space:
            return self.latent_size
        return self.latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def token_grid(self) -> tuple[int, int]:
        g = self.latent_size // self.transformer.config.patch_size
        return g, g

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else NULL_CLASS

    @property
    def learned_sigma(self) -> bool:
        return self.transformer.config.out_channels == 2 * self.latent_channels

    def to(self, device: str | torch.device) -> "LoadedDiT":
        """Move the transformer and the decoder to ``device`` (in place); returns self."""
        self.transformer.to(device)
        self.vae.to(device)
        return self

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents the transformer denoises."""
        if self.pixel_space:
            return images.to(self.transformer.dtype)
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (not clamped), exactly as DiTPipeline decodes."""
        return self.vae.decode(1 / self.vae.config.scaling_factor * latents).sample  # DiTPipeline's arithmetic

    def pipeline(self, scheduler=None) -> DiTPipeline:
        """This model inside diffusers' own ``DiTPipeline`` (for peers built on diffusers)."""
        return DiTPipeline(transformer=self.transformer, vae=self.vae,
                           scheduler=scheduler or make_scheduler("ddim", self.scheduler_config))

    def identity(self) -> dict:
        """What a run's provenance records about the model. Class names are listed when there are a
        few (up to ``IDENTITY_MAX_NAMES``); an ImageNet ``id2label`` is summarised by its count, its
        first names and a hash, so it does not fill every report."""
        import hashlib

        n = sum(p.numel() for p in self.transformer.parameters())
        names = self.class_names
        out = {"name": self.name, "source": self.source, "trained": self.trained, "parameters": n,
               "token_grid": list(self.token_grid), "blocks": len(self.transformer.transformer_blocks),
               "resolution": self.resolution, "classes": len(names) if names else None,
               "class_names": names if names is None or len(names) <= IDENTITY_MAX_NAMES else [*names[:3], "..."],
               "weights_sha256": self.meta.get("weights_sha256"), "weights_files": self.meta.get("weights_files"),
               "vae_weights_sha256": self.meta.get("vae_weights_sha256")}
        if names:
            out["class_names_sha256"] = hashlib.sha256("\n".join(names).encode()).hexdigest()
        return out


def check_null_class(num_embeds_ada_norm: int | None, where: str, transformer_folder: Path | None = None) -> None:
    """Refuse a DiT whose null (unconditional) label is not ``NULL_CLASS``.

    A ``DiTTransformer2DModel`` with ``num_embeds_ada_norm = n`` has a label table of n + 1 rows whose
    last row, label n, is its null label. tclab's sampler, diffusers' ``DiTPipeline``, the Cache
    Predictor and the recorder all take label 1000 to be the null label (DiT's ImageNet layout), so
    with n < 1000 guidance would index past the table, and with n > 1000 it would silently use a real
    class as "unconditional". Such a model is refused once, here, rather than half-supported.
    """
    n = num_embeds_ada_norm
    if n is None or n == NULL_CLASS:
        return
    if n < NULL_CLASS:
        src = f"'{transformer_folder}'" if transformer_folder is not None else "ITS_TRANSFORMER_FOLDER"
        fix = (f"Widen its label table once (classes 0..{n - 1} and the null row keep their weights): "
               f"`tclab.models.widen_label_table(DiTTransformer2DModel.from_pretrained({src})).save_pretrained(NEW)` "
               f"and use NEW (with model_index.json's id2label naming your {n} classes) in its place")
    else:
        fix = f"tclab cannot use it as it is: label {NULL_CLASS} is one of its real classes"
    raise ModelSpecError(
        f"{where}: the transformer has num_embeds_ada_norm={n}, so its null (unconditional) label is {n}; "
        f"tclab, like diffusers' DiTPipeline, feeds label {NULL_CLASS} as the null label of classifier-free "
        f"guidance and needs num_embeds_ada_norm={NULL_CLASS} (DiT's layout; fewer real classes are fine). {fix}")


def widen_label_table(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Move the null label of a DiT with ``num_embeds_ada_norm = n < 1000`` to ``NULL_CLASS`` (in place).

    Every block's label table (n + 1, C) becomes (1001, C): rows 0..n-1 (the classes) stay, the null
    row n moves to row 1000, and rows n..999, which no label of the model names, get copies of the
    null row. The model's outputs for its labels 0..n-1 and for its null label are unchanged; pass
    only labels 0..n-1 (list their names in ``id2label`` so tclab refuses the others). Returns the
    transformer.
    """
    from diffusers.models.embeddings import LabelEmbedding

    n = transformer.config.num_embeds_ada_norm
    if n >= NULL_CLASS:
        raise ValueError(f"num_embeds_ada_norm is {n}; only a label table with fewer than {NULL_CLASS} classes "
                         "can be widened")
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            old = module.embedding_table.weight  # (n + 1, C): classes 0..n-1, then the null row
            if old.shape[0] != n + 1:
                raise ValueError(f"a label table has {old.shape[0]} rows, expected {n + 1} "
                                 f"(num_embeds_ada_norm={n} plus the null row)")
            new = torch.nn.Embedding(NULL_CLASS + 1, old.shape[1], device=old.device, dtype=old.dtype)
            with torch.no_grad():
                new.weight[:n] = old[:n]
                new.weight[n:] = old[n]  # the null row at n..1000
            new.weight.requires_grad_(old.requires_grad)
            module.embedding_table, module.num_classes = new, NULL_CLASS
    transformer.register_to_config(num_embeds_ada_norm=NULL_CLASS)
    return transformer


# ---- a loaded transformer's identity: its shape and its weights ---------------------------------------

def model_signature(transformer) -> dict:
    """What a predictor must match: block count, token grid, hidden width, channels, patch size."""
    c = transformer.config
    g = c.sample_size // c.patch_size
    return {"blocks": len(transformer.transformer_blocks), "grid": [g, g],
            "width": int(transformer.transformer_blocks[0].dim), "in_channels": int(c.in_channels),
            "patch_size": int(c.patch_size)}


def weights_fingerprint(transformer) -> str:
    """sha256 over the transformer's parameters (float32 bytes, in state-dict order): which weights, however
    they were loaded (``weights_sha`` hashes the files instead). The artefact store keys on it."""
    import hashlib

    h = hashlib.sha256()
    for name, p in transformer.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- reading a folder strictly: JSON files, weight files, complete state dicts ------------------------

# What diffusers' ``from_pretrained`` reads from a model folder, in its order of preference (no variant):
# a sharded safetensors index, one safetensors file, then the same for torch ``.bin`` files. Any other
# weight file in the folder (a backup, an ``.fp16`` variant, ``model.safetensors``) is never read.
WEIGHTS_SAFETENSORS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
_WEIGHT_NAMES = (f"{WEIGHTS_SAFETENSORS}.index.json", WEIGHTS_SAFETENSORS, f"{WEIGHTS_BIN}.index.json", WEIGHTS_BIN)
MAX_KEYS_SHOWN = 4  # an error lists this many keys of each kind, then how many more


def _json_kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "true/false", type(None): "null"}.get(
        type(value), "number")


def read_json_object(path: Path, what: str) -> dict:
    """``path`` parsed as a JSON object; anything else is a ``ModelSpecError`` naming the file (and the line
    and column of a syntax error). ``what`` says what the file is, for the message."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelSpecError(f"{path} ({what}) is not UTF-8 text (byte {e.start} is "
                             f"{e.object[e.start:e.start + 1]!r}); it should be a JSON file: restore it from the "
                             "checkpoint you copied") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                             "fix the file there, or restore it from the checkpoint you copied") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} ({what}) holds a JSON {_json_kind(data)}, but must hold a JSON object "
                             "({\"key\": value, ...}); restore it from the checkpoint you copied")
    return data


def weight_files(folder: Path) -> list[Path] | None:
    """The weight files ``from_pretrained`` reads from ``folder`` (all shards of a sharded checkpoint, in
    name order), or None when the folder has none of diffusers' weight names."""
    for name in _WEIGHT_NAMES:
        f = folder / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        weight_map = read_json_object(f, "the index of a sharded checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelSpecError(f"{f} has no \"weight_map\" (tensor name -> shard file); restore it from the "
                                 "checkpoint you copied")
        shards = sorted({folder / str(v) for v in weight_map.values()})
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise ModelSpecError(f"{f} lists {len(shards)} shards, but {len(absent)} of them "
                                 f"{'is' if len(absent) == 1 else 'are'} missing from {folder}: {_few(absent)}; "
                                 "copy every shard of the checkpoint")
        return shards
    return None


def _files_sha(files: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha(folder: Path) -> str | None:
    """sha256 over exactly the weight files ``load_dit`` reads from ``folder`` (``weight_files``), in name
    order: a model's weights identity. None if the folder has no weights."""
    files = weight_files(Path(folder))
    return _files_sha(files) if files else None


def _count(items, noun: str, verb: tuple[str, str] = ("is", "are")) -> str:
    """'1 weight is' / '3 weights are'."""
    one = len(items) == 1
    return f"{len(items)} {noun}{'' if one else 's'} {verb[0] if one else verb[1]}"


def _few(keys, n: int = MAX_KEYS_SHOWN) -> str:
    """The first ``n`` of ``keys`` (in natural order: block 2 before block 10) and how many more."""
    import re

    ordered = sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(k))])
    shown = ", ".join(str(k) for k in ordered[:n])
    return shown + (f", ... ({len(ordered) - n} more)" if len(ordered) > n else "")


def _block_count_hint(cfg: dict, keys) -> str:
    """When the config and checkpoint disagree on the number of DiT blocks, say so in those words."""
    import re

    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    n = cfg.get("num_layers")
    if not blocks or not isinstance(n, int) or len(blocks) == n:
        return ""
    return (f" config.json says num_layers={n}, but the checkpoint holds {len(blocks)} blocks "
            f"(transformer_blocks.{min(blocks)}..{max(blocks)}): set num_layers to {len(blocks)}, or use the "
            "checkpoint saved with this config.")


def _misspelt_keys_hint(cls, cfg: dict) -> str:
    """Config keys ``cls`` does not take that are close to one it does (diffusers ignores them silently,
    so the model gets that argument's default): the likely cause of a config/checkpoint mismatch."""
    import difflib
    import inspect

    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    close = {k: m[0] for k in cls.extract_init_dict(cfg)[1]
             if not k.startswith("_") and (m := difflib.get_close_matches(k, accepted, n=1, cutoff=0.8))}
    if not close:
        return ""
    said = ", ".join(f"{k!r} (did you mean {m!r}?)" for k, m in sorted(close.items()))
    return f" config.json has keys {cls.__name__} does not take, so it used their defaults: {said}."


def _check_weight_file(f: Path) -> None:
    """Refuse a weight file that cannot be read, before diffusers builds anything (header only, cheap)."""
    with f.open("rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ModelSpecError(f"{f} is a git-lfs pointer, not the weights: run `git lfs pull` in the clone "
                             "(or download the file itself) and try again")
    if f.suffix != ".safetensors":
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as fh:
            fh.keys()
    except SafetensorError as e:
        raise ModelSpecError(f"{f} is not a readable safetensors file ({e}); it is probably truncated or "
                             "corrupt: copy it again from the checkpoint") from None


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


class _QuietDiffusers:
    """Silence diffusers' logger while it loads: its warnings about missing or unused weights become our
    error (below), and a half-loaded model is never returned. Also torch's note on the pickle protocol of
    a refused ``.bin``, which the error replaces."""

    def __enter__(self):
        import warnings

        from diffusers.utils import logging as dlog

        self._old = dlog.get_verbosity()
        dlog.set_verbosity_error()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)

    def __exit__(self, *exc):
        from diffusers.utils import logging as dlog

        self._warnings.__exit__(*exc)
        dlog.set_verbosity(self._old)


def _load_strict(cls, folder: Path, dtype: torch.dtype, what: str) -> tuple[torch.nn.Module, list[Path]]:
    """``cls.from_pretrained(folder)`` where every weight of the model comes from the checkpoint.

    diffusers leaves weights the checkpoint lacks at random (or uninitialised) values and drops the ones
    the config has no place for, with a log warning: a config that disagrees with its checkpoint would
    load as a half-random model. Here any missing, unexpected, mis-shaped or non-finite weight is a
    ``ModelSpecError`` naming the keys and the files. Returns the model and the weight files read.
    """
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelSpecError(f"{folder} has no config.json; expected the diffusers {cls.__name__} folder ({what}) "
                             "as `save_pretrained` writes it")
    cfg = read_json_object(cfg_path, f"the {cls.__name__} config")
    files = weight_files(folder)
    if files is None:
        found = sorted(p.name for p in folder.iterdir()
                       if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
        have = f"it has {_few(found)}, which diffusers does not read" if found else "it has no weight files at all"
        raise ModelSpecError(f"{folder} ({what}) has a config but no weights that diffusers reads "
                             f"({WEIGHTS_SAFETENSORS}, {WEIGHTS_BIN} or a sharded index of either): {have}. "
                             f"Rename the weights file to {WEIGHTS_SAFETENSORS}, or save the model with "
                             "`save_pretrained`")
    for f in files:
        _check_weight_file(f)
    names = ", ".join(str(f) for f in files) if len(files) <= 2 else f"{files[0]} (and {len(files) - 1} more shards)"
    try:
        with _QuietDiffusers():
            model, info = cls.from_pretrained(
                folder, torch_dtype=dtype, local_files_only=True,
                use_safetensors=files[0].suffix == ".safetensors",  # exactly the files hashed for provenance
                low_cpu_mem_usage=False,  # no `accelerate` needed, no warning
                ignore_mismatched_sizes=True, output_loading_info=True)  # mis-shaped: listed, refused below
    except OSError as e:  # an unreadable .bin (e.g. pickled code, refused by weights_only=True)
        inner = _innermost(e)
        cause = f"{type(inner).__name__}: {(str(inner).strip() or '?').splitlines()[0]}"
        raise ModelSpecError(f"{names} could not be read as weights: torch.load(weights_only=True) refused it "
                             f"({cause}), so it is not a plain state dict of tensors (pickled code is never run); "
                             "use a safetensors file, or a state dict saved by `save_pretrained`") from None
    except (TypeError, ValueError) as e:  # a config value diffusers cannot build the model from
        raise ModelSpecError(f"{cfg_path}: diffusers cannot build a {cls.__name__} from it ({e}); fix the wrong "
                             "value (e.g. a number written as a string), or use the config.json saved with these "
                             "weights") from None
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    mismatched = info["mismatched_keys"]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{_count(missing, 'weight')} missing from the checkpoint that the config needs "
                         f"({_few(missing)})")
        if unexpected:
            parts.append(f"{_count(unexpected, 'checkpoint weight')} not in the model the config describes "
                         f"({_few(unexpected)})")
        if mismatched:
            shapes = [f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in mismatched]
            parts.append(f"{_count(mismatched, 'weight', ('has', 'have'))} the wrong shape ({_few(shapes)})")
        checkpoint_keys = [k for k in model.state_dict() if k not in set(missing)] + list(unexpected)
        hint = _block_count_hint(cfg, checkpoint_keys) if cls is DiTTransformer2DModel else ""
        typo = _misspelt_keys_hint(cls, cfg)
        raise ModelSpecError(
            f"{names} does not match {cfg_path} ({cls.__name__}): {'; '.join(parts)}.{hint}{typo} tclab loads only "
            "a complete checkpoint, never a partly random model: use the config.json saved with these weights "
            "(`save_pretrained` writes both) or correct the config's values")
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelSpecError(f"{names}: {_count(bad, 'weight', ('holds', 'hold'))} NaN or infinity ({_few(bad)}); "
                             "the checkpoint is broken (a diverged training run, or an overflow when it was cast "
                             "to float16): use an earlier or float32 checkpoint")
    return model, files


def _is_dit_config(cfg: dict) -> bool:
    return cfg.get("_class_name") == "DiTTransformer2DModel" or (
        "patch_size" in cfg and "num_embeds_ada_norm" in cfg and cfg.get("norm_type", "ada_norm_zero") == "ada_norm_zero"
    )


def _load_transformer(folder: Path, dtype: torch.dtype) -> tuple[DiTTransformer2DModel, list[Path]]:
    """The DiT transformer of ``folder`` (strictly: every weight from the checkpoint) and the files read."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelSpecError(f"{folder} has no config.json; expected a diffusers DiT transformer folder")
    cfg = read_json_object(cfg_path, "the transformer config")
    if not _is_dit_config(cfg):
        raise ModelSpecError(f"{folder} holds a {cfg.get('_class_name', 'model of unknown class')}, not a DiT "
                             "(DiTTransformer2DModel with patch_size and ada_norm_zero); tclab studies DiTs only")
    check_null_class(cfg.get("num_embeds_ada_norm"), str(folder), folder)
    # .bin files are read by diffusers with weights_only=True: no pickled code runs.
    return _load_strict(DiTTransformer2DModel, folder, dtype, "the DiT transformer")


def _class_names_of_index(index_file: Path) -> list[str] | None:
    """Class names in label order from model_index.json's ``id2label`` (string keys "0".."n-1", as
    facebook/DiT-XL-2-256 has it); None when there is none."""
    id2label = read_json_object(index_file, "the pipeline's index").get("id2label")
    if id2label is None:
        return None
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()):
        raise ModelSpecError(f"{index_file}: id2label must map labels to names, e.g. {{\"0\": \"tench, Tinca tinca\"}}")
    try:
        labels = {int(k): v for k, v in id2label.items()}
    except ValueError:
        bad = [k for k in id2label if not str(k).strip().lstrip("-").isdigit()]
        raise ModelSpecError(f"{index_file}: id2label keys must be class labels (integers), got {bad[:5]}") from None
    if sorted(labels) != list(range(len(labels))):
        missing = sorted(set(range(len(labels))) - set(labels))[:5]
        raise ModelSpecError(f"{index_file}: id2label must name labels 0..{len(labels) - 1} without gaps, but "
                             f"it has keys {min(labels)}..{max(labels)} and lacks {missing}; class names are "
                             "matched to labels by position, so name every label or renumber the classes")
    return [labels[k] for k in range(len(labels))] or None


def _class_names_of_meta(meta_file: Path, meta: dict) -> list[str] | None:
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ModelSpecError(f"{meta_file}: class_names must be a list of names in label order, e.g. "
                             f"[\"cross\", \"disc\"], not {names!r:.80}; fix it or delete the key")
    return names


def _load_folder(path: Path, dtype: torch.dtype, name: str | None = None) -> LoadedDiT:
    """A DiT from a local folder (a DiTPipeline layout or a transformer-only folder), loaded strictly: every
    weight comes from its checkpoint, and ``weights_sha256`` hashes exactly the transformer files read."""
    meta = read_json_object(path / META_FILE, "tclab's model record") if (path / META_FILE).exists() else {}
    vae_files: list[Path] = []
    if (path / "model_index.json").exists() or (path / "transformer").is_dir():
        if (path / "model_index.json").exists():
            read_json_object(path / "model_index.json", "the pipeline's index")
        tdir = path / "transformer"
        if not tdir.is_dir():
            raise ModelSpecError(f"{path} has model_index.json but no transformer/ folder; is it a DiT pipeline?")
        transformer, files = _load_transformer(tdir, dtype)
        if (path / "vae").is_dir():
            from diffusers import AutoencoderKL

            vae, vae_files = _load_strict(AutoencoderKL, path / "vae", dtype, "the pipeline's VAE")
            latent = vae.config.latent_channels
            if latent != transformer.config.in_channels:
                raise ModelSpecError(f"{path}: the VAE makes {latent}-channel latents (vae/config.json "
                                     f"latent_channels), but the transformer takes {transformer.config.in_channels} "
                                     "(transformer/config.json in_channels); they are not one pipeline: use the vae/ "
                                     "the transformer was trained with")
        elif transformer.config.in_channels != 3:
            raise ModelSpecError(f"{path} has no vae/ folder, but its transformer works on "
                                 f"{transformer.config.in_channels}-channel latents, which only a VAE turns into "
                                 "images; restore vae/ (the AutoencoderKL of the checkpoint you copied)")
        else:
            vae = PixelSpaceVAE(latent_channels=transformer.config.in_channels)
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = (read_json_object(sched_file, "the scheduler config") if sched_file.exists()
                 else default_scheduler_config())
    else:
        transformer, files = _load_transformer(path, dtype)
        if transformer.config.in_channels != 3:
            raise ModelSpecError(f"{path} is a transformer-only folder of a latent DiT "
                                 f"({transformer.config.in_channels} channels, not 3 of pixel space) with no VAE; "
                                 "pass the full DiTPipeline folder (with vae/) so samples can be decoded")
        vae = PixelSpaceVAE(latent_channels=transformer.config.in_channels)
        sched = default_scheduler_config()
    class_names = _class_names_of_meta(path / META_FILE, meta)
    if class_names is None and (path / "model_index.json").exists():
        class_names = _class_names_of_index(path / "model_index.json")
    transformer.eval().requires_grad_(False)
    provenance = {"weights_sha256": _files_sha(files),  # the artefact store's key: the transformer's weights
                  "weights_files": [f.relative_to(path).as_posix() for f in files + vae_files],
                  "vae_weights_sha256": _files_sha(vae_files) if vae_files else None}
    # trained=True: _load_strict refused any weight that did not come from the checkpoint.
    return LoadedDiT(name=name or path.name, transformer=transformer, vae=vae.eval(), scheduler_config=sched,
                     trained=True, source=str(path), class_names=class_names, meta={**meta, **provenance})


def load_dit(spec: str = EMBEDDED_NAME, resolution: int = 256, dtype: torch.dtype = torch.float32,
             seed: int = 0) -> LoadedDiT:
    """Load a DiT by spec (see the module docstring). ``resolution`` and ``seed`` apply to presets."""
    if spec in (EMBEDDED_NAME, *EMBEDDED_ALIASES):
        if not (EMBEDDED_DIR / "transformer").is_dir():
            raise ModelSpecError(f"the embedded model is missing from {EMBEDDED_DIR}; reinstall tclab or "
                                 "rebuild it with `tclab train-dit`")
        return _load_folder(EMBEDDED_DIR, dtype, name=EMBEDDED_NAME)
    if spec in PRESETS:
        with torch.random.fork_rng(devices=[]):   # seeded weights; the caller's global RNG is left alone
            torch.manual_seed(seed)
            transformer = PRESETS[spec](resolution=resolution)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
        transformer.eval().requires_grad_(False)
        return LoadedDiT(name=f"{spec}@{resolution}", transformer=transformer,
                         vae=PixelSpaceVAE(latent_channels=4), scheduler_config=default_scheduler_config(),
                         trained=False, source=f"preset {spec} (random weights, seed {seed}; UNTRAINED)")
    path = resolve_path(spec, what="model folder", must_exist=False)  # relative: the user's folder (tclab.paths)
    if path.is_dir():
        return _load_folder(path, dtype)
    presets = ", ".join(PRESETS)
    where = f"; looked for a folder at {path}" + ("" if Path(spec).expanduser().is_absolute() else
                                                  f" (relative paths are read from {base_dir()[1]})")
    raise ModelSpecError(f"model spec {spec!r} is neither {EMBEDDED_NAME!r}, a preset ({presets}), "
                         f"nor an existing local folder{where}")
