"""A method's ``layer`` names one layer or several (a list, a pattern, "stages"): the plan
expands it into one variant per layer, labelled ``<method>[<layer>]``. Checked against the
architecture (the zoo's stages, the map sizes its strides give) and against the method run
at the model's own layer (the variant there scores exactly as the plain method)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.plan import make_plan
from cambench.benchmarks.engine.suite import load_suite
from cambench.benchmarks.models.zoo import MODELS
from cambench.benchmarks.run import main

pytestmark = pytest.mark.harness

HEAD = """
name = "sweep"
seed = 0
[eval]
max_images = 24
[models.gapcnn]
checkpoint = "{checkpoint}"
[datasets.synth-lesion]
image_size = 32
"""


def _plan(tmp_path, body: str, models: str = ""):
    suite = tmp_path / "s.toml"
    suite.write_text(models + body)
    return make_plan(load_suite(str(suite)), data_root=None)


def _labels(plan, model: str) -> list[str]:
    (group,) = [g for g in plan.groups if g.model.label == model]
    return [m.label for m in group.methods]


def test_stages_patterns_and_lists_expand_per_model(tmp_path):
    models = "[models.gapcnn]\n[models.resnet18]\nwidth = 16\n[datasets.synth-lesion]\n"
    plan = _plan(tmp_path, '[methods.gradcam]\nlayer = "stages"\n[metrics.pointing_game]\n', models)
    assert _labels(plan, "gapcnn") == [f"gradcam[{n}]" for n in MODELS.get("gapcnn").info.stages]
    assert _labels(plan, "resnet18") == [f"gradcam[features.layer{i}]" for i in range(1, 5)]
    plan = _plan(
        tmp_path,
        '[methods.gradcam]\nlayer = "features.layer[34]"\n[metrics.pointing_game]\n',
        "[models.resnet18]\nwidth = 16\n[datasets.synth-lesion]\n",
    )
    assert _labels(plan, "resnet18") == ["gradcam[features.layer3]", "gradcam[features.layer4]"]
    # a list may name layers of different models: each model takes those it has
    plan = _plan(
        tmp_path,
        '[methods.gradcam]\nlayer = ["features.layer2", "features.6"]\n[methods.random]\n'
        "[metrics.pointing_game]\n",
        models,
    )
    assert _labels(plan, "gapcnn") == ["gradcam[features.6]", "random"]
    assert _labels(plan, "resnet18") == ["gradcam[features.layer2]", "random"]
    # one plain name: the method at that layer, its label unchanged
    plan = _plan(tmp_path, '[methods.gradcam]\nlayer = "features.6"\n[metrics.pointing_game]\n',
                 "[models.gapcnn]\n[datasets.synth-lesion]\n")
    assert _labels(plan, "gapcnn") == ["gradcam"]


@pytest.mark.parametrize(
    "body, message",
    [
        ('[methods.gradcam]\nlayer = "features.layer*"\n', "matches no module of model gapcnn"),
        ('[methods.gradcam]\nlayer = ["features.6", "head.9"]\n', "'head.9' names no module"),
        ('[methods.occlusion]\nlayer = "stages"\n', "occlusion explains at no layer"),
    ],
)
def test_a_layer_no_model_has_is_refused_before_work(tmp_path, body, message):
    models = "[models.gapcnn]\n[datasets.synth-lesion]\n"
    with pytest.raises(UserError, match=message):
        _plan(tmp_path, body + "[metrics.pointing_game]\n", models)


def test_a_model_entry_takes_one_layer(tmp_path):
    with pytest.raises(UserError, match="a model's layer is one name"):
        _plan(tmp_path, "[methods.gradcam]\n[metrics.pointing_game]\n",
              '[models.gapcnn]\nlayer = ["features"]\n[datasets.synth-lesion]\n')


def test_a_sweep_runs_each_layer_and_reports_its_map_size(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "gapcnn.pt"
    torch.save(MODELS.get("gapcnn").obj(num_classes=2, in_channels=1).state_dict(), checkpoint)
    suite = tmp_path / "s.toml"
    suite.write_text(
        HEAD.format(checkpoint=checkpoint)
        + '[methods.gradcam]\n[methods.sweep]\nuse = "gradcam"\nlayer = "stages"\n'
        + "[metrics.pointing_game]\n[metrics.energy_pointing_game]\n"
    )
    out = tmp_path / "run"
    assert main(["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    rows = pd.read_parquet(out / "rows.parquet")
    value = rows.set_index(["method", "metric", "sample_id"])["value"].sort_index()
    # the variant at the model's own layer is the plain method
    pd.testing.assert_series_equal(
        value.loc["sweep[features]"], value.loc["gradcam"], check_names=False
    )
    assert not value.loc["sweep[features.2]"].equals(value.loc["gradcam"])
    manifest = json.loads((out / "manifest.json").read_text())
    (report,) = manifest["models"].values()
    # gapcnn at 32 px: two 2x2 max-pools, after the first and the second block
    assert report["layer_sizes"] == {
        "features": [8, 8], "features.2": [32, 32], "features.6": [16, 16], "features.10": [8, 8]
    }
    board = (out / "leaderboard.md").read_text()
    assert "## Layers: how each metric moves with the target layer" in board
    assert "| sweep | best " in board
    meta = manifest["methods"]
    assert meta["sweep[features.6]"]["entry"] == "sweep"
    assert meta["sweep[features.6]"]["layer"] == "features.6"
