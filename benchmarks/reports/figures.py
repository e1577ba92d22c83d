"""Paper figures from a run folder:
``python -m benchmarks.figures RUN [--out DIR] [--formats pdf png] [--cmap NAME]``.

Reads what ``python -m benchmarks.run --out RUN`` wrote through ``benchmarks/engine/store.py``
(the metrics' kinds and directions come from the run's manifest, never from the live
registries, so renamed entries and runs of older versions still draw) and
writes each figure once per format to ``RUN/figures/`` (or ``--out``). A figure whose inputs
are absent (a file, a metric, a method) is skipped with a one-line note on stderr; the
others are still written. File names, with M the model and D the dataset label:

    heatmaps--M--D                 rows images, each labelled with its id, the predicted class
                                   and its probability and the true class; columns the image
                                   and every method's map, min-max normalised, over the grey
                                   image (``DEFAULT_CMAP``; ``--cmap`` for another), the lesion
                                   mask outlined solid white and the organ mask dashed; many
                                   methods wrap into bands of columns
                                   (``groups/M--D/examples.npz``)
    morf--M--D--METRIC             mean MoRF curve f(x^(k)) per method, and the running AOPC
                                   after k perturbation steps (curves of ``aopc_morf``)
    ranks--M--D, ranks--mean       method x metric ranks from the run's leaderboard
                                   (``leaderboard.parquet``; the CSV files for runs of
                                   older versions), per group and averaged over groups, with
                                   each method's mean rank over the metrics shown
                                   (``leaderboard.mean_rank``, the leaderboard's definition)
    pareto--M--D--AOPC--TIME       seconds per image (log) against AOPC-MoRF, Pareto front of
                                   lower time and higher AOPC
    sanity--M--D--METRIC           similarity to the original map after each step of the
                                   cascading randomization (``model_randomization`` curves)
    robustness--M--D               mean and 95% CI of the primary value of every metric of
                                   kind robustness or adversarial, a panel per metric
    layers--M--D                   each quality metric against the target layer of a layer
                                   sweep, a line per method
    cam-equivalence--M--D          ReLU(CAM) against Grad-CAM pixel values on a GAP model,
                                   with Pearson's r (``examples.npz``)
    cd--METRIC                     critical-difference diagram (Demsar 2006): the methods'
                                   mean ranks, methods the Friedman + Nemenyi post-hoc test
                                   cannot tell apart joined by a bar (scikit-posthocs). The
                                   blocks are the (model, dataset) groups when the run has
                                   at least 3, else the images of its groups

Sized for print: every figure is 3.5 in (a journal column) or 7 in (a page) wide and at most
9.5 in tall, with no text under 7 pt at that size; panels wrap into rows rather than
widening a figure, and a panel with nothing to show says why in its middle. Each method
keeps one colour, marker and line style in every figure of a run: seaborn's colour-blind
palette, the marker and line style telling apart the methods beyond its 10 colours.

Bands around mean curves are 95% percentile-bootstrap intervals over the images (the
leaderboard's ``bootstrap_ci``, seeded): every resampled mean is a mean of observed values,
so a band stays within the values' range (a correlation's within [-1, 1]). Bars and error
bars are the leaderboard's 95% bootstrap intervals.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: nothing is displayed and no figure is left registered (open) after a call.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
import textwrap
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
from cambench.benchmarks.reports.leaderboard import (
    BOOTSTRAP_SAMPLES,
    bootstrap_ci,
    mean_rank,
)

MAX_SCATTER_POINTS = 20_000
MAP_ALPHA = 0.5
DEFAULT_FORMATS = ("pdf", "png")
# viridis: perceptually uniform (equal steps of relevance look equal), its lightness rising
# monotonically, so it reads the same in greyscale print and under the common colour-vision
# deficiencies; over cividis, which is as safe, its wider range of hues stands out more
# against the grey image beneath the map. jet is neither (``--cmap jet`` on request).
DEFAULT_CMAP = "viridis"
COLUMN_WIDTH = 3.5  # inches: one column of a two-column journal page
PAGE_WIDTH = 7.0  # inches: the page's text width
MAX_HEIGHT = 9.5  # inches: the page's text height, less room for a caption
MIN_FONT = 7.0  # points at print size: the smallest text journals accept
FONT = 8.0  # points: titles and axis labels
LINE = 0.16  # inches: the height of one line of text at MIN_FONT, with its spacing
PALETTE_SIZE = 10  # seaborn's colour-blind palette
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
LESION_COLOR, ORGAN_COLOR = "white", "#ff5ce1"  # magenta: no hue of viridis or the grey image


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


def mean_band(
    values: np.ndarray, *, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of (N, T) curves, one row per image: the mean and its ``level``
    percentile-bootstrap interval, ignoring NaN. The rows (images) are resampled with
    replacement, the same draw for every column (a curve stays whole); each resampled mean
    is a mean of observed values, so the interval lies within the column's observed range.
    A column without NaN gets the leaderboard's ``bootstrap_ci`` of that column (the same
    seeded draw; equal up to float rounding); a column with one value gets that value.

    >>> mean, lo, hi = mean_band(np.array([[0.0, 1.0], [1.0, 1.0]]))
    >>> mean.tolist(), lo.tolist(), hi.tolist()
    ([0.5, 1.0], [0.0, 1.0], [1.0, 1.0])
    """
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    finite = np.isfinite(v)
    filled = np.where(finite, v, 0.0)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / n
    lo, hi = mean.copy(), mean.copy()
    spread = n >= 2
    if spread.any():
        rows = len(v)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, rows, size=(samples, rows))  # bootstrap_ci's draw
        counts = np.zeros((samples, rows))
        np.add.at(counts, (np.arange(samples)[:, None], draws), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            # NaN where a resample drew none of the column's values: left out below
            means = (counts @ filled[:, spread]) / (counts @ finite[:, spread])
        tail = (1 - level) / 2 * 100
        lo[spread], hi[spread] = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return mean, lo, hi


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
# Text at print size


_BREAKS = re.compile(r"(?<=[\s_/-])|(?=[\[(])")  # after a space, _, / or -; before [ or (


def text_width(text: str, size: float = MIN_FONT) -> float:
    """Width in inches of ``text`` (its widest line) at ``size`` points in the current
    font, as the renderer will set it."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    prop = FontProperties(size=size)
    measure = TextToPath().get_text_width_height_descent
    return max(measure(line, prop, ismath=False)[0] for line in str(text).split("\n")) / 72


def wrap(text: str, width: float, size: float = MIN_FONT) -> str:
    """``text`` in lines no wider than ``width`` inches at ``size`` points, broken at spaces,
    after ``_``, ``/`` or ``-`` and before ``[`` or ``(``; a piece wider than that stays
    whole. Line breaks already in ``text`` stay.

    >>> wrap("integrated_gradients", 0.7)
    'integrated_\\ngradients'
    """
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for piece in filter(None, _BREAKS.split(paragraph)):
            if line.strip() and text_width((line + piece).rstrip(), size) > width:
                lines.append(line.rstrip())
                line = piece.lstrip()
            else:
                line += piece
        lines.append(line.rstrip())
    return "\n".join(lines)


def short(text: str, chars: int = 90) -> str:
    """``text`` cut at a word to at most ``chars`` characters, on one line."""
    return textwrap.shorten(" ".join(str(text).split()), chars, placeholder=" ...")


# ---------------------------------------------------------------------------------------
# One look per method


@dataclass(frozen=True)
class MethodStyle:
    """How one method is drawn in every figure of a run: lines take its colour and line
    style, points its colour and marker."""

    color: Any
    marker: str
    linestyle: str

    def line(self) -> dict[str, Any]:
        return dict(color=self.color, marker=self.marker, ls=self.linestyle)


GREY = MethodStyle("grey", "o", "-")


def method_styles(methods: Sequence[str]) -> dict[str, MethodStyle]:
    """One (colour, marker, line style) per method, in order: seaborn's colour-blind
    palette of 10 colours, cycled; the line style changes with each pass over the palette
    and the marker cycles over 7, so no two of the first 40 methods share both colour and
    line style, nor two of the first 70 both colour and marker.

    >>> s = method_styles([f"m{i}" for i in range(13)])
    >>> s["m0"].color == s["m10"].color, s["m0"].linestyle != s["m10"].linestyle
    (True, True)
    >>> len({(v.color, v.marker) for v in s.values()})
    13
    """
    import seaborn as sns

    palette = [tuple(c) for c in sns.color_palette("colorblind", PALETTE_SIZE)]
    return {
        m: MethodStyle(
            palette[i % PALETTE_SIZE],
            MARKERS[i % len(MARKERS)],
            LINESTYLES[(i // PALETTE_SIZE) % len(LINESTYLES)],
        )
        for i, m in enumerate(methods)
    }


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
    def styles(self) -> dict[str, MethodStyle]:
        """One colour, marker and line style per method label, the same in every figure
        (``method_styles`` in suite order); grey for a method only in examples.npz."""
        present: list[str] = []
        for frame in (self.rows, self.curves, self.leaderboard):
            if frame is not None:
                present += list(frame["method"])
        methods = self.order("methods", [*(self.suite.get("methods") or {}), *present])
        return defaultdict(lambda: GREY, method_styles(methods))

    @cached_property
    def colors(self) -> dict[str, Any]:
        """One colour per method label, the same in every figure (that of ``styles``)."""
        return defaultdict(lambda: GREY.color, {m: s.color for m, s in self.styles.items()})

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

    def why_absent(self, model: str, dataset: str, metric: str) -> str:
        """Why a metric has no result in a group, in a few words: the leaderboard's status
        and reason of its cells there, else that it has none."""
        lb = self.leaderboard
        if lb is not None:
            cells = lb[
                (lb["model"] == model)
                & (lb["dataset"] == dataset)
                & (lb["metric"] == metric)
                & (lb["status"] != "ok")
            ]
            if len(cells):
                status = str(cells["status"].iloc[0]).replace("_", " ")
                reason = str(cells["reason"].iloc[0] or "")
                return short(f"{status}: {reason}" if reason else status, 70)
        return f"no {metric} results for {model} on {dataset}"

    def examples(self, model: str, dataset: str) -> dict[str, np.ndarray]:
        """``groups/M--D/examples.npz``, checked for shape; ``Skip`` saying why when it is
        absent or malformed. Of the optional arrays (labels, target, pred, probs,
        class_names, organ_masks) those of the wrong length are left out."""
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
        shapes = dict(labels=1, target=1, pred=1, probs=2, organ_masks=3)
        for key, ndim in shapes.items():
            if key in data and (data[key].ndim != ndim or len(data[key]) != k):
                del data[key]
        return data


def example_maps(run: RunFolder, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Method label -> (K, H, W) maps, in suite order."""
    maps = {key[len("maps__") :]: arr for key, arr in data.items() if key.startswith("maps__")}
    return {lab: maps[lab] for lab in run.order("methods", maps)}


def example_label(data: dict[str, np.ndarray], i: int) -> str:
    """Lines naming example ``i``: its id, the predicted class with its probability, the
    true class, and the class the maps explain where it is not the prediction (those of
    these the examples hold).

    >>> data = dict(ids=np.array(["ds/test/7"]), pred=np.array([1]), labels=np.array([0]),
    ...             probs=np.array([[0.07, 0.93]]), class_names=np.array(["normal", "pneumonia"]))
    >>> print(example_label(data, 0))
    7
    pred pneumonia 0.93
    true normal
    """
    names = [str(c) for c in data.get("class_names", ())]

    def name(c) -> str:
        return names[int(c)] if 0 <= int(c) < len(names) else str(int(c))

    ids = data.get("ids")
    lines = [str(ids[i]).rsplit("/", 1)[-1] if ids is not None else f"image {i + 1}"]
    probs, pred = data.get("probs"), data.get("pred")
    if pred is None and probs is not None:
        pred = probs.argmax(axis=1)
    if pred is not None:
        p = int(pred[i])
        known = probs is not None and 0 <= p < probs.shape[1]
        lines.append(f"pred {name(p)}" + (f" {float(probs[i, p]):.2f}" if known else ""))
    if "labels" in data:
        lines.append(f"true {name(data['labels'][i])}")
    target = data.get("target")
    if target is not None and (pred is None or int(target[i]) != int(pred[i])):
        lines.append(f"maps of {name(target[i])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Drawing


@contextmanager
def style() -> Iterator[None]:
    """The figures' look, for the figures drawn inside it: seaborn's whitegrid paper style,
    text of 7 to 9 pt at print size (``MIN_FONT``, ``FONT``), editable text in PDFs."""
    import matplotlib as mpl
    import seaborn as sns

    rc = {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("paper"),
        "font.size": FONT,
        "axes.titlesize": FONT,
        "axes.labelsize": FONT,
        "figure.titlesize": 9.0,
        "xtick.labelsize": MIN_FONT,
        "ytick.labelsize": MIN_FONT,
        "legend.fontsize": MIN_FONT,
        "legend.title_fontsize": MIN_FONT,
        "lines.linewidth": 1.2,
        "lines.markersize": 4.0,
        "pdf.fonttype": 42,  # editable text in the PDF
        "savefig.dpi": 200,
    }
    with mpl.rc_context(rc):
        yield


def _figure(width: float, height: float):
    """A Figure on an Agg canvas, outside pyplot (nothing to close, nothing displayed), a
    column or a page wide and at most ``MAX_HEIGHT`` tall."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    assert width in (COLUMN_WIDTH, PAGE_WIDTH), width
    fig = Figure(figsize=(width, min(height, MAX_HEIGHT)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panel_grid(n: int, max_cols: int) -> tuple[int, int, float]:
    """Rows, columns and figure width for ``n`` panels: one panel a column wide, more a page
    wide in rows of at most ``max_cols``."""
    if n <= 1:
        return 1, 1, COLUMN_WIDTH
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols, PAGE_WIDTH


def _suptitle(fig, text: str) -> None:
    width = fig.get_figwidth() - 0.2
    fig.suptitle(wrap(text, width, size=9.0), fontsize=9.0)


def _legend_rows(labels: Sequence[str], width: float) -> tuple[int, int]:
    """Columns and rows of a legend of ``labels`` across ``width`` inches."""
    column = max(text_width(lab) for lab in labels) + 0.55  # the handle and the spacing
    ncols = max(1, min(len(labels), int((width - 0.2) // column)))
    return ncols, math.ceil(len(labels) / ncols)


def _legend_below(fig, handles, labels, *, title: str | None = None) -> None:
    """A figure legend under the panels, in as many columns as fit the figure's width."""
    ncols, _ = _legend_rows(labels, fig.get_figwidth())
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False, title=title)


def _absent(ax, why: str, width: float, *, keep_y: bool = False) -> None:
    """A panel with nothing to show: ``why`` in its middle instead (``width``: the panel's
    width in inches, for the wrap); ``keep_y`` keeps the y tick labels (a shared axis's
    labels, which name the rows of the panels beside it)."""
    ax.tick_params(axis="x", bottom=False, labelbottom=False)
    if not keep_y:
        ax.tick_params(axis="y", left=False, labelleft=False)
    ax.grid(False)
    ax.text(
        0.5,
        0.5,
        wrap(why, 0.85 * width),
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=MIN_FONT,
        color="0.35",
    )


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


def _band(ax, x, values, *, style: MethodStyle, label: str) -> None:
    mean, lo, hi = mean_band(values)
    ax.plot(x, mean, label=label, ms=3.0, markevery=max(1, len(x) // 6), **style.line())
    ax.fill_between(x, lo, hi, color=style.color, alpha=0.15, lw=0)


def _method_handles(run: RunFolder, methods: Sequence[str], *, lines: bool):
    """Legend handles of methods: a line with its style and marker, or the marker alone."""
    from matplotlib.lines import Line2D

    styles = run.styles
    return [
        Line2D([], [], ms=4.0, **{**styles[m].line(), **({} if lines else {"ls": "none"})})
        for m in methods
    ]


# ---------------------------------------------------------------------------------------
# Figures


def heatmap_layout(n_methods: int, n_images: int, label_width: float) -> tuple[int, float]:
    """Into how many bands of columns the image and method columns wrap, and the side of a
    tile (inches): the largest tiles that fit a page's width and height, each band
    starting with the image column again.

    >>> heatmap_layout(13, 4, 1.0)  # 2 bands: the image and 7 methods wide, 2 x 4 rows
    (2, 0.6375)
    """
    width = PAGE_WIDTH - label_width - 0.9  # the row labels; the colour bar and its label
    best = (1, 0.0)
    for bands in range(1, n_methods + 1):
        cols = 1 + math.ceil(n_methods / bands)
        height = MAX_HEIGHT - 1.0 - bands * 0.5  # title and legend; each band's column titles
        tile = min(width / cols, height / (bands * n_images), 1.5)
        if tile > best[1] + 1e-9:
            best = (bands, round(tile, 4))
    return best


OUTLINES = (  # examples.npz key, colour, line style, what it is
    ("masks", LESION_COLOR, "-", "lesion mask"),
    ("organ_masks", ORGAN_COLOR, "--", "organ mask"),
)


def _stroke(ls: str) -> list:
    """A black edge under a solid white outline, so it shows on light maps and on paper."""
    import matplotlib.patheffects as pe

    return [pe.withStroke(linewidth=1.8, foreground="black")] if ls == "-" else []


def _column_titles(methods: Sequence[str], tile: float) -> tuple[dict[str, str], bool, float]:
    """Each method's column title wrapped to the tile's width, whether the titles stand
    upright instead (a piece too wide to wrap), and the height they take (inches)."""
    titles = {m: wrap(m, 0.96 * tile) for m in methods}
    if max(text_width(t) for t in titles.values()) <= 0.98 * tile:
        return titles, False, max(t.count("\n") + 1 for t in titles.values()) * LINE + 0.1
    return {m: m for m in methods}, True, max(text_width(m) for m in methods) + 0.1


def _tile(ax, grey: np.ndarray, relevance: np.ndarray | None, masks: list, *, cmap: str) -> None:
    """One tile: the grey image, the map over it (None in the image column; a map with no
    finite value says "no map"), and ``masks`` outlined: (mask, colour, line style)."""
    h, w = grey.shape
    extent = (0, w, h, 0)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    if relevance is not None and np.isfinite(relevance).any():
        ax.imshow(
            minmax(relevance),
            cmap=cmap,
            vmin=0,
            vmax=1,
            alpha=MAP_ALPHA,
            extent=extent,
            interpolation="nearest",
        )
    elif relevance is not None:
        ax.text(
            0.5,
            0.5,
            "no map",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=MIN_FONT,
            color="white",
            path_effects=_stroke("-"),
        )
    for mask, color, ls in masks:
        if mask.any() and not mask.all():
            ax.contour(
                np.linspace(0, w, mask.shape[1]),
                np.linspace(0, h, mask.shape[0]),
                mask.astype(float),
                levels=[0.5],
                colors=color,
                linewidths=0.9,
                linestyles=ls,
            ).set(path_effects=_stroke(ls))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def fig_heatmaps(run: RunFolder, model: str, dataset: str, *, cmap: str = DEFAULT_CMAP):
    """Rows images, labelled with what the model predicted; columns the image and each
    method's map, min-max normalised, over the grey image; the lesion and organ masks
    outlined. With many methods the columns wrap into bands, each starting with the image
    again (``heatmap_layout``); a method with no map of an image says so."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    data = run.examples(model, dataset)
    maps = example_maps(run, data)
    if not maps:
        raise Skip(f"no maps__<method> arrays in the examples of {group_key(model, dataset)}")
    images = data["images"]
    k, methods = len(images), list(maps)
    labels = [wrap(example_label(data, i), 1.3) for i in range(k)]
    bands, tile = heatmap_layout(len(methods), k, max(map(text_width, labels)) + 0.12)
    per_band = math.ceil(len(methods) / bands)
    columns = [methods[b * per_band : (b + 1) * per_band] for b in range(bands)]
    titles, upright, header = _column_titles(methods, tile)
    outlines = [o for o in OUTLINES if o[0] in data and data[o[0]].any()]
    height = 0.45 + (0.3 if outlines else 0.0) + bands * (header + k * tile + 0.1)
    fig = _figure(PAGE_WIDTH, height)
    axes = fig.subplots(bands * k, 1 + per_band, squeeze=False)
    for b, i in product(range(bands), range(k)):
        grey = np.clip(images[i].mean(axis=0), 0.0, 1.0)
        masks = [(data[key][i], color, ls) for key, color, ls, _ in outlines]
        row = axes[b * k + i]
        for ax, method in zip(row, [None, *columns[b]], strict=False):
            relevance = None if method is None else np.asarray(maps[method][i], dtype=float)
            _tile(ax, grey, relevance, masks, cmap=cmap)
            if i == 0:
                title = "image" if method is None else titles[method]
                ax.set_title(title, fontsize=MIN_FONT, rotation=90 if upright else 0, pad=3)
        for ax in row[1 + len(columns[b]) :]:
            ax.set_axis_off()
        row[0].set_ylabel(labels[i], fontsize=MIN_FONT, rotation=0, ha="right", va="center")
    bar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap=cmap), ax=axes, shrink=0.6, aspect=30, pad=0.01
    )
    bar_length, label = 0.6 * bands * k * tile, "relevance (min-max per map)"
    bar.set_label(wrap(label, bar_length) if text_width(label) > bar_length else label)
    if outlines:
        handles = [
            Line2D([], [], color=c, ls=ls, lw=0.9, path_effects=_stroke(ls))
            for _, c, ls, _ in outlines
        ]
        fig.legend(
            handles,
            [what for *_, what in outlines],
            loc="outside lower center",
            ncols=len(handles),
            frameon=False,
        )
    _suptitle(fig, f"{model} on {dataset}: each map min-max normalised, over the grey image")
    return fig


def fig_morf(run: RunFolder, model: str, dataset: str, metric: str):
    """Mean MoRF curve and running AOPC against perturbation steps, per method."""
    curves = _curves(run, model, dataset, metric, "morf")
    if not curves:
        raise Skip(f"no {metric} 'morf' curves for {group_key(model, dataset)}")
    styles = run.styles
    _, legend_rows = _legend_rows(list(curves), PAGE_WIDTH)
    fig = _figure(PAGE_WIDTH, 2.9 + legend_rows * LINE)
    ax_curve, ax_aopc = fig.subplots(1, 2)
    for method, values in curves.items():
        steps = np.arange(values.shape[1])
        _band(ax_curve, steps, values, style=styles[method], label=method)
        _band(ax_aopc, steps, running_aopc(values), style=styles[method], label=method)
    ax_curve.set(
        xlabel="perturbation steps k (most relevant regions first)",
        ylabel="class score f(x⁽ᵏ⁾)",
        title="MoRF curve",
    )
    ax_aopc.set(xlabel="perturbation steps k", ylabel="AOPC after k steps", title="running AOPC")
    _legend_below(fig, *ax_curve.get_legend_handles_labels())
    _suptitle(fig, f"{metric}: {model} on {dataset} (mean and 95% bootstrap CI over images)")
    return fig


def _rank_table(fig, table: pd.DataFrame, labels: list[str], shape) -> None:
    """Methods x metrics of ranks with each method's ``mean_rank`` as the last column,
    sorted by it; ``labels``: of the columns, the mean rank's last; ``shape``: the cell's
    width and height in inches, and whether the column labels are turned upright."""
    import seaborn as sns

    cell_w, cell_h, rotate = shape
    table = table.copy()
    table["mean rank"] = mean_rank(table)
    table = table.sort_values("mean rank", kind="stable")
    table.columns = labels
    annot = table.map(
        lambda v: "" if pd.isna(v) else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")
    )
    ax = fig.subplots()
    fits = cell_w >= text_width("10.5") + 0.06 and cell_h >= 0.13
    sns.heatmap(
        table.astype(float),
        ax=ax,
        annot=annot.to_numpy() if fits else False,
        annot_kws={"fontsize": MIN_FONT},
        fmt="",
        cmap="viridis_r",
        cbar_kws={"label": "rank (1 = best)", "shrink": min(1.0, 2.0 / (cell_h * len(table)))},
        linewidths=0.5,
        xticklabels=True,
        yticklabels=True,
    )
    ax.axvline(table.shape[1] - 1, color="white", lw=3)  # sets the mean-rank column apart
    ax.set(xlabel="", ylabel="")
    ax.tick_params(axis="y", labelrotation=0)
    ax.tick_params(axis="x", labelrotation=90 if rotate else 0)
    ax.grid(False)


def fig_ranks(run: RunFolder, model: str | None, dataset: str | None):
    """Method x metric rank table of one group, or the ranks averaged over groups (model
    None), with each method's mean rank over the metrics shown (``mean_rank``: ranks of
    0, too few images to rank, are left out as in the leaderboard)."""
    lb = run.leaderboard
    ok = lb[lb["status"] == "ok"]
    if model is not None:
        ok = ok[(ok["model"] == model) & (ok["dataset"] == dataset)]
    if not len(ok):
        where = "any group" if model is None else group_key(model, dataset)
        raise Skip(f"no ranked cells in leaderboard.csv for {where}")
    ranked = ok.assign(rank=ok["rank"].where(ok["rank"] > 0))
    table = ranked.pivot_table(
        index="method", columns="metric", values="rank", aggfunc="mean", dropna=False
    )
    table = table.loc[run.order("methods", table.index), run.order("metrics", table.columns)]
    table = table.dropna(axis=1, how="all")  # metrics with no ranks (cost): not a column
    if not table.shape[1]:
        where = "any group" if model is None else group_key(model, dataset)
        raise Skip(f"no ranked metric for {where}")
    directions = {
        m: bool(g["higher_is_better"].iloc[0]) for m, g in lb.groupby("metric", sort=False)
    }
    n_metrics = table.shape[1]
    if model is None:
        n = ok[["model", "dataset"]].drop_duplicates().shape[0]
        title = f"ranks averaged over {n} model x dataset groups"
    else:
        title = f"ranks: {model} on {dataset}"
    title += f"; last column: mean rank over the {n_metrics} metrics (1 = best)"
    columns = [f"{c}{_arrow(directions.get(c))}" for c in [*table.columns, "mean rank"]]
    label_w = max(text_width(m) for m in table.index) + 0.15
    spare = 1.1  # the colour bar, its label and the margins
    width = COLUMN_WIDTH if label_w + spare + 0.45 * len(columns) <= COLUMN_WIDTH else PAGE_WIDTH
    cell_w = (width - label_w - spare) / len(columns)
    labels = [wrap(c, 0.95 * cell_w) for c in columns]
    rotate = max(text_width(c) for c in labels) > 0.95 * cell_w  # upright, unwrapped
    labels = columns if rotate else labels
    x_labels = (
        max(text_width(c) for c in labels)
        if rotate
        else max((c.count("\n") + 1) * LINE for c in labels)
    )
    title_h = (wrap(title, width - 0.2, 9.0).count("\n") + 1) * 0.18
    head = x_labels + title_h + 0.25
    cell_h = min(0.22, (MAX_HEIGHT - head) / len(table))
    fig = _figure(width, head + cell_h * len(table) + 0.1)
    _rank_table(fig, table, labels, (cell_w, cell_h, rotate))
    _suptitle(fig, title)
    return fig


def place_labels(ax, x: Sequence[float], y: Sequence[float], texts: Sequence[str]) -> list:
    """Label each point (data coordinates) with its text where the label's box lies inside
    the axes and overlaps no other label and no point: 8 directions at growing distances
    are tried in turn, a leader line drawn beyond the nearest two; a label with no free
    place is left out (the figure's legend names every point). The boxes are measured with
    the renderer after the figure's layout is settled; labels inside the axes leave it as
    it is. Returns the labels placed."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.draw_without_rendering()  # the layout, so display positions are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer).padded(-2)
    px = fig.dpi / 72
    points = ax.transData.transform(np.column_stack([x, y]))
    r = 3.5 * px  # a marker's radius, with a margin
    taken = [Bbox.from_extents(u - r, v - r, u + r, v + r) for u, v in points]
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    placed = []
    for (xi, yi), text in zip(zip(x, y, strict=True), texts, strict=True):
        for dist, (dx, dy) in product((3, 7, 13, 20, 30), directions):
            ann = ax.annotate(
                text,
                (xi, yi),
                xytext=(dx * dist, dy * dist),
                textcoords="offset points",
                ha={1: "left", -1: "right", 0: "center"}[dx],
                va={1: "bottom", -1: "top", 0: "center"}[dy],
                fontsize=MIN_FONT,
                arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4", shrinkA=0, shrinkB=3)
                if dist > 7
                else None,
            )
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.padded(1).overlaps(t) for t in taken):
                taken.append(box)
                placed.append(ann)
                break
            ann.remove()
    return placed


def fig_pareto(run: RunFolder, model: str, dataset: str, aopc: str, time: str):
    """Seconds per image (log) against AOPC-MoRF, with the Pareto front drawn; each point
    labelled where a label fits (``place_labels``), every method named in the legend."""
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
    styles = run.styles
    fig = _figure(PAGE_WIDTH, max(3.8, (len(methods) + 2) * LINE + 0.8))
    ax = fig.subplots()
    ax.set_xscale("log")
    for i, method in enumerate(methods):
        ax.errorbar(
            x[i],
            y[i],
            xerr=[[x[i] - x_lo[i]], [x_hi[i] - x[i]]],
            yerr=[[y[i] - y_lo[i]], [y_hi[i] - y[i]]],
            fmt=styles[method].marker,
            color=styles[method].color,
            ms=4.5,
            elinewidth=0.7,
            capsize=1.5,
            label=method,
        )
    front = pareto_front(x, y)
    ax.step(x[front], y[front], where="post", color="black", ls="--", lw=1, label="Pareto front")
    ax.set(
        xlabel=f"{time}: seconds per image (log scale)",
        ylabel=f"{aopc} (higher is better)",
    )
    ax.margins(0.12)
    ax.set_title(f"{model} on {dataset}: cost against faithfulness (mean, 95% CI)")
    fig.legend(loc="outside right upper", frameon=False)
    place_labels(ax, x, y, methods)
    return fig


def fig_sanity(run: RunFolder, model: str, dataset: str, metric: str):
    """Similarity to the original map after each cascading-randomization step, per method;
    a panel per curve the metric gives in the run (Spearman, SSIM, ...), one the group
    lacks saying so."""
    from matplotlib.ticker import MaxNLocator

    curves = run.curves[run.curves["metric"] == metric]
    here = curves[(curves["model"] == model) & (curves["dataset"] == dataset)]["curve"]
    if not len(here):
        raise Skip(f"no {metric} curves for {group_key(model, dataset)}")
    present = set(curves["curve"])
    names = [c for c in ("spearman", "ssim") if c in present]
    names += sorted(present - set(names))
    rows, cols, width = _panel_grid(len(names), 2)
    drawn = {name: _curves(run, model, dataset, metric, name) for name in names}
    methods = run.order("methods", [m for c in drawn.values() for m in c])
    ncols, legend_rows = _legend_rows(methods, width)
    fig = _figure(width, 0.5 + rows * 2.6 + legend_rows * LINE + 0.2)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    styles = run.styles
    for ax, name in zip(axes, names, strict=False):
        ax.set_title(name)
        if not drawn[name]:
            _absent(ax, f"no {name} curves for {model} on {dataset}", width / cols)
            continue
        for method, values in drawn[name].items():
            steps = np.arange(1, values.shape[1] + 1)
            _band(ax, steps, values, style=styles[method], label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="layers randomized, top down (step)", ylabel=f"{name} to the original map")
    for ax in axes[len(names) :]:
        ax.remove()
    _legend_below(fig, _method_handles(run, methods, lines=True), methods)
    _suptitle(
        fig,
        f"{metric}: {model} on {dataset} (mean and 95% bootstrap CI over images; "
        "lower after randomization is better)",
    )
    return fig


def fig_robustness(run: RunFolder, model: str, dataset: str, metrics: list[str]):
    """Mean and 95% CI of each robustness and adversarial metric of the run, per method; a
    panel per metric in rows of three, one the group has no result of saying why."""
    from matplotlib.ticker import MaxNLocator

    summary = run.summary
    group = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    if not set(metrics) & set(group["metric"]):
        raise Skip(f"no robustness or adversarial results for {group_key(model, dataset)}")
    methods = run.order("methods", group[group["metric"].isin(metrics)]["method"])
    rows, cols, width = _panel_grid(len(metrics), 3)
    step = min(0.17, max(0.12, (MAX_HEIGHT - 0.6 - rows * 0.75) / (rows * len(methods))))
    fig = _figure(width, 0.6 + rows * (0.75 + step * len(methods)))
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    styles = run.styles
    panel_w = (width - max(text_width(m) for m in methods) - 0.3) / cols
    for i, (ax, metric) in enumerate(zip(axes, metrics, strict=False)):
        info = run.metric_info(metric)
        title = f"{metric}{_arrow(info.get('higher_is_better'))} ({info.get('kind')})"
        ax.set_title(wrap(title, panel_w, FONT))
        cells = group[group["metric"] == metric].set_index("method")
        if not len(cells):
            _absent(ax, run.why_absent(model, dataset, metric), panel_w, keep_y=i % cols == 0)
            continue
        for j, method in enumerate(methods):
            if method not in cells.index:
                continue
            mean = float(cells.loc[method, "mean"])
            lo = min(float(cells.loc[method, "ci_low"]), mean)
            hi = max(float(cells.loc[method, "ci_high"]), mean)
            ax.errorbar(
                mean,
                j,
                xerr=[[mean - lo], [hi - mean]],
                fmt=styles[method].marker,
                color=styles[method].color,
                ms=4.0,
                elinewidth=0.8,
                capsize=1.5,
            )
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.grid(axis="y", visible=False)
    for ax in axes[len(metrics) :]:
        ax.remove()
    axes[0].set_yticks(range(len(methods)), methods)
    axes[0].set_ylim(len(methods) - 0.5, -0.5)
    _suptitle(fig, f"robustness: {model} on {dataset} (mean over images, 95% CI)")
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
    """Each quality metric's mean (95% CI) against the target layer, shallow to deep, one
    line per method of a layer sweep, a panel per metric of the run in rows of three (one
    with no result of the sweep here saying why); each tick names the layer and the size
    of its map."""
    from matplotlib.ticker import MaxNLocator

    layers, entries = layer_sweep(run, model, dataset)
    if not layers:
        raise Skip(f"no layer sweep in {group_key(model, dataset)}")
    summary = run.summary
    group = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
    quality = ("cost", "conformance", None)
    if not any(run.metric_info(k).get("kind") not in quality for k in set(group["metric"])):
        raise Skip(f"no quality metric in {group_key(model, dataset)}")
    metrics = [
        k
        for k in run.order("metrics", summary["metric"])
        if run.metric_info(k).get("kind") not in quality
    ]
    report = (run.stored.manifest.models or {}).get(group_key(model, dataset)) or {}
    sizes = report.get("layer_sizes") or {}
    ticks = [
        f"{layer}\n{'x'.join(map(str, sizes[layer]))}" if sizes.get(layer) else layer
        for layer in layers
    ]
    rows, cols, width = _panel_grid(len(metrics), 3)
    panel_w = (width - 0.5 * cols) / cols
    rotate = max(text_width(t) for t in ticks) > 0.9 * panel_w / len(layers)
    if rotate:  # one line each, read bottom to top
        ticks = [t.replace("\n", " (") + ")" if "\n" in t else t for t in ticks]
    tick_h = max(text_width(t) for t in ticks) if rotate else 2 * LINE
    styles = method_styles(list(entries))
    _, legend_rows = _legend_rows(list(entries), width)
    fig = _figure(width, 0.6 + rows * 2.0 + tick_h + legend_rows * LINE + 0.3)
    # every panel has the same layers: tick labels under the lowest panel of each column
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
    axes[0].set_xticks(range(len(layers)), ticks)
    axes[0].set_xlim(-0.5, len(layers) - 0.5)
    for i, ax in enumerate(axes[: len(metrics)]):
        ax.tick_params(axis="x", labelrotation=90 if rotate else 0)
        if i + cols >= len(metrics):
            ax.tick_params(axis="x", labelbottom=True)
    for ax, metric in zip(axes, metrics, strict=False):
        info = run.metric_info(metric)
        ax.set_title(wrap(f"{metric}{_arrow(info.get('higher_is_better'))}", panel_w, FONT))
        cells = group[group["metric"] == metric].set_index("method")
        drawn = False
        for entry, by_layer in entries.items():
            xs = [i for i, layer in enumerate(layers) if by_layer.get(layer) in cells.index]
            if not xs:
                continue
            rows_ = cells.loc[[by_layer[layers[i]] for i in xs]]
            mean = rows_["mean"].to_numpy(dtype=np.float64)
            lo = np.minimum(rows_["ci_low"].to_numpy(dtype=np.float64), mean)
            hi = np.maximum(rows_["ci_high"].to_numpy(dtype=np.float64), mean)
            ax.errorbar(
                xs,
                mean,
                yerr=[mean - lo, hi - mean],
                capsize=1.5,
                ms=3.5,
                label=entry,
                **styles[entry].line(),
            )
            drawn = True
        if not drawn:
            why = (
                run.why_absent(model, dataset, metric)
                if not len(cells)
                else f"no layer-sweep results of {metric} here"
            )
            _absent(ax, why, panel_w)
            continue
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    for ax in axes[len(metrics) :]:
        ax.remove()
    _legend_below(fig, _entry_handles(styles), list(entries))
    _suptitle(
        fig,
        f"layer sweep: {model} on {dataset}; mean over images (95% CI) against the target "
        "layer, shallow to deep (map size)",
    )
    return fig


def _entry_handles(styles: dict[str, MethodStyle]):
    from matplotlib.lines import Line2D

    return [Line2D([], [], ms=3.5, **s.line()) for s in styles.values()]


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
    fig = _figure(COLUMN_WIDTH, 3.7)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, zorder=1)
    alpha = 0.6 if len(shown) < 2000 else 0.2
    ax.scatter(a[shown], b[shown], s=5, alpha=alpha, lw=0, rasterized=True, zorder=2)
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        aspect="equal",
        xlabel=wrap(f"ReLU({cam[0]}) (min-max per map)", 2.6, FONT),
        ylabel=wrap(f"{grad[0]} (min-max per map)", 2.6, FONT),
    )
    # the title ends with r: wrapped before it, never inside it
    head = wrap(f"{model} on {dataset}:", 3.2, FONT)
    ax.set_title(f"{head}\nPearson r = {r:.4f}")
    return fig


# ---------------------------------------------------------------------------------------
# Critical differences


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
    """Critical-difference diagram of one metric across the run's blocks (``cd_blocks``);
    the side margins hold the method labels, the title wraps to the page."""
    import scikit_posthocs as sp
    from matplotlib.ticker import MaxNLocator
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
    fig = _figure(PAGE_WIDTH, 2.0)
    ax = fig.subplots()
    drawn = sp.critical_difference_diagram(
        ranks,
        sig,
        ax=ax,
        label_props={"fontsize": MIN_FONT},
        color_palette={m: run.colors[m] for m in ranks.index},
    )
    for label in drawn["labels"]:  # the lines keep the method's colour; text reads in black
        label.set_color("0.15")
    ax.grid(False)
    ax.set_xlim(1, len(ranks))  # the whole scale of ranks, 1 (best) to the number of methods
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # the layout makes room beside the axes for the labels; the title spans the axes
    margin = max(text_width(t.get_text()) for t in drawn["labels"]) + 0.1
    lines = -ax.dataLim.y0 + 1  # one line per label and per level of crossbars, in data units
    title = (
        f"{metric}{_arrow(info.get('higher_is_better'))}: mean rank over {what} "
        f"(Friedman p = {friedman.pvalue:.2g}; a bar joins methods the Nemenyi test cannot "
        "tell apart, p >= 0.05)"
    )
    title = wrap(title, PAGE_WIDTH - 2 * margin, FONT)
    ax.set_title(title, fontsize=FONT)
    fig.set_figheight(min(MAX_HEIGHT, 0.6 + (title.count("\n") + 1) * 0.18 + lines * 0.17))
    return fig


# ---------------------------------------------------------------------------------------
# Orchestration


def figure_jobs(
    run: RunFolder, skipped: Callable[[str], None] = note, *, cmap: str = DEFAULT_CMAP
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(file stem, draw) for every figure the run's inputs allow, in a fixed order; each
    kind of figure the inputs rule out entirely is reported once through ``skipped`` (a
    line saying which and why; by default a note on stderr). ``draw()`` returns the
    figure or raises ``Skip`` saying why it cannot; draw inside ``style()``."""
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
        yield f"heatmaps--{g}", lambda m=m, d=d: fig_heatmaps(run, m, d, cmap=cmap)

    if run.curves is None:
        skipped("skipped MoRF and sanity curves: no curves.parquet")
    else:
        if not aopc:
            skipped("skipped MoRF curves: the run has no aopc_morf metric")
        if not sanity:
            skipped("skipped sanity curves: the run has no model_randomization metric")
        for (m, d), metric in product(groups, aopc):
            stem = f"morf--{slug(m)}--{slug(d)}--{slug(metric)}"
            yield stem, lambda m=m, d=d, k=metric: fig_morf(run, m, d, k)
        for (m, d), metric in product(groups, sanity):
            stem = f"sanity--{slug(m)}--{slug(d)}--{slug(metric)}"
            yield stem, lambda m=m, d=d, k=metric: fig_sanity(run, m, d, k)

    if run.leaderboard is None:
        skipped("skipped rank tables: the run has no leaderboard")
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
        skipped("skipped time vs AOPC and robustness: the run has no leaderboard or rows.parquet")
    else:
        if not aopc or not time:
            skipped("skipped time vs AOPC: the run needs both an aopc_morf and a time metric")
        for (m, d), a, t in product(groups, aopc, time):
            stem = f"pareto--{slug(m)}--{slug(d)}--{slug(a)}--{slug(t)}"
            yield stem, lambda m=m, d=d, a=a, t=t: fig_pareto(run, m, d, a, t)
        if not robust:
            skipped("skipped robustness: the run has no robustness or adversarial metric")
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


def check_cmap(name: str) -> str:
    """``name`` when matplotlib knows it as a colour map, else a ``UserError`` for ``--cmap``
    naming some that are.

    >>> check_cmap("jet")
    'jet'
    """
    import matplotlib as mpl

    if name in mpl.colormaps:
        return name
    close = difflib.get_close_matches(str(name), list(mpl.colormaps), n=3)
    hint = f"Did you mean: {', '.join(close)}? " if close else ""
    raise UserError(
        f"--cmap {name!r} is not a matplotlib colour map. {hint}Colour-blind safe: viridis "
        "(the default), cividis, magma, inferno, plasma; also jet, turbo, gray and the "
        "others of matplotlib.colormaps"
    )


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
    cmap: str = DEFAULT_CMAP,
) -> list[Path]:
    """Write every figure the run folder's contents allow; return the files written.

    Figures whose inputs are absent are skipped with a one-line note on stderr. A missing
    run folder, one with no results, an unknown format or colour map raises ``UserError``.
    """
    formats = check_formats(formats)
    cmap = check_cmap(cmap)
    run = RunFolder.load(run_dir)
    out = Path(out_dir) if out_dir is not None else run.root / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot write figures to {out} ({exc.strerror}); choose another with --out"
        ) from None
    written: list[Path] = []
    with style():
        for stem, draw in figure_jobs(run, note, cmap=cmap):
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
    p.add_argument(
        "--cmap",
        default=DEFAULT_CMAP,
        metavar="NAME",
        help=f"matplotlib colour map of the relevance maps (default: {DEFAULT_CMAP}, "
        "colour-blind safe; e.g. jet on request)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        written = make_figures(args.run, args.out, args.formats, args.cmap)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    note(f"wrote {len(written)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
