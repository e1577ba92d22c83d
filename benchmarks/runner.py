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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from benchmarks.errors import DataNotFound, NotApplicable, UserError
from benchmarks.store import CELL_COLUMNS, CURVE_COLUMNS, ROW_COLUMNS
from benchmarks.suite import Component, Suite, option_names
from benchmarks.training import get_trained_model
from benchmarks.zoo import MODELS
from cams import METHODS
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
    opts = {k: v for k, v in dataset.options.items() if k != "root"}
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
    model_opts = {k: v for k, v in mc.options.items() if k not in ("layer", "checkpoint")}
    trained = get_trained_model(
        mc.use,
        dc.use,
        train_set=train_set,
        test_set=eval_set
        if suite.eval.split == "test"
        else load_dataset(dc, "test", seed=suite.seed, data_root=spec.data_root),
        dataset_options=dc.options,
        config=suite.train,
        seed=suite.seed,
        cache_dir=Path(spec.cache_dir),
        device=spec.device,
        model_options=model_opts,
    )
    model = trained.model
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
            missing = [
                need for need in METRICS.get(k.use).info.needs if need in has and not has[need]
            ]
            if missing:
                status[(m.label, k.label)] = _cell(
                    mc.label,
                    dc.label,
                    m.label,
                    k.label,
                    "not_applicable",
                    f"{k.label} needs {', '.join(missing)}; dataset {dc.label} has none",
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
    for batch in _batches(eval_set, indices, suite.eval.batch_size):
        x = batch["x"].to(device)
        labels = batch["labels"].to(device)
        with torch.inference_mode():
            logits = model(x)
        target = logits.argmax(1) if suite.eval.target == "predicted" else labels
        correct = (logits.argmax(1) == labels).cpu().numpy()
        for m in methods:
            bar.update(1)
            pending = [k for k in metrics if (m.label, k.label) not in status]
            if not pending:
                continue
            fn = METHODS.get(m.use).obj
            opts = _call_options(fn, m.options, suite.seed)

            def explain(mod, xx, tt, fn=fn, opts=opts):
                return fn(mod, xx, tt, layer=layer, **opts).maps

            try:
                maps = explain(model, x, target)
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
                ctx = MetricContext(
                    model=model,
                    x=x,
                    labels=labels,
                    target=target,
                    maps=maps.to(device),
                    logits=logits,
                    ids=batch["ids"],
                    masks=None if batch["mask"] is None else batch["mask"].to(device),
                    organ_masks=None
                    if batch["organ_mask"] is None
                    else batch["organ_mask"].to(device),
                    explain=explain,
                    seed=suite.seed,
                    batch_size=suite.eval.forward_batch,
                )
                try:
                    scores = METRICS.get(k.use).obj(ctx, **k.options)
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
                                "sample_id": np.array(batch["ids"], dtype=object)[keep],
                                "label": batch["labels"].numpy()[keep],
                                "target": target.cpu().numpy()[keep],
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
                                "sample_id": batch["ids"],
                                "values": [list(map(float, c)) for c in np.asarray(curve)],
                            }
                        )
                    )
                c = counts.setdefault((m.label, k.label), [0, 0])
                c[0] += kept_any
                c[1] += excluded
    bar.close()

    cells = []
    for m in methods:
        for k in metrics:
            if (m.label, k.label) in status:
                cells.append(status[(m.label, k.label)])
            else:
                n, excl = counts.get((m.label, k.label), [0, 0])
                reason = f"{excl} image(s) not scored by the metric" if excl else ""
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
