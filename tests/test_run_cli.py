"""The CLI end to end: a suite runs and leaves its results; bad names exit 2 with the close
matches; a method that cannot apply is recorded as not applicable, not a crash."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from torch import nn

from benchmarks.run import main
from benchmarks.zoo import MODELS, Classifier, Normalize

pytestmark = pytest.mark.harness
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def write_suite(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


SMALL = """
name = "tiny"
[eval]
max_images = 16
batch_size = 8
[train]
epochs = 3
[datasets.synth-lesion]
image_size = 32
n = 64
[metrics.aopc_morf]
region = 8
steps = 4
"""


@MODELS.register("test-flat-head", default_layer="features", gap_head=False)
def flat_head(*, in_channels: int, num_classes: int) -> Classifier:
    """A CNN with a flatten + linear head: CAM does not apply."""
    features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
    return Classifier(
        Normalize(in_channels),
        features,
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes)),
    )


def test_smoke_suite_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "--suite",
                "smoke",
                "--out",
                str(out),
                "--cache",
                cache,
                "--no-progress",
                "--metrics",
                "aopc_morf",
            ]
        )
        == 0
    )
    for name in (
        "manifest.json",
        "rows.parquet",
        "cells.parquet",
        "curves.parquet",
        "leaderboard.md",
        "leaderboard.csv",
    ):
        assert (out / name).is_file(), name
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert board.loc["cam", "mean"] > board.loc["random", "mean"]
    assert board.loc["gradcam", "mean"] > board.loc["random", "mean"]
    assert not board[["mean", "ci_low", "ci_high"]].isna().any().any()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["suite"]["name"] == "smoke"
    assert manifest["versions"]["torch"] and manifest["seed"] == 0
    rows = pd.read_parquet(out / "rows.parquet")
    assert len(rows) == 3 * 64 and rows["value"].notna().all()
    curves = pd.read_parquet(out / "curves.parquet")
    assert len(curves) == 3 * 64 and all(len(v) == 17 for v in curves["values"])
    # a rerun of the same command resumes: the stored group is not recomputed
    before = (out / "leaderboard.csv").read_text()
    assert (
        main(
            [
                "--suite",
                "smoke",
                "--out",
                str(out),
                "--cache",
                cache,
                "--no-progress",
                "--metrics",
                "aopc_morf",
            ]
        )
        == 0
    )
    assert "already stored" in capsys.readouterr().err
    assert (out / "leaderboard.csv").read_text() == before


def test_not_applicable_method_is_recorded(tmp_path, cache):
    suite = write_suite(
        tmp_path / "na.toml", SMALL + "[models.test-flat-head]\n[methods.cam]\n[methods.gradcam]\n"
    )
    out = tmp_path / "run"
    assert main(["--suite", suite, "--out", str(out), "--cache", cache, "--no-progress"]) == 0
    cells = pd.read_parquet(out / "cells.parquet").set_index("method")
    assert cells.loc["cam", "status"] == "not_applicable"
    assert "global-average-pool" in cells.loc["cam", "reason"]
    assert cells.loc["gradcam", "status"] == "ok"
    board = (out / "leaderboard.md").read_text()
    assert "not applicable" in board and "global-average-pool" in board


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--suite", "smok"], "Did you mean: smoke"),
        (["--suite", "smoke", "--methods", "gradcm"], "Did you mean: gradcam"),
        (["--suite", "smoke", "--metrics", "aopc_morff"], "Did you mean: aopc_morf"),
    ],
)
def test_unknown_names_exit_2_with_close_matches(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "body,needle",
    [
        (
            SMALL + '[models.gapcnn]\n[methods."gradcam+"]\n',
            "Unknown method 'gradcam+'. Did you mean: gradcam",
        ),
        (
            SMALL.replace("aopc_morf", "aopc_morph") + "[models.gapcnn]\n",
            "Unknown metric 'aopc_morph'. Did you mean: aopc_morf",
        ),
        (SMALL + "[models.gapcnn]\n[methods.gradcam]\nlayr = 'features'\n", "unknown key 'layr'"),
        (SMALL.replace("[eval]", "[evaluation]") + "[models.gapcnn]\n", "Did you mean: eval"),
    ],
)
def test_suite_file_errors_name_file_key_and_matches(tmp_path, body, needle, capsys):
    path = write_suite(tmp_path / "bad.toml", body)
    assert main(["--suite", path]) == 2
    err = capsys.readouterr().err
    assert needle in err and "bad.toml" in err


def test_exit_status_2_from_a_real_process():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "medicall"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Unknown suite 'medicall'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("what", ["methods", "metrics", "datasets", "models", "suites"])
def test_list(what, capsys):
    assert main(["--list", what]) == 0
    out = capsys.readouterr().out
    expected = {
        "methods": "gradcam",
        "metrics": "aopc_morf",
        "datasets": "synth-lesion",
        "models": "gapcnn",
        "suites": "smoke",
    }
    assert expected[what] in out
