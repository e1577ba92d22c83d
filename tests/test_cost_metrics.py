"""Cost metrics against closed forms: the passes a method makes (counted, against the number
its algorithm needs), the pass ratio's definition, and the peak of live tensor storage on a
function whose allocations are known."""

import numpy as np
import pytest
import torch

from cambench.cams import METHODS
from cambench.metrics import METRICS
from cambench.metrics.base import MetricContext
from cambench.metrics.cost import PassCounter, peak_bytes


def ctx_for(model, x, method, **opts) -> MetricContext:
    fn = METHODS.get(method).obj

    def explain(mod, xx, tt):
        return fn(mod, xx, tt, **opts).maps

    with torch.inference_mode():
        logits = model(x)
    target = logits.argmax(1)
    return MetricContext(
        model=model,
        x=x,
        labels=target,
        target=target,
        maps=explain(model, x, target),
        logits=logits,
        ids=[str(i) for i in range(len(x))],
        explain=explain,
        seed=0,
        batch_size=64,
    )


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    return model, torch.rand(3, 1, 12, 12)


def test_gradcam_makes_one_forward_and_one_backward(small):
    model, x = small
    scores = METRICS.get("time").obj(ctx_for(model, x, "gradcam", layer="0"), repeats=1)
    np.testing.assert_array_equal(scores.values["forwards"], 1.0)
    np.testing.assert_array_equal(scores.values["backwards"], 1.0)
    assert np.all(scores.values["value"] > 0) and np.all(scores.values["pass_ratio"] > 0)


@pytest.mark.parametrize("warmup,repeats", [(0, 1), (1, 1), (0, 3), (2, 3)])
def test_time_runs_the_method_warmup_plus_repeats_times_and_counts_once(small, warmup, repeats):
    model, x = small
    ctx = ctx_for(model, x, "gradcam", layer="0")
    calls = []
    inner = ctx.explain

    def explain(mod, xx, tt):
        calls.append(1)
        return inner(mod, xx, tt)

    ctx.explain = explain
    scores = METRICS.get("time").obj(ctx, warmup=warmup, repeats=repeats)
    assert len(calls) == warmup + repeats  # no extra run only to count the passes
    np.testing.assert_array_equal(scores.values["forwards"], 1.0)
    np.testing.assert_array_equal(scores.values["backwards"], 1.0)


def test_occlusion_forward_count_is_the_closed_form(small):
    """12x12 image, window 4, stride 4: 3 x 3 windows, plus the unoccluded forward."""
    model, x = small
    ctx = ctx_for(model, x, "occlusion", window=4, stride=4)
    with PassCounter(model) as count:
        ctx.explain(model, x, ctx.target)
    assert count.forwards == len(x) * (1 + 9) and count.backwards == 0


def test_baseline_makes_no_pass_and_gets_ratio_zero(small):
    model, x = small
    scores = METRICS.get("time").obj(ctx_for(model, x, "random"), repeats=1)
    np.testing.assert_array_equal(scores.values["forwards"], 0.0)
    np.testing.assert_array_equal(scores.values["pass_ratio"], 0.0)


def test_peak_bytes_of_known_allocations():
    x = torch.rand(4, 256, 256)  # 1 MiB, created outside: not counted

    def f():
        a = x * 2  # 1 MiB
        b = a + 1  # 2 MiB live
        del a  # 1 MiB live
        c = b * 3  # 2 MiB live again
        del b
        return c.sum()

    assert peak_bytes(f, torch.device("cpu")) == 2 * x.nbytes  # b is gone before the sum


def test_memory_metric_orders_methods_by_what_they_hold(small):
    """Guided backprop keeps the input gradient (B, C, H, W) and every activation; the random
    baseline allocates only its maps (B, H, W)."""
    del small
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=2).eval()
    x = torch.rand(2, 3, 32, 32)
    memory = METRICS.get("memory").obj
    rand = memory(ctx_for(model, x, "random")).values["value"][0]
    gbp = memory(ctx_for(model, x, "guided_backprop")).values["value"][0]
    assert 2 * 32 * 32 * 4 / 2**20 <= rand < 0.1  # its maps, and a few map-sized temporaries
    assert gbp > 10 * rand
