"""tclab.ablation: variant builders, the sweep harness on a tiny DiT, and the readers of a sweep
(Pareto front, best under budget, winners at a reduction) on hand-made tables with known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tclab import ablation as A
from tclab.cache import TokenCacheConfig


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
    assert h["at_2x"]["winner"] == "b" and h["at_2x"]["runner_up"] == "c"
    assert h["at_2x"]["psnr_margin"] == pytest.approx(1.0)
    assert h["at_2x"]["class_consistency_margin"] == pytest.approx(0.35)
    assert h["at_2x"]["best_reference"]["name"] == "FORA"
    assert h["at_3x"]["winner"] == "b" and h["at_3x"]["psnr_margin"] == pytest.approx(2.0)
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
    assert h["at_2x"]["winner"] == "y" and h["at_2x"]["tied_with"] == ["x"]
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
    from conftest import tiny_transformer
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


def test_summary_is_plain_json(sweep):
    model, res = sweep
    budget = float(res.frame.set_index("name").loc["random rho=0.25", "flop_ratio"]) + 1e-9
    s = A.summarise_sweep(res, budget=budget, reductions=(1.5, 2), model=model)
    text = json.dumps(s)  # plain values only
    assert "NaN" not in text
    assert s["headline"]["points"] == 7 and s["headline"]["failed_points"] == 1
    assert s["best_under_budget"]["name"] == "random rho=0.25"
    assert s["best_under_budget"]["config"]["cache"]["rho"] == 0.25
    assert s["identity"]["model_weights_sha256"] == model.identity()["weights_sha256"]
    grids = A.images_of_winners(res, budget)
    assert list(grids)[0] == "full compute" and len(grids) == 2


def test_sweep_refuses_a_classifier_of_other_classes(sweep):
    model, _ = sweep

    class Clf:
        class_names = ["x", "y", "z"]
        class_ids = None  # outputs = the model's classes in order, which these are not

    with pytest.raises(ValueError, match="classifier classes"):
        A.run_sweep(model, [], SETTINGS, classifier=Clf(), progress=False)
    with pytest.raises(ValueError, match="extractor and reference_images"):
        A.run_sweep(model, [], SETTINGS, extractor=object(), progress=False)
