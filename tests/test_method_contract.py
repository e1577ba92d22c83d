"""The method contract, generated from the registry, so every method is covered the day it
is registered (timm ``tests/test_models.py``; captum ``tests/attr/test_hook_removal.py``).

For every entry of ``cams.METHODS``, called with its default options on a small GAP CNN:

- it returns finite float32 (B, H, W) maps at input size for a batch of 4, on a 1-channel
  and a 3-channel model;
- a batch gives the maps of its images explained one at a time;
- ``target=None`` gives the maps of the predicted class passed explicitly;
- a bad ``x`` or ``target`` (not a float 4-D tensor, not integer class indices, the wrong
  length) raises a TypeError or ValueError naming the argument;
- the call runs in eval mode, whatever mode the model comes in, and leaves every module's
  ``training`` flag as it came: a model in train mode (BatchNorm with running statistics, a
  dropout with p > 0) gives the maps of the same model in eval mode, and comes back in train
  mode with every parameter and buffer bit-identical;
- the model leaves a normal call, a call with an out-of-range class (which must raise a
  ValueError naming it), and a call whose target layer raises, as it came: no module or
  global hook left, the same ``training`` and ``requires_grad`` flags, the same parameters
  and buffers, no ``.grad`` accumulated, and the global RNG state untouched.

A method that cannot apply to the model raises ``NotApplicable`` and is skipped.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from model_hygiene import SmallGapCNN, changes, snapshot
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable
from cambench.cams import METHODS, Explanation
from cambench.cams.hooks import auto_layer_name

pytestmark = pytest.mark.methods

NAMES = METHODS.names()
N_CLASSES = 3
SIZE = 32
TARGET = torch.tensor([0, 1, 2, 0])
BAD_CLASS = 7


def make_model(in_channels: int) -> SmallGapCNN:
    torch.manual_seed(0)
    model = SmallGapCNN(in_channels, N_CLASSES).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.features[0].requires_grad_(False)
    model.drop.train()
    return model


def make_input(in_channels: int) -> torch.Tensor:
    return torch.rand(
        4, in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(in_channels)
    )


def explain(name: str, model: nn.Module, x: torch.Tensor, target) -> Explanation:
    return METHODS.get(name).obj(model, x, target)


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class the model predicts for each image, in eval mode; the model is left as it came."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    for m, mode in modes.items():
        m.training = mode
    return classes


def runs_model(name: str) -> bool:
    """Baselines that cost no pass never run the model (so cannot see its classes or layers)."""
    return METHODS.get(name).info.cost.strip() != "0"


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_maps_are_finite_float32_at_input_size(name, in_channels):
    model, x = make_model(in_channels), make_input(in_channels)
    try:
        out = explain(name, model, x, TARGET)
    except NotApplicable as exc:
        pytest.skip(f"{name} not applicable: {exc}")
    assert isinstance(out, Explanation)
    assert out.maps.dtype == torch.float32
    assert tuple(out.maps.shape) == (4, SIZE, SIZE)
    assert bool(torch.isfinite(out.maps).all())
    if out.layer_maps is not None:
        assert out.layer_maps.dim() == 3 and out.layer_maps.shape[0] == 4
        assert bool(torch.isfinite(out.layer_maps).all())


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(name):
    """Explaining a batch of 4 gives each image's map explained alone (to 1e-5 of its scale)."""
    model, x = make_model(3), make_input(3)
    try:
        batched = explain(name, model, x, TARGET).maps
    except NotApplicable as exc:
        pytest.skip(f"{name} not applicable: {exc}")
    single = torch.cat(
        [explain(name, model, x[i : i + 1], TARGET[i : i + 1]).maps for i in range(4)]
    )
    scale = max(float(single.abs().max()), 1e-12)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_target_none_explains_the_predicted_class(name):
    """``None`` means the predicted class (captum and pytorch-grad-cam read it so)."""
    model = make_model(3)
    # Scaled copies, so the four images are not all predicted as the same class.
    x = make_input(3) * torch.tensor([1.0, -1.0, 3.0, -3.0])[:, None, None, None]
    classes = predicted(model, x)
    assert len(set(classes.tolist())) > 1, "the check needs images predicted as different classes"
    try:
        explicit = explain(name, model, x, classes).maps
    except NotApplicable as exc:
        pytest.skip(f"{name} not applicable: {exc}")
    torch.testing.assert_close(explain(name, model, x, None).maps, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_errors_naming_the_argument(name):
    model, x = make_model(3), make_input(3)
    cases = [
        ((x * 255).to(torch.uint8), TARGET, TypeError, "x must be a floating-point tensor"),
        (x[0], TARGET[:1], ValueError, "x must be a float tensor"),
        (x, TARGET.float(), TypeError, "target must hold integer class indices"),
        (x, TARGET[:3], ValueError, "target must have one class index per image"),
        (x, TARGET[:, None], ValueError, "target must be an int or a 1-D sequence"),
        (x, "cat", TypeError, "target must"),
    ]
    for bad_x, bad_target, error, message in cases:
        with pytest.raises(error, match=message):
            explain(name, model, bad_x, bad_target)


def train_mode_model() -> SmallGapCNN:
    """The contract model in train mode throughout, with a dropout that drops (p = 0.5): run
    in train mode, BatchNorm would normalize with batch statistics and update its running
    statistics, and the dropout would change the maps and draw from the global RNG."""
    model = make_model(3)
    model.drop.p = 0.5
    return model.train()


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_model_is_explained_in_eval_mode_and_handed_back(name):
    model, x = train_mode_model(), make_input(3)
    reference = train_mode_model().eval()
    before = snapshot(model)
    try:
        maps = explain(name, model, x, TARGET).maps
    except NotApplicable as exc:
        assert_as_it_came(model, before, "after a NotApplicable call in train mode")
        pytest.skip(f"{name} not applicable: {exc}")
    assert_as_it_came(model, before, "after a call in train mode")
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(maps, explain(name, reference, x, TARGET).maps, rtol=0, atol=0)


# --- model hygiene ------------------------------------------------------------------------


def assert_as_it_came(model: nn.Module, before: dict, when: str) -> None:
    found = changes(model, before)
    assert not found, f"{when}: {'; '.join(found)}"


@contextlib.contextmanager
def raising_layer(layer: nn.Module):
    """The target layer raises in its forward; the hook is removed after the call."""

    def boom(module, inputs, output):
        raise RuntimeError("target layer failed on purpose")

    handle = layer.register_forward_hook(boom)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_model_left_as_it_came(name):
    model, x = make_model(3), make_input(3)
    layer = dict(model.named_modules())[auto_layer_name(model, x)]
    before = snapshot(model)

    applicable = True
    try:
        explain(name, model, x, TARGET)
    except NotApplicable:
        applicable = False
    assert_as_it_came(model, before, "after a normal call")

    bad = TARGET.clone()
    bad[2] = BAD_CLASS
    if runs_model(name):
        expected = ValueError if applicable else (ValueError, NotApplicable)
        with pytest.raises(expected) as info:
            explain(name, model, x, bad)
        if info.type is not NotApplicable:
            assert str(BAD_CLASS) in str(info.value), (
                f"the error does not name class {BAD_CLASS}: {info.value}"
            )
    else:
        # It never runs the model, so it cannot know the number of classes; it must not fail.
        explain(name, model, x, bad)
    assert_as_it_came(model, before, "after a bad target")

    with raising_layer(layer):
        if runs_model(name):
            with pytest.raises((RuntimeError, NotApplicable)):
                explain(name, model, x, TARGET)
        else:
            explain(name, model, x, TARGET)
    assert_as_it_came(model, before, "after a raising layer")
