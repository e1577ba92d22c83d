"""The gradient-weighted CAM family from one forward and one backward pass.

Grad-CAM, Grad-CAM++, XGrad-CAM, HiResCAM and LayerCAM differ only in how they weight the
target layer's activations A (B, K, h, w) with the gradient g = dy^c/dA of the explained
class score y^c (the logit, before softmax). ``gradient_cams`` captures A and g once and
returns every requested variant; the registered single-method calls go through it too.

The backward stops at the target layer (``torch.autograd.grad`` with respect to A), so
no parameter gradient is computed or accumulated and the model's ``.grad`` stay untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import METHODS, Explanation, check_target_range, resolve_target, upsample
from cambench.cams.hooks import CapturePoint, attach_tap, model_guard, resolve_layer

Score = Literal["logit", "probability"]


@dataclass
class LayerGrad:
    """The captured activation and gradient of one layer for one batch and target."""

    activation: torch.Tensor  # (B, K, h, w)
    gradient: torch.Tensor  # (B, K, h, w)
    logits: torch.Tensor  # (B, n_classes)


def layer_gradient(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer: nn.Module | str | None = None,
    point: CapturePoint = "produced",
    score: Score = "logit",
) -> LayerGrad:
    """One forward and one backward (to the layer only): the layer's activation and gradient."""
    target = resolve_target(model, x, target)
    if score not in ("logit", "probability"):
        raise UserError(f"score must be 'logit' or 'probability', got {score!r}")
    with model_guard(model) as handles:
        module = resolve_layer(model, layer, x)
        tap = attach_tap(model, module, handles, point)
        with torch.enable_grad():
            # A leaf that needs grad makes the graph exist even when every parameter is frozen.
            logits = model(x.detach().requires_grad_(True))
            check_target_range(target, logits.shape[1])
            out = logits if score == "logit" else logits.softmax(dim=1)
            chosen = out.gather(1, target[:, None]).sum()
            activation = tap.activation
            if activation.dim() != 4:
                raise UserError(
                    f"target layer output has shape {tuple(activation.shape)}; CAM methods need "
                    "a (B, K, h, w) feature map"
                )
            (gradient,) = torch.autograd.grad(chosen, activation, allow_unused=False)
    return LayerGrad(activation.detach(), gradient.detach(), logits.detach())


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den is 0 (a dead channel or target, never NaN)."""
    nonzero = den != 0
    return torch.where(
        nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num)
    )


def _weighted(weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.einsum("bk,bkhw->bhw", weights, a))


def gradcam_map(lg: LayerGrad) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Grad-CAM: alpha_k = mean_ij g_kij; map = ReLU(sum_k alpha_k A_k)."""
    alpha = lg.gradient.mean(dim=(2, 3))
    return _weighted(alpha, lg.activation), {"alpha": alpha}


def gradcampp_map(
    lg: LayerGrad, *, normalize_alpha: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Grad-CAM++ closed form: a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3) (0 where the denominator
    is 0), w_k = sum_ij a_kij ReLU(g_kij), map = ReLU(sum_k w_k A_k).

    ``normalize_alpha`` rescales a_k to sum to 1 over positions (the renormalized alpha), with
    which Grad-CAM++ on a GAP + linear head reduces to CAM over the positive-weight channels.
    """
    a, g = lg.activation, lg.gradient
    g2 = g * g
    den = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g
    alpha = _safe_div(g2, den)
    if normalize_alpha:
        alpha = _safe_div(alpha, alpha.sum(dim=(2, 3), keepdim=True))
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3))
    return _weighted(weights, a), {"alpha": weights}


def xgradcam_map(lg: LayerGrad) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """XGrad-CAM: w_k = sum_ij (A_kij / sum_ab A_kab) g_kij (0 for a channel summing to 0)."""
    a = lg.activation
    weights = _safe_div((a * lg.gradient).sum(dim=(2, 3)), a.sum(dim=(2, 3)))
    return _weighted(weights, a), {"alpha": weights}


def hirescam_map(lg: LayerGrad) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HiResCAM: map = ReLU(sum_k g_k * A_k), the element-wise product before summing."""
    return torch.relu((lg.gradient * lg.activation).sum(dim=1)), {}


def layercam_map(lg: LayerGrad) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LayerCAM: map = ReLU(sum_k ReLU(g_k) * A_k)."""
    return torch.relu((torch.relu(lg.gradient) * lg.activation).sum(dim=1)), {}


VARIANTS: dict[str, Callable[[LayerGrad], tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {
    "gradcam": gradcam_map,
    "gradcampp": gradcampp_map,
    "xgradcam": xgradcam_map,
    "hirescam": hirescam_map,
    "layercam": layercam_map,
}


def to_explanation(
    layer_map: torch.Tensor, size: tuple[int, int], extras: dict[str, torch.Tensor]
) -> Explanation:
    """Wrap a (B, h, w) layer map as an Explanation upsampled to the input size."""
    return Explanation(maps=upsample(layer_map, size), layer_maps=layer_map, extras=extras)


def gradient_cams(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    variants: Iterable[str] = tuple(VARIANTS),
    layer: nn.Module | str | None = None,
    point: CapturePoint = "produced",
    score: Score = "logit",
) -> dict[str, Explanation]:
    """Every requested gradient-weighted CAM variant from one forward and one backward pass.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(4, 2))
    >>> out = gradient_cams(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), layer="1")
    >>> sorted(out), tuple(out["gradcam"].maps.shape)
    (['gradcam', 'gradcampp', 'hirescam', 'layercam', 'xgradcam'], (2, 8, 8))
    """
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(
            f"unknown gradient CAM variant(s) {unknown}; choose from {sorted(VARIANTS)}"
        )
    lg = layer_gradient(model, x, target, layer=layer, point=point, score=score)
    size = (x.shape[-2], x.shape[-1])
    result = {}
    for name in variants:
        layer_map, extras = VARIANTS[name](lg)
        result[name] = to_explanation(layer_map, size, extras)
    return result


class SharedPass:
    """One batch's layer gradients, shared by every gradient CAM asked for the same layer,
    capture point and score: the runner explains a batch with all five variants for the price
    of one forward and one backward. ``explain(name, options)`` returns None for a method or
    option it does not share, and the caller runs the method itself."""

    SHAREABLE = {
        "gradcam": ("point", "score"),
        "gradcampp": ("point", "normalize_alpha"),
        "xgradcam": ("point",),
        "hirescam": ("point",),
        "layercam": ("point",),
    }

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer):
        self.model, self.x, self.layer = model, x, layer
        self.target = resolve_target(model, x, target)
        self._passes: dict[tuple[str, str], LayerGrad] = {}

    def explain(self, name: str, options: dict) -> Explanation | None:
        allowed = self.SHAREABLE.get(name)
        if allowed is None or any(k not in allowed for k in options):
            return None
        key = (options.get("point", "produced"), options.get("score", "logit"))
        if key not in self._passes:
            self._passes[key] = layer_gradient(
                self.model, self.x, self.target, layer=self.layer, point=key[0], score=key[1]
            )
        lg = self._passes[key]
        if name == "gradcampp":
            layer_map, extras = gradcampp_map(
                lg, normalize_alpha=options.get("normalize_alpha", False)
            )
        else:
            layer_map, extras = VARIANTS[name](lg)
        return to_explanation(layer_map, (self.x.shape[-2], self.x.shape[-1]), extras)


_NEEDS = ("layer",)
_COST = "1F+1B (shared by every gradient CAM of the same layer and target)"


@METHODS.register("gradcam", aliases=("grad-cam",), family="cam", needs=_NEEDS, cost=_COST)
def gradcam(
    model, x, target, *, layer=None, point: CapturePoint = "produced", score: Score = "logit"
) -> Explanation:
    """Grad-CAM (Selvaraju et al.): ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of dy^c/dA_k."""
    return gradient_cams(
        model, x, target, variants=["gradcam"], layer=layer, point=point, score=score
    )["gradcam"]


@METHODS.register(
    "gradcampp", aliases=("grad-cam++", "gradcam++"), family="cam", needs=_NEEDS, cost=_COST
)
def gradcampp(
    model, x, target, *, layer=None, point: CapturePoint = "produced", normalize_alpha: bool = False
) -> Explanation:
    """Grad-CAM++ (Chattopadhyay et al.), closed form with ReLU(gradient) weights."""
    lg = layer_gradient(model, x, target, layer=layer, point=point)
    layer_map, extras = gradcampp_map(lg, normalize_alpha=normalize_alpha)
    return to_explanation(layer_map, (x.shape[-2], x.shape[-1]), extras)


@METHODS.register("xgradcam", aliases=("xgrad-cam",), family="cam", needs=_NEEDS, cost=_COST)
def xgradcam(model, x, target, *, layer=None, point: CapturePoint = "produced") -> Explanation:
    """XGrad-CAM (Fu et al.): activation-normalized gradient weights."""
    return gradient_cams(model, x, target, variants=["xgradcam"], layer=layer, point=point)[
        "xgradcam"
    ]


@METHODS.register("hirescam", aliases=("hires-cam",), family="cam", needs=_NEEDS, cost=_COST)
def hirescam(model, x, target, *, layer=None, point: CapturePoint = "produced") -> Explanation:
    """HiResCAM (Draelos & Carin): element-wise gradient x activation, summed over channels."""
    return gradient_cams(model, x, target, variants=["hirescam"], layer=layer, point=point)[
        "hirescam"
    ]


@METHODS.register("layercam", aliases=("layer-cam",), family="cam", needs=_NEEDS, cost=_COST)
def layercam(model, x, target, *, layer=None, point: CapturePoint = "produced") -> Explanation:
    """LayerCAM (Jiang et al.): ReLU(gradient) x activation, summed over channels."""
    return gradient_cams(model, x, target, variants=["layercam"], layer=layer, point=point)[
        "layercam"
    ]
