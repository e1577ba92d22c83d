"""A report opened in a real browser: headless Chromium driven by Playwright, for the
report's tests and ``python -m benchmarks.perf_report``.

Chromium is Debian's (``apt-get install chromium``; ``.ci/run`` installs it where it is
missing) or the one ``CAMBENCH_CHROMIUM`` names; Playwright (the ``dev`` extra) drives it
without downloading a browser of its own. The page is opened from disk (``file://``), as a
reader opens an attachment; Chromium starts with its background networking off, so a page
that asked for anything outside itself would show it as a failed request.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ARGS = (
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
)


def chromium() -> str | None:
    """The Chromium executable: ``CAMBENCH_CHROMIUM``, else ``chromium`` on the PATH."""
    named = os.environ.get("CAMBENCH_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def unavailable() -> str | None:
    """Why no browser can open a report here (None when one can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if chromium() is None:
        return "no Chromium found: apt-get install chromium, or set CAMBENCH_CHROMIUM"
    return None


@dataclass
class Opened:
    """What the browser saw while opening the page."""

    page: object  # playwright.sync_api.Page
    load_seconds: float
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


@contextmanager
def opened(path: str | Path, *, width: int = 1280, height: int = 900) -> Iterator[Opened]:
    """Open ``path`` in headless Chromium; yield the page and what it logged, timed from
    navigation to the load event (every embedded image decoded and the script run)."""
    from playwright.sync_api import sync_playwright

    url = Path(path).resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=list(ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            requests: list[str] = []
            page.on(
                "console",
                lambda m: (
                    errors.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:100]}"))
            page.on("request", lambda r: requests.append(r.url))
            start = time.perf_counter()
            page.goto(url, wait_until="load")
            seconds = time.perf_counter() - start
            yield Opened(page, seconds, errors, requests)
        finally:
            browser.close()
