"""The model zoo: named architectures adapted to a dataset's channels, classes and size.

Every model takes images on the [0, 1] scale and normalizes them itself (its first module,
``normalize``, holds the training set's per-channel mean and std), so perturbations and
attacks are defined on the image scale. Each entry names its default target layer.

>>> model = build_model("gapcnn", in_channels=1, num_classes=2)
>>> MODELS.get("gapcnn").info.default_layer
'features'
>>> tuple(model(torch.rand(3, 1, 32, 32)).shape)
(3, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered architecture.

    default_layer: dotted name of the target layer the CAM methods explain by default.
    gap_head: the classifier is global average pooling + one linear layer (CAM applies).
    version: bump when the architecture or its adaptation changes (invalidates the cache).
    """

    default_layer: str
    gap_head: bool
    family: str = "cnn"
    version: int = 1


MODELS: Registry[ModelInfo] = Registry("model", ModelInfo)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, with the statistics stored as buffers in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.clamp_min(1e-6).reshape(self.std.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize -> features -> head: the layout every zoo model shares."""

    def __init__(self, normalize: Normalize, features: nn.Module, head: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


def _conv_block(cin: int, cout: int, *, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return layers + ([nn.MaxPool2d(2)] if pool else [])


@MODELS.register("gapcnn", aliases=("gap-cnn",), default_layer="features", gap_head=True, family="gap_cnn")
def gapcnn(*, in_channels: int, num_classes: int, width: int = 32) -> Classifier:
    """Small CNN, four conv-BN-ReLU blocks (two pooled: the map keeps 1/4 of the input size),
    global average pooling and one linear layer: CAM applies."""
    features = nn.Sequential(
        *_conv_block(in_channels, width // 2, pool=True),
        *_conv_block(width // 2, width, pool=True),
        *_conv_block(width, width, pool=False),
        *_conv_block(width, width, pool=False),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    return Classifier(Normalize(in_channels), features, head)


def build_model(name: str, *, in_channels: int, num_classes: int, **options) -> nn.Module:
    """Build the named architecture with random weights, adapted to channels and classes."""
    return MODELS.get(name).obj(in_channels=in_channels, num_classes=num_classes, **options)
