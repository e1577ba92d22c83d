"""Train a zoo model on a dataset on first use, cache it, and report its test performance.

The cache key is a hash of everything that determines the weights: architecture and its
version, dataset name, options and version, training settings, seed. Checkpoints hold a
plain state dict and load with ``weights_only=True``; each has its classification report
(accuracy, per-class precision, recall, F1 on the test split) beside it as JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cambench.benchmarks.core.checks import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import atomic_write, file_digest
from cambench.benchmarks.models.external import read_state_dict
from cambench.benchmarks.models.zoo import MODELS, build_model
from cambench.datasets.base import DATASETS, ImageDataset

TRAINING_CODE_VERSION = 2  # 2: channels-last training


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is part of the cache key."""

    epochs: PositiveInt = 8
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 3e-3
    weight_decay: NonNegativeFloat = 1e-4
    flip: bool = False  # random horizontal flips as augmentation
    shift: NonNegativeInt = 0  # random translations by up to this many pixels (edge-replicated)
    jitter: Fraction = 0.0  # random brightness and contrast change, up to this fraction
    balanced: bool = False  # weight the loss by inverse class frequency (imbalanced data)


@dataclass
class TrainedModel:
    model: nn.Module
    report: dict[str, Any]
    checkpoint: Path


def stack(dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) and labels (N,) of a dataset, as tensors."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images, dataset.labels
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def data_fingerprint(dataset: ImageDataset) -> str:
    """Hash of an in-memory dataset's images and labels: a generator or loader change that
    alters the training data changes the cache key even if nobody bumped a version. Lazy
    datasets (too large to hash on every run) return "" and rely on names, options, versions."""
    if not (hasattr(dataset, "images") and hasattr(dataset, "labels")):
        return ""
    digest = hashlib.sha256()
    digest.update(dataset.images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(dataset.labels.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(
    model_name: str,
    dataset_name: str,
    dataset_options: dict,
    config: TrainConfig,
    seed: int,
    fingerprint: str = "",
) -> str:
    info = MODELS.get(model_name).info
    blob = json.dumps(
        {
            "data": fingerprint,
            "model": model_name,
            "model_version": info.version,
            # a model named by import path: its library version or source hash
            **({"model_source": info.source} if info.source else {}),
            "dataset": dataset_name,
            "dataset_version": DATASETS.get(dataset_name).info.version,
            "dataset_options": dataset_options,
            "train": asdict(config),
            "seed": seed,
            "code": TRAINING_CODE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    ids: list[str] | None = None,
    what: str = "the model",
) -> torch.Tensor:
    """Predicted classes (N,) for images (N, C, H, W); logits that are not finite are a
    ``UserError`` naming ``what`` and the first such image (its id from ``ids``)."""
    out = []
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))
        names = ids[i : i + batch_size] if ids is not None else None
        check_finite(logits, names or [f"#{j}" for j in range(i, i + len(logits))], what)
        out.append(logits.argmax(1).cpu())
    return torch.cat(out)


def check_finite(logits: torch.Tensor, ids: list[str], what: str) -> None:
    """Raise ``UserError`` naming ``what`` and the first image whose logits are NaN or
    infinite: no accuracy, map or score of such a model means anything."""
    bad = ~torch.isfinite(logits).all(dim=1)
    if not bad.any():
        return
    first = int(bad.nonzero()[0])
    row = logits[first].flatten()
    raise UserError(
        f"{what}: the logits are not finite ({row[~torch.isfinite(row)][0].item()}) on image "
        f"{ids[first]!r} and {int(bad.sum()) - 1} more of its batch; the model diverged in "
        "training (lower lr) or its weights are damaged (check the checkpoint)"
    )


def classification_report(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy and per-class precision, recall, F1 and support (0 where undefined, never NaN)."""
    per_class = {}
    for c, name in enumerate(class_names):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(np.sum(y_true == c)),
        }
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "classes": per_class,
    }


def augment(x: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The configured random flips, shifts and brightness/contrast changes of a batch, drawn
    from ``gen`` (on the CPU, so a seed gives the same batches on every device)."""
    n = len(x)
    if config.flip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if config.shift:
        s = int(config.shift)
        padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
        dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=gen).tolist()
        h, w = x.shape[-2:]
        x = torch.stack(
            [
                padded[i, :, a : a + h, b : b + w]
                for i, (a, b) in enumerate(zip(dy, dx, strict=True))
            ]
        )
    if config.jitter:
        j = float(config.jitter)
        scale = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * j
        offset = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * j * 0.5
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * scale.to(x.device) + mean + offset.to(x.device)).clamp(0, 1)
    return x


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int,
    device: str,
    desc: str,
) -> None:
    """Seeded AdamW training with a one-cycle schedule and a progress bar.

    Trains in channels-last memory format (1.1-1.3x faster convolutions on CPU, measured in
    ``benchmarks/perf/training.py``) and hands the model back in the default format, so a
    freshly trained model and one loaded from the cache compute bit-identical maps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(images) // config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    weight = None
    if config.balanced:
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1).float()
        weight = (counts.sum() / (len(counts) * counts.clamp_min(1))).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    # disable=None: a bar on a terminal, silence in CI logs
    with tqdm(
        total=config.epochs * steps_per_epoch, desc=desc, unit="step", leave=False, disable=None
    ) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=gen)
            for i in range(0, len(images), config.batch_size):
                idx = order[i : i + config.batch_size]
                xb, yb = images[idx].to(device), labels[idx].to(device)
                xb = augment(xb, config, gen).contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.to(memory_format=torch.contiguous_format).eval()


def evaluate(
    model: nn.Module, dataset: ImageDataset, device: str, split: str = "test", what: str = "model"
) -> dict[str, Any]:
    """The classification report of ``model`` on ``dataset`` (accuracy, per-class P/R/F1)."""
    images, labels = stack(dataset)
    ids = getattr(dataset, "ids", None)
    what = f"{what} ({split} split)"
    y_pred = predict(model, images, device=device, ids=ids, what=what).numpy()
    report = classification_report(labels.numpy(), y_pred, tuple(dataset.class_names))
    report.update(split=split, n=len(y_pred))
    return report


ValSet = ImageDataset | Callable[[], ImageDataset | None] | None


def _with_validation(
    report: dict[str, Any], model: nn.Module, val_set: ValSet, device: str
) -> bool:
    """Add the validation split's report under ``"val"`` if there is one and it is missing
    (reports cached before it was recorded get it on their next load); True if added.
    ``val_set`` may be a loader, called only then, so a cached report costs no loading.

    Settings such as the epochs are to be chosen on it: the test split is for reporting."""
    if val_set is None or "val" in report:
        return False
    dataset = val_set() if callable(val_set) else val_set
    if dataset is None:
        return False
    report["val"] = evaluate(model, dataset, device, split="val")
    return True


def set_normalization(model: nn.Module, images: torch.Tensor) -> None:
    """Give a model that normalizes its own inputs (a ``normalize`` submodule with
    ``set_stats``, as every zoo model has) the training images' per-channel mean and std. A
    model without one takes the [0, 1] images as they are: its normalization, if any, is
    its own."""
    normalize = getattr(model, "normalize", None)
    if callable(getattr(normalize, "set_stats", None)):
        normalize.set_stats(images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3)))


def load_checkpoint(model: nn.Module, path: str | Path, *, what: str, built_for: str = "") -> None:
    """Load a state dict saved with ``torch.save(model.state_dict(), path)`` into ``model``
    (``weights_only=True``); any failure is a UserError naming the file and what was expected
    (``built_for``: what the data asks of the model, said when shapes differ). A state dict
    without the ``normalize.*`` buffers keeps the model's own statistics."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: checkpoint {str(path)!r} does not exist")
    try:
        state = read_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("normalize.")]
        if missing or unexpected:
            raise KeyError(
                f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
            )
    except Exception as exc:  # every failure becomes one line naming the file
        detail = _load_error(exc, built_for)
        raise UserError(
            f"{what}: checkpoint {str(path)!r} does not load ({detail}); expected a state dict "
            "of this model, saved with torch.save(model.state_dict(), path)"
        ) from None


SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _load_error(exc: BaseException, built_for: str) -> str:
    """torch's load error in one line: the tensors whose shapes differ (torch lists them on
    the lines after its first), with what the model was built for; else its message."""
    text = " ".join(str(exc).split())
    sizes = [m for m in SIZE_MISMATCH.findall(text) if not m[0].startswith("normalize.")]
    if not sizes:
        return text[:400] or type(exc).__name__
    shown = "; ".join(f"{k}: {a} in the checkpoint, {b} in the model" for k, a, b in sizes[:3])
    more = f" and {len(sizes) - 3} more" if len(sizes) > 3 else ""
    return f"shapes differ: {shown}{more}" + (f" (the model is {built_for})" if built_for else "")


def get_trained_model(
    model_name: str,
    dataset_name: str,
    *,
    train_set: ImageDataset,
    test_set: ImageDataset,
    val_set: ValSet = None,
    dataset_options: dict,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    cache_dir: Path,
    device: str = "cpu",
    model_options: dict | None = None,
    checkpoint: str | Path | None = None,
) -> TrainedModel:
    """The trained model from the cache, or trained now and cached; in eval mode on ``device``.

    The report is the test split's classification report, with the validation split's
    under ``"val"`` when ``val_set`` (a dataset, or a loader returning one or None) is given. ``checkpoint``: the user's own weights for
    this zoo model; nothing is trained or cached, the reports are computed afresh.
    """
    model_options = model_options or {}

    def fresh() -> nn.Module:  # seeded: the initial weights are part of what the seed fixes
        torch.manual_seed(seed)
        return build_model(
            model_name,
            in_channels=train_set.channels,
            num_classes=train_set.num_classes,
            **model_options,
        )

    model = fresh()
    if checkpoint is not None:
        set_normalization(model, stack(train_set)[0])
        load_checkpoint(
            model,
            checkpoint,
            what=f"model {model_name} on {dataset_name}",
            built_for=f"built for {train_set.channels} input channel(s) and "
            f"{train_set.num_classes} class(es)",
        )
        model.to(device).eval()
        report = evaluate(model, test_set, device, what=f"model {model_name} on {dataset_name}")
        report.update(model=model_name, dataset=dataset_name, checkpoint=str(checkpoint))
        _with_validation(report, model, val_set, device)
        return TrainedModel(model, report, Path(checkpoint))

    keyed = dict(model_options)
    weights = keyed.get("weights")
    if isinstance(weights, str) and Path(weights).expanduser().is_file():  # its content counts
        keyed["weights_sha256"] = file_digest(Path(weights).expanduser())[0]
    key = cache_key(
        model_name,
        dataset_name,
        {**dataset_options, **{f"model.{k}": v for k, v in keyed.items()}},
        config,
        seed,
        data_fingerprint(train_set),
    )
    safe = re.sub(r"[^\w.-]", "_", model_name)  # "torchvision:densenet121" -> a file name
    stem = Path(cache_dir) / "models" / f"{safe}--{dataset_name}--{key}"
    ckpt, report_path = stem.with_suffix(".pt"), stem.with_suffix(".report.json")
    if ckpt.exists() and report_path.exists():
        what = f"{model_name} on {dataset_name}"
        if cached := _cached(model, ckpt, report_path, val_set, device, what=what):
            return cached
        model = fresh()  # the damaged entry left its weights half-loaded
    images, labels = stack(train_set)
    set_normalization(model, images)
    start = time.perf_counter()
    train(
        model,
        images,
        labels,
        config,
        seed=seed,
        device=device,
        desc=f"train {model_name} on {dataset_name}",
    )
    seconds = time.perf_counter() - start
    report = evaluate(model, test_set, device, what=f"model {model_name} on {dataset_name}")
    report.update(
        model=model_name,
        dataset=dataset_name,
        train_seconds=round(seconds, 2),
        key=key,
        seed=seed,
        train=asdict(config),
    )
    _with_validation(report, model, val_set, device)
    atomic_write(ckpt, lambda p: torch.save({k: v.cpu() for k, v in model.state_dict().items()}, p))
    _write_report(report_path, report)
    return TrainedModel(model.eval(), {**report, "checkpoint": str(ckpt)}, ckpt)


def _cached(
    model: nn.Module, ckpt: Path, report_path: Path, val_set: ValSet, device: str, *, what: str
) -> TrainedModel | None:
    """The cached model and report; None (and a warning) for a damaged entry, which is
    then retrained. A report that lacks the validation entry gains it."""
    try:
        load_checkpoint(model, ckpt, what=f"cached model {what}")
        report = json.loads(report_path.read_text())
    except (UserError, ValueError) as exc:
        print(f"warning: {exc}; retraining", file=sys.stderr)
        return None
    model.to(device).eval()
    if _with_validation(report, model, val_set, device):
        try:
            _write_report(report_path, report)
        except OSError as exc:  # a read-only cache still serves its models
            print(f"warning: could not update {report_path}: {exc}", file=sys.stderr)
    # where the weights are, for reuse as a suite's checkpoint (not stored: the cache moves)
    return TrainedModel(model, {**report, "checkpoint": str(ckpt)}, ckpt)


def _write_report(path: Path, report: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(report, indent=2))
