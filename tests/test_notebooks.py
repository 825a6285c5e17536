"""The notebooks are committed executed, top to bottom, and nbval really checks their marked outputs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_SOURCE

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))
from drop_progress_bars import drop, is_progress_bar  # noqa: E402  (tools/ is not a package)


def test_the_series_is_there_and_the_readme_lists_every_notebook():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) >= 6
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"(notebooks/{p.name})" in readme for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_executed_top_to_bottom_without_errors(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert any("".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT") for c in cells), "no output nbval checks"


def exercises(markdown: str) -> tuple[int, int, int]:
    """(questions, hints, solutions) in a notebook's exercises section ("## Exercises" or "## Try this"),
    which ends at the next heading or the closing "**Summary.**" / "**Next:**" line."""
    start = max(markdown.find("## Exercises"), markdown.find("## Try this"))
    if start < 0:
        return 0, 0, 0
    section = re.split(r"\n(?:## |\*\*Summary\.\*\*|\*\*Next:\*\*|\*\*Back to:\*\*)", markdown[start + 3:])[0]
    return (len(re.findall(r"^\d+\. ", section, flags=re.M)), section.count("<summary>Hint</summary>"),
            section.count("<summary>Solution</summary>"))


def test_exercises_are_counted_with_their_hints_and_solutions():
    text = "## Exercises\n\n1. Q?\n\n<details><summary>Hint</summary>\n\nh\n\n</details>\n2. R?\n\n## Sources\n\n1. not one"
    assert exercises(text) == (2, 1, 0)
    assert exercises("## Summary\n\n1. a finding") == (0, 0, 0)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_a_hint_and_a_solution_to_unfold(path):
    markdown = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
    questions, hints, solutions = exercises(markdown)
    assert questions >= 2, "the notebook ends without exercises"
    assert hints == solutions == questions, f"{questions} exercises, {hints} hints, {solutions} solutions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_static_page_shows_no_half_drawn_progress_bar(path):
    """A finished bar vanishes from a live notebook; the stored first frame ("0/20") must not stay."""
    outputs = [o for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if is_progress_bar(o)]


def test_progress_bars_are_told_from_other_outputs(tmp_path):
    bar = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2, "version_minor": 0},
        "text/plain": "predicting:   0%|          | 0/20 [00:00<?, ?batch/s]"}}
    app = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": "y", "version_major": 2, "version_minor": 0},
        "text/plain": "VBox(children=(Dropdown(description='Class'),))"}}
    printed = {"output_type": "stream", "name": "stdout", "text": "epoch 1:  50%|#####     | 1/2 [00:01<00:01]\n"}
    nb = {"cells": [{"cell_type": "code", "outputs": [bar, app, printed], "source": "", "metadata": {}}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps(nb))
    assert drop(path) == 1
    assert json.loads(path.read_text())["cells"][0]["outputs"] == [app, printed]


@pytest.mark.slow
def test_nbval_fails_when_the_parameter_count_changes(tmp_path):
    """A changed model prints a different count than the committed output; nbval must catch that."""
    nb = json.loads(NOTEBOOKS[0].read_text())
    printed = [out for cell in nb["cells"] for out in cell.get("outputs", [])
               if "".join(out.get("text", "")).strip() == "4,839,544 parameters"]
    assert len(printed) == 1
    printed[0]["text"] = "4,839,545 parameters\n"
    copy = tmp_path / NOTEBOOKS[0].name
    copy.write_text(json.dumps(nb))
    env = {k: v for k, v in os.environ.items() if k != "MSDNET_DATA_DIR"}
    env.update(MSDNET_QUICK="1", **({"CIFAR10_SOURCE": REAL_SOURCE} if REAL_SOURCE else {}))
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", str(copy), "-p", "no:cacheprovider", "-q"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-3000:]
    assert "4,839,545" in run.stdout and "1 failed" in run.stdout, run.stdout[-3000:]


def markdown_of(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_teaches_in_at_most_3500_words_without_the_making_of(path):
    prose = markdown_of(path)
    read = re.sub(r"\]\([^)\s]*\)", "]", prose)  # a link's address is not read: [06](06_what_....ipynb) is one word
    assert len(re.findall(r"\w+", read)) <= 3500
    making_of = re.findall(r"half (?:its|the) usual pace|half-pace|\bissue \d+|\bsession\b|\bhand-?overs?\b|\bpaused\b",
                           prose, flags=re.I)
    assert not making_of, making_of


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_links_its_neighbours_at_the_top_and_the_bottom(path):
    cells = [("".join(c["source"])) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
    i = NOTEBOOKS.index(path)
    wanted = [f"({p.name})" for p in (NOTEBOOKS[i - 1] if i else None, NOTEBOOKS[i + 1] if i + 1 < len(NOTEBOOKS) else None) if p]
    wanted.append("(../README.md#notebooks)")
    for where, text in (("top", "\n".join(cells[:2])), ("bottom", cells[-1])):
        assert all(link in text for link in wanted), f"{where}: {wanted}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_progress_bar_state_is_stored_in_the_metadata(path):
    state = json.loads(path.read_text())["metadata"].get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert not [k for k, v in state.items() if v.get("model_name") == "FloatProgressModel"]
