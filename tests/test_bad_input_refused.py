"""Bad input is refused before work, in one line naming it, and leaves the run folder as it
was; faults of the machine (SIGTERM, an unwritable cache) are survived the same way.

Each refusal is checked the way a user meets it, through ``python -m benchmarks.run``'s
``main``: exit status 2, exactly one ``error:`` line on stderr and no traceback, the
offending key or file named in it, no model trained (the cache holds no new model), and
every file of an earlier finished run in the same ``--out`` unchanged, byte for byte
(sha256).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from cambench.benchmarks.engine.plan import Status, make_plan
from cambench.benchmarks.engine.suite import load_suite
from cambench.benchmarks.models.zoo import MODELS
from cambench.benchmarks.run import main

pytestmark = pytest.mark.harness

BASE = """
name = "probe"
[eval]
max_images = 8
batch_size = 8
[train]
epochs = 1
[models.gapcnn]
[datasets.a]
use = "synth-lesion"
image_size = 32
n = 24
[methods.cam]
[methods.random]
[metrics.aopc_morf]
region = 8
steps = 4
"""


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def models_in(cache: Path) -> set[str]:
    return (
        {p.name for p in (cache / "models").glob("*.pt")} if (cache / "models").is_dir() else set()
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of BASE, and its model cache."""
    root = tmp_path_factory.mktemp("finished")
    suite, out, cache = root / "base.toml", root / "run", root / "cache"
    suite.write_text(BASE)
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(cache), "--no-progress"]
    assert main(args) == 0
    return out, cache


def refused(tmp_path: Path, finished, capsys, suite_text: str, *extra: str, damage=None) -> str:
    """Run ``suite_text`` into a copy of the finished run (after ``damage(out)``, if
    given); assert the refusal's contract and return its message."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(finished[0], out)
    shutil.copytree(finished[1], cache)
    if damage is not None:
        damage(out)
    before, trained = digest(out), models_in(cache)
    suite = tmp_path / "suite.toml"
    suite.write_text(suite_text)
    capsys.readouterr()
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(cache), "--no-progress"]
    code = main([*args, *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert digest(out) == before, "the refused run changed the run folder"
    assert models_in(cache) == trained, "a model was trained before the refusal"
    return errors[0]


def with_(text: str, section: str, line: str) -> str:
    """``text`` with ``line`` (``key = value``) set in the table ``section``."""
    head = f"[{section}]\n"
    start = text.index(head) + len(head)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    key = line.split("=")[0].strip()
    body = [x for x in text[start:end].splitlines() if x.split("=")[0].strip() != key]
    return text[:start] + "\n".join([line, *body]) + "\n" + text[end:]


OPTION_PROBES = [
    ("metrics.aopc_morf", 'perturbation = "gauss"', "perturbation = 'gauss'"),
    ("metrics.aopc_morf", 'steps = "four"', "steps = 'four'"),
    ("metrics.aopc_morf", "region = 0", "region = 0"),
    ("metrics.aopc_morf", "region = -4", "region = -4"),
    ("metrics.aopc_morf", "perturbation_options = { sd = 0.1 }", "takes no option 'sd'"),
    ("methods.random", 'seed = "x"', "seed = 'x'"),
    ("datasets.a", "image_size = 0", "image_size = 0"),
    ("datasets.a", "n = 0", "n = 0"),
    ("train", 'epochs = "one"', "epochs = 'one'"),
    ("train", "epochs = 0", "epochs = 0"),
    ("train", "lr = -1.0", "lr = -1.0"),
    ("eval", 'max_images = "four"', "max_images = 'four'"),
    ("eval", 'target = "foo"', "target = 'foo'"),
    ("eval", 'split = "tset"', "split = 'tset'"),
    ("models.gapcnn", "width = 0", "width = 0"),
    ("methods.cam", "max_images = 0", "max_images = 0"),
]


@pytest.mark.parametrize(("section", "line", "named"), OPTION_PROBES)
def test_a_value_of_the_wrong_type_or_range_is_refused_when_the_suite_loads(
    tmp_path, finished, capsys, section, line, named
):
    message = refused(tmp_path, finished, capsys, with_(BASE, section, line))
    assert named in message and "suite.toml" in message


def test_a_region_larger_than_the_image_is_refused_before_training(tmp_path, finished, capsys):
    message = refused(tmp_path, finished, capsys, BASE.replace("region = 8", "region = 40"))
    assert "region = 40" in message and "32x32" in message and "aopc_morf" in message


def test_a_bad_option_on_the_second_dataset_stops_the_run_before_the_first_group(
    tmp_path, finished, capsys
):
    second = BASE + '[datasets.b]\nuse = "synth-lesion"\nimage_size = 16\nn = 24\n'
    message = refused(tmp_path, finished, capsys, second.replace("region = 8", "region = 16"))
    assert "dataset b" in message and "region = 16" in message


def test_a_missing_include_is_refused(tmp_path, finished, capsys):
    message = refused(tmp_path, finished, capsys, 'include = ["nope.toml"]\n' + BASE)
    assert "nope.toml" in message and "does not exist" in message


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-images", "0"), ("--seed", "-1"), ("--num-cpus", "0")]
)
def test_a_bad_command_line_value_is_refused(tmp_path, finished, capsys, flag, value):
    message = refused(tmp_path, finished, capsys, BASE, flag, value)
    assert flag in message


def test_a_missing_checkpoint_is_refused_when_the_suite_loads(tmp_path, finished, capsys):
    text = with_(BASE, "models.gapcnn", f'checkpoint = "{tmp_path / "nope.pt"}"')
    message = refused(tmp_path, finished, capsys, text)
    assert "nope.pt" in message


# -- data ----------------------------------------------------------------------------


def write_csv_dataset(
    root: Path, rows: list[tuple[str, int, str]], mask_levels: tuple[int, ...] | None = None
) -> Path:
    """Images (12x12 grey noise) and a CSV of (image, label, split) rows under ``root``;
    with ``mask_levels``, a mask per image drawing those grey levels (and a mask column)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = ["image,label,split" + (",mask" if mask_levels else "")]
    for name, label, split in rows:
        pixels = rng.integers(0, 255, (12, 12), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{name}.png")
        lines.append(f"img/{name}.png,{label},{split}")
        if mask_levels:
            mask = np.zeros((12, 12), dtype=np.uint8)
            for i, level in enumerate(mask_levels):
                mask[2 + 3 * i : 5 + 3 * i, 2:8] = level
            Image.fromarray(mask).save(root / "img" / f"{name}_mask.png")
            lines[-1] += f",img/{name}_mask.png"
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root / "data.csv"


def csv_suite(table: Path, extra: str = "") -> str:
    return BASE.replace(
        '[datasets.a]\nuse = "synth-lesion"\nimage_size = 32\nn = 24\n',
        f'[datasets.a]\nuse = "csv"\nmanifest = "{table}"\nsplit_col = "split"\n'
        f"image_size = 32\nchannels = 1\n{extra}",
    )


def test_a_test_label_the_training_split_lacks_is_refused(tmp_path, finished, capsys):
    rows = [(f"t{i}", i % 2, "train") for i in range(8)]
    rows += [("v0", 0, "val"), ("v1", 1, "val"), ("e0", 0, "test"), ("e7", 7, "test")]
    table = write_csv_dataset(tmp_path / "data", rows)
    message = refused(tmp_path, finished, capsys, csv_suite(table))
    assert "dataset a" in message and "'7'" in message and "no training image" in message


def test_a_training_split_of_one_class_is_refused(tmp_path, finished, capsys):
    message = refused(tmp_path, finished, capsys, BASE.replace("n = 24", "n = 1"))
    assert "dataset a" in message and "one class" in message


def test_a_csv_with_an_absolute_manifest_needs_no_data_root(tmp_path):
    table = write_csv_dataset(tmp_path / "data", [("x", 0, "train")])
    suite = tmp_path / "suite.toml"
    suite.write_text(csv_suite(table))
    (group,) = make_plan(load_suite(str(suite)), data_root=None).groups
    assert not group.missing and group.data == f"real: {table}"


def test_a_data_root_given_as_a_file_is_not_called_missing(tmp_path, capsys):
    table = write_csv_dataset(tmp_path / "data", [("x", 0, "train")])
    suite = tmp_path / "suite.toml"
    suite.write_text(csv_suite("data.csv"))  # relative: found under --data-root
    assert main(["--suite", str(suite), "--data-root", str(table), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 skipped for missing data" in out and "missing:" not in out


def test_the_dry_run_reads_masks_from_the_entry_options(tmp_path):
    table = write_csv_dataset(tmp_path / "data", [("x", 0, "train")])
    suite = tmp_path / "suite.toml"
    text = csv_suite(table, 'mask_col = "mask"\n') + "[metrics.pointing_game]\n"
    suite.write_text(text)
    (group,) = make_plan(load_suite(str(suite)), data_root=None).groups
    statuses = {c.metric: c.status for c in group.cells}
    assert statuses["pointing_game"] is not Status.NOT_APPLICABLE
    suite.write_text(csv_suite(table) + "[metrics.pointing_game]\n")
    (group,) = make_plan(load_suite(str(suite)), data_root=None).groups
    assert {c.metric: c.status for c in group.cells}["pointing_game"] is Status.NOT_APPLICABLE


# -- the model -------------------------------------------------------------------------


class NaNHead(nn.Module):
    """A GAP CNN whose logits turn NaN on images brighter than average: a model that
    diverged on part of the data."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        z = self.head(self.features(x).mean(dim=(2, 3)))
        bright = x.mean(dim=(1, 2, 3)) > x.mean()
        return torch.where(bright[:, None], torch.full_like(z, float("nan")), z)


@pytest.fixture
def nan_model():
    MODELS.register("test-nan", default_layer="features", gap_head=True)(
        lambda *, in_channels, num_classes: NaNHead(in_channels, num_classes)
    )
    yield "test-nan"
    MODELS.remove("test-nan")


def test_a_model_with_non_finite_logits_is_refused_before_any_method_runs(
    tmp_path, finished, capsys, nan_model
):
    out, cache = tmp_path / "run", tmp_path / "cache"
    suite = tmp_path / "suite.toml"
    suite.write_text(BASE.replace("[models.gapcnn]", f"[models.{nan_model}]"))
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(cache), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err
    assert f"model {nan_model} on synth-lesion" in line and "not finite" in line and "'" in line
    assert not (out / "rows.parquet").exists() and not models_in(cache)  # nothing cached


# -- the machine -----------------------------------------------------------------------


def test_an_unwritable_cache_is_refused_before_work(tmp_path, finished, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = refused(tmp_path, finished, capsys, BASE, "--cache", str(blocker / "cache"))
    assert "--cache" in message and str(blocker) in message


# the second group trains long enough (a minute) to be stopped in the middle
SLOW_SUITE = (
    BASE
    + '[datasets.b]\nuse = "synth-lesion"\nimage_size = 32\nn = 200\ntrain = { epochs = 200 }\n'
)


@pytest.mark.slow
def test_sigterm_stops_the_run_cleanly_and_the_same_command_resumes(tmp_path):
    """SIGTERM after the first group: exit 143 with a message, the lock released, the
    manifest "interrupted"; the same command then reuses the finished group."""
    suite, out = tmp_path / "suite.toml", tmp_path / "run"
    suite.write_text(SLOW_SUITE)
    cmd = [sys.executable, "-m", "benchmarks.run", "--suite", str(suite), "--out", str(out)]
    cmd += ["--cache", str(tmp_path / "cache"), "--no-progress"]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
        lines = []
        for line in proc.stderr:  # wait for the first group to be stored
            lines.append(line)
            if "gapcnn--a computed" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143, "".join(lines) + rest
    assert "terminated (SIGTERM)" in rest and "Traceback" not in rest
    assert not (out / ".lock").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stopped_by"] == "SIGTERM"
    suite.write_text(SLOW_SUITE.replace("epochs = 200", "epochs = 2"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "gapcnn--a: stored from the same configuration" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert {k: v["state"] for k, v in manifest["groups"].items()} == {
        "gapcnn--a": "reused",
        "gapcnn--b": "computed",
    }
    assert (pd.read_parquet(out / "cells.parquet")["status"] == "ok").all()


def test_every_option_of_every_registered_entry_has_a_type_the_suite_checks():
    """No option goes unchecked by accident: each has an annotation that evaluates."""
    from cambench.benchmarks.core.checks import hints
    from cambench.benchmarks.engine.suite import option_names, registries

    missing = [
        f"{kind} {entry.name}: {name}"
        for kind, reg in registries().items()
        for entry in reg
        for name in option_names(entry.obj, kind)
        if name not in hints(entry.obj)
    ]
    assert not missing, missing


TWO_CLASSES = (
    [(f"t{i}", i % 2, "train") for i in range(8)]
    + [(f"v{i}", i % 2, "val") for i in range(2)]
    + [(f"e{i}", i % 2, "test") for i in range(4)]
)


def test_grey_masks_are_refused_naming_the_file_and_its_values(tmp_path, finished, capsys):
    table = write_csv_dataset(tmp_path / "data", TWO_CLASSES, mask_levels=(200, 90))
    text = csv_suite(table, 'mask_col = "mask"\n') + "[metrics.pointing_game]\n"
    message = refused(tmp_path, finished, capsys, text)
    assert "_mask.png" in message and "0, 90, 200" in message


def test_binary_masks_in_any_encoding_are_read_as_lesions(tmp_path, capsys):
    """0/1 masks (once read as empty) score the pointing game on every image."""
    table = write_csv_dataset(tmp_path / "data", TWO_CLASSES, mask_levels=(1,))
    suite = tmp_path / "suite.toml"
    suite.write_text(csv_suite(table, 'mask_col = "mask"\n') + "[metrics.pointing_game]\n")
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "c")]
    assert main([*args, "--no-progress"]) == 0
    cells = pd.read_parquet(out / "cells.parquet").set_index(["method", "metric"])
    assert (
        cells.loc[("cam", "pointing_game"), "n"],
        cells.loc[("cam", "pointing_game"), "n_excluded"],
    ) == (4, 0)


def test_a_csv_path_outside_the_data_root_is_refused(tmp_path, finished, capsys):
    table = write_csv_dataset(tmp_path / "data", TWO_CLASSES)
    outside = tmp_path / "outside.png"
    shutil.copy(tmp_path / "data" / "img" / "t0.png", outside)
    text = table.read_text().replace("img/t0.png", "../outside.png")
    table.write_text(text)
    message = refused(tmp_path, finished, capsys, csv_suite(table))
    assert "../outside.png" in message and "allow_outside_root" in message


@pytest.mark.parametrize("content", ["", "x\x00y"])
def test_an_empty_or_garbage_lock_is_named_with_the_command_to_remove_it(
    tmp_path, finished, capsys, content
):
    message = refused(
        tmp_path, finished, capsys, BASE, damage=lambda out: (out / ".lock").write_text(content)
    )
    assert str(tmp_path / "run" / ".lock") in message and "then rm " in message


@pytest.mark.parametrize("name", ["rows", "cells", "curves"])
def test_a_damaged_stored_file_is_named_and_its_group_computed_again(
    tmp_path, finished, capsys, name
):
    out, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(finished[0], out)
    shutil.copytree(finished[1], cache)
    path = out / "groups" / "gapcnn--a" / f"{name}.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    suite = tmp_path / "suite.toml"
    suite.write_text(BASE)
    capsys.readouterr()
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(cache), "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"gapcnn--a: stored results are damaged ({name}.parquet" in err
    tables = lambda root: {  # noqa: E731  (model.json holds wall times: it differs)
        k: v for k, v in digest(root / "groups").items() if k.endswith((".parquet", ".npz"))
    }
    assert tables(out) == tables(finished[0])  # recomputed: the same results
    assert json.loads((out / "manifest.json").read_text())["groups"]["gapcnn--a"]["state"] == (
        "computed"
    )
