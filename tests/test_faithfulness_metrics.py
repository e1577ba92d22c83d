"""Deletion, insertion (metrics/deletion.py) and ROAD (metrics/road.py), with the AOPC of
metrics/faithfulness.py where Quantus has the same metric.

Oracles: hand computations on toy models whose curves are known in closed form, scipy's
``gaussian_filter`` for the insertion substrate, Quantus 0.6 (``RegionPerturbation``,
``PixelFlipping``, ``ROAD`` and its ``noisy_linear_imputation``) where it defines the same
metric with the same settings, and an ordering check on a model that looks only at a known
square.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.metrics.base import MetricContext
from cambench.metrics.deletion import deletion, insertion, pixels_per_step
from cambench.metrics.faithfulness import aopc_morf
from cambench.metrics.localization import pointing_game
from cambench.metrics.road import linear_imputation, noisy_linear_imputation, road_lerf, road_morf

pytestmark = pytest.mark.metrics


# --------------------------------------------------------------------------- toy models


class Constant(nn.Module):
    """Logits that do not depend on the input."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class Linear2(nn.Module):
    """Two classes with logits (0, sum(w * x) - bias): the class-1 probability is
    sigmoid(sum(w * x) - bias), so any pixel-replacement curve is known in closed form."""

    def __init__(self, w: torch.Tensor, bias: float):
        super().__init__()
        self.register_buffer("w", w)
        self.bias = bias

    def forward(self, x):
        s = (x * self.w).sum(dim=(1, 2, 3)) - self.bias
        return torch.stack([torch.zeros_like(s), s], dim=1)


class TinyNet(nn.Module):
    """A small non-linear classifier, for the comparisons with Quantus and the batch knob."""

    def __init__(self, channels: int, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4, classes)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


class Square(nn.Module):
    """Looks only at a known square: class-1 logit = gain * (mean inside - mean outside),
    class-0 logit = 0."""

    def __init__(self, inside: torch.Tensor, gain: float = 20.0):
        super().__init__()
        self.register_buffer("inside", inside.float())
        self.gain = gain

    def forward(self, x):
        m = x.mean(dim=1)
        inside = (m * self.inside).sum(dim=(1, 2)) / self.inside.sum()
        outside = (m * (1 - self.inside)).sum(dim=(1, 2)) / (1 - self.inside).sum()
        s = self.gain * (inside - outside)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def make_ctx(model, x, maps, *, target=None, batch_size=64, masks=None) -> MetricContext:
    model.eval()
    with torch.inference_mode():
        logits = model(x)
    if target is None:
        target = logits.argmax(1)
    return MetricContext(
        model=model,
        x=x,
        labels=target.clone(),
        target=target,
        maps=maps,
        logits=logits,
        ids=[f"s{i}" for i in range(x.shape[0])],
        masks=masks,
        batch_size=batch_size,
    )


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- deletion / insertion


@pytest.mark.parametrize("metric", [deletion, insertion])
@pytest.mark.parametrize("step", [5, 0.1, 64])
def test_auc_of_a_constant_curve_is_the_constant(metric, step):
    """A model whose probability does not depend on the input: AUC = that probability,
    also when the last step is shorter than the others (64 px, 5 px per step)."""
    model = Constant([0.3, 1.2, -0.5])
    ctx = make_ctx(model, rand(2, 3, 8, 8), rand(2, 8, 8, seed=1), target=torch.tensor([1, 2]))
    expected = torch.softmax(torch.tensor([0.3, 1.2, -0.5]), 0)[[1, 2]].numpy()
    np.testing.assert_allclose(metric(ctx, step=step).values["value"], expected, rtol=1e-6)


def hand_curve(x, w, bias, maps, step, fill, insert):
    """Closed-form curve and trapezoid AUC for Linear2: pixels change in stable
    decreasing-map order (ties in raster order), ``step`` per step."""
    curves, aucs = [], []
    for xi, mi, fi in zip(x.numpy(), maps.numpy(), fill.numpy(), strict=True):
        order = np.argsort(-mi.reshape(-1), kind="stable")
        n = order.size
        ks = list(range(0, n, step)) + [n]
        ys = []
        for k in ks:
            changed = np.zeros(n, bool)
            changed[order[:k]] = True
            changed = changed.reshape(mi.shape)[None]
            img = np.where(changed, xi, fi) if insert else np.where(changed, fi, xi)
            ys.append(1 / (1 + np.exp(-((img * w[0].numpy()).sum() - bias))))
        xs = np.array(ks) / n
        ys = np.array(ys)
        curves.append(ys)
        aucs.append(sum((ys[i] + ys[i + 1]) / 2 * (xs[i + 1] - xs[i]) for i in range(len(ks) - 1)))
    return np.array(curves), np.array(aucs)


@pytest.mark.parametrize("step", [5, 1, 16])
def test_deletion_matches_closed_form_on_a_linear_model(step):
    g = torch.Generator().manual_seed(3)
    w = torch.rand(1, 1, 8, 8, generator=g) - 0.3
    x = torch.rand(3, 1, 8, 8, generator=g)
    maps = (torch.rand(3, 8, 8, generator=g) * 4).floor()  # many ties: raster order decides
    model = Linear2(w, bias=0.5)
    ctx = make_ctx(model, x, maps, target=torch.ones(3, dtype=torch.long))
    scores = deletion(ctx, step=step)
    curve, auc = hand_curve(x, w, 0.5, maps, step, torch.zeros_like(x), insert=False)
    np.testing.assert_allclose(scores.curves["deletion"], curve, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.values["value"], auc, rtol=1e-5, atol=1e-6)


def test_insertion_matches_closed_form_on_a_linear_model():
    g = torch.Generator().manual_seed(4)
    w = torch.rand(1, 3, 8, 8, generator=g) - 0.5
    x = torch.rand(2, 3, 8, 8, generator=g)
    maps = torch.randn(2, 8, 8, generator=g)
    model = Linear2(w, bias=-0.2)
    ctx = make_ctx(model, x, maps, target=torch.ones(2, dtype=torch.long))
    scores = insertion(ctx, step=7, substrate="zero")
    curve, auc = hand_curve(x, w, -0.2, maps, 7, torch.zeros_like(x), insert=True)
    np.testing.assert_allclose(scores.curves["insertion"], curve, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.values["value"], auc, rtol=1e-5, atol=1e-6)


def test_insertion_starts_from_a_gaussian_blur_with_sigma_5():
    """The default substrate is the image blurred with sigma 5 (reflect padding, kernel
    radius 3 sigma): scipy's gaussian_filter with mode 'mirror' and truncate 3 is the oracle."""
    g = torch.Generator().manual_seed(5)
    w = torch.rand(1, 1, 32, 32, generator=g) - 0.5
    x = torch.rand(2, 1, 32, 32, generator=g)
    model = Linear2(w, bias=0.0)
    ctx = make_ctx(
        model, x, torch.rand(2, 32, 32, generator=g), target=torch.ones(2, dtype=torch.long)
    )
    curve = insertion(ctx, step=64).curves["insertion"]
    blurred = np.stack(
        [
            gaussian_filter(img, sigma=(0, 5, 5), mode="mirror", truncate=3.0)
            for img in x.double().numpy()
        ]
    )
    s = (blurred * w.double().numpy()).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(curve[:, 0], 1 / (1 + np.exp(-s)), rtol=1e-5)
    np.testing.assert_allclose(curve[:, -1], ctx.logits.softmax(1)[:, 1].numpy(), rtol=1e-6)


def test_step_is_a_pixel_count_or_a_share():
    assert pixels_per_step(1 / 224, 224 * 224) == 224  # the paper's setting
    assert pixels_per_step(5, 64) == 5 and pixels_per_step(100, 64) == 64
    assert pixels_per_step(1e-6, 64) == 1
    for bad in (0, -3, 0.0, 1.5, True, "8"):
        with pytest.raises(UserError, match="step"):
            pixels_per_step(bad, 64)


def test_auc_equals_rise_formula_when_the_step_divides_the_image():
    """RISE's auc: (sum - first/2 - last/2) / (n_points - 1), evenly spaced points."""
    net = TinyNet(3)
    ctx = make_ctx(net, rand(3, 3, 16, 16), rand(3, 16, 16, seed=1))
    for metric, name in ((deletion, "deletion"), (insertion, "insertion")):
        scores = metric(ctx, step=1 / 16)
        arr = scores.curves[name]
        assert arr.shape == (3, 17)
        rise = (arr.sum(1) - arr[:, 0] / 2 - arr[:, -1] / 2) / (arr.shape[1] - 1)
        np.testing.assert_allclose(scores.values["value"], rise, rtol=1e-10)


# --------------------------------------------------------------------------- Quantus agreement


@pytest.fixture(scope="module")
def quantus():
    """Quantus is an oracle, not a dependency of the harness."""
    return pytest.importorskip("quantus")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("baseline", [0.0, "black"])
def test_aopc_morf_curve_matches_quantus_region_perturbation(quantus, channels, baseline):
    """Quantus RegionPerturbation cuts the (padded) image into non-overlapping
    patch_size x patch_size patches on a grid, ranks them by the summed attribution
    (np.argsort(-sums): MoRF), replaces patch after patch by the baseline and returns
    f(x) - f(x^(k)) for k = 1..regions_evaluation. That is our MoRF curve's drops with the
    "zero" perturbation when: the patch divides the image (Quantus pads symmetrically, so its
    grid shifts otherwise; ours cuts edge regions short), the patch sums have no ties
    (np.argsort is not stable), the score is the logit (softmax=False) and the baseline is 0
    ("black" is the image's minimum, so each image gets a pixel at 0)."""
    net = TinyNet(channels)
    x = rand(4, channels, 16, 16, seed=1)
    x[:, :, 5, 7] = 0.0
    maps = rand(4, 16, 16, seed=2)
    ctx = make_ctx(net, x, maps)
    ours = aopc_morf(ctx, region=4, steps=10, perturbation="zero").curves["morf"]
    metric = quantus.RegionPerturbation(
        patch_size=4,
        regions_evaluation=10,
        perturb_baseline=baseline,
        normalise=False,
        disable_warnings=True,
    )
    ref = metric(
        model=net,
        x_batch=x.numpy(),
        y_batch=ctx.target.numpy(),
        a_batch=maps[:, None].numpy(),
        softmax=False,
        device="cpu",
    )
    np.testing.assert_allclose(ours[:, :1] - ours[:, 1:], np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,size,step", [(1, 16, 32), (3, 24, 48)])
def test_deletion_curve_matches_quantus_pixel_flipping(quantus, channels, size, step):
    """Quantus PixelFlipping flips ``features_in_step`` features per step in decreasing
    attribution order, replacing them by the baseline, and returns the softmax probability
    after each step (our curve without its start point). Its features are the C*H*W values
    of the attribution broadcast over channels; for a tie-free map the C copies of a pixel
    are adjacent in its order, so C * s features per step are our s pixels per step
    (Quantus requires features_in_step to divide H*W: 3 * 48 divides 24 * 24)."""
    net = TinyNet(channels)
    x = rand(4, channels, size, size, seed=3)
    maps = rand(4, size, size, seed=4)
    ctx = make_ctx(net, x, maps)
    ours = deletion(ctx, step=step).curves["deletion"]
    metric = quantus.PixelFlipping(
        features_in_step=step * channels,
        perturb_baseline=0.0,
        normalise=False,
        disable_warnings=True,
    )
    ref = metric(
        model=net,
        x_batch=x.numpy(),
        y_batch=ctx.target.numpy(),
        a_batch=maps[:, None].numpy(),
        softmax=True,
        device="cpu",
    )
    np.testing.assert_allclose(ours[:, 1:], np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_linear_imputation_matches_quantus(quantus, channels):
    """Quantus's noisy_linear_imputation (adapted from the ROAD reference code) with no
    noise, on pixel indices of the H*W grid; 3 channels share one system."""
    from quantus.functions.perturb_func import noisy_linear_imputation as reference

    rng = np.random.default_rng(channels)
    img = rng.random((channels, 12, 15))
    removed = rng.random((12, 15)) < 0.6
    ours = linear_imputation(img, removed)
    ref = reference(img, np.flatnonzero(removed), noise=0.0)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    np.testing.assert_array_equal(ours[:, ~removed], img[:, ~removed])


def test_road_morf_matches_quantus_road_on_one_channel(quantus):
    """Quantus ROAD (MoRF, percentages in percent, int(H*W*p/100) pixels removed, noise 0)
    scores whether the prediction stays the label; on a 2-class model that is our class
    probability > 0.5. Quantus ranks the C*H*W broadcast attribution and so works on
    1-channel images only; one call per image gives per-sample results."""
    net = TinyNet(1, classes=2, seed=3)
    with torch.no_grad():
        net.fc.weight.mul_(30)  # spread the probabilities away from 0.5
    x = rand(8, 1, 16, 16, seed=5)
    maps = rand(8, 16, 16, seed=6)
    target = torch.tensor([0, 1] * 4)
    ctx = make_ctx(net, x, maps, target=target)
    shares = (0.1, 0.29, 0.5, 0.75, 0.9)
    ours = road_morf(ctx, percentages=shares, noise=0.0).curves["morf"]
    metric = quantus.ROAD(
        percentages=[10, 29, 50, 75, 90], noise=0.0, normalise=False, disable_warnings=True
    )
    ref = []
    for i in range(8):
        out = metric(
            model=net,
            x_batch=x[i : i + 1].numpy(),
            y_batch=target[i : i + 1].numpy(),
            a_batch=maps[i : i + 1, None].numpy(),
            softmax=True,
            device="cpu",
        )
        ref.append([out[p] for p in (10, 29, 50, 75, 90)])
    ref = np.array(ref)
    assert 0 < ref.mean() < 1  # both outcomes occur: the comparison is not vacuous
    np.testing.assert_array_equal((ours > 0.5).astype(float), ref)


# --------------------------------------------------------------------------- ROAD hand checks


@pytest.mark.parametrize("channels", [1, 3])
def test_imputing_a_constant_image_returns_it(channels):
    x = torch.full((2, channels, 10, 12), 0.37)
    removed = rand(2, 10, 12, seed=7) < 0.7
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    torch.testing.assert_close(
        noisy_linear_imputation(x, removed, gens, noise=0.0), x, rtol=0, atol=1e-12
    )
    noisy = noisy_linear_imputation(x, removed, gens, noise=0.01)
    dev = (noisy - x).double()
    assert (dev[~removed[:, None].expand_as(x)] == 0).all()  # known pixels are untouched
    std = dev[removed[:, None].expand_as(x)].std().item()
    assert 0.008 < std < 0.012  # only the N(0, 0.01^2) noise on removed pixels


def test_a_linear_ramp_is_reconstructed_in_the_interior():
    """The 8-neighbour weighted mean is exact for a linear function wherever all 8
    neighbours exist: removed pixels away from the border are recovered exactly; with
    removed pixels on the border (where the one-sided mean is biased) the interior error
    stays small."""
    yy, xx = np.mgrid[0:24, 0:24]
    ramp = np.stack([0.01 * yy + 0.03 * xx, 0.5 - 0.02 * yy])
    rng = np.random.default_rng(0)
    removed = np.zeros((24, 24), bool)
    removed[1:-1, 1:-1] = rng.random((22, 22)) < 0.8
    np.testing.assert_allclose(linear_imputation(ramp, removed), ramp, atol=1e-12)
    removed = rng.random((24, 24)) < 0.5
    err = np.abs(linear_imputation(ramp, removed) - ramp)
    assert err[:, 6:-6, 6:-6].max() < 5e-3 < err.max()


def test_road_on_a_constant_image_is_the_constant_probability():
    model = Square(torch.zeros(8, 8, dtype=torch.bool).index_fill_(0, torch.tensor([2, 3]), True))
    x = torch.full((2, 3, 8, 8), 0.6)
    x[1] = 0.2
    ctx = make_ctx(model, x, rand(2, 8, 8, seed=8), target=torch.tensor([1, 0]))
    for metric in (road_morf, road_lerf):
        scores = metric(ctx, noise=0.0)
        np.testing.assert_allclose(scores.values["value"], 0.5, atol=1e-6)  # logit 0 -> 0.5
        assert next(iter(scores.curves.values())).shape == (2, 9)


def test_road_noise_is_per_sample_and_seeded():
    """The noise comes from each sample's own generator (run seed, sample id): the same
    whatever batch the sample is in, and it changes with the sample id."""
    net = TinyNet(3)
    x, maps = rand(3, 3, 12, 12, seed=9), rand(3, 12, 12, seed=10)
    whole = road_morf(make_ctx(net, x, maps), percentages=(0.5,)).curves["morf"]
    ctx = make_ctx(net, x[1:2], maps[1:2])
    ctx.ids = ["s1"]
    np.testing.assert_allclose(
        road_morf(ctx, percentages=(0.5,)).curves["morf"], whole[1:2], rtol=1e-6
    )
    ctx.ids = ["another"]
    assert road_morf(ctx, percentages=(0.5,)).curves["morf"][0, 0] != whole[1, 0]
    ctx.ids = ["s1"]
    no_noise = road_morf(ctx, percentages=(0.5,), noise=0.0).curves["morf"]
    assert no_noise[0, 0] != whole[1, 0]  # the noise is there at all


def test_road_rejects_bad_percentages():
    ctx = make_ctx(TinyNet(1), rand(1, 1, 8, 8), rand(1, 8, 8))
    for bad in ((), (0.5, 1.0), (-0.1,), (50,)):
        with pytest.raises(UserError, match="percentages"):
            road_morf(ctx, percentages=bad)
    with pytest.raises(UserError, match="noise"):
        road_morf(ctx, noise=-1.0)


# --------------------------------------------------------------------------- ordering


def square_setup(b: int, size: int = 32):
    """A bright square on a darker background, a model that looks only at the square, and
    the three maps: the square, a random map, the inverted square."""
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[8:24, 8:24] = True
    x = rand(b, 3, size, size, seed=11) * 0.5
    x[:, :, inside] += 0.4  # class 1 is predicted
    region = inside.float().expand(b, size, size).clone()
    maps = {"region": region, "random": rand(b, size, size, seed=12), "inverted": 1 - region}
    masks = inside.expand(b, size, size).clone()
    return Square(inside), x, maps, masks


def mean_score(metric, model, x, maps, masks, **options) -> float:
    ctx = make_ctx(model, x, maps, target=torch.ones(x.shape[0], dtype=torch.long), masks=masks)
    return float(metric(ctx, **options).values["value"].mean())


@pytest.mark.parametrize(
    "metric,options,higher",
    [
        (aopc_morf, dict(region=4, steps=16, perturbation="zero"), True),
        (deletion, dict(step=16), False),
        (insertion, dict(step=16), True),
        (pointing_game, {}, True),
    ],
    ids=["aopc_morf", "deletion", "insertion", "pointing_game"],
)
def test_region_map_beats_random_beats_inverted(metric, options, higher):
    """Acceptance: on a model that looks only at a known square, the map equal to the
    square beats a random map, which beats the inverted map."""
    model, x, maps, masks = square_setup(16)
    got = [mean_score(metric, model, x, maps[m], masks, **options) for m in maps]
    if not higher:
        got = [-v for v in got]
    assert got[0] > got[1] > got[2], got


@pytest.mark.parametrize("metric,higher", [(road_morf, False), (road_lerf, True)])
def test_road_prefers_the_region_map_to_the_inverted_one(metric, higher):
    """ROAD orders the square above the inverted square. A random map is not ordered
    between them, by ROAD's design: linear imputation restores randomly scattered removed
    pixels from their neighbours, so a random map's removals barely move the prediction
    (its MoRF is as bad as the inverted map's, its LeRF better than the square's)."""
    model, x, maps, masks = square_setup(4)
    shares = (0.1, 0.3, 0.5)
    region = mean_score(metric, model, x, maps["region"], masks, percentages=shares)
    inverted = mean_score(metric, model, x, maps["inverted"], masks, percentages=shares)
    assert (region > inverted) == higher and abs(region - inverted) > 0.1, (region, inverted)


# --------------------------------------------------------------------------- batch knob


@pytest.mark.parametrize(
    "metric,options",
    [
        (aopc_morf, dict(region=4, steps=9, perturbation="gaussian")),
        (deletion, dict(step=16)),
        (insertion, dict(step=16)),
        (road_morf, dict(percentages=(0.2, 0.6))),
        (road_lerf, dict(percentages=(0.2, 0.6))),
    ],
    ids=["aopc_morf", "deletion", "insertion", "road_morf", "road_lerf"],
)
def test_forward_batch_size_does_not_change_the_result(metric, options):
    net = TinyNet(3)
    x, maps = rand(5, 3, 12, 12, seed=13), rand(5, 12, 12, seed=14)
    ref = metric(make_ctx(net, x, maps, batch_size=64), **options)
    for batch_size in (1, 7, 512):
        got = metric(make_ctx(net, x, maps, batch_size=batch_size), **options)
        for name, curve in ref.curves.items():
            np.testing.assert_allclose(got.curves[name], curve, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.values["value"], ref.values["value"], rtol=1e-5, atol=1e-6)


def test_reference_size_scales_the_region_as_the_xray_protocol_says():
    """34x34 regions at 224 px: 34 * 28 / 224 = 4.25 -> 4 px at 28 px, 9.7 -> 10 px at 64."""
    from cambench.metrics.faithfulness import scaled_region

    assert scaled_region(34, 224, 28) == 4 and scaled_region(34, 224, 64) == 10
    assert scaled_region(34, None, 64) == 34 and scaled_region(34, 224, 2) == 1
