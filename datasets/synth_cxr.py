"""``synth-cxr``: chest-radiograph phantoms with exact opacity, lung and confounder masks.

Each image (1 channel, default 64 x 64) is a bright thorax on a dark background, two dark
lung fields, a vertical spine, a heart shadow, curved ribs across the lungs, smooth noise
and film grain, with per-image variation of size, position and contrast. ``organ_mask`` is
the two lung fields.

Positives (label 1, "opacity") carry 1 to ``n_opacities`` opacities: bright irregular
blobs, soft-edged with hard support (a Gaussian profile truncated at 30 % of its peak, see
``datasets._draw``), clipped to the lungs. ``mask`` is the union of their supports, which is
exactly the set of pixels the opacities changed: everything is added before one strictly
increasing soft clip, so no saturated pixel hides a change (tests compare each positive
with the same item generated with the lesion switched off).

Confounder: a bright "L" marker in a top corner, present on positives with probability
``confounder_rate`` and on negatives with probability ``confounder_negative_rate`` (both 0
by default: no marker). ``confounder_rate=0.9`` makes the marker a shortcut a model can
learn (marker => opacity); add ``confounder_negative_rate=0.1`` for a symmetric one, or set
both equal to decouple it from the label. Items carry ``confounder`` (bool, the marker is
present) and ``confounder_mask`` (the marker's pixels, exactly the pixels it changed).

Item i of a split depends only on (options, seed, split, i): a larger ``n`` keeps the
earlier items, and each item's background, lesion and marker come from separate generators.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

from cambench.benchmarks.core.checks import Fraction, PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.datasets._draw import (
    DrawnSize,
    Shape,
    blobs,
    check_common,
    combine,
    curved_bands,
    ellipse,
    ellipses,
    item_generator,
    random_harmonics,
    rectangle,
    segment,
    smooth_noise,
    soft_clip,
)
from cambench.datasets.base import DATASETS, ArrayDataset

NAME = "synth-cxr"
CLASS_NAMES = ("normal", "opacity")
DEFAULT_N = {"train": 1200, "val": 200, "test": 200}
DEFAULT_SIZE = 64
_TAG = 1  # separates this dataset's random streams from the other generators'


@dataclass(frozen=True)
class CxrOptions:
    """What shapes an item besides (seed, split, index)."""

    size: int = DEFAULT_SIZE
    n_opacities: int = 2
    confounder_rate: float = 0.0
    confounder_negative_rate: float = 0.0


class CxrItem(NamedTuple):
    image: np.ndarray  # (H, W) float32 in (0, 1)
    mask: np.ndarray  # opacities, (H, W) bool
    organ_mask: np.ndarray  # lungs
    confounder_mask: np.ndarray  # marker
    confounder: bool


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Shape, np.ndarray]:
    """The normal chest: (intensity before contrast, lung fields, lung ellipse geometry)."""
    s, shape = float(size), (size, size)
    cy, cx = s * (0.54 + rng.uniform(-0.03, 0.03)), s * (0.5 + rng.uniform(-0.03, 0.03))
    body = ellipse(
        shape,
        (cy, cx),
        (s * rng.uniform(0.46, 0.52), s * rng.uniform(0.40, 0.46)),
        value=rng.uniform(0.42, 0.56),
        edge=0.8,
    )
    # Lungs: separated enough (sep >= horizontal half-extent of a tilted lung) never to touch.
    sep, ry, rx = (
        s * rng.uniform(0.17, 0.21),
        s * rng.uniform(0.24, 0.29),
        s * rng.uniform(0.11, 0.14),
    )
    lung_cy, tilt, depth = (
        cy - s * rng.uniform(0.02, 0.07),
        rng.uniform(0.05, 0.2),
        rng.uniform(0.22, 0.32),
    )
    # (row, col, row radius, col radius, angle) per lung; patient's right is the image's left.
    geometry = np.array(
        [
            [lung_cy + s * rng.uniform(-0.02, 0.02), cx - sep, ry, rx, -tilt],
            [lung_cy + s * rng.uniform(-0.02, 0.02), cx + sep, ry, rx, tilt],
        ]
    )
    lungs = ellipses(
        shape,
        geometry[:, :2],
        geometry[:, 2:4],
        angles=geometry[:, 4],
        values=-depth * rng.uniform(0.9, 1.1, 2),
        edge=0.75,
    )
    spine = segment(
        shape,
        (cy - 0.6 * s, cx),
        (cy + 0.6 * s, cx),
        s * rng.uniform(0.03, 0.04),
        value=rng.uniform(0.1, 0.16),
        edge=0.5,
    )
    heart = ellipse(
        shape,
        (lung_cy + 0.12 * s, cx + s * rng.uniform(0.06, 0.09)),
        (s * rng.uniform(0.12, 0.15), s * rng.uniform(0.13, 0.17)),
        value=rng.uniform(0.1, 0.16),
        edge=0.6,
    )
    spacing = 2 * ry / rng.uniform(5.5, 6.5)
    rib = dict(
        spacing=spacing,
        count=7,
        half_width=spacing * rng.uniform(0.18, 0.25),
        curvature=rng.uniform(0.6, 1.0) / s,
        value=rng.uniform(0.06, 0.1),
        edge=0.35,
    )
    top = lung_cy - ry - 0.02 * s
    ribs = combine(
        curved_bands(
            shape, vertex=(top, cx - 0.05 * s), cols=(cx - sep - 0.2 * s, cx - 0.04 * s), **rib
        ),
        curved_bands(
            shape,
            vertex=(top + rng.uniform(-0.02, 0.02) * s, cx + 0.05 * s),
            cols=(cx + 0.04 * s, cx + sep + 0.2 * s),
            **rib,
        ),
    ).within(body.mask)
    texture = 0.025 * smooth_noise(rng, shape, cells=6) + 0.012 * rng.standard_normal(shape)
    intensity = (
        0.06
        + body.intensity
        + lungs.intensity
        + spine.intensity
        + heart.intensity
        + ribs.intensity
        + texture
    )
    return intensity, lungs, geometry


def _opacities(
    rng: np.random.Generator, size: int, lungs: Shape, geometry: np.ndarray, n_max: int
) -> Shape:
    """1..n_max bright irregular blobs centred well inside a lung, clipped to the lungs."""
    count = int(rng.integers(1, n_max + 1))
    lung = geometry[rng.integers(0, 2, count)]
    # A centre at normalized lung radius <= 0.6: (u, v) in the ellipse's own axes, rotated
    # back to (row, col) with the inverse of the skimage ellipse convention.
    r, phi = 0.6 * np.sqrt(rng.uniform(0, 1, count)), rng.uniform(0, 2 * np.pi, count)
    u, v, a = r * lung[:, 2] * np.sin(phi), r * lung[:, 3] * np.cos(phi), lung[:, 4]
    centers = np.stack(
        [lung[:, 0] + u * np.cos(a) + v * np.sin(a), lung[:, 1] + u * np.sin(a) - v * np.cos(a)],
        axis=1,
    )
    radii = size * rng.uniform(0.045, 0.085, count)
    shape = blobs(
        (size, size),
        centers,
        radii,
        harmonics=random_harmonics(rng, count, irregularity=0.35),
        values=rng.uniform(0.2, 0.32, count),
        edge=0.3,
    ).within(lungs.mask)
    # Centre pixel in both blob (radius * 0.65 > 0.71 px) and lung (normalized radius < 0.8).
    assert shape.mask.any(), "an opacity must cover at least one lung pixel"
    return shape


def _marker(rng: np.random.Generator, size: int) -> Shape:
    """A bright "L" token in a top corner, outside the lungs."""
    side = max(3, round(0.1 * size))
    bar = max(1, round(side / 3))
    top = round(0.03 * size) + int(rng.integers(0, round(0.03 * size) + 1))
    left = round(0.03 * size) + int(rng.integers(0, round(0.03 * size) + 1))
    if rng.integers(0, 2):  # top-right corner instead of top-left
        left = size - left - side
    mask = (
        rectangle((size, size), (top, left), (side, bar)).mask
        | rectangle((size, size), (top + side - bar, left), (bar, side)).mask
    )
    return Shape(np.where(mask, rng.uniform(0.45, 0.6), 0.0), mask)


def render(
    options: CxrOptions,
    seed: int,
    split: str,
    index: int,
    *,
    draw_lesion: bool = True,
    draw_confounder: bool = True,
) -> CxrItem:
    """Item ``index`` of ``split``; ``draw_lesion=False`` / ``draw_confounder=False`` give the
    same item without its opacities / marker (every other random draw unchanged)."""
    label, size = index % 2, options.size
    background = item_generator(seed, _TAG, split, index, 0)
    anatomy, lungs, geometry = _anatomy(background, size)
    gain, offset = background.uniform(0.9, 1.1), background.uniform(-0.03, 0.03)
    empty = Shape(np.zeros((size, size)), np.zeros((size, size), dtype=bool))
    lesion, marker, present = empty, empty, False
    if label and draw_lesion:
        lesion = _opacities(
            item_generator(seed, _TAG, split, index, 1), size, lungs, geometry, options.n_opacities
        )
    rate = options.confounder_rate if label else options.confounder_negative_rate
    if rate > 0:
        marker_rng = item_generator(seed, _TAG, split, index, 2)
        present = bool(marker_rng.uniform() < rate)
        if present and draw_confounder:
            marker = _marker(marker_rng, size)
    image = soft_clip(offset + gain * (anatomy + lesion.intensity + marker.intensity))
    return CxrItem(image.astype(np.float32), lesion.mask, lungs.mask, marker.mask, present)


def _rate(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise UserError(f"{NAME}: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


@DATASETS.register(
    NAME, source="synthetic", masks=True, organ_masks=True, how_to_get="generated from the seed"
)
def synth_cxr(
    split: str,
    *,
    root: str | None = None,
    image_size: DrawnSize | None = None,
    seed: int = 0,
    n: PositiveInt | None = None,
    n_opacities: PositiveInt = 2,
    confounder_rate: Fraction = 0.0,
    confounder_negative_rate: Fraction = 0.0,
) -> ArrayDataset:
    """Chest-radiograph phantoms; positives carry opacities in the lungs (exact masks)."""
    size, count = check_common(
        NAME,
        split,
        seed=seed,
        image_size=image_size,
        n=n,
        default_size=DEFAULT_SIZE,
        default_n=DEFAULT_N,
    )
    if not isinstance(n_opacities, (int, np.integer)) or not 1 <= n_opacities <= 5:
        raise UserError(
            f"{NAME}: n_opacities (most opacities per positive) must be an integer in 1..5, got {n_opacities!r}"
        )
    options = CxrOptions(
        size,
        int(n_opacities),
        _rate("confounder_rate", confounder_rate),
        _rate("confounder_negative_rate", confounder_negative_rate),
    )
    items = [render(options, seed, split, i) for i in range(count)]
    return ArrayDataset(
        torch.from_numpy(np.stack([it.image for it in items]))[:, None],
        torch.arange(count) % 2,
        [f"{NAME}/{split}/{i}" for i in range(count)],
        CLASS_NAMES,
        masks=torch.from_numpy(np.stack([it.mask for it in items])),
        organ_masks=torch.from_numpy(np.stack([it.organ_mask for it in items])),
        name=NAME,
        extras={
            "confounder": torch.tensor([it.confounder for it in items]),
            "confounder_mask": torch.from_numpy(np.stack([it.confounder_mask for it in items])),
        },
        provenance={
            "dataset": NAME,
            "source": "generated",
            "seed": seed,
            "options": asdict(options),
        },
    )
