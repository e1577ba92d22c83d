"""The regression gate fails closed: a run or a baseline it cannot trust (a non-finite
number, an unfinished run, a malformed baseline) exits 2 with one ``error:`` line naming
the file, the input and the fix, and leaves every file as it was; a regression still
exits 1 and a clean run 0. Runs are the synthetic run folders of ``test_regress``."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_regress import DATA, IDS, NET, N, key, toy_values, write_run

from cambench.benchmarks.reports import regress
from cambench.benchmarks.reports.leaderboard import aggregate

pytestmark = pytest.mark.harness

CAM = f"{DATA}/{NET}/cam/aopc_morf"


@pytest.fixture
def base(tmp_path, capsys) -> Path:
    """A baseline written from the toy run (its first cell is cam/aopc_morf)."""
    path = tmp_path / "baseline.json"
    run = write_run(tmp_path / "base", toy_values())
    assert regress.main([str(run), "--write-baseline", str(path)]) == 0
    capsys.readouterr()
    assert regress._key(json.loads(path.read_text())["cells"][0]) == key("cam")
    return path


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under (or at) each path."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def gate(capsys, run: Path, baseline: Path, code: int) -> tuple[list[str], str]:
    """Run the gate; assert its exit status and that it left the run and the baseline as
    they were; stdout lines and stderr."""
    before = digests(run, baseline)
    assert before  # the run folder and the baseline are there to compare
    got = regress.main([str(run), "--baseline", str(baseline)])
    out, err = capsys.readouterr()
    assert got == code, (out, err)
    assert digests(run, baseline) == before
    assert "Traceback" not in out + err
    return out.strip().splitlines(), err


def bad_input(capsys, run: Path, baseline: Path, *names: str) -> str:
    """Exit 2, nothing on stdout, one ``error:`` line on stderr naming each of ``names``."""
    out, err = gate(capsys, run, baseline, 2)
    assert not out
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


def rewrite(path: Path, change) -> Path:
    """Apply ``change`` to the baseline's JSON and write it back (NaN as JSON writes it)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))
    return path


# ---------------------------------------------------------------------------------------
# The run


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_run_value_exits_2(tmp_path, base, capsys, bad):
    values = toy_values()
    values[key("cam")] = values[key("cam")].copy()
    values[key("cam")].iloc[3] = bad
    run = write_run(tmp_path / "run", values)
    err = bad_input(capsys, run, base, str(run / "rows.parquet"), CAM, "'s3'", str(bad))
    assert "not a finite number" in err and "rerun" in err


def test_nan_leaderboard_mean_exits_2(tmp_path, base, capsys):
    run = write_run(tmp_path / "run", toy_values())
    rows, cells = (pd.read_parquet(run / f"{name}.parquet") for name in ("rows", "cells"))
    board = aggregate(rows, cells, {"aopc_morf": True, "deletion": False, "time": False})
    gate(capsys, run, base, 0)  # a leaderboard of finite numbers passes
    board.loc[board["method"] == "gradcam", "mean"] = np.nan
    board.to_parquet(run / "leaderboard.parquet", index=False)
    err = bad_input(capsys, run, base, str(run / "leaderboard.parquet"), "/gradcam/", "mean nan")
    assert "rerun" in err


@pytest.mark.parametrize(
    "status", ["running", "stopped: interrupted", "interrupted", "", "FINISHED", None]
)
def test_unfinished_run_exits_2(tmp_path, base, capsys, status):
    run = write_run(tmp_path / "run", toy_values(), status=status)
    if status is None:  # no status in the manifest at all
        manifest = json.loads((run / "manifest.json").read_text())
        del manifest["status"]
        (run / "manifest.json").write_text(json.dumps(manifest))
    found = "has no 'status'" if status is None else f"has status {status!r}"
    err = bad_input(capsys, run, base, str(run / "manifest.json"), found)
    assert "rerun the suite" in err and "to finish it" in err


# ---------------------------------------------------------------------------------------
# The baseline


def _set(field, value):
    def change(data):
        data["cells"][0][field] = value

    return change


def _set_value(value):
    def change(data):
        data["cells"][0]["values"]["s3"] = value

    return change


NON_FINITE = {
    "nan per-sample value": (_set_value(math.nan), "'values'['s3'] is nan"),
    "inf per-sample value": (_set_value(math.inf), "'values'['s3'] is inf"),
    "nan mean": (_set("mean", math.nan), "'mean' is nan"),
    "inf ci bound": (_set("ci", [0.0, math.inf]), "'ci'[1] is inf"),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_baseline_number_exits_2(tmp_path, base, capsys, case):
    change, words = NON_FINITE[case]
    run = write_run(tmp_path / "run", toy_values())
    err = bad_input(capsys, run, rewrite(base, change), str(base), f"cells[0] ({CAM})", words)
    assert "not a finite number" in err and "--write-baseline" in err


NON_NUMERIC = {
    "string mean": (_set("mean", "0.5"), "'mean' is '0.5', not a finite number"),
    "string per-sample value": (_set_value("high"), "'values'['s3'] is 'high'"),
    "bool mean": (_set("mean", True), "'mean' is True, not a finite number"),
    "null ci bound": (_set("ci", [None, 1.0]), "'ci'[0] is None"),
    "ci of three": (_set("ci", [0.0, 1.0, 2.0]), "not a list [low, high]"),
    "reversed ci": (_set("ci", [2.0, 1.0]), "'ci' [2.0, 1.0] is reversed"),
    "values as a list": (_set("values", [1.0, 2.0]), "'values' is [1.0, 2.0]"),
    "empty values": (_set("values", {}), "'values' is {}"),
    "direction as text": (_set("higher_is_better", "yes"), "'higher_is_better' is 'yes'"),
    "label as a number": (_set("method", 3), "cells[0] 'method' is 3, not a label"),
    "seed as text": (lambda d: d.update(seed="zero"), "'seed' is 'zero', not an integer"),
    "cells as an object": (lambda d: d.update(cells={}), "'cells' is {}"),
    "a cell listed twice": (lambda d: d["cells"].append(d["cells"][0]), "repeats a cell"),
}


@pytest.mark.parametrize("case", list(NON_NUMERIC))
def test_malformed_baseline_value_exits_2(tmp_path, base, capsys, case):
    change, words = NON_NUMERIC[case]
    run = write_run(tmp_path / "run", toy_values())
    err = bad_input(capsys, run, rewrite(base, change), str(base), words)
    assert f"--write-baseline {base}" in err


def _drop_ordering_field(data):
    del data["orderings"][0]["worse"]


MISSING = {
    **{
        f"cell {name}": (lambda d, n=name: d["cells"][0].pop(n), f"has no {name!r}")
        for name in regress.CELL_FIELDS
    },
    "suite": (lambda d: d.pop("suite"), "'suite' is None"),
    "cells": (lambda d: d.pop("cells"), "'cells' is None"),
    "ordering worse": (_drop_ordering_field, "orderings[0] has no 'worse'"),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_baseline_missing_field_exits_2(tmp_path, base, capsys, case):
    change, words = MISSING[case]
    run = write_run(tmp_path / "run", toy_values())
    err = bad_input(capsys, run, rewrite(base, change), str(base), words)
    assert f"--write-baseline {base}" in err


# ---------------------------------------------------------------------------------------
# What still passes and fails


def test_clean_run_passes_and_regression_exits_1(tmp_path, base, capsys):
    out, err = gate(capsys, write_run(tmp_path / "same", toy_values()), base, 0)
    assert not err and out[-1].startswith("passed: 8 cells and 4 orderings")
    values = toy_values()
    perm = np.random.default_rng(1).permutation(N)
    values[key("gradcam")] = pd.Series(values[key("noise")].to_numpy()[perm], index=IDS)
    out, err = gate(capsys, write_run(tmp_path / "bad", values), base, 1)
    assert not err and out[-1].startswith("FAILED:")
    assert any(line.startswith(f"FAIL {DATA}/{NET}/gradcam/aopc_morf:") for line in out), out


def test_finished_with_errors_fails_on_a_baseline_cell_and_notes_the_others(tmp_path, base, capsys):
    """An error cell the baseline covers is a regression (exit 1); one it does not cover
    (a cost metric) is not gated, but named in a note."""
    values = toy_values()
    del values[key("cam")]
    run = write_run(
        tmp_path / "errors",
        values,
        statuses={key("cam"): ("error", "RuntimeError: boom")},
        status="finished with errors",
    )
    out, err = gate(capsys, run, base, 1)
    assert not err
    assert [line for line in out if line.startswith("FAIL ")] == [
        f"FAIL {CAM}: mean {regress._f(json.loads(base.read_text())['cells'][0]['mean'])} -> "
        "status error (RuntimeError: boom) [rule: cell not ok]"
    ]
    values = toy_values()
    del values[key("cam", "time")]
    run = write_run(
        tmp_path / "cost-error",
        values,
        statuses={key("cam", "time"): ("error", "RuntimeError: boom")},
        status="finished with errors",
    )
    out, err = gate(capsys, run, base, 0)
    assert not err
    assert f"note: 1 error cell(s) of the run are not in the baseline ({DATA}/{NET}/cam/time)" in (
        "\n".join(out)
    )
