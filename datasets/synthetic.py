"""``synth-lesion``: the simplest dataset with an exact ground-truth lesion mask.

Each image is a 1-channel textured background (smooth low-frequency noise plus grain) with
two or three faint distractor squares. Positives (label 1, "lesion") also carry one bright
disk; its mask is exactly the disk's pixels (centre distance <= radius), the only pixels
the lesion changed. Item i of a split depends only on (seed, split, i, image_size), so two
generations with the same seed are identical and a larger ``n`` keeps the earlier items.
"""

from __future__ import annotations

import numpy as np
import torch

from cambench.benchmarks.core.checks import PositiveInt
from cambench.datasets.base import DATASETS, SPLITS, ArrayDataset, SynthSize, check_split

DEFAULT_SIZES = {"train": 800, "val": 100, "test": 200}


def _item(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coarse = rng.normal(0.0, 1.0, (4, 4)).astype(np.float32)
    # Bilinear upsampling of a 4x4 noise grid gives a smooth background texture.
    grid = np.linspace(0, 3, size, dtype=np.float32)
    i0 = np.clip(grid.astype(int), 0, 2)
    f = grid - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    smooth = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    image = 0.35 + 0.06 * smooth + rng.normal(0.0, 0.03, (size, size)).astype(np.float32)
    for _ in range(int(rng.integers(2, 4))):  # distractors: faint squares, in both classes
        side = int(rng.integers(size // 10, size // 5 + 1))
        r0, c0 = rng.integers(0, size - side, 2)
        image[r0 : r0 + side, c0 : c0 + side] += 0.12
    mask = np.zeros((size, size), dtype=bool)
    if positive:
        radius = rng.uniform(0.12, 0.2) * size
        cy, cx = rng.uniform(radius + 1, size - radius - 1, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image = np.where(mask, image + 0.35, image)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


@DATASETS.register(
    "synth-lesion", source="synthetic", masks=True, how_to_get="generated from the seed"
)
def synth_lesion(
    split: str,
    *,
    root=None,
    image_size: SynthSize | None = None,
    seed: int = 0,
    n: PositiveInt | None = None,
) -> ArrayDataset:
    """Textured background with distractor squares; positives carry a bright disk lesion."""
    split = check_split(split, "synth-lesion")
    size = int(image_size or 32)
    count = DEFAULT_SIZES[split] if n is None else int(n)
    images, masks = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        image, mask = _item(rng, size, positive=bool(i % 2))
        images.append(image)
        masks.append(mask)
    return ArrayDataset(
        torch.from_numpy(np.stack(images))[:, None] if count else torch.empty(0, 1, size, size),
        torch.arange(count) % 2,
        [f"synth-lesion/{split}/{i}" for i in range(count)],
        ("normal", "lesion"),
        masks=torch.from_numpy(np.stack(masks)) if count else None,
        name="synth-lesion",
    )
