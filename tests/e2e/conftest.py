"""A real browser for page tests: Playwright driving Debian's chromium.

No browser is downloaded: Playwright launches ``/usr/bin/chromium``
(``apt-get install chromium``), headless, with a fresh profile of its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # root cannot use chromium's sandbox
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Nothing but the page under test may reach the network.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``test-artifacts/`` at the repository root, where screenshots go."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
async def browser():
    """A headless chromium for the session (Playwright gives each launch a
    fresh temporary profile)."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is missing: setup/install-deps --test installs it",
                    pytrace=False)
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: setup/install-deps --test installs it "
                    "(apt chromium)", pytrace=False)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
