"""Occlusion (Zeiler & Fergus, 2014): how much the target logit drops when a window of the
image is replaced by a baseline value, averaged over the windows covering each pixel.

The semantics are captum's ``Occlusion`` with ``sliding_window_shapes=(C, h, w)``,
``strides=(C, sh, sw)`` and ``baselines=baseline``: windows start at multiples of the
stride, ``ceil((H - h) / sh) + 1`` of them per column (the last one cropped at the image
edge), every window covers all channels, and a pixel's attribution is the mean over the
windows covering it of ``score(x) - score(x with the window set to baseline)``, score being
the target logit. Captum returns that value on every channel (B, C, H, W); this map is its
SUM over channels, i.e. C times the per-pixel mean.

All windows of all images form one stream of perturbed inputs, regrouped into forwards of
``batch_size`` images under ``torch.inference_mode()``; each chunk is built in one reused
buffer (channels-last on the CPU, see ``cams.base.input_buffer``) by broadcasting (no
Python loop per window). Windows are separable (row band x
column band), so the per-pixel averaging is two small matrix products instead of one mask
per window.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cambench.benchmarks.core.checks import PositiveInt, fits_image
from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import (
    METHODS,
    Explanation,
    ForwardInLayout,
    check_target_range,
    image_runs,
    input_buffer,
    resolve_target,
)
from cambench.cams.hooks import model_guard


def pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """An int or an (h, w) pair of positive ints, as a pair."""
    items = (value, value) if isinstance(value, int) else tuple(value)
    if len(items) != 2 or not all(isinstance(v, int) and v >= 1 for v in items):
        raise UserError(
            f"{name} must be a positive int or a pair (h, w) of positive ints; got {value!r}"
        )
    return items  # type: ignore[return-value]


def window_bands(size: int, window: int, stride: int) -> torch.Tensor:
    """(n, size) bool: band i covers [i*stride, i*stride + window), cropped at ``size``;
    n = ceil((size - window) / stride) + 1, as captum counts them."""
    n = math.ceil((size - window) / stride) + 1
    pos = torch.arange(size)
    start = torch.arange(n)[:, None] * stride
    return (pos >= start) & (pos < start + window)


def _check_geometry(
    size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> None:
    for dim, n, w, s in zip(("height", "width"), size, window, stride, strict=True):
        if w > n:
            raise UserError(f"occlusion window {w} exceeds the image {dim} {n}; use window <= {n}")
        if s > w and w < n:
            raise UserError(
                f"occlusion stride {s} exceeds the window {w} along the {dim}, which leaves pixels "
                f"uncovered; use stride <= window"
            )


def geometry(
    size: tuple[int, int], window: int | tuple[int, int], stride: int | tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (h, w) window and stride (default: half the window) for (H, W) images; a
    ``UserError`` unless they fit."""
    win = pair(window, "window")
    step = pair(
        stride if stride is not None else (max(1, win[0] // 2), max(1, win[1] // 2)), "stride"
    )
    _check_geometry(size, win, step)
    return win, step


def geometry_fits(options: dict, hw: tuple[int, int]) -> None:
    """The suite's check of ``window`` and ``stride`` against the image size."""
    geometry(hw, options["window"], options["stride"])


# the passes of an occlusion over sliding windows, ours and captum's alike
COST = "1F + n_windows F (n_windows = (ceil((H-h)/stride)+1) * (ceil((W-w)/stride)+1))"


@METHODS.register("occlusion", family="perturbation", cost=COST)
@fits_image(geometry_fits)
def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    layer=None,
    window: PositiveInt | tuple[PositiveInt, PositiveInt] = 8,
    stride: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None,
    baseline: float = 0.0,
    batch_size: PositiveInt = 64,
) -> Explanation:
    """Occlusion: mean drop of the target logit over the windows covering a pixel, summed
    over channels (captum ``Occlusion`` semantics; ``layer`` is ignored).

    ``window`` and ``stride`` (default ``window // 2``) are an int or an (h, w) pair in
    pixels; ``baseline`` is the value written into the window, in the space of ``x`` (the
    model's input: 0 is black for the zoo's [0, 1] images); ``batch_size`` is the number of
    perturbed images per forward pass.
    """
    target = resolve_target(model, x, target)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    size = (x.shape[-2], x.shape[-1])
    win, step = geometry(size, window, stride)
    rows = window_bands(size[0], win[0], step[0]).to(x.device)  # (nH, H)
    cols = window_bands(size[1], win[1], step[1]).to(x.device)  # (nW, W)
    n_h, n_w = rows.shape[0], cols.shape[0]
    n_windows = n_h * n_w
    batch = x.shape[0]
    fill = torch.tensor(float(baseline), dtype=x.dtype, device=x.device)

    with model_guard(model), torch.inference_mode():
        clean = torch.cat([model(x[i : i + batch_size]) for i in range(0, batch, batch_size)])
        check_target_range(target, clean.shape[1])
        base_score = clean.gather(1, target[:, None])[:, 0]
        drops = torch.empty(batch * n_windows, dtype=clean.dtype, device=x.device)
        # One stream of (image, window) pairs, image-major, cut into forwards of batch_size;
        # the perturbed images of a chunk are written into one reused buffer.
        inputs = input_buffer(x, min(batch_size, batch * n_windows))
        forward = ForwardInLayout(model)
        for start in range(0, batch * n_windows, batch_size):
            stop = min(start + batch_size, batch * n_windows)
            idx = torch.arange(start, stop, device=x.device)
            img, win_idx = idx // n_windows, idx % n_windows
            covered = (
                rows[win_idx // n_w][:, :, None] & cols[win_idx % n_w][:, None, :]
            )  # (n, H, W)
            chunk = inputs[: stop - start]
            for i, part in image_runs(start, stop, n_windows):
                chunk[part] = x[i : i + 1]
            chunk.masked_fill_(covered[:, None], fill)
            score = forward(chunk).gather(1, target[img][:, None])[:, 0]
            drops[idx] = base_score[img] - score
        drops = drops.reshape(batch, n_h, n_w)
        rows_f, cols_f = rows.to(drops.dtype), cols.to(drops.dtype)
        total = torch.einsum("bik,iy,kx->byx", drops, rows_f, cols_f)
        count = rows_f.sum(0)[:, None] * cols_f.sum(0)[None, :]  # >= 1 by _check_geometry
        maps = total / count * x.shape[1]
    return Explanation(maps=maps.clone().float(), extras={"drops": drops.clone()})
