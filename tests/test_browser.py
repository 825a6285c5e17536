"""End to end in a real browser: the explorer page (app/explorer.ipynb) served by `python -m helpers.app`
(Voila) on localhost, Debian's chromium driven by Playwright. The page must appear, ask nothing of any
other machine, and change the heatmap when the Exit slider moves. In CI a missing chromium, playwright
or voila is a failure, never a skip."""
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import REAL_SOURCE

from helpers import app

ROOT = Path(__file__).resolve().parent.parent


def need(what: str, ok: bool, how: str) -> None:
    if not ok:
        msg = f"the browser test needs {what}: {how}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def voila_url(tmp_path_factory):
    need("voila", shutil.which("voila") is not None or _importable("voila"), 'pip install -e ".[test]"')
    log = tmp_path_factory.mktemp("voila") / "voila.log"
    env = {"MSDNET_DATA_DIR": None}  # reuse data/cache like the notebooks
    if REAL_SOURCE:
        env["CIFAR10_SOURCE"] = REAL_SOURCE
    with open(log, "w") as out:
        try:
            with app.running(env, out) as url:  # exactly what `python -m helpers.app` runs, in the background
                yield url, log
        except RuntimeError as e:
            pytest.fail(f"{e}:\n{log.read_text()[-3000:]}")


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.slow
def test_moving_the_exit_slider_in_chromium_changes_the_heatmap(voila_url):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium", chromium is not None, "apt-get install chromium (or set CHROMIUM to its path)")
    need("playwright", _importable("playwright"), 'pip install -e ".[test]"')
    from playwright.sync_api import sync_playwright

    url, log = voila_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            asked = []  # every request the page makes: all must stay on this machine
            page.on("request", lambda request: asked.append(request.url))
            start = time.perf_counter()
            page.goto(url, timeout=240_000)
            exit_slider = page.locator(".widget-slider", has=page.locator("label", has_text="Exit")).first
            deadline = time.time() + 240  # voila runs the page's one cell before it shows the app
            while not exit_slider.is_visible():
                if time.time() > deadline or "CellExecutionError" in log.read_text():
                    pytest.fail(f"the explorer did not appear:\n{log.read_text()[-3000:]}")
                page.wait_for_timeout(500)
            print(f"the explorer appeared {time.perf_counter() - start:.1f} s after the page was asked for")
            assert page.locator("h2", has_text="Guide").count() == 1  # the guide under the app
            assert "from helpers import" not in page.content()  # no code shown
            readout = exit_slider.locator(".widget-readout")
            assert readout.inner_text().strip() == "B10"
            images = page.locator(".widget-image")
            page.wait_for_function("document.querySelectorAll('.widget-image').length >= 4", timeout=60_000)
            before = [images.nth(i).get_attribute("src") for i in range(images.count())]

            exit_slider.locator(".noUi-handle").focus()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function("() => document.querySelector('.widget-slider .widget-readout') !== null")
            deadline = time.time() + 60
            after = before
            while time.time() < deadline and after == before:
                page.wait_for_timeout(250)
                after = [images.nth(i).get_attribute("src") for i in range(images.count())]
            assert readout.inner_text().strip() == "B9"
            assert after != before, "the heatmap did not change after the exit slider moved"
            title = page.locator(".widget-html", has_text="says").first.inner_text()
            assert "B9 says" in title
            outside = [u for u in asked if not u.startswith(url) and not u.startswith(("data:", "blob:"))]
            assert not outside, f"the page fetched from outside this machine: {outside}"
        finally:
            browser.close()


@pytest.mark.slow
def test_the_explorers_picture_is_made_from_the_live_page(voila_url, tmp_path):
    """tools/screenshot_explorer.py, which made the picture notebook 07 shows, photographs the app as served."""
    import sys

    import numpy as np
    from PIL import Image

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium", chromium is not None, "apt-get install chromium (or set CHROMIUM to its path)")
    need("playwright", _importable("playwright"), 'pip install -e ".[test]"')
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import screenshot_explorer
    finally:
        sys.path.remove(str(ROOT / "tools"))
    url, _ = voila_url
    out = tmp_path / "explorer.png"
    screenshot_explorer.photograph(url, out, chromium, width=900)
    with Image.open(out) as picture:
        width, height = picture.size
        colours = len(np.unique(np.asarray(picture.convert("RGB").resize((64, 64))).reshape(-1, 3), axis=0))
    assert 600 <= width <= 900 and height >= 300, (width, height)
    assert colours > 100, "the picture is nearly blank: the app was not drawn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explorer.png"], "a temporary file was left"


@pytest.mark.slow
def test_without_cifar10_the_page_shows_the_data_message_alone(tmp_path):
    """The app's page, where a learner looks, says what to do in the message's one line: no traceback, no
    chained network errors, no folder only this project's machines have."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium", chromium is not None, "apt-get install chromium (or set CHROMIUM to its path)")
    need("playwright", _importable("playwright"), 'pip install -e ".[test]"')
    need("voila", shutil.which("voila") is not None or _importable("voila"), 'pip install -e ".[test]"')
    from playwright.sync_api import sync_playwright

    env = {"CIFAR10_SOURCE": str(tmp_path / "no-cifar.tar.gz"), "MSDNET_DATA_DIR": str(tmp_path / "data")}
    with open(tmp_path / "voila.log", "w") as log, app.running(env, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(url, timeout=240_000)
            message = page.get_by_text("CIFAR-10 could not be loaded")
            message.first.wait_for(timeout=240_000)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert "no-cifar.tar.gz does not exist" in text and "--source" in text
    assert "Traceback" not in text and "shared" not in text and "File \"" not in text
