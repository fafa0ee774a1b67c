"""The learned Cache Predictor: which tokens to compute (TokenCache, arXiv 2409.18523).

Spec: ``shared/docs/tokencache.md`` section 3, "Which tokens (Cache Predictor)". A predictor gives
every (row ``b``, block ``l``, token ``i``) a score ``w = sigmoid(theta)`` in [0, 1], **high = compute**;
the engine (``tclab.cache.hooks``) turns scores into kept sets under the budget ``rho``. Two kinds,
both :class:`~tclab.cache.scorers.TokenScorer` s registered under the spec's option names:

- ``learned-static`` (:class:`StaticCachePredictor`, TokenCache v1 style, the spec's default): the
  score depends on (step, block, token) only. tclab's parameterisation: a table ``theta[s, l, i]`` made
  smooth over the trajectory,

      theta[s, l, i] = b[l, i] + sum_k a_k(tau_s) W[k, l, i],    tau_s = t(s) / 1000,

  where ``a(tau)`` is a 2-layer MLP of Fourier features of the *normalised timestep* of step ``s`` and
  ``W``, ``b`` are per (block, token). Reading the step through its timestep value (not its index) lets
  one predictor serve SDEdit runs (which start part-way down) and other step counts: there the scores
  are *interpolated* over ``tau`` and a warning says so once (the gap between adjacent steps differs,
  so the staleness it learned to predict differs: retrain with ``--num-steps`` for the best ranking).
  Zero run-time cost: the ``(L, N)`` score table of a timestep is computed once and reused
  (``precompute``).
- ``learned-dynamic`` (:class:`DynamicCachePredictor`, v2 style): one small adaLN-Zero DiT-like block
  (width 64, 4 heads) over the transformer's own patch-embedded input tokens (``pos_embed``, frozen),
  conditioned on the normalised timestep and on whether the row is a CFG-unconditional row (null label),
  with a per-token head to ``L`` scores plus a static ``b[l, i]`` and a per-block time term. It runs inside
  the transformer call, so its cost is in every FLOP and time figure (about 1.8 % of the embedded
  model's forward).

Files: safetensors with a JSON header (``"tclab_predictor"``): kind, architecture, the model it was
trained on (blocks, token grid, width, a fingerprint of its weights) and how it was trained
(``num_steps``, scheduler, guidance, ``lambda``, final loss). :func:`load_predictor` refuses a file
whose block count, token grid or width does not match the transformer, or that was trained on other
weights (naming both). The scorers find the predictor of the model they are applied to: the shipped
files for the embedded weights, else the artefact store (``tclab.artefacts``). Train with :func:`tclab.cache.train.train_predictor` or ``tclab train-predictor``.

Use::

    TokenCacheConfig(scorer="learned-static")                          # this model's: shipped or in the store
    TokenCacheConfig(scorer="learned-dynamic", scorer_options={"path": "my-predictor.safetensors"})
    TokenCacheConfig(scorer=load_predictor(path, transformer))         # checked against the model now

Importing this module registers both names with :func:`tclab.cache.scorers.register_scorer`; the
engine imports it lazily the first time a config names one of them (``registry.BUILTIN_PROVIDERS``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Below this module: the artefact store (a predictor file's kinds, header and shipped path; where a model's
# predictor is) and tclab.models (a transformer's shape and weights fingerprint). Names once defined here
# (KINDS, read_predictor_meta, model_signature, weights_fingerprint, ...) stay importable from here.
from ..artefacts import (FORMAT, FORMAT_VERSION, KINDS, META_KEY, WEIGHTS_DIR,  # noqa: F401
                         check_predictor_kind, default_predictor_path, find_predictor, fingerprint, model_key,
                         predictor_path, read_predictor_meta)
from ..models import NULL_CLASS, model_signature, weights_fingerprint  # noqa: F401
from .scorers import ScoreContext, TokenScorer, register_scorer

T_SCALE = 1000.0  # timesteps are divided by this (DiT's 1000 training timesteps) to give tau in [0, 1]
N_FREQ = 6  # Fourier frequencies of tau


class PredictorMismatchError(ValueError):
    """A predictor file does not fit the transformer it is used with (blocks, token grid or width)."""


def time_features(timestep: torch.Tensor, t_scale: float = T_SCALE) -> torch.Tensor:
    """Fourier features of the normalised timestep ``tau = t / t_scale``: (B,) -> (B, 1 + 2 * N_FREQ)."""
    tau = timestep.reshape(-1).float() / t_scale  # (B,)
    k = torch.arange(1, N_FREQ + 1, device=tau.device, dtype=tau.dtype) * math.pi  # (K,)
    ang = tau[:, None] * k  # (B, K)
    return torch.cat([tau[:, None], ang.sin(), ang.cos()], dim=1)  # (B, 1 + 2K)


class CachePredictor(nn.Module, TokenScorer):
    """Base of the learned predictors: an ``nn.Module`` giving logits ``theta`` (B, L, N), and a
    ``TokenScorer`` giving ``sigmoid(theta)`` to the engine. ``meta`` holds what the file records."""

    name = "learned"
    needs = frozenset()  # reads nothing from the engine's cache

    def __init__(self, num_blocks: int, grid: tuple[int, int] | list[int]):
        nn.Module.__init__(self)
        self.num_blocks, self.grid = int(num_blocks), (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.meta: dict = {}

    # ---- what subclasses define -------------------------------------------------------------------

    def arch(self) -> dict:  # pragma: no cover - interface
        """Constructor keyword arguments (recorded in the file)."""
        raise NotImplementedError

    def logits_for(self, transformer, hidden_states: torch.Tensor, timestep: torch.Tensor,
                   class_labels: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - interface
        """theta (B, L, N) for the transformer input ``hidden_states`` (B, C, H, W) at ``timestep`` (B,)."""
        raise NotImplementedError

    # ---- TokenScorer ----------------------------------------------------------------------------------

    def reset_state(self) -> None:
        self._warned_steps = False

    def check_fits(self, transformer) -> None:
        """Raise :class:`PredictorMismatchError` unless the transformer's blocks, grid and width match."""
        sig, want = model_signature(transformer), self.meta.get("model", {})
        problems = []
        if sig["blocks"] != self.num_blocks:
            problems.append(f"{sig['blocks']} blocks, predictor has {self.num_blocks}")
        if tuple(sig["grid"]) != self.grid:
            problems.append(f"token grid {tuple(sig['grid'])}, predictor has {self.grid}")
        if isinstance(self, DynamicCachePredictor) and self.model_width != sig["width"]:
            problems.append(f"hidden width {sig['width']}, predictor reads width {self.model_width}")
        if problems:
            trained_on = want.get("name", "another model")
            raise PredictorMismatchError(
                f"{self.name} predictor (trained on {trained_on}) does not fit this transformer: "
                f"{'; '.join(problems)}. Train one for this model with `tclab train-predictor --model <spec> "
                f"--kind {self.name}` (or tclab.cache.train.train_predictor)")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if getattr(self, "_fits_id", None) != id(ctx.transformer):  # once per transformer (an id: a module
            self.check_fits(ctx.transformer)                       # attribute would become a submodule)
            self._fits_id = id(ctx.transformer)
        trained = self.meta.get("train", {}).get("num_steps")
        if trained and ctx.step.num_steps and ctx.step.num_steps != trained and not getattr(self, "_warned_steps", 0):
            self._warned_steps = True
            warnings.warn(f"{self.name} predictor was trained on {trained}-step trajectories; this run has "
                          f"{ctx.step.num_steps} steps (or is an SDEdit run): scores are read at this run's "
                          "timesteps, interpolated over t/1000. The gap between steps differs from training, so "
                          "the ranking may be less good; retrain with `tclab train-predictor --num-steps "
                          f"{ctx.step.num_steps}` for the best results", stacklevel=2)
        if next(self.parameters()).device != ctx.device:
            self.to(ctx.device)
        with torch.no_grad():
            return self._scores(ctx)  # (B, L, N)

    def _scores(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.sigmoid(self.logits_for(ctx.transformer, ctx.hidden_states, ctx.timestep, ctx.class_labels))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, blocks={self.num_blocks}, grid={self.grid}, {self.arch()})"

    # ---- files ------------------------------------------------------------------------------------------

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        """Write safetensors + JSON metadata (``meta`` is merged into ``self.meta``); atomic."""
        from safetensors.torch import save_file

        if meta:
            self.meta = {**self.meta, **meta}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.name, "arch": self.arch(),
                  "num_blocks": self.num_blocks, "grid": list(self.grid),
                  "method": "TokenCache Cache Predictor (arXiv 2409.18523), tclab spec section 3", **self.meta}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header)})
        tmp.replace(path)
        return path


class StaticCachePredictor(CachePredictor):
    """``learned-static`` (TokenCache v1 style): ``theta[s, l, i] = b[l, i] + sum_k a_k(tau_s) W[k, l, i]``.

    ``a(tau)`` is a 2-layer SiLU MLP (``hidden`` units) of Fourier features of ``tau = t / 1000``; the
    output layer (``W`` and ``b``, one weight vector per (block, token)) starts at zero, so every score
    starts at 0.5. The scores of a timestep are computed once per run and reused (a precomputed mask
    table: no run-time cost). ``hidden`` is the rank of the table over steps: larger fits sharper changes
    along the trajectory, smaller interpolates more smoothly.
    """

    name = "learned-static"
    # scores depend only on the step's timestep (and block, token): with TokenCacheConfig(static_shapes=True)
    # the engine scores every cached step of a run at its first one and precomputes their plans
    # (tclab.cache.static); hidden_states, labels and the engine's cache are never read
    static_per_step = True

    def __init__(self, num_blocks: int, grid, hidden: int = 32):
        super().__init__(num_blocks, grid)
        self.hidden = int(hidden)
        nf = 1 + 2 * N_FREQ
        self.time_mlp = nn.Sequential(nn.Linear(nf, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.table = nn.Linear(hidden, self.num_blocks * self.num_tokens)  # W (L*N, hidden), b (L*N,)
        nn.init.zeros_(self.table.weight)
        nn.init.zeros_(self.table.bias)
        self._cache: dict[float, torch.Tensor] = {}

    def arch(self) -> dict:
        return {"hidden": self.hidden}

    def logits_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """theta for timesteps (B,) -> (B, L, N); depends on nothing else."""
        a = self.time_mlp(time_features(timestep))  # (B, hidden)
        return self.table(a).view(-1, self.num_blocks, self.num_tokens)  # (B, L, N)

    def logits_for(self, transformer, hidden_states, timestep, class_labels):
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        return self.logits_at(t.expand(hidden_states.shape[0]) if t.numel() == 1 else t)

    def precompute(self, timesteps) -> torch.Tensor:
        """Score table (S, L, N) for a run's timesteps (e.g. ``scheduler.timesteps``), cached for ``score``."""
        ts = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]  # one host sync
        missing = [t for t in ts if t not in self._cache]
        if missing:
            with torch.no_grad():
                dev = next(self.parameters()).device
                w = torch.sigmoid(self.logits_at(torch.tensor(missing, device=dev)))  # (S', L, N)
            self._cache.update(zip(missing, w))
        return torch.stack([self._cache[t] for t in ts])

    def reset_state(self) -> None:
        super().reset_state()
        self._cache = {}  # weights may have changed between runs (training): recompute the tables

    def _scores(self, ctx: ScoreContext) -> torch.Tensor:
        B = ctx.shape[0]
        t = torch.as_tensor(ctx.timestep).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        return self.precompute(t).to(ctx.device)  # (B, L, N) from the cached per-timestep tables


class DynamicCachePredictor(CachePredictor):
    """``learned-dynamic`` (TokenCache v2 style): one small DiT-like block on the current tokens.

    Input: the transformer's patch-embedded input tokens ``pos_embed(x)`` (B, N, C_model) (DiT's own
    frozen patch embedding with its positional embedding), normalised and projected to ``width``.
    Conditioning ``c``: an MLP of the Fourier features of ``tau = t / 1000`` plus an embedding of the CFG
    half (conditional row, or unconditional row with the null label 1000: the two halves share their
    tokens but not their updates). One adaLN-Zero block (self-attention with ``heads`` heads, MLP 2x),
    then a modulated LayerNorm and a linear head to one logit per block:

        theta[b, l, i] = head(h)[b, i, l] + b[l, i] + time_head(c)[b, l]

    The head, ``b`` and ``time_head`` start at zero (all scores 0.5), the block's adaLN at zero (the block
    starts as the identity), as in DiT. Wider = more capacity and more run-time cost (counted).
    """

    name = "learned-dynamic"

    def __init__(self, num_blocks: int, grid, model_width: int, width: int = 64, heads: int = 4):
        super().__init__(num_blocks, grid)
        if width % heads:
            raise ValueError(f"learned-dynamic: width {width} must be divisible by heads {heads}")
        self.model_width, self.width, self.heads = int(model_width), int(width), int(heads)
        d, nf = self.width, 1 + 2 * N_FREQ
        self.inp = nn.Sequential(nn.LayerNorm(self.model_width, elementwise_affine=False), nn.Linear(self.model_width, d))
        self.time_mlp = nn.Sequential(nn.Linear(nf, d), nn.SiLU(), nn.Linear(d, d))
        self.half_emb = nn.Embedding(2, d)  # 0 = conditional row, 1 = unconditional (null label) row
        self.ada = nn.Linear(d, 6 * d)  # shift/scale/gate for attention and MLP (adaLN-Zero)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))
        self.ada_out = nn.Linear(d, 2 * d)  # shift/scale before the head
        self.head = nn.Linear(d, self.num_blocks)
        self.time_head = nn.Linear(d, self.num_blocks)
        self.bias = nn.Parameter(torch.zeros(self.num_blocks, self.num_tokens))  # b[l, i]
        for m in (self.ada, self.ada_out, self.head, self.time_head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def arch(self) -> dict:
        return {"model_width": self.model_width, "width": self.width, "heads": self.heads}

    def logits_from_tokens(self, tokens: torch.Tensor, timestep: torch.Tensor,
                           class_labels: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, N, C_model), timestep (B,), labels (B,) or None -> theta (B, L, N)."""
        B, N, _ = tokens.shape
        d, H = self.width, self.heads
        t = torch.as_tensor(timestep, device=tokens.device).reshape(-1).expand(B)
        uncond = torch.zeros(B, dtype=torch.long, device=tokens.device) if class_labels is None else \
            (torch.as_tensor(class_labels, device=tokens.device).reshape(-1).expand(B) == NULL_CLASS).long()
        c = self.time_mlp(time_features(t)) + self.half_emb(uncond)  # (B, d)
        sa, ca, ga, sm, cm, gm = self.ada(F.silu(c)).chunk(6, dim=1)  # (B, d) each
        h = self.inp(tokens.float())  # (B, N, d)
        a = F.layer_norm(h, (d,)) * (1 + ca[:, None]) + sa[:, None]  # (B, N, d)
        q, k, v = self.qkv(a).view(B, N, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d/H)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, d)  # (B, N, d)
        h = h + ga[:, None] * self.proj(a)
        m = F.layer_norm(h, (d,)) * (1 + cm[:, None]) + sm[:, None]
        h = h + gm[:, None] * self.mlp(m)  # (B, N, d)
        so, co = self.ada_out(F.silu(c)).chunk(2, dim=1)
        h = F.layer_norm(h, (d,)) * (1 + co[:, None]) + so[:, None]  # (B, N, d)
        theta = self.head(h).transpose(1, 2)  # (B, L, N)
        return theta + self.bias[None] + self.time_head(c)[:, :, None]  # (B, L, N)

    def logits_for(self, transformer, hidden_states, timestep, class_labels):
        tokens = transformer.pos_embed(hidden_states)  # (B, N, C_model): the DiT's own (frozen) embedding
        return self.logits_from_tokens(tokens, timestep, class_labels)


def make_predictor(kind: str, transformer, **arch) -> CachePredictor:
    """A fresh (untrained: all scores 0.5) predictor of ``kind`` sized for ``transformer``."""
    check_predictor_kind(kind)
    sig = model_signature(transformer)
    if kind == "learned-static":
        p = StaticCachePredictor(sig["blocks"], sig["grid"], **arch)
    else:
        p = DynamicCachePredictor(sig["blocks"], sig["grid"], model_width=sig["width"], **arch)
    p.meta = {"model": sig}
    return p.to(transformer.device)


def load_predictor(path: str | Path, transformer=None, kind: str | None = None,
                   allow_other_weights: bool = False) -> CachePredictor:
    """Load a predictor file. With ``transformer``: refuse it unless blocks, token grid and width match,
    and unless it was trained on *these* weights (:class:`PredictorMismatchError` naming both identities;
    ``allow_other_weights=True`` runs it anyway with a warning, e.g. to try a predictor on a fine-tuned
    copy), and move it to the transformer's device. ``kind``: refuse a file of the other kind."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no predictor file at {path}; train one with `tclab train-predictor --model <spec> "
                                f"--kind {kind or 'learned-static'}` (it writes it into the artefact store, "
                                "`tclab artefacts` lists them) or pass scorer_options={'path': ...}")
    meta = read_predictor_meta(path)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{path} holds a {meta['kind']} predictor, not {kind}; pass the matching file")
    check_predictor_kind(meta["kind"])
    cls = StaticCachePredictor if meta["kind"] == "learned-static" else DynamicCachePredictor
    p = cls(meta["num_blocks"], meta["grid"], **meta["arch"])
    p.load_state_dict(load_file(str(path)), strict=True)
    p.meta = {k: v for k, v in meta.items() if k in ("model", "train")}
    p.eval().requires_grad_(False)
    if transformer is not None:
        p.check_fits(transformer)
        want, have = p.meta.get("model", {}).get("weights_fingerprint"), fingerprint(transformer)
        if want and want != have:
            trained_on = p.meta["model"].get("name", "?")
            msg = (f"{path} is the {p.name} predictor of model {trained_on!r} (weights {want[:16]}), not of this "
                   f"model (weights {have[:16]}): its token ranking belongs to other weights. Train one for this "
                   f"model with `tclab train-predictor --model <spec> --kind {p.name}` (notebooks: train_missing=True)")
            if not allow_other_weights:
                raise PredictorMismatchError(msg + ", or pass allow_other_weights=True to run it anyway")
            warnings.warn(msg + "; running it anyway (allow_other_weights=True)", stacklevel=2)
        p.to(transformer.device)
    return p


class PredictorNotFoundError(FileNotFoundError):
    """No predictor of this kind exists for this model's weights (neither shipped nor in the store)."""


def find_predictor_for(transformer, kind: str) -> Path:
    """This model's ``kind`` predictor file (shipped, or in the artefact store), or
    :class:`PredictorNotFoundError` saying where it was looked for and how to make one."""
    found = find_predictor(transformer, kind)
    if found is None:
        raise PredictorNotFoundError(
            f"no {kind} predictor for this model (weights {model_key(transformer)}): looked at "
            f"{predictor_path(transformer, kind)} and the shipped files. Train one with `tclab train-predictor "
            f"--model <spec> --kind {kind}` (notebooks: train_missing=True does it), or pass "
            "scorer_options={'path': ...}")
    return found


# ---- registration with the engine (tclab.cache.scorers imports this module lazily) ---------------------

def _factory(kind: str):
    def factory(config, path: str | None = None, allow_other_weights: bool = False, *, transformer=None):
        """``scorer_options``: ``path`` of a predictor file (default: the predictor of the model it is applied
        to, shipped or in the artefact store); ``allow_other_weights`` (see :func:`load_predictor`)."""
        if path is None:
            path = find_predictor_for(transformer, kind) if transformer is not None else default_predictor_path(kind)
        return load_predictor(path, transformer, kind=kind, allow_other_weights=allow_other_weights)

    return factory


register_scorer("learned-static", _factory("learned-static"))
register_scorer("learned-dynamic", _factory("learned-dynamic"))
