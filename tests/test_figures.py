"""Paper figures from a run folder: every figure is written as a valid PDF and PNG from a
small synthetic run folder; the running AOPC and the Pareto front match hand computations;
the curves' bands are the leaderboard's bootstrap intervals, inside the values' range;
absent inputs skip their figures with a note and leave the others."""

import doctest
import json

import numpy as np
import pandas as pd
import pytest

import cambench.benchmarks.reports.figures as figures
from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.store import CELL_COLUMNS
from cambench.benchmarks.reports.figures import (
    RunFolder,
    fig_cam_equivalence,
    main,
    make_figures,
    mean_band,
    pareto_front,
    running_aopc,
)
from cambench.benchmarks.reports.leaderboard import aggregate, bootstrap_ci, to_csv

pytestmark = pytest.mark.harness

MODEL, DATASET = "gapcnn", "synth-lesion"
METHODS = {"cam": "cam", "grad": "gradcam"}  # label -> registry name, as in a suite
METRICS = {
    "aopc_morf": {"use": "aopc_morf", "region": 4},
    "time": {"use": "time"},
    "randomization": {"use": "model_randomization"},
    "stab": {"use": "stability"},
}
DIRECTIONS = {"aopc_morf": True, "time": False, "randomization": False, "stab": True}
N, STEPS, CASCADE = 6, 4, 3
PDF, PNG = b"%PDF-", b"\x89PNG\r\n\x1a\n"

EXPECTED = [
    f"heatmaps--{MODEL}--{DATASET}",
    f"morf--{MODEL}--{DATASET}--aopc_morf",
    f"sanity--{MODEL}--{DATASET}--randomization",
    f"ranks--{MODEL}--{DATASET}",
    f"pareto--{MODEL}--{DATASET}--aopc_morf--time",
    f"robustness--{MODEL}--{DATASET}",
    f"cam-equivalence--{MODEL}--{DATASET}",
]


def write_run(root, *, examples=True, curves=True):
    """A run folder as benchmarks.run lays it out, with made-up numbers."""
    rng = np.random.default_rng(0)
    ids = [f"{DATASET}/test/{i}" for i in range(N)]
    base = dict(model=MODEL, dataset=DATASET, label=0, target=0, correct=True)
    rows, curve_rows = [], []
    for m_i, method in enumerate(METHODS):
        for i, sid in enumerate(ids):
            morf = 2.0 - (1.0 + m_i) * np.arange(STEPS + 1) * 0.3 + rng.normal(0, 0.05, STEPS + 1)
            rho = np.linspace(0.9, 0.2 + 0.3 * m_i, CASCADE) + rng.normal(0, 0.02, CASCADE)
            values = {
                ("aopc_morf", "value"): float(running_aopc(morf)[0, -1]),
                ("time", "value"): 0.01 * (1 + 3 * m_i) * (1 + 0.1 * i),
                ("time", "pass_ratio"): 1.2,
                ("randomization", "value"): float(rho[-1]),
                ("randomization", "ssim"): float(rho[-1] / 2),
                ("stab", "value"): 0.5 + 0.1 * m_i + 0.01 * i,
            }
            for (metric, output), value in values.items():
                rows.append(
                    dict(
                        base,
                        method=method,
                        metric=metric,
                        output=output,
                        sample_id=sid,
                        value=value,
                    )
                )
            for metric, curve, vals in (
                ("aopc_morf", "morf", morf),
                ("randomization", "spearman", rho),
                ("randomization", "ssim", rho / 2),
            ):
                curve_rows.append(
                    dict(
                        model=MODEL,
                        dataset=DATASET,
                        method=method,
                        metric=metric,
                        curve=curve,
                        sample_id=sid,
                        values=[float(v) for v in vals],
                    )
                )
    rows = pd.DataFrame(rows)
    cells = pd.DataFrame(
        [
            dict(
                model=MODEL,
                dataset=DATASET,
                method=m,
                metric=k,
                status="ok",
                reason="",
                n=N,
                n_excluded=0,
            )
            for m in METHODS
            for k in METRICS
        ],
        columns=CELL_COLUMNS,
    )
    root.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(root / "rows.parquet", index=False)
    cells.to_parquet(root / "cells.parquet", index=False)
    if curves:
        pd.DataFrame(curve_rows).to_parquet(root / "curves.parquet", index=False)
    (root / "leaderboard.csv").write_text(to_csv(aggregate(rows, cells, DIRECTIONS)))
    suite = {
        "name": "tiny",
        "models": {MODEL: {"use": "gapcnn"}},
        "datasets": {DATASET: {"use": "synth-lesion"}},
        "methods": {label: {"use": use} for label, use in METHODS.items()},
        "metrics": METRICS,
    }
    (root / "manifest.json").write_text(json.dumps({"suite": suite}))
    if examples:
        k, h = 2, 8
        cam = rng.random((k, h, h)).astype(np.float32)
        masks = np.zeros((k, h, h), dtype=bool)
        masks[:, 2:5, 3:6] = True
        group = root / "groups" / f"{MODEL}--{DATASET}"
        group.mkdir(parents=True)
        np.savez(
            group / "examples.npz",
            images=rng.random((k, 3, h, h)).astype(np.float32),
            ids=np.array(ids[:k]),
            masks=masks,
            **{"maps__cam": cam, "maps__grad": 2.0 * cam + 0.1},
        )
    return root


def no_pyplot_figures():
    from matplotlib._pylab_helpers import Gcf

    return not Gcf.get_all_fig_managers()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = write_run(tmp_path_factory.mktemp("run") / "run")
    return root, make_figures(root)


def test_every_figure_is_written_as_pdf_and_png(full_run):
    root, written = full_run
    out = root / "figures"
    expected = {out / f"{stem}.{ext}" for stem in EXPECTED for ext in ("pdf", "png")}
    assert set(written) == expected
    assert {p for p in out.iterdir()} == expected  # no temporary files left
    for path in expected:
        magic = PDF if path.suffix == ".pdf" else PNG
        assert path.read_bytes()[: len(magic)] == magic, path
    assert no_pyplot_figures()


def test_running_aopc_of_a_linear_curve_is_half_the_slope_times_k():
    # f(x^(j)) = f0 - c j: the drops are c j, so the running AOPC is c k (k+1)/2 / (k+1) = c k/2
    c, f0, steps = 0.7, 3.0, 9
    curve = f0 - c * np.arange(steps + 1)
    k = np.arange(steps + 1)
    np.testing.assert_allclose(running_aopc(curve[None])[0], c * k / 2)


def test_running_aopc_ends_at_the_aopc_of_the_whole_curve():
    # AOPC = 1/(L+1) sum_{k=1..L} [f(x0) - f(xk)] (metrics/faithfulness.py), per image
    curves = np.array([[4.0, 1.0, 2.0, -1.0], [1.0, 1.0, 0.0, 3.0]])
    aopc = [(3 + 2 + 5) / 4, (0 + 1 - 2) / 4]
    out = running_aopc(curves)
    np.testing.assert_allclose(out[:, -1], aopc)
    np.testing.assert_allclose(out[:, 1], [3 / 2, 0.0])
    np.testing.assert_allclose(out[:, 0], 0.0)


def test_mean_band_is_the_leaderboards_bootstrap_interval_of_each_column():
    # the same seeded draw of images as bootstrap_ci, so the same interval, column by column
    values = np.random.default_rng(3).normal(size=(15, 4)) * [1.0, 2.0, 0.1, 5.0]
    mean, lo, hi = mean_band(values, seed=7)
    np.testing.assert_allclose(mean, values.mean(axis=0))
    for j in range(values.shape[1]):
        np.testing.assert_allclose((lo[j], hi[j]), bootstrap_ci(values[:, j], seed=7), rtol=1e-12)


def test_mean_band_agrees_with_scipys_percentile_bootstrap():
    from scipy.stats import bootstrap

    values = np.random.default_rng(4).exponential(size=(30, 3))
    mean, lo, hi = mean_band(values, samples=20_000)
    for j in range(values.shape[1]):
        ci = bootstrap(
            (values[:, j],), np.mean, n_resamples=20_000, method="percentile", rng=5
        ).confidence_interval
        # two Monte Carlo estimates of the same percentiles: within 5% of the interval
        tol = 0.05 * (ci.high - ci.low)
        assert abs(lo[j] - ci.low) < tol and abs(hi[j] - ci.high) < tol


def test_mean_band_of_bounded_values_stays_in_their_range():
    # a Spearman curve near its ceiling: mean + 1.96 SE would pass 1 (1.12 here)
    rho = np.array([[1.0, -1.0], [1.0, -1.0], [1.0, -1.0], [1.0, -0.98], [0.2, 0.9]])
    mean, lo, hi = mean_band(rho)
    se = rho.std(axis=0, ddof=1) / np.sqrt(len(rho))
    assert (mean + 1.959964 * se)[0] > 1 and (mean - 1.959964 * se)[1] < -1
    assert np.all(lo >= rho.min(axis=0)) and np.all(hi <= rho.max(axis=0))
    assert np.all((lo <= mean) & (mean <= hi))


def test_mean_band_ignores_nan_and_gives_one_value_its_own_interval():
    values = np.array([[1.0, np.nan, np.nan], [3.0, 2.0, np.nan], [np.nan, np.nan, np.nan]])
    mean, lo, hi = mean_band(values)
    np.testing.assert_allclose(mean[:2], [2.0, 2.0])
    assert 1.0 <= lo[0] < hi[0] <= 3.0
    assert lo[1] == hi[1] == 2.0  # one value: the interval is that value
    assert np.isnan([mean[2], lo[2], hi[2]]).all()  # no value: no interval


def test_pareto_front_of_hand_made_points():
    #         A    B    C    D    E    F    G       (cost, benefit)
    cost = [1.0, 2.0, 3.0, 2.5, 4.0, 2.0, np.nan]
    benefit = [1.0, 3.0, 2.0, 3.0, 5.0, 3.0, 9.0]
    # C is beaten by B on both; D ties B's benefit at a higher cost; B and F are equal, so
    # neither dominates the other; G has no cost and is left out. Ordered by cost.
    assert pareto_front(cost, benefit).tolist() == [0, 1, 5, 4]
    assert pareto_front([1.0], [1.0]).tolist() == [0]
    assert pareto_front([], []).tolist() == []


def test_docstring_examples_run():
    result = doctest.testmod(figures)
    assert result.attempted >= 2 and result.failed == 0


def test_cam_equivalence_title_gives_pearson_r(tmp_path):
    root = write_run(tmp_path / "run", curves=False)
    run = RunFolder.load(root)
    # maps__grad = 2 * cam + 0.1: equal after min-max per map, so r = 1
    assert fig_cam_equivalence(run, MODEL, DATASET).axes[0].get_title().endswith("r = 1.0000")
    # a reversed map: min-max gives 1 - a, so r = -1
    path = root / "groups" / f"{MODEL}--{DATASET}" / "examples.npz"
    data = dict(np.load(path))
    data["maps__grad"] = -data["maps__cam"]
    np.savez(path, **data)
    assert fig_cam_equivalence(run, MODEL, DATASET).axes[0].get_title().endswith("r = -1.0000")


def test_cam_equivalence_of_real_maps_on_a_gap_model(tmp_path):
    # The methods' own maps on the GAP CNN: Grad-CAM = ReLU(CAM) / Z at the layer, so
    # against ReLU(CAM) the points lie on the diagonal, or above it near CAM's zero
    # crossings (Grad-CAM upsamples after its ReLU: a mean of ReLUs >= the ReLU of a mean).
    import torch

    from cambench.benchmarks.models.zoo import build_model
    from cambench.cams import METHODS

    root = write_run(tmp_path / "run", curves=False)
    torch.manual_seed(0)
    model = build_model("gapcnn", in_channels=3, num_classes=2).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 1])
    cam, grad = (METHODS.get(m).obj(model, x, target).maps.numpy() for m in ("cam", "gradcam"))
    assert (cam < 0).any() and (cam > 0).any()  # zero crossings, or the check is empty
    path = root / "groups" / f"{MODEL}--{DATASET}" / "examples.npz"
    data = dict(np.load(path))
    data.update(images=x.numpy(), masks=np.zeros((2, 32, 32), bool), maps__cam=cam, maps__grad=grad)
    np.savez(path, **data)
    fig = fig_cam_equivalence(RunFolder.load(root), MODEL, DATASET)
    (points,) = fig.axes[0].collections
    xy = points.get_offsets()
    assert xy.shape == (2 * 32 * 32, 2) and np.all(xy[:, 1] >= xy[:, 0] - 1e-5)
    on_diagonal = np.abs(xy[:, 1] - xy[:, 0]) < 1e-5
    assert on_diagonal.mean() > 0.3  # where no zero crossing is near, equal
    # at random init CAM is negative over 65% of these maps; r is still high
    assert float(fig.axes[0].get_title().rsplit("= ", 1)[1]) > 0.9


def test_absent_examples_and_curves_skip_their_figures_with_a_note(tmp_path, capsys):
    root = write_run(tmp_path / "run", examples=False, curves=False)
    out = tmp_path / "figs"
    assert main([str(root), "--out", str(out), "--formats", "png"]) == 0
    err = capsys.readouterr().err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        f"{stem}.png"
        for stem in EXPECTED
        if not stem.startswith(("heatmaps", "cam-equivalence", "morf", "sanity"))
    )
    notes = [line for line in err.splitlines() if "skipped" in line]
    assert any("heatmaps" in line and "examples.npz" in line for line in notes)
    assert any("cam-equivalence" in line and "examples.npz" in line for line in notes)
    assert any("curves.parquet" in line for line in notes)
    assert "Traceback" not in err
    assert no_pyplot_figures()


def test_missing_run_folder_exits_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "nowhere" in err


def test_folder_without_results_and_unknown_format_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no results"):
        make_figures(tmp_path)
    with pytest.raises(UserError, match="unknown figure format"):
        make_figures(tmp_path, formats=["pdf", "docx"])
