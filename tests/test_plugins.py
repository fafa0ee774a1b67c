"""A team's own scorer and caching method, shipped in their own package and declared as entry points
(``tclab.scorers``, ``tclab.methods``), are usable by name everywhere: in configs, in
``apply_caching``, in sweeps, and in a notebook's parameters (whose kernel is another process).

The package is written into a temporary folder with a ``.dist-info`` (what ``pip install`` leaves),
so ``importlib.metadata`` finds its entry points exactly as it would an installed package's.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

SCORERS_PY = '''
import torch
from tclab.cache import TokenScorer, register_scorer


class CentreScorer(TokenScorer):
    """Compute the tokens nearest the image centre first."""

    name = "team-centre"

    def score(self, ctx):
        B, L, N = ctx.shape
        H, W = ctx.grid
        r = torch.arange(H, dtype=torch.float32, device=ctx.device)[:, None] - (H - 1) / 2
        c = torch.arange(W, dtype=torch.float32, device=ctx.device)[None, :] - (W - 1) / 2
        near = 1 / (1 + (r * r + c * c)).reshape(1, 1, N)
        return near.expand(B, L, N).clone()


register_scorer("team-centre", lambda config, **options: CentreScorer())
'''

PEER_PY = '''
from dataclasses import dataclass

from tclab.cache.peers import DiffusersPeer, register_peer


@dataclass
class NothingConfig:
    """A peer that hooks nothing (a test of discovery)."""


class NothingPeer(DiffusersPeer):
    def _install(self):
        pass  # hooks nothing: the outputs stay exact


register_peer("team-nothing", NothingConfig, NothingPeer)
'''

METHODS_PY = '''
from dataclasses import dataclass

from tclab.cache import CachingHandle, register_method
from tclab.cache.methods import common_stats


@dataclass
class HalfLastBlockConfig:
    """Reuse the last block's output on every other call (a toy method)."""

    every: int = 2


class HalfLastBlock(CachingHandle):
    method = "team-half-last"

    def __init__(self, transformer, config):
        super().__init__(transformer, config)
        self.block = transformer.transformer_blocks[-1]
        self.calls, self.cached, self.last = 0, 0, None
        self._hook = self.block.register_forward_hook(self._hook_fn)

    def _hook_fn(self, module, args, output):
        self.calls += 1
        if self.last is not None and self.last.shape == output.shape and self.calls % self.config.every == 0:
            self.cached += 1
            return self.last
        self.last = output
        return None

    def reset(self):
        self.last = None

    def stats(self):
        return common_stats(self.method, calls=self.calls, cached_steps=self.cached,
                            full_steps=self.calls - self.cached)

    def remove(self):
        if not self.removed:
            self._hook.remove()
        self.removed = True


register_method("team-half-last", HalfLastBlockConfig, HalfLastBlock)
'''


@pytest.fixture
def team_package(tmp_path, monkeypatch):
    """An installed-looking package ``team_ext`` declaring a scorer and a caching method."""
    root = tmp_path / "site"
    (root / "team_ext").mkdir(parents=True)
    (root / "team_ext" / "__init__.py").write_text("")
    (root / "team_ext" / "scorers.py").write_text(SCORERS_PY)
    (root / "team_ext" / "methods.py").write_text(METHODS_PY)
    (root / "team_ext" / "peer.py").write_text(PEER_PY)
    info = root / "team_ext-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: team-ext\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [tclab.scorers]
        team-centre = team_ext.scorers

        [tclab.methods]
        team-half-last = team_ext.methods
        team-nothing = team_ext.peer
        """))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root))
    yield root
    from tclab.cache.methods import METHODS
    from tclab.cache.registry import SCORERS

    SCORERS._entries.pop("team-centre", None)
    METHODS.unregister("team-half-last")
    from tclab.cache.peers import PEERS, unregister_peer

    if "team-nothing" in PEERS:
        unregister_peer("team-nothing")
    for name in [m for m in sys.modules if m == "team_ext" or m.startswith("team_ext.")]:
        del sys.modules[name]


def test_entry_points_make_names_known_before_import(team_package):
    from tclab.cache import TokenCacheConfig, available_methods, available_scorers

    assert "team_ext.scorers" not in sys.modules
    assert "team-centre" in available_scorers() and "team-half-last" in available_methods()
    TokenCacheConfig(scorer="team-centre")  # validates by name, nothing imported yet
    assert "team_ext.scorers" not in sys.modules


def test_a_team_peer_joins_the_registered_peers(team_package):
    from tclab.ablation import reference_variants
    from tclab.cache.peers import PEERS, peer_names

    assert "team-nothing" not in PEERS  # not imported yet
    assert peer_names()[-1] == "team-nothing"  # the entry point was imported and registered it
    assert "peer team-nothing" in {v.name for v in reference_variants(10, peers="registered")}


def test_a_team_peer_runs_in_a_sweep(team_package, pixel_dit):
    from tclab.ablation import SweepSettings, reference_variants, run_sweep

    points = [v for v in reference_variants(4, fora_intervals=(), fewer_steps=(), peers="registered")
              if v.name in ("full compute", "peer team-nothing")]
    result = run_sweep(pixel_dit, points, SweepSettings(num_steps=4, quality_samples=2, timing_batch=1,
                                                        timing_repeats=1), progress=False)
    row = result.frame.set_index("name").loc["peer team-nothing"]
    assert row["error"] == "" and row["flop_ratio"] == 1.0  # it ran, and (hooking nothing) saved nothing
    assert torch.equal(result.images["peer team-nothing"], result.images["full compute"])


def test_a_broken_plugin_is_skipped_with_a_warning_not_fatal(team_package, pixel_dit):
    from tclab.cache import TokenCacheConfig, apply_caching
    from tclab.cache.methods import METHODS

    info = team_package / "team_ext-0.1.dist-info" / "entry_points.txt"
    info.write_text(info.read_text() + "team-broken = team_ext_not_installed.sub\n")
    with pytest.warns(UserWarning, match="team-broken.*could not be imported"):
        METHODS.load_all()
    with apply_caching(pixel_dit.transformer, TokenCacheConfig(rho=0.3)) as handle:  # everything else works
        assert handle.method == "tokencache"


def test_a_team_scorer_and_method_run_by_name(team_package, pixel_dit):
    from tclab.ablation import SweepSettings, predictor_variants, run_sweep
    from tclab.cache import TokenCacheConfig, apply_caching
    from tclab.cache.methods import method_config
    from tclab.sampling import SampleConfig, sample

    cfg = SampleConfig(num_steps=4, seed=1)
    plain = sample(pixel_dit, [0, 1], cfg, progress=False).images
    with apply_caching(pixel_dit.transformer, TokenCacheConfig(rho=0.3, scorer="team-centre")) as handle:
        centre = sample(pixel_dit, [0, 1], cfg, progress=False).images
        assert handle.stats()["cached_steps"] > 0
    with apply_caching(pixel_dit.transformer, method_config("team-half-last", every=2)) as handle:
        half = sample(pixel_dit, [0, 1], cfg, progress=False).images
        assert handle.stats()["cached_steps"] == 2 and handle.stats()["calls"] == 4
    assert not torch.equal(centre, plain) and not torch.equal(half, plain)
    result = run_sweep(pixel_dit, predictor_variants(["team-centre"], [0.3]),
                       SweepSettings(num_steps=4, quality_samples=2, timing_batch=1, timing_repeats=1), progress=False)
    row = result.frame.set_index("curve").loc["team-centre"]
    assert row["error"] in ("", None) or pd.isna(row["error"]), row["error"]
    assert row["flop_ratio"] < 1


def test_a_team_scorer_is_usable_in_a_notebooks_parameters(team_package, tmp_path):
    """The notebook's kernel is a new process: it finds the scorer through the entry point."""
    from tclab import runs

    root = Path(__file__).resolve().parent.parent
    params = {"num_steps": 4, "quality_samples": 2, "timing_batch": 1, "timing_repeats": 1, "fewer_steps": [2],
              "fora_intervals": [2], "budget": 0.7, "reductions": [1.5], "rhos": [0.3],
              "scorers": ["team-centre", "random"], "peers": []}
    run_dir = runs.run_notebook(root / "notebooks" / "02_ablation_predictor.ipynb", params,
                                reports_dir=tmp_path / "reports", tag="plugin", progress_bar=False)
    frame = pd.read_csv(run_dir / "sweep.csv", keep_default_na=False)
    ok = frame[frame["error"] == ""]
    assert {"team-centre", "random"} <= set(ok.loc[ok["family"] == "ablation", "curve"])
    assert json.loads((run_dir / "summary.json").read_text())
