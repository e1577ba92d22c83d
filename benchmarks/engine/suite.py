"""Suites: versioned TOML files naming the models, datasets, methods and metrics to cross.

A suite file::

    name = "smoke"
    version = 1
    seed = 0
    include = ["other.toml"]        # optional; merged first, this file wins

    [eval]                           # see EvalConfig
    max_images = 32
    [train]                          # see benchmarks.models.training.TrainConfig
    epochs = 8

    [models.gapcnn]                  # label = registry name unless `use` says otherwise
    layer = "features"               # target layer for the methods (default: the zoo's)
    train = { lr = 1e-3 }            # training overrides for this model, on every dataset
    train_on.synth-lesion = { epochs = 4 }   # ... and on one dataset (by its label)
    [datasets.synth-lesion]
    image_size = 32
    [methods.gradcam]
    [metrics.aopc-xray]
    use = "aopc_morf"                # a second entry of one metric with other options
    region = 34

    [[exclude]]                      # cells the suite leaves out, with the reason
    models = ["resnet*"]             # wildcard patterns per kind; an omitted kind = all
    methods = ["scorecam"]
    metrics = ["stability-*"]
    reason = "too costly for this suite's budget; the full suite runs them"

Excluded cells are recorded with status ``excluded`` and the reason, and shown as such in
the leaderboards: a suite that must fit a time budget says what it left out.

Every key is checked: an unknown key or option is an error naming the file, the key and
the close matches. Options are checked against the keyword-only parameters of the
registered callable they go to.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from cambench.benchmarks.core.checks import NonNegativeInt, PositiveInt, check_options, check_value
from cambench.benchmarks.core.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from cambench.benchmarks.core.registry import Registry, close_matches
from cambench.benchmarks.models.training import TrainConfig

SUITES_DIR = Path(__file__).parents[1] / "suites"
TOP_KEYS = (
    "name",
    "version",
    "description",
    "seed",
    "model_seeds",
    "include",
    "eval",
    "train",
    "models",
    "datasets",
    "methods",
    "metrics",
    "exclude",
)
KINDS = ("models", "datasets", "methods", "metrics")
TOP_TYPES = {  # the types of the top-level values (tables are checked entry by entry)
    "name": str,
    "version": PositiveInt,
    "description": str,
    "seed": NonNegativeInt,
    "model_seeds": PositiveInt,
    "include": str | list[str],
    **{kind: dict for kind in KINDS},
    "eval": dict,
    "train": dict,
}
# Entry keys the pipeline reads itself, not options of the registered callable:
#   models:   layer (target layer), checkpoint (the user's weights instead of training),
#             model_seed (trains the model from seed + model_seed: another draw of the
#             weights on the same data and evaluation images; set by --model-seeds),
#             train (TrainConfig overrides for this model), train_on (a table of dataset
#             label -> TrainConfig overrides for this model on that dataset), trained_on
#             (the dataset label the model is trained or loaded for, then explained on
#             every dataset of the suite: external validation), classes (evaluation class
#             name -> the model's class name, for the datasets it was not trained on)
#   datasets: root (data directory), train (TrainConfig overrides for this dataset)
#   methods, metrics: max_images (the entry sees only the first N evaluation images of each
#             (model, dataset): for costly methods and metrics; n is reported per cell)
#   methods: layer (the target layer of a CAM-family method instead of the model's: a name,
#             a pattern, a list, or "stages"; several layers expand into one variant each)
#   metrics: mask (the ground truth a localization metric reads: "lesion", "organ" or a
#             further mask the dataset names)
ENTRY_KEYS = {
    "models": ("layer", "checkpoint", "train", "train_on", "model_seed", "trained_on", "classes"),
    "datasets": ("root", "train"),
    "methods": ("max_images", "layer"),
    "metrics": ("max_images", "mask"),
}
PIPELINE_FIELDS = tuple(dict.fromkeys(key for keys in ENTRY_KEYS.values() for key in keys))
# Parameters the pipeline passes itself, never options of a suite entry.
RESERVED = {
    "methods": {"model", "x", "target", "layer"},
    "metrics": {"ctx"},
    "datasets": {"split", "root", "seed"},
    "models": {"in_channels", "num_classes"},
}


@dataclass(frozen=True)
class EvalConfig:
    """How the evaluation set is drawn and batched.

    split: dataset split to explain; max_images: images per (model, dataset), drawn with
    the suite seed; batch_size: images per explanation batch; forward_batch: images per
    forward pass inside metrics; target: "predicted" class or the "label"; channels_last:
    evaluate with the model's weights in channels-last memory format (the same numbers up
    to float rounding, and on this 2-core CPU 1.3x less time for a medical-suite group of
    resnet18: 61 s against 82 s).
    """

    split: Literal["train", "val", "test"] = "test"
    max_images: PositiveInt = 64
    batch_size: PositiveInt = 32
    forward_batch: PositiveInt = 256
    target: Literal["predicted", "label"] = "predicted"
    channels_last: bool = True


@dataclass(frozen=True)
class Component:
    """One entry of a suite: its label in the results, the registry name it uses, the
    keyword options of the registered callable, and the pipeline fields the harness reads
    itself (never passed to the callable; each belongs to the kinds ``ENTRY_KEYS`` names).

    layer: target layer of the methods (models; default: the zoo's). On a method of the CAM
        family: its own target layer, or several, each giving a variant of the method
        labelled ``<label>[<layer>]``: a list of names, a pattern (``"features.layer*"``:
        shell wildcards within one dotted segment), or ``"stages"`` (every stage of the
        model, shallow to deep: ``benchmarks.engine.plan.method_variants``).
    checkpoint: the user's weights for a zoo model, nothing is trained (models).
    train: TrainConfig overrides (models: on every dataset; datasets).
    train_on: dataset label -> TrainConfig overrides for this model on that dataset (models).
    root: the data directory of a real dataset (datasets).
    max_images: the entry sees only the first N evaluation images of each group (methods,
        metrics: for costly entries; every cell reports its n).
    model_seed: the model is trained from the suite seed + this (models; ``model_seeds``).
    trained_on: the dataset label the model is trained (or its checkpoint loaded) for; it is
        then explained on every dataset of the suite, its labels mapped by ``classes``
        (models: external validation; see ``benchmarks.engine.group.Relabelled``).
    classes: evaluation class name -> the model's class name, for a dataset the model was
        not trained on; classes of the same name map to each other (models).
    mask: the ground truth a localization metric reads instead of its own: "lesion" (the
        items' ``mask``), "organ" (``organ_mask``) or the name of a further mask of the
        dataset (``mask_<name>``: ``csv``'s ``extra_masks``, ``folder``'s
        ``extra_mask_dirs``) (metrics that need masks).
    """

    label: str
    use: str
    options: dict[str, Any] = field(default_factory=dict)
    layer: str | list[str] | None = None
    checkpoint: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    train_on: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: str | None = None
    max_images: PositiveInt | None = None
    model_seed: NonNegativeInt | None = None
    trained_on: str | None = None
    classes: dict[str, str] = field(default_factory=dict)
    mask: str | None = None
    entry: str | None = None  # the entry a model-seed copy or a layer variant came from

    def pipeline(self) -> dict[str, Any]:
        """The pipeline fields that are set, by name."""
        fields_ = {name: getattr(self, name) for name in PIPELINE_FIELDS}
        return {k: v for k, v in fields_.items() if v not in (None, {})}

    def resolved(self) -> dict[str, Any]:
        """The entry as plain data, as the suite file wrote it: ``use``, pipeline fields,
        options (the form the manifest and the config hash read)."""
        return {"use": self.use, **self.pipeline(), **self.options}


@dataclass(frozen=True)
class Exclusion:
    """Cells a suite leaves out: wildcard patterns per kind (empty = every entry), a reason."""

    reason: str
    models: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    def matches(self, model: str, dataset: str, method: str, metric: str) -> bool:
        import fnmatch

        return all(
            not pats or any(fnmatch.fnmatchcase(label, p) for p in pats)
            for label, pats in (
                (model, self.models),
                (dataset, self.datasets),
                (method, self.methods),
                (metric, self.metrics),
            )
        )


@dataclass(frozen=True)
class Suite:
    name: str
    version: int
    description: str
    seed: int
    eval: EvalConfig
    train: TrainConfig
    models: tuple[Component, ...]
    datasets: tuple[Component, ...]
    methods: tuple[Component, ...]
    metrics: tuple[Component, ...]
    source: str = ""
    exclude: tuple[Exclusion, ...] = ()
    # every dataset entry of the file, also those a filter (--datasets) left out: where a
    # model's ``trained_on`` dataset is found
    sources: tuple[Component, ...] = ()
    model_seeds: int = 1  # models trained per entry, from seeds seed + 0 .. n-1

    def model_entries(self) -> tuple[Component, ...]:
        """The model entries as the plan runs them: with ``model_seeds`` = n > 1, each entry
        n times, trained from seeds seed + 0 .. n-1 (``gapcnn`` becomes ``gapcnn-s0``,
        ``gapcnn-s1``, ...: the label carries the model seed into every table) on the same
        data and evaluation images. An entry that sets ``model_seed`` itself stays one."""
        import dataclasses

        if self.model_seeds <= 1:
            return self.models
        return tuple(
            dataclasses.replace(m, label=seed_label(m.label, k), model_seed=k, entry=m.label)
            for m in self.models
            for k in range(self.model_seeds if m.model_seed is None else 0)
        ) + tuple(m for m in self.models if m.model_seed is not None)

    def excluded(self, model: str, dataset: str, method: str, metric: str) -> str | None:
        """The reason the suite leaves this cell out, or None."""
        for rule in self.exclude:
            if rule.matches(model, dataset, method, metric):
                return rule.reason
        return None

    def resolved(self) -> dict[str, Any]:
        """The suite as plain data, after includes, defaults and filters."""
        comp = lambda cs: {c.label: c.resolved() for c in cs}  # noqa: E731
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "seed": self.seed,
            **({"model_seeds": self.model_seeds} if self.model_seeds > 1 else {}),
            "eval": asdict(self.eval),
            "train": asdict(self.train),
            **{kind: comp(getattr(self, kind)) for kind in KINDS},
            **({"exclude": [asdict(e) for e in self.exclude]} if self.exclude else {}),
        }

    def config_hash(self) -> str:
        return hashlib.sha256(
            json.dumps(self.resolved(), sort_keys=True, default=str).encode()
        ).hexdigest()[:10]


def seed_label(entry: str, k: int) -> str:
    """The label of an entry's model trained from the suite seed + ``k`` (``model_seeds``):
    ``gapcnn`` -> ``gapcnn-s1``; reports map it back to its entry by this rule.

    >>> seed_label("gapcnn", 1)
    'gapcnn-s1'
    """
    return f"{entry}-s{k}"


def registries() -> dict[str, Registry]:
    from cambench.benchmarks.models.zoo import MODELS
    from cambench.cams import METHODS
    from cambench.datasets import DATASETS
    from cambench.metrics import METRICS

    return {"models": MODELS, "datasets": DATASETS, "methods": METHODS, "metrics": METRICS}


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def suite_path(name_or_path: str) -> Path:
    """A suite name (a file in benchmarks/suites) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"suite file {path} does not exist")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    names = available_suites()
    hint = close_matches(name_or_path, names)
    raise UserError(
        f"Unknown suite {name_or_path!r}."
        + (f" Did you mean: {', '.join(hint)}?" if hint else "")
        + f" Available: {', '.join(names)} (or give a path to a .toml file)"
    )


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise UserError(
            f"suite file {path}: include cycle through {' -> '.join(str(p) for p in seen)}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"suite file {path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"suite file {path} cannot be read ({type(exc).__name__})") from None
    _check_keys(path, "top level", data, TOP_KEYS)
    for key, tp in TOP_TYPES.items():
        if key in data:
            check_value(data[key], tp, f"suite file {path}: {key}")
    merged: dict[str, Any] = {}
    includes = data.get("include", [])
    for inc in [includes] if isinstance(includes, str) else includes:
        target = (path.parent / inc) if not Path(inc).is_absolute() else Path(inc)
        if not target.is_file():
            raise UserError(
                f"suite file {path}: include {inc!r} does not exist ({target}); "
                "include paths are relative to the including file"
            )
        _merge(merged, _read(target, (*seen, path)))
    _merge(merged, {k: v for k, v in data.items() if k != "include"})
    merged.setdefault("_files", []).append(str(path))
    return merged


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif key == "_files":
            into.setdefault("_files", []).extend(value)
        else:
            into[key] = value


def _check_keys(path: Path | str, where: str, data: dict, allowed) -> None:
    for key in data:
        if key not in allowed:
            hint = close_matches(key, allowed)
            raise UserError(
                f"suite file {path}: unknown key {key!r} in {where}."
                + (f" Did you mean: {', '.join(hint)}?" if hint else "")
                + f" Allowed: {', '.join(allowed)}"
            )


def option_names(fn, kind: str) -> list[str]:
    """Keyword options a registered callable accepts (its parameters minus the pipeline's)."""
    params = inspect.signature(fn).parameters
    return [
        n
        for n, p in params.items()
        if n not in RESERVED[kind] and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _components(
    path: str, kind: str, table: dict[str, Any], reg: Registry
) -> tuple[Component, ...]:
    out = []
    for label, opts in table.items():
        if not isinstance(opts, dict):
            raise UserError(
                f"suite file {path}: [{kind}.{label}] must be a table of options, got {opts!r}"
            )
        opts = dict(opts)
        use = opts.pop("use", label)
        entry = reg.get(use)  # unknown names raise with close matches
        allowed = option_names(entry.obj, kind) + list(ENTRY_KEYS.get(kind, ()))
        _check_keys(path, f"[{kind}.{label}] (options of {reg.kind} {entry.name!r})", opts, allowed)
        where = f"suite file {path}: [{kind}.{label}]"
        pipeline = {k: opts[k] for k in ENTRY_KEYS.get(kind, ()) if k in opts}
        check_options(entry.obj, {k: v for k, v in opts.items() if k not in pipeline}, where)
        check_options(
            Component,
            {k: v for k, v in pipeline.items() if k not in ("train_on", "classes")},
            where,
        )
        classes = opts.get("classes", {})
        if not isinstance(classes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in classes.items()
        ):
            raise UserError(
                f"{where} classes must map evaluation class names to the model's, e.g. "
                f'classes = {{ "COVID-19" = "pneumonia" }}; got {classes!r}'
            )
        if "train" in opts:
            if not isinstance(opts["train"], dict):
                raise UserError(
                    f"suite file {path}: [{kind}.{label}] train must be a table, "
                    f"e.g. train = {{ epochs = 12 }}; got {opts['train']!r}"
                )
            _config(path, f"{kind}.{label}.train", TrainConfig, opts["train"])
        for dataset, train in _table(path, f"[{kind}.{label}] train_on", opts, "train_on"):
            _config(path, f"{kind}.{label}.train_on.{dataset}", TrainConfig, train)
        if "mask" in opts:
            _check_mask(where, opts["mask"], entry)
        if "layer" in opts:
            _check_layer(where, kind, opts["layer"], entry)
        checkpoint = opts.get("checkpoint")
        if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
            raise UserError(
                f"{where} checkpoint {checkpoint!r} does not exist; give the path of a state "
                "dict saved with torch.save(model.state_dict(), path)"
            )
        pipeline = {k: opts.pop(k) for k in ENTRY_KEYS.get(kind, ()) if k in opts}
        out.append(Component(label=label, use=entry.name, options=opts, **pipeline))
    return tuple(out)


def _check_layer(where: str, kind: str, layer: Any, entry: Any) -> None:
    """``layer`` on a model names one layer; on a method, one or several (a list, a pattern,
    "stages"), and only a method that explains at a layer takes it."""
    if kind == "models" and not isinstance(layer, str):
        raise UserError(
            f"{where} layer = {layer!r}: a model's layer is one name (a string); several "
            "layers go on a method entry: [methods.gradcam] layer = [...]"
        )
    if kind == "methods" and "layer" not in entry.info.needs:
        raise UserError(
            f"{where} layer = {layer!r}: {entry.name} explains at no layer; layer applies to "
            "the CAM family (gradcam, gradcampp, scorecam, ...)"
        )
    if isinstance(layer, list) and (not layer or not all(isinstance(n, str) for n in layer)):
        raise UserError(f"{where} layer = {layer!r}: give one or more layer names")


def _check_mask(where: str, mask: str, entry: Any) -> None:
    """``mask`` on a metric entry: a localization metric's, naming a mask by a plain name."""
    if not {"masks", "organ_masks"} & set(entry.info.needs):
        raise UserError(
            f"{where} mask = {mask!r}: {entry.name} reads no mask; mask applies to the "
            "localization metrics (pointing_game, energy_pointing_game, iou, ...)"
        )
    if not mask.replace("_", "").isalnum() or not mask.isascii():
        raise UserError(
            f"{where} mask = {mask!r}: name a mask of the dataset: 'lesion', 'organ', or a "
            "name of its extra_masks (letters, digits and _)"
        )


def _table(path: str, where: str, opts: dict[str, Any], key: str) -> list[tuple[str, dict]]:
    """The (name, table) items of the table of tables ``opts[key]`` (none if absent)."""
    value = opts.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UserError(
            f"suite file {path}: {where} must be a table of tables, "
            f"e.g. {key}.busi = {{ epochs = 8 }}; got {value!r}"
        )
    return list(value.items())


def _check_train_on(path: str, models: tuple[Component, ...], datasets: tuple[Component, ...]):
    """Every ``train_on`` key and ``trained_on`` of a model entry names a dataset entry of
    the suite."""
    labels = [d.label for d in datasets]
    for model in models:
        if model.trained_on is not None and model.trained_on not in labels:
            raise _no_match(
                model.trained_on,
                labels,
                f"suite file {path}: [models.{model.label}] trained_on = "
                f"{model.trained_on!r}: no dataset {model.trained_on!r} in the suite.",
            )
        for dataset in model.train_on:
            if dataset not in labels:
                raise _no_match(
                    dataset,
                    labels,
                    f"suite file {path}: [models.{model.label}] train_on.{dataset}: no dataset "
                    f"{dataset!r} in the suite.",
                )


def _config(path: str, name: str, cls, data: dict[str, Any]):
    allowed = [f.name for f in fields(cls)]
    _check_keys(path, f"[{name}]", data, allowed)
    check_options(cls, data, f"suite file {path}: [{name}]")
    return cls(**data)


def require_match(pattern: str, labels: list[str], message: str) -> None:
    """A UserError (``message``, the close matches, the labels there are) unless the
    wildcard ``pattern`` matches one of ``labels``."""
    import fnmatch

    if any(fnmatch.fnmatchcase(label, pattern) for label in labels):
        return
    raise _no_match(pattern, labels, message)


def _no_match(name: str, labels: list[str], message: str) -> UserError:
    """``message``, then the labels close to ``name`` and every label there is."""
    hint = close_matches(name, labels)
    return UserError(
        message
        + (f" Did you mean: {', '.join(hint)}?" if hint else "")
        + f" The suite has: {', '.join(labels)}"
    )


def _exclusions(path: str, rules: Any, components: dict[str, tuple[Component, ...]]):
    """The [[exclude]] tables; every pattern must match an entry of the suite (typos fail)."""

    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise UserError(
            f"suite file {path}: exclude must be an array of tables ([[exclude]]), got {rules!r}"
        )
    out = []
    for i, rule in enumerate(rules, 1):
        where = f"[[exclude]] #{i}"
        _check_keys(path, where, rule, (*KINDS, "reason"))
        reason = rule.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise UserError(
                f"suite file {path}: {where} needs a reason (a sentence the leaderboard shows)"
            )
        pats: dict[str, tuple[str, ...]] = {}
        for kind in KINDS:
            value = rule.get(kind, [])
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(
                    f"suite file {path}: {where} {kind} must be a list of names or wildcard "
                    f"patterns, got {rule.get(kind)!r}"
                )
            labels = [c.label for c in components[kind]]
            for pat in value:
                require_match(
                    pat,
                    labels,
                    f"suite file {path}: {where} {kind} pattern {pat!r} matches no entry.",
                )
            pats[kind] = tuple(value)
        out.append(Exclusion(reason=reason.strip(), **pats))
    return tuple(out)


def load_suite(name_or_path: str) -> Suite:
    """Read, merge and validate a suite; unknown names and keys are errors with close matches."""
    path = suite_path(name_or_path)
    data = _read(path)
    where = str(path)
    regs = registries()
    try:
        components = {
            kind: _components(where, kind, data.get(kind, {}), regs[kind]) for kind in KINDS
        }
        _check_train_on(where, components["models"], components["datasets"])
        return Suite(
            name=str(data.get("name", path.stem)),
            version=int(data.get("version", 1)),
            description=str(data.get("description", "")),
            seed=int(data.get("seed", 0)),
            eval=_config(where, "eval", EvalConfig, data.get("eval", {})),
            train=_config(where, "train", TrainConfig, data.get("train", {})),
            **components,
            source=", ".join(data.get("_files", [])),
            exclude=_exclusions(where, data.get("exclude", []), components),
            model_seeds=int(data.get("model_seeds", 1)),
            sources=components["datasets"],
        )
    except UserError as exc:
        if where in str(exc):
            raise
        raise UserError(f"suite file {where}: {exc}") from None


def train_config(suite: Suite, model: Component, dataset: Component) -> TrainConfig:
    """The suite's [train], overridden by the dataset entry's ``train``, then the model's
    ``train``, then the model's ``train_on`` entry for this dataset."""
    import dataclasses

    return dataclasses.replace(
        suite.train,
        **{
            **dataset.train,
            **model.train,
            **model.train_on.get(dataset.label, {}),
        },
    )


def filter_suite(suite: Suite, **patterns: list[str] | None) -> Suite:
    """Keep the entries whose label matches any of the wildcard patterns, per kind."""
    import dataclasses
    import fnmatch

    changes = {}
    for kind, pats in patterns.items():
        if not pats:
            continue
        comps = getattr(suite, kind)
        labels = [c.label for c in comps]
        for pat in pats:
            require_match(
                pat, labels, f"--{kind} {pat!r} matches no {kind[:-1]} of suite {suite.name!r}."
            )
        changes[kind] = tuple(
            c for c in comps if any(fnmatch.fnmatchcase(c.label, p) for p in pats)
        )
    return dataclasses.replace(suite, **changes)
