"""tclab.explore: the ipywidgets explorer redraws on every control, the kernel-free fragment keeps its DOM
contract, is self-contained, decodes back to the record's maps and stays inside its payload budget; the
images-beside-the-record rule and finding the newest run folder with a record."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tclab import explore
from tclab.record import MEASURES, TokenChangeRecord, record_token_changes
from tclab.sampling import SampleConfig, sample

S, L, GRID = 5, 3, (2, 3)  # a non-square grid on purpose: rows and columns must not be swapped


def synthetic_record(samples: int = 2, cfg: bool = True, steps: int = S, blocks: int = L) -> TokenChangeRecord:
    """Random but reproducible measures; the change measures are NaN at step 0, as recorded."""
    rng = np.random.default_rng(0)
    n = GRID[0] * GRID[1]
    rows = 2 * samples if cfg else samples
    arrays = {m: rng.uniform(0, 1, (steps, blocks, rows, n)).astype(np.float32) for m in MEASURES}
    arrays["cos"] = rng.uniform(-0.5, 1, (steps, blocks, rows, n)).astype(np.float32)
    arrays["out_change"][2, 0, 0, 0] = 50.0  # an outlier above the 99th percentile: clipped, not scaled to
    for m in ("out_change", "update_change", "cos"):
        arrays[m][0] = np.nan
    ids = np.arange(samples)
    return TokenChangeRecord(**arrays, steps=np.arange(steps), timesteps=np.linspace(800, 0, steps), grid=GRID,
                             class_labels=np.concatenate([ids, ids]) if cfg else ids,
                             branch=np.array(["cond"] * samples + ["uncond"] * samples if cfg else ["cond"] * samples),
                             sample_id=np.concatenate([ids, ids]) if cfg else ids,
                             model_identity={"name": "toy", "class_names": ["a", "b", "c"]})


@pytest.fixture
def rec() -> TokenChangeRecord:
    return synthetic_record()


@pytest.fixture
def images() -> np.ndarray:
    """One (3, 8, 12) image per sample id, in [-1, 1]: a horizontal ramp, so the overlay is visible."""
    ramp = np.linspace(-1, 1, 12, dtype=np.float32)
    return np.stack([np.broadcast_to(ramp * (1 - i), (3, 8, 12)) for i in range(2)]).copy()


# ---- the interactive widget ------------------------------------------------------------------------

def test_import_tclab_stays_cheap_and_never_imports_ipywidgets_until_a_widget_is_built():
    code = ("import sys, tclab\n"
            "assert 'ipywidgets' not in sys.modules and 'torch' not in sys.modules\n"
            "e = tclab.explore\n"
            "assert callable(e) and callable(e.static_explorer) and 'ipywidgets' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_widget_exposes_its_controls_and_views(rec, images):
    w = explore.explore(rec, images)
    assert isinstance(w, explore.TokenChangeExplorer)
    import ipywidgets

    assert isinstance(w, ipywidgets.Widget)
    assert (w.step.description, w.block.description, w.measure.description) == ("step", "block", "measure")
    assert (w.step.min, w.step.max, w.step.value) == (0, S - 1, 1)  # starts at the first step with a change
    assert (w.block.max, w.token_row.max, w.token_col.max) == (L - 1, GRID[0] - 1, GRID[1] - 1)
    assert list(w.measure.options) == list(MEASURES)
    assert list(w.branch.options) == ["cond", "uncond"]
    assert [v for _, v in w.sample.options] == [0, 1]
    assert w.map_image.value[:8] == b"\x89PNG\r\n\x1a\n" and w.token_plot.value and w.curve_plot.value
    np.testing.assert_array_equal(w.current_map(), rec.token_map("out_change", 1, 0, 0, "cond"))
    assert "step 1, t = 600" in w.readout.value and "block 0" in w.readout.value
    assert repr(w).startswith("Interactive token-change explorer") and len(repr(w)) < 400  # no trait dump in text/plain


def test_moving_a_control_redraws_the_views(rec, images):
    w = explore.explore(rec, images, token=(0, 0))
    map0, tok0, curve0 = w.map_image.value, w.token_plot.value, w.curve_plot.value
    w.step.value = 3
    assert w.map_image.value != map0 and w.curve_plot.value != curve0  # the new map; the step marker moved
    np.testing.assert_array_equal(w.current_map(), rec.token_map("out_change", 3, 0, 0))
    assert "step 3" in w.readout.value
    map1, tok1 = w.map_image.value, w.token_plot.value
    w.token_row.value = 1
    assert w.token_plot.value != tok1 and w.map_image.value != map1  # its history; the outline moved
    assert w.token == 1 * GRID[1] + 0
    tok2 = w.token_plot.value
    w.measure.value = "cos"
    assert w.token_plot.value != tok2 and set(w.scales) == {"out_change", "cos"}
    np.testing.assert_array_equal(w.current_map(), rec.token_map("cos", 3, 0, 0))
    w.branch.value = "uncond"
    np.testing.assert_array_equal(w.current_map(), rec.token_map("cos", 3, 0, 0, "uncond"))
    before = w.map_image.value
    w.sample.value = 1
    assert w.map_image.value != before


def test_widget_without_images_draws_the_map_alone_and_uses_one_scale_per_measure(rec):
    w = explore.explore(rec)
    assert w.images is None and w.opacity.disabled
    lo, hi = w.scale("out_change")
    assert lo == 0 and hi < 50  # the 50.0 outlier is clipped, not the top of the scale
    assert (lo, hi) == explore.colour_scale(rec, "out_change")
    assert explore.colour_scale(rec, "cos")[0] < 0  # cos goes negative: the scale starts below 0


def test_a_single_branch_record_offers_only_that_branch():
    w = explore.explore(synthetic_record(cfg=False))
    assert list(w.branch.options) == ["cond"]
    with pytest.raises(ValueError, match="not in this record"):
        explore.explore(synthetic_record(cfg=False), branch="uncond")


def test_bad_input_raises_naming_the_problem(rec, images):
    with pytest.raises(ValueError, match="unknown measure 'nope'"):
        explore.explore(rec, measure="nope")
    with pytest.raises(ValueError, match="3 images .* one per sample"):
        explore.explore(rec, np.concatenate([images, images[:1]]))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        explore.explore(rec, images[0])
    with pytest.raises(ValueError, match="step 9 out of range"):
        explore.explore(rec, step=9)
    with pytest.raises(TypeError, match="TokenChangeRecord"):
        explore.explore({"not": "a record"})


def test_the_module_is_callable_as_tclab_explore(rec):
    import tclab

    w = tclab.explore(rec, block=2)
    assert w.block.value == 2


# ---- the kernel-free fragment ----------------------------------------------------------------------

class _Dom(HTMLParser):
    """Tags with their attributes, and the text of script elements."""

    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = dict(attrs).get("class", "") if tag == "script" else None

    def handle_data(self, data):
        if self._in is not None:
            self.scripts.append((self._in, data))

    def handle_endtag(self, tag):
        self._in = None


def parse(html: str) -> _Dom:
    d = _Dom()
    d.feed(html)
    return d


def find(dom: _Dom, tag: str, cls: str) -> list[dict]:
    return [a for t, a in dom.tags if t == tag and cls in a.get("class", "").split()]


def embedded_data(html: str) -> dict:
    (text,) = [t for c, t in parse(html).scripts if c == "tclab-data"]
    return json.loads(text)


def decode(data: dict, measure: str) -> np.ndarray:
    """(samples, steps, blocks, H, W) values back from the uint8 codes (NaN where 255)."""
    lo, hi = data["scales"][measure]
    q = np.frombuffer(base64.b64decode(data["maps"][measure]), np.uint8)
    shape = (len(data["samples"]), len(data["steps"]), len(data["blocks"]), *data["grid"])
    v = lo + q.astype(np.float64) / 254 * (hi - lo)
    return np.where(q == 255, np.nan, v).reshape(shape)


def test_fragment_keeps_the_dom_contract(rec, images):
    html = explore.static_explorer(rec, images)._repr_html_()
    dom = parse(html)
    assert html.startswith('<div class="tclab-explorer"')
    (outer,) = find(dom, "div", "tclab-explorer")
    assert outer["id"].startswith("tclab-explorer-")
    (step,) = find(dom, "input", "tclab-step")
    (block,) = find(dom, "input", "tclab-block")
    assert step["type"] == block["type"] == "range"
    assert (step["min"], step["max"], block["max"]) == ("0", str(S - 1), str(L - 1))
    (measure,) = find(dom, "select", "tclab-measure")
    (samp,) = find(dom, "select", "tclab-sample")
    assert len(find(dom, "canvas", "tclab-map")) == 1 and len(find(dom, "div", "tclab-readout")) == 1
    options = [a["value"] for t, a in dom.tags if t == "option"]
    assert options[:2] == ["out_change", "update_change"] and options[2:] == ["0", "1"]
    assert find(dom, "input", "tclab-alpha")  # the overlay opacity, with images
    assert "no kernel" in html and "99th percentile" in html


def test_fragment_is_self_contained_and_ids_never_clash(rec, images):
    ex = explore.static_explorer(rec, images)
    a, b = ex._repr_html_(), ex._repr_html_()
    for html in (a, b):
        assert "http://" not in html and "https://" not in html and "//cdn" not in html
        assert 'src="' not in html.replace('src="data:', "")  # images are data: URLs, scripts inline
    ids_a, ids_b = ({x["id"] for _, x in parse(h).tags if "id" in x} for h in (a, b))
    assert len(ids_a) == 1 and not ids_a & ids_b
    assert next(iter(ids_a)) in a.split("<script>")[1]  # the script finds its own root by that id


def test_fragment_decodes_back_to_the_records_maps(rec, images):
    ex = explore.static_explorer(rec, images, measures=("out_change", "cos"))
    data = embedded_data(ex._repr_html_())
    assert data["samples"] == [0, 1] and data["blocks"] == [0, 1, 2] and data["steps"] == list(range(S))
    assert data["t"] == pytest.approx(list(rec.timesteps))
    for m in ("out_change", "cos"):
        lo, hi = data["scales"][m]
        assert (lo, hi) == pytest.approx(explore.colour_scale(rec, m))
        got = decode(data, m)
        for i, sid in enumerate(data["samples"]):
            for s in range(S):
                for j, b in enumerate(data["blocks"]):
                    want = np.clip(rec.token_map(m, s, b, sid, "cond"), lo, hi)
                    np.testing.assert_allclose(got[i, s, j], want, atol=(hi - lo) / 508 + 1e-9, equal_nan=True)
                    mean = data["means"][m][(i * S + s) * len(data["blocks"]) + j]
                    exact = np.nanmean(rec.token_map(m, s, b, sid)) if s else None
                    assert mean == (None if exact is None else pytest.approx(exact, rel=1e-4))
    assert np.isnan(decode(data, "out_change")[:, 0]).all()  # step 0 has no change: 255, not 0
    assert np.nanmax(decode(data, "out_change")) == pytest.approx(data["scales"]["out_change"][1])  # 50.0 clipped
    pngs = data["images"]
    assert len(pngs) == 2 and base64.b64decode(pngs[0])[:4] == b"\x89PNG"


def test_fragment_respects_the_payload_budget_by_subsampling_blocks():
    big = synthetic_record(samples=4, steps=6, blocks=10)
    full = explore.static_explorer(big, measures=("out_change",))
    assert full.blocks == list(range(10)) and "subsampled" not in full.caption
    budget = full.payload_bytes // 3
    small = explore.static_explorer(big, measures=("out_change",), max_payload_bytes=budget)
    html = small._repr_html_()
    assert small.payload_bytes <= budget and len(html) < budget + 20_000  # + the fixed markup and script
    assert 1 < len(small.blocks) < 10 and small.blocks[0] == 0 and small.blocks[-1] == 9
    assert np.all(np.diff(small.blocks) > 0)
    assert f"{len(small.blocks)} of 10" in html and "subsampled" in html
    data = embedded_data(html)
    got = decode(data, "out_change")
    lo, hi = data["scales"]["out_change"]
    for j, b in enumerate(small.blocks):
        np.testing.assert_allclose(got[2, 3, j], np.clip(big.token_map("out_change", 3, b, 2), lo, hi),
                                   atol=(hi - lo) / 508 + 1e-9)
    # a budget below one block drops steps too, and says so; below two steps it refuses
    tiny = explore.static_explorer(big, measures=("out_change",), max_payload_bytes=full.payload_bytes // 20)
    assert tiny.blocks == [0] and len(tiny.steps) < 6 and "Steps subsampled" in tiny.caption
    with pytest.raises(ValueError, match="max_payload_bytes"):
        explore.static_explorer(big, max_payload_bytes=100)


def test_fragment_caps_the_samples(rec):
    big = synthetic_record(samples=6)
    assert explore.static_explorer(big).samples == [0, 1, 2, 3]
    assert explore.static_explorer(big, max_samples=2).samples == [0, 1]
    assert explore.static_explorer(big, samples=[5, 2]).samples == [5, 2]


def test_fragment_bad_input_raises_naming_the_problem(rec, images):
    with pytest.raises(ValueError, match="unknown measure in measures 'out'"):
        explore.static_explorer(rec, measures=("out",))
    with pytest.raises(ValueError, match=r"sample id\(s\) \[1\] have no image"):
        explore.static_explorer(rec, images[:1])
    with pytest.raises(ValueError, match="3 images"):
        explore.static_explorer(rec, np.concatenate([images, images[:1]]))
    with pytest.raises(ValueError, match=r"sample id\(s\) \[7\] are not in"):
        explore.static_explorer(rec, samples=[7])
    with pytest.raises(ValueError, match="no 'uncond' rows"):
        explore.static_explorer(synthetic_record(cfg=False), branch="uncond")


# ---- a real recording, images beside the record, finding records ------------------------------------

def test_a_recorded_run_explores_from_its_saved_files(pixel_dit, tmp_path):
    with record_token_changes(pixel_dit.transformer) as recorder:
        result = sample(pixel_dit, [0, 1, 2], SampleConfig(num_steps=3), progress=False)
    path = recorder.record.save(tmp_path / "record_samples.npz")
    img_path = explore.save_record_images(path, result.images)
    assert img_path.name == "record_samples_images.npz"
    back = explore.load_record_images(path)
    assert back.shape == tuple(result.images.shape)
    assert np.abs(back - result.images.numpy()).max() <= 1 / 127.5 + 1e-6  # uint8 storage
    w = explore.explore(path)  # a path: the record and its images are loaded
    assert w.images is not None and w.images.shape == (3, 8, 8, 3)
    ex = explore.static_explorer(path, max_samples=2)
    assert ex._has_images and ex.samples == [0, 1]
    data = embedded_data(ex._repr_html_())
    lo, hi = data["scales"]["update_change"]
    np.testing.assert_allclose(decode(data, "update_change")[1, 2, 1],
                               np.clip(recorder.record.token_map("update_change", 2, 1, 1), lo, hi),
                               atol=(hi - lo) / 508 + 1e-9)


def _run_folder(reports: Path, name: str, status: str = "ok", records=("record_samples.npz",)) -> Path:
    d = reports / name
    d.mkdir(parents=True)
    (d / "provenance.json").write_text(json.dumps({"status": status, "start_utc": name.split("_")[0],
                                                   "notebook": "01_token_redundancy.ipynb"}))
    for r in records:
        synthetic_record().save(d / r)
    return d


def test_find_record_picks_the_newest_run_folder_with_a_record(tmp_path):
    reports = tmp_path / "reports"
    assert explore.find_record(None, reports_dir=reports) is None  # nothing yet: the caller records one
    old = _run_folder(reports, "20240101T000000Z_01_token_redundancy_smoke")
    _run_folder(reports, "20240301T000000Z_01_token_redundancy_smoke", status="failed")
    _run_folder(reports, "20240401T000000Z_02_ablation_smoke", records=())
    (reports / ".staging" / "x").mkdir(parents=True)
    assert explore.find_record(None, reports_dir=reports) == old / "record_samples.npz"
    newer = _run_folder(reports, "20240201T000000Z_05_inhouse_report_smoke",
                        records=("record_sdedit.npz", "record_samples.npz"))
    os.utime(newer / "record_samples.npz", ns=(1, 1))  # record_sdedit.npz is the one written last
    explore.save_record_images(newer / "record_sdedit.npz", np.zeros((2, 3, 4, 4), np.float32))
    assert explore.records_in(newer) == [newer / "record_sdedit.npz", newer / "record_samples.npz"]  # no images file
    assert explore.find_record(None, reports_dir=reports) == newer / "record_sdedit.npz"
    assert explore.find_record(newer, "record_samples") == newer / "record_samples.npz"
    only_sdedit = _run_folder(reports, "20240215T000000Z_05_inhouse_report_smoke", records=("record_sdedit.npz",))
    assert explore.find_record(None, "record_samples.npz", reports) == newer / "record_samples.npz"  # the newest holding it
    assert explore.find_record(None, reports_dir=reports) == only_sdedit / "record_sdedit.npz"
    assert explore.find_record(newer.name, reports_dir=reports) == newer / "record_sdedit.npz"  # a bare run name
    assert explore.find_record(newer / "record_samples.npz") == newer / "record_samples.npz"
    with pytest.raises(FileNotFoundError, match="no record 'record_x.npz'.*record_sdedit.npz"):
        explore.find_record(newer, "record_x")
    with pytest.raises(FileNotFoundError, match="no folder"):
        explore.find_record(tmp_path / "nowhere")
    opened = explore.open_record(newer, reports_dir=reports)
    assert opened.path == newer / "record_sdedit.npz" and opened.images.shape == (2, 3, 4, 4)
    s = opened.summary()
    assert s["headline"]["record"] == "record_sdedit.npz" and s["headline"]["run_folder"] == newer.name
    assert str(tmp_path) not in json.dumps(s["headline"])  # names, not transient paths


def test_open_record_records_one_when_no_run_folder_has_any(tmp_path):
    opened = explore.open_record(None, reports_dir=tmp_path / "empty", save_to=tmp_path, num_steps=2, num_samples=1)
    assert opened.path == tmp_path / "record_samples.npz" and (tmp_path / "record_samples_images.npz").is_file()
    assert opened.record.num_steps == 2 and len(opened.record.rows("cond")) == 1 and opened.images.shape[0] == 1
    assert "recorded now" in opened.how
    assert TokenChangeRecord.load(opened.path) == opened.record
