"""Localization metrics: does the explanation point at the annotated region?

Each metric compares the maps (B, H, W) with a ground-truth region, the lesion masks
``ctx.masks`` or, for ``organ_mass``, the organ masks ``ctx.organ_masks`` (B, H, W; any
non-zero value is inside). The pure per-batch computations are the public functions below;
the registered metrics are thin wrappers that fetch the masks and return ``Scores``.

Which samples are scored:

- No masks in the context (the dataset has none): the metric raises ``NotApplicable``.
- An image whose mask is empty (a "normal" image without a lesion) has no region to point
  at: its score is NaN, which the runner drops and counts. The other samples of the batch
  are scored as usual.
- Any map, including an all-zero or constant one, gives a finite score on a non-empty mask.

Metrics (higher is better for all):

- ``pointing_game``: 1.0 if the map's maximum lies inside the mask, else 0.0; no tolerance
  margin. Ties (several pixels share the maximum): ``ties="share"`` (default) scores the
  share of the maximal pixels inside the mask, the expected hit of pointing at one of them
  at random: fair to blocky maps (occlusion's windows tie over whole blocks; "all" scored
  them about 0 by construction, 0.01 against random's 0.32 on lung masks), and a constant
  map scores the mask's area fraction, the game's chance level. ``ties="all"`` hits only
  if every maximal pixel is inside; ``ties="any"`` hits if one of them is inside, the rule
  of Quantus ``PointingGame``. For maps without ties the three rules agree.
- ``energy_pointing_game``: share of the map's positive mass inside the mask,
  sum(relu(map) * mask) / sum(relu(map)) (Wang et al. 2020, Score-CAM; Quantus
  ``RelevanceMassAccuracy`` on relu'd maps); 0 for a map without positive mass.
- ``iou``, ``dice``: overlap of the binarized map with the mask; option ``threshold`` is
  "otsu" (default; the rule of Saporta et al. 2022 for chest X-ray saliency) or a fraction
  of the map's maximum such as 0.15 (Grad-CAM's localization). A suite names the entry twice
  with different thresholds to get both. See ``metrics._binarize``.
- ``auprc``: average precision of the map's values as pixel scores for the mask
  (``sklearn.metrics.average_precision_score`` semantics: tied values form one threshold).
  Threshold-free; chance level is the mask's area fraction.
- ``organ_mass``: ``energy_pointing_game`` against the organ masks ("does it look at the
  lungs").
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from cambench.benchmarks.core.errors import NotApplicable, UserError
from cambench.metrics._binarize import Threshold, binarize
from cambench.metrics.base import METRICS, MetricContext, Scores

Ties = Literal["share", "all", "any"]


# ---------------------------------------------------------------------------------------
# Pure computations on (B, H, W) maps and masks -> (B,) float64, NaN where the mask is empty


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor, *, ties: Ties = "share") -> torch.Tensor:
    """1.0 where the map's maximum lies inside the mask, 0.0 elsewhere, NaN for empty masks;
    tied maxima by ``ties`` (see the module docstring)."""
    if ties not in ("share", "all", "any"):
        raise UserError(f"ties must be 'share', 'all' or 'any', got {ties!r}")
    flat, inside = _flatten(maps, masks)
    is_max = flat == flat.amax(dim=1, keepdim=True)
    if ties == "share":
        share = (is_max & inside).sum(dim=1).double() / is_max.sum(dim=1).double()
        return _nan_where_empty(share, inside)
    if ties == "any":
        hit = (is_max & inside).any(dim=1)
    else:
        hit = (~is_max | inside).all(dim=1)
    return _nan_where_empty(hit.double(), inside)


def mass_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the maps' positive mass inside the masks; 0 without positive mass."""
    flat, inside = _flatten(maps, masks)
    positive = flat.clamp_min(0.0)
    total = positive.sum(dim=1)
    within = (positive * inside).sum(dim=1)
    share = torch.where(total > 0, within / total.clamp_min(1e-300), torch.zeros_like(total))
    return _nan_where_empty(share, inside)


def overlap(
    maps: torch.Tensor, masks: torch.Tensor, *, threshold: Threshold = "otsu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, Dice) of the binarized maps with the masks (see ``metrics._binarize``)."""
    pred = binarize(maps, threshold).reshape(maps.shape[0], -1)
    _, inside = _flatten(maps, masks)
    inter = (pred & inside).sum(dim=1).double()
    union = (pred | inside).sum(dim=1).double()
    sizes = (pred.sum(dim=1) + inside.sum(dim=1)).double()
    # A non-empty mask makes union and sizes positive; empty masks become NaN below.
    iou = inter / union.clamp_min(1)
    dice = 2 * inter / sizes.clamp_min(1)
    return _nan_where_empty(iou, inside), _nan_where_empty(dice, inside)


def average_precision(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average precision of each map's pixel values as scores for its mask.

    AP = sum over distinct thresholds t of (R(t) - R(t_prev)) * P(t), as
    ``sklearn.metrics.average_precision_score``: every positive pixel contributes the
    precision at the lowest-ranked pixel of its group of tied scores, divided by the
    number of positives.
    """
    _, inside = _flatten(maps, masks)
    # Sort the maps in their own dtype so ties are the ties sklearn sees in the same array.
    scores, order = maps.reshape(maps.shape[0], -1).sort(dim=1, descending=True)
    labels = inside.gather(1, order).double()
    n = scores.shape[1]
    ranks = torch.arange(1, n + 1, device=scores.device, dtype=torch.float64)
    precision = labels.cumsum(dim=1) / ranks
    group_end = torch.ones_like(scores, dtype=torch.bool)
    group_end[:, :-1] = scores[:, :-1] != scores[:, 1:]
    # Index of each pixel's group end: the first group end at or after it (reverse cummin).
    positions = torch.arange(n, device=scores.device).expand_as(scores)
    end_at = torch.where(group_end, positions, torch.full_like(positions, n))
    end_index = end_at.flip(1).cummin(dim=1).values.flip(1)
    precision_at_end = precision.gather(1, end_index)
    positives = labels.sum(dim=1)
    ap = (labels * precision_at_end).sum(dim=1) / positives.clamp_min(1)
    return _nan_where_empty(ap, inside)


def _flatten(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H*W) float64 maps and bool masks, after checking their shapes and values."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks {tuple(masks.shape)} must have the maps' shape {tuple(maps.shape)}; "
            "resize the masks to the input resolution (nearest neighbour) in the dataset"
        )
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf; methods must return finite maps")
    b = maps.shape[0]
    return maps.reshape(b, -1).double(), masks.reshape(b, -1).to(maps.device) != 0


def _nan_where_empty(values: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    return torch.where(inside.any(dim=1), values, torch.full_like(values, float("nan")))


# ---------------------------------------------------------------------------------------
# Registered metrics


def _masks(ctx: MetricContext, which: str = "masks") -> torch.Tensor:
    masks = getattr(ctx, which)
    if masks is None:
        kind = "lesion" if which == "masks" else "organ"
        raise NotApplicable(f"the dataset provides no {kind} masks ({which}) to localize against")
    return masks


def _scores(value: torch.Tensor, which: str = "masks") -> Scores:
    kind = "lesion" if which == "masks" else "organ"
    return Scores(
        values={"value": value.detach().cpu().numpy().astype(np.float64)},
        unscored=f"the {kind} mask is empty (nothing to localize, e.g. a normal image)",
    )


@METRICS.register(
    "pointing_game",
    kind="localization",
    higher_is_better=True,
    needs=("masks",),
    version=2,
    scale_free=True,
)
def pointing_game(ctx: MetricContext, *, ties: Ties = "share") -> Scores:
    """Pointing game: 1 if the map's maximum lies in the lesion mask, else 0 (tied maxima:
    the share inside)."""
    return _scores(pointing_hits(ctx.maps, _masks(ctx), ties=ties))


@METRICS.register(
    "energy_pointing_game",
    kind="localization",
    higher_is_better=True,
    needs=("masks",),
    scale_free=True,
)
def energy_pointing_game(ctx: MetricContext) -> Scores:
    """Energy pointing game: share of the map's positive mass inside the lesion mask."""
    return _scores(mass_share(ctx.maps, _masks(ctx)))


@METRICS.register(
    "iou", kind="localization", higher_is_better=True, needs=("masks",), scale_free=True
)
def iou(ctx: MetricContext, *, threshold: Threshold = "otsu") -> Scores:
    """IoU of the binarized map (Otsu or a fraction of the max) with the lesion mask."""
    return _scores(overlap(ctx.maps, _masks(ctx), threshold=threshold)[0])


@METRICS.register(
    "dice", kind="localization", higher_is_better=True, needs=("masks",), scale_free=True
)
def dice(ctx: MetricContext, *, threshold: Threshold = "otsu") -> Scores:
    """Dice of the binarized map (Otsu or a fraction of the max) with the lesion mask."""
    return _scores(overlap(ctx.maps, _masks(ctx), threshold=threshold)[1])


@METRICS.register(
    "auprc", kind="localization", higher_is_better=True, needs=("masks",), scale_free=True
)
def auprc(ctx: MetricContext) -> Scores:
    """Pixel average precision of the map as a score for the lesion mask."""
    return _scores(average_precision(ctx.maps, _masks(ctx)))


@METRICS.register(
    "organ_mass",
    kind="localization",
    higher_is_better=True,
    needs=("organ_masks",),
    scale_free=True,
)
def organ_mass(ctx: MetricContext) -> Scores:
    """Share of the map's positive mass inside the organ mask (e.g. the lungs)."""
    return _scores(mass_share(ctx.maps, _masks(ctx, "organ_masks")), "organ_masks")
