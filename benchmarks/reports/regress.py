"""``python -m benchmarks.regress``: the CI regression gate on explanation quality.

Write a baseline from a good run, then check later runs of the same suite against it::

    python -m benchmarks.run --suite smoke --out results/smoke-base --no-progress
    python -m benchmarks.regress results/smoke-base --write-baseline benchmarks/baselines/smoke.json

    python -m benchmarks.run --suite smoke --out results/ci --no-progress
    python -m benchmarks.regress results/ci --baseline benchmarks/baselines/smoke.json

The check prints one line per failure, naming dataset/model/method/metric, the baseline
and current numbers and the rule, then a summary line. Exit status: 0 when the run is
within tolerance, 1 when it regressed, 2 for bad input (a missing run folder, an
unreadable baseline, a baseline of another suite): one ``error: ...`` line on stderr that
names the file, the offending input and the fix.

The gate fails closed: it passes a run only when it could check it, so every input it
cannot trust is bad input (exit 2), never a pass and never a traceback:

- a run that did not finish: ``manifest.json`` without ``status``, or with any status other
  than ``finished`` or ``finished with errors`` (``running``, ``stopped: <why>``, ...);
  rerunning the same command with the same ``--out`` resumes and finishes it.
- a non-finite number in the run: a NaN, an infinity or a non-number in the ``value``
  column of ``rows.parquet`` (the harness never stores one: an image a metric cannot score
  leaves no row), or in the ``mean``/``ci_low``/``ci_high`` of an ok cell of
  ``leaderboard.parquet``; the file is damaged.
- a malformed baseline: a missing field, a field of the wrong type, a non-numeric, NaN or
  infinite number, an empty or reversed CI, a cell without values or listed twice, an
  incomplete ordering; ``--write-baseline`` rewrites it from a finished run.

A run that ``finished with errors`` is checked like a finished one: its error cells are
results the run recorded (a method or metric that now raises), so a baseline cell that is
an error in the run fails as a regression (exit 1, rule ``cell not ok``, with the error
message), like any cell that is no longer ``ok``. Error cells the baseline does not cover
(a cost metric, a new method) are not gated, but the output lists them in a note, so they
never pass unseen. A baseline is only ever written from a run that is ``finished``.

The baseline (JSON, small, meant to be committed and read in review) holds the suite
name and config hash, and per quality cell (every metric whose kind is not ``cost``:
time and memory depend on the machine) its mean, 95% percentile-bootstrap CI, n,
direction and the per-sample primary values keyed by sample id, plus the expected
orderings against the random baseline.

Rules, per baseline cell (dataset, model, method, metric):

- missing from the run, or its status is not ``ok`` -> failure.
- same sample ids as the baseline (at least 6) -> the leaderboard's paired test
  (``benchmarks.reports.stats.paired_test``: Wilcoxon signed-rank, or a sign-flip
  permutation test where the drops tie; differences within float tolerance are 0). Per
  sample, the drop is baseline - current in the metric's good direction. The cell
  regressed when the test says the samples changed (two-sided p < 0.05) AND the mean
  drop exceeds ``--min-effect`` (default 0.25) times the half-width of the baseline's
  CI: a consistent but negligible change (a float rounding, a library update) passes.
  Drops below 1e-9 x max(1, |baseline mean|) never count, so a cell whose baseline CI
  has zero width is not failed by float noise either.
- other sample ids (a changed ``max_images``, a sample the metric now excludes), or
  fewer than 6 -> unpaired test: regressed when the drop of the means exceeds
  sqrt(hw_b^2 + hw_c^2) (= 1.96 sqrt(se_b^2 + se_c^2), se = CI half-width / 1.96), and the
  min-effect floor above.

Identical values always pass (every drop is 0). A cell that improves beyond the same
tolerance is not a failure; the summary counts such cells so the baseline can be renewed.

Orderings: in each (dataset, model, metric) with a random baseline method (labelled
``random`` or using the registry's ``random``), every method that clearly beat it in the
baseline run (the same paired test: p < 0.05 and a positive mean advantage) must not fall
below random's mean in the run; a flip is a failure. Methods that only tied random in the
baseline are not held to an ordering: a flip among near-ties is noise, not a regression.
The orderings are listed in the baseline file, so a reviewer sees (and may delete) them.

A run whose suite config differs from the baseline's (a method's options, a filter) is
still checked cell by cell, by label; the output says that the config differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import atomic_write
from cambench.benchmarks.engine.store import LEADERBOARD
from cambench.benchmarks.engine.store import read_run as read_stored_run
from cambench.benchmarks.reports.leaderboard import KEYS, bootstrap_ci
from cambench.benchmarks.reports.stats import ALPHA, MIN_PAIRS, paired_test

FORMAT = "cambench-regression-baseline/1"
UNGATED_KINDS = ("cost",)
DEFAULT_MIN_EFFECT = 0.25
NUMERICAL_TOL = 1e-9  # relative; drops below it are float noise, never a regression
RANDOM_METHOD = "random"
EXAMPLES = """examples:
  python -m benchmarks.regress results/smoke-base --write-baseline benchmarks/baselines/smoke.json
  python -m benchmarks.regress results/ci --baseline benchmarks/baselines/smoke.json
"""
RUN_FILES = ("manifest.json", "rows.parquet", "cells.parquet")
FINISHED = ("finished", "finished with errors")  # the manifest statuses of a run that ended
RERUN = "rerun `python -m benchmarks.run` with a new --out to rewrite it"

Key = tuple[str, str, str, str]  # dataset, model, method, metric (leaderboard.KEYS order)


@dataclass(frozen=True)
class Run:
    """What the gate reads of a run folder."""

    root: Path
    manifest: dict[str, Any]
    values: dict[Key, pd.Series]  # primary per-sample values, indexed by sample id (str)
    cells: dict[Key, tuple[str, str]]  # status, reason

    @property
    def suite(self) -> dict[str, Any]:
        return self.manifest["suite"]


@dataclass(frozen=True)
class Verdict:
    """The comparison of one cell's current values with its baseline values.

    drop: mean loss in the good direction (baseline - current if higher is better);
    ci: the 95% CI of the median per-sample drop (paired) or None (unpaired);
    p: the paired test's two-sided p (``benchmarks.reports.stats.paired_test``; paired);
    tolerance: the drop the cell may lose before it counts.
    """

    paired: bool
    mean_baseline: float
    mean_current: float
    drop: float
    ci: tuple[float, float] | None
    tolerance: float
    regressed: bool
    improved: bool
    p: float | None = None
    test: str = ""

    def describe(self) -> str:
        if self.paired:
            lo, hi = self.ci
            return (
                f"paired mean drop {_f(self.drop)} ({self.test} p = {self.p:.2g}; median "
                f"drop 95% CI [{_f(lo)}, {_f(hi)}]), tolerance {_f(self.tolerance)}"
            )
        return f"drop of the means {_f(self.drop)} > tolerance {_f(self.tolerance)}"


@dataclass
class Report:
    """The outcome of a check: failure lines (empty when it passed), notes and counts."""

    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cells_checked: int = 0
    orderings_checked: int = 0
    improved: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _f(v: float) -> str:
    return f"{v:.4g}"


def _name(key: Key) -> str:
    return "/".join(key)


def cell_seed(key: Key, seed: int) -> int:
    """The bootstrap seed of a cell, as the leaderboard's: its CI matches the leaderboard's."""
    return zlib.crc32("|".join(map(str, key)).encode()) ^ seed


def config_hash(resolved: dict[str, Any]) -> str:
    """``Suite.config_hash`` of a resolved suite as the manifest stores it."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def half_width(ci: tuple[float, float] | list[float]) -> float:
    return (float(ci[1]) - float(ci[0])) / 2


# ---------------------------------------------------------------------------------------
# The rule for one cell


def compare(
    baseline: pd.Series,
    current: pd.Series,
    *,
    higher_is_better: bool,
    baseline_ci: tuple[float, float],
    seed: int,
    min_effect: float = DEFAULT_MIN_EFFECT,
) -> Verdict:
    """Compare per-sample values (indexed by sample id) of one cell with its baseline.

    >>> b = pd.Series([1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 3.5, 4.5], index=list("abcdefgh"))
    >>> compare(b, b, higher_is_better=True, baseline_ci=(1.5, 3.5), seed=0).regressed
    False
    >>> compare(b, b - 0.1, higher_is_better=True, baseline_ci=(1.5, 3.5), seed=0).regressed
    False
    >>> compare(b, b - 0.5, higher_is_better=True, baseline_ci=(1.5, 3.5), seed=0).regressed
    True
    >>> compare(b, b - 0.5, higher_is_better=False, baseline_ci=(1.5, 3.5), seed=0).improved
    True
    """
    sign = 1.0 if higher_is_better else -1.0
    base = baseline.to_numpy(dtype=np.float64)
    cur_all = current.to_numpy(dtype=np.float64)
    mean_b, mean_c = float(base.mean()), float(cur_all.mean())
    hw_b = half_width(baseline_ci)
    floor = max(min_effect * hw_b, NUMERICAL_TOL * max(1.0, abs(mean_b)))
    paired = (
        len(baseline) == len(current)
        and baseline.index.is_unique
        and current.index.is_unique
        and set(baseline.index) == set(current.index)
    )
    if paired:  # the leaderboard's paired test; below its 6 pairs, the unpaired rule
        cur = current.reindex(baseline.index).to_numpy(dtype=np.float64)
        result = paired_test(sign * base, sign * cur, seed=seed)  # > 0: the baseline was better
        if result.decided:
            drop, significant = result.mean, result.p < ALPHA
            return Verdict(
                paired=True,
                mean_baseline=mean_b,
                mean_current=mean_c,
                drop=drop,
                ci=(result.ci_low, result.ci_high),
                tolerance=floor,
                regressed=significant and drop > floor,
                improved=significant and -drop > floor,
                p=result.p,
                test=result.test,
            )
    hw_c = half_width(bootstrap_ci(cur_all, seed=seed))
    tolerance = max(floor, math.hypot(hw_b, hw_c))
    drop = sign * (mean_b - mean_c)
    return Verdict(
        paired=False,
        mean_baseline=mean_b,
        mean_current=mean_c,
        drop=drop,
        ci=None,
        tolerance=tolerance,
        regressed=drop > tolerance,
        improved=-drop > tolerance,
    )


# ---------------------------------------------------------------------------------------
# Reading runs and baselines


def read_run(path: str | Path) -> Run:
    """The manifest, primary per-sample values and cell statuses of a run folder, checked:
    every stored value is a finite number (``UserError`` naming the first that is not)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"run folder {root} does not exist; give the --out folder of a run")
    missing = [name for name in RUN_FILES if not (root / name).is_file()]
    if missing:
        raise UserError(
            f"run folder {root} has no {', '.join(missing)}; it is not a finished run "
            "(rerun `python -m benchmarks.run` with --out there to complete it)"
        )
    try:
        stored = read_stored_run(root)
    except UserError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"run folder {root} cannot be read ({type(exc).__name__}: {_one_line(exc)}); {RERUN}"
        ) from None
    manifest = dataclasses.asdict(stored.manifest)
    # the raw status: the store reads a manifest without one as "running"
    manifest["status"] = _manifest_field(root / "manifest.json", "status")
    _check_manifest(root / "manifest.json", manifest)
    if not stored.manifest.suite:
        raise UserError(f"{root / 'manifest.json'} has no resolved 'suite'; rerun the suite")
    try:
        rows = stored.rows[[*KEYS, "output", "sample_id", "value"]]
        cells = stored.cells[[*KEYS, "status", "reason"]]
    except KeyError as exc:
        raise UserError(f"run folder {root} cannot be read ({_one_line(exc)})") from None
    rows = rows.assign(value=_finite_column(rows, "value", root / "rows.parquet"))
    if stored.leaderboard is not None:
        _check_leaderboard(stored.leaderboard, root)
    rows = rows[rows["output"] == "value"]
    values = {
        tuple(map(str, key)): pd.Series(
            grp["value"].to_numpy(dtype=np.float64), index=grp["sample_id"].astype(str).to_numpy()
        )
        for key, grp in rows.groupby(KEYS, sort=True)
    }
    statuses = {
        tuple(map(str, (r.dataset, r.model, r.method, r.metric))): (
            str(r.status),
            "" if r.reason is None else str(r.reason),
        )
        for r in cells.itertuples()
    }
    return Run(root=root, manifest=manifest, values=values, cells=statuses)


def _manifest_field(path: Path, name: str) -> Any:
    """A top-level field of ``manifest.json`` as the file has it (None when absent)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}); rerun the suite") from None
    return data.get(name) if isinstance(data, dict) else None


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest fields the gate reads have the types the harness writes."""
    suite = manifest["suite"]
    problems = [
        f"'suite.{name}' is {_show(suite[name])}, not a table"
        for name in ("methods", "metrics")
        if name in suite and not isinstance(suite[name], dict)
    ]
    if "seed" in suite and not _is_int(suite["seed"]):
        problems.append(f"'suite.seed' is {_show(suite['seed'])}, not an integer")
    metrics = manifest["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        problems.append(f"'metrics' is {_show(metrics)}, not a table of tables")
    if problems:
        raise UserError(f"{path}: {problems[0]}; {RERUN}")


def _finite_column(table: pd.DataFrame, column: str, path: Path) -> pd.Series:
    """``table[column]`` as float64, or ``UserError`` naming the first cell (dataset/model/
    method/metric, and the output and sample where the table has them) whose value is not a
    finite number."""
    values = table[column]
    bad = ~_finite_mask(values)
    if bad.any():
        first = table[bad].iloc[0]
        where = "/".join(str(first[k]) for k in KEYS if k in table.columns) or f"row {bad.argmax()}"
        more = ", ".join(
            f"{k} {first[k]!r}" for k in ("status", "output", "sample_id") if k in table.columns
        )
        others = f" ({int(bad.sum())} such values in all)" if bad.sum() > 1 else ""
        raise UserError(
            f"{path}: cell {where}{f' ({more})' if more else ''} has {column} "
            f"{_show(first[column])}, not a finite number{others}; the harness never stores "
            f"one, so the file is damaged: {RERUN}"
        )
    return pd.Series(values.to_numpy(dtype=np.float64), index=values.index)


def _finite_mask(values: pd.Series) -> np.ndarray:
    """Which entries are finite real numbers (booleans are not numbers here)."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_complex_dtype(values):
        return np.zeros(len(values), dtype=bool)
    if pd.api.types.is_numeric_dtype(values):
        return np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
    return np.array([_is_number(v) for v in values], dtype=bool)


def _check_leaderboard(board: pd.DataFrame, root: Path) -> None:
    """The numbers of every ok cell of the leaderboard are finite (a cell that is not ok has
    none: its mean is NaN by design)."""
    name = LEADERBOARD if (root / LEADERBOARD).is_file() else "leaderboard.csv"
    if not {*KEYS, "status", "mean"} <= set(board.columns):
        raise UserError(
            f"{root / name} has no {', '.join(sorted({*KEYS, 'status', 'mean'} - set(board.columns)))} "
            f"column; {RERUN}"
        )
    ok = board[board["status"] == "ok"]
    for column in ("mean", "ci_low", "ci_high"):
        if column in ok.columns:
            _finite_column(ok, column, root / name)


def _is_number(value: Any) -> bool:
    """A finite real number (int or float, not a bool)."""
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool | np.bool_)
        and math.isfinite(value)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _show(value: Any) -> str:
    """A value as a message shows it: its repr, on one line, at most 60 characters."""
    text = repr(value) if not isinstance(value, float | np.floating) else str(float(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _key(cell: dict[str, Any]) -> Key:
    return (str(cell["dataset"]), str(cell["model"]), str(cell["method"]), str(cell["metric"]))


def _one_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


CELL_FIELDS = ("dataset", "model", "method", "metric", "higher_is_better", "mean", "ci", "values")
LABEL_FIELDS = CELL_FIELDS[:4]
ORDERING_FIELDS = ("dataset", "model", "metric", "better", "worse")


def read_baseline(path: str | Path) -> dict[str, Any]:
    """A baseline file, checked to be one: every field the check reads is there, of its type,
    and every number is finite (``UserError`` naming the first that is not)."""
    path = Path(path)
    fix = "write one with `python -m benchmarks.regress RUN --write-baseline FILE`"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"baseline {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"baseline {path} cannot be read ({_one_line(exc)})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"baseline {path} is not valid JSON ({exc}); {fix}") from None
    except RecursionError:
        raise UserError(f"baseline {path} is nested too deeply to be a baseline; {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a regression baseline (format {FORMAT!r}); {fix}")
    problem = _baseline_problem(data)
    if problem:
        raise UserError(
            f"baseline {path}: {problem}; rewrite it with `python -m benchmarks.regress RUN "
            f"--write-baseline {path}` from a finished run"
        )
    return data


def _baseline_problem(data: dict[str, Any]) -> str | None:
    """The first field of a baseline that the check cannot trust, described; None if none."""
    if not isinstance(data.get("suite"), str):
        return f"'suite' is {_show(data.get('suite'))}, not a suite name"
    if "seed" in data and not _is_int(data["seed"]):
        return f"'seed' is {_show(data['seed'])}, not an integer"
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        return f"'cells' is {_show(cells)}, not a list of cells"
    seen: set[Key] = set()
    for i, cell in enumerate(cells):
        problem = _cell_problem(cell)
        where = f"cells[{i}]"
        if isinstance(cell, dict) and all(isinstance(cell.get(k), str) for k in LABEL_FIELDS):
            key = _key(cell)
            where += f" ({_name(key)})"
            if problem is None and key in seen:
                problem = "repeats a cell listed before it"
            seen.add(key)
        if problem:
            return f"{where} {problem}"
    orderings = data.get("orderings", [])
    if not isinstance(orderings, list):
        return f"'orderings' is {_show(orderings)}, not a list"
    for i, order in enumerate(orderings):
        if not isinstance(order, dict):
            return f"orderings[{i}] is {_show(order)}, not an object"
        for name in ORDERING_FIELDS:
            if not isinstance(order.get(name), str):
                what = "has no" if name not in order else f"has {_show(order[name])} as"
                return f"orderings[{i}] {what} {name!r}, not a label"
    return None


def _cell_problem(cell: Any) -> str | None:
    """What is wrong with one baseline cell; None if nothing."""
    if not isinstance(cell, dict):
        return f"is {_show(cell)}, not an object"
    for name in CELL_FIELDS:
        if name not in cell:
            return f"has no {name!r} (a cell needs {', '.join(CELL_FIELDS)})"
    for name in LABEL_FIELDS:
        if not isinstance(cell[name], str):
            return f"{name!r} is {_show(cell[name])}, not a label"
    if not isinstance(cell["higher_is_better"], bool):
        return f"'higher_is_better' is {_show(cell['higher_is_better'])}, not true or false"
    if not _is_number(cell["mean"]):
        return f"'mean' is {_show(cell['mean'])}, not a finite number"
    ci = cell["ci"]
    if not isinstance(ci, list) or len(ci) != 2:
        return f"'ci' is {_show(ci)}, not a list [low, high]"
    for i, bound in enumerate(ci):
        if not _is_number(bound):
            return f"'ci'[{i}] is {_show(bound)}, not a finite number"
    if ci[0] > ci[1]:
        return f"'ci' {_show(ci)} is reversed (low > high)"
    values = cell["values"]
    if not isinstance(values, dict) or not values:
        return f"'values' is {_show(values)}, not an object of per-sample values"
    for sample, value in values.items():
        if not _is_number(value):
            return f"'values'[{sample!r}] is {_show(value)}, not a finite number"
    return None


# ---------------------------------------------------------------------------------------
# Writing a baseline


def random_methods(suite: dict[str, Any]) -> set[str]:
    """Labels of the suite's random baseline methods."""
    return {
        label
        for label, opts in suite.get("methods", {}).items()
        if label == RANDOM_METHOD or (isinstance(opts, dict) and opts.get("use") == RANDOM_METHOD)
    }


def clearly_better(
    better: pd.Series, worse: pd.Series, *, higher_is_better: bool, seed: int
) -> bool:
    """``better`` beats ``worse`` by the leaderboard's paired test on the samples both
    scored (p < 0.05, mean advantage > 0); with fewer than 6 shared samples, or none,
    their unpaired CIs must not overlap."""
    sign = 1.0 if higher_is_better else -1.0
    common = better.index.intersection(worse.index)
    if better.index.is_unique and worse.index.is_unique and len(common) >= MIN_PAIRS:
        a, b = (sign * s[common].to_numpy(dtype=np.float64) for s in (better, worse))
        result = paired_test(a, b, seed=seed)
        return bool(result.decided and result.p < ALPHA and result.mean > 0)
    lo_b, hi_b = bootstrap_ci(sign * better.to_numpy(), seed=seed)
    lo_w, hi_w = bootstrap_ci(sign * worse.to_numpy(), seed=seed)
    return lo_b > hi_w


def make_baseline(run: Run) -> dict[str, Any]:
    """The baseline of a finished run: its quality cells and the orderings against random."""
    status = run.manifest.get("status")
    if status != "finished":
        raise UserError(
            f"run {run.root} has status {status!r}, not 'finished'; a baseline must come from "
            "a run whose cells all ran (see its cells.parquet and leaderboard.md)"
        )
    suite = run.suite
    seed = int(suite.get("seed", 0))
    metric_entries = suite.get("metrics", {})
    cells: list[dict[str, Any]] = []
    for key, (state, _) in sorted(run.cells.items()):
        dataset, model, method, metric = key
        if state != "ok" or key not in run.values:
            continue
        opts = metric_entries.get(metric)
        if not isinstance(opts, dict):
            raise UserError(
                f"run {run.root}: metric {metric!r} is not in the manifest's suite; rerun the suite"
            )
        info = run.manifest["metrics"].get(metric) or {}
        if "kind" not in info or "higher_is_better" not in info:
            raise UserError(
                f"run {run.root}: the manifest does not say what metric {metric!r} measures "
                "(its kind and direction); rerun the suite with this version"
            )
        if info["kind"] in UNGATED_KINDS:
            continue
        vals = run.values[key]
        if not vals.index.is_unique:
            raise UserError(
                f"run {run.root}: cell {_name(key)} has repeated sample ids; the gate pairs "
                "samples by id, so the dataset must give every sample its own id"
            )
        lo, hi = bootstrap_ci(vals.to_numpy(), seed=cell_seed(key, seed))
        cells.append(
            {
                "dataset": dataset,
                "model": model,
                "method": method,
                "metric": metric,
                "use": opts.get("use", metric),
                "kind": info["kind"],
                "higher_is_better": bool(info["higher_is_better"]),
                "mean": float(vals.mean()),
                "ci": [lo, hi],
                "n": len(vals),
                "values": {str(i): float(v) for i, v in vals.items()},
            }
        )
    if not cells:
        raise UserError(
            f"run {run.root} has no ok cell of a quality metric (kind other than "
            f"{', '.join(UNGATED_KINDS)}); there is nothing to gate"
        )
    return {
        "format": FORMAT,
        "suite": suite.get("name"),
        "config_hash": config_hash(suite),
        "seed": seed,
        "run_id": run.manifest.get("run_id"),
        "git": run.manifest.get("git"),
        "finished": run.manifest.get("finished"),
        "orderings": _orderings(cells, random_methods(suite), seed),
        "cells": cells,
    }


def _orderings(cells: list[dict[str, Any]], randoms: set[str], seed: int) -> list[dict[str, str]]:
    by_key = {_key(c): c for c in cells}
    out = []
    for (dataset, model, method, metric), cell in by_key.items():
        if method in randoms:
            continue
        for ref in sorted(randoms):
            ref_cell = by_key.get((dataset, model, ref, metric))
            if ref_cell is None:
                continue
            if clearly_better(
                pd.Series(cell["values"]),
                pd.Series(ref_cell["values"]),
                higher_is_better=cell["higher_is_better"],
                seed=cell_seed((dataset, model, method, metric), seed),
            ):
                out.append(
                    {
                        "dataset": dataset,
                        "model": model,
                        "metric": metric,
                        "better": method,
                        "worse": ref,
                    }
                )
    return out


def dumps_baseline(baseline: dict[str, Any]) -> str:
    """JSON with one line per field, and a cell's CI and per-sample values on one line each,
    so a diff of a renewed baseline shows which means moved."""
    inline: dict[str, str] = {}
    cells = []
    for i, cell in enumerate(baseline["cells"]):
        compact = {}
        for name in ("ci", "values"):
            mark = f"@{name}-{i}@"
            inline[json.dumps(mark)] = json.dumps(cell[name])
            compact[name] = mark
        cells.append({**cell, **compact})
    text = json.dumps({**baseline, "cells": cells}, indent=2)
    for mark, value in inline.items():
        text = text.replace(mark, value, 1)
    return text + "\n"


def write_baseline(run_dir: str | Path, path: str | Path) -> dict[str, Any]:
    """Write the baseline of the run in ``run_dir`` to ``path``; returns it."""
    baseline = make_baseline(read_run(run_dir))
    path = Path(path)
    try:
        atomic_write(path, dumps_baseline(baseline))
    except OSError as exc:
        raise UserError(
            f"cannot write baseline {path} ({exc.strerror}); choose another path"
        ) from None
    return baseline


# ---------------------------------------------------------------------------------------
# Checking a run


def check(run: Run, baseline: dict[str, Any], *, min_effect: float = DEFAULT_MIN_EFFECT) -> Report:
    """Every rule of the module docstring, for a run against a baseline (as ``read_run`` and
    ``read_baseline`` give them: their numbers are checked to be finite there)."""
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise UserError(f"--min-effect must be a finite number >= 0, got {min_effect}")
    status = run.manifest.get("status")
    if status not in FINISHED:
        found = "has no 'status'" if status is None else f"has status {_show(status)}"
        raise UserError(
            f"{run.root / 'manifest.json'} {found}, not 'finished' or 'finished with errors': "
            "the run is unfinished, so its cells cannot be gated; rerun the suite (the same "
            "command and --out) to finish it"
        )
    name = run.suite.get("name")
    if baseline["suite"] != name:
        raise UserError(
            f"the baseline is of suite {baseline['suite']!r} but run {run.root} is of suite "
            f"{name!r}; check against the baseline of {name!r} or write one with --write-baseline"
        )
    report = Report()
    current_hash = config_hash(run.suite)
    if baseline.get("config_hash") != current_hash:
        report.notes.append(
            f"suite config differs from the baseline's (hash {current_hash} vs "
            f"{baseline.get('config_hash')}); cells are compared by label"
        )
    seed = int(baseline.get("seed", 0))
    base_cells = {_key(c): c for c in baseline["cells"]}
    usable: set[Key] = set()
    for key, cell in base_cells.items():
        report.cells_checked += 1
        was = f"mean {_f(cell['mean'])}"
        status, reason = run.cells.get(key, ("missing", ""))
        if status == "missing" or (status == "ok" and key not in run.values):
            report.failures.append(
                f"FAIL {_name(key)}: {was} -> missing from the run [rule: missing cell]"
            )
            continue
        if status != "ok":
            why = f" ({reason})" if reason else ""
            report.failures.append(
                f"FAIL {_name(key)}: {was} -> status {status}{why} [rule: cell not ok]"
            )
            continue
        usable.add(key)
        verdict = compare(
            pd.Series(cell["values"], dtype=np.float64),
            run.values[key],
            higher_is_better=bool(cell["higher_is_better"]),
            baseline_ci=tuple(cell["ci"]),
            seed=cell_seed(key, seed),
            min_effect=min_effect,
        )
        if verdict.regressed:
            direction = "higher" if cell["higher_is_better"] else "lower"
            rule = (
                "paired regression" if verdict.paired else "unpaired regression (sample ids differ)"
            )
            report.failures.append(
                f"FAIL {_name(key)}: {was} -> {_f(verdict.mean_current)} ({direction} is better); "
                f"{verdict.describe()} [rule: {rule}]"
            )
        elif verdict.improved:
            report.improved.append(_name(key))
    for order in baseline.get("orderings", []):
        key_better = (order["dataset"], order["model"], order["better"], order["metric"])
        key_worse = (order["dataset"], order["model"], order["worse"], order["metric"])
        if key_better not in usable or key_worse not in usable:
            continue  # not in the baseline, or already failed as a missing or not-ok cell
        report.orderings_checked += 1
        cell = base_cells[key_better]
        sign = 1.0 if cell["higher_is_better"] else -1.0
        better, worse = run.values[key_better].mean(), run.values[key_worse].mean()
        if sign * (better - worse) < 0:
            word = "below" if sign > 0 else "above"
            report.failures.append(
                f"FAIL {_name(key_better)}: {order['better']} {_f(better)} is {word} "
                f"{order['worse']} {_f(worse)} in the run (baseline {_f(cell['mean'])} vs "
                f"{_f(base_cells[key_worse]['mean'])}) [rule: ordering vs {order['worse']} flipped]"
            )
    ungated = sorted(
        k for k, (state, _) in run.cells.items() if state == "ok" and k not in base_cells
    )
    if ungated:
        report.notes.append(
            f"{len(ungated)} ok cell(s) of the run are not in the baseline (cost metrics or new "
            "cells): not gated"
        )
    failed = sorted(
        k for k, (state, _) in run.cells.items() if state == "error" and k not in base_cells
    )
    if failed:
        report.notes.append(
            f"{len(failed)} error cell(s) of the run are not in the baseline "
            f"({', '.join(map(_name, failed))}): not gated; see the run's cells.parquet"
        )
    if report.improved:
        report.notes.append(
            f"{len(report.improved)} cell(s) improved beyond tolerance ({', '.join(report.improved)}); "
            "renew the baseline with --write-baseline to guard the new level"
        )
    return report


def format_report(report: Report, *, baseline_path: str, suite: str) -> str:
    lines = [*report.failures, *(f"note: {n}" for n in report.notes)]
    checked = f"{report.cells_checked} cells and {report.orderings_checked} orderings"
    if report.passed:
        lines.append(f"passed: {checked} within tolerance of {baseline_path} (suite {suite})")
    else:
        lines.append(
            f"FAILED: {len(report.failures)} failure(s) in {checked} checked against "
            f"{baseline_path} (suite {suite})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.regress",
        description="Gate a run on explanation quality against a baseline, or write one. "
        "Exit 0: within tolerance; 1: regressed; 2: bad input. The rules are in the "
        "module docstring (python -c 'import benchmarks.reports.regress as r; help(r)').",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run folder (the --out of python -m benchmarks.run)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--baseline", metavar="FILE", help="check the run against this baseline")
    mode.add_argument(
        "--write-baseline", metavar="FILE", help="write a baseline from the run to this file"
    )
    p.add_argument(
        "--min-effect",
        type=float,
        default=DEFAULT_MIN_EFFECT,
        help="a consistent drop must exceed this times the baseline CI half-width to fail "
        f"(default: {DEFAULT_MIN_EFFECT})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.write_baseline:
            baseline = write_baseline(args.run, args.write_baseline)
            print(
                f"wrote {args.write_baseline}: suite {baseline['suite']}, "
                f"{len(baseline['cells'])} cells, {len(baseline['orderings'])} orderings"
            )
            return 0
        baseline = read_baseline(args.baseline)
        run = read_run(args.run)
        report = check(run, baseline, min_effect=args.min_effect)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    print(format_report(report, baseline_path=args.baseline, suite=baseline["suite"]))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
