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

Transformer layers are read as maps in the same tap, so every method of the CAM family
works unchanged on vision transformers (``MapLayout``, ``read_map``). The method sees
(B, C, h, w) views of the layer's output:

- a token sequence (B, N, C) (timm ViT, DeiT and EVA blocks; the flattened maps inside
  Swin's blocks): the prefix tokens are dropped (class, distillation and register tokens:
  the model's own ``num_prefix_tokens``, timm's attribute, read, never guessed; 0 for a
  model without one) and the remaining h * w patch tokens are put back on their grid,
  row-major, the model's ``patch_embed.grid_size`` when it matches, else the square
  (h = w = sqrt(N - prefix)); a sequence of exactly h * w tokens (a patch embedding's
  output) has no prefix to drop.
  This is pytorch-grad-cam's documented ``reshape_transform`` for ViT
  (``tensor[:, 1:].reshape(B, 14, 14, C)`` moved to channels first), applied to the
  activation and its gradient alike. A 3-D output that is no such grid is an error naming
  the layer;
- a channels-last map (B, h, w, C), in a model that declares ``output_fmt = "NHWC"`` (timm
  1.0's Swin, whose stages, blocks and norms keep that layout), is permuted to channels
  first; the convolutions, batch norms and pools in such a model still produce (B, C, h, w).

The tap hands the rest of the model tokens rebuilt from its copy of the map, so the
gradient of the map is the gradient of the patch tokens; for a sequence with prefix tokens
that rebuilt sequence is a new tensor and ``point="consumed"`` gives the same map as
``"produced"`` (timm's blocks change no token in place).

``auto`` on a transformer (``auto_layer_name``): Swin's last map is a 4-D channels-last
tensor, so the rule for CNNs holds (the final ``norm``, the map its head pools). A ViT
classifies from its class token, so the patch tokens of its last layers (the last block's
output and MLP, the final ``norm``) do not reach the score: their gradient is exactly zero
and so is every gradient CAM there. Auto picks the last token layer of the model's width
(that of its last token layer) whose patch tokens do reach the output, found by one
forward and one backward: for timm's ViT ``blocks[-1].norm1``, the tokens the class token
reads through the last attention, pytorch-grad-cam's documented choice; for a ViT that
average-pools its patch tokens, ``blocks``, the map its head pools, as for a CNN.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.registry import close_matches

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


@dataclass(frozen=True)
class MapLayout:
    """How a model lays out its feature maps, read from the model (see the module docstring).

    tokens: the model declares a token sequence (``num_prefix_tokens``, timm's ViT family).
    prefix_tokens: tokens before the patch grid (class, distillation, register tokens).
    grid: the patch grid (h, w) of its patch embedding, when it says.
    channels_last: its 4-D maps are (B, h, w, C) (``output_fmt = "NHWC"``, timm's Swin).
    """

    tokens: bool = False
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    channels_last: bool = False


# Modules that produce (B, C, h, w) even inside a channels-last model (Swin's patch embedding).
_NCHW_MODULES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


def _declared(model: nn.Module, attr: str) -> object:
    """The attribute on the outermost module that declares it (a wrapper of a timm model)."""
    for module in model.modules():
        if hasattr(module, attr):
            return getattr(module, attr)
    return None


def map_layout(model: nn.Module) -> MapLayout:
    """The ``MapLayout`` of ``model``, from its timm attributes (none: plain NCHW maps)."""
    prefix = _declared(model, "num_prefix_tokens")
    fmt = _declared(model, "output_fmt")
    grid = getattr(_declared(model, "patch_embed"), "grid_size", None)
    return MapLayout(
        tokens=isinstance(prefix, int),
        prefix_tokens=prefix if isinstance(prefix, int) else 0,
        grid=tuple(int(g) for g in grid) if grid is not None and len(grid) == 2 else None,
        channels_last=getattr(fmt, "value", fmt) == "NHWC",
    )


def token_grid(n_tokens: int, layout: MapLayout) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, (h, w)) of a sequence of ``n_tokens`` under ``layout``, or None."""
    for prefix in dict.fromkeys((layout.prefix_tokens, 0)):
        n = n_tokens - prefix
        if n <= 0:
            continue
        if layout.grid is not None and n == layout.grid[0] * layout.grid[1]:
            return prefix, layout.grid
        side = math.isqrt(n)
        if side * side == n:
            return prefix, (side, side)
    return None


def read_map(
    output: torch.Tensor, layout: MapLayout, module: nn.Module, name: str
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """A (B, C, h, w) view of a token sequence or channels-last output, and the function that
    turns such a map back into the output's own layout; None for an output taken as it is
    (a (B, C, h, w) map, or anything else, which the methods refuse)."""
    if output.dim() == 4 and layout.channels_last and not isinstance(module, _NCHW_MODULES):
        return output.permute(0, 3, 1, 2), lambda m: m.permute(0, 2, 3, 1)
    if output.dim() != 3:
        return None
    found = token_grid(output.shape[1], layout)
    if found is None:
        raise UserError(
            f"target layer {name!r} returns {tuple(output.shape)}: read as tokens (B, N, C), "
            f"{output.shape[1]} tokens less {layout.prefix_tokens} prefix token(s) are no "
            "square patch grid; pick a layer whose output is a (B, C, h, w) map or a (B, N, C) "
            "token sequence of the image's patches (for a model with class tokens that is not "
            "timm's, set model.num_prefix_tokens)"
        )
    prefix, (h, w) = found

    def rebuild(m: torch.Tensor) -> torch.Tensor:
        tokens = m.permute(0, 2, 3, 1).flatten(1, 2)
        return torch.cat([output[:, :prefix], tokens], dim=1) if prefix else tokens

    return output[:, prefix:].unflatten(1, (h, w)).permute(0, 3, 1, 2), rebuild


class LayerTap:
    """Forward hook that captures a layer's output; see the module docstring for which one,
    and for how a token sequence or a channels-last output is read as a (B, K, h, w) map."""

    def __init__(
        self,
        point: CapturePoint = "produced",
        layout: MapLayout | None = None,
        name: str | None = None,
    ):
        if point not in ("produced", "consumed"):
            raise ValueError(f"capture point must be 'produced' or 'consumed', got {point!r}")
        self.point = point
        self.layout = layout or MapLayout()
        self.name = name
        self._produced: torch.Tensor | None = None
        self._consumed: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise UserError(
                f"target layer {type(module).__name__} returns {type(output).__name__}, not a tensor; "
                "pick a layer whose output is a (B, K, h, w) feature map"
            )
        reading = read_map(output, self.layout, module, self.name or type(module).__name__)
        if reading is None:
            self._produced = output
            self._consumed = output.clone()
            return self._consumed
        view, rebuild = reading
        self._produced = view
        self._consumed = view.clone()
        return rebuild(self._consumed)

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
    name = next((n for n, m in model.named_modules() if m is layer), None)
    tap = LayerTap(point, map_layout(model), name)
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
    (4-D, more than one position; channels-last in a model that says so), not counting
    pooling, flatten, identity or dropout.

    Containers complete after their children, so for torchvision's ResNet this is ``layer4``,
    for DenseNet and VGG ``features``, for timm's Swin ``norm``. In a model that declares a
    token sequence (timm's ViT family), or whose last maps are token sequences, it is the
    layer ``token_layer_name`` picks (the module docstring says which). The answer is cached
    per model and input shape.
    """
    key = tuple(x.shape[1:])
    cached = _AUTO_CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    layout = map_layout(model)
    names = {m: n for n, m in model.named_modules()}
    finished: list[str] = []
    tokens: list[str] = []

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if (
            not isinstance(output, torch.Tensor)
            or module is model
            or isinstance(module, _POOLS)
            or output.shape[0] != 1  # a window or head batch inside attention, not the image's
        ):
            return
        if output.dim() == 3 and token_grid(output.shape[1], layout) is not None:
            tokens.append(names[module])
            return
        if output.dim() != 4 or layout.tokens:  # a ViT's 4-D tensors are attention's, no maps
            return
        if layout.channels_last and not isinstance(module, _NCHW_MODULES):
            positions = output.shape[1] * output.shape[2]
        else:
            positions = output.shape[-1] * output.shape[-2]
        if positions > 1:
            finished.append(names[module])
            tokens.clear()  # a later map: the tokens before it are not the last maps

    with model_guard(model) as handles:
        for module in names:
            handles.append(module.register_forward_hook(record))
        # model_guard's eval mode: no BatchNorm statistics update, one image is a valid batch
        with torch.inference_mode():
            model(x[:1])
    if tokens:
        cached[key] = token_layer_name(model, x, tokens, layout)
        return cached[key]
    if not finished:
        raise UserError(
            f"found no layer with a spatial (B, K, h, w) output in {type(model).__name__}; "
            "pass layer= explicitly"
        )
    cached[key] = finished[-1]
    return finished[-1]


def token_layer_name(
    model: nn.Module, x: torch.Tensor, candidates: list[str], layout: MapLayout
) -> str:
    """Of the layers ``candidates`` whose outputs are token sequences (in order of
    completion), the last one of the width of the last candidate (the model's width: a
    block's ``qkv`` or MLP hidden layer is wider) whose patch tokens reach the output, that
    is, where the gradient of a fixed random projection of the output is not zero; else the
    last one whose patch tokens reach it; else the last one. One forward and one backward."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    with model_guard(model) as handles, torch.inference_mode(False), torch.enable_grad():
        for name in dict.fromkeys(candidates):
            handles.append(
                modules[name].register_forward_hook(
                    lambda m, i, o, name=name: outputs.__setitem__(name, o)
                )
            )
        out = model(x[:1].clone().requires_grad_(True))
        direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        names = [n for n in candidates if n in outputs and outputs[n].requires_grad]
        grads = torch.autograd.grad(
            (out * direction.to(out)).sum(), [outputs[n] for n in names], allow_unused=True
        )
    reached = []
    for name, grad in zip(names, grads, strict=True):
        found = token_grid(outputs[name].shape[1], layout)
        if grad is not None and found is not None and bool(grad[:, found[0] :].ne(0).any()):
            reached.append(name)
    width = outputs[candidates[-1]].shape[-1] if candidates[-1] in outputs else None
    wide = [n for n in reached if outputs[n].shape[-1] == width]
    return (wide or reached or candidates)[-1]


def stage_layer_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The outputs of a network's stages, shallow to deep, for a layer sweep of a model that
    does not declare them (the zoo's do: ``ModelInfo.stages``), ending at ``auto``'s layer.

    A CNN: for each spatial size its maps take, in order, the last module (outermost of
    those returning one tensor) whose output is a map of that size, as ``auto_layer_name``
    counts maps (pools left out); a stride-1 stage that keeps its predecessor's size
    (ResNet's dilated ``layer4``) is one stage with it. A transformer, whose maps keep one
    size: the ``auto`` layer at every index of its block sequence (``blocks.0.norm1`` to
    ``blocks.11.norm1`` for a ViT)."""
    last = auto_layer_name(model, x)
    modules = dict(model.named_modules())
    parts = last.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    layout = map_layout(model)
    if layout.tokens and numeric:
        k = numeric[-1]
        found = []
        for index in range(len(modules[".".join(parts[:k])])):
            name = ".".join([*parts[:k], str(index), *parts[k + 1 :]])
            if name in modules:
                found.append(name)
        return found or [last]
    names = {m: n for n, m in modules.items()}
    by_size: dict[tuple[int, int], str] = {}

    def record(module: nn.Module, inputs: object, output: object) -> None:
        if (
            isinstance(output, torch.Tensor)
            and output.dim() == 4
            and module is not model
            and not isinstance(module, _POOLS)
            and output.shape[-1] * output.shape[-2] > 1
        ):
            size = tuple(output.shape[1:3] if layout.channels_last else output.shape[-2:])
            by_size.pop(size, None)  # re-inserted: the order is that of the last map per size
            by_size[size] = names[module]

    with model_guard(model) as handles:
        for module in names:
            handles.append(module.register_forward_hook(record))
        with torch.inference_mode():
            model(x[:1])
    stages = [n for n in by_size.values() if n != last]
    return [*stages, last]


def map_sizes(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, list[int]]:
    """The (h, w) of the map each named layer gives for one image of ``x``, read as the
    methods read it (tokens on their grid, channels-last permuted): a layer sweep's map
    resolutions, for its reports. One forward."""
    modules = dict(model.named_modules())
    layout = map_layout(model)
    sizes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                reading = read_map(output, layout, module, name)
                shape = (reading[0] if reading else output).shape
                sizes[name] = [int(shape[-2]), int(shape[-1])] if len(shape) == 4 else []

        return hook

    with model_guard(model) as handles:
        for name in dict.fromkeys(names):
            if name in modules:
                handles.append(modules[name].register_forward_hook(record(name)))
        with torch.inference_mode():
            model(x[:1])
    return sizes
