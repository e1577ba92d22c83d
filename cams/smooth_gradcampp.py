"""Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ with its gradient terms averaged
over noisy copies of the input, as SmoothGrad averages input gradients.

For n noisy copies x_m = x + eps_m, g_m = dy^c/dA at x_m (y^c the target logit, A the
target layer's activation), the paper averages the first-, second- and third-order terms

    D1 = mean_m g_m,   D2 = mean_m g_m^2,   D3 = mean_m g_m^3,

and puts them in Grad-CAM++'s closed form with the activation A of the clean input x:

    a_kij = D2_kij / (2 D2_kij + sum_ab A_kab D3_kij)   (0 where the denominator is 0),
    w_k = sum_ij a_kij ReLU(D1_kij),   map = ReLU(sum_k w_k A_k).

With one copy and no noise this is exactly ``gradcampp``. (torchcam's ``SmoothGradCAMpp``
differs: it sums A * D3 over positions in the denominator and uses the last sample's
gradient, not D1, in the ReLU.)

Noise: eps_m = sigma * (max(x_b) - min(x_b)) * z_m, z_m standard normal (C, H, W), drawn as
``torch.randn((n_samples, C, H, W), generator=torch.Generator().manual_seed(seed))`` on the
CPU (``noise_directions``). Every image uses the same z_m scaled by its own range, so a map does not depend on the
batch it is computed in. The clean and noisy copies of all images form one stream of
``batch_size`` images per forward + backward pass (``cams.gradient_cams.layer_gradient``).
The global RNG is never drawn from.

The noise reaches the map only through the gradients g_m (A is the clean input's). At a
target layer that reaches the logits through global average pooling and one linear layer
(the default target layer of torchvision's ResNets and of GAP CNNs), g_m = W[c] / (h w)
whatever the input, so D1, D2, D3 are g, g^2, g^3 and the map is Grad-CAM++'s exactly, for
every ``seed``, ``sigma`` and ``n_samples``. That is the formula (torchcam's implementation
has the same property), not a seed the noise ignores: at a layer whose gradient depends on
the input, two seeds give two maps (tests/test_method_findings.py checks both). To see the
smoothing, explain an earlier layer.
"""

from __future__ import annotations

import torch
from torch import nn

from cambench.benchmarks.core.checks import NonNegativeFloat, PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import METHODS, Explanation, resolve_target
from cambench.cams.gradient_cams import _safe_div, _weighted, layer_gradient, to_explanation
from cambench.cams.hooks import CapturePoint, resolve_layer


def noise_directions(n_samples: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(n_samples, C, H, W) standard normal draws z_m, seeded by ``seed`` (CPU generator)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((n_samples, *shape), generator=gen)


def noise_scale(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,) noise std per image: ``sigma`` times the image's value range (0 for a flat image)."""
    flat = x.detach().flatten(1)
    return sigma * (flat.max(dim=1).values - flat.min(dim=1).values)


def smoothed_weights(
    activation: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, d3: torch.Tensor
) -> torch.Tensor:
    """Grad-CAM++ channel weights (B, K) from averaged gradient moments (B, K, h, w)."""
    den = 2 * d2 + activation.sum(dim=(2, 3), keepdim=True) * d3
    alpha = _safe_div(d2, den)
    return (alpha * torch.relu(d1)).sum(dim=(2, 3))


@METHODS.register(
    "smooth_gradcampp",
    aliases=("smooth-gradcam++", "smoothgradcampp"),
    family="cam",
    needs=("layer",),
    cost="(n_samples + 1)(F + B), B to the target layer only",
    randomized=True,
)
def smooth_gradcampp(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    point: CapturePoint = "produced",
    n_samples: PositiveInt = 16,
    sigma: NonNegativeFloat = 0.15,
    seed: int = 0,
    batch_size: PositiveInt = 64,
) -> Explanation:
    """Smooth Grad-CAM++: Grad-CAM++ with its 1st-3rd order gradient terms averaged over
    ``n_samples`` noisy copies (noise std ``sigma`` times the image's value range).

    ``batch_size`` is the number of images (clean or noisy) per forward + backward pass.
    """
    target = resolve_target(model, x, target)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise UserError(f"n_samples must be a positive int, got {n_samples!r}")
    if sigma < 0:
        raise UserError(
            f"sigma (noise std as a fraction of the input range) must be >= 0, got {sigma}"
        )
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    module = resolve_layer(model, layer, x)
    batch, copies = x.shape[0], n_samples + 1
    # Copy 0 of each image is the clean input (z = 0; it gives A), copies 1.. the noisy ones.
    z = noise_directions(n_samples, tuple(x.shape[1:]), seed).to(device=x.device, dtype=x.dtype)
    z = torch.cat([torch.zeros_like(z[:1]), z])
    scale = noise_scale(x, sigma)
    parts = []
    # One stream of (image, copy) pairs, built per chunk of batch_size rows.
    for start in range(0, batch * copies, batch_size):
        idx = torch.arange(start, min(start + batch_size, batch * copies), device=x.device)
        img, copy = idx // copies, idx % copies
        chunk = x.detach()[img] + scale[img, None, None, None] * z[copy]
        parts.append(layer_gradient(model, chunk, target[img], layer=module, point=point))
    activation = torch.cat([p.activation for p in parts]).unflatten(0, (batch, copies))
    gradient = torch.cat([p.gradient for p in parts]).unflatten(0, (batch, copies))
    clean = activation[:, 0]
    g = gradient[:, 1:]
    d1, d2, d3 = g.mean(dim=1), (g * g).mean(dim=1), (g * g * g).mean(dim=1)
    weights = smoothed_weights(clean, d1, d2, d3)
    extras = {"alpha": weights}
    return to_explanation(_weighted(weights, clean), (x.shape[-2], x.shape[-1]), extras)
