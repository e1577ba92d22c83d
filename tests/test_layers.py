"""Target-layer resolution (cams/hooks.py): ``auto``, by name, by module, and the errors.

The oracle for ``auto`` is the architecture: in each torchvision classifier below, the
named module's output is the last spatial feature map, which the head then pools and
classifies (checked by reading torchvision's ``forward``: ``features`` or ``layer4``, then
pooling and the classifier). Random init, 64x64 inputs, nothing downloaded.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.cams import METHODS
from cambench.cams.hooks import auto_layer_name, resolve_layer

pytestmark = pytest.mark.methods

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@functools.cache
def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


AUTO_CASES = [
    ("resnet18", "layer4"),  # layer4 -> avgpool -> fc
    ("densenet121", "features"),  # features (ends in norm5) -> F.relu -> pool -> classifier
    pytest.param("vgg16_bn", "features", marks=pytest.mark.slow),  # 138M weights: ~4 s to build
    ("mobilenet_v3_small", "features"),  # features -> avgpool -> classifier
    ("efficientnet_b0", "features"),  # features -> avgpool -> classifier
    # features -> avgpool -> classifier = (LayerNorm2d on a 1x1 map, Flatten, Linear): the
    # LayerNorm2d output is 4-D but has one position, so it is not a spatial map.
    ("convnext_tiny", "features"),
]


@pytest.mark.parametrize(("arch", "expected"), AUTO_CASES)
def test_auto_layer_on_torchvision_classifiers(arch, expected):
    model = build(arch)
    assert auto_layer_name(model, X64) == expected
    layer = resolve_layer(model, "auto", X64)
    assert layer is dict(model.named_modules())[expected]
    assert resolve_layer(model, None, X64) is layer
    # The method uses that layer: its layer map has the layer's spatial size.
    with torch.no_grad():
        seen = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
        model(X64)
        handle.remove()
    out = METHODS.get("gradcam").obj(model, X64, torch.tensor([0, 1]))
    assert tuple(out.layer_maps.shape[-2:]) == seen[0]


def test_auto_layer_depends_on_input_size():
    """At 32x32 ResNet18's layer4 is 1x1 (no spatial map); the answer is cached per shape."""
    model = build("resnet18")
    small = torch.randn(1, 3, 32, 32)
    assert auto_layer_name(model, small) == "layer3"
    assert auto_layer_name(model, X64) == "layer4"
    assert auto_layer_name(model, small) == "layer3"


def test_auto_layer_skips_pooling_and_flatten():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # a pool is never the target, even when it is the last spatial output
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    ).eval()
    assert auto_layer_name(net, torch.randn(1, 1, 8, 8)) == "1"


def test_auto_layer_leaves_no_trace():
    """The forward that finds the layer leaves no hook and, on a model in training mode,
    neither updates BatchNorm running statistics nor changes the mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert auto_layer_name(model, torch.randn(2, 3, 48, 48)) == "layer4"
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"auto layer search changed model state: {changed[:4]}"


def test_auto_layer_on_model_in_training_mode():
    """The search forwards one image; in training mode BatchNorm refuses a single value per
    channel (ResNet18's layer4 BN at 32x32). Finding shapes must not depend on the mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).train()
    assert auto_layer_name(model, torch.randn(4, 3, 32, 32)) == "layer3"
    assert all(m.training for m in model.modules())


def test_layer_by_name_and_by_module_agree():
    model = build("resnet18")
    assert resolve_layer(model, "layer3", X64) is model.layer3
    assert resolve_layer(model, "layer4.1.conv2", X64) is model.layer4[1].conv2
    assert resolve_layer(model, model.layer3, X64) is model.layer3
    gradcam = METHODS.get("gradcam").obj
    by_name = gradcam(model, X64, torch.tensor([3, 4]), layer="layer3")
    by_module = gradcam(model, X64, torch.tensor([3, 4]), layer=model.layer3)
    assert by_name.layer_maps.shape == (2, 4, 4)  # 64 / 16
    assert torch.equal(by_name.maps, by_module.maps)


@pytest.mark.parametrize(
    ("arch", "typo", "suggestion"),
    [
        ("resnet18", "layr4", "layer4"),
        ("resnet18", "layer4.1.conv3", "layer4.1.conv2"),
        ("densenet121", "features.denseblock5", "features.denseblock4"),
    ],
)
def test_unknown_layer_name_lists_close_matches(arch, typo, suggestion):
    model = build(arch)
    with pytest.raises(UserError) as info:
        resolve_layer(model, typo, X64)
    message = str(info.value)
    assert typo in message and "Did you mean" in message and suggestion in message, message
    # The same error reaches the user through a method call, as a ValueError.
    with pytest.raises(ValueError, match="Did you mean"):
        METHODS.get("gradcam").obj(model, X64, torch.tensor([0, 1]), layer=typo)


def test_module_not_in_model_raises():
    model = build("resnet18")
    twin = torchvision.models.resnet18(weights=None)  # same architecture, other instance
    for stranger in (nn.Conv2d(3, 3, 1), twin.layer4):
        with pytest.raises(UserError, match="not part of the model"):
            resolve_layer(model, stranger, X64)


def test_layer_of_wrong_type_raises():
    with pytest.raises(TypeError, match="layer must be"):
        resolve_layer(build("resnet18"), 4, X64)
