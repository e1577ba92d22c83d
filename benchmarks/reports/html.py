"""One HTML page per run: ``python -m benchmarks.report RUN [--out FILE] [--cmap NAME]``.

Writes ``RUN/report.html`` (or ``--out``): a single self-contained file, its styles, script
and images embedded (PNG as data URIs, mask outlines as inline SVG), so it opens from disk
or an e-mail attachment with no server and no network access. Top to bottom:

1. what was run: suite, version, seeds, host, times; the models with their accuracy and
   per-class recall; the datasets with their sizes; a partial run says so;
2. the headline table (``headline.py``: each method's mean rank per metric family);
3. the findings per (model, dataset), written from the statistics (``leaderboard.py``);
4. the leaderboard per (model, dataset) and metric family: mean with its 95% CI, n, the
   paired test against random with its Holm-adjusted p and median effect, the best group
   in bold, the family's mean rank; sortable by any column;
5. the critical-difference diagrams and the mean ranks over groups;
6. an image gallery per (model, dataset): each example image with its lesion (solid) and
   organ (dashed) outlines and every method's map, with controls to pick methods and to
   switch between the overlay and the map alone;
7. per (model, dataset) the perturbation curves and the other figures of
   ``benchmarks.figures`` (the same functions, drawn at journal sizes);
8. the libraries' conformance, layer sweeps and model comparison, when the run has them;
9. the cells that were not applicable, excluded, skipped or failed, with their reasons,
   and the figures left out with why.

The report reads only the run folder (``engine/store.py``): a run that has not finished
(interrupted, or still running) is reported from the groups it stored so far
(``collect.py``), and says so at the top. Relevance maps use a colour-blind-safe colour
map by default (``figures.DEFAULT_CMAP``); ``--cmap jet`` on request.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import atomic_write
from cambench.benchmarks.engine.store import RunStore, group_key, read_run, split_group_key
from cambench.benchmarks.engine.suite import seed_label
from cambench.benchmarks.reports import figures as F
from cambench.benchmarks.reports import headline as H
from cambench.benchmarks.reports.collect import collect, stored_groups
from cambench.benchmarks.reports.conformance import agreement_means, compare_libraries, references
from cambench.benchmarks.reports.conformance import markdown as conformance_markdown
from cambench.benchmarks.reports.layers import markdown as layers_markdown
from cambench.benchmarks.reports.leaderboard import (
    CELL_LEGEND,
    MARKS,
    UNITS,
    group_findings,
    mean_rank,
    model_comparison,
    model_flag,
    power_line,
    quality_families,
    same_maps_line,
    seed_findings,
)

REPORT = "report.html"
TEMPLATES = Path(__file__).with_name("templates")
FIGURE_DPI = 120  # embedded figures: a 7 in figure 840 px wide, 7 pt text 12 px tall
TILE_PX = 160  # gallery images and maps larger than this are downsampled for the page
# the figures the report embeds, by file stem prefix, and what their alt text says
FIGURE_KINDS = {
    "morf": "MoRF perturbation curve and running AOPC, one line per method (mean and 95% "
    "interval over images)",
    "sanity": "similarity to the original map after each step of cascading model "
    "randomization, one line per method",
    "robustness": "robustness and adversarial metrics per method, mean and 95% CI",
    "pareto": "seconds per image against AOPC per method, with the Pareto front",
    "layers": "each metric against the target layer, shallow to deep, per method",
    "cam-equivalence": "ReLU(CAM) against Grad-CAM pixel values, with Pearson's r",
    "ranks": "method x metric rank table",
    "cd": "critical-difference diagram: mean ranks, methods the Nemenyi test cannot tell "
    "apart joined by a bar",
}
LEFT_OUT = ("heatmaps",)  # the gallery shows these, interactively


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_of_array(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3|4) uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png_of_figure(fig) -> bytes:
    """The figure as a PNG of 256 colours: line art and text lose nothing visible, and the
    file is a third of the true-colour one (what the page's size and opening time are made
    of: the medical run's report goes from 9.9 to 5.0 MiB). No metadata: the file holds
    no address, not even inside an image."""
    from PIL import Image

    # drawn once on the Agg canvas and read as pixels: encoding a true-colour PNG only to
    # decode it again took a sixth of the medical report's time
    fig.set_dpi(FIGURE_DPI)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG")
    return out.getvalue()


def decimals(lo: float, hi: float, digits: int = 2) -> int:
    """Decimals that show a value to ``digits`` significant digits of its interval's width,
    so no number claims more precision than its n supports (at most 6).

    >>> decimals(0.3812, 0.4533), decimals(12.0, 31.0), decimals(0.5, 0.5)
    (3, 0, 3)
    """
    width = abs(hi - lo)
    if not math.isfinite(width) or width == 0:
        return 3
    return int(min(6, max(0, digits - 1 - math.floor(math.log10(width)))))


def fmt(v: float, places: int) -> str:
    """``v`` to ``places`` decimals (``decimals``); "-" for a missing value.

    >>> fmt(0.61234, 1), fmt(-0.0064, 1), fmt(5.6e-05, 6), fmt(float("nan"), 2)
    ('0.6', '0.0', '0.000056', '-')
    """
    if v is None or not math.isfinite(v):
        return "-"
    text = f"{v:.{places}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def p_text(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return ""
    if p < 0.001:
        return "p < 0.001"
    return "p = 1" if p >= 1 else f"p = {p:.2g}"


# ---------------------------------------------------------------------------------------
# Reading the run


@dataclass
class Source:
    """What the report reads of a run folder."""

    run: F.RunFolder
    cells: pd.DataFrame | None
    reports: dict[str, dict]
    partial: str  # "" for a finished run, else what the report covers and why


def read_source(run_dir: str | Path) -> Source:
    """The run folder's tables: its published ones when the run finished, else gathered
    from the groups it stored so far."""
    stored = read_run(run_dir)
    m = stored.manifest
    finished = str(m.status).startswith("finished") and stored.leaderboard is not None
    if finished:
        rows, curves, cells, table = stored.rows, stored.curves, stored.cells, stored.leaderboard
        reports, partial = dict(m.models or {}), ""
    else:
        store = RunStore(stored.root)
        keys = stored_groups(store, m)
        if not keys:
            raise UserError(
                f"{stored.root} holds no stored group yet (status {m.status}); rerun the suite "
                f"with --out {stored.root} and build the report when a group has finished"
            )
        c = collect(store, keys, m, int(m.seed or 0))
        rows, curves, cells, table, reports = c.rows, c.curves, c.cells, c.table, c.reports
        how = f"status {m.status}" + (f", stopped by {m.stopped_by}" if m.stopped_by else "")
        partial = (
            f"This run has not finished ({how}). The report covers the {len(keys)} "
            f"(model, dataset) group(s) stored so far: {', '.join(keys)}. Rerun the same "
            "command to resume it (stored groups are reused), then build the report again."
        )
    run = F.RunFolder(stored.root, rows, curves, table, m.suite, stored)
    return Source(run, cells, reports, partial)


# ---------------------------------------------------------------------------------------
# Sections


def overview(src: Source) -> dict[str, Any]:
    """What was run: the run's facts, the models, the datasets."""
    m = src.run.stored.manifest
    suite = m.suite or {}
    facts = [
        ("suite", f"{suite.get('name', m.run_id)} v{suite.get('version', '?')}"),
        ("run", m.run_id),
        ("status", m.status + (f" ({m.stopped_by})" if m.stopped_by else "")),
        ("seed", str(m.seed)),
        ("model seeds", str(suite.get("model_seeds", 1))),
        ("started", m.started),
        ("finished", m.finished or "-"),
        ("host", f"{m.host} ({m.platform})"),
        ("device", m.device),
        ("executor", m.executor + (f" at {m.ray_address}" if m.ray_address else "")),
        ("data root", m.data_root or "-"),
        ("code", f"cambench {m.versions.get('cambench', '?')}, git {m.git[:12]}"),
    ]
    libraries = ", ".join(f"{k} {v}" for k, v in m.versions.items() if k != "cambench")
    models, datasets = [], {}
    for key, rep in src.reports.items():
        if "accuracy" not in rep:
            continue
        # the suite's labels (the group's key), not the registry names the report may hold
        model_label, dataset_label = split_group_key(key) or (
            rep.get("model", key),
            rep.get("dataset", ""),
        )
        classes = rep.get("classes") or {}
        val = rep.get("val") if isinstance(rep.get("val"), dict) else None
        models.append(
            dict(
                model=model_label,
                dataset=dataset_label,
                accuracy=f"{rep['accuracy']:.3f}",
                n=rep.get("n", "?"),
                recall=", ".join(f"{c} {v.get('recall', 0):.2f}" for c, v in classes.items()),
                val=f"{val['accuracy']:.3f} (n={val.get('n', '?')})"
                if val and "accuracy" in val
                else "-",
                n_eval=rep.get("n_eval", "?"),
                train=f"{rep['train_seconds']:.0f} s" if rep.get("train_seconds") else "cached",
                flag=model_flag(rep),
                same=same_maps_line(rep.get("same_maps") or {}),
            )
        )
        d = dataset_label
        if d and d not in datasets:
            area = rep.get("lesion_area") or {}
            datasets[d] = dict(
                dataset=d,
                classes=", ".join(f"{c} ({v.get('support', '?')})" for c, v in classes.items()),
                n=sum(int(v.get("support", 0)) for v in classes.values()),
                split=rep.get("split", "test"),
                n_eval=rep.get("n_eval", "?"),
                masked=area.get("n", 0),
                area=f"{area['mean']:.3f}" if area else "-",
            )
    skipped = [dict(dataset=d, why=w) for d, w in sorted(m.skipped_datasets.items())]
    return dict(
        description=suite.get("description", ""),
        facts=facts,
        libraries=libraries,
        models=models,
        datasets=list(datasets.values()),
        skipped=skipped,
    )


def headline_section(table: pd.DataFrame, methods: list[str]) -> dict[str, Any]:
    h = H.headline(table, methods)
    fams = list(dict.fromkeys(h["family"]))
    rows = []
    for method, g in h.groupby("method", sort=False):
        by = {r.family: r for r in g.itertuples()}
        cells = []
        for f in fams:
            r = by.get(f)
            if r is None or not r.cells:
                cells.append(dict(text="-", sort=""))
            else:
                cells.append(dict(text=H.cell_text(r), sort=f"{r.rank:.6f}"))
        rows.append(dict(method=method, cells=cells))
    return dict(families=fams, rows=rows, legend=H.legend(table) if len(table) else "")


def leaderboard_section(run: F.RunFolder, table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (dataset, model): per family, a table of methods x metrics."""
    out = []
    for (dataset, model), grp in table.groupby(["dataset", "model"], sort=True):
        fams = quality_families(grp["family"]) + (
            ["cost"] if (grp["family"] == "cost").any() else []
        )
        tables = []
        for family in fams:
            fam = grp[grp["family"] == family]
            up = {k: bool(g["higher_is_better"].iloc[0]) for k, g in fam.groupby("metric")}
            metrics = [(k, up[k]) for k in run.order("metrics", up)]
            ok = fam[fam["status"] == "ok"]
            ranks = mean_rank(ok.pivot_table(index="method", columns="metric", values="rank"))
            by_cell = {(r["method"], r["metric"]): r for r in fam.to_dict("records")}
            rows = []
            for method in run.order("methods", fam["method"]):
                cells = [
                    metric_cell(by_cell.get((method, k)), family == "cost") for k, _ in metrics
                ]
                rank = None if family == "cost" else ranks.get(method)
                rank = None if rank is None or not math.isfinite(rank) else float(rank)
                rows.append(
                    dict(
                        method=method,
                        cells=cells,
                        rank="" if rank is None else f"{rank:.2f}",
                        rank_sort="" if rank is None else f"{rank:.6f}",
                    )
                )
            note = (
                "Units: "
                + "; ".join(
                    f"{k}: {UNITS[run.use('metrics', k)]}"
                    for k, _ in metrics
                    if run.use("metrics", k) in UNITS
                )
                if family == "cost"
                else power_line(fam)
            )
            tables.append(
                dict(family=family, metrics=metrics, rows=rows, note=note, cost=family == "cost")
            )
        out.append(dict(dataset=dataset, model=model, id=anchor(model, dataset), tables=tables))
    return out


def metric_cell(r: dict[str, Any] | None, cost: bool) -> dict[str, Any]:
    """One leaderboard cell from its row of the table (None: no such cell): mean [95% CI]
    (decimals from the interval's width), n, and against random the mark, Holm-adjusted p
    and median effect with its CI."""
    if r is None:
        return dict(text="", sub="", sort="", best=False, status="")
    if r["status"] != "ok":
        return dict(
            text=r["status"].replace("_", " "),
            sub=str(r["reason"]),
            sort="",
            best=False,
            status=r["status"],
        )
    lo, hi = float(r["ci_low"]), float(r["ci_high"])
    places = decimals(lo, hi)
    text = f"{fmt(r['mean'], places)} [{fmt(lo, places)}, {fmt(hi, places)}]"
    sub = [f"n = {int(r['n'])}"]
    mark = "" if cost else MARKS.get(r.get("vs_random", ""), "")
    if not cost and r.get("vs_random") not in ("", "reference", None):
        parts = [mark, r["vs_random"]]
        if p := p_text(r.get("p_random_adj")):
            parts.append(p)
        eff = r.get("effect_random")
        if eff is not None and math.isfinite(eff):
            elo, ehi = r.get("effect_random_low"), r.get("effect_random_high")
            ep = (
                decimals(elo, ehi)
                if elo is not None and ehi is not None and math.isfinite(elo) and math.isfinite(ehi)
                else places
            )
            parts.append(f"Δ {fmt(eff, ep)} [{fmt(elo, ep)}, {fmt(ehi, ep)}]")
        sub.append(" ".join(x for x in parts if x))
    elif mark:
        sub.append(mark)
    return dict(
        text=text,
        sub=" · ".join(sub),
        sort=f"{float(r['mean']):.12g}",
        best=bool(r.get("best_group")) and not cost,
        status="ok",
    )


def anchor(model: str, dataset: str) -> str:
    return F.slug(f"{model}--{dataset}")


def findings_section(table: pd.DataFrame, reports: dict, uses: dict) -> list[dict[str, Any]]:
    """Per (dataset, model): its findings as HTML (``leaderboard.group_findings``)."""
    out = []
    for (dataset, model), grp in table.groupby(["dataset", "model"], sort=True):
        flag = model_flag(reports.get(group_key(model, dataset)))
        lines = group_findings(grp, dataset, model, flag, uses)
        if lines:
            out.append(dict(group=anchor(model, dataset), html=markdown_html("\n".join(lines))))
    return out


def model_seeds(manifest) -> dict[str, str]:
    """Model label -> the suite entry it is a seed of (``gapcnn-s1`` -> ``gapcnn``), as
    ``Suite.model_entries`` names them from the resolved suite's ``model_seeds``."""
    suite = manifest.suite or {}
    n = int(suite.get("model_seeds", 1) or 1)
    if n <= 1:
        return {}
    return {
        seed_label(label, k): label
        for label, opts in (suite.get("models") or {}).items()
        if not (isinstance(opts, dict) and opts.get("model_seed") is not None)
        for k in range(n)
    }


def markdown_html(text: str, shift: int = 0) -> str:
    """Markdown (the leaderboard's sections) as HTML, its headings ``shift`` levels deeper
    (to nest under the page's own); tables get the report's class.

    >>> str(markdown_html("## A\\n\\n- b", shift=1))
    '<h3>A</h3>\\n<ul>\\n<li>b</li>\\n</ul>'
    """
    import re

    import markdown
    from markupsafe import Markup

    html = markdown.markdown(text, extensions=["tables"], output_format="html")
    if shift:
        html = re.sub(r"<(/?)h([1-6])>", lambda m: f"<{m[1]}h{min(6, int(m[2]) + shift)}>", html)
    html = html.replace("<table>", '<div class="scroll"><table class="plain">')
    return Markup(html.replace("</table>", "</table></div>"))


# ---------------------------------------------------------------------------------------
# Figures and the gallery


@dataclass
class Figures:
    """The run's figures as data URIs, by group and kind, and the ones left out with why."""

    by_group: dict[tuple[str, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    overall: list[dict] = field(default_factory=list)  # cd--*, ranks--mean
    left_out: list[str] = field(default_factory=list)


def draw_figures(run: F.RunFolder, cmap: str, progress: Callable[[str], None]) -> Figures:
    out = Figures()
    groups = {F.slug(m) + "--" + F.slug(d): (m, d) for m, d in run.groups()}
    with F.style():
        for stem, draw in F.figure_jobs(run, skipped=out.left_out.append, cmap=cmap):
            kind = stem.split("--", 1)[0]
            if kind in LEFT_OUT:
                continue
            try:
                fig = draw()
            except F.Skip as why:
                out.left_out.append(f"{stem}: {why}")
                continue
            progress(stem)
            rest = stem.split("--", 1)[1] if "--" in stem else ""
            # the group whose key the stem names next (a whole "--"-separated part)
            group = next(
                (g for key, g in groups.items() if rest == key or rest.startswith(key + "--")),
                None,
            )
            alt = f"{FIGURE_KINDS.get(kind, kind)}: {rest.replace('--', ', ')}"
            item = dict(stem=stem, kind=kind, src=data_uri(png_of_figure(fig)), alt=alt)
            fig.clear()
            if group is None or kind in ("cd",):
                out.overall.append(item)
            else:
                out.by_group[group].append(item)
    return out


def grey_or_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) model input -> (H, W) or (H, W, 3) uint8, scaled to [0, 255] by [0, 1] when
    the values lie there, else by their own range (a normalised input)."""
    img = image.mean(axis=0) if image.shape[0] != 3 else np.moveaxis(image, 0, -1)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if lo < -1e-6 or hi > 1 + 1e-6:
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def resized(arr: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    from PIL import Image

    if arr.shape[:2] == size[::-1]:
        return arr
    method = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}[resample]
    return np.asarray(Image.fromarray(arr).resize(size, method))


def colour_map(values: np.ndarray, cmap: str) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 through ``cmap`` after min-max scaling."""
    import matplotlib

    rgba = matplotlib.colormaps[cmap](F.minmax(values))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def outline_paths(mask: np.ndarray) -> str:
    """SVG path data of a binary mask's outline at 0.5, in pixel coordinates (a pixel's
    centre at +0.5), from matplotlib's contour generator."""
    import contourpy

    if not mask.any() or mask.all():
        return ""
    # pad so that outlines touching the border close
    z = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=z).lines(0.5)
    parts = []
    for line in lines:
        pts = np.asarray(line) - 1 + 0.5  # undo the padding; pixel centres
        if len(pts) < 2:
            continue
        parts.append("M" + " L".join(f"{x:.2f} {y:.2f}" for x, y in pts) + " Z")
    return " ".join(parts)


def gallery_section(run: F.RunFolder, cmap: str, left_out: list[str]) -> list[dict]:
    """Per (model, dataset): the example images, each with its outlines, label line and
    every method's map (PNG), from ``groups/M--D/examples.npz``."""
    out = []
    for model, dataset in run.groups():
        try:
            data = run.examples(model, dataset)
        except F.Skip as why:
            left_out.append(f"gallery of {model} on {dataset}: {why}")
            continue
        maps = F.example_maps(run, data)
        images = data["images"]
        k, (h, w) = len(images), images.shape[2:]
        scale = min(1.0, TILE_PX / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        names = [str(c) for c in data.get("class_names", [])]
        rows = []
        for i in range(k):
            image = resized(grey_or_rgb(images[i]), size, "lanczos")
            tiles = []
            for method, arr in maps.items():
                if not np.isfinite(arr[i]).any():  # the method did not explain this image
                    tiles.append(dict(method=method, src="", alt=f"no {method} map"))
                    continue
                rgb = resized(colour_map(np.nan_to_num(arr[i]), cmap), size, "bilinear")
                tiles.append(
                    dict(
                        method=method,
                        src=data_uri(png_of_array(rgb)),
                        alt=f"{method} map of image {data['ids'][i]}" if "ids" in data else method,
                    )
                )
            lesion = outline_paths(data["masks"][i]) if "masks" in data else ""
            organ = outline_paths(data["organ_masks"][i]) if "organ_masks" in data else ""
            rows.append(
                dict(
                    id=str(data["ids"][i]) if "ids" in data else str(i),
                    label=example_label(data, i, names),
                    image=data_uri(png_of_array(image)),
                    lesion=lesion,
                    organ=organ,
                    tiles=tiles,
                )
            )
        out.append(
            dict(
                model=model,
                dataset=dataset,
                id="gallery-" + anchor(model, dataset),
                group=anchor(model, dataset),
                width=w,
                height=h,
                rows=rows,
                methods=list(maps),
                has_lesion=any(r["lesion"] for r in rows),
                has_organ=any(r["organ"] for r in rows),
            )
        )
    return out


def example_label(data: dict[str, np.ndarray], i: int, names: list[str]) -> str:
    """``true normal · predicted pneumonia (p = 0.93) · explained: pneumonia``, from what
    the run stored (older runs stored none of it: "")."""

    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else f"class {c}"

    parts = []
    if "labels" in data:
        parts.append(f"true {name(int(data['labels'][i]))}")
    if "pred" in data:
        pred = int(data["pred"][i])
        prob = f" (p = {float(data['probs'][i][pred]):.2f})" if "probs" in data else ""
        parts.append(f"predicted {name(pred)}{prob}")
    if "target" in data and ("pred" not in data or int(data["target"][i]) != int(data["pred"][i])):
        parts.append(f"explained: {name(int(data['target'][i]))}")
    return " · ".join(parts)


def colour_bar(cmap: str) -> str:
    ramp = np.linspace(0, 1, 256)[None, :].repeat(12, axis=0)
    return data_uri(png_of_array(colour_map(ramp, cmap)))


def not_ok_section(cells: pd.DataFrame | None) -> list[dict]:
    """The cells that are not ok, grouped by status and reason (most cells first)."""
    if cells is None or not len(cells):
        return []
    bad = cells[cells["status"] != "ok"]
    out = []
    for (status, reason), g in bad.groupby(["status", "reason"], sort=False):
        out.append(
            dict(
                status=str(status).replace("_", " "),
                reason=str(reason),
                count=len(g),
                cells=[
                    f"{r.method} / {r.metric} on {r.model} x {r.dataset}" for r in g.itertuples()
                ],
            )
        )
    return sorted(out, key=lambda d: (-d["count"], d["status"], d["reason"]))


def extra_sections(src: Source) -> list[str]:
    """The libraries' conformance, the layer sweeps and the model comparison, as the
    leaderboard writes them (markdown), in HTML."""
    run, table = src.run, src.run.leaderboard
    m = run.stored.manifest
    method_uses = {k: meta.get("use", k) for k, meta in m.methods.items()}
    metric_uses = {k: meta.get("use", k) for k, meta in m.metrics.items()}
    parts: list[str] = []
    if references(method_uses) and run.rows is not None and len(run.rows):
        families = {k: meta.get("kind") for k, meta in m.metrics.items()}
        directions = {k: meta.get("higher_is_better", True) for k, meta in m.metrics.items()}
        verdicts = compare_libraries(
            run.rows, table, method_uses, families, directions, seed=m.seed
        )
        parts += conformance_markdown(verdicts, agreement_means(run.rows, metric_uses), method_uses)
    parts += layers_markdown(table, m.methods, src.reports)
    aopc = [k for k, u in metric_uses.items() if u == "aopc_morf"]
    suite_metrics = (m.suite or {}).get("metrics") or {}
    compare = next(
        (
            k
            for k, opts in suite_metrics.items()
            if isinstance(opts, dict) and opts.get("correct_only")
        ),
        None,
    )
    if metric := compare or (aopc[0] if aopc else None):
        parts += model_comparison(table, src.reports, metric)
    return [markdown_html("\n".join(parts), shift=1)] if parts else []


# ---------------------------------------------------------------------------------------
# The page


def render(src: Source, *, cmap: str, progress: Callable[[str], None]) -> str:
    import jinja2

    run, table = src.run, src.run.leaderboard
    if table is None:
        raise UserError(f"{run.root} has no leaderboard to report; rerun the suite to write it")
    m = run.stored.manifest
    methods = run.order("methods", table["method"])
    figs = draw_figures(run, cmap, progress)
    galleries = gallery_section(run, cmap, figs.left_out)
    groups = [
        dict(
            model=mo,
            dataset=d,
            id="figures-" + anchor(mo, d),
            group=anchor(mo, d),
            figures=figs.by_group.get((mo, d), []),
        )
        for mo, d in run.groups()
    ]
    gallery_methods = list(dict.fromkeys(x for g in galleries for x in g["methods"]))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["markdown"] = markdown_html
    suite_name = (m.suite or {}).get("name", m.run_id)
    context = dict(
        title=f"cambench report: {suite_name} ({m.run_id})",
        run_id=m.run_id,
        partial=src.partial,
        overview=overview(src),
        headline=headline_section(table, methods),
        findings=findings_section(
            table, src.reports, {k: meta.get("use", k) for k, meta in m.metrics.items()}
        ),
        seed_findings=markdown_html("\n".join(seed_findings(table, model_seeds(m)))),
        group_options=[
            dict(id=anchor(mo, d), name=f"{mo} on {d}")
            for d, mo in sorted({(d, mo) for mo, d in run.groups()})
        ],
        leaderboard=leaderboard_section(run, table),
        cell_legend=CELL_LEGEND,
        overall=figs.overall,
        galleries=galleries,
        gallery_methods=gallery_methods,
        colour_bar=colour_bar(cmap),
        cmap=cmap,
        groups=groups,
        extra=extra_sections(src),
        not_ok=not_ok_section(src.cells),
        left_out=figs.left_out,
        css=(TEMPLATES / "report.css").read_text(),
        js=(TEMPLATES / "report.js").read_text(),
    )
    return env.get_template("report.html.j2").render(**context)


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    cmap: str = F.DEFAULT_CMAP,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the run's HTML report (default ``RUN/report.html``) and return its path."""
    F.check_cmap(cmap)
    src = read_source(run_dir)
    path = Path(out) if out is not None else src.run.root / REPORT
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file name such as {path / REPORT}")
    html = render(src, cmap=cmap, progress=progress or (lambda _: None))
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
    except OSError as exc:
        raise UserError(
            f"cannot write the report to {path} ({exc.strerror}); choose another with --out"
        ) from None
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Write one self-contained HTML page of a run folder: what was run, the "
        "findings, the leaderboard, the figures and an image gallery of every method's maps.",
    )
    p.add_argument("run", help="run folder written by python -m benchmarks.run --out RUN")
    p.add_argument("--out", help=f"the HTML file (default: RUN/{REPORT})")
    p.add_argument(
        "--cmap",
        default=F.DEFAULT_CMAP,
        help=f"colour map of the relevance maps (default: {F.DEFAULT_CMAP}, readable by "
        "colour-blind readers; jet on request)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_report(args.run, args.out, cmap=args.cmap)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    size = path.stat().st_size / 2**20
    print(path)
    print(
        f"report: {size:.1f} MiB, written in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
