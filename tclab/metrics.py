"""Measurements as pure functions: compute cost (FLOPs, wall-clock) and image quality.

Cost follows the spec (tokencache.md section 5): FLOPs are counted on what actually ran, with
``torch.utils.flop_counter.FlopCounterMode`` as a scoped context (never estimated from shapes), and
wall-clock is a median over repeated runs with the baseline re-run in the same process, interleaved.

FLOP convention: torch counts a multiply-add as 2 FLOPs. The DiT paper's "Gflops" are
multiply-accumulates (fvcore), so ``GMACs = FLOPs / 2`` is the number to compare with its table.
Counted: matrix products (linear layers, the patch-embedding convolution, attention's two batched
matmuls). Not counted, as in fvcore: norms, softmax, activations, elementwise adds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU flash kernel SDPA picks here;
    # the FLOPs are those of the two matmuls (Q K^T and P V), as for the other kernels.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}


# The DiT paper's Table 4 ("Gflops", counted as multiply-accumulates) per forward of one image.
PAPER_GMACS = {("DiT-S/2", 256): 6.06, ("DiT-B/2", 256): 23.01, ("DiT-L/2", 256): 80.71, ("DiT-XL/2", 256): 118.64,
               ("DiT-XL/2", 512): 524.60}


@dataclass
class FlopCount:
    """FLOPs of what ran, total and per top-level operator."""

    flops: int
    by_op: dict[str, int]

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


class count_flops:
    """Context manager counting the FLOPs of everything run inside it.

    >>> with count_flops() as fc:
    ...     model(x)
    >>> fc.result.gmacs
    """

    def __enter__(self) -> "count_flops":
        self._mode = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
        self._mode.__enter__()
        self.result: FlopCount | None = None
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        counts = self._mode.get_flop_counts().get("Global", {})
        self.result = FlopCount(flops=int(self._mode.get_total_flops()),
                                by_op={str(k).replace("aten.", ""): int(v) for k, v in counts.items()})


@torch.no_grad()
def transformer_forward_flops(transformer, batch: int = 1) -> FlopCount:
    """FLOPs of one forward of a DiT transformer on ``batch`` random latents (one timestep, class 0)."""
    cfg = transformer.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=transformer.dtype,
                    device=transformer.device)
    t = torch.full((batch,), 500, dtype=torch.long, device=transformer.device)
    y = torch.zeros(batch, dtype=torch.long, device=transformer.device)
    with count_flops() as fc:
        transformer(x, timestep=t, class_labels=y)
    return fc.result


@dataclass
class Timing:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Wall-clock of several callables, run interleaved (a, b, a, b, ...) after ``warmup`` rounds.

    Interleaving puts every variant under the same machine conditions (thermal state, other load),
    so ratios between them are meaningful even on a busy machine. Report the median.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing(name, []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].seconds.append(time.perf_counter() - t0)
    return out


# ---- paired image quality (against the same-seed full-compute output) ------------------------

def _to01(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> float64 in [0, 1] (metrics are computed in float64)."""
    return ((x.double() + 1) / 2).clamp(0, 1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale: (N,)."""
    return (_to01(a) - _to01(b)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] scale: (N,). Identical images give ``max_db``; an image with NaN
    gives NaN (never the cap)."""
    m = mse(a, b)
    out = torch.where(m > 0, 10 * torch.log10(1.0 / m.clamp_min(1e-300)), torch.full_like(m, max_db)).clamp(max=max_db)
    return torch.where(torch.isnan(m), m, out)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): Gaussian window, per channel, valid region, [0, 1] scale: (N,).

    The window shrinks to the image side for images smaller than ``window`` pixels.
    """
    x, y = _to01(a), _to01(b)
    n, c, h, w = x.shape
    k = min(window, h, w)
    g = torch.exp(-((torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(c, 1, k, k)  # (C, 1, k, k) depthwise

    def blur(z):
        return torch.nn.functional.conv2d(z, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def paired_quality(test: torch.Tensor, reference: torch.Tensor, *, lpips_model=None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and MSE of ``test`` images against same-seed ``reference`` images.

    With ``lpips_model`` (a ``tclab.lpips.LPIPS`` from ``load_lpips(backbone, lin)``, local files
    only) the mean LPIPS is added as ``"lpips"``; record ``lpips_model.identity()`` next to it.
    """
    if test.shape != reference.shape:
        raise ValueError(f"paired metrics need equal shapes, got {tuple(test.shape)} and {tuple(reference.shape)}")
    out = {"psnr": float(psnr(test, reference).mean()), "ssim": float(ssim(test, reference).mean()),
           "mse": float(mse(test, reference).mean())}
    if lpips_model is not None:
        from .lpips import lpips_distance

        out["lpips"] = float(lpips_distance(test, reference, lpips_model).mean())
    return out


# =============================================================================================
# Distribution quality against a reference image set: FID, KID, and export for the ADM evaluator
# =============================================================================================
# FID and KID compare *sets*: the features of the generated images against those of a reference
# set, in the feature space of one extractor (``tclab.features``). Their value depends on that
# extractor, on the number of images (FID is biased upwards at small N, KID is not) and on the
# reference set, so ``distribution_quality`` records all three next to the numbers.
#
# The floor. FID summarises each set by its sample covariance: a (D, D) matrix estimated from N
# feature vectors with their mean removed, so its rank is at most N - 1. It can be full rank (every
# direction of feature space estimated) only from N >= D + 1; below that the matrix square root in
# the Frechet distance is taken of a singular product and the value leans on the eps added to the
# diagonals, not on the images (6 images in 128-d features gave "751 against 738": numbers that
# mean nothing). So ``distribution_quality`` reports FID only when *both* sets hold at least
# ``fid_min_images(D) = D + 1`` images (129 for the 128-d classifier features, 2049 for Inception)
# and otherwise gives None with the reason "not computed: N images, needs at least M". D + 1 is
# the floor, not a guarantee: above it FID is still biased upwards at small N, so compare FIDs only
# at equal N (papers use 50,000). KID has no such floor (its unbiased estimate needs 2 images per
# subset) and carries its spread over subsets, ``kid_std``.

import warnings  # noqa: E402 - kept with the section that uses them

import numpy as np  # noqa: E402


def _as_features(feats, what: str) -> np.ndarray:
    f = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{what}: expected features as an (N, D) array, got shape {f.shape}; run a "
                         "tclab.features extractor on the images first")
    if not np.isfinite(f).all():
        raise ValueError(f"{what}: features hold NaN or inf; check the images (NaNs from a diverged sampler?)")
    return f


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, N - 1) of ``(N, D)`` features, in float64."""
    f = _as_features(feats, "feature_statistics")
    if len(f) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` (Dowson & Landau 1982;
    FID, Heusel et al. 2017). Numerical guards, as in the reference FID code: if the matrix square
    root is not finite or not accurate (a singular product, e.g. fewer images than feature
    dimensions), ``eps`` is added to both diagonals and it is retried; a square root that comes back complex with a
    negligible imaginary part (rounding) keeps its real part, a large one raises; a result below
    zero by rounding only is reported as 0.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances "
                         f"{s1.shape} and {s2.shape}; both sets must come from the same feature extractor")
    diff = mu1 - mu2

    def sqrtm_checked(a):
        # scipy warns "matrix is singular" for any rank-deficient product, even when the root it
        # returns is exact; judge the root by its residual |X X - A| / |A| instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            x = linalg.sqrtm(a)
        ok = np.isfinite(x).all() and np.linalg.norm(x @ x - a) <= 1e-6 * max(np.linalg.norm(a), 1e-300)
        return x, ok

    covmean, ok = sqrtm_checked(s1 @ s2)
    if not ok:
        offset = np.eye(len(s1)) * eps
        covmean, ok = sqrtm_checked((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("the covariance product has no finite square root even with eps on the diagonal; "
                             "use more images than feature dimensions")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the covariance product has a square root with imaginary part "
                             f"{np.max(np.abs(covmean.imag)):.3g}: the statistics are not valid covariances")
        covmean = covmean.real
    d2 = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    scale = float(np.trace(s1) + np.trace(s2)) or 1.0
    return 0.0 if -1e-9 * scale < d2 < 0 else d2


#: The rule ``fid_min_images`` applies, in words, for code docs, messages and summaries.
FID_FLOOR_RULE = ("FID needs at least feature dimension + 1 images in each set: the sample covariance of N "
                  "D-dimensional features has rank at most N - 1, so it can be full rank only from N = D + 1")


def fid_min_images(feature_dim: int) -> int:
    """The fewest images, in each of the two sets, for which FID is reported: ``feature_dim + 1``.

    The N - 1 sample covariance of N vectors in D dimensions has rank at most N - 1; it can be
    full rank only from N = D + 1 (see :data:`FID_FLOOR_RULE` and the section comment above).
    129 for the 128-d ``ClassifierFeatures``, 2049 for the 2048-d InceptionV3 pool features.
    """
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, (int, np.integer)) or feature_dim < 1:
        raise ValueError(f"feature_dim must be a positive integer (the D of (N, D) features), got {feature_dim!r}")
    return int(feature_dim) + 1


def fid_floor_reason(n_images: int, n_reference: int, feature_dim: int) -> str | None:
    """Why FID is not computed for these set sizes, or None when both reach :func:`fid_min_images`.

    The reason starts "not computed: N images, needs at least M" (or "N reference images") and
    says the rule and what to do, so a report can print it where the number would be.
    """
    need = fid_min_images(feature_dim)
    short = [f"{n} {what}" for n, what in ((n_images, "images"), (n_reference, "reference images")) if n < need]
    if not short:
        return None
    return (f"not computed: {' and '.join(short)}, needs at least {need} ({need - 1}-d features: FID needs "
            f"feature dimension + 1 = {need} images per set for a full-rank covariance). Use at least {need} "
            "images, or read KID, which has no such floor")


def frechet_distance(feats_a, feats_b) -> float:
    """FID when the features are InceptionV3's: the Frechet distance of two ``(N, D)`` feature sets.

    Each set is summarised by its mean and covariance (:func:`feature_statistics`); see
    :func:`frechet_distance_from_statistics` for the formula and its numerical guards. With fewer
    vectors than dimensions the covariances are singular and the value leans on ``eps``: use many
    more images than ``D`` (2048 for Inception, 128 for the small classifier). This low-level
    function computes it anyway; :func:`distribution_quality`, which feeds reports, refuses below
    :func:`fid_min_images` (``D + 1`` per set).
    """
    return frechet_distance_from_statistics(*feature_statistics(feats_a), *feature_statistics(feats_b))


def kernel_inception_distance(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> dict[str, float | int]:
    """KID (Binkowski et al. 2018): unbiased squared MMD with the kernel ``k(x, y) = (x.y / D + 1)^3``.

    For each of ``subsets`` rounds, ``m = subset_size`` vectors are drawn without replacement from
    each set (``numpy.random.default_rng(seed)``) and

        MMD^2 = mean_{i != j} k(a_i, a_j) + mean_{i != j} k(b_i, b_j) - 2 mean_{i, j} k(a_i, b_j).

    Returns ``{"mean", "std", "subsets", "subset_size"}``: mean and population std over the rounds
    (the std is the spread of the estimate, as torchmetrics and torch-fidelity report it; it shrinks
    as ``subset_size`` grows, and when ``subset_size`` is a whole set it reflects only which images
    of the other set were drawn).
    ``subset_size`` is capped at the smaller set's size, and the cap is returned. Unbiased, so a
    set against itself is 0 up to noise (small negative values happen) and, unlike FID, the
    expected value does not depend on N: KID is the fairer number for small sets.
    """
    a, b = _as_features(feats_a, "kernel_inception_distance"), _as_features(feats_b, "kernel_inception_distance")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ ({a.shape[1]} vs {b.shape[1]}); use one extractor for both")
    m = min(subset_size, len(a), len(b))
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subset_size >= 2 (got {m} after capping at the set sizes "
                         f"{len(a)}, {len(b)}) and subsets >= 1 (got {subsets})")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for k in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]                          # (m, D)
        y = b[rng.choice(len(b), m, replace=False)]                          # (m, D)
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        values[k] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * kxy.mean())
    return {"mean": float(values.mean()), "std": float(values.std()), "subsets": subsets, "subset_size": m}


def _centred_interval(estimate: float, boot, lo: float, hi: float, floor: float | None = 0.0) -> list[float]:
    """The bootstrap spread around ``estimate``: FID of a resample (duplicated images, less diversity) is
    biased upwards, so its percentiles are shifted by the bootstrap median's offset from the estimate
    (clipped at ``floor``; None: not clipped)."""
    q_lo, q_mid, q_hi = np.quantile(boot, [lo, 0.5, hi])
    low = estimate - (q_mid - q_lo)
    return [float(low if floor is None else max(floor, low)), float(estimate + (q_hi - q_mid))]


def distribution_intervals(feats, ref_feats, *, fid: bool = True, confidence: float = 0.95, resamples: int = 200,
                           seed: int = 0, kid_estimate: float | None = None, fid_estimate: float | None = None) -> dict:
    """Bootstrap intervals of FID and KID over the **generated** images (the reference set is held fixed:
    the question is how much the number would move with other seeds of the same sampler).

    Each resample draws the generated features with replacement.

    - FID is recomputed from the resample's mean and covariance; its interval is the bootstrap spread
      centred on the estimate (a resample's FID is biased upwards: duplicated images look less
      diverse). A resample holds about 63 % distinct images, so below 2 (D + 1) images its covariance
      is singular and its FID leans on ``eps``: no FID interval there. ``resamples`` is capped at 50
      above D = 512, where every matrix square root costs seconds.
    - KID is the unbiased MMD^2 of the whole resample against the whole reference set, with pairs of
      the *same* drawn image left out of the within-set mean (duplicates would bias it upwards); its
      interval is that spread centred on ``kid_estimate`` (the KID reported beside it, the mean over
      subsets), else on the whole-set value; FID's on ``fid_estimate`` when given (it is already known
      to the caller), else on the whole-set FID computed here.

    Returns ``fid_ci`` (None when ``fid`` is False or below 2 (D + 1) images) and ``kid_ci`` as
    ``[low, high]``, the KID on the whole sets (``kid_whole``), ``resamples`` and ``confidence``.
    """
    a, b = _as_features(feats, "distribution_intervals"), _as_features(ref_feats, "distribution_intervals")
    n, m, d = len(a), len(b), a.shape[1]
    rng = np.random.default_rng(seed)
    if d > 512:
        resamples = min(resamples, 50)
    kaa = (a @ a.T / d + 1) ** 3
    kbb = (b @ b.T / d + 1) ** 3
    kab_rows = ((a @ b.T / d + 1) ** 3).mean(axis=1)            # each generated image's mean kernel to the reference
    bb = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))

    def kid_of(idx: np.ndarray) -> float:
        sub = kaa[np.ix_(idx, idx)]
        distinct = idx[:, None] != idx[None, :]
        return float(sub[distinct].mean() + bb - 2 * kab_rows[idx].mean())

    fid = fid and n >= 2 * (d + 1)
    mu_b, cov_b = feature_statistics(b) if fid else (None, None)
    kids, fids = [], []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        if len(np.unique(idx)) < 2:
            continue
        kids.append(kid_of(idx))
        if fid:
            x = a[idx]
            fids.append(frechet_distance_from_statistics(x.mean(axis=0), np.cov(x, rowvar=False), mu_b, cov_b))
    lo, hi = 0.5 - confidence / 2, 0.5 + confidence / 2
    kid_whole = kid_of(np.arange(n))
    centre = kid_whole if kid_estimate is None else kid_estimate
    return {"kid_whole": kid_whole,
            "kid_ci": _centred_interval(centre, kids, lo, hi, floor=None) if len(kids) > 1 else [None, None],
            "fid_ci": (_centred_interval(frechet_distance(a, b) if fid_estimate is None else fid_estimate, fids, lo, hi)
                       if fid and len(fids) > 1 else None),
            "resamples": len(kids), "confidence": confidence}


def distribution_quality(images: torch.Tensor, reference_images, extractor, *, kid_subsets: int = 100,
                         kid_subset_size: int = 1000, seed: int = 0, confidence: float = 0.95,
                         resamples: int = 200) -> dict:
    """FID and KID of ``images`` against a reference set, labelled with the feature space used.

    Args:
        images: generated images, ``(N, 3, H, W)`` in [-1, 1].
        reference_images: the reference set as images in the same form, or as ``(M, D)`` features
            already computed with this ``extractor`` (saves recomputing them for every run).
        extractor: a ``tclab.features.FeatureExtractor``: ``InceptionV3Features(weights)`` for the
            published feature space, ``ClassifierFeatures()`` for an offline, relative one.

    Returns ``fid`` (None below the floor), ``fid_reason`` (None when FID was computed, else
    "not computed: N images, needs at least M ..."), ``fid_min_images`` (the floor,
    :func:`fid_min_images`: feature dimension + 1 per set), ``kid_mean``, ``kid_std`` (over the
    subsets), the KID subset settings, ``n_images``, ``n_reference``, ``feature_dim``, ``extractor``
    (its name), ``comparable_to_published`` (the extractor's flag: is this the feature space papers
    use?), ``fid_ci`` / ``kid_ci`` (``[low, high]``, :func:`distribution_intervals`: bootstrap over the
    generated images at ``confidence``, ``resamples`` of them; ``fid_ci`` None where FID is), ``extractor_identity`` (weights and hash) and a ``note`` saying what the numbers can be
    compared with. Even in Inception space a paper's FID is FID-50k against its own reference
    batch: compare only at equal N and reference.
    """
    feats = extractor(images)
    ref = reference_images
    if isinstance(ref, np.ndarray) and ref.ndim == 2:
        ref_feats = _as_features(ref, "reference features")
    else:
        ref_feats = extractor(ref)
    if ref_feats.shape[1] != feats.shape[1]:
        raise ValueError(f"reference features have {ref_feats.shape[1]} dims, {extractor.name} gives "
                         f"{feats.shape[1]}: compute them with the same extractor")
    kid = kernel_inception_distance(feats, ref_feats, kid_subsets, kid_subset_size, seed)
    comparable = bool(extractor.comparable_to_published)
    if not comparable:
        note = (f"feature space '{extractor.name}': compare only with runs that used the same extractor, "
                "reference set and image count; never with published FIDs")
    else:
        note = (f"published FIDs are FID-50k against the paper's reference batch (ADM evaluator); this is "
                f"FID-{len(feats)} against {len(ref_feats)} reference images: compare only at equal N and reference")
    dim = int(feats.shape[1])
    reason = fid_floor_reason(len(feats), len(ref_feats), dim)
    fid = None if reason is not None else frechet_distance(feats, ref_feats)
    ci = (distribution_intervals(feats, ref_feats, fid=fid is not None, confidence=confidence, resamples=resamples,
                                 seed=seed, kid_estimate=kid["mean"], fid_estimate=fid)
          if len(feats) >= 3 and len(ref_feats) >= 2 else {"fid_ci": None, "kid_ci": None})
    return {"fid": fid, "fid_ci": ci["fid_ci"], "kid_ci": ci["kid_ci"], "ci_resamples": ci.get("resamples"),
            "fid_reason": reason, "fid_min_images": fid_min_images(dim),
            "kid_mean": kid["mean"], "kid_std": kid["std"],
            "kid_subsets": kid["subsets"], "kid_subset_size": kid["subset_size"], "n_images": len(feats),
            "n_reference": len(ref_feats), "feature_dim": int(feats.shape[1]), "extractor": extractor.name,
            "comparable_to_published": comparable, "extractor_identity": extractor.identity(), "note": note}


def export_adm_npz(images, path, labels=None):
    """Write images as the ADM evaluator's sample/reference ``.npz``: ``arr_0`` uint8 ``(N, H, W, 3)``.

    The evaluator of openai/guided-diffusion (``evaluations/evaluator.py REF.npz SAMPLES.npz``) is
    what DiT, TokenCache, ToCa and TaylorSeer report FID-50k with; feeding it this file gives a
    number comparable with theirs (with 50,000 samples and the same reference batch, e.g.
    ``VIRTUAL_imagenet256_labeled.npz``). ``images`` is ``(N, 3, H, W)`` in [-1, 1] (quantised with
    ``tclab.data.images_to_uint8``, the same rounding as saved PNGs) or already ``(N, H, W, 3)``
    uint8. Optional ``labels`` go to ``arr_1``, as ADM's sampling script writes them. Returns the path.
    """
    from pathlib import Path

    from .data import images_to_uint8

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{str(path)!r}: name the file *.npz (numpy would append the suffix silently)")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        arr = images_to_uint8(images)
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) tensor in [-1, 1] or a (N, H, W, 3) uint8 array, "
                             f"got {arr.dtype} {arr.shape}")
    arrays = {"arr_0": np.ascontiguousarray(arr)}
    if labels is not None:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if lab.shape != (len(arr),):
            raise ValueError(f"labels must be ({len(arr)},), got {lab.shape}")
        arrays["arr_1"] = lab
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
    return path
