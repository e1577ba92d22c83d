"""The method contract: the registry, the ``Explanation`` every method returns, and the
metadata record each registered method carries.

A method is a registered callable::

    explain(model, x, target, *, layer=None, **options) -> Explanation

``x`` is a float tensor (B, C, H, W) already normalized for the model, ``target`` a long
tensor (B,) of class indices. Options are keyword-only with safe defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.core.registry import Registry

Family = Literal["cam", "gradient", "perturbation", "baseline"]


@dataclass(frozen=True)
class MethodInfo:
    """Metadata of a registered method.

    family: cam, gradient, perturbation or baseline.
    needs: what it needs of the model: "layer" (a target layer), "gap_head" (global
        average pool + linear classifier), "relu" (ReLU non-linearities to guide).
    cost: forward (F) and backward (B) passes per image as a formula of its options,
        e.g. "1F+1B" or "1F + N F" (N masked inputs).
    randomized: draws random numbers (seeded; maps are reproducible for a seed).
    """

    family: Family
    needs: tuple[str, ...] = ()
    cost: str = "1F"
    randomized: bool = False
    version: int = 1


METHODS: Registry[MethodInfo] = Registry("method", MethodInfo)


@dataclass
class Explanation:
    """What a method returns.

    maps: float32 (B, H, W) at input resolution, finite, higher means more relevant.
    layer_maps: (B, h, w) at the target layer's resolution before upsampling (CAM family).
    extras: method-specific tensors (for instance Grad-CAM's channel weights ``alpha``).
    """

    maps: torch.Tensor
    layer_maps: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.maps.dim() == 3, f"maps must be (B, H, W), got {tuple(self.maps.shape)}"
        self.maps = torch.nan_to_num(self.maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.layer_maps is not None:
            self.layer_maps = self.layer_maps.detach().float()


def upsample(layer_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (B, h, w) -> (B, H, W), ``align_corners=False`` as captum does."""
    if tuple(layer_maps.shape[-2:]) == tuple(size):
        return layer_maps
    return F.interpolate(layer_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]


def image_runs(start: int, stop: int, per_image: int) -> Iterator[tuple[int, slice]]:
    """Rows ``start:stop`` of an image-major stream of ``per_image`` rows per image, as
    (image, the rows of the chunk that belong to it): a chunk builds each image's rows by
    broadcasting that image into its slice of a reused buffer, without gathering copies."""
    for image in range(start // per_image, (stop - 1) // per_image + 1):
        a = max(start, image * per_image) - start
        b = min(stop, (image + 1) * per_image) - start
        yield image, slice(a, b)


def forward_layout(device: torch.device) -> torch.memory_format:
    """The memory layout for batches of images that only go forward through a model.

    Channels-last on the CPU: oneDNN convolutions then skip reordering every layer's input,
    which makes inference forwards of a model in the default layout 1.2-1.4x faster on this
    project's 2-core CPU (resnet18 and densenet121 at 96 and 224 px, the rows "forwards only,
    channels-last" of ``benchmarks/perf/methods.py``), logits equal to 1e-6. Contiguous
    elsewhere, where that was not measured."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


class ForwardInLayout:
    """``model(batch)`` with an image batch (B, C, H, W) in ``forward_layout``, falling back
    to contiguous for a model that cannot take channels-last inputs (a ``.view(n, -1)`` of a
    convolution's output, say): the first batch that fails is run again contiguous, and if
    that works, every later batch of this object is made contiguous. A model that fails in
    both layouts raises its own error. Other batches go to the model as they are."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.channels_last_ok = True

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4:
            return self.model(batch)
        if self.channels_last_ok:
            laid_out = batch.contiguous(memory_format=forward_layout(batch.device))
            try:
                return self.model(laid_out)
            except RuntimeError:
                if laid_out.is_contiguous():  # the layout was not the cause
                    raise
                out = self.model(batch.contiguous())  # raises if the model cannot run at all
                self.channels_last_ok = False
                return out
        return self.model(batch.contiguous())


def input_buffer(x: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialized (rows, C, H, W) tensor like ``x`` in ``forward_layout``, for the
    perturbed copies of its images that forward-only methods stream through the model."""
    return torch.empty(
        (rows, *x.shape[1:]),
        dtype=x.dtype,
        device=x.device,
        memory_format=forward_layout(x.device),
    )


def check_inputs(x: torch.Tensor, target: torch.Tensor | int | list[int]) -> torch.Tensor:
    """Validate the batch and return ``target`` as a long tensor (B,) on ``x``'s device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"x must be a float tensor (B, C, H, W); got {shape}. Add a batch dim with x[None]."
        )
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.numel() == 1 and x.shape[0] > 1:
        target = target.expand(x.shape[0])
    if target.numel() != x.shape[0]:
        raise ValueError(
            f"target must have one class index per image: {target.numel()} for a batch of {x.shape[0]}"
        )
    return target


def check_target_range(target: torch.Tensor, n_classes: int) -> None:
    """Raise a clear error for class indices the model does not have."""
    bad = (target < 0) | (target >= n_classes)
    if bool(bad.any()):
        raise ValueError(
            f"target {target[bad].tolist()} out of range for a model with {n_classes} classes "
            f"(valid: 0..{n_classes - 1})"
        )
