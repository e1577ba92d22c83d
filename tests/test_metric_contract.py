"""The metric contract, generated from the registry, so every metric is covered the day it is
registered (timm ``tests/test_models.py``; Quantus ``Metric.__call__``'s per-sample scores).

For every entry of ``metrics.METRICS``, called with its default options on a small GAP CNN
and a batch of synth-cxr phantoms (lesion and organ masks) explained by Grad-CAM, as
``benchmarks/engine/group.py`` builds the context:

- every output in ``Scores.values`` is a float array (B,), every curve a float array
  (B, T); nothing is infinite, and a NaN appears only when ``Scores.unscored`` says why;
- a sample's results do not depend on the batch it is in nor on the forward batch size:
  scoring the batch whole equals scoring it in two halves with ``batch_size=12``, to 1e-5
  (outputs of ``host_dependent`` metrics, wall times, are only checked for shape and
  finiteness). The halves also get no masks the metric does not declare in ``needs``, so a
  metric that reads data it does not declare fails here too;
- the model leaves as it came: no hook left, the same ``training`` and ``requires_grad``
  flags, bit-identical parameters and buffers, no ``.grad``, the global RNG untouched;
- a metric that needs masks (organ masks, the explainer) raises ``NotApplicable`` on a
  context without them.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from model_hygiene import SmallGapCNN, changes, snapshot
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable
from cambench.cams import METHODS
from cambench.datasets import DATASETS
from cambench.metrics import METRICS, MetricContext, Scores

pytestmark = pytest.mark.metrics

NAMES = METRICS.names()
SIZE = 32
N_IMAGES = 8
SPLIT_AT = 4
HALF_BATCH_SIZE = 12  # images per forward in the halves (the whole batch: the default 64)
SEED = 3
TOL = 1e-5
LAYER = "features"

# Option overrides for speed: none needed at 32 px with 8 images (every metric runs its
# defaults in well under a second here). Keep any future override small and explained.
FAST_OPTIONS: dict[str, dict] = {}

# Documented exceptions to batch-split invariance, one per metric, with the reason.
SPLIT_XFAIL = {
    "memory": "documented: the peak memory of explaining the batch, the same number for every "
    "image of the batch (metrics/cost.py), so it grows with the batch",
}


@functools.cache
def images(in_channels: int) -> dict:
    ds = DATASETS.get("synth-cxr").obj("test", image_size=SIZE, n=N_IMAGES, seed=0)
    return {
        "x": ds.images.expand(-1, in_channels, -1, -1).contiguous(),
        "labels": ds.labels,
        "ids": ds.ids,
        "masks": ds.masks,
        "organ_masks": ds.organ_masks,
    }


def make_model(in_channels: int) -> SmallGapCNN:
    """A fresh model, the same weights on every call. Random weights predict one class for
    every image, so the head's bias is set to put the batch's median on the decision
    boundary and the weights scaled: both classes are predicted, and an 8/255 attack flips
    some images but not all (every branch of the adversarial metrics runs)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallGapCNN(in_channels, 2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.linspace(-0.2, 0.2, m.num_features))
                m.running_var.copy_(torch.linspace(0.5, 1.5, m.num_features))
        logits = model(images(in_channels)["x"])
        margin = logits[:, 1] - logits[:, 0]
        model.fc.bias[1] -= margin.median() + 1e-3
        model.fc.weight.mul_(10.0)
        model.fc.bias.mul_(10.0)
    model.features[0].requires_grad_(False)
    model.drop.train()
    return model


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return METHODS.get("gradcam").obj(model, x, target, layer=LAYER).maps


@functools.cache
def batch(in_channels: int) -> dict:
    """The batch as the runner hands it to metrics: logits, predicted target, Grad-CAM maps."""
    data = images(in_channels)
    model = make_model(in_channels)
    with torch.inference_mode():
        logits = model(data["x"])
    target = logits.argmax(1)
    maps = gradcam(model, data["x"], target)
    # a reference implementation's maps (for the agreement metric): another map of each image
    return {**data, "logits": logits, "target": target, "maps": maps, "reference": maps.flip(-1)}


def context(
    model: nn.Module,
    in_channels: int,
    rows: slice = slice(None),
    *,
    masks: bool = True,
    organ_masks: bool = True,
    explain: bool = True,
    reference: bool = True,
    batch_size: int = 64,
) -> MetricContext:
    b = batch(in_channels)
    return MetricContext(
        model=model,
        x=b["x"][rows],
        labels=b["labels"][rows],
        target=b["target"][rows],
        maps=b["maps"][rows],
        logits=b["logits"][rows],
        ids=b["ids"][rows],
        masks=b["masks"][rows] if masks else None,
        organ_masks=b["organ_masks"][rows] if organ_masks else None,
        explain=gradcam if explain else None,
        seed=SEED,
        batch_size=batch_size,
        reference_maps=b["reference"][rows] if reference else None,
    )


def score(name: str, ctx: MetricContext) -> Scores:
    return METRICS.get(name).obj(ctx, **FAST_OPTIONS.get(name, {}))


# --- model hygiene ------------------------------------------------------------------------


@functools.cache
def whole(name: str, in_channels: int) -> tuple[Scores | None, list[str]]:
    """The metric on the whole batch (None if not applicable), and what it changed on the
    model; cached, as three tests read it."""
    model = make_model(in_channels)
    before = snapshot(model)
    try:
        scores = score(name, context(model, in_channels))
    except NotApplicable:
        scores = None
    return scores, changes(model, before)


def scored_whole(name: str, in_channels: int) -> Scores:
    scores, _ = whole(name, in_channels)
    if scores is None:
        pytest.fail(f"{name} raised NotApplicable on a context that has everything it needs")
    return scores


# --- the tests ----------------------------------------------------------------------------


def assert_scores_shapes(name: str, scores: Scores, b: int) -> None:
    assert isinstance(scores, Scores)
    assert "value" in scores.values, f"{name}: no primary output 'value'"
    declared = {out for out, _ in METRICS.get(name).info.secondary}
    assert declared <= set(scores.values), (
        f"{name}: declared secondary outputs missing: {declared - set(scores.values)}"
    )
    for out, v in scores.values.items():
        v = np.asarray(v)
        assert np.issubdtype(v.dtype, np.floating), f"{name}.{out}: dtype {v.dtype} is not float"
        assert v.shape == (b,), f"{name}.{out}: shape {v.shape}, want ({b},)"
        assert not np.isinf(v).any(), f"{name}.{out}: infinite values {v}"
        if np.isnan(v).any():
            assert scores.unscored.strip(), f"{name}.{out} has NaN {v} but unscored gives no reason"
    for out, c in scores.curves.items():
        c = np.asarray(c)
        assert np.issubdtype(c.dtype, np.floating), f"{name} curve {out}: dtype {c.dtype}"
        assert c.ndim == 2 and c.shape[0] == b and c.shape[1] >= 1, (
            f"{name} curve {out}: shape {c.shape}, want ({b}, T)"
        )
        assert not np.isinf(c).any(), f"{name} curve {out}: infinite values"


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_float_per_sample_and_nan_has_a_reason(name, in_channels):
    assert_scores_shapes(name, scored_whole(name, in_channels), N_IMAGES)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_model_left_as_it_came(name, in_channels):
    _, changed = whole(name, in_channels)
    assert not changed, f"{name}: {'; '.join(changed)}"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=SPLIT_XFAIL[n], strict=True))
        if n in SPLIT_XFAIL
        else n
        for n in NAMES
    ],
)
def test_batch_split_invariance(name):
    """Scoring the batch whole equals scoring it in two halves (concatenated), with another
    forward batch size and without the masks the metric does not declare."""
    info = METRICS.get(name).info
    full = scored_whole(name, 1)
    halves = [
        score(
            name,
            context(
                make_model(1),
                1,
                rows,
                masks="masks" in info.needs,
                organ_masks="organ_masks" in info.needs,
                batch_size=HALF_BATCH_SIZE,
            ),
        )
        for rows in (slice(None, SPLIT_AT), slice(SPLIT_AT, None))
    ]
    for part, rows in zip(halves, (SPLIT_AT, N_IMAGES - SPLIT_AT), strict=True):
        assert_scores_shapes(name, part, rows)
    assert set(halves[0].values) == set(full.values)
    assert set(halves[0].curves) == set(full.curves)
    if info.host_dependent:
        return  # wall times: shapes and finiteness only
    for kind in ("values", "curves"):
        for out, want in getattr(full, kind).items():
            got = np.concatenate([np.asarray(getattr(h, kind)[out]) for h in halves])
            want = np.asarray(want)
            if kind == "curves" and got.shape != want.shape:
                pytest.fail(f"{name} curve {out}: halves {got.shape} != whole {want.shape}")
            np.testing.assert_allclose(
                got,
                want,
                rtol=TOL,
                atol=TOL,
                equal_nan=True,
                err_msg=f"{name}.{out} ({kind}) differs between the whole batch and its halves",
            )


NEEDS_DATA = [(n, need) for n in NAMES for need in METRICS.get(n).info.needs if need != "weights"]


@pytest.mark.parametrize(("name", "need"), NEEDS_DATA, ids=[f"{n}-{k}" for n, k in NEEDS_DATA])
def test_missing_need_is_not_applicable(name, need):
    """A context without what the metric needs (masks, organ masks, the explainer) raises
    NotApplicable, which the runner records as a reason, never an error."""
    ctx = context(
        make_model(1),
        1,
        masks=need != "masks",
        organ_masks=need != "organ_masks",
        explain=need != "explainer",
        reference=need != "reference",
    )
    with pytest.raises(NotApplicable):
        score(name, ctx)
