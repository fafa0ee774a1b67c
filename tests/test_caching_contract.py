"""The contract every caching method keeps, run over every registered method (``apply_caching``).

A method registered with ``tclab.cache.register_method`` (TokenCache and its configurations, FORA,
each external peer, a team's own) must:

- leave the module tree, its attributes and its outputs bit-identical after ``remove()``;
- refuse to be applied twice;
- repeat itself: two runs in a row, and a run after ``reset()``, give the same images;
- be exact at its never-skip setting;
- work inside diffusers' ``DiTPipeline`` (each pipeline call a new run);
- not interfere with the methods applied before or after it on the same model;
- report ``stats()`` with every ``STATS_KEYS`` entry.

``CASES`` holds, per method, a setting that skips work and one that skips nothing. A method without
a case fails ``test_every_registered_method_has_a_contract_case``: add its case here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tclab.cache import TokenCacheConfig, apply_caching, available_methods, fora_config
from tclab.cache.methods import STATS_KEYS, method_config
from tclab.cache.peers import peer_status
from tclab.sampling import SampleConfig, sample

SAMPLING = SampleConfig(num_steps=6, guidance_scale=3.0, seed=2)
LABELS = [0, 2]

#: method -> {case: (config maker, skips work?)}; a maker takes nothing and returns a fresh config.
CASES = {
    "tokencache": {
        "prev-change": (lambda: TokenCacheConfig(rho=0.3), True),
        "fora": (lambda: fora_config(2), True),
        "oracle-kept": (lambda: TokenCacheConfig(rho=0.5, scorer="oracle", kv="kept"), True),
        "never-skip": (lambda: TokenCacheConfig(schedule="round-robin", interval=1), False),
        "disabled": (lambda: TokenCacheConfig(enabled=False), False),
    },
    "fbcache": {"loose": (lambda: method_config("fbcache", threshold=10.0), True),
                "never-skip": (lambda: method_config("fbcache", threshold=0.0), False)},
    "taylorseer": {"loose": (lambda: method_config("taylorseer", cache_interval=3, disable_cache_before_step=2), True),
                   "never-skip": (lambda: method_config("taylorseer", cache_interval=1), False)},
    "pab": {"loose": (lambda: method_config("pab", block_skip_range=3, timestep_skip_range=(0, 1000)), True),
            "never-skip": (lambda: method_config("pab", block_skip_range=1), False)},
    "dbcache": {"loose": (lambda: method_config("dbcache", residual_diff_threshold=10.0, max_warmup_steps=2), True),
                "never-skip": (lambda: method_config("dbcache", residual_diff_threshold=0.0, max_warmup_steps=0),
                               False)},
}
ALL = [(m, c) for m in CASES for c in CASES[m]]
SKIPPING = [(m, c) for m, c in ALL if CASES[m][c][1]]
NEVER_SKIP = [(m, c) for m, c in ALL if not CASES[m][c][1]]


def runnable(model, method: str) -> None:
    if method != "tokencache":
        status = peer_status(model).get(method, "ok")
        if status != "ok":
            pytest.skip(f"{method} cannot run here: {status}")


def config_of(method: str, case: str):
    return CASES[method][case][0]()


def snapshot(model) -> dict:
    tr = model.transformer
    tree = {name: (type(m), sorted(vars(m)), sorted(m._modules)) for name, m in tr.named_modules()}
    return {"tree": tree, "state": {k: v.clone() for k, v in tr.state_dict().items()}}


def same_snapshot(a: dict, b: dict) -> bool:
    return a["tree"] == b["tree"] and a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def run(model) -> torch.Tensor:
    return sample(model, LABELS, SAMPLING, progress=False).images


def pipeline_run(model, seed: int = 2) -> np.ndarray:
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=LABELS, guidance_scale=SAMPLING.guidance_scale, num_inference_steps=SAMPLING.num_steps,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_every_registered_method_has_a_contract_case():
    missing = sorted(set(available_methods()) - set(CASES))
    assert not missing, f"caching methods without a contract case in {__file__}: {missing}; add them to CASES"


@pytest.mark.parametrize("method, case", ALL)
def test_apply_then_remove_leaves_the_model_as_it_was(pixel_dit, method, case):
    runnable(pixel_dit, method)
    before, plain = snapshot(pixel_dit), run(pixel_dit)
    handle = apply_caching(pixel_dit.transformer, config_of(method, case))
    cached = run(pixel_dit)
    stats = handle.stats()
    handle.remove()
    handle.remove()  # idempotent
    assert torch.isfinite(cached).all()
    assert same_snapshot(snapshot(pixel_dit), before), f"{method}/{case} left a trace on the transformer"
    assert torch.equal(run(pixel_dit), plain)
    assert set(STATS_KEYS) <= set(stats) and stats["method"] == method
    disabled = method == "tokencache" and case == "disabled"
    assert stats["calls"] == (0 if disabled else SAMPLING.num_steps) and stats["runs"] == (0 if disabled else 1)
    if stats["compute_fraction"] is not None:
        assert 0 <= stats["compute_fraction"] <= 1
        assert (stats["compute_fraction"] < 1) == CASES[method][case][1], stats


@pytest.mark.parametrize("method, case", [mc for mc in ALL if mc != ("tokencache", "disabled")])  # attaches nothing
def test_applying_twice_is_refused(pixel_dit, method, case):
    runnable(pixel_dit, method)
    with apply_caching(pixel_dit.transformer, config_of(method, case)):
        with pytest.raises(RuntimeError, match="already"):
            apply_caching(pixel_dit.transformer, config_of(method, case))
    assert torch.equal(run(pixel_dit), sample(pixel_dit, LABELS, SAMPLING, progress=False).images)


@pytest.mark.parametrize("method, case", SKIPPING)
def test_runs_repeat(pixel_dit, method, case):
    runnable(pixel_dit, method)
    plain = run(pixel_dit)
    with apply_caching(pixel_dit.transformer, config_of(method, case)):
        a, b = run(pixel_dit), run(pixel_dit)  # each sampling run starts from an empty cache
    assert torch.equal(a, b)
    assert not torch.equal(a, plain), f"{method}/{case} is meant to skip work but changed nothing"


def bare_calls(model, ts, seed=0):
    """Transformer calls outside any sampler, on fixed inputs, at decreasing timesteps ``ts``."""
    tr = model.transformer
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, tr.config.in_channels, tr.config.sample_size, tr.config.sample_size, generator=g)
    y = torch.tensor([0, 2, 1000, 1000])
    with torch.no_grad():
        return [tr(x, timestep=torch.full((4,), float(t)), class_labels=y).sample for t in ts]


@pytest.mark.parametrize("method, case", SKIPPING)
def test_reset_starts_a_new_run(pixel_dit, method, case):
    """Mid-run (the timestep keeps going down, so no rule sees a new run), ``reset()`` forgets the
    cache: the next calls are the start of a run, exactly as on a freshly applied method."""
    runnable(pixel_dit, method)
    ts = [900, 750, 600, 450, 300, 150]
    with apply_caching(pixel_dit.transformer, config_of(method, case)):
        fresh = bare_calls(pixel_dit, ts[3:])  # a run that starts at t=450
    with apply_caching(pixel_dit.transformer, config_of(method, case)) as handle:
        bare_calls(pixel_dit, ts[:3])
        handle.reset()
        after = bare_calls(pixel_dit, ts[3:])  # the same three calls, continuing downwards
        assert handle.stats()["calls"] == 6
    assert all(torch.equal(a, b) for a, b in zip(after, fresh)), f"{method}/{case}: reset() did not start a new run"


def test_a_removed_handle_refuses_reset(pixel_dit):
    for method, case in (("tokencache", "prev-change"), ("fbcache", "loose")):
        handle = apply_caching(pixel_dit.transformer, config_of(method, case))
        handle.remove()
        with pytest.raises(RuntimeError, match="removed"):
            handle.reset()


@pytest.mark.parametrize("method, case", NEVER_SKIP)
def test_the_never_skip_setting_is_exact(latent_dit, method, case):
    runnable(latent_dit, method)
    plain = run(latent_dit)
    with apply_caching(latent_dit, config_of(method, case)):  # a LoadedDiT is accepted too
        cached = run(latent_dit)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("method, case", ALL)
def test_inside_dit_pipeline(latent_dit, method, case):
    runnable(latent_dit, method)
    plain = pipeline_run(latent_dit)
    with apply_caching(latent_dit.transformer, config_of(method, case)) as handle:
        a, b = pipeline_run(latent_dit), pipeline_run(latent_dit)
        stats = handle.stats()
    np.testing.assert_array_equal(a, b)  # the second pipeline call is a new run
    if not (method == "tokencache" and case == "disabled"):
        assert stats["calls"] == 2 * SAMPLING.num_steps and stats["runs"] == 2
    if not CASES[method][case][1]:
        np.testing.assert_array_equal(a, plain)
    np.testing.assert_array_equal(pipeline_run(latent_dit), plain)


def test_methods_one_after_another_do_not_interfere(pixel_dit):
    cases = [(m, c) for m, c in SKIPPING if m == "tokencache" or peer_status(pixel_dit)[m] == "ok"]
    before, plain = snapshot(pixel_dit), run(pixel_dit)
    first = {}
    for method, case in cases + cases[::-1]:
        with apply_caching(pixel_dit.transformer, config_of(method, case)):
            images = run(pixel_dit)
        if (method, case) in first:
            assert torch.equal(images, first[method, case]), f"{method}/{case} changed after the others ran"
        first[method, case] = images
        assert same_snapshot(snapshot(pixel_dit), before), f"{method}/{case} left a trace"
    assert torch.equal(run(pixel_dit), plain)


def test_a_config_of_no_method_is_refused_with_the_list(pixel_dit):
    with pytest.raises(TypeError, match="not the config of a registered caching method.*tokencache"):
        apply_caching(pixel_dit.transformer, {"rho": 0.3})
