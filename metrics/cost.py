"""Cost metrics: wall time and peak tensor memory of the method under test.

Time is the median over ``repeats`` calls after ``warmup`` calls, divided by the batch
size; on a GPU the device is synchronized before each clock read. Beside it, the method's
passes are counted (images through the model's forward, images whose gradient reaches the
model's output) and timed at the same batch, so ``pass_ratio`` says how far the method is
from the floor of the passes it makes: measured time / (forwards x forward time +
backwards x backward time). A backward that stops at the target layer counts as a whole
one, so the ratio is conservative (it may fall below 1).

Peak memory is per batch: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``
after a reset) above what was allocated before the call; elsewhere the peak total size of
the tensor storages the call creates that are alive at the same time, tracked by a
``TorchDispatchMode`` (every storage an operator returns is counted from its creation until
its last reference goes). Both count tensors only (not the allocator's cache, not the
interpreter), the same way for every method, so methods compare; the CPU figure is not the
process's resident memory. The values are per batch, so every image of the batch gets the
same number.

Time is a host measurement (``host_dependent``): it changes with the machine and its load,
so a run keeps it out of the byte-comparable ``leaderboard.csv``. Memory on CPU is not: the
storages an explanation creates follow from the method, the model and the batch, and two
runs give the same bytes (on CUDA the allocator's peak may vary with the kernels chosen).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cambench.benchmarks.core.checks import NonNegativeInt, PositiveInt
from cambench.benchmarks.core.errors import NotApplicable
from cambench.metrics.base import METRICS, MetricContext, Scores


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


class PassCounter:
    """Counts the images a model forwards and the images whose gradient reaches its output,
    while active (a context manager; hooks removed on exit)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.forwards, self.backwards = model, 0, 0
        self.calls = 0  # times it was entered

    def _hook(self, module, inputs, output) -> None:
        out = output if isinstance(output, torch.Tensor) else None
        n = len(out) if out is not None and out.dim() else 1
        self.forwards += n
        if out is not None and out.requires_grad:
            out.register_hook(self._count_backward(n))

    def _count_backward(self, n: int):
        def hook(grad):
            self.backwards += n

        return hook

    def __enter__(self) -> PassCounter:
        self.calls += 1
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def pass_seconds(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *, repeats: int = 3
) -> tuple[float, float]:
    """Median seconds per image of one forward (with autograd recording, as methods run it)
    and of the backward of the target logits, at the batch of ``x``."""
    device = x.device
    forward = median_seconds(lambda: model(x), device=device, warmup=1, repeats=repeats)

    def both():
        xx = x.detach().requires_grad_(True)
        model(xx).gather(1, target[:, None]).sum().backward(inputs=[xx])

    both_s = median_seconds(both, device=device, warmup=1, repeats=repeats)
    return forward / len(x), max(both_s - forward, 0.0) / len(x)


@METRICS.register(
    "time",
    aliases=("wall_time",),
    kind="cost",
    higher_is_better=False,
    needs=("explainer",),
    secondary=(("pass_ratio", False), ("forwards", False), ("backwards", False)),
    host_dependent=True,
)
def wall_time(
    ctx: MetricContext, *, warmup: NonNegativeInt = 1, repeats: PositiveInt = 3
) -> Scores:
    """Seconds per image to explain the batch (median over repeats after warm-up), and its
    ratio to the forward and backward passes the method makes (see the module docstring)."""
    if ctx.explain is None:
        raise NotApplicable("time needs the explainer to re-run the method")
    count = PassCounter(ctx.model)

    def explain() -> None:
        # the first call (a warm-up, or the first timed repeat without one) counts the
        # passes: a hook per forward costs microseconds, and a costly method (Score-CAM's
        # K masked forwards) is not run once more only to be counted
        if count.calls:
            ctx.explain(ctx.model, ctx.x, ctx.target)
            return
        with count:
            ctx.explain(ctx.model, ctx.x, ctx.target)

    seconds = median_seconds(explain, device=ctx.device, warmup=warmup, repeats=repeats)
    n = len(ctx.ids)
    t_forward, t_backward = pass_seconds(ctx.model, ctx.x, ctx.target, repeats=repeats)
    floor = count.forwards * t_forward + count.backwards * t_backward
    # a method that makes no pass (a baseline) has no floor: its ratio is 0 by convention
    ratio = seconds / floor if floor > 0 else 0.0
    return Scores(
        values={
            "value": np.full(n, seconds / n),
            "pass_ratio": np.full(n, ratio),
            "forwards": np.full(n, count.forwards / n),
            "backwards": np.full(n, count.backwards / n),
        }
    )


class PeakStorage(TorchDispatchMode):
    """Peak total bytes of the tensor storages created while active and alive at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int):
        def callback(_ref) -> None:
            self.live -= nbytes
            self._seen.pop(key, None)

        return callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    self._seen[key] = weakref.ref(storage, self._freed(key, nbytes))
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor bytes of one call of ``fn()`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with PeakStorage() as tracker:
        fn()
    return int(tracker.peak)


@METRICS.register(
    "memory", aliases=("peak_memory",), kind="cost", higher_is_better=False, needs=("explainer",)
)
def peak_memory(ctx: MetricContext) -> Scores:
    """Peak tensor memory (MiB) to explain the batch: the CUDA allocator's peak on GPU,
    the peak of live tensor storages elsewhere (see the module docstring)."""
    if ctx.explain is None:
        raise NotApplicable("memory needs the explainer to re-run the method")
    mib = peak_bytes(lambda: ctx.explain(ctx.model, ctx.x, ctx.target), ctx.device) / 2**20
    return Scores(values={"value": np.full(len(ctx.ids), mib)})
