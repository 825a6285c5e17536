"""A picture of the live explorer for places where no kernel runs (GitHub, the site): the app served by
`python -m helpers.app` (Voila), opened in chromium through Playwright, photographed once it has drawn.

    python tools/screenshot_explorer.py

Writes docs/_static/explorer.png (temporary name, then rename); notebook 07 and the site show it.
Needs chromium (`apt-get install chromium`, or CHROMIUM=path) and the test extra (Playwright, Voila).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import app, atomic  # noqa: E402  (the checkout's helpers, installed or not)


def photograph(url: str, out: Path, chromium: str, width: int) -> None:
    """Open the page, wait until the app shows its maps, and write a picture of the app to `out`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
            page.goto(url, timeout=240_000)
            page.wait_for_function("document.querySelectorAll('.widget-image').length >= 4", timeout=240_000)
            page.wait_for_timeout(2000)  # the background prediction's first chunk updates the counts
            app_box = page.locator(".widget-vbox").first  # the app, without the guide under it
            atomic.write_bytes(out, app_box.screenshot())  # temporary name, then rename
        finally:
            browser.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "explorer.png")
    p.add_argument("--width", type=int, default=1100, help="browser window width in pixels")
    args = p.parse_args()
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: no chromium found: apt-get install chromium, or set CHROMIUM to its path")
    try:
        with app.running() as url:
            photograph(url, args.out, chromium, args.width)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
