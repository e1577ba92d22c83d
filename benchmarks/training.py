"""Train a zoo model on a dataset on first use, cache it, and report its test performance.

The cache key is a hash of everything that determines the weights: architecture and its
version, dataset name, options and version, training settings, seed. Checkpoints hold a
plain state dict and load with ``weights_only=True``; each has its classification report
(accuracy, per-class precision, recall, F1 on the test split) beside it as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.errors import UserError
from benchmarks.zoo import MODELS, build_model
from datasets.base import DATASETS, ImageDataset

TRAINING_CODE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field is part of the cache key."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    flip: bool = False  # random horizontal flips as augmentation


@dataclass
class TrainedModel:
    model: nn.Module
    report: dict[str, Any]
    checkpoint: Path


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    blob = json.dumps(
        {
            "data": fingerprint,
            "model": model_name,
            "model_version": MODELS.get(model_name).info.version,
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
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 256, device: str = "cpu"
) -> torch.Tensor:
    """Predicted classes (N,) for images (N, C, H, W)."""
    out = [
        model(images[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


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
    """Seeded AdamW training with a one-cycle schedule and a progress bar."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(images) // config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    # disable=None: a bar on a terminal, silence in CI logs
    with tqdm(
        total=config.epochs * steps_per_epoch, desc=desc, unit="step", leave=False, disable=None
    ) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=gen)
            for i in range(0, len(images), config.batch_size):
                idx = order[i : i + config.batch_size]
                xb, yb = images[idx].to(device), labels[idx].to(device)
                if config.flip:
                    flip = torch.rand(len(idx), generator=gen) < 0.5
                    xb = torch.where(flip.to(device)[:, None, None, None], xb.flip(-1), xb)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def get_trained_model(
    model_name: str,
    dataset_name: str,
    *,
    train_set: ImageDataset,
    test_set: ImageDataset,
    dataset_options: dict,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    cache_dir: Path,
    device: str = "cpu",
    model_options: dict | None = None,
) -> TrainedModel:
    """The trained model from the cache, or trained now and cached; in eval mode on ``device``."""
    model_options = model_options or {}
    key = cache_key(
        model_name,
        dataset_name,
        {**dataset_options, **{f"model.{k}": v for k, v in model_options.items()}},
        config,
        seed,
        data_fingerprint(train_set),
    )
    stem = Path(cache_dir) / "models" / f"{model_name}--{dataset_name}--{key}"
    ckpt, report_path = stem.with_suffix(".pt"), stem.with_suffix(".report.json")
    torch.manual_seed(seed)
    model = build_model(
        model_name,
        in_channels=train_set.channels,
        num_classes=train_set.num_classes,
        **model_options,
    )
    if ckpt.exists() and report_path.exists():
        try:
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        except Exception as exc:  # a corrupt cache entry is reported, never silently trusted
            raise UserError(
                f"cached checkpoint {ckpt} does not load ({exc}); delete it to retrain"
            ) from None
        return TrainedModel(model.to(device).eval(), json.loads(report_path.read_text()), ckpt)

    images, labels = stack(train_set)
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3))
    model.normalize.set_stats(mean, std)
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
    test_images, test_labels = stack(test_set)
    y_pred = predict(model, test_images, device=device).numpy()
    report = classification_report(test_labels.numpy(), y_pred, tuple(test_set.class_names))
    report.update(
        model=model_name,
        dataset=dataset_name,
        split="test",
        n=len(y_pred),
        train_seconds=round(seconds, 2),
        key=key,
        seed=seed,
        train=asdict(config),
    )
    _atomic_write(
        ckpt, lambda p: torch.save({k: v.cpu() for k, v in model.state_dict().items()}, p)
    )
    _atomic_write(report_path, lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    return TrainedModel(model.eval(), report, ckpt)
