"""Rollout training of the Cache Predictor (tclab.cache.train, issue #17 item 3; spec section 6).

Tiny DiTs (conftest's ``tiny_transformer``: 2 blocks, 4x4 tokens) and one set of 8-step trajectories shared
by the module keep the file to a few seconds. What is checked:
- ``rollout=0`` is today's training, step for step, and its run key is what it always was;
- a one-step window is the one-step pair loss (g = 1), loss and gradients;
- w = 1 everywhere: the MSE term is 0; w = 0: the cache never changes (the s0 cache all window);
- hard 0/1 scores: the rollout's per-step errors are the engine's own cached steps (``kv="all"``), and
  differ from those of a cache that is not refreshed (so the evolution is what makes them agree);
- gradients reach a step's scores through the cache they leave to the next step;
- windows follow the schedule and never cross a full step; the sampler repeats for a seed;
- resume equals an uninterrupted run; ``max_seconds`` stops a run and leaves it resumable;
- bad settings (config, ``--schedule`` syntax) raise saying what is wrong.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tclab.cache import TokenCacheConfig, apply_token_cache, remove_token_cache
from tclab.cache.predictor import CachePredictor, load_predictor, make_predictor, read_predictor_meta
from tclab.cache.select import token_budget
from tclab.cache.train import (
    PredictorTrainConfig,
    TrajectorySet,
    WindowBatch,
    _draw_pairs,
    _draw_windows,
    _noise_channels,
    _pair_tensors,
    _window_tensors,
    collect_trajectories,
    compute_pair_loss,
    compute_rollout_loss,
    forward_blended,
    parse_schedule_spec,
    rollout_windows,
    train_predictor,
)
from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config
from tclab.steps import StepContext, running
from tests.conftest import perturbed, tiny_transformer

NUM_STEPS = 8


def config(tmp_path=None, **kw) -> PredictorTrainConfig:
    base = dict(kind="learned-static", num_steps=NUM_STEPS, num_samples=2, guidance_scale=2.0, steps=4, batch_size=3,
                checkpoint_every=2, eval_pairs=0, out=str(tmp_path / "p.safetensors") if tmp_path else None)
    return PredictorTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model() -> LoadedDiT:
    return LoadedDiT(name="tiny-pixel", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test",
                     class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def trajs(model) -> TrajectorySet:
    return collect_trajectories(model, config(), progress=False)  # 4 trajectories (2 samples x CFG) x 8 steps


class ConstantLogits(nn.Module):
    """A stand-in predictor whose logits are one value everywhere: +200 gives w = 1 exactly, -200 w = 0."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def logits_for(self, transformer, hidden_states, timestep, class_labels):
        L, side = len(transformer.transformer_blocks), transformer.config.sample_size // transformer.config.patch_size
        return torch.full((hidden_states.shape[0], L, side * side), self.value)


class StepMasks(CachePredictor):
    """A scorer for the engine and the rollout alike: a 0/1 mask per timestep (logits +-200: w exactly 0/1)."""

    name = "step-masks"

    def __init__(self, timesteps: torch.Tensor, masks: torch.Tensor):
        super().__init__(masks.shape[1], (4, 4))
        self.ts = timesteps
        self.masks = nn.Parameter(masks.float(), requires_grad=False)  # (S, L, N)

    def arch(self) -> dict:
        return {}

    def logits_for(self, transformer, hidden_states, timestep, class_labels):
        t = torch.as_tensor(timestep).reshape(-1).expand(hidden_states.shape[0])
        idx = (t.reshape(-1, 1) == self.ts.reshape(1, -1)).float().argmax(1)
        return torch.where(self.masks[idx] > 0, 200.0, -200.0)


class StepTable(nn.Module):
    """A stand-in predictor with one free logit table per timestep of the trajectories (to read gradients)."""

    def __init__(self, timesteps: torch.Tensor, L: int, N: int):
        super().__init__()
        self.ts = timesteps
        self.theta = nn.Parameter(torch.randn(len(timesteps), L, N, generator=torch.Generator().manual_seed(3)))

    def logits_for(self, transformer, hidden_states, timestep, class_labels):
        idx = (timestep.reshape(-1, 1) == self.ts.reshape(1, -1)).float().argmax(1)
        return self.theta[idx]


def windows_of(trajs, n_steps, m0s):
    """One-trajectory windows starting at rows ``m0s`` with ``n_steps`` cached steps each."""
    return _window_tensors(trajs, torch.tensor(m0s), torch.full((len(m0s),), n_steps), "cpu")


def losses(path) -> np.ndarray:
    return np.loadtxt(str(path).replace(".safetensors", ".loss.csv"), delimiter=",", skiprows=1)


# ---- rollout=0 is unchanged ------------------------------------------------------------------------

def test_rollout_0_is_todays_training_step_for_step(model, trajs, tmp_path):
    cfg = config(tmp_path, steps=4, max_gap=2)
    assert cfg.rollout == 0 and cfg.schedule is None
    key = json.loads(cfg.run_key())
    assert not {"rollout", "schedule", "max_seconds"} & set(key)  # a checkpoint from before still resumes
    path = train_predictor(model, cfg, progress=False, trajectories=trajs)
    # today's loop, written out: the same seed, pairs, loss and optimiser
    tr = model.transformer.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        pred = make_predictor(cfg.kind, tr)
    opt = torch.optim.AdamW(pred.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen, rows, hist = torch.Generator().manual_seed(cfg.seed), trajs.pair_rows(), []
    for step in range(cfg.steps):
        m, g = _draw_pairs(trajs, rows, cfg.batch_size, cfg.max_gap, gen)
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / 10)
        res = compute_pair_loss(pred, tr, _pair_tensors(trajs, m, g, "cpu"), cfg)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        opt.step()
        hist.append(float(res["loss"].detach()))
    tr.requires_grad_(True)
    np.testing.assert_array_equal(losses(path)[:, 1], [float(f"{v:.6f}") for v in hist])  # as the .csv writes them
    saved = load_predictor(path).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in pred.state_dict().items())


# ---- the rollout loss --------------------------------------------------------------------------------

def test_one_step_window_equals_the_pair_loss(model, trajs):
    tr = model.transformer.eval().requires_grad_(False)
    cfg = config(rollout=1)
    m = torch.tensor([1, 5, 10, 30])  # pair ends (step >= 1); windows start one row earlier
    assert bool((trajs.step[m] >= 1).all())
    res = {}
    for name in ("pair", "window"):
        pred = perturbed(make_predictor("learned-static", tr))
        if name == "pair":
            r = compute_pair_loss(pred, tr, _pair_tensors(trajs, m, torch.ones_like(m), "cpu"), cfg)
        else:
            r = compute_rollout_loss(pred, tr, windows_of(trajs, 1, (m - 1).tolist()), cfg)
        r["loss"].backward()
        res[name] = (r, [p.grad.clone() for p in pred.parameters()])
    (a, ga), (b, gb) = res["pair"], res["window"]
    assert torch.equal(a["rel_mse"], b["rel_mse"])  # the same tensors, the same arithmetic
    torch.testing.assert_close(a["mean_w"], b["mean_w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert 0.01 < float(a["rel_mse"]) < 10 and b["cached_steps"] == 4


def test_w1_everywhere_gives_zero_mse(model, trajs):
    tr = model.transformer.eval()
    cfg = config(rollout=3)
    batch = windows_of(trajs, 3, [0, 8, 17])
    with torch.no_grad():
        ones = compute_rollout_loss(ConstantLogits(200.0), tr, batch, cfg)
        half = compute_rollout_loss(ConstantLogits(0.0), tr, batch, cfg)
    assert float(ones["mean_w"]) == 1.0
    assert float(ones["rel_mse"]) < 1e-9  # every token computed at every step: the full output
    assert float(half["rel_mse"]) > 1e-3  # not a loss that is always 0
    assert float(ones["loss"]) == pytest.approx(cfg.lam * 1.0, abs=1e-9)


def test_w0_keeps_the_s0_cache_all_window(model, trajs):
    """w = 0: nothing is computed, so the cache stays the full step's; every step's output is then the
    all-cached output with the s0 cache, and its relative error is err0 / (err0 + EPS), step by step."""
    tr = model.transformer.eval()
    cfg = config(rollout=4, relative=False)
    batch = windows_of(trajs, 4, [0, 9, 18])
    with torch.no_grad():
        got = compute_rollout_loss(ConstantLogits(-200.0), tr, batch, cfg)
        _, cache0 = forward_blended(tr, batch.x[:, 0], batch.t[:, 0], batch.y, record=True)
        errs = []
        for j in range(1, 5):
            out, _ = forward_blended(tr, batch.x[:, j], batch.t[:, j], batch.y, cached=cache0)
            errs.append((_noise_channels(out, tr) - batch.target[:, j]).pow(2).flatten(1).mean(1))
        # a cache that (wrongly) took the step's own updates would give the full output: error ~0
        w1 = compute_rollout_loss(ConstantLogits(200.0), tr, batch, cfg)
    want = torch.stack(errs).mean(0).mean()
    assert float(got["mean_w"]) == 0.0
    torch.testing.assert_close(got["rel_mse"], want, rtol=1e-6, atol=0)
    assert float(want) > 100 * float(w1["rel_mse"]) + 1e-6
    cfg_rel = config(rollout=4)  # relative: every step is exactly as bad as caching everything
    with torch.no_grad():
        rel = compute_rollout_loss(ConstantLogits(-200.0), tr, batch, cfg_rel)
    torch.testing.assert_close(rel["rel_mse"], torch.tensor(1.0), rtol=1e-6, atol=0)


def test_a_batch_of_windows_of_mixed_lengths_is_the_mean_of_its_windows(model, trajs):
    """Each window counts once (its steps averaged), whatever its length and place in the batch."""
    tr = model.transformer.eval()
    cfg = config(rollout=3)
    starts, lengths = [0, 9, 17, 26], [1, 3, 2, 3]  # not sorted by length
    pred = perturbed(make_predictor("learned-static", tr))
    with torch.no_grad():
        batch = compute_rollout_loss(pred, tr, _window_tensors(trajs, torch.tensor(starts), torch.tensor(lengths),
                                                                "cpu"), cfg)
        alone = [compute_rollout_loss(pred, tr, windows_of(trajs, k, [m0]), cfg) for m0, k in zip(starts, lengths)]
    for key in ("rel_mse", "mean_w", "loss"):
        torch.testing.assert_close(batch[key], torch.stack([a[key] for a in alone]).mean(), rtol=1e-5, atol=0)
    assert batch["cached_steps"] == sum(lengths)
    assert len({round(float(a["rel_mse"]), 4) for a in alone}) == 4  # the windows really differ


def test_hard_scores_give_the_engines_cached_steps(model, trajs):
    """With 0/1 scores the rollout's steps are the engine's cached steps (kv="all", reuse="update") run on
    the same inputs: computed tokens refresh the cache, the rest reuse it. Not refreshing it gives others."""
    tr = model.transformer.eval()
    L, N, k, rho = 2, 16, 2, 0.5
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(NUM_STEPS, L * N)
    for s in range(NUM_STEPS):  # exactly the engine's budget of ones, other tokens at every step
        masks[s, torch.randperm(L * N, generator=gen)[:token_budget(rho, L, N)]] = 1
    masks = masks.view(NUM_STEPS, L, N)
    pred = StepMasks(trajs.t[:NUM_STEPS], masks)
    batch = windows_of(trajs, k, [2])  # one window: rows 2 (full), 3, 4 (cached) of trajectory 0
    with torch.no_grad():
        got = compute_rollout_loss(pred, tr, batch, config(rollout=k, relative=False))
        got_rel = compute_rollout_loss(pred, tr, batch, config(rollout=k))
        apply_token_cache(tr, TokenCacheConfig(scorer=pred, rho=rho, schedule="round-robin", interval=k + 1,
                                               kv="all", reuse="update", selection="global"))
        try:
            outs = []
            for j in range(k + 1):
                ctx = StepContext(step=j, t=float(batch.t[0, j]), num_steps=k + 1, cfg=False, batch=1, run_id=987_654)
                with running(ctx):
                    outs.append(tr(batch.x[:, j], timestep=batch.t[:, j], class_labels=batch.y).sample)
        finally:
            remove_token_cache(tr)
        errs = [(_noise_channels(outs[j], tr) - batch.target[:, j]).pow(2).mean() for j in (1, 2)]
        # the same two steps with the s0 cache never refreshed
        _, cache0 = forward_blended(tr, batch.x[:, 0], batch.t[:, 0], batch.y, record=True)
        stale = forward_blended(tr, batch.x[:, 2], batch.t[:, 2], batch.y, w=masks[4][None], cached=cache0)[0]
        # relative: each step's error over caching everything with the s0 cache (the normaliser never evolves)
        err0 = [(_noise_channels(forward_blended(tr, batch.x[:, j], batch.t[:, j], batch.y, cached=cache0)[0], tr)
                 - batch.target[:, j]).pow(2).mean() for j in (1, 2)]
    engine = (errs[0] + errs[1]) / 2
    stale_mean = (errs[0] + (_noise_channels(stale, tr) - batch.target[:, 2]).pow(2).mean()) / 2
    # the errors are small (a random tiny DiT changes little per step): compare relatively, no absolute slack
    torch.testing.assert_close(got["rel_mse"], engine, rtol=1e-4, atol=0)
    assert abs(float(stale_mean - engine)) > 1e-3 * float(engine)  # the refresh is what makes them agree
    torch.testing.assert_close(got_rel["rel_mse"], (errs[0] / err0[0] + errs[1] / err0[1]) / 2, rtol=1e-4, atol=0)
    assert 0 < float(got_rel["rel_mse"]) < 1  # computing half the tokens beats caching all of them


def test_gradients_flow_through_the_cache_evolution(model, trajs):
    """The scores of cached step s0 + 1 also shape the cache step s0 + 2 reads: with lam = 0 the rollout's
    gradient on them is not just half the one-step gradient of step s0 + 1."""
    tr = model.transformer.eval().requires_grad_(False)
    L, N = 2, 16
    ts = trajs.t[:NUM_STEPS]
    cfg = config(rollout=2, lam=0.0)
    grads = {}
    for name in ("rollout", "pair"):
        table = StepTable(ts, L, N)
        if name == "rollout":
            r = compute_rollout_loss(table, tr, windows_of(trajs, 2, [2]), cfg)
        else:
            r = compute_pair_loss(table, tr, _pair_tensors(trajs, torch.tensor([3]), torch.tensor([1]), "cpu"), cfg)
        r["loss"].backward()
        grads[name] = table.theta.grad[3].clone()  # the scores of step 3 = s0 + 1
    through_cache = grads["rollout"] - 0.5 * grads["pair"]
    assert torch.isfinite(through_cache).all()
    assert float(through_cache.abs().max()) > 1e-4 * float(grads["pair"].abs().max())
    tr.requires_grad_(True)


# ---- windows ----------------------------------------------------------------------------------------

def fake_trajs(lengths) -> TrajectorySet:
    step = torch.cat([torch.arange(n) for n in lengths])
    traj = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    M = len(step)
    z = torch.zeros(M, 1, 2, 2)
    return TrajectorySet(x=z, t=torch.zeros(M), y=torch.zeros(M, dtype=torch.long), target=z, step=step, traj=traj)


def test_windows_follow_the_schedule_and_never_cross_a_full_step():
    from tclab.cache.schedule import make_schedule

    sched = {"kind": "tprr", "k1": 4, "k2": 3, "split": 0.5}
    t = fake_trajs([12, 12, 6])  # the last: an SDEdit trace with its own, shorter schedule
    starts, lengths = rollout_windows(t, config(num_steps=12, rollout=2, schedule=sched))
    # tprr(4, 3, 0.5) over 12 steps: full at 0, 4, 6, 9 -> cached runs 1-3, 5, 7-8, 10-11 (capped at 2)
    want = [(0, 2), (4, 1), (6, 2), (9, 2)]
    got = list(zip(starts.tolist(), lengths.tolist()))
    assert got[:4] == want and got[4:8] == [(12 + s, k) for s, k in want]
    assert got[8:] == [(24 + 0, 2), (24 + 3, 2)]  # over 6 steps: full at 0, 3 (split at 3)
    for (m0, k) in got:
        n = 6 if m0 >= 24 else 12
        full = make_schedule("tprr", n, k1=4, k2=3, split=0.5)
        s0 = int(t.step[m0])
        assert full[s0] and not full[s0 + 1: s0 + k + 1].any()
        assert t.traj[m0] == t.traj[m0 + k]  # inside one trajectory
    longer = rollout_windows(t, config(num_steps=12, rollout=5, schedule=sched))
    assert (int(longer[0][0]), int(longer[1][0])) == (0, 3)  # capped by the next full step (4), not by rollout
    # no schedule: windows of exactly `rollout` cached steps start at every step that has them
    starts, lengths = rollout_windows(t, config(num_steps=12, rollout=3))
    assert set(lengths.tolist()) == {3}
    assert starts.tolist() == list(range(9)) + list(range(12, 21)) + list(range(24, 27))


def test_window_sampler_repeats_for_a_seed():
    wins = rollout_windows(fake_trajs([12, 12]), config(num_steps=12, rollout=3))
    a = _draw_windows(wins, 6, torch.Generator().manual_seed(5))
    b = _draw_windows(wins, 6, torch.Generator().manual_seed(5))
    c = _draw_windows(wins, 6, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_window_batch_pads_short_windows_with_their_last_step(trajs):
    wb = _window_tensors(trajs, torch.tensor([0, 8]), torch.tensor([3, 1]), "cpu")
    assert isinstance(wb, WindowBatch) and wb.x.shape[:2] == (2, 4)
    assert torch.equal(wb.x[1, 1], trajs.x[9]) and torch.equal(wb.x[1, 3], trajs.x[9])
    assert torch.equal(wb.t[0], trajs.t[0:4]) and wb.y.tolist() == [int(trajs.y[0]), int(trajs.y[8])]


# ---- the loop ----------------------------------------------------------------------------------------

SCHED = {"kind": "tprr", "k1": 3, "k2": 2, "split": 0.5}


def test_rollout_training_resume_equals_uninterrupted_run(model, trajs, tmp_path):
    kw = dict(rollout=2, schedule=SCHED)
    full = train_predictor(model, config(tmp_path / "full", steps=4, **kw), progress=False, trajectories=trajs)
    train_predictor(model, config(tmp_path / "part", steps=2, **kw), progress=False, trajectories=trajs)
    resumed = train_predictor(model, config(tmp_path / "part", steps=4, **kw), resume=True, progress=False,
                              trajectories=trajs)
    sa, sb = load_predictor(full).state_dict(), load_predictor(resumed).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.array_equal(losses(full), losses(resumed))
    meta = read_predictor_meta(full)["train"]
    assert meta["rollout"] == 2 and meta["schedule"] == SCHED and meta["windows_available"] > 0
    assert not np.array_equal(losses(full), losses(train_predictor(  # rollout trains something else
        model, config(tmp_path / "pairs", steps=4), progress=False, trajectories=trajs)))
    with pytest.raises(ValueError, match="other settings"):  # a rollout checkpoint is not resumed as pairs
        train_predictor(model, config(tmp_path / "part", steps=6), resume=True, progress=False, trajectories=trajs)


def test_max_seconds_stops_early_and_stays_resumable(model, trajs, tmp_path):
    kw = dict(rollout=2, schedule=SCHED, steps=50)
    path = train_predictor(model, config(tmp_path, max_seconds=1e-6, **kw), progress=False, trajectories=trajs)
    meta = read_predictor_meta(path)["train"]
    assert meta["optimizer_steps"] == 1 and meta["stopped_by"] == "max_seconds"
    ck = torch.load(tmp_path / ".p.training" / "checkpoint.pt", weights_only=True)
    assert int(ck["step"]) == 1  # the checkpoint is written when time is up, not only every N steps
    # max_seconds does not change what a step computes: a resumed run may change it
    path = train_predictor(model, config(tmp_path, **{**kw, "steps": 3}), resume=True, progress=False,
                           trajectories=trajs)
    assert read_predictor_meta(path)["train"]["optimizer_steps"] == 3
    assert "max_seconds" not in json.loads(config(max_seconds=5.0).run_key())


def test_rollout_and_schedule_change_the_run_key_not_the_data_key():
    base, roll = config(), config(rollout=2, schedule=SCHED)
    assert base.data_key() == roll.data_key()
    assert base.run_key() != roll.run_key() != config(rollout=2).run_key()
    assert json.loads(roll.run_key())["schedule"] == SCHED


# ---- bad settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(rollout=-1), "rollout must be an integer >= 0"),
    (dict(rollout=True), "rollout must be an integer"),
    (dict(rollout=2.0), "rollout must be an integer"),
    (dict(rollout=NUM_STEPS), f"use rollout <= {NUM_STEPS - 1}"),
    (dict(schedule=SCHED), "set rollout >= 1"),
    (dict(rollout=2, max_gap=2), "leave max_gap at 1"),
    (dict(rollout=2, schedule="tprr"), "must be a dict naming its kind"),
    (dict(rollout=2, schedule={"k1": 3}), "must be a dict naming its kind"),
    (dict(rollout=2, schedule={"kind": "fancy"}), "unknown schedule kind 'fancy'"),
    (dict(rollout=2, schedule={"kind": "tprr", "k1": 3}), r"missing parameters \['k2', 'split'\]"),
    (dict(rollout=2, schedule={"kind": "tprr", "k1": 3, "k2": 2, "split": 2.0}), "split must be a number in"),
    (dict(rollout=2, schedule={"kind": "round-robin", "interval": 1.5}), "interval must be an integer"),
    (dict(rollout=2, schedule={"kind": "round-robin", "interval": 1}), "no cached step to train on"),
    (dict(rollout=2, schedule={"kind": "round-robin", "interval": np.int64(3), "force_last": np.array(0)}),
     "plain JSON values"),
    (dict(max_seconds=0), "max_seconds must be a number of seconds > 0"),
    (dict(max_seconds=float("nan")), "max_seconds must be"),
])
def test_bad_settings_say_what_is_wrong(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_trajectories_without_a_window_are_refused(model, tmp_path):
    short = fake_trajs([3, 3])  # 3 steps each: no room for a window of 3 cached steps after a step
    with pytest.raises(ValueError, match="hold no rollout window"):
        train_predictor(model, config(tmp_path, rollout=3), progress=False, trajectories=short)


@pytest.mark.parametrize("text, want", [
    ("tprr:6,4,0.5", {"kind": "tprr", "k1": 6, "k2": 4, "split": 0.5}),
    ("tprr:6,4,0.5,2", {"kind": "tprr", "k1": 6, "k2": 4, "split": 0.5, "force_last": 2}),
    ("round-robin:3", {"kind": "round-robin", "interval": 3}),
    (" tprr: k1=6, k2=4, split=0.5 ", {"kind": "tprr", "k1": 6, "k2": 4, "split": 0.5}),
])
def test_parse_schedule_spec(text, want):
    assert parse_schedule_spec(text) == want
    PredictorTrainConfig(num_steps=50, rollout=5, schedule=parse_schedule_spec(text))  # and it is a valid schedule


@pytest.mark.parametrize("text, match", [
    ("tprr", "gives no parameters"),
    ("fancy:1,2", "unknown kind 'fancy'"),
    ("tprr:6,x,0.5", "k2='x' is not a number"),
    ("round-robin:3,0,1", "takes at most 2 values"),
    ("tprr:6,k1=4", "sets 'k1' twice"),
    ("percentile:5", "needs step_importance"),
])
def test_parse_schedule_spec_refuses_bad_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule_spec(text)


def test_cli_rollout_options(tmp_path, capsys):
    from tclab.cli import main

    folder = tmp_path / "tiny-model"
    tiny_transformer(3, 3).save_pretrained(folder)
    out = tmp_path / "p.safetensors"
    rc = main(["train-predictor", "--model", str(folder), "--steps", "2", "--num-steps", "6", "--num-samples", "1",
               "--eval-pairs", "0", "--batch-size", "2", "--rollout", "2", "--schedule", "tprr:3,2,0.5",
               "--out", str(out)])
    assert rc == 0
    meta = read_predictor_meta(out)["train"]
    assert meta["rollout"] == 2 and meta["schedule"] == {"kind": "tprr", "k1": 3, "k2": 2, "split": 0.5}
    with pytest.raises(SystemExit) as e:
        main(["train-predictor", "--model", str(folder), "--rollout", "2", "--schedule", "tprr:3,two,0.5"])
    assert e.value.code == 2 and "k2='two' is not a number" in capsys.readouterr().err
    rc = main(["train-predictor", "--model", str(folder), "--num-steps", "6", "--schedule", "tprr:3,2,0.5",
               "--out", str(out)])
    assert rc == 2 and "set rollout >= 1" in capsys.readouterr().err
