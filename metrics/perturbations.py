"""Perturbation functions for the perturbation-curve metrics: small pure functions, passed in.

Each maps a batch of images (B, C, H, W) on the [0, 1] image scale, with one seeded
generator per image, to the fully perturbed batch. A curve metric reveals that batch
region by region, so a region, once perturbed, keeps its values for the rest of the curve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F

from cambench.benchmarks.core.checks import OneOf, OptionsFor
from cambench.benchmarks.core.errors import UserError

Perturbation = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]


def _noise(
    x: torch.Tensor,
    gens: list[torch.Generator],
    draw: Callable[[tuple, torch.Generator], torch.Tensor],
) -> torch.Tensor:
    return torch.stack([draw(tuple(img.shape), g) for img, g in zip(x, gens, strict=True)]).to(x)


def gaussian(
    x: torch.Tensor, gens: list[torch.Generator], *, mean: float = 0.0, std: float = 0.1
) -> torch.Tensor:
    """Add Gaussian noise N(mean, std^2) per pixel (not clipped), as the medical AOPC study did."""
    return x + _noise(x, gens, lambda shape, g: torch.randn(shape, generator=g) * std + mean)


def uniform(
    x: torch.Tensor, gens: list[torch.Generator], *, low: float = 0.0, high: float = 1.0
) -> torch.Tensor:
    """Replace pixels by uniform noise on [low, high) (Samek et al.'s choice)."""
    return _noise(x, gens, lambda shape, g: torch.rand(shape, generator=g) * (high - low) + low)


def zero(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Replace pixels by 0 (black)."""
    return torch.zeros_like(x)


def mean(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Replace pixels by the image's per-channel mean."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, gens: list[torch.Generator], *, sigma: float = 5.0) -> torch.Tensor:
    """Gaussian blur of the whole image (reflect padding), separable."""
    k = gaussian_kernel1d(sigma).to(x)
    c = x.shape[1]
    pad = k.numel() // 2
    out = F.pad(x, (pad, pad, 0, 0), mode="reflect" if pad < x.shape[-1] else "replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, pad, pad), mode="reflect" if pad < x.shape[-2] else "replicate")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


PERTURBATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian": gaussian,
    "uniform": uniform,
    "zero": zero,
    "mean": mean,
    "blur": blur,
}


PerturbationName = Annotated[str, OneOf(PERTURBATIONS)]


def perturbation_options(param: str):
    """The type of a dict of options for the perturbation that option ``param`` names."""
    return Annotated[dict | None, OptionsFor(param, PERTURBATIONS)]


PerturbationOptions = perturbation_options("perturbation")
SubstrateOptions = perturbation_options("substrate")


def get_perturbation(name: str, **options) -> Perturbation:
    """The named perturbation with its options bound, e.g. ``get_perturbation("gaussian", std=0.1)``."""
    if name not in PERTURBATIONS:
        raise UserError(
            f"unknown perturbation {name!r}; choose from {', '.join(sorted(PERTURBATIONS))}"
        )
    fn = PERTURBATIONS[name]
    return lambda x, gens: fn(x, gens, **options)
