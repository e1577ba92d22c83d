"""A run's tables gathered from its stored groups: what ``benchmarks.run`` publishes when a
run ends, and what a report reads of a run that has not (interrupted, or still running).

The stored groups are the truth: each ``groups/<model>--<dataset>/`` holds its rows,
curves, cells and model report, checked against their checksums when read. The run-level
tables (``rows.parquet``, ``leaderboard.parquet``, ...) are derived from them by
``collect`` and written once, when the run ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cambench.benchmarks.engine.store import Manifest, RunStore, stored_files
from cambench.benchmarks.reports.leaderboard import aggregate


@dataclass
class Collected:
    """The run-level tables of some stored groups."""

    keys: list[str]  # the groups gathered, in order
    rows: pd.DataFrame
    cells: pd.DataFrame
    curves: pd.DataFrame
    table: pd.DataFrame  # the leaderboard: ``leaderboard.aggregate`` of rows and cells
    reports: dict[str, dict[str, Any]]  # group key -> its model report (model.json)


def collect(store: RunStore, keys: Iterable[str], manifest: Manifest, seed: int) -> Collected:
    """Read the groups ``keys`` and aggregate them into the leaderboard; the metrics'
    directions and kinds and the random baselines come from the manifest, never from the
    live registries."""
    keys = list(keys)
    rows, cells, curves = (store.read(name, keys) for name in ("rows", "cells", "curves"))
    directions = {k: meta["higher_is_better"] for k, meta in manifest.metrics.items()}
    families = {k: meta["kind"] for k, meta in manifest.metrics.items()}
    randoms = {k for k, meta in manifest.methods.items() if meta.get("use") == "random"}
    table = aggregate(rows, cells, directions, seed=seed, families=families, randoms=randoms)
    return Collected(keys, rows, cells, curves, table, store.reports(keys))


def stored_groups(store: RunStore, manifest: Manifest) -> list[str]:
    """The stored groups of a run, whole and intact: those the manifest lists, in its
    order (computed, reused, skipped for missing data or failed: each has its cells), then
    any other group folder (a run stopped before it wrote the manifest again). Damaged
    groups are left out: the run computes them again when rerun."""
    keys = list(manifest.groups)
    keys += [p.parent.name for p in stored_files(store.groups_dir, "cells.parquet")]
    keys = list(dict.fromkeys(keys))
    return [
        k for k in keys if (store.group_dir(k) / "cells.parquet").exists() and not store.damaged(k)
    ]
