"""Shared fixtures: tiny DiTs whose runs take milliseconds, built in the test (no weights on disk), and the
system Chromium driven by Playwright for the browser checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from tclab.models import LoadedDiT, PixelSpaceVAE, default_scheduler_config


def tiny_transformer(in_channels=4, out_channels=8, sample_size=8, layers=2, seed=0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                                 out_channels=out_channels, num_layers=layers, sample_size=sample_size,
                                 patch_size=2, num_embeds_ada_norm=1000).eval()


def hand_transformer(layers=3, sample_size=8, seed=0) -> tuple[DiTTransformer2DModel, torch.Tensor]:
    """A DiT whose blocks can be worked out by hand: block ``l`` adds the constant vector ``b[l]`` to
    every token, ``x_{l+1} = x_l + b[l]``, whatever the step, label or token.

    adaLN-Zero makes it so: ``norm1.linear`` has zero weights and a bias giving shift = scale = 0 and
    gate_msa = 0 (attention adds nothing), gate_mlp = 1; the MLP's last ``Linear`` has zero weights
    and bias ``b[l]``. Returns the transformer and ``b`` (L, C).
    """
    tr = tiny_transformer(3, 3, sample_size=sample_size, layers=layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(layers, tr.inner_dim, generator=g)
    with torch.no_grad():
        for l, blk in enumerate(tr.transformer_blocks):
            lin = blk.norm1.linear
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[5 * tr.inner_dim:] = 1.0  # the sixth chunk: gate_mlp
            last = [m for m in blk.ff.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.copy_(b[l])
    return tr, b


def tiny_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16).eval()


@pytest.fixture
def latent_dit() -> LoadedDiT:
    """A 2-block latent DiT (8x8x4 latents, learned sigma) with a random 2x-downsampling VAE."""
    return LoadedDiT(name="tiny-latent", transformer=tiny_transformer(), vae=tiny_vae(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test")


@pytest.fixture
def hand_dit() -> LoadedDiT:
    """The hand-computable 3-block pixel DiT of :func:`hand_transformer`; ``.b`` holds the updates (L, C)."""
    tr, b = hand_transformer()
    model = LoadedDiT(name="hand", transformer=tr, vae=PixelSpaceVAE(), scheduler_config=default_scheduler_config(),
                      trained=False, source="test", class_names=["a", "b", "c"])
    model.b = b
    return model


@pytest.fixture
def pixel_dit() -> LoadedDiT:
    """A 2-block pixel-space DiT on 8x8x3 images with 3 classes (4x4 token grid)."""
    return LoadedDiT(name="tiny-pixel", transformer=tiny_transformer(3, 3), vae=PixelSpaceVAE(),
                     scheduler_config=default_scheduler_config(), trained=False, source="test",
                     class_names=["a", "b", "c"])


# ---- the system Chromium, driven by Playwright (tests/browser/, and the index's browser checks) ------------
# Playwright's own browser downloads are never used: the tests drive the Chromium the system provides
# (Debian's ``chromium``; ``.ci/run`` installs it where it is missing). Without Playwright or without a
# Chromium on PATH every browser test is skipped, with the reason and the command that installs it.
#
# - ``browser`` (session): a Playwright ``Browser``; one Chromium for the whole session.
# - ``page``: a fresh context and page, 1280x900, whose console errors and uncaught page errors
#   are collected in ``page.console_errors`` (list of str) for the tests' failure messages.
# - ``screenshots_dir``: where a test saves its screenshots: ``$TCLAB_SCREENSHOTS`` if set, else
#   the test's temporary folder.


#: The names Chromium goes by on PATH (Debian: ``chromium``; Ubuntu's and older packages: ``chromium-browser``).
CHROMIUM_NAMES = ("chromium", "chromium-browser")
#: Environment variable naming the folder the browser tests write their screenshots to.
SCREENSHOTS_ENV = "TCLAB_SCREENSHOTS"
VIEWPORT = {"width": 1280, "height": 900}


def find_chromium() -> str | None:
    """The path of the system Chromium, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser():
    """A Playwright ``Browser`` on the system Chromium (headless); skips when either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('Playwright is not installed (it is in the test extra): pip install -e ".[test]"')
    exe = find_chromium()
    if exe is None:
        pytest.skip(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}): apt-get install chromium")
    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in containers, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A new page (own context, 1280x900) recording console errors in ``page.console_errors``."""
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda msg: pg.console_errors.append(msg.text) if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: pg.console_errors.append(f"uncaught: {exc}"))
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture
def screenshots_dir(tmp_path) -> Path:
    """The folder for this test's screenshots: ``$TCLAB_SCREENSHOTS`` (created) or the test's tmp dir."""
    d = Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else tmp_path / "screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def perturbed(p, seed=0):
    """A predictor (any module) with random (non-zero) weights, so its scores are not all 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in p.parameters():
            q.copy_(torch.randn(q.shape, generator=g) * 0.5)
    return p


# ---- reference packages of the parity tests (tests/test_metric_parity.py, tests/test_lpips.py) -------------

def in_ci() -> bool:
    """True where the environment variable ``CI`` is ``true`` (or ``1``), as CI services and ``.ci/run`` set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require_reference(module: str, install: str) -> None:
    """Skip the calling test when the reference package ``module`` is not installed; under ``CI=true`` fail it.

    The message names the package and ``install``, the command that installs it. Only a package that
    is missing is handled so: one that is installed but fails to import raises as usual.
    """
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return
    msg = f"reference package {module!r} is not installed: {install}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: the parity tests must run there, not skip)", pytrace=False)
    pytest.skip(msg)
