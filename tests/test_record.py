"""tclab.record: hand-computable toy DiT, parity with a naive reference, hooks contract, CFG halves,
sampler chunking, DiTPipeline fallback, persistence."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tclab.models import NULL_CLASS
from tclab.record import MEASURES, TokenChangeRecord, record_token_changes
from tclab.sampling import SampleConfig, sample
from tclab.steps import StepContext
from tclab.steps import running as _running

THETA = math.pi / 3  # the toy's update direction turns by THETA per step (cond) or 2*THETA (uncond)


# ---- a toy DiT whose measures are known in closed form ----------------------------------------

class ToyBlock(torch.nn.Module):
    """Block l adds u = (l+1) * (s+1) * c * d(s), with s = (1000 - t) / 100, c = (token+1) * (row+1) and
    d(s) = (cos(k s THETA), sin(k s THETA), 0): k = 1 for conditional rows, 2 for null-label rows."""

    def __init__(self, l: int):
        super().__init__()
        self.l = l

    def forward(self, hidden_states, timestep=None, class_labels=None, **kwargs):
        r, n, _ = hidden_states.shape  # (R, N, 3)
        s = (1000 - float(timestep.reshape(-1)[0])) / 100
        k = torch.where(class_labels == NULL_CLASS, 2.0, 1.0)[:, None]  # (R, 1)
        c = (torch.arange(n) + 1.0)[None, :] * (torch.arange(r) + 1.0)[:, None]  # (R, N)
        d = torch.stack([torch.cos(k * s * THETA), torch.sin(k * s * THETA), torch.zeros_like(k)], -1)  # (R, 1, 3)
        return hidden_states + (self.l + 1) * (s + 1) * c[..., None] * d


class ToyDiT(torch.nn.Module):
    """Token input (R, N, 3) straight into the blocks; a 2 x 3 token grid (non-square on purpose)."""

    def __init__(self, layers: int = 3, copy_before=frozenset(), shift=0.0):
        super().__init__()
        self.config = SimpleNamespace(sample_size=(2, 3), patch_size=1)
        self.transformer_blocks = torch.nn.ModuleList(ToyBlock(l) for l in range(layers))
        # these blocks get a copy (plus `shift`): their input is not the last block's output object
        self.copy_before, self.shift = copy_before, shift

    def forward(self, hidden_states, timestep=None, class_labels=None):
        x = hidden_states
        copy = self.copy_before(float(timestep[0])) if callable(self.copy_before) else self.copy_before
        for l, block in enumerate(self.transformer_blocks):
            x = block(x + self.shift if l in copy else x, timestep=timestep, class_labels=class_labels)
        return SimpleNamespace(sample=x)


def run_toy(model, labels, steps, t0=1000.0):
    """Drive the toy like a sampler without tclab's StepContext (the recorder's fallback path)."""
    labels = torch.tensor(labels)
    x0 = torch.zeros(len(labels), 6, 3)
    x0[..., 2] = 1.0  # x_0 = e3 for every token: orthogonal to every update
    for s in range(steps):
        model(x0, timestep=torch.full((len(labels),), t0 - 100 * s), class_labels=labels)


def expected_toy(s, l, row, token, k):
    """Closed forms for the toy (eps neglected: every denominator is >= 1)."""
    c = (token + 1) * (row + 1)
    kin, kout = l * (l + 1) / 2, (l + 1) * (l + 2) / 2  # x_l = e3 + kin*(s+1)*c*d(s); x_{l+1} likewise with kout
    ratio = (l + 1) * (s + 1) * c / math.sqrt(1 + (kin * (s + 1) * c) ** 2)
    if s == 0:
        return dict(update_ratio=ratio, out_change=math.nan, update_change=math.nan, cos=math.nan)
    q = math.sqrt((s + 1) ** 2 + s ** 2 - 2 * s * (s + 1) * math.cos(k * THETA))  # ||(s+1) d(s) - s d(s-1)||
    return dict(update_ratio=ratio, update_change=q / s, cos=math.cos(k * THETA),
                out_change=kout * c * q / math.sqrt(1 + (kout * s * c) ** 2))


def check_toy_values(rec, rows, steps, layers=3):
    for r, (row_in_call, k) in rows.items():
        for s in range(steps):
            for l in range(layers):
                for i in range(6):
                    exp = expected_toy(s, l, row_in_call, i, k)
                    for m in MEASURES:
                        got = float(rec.measure(m)[s, l, r, i])
                        if math.isnan(exp[m]):
                            assert math.isnan(got), (m, s, l, r, i)
                        else:
                            assert got == pytest.approx(exp[m], rel=2e-5, abs=1e-6), (m, s, l, r, i)


def test_toy_measures_match_hand_computation_with_cfg_halves_apart():
    toy = ToyDiT()
    with record_token_changes(toy) as rec:
        run_toy(toy, [3, 5, NULL_CLASS, NULL_CLASS], steps=4)
    record = rec.record
    assert record.out_change.shape == (4, 3, 4, 6) and record.grid == (2, 3)
    np.testing.assert_array_equal(record.steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(record.timesteps, [1000.0, 900.0, 800.0, 700.0])
    assert record.step_source == "forward-count"
    # CFG detected from the labels: rows [cond 0, cond 1, uncond 0, uncond 1], twins share id and class
    assert record.branch.tolist() == ["cond", "cond", "uncond", "uncond"]
    assert record.sample_id.tolist() == [0, 1, 0, 1] and record.class_labels.tolist() == [3, 5, 3, 5]
    check_toy_values(record, {0: (0, 1), 1: (1, 1), 2: (2, 2), 3: (3, 2)}, steps=4)
    # the halves turn differently (cos 0.5 vs -0.5) and each lands in its own place
    np.testing.assert_allclose(record.select("cos", "cond")[1:], 0.5, rtol=1e-5)
    np.testing.assert_allclose(record.select("cos", "uncond")[1:], -0.5, rtol=1e-5)
    np.testing.assert_allclose(record.mean_over("cos", branch="uncond")[1:], -0.5, rtol=1e-5)
    assert np.isnan(record.mean_over("cos")[0]).all()
    assert set(record.to_frame(branch="uncond").branch) == {"uncond"}


def test_sampler_context_batches_are_appended_and_reset():
    """Inside tclab's sampler the StepContext drives steps; a new run_id is a new batch."""
    toy = ToyDiT()
    x0 = torch.zeros(4, 6, 3)
    x0[..., 2] = 1.0
    labels = torch.tensor([3, 5, NULL_CLASS, NULL_CLASS])
    with record_token_changes(toy, model_identity={"name": "toy"}) as rec:
        for run_id in (101, 102):
            for s in range(3):
                t = 1000.0 - 100 * s
                with _running(StepContext(step=s, t=t, num_steps=3, cfg=True, batch=2, run_id=run_id)):
                    toy(x0, timestep=torch.full((4,), t), class_labels=labels)
    record = rec.record
    assert record.step_source == "sampler" and record.num_rows == 8
    assert record.sample_id.tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert record.branch.tolist() == ["cond", "cond", "uncond", "uncond"] * 2
    # each batch restarts at step 0 (NaN change measures) and its values are its own
    assert np.isnan(record.out_change[0]).all() and np.isfinite(record.out_change[1:]).all()
    rows = {r: (r % 4, 1 if r % 4 < 2 else 2) for r in range(8)}
    check_toy_values(record, rows, steps=3)
    np.testing.assert_array_equal(record.rows("cond"), [0, 1, 4, 5])


def test_fallback_starts_a_new_batch_when_t_goes_up():
    toy = ToyDiT()
    with record_token_changes(toy) as rec:
        run_toy(toy, [1, 2], steps=3)
        run_toy(toy, [1, 2], steps=3)
    record = rec.record
    assert record.num_rows == 4 and record.sample_id.tolist() == [0, 1, 2, 3]
    assert record.branch.tolist() == ["cond"] * 4  # no null labels: no CFG
    check_toy_values(record, {0: (0, 1), 1: (1, 1), 2: (0, 1), 3: (1, 1)}, steps=3)
    with pytest.raises(ValueError, match="no 'uncond' rows"):
        record.select("cos", "uncond")


@pytest.mark.parametrize("copy_before", [{0, 1, 2}, {1}, lambda t: {2} if t % 200 else set()],
                         ids=["all", "one", "alternating-steps"])
def test_unchained_blocks_and_long_fallback_runs_are_exact(copy_before):
    """Inputs that are copies (not the previous block's output object) take the general path; a
    fallback run longer than the initial buffer grows it."""
    toy = ToyDiT(copy_before=copy_before)
    with record_token_changes(toy) as rec:
        run_toy(toy, [3, NULL_CLASS], steps=20)
    record = rec.record
    assert record.num_steps == 20 and record.branch.tolist() == ["cond", "uncond"]
    check_toy_values(record, {0: (0, 1), 1: (1, 2)}, steps=20)


def test_inputs_changed_between_blocks_match_naive_reference():
    """Something between blocks changes the hidden states at some steps only: the recorder must not
    take block l-1's step difference for block l's input difference."""
    toy = ToyDiT(copy_before=lambda t: {1, 2} if t % 200 else {2}, shift=0.5)
    calls, handles = capture_blocks(toy)
    with record_token_changes(toy) as rec:
        run_toy(toy, [3, NULL_CLASS], steps=5)
    for h in handles:
        h.remove()
    ref = reference_measures([[i for i, _ in c] for c in calls], [[o for _, o in c] for c in calls], 1e-6)
    for m in MEASURES:
        np.testing.assert_allclose(rec.record.measure(m), ref[m], rtol=1e-5, atol=1e-6, err_msg=m)


def test_record_only_after_the_block_but_snapshot_inside():
    toy = ToyDiT()
    with record_token_changes(toy) as rec:
        with pytest.raises(RuntimeError, match="nothing was recorded"):
            rec.result()
        run_toy(toy, [1], steps=2)
        with pytest.raises(RuntimeError, match="only after"):
            rec.record
        snap = rec.result()
        run_toy(toy, [1], steps=2)
    assert snap.num_rows == 1 and rec.record.num_rows == 2
    assert snap == TokenChangeRecord(**{f: getattr(rec.record, f) for f in ("grid", "eps", "step_source",
                                                                            "model_identity", "data_identity")},
                                     **{m: rec.record.measure(m)[:, :, :1] for m in MEASURES},
                                     steps=rec.record.steps, timesteps=rec.record.timesteps,
                                     class_labels=[1], branch=["cond"], sample_id=[0])


def test_batches_with_different_timesteps_are_refused_and_hooks_still_removed():
    toy = ToyDiT()
    before = hook_state(toy)
    with pytest.raises(ValueError, match="step 0 ran at t=950"):
        with record_token_changes(toy):
            run_toy(toy, [1], steps=2)
            run_toy(toy, [1], steps=2, t0=950.0)
    assert hook_state(toy) == before


# ---- hooks contract ---------------------------------------------------------------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def hook_state(model):
    return [(name, d, tuple(getattr(m, d).keys())) for name, m in model.named_modules() for d in HOOK_DICTS]


def test_hooks_removed_after_context_and_after_exception(pixel_dit):
    tr = pixel_dit.transformer
    x = torch.randn(2, 3, 8, 8)
    kw = dict(timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2]))
    before, out0 = hook_state(tr), tr(x, **kw).sample
    with record_token_changes(tr) as rec:
        assert hook_state(tr) != before  # attached
        out1 = tr(x, **kw).sample
    assert hook_state(tr) == before
    assert rec.record.num_steps == 1
    with pytest.raises(KeyError, match="boom"):
        with record_token_changes(tr):
            tr(x, **kw)
            raise KeyError("boom")
    assert hook_state(tr) == before
    out2 = tr(x, **kw).sample
    assert torch.equal(out0, out1) and torch.equal(out0, out2)  # recording never changes outputs


def test_recording_does_not_change_samples(pixel_dit):
    cfg = SampleConfig(num_steps=3, guidance_scale=2.0, batch_size=2)
    plain = sample(pixel_dit, [0, 1, 2], cfg, progress=False)
    with record_token_changes(pixel_dit.transformer):
        rec = sample(pixel_dit, [0, 1, 2], cfg, progress=False)
    assert torch.equal(plain.images, rec.images)


def test_not_a_dit_is_refused_with_what_was_found():
    with pytest.raises(TypeError, match=r"Sequential is not a DiT: it has no `transformer_blocks` .*\['0'\]"):
        with record_token_changes(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass

    class TupleBlock(torch.nn.Module):
        def forward(self, hidden_states, **kw):
            return hidden_states, None

    toy = ToyDiT(layers=1)
    toy.transformer_blocks = torch.nn.ModuleList([TupleBlock()])
    with pytest.raises(TypeError, match=r"block 0 \(TupleBlock\) mapped hidden_states .* to tuple"):
        with record_token_changes(toy):
            run_toy(toy, [1], steps=1)
    toy.transformer_blocks = torch.nn.ModuleList()
    with pytest.raises(TypeError, match="non-empty"):
        record_token_changes(toy).__enter__()


# ---- on real diffusers DiTs -------------------------------------------------------------------

def reference_measures(ins, outs, eps):
    """Naive definitions on full per-step tensors: ins/outs are [step][block] -> (R, N, C)."""
    s_n, l_n = len(ins), len(ins[0])
    r, n, _ = ins[0][0].shape
    ref = {m: np.full((s_n, l_n, r, n), np.nan) for m in MEASURES}
    for s in range(s_n):
        for l in range(l_n):
            u = outs[s][l] - ins[s][l]
            ref["update_ratio"][s, l] = (u.norm(dim=-1) / (ins[s][l].norm(dim=-1) + eps)).numpy()
            if s:
                u_p, x_p = outs[s - 1][l] - ins[s - 1][l], outs[s - 1][l]
                ref["out_change"][s, l] = ((outs[s][l] - x_p).norm(dim=-1) / (x_p.norm(dim=-1) + eps)).numpy()
                ref["update_change"][s, l] = ((u - u_p).norm(dim=-1) / (u_p.norm(dim=-1) + eps)).numpy()
                ref["cos"][s, l] = F.cosine_similarity(u, u_p, dim=-1, eps=eps).numpy()
    return ref


def capture_blocks(transformer):
    """Plain hooks that keep every block input/output (the reference the recorder must match)."""
    calls = []
    handles = [transformer.register_forward_pre_hook(lambda m, a: calls.append([]))]
    for block in transformer.transformer_blocks:
        handles.append(block.register_forward_hook(
            lambda m, a, o: calls[-1].append((a[0].detach().clone(), o.detach().clone()))))
    return calls, handles


def test_sampler_with_chunking_matches_naive_reference(pixel_dit):
    tr = pixel_dit.transformer
    labels, steps = [0, 1, 2, 0, 1], 4
    calls, handles = capture_blocks(tr)
    try:
        with record_token_changes(tr, model_identity=pixel_dit.identity(), data_identity={"set": "none"}) as rec:
            res = sample(pixel_dit, labels, SampleConfig(num_steps=steps, guidance_scale=2.0, batch_size=2),
                         progress=False)
    finally:
        for h in handles:
            h.remove()
    record = rec.record
    assert record.grid == pixel_dit.token_grid == (4, 4)
    assert record.num_steps == steps and len(calls) == 3 * steps  # 3 chunks (2 + 2 + 1 samples)
    np.testing.assert_array_equal(record.timesteps, res.timesteps)
    assert record.num_rows == 2 * len(labels) and record.model_identity["name"] == "tiny-pixel"
    cond = record.rows("cond")
    assert record.class_labels[cond].tolist() == labels and record.sample_id[cond].tolist() == [0, 1, 2, 3, 4]
    r0 = 0
    for chunk in range(3):
        group = calls[chunk * steps:(chunk + 1) * steps]
        ref = reference_measures([[i for i, _ in c] for c in group], [[o for _, o in c] for c in group], record.eps)
        rows = ref["cos"].shape[2]
        for m in MEASURES:
            np.testing.assert_allclose(record.measure(m)[:, :, r0:r0 + rows], ref[m], rtol=1e-4, atol=2e-6,
                                       err_msg=f"{m} chunk {chunk}")
        r0 += rows
    assert r0 == record.num_rows


def test_dit_pipeline_fallback_matches_sampler(latent_dit):
    labels, steps = [3, 7, 1], 5
    pipe = latent_dit.pipeline()
    pipe.set_progress_bar_config(disable=True)
    with record_token_changes(latent_dit.transformer) as rec_pipe:
        for _ in range(2):  # the second call starts again at high t: a new batch, appended
            pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(5))
    with record_token_changes(latent_dit.transformer) as rec_ours:
        res = sample(latent_dit, labels, SampleConfig(num_steps=steps, guidance_scale=4.0, seed=5), progress=False)
    a, b = rec_pipe.record, rec_ours.record
    assert a.step_source == "forward-count" and b.step_source == "sampler"
    np.testing.assert_array_equal(a.steps, np.arange(steps))
    np.testing.assert_array_equal(a.timesteps, res.timesteps)
    np.testing.assert_array_equal(a.timesteps, pipe.scheduler.timesteps.numpy())
    assert a.num_rows == 12  # two pipeline calls, each [3 cond; 3 uncond]
    assert a.branch.tolist() == (["cond"] * 3 + ["uncond"] * 3) * 2
    assert a.class_labels.tolist() == labels * 4 and a.sample_id.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    for m in MEASURES:  # the pipeline feeds the transformer the same tensors as tclab's sampler
        np.testing.assert_allclose(a.measure(m)[:, :, :6], b.measure(m), rtol=1e-6, atol=1e-7, err_msg=m)
        np.testing.assert_allclose(a.measure(m)[:, :, 6:], b.measure(m), rtol=1e-6, atol=1e-7, err_msg=m)


# ---- the record object ------------------------------------------------------------------------

@pytest.fixture
def toy_record():
    toy = ToyDiT()
    with record_token_changes(toy, model_identity={"name": "toy", "grid": (2, 3)},
                              data_identity={"images": None, "n": 4}) as rec:
        run_toy(toy, [3, 5, NULL_CLASS, NULL_CLASS], steps=3)
    return rec.record


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    toy = ToyDiT()
    with record_token_changes(toy, model_identity={"name": "toy", "grid": (2, 3)}, data_identity={"n": 4},
                              storage_dtype=dtype) as rec:
        run_toy(toy, [3, 5, NULL_CLASS, NULL_CLASS], steps=3)
    record = rec.record
    assert record.out_change.dtype == (np.float16 if dtype == torch.float16 else np.float32)
    assert record.model_identity == {"name": "toy", "grid": [2, 3]}  # normalised as JSON gives it back
    path = record.save(tmp_path / "sub" / "changes.tcr")
    assert path.name == "changes.tcr" and not list(tmp_path.glob("sub/*.tmp"))
    back = TokenChangeRecord.load(path)
    assert back == record
    for name in (*MEASURES, "steps", "timesteps", "class_labels", "branch", "sample_id"):
        assert getattr(back, name).dtype == getattr(record, name).dtype
    assert (back.grid, back.eps, back.step_source) == (record.grid, record.eps, record.step_source)
    back.cos[2, 1, 0, 3] += 0.25  # equality is not vacuous
    assert back != record


def test_float16_storage_close_to_float32(toy_record):
    toy = ToyDiT()
    with record_token_changes(toy, storage_dtype=torch.float16) as rec:
        run_toy(toy, [3, 5, NULL_CLASS, NULL_CLASS], steps=3)
    for m in MEASURES:
        np.testing.assert_allclose(rec.record.measure(m).astype(np.float32), toy_record.measure(m), rtol=1e-3)


def test_to_frame_is_tidy_and_consistent(toy_record):
    rec = toy_record
    df = rec.to_frame()
    assert list(df.columns) == ["step", "t", "block", "sample", "branch", "class_label", "token", "token_row",
                                "token_col", *MEASURES]
    assert len(df) == 3 * 3 * 2 * 6 and set(df.branch) == {"cond"}
    row = df[(df.step == 2) & (df.block == 1) & (df["sample"] == 1) & (df.token == 4)].iloc[0]
    assert row.t == 800.0 and row.class_label == 5 and (row.token_row, row.token_col) == (1, 1)
    assert row.cos == rec.cos[2, 1, 1, 4] and row.out_change == rec.out_change[2, 1, 1, 4]
    assert rec.token_map("out_change", 2, 1, sample=1)[1, 1] == row.out_change
    both = rec.to_frame(["cos"], branch=None)
    assert len(both) == 2 * len(df) and list(both.columns)[-1] == "cos"
    uncond = both[both.branch == "uncond"]
    np.testing.assert_allclose(uncond[uncond.step > 0].cos, -0.5, rtol=1e-5)
    assert uncond.class_label.isin([3, 5]).all()  # twins carry the asked class


def test_reductions_and_maps(toy_record):
    rec = toy_record
    m = rec.mean_over("update_change")
    assert m.shape == (rec.num_steps, rec.num_blocks) and np.isnan(m[0]).all()
    # update_change of the toy does not depend on block, token or sample: sqrt(3) at step 1, sqrt(7)/2 at step 2
    np.testing.assert_allclose(m[1:], [[math.sqrt(3)] * 3, [math.sqrt(7) / 2] * 3], rtol=1e-5)
    per_block = rec.mean_over("update_ratio", axes=("step", "sample", "token"))
    assert per_block.shape == (3,)
    q = rec.quantile_over("update_ratio", [0.1, 0.9])
    assert q.shape == (2, 3, 3) and (q[0] <= q[1]).all()
    tm = rec.token_map("update_ratio", step=1, block=0, sample=1, branch="uncond")
    assert tm.shape == (2, 3)
    np.testing.assert_array_equal(tm.ravel(), rec.update_ratio[1, 0, rec.row_of(1, "uncond")])
    with pytest.raises(ValueError, match="pass a step index, not a timestep value"):
        rec.token_map("cos", step=800, block=0)
    with pytest.raises(ValueError, match="unknown measure"):
        rec.mean_over("speed")


def test_bfloat16_model_is_measured_with_float32_norms(pixel_dit):
    """Half-precision models: differences are taken in the model's dtype, norms accumulate in float32."""
    tr = pixel_dit.transformer.to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    calls, handles = capture_blocks(tr)
    with record_token_changes(tr) as rec:
        for t in (700, 600, 500):
            tr(x * t / 700, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 2]))
    for h in handles:
        h.remove()
    ref = reference_measures([[i.float() for i, _ in c] for c in calls], [[o.float() for _, o in c] for c in calls],
                             1e-6)
    assert rec.record.out_change.dtype == np.float32
    for m in MEASURES:
        np.testing.assert_allclose(rec.record.measure(m), ref[m], rtol=2e-2, atol=2e-3, err_msg=m)
