"""The README is a contract: CI runs its two commands word for word, and its results table shows
the numbers measured for the shipped checkpoint (its card), not numbers typed by hand."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
CARD = json.loads((ROOT / "data" / "pretrained" / "msdnet-cifar10-anytime.json").read_text())


def bash_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def ci_commands() -> list[str]:
    """The line after each "# README: ..." comment of .ci/run."""
    lines = CI.splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.startswith("# README:")]


def test_ci_runs_exactly_the_readmes_setup_and_test_commands():
    setup, tests = bash_blocks(README)[0][0], bash_blocks(README)[1]
    assert len(tests) == 2  # the fast lane, then the slow lane
    assert ci_commands() == [setup, *tests]


def test_the_test_command_is_the_one_any_user_types_and_ci_only_adds_the_data_source():
    """A user's machine has no ../shared: the README's command takes CIFAR-10 from torchvision (or the user's
    CIFAR10_SOURCE); CI exports its offline copy on a line of its own before running that same command."""
    fast, slow = bash_blocks(README)[1]
    assert fast == 'python -m pytest -n auto --dist loadfile -m "not slow" tests'  # a worker per core, a file per worker
    assert slow == "MSDNET_QUICK=1 python -m pytest -n auto --dist loadfile --nbval-lax -m slow tests notebooks"
    assert "../shared" not in README
    lines = CI.splitlines()
    test_line = lines.index(fast)
    assert lines.index(slow) > test_line, "CI runs the fast lane first"
    assert any(line.startswith("export CIFAR10_SOURCE=") for line in lines[:test_line]), "CI must export CIFAR10_SOURCE first"
    contributing = " ".join((ROOT / "CONTRIBUTING.md").read_text().split())
    assert "exports `CIFAR10_SOURCE`" in contributing and "word for word" in contributing


def test_the_front_page_is_for_learners_and_ci_lives_in_contributing():
    """The README's site part (the site's landing page) says what the series is and how to start; how CI and
    the tests are organised is CONTRIBUTING.md's, which the README links."""
    included = README[README.index("<!-- site: start -->"):README.index("<!-- site: end -->")]
    for word in (".ci/run", "CI ", "Contributing", "chromium"):
        assert word not in included, word
    assert "](CONTRIBUTING.md)" in README and (ROOT / "CONTRIBUTING.md").is_file()


def test_the_two_lanes_together_run_every_test_once(pytestconfig):
    """Every test and notebook cell is in exactly one lane: the fast lane's marker expression and the slow
    lane's select complementary sets of what `pytest --nbval-lax tests notebooks` collects."""
    import subprocess
    import sys

    def collected(*marker):
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--nbval-lax", *marker,
                               "tests", "notebooks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        return {line for line in done.stdout.splitlines() if "::" in line}

    everything, fast, slow = collected(), collected("-m", "not slow"), collected("-m", "slow")
    assert any(".ipynb::" in t for t in slow) and not any(".ipynb::" in t for t in fast)
    assert fast | slow == everything and not fast & slow


def test_the_readme_is_a_front_page():
    """At most 200 lines, and no making-of: the training chronicle and the day's measurements live on the site."""
    assert len(README.splitlines()) <= 200
    for word in ("cycle", "issue", "half-pace", "half its usual pace"):
        assert word not in README.lower(), word
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README), "no dates of runs in the README"


def test_the_readmes_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local) and any(link.startswith("notebooks/") for link in local)
    for link in local:
        assert (ROOT / link).exists(), link


def test_the_site_includes_the_readmes_set_up_section():
    """docs/index.md includes the README between two markers; the notebooks link its offline notes."""
    start, end = README.index("<!-- site: start -->"), README.index("<!-- site: end -->")
    included = README[start:end]
    assert "## The two commands" in included and "### On a laptop without a GPU, or offline" in included
    assert bash_blocks(included)[:2] == bash_blocks(README)[:2]
    assert "](docs/" not in included  # a link that resolves on GitHub would not inside docs/


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub and MyST (myst_heading_anchors) make it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_notebooks_links_into_the_readme_land_on_its_headings():
    """Notebooks link ../README.md#<heading>; on the site that heading must sit in the part index.md includes."""
    included = README[README.index("<!-- site: start -->"):README.index("<!-- site: end -->")]
    anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", included, flags=re.M)}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for anchor in re.findall(r"\.\./README\.md#([\w-]+)", nb.read_text()):
            assert anchor in anchors, f"{nb.name} links README.md#{anchor}, not a heading of the site's part"


def table_row(label: str) -> list[float]:
    row = next(line for line in README.splitlines() if line.startswith(f"| {label}"))
    return [float(cell) for cell in row.strip("|").split("|")[1:]]


def test_results_table_shows_the_cards_accuracy_and_costs():
    assert table_row("**shipped checkpoint**") == [round(a * 100, 1) for a in CARD["test_accuracy_per_exit"]]
    assert table_row("multiply-accumulates") == [round(m / 1e6, 1) for m in CARD["macs_per_exit"]]
    assert table_row("shipped checkpoint, flip") == [round(a * 100, 1) for a in CARD["test_accuracy_per_exit_flip_tta"]]
    total, gpu = re.search(r"\*\*shipped checkpoint\*\* \((\d+) epochs: \d+ on a CPU, (\d+) on a GPU\)", README).groups()
    assert int(total) == CARD["training"]["total_epochs"]
    assert int(gpu) == sum(cycle["epochs_done"] for cycle in cycles(CARD["training"]) if "no GPU" not in cycle["hardware"])


ROW_OF_PRESET = {"cifar10-anytime": "**shipped checkpoint**", "seed": "**shipped seed checkpoint**"}


def test_every_shipped_card_has_its_row_in_the_results_table():
    """A second card (the blog's wider model, once trained) shows in the table as the first one does."""
    from helpers import pretrained

    shipped = pretrained.shipped_presets()
    assert "cifar10-anytime" in shipped and set(shipped) <= set(ROW_OF_PRESET)
    for preset in shipped:
        card = json.loads((pretrained.PRETRAINED_DIR / pretrained.weights_name(preset)).with_suffix(".json").read_text())
        assert table_row(ROW_OF_PRESET[preset]) == [round(a * 100, 1) for a in card["test_accuracy_per_exit"]], preset


def cycles(training: dict) -> list[dict]:
    """The card's training record and the records of the cycles it started from, newest first."""
    return [training] + (cycles(training["started_from"]) if "started_from" in training else [])


def test_the_readmes_reference_rows_are_the_reference_module():
    from helpers import reference

    assert table_row("paper, anytime") == list(reference.PAPER_ANYTIME)
    assert table_row("blog's model") == list(reference.BLOG_SEED)


@pytest.mark.slow
def test_the_api_block_runs_as_written(real_cifar, tmp_path, monkeypatch):
    """The README's Python block is what a user copies first: every name it uses is defined in it, and it
    runs from top to bottom (on the real CIFAR-10; the explorer is only asked for, notebook 07 runs it)."""
    from helpers import data, explorer

    real_cifar("test")  # in CI a missing dataset fails here, never skips
    monkeypatch.setenv(data.ENV_SOURCE, str(real_cifar.source))  # found as a user's shell finds it
    monkeypatch.setattr(data, "DATA_DIR", real_cifar.data_dir)  # decoded once per test session
    load = data.load  # the validation hold-out cut to 1,000 images, as in the notebooks' quick mode: every line still runs
    monkeypatch.setattr(data, "load", lambda split="train", *a, **kw: data.subset(load(split, *a, **kw), 1000)
                        if split == "val" else load(split, *a, **kw))
    block = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    assert len(block.strip().splitlines()) <= 15, "the API glance stays a glance"
    asked = []
    monkeypatch.setattr(explorer, "explore", lambda model, *a, **kw: asked.append(model))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["saliency"].shape == (8, 32, 32) and scope["fine"].shape == (8, 3, 32, 32)
    assert scope["predicted"].shape == scope["exits"].shape == (8,)
    assert 1 <= int(scope["exits"].min()) and int(scope["exits"].max()) <= 10  # exit numbers, B1..B10
    assert 0.8 < scope["target"] < 1 and asked == [scope["model"]]
