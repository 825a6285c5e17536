"""The series as a website: Sphinx builds it from the committed notebooks, the README's set-up section and the
pages in docs/ with warnings as errors; its math is drawn by MathJax, every notebook can be downloaded, and
every page opens in a real chromium with its figures drawn. In CI a missing chromium or Playwright is a
failure, never a skip."""
import json
import os
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_browser import _importable, need

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_reading_the_sites_configuration_writes_nothing(tmp_path):
    import runpy

    (tmp_path / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "conf.py", tmp_path / "docs" / "conf.py")
    (tmp_path / "README.md").write_text("# a readme\n")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_a.ipynb").write_text("{}")
    runpy.run_path(str(tmp_path / "docs" / "conf.py"))
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["conf.py"]


@pytest.mark.parametrize("urls", ["", '[project.urls]\nRepository = "https://example.org/msdnet"\n'])
def test_the_repository_button_appears_when_pyproject_names_the_address(tmp_path, urls):
    import runpy

    if urls and sys.version_info < (3, 11):
        pytest.skip("conf.py reads pyproject.toml with tomllib, Python 3.11+; on 3.10 the site has no button")

    (tmp_path / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "conf.py", tmp_path / "docs" / "conf.py")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n' + urls)
    options = runpy.run_path(str(tmp_path / "docs" / "conf.py"))["html_theme_options"]
    assert options["use_repository_button"] == bool(urls)
    assert options.get("repository_url") == ("https://example.org/msdnet" if urls else None)


@pytest.mark.slow
def test_the_site_has_a_front_page_every_notebook_and_the_reference_pages(site):
    index = (site / "index.html").read_text()
    assert "Visualizing MSD-Net with Grad-CAM" in index and "The two commands" in index  # the README's set-up
    for name in NOTEBOOKS:
        assert (site / "notebooks" / f"{name}.html").is_file(), name
        assert f'href="notebooks/{name}.html"' in index, f"the front page does not link {name}"
    for page in PAGES:
        assert (site / f"{page}.html").is_file(), page
        assert f'href="{page}.html"' in index, f"the front page does not link {page}"


PAGES = ["explorer", "appendix", "benchmarks", "api", "glossary"]


@pytest.mark.slow
def test_the_reference_pages_have_their_content(site):
    api = (site / "api.html").read_text()
    for module in ("msdnet", "data", "evaluate", "policies", "earlyexit", "gradcam"):
        assert f'id="module-helpers.{module}"' in api, f"api.html lacks helpers.{module}"
    glossary = (site / "glossary.html").read_text()
    for term in ("term-exit", "term-Grad-CAM", "term-ROAD", "term-overthinking"):
        assert f'id="{term}"' in glossary, term
    appendix = (site / "appendix.html").read_text()
    assert "How the checkpoint was made" in appendix and "tools/gpu_train.sh" in appendix
    # The benchmarks page holds the tables the scripts wrote, each under the command that measured it.
    included = re.findall(r"```\{include\} (results/(\w+)\.md)", (ROOT / "docs" / "benchmarks.md").read_text())
    assert included, "the benchmarks page includes no measured tables"
    for path, script in included:
        assert (ROOT / "docs" / path).is_file() and (ROOT / "benchmarks" / f"{script}.py").is_file(), path
    benchmarks = (site / "benchmarks.html").read_text()
    assert benchmarks.count("Measured by") == len(included) and benchmarks.count("<table") >= len(included)


@pytest.mark.slow
def test_every_notebook_page_offers_its_notebook_for_download(site):
    for name in NOTEBOOKS:
        html = (site / "notebooks" / f"{name}.html").read_text()
        assert f'href="../_sources/notebooks/{name}.ipynb"' in html, f"{name}: no download link"
        downloaded = json.loads((site / "_sources" / "notebooks" / f"{name}.ipynb").read_text())
        assert downloaded["cells"], name


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _TextOutsideMath(HTMLParser):
    """The page's text outside code, scripts and the math elements MathJax typesets."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[bool] = []  # per open element: is its content left out?
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        self.open.append(tag in ("script", "style", "code", "pre") or "math" in classes)

    def handle_endtag(self, tag):
        if tag not in VOID and self.open:
            self.open.pop()

    def handle_data(self, data):
        if not any(self.open):
            self.text.append(data)


def notebook_math(name: str) -> list[str]:
    """The $...$ and $$...$$ spans of a notebook's markdown cells."""
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    text = re.sub(r"`[^`]*`", "", text)  # code spans are not math
    return re.findall(r"\$\$.+?\$\$|\$[^$\n]+\$", text, flags=re.S)


@pytest.mark.slow
def test_the_notebooks_math_is_typeset_not_shown_raw(site):
    with_math = [name for name in NOTEBOOKS if notebook_math(name)]
    assert with_math, "no notebook writes math: this test checks nothing"
    for name in NOTEBOOKS:
        html = (site / "notebooks" / f"{name}.html").read_text()
        parser = _TextOutsideMath()
        parser.feed(html)
        raw = re.findall(r"\$[^$\s][^$]*?\$", "".join(parser.text))
        assert not raw, f"{name}: math left as text: {raw[:3]}"
        if name in with_math:
            assert re.search(r'<script[^>]+src="[^"]*mathjax[^"]*"', html), f"{name}: MathJax is not loaded"
            typeset = re.findall(r'<(?:span|div) class="math[^"]*">\s*(\\\(|\\\[|\$\$)', html)
            assert len(typeset) >= len(notebook_math(name)), f"{name}: {len(typeset)} math elements for {len(notebook_math(name))} formulas"


@pytest.mark.slow
def test_every_page_renders_its_figures_and_math_in_chromium(site):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium", chromium is not None, "apt-get install chromium (or set CHROMIUM to its path)")
    need("playwright", _importable("playwright"), 'pip install -e ".[test]"')
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            for name in ["index", *PAGES, *(f"notebooks/{n}" for n in NOTEBOOKS)]:
                page.goto((site / f"{name}.html").as_uri())
                page.wait_for_load_state("load")
                sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
                assert all(done and width > 0 for done, width in sizes), f"{name}: an image did not load"
                if name.startswith("notebooks/") and not name.endswith("07_explorer"):  # the app needs a kernel
                    assert len(sizes) >= 1, f"{name}: no figure on the page"
                formulas = notebook_math(name.removeprefix("notebooks/")) if name.startswith("notebooks/") else []
                if formulas:  # MathJax comes with the site: it typesets here, where there is no network
                    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                           timeout=30_000)
                    page.evaluate("() => MathJax.startup.promise")
                    drawn = page.eval_on_selector_all("mjx-container", "els => els.length")
                    assert drawn >= len(formulas), f"{name}: MathJax drew {drawn} of {len(formulas)} formulas"
                assert page.title(), name
        finally:
            browser.close()
