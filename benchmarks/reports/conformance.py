"""Does the library change the conclusion? For every method named ``<method>@<library>``
(a third party's implementation, ``cams/peers.py``) whose harness implementation
``<method>`` ran in the same (dataset, model): how far its maps are from ours, and whether
a metric's verdict changes with the implementation.

- Agreement: the means over the images of the ``agreement`` metric's outputs (Spearman of
  the maps, IoU of their top 10%, largest pixel difference, all after min-max;
  ``metrics/agreement.py``), with n.
- Verdict: for every other metric of the run (cost and conformance left out), the library's
  per-image scores against ours on the images both scored, by the leaderboard's paired
  test (``stats.paired_test``), Holm-adjusted over every (method, metric) test of the
  (dataset, model); and each one's mark against ``random`` from the leaderboard table.
  "differs" when the test finds a difference (adjusted p < 0.05) or the two marks
  disagree (compared only when both cells scored the same images: a ``max_images`` on one
  of them makes its mark a test on fewer images): a reviewer reading either result would not draw the same conclusion; else "no
  difference seen" (at this n: not a proof that the implementations agree, the power line
  of the metric's table says how large a difference could hide).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

from cambench.benchmarks.reports.stats import ALPHA, holm, paired_test

COLUMNS = [
    "dataset",
    "model",
    "method",
    "reference",
    "metric",
    "n",
    "mean_library",
    "mean_reference",
    "p_adj",
    "mark_library",
    "mark_reference",
    "same_n",
    "verdict",
]
AGREEMENT = ("value", "top_iou", "max_abs_diff")
LEFT_OUT = ("cost", "conformance")  # families whose verdicts are not compared


def references(method_uses: Mapping[str, str]) -> dict[str, str]:
    """Method label -> the label of its reference implementation, for every method named
    ``<method>@<library>`` whose ``<method>`` is among the labels (the first that uses it).

    >>> references({"gradcam": "gradcam", "gc-captum": "gradcam@captum", "x": "occlusion@monai"})
    {'gc-captum': 'gradcam'}
    """
    out = {}
    for label, use in method_uses.items():
        base, at, _ = use.partition("@")
        ref = next((m for m, u in method_uses.items() if u == base), None) if at else None
        if ref is not None:
            out[label] = ref
    return out


def compare_libraries(
    rows: pd.DataFrame,
    table: pd.DataFrame,
    method_uses: Mapping[str, str],
    families: Mapping[str, str],
    directions: Mapping[str, bool],
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """One record per (dataset, model, library method, metric): the paired comparison with
    the reference implementation and the verdict (``COLUMNS``; the module docstring)."""
    refs = references(method_uses)
    records = []
    primary = rows[(rows["output"] == "value") & rows["method"].isin([*refs, *refs.values()])]
    indexed = table.set_index(["dataset", "model", "method", "metric"])
    marks, counts = indexed["vs_random"], indexed["n"]
    for (dataset, model), grp in primary.groupby(["dataset", "model"], sort=True):
        tests = []
        for metric, mg in grp.groupby("metric", sort=True):
            if families.get(metric, "other") in LEFT_OUT:
                continue
            sign = 1.0 if directions.get(metric, True) else -1.0
            wide = mg.pivot_table(index="sample_id", columns="method", values="value")
            for method, ref in refs.items():
                if method not in wide or ref not in wide:
                    continue
                both = wide[[method, ref]].dropna()
                key = f"{dataset}|{model}|{method}|{metric}".encode()
                test = paired_test(
                    sign * both[method].to_numpy(),
                    sign * both[ref].to_numpy(),
                    seed=zlib.crc32(key) ^ seed,
                    ci=False,
                )
                tests.append(test.p)
                records.append(
                    dict(
                        dataset=dataset,
                        model=model,
                        method=method,
                        reference=ref,
                        metric=metric,
                        n=test.n,
                        mean_library=float(both[method].mean()) if len(both) else np.nan,
                        mean_reference=float(both[ref].mean()) if len(both) else np.nan,
                        p_adj=None,
                        mark_library=str(marks.get((dataset, model, method, metric), "")),
                        mark_reference=str(marks.get((dataset, model, ref, metric), "")),
                        # marks from tests on other images (a max_images) are not compared
                        same_n=counts.get((dataset, model, method, metric))
                        == counts.get((dataset, model, ref, metric)),
                        verdict="",
                    )
                )
        adjusted = holm(tests)
        for record, p in zip(records[len(records) - len(tests) :], adjusted, strict=True):
            record["p_adj"] = np.nan if p is None else p
            if p is None:
                record["verdict"] = "too few images"
            elif p < ALPHA or (
                record["same_n"] and record["mark_library"] != record["mark_reference"]
            ):
                record["verdict"] = "differs"
            else:
                record["verdict"] = "no difference seen"
    return pd.DataFrame(records, columns=COLUMNS)


def agreement_means(rows: pd.DataFrame, metric_uses: Mapping[str, str]) -> pd.DataFrame:
    """Per (dataset, model, method): the mean of each ``agreement`` output and n."""
    labels = [k for k, use in metric_uses.items() if use == "agreement"]
    picked = rows[rows["metric"].isin(labels[:1]) & rows["output"].isin(AGREEMENT)]
    if not len(picked):
        return pd.DataFrame(columns=["dataset", "model", "method", "n", *AGREEMENT])
    wide = picked.pivot_table(
        index=["dataset", "model", "method"], columns="output", values="value", aggfunc="mean"
    )
    n = (
        picked[picked["output"] == "value"]
        .groupby(["dataset", "model", "method"])["value"]
        .count()
        .rename("n")
    )
    return wide.join(n).reset_index()


SYMBOL = {"better": "▲", "worse": "▼", "not distinguishable": "≈", "too few images": "·"}


def markdown(
    verdicts: pd.DataFrame, agreement: pd.DataFrame, method_uses: Mapping[str, str]
) -> list[str]:
    """The leaderboard section: per (dataset, model), a row per library method with its
    agreement with ours and, per metric, the verdict ("same"/"differs", the marks against
    random of the library's and ours, the adjusted p of the paired test)."""
    if not len(verdicts) and not len(agreement):
        return []
    lines = [
        "## Libraries: does the implementation change the conclusion?",
        "",
        "Each `<method>@<library>` beside the harness's own `<method>` on the same images. "
        "Agreement of the maps after min-max (Spearman, IoU of the top 10%, largest pixel "
        "difference: means over n images). Per metric: the library's mark against random, "
        "then ours; p: the paired test of the library's scores against ours "
        "(Holm-adjusted within the table). **differs**: the test finds a difference or the "
        "marks disagree; no diff.: no difference seen at this n.",
        "",
    ]
    keys = pd.concat(
        [verdicts[["dataset", "model"]], agreement[["dataset", "model"]]]
    ).drop_duplicates()
    for dataset, model in sorted(map(tuple, keys.to_numpy())):
        v = verdicts[(verdicts["dataset"] == dataset) & (verdicts["model"] == model)]
        a = agreement[(agreement["dataset"] == dataset) & (agreement["model"] == model)]
        metrics = list(dict.fromkeys(v["metric"]))
        methods = list(dict.fromkeys([*a["method"], *v["method"]]))
        lines += [f"### {dataset} / {model}", ""]
        head = ["method", "Spearman", "top-10% IoU", "max abs diff", *metrics]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in methods:
            row = a[a["method"] == method]
            if len(row):
                r = row.iloc[0]
                n = int(r["n"])
                agree = [f"{r['value']:.3f} (n={n})", f"{r['top_iou']:.3f}", f"{r['max_abs_diff']:.3f}"]
            else:
                agree = ["", "", ""]
            cells = []
            for metric in metrics:
                hit = v[(v["method"] == method) & (v["metric"] == metric)]
                if not len(hit):
                    cells.append("")
                    continue
                h = hit.iloc[0]
                p = "" if pd.isna(h["p_adj"]) else f", p={h['p_adj']:.2g}"
                word = {"differs": "**differs**", "no difference seen": "no diff."}.get(
                    h["verdict"], h["verdict"]
                )
                cells.append(
                    f"{word} {SYMBOL.get(h['mark_library'], '')}"
                    f"{SYMBOL.get(h['mark_reference'], '')}{p}"
                )
            lines.append("| " + " | ".join([f"`{method}`", *agree, *cells]) + " |")
        lines.append("")
    return lines
