"""Baselines that look plausible without explaining the class: the centre-bias Gaussian and the
class-agnostic mean activation of the target layer.

A method that does not beat these has not shown it explains the decision: many lesions sit
near the image centre, and where a network's features are strong is often where any class's
evidence is.
"""

from __future__ import annotations

import torch
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import METHODS, Explanation, check_inputs, check_target_range, upsample
from cambench.cams.hooks import CapturePoint, attach_tap, model_guard, resolve_layer


def centered_gaussian(height: int, width: int, sigma: float) -> torch.Tensor:
    """(H, W) float32 exp(-((i - ci)^2 / (2 (sigma H)^2) + (j - cj)^2 / (2 (sigma W)^2))),
    ci, cj the centre between pixel centres; 1 at the centre.

    >>> centered_gaussian(3, 3, 0.5)
    tensor([[0.6412, 0.8007, 0.6412],
            [0.8007, 1.0000, 0.8007],
            [0.6412, 0.8007, 0.6412]])
    """
    rows = (torch.arange(height, dtype=torch.float64) - (height - 1) / 2) / (sigma * height)
    cols = (torch.arange(width, dtype=torch.float64) - (width - 1) / 2) / (sigma * width)
    return torch.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2)).float()


@METHODS.register("gaussian", aliases=("center-bias", "centre-bias"), family="baseline", cost="0")
def gaussian(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None, sigma: float = 0.25
) -> Explanation:
    """Centre bias: the same centred 2D Gaussian for every image, standard deviation ``sigma``
    times the image height (vertically) and width (horizontally). The model is not run."""
    check_inputs(x, target)
    if not sigma > 0:
        raise UserError(
            f"sigma must be > 0 (a fraction of the image size, e.g. 0.25), got {sigma!r}"
        )
    gauss = centered_gaussian(x.shape[-2], x.shape[-1], float(sigma)).to(x.device)
    return Explanation(maps=gauss.expand(x.shape[0], -1, -1).clone())


@METHODS.register(
    "activation_map", aliases=("mean-activation",), family="baseline", needs=("layer",), cost="1F"
)
def activation_map(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    point: CapturePoint = "produced",
) -> Explanation:
    """The target layer's activation averaged over channels, whatever the class, upsampled
    bilinearly like Grad-CAM (one forward under ``inference_mode``). ``point`` picks which
    activation, as for Grad-CAM (see ``cams.hooks``)."""
    target = check_inputs(x, target)
    with model_guard(model) as handles:
        module = resolve_layer(model, layer, x)
        tap = attach_tap(model, module, handles, point)
        with torch.inference_mode():
            logits = model(x)
    if target is not None:  # the map ignores the class; a given one must still exist
        check_target_range(target, logits.shape[1])
    activation = tap.activation
    if activation.dim() != 4:
        raise UserError(
            f"target layer output has shape {tuple(activation.shape)}; activation_map needs a "
            "(B, K, h, w) feature map"
        )
    layer_maps = activation.float().mean(dim=1)
    return Explanation(maps=upsample(layer_maps, (x.shape[-2], x.shape[-1])), layer_maps=layer_maps)
