"""The runner: a suite becomes (model, dataset) groups; each group trains or loads its model,
draws its evaluation set, and for every batch runs every method and every metric on the
maps. A group is the unit an executor schedules; ``run_group`` is pure apart from the
model cache, and returns its tables for the store to write.

A method or metric that cannot apply raises ``NotApplicable``: the cell is recorded with
the reason and the run goes on. Any other exception in a cell is recorded as an ``error``
cell with its message, the run goes on, and the run exits non-zero.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from benchmarks.core.errors import DataNotFound, NotApplicable, UserError
from benchmarks.engine.store import CELL_COLUMNS, CURVE_COLUMNS, ROW_COLUMNS
from benchmarks.engine.suite import Component, Suite, builder_options, option_names, train_config
from benchmarks.models.training import get_trained_model
from benchmarks.models.zoo import MODELS
from cams import METHODS
from cams.gradient_cams import SharedPass
from datasets import DATASETS
from metrics import METRICS, MetricContext


@dataclass(frozen=True)
class GroupSpec:
    """Everything a worker needs to run one (model, dataset) group."""

    suite: Suite
    model: Component
    dataset: Component
    device: str = "cpu"
    data_root: str | None = None
    cache_dir: str = "results/cache"
    progress: bool = True


@dataclass
class GroupResult:
    rows: pd.DataFrame
    curves: pd.DataFrame
    cells: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # reason the whole group was skipped (data not found)
    # the first EXAMPLES evaluation images with their masks and every method's maps, for
    # figures: images, ids, masks (if any), maps__<method label>
    examples: dict[str, np.ndarray] = field(default_factory=dict)


EXAMPLES = 4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_data_root(dataset: Component, data_root: str | None) -> str | None:
    """The data directory for a real dataset: suite entry ``root``, then --data-root, then
    the dataset's environment variable. Synthetic datasets get None."""
    info = DATASETS.get(dataset.use).info
    if info.source != "real":
        return None
    root = (
        dataset.options.get("root")
        or data_root
        or (os.environ.get(info.root_env) if info.root_env else None)
    )
    if not root:
        env = f" or set ${info.root_env}" if info.root_env else ""
        raise DataNotFound(
            f"dataset {dataset.label!r} needs real data: pass --data-root DIR{env}. {info.how_to_get}".strip()
        )
    return str(root)


def load_dataset(dataset: Component, split: str, *, seed: int, data_root: str | None):
    opts = builder_options(dataset, "datasets")
    root = resolve_data_root(dataset, data_root)
    return DATASETS.get(dataset.use).obj(split, root=root, seed=seed, **opts)


def _batches(ds, indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        items = [ds[int(i)] for i in indices[start : start + batch_size]]
        batch = {
            "x": torch.stack([it["image"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items]),
            "ids": [it["id"] for it in items],
        }
        for key in ("mask", "organ_mask"):
            batch[key] = torch.stack([it[key] for it in items]) if key in items[0] else None
        yield batch


def _take(entry: Component, seen: dict, key, available: int) -> int:
    """How many of the ``available`` images the entry takes now, within its ``max_images``
    (counted in ``seen`` under ``key``)."""
    cap = entry.options.get("max_images")
    already = seen.get(key, 0)
    n = available if cap is None else max(0, min(available, int(cap) - already))
    seen[key] = already + n
    return n


def _call_options(fn, options: dict[str, Any], seed: int) -> dict[str, Any]:
    opts = dict(options)
    if "seed" in option_names(fn, "methods") and "seed" not in opts:
        opts["seed"] = seed
    return opts


def _cell(
    model: str,
    dataset: str,
    method: str,
    metric: str,
    status: str,
    reason: str = "",
    n: int = 0,
    n_excluded: int = 0,
) -> dict[str, Any]:
    return dict(
        model=model,
        dataset=dataset,
        method=method,
        metric=metric,
        status=status,
        reason=reason,
        n=n,
        n_excluded=n_excluded,
    )


def missing_needs(metric: Component, has: Mapping[str, bool]) -> list[str]:
    """The data the metric needs that the dataset lacks: its needs that ``has`` names
    ("masks", "organ_masks") with False. Needs ``has`` does not name (the explainer, the
    weights) are the pipeline's to provide and never missing."""
    return [need for need in METRICS.get(metric.use).info.needs if not has.get(need, True)]


def needs_reason(metric: Component, dataset: Component, has: Mapping[str, bool]) -> str:
    """Why the metric cannot apply to the dataset's data ("" if nothing is missing)."""
    missing = missing_needs(metric, has)
    if not missing:
        return ""
    return f"{metric.label} needs {', '.join(missing)}; dataset {dataset.label} has none"


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def run_group(spec: GroupSpec) -> GroupResult:
    """Train or load the model, explain the evaluation set with every method, score every metric."""
    suite, mc, dc = spec.suite, spec.model, spec.dataset
    methods, metrics = suite.methods, suite.metrics
    try:
        train_set = load_dataset(dc, "train", seed=suite.seed, data_root=spec.data_root)
        eval_set = load_dataset(dc, suite.eval.split, seed=suite.seed, data_root=spec.data_root)
    except DataNotFound as exc:
        cells = [
            _cell(mc.label, dc.label, m.label, k.label, "skipped", str(exc))
            for m in methods
            for k in metrics
        ]
        return GroupResult(
            pd.DataFrame(columns=ROW_COLUMNS),
            pd.DataFrame(columns=CURVE_COLUMNS),
            pd.DataFrame(cells, columns=CELL_COLUMNS),
            skipped=str(exc),
        )

    device = torch.device(spec.device)

    def val_set():  # loaded only for a report that lacks it
        if suite.eval.split == "val":
            return eval_set
        try:  # the validation report is information: a dataset without that split goes without
            return load_dataset(dc, "val", seed=suite.seed, data_root=spec.data_root)
        except UserError:
            return None

    trained = get_trained_model(
        mc.use,
        dc.use,
        train_set=train_set,
        test_set=eval_set
        if suite.eval.split == "test"
        else load_dataset(dc, "test", seed=suite.seed, data_root=spec.data_root),
        val_set=val_set,
        dataset_options=builder_options(dc, "datasets"),
        config=train_config(suite, mc, dc),
        seed=suite.seed,
        cache_dir=Path(spec.cache_dir),
        device=spec.device,
        model_options=builder_options(mc, "models"),
        checkpoint=mc.options.get("checkpoint"),
    )
    model = trained.model
    if suite.eval.channels_last:  # the same model, its convolutions faster (see EvalConfig)
        model = model.to(memory_format=torch.channels_last)
    layer = mc.options.get("layer") or MODELS.get(mc.use).info.default_layer

    gen = np.random.default_rng(suite.seed)
    n_eval = min(suite.eval.max_images, len(eval_set))
    indices = np.sort(gen.permutation(len(eval_set))[:n_eval])
    has = {
        "masks": getattr(eval_set, "masks", None) is not None or "mask" in eval_set[0],
        "organ_masks": "organ_mask" in eval_set[0],
    }

    status: dict[tuple[str, str], dict[str, Any]] = {}
    for m in methods:
        for k in metrics:
            if reason := needs_reason(k, dc, has):
                status[(m.label, k.label)] = _cell(
                    mc.label, dc.label, m.label, k.label, "not_applicable", reason
                )
            elif reason := suite.excluded(mc.label, dc.label, m.label, k.label):
                status[(m.label, k.label)] = _cell(
                    mc.label, dc.label, m.label, k.label, "excluded", reason
                )
    rows: list[pd.DataFrame] = []
    curves: list[pd.DataFrame] = []
    counts: dict[tuple[str, str], list[int]] = {}

    n_batches = -(-n_eval // suite.eval.batch_size)
    bar = tqdm(
        total=n_batches * len(methods),
        desc=f"{mc.label} x {dc.label}",
        unit="method-batch",
        disable=None if spec.progress else True,
    )
    examples: dict[str, np.ndarray] = {}
    explained: dict[str, int] = {}  # images explained so far, per method
    scored: dict[tuple[str, str], int] = {}  # images scored so far, per cell
    for batch in _batches(eval_set, indices, suite.eval.batch_size):
        if not examples:
            k = min(EXAMPLES, len(batch["ids"]))
            examples["images"] = batch["x"][:k].numpy().astype(np.float32)
            examples["ids"] = np.array(batch["ids"][:k], dtype=str)
            if batch["mask"] is not None:
                examples["masks"] = batch["mask"][:k].numpy().astype(bool)
        x_all = batch["x"].to(device)
        labels_all = batch["labels"].to(device)
        with torch.inference_mode():
            logits_all = model(x_all)
        target_all = logits_all.argmax(1) if suite.eval.target == "predicted" else labels_all
        correct_all = (logits_all.argmax(1) == labels_all).cpu().numpy()
        # one forward + backward for every gradient CAM of the batch
        shared = SharedPass(model, x_all, target_all, layer=layer)
        for m in methods:
            bar.update(1)
            pending = [k for k in metrics if (m.label, k.label) not in status]
            # an entry's max_images caps the images it sees: the first ones of the draw
            n_m = _take(m, explained, m.label, len(x_all))
            if not pending or n_m == 0:
                continue
            fn = METHODS.get(m.use).obj
            opts = _call_options(fn, builder_options(m, "methods"), suite.seed)

            def explain(mod, xx, tt, fn=fn, opts=opts):
                return fn(mod, xx, tt, layer=layer, **opts).maps

            x, target = x_all[:n_m], target_all[:n_m]
            try:
                done = (
                    shared.explain(m.use, builder_options(m, "methods"))
                    if n_m == len(x_all)
                    else None
                )
                maps_all = done.maps if done is not None else explain(model, x, target)
                key = f"maps__{m.label}"
                if key not in examples and len(maps_all) >= len(examples["ids"]):
                    k = len(examples["ids"])
                    examples[key] = maps_all[:k].detach().float().cpu().numpy()
            except NotApplicable as exc:
                for k in pending:
                    status[(m.label, k.label)] = _cell(
                        mc.label, dc.label, m.label, k.label, "not_applicable", f"{m.label}: {exc}"
                    )
                continue
            except Exception as exc:  # recorded, the run goes on
                log(
                    f"error in method {m.label} on {mc.label} x {dc.label}:\n{traceback.format_exc()}"
                )
                for k in pending:
                    status[(m.label, k.label)] = _cell(
                        mc.label, dc.label, m.label, k.label, "error", f"{m.label}: {_short(exc)}"
                    )
                continue
            for k in pending:
                n = _take(k, scored, (m.label, k.label), n_m)
                if n == 0:
                    continue
                ids = batch["ids"][:n]
                labels, correct = labels_all[:n], correct_all[:n]
                ctx = MetricContext(
                    model=model,
                    x=x[:n],
                    labels=labels,
                    target=target[:n],
                    maps=maps_all[:n].to(device),
                    logits=logits_all[:n],
                    ids=ids,
                    masks=None if batch["mask"] is None else batch["mask"][:n].to(device),
                    organ_masks=None
                    if batch["organ_mask"] is None
                    else batch["organ_mask"][:n].to(device),
                    explain=explain,
                    seed=suite.seed,
                    batch_size=suite.eval.forward_batch,
                )
                try:
                    scores = METRICS.get(k.use).obj(ctx, **builder_options(k, "metrics"))
                except NotApplicable as exc:
                    status[(m.label, k.label)] = _cell(
                        mc.label, dc.label, m.label, k.label, "not_applicable", f"{k.label}: {exc}"
                    )
                    continue
                except Exception as exc:
                    log(
                        f"error in metric {k.label} for {m.label} on {mc.label} x {dc.label}:\n{traceback.format_exc()}"
                    )
                    status[(m.label, k.label)] = _cell(
                        mc.label, dc.label, m.label, k.label, "error", f"{k.label}: {_short(exc)}"
                    )
                    continue
                base = dict(model=mc.label, dataset=dc.label, method=m.label, metric=k.label)
                kept_any = 0
                excluded = 0
                for output, values in scores.values.items():
                    values = np.asarray(values, dtype=np.float64).reshape(-1)
                    keep = np.isfinite(values)
                    if output == "value":
                        kept_any, excluded = int(keep.sum()), int((~keep).sum())
                    rows.append(
                        pd.DataFrame(
                            {
                                **base,
                                "output": output,
                                "sample_id": np.array(ids, dtype=object)[keep],
                                "label": labels.cpu().numpy()[keep],
                                "target": target[:n].cpu().numpy()[keep],
                                "correct": correct[keep],
                                "value": values[keep],
                            }
                        )
                    )
                for name, curve in scores.curves.items():
                    curves.append(
                        pd.DataFrame(
                            {
                                **base,
                                "curve": name,
                                "sample_id": ids,
                                "values": [list(map(float, c)) for c in np.asarray(curve)],
                            }
                        )
                    )
                c = counts.setdefault((m.label, k.label), [0, 0, ""])
                c[0] += kept_any
                c[1] += excluded
                if excluded and scores.unscored:
                    c[2] = scores.unscored
    bar.close()

    cells = []
    for m in methods:
        for k in metrics:
            if (m.label, k.label) in status:
                cells.append(status[(m.label, k.label)])
            else:
                n, excl, why = counts.get((m.label, k.label), [0, 0, ""])
                why = why or "the metric gave no value"
                reason = f"{excl} image(s) not scored: {why}" if excl else ""
                cells.append(
                    _cell(
                        mc.label,
                        dc.label,
                        m.label,
                        k.label,
                        "ok" if n else "not_applicable",
                        reason or ("no image scored" if not n else ""),
                        n,
                        excl,
                    )
                )
    report = {**trained.report, "layer": layer, "n_eval": n_eval}
    return GroupResult(
        _concat(rows, ROW_COLUMNS),
        _concat(curves, CURVE_COLUMNS),
        pd.DataFrame(cells, columns=CELL_COLUMNS),
        report,
        examples=examples,
    )


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def group_specs(
    suite: Suite, *, device: str, data_root: str | None, cache_dir: str, progress: bool = True
) -> list[GroupSpec]:
    """The (model, dataset) groups of a suite, in suite order."""
    return [
        GroupSpec(
            suite, m, d, device=device, data_root=data_root, cache_dir=cache_dir, progress=progress
        )
        for d in suite.datasets
        for m in suite.models
    ]


def check_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu"
        )
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(
            f"--device {device!r} is not a device torch knows; use cpu, cuda, cuda:N or auto"
        ) from None
    return device


@dataclass
class PlannedGroup:
    """A (model, dataset) group as the dry run sees it, before any data is read."""

    model: str
    dataset: str
    data: str  # "synthetic", "real: <root>" or "missing: <how to provide it>"
    cells: list[dict[str, Any]]  # model, dataset, method, metric, status, reason
    passes: dict[str, str]  # method -> the passes it costs per image


def static_reason(mc: Component, dc: Component, m: Component, k: Component) -> str:
    """Why a cell cannot apply, from the registries' metadata alone ("" if it may apply)."""
    model_info = MODELS.get(mc.use).info
    if "gap_head" in METHODS.get(m.use).info.needs and not model_info.gap_head:
        return f"{m.label} needs a GAP + linear head; {mc.label} has a fully-connected head"
    data_info = DATASETS.get(dc.use).info
    return needs_reason(k, dc, {"masks": data_info.masks, "organ_masks": data_info.organ_masks})


def plan(suite: Suite, *, data_root: str | None) -> list[PlannedGroup]:
    """The cells a run would fill, the ones that cannot apply with their reasons, and the
    passes each method costs, without reading data or training anything."""
    out = []
    for dc in suite.datasets:
        try:
            root = resolve_data_root(dc, data_root)
            data = "synthetic" if root is None else f"real: {root}"
            if root is not None and not Path(root).is_dir():
                raise DataNotFound(f"data root {root} is not a directory")
        except DataNotFound as exc:
            data = f"missing: {exc}"
        for mc in suite.models:
            cells = []
            for m in suite.methods:
                for k in suite.metrics:
                    reason = static_reason(mc, dc, m, k)
                    status = "not_applicable" if reason else "planned"
                    if not reason and (why := suite.excluded(mc.label, dc.label, m.label, k.label)):
                        status, reason = "excluded", why
                    if data.startswith("missing"):
                        status, reason = "skipped", data
                    cells.append(_cell(mc.label, dc.label, m.label, k.label, status, reason))
            passes = {m.label: METHODS.get(m.use).info.cost for m in suite.methods}
            out.append(PlannedGroup(mc.label, dc.label, data, cells, passes))
    return out


def format_plan(suite: Suite, groups: list[PlannedGroup]) -> str:
    """The dry run's report: per group, its data, cell counts, reasons and method costs."""
    lines = [
        f"suite {suite.name} v{suite.version}: {len(suite.models)} model(s) x "
        f"{len(suite.datasets)} dataset(s) x {len(suite.methods)} method(s) x "
        f"{len(suite.metrics)} metric(s), {suite.eval.max_images} images per group, "
        f"seed {suite.seed}"
    ]
    total = {"planned": 0, "not_applicable": 0, "excluded": 0, "skipped": 0}
    for g in groups:
        counts = {s: sum(c["status"] == s for c in g.cells) for s in total}
        for s in total:
            total[s] += counts[s]
        lines.append(
            f"\n{g.model} x {g.dataset} ({g.data}): {counts['planned']} cells to run, "
            f"{counts['not_applicable']} not applicable, {counts['excluded']} excluded by the "
            f"suite, {counts['skipped']} skipped"
        )
        reasons: dict[tuple[str, str], int] = {}
        for c in g.cells:
            if c["status"] in ("not_applicable", "excluded"):
                key = (c["status"], c["reason"])
                reasons[key] = reasons.get(key, 0) + 1
        for (what, reason), n in reasons.items():
            lines.append(f"  {what.replace('_', ' ')} ({n} cells): {reason}")
    lines.append("\npasses per image and method (F forward, B backward):")
    for label, cost in (groups[0].passes if groups else {}).items():
        lines.append(f"  {label:<24} {cost}")
    lines.append(
        f"\ntotal: {total['planned']} cells to run, {total['not_applicable']} not applicable, "
        f"{total['excluded']} excluded by the suite, {total['skipped']} skipped for missing data"
    )
    return "\n".join(lines)
