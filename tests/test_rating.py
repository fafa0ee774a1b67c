"""tclab.rating: the blind A/B rating set (layout, blinding), judgements and their import, the verdict's
statistics on constructed judgements with known answers, Fleiss' kappa by hand, the report section
written by write_verdict, and the JupyterLab widget's saving (no kernel: its buttons are clicked here).

No notebook runs: the rating set is built from small synthetic image tensors through the same
write_rating_set notebook 05 calls, and the report from a hand-made executed notebook.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from tclab import rating, runs
from tclab.report import DOES_NOT_HOLD, HOLDS, NOT_MEASURED, WITHIN_NOISE, Finding, KeyNumber, ReportSummary
from tclab.shapes import CLASSES, ShapesConfig, make_shape_image

HEX_PNG = re.compile(r"^[0-9a-f]{16}\.png$")
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def synthetic_images(n: int = 8, size: int = 32, seed: int = 0) -> rating.RatingImages:
    """n pairs of (3, size, size) images in [-1, 1]: "full" is a stand-in shape image (tclab.shapes), "cached" the
    same plus a little noise."""
    cfg = ShapesConfig(resolution=size)
    full = np.stack([np.asarray(make_shape_image(cfg, i % len(CLASSES), i), np.float32).transpose(2, 0, 1) / 127.5 - 1
                     for i in range(n)])
    cached = np.clip(full + 0.15 * np.random.default_rng(seed).standard_normal(full.shape), -1, 1).astype(np.float32)
    return rating.RatingImages(full, cached, [f"{CLASSES[i % len(CLASSES)]}/{i:03d}.png" for i in range(n)],
                               [CLASSES[i % len(CLASSES)] for i in range(n)], cached_name="toy cached")


def make_set(tmp_path: Path, n: int = 8, seed: int = 7) -> tuple[Path, rating.RatingSet, rating.RatingImages]:
    run = tmp_path / "20260101T000000Z_05_inhouse_report_test"
    run.mkdir(parents=True)
    ims = synthetic_images(n)
    return run, rating.write_rating_set(run, ims, seed=seed), ims


def uint8(a: np.ndarray) -> np.ndarray:
    return np.rint(np.clip((a.transpose(1, 2, 0) + 1) * 127.5, 0, 255)).astype(np.uint8)


def judge(run: Path, rater: str, outcomes: dict[str, str], score=None, note="", t="2026-01-01T10:00:00Z") -> None:
    """Write judgements of ``rater`` given as unblinded outcomes ("full" / "same" / "cached" preferred)."""
    key = rating.read_key(run)
    for pair, o in outcomes.items():
        choice = "same" if o == "same" else key[pair][o]
        rating.append_judgement(run, rating.Judgement(pair, choice, rater, t, score=score, note=note, source="widget"))


def export(rs: rating.RatingSet, records: list[dict], **head) -> dict:
    return {"format": rating.EXPORT_FORMAT, "version": 1, "set_id": rs.set_id, "run": rs.run, "rater": "ann",
            "exported_utc": "2026-01-01T12:00:00Z", "pairs_in_set": len(rs.pairs), "ratings": records, **head}


def rec(pair: str, choice: str = "left", rater: str | None = "ann", **kw) -> dict:
    out = {"pair": pair, "choice": choice, "score": None, "note": "", "rater": rater,
           "time_utc": "2026-01-01T11:00:00.000Z", "source": "page"}
    return {**out, **kw}


# ---- the set: layout and blinding --------------------------------------------------------------------

def test_pairs_key_and_images_are_laid_out_as_the_contract_says(tmp_path):
    run, rs, ims = make_set(tmp_path, n=8)
    folder = run / "rating"
    pairs = json.loads((folder / "pairs.json").read_text())
    assert pairs["version"] == 1 and pairs["set_id"] == rs.set_id and pairs["run"] == run.name
    assert [p["pair"] for p in pairs["pairs"]] == [f"p{i:02d}" for i in range(1, 9)]
    assert [p["image"] for p in pairs["pairs"]] == list(range(8))
    assert [p["file"] for p in pairs["pairs"]] == list(ims.files) and [p["class"] for p in pairs["pairs"]] == list(ims.classes)
    for p in pairs["pairs"]:
        assert set(p) == {"pair", "image", "file", "class", "left", "right"}
        assert HEX_PNG.match(p["left"]) and HEX_PNG.match(p["right"]) and p["left"] != p["right"]
    names = [p[s] for p in pairs["pairs"] for s in ("left", "right")]
    assert sorted(names) == sorted(x.name for x in (folder / "images").iterdir()) and len(set(names)) == 16

    key = json.loads((folder / "key.json").read_text())
    assert key["set_id"] == rs.set_id and key["seed"] == 7 and "default_rng" in key["order"]
    for p in pairs["pairs"]:
        k = key["pairs"][p["pair"]]
        assert {k["full"], k["cached"]} == {"left", "right"}
        assert k["full_image"] == p[k["full"]] and k["cached_image"] == p[k["cached"]]
        # the key is right: the file it names as full compute holds the full-compute image
        shown = np.asarray(Image.open(folder / "images" / k["full_image"]).convert("RGB"))
        assert np.array_equal(shown, uint8(ims.full[p["image"]]))
        shown = np.asarray(Image.open(folder / "images" / k["cached_image"]).convert("RGB"))
        assert np.array_equal(shown, uint8(ims.cached[p["image"]]))
    assert rating.read_rating_set(run).pairs == rs.pairs


def test_the_order_is_random_per_pair_recorded_and_reproducible(tmp_path):
    run, rs, _ = make_set(tmp_path, n=8, seed=7)
    key = rating.read_key(run)
    full_left = np.array([key[p.pair]["full"] == "left" for p in rs.pairs])
    assert 0 < full_left.sum() < len(full_left), "every pair has full compute on the same side"
    assert full_left.sum() == 4   # balanced: half the pairs each way, so a rater's side bias cancels
    assert np.array_equal(rating.balanced_order(8, json.loads((run / "rating/key.json").read_text())["seed"]), full_left)
    orders = {tuple(rating.balanced_order(8, s)) for s in range(40)}
    assert len(orders) > 20   # drawn, not fixed: 70 balanced orders of 8 exist
    per_pair = np.mean([rating.balanced_order(9, s) for s in range(2000)], axis=0)
    assert np.all(np.abs(per_pair - 0.5) < 0.05)   # each pair on either side about half the time (odd n too)
    # no seed given: a fresh one, recorded
    other = tmp_path / "other"
    other.mkdir()
    rating.write_rating_set(other, synthetic_images(8))
    assert isinstance(json.loads((other / "rating/key.json").read_text())["seed"], int)


def test_neither_the_page_nor_pairs_json_tell_which_side_is_which(tmp_path):
    run, rs, _ = make_set(tmp_path, n=6)
    page = (run / "rating" / "rate.html").read_text()
    key_text = (run / "rating" / "key.json").read_text()
    for text, what in ((DATA_URI.sub("", page), "rate.html"), ((run / "rating" / "pairs.json").read_text(), "pairs.json")):
        low = text.lower()
        assert "full" not in low and "cached" not in low, f"{what} names a side"
        assert "\"seed\"" not in low and "key.json" not in low, f"{what} refers to the key"
    for name in re.findall(r"[0-9a-f]{16}\.png", key_text):
        assert name not in page   # the page holds data URIs, not the key's file names
    # the page shows each pair's left and right image exactly as pairs.json names them
    data = json.loads(re.search(r'<script type="application/json" id="tclab-rating-data">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))
    assert data["set_id"] == rs.set_id and data["run"] == run.name and set(data) >= {"pairs", "display"}
    for shown, p in zip(data["pairs"], rs.pairs):
        assert set(shown) == {"pair", "class", "left", "right"}   # not the source file: the report names it
        for side in ("left", "right"):
            b = base64.b64decode(shown[side].split(",", 1)[1])
            assert b == (run / "rating" / "images" / getattr(p, side)).read_bytes()
    # self-contained: no external resource
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", page) and "@import" not in page


def test_writing_the_set_again_replaces_it_until_it_has_ratings(tmp_path):
    run, rs, ims = make_set(tmp_path, n=4)
    again = rating.write_rating_set(run, ims, seed=1)
    assert again.set_id != rs.set_id and len(list((run / "rating" / "images").iterdir())) == 8
    judge(run, "ann", {"p01": "full"})
    with pytest.raises(ValueError, match="already holds ratings of its rating set"):
        rating.write_rating_set(run, ims, seed=2)
    assert rating.read_rating_set(run).set_id == again.set_id


def test_write_rating_set_refuses_mismatched_inputs(tmp_path):
    ims = synthetic_images(3)
    with pytest.raises(ValueError, match="differ in shape"):
        rating.write_rating_set(tmp_path, rating.RatingImages(ims.full, ims.cached[:2], ims.files, ims.classes))
    with pytest.raises(ValueError, match="file names"):
        rating.write_rating_set(tmp_path, rating.RatingImages(ims.full, ims.cached, ims.files[:2], ims.classes))
    with pytest.raises(ValueError, match="max_pairs"):
        rating.write_rating_set(tmp_path, ims, max_pairs=0)
    assert len(rating.write_rating_set(tmp_path / "r", ims, max_pairs=2).pairs) == 2


def test_the_notebook_output_links_the_page(tmp_path):
    _, rs, _ = make_set(tmp_path, n=3)
    out = rs._repr_html_()
    assert out.startswith("<table") and 'href="rating/rate.html"' in out and rs.set_id in out
    assert "tclab ratings import" in repr(rs) or "tclab ratings import" in out


# ---- judgements and import -----------------------------------------------------------------------------

def test_append_keeps_every_record_and_the_latest_per_rater_and_pair_counts(tmp_path):
    run, rs, _ = make_set(tmp_path, n=4)
    j = rating.Judgement("p01", "left", "Ann", "2026-01-01T10:00:00Z", source="widget")
    path = rating.append_judgement(run, j)
    rating.append_judgement(run, rating.Judgement("p01", "right", " ann ", "2026-01-01T10:05:00Z", score=2,
                                                  source="widget"))
    assert path.parent == run / "ratings" and path.suffix == ".jsonl"
    assert len(path.read_text().splitlines()) == 2     # " ann " writes to Ann's file: one rater
    latest = rating.latest_judgements(rating.read_judgements(run))
    assert [(x.pair, x.choice, x.score) for x in latest] == [("p01", "right", 2)]
    # a crash mid-line leaves a cut-short last line: it is left out (with a warning), and the next record starts a
    # fresh line, so it stays readable
    with open(path, "ab") as f:
        f.write(b'{"pair": "p02", "cho')
    with pytest.warns(UserWarning, match="line 3: not a JSON record"):
        assert len(rating.read_judgements(run)) == 2
    rating.append_judgement(run, rating.Judgement("p02", "same", "Ann", "2026-01-01T10:06:00Z", source="widget"))
    assert path.read_text().split("\n")[-2].startswith('{"pair": "p02", "choice": "same"')
    with pytest.warns(UserWarning, match="line 3"):
        assert [x.choice for x in rating.latest_judgements(rating.read_judgements(run))] == ["right", "same"]
    with pytest.raises(ValueError, match="unknown pair id 'p09'"):
        rating.append_judgement(run, rating.Judgement("p09", "left", "Ann", "2026-01-01T10:00:00Z"))


def test_import_of_a_page_export_json_and_csv(tmp_path):
    run, rs, _ = make_set(tmp_path, n=4)
    f = tmp_path / "export.json"
    f.write_text(json.dumps(export(rs, [rec("p01", "left", score=5, note="halo"), rec("p02", "same")])))
    out = rating.import_ratings(run, f)
    assert out.parent == run / "ratings" and out.suffix == ".jsonl"
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(g["pair"], g["choice"], g["score"], g["note"], g["rater"], g["source"]) for g in got] == [
        ("p01", "left", 5, "halo", "ann", "page"), ("p02", "same", None, "", "ann", "page")]
    assert (run / rating.SUMMARY_NAME).is_file()   # import updates the verdict
    assert json.loads((run / rating.SUMMARY_NAME).read_text())["judgements"] == 2
    # the same file again: nothing new
    assert rating.import_ratings(run, f) == out and len(list((run / "ratings").iterdir())) == 1

    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(rating.CSV_COLUMNS)
    w.writerow([rs.set_id, rs.run, "p03", "right", "2", 'edge, "ragged"\nand blurred', "Bob", "2026-01-01T11:00:00Z",
                "page"])
    w.writerow([rs.set_id, rs.run, "p04", "left", "", "", "Bob", "2026-01-01T11:01:00Z", "page"])
    c = tmp_path / "export.csv"
    c.write_text(buf.getvalue())
    out2 = rating.import_ratings(run, c)
    got = [json.loads(x) for x in out2.read_text().splitlines()]
    assert got[0]["note"] == 'edge, "ragged"\nand blurred' and got[0]["score"] == 2 and got[1]["score"] is None
    assert rating.human_verdict(run).raters == ["ann", "Bob"]


@pytest.mark.parametrize("case, message", [
    ("unknown pair", r"the set has pairs p01\.\.p04\):\n  rating 3: unknown pair id 'p99'"),
    ("bad choice", r"choice 'better' of pair p01: must be one of \['left', 'same', 'right'\]"),
    ("other set", r"rates rating set 0000000000000000 of run some_other_run, but run .* has rating set"),
    ("missing rater", r"pair p01: no rater name"),
    ("bad score", r"score 7 of pair p01: must be an integer 1-5"),
    ("bad time", r"time_utc 'yesterday' of pair p01"),
    ("no ratings", r"holds no ratings"),
    ("not an export", r"is not a ratings export"),
    ("no set id", r"names no rating set"),
])
def test_import_refuses_bad_files_and_writes_nothing(tmp_path, case, message):
    run, rs, _ = make_set(tmp_path, n=4)
    records = [rec("p01"), rec("p02", "right")]
    d = export(rs, records)
    if case == "unknown pair":
        d["ratings"].append(rec("p99"))
    elif case == "bad choice":
        d["ratings"][0]["choice"] = "better"
    elif case == "other set":
        d.update(set_id="0" * 16, run="some_other_run")
    elif case == "missing rater":
        d["ratings"][0]["rater"] = ""
        d["rater"] = None
    elif case == "bad score":
        d["ratings"][0]["score"] = 7
    elif case == "bad time":
        d["ratings"][0]["time_utc"] = "yesterday"
    elif case == "no ratings":
        d["ratings"] = []
    elif case == "not an export":
        d = records
    elif case == "no set id":
        d["set_id"] = ""
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        rating.import_ratings(run, f)
    assert not (run / "ratings").exists() and not (run / rating.SUMMARY_NAME).exists()


def test_import_refuses_a_csv_without_the_set_and_other_suffixes(tmp_path):
    run, rs, _ = make_set(tmp_path, n=2)
    c = tmp_path / "x.csv"
    c.write_text("pair,choice,rater,time_utc\np01,left,ann,2026-01-01T00:00:00Z\n")
    with pytest.raises(ValueError, match=r"CSV without the column\(s\) \['set_id'\]"):
        rating.import_ratings(run, c)
    t = tmp_path / "x.txt"
    t.write_text("")
    with pytest.raises(ValueError, match="give the .json or .csv"):
        rating.import_ratings(run, t)
    with pytest.raises(FileNotFoundError):
        rating.import_ratings(run, tmp_path / "missing.json")
    assert not (run / "ratings").exists()


# ---- the verdict: statistics with known answers ------------------------------------------------------------

def test_one_rater_wilson_interval_ties_and_sign_test(tmp_path):
    run, rs, _ = make_set(tmp_path, n=12)
    ids = rs.pair_ids()
    judge(run, "ann", {**{p: "full" for p in ids[:8]}, **{p: "cached" for p in ids[8:10]},
                       **{p: "same" for p in ids[10:]}}, score=3)
    v = rating.human_verdict(run)
    assert (v.judgements, v.raters, v.pairs_rated) == (12, ["ann"], 12)
    assert (v.full_preferred, v.same, v.cached_preferred) == (8, 2, 2)
    assert v.preference_full == pytest.approx(0.8) and v.design_effect == pytest.approx(1.0)
    assert (v.preference_full_ci_low, v.preference_full_ci_high) == pytest.approx((0.49016, 0.94332), abs=1e-4)
    assert v.ties_share == pytest.approx(2 / 12)
    assert v.sign_test_p == pytest.approx(112 / 1024)   # 2 * P(X >= 8), X ~ Bin(10, 1/2)
    assert v.sign_test_pairs == 10
    assert v.pairs_multi_rated == 0 and v.percent_agreement is None and v.fleiss_kappa is None
    assert v.mean_score_full == 3 and v.mean_score_cached == 3 and v.scored == 12
    assert v.verdict == WITHIN_NOISE and "80% [49%, 94%]" in v.sentence
    assert [w.pair for w in v.worst] == ids[:3]   # most judgements for full compute, then pair order


def test_raters_who_agree_count_as_fewer_independent_judgements(tmp_path):
    run, rs, _ = make_set(tmp_path, n=5)
    outcomes = dict(zip(rs.pair_ids(), ["full", "full", "full", "full", "cached"]))
    judge(run, "ann", outcomes)
    judge(run, "bob", outcomes)
    v = rating.human_verdict(run)
    assert v.preference_full == pytest.approx(0.8)
    # y = (2,2,2,2,0), m = 2: cluster variance sum((y - 0.8 m)^2) / n^2 = 3.2 / 100, binomial 0.16 / 10: deff 2
    assert v.design_effect == pytest.approx(2.0) and v.preference_n_effective == pytest.approx(5.0)
    assert (v.preference_full_ci_low, v.preference_full_ci_high) == pytest.approx((0.37553, 0.96378), abs=1e-4)
    assert v.sign_test_p == pytest.approx(12 / 32)   # over pairs: 4 for full, 1 against
    assert v.pairs_multi_rated == 5 and v.percent_agreement == pytest.approx(1.0)
    assert v.fleiss_kappa == pytest.approx(1.0)


def test_unanimous_judgements_count_once_per_pair(tmp_path):
    run, rs, _ = make_set(tmp_path, n=6)
    for r in ("ann", "bob"):
        judge(run, r, {p: "full" for p in rs.pair_ids()})
    v = rating.human_verdict(run)
    assert v.preference_n_effective == pytest.approx(6.0)   # 12 judgements, but 6 pairs
    assert v.preference_full_ci_low == pytest.approx(0.6097, abs=1e-3)   # Wilson(6, 6)
    assert v.verdict == DOES_NOT_HOLD and v.sign_test_p == pytest.approx(2 / 64)
    assert v.fleiss_kappa is None and v.percent_agreement == 1.0   # one category only: kappa undefined


def test_verdicts_holds_and_the_edges(tmp_path):
    run, rs, _ = make_set(tmp_path, n=40)
    ids = rs.pair_ids()
    assert rating.human_verdict(run).verdict == NOT_MEASURED   # no ratings yet
    judge(run, "ann", {p: "same" for p in ids})
    v = rating.human_verdict(run)
    assert v.verdict == WITHIN_NOISE and v.preference_full is None and v.ties_share == 1.0 and v.sign_test_p is None
    judge(run, "ann", {**{p: "full" for p in ids[:8]}, **{p: "cached" for p in ids[8:]}},
          t="2026-01-01T11:00:00Z")   # a later session: these count
    v = rating.human_verdict(run)
    assert v.judgements == 40 and v.preference_full == pytest.approx(0.2) and v.verdict == HOLDS
    assert v.preference_full_ci_high < 0.65


def test_a_changed_mind_counts_once_and_notes_and_scores_go_with_it(tmp_path):
    run, rs, _ = make_set(tmp_path, n=3)
    judge(run, "ann", {"p01": "cached"}, t="2026-01-01T10:00:00Z")
    judge(run, "ann", {"p01": "full"}, score=4, note="banding", t="2026-01-01T10:01:00Z")
    judge(run, "bob", {"p01": "full", "p02": "cached"}, score=2)
    v = rating.human_verdict(run)
    assert v.judgements == 3 and (v.full_preferred, v.cached_preferred) == (2, 1)
    assert v.mean_score_full == pytest.approx(3.0) and v.mean_score_cached == pytest.approx(2.0)
    assert v.worst[0].pair == "p01" and v.worst[0].notes == ["ann: banding"] and len(v.worst) == 1
    d = v.to_dict()
    assert d["format"] == rating.SUMMARY_FORMAT and d["worst"][0]["class"] == CLASSES[0]
    assert rating.HumanVerdict.from_dict(json.loads(json.dumps(d))) == v


def test_fleiss_kappa_by_hand():
    # 3 pairs, 2 raters, categories (full, same, cached): (full, full), (same, cached), (cached, cached)
    # P_i = 1, 0, 1 -> P = 2/3; p_j = 2/6, 1/6, 3/6 -> P_e = 14/36; kappa = (2/3 - 14/36) / (1 - 14/36) = 5/11
    assert rating.fleiss_kappa([[2, 0, 0], [0, 1, 1], [0, 0, 2]]) == pytest.approx(5 / 11)
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories: kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1], [7, 7, 0, 0, 0],
             [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert rating.fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    assert rating.fleiss_kappa([[1, 0, 0], [0, 1, 0]]) is None   # nobody rated a subject twice
    assert rating.fleiss_kappa([[2, 0, 0], [3, 0, 0]]) is None   # one category: undefined
    assert rating.fleiss_kappa([[1, 1, 0], [0, 1, 1]]) == pytest.approx((0 - 6 / 16) / (1 - 6 / 16))


def test_sign_test_p():
    assert rating.sign_test_p(0, 0) is None
    assert rating.sign_test_p(3, 3) == 1.0
    assert rating.sign_test_p(5, 0) == pytest.approx(2 / 32) and rating.sign_test_p(0, 5) == pytest.approx(2 / 32)


# ---- the report section ----------------------------------------------------------------------------------

def executed_run(tmp_path: Path) -> Path:
    """A run folder as `tclab run` leaves it, from a hand-made executed notebook: report.html, summary,
    provenance, params; the notebook printed its staging folder, which the report maps to the run folder."""
    run, rs, _ = make_set(tmp_path, n=4)
    staging = str(tmp_path / ".staging" / run.name)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 05 In-house report\n\nThe question."),
                nbformat.v4.new_code_cell(f"run_dir = {staging!r}", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_markdown_cell("Where the run is."),
                nbformat.v4.new_code_cell("print(run.dir)", outputs=[nbformat.v4.new_output(
                    "stream", name="stdout", text=staging + "\n")])]
    nbformat.write(nb, run / "05_inhouse_report.ipynb")
    summary = {"headline": {"psnr": 30.0},
               "details": {"per_image": [{"index": i, "psnr": 20.0 + i} for i in range(4)]},
               "report": ReportSummary(findings=[Finding("PSNR is fine.", HOLDS, "above 25 dB")],
                                       key_numbers=[KeyNumber("psnr", "PSNR", 30.0, "dB")]).to_dict()}
    (run / "summary.json").write_text(json.dumps(summary))
    prov = {"status": "ok", "run": run.name, "parameters": {"model": "shapes-dit", "num_steps": 10},
            "overrides": {"num_steps": 10}, "start_utc": "2026-01-01T00:00:00Z", "duration_s": 61.0,
            "executed_notebook": "05_inhouse_report.ipynb"}
    (run / "provenance.json").write_text(json.dumps(prov))
    runs.render_html(run / "05_inhouse_report.ipynb", run / "report.html", title=run.name,
                     params=prov["parameters"], overridden=["num_steps"], summary=summary, provenance=prov,
                     replacements={staging: str(run)})
    return run


def test_write_verdict_adds_the_section_after_the_first_screen_and_keeps_the_rest(tmp_path):
    run = executed_run(tmp_path)
    before = (run / "report.html").read_text()
    judge(run, "ann", {"p01": "full", "p02": "full", "p03": "same", "p04": "cached"}, note="look at the edge")
    judge(run, "bob", {"p01": "full", "p02": "same"})
    v = rating.write_verdict(run)
    assert json.loads((run / rating.SUMMARY_NAME).read_text()) == json.loads(json.dumps(v.to_dict()))
    after = (run / "report.html").read_text()
    assert after.index('<section id="summary">') < after.index('id="human-rating"') < after.index('id="details"')
    assert "Human rating (blind A/B)" in after and v.sentence.replace("'", "&#x27;") in after
    assert '<a href="#human-rating">Human rating</a>' in after and 'href="rating/rate.html"' in after
    section = after[after.index('id="human-rating"'):after.index("</section>", after.index('id="human-rating"'))]
    assert section.count("<figcaption>full compute</figcaption>") == 2 == section.count("<figcaption>cached</figcaption>")
    assert "PSNR 20.0 dB" in section and "ann: look at the edge" in section and "Fleiss" in section
    # nothing else changed: without the section and its link the page is what the runner rendered
    stripped = re.sub("\n" + re.escape(rating._SECTION_START) + ".*?" + re.escape(rating._SECTION_END), "", after,
                      flags=re.S).replace(' <a href="#human-rating">Human rating</a>', "")
    assert stripped == before
    assert ".staging" not in after and str(run) in after
    # again: one section, not two; no temporary file left behind
    rating.write_verdict(run)
    again = (run / "report.html").read_text()
    assert again.count('id="human-rating"') == 1 and again.count('href="#human-rating"') == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_the_section_before_any_rating_says_so(tmp_path):
    run = executed_run(tmp_path)
    v = rating.write_verdict(run)
    assert v.verdict == NOT_MEASURED
    page = (run / "report.html").read_text()
    assert "No ratings yet" in page and 'href="rating/rate.html"' in page


def test_a_run_without_its_notebook_keeps_its_report_and_gets_the_section(tmp_path):
    run = executed_run(tmp_path)
    (run / "05_inhouse_report.ipynb").unlink()
    judge(run, "ann", {"p01": "full"})
    rating.write_verdict(run)
    rating.write_verdict(run)
    assert (run / "report.html").read_text().count('id="human-rating"') == 1


# ---- the widget (no kernel: its callbacks run here) --------------------------------------------------------

def test_tclab_rate_is_lazy_and_the_rating_module_needs_neither_torch_nor_ipywidgets():
    code = ("import sys, tclab, tclab.rating\n"
            "assert 'ipywidgets' not in sys.modules and 'torch' not in sys.modules\n"
            "assert callable(tclab.rate) and 'ipywidgets' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parents[1])


def test_the_widget_saves_every_judgement_at_once_and_resumes(tmp_path):
    pytest.importorskip("ipywidgets")
    import tclab

    run, rs, _ = make_set(tmp_path, n=3)
    w = tclab.rate(run)
    assert w.left_button.disabled and "Enter your name" in w.status.value
    w.rater.value = "Cleo"
    w.left_button.click()
    path = rating.widget_ratings_path(run, "Cleo")
    assert [json.loads(x)["choice"] for x in path.read_text().splitlines()] == ["left"]
    w.next_button.click()
    w.score.value = "4"
    w.right_button.click()
    w.note.value = "smudge"   # after the choice: saved again with the note
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["pair"], x["choice"], x["score"], x["note"], x["source"]) for x in lines] == [
        ("p01", "left", None, "", "widget"), ("p02", "right", 4, "", "widget"), ("p02", "right", 4, "smudge", "widget")]
    # nothing in the widget says which side is which until "finish"
    texts = " ".join(str(getattr(c, "value", "")) for c in _walk(w) if isinstance(getattr(c, "value", None), str))
    texts += " ".join(str(getattr(c, "description", "")) for c in _walk(w))
    assert "full" not in texts.lower() and "cached" not in texts.lower()
    # a second session of the same rater appends to the same file and starts at the first unrated pair
    w2 = tclab.rate(run, rater="Cleo")
    assert w2.index == 2 and w2.left_button.button_style == "" and len(w2.saved) == 2
    w2.same_button.click()
    assert len(path.read_text().splitlines()) == 4
    v = w2.finish()
    assert v.judgements == 3 and "Verdict" in w2.status.value
    assert json.loads((run / rating.SUMMARY_NAME).read_text())["raters"] == ["Cleo"]


def _walk(widget):
    yield widget
    for c in getattr(widget, "children", ()):
        yield from _walk(c)
