"""The run store: one folder per run, written atomically, resumable.

Layout of ``results/<run-id>/``::

    manifest.json            resolved suite, versions, git hash, seeds, host, device, times
    groups/<model>--<dataset>/   one folder per finished (model, dataset) group:
        rows.parquet         per-sample scores: model, dataset, method, metric, output,
                             sample_id, label, target, correct, value
        curves.parquet       per-sample curves (list column ``values``)
        cells.parquet        status per (method, metric): ok, not_applicable, excluded (by the suite), error, skipped
        model.json           the model's classification report
        examples.npz         the first evaluation images, their masks and every method's
                             maps (images, ids, masks, maps__<method>), for figures
    rows.parquet, curves.parquet, cells.parquet   all groups, gathered at the end
    leaderboard.md / .csv / .tex   leaderboard.csv without host measurements (wall time)
    leaderboard-cost.csv           the host measurements, same columns

A group folder is written under a temporary name and renamed into place, so it is there
whole or not at all: a rerun of the same suite skips every group already stored, and an
interrupted run resumes where it stopped. A lock file keeps two runs out of one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.core.errors import UserError

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


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def group_key(model: str, dataset: str) -> str:
    return f"{model}--{dataset}"


class RunStore:
    """The folder of one run."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def groups_dir(self) -> Path:
        return self.root / "groups"

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

    def has_group(self, model: str, dataset: str) -> bool:
        """The group is stored with results; one skipped for missing data is not (a rerun with
        the data runs it)."""
        path = self.groups_dir / group_key(model, dataset) / "cells.parquet"
        if not path.exists():
            return False
        status = pd.read_parquet(path, columns=["status"])["status"]
        return not (len(status) and (status == "skipped").all())

    def write_group(
        self,
        model: str,
        dataset: str,
        *,
        rows: pd.DataFrame,
        curves: pd.DataFrame,
        cells: pd.DataFrame,
        report: dict[str, Any] | None,
        examples: dict[str, Any] | None = None,
    ) -> None:
        """Write a finished group under a temporary name, then rename it into place."""
        final = self.groups_dir / group_key(model, dataset)
        tmp = Path(tempfile.mkdtemp(dir=self.groups_dir, prefix=".tmp-"))
        try:
            rows.to_parquet(tmp / "rows.parquet", index=False)
            curves.to_parquet(tmp / "curves.parquet", index=False)
            cells.to_parquet(tmp / "cells.parquet", index=False)
            (tmp / "model.json").write_text(json.dumps(report or {}, indent=2, sort_keys=True))
            if examples:
                np.savez_compressed(tmp / "examples.npz", **examples)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read(self, name: str) -> pd.DataFrame:
        """All groups' ``rows``, ``curves`` or ``cells``, in a deterministic order."""
        parts = [pd.read_parquet(p) for p in self._stored(f"{name}.parquet")]
        parts = [p for p in parts if len(p)]
        columns = {"rows": ROW_COLUMNS, "curves": CURVE_COLUMNS, "cells": CELL_COLUMNS}[name]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)

    def reports(self) -> dict[str, dict[str, Any]]:
        return {p.parent.name: json.loads(p.read_text()) for p in self._stored("model.json")}

    def _stored(self, filename: str) -> list[Path]:
        return stored_files(self.groups_dir, filename)


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
