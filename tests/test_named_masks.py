"""A localization metric reads the mask its suite entry names (``mask = "lesion"``,
``"organ"`` or a further mask of the dataset): the same numbers as the metric reading those
files as its own lesion mask, image by image; a name the dataset lacks leaves the cell not
applicable with the names it has, and ``mask`` on a metric that reads no mask is refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.suite import load_suite
from cambench.benchmarks.models.zoo import MODELS
from cambench.benchmarks.run import main

pytestmark = pytest.mark.harness

SIZE = 32


def _disc(rng, radius):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(radius, SIZE - radius, size=2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _write_data(root, n=48):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        lesion, lungs, organ = _disc(rng, 4), _disc(rng, 9), _disc(rng, 12)
        if i % 3 == 0:
            lesion[:] = False  # a normal image: nothing to localize
        image = np.clip(0.3 + 0.1 * rng.standard_normal((SIZE, SIZE)) + 0.4 * lesion, 0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / f"{i}.png")
        for kind, mask in (("lesion", lesion), ("lungs", lungs), ("organ", organ)):
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"{i}_{kind}.png")
        rows.append(
            {"image": f"{i}.png", "label": i % 2, "lesion": f"{i}_lesion.png",
             "lungs": f"{i}_lungs.png", "organ": f"{i}_organ.png"}
        )
    pd.DataFrame(rows).to_csv(root / "images.csv", index=False)


SUITE = """
name = "named-masks"
seed = 0
[eval]
split = "train"  # a checkpoint: nothing is trained on it
max_images = 32
[models.gapcnn]
checkpoint = "{checkpoint}"
[datasets.named]
use = "csv"
manifest = "{manifest}"
channels = 1
image_size = 32
mask_col = "lesion"
organ_mask_col = "organ"
extra_masks = {{ lungs = "lungs" }}
[datasets.lungs-as-lesion]
use = "csv"
manifest = "{manifest}"
channels = 1
image_size = 32
mask_col = "lungs"
[methods.gradcam]
[methods.random]
[metrics.pointing_game]
[metrics.pointing_lungs]
use = "pointing_game"
mask = "lungs"
[metrics.energy_organ]
use = "energy_pointing_game"
mask = "organ"
[metrics.organ_mass]
[metrics.pointing_heart]
use = "pointing_game"
mask = "heart"
"""


def test_a_metric_reads_the_mask_its_entry_names(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_data(data)
    torch.manual_seed(0)  # one set of weights for both datasets: the maps are the same
    net = MODELS.get("gapcnn").obj(num_classes=2, in_channels=1)
    checkpoint = tmp_path / "gapcnn.pt"
    torch.save(net.state_dict(), checkpoint)
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(checkpoint=checkpoint, manifest=data / "images.csv"))
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "c")]
    assert main([*args, "--no-progress"]) == 0

    rows = pd.read_parquet(out / "rows.parquet")
    value = rows.set_index(["dataset", "method", "metric", "sample_id"])["value"]

    def scores(dataset, metric):
        return value.xs((dataset, metric), level=("dataset", "metric")).sort_index()

    lungs = scores("named", "pointing_lungs")
    as_lesion = scores("lungs-as-lesion", "pointing_game")
    assert len(lungs) > 20
    pd.testing.assert_series_equal(lungs, as_lesion, check_names=False)
    # and it is not the lesion mask: a third of the images have none, and others differ
    assert len(scores("named", "pointing_game")) < len(lungs)
    pd.testing.assert_series_equal(
        scores("named", "energy_organ"), scores("named", "organ_mass"), check_names=False
    )

    cells = pd.read_parquet(out / "cells.parquet")
    heart = cells[(cells["metric"] == "pointing_heart") & (cells["dataset"] == "named")]
    assert set(heart["status"]) == {"not_applicable"}
    assert all("'heart'" in r and "'lungs'" in r for r in heart["reason"])


def test_mask_on_a_metric_that_reads_no_mask_is_refused(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(
        "[models.gapcnn]\n[datasets.synth-lesion]\n[methods.gradcam]\n"
        '[metrics.aopc_morf]\nmask = "lesion"\n'
    )
    with pytest.raises(UserError, match="aopc_morf reads no mask"):
        load_suite(str(suite))
    suite.write_text(
        "[models.gapcnn]\n[datasets.synth-lesion]\n[methods.gradcam]\n"
        '[metrics.pointing_game]\nmask = "../lungs"\n'
    )
    with pytest.raises(UserError, match="name a mask of the dataset"):
        load_suite(str(suite))
