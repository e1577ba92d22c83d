"""``python -m benchmarks.regress``: the CI regression gate on explanation quality.

Write a baseline from a good run, then check later runs of the same suite against it::

    python -m benchmarks.run --suite smoke --out results/smoke-base --no-progress
    python -m benchmarks.regress results/smoke-base --write-baseline benchmarks/baselines/smoke.json

    python -m benchmarks.run --suite smoke --out results/ci --no-progress
    python -m benchmarks.regress results/ci --baseline benchmarks/baselines/smoke.json

The check prints one line per failure, naming dataset/model/method/metric, the baseline
and current numbers and the rule, then a summary line. Exit status: 0 when the run is
within tolerance, 1 when it regressed, 2 for bad input (a missing run folder, an
unreadable baseline, a baseline of another suite): one ``error: ...`` line.

The baseline (JSON, small, meant to be committed and read in review) holds the suite
name and config hash, and per quality cell (every metric whose kind is not ``cost``:
time and memory depend on the machine) its mean, 95% percentile-bootstrap CI, n,
direction and the per-sample primary values keyed by sample id, plus the expected
orderings against the random baseline.

Rules, per baseline cell (dataset, model, method, metric):

- missing from the run, or its status is not ``ok`` -> failure.
- same sample ids as the baseline -> paired test. Per sample, the drop is baseline -
  current in the metric's good direction. The cell regressed when the 95% CI of the mean
  drop (percentile bootstrap, seeded by the cell, so deterministic) lies entirely above 0
  AND the mean drop exceeds ``--min-effect`` (default 0.25) times the half-width of the
  baseline's CI: a consistent but negligible change (a float rounding, a library
  update) passes. Drops below 1e-9 x max(1, |baseline mean|) never count, so a cell whose
  baseline CI has zero width is not failed by float noise either.
- other sample ids (a changed ``max_images``, a sample the metric now excludes) ->
  unpaired test: regressed when the drop of the means exceeds
  sqrt(hw_b^2 + hw_c^2) (= 1.96 sqrt(se_b^2 + se_c^2), se = CI half-width / 1.96), and the
  min-effect floor above.

Identical values always pass (every drop is 0). A cell that improves beyond the same
tolerance is not a failure; the summary counts such cells so the baseline can be renewed.

Orderings: in each (dataset, model, metric) with a random baseline method (labelled
``random`` or using the registry's ``random``), every method that clearly beat it in the
baseline run (the paired 95% CI of its advantage lies entirely above 0) must not fall
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

from benchmarks.core.errors import UserError
from benchmarks.core.files import atomic_write
from benchmarks.engine.store import read_run as read_stored_run
from benchmarks.reports.leaderboard import KEYS, bootstrap_ci

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
    ci: the 95% CI of the mean per-sample drop (paired) or None (unpaired);
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

    def describe(self) -> str:
        if self.paired:
            lo, hi = self.ci
            return (
                f"paired mean drop {_f(self.drop)}, 95% CI [{_f(lo)}, {_f(hi)}], "
                f"tolerance {_f(self.tolerance)}"
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

    >>> b = pd.Series([1.0, 2.0, 3.0, 4.0], index=["a", "b", "c", "d"])
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
    if paired:
        cur = current.reindex(baseline.index).to_numpy(dtype=np.float64)
        loss = sign * (base - cur)
        lo, hi = bootstrap_ci(loss, seed=seed)
        drop = float(loss.mean())
        return Verdict(
            paired=True,
            mean_baseline=mean_b,
            mean_current=mean_c,
            drop=drop,
            ci=(lo, hi),
            tolerance=floor,
            regressed=lo > 0 and drop > floor,
            improved=hi < 0 and -drop > floor,
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
    """The manifest, primary per-sample values and cell statuses of a run folder."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"run folder {root} does not exist; give the --out folder of a run")
    missing = [name for name in RUN_FILES if not (root / name).is_file()]
    if missing:
        raise UserError(
            f"run folder {root} has no {', '.join(missing)}; it is not a finished run "
            "(rerun `python -m benchmarks.run` with --out there to complete it)"
        )
    stored = read_stored_run(root)
    if not stored.manifest.suite:
        raise UserError(f"{root / 'manifest.json'} has no resolved 'suite'; rerun the suite")
    try:
        rows = stored.rows[[*KEYS, "output", "sample_id", "value"]]
        cells = stored.cells[[*KEYS, "status", "reason"]]
    except KeyError as exc:
        raise UserError(f"run folder {root} cannot be read ({_one_line(exc)})") from None
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
    manifest = dataclasses.asdict(stored.manifest)
    return Run(root=root, manifest=manifest, values=values, cells=statuses)


def _key(cell: dict[str, Any]) -> Key:
    return (str(cell["dataset"]), str(cell["model"]), str(cell["method"]), str(cell["metric"]))


def _one_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


CELL_FIELDS = ("dataset", "model", "method", "metric", "higher_is_better", "mean", "ci", "values")


def read_baseline(path: str | Path) -> dict[str, Any]:
    """A baseline file, checked to be one."""
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
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a regression baseline (format {FORMAT!r}); {fix}")
    cells = data.get("cells")
    if not isinstance(cells, list) or not all(
        isinstance(c, dict)
        and all(k in c for k in CELL_FIELDS)
        and isinstance(c["values"], dict)
        and isinstance(c["ci"], list)
        and len(c["ci"]) == 2
        for c in cells
    ):
        raise UserError(f"baseline {path}: 'cells' must list cells with {', '.join(CELL_FIELDS)}")
    if not isinstance(data.get("orderings", []), list) or not isinstance(data.get("suite"), str):
        raise UserError(f"baseline {path}: needs 'suite' (a name) and 'orderings' (a list)")
    return data


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
    """The paired 95% CI of ``better``'s advantage over ``worse`` lies entirely above 0
    (on the samples both scored; unpaired CIs must not overlap when none are shared)."""
    sign = 1.0 if higher_is_better else -1.0
    common = better.index.intersection(worse.index)
    if better.index.is_unique and worse.index.is_unique and len(common):
        gain = sign * (better[common].to_numpy() - worse[common].to_numpy())
        return bootstrap_ci(gain, seed=seed)[0] > 0
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
    """Every rule of the module docstring, for a run against a baseline."""
    if min_effect < 0:
        raise UserError(f"--min-effect must be >= 0, got {min_effect}")
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, baseline_path=args.baseline, suite=baseline["suite"]))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
