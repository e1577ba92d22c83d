"""Synthetic ground-truth datasets (synth-cxr, synth-histo) and their drawing primitives.

Oracles: ``skimage.draw`` for ellipses and disks; independent pure-Python per-pixel
computations for blobs, segments and bands; for the generated datasets, the same item
rendered with its lesion (or marker) switched off, so "the mask is exact" means "the mask
is exactly the set of pixels the lesion changed"; binomial tolerances for rates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.ndimage import binary_erosion, gaussian_filter, label
from skimage.draw import disk as sk_disk
from skimage.draw import ellipse as sk_ellipse
from sklearn.linear_model import LogisticRegression

from cambench.benchmarks.core.errors import UserError
from cambench.datasets import DATASETS, _draw
from cambench.datasets import synth_cxr as cxr
from cambench.datasets import synth_histo as histo

pytestmark = pytest.mark.datasets

SIZE = (48, 56)
NAMES = ("synth-cxr", "synth-histo")


def make(name: str, split: str = "test", **options):
    return DATASETS.get(name).obj(split, **options)


# ---------------------------------------------------------------- drawing primitives


@pytest.mark.parametrize("seed", range(5))
def test_ellipse_mask_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    center = rng.uniform(-5, 60, 2)  # sometimes partly off the canvas
    radii = rng.uniform(2, 25, 2)
    angle = rng.uniform(-np.pi, np.pi)
    shape = _draw.ellipse(SIZE, tuple(center), tuple(radii), angle=angle, value=0.7, edge=0.4)
    expected = np.zeros(SIZE, dtype=bool)
    expected[sk_ellipse(*center, *radii, shape=SIZE, rotation=angle)] = True
    np.testing.assert_array_equal(shape.mask, expected)


def test_disk_mask_and_profile_by_hand():
    center, radius, value, edge = (20.3, 31.7), 6.4, 0.5, 0.3
    shape = _draw.disk(SIZE, center, radius, value=value, edge=edge)
    expected = np.zeros(SIZE, dtype=bool)
    expected[sk_disk(center, radius, shape=SIZE)] = True
    np.testing.assert_array_equal(shape.mask, expected)
    for r, c in [(20, 31), (23, 35), (15, 30)]:  # truncated Gaussian: value * edge ** rho^2
        rho2 = ((r - center[0]) ** 2 + (c - center[1]) ** 2) / radius**2
        assert rho2 < 1 and shape.intensity[r, c] == pytest.approx(value * edge**rho2)
    assert np.all(shape.intensity[~shape.mask] == 0)
    assert shape.intensity[shape.mask].min() >= value * edge


def test_batched_ellipses_equal_sum_of_single_ones():
    rng = np.random.default_rng(3)
    centers, radii = rng.uniform(-3, 55, (6, 2)), rng.uniform(1, 9, (6, 2))
    angles, values = rng.uniform(0, np.pi, 6), rng.uniform(0.2, 1, 6)
    batch = _draw.ellipses(SIZE, centers, radii, angles=angles, values=values, edge=0.5)
    singles = [
        _draw.ellipse(SIZE, tuple(c), tuple(r), angle=a, value=v, edge=0.5)
        for c, r, a, v in zip(centers, radii, angles, values, strict=True)
    ]
    np.testing.assert_allclose(
        batch.intensity, sum(s.intensity for s in singles), rtol=1e-12, atol=0
    )
    np.testing.assert_array_equal(batch.mask, np.logical_or.reduce([s.mask for s in singles]))


def test_blob_mask_matches_pure_python_boundary():
    rng = np.random.default_rng(7)
    center, radius = (22.4, 25.9), 9.0
    harmonics = _draw.random_harmonics(rng, 1, irregularity=0.4)
    shape = _draw.blobs(SIZE, [center], radius, harmonics=harmonics, values=0.3, edge=0.5)
    expected = np.zeros(SIZE, dtype=bool)
    for r in range(SIZE[0]):
        for c in range(SIZE[1]):
            dy, dx = r - center[0], c - center[1]
            t = math.atan2(dy, dx)
            boundary = radius * (
                1 + sum(a * math.cos((k + 2) * t + p) for k, (a, p) in enumerate(harmonics[0]))
            )
            expected[r, c] = math.hypot(dy, dx) < boundary
    np.testing.assert_array_equal(shape.mask, expected)
    # Without harmonics a blob is a disk.
    round_blob = _draw.blobs(SIZE, [center], radius, values=0.3)
    expected_disk = np.zeros(SIZE, dtype=bool)
    expected_disk[sk_disk(center, radius, shape=SIZE)] = True
    np.testing.assert_array_equal(round_blob.mask, expected_disk)


def test_segment_mask_matches_pure_python_distance():
    start, end, half_width = (5.2, 8.1), (40.3, 44.6), 3.3
    shape = _draw.segment(SIZE, start, end, half_width, value=0.2, edge=0.5)
    expected = np.zeros(SIZE, dtype=bool)
    ax, ay, bx, by = start[1], start[0], end[1], end[0]
    length = math.hypot(bx - ax, by - ay)
    ux, uy = (bx - ax) / length, (by - ay) / length
    for r in range(SIZE[0]):
        for c in range(SIZE[1]):
            along = (c - ax) * ux + (r - ay) * uy
            if 0 <= along <= length:
                dist = abs((c - ax) * uy - (r - ay) * ux)  # perpendicular distance
            else:
                dist = min(math.hypot(c - ax, r - ay), math.hypot(c - bx, r - by))
            expected[r, c] = dist < half_width
    np.testing.assert_array_equal(shape.mask, expected)


def test_flat_bands_by_hand():
    bands = _draw.curved_bands(
        SIZE,
        vertex=(4.0, 0.0),
        spacing=7.0,
        count=4,
        half_width=1.6,
        curvature=0.0,
        cols=(10, 30),
        value=0.1,
    )
    expected = np.zeros(SIZE, dtype=bool)
    for j in range(4):
        for r in range(SIZE[0]):
            if abs(r - (4.0 + 7.0 * j)) < 1.6:
                expected[r, 10:30] = True
    np.testing.assert_array_equal(bands.mask, expected)


@pytest.mark.parametrize("curvature", [0.03, -0.02])
def test_curved_bands_match_pure_python(curvature):
    """Per pixel: nearest band's centre line at that column, first-order normal distance."""
    vertex, spacing, count, half_width, cols = (12.3, 27.6), 6.5, 5, 1.7, (3.5, 50.0)
    bands = _draw.curved_bands(
        SIZE,
        vertex=vertex,
        spacing=spacing,
        count=count,
        half_width=half_width,
        curvature=curvature,
        cols=cols,
        value=0.1,
        edge=0.5,
    )
    expected = np.zeros(SIZE, dtype=bool)
    for r in range(SIZE[0]):
        for c in range(SIZE[1]):
            if not cols[0] <= c < cols[1]:
                continue
            centre_rows = [
                vertex[0] + j * spacing + curvature * (c - vertex[1]) ** 2 for j in range(count)
            ]
            nearest = min(centre_rows, key=lambda row: abs(r - row))
            slope = 2 * curvature * (c - vertex[1])
            expected[r, c] = abs(r - nearest) / math.sqrt(1 + slope**2) < half_width
    assert expected.sum() > 200
    np.testing.assert_array_equal(bands.mask, expected)


def test_drawn_shapes_change_exactly_their_masks():
    """A lesion drawn on a textured canvas changes exactly its mask's pixels, soft clip included."""
    rng = np.random.default_rng(11)
    canvas = rng.uniform(-0.3, 1.3, SIZE)  # reaches both soft-clip tails
    shapes = [
        _draw.blobs(
            SIZE,
            rng.uniform(0, 50, (5, 2)),
            rng.uniform(2, 6, 5),
            harmonics=_draw.random_harmonics(rng, 5, irregularity=0.3),
            values=0.2,
            edge=0.3,
        ),
        _draw.ellipse(SIZE, (20.5, 30.2), (8, 3), angle=0.4, value=-0.25, edge=0.6),
        _draw.segment(SIZE, (0, 10), (47, 12), 2.5, value=0.1, edge=0.5),
        _draw.curved_bands(
            SIZE,
            vertex=(5, 28),
            spacing=8,
            count=5,
            half_width=1.5,
            curvature=0.02,
            cols=(0, 56),
            value=0.08,
            edge=0.4,
        ),
        _draw.rectangle(SIZE, (2, 50), (5, 9), value=0.5),
    ]
    before = _draw.soft_clip(canvas).astype(np.float32)
    for shape in shapes:
        assert shape.mask.any()
        after = _draw.soft_clip(canvas + shape.intensity).astype(np.float32)
        np.testing.assert_array_equal(after != before, shape.mask)
    both = _draw.combine(shapes[0], shapes[2])
    after = _draw.soft_clip(canvas + both.intensity).astype(np.float32)
    np.testing.assert_array_equal(after != before, shapes[0].mask | shapes[2].mask)


def test_soft_clip_is_identity_inside_and_strictly_increasing():
    x = np.linspace(-1.5, 2.0, 20001)  # beyond, the upper tail is within float64 rounding of 1
    y = _draw.soft_clip(x)
    assert np.all(np.diff(y) > 0) and y.min() > 0 and y.max() < 1
    # In float32, a change of 0.01 (synth-cxr's smallest lesion step is 0.05) stays visible.
    z = np.linspace(-1.0, 1.5, 2001)
    assert np.all(
        _draw.soft_clip(z + 0.01).astype(np.float32) > _draw.soft_clip(z).astype(np.float32)
    )
    middle = (x >= 0.1) & (x <= 0.9)
    np.testing.assert_array_equal(y[middle], x[middle])
    for knee in (0.1, 0.9):  # continuous with slope 1 at the knees
        eps = 1e-6
        assert _draw.soft_clip(np.array([knee - eps]))[0] == pytest.approx(knee - eps, abs=1e-11)
        assert _draw.soft_clip(np.array([knee + eps]))[0] == pytest.approx(knee + eps, abs=1e-11)


def test_smooth_noise_has_unit_variance():
    rng = np.random.default_rng(0)
    fields = np.stack([_draw.smooth_noise(rng, (20, 20), cells=5) for _ in range(3000)])
    # Var = ||row basis||^2 * ||col basis||^2 = 1 at every pixel; 3000 draws: sd of var ~ 0.026.
    np.testing.assert_allclose(fields.var(axis=0)[::6, ::6], 1.0, atol=0.12)
    np.testing.assert_allclose(fields.mean(axis=0)[::6, ::6], 0.0, atol=0.08)


# ---------------------------------------------------------------- datasets: contract


@pytest.mark.parametrize("name", NAMES)
def test_registered_metadata(name):
    info = DATASETS.get(name).info
    assert info.source == "synthetic" and info.masks
    assert info.organ_masks == (name == "synth-cxr")


@pytest.mark.parametrize("name,channels", [("synth-cxr", 1), ("synth-histo", 3)])
def test_items_shapes_dtypes_range_and_balance(name, channels):
    ds = make(name, "val", n=40)
    assert len(ds) == 40 and ds.channels == channels and ds.num_classes == 2
    assert ds.images.shape == (40, channels, 64, 64) and ds.images.dtype == torch.float32
    assert torch.isfinite(ds.images).all() and ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.labels.tolist() == [i % 2 for i in range(40)]
    assert len(set(ds.ids)) == 40
    item = ds[3]
    assert item["image"].shape == (channels, 64, 64) and item["label"] == 1
    assert item["mask"].dtype == torch.bool and item["mask"].shape == (64, 64)
    assert ("organ_mask" in item) == (name == "synth-cxr")
    small = make(name, "train", n=4, image_size=40)
    assert small.images.shape == (4, channels, 40, 40)


@pytest.mark.parametrize("name", NAMES)
def test_negatives_have_empty_masks_positives_do_not(name):
    ds = make(name, "train", n=60)
    areas = ds.masks.flatten(1).sum(1)
    assert (areas[ds.labels == 0] == 0).all()
    assert (areas[ds.labels == 1] > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_data_other_seed_other_data(name):
    a, b, c = make(name, seed=3, n=12), make(name, seed=3, n=12), make(name, seed=4, n=12)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(make(name, "val", seed=3, n=12).images, a.images)


@pytest.mark.parametrize("name", NAMES)
def test_items_do_not_depend_on_split_size(name):
    short, long = make(name, n=10), make(name, n=25)
    assert torch.equal(short.images, long.images[:10]) and torch.equal(short.masks, long.masks[:10])
    assert short.ids == long.ids[:10]


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_are_user_errors(name):
    for bad in (dict(split="training"), dict(image_size=8), dict(n=0), dict(seed=-1)):
        options = {"split": "test", **bad}
        with pytest.raises(UserError):
            DATASETS.get(name).obj(options.pop("split"), **options)
    extra = dict(n_opacities=0) if name == "synth-cxr" else dict(clusters=9)
    with pytest.raises(UserError):
        make(name, **extra)


# ---------------------------------------------------------------- datasets: exact masks


@pytest.mark.parametrize("n_opacities", [1, 3])
def test_cxr_mask_is_exactly_what_the_opacities_changed(n_opacities):
    options = cxr.CxrOptions(n_opacities=n_opacities)
    for i in range(24):
        item = cxr.render(options, 5, "train", i)
        bare = cxr.render(options, 5, "train", i, draw_lesion=False)
        np.testing.assert_array_equal(item.image != bare.image, item.mask)
        assert not bare.mask.any()
        assert item.mask.any() == bool(i % 2)
        assert not (item.mask & ~item.organ_mask).any(), "opacities must lie inside the lungs"
        np.testing.assert_array_equal(item.organ_mask, bare.organ_mask)


def test_cxr_has_two_separate_lungs():
    ds = make("synth-cxr", n=20)
    for organ in ds.organ_masks.numpy():
        assert label(organ)[1] == 2 and 0.1 < organ.mean() < 0.35


@pytest.mark.parametrize("size", [64, 32])
def test_histo_mask_is_exactly_what_the_tumour_changed(size):
    options = histo.HistoOptions(size=size, clusters=2)
    for i in range(20):
        item = histo.render(options, 1, "test", i)
        bare = histo.render(options, 1, "test", i, draw_lesion=False)
        changed = item.image != bare.image
        np.testing.assert_array_equal(changed.any(0), item.mask)
        np.testing.assert_array_equal(changed.all(0), item.mask)  # darker in every channel
        assert (item.image <= bare.image).all()


@pytest.mark.parametrize("clusters", [1, 2, 4])
def test_histo_clusters_are_separate_instances(clusters):
    """Single linkage at 9 px splits a positive's mask into exactly ``clusters`` groups
    (nuclei of one cluster are < 7 px apart, clusters >= 12 px apart; see _tumour)."""
    options = histo.HistoOptions(clusters=clusters)
    for i in range(1, 30, 2):
        pixels = np.argwhere(histo.render(options, 0, "train", i).mask)
        groups = fcluster(linkage(pixels, method="single"), t=9.0, criterion="distance")
        assert groups.max() == clusters


# ---------------------------------------------------------------- confounder


def test_confounder_absent_by_default():
    ds = make("synth-cxr", n=40)
    assert not any(ds[i]["confounder"] for i in range(40))
    assert not ds.extras["confounder_mask"].any()


def test_confounder_rates_and_exact_marker_mask():
    rate, negative_rate, n = 0.8, 0.15, 300
    ds = make(
        "synth-cxr", "train", n=n, confounder_rate=rate, confounder_negative_rate=negative_rate
    )
    present = ds.extras["confounder"].numpy()
    labels = ds.labels.numpy()
    for p, lab in ((rate, 1), (negative_rate, 0)):
        k, m = present[labels == lab].sum(), (labels == lab).sum()
        assert abs(k - p * m) <= 4 * math.sqrt(m * p * (1 - p)), (lab, k, m)
    areas = ds.extras["confounder_mask"].flatten(1).sum(1).numpy()
    assert (areas[present] > 0).all() and (areas[~present] == 0).all()
    assert not (ds.extras["confounder_mask"] & (ds.organ_masks | ds.masks)).any()
    options = cxr.CxrOptions(confounder_rate=rate, confounder_negative_rate=negative_rate)
    for i in np.flatnonzero(present)[:12]:
        item = cxr.render(options, 0, "train", int(i))
        bare = cxr.render(options, 0, "train", int(i), draw_confounder=False)
        np.testing.assert_array_equal(item.image != bare.image, item.confounder_mask)
        np.testing.assert_array_equal(item.confounder_mask, ds.extras["confounder_mask"][i].numpy())
        assert item.image[item.confounder_mask].mean() > item.image[~item.confounder_mask].mean()


def test_marker_is_a_learnable_shortcut():
    """With confounder_rate=1 the marker alone predicts the label: a threshold on the
    brightest top-corner pixel separates the classes."""
    ds = make("synth-cxr", n=100, confounder_rate=1.0)
    corners = (
        torch.cat([ds.images[:, 0, :10, :10], ds.images[:, 0, :10, -10:]], dim=2).flatten(1).amax(1)
    )
    positives, negatives = corners[ds.labels == 1], corners[ds.labels == 0]
    assert positives.min() > negatives.max()


# ---------------------------------------------------------------- learnability


def _blob_features(ds) -> np.ndarray:
    """Per image: the extremes and mean of difference-of-Gaussians responses at two scales,
    over the lungs (eroded, so their edges do not count) or over the whole histology patch."""
    x = ds.images.numpy().astype(np.float64).mean(1)
    region = np.ones(x.shape, dtype=bool)
    if ds.organ_masks is not None:
        region = binary_erosion(ds.organ_masks.numpy(), np.ones((1, 5, 5)))
    features = []
    for sigma in (1.5, 3.0):
        dog = gaussian_filter(x, (0, sigma, sigma)) - gaussian_filter(x, (0, 2 * sigma, 2 * sigma))
        features += [
            np.where(region, dog, -np.inf).max((1, 2)),
            np.where(region, dog, np.inf).min((1, 2)),
        ]
        features.append(np.where(region, dog, 0).sum((1, 2)) / region.sum((1, 2)))
    return np.stack(features, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_lesions_are_visible_to_a_simple_classifier(name):
    """Guards against an impossible dataset (not the resnet18 acceptance run): logistic
    regression on seven blob-detector features separates the classes on held-out data."""
    train, test = make(name, "train", n=200), make(name, "test", n=160)
    f_train, f_test = _blob_features(train), _blob_features(test)
    mean, std = f_train.mean(0), f_train.std(0)
    model = LogisticRegression(max_iter=1000).fit((f_train - mean) / std, train.labels.numpy())
    assert model.score((f_test - mean) / std, test.labels.numpy()) > 0.9
