"""The run folder survives what machines do to files: a stored group whose file is
truncated, deleted or changed is named as damaged and computed again (never a pyarrow
traceback); the lock is taken and taken over atomically (of processes racing for a stale
lock exactly one wins, and no lock is ever empty), and a lock that holds no pid is a
one-line error naming it and ``rm``; a full disk or a read-only folder is a one-line
error naming the file, and what was stored before stays as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import WriteError, atomic_write
from cambench.benchmarks.engine import store as store_module
from cambench.benchmarks.engine.store import (
    CELL_COLUMNS,
    CURVE_COLUMNS,
    ROW_COLUMNS,
    RunStore,
)

pytestmark = pytest.mark.harness
KEY = "gapcnn--a"
FINGERPRINT = "f" * 16


def group_result(n: int = 40, value: float = 0.5) -> SimpleNamespace:
    """A small group as ``run_group`` returns it (``GroupResult``'s fields)."""
    rows = pd.DataFrame(
        {
            "model": "gapcnn",
            "dataset": "a",
            "method": "gradcam",
            "metric": "aopc_morf",
            "output": "value",
            "sample_id": np.arange(n),
            "label": np.arange(n) % 2,
            "target": np.arange(n) % 2,
            "correct": True,
            "value": np.linspace(0, 1, n) + value,
        }
    )[ROW_COLUMNS]
    curves = pd.DataFrame(
        {
            "model": "gapcnn",
            "dataset": "a",
            "method": "gradcam",
            "metric": "aopc_morf",
            "curve": "morf",
            "sample_id": np.arange(n),
            "values": [list(np.linspace(1, 0, 5) * value) for _ in range(n)],
        }
    )[CURVE_COLUMNS]
    cells = pd.DataFrame(
        [["gapcnn", "a", "gradcam", "aopc_morf", "ok", "", n, 0]], columns=CELL_COLUMNS
    )
    examples = {"images": np.zeros((2, 1, 8, 8), np.float32), "ids": np.arange(2)}
    report = {"accuracy": value}
    return SimpleNamespace(rows=rows, curves=curves, cells=cells, report=report, examples=examples)


@pytest.fixture
def store(tmp_path) -> RunStore:
    run = RunStore(tmp_path / "run")
    run.prepare()
    run.write_group(KEY, group_result(), fingerprint=FINGERPRINT, inputs={"seed": 0})
    return run


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --- checksums -------------------------------------------------------------------------


def test_an_intact_group_lists_every_file_with_its_checksum(store):
    folder = store.groups_dir / KEY
    record = store.stored_fingerprint(KEY)
    assert record is not None and record["fingerprint"] == FINGERPRINT
    files = record["files"]
    assert set(files) == {p.name for p in folder.iterdir()} - {"fingerprint.json"}
    assert set(files) == {
        "rows.parquet",
        "curves.parquet",
        "cells.parquet",
        "model.json",
        "examples.npz",
    }
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert store.damaged(KEY) is None and store.check_groups([KEY, "other--b"]) == {}
    assert store.reusable(KEY, FINGERPRINT) and not store.reusable(KEY, "another")
    assert len(store.read("rows", [KEY])) == 40


@pytest.mark.parametrize("table", ["rows", "cells", "curves"])
def test_a_truncated_table_is_damaged_and_not_reusable(store, table):
    path = store.groups_dir / KEY / f"{table}.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    why = store.damaged(KEY)
    assert why is not None and why.startswith(f"{table}.parquet is truncated or changed")
    assert not store.reusable(KEY, FINGERPRINT)
    assert store.stored_fingerprint(KEY) is None
    assert store.check_groups(["other--b", KEY]) == {KEY: why}
    with pytest.raises(UserError, match=f"cannot read {path}: {table}.parquet is truncated"):
        store.read(table, [KEY])


def test_a_truncated_table_of_a_group_of_an_older_version_is_a_user_error(store):
    """No checksum to compare with: the reader's own failure is named, not raised."""
    folder = store.groups_dir / KEY
    record = store.stored_fingerprint(KEY)
    del record["files"]
    (folder / "fingerprint.json").write_text(json.dumps(record))
    (folder / "cells.parquet").write_bytes((folder / "cells.parquet").read_bytes()[:100])
    assert store.damaged(KEY) is None  # of an older version, not damaged
    assert not store.reusable(KEY, FINGERPRINT)
    with pytest.raises(UserError, match="cannot read .*cells.parquet"):
        store.read("cells", [KEY])


def test_a_deleted_table_is_damaged(store):
    path = store.groups_dir / KEY / "rows.parquet"
    path.unlink()
    assert store.damaged(KEY) == "rows.parquet is missing"
    assert not store.reusable(KEY, FINGERPRINT)
    with pytest.raises(UserError, match=f"cannot read {path}: rows.parquet is missing"):
        store.read("rows", [KEY])


@pytest.mark.parametrize("name", ["cells.parquet", "model.json", "examples.npz"])
def test_a_flipped_bit_in_a_file_of_the_same_size_is_damaged(store, name):
    path = store.groups_dir / KEY / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert store.damaged(KEY) == f"{name} does not match its checksum (truncated or changed)"
    assert not store.reusable(KEY, FINGERPRINT)


def test_a_damaged_fingerprint_record_is_damaged(store):
    path = store.groups_dir / KEY / "fingerprint.json"
    path.write_text(path.read_text()[:50])
    assert store.damaged(KEY).startswith("fingerprint.json cannot be read")
    assert not store.reusable(KEY, FINGERPRINT) and store.stored_fingerprint(KEY) is None
    path.write_text(
        '{"fingerprint": "x", "files": {"../../etc/passwd": {"sha256": "", "size": 1}}}'
    )
    assert store.damaged(KEY) == "fingerprint.json lists the group's files wrongly (changed)"


def test_a_group_of_an_older_version_is_recomputed_not_damaged(store):
    folder = store.groups_dir / KEY
    (folder / "fingerprint.json").write_text(json.dumps({"fingerprint": FINGERPRINT, "inputs": {}}))
    assert store.damaged(KEY) is None and store.check_groups([KEY]) == {}
    assert store.stored_fingerprint(KEY) == {"fingerprint": FINGERPRINT, "inputs": {}}
    assert not store.reusable(KEY, FINGERPRINT)  # no checksums: computed again
    (folder / "fingerprint.json").unlink()  # a version that kept no fingerprint
    assert store.damaged(KEY) is None and store.stored_fingerprint(KEY) is None
    assert not store.reusable(KEY, FINGERPRINT)


def test_a_group_not_stored_is_neither_damaged_nor_reusable(store):
    assert store.damaged("other--b") is None and not store.reusable("other--b", FINGERPRINT)
    assert store.read("rows", ["other--b"]).empty


def test_rewriting_a_damaged_group_repairs_it(store):
    (store.groups_dir / KEY / "rows.parquet").unlink()
    store.write_group(KEY, group_result(value=2.0), fingerprint=FINGERPRINT, inputs={})
    assert store.damaged(KEY) is None and store.reusable(KEY, FINGERPRINT)
    assert store.read("rows", [KEY])["value"].min() == 2.0
    assert not list(store.groups_dir.glob(".tmp-*"))


def test_a_damaged_model_report_is_a_user_error(store):
    path = store.groups_dir / KEY / "model.json"
    path.write_text("{")
    with pytest.raises(UserError, match=f"cannot read {path}"):
        store.reports([KEY])


# --- the lock --------------------------------------------------------------------------


def dead_pid() -> int:
    true = shutil.which("true")
    proc = subprocess.Popen([true] if true else [sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.fixture
def run_dir(tmp_path) -> RunStore:
    run = RunStore(tmp_path / "run")
    run.prepare()
    return run


@pytest.mark.parametrize("content", [b"", b"\n", b"hello", b"\xff\xfe", b"0", b"-5", b"12 34"])
def test_a_lock_holding_no_pid_is_a_user_error_naming_it(run_dir, content):
    lock = run_dir.root / ".lock"
    lock.write_bytes(content)
    with pytest.raises(UserError) as info:
        with run_dir.lock():
            pass
    message = str(info.value)
    assert f"the lock file {lock} holds no process id" in message
    assert f"check that no run is using {run_dir.root}, then rm {lock}" in message
    assert "another run" not in message and "\n" not in message
    assert lock.read_bytes() == content  # left for a person to judge


@pytest.mark.parametrize("pid", [os.getppid(), 1])
def test_a_lock_of_a_live_process_is_another_run(run_dir, pid):
    lock = run_dir.root / ".lock"
    lock.write_text(str(pid))
    with pytest.raises(UserError, match=rf"another run \(pid {pid}\) is writing"):
        with run_dir.lock():
            pass
    assert lock.read_text() == str(pid)


def test_a_lock_of_a_dead_process_is_taken_over_and_released(run_dir):
    lock = run_dir.root / ".lock"
    lock.write_text(str(dead_pid()))
    with run_dir.lock():
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(UserError, match="this process already has"):
            with run_dir.lock():
                pass
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()
    assert not list(run_dir.root.glob(".*.tmp"))


def test_our_own_pid_left_by_an_earlier_process_is_stale(run_dir):
    """A killed run in a container of the same pid numbers: the pid is ours, not held."""
    lock = run_dir.root / ".lock"
    lock.write_text(str(os.getpid()))
    with run_dir.lock():
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


def test_release_removes_only_a_lock_holding_our_pid(run_dir):
    lock = run_dir.root / ".lock"
    with run_dir.lock():
        lock.write_text("1")  # what no protocol does; the release must not remove it
    assert lock.read_text() == "1"


def test_a_slow_racer_never_removes_a_fresh_lock(run_dir):
    """The racer read the dead pid, then the winner took the lock: the takeover checks
    what it removes inside the critical section."""
    lock = run_dir.root / ".lock"
    stale = str(dead_pid())
    lock.write_text(str(os.getppid()))  # the winner's fresh lock
    clear = "check"
    store_module._remove_stale_lock(lock, stale, clear)
    assert lock.read_text() == str(os.getppid())
    lock.write_text(stale)
    store_module._remove_stale_lock(lock, stale, clear)
    assert not lock.exists()


def test_a_full_disk_never_leaves_an_empty_lock(run_dir, monkeypatch):
    """The pid is written to a temporary file on a full device: no lock appears."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    lock = run_dir.root / ".lock"
    real = store_module.tempfile.mkstemp

    def full(*, dir, prefix, suffix):
        fd, name = real(dir=dir, prefix=prefix, suffix=suffix)
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return fd, name

    monkeypatch.setattr(store_module.tempfile, "mkstemp", full)
    with pytest.raises(
        UserError, match=f"no space left on device writing {lock}; free space or use another --out"
    ):
        with run_dir.lock():
            pass
    monkeypatch.undo()
    assert not lock.exists() and not list(run_dir.root.glob(".*.tmp"))
    with run_dir.lock():
        assert lock.read_text() == str(os.getpid())


def test_without_hard_links_the_lock_is_created_exclusively(run_dir, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(store_module.os, "link", no_link)
    lock = run_dir.root / ".lock"
    with run_dir.lock():
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(UserError, match="this process already has"):
            with run_dir.lock():
                pass
    assert not lock.exists()


def _contender(root: str, start, done, results, rounds: int, slow: bool) -> None:
    """One of the processes racing for the stale lock of ``root``, ``rounds`` times: it
    reports won (with what the lock holds) or lost (with the message), and a winner
    holds the lock until every contender has tried. ``slow``: a random pause of up to
    3 ms after each read of the lock and before each link, so that every interleaving of
    the protocol's steps comes up (a takeover that does not check what it removes, under
    one critical section, then lets two processes win)."""
    import random
    import time

    from cambench.benchmarks.core.errors import UserError
    from cambench.benchmarks.engine import store as module

    if slow:
        read, link = module._read_lock, os.link

        def slow_read(*args):
            got = read(*args)
            time.sleep(random.uniform(0, 0.003))
            return got

        def slow_link(*args):
            time.sleep(random.uniform(0, 0.003))
            return link(*args)

        module._read_lock, module.os.link = slow_read, slow_link
    store = module.RunStore(root)
    lock = Path(root) / ".lock"
    for _ in range(rounds):
        start.wait()
        try:
            with store.lock():
                results.put(("won", os.getpid(), lock.read_text()))
                done.wait()  # every contender has tried; the parent has looked
        except UserError as exc:
            results.put(("lost", os.getpid(), str(exc)))
            done.wait()
        except BaseException as exc:  # reported, so the parent's assertion names it
            results.put(("crashed", os.getpid(), repr(exc)))
            done.wait()
        done.wait()  # the winner has released


@pytest.mark.parametrize("contenders, rounds, slow", [(2, 50, False), (2, 50, True), (4, 25, True)])
def test_of_processes_racing_for_a_stale_lock_exactly_one_wins(run_dir, contenders, rounds, slow):
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(contenders + 1), ctx.Barrier(contenders + 1)
    results = ctx.Queue()
    root, lock = str(run_dir.root), run_dir.root / ".lock"
    procs = [
        ctx.Process(target=_contender, args=(root, start, done, results, rounds, slow), daemon=True)
        for _ in range(contenders)
    ]
    for p in procs:
        p.start()
    outcomes = []
    try:
        for _ in range(rounds):
            stale = dead_pid()
            lock.write_text(str(stale))
            start.wait(timeout=60)
            got = [results.get(timeout=60) for _ in range(contenders)]
            held = lock.read_text() if lock.exists() else None
            done.wait(timeout=60)  # the winner releases
            done.wait(timeout=60)
            outcomes.append((stale, got, held, lock.exists()))
    finally:
        start.abort()
        done.abort()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    for stale, got, held, left in outcomes:
        won = [pid for kind, pid, _ in got if kind == "won"]
        assert len(won) == 1, (stale, got)
        (winner,) = won
        assert held == str(winner) and not left, (stale, got, held, left)
        for kind, _, what in got:
            if kind == "won":
                assert what == str(winner)  # the lock held the pid from the moment it was
            else:
                assert kind == "lost" and f"another run (pid {winner}) is writing" in what, got
    assert not list(run_dir.root.glob(".*.tmp"))


# --- a full disk, a read-only folder ---------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_at_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "leaderboard.md"
    atomic_write(path, "old")
    before = sha(path)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cambench.benchmarks.core.files.os.replace", full)
    with pytest.raises(UserError) as info:
        atomic_write(path, "new", fix="use another --out")
    assert (
        str(info.value)
        == f"no space left on device writing {path}; free space or use another --out"
    )
    assert isinstance(info.value, WriteError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOSPC
    assert sha(path) == before and [p.name for p in tmp_path.iterdir()] == ["leaderboard.md"]


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on device writing"),
        (errno.EDQUOT, "disk quota exceeded writing"),
        (errno.EROFS, "read-only file system: cannot write"),
        (errno.EACCES, "permission denied writing"),
        (errno.EIO, "cannot write"),
    ],
)
def test_a_failed_table_write_keeps_the_old_table(run_dir, monkeypatch, code, words):
    path = run_dir.root / "rows.parquet"
    run_dir.write("rows.parquet", pd.DataFrame({"a": [1, 2]}))
    before = sha(path)

    def half_then_fail(self, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_fail)
    with pytest.raises(UserError, match=f"^{words} {path}") as info:
        run_dir.write("rows.parquet", pd.DataFrame({"a": [3]}))
    assert "use another --out" in str(info.value) and "\n" not in str(info.value)
    assert sha(path) == before and not list(run_dir.root.glob(".*.tmp"))


@pytest.mark.parametrize("failing", ["cells.parquet", "examples.npz", "the rename"])
def test_a_full_disk_while_writing_a_group_keeps_the_stored_group(store, monkeypatch, failing):
    folder = store.groups_dir / KEY
    before = digests(folder)
    full = OSError(errno.ENOSPC, "No space left on device")
    if failing == "the rename":
        real = os.rename

        def rename(src, dst):
            if Path(dst) == folder and not Path(src).name.endswith("-old"):
                raise full  # the new group's rename; the old one is put back
            return real(src, dst)

        monkeypatch.setattr(store_module.os, "rename", rename)
        named = folder
    elif failing == "examples.npz":
        monkeypatch.setattr(
            store_module.np, "savez_compressed", lambda *a, **k: (_ for _ in ()).throw(full)
        )
        named = folder / failing
    else:
        real_to_parquet = pd.DataFrame.to_parquet

        def to_parquet(self, where, **kwargs):
            if Path(where).name == failing:
                Path(where).write_bytes(b"PAR1")
                raise full
            return real_to_parquet(self, where, **kwargs)

        monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
        named = folder / failing
    with pytest.raises(UserError) as info:
        store.write_group(KEY, group_result(value=9.0), fingerprint="new", inputs={})
    assert (
        str(info.value)
        == f"no space left on device writing {named}; free space or use another --out"
    )
    monkeypatch.undo()
    assert digests(folder) == before
    assert store.damaged(KEY) is None and store.reusable(KEY, FINGERPRINT)
    assert [p.name for p in store.groups_dir.iterdir()] == [KEY]  # no temporary left


def test_an_output_folder_that_cannot_be_created_is_a_user_error(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    run = RunStore(tmp_path / "run")
    with pytest.raises(
        UserError, match=f"read-only file system: cannot write {run.root}; use another --out"
    ):
        run.prepare()


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions"
)
def test_a_read_only_folder_is_a_user_error_and_keeps_its_files(store):
    root = store.root
    store.write("leaderboard.md", "old")
    before = digests(root / "groups" / KEY), sha(root / "leaderboard.md")
    os.chmod(root, 0o500)
    os.chmod(root / "groups", 0o500)
    try:
        with pytest.raises(UserError, match=f"permission denied writing {root}"):
            store.prepare()
        with pytest.raises(UserError, match=f"permission denied writing {root / 'leaderboard.md'}"):
            store.write("leaderboard.md", "new")
        with pytest.raises(UserError, match=f"permission denied writing {root / 'groups' / KEY}"):
            store.write_group(KEY, group_result(value=9.0), fingerprint="new", inputs={})
        with pytest.raises(UserError, match=f"permission denied writing {root / '.lock'}"):
            with store.lock():
                pass
    finally:
        os.chmod(root / "groups", 0o700)
        os.chmod(root, 0o700)
    assert (digests(root / "groups" / KEY), sha(root / "leaderboard.md")) == before


def test_the_cli_exits_2_with_one_line_naming_the_folder(tmp_path, capsys):
    from cambench.benchmarks.run import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "run"
    assert main(["--suite", "smoke", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {out} (") and err.endswith("; use another --out")
    assert "\n" not in err
