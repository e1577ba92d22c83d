"""Work the runner does once instead of many times, checked against doing it every time:

- maps equal up to a positive factor (Grad-CAM, HiResCAM and XGrad-CAM on a GAP head) are
  scored once by the scale-free metrics, and the scores equal a recomputation;
- every scale-free metric gives the same scores for a map and a positive multiple of it
  (the property that makes the sharing sound);
- a localization metric's ``max_images`` counts the images it can score (those with a
  lesion mask), and a method explains only the images its metrics still take.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cambench.benchmarks.engine import group
from cambench.benchmarks.engine.group import GroupState, SameMaps
from cambench.benchmarks.engine.suite import Component
from cambench.benchmarks.run import main
from cambench.metrics import METRICS, MetricContext

pytestmark = pytest.mark.harness

SUITE = """
name = "shared"
[eval]
max_images = 24
batch_size = 12
[train]
epochs = 3
[datasets.synth-lesion]
image_size = 32
n = 64
[models.gapcnn]
[methods.gradcam]
[methods.hirescam]
[methods.xgradcam]
[methods.random]
[metrics.deletion]
step = 0.25
[metrics.aopc_morf]
region = 8
steps = 4
[metrics.pointing_game]
[metrics.sparseness]
[metrics.stability]
transform = "noise"
max_images = 4
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run(tmp_path: Path, name: str, cache: str, body: str = SUITE) -> Path:
    suite = tmp_path / f"{name}.toml"
    suite.write_text(body)
    out = tmp_path / name
    assert main(["--suite", str(suite), "--out", str(out), "--cache", cache, "--no-progress"]) == 0
    return out


def values(out: Path) -> pd.Series:
    rows = pd.read_parquet(out / "rows.parquet")
    return rows.set_index(["method", "metric", "output", "sample_id"])["value"].sort_index()


def test_equal_maps_are_scored_once_and_agree_with_a_recomputation(tmp_path, cache, monkeypatch):
    shared = run(tmp_path, "shared", cache)
    report = next((shared / "groups").glob("*/model.json")).read_text()
    assert '"hirescam": [\n      "gradcam"' in report.replace("\r", "")
    assert '"xgradcam": [\n      "gradcam"' in report.replace("\r", "")
    # the control: no two maps count as equal, every method's every metric is computed
    monkeypatch.setattr(SameMaps, "tol", -1.0)
    alone = run(tmp_path, "alone", cache)
    assert '"same_maps": {}' in next((alone / "groups").glob("*/model.json")).read_text()
    a, b = values(shared), values(alone)
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=0, atol=1e-5)
    # the sharing is not vacuous: HiResCAM's curves equal Grad-CAM's, random's do not
    for metric in ("deletion", "aopc_morf"):
        grad = a.loc[("gradcam", metric, "value")]
        assert a.loc[("hirescam", metric, "value")].equals(grad)
        assert not np.allclose(a.loc[("random", metric, "value")], grad)


@pytest.mark.parametrize(
    "name", sorted(n for n in METRICS.names() if METRICS.get(n).info.scale_free)
)
def test_scale_free_metrics_ignore_a_positive_factor(name):
    """The property the sharing rests on, on a random model, random maps and half-empty
    masks: a map times a positive factor scores what the map scores."""
    from cambench.benchmarks.models.zoo import build_model

    torch.manual_seed(0)
    model = build_model("gapcnn", in_channels=1, num_classes=2, width=8).eval()
    x = torch.rand(6, 1, 32, 32)
    maps = torch.nn.functional.interpolate(torch.rand(6, 1, 4, 4), size=(32, 32), mode="bilinear")
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:3, 8:20, 10:24] = True
    with torch.no_grad():
        logits = model(x)

    def scores(m: torch.Tensor):
        ctx = MetricContext(
            model=model,
            x=x,
            labels=logits.argmax(1),
            target=logits.argmax(1),
            maps=m,
            logits=logits,
            ids=[f"s{i}" for i in range(6)],
            masks=masks,
            organ_masks=masks,
        )
        options = {"region": 8, "steps": 4} if "pc" in name else {}
        return METRICS.get(name).obj(ctx, **options)

    one = scores(maps[:, 0])
    assert np.isfinite(one.values["value"]).any()
    # times 8, exact in floating point: the same numbers; times 7.3, rounded: a near-tie may
    # swap two pixels of a curve, a change of the order of one pixel's share (1e-6 here)
    for factor, atol in ((8.0, 0.0), (7.3, 1e-5)):
        scaled = scores(factor * maps[:, 0])
        for key, value in one.values.items():
            np.testing.assert_allclose(scaled.values[key], value, rtol=0, atol=atol, equal_nan=True)


def test_a_localization_cap_counts_images_with_a_lesion(tmp_path, cache, monkeypatch):
    """pointing_game capped at 5 scores the first 5 lesion images of the draw; with every
    metric capped, each method explains only up to the last image a metric takes."""
    body = SUITE.replace("[metrics.pointing_game]\n", "[metrics.pointing_game]\nmax_images = 5\n")
    for cap in ("[metrics.deletion]\n", "[metrics.aopc_morf]\n", "[metrics.sparseness]\n"):
        body = body.replace(cap, cap + "max_images = 2\n")
    explained: list[int] = []
    real = group.explain

    def counting(state, prep, batch, m, n, fn):
        explained.append(n)
        return real(state, prep, batch, m, n, fn)

    monkeypatch.setattr(group, "explain", counting)
    out = run(tmp_path, "capped", cache, body)
    cells = pd.read_parquet(out / "cells.parquet").set_index(["method", "metric"])
    assert (cells.xs("pointing_game", level="metric")["n"] == 5).all()
    # every method explained only as far as the 5th lesion image, never the whole draw
    assert explained and max(explained) < 24
    # the 5 scored are the first 5 lesion images of the draw: those the uncapped run scores
    # first (rows are in draw order)
    monkeypatch.setattr(group, "explain", real)
    full = pd.read_parquet(run(tmp_path, "uncapped", cache) / "rows.parquet")
    rows = pd.read_parquet(out / "rows.parquet")
    for method in ("gradcam", "random"):
        pick = (rows.metric == "pointing_game") & (rows.method == method)
        every = (full.metric == "pointing_game") & (full.method == method)
        assert list(rows[pick].sample_id) == list(full[every].sample_id)[:5]
        assert len(full[every]) > 5


def test_wants_counts_only_the_images_a_metric_can_score():
    entry = Component(label="pg", use="pointing_game", max_images=3)
    state = GroupState.__new__(GroupState)
    state.taken = {}
    counted = np.array([False, True, False, True, True, False, True, False])
    # three lesion images: the ones at 1, 3 and 4; the prefix ends after the third
    assert state.wants(entry, "k", 8, counted) == 5
    assert state.take(entry, "k", 8, counted) == 5
    assert state.taken["k"] == 3
    assert state.wants(entry, "k", 8, counted) == 0
    # without a cap: up to the last lesion image; without lesions: none
    free = Component(label="pg", use="pointing_game")
    assert state.wants(free, "f", 8, counted) == 7
    assert state.wants(free, "f", 8, np.zeros(8, bool)) == 0
    # a metric that scores every image counts every image
    assert state.wants(Component(label="d", use="deletion", max_images=3), "d", 8) == 3
