"""Deletion and insertion (Petsiuk et al. 2018, "RISE: Randomized Input Sampling for
Explanation of Black-box Models").

Pixels are ranked by decreasing map relevance; ties keep raster order (a stable sort), so
the result is deterministic. Step k of the curve is the image with its first ``k * s``
pixels changed, ``s`` pixels per step, for k = 0..n with n = ceil(H*W / s) (the last step
may change fewer than ``s`` pixels). The curve has n + 1 points, the start and the end
included, and holds the explained class's softmax probability (``score="probability"``;
``"logit"`` is offered):

- ``deletion``: start from the image and replace pixels by the substrate, black (0) by
  default: the probability should fall fast for a faithful map. Lower is better.
- ``insertion``: start from the substrate, a Gaussian blur of the image (sigma 5) by
  default, and reveal the original pixels: the probability should rise fast. Higher is
  better.

The value is the area under the curve by the trapezoid rule on [0, 1], the x axis being
the fraction of pixels changed (min(k*s, H*W) / (H*W)); when ``s`` divides H*W this is
exactly RISE's ``auc`` (evenly spaced points). The step is the option ``step``: an int is a
number of pixels, a float in (0, 1] a fraction of H*W (rounded, at least one pixel). The
default 1/30 gives a curve of 31 points at any image size (30 forwards per image and
method). The paper's setting, 224 pixels per step at 224 x 224, is ``step = 224``: 225
points, 7.5 times the forwards.

Differences from the reference code, on purpose: RISE blurs with sigma 5 truncated to an
11 x 11 kernel, here the substrate is ``metrics.perturbations.blur`` (sigma 5, radius 15);
RISE explains the top class, here ``ctx.target``. Substrates are the shared perturbation
functions of ``metrics.perturbations`` (option ``substrate``).

All steps of all images are one stream of forwards of ``ctx.batch_size`` images under
``torch.inference_mode()``; the unperturbed end of the curve reuses ``ctx.logits``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch

from cambench.benchmarks.core.checks import Range, fits_image
from cambench.benchmarks.core.errors import UserError
from cambench.metrics.base import METRICS, ClassScore, MetricContext, Scores, class_score
from cambench.metrics.faithfulness import region_ranks
from cambench.metrics.perturbations import PerturbationName, SubstrateOptions, get_perturbation

Mode = Literal["deletion", "insertion"]


def pixels_per_step(step: int | float, n_pixels: int) -> int:
    """Pixels changed per step: an int is a count, a float in (0, 1] a share of the image."""
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise UserError(f"step must be an int (pixels) or a float in (0, 1] (share), got {step!r}")
    if isinstance(step, int):
        if step < 1:
            raise UserError(f"step must be >= 1 pixel, got {step}")
        return min(step, n_pixels)
    if not 0.0 < step <= 1.0:
        raise UserError(f"step as a share of the image must be in (0, 1], got {step}")
    return max(1, round(step * n_pixels))


def trapezoid_auc(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under each row of ``curve`` (B, T) over the x values ``fractions`` (T,)."""
    widths = np.diff(fractions)
    return ((curve[:, 1:] + curve[:, :-1]) * 0.5 * widths).sum(axis=1)


def causal_curve(
    ctx: MetricContext,
    *,
    mode: Mode,
    step: int | float,
    substrate: str,
    substrate_options: dict | None,
    score: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The deletion or insertion curve (B, n+1) and its x axis, the fraction of pixels
    changed (n+1,)."""
    b, _, h, w = ctx.x.shape
    n_pixels = h * w
    per_step = pixels_per_step(step, n_pixels)
    n_steps = math.ceil(n_pixels / per_step)
    ranks, _ = region_ranks(ctx.maps.to(ctx.device), 1, "morf")  # pixel -> removal rank
    ranks = ranks[:, None]  # broadcast over channels
    perturb = get_perturbation(substrate, **(substrate_options or {}))
    gens = [ctx.generator(i, salt=f"{mode}:{substrate}") for i in range(b)]
    x = ctx.x
    filler = perturb(x, gens)
    # Deletion's step 0 and insertion's step n are the image itself: ctx.logits scores them.
    if mode == "deletion":
        ks = range(1, n_steps + 1)
    else:
        ks = range(0, n_steps)

    def stream():
        for k in ks:
            changed = ranks < k * per_step
            if mode == "deletion":
                yield torch.where(changed, filler, x)
            else:
                yield torch.where(changed, x, filler)

    logits = ctx.predict(stream())
    stepped = class_score(logits, ctx.target.repeat(n_steps), score).reshape(n_steps, b).T
    whole = class_score(ctx.logits, ctx.target, score)[:, None].to(stepped)
    parts = [whole, stepped] if mode == "deletion" else [stepped, whole]
    curve = torch.cat(parts, dim=1).double().cpu().numpy()
    fractions = np.minimum(np.arange(n_steps + 1) * per_step, n_pixels) / n_pixels
    return curve, fractions


def step_fits(options: dict, hw: tuple[int, int]) -> str:
    """Why ``step`` does not fit (H, W) images ("" if it does): it must be a pixel count or
    a share in (0, 1], and smaller than the image, or the curve has one step.

    >>> step_fits({"step": 1.5}, (8, 8))
    'step = 1.5: a share of the image must be in (0, 1]; give an int for a pixel count'
    >>> step_fits({"step": 64}, (8, 8))
    'step = 64 changes the whole 8x8 image at once, so every map would score alike; use a smaller step (e.g. 1/32)'
    """
    step, n_pixels = options["step"], hw[0] * hw[1]
    if isinstance(step, float) and not 0.0 < step <= 1.0:
        return (
            f"step = {step}: a share of the image must be in (0, 1]; give an int for a pixel count"
        )
    if pixels_per_step(step, n_pixels) < n_pixels:
        return ""
    return (
        f"step = {step} changes the whole {hw[0]}x{hw[1]} image at once, so every map would "
        "score alike; use a smaller step (e.g. 1/32)"
    )


def _causal_metric(mode: Mode, default_substrate: str):
    @fits_image(step_fits)
    def metric(
        ctx: MetricContext,
        *,
        step: Annotated[int | float, Range(0, open_min=True)] = 1 / 30,
        substrate: PerturbationName = default_substrate,
        substrate_options: SubstrateOptions = None,
        score: ClassScore = "probability",
    ) -> Scores:
        curve, fractions = causal_curve(
            ctx,
            mode=mode,
            step=step,
            substrate=substrate,
            substrate_options=substrate_options,
            score=score,
        )
        return Scores(values={"value": trapezoid_auc(curve, fractions)}, curves={mode: curve})

    metric.__name__ = metric.__qualname__ = mode
    return metric


deletion = METRICS.register(
    "deletion", kind="faithfulness", higher_is_better=False, version=2, scale_free=True
)(_causal_metric("deletion", "zero"))
deletion.__doc__ = (
    "Deletion (RISE): area under the class probability as the most relevant pixels are "
    "blacked out first (lower is better)."
)

insertion = METRICS.register(
    "insertion", kind="faithfulness", higher_is_better=True, version=2, scale_free=True
)(_causal_metric("insertion", "blur"))
insertion.__doc__ = (
    "Insertion (RISE): area under the class probability as the most relevant pixels are "
    "revealed first on a blurred image (higher is better)."
)
