"""Debian's headless Chromium, driven by Playwright, for the browser tests (and the README's
screenshots, examples/explorer_screenshots.py).

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (Debian's package
``chromium``, which ``make test`` installs when it is missing). Without it the browser tests
*fail* with the reason; they are never skipped silently. ``DYMU_SKIP_BROWSER_TESTS=1`` is the one
explicit way to skip them, on a machine that cannot have a browser.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

from playwright.sync_api import Browser, Page, expect, sync_playwright

__all__ = ["ARTIFACTS", "CHROMIUM", "CHROMIUM_ARGS", "Browser", "Page", "chromium", "expect"]

CHROMIUM = Path(os.environ.get("DYMU_CHROMIUM", "/usr/bin/chromium"))
#: --disable-background-networking etc.: the machine has no network, and Chromium must not try.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "tmp" / "artifacts" / "explorer"


def missing_browser() -> str | None:
    """Why the browser cannot run, or None when it can."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return (
            f"Debian's chromium is not at {CHROMIUM}: run `make test` (its set-up installs it"
            " with `apt-get install chromium`) or install it by hand; the browser tests need it"
        )
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    """One headless Chromium for the caller's lifetime."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
