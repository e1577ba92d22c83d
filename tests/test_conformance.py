"""The conformance machinery: a method named ``<method>@<library>`` is compared with the
suite's own ``<method>`` on the same images. Checked with two implementations whose answer
is known in closed form: our Grad-CAM times 3 (the same map up to a positive factor: full
agreement, and every scale-free metric gives identical scores, so no verdict changes) and
our Grad-CAM negated (Spearman exactly -1 wherever the map is not constant, and a
localization verdict that changes: it has no positive mass in the lesion)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from cambench.benchmarks.models.zoo import MODELS
from cambench.benchmarks.reports.conformance import references
from cambench.benchmarks.run import main
from cambench.cams import METHODS
from cambench.cams.gradient_cams import gradcam

pytestmark = pytest.mark.harness


@pytest.fixture
def libraries():
    info = dataclasses.asdict(METHODS.get("gradcam").info)

    def scaled(model, x, target, *, layer=None):
        """Grad-CAM times 3 (a test implementation)."""
        e = gradcam(model, x, target, layer=layer)
        return dataclasses.replace(e, maps=3.0 * e.maps)

    def flipped(model, x, target, *, layer=None):
        """Grad-CAM negated (a test implementation)."""
        e = gradcam(model, x, target, layer=layer)
        return dataclasses.replace(e, maps=-e.maps)

    METHODS.add("gradcam@scaled", scaled, **info)
    METHODS.add("gradcam@flipped", flipped, **info)
    yield
    METHODS.remove("gradcam@scaled")
    METHODS.remove("gradcam@flipped")


SUITE = """
name = "conformance-test"
seed = 0
[eval]
max_images = 48
[models.gapcnn]
checkpoint = "{checkpoint}"
[datasets.synth-lesion]
image_size = 32
[methods."gradcam@scaled"]
[methods."gradcam@flipped"]
[methods.gradcam]
[methods.random]
[metrics.agreement]
[metrics.aopc_morf]
region = 4
steps = 8
[metrics.energy_pointing_game]
"""


def test_a_library_method_is_compared_with_ours_on_the_same_images(tmp_path, libraries):
    torch.manual_seed(0)  # an untrained model: the comparisons hold for any weights
    checkpoint = tmp_path / "gapcnn.pt"
    torch.save(MODELS.get("gapcnn").obj(num_classes=2, in_channels=1).state_dict(), checkpoint)
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(checkpoint=checkpoint))
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "cache")]
    assert main([*args, "--no-progress"]) == 0
    rows = pd.read_parquet(out / "rows.parquet")
    agree = rows[rows["metric"] == "agreement"].pivot_table(
        index=["method", "sample_id"], columns="output", values="value"
    )
    scaled = agree.loc["gradcam@scaled"]
    assert len(scaled) == 48
    np.testing.assert_allclose(scaled["value"], 1.0, atol=1e-12)
    np.testing.assert_allclose(scaled["top_iou"], 1.0, atol=1e-12)
    np.testing.assert_allclose(scaled["max_abs_diff"], 0.0, atol=1e-6)
    flipped = agree.loc["gradcam@flipped"]
    # where Grad-CAM's map is constant (all zero after its ReLU) both maps are constant
    varies = flipped["max_abs_diff"] > 0
    assert varies.sum() >= 24
    np.testing.assert_allclose(flipped.loc[varies, "value"], -1.0, atol=1e-12)

    cells = pd.read_parquet(out / "cells.parquet").set_index(["method", "metric"])
    for ours in ("gradcam", "random"):
        status, reason = cells.loc[(ours, "agreement"), ["status", "reason"]]
        assert status == "not_applicable" and "harness's own" in reason

    verdicts = pd.read_parquet(out / "conformance.parquet").set_index(["method", "metric"])
    assert set(verdicts.loc["gradcam@scaled"]["verdict"]) == {"no difference seen"}
    assert (verdicts.loc["gradcam@scaled"]["p_adj"] == 1.0).all()  # identical scores
    # a map <= 0 has no positive mass: 0 where Grad-CAM's share of mass in the lesion is > 0
    flip = verdicts.loc[("gradcam@flipped", "energy_pointing_game")]
    assert flip["verdict"] == "differs" and flip["mean_library"] == 0.0 and flip["p_adj"] < 1e-3
    assert "agreement" not in verdicts.index.get_level_values("metric")
    board = (out / "leaderboard.md").read_text()
    assert "## Libraries: does the implementation change the conclusion?" in board
    assert "`gradcam@flipped`" in board and "**differs**" in board


def test_references_name_the_first_entry_of_the_harness_method():
    uses = {"a": "gradcam", "b": "gradcam", "c": "gradcam@x", "d": "gradcampp@y", "e": "cam"}
    assert references(uses) == {"c": "a"}
