"""How a metric moves with the target layer: the leaderboard section of a layer sweep
(a method entry whose ``layer`` named several layers, run as variants
``<method>[<layer>]``; ``benchmarks.engine.plan.method_variants``).

Per (dataset, model), method entry and metric: the layer with the best mean, every layer
the leaderboard's paired tests cannot tell from the best method of the table (its best
group), and the trend with depth: Spearman's rank correlation of the layer's depth (its
position, shallow to deep) with the metric's mean, signed so that > 0 means deeper layers
score better. The trend is over the layers' means (a handful of points): it describes the
sweep and is no test; the best group is the test.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

LEFT_OUT = ("cost", "conformance")


def sweeps(method_meta: Mapping[str, Mapping]) -> dict[str, list[tuple[str, str]]]:
    """Method entry -> its variants as (layer, label), in the plan's order (shallow to deep).

    >>> sweeps({"g[a]": {"entry": "g", "layer": "a"}, "g[b]": {"entry": "g", "layer": "b"},
    ...         "random": {"use": "random"}})
    {'g': [('a', 'g[a]'), ('b', 'g[b]')]}
    """
    out: dict[str, list[tuple[str, str]]] = {}
    for label, meta in method_meta.items():
        if meta.get("entry") and meta.get("layer"):
            out.setdefault(meta["entry"], []).append((meta["layer"], label))
    return out


def markdown(
    table: pd.DataFrame,
    method_meta: Mapping[str, Mapping],
    reports: Mapping[str, Mapping] | None = None,
) -> list[str]:
    """The section's lines (none without a sweep); ``reports``: group key -> model report,
    whose ``layer_sizes`` give each layer's map size."""
    from cambench.benchmarks.engine.store import group_key

    entries = sweeps(method_meta)
    if not entries:
        return []
    ok = table[(table["status"] == "ok") & ~table["family"].isin(LEFT_OUT)]
    lines = [
        "## Layers: how each metric moves with the target layer",
        "",
        "Per method swept over layers (shallow to deep): the layer with the best mean (its "
        "map size), the layers in the table's best group (not distinguishable from the best "
        "method by the paired tests), and ρ: Spearman's correlation of depth with the mean, "
        "> 0 when deeper layers score better (a description of the sweep, no test; shown for "
        "three layers or more).",
        "",
    ]
    for (dataset, model), grp in ok.groupby(["dataset", "model"], sort=True):
        sizes = ((reports or {}).get(group_key(model, dataset)) or {}).get("layer_sizes") or {}
        metrics = list(dict.fromkeys(grp["metric"]))
        rows = []
        for entry, variants in entries.items():
            present = [(layer, label) for layer, label in variants if label in set(grp["method"])]
            if len(present) < 2:
                continue
            cells = [_cell(grp[grp["metric"] == k], present, sizes) for k in metrics]
            rows.append("| " + " | ".join([entry, *cells]) + " |")
        if rows:
            lines += [f"### {dataset} / {model}", ""]
            lines += ["| method | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
            lines += [*rows, ""]
    return lines if len(lines) > 5 else []


def _cell(cells: pd.DataFrame, present: list[tuple[str, str]], sizes: Mapping) -> str:
    by_label = cells.set_index("method")
    scored = [(i, layer, label) for i, (layer, label) in enumerate(present) if label in by_label.index]
    if len(scored) < 2:
        return ""
    up = bool(by_label["higher_is_better"].iloc[0])
    means = np.array([by_label.loc[label, "mean"] for _, _, label in scored], dtype=np.float64)
    signed = means if up else -means
    best = scored[int(np.argmax(signed))][1]
    group = [layer for _, layer, label in scored if bool(by_label.loc[label, "best_group"])]
    depth = np.array([i for i, _, _ in scored], dtype=np.float64)
    size = "x".join(map(str, sizes.get(best, []))) if sizes.get(best) else ""
    text = f"best {best}" + (f" ({size})" if size else "")
    if group:
        text += f"; best group: {', '.join(group)}"
    if len(scored) < 3:  # two points always correlate perfectly
        return text
    rho = stats.spearmanr(depth, signed).statistic if np.ptp(signed) > 0 else 0.0
    return text + f"; ρ = {rho:+.2f}"
