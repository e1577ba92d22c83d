"""Cost metrics: wall time of the method under test, per image.

Time is the median over ``repeats`` calls after ``warmup`` calls, divided by the batch
size; on a GPU the device is synchronized before each clock read. The value is per batch,
so every image of the batch gets the same number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.errors import NotApplicable
from metrics.base import METRICS, MetricContext, Scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of ``fn()``, synchronized on GPU before each clock read."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def median_seconds(fn, *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(max(1, repeats)))


@METRICS.register(
    "time", aliases=("wall_time",), kind="cost", higher_is_better=False, needs=("explainer",)
)
def wall_time(ctx: MetricContext, *, warmup: int = 1, repeats: int = 3) -> Scores:
    """Seconds per image to explain the batch (median over repeats after warm-up)."""
    if ctx.explain is None:
        raise NotApplicable("time needs the explainer to re-run the method")
    seconds = median_seconds(
        lambda: ctx.explain(ctx.model, ctx.x, ctx.target),
        device=ctx.device,
        warmup=warmup,
        repeats=repeats,
    )
    return Scores(values={"value": np.full(len(ctx.ids), seconds / len(ctx.ids))})
