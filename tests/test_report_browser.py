"""The smoke run's report in headless Chromium: it loads with no console error and asks
for nothing outside itself; picking a method in the gallery changes the maps shown, the
view switches between overlay and map alone, and a heading sorts its table. A screenshot
of the page is written to ``results/artifacts/report-smoke.png`` (or
``$CAMBENCH_ARTIFACTS``). Skipped, saying why, where no Chromium can be had (``.ci/run``
installs Debian's)."""

import os
from pathlib import Path

import numpy as np
import pytest

from cambench.benchmarks.reports.browser import opened, unavailable

pytestmark = [pytest.mark.harness, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CAMBENCH_ARTIFACTS", ROOT / "results" / "artifacts"))

if why := unavailable():
    pytest.skip(f"no browser to open the report: {why}", allow_module_level=True)


def visible(page, selector: str) -> int:
    return page.locator(f"{selector} >> visible=true").count()


def test_report_opens_in_chromium_and_its_gallery_controls_work(smoke_report):
    run, _ = smoke_report
    with np.load(run / "groups" / "gapcnn--synth-lesion" / "examples.npz") as npz:
        k = len(npz["images"])
    with opened(run / "report.html") as seen:
        page = seen.page
        assert seen.errors == []
        assert [u for u in seen.requests if not u.startswith("data:")] == [
            (run / "report.html").resolve().as_uri()
        ]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "report-smoke.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # picking a method: unticking gradcam hides its maps, the others stay
        grad, cam = ".gallery .tile[data-method='gradcam']", ".gallery .tile[data-method='cam']"
        assert visible(page, grad) == k and visible(page, cam) == k
        page.get_by_label("gradcam", exact=True).uncheck()
        assert visible(page, grad) == 0 and visible(page, cam) == k
        page.locator("button[data-pick='none']").click()
        assert visible(page, ".gallery .tile[data-method]") == 0
        page.locator("button[data-pick='all']").click()
        assert visible(page, grad) == k

        # overlay (the map half transparent over the image) or the map alone
        def opacity():
            return page.locator(f"{cam} img.map").first.evaluate("e => getComputedStyle(e).opacity")

        assert opacity() == "0.5"
        page.get_by_label("map alone").check()
        assert opacity() == "1"
        page.get_by_label("overlay on the image").check()
        assert opacity() == "0.5"

        # a column heading sorts its table, then reverses it
        table = page.locator("#headline table")
        table.locator("thead th button").first.click()
        names = table.locator("tbody th").all_inner_texts()
        assert names == sorted(names)
        table.locator("thead th button").first.click()
        assert table.locator("tbody th").all_inner_texts() == sorted(names, reverse=True)
        assert seen.errors == []
