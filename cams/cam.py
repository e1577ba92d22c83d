"""CAM (Zhou et al., 2016): the classifier's weights applied to the pooled feature maps.

CAM applies only where the target layer's features reach the logits through global
average pooling and one linear layer: logits = W GAP(F) + b. The check is numerical,
so it works for any architecture: one forward records the target layer's output as the
rest of the model consumed it (F, after any in-place ReLU) and the input of the last
``nn.Linear`` that ran; CAM applies if that input equals the spatial mean of F (or of
ReLU(F), for a non-in-place activation between them) and that Linear's output is the
model's output. Otherwise it raises ``NotApplicable`` with the reason.

map = sum_k W[c, k] F_k (no ReLU, as in the paper; the bias is constant over space).
"""

from __future__ import annotations

import torch
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable
from cambench.cams.base import METHODS, Explanation, check_target_range, resolve_target, upsample
from cambench.cams.hooks import attach_tap, model_guard, resolve_layer


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def gap_head_features(
    model: nn.Module, x: torch.Tensor, layer
) -> tuple[torch.Tensor, nn.Linear, torch.Tensor]:
    """(features F entering the GAP (B, K, h, w), the linear head, logits), or NotApplicable."""
    heads: list[tuple[nn.Linear, torch.Tensor]] = []
    with model_guard(model) as handles:
        module = resolve_layer(model, layer, x)
        tap = attach_tap(model, module, handles, point="consumed")
        for m in model.modules():
            if isinstance(m, nn.Linear):
                handles.append(
                    m.register_forward_hook(lambda mod, inp, out: heads.append((mod, inp[0])))
                )
        with torch.inference_mode():
            logits = model(x)
    return _check_gap_head(model, tap.activation, heads, logits)


@torch.inference_mode()
def _check_gap_head(model, features, heads, logits):
    name = type(model).__name__
    if not heads:
        raise NotApplicable(
            f"CAM needs a linear classifier after global average pooling; {name} has no nn.Linear"
        )
    head, z = heads[-1]
    if features.dim() != 4:
        raise NotApplicable(
            f"CAM needs a (B, K, h, w) target layer; its output has shape {tuple(features.shape)}"
        )
    if not _close(torch.nn.functional.linear(z, head.weight, head.bias), logits):
        raise NotApplicable(
            f"CAM needs the last nn.Linear of {name} to produce the logits; it does not"
        )
    for candidate in (features, torch.relu(features)):
        if _close(candidate.mean(dim=(2, 3)), z.reshape(z.shape[0], -1)):
            return candidate, head, logits
    raise NotApplicable(
        f"CAM needs a global-average-pool + linear head on the target layer; in {name} the input of the "
        f"last nn.Linear (shape {tuple(z.shape)}) is not the spatial mean of the target layer's output "
        f"(shape {tuple(features.shape)}). Use gradcam, which needs no such head."
    )


@METHODS.register("cam", family="cam", needs=("layer", "gap_head"), cost="1F")
def cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None) -> Explanation:
    """CAM: sum_k W[c, k] F_k over the features entering the GAP + linear head (no ReLU)."""
    target = resolve_target(model, x, target)
    features, head, logits = gap_head_features(model, x, layer)
    check_target_range(target, logits.shape[1])
    weights = head.weight.detach()[target]  # (B, K)
    layer_maps = torch.einsum("bk,bkhw->bhw", weights, features.detach())
    return Explanation(
        maps=upsample(layer_maps, (x.shape[-2], x.shape[-1])),
        layer_maps=layer_maps,
        extras={"weights": weights},
    )
