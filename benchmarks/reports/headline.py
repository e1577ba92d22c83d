"""The run's headline table: one row per method, one column per metric family, printed
when a run ends (as evaluation harnesses print theirs) and at the top of the HTML report.

A cell is the method's mean rank in that family, over every (model, dataset) group and
metric of the family where it was ranked (the leaderboard's ranks: 1 for the best group,
``leaderboard.mean_rank``), and how many of those cells the paired test against random
found it better in, of the cells tested: ``1.50  ▲3/4`` reads "mean rank 1.5; better than
random in 3 of the 4 cells that could be tested". Cost is left out: it has no ranks.
"""

from __future__ import annotations

import pandas as pd

from cambench.benchmarks.reports.leaderboard import mean_rank, quality_families

TESTED = ("better", "not distinguishable", "worse")


def headline(table: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """Methods x families: ``rank`` (mean rank), ``better`` and ``tested`` (cells better
    than random, and cells with a decided test), ``reference`` (the random baseline
    itself), ``cells`` (ranked cells). Methods in ``methods`` order when given."""
    ok = table[(table["status"] == "ok") & (table["family"] != "cost")]
    order = list(dict.fromkeys([*(methods or []), *ok["method"]]))
    order = [m for m in order if m in set(ok["method"])]
    records = []
    for family in quality_families(ok["family"]):
        fam = ok[ok["family"] == family]
        # methods x (group, metric) cells: the leaderboard's own mean rank, over all of them
        ranks = mean_rank(
            fam.pivot_table(index="method", columns=["dataset", "model", "metric"], values="rank")
        )
        for method in order:
            mine = fam[fam["method"] == method]
            records.append(
                dict(
                    method=method,
                    family=family,
                    rank=float(ranks.get(method, float("nan"))),
                    cells=int((mine["rank"] > 0).sum()),
                    better=int((mine["vs_random"] == "better").sum()),
                    tested=int(mine["vs_random"].isin(TESTED).sum()),
                    reference=bool((mine["vs_random"] == "reference").any()),
                )
            )
    out = pd.DataFrame(
        records, columns=["method", "family", "rank", "cells", "better", "tested", "reference"]
    )
    out["method"] = pd.Categorical(out["method"], categories=order)
    return out.sort_values(["method"], kind="stable").astype({"method": str})


def cell_text(r) -> str:
    """One headline cell: ``1.50 ▲3/4``, ``2.00 ref``, ``-`` (not ranked)."""
    if not r.cells:
        return "-"
    if r.reference:
        mark = "ref"
    elif r.tested:
        mark = f"▲{r.better}/{r.tested}"
    else:
        mark = "untested"
    return f"{r.rank:.2f} {mark}"


def headline_text(table: pd.DataFrame, methods: list[str] | None = None, title: str = "") -> str:
    """The headline as aligned plain text (for the console); "" when nothing was ranked.

    >>> t = pd.DataFrame(dict(method=["cam", "random"], family="faithfulness", status="ok",
    ...     rank=[1, 2], vs_random=["better", "reference"], model="m", dataset="d", metric="k"))
    >>> print(headline_text(t))
    method  faithfulness
    cam     1.00 ▲1/1
    random  2.00 ref
    """
    h = headline(table, methods)
    if not len(h):
        return ""
    fams = list(dict.fromkeys(h["family"]))
    grid = [["method", *fams]]
    for method, g in h.groupby("method", sort=False):
        texts = {r.family: cell_text(r) for r in g.itertuples()}
        grid.append([method, *(texts.get(f, "-") for f in fams)])
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in grid
    ]
    return "\n".join(([title] if title else []) + lines)


def legend(table: pd.DataFrame) -> str:
    """What the headline's cells are, with the run's number of groups."""
    groups = table[["model", "dataset"]].drop_duplicates().shape[0]
    return (
        f"Mean rank within each family over its metrics and {groups} model x dataset "
        f"group(s) (1 = best); ▲k/n: better than random in k of the n cells tested against it "
        "(paired test, Holm-adjusted p < 0.05); ref: the random baseline."
    )
