"""DBCache (Dual Block Cache), run by cache-dit (``cache_dit.enable_cache``; an optional package)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass

import torch

from .base import PeerHandle, PeerUnavailableError, check_positive_int, register_peer, tensor_bytes

CACHE_DIT_TESTED_VERSION = "1.5.3"


@dataclass
class DBCachePeerConfig:
    """DBCache (Dual Block Cache) from cache-dit, applied with ``cache_dit.enable_cache``.

    Source: https://github.com/vipshop/cache-dit (docs/DBCache.md); tested with cache-dit 1.5.3.
    Install: ``pip install --no-deps cache-dit==1.5.3`` (its ``transformers`` requirement is only
    needed for text encoders and metrics; the caching path imports without it).

    The first ``Fn_compute_blocks`` blocks always run; the relative L1 change of their residual
    against the last computed step decides, as in FBCache, whether the middle blocks run or are
    replaced by their cached residual; the last ``Bn_compute_blocks`` blocks always run and
    correct the approximated state. ``F1B0`` is FBCache; cache-dit's own default is ``F8B0``, for
    large models (it needs more blocks than most small DiTs have).

    Args:
        Fn_compute_blocks: first blocks always computed (the probe). **Quality: raise it**
            (a steadier change estimate); speed: lower it.
        Bn_compute_blocks: last blocks always computed (the corrector). **Quality: raise it**.
        residual_diff_threshold: relative change below which the middle blocks are skipped.
            **Speed: raise it**; quality: lower it. cache-dit's default 0.08.
        max_warmup_steps: steps at the start that always compute. **Quality: raise it**.
            cache-dit's default 8 (for 28-50 step runs).
        max_cached_steps: cap on cached steps per run (-1 = no cap). **Quality: set a cap**.
        max_continuous_cached_steps: cap on consecutive cached steps (-1 = no cap).
            **Quality: set it** (e.g. 2-3) to force periodic refreshes.

    Stats: ``full_steps`` / ``cached_steps`` are the calls that ran all blocks / only the ``Fn + Bn``
    probe and corrector blocks (cache-dit's record of cached steps), so ``compute_fraction =
    (computed * L + cached * (Fn + Bn)) / (calls * L)`` in blocks; ``cache_bytes`` sums the
    tensors in cache-dit's context buffers.
    """

    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1

    def __post_init__(self) -> None:
        check_positive_int("Fn_compute_blocks", self.Fn_compute_blocks)
        check_positive_int("Bn_compute_blocks", self.Bn_compute_blocks, 0)
        check_positive_int("max_warmup_steps", self.max_warmup_steps, 0)
        if not isinstance(self.residual_diff_threshold, (int, float)) or self.residual_diff_threshold < 0:
            raise ValueError(f"residual_diff_threshold must be a number >= 0, got {self.residual_diff_threshold!r}")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"{name} must be -1 (no cap) or an integer >= 1, got {v!r}")


_MISSING = object()


class DBCachePeer(PeerHandle):
    __doc__ = DBCachePeerConfig.__doc__

    _PATCH_ATTRS = ("_norm1_emb", "_is_patched")  # left on the transformer by cache-dit's DiTPatchFunctor

    def __init__(self, name, target, config: DBCachePeerConfig):
        super().__init__(name, target, config)
        self._had: dict[str, bool] = {}
        self._installed = False
        self.skipped_calls = 0
        self._cached_in_run = 0
        self._num_blocks = len(self._blocks())

    @classmethod
    def _check_config(cls, config: DBCachePeerConfig, transformer: torch.nn.Module, label: str) -> None:
        n = len(transformer.transformer_blocks)
        if config.Fn_compute_blocks + config.Bn_compute_blocks >= n:
            raise ValueError(f"Fn_compute_blocks + Bn_compute_blocks = "
                             f"{config.Fn_compute_blocks + config.Bn_compute_blocks} leaves no block to cache "
                             f"in {label} ({n} blocks); lower them below {n}")

    def _install(self) -> None:
        import cache_dit  # optional; imported only when this peer is applied

        version = importlib.metadata.version("cache-dit")
        if version != CACHE_DIT_TESTED_VERSION:
            warnings.warn(f"cache-dit {version} is installed; tclab's dbcache peer is tested with "
                          f"{CACHE_DIT_TESTED_VERSION} (its internals, which remove() undoes, may differ)", stacklevel=4)
        tr = self.transformer
        self._had = {a: a in tr.__dict__ or a in tr._modules for a in self._PATCH_ATTRS}
        self._saved_forward = tr.__dict__.get("forward", _MISSING)  # restored exactly on remove()
        c = self.config
        cfg = cache_dit.DBCacheConfig(
            Fn_compute_blocks=c.Fn_compute_blocks, Bn_compute_blocks=c.Bn_compute_blocks,
            residual_diff_threshold=float(c.residual_diff_threshold), max_warmup_steps=c.max_warmup_steps,
            max_cached_steps=c.max_cached_steps, max_continuous_cached_steps=c.max_continuous_cached_steps)
        # Transformer-only: cache-dit's registered "DiT" adapter (Pattern_3 + DiTPatchFunctor) inside a
        # placeholder pipeline with a persistent context, which _reset_state refreshes per run.
        cache_dit.enable_cache(tr, cache_config=cfg)
        self._installed = True
        if not getattr(tr, "_is_cached", False):
            self._uninstall()
            raise PeerUnavailableError("cache_dit.enable_cache left the DiT transformer uncached; "
                                       f"this tclab peer is tested with cache-dit {CACHE_DIT_TESTED_VERSION}")

    def _uninstall(self) -> None:
        if not self._installed:
            return
        import cache_dit

        tr = self.transformer
        if getattr(tr, "_is_cached", False):
            cache_dit.disable_cache(tr)
        for attr in self._PATCH_ATTRS:  # undo DiTPatchFunctor (disable_cache keeps it)
            if not self._had.get(attr):
                if attr in tr._modules:
                    del tr._modules[attr]
                elif attr in tr.__dict__:
                    delattr(tr, attr)
        # the patch functor replaces the instance forward; put back exactly what was there before
        if self._saved_forward is _MISSING:
            tr.__dict__.pop("forward", None)
        else:
            tr.forward = self._saved_forward

    def _reset_state(self) -> None:
        import cache_dit

        cache_dit.refresh_context(self.transformer)  # a fresh DBCache context: warm-up, residuals, counts
        self._cached_in_run = 0

    def _context(self):
        """cache-dit's context on the transformer (its cached-step record and buffers), or None."""
        tr = self.transformer
        manager, names = getattr(tr, "_context_manager", None), getattr(tr, "_context_names", None)
        if manager is None or not names:
            return None
        return manager.get_context(names[0])

    def _after_call(self) -> None:
        # cache-dit records the steps it served from cache in its context; count the new ones.
        context = self._context()
        if context is None:
            return
        cached = len(context.get_cached_steps())
        self.skipped_calls += max(0, cached - self._cached_in_run)
        self._cached_in_run = cached

    def _work_stats(self) -> dict:
        computed, skipped, n = self.calls - self.skipped_calls, self.skipped_calls, self._num_blocks
        probe = self.config.Fn_compute_blocks + self.config.Bn_compute_blocks
        context = None if self.removed else self._context()
        held = 0 if self.removed else None if context is None else tensor_bytes(context.buffers)
        return {"full_steps": computed, "cached_steps": skipped,
                "compute_fraction": (computed * n + skipped * probe) / (self.calls * n) if self.calls else None,
                "cache_bytes": held}

    def _extra_stats(self) -> dict:
        return {"skipped_calls": self.skipped_calls, "computed_calls": self.calls - self.skipped_calls}


def _cache_dit_reason() -> str | None:
    try:
        spec = importlib.util.find_spec("cache_dit")
    except (ImportError, ValueError):  # e.g. blocked with sys.modules["cache_dit"] = None
        spec = None
    if spec is None:
        return (f"cache-dit is not installed; install it with `pip install --no-deps cache-dit=="
                f"{CACHE_DIT_TESTED_VERSION}` (its transformers requirement is not needed for caching)")
    return None


def _two_blocks(transformer: torch.nn.Module, label: str) -> str | None:
    n = len(transformer.transformer_blocks)  # Fn + Bn < blocks is checked against the options in apply
    if n < 2:
        return f"DBCache needs at least 2 blocks (an Fn probe and a cached middle); {label} has {n}"
    return None


apply_dbcache = register_peer("dbcache", DBCachePeerConfig, DBCachePeer, requirement=_cache_dit_reason,
                              model_requirement=_two_blocks, label="cache-dit DBCache")
