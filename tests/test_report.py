"""The HTML report of a run (``python -m benchmarks.report``, ``--report``): one
self-contained page with every section, one gallery image per example and method, no
address outside the file; numbers as the leaderboard stored them; a partial run reported
from its stored groups; the headline table the run prints, against the leaderboard's ranks.
The page in a real browser: tests/test_report_browser.py."""

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from cambench.benchmarks.engine.store import RunStore, read_run
from cambench.benchmarks.reports.collect import collect, stored_groups
from cambench.benchmarks.reports.figures import DEFAULT_CMAP
from cambench.benchmarks.reports.html import decimals, main, write_report

pytestmark = pytest.mark.harness

SECTIONS = ["run", "headline", "findings", "leaderboard", "ranks", "gallery", "curves", "cells"]


class Page(HTMLParser):
    """The parts of the page the tests read: sections, headings, images, gallery tiles,
    every attribute value, and the cells of the sortable tables."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.headings, self.images, self.tiles = [], [], [], []
        self.attributes, self.board_cells = [], []
        self._gallery = None
        self._heading = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attributes += [(tag, k, v or "") for k, v in attrs]
        if tag == "section" and a.get("id") and "group" not in a.get("class", ""):
            if not a["id"].startswith(("gallery-", "lb-", "figures-")):
                self.sections.append(a["id"])
            if a["id"].startswith("gallery-"):
                self._gallery = a["id"][len("gallery-") :]
        if re.fullmatch(r"h[1-6]", tag):
            self._heading = [int(tag[1]), ""]
        if tag == "img":
            self.images.append(a)
        if tag == "figure" and "data-method" in a:
            self.tiles.append((self._gallery, a["data-method"]))
        if tag == "td" and "data-sort" in a:
            self.board_cells.append(a["data-sort"])

    def handle_data(self, data):
        if self._heading is not None:
            self._heading[1] += data

    def handle_endtag(self, tag):
        if re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            self.headings.append(tuple(self._heading))
            self._heading = None


@pytest.fixture(scope="module")
def page(smoke_report):
    run, _ = smoke_report
    text = (run / "report.html").read_text(encoding="utf-8")
    return run, text, Page(text)


def test_report_has_every_section_in_order_and_navigable_headings(page):
    _, _, p = page
    assert [s for s in p.sections if s in SECTIONS] == SECTIONS
    levels = [level for level, _ in p.headings]
    assert levels.count(1) == 1 and levels[0] == 1
    # a screen reader's outline: no heading skips a level
    assert all(b <= a + 1 for a, b in zip(levels, levels[1:], strict=False)), p.headings
    texts = [t for _, t in p.headings]
    assert "gapcnn on synth-lesion" in texts


def test_gallery_has_one_image_per_example_and_method(page):
    run, _, p = page
    with np.load(run / "groups" / "gapcnn--synth-lesion" / "examples.npz") as npz:
        k = len(npz["images"])
        methods = {key[len("maps__") :] for key in npz.files if key.startswith("maps__")}
    tiles = pd.Series([m for g, m in p.tiles if g == "gapcnn--synth-lesion"])
    assert set(tiles) == methods == {"cam", "gradcam", "random"}
    assert (tiles.value_counts() == k).all()
    maps = [img for img in p.images if img.get("class") == "map"]
    assert len(maps) == k * len(methods)
    assert all(img.get("alt") for img in maps)  # each map says what it is
    assert all("alt" in img for img in p.images)  # decorative copies have alt=""


def test_report_is_self_contained(page):
    _, text, p = page
    for tag, attr, value in p.attributes:
        if attr in ("src", "href", "srcset", "action", "poster", "data"):
            assert value.startswith(("data:", "#")), (tag, attr, value[:80])
    for needle in ("http:", "https:", "ftp:", "url(", "@import", "<link", "<iframe"):
        assert needle not in text.lower(), needle
    # embedded figures and maps decode as PNG
    for img in p.images:
        head = base64.b64decode(img["src"].split(",", 1)[1][:16])
        assert head.startswith(b"\x89PNG"), img.get("alt")


def test_leaderboard_cells_carry_the_stored_means(page):
    run, _, p = page
    board = pd.read_parquet(run / "leaderboard.parquet")
    stored = {f"{v:.12g}" for v in board.loc[board["status"] == "ok", "mean"]}
    shown = {v for v in p.board_cells if v and not re.fullmatch(r"\d+\.\d{6}", v)}
    assert stored <= shown


def test_numbers_are_shown_to_the_precision_of_their_interval():
    # two significant digits of the interval's width
    assert decimals(0.38, 0.45) == 3 and decimals(0.1, 0.9) == 2 and decimals(10, 40) == 0


def test_run_prints_the_headline_table_from_the_leaderboard_ranks(smoke_report):
    run, printed = smoke_report
    board = pd.read_parquet(run / "leaderboard.parquet")
    ok = board[(board["status"] == "ok") & (board["family"] != "cost") & (board["rank"] > 0)]
    expected = ok.groupby(["method", "family"])["rank"].mean()  # over groups and metrics
    lines = printed.strip().splitlines()
    header = lines[1].split()
    assert lines[0] == "smoke:" and header[0] == "method"
    for line in lines[2 : 2 + ok["method"].nunique()]:
        method, *cells = re.split(r"\s{2,}", line.strip())
        for family, cell in zip(header[1:], cells, strict=True):
            assert float(cell.split()[0]) == pytest.approx(expected[method, family], abs=0.005)
    assert "random" in printed and "ref" in printed


def test_report_of_a_partial_run_covers_its_stored_groups(smoke_report, tmp_path):
    run, _ = smoke_report
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    for name in ("leaderboard.parquet", "rows.parquet", "cells.parquet", "curves.parquet"):
        (partial / name).unlink()
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest.update(status="interrupted", stopped_by="Ctrl-C (SIGINT)", finished=None)
    (partial / "manifest.json").write_text(json.dumps(manifest))
    # the tables gathered from the stored groups are those the finished run published
    stored = read_run(partial)
    store = RunStore(partial)
    tables = collect(store, stored_groups(store, stored.manifest), stored.manifest, 0)
    published = pd.read_parquet(run / "leaderboard.parquet")
    assert_frame_equal(tables.table, published, check_dtype=False)  # object vs float NaN columns
    text = write_report(partial).read_text(encoding="utf-8")
    assert "Partial run." in text and "interrupted" in text and "gapcnn--synth-lesion" in text
    assert Page(text).tiles


def test_colour_map_is_colour_blind_safe_by_default_and_jet_on_request(smoke_report, tmp_path):
    from PIL import Image

    run, _ = smoke_report

    def first_colour(path):
        bar = next(i for i in Page(path.read_text()).images if "colour scale" in i.get("alt", ""))
        png = base64.b64decode(bar["src"].split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[0, 0]

    default = first_colour(run / "report.html")
    assert main([str(run), "--out", str(tmp_path / "jet.html"), "--cmap", "jet"]) == 0
    jet = first_colour(tmp_path / "jet.html")
    for colour, name in ((default, DEFAULT_CMAP), (jet, "jet")):
        expected = np.round(np.asarray(matplotlib.colormaps[name](0.0)[:3]) * 255)
        assert np.abs(colour.astype(int) - expected).max() <= 1, name


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "does not exist"),
        (["{run}", "--cmap", "jett"], "--cmap 'jett' is not a matplotlib colour map"),
        (["{run}", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_bad_input_is_refused_with_a_message(smoke_report, tmp_path, capsys, args, message):
    run, _ = smoke_report
    names = dict(missing=str(tmp_path / "nope"), run=str(run), tmp=str(tmp_path))
    assert main([a.format(**names) for a in args]) == 2
    assert message in capsys.readouterr().err


TINY = """
name = "tiny"
[eval]
max_images = 16
batch_size = 8
[train]
epochs = 2
[models.gapcnn]
[datasets.synth-lesion]
image_size = 32
n = 64
[methods.gradcam]
[methods.random]
[metrics.aopc_morf]
region = 8
steps = 4
[metrics.pointing_game]
"""


@pytest.mark.slow
def test_report_of_a_run_made_on_ray(tmp_path):
    """``--executor ray --report``: the groups come back from Ray tasks; the page has the
    run's leaderboard and every example's maps."""
    pytest.importorskip("ray")
    from cambench.benchmarks.run import main as run_main

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY)
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert (
        run_main([*args, "--no-progress", "--executor", "ray", "--num-cpus", "1", "--report"]) == 0
    )
    p = Page((out / "report.html").read_text(encoding="utf-8"))
    assert (
        "executor" in (out / "report.html").read_text()
        and "ray" in json.loads((out / "manifest.json").read_text())["executor"]
    )
    with np.load(out / "groups" / "gapcnn--synth-lesion" / "examples.npz") as npz:
        k = len(npz["images"])
    assert sorted(m for _, m in p.tiles) == sorted(["gradcam"] * k + ["random"] * k)


def test_a_method_that_explained_fewer_examples_shows_them_as_no_map(tmp_path):
    """A method capped below the examples' number keeps its maps of the images it explained
    (those of the same method uncapped: the oracle) and NaN for the others, which the
    gallery shows as "no map"; nothing from a later batch is stored under their ids."""
    from cambench.benchmarks.run import main as run_main

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY + '[methods.gradcam_two]\nuse = "gradcam"\nmax_images = 2\n')
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert run_main([*args, "--no-progress", "--report"]) == 0
    with np.load(out / "groups" / "gapcnn--synth-lesion" / "examples.npz") as npz:
        full, two, k = npz["maps__gradcam"], npz["maps__gradcam_two"], len(npz["images"])
    explained = np.isfinite(two).all(axis=(1, 2))
    assert k == 4 and np.isfinite(full).all()
    assert 1 <= explained.sum() <= 2 and np.isnan(two[~explained]).all()
    np.testing.assert_allclose(two[explained], full[explained], rtol=1e-5, atol=1e-7)
    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.count("no map: gradcam_two did not explain this image") == k - explained.sum()
    tiles = pd.Series([m for _, m in Page(text).tiles])
    assert (tiles.value_counts() == k).all() and set(tiles) == {"gradcam", "gradcam_two", "random"}
