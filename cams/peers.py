"""Third-party implementations, registered as methods of their own: ``<method>@<library>``.

Each peer calls one library as its documentation says, with its defaults, so the harness can
measure where the libraries disagree with our ``gradcam``, ``gradcampp``, ``guided_backprop``
and ``occlusion`` (``benchmarks/reports/conformance.py`` pairs ``X@lib`` with ``X``). What
each library does differently from ours is in the peer's docstring; the findings below were
read in the sources of captum 0.9, grad-cam (pytorch-grad-cam) 1.5.7, torchcam 0.5.0 and
MONAI 1.6.1 and are pinned by ``tests/test_peers.py``.

What every peer shares with our methods, and what it adds to the library call:

- The signature (``model, x, target, *, layer=None, **options``), ``resolve_target`` for
  ``target`` (``None`` is the predicted class), ``resolve_layer`` for ``layer`` (``auto``
  is ours, not the library's own guess), and ``Explanation`` maps (B, H, W) float32 at the
  input size, higher meaning more relevant, on ``x``'s device.
- The libraries are imported inside the call: one that is missing raises ``NotApplicable``
  naming ``pip install -e ".[peers]"`` and the package, never an ImportError at import of
  ``cambench.cams``.
- The model is handed back as it came (``_library_call``): ``model_guard`` (eval mode, every
  flag and hook restored); the parameters frozen for the call, so a library's
  ``loss.backward()`` (pytorch-grad-cam, MONAI) accumulates no ``.grad`` (the gradient flows
  to the input, which is made to require it, so every layer's output still does); ``.grad``
  put back as it came (both also call ``model.zero_grad()``, which drops it); the target's
  class range checked on the model's output by a forward hook, so a bad class is a
  ValueError naming it, whatever the library would do with it (pytorch-grad-cam's context
  manager swallows IndexError); the library's cleanup called (pytorch-grad-cam
  ``activations_and_grads.release()``, torchcam ``remove_hooks()``); what has none undone by
  hand (MONAI's hooks, which it never removes, and the ``inplace`` flag it clears;
  pytorch-grad-cam's guided backprop, which swaps the model's ``nn.ReLU`` modules and puts
  back fresh ones).
- Token layers (timm ViT) and channels-last maps (timm Swin) are read as (B, C, h, w) maps
  the way ``cams.hooks`` reads them (``read_map``): given to pytorch-grad-cam and torchcam
  as their documented ``reshape_transform``; captum and MONAI have none, so the map passes
  through an identity module (``MapView``) that is given to them as the layer.
"""

from __future__ import annotations

import contextlib
import importlib
import typing
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Annotated, Literal

import numpy as np
import torch
from torch import nn

from cambench.benchmarks.core.checks import PositiveInt, Range, fits_image
from cambench.benchmarks.core.errors import NotApplicable, UserError
from cambench.cams.base import METHODS, Explanation, check_target_range, resolve_target, upsample
from cambench.cams.hooks import map_layout, model_guard, read_map, resolve_layer
from cambench.cams.occlusion import COST as OCCLUSION_COST
from cambench.cams.occlusion import geometry, geometry_fits, pair
from cambench.cams.pixel import reduce_abs_max

INSTALL = 'pip install -e ".[peers]"'

# Warnings the libraries raise on every call, about themselves: not the user's to act on.
_LIBRARY_WARNINGS = (
    "Setting backward hooks on ReLU activations",  # captum's guided backprop, each call
    "Using a non-tuple sequence for multidimensional indexing",  # MONAI's occlusion
)


def require(module: str, package: str) -> ModuleType:
    """Import ``module`` of the distribution ``package``; ``NotApplicable`` if it is missing.

    >>> require("no_such_library_xyz", "no-such-library")
    Traceback (most recent call last):
    ...
    cambench.benchmarks.core.errors.NotApplicable: no-such-library is not installed (no module no_such_library_xyz): pip install -e ".[peers]" (or pip install no-such-library)
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotApplicable(
            f"{package} is not installed (no module {module}): {INSTALL} (or pip install {package})"
        ) from exc


def _target_check(target: torch.Tensor) -> Callable:
    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 2:
            check_target_range(target, output.shape[1])

    return hook


@contextlib.contextmanager
def _library_call(model: nn.Module, target: torch.Tensor) -> Iterator[list]:
    """What every peer's library call runs in (the module docstring says why): model_guard,
    parameters frozen, ``.grad`` restored, the target range checked on the model's output,
    the libraries' own per-call warnings silenced. Yields model_guard's list of handles."""
    grads = [(p, p.grad) for p in model.parameters()]
    with model_guard(model) as handles, warnings.catch_warnings():
        for message in _LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        model.requires_grad_(False)
        handles.append(model.register_forward_hook(_target_check(target)))
        try:
            yield handles
        finally:
            for param, grad in grads:
                param.grad = grad


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf that requires grad: the gradient flows to it (the parameters are frozen),
    and a library that sets ``.grad`` or ``requires_grad`` on its input leaves ``x`` alone."""
    return x.detach().clone().requires_grad_(True)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _reads_maps(model: nn.Module) -> bool:
    """Whether the model's layers may need reading as maps (tokens, channels-last)."""
    layout = map_layout(model)
    return layout.tokens or layout.channels_last


def reshape_transform(model: nn.Module, module: nn.Module) -> Callable | None:
    """The ``reshape_transform`` pytorch-grad-cam and torchcam document for token layers,
    as ``cams.hooks.read_map`` reads them (None for a CNN: no transform is passed)."""
    if not _reads_maps(model):
        return None
    layout, name = map_layout(model), _module_name(model, module)

    def reshape(tensor: torch.Tensor) -> torch.Tensor:
        reading = read_map(tensor, layout, module, name)
        return tensor if reading is None else reading[0]

    return reshape


class MapView(nn.Module):
    """An identity the target layer's output passes through as a (B, C, h, w) map, for the
    libraries that hook a module and have no reshape_transform (captum, MONAI)."""

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap


def map_view(model: nn.Module, module: nn.Module, handles: list) -> nn.Module:
    """The module to give captum or MONAI as the layer: ``module`` itself for a CNN map, else
    a ``MapView`` its token or channels-last output passes through (a forward hook on
    ``module``, its handle in ``handles``, hands the rest of the model the tokens rebuilt
    from the view's output, so the gradient at the view is the gradient of the map)."""
    if not _reads_maps(model):
        return module
    layout, name, view = map_layout(model), _module_name(model, module), MapView()

    def hook(mod: nn.Module, inputs: object, output: object) -> object:
        reading = read_map(output, layout, mod, name) if isinstance(output, torch.Tensor) else None
        if reading is None:
            return None
        fmap, rebuild = reading
        return rebuild(view(fmap))

    handles.append(module.register_forward_hook(hook))
    return view


def _numpy_maps(maps: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).to(x.device)


# --- captum ----------------------------------------------------------------------------

InterpolateMode = Literal["nearest", "bilinear", "bicubic", "area"]
_CAM_NEEDS = ("layer",)
_CAM_COST = "1F+1B"


@METHODS.register("gradcam@captum", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcam_captum(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    relu_attributions: bool = True,
    interpolate_mode: InterpolateMode = "nearest",
) -> Explanation:
    """Grad-CAM by captum: ``LayerGradCam(model, layer).attribute(x, target,
    relu_attributions=...)``, upsampled by ``LayerAttribution.interpolate`` (default mode).

    The same activation and gradient as ours (captum's hook keeps the layer's output as the
    layer produced it and hands a clone downstream: our ``point="produced"``), the same
    weights (spatial mean of the gradient). Differences: ``relu_attributions`` is captum's
    switch for the final ReLU; its default is False (signed maps), True is what its docs
    say matches the paper, and that is the default here, so that the layer maps equal ours;
    the upsampling is captum's ``LayerAttribution.interpolate`` default ``"nearest"`` (ours:
    bilinear, ``interpolate_mode="bilinear"`` gives ours exactly). ``layer_maps``: captum's
    (B, h, w) attribution before upsampling.
    """
    captum_attr = require("captum.attr", "captum")
    target = resolve_target(model, x, target)
    with _library_call(model, target) as handles, torch.enable_grad():
        module = map_view(model, resolve_layer(model, layer, x), handles)
        attr = captum_attr.LayerGradCam(model, module).attribute(
            _as_input(x), target=target, relu_attributions=relu_attributions
        )
    if attr.dim() != 4:
        raise UserError(
            f"target layer output gives a captum attribution of shape {tuple(attr.shape)}; "
            "Grad-CAM needs a (B, K, h, w) feature map"
        )
    maps = captum_attr.LayerAttribution.interpolate(
        attr.detach(), tuple(x.shape[-2:]), interpolate_mode
    )
    return Explanation(maps=maps[:, 0], layer_maps=attr[:, 0])


@METHODS.register("guided_backprop@captum", family="gradient", needs=("relu",), cost="1F+1B")
def guided_backprop_captum(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    """Guided backprop by captum: ``GuidedBackprop(model).attribute(x, target)``, reduced as
    ours (max over channels of the absolute value). ``layer`` is ignored.

    captum guides ``nn.ReLU`` modules only (a backward hook on each); a rectifier called as
    a function (torchvision DenseNet's ``F.relu(features, inplace=True)`` before its
    classifier), ``nn.ReLU6`` or a clamp keeps its plain gradient, where ours guides every
    rectifier (``cams.guided``). On a model without ``nn.ReLU`` modules this is the plain
    gradient, and captum does not say so. The rule at a guided ReLU is ours.
    """
    captum_attr = require("captum.attr", "captum")
    target = resolve_target(model, x, target)
    with _library_call(model, target), torch.enable_grad():
        attr = captum_attr.GuidedBackprop(model).attribute(_as_input(x), target=target)
    return Explanation(maps=reduce_abs_max(attr.detach()))


@METHODS.register(
    "occlusion@captum",
    family="perturbation",
    cost=OCCLUSION_COST,
)
@fits_image(geometry_fits)
def occlusion_captum(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    window: PositiveInt | tuple[PositiveInt, PositiveInt] = 8,
    stride: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None,
    baseline: float = 0.0,
    batch_size: PositiveInt = 64,
) -> Explanation:
    """Occlusion by captum: ``Occlusion(model).attribute(x, sliding_window_shapes=(C, h, w),
    strides=(C, sh, sw), baselines=baseline, target=target)``, summed over channels as ours.

    The options are ours, with our defaults (captum's own stride default is 1 pixel; ours is
    half the window). captum's ``perturbations_per_eval`` puts that many perturbed copies of
    the whole batch in one forward: it is ``max(1, batch_size // B)``, so a forward holds
    about ``batch_size`` images as ours does. The result is the same quantity as ours (the
    mean drop of the target logit over the windows covering a pixel). ``layer`` is ignored.
    """
    captum_attr = require("captum.attr", "captum")
    target = resolve_target(model, x, target)
    win, step = geometry((x.shape[-2], x.shape[-1]), window, stride)
    channels = x.shape[1]
    with _library_call(model, target), torch.no_grad():
        attr = captum_attr.Occlusion(model).attribute(
            x.detach(),
            sliding_window_shapes=(channels, *win),
            strides=(channels, *step),
            baselines=float(baseline),
            target=target,
            perturbations_per_eval=max(1, batch_size // x.shape[0]),
        )
    return Explanation(maps=attr.sum(dim=1))


# --- pytorch-grad-cam ------------------------------------------------------------------


def _pytorch_grad_cam(
    class_name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer
) -> Explanation:
    """``<class_name>(model, [layer])(x, targets=[ClassifierOutputTarget(c), ...])``, hooks
    released by ``activations_and_grads.release()`` in a ``finally``: the documented context
    manager does the same, but swallows an IndexError (printing it) and returns nothing."""
    lib = require("pytorch_grad_cam", "grad-cam")
    targets_module = require("pytorch_grad_cam.utils.model_targets", "grad-cam")
    target = resolve_target(model, x, target)
    with _library_call(model, target), torch.enable_grad():
        module = resolve_layer(model, layer, x)
        cam = getattr(lib, class_name)(
            model=model,
            target_layers=[module],
            reshape_transform=reshape_transform(model, module),
        )
        try:
            maps = cam(
                input_tensor=_as_input(x),
                targets=[targets_module.ClassifierOutputTarget(int(c)) for c in target.tolist()],
            )
        finally:
            cam.activations_and_grads.release()
    return Explanation(maps=_numpy_maps(maps, x))


_PGC_DIFFERENCES = """
    pytorch-grad-cam takes the activation with a forward hook that keeps
    ``output.cpu().detach()``, and the gradient with a tensor hook registered on the output
    in the same forward. Where the model later changes that output in place (torchvision
    DenseNet's ``F.relu(features, inplace=True)`` after ``features``), on the CPU the kept
    activation is the same storage, so it is the post-ReLU activation, while the hook's
    gradient is the pre-ReLU one (checked in tests/test_peers.py); on CUDA ``.cpu()`` copies
    and the activation is the pre-ReLU one (read, not run). Ours takes both where the layer
    produced them (``point="produced"``). Where nothing changes the output in place, both are
    ours. The map is ReLU'd, then min-max normalized per image (x - min) / (max + 1e-7),
    resized to the input with cv2 bilinear (half-pixel centres, as our ``align_corners=False``)
    and min-max normalized again: in [0, 1], no ``layer_maps``.
"""


@METHODS.register("gradcam@pytorch-grad-cam", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcam_pytorch_grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    return _pytorch_grad_cam("GradCAM", model, x, target, layer)


gradcam_pytorch_grad_cam.__doc__ = (
    """Grad-CAM by pytorch-grad-cam: ``GradCAM(model, [layer])(x, targets)``, the weights the
    spatial mean of the gradient, as ours.
"""
    + _PGC_DIFFERENCES
)


@METHODS.register("gradcampp@pytorch-grad-cam", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcampp_pytorch_grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    return _pytorch_grad_cam("GradCAMPlusPlus", model, x, target, layer)


gradcampp_pytorch_grad_cam.__doc__ = (
    """Grad-CAM++ by pytorch-grad-cam: ``GradCAMPlusPlus(model, [layer])(x, targets)``.

    Its alpha is ours, g^2 / (2 g^2 + sum_ab A_ab g^3) (paper eq. 19), but with 1e-6 added to
    the denominator (ours: exact, 0 where it is 0): where g^2 is not far above 1e-6 (the
    gradients at a late layer of a small or random-init net are often 1e-3 and below) that
    eps dominates and the weights tend to sum_ij g^2 ReLU(g) / 1e-6, not ours.
"""
    + _PGC_DIFFERENCES
)


@METHODS.register(
    "guided_backprop@pytorch-grad-cam", family="gradient", needs=("relu",), cost="1F+1B"
)
def guided_backprop_pytorch_grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    """Guided backprop by pytorch-grad-cam: ``GuidedBackpropReLUModel(model, device)(x_i,
    target_category=c_i)`` for each image (it explains image 0 of a batch only), its
    (H, W, C) result reduced as ours (max over channels of the absolute value). ``layer`` is
    ignored.

    It swaps every ``nn.ReLU`` module (``isinstance``) for its guided ReLU and afterwards
    puts back new ``nn.ReLU()`` modules (``inplace=False``, training mode, their hooks gone;
    not at all if the call raises): here the model's own modules are put back, always.
    Like captum it guides ``nn.ReLU`` modules only (a functional ``F.relu``, ``nn.ReLU6`` or
    a clamp keeps its plain gradient; a model without ``nn.ReLU`` gets the plain gradient),
    with our rule: the gradient passes where the ReLU's input and the gradient are positive.
    """
    lib = require("pytorch_grad_cam", "grad-cam")
    target = resolve_target(model, x, target)
    relus = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent._modules.items()
        if isinstance(child, nn.ReLU)
    ]
    with _library_call(model, target), torch.enable_grad():
        try:
            guided = lib.GuidedBackpropReLUModel(model=model, device=None)
            maps = [
                guided(_as_input(x[i : i + 1]), target_category=int(c))
                for i, c in enumerate(target.tolist())
            ]
        finally:
            for parent, name, child in relus:
                parent._modules[name] = child
    attr = _numpy_maps(np.stack(maps), x).permute(0, 3, 1, 2)
    return Explanation(maps=reduce_abs_max(attr))


# --- torchcam --------------------------------------------------------------------------


def _torchcam(
    class_name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer
) -> Explanation:
    """``with <class_name>(model, target_layer=layer) as extractor: scores = model(x);
    extractor(class_idx=[...], scores=scores)`` (torchcam's documented use; leaving the
    ``with`` calls ``remove_hooks()``), upsampled bilinearly."""
    methods = require("torchcam.methods", "torchcam")
    target = resolve_target(model, x, target)
    with _library_call(model, target), torch.enable_grad():
        module = resolve_layer(model, layer, x)
        reshape = reshape_transform(model, module)
        options = {"reshape_transform": reshape} if reshape is not None else {}
        extractor = getattr(methods, class_name)(model, target_layer=module, **options)
        with extractor:
            scores = model(_as_input(x))
            (cam,) = extractor(class_idx=target.tolist(), scores=scores)
    cam = cam.detach().float()
    return Explanation(maps=upsample(cam, (x.shape[-2], x.shape[-1])), layer_maps=cam)


_TORCHCAM_DIFFERENCES = """
    torchcam keeps the layer's output (``output.detach()``) and differentiates with respect
    to that output tensor after the forward: where the model changes the output in place
    (DenseNet's ``F.relu(features, inplace=True)``), both are post-ReLU (our
    ``point="consumed"``); elsewhere ours. Its maps are at the layer's resolution,
    min-max normalized per image by default (``normalized=True``): (x - min) / (max + 1e-8),
    of which the eps is visible where the map's range is ~1e-8 (its maximum then below 1);
    they are upsampled here bilinearly (``align_corners=False``) as torchcam's own metrics
    (``torchcam.metrics``) resize them, not with PIL bicubic as its ``overlay_mask`` does for
    display. ``layer_maps``: torchcam's normalized maps.
"""


@METHODS.register("gradcam@torchcam", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcam_torchcam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    return _torchcam("GradCAM", model, x, target, layer)


gradcam_torchcam.__doc__ = (
    """Grad-CAM by torchcam: ``torchcam.methods.GradCAM``, the weights the spatial mean of
    the gradient, as ours.
"""
    + _TORCHCAM_DIFFERENCES
)


@METHODS.register("gradcampp@torchcam", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcampp_torchcam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    return _torchcam("GradCAMpp", model, x, target, layer)


gradcampp_torchcam.__doc__ = (
    """Grad-CAM++ by torchcam: ``torchcam.methods.GradCAMpp``.

    torchcam 0.5 never divides by its denominator: ``alpha[idx][mask].div_(...)`` divides a
    copy that boolean-mask indexing makes, and the copy is dropped, so alpha stays g^2 and
    the weights are sum_ij g^2 ReLU(g) = sum_ij ReLU(g)^3, not ours,
    sum_ij g^2 / (2 g^2 + sum_ab A_ab g^3) ReLU(g) (tests/test_peers.py checks both against
    torchcam's output). Its denominator, had it been used, is 2 g^2 + sum_ab A_ab g^3_ab
    (the gradient at each position, not at (i, j)), as MONAI's.
"""
    + _TORCHCAM_DIFFERENCES
)


# --- MONAI -----------------------------------------------------------------------------


class _WithView(nn.Module):
    """The model, with a ``MapView`` MONAI can name (it hooks modules by name)."""

    def __init__(self, model: nn.Module, view: nn.Module):
        super().__init__()
        self.model, self.view = model, view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@contextlib.contextmanager
def _monai_hooks_undone(module: nn.Module) -> Iterator[None]:
    """MONAI's ``ModelWithHooks`` registers a forward hook and a full backward hook on the
    target layer and keeps no handle; for the backward hook it sets the layer's ``inplace``
    flag to False. Undo all three on exit."""
    forward, backward = dict(module._forward_hooks), dict(module._backward_hooks)
    state = {
        k: module.__dict__[k] for k in ("inplace", "_is_full_backward_hook") if k in module.__dict__
    }
    try:
        yield
    finally:
        for hooks, before in ((module._forward_hooks, forward), (module._backward_hooks, backward)):
            for key in [k for k in hooks if k not in before]:
                del hooks[key]
        module.__dict__.update(state)


def _monai_cam(
    class_name: str,
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    layer,
    *,
    per_image: bool,
) -> Explanation:
    """``<class_name>(nn_module=model, target_layers=name)(x, class_idx=c)`` with MONAI's
    default upsampler and postprocessing, once per image or per class (each peer's docstring
    says why), its (min, max) -> (1, 0) output turned back as 1 - output."""
    visualize = require("monai.visualize", "monai")
    target = resolve_target(model, x, target)
    maps = torch.empty(x.shape[0], x.shape[-2], x.shape[-1], dtype=torch.float32, device=x.device)
    with _library_call(model, target) as handles, torch.enable_grad():
        module = resolve_layer(model, layer, x)
        view = map_view(model, module, handles)
        if view is module:
            nn_module, hooked, name = model, module, _module_name(model, module)
        else:
            # in eval mode, so that MONAI, which puts a module that came in training mode
            # back with .train(), leaves the model's own flags to model_guard
            nn_module, hooked, name = _WithView(model, view).eval(), view, "view"
        with _monai_hooks_undone(hooked):
            cam = getattr(visualize, class_name)(nn_module=nn_module, target_layers=name)
            if per_image:
                groups = [
                    (torch.tensor([i], device=x.device), int(c))
                    for i, c in enumerate(target.tolist())
                ]
            else:
                groups = [((target == c).nonzero()[:, 0], int(c)) for c in target.unique().tolist()]
            for rows, c in groups:
                try:
                    out = cam(x=_as_input(x[rows]), class_idx=c)
                except RuntimeError as exc:
                    if "BackwardHookFunction" in str(exc) and "inplace" in str(exc):
                        raise NotApplicable(
                            f"MONAI's full backward hook on layer {name!r} cannot take an output "
                            "the model then changes in place (torchvision DenseNet's "
                            "F.relu(features, inplace=True)); pick a layer whose output is not "
                            f"changed in place. PyTorch: {str(exc).splitlines()[0]}"
                        ) from exc
                    raise
                maps[rows] = 1.0 - torch.as_tensor(out, dtype=torch.float32)[:, 0].to(x.device)
    return Explanation(maps=maps)


_MONAI_DIFFERENCES = """
    MONAI keeps the layer's output (a forward hook) and the gradient at it (a full backward
    hook): our ``point="produced"`` where nothing changes it in place; a full backward hook
    refuses an output the model then changes in place (DenseNet's ``features``):
    ``NotApplicable``, naming the layer. Its map is
    upsampled by its ``default_upsampler`` (bilinear, ``align_corners=False``, as ours) and
    post-processed by its ``default_normalizer``, which maps (min, max) to (1, 0): it flips
    the map, as MONAI's docs say ("smallest will become biggest"); the map returned here is
    1 - MONAI's output, the per-image min-max normalized map, higher more relevant (a
    constant map c comes back from MONAI as c, so as 1 - c). No ``layer_maps``.
    ``class_idx`` is an int: MONAI's ``logits[:, class_idx]`` with one index per image
    would sum every image's class in every image's score, so images are explained
"""


@METHODS.register("gradcam@monai", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcam_monai(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    return _monai_cam("GradCAM", model, x, target, layer, per_image=False)


gradcam_monai.__doc__ = (
    """Grad-CAM by MONAI: ``monai.visualize.GradCAM``, the weights the spatial mean of the
    gradient, as ours.
"""
    + _MONAI_DIFFERENCES
    + "    in one call per target class.\n"
)


@METHODS.register("gradcampp@monai", family="cam", needs=_CAM_NEEDS, cost=_CAM_COST)
def gradcampp_monai(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    return _monai_cam("GradCAMpp", model, x, target, layer, per_image=True)


gradcampp_monai.__doc__ = (
    """Grad-CAM++ by MONAI: ``monai.visualize.GradCAMpp``.

    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3_ab + 1e-7) (the gradient at each position in the
    sum, where ours and the paper's eq. 19 have sum_ab A_ab times g^3 at (i, j); the same
    where the gradient is constant over the map, as under a GAP head; 1 for a zero
    denominator), and the weights sum_ij alpha ReLU(exp(S) g), the paper's exponential
    score: a positive factor per image, which the normalization removes (exp overflows
    for a logit above ~88: the map is then NaN, returned as 0). MONAI multiplies exp(S) of
    shape (B,) into the gradient (B, K, h, w) along its last axis, an error for a batch
    unless B equals the map's width (then silently wrong), so each image is its own call.
"""
    + _MONAI_DIFFERENCES
    + "    one per call.\n"
)


MonaiMode = Literal["gaussian", "mean_patch", "mean_img"]


def _mask_fits(options: dict, hw: tuple[int, int]) -> str:
    mask = pair(options["mask_size"], "mask_size")
    if mask[0] > hw[0] or mask[1] > hw[1]:
        return f"mask_size {mask} exceeds the image {hw}; use mask_size <= {min(hw)}"
    return ""


@METHODS.register(
    "occlusion@monai",
    family="perturbation",
    cost="1F + n_windows F (MONAI's sliding windows of mask_size with overlap: "
    "(ceil((H-m)/(m(1-overlap)))+1) * (ceil((W-m)/(m(1-overlap)))+1) for an m x m mask)",
)
@fits_image(_mask_fits)
def occlusion_monai(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    mask_size: PositiveInt | tuple[PositiveInt, PositiveInt] = 16,
    overlap: Annotated[float, Range(0, 1, open_max=True)] = 0.6,
    mode: MonaiMode | float = "gaussian",
    activate: bool = True,
    n_batch: PositiveInt = 16,
) -> Explanation:
    """Occlusion sensitivity by MONAI: ``OcclusionSensitivity(model, mask_size, n_batch,
    verbose=False, mode, overlap, activate)(x_i)`` per image (it takes a batch of one), with
    MONAI's defaults; the map is the drop of the target's score, ``score(x) - occ_map[c]``.

    MONAI returns the model's output under occlusion, (1, n_classes, H, W): lower means more
    relevant; the unoccluded score is subtracted from here (one more forward), so higher
    means more relevant, as ours. Differences from ours (window 8, stride 4, baseline 0,
    logit): windows of ``mask_size`` 16 slid by MONAI's ``sliding_window_inference`` with
    ``overlap`` 0.6; ``mode="gaussian"`` multiplies the window by 1 - a Gaussian (0 at its
    centre, the image unchanged towards its edges) instead of writing a baseline value (a
    number as ``mode`` writes that value), and windows overlapping a pixel are averaged
    with Gaussian weights; ``activate=True`` scores probabilities, not logits: softmax, but
    sigmoid of each logit when the *input* has one channel (MONAI tests ``x.shape[1] == 1``,
    not the number of classes: on grayscale images, as in medical imaging, the score is
    sigmoid(logit), not a probability over the classes); the unoccluded score takes the same
    activation. ``verbose=False`` only turns off its progress bar. ``layer`` is ignored.
    """
    visualize = require("monai.visualize", "monai")
    target = resolve_target(model, x, target)
    problem = _mask_fits({"mask_size": mask_size}, (x.shape[-2], x.shape[-1]))
    if problem:
        raise UserError(problem)
    if isinstance(mode, str) and mode not in typing.get_args(MonaiMode):
        raise UserError(
            f"mode must be one of {typing.get_args(MonaiMode)} or a number, got {mode!r}"
        )
    if not 0 <= overlap < 1:
        raise UserError(f"overlap must be in [0, 1), got {overlap}")
    occlusion = visualize.OcclusionSensitivity(
        nn_module=model,
        mask_size=mask_size,
        n_batch=n_batch,
        verbose=False,
        mode=mode if isinstance(mode, str) else float(mode),
        overlap=overlap,
        activate=activate,
    )
    with _library_call(model, target), torch.no_grad():
        clean = model(x.detach())
        if activate:
            clean = clean.sigmoid() if x.shape[1] == 1 else clean.softmax(dim=1)
        maps = []
        for i, c in enumerate(target.tolist()):
            occ_map, _ = occlusion(x=x[i : i + 1].detach())
            occ_map = occ_map.as_tensor() if hasattr(occ_map, "as_tensor") else occ_map
            maps.append(clean[i, c] - occ_map[0, c])
    return Explanation(maps=torch.stack(maps).to(x.device))
