"""The learned Cache Predictor and its training (tclab.cache.predictor / tclab.cache.train; spec s.3).

Tiny DiTs (conftest) keep each test to a second or two. What is checked:
- the blending harness: w=1 is the plain forward bit for bit, w=0 is the engine's all-cached step;
- training: the loss goes down, the DiT gets no gradient, a seed repeats a run, resume equals an
  uninterrupted run, a checkpoint with other settings is refused;
- predictors: scores in [0, 1] of shape (B, L, N), save/load round trip, a mismatched model refused;
- the engine: both names plug into apply_token_cache and sample; the CLI sub-command trains one.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tclab.cache import ScoreContext, TokenCacheConfig, apply_token_cache, fora_config, remove_token_cache
from tclab.cache.hooks import get_token_cache_state
from tclab.cache.predictor import (
    DynamicCachePredictor,
    PredictorMismatchError,
    StaticCachePredictor,
    load_predictor,
    make_predictor,
    read_predictor_meta,
)
from tclab.cache.train import (
    PredictorTrainConfig,
    collect_trajectories,
    forward_blended,
    train_predictor,
)
from tclab.models import NULL_CLASS, LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.sampling import SampleConfig, StepContext, sample
from tests.conftest import perturbed, tiny_transformer

KINDS = ("learned-static", "learned-dynamic")


def fast_config(tmp_path, kind="learned-static", **kw) -> PredictorTrainConfig:
    base = dict(kind=kind, num_steps=5, num_samples=2, guidance_scale=2.0, steps=6, batch_size=3,
                checkpoint_every=3, eval_pairs=0, out=str(tmp_path / f"{kind}.safetensors"))
    return PredictorTrainConfig(**{**base, **kw})


def inputs(tr, rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = tr.config.in_channels, tr.config.sample_size
    x = torch.randn(rows, c, s, s, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.cat([torch.randint(0, 3, (rows // 2,), generator=g), torch.full((rows - rows // 2,), NULL_CLASS)])
    return x, t, y


# ---- the blending harness ----------------------------------------------------------------------

def test_forward_blended_plain_and_w1_equal_the_transformer(pixel_dit):
    tr = pixel_dit.transformer
    x, t, y = inputs(tr)
    with torch.no_grad():
        ref = tr(x, timestep=t, class_labels=y).sample
        plain, ups = forward_blended(tr, x, t, y, record=True)
        x2, t2, _ = inputs(tr, seed=1)
        _, cached = forward_blended(tr, x2, t2, y, record=True)
        L, N = len(tr.transformer_blocks), 16
        w1, _ = forward_blended(tr, x, t, y, w=torch.ones(4, L, N), cached=cached)
    assert torch.equal(plain, ref)
    assert torch.equal(w1, ref)  # w = 1: the cached updates contribute exactly nothing
    assert len(ups) == L and ups[0].shape == (4, N, tr.transformer_blocks[0].dim)


def test_forward_blended_w0_equals_the_engines_all_cached_step(pixel_dit):
    """w = 0 (and the cheap no-block path) must equal what the engine computes when every block reuses its
    cache (FORA: rho=0), given the previous step's updates."""
    tr = pixel_dit.transformer
    x0, _, y = inputs(tr)
    x1 = x0 + 0.1 * torch.randn_like(x0)
    t0, t1 = torch.full((4,), 800), torch.full((4,), 600)
    with torch.no_grad():
        _, cached = forward_blended(tr, x0, t0, y, record=True)
        soft0, _ = forward_blended(tr, x1, t1, y, w=torch.zeros(4, 2, 16), cached=cached)
        cheap, _ = forward_blended(tr, x1, t1, y, cached=cached)
        apply_token_cache(tr, fora_config(interval=2, num_steps=2))
        try:
            tr(x0, timestep=t0, class_labels=y)  # full step: fills the cache
            engine = tr(x1, timestep=t1, class_labels=y).sample  # cached step, no block runs
        finally:
            remove_token_cache(tr)
        full = tr(x1, timestep=t1, class_labels=y).sample
    assert torch.equal(soft0, cheap)
    torch.testing.assert_close(cheap, engine, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(cheap, full, atol=1e-3)  # caching really changed something


# ---- predictors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_scores_in_unit_interval_with_shape_b_l_n(pixel_dit, kind):
    tr = pixel_dit.transformer
    p = perturbed(make_predictor(kind, tr), seed=3)
    x, t, y = inputs(tr, rows=6)
    ctx = ScoreContext(step=StepContext(step=1, t=float(t[0]), num_steps=5, cfg=True, batch=3, run_id=1),
                       state=_FakeState(6, 2, (4, 4)), transformer=tr, hidden_states=x, timestep=t, class_labels=y)
    s = p.score(ctx)
    assert s.shape == (6, 2, 16)
    assert float(s.min()) >= 0 and float(s.max()) <= 1
    assert float(s.std()) > 0.01  # not a constant
    if kind == "learned-dynamic":  # depends on the tokens (the static one does not)
        ctx2 = ScoreContext(step=ctx.step, state=ctx.state, transformer=tr, hidden_states=x.flip(-1),
                            timestep=t, class_labels=y)
        assert not torch.allclose(p.score(ctx2), s)
    else:
        assert torch.equal(s[0], p.precompute(t[:1])[0])  # the table of that timestep


def test_fresh_predictor_scores_half(pixel_dit):
    for kind in KINDS:
        p = make_predictor(kind, pixel_dit.transformer)
        x, t, y = inputs(pixel_dit.transformer)
        w = torch.sigmoid(p.logits_for(pixel_dit.transformer, x, t, y))
        assert torch.equal(w, torch.full_like(w, 0.5))


class _FakeState:
    def __init__(self, rows, blocks, grid):
        self.rows, self.num_blocks, self.grid = rows, blocks, grid
        self.num_tokens = grid[0] * grid[1]


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(pixel_dit, tmp_path, kind):
    tr = pixel_dit.transformer
    p = perturbed(make_predictor(kind, tr), seed=5)
    path = p.save(tmp_path / "p.safetensors", {"train": {"num_steps": 7, "lambda": 0.3, "final_loss": 0.1}})
    q = load_predictor(path, tr)
    assert type(q) is type(p)
    for (k, a), (k2, b) in zip(p.state_dict().items(), q.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, t, y = inputs(tr)
    assert torch.equal(p.logits_for(tr, x, t, y), q.logits_for(tr, x, t, y))
    meta = read_predictor_meta(path)
    assert meta["kind"] == kind and meta["train"]["num_steps"] == 7 and meta["model"]["blocks"] == 2
    other = "learned-dynamic" if kind == "learned-static" else "learned-static"
    with pytest.raises(ValueError, match="not " + other):
        load_predictor(path, kind=other)


def test_mismatched_model_refused(pixel_dit, tmp_path):
    tr = pixel_dit.transformer
    path = make_predictor("learned-dynamic", tr).save(tmp_path / "p.safetensors")
    deeper = tiny_transformer(3, 3, layers=3)  # 3 blocks instead of 2
    with pytest.raises(PredictorMismatchError, match="3 blocks, predictor has 2"):
        load_predictor(path, deeper)
    bigger = tiny_transformer(3, 3, sample_size=16)  # 8x8 tokens instead of 4x4
    with pytest.raises(PredictorMismatchError, match=r"token grid \(8, 8\)"):
        load_predictor(path, bigger)
    # and through the engine: refused when the cache is applied, before anything runs or is attached
    with pytest.raises(PredictorMismatchError, match="train-predictor"):
        apply_token_cache(deeper, TokenCacheConfig(scorer="learned-dynamic", scorer_options={"path": str(path)},
                                                   schedule="round-robin", interval=2))
    assert get_token_cache_state(deeper) is None
    # a scorer instance made elsewhere is still checked at its first cached step
    m = LoadedDiT(name="deeper", transformer=deeper, vae=PixelSpaceVAE(), scheduler_config=default_scheduler_config(),
                  trained=False, source="test", class_names=["a", "b", "c"])
    apply_token_cache(deeper, TokenCacheConfig(scorer=load_predictor(path), schedule="round-robin", interval=2))
    try:
        with pytest.raises(PredictorMismatchError, match="train-predictor"):
            sample(m, [0], SampleConfig(num_steps=3, guidance_scale=1.0), progress=False)
    finally:
        remove_token_cache(deeper)


def test_other_weights_are_refused_naming_both(pixel_dit, tmp_path):
    from tclab.artefacts import model_key

    tr = pixel_dit.transformer
    p = make_predictor("learned-static", tr)
    p.meta["model"]["weights_fingerprint"] = "0" * 64
    p.meta["model"]["name"] = "someone-elses-dit"
    path = p.save(tmp_path / "p.safetensors")
    with pytest.raises(PredictorMismatchError, match="someone-elses-dit") as e:
        load_predictor(path, tr)
    assert "0" * 16 in str(e.value) and model_key(tr) in str(e.value)
    with pytest.warns(UserWarning, match="running it anyway"):
        load_predictor(path, tr, allow_other_weights=True)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="tclab train-predictor"):
        load_predictor(tmp_path / "nope.safetensors")


# ---- training --------------------------------------------------------------------------------------------

def losses(path) -> np.ndarray:
    return np.loadtxt(str(path).replace(".safetensors", ".loss.csv"), delimiter=",", skiprows=1)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_goes_down_and_dit_is_frozen(pixel_dit, tmp_path, kind):
    tr = pixel_dit.transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    flags = [p.requires_grad for p in tr.parameters()]
    path = train_predictor(pixel_dit, fast_config(tmp_path, kind, steps=40, batch_size=4, checkpoint_every=20,
                                                  eval_pairs=8), progress=False)
    h = losses(path)  # columns: step, loss, rel_mse, mean_w
    assert h.shape == (40, 4)
    assert h[-10:, 1].mean() < h[:10, 1].mean() - 0.02
    assert all(p.grad is None for p in tr.parameters())
    assert [p.requires_grad for p in tr.parameters()] == flags  # restored as they were
    assert all(torch.equal(v, before[k]) for k, v in tr.state_dict().items())
    meta = read_predictor_meta(path)
    ev = meta["train"]["evaluation"]
    assert ev["rel_mse_predictor"] < ev["rel_mse_random"]  # hard top-50% masks rank better than chance
    assert meta["train"]["lambda"] == 1.0 and meta["train"]["num_steps"] == 5
    assert (tmp_path / f"{kind}.loss.png").stat().st_size > 0


def test_same_seed_same_predictor_other_seed_differs(pixel_dit, tmp_path):
    a = train_predictor(pixel_dit, fast_config(tmp_path / "a"), progress=False)
    b = train_predictor(pixel_dit, fast_config(tmp_path / "b"), progress=False)
    c = train_predictor(pixel_dit, fast_config(tmp_path / "c", seed=1), progress=False)
    sa, sb, sc = (load_predictor(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(losses(a), losses(b))
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_equals_uninterrupted_run(pixel_dit, tmp_path, kind):
    full = train_predictor(pixel_dit, fast_config(tmp_path / "full", kind, steps=6), progress=False)
    part = fast_config(tmp_path / "part", kind, steps=3)  # "interrupted" after its checkpoint at step 3
    train_predictor(pixel_dit, part, progress=False)
    resumed = train_predictor(pixel_dit, fast_config(tmp_path / "part", kind, steps=6), resume=True, progress=False)
    sa, sb = load_predictor(full).state_dict(), load_predictor(resumed).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(losses(full), losses(resumed))
    # a checkpoint made with other settings is refused, not silently mixed
    with pytest.raises(ValueError, match="other settings"):
        train_predictor(pixel_dit, fast_config(tmp_path / "part", kind, steps=8, lam=2.0), resume=True, progress=False)


def test_checkpoint_loads_with_weights_only(pixel_dit, tmp_path):
    train_predictor(pixel_dit, fast_config(tmp_path, steps=3), progress=False)
    ck = torch.load(tmp_path / ".learned-static.training" / "checkpoint.pt", weights_only=True)
    assert int(ck["step"]) == 3 and "predictor" in ck and "opt" in ck


def test_trajectories_hold_every_cfg_row_and_sdedit_traces(tmp_path):
    m = LoadedDiT(name="flat", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                  scheduler_config=default_scheduler_config(), trained=False, source="test")  # no class names
    cfg = fast_config(tmp_path, num_steps=5, num_samples=2, images="data/shapes", num_images=3, sdedit_strength=0.6)
    tj = collect_trajectories(m, cfg, progress=False)
    # 2 samples x 2 CFG rows x 5 steps + 3 images x 2 CFG rows x 3 SDEdit steps
    assert len(tj) == 2 * 2 * 5 + 3 * 2 * 3 and tj.num_trajectories == 4 + 6
    # CFG's null half of every row, and both halves of the SDEdit traces: the model has no class names, so the
    # shapes folders map to no class and are sampled unconditionally (tclab.labels)
    assert int((tj.y == NULL_CLASS).sum()) == 2 * 5 + 2 * 3 * 3
    for k in range(tj.num_trajectories):  # steps ascending within each trajectory
        s = tj.step[tj.traj == k]
        assert torch.equal(s, torch.arange(len(s)))
    # the recorded target is the transformer's output for the recorded input
    with torch.no_grad():
        out = m.transformer(tj.x[:3], timestep=tj.t[:3], class_labels=tj.y[:3]).sample
    torch.testing.assert_close(out, tj.target[:3], atol=1e-5, rtol=1e-5)  # other batch: round-off only


def test_config_validation_says_what_is_wrong():
    with pytest.raises(ValueError, match="learned-static"):
        PredictorTrainConfig(kind="learned")
    with pytest.raises(ValueError, match="lambda"):
        PredictorTrainConfig(lam=-1)
    with pytest.raises(ValueError, match="max_gap"):
        PredictorTrainConfig(num_steps=3, max_gap=3)


# ---- the engine and the CLI -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_predictor_plugs_into_the_engine(pixel_dit, tmp_path, kind):
    tr = pixel_dit.transformer
    path = perturbed(make_predictor(kind, tr), seed=2).save(tmp_path / "p.safetensors",
                                                            {"train": {"num_steps": 6}})
    sc = SampleConfig(num_steps=6, guidance_scale=2.0)
    full = sample(pixel_dit, [0, 1], sc, progress=False)
    by_name = TokenCacheConfig(scorer=kind, scorer_options={"path": str(path)}, rho=0.5,
                               schedule="round-robin", interval=2)
    state = apply_token_cache(tr, by_name)
    try:
        a = sample(pixel_dit, [0, 1], sc, progress=False)
    finally:
        remove_token_cache(tr)
    assert type(state.scorer).__name__ == ("StaticCachePredictor" if kind == "learned-static"
                                           else "DynamicCachePredictor")
    s = state.summary()
    assert s["cached_steps"] == 3 and s["mean_kept_cached"] == pytest.approx(0.5)
    assert torch.isfinite(a.images).all() and not torch.equal(a.images, full.images)
    # the same predictor as an instance gives the same run
    state = apply_token_cache(tr, TokenCacheConfig(scorer=load_predictor(path, tr), rho=0.5,
                                                   schedule="round-robin", interval=2))
    try:
        b = sample(pixel_dit, [0, 1], sc, progress=False)
    finally:
        remove_token_cache(tr)
    assert torch.equal(a.images, b.images)


def test_static_predictor_warns_once_at_another_step_count(pixel_dit, tmp_path):
    tr = pixel_dit.transformer
    path = make_predictor("learned-static", tr).save(tmp_path / "p.safetensors", {"train": {"num_steps": 50}})
    apply_token_cache(tr, TokenCacheConfig(scorer="learned-static", scorer_options={"path": str(path)},
                                           schedule="round-robin", interval=2))
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            sample(pixel_dit, [0], SampleConfig(num_steps=6, guidance_scale=1.0), progress=False)
    finally:
        remove_token_cache(tr)
    msgs = [str(w.message) for w in got if "50-step" in str(w.message)]
    assert len(msgs) == 1 and "interpolated" in msgs[0]


def test_shipped_predictors_fit_the_embedded_model():
    from tclab.cache.predictor import default_predictor_path
    from tclab.models import load_dit

    tr = load_dit("shapes-dit").transformer
    for kind in KINDS:
        path = default_predictor_path(kind)
        assert path.exists(), f"{path} missing: run `tclab train-predictor --kind both`"
        p = load_predictor(path, kind=kind)
        p.check_fits(tr)
        assert read_predictor_meta(path)["train"]["num_steps"] == 50


def test_unknown_scorer_option_refused(tmp_path):
    tr = tiny_transformer(3, 3)
    with pytest.raises(ValueError, match="does not take option"):
        apply_token_cache(tr, TokenCacheConfig(scorer="learned-static", scorer_options={"file": "x"}))


def test_cli_train_predictor(tmp_path):
    from tclab.cli import main

    folder = tmp_path / "tiny-model"
    tiny_transformer(3, 3).save_pretrained(folder)
    out = tmp_path / "p.safetensors"
    rc = main(["train-predictor", "--model", str(folder), "--kind", "learned-dynamic", "--steps", "3",
               "--num-steps", "4", "--lambda", "0.5", "--out", str(out), "--num-samples", "1", "--eval-pairs", "0"])
    assert rc == 0 and out.exists()
    meta = read_predictor_meta(out)
    assert meta["kind"] == "learned-dynamic" and meta["train"]["lambda"] == 0.5
    assert meta["train"]["num_steps"] == 4 and meta["train"]["optimizer_steps"] == 3
    rc = main(["train-predictor", "--model", str(folder), "--kind", "learned-dynamic", "--steps", "5",
               "--num-steps", "4", "--lambda", "0.5", "--out", str(out), "--num-samples", "1", "--eval-pairs", "0",
               "--resume"])
    assert rc == 0 and read_predictor_meta(out)["train"]["optimizer_steps"] == 5
