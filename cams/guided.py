"""Guided backpropagation, DeconvNet and Guided Grad-CAM: input gradients whose ReLU backward
rule is replaced.

Every ReLU the model applies is guided, not only ``nn.ReLU`` modules: for the duration of the
forward pass a ``TorchFunctionMode`` routes ``F.relu`` (what ``nn.ReLU`` calls, in place or
not), ``torch.relu``, ``torch.relu_`` (= ``F.relu_``), ``Tensor.relu``, ``Tensor.relu_`` and
``torch.ops.aten.relu(_)`` through an autograd function with the modified backward. That covers torchvision DenseNet's
functional ``F.relu(features, inplace=True)`` and ResNet's ``nn.ReLU`` instance applied twice
per block. captum and pytorch-grad-cam guide ``nn.ReLU`` modules only, so on DenseNet they
leave the last ReLU with its plain gradient (tests/test_guided_pixel_methods.py shows it). The mode is thread-local and leaves
the stack when the forward ends, also on error; the backward runs outside it. ``clamp``,
``relu6``/``hardtanh`` and other rectifiers are not ReLU calls and keep their plain gradient.

Rules, with g the gradient arriving at a ReLU's output and x its input:
    guided backprop (Springenberg et al., 2015): grad_x = [x > 0] * ReLU(g)
    DeconvNet (Zeiler & Fergus, 2014):            grad_x = ReLU(g)
both as captum's ``GuidedBackprop`` and ``Deconvolution`` compute them.

Map: the attribution is the modified gradient of the target logit with respect to the input,
(B, C, H, W); the map is its absolute value, maximum over channels (Simonyan et al.'s rule for
gradient images, also used for ``saliency``). Guided Grad-CAM multiplies the guided backprop
attribution by Grad-CAM's upsampled map before that reduction.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from benchmarks.core.errors import NotApplicable, UserError
from cams.base import METHODS, Explanation, check_inputs, check_target_range
from cams.gradient_cams import gradcam
from cams.hooks import CapturePoint, model_guard
from cams.pixel import reduce_abs_max

Rule = Literal["guided", "deconvnet"]

_ATEN = torch.ops.aten
_RELU_OUT_OF_PLACE = frozenset(
    {torch.nn.functional.relu, torch.relu, torch.Tensor.relu, _ATEN.relu, _ATEN.relu.default}
)
_RELU_IN_PLACE = frozenset({torch.relu_, torch.Tensor.relu_, _ATEN.relu_, _ATEN.relu_.default})


class _ModifiedReLU(torch.autograd.Function):
    """ReLU forward; backward by ``rule`` instead of the ReLU derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: str, inplace: bool) -> torch.Tensor:
        # Save the sign mask, not x: the model may later change x (or the output) in place.
        mask = x > 0
        ctx.save_for_backward(mask)
        ctx.rule = rule
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        positive = grad.clamp(min=0)
        if ctx.rule == "guided":
            return positive * mask, None, None
        return positive, None, None


class _ReLUOverride(TorchFunctionMode):
    """While active, every ReLU call goes through ``_ModifiedReLU``; counts the calls."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_OUT_OF_PLACE or func in _RELU_IN_PLACE:
            self.calls += 1
            inplace = func in _RELU_IN_PLACE or bool(kwargs.get("inplace", False))
            tensor = args[0] if args else kwargs["input"]
            return _ModifiedReLU.apply(tensor, self.rule, inplace)
        return func(*args, **kwargs)


def modified_relu_attribution(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, rule: Rule = "guided"
) -> torch.Tensor:
    """The (B, C, H, W) gradient of the target logit with respect to ``x``, every ReLU's
    backward replaced by ``rule`` ("guided" or "deconvnet"). One forward, one backward.

    Raises ``NotApplicable`` if the model applied no ReLU (nothing to guide: the result would be
    the plain gradient).
    """
    if rule not in ("guided", "deconvnet"):
        raise UserError(f"rule must be 'guided' or 'deconvnet', got {rule!r}")
    target = check_inputs(x, target)
    with model_guard(model), torch.enable_grad():
        # A leaf that needs grad makes the graph exist even when every parameter is frozen.
        inputs = x.detach().requires_grad_(True)
        mode = _ReLUOverride(rule)
        with mode:
            logits = model(inputs)
        check_target_range(target, logits.shape[1])
        if mode.calls == 0:
            raise NotApplicable(
                f"{type(model).__name__} applies no ReLU, so there is nothing to guide "
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
    """Guided backpropagation: max over channels of |gradient|, every ReLU passing only
    positive gradients where its input was positive. ``layer`` is ignored."""
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
    """DeconvNet: max over channels of |gradient|, every ReLU passing ReLU(gradient) whatever
    its input's sign. ``layer`` is ignored."""
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
    cam = gradcam(model, x, target, layer=layer, point=point)
    guided = modified_relu_attribution(model, x, target, rule="guided")
    return Explanation(
        maps=reduce_abs_max(guided * cam.maps[:, None]),
        layer_maps=cam.layer_maps,
        extras=cam.extras,
    )
