"""How heavy the site's explorer page (docs/explorer.md) is and how fast it draws, in chromium, from a built site.

    python -m sphinx -W -b html docs docs/_build/html
    python benchmarks/site_explorer.py

1. Page weight: the bytes of every file the page loads (the theme's included), and of its data alone.
2. First picture on a cold load: a new browser each round (nothing cached), from the navigation's start
   until the page has drawn its first image and maps; from the files themselves (file://) and from a
   web server on this machine (http://127.0.0.1). The goal: under 2 s.
3. A move of the exit or the image slider: the time the handler a key press runs takes to draw the new
   pictures, and the time until the next frame (the goal: under 50 ms).
The tables are also written to docs/results/site_explorer.md, which the site's Benchmarks page includes.
Needs chromium (`apt-get install chromium`, or CHROMIUM=path) and Playwright (the test extra).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import statistics
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes

ROOT = Path(__file__).resolve().parents[1]
FIRST_PICTURE_GOAL_S, MOVE_GOAL_MS, WEIGHT_LIMIT = 2.0, 50.0, 10_000_000

MOVES = """async ([id, moves]) => {
  const slider = document.getElementById(id), script = [], frame = [];
  for (let m = 0; m < moves; m++) {
    const t0 = performance.now();
    slider.value = String(1 + (m * 7 + 3) % Number(slider.max));
    slider.dispatchEvent(new Event("input", { bubbles: true }));
    const t1 = performance.now();
    await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
    script.push(t1 - t0);
    frame.push(performance.now() - t0);
  }
  return [script, frame];
}"""


@contextlib.contextmanager
def served(folder: Path):
    """A quiet web server for `folder` on a free port of this machine; yields its address."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def cold_load(p, chromium: str, url: str, site: Path) -> tuple[float, list[Path], list[str]]:
    """One load in a new browser: seconds to the first picture, the site's files asked for, and other addresses."""
    browser = p.chromium.launch(executable_path=chromium,
                                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    try:
        page, asked = browser.new_page(), []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(url + "explorer.html" if url.startswith("http") else (site / "explorer.html").as_uri())
        page.wait_for_selector("#explorer[data-ready=yes]", timeout=60_000)
        first_ms = page.evaluate("() => window.explorerTimes.firstPicture")
    finally:
        browser.close()
    files, outside = [], []
    for u in asked:
        parsed = urlparse(u)
        if parsed.scheme == "file":
            files.append(Path(unquote(parsed.path)))
        elif u.startswith(url) and url.startswith("http"):
            files.append(site / unquote(parsed.path).lstrip("/"))
        elif parsed.scheme not in ("data", "blob"):
            outside.append(u)
    return first_ms / 1000, files, outside


def moves(p, chromium: str, site: Path, n: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per slider, each move's script time and time to the next frame, in ms."""
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
    try:
        page = browser.new_page()
        page.goto((site / "explorer.html").as_uri())
        page.wait_for_selector("#explorer[data-ready=yes]", timeout=60_000)
        return {name: tuple(page.evaluate(MOVES, [control, n])) for name, control in
                (("exit slider", "ex-exit"), ("image slider", "ex-image"))}
    finally:
        browser.close()


def fail(message: str) -> None:
    """End on what the user can fix: the message alone after "error:", exit status 2, as the other scripts do."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, default=ROOT / "docs" / "_build" / "html", help="the built site "
                   "(default: docs/_build/html)")
    p.add_argument("--rounds", type=int, default=5, help="cold loads of each kind (default: 5)")
    p.add_argument("--moves", type=int, default=40, help="moves of each slider (default: 40)")
    _report.add_option(p)
    args = p.parse_args()
    if not (args.site / "explorer.html").is_file():
        fail(f"{args.site} holds no built explorer page: build the site first with "
                 f"python -m sphinx -W -b html docs {args.site}")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        fail("no chromium found: apt-get install chromium, or set CHROMIUM to its path")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        fail('Playwright is not installed: pip install -e ".[test]"')

    first: dict[str, list[float]] = {"files (file://)": [], "a web server on this machine (http://)": []}
    with sync_playwright() as pw, served(args.site) as url:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        version = browser.version
        browser.close()
        for _ in range(args.rounds):  # the two kinds in turn, so a busy minute costs both alike
            for kind, where in zip(first, ("file", url)):
                seconds, files, outside = cold_load(pw, chromium, where, args.site)
                first[kind].append(seconds)
                if outside:
                    fail(f"the page asked another site: {outside[:3]}")
        timed = moves(pw, chromium, args.site, args.moves)
    weight = sum(f.stat().st_size for f in set(files) if f.is_file())
    data_js = (args.site / "_static" / "explorer" / "data.js").stat().st_size

    report = _report.Report("site_explorer", args.results)
    report.text(f"Chromium {version}, headless. The page weighs what its files weigh uncompressed (a web server "
                "that compresses sends less); the first picture counts from the navigation's start.")
    report.table(["page", "value", "goal"], [
        [f"weight: {len(set(files))} files", f"{weight / 1e6:.1f} MB", f"under {WEIGHT_LIMIT / 1e6:.0f} MB"],
        ["of which the explorer's data (data.js)", f"{data_js / 1e6:.1f} MB", ""],
    ] + [[f"first picture, cold load from {kind}: median (slowest) of {len(xs)}",
          f"{statistics.median(xs):.2f} s ({max(xs):.2f} s)", f"under {FIRST_PICTURE_GOAL_S:.0f} s"]
         for kind, xs in first.items()])
    rows = []
    for name, (script, frame) in timed.items():
        rows.append([name, str(len(script)), f"{statistics.median(script):.1f}", f"{max(script):.1f}",
                     f"{statistics.median(frame):.1f}", f"{max(frame):.1f}", f"{MOVE_GOAL_MS:.0f}",
                     "yes" if max(frame) <= MOVE_GOAL_MS else "no"])
    report.table(["move", "count", "redraw median, ms", "redraw slowest, ms", "to the next frame: median, ms",
                  "slowest, ms", "goal, ms", "all within the goal"], rows)
    print("\n\n".join(report.parts))
    report.write()


if __name__ == "__main__":
    main()
