"""Adversarial sensitivity of explanations: what the map does when the input is attacked.

``prediction_attack`` changes the prediction with an untargeted L-inf attack on the [0, 1]
image scale (captum's ``FGSM`` or ``PGD`` on the cross-entropy of the predicted class,
clipped to [0, 1]; PGD starts at x, no random start, so the attack is deterministic) and
re-explains the attacked image for its new predicted class. Per sample:

- ``value``: Spearman similarity of the map after the attack to the map before. An
  explanation that follows the model's decision changes when the decision changes, so lower
  is better. Scored where the prediction flipped (``flipped_only``, the default); NaN
  elsewhere.
- ``flipped``: 1 if the attack changed the predicted class (the model's robustness, not the
  method's; the same for every method).
- ``map_shift``: distance in pixels between the centres of mass of the two maps (flipped
  samples).
- ``to_new_class``: Spearman similarity of the map after the attack to the map of the new
  class on the clean image: whether the map moved to what the new class looked like
  (flipped samples).

``explanation_attack`` (Ghorbani et al. 2019, "Interpretation of neural networks is
fragile") looks for a perturbation within an L-inf ball of radius ``epsilon`` that keeps the
predicted class and moves the explanation away: PGD-style signed-gradient steps on a
differentiable objective, either the share of the map's mass left in the original top-k
region (``objective="topk"``, minimised) or the distance of the map's centre of mass from
the original one (``objective="center"``, maximised). A step that changes the predicted
class (checked with the real model) is rejected for that image, whose step size is halved.

The gradient of an explanation with respect to the input needs a second derivative, which
a ReLU network does not have (it is zero almost everywhere). The attack therefore targets
a differentiable surrogate of the method: the map of ``surrogate`` ("gradcam" at ``layer``,
or "saliency", |dy/dx| max over channels) computed with double backprop on the model with
every ReLU call replaced by softplus(beta) (``beta`` large is close to ReLU). The model
itself is not changed: the replacement is a torch function mode active during the forward
pass only. The method under test (``ctx.explain``) is then evaluated on the final perturbed
input against its original map:

- ``value``: top-k intersection of the map after the attack with the original map (higher
  is more robust). NaN for an image whose label did not stay (none, by construction).
- ``label_kept``: 1 if the final perturbed image keeps the predicted class.
- ``spearman``: Spearman similarity of the two maps; ``map_shift``: centre-of-mass distance.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD
from torch import nn
from torch.overrides import TorchFunctionMode

from cambench.benchmarks.core.checks import NonNegativeFloat, PositiveFloat, PositiveInt, Range
from cambench.benchmarks.core.errors import UserError
from cambench.cams.base import upsample
from cambench.cams.hooks import attach_tap, model_guard, resolve_layer
from cambench.metrics._similarity import (
    center_of_mass,
    center_of_mass_distance,
    resolve_k,
    spearman,
    topk_intersection,
)
from cambench.metrics.base import METRICS, MetricContext, Scores
from cambench.metrics.robustness import explain_batched, predicted, require_explainer

Attack = Literal["fgsm", "pgd"]
Surrogate = Literal["gradcam", "saliency"]
Objective = Literal["topk", "center"]


def _per_sample_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # captum differentiates each sample's loss separately: it needs (B,), not the batch mean.
    return F.cross_entropy(logits, target, reduction="none")


def attack_inputs(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    attack: Attack = "fgsm",
    epsilon: NonNegativeFloat = 8 / 255,
    steps: PositiveInt = 10,
    step_size: PositiveFloat | None = None,
) -> torch.Tensor:
    """Untargeted L-inf attack on ``target`` (the predicted class): FGSM, one step of size
    ``epsilon``, or PGD, ``steps`` steps of ``step_size`` (default 2.5 epsilon / steps, as
    Madry et al.) projected on the ball; the result is clipped to [0, 1]. The model leaves
    as it came (no parameter gradient is computed)."""
    if not epsilon >= 0:
        raise UserError(
            f"epsilon must be >= 0 (an L-inf radius on the [0, 1] scale), got {epsilon}"
        )
    if attack not in ("fgsm", "pgd"):
        raise UserError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    if attack == "pgd" and steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    inputs = x.detach().clone().requires_grad_(True)
    target = target.clone()  # an inference-mode tensor cannot be saved for the backward pass
    with model_guard(model), warnings.catch_warnings():
        for p in model.parameters():
            p.requires_grad_(False)  # restored by model_guard; only the input gradient is needed
        # PGD hands captum's FGSM detached inputs on every step and FGSM then warns that it set
        # requires_grad itself; that is expected here, not a problem to report.
        warnings.filterwarnings(
            "ignore", message="Input Tensor .* did not already require gradients"
        )
        if attack == "fgsm":
            out = FGSM(model, loss_func=_per_sample_ce, lower_bound=0.0, upper_bound=1.0).perturb(
                inputs, epsilon, target
            )
        else:
            size = 2.5 * epsilon / steps if step_size is None else float(step_size)
            out = PGD(model, loss_func=_per_sample_ce, lower_bound=0.0, upper_bound=1.0).perturb(
                inputs, epsilon, size, steps, target
            )
    return out.detach()


@METRICS.register(
    "prediction_attack",
    aliases=("prediction-attack", "adversarial_prediction"),
    kind="adversarial",
    higher_is_better=False,
    needs=("explainer",),
    secondary=(("flipped", False), ("map_shift", True), ("to_new_class", True)),
)
def prediction_attack(
    ctx: MetricContext,
    *,
    attack: Attack = "fgsm",
    epsilon: NonNegativeFloat = 8 / 255,
    steps: PositiveInt = 10,
    step_size: PositiveFloat | None = None,
    flipped_only: bool = True,
) -> Scores:
    """Spearman similarity of the map of the attacked image (new predicted class) to the
    original map, where an FGSM/PGD attack flipped the prediction (lower is better)."""
    require_explainer(ctx, "prediction_attack")
    pred = ctx.logits.argmax(dim=1).to(ctx.device)
    x_adv = attack_inputs(
        ctx.model, ctx.x, pred, attack=attack, epsilon=epsilon, steps=steps, step_size=step_size
    )
    new_pred = predicted(ctx, x_adv)
    flipped = new_pred != pred
    before = ctx.maps.to(ctx.device).float()
    after = explain_batched(ctx, ctx.model, x_adv, new_pred)
    value = spearman(before, after).cpu().numpy()
    shift = center_of_mass_distance(before, after).cpu().numpy()
    to_new = np.full(len(value), np.nan)
    if bool(flipped.any()):
        idx = flipped.nonzero().reshape(-1)
        new_before = explain_batched(ctx, ctx.model, ctx.x[idx], new_pred[idx])
        to_new[idx.cpu().numpy()] = spearman(new_before, after[idx]).cpu().numpy()
    kept = ~flipped.cpu().numpy()
    if flipped_only:
        value = np.where(kept, np.nan, value)
    return Scores(
        values={
            "value": value,
            "flipped": (~kept).astype(np.float64),
            "map_shift": np.where(kept, np.nan, shift),
            "to_new_class": to_new,
        },
        unscored="the attack did not flip the prediction (flipped_only)" if flipped_only else "",
    )


# --- explanation attack --------------------------------------------------------------------

_RELU_CALLS = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
)


class SoftplusReLU(TorchFunctionMode):
    """While active, every ReLU call (module or functional, in place or not) computes
    softplus(beta) instead, out of place; the model's code uses the returned value."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_CALLS:
            self.calls += 1
            return F.softplus(args[0], beta=self.beta)
        return func(*args, **(kwargs or {}))


def surrogate_maps(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    surrogate: Surrogate = "gradcam",
    layer: nn.Module | str | None = None,
    beta: NonNegativeFloat = 10.0,
) -> torch.Tensor:
    """Differentiable maps (B, H, W) of ``x`` (keep the graph: ``x`` may require grad) on the
    softplus surrogate of ``model``. Call inside ``model_guard``: hooks go on the model."""
    if surrogate == "gradcam":
        module = resolve_layer(model, layer, x)
        with model_guard(model) as handles:
            tap = attach_tap(model, module, handles)
            with SoftplusReLU(beta):
                logits = model(x)
            activation = tap.activation
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, activation, create_graph=True)
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1))
        return upsample(cam, tuple(x.shape[-2:]))
    if surrogate == "saliency":
        with SoftplusReLU(beta):
            logits = model(x)
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x, create_graph=True)
        return grad.abs().amax(dim=1)
    raise UserError(f"surrogate must be 'gradcam' or 'saliency', got {surrogate!r}")


def _objective(
    maps: torch.Tensor, objective: Objective, top_mask: torch.Tensor, center0: torch.Tensor
) -> torch.Tensor:
    """Per-sample loss (B,) to minimise."""
    if objective == "topk":
        mass = maps.clamp_min(0).reshape(maps.shape[0], -1)
        return (mass * top_mask).sum(dim=1) / (mass.sum(dim=1) + 1e-12)
    return -(center_of_mass(maps) - center0).square().sum(dim=1).add(1e-12).sqrt()


def explanation_attack_inputs(
    ctx: MetricContext,
    *,
    epsilon: NonNegativeFloat = 8 / 255,
    steps: PositiveInt = 10,
    step_size: PositiveFloat | None = None,
    objective: Objective = "topk",
    k: Annotated[float | int, Range(0, open_min=True)] = 0.1,
    surrogate: Surrogate = "gradcam",
    layer: nn.Module | str | None = None,
    beta: NonNegativeFloat = 10.0,
) -> torch.Tensor:
    """The perturbed inputs of the explanation attack (see the module docstring)."""
    if not epsilon >= 0:
        raise UserError(
            f"epsilon must be >= 0 (an L-inf radius on the [0, 1] scale), got {epsilon}"
        )
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}")
    if objective not in ("topk", "center"):
        raise UserError(f"objective must be 'topk' or 'center', got {objective!r}")
    model = ctx.model
    x0 = ctx.x.detach()
    label = ctx.logits.argmax(dim=1).to(ctx.device).clone()  # a normal tensor, gather saves it
    b = x0.shape[0]
    maps0 = ctx.maps.to(ctx.device).float()
    count = resolve_k(k, maps0[0].numel())
    top_idx = torch.sort(-maps0.reshape(b, -1), dim=1, stable=True).indices[:, :count]
    top_mask = torch.zeros(b, maps0[0].numel(), device=ctx.device).scatter_(1, top_idx, 1.0)
    center0 = center_of_mass(maps0).to(maps0.dtype)
    alpha = torch.full(
        (b, 1, 1, 1), epsilon / 4 if step_size is None else float(step_size), device=ctx.device
    )
    x = x0.clone()
    if epsilon == 0:
        return x
    with model_guard(model):
        for p in model.parameters():
            p.requires_grad_(False)  # restored by model_guard; only the input gradient is needed
        for _ in range(steps):
            with torch.enable_grad():
                xr = x.clone().requires_grad_(True)
                maps = surrogate_maps(model, xr, label, surrogate=surrogate, layer=layer, beta=beta)
                loss = _objective(maps.float(), objective, top_mask, center0)
                (grad,) = torch.autograd.grad(loss.sum(), xr)
            candidate = torch.minimum(
                torch.maximum(x - alpha * grad.sign(), x0 - epsilon), x0 + epsilon
            ).clamp(0, 1)
            ok = (predicted(ctx, candidate) == label).reshape(b, 1, 1, 1)
            x = torch.where(ok, candidate, x)
            alpha = torch.where(
                ok, alpha, alpha / 2
            )  # a rejected image retries with a smaller step
    return x.detach()


@METRICS.register(
    "explanation_attack",
    aliases=("explanation-attack", "ghorbani_attack"),
    kind="adversarial",
    higher_is_better=True,
    needs=("explainer",),
    secondary=(("label_kept", True), ("spearman", True), ("map_shift", False)),
)
def explanation_attack(
    ctx: MetricContext,
    *,
    epsilon: NonNegativeFloat = 8 / 255,
    steps: PositiveInt = 10,
    step_size: PositiveFloat | None = None,
    objective: Objective = "topk",
    k: Annotated[float | int, Range(0, open_min=True)] = 0.1,
    surrogate: Surrogate = "gradcam",
    layer: str | None = None,
    beta: NonNegativeFloat = 10.0,
) -> Scores:
    """Top-k intersection of the map after an explanation attack (Ghorbani et al. 2019) that
    keeps the predicted class with the original map (higher = more robust)."""
    require_explainer(ctx, "explanation_attack")
    x_adv = explanation_attack_inputs(
        ctx,
        epsilon=epsilon,
        steps=steps,
        step_size=step_size,
        objective=objective,
        k=k,
        surrogate=surrogate,
        layer=layer,
        beta=beta,
    )
    label = ctx.logits.argmax(dim=1).to(ctx.device)
    kept = (predicted(ctx, x_adv) == label).cpu().numpy()
    before = ctx.maps.to(ctx.device).float()
    after = explain_batched(ctx, ctx.model, x_adv, ctx.target)
    sims = {
        "value": topk_intersection(before, after, k=k),
        "spearman": spearman(before, after),
        "map_shift": center_of_mass_distance(before, after),
    }
    values = {name: np.where(kept, v.cpu().numpy(), np.nan) for name, v in sims.items()}
    return Scores(
        values={**values, "label_kept": kept.astype(np.float64)},
        unscored="the attack changed the predicted class (an explanation attack must keep it)",
    )
