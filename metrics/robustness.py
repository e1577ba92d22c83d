"""Robustness of an explanation to small changes of the input: ``stability`` under a named
transform, and ``max_sensitivity`` (Yeh et al. 2019) under uniform L-inf noise.

``stability`` applies one transform T to every image (on the [0, 1] image scale), re-explains
T(x) for the same target with the method under test and compares that map with the original
map carried through the same geometric change (the map of the shifted image against the
shifted map; photometric transforms leave the map where it is). The comparison runs over the
region valid in both maps (a shift or a rotation brings in pixels that were not in the
image). A sample whose predicted class changes under T is not scored (NaN): its explanation
is then allowed to change. Transforms and their ``strength`` (default in brackets):

    noise       Gaussian noise, std ``strength`` [0.05], clipped to [0, 1]; seeded per sample
    shift       translation by ``strength`` pixels down and right [2] (negative: up-left),
                the uncovered border repeats the edge pixels
    rotation    rotation by ``strength`` degrees [10] about the image centre, bilinear,
                the corners brought in are black
    flip        horizontal flip (no strength)
    brightness  x + ``strength`` [0.1], clipped
    contrast    m + (1 + ``strength``) (x - m) [0.2], m the image's per-channel mean, clipped
    blur        Gaussian blur with sigma ``strength`` pixels [1.0]

``max_sensitivity`` follows Quantus ``MaxSensitivity`` with its defaults for the norms and the
noise: for n_samples draws d uniform in [-r, r] per pixel (not clipped, as Quantus),

    max_d ||map(x + d) - map(x)||_F / ||map(x)||_F

with map(x) the map being evaluated (``ctx.maps``) and the same target. Lower is better. An
all-zero map(x) has no relative sensitivity and is not scored (NaN). With ``skip_changed`` a
draw that changes the predicted class does not count and the maximum runs over the others
(NaN if every draw changed it); Quantus' ``return_nan_when_prediction_changes`` instead
makes the whole sample NaN as soon as one draw changes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F

from cambench.benchmarks.core.checks import (
    NonNegativeFloat,
    OneOf,
    PositiveFloat,
    PositiveInt,
    Range,
)
from cambench.benchmarks.core.errors import NotApplicable, UserError
from cambench.metrics._similarity import (
    SIMILARITIES,
    spearman,
    ssim,
    ssim_or_nan,
    topk_intersection,
)
from cambench.metrics.base import METRICS, MetricContext, Scores, rebatch
from cambench.metrics.perturbations import blur


def require_explainer(ctx: MetricContext, metric: str) -> Callable[..., torch.Tensor]:
    """``ctx.explain``, or ``NotApplicable`` when the context cannot re-explain."""
    if ctx.explain is None:
        raise NotApplicable(
            f"{metric} re-explains inputs and needs ctx.explain (the method under test)"
        )
    return ctx.explain


def explain_batched(
    ctx: MetricContext, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Maps (N, H, W) of the method under test for N inputs, explained ``ctx.batch_size`` at a time."""
    explain = require_explainer(ctx, "this metric")
    maps = []
    for xs, ts in zip(rebatch([x], ctx.batch_size), rebatch([target], ctx.batch_size), strict=True):
        maps.append(explain(model, xs, ts).detach().float())
    return (
        torch.cat(maps).to(ctx.device) if maps else torch.empty(0, *x.shape[-2:], device=ctx.device)
    )


def predicted(ctx: MetricContext, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes (N,) of ``ctx.model`` for N inputs, forwards under inference mode."""
    return ctx.predict([x]).argmax(dim=1)


# --- transforms: pure functions (x, generators, strength) -> Transformed --------------------


@dataclass
class Transformed:
    """A transformed batch, the same change applied to maps, and the region valid in both."""

    x: torch.Tensor
    warp: Callable[[torch.Tensor], torch.Tensor]  # (B, H, W) map of x -> map in T(x)'s frame
    valid: torch.Tensor | None = None  # (H, W) bool, None: every pixel


def _same(maps: torch.Tensor) -> torch.Tensor:
    return maps


def noise(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    eps = torch.stack(
        [torch.randn(tuple(img.shape), generator=g) for img, g in zip(x, gens, strict=True)]
    )
    return Transformed((x + float(strength) * eps.to(x)).clamp(0, 1), _same)


def _shift_tensor(t: torch.Tensor, s: int) -> torch.Tensor:
    """Translate the last two dims by s pixels (down-right for s > 0), repeating the edge."""
    h, w = t.shape[-2:]
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, h, w)
    if s >= 0:
        out = F.pad(flat, (s, 0, s, 0), mode="replicate")[..., :h, :w]
    else:
        out = F.pad(flat, (0, -s, 0, -s), mode="replicate")[..., -s:, -s:]
    return out.reshape(*lead, h, w)


def shift(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    s = int(strength)
    if s != strength or 2 * abs(s) >= min(x.shape[-2:]):
        raise UserError(
            f"shift strength must be a whole number of pixels below half the image size, got {strength}"
        )
    valid = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
    if s >= 0:
        valid[s:, s:] = True
    else:
        valid[:s, :s] = True
    return Transformed(_shift_tensor(x, s), lambda maps: _shift_tensor(maps, s), valid)


def _rotation_grid(shape: tuple[int, ...], degrees: float, device: torch.device) -> torch.Tensor:
    b, _, h, w = shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # Rotation in pixel units, written in affine_grid's [-1, 1] coordinates (aspect-corrected).
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], device=device)
    return F.affine_grid(theta.expand(b, 2, 3), [b, 1, h, w], align_corners=False)


def rotation(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    degrees = float(strength)
    if not abs(degrees) < 90:
        raise UserError(f"rotation strength is an angle in degrees below 90, got {strength}")

    def rotate(t: torch.Tensor) -> torch.Tensor:
        grid = _rotation_grid((t.shape[0], 1, *t.shape[-2:]), degrees, t.device).to(t.dtype)
        return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    ones = torch.ones(1, 1, *x.shape[-2:], device=x.device, dtype=torch.float64)
    # Valid: every bilinear tap of the output pixel falls inside the image.
    valid = rotate(ones)[0, 0] > 1 - 1e-9
    return Transformed(rotate(x), lambda maps: rotate(maps[:, None])[:, 0], valid)


def flip(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    return Transformed(x.flip(-1), lambda maps: maps.flip(-1))


def brightness(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    return Transformed((x + float(strength)).clamp(0, 1), _same)


def contrast(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    m = x.mean(dim=(2, 3), keepdim=True)
    return Transformed((m + (1 + float(strength)) * (x - m)).clamp(0, 1), _same)


def blurred(x: torch.Tensor, gens: list[torch.Generator], strength: float) -> Transformed:
    if not float(strength) > 0:
        raise UserError(f"blur strength is a sigma in pixels > 0, got {strength}")
    return Transformed(blur(x, gens, sigma=float(strength)), _same)


TRANSFORMS: dict[str, tuple[Callable[..., Transformed], float | None]] = {
    "noise": (noise, 0.05),
    "shift": (shift, 2),
    "rotation": (rotation, 10.0),
    "flip": (flip, None),
    "brightness": (brightness, 0.1),
    "contrast": (contrast, 0.2),
    "blur": (blurred, 1.0),
}


def apply_transform(
    ctx: MetricContext, transform: str, strength: float | None = None
) -> Transformed:
    """The named transform of ``ctx.x`` (seeded per sample for random ones)."""
    if transform not in TRANSFORMS:
        raise UserError(f"unknown transform {transform!r}; choose from {', '.join(TRANSFORMS)}")
    fn, default = TRANSFORMS[transform]
    gens = [ctx.generator(i, salt=f"stability:{transform}") for i in range(len(ctx.ids))]
    return fn(ctx.x, gens, default if strength is None else strength)


@METRICS.register(
    "stability",
    kind="robustness",
    higher_is_better=True,
    needs=("explainer",),
    secondary=(("spearman", True), ("ssim", True), ("topk", True), ("prediction_kept", True)),
)
def stability(
    ctx: MetricContext,
    *,
    transform: Annotated[str, OneOf(TRANSFORMS)] = "noise",
    strength: NonNegativeFloat | None = None,
    similarity: Annotated[str, OneOf(SIMILARITIES)] = "spearman",
    k: Annotated[float | int, Range(0, open_min=True)] = 0.1,
) -> Scores:
    """Similarity of the map of T(x) to the map of x carried through T, where the prediction holds.

    ``value`` is the ``similarity`` chosen ("spearman", "ssim" or "topk" with ``k`` a pixel
    count or a fraction); all three are also returned, NaN where the prediction changed, and
    ``prediction_kept`` (1 or 0) for every sample.
    """
    if similarity not in SIMILARITIES:
        raise UserError(f"unknown similarity {similarity!r}; choose from {', '.join(SIMILARITIES)}")
    require_explainer(ctx, "stability")
    t = apply_transform(ctx, transform, strength)
    kept = predicted(ctx, t.x) == ctx.logits.argmax(dim=1)
    new_maps = explain_batched(ctx, ctx.model, t.x, ctx.target)
    ref = t.warp(ctx.maps.to(ctx.device).float())
    sims = {
        "spearman": spearman(new_maps, ref, valid=t.valid),
        "ssim": (ssim if similarity == "ssim" else ssim_or_nan)(new_maps, ref, valid=t.valid),
        "topk": topk_intersection(new_maps, ref, k=k, valid=t.valid),
    }
    drop = ~kept.cpu().numpy()
    values = {name: np.where(drop, np.nan, v.cpu().numpy()) for name, v in sims.items()}
    return Scores(
        values={
            "value": values[similarity],
            **values,
            "prediction_kept": (~drop).astype(np.float64),
        },
        unscored=f"the predicted class changed under the {transform} transform",
    )


def linf_uniform_deltas(
    ctx: MetricContext, *, n_samples: int, radius: float
) -> Iterator[torch.Tensor]:
    """``n_samples`` perturbations (B, C, H, W), one after the other, uniform in
    [-radius, radius] per pixel; each image draws from its own seeded stream, so it gets the
    same draws whatever batch it is in."""
    gens = [ctx.generator(i, salt="max_sensitivity") for i in range(ctx.x.shape[0])]
    shape = tuple(ctx.x.shape[1:])
    for _ in range(n_samples):
        draws = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in gens])
        yield ((draws * 2 - 1) * radius).to(ctx.x)


@METRICS.register(
    "max_sensitivity",
    aliases=("max-sensitivity",),
    kind="robustness",
    higher_is_better=False,
    needs=("explainer",),
)
def max_sensitivity(
    ctx: MetricContext,
    *,
    radius: PositiveFloat = 0.05,
    n_samples: PositiveInt = 10,
    skip_changed: bool = False,
) -> Scores:
    """Max-Sensitivity (Yeh et al. 2019): max over uniform L-inf noise of the relative change
    of the map, ||map(x+d) - map(x)||_F / ||map(x)||_F (Quantus ``MaxSensitivity``)."""
    require_explainer(ctx, "max_sensitivity")
    if n_samples < 1:
        raise UserError(f"n_samples must be >= 1, got {n_samples}")
    if not radius >= 0:
        raise UserError(f"radius must be >= 0, got {radius}")
    base = ctx.maps.to(ctx.device).double().flatten(1)
    denom = base.norm(dim=1)
    label = ctx.logits.argmax(dim=1).to(ctx.device)
    ratios = []
    # One draw at a time: memory stays at one perturbed batch whatever n_samples is.
    for delta in linf_uniform_deltas(ctx, n_samples=n_samples, radius=radius):
        x_pert = ctx.x + delta
        maps = explain_batched(ctx, ctx.model, x_pert, ctx.target).double().flatten(1)
        ratio = (maps - base).norm(dim=1) / denom.clamp_min(1e-300)
        if skip_changed:
            ratio = torch.where(
                predicted(ctx, x_pert) != label, torch.full_like(ratio, float("nan")), ratio
            )
        ratios.append(ratio)
    ratio = torch.stack(ratios)  # (n_samples, B)
    value = np.fmax.reduce(ratio.cpu().numpy(), axis=0)  # ignores NaN draws; all NaN -> NaN
    value = np.where(denom.reshape(-1).cpu().numpy() > 0, value, np.nan)
    why = "the map is all zero (no relative change)"
    if skip_changed:
        why += ", or every draw changed the predicted class"
    return Scores(values={"value": value}, unscored=why)
