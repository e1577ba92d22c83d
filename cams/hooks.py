"""Hooks, layer capture and target-layer resolution, in one place whose ``finally`` undoes
everything a method does to a model. ``model_guard`` also fixes the mode a model is explained
in: eval, whatever mode it came in, with every module's own flag restored afterwards.

What "the layer's activation" means is pinned here. ``LayerTap`` captures the layer's
output *as the layer produced it*: the forward hook keeps the layer's own output tensor and
hands a copy downstream, so an in-place change made later by the model's forward (for
example torchvision DenseNet's ``F.relu(features, inplace=True)`` on ``features.norm5``'s
output) touches the copy, not what we captured. The gradient is taken with respect to that
captured tensor, so both are pre-activation for DenseNet's ``features`` (captum's
semantics). ``point="consumed"`` instead captures the copy after the forward has finished,
as the rest of the model consumed it (post-ReLU for DenseNet; torchcam's semantics), with
its gradient. For a model whose next non-linearity is a module, naming that module as the
layer gives the same post-activation choice.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from benchmarks.core.errors import UserError
from benchmarks.core.registry import close_matches

CapturePoint = Literal["produced", "consumed"]

_POOLS = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)
_AUTO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Run the body with ``model`` in eval mode and yield a list to put hook handles in; on
    exit remove them and restore every module's ``training`` flag and every parameter's
    ``requires_grad``, also when the body raises.

    Explanations are always computed in eval mode, whatever mode the model arrives in:
    BatchNorm normalizes with its running statistics (and does not update them, so the
    explanation leaves every buffer as it came) and dropout is off (so the maps are
    deterministic and the global RNG is not drawn from). A model with mixed modes (a dropout
    left in training mode inside an eval model, say) is explained fully in eval mode and handed
    back with each module's own flag. Guards nest: an inner one restores what it found, which is
    eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        model.eval()
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


class LayerTap:
    """Forward hook that captures a layer's output; see the module docstring for which one."""

    def __init__(self, point: CapturePoint = "produced"):
        if point not in ("produced", "consumed"):
            raise ValueError(f"capture point must be 'produced' or 'consumed', got {point!r}")
        self.point = point
        self._produced: torch.Tensor | None = None
        self._consumed: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise UserError(
                f"target layer {type(module).__name__} returns {type(output).__name__}, not a tensor; "
                "pick a layer whose output is a (B, K, h, w) feature map"
            )
        self._produced = output
        self._consumed = output.clone()
        return self._consumed

    @property
    def activation(self) -> torch.Tensor:
        """The captured activation (B, K, h, w); differentiate the score with respect to it."""
        tensor = self._produced if self.point == "produced" else self._consumed
        if tensor is None:
            raise RuntimeError("the target layer did not run in the forward pass")
        return tensor


def attach_tap(
    model: nn.Module, layer: nn.Module, handles: list, point: CapturePoint = "produced"
) -> LayerTap:
    """Register a ``LayerTap`` on ``layer``; its handle goes in ``handles`` (from ``model_guard``)."""
    tap = LayerTap(point)
    handles.append(layer.register_forward_hook(tap))
    return tap


def resolve_layer(model: nn.Module, layer: nn.Module | str | None, x: torch.Tensor) -> nn.Module:
    """The target layer: a module of ``model``, a dotted name, or ``None``/"auto"."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise UserError(
                "target layer module is not part of the model; pass one of model.modules()"
            )
        return layer
    if layer is None or layer == "auto":
        return dict(model.named_modules())[auto_layer_name(model, x)]
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            hint = close_matches(layer, [n for n in modules if n])
            raise UserError(
                f"Unknown layer {layer!r} in {type(model).__name__}."
                + (f" Did you mean: {', '.join(hint)}?" if hint else "")
                + " Use 'auto' or a name from model.named_modules()."
            )
        return modules[layer]
    raise TypeError(f"layer must be a module, a name or 'auto'; got {type(layer).__name__}")


def auto_layer_name(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module, in order of completion, whose output is a spatial feature map
    (4-D, more than one position), not counting pooling, flatten, identity or dropout.

    Containers complete after their children, so for torchvision's ResNet this is ``layer4``,
    for DenseNet and VGG ``features``. The answer is cached per model and input shape.
    """
    key = tuple(x.shape[1:])
    cached = _AUTO_CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    names = {m: n for n, m in model.named_modules()}
    finished: list[str] = []

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if (
            isinstance(output, torch.Tensor)
            and output.dim() == 4
            and output.shape[-1] * output.shape[-2] > 1
            and module is not model
            and not isinstance(module, _POOLS)
        ):
            finished.append(names[module])

    with model_guard(model) as handles:
        for module in names:
            handles.append(module.register_forward_hook(record))
        # model_guard's eval mode: no BatchNorm statistics update, one image is a valid batch
        with torch.inference_mode():
            model(x[:1])
    if not finished:
        raise UserError(
            f"found no layer with a spatial (B, K, h, w) output in {type(model).__name__}; "
            "pass layer= explicitly"
        )
    cached[key] = finished[-1]
    return finished[-1]
