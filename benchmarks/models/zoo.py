"""The model zoo: named architectures adapted to a dataset's channels, classes and size.

Every model takes images on the [0, 1] scale and normalizes them itself (its first module,
``normalize``, holds the training set's per-channel mean and std), so perturbations and
attacks are defined on the image scale. Each entry names its default target layer. A model
registered without a ``normalize`` module is given the [0, 1] images as they are
(``training.set_normalization``): its normalization, if any, is its own.

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

from cambench.benchmarks.core.checks import PositiveInt
from cambench.benchmarks.core.registry import Entry, Registry


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered architecture.

    default_layer: dotted name of the target layer the CAM methods explain by default.
    gap_head: the classifier is global average pooling + one linear layer (CAM applies).
    version: bump when the architecture or its adaptation changes (invalidates the cache).
    source: where a model named by import path comes from, with its version or the hash of
        its source file (part of the model cache key; see ``benchmarks.models.external``).
    stages: the dotted names of the outputs of the network's stages, shallow to deep, the
        last one the default layer: what a method's ``layer = "stages"`` sweeps (a model
        that declares none gets ``cams.hooks.stage_layer_names``).
    """

    default_layer: str
    gap_head: bool
    family: str = "cnn"
    version: int = 1
    source: str = ""
    stages: tuple[str, ...] = ()


class ModelRegistry(Registry[ModelInfo]):
    """The zoo, and models named by import path ("torchvision:densenet121",
    "my_package.models:build"), registered on first use (``benchmarks.models.external``)."""

    def _external(self, name: object) -> None:
        if isinstance(name, str) and ":" in name and name not in self._aliases:
            from cambench.benchmarks.models.external import resolve

            build, source = resolve(name)
            self.add(
                name, build, default_layer="auto", gap_head=False, family="external", source=source
            )

    def get(self, name: str) -> Entry[ModelInfo]:
        self._external(name)
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        self._external(name)
        return super().__contains__(name)


MODELS: ModelRegistry = ModelRegistry("model", ModelInfo)


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
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]
    return layers + ([nn.MaxPool2d(2)] if pool else [])


@MODELS.register(
    "gapcnn",
    aliases=("gap-cnn",),
    default_layer="features",
    gap_head=True,
    family="gap_cnn",
    stages=("features.2", "features.6", "features.10", "features"),  # each block's ReLU
)
def gapcnn(*, in_channels: int, num_classes: int, width: PositiveInt = 32) -> Classifier:
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


def _torchvision_classifier(features: nn.Module, head: nn.Module, in_channels: int) -> Classifier:
    return Classifier(Normalize(in_channels), features, head)


def _init_like_torchvision(net: nn.Module) -> None:
    """torchvision's initialization of its CNNs: He-normal convolutions (fan-out), BN at
    1 and 0, linear layers N(0, 0.01): the narrow variants start as the originals do."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@MODELS.register(
    "resnet18",
    default_layer="features.layer4",
    gap_head=True,
    family="resnet",
    version=2,
    stages=tuple(f"features.layer{i}" for i in range(1, 5)),
)
def resnet18(*, in_channels: int, num_classes: int, width: PositiveInt = 64) -> Classifier:
    """torchvision ResNet-18 for small inputs: 3x3 stride-2 stem, no max-pool, ``layer4`` at
    stride 1, so ``layer4`` keeps 1/8 of the input (8x8 at 64 px); GAP + linear head (CAM
    applies). Of the ways to reach 1/8, this one does the least work at full resolution:
    a training step costs 0.39x that of a stride-1 stem at 64 px on a 2-core CPU.

    width: channels of the stem and ``layer1`` (64 in ResNet-18; the stages double it). At
    16 the network has the same depth, blocks and skips with 1/16 of the multiply-adds
    (0.7 M parameters instead of 11.2 M): the size of the CIFAR ResNets, for 32 px inputs."""
    from torchvision.models import resnet18 as tv_resnet18
    from torchvision.models.resnet import BasicBlock

    net = tv_resnet18(weights=None, num_classes=num_classes)
    if width != 64:
        net.inplanes = width
        for i, stride in enumerate((1, 2, 2, 2), start=1):
            setattr(net, f"layer{i}", net._make_layer(BasicBlock, width << (i - 1), 2, stride))
        net.bn1 = nn.BatchNorm2d(width)
        net.fc = nn.Linear(8 * width, num_classes)
        _init_like_torchvision(net)
    net.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
    net.maxpool = nn.Identity()
    block = net.layer4[0]
    block.conv1.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    features = nn.Sequential()
    for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4"):
        features.add_module(name, getattr(net, name))
    return _torchvision_classifier(
        features, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc), in_channels
    )


class _DenseHead(nn.Module):
    """torchvision DenseNet's head as its ``forward`` applies it: in-place ReLU, GAP, linear."""

    def __init__(self, classifier: nn.Linear):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu(x, inplace=True)  # functional, as in torchvision
        return self.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@MODELS.register(
    "densenet121",
    default_layer="features",
    gap_head=True,
    family="densenet",
    version=2,
    stages=tuple(f"features.denseblock{i}" for i in range(1, 4)) + ("features",),
)
def densenet121(*, in_channels: int, num_classes: int, growth: PositiveInt = 32) -> Classifier:
    """torchvision DenseNet-121 for small inputs: 3x3 stride-2 stem, no first pool, no pool in
    the last transition (1/8 of the input at ``features``: 8x8 at 64 px; a training step
    costs 0.21x that of a stride-1 stem); the head keeps torchvision's functional in-place
    ReLU, so ``features`` is pre-ReLU (see cams.hooks).

    growth: the growth rate (32 in DenseNet-121; the stem has twice as many channels). At 8
    the network keeps its 121 layers and dense connections with 1024 / 4 = 256 channels at
    ``features`` (0.45 M parameters instead of 7.0 M)."""
    from torchvision.models import DenseNet

    net = DenseNet(growth, (6, 12, 24, 16), 2 * growth, num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(in_channels, 2 * growth, 3, stride=2, padding=1, bias=False)
    net.features.pool0 = nn.Identity()
    net.features.transition3.pool = nn.Identity()
    return _torchvision_classifier(net.features, _DenseHead(net.classifier), in_channels)


@MODELS.register(
    "vgg16_bn",
    default_layer="features",
    gap_head=False,
    family="vgg",
    # the ReLU before each of the three pools kept, the end of the fourth block, the last
    stages=("features.5", "features.12", "features.22", "features.32", "features"),
)
def vgg16_bn(
    *, in_channels: int, num_classes: int, hidden: PositiveInt = 512, width: PositiveInt = 64
) -> Classifier:
    """torchvision VGG-16-BN for small inputs: the last two max-pools dropped (1/8 of the input
    at ``features``), flatten + fully-connected head kept (CAM does not apply, as in the
    papers), hidden width ``hidden`` instead of 4096 and a 2x2 adaptive pool before it.

    width: channels of the first block (64 in VGG-16; the blocks double it up to 8 x width).
    At 16 the 13 convolutions keep their layout with 1/16 of the multiply-adds."""
    from torchvision.models import vgg16_bn as tv_vgg16_bn
    from torchvision.models.vgg import cfgs, make_layers

    if width == 64:
        layers = list(tv_vgg16_bn(weights=None).features)
    else:
        cfg = [c if c == "M" else c * width // 64 for c in cfgs["D"]]
        layers = list(make_layers(cfg, batch_norm=True))
        _init_like_torchvision(nn.Sequential(*layers))
    layers[0] = nn.Conv2d(in_channels, width, 3, padding=1)
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    features = nn.Sequential(*[m for i, m in enumerate(layers) if i not in pools[-2:]])
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width * 4, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )
    return _torchvision_classifier(features, head, in_channels)
