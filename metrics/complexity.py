"""Complexity metrics: how concentrated is an explanation, whatever it points at?

``sparseness`` is the Gini index of the absolute map values (Chalasani et al. 2020,
"Concise explanations of neural networks using adversarial training"; Quantus
``Sparseness``): 0 when every pixel carries the same relevance, approaching 1 when one pixel
carries it all. Higher is registered as better, as in Quantus and the paper (a concise
explanation is easier to read), but it is a preference, not a check of correctness: a map
that highlights one wrong pixel is very sparse. Read it next to the faithfulness and
localization metrics.

An all-zero map scores 0 (it is as uniform as a map can be); Quantus adds 1e-7 to every
value to avoid 0/0 and gets the same limit. Needs no masks; every sample is scored.
"""

from __future__ import annotations

import numpy as np
import torch

from cambench.metrics.base import METRICS, MetricContext, Scores


def gini_index(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of the absolute values of each map in a (B, H, W) batch, (B,) float64.

    G = sum_i (2 i - n - 1) a_(i) / (n sum_i a_(i)) over the n values sorted ascending;
    0 for an all-zero map.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf; methods must return finite maps")
    values = maps.reshape(maps.shape[0], -1).double().abs().sort(dim=1).values
    n = values.shape[1]
    ranks = torch.arange(1, n + 1, device=values.device, dtype=torch.float64)
    total = values.sum(dim=1)
    gini = ((2 * ranks - n - 1) * values).sum(dim=1) / (n * total.clamp_min(1e-300))
    return torch.where(total > 0, gini, torch.zeros_like(gini))


@METRICS.register("sparseness", kind="complexity", higher_is_better=True, scale_free=True)
def sparseness(ctx: MetricContext) -> Scores:
    """Sparseness: Gini index of the absolute map values (1 = one pixel, 0 = uniform)."""
    value = gini_index(ctx.maps).detach().cpu().numpy().astype(np.float64)
    return Scores(values={"value": value})
