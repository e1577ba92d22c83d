"""Binarize explanation maps for overlap metrics (IoU, Dice): per-sample thresholds on
(B, H, W) tensors, computed in one vectorised pass over the batch.

Two rules, both pure functions:

- ``otsu_threshold``: Otsu's threshold of each map, the same histogram (256 bins over the
  map's own [min, max]) and the same tie rule as ``skimage.filters.threshold_otsu``; it is
  the rule Saporta et al. (2022, Nature Machine Intelligence) used to segment chest X-ray
  saliency maps. Scale- and shift-invariant.
- ``fraction_of_max_threshold``: a fraction of the map's maximum, e.g. 0.15 as in the
  localization experiments of Grad-CAM (Selvaraju et al. 2017).

A pixel is foreground when its value is strictly above the threshold (skimage's
``image > threshold``), so a constant or all-zero map binarizes to an empty region
instead of claiming the whole image.
"""

from __future__ import annotations

import torch

from cambench.benchmarks.core.errors import UserError

Threshold = str | float


def otsu_threshold(maps: torch.Tensor, *, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each map in a (B, H, W) batch, as a (B,) float64 tensor.

    Matches ``skimage.filters.threshold_otsu(map, nbins=bins)`` per map: histogram of
    ``bins`` equal bins over the map's [min, max], threshold at the centre of the bin that
    maximises the between-class variance (the first such bin on ties). A constant map's
    threshold is its value.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    flat = maps.reshape(maps.shape[0], -1).double()
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    span = hi - lo
    constant = span[:, 0] == 0
    steps = torch.arange(bins + 1, device=flat.device, dtype=torch.float64)
    edges = lo + steps * (span / bins)
    edges[:, -1] = hi[:, 0]  # as np.linspace: the last edge is exactly the maximum
    # Bin index as numpy's histogram computes it, including its corrections for values that
    # rounding put on the wrong side of an edge, so the counts match numpy's.
    scale = torch.where(constant[:, None], torch.zeros_like(span), bins / span.clamp_min(1e-300))
    idx = ((flat - lo) * scale).long().clamp_(0, bins - 1)
    idx = idx - (flat < edges.gather(1, idx)).long()
    idx = idx + ((flat >= edges.gather(1, idx + 1)) & (idx != bins - 1)).long()
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(1, idx, torch.ones_like(flat))
    centers = (edges[:, :-1] + edges[:, 1:]) / 2

    # The first bin holds the minimum and the last the maximum, so these weights are >= 1
    # wherever they are used; clamping only avoids 0/0 in the constant case (replaced below).
    weighted = counts * centers
    w1 = counts.cumsum(dim=1)
    w2 = counts.flip(1).cumsum(dim=1).flip(1)
    m1 = weighted.cumsum(dim=1) / w1.clamp_min(1)
    m2 = weighted.flip(1).cumsum(dim=1).flip(1) / w2.clamp_min(1)
    between = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    best = between.argmax(dim=1, keepdim=True)  # first maximum on ties, as np.argmax
    threshold = centers.gather(1, best)[:, 0]
    return torch.where(constant, lo[:, 0], threshold)


def fraction_of_max_threshold(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """``fraction`` times each map's maximum, as a (B,) float64 tensor.

    A map without positive values gets threshold 0, so nothing in it is foreground.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    peak = maps.reshape(maps.shape[0], -1).double().amax(dim=1).clamp_min(0.0)
    return fraction * peak


def binarize(maps: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Foreground (B, H, W) bool of each map: values strictly above its threshold.

    threshold: "otsu", or a float in [0, 1) read as a fraction of each map's maximum.
    """
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise UserError(
                f"threshold must be 'otsu' or a fraction of the map's maximum in [0, 1) "
                f"such as 0.15, got {threshold!r}"
            )
        cut = otsu_threshold(maps)
    elif isinstance(threshold, int | float) and not isinstance(threshold, bool):
        if not 0.0 <= threshold < 1.0:
            raise UserError(
                f"threshold as a number is a fraction of the map's maximum and must be in "
                f"[0, 1), e.g. 0.15; got {threshold}"
            )
        cut = fraction_of_max_threshold(maps, float(threshold))
    else:
        raise UserError(
            f"threshold must be 'otsu' or a float in [0, 1), got {type(threshold).__name__} "
            f"{threshold!r}"
        )
    return maps.double() > cut[:, None, None]
