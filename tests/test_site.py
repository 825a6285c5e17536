"""The series as a website: Sphinx builds it from the README and the committed notebooks with warnings as
errors, and every page opens in a real chromium with its figures drawn. In CI a missing chromium or
Playwright is a failure, never a skip."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_browser import _importable, need

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-b", "html", "docs", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the site does not build without warnings:\n{done.stderr[-3000:]}"
    return out


def test_reading_the_sites_configuration_writes_nothing(tmp_path):
    import runpy

    (tmp_path / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "conf.py", tmp_path / "docs" / "conf.py")
    (tmp_path / "README.md").write_text("# a readme\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_a.ipynb").write_text("{}")
    runpy.run_path(str(tmp_path / "docs" / "conf.py"))
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["conf.py"]


@pytest.mark.slow
def test_the_site_has_the_readme_as_front_page_and_every_notebook(site):
    index = (site / "index.html").read_text()
    assert "Visualizing MSD-Net with Grad-CAM" in index and "The two commands" in index
    for name in NOTEBOOKS:
        assert (site / "notebooks" / f"{name}.html").is_file(), name
        assert f'href="notebooks/{name}.html"' in index, f"the front page does not link {name}"


@pytest.mark.slow
def test_every_page_renders_its_figures_in_chromium(site):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium", chromium is not None, "apt-get install chromium (or set CHROMIUM to its path)")
    need("playwright", _importable("playwright"), 'pip install -e ".[test]"')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            for name in ["index", *(f"notebooks/{n}" for n in NOTEBOOKS)]:
                page.goto((site / f"{name}.html").as_uri())
                page.wait_for_load_state("load")
                sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
                assert all(done and width > 0 for done, width in sizes), f"{name}: an image did not load"
                if name != "index" and not name.endswith("07_explorer"):  # the app needs a kernel
                    assert len(sizes) >= 1, f"{name}: no figure on the page"
                assert page.title(), name
        finally:
            browser.close()
