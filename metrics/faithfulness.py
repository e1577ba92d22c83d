"""Perturbation-curve faithfulness: AOPC over MoRF and LeRF curves, and ABPC (Samek et al.
2017; Schulz et al. 2020).

The image is cut into square regions of ``region`` pixels (or, with ``reference_size``,
``region`` pixels of an image that size scaled to this one: the X-ray study's 34x34
regions at 224 px are ``region = 34, reference_size = 224``) on a grid (edge regions are
cut short where the size does not divide the image); a region's relevance is the sum of
the map over it. MoRF perturbs regions in decreasing relevance, LeRF in increasing. Step k
of the curve is the image with its first k regions perturbed: the perturbation function
is applied to the whole image once and revealed region by region, so each region keeps
the values it was given. With f the explained class's score (logit by default),

    AOPC = 1/(L+1) * sum_{k=1..L} [f(x^(0)) - f(x^(k))]

per image; the mean over images is the aggregation step. The B x L perturbed images are
one stream of forwards of ``ctx.batch_size`` images under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cambench.benchmarks.core.checks import PositiveInt, fits_image
from cambench.benchmarks.core.errors import UserError
from cambench.metrics.base import METRICS, ClassScore, MetricContext, Scores, class_score
from cambench.metrics.perturbations import PerturbationName, PerturbationOptions, get_perturbation

Order = Literal["morf", "lerf"]


def region_ranks(
    maps: torch.Tensor, region: int, order: Order = "morf"
) -> tuple[torch.Tensor, int]:
    """For maps (B, H, W): the rank (0 first) at which each pixel's region is perturbed, and
    the number of regions. Ties keep grid (raster) order, so ranks are deterministic."""
    if region < 1:
        raise UserError(f"region must be a positive number of pixels, got {region}")
    b, h, w = maps.shape
    nh, nw = math.ceil(h / region), math.ceil(w / region)
    padded = F.pad(maps.float(), (0, nw * region - w, 0, nh * region - h))
    relevance = padded.reshape(b, nh, region, nw, region).sum(dim=(2, 4)).reshape(b, nh * nw)
    key = -relevance if order == "morf" else relevance
    order_idx = torch.sort(key, dim=1, stable=True).indices
    ranks = torch.argsort(order_idx, dim=1)  # region id -> rank
    rows = torch.arange(h, device=maps.device) // region
    cols = torch.arange(w, device=maps.device) // region
    region_id = (rows[:, None] * nw + cols[None, :]).reshape(-1)
    return ranks[:, region_id].reshape(b, h, w), nh * nw


def perturbation_curve(
    ctx: MetricContext,
    *,
    order: Order,
    region: int,
    steps: int | None,
    perturbation: str,
    perturbation_options: dict | None,
    score: str,
) -> np.ndarray:
    """Scores f(x^(k)) for k = 0..L, as (B, L+1)."""
    ranks, n_regions = region_ranks(ctx.maps.to(ctx.device), region, order)
    n_steps = n_regions if steps is None else min(int(steps), n_regions)
    if n_steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    perturb = get_perturbation(perturbation, **(perturbation_options or {}))
    gens = [ctx.generator(i, salt=f"perturb:{perturbation}") for i in range(len(ctx.ids))]
    x = ctx.x
    perturbed = perturb(x, gens)

    def stream():
        for k in range(1, n_steps + 1):
            yield torch.where((ranks < k)[:, None], perturbed, x)

    logits = ctx.predict(stream())
    b = x.shape[0]
    stepped = class_score(logits, ctx.target.repeat(n_steps), score).reshape(n_steps, b).T
    f0 = class_score(ctx.logits, ctx.target, score)[:, None]
    return torch.cat([f0, stepped], dim=1).float().cpu().numpy()


def _aopc(curve: np.ndarray) -> np.ndarray:
    return (curve[:, :1] - curve[:, 1:]).sum(axis=1) / curve.shape[1]


MISCLASSIFIED = "misclassified (the entry scores correctly classified images only)"


def _only_correct(ctx: MetricContext, values: np.ndarray) -> np.ndarray:
    wrong = (ctx.logits.argmax(1) != ctx.labels).cpu().numpy()
    return np.where(wrong, np.nan, values)


def scaled_region(region: int, reference_size: int | None, image_size: int) -> int:
    """``region`` pixels of an image of ``reference_size`` pixels, scaled to ``image_size``
    (34 at 224 px is 4 at 28 px and 10 at 64 px); ``region`` itself if no reference."""
    if reference_size is None:
        return region
    if reference_size < 1:
        raise UserError(f"reference_size must be a positive image size, got {reference_size!r}")
    return max(1, round(region * image_size / reference_size))


def region_fits(options: dict, hw: tuple[int, int]) -> str:
    """Why a region-based entry's ``region`` does not fit (H, W) images ("" if it does): a
    region as large as the image makes the curve one step, on which every map scores alike.

    >>> region_fits({"region": 40, "reference_size": None}, (32, 32))
    'region = 40 covers the whole 32x32 image, so every map would score alike; use a region smaller than the image (e.g. 4)'
    >>> region_fits({"region": 34, "reference_size": 224}, (28, 28))
    ''
    """
    side = min(hw)
    region = scaled_region(options["region"], options["reference_size"], side)
    if region < side:
        return ""
    given = f"region = {options['region']}"
    if options["reference_size"] is not None:
        given += f" at reference_size = {options['reference_size']} ({region} px here)"
    return (
        f"{given} covers the whole {hw[0]}x{hw[1]} image, so every map would score alike; "
        f"use a region smaller than the image (e.g. {max(1, side // 8)})"
    )


def _aopc_metric(order: Order):
    @fits_image(region_fits)
    def metric(
        ctx: MetricContext,
        *,
        region: PositiveInt = 8,
        reference_size: PositiveInt | None = None,
        steps: PositiveInt | None = None,
        perturbation: PerturbationName = "gaussian",
        perturbation_options: PerturbationOptions = None,
        score: ClassScore = "logit",
        correct_only: bool = False,
    ) -> Scores:
        curve = perturbation_curve(
            ctx,
            order=order,
            region=scaled_region(region, reference_size, min(ctx.x.shape[-2:])),
            steps=steps,
            perturbation=perturbation,
            perturbation_options=perturbation_options,
            score=score,
        )
        value = _aopc(curve)
        if correct_only:
            value = _only_correct(ctx, value)
        why = MISCLASSIFIED if correct_only else ""
        return Scores(values={"value": value}, curves={order: curve}, unscored=why)

    return metric


aopc_morf = METRICS.register(
    "aopc_morf",
    aliases=("aopc", "aopc-morf"),
    kind="faithfulness",
    higher_is_better=True,
    scale_free=True,
)(_aopc_metric("morf"))
aopc_morf.__doc__ = "AOPC over the MoRF curve (Samek et al.): mean score drop as the most relevant regions go first."

aopc_lerf = METRICS.register(
    "aopc_lerf",
    aliases=("aopc-lerf",),
    kind="faithfulness",
    higher_is_better=False,
    scale_free=True,
)(_aopc_metric("lerf"))
aopc_lerf.__doc__ = "AOPC over the LeRF curve: mean score drop as the least relevant regions go first (lower is better)."


@METRICS.register("abpc", kind="faithfulness", higher_is_better=True, scale_free=True)
@fits_image(region_fits)
def abpc(
    ctx: MetricContext,
    *,
    region: PositiveInt = 8,
    reference_size: PositiveInt | None = None,
    steps: PositiveInt | None = None,
    perturbation: PerturbationName = "gaussian",
    perturbation_options: PerturbationOptions = None,
    score: ClassScore = "logit",
    correct_only: bool = False,
) -> Scores:
    """ABPC: area between the LeRF and MoRF curves, 1/(L+1) sum_k [f(x_lerf^k) - f(x_morf^k)]."""
    opts = dict(
        region=scaled_region(region, reference_size, min(ctx.x.shape[-2:])),
        steps=steps,
        perturbation=perturbation,
        perturbation_options=perturbation_options,
        score=score,
    )
    morf = perturbation_curve(ctx, order="morf", **opts)
    lerf = perturbation_curve(ctx, order="lerf", **opts)
    value = (lerf - morf)[:, 1:].sum(axis=1) / morf.shape[1]
    if correct_only:
        value = _only_correct(ctx, value)
    why = MISCLASSIFIED if correct_only else ""
    return Scores(values={"value": value}, curves={"morf": morf, "lerf": lerf}, unscored=why)
