"""The site's static explorer: its data (tools/build_site_explorer.py) holds the library's maps and predictions for
a stated selection of test images, and the built page, opened in a real chromium with no network, filters, moves
its exit and image controls, redraws, draws the library's map, weighs under 10 MB and asks nothing of another
site. In CI a missing chromium or Playwright is a failure, never a skip."""
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from test_browser import _importable, need

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
try:
    import build_site_explorer as builder
finally:
    sys.path.remove(str(ROOT / "tools"))

from helpers import evaluate, gradcam, pretrained, viz  # noqa: E402
from helpers.cache import fingerprint  # noqa: E402

MAX_PAGE_BYTES = 10_000_000


@pytest.fixture(scope="module")
def shipped():
    """The committed data, decoded."""
    return builder.read(builder.OUT)


def _predictions(labels: list[int], difficulties: list[int], exits: int = 10) -> evaluate.Predictions:
    """Predictions whose image i is right at exactly its first difficulties[i] exits."""
    n = len(labels)
    logits = torch.zeros(n, exits, 10)
    for i, (y, d) in enumerate(zip(labels, difficulties)):
        logits[i, :, (y + 1) % 10] = 1.0
        logits[i, :d, y] = 2.0
    return evaluate.Predictions(logits, torch.tensor(labels))


def test_the_selection_takes_each_difficulty_first_then_draws_the_rest_of_each_class():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(10).repeat_interleave(60).tolist()
    difficulties = [10 if torch.rand(1, generator=g) < 0.8 else int(torch.randint(0, 10, (1,), generator=g))
                    for _ in labels]
    preds = _predictions(labels, difficulties)
    chosen = builder.choose(preds, per_class=20, per_difficulty=2, seed=0)
    assert len(chosen) == 200 and len(set(chosen.tolist())) == 200
    d = evaluate.difficulty(preds)
    for c in range(10):
        mine = chosen[preds.labels[chosen] == c]
        assert len(mine) == 20
        for k in range(11):
            available = int(((preds.labels == c) & (d == k)).sum())
            assert int((d[mine] == k).sum()) >= min(2, available), (c, k)
    assert torch.equal(chosen, builder.choose(preds, per_class=20, per_difficulty=2, seed=0))
    assert not torch.equal(chosen, builder.choose(preds, per_class=20, per_difficulty=2, seed=1))
    with pytest.raises(ValueError, match="fewer than --per-class 61"):
        builder.choose(preds, per_class=61)


def test_quantized_maps_span_0_to_255_each_and_a_flat_map_is_0():
    raw = torch.stack([torch.arange(64.0).reshape(8, 8), torch.full((8, 8), 3.0)])
    q = builder.quantize(raw)
    assert q.dtype == np.uint8 and q[0].min() == 0 and q[0].max() == 255 and (q[1] == 0).all()


def test_the_shipped_data_covers_every_class_difficulty_and_answer_at_each_exit(shipped):
    n, e = len(shipped["label"]), shipped["exits"]
    labels = np.asarray(shipped["label"])
    right = np.asarray(shipped["predicted"]).reshape(n, e) == labels[:, None]
    assert 900 <= n <= 1100 and len(set(shipped["index"])) == n
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert sorted(set(right.sum(1).tolist())) == list(range(e + 1))  # every difficulty k/10
    for c in range(10):
        assert right[labels == c].any(0).all() and (~right[labels == c]).any(0).all(), f"class {c}"
    assert shipped["images"].shape == (n, 3, 32, 32)
    assert str(n) in shipped["selection"].replace(",", "") and "seed" in shipped["selection"]


@pytest.mark.slow
def test_the_datas_predictions_and_maps_are_the_librarys_on_the_same_images(shipped):
    """For a few images, each wrong somewhere: every exit's prediction, confidence and map (both methods, both
    targets) as the library computes them now, to the data's quantization."""
    model = pretrained.load()
    assert shipped["weights"] == fingerprint(model.state_dict().values()), \
        "data.js was made from other weights: run python tools/build_site_explorer.py"
    n, e = len(shipped["label"]), shipped["exits"]
    labels = torch.tensor(shipped["label"])
    wrong = torch.tensor(shipped["predicted"]).reshape(n, e) != labels[:, None]
    pick = torch.nonzero(wrong.any(1))[:, 0][:3].tolist() + [int(torch.nonzero(~wrong.any(1))[0, 0])]
    x = torch.from_numpy(shipped["images"][pick]).float() / 255
    logits = torch.stack(evaluate.exit_logits(model, x), 1)
    assert torch.equal(logits.argmax(-1), torch.tensor(shipped["predicted"]).reshape(n, e)[pick])
    confidence = torch.tensor(shipped["confidence"]).reshape(n, e)[pick]
    assert (evaluate.scores(logits) * 1000 - confidence).abs().max() <= 0.5 + 1e-3
    for method in builder.METHODS:
        for target in ("predicted", "true"):
            library = gradcam.gradcam_all_exits(model, x, target=target, method=method, labels=labels[pick])
            stored = torch.from_numpy(shipped["maps"][method][target][pick]).float() / 255
            drawn = gradcam.normalize(stored, 32)  # what the page draws: upsampled, scaled to [0, 1]
            up = gradcam.normalize(stored, None)  # [0, 1] per map at 8x8, as quantized
            span = torch.nn.functional.interpolate(up.reshape(-1, 1, 8, 8), size=32, mode="bilinear",
                                                   align_corners=False).reshape(len(pick), e, -1)
            span = (span.amax(-1) - span.amin(-1)).clamp(min=1e-6)  # the upsampled map's range, <= 1
            bound = 2.0 / 255 / span + 1e-5  # half a level of rounding at 8x8, twice, rescaled by 1 / range
            error = (drawn - library).abs().amax((-2, -1))
            assert (error <= bound).all(), f"{method}, {target}: error {error.max():.4f} over the bound"
            assert error.max() < 0.03, f"{method}, {target}: {error.max():.4f}"


def _chromium() -> str:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    need("chromium", chromium is not None, "apt-get install chromium (or set CHROMIUM to its path)")
    need("playwright", _importable("playwright"), 'pip install -e ".[test]"')
    return chromium


def _local_bytes(urls: list[str]) -> int:
    """The bytes of every file:// URL asked for (each file once)."""
    paths = {Path(unquote(urlparse(u).path)) for u in urls if u.startswith("file://")}
    return sum(p.stat().st_size for p in paths if p.is_file())


@pytest.mark.slow
def test_the_explorer_page_filters_redraws_and_draws_the_librarys_map_offline(site, shipped):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    model = pretrained.load()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            asked, outside = [], []
            page.on("request", lambda r: asked.append(r.url))
            page.route("**/*", lambda route: (route.continue_() if route.request.url.startswith(("file:", "data:", "blob:"))
                                             else (outside.append(route.request.url), route.abort())))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((site / "explorer.html").as_uri())
            explorer = page.locator("#explorer")
            page.wait_for_selector("#explorer[data-ready=yes]", timeout=30_000)
            n = len(shipped["label"])
            assert page.locator("#ex-count").inner_text().endswith(f"(of {n:,}; test image {shipped['index'][0]})")
            assert page.locator("#ex-exit-value").inner_text() == "B10"

            def pixels(canvas: str = "#ex-overlay") -> np.ndarray:
                flat = page.evaluate(f"() => Array.from(document.querySelector('{canvas}').getContext('2d')"
                                     ".getImageData(0, 0, 32, 32).data)")
                return np.asarray(flat, dtype=np.uint8).reshape(32, 32, 4)[..., :3]

            def drawn() -> int:
                return int(explorer.get_attribute("data-drawn"))

            def changed(action) -> None:
                before, count = pixels(), drawn()
                action()
                page.wait_for_function(f"() => Number(document.querySelector('#explorer').dataset.drawn) > {count}")
                assert not np.array_equal(pixels(), before), "the picture did not change"

            # The exit slider, by keyboard: B10 -> B9.
            changed(lambda: (page.focus("#ex-exit"), page.keyboard.press("ArrowLeft")))
            assert explorer.get_attribute("data-exit") == "9" and page.locator("#ex-exit-value").inner_text() == "B9"
            assert page.locator("#ex-title").inner_text().split(" — ")[1].startswith("B9 says")
            # The image: the slider's arrow key, then the next button.
            changed(lambda: (page.focus("#ex-image"), page.keyboard.press("ArrowRight")))
            assert explorer.get_attribute("data-image") == "1"
            changed(lambda: page.click("#ex-next"))
            assert explorer.get_attribute("data-image") == "2"
            # Filters: cats that B9 gets wrong. Every image shown then passes, and there are as many as the data says.
            page.select_option("#ex-class", label="cat")
            page.select_option("#ex-correct", "wrong")
            labels = np.asarray(shipped["label"])
            right = np.asarray(shipped["predicted"]).reshape(n, -1) == labels[:, None]
            expected = int(((labels == 3) & ~right[:, 8]).sum())
            assert page.locator("#ex-count").inner_text().startswith(f"image 1 of {expected:,} that pass")
            title = page.locator("#ex-title").inner_text()
            assert title.startswith("Cat (") and title.endswith("✗")
            assert labels[int(explorer.get_attribute("data-image"))] == 3
            # One drawn map against the library's: the true class, Grad-CAM++, at full opacity.
            page.check("input[name=ex-target][value=true]")
            page.check("input[name=ex-method][value='gradcam++']")
            page.focus("#ex-alpha")
            page.keyboard.press("End")
            assert explorer.get_attribute("data-alpha") == "1" and explorer.get_attribute("data-method") == "gradcam++"
            i = int(explorer.get_attribute("data-image"))
            x = torch.from_numpy(shipped["images"][i : i + 1]).float() / 255
            cam = gradcam.gradcam(model, x, exit=9, target="true", method="gradcam++", labels=torch.tensor([3]))
            library = (viz.overlay(x[0], cam[0], alpha=1.0) * 255).round()
            difference = np.abs(pixels().astype(float) - library)
            assert difference.mean() < 2 and difference.max() <= 16, (difference.mean(), difference.max())
            other = gradcam.gradcam(model, x, exit=9, method="gradcam++")  # B9's own (wrong) prediction
            assert np.abs(pixels().astype(float) - (viz.overlay(x[0], other[0], alpha=1.0) * 255).round()).mean() > 4
            image = (x[0].permute(1, 2, 0).numpy() * 255).round()
            assert np.array_equal(pixels("#ex-image-canvas").astype(float), image)  # the image itself, exactly
            # Each exit's answer in colour: B9 wrong (red) and framed, as the title says.
            tile = page.locator(".ex-tile").nth(8)
            assert tile.get_attribute("aria-pressed") == "true" and "✗" in tile.inner_text()
            # A filter nothing passes says so.
            page.select_option("#ex-difficulty", "10")
            assert "No image passes these filters" in page.locator("#ex-title").inner_text()
            # A phone's width: nothing of the explorer wider than the screen.
            page.set_viewport_size({"width": 375, "height": 800})
            assert page.evaluate("() => document.querySelector('#explorer').scrollWidth <= "
                                 "document.querySelector('#explorer').clientWidth")
            assert page.evaluate("() => document.querySelector('#explorer').getBoundingClientRect().right") <= 375

            assert not errors, errors
            assert not outside, f"the page asked another site: {outside}"
            weight = _local_bytes(asked)
            assert weight < MAX_PAGE_BYTES, f"the page weighs {weight / 1e6:.1f} MB"
        finally:
            browser.close()


@pytest.mark.slow
def test_the_site_links_the_explorer_and_notebook_07_stores_no_dead_widgets(site):
    index = (site / "index.html").read_text()
    assert 'href="explorer.html"' in index
    assert "docs/explorer.md" in (ROOT / "README.md").read_text()
    page = (site / "notebooks" / "07_explorer.html").read_text()
    assert 'explorer.html"' in page, "notebook 07's page does not link the explorer"
    assert "widget-state+json" not in page and "jupyter-widgets" not in page and "require.min.js" not in page


@pytest.mark.slow
def test_the_scripts_end_on_what_the_user_can_fix_with_one_line(tmp_path):
    import subprocess

    env = {**os.environ, "CIFAR10_SOURCE": str(tmp_path / "no-such-cifar.tar.gz"), "OMP_NUM_THREADS": "1"}
    build = subprocess.run([sys.executable, str(ROOT / "tools" / "build_site_explorer.py"), "--out", str(tmp_path / "d.js")],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert build.returncode == 2 and "error: CIFAR-10 could not be loaded" in build.stderr, build.stderr
    assert "Traceback" not in build.stderr and not (tmp_path / "d.js").exists()
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "site_explorer.py"), "--site", str(tmp_path),
                            "--results", ""], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bench.returncode == 2 and bench.stderr.strip() == (
        f"error: {tmp_path} holds no built explorer page: build the site first with "
        f"python -m sphinx -W -b html docs {tmp_path}")
