"""Aggregation and leaderboards: per (dataset, model, method, metric) the mean, a 95%
percentile-bootstrap confidence interval, n and the rank among methods; per method the
mean rank over metrics. Not-applicable, skipped and failed cells keep their reason.

Aggregation is one shared step for every metric. The bootstrap draws from a generator
seeded by the cell's key, so the numbers do not depend on the order cells are processed,
and two runs with the same results give byte-identical files.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

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


def to_markdown(
    table: pd.DataFrame,
    *,
    title: str,
    reports: dict[str, dict] | None = None,
    notes: list[str] = (),
) -> str:
    """Per (dataset, model): methods x metrics with mean [95% CI], n and rank; then mean rank."""
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    ranks = mean_ranks(table)
    footnotes: dict[str, int] = {}
    for (dataset, model), grp in table.groupby(["dataset", "model"], sort=True):
        lines += [f"## {dataset} / {model}", ""]
        metrics = list(dict.fromkeys(grp["metric"]))
        arrows = {
            m: ("↑" if bool(grp[grp["metric"] == m]["higher_is_better"].iloc[0]) else "↓")
            for m in metrics
        }
        lines.append(
            "| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " | mean rank |"
        )
        lines.append("|---" * (len(metrics) + 2) + "|")
        for method, mg in grp.groupby("method", sort=False):
            cells = []
            for m in metrics:
                row = mg[mg["metric"] == m]
                if not len(row):
                    cells.append("")
                    continue
                r = row.iloc[0]
                if r["status"] == "ok":
                    cells.append(
                        f"{_fmt(r['mean'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] n={r['n']} #{r['rank']}"
                    )
                else:
                    note = footnotes.setdefault(f"{r['status']}: {r['reason']}", len(footnotes) + 1)
                    cells.append(f"{r['status'].replace('_', ' ')} [{note}]")
            mr = ranks[
                (ranks["dataset"] == dataset)
                & (ranks["model"] == model)
                & (ranks["method"] == method)
            ]
            cells.append(f"{mr['mean_rank'].iloc[0]:.2f}" if len(mr) else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        key = f"{model}--{dataset}"
        if reports and key in reports and "accuracy" in reports[key]:
            rep = reports[key]
            per_class = ", ".join(
                f"{c}: P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f}"
                for c, v in rep.get("classes", {}).items()
            )
            lines += [
                "",
                f"Model: test accuracy {rep['accuracy']:.3f} (n={rep.get('n', '?')}); {per_class}.",
            ]
        lines.append("")
    overall = ranks[ranks["dataset"] == "all"].sort_values("mean_rank", kind="stable")
    if len(overall):
        lines += ["## Overall mean rank", "", "| method | mean rank |", "|---|---|"]
        lines += [f"| {r.method} | {r.mean_rank:.2f} |" for r in overall.itertuples()]
        lines.append("")
    if footnotes:
        lines += ["## Notes", ""]
        lines += [f"[{i}] {text}" for text, i in footnotes.items()]
        lines.append("")
    lines.append(
        "Cells: mean [95% bootstrap CI] over images, n images, #rank among methods (1 = best)."
    )
    return "\n".join(lines) + "\n"
