"""Drawing primitives for the synthetic ground-truth datasets, plus the seeding they share.

Every primitive returns a :class:`Shape`: the intensity it adds to a canvas and the exact
boolean set of pixels it drew on. The contract that makes ground-truth masks exact:

    ``intensity`` is exactly 0 outside ``mask`` and has the sign of ``value`` (never 0)
    everywhere inside it.

So adding a shape (of non-zero value) to a canvas changes exactly the pixels of its mask,
as long as what follows is strictly increasing (:func:`soft_clip`, not ``np.clip``, which
would erase a change on a saturated pixel).

Shapes are soft-edged with hard support: inside the support the profile is a Gaussian of
the normalized radius ``rho`` (0 at the centre, 1 on the boundary) truncated at the
boundary, ``value * edge ** (rho ** 2)``: ``value`` at the centre, ``value * edge`` on the
boundary, 0 outside. ``edge=1`` is a flat fill. Pixel (row, col) has its centre at the
coordinates (row, col), the convention of ``skimage.draw``; a pixel is inside a shape when
its centre is strictly inside (``rho < 1``).

Compact shapes (ellipses, blobs) are drawn in batches, each in a small window around its
centre scattered onto the canvas, so fifty nuclei cost about as much as one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, NamedTuple

import numpy as np

from cambench.benchmarks.core.checks import Range
from cambench.benchmarks.core.errors import UserError
from cambench.datasets.base import SPLITS, check_split

MIN_SIZE = 32  # the drawn anatomy and tissue need this many pixels a side
DrawnSize = Annotated[int, Range(MIN_SIZE)]

Size = tuple[int, int]


class Shape(NamedTuple):
    """What a primitive drew: ``intensity`` (H, W) float64, 0 exactly outside ``mask`` (H, W) bool."""

    intensity: np.ndarray
    mask: np.ndarray

    def within(self, region: np.ndarray) -> Shape:
        """The part of this shape inside a boolean ``region`` (e.g. a lesion clipped to an organ)."""
        return Shape(np.where(region, self.intensity, 0.0), self.mask & region)


def combine(*shapes: Shape) -> Shape:
    """Shapes drawn on one canvas: intensities add, masks unite (the sum keeps the contract
    when all values have the same sign)."""
    return Shape(sum(s.intensity for s in shapes), np.logical_or.reduce([s.mask for s in shapes]))


@lru_cache(maxsize=8)
def coordinate_grid(size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (H, W) of the pixel centres; read-only, cached per size."""
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


def radial_profile(rho2: np.ndarray, value: np.ndarray | float, edge: float) -> np.ndarray:
    """``value * edge ** rho2`` where ``rho2 < 1`` and exactly 0 elsewhere (see the module doc)."""
    if not 0.0 < edge <= 1.0:
        raise ValueError(
            f"edge must be in (0, 1] (boundary intensity / centre intensity), got {edge}"
        )
    inside = rho2 < 1.0
    if edge == 1.0:
        return value * inside
    # minimum() keeps exp() finite where rho2 is huge or inf; those pixels are zeroed anyway.
    return value * np.exp(np.log(edge) * np.minimum(rho2, 1.0)) * inside


def _window(center: np.ndarray, half: int, extent: int) -> np.ndarray:
    """(N, w) pixel indices of a window around each centre, w = min(2 * half + 1, extent),
    shifted to lie on the canvas: it still holds every on-canvas pixel within ``half`` of
    the rounded centre, and no pixel twice."""
    width = min(2 * half + 1, extent)
    start = np.clip(np.round(center) - half, 0, extent - width)
    return start[:, None] + np.arange(width, dtype=np.float64)


def _stamp(
    size: Size,
    centers: np.ndarray,
    reach: np.ndarray,
    rho2_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
    values: np.ndarray,
    edge: float,
) -> Shape:
    """Draw N compact shapes, each evaluated in a window around its centre and summed onto
    the canvas. ``rho2_of(dy, dx)`` maps (N, h, 1) and (N, 1, w) offsets from each centre to
    (N, h, w) squared normalized radii; ``reach`` must bound each shape's support radius
    (a support pixel is then within ``ceil(reach)`` of the rounded centre)."""
    height, width = size
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    n = centers.shape[0]
    if n == 0:
        return Shape(np.zeros(size), np.zeros(size, dtype=bool))
    half = int(np.ceil(np.max(reach)))
    rows, cols = _window(centers[:, 0], half, height), _window(centers[:, 1], half, width)
    rho2 = rho2_of((rows - centers[:, :1])[:, :, None], (cols - centers[:, 1:])[:, None, :])
    drawn = radial_profile(rho2, np.asarray(values, dtype=np.float64).reshape(-1, 1, 1), edge)
    r0, c0 = int(rows[0, 0]), int(cols[0, 0])
    if n == 1:
        intensity, mask = np.zeros(size), np.zeros(size, dtype=bool)
        intensity[r0 : r0 + rows.shape[1], c0 : c0 + cols.shape[1]] = drawn[0]
        mask[r0 : r0 + rows.shape[1], c0 : c0 + cols.shape[1]] = rho2[0] < 1.0
        return Shape(intensity, mask)
    flat = (rows[:, :, None] * width + cols[:, None, :]).astype(np.int64).ravel()
    inside = (rho2 < 1.0).ravel()
    intensity = np.bincount(flat, weights=drawn.ravel(), minlength=height * width)
    count = np.bincount(flat, weights=inside, minlength=height * width)
    return Shape(intensity.reshape(size), count.reshape(size) > 0)


def _batch(n: int, x: np.ndarray | float, shape: tuple[int, ...] = ()) -> np.ndarray:
    """``x`` broadcast to (n, *shape) float64 (a per-shape parameter given once or per shape)."""
    return np.zeros((n, *shape)) + x


def ellipses(
    size: Size,
    centers: np.ndarray,
    radii: np.ndarray,
    *,
    angles: np.ndarray | float = 0.0,
    values: np.ndarray | float = 1.0,
    edge: float = 1.0,
) -> Shape:
    """N filled ellipses, summed: centres (N, 2) as (row, col), radii (N, 2) as (row, col)
    semi-axes, rotated counter-clockwise by ``angles`` (radians), as ``skimage.draw.ellipse``."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    n = centers.shape[0]
    radii = _batch(n, radii, (2,)) if np.ndim(radii) == 1 else np.asarray(radii, np.float64)
    if np.any(radii <= 0):
        raise ValueError("ellipse radii must be positive")
    angles = _batch(n, angles)
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    ry, rx = radii[:, 0, None, None], radii[:, 1, None, None]

    def rho2(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        return ((dy * cos + dx * sin) / ry) ** 2 + ((dy * sin - dx * cos) / rx) ** 2

    return _stamp(size, centers, radii.max(axis=1), rho2, _batch(n, values), edge)


def ellipse(
    size: Size,
    center: tuple[float, float],
    radii: tuple[float, float],
    *,
    angle: float = 0.0,
    value: float = 1.0,
    edge: float = 1.0,
) -> Shape:
    """One filled ellipse (see :func:`ellipses`)."""
    return ellipses(size, [center], [radii], angles=angle, values=value, edge=edge)


def disk(
    size: Size, center: tuple[float, float], radius: float, *, value: float = 1.0, edge: float = 1.0
) -> Shape:
    """A filled disk: the pixels whose centre is closer than ``radius`` to ``center``."""
    return ellipses(size, [center], [(radius, radius)], values=value, edge=edge)


def random_harmonics(
    rng: np.random.Generator, n: int, *, irregularity: float, orders: int = 3
) -> np.ndarray:
    """Boundary harmonics (N, orders, 2) of (amplitude, phase) for :func:`blobs`; the amplitudes
    of one blob sum to at most ``irregularity`` (< 1) so its radius stays positive."""
    if not 0.0 <= irregularity < 1.0:
        raise ValueError(f"irregularity must be in [0, 1), got {irregularity}")
    amplitudes = rng.uniform(0.0, irregularity / orders, (n, orders))
    phases = rng.uniform(0.0, 2 * np.pi, (n, orders))
    return np.stack([amplitudes, phases], axis=-1)


def blobs(
    size: Size,
    centers: np.ndarray,
    radii: np.ndarray | float,
    *,
    harmonics: np.ndarray | None = None,
    values: np.ndarray | float = 1.0,
    edge: float = 1.0,
) -> Shape:
    """N irregular blobs, summed: a disk whose boundary radius at polar angle t is
    ``radius * (1 + sum_k a_k cos((k + 2) t + phi_k))`` for harmonics (N, K, 2) of (a_k, phi_k)
    (orders from 2: order 1 would only shift the centre). Without harmonics, a disk."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    n = centers.shape[0]
    radii = _batch(n, radii)
    if np.any(radii <= 0):
        raise ValueError("blob radii must be positive")
    harmonics = np.zeros((n, 0, 2)) if harmonics is None else np.asarray(harmonics, np.float64)
    if harmonics.shape[0] != n or harmonics.shape[-1] != 2:
        raise ValueError(f"harmonics must have shape ({n}, K, 2), got {harmonics.shape}")
    spread = np.abs(harmonics[..., 0]).sum(axis=1)
    if np.any(spread >= 1.0):
        raise ValueError("blob harmonic amplitudes must sum to less than 1")
    orders = np.arange(2, harmonics.shape[1] + 2, dtype=np.float64)

    def rho2(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        t = np.arctan2(dy, dx)[..., None]  # (N, w, w, 1)
        wobble = (
            harmonics[:, None, None, :, 0] * np.cos(orders * t + harmonics[:, None, None, :, 1])
        ).sum(-1)
        boundary = radii[:, None, None] * (1.0 + wobble)
        return (dy * dy + dx * dx) / boundary**2

    return _stamp(size, centers, radii * (1.0 + spread), rho2, _batch(n, values), edge)


def _boxed(
    size: Size,
    rows: tuple[float, float],
    cols: tuple[float, float],
    rho2_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
    value: float,
    edge: float,
) -> Shape:
    """A shape evaluated only on the canvas pixels of the box [rows] x [cols] (inclusive
    bounds, which must hold its support): ``rho2_of(rows, cols)`` maps pixel coordinates to
    squared normalized radii."""
    r0, r1 = max(int(np.floor(rows[0])), 0), min(int(np.ceil(rows[1])) + 1, size[0])
    c0, c1 = max(int(np.floor(cols[0])), 0), min(int(np.ceil(cols[1])) + 1, size[1])
    intensity, mask = np.zeros(size), np.zeros(size, dtype=bool)
    if r0 < r1 and c0 < c1:
        grid_rows, grid_cols = coordinate_grid(size)
        rho2 = rho2_of(grid_rows[r0:r1, c0:c1], grid_cols[r0:r1, c0:c1])
        intensity[r0:r1, c0:c1] = radial_profile(rho2, value, edge)
        mask[r0:r1, c0:c1] = rho2 < 1.0
    return Shape(intensity, mask)


def segment(
    size: Size,
    start: tuple[float, float],
    end: tuple[float, float],
    half_width: float,
    *,
    value: float = 1.0,
    edge: float = 1.0,
) -> Shape:
    """A thick line segment with round caps: pixels closer than ``half_width`` to it; the
    profile falls off with the distance to the segment's centre line."""
    (r0, c0), (r1, c1) = start, end
    dr, dc = r1 - r0, c1 - c0
    length2 = dr * dr + dc * dc

    def rho2(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        t = (
            0.0
            if length2 == 0
            else np.clip(((rows - r0) * dr + (cols - c0) * dc) / length2, 0.0, 1.0)
        )
        return ((rows - r0 - t * dr) ** 2 + (cols - c0 - t * dc) ** 2) / half_width**2

    box_rows = (min(r0, r1) - half_width, max(r0, r1) + half_width)
    box_cols = (min(c0, c1) - half_width, max(c0, c1) + half_width)
    return _boxed(size, box_rows, box_cols, rho2, value, edge)


def rectangle(
    size: Size, top_left: tuple[int, int], extent: tuple[int, int], *, value: float = 1.0
) -> Shape:
    """A flat axis-aligned rectangle of whole pixels: rows top..top+height-1, cols left..left+width-1."""
    top, left = top_left
    height, width = extent
    mask = np.zeros(size, dtype=bool)
    mask[max(top, 0) : max(top + height, 0), max(left, 0) : max(left + width, 0)] = True
    return Shape(np.where(mask, float(value), 0.0), mask)


def curved_bands(
    size: Size,
    *,
    vertex: tuple[float, float],
    spacing: float,
    count: int,
    half_width: float,
    curvature: float,
    cols: tuple[float, float],
    value: float = 1.0,
    edge: float = 1.0,
) -> Shape:
    """``count`` parallel parabolic bands (ribs): band j follows
    ``row = vertex_row + j * spacing + curvature * (col - vertex_col) ** 2`` for ``col`` in
    ``cols`` (a half-open column range); a pixel belongs to its nearest band when its distance
    to that band's centre line (first-order: vertical offset over sqrt(1 + slope^2)) is below
    ``half_width``."""
    if spacing <= 2 * half_width:
        raise ValueError("curved_bands: spacing must exceed the band width (2 * half_width)")
    v_row, v_col = vertex

    def rho2(rows: np.ndarray, cc: np.ndarray) -> np.ndarray:
        offset = rows - v_row - curvature * (cc - v_col) ** 2
        nearest = np.clip(np.round(offset / spacing), 0, count - 1)
        slope = 2.0 * curvature * (cc - v_col)
        rho2 = (offset - nearest * spacing) ** 2 / (1.0 + slope**2) / half_width**2
        return np.where((cc >= cols[0]) & (cc < cols[1]), rho2, np.inf)

    # Box: the centre lines' row range over the column range, widened by the largest
    # vertical half-width, half_width * sqrt(1 + slope^2).
    far = max(abs(cols[0] - v_col), abs(cols[1] - v_col))
    near = 0.0 if cols[0] <= v_col <= cols[1] else min(abs(cols[0] - v_col), abs(cols[1] - v_col))
    bends = sorted((curvature * near**2, curvature * far**2))
    reach = half_width * np.sqrt(1.0 + (2.0 * curvature * far) ** 2)
    box_rows = (v_row + bends[0] - reach, v_row + (count - 1) * spacing + bends[1] + reach)
    return _boxed(size, box_rows, cols, rho2, value, edge)


@lru_cache(maxsize=16)
def _smoothing_basis(n: int, cells: int) -> np.ndarray:
    """(n, cells) Gaussian bumps at ``cells`` evenly spaced centres, rows of unit L2 norm."""
    centres = np.linspace(-0.5, n - 0.5, cells)
    spacing = centres[1] - centres[0] if cells > 1 else float(n)
    basis = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / spacing) ** 2)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    basis.flags.writeable = False
    return basis


def smooth_noise(rng: np.random.Generator, size: Size, *, cells: int = 6) -> np.ndarray:
    """Smooth Gaussian noise (H, W) of zero mean and unit variance at every pixel, with about
    ``cells`` independent bumps across each side (separable: B_r Z B_c^T, Z ~ N(0, 1))."""
    rows, cols = _smoothing_basis(size[0], cells), _smoothing_basis(size[1], cells)
    return rows @ rng.standard_normal((cells, cells)) @ cols.T


def soft_clip(values: np.ndarray, *, knee: float = 0.1) -> np.ndarray:
    """Map reals into (0, 1), strictly increasing: identity on [knee, 1 - knee], exponential
    tails beyond (continuous with slope 1), so a lesion on a bright pixel still changes it.
    Far out in the upper tail float rounding flattens it: in float32 an input step of 0.01
    stays visible on [-1, 1.5]; keep inputs there."""
    out = np.array(values, dtype=np.float64)
    low, high = out < knee, out > 1.0 - knee
    out[low] = knee * np.exp((out[low] - knee) / knee)
    out[high] = 1.0 - knee * np.exp((1.0 - knee - out[high]) / knee)
    return out


def item_generator(
    seed: int, dataset_tag: int, split: str, index: int, part: int
) -> np.random.Generator:
    """The generator of one ``part`` (background, lesion, ...) of item ``index`` of a split.

    Seeded by (seed, dataset, split, index, part) only, so an item never depends on the
    split's size, and switching one part off (a lesion) leaves every other part's draws
    unchanged.
    """
    return np.random.Generator(
        np.random.PCG64([seed, dataset_tag, SPLITS.index(split), index, part])
    )


def check_common(
    name: str,
    split: str,
    *,
    seed: int,
    image_size: int | None,
    n: int | None,
    default_size: int,
    default_n: dict[str, int],
) -> tuple[int, int]:
    """Validate the options every generator takes; returns (image size, number of items)."""
    check_split(split, name)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"{name}: seed must be a non-negative integer, got {seed!r}")
    size = default_size if image_size is None else image_size
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise UserError(f"{name}: image_size must be an integer >= {MIN_SIZE}, got {image_size!r}")
    count = default_n[split] if n is None else n
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise UserError(f"{name}: n must be a positive integer (items in the split), got {n!r}")
    return int(size), int(count)
