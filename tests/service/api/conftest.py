"""Fixtures of the API's tests: a headless chromium for the studio's browser tests (Debian's binary,
never a downloaded one), shared by the tests of one module. Without one they skip, saying why."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    return os.environ.get("STROKES_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TESTS SKIPPED: playwright is not installed (`make test` installs it)")
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "BROWSER TESTS SKIPPED: no chromium binary (`make test` installs Debian's chromium; "
            "or set STROKES_CHROMIUM)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
