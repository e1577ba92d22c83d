"""Baselines: maps that carry no information about the model, to rank methods against.

Random maps are seeded per image from the image's own bytes and the seed, so an image
gets the same map whatever batch it is in.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from cambench.cams.base import METHODS, Explanation, check_inputs


def image_generator(image: torch.Tensor, seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the bytes of one image (C, H, W)."""
    digest = hashlib.blake2b(
        image.detach().cpu().float().contiguous().numpy().tobytes(), digest_size=8
    )
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    return torch.Generator().manual_seed(
        int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)
    )


@METHODS.register("random", family="baseline", cost="0", randomized=True)
def random_map(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, layer=None, seed: int = 0
) -> Explanation:
    """Uniform noise in [0, 1) per pixel, independent of the model and target."""
    check_inputs(x, target)
    h, w = x.shape[-2:]
    maps = torch.stack([torch.rand((h, w), generator=image_generator(img, seed)) for img in x])
    return Explanation(maps=maps.to(x.device))
