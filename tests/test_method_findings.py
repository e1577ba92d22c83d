"""Three findings about single methods, each pinned by a test.

- Smooth Grad-CAM++ "gives the same maps for two seeds": its noise does follow ``seed``; at a
  layer followed only by global average pooling and a linear head (the default target layer
  of ResNets and the zoo's GAP CNNs) the gradient does not depend on the input, so the noise
  cannot change the map and it equals Grad-CAM++'s. Both facts are tested.
- RISE "differs from an independent implementation": with the same masks it equals a
  re-implementation of the authors' ``RISE.forward`` (``eclique/RISE``) to float precision;
  what did differ is that it ran a model handed over in train mode in train mode (BatchNorm
  batch statistics, dropout on), which changed both the maps and the model.
- Guided backprop and DeconvNet left rectifiers spelt ``x.clamp(min=0)``, ``clamp_min(0)``,
  ``nn.ReLU6``, ``F.relu6`` or ``F.hardtanh(x, 0, 6)`` with their plain gradient (or, with no
  ReLU call at all, raised NotApplicable). Oracles: captum's ``GuidedBackprop`` and
  ``Deconvolution`` on the same weights written with ``nn.ReLU`` modules, and the guided rule
  for a bounded rectifier written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop
from skimage.transform import resize
from torch import nn

from cambench.cams import METHODS
from cambench.cams.guided import rectifier_call

pytestmark = [
    pytest.mark.methods,
    # captum's GuidedBackprop / Deconvolution warn on every call that they set backward hooks
    # on ReLU modules (and remove them): expected of the oracle, not a problem.
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU:UserWarning"),
]


def explain(name: str, model: nn.Module, x: torch.Tensor, target, **options):
    return METHODS.get(name).obj(model, x, target, **options)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


class BnCNN(nn.Module):
    """conv-BN-ReLU, max-pool, conv-BN-ReLU -> GAP -> Dropout -> Linear (``features`` is the
    GAP layer; ``features.4`` a conv whose gradient depends on the input)."""

    def __init__(self, in_channels: int = 3, n_classes: int = 5, p_drop: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
        )
        self.drop = nn.Dropout(p_drop)
        self.head = nn.Linear(12, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).mean(dim=(2, 3))))


def bn_cnn(in_channels: int = 3) -> BnCNN:
    torch.manual_seed(0)
    model = BnCNN(in_channels).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        model.head.weight.mul_(20.0)  # probabilities that move with the input
    return model


def images(b: int, channels: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.rand(b, channels, *size, generator=torch.Generator().manual_seed(seed))


# --- Smooth Grad-CAM++ ----------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
def test_smooth_gradcampp_seed_drives_the_noise(in_channels):
    model, x = bn_cnn(in_channels), images(3, in_channels, (16, 16))
    target = torch.tensor([0, 1, 2])
    rng = torch.random.get_rng_state()

    def run(seed: int) -> torch.Tensor:
        return explain(
            "smooth_gradcampp", model, x, target, layer="features.4", n_samples=6, seed=seed
        ).maps

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again), "the same seed must give the same maps"
    assert relative_gap(other, first) > 1e-3, "two seeds must give two maps"
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG state changed"


@pytest.mark.parametrize("in_channels", [1, 3])
def test_smooth_gradcampp_at_a_gap_linear_layer_is_gradcampp(in_channels):
    """dy/dA = W[c] / (h w) at the layer before GAP + Linear, whatever the input: the noise has
    nothing to average, for any seed or sigma (the documented property, not a seed bug)."""
    model, x = bn_cnn(in_channels), images(3, in_channels, (16, 16))
    target = torch.tensor([0, 1, 2])
    ref = explain("gradcampp", model, x, target, layer="features").maps
    for seed, sigma in ((0, 0.15), (1, 0.15), (2, 0.5)):
        got = explain(
            "smooth_gradcampp", model, x, target, layer="features", seed=seed, sigma=sigma
        ).maps
        assert relative_gap(got, ref) < 1e-5, (seed, sigma)


# --- RISE -----------------------------------------------------------------------------------


def authors_rise(
    model: nn.Module, x: torch.Tensor, *, n: int, s: int, p1: float, seed: int, gpu_batch: int
) -> torch.Tensor:
    """``RISE.generate_masks`` + ``RISE.forward`` of eclique/RISE ``explanations.py`` for one
    image x (1, C, H, W), rewritten here: saliency (classes, H, W) = P^T M / N / p1 with P the
    softmax of the model on x * M_i. The random draws are the ones ``cams.rise`` documents (grid,
    then row shifts, then column shifts) in place of ``np.random``."""
    height, width = x.shape[-2:]
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand((n, s, s), generator=gen) < p1).numpy().astype("float32")
    cell_size = np.ceil(np.array((height, width)) / s)
    up_size = ((s + 1) * cell_size).astype(int)
    shift_rows = torch.randint(0, int(cell_size[0]), (n,), generator=gen).numpy()
    shift_cols = torch.randint(0, int(cell_size[1]), (n,), generator=gen).numpy()
    masks = np.empty((n, height, width))
    for i in range(n):
        up = resize(grid[i], up_size, order=1, mode="reflect", anti_aliasing=False)
        masks[i] = up[shift_rows[i] : shift_rows[i] + height, shift_cols[i] : shift_cols[i] + width]
    masks_t = torch.from_numpy(masks.reshape(-1, 1, height, width)).float()
    softmax_model = nn.Sequential(model, nn.Softmax(dim=1))
    stack = torch.mul(masks_t, x.data)
    with torch.no_grad():
        p = torch.cat(
            [softmax_model(stack[i : min(i + gpu_batch, n)]) for i in range(0, n, gpu_batch)]
        )
    sal = torch.matmul(p.transpose(0, 1), masks_t.view(n, height * width))
    return sal.view(p.shape[1], height, width) / n / p1


def test_rise_equals_the_authors_forward_with_the_same_masks():
    """N = 96, s = 6, p = 0.5, probability scores: the setting of the report, on an image
    size that the grid does not divide."""
    model, x = bn_cnn(), images(3, 3, (20, 17))
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    n, s, p1, seed = 96, 6, 0.5, 4
    got = explain("rise", model, x, target, n_masks=n, cells=s, p=p1, seed=seed, batch_size=40)
    expected = torch.stack(
        [
            authors_rise(model, x[i : i + 1], n=n, s=s, p1=p1, seed=seed, gpu_batch=32)[c]
            for i, c in enumerate(target.tolist())
        ]
    )
    assert relative_gap(got.maps, expected) < 1e-5
    torch.testing.assert_close(got.maps, expected, rtol=1e-5, atol=1e-7)


def test_rise_runs_a_train_mode_model_in_eval_mode_and_leaves_it_unchanged():
    """Fails before the fix: RISE ran the model in the mode it came in, so a model in train
    mode normalized with batch statistics, dropped units and updated its running statistics."""
    x = images(3, 3, (20, 17))
    target = torch.tensor([0, 3, 1])
    options = {"n_masks": 24, "cells": 4, "seed": 1}
    expected = explain("rise", bn_cnn(), x, target, **options).maps
    model = bn_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = explain("rise", model, x, target, **options).maps
    assert all(m.training for m in model.modules()), "the model must come back in train mode"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert not changed, f"parameters or buffers changed: {changed}"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- guided backprop and DeconvNet: rectifiers that are not nn.ReLU --------------------------


class RectifierCNN(nn.Module):
    """conv -> r1 -> conv (stride 2) -> r2 -> GAP -> Linear, r1 and r2 given (modules or
    functions), so the same weights can be written with different rectifier spellings."""

    def __init__(self, r1, r2, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8, classes)
        self.r1, self.r2 = r1, r2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h2 = self.r2(self.conv2(self.r1(self.conv1(x))))
        return self.head(h2.mean(dim=(2, 3)))


def rectifier_cnn(r1, r2, *, weight_scale: float = 1.0) -> RectifierCNN:
    torch.manual_seed(0)
    model = RectifierCNN(r1, r2).eval()
    with torch.no_grad():
        model.conv1.weight.mul_(weight_scale)
        model.conv2.weight.mul_(weight_scale)
        model.head.weight.mul_(10.0)
    return model


CLAMP_RELUS = {
    "Tensor.clamp(min=0)": lambda t: t.clamp(min=0),
    "torch.clamp(t, 0)": lambda t: torch.clamp(t, 0),
    "Tensor.clamp_min(0)": lambda t: t.clamp_min(0),
    "torch.clip(t, min=0.0)": lambda t: torch.clip(t, min=0.0),
    "Tensor.clamp_(min=0)": lambda t: t.clamp_(min=0),
}
ORACLES = {"guided": GuidedBackprop, "deconvnet": Deconvolution}
METHOD_OF = {"guided": "guided_backprop", "deconvnet": "deconvnet"}


@pytest.fixture
def guided_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("first", ["clamp", "nn.ReLU"])
@pytest.mark.parametrize("rule", sorted(ORACLES))
@pytest.mark.parametrize("spelling", sorted(CLAMP_RELUS))
def test_a_relu_written_as_a_clamp_is_guided(spelling, rule, first, guided_batch):
    """Both rectifiers clamps (before the fix: NotApplicable, no ReLU seen), or the first an
    ``nn.ReLU`` (before the fix: the clamp kept its plain gradient, a map 0.44 away)."""
    x, target = guided_batch
    modules = rectifier_cnn(nn.ReLU(), nn.ReLU())
    clamp = CLAMP_RELUS[spelling]
    clamped = rectifier_cnn(clamp if first == "clamp" else nn.ReLU(), clamp)
    with torch.no_grad():
        torch.testing.assert_close(clamped(x), modules(x))  # the same function
    ref = ORACLES[rule](modules).attribute(x.clone(), target=target).abs().amax(dim=1)
    ours_modules = explain(METHOD_OF[rule], modules, x, target).maps
    ours_clamped = explain(METHOD_OF[rule], clamped, x, target).maps
    assert relative_gap(ours_modules, ref) < 1e-5
    assert relative_gap(ours_clamped, ref) < 1e-5
    # The plain gradient through the clamps is far from it: the check can tell.
    plain = explain("saliency", clamped, x, target).maps
    assert relative_gap(plain, ref) > 0.05


RELU6S = {
    "nn.ReLU6": lambda: nn.ReLU6(),
    "nn.ReLU6(inplace)": lambda: nn.ReLU6(inplace=True),
    "F.relu6": lambda: F.relu6,
    "F.hardtanh(t, 0, 6)": lambda: lambda t: F.hardtanh(t, 0.0, 6.0),
    "nn.Hardtanh(0, 6)": lambda: nn.Hardtanh(0.0, 6.0),
    "Tensor.clamp(0, 6)": lambda: lambda t: t.clamp(0, 6),
}


def hand_rule(
    model: RectifierCNN,
    x: torch.Tensor,
    target: torch.Tensor,
    rule: str,
    highs: tuple[float | None, float | None],
) -> torch.Tensor:
    """The modified input gradient written out by hand: transposed convolutions for the linear
    layers and, at rectifier i with input z, bound ``highs[i]`` (None: a ReLU) and arriving
    gradient g, ReLU(g) times [0 < z < high] (guided) or ReLU(g) alone (DeconvNet)."""

    def rectify_backward(z: torch.Tensor, g: torch.Tensor, high: float | None) -> torch.Tensor:
        passed = g.clamp(min=0)
        if rule == "deconvnet":
            return passed
        inside = (z > 0) if high is None else (z > 0) & (z < high)
        return passed * inside

    with torch.no_grad():
        z1 = model.conv1(x)
        h1 = z1.clamp(min=0, max=highs[0])
        z2 = model.conv2(h1)
        g_h2 = model.head.weight[target][:, :, None, None].expand_as(z2) / z2[0, 0].numel()
        g_z2 = rectify_backward(z2, g_h2, highs[1])
        g_h1 = torch.nn.grad.conv2d_input(h1.shape, model.conv2.weight, g_z2, stride=2, padding=1)
        g_z1 = rectify_backward(z1, g_h1, highs[0])
        return torch.nn.grad.conv2d_input(x.shape, model.conv1.weight, g_z1, padding=1)


@pytest.mark.parametrize("first", ["relu6", "nn.ReLU"])
@pytest.mark.parametrize("rule", sorted(ORACLES))
@pytest.mark.parametrize("spelling", sorted(RELU6S))
def test_relu6_is_guided_by_the_bounded_rule(spelling, rule, first, guided_batch):
    """Both rectifiers ReLU6 (before the fix: NotApplicable), or the first an ``nn.ReLU``
    (before the fix: the ReLU6 kept its plain gradient, a guided map 0.66 away)."""
    x, target = guided_batch
    relu6 = RELU6S[spelling]
    model = rectifier_cnn(relu6() if first == "relu6" else nn.ReLU(), relu6(), weight_scale=8.0)
    highs = (6.0 if first == "relu6" else None, 6.0)
    with torch.no_grad():
        z2 = model.conv2(model.r1(model.conv1(x)))
    assert float((z2 > 6).float().mean()) > 0.05, "the test needs inputs above the bound"
    expected = hand_rule(model, x, target, rule, highs).abs().amax(dim=1)
    got = explain(METHOD_OF[rule], model, x, target).maps
    assert relative_gap(got, expected) < 1e-5
    if rule == "guided":
        # The upper bound's mask matters: the ReLU rule (mask z > 0 only) is another map.
        relu_rule = hand_rule(model, x, target, rule, (None, None)).abs().amax(dim=1)
        assert relative_gap(relu_rule, expected) > 0.05


def test_only_rectifiers_at_zero_are_recognized():
    t = torch.randn(3)
    assert rectifier_call(torch.clamp, (t,), {"min": 0}) == (t, None, False)
    assert rectifier_call(torch.Tensor.clamp_, (t, 0, 6), {}) == (t, 6.0, True)
    assert rectifier_call(F.hardtanh, (t,), {"min_val": 0.0, "max_val": 6.0}) == (t, 6.0, False)
    for func, args, kwargs in [
        (torch.clamp, (t,), {"min": -1}),  # not a rectifier at 0
        (torch.clamp, (t,), {"max": 6}),  # no lower bound
        (torch.clamp, (t,), {"min": torch.tensor(0.0)}),  # a tensor bound is left alone
        (torch.clamp, (t, 0, 0), {}),  # a constant, not a rectifier
        (F.hardtanh, (t,), {}),  # hardtanh(-1, 1)
        (torch.clamp, (t.long(),), {"min": 0}),  # integers carry no gradient
    ]:
        assert rectifier_call(func, args, kwargs) is None, (func, args, kwargs)
