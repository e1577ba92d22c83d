"""Sanity check of Adebayo et al. (2018), "Sanity checks for saliency maps": cascading model
parameter randomization.

On a deep copy of the model (``ctx.model`` is never touched), the layers are re-initialized
one group at a time from the output down to the input; after each group the method under
test re-explains the batch for the same target, and the new map is compared with the
original map (``ctx.maps``). A method whose maps stay similar after the weights that produced
the prediction are gone is explaining the image, not the model: lower similarity after full
randomization is better.

- Layers: every module with parameters of its own, in the order the forward pass first runs
  them (found with hooks on the copy; modules that do not run are left alone), randomized in
  reverse order. ``granularity="block"`` groups them by the first ``block_depth`` components
  of their dotted name (``layer4.1.conv2`` -> ``layer4.1`` for depth 2), one step per block;
  a block of normalization layers alone (only 1-D parameters: ``norm5`` after DenseNet's
  last dense block, each BatchNorm of VGG's flat ``features``) is randomized in one step
  with the layer that runs just before it, the layer whose output it normalizes. So VGG-16
  (BN) gets Adebayo et al.'s cascade of its 16 weight layers (not 29 steps, 13 of which
  would reset one BatchNorm), ResNet-18 its 6 blocks, DenseNet-121 its 9.
- Re-initialization, seeded from the run seed (the same random weights for every batch):
  weights of 2 or more dimensions ~ N(0, 2 / fan_in) (He normal, which keeps activations
  from vanishing through the randomized ReLU layers, so a map does not go blank merely
  because of scale); the bias of such a layer ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
  default); a layer with only 1-D parameters (a normalization layer) is reset to its initial
  state: scale 1, shift 0 and, for BatchNorm, running mean 0 and variance 1 (trained
  statistics would no longer describe the randomized layers below).
- Similarities, on absolute values (Adebayo et al. report both; signs differ across methods):
  Spearman rank correlation (``value``) and SSIM of the min-max normalised maps (``ssim``)
  after the last step (``summary="final"``, the paper's endpoint) or averaged over the steps
  of the cascade (``summary="mean"``, the area under the similarity curve divided by the
  number of steps); ``curves`` hold both after every step, step k = the k top-most groups
  randomized.
- What to expect: the value is the Spearman similarity after full randomization, the
  paper's endpoint. On the zoo's ResNet-18 trained on BUSI ultrasound (64 px) it shows
  Adebayo et al.'s finding: Grad-CAM about -0.2, guided backprop about 0.3 (a test checks
  it). It is not universal: where the lesion is the brightest structure of the image
  (synth-lesion), a fully random network's Grad-CAM still lights it (0.66 against guided
  backprop's 0.50 on ResNet-18; about 0.3 for both on the four-layer GAP CNN), and SSIM can
  order the methods either way. Along the cascade the methods part clearly (guided
  backprop stays near 0.9 while the top layers are randomized, Grad-CAM drops at once), so
  read the curves, or use ``summary="mean"`` (the area under the similarity curve).
- ``n_draws``: the similarity of a fully random network's map to the original depends on the
  random draw (Grad-CAM's varies by +-0.2 between draws on a small CNN, guided backprop's by
  +-0.03), so the cascade can be repeated with independent weights and the similarities
  averaged, at ``n_draws`` times the cost (steps x n_draws re-explanations per batch).
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from cambench.benchmarks.core.checks import PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.metrics._similarity import spearman, ssim_or_nan
from cambench.metrics.base import METRICS, MetricContext, Scores
from cambench.metrics.robustness import explain_batched, require_explainer

Granularity = Literal["module", "block"]
Summary = Literal["final", "mean"]


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules with parameters of their own, in the order the forward pass first
    calls them (one forward of one image). Call it on a copy you own: it adds hooks."""
    names = {
        m: n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))
    }
    order: list[str] = []
    handles = []

    def record(module: nn.Module, inputs: object) -> None:
        name = names[module]
        if name not in order:
            order.append(name)

    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(record))
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def randomization_steps(
    model: nn.Module, x: torch.Tensor, *, granularity: Granularity = "module", block_depth: int = 2
) -> list[tuple[str, list[str]]]:
    """The cascade, top (output) first: (step name, names of the modules it re-initializes)."""
    top_down = list(reversed(execution_order(model, x)))
    if granularity == "module":
        return [(name, [name]) for name in top_down]
    if granularity != "block":
        raise UserError(f"granularity must be 'module' or 'block', got {granularity!r}")
    if block_depth < 1:
        raise UserError(f"block_depth must be >= 1, got {block_depth}")
    blocks: dict[str, list[str]] = {}
    for name in top_down:
        blocks.setdefault(".".join(name.split(".")[:block_depth]), []).append(name)
    modules = dict(model.named_modules())
    steps: list[tuple[str, list[str]]] = []
    pending: list[str] = []  # normalization layers waiting for the layer they normalize
    for block, members in blocks.items():
        if all(is_normalization(modules[m]) for m in members):
            pending += members
        else:
            steps.append((block, pending + members))
            pending = []
    if pending:  # normalization layers that run before every weight layer: a step of their own
        steps.append((".".join(pending[0].split(".")[:block_depth]), pending))
    return steps


def is_normalization(module: nn.Module) -> bool:
    """A module whose own parameters are all 1-D (scale and shift): a normalization layer.
    ``reinitialize_`` resets one to the identity without drawing random numbers."""
    return all(p.dim() < 2 for p in module.parameters(recurse=False))


@torch.no_grad()
def reinitialize_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialize ``module``'s own parameters in place (see the module docstring)."""
    params = dict(module.named_parameters(recurse=False))
    matrices = [p for p in params.values() if p.dim() >= 2]
    if is_normalization(module):  # back to its initial state, the identity map
        for name, p in params.items():
            p.fill_(1.0 if name == "weight" else 0.0)
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        return
    fan_in = matrices[0][0].numel()
    for p in params.values():
        if p.dim() >= 2:
            nn.init.normal_(p, 0.0, math.sqrt(2.0 / p[0].numel()), generator=generator)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(p, -bound, bound, generator=generator)


def _generator(seed: int, draw: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}|model_randomization|{draw}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _copy_state_(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s own parameters and buffers into ``dst``'s (same layout, any device)."""
    with torch.no_grad():
        own = zip(dst.parameters(recurse=False), src.parameters(recurse=False), strict=True)
        bufs = zip(dst.buffers(recurse=False), src.buffers(recurse=False), strict=True)
        for p, q in [*own, *bufs]:
            p.copy_(q)


def cascading_randomization(
    ctx: MetricContext,
    *,
    granularity: Granularity = "module",
    block_depth: PositiveInt = 2,
    draw: int = 0,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One cascade with the random weights of ``draw``: the step names and the Spearman and
    SSIM similarities (B, steps) of the absolute maps after each step to the absolute
    original maps."""
    require_explainer(ctx, "model_randomization")
    model = copy.deepcopy(ctx.model)
    steps = randomization_steps(model, ctx.x, granularity=granularity, block_depth=block_depth)
    if not steps:
        raise UserError(f"{type(ctx.model).__name__} has no parameters to randomize")
    modules = dict(model.named_modules())
    gen = _generator(ctx.seed, draw)
    original = ctx.maps.to(ctx.device).float().abs()
    rho, sim = [], []
    for _, members in steps:
        for name in members:
            # The generator draws on the CPU: re-initialize a CPU copy, then copy it back.
            fresh = copy.deepcopy(modules[name]).cpu()
            reinitialize_(fresh, gen)
            _copy_state_(modules[name], fresh)
        maps = explain_batched(ctx, model, ctx.x, ctx.target).abs()
        rho.append(spearman(original, maps))
        sim.append(ssim_or_nan(original, maps))
    return [s for s, _ in steps], torch.stack(rho, dim=1), torch.stack(sim, dim=1)


@METRICS.register(
    "model_randomization",
    aliases=("model-randomization", "cascading_randomization"),
    kind="sanity",
    higher_is_better=False,
    needs=("explainer", "weights"),
    secondary=(("ssim", False),),
)
def model_randomization(
    ctx: MetricContext,
    *,
    granularity: Granularity = "module",
    block_depth: PositiveInt = 2,
    n_draws: PositiveInt = 1,
    summary: Summary = "final",
) -> Scores:
    """Cascading model randomization (Adebayo et al. 2018): Spearman similarity of |map| after
    every layer is re-initialized, top down, to the original |map| (lower is better)."""
    if n_draws < 1:
        raise UserError(f"n_draws must be >= 1, got {n_draws}")
    if summary not in ("final", "mean"):
        raise UserError(f"summary must be 'final' or 'mean', got {summary!r}")
    runs = [
        cascading_randomization(ctx, granularity=granularity, block_depth=block_depth, draw=d)
        for d in range(n_draws)
    ]
    rho = torch.stack([r[1] for r in runs]).mean(dim=0).cpu().numpy()
    sim = torch.stack([r[2] for r in runs]).mean(dim=0).cpu().numpy()

    def reduce(curve: np.ndarray) -> np.ndarray:
        return curve[:, -1] if summary == "final" else curve.mean(axis=1)

    return Scores(
        values={"value": reduce(rho), "ssim": reduce(sim)}, curves={"spearman": rho, "ssim": sim}
    )
