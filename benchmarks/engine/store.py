"""The run folder: the one reader and writer of what a run leaves on disk.

Layout of ``results/<run-id>/``::

    manifest.json            the typed ``Manifest``: resolved suite, versions, git hash, seed,
                             host, device, times, status, every group's state and
                             fingerprint, and the metadata of every method and metric of
                             the run (kind, direction, host dependence, version), so
                             reports read the run without importing a registry
    groups/<model>--<dataset>/   one folder per finished (model, dataset) group:
        rows.parquet         per-sample scores: model, dataset, method, metric, output,
                             sample_id, label, target, correct, value
        curves.parquet       per-sample curves (list column ``values``)
        cells.parquet        status per (method, metric): ok, not_applicable, excluded,
                             no_image_scored, error, skipped (see ``plan.Status``)
        model.json           the model's classification report
        fingerprint.json     the hash of what produced the group, and its inputs
        examples.npz         4 evaluation images of the first batch, one per class in turn,
                             and every method's maps of them, for figures and the report:
                             images, ids, labels, target, pred, probs, class_names, masks,
                             organ_masks, maps__<method> (NaN where it explained none)
    rows.parquet, curves.parquet, cells.parquet   the run's groups, gathered at the end
    leaderboard.parquet      one row per cell at full precision: the numbers themselves
    leaderboard.md / .csv / .tex   views of it; leaderboard.csv without host measurements
    leaderboard-cost.csv           (wall time), which go to leaderboard-cost.csv

A group folder is written under a temporary name and renamed into place, so it is there
whole or not at all. Its ``fingerprint.json``, written last, lists the sha256 and size of
every other file of the group (``files``): a group whose file is missing, truncated or
changed is damaged (``RunStore.damaged``, ``RunStore.check_groups``) and computed again,
and a group stored by an older version without that list is computed again too. A rerun
reuses a stored group only when it is intact and its fingerprint equals the plan's
(``RunStore.reusable``); the gathered tables hold exactly the run's planned groups.
A lock file keeps two runs out of one folder (``RunStore.lock``). A write that fails for
want of space or permission is a ``UserError`` naming the file; what was stored before
stays whole.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import (
    TEMP_GLOB,
    atomic_write,
    check_writable,
    discard,
    file_digest,
    write_error,
)

try:
    import fcntl
except ImportError:  # not POSIX: a stale lock is then removed by hand
    fcntl = None  # type: ignore[assignment]

ROW_COLUMNS = [
    "model",
    "dataset",
    "method",
    "metric",
    "output",
    "sample_id",
    "label",
    "target",
    "correct",
    "value",
]
CELL_COLUMNS = ["model", "dataset", "method", "metric", "status", "reason", "n", "n_excluded"]
CURVE_COLUMNS = ["model", "dataset", "method", "metric", "curve", "sample_id", "values"]
TABLES = {"rows": ROW_COLUMNS, "curves": CURVE_COLUMNS, "cells": CELL_COLUMNS}
RUN_FORMAT = "cambench-run/2"
LEADERBOARD = "leaderboard.parquet"
CSV_NAME = "leaderboard.csv"  # reproducible metrics: byte-identical between runs
HOST_CSV_NAME = "leaderboard-cost.csv"  # host-dependent metrics (wall time)
NOT_REUSABLE = ("skipped", "error")  # a group with such cells is computed again on rerun
GROUP_FILES = ("rows.parquet", "curves.parquet", "cells.parquet", "model.json")  # + examples.npz
FIX = "use another --out"  # where a failed write of the run folder suggests to go
LOCK_NAME = ".lock"  # the pid of the run writing the folder (RunStore.lock)
TAKEOVER_NAME = ".lock.takeover"  # flock'ed while a stale lock is removed; never removed
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_HELD_LOCKS: set[str] = set()  # the lock files this process holds


def group_key(model: str, dataset: str) -> str:
    """The one name of a (model, dataset) group: its folder in a run, its key in reports.
    A label that is no safe file name (``/``, spaces, a leading dot) is spelled safely
    here, with a hash of the label so two labels never share a folder; the tables keep
    the labels as the suite wrote them.

    >>> group_key("resnet18", "busi"), split_group_key("resnet18--busi")
    ('resnet18--busi', ('resnet18', 'busi'))
    >>> group_key("resnet18", "busi/benign")
    'resnet18--busi_benign-16f186'
    """
    return f"{_safe(model)}--{_safe(dataset)}"


def _safe(label: str) -> str:
    clean = UNSAFE.sub("_", label).lstrip(".")
    if clean == label:
        return label
    return f"{clean}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"


UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")  # characters a group folder name never holds


def split_group_key(key: str) -> tuple[str, str] | None:
    """(model, dataset) of a group key; None for a name that is no group key."""
    model, sep, dataset = key.partition("--")
    return (model, dataset) if sep else None


@dataclass
class Manifest:
    """``manifest.json``: what a run is and holds. ``status`` is running, finished,
    finished with errors (a cell failed), or interrupted (Ctrl-C, SIGTERM, or bad input
    found mid-run: ``stopped_by`` says which).
    ``groups`` maps each planned group's key to its state (computed, reused, skipped,
    error) and fingerprint; ``methods`` and ``metrics`` map each label to the metadata
    reports need (``entry_metadata``)."""

    run_id: str
    suite: dict[str, Any]
    suite_files: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    git: str = "unknown"
    seed: int = 0
    host: str = ""
    platform: str = ""
    device: str = "cpu"
    data_root: str | None = None
    executor: str = "local"
    ray_address: str | None = None
    started: str = ""
    finished: str | None = None
    status: str = "running"
    stopped_by: str | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped_datasets: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = RUN_FORMAT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest as written by this or an older version (missing fields take their
        defaults, unknown ones are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("format", "cambench-run/1")
        return cls(**{"run_id": "", "suite": {}, **values})


def entry_metadata(kind: str, use: str) -> dict[str, Any]:
    """What a report needs to know of the method or metric registered as ``use``, from its
    registry record: ``use`` (the canonical name), version, and for metrics kind, ``higher_is_better``,
    ``host_dependent`` and the secondary outputs; for methods the family."""
    from cambench.benchmarks.engine.suite import registries

    entry = registries()[kind].get(use)
    info = entry.info
    meta: dict[str, Any] = {"use": entry.name, "version": info.version}
    if kind == "metrics":
        meta.update(
            kind=info.kind,
            higher_is_better=bool(info.higher_is_better),
            host_dependent=bool(info.host_dependent),
            secondary=[[name, bool(up)] for name, up in info.secondary],
        )
    else:
        meta.update(family=info.family)
    return meta


class RunStore:
    """The folder of one run, as the run writes it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def groups_dir(self) -> Path:
        return self.root / "groups"

    def group_dir(self, key: str) -> Path:
        """The folder of the group ``key`` (a ``group_key``)."""
        return self.groups_dir / key

    @contextmanager
    def open(self) -> Iterator[RunStore]:
        """Create the folder (or fail saying so), take its lock, and remove what a killed
        run left half-written."""
        self.prepare()
        with self.lock():
            self.remove_partial_writes()
            yield self

    def prepare(self) -> None:
        """Create the folder, or fail with a clear message if it cannot be written."""
        check_writable(self.root, FIX)
        try:
            self.groups_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.groups_dir, FIX) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the folder for this process; a second run fails at once.

        ``.lock`` in the run folder holds the decimal pid of its holder and never anything
        else. The protocol:

        1. Take: write our pid to a fresh temporary file (``.lock.<pid>.*.tmp``) and
           ``os.link`` it to ``.lock``. ``link`` creates the name atomically and fails when
           it exists, so the lock appears already holding our pid: no kill, crash or full
           disk leaves an empty lock. (A file system without hard links gets
           ``O_CREAT | O_EXCL`` and then the pid; a failed write removes the file.)
        2. The lock exists: read it. A live pid is another run: ``UserError``. An empty lock,
           or one that holds no pid, is a ``UserError`` naming it and ``rm``: this protocol
           never writes one, so an older version or a damaged disk left it, and only a
           person can tell whether a run still uses the folder.
        3. A dead pid is stale (so is our own pid when this process does not hold the lock:
           a killed run of an earlier process with our number, as in a container). Take
           ``flock`` of ``.lock.takeover`` (exclusive; the kernel drops it when its holder
           dies, so it never goes stale), read the lock again, remove it only if it still
           holds that dead pid, drop the ``flock``, and go back to 1. A lock holding a live
           pid is never removed by another process, every removal checks what it removes
           inside that one critical section, and a lock only comes into being through the
           ``link`` of 1, which fails while one exists. So of any number of processes
           racing for one stale lock exactly one links its own; the others read its live
           pid and fail, and a slow racer cannot remove the winner's fresh lock.
        4. Release: remove the lock only if it holds our pid (no other process removes a
           lock holding a live pid, so nothing comes between that read and the unlink).
        """
        path = self.root / LOCK_NAME
        self._take_lock(path)
        try:
            yield
        finally:
            _release_lock(path)

    def _take_lock(self, path: Path) -> None:
        me, held = str(os.getpid()), str(path.absolute())
        clear = f"check that no run is using {self.root}, then rm {path}"
        for _ in range(100):  # each turn ends in a lock taken, an error, or a change seen
            if _create_lock(path, me):
                _HELD_LOCKS.add(held)
                return
            pid = _read_lock(path, clear)
            for _ in range(5):  # a lock being written without hard links is empty briefly
                if pid != "":
                    break
                time.sleep(0.02)
                pid = _read_lock(path, clear)
            if pid is None:  # released meanwhile: try again
                continue
            if not _is_pid(pid):
                shown = "it is empty" if pid == "" else f"it holds {pid[:20]!r}"
                raise UserError(
                    f"the lock file {path} holds no process id ({shown}; an older version or a full disk left it); {clear}"
                )
            if pid == me and held in _HELD_LOCKS:
                raise UserError(f"this process already has {self.root} open (lock {path})")
            if pid != me and _alive(int(pid)):
                raise UserError(
                    f"another run (pid {pid}) is writing {self.root}; wait for it or use another --out (if pid {pid} is no run, as after a reboot: rm {path})"
                )
            _remove_stale_lock(path, pid, clear)
        raise UserError(f"the lock file {path} keeps changing; {clear}")

    def remove_partial_writes(self) -> int:
        """Remove a group folder still under its temporary name (``groups/.tmp-*``) and the
        temporaries of atomic writes. Call it holding the lock. Returns how many."""
        partial = [*self.groups_dir.glob(".tmp-*"), *self.root.glob(TEMP_GLOB)]
        for path in partial:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(partial)

    def damaged(self, key: str) -> str | None:
        """Why the stored group ``key`` cannot be trusted ("rows.parquet is missing",
        "cells.parquet does not match its checksum (truncated or changed)"); None when it
        is intact, not stored, or stored by an older version that kept no checksums (that
        one is not ``reusable`` either: it is computed again)."""
        return self._inspect(key)[1]

    def check_groups(self, keys: Iterable[str]) -> dict[str, str]:
        """The damaged groups among ``keys``, each with why (``damaged``), in that order."""
        found = {key: self.damaged(key) for key in keys}
        return {key: why for key, why in found.items() if why}

    def stored_fingerprint(self, key: str) -> dict[str, Any] | None:
        """The fingerprint record of a stored group (``fingerprint``, ``inputs`` and, since
        checksums, ``files``); None when the group is not stored, is damaged, or was stored
        by a version that kept no fingerprint."""
        record, why = self._inspect(key)
        return None if why else record

    def reusable(self, key: str, fingerprint: str) -> bool:
        """The group is stored, intact (every file with its checksum), from the same
        fingerprint, and complete: none of its cells was skipped for missing data or failed
        (those are computed again). A group of an older version without checksums is not."""
        record, why = self._inspect(key)
        if why or record is None or "files" not in record:
            return False
        if record.get("fingerprint") != fingerprint:
            return False
        try:
            status = pd.read_parquet(self.group_dir(key) / "cells.parquet", columns=["status"])
        except Exception:  # the checksum matched, yet it cannot be read: compute it again
            return False
        return not status["status"].isin(NOT_REUSABLE).any()

    def _record(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """The group's ``fingerprint.json`` and, when it cannot be trusted, why; (None,
        None) when there is none (not stored, or stored by a version that kept none)."""
        path = self.group_dir(key) / "fingerprint.json"
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return (
                None,
                f"fingerprint.json cannot be read ({type(exc).__name__}; truncated or changed)",
            )
        if not isinstance(record, dict):
            return None, "fingerprint.json holds no fingerprint record (changed)"
        files = record.get("files")
        if files is not None and not (
            isinstance(files, dict) and all(_valid_entry(n, e) for n, e in files.items())
        ):
            return None, "fingerprint.json lists the group's files wrongly (changed)"
        return record, None

    def _inspect(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """The record of an intact stored group, or why it is damaged (see ``damaged``)."""
        record, why = self._record(key)
        if why or record is None:
            return None, why
        folder = self.group_dir(key)
        files = record.get("files")
        if files is None:  # an older version: no checksums to check
            return (record if (folder / "cells.parquet").is_file() else None), None
        for name in [*GROUP_FILES, *sorted(set(files) - set(GROUP_FILES))]:
            if name not in files:
                return None, f"{name} is missing from the list in fingerprint.json"
            if why := _check_file(folder / name, files[name]):
                return None, why
        return record, None

    def write_group(self, key: str, result, *, fingerprint: str, inputs: dict[str, Any]) -> None:
        """Write a finished group (a ``GroupResult``) under a temporary name, then rename it
        into place: a reader sees the old group or the new one, whole. ``fingerprint.json``
        is written last and lists the sha256 and size of every other file. A write that
        fails (disk full, read-only) is a ``UserError`` naming the file; the temporary is
        removed and a group stored before stays as it was."""
        final = self.group_dir(key)
        writers: dict[str, Any] = {
            "rows.parquet": lambda p: result.rows.to_parquet(p, index=False),
            "curves.parquet": lambda p: result.curves.to_parquet(p, index=False),
            "cells.parquet": lambda p: result.cells.to_parquet(p, index=False),
            "model.json": lambda p: p.write_text(
                json.dumps(result.report or {}, indent=2, sort_keys=True)
            ),
        }
        if result.examples:
            writers["examples.npz"] = lambda p: np.savez_compressed(p, **result.examples)
        tmp: Path | None = None
        target = final
        try:
            tmp = Path(tempfile.mkdtemp(dir=self.groups_dir, prefix=".tmp-"))
            files = {}
            for name, write in writers.items():
                target = final / name
                write(tmp / name)
                digest, size = file_digest(tmp / name)
                files[name] = {"sha256": digest, "size": size}
            target = final / "fingerprint.json"
            record = {"fingerprint": fingerprint, "inputs": inputs, "files": files}
            (tmp / "fingerprint.json").write_text(json.dumps(record, indent=1, default=str))
            target = final
            _replace_folder(tmp, final)
        except OSError as exc:
            raise write_error(exc, target, FIX) from None
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read(self, name: str, keys: Iterable[str]) -> pd.DataFrame:
        """``rows``, ``curves`` or ``cells`` of the groups ``keys``, in that order. A file
        that is damaged or cannot be read is a ``UserError`` naming it."""
        parts = [self._read_table(key, name) for key in keys]
        parts = [p for p in parts if p is not None and len(p)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TABLES[name])

    def _read_table(self, key: str, name: str) -> pd.DataFrame | None:
        folder = self.group_dir(key)
        path = folder / f"{name}.parquet"
        again = "rerun the same command to compute that group again"
        record, _ = self._record(key)
        entry = ((record or {}).get("files") or {}).get(path.name)
        if entry is not None:
            if why := _check_file(path, entry):
                raise UserError(f"cannot read {path}: {why}; {again}")
        elif not path.is_file():
            return None
        try:
            return pd.read_parquet(path)
        except Exception as exc:
            raise UserError(
                f"cannot read {path} ({type(exc).__name__}: damaged); {again}, or remove {folder}"
            ) from None

    def reports(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The model reports of the groups ``keys`` that have one."""
        out = {}
        for key in keys:
            path = self.group_dir(key) / "model.json"
            if not path.is_file():
                continue
            try:
                out[key] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(
                    f"cannot read {path} ({type(exc).__name__}: damaged); rerun the same command to compute that group again"
                ) from None
        return out

    def write(self, name: str, data: str | pd.DataFrame | Manifest) -> None:
        """A run-level file, atomically: text, a table (Parquet) or the manifest. A write
        that fails is a ``UserError`` naming the file; the old file stays whole."""
        if isinstance(data, Manifest):
            data = data.to_json()
        if isinstance(data, pd.DataFrame):
            frame = data
            atomic_write(self.root / name, lambda tmp: frame.to_parquet(tmp, index=False), fix=FIX)
        else:
            atomic_write(self.root / name, data, fix=FIX)


@dataclass
class StoredRun:
    """A run folder as reports (figures, the regression gate) read it; absent files are
    None. Everything about the run's methods and metrics comes from its manifest, so a
    report never imports a registry and reads runs of older versions and renamed entries."""

    root: Path
    manifest: Manifest
    rows: pd.DataFrame | None
    curves: pd.DataFrame | None
    cells: pd.DataFrame | None
    leaderboard: pd.DataFrame | None  # leaderboard.parquet: numeric, full precision

    def metric(self, label: str) -> dict[str, Any]:
        """A metric label's metadata: use, kind, higher_is_better, host_dependent, ..."""
        return self.manifest.metrics.get(label) or {"use": label}

    def method(self, label: str) -> dict[str, Any]:
        return self.manifest.methods.get(label) or {"use": label}


def read_run(root: str | Path) -> StoredRun:
    """The run folder at ``root``: its manifest, tables and leaderboard (``UserError`` when
    it is no folder or a file cannot be read)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"run folder {root} does not exist; give the --out folder of python -m benchmarks.run"
        )
    manifest = _read_manifest(root / "manifest.json")
    tables = {name: _read_parquet(root / f"{name}.parquet") for name in TABLES}
    board = _read_parquet(root / LEADERBOARD)
    if board is None:  # a run of an older version: its CSV leaderboards, rounded
        board = _read_leaderboard_csvs(root)
    run = StoredRun(root, manifest, tables["rows"], tables["curves"], tables["cells"], board)
    if not manifest.metrics or not manifest.methods:
        _legacy_metadata(run)
    return run


def _read_manifest(path: Path) -> Manifest:
    if not path.exists():
        return Manifest(run_id=path.parent.name, suite={}, format="")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}); rerun the suite") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; rerun the suite to rewrite it")
    if not isinstance(data.get("suite"), dict):
        data["suite"] = {}
    return Manifest.from_dict(data)


def _read_parquet(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise UserError(
            f"cannot read {path} ({type(exc).__name__}); rerun python -m benchmarks.run to rewrite it"
        ) from None


def _read_leaderboard_csvs(root: Path) -> pd.DataFrame | None:
    """``leaderboard.csv`` and ``leaderboard-cost.csv`` of an older run, as one table."""
    parts = []
    for name in (CSV_NAME, HOST_CSV_NAME):
        path = root / name
        if not path.exists():
            continue
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
            for col in ("mean", "ci_low", "ci_high", "rank", "n"):
                table[col] = pd.to_numeric(table[col], errors="coerce")
        except Exception as exc:
            raise UserError(
                f"cannot read {path} ({type(exc).__name__}); rerun python -m benchmarks.run to rewrite it"
            ) from None
        table["higher_is_better"] = table["higher_is_better"].str.lower() == "true"
        parts.append(table)
    nonempty = [p for p in parts if len(p)]
    if not parts:
        return None
    return pd.concat(nonempty, ignore_index=True) if nonempty else parts[0]


def _legacy_metadata(run: StoredRun) -> None:
    """A run written before the manifest carried its entries' metadata: take it from the
    registries where they still know the entry (the only registry look-up of a report)."""
    for kind in ("methods", "metrics"):
        have = getattr(run.manifest, kind)
        for label, entry in (run.manifest.suite.get(kind) or {}).items():
            use = entry.get("use", label) if isinstance(entry, dict) else label
            if label in have:
                continue
            try:
                have[label] = entry_metadata(kind, use)
            except Exception:  # an entry the registry no longer knows: its name alone
                have[label] = {"use": use}


def stored_files(groups_dir: Path, filename: str) -> list[Path]:
    """``filename`` of every stored group under ``groups_dir``, sorted; groups still being
    written (hidden ``.tmp-*`` folders, left behind by a killed run) are not stored."""
    return sorted(
        p for p in Path(groups_dir).glob(f"*/{filename}") if not p.parent.name.startswith(".")
    )


def _valid_entry(name: Any, entry: Any) -> bool:
    """A ``files`` entry of ``fingerprint.json``: a plain file name with sha256 and size."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("size"), int)
    )


def _check_file(path: Path, entry: dict[str, Any]) -> str | None:
    """Why the file at ``path`` is not the one ``entry`` recorded; None when it is."""
    name = path.name
    try:
        size = path.stat().st_size
        if size == entry["size"]:
            digest, size = file_digest(path)
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or type(exc).__name__})"
    if size != entry["size"]:
        return f"{name} is truncated or changed ({size} bytes, {entry['size']} stored)"
    if digest != entry["sha256"]:
        return f"{name} does not match its checksum (truncated or changed)"
    return None


def _replace_folder(new: Path, final: Path) -> None:
    """Rename the folder ``new`` to ``final``; a folder already there is moved aside first
    (under a ``.tmp-`` name, which a killed run's successor removes) and put back when the
    rename fails."""
    old = None
    if final.exists():
        old = new.with_name(f"{new.name}-old")
        os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _create_lock(path: Path, pid: str) -> bool:
    """Create the lock ``path`` holding ``pid`` in one atomic step (``RunStore.lock``, 1);
    False when a lock is there."""
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{pid}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "w") as fh:
            fh.write(pid)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the lock names it, even across a crash
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:  # the holder removed our temporary as a partial write
            return False
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
        return _create_lock_exclusive(path, pid)
    except OSError as exc:
        raise write_error(exc, path, FIX) from None
    finally:
        discard(tmp)


def _create_lock_exclusive(path: Path, pid: str) -> bool:
    """``_create_lock`` without hard links: create exclusively, then write; a failed write
    removes the file, so only a kill between the two steps leaves an empty lock."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(pid)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        raise
    return True


def _read_lock(path: Path, clear: str) -> str | None:
    """What the lock holds (stripped; bytes that are no text escaped); None when there is
    no lock."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read the lock file {path} ({exc.strerror}); {clear}") from None
    return data.decode("ascii", "backslashreplace").strip()


def _is_pid(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 2**31


def _remove_stale_lock(path: Path, pid: str, clear: str) -> None:
    """Remove the lock ``path`` if it still holds the dead ``pid``, deciding and removing
    under an exclusive ``flock`` of ``.lock.takeover`` (``RunStore.lock``, 3)."""
    guard = path.with_name(TAKEOVER_NAME)
    if fcntl is None:
        raise UserError(
            f"the lock file {path} was left by a run that is no longer running (pid {pid}) and this system cannot take it over safely; {clear}"
        )
    try:
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(exc, guard, FIX) from None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # another process is taking over: microseconds
                if time.monotonic() > deadline:
                    raise UserError(f"another process holds {guard} for long; {clear}") from None
                time.sleep(0.005)
            except OSError as exc:
                raise UserError(
                    f"the lock file {path} was left by a run that is no longer running (pid {pid}), but this file system cannot lock {guard} ({exc.strerror}) to take it over safely; {clear}"
                ) from None
        if _read_lock(path, clear) == pid:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise write_error(exc, path, FIX) from None
    finally:
        os.close(fd)  # drops the flock


def _release_lock(path: Path) -> None:
    """Remove the lock if it holds our pid (``RunStore.lock``, 4)."""
    _HELD_LOCKS.discard(str(path.absolute()))
    try:
        if path.read_bytes().decode("ascii", "replace").strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True
