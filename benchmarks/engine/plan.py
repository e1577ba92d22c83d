"""The plan as data: every cell (model, dataset, method, metric) a run will fill, with its
status and reason, decided in one place before any data is read or model trained.

``make_plan`` resolves a suite into ``GroupPlan`` s, one per (model, dataset): the unit an
executor runs. Each planned cell is ``planned`` (it will run), ``not_applicable`` (the
metric needs data the dataset does not have: the reason says which), ``excluded`` (the
suite leaves it out, with the suite's reason) or ``skipped`` (the dataset's real data is
missing). A group receives its planned cells and only adds what it learns at run time: a
method or metric raising ``NotApplicable`` (a CAM on a model without a GAP head: the
method, not the zoo's metadata, decides that), a cell whose images all went unscored
(``no_image_scored``), an error.

Each group carries a fingerprint: the hash of everything that decides its results (the
resolved model, dataset and training settings, the seed, the evaluation settings, every
cell with its method's and metric's options and versions). The store keeps it beside the
group's results, and a rerun reuses a stored group only when the fingerprints match.

>>> Status.NO_IMAGE_SCORED.value
'no_image_scored'
>>> Cell("m", "d", "gradcam", "aopc", Status.OK, n=3).record()["status"]
'ok'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from cambench.benchmarks.core.errors import DataNotFound
from cambench.benchmarks.core.files import file_digest
from cambench.benchmarks.engine.store import group_key
from cambench.benchmarks.engine.suite import Component, EvalConfig, Suite, train_config
from cambench.benchmarks.models.training import TrainConfig

FINGERPRINT_FORMAT = 1  # bump when what a group computes changes for every entry


class Status(str, Enum):
    """What became of a cell."""

    PLANNED = "planned"  # in the plan: it will run
    OK = "ok"  # ran; n images scored
    NOT_APPLICABLE = "not_applicable"  # the method or metric cannot apply (reason says why)
    EXCLUDED = "excluded"  # the suite leaves it out (reason: the suite's)
    NO_IMAGE_SCORED = "no_image_scored"  # ran, but every image went unscored (reason: why)
    ERROR = "error"  # raised (reason: the message); the run exits 1
    SKIPPED = "skipped"  # the dataset's real data is missing (reason: how to provide it)


@dataclass(frozen=True)
class Cell:
    """One (model, dataset, method, metric) cell: its status, reason and image counts, and
    the resolved configuration that decides its result (``config``: method and metric
    entries with their registry versions)."""

    model: str
    dataset: str
    method: str
    metric: str
    status: Status = Status.PLANNED
    reason: str = ""
    n: int = 0
    n_excluded: int = 0
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def record(self) -> dict[str, Any]:
        """The cell as a row of ``cells.parquet`` (``benchmarks.engine.store.CELL_COLUMNS``)."""
        return dict(
            model=self.model,
            dataset=self.dataset,
            method=self.method,
            metric=self.metric,
            status=self.status.value,
            reason=self.reason,
            n=self.n,
            n_excluded=self.n_excluded,
        )

    def becomes(self, status: Status, reason: str = "", **counts: int) -> Cell:
        return dataclasses.replace(self, status=status, reason=reason, **counts)


@dataclass(frozen=True)
class GroupPlan:
    """One (model, dataset) group: its entries, settings, planned cells and fingerprint."""

    model: Component
    dataset: Component
    methods: tuple[Component, ...]
    metrics: tuple[Component, ...]
    cells: tuple[Cell, ...]
    data: str  # "synthetic", "real: <root>" or "missing: <how to provide it>"
    root: str | None  # the real data's directory (None: synthetic or missing)
    train: TrainConfig
    eval: EvalConfig
    seed: int
    fingerprint: str = ""
    # the dataset the model is trained on when it is another (``trained_on``), and its root
    source: Component | None = None
    source_root: str | None = None

    @property
    def key(self) -> str:
        return group_key(self.model.label, self.dataset.label)

    @property
    def name(self) -> str:
        return f"{self.model.label} x {self.dataset.label}"

    @property
    def missing(self) -> bool:
        return self.data.startswith("missing")

    def counts(self) -> Counter:
        return Counter(c.status for c in self.cells)


@dataclass(frozen=True)
class Plan:
    suite: Suite
    groups: tuple[GroupPlan, ...]
    # (model, dataset, reason) of the pairs whose every cell the suite excludes: no model is
    # trained for them and no group is run
    left_out: tuple[tuple[str, str, str], ...] = ()

    def missing_data(self) -> dict[str, str]:
        """Dataset label -> why its data is missing, for the datasets whose data is."""
        return {g.dataset.label: g.data for g in self.groups if g.missing}


def resolve_data_root(dataset: Component, data_root: str | None) -> str | None:
    """The data directory of a real dataset: the suite entry's ``root``, then --data-root,
    then the dataset's environment variable. Synthetic datasets get None; a real one with
    none of the three raises ``DataNotFound`` saying how to provide it."""
    from cambench.datasets import DATASETS

    info = DATASETS.get(dataset.use).info
    if info.source != "real":
        return None
    own = dataset.options.get(info.root_option) if info.root_option else None
    if own is not None and Path(own).expanduser().is_absolute() and not dataset.root:
        return str(Path(own).expanduser())  # the entry names its data itself
    root = dataset.root or data_root or (os.environ.get(info.root_env) if info.root_env else None)
    if not root:
        env = f" or set ${info.root_env}" if info.root_env else ""
        raise DataNotFound(
            f"dataset {dataset.label!r} needs real data: pass --data-root DIR{env}. {info.how_to_get}".strip()
        )
    return str(root)


MASK_KINDS = {"lesion": "masks", "organ": "organ_masks"}  # a metric entry's mask -> its need


def reference_of(method: Component, methods: Sequence[Component]) -> Component | None:
    """The reference implementation of a method named ``<method>@<library>``: the first
    entry of ``methods`` that uses the harness's own ``<method>``; None for any other.

    >>> from cambench.benchmarks.engine.suite import Component
    >>> ours, peer = Component("gradcam", "gradcam"), Component("c", "gradcam@captum")
    >>> reference_of(peer, [peer, ours]).label, reference_of(ours, [peer, ours])
    ('gradcam', None)
    """
    base, at, _ = method.use.partition("@")
    if not at:
        return None
    return next((m for m in methods if m.use == base), None)


def reference_reason(metric: Component, method: Component, methods: Sequence[Component]) -> str:
    """Why a metric that compares with the reference implementation cannot apply to
    ``method`` ("" when it can)."""
    from cambench.metrics import METRICS

    if "reference" not in METRICS.get(metric.use).info.needs:
        return ""
    if reference_of(method, methods) is not None:
        return ""
    base, at, _ = method.use.partition("@")
    if at:
        return f"{metric.label} compares {method.label} with the suite's own {base}: add it"
    return (
        f"{metric.label} compares an implementation named <method>@<library> with the "
        f"suite's own <method>; {method.label} is the harness's own"
    )


def needs_reason(metric: Component, dataset: Component) -> str:
    """Why the metric cannot apply to the dataset: the data it needs (masks, organ masks,
    the further mask its entry names with ``mask``) that the dataset's registry entry says
    it lacks ("" if nothing is missing)."""
    from cambench.datasets import DATASETS
    from cambench.metrics import METRICS

    info = DATASETS.get(dataset.use).info
    has = {
        "masks": info.declares_masks(dataset.options),
        "organ_masks": info.declares_organ_masks(dataset.options),
    }
    needs = METRICS.get(metric.use).info.needs
    if metric.mask is not None:
        named = info.declares_extra_masks(dataset.options)
        kind = MASK_KINDS.get(metric.mask)
        if kind is None and metric.mask not in named:
            known = ", ".join(repr(n) for n in ("lesion", "organ", *named))
            return (
                f"{metric.label} reads mask {metric.mask!r}; dataset {dataset.label} has no "
                f"such mask (it may name: {known})"
            )
        needs = tuple(n for n in needs if n not in ("masks", "organ_masks"))
        needs += (kind,) if kind else ()
    missing = [need for need in needs if not has.get(need, True)]
    if not missing:
        return ""
    return f"{metric.label} needs {', '.join(missing)}; dataset {dataset.label} has none"


PROBE_SIZE = 64  # the probe image's side when the dataset entry gives no int image_size


def method_variants(
    methods: Sequence[Component], model: Component, dataset: Component
) -> tuple[Component, ...]:
    """The methods of one (model, dataset) group: a method entry whose ``layer`` names
    several layers (a list, a pattern, "stages") becomes one variant per layer, labelled
    ``<label>[<layer>]`` and remembering its entry; one plain name, or none, leaves it as
    it is. Resolved on the architecture built with random weights (and, for "stages" of
    a model that declares none, one forward of a probe image): no data is read."""
    out: list[Component] = []
    for m in methods:
        spec = m.layer
        if spec is None or (isinstance(spec, str) and spec != "stages" and not _pattern(spec)):
            out.append(m)
            continue
        names = _layers(model, dataset, spec)
        out += [
            dataclasses.replace(m, label=f"{m.label}[{name}]", layer=name, entry=m.label)
            for name in names
        ]
    return tuple(out)


def _pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


_LAYER_CACHE: dict[str, tuple[list[str], tuple[str, ...]]] = {}


def _layers(model: Component, dataset: Component, spec: str | list[str]) -> list[str]:
    """The module names ``spec`` picks in ``model``, in order, each once (``method_variants``)."""
    import fnmatch

    import torch

    from cambench.benchmarks.core.errors import UserError
    from cambench.benchmarks.models.zoo import MODELS
    from cambench.cams.hooks import stage_layer_names

    entry = MODELS.get(model.use)
    size = dataset.options.get("image_size")
    size = size if isinstance(size, int) else PROBE_SIZE
    key = json.dumps([model.use, model.options, size], sort_keys=True, default=str)
    if key not in _LAYER_CACHE:
        torch_state = torch.random.get_rng_state()
        try:
            net = entry.obj(in_channels=3, num_classes=2, **model.options).eval()
        finally:
            torch.random.set_rng_state(torch_state)  # the plan draws nothing
        names = [n for n, _ in net.named_modules() if n]
        stages = entry.info.stages or tuple(stage_layer_names(net, torch.zeros(1, 3, size, size)))
        _LAYER_CACHE[key] = (names, stages)
    names, stages = _LAYER_CACHE[key]
    picked: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        if item == "stages":
            found = list(stages)
        elif _pattern(item):
            depth = item.count(".")
            found = [n for n in names if n.count(".") == depth and fnmatch.fnmatchcase(n, item)]
        else:
            found = [item] if item in names or item == "" else []
        if not found and isinstance(spec, str):
            top = ", ".join(n for n in names if n.count(".") <= 1)[:300]
            raise UserError(
                f"layer {item!r} matches no module of model {model.label} ({model.use}); "
                f"its modules include: {top}"
            )
        # an item of a list may name another model's layer: it must match in some model
        # of the suite (make_plan checks), not in every one
        picked += [n for n in found if n not in picked]
    if not picked:
        raise UserError(
            f"layer = {spec!r} names no module of model {model.label} ({model.use}); its "
            f"modules include: {', '.join(n for n in names if n.count('.') <= 1)[:300]}"
        )
    return picked


def _data(dataset: Component, data_root: str | None) -> tuple[str, str | None]:
    try:
        root = resolve_data_root(dataset, data_root)
        if root is not None and not Path(root).expanduser().exists():
            raise DataNotFound(f"data root {root} does not exist")
    except DataNotFound as exc:
        return f"missing: {exc}", None
    return ("synthetic" if root is None else f"real: {root}"), root


def entry_config(kind: str, entry: Component) -> dict[str, Any]:
    """An entry as it decides results: its resolved suite entry and its registry version."""
    from cambench.benchmarks.engine.suite import registries

    return {**entry.resolved(), "version": registries()[kind].get(entry.use).info.version}


def _cells(
    suite: Suite, mc: Component, dc: Component, data: str, methods: Sequence[Component]
) -> tuple[Cell, ...]:
    configs = {m.label: entry_config("methods", m) for m in methods}
    metrics = {k.label: entry_config("metrics", k) for k in suite.metrics}
    out = []
    for m in methods:
        for k in suite.metrics:
            reason = needs_reason(k, dc) or reference_reason(k, m, methods)
            status = Status.PLANNED
            if reason:
                status = Status.NOT_APPLICABLE
            elif why := suite.excluded(mc.entry or mc.label, dc.label, m.entry or m.label, k.label):
                status, reason = Status.EXCLUDED, why
            if data.startswith("missing"):
                status, reason = Status.SKIPPED, data
            config = {"method": configs[m.label], "metric": metrics[k.label]}
            out.append(Cell(mc.label, dc.label, m.label, k.label, status, reason, config=config))
    return tuple(out)


def fingerprint(group: GroupPlan) -> str:
    """The hash of everything that decides a group's results (``fingerprint_inputs``)."""
    blob = json.dumps(fingerprint_inputs(group), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_inputs(group: GroupPlan) -> dict[str, Any]:
    """What a group's fingerprint hashes, as plain data: stored beside the group, so a
    rerun can say what changed."""
    return {
        "format": FINGERPRINT_FORMAT,
        "model": {**entry_config("models", group.model), **_checkpoint(group.model)},
        "dataset": {**entry_config("datasets", group.dataset), "root": group.root},
        **(
            {"trained_on": {**entry_config("datasets", group.source), "root": group.source_root}}
            if group.source is not None
            else {}
        ),
        "train": dataclasses.asdict(group.train),
        "eval": dataclasses.asdict(group.eval),
        "seed": group.seed,
        "cells": {
            f"{c.method} / {c.metric}": {**c.config, "status": c.status.value, "reason": c.reason}
            for c in group.cells
        },
    }


def _checkpoint(model: Component) -> dict[str, str]:
    """The content hash of a model entry's checkpoint file: new weights at the same path
    are another configuration."""
    if model.checkpoint is None or not Path(model.checkpoint).is_file():
        return {}
    return {"checkpoint_sha256": file_digest(model.checkpoint)[0]}


LEFT_OUT = (Status.EXCLUDED, Status.NOT_APPLICABLE)  # a group of only these is not run


def make_plan(suite: Suite, *, data_root: str | None) -> Plan:
    """The plan of a suite: per (dataset, model) group in suite order, its cells with their
    statuses and its fingerprint; reads no data and trains nothing."""
    groups, left_out = [], []
    used: set[tuple[str, str]] = set()  # (method entry, layer) of every variant made
    for dc in suite.datasets:
        data, root = _data(dc, data_root)
        for mc in suite.model_entries():
            methods = method_variants(suite.methods, mc, dc)
            used |= {(m.entry or m.label, m.layer) for m in methods if isinstance(m.layer, str)}
            cells = _cells(suite, mc, dc, data, methods)
            excluded = [c for c in cells if c.status is Status.EXCLUDED]
            if excluded and all(c.status in LEFT_OUT for c in cells):  # nothing would run
                left_out.append((mc.label, dc.label, excluded[0].reason))
                continue
            source, source_root, trained, group_data = None, None, dc, data
            if mc.trained_on not in (None, dc.label):  # trained on another dataset entry
                source = next(d for d in suite.sources if d.label == mc.trained_on)
                source_data, source_root = _data(source, data_root)
                if source_data.startswith("missing"):  # no model without its training data
                    group_data = source_data
                    cells = _cells(suite, mc, dc, group_data, methods)
                trained = source
            group = GroupPlan(
                model=mc,
                dataset=dc,
                methods=methods,
                metrics=suite.metrics,
                cells=cells,
                data=group_data,
                root=root,
                train=train_config(suite, mc, trained),
                eval=suite.eval,
                seed=suite.seed,
                source=source,
                source_root=source_root,
            )
            groups.append(dataclasses.replace(group, fingerprint=fingerprint(group)))
    _check_layer_lists(suite, used)
    return Plan(suite, tuple(groups), tuple(left_out))


def _check_layer_lists(suite: Suite, used: set[tuple[str, str]]) -> None:
    """Every plain name of a method's layer list is a layer of some model of the suite."""
    import fnmatch

    from cambench.benchmarks.core.errors import UserError

    for m in suite.methods:
        if not isinstance(m.layer, list):
            continue
        for item in m.layer:
            hit = any(
                entry == m.label and (layer == item or fnmatch.fnmatchcase(layer, item))
                for entry, layer in used
            )
            if not hit and item != "stages":
                raise UserError(
                    f"method {m.label}: layer {item!r} names no module of any model of the "
                    f"suite ({', '.join(mc.label for mc in suite.models)})"
                )


def format_plan(plan: Plan) -> str:
    """The dry run's report: per group, its data, cell counts and the reasons of cells that
    will not run; then each method's cost in passes."""
    from cambench.cams import METHODS

    suite = plan.suite
    lines = [
        f"suite {suite.name} v{suite.version}: {len(suite.models)} model(s) x "
        f"{len(suite.datasets)} dataset(s) x {len(suite.methods)} method(s) x "
        f"{len(suite.metrics)} metric(s), {suite.eval.max_images} images per group, "
        f"seed {suite.seed}"
    ]
    total: Counter = Counter()
    for g in plan.groups:
        counts = g.counts()
        total.update(counts)
        lines.append(f"\n{g.name} ({g.data}): " + _counts_text(counts))
        variants = [m.label for m in g.methods if m.entry and m.entry != m.label]
        if variants:
            lines.append(f"  layer variants: {', '.join(variants)}")
        reasons = Counter(
            (c.status, c.reason)
            for c in g.cells
            if c.status in (Status.NOT_APPLICABLE, Status.EXCLUDED)
        )
        for (status, reason), n in reasons.items():
            lines.append(f"  {status.value.replace('_', ' ')} ({n} cells): {reason}")
        lines += [f"  expected at run time: {hint}" for hint in _hints(g)]
    for model, dataset, reason in plan.left_out:
        lines.append(
            f"\n{model} x {dataset}: left out by the suite (every cell excluded): {reason}"
        )
    lines.append("\npasses per image and method (F forward, B backward):")
    for m in suite.methods:
        lines.append(f"  {m.label:<24} {METHODS.get(m.use).info.cost}")
    lines.append("\ntotal: " + _counts_text(total))
    return "\n".join(lines)


def _hints(group: GroupPlan) -> list[str]:
    """What the zoo's metadata lets the dry run expect of a method on a model; the method
    itself decides at run time (a user's checkpoint or architecture may differ)."""
    from cambench.benchmarks.models.zoo import MODELS
    from cambench.cams import METHODS

    if group.model.use not in MODELS or MODELS.get(group.model.use).info.gap_head:
        return []
    return [
        f"{m.label} needs a GAP + linear head; the zoo says {group.model.label} has a "
        "fully-connected head, so it will be not applicable"
        for m in group.methods
        if "gap_head" in METHODS.get(m.use).info.needs
    ]


def _counts_text(counts: Mapping[Status, int]) -> str:
    return (
        f"{counts[Status.PLANNED]} cells to run, {counts[Status.NOT_APPLICABLE]} not "
        f"applicable, {counts[Status.EXCLUDED]} excluded by the suite, "
        f"{counts[Status.SKIPPED]} skipped for missing data"
    )


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two ``fingerprint_inputs``, in a few words.

    >>> old = {"seed": 0, "cells": {"a / x": {"n": 1}}}
    >>> describe_change(old, {"seed": 1, "cells": {"a / x": {"n": 2}, "b / x": {}}})
    'seed; cells: 1 added, 1 changed'
    """
    parts = []
    for key in sorted(set(old) | set(new)):
        if key == "cells" or old.get(key) == new.get(key):
            continue
        parts.append(key)
    before, after = old.get("cells") or {}, new.get("cells") or {}
    counts = {
        "added": len(set(after) - set(before)),
        "removed": len(set(before) - set(after)),
        "changed": sum(before[c] != after[c] for c in set(before) & set(after)),
    }
    if any(counts.values()):
        parts.append("cells: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n))
    return "; ".join(parts) or "the fingerprint's format"
