"""The metric contract: the registry, the metadata each metric carries, the batch context a
metric reads, and the scores it returns.

A metric is a registered callable over one batch::

    score(ctx, **options) -> Scores

It implements one pure step, batch in and per-sample scores out; it keeps no state between
calls. Batching of forward passes (``ctx.predict``), devices, explanations on demand
(``ctx.explain``) and per-sample random streams (``ctx.generator``) belong to the context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from cambench.benchmarks.core.registry import Registry
from cambench.cams.base import ForwardInLayout

Kind = Literal[
    "faithfulness",
    "localization",
    "robustness",
    "sanity",
    "adversarial",
    "cost",
    "complexity",
    "conformance",
]


@dataclass(frozen=True)
class MetricInfo:
    """Metadata of a registered metric.

    kind: faithfulness, localization, robustness, sanity, adversarial, cost, complexity,
        conformance (agreement with another implementation of the method).
    higher_is_better: direction of the primary output ``value``.
    needs: "masks", "organ_masks", "explainer" (re-explains inputs), "weights" (changes
        or reads the model's parameters), "reference" (the maps of the method's reference
        implementation: ``reference_maps``).
    secondary: (name, higher_is_better) of further outputs besides ``value``.
    host_dependent: the value depends on the machine and its load (a wall-clock time), not
        only on the seed and the inputs, so two runs of one suite give different numbers.
        The run keeps such metrics out of ``leaderboard.csv`` (which is then byte-identical
        between runs) and writes them to ``leaderboard-cost.csv``.
    scale_free: the scores depend on the inputs and the maps only, and not on a positive
        factor of a map (orderings, argmaxes, ratios): the runner scores maps that are equal
        up to such a factor once (Grad-CAM, HiResCAM and XGrad-CAM on a GAP head: see
        ``benchmarks.engine.group.SameMaps``) and gives each of those methods the scores.
    """

    kind: Kind
    higher_is_better: bool
    needs: tuple[str, ...] = ()
    secondary: tuple[tuple[str, bool], ...] = ()
    version: int = 1
    host_dependent: bool = False
    scale_free: bool = False


METRICS: Registry[MetricInfo] = Registry("metric", MetricInfo)

ClassScore = Literal["logit", "probability"]  # the class score a curve follows

Explainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scores:
    """Per-sample outputs of one metric on one batch.

    values: name -> (B,) float array; ``value`` is the primary output. NaN marks a sample
        the metric does not score (for example a misclassified image under
        ``correct_only``); the runner drops it from the results and counts it.
    curves: name -> (B, T) float array, e.g. the score after each perturbation step.
    unscored: why a sample whose ``value`` is NaN is not scored ("the predicted class
        changed under the transform"); the runner puts it in the cell's reason beside the
        count, so a cell with no image scored says why.
    """

    values: dict[str, np.ndarray]
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    unscored: str = ""


@dataclass
class MetricContext:
    """Everything a metric may read about one batch.

    x: (B, C, H, W) model inputs on the [0, 1] image scale; labels, target: (B,) long;
    maps: (B, H, W) float32 explanations of ``target``; logits: (B, n_classes) of ``x``;
    ids: sample ids (seed per-sample random streams); masks/organ_masks: (B, H, W) bool or
    None; explain: re-explains (model, x, target) -> maps with the method under test;
    batch_size: images per forward pass for metrics that run many forwards;
    reference_maps: (B, H, W) maps of the same images by the reference implementation of
    the method (for ``<method>@<library>``, the suite's own ``<method>``; NaN rows for
    images it did not explain), or None.
    """

    model: nn.Module
    x: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor
    maps: torch.Tensor
    logits: torch.Tensor
    ids: list[str]
    masks: torch.Tensor | None = None
    organ_masks: torch.Tensor | None = None
    explain: Explainer | None = None
    seed: int = 0
    batch_size: int = 64
    reference_maps: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.x.device

    def generator(self, i: int, salt: str = "") -> torch.Generator:
        """A CPU generator for sample ``i``, seeded from the run seed, the sample id and
        ``salt``: the same stream whatever batch the sample is in."""
        digest = hashlib.blake2b(
            f"{self.seed}|{self.ids[i]}|{salt}".encode(), digest_size=8
        ).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))

    def predict(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Logits for a stream of input tensors, regrouped into forwards of ``batch_size`` images
        under ``torch.inference_mode()`` in ``cams.base.forward_layout`` (channels-last on the
        CPU, contiguous for a model that cannot take that); returns them concatenated in
        order."""
        out: list[torch.Tensor] = []
        forward = ForwardInLayout(self.model)
        with torch.inference_mode():
            for chunk in rebatch(batches, self.batch_size):
                out.append(forward(chunk.to(self.device)))
        return torch.cat(out) if out else torch.empty(0)


def rebatch(tensors: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Regroup a stream of (n_i, ...) tensors into tensors of exactly ``size`` rows (the last
    may be shorter), without materialising the whole stream."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    pending: list[torch.Tensor] = []
    count = 0
    for t in tensors:
        while t.shape[0]:
            take = min(size - count, t.shape[0])
            pending.append(t[:take])
            count += take
            t = t[take:]
            if count == size:
                yield torch.cat(pending) if len(pending) > 1 else pending[0]
                pending, count = [], 0
    if pending:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


def class_score(logits: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """The explained class's logit or softmax probability, (N,) for logits (N, n_classes)."""
    if score == "logit":
        vals = logits
    elif score == "probability":
        vals = logits.softmax(dim=1)
    else:
        raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")
    return vals.gather(1, target.reshape(-1, 1)).squeeze(1)
