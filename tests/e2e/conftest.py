"""Page tests in a real browser: Playwright driving Debian's chromium
(the fixtures live in ``tests/fixtures/browser.py``)."""

from tests.fixtures.browser import artifacts, browser  # noqa: F401  (fixtures)
