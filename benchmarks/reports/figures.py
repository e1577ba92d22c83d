"""Paper figures from a run folder: ``python -m benchmarks.figures RUN [--out DIR] [--formats pdf png]``.

Reads what ``python -m benchmarks.run --out RUN`` wrote through ``benchmarks/engine/store.py``
(the metrics' kinds and directions come from the run's manifest, never from the live
registries, so renamed entries and runs of older versions still draw) and
writes each figure once per format to ``RUN/figures/`` (or ``--out``). A figure whose inputs
are absent (a file, a metric, a method) is skipped with a one-line note on stderr; the
others are still written. File names, with M the model and D the dataset label:

    heatmaps--M--D                 rows images, columns methods: the min-max normalised map
                                   over the grey image, the lesion mask outlined
                                   (``groups/M--D/examples.npz``)
    morf--M--D--METRIC             mean MoRF curve f(x^(k)) per method, and the running AOPC
                                   after k perturbation steps (curves of ``aopc_morf``)
    ranks--M--D, ranks--mean       method x metric ranks from the run's leaderboard
                                   (``leaderboard.parquet``; the CSV files for runs of
                                   older versions), per group and averaged over groups
    pareto--M--D--AOPC--TIME       seconds per image (log) against AOPC-MoRF, Pareto front of
                                   lower time and higher AOPC
    sanity--M--D--METRIC           similarity to the original map after each step of the
                                   cascading randomization (``model_randomization`` curves)
    robustness--M--D               mean and 95% CI of the primary value of every metric of
                                   kind robustness or adversarial
    cam-equivalence--M--D          ReLU(CAM) against Grad-CAM pixel values on a GAP model,
                                   with Pearson's r (``examples.npz``)
    cd--METRIC                     critical-difference diagram (Demsar 2006): the methods'
                                   mean ranks, methods the Friedman + Nemenyi post-hoc test
                                   cannot tell apart joined by a bar (scikit-posthocs). The
                                   blocks are the (model, dataset) groups when the run has
                                   at least 3, else the images of its groups

Bands around mean curves are 95% normal-approximation intervals (mean +- 1.96 SE over
images); bars and error bars are the leaderboard's 95% bootstrap intervals.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: nothing is displayed and no figure is left registered (open) after a call.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import atomic_write
from cambench.benchmarks.engine.store import (
    StoredRun,
    group_key,
    read_run,
    split_group_key,
    stored_files,
)
from cambench.benchmarks.reports.leaderboard import bootstrap_ci

Z95 = 1.959963984540054  # two-sided 95% normal quantile
MAX_SCATTER_POINTS = 20_000
MAP_ALPHA = 0.5
DEFAULT_FORMATS = ("pdf", "png")


def note(message: str) -> None:
    """A one-line note on stderr (a skipped figure and why)."""
    print(f"figures: {message}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A figure's inputs are absent; the message says which (one line)."""


# ---------------------------------------------------------------------------------------
# Numerical helpers (pure; tested against closed forms)


def running_aopc(curves: np.ndarray) -> np.ndarray:
    """Running AOPC of MoRF curves: for scores f(x^(0..L)) as (N, L+1), column k is
    1/(k+1) * sum_{j<=k} [f(x^(0)) - f(x^(j))], so column L is the metric's AOPC.

    >>> running_aopc(np.array([[3.0, 1.0, 0.0]])).round(3).tolist()
    [[0.0, 1.0, 1.667]]
    """
    c = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    drops = c[:, :1] - c
    return np.cumsum(drops, axis=1) / np.arange(1, c.shape[1] + 1)


def mean_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of (N, T): the mean and a 95% normal interval (mean +- 1.96 SE), ignoring
    NaN; with one sample the interval is the mean itself."""
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n = np.sum(np.isfinite(v), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(v, axis=0) / n
        sq = np.nansum((v - mean) ** 2, axis=0)
        se = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1) / n), 0.0)
    return mean, mean - Z95 * se, mean + Z95 * se


def pareto_front(cost: Sequence[float], benefit: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point dominates (cost no higher and benefit no lower,
    one of them strictly), ordered by increasing cost. Non-finite points are left out.

    >>> pareto_front([1.0, 2.0, 3.0, 2.5], [1.0, 3.0, 2.0, 3.0]).tolist()
    [0, 1]
    """
    x = np.asarray(cost, dtype=np.float64)
    y = np.asarray(benefit, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    front = []
    for i in np.flatnonzero(ok):
        better = ok & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        if not better.any():
            front.append(int(i))
    return np.array(sorted(front, key=lambda i: (x[i], -y[i])), dtype=int)


def minmax(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own minimum and maximum; a constant array gives zeros."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = np.nanmin(a), np.nanmax(a)
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def slug(text: str) -> str:
    """A label made safe for a file name."""
    return re.sub(r"[^\w.+-]+", "_", str(text)).strip("_") or "_"


# ---------------------------------------------------------------------------------------
# The run folder


@dataclass
class RunFolder:
    """What a run folder holds, loaded once; absent files are None."""

    root: Path
    rows: pd.DataFrame | None
    curves: pd.DataFrame | None
    leaderboard: pd.DataFrame | None
    suite: dict[str, Any] = field(default_factory=dict)
    stored: StoredRun | None = None

    @classmethod
    def load(cls, root: str | Path) -> RunFolder:
        stored = read_run(root)
        run = cls(
            stored.root,
            stored.rows,
            stored.curves,
            stored.leaderboard,
            stored.manifest.suite,
            stored,
        )
        if run.rows is None and run.curves is None and run.leaderboard is None:
            if not stored_files(stored.root / "groups", "examples.npz"):
                raise UserError(
                    f"{stored.root} holds no results (rows.parquet, curves.parquet, leaderboard); "
                    f"write them first with python -m benchmarks.run --suite NAME --out {stored.root}"
                )
        return run

    def use(self, kind: str, label: str) -> str:
        """The registry name a label of ``metrics`` or ``methods`` used in the run."""
        meta = self.stored.metric(label) if kind == "metrics" else self.stored.method(label)
        return str(meta.get("use", label))

    def metric_info(self, label: str) -> dict[str, Any]:
        """The run's metadata of a metric label (kind, higher_is_better, ...)."""
        return self.stored.metric(label)

    def labels(self, kind: str, uses: Iterable[str], present: Iterable[str]) -> list[str]:
        """The labels among ``present`` whose registry name is one of ``uses``, in suite order."""
        wanted = set(uses)
        return [lab for lab in self.order(kind, present) if self.use(kind, lab) in wanted]

    def order(self, kind: str, present: Iterable[str]) -> list[str]:
        """``present`` labels in suite order, then any others sorted."""
        present = list(dict.fromkeys(present))
        suite_order = [lab for lab in (self.suite.get(kind) or {}) if lab in present]
        return suite_order + sorted(set(present) - set(suite_order))

    def groups(self) -> list[tuple[str, str]]:
        """(model, dataset) pairs with results or examples, ordered by dataset then model."""
        pairs: set[tuple[str, str]] = set()
        for frame in (self.rows, self.curves, self.leaderboard):
            if frame is not None and len(frame):
                pairs |= set(zip(frame["model"], frame["dataset"], strict=True))
        models, datasets = self.suite.get("models") or {}, self.suite.get("datasets") or {}
        for m, d in product(models, datasets):
            if (self.root / "groups" / group_key(m, d) / "examples.npz").exists():
                pairs.add((m, d))
        if not models:
            for path in stored_files(self.root / "groups", "examples.npz"):
                if pair := split_group_key(path.parent.name):
                    pairs.add(pair)
        return sorted(pairs, key=lambda p: (p[1], p[0]))

    @cached_property
    def colors(self) -> dict[str, Any]:
        """One colour per method label, the same in every figure (suite order)."""
        import seaborn as sns

        present: list[str] = []
        for frame in (self.rows, self.curves, self.leaderboard):
            if frame is not None:
                present += list(frame["method"])
        methods = self.order("methods", [*(self.suite.get("methods") or {}), *present])
        name = "colorblind" if len(methods) <= 10 else "husl"  # colorblind has 10 colours
        palette = sns.color_palette(name, max(len(methods), 1))
        colors = dict(zip(methods, palette, strict=False))
        return defaultdict(lambda: "grey", colors)  # a method only in examples.npz

    @cached_property
    def summary(self) -> pd.DataFrame | None:
        """Per ok cell: dataset, model, method, metric, mean, ci_low, ci_high. From the
        leaderboard when there is one, else from the rows (95% bootstrap CI)."""
        if self.leaderboard is not None:
            ok = self.leaderboard[self.leaderboard["status"] == "ok"]
            return ok[["dataset", "model", "method", "metric", "mean", "ci_low", "ci_high"]]
        if self.rows is None:
            return None
        records = []
        primary = self.rows[self.rows["output"] == "value"]
        for key, grp in primary.groupby(["dataset", "model", "method", "metric"], sort=True):
            vals = grp["value"].to_numpy(dtype=np.float64)
            lo, hi = bootstrap_ci(vals, seed=0)
            records.append((*key, float(vals.mean()), lo, hi))
        return pd.DataFrame(
            records, columns=["dataset", "model", "method", "metric", "mean", "ci_low", "ci_high"]
        )

    def examples(self, model: str, dataset: str) -> dict[str, np.ndarray]:
        """``groups/M--D/examples.npz``, checked for shape; ``Skip`` saying why when it is
        absent or malformed."""
        rel = Path("groups") / group_key(model, dataset) / "examples.npz"
        path = self.root / rel
        if not path.exists():
            raise Skip(f"no {rel}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise Skip(f"cannot read {rel} ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        images = data.get("images")
        if images is None or images.ndim != 4 or not len(images):
            raise Skip(f"{rel} has no images array of shape (K, C, H, W) with K >= 1")
        k = images.shape[0]
        bad = [
            key
            for key, arr in data.items()
            if (key.startswith("maps__") or key == "masks") and (arr.ndim != 3 or len(arr) != k)
        ]
        if bad:
            raise Skip(f"{rel}: {', '.join(bad)} not of shape (K, H, W) with K={k}")
        return data


def example_maps(run: RunFolder, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Method label -> (K, H, W) maps, in suite order."""
    maps = {key[len("maps__") :]: arr for key, arr in data.items() if key.startswith("maps__")}
    return {lab: maps[lab] for lab in run.order("methods", maps)}


# ---------------------------------------------------------------------------------------
# Drawing


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib as mpl
    import seaborn as sns

    rc = {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("paper"),
        "pdf.fonttype": 42,  # editable text in the PDF
        "savefig.dpi": 200,
    }
    with mpl.rc_context(rc):
        yield


def _figure(width: float, height: float):
    """A Figure on an Agg canvas, outside pyplot (nothing to close, nothing displayed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _arrow(higher_is_better: bool | None) -> str:
    return "" if higher_is_better is None else (" ↑" if higher_is_better else " ↓")


def _curves(run: RunFolder, model: str, dataset: str, metric: str, curve: str):
    """Method -> (N, T) stacked curves of one metric and curve name in one group."""
    c = run.curves
    sel = c[
        (c["model"] == model)
        & (c["dataset"] == dataset)
        & (c["metric"] == metric)
        & (c["curve"] == curve)
    ]
    out = {}
    for method in run.order("methods", sel["method"]):
        series = [np.asarray(v, dtype=np.float64) for v in sel[sel["method"] == method]["values"]]
        length = min(len(s) for s in series)
        if any(len(s) != length for s in series):
            note(f"{metric}/{curve} curves of {method} differ in length; cut to {length} steps")
        out[method] = np.stack([s[:length] for s in series])
    return out


def _band(ax, x, values, *, color, label) -> None:
    mean, lo, hi = mean_band(values)
    ax.plot(x, mean, color=color, label=label, lw=1.5)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def fig_heatmaps(run: RunFolder, model: str, dataset: str):
    """Rows images, columns methods; each map min-max normalised over the grey image."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    data = run.examples(model, dataset)
    maps = example_maps(run, data)
    if not maps:
        raise Skip(f"no maps__<method> arrays in the examples of {group_key(model, dataset)}")
    images, masks = data["images"], data.get("masks")
    ids = [str(i) for i in data.get("ids", np.arange(len(images)))]
    k, n_cols = len(images), len(maps) + 1
    fig = _figure(1.5 * n_cols + 0.6, 1.5 * k + 0.4)
    axes = fig.subplots(k, n_cols, squeeze=False)
    h, w = images.shape[2:]
    extent = (0, w, h, 0)
    for i in range(k):
        grey = np.clip(images[i].mean(axis=0), 0.0, 1.0)
        for j, ax in enumerate(axes[i]):
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
            if j:
                method = list(maps)[j - 1]
                ax.imshow(
                    minmax(maps[method][i]),
                    cmap="jet",
                    vmin=0,
                    vmax=1,
                    alpha=MAP_ALPHA,
                    extent=extent,
                    interpolation="nearest",
                )
            if masks is not None and masks[i].any() and not masks[i].all():
                mask = masks[i].astype(float)
                ax.contour(
                    np.linspace(0, w, mask.shape[1]),
                    np.linspace(0, h, mask.shape[0]),
                    mask,
                    levels=[0.5],
                    colors="white",
                    linewidths=0.8,
                )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if i == 0:
                ax.set_title("image" if j == 0 else list(maps)[j - 1])
        axes[i][0].set_ylabel(ids[i], fontsize="x-small")
    fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap="jet"),
        ax=axes,
        shrink=0.8,
        label="relevance (min-max per map)",
    )
    mask_note = ", lesion outlined" if masks is not None else ""
    fig.suptitle(f"{model} on {dataset}{mask_note}")
    return fig


def fig_morf(run: RunFolder, model: str, dataset: str, metric: str):
    """Mean MoRF curve and running AOPC against perturbation steps, per method."""
    curves = _curves(run, model, dataset, metric, "morf")
    if not curves:
        raise Skip(f"no {metric} 'morf' curves for {group_key(model, dataset)}")
    colors = run.colors
    fig = _figure(8.0, 3.2)
    ax_curve, ax_aopc = fig.subplots(1, 2)
    for method, values in curves.items():
        steps = np.arange(values.shape[1])
        _band(ax_curve, steps, values, color=colors[method], label=method)
        _band(ax_aopc, steps, running_aopc(values), color=colors[method], label=method)
    ax_curve.set(
        xlabel="perturbation steps k (most relevant regions first)",
        ylabel="class score f(x⁽ᵏ⁾)",
        title="MoRF curve",
    )
    ax_aopc.set(
        xlabel="perturbation steps k",
        ylabel="AOPC after k steps",
        title="running AOPC",
    )
    ax_aopc.legend(title="method", fontsize="small")
    fig.suptitle(f"{metric}: {model} on {dataset} (mean, 95% CI over images)")
    return fig


def _rank_table(ax, table: pd.DataFrame, directions: dict[str, bool | None]) -> None:
    import seaborn as sns

    table = table.copy()
    table["mean rank"] = table.mean(axis=1)
    table = table.sort_values("mean rank", kind="stable")
    table.columns = [f"{c}{_arrow(directions.get(c))}" for c in table.columns]
    annot = table.map(
        lambda v: "" if pd.isna(v) else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")
    )
    sns.heatmap(
        table.astype(float),
        ax=ax,
        annot=annot.to_numpy(),
        fmt="",
        cmap="viridis_r",
        cbar_kws={"label": "rank (1 = best)"},
        linewidths=0.5,
    )
    ax.axvline(table.shape[1] - 1, color="white", lw=3)  # sets the mean-rank column apart
    ax.set(xlabel="metric", ylabel="method")
    ax.tick_params(axis="y", labelrotation=0)
    ax.grid(False)


def fig_ranks(run: RunFolder, model: str | None, dataset: str | None):
    """Method x metric rank table of one group, or averaged over groups (model None)."""
    lb = run.leaderboard
    ok = lb[lb["status"] == "ok"]
    if model is not None:
        ok = ok[(ok["model"] == model) & (ok["dataset"] == dataset)]
    if not len(ok):
        where = "any group" if model is None else group_key(model, dataset)
        raise Skip(f"no ranked cells in leaderboard.csv for {where}")
    table = ok.pivot_table(index="method", columns="metric", values="rank", aggfunc="mean")
    table = table.loc[run.order("methods", table.index), run.order("metrics", table.columns)]
    directions = {
        m: bool(g["higher_is_better"].iloc[0]) for m, g in lb.groupby("metric", sort=False)
    }
    fig = _figure(1.0 * table.shape[1] + 3.0, 0.45 * table.shape[0] + 1.4)
    _rank_table(fig.subplots(), table, directions)
    if model is None:
        n = ok[["model", "dataset"]].drop_duplicates().shape[0]
        fig.suptitle(f"mean rank over {n} model x dataset groups")
    else:
        fig.suptitle(f"ranks: {model} on {dataset}")
    return fig


def fig_pareto(run: RunFolder, model: str, dataset: str, aopc: str, time: str):
    """Seconds per image (log) against AOPC-MoRF, with the Pareto front drawn."""
    summary = run.summary
    group = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    t = group[group["metric"] == time].set_index("method")
    a = group[group["metric"] == aopc].set_index("method")
    methods = [m for m in run.order("methods", t.index) if m in a.index]
    methods = [m for m in methods if t.loc[m, "mean"] > 0]
    if not methods:
        raise Skip(f"no method with both {time} > 0 and {aopc} in {group_key(model, dataset)}")
    x = t.loc[methods, "mean"].to_numpy(dtype=np.float64)
    y = a.loc[methods, "mean"].to_numpy(dtype=np.float64)
    x_lo = np.clip(t.loc[methods, "ci_low"].to_numpy(dtype=np.float64), x * 1e-3, x)
    x_hi = np.maximum(t.loc[methods, "ci_high"].to_numpy(dtype=np.float64), x)
    y_lo = np.minimum(a.loc[methods, "ci_low"].to_numpy(dtype=np.float64), y)
    y_hi = np.maximum(a.loc[methods, "ci_high"].to_numpy(dtype=np.float64), y)
    colors = run.colors
    fig = _figure(5.0, 3.8)
    ax = fig.subplots()
    ax.set_xscale("log")
    for i, method in enumerate(methods):
        ax.errorbar(
            x[i],
            y[i],
            xerr=[[x[i] - x_lo[i]], [x_hi[i] - x[i]]],
            yerr=[[y[i] - y_lo[i]], [y_hi[i] - y[i]]],
            fmt="o",
            color=colors[method],
            capsize=2,
            label=method,
        )
        ax.annotate(method, (x[i], y[i]), textcoords="offset points", xytext=(4, 4))
    front = pareto_front(x, y)
    ax.step(x[front], y[front], where="post", color="black", ls="--", lw=1, label="Pareto front")
    ax.set(
        xlabel=f"{time}: seconds per image (log scale)",
        ylabel=f"{aopc} (higher is better)",
        title=f"{model} on {dataset}: cost vs faithfulness",
    )
    ax.legend(fontsize="small")
    return fig


def fig_sanity(run: RunFolder, model: str, dataset: str, metric: str):
    """Similarity to the original map after each cascading-randomization step, per method."""
    present = run.curves[
        (run.curves["model"] == model)
        & (run.curves["dataset"] == dataset)
        & (run.curves["metric"] == metric)
    ]["curve"]
    names = [c for c in ("spearman", "ssim") if c in set(present)]
    names += sorted(set(present) - set(names))
    if not names:
        raise Skip(f"no {metric} curves for {group_key(model, dataset)}")
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.0 * len(names), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    colors = run.colors
    for ax, name in zip(axes, names, strict=True):
        curves = _curves(run, model, dataset, metric, name)
        for method, values in curves.items():
            _band(ax, np.arange(1, values.shape[1] + 1), values, color=colors[method], label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(
            xlabel="layers randomized, top down (step)",
            ylabel=f"{name} similarity to the original map",
            title=name,
        )
    axes[-1].legend(title="method", fontsize="small")
    fig.suptitle(
        f"{metric}: {model} on {dataset} (mean, 95% CI; lower after randomization is better)"
    )
    return fig


def fig_robustness(run: RunFolder, model: str, dataset: str, metrics: list[str]):
    """Mean and 95% CI of each robustness and adversarial metric, per method."""
    summary = run.summary
    group = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    metrics = [m for m in metrics if m in set(group["metric"])]
    if not metrics:
        raise Skip(f"no robustness or adversarial results for {group_key(model, dataset)}")
    methods = run.order("methods", group["method"])
    colors = run.colors
    fig = _figure(0.6 * len(methods) * len(metrics) + 2.0 * len(metrics), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, metric in zip(axes, metrics, strict=True):
        cells = group[group["metric"] == metric].set_index("method")
        names = [m for m in methods if m in cells.index]
        mean = cells.loc[names, "mean"].to_numpy(dtype=np.float64)
        lo = np.minimum(cells.loc[names, "ci_low"].to_numpy(dtype=np.float64), mean)
        hi = np.maximum(cells.loc[names, "ci_high"].to_numpy(dtype=np.float64), mean)
        ax.bar(
            names,
            mean,
            yerr=[mean - lo, hi - mean],
            color=[colors[m] for m in names],
            capsize=3,
        )
        info = run.metric_info(metric)
        ax.set_title(f"{metric}{_arrow(info.get('higher_is_better'))} ({info.get('kind')})")
        ax.set_ylabel("mean over images (95% CI)")
        ax.tick_params(axis="x", labelrotation=45)
    fig.suptitle(f"robustness: {model} on {dataset}")
    return fig


def layer_sweep(run: RunFolder, model: str, dataset: str) -> tuple[list[str], dict[str, dict]]:
    """Of a layer sweep in one group: the layers, shallow to deep (the plan's order), and
    per method entry, layer -> its variant's label; empty when the group has none."""
    summary = run.summary
    present = set(summary[(summary["model"] == model) & (summary["dataset"] == dataset)]["method"])
    layers: list[str] = []
    entries: dict[str, dict] = {}
    for label, meta in run.stored.manifest.methods.items():
        if label in present and meta.get("entry") and meta.get("layer"):
            layers.append(meta["layer"])
            entries.setdefault(meta["entry"], {})[meta["layer"]] = label
    return list(dict.fromkeys(layers)), entries


def fig_layers(run: RunFolder, model: str, dataset: str):
    """Each metric's mean (95% CI) against the target layer, shallow to deep, one line per
    method of a layer sweep; each tick names the layer and the size of its map."""
    layers, entries = layer_sweep(run, model, dataset)
    if not layers:
        raise Skip(f"no layer sweep in {group_key(model, dataset)}")
    summary = run.summary
    group = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    metrics = [
        k
        for k in run.order("metrics", group["metric"])
        if run.metric_info(k).get("kind") not in ("cost", "conformance", None)
    ]
    if not metrics:
        raise Skip(f"no quality metric in {group_key(model, dataset)}")
    report = (run.stored.manifest.models or {}).get(group_key(model, dataset)) or {}
    sizes = report.get("layer_sizes") or {}
    ticks = [
        f"{layer}\n{'x'.join(map(str, sizes[layer]))}" if sizes.get(layer) else layer
        for layer in layers
    ]
    palette = run.colors
    fig = _figure(max(4.0, 0.9 * len(layers) + 1.5) * len(metrics), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, metric in zip(axes, metrics, strict=True):
        cells = group[group["metric"] == metric].set_index("method")
        for entry, by_layer in entries.items():
            xs = [i for i, layer in enumerate(layers) if by_layer.get(layer) in cells.index]
            if not xs:
                continue
            rows = cells.loc[[by_layer[layers[i]] for i in xs]]
            mean = rows["mean"].to_numpy(dtype=np.float64)
            lo = np.minimum(rows["ci_low"].to_numpy(dtype=np.float64), mean)
            hi = np.maximum(rows["ci_high"].to_numpy(dtype=np.float64), mean)
            color = palette[by_layer[layers[xs[-1]]]]
            ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3,
                        color=color, label=entry)
        info = run.metric_info(metric)
        ax.set_title(f"{metric}{_arrow(info.get('higher_is_better'))}")
        ax.set_xticks(range(len(layers)), ticks, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("target layer, shallow to deep (map size)")
        ax.set_ylabel("mean over images (95% CI)")
        ax.legend(fontsize=7)
    fig.suptitle(f"layer sweep: {model} on {dataset}")
    return fig


def fig_cam_equivalence(run: RunFolder, model: str, dataset: str):
    """ReLU(CAM) against Grad-CAM, pixel by pixel (min-max per map), with Pearson's r.

    On a GAP + linear head Grad-CAM's weights are CAM's divided by the map's area, so
    Grad-CAM = ReLU(CAM) / Z at the target layer's resolution; CAM itself keeps its negative
    evidence (as in the paper), hence the ReLU here. At the input resolution the points sit
    on the diagonal except near CAM's zero crossings, where they sit above it: Grad-CAM
    upsamples after its ReLU, and a bilinear mean of ReLUs is at least the ReLU of the mean.
    """
    maps = example_maps(run, run.examples(model, dataset))
    cam = run.labels("methods", ["cam"], maps)
    grad = run.labels("methods", ["gradcam"], maps)
    if not cam or not grad:
        raise Skip(f"examples of {group_key(model, dataset)} hold no CAM and Grad-CAM maps")
    a = np.concatenate([minmax(np.maximum(m, 0)).ravel() for m in maps[cam[0]]])
    b = np.concatenate([minmax(m).ravel() for m in maps[grad[0]]])
    if a.shape != b.shape:
        raise Skip(f"{cam[0]} and {grad[0]} maps differ in shape in {group_key(model, dataset)}")
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else float("nan")
    shown = np.arange(len(a))
    if len(a) > MAX_SCATTER_POINTS:
        shown = np.random.default_rng(0).choice(len(a), MAX_SCATTER_POINTS, replace=False)
    fig = _figure(3.8, 3.8)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, zorder=1)
    alpha = 0.6 if len(shown) < 2000 else 0.2
    ax.scatter(a[shown], b[shown], s=6, alpha=alpha, lw=0, rasterized=True, zorder=2)
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        aspect="equal",
        xlabel=f"ReLU({cam[0]}) (min-max per map)",
        ylabel=f"{grad[0]} (min-max per map)",
        title=f"{model} on {dataset}: Pearson r = {r:.4f}",
    )
    return fig


# ---------------------------------------------------------------------------------------
# Orchestration


def cd_blocks(rows: pd.DataFrame, metric: str, higher_is_better: bool):
    """Blocks x methods of one metric's values, signed so higher is better, and what the
    blocks are: the (model, dataset) groups' means when there are at least 3 groups, else
    the images; only methods every block has."""
    sub = rows[(rows["metric"] == metric) & (rows["output"] == "value")]
    sign = 1.0 if higher_is_better else -1.0
    groups = sub[["model", "dataset"]].drop_duplicates()
    if len(groups) >= 3:
        wide = sub.pivot_table(index=["model", "dataset"], columns="method", values="value")
        what = f"{len(groups)} model x dataset groups"
    else:
        wide = sub.pivot_table(
            index=["model", "dataset", "sample_id"],
            columns="method",
            values="value",
            aggfunc="first",
        )
        what = "images"
    wide = (sign * wide).dropna(axis=0, how="any")
    return wide, f"{len(wide)} {what}" if what == "images" else what


def fig_cd(run: RunFolder, metric: str):
    """Critical-difference diagram of one metric across the run's blocks (``cd_blocks``)."""
    import scikit_posthocs as sp
    from scipy import stats as sps

    info = run.metric_info(metric)
    wide, what = cd_blocks(run.rows, metric, bool(info.get("higher_is_better", True)))
    if wide.shape[1] < 3 or len(wide) < 6:
        raise Skip(
            f"critical-difference diagram of {metric}: needs 3 or more methods on 6 or more "
            f"blocks that all scored ({wide.shape[1]} methods on {len(wide)})"
        )
    friedman = sps.friedmanchisquare(*[wide[c].to_numpy() for c in wide.columns])
    ranks = wide.rank(axis=1, ascending=False).mean()
    sig = sp.posthoc_nemenyi_friedman(wide.to_numpy())
    sig.index = sig.columns = list(wide.columns)
    fig = _figure(7.0, 0.35 * len(ranks) + 1.6)
    ax = fig.subplots()
    sp.critical_difference_diagram(ranks, sig, ax=ax)
    ax.set_title(
        f"{metric}{_arrow(info.get('higher_is_better'))}: mean rank over {what} "
        f"(Friedman p = {friedman.pvalue:.2g}; bars: Nemenyi p >= 0.05)",
        fontsize=9,
    )
    return fig


def _jobs(run: RunFolder) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(file stem, draw) for every figure the run's inputs allow; notes for the others."""
    groups = run.groups()
    metric_labels = set()
    for frame in (run.rows, run.curves, run.leaderboard):
        if frame is not None:
            metric_labels |= set(frame["metric"])
    uses = {lab: run.use("metrics", lab) for lab in metric_labels}
    aopc = [lab for lab in run.order("metrics", metric_labels) if uses[lab] == "aopc_morf"]
    time = [lab for lab in run.order("metrics", metric_labels) if uses[lab] == "time"]
    sanity = [
        lab for lab in run.order("metrics", metric_labels) if uses[lab] == "model_randomization"
    ]
    robust = [
        lab
        for lab in run.order("metrics", metric_labels)
        if run.metric_info(lab).get("kind") in ("robustness", "adversarial")
    ]

    for m, d in groups:
        g = f"{slug(m)}--{slug(d)}"
        yield f"heatmaps--{g}", lambda m=m, d=d: fig_heatmaps(run, m, d)

    if run.curves is None:
        note("skipped MoRF and sanity curves: no curves.parquet")
    else:
        if not aopc:
            note("skipped MoRF curves: the run has no aopc_morf metric")
        if not sanity:
            note("skipped sanity curves: the run has no model_randomization metric")
        for (m, d), metric in product(groups, aopc):
            stem = f"morf--{slug(m)}--{slug(d)}--{slug(metric)}"
            yield stem, lambda m=m, d=d, k=metric: fig_morf(run, m, d, k)
        for (m, d), metric in product(groups, sanity):
            stem = f"sanity--{slug(m)}--{slug(d)}--{slug(metric)}"
            yield stem, lambda m=m, d=d, k=metric: fig_sanity(run, m, d, k)

    if run.leaderboard is None:
        note("skipped rank tables: the run has no leaderboard")
    else:
        ranked = run.leaderboard[run.leaderboard["status"] == "ok"]
        ranked_groups = sorted(
            set(zip(ranked["model"], ranked["dataset"], strict=True)), key=lambda p: (p[1], p[0])
        )
        for m, d in ranked_groups:
            yield f"ranks--{slug(m)}--{slug(d)}", lambda m=m, d=d: fig_ranks(run, m, d)
        if len(ranked_groups) > 1:
            yield "ranks--mean", lambda: fig_ranks(run, None, None)

    if run.summary is None:
        note("skipped time vs AOPC and robustness: the run has no leaderboard or rows.parquet")
    else:
        if not aopc or not time:
            note("skipped time vs AOPC: the run needs both an aopc_morf and a time metric")
        for (m, d), a, t in product(groups, aopc, time):
            stem = f"pareto--{slug(m)}--{slug(d)}--{slug(a)}--{slug(t)}"
            yield stem, lambda m=m, d=d, a=a, t=t: fig_pareto(run, m, d, a, t)
        if not robust:
            note("skipped robustness: the run has no robustness or adversarial metric")
        else:
            for m, d in groups:
                yield (
                    f"robustness--{slug(m)}--{slug(d)}",
                    lambda m=m, d=d: fig_robustness(run, m, d, robust),
                )

    if run.summary is not None:
        for m, d in groups:
            if layer_sweep(run, m, d)[0]:
                yield f"layers--{slug(m)}--{slug(d)}", lambda m=m, d=d: fig_layers(run, m, d)

    for m, d in groups:
        yield (
            f"cam-equivalence--{slug(m)}--{slug(d)}",
            lambda m=m, d=d: fig_cam_equivalence(run, m, d),
        )

    if run.rows is not None:
        primary = [
            lab
            for lab in run.order("metrics", metric_labels)
            if run.metric_info(lab).get("kind") not in ("cost", None)
            and lab in set(run.rows["metric"])
        ]
        for metric in primary:
            yield f"cd--{slug(metric)}", lambda k=metric: fig_cd(run, k)


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The formats, lower case, each one matplotlib can write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    supported = FigureCanvasAgg.get_supported_filetypes()
    formats = tuple(dict.fromkeys(str(f).lower().lstrip(".") for f in formats))
    if not formats:
        raise UserError("--formats needs at least one format, e.g. --formats pdf png")
    unknown = [f for f in formats if f not in supported]
    if unknown:
        raise UserError(
            f"unknown figure format {', '.join(unknown)}; use some of {', '.join(sorted(supported))}"
        )
    return formats


def save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` once per format, each file atomically; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        # no creation date in the PDF, so a rerun gives the same file
        meta = {"CreationDate": None} if fmt == "pdf" else None
        atomic_write(
            path, lambda tmp, fmt=fmt, meta=meta: fig.savefig(tmp, format=fmt, metadata=meta)
        )
        paths.append(path)
    return paths


def make_figures(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> list[Path]:
    """Write every figure the run folder's contents allow; return the files written.

    Figures whose inputs are absent are skipped with a one-line note on stderr. A missing
    run folder, one with no results, or an unknown format raises ``UserError``.
    """
    formats = check_formats(formats)
    run = RunFolder.load(run_dir)
    out = Path(out_dir) if out_dir is not None else run.root / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot write figures to {out} ({exc.strerror}); choose another with --out"
        ) from None
    written: list[Path] = []
    with _style():
        for stem, draw in _jobs(run):
            try:
                fig = draw()
            except Skip as why:
                note(f"skipped {stem}: {why}")
                continue
            written += save(fig, out, stem, formats)
            fig.clear()
    return written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.figures",
        description="Write the paper figures of a run folder (heatmaps, MoRF and AOPC curves, "
        "rank tables, time vs AOPC, sanity curves, robustness bars, CAM vs Grad-CAM).",
    )
    p.add_argument("run", help="run folder written by python -m benchmarks.run --out RUN")
    p.add_argument("--out", help="figure folder (default: RUN/figures)")
    p.add_argument(
        "--formats",
        nargs="+",
        default=list(DEFAULT_FORMATS),
        metavar="FMT",
        help="file formats (default: pdf png)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        written = make_figures(args.run, args.out, args.formats)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    note(f"wrote {len(written)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
