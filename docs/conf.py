"""The series as a website: the README as the front page, then the notebooks with their stored outputs.

    python -m sphinx -W -b html docs docs/_build/html

Nothing is executed (the notebooks are committed executed), so it builds in seconds on any machine.
"""
import shutil
from pathlib import Path

# The README and the notebooks live at the repository's top; Sphinx reads only its own folder, and their
# links (README -> notebooks/..., notebook -> notebook) must resolve inside it. So each build copies them
# in (docs/README.md and docs/notebooks/ are ignored by git): the site always shows what is committed.
_here = Path(__file__).resolve().parent
(_here / "notebooks").mkdir(exist_ok=True)
for _nb in sorted((_here.parent / "notebooks").glob("*.ipynb")):
    # On the site the README is the front page (index.md includes it), so a notebook's link to a README
    # section points there; on GitHub the same link opens README.md.
    (_here / "notebooks" / _nb.name).write_text(_nb.read_text().replace("../README.md#", "../index.md#"))
shutil.copy2(_here.parent / "README.md", _here / "README.md")

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
