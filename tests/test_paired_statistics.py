"""The leaderboard's paired statistics against independent oracles, and on planted methods.

- The paired test: Wilcoxon's p equals scipy's exact signed-rank test; the sign-flip
  permutation p equals a brute-force enumeration of every sign pattern written here.
- Holm's adjustment equals the step-down formula written here and statsmodels'.
- The power line's detectable effect is the paired t-test's, checked by simulation.
- End to end: a planted method that is the clean CAM map plus small noise is better than
  random and in the best group; a planted second random map (``use = "random"`` under
  another label) is not distinguishable from random; the findings say both.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from cambench.benchmarks.reports.stats import (
    MIN_PAIRS,
    compare_methods,
    detectable_effect,
    holm,
    paired_test,
)
from cambench.benchmarks.run import main
from cambench.cams import METHODS
from cambench.cams.base import Explanation

pytestmark = pytest.mark.harness


def test_wilcoxon_p_equals_scipys_exact_signed_rank_test():
    rng = np.random.default_rng(1)
    a = rng.normal(size=20)
    b = a - rng.normal(0.4, 1.0, size=20)
    result = paired_test(a, b, seed=0)
    assert result.test == "wilcoxon"
    assert result.p == pytest.approx(sps.wilcoxon(a - b, method="exact").pvalue, rel=1e-12)
    assert result.median == pytest.approx(np.median(a - b))


def brute_force_sign_flip(d: np.ndarray) -> float:
    """Two-sided p: the share of all 2^n sign patterns whose |mean| is at least the
    observed one."""
    observed = abs(d.mean())
    means = [abs((d * s).mean()) for s in itertools.product([-1, 1], repeat=len(d))]
    return float(np.mean(np.array(means) >= observed - 1e-12))


@pytest.mark.parametrize(
    "d",
    [
        np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 1.0, 1.0]),  # a 0/1 hit metric
        np.array([0.2, 0.2, 0.5, -0.1, 0.3, 0.2, 0.0, 0.4]),  # ties and a zero
    ],
)
def test_sign_flip_p_equals_a_brute_force_enumeration(d):
    result = paired_test(d, np.zeros_like(d), seed=0)
    assert result.test == "sign-flip permutation"
    assert result.p == pytest.approx(brute_force_sign_flip(d), abs=1e-12)


def test_too_few_pairs_and_identical_maps_are_said_not_tested():
    a = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    assert paired_test(a, a - 1, seed=0).p is None and MIN_PAIRS == 6
    a = np.linspace(0, 1, 10)
    same = paired_test(a, a * (1 + 1e-13), seed=0)  # equal up to float rounding: a tie
    assert (same.test, same.p, same.median) == ("identical", 1.0, 0.0)


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm's step-down: the i-th smallest p times (m - i), made monotone, capped at 1."""
    m, order = len(p), np.argsort(p)
    adjusted, running = np.empty(m), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def test_holm_equals_the_step_down_formula_and_statsmodels():
    p = [0.01, 0.04, 0.03, 0.005, 0.5, 0.2]
    ours = holm([*p, None])
    assert ours[-1] is None
    assert ours[:-1] == pytest.approx(holm_by_hand(p), abs=1e-15)
    assert ours[:-1] == pytest.approx(multipletests(p, method="holm")[1], abs=1e-15)


def test_the_detectable_effect_has_80_percent_power_by_simulation():
    n = 32
    effect = detectable_effect(n)
    rng = np.random.default_rng(0)
    d = rng.normal(effect, 1.0, size=(4000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
    power = np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1))
    assert power == pytest.approx(0.8, abs=0.02)
    assert detectable_effect(MIN_PAIRS - 1) is None


def test_compare_methods_marks_and_groups_on_fixed_data():
    rng = np.random.default_rng(3)
    n = 40
    base = rng.normal(0.2, 0.1, n)
    values = {
        "random": base,
        "good": base + rng.normal(0.3, 0.05, n),
        "good2": base + rng.normal(0.3, 0.05, n),
        "copy": base + rng.normal(0.0, 0.1, n),
        "bad": base - rng.normal(0.3, 0.05, n),
    }
    rows = pd.DataFrame(
        [
            dict(dataset="d", model="m", method=k, metric="x", output="value", sample_id=i, value=v)
            for k, vals in values.items()
            for i, v in enumerate(vals)
        ]
    )
    # a method scored on 2 images only, with the highest mean: it is neither ranked nor best
    few = [
        dict(
            dataset="d",
            model="m",
            method="lucky",
            metric="x",
            output="value",
            sample_id=i,
            value=9.0,
        )
        for i in range(2)
    ]
    rows = pd.concat([rows, pd.DataFrame(few)], ignore_index=True)
    t = compare_methods(rows, {"x": True}, {"x": "faithfulness"}, {"random"}).set_index("method")
    assert (t.loc["lucky", "vs_random"], t.loc["lucky", "rank"]) == ("too few images", 0)
    assert not t.loc["lucky", "best_group"] and t.loc["good", "best"] != "lucky"
    assert t.loc["good", "vs_random"] == t.loc["good2", "vs_random"] == "better"
    assert t.loc["copy", "vs_random"] == "not distinguishable"
    assert t.loc["bad", "vs_random"] == "worse" and t.loc["random", "vs_random"] == "reference"
    assert set(t.index[t["best_group"]]) == {"good", "good2"}
    assert (t.loc[["good", "good2"], "rank"] == 1).all()


# -- end to end -----------------------------------------------------------------------


@pytest.fixture
def noisy_cam():
    cam = METHODS.get("cam").obj

    def noisy(model, x, target, *, layer=None, seed: int = 0) -> Explanation:
        maps = cam(model, x, target, layer=layer).maps
        g = torch.Generator().manual_seed(seed)
        noise = torch.rand(maps.shape, generator=g) * 0.02 * maps.amax(dim=(1, 2), keepdim=True)
        return Explanation(maps=(maps + noise).float())

    METHODS.register("test-noisy-cam", family="cam", needs=("layer", "gap_head"))(noisy)
    yield "test-noisy-cam"
    METHODS.remove("test-noisy-cam")


PLANTED = """
name = "planted"
[eval]
max_images = 64
batch_size = 32
[train]
epochs = 8
[models.gapcnn]
[datasets.synth-lesion]
image_size = 32
[methods.cam]
[methods.noisy]
use = "test-noisy-cam"
[methods.random]
[methods.noise]
use = "random"
seed = 7
[metrics.aopc_morf]
region = 4
steps = 16
"""


@pytest.mark.slow
def test_planted_methods_are_judged_correctly_end_to_end(tmp_path, noisy_cam):
    suite = tmp_path / "planted.toml"
    suite.write_text(PLANTED)
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "c")]
    assert main([*args, "--no-progress"]) == 0
    board = pd.read_parquet(out / "leaderboard.parquet").set_index("method")
    assert board.loc["noisy", "vs_random"] == "better" and board.loc["noisy", "best_group"]
    assert board.loc["noise", "vs_random"] == "not distinguishable"
    assert board.loc["random", "vs_random"] == "reference"
    assert board.loc["noisy", "n_random"] == 64
    findings = (out / "leaderboard.md").read_text().split("## Findings", 1)[1]
    line = next(x for x in findings.splitlines() if x.startswith("- aopc_morf"))
    better, rest = line.split("better than random", 1)
    assert "noisy" in better and "noise" not in better
    assert "noise is not distinguishable from random" in rest
    assert "best group: " in rest and "noisy" in rest.split("best group: ")[1]


SEEDS = """
name = "seeds"
[eval]
max_images = 16
[train]
epochs = 2
[models.gapcnn]
[datasets.synth-lesion]
image_size = 32
n = 64
[methods.cam]
[methods.random]
[metrics.aopc_morf]
region = 4
steps = 8
"""


@pytest.mark.slow
def test_model_seeds_train_distinct_models_on_the_same_images(tmp_path):
    import json

    suite = tmp_path / "seeds.toml"
    suite.write_text(SEEDS)
    out = tmp_path / "run"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "c")]
    assert main([*args, "--no-progress", "--model-seeds", "2"]) == 0
    rows = pd.read_parquet(out / "rows.parquet")
    assert set(rows["model"]) == {"gapcnn-s0", "gapcnn-s1"}
    ids = {m: set(g["sample_id"]) for m, g in rows.groupby("model")}
    assert ids["gapcnn-s0"] == ids["gapcnn-s1"]  # paired across seeds: the same images
    keys = {
        json.loads((out / "groups" / f"{m}--synth-lesion" / "model.json").read_text())["key"]
        for m in ("gapcnn-s0", "gapcnn-s1")
    }
    assert len(keys) == 2  # two trainings, not one model twice
    cam = rows[(rows["method"] == "cam") & (rows["output"] == "value")]
    by_seed = cam.pivot_table(index="sample_id", columns="model", values="value")
    assert not np.allclose(by_seed["gapcnn-s0"], by_seed["gapcnn-s1"])  # other weights
    board = (out / "leaderboard.md").read_text()
    assert "### Across model seeds" in board
    assert "- synth-lesion / gapcnn (2 model seeds), aopc_morf: cam " in board


def test_contradicting_deletion_and_insertion_verdicts_are_flagged():
    """Random best on deletion (lower is better) and worst on insertion: flagged."""
    from cambench.benchmarks.reports.leaderboard import aggregate, contradictions

    rng = np.random.default_rng(5)
    n = 30
    means = {  # deletion (lower better), insertion (higher better)
        "random": (0.1, 0.2),
        "cam": (0.5, 0.8),
        "gradcam": (0.45, 0.7),
        "occlusion": (0.4, 0.6),
    }
    rows = pd.DataFrame(
        [
            dict(
                dataset="d",
                model="m",
                method=k,
                metric=metric,
                output="value",
                sample_id=i,
                value=v,
            )
            for k, pair in means.items()
            for metric, mu in zip(("del", "ins"), pair, strict=True)
            for i, v in enumerate(mu + rng.normal(0, 0.02, n))
        ]
    )
    cells = (
        rows[["dataset", "model", "method", "metric"]]
        .drop_duplicates()
        .assign(status="ok", reason="", n=n, n_excluded=0)
    )
    table = aggregate(
        rows,
        cells,
        {"del": False, "ins": True},
        families={"del": "faithfulness", "ins": "faithfulness"},
    )
    (line,) = contradictions(table, {"del": "deletion", "ins": "insertion"})
    assert "rho = -1.00" in line and "random is first on del and last on ins" in line
    agree = rows.assign(value=np.where(rows["metric"] == "del", 1 - rows["value"], rows["value"]))
    table = aggregate(
        agree,
        cells,
        {"del": False, "ins": True},
        families={"del": "faithfulness", "ins": "faithfulness"},
    )
    assert contradictions(table, {"del": "deletion", "ins": "insertion"}) == []


@pytest.mark.parametrize("n", [7, 12, 40])
def test_sign_flip_p_agrees_with_scipys_permutation_test(n):
    rng = np.random.default_rng(n)
    d = np.round(rng.normal(0.3, 1.0, n), 1)  # rounded: ties, so the sign-flip test is used
    ours = paired_test(d, np.zeros(n), seed=0)
    assert ours.test == "sign-flip permutation"
    theirs = sps.permutation_test(
        (d,),
        lambda x, axis: np.mean(x, axis=axis),
        vectorized=True,
        permutation_type="samples",
        n_resamples=np.inf if n <= 16 else 200_000,
        rng=np.random.default_rng(1),
    ).pvalue
    assert ours.p == pytest.approx(theirs, abs=1e-12 if n <= 16 else 0.01)
