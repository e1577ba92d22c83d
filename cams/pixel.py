"""Pixel attributions computed by captum: Saliency, SmoothGrad, Integrated Gradients, LIME and
Kernel SHAP, each a thin registration over one shared way of calling captum.

Every method explains the target logit (before softmax). How each reduces captum's
(B, C, H, W) attribution to one map is in its docstring: the gradient images (saliency,
SmoothGrad) take the maximum over channels of the absolute value, the additive attributions
(Integrated Gradients) the signed sum over channels, so the map sums to f(x) - f(0); LIME and
Kernel SHAP give one coefficient per grid cell, the same in every channel, and the map shows
it on the cell's pixels.

Randomness is per image: noise and perturbation draws come from a seed derived from the
image's bytes and ``seed`` (``cams.baselines.image_generator``), so an image gets the same map
in any batch and for any batching knob, and the global RNG is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.attr import IntegratedGradients, KernelShap, Lime, Saliency
from torch import nn

from cambench.benchmarks.core.checks import NonNegativeFloat, PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import METHODS, Explanation, check_target_range, resolve_target
from cambench.cams.baselines import image_generator
from cambench.cams.hooks import model_guard


def _checked_forward(
    model: nn.Module, target: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward, raising a clear error for a target class the model does not have
    (captum would fail inside its indexing with a less helpful message)."""

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        check_target_range(target, logits.shape[1])
        return logits

    return forward


def _positive(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _image_seed(image: torch.Tensor, seed: int) -> int:
    return image_generator(image, seed).initial_seed()


def reduce_abs_max(attribution: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): the absolute value, maximum over channels."""
    return attribution.abs().amax(dim=1)


@METHODS.register("saliency", aliases=("vanilla-gradient",), family="gradient", cost="1F+1B")
def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None) -> Explanation:
    """Saliency (Simonyan et al.): max over channels of |d logit / d x| (captum ``Saliency``).
    ``layer`` is ignored."""
    target = resolve_target(model, x, target)
    with model_guard(model), torch.enable_grad():
        attribution = Saliency(_checked_forward(model, target)).attribute(
            x.detach().clone().requires_grad_(True), target=target, abs=True
        )
    return Explanation(maps=reduce_abs_max(attribution))


def smoothgrad_noise(
    image: torch.Tensor, *, n_samples: int, stdevs: float, seed: int
) -> torch.Tensor:
    """The (n_samples, C, H, W) Gaussian noise SmoothGrad adds to one image (C, H, W).

    Drawn from a CPU generator seeded by the image and ``seed``, by the same call captum's
    ``NoiseTunnel`` makes for one image, so ``torch.manual_seed(s)`` + ``NoiseTunnel`` with
    ``s = image_generator(image, seed).initial_seed()`` draws the same noise.
    """
    generator = torch.Generator().manual_seed(_image_seed(image, seed))
    std = torch.full((n_samples, *image.shape), float(stdevs))
    return torch.normal(0.0, std, generator=generator).to(image.device, image.dtype)


@METHODS.register(
    "smoothgrad",
    aliases=("smooth-grad",),
    family="gradient",
    cost="n_samples F + n_samples B",
    randomized=True,
)
def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    n_samples: PositiveInt = 25,
    stdevs: NonNegativeFloat = 0.15,
    seed: int = 0,
    internal_batch_size: PositiveInt = 64,
) -> Explanation:
    """SmoothGrad (Smilkov et al.): the mean over ``n_samples`` noisy copies of |d logit / d x|,
    noise N(0, stdevs^2) in the units of ``x`` (the model's input), then max over channels.

    Equals captum's ``NoiseTunnel(Saliency)`` with ``nt_type="smoothgrad"`` when that draws the
    same noise (see ``smoothgrad_noise``). ``internal_batch_size``: noisy images per forward
    and backward; it does not change the map. ``layer`` is ignored.
    """
    target = resolve_target(model, x, target)
    n_samples = _positive("n_samples", n_samples)
    internal_batch_size = _positive("internal_batch_size", internal_batch_size)
    if not stdevs >= 0:
        raise UserError(f"stdevs must be >= 0 (noise standard deviation), got {stdevs!r}")
    noisy = torch.cat(
        [img + smoothgrad_noise(img, n_samples=n_samples, stdevs=stdevs, seed=seed) for img in x]
    )
    noisy_target = target.repeat_interleave(n_samples)
    parts = []
    with model_guard(model), torch.enable_grad():
        explainer = Saliency(_checked_forward(model, target))
        for start in range(0, noisy.shape[0], internal_batch_size):
            chunk = noisy[start : start + internal_batch_size].detach().requires_grad_(True)
            parts.append(
                explainer.attribute(
                    chunk, target=noisy_target[start : start + internal_batch_size], abs=True
                )
            )
    attribution = torch.cat(parts).reshape(x.shape[0], n_samples, *x.shape[1:]).mean(dim=1)
    return Explanation(maps=reduce_abs_max(attribution))


@METHODS.register(
    "integrated_gradients",
    aliases=("integrated-gradients", "ig"),
    family="gradient",
    cost="n_steps F + n_steps B",
)
def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    n_steps: PositiveInt = 50,
    internal_batch_size: PositiveInt = 64,
) -> Explanation:
    """Integrated Gradients (Sundararajan et al.) from a zero baseline (captum, Gauss-Legendre
    steps): the signed sum over channels, so the map sums to about f(x) - f(0) for the target
    logit f; positive where the pixel raises the logit.

    ``internal_batch_size``: interpolated images per forward and backward (at least one image's
    worth is used); it does not change the map. ``layer`` is ignored.
    """
    target = resolve_target(model, x, target)
    n_steps = _positive("n_steps", n_steps)
    internal_batch_size = _positive("internal_batch_size", internal_batch_size)
    # captum splits the steps of a whole batch; give it at most internal_batch_size images at
    # a time, so the knob means rows per pass whatever the batch size (and captum never warns).
    parts = []
    with model_guard(model), torch.enable_grad():
        explainer = IntegratedGradients(_checked_forward(model, target))
        for start in range(0, x.shape[0], internal_batch_size):
            chunk = x[start : start + internal_batch_size].detach()
            parts.append(
                explainer.attribute(
                    chunk,
                    baselines=0.0,
                    target=target[start : start + internal_batch_size],
                    n_steps=n_steps,
                    method="gausslegendre",
                    internal_batch_size=internal_batch_size,
                )
            )
    return Explanation(maps=torch.cat(parts).sum(dim=1))


def grid_feature_mask(
    height: int, width: int, grid: int, device: torch.device | None = None
) -> torch.Tensor:
    """(1, 1, H, W) long mask cutting the image into ``grid`` x ``grid`` near-equal cells,
    numbered row by row from 0 (fewer cells along a side shorter than ``grid``).

    >>> grid_feature_mask(4, 6, 2)[0, 0]
    tensor([[0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
            [2, 2, 2, 3, 3, 3],
            [2, 2, 2, 3, 3, 3]])
    """
    rows = torch.arange(height, device=device) * min(grid, height) // height
    cols = torch.arange(width, device=device) * min(grid, width) // width
    return (rows[:, None] * min(grid, width) + cols[None, :])[None, None]


def _surrogate(
    explainer_type: type[Lime],
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    n_samples: int,
    grid: int,
    seed: int,
    perturbations_per_eval: int,
) -> Explanation:
    """LIME / Kernel SHAP on a grid of cells, one image at a time with its own seed."""
    target = resolve_target(model, x, target)
    n_samples = _positive("n_samples", n_samples)
    grid = _positive("grid", grid)
    perturbations_per_eval = _positive("perturbations_per_eval", perturbations_per_eval)
    mask = grid_feature_mask(x.shape[-2], x.shape[-1], grid, device=x.device)
    maps = []
    with model_guard(model), torch.no_grad():
        explainer = explainer_type(_checked_forward(model, target))
        for image, label in zip(x, target.tolist(), strict=True):
            # captum draws its samples from the global RNG (on the CPU): seed it per image and
            # restore it afterwards.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_image_seed(image, seed))
                attribution = explainer.attribute(
                    image[None].detach(),
                    baselines=0.0,
                    target=label,
                    feature_mask=mask,
                    n_samples=n_samples,
                    perturbations_per_eval=perturbations_per_eval,
                )
            maps.append(attribution[0].mean(dim=0))  # the same coefficient in every channel
    return Explanation(maps=torch.stack(maps))


@METHODS.register("lime", family="perturbation", cost="n_samples F", randomized=True)
def lime(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    n_samples: PositiveInt = 200,
    grid: PositiveInt = 8,
    seed: int = 0,
    perturbations_per_eval: PositiveInt = 32,
) -> Explanation:
    """LIME (Ribeiro et al.; captum ``Lime`` with its defaults: Lasso alpha 0.01, cosine
    exponential kernel): the surrogate's coefficient of each of ``grid`` x ``grid`` cells, cells
    switched off to 0 in the space of ``x`` (black for the zoo's [0, 1] images).
    ``perturbations_per_eval``: masked images per forward; it does not change the map.
    ``layer`` is ignored."""
    return _surrogate(
        Lime,
        model,
        x,
        target,
        n_samples=n_samples,
        grid=grid,
        seed=seed,
        perturbations_per_eval=perturbations_per_eval,
    )


@METHODS.register(
    "kernelshap",
    aliases=("kernel-shap", "kernel_shap"),
    family="perturbation",
    cost="n_samples F",
    randomized=True,
)
def kernelshap(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    n_samples: PositiveInt = 200,
    grid: PositiveInt = 8,
    seed: int = 0,
    perturbations_per_eval: PositiveInt = 32,
) -> Explanation:
    """Kernel SHAP (Lundberg & Lee; captum ``KernelShap``): the Shapley value estimate of each of
    ``grid`` x ``grid`` cells, absent cells set to 0 in the space of ``x`` (black for the
    zoo's [0, 1] images).
    ``perturbations_per_eval``: masked images per forward; it does not change the map.
    ``layer`` is ignored."""
    return _surrogate(
        KernelShap,
        model,
        x,
        target,
        n_samples=n_samples,
        grid=grid,
        seed=seed,
        perturbations_per_eval=perturbations_per_eval,
    )
