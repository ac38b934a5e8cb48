"""The explorers in a real browser: JupyterLab, headless Chromium, a slider moved and a button clicked by Playwright.

What a student does after `make lab`: open a notebook, run the explorer's
cell, move a knob, read the new numbers. The test starts JupyterLab on a
free port with a token and throw-away settings, user and runtime folders,
on copies of notebooks 08 (CSR) and 04 (structured cuts of SmolLM2), so
nothing it does can touch the committed files. Playwright for Python drives
the system Chromium that `scripts/book_tools.sh` installs; no browser is
downloaded. Each explorer cell runs on its own (it loads what it shows), so
only that cell is executed. The values the browser must show are computed
here by the same explorer, moved the same way. Screenshots go to
`build/explorer_08.png` and `build/explorer_04.png`.

Skipped, with the reason, when Chromium or Playwright is missing, as the
book's browser check is.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 120_000  # a kernel's first import of torch and numba on a busy two-core machine

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium: run sh scripts/book_tools.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on copies of notebooks 04 and 08; yields its base URL and token."""
    home = tmp_path_factory.mktemp("lab")
    root = home / "notebooks"
    root.mkdir()
    for name in ("08_sparse_kernels.ipynb", "04_attention_head_pruning.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, root / name)
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell in the DOM (no windowing), so the explorer cell can be found by its text
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))  # offline: no news toast
    port, token = _free_port(), "ch11-browser-test"
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "CH11_PROGRESS": "0",
           "CH11_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (home / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


def _run_explorer_cell(browser, lab, notebook: str, marker: str, first_line: str):
    """Open `notebook`, run the one cell whose code contains `marker`, wait for `first_line` in its output."""
    url, token = lab
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    # a workspace of its own per notebook: nothing restored from the other test's layout
    page.goto(f"{url}/lab/workspaces/ch11-{notebook[:2]}/tree/{notebook}?token={token}", timeout=TIMEOUT_MS)
    cell = page.locator(".jp-CodeCell", has_text=marker).first
    cell.wait_for(timeout=TIMEOUT_MS)
    # run only when the kernel is up: a key pressed while it starts is dropped
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=TIMEOUT_MS)
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+Enter")  # run this cell only, stay on it
    explorer = cell.locator(".ch11-explorer")
    try:
        explorer.wait_for(timeout=TIMEOUT_MS)
        explorer.get_by_text(first_line, exact=False).wait_for(timeout=TIMEOUT_MS)
    except sync_api.TimeoutError:
        BUILD.mkdir(exist_ok=True)
        page.screenshot(path=str(BUILD / f"explorer_{notebook[:2]}_failed.png"), full_page=True)
        raise AssertionError(f"{notebook}: the explorer did not show {first_line!r}; page errors {errors}; "
                             f"screenshot build/explorer_{notebook[:2]}_failed.png; cell output:\n"
                             + cell.locator(".jp-OutputArea").inner_text()[-2000:]) from None
    return page, cell, explorer, errors


def _shown(explorer) -> str:
    return explorer.locator(".jp-OutputArea-output").last.inner_text()


def test_the_csr_slider_moves_in_jupyterlab(lab, browser):
    from chapter11.experiments.explorers import csr_explorer

    expected = csr_explorer()
    start = expected.text.splitlines()[0]                     # "sparsity 0.500: nnz 24"
    page, cell, explorer, errors = _run_explorer_cell(browser, lab, "08_sparse_kernels.ipynb", "csr_explorer()", start)
    handle = explorer.locator(".noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")                          # one step up the slider: 0.5 -> 0.625
    after = expected.set(sparsity=0.625)
    explorer.get_by_text(after.splitlines()[0], exact=False).wait_for(timeout=TIMEOUT_MS)
    shown = _shown(explorer)
    for line in after.splitlines():                            # the arrays and the byte counts, all of them
        assert line.strip() in shown, (line, shown)
    assert explorer.locator("img").count() >= 1                # the redrawn matrix
    BUILD.mkdir(exist_ok=True)
    cell.screenshot(path=str(BUILD / "explorer_08.png"))
    assert not errors, errors
    page.context.close()


def test_the_structured_cut_buttons_work_in_jupyterlab(lab, browser):
    from chapter11.experiments.explorers import structured_llm_explorer

    expected = structured_llm_explorer()
    page, cell, explorer, errors = _run_explorer_cell(browser, lab, "04_attention_head_pruning.ipynb", "structured_llm_explorer()",
                                                      expected.text.split(";")[0])
    menu = explorer.locator("select").first                    # ten cuts: a drop-down menu
    menu.select_option(label="MLP: 171 neurons per block")
    after = expected.set(cut="MLP: 171 neurons per block")
    explorer.get_by_text(after.split(";")[0], exact=False).wait_for(timeout=TIMEOUT_MS)
    menu.select_option(label="blocks + MLP: 5 blocks, 341 neurons")
    larger = expected.set(cut="blocks + MLP: 5 blocks, 341 neurons")
    explorer.get_by_text(larger.split(";")[0], exact=False).wait_for(timeout=TIMEOUT_MS)
    assert larger in _shown(explorer).replace("\n", " ")
    BUILD.mkdir(exist_ok=True)
    cell.screenshot(path=str(BUILD / "explorer_04.png"))
    assert not errors, errors
    page.context.close()
