"""Agreement of an implementation's maps with the harness's own implementation of the same
method, image by image: the measure of the ``conformance`` suite, where the methods named
``<method>@<library>`` (``gradcam@captum``, ``cams/peers.py``) are explained beside the
harness's ``<method>`` on the same images.

The reference maps are the suite's entry whose ``use`` is ``<method>`` (the first such
entry), explained on the same batch (``ctx.reference_maps``; the runner explains a
reference before the implementations compared with it). A method without a reference (the
harness's own, or a library's whose method the suite does not run) is not applicable.

Outputs, each on both maps after per-image min-max to [0, 1] (the libraries normalize at
different points; a constant map becomes all 0):

- ``value``: Spearman rank correlation of the pixels (1: the same ordering);
- ``top_iou``: IoU of the top ``top`` fraction of pixels of each map (default 10%; ties
  broken in raster order): whether they highlight the same region;
- ``max_abs_diff``: the largest pixel difference (0: the same map up to a positive factor
  and an offset).
"""

from __future__ import annotations

import numpy as np
import torch

from cambench.benchmarks.core.checks import OpenFraction
from cambench.benchmarks.core.errors import NotApplicable
from cambench.metrics._similarity import minmax_normalize, spearman, topk_intersection
from cambench.metrics.base import METRICS, MetricContext, Scores


@METRICS.register(
    "agreement",
    kind="conformance",
    higher_is_better=True,
    needs=("reference",),
    secondary=(("top_iou", True), ("max_abs_diff", False)),
)
def agreement(ctx: MetricContext, *, top: OpenFraction = 0.1) -> Scores:
    """Agreement with the harness's own implementation of the method (Spearman; top-10%
    IoU and max abs difference after min-max as secondary outputs)."""
    ref = ctx.reference_maps
    if ref is None:
        raise NotApplicable(
            "agreement compares a method named <method>@<library> with the suite's own "
            "<method> on the same images; this method has no such reference"
        )
    maps = ctx.maps.to(torch.float64)
    ref = ref.to(device=maps.device, dtype=torch.float64)
    missing = torch.isnan(ref).flatten(1).any(dim=1)  # the reference explained fewer images
    ref = torch.nan_to_num(ref)
    a, b = minmax_normalize(maps), minmax_normalize(ref)
    share = topk_intersection(a, b, k=top)  # |A n B| / k, with |A| = |B| = k
    values = {
        "value": spearman(a, b),
        "top_iou": share / (2.0 - share),
        "max_abs_diff": (a - b).abs().flatten(1).amax(dim=1),
    }
    out = {
        key: torch.where(missing, torch.full_like(v, float("nan")), v).cpu().numpy()
        for key, v in values.items()
    }
    return Scores(
        values={k: v.astype(np.float64) for k, v in out.items()},
        unscored="the reference implementation did not explain this image (its max_images)",
    )
