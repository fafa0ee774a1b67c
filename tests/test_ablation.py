"""tclab.ablation: variant builders, the sweep harness on a tiny DiT, the readers of a sweep (Pareto
front, best under budget, winners at a reduction) on hand-made tables with known answers, the typed
summary.json (tclab.sweep_summary) and the steps the ablation notebooks share (open_study)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from tclab import ablation as A
from tclab.cache import TokenCacheConfig
from tclab.sweep_summary import SCHEMA_VERSION, SweepSummary, SweepSummaryError


def frame(rows):
    """A sweep table from (name, curve, family, flop_ratio, time_ratio, psnr, class_consistency[, error])."""
    cols = ["name", "curve", "family", "flop_ratio", "time_ratio", "psnr", "class_consistency", "error"]
    rows = [tuple(r) + ("",) * (len(cols) - len(r)) for r in rows]
    f = pd.DataFrame(rows, columns=cols)
    f["config"] = [json.dumps({"name": n, "cache": {"rho": 0.5}}) for n in f["name"]]
    return f


HAND = frame([
    ("full compute", "full compute", "reference", 1.0, 1.0, 100.0, 0.9),
    ("a hi", "a", "ablation", 0.6, 0.7, 30.0, 0.8),
    ("a lo", "a", "ablation", 0.3, 0.35, 20.0, 0.6),
    ("b hi", "b", "ablation", 0.45, 0.5, 25.0, 0.85),   # beats a within 0.5 (a has nothing there but...)
    ("b lo", "b", "ablation", 0.32, 0.3, 22.0, 0.7),    # ... b lo beats a lo at 1/3 (flops 0.32 <= 0.333)
    ("c", "c", "ablation", 0.4, 0.45, 24.0, 0.5),       # dominated by b hi? no: cheaper. On the front.
    ("c bad", "c", "ablation", 0.2, 0.2, 40.0, 0.9, "RuntimeError: boom"),  # failed: never counted
    ("FORA", "FORA", "baseline", 0.5, 0.52, 26.0, 0.8),
    ("d", "d", "ablation", 0.55, 0.6, 23.0, 0.4),         # dominated by b hi (cheaper, better)
])


def test_pareto_front_on_a_hand_made_table():
    front = A.pareto_front(HAND, "flop_ratio", "psnr")
    # every cheaper point has less PSNR, except d (0.55, 23), which b hi (0.45, 25) beats on both
    assert set(HAND.loc[front, "name"]) == {"a lo", "b lo", "c", "b hi", "FORA", "a hi"}
    assert not front[HAND["name"] == "full compute"].item()  # the reference is left out
    assert not front[HAND["name"] == "c bad"].item()  # failed points never count, however good
    # lower-is-better measures flip the comparison: with fid = -psnr the front is the same points
    f = HAND.assign(fid=-HAND["psnr"])
    assert (A.pareto_front(f, "flop_ratio", "fid") == front).all()
    # on wall-clock, b lo (0.30 s) is cheaper than a lo (0.35 s) and better: a lo drops off
    tfront = A.pareto_front(HAND, "time_ratio", "psnr")
    assert not tfront[HAND["name"] == "a lo"].item() and tfront[HAND["name"] == "b lo"].item()


def test_pareto_front_matches_brute_force_on_random_points():
    rng = np.random.default_rng(0)
    n = 40
    f = frame([(f"p{i}", f"c{i % 4}", "ablation", rng.uniform(0.2, 1), rng.uniform(0.2, 1), rng.uniform(10, 40),
                rng.uniform(0, 1)) for i in range(n)])
    for cost in ("flop_ratio", "time_ratio"):
        front = A.pareto_front(f, cost, "psnr")
        for i, r in f.iterrows():
            dominated = ((f[cost] <= r[cost]) & (f["psnr"] >= r["psnr"])
                         & ((f[cost] < r[cost]) | (f["psnr"] > r["psnr"]))).any()
            assert front[i] == (not dominated)


def test_best_under_budget():
    assert A.best_under_budget(HAND, 0.5)["name"] == "b hi"  # 25 dB; 'c bad' (40 dB) failed
    assert A.best_under_budget(HAND, 0.5, families=("ablation", "baseline"))["name"] == "FORA"
    assert A.best_under_budget(HAND, 0.31)["name"] == "a lo"
    assert A.best_under_budget(HAND, 0.1) is None
    assert A.best_under_budget(HAND, 0.5, quality="class_consistency")["name"] == "b hi"
    best = A.best_under_budget(HAND, 0.5)
    assert best["config"] == {"name": "b hi", "cache": {"rho": 0.5}}  # plain values, config parsed
    with pytest.raises(ValueError, match="budget"):
        A.best_under_budget(HAND, -1)
    with pytest.raises(ValueError, match="unknown column"):
        A.best_under_budget(HAND, 0.5, quality="beauty")
    with pytest.raises(ValueError, match="no 'fid' column"):
        A.best_under_budget(HAND, 0.5, quality="fid")


def test_compare_at_reductions_and_headline():
    comp = A.compare_at_reductions(HAND, (2, 3))
    at2 = comp[comp["reduction"] == 2].set_index("curve")
    assert at2.loc["b", "name"] == "b hi" and at2.loc["b", "rank"] == 1
    assert at2.loc["c", "rank"] == 2 and at2.loc["a", "rank"] == 3  # a's best within 0.5 is 'a lo' (20 dB)
    at3 = comp[comp["reduction"] == 3].set_index("curve")
    assert at3.loc["b", "name"] == "b lo" and at3.loc["b", "rank"] == 1
    assert at3.loc["c", "name"] == "no point within budget" and np.isnan(at3.loc["c", "rank"])
    h = A.headline(HAND, (2, 3), budget=0.5)
    # a bare table has no per-sample values: nothing is tested, so a leader but no winner is named
    assert h["at_2x"]["leader"] == "b" and h["at_2x"]["winner"] is None and h["at_2x"]["tested"] is False
    assert h["at_2x"]["runner_up"] == "c"
    assert h["at_2x"]["psnr_margin"] == pytest.approx(1.0)
    assert h["at_2x"]["class_consistency_margin"] == pytest.approx(0.35)
    assert h["at_2x"]["best_reference"]["name"] == "FORA"
    assert h["at_3x"]["leader"] == "b" and h["at_3x"]["psnr_margin"] == pytest.approx(2.0)
    assert h["best_under_budget"]["name"] == "b hi"
    assert h["best_under_budget_any_method"]["name"] == "FORA"
    assert h["full_compute_class_consistency"] == pytest.approx(0.9)
    assert A.headline(HAND, (10,))["at_10x"]["winner"] is None
    with pytest.raises(ValueError, match="> 1"):
        A.compare_at_reductions(HAND, (1,))


def test_ties_go_to_the_cheaper_point_and_are_flagged():
    f = frame([("full compute", "full compute", "reference", 1.0, 1.0, 100.0, 0.9),
               ("x", "x", "ablation", 0.45, 0.5, 25.0, 0.8),
               ("y", "y", "ablation", 0.30, 0.4, 25.0, 0.7),
               ("z", "z", "ablation", 0.40, 0.4, 20.0, 0.7)])
    comp = A.compare_at_reductions(f, (2,))
    assert list(comp["curve"]) == ["y", "x", "z"] and list(comp["tied"]) == [True, True, False]
    h = A.headline(f, (2,), budget=0.5)
    assert h["at_2x"]["leader"] == "y" and h["at_2x"]["winner"] is None and h["at_2x"]["tied_with"] == ["x"]
    assert h["at_2x"]["psnr_margin"] == 0.0
    assert A.best_under_budget(f, 0.5)["name"] == "y"  # the same answer as the headline
    with pytest.raises(ValueError, match="budget"):
        A.best_under_budget(f, True)


def test_variant_builders_make_valid_distinct_configs():
    v = A.predictor_variants(["learned-static", "random"], [0.5, 0.1], {"kv": "kept"})
    assert [x.name for x in v] == ["learned-static rho=0.5", "learned-static rho=0.1", "random rho=0.5", "random rho=0.1"]
    assert v[0].cache == {"kv": "kept", "scorer": "learned-static", "rho": 0.5} and v[0].curve == "learned-static"
    b = A.block_selection_variants(["uniform", "global"], [0.3], {}, full_end_blocks=[1])
    assert [x.curve for x in b] == ["uniform", "global", "global + first/last 1 full"]
    assert b[-1].cache["full_first_blocks"] == 1 and b[-1].cache["full_last_blocks"] == 1
    s = A.schedule_variants({"rho": 0.1, "schedule": "round-robin"}, tprr=[[3, 2, 0.5], [2, 3, 0.5]], round_robin=[4],
                            percentile=[5], step_importance=[1.0] * 10)
    assert [x.curve for x in s] == ["TPRR long interval first", "TPRR long interval last", "round-robin", "percentile"]
    assert s[0].cache == {"rho": 0.1, "schedule": "tprr", "k1": 3, "k2": 2, "split": 0.5}
    assert s[3].cache["n_full"] == 5 and len(s[3].cache["step_importance"]) == 10
    r = A.reference_variants(10, fora_intervals=[2], fewer_steps=[5, 10, 20], peers=["pab"])
    assert [x.name for x in r] == ["full compute", "fewer steps (5)", "FORA (interval 2)", "peer pab"]
    assert TokenCacheConfig.from_dict(r[2].cache).rho == 0.0


def test_forecast_and_tuned_taylorseer_points():
    f = A.forecast_variants([[2, 1], [3, 2]])
    assert [x.name for x in f] == ["FORA + forecast(1) (interval 2)", "FORA + forecast(2) (interval 3)"]
    c = TokenCacheConfig.from_dict(f[1].cache)
    assert (c.rho, c.reuse, c.forecast_order, c.interval, c.schedule) == (0.0, "forecast", 2, 3, "round-robin")
    assert {x.family for x in f} == {"ablation"} and {x.curve for x in f} == {"FORA + forecast"}
    r = A.reference_variants(10, fora_intervals=[], fewer_steps=[], peers=[], taylorseer=[[3, 2]])
    ts = r[-1]
    assert (ts.name, ts.family, ts.peer) == ("TaylorSeer (interval 3, order 2)", "peer", "taylorseer")
    assert ts.caching_config().cache_interval == 3 and ts.caching_config().max_order == 2
    assert ts.caching_config().disable_cache_before_step == 1
    for bad in ([[2]], [[2, 0]], [["2", 1]], [[2, True]]):
        with pytest.raises(ValueError, match=r"\[interval, order\]"):
            A.forecast_variants(bad)
    with pytest.raises(ValueError, match=r"\[interval, order\]"):
        A.reference_variants(10, taylorseer=[[0, 1]])


def test_the_scorers_that_read_a_predictor_get_its_file():
    from tclab.prepare import learned_kinds, with_predictor_paths

    assert learned_kinds(["staleness-learned", "toca", "learned-dynamic"]) == ["learned-static", "learned-dynamic"]
    v = with_predictor_paths([{"scorer": "staleness-learned"}, {"scorer": "staleness"}], {"learned-static": "/p.st"})
    assert v[0]["scorer_options"] == {"path": "/p.st"} and "scorer_options" not in v[1]


def test_variant_errors_are_clear():
    with pytest.raises(ValueError, match="unknown TokenCacheConfig key.*'rh'.*did you mean 'rho'"):
        A.Variant("x", "x", cache={"rh": 0.5})
    with pytest.raises(ValueError, match="family"):
        A.Variant("x", "x", family="mine")
    with pytest.raises(ValueError, match="not both"):
        A.Variant("x", "x", cache={}, peer="pab")
    with pytest.raises(ValueError, match=r"\[k1, k2, split\]"):
        A.schedule_variants({}, tprr=[[3, 2]])
    with pytest.raises(ValueError, match="step_importance"):
        A.schedule_variants({}, percentile=[3])
    with pytest.raises(ValueError, match="unique"):
        A.run_sweep(None, [A.Variant("x", "x"), A.Variant("x", "y")])


# ---- the harness on a tiny DiT ---------------------------------------------------------------------------

SETTINGS = A.SweepSettings(num_steps=6, quality_samples=3, timing_batch=2, timing_repeats=1, guidance_scale=2.0)


@pytest.fixture(scope="module")
def sweep():
    from tests.conftest import tiny_transformer
    from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config

    model = LoadedDiT(name="tiny-pixel", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                      scheduler_config=default_scheduler_config(), trained=False, source="test",
                      class_names=["a", "b", "c"])
    variants = [*A.reference_variants(6, fora_intervals=[2], fewer_steps=[3], peers=["pab"]),
                A.Variant("bad peer option", "broken", "peer", peer="pab", peer_options={"nonsense": 1}),
                *A.predictor_variants(["random"], [1.0, 0.25], {"kv": "kept", "schedule": "round-robin", "interval": 2})]
    from tclab.lpips import LPIPS

    torch.manual_seed(0)
    lp = LPIPS()  # random backbone, non-negative lin weights: a perceptual-style distance, not published LPIPS
    for lin in lp.lins:
        lin.weight.abs_()
    return model, A.run_sweep(model, variants, SETTINGS, lpips_model=lp, progress=False)


def test_sweep_measures_every_point_and_keeps_failures(sweep):
    _, res = sweep
    f = res.frame.set_index("name")
    assert list(f.index) == ["full compute", "fewer steps (3)", "FORA (interval 2)", "peer pab", "bad peer option",
                             "random rho=1", "random rho=0.25"]
    assert "nonsense" in f.loc["bad peer option", "error"]  # reported, not dropped ...
    ok = f[f["error"] == ""]
    assert len(ok) == 6  # ... and every later point still ran
    assert f.loc["full compute", "flop_ratio"] == 1.0 and f.loc["full compute", "psnr"] == 100.0
    assert f.loc["fewer steps (3)", "flop_ratio"] == pytest.approx(0.5, abs=1e-9)  # 3 of 6 identical steps
    assert f.loc["FORA (interval 2)", "flop_ratio"] < 0.6  # half the steps skip every block
    # rho=1 computes every token in cached steps: the same images as full compute (float round-off)
    assert f.loc["random rho=1", "psnr"] > 60
    assert f.loc["random rho=0.25", "flop_ratio"] < f.loc["random rho=1", "flop_ratio"]
    assert f.loc["random rho=0.25", "psnr"] < f.loc["random rho=1", "psnr"]
    assert (ok["time_ratio"] > 0).all() and (ok["t_full_s"] > 0).all()
    assert np.allclose(ok["flop_speedup"], 1 / ok["flop_ratio"])
    assert res.images["full compute"].shape == (3, 3, 8, 8)
    assert set(res.images) == set(ok.index)
    assert res.frame["class_consistency"].isna().all()  # no classifier given: not measured, not faked
    assert res.frame["fid"].isna().all()  # no extractor given
    assert f.loc["full compute", "lpips"] == 0.0  # paired LPIPS of full compute against itself
    assert 0 < f.loc["random rho=0.25", "lpips"] and f.loc["random rho=1", "lpips"] < 1e-2 * f.loc["random rho=0.25", "lpips"]


def test_per_image_error_matches_the_table(sweep):
    _, res = sweep
    e = res.per_image_error("random rho=0.25")
    assert e["psnr"].shape == (3,)
    assert float(np.mean(e["psnr"])) == pytest.approx(res.frame.set_index("name").loc["random rho=0.25", "psnr"])


@pytest.fixture(scope="module")
def summary(sweep):
    model, res = sweep
    budget = float(res.frame.set_index("name").loc["random rho=0.25", "flop_ratio"]) + 1e-9
    return A.summarise_sweep(res, budget=budget, reductions=(1.4, 2), model=model, labels={"spec": "auto"})


def test_summary_is_plain_json(sweep, summary):
    model, res = sweep
    text = json.dumps(summary.to_dict())  # plain values only
    assert "NaN" not in text
    assert summary.headline["points"] == 7 and summary.headline["failed_points"] == 1
    assert summary.best_under_budget.name == "random rho=0.25"
    assert summary.best_under_budget.cache["rho"] == 0.25
    assert summary.identity.model_weights_sha256 == model.identity()["weights_sha256"]
    assert summary.settings.num_steps == SETTINGS.num_steps and summary.labels == {"spec": "auto"}
    assert summary.report == A.sweep_report(summary, (1.4, 2)) == A.sweep_report(summary.to_dict(), (1.4, 2))
    grids = A.images_of_winners(res, summary.flops.budget)
    assert list(grids)[0] == "full compute" and len(grids) == 2


# ---- summary.json: the typed, versioned SweepSummary ---------------------------------------------------

def test_sweep_summary_round_trips_through_its_file(summary, tmp_path):
    d = summary.to_dict()
    assert d["version"] == SCHEMA_VERSION and list(d) == [
        "version", "headline", "flops", "wall_clock", "best_under_budget", "settings", "points", "identity",
        "report", "labels", "noise_floor", "resolution", "world"]   # the order summary.json has always had, the
    # version first; then where the sweep ran (tclab.distributed), which the report's identity rows show
    assert d["world"]["world_size"] == 1 and d["world"]["backend"] == "none (one process)"
    assert d["best_under_budget"] == d["flops"]["best_under_budget"] and d["headline"] == summary.headline
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(d, indent=2))
    back = SweepSummary.read(path)
    assert back == summary and json.dumps(back.to_dict()) == json.dumps(d)   # same values, same key order
    at = back.flops.at(1.4)
    assert at.winner == "random" == d["flops"]["at_1.4x"]["winner"]
    assert at.best_reference.name == d["flops"]["at_1.4x"]["best_reference"]["name"] == d["headline"][
        "best_reference_at_1.4x"]
    assert back.flops.at(2).winner is None and "no ablated variant" in back.flops.at(2).note
    # the hand-made table has a runner-up and ties to carry as well
    hand = A.summarise_sweep(A.SweepResult(HAND, {}, torch.zeros(0), A.SweepSettings(), []), 0.5, (2, 3))
    at2 = hand.flops.at(2)
    assert (at2.leader, at2.runner_up, at2.psnr_margin, at2.best_reference.name) == ("b", "c", 1.0, "FORA")
    assert hand.headline["leader_at_2x_flops"] == "b" and hand.headline["winner_at_2x_flops"] is None
    assert hand.headline["failed_points"] == 1
    assert SweepSummary.from_dict(json.loads(json.dumps(hand.to_dict()))) == hand
    # keys a notebook adds itself (and the figures RunContext.write_summary adds) come back as they were
    more = {**d, "figures": ["pareto.png"], "notes": {"by": "hand"}}
    assert SweepSummary.from_dict(more).to_dict() == more


def test_an_unversioned_summary_from_before_is_read(summary):
    old = {k: v for k, v in summary.to_dict().items() if k != "version"}  # what summarise_sweep wrote before
    back = SweepSummary.from_dict(old)
    assert back.version == 1 and dataclasses.replace(back, version=SCHEMA_VERSION) == summary
    assert back.to_dict() == {"version": 1, **old}          # written back as the older layout it was read as
    assert SweepSummary.from_dict(back.to_dict()) == back   # ... and read again as one
    # an older, sparser one (as the in-house tests write): what it lacks is read as absent
    sparse = SweepSummary.from_dict({"headline": {}, "best_under_budget": {
        "name": "x", "flop_ratio": 0.4, "psnr": 30.0, "config": {"name": "x", "cache": {"rho": 0.1}}},
        "identity": {"model": "m", "model_weights_sha256": "a" * 64}})
    assert sparse.best_under_budget.name == "x" and sparse.best_under_budget.cache == {"rho": 0.1}
    assert sparse.identity.model_weights_sha256 == "a" * 64
    assert sparse.settings is None and sparse.points == () and sparse.flops.at(2) is None
    assert SweepSummary.from_dict({}).best_under_budget is None   # a run that wrote no summary


def test_a_summary_of_another_version_or_malformed_names_the_file_and_field(summary, tmp_path):
    import copy
    import re

    d = summary.to_dict()
    path = tmp_path / "run" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(SweepSummaryError, match=re.escape(f"{path}: version is 99; this tclab reads sweep summaries "
                                                          f"of layout versions [1, {SCHEMA_VERSION}]")):
        SweepSummary.read(path)

    def refused(edit, match):
        bad = copy.deepcopy(d)
        edit(bad)
        with pytest.raises(SweepSummaryError, match=match):
            SweepSummary.from_dict(bad, source=path)

    at = f"summary.json: flops.best_under_budget.psnr must be a number or null, got 'high'"
    refused(lambda b: b["flops"]["best_under_budget"].update(psnr="high"), re.escape(at))
    refused(lambda b: b["best_under_budget"].update(psnr=1.0), r"best_under_budget differs from flops")
    refused(lambda b: b.pop("settings"), r"summary.json: settings is missing")
    refused(lambda b: b["settings"].update(num_steps="ten"), r"settings.num_steps must be an integer, got 'ten'")
    refused(lambda b: b["settings"].update(steps=10), r"settings has unknown key\(s\) \['steps'\]")
    refused(lambda b: b["wall_clock"].update(cost="flop_ratio"), r"wall_clock.cost ranks cost by 'flop_ratio'")
    refused(lambda b: b["headline"].update(points=99), r"headline disagrees with .* at \['points'\]")
    refused(lambda b: b.update(points="all"), r"points must be a list of JSON objects")
    refused(lambda b: b["report"].update(version=9), r"report cannot be read: .*layout version 9")
    with pytest.raises(SweepSummaryError, match="is a JSON object, got list"):
        SweepSummary.from_dict([], source=path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SweepSummaryError, match="broken.json: cannot read a sweep summary"):
        SweepSummary.read(tmp_path / "broken.json")


def test_the_summary_records_every_sweep_setting():
    from dataclasses import fields

    from tclab.sweep_summary import SweepSettingsRecord

    assert [f.name for f in fields(SweepSettingsRecord)] == [f.name for f in fields(A.SweepSettings)]


# ---- the ablation notebooks' steps --------------------------------------------------------------------

def test_a_study_runs_an_ablation_notebook_step_by_step(sweep, tmp_path, capsys):
    from PIL import Image

    model, _ = sweep
    for c in ("a", "b"):
        (tmp_path / "set" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * i + (0 if c == "a" else 120), np.uint8)).save(
                tmp_path / "set" / c / f"{i}.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = A.SweepSettings(num_steps=4, quality_samples=2, timing_batch=1, timing_repeats=1)
    study = A.open_study("02_ablation_predictor.ipynb", str(run_dir), model, str(tmp_path / "set"), "auto", settings,
                         ["random"], train_missing=False)
    assert study.model is model and study.settings.classes == [0, 1]   # the classes the folders map to
    with pytest.raises(RuntimeError, match="call plan"):
        study.measure()
    study.plan(A.predictor_variants(["random"], [0.25], {"schedule": "round-robin", "interval": 2}),
               fora_intervals=[2], fewer_steps=[2], peers=[])
    printed = capsys.readouterr().out
    assert str(run_dir) in printed and "4 points; settings" in printed
    assert [v.name for v in study.variants] == ["random rho=0.25", "full compute", "fewer steps (2)",
                                                "FORA (interval 2)"]
    failed = study.measure()
    assert list(failed.columns) == ["name", "error"] and failed.empty
    assert pd.read_csv(run_dir / "sweep.csv")["name"].tolist() == study.result.frame["name"].tolist()
    head = study.summarise(budget=0.9, reductions=(1.5,))
    assert head == study.summary.headline and head["points"] == 4
    best = study.summary.best_under_budget
    assert capsys.readouterr().out.splitlines()[-2] == str(best.to_dict() if best else None)
    assert study.summary.labels == study.prepared.label_map.to_dict()
    assert study.summary.identity.images_manifest_sha256 == study.prepared.image_set.manifest_hash()
    path = study.write_summary()
    assert json.loads(path.read_text()) == study.summary.to_dict() and SweepSummary.read(path) == study.summary
    table = study.uncertainty()
    assert "Timing noise floor" in capsys.readouterr().out and list(table["metric"]) == ["psnr", "class_consistency"]
    # the finished run reads back with its per-sample values: the same tests give the same answers
    back = A.load_sweep(run_dir)
    assert set(back.samples) == set(study.result.samples) and back.timings == study.result.timings
    assert A.headline(back, (1.5,), 0.9) == A.headline(study.result, (1.5,), 0.9)
    one = A.load_sweep(run_dir, first=2)
    assert one.settings.quality_samples == 2 and all(len(v["psnr"]) == 2 for v in one.samples.values())
    with pytest.raises(FileNotFoundError, match="samples.npz"):
        (run_dir / "samples.npz").unlink()
        A.load_sweep(run_dir)


def test_sweep_refuses_a_classifier_of_other_classes(sweep):
    model, _ = sweep

    class Clf:
        class_names = ["x", "y", "z"]
        class_ids = None  # outputs = the model's classes in order, which these are not

    with pytest.raises(ValueError, match="classifier classes"):
        A.run_sweep(model, [], SETTINGS, classifier=Clf(), progress=False)
    with pytest.raises(ValueError, match="extractor and reference_images"):
        A.run_sweep(model, [], SETTINGS, extractor=object(), progress=False)


def test_reference_points_take_every_registered_peer_by_default():
    from tclab.cache.peers import PEERS

    names = {v.peer for v in A.reference_variants(10, peers="registered") if v.peer}
    assert names == set(PEERS)
    assert [v.peer for v in A.reference_variants(10, peers=["pab"]) if v.peer] == ["pab"]
    with pytest.raises(ValueError, match="'registered'"):
        A.reference_variants(10, peers="all of them")
