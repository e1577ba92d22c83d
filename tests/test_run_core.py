"""The run core: a run executes its plan, resumes by what produced the results (not by
labels), survives a group that fails, and leaves a run folder that reports read without
the live registries.

- Stale results are never reported as fresh: a group stored by another configuration is
  recomputed, and the leaderboard and manifest then describe exactly this run, the same
  bytes as a run into an empty folder (the oracle).
- A rerun of an unchanged suite recomputes nothing.
- A group that raises becomes error cells; the others run; exit 1; the manifest says
  "finished with errors"; a rerun computes the failed group again and reuses the rest.
- Figures and the regression gate work on a run after a registry entry of one of its
  metrics is renamed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn

from cambench.benchmarks.engine import executors
from cambench.benchmarks.engine.plan import make_plan
from cambench.benchmarks.engine.suite import load_suite
from cambench.benchmarks.models.zoo import MODELS
from cambench.benchmarks.reports import figures, regress
from cambench.benchmarks.run import main
from cambench.metrics import METRICS, Scores

pytestmark = pytest.mark.harness

TWO_GROUPS = """
name = "two"
[eval]
max_images = 8
batch_size = 8
[train]
epochs = 2
[models.gapcnn]
[datasets.a]
use = "synth-lesion"
image_size = 32
n = 48
[datasets.b]
use = "synth-lesion"
image_size = 32
n = 48
[methods.gradcam]
[methods.random]
[metrics.aopc_morf]
region = 8
steps = 4
[metrics.pointing_game]
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def smoke(out: Path, cache: str, *extra: str) -> int:
    return main(["--suite", "smoke", "--out", str(out), "--cache", cache, "--no-progress", *extra])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, cache):
    """A smoke run of one cell at 8 images, then the full smoke suite into the same folder
    (the issue's scenario), and the same full suite into an empty folder; with the log of
    the second run."""
    root = tmp_path_factory.mktemp("resume")
    out, fresh = root / "out", root / "fresh"
    assert (
        smoke(out, cache, "--methods", "gradcam", "--metrics", "aopc_morf", "--max-images", "8")
        == 0
    )
    log = root / "log.txt"
    with pytest.MonkeyPatch.context() as mp:
        lines: list[str] = []
        mp.setattr("cambench.benchmarks.run.log", lambda message: lines.append(message))
        assert smoke(out, cache) == 0
    log.write_text("\n".join(lines))
    assert smoke(fresh, cache) == 0
    return out, fresh, log.read_text()


@pytest.mark.slow
def test_a_group_stored_by_another_configuration_is_recomputed(resumed):
    out, fresh, log = resumed
    assert "gapcnn--synth-lesion: stored results came from another configuration" in log
    assert "eval; cells: 11 added" in log and "recomputing" in log
    suite = load_suite("smoke")
    board = pd.read_parquet(out / "leaderboard.parquet")
    assert len(board) == 3 * 4 and (board["status"] == "ok").all()
    assert set(board["method"]) == {m.label for m in suite.methods}
    assert set(board["metric"]) == {k.label for k in suite.metrics}
    every_image = board[board["metric"].isin(["aopc_morf", "time"])]["n"]
    assert len(every_image) == 6 and (every_image == suite.eval.max_images).all()
    # the manifest describes exactly what the leaderboard holds
    m = manifest(out)
    assert m["status"] == "finished" and m["suite"] == suite.resolved()
    stored = json.loads((out / "groups" / "gapcnn--synth-lesion" / "fingerprint.json").read_text())
    assert m["groups"] == {
        "gapcnn--synth-lesion": {"state": "computed", "fingerprint": stored["fingerprint"]}
    }
    assert set(m["metrics"]) == set(board["metric"]) and set(m["methods"]) == set(board["method"])
    # the oracle: the same suite into an empty folder
    assert (out / "leaderboard.csv").read_bytes() == (fresh / "leaderboard.csv").read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "rows.parquet").query("metric != 'time'"),
        pd.read_parquet(fresh / "rows.parquet").query("metric != 'time'"),
    )


@pytest.mark.slow
def test_a_rerun_of_an_unchanged_suite_recomputes_nothing(resumed, cache, capsys):
    out, _, _ = resumed
    group = out / "groups" / "gapcnn--synth-lesion"
    before = {p.name: p.stat().st_mtime_ns for p in group.iterdir()}
    board = (out / "leaderboard.csv").read_bytes()
    capsys.readouterr()
    assert smoke(out, cache) == 0
    err = capsys.readouterr().err
    assert "gapcnn--synth-lesion: stored from the same configuration" in err
    assert "0 group(s) to run" in err and "batch 1/" not in err
    assert {p.name: p.stat().st_mtime_ns for p in group.iterdir()} == before
    assert (out / "leaderboard.csv").read_bytes() == board
    assert manifest(out)["groups"]["gapcnn--synth-lesion"]["state"] == "reused"


@pytest.mark.slow
def test_a_failing_group_becomes_error_cells_and_the_others_run(tmp_path, cache, monkeypatch):
    suite = tmp_path / "two.toml"
    suite.write_text(TWO_GROUPS)
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", cache, "--no-progress"]
    real = executors.run_group

    def planted(spec):
        if spec.dataset.label == "b":
            raise RuntimeError("planted failure")
        return real(spec)

    monkeypatch.setattr("cambench.benchmarks.engine.executors.run_group", planted)
    assert main(args) == 1
    m = manifest(out)
    assert m["status"] == "finished with errors"
    assert {k: v["state"] for k, v in m["groups"].items()} == {
        "gapcnn--a": "computed",
        "gapcnn--b": "error",
    }
    cells = pd.read_parquet(out / "cells.parquet")
    a, b = (cells[cells["dataset"] == d] for d in ("a", "b"))
    assert len(a) == len(b) == 4 and (a["status"] == "ok").all()
    assert (b["status"] == "error").all()
    assert set(b["reason"]) == {"group gapcnn x b failed: RuntimeError: planted failure"}
    assert "error [" in (out / "leaderboard.md").read_text()

    # the failed group is computed again, the other reused
    monkeypatch.setattr("cambench.benchmarks.engine.executors.run_group", real)
    assert main(args) == 0
    m = manifest(out)
    assert m["status"] == "finished"
    assert {k: v["state"] for k, v in m["groups"].items()} == {
        "gapcnn--a": "reused",
        "gapcnn--b": "computed",
    }
    assert (pd.read_parquet(out / "cells.parquet")["status"] == "ok").all()


@pytest.fixture
def renamed_metric():
    """``pointing_game`` renamed in the metric registry for the test's duration."""
    entry = METRICS.get("pointing_game")
    METRICS.remove("pointing_game")
    METRICS.add("pointing_game_v2", entry.obj, **dataclasses.asdict(entry.info))
    try:
        yield
    finally:
        METRICS.remove("pointing_game_v2")
        METRICS.add(entry.name, entry.obj, aliases=entry.aliases, **dataclasses.asdict(entry.info))


@pytest.mark.slow
def test_reports_read_a_run_whose_metric_was_renamed_in_the_registry(resumed, tmp_path, request):
    out, _, _ = resumed
    request.getfixturevalue("renamed_metric")
    assert "pointing_game" not in METRICS
    figs = tmp_path / "figures"
    assert figures.main([str(out), "--out", str(figs), "--formats", "png"]) == 0
    assert (figs / "heatmaps--gapcnn--synth-lesion.png").is_file()
    assert (figs / "ranks--gapcnn--synth-lesion.png").is_file()
    base = tmp_path / "baseline.json"
    assert regress.main([str(out), "--write-baseline", str(base)]) == 0
    cells = json.loads(base.read_text())["cells"]
    kinds = {c["metric"]: (c["kind"], c["higher_is_better"]) for c in cells}
    assert kinds["pointing_game"] == ("localization", True)  # from the run, not the registry
    assert "time" not in kinds  # a cost metric is not gated: the run says its kind
    assert regress.main([str(out), "--baseline", str(base)]) == 0


@MODELS.register("test-plain", default_layer="0", gap_head=True)
def plain(*, in_channels: int, num_classes: int) -> nn.Module:
    """A model without a ``normalize`` module: it takes the [0, 1] images as they are."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


@pytest.mark.slow
def test_a_model_without_its_own_normalization_runs(tmp_path, cache):
    suite = tmp_path / "plain.toml"
    suite.write_text(TWO_GROUPS.replace("[models.gapcnn]", "[models.test-plain]\n[methods.cam]"))
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", cache, "--no-progress"]
    assert main([*args, "--datasets", "a"]) == 0
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == 3 * 2 and (cells["status"] == "ok").all()


def plan_of(body: str, tmp_path: Path):
    path = tmp_path / "suite.toml"
    path.write_text(body)
    (group,) = make_plan(load_suite(str(path)), data_root=None).groups
    return group


ONE_GROUP = TWO_GROUPS.replace('[datasets.b]\nuse = "synth-lesion"\nimage_size = 32\nn = 48\n', "")


def test_the_fingerprint_changes_with_what_decides_results_and_only_with_it(tmp_path):
    base = plan_of(ONE_GROUP, tmp_path)
    assert plan_of(ONE_GROUP, tmp_path).fingerprint == base.fingerprint
    # a comment, the suite's name and description decide nothing
    renamed = ONE_GROUP.replace('name = "two"', 'name = "other"\ndescription = "x"\n# note')
    assert plan_of(renamed, tmp_path).fingerprint == base.fingerprint
    changes = {
        "metric option": ONE_GROUP.replace("steps = 4", "steps = 5"),
        "seed": ONE_GROUP.replace('name = "two"', 'name = "two"\nseed = 1'),
        "images": ONE_GROUP.replace("max_images = 8", "max_images = 9"),
        "training": ONE_GROUP.replace("epochs = 2", "epochs = 3"),
        "layer": ONE_GROUP.replace("[models.gapcnn]", '[models.gapcnn]\nlayer = "features.0"'),
        "dataset option": ONE_GROUP.replace("n = 48", "n = 49"),
        "a method": ONE_GROUP.replace("[methods.random]", "[methods.random]\n[methods.cam]"),
    }
    prints = {what: plan_of(body, tmp_path).fingerprint for what, body in changes.items()}
    assert base.fingerprint not in prints.values() and len(set(prints.values())) == len(prints)
    # new weights at the same checkpoint path are another configuration
    weights = tmp_path / "w.pt"
    with_checkpoint = ONE_GROUP.replace(
        "[models.gapcnn]", f'[models.gapcnn]\ncheckpoint = "{weights}"'
    )
    weights.write_bytes(b"one")
    first = plan_of(with_checkpoint, tmp_path).fingerprint
    weights.write_bytes(b"two")
    assert plan_of(with_checkpoint, tmp_path).fingerprint != first


@METRICS.register("test-unscoring", kind="faithfulness", higher_is_better=True)
def unscoring(ctx) -> Scores:
    """Scores no image, and says why."""
    return Scores(values={"value": np.full(len(ctx.ids), np.nan)}, unscored="planted: no image")


@pytest.mark.slow
def test_a_cell_whose_images_all_go_unscored_is_no_image_scored_not_not_applicable(tmp_path, cache):
    suite = tmp_path / "unscored.toml"
    suite.write_text(ONE_GROUP.replace("[metrics.pointing_game]", "[metrics.test-unscoring]"))
    out = tmp_path / "run"
    assert main(["--suite", str(suite), "--out", str(out), "--cache", cache, "--no-progress"]) == 0
    cells = pd.read_parquet(out / "cells.parquet").set_index(["method", "metric"])
    for method in ("gradcam", "random"):
        cell = cells.loc[(method, "test-unscoring")]
        assert cell["status"] == "no_image_scored" and cell["n"] == 0 and cell["n_excluded"] == 8
        assert cell["reason"] == "8 image(s) not scored: planted: no image"
        assert cells.loc[(method, "aopc_morf"), "status"] == "ok"
    assert "no image scored [" in (out / "leaderboard.md").read_text()
