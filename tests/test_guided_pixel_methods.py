"""Guided backprop, DeconvNet, Guided Grad-CAM, the captum pixel attributions and the two
activation baselines, against captum (GuidedBackprop, Deconvolution, GuidedGradCam, Saliency,
NoiseTunnel, IntegratedGradients, Lime, KernelShap), closed forms and hand computations.

The ReLU tests pin the point of ``cams.guided``: every ReLU is guided, functional ones too.
The oracle for a model with functional ReLUs is captum on the same function written with
``nn.ReLU`` modules (which captum does guide), and the test also shows captum on the
functional version differs, so it would catch a ReLU left unguided.
"""

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    GuidedGradCam,
    IntegratedGradients,
    KernelShap,
    Lime,
    NoiseTunnel,
    Saliency,
)
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable
from cambench.cams import METHODS
from cambench.cams.baselines import image_generator
from cambench.cams.guided import modified_relu_attribution
from cambench.cams.pixel import grid_feature_mask

pytestmark = [
    pytest.mark.methods,
    # captum's GuidedBackprop / Deconvolution / GuidedGradCam warn on every call that they set
    # backward hooks on ReLU modules (and remove them): expected of the oracle, not a problem.
    pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU:UserWarning"),
]

MINE = (
    "guided_backprop",
    "deconvnet",
    "guided_gradcam",
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "lime",
    "kernelshap",
    "gaussian",
    "activation_map",
)
# Small option values so the whole file runs in seconds; the semantics do not depend on them.
FAST = {
    "smoothgrad": {"n_samples": 6, "stdevs": 0.3},
    "integrated_gradients": {"n_steps": 16},
    "lime": {"n_samples": 32, "grid": 4},
    "kernelshap": {"n_samples": 32, "grid": 4},
}
KNOBS = {
    "smoothgrad": ("internal_batch_size", (2, 5, 1000)),
    "integrated_gradients": ("internal_batch_size", (3, 1000)),
    "lime": ("perturbations_per_eval", (5, 64)),
    "kernelshap": ("perturbations_per_eval", (5, 64)),
}
LAYER = "features.4"  # SmallCNN's last conv, before its ReLU


class SmallCNN(nn.Module):
    """Every ReLU a distinct, non-inplace ``nn.ReLU`` module: what captum's hooks handle."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x))


class FunctionalCNN(SmallCNN):
    """The same function as SmallCNN, its three ReLUs applied by the functional entry points
    ``relus`` names (in place or not)."""

    def __init__(self, relus):
        super().__init__()
        self.relus = relus

    def forward(self, x):
        conv1, _, conv2, _, conv3, _ = self.features
        for conv, relu in zip((conv1, conv2, conv3), self.relus, strict=True):
            x = relu(conv(x))
        return self.head(x)


FUNCTIONAL_RELUS = {
    "F.relu_inplace-torch.relu-Tensor.relu_": (
        lambda t: F.relu(t, inplace=True),
        torch.relu,
        torch.Tensor.relu_,
    ),
    "F.relu-Tensor.relu-torch.relu_": (F.relu, torch.Tensor.relu, torch.relu_),
    "aten.relu-aten.relu.default-aten.relu_.default": (
        torch.ops.aten.relu,
        torch.ops.aten.relu.default,
        torch.ops.aten.relu_.default,
    ),
}


def make_net(seed: int = 0, head_scale: float = 300.0) -> SmallCNN:
    """A seeded SmallCNN in eval mode; the head is scaled up so logits move by O(1) when the
    input changes (LIME's Lasso would otherwise zero every coefficient of a random net)."""
    torch.manual_seed(seed)
    net = SmallCNN().eval()
    with torch.no_grad():
        net.head[2].weight.mul_(head_scale)
    return net


@pytest.fixture
def net():
    return make_net()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(4, 3, 24, 24), torch.tensor([0, 1, 2, 3])


def minmax(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Max absolute difference within ``tol`` of the reference's largest magnitude."""
    ours, ref = ours.detach(), ref.detach()
    assert ours.shape == ref.shape
    scale = float(ref.abs().max())
    assert scale > 0, "degenerate oracle: the reference is all zero"
    err = float((ours - ref).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


def call(name, model, x, target, **options):
    opts = {**FAST.get(name, {}), **options}
    if "layer" in METHODS.get(name).info.needs and isinstance(model, SmallCNN):
        opts.setdefault("layer", LAYER)
    return METHODS.get(name).obj(model, x, target, **opts)


# --- guided backprop, DeconvNet, Guided Grad-CAM vs captum ---------------------------------


@pytest.mark.parametrize(
    ("rule", "oracle", "name"),
    [("guided", GuidedBackprop, "guided_backprop"), ("deconvnet", Deconvolution, "deconvnet")],
)
def test_modified_relu_matches_captum_on_module_relus(net, batch, rule, oracle, name):
    x, target = batch
    ref = oracle(net).attribute(x.clone(), target=target)
    assert_close_scaled(modified_relu_attribution(net, x, target, rule=rule), ref)
    maps = call(name, net, x, target).maps
    assert maps.shape == (4, 24, 24) and maps.dtype == torch.float32
    assert_close_scaled(maps, ref.abs().amax(dim=1))
    assert float((minmax(maps) - minmax(ref.abs().amax(dim=1))).abs().max()) <= 1e-4


def test_guided_gradcam_matches_captum_bilinear(net, batch):
    x, target = batch
    layer = dict(net.named_modules())[LAYER]
    # captum interpolates Grad-CAM with "nearest" by default; ours is Grad-CAM's bilinear map.
    ref = GuidedGradCam(net, layer).attribute(x.clone(), target=target, interpolate_mode="bilinear")
    out = call("guided_gradcam", net, x, target)
    gradcam = call("gradcam", net, x, target)
    full = modified_relu_attribution(net, x, target, rule="guided") * gradcam.maps[:, None]
    assert_close_scaled(full, ref)
    ref_map = ref.detach().abs().amax(dim=1)
    assert_close_scaled(out.maps, ref_map)
    assert float((minmax(out.maps) - minmax(ref_map)).abs().max()) <= 1e-4
    torch.testing.assert_close(out.layer_maps, gradcam.layer_maps)


@pytest.mark.parametrize("relus", sorted(FUNCTIONAL_RELUS))
@pytest.mark.parametrize(
    ("rule", "oracle"), [("guided", GuidedBackprop), ("deconvnet", Deconvolution)]
)
def test_functional_relus_are_guided(net, batch, rule, oracle, relus):
    x, target = batch
    functional = FunctionalCNN(FUNCTIONAL_RELUS[relus])
    functional.load_state_dict(net.state_dict())
    functional.eval()
    torch.testing.assert_close(functional(x), net(x))  # the same function
    ref = oracle(net).attribute(x.clone(), target=target)
    missed = oracle(functional).attribute(x.clone(), target=target)  # captum guides nothing here
    ours = modified_relu_attribution(functional, x, target, rule=rule)
    assert_close_scaled(ours, ref)
    assert float((missed - ref).abs().max()) > 0.05 * float(ref.abs().max())


@pytest.mark.slow
def test_resnet18_reused_inplace_relu_matches_captum():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 4])
    calls = []
    handle = model.layer1[0].relu.register_forward_hook(lambda *_: calls.append(1))
    model(x)
    handle.remove()
    assert len(calls) == 2 and model.layer1[0].relu.inplace  # one inplace module, applied twice
    for rule, oracle in (("guided", GuidedBackprop), ("deconvnet", Deconvolution)):
        ref = oracle(model).attribute(x.clone(), target=target)
        ours = modified_relu_attribution(model, x, target, rule=rule)
        assert_close_scaled(ours, ref)
        assert float((minmax(ours.abs().amax(1)) - minmax(ref.abs().amax(1))).abs().max()) <= 1e-4


class ModuleReluDenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet with its functional ``F.relu(features, inplace=True)`` applied by
    an ``nn.ReLU`` module instead, which captum guides: the same function."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.final_relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.final_relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


@pytest.mark.slow
def test_densenet121_functional_relu_is_guided():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=5).eval()
    variant = ModuleReluDenseNet(
        growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=5
    )
    variant.load_state_dict(model.state_dict())
    variant.eval()
    x, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(variant(x[:1]), model(x[:1]))
    ref = GuidedBackprop(variant).attribute(x.clone(), target=target)
    ours = modified_relu_attribution(model, x, target, rule="guided")
    assert_close_scaled(ours, ref)
    assert float((minmax(ours.abs().amax(1)) - minmax(ref.abs().amax(1))).abs().max()) <= 1e-4
    # captum on the original leaves the final ReLU unguided, and that visibly changes the answer.
    # (DeconvNet's handling of functional ReLUs is the same code path, tested on FunctionalCNN.)
    missed = GuidedBackprop(model).attribute(x.clone(), target=target)
    assert float((missed - ref).abs().max()) > 0.05 * float(ref.abs().max())


def test_no_relu_is_not_applicable(batch):
    x, target = batch
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)
    )
    for name in ("guided_backprop", "deconvnet"):
        with pytest.raises(NotApplicable, match="no ReLU"):
            call(name, model, x, target)


# --- captum pixel attributions ---------------------------------------------------------------


def test_saliency_is_captum_max_abs_over_channels(net, batch):
    x, target = batch
    ref = Saliency(net).attribute(x.clone().requires_grad_(True), target=target, abs=True)
    torch.testing.assert_close(call("saliency", net, x, target).maps, ref.amax(dim=1))


def test_smoothgrad_is_captum_noise_tunnel_with_per_image_seed(net, batch):
    x, target = batch
    maps = call("smoothgrad", net, x, target, seed=3).maps
    opts = FAST["smoothgrad"]
    for i in range(x.shape[0]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_generator(x[i], 3).initial_seed())
            ref = NoiseTunnel(Saliency(net)).attribute(
                x[i : i + 1].clone(),
                nt_type="smoothgrad",
                nt_samples=opts["n_samples"],
                stdevs=opts["stdevs"],
                target=int(target[i]),
                abs=True,
            )
        assert_close_scaled(maps[i], ref[0].amax(dim=0), tol=1e-5)
    assert (
        float((call("smoothgrad", net, x, target, seed=4).maps - maps).abs().max()) > 0
    )  # the seed matters


def test_integrated_gradients_matches_captum_and_is_complete(net, batch):
    x, target = batch
    ref = IntegratedGradients(net).attribute(x.clone(), baselines=0.0, target=target, n_steps=64)
    maps = call("integrated_gradients", net, x, target, n_steps=64).maps
    assert_close_scaled(maps, ref.sum(dim=1), tol=1e-5)
    with torch.no_grad():
        delta = (net(x) - net(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    # Completeness: the map sums to f(x) - f(0), up to the quadrature error of 64 steps on a
    # piecewise-linear path (a few percent of the batch's largest change).
    torch.testing.assert_close(
        maps.sum(dim=(1, 2)), delta, rtol=2e-2, atol=2e-2 * float(delta.abs().max())
    )


@pytest.mark.parametrize(("name", "oracle"), [("lime", Lime), ("kernelshap", KernelShap)])
def test_surrogates_match_captum_with_per_image_seed(net, batch, name, oracle):
    x, target = batch
    opts = FAST[name]
    maps = call(name, net, x, target, seed=5).maps
    mask = grid_feature_mask(24, 24, opts["grid"])
    assert int(mask.max()) + 1 == opts["grid"] ** 2 and mask.shape == (1, 1, 24, 24)
    for i in range(x.shape[0]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_generator(x[i], 5).initial_seed())
            ref = oracle(net).attribute(
                x[i : i + 1].clone(),
                baselines=0.0,
                target=int(target[i]),
                feature_mask=mask,
                n_samples=opts["n_samples"],
                perturbations_per_eval=8,
            )
        assert torch.equal(ref[0, 0], ref[0, 1])  # one coefficient per cell, in every channel
        assert_close_scaled(maps[i], ref[0, 0], tol=1e-4)


def test_kernelshap_is_efficient(net, batch):
    """Kernel SHAP's cell values sum to f(x) - f(0) (captum pins the full and empty coalitions)."""
    x, target = batch
    maps = call("kernelshap", net, x, target).maps
    mask = grid_feature_mask(24, 24, FAST["kernelshap"]["grid"])[0, 0]
    first_pixel = torch.stack(
        [(mask == k).flatten().nonzero()[0, 0] for k in range(int(mask.max()) + 1)]
    )
    per_cell = maps.flatten(1)[:, first_pixel].sum(dim=1)
    with torch.no_grad():
        delta = (net(x) - net(torch.zeros_like(x))).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(per_cell, delta, rtol=1e-3, atol=1e-3)


# --- baselines -------------------------------------------------------------------------------


def test_gaussian_is_scipy_gaussian_window_outer_product(net):
    x = torch.randn(3, 3, 20, 30)
    maps = call("gaussian", net, x, torch.zeros(3, dtype=torch.long), sigma=0.2).maps
    ref = np.outer(
        scipy.signal.windows.gaussian(20, 0.2 * 20), scipy.signal.windows.gaussian(30, 0.2 * 30)
    )
    for m in maps:
        np.testing.assert_allclose(m.numpy(), ref, rtol=1e-6, atol=1e-7)


def test_activation_map_is_mean_channel_activation_upsampled(net, batch):
    x, target = batch
    captured = []
    handle = dict(net.named_modules())[LAYER].register_forward_hook(
        lambda m, i, o: captured.append(o.detach())
    )
    with torch.no_grad():
        net(x)
    handle.remove()
    mean = captured[0].mean(dim=1)
    out = call("activation_map", net, x, target)
    torch.testing.assert_close(out.layer_maps, mean)
    ref = F.interpolate(mean[:, None], size=(24, 24), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out.maps, ref)


# --- contract: batch invariance, knobs, finiteness, model and RNG left as they came -----------


@pytest.mark.parametrize("name", MINE)
def test_batch_invariance(net, batch, name):
    x, target = batch
    whole = call(name, net, x, target).maps
    alone = torch.cat(
        [call(name, net, x[i : i + 1], target[i : i + 1]).maps for i in range(x.shape[0])]
    )
    scale = max(float(whole.abs().max()), 1e-12)
    assert float((whole - alone).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_batching_knob_does_not_change_maps(net, batch, name):
    x, target = batch
    knob, values = KNOBS[name]
    maps = [call(name, net, x[:2], target[:2], **{knob: v}).maps for v in values]
    scale = float(maps[0].abs().max())
    assert scale > 0
    for other in maps[1:]:
        assert float((other - maps[0]).abs().max()) <= 1e-5 * scale


def _dead_target_net() -> SmallCNN:
    model = make_net()
    with torch.no_grad():
        model.head[2].weight[0].zero_()  # class 0's logit is a constant: its gradient is zero
    return model


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("case", ["black", "dead"])
def test_maps_finite_on_black_image_and_dead_target(name, case, batch):
    x, _ = batch
    model = _dead_target_net()
    x = torch.zeros_like(x) if case == "black" else x
    target = torch.tensor([0, 0, 1, 2]) if case == "dead" else torch.tensor([0, 1, 2, 3])
    maps = call(name, model, x, target).maps
    assert maps.shape == (4, 24, 24) and maps.dtype == torch.float32
    assert bool(torch.isfinite(maps).all())
    if case == "dead" and METHODS.get(name).info.family != "baseline":
        assert float(maps[:2].abs().max()) <= 1e-6  # nothing depends on the input for class 0


def _state(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad is None for p in model.parameters()],
        sum(
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            for m in model.modules()
        ),
    )


@pytest.mark.parametrize("name", MINE)
def test_model_left_as_it_came(net, batch, name):
    x, target = batch
    net.features[0].weight.requires_grad_(False)
    net.head.train()  # a mixed mode (no batch-dependent layer there) must survive too
    before = _state(net)
    rng = torch.get_rng_state()
    call(name, net, x, target)
    assert _state(net) == before
    if name != "gaussian":  # the Gaussian never looks at the target
        with pytest.raises(ValueError, match="out of range"):
            call(name, net, x, torch.tensor([0, 1, 2, 99]))
        assert _state(net) == before
    assert torch.equal(torch.get_rng_state(), rng)  # randomized methods seed privately
    assert torch._C._len_torch_function_stack() == 0  # no ReLU override left active


class RaisingCNN(SmallCNN):
    def forward(self, x):
        torch.relu(self.features[0](x))
        raise RuntimeError("layer failed")


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_relu_override_removed_when_forward_raises(batch, name):
    x, target = batch
    model = RaisingCNN().eval()
    with pytest.raises(RuntimeError, match="layer failed"):
        call(name, model, x, target)
    assert torch._C._len_torch_function_stack() == 0
    # ReLU has its own gradient again: the gradient of sum(relu(z)) is [z > 0].
    z = torch.randn(10, requires_grad=True)
    F.relu(-torch.ones(10) + z).sum().backward()
    assert torch.equal(z.grad, (z.detach() > 1).float())
