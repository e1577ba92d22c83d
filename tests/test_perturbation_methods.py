"""Perturbation and sampling methods against oracles: occlusion vs captum ``Occlusion``,
Score-CAM vs pytorch-grad-cam ``ScoreCAM``, RISE masks vs the paper's skimage resize and
its saliency vs a closed form, Smooth Grad-CAM++ vs its closed form and vs Grad-CAM++.
Plus, for each method: the answer does not depend on the batch or on the batching knob,
maps are finite float32 (B, H, W) for a black image and a dead target, and the model
leaves a call as it came.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from skimage.transform import resize
from torch import nn
from torchvision.models import resnet18

from cambench.cams import METHODS
from cambench.cams.rise import rise_masks

pytestmark = pytest.mark.methods

METHOD_NAMES = ("occlusion", "rise", "scorecam", "smooth_gradcampp")
KNOB_VALUES = (1, 7, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny and batch_size=1 runs many small forwards: intra-op threads
    cost more than they save, and on a shared 2-core machine oversubscription made those
    runs 20x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def explain(name: str, model, x, target, **options):
    return METHODS.get(name).obj(model, x, target, **options)


def minmax(maps: torch.Tensor | np.ndarray) -> torch.Tensor:
    flat = torch.as_tensor(np.asarray(maps), dtype=torch.float64).flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    top = flat.max(dim=1, keepdim=True).values
    return (flat / torch.where(top > 0, top, torch.ones_like(top))).reshape(np.shape(maps))


class SmallCNN(nn.Module):
    """A few conv layers, a 16x16 target layer ``features`` at 32x32 input, GAP + linear."""

    def __init__(self, channels: int = 3, n_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, n_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    with torch.no_grad():
        # Larger logit differences between masked inputs, so Score-CAM's channel softmax is
        # far from uniform and the oracle comparison can tell weightings apart.
        model.head.weight.mul_(20.0)
    return model


def batch(b: int = 4, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.tensor([0, 3, 1, 4, 2, 0][:b])


def assert_invariant(name: str, model, x, target, **options) -> None:
    """Same maps (1e-5) for every batching knob value and for the images one at a time."""
    ref = explain(name, model, x, target, batch_size=KNOB_VALUES[0], **options).maps
    scale = max(float(ref.abs().max()), 1e-12)
    for knob in KNOB_VALUES[1:]:
        got = explain(name, model, x, target, batch_size=knob, **options).maps
        torch.testing.assert_close(
            got / scale, ref / scale, rtol=0, atol=1e-5, msg=f"batch_size={knob}"
        )
    alone = torch.cat(
        [
            explain(name, model, x[i : i + 1], target[i : i + 1], **options).maps
            for i in range(len(x))
        ]
    )
    torch.testing.assert_close(
        alone / scale, ref / scale, rtol=0, atol=1e-5, msg="one image at a time"
    )


# --- occlusion ---------------------------------------------------------------------------


@pytest.mark.slow
def test_occlusion_matches_captum_on_resnet18():
    """captum Occlusion, window (3, 16, 16), stride (3, 10, 10): the last window of each row
    and column is cropped at the edge (64 = 50 + 14), which captum also does."""
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 5, 9])
    got = explain("occlusion", model, x, target, window=16, stride=10, baseline=0.5, batch_size=64)
    ref = Occlusion(model).attribute(
        x,
        target=target,
        sliding_window_shapes=(3, 16, 16),
        strides=(3, 10, 10),
        baselines=0.5,
        perturbations_per_eval=64,
    )
    ref = ref.sum(dim=1)  # channel reduction: sum (our documented rule)
    assert got.maps.shape == (4, 64, 64) and got.maps.dtype == torch.float32
    torch.testing.assert_close(minmax(got.maps), minmax(ref), rtol=0, atol=1e-4)
    torch.testing.assert_close(got.maps, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "window, stride",
    [((5, 7), (3, 4)), ((6, 32), (4, 1)), (32, 8)],
    ids=["rect", "full-width", "whole"],
)
def test_occlusion_matches_captum_geometries(window, stride):
    """Rectangular windows, a window as wide as the image, and one covering all of it."""
    model = small_cnn()
    x, target = batch()
    got = explain("occlusion", model, x, target, window=window, stride=stride, baseline=-1.0)
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ref = (
        Occlusion(model)
        .attribute(
            x,
            target=target,
            sliding_window_shapes=(3, wh, ww),
            strides=(3, sh, sw),
            baselines=-1.0,
            perturbations_per_eval=50,
        )
        .sum(dim=1)
    )
    torch.testing.assert_close(got.maps, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_occlusion_batch_invariance():
    model = small_cnn()
    x, target = batch()
    assert_invariant("occlusion", model, x, target, window=8, stride=4)


def test_occlusion_rejects_bad_geometry():
    model = small_cnn()
    x, target = batch(1)
    with pytest.raises(ValueError, match="window <= 32"):
        explain("occlusion", model, x, target, window=40)
    with pytest.raises(ValueError, match="stride <= window"):
        explain("occlusion", model, x, target, window=4, stride=6)


# --- RISE --------------------------------------------------------------------------------


def paper_masks(n: int, size: tuple[int, int], cells: int, p: float, seed: int) -> np.ndarray:
    """RISE masks as the paper's code makes them (skimage bilinear resize, mode='reflect',
    random shift), from the documented random draws."""
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand((n, cells, cells), generator=gen) < p).numpy().astype(np.float64)
    cell = (int(np.ceil(size[0] / cells)), int(np.ceil(size[1] / cells)))
    dy = torch.randint(0, cell[0], (n,), generator=gen).numpy()
    dx = torch.randint(0, cell[1], (n,), generator=gen).numpy()
    up = ((cells + 1) * cell[0], (cells + 1) * cell[1])
    out = np.empty((n, *size))
    for i in range(n):
        big = resize(grid[i], up, order=1, mode="reflect", anti_aliasing=False)
        out[i] = big[dy[i] : dy[i] + size[0], dx[i] : dx[i] + size[1]]
    return out


def test_rise_masks_match_paper_resize():
    got = rise_masks(30, (30, 26), cells=4, p=0.4, seed=3)
    ref = paper_masks(30, (30, 26), cells=4, p=0.4, seed=3)
    np.testing.assert_allclose(got.build(torch.arange(30)).numpy(), ref, atol=1e-6)
    # E[M] = p, which is why the saliency is divided by p.
    many = rise_masks(4000, (16, 16), cells=4, p=0.4, seed=0).build(torch.arange(4000))
    assert abs(float(many.mean()) - 0.4) < 0.01


class LogisticProbe(nn.Module):
    """Two classes with logits (0, t), t = <w, x>: P(1 | x) = sigmoid(t), P(0 | x) = sigmoid(-t)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        t = (x * self.w).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(t), t], dim=1)


@pytest.mark.parametrize("score", ["probability", "logit"])
def test_rise_closed_form(score):
    """S = sum_i f(x * M_i) M_i / (N p) with f = sigmoid(+-<w, x M_i>) (or the logit t)."""
    g = torch.Generator().manual_seed(0)
    size, n, cells, p = (12, 10), 64, 3, 0.5
    w = torch.randn(1, 1, *size, generator=g) * 0.3
    x = torch.rand(4, 1, *size, generator=g)
    target = torch.tensor([1, 0, 1, 1])
    got = explain(
        "rise",
        LogisticProbe(w),
        x,
        target,
        n_masks=n,
        cells=cells,
        p=p,
        seed=5,
        score=score,
        batch_size=24,
    )
    masks = paper_masks(n, size, cells, p, seed=5)  # (N, H, W)
    t = np.einsum("bhw,nhw->bn", (x[:, 0] * w[0, 0]).double().numpy(), masks)
    if score == "probability":
        sign = np.where(target.numpy() == 1, 1.0, -1.0)[:, None]
        f = 1.0 / (1.0 + np.exp(-sign * t))
    else:
        f = np.where(target.numpy()[:, None] == 1, t, 0.0)
    expected = np.einsum("bn,nhw->bhw", f, masks) / (n * p)
    np.testing.assert_allclose(got.maps.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_rise_batch_invariance():
    model = small_cnn()
    x, target = batch()
    assert_invariant("rise", model, x, target, n_masks=40, cells=4, seed=2)


# --- Score-CAM ---------------------------------------------------------------------------


@pytest.mark.parametrize("softmax_target", [False, True], ids=["logit", "probability"])
def test_scorecam_matches_pytorch_grad_cam(softmax_target):
    """pytorch-grad-cam ScoreCAM (ClassifierOutputTarget / ClassifierOutputSoftmaxTarget).

    Its output is min-max normalized at the layer's resolution, resized with cv2 (bilinear
    with half-pixel centres, as ours) and min-max normalized again: it equals our full-size
    map after min-max. Its layer-resolution map (``get_cam_image``, ReLU'd as its forward
    does) is compared with our ``layer_maps`` after min-max too.
    """
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    model = small_cnn()
    x, target = batch()
    score = "probability" if softmax_target else "logit"
    got = explain("scorecam", model, x, target, layer="features", score=score, batch_size=64)
    make = ClassifierOutputSoftmaxTarget if softmax_target else ClassifierOutputTarget
    targets = [make(int(c)) for c in target]
    with ScoreCAM(model, [model.features]) as oracle:
        oracle.batch_size = 16
        full = oracle(input_tensor=x, targets=targets)
        oracle.activations_and_grads(x)
        activations = oracle.activations_and_grads.activations[0].numpy()
        layer = np.maximum(oracle.get_cam_image(x, model.features, targets, activations, None), 0)
    assert got.maps.shape == (4, 32, 32) and got.layer_maps.shape == (4, 16, 16)
    torch.testing.assert_close(minmax(got.maps), minmax(full), rtol=0, atol=1e-4)
    torch.testing.assert_close(minmax(got.layer_maps), minmax(layer), rtol=0, atol=1e-4)
    # The weighting matters here: equal channel weights give a map further from the oracle's
    # than ten times the tolerance.
    uniform = np.maximum(activations.mean(axis=1), 0)
    assert float((minmax(uniform) - minmax(layer)).abs().max()) > 1e-3


class ChannelProbe(nn.Module):
    """The target layer ``tap`` is the input itself (K = C channels at input resolution);
    logits (0, <w, x>)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.tap = nn.Identity()
        self.register_buffer("w", w)

    def forward(self, x):
        a = self.tap(x)
        t = (a * self.w).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(t), t], dim=1)


@pytest.mark.parametrize("variant", ["paper", "pytorch-grad-cam"])
def test_scorecam_closed_form(variant):
    """M_k = minmax(x_k) (0 for the constant channel 2), s_k = score of class 1 on x * M_k,
    w = s (paper: probability sigmoid(t_k)) or softmax_k(t_k); map = ReLU(sum_k w_k x_k)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 3, 8, 8, generator=g) * 0.5
    x = torch.randn(2, 3, 8, 8, generator=g)
    x[:, 2] = 0.7
    paper = variant == "paper"
    options = (
        {"score": "probability", "channel_softmax": False, "align_corners": False} if paper else {}
    )
    got = explain(
        "scorecam", ChannelProbe(w), x, torch.tensor([1, 1]), layer="tap", batch_size=4, **options
    )
    xd, wd = x.double().numpy(), w.double().numpy()[0]
    expected = []
    for img in xd:
        low = img.min(axis=(1, 2), keepdims=True)
        span = img.max(axis=(1, 2), keepdims=True) - low
        masks = np.where(span > 0, (img - low) / np.where(span > 0, span, 1), 0.0)
        t = np.array([(img * m * wd).sum() for m in masks])
        weights = 1 / (1 + np.exp(-t)) if paper else np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        expected.append(np.maximum(np.einsum("k,khw->hw", weights, img), 0))
    np.testing.assert_allclose(got.maps.numpy(), np.stack(expected), rtol=1e-5, atol=1e-6)


def test_scorecam_batch_invariance():
    model = small_cnn()
    x, target = batch()
    assert_invariant("scorecam", model, x, target, layer="features")


# --- Smooth Grad-CAM++ ---------------------------------------------------------------------


class QuadraticProbe(nn.Module):
    """Target layer ``tap`` = the input (K = C); logit_c = 1/2 sum W_c * A^2, so dy_c/dA = W_c * A."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.tap = nn.Identity()
        self.register_buffer("w", w)  # (n_classes, C, H, W)

    def forward(self, x):
        a = self.tap(x)
        return 0.5 * torch.einsum("nchw,bchw->bn", self.w, a * a)


def test_smooth_gradcampp_closed_form():
    """Noisy copies x + sigma * range(x) * z_m, z from the documented generator; g_m = W_c x_m;
    D1..D3 the means of g, g^2, g^3; alpha = D2 / (2 D2 + sum(A) D3) with A = x;
    w_k = sum alpha ReLU(D1); map = ReLU(sum_k w_k x_k)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 6, 6, generator=g)
    x = torch.rand(3, 2, 6, 6, generator=g) + 0.2
    target = torch.tensor([0, 2, 1])
    n, sigma, seed = 5, 0.2, 11
    got = explain(
        "smooth_gradcampp",
        QuadraticProbe(w),
        x,
        target,
        layer="tap",
        n_samples=n,
        sigma=sigma,
        seed=seed,
    )
    z = torch.randn((n, 2, 6, 6), generator=torch.Generator().manual_seed(seed)).double().numpy()
    expected = []
    for img, c in zip(x.double().numpy(), target.tolist(), strict=True):
        noisy = img[None] + sigma * (img.max() - img.min()) * z
        grads = w.double().numpy()[c][None] * noisy  # (n, K, H, W)
        d1, d2, d3 = grads.mean(0), (grads**2).mean(0), (grads**3).mean(0)
        alpha = d2 / (2 * d2 + img.sum(axis=(1, 2), keepdims=True) * d3)
        weights = (alpha * np.maximum(d1, 0)).sum(axis=(1, 2))
        expected.append(np.maximum(np.einsum("k,khw->hw", weights, img), 0))
    np.testing.assert_allclose(got.maps.numpy(), np.stack(expected), rtol=1e-4, atol=1e-6)


def test_smooth_gradcampp_without_noise_is_gradcampp():
    model = small_cnn()
    x, target = batch()
    got = explain("smooth_gradcampp", model, x, target, layer="features", n_samples=1, sigma=0.0)
    ref = explain("gradcampp", model, x, target, layer="features")
    torch.testing.assert_close(got.layer_maps, ref.layer_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.maps, ref.maps, rtol=1e-5, atol=1e-6)


def test_smooth_gradcampp_batch_invariance():
    model = small_cnn()
    x, target = batch()
    assert_invariant("smooth_gradcampp", model, x, target, layer="features", n_samples=4)


# --- every method: degenerate inputs, model hygiene, metadata ------------------------------

CHEAP = {
    "occlusion": {"window": 16, "stride": 16},
    "rise": {"n_masks": 8, "cells": 4},
    "scorecam": {"layer": "features"},
    "smooth_gradcampp": {"layer": "features", "n_samples": 2},
}


def model_state(model: nn.Module) -> list:
    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    return [
        hooks,
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
    ]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_degenerate_inputs_give_finite_maps_and_leave_model_as_it_came(name):
    model = small_cnn()
    model.features[0].requires_grad_(False)  # a mixed pattern of flags to be kept
    model.head.train()
    with torch.no_grad():  # class 4 is dead: its logit does not depend on the input
        model.head.weight[4] = 0.0
    before = model_state(model)
    x, _ = batch(2)
    cases = [(torch.zeros_like(x), torch.tensor([0, 1])), (x, torch.tensor([4, 4]))]
    for inputs, target in cases:
        maps = explain(name, model, inputs, target, **CHEAP[name]).maps
        assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
        assert bool(torch.isfinite(maps).all())
    with pytest.raises(ValueError, match="out of range"):
        explain(name, model, x, torch.tensor([0, 7]), **CHEAP[name])
    assert model_state(model) == before


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_registered_metadata(name):
    info = METHODS.get(name).info
    assert info.cost and "F" in info.cost
    assert info.family == ("perturbation" if name in ("occlusion", "rise") else "cam")
    assert info.randomized == (name in ("rise", "smooth_gradcampp"))


class ViewHead(SmallCNN):
    """SmallCNN flattened by ``.view``, which fails on a channels-last feature map: the model
    cannot take the channels-last batches the forward-only methods build on the CPU."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(12 * 16 * 16, 5)

    def forward(self, x):
        f = self.features(x)
        return self.head(f.view(f.shape[0], -1))


class ReshapeHead(ViewHead):
    def forward(self, x):
        f = self.features(x)
        return self.head(f.reshape(f.shape[0], -1))


@pytest.mark.parametrize("name", ["scorecam", "occlusion", "rise"])
def test_a_model_that_cannot_take_channels_last_batches_still_works(name):
    """The masked batches are channels-last on the CPU (``cams.base.input_buffer``); a model
    whose ``.view`` cannot take them gets them contiguous, with the maps of the same model
    written with ``.reshape`` (which takes either layout)."""
    torch.manual_seed(0)
    viewing = ViewHead().eval()
    reshaping = ReshapeHead().eval()
    reshaping.load_state_dict(viewing.state_dict())
    x, target = batch()
    with pytest.raises(RuntimeError):  # the premise: this model fails on channels-last input
        viewing(x.contiguous(memory_format=torch.channels_last))
    options = {"layer": "features", "batch_size": 7}
    if name == "rise":
        options["n_masks"] = 40
    got = explain(name, viewing, x, target, **options).maps
    want = explain(name, reshaping, x, target, **options).maps
    scale = max(float(want.abs().max()), 1e-12)
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-5)


def test_metric_forwards_take_a_model_that_cannot_take_channels_last_batches():
    """``MetricContext.predict`` runs its chunks channels-last on the CPU, contiguous for a
    model that cannot take that, with the logits of a direct forward."""
    from cambench.metrics.base import MetricContext

    torch.manual_seed(0)
    model = ViewHead().eval()
    x, target = batch()
    ctx = MetricContext(
        model=model,
        x=x,
        labels=target,
        target=target,
        maps=torch.zeros(x.shape[0], 32, 32),
        logits=model(x).detach(),
        ids=[str(i) for i in range(len(x))],
        batch_size=3,
    )
    got = ctx.predict([x, x.flip(-1)])
    with torch.inference_mode():
        want = torch.cat([model(x), model(x.flip(-1))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
