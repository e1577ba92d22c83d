"""Score-CAM (Wang et al., 2020): channels of the target layer weighted by the score of the
input masked with each channel's upsampled, normalized activation.

One forward captures the target layer's activation A (B, K, h, w) (``cams.hooks``; the
layer's output as it produced it, or ``point="consumed"``). Each channel A_k is upsampled
bilinearly to the input size and min-max normalized to [0, 1] (0 where it is constant),
giving a mask M_k; the masked input x * M_k goes through the model and its score s_k of the
target class is the logit (``score="logit"``) or the softmax probability
(``score="probability"``). The channel weights are

    w = softmax_k(s)   (``channel_softmax=True``, the default), or   w = s,

and the map is ReLU(sum_k w_k A_k) at the layer's resolution, upsampled bilinearly.

The defaults reproduce pytorch-grad-cam's ``ScoreCAM`` with ``ClassifierOutputTarget``:
softmax over the K channels of the masked inputs' target logits, masks upsampled with
``align_corners=True`` (``nn.UpsamplingBilinear2d``), no baseline score subtracted.
``score="probability", channel_softmax=False, align_corners=False`` is the authors' own
implementation (each weight the target's softmax probability on its masked input; the
paper's baseline term f(X_b) is not subtracted there either).

The (image, channel) pairs form one stream of masked inputs, regrouped into forwards of
``batch_size`` images under ``torch.inference_mode()``; masks are built per chunk and the
masked images written into one buffer reused by every chunk (at 224 px a chunk of 64 is
38 MB, which the allocator would otherwise map and fault in afresh for every forward),
channels-last on the CPU (``cams.base.input_buffer``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cambench.benchmarks.core.checks import PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import (
    METHODS,
    Explanation,
    ForwardInLayout,
    check_target_range,
    image_runs,
    input_buffer,
    resolve_target,
    upsample,
)
from cambench.cams.hooks import CapturePoint, attach_tap, model_guard, resolve_layer


def channel_masks(
    activation: torch.Tensor, size: tuple[int, int], *, align_corners: bool
) -> torch.Tensor:
    """(n, h, w) activation maps -> (n, H, W) masks: bilinear upsampling, then min-max to
    [0, 1] per map, 0 for a constant map (normalized in place: one allocation per call)."""
    up = F.interpolate(
        activation[:, None], size=size, mode="bilinear", align_corners=align_corners
    )[:, 0]
    low, high = torch.aminmax(up.flatten(1), dim=1)
    span = high - low
    valid = span > 0
    span = torch.where(valid, span, torch.ones_like(span))
    return up.sub_(low[:, None, None]).div_(span[:, None, None]).mul_(valid[:, None, None])


def capture_activation(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | str | None, point: CapturePoint
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward under inference mode: (the target layer's activation (B, K, h, w), logits)."""
    with model_guard(model) as handles:
        module = resolve_layer(model, layer, x)
        tap = attach_tap(model, module, handles, point)
        with torch.inference_mode():
            logits = model(x)
        activation = tap.activation
    if activation.dim() != 4:
        raise UserError(
            f"target layer output has shape {tuple(activation.shape)}; Score-CAM needs a "
            "(B, K, h, w) feature map"
        )
    return activation, logits


@METHODS.register(
    "scorecam",
    aliases=("score-cam",),
    family="cam",
    needs=("layer",),
    cost="1F + K F (K channels of the target layer)",
)
def scorecam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    point: CapturePoint = "produced",
    score: Literal["logit", "probability"] = "logit",
    channel_softmax: bool = True,
    align_corners: bool = True,
    batch_size: PositiveInt = 64,
) -> Explanation:
    """Score-CAM: ReLU(sum_k w_k A_k), w the channel softmax of the target's logit on the
    input masked by each normalized, upsampled channel (pytorch-grad-cam semantics).

    ``batch_size`` is the number of masked images per forward pass; see the module
    docstring for ``score``, ``channel_softmax`` and ``align_corners``.
    """
    target = resolve_target(model, x, target)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if score not in ("logit", "probability"):
        raise UserError(f"score must be 'logit' or 'probability', got {score!r}")
    activation, logits = capture_activation(model, x, layer, point)
    check_target_range(target, logits.shape[1])
    size = (x.shape[-2], x.shape[-1])
    batch, channels = activation.shape[:2]
    total = batch * channels
    scores = torch.empty(total, dtype=torch.float32, device=x.device)
    with model_guard(model), torch.inference_mode():
        # One stream of (image, channel) pairs, image-major, cut into forwards of batch_size;
        # the masked images of a chunk are written into one reused buffer.
        inputs = input_buffer(x, min(batch_size, total))
        forward = ForwardInLayout(model)
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            idx = torch.arange(start, stop, device=x.device)
            img, channel = idx // channels, idx % channels
            masks = channel_masks(
                activation[img, channel].float(), size, align_corners=align_corners
            ).to(x.dtype)
            chunk = inputs[: stop - start]
            for i, rows in image_runs(start, stop, channels):
                torch.mul(x[i : i + 1], masks[rows, None], out=chunk[rows])
            out = forward(chunk)
            if score == "probability":
                out = out.softmax(dim=1)
            scores[idx] = out.gather(1, target[img][:, None])[:, 0].float()
        scores = scores.reshape(batch, channels)
        weights = scores.softmax(dim=1) if channel_softmax else scores
        layer_maps = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activation.float()))
    layer_maps, weights = layer_maps.clone(), weights.clone()
    return Explanation(
        maps=upsample(layer_maps, size), layer_maps=layer_maps, extras={"weights": weights}
    )
