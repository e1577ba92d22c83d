"""Guided backpropagation, DeconvNet and Guided Grad-CAM: input gradients whose rectifiers'
backward rule is replaced.

Every rectifier the model applies is guided, not only ``nn.ReLU`` modules: for the duration of
the forward pass a ``TorchFunctionMode`` routes each rectifier call through an autograd function
with the modified backward. The calls it recognizes (in place or not):

- ReLU: ``F.relu`` (what ``nn.ReLU`` calls), ``torch.relu``, ``torch.relu_`` (= ``F.relu_``),
  ``Tensor.relu``, ``Tensor.relu_``, ``torch.ops.aten.relu(_)``; and the ReLUs written as a
  clamp at zero: ``clamp``/``clip`` (torch function or Tensor method, ``_`` variants) with
  ``min=0`` and no ``max``, ``clamp_min(0)``;
- bounded rectifiers min(max(x, 0), m), m > 0: ``F.relu6`` and ``F.hardtanh`` with
  ``min_val=0`` (what ``nn.ReLU6`` and ``nn.Hardtanh(0, m)`` call), ``F.hardtanh_``, and
  ``clamp``/``clip`` with ``min=0, max=m``.

A bound is recognized when it is a Python number (a tensor bound, or ``out=``, leaves the call
as it is). That covers torchvision DenseNet's functional ``F.relu(features, inplace=True)``,
ResNet's ``nn.ReLU`` instance applied twice per block and MobileNetV2's ``nn.ReLU6``. captum
and pytorch-grad-cam guide ``nn.ReLU`` modules only, so on DenseNet they leave the last ReLU
with its plain gradient (tests/test_guided_pixel_methods.py shows it). Other rectifier
spellings (``F.threshold``, ``torch.maximum(x, 0)``, ``torch.where(x > 0, x, 0)``) keep their
plain gradient. The mode is thread-local and leaves the stack when the forward ends, also on
error; the backward runs outside it.

Rules, with g the gradient arriving at a rectifier's output, x its input and d(x) its own
derivative mask ([x > 0] for ReLU, [0 < x < m] for a bound m, as PyTorch's hardtanh backward):
    guided backprop (Springenberg et al., 2015): grad_x = d(x) * ReLU(g)
    DeconvNet (Zeiler & Fergus, 2014):            grad_x = ReLU(g)
both as captum's ``GuidedBackprop`` and ``Deconvolution`` compute them for ``nn.ReLU``; for a
bounded rectifier guided backprop is, as for ReLU, the plain backward's mask times DeconvNet's
rectified signal, and DeconvNet ignores the forward pass's mask altogether.

Map: the attribution is the modified gradient of the target logit with respect to the input,
(B, C, H, W); the map is its absolute value, maximum over channels (Simonyan et al.'s rule for
gradient images, also used for ``saliency``). Guided Grad-CAM multiplies the guided backprop
attribution by Grad-CAM's upsampled map before that reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cambench.benchmarks.core.errors import NotApplicable, UserError
from cambench.cams.base import METHODS, Explanation, check_target_range, resolve_target
from cambench.cams.gradient_cams import gradcam
from cambench.cams.hooks import CapturePoint, model_guard
from cambench.cams.pixel import reduce_abs_max

Rule = Literal["guided", "deconvnet"]

_ATEN = torch.ops.aten


@dataclass(frozen=True)
class _Form:
    """How one rectifier entry point spells its call: the names of its parameters after the
    input, their defaults, and which of them (or which fixed value) is the lower bound, the
    upper bound and the in-place flag."""

    params: tuple[str, ...] = ()
    defaults: dict[str, object] = field(default_factory=dict)
    low: str | float = 0.0
    high: str | float | None = None
    inplace: str | bool = False


_RELU = _Form(params=("inplace",), defaults={"inplace": False}, inplace="inplace")
_RELU_ = _Form(inplace=True)
_CLAMP = _Form(params=("min", "max"), defaults={"min": None, "max": None}, low="min", high="max")
_CLAMP_ = _Form(
    params=("min", "max"), defaults={"min": None, "max": None}, low="min", high="max", inplace=True
)
_CLAMP_MIN = _Form(params=("min",), defaults={"min": None}, low="min")
_CLAMP_MIN_ = _Form(params=("min",), defaults={"min": None}, low="min", inplace=True)
_HARDTANH_ARGS = {"params": ("min_val", "max_val"), "low": "min_val", "high": "max_val"}
_HARDTANH_DEFAULTS = {"min_val": -1.0, "max_val": 1.0, "inplace": False}

_FORMS: dict[object, _Form] = {
    **dict.fromkeys((F.relu, torch.relu, torch.Tensor.relu, _ATEN.relu, _ATEN.relu.default), _RELU),
    **dict.fromkeys((torch.relu_, torch.Tensor.relu_, _ATEN.relu_, _ATEN.relu_.default), _RELU_),
    **dict.fromkeys((torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip), _CLAMP),
    **dict.fromkeys((torch.clamp_, torch.clip_, torch.Tensor.clamp_, torch.Tensor.clip_), _CLAMP_),
    **dict.fromkeys((torch.clamp_min, torch.Tensor.clamp_min), _CLAMP_MIN),
    **dict.fromkeys((torch.clamp_min_, torch.Tensor.clamp_min_), _CLAMP_MIN_),
    F.relu6: _Form(params=("inplace",), defaults={"inplace": False}, high=6.0, inplace="inplace"),
    F.hardtanh: _Form(
        params=("min_val", "max_val", "inplace"),
        defaults=_HARDTANH_DEFAULTS,
        low="min_val",
        high="max_val",
        inplace="inplace",
    ),
    F.hardtanh_: _Form(**_HARDTANH_ARGS, defaults=_HARDTANH_DEFAULTS, inplace=True),
}


def _number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def rectifier_call(
    func, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, float | None, bool] | None:
    """(input, upper bound or None, in place) if ``func(*args, **kwargs)`` is a rectifier
    min(max(x, 0), m) this module guides (see the module docstring), else None."""
    form = _FORMS.get(func)
    if form is None or "out" in kwargs:
        return None
    tensor = args[0] if args else kwargs.get("input", kwargs.get("self"))
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return None
    bound = {**form.defaults, **dict(zip(form.params, args[1:], strict=False))}
    bound.update((k, v) for k, v in kwargs.items() if k not in ("input", "self"))
    low = bound.get(form.low) if isinstance(form.low, str) else form.low
    high = bound.get(form.high) if isinstance(form.high, str) else form.high
    if not _number(low) or low != 0 or not (high is None or (_number(high) and high > 0)):
        return None
    inplace = bool(bound.get(form.inplace)) if isinstance(form.inplace, str) else form.inplace
    return tensor, (None if high is None else float(high)), inplace


class _ModifiedRectifier(torch.autograd.Function):
    """min(max(x, 0), high) forward (ReLU when ``high`` is None); backward by ``rule`` instead
    of the rectifier's derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str, high: float | None, inplace: bool) -> torch.Tensor:
        # Save the derivative mask, not x: the model may later change x (or the output) in place.
        mask = x > 0 if high is None else (x > 0) & (x < high)
        ctx.save_for_backward(mask)
        ctx.rule = rule
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0, max=high)
        return x.clamp(min=0, max=high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (mask,) = ctx.saved_tensors
        positive = grad.clamp(min=0)
        if ctx.rule == "guided":
            return positive * mask, None, None, None
        return positive, None, None, None


class _RectifierOverride(TorchFunctionMode):
    """While active, every rectifier call goes through ``_ModifiedRectifier``; counts them."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = rectifier_call(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        self.calls += 1
        tensor, high, inplace = call
        return _ModifiedRectifier.apply(tensor, self.rule, high, inplace)


def modified_relu_attribution(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, rule: Rule = "guided"
) -> torch.Tensor:
    """The (B, C, H, W) gradient of the target logit with respect to ``x``, every rectifier's
    backward replaced by ``rule`` ("guided" or "deconvnet"). One forward, one backward.

    Raises ``NotApplicable`` if the model applied no rectifier (nothing to guide: the result
    would be the plain gradient).
    """
    if rule not in ("guided", "deconvnet"):
        raise UserError(f"rule must be 'guided' or 'deconvnet', got {rule!r}")
    target = resolve_target(model, x, target)
    with model_guard(model), torch.enable_grad():
        # A leaf that needs grad makes the graph exist even when every parameter is frozen.
        inputs = x.detach().requires_grad_(True)
        mode = _RectifierOverride(rule)
        with mode:
            logits = model(inputs)
        check_target_range(target, logits.shape[1])
        if mode.calls == 0:
            raise NotApplicable(
                f"{type(model).__name__} applies no ReLU (nor ReLU6, hardtanh(0, m) or a clamp "
                "at 0), so there is nothing to guide "
                "(guided backprop and DeconvNet would equal the plain gradient); use saliency"
            )
        chosen = logits.gather(1, target[:, None]).sum()
        (gradient,) = torch.autograd.grad(chosen, inputs)
    return gradient.detach()


_RELU_NEEDS = ("relu",)


@METHODS.register(
    "guided_backprop",
    aliases=("guided-backprop", "gbp", "guidedbackprop"),
    family="gradient",
    needs=_RELU_NEEDS,
    cost="1F+1B",
)
def guided_backprop(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    """Guided backpropagation: max over channels of |gradient|, every rectifier passing
    only positive gradients where its own derivative is nonzero. ``layer`` is ignored."""
    return Explanation(
        maps=reduce_abs_max(modified_relu_attribution(model, x, target, rule="guided"))
    )


@METHODS.register(
    "deconvnet",
    aliases=("deconvolution", "deconv"),
    family="gradient",
    needs=_RELU_NEEDS,
    cost="1F+1B",
)
def deconvnet(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None
) -> Explanation:
    """DeconvNet: max over channels of |gradient|, every rectifier passing ReLU(gradient)
    whatever its input. ``layer`` is ignored."""
    return Explanation(
        maps=reduce_abs_max(modified_relu_attribution(model, x, target, rule="deconvnet"))
    )


@METHODS.register(
    "guided_gradcam",
    aliases=("guided-gradcam", "guided-grad-cam"),
    family="cam",
    needs=("layer", "relu"),
    cost="2F+2B (Grad-CAM's pass and guided backprop's pass)",
)
def guided_gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    point: CapturePoint = "produced",
) -> Explanation:
    """Guided Grad-CAM (Selvaraju et al.): guided backprop (B, C, H, W) times Grad-CAM's
    bilinearly upsampled map, then max over channels of the absolute value.

    Equals captum's ``GuidedGradCam(...).attribute(x, target, interpolate_mode="bilinear")``
    before the reduction (captum's default is nearest). ``layer_maps`` and ``extras`` are
    Grad-CAM's.
    """
    target = resolve_target(model, x, target)  # once, for both passes
    cam = gradcam(model, x, target, layer=layer, point=point)
    guided = modified_relu_attribution(model, x, target, rule="guided")
    return Explanation(
        maps=reduce_abs_max(guided * cam.maps[:, None]),
        layer_maps=cam.layer_maps,
        extras=cam.extras,
    )
