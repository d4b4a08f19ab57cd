"""The README's screenshots of the explorer (``make screenshots``), taken with the shipped model.

Serves ``model_store/scenes-small`` on a free loopback port, opens the explorer in Debian's
headless Chromium (the browser tests' launcher, ``tests/browser.py``), picks r = (0.6, 0.3, 0.1)
and c = 0.5, predicts the bundled sample image, keeps two preferences for the comparison, and
writes ``docs/img/explorer-1280x800.png`` (the whole page at 1280 px wide) and
``docs/img/explorer-390x844.png`` (a phone's screen on the architecture panel).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the launcher lives with the tests

from service.client import DymuClient  # noqa: E402
from service.server import BackgroundServer  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.browser import chromium, expect, missing_browser  # noqa: E402


def shoot(url: str, out: Path) -> None:
    with chromium() as browser:
        for width, height, full in ((1280, 800, True), (390, 844, False)):
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.goto(f"{url}/explorer#r=0,0,1&c=0.5")
            expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=60_000)
            if full:  # B: normals only, frugal; A: the preference shown above
                page.get_by_role("button", name="Keep current as B").click()
                page.get_by_label("r as numbers").fill("0.6, 0.3, 0.1")
                page.get_by_label("r as numbers").press("Enter")
                expect(page.get_by_test_id("pref-id")).to_have_text(re.compile("600000"))
                page.get_by_role("button", name="Keep current as A").click()
                page.get_by_role("button", name="Compare on the image").click()
                expect(page.get_by_test_id("compare-note")).to_be_visible()
            else:
                page.get_by_label("r as numbers").fill("0.6, 0.3, 0.1")
                page.get_by_label("r as numbers").press("Enter")
                expect(page.get_by_test_id("pref-id")).to_have_text(re.compile("600000"))
            page.get_by_role("button", name="Predict", exact=True).click()
            expect(page.get_by_test_id("map-normals").first).to_be_visible()
            if full:
                page.evaluate("window.scrollTo(0, 0)")
            else:  # a phone's screen on the tree and its cost, under the controls
                page.evaluate("document.getElementById('arch-panel').scrollIntoView()")
            path = out / f"explorer-{width}x{height}.png"
            page.screenshot(path=path, full_page=full)
            print(f"wrote {path.relative_to(ROOT)}")
            context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "model_store" / "scenes-small"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    if (reason := missing_browser()) is not None:
        sys.exit(reason)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(model_dir=args.model, backend="torch", log_level="warning")
    with BackgroundServer(settings) as server, DymuClient(server.url) as client:
        client.wait_ready(timeout=120)
        shoot(server.url, args.out)


if __name__ == "__main__":
    main()
