"""Aggregation and leaderboards: per (dataset, model, method, metric) the mean, a 95%
percentile-bootstrap confidence interval, n and the rank among methods; per method the
mean rank over metrics. Not-applicable, skipped and failed cells keep their reason.

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

from benchmarks.engine.store import CSV_NAME, HOST_CSV_NAME, group_key

BOOTSTRAP_SAMPLES = 1000
KEYS = ["dataset", "model", "method", "metric"]
COLUMNS = [*KEYS, "higher_is_better", "mean", "ci_low", "ci_high", "n", "rank", "status", "reason"]


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


def aggregate(
    rows: pd.DataFrame, cells: pd.DataFrame, directions: dict[str, bool], *, seed: int = 0
) -> pd.DataFrame:
    """One row per cell: mean, CI, n, rank (ok cells), or status and reason (the others)."""
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
    table["rank"] = 0
    ok = table["status"] == "ok"
    for _, idx in table[ok].groupby(["dataset", "model", "metric"]).groups.items():
        sub = table.loc[idx]
        signed = -sub["mean"] if bool(sub["higher_is_better"].iloc[0]) else sub["mean"]
        table.loc[idx, "rank"] = signed.rank(method="min").astype(int)
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


def mean_ranks(table: pd.DataFrame) -> pd.DataFrame:
    """Mean rank of each method over the metrics of each (dataset, model), and overall."""
    ok = table[table["status"] == "ok"]
    per_group = (
        ok.groupby(["dataset", "model", "method"], sort=True)["rank"]
        .mean()
        .rename("mean_rank")
        .reset_index()
    )
    overall = ok.groupby("method", sort=True)["rank"].mean().rename("mean_rank").reset_index()
    overall.insert(0, "model", "all")
    overall.insert(0, "dataset", "all")
    return pd.concat([per_group, overall], ignore_index=True)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def to_csv(table: pd.DataFrame) -> str:
    out = table.copy()
    for col in ("mean", "ci_low", "ci_high"):
        out[col] = [
            (_fmt(v) if s == "ok" else "") for v, s in zip(out[col], out["status"], strict=True)
        ]
    out["rank"] = [
        (str(r) if s == "ok" else "") for r, s in zip(out["rank"], out["status"], strict=True)
    ]
    return out.to_csv(index=False, lineterminator="\n")


@dataclass
class Block:
    """One (dataset, model) table of a leaderboard, ready to render."""

    dataset: str
    model: str
    metrics: list[tuple[str, bool]]  # (metric, higher_is_better)
    rows: list[tuple[str, list[dict[str, Any]], str]]  # method, cells, mean rank
    report: str  # the model's classification report in one line ("" if none)


def blocks(
    table: pd.DataFrame, reports: dict[str, dict] | None, footnotes: dict[str, int]
) -> list[Block]:
    """The per-(dataset, model) tables; ``footnotes`` collects the reasons of cells that are
    not ok (text -> number). Each cell is {"ok": bool, "mean", "ci_low", "ci_high", "n",
    "rank"} or {"ok": False, "status", "note"}."""
    ranks = mean_ranks(table)
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
                        }
                    )
                else:
                    note = footnotes.setdefault(f"{r['status']}: {r['reason']}", len(footnotes) + 1)
                    cells.append(
                        {"ok": False, "status": r["status"].replace("_", " "), "note": note}
                    )
            mr = ranks[
                (ranks["dataset"] == dataset)
                & (ranks["model"] == model)
                & (ranks["method"] == method)
            ]
            rows.append((method, cells, f"{mr['mean_rank'].iloc[0]:.2f}" if len(mr) else ""))
        key = group_key(model, dataset)
        report = ""
        if reports and key in reports and "accuracy" in reports[key]:
            rep = reports[key]
            per_class = ", ".join(
                f"{c}: P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f}"
                for c, v in rep.get("classes", {}).items()
            )
            val = _validation(rep)
            val_text = (
                f", validation accuracy {val['accuracy']:.3f} (n={val.get('n', '?')})"
                if val
                else ""
            )
            report = (
                f"Model: test accuracy {rep['accuracy']:.3f} (n={rep.get('n', '?')}){val_text}; "
                f"{per_class}."
            )
        out.append(Block(dataset, model, metrics, rows, report))
    return out


CELL_LEGEND = (
    "Cells: mean [95% bootstrap CI] over images, n images, #rank among methods (1 = best)."
)


def to_markdown(
    table: pd.DataFrame,
    *,
    title: str,
    reports: dict[str, dict] | None = None,
    notes: list[str] = (),
    compare_metric: str | None = None,
) -> str:
    """Per (dataset, model): methods x metrics with mean [95% CI], n and rank; then mean rank;
    then, with ``compare_metric``, the models' accuracy, recall and F1 beside that metric."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    footnotes: dict[str, int] = {}
    for block in blocks(table, reports, footnotes):
        lines += [f"## {block.dataset} / {block.model}", ""]
        lines.append(
            "| method | "
            + " | ".join(f"{m} {'↑' if up else '↓'}" for m, up in block.metrics)
            + " | mean rank |"
        )
        lines.append("|---" * (len(block.metrics) + 2) + "|")
        for method, cells, mean_rank in block.rows:
            text = [
                f"{_fmt(c['mean'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] n={c['n']} #{c['rank']}"
                if c["ok"]
                else (f"{c['status']} [{c['note']}]" if c["status"] else "")
                for c in cells
            ]
            lines.append(f"| {method} | " + " | ".join([*text, mean_rank]) + " |")
        if block.report:
            lines += ["", block.report]
        lines.append("")
    overall = mean_ranks(table)
    overall = overall[overall["dataset"] == "all"].sort_values("mean_rank", kind="stable")
    if len(overall):
        lines += ["## Overall mean rank", "", "| method | mean rank |", "|---|---|"]
        lines += [f"| {r.method} | {r.mean_rank:.2f} |" for r in overall.itertuples()]
        lines.append("")
    if compare_metric:
        lines += model_comparison(table, reports, compare_metric)
    if footnotes:
        lines += ["## Notes", ""]
        lines += [f"[{i}] {text}" for text, i in footnotes.items()]
        lines.append("")
    lines.append(CELL_LEGEND)
    return "\n".join(lines) + "\n"


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
            classes = rep.get("classes", {}).values()
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


def tex_escape(text: str) -> str:
    return str(text).translate(_TEX)


def to_latex(
    table: pd.DataFrame,
    *,
    title: str,
    reports: dict[str, dict] | None = None,
    notes: list[str] = (),
) -> str:
    """The leaderboard as LaTeX (booktabs): one table per (dataset, model), the best mean of
    each metric in bold, not-applicable cells with a numbered note; then the mean ranks."""
    lines = [f"% {tex_escape(title)}", "% requires \\usepackage{booktabs}"]
    lines += [f"% {tex_escape(n)}" for n in notes]
    footnotes: dict[str, int] = {}
    for block in blocks(table, reports, footnotes):
        lines += [
            "\\begin{table}[ht]",
            "\\centering\\small",
            f"\\caption{{{tex_escape(block.dataset)} / {tex_escape(block.model)}. "
            + tex_escape(CELL_LEGEND.removeprefix("Cells: ").replace("#rank", "rank"))
            + (f" {tex_escape(block.report)}" if block.report else "")
            + "}",
            "\\begin{tabular}{l" + "r" * (len(block.metrics) + 1) + "}",
            "\\toprule",
            "method & "
            + " & ".join(
                f"{tex_escape(m)} $\\{'uparrow' if up else 'downarrow'}$" for m, up in block.metrics
            )
            + " & mean rank \\\\",
            "\\midrule",
        ]
        for method, cells, mean_rank in block.rows:
            text = []
            for c in cells:
                if c["ok"]:
                    mean = _fmt(c["mean"])
                    mean = f"\\textbf{{{mean}}}" if c["rank"] == 1 else mean
                    text.append(f"{mean} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]")
                else:
                    text.append(
                        f"{tex_escape(c['status'])}$^{{{c['note']}}}$" if c["status"] else ""
                    )
            lines.append(f"{tex_escape(method)} & " + " & ".join([*text, mean_rank]) + " \\\\")
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
            table, title=title, reports=reports, notes=notes, compare_metric=compare_metric
        ),
        "leaderboard.tex": to_latex(table, title=title, reports=reports, notes=notes),
    }
