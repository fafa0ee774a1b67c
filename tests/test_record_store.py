"""tclab.record_store: a token-change record streamed to a chunked folder and read back lazily.

What must hold: a streamed record reads back equal (``==``) to the in-memory one; ranks writing into one
folder, or folders merged, give the record of one run; a selection is the same slice of the whole;
``mean_over`` streamed over chunks equals the in-memory mean; a half-written file is never read; and
every broken store is refused with a message naming the file and the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from tclab.models import load_dit
from tclab.record import (MEASURES, RecordStoreWriter, TokenChangeRecord, merge_record_stores, open_record,
                          record_token_changes)
from tclab import record_store
from tclab.record_store import StoreError
from tclab.sampling import SampleConfig, sample

CFG = SampleConfig(num_steps=4, guidance_scale=2.0, batch_size=2)


@pytest.fixture(scope="module")
def embedded():
    """The embedded shapes-dit (6 blocks, 16 x 16 tokens): the model the redundancy notebooks record."""
    return load_dit()


def record_in_memory(model, parts, config=CFG, **kw):
    """One recording of several ``sample`` calls, ``parts`` = [(labels, seed), ...], held in RAM."""
    with record_token_changes(model.transformer, model_identity=model.identity(), **kw) as rec:
        for labels, seed in parts:
            sample(model, labels, replace(config, seed=seed), progress=False)
    return rec.record


def record_streamed(model, parts, folder, rank=0, sample_offset=0, config=CFG, **kw):
    with record_token_changes(model.transformer, model_identity=model.identity(), stream_to=folder, rank=rank,
                              sample_offset=sample_offset, **kw) as rec:
        for labels, seed in parts:
            sample(model, labels, replace(config, seed=seed), progress=False)
    return rec


# ---- streaming equals the in-memory record ----------------------------------------------------

def test_streamed_record_equals_in_memory_record_on_the_embedded_model(embedded, tmp_path):
    parts = [([0, 3, 5], 7)]  # 3 samples in batches of 2 + 1, CFG: rows [c0 c1 u0 u1], [c2 u2]
    ram = record_in_memory(embedded, parts)
    rec = record_streamed(embedded, parts, tmp_path / "store")
    assert [p.name for p in rec.written] == ["rank00000-chunk000000.json", "rank00000-chunk000001.json"]
    with pytest.raises(RuntimeError, match="streamed its batches to .*open_record"):
        rec.record
    store = rec.store
    assert (store.num_samples, store.num_rows, store.num_steps, store.num_blocks) == (3, 6, 4, 6)
    assert store.grid == (16, 16) and store.model_identity == ram.model_identity
    back = store.select()
    assert back == ram  # values, dtypes, rows, timesteps, identities, step source: all exact
    assert store.loaded_nbytes == ram.nbytes and store.nbytes > ram.nbytes  # + headers, manifests, metadata
    np.testing.assert_allclose(store.mean_over("update_change"), ram.mean_over("update_change"), rtol=1e-12)
    back.cos[1, 2, 0, 5] += 0.5  # the equality above is not vacuous
    assert back != ram


def test_float16_streaming_and_sample_offset(pixel_dit, tmp_path):
    parts = [([0, 1, 2], 3)]
    ram = record_in_memory(pixel_dit, parts, storage_dtype=torch.float16, sample_offset=10)
    assert ram.sample_id.tolist() == [10, 11, 10, 11, 12, 12] and ram.out_change.dtype == np.float16
    store = record_streamed(pixel_dit, parts, tmp_path / "s", sample_offset=10, storage_dtype=torch.float16).store
    assert store.dtype == np.float16 and store.select() == ram


def test_a_batch_cut_short_by_an_exception_is_not_streamed(pixel_dit, tmp_path):
    def stop_at_second_batch(ctx, latents):
        if first.setdefault("run", ctx.run_id) != ctx.run_id and ctx.step == 1:
            raise KeyboardInterrupt("stopped")

    first = {}
    with pytest.raises(KeyboardInterrupt):
        with record_token_changes(pixel_dit.transformer, stream_to=tmp_path / "s") as rec:
            sample(pixel_dit, [0, 1, 2, 0], CFG, progress=False, on_step=stop_at_second_batch)
    store = open_record(tmp_path / "s")
    assert len(rec.written) == 1 and sorted(set(store.sample_id.tolist())) == [0, 1]  # batch 2 is not there


# ---- several ranks, several folders -----------------------------------------------------------

PARTS = [([0, 1], 1), ([2, 0, 1], 2)]  # two sample calls: rank 0 records the first, rank 1 the second


def test_two_ranks_in_one_folder_read_back_as_one_run(pixel_dit, tmp_path):
    one_run = record_in_memory(pixel_dit, PARTS)
    folder = tmp_path / "shared"
    record_streamed(pixel_dit, PARTS[1:], folder, rank=1, sample_offset=2)  # the later samples finish first
    record_streamed(pixel_dit, PARTS[:1], folder, rank=0, sample_offset=0)
    store = open_record(folder)
    assert store.ranks == [0, 1] and len(store.chunks) == 3
    assert [c.rank for c in store.chunks] == [0, 1, 1]  # sorted by first sample, not by rank or write time
    assert store.select() == one_run


def test_merging_folders_links_chunks_and_equals_one_run(pixel_dit, tmp_path):
    one_run = record_in_memory(pixel_dit, PARTS)
    record_streamed(pixel_dit, PARTS[:1], tmp_path / "a")
    record_streamed(pixel_dit, PARTS[1:], tmp_path / "b", sample_offset=2)
    merged = merge_record_stores([tmp_path / "b", tmp_path / "a"], tmp_path / "all")
    assert merged.select() == one_run
    assert all(os.stat(c.data).st_nlink == 2 for c in merged.chunks)  # hard links: no bytes copied
    assert open_record(tmp_path / "a").num_samples == 2  # the sources still read
    copied = merge_record_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "copy", mode="copy")
    assert copied.select() == one_run and all(os.stat(c.data).st_nlink == 1 for c in copied.chunks)
    moved = merge_record_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "moved", mode="move")
    assert moved.select() == one_run and not list((tmp_path / "a").iterdir())
    with pytest.raises(StoreError, match="not an empty folder; merge into a new folder"):
        merge_record_stores([tmp_path / "all"], tmp_path / "copy")
    with pytest.raises(StoreError, match="claimed by two chunks"):
        merge_record_stores([tmp_path / "all", tmp_path / "copy"], tmp_path / "twice")


def test_a_resumed_rank_numbers_its_chunks_after_the_existing_ones(pixel_dit, tmp_path):
    record_streamed(pixel_dit, PARTS[:1], tmp_path / "s")
    rec = record_streamed(pixel_dit, PARTS[1:], tmp_path / "s", sample_offset=2)
    assert [p.stem for p in rec.written] == ["rank00000-chunk000001", "rank00000-chunk000002"]
    assert open_record(tmp_path / "s").select() == record_in_memory(pixel_dit, PARTS)


# ---- lazy reading -----------------------------------------------------------------------------

@pytest.fixture
def stored(pixel_dit, tmp_path):
    """(the in-memory record, the store) of the same 5 samples, 4 steps, CFG, 3 chunks."""
    return record_in_memory(pixel_dit, PARTS), record_streamed(pixel_dit, PARTS, tmp_path / "s").store


def test_selection_by_step_block_and_sample_is_the_slice_of_the_whole(stored):
    ram, store = stored
    part = store.select(steps=[1, 3], blocks=-1, samples=[0, 3], branch="cond")
    rows = [r for r in range(ram.num_rows) if ram.branch[r] == "cond" and ram.sample_id[r] in (0, 3)]
    for m in MEASURES:
        np.testing.assert_array_equal(part.measure(m), ram.measure(m)[[1, 3]][:, [1]][:, :, rows])
    np.testing.assert_array_equal(part.steps, [1, 3])
    np.testing.assert_array_equal(part.timesteps, ram.timesteps[[1, 3]])
    assert part.sample_id.tolist() == [0, 3] and part.branch.tolist() == ["cond", "cond"]
    # every analysis of a TokenChangeRecord works on the selection
    np.testing.assert_array_equal(part.mean_over("cos", axes="token")[:, 0], ram.mean_over("cos", axes="token")[[1, 3], 1][:, [0, 3]])
    uncond = store.select(samples=slice(2, 5), branch="uncond")
    assert uncond.sample_id.tolist() == [2, 3, 4] and uncond.num_steps == 4
    np.testing.assert_array_equal(uncond.update_ratio, ram.select("update_ratio", "uncond")[:, :, 2:])


def test_to_frame_of_a_selection_carries_the_real_step_and_block(stored):
    ram, store = stored
    frame = store.to_frame(["cos", "out_change"], steps=slice(2, 4), blocks=[1], samples=[4])
    want = ram.to_frame(["cos", "out_change"])
    want = want[(want.step >= 2) & (want.block == 1) & (want["sample"] == 4)].reset_index(drop=True)
    assert len(frame) == 2 * 16 and sorted(set(frame.block)) == [1] and sorted(set(frame.step)) == [2, 3]
    assert frame.equals(want)


@pytest.mark.parametrize("axes", [("sample", "token"), ("step", "sample", "token"), "token", ("sample",),
                                  ("step", "block", "sample", "token")])
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_streamed_mean_over_equals_the_in_memory_mean(stored, axes, branch):
    ram, store = stored
    for m in ("cos", "update_ratio"):
        want = ram.mean_over(m, axes=axes, branch=branch)
        got = store.mean_over(m, axes=axes, branch=branch)
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, equal_nan=True, err_msg=f"{m} {axes}")
    np.testing.assert_allclose(store.mean_over("cos", blocks=[0], steps=[1, 2]), ram.mean_over("cos")[[1, 2]][:, [0]])


def write_synthetic(folder, rank, ids, steps, rng, nan_share=0.2, **kw):
    """A chunk of random values (some NaN) for samples ``ids`` with CFG rows; returns the values."""
    rows = 2 * len(ids)
    v = rng.random((4, steps, 3, rows, 6), dtype=np.float32)
    v[rng.random(v.shape) < nan_share] = np.nan
    w = RecordStoreWriter(folder, rank, grid=(2, 3), num_blocks=3, **kw)
    w.write_chunk(v, sample_id=list(ids) * 2, branch=["cond"] * len(ids) + ["uncond"] * len(ids),
                  class_labels=[7] * rows, timesteps=[900.0, 800.0, 700.0, 600.0][:steps])
    return v


def test_mean_over_with_chunks_of_unequal_length_and_scattered_nans(tmp_path):
    """Chunks of 4 and 2 steps (a short batch is NaN after its end), written out of sample order."""
    rng = np.random.default_rng(0)
    a = write_synthetic(tmp_path, 1, [2, 3, 4], 2, rng)
    b = write_synthetic(tmp_path, 0, [0, 1], 4, rng)
    store = open_record(tmp_path)
    whole = np.full((4, 4, 3, 10, 6), np.nan, np.float32)  # rows: chunk of ids 0,1 first, then 2,3,4
    whole[:, :, :, :4], whole[:, :2, :, 4:] = b, a
    ram = TokenChangeRecord(**{m: whole[k] for k, m in enumerate(MEASURES)}, steps=np.arange(4),
                            timesteps=[900.0, 800.0, 700.0, 600.0], grid=(2, 3), class_labels=[7] * 10,
                            branch=["cond"] * 2 + ["uncond"] * 2 + ["cond"] * 3 + ["uncond"] * 3,
                            sample_id=[0, 1, 0, 1, 2, 3, 4, 2, 3, 4], step_source="sampler")
    assert store.select() == ram
    for axes in (("sample", "token"), "token", ("step", "token")):
        for branch in ("cond", "uncond"):
            np.testing.assert_allclose(store.mean_over("out_change", axes, branch),
                                       ram.mean_over("out_change", axes, branch), rtol=1e-12, equal_nan=True)


# ---- atomicity --------------------------------------------------------------------------------

def test_leftovers_of_a_killed_writer_are_reported_and_never_read(stored):
    ram, store = stored
    folder = store.path
    (folder / ".rank00000-chunk000003.npy.4242.tmp").write_bytes(b"\x93NUMPY half a chunk")
    np.save(folder / "rank00000-chunk000004.npy", np.zeros((4, 4, 2, 2, 16), np.float32))  # data, no manifest
    with pytest.warns(UserWarning, match="ignoring 2 file.*not committed chunks.*never read"):
        again = open_record(folder)
    assert sorted(p.name for p in again.leftovers) == [".rank00000-chunk000003.npy.4242.tmp",
                                                       "rank00000-chunk000004.npy"]
    assert again.select() == ram and len(again.chunks) == 3


def test_a_write_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    write_synthetic(tmp_path, 0, [0], 2, rng)
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken_save(f, values):
        f.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_store, "_save_npy", broken_save)
    with pytest.raises(OSError, match="No space left"):
        write_synthetic(tmp_path, 0, [1], 2, rng)
    monkeypatch.undo()
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before  # no temporary file, no data without manifest (only the rank metadata was rewritten)
    assert open_record(tmp_path).sample_id.tolist() == [0, 0]


# ---- errors -----------------------------------------------------------------------------------

def test_a_missing_folder_or_one_that_is_no_store(pixel_dit, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no record store at .*nowhere.*stream_to="):
        open_record(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match=r"is not a token-change record store: it has no rankNNNNN.json .*notes.txt"):
        open_record(tmp_path)
    (tmp_path / "r.npz").write_bytes(b"")
    with pytest.raises(StoreError, match=r"r.npz is a file, .*TokenChangeRecord.load"):
        open_record(tmp_path / "r.npz")
    with pytest.raises(ValueError, match=r"rank=1 names this process's files .* needs stream_to=FOLDER"):
        record_token_changes(pixel_dit.transformer, rank=1).__enter__()
    RecordStoreWriter(tmp_path / "empty", 0, grid=(2, 3), num_blocks=3)  # a writer that has not finished a batch
    with pytest.raises(StoreError, match=r"empty holds no committed chunk yet"):
        open_record(tmp_path / "empty")


def test_the_store_is_readable_without_torch():
    code = "import sys, tclab.record_store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_incomplete_chunks_name_the_files_to_delete(tmp_path):
    rng = np.random.default_rng(2)
    write_synthetic(tmp_path, 0, [0, 1], 3, rng)
    write_synthetic(tmp_path, 0, [2], 3, rng)
    data = tmp_path / "rank00000-chunk000001.npy"
    data.write_bytes(data.read_bytes()[:-100])  # cut short (written by something that is not atomic)
    with pytest.raises(StoreError, match=r"incomplete chunk: .*chunk000001.npy holds .* bytes but its header "
                                         r"promises .*delete rank00000-chunk000001.json and .*samples 2..2 again"):
        open_record(tmp_path)
    data.unlink()
    with pytest.raises(StoreError, match=r"incomplete chunk: .*chunk000001.json names the data file "
                                         r"rank00000-chunk000001.npy, which is missing"):
        open_record(tmp_path)


def test_two_chunks_claiming_the_same_sample_are_refused(pixel_dit, tmp_path):
    record_streamed(pixel_dit, PARTS[:1], tmp_path, rank=0)
    record_streamed(pixel_dit, PARTS[:1], tmp_path, rank=1)  # forgot sample_offset
    with pytest.raises(StoreError, match=r"claimed by two chunks, e.g. sample 0 \(cond\) by rank00000-chunk000000 "
                                         r"\(samples 0..1\) and rank00001-chunk000000 .*sample_offset=lo"):
        open_record(tmp_path)


def test_ranks_of_different_recordings_and_bad_selections_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    write_synthetic(tmp_path, 0, [0], 2, rng)
    with pytest.raises(StoreError, match=r"rank00000.json .* come from different recordings \(dtype: 'float32' vs "
                                         r"'float16'\)"):
        RecordStoreWriter(tmp_path, 0, grid=(2, 3), num_blocks=3, dtype="float16")
    v = rng.random((4, 2, 3, 2, 6)).astype(np.float16)
    RecordStoreWriter(tmp_path, 1, grid=(2, 3), num_blocks=3, dtype="float16").write_chunk(
        v, [1, 1], ["cond", "uncond"], [0, 0], timesteps=[900.0, 800.0])
    with pytest.raises(StoreError, match=r"rank00000.json and rank00001.json come from different recordings"):
        open_record(tmp_path)
    (tmp_path / "rank00001.json").unlink()
    with pytest.raises(StoreError, match=r"has no rank metadata rank00001.json"):
        open_record(tmp_path)
    for p in tmp_path.glob("rank00001*"):
        p.unlink()
    store = open_record(tmp_path)
    with pytest.raises(ValueError, match=r"step\(s\) \[800\] out of range: .*0..1 \(pass step indices, not timestep"):
        store.select(steps=[800])
    with pytest.raises(ValueError, match=r"sample\(s\) \[9\] are not in .* ids 0..0"):
        store.select(samples=[9])
    with pytest.raises(ValueError, match="never mixed"):
        store.mean_over("cos", branch=None)
    with pytest.raises(StoreError, match=r"step 1 ran at t=850.0 .* and at t=800.0"):
        RecordStoreWriter(tmp_path, 0, grid=(2, 3), num_blocks=3).write_chunk(
            v.astype(np.float32), [1, 1], ["cond", "uncond"], [0, 0], timesteps=[900.0, 850.0])
