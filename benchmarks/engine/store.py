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
        examples.npz         the first evaluation images, their masks and every method's
                             maps (images, ids, masks, maps__<method>), for figures
    rows.parquet, curves.parquet, cells.parquet   the run's groups, gathered at the end
    leaderboard.parquet      one row per cell at full precision: the numbers themselves
    leaderboard.md / .csv / .tex   views of it; leaderboard.csv without host measurements
    leaderboard-cost.csv           (wall time), which go to leaderboard-cost.csv

A group folder is written under a temporary name and renamed into place, so it is there
whole or not at all. A rerun reuses a stored group only when its fingerprint equals the
plan's (``RunStore.reusable``); the gathered tables hold exactly the run's planned groups.
A lock file keeps two runs out of one folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.core.errors import UserError
from benchmarks.core.files import TEMP_GLOB, atomic_write

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


def group_key(model: str, dataset: str) -> str:
    """The one name of a (model, dataset) group: its folder in a run, its key in reports.

    >>> group_key("resnet18", "busi"), split_group_key("resnet18--busi")
    ('resnet18--busi', ('resnet18', 'busi'))
    """
    return f"{model}--{dataset}"


def split_group_key(key: str) -> tuple[str, str] | None:
    """(model, dataset) of a group key; None for a name that is no group key."""
    model, sep, dataset = key.partition("--")
    return (model, dataset) if sep else None


@dataclass
class Manifest:
    """``manifest.json``: what a run is and holds. ``status`` is running, finished,
    finished with errors (a cell failed), or stopped: <why> (the run was cut short).
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
    from benchmarks.engine.suite import registries

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
        try:
            self.groups_dir.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"cannot write to output directory {self.root} ({exc.strerror}); choose another with --out"
            ) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the folder for this process; a second run fails at once."""
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = path.read_text().strip() if path.exists() else "?"
            if pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # left by a killed run
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            else:
                raise UserError(
                    f"another run (pid {pid}) is writing {self.root}; wait for it or use another --out"
                ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

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

    def stored_fingerprint(self, key: str) -> dict[str, Any] | None:
        """The fingerprint record of a stored group (``fingerprint`` and ``inputs``), None
        when the group is not stored or was stored by a version that kept none."""
        path = self.groups_dir / key / "fingerprint.json"
        if not path.is_file() or not (self.groups_dir / key / "cells.parquet").is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def reusable(self, key: str, fingerprint: str) -> bool:
        """The group is stored, from the same fingerprint, and complete: none of its cells
        was skipped for missing data or failed (those are computed again)."""
        stored = self.stored_fingerprint(key)
        if stored is None or stored.get("fingerprint") != fingerprint:
            return False
        status = pd.read_parquet(self.groups_dir / key / "cells.parquet", columns=["status"])
        return not status["status"].isin(NOT_REUSABLE).any()

    def write_group(self, key: str, result, *, fingerprint: str, inputs: dict[str, Any]) -> None:
        """Write a finished group (a ``GroupResult``) under a temporary name, then rename it
        into place: a reader sees the old group or the new one, whole."""
        final = self.groups_dir / key
        tmp = Path(tempfile.mkdtemp(dir=self.groups_dir, prefix=".tmp-"))
        try:
            result.rows.to_parquet(tmp / "rows.parquet", index=False)
            result.curves.to_parquet(tmp / "curves.parquet", index=False)
            result.cells.to_parquet(tmp / "cells.parquet", index=False)
            report = json.dumps(result.report or {}, indent=2, sort_keys=True)
            (tmp / "model.json").write_text(report)
            record = {"fingerprint": fingerprint, "inputs": inputs}
            (tmp / "fingerprint.json").write_text(json.dumps(record, indent=1, default=str))
            if result.examples:
                np.savez_compressed(tmp / "examples.npz", **result.examples)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read(self, name: str, keys: Iterable[str]) -> pd.DataFrame:
        """``rows``, ``curves`` or ``cells`` of the groups ``keys``, in that order."""
        return _gather(self.groups_dir, name, keys)

    def reports(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The model reports of the groups ``keys`` that have one."""
        paths = [self.groups_dir / key / "model.json" for key in keys]
        return {p.parent.name: json.loads(p.read_text()) for p in paths if p.is_file()}

    def write(self, name: str, data: str | pd.DataFrame | Manifest) -> None:
        """A run-level file, atomically: text, a table (Parquet) or the manifest."""
        if isinstance(data, Manifest):
            data = data.to_json()
        if isinstance(data, pd.DataFrame):
            frame = data
            atomic_write(self.root / name, lambda tmp: frame.to_parquet(tmp, index=False))
        else:
            atomic_write(self.root / name, data)


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


def _gather(groups_dir: Path, name: str, keys: Iterable[str]) -> pd.DataFrame:
    paths = [groups_dir / key / f"{name}.parquet" for key in keys]
    parts = [pd.read_parquet(p) for p in paths if p.is_file()]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TABLES[name])


def stored_files(groups_dir: Path, filename: str) -> list[Path]:
    """``filename`` of every stored group under ``groups_dir``, sorted; groups still being
    written (hidden ``.tmp-*`` folders, left behind by a killed run) are not stored."""
    return sorted(
        p for p in Path(groups_dir).glob(f"*/{filename}") if not p.parent.name.startswith(".")
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
