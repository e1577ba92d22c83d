"""Aggregation and leaderboards: per (dataset, model, method, metric) the mean, a 95%
percentile-bootstrap confidence interval and n, and the paired comparisons of
``benchmarks.reports.stats`` (against ``random`` and against the best method, Holm-adjusted
within a (dataset, model, metric family)); the rank among methods (1 for the best method
and every method not distinguishable from it; 0 for a method with too few images to rank).
Mean ranks are taken within a family only. Not-applicable, skipped and failed cells keep
their reason.

Aggregation is one shared step for every metric. The bootstrap draws from a generator
seeded by the cell's key, so the numbers do not depend on the order cells are processed,
and two runs with the same results give byte-identical files.

Metrics whose values depend on the machine and its load (``MetricInfo.host_dependent``,
e.g. wall time) cannot give the same number twice; ``split_host_dependent`` sets them
apart, so ``leaderboard.csv`` is byte-identical between runs of one suite with one seed
and ``leaderboard-cost.csv`` (same columns) holds the host measurements. The Markdown and
LaTeX leaderboards show both.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cambench.benchmarks.engine.store import CSV_NAME, HOST_CSV_NAME, group_key
from cambench.benchmarks.reports.stats import (
    ALPHA,
    COMPARISON_COLUMNS,
    MIN_PAIRS,
    compare_methods,
    detectable_effect,
)

BOOTSTRAP_SAMPLES = 1000
KEYS = ["dataset", "model", "method", "metric"]
COLUMNS = [
    *KEYS,
    "higher_is_better",
    "mean",
    "ci_low",
    "ci_high",
    "n",
    "rank",
    "status",
    "reason",
    *[c for c in COMPARISON_COLUMNS if c != "rank"],
]
FAMILIES = (  # the leaderboard's tables, in this order; cost has a table of its own
    "faithfulness",
    "localization",
    "robustness",
    "sanity",
    "adversarial",
    "complexity",
    "conformance",
    "other",
)
def quality_families(present: Iterable[str]) -> list[str]:
    """The quality families among ``present`` (cost left out), in the leaderboard's order:
    ``FAMILIES`` first, then any other in the order given.

    >>> quality_families(["cost", "mine", "localization", "faithfulness"])
    ['faithfulness', 'localization', 'mine']
    """
    present = [f for f in dict.fromkeys(present) if f != "cost"]
    return [f for f in FAMILIES if f in present] + [f for f in present if f not in FAMILIES]


UNITS = {  # of the cost metrics, by use
    "time": "s per image, the median of the metric's repeated timings of its batch",
    "memory": "MiB per batch",
}


def bootstrap_ci(
    values: np.ndarray, *, seed: int, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; a single value gives [value, value]."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        v = float(values[0]) if len(values) else 0.0
        return v, v
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_rank(ranks: pd.DataFrame) -> pd.Series:
    """Methods x metrics of ranks (1 = best) -> each method's mean rank over the metrics
    it was ranked on. A rank of 0 (too few images to rank) or NaN (no result) is left out
    of that method's mean, not counted as a rank; a method ranked on none gets NaN. The
    leaderboard's "mean rank" column (within one metric family) and the figures' rank
    tables (over the metrics they show) both take it from here.

    >>> ranks = pd.DataFrame({"a": [1, 2, 0], "b": [3, None, 0]}, index=["x", "y", "z"])
    >>> mean_rank(ranks).tolist()
    [2.0, 2.0, nan]
    """
    ranks = ranks.astype(np.float64)
    return ranks.where(ranks > 0).mean(axis=1, skipna=True)


def aggregate(
    rows: pd.DataFrame,
    cells: pd.DataFrame,
    directions: dict[str, bool],
    *,
    seed: int = 0,
    families: dict[str, str] | None = None,
    randoms: Iterable[str] = ("random",),
) -> pd.DataFrame:
    """One row per cell: mean, CI, n, rank and the paired comparisons against ``random``
    and the best method (``benchmarks.reports.stats.compare_methods``) for ok cells, or
    status and reason for the others. ``families``: metric label -> kind (faithfulness,
    localization, ..., cost); p-values are Holm-adjusted within a (dataset, model,
    family)."""
    primary = rows[rows["output"] == "value"]
    records = []
    for key, grp in primary.groupby(KEYS, sort=True):
        vals = grp["value"].to_numpy(dtype=np.float64)
        cell_seed = zlib.crc32("|".join(map(str, key)).encode()) ^ seed
        lo, hi = bootstrap_ci(vals, seed=cell_seed)
        records.append(
            dict(
                zip(KEYS, key, strict=True),
                mean=float(vals.mean()),
                ci_low=lo,
                ci_high=hi,
                n=len(vals),
                status="ok",
                reason="",
            )
        )
    table = pd.DataFrame(
        records, columns=[*KEYS, "mean", "ci_low", "ci_high", "n", "status", "reason"]
    )
    others = cells[cells["status"] != "ok"][[*KEYS, "status", "reason"]]
    ok_reasons = cells[cells["status"] == "ok"][[*KEYS, "reason"]].rename(
        columns={"reason": "note"}
    )
    table = table.merge(ok_reasons, on=KEYS, how="left")
    table["reason"] = table["note"].fillna("")
    table = table.drop(columns="note")
    table = pd.concat([table, others], ignore_index=True) if len(others) else table
    table["higher_is_better"] = table["metric"].map(directions).astype(bool)
    compared = compare_methods(primary, directions, families or {}, set(randoms), seed=seed)
    table = table.merge(compared, on=KEYS, how="left")
    table["family"] = table["metric"].map(lambda m: (families or {}).get(m, "other"))
    for col in ("rank", "n_random", "n_best"):
        table[col] = table[col].fillna(0).astype(int)
    table["best_group"] = table["best_group"].fillna(False).astype(bool)
    for col in ("vs_random", "test_random", "best"):
        table[col] = table[col].fillna("")
    table["n"] = table["n"].fillna(0).astype(int)
    return table[COLUMNS].sort_values(KEYS, kind="stable").reset_index(drop=True)


def split_host_dependent(
    table: pd.DataFrame, host_metrics: Iterable[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of ``table`` whose metric is not in ``host_metrics``, and those that are, each
    in the table's order with a fresh index.

    >>> t = pd.DataFrame({"metric": ["aopc", "time", "iou"], "mean": [0.5, 0.1, 0.2]})
    >>> [list(part["metric"]) for part in split_host_dependent(t, {"time"})]
    [['aopc', 'iou'], ['time']]
    """
    host = table["metric"].isin(list(host_metrics))
    return table[~host].reset_index(drop=True), table[host].reset_index(drop=True)


def host_note(host_metrics: Iterable[str]) -> str | None:
    """The leaderboard note naming the columns that are host measurements (None if none)."""
    names = sorted(set(host_metrics))
    if not names:
        return None
    return (
        f"{', '.join(names)}: host measurements (they depend on the machine and its load, "
        f"so they differ between runs); {HOST_CSV_NAME} holds them, {CSV_NAME} the others"
    )


def _fmt(v: float) -> str:
    return f"{v:.4g}"


NUMBERS = [
    "mean",
    "ci_low",
    "ci_high",
    "p_random",
    "p_random_adj",
    "effect_random",
    "effect_random_low",
    "effect_random_high",
    "p_best_adj",
]


def to_csv(table: pd.DataFrame) -> str:
    """The table as CSV, numbers at full precision (``repr``), empty where a cell has
    none (not ok, or no test)."""
    out = table.copy()
    ok = out["status"] == "ok"
    for col in NUMBERS:
        out[col] = [
            repr(float(v)) if k and v is not None and np.isfinite(v) else ""
            for v, k in zip(out[col], ok, strict=True)
        ]
    for col in ("rank", "n_random", "n_best"):
        out[col] = [
            str(r) if k and (r or col != "rank") else "" for r, k in zip(out[col], ok, strict=True)
        ]
    return out.to_csv(index=False, lineterminator="\n")


@dataclass
class Block:
    """One (dataset, model) table of a leaderboard, ready to render."""

    dataset: str
    model: str
    metrics: list[tuple[str, bool]]  # (metric, higher_is_better)
    rows: list[tuple[str, list[dict[str, Any]]]]  # method, cells
    report: str  # the model's classification report in one line ("" if none)


def blocks(
    table: pd.DataFrame, reports: dict[str, dict] | None, footnotes: dict[str, int]
) -> list[Block]:
    """The per-(dataset, model) tables; ``footnotes`` collects the reasons of cells that are
    not ok (text -> number). Each cell is {"ok": bool, "mean", "ci_low", "ci_high", "n",
    "rank"} or {"ok": False, "status", "note"}."""
    out = []
    for (dataset, model), grp in table.groupby(["dataset", "model"], sort=True):
        metrics = [
            (m, bool(grp[grp["metric"] == m]["higher_is_better"].iloc[0]))
            for m in dict.fromkeys(grp["metric"])
        ]
        rows = []
        for method, mg in grp.groupby("method", sort=False):
            cells: list[dict[str, Any]] = []
            for m, _ in metrics:
                row = mg[mg["metric"] == m]
                if not len(row):
                    cells.append({"ok": False, "status": "", "note": 0})
                    continue
                r = row.iloc[0]
                if r["status"] == "ok":
                    cells.append(
                        {
                            "ok": True,
                            **{k: r[k] for k in ("mean", "ci_low", "ci_high", "n", "rank")},
                            "best": bool(r["best_group"]),
                            "mark": MARKS.get(r["vs_random"], ""),
                        }
                    )
                else:
                    note = footnotes.setdefault(f"{r['status']}: {r['reason']}", len(footnotes) + 1)
                    cells.append(
                        {"ok": False, "status": r["status"].replace("_", " "), "note": note}
                    )
            rows.append((method, cells))
        report = model_summary((reports or {}).get(group_key(model, dataset)))
        out.append(Block(dataset, model, metrics, rows, report))
    return out


CELL_LEGEND = (
    "Cells: mean over the images (n), and against random: ▲ better, ≈ not distinguishable, "
    "▼ worse (paired test on the images both scored, Holm-adjusted p < 0.05 within the "
    "table), · too few images for a test (fewer than 6), ref the random baseline itself. "
    "Bold: the best method and every method not distinguishable from it. Mean rank: "
    "within the table's family only (1 = best; means equal within float tolerance tie)."
)
MARKS = {
    "better": "▲",
    "worse": "▼",
    "not distinguishable": "≈",
    "too few images": "·",
    "reference": "ref",
    "": "",
}


def to_markdown(
    table: pd.DataFrame,
    *,
    title: str,
    reports: dict[str, dict] | None = None,
    notes: list[str] = (),
    compare_metric: str | None = None,
    uses: dict[str, str] | None = None,
    model_seeds: dict[str, str] | None = None,
    sections: list[str] = (),
) -> str:
    """Per (dataset, model): the model's report (flagged when it is no better than the
    majority class), one table per metric family with the marks against random, the best
    group in bold and the family's mean rank, the power of its tests, and the cost table;
    then ``sections`` (further markdown lines: the libraries' conformance); then the
    findings, written from the statistics; then, with ``compare_metric``, the models'
    accuracy, recall and F1 beside that metric."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    footnotes: dict[str, int] = {}
    findings: list[str] = []
    for (dataset, model), grp in table.groupby(["dataset", "model"], sort=True):
        lines += [f"## {dataset} / {model}", ""]
        report = (reports or {}).get(group_key(model, dataset))
        flag = model_flag(report)
        lines += [*model_lines(report, flag), ""]
        for family in quality_families(grp["family"]):
            lines += family_table(grp[grp["family"] == family], family, footnotes)
            if family == "localization" and (area := (report or {}).get("lesion_area")):
                lines += [chance_line(area), ""]
        if (grp["family"] == "cost").any():
            lines += family_table(grp[grp["family"] == "cost"], "cost", footnotes)
        findings += group_findings(grp, dataset, model, flag, uses or {})
    findings += seed_findings(table, model_seeds or {})
    lines += list(sections)
    if findings:
        lines += ["## Findings", "", *findings, ""]
    if compare_metric:
        lines += model_comparison(table, reports, compare_metric)
    if footnotes:
        lines += ["## Notes", ""]
        lines += [f"[{i}] {text}" for text, i in footnotes.items()]
        lines.append("")
    lines.append(CELL_LEGEND)
    return "\n".join(lines) + "\n"


def family_table(fam: pd.DataFrame, family: str, footnotes: dict[str, int]) -> list[str]:
    """One metric family of one (dataset, model): methods x metrics, a mean-rank column
    (not for cost), the power line (the units for cost)."""
    metrics = [
        (m, bool(g["higher_is_better"].iloc[0])) for m, g in fam.groupby("metric", sort=False)
    ]
    cost = family == "cost"
    header = "| method | " + " | ".join(f"{m} {'↑' if up else '↓'}" for m, up in metrics)
    lines = [f"### {family}", "", header + (" |" if cost else " | mean rank |")]
    lines.append("|---" * (len(metrics) + (1 if cost else 2)) + "|")
    ok = fam[fam["status"] == "ok"]
    means = mean_rank(ok.pivot_table(index="method", columns="metric", values="rank"))
    for method, mg in fam.groupby("method", sort=False):
        cells = []
        for m, _ in metrics:
            row = mg[mg["metric"] == m]
            cells.append(_cell(row.iloc[0], footnotes, cost) if len(row) else "")
        mean = means.get(method, np.nan)
        rank = "" if cost or pd.isna(mean) else f"{mean:.2f}"
        lines.append(f"| {method} | " + " | ".join(cells if cost else [*cells, rank]) + " |")
    lines.append("")
    if cost:
        units = [f"{m}: {UNITS[m]}" for m, _ in metrics if m in UNITS]
        lines += [f"Units: {'; '.join(units)}." if units else "Cost: lower is better.", ""]
    else:
        lines += [power_line(fam), ""]
    return lines


def _cell(r, footnotes: dict[str, int], cost: bool) -> str:
    if r["status"] != "ok":
        note = footnotes.setdefault(f"{r['status']}: {r['reason']}", len(footnotes) + 1)
        return f"{r['status'].replace('_', ' ')} [{note}]"
    mean = _fmt(r["mean"])
    if not cost and r["best_group"]:
        mean = f"**{mean}**"
    mark = "" if cost else MARKS.get(r["vs_random"], "")
    return f"{mean} (n={r['n']}){' ' + mark if mark else ''}"


def power_line(fam: pd.DataFrame) -> str:
    """What the table's tests could detect: the smallest paired effect at its n."""
    tested = fam[(fam["status"] == "ok") & (fam["n_random"] > 0)]
    if not len(tested):
        return "No paired test against random: the table has no random baseline or no pairs."
    lo, hi = int(tested["n_random"].min()), int(tested["n_random"].max())
    span = f"n = {lo}" if lo == hi else f"n = {lo} to {hi}"
    effect = detectable_effect(lo)
    if effect is None:
        return (
            f"Power: {span} images per comparison; below {MIN_PAIRS} no test can decide "
            f"(p < {ALPHA} is out of reach), so '·' cells say nothing either way."
        )
    return (
        f"Power: {span} images per comparison; with {lo} pairs a paired effect of "
        f"d_z = {effect:.2f} (mean difference / SD of the differences) is detected with 80% "
        f"power at alpha = {ALPHA} before Holm's adjustment: '≈' means no effect that "
        "large was seen, not that the methods are equal."
    )


def model_flag(report: dict | None) -> str:
    """Why the model's results are no evidence about the methods ("" when they are): test
    accuracy not above the majority-class rate, or a class it never recalls."""
    if not report or "accuracy" not in report:
        return ""
    classes = {k: v for k, v in report.get("classes", {}).items() if v.get("support", 0) > 0}
    total = sum(v["support"] for v in classes.values())
    if not total:
        return ""
    majority = max(v["support"] for v in classes.values()) / total
    why = []
    if report["accuracy"] <= majority + 1e-12:
        why.append(
            f"test accuracy {report['accuracy']:.3f} is not above the majority-class rate "
            f"{majority:.3f}"
        )
    never = [k for k, v in classes.items() if v.get("recall", 0.0) == 0.0]
    if never:
        why.append(f"recall is 0 on class {', '.join(never)}")
    return "; ".join(why)


def model_summary(report: dict | None) -> str:
    """The model's classification report in one sentence ("" without one)."""
    if not report or "accuracy" not in report:
        return ""
    per_class = ", ".join(
        f"{c}: P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f}"
        for c, v in report.get("classes", {}).items()
    )
    val = _validation(report)
    val_text = f", validation accuracy {val['accuracy']:.3f} (n={val.get('n', '?')})" if val else ""
    return (
        f"Model: test accuracy {report['accuracy']:.3f} (n={report.get('n', '?')}){val_text}; "
        f"{per_class}."
    )


def model_lines(report: dict | None, flag: str) -> list[str]:
    """The model's summary, and the warning when its results are no evidence (``flag``)."""
    summary = model_summary(report)
    if not summary:
        return []
    lines = [summary]
    if line := same_maps_line(report.get("same_maps") or {}):
        lines.append(line)
    if flag:
        lines.append(
            f"**Warning: {flag}. This model has not learned the task, so its results are no "
            "evidence about the explanation methods.**"
        )
    return lines


def same_maps_line(same: dict[str, list[str]]) -> str:
    """Which methods gave another method's maps (equal up to a positive factor) on this model,
    and so share its scale-free scores ("" when none did)."""
    by_source: dict[str, list[str]] = {}
    for method, sources in same.items():
        by_source.setdefault(", ".join(sources), []).append(method)
    if not by_source:
        return ""
    parts = [f"{', '.join(sorted(ms))} gave {src}'s maps" for src, ms in sorted(by_source.items())]
    return (
        f"Same maps: {'; '.join(parts)} (equal up to a positive factor, as the CAM family's "
        "are on a GAP + linear head): their faithfulness, localization and complexity scores "
        "are computed once and shared, so they tie."
    )


def seed_findings(table: pd.DataFrame, entries: dict[str, str]) -> list[str]:
    """Whether each verdict against random (better, not distinguishable, worse, too few
    images) holds for every model seed: ``entries`` maps a
    model label (``gapcnn-s1``) to the suite entry it is a seed of (``gapcnn``)."""
    ok = table[(table["status"] == "ok") & (table["family"] != "cost")]
    ok = ok[ok["model"].isin(list(entries))]
    if not len(ok):
        return []
    ok = ok.assign(entry=ok["model"].map(entries))
    out = ["### Across model seeds", ""]
    for (dataset, entry, metric), g in ok.groupby(["dataset", "entry", "metric"], sort=True):
        seeds = g["model"].nunique()
        parts = []
        for method, mg in g.groupby("method", sort=False):
            marks = mg["vs_random"].value_counts()
            if "reference" in marks:
                continue
            if len(marks) == 1 and marks.iloc[0] == seeds:
                parts.append(f"{method} {marks.index[0]} for every seed")
            else:
                counts = ", ".join(f"{mark} for {k}" for mark, k in marks.items())
                parts.append(f"{method} {counts} of {seeds} seeds: it depends on the seed")
        if parts:
            out.append(
                f"- {dataset} / {entry} ({seeds} model seeds), {metric}: " + "; ".join(parts) + "."
            )
    out.append("")
    return out if len(out) > 3 else []


def chance_line(area: dict) -> str:
    return (
        f"Chance level: a map that ignores the image scores the lesion area fraction, "
        f"{area['mean']:.3f} here (mean over {area['n']} images with a lesion), on the energy "
        "pointing game, the pointing game (tied maxima shared) and AUPRC."
    )


def contradictions(ok: pd.DataFrame, uses: dict[str, str]) -> list[str]:
    """Deletion and insertion verdicts that contradict each other: both decide some method
    against random, and over the methods with enough images to rank their orders by mean
    (in each metric's good direction) anti-correlate. Random first on deletion and last on insertion is the known effect of
    scattered pixel removal taking the images out of the model's distribution."""
    from scipy.stats import spearmanr

    out = []
    dels = [m for m in dict.fromkeys(ok["metric"]) if uses.get(m) == "deletion"]
    ins = [m for m in dict.fromkeys(ok["metric"]) if uses.get(m) == "insertion"]
    for d, i in ((d, i) for d in dels for i in ins):
        a, b = (_signed_means(ok, metric) for metric in (d, i))
        common = a.index.intersection(b.index)
        a, b = a[common], b[common]
        if len(common) < 3 or a.nunique() < 2 or b.nunique() < 2:
            continue
        decided = ok[ok["metric"].isin([d, i]) & ok["vs_random"].isin(["better", "worse"])]
        if decided["metric"].nunique() < 2:  # verdicts contradict only where both decide
            continue
        rho = float(spearmanr(a, b).statistic)
        if rho >= 0:
            continue
        flips = [
            f"{m} is {'first' if m == a.idxmax() else 'last'} on {d} and "
            f"{'first' if m == b.idxmax() else 'last'} on {i}"
            for m in common
            if {m == a.idxmax(), m == b.idxmax()} == {True, False} and m in (a.idxmin(), b.idxmin())
        ]
        why = f"their method orders correlate at Spearman rho = {rho:.2f}"
        out.append(
            f"- {d} and {i} contradict each other ({'; '.join([why, *flips])}): removing "
            "scattered pixels takes the images out of the model's distribution, so trust "
            "neither alone."
        )
    return out


def _signed_means(ok: pd.DataFrame, metric: str) -> pd.Series:
    """Method -> mean in the metric's good direction, for the methods ranked on it."""
    sub = ok[(ok["metric"] == metric) & (ok["rank"] > 0)].set_index("method")
    return sub["mean"] * np.where(sub["higher_is_better"], 1.0, -1.0)


def group_findings(
    grp: pd.DataFrame, dataset: str, model: str, flag: str, uses: dict[str, str]
) -> list[str]:
    """Sentences from the statistics of one (dataset, model): per quality metric, which
    methods beat random, which cannot be told from it, and the best group; contradicting
    deletion and insertion verdicts."""
    ok = grp[(grp["status"] == "ok") & (grp["family"] != "cost")]
    if not len(ok):
        return []
    out = [f"### {dataset} / {model}", ""]
    if flag:
        out.append(f"- Not evidence about the methods: {flag}.")
    for metric, g in ok.groupby("metric", sort=False):
        parts = []
        better, same, worse = (
            g[g["vs_random"] == v] for v in ("better", "not distinguishable", "worse")
        )
        if len(better):
            parts.append(
                f"{_names(better)} {'is' if len(better) == 1 else 'are'} better than random "
                f"(adjusted p {_bound('≤', better['p_random_adj'].max())})"
            )
        if len(same):
            parts.append(
                f"{_names(same)} {'is' if len(same) == 1 else 'are'} not distinguishable "
                f"from random (adjusted p {_bound('≥', same['p_random_adj'].min())})"
            )
        if len(worse):
            parts.append(
                f"{_names(worse)} {'is' if len(worse) == 1 else 'are'} worse than random "
                f"(adjusted p {_bound('≤', worse['p_random_adj'].max())})"
            )
        few = g[g["vs_random"] == "too few images"]
        if len(few):
            parts.append(f"{_names(few)}: too few images for a test")
        best = g[g["best_group"]]
        if len(best) and len(g) > 1:
            parts.append(f"best group: {_names(best)}")
        n = (
            f"n = {g['n'].min()}"
            if g["n"].min() == g["n"].max()
            else f"n = {g['n'].min()}-{g['n'].max()}"
        )
        out.append(f"- {metric} ({n}): " + "; ".join(parts) + ".")
    out += contradictions(ok, uses)
    out.append("")
    return out


def _names(frame: pd.DataFrame) -> str:
    return ", ".join(frame["method"])


def _bound(op: str, p: float) -> str:
    if p < 0.001:
        return "< 0.001"
    return "= 1" if p >= 1 else f"{op} {p:.2g}"


def _validation(report: dict) -> dict | None:
    """A training report's validation report, if it has one with an accuracy."""
    val = report.get("val")
    return val if isinstance(val, dict) and "accuracy" in val else None


def model_comparison(
    table: pd.DataFrame, reports: dict[str, dict] | None, metric: str
) -> list[str]:
    """Markdown: per dataset, each model's test accuracy, macro recall and macro F1 (and its
    validation accuracy, "-" where there is none) beside its mean ``metric`` per method (the
    X-ray study's model comparison)."""
    if not reports:
        return []
    sub = table[(table["metric"] == metric) & (table["status"] == "ok")]
    methods = list(dict.fromkeys(sub["method"]))
    lines = [f"## Models: accuracy, recall and F1 beside {metric}", ""]
    for dataset in sorted(set(table["dataset"])):
        rows = []
        for model in sorted(set(table.loc[table["dataset"] == dataset, "model"])):
            rep = reports.get(group_key(model, dataset), {})
            if "accuracy" not in rep:
                continue
            # macro averages over the classes the test split has (support > 0)
            classes = [c for c in rep.get("classes", {}).values() if c.get("support", 1) > 0]
            recall = np.mean([c["recall"] for c in classes]) if classes else 0.0
            f1 = np.mean([c["f1"] for c in classes]) if classes else 0.0
            cells = []
            for method in methods:
                hit = sub[
                    (sub["dataset"] == dataset)
                    & (sub["model"] == model)
                    & (sub["method"] == method)
                ]
                cells.append(_fmt(hit["mean"].iloc[0]) if len(hit) else "n/a")
            val = _validation(rep)
            val_acc = f"{val['accuracy']:.3f}" if val else "-"
            rows.append(
                f"| {model} | {rep['accuracy']:.3f} | {recall:.3f} | {f1:.3f} | {val_acc} | "
                + " | ".join(cells)
                + " |"
            )
        if rows:
            lines += [
                f"### {dataset}",
                "",
                "| model | accuracy | macro recall | macro F1 | validation accuracy | "
                + " | ".join(f"{metric}: {m}" for m in methods)
                + " |",
                "|---" * (5 + len(methods)) + "|",
                *rows,
                "",
            ]
    return lines if len(lines) > 2 else []


_TEX = str.maketrans(
    {
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "\\": r"\textbackslash{}",
    }
)


TEX_LEGEND = (
    "Mean over the images (n); superscripts against random: + better, = not distinguishable "
    "(shown as approx), - worse (paired test, Holm-adjusted p < 0.05), ? too few images for "
    "a test, r the random baseline. Bold: the best method and every method not "
    "distinguishable from it."
)
TEX_MARKS = {"▲": "$^{+}$", "▼": "$^{-}$", "≈": "$^{\\approx}$", "·": "$^{?}$", "ref": "$^{r}$"}


def tex_escape(text: str) -> str:
    return str(text).translate(_TEX)


def to_latex(
    table: pd.DataFrame,
    *,
    title: str,
    reports: dict[str, dict] | None = None,
    notes: list[str] = (),
) -> str:
    """The leaderboard as LaTeX (booktabs): one table per (dataset, model), the of each metric in bold (the best method and those not distinguishable from
    it), the mark against random beside each mean, not-applicable cells with a numbered
    note."""
    lines = [f"% {tex_escape(title)}", "% requires \\usepackage{booktabs}"]
    lines += [f"% {tex_escape(n)}" for n in notes]
    footnotes: dict[str, int] = {}
    for block in blocks(table, reports, footnotes):
        lines += [
            "\\begin{table}[ht]",
            "\\centering\\small",
            f"\\caption{{{tex_escape(block.dataset)} / {tex_escape(block.model)}. "
            + tex_escape(TEX_LEGEND)
            + (f" {tex_escape(block.report)}" if block.report else "")
            + "}",
            "\\begin{tabular}{l" + "r" * len(block.metrics) + "}",
            "\\toprule",
            "method & "
            + " & ".join(
                f"{tex_escape(m)} $\\{'uparrow' if up else 'downarrow'}$" for m, up in block.metrics
            )
            + " \\\\",
            "\\midrule",
        ]
        for method, cells in block.rows:
            text = []
            for c in cells:
                if c["ok"]:
                    mean = _fmt(c["mean"])
                    mean = f"\\textbf{{{mean}}}" if c["best"] else mean
                    text.append(f"{mean} ({c['n']}){TEX_MARKS.get(c['mark'], '')}")
                else:
                    text.append(
                        f"{tex_escape(c['status'])}$^{{{c['note']}}}$" if c["status"] else ""
                    )
            lines.append(f"{tex_escape(method)} & " + " & ".join(text) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    if footnotes:
        lines += ["% notes:"] + [f"% [{i}] {tex_escape(t)}" for t, i in footnotes.items()]
        lines += ["\\begin{itemize}\\footnotesize"]
        lines += [f"\\item[{i}] {tex_escape(t)}" for t, i in footnotes.items()]
        lines += ["\\end{itemize}"]
    return "\n".join(lines) + "\n"


def views(
    table: pd.DataFrame,
    *,
    title: str,
    notes: list[str],
    host_metrics: Iterable[str],
    reports: dict[str, dict] | None = None,
    compare_metric: str | None = None,
    uses: dict[str, str] | None = None,
    model_seeds: dict[str, str] | None = None,
    sections: list[str] = (),
) -> dict[str, str]:
    """The leaderboard's text files, by name, from its numeric table (``aggregate``):
    ``leaderboard.csv`` (reproducible metrics), ``leaderboard-cost.csv`` (host
    measurements), ``leaderboard.md`` and ``leaderboard.tex`` (both)."""
    reproducible, host_table = split_host_dependent(table, host_metrics)
    notes = list(notes)
    if note := host_note(set(host_table["metric"])):
        notes.insert(1, note)
    return {
        CSV_NAME: to_csv(reproducible),
        HOST_CSV_NAME: to_csv(host_table),
        "leaderboard.md": to_markdown(
            table,
            title=title,
            reports=reports,
            notes=notes,
            compare_metric=compare_metric,
            uses=uses,
            model_seeds=model_seeds,
            sections=sections,
        ),
        "leaderboard.tex": to_latex(table, title=title, reports=reports, notes=notes),
    }
