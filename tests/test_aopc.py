"""AOPC over MoRF/LeRF curves against a hand computation on a linear model.

The model's class-1 logit is sum(x * w): zeroing a region drops the score by exactly the
region's contribution sum_{p in r} x_p w_p, so the whole curve is known in closed form.
"""

import numpy as np
import pytest
import torch
from torch import nn

from cambench.metrics.base import MetricContext
from cambench.metrics.faithfulness import abpc, aopc_lerf, aopc_morf, region_ranks
from cambench.metrics.perturbations import gaussian

pytestmark = pytest.mark.metrics


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        s = (x * self.w).sum(dim=(1, 2, 3))
        return torch.stack([-s, s], dim=1)


def make_ctx(b=3, size=8, seed=0, batch_size=64, maps=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(1, 1, size, size, generator=g)
    x = torch.rand(b, 1, size, size, generator=g)
    model = Linear(w).eval()
    contrib = (x * w)[:, 0]
    with torch.inference_mode():
        logits = model(x)
    target = torch.ones(b, dtype=torch.long)
    return MetricContext(
        model=model,
        x=x,
        labels=target,
        target=target,
        maps=contrib if maps is None else maps,
        logits=logits,
        ids=[f"s{i}" for i in range(b)],
        batch_size=batch_size,
    ), contrib


def hand_aopc(contrib: torch.Tensor, region: int, steps: int, descending: bool) -> np.ndarray:
    out = []
    for c in contrib.numpy():
        h, w = c.shape
        sums = [
            c[r : r + region, q : q + region].sum()
            for r in range(0, h, region)
            for q in range(0, w, region)
        ]
        order = sorted(range(len(sums)), key=lambda i: -sums[i] if descending else sums[i])
        drops = np.cumsum([sums[i] for i in order[:steps]])  # f(x0) - f(xk), zero perturbation
        out.append(drops.sum() / (steps + 1))
    return np.array(out)


@pytest.mark.parametrize("region,steps", [(2, 16), (2, 5), (4, 4), (3, 9)])
def test_morf_and_lerf_match_hand_computation(region, steps):
    ctx, contrib = make_ctx()
    got = aopc_morf(ctx, region=region, steps=steps, perturbation="zero").values["value"]
    np.testing.assert_allclose(got, hand_aopc(contrib, region, steps, True), rtol=1e-5)
    got = aopc_lerf(ctx, region=region, steps=steps, perturbation="zero").values["value"]
    np.testing.assert_allclose(got, hand_aopc(contrib, region, steps, False), rtol=1e-5)


def test_curve_is_stored_with_l_plus_one_points():
    ctx, _ = make_ctx()
    scores = aopc_morf(ctx, region=2, steps=7, perturbation="zero")
    curve = scores.curves["morf"]
    assert curve.shape == (3, 8)
    np.testing.assert_allclose(
        scores.values["value"], (curve[:, :1] - curve[:, 1:]).sum(1) / 8, rtol=1e-6
    )
    full = aopc_morf(ctx, region=2, perturbation="zero").curves["morf"]
    np.testing.assert_allclose(full[:, -1], 0.0, atol=1e-5)  # every region zeroed: score 0


def test_true_contribution_beats_random_beats_inverted():
    ctx, contrib = make_ctx(b=8)
    true = aopc_morf(ctx, region=2, steps=8, perturbation="zero").values["value"]
    rand_ctx, _ = make_ctx(
        b=8, maps=torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(5))
    )
    rand = aopc_morf(rand_ctx, region=2, steps=8, perturbation="zero").values["value"]
    inv_ctx, _ = make_ctx(b=8, maps=-contrib)
    inv = aopc_morf(inv_ctx, region=2, steps=8, perturbation="zero").values["value"]
    assert true.mean() > rand.mean() > inv.mean()
    both = abpc(ctx, region=2, steps=8, perturbation="zero").values["value"]
    assert (both > 0).all()


@pytest.mark.parametrize("batch_size", [1, 7, 512])
def test_forward_batch_knob_does_not_change_the_result(batch_size):
    ref_ctx, _ = make_ctx(b=4)
    ref = aopc_morf(
        ref_ctx, region=2, steps=10, perturbation="gaussian", perturbation_options={"std": 0.1}
    ).curves["morf"]
    ctx, _ = make_ctx(b=4, batch_size=batch_size)
    got = aopc_morf(
        ctx, region=2, steps=10, perturbation="gaussian", perturbation_options={"std": 0.1}
    ).curves["morf"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_noise_is_per_sample_not_per_batch():
    ctx, _ = make_ctx(b=4)
    gens = [ctx.generator(i, "p") for i in range(4)]
    whole = gaussian(ctx.x, gens, std=0.1)
    alone = gaussian(ctx.x[2:3], [ctx.generator(2, "p")], std=0.1)
    torch.testing.assert_close(whole[2:3], alone)
    assert not torch.equal(whole[0] - ctx.x[0], whole[1] - ctx.x[1])


def test_correct_only_drops_misclassified():
    ctx, _ = make_ctx(b=3)
    ctx.labels = torch.tensor([1, 0, 1])  # the model predicts class 1 for all (positive sums)
    got = aopc_morf(ctx, region=2, steps=4, perturbation="zero", correct_only=True).values["value"]
    assert np.isnan(got[1]) and np.isfinite(got[[0, 2]]).all()


def test_region_ranks_order_and_ties():
    maps = torch.arange(16.0).reshape(1, 4, 4)
    ranks, n = region_ranks(maps, 2)
    assert n == 4 and ranks[0, 3, 3] == 0 and ranks[0, 0, 0] == 3
    ranks, _ = region_ranks(torch.zeros(1, 4, 4), 2)  # ties keep raster order
    assert ranks[0, ::2, ::2].flatten().tolist() == [0, 1, 2, 3]
