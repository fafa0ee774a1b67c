"""Notebook 06 in a real JupyterLab (issue 15, item 7): the interactive token-change explorer renders
as a widget, not as its text fallback, and the kernel redraws the map when a reader moves its controls.

A JupyterLab server runs on loopback over a temporary copy of ``notebooks/``, with every folder
Jupyter, IPython, matplotlib and tclab write to (settings, workspaces, runtime files, kernelspecs,
run folders, the artefact store) pointed at temporary ones, so the user's own settings neither leak
in nor get written, and JupyterLab's autosave can only ever touch the copy (checked at the end:
the repository's ``notebooks/`` is byte for byte what it was). The system Chromium (Playwright,
``tests/browser/conftest.py``) opens the notebook, runs every cell, and works the explorer's step
slider and measure drop-down. Screenshots go to ``$TCLAB_SCREENSHOTS`` (else the test's tmp dir).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tclab.artefacts import HOME_ENV
from tclab.runs import REPORTS_DIR_ENV

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = "notebooks/06_explore.ipynb"  # relative to the server's root_dir, which holds a copy of notebooks/
SERVER_START_S = 60  # until /api/status answers
KERNEL_IDLE_S = 90  # page load, kernel start
RUN_ALL_S = 180  # kernel imports tclab (torch, diffusers), records a small run, builds both explorers
REACT_S = 20  # one redraw by the kernel after a control moves
# The text a widget output shows when the widget did not render (no widget manager, a JS error, a
# dead comm): JupyterLab's placeholders and the object's text/plain repr.
FALLBACK_TEXTS = ("Loading widget", "Error displaying widget", "TokenChangeExplorer of", "VBox(children")


# ---- the server ------------------------------------------------------------------------------------

@dataclass
class LabServer:
    """A running JupyterLab: where it listens, what it serves, and where it logs."""

    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # --ServerApp.root_dir; holds the copy of notebooks/
    reports_dir: Path  # $TCLAB_REPORTS_DIR of the server and its kernels
    log: Path  # the server's stdout and stderr (kernels' stderr too)

    def lab_url(self, path: str) -> str:
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else "(no log written)"
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _isolated_env(tmp: Path, reports_dir: Path) -> dict[str, str]:
    """This process's environment with every folder Jupyter & co. read or write moved under ``tmp``."""
    # JUPYTER_PATH, JUPYTER_CONFIG_PATH, JUPYTER_TOKEN, ... of the caller would add their settings: drop them all.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    folders = {
        "JUPYTER_CONFIG_DIR": "jupyter-config",  # config files and lab/user-settings
        "JUPYTER_DATA_DIR": "jupyter-data",  # kernelspecs, lab extensions of the user
        "JUPYTER_RUNTIME_DIR": "jupyter-runtime",  # server info, kernel connection files, cookie secret
        "HOME": "home",
        "XDG_CONFIG_HOME": "home/.config",
        "XDG_CACHE_HOME": "home/.cache",
        "XDG_DATA_HOME": "home/.local/share",
        "IPYTHONDIR": "home/.ipython",
        "MPLCONFIGDIR": "home/.matplotlib",
        HOME_ENV: "tclab-home",  # predictors/classifiers tclab might train or cache
    }
    for var, sub in folders.items():
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    env[REPORTS_DIR_ENV] = str(reports_dir)  # run folders the notebook opens land here, not in reports/
    # user folders (ours, above) before the environment's: our kernelspec wins over sys.prefix's
    env["JUPYTER_PREFER_ENV_PATH"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _configure(tmp: Path, env: dict[str, str]) -> None:
    """Server config, JupyterLab user settings and a kernelspec, all inside the temporary folders."""
    config_dir, data_dir = Path(env["JUPYTER_CONFIG_DIR"]), Path(env["JUPYTER_DATA_DIR"])
    # In a config file, not on the command line: `--LabApp.news_url=` sets "" (not None), and the news
    # handler fetches every URL that is not None. There is no internet here; nothing may be fetched.
    _write_json(config_dir / "jupyter_server_config.json", {"LabApp": {
        "news_url": None,  # no announcements feed
        "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",  # no PyPI query
        "extension_manager": "readonly",  # the default "pypi" manager searches PyPI
        "workspaces_dir": str(tmp / "workspaces"),  # no workspace of the user is read or written
        "expose_app_in_browser": True,  # window.jupyterapp: run commands by their ID (see _run_all_cells)
    }})
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    # the front end asks (in a toast that covers the page) whether to fetch news; answer "never" up front
    _write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    # Attach every cell to the DOM. The default ("contentVisibility") lets the browser skip off-screen
    # cells, which makes "is it visible" and "how many prompts ran" depend on the scroll position.
    _write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none"})
    # The notebook asks for kernel "python3": make it this interpreter (the one with this checkout's
    # tclab installed editable), whatever `python` on PATH is.
    _write_json(data_dir / "kernels" / "python3" / "kernel.json", {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"})


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server (it shuts its kernels down), kill it if it hangs, then anything left in its group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    # the server was started in a session of its own: its kernels are in that process group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def jupyterlab_server(tmp: Path, notebooks: Path):
    """Run JupyterLab on loopback over a copy of ``notebooks`` (as ``<root>/notebooks``); yields a LabServer."""
    root = tmp / "root"
    shutil.copytree(notebooks, root / notebooks.name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    reports_dir = tmp / "reports"
    reports_dir.mkdir()
    env = _isolated_env(tmp, reports_dir)
    _configure(tmp, env)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0",  # the port is taken: fail, rather than serve on one we don't poll
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers run the tests as root; the server refuses root without it
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, root=root, reports_dir=reports_dir,
                       log=tmp / "jupyterlab.log")
    with open(server.log, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} before answering; its log:\n"
                            f"{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer /api/status within {SERVER_START_S} s; the end of its "
                            f"log:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too: .ipynb_checkpoints would show) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the page --------------------------------------------------------------------------------------

def _diagnostics(page, lab: LabServer, screenshots: Path) -> str:
    """What a failure message needs: the cells' outputs, the console errors, the server's log tail."""
    parts = []
    with contextlib.suppress(Exception):  # the page may be gone; report what can still be read
        page.screenshot(path=str(screenshots / "06_explore_failure.png"))
        parts.append(f"screenshot: {screenshots / '06_explore_failure.png'}")
    with contextlib.suppress(Exception):
        outs = [t.strip()[:600] for t in page.locator(".jp-OutputArea-output").all_inner_texts()]
        parts.append("cell outputs:\n" + ("\n---\n".join(outs) or "(none)"))
    parts.append("console errors:\n" + ("\n".join(page.console_errors[-20:]) or "(none)"))
    parts.append("JupyterLab log tail:\n" + lab.log_tail())
    return "\n\n".join(parts)


# The notebook's kernel is started, connected and idle. The toolbar's indicator (data-status="idle") is
# not enough: it reads "idle" before the kernel's websocket is open, and cells run then are dropped.
_KERNEL_READY_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const ctx = w && w.sessionContext, k = ctx && ctx.session && ctx.session.kernel;
  return !!k && ctx.isReady && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


def _run_all_cells(page) -> None:
    """Wait for the notebook's kernel, then run every cell through JupyterLab's command registry.

    ``notebook:run-all-cells`` is the command the Run menu's "Run All Cells" item itself calls; its ID
    has been stable since JupyterLab 1 and does not depend on menu labels (translated, reordered
    between releases), on the focus a keyboard shortcut needs (run-all has no default shortcut), or on
    the command palette's search ranking. ``window.jupyterapp`` exists because the test server sets
    ``LabApp.expose_app_in_browser``. The command's promise settles only when every cell has run, so
    it is started, not awaited: the caller polls the page with its own timeouts.
    """
    page.wait_for_function(_KERNEL_READY_JS, timeout=KERNEL_IDLE_S * 1000)
    assert page.evaluate("() => window.jupyterapp.commands.isEnabled('notebook:run-all-cells')"), \
        "JupyterLab's notebook:run-all-cells command is disabled: no notebook is the current widget"
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def _wait_for_explorer(page, deadline_s: float):
    """The output holding the explorer widget, once its step slider rendered; fails early on a traceback."""
    step_label = page.locator(".widget-label", has_text=re.compile(r"^step$"))
    output = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-slider", has=step_label))
    deadline = time.monotonic() + deadline_s
    while output.count() == 0:
        for text in page.locator(".jp-OutputArea-output").all_inner_texts():
            if "Traceback (most recent call last)" in text:
                raise AssertionError(f"a cell of {NOTEBOOK} raised:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the explorer's step slider did not render within {deadline_s:.0f} s of Run All")
        page.wait_for_timeout(500)
    return output.first


def _control(output, kind: str, label: str):
    """The ipywidgets control of CSS class ``kind`` (widget-slider, widget-dropdown) whose label is ``label``."""
    return output.locator(f".{kind}").filter(
        has=output.page.locator(".widget-label", has_text=re.compile(f"^{re.escape(label)}$")))


def _wait_src_change(page, img, before: str, what: str) -> str:
    """Poll until the map image's src differs from ``before`` (the kernel sent a new PNG); returns it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("([img, before]) => img.src !== before && img.complete && img.naturalWidth > 0",
                               arg=[img.element_handle(), before], timeout=REACT_S * 1000)
    except PlaywrightTimeout as e:  # say what did not happen
        raise AssertionError(f"the map image did not change within {REACT_S} s after {what}") from e
    return img.get_attribute("src")


def _shoot(page, output, path: Path) -> Path:
    """A viewport screenshot of the notebook with the explorer's top at the top of the view."""
    output.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)  # let the scroll settle before capturing
    page.screenshot(path=str(path))
    return path


# ---- the test --------------------------------------------------------------------------------------

def test_notebook_06_explorer_renders_and_reacts_in_jupyterlab(page, screenshots_dir, tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    before = _snapshot(REPO / "notebooks")
    t0 = time.monotonic()
    shots, failure = [], None
    with jupyterlab_server(tmp_path / "lab", REPO / "notebooks") as lab:
        try:
            page.goto(lab.lab_url(NOTEBOOK), wait_until="domcontentloaded", timeout=60_000)
            panel = page.locator(".jp-NotebookPanel")
            expect(panel).to_be_visible(timeout=KERNEL_IDLE_S * 1000)
            _run_all_cells(page)

            output = _wait_for_explorer(page, RUN_ALL_S)
            # Every code cell has run ("[n]:" prompts) and the kernel is idle again: notebook done.
            page.wait_for_function(
                "() => { const p = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')];"
                " return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)) && document.querySelector("
                "'.jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status=\"idle\"]'); }",
                timeout=RUN_ALL_S * 1000)
            texts = page.locator(".jp-OutputArea-output").all_inner_texts()
            errors = [t for t in texts if "Traceback (most recent call last)" in t]
            assert not errors, f"a cell of {NOTEBOOK} raised:\n{errors[0][-3000:]}"
            fallback = [f for f in FALLBACK_TEXTS for t in texts if f in t]
            assert not fallback, f"a widget output shows the fallback text {fallback[0]!r}, not the widget"

            # The widget, not its text: the map is an <img> with decoded pixels.
            img = output.locator("img.widget-image").first
            expect(img).to_be_visible(timeout=REACT_S * 1000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=REACT_S * 1000)
            readout = output.locator(".widget-html code", has_text=re.compile(r"^step \d+,"))
            step0 = int(_control(output, "widget-slider", "step").locator(".widget-readout").inner_text())
            expect(readout).to_have_text(re.compile(rf"^step {step0}, .*out_change"))
            src = img.get_attribute("src")
            shots.append(_shoot(page, output, screenshots_dir / "06_explore_1_rendered.png"))

            # Step slider, by keyboard: noUiSlider's handle takes arrow keys once focused.
            handle = _control(output, "widget-slider", "step").locator(".noUi-handle")
            handle.focus()
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            src = _wait_src_change(page, img, src, "two ArrowRight presses on the step slider")
            expect(readout).to_have_text(re.compile(rf"^step {step0 + 2}, "), timeout=REACT_S * 1000)
            shots.append(_shoot(page, output, screenshots_dir / "06_explore_2_after_step.png"))

            # Measure drop-down: a native <select>.
            _control(output, "widget-dropdown", "measure").locator("select").select_option("update_change")
            _wait_src_change(page, img, src, "choosing measure update_change")
            expect(readout).to_have_text(re.compile(rf"^step {step0 + 2}, .*update_change"), timeout=REACT_S * 1000)
            shots.append(_shoot(page, output, screenshots_dir / "06_explore_3_after_measure.png"))

            # The kernel-free explorer of the next cell is an HTML output whose script fills its readout:
            # JupyterLab ran it (outputs made in this session are trusted).
            expect(page.locator(".tclab-readout").first).to_have_text(re.compile(r"^step \d+, "))

            widget_errors = [e for e in page.console_errors if "widget" in e.lower()]
            assert not widget_errors, f"the widget manager logged errors: {widget_errors}"
        except (AssertionError, PlaywrightError) as e:  # expect() raises the one, waits the other
            failure = f"{e}\n\n{_diagnostics(page, lab, screenshots_dir)}"  # read while the server still runs
        if failure is None:
            summaries = list(lab.reports_dir.glob("*/summary.json"))
            assert summaries, (f"no run folder with summary.json in $TCLAB_REPORTS_DIR ({lab.reports_dir}): the "
                               f"notebook's last cell did not run there\n{lab.log_tail()}")
    if failure is not None:
        # the message is the whole story (what did not happen, outputs, console, server log): no pytest trace
        pytest.fail(failure, pytrace=False)

    print(f"\nJupyterLab test: {time.monotonic() - t0:.0f} s; screenshots:\n  " + "\n  ".join(map(str, shots)))
    after = _snapshot(REPO / "notebooks")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (f"the repository's notebooks/ changed while JupyterLab ran (it must only see a copy): "
                         f"{changed}")
