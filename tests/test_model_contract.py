"""The model contract, generated from the registry, so every architecture is covered the day
it is registered (timm ``tests/test_models.py``).

For every entry of ``benchmarks.models.zoo.MODELS``, built with random weights for 1 and 3
input channels and 2 classes, at 32 px (every zoo model keeps at least 1/8 of its input at
its default layer) and a batch of 2:

- the forward gives finite (B, 2) logits;
- ``info.default_layer`` names a module, whose output on a forward is a spatial map
  (B, C, h, w) with h, w >= 1;
- Grad-CAM at that layer gives finite float (B, H, W) maps at input size;
- ``info.gap_head`` is True exactly when CAM applies: CAM gives finite maps at input size
  on a GAP head and raises ``NotApplicable`` otherwise.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable
from cambench.benchmarks.models.zoo import MODELS, build_model
from cambench.cams import METHODS

pytestmark = pytest.mark.harness

NAMES = MODELS.names()
SIZE = 32
BATCH = 2
N_CLASSES = 2
TARGET = torch.tensor([0, 1])


@functools.cache
def model_for(name: str, in_channels: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build_model(name, in_channels=in_channels, num_classes=N_CLASSES).eval()


def make_input(in_channels: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(in_channels)
    return torch.rand(BATCH, in_channels, SIZE, SIZE, generator=gen)


def assert_maps(maps: torch.Tensor, what: str) -> None:
    assert maps.dtype.is_floating_point, f"{what}: dtype {maps.dtype}"
    assert tuple(maps.shape) == (BATCH, SIZE, SIZE), f"{what}: shape {tuple(maps.shape)}"
    assert bool(torch.isfinite(maps).all()), f"{what}: maps not finite"


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_default_layer_gives_a_spatial_map(name, in_channels):
    model, x = model_for(name, in_channels), make_input(in_channels)
    layer_name = MODELS.get(name).info.default_layer
    modules = dict(model.named_modules())
    assert layer_name in modules, f"{name}: default layer {layer_name!r} is not a module"
    seen: list[torch.Tensor] = []
    handle = modules[layer_name].register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        handle.remove()
    assert tuple(logits.shape) == (BATCH, N_CLASSES), f"{name}: logits {tuple(logits.shape)}"
    assert bool(torch.isfinite(logits).all()), f"{name}: logits not finite"
    assert len(seen) == 1, f"{name}: {layer_name!r} ran {len(seen)} times in one forward"
    out = seen[0]
    assert isinstance(out, torch.Tensor) and out.dim() == 4, (
        f"{name}: {layer_name!r} gives {type(out).__name__} {getattr(out, 'shape', '')}"
    )
    b, c, h, w = out.shape
    assert b == BATCH and c >= 1 and h >= 1 and w >= 1, f"{name}: {layer_name!r} {tuple(out.shape)}"


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_gradcam_at_default_layer(name, in_channels):
    model, x = model_for(name, in_channels), make_input(in_channels)
    layer = MODELS.get(name).info.default_layer
    out = METHODS.get("gradcam").obj(model, x, TARGET, layer=layer)
    assert_maps(out.maps, f"{name} Grad-CAM at {layer!r}")


@pytest.mark.parametrize("name", NAMES)
def test_gap_head_iff_cam_applies(name):
    info = MODELS.get(name).info
    model, x = model_for(name, 3), make_input(3)
    cam = METHODS.get("cam").obj
    if info.gap_head:
        assert_maps(cam(model, x, TARGET, layer=info.default_layer).maps, f"{name} CAM")
    else:
        with pytest.raises(NotApplicable):
            cam(model, x, TARGET, layer=info.default_layer)


NARROW = {"resnet18": {"width": 16}, "densenet121": {"growth": 8}, "vgg16_bn": {"width": 16}}


@pytest.mark.parametrize("name", sorted(NARROW))
def test_narrow_variant_is_the_same_network_at_a_quarter_of_the_channels(name):
    """``width`` / ``growth`` at a quarter of torchvision's value keep every layer, block and
    connection of the architecture: the same modules in the same order, each convolution
    with a quarter of the default's output channels (the first one's input excepted), and
    the same map size at the default layer; CAM still applies exactly where it did."""
    wide = build_model(name, in_channels=1, num_classes=2)
    narrow = build_model(name, in_channels=1, num_classes=2, **NARROW[name])
    kinds = [(n, type(m).__name__) for n, m in wide.named_modules()]
    assert kinds == [(n, type(m).__name__) for n, m in narrow.named_modules()]
    convs = [
        (a, b)
        for a, b in zip(wide.modules(), narrow.modules(), strict=True)
        if isinstance(a, nn.Conv2d)
    ]
    assert len(convs) >= 13
    for a, b in convs:
        assert b.out_channels * 4 == a.out_channels
        assert b.kernel_size == a.kernel_size and b.stride == a.stride
    layer = MODELS.get(name).info.default_layer
    x = torch.rand(2, 1, SIZE, SIZE)
    shapes = []
    for model in (wide, narrow):
        seen = {}

        def hook(module, inputs, output, seen=seen):
            seen["out"] = output.shape  # returns None: the output stays as it is

        handle = model.get_submodule(layer).register_forward_hook(hook)
        model.eval()(x)
        handle.remove()
        shapes.append(seen["out"])
    assert shapes[0][2:] == shapes[1][2:] and shapes[0][1] == 4 * shapes[1][1]
    params = [sum(p.numel() for p in m.parameters()) for m in (wide, narrow)]
    assert params[1] < params[0] / 8
