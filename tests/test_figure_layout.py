"""Figures at print size: every figure ``figure_jobs`` yields for a run folder built to
stress the layout (13 methods with long labels, metrics of every kind, two groups, one of
which lacks a metric and a sanity curve, examples with lesion and organ masks and the
predicted classes) is 3.5 or 7 in wide and at most 9.5 in tall; every text the renderer
draws is at least 7 pt, inside the figure, and overlaps no other text. ``--cmap`` takes
any matplotlib colour map and refuses others.

The texts are those ``Text.draw`` actually draws (a spy on it during one Agg draw), with
the boxes the renderer gives them: ``fig.findobj(Text)`` would also return tick labels of
ticks outside the view, which are never drawn but keep stale positions.
"""

import json
from itertools import combinations
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.store import CELL_COLUMNS
from cambench.benchmarks.reports.figures import (
    COLUMN_WIDTH,
    MAX_HEIGHT,
    MIN_FONT,
    PAGE_WIDTH,
    RunFolder,
    fig_heatmaps,
    figure_jobs,
    main,
    make_figures,
    style,
)
from cambench.benchmarks.reports.leaderboard import aggregate

pytestmark = pytest.mark.harness

DATASET = "pneumoniamnist"
MODELS = ("resnet18", "densenet121")
METHODS = {  # label -> registry name, as in the medical suite
    "cam": "cam",
    "gradcam": "gradcam",
    "gradcampp": "gradcampp",
    "xgradcam": "xgradcam",
    "layercam": "layercam",
    "hirescam": "hirescam",
    "scorecam": "scorecam",
    "guided_backprop": "guided_backprop",
    "guided_gradcam": "guided_gradcam",
    "occlusion": "occlusion",
    "integrated_gradients": "integrated_gradients",
    "gradcam[layer4.1]": "gradcam",
    "random": "random",
}
METRICS = {  # label -> (use, kind, higher is better)
    "aopc_morf": ("aopc_morf", "faithfulness", True),
    "pointing_game": ("pointing_game", "localization", True),
    "stability-noise": ("stability", "robustness", True),
    "stability-shift": ("stability", "robustness", True),
    "max_sensitivity": ("max_sensitivity", "robustness", False),
    "explanation_attack": ("explanation_attack", "adversarial", False),
    "model_randomization": ("model_randomization", "sanity", False),
    "time": ("time", "cost", False),
}
ABSENT = ("densenet121", "max_sensitivity")  # not applicable there: its panel says why
N, STEPS, CASCADE, K, SIDE = 20, 16, 4, 4, 28
SWEEP = {"gradcam": "gradcam", "gradcampp": "gradcampp", "layercam": "layercam"}
LAYERS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")

EXPECTED = sorted(
    [
        *(
            f"{kind}--{m}--{DATASET}{suffix}"
            for m in MODELS
            for kind, suffix in (
                ("heatmaps", ""),
                ("morf", "--aopc_morf"),
                ("sanity", "--model_randomization"),
                ("ranks", ""),
                ("pareto", "--aopc_morf--time"),
                ("robustness", ""),
                ("layers", ""),
                ("cam-equivalence", ""),
            )
        ),
        "ranks--mean",
        *(f"cd--{k}" for k, (_, kind, _) in METRICS.items() if kind != "cost"),
    ]
)


def _value(rng, metric: str, m_i: int, i: int) -> float:
    """A made-up score of method ``m_i`` on image ``i``, in the metric's range."""
    if metric == "time":
        return 0.002 * (1 + m_i) ** 1.5 * (1 + 0.05 * i)
    if metric == "pointing_game":
        return float(rng.random() < 0.3 + 0.04 * m_i)
    return float(np.clip(0.2 + 0.05 * m_i + rng.normal(0, 0.1), -1, 1))


def write_layout_run(root, methods=METHODS, metrics=METRICS, *, sweep=False):
    """A run folder as benchmarks.run lays it out, with made-up numbers: two groups of
    ``methods`` x ``metrics`` on N images; the ``ABSENT`` cell not applicable; SSIM
    curves in the first group only; examples with every key of a current run."""
    rng = np.random.default_rng(0)
    rows, curves, cells = [], [], []
    for model, (m_i, method) in ((mo, me) for mo in MODELS for me in enumerate(methods)):
        ids = [f"{DATASET}/test/{i}" for i in range(N)]
        for metric in metrics:
            absent = (model, metric) == ABSENT
            reason = f"{metric}: needs a differentiable model head" if absent else ""
            status = "not_applicable" if absent else "ok"
            cells.append(
                dict(
                    model=model,
                    dataset=DATASET,
                    method=method,
                    metric=metric,
                    status=status,
                    reason=reason,
                    n=0 if absent else N,
                    n_excluded=0,
                )
            )
            if absent:
                continue
            for i, sid in enumerate(ids):
                base = dict(
                    model=model,
                    dataset=DATASET,
                    method=method,
                    metric=metric,
                    sample_id=sid,
                    label=i % 2,
                    target=i % 2,
                    correct=True,
                )
                rows.append(dict(base, output="value", value=_value(rng, metric, m_i, i)))
        for sid in ids:
            morf = 3.0 - np.cumsum(rng.random(STEPS + 1)) * (0.1 + 0.02 * m_i)
            rho = np.clip(np.linspace(1.0, 0.9 - 0.15 * m_i, CASCADE) + rng.normal(0, 0.1), -1, 1)
            named = [("aopc_morf", "morf", morf), ("model_randomization", "spearman", rho)]
            if model == MODELS[0]:
                named.append(("model_randomization", "ssim", rho**2))
            for metric, curve, values in named:
                curves.append(
                    dict(
                        model=model,
                        dataset=DATASET,
                        method=method,
                        metric=metric,
                        curve=curve,
                        sample_id=sid,
                        values=[float(v) for v in values],
                    )
                )
    rows, cells = pd.DataFrame(rows), pd.DataFrame(cells, columns=CELL_COLUMNS)
    directions = {k: hib for k, (_, _, hib) in metrics.items()}
    families = {k: kind for k, (_, kind, _) in metrics.items()}
    root.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(root / "rows.parquet", index=False)
    cells.to_parquet(root / "cells.parquet", index=False)
    pd.DataFrame(curves).to_parquet(root / "curves.parquet", index=False)
    aggregate(rows, cells, directions, families=families).to_parquet(root / "leaderboard.parquet")
    method_meta = {label: {"use": use, "family": "cam"} for label, use in methods.items()}
    for label, meta in method_meta.items():
        if "[" in label:  # a layer sweep's variant: its entry and layer
            entry, layer = label.rstrip("]").split("[")
            meta.update(entry=entry, layer=layer)
    suite = {
        "name": "layout",
        "models": {m: {} for m in MODELS},
        "datasets": {DATASET: {}},
        "methods": {label: {"use": use} for label, use in methods.items()},
        "metrics": {label: {"use": use} for label, (use, _, _) in metrics.items()},
    }
    manifest = {
        "run_id": "layout",
        "suite": suite,
        "methods": method_meta,
        "metrics": {
            label: {"use": use, "kind": kind, "higher_is_better": hib}
            for label, (use, kind, hib) in metrics.items()
        },
        "models": {
            f"{m}--{DATASET}": {
                "layer_sizes": {la: [28 >> j, 28 >> j] for j, la in enumerate(LAYERS)}
            }
            for m in MODELS
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    if not sweep:
        for model in MODELS:
            write_examples(root / "groups" / f"{model}--{DATASET}", methods, rng)
    return root


def write_examples(folder, methods, rng) -> None:
    """examples.npz of a current run: images, lesion and organ masks, the classes, maps."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    organ = np.zeros((K, SIDE, SIDE), dtype=bool)
    for cx in (9, 19):  # two lungs
        organ |= ((xx - cx) / 5.0) ** 2 + ((yy - 14) / 10.0) ** 2 <= 1
    lesion = np.zeros((K, SIDE, SIDE), dtype=bool)
    lesion[0, 8:14, 6:11] = True
    lesion[2, 15:20, 17:22] = True  # image 1 and 3: no lesion
    probs = rng.dirichlet([1.0, 1.0], size=K).astype(np.float32)
    maps = {f"maps__{m}": rng.random((K, SIDE, SIDE)).astype(np.float32) for m in methods}
    if "scorecam" in methods:
        maps["maps__scorecam"][2:] = np.nan  # explained the first two images only
    folder.mkdir(parents=True)
    np.savez(
        folder / "examples.npz",
        images=rng.random((K, 1, SIDE, SIDE)).astype(np.float32),
        ids=np.array([f"{DATASET}/test/{i}" for i in range(K)]),
        masks=lesion,
        organ_masks=organ,
        labels=np.array([0, 1, 1, 0]),
        target=np.array([0, 1, 1, 1]),
        pred=probs.argmax(axis=1),
        probs=probs,
        class_names=np.array(["normal", "pneumonia"]),
        **maps,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The stressing run, and a layer sweep (3 methods x 4 layers) of the same metrics."""
    root = tmp_path_factory.mktemp("layout")
    sweep = {f"{e}[{la}]": use for e, use in SWEEP.items() for la in LAYERS}
    return (
        RunFolder.load(write_layout_run(root / "run")),
        RunFolder.load(write_layout_run(root / "sweep", sweep, sweep=True)),
    )


def drawn_texts(fig):
    """(text, box in pixels) of every non-empty text one Agg draw of ``fig`` draws."""
    from matplotlib.text import Text

    seen = {}
    draw = Text.draw

    def spy(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            seen[id(self)] = (self, Text.get_window_extent(self, renderer))

    with mock.patch.object(Text, "draw", spy):
        fig.canvas.draw()
    return list(seen.values())


def check_layout(fig, stem: str) -> None:
    width, height = fig.get_size_inches()
    assert width in (COLUMN_WIDTH, PAGE_WIDTH) and height <= MAX_HEIGHT, (stem, width, height)
    texts = drawn_texts(fig)
    assert texts, stem
    small = [(t.get_text(), t.get_fontsize()) for t, _ in texts if t.get_fontsize() < MIN_FONT]
    assert not small, f"{stem}: text under {MIN_FONT} pt: {small}"
    frame = fig.bbox
    outside = [
        t.get_text()
        for t, b in texts
        if b.x0 < frame.x0 - 1.5
        or b.y0 < frame.y0 - 1.5
        or b.x1 > frame.x1 + 1.5
        or b.y1 > frame.y1 + 1.5
    ]
    assert not outside, f"{stem}: text outside the figure: {outside}"
    boxes = [(t.get_text(), b.padded(-0.5)) for t, b in texts if b.width > 1 and b.height > 1]
    overlapping = [
        (ta, tb)
        for (ta, a), (tb, b) in combinations(boxes, 2)
        if min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)
    ]
    assert not overlapping, f"{stem}: overlapping texts: {overlapping[:5]}"


def test_the_stressing_run_yields_every_figure(runs):
    run, sweep = runs
    notes = []
    assert sorted(stem for stem, _ in figure_jobs(run, skipped=notes.append)) == EXPECTED
    assert notes == []
    assert [s for s, _ in figure_jobs(sweep, skipped=notes.append) if s.startswith("layers")]


@pytest.mark.parametrize("stem", [*EXPECTED, f"sweep:layers--{MODELS[0]}--{DATASET}"])
def test_figure_fits_the_page_with_legible_text_that_never_overlaps(runs, stem):
    run = runs[1] if stem.startswith("sweep:") else runs[0]
    stem = stem.removeprefix("sweep:")
    with style():
        draw = dict(figure_jobs(run, skipped=lambda _: None))[stem]
        fig = draw()
        check_layout(fig, stem)


def test_panels_left_empty_say_why(runs):
    run, _ = runs
    model = ABSENT[0]
    with style():
        jobs = dict(figure_jobs(run, skipped=lambda _: None))
        robust = jobs[f"robustness--{model}--{DATASET}"]()
        sanity = jobs[f"sanity--{model}--{DATASET}--model_randomization"]()
    notes = [t.get_text().replace("\n", " ") for ax in robust.axes for t in ax.texts]
    assert any("not applicable" in n and "differentiable" in n for n in notes), notes
    notes = [t.get_text().replace("\n", " ") for ax in sanity.axes for t in ax.texts]
    assert notes == [f"no ssim curves for {model} on {DATASET}"]


def test_heatmap_rows_name_the_prediction_and_every_method_has_a_column(runs):
    run, _ = runs
    with style():
        fig = fig_heatmaps(run, MODELS[0], DATASET)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert any("pred" in lab and "true normal" in lab for lab in labels), labels
    titles = {ax.get_title().replace("\n", "") for ax in fig.axes}
    assert set(METHODS) <= titles, set(METHODS) - titles
    assert sum(t.get_text() == "no map" for ax in fig.axes for t in ax.texts) == 2


def test_cmap_jet_on_request_and_unknown_refused(tmp_path, capsys):
    root = tmp_path / "run"
    (root / "groups").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"suite": {}}))
    write_examples(
        root / "groups" / f"{MODELS[0]}--{DATASET}", ["cam", "gradcam"], np.random.default_rng(1)
    )
    run = RunFolder.load(root)
    with style():
        fig = dict(figure_jobs(run, cmap="jet"))[f"heatmaps--{MODELS[0]}--{DATASET}"]()
    assert {im.get_cmap().name for ax in fig.axes for im in ax.images} == {"gray", "jet"}
    out = tmp_path / "figs"
    assert main([str(root), "--out", str(out), "--formats", "png", "--cmap", "jet"]) == 0
    assert (out / f"heatmaps--{MODELS[0]}--{DATASET}.png").exists()
    with pytest.raises(UserError, match="--cmap 'jett'.*Did you mean: jet"):
        make_figures(root, formats=["png"], cmap="jett")
    assert main([str(root), "--cmap", "nope"]) == 2
    assert "--cmap" in capsys.readouterr().err
