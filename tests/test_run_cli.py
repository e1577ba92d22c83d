"""The CLI end to end: a suite runs and leaves its results; bad names exit 2 with the close
matches; a method that cannot apply is recorded as not applicable, not a crash."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.models.zoo import MODELS, Classifier, Normalize
from cambench.benchmarks.run import main

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
    assert "stored from the same configuration" in capsys.readouterr().err
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
        (
            SMALL + '[models.gapcnn]\n[methods.gradcam]\n[[exclude]]\nmethods = ["gradcm"]\n'
            'reason = "costly"\n',
            "[[exclude]] #1 methods pattern 'gradcm' matches no entry. Did you mean: gradcam",
        ),
        (
            SMALL + '[models.gapcnn]\n[methods.gradcam]\n[[exclude]]\nmethods = ["gradcam"]\n',
            "[[exclude]] #1 needs a reason",
        ),
        (
            SMALL + '[models.gapcnn]\n[[exclude]]\nmetric = ["x"]\nreason = "r"\n',
            "unknown key 'metric' in [[exclude]] #1. Did you mean: metrics",
        ),
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


def test_max_images_caps_an_entry_and_shared_pass_matches_alone(tmp_path, cache):
    """A method capped at 5 images is scored on the first 5 of the draw only; the gradient
    CAMs of the runner's shared pass equal the methods run alone (a capped copy)."""
    body = SMALL + (
        "[models.gapcnn]\n[methods.gradcam]\n[methods.layercam]\n"
        '[methods.gradcam-alone]\nuse = "gradcam"\nmax_images = 5\n'
        '[metrics.sparse-capped]\nuse = "sparseness"\nmax_images = 3\n'
    )
    out = tmp_path / "run"
    suite = write_suite(tmp_path / "cap.toml", body)
    assert main(["--suite", suite, "--out", str(out), "--cache", cache, "--no-progress"]) == 0
    cells = pd.read_parquet(out / "cells.parquet").set_index(["method", "metric"])
    assert cells.loc[("gradcam", "aopc_morf"), "n"] == 16
    assert cells.loc[("gradcam-alone", "aopc_morf"), "n"] == 5
    assert cells.loc[("gradcam", "sparse-capped"), "n"] == 3
    assert cells.loc[("gradcam-alone", "sparse-capped"), "n"] == 3
    rows = pd.read_parquet(out / "rows.parquet")
    rows = rows[(rows.metric == "aopc_morf") & (rows.output == "value")]
    shared = rows[rows.method == "gradcam"].set_index("sample_id")["value"]
    alone = rows[rows.method == "gradcam-alone"].set_index("sample_id")["value"]
    assert list(alone.index) == list(shared.index[:5])
    pd.testing.assert_series_equal(alone, shared.loc[alone.index])


def test_dry_run_plans_without_running(tmp_path, capsys):
    body = SMALL + "[models.gapcnn]\n[models.test-flat-head]\n[methods.cam]\n[methods.gradcam]\n"
    body += "[metrics.pointing_game]\n"
    suite = write_suite(tmp_path / "plan.toml", body)
    out = tmp_path / "run"
    assert main(["--suite", suite, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    # the method, not the zoo's metadata, decides: the dry run says what to expect
    assert "test-flat-head x synth-lesion (synthetic): 4 cells to run, 0 not applicable" in text
    assert "expected at run time: cam needs a GAP + linear head" in text and "1F+1B" in text
    assert not out.exists()


def test_excluded_cells_are_recorded_with_the_suites_reason(tmp_path, cache, capsys):
    body = SMALL + "[models.gapcnn]\n[methods.cam]\n[methods.gradcam]\n[metrics.pointing_game]\n"
    body += '[[exclude]]\nmethods = ["grad*"]\nmetrics = ["aopc_*"]\nreason = "too slow here"\n'
    suite = write_suite(tmp_path / "ex.toml", body)
    out = tmp_path / "run"
    args = ["--suite", suite, "--out", str(out), "--cache", cache, "--no-progress"]
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 cells to run, 0 not applicable, 1 excluded by the suite" in text
    assert "excluded (1 cells): too slow here" in text
    assert main(args) == 0
    cells = pd.read_parquet(out / "cells.parquet").set_index(["method", "metric"])
    assert cells.loc[("gradcam", "aopc_morf"), "status"] == "excluded"
    assert cells.loc[("gradcam", "aopc_morf"), "reason"] == "too slow here"
    assert (cells.drop(index=("gradcam", "aopc_morf"))["status"] == "ok").all()
    rows = pd.read_parquet(out / "rows.parquet")
    assert not ((rows["method"] == "gradcam") & (rows["metric"] == "aopc_morf")).any()
    board = (out / "leaderboard.md").read_text()
    assert "excluded [" in board and "excluded: too slow here" in board
    # the normal images have empty lesion masks: the pointing game does not score them, and
    # the cell says how many and why
    aopc = rows[(rows["method"] == "cam") & (rows["metric"] == "aopc_morf")]
    aopc = aopc[aopc["output"] == "value"]
    normal = int((aopc["label"] == 0).sum())
    game = cells.loc[("cam", "pointing_game")]
    assert 0 < normal < len(aopc) and (game["n"], game["n_excluded"]) == (
        len(aopc) - normal,
        normal,
    )
    assert game["reason"] == f"{normal} image(s) not scored: the lesion mask is empty " + (
        "(nothing to localize, e.g. a normal image)"
    )


def test_missing_real_data_is_skipped_and_named_or_an_error_with_strict(tmp_path, cache, capsys):
    body = SMALL + "[models.gapcnn]\n[methods.gradcam]\n[datasets.busi]\nimage_size = 32\n"
    suite = write_suite(tmp_path / "real.toml", body)
    out = tmp_path / "run"
    args = ["--suite", suite, "--out", str(out), "--cache", cache, "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "busi" in err and "--data-root" in err
    board = (out / "leaderboard.md").read_text()
    assert "dataset busi skipped" in board and "--data-root" in board
    manifest = json.loads((out / "manifest.json").read_text())
    assert "busi" in manifest["skipped_datasets"]
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strict: dataset busi") and err.count("\n") == 1


def test_per_entry_train_overrides_change_the_model(tmp_path, cache):
    from cambench.benchmarks.engine.suite import load_suite, train_config

    body = SMALL + "[models.gapcnn]\ntrain = { lr = 0.01 }\n"
    body = body.replace("n = 64\n", "n = 64\ntrain = { epochs = 2, lr = 0.5 }\n")
    suite = load_suite(write_suite(tmp_path / "t.toml", body))
    config = train_config(suite, suite.models[0], suite.datasets[0])
    assert (config.epochs, config.lr) == (2, 0.01)  # the model's entry wins over the dataset's
    bad = body.replace("lr = 0.01", "learning_rate = 0.01")
    with pytest.raises(Exception, match="learning_rate"):
        load_suite(write_suite(tmp_path / "bad.toml", bad))


def test_train_on_overrides_one_model_on_one_dataset(tmp_path):
    from cambench.benchmarks.engine.suite import load_suite, train_config

    body = SMALL + (
        "[datasets.phantom]\nuse = 'synth-cxr'\ntrain = { epochs = 5 }\n"
        "[models.gapcnn]\ntrain = { lr = 0.01, epochs = 4 }\n"
        "train_on.synth-lesion = { epochs = 2, batch_size = 16 }\n"
        "[models.resnet18]\n"
    )
    suite = load_suite(write_suite(tmp_path / "t.toml", body))
    (gap, r18), (lesion, phantom) = suite.models, suite.datasets
    configs = {
        (m.label, d.label): train_config(suite, m, d) for m in (gap, r18) for d in (lesion, phantom)
    }
    pick = lambda c: (c.epochs, c.lr, c.batch_size)  # noqa: E731
    assert pick(configs["gapcnn", "synth-lesion"]) == (2, 0.01, 16)  # pair > model > dataset
    assert pick(configs["gapcnn", "phantom"]) == (4, 0.01, 64)
    assert pick(configs["resnet18", "synth-lesion"]) == (3, 3e-3, 64)  # the suite's [train]
    assert pick(configs["resnet18", "phantom"]) == (5, 3e-3, 64)
    for typo, match in [
        (
            "train_on.synth-lesoin",
            r"\[models.gapcnn\] train_on.synth-lesoin: no dataset.*"
            r"Did you mean: synth-lesion\?",
        ),
        ("train_on.synth-lesion = { epoch = 2 }\n#", r"unknown key 'epoch'.*Did you mean: epochs"),
        ("train_on = 3\n#", r"train_on must be a table of tables"),
    ]:
        bad = body.replace("train_on.synth-lesion", typo, 1)
        with pytest.raises(UserError, match=match):
            load_suite(write_suite(tmp_path / "bad.toml", bad))


@pytest.mark.parametrize("problem", ["corrupt image", "unknown class folder", "bad checkpoint"])
def test_bad_input_exits_2_in_one_line_and_caches_nothing(tmp_path, problem, capsys):
    """Bad data or weights stop the run before any training: exit 2, one line naming the
    file, no traceback, no model in the cache, and earlier results left as they were."""
    from PIL import Image

    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), 40 * i).save(data / cls / f"{i}.png")
    entry = "[datasets.folder]\nimage_size = 16\nchannels = 1\n"
    model = "[models.gapcnn]\n"
    if problem == "corrupt image":
        (data / "b" / "3.png").write_bytes(b"\x89PNG not really")
        needle = "3.png"
    elif problem == "unknown class folder":
        entry += 'classes = ["a", "c"]\n'
        needle = "'c'"
    else:
        (tmp_path / "w.pt").write_bytes(b"garbage")
        model = f'[models.gapcnn]\ncheckpoint = "{tmp_path / "w.pt"}"\n'
        needle = "w.pt"
    body = SMALL.split("[datasets.synth-lesion]")[0] + entry + model + "[methods.gradcam]\n"
    suite = write_suite(tmp_path / "s.toml", body)
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    args = ["--suite", suite, "--data-root", str(data), "--out", str(out), "--cache", str(cache)]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    assert not list(cache.glob("models/*")) and (out / "earlier.txt").read_text() == "kept"
