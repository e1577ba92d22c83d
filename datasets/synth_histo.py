"""``synth-histo``: H&E-like patches with exact masks of the tumour nuclei.

Each patch (3 channels, default 64 x 64) is built in optical-density space and rendered by
Beer-Lambert, ``rgb = exp(-od)``: eosin (pink) stroma with wavy fibres, a few pale gaps, and
scattered small hematoxylin (purple) nuclei, with per-patch variation of the stain colours
and strengths. The stain vectors are the Ruifrok-Johnston H&E ones, jittered.

Positives (label 1, "tumour") carry ``clusters`` clusters (default 1; 2 or more for
multi-instance claims) of 4-7 enlarged, irregular, dark nuclei each. ``mask`` is the union
of those nuclei's supports (blobs, soft-edged with hard support, see ``datasets._draw``):
exactly the pixels the tumour changed, in every channel, because the nuclei add
hematoxylin density and every later step is strictly monotone (tests compare each positive
with the same patch generated without it). There is no ``organ_mask``.

Item i of a split depends only on (options, seed, split, i): a larger ``n`` keeps the
earlier items, and each item's background and lesion come from separate generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from cambench.benchmarks.core.checks import PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.datasets._draw import (
    DrawnSize,
    Shape,
    blobs,
    check_common,
    coordinate_grid,
    ellipses,
    item_generator,
    random_harmonics,
    smooth_noise,
)
from cambench.datasets.base import DATASETS, ArrayDataset

NAME = "synth-histo"
CLASS_NAMES = ("benign", "tumour")
DEFAULT_N = {"train": 1200, "val": 200, "test": 200}
DEFAULT_SIZE = 64
MAX_CLUSTERS = 4
_TAG = 2  # separates this dataset's random streams from the other generators'
# Optical density per unit of stain in (R, G, B) (Ruifrok & Johnston, 2001).
_HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
_EOSIN = np.array([0.072, 0.990, 0.105])


@dataclass(frozen=True)
class HistoOptions:
    """What shapes an item besides (seed, split, index)."""

    size: int = DEFAULT_SIZE
    clusters: int = 1


class HistoItem(NamedTuple):
    image: np.ndarray  # (3, H, W) float32 in (0, 1)
    mask: np.ndarray  # tumour nuclei, (H, W) bool


def _stain(rng: np.random.Generator, vector: np.ndarray) -> np.ndarray:
    """A jittered stain vector, unit length with every component positive (so added stain
    darkens every channel)."""
    jittered = np.abs(vector + rng.normal(0.0, 0.03, 3)) + 0.02
    return jittered / np.linalg.norm(jittered)


def _tissue(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Benign tissue: (hematoxylin, eosin) concentration maps and the per-channel density
    (H, W, 3) of everything that is neither stain (baseline and grain)."""
    shape, scale = (size, size), size / 64.0
    rows, cols = coordinate_grid(shape)
    theta, wavelength = rng.uniform(0, np.pi), rng.uniform(6.0, 10.0) * scale
    phase = 2 * np.pi * (
        cols * np.cos(theta) + rows * np.sin(theta)
    ) / wavelength + 3.0 * smooth_noise(rng, shape, cells=4)
    fibres = (0.5 + 0.5 * np.cos(phase)) ** 2
    eosin = rng.uniform(0.2, 0.32) + 0.22 * fibres + 0.06 * smooth_noise(rng, shape, cells=8)
    gaps = np.clip(2.0 * (smooth_noise(rng, shape, cells=4) - 1.2), 0.0, 1.0)  # pale spaces
    eosin = np.maximum(eosin, 0.0) * (1.0 - 0.8 * gaps)
    count = max(1, round(rng.uniform(16, 26) * scale**2))
    centers = rng.uniform(-2.0, size + 2.0, (count, 2))
    radii = rng.uniform(1.3, 2.1, (count, 2)) * scale
    nuclei = ellipses(
        shape,
        centers,
        radii,
        angles=rng.uniform(0, np.pi, count),
        values=rng.uniform(0.6, 0.95, count),
        edge=0.55,
    )
    # Clipped noise keeps every density positive (>= 0.01 and 0.0025), so rgb = exp(-density)
    # stays below 1 with no clip downstream that could hide a change.
    hematoxylin = (
        0.06 + 0.02 * np.clip(smooth_noise(rng, shape, cells=6), -2.5, 2.5) + nuclei.intensity
    )
    other = 0.04 + 0.015 * np.clip(rng.standard_normal((size, size, 3)), -2.5, 2.5)
    return hematoxylin, eosin, other


def _cluster_centres(
    rng: np.random.Generator, size: int, count: int, spread: float, gap: float
) -> np.ndarray:
    """``count`` centres inside [spread, size - spread], pairwise at least ``gap`` apart:
    rejection sampling, restarted from scratch when a draw leaves no room."""
    for _ in range(100):
        centres = [rng.uniform(spread, size - spread, 2)]
        for _ in range(50 * count):
            if len(centres) == count:
                return np.array(centres)
            c = rng.uniform(spread, size - spread, 2)
            if all(np.hypot(*(c - other)) >= gap for other in centres):
                centres.append(c)
        if len(centres) == count:
            return np.array(centres)
    raise AssertionError("cluster placement failed; MAX_CLUSTERS is too high for the geometry")


def _tumour(rng: np.random.Generator, size: int, clusters: int) -> Shape:
    """``clusters`` clusters of 4-7 enlarged, irregular, dark nuclei (hematoxylin density).

    Geometry at 64 px (all lengths scale with the size): nucleus radius 2.6-3.6 px, boundary
    within +-30 %, so its support radius is 1.8-4.7 px; nucleus centres within ``spread``
    = 4.5 px of the cluster centre. A cluster therefore fits in a disk of radius 9.2 px and
    any gap inside it is under 5.4 px, while cluster centres are >= 2 * 9.2 + 12 px apart:
    clusters are separate instances, at least 12 px from each other.
    """
    scale = size / 64.0
    spread, reach = 4.5 * scale, (4.5 + 3.6 * 1.3) * scale
    per_cluster = rng.integers(4, 8, clusters)
    centres = _cluster_centres(rng, size, clusters, spread, 2 * reach + 12 * scale)
    centres = np.repeat(centres, per_cluster, axis=0)
    n = len(centres)
    r, phi = spread * np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
    centres = centres + np.stack([r * np.sin(phi), r * np.cos(phi)], axis=1)
    return blobs(
        (size, size),
        centres,
        rng.uniform(2.6, 3.6, n) * scale,
        harmonics=random_harmonics(rng, n, irregularity=0.3),
        values=rng.uniform(1.0, 1.4, n),
        edge=0.5,
    )


def render(
    options: HistoOptions, seed: int, split: str, index: int, *, draw_lesion: bool = True
) -> HistoItem:
    """Item ``index`` of ``split``; ``draw_lesion=False`` gives the same patch without its
    tumour nuclei (every other random draw unchanged)."""
    label, size = index % 2, options.size
    background = item_generator(seed, _TAG, split, index, 0)
    h_vec, e_vec = _stain(background, _HEMATOXYLIN), _stain(background, _EOSIN)
    h_gain, e_gain = background.uniform(0.9, 1.15), background.uniform(0.85, 1.15)
    hematoxylin, eosin, other = _tissue(background, size)
    lesion = Shape(np.zeros((size, size)), np.zeros((size, size), dtype=bool))
    if label and draw_lesion:
        lesion = _tumour(item_generator(seed, _TAG, split, index, 1), size, options.clusters)
    density = (
        (hematoxylin + lesion.intensity)[..., None] * (h_gain * h_vec)
        + eosin[..., None] * (e_gain * e_vec)
        + other
    )
    image = np.exp(-density).transpose(2, 0, 1)
    return HistoItem(image.astype(np.float32), lesion.mask)


@DATASETS.register(
    NAME, source="synthetic", masks=True, organ_masks=False, how_to_get="generated from the seed"
)
def synth_histo(
    split: str,
    *,
    root: str | None = None,
    image_size: DrawnSize | None = None,
    seed: int = 0,
    n: PositiveInt | None = None,
    clusters: PositiveInt = 1,
) -> ArrayDataset:
    """H&E-like patches; tumour positives carry clusters of atypical nuclei (exact masks)."""
    size, count = check_common(
        NAME,
        split,
        seed=seed,
        image_size=image_size,
        n=n,
        default_size=DEFAULT_SIZE,
        default_n=DEFAULT_N,
    )
    if not isinstance(clusters, (int, np.integer)) or not 1 <= clusters <= MAX_CLUSTERS:
        raise UserError(
            f"{NAME}: clusters (tumour clusters per positive) must be an integer in 1..{MAX_CLUSTERS}, got {clusters!r}"
        )
    options = HistoOptions(size, int(clusters))
    items = [render(options, seed, split, i) for i in range(count)]
    return ArrayDataset(
        torch.from_numpy(np.stack([it.image for it in items])),
        torch.arange(count) % 2,
        [f"{NAME}/{split}/{i}" for i in range(count)],
        CLASS_NAMES,
        masks=torch.from_numpy(np.stack([it.mask for it in items])),
        name=NAME,
    )
