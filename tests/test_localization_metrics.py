"""Localization and complexity metrics (metrics/localization.py, metrics/complexity.py,
metrics/_binarize.py) against hand computations and independent implementations: Quantus
(PointingGame, RelevanceMassAccuracy, Sparseness), scikit-image (threshold_otsu) and
scikit-learn (average_precision_score)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable, UserError
from cambench.metrics import METRICS, MetricContext
from cambench.metrics._binarize import binarize, fraction_of_max_threshold, otsu_threshold

pytestmark = pytest.mark.metrics

MASK_METRICS = ["pointing_game", "energy_pointing_game", "iou", "dice", "auprc"]


def tiny_model(size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 2)).eval()


def make_ctx(maps, masks=None, organ_masks=None) -> MetricContext:
    """A MetricContext around the given (B, H, W) maps; the model and x are placeholders
    these metrics never read."""
    maps = torch.as_tensor(maps, dtype=torch.float32)
    b, h, w = maps.shape
    model = tiny_model(h) if h == w else nn.Identity()
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(b, dtype=torch.long)
    return MetricContext(
        model=model,
        x=x,
        labels=labels,
        target=labels.clone(),
        maps=maps,
        logits=torch.zeros(b, 2),
        ids=[f"s{i}" for i in range(b)],
        masks=None if masks is None else torch.as_tensor(masks, dtype=torch.bool),
        organ_masks=None if organ_masks is None else torch.as_tensor(organ_masks, dtype=torch.bool),
    )


def score(name: str, ctx: MetricContext, **options) -> np.ndarray:
    out = METRICS.get(name).obj(ctx, **options).values["value"]
    assert isinstance(out, np.ndarray) and out.shape == (ctx.maps.shape[0],)
    assert out.dtype == np.float64
    return out


def random_batch(b: int = 6, size: int = 8, seed: int = 0):
    """Continuous random maps (no ties) with signed values and random non-empty masks."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(b, size, size, generator=g)
    masks = torch.rand(b, size, size, generator=g) > 0.6
    masks[:, 0, 0] = True  # never empty
    return maps, masks


# --------------------------------------------------------------------------- hand computed


def test_pointing_game_hit_and_miss():
    m = torch.zeros(2, 4, 4)
    m[:, 1, 2] = 5.0
    m[:, 3, 3] = 4.0  # second highest, must not matter
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0:2, 1:3] = True  # covers (1, 2): hit
    mask[1, 3, 3] = True  # covers only the runner-up: miss
    ctx = make_ctx(m, mask)
    np.testing.assert_array_equal(score("pointing_game", ctx), [1.0, 0.0])
    np.testing.assert_array_equal(score("pointing_game", ctx, ties="any"), [1.0, 0.0])


def test_pointing_game_tie_rules():
    # Sample 0: two maxima, one inside. Sample 1: constant map, mask covers part.
    # Sample 2: constant map, mask covers everything. Sample 3: two maxima, both inside.
    m = torch.zeros(4, 4, 4)
    m[0, 0, 0] = m[0, 3, 3] = 1.0
    m[1] = 0.3
    m[3, 1, 1] = m[3, 1, 2] = 2.0
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[1, :2] = True
    mask[2] = True
    mask[3, 1, :] = True
    ctx = make_ctx(m, mask)
    # default "share": the share of tied maxima inside the mask, in closed form: 1 of 2
    # maxima; a constant map scores the mask's area fraction (8 of 16 pixels); 1; 2 of 2
    np.testing.assert_array_equal(score("pointing_game", ctx), [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(score("pointing_game", ctx, ties="all"), [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(score("pointing_game", ctx, ties="any"), [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(UserError, match="ties"):
        score("pointing_game", ctx, ties="first")


def test_energy_pointing_game_three_quarters():
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0] = 2.0
    m[0, 0, 1] = 1.0  # inside: 3
    m[0, 3, 3] = 1.0  # outside: 1
    m[0, 2, 2] = -7.0  # negative evidence outside: relu drops it
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    np.testing.assert_allclose(score("energy_pointing_game", make_ctx(m, mask)), [0.75])


def test_energy_pointing_game_without_positive_mass_is_zero():
    m = torch.stack([torch.zeros(4, 4), -torch.ones(4, 4)])
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    np.testing.assert_array_equal(score("energy_pointing_game", make_ctx(m, mask)), [0.0, 0.0])


def test_organ_mass_uses_organ_masks():
    m = torch.zeros(1, 4, 4)
    m[0, :, :2] = 1.0  # left half carries all mass
    lesion = torch.zeros(1, 4, 4, dtype=torch.bool)
    lesion[0, 0, 3] = True
    organ = torch.zeros(1, 4, 4, dtype=torch.bool)
    organ[0, :, 1:] = True  # left column outside: 4 of the 8 unit pixels inside
    ctx = make_ctx(m, lesion, organ)
    np.testing.assert_allclose(score("organ_mass", ctx), [0.5])
    np.testing.assert_allclose(score("energy_pointing_game", ctx), [0.0])


def test_iou_dice_fraction_of_max_by_hand():
    # Values as a fraction of the max 10: 1.0, 0.5, 0.2, 0.1, 0.15 exactly, rest 0.
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 0, 1], m[0, 0, 2], m[0, 0, 3], m[0, 1, 0] = 10.0, 5.0, 2.0, 1.0, 1.5
    # > 0.15 * 10 = 1.5 strictly: pixels (0,0), (0,1), (0,2); (1,0) sits on the threshold.
    expected_pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected_pred[0, 0, :3] = True
    assert torch.equal(binarize(m, 0.15), expected_pred)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1:] = True  # (0,1),(0,2),(0,3)
    mask[0, 1, 1] = True
    # intersection 2, union 3 + 4 - 2 = 5, dice 2*2 / (3 + 4)
    ctx = make_ctx(m, mask)
    np.testing.assert_allclose(score("iou", ctx, threshold=0.15), [2 / 5])
    np.testing.assert_allclose(score("dice", ctx, threshold=0.15), [4 / 7])
    # Above 0.4 of the max: (0,0) and (0,1) -> intersection 1, union 2 + 4 - 1 = 5.
    np.testing.assert_allclose(score("iou", ctx, threshold=0.4), [1 / 5])
    np.testing.assert_allclose(score("dice", ctx, threshold=0.4), [2 / 6])
    # At 0.5 of the max, (0,1) = 5 sits on the threshold and is not foreground: no overlap.
    np.testing.assert_allclose(score("iou", ctx, threshold=0.5), [0.0])


def test_iou_dice_otsu_on_two_level_map():
    # A two-level map: Otsu separates the levels, so the foreground is the high level.
    m = torch.full((1, 8, 8), 0.2)
    m[0, 2:6, 2:5] = 0.9  # 12 pixels
    assert torch.equal(binarize(m, "otsu"), m > 0.5)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2:6, 3:7] = True  # 16 pixels, overlap 4 x 2 = 8
    ctx = make_ctx(m, mask)
    np.testing.assert_allclose(score("iou", ctx), [8 / 20])
    np.testing.assert_allclose(score("dice", ctx), [16 / 28])


def test_sparseness_by_hand():
    n = 16
    one_hot = torch.zeros(4, 4)
    one_hot[2, 1] = -3.0  # absolute values: one pixel carries everything
    two_values = torch.zeros(4, 4)
    two_values[0, :2] = 1.0  # sorted: 14 zeros then 1, 1 -> (2*15-17 + 2*16-17)/(16*2)
    maps = torch.stack([one_hot, two_values, torch.full((4, 4), 0.7), torch.zeros(4, 4)])
    expected = [(n - 1) / n, (13 + 15) / 32, 0.0, 0.0]
    np.testing.assert_allclose(score("sparseness", make_ctx(maps)), expected, atol=1e-12)


# --------------------------------------------------------------------------- binarization


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_otsu_matches_skimage_on_bimodal_maps(dtype):
    threshold_otsu = pytest.importorskip("skimage.filters").threshold_otsu

    g = torch.Generator().manual_seed(3)
    blobs = (torch.rand(4, 32, 32, generator=g) > 0.7).double()
    maps = torch.cat(
        [
            0.1 * torch.randn(4, 32, 32, generator=g, dtype=torch.float64) + blobs,
            torch.rand(2, 32, 32, generator=g, dtype=torch.float64) ** 3,  # skewed, unimodal
        ]
    ).to(dtype)
    ours = otsu_threshold(maps).numpy()
    ref = np.array([threshold_otsu(a) for a in maps.numpy()], dtype=np.float64)
    # skimage computes float32 input in float32: agree to float32 precision.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)
    for a, fg in zip(maps.numpy(), binarize(maps, "otsu").numpy(), strict=True):
        np.testing.assert_array_equal(fg, a > threshold_otsu(a))


def test_otsu_constant_and_zero_maps_give_empty_foreground():
    threshold_otsu = pytest.importorskip("skimage.filters").threshold_otsu

    maps = torch.stack([torch.zeros(8, 8), torch.full((8, 8), 0.4)])
    np.testing.assert_allclose(
        otsu_threshold(maps).numpy(), [threshold_otsu(a) for a in maps.numpy()]
    )
    assert not binarize(maps, "otsu").any()


def test_fraction_of_max_threshold_edge_cases():
    maps = torch.stack([-torch.rand(4, 4), torch.zeros(4, 4), torch.full((4, 4), 2.0)])
    np.testing.assert_allclose(fraction_of_max_threshold(maps, 0.15).numpy(), [0.0, 0.0, 0.3])
    fg = binarize(maps, 0.15)
    assert not fg[0].any() and not fg[1].any() and fg[2].all()


@pytest.mark.parametrize("bad", ["otsu2", 1.0, -0.1, 15, True, None])
def test_bad_threshold_is_a_user_error(bad):
    maps, masks = random_batch(1)
    with pytest.raises(UserError, match="threshold"):
        score("iou", make_ctx(maps, masks), threshold=bad)


# --------------------------------------------------------------------------- oracles


@pytest.fixture(scope="module")
def quantus():
    """The Quantus package (an oracle, not a dependency of the harness); importing it takes
    a second or two, once per module."""
    return pytest.importorskip("quantus")


def quantus_scores(metric_cls, maps: torch.Tensor, masks: torch.Tensor | None, **kwargs):
    """Run a Quantus metric on precomputed maps (Quantus needs a model and x even though
    these metrics never call the model)."""

    b, h, w = maps.shape
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(2)).numpy()
    a = maps.numpy()[:, None].astype(np.float32)
    s = None if masks is None else masks.numpy()[:, None].astype(np.float32)
    # disable_warnings: Quantus prints its parameterisation notes; normalise=False: we
    # compare the raw definitions, Quantus would otherwise divide each map by its max.
    metric = metric_cls(normalise=False, disable_warnings=True, **kwargs)
    out = metric(
        model=tiny_model(h),
        x_batch=x,
        y_batch=np.zeros(b, dtype=np.int64),
        a_batch=a,
        s_batch=s,
        device="cpu",
    )
    return np.asarray(out, dtype=np.float64)


def test_pointing_game_matches_quantus(quantus):
    maps, masks = random_batch(8)
    # Ties on purpose in the last two samples: Quantus counts a hit if any maximum is inside.
    maps[6] = 0.0
    maps[7, 0, 0] = maps[7, 5, 5] = maps[7].max() + 1
    masks[7] = False
    masks[7, 5, 5] = True
    ref = quantus_scores(quantus.PointingGame, maps, masks, abs=False)
    ctx = make_ctx(maps, masks)
    np.testing.assert_array_equal(score("pointing_game", ctx, ties="any"), ref)
    # Without ties (first six samples) the default rule agrees with Quantus too.
    np.testing.assert_array_equal(score("pointing_game", ctx)[:6], ref[:6])
    assert 0 < ref[:6].sum() < 6  # both hits and misses are exercised


def test_energy_pointing_game_matches_quantus_relevance_mass_accuracy(quantus):
    maps, masks = random_batch(8, seed=4)
    # Quantus' RelevanceMassAccuracy does not drop negative values: give it relu'd maps,
    # which is our definition.
    ref = quantus_scores(quantus.RelevanceMassAccuracy, maps.clamp_min(0), masks, abs=False)
    np.testing.assert_allclose(score("energy_pointing_game", make_ctx(maps, masks)), ref, rtol=1e-5)


def test_sparseness_matches_quantus(quantus):
    maps, _ = random_batch(8, seed=5)
    maps[1] = maps[1] ** 5  # a sparser map, so the scores spread
    ref = quantus_scores(quantus.Sparseness, maps, None, abs=True)
    # Quantus adds 1e-7 to every value before the Gini index, a relative change ~1e-7 here.
    np.testing.assert_allclose(score("sparseness", make_ctx(maps)), ref, rtol=1e-5)


def test_auprc_matches_sklearn():
    average_precision_score = pytest.importorskip("sklearn.metrics").average_precision_score

    g = torch.Generator().manual_seed(6)
    maps = torch.rand(6, 16, 16, generator=g)
    maps[3:] = (maps[3:] * 4).round() / 4  # heavy ties: grouped thresholds
    maps[5] = 0.3  # constant map: AP is the mask's area fraction
    masks = (torch.rand(6, 16, 16, generator=g) + 0.3 * maps) > 0.8
    ref = [
        average_precision_score(k.flatten().numpy(), m.flatten().numpy())
        for m, k in zip(maps, masks, strict=True)
    ]
    ours = score("auprc", make_ctx(maps, masks))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours[5], masks[5].double().mean().item())


# --------------------------------------------------------------------------- applicability


@pytest.mark.parametrize("name", MASK_METRICS)
def test_mask_metrics_without_masks_are_not_applicable(name):
    maps, _ = random_batch(2)
    with pytest.raises(NotApplicable, match="masks"):
        score(name, make_ctx(maps))


def test_organ_mass_without_organ_masks_is_not_applicable():
    maps, masks = random_batch(2)
    with pytest.raises(NotApplicable, match="organ"):
        score("organ_mass", make_ctx(maps, masks))


@pytest.mark.parametrize("name", [*MASK_METRICS, "organ_mass"])
def test_empty_mask_is_nan_for_that_sample_only(name):
    maps, masks = random_batch(4)
    masks[2] = False  # a normal image: nothing to localize
    ctx = make_ctx(maps, masks, organ_masks=masks)
    out = score(name, ctx)
    assert np.isnan(out[2])
    assert np.isfinite(np.delete(out, 2)).all()


@pytest.mark.parametrize("name", [*MASK_METRICS, "organ_mass", "sparseness"])
@pytest.mark.parametrize("fill", [0.0, 0.5, -1.0])
def test_zero_and_constant_maps_give_finite_scores(name, fill):
    maps = torch.full((2, 8, 8), fill)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True
    masks[1] = True
    ctx = make_ctx(maps, masks, organ_masks=masks)
    out = score(name, ctx)
    assert np.isfinite(out).all()
    if name in ("iou", "dice"):  # a flat map has no foreground
        np.testing.assert_array_equal(out, [0.0, 0.0])


def test_metrics_do_not_modify_inputs():
    maps, masks = random_batch(3)
    ctx = make_ctx(maps, masks, organ_masks=masks)
    before = (ctx.maps.clone(), ctx.masks.clone())
    for name in [*MASK_METRICS, "organ_mass", "sparseness"]:
        score(name, ctx)
    assert torch.equal(ctx.maps, before[0]) and torch.equal(ctx.masks, before[1])


def test_mask_shape_mismatch_is_an_error():
    maps, _ = random_batch(2)
    with pytest.raises(ValueError, match="shape"):
        score("energy_pointing_game", make_ctx(maps, torch.ones(2, 4, 4, dtype=torch.bool)))


@pytest.mark.parametrize(
    "name, kind, needs",
    [
        ("pointing_game", "localization", ("masks",)),
        ("energy_pointing_game", "localization", ("masks",)),
        ("iou", "localization", ("masks",)),
        ("dice", "localization", ("masks",)),
        ("auprc", "localization", ("masks",)),
        ("organ_mass", "localization", ("organ_masks",)),
        ("sparseness", "complexity", ()),
    ],
)
def test_registry_metadata(name, kind, needs):
    info = METRICS.get(name).info
    assert (info.kind, info.higher_is_better, info.needs) == (kind, True, needs)
