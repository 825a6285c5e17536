"""The series as a website: a short landing page, the notebooks with their stored outputs, and the pages
that hold what the README leaves out (how the checkpoint was made, benchmarks, API, glossary).

    python -m sphinx -W -b html docs docs/_build/html

Nothing is executed (the notebooks are committed executed), so it builds in about a minute on any machine.
"""
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

from sphinx.util import logging

_here = Path(__file__).resolve().parent
sys.path.insert(0, str(_here.parent))  # autodoc imports `helpers` from this checkout, installed or not


def _copy_sources(app) -> None:
    """Copy the README and the notebooks in when a build starts (Sphinx reads only its own folder).

    The copies are byte for byte the committed files (ignored by git, so the site always shows what is
    committed), and a notebook downloaded from the site is the one in the repository: its links work beside a
    clone's notebooks/. Their links are mapped to the site's layout as Sphinx reads them (`site_link`).
    Reading this file writes nothing.
    """
    (_here / "notebooks").mkdir(exist_ok=True)
    for nb in sorted((_here.parent / "notebooks").glob("*.ipynb")):
        shutil.copy2(nb, _here / "notebooks" / nb.name)
    shutil.copy2(_here.parent / "README.md", _here / "README.md")


def site_link(docname: str, target: str) -> str:
    """Where a relative link of page `docname`, written for the repository, points on the site.

    In the repository a notebook links the README and the site's pages as ../README.md and ../docs/<page>.md,
    and a page of docs/ links a notebook as ../notebooks/<name>.ipynb; on the site the front page is index.md,
    the pages sit one folder up from the notebooks, and the notebooks' copies sit in docs/notebooks/.
    """
    if docname.startswith("notebooks/"):
        if target == "../README.md" or target.startswith("../README.md#"):
            return "../index.md" + target[len("../README.md"):]
        if target.startswith("../docs/"):
            return "../" + target[len("../docs/"):]
    elif target.startswith("../notebooks/"):
        return target[len("../"):]
    return target


_LINK = re.compile(r"(\]\()(\.\./[^)\s\"]+)(\))")


def _links_for_the_site(app, docname: str, source: list[str]) -> None:
    source[0] = _LINK.sub(lambda m: m.group(1) + site_link(docname, m.group(2)) + m.group(3), source[0])


_DOCSTRING_NOTEBOOK_LINK = re.compile(r"\[([^\]]+)\]\(\.\./notebooks/(\w+)\.ipynb\)")


def _docstring_links(app, what, name, obj, options, lines: list[str]) -> None:
    """A docstring links a notebook as Markdown, [02](../notebooks/02_....ipynb), which reads well in the code;
    on the API page it becomes a link to the notebook's page (checked by Sphinx: a missing one is a warning)."""
    lines[:] = [_DOCSTRING_NOTEBOOK_LINK.sub(r":doc:`\1 </notebooks/\2>`", line) for line in lines]


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _without_stored_widgets(app, docname: str, source: list[str]) -> None:
    """A notebook's stored widgets are dead controls without a kernel, drawn by scripts from a CDN: the site's page
    of a notebook leaves out the widget state and the outputs that show widgets (the download keeps them)."""
    if not docname.startswith("notebooks/") or "application/vnd.jupyter.widget" not in source[0]:
        return
    nb = json.loads(source[0])
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if _WIDGET_VIEW not in o.get("data", {})]
    source[0] = json.dumps(nb, ensure_ascii=False)


# The modules docs/api.md documents: every module of the package (tests/test_course.py checks the page has
# each). One that fails to import is left out of the page (its autodoc warning is suppressed below, so the
# site still builds with -W) and named in the build's log.
API_MODULES = sorted(p.stem for p in (_here.parent / "helpers").glob("*.py") if not p.stem.startswith("_"))


def _report_unimportable(app) -> None:
    log = logging.getLogger(__name__)
    for name in API_MODULES:
        try:
            importlib.import_module(f"helpers.{name}")
        except Exception as e:  # noqa: BLE001 - any failure leaves the module out, never the build
            log.info(f"api.md: helpers.{name} does not import ({e!r}); its section is left out")


class _DocstringSlipsAreNotFatal:
    """A reST slip in a helpers docstring (written for readers of the code, in Google style) is reported as a
    note, not a warning: the site still builds with -W, which stays strict for the pages and notebooks."""

    def filter(self, record) -> bool:
        location = str(getattr(record, "location", "") or "")
        if "docstring of helpers." not in location:
            return True
        logging.getLogger(__name__).info(f"note: {location}: {record.getMessage()} (docstring formatting)")
        return False


def setup(app) -> None:
    import logging as std_logging

    for handler in std_logging.getLogger("sphinx").handlers:
        if isinstance(handler, logging.WarningStreamHandler):
            handler.filters.insert(0, _DocstringSlipsAreNotFatal())  # before -W's filter and the count
    app.connect("builder-inited", _copy_sources)
    app.connect("builder-inited", _report_unimportable)
    app.connect("source-read", _without_stored_widgets)
    app.connect("source-read", _links_for_the_site)
    app.connect("autodoc-process-docstring", _docstring_links)
    app.add_css_file("custom.css")
    app.add_js_file("enlarge.js")


project = "Visualizing MSD-Net with Grad-CAM"
author = "the series' authors"
copyright = "MIT licence"

# sphinx-mathjax-offline copies MathJax into the site: its math renders offline too.
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx-mathjax-offline"]
nb_execution_mode = "off"  # show the stored outputs; running the notebooks is nbval's job
myst_enable_extensions = ["dollarmath", "amsmath"]  # $...$ and $$...$$ in the notebooks, drawn by MathJax
myst_dmath_double_inline = True  # $$...$$ inside a paragraph, as Jupyter draws it (notebook 05 writes one)
myst_heading_anchors = 3  # the README's [Data](#data)-style links
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "README.md", "results"]  # parts included by index.md and benchmarks.md
suppress_warnings = [
    "mystnb.unknown_mime_type",  # ipywidgets state: the explorer needs a kernel
    "autodoc.import_object",  # a helpers module that does not import is left out of api.md, not the build
]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
autodoc_inherit_docstrings = False  # a module's own methods only: no torch boilerplate under every `forward`
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields of the class, not a second description of each attribute


def _attribute_docstring_as_written(self) -> list[str]:
    """The docstring of an attribute, a property or module data, read as written.

    Napoleon reads its first line as Google's "type: description" and cuts it at the first colon, so that
    "The coarsest map [B, C, 8, 8]: what classifier k reads" showed as a type; helpers gives types as
    annotations, never in these docstrings.
    """
    return self._consume_to_end()


from sphinx.ext.napoleon.docstring import GoogleDocstring  # noqa: E402

GoogleDocstring._parse_attribute_docstring = _attribute_docstring_as_written


def _repository_url() -> str | None:
    """pyproject.toml's [project.urls] Repository, the one place the project's public address is written."""
    try:
        import tomllib  # Python 3.11+; on 3.10 the site is built without the button
        with open(_here.parent / "pyproject.toml", "rb") as f:
            return tomllib.load(f).get("project", {}).get("urls", {}).get("Repository")
    except (ImportError, OSError):
        return None


# sphinx-book-theme (the Jupyter Book theme): each notebook page gets a download button for its .ipynb,
# a full-screen button and the page's contents on the right; every page a repository button once
# pyproject.toml names the repository's address under [project.urls].
html_theme = "sphinx_book_theme"
_repository = _repository_url()
html_title = project
html_static_path = ["_static"]
html_sourcelink_suffix = ""  # the download button serves the notebook itself, not a .txt copy
html_theme_options = {
    "use_download_button": True,
    "use_fullscreen_button": True,
    "use_repository_button": bool(_repository),
    "show_toc_level": 2,
}
if _repository:
    html_theme_options["repository_url"] = _repository
nb_scroll_outputs = True  # long outputs scroll (myst-nb's own switch; custom.css caps them too)
