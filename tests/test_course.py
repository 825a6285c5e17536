"""The course holds together: every reference to a notebook is a link that lands on that notebook, every link
of the notebooks and pages resolves in a clone and on the site, and the numbers the prose quotes are the
numbers of their source (the card, a results file a benchmark wrote, a notebook's stored output).

Reads files only: no model, no data, no site build (the fast lane)."""
from __future__ import annotations

import ast
import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOK_FILES = sorted((ROOT / "notebooks").glob("*.ipynb"))
CARD = json.loads((ROOT / "data" / "pretrained" / "msdnet-cifar10-anytime.json").read_text())
SITE_LINK = runpy.run_path(str(DOCS / "conf.py"))["site_link"]  # reading conf.py writes nothing


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def markdown(path: Path) -> str:
    return "\n\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "markdown")


def code(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "code")


def outputs(path: Path) -> str:
    """The text a notebook's code cells printed, as stored."""
    text = []
    for c in cells(path):
        for out in c.get("outputs", []):
            text.append("".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def notebook(number: str) -> Path:
    found = [p for p in NOTEBOOK_FILES if p.name.startswith(f"{number}_")]
    assert len(found) == 1, f"no single notebook numbered {number}: {found}"
    return found[0]


def title(path: Path) -> str:
    """The notebook's title, its first heading without the number: '# 04 · Early exit: ...' -> 'Early exit: ...'."""
    heading = re.search(r"^# (\d\d) · (.+)$", markdown(path), flags=re.M)
    assert heading and heading.group(1) == path.name[:2], f"{path.name}: no '# {path.name[:2]} · <title>' heading"
    return heading.group(2).strip()


def prose(text: str) -> str:
    """Text without fenced code blocks and code spans: what a reader reads as sentences."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


class Page:
    """A piece of prose with its links: where it lives in the clone, and its document on the site (or None)."""

    def __init__(self, name: str, text: str, folder: Path, docname: str | None):
        self.name, self.text, self.folder, self.docname = name, text, folder, docname


def readme_site_part(text: str) -> str:
    return text[text.index("<!-- site: start -->"):text.index("<!-- site: end -->")]


def pages() -> list[Page]:
    """The notebooks' markdown, the site's pages, the README (its site part is index.md's) and CONTRIBUTING.md."""
    found = [Page(p.name, markdown(p), p.parent, f"notebooks/{p.stem}") for p in NOTEBOOK_FILES]
    found += [Page(f"docs/{p.name}", p.read_text(), DOCS, p.stem) for p in sorted(DOCS.glob("*.md"))
              if p.name != "README.md"]  # docs/README.md is the build's copy of the README, not a page
    readme = (ROOT / "README.md").read_text()
    found.append(Page("README.md", readme, ROOT, None))
    found.append(Page("README.md (on the site)", readme_site_part(readme), DOCS, "index"))
    if (ROOT / "CONTRIBUTING.md").exists():
        found.append(Page("CONTRIBUTING.md", (ROOT / "CONTRIBUTING.md").read_text(), ROOT, None))
    return found


def docstrings(path: Path) -> str:
    """Every docstring of a helpers module: the module's, its classes' and functions'."""
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


HELPERS = sorted(p for p in (ROOT / "helpers").glob("*.py") if not p.name.startswith("_"))

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
NUMBER = r"(?:\[\d\d\]\([^)\s]+\)|\d\d)(?![\d.,]\d)"
MENTION = re.compile(rf"\b[Nn]otebooks?\s+({NUMBER}(?:(?:,\s*|\s+and\s+|\s+to\s+|\s*[–-]\s*){NUMBER})*)")


def mention_problems(text: str, folder: Path) -> list[str]:
    """What is wrong with each 'notebook NN' / 'notebooks NN and MM' of a text: every number must be a link
    [NN](...) to the notebook numbered NN, a file that exists beside the text."""
    problems = []
    for mention in MENTION.finditer(prose(text)):
        for number in re.finditer(NUMBER, mention.group(1)):
            link = re.fullmatch(r"\[(\d\d)\]\(([^)#\s]+)(?:#[^)]*)?\)", number.group(0))
            if not link:
                problems.append(f"'{mention.group(0)}': {number.group(0)} is not a link to the notebook")
                continue
            text_number, target = link.groups()
            path = (folder / target).resolve()
            if not (path.is_file() and path.suffix == ".ipynb" and path.name.startswith(f"{text_number}_")):
                problems.append(f"'{mention.group(0)}': {target} is not notebook {text_number}")
    return problems


def test_every_mention_of_a_notebook_in_the_course_is_a_link_to_it():
    problems = []
    for page in pages():
        problems += [f"{page.name}: {p}" for p in mention_problems(page.text, page.folder)]
    assert not problems, "\n".join(problems)


def test_every_mention_of_a_notebook_in_a_docstring_links_it_and_the_notebook_uses_the_module():
    """A docstring that sends its reader to a notebook links it, [02](../notebooks/02_....ipynb) (the API page
    turns the link into one to the notebook's page), and the notebook imports the module that says so."""
    problems, mentioned = [], 0
    for path in HELPERS:
        text = docstrings(path)
        problems += [f"helpers/{path.name}: {p}" for p in mention_problems(text, path.parent)]
        for number in set(re.findall(r"\[(\d\d)\]\(\.\./notebooks/", text)):
            mentioned += 1
            used = code(notebook(number))
            if not re.search(rf"from helpers import [^\n]*\b{path.stem}\b|helpers\.{path.stem}\b", used):
                problems.append(f"helpers/{path.name} sends its reader to notebook {number}, which does not use it")
    assert not problems, "\n".join(problems)


def test_a_stale_mention_is_caught():
    """The check itself: a bare number, a link to another notebook and a missing file are each reported."""
    folder = ROOT / "notebooks"
    assert mention_problems("as notebook 04 shows", folder)
    assert mention_problems("notebooks [03](03_accuracy_per_classifier.ipynb) and 05", folder)
    assert mention_problems("in notebook [07](08_beyond_the_blog.ipynb)", folder)
    assert mention_problems("in notebook [09](09_gone.ipynb)", folder)
    assert not mention_problems("notebooks [03](03_accuracy_per_classifier.ipynb)–[05](05_gradcam_per_exit.ipynb)",
                                folder)


def local_links(page: Page) -> list[tuple[str, str]]:
    """(text, target) of every link of a page's prose to a file: not a web address, not an anchor of the page."""
    without_blocks = re.sub(r"^(```|~~~).*?^\1", "", page.text, flags=re.S | re.M)  # code spans stay: [`01_x`](...)
    return [(text, target) for text, target in LINK.findall(without_blocks)
            if "://" not in target and not target.startswith(("#", "mailto:"))]


def site_file(site_path: Path) -> Path | None:
    """The file of the clone that the site's source folder holds at `site_path` (docs/notebooks/ holds the
    notebooks' copies, docs/README.md is not a page); None where the site has nothing."""
    rel = site_path.relative_to(DOCS)
    if rel.parts[:1] == ("notebooks",):
        return ROOT / "notebooks" / Path(*rel.parts[1:])
    if rel.parts[:1] in (("_build",), ("results",)) or rel == Path("README.md"):
        return None  # built output, or parts the pages include: not pages of their own
    return site_path


def test_every_link_of_the_notebooks_and_pages_resolves_in_a_clone_and_on_the_site():
    problems, checked = [], 0
    for page in pages():
        for _, target in local_links(page):
            checked += 1
            path = target.split("#")[0]
            if not path:
                continue
            if page.docname != "index" and not (page.folder / path).exists():  # index: the README's site part
                problems.append(f"{page.name}: {target} does not exist in the clone")
            if page.docname is None:
                continue
            on_site = SITE_LINK(page.docname, target).split("#")[0]
            resolved = Path(*[p for p in (DOCS / page.docname).parent.joinpath(on_site).resolve().parts])
            if DOCS not in resolved.parents:
                problems.append(f"{page.name}: {target} leaves the site ({on_site})")
                continue
            found = site_file(resolved)
            if found is None or not found.exists():
                problems.append(f"{page.name}: {target} is {on_site} on the site, which does not exist there")
    assert checked > 100 and not problems, "\n".join(problems)


def test_site_link_maps_the_clones_layout_to_the_sites():
    assert SITE_LINK("notebooks/02_x", "../README.md#notebooks") == "../index.md#notebooks"
    assert SITE_LINK("notebooks/02_x", "../docs/appendix.md") == "../appendix.md"
    assert SITE_LINK("notebooks/02_x", "03_y.ipynb") == "03_y.ipynb"
    assert SITE_LINK("glossary", "../notebooks/05_x.ipynb") == "notebooks/05_x.ipynb"
    assert SITE_LINK("glossary", "benchmarks.md") == "benchmarks.md"


def test_the_notebooks_on_the_site_are_the_committed_files(tmp_path):
    """The site's copies (and so the notebook its download button serves) keep the links of the clone."""
    import shutil

    (tmp_path / "docs").mkdir()
    shutil.copy2(DOCS / "conf.py", tmp_path / "docs" / "conf.py")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy2(ROOT / "README.md", tmp_path / "README.md")
    runpy.run_path(str(tmp_path / "docs" / "conf.py"))["_copy_sources"](None)
    for nb in NOTEBOOK_FILES:
        assert (tmp_path / "docs" / "notebooks" / nb.name).read_bytes() == nb.read_bytes(), nb.name


def test_every_link_to_a_notebook_carries_its_number_name_or_title():
    """[04](04_...), [`04_early_exit`](...), [04 · Early exit →](...): the number, the file's name, or the title
    of the notebook's first heading (in full, or up to its first colon or comma)."""
    problems, checked = [], 0
    for page in pages():
        for text, target in local_links(page):
            name = Path(target.split("#")[0]).name
            if not re.fullmatch(r"\d\d_\w+\.ipynb", name):
                continue
            checked += 1
            nb = ROOT / "notebooks" / name
            if not nb.exists():
                continue  # reported by the link test
            full = title(nb)
            allowed = {name[:2], nb.stem, f"{name[:2]} · {full}", f"{name[:2]} · {re.split(r'[:,]', full)[0]}"}
            if text.strip(" ←→`") not in allowed:
                problems.append(f"{page.name}: [{text}]({target}): the notebook is '{name[:2]} · {full}'")
    assert checked > 50 and not problems, "\n".join(problems)


def glossary_entries(text: str) -> list[tuple[list[str], str]]:
    """(the terms, the definition) of every entry of a page's glossary block."""
    block = re.search(r"```\{glossary\}\n(.*?)```", text, flags=re.S).group(1)
    entries: list[tuple[list[str], str]] = []
    for line in block.splitlines():
        if line and not line[0].isspace():  # a term: a new entry, or another name of one still undefined
            if entries and not entries[-1][1]:
                entries[-1][0].append(line.strip())
            else:
                entries.append(([line.strip()], ""))
        elif line.strip():
            entries[-1] = (entries[-1][0], (entries[-1][1] + " " + line.strip()).strip())
    return entries


def glossary_problems(text: str) -> list[str]:
    """An entry that cites a notebook names the helpers function that does it, and the notebook calls that
    function and uses the term."""
    problems = []
    for terms, definition in glossary_entries(text):
        cited = re.findall(r"\]\(\.\./notebooks/(\d\d)_\w+\.ipynb\)", definition)
        functions = re.findall(r"helpers\.(\w+)\.(\w+)", definition)
        if cited and not functions:
            problems.append(f"{terms[0]}: cites notebook {cited} but names no helpers function")
        for number in cited:
            nb = notebook(number)
            if not any(re.search(rf"\b{module}\.{function}\b", code(nb)) for module, function in functions):
                problems.append(f"{terms[0]}: notebook {number} calls none of {functions}")
            if not any(term.lower() in (markdown(nb) + code(nb)).lower() for term in terms):
                problems.append(f"{terms[0]}: notebook {number} never says {terms}")
    return problems


GLOSSARY = (DOCS / "glossary.md").read_text()


def test_each_glossary_entry_sends_its_reader_to_a_notebook_that_does_what_it_names():
    entries = glossary_entries(GLOSSARY)
    assert ["ROAD"] in [terms for terms, _ in entries] and ["SUPPORTED", "NOT SUPPORTED", "CONTRADICTED"] in [terms for terms, _ in entries]
    assert sum("../notebooks/" in definition for _, definition in entries) >= 5
    problems = glossary_problems(GLOSSARY)
    assert not problems, "\n".join(problems)


def test_the_glossary_check_catches_a_wrong_notebook():
    """The check itself: ROAD sent to the explorer notebook, or Grad-CAM to the early-exit one, fails."""
    road = re.search(r"\nROAD\n.*?\n\n", GLOSSARY, flags=re.S).group(0)
    explorer = re.sub(r"\[08\]\(\.\./notebooks/08_\w+\.ipynb\)", "[07](../notebooks/07_explorer.ipynb)", road)
    assert explorer != road and glossary_problems(GLOSSARY.replace(road, explorer))
    gradcam = re.search(r"\nGrad-CAM\n.*?\n\n", GLOSSARY, flags=re.S).group(0)
    early = re.sub(r"\[05\]\(\.\./notebooks/05_\w+\.ipynb\)", "[04](../notebooks/04_early_exit.ipynb)", gradcam)
    assert early != gradcam and glossary_problems(GLOSSARY.replace(gradcam, early))


# Numbers quoted in prose, each against its source.

def test_the_gap_to_the_paper_is_the_cards_accuracy_against_the_papers():
    from helpers import reference

    gaps = [paper - 100 * ours for paper, ours in zip(reference.PAPER_ANYTIME, CARD["test_accuracy_per_exit"])]
    expected = (f"{min(gaps):.1f}", f"{max(gaps):.1f}")
    quoted = []
    for name, text in [("02", markdown(notebook("02"))), ("appendix", (DOCS / "appendix.md").read_text())]:
        text = " ".join(text.split())
        found = re.findall(r"(\d+(?:\.\d+)?) to (\d+(?:\.\d+)?) points (?:below the paper|above)", text)
        assert found, f"{name} no longer quotes the gap to the paper: update this test"
        quoted += [(name, found_pair) for found_pair in found]
    for name, pair in quoted:
        assert pair == expected, f"{name} says {pair[0]} to {pair[1]} points; the card and the paper give {expected}"


def run_time_s(path: Path) -> float:
    found = re.search(r"Run time: about (\d+) (s|minutes)\b", markdown(path))
    assert found, f"{path.name}: no 'Run time: about N s|minutes'"
    return int(found.group(1)) * (60 if found.group(2) == "minutes" else 1)


def test_the_readmes_run_time_of_the_series_is_the_sum_of_the_notebooks():
    total_min = sum(run_time_s(p) for p in NOTEBOOK_FILES) / 60
    readme = " ".join((ROOT / "README.md").read_text().split())
    quoted = re.search(r"instead of about (\d+) minutes on 2 CPU cores", readme)
    assert quoted, "the README no longer says how long the series runs: update this test"
    assert int(quoted.group(1)) == 5 * round(total_min / 5), f"the notebooks' run times add up to {total_min:.1f} min"


def results_table(script: str) -> dict[str, list[str]]:
    """A benchmark's results file, docs/results/<script>.md: its table's rows by their first cell."""
    rows = [line.strip().strip("|").split("|") for line in (DOCS / "results" / f"{script}.md").read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows[1:]}


def test_the_appendix_quotes_the_batch_size_benchmark_as_it_measured():
    table = results_table("batch_size")
    appendix = " ".join((DOCS / "appendix.md").read_text().split())
    quoted = re.search(r"128 trains (\S+) as many images per CPU-hour \(`python benchmarks/batch_size\.py`: "
                       r"([\d.]+), ([\d.]+) and ([\d.]+) training images/s at batch (\d+), (\d+) and (\d+)", appendix)
    assert quoted, "the appendix no longer quotes benchmarks/batch_size.py: update this test"
    ratio, *numbers = quoted.groups()
    speeds, batches = numbers[:3], numbers[3:]
    assert ratio == table["128"][1], f"the appendix says {ratio}, the benchmark measured {table['128'][1]}"
    assert speeds == [table[b][0] for b in batches], f"the benchmark measured {[table[b][0] for b in batches]}"


def test_the_numbers_quoted_from_another_notebook_are_its_stored_output():
    """'(notebook [06](...): [-0.067, +0.000])' and 'X% of the maps are all zero (notebook [06](...))' quote what
    that notebook printed."""
    quotes = 0
    for path in NOTEBOOK_FILES:
        text = " ".join(markdown(path).split())
        for number, interval in re.findall(r"notebook \[(\d\d)\]\([^)]+\): (\[[-+]?[\d.]+, [-+]?[\d.]+\])", text):
            quotes += 1
            assert interval in outputs(notebook(number)), f"{path.name} quotes {interval} from notebook {number}"
        for share, number in re.findall(r"([\d.]+%) of the maps[^.(]*? all zero \(notebook \[(\d\d)\]", text):
            quotes += 1
            assert f"all-zero maps: {share}" in outputs(notebook(number)), f"{path.name} quotes {share} all-zero maps"
    assert quotes >= 2


def test_the_epochs_the_notebooks_quote_are_the_cards():
    training = CARD["training"]
    assert training["swa"]
    text = " ".join(markdown(notebook("08")).split())
    total, last = re.search(r"\((\d+) epochs, the last (\d+) with stochastic weight averaging\)", text).groups()
    assert (int(total), int(last)) == (training["total_epochs"], training["epochs_done"])
    text = " ".join(markdown(notebook("02")).split())
    assert int(re.search(r"checkpoint has (\d+) epochs of training", text).group(1)) == training["total_epochs"]


def test_no_page_notebook_or_card_names_the_projects_own_data_folder():
    """A user has no ../shared: what a user reads names CIFAR10_SOURCE, torchvision's download or data/."""
    texts = {p.name: p.read_text() for p in NOTEBOOK_FILES}
    texts |= {f"docs/{p.name}": p.read_text() for p in DOCS.glob("*.md") if p.name != "README.md"}
    texts |= {p.name: p.read_text() for p in [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] if p.exists()}
    texts |= {p.name: p.read_text() for p in (ROOT / "data" / "pretrained").glob("*.json")}
    texts |= {f"{p.parent.name}/{p.name}": p.read_text() for folder in ("helpers", "benchmarks", "tools")
              for p in (ROOT / folder).glob("*.py")}  # docstrings and --help
    named = [name for name, text in texts.items() if "../shared" in text or "/work/shared" in text]
    assert not named, f"these name the project's own data folder: {named}"


def test_the_api_page_documents_every_module_of_the_package():
    """docs/api.md has an automodule for each module of helpers/ (the site's API_MODULES, read from the package),
    and the site documents a method's own docstring only, never torch's under every `forward`."""
    conf = runpy.run_path(str(DOCS / "conf.py"))
    modules = {p.stem for p in (ROOT / "helpers").glob("*.py") if not p.stem.startswith("_")}
    assert set(conf["API_MODULES"]) == modules
    documented = re.findall(r"^\.\. automodule:: helpers\.(\w+)$", (DOCS / "api.md").read_text(), flags=re.M)
    assert sorted(documented) == sorted(set(documented)), "a module is documented twice"
    assert modules <= set(documented), f"the API page lacks {sorted(modules - set(documented))}"
    assert conf["autodoc_inherit_docstrings"] is False


def test_an_attribute_docstring_with_a_colon_renders_as_written():
    """A property's docstring such as 'The coarsest map [B, C, 8, 8]: what classifier k reads' is prose on the
    API page, not a type cut off at the colon (Napoleon's reading of Google attribute docstrings)."""
    runpy.run_path(str(DOCS / "conf.py"))
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    text = "The coarsest map [B, C, 8, 8]: what classifier k reads."
    for what in ("property", "attribute", "data"):
        rendered = str(GoogleDocstring(text, Config(napoleon_use_ivar=True), what=what, name="features"))
        assert ":type:" not in rendered and text in rendered, rendered
