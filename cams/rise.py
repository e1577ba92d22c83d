"""RISE (Petsiuk, Das & Saenko, 2018): randomized input sampling for explanation.

N random masks M_i are drawn as in the paper: a binary ``cells x cells`` grid whose cells
are kept with probability ``p``, upsampled bilinearly to ``(cells + 1) * ceil(H / cells)``
by ``(cells + 1) * ceil(W / cells)`` pixels and cropped to (H, W) at a random shift of less
than one cell. The saliency of the target class c is

    S_c = 1 / (N p) * sum_i P_c(x * M_i) M_i,

P_c the softmax probability of class c (or the logit, ``score="logit"``). The mask set
depends only on ``seed``, the image size and the options, and every image of a batch uses
the same set, so a map does not depend on the batch it is computed in.

Random draws, in order, from ``torch.Generator().manual_seed(seed)`` on the CPU: the grid
``rand(N, cells, cells) < p``, then the row shifts ``randint(0, ceil(H / cells), (N,))``,
then the column shifts ``randint(0, ceil(W / cells), (N,))``. The bilinear upsampling
is the paper's ``skimage.transform.resize(order=1, mode="reflect")``: half-pixel centres and
mirror reflection at the edges.

Against the authors' code (``eclique/RISE``, ``explanations.py``: ``RISE.generate_masks`` and
``RISE.forward``): the same masks from the same draws (``np.random`` there, the generator
above here; tests/test_perturbation_methods.py checks them against skimage's resize), the
same score (their model ends in a softmax), the same normalization by N p (not by the sum of
the masks), and tests/test_method_findings.py checks the saliency against a re-implementation
of ``RISE.forward`` with the same masks to 1e-5. One deliberate difference: the authors
multiply the masks with the tensor the network takes after ``Normalize`` (a masked pixel
becomes the dataset mean), while here they multiply ``x``, the model's input, which for the
zoo's models is the [0, 1] image (a masked pixel is black; the model normalizes after the
mask). For a model that takes normalized input the two are the same. With few masks the
Monte Carlo error dominates any comparison: on a small CNN with N = 96, s = 6, p = 0.5 two
seeds give maps that differ by up to 0.65 after min-max, so compare implementations with the
same masks.

The (mask, image) pairs form one stream, regrouped into forwards of ``batch_size`` images
under ``torch.inference_mode()``; masks are built per chunk, never all N at once, and the
masked images written into one reused buffer (channels-last on the CPU, see
``cams.base.input_buffer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cambench.benchmarks.core.checks import OpenFraction, PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import (
    METHODS,
    Explanation,
    ForwardInLayout,
    check_target_range,
    input_buffer,
    resolve_target,
)
from cambench.cams.hooks import model_guard


def interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bilinear weights with half-pixel centres and mirror reflection at the
    edges (value at -1 = value at 1), as ``skimage.transform.resize(order=1, mode="reflect")``."""
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    low = torch.floor(src)
    frac = src - low
    weights = torch.zeros((n_out, n_in), dtype=torch.float64)
    for index, weight in ((low.long(), 1 - frac), (low.long() + 1, frac)):
        if n_in > 1:
            period = 2 * (n_in - 1)
            index = index % period
            index = torch.where(index >= n_in, period - index, index)
        else:
            index = torch.zeros_like(index)
        weights.index_put_((torch.arange(n_out), index), weight, accumulate=True)
    return weights.float()


@dataclass(frozen=True)
class MaskSet:
    """The random draws that define N RISE masks for one image size; masks are built on demand."""

    grid: torch.Tensor  # (N, cells, cells) bool
    shift_y: torch.Tensor  # (N,) long
    shift_x: torch.Tensor  # (N,) long
    size: tuple[int, int]
    cell: tuple[int, int]

    def build(self, index: torch.Tensor) -> torch.Tensor:
        """Masks ``index`` as float32 (n, H, W) on ``index``'s device."""
        device = index.device
        cells = self.grid.shape[-1]
        # Separable upsampling: the cropped rows of the row and column interpolation matrices.
        rows = interpolation_matrix(cells, (cells + 1) * self.cell[0]).to(device)
        cols = interpolation_matrix(cells, (cells + 1) * self.cell[1]).to(device)
        ys = self.shift_y.to(device)[index][:, None] + torch.arange(self.size[0], device=device)
        xs = self.shift_x.to(device)[index][:, None] + torch.arange(self.size[1], device=device)
        grid = self.grid.to(device)[index].float()
        return torch.einsum("nhs,nst,nwt->nhw", rows[ys], grid, cols[xs])


def rise_masks(
    n_masks: int, size: tuple[int, int], *, cells: int = 7, p: float = 0.5, seed: int = 0
) -> MaskSet:
    """The seeded draws of ``n_masks`` RISE masks for images of ``size`` (H, W)."""
    if n_masks < 1:
        raise UserError(f"n_masks must be >= 1, got {n_masks}")
    if not isinstance(cells, int) or cells < 1:
        raise UserError(f"cells must be a positive int (grid cells per side), got {cells!r}")
    if not 0.0 < p <= 1.0:
        raise UserError(f"p (probability of keeping a cell) must be in (0, 1], got {p}")
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    gen = torch.Generator().manual_seed(int(seed))
    grid = torch.rand((n_masks, cells, cells), generator=gen) < p
    shift_y = torch.randint(0, cell[0], (n_masks,), generator=gen)
    shift_x = torch.randint(0, cell[1], (n_masks,), generator=gen)
    return MaskSet(grid, shift_y, shift_x, (int(size[0]), int(size[1])), cell)


@METHODS.register("rise", family="perturbation", cost="n_masks F", randomized=True)
def rise(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    n_masks: PositiveInt = 500,
    cells: PositiveInt = 7,
    p: OpenFraction = 0.5,
    seed: int = 0,
    score: Literal["probability", "logit"] = "probability",
    batch_size: PositiveInt = 64,
) -> Explanation:
    """RISE: mean of random masks weighted by the target's probability on the masked input,
    divided by ``p`` (``layer`` is ignored).

    ``n_masks`` masks from a ``cells x cells`` grid with keep probability ``p``, seeded by
    ``seed``; the masked input is ``x * M`` in the space of ``x``, the model's input;
    ``batch_size`` is the number of masked images per forward pass.
    """
    target = resolve_target(model, x, target)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if score not in ("probability", "logit"):
        raise UserError(f"score must be 'probability' or 'logit', got {score!r}")
    size = (x.shape[-2], x.shape[-1])
    masks = rise_masks(n_masks, size, cells=cells, p=p, seed=seed)
    batch = x.shape[0]
    total = n_masks * batch
    # float64 sums: N terms per pixel, summed in the same order for any batch_size.
    saliency = torch.zeros((batch, *size), dtype=torch.float64, device=x.device)
    with model_guard(model), torch.inference_mode():
        inputs = input_buffer(x, min(batch_size, total))
        forward = ForwardInLayout(model)
        # One stream of (mask, image) pairs, mask-major, so a chunk needs few distinct masks.
        for start in range(0, total, batch_size):
            idx = torch.arange(start, min(start + batch_size, total), device=x.device)
            mask_idx, img = idx // batch, idx % batch
            first = int(mask_idx[0])
            chunk_masks = masks.build(torch.arange(first, int(mask_idx[-1]) + 1, device=x.device))
            m = chunk_masks[mask_idx - first]  # (n, H, W)
            chunk = torch.mul(x[img], m[:, None].to(x.dtype), out=inputs[: len(idx)])
            logits = forward(chunk)
            if start == 0:
                check_target_range(target, logits.shape[1])
            out = logits.softmax(dim=1) if score == "probability" else logits
            weight = out.gather(1, target[img][:, None])[:, 0].double()
            saliency.index_add_(0, img, weight[:, None, None] * m.double())
        saliency /= n_masks * p
    return Explanation(maps=saliency.float())
