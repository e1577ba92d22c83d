"""Running one (model, dataset) group of a plan: the unit an executor schedules.

``run_group`` reads as its steps: ``prepare`` (the data, the trained or cached model, the
evaluation draw), then per batch ``forward`` (logits, targets, one shared gradient pass),
``explain`` with each method, ``score`` every planned metric on its maps, and at the end
``GroupState.result`` (the cells with what the run learned). It is pure apart from the
model cache and returns its tables for the store to write.

A group receives its planned cells (``benchmarks.engine.plan``) and only adds what it
learns at run time: a method or metric raising ``NotApplicable`` (recorded with the
reason), a cell whose images all went unscored (``no_image_scored``), an error (recorded
with its message; the run goes on and exits 1). A group that fails as a whole becomes
error cells through ``failed_result``.

Inputs: every model takes images as the datasets give them, on the [0, 1] scale (a zoo
model normalizes them itself; a model without a ``normalize`` module takes them as they
are); methods and metrics perturb in that space.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cambench.benchmarks.core.checks import image_problem
from cambench.benchmarks.core.errors import DataNotFound, NotApplicable, UserError
from cambench.benchmarks.engine.plan import Cell, GroupPlan, Status, reference_of
from cambench.benchmarks.engine.progress import Progress, log
from cambench.benchmarks.engine.store import CELL_COLUMNS, CURVE_COLUMNS, ROW_COLUMNS
from cambench.benchmarks.engine.suite import Component, option_names
from cambench.benchmarks.models.external import AUTO, auto_layer
from cambench.benchmarks.models.training import check_finite, evaluate, get_trained_model
from cambench.benchmarks.models.zoo import MODELS
from cambench.cams import METHODS
from cambench.cams.gradient_cams import SharedPass
from cambench.cams.hooks import map_sizes
from cambench.datasets import DATASETS
from cambench.datasets.base import ImageDataset
from cambench.metrics import METRICS, MetricContext, Scores

EXAMPLES = 4  # evaluation images kept with every method's maps, for figures (one per class in turn)


def _empty(kind: str) -> str:
    """Why a localization metric leaves an image unscored, for its mask ``kind``."""
    return f"the {kind} mask is empty (nothing to localize, e.g. a normal image)"


@dataclass(frozen=True)
class GroupSpec:
    """Everything a worker needs to run one group: its plan and where to run it."""

    plan: GroupPlan
    device: str = "cpu"
    cache_dir: str = "results/cache"
    progress: bool = True  # a bar on a terminal; log lines otherwise or when False

    @property
    def model(self) -> Component:
        return self.plan.model

    @property
    def dataset(self) -> Component:
        return self.plan.dataset


@dataclass
class GroupResult:
    rows: pd.DataFrame
    curves: pd.DataFrame
    cells: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why the whole group was skipped (data not found)
    error: str | None = None  # why the whole group failed
    # the first EXAMPLES evaluation images with their masks and every method's maps, for
    # figures: images, ids, masks (if any), maps__<method label>
    examples: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Prepared:
    """A group ready to explain: its model, target layer and evaluation draw."""

    model: nn.Module
    layer: str
    eval_set: Any
    indices: np.ndarray
    report: dict[str, Any]


@dataclass
class Batch:
    """One evaluation batch after its forward: inputs, logits, targets and a shared pass."""

    index: int
    ids: list[str]
    x: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    correct: np.ndarray
    masks: torch.Tensor | None
    organ_masks: torch.Tensor | None
    shared: SharedPass
    extra_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    explained: dict[str, torch.Tensor] = field(default_factory=dict)  # method label -> maps
    # per mask kind, which images have a nonempty mask (None: the dataset has none); filled
    # once per batch and kind by ``present``, read by every method and metric
    _nonempty: dict[str, np.ndarray | None] = field(default_factory=dict, init=False, repr=False)

    def reference_maps(self, method: Component, methods: Sequence[Component], n: int):
        """The maps of the batch's first ``n`` images by ``method``'s reference
        implementation (``plan.reference_of``), NaN for images it did not explain; None
        without a reference or when it explained none of this batch."""
        ref = reference_of(method, methods)
        maps = None if ref is None else self.explained.get(ref.label)
        if maps is None:
            return None
        if len(maps) >= n:
            return maps[:n]
        pad = torch.full((n - len(maps), *maps.shape[1:]), float("nan"), device=maps.device)
        return torch.cat([maps.to(pad.dtype), pad])

    def truth(self, needs: tuple[str, ...], mask: str | None) -> tuple[str, str] | None:
        """For a metric that needs masks: (the context field it reads, the mask kind it
        reads there: "lesion", "organ" or a further mask's name, as its entry's ``mask``
        says); None for a metric that reads no mask."""
        field_ = next((key for key in ("masks", "organ_masks") if key in needs), None)
        if field_ is None:
            return None
        return field_, mask or ("lesion" if field_ == "masks" else "organ")

    def mask(self, kind: str) -> torch.Tensor | None:
        """The batch's masks of one kind (None: the dataset has none)."""
        if kind == "lesion":
            return self.masks
        return self.organ_masks if kind == "organ" else self.extra_masks.get(kind)

    def present(self, needs: tuple[str, ...], mask: str | None = None) -> np.ndarray | None:
        """For a metric that needs masks: which images have a nonempty one (the images it can
        score, those its ``max_images`` counts); None for a metric that scores every image."""
        truth = self.truth(needs, mask)
        if truth is None:
            return None
        kind = truth[1]
        if kind not in self._nonempty:
            masks = self.mask(kind)
            self._nonempty[kind] = (
                None if masks is None else masks.flatten(1).any(dim=1).cpu().numpy()
            )
        return self._nonempty[kind]


class SameMaps:
    """The scores of each method's maps of the current batch by every ``scale_free`` metric,
    given to a later method whose maps equal them up to a positive factor. On a GAP + linear
    head over rectified features, Grad-CAM, HiResCAM and XGrad-CAM give one map (the
    gradient is the head's weight divided by the map's size at every position, so
    HiResCAM's and XGrad-CAM's weights reduce to Grad-CAM's; CAM's map is the same before
    its ReLU): computing a curve again would repeat every forward to return the same
    numbers. Maps are compared after
    dividing each by its largest absolute value, within ``tol``: closer than that, the maps
    differ by float rounding, whose only effect would be to reorder tied pixels. Metrics
    score each image on its own (the metric contract), so the first n scores of an earlier
    method that explained more images are the scores of n images."""

    tol = 1e-5

    def __init__(self) -> None:
        self.batch = -1
        self.maps: dict[str, torch.Tensor] = {}  # method -> its unit maps of the batch
        self.scores: dict[tuple[str, str], Any] = {}  # (method, metric) -> Scores
        self.given: dict[str, set[str]] = {}  # method -> the methods whose scores it got

    def match(self, batch: int, method: str, maps: torch.Tensor) -> str | None:
        """Note ``method``'s maps of the batch; the earlier method with equal maps, or None."""
        if batch != self.batch:
            self.batch, self.maps, self.scores = batch, {}, {}
        flat = maps.detach().flatten(1).double()
        unit = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        self.maps[method] = unit
        for other, seen in self.maps.items():
            if other == method or len(seen) < len(unit) or seen.shape[1:] != unit.shape[1:]:
                continue
            if float((seen[: len(unit)] - unit).abs().max()) <= self.tol:
                return other
        return None

    def scores_of(self, source: str | None, metric: str, n: int) -> Scores | None:
        """The first ``n`` scores of ``source``'s maps by ``metric``, or None."""
        scores = self.scores.get((source, metric)) if source else None
        if scores is None or len(scores.values["value"]) < n:
            return None
        return Scores(
            values={k: np.asarray(v)[:n] for k, v in scores.values.items()},
            curves={k: np.asarray(v)[:n] for k, v in scores.curves.items()},
            unscored=scores.unscored,
        )

    def keep(self, method: str, metric: str, scores: Scores) -> None:
        self.scores[(method, metric)] = scores


def load_dataset(plan: GroupPlan, split: str, *, source: bool = False):
    """A split of the group's dataset, or with ``source`` of the dataset its model is
    trained on (``trained_on``)."""
    dc, root = (plan.source, plan.source_root) if source else (plan.dataset, plan.root)
    return DATASETS.get(dc.use).obj(split, root=root, seed=plan.seed, **dc.options)


class Relabelled(ImageDataset):
    """A dataset seen by a model trained on another (external validation): each class maps
    to the model's class ``classes`` names (evaluation name -> model name), else to the
    model's class of the same name; images of a class that maps to none are left out and
    counted (``left_out``). Items are the base dataset's, with the label mapped."""

    def __init__(self, base, model_classes: tuple[str, ...], classes: dict[str, str], what: str):
        names = list(base.class_names)
        if unknown := [k for k in classes if k not in names]:
            raise UserError(
                f"{what}: classes maps {', '.join(map(repr, unknown))}, which the dataset does "
                f"not have; its classes: {', '.join(names)}"
            )
        if unknown := [v for v in classes.values() if v not in model_classes]:
            raise UserError(
                f"{what}: classes maps to {', '.join(map(repr, unknown))}, which the model "
                f"does not predict; its classes: {', '.join(model_classes)}"
            )
        index = {
            i: model_classes.index(classes.get(n, n))
            for i, n in enumerate(names)
            if classes.get(n, n) in model_classes
        }
        if not index:
            raise UserError(
                f"{what}: none of the dataset's classes ({', '.join(names)}) is one of the "
                f"model's ({', '.join(model_classes)}); map them with classes = {{ ... }}"
            )
        labels = labels_of(base)
        self.base = base
        self.keep = np.flatnonzero(np.isin(labels, list(index)))
        self.labels = torch.tensor([index[int(v)] for v in labels[self.keep]])
        self.left_out = {
            names[i]: int((labels == i).sum()) for i in range(len(names)) if i not in index
        }
        self.class_names = tuple(model_classes)
        self.channels = base.channels
        self.provenance = base.provenance

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[int(self.keep[i])])
        item["label"] = int(self.labels[i])
        return item


def group_data(plan: GroupPlan, split: str):
    """(training set, ``split`` of the group's dataset): the training set is the model's
    ``trained_on`` dataset's, the other seen through ``Relabelled``; for a model given by
    its checkpoint, a dataset without a training split (an evaluation-only one) gives None."""
    eval_set = load_dataset(plan, split)
    if plan.source is not None:
        train_set = load_dataset(plan, "train", source=True)
        what = f"model {plan.model.label} (trained on {plan.source.label}) on {plan.dataset.label}"
        return train_set, Relabelled(
            eval_set, tuple(train_set.class_names), plan.model.classes, what
        )
    if plan.model.checkpoint is not None and split != "train":
        try:
            return load_dataset(plan, "train"), eval_set
        except UserError:  # the checkpoint needs no training data
            return None, eval_set
    return load_dataset(plan, "train"), eval_set


def labels_of(dataset) -> np.ndarray:
    """Every label of a dataset, without reading its images where it keeps them apart."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels).reshape(-1)
    return np.array([dataset[i]["label"] for i in range(len(dataset))])


def check_data(plan: GroupPlan, train_set, eval_set) -> None:
    """Refuse data no result could be read from, before any model is trained: fewer than
    two classes to train on, evaluation labels the training split lacks (the model could
    never predict them), entries whose options do not fit the images (a region as large
    as the image). Each refusal is a ``UserError`` naming the dataset and the fix."""
    name = plan.dataset.label
    if train_set is not None:  # None: a checkpoint on an evaluation-only dataset
        check_classes(plan, train_set, eval_set)
    hw = tuple(eval_set[0]["image"].shape[-2:])
    for kind, entries in (("methods", plan.methods), ("metrics", plan.metrics)):
        for entry in entries:
            fn = (METHODS if kind == "methods" else METRICS).get(entry.use).obj
            if problem := image_problem(fn, entry.options, hw):
                raise UserError(
                    f"[{kind}.{entry.label}] on dataset {name} ({hw[0]}x{hw[1]} images): {problem}"
                )


def check_classes(plan: GroupPlan, train_set, eval_set) -> None:
    """At least two training classes; no evaluation label the training split lacks; the
    same channels when the model comes from another dataset."""
    name, split = plan.dataset.label, plan.eval.split
    source = (train_set.provenance or {}).get("source") or plan.root or "the generator"
    names = tuple(train_set.class_names)
    train = np.unique(labels_of(train_set))
    if plan.source is not None:
        name = f"{plan.source.label} (the training data of {plan.model.label})"
    if plan.source is not None and eval_set.channels != train_set.channels:
        raise UserError(
            f"model {plan.model.label}, trained on {plan.source.label} ({train_set.channels} "
            f"channel(s)), cannot read {plan.dataset.label} ({eval_set.channels} channel(s))"
        )
    if len(train) < 2:
        only = ", ".join(repr(names[i]) if i < len(names) else str(i) for i in train)
        raise UserError(
            f"dataset {name} ({source}): the training split holds one class only ({only}); "
            "a classifier needs at least two: check the labels and the split"
        )
    extra = sorted(set(np.unique(labels_of(eval_set)).tolist()) - set(train.tolist()))
    if extra:
        shown = ", ".join(repr(names[i]) if i < len(names) else str(i) for i in extra)
        raise UserError(
            f"dataset {name} ({source}): the {split} split has label(s) {shown} that no "
            "training image has, so the model cannot predict them; fix the labels or the split"
        )


def preflight(groups: list[GroupPlan]) -> None:
    """Read and check (``check_data``) every dataset the groups use, once each, before
    any group starts: bad data stops the run before any model is trained, not after the
    groups before it. Missing data is left to the group, which records it as skipped."""
    seen: set[tuple] = set()
    for g in groups:
        # a dataset is read once per way it is seen: its own model, a checkpoint (which may
        # do without its training split), another dataset's model with a class mapping
        source = g.source.label if g.source else None
        key = (g.dataset.label, source, g.model.checkpoint, tuple(sorted(g.model.classes.items())))
        if g.missing or key in seen:
            continue
        seen.add(key)
        log(f"checking dataset {g.dataset.label}")
        try:
            check_data(g, *group_data(g, g.eval.split))
        except DataNotFound:
            continue


def prepare(spec: GroupSpec) -> Prepared:
    """Load the data, train or load the model (cached), draw the evaluation images."""
    plan = spec.plan
    if plan.missing:
        raise DataNotFound(plan.data.removeprefix("missing: "))
    split = plan.eval.split
    train_set, eval_set = group_data(plan, split)
    check_data(plan, train_set, eval_set)
    source = plan.source or plan.dataset  # the dataset the model is trained on

    def val_set():  # loaded only for a report that lacks it
        if split == "val":
            return eval_set
        try:  # the validation report is information: a dataset without that split goes without
            return load_dataset(plan, "val")
        except UserError:
            return None

    mc = plan.model
    own = plan.source is None
    trained = get_trained_model(
        mc.use,
        source.use,
        # shapes (and, for a zoo checkpoint without them, input statistics) from the
        # evaluation images when there is no training split
        train_set=train_set if train_set is not None else eval_set,
        test_set=(
            (eval_set if split == "test" else load_dataset(plan, "test"))
            if own
            else load_dataset(plan, "test", source=True)
        ),
        val_set=val_set if own else None,
        dataset_options=source.options,
        config=plan.train,
        seed=plan.seed + (mc.model_seed or 0),  # the model's own seed: its initial weights
        cache_dir=spec.cache_dir,
        device=spec.device,
        model_options=mc.options,
        checkpoint=mc.checkpoint,
    )
    model = trained.model
    if plan.eval.channels_last:  # the same model, its convolutions faster (see EvalConfig)
        model = model.to(memory_format=torch.channels_last)
    layer = mc.layer or MODELS.get(mc.use).info.default_layer
    n_eval = min(plan.eval.max_images, len(eval_set))
    indices = np.sort(np.random.default_rng(plan.seed).permutation(len(eval_set))[:n_eval])
    if layer == AUTO:  # the last spatial feature map, found on one evaluation image
        layer = auto_layer(model, eval_set[int(indices[0])]["image"][None].to(spec.device))
    report = {**trained.report, "layer": layer, "n_eval": n_eval}
    if not own:  # external validation: the model's report is on this dataset's images
        test = eval_set if split == "test" else group_data(plan, "test")[1]
        report = {
            **evaluate(model, test, spec.device),
            "trained_on": {"dataset": source.label, **trained.report},
            "left_out_classes": test.left_out,
            "checkpoint": trained.report.get("checkpoint"),
            "layer": layer,
            "n_eval": n_eval,
        }
    return Prepared(model, layer, eval_set, indices, report)


def batches(prep: Prepared, plan: GroupPlan, device: torch.device):
    """The evaluation batches, each after one forward and with its shared gradient pass."""
    size = plan.eval.batch_size
    for index, start in enumerate(range(0, len(prep.indices), size)):
        items = [prep.eval_set[int(i)] for i in prep.indices[start : start + size]]
        x = torch.stack([it["image"] for it in items]).to(device)
        labels = torch.tensor([it["label"] for it in items]).to(device)
        keys = ["mask", "organ_mask", *(k for k in items[0] if k.startswith("mask_"))]
        masks = {
            key: torch.stack([it[key] for it in items]).to(device) if key in items[0] else None
            for key in keys
        }
        with torch.inference_mode():
            logits = prep.model(x)
        check_finite(
            logits, [it["id"] for it in items], f"model {plan.model.label} on {plan.dataset.label}"
        )
        target = logits.argmax(1) if plan.eval.target == "predicted" else labels
        yield Batch(
            index=index,
            ids=[it["id"] for it in items],
            x=x,
            labels=labels,
            logits=logits,
            target=target,
            correct=(logits.argmax(1) == labels).cpu().numpy(),
            masks=masks.pop("mask"),
            organ_masks=masks.pop("organ_mask"),
            extra_masks={key.removeprefix("mask_"): value for key, value in masks.items()},
            # one forward + backward for every gradient CAM of the batch
            shared=SharedPass(prep.model, x, target, layer=prep.layer),
        )


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class GroupState:
    """What a group learns as it runs: each cell's status, the rows, curves and counts of
    scored images, and the examples for figures."""

    def __init__(self, plan: GroupPlan):
        self.plan = plan
        self.cells: dict[tuple[str, str], Cell] = {(c.method, c.metric): c for c in plan.cells}
        self.rows: list[pd.DataFrame] = []
        self.curves: list[pd.DataFrame] = []
        self.scored: dict[tuple[str, str], list[Any]] = {}  # n, n unscored, why
        self.taken: dict[Any, int] = {}  # images taken so far, per method and per cell
        self.examples: dict[str, np.ndarray] = {}
        self.examples_batch = -1  # the batch the examples come from, and their positions
        self.example_index = np.zeros(0, dtype=np.int64)
        self.seconds: dict[str, float] = {}  # wall time per "method" and "method / metric"
        self.mask_areas: list[float] = []
        self.same_maps = SameMaps()

    def note_masks(self, batch: Batch) -> None:
        """The lesion area fraction of each image with a nonempty mask: its mean is the
        chance level of the localization metrics (a map that ignores the image)."""
        if batch.masks is not None:
            area = batch.masks.flatten(1).float().mean(dim=1)
            self.mask_areas += [float(a) for a in area if a > 0]

    def timed(self, key: str, start: float) -> None:
        """Add the wall time since ``start`` to ``key`` (the group's profile)."""
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def pending(self, method: Component) -> list[Component]:
        """The metrics of ``method`` still to run: planned, and nothing learned against."""
        return [
            k
            for k in self.plan.metrics
            if self.cells[(method.label, k.label)].status is Status.PLANNED
        ]

    def wants(
        self, entry: Component, key: Any, available: int, counted: np.ndarray | None = None
    ) -> int:
        """How many of the ``available`` first images of the batch the entry would take now,
        within its ``max_images`` (the first images of the draw). With ``counted`` (which
        images the entry can score: those with a mask, for a localization metric) the cap
        counts those only, and the entry takes the images up to its last counted one."""
        cap = entry.max_images
        left = None if cap is None else max(0, cap - self.taken.get(key, 0))
        if counted is None:
            return available if left is None else min(available, left)
        hits = np.flatnonzero(counted[:available])
        if left is not None and left < len(hits):
            hits = hits[:left]
        return int(hits[-1]) + 1 if len(hits) else 0

    def take(
        self, entry: Component, key: Any, available: int, counted: np.ndarray | None = None
    ) -> int:
        """``wants``, and count what it takes."""
        n = self.wants(entry, key, available, counted)
        self.taken[key] = self.taken.get(key, 0) + (
            n if counted is None else int(counted[:n].sum())
        )
        return n

    def unscored(self, method: str, metric: str, n: int, why: str) -> None:
        """``n`` images the metric of ``method`` was not given because it cannot score them."""
        count = self.scored.setdefault((method, metric), [0, 0, ""])
        count[1] += n
        count[2] = count[2] or why

    def learn(self, method: str, metrics: list[Component], status: Status, reason: str) -> None:
        for k in metrics:
            self.cells[(method, k.label)] = self.cells[(method, k.label)].becomes(status, reason)

    def keep_examples(self, batch: Batch, method: str, maps: torch.Tensor) -> None:
        """Examples from the first batch, one per class in turn (``example_indices``): the
        images, their classes, the prediction and the masks; and each method's maps of them."""
        if not self.examples:
            idx = example_indices(batch.labels.cpu().numpy(), EXAMPLES)
            at = torch.as_tensor(idx, device=batch.x.device)
            probs = torch.softmax(batch.logits[at].detach().float(), dim=1)
            self.examples["images"] = batch.x[at].cpu().numpy().astype(np.float32)
            self.examples["ids"] = np.array([batch.ids[i] for i in idx], dtype=str)
            # what the model saw: the true class, the one explained, its prediction and the
            # softmax probability of each (the report and the figures label rows with them)
            self.examples["labels"] = batch.labels[at].cpu().numpy().astype(np.int64)
            self.examples["target"] = batch.target[at].cpu().numpy().astype(np.int64)
            self.examples["pred"] = probs.argmax(dim=1).cpu().numpy().astype(np.int64)
            self.examples["probs"] = probs.cpu().numpy().astype(np.float32)
            for key, masks in (("masks", batch.masks), ("organ_masks", batch.organ_masks)):
                if masks is not None:
                    self.examples[key] = masks[at].cpu().numpy().astype(bool)
            self.examples_batch, self.example_index = batch.index, idx
        # only the examples' own batch: a method that explained fewer of its images has NaN
        # for the others (shown as "no map"), never another batch's maps under their ids
        key, idx = f"maps__{method}", self.example_index
        if key not in self.examples and batch.index == self.examples_batch:
            kept = np.full((len(idx), *maps.shape[1:]), np.nan, dtype=np.float32)
            have = idx < len(maps)
            kept[have] = (
                maps[torch.as_tensor(idx[have], device=maps.device)].detach().float().cpu().numpy()
            )
            self.examples[key] = kept

    def record(self, batch: Batch, n: int, method: str, metric: str, scores) -> None:
        """One metric's scores of the first ``n`` images of the batch: rows, curves, counts."""
        base = dict(model=self.plan.model.label, dataset=self.plan.dataset.label)
        base.update(method=method, metric=metric)
        ids = batch.ids[:n]
        count = self.scored.setdefault((method, metric), [0, 0, ""])
        for output, values in scores.values.items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            keep = np.isfinite(values)
            if output == "value":
                count[0] += int(keep.sum())
                count[1] += int((~keep).sum())
                if (~keep).any() and scores.unscored:
                    count[2] = scores.unscored
            columns = {
                "output": output,
                "sample_id": np.array(ids, dtype=object)[keep],
                "label": batch.labels[:n].cpu().numpy()[keep],
                "target": batch.target[:n].cpu().numpy()[keep],
                "correct": batch.correct[:n][keep],
                "value": values[keep],
            }
            self.rows.append(pd.DataFrame({**base, **columns}))
        for name, curve in scores.curves.items():
            values = [list(map(float, c)) for c in np.asarray(curve)]
            self.curves.append(
                pd.DataFrame({**base, "curve": name, "sample_id": ids, "values": values})
            )

    def final_cells(self) -> list[Cell]:
        """Every cell; a planned one that ran is ok, or no_image_scored with the reason."""
        out = []
        for key, cell in self.cells.items():
            if cell.status is Status.PLANNED:
                n, unscored, why = self.scored.get(key, [0, 0, ""])
                reason = (
                    f"{unscored} image(s) not scored: {why or 'the metric gave no value'}"
                    if unscored
                    else ""
                )
                status = Status.OK if n else Status.NO_IMAGE_SCORED
                reason = reason or ("" if n else "no image scored")
                cell = cell.becomes(status, reason, n=n, n_excluded=unscored)
            out.append(cell)
        return out

    def result(self, report: dict[str, Any]) -> GroupResult:
        return GroupResult(
            _concat(self.rows, ROW_COLUMNS),
            _concat(self.curves, CURVE_COLUMNS),
            cells_frame(self.final_cells()),
            {
                **report,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                # methods whose maps equalled an earlier method's (up to a positive factor):
                # their scale-free metrics are that method's scores
                "same_maps": {k: sorted(v) for k, v in self.same_maps.given.items()},
                **(
                    {
                        "lesion_area": {
                            "mean": float(np.mean(self.mask_areas)),
                            "n": len(self.mask_areas),
                        }
                    }
                    if self.mask_areas
                    else {}
                ),
            },
            examples=self.examples,
        )


def example_indices(labels: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` examples in a batch, every class its turn: the first image of each
    class (in the order the classes first appear), then the second of each, ...; sorted.
    So the gallery shows each class (a lesion next to a normal image), not the first k
    images of whichever class the draw begins with.

    >>> example_indices(np.array([2, 2, 2, 0, 0, 1]), 4).tolist()
    [0, 1, 3, 5]
    >>> example_indices(np.array([1, 1]), 4).tolist()
    [0, 1]
    """
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in dict.fromkeys(labels.tolist())]
    order = [pos[j] for j in range(len(labels)) for pos in by_class if j < len(pos)]
    return np.sort(np.array(order[:k], dtype=np.int64))


def cells_frame(cells: list[Cell]) -> pd.DataFrame:
    return pd.DataFrame([c.record() for c in cells], columns=CELL_COLUMNS)


def _concat(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def _call_options(fn, options: dict[str, Any], seed: int) -> dict[str, Any]:
    opts = dict(options)
    if "seed" in option_names(fn, "methods") and "seed" not in opts:
        opts["seed"] = seed
    return opts


def explainer(m: Component, layer: str, seed: int):
    """The method of entry ``m`` as ``(model, x, target) -> maps``, with its options."""
    fn = METHODS.get(m.use).obj
    opts = _call_options(fn, m.options, seed)

    def explain(model, x, target):
        return fn(model, x, target, layer=layer, **opts).maps

    return explain


def explain(state: GroupState, prep: Prepared, batch: Batch, m: Component, n: int, fn):
    """The maps of the batch's first ``n`` images by method ``m`` (the shared gradient pass
    when it serves the whole batch, else ``fn``, its ``explainer``), or None when the method
    cannot apply or failed: its pending cells then learn why."""
    pending = state.pending(m)
    try:
        # the shared gradient pass is at the model's layer: a method at its own layer runs alone
        shared = n == len(batch.x) and m.layer in (None, prep.layer)
        done = batch.shared.explain(m.use, m.options) if shared else None
        if done is not None:
            return done.maps
        return fn(prep.model, batch.x[:n], batch.target[:n])
    except NotApplicable as exc:
        state.learn(m.label, pending, Status.NOT_APPLICABLE, f"{m.label}: {exc}")
    except Exception as exc:  # recorded, the run goes on
        log(f"error in method {m.label} on {state.plan.name}:\n{traceback.format_exc()}")
        state.learn(m.label, pending, Status.ERROR, f"{m.label}: {_short(exc)}")
    return None


def score(state: GroupState, prep: Prepared, batch: Batch, m: Component, maps, n_m: int, fn):
    """Every pending metric of method ``m`` on its maps of the batch's first ``n_m`` images;
    ``fn`` re-explains for the metrics that need the explainer."""
    plan = state.plan
    same = state.same_maps.match(batch.index, m.label, maps)
    for k in state.pending(m):
        info = METRICS.get(k.use).info
        truth = batch.truth(info.needs, k.mask)
        counted = batch.present(info.needs, k.mask)
        n = state.take(k, (m.label, k.label), n_m, counted)
        if truth is not None and n < n_m and counted is not None and not counted[n:n_m].any():
            state.unscored(m.label, k.label, n_m - n, _empty(truth[1]))
        if n == 0:
            continue
        given_masks = {"masks": batch.masks, "organ_masks": batch.organ_masks}
        if truth is not None:  # the mask the entry names, where the metric reads its mask
            given_masks[truth[0]] = batch.mask(truth[1])
        ctx = MetricContext(
            model=prep.model,
            x=batch.x[:n],
            labels=batch.labels[:n],
            target=batch.target[:n],
            maps=maps[:n].to(batch.x.device),
            logits=batch.logits[:n],
            ids=batch.ids[:n],
            **{key: None if v is None else v[:n] for key, v in given_masks.items()},
            reference_maps=batch.reference_maps(m, plan.methods, n),
            explain=fn,
            seed=plan.seed,
            batch_size=plan.eval.forward_batch,
        )
        # a scale-free metric of maps already scored (the same map by another method): its
        # scores, the same numbers without the forwards (keyed by entry: options included)
        given = state.same_maps.scores_of(same, k.label, n) if info.scale_free else None
        if given is not None:
            state.same_maps.given.setdefault(m.label, set()).add(same)
            state.record(batch, n, m.label, k.label, given)
            continue
        start = time.perf_counter()
        try:
            scores = METRICS.get(k.use).obj(ctx, **k.options)
        except NotApplicable as exc:
            state.learn(m.label, [k], Status.NOT_APPLICABLE, f"{k.label}: {exc}")
            continue
        except Exception as exc:  # recorded, the run goes on
            log(
                f"error in metric {k.label} for {m.label} on {plan.name}:\n{traceback.format_exc()}"
            )
            state.learn(m.label, [k], Status.ERROR, f"{k.label}: {_short(exc)}")
            continue
        finally:
            state.timed(f"{m.label} / {k.label}", start)
        if k.mask is not None and truth is not None:  # its message names the mask it read
            scores = dataclasses.replace(scores, unscored=_empty(truth[1]))
        if info.scale_free:
            state.same_maps.keep(m.label, k.label, scores)
        state.record(batch, n, m.label, k.label, scores)


def images_wanted(state: GroupState, batch: Batch, m: Component) -> int:
    """How many of the batch's first images method ``m`` explains: as many as its pending
    metrics take (a metric past its ``max_images`` takes none; a localization metric takes
    the images up to its last masked one), within the method's own ``max_images``."""
    available = state.wants(m, m.label, len(batch.x))
    wanted = [
        state.wants(
            k, (m.label, k.label), available, batch.present(METRICS.get(k.use).info.needs, k.mask)
        )
        for k in state.pending(m)
    ]
    return state.take(m, m.label, max(wanted, default=0))


def run_group(spec: GroupSpec) -> GroupResult:
    """Train or load the model, explain the evaluation set with every method, score every
    planned metric; a dataset whose data is missing gives a skipped group."""
    plan = spec.plan
    try:
        prep = prepare(spec)
    except DataNotFound as exc:
        return skipped_result(plan, str(exc))
    if layers := [m.layer for m in plan.methods if isinstance(m.layer, str)]:
        # a layer sweep's reports give each layer's map size
        probe = prep.eval_set[int(prep.indices[0])]["image"][None].to(spec.device)
        prep.report["layer_sizes"] = map_sizes(prep.model, probe, [prep.layer, *layers])
    state = GroupState(plan)
    n_batches = -(-len(prep.indices) // plan.eval.batch_size)
    progress = Progress(n_batches * len(plan.methods), plan.name, bar=spec.progress)
    explainers = {m.label: explainer(m, m.layer or prep.layer, plan.seed) for m in plan.methods}
    # a reference implementation is explained before the methods compared with it
    methods = sorted(plan.methods, key=lambda m: reference_of(m, plan.methods) is not None)
    for batch in batches(prep, plan, torch.device(spec.device)):
        state.note_masks(batch)
        for m in methods:
            n = images_wanted(state, batch, m)
            if n:
                fn = explainers[m.label]
                start = time.perf_counter()
                maps = explain(state, prep, batch, m, n, fn)
                state.timed(m.label, start)
                if maps is not None:
                    batch.explained[m.label] = maps
                    state.keep_examples(batch, m.label, maps)
                    score(state, prep, batch, m, maps, n, fn)
            progress.step(f"batch {batch.index + 1}/{n_batches} {m.label}")
    progress.close()
    if state.examples:
        names = getattr(prep.eval_set, "class_names", ()) or ()
        state.examples["class_names"] = np.array([str(c) for c in names], dtype=str)
    return state.result(prep.report)


def skipped_result(plan: GroupPlan, why: str) -> GroupResult:
    """A group whose data is missing: every cell skipped with the reason."""
    cells = [c.becomes(Status.SKIPPED, why) for c in plan.cells]
    return GroupResult(
        _concat([], ROW_COLUMNS), _concat([], CURVE_COLUMNS), cells_frame(cells), skipped=why
    )


def failed_result(plan: GroupPlan, exc: BaseException) -> GroupResult:
    """A group that raised as a whole: its planned cells become errors with the message;
    cells the plan already decided (not applicable, excluded) keep their status."""
    why = f"group {plan.name} failed: {_short(exc)}"
    cells = [c.becomes(Status.ERROR, why) if c.status is Status.PLANNED else c for c in plan.cells]
    return GroupResult(
        _concat([], ROW_COLUMNS), _concat([], CURVE_COLUMNS), cells_frame(cells), error=why
    )


def group_specs(
    plan_groups, *, device: str, cache_dir: str, progress: bool = True
) -> list[GroupSpec]:
    """A spec per group of the plan, in plan order."""
    return [
        GroupSpec(g, device=device, cache_dir=cache_dir, progress=progress) for g in plan_groups
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
