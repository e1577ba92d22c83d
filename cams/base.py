"""The method contract: the registry, the ``Explanation`` every method returns, the
metadata record each registered method carries, and the one entry check every method runs.

A method is a registered callable::

    explain(model, x, target, *, layer=None, **options) -> Explanation

x: float tensor (B, C, H, W), the model's own input (for the harness's zoo models: images on
the [0, 1] scale, which the model normalizes itself); methods that perturb x (occlusion, RISE,
noise) perturb in that space.

target: ``None``, an int, or an integer tensor/sequence of length B. ``None`` explains the
class the model predicts (the argmax of its logits), as captum and pytorch-grad-cam read it;
an int explains that class for every image. ``resolve_target`` is where that is decided, for
every method; ``None`` costs one extra forward.

The model is explained in eval mode (BatchNorm with its running statistics, dropout off),
whatever mode it arrives in, and every module's ``training`` flag is as it came afterwards
(``cams.hooks.model_guard``): an explanation never changes the model's parameters or buffers.
Options are keyword-only with safe defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cambench.benchmarks.core.registry import Registry
from cambench.cams.hooks import model_guard

Family = Literal["cam", "gradient", "perturbation", "baseline"]


@dataclass(frozen=True)
class MethodInfo:
    """Metadata of a registered method.

    family: cam, gradient, perturbation or baseline.
    needs: what it needs of the model: "layer" (a target layer), "gap_head" (global
        average pool + linear classifier), "relu" (rectifiers to guide: ReLU, ReLU6, a
        clamp at 0; see ``cams.guided``).
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


Target = torch.Tensor | int | list[int] | tuple[int, ...] | None


def check_inputs(x: torch.Tensor, target: Target) -> torch.Tensor | None:
    """Validate the batch and return ``target`` as a long tensor (B,) on ``x``'s device, or
    ``None`` for ``None``. Methods that explain a class call ``resolve_target`` instead; this
    is for the ones that never need the class (baselines).

    >>> check_inputs(torch.zeros(2, 3, 4, 4), 1)
    tensor([1, 1])
    >>> check_inputs(torch.zeros(2, 3, 4, 4), torch.tensor([0.0, 1.0]))
    Traceback (most recent call last):
    ...
    TypeError: target must hold integer class indices, got a torch.float32 tensor; pass target.long() (or None for the predicted class)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(
            f"x must be a floating-point tensor (B, C, H, W), got {kind}; convert it with "
            "x.float() (images on the scale the model takes, [0, 1] for the zoo models)"
        )
    if x.dim() != 4:
        raise ValueError(
            f"x must be a float tensor (B, C, H, W), got shape {tuple(x.shape)}; add a batch "
            "dim with x[None] (or a channel dim with x[:, None])"
        )
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        tensor = target
    else:
        try:
            tensor = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"target must be None, an int or a sequence of ints, got {target!r}"
            ) from exc
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"target must hold integer class indices, got a {tensor.dtype} tensor; pass "
            "target.long() (or None for the predicted class)"
        )
    if tensor.dim() > 1:
        raise ValueError(
            f"target must be an int or a 1-D sequence of B class indices, got shape "
            f"{tuple(tensor.shape)}; flatten it with target.reshape(-1)"
        )
    tensor = tensor.to(device=x.device, dtype=torch.long).reshape(-1)
    if tensor.numel() == 1 and x.shape[0] > 1:
        tensor = tensor.expand(x.shape[0])
    if tensor.numel() != x.shape[0]:
        raise ValueError(
            f"target must have one class index per image: got {tensor.numel()} for a batch of "
            f"{x.shape[0]}; pass B indices, one int for all, or None for the predicted class"
        )
    return tensor


def resolve_target(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The entry check of every method that explains a class: validate ``x`` and ``target``
    (``check_inputs``) and return the classes to explain as a long tensor (B,). ``None``
    means the class the model predicts, the argmax of its logits for ``x`` in eval mode (one
    forward under ``model_guard``, without gradients)."""
    checked = check_inputs(x, target)
    if checked is not None:
        return checked
    with model_guard(model), torch.no_grad():
        logits = model(x)
    return logits.argmax(dim=1).to(x.device)


def check_target_range(target: torch.Tensor, n_classes: int) -> None:
    """Raise a clear error for class indices the model does not have."""
    bad = (target < 0) | (target >= n_classes)
    if bool(bad.any()):
        raise ValueError(
            f"target {target[bad].tolist()} out of range for a model with {n_classes} classes "
            f"(valid: 0..{n_classes - 1})"
        )
