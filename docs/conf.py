"""The series as a website: the README as the front page, then the notebooks with their stored outputs.

    python -m sphinx -W -b html docs docs/_build/html

Nothing is executed (the notebooks are committed executed), so it builds in seconds on any machine.
"""
import shutil
from pathlib import Path

_here = Path(__file__).resolve().parent


def _copy_sources(app) -> None:
    """Copy the README and the notebooks in when a build starts (Sphinx reads only its own folder).

    Their links (README -> notebooks/..., notebook -> README) must resolve inside docs/; the copies are
    ignored by git, so the site always shows what is committed. Reading this file writes nothing.
    """
    (_here / "notebooks").mkdir(exist_ok=True)
    for nb in sorted((_here.parent / "notebooks").glob("*.ipynb")):
        # On GitHub a notebook links the README and the site's pages as ../README.md and ../docs/<page>.md;
        # on the site the front page is index.md and the pages sit one folder up from the notebooks.
        text = nb.read_text().replace("../README.md#", "../index.md#").replace("../docs/", "../")
        (_here / "notebooks" / nb.name).write_text(text)
    shutil.copy2(_here.parent / "README.md", _here / "README.md")


def setup(app) -> None:
    app.connect("builder-inited", _copy_sources)


project = "Visualizing MSD-Net with Grad-CAM"
author = "the series' authors"
copyright = "MIT licence"

extensions = ["myst_nb"]
nb_execution_mode = "off"  # show the stored outputs; running the notebooks is nbval's job
myst_heading_anchors = 3  # the README's [Data](#data)-style links
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "README.md"]  # README.md: included by index.md
suppress_warnings = ["mystnb.unknown_mime_type"]  # ipywidgets state: the explorer needs a kernel

html_theme = "furo"
html_title = project
html_static_path = []
