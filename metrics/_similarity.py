"""Similarity of two batches of explanation maps, one number per sample: batched torch
functions (B, H, W) x (B, H, W) -> (B,) float64, for the robustness, sanity and adversarial
metrics.

- ``spearman``: Spearman rank correlation over pixels, ties ranked by their average rank
  (``scipy.stats.spearmanr``).
- ``ssim``: mean structural similarity (Wang et al. 2004) of the min-max normalised maps with
  a Gaussian window (sigma 1.5, 11 x 11, population covariances), as
  ``skimage.metrics.structural_similarity(a, b, data_range=1, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False)`` computes it.
- ``topk_intersection``: share of the k most relevant pixels of one map that are also among
  the k most relevant of the other (Ghorbani et al. 2019).
- ``center_of_mass_distance``: Euclidean distance in pixels between the maps' centres of mass.

Every function takes an optional ``valid`` (H, W) bool mask shared by the batch (the region
valid in both maps after a shift or a rotation) and compares the maps there only.

Degenerate maps have a fixed, documented value instead of NaN: two constant maps (on the
valid region) have Spearman 1, a constant map and a varying one 0 (a constant map carries no
ranking); a constant map min-max normalises to all zeros for SSIM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cambench.benchmarks.core.errors import UserError


def _check(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None) -> None:
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(
            f"maps must be two (B, H, W) tensors of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if valid is not None and (
        valid.dtype != torch.bool or tuple(valid.shape) != tuple(a.shape[1:])
    ):
        raise ValueError(
            f"valid must be an (H, W) bool mask matching the maps, got {tuple(valid.shape)} {valid.dtype}"
        )


def _flat(maps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, N) float64 values of the valid pixels of each map."""
    flat = maps.reshape(maps.shape[0], -1).double()
    if valid is None:
        return flat
    return flat[:, valid.reshape(-1).to(flat.device)]


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (1..N) of each row of (B, N) values, ties given their average rank, as
    ``scipy.stats.rankdata(method="average")`` per row."""
    b, n = values.shape
    sorted_vals, order = torch.sort(values, dim=1, stable=True)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # tie-group id of each sorted position
    position = torch.arange(1, n + 1, dtype=torch.float64, device=values.device).expand(b, n)
    total = torch.zeros(b, n, dtype=torch.float64, device=values.device).scatter_add_(
        1, group, position
    )
    count = torch.zeros(b, n, dtype=torch.float64, device=values.device).scatter_add_(
        1, group, torch.ones_like(position)
    )
    mean_rank = (total / count.clamp_min(1)).gather(1, group)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def _pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    sx, sy = xc.square().sum(dim=1), yc.square().sum(dim=1)
    r = (xc * yc).sum(dim=1) / (sx * sy).sqrt().clamp_min(1e-300)
    constant_x, constant_y = sx == 0, sy == 0
    # A constant map has no ranking: 1 against another constant map, 0 against anything else.
    r = torch.where(constant_x | constant_y, (constant_x & constant_y).double(), r)
    return r.clamp(-1.0, 1.0)


def spearman(
    a: torch.Tensor, b: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps over their (valid) pixels, (B,).

    >>> a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    >>> spearman(a, a ** 3).item(), spearman(a, -a).item()
    (1.0, -1.0)
    """
    _check(a, b, valid)
    return _pearson_rows(average_ranks(_flat(a, valid)), average_ranks(_flat(b, valid)))


def topk_intersection(
    a: torch.Tensor, b: torch.Tensor, *, k: float | int = 0.1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of the top-k pixels of ``a`` that are also top-k pixels of ``b``, (B,) in [0, 1].

    ``k``: a number of pixels (int >= 1) or a fraction of the valid pixels (float in (0, 1]),
    rounded to at least one pixel. Ties are broken in raster order (the earlier pixel ranks
    higher), so the answer is deterministic.

    >>> a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    >>> b = torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])
    >>> topk_intersection(a, b, k=2).item()
    0.5
    """
    _check(a, b, valid)
    fa, fb = _flat(a, valid), _flat(b, valid)
    count = resolve_k(k, fa.shape[1])
    top_a = torch.sort(-fa, dim=1, stable=True).indices[:, :count]
    top_b = torch.sort(-fb, dim=1, stable=True).indices[:, :count]
    in_a = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, top_a, True)
    shared = in_a.gather(1, top_b).sum(dim=1)
    return shared.double() / count


def resolve_k(k: float | int, n: int) -> int:
    """A top-k size as a pixel count in [1, n]: ints are counts, floats in (0, 1] fractions."""
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise UserError(f"k must be a pixel count (int) or a fraction in (0, 1] (float), got {k!r}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise UserError(
                f"k as a fraction must be in (0, 1], got {k}; pass an int for a pixel count"
            )
        return max(1, min(n, int(round(k * n))))
    if k < 1:
        raise UserError(f"k must be at least one pixel, got {k}")
    return min(n, k)


def center_of_mass(maps: torch.Tensor, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Centre of mass (row, col) in pixels of the positive part of each map, (B, 2) float64.

    Only positive values weigh (higher means more relevant; a negative value is not mass).
    A map with no positive mass has its centre at the image centre.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    _, h, w = maps.shape
    mass = maps.double().clamp_min(0)
    if valid is not None:
        mass = mass * valid.to(mass.device)
    rows = torch.arange(h, dtype=torch.float64, device=maps.device)
    cols = torch.arange(w, dtype=torch.float64, device=maps.device)
    total = mass.sum(dim=(1, 2))
    safe = total.clamp_min(1e-300)
    r = (mass.sum(dim=2) * rows).sum(dim=1) / safe
    c = (mass.sum(dim=1) * cols).sum(dim=1) / safe
    empty = total <= 0
    r = torch.where(empty, torch.full_like(r, (h - 1) / 2), r)
    c = torch.where(empty, torch.full_like(c, (w - 1) / 2), c)
    return torch.stack([r, c], dim=1)


def center_of_mass_distance(
    a: torch.Tensor, b: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of mass of each pair of maps, (B,).

    >>> a = torch.zeros(1, 5, 5); b = torch.zeros(1, 5, 5)
    >>> a[0, 1, 1] = 1.0; b[0, 4, 5 - 1] = 2.0
    >>> center_of_mass_distance(a, b).item()
    4.242640687119285
    """
    _check(a, b, valid)
    return (center_of_mass(a, valid=valid) - center_of_mass(b, valid=valid)).norm(dim=1)


def minmax_normalize(maps: torch.Tensor, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each map rescaled to [0, 1] by its (valid-region) min and max, float64; constant -> 0."""
    x = maps.double()
    flat = _flat(maps, valid)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-300), torch.zeros_like(x))


def _gaussian_window(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter's kernel, which skimage uses: radius int(truncate*sigma+0.5).
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
    normalize: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean SSIM of each pair of maps, (B,), with a Gaussian window.

    Maps are min-max normalised to [0, 1] first (``normalize``; data range 1). Local means,
    variances and covariance are Gaussian-weighted over windows of radius
    ``int(truncate * sigma + 0.5)``; the mean runs over the positions whose whole window lies
    in the image, and in ``valid`` when given, which is the part skimage keeps (it crops the
    window radius from every border).
    """
    _check(a, b, valid)
    if normalize:
        a, b = minmax_normalize(a, valid=valid), minmax_normalize(b, valid=valid)
    else:
        a, b = a.double(), b.double()
    k = _gaussian_window(sigma, truncate, a.device)
    size = k.numel()
    h, w = a.shape[1:]
    if h < size or w < size:
        raise UserError(
            f"maps of {h}x{w} pixels are smaller than the {size}x{size} SSIM window; "
            f"use a smaller sigma (now {sigma}) or larger images"
        )
    window = (k[:, None] * k[None, :])[None, None]

    def smooth(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t[:, None], window)[:, 0]  # "valid" positions only: no padding rule needed

    c1, c2 = k1**2, k2**2  # data range 1
    mu_a, mu_b = smooth(a), smooth(b)
    var_a = smooth(a * a) - mu_a * mu_a
    var_b = smooth(b * b) - mu_b * mu_b
    cov = smooth(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    if valid is None:
        return s.mean(dim=(1, 2))
    inside = (
        F.conv2d(valid.double().to(a.device)[None, None], torch.ones_like(window))[0, 0]
        >= size * size - 0.5
    )
    if not bool(inside.any()):
        raise UserError(
            f"the valid region is too small for the {size}x{size} SSIM window; use a smaller "
            "transform strength or a smaller sigma"
        )
    return s[:, inside].mean(dim=1)


def ssim_or_nan(
    a: torch.Tensor, b: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``ssim`` where the maps hold at least one window, NaN (not scored) otherwise: for a
    secondary output that must not fail a metric on small images."""
    try:
        return ssim(a, b, valid=valid)
    except UserError:
        return torch.full((a.shape[0],), float("nan"), dtype=torch.float64, device=a.device)


SIMILARITIES = ("spearman", "ssim", "topk")


def similarity(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    k: float | int = 0.1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The named similarity ("spearman", "ssim" or "topk") of each pair of maps, (B,)."""
    if name == "spearman":
        return spearman(a, b, valid=valid)
    if name == "ssim":
        return ssim(a, b, valid=valid)
    if name == "topk":
        return topk_intersection(a, b, k=k, valid=valid)
    raise UserError(f"unknown similarity {name!r}; choose from {', '.join(SIMILARITIES)}")
