"""Browser fixtures: Debian's headless chromium driven by Playwright for Python.

The browser is the system one (``/usr/bin/chromium``, installed by ``make test`` where apt-get
runs as root); ``playwright install`` is never used (it downloads browsers). Without it the
tests are skipped with the reason."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("LORAPLEX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    """Per module, not per session: Playwright's sync API keeps an event loop running in the main
    thread while it is open, and every later test that calls asyncio.run() would fail."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set LORAPLEX_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh page (own storage); screenshots go to the test's tmp dir via ``page.shot(name)``."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))

    def shot(name: str):
        path = tmp_path / f"{name}.png"
        pg.screenshot(path=str(path), full_page=True)
        return path

    pg.shot = shot
    pg.js_errors = errors
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
