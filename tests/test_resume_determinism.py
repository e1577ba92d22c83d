"""A run is reproducible and survives kill -9: two runs of one suite with one seed write
byte-identical ``leaderboard.csv`` files (host measurements such as wall time go to
``leaderboard-cost.csv``), and a run killed with SIGKILL between two groups resumes on
rerun without recomputing the stored group, to the same bytes as an uninterrupted run.

Every run is a real process (``python -m benchmarks.run``), so nothing is shared through
the interpreter: the model is trained from scratch per cache, and string hashing (set
order) differs between the processes. Each process uses one intra-op thread: on a shared
2-core machine two threads per process oversubscribe the cores and make runs many times
slower; the claim is byte-identity at a fixed thread count."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.harness
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds per run; a run takes about 10 s on 2 cores

# two (model, dataset) groups, gapcnn--a then gapcnn--b; b has larger images, so its
# training and evaluation leave a wide window to kill the run after a is stored
SUITE = """
name = "resume-tiny"
seed = 0
[eval]
max_images = 16
batch_size = 8
[train]
epochs = 2
[models.gapcnn]
[datasets.a]
use = "synth-lesion"
image_size = 32
n = 64
[datasets.b]
use = "synth-lesion"
image_size = 48
n = 64
[methods.cam]
[methods.gradcam]
[methods.random]
[metrics.aopc_morf]
region = 8
steps = 4
[metrics.pointing_game]
[metrics.time]
warmup = 1
repeats = 1
"""
GROUPS = ("gapcnn--a", "gapcnn--b")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("suite") / "resume-tiny.toml"
    path.write_text(SUITE)
    return str(path)


def command(suite: str, out: Path, cache: Path) -> list[str]:
    paths = ["--suite", suite, "--out", str(out), "--cache", str(cache)]
    return [sys.executable, "-m", "benchmarks.run", *paths, "--no-progress"]


def environment(hash_seed: int = 0) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(hash_seed)}


def run(suite: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(suite, out, cache),
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def cells_file(out: Path, group: str) -> Path:
    return out / "groups" / group / "cells.parquet"


def test_two_runs_with_the_same_seed_give_byte_identical_leaderboards(suite, tmp_path):
    # own cache each (the model is trained twice) and another string-hash seed each;
    # the two runs go side by side, one core each
    procs = [
        subprocess.Popen(
            command(suite, tmp_path / f"out{i}", tmp_path / f"cache{i}"),
            cwd=ROOT,
            env=environment(hash_seed=i),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
    for i in (1, 2):
        assert len(list((tmp_path / f"cache{i}" / "models").glob("*.pt"))) == 2
    one, two = (tmp_path / f"out{i}" / "leaderboard.csv" for i in (1, 2))
    assert one.read_bytes() == two.read_bytes()
    board = pd.read_csv(one)
    assert set(board["metric"]) == {"aopc_morf", "pointing_game"}
    assert set(board["dataset"]) == {"a", "b"} and (board["status"] == "ok").all()
    for i in (1, 2):
        cost = pd.read_csv(tmp_path / f"out{i}" / "leaderboard-cost.csv")
        assert set(cost["metric"]) == {"time"} and len(cost) == 2 * 3
        assert list(cost.columns) == list(board.columns) and (cost["mean"] > 0).all()
        # the Markdown leaderboard still shows the time columns, and says what they are
        md = (tmp_path / f"out{i}" / "leaderboard.md").read_text()
        assert "| time ↓ |" in md and "time: host measurements" in md


def test_a_run_killed_between_groups_resumes_to_the_same_leaderboard(suite, tmp_path):
    out, cache = tmp_path / "killed", tmp_path / "cache"
    first, second = (cells_file(out, g) for g in GROUPS)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        command(suite, out, cache),
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not first.exists():
            assert proc.poll() is None, "the run ended before its first group was stored"
            assert time.monotonic() < deadline, "the first group was never stored"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # reaped: a zombie's pid would still look alive to the lock
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not second.exists(), "the kill came too late: the second group was stored"
    lock = out / ".lock"
    assert lock.read_text() == str(proc.pid)  # left behind by the killed run
    assert not (out / "leaderboard.csv").exists()
    # what a kill inside RunStore.write_group leaves: a group folder under its temporary
    # name, holding some of its files; the resumed run must not gather it
    partial = out / "groups" / ".tmp-killed"
    partial.mkdir()
    shutil.copy(first.parent / "rows.parquet", partial / "rows.parquet")
    before = first.stat()

    resumed = run(suite, out, cache)
    assert "gapcnn--a: stored from the same configuration" in resumed.stderr
    assert "1 group(s) to run" in resumed.stderr
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert second.exists() and not lock.exists() and not partial.exists()

    # an uninterrupted run on the same cache: it trains nothing, the models are there
    models = {p: p.stat().st_mtime_ns for p in (cache / "models").glob("*.pt")}
    assert len(models) == 2
    whole = tmp_path / "whole"
    run(suite, whole, cache)
    assert {p: p.stat().st_mtime_ns for p in (cache / "models").glob("*.pt")} == models
    assert (out / "leaderboard.csv").read_bytes() == (whole / "leaderboard.csv").read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "rows.parquet").query("metric != 'time'"),
        pd.read_parquet(whole / "rows.parquet").query("metric != 'time'"),
    )
