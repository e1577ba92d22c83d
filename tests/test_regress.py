"""The regression gate: synthetic run folders with hand-made per-sample values test each
rule against its closed form; two end-to-end tests run the smoke suite for real (same seed
passes, a method whose maps are shuffled fails)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cambench.benchmarks.engine.suite import SUITES_DIR
from cambench.benchmarks.reports import regress
from cambench.benchmarks.reports.leaderboard import aggregate
from cambench.benchmarks.run import main as run_main
from cambench.cams import METHODS, Explanation

pytestmark = pytest.mark.harness

DATA, NET = "toy-data", "toy-net"
N = 40
IDS = [f"s{i}" for i in range(N)]
SUITE = {
    "name": "toy",
    "seed": 0,
    "methods": {
        "cam": {"use": "cam"},
        "gradcam": {"use": "gradcam"},
        "tie": {"use": "layercam"},
        "noise": {"use": "random"},  # a random baseline under another label
    },
    "metrics": {
        "aopc_morf": {"use": "aopc_morf"},  # faithfulness, higher is better
        "deletion": {"use": "deletion"},  # faithfulness, lower is better
        "time": {"use": "time"},  # cost: never gated
    },
}


def key(method, metric="aopc_morf"):
    return (DATA, NET, method, metric)


def toy_values() -> dict[tuple, pd.Series]:
    """cam and gradcam clearly beat the random baseline "noise" (by 3 and 0.5 per sample,
    plus noise); "tie" beats it by 0.02 on average, well inside the noise (sd 0.2 per
    sample, so the paired CI is about +-0.06)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 1.0, N)
    jitter = rng.normal(0.0, 0.2, N)
    values = {
        "noise": noise,
        "cam": noise + 3.0 + rng.normal(0.0, 0.2, N),
        "gradcam": noise + 0.5 + rng.normal(0.0, 0.2, N),
        "tie": noise + 0.02 + (jitter - jitter.mean()),
    }
    out = {}
    for method, v in values.items():
        out[key(method)] = pd.Series(v, index=IDS)
        out[key(method, "deletion")] = pd.Series(-v, index=IDS)  # lower is better
        out[key(method, "time")] = pd.Series(rng.uniform(0.01, 0.02, N), index=IDS)
    return out


def write_run(
    root: Path,
    values: dict[tuple, pd.Series],
    *,
    statuses: dict[tuple, tuple[str, str]] | None = None,
    suite: dict | None = None,
    status: str = "finished",
) -> Path:
    """A run folder as benchmarks.run writes it: rows, cells and manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rows, cells = [], []
    for (dataset, model, method, metric), series in values.items():
        base = dict(model=model, dataset=dataset, method=method, metric=metric)
        for output, vals in (("value", series.to_numpy()), ("extra", series.to_numpy() + 100)):
            rows.append(
                pd.DataFrame(
                    {
                        **base,
                        "output": output,
                        "sample_id": list(series.index),
                        "label": 0,
                        "target": 0,
                        "correct": True,
                        "value": vals,
                    }
                )
            )
        cells.append({**base, "status": "ok", "reason": "", "n": len(series), "n_excluded": 0})
    for cell_key, (state, reason) in (statuses or {}).items():
        dataset, model, method, metric = cell_key
        cells = [
            c for c in cells if (c["dataset"], c["model"], c["method"], c["metric"]) != cell_key
        ]
        cells.append(
            dict(
                model=model,
                dataset=dataset,
                method=method,
                metric=metric,
                status=state,
                reason=reason,
                n=0,
                n_excluded=0,
            )
        )
    pd.concat(rows, ignore_index=True).to_parquet(root / "rows.parquet", index=False)
    pd.DataFrame(cells).to_parquet(root / "cells.parquet", index=False)
    manifest = {"run_id": root.name, "suite": suite or SUITE, "status": status, "git": "abc"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def gate(capsys, *args) -> tuple[int, list[str], str]:
    """Exit status, stdout lines and stderr of ``python -m benchmarks.regress ARGS``."""
    code = regress.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def fails(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL ")]


@pytest.fixture
def baseline(tmp_path, capsys) -> Path:
    path = tmp_path / "baseline.json"
    run = write_run(tmp_path / "base", toy_values())
    code, out, _ = gate(capsys, run, "--write-baseline", path)
    assert code == 0, out
    return path


def half_widths(path: Path) -> dict[tuple, float]:
    data = json.loads(path.read_text())
    return {regress._key(c): (c["ci"][1] - c["ci"][0]) / 2 for c in data["cells"]}


# ---------------------------------------------------------------------------------------
# The baseline file


def test_baseline_holds_quality_cells_values_and_clear_orderings(tmp_path, baseline):
    data = json.loads(baseline.read_text())
    values = toy_values()
    assert data["format"] == regress.FORMAT and data["suite"] == "toy"
    keys = {regress._key(c) for c in data["cells"]}
    assert keys == {k for k in values if k[3] != "time"}  # cost cells are not gated
    # mean and CI as the leaderboard computes them from the same rows (another code path)
    rows = pd.read_parquet(tmp_path / "base" / "rows.parquet")
    cells = pd.read_parquet(tmp_path / "base" / "cells.parquet")
    board = aggregate(rows, cells, {"aopc_morf": True, "deletion": False, "time": False})
    board = board.set_index(["dataset", "model", "method", "metric"])
    for cell in data["cells"]:
        k = regress._key(cell)
        assert cell["values"] == {i: float(v) for i, v in values[k].items()}
        assert cell["n"] == N and cell["mean"] == pytest.approx(values[k].mean())
        assert cell["ci"] == pytest.approx([board.loc[k, "ci_low"], board.loc[k, "ci_high"]])
        assert cell["higher_is_better"] == (k[3] == "aopc_morf")
    # cam and gradcam clearly beat the random baseline (labelled "noise"); "tie" does not
    orderings = {(o["metric"], o["better"], o["worse"]) for o in data["orderings"]}
    assert orderings == {
        (metric, method, "noise")
        for metric in ("aopc_morf", "deletion")
        for method in ("cam", "gradcam")
    }


def test_baseline_is_deterministic(tmp_path, baseline, capsys):
    again = tmp_path / "again.json"
    assert gate(capsys, tmp_path / "base", "--write-baseline", again)[0] == 0
    assert again.read_bytes() == baseline.read_bytes()


# ---------------------------------------------------------------------------------------
# The rules


def test_identical_run_passes(tmp_path, baseline, capsys):
    run = write_run(tmp_path / "same", toy_values())
    code, out, _ = gate(capsys, run, "--baseline", baseline)
    assert code == 0 and not fails(out)
    assert out[-1].startswith("passed: 8 cells and 4 orderings")


def test_planted_regression_fails_naming_the_cell(tmp_path, baseline, capsys):
    """gradcam's per-sample scores become random's, shuffled over samples: its mean falls to
    random's level, which is what shuffling a method's maps does to its AOPC."""
    values = toy_values()
    perm = np.random.default_rng(1).permutation(N)
    values[key("gradcam")] = pd.Series(values[key("noise")].to_numpy()[perm], index=IDS)
    code, out, _ = gate(capsys, write_run(tmp_path / "bad", values), "--baseline", baseline)
    assert code == 1
    failed = fails(out)
    assert any(
        line.startswith(f"FAIL {DATA}/{NET}/gradcam/aopc_morf:") and "paired regression" in line
        for line in failed
    ), out
    assert all("/gradcam/aopc_morf" in line for line in failed), out  # nothing else is named
    assert out[-1].startswith(f"FAILED: {len(failed)} failure(s)")


def test_consistent_change_fails_only_above_min_effect(tmp_path, baseline, capsys):
    """A drop the same on every sample has a paired CI of zero width, entirely on the bad
    side: it fails exactly when it exceeds min-effect (0.25) x the baseline CI half-width."""
    hw = half_widths(baseline)
    for factor, expected in ((0.1, 0), (0.2, 0), (0.3, 1), (0.5, 1)):
        values = toy_values()
        values[key("cam")] = values[key("cam")] - factor * hw[key("cam")]
        run = write_run(tmp_path / f"drop-{factor}", values)
        code, out, _ = gate(capsys, run, "--baseline", baseline)
        assert code == expected, (factor, out)
        if expected:
            assert fails(out)[0].startswith(f"FAIL {DATA}/{NET}/cam/aopc_morf:")
    # a larger --min-effect lets the 0.5 x half-width drop through
    code, out, _ = gate(capsys, tmp_path / "drop-0.5", "--baseline", baseline, "--min-effect", 0.6)
    assert code == 0, out


def test_float_noise_passes_even_when_the_baseline_ci_has_zero_width(tmp_path, capsys):
    values = toy_values()
    values[key("cam")] = pd.Series(np.ones(N), index=IDS)  # constant: CI [1, 1]
    path = tmp_path / "b.json"
    assert gate(capsys, write_run(tmp_path / "base", values), "--write-baseline", path)[0] == 0
    values[key("cam")] = pd.Series(np.ones(N) - 1e-12, index=IDS)
    assert gate(capsys, write_run(tmp_path / "noise", values), "--baseline", path)[0] == 0
    values[key("cam")] = pd.Series(np.ones(N) - 0.01, index=IDS)
    assert gate(capsys, write_run(tmp_path / "drop", values), "--baseline", path)[0] == 1


def test_direction_lower_is_better(tmp_path, baseline, capsys):
    values = toy_values()
    values[key("cam", "deletion")] = values[key("cam", "deletion")] - 2.0  # better
    code, out, _ = gate(capsys, write_run(tmp_path / "better", values), "--baseline", baseline)
    assert code == 0 and any(line.startswith("note: 1 cell(s) improved") for line in out), out
    values = toy_values()
    values[key("cam", "deletion")] = values[key("cam", "deletion")] + 2.0  # worse
    code, out, _ = gate(capsys, write_run(tmp_path / "worse", values), "--baseline", baseline)
    assert code == 1
    assert [line.split(":")[0] for line in fails(out)] == [f"FAIL {DATA}/{NET}/cam/deletion"]


def test_unpaired_when_sample_ids_differ(tmp_path, baseline, capsys):
    """Other sample ids: the means are compared. Shifting every value by c leaves the CI's
    width as it was (same bootstrap draws), so the tolerance is sqrt(2) x the half-width."""
    hw = half_widths(baseline)[key("gradcam")]
    for factor, expected in ((1.3, 0), (1.5, 1)):
        values = toy_values()
        shifted = values[key("gradcam")] - factor * hw
        values[key("gradcam")] = pd.Series(shifted.to_numpy(), index=[f"t{i}" for i in IDS])
        run = write_run(tmp_path / f"ids-{factor}", values)
        code, out, _ = gate(capsys, run, "--baseline", baseline)
        assert code == expected, (factor, out)
        if expected:
            assert "unpaired regression" in fails(out)[0] and "/gradcam/aopc_morf" in fails(out)[0]


def test_cost_cells_are_not_gated(tmp_path, baseline, capsys):
    values = toy_values()
    for method in ("cam", "gradcam", "tie", "noise"):
        values[key(method, "time")] = values[key(method, "time")] * 10
    code, out, _ = gate(capsys, write_run(tmp_path / "slow", values), "--baseline", baseline)
    assert code == 0, out


def test_ordering_flip_fails(tmp_path, baseline, capsys):
    """The random baseline improves by 1 per sample: above gradcam (+0.5), which beat it
    clearly in the baseline, below cam (+3); above "tie", which was never held to beat it."""
    values = toy_values()
    values[key("noise")] = values[key("noise")] + 1.0
    code, out, _ = gate(capsys, write_run(tmp_path / "flip", values), "--baseline", baseline)
    assert code == 1
    assert len(fails(out)) == 1, out
    line = fails(out)[0]
    assert line.startswith(f"FAIL {DATA}/{NET}/gradcam/aopc_morf:")
    assert "ordering vs noise flipped" in line


def test_missing_and_failed_cells_fail(tmp_path, baseline, capsys):
    values = toy_values()
    del values[key("gradcam")]
    del values[key("cam")]
    run = write_run(
        tmp_path / "gaps", values, statuses={key("cam"): ("error", "RuntimeError: boom")}
    )
    code, out, _ = gate(capsys, run, "--baseline", baseline)
    assert code == 1
    assert sorted(fails(out)) == [
        f"FAIL {DATA}/{NET}/cam/aopc_morf: mean {json_mean(baseline, key('cam'))} -> status error "
        "(RuntimeError: boom) [rule: cell not ok]",
        f"FAIL {DATA}/{NET}/gradcam/aopc_morf: mean {json_mean(baseline, key('gradcam'))} -> "
        "missing from the run [rule: missing cell]",
    ]


def json_mean(path: Path, k: tuple) -> str:
    cell = next(c for c in json.loads(path.read_text())["cells"] if regress._key(c) == k)
    return f"{cell['mean']:.4g}"


# ---------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no traceback


def _not_json(tmp_path, run, baseline):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    return [run, "--baseline", bad], "not valid JSON"


def _not_a_baseline(tmp_path, run, baseline):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"cells": []}))
    return [run, "--baseline", bad], "is not a regression baseline"


def _other_suite(tmp_path, run, baseline):
    other = write_run(tmp_path / "other-suite", toy_values(), suite={**SUITE, "name": "medical"})
    return [other, "--baseline", baseline], "suite 'toy' but run"


def _no_rows(tmp_path, run, baseline):
    (run / "rows.parquet").unlink()
    return [run, "--baseline", baseline], "has no rows.parquet"


def _failed_run(tmp_path, run, baseline):
    failed = write_run(tmp_path / "failed", toy_values(), status="finished with errors")
    return [failed, "--write-baseline", tmp_path / "x.json"], "not 'finished'"


BAD_INPUTS = {
    "missing run folder": lambda t, r, b: ([t / "nowhere", "--baseline", b], "does not exist"),
    "missing baseline": lambda t, r, b: ([r, "--baseline", t / "none.json"], "does not exist"),
    "baseline not json": _not_json,
    "not a baseline": _not_a_baseline,
    "baseline of another suite": _other_suite,
    "run without rows": _no_rows,
    "negative min effect": lambda t, r, b: ([r, "--baseline", b, "--min-effect", -1], ">= 0"),
    "baseline from a failed run": _failed_run,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path, baseline, capsys, case):
    run = write_run(tmp_path / "run", toy_values())
    args, words = BAD_INPUTS[case](tmp_path, run, baseline)
    code, out, err = gate(capsys, *args)
    assert code == 2 and not out
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


# ---------------------------------------------------------------------------------------
# End to end on the smoke suite

SHUFFLED = "test-shuffled-gradcam"
# The runs skip the smoke suite's cost metric (time): the gate never reads it, and timing
# every method is half a run. The cost exclusion is tested on synthetic runs above.
QUALITY = ["--metrics", "aopc_morf", "pointing_game", "energy_pointing_game"]


def shuffled_gradcam(model, x, target, *, layer=None):
    """Grad-CAM's maps with each map's pixels shuffled: a planted regression."""
    maps = METHODS.get("gradcam").obj(model, x, target, layer=layer).maps
    flat = maps.reshape(len(maps), -1)
    gen = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(flat.shape[1], generator=gen) for _ in flat])
    return Explanation(maps=flat.gather(1, order.to(flat.device)).reshape(maps.shape))


@pytest.fixture
def shuffled_method():
    """Register the shuffled method for one test, and remove it afterwards."""
    METHODS.add(SHUFFLED, shuffled_gradcam, **dataclasses.asdict(METHODS.get("gradcam").info))
    yield SHUFFLED
    METHODS.remove(SHUFFLED)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke suite run once (its quality metrics), and the baseline written from it."""
    root = tmp_path_factory.mktemp("smoke")
    cache = str(root / "cache")
    args = ["--suite", "smoke", "--out", str(root / "base"), "--cache", cache, "--no-progress"]
    args += QUALITY
    assert run_main(args) == 0
    assert regress.main([str(root / "base"), "--write-baseline", str(root / "base.json")]) == 0
    return root, cache


@pytest.mark.slow
def test_smoke_rerun_with_the_same_seed_passes(smoke, capsys):
    root, cache = smoke
    data = json.loads((root / "base.json").read_text())
    board = pd.read_csv(root / "base" / "leaderboard.csv").set_index(["method", "metric"])
    assert len(data["cells"]) == len(board) == 9
    for cell in data["cells"]:  # the leaderboard's numbers, printed to 4 significant digits
        row = board.loc[(cell["method"], cell["metric"])]
        expected = [row["mean"], row["ci_low"], row["ci_high"]]
        assert [cell["mean"], *cell["ci"]] == pytest.approx(expected, rel=1e-3, abs=1e-12)
    # cam and gradcam beat random clearly on AOPC in the smoke suite
    assert {(o["better"], o["metric"]) for o in data["orderings"]} >= {
        ("cam", "aopc_morf"),
        ("gradcam", "aopc_morf"),
    }
    out = root / "again"
    args = ["--suite", "smoke", "--out", str(out), "--cache", cache, "--no-progress", *QUALITY]
    assert run_main(args) == 0
    # the premise: the same seed gives the same numbers
    before, after = (pd.read_parquet(r / "rows.parquet") for r in (root / "base", out))
    pd.testing.assert_frame_equal(before, after)
    capsys.readouterr()
    code, lines, _ = gate(capsys, out, "--baseline", root / "base.json")
    assert code == 0 and lines == [
        f"passed: 9 cells and {len(data['orderings'])} orderings "
        f"within tolerance of {root / 'base.json'} (suite smoke)"
    ], lines


@pytest.mark.slow
def test_smoke_with_shuffled_gradcam_maps_fails(smoke, shuffled_method, tmp_path, capsys):
    root, cache = smoke
    suite = tmp_path / "planted.toml"
    suite.write_text(
        f'include = ["{SUITES_DIR / "smoke.toml"}"]\n[methods.gradcam]\nuse = "{shuffled_method}"\n'
    )
    out = tmp_path / "planted"
    args = ["--suite", str(suite), "--out", str(out), "--cache", cache, "--no-progress", *QUALITY]
    assert run_main(args) == 0
    capsys.readouterr()
    code, lines, _ = gate(capsys, out, "--baseline", root / "base.json")
    assert code == 1, lines
    failed = fails(lines)
    assert any(line.startswith("FAIL synth-lesion/gapcnn/gradcam/aopc_morf:") for line in failed)
    assert all("/gradcam/" in line for line in failed), lines  # cam and random are untouched
