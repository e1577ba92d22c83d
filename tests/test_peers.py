"""The third-party peers of ``cams/peers.py`` (``<method>@<library>``), against oracles:

- the registry and a suite take their names (``[methods."gradcam@captum"]``, ``use = ...``);
- every peer returns finite float32 (B, H, W) maps on a small GAP CNN and leaves it as it came
  (the registry-wide contract in test_method_contract.py runs them too);
- Grad-CAM: on a GAP CNN with ``nn.ReLU`` modules, captum's layer maps are ours (at the layer's
  resolution, no normalization), and with ``interpolate_mode="bilinear"`` its maps are ours;
  its default nearest upsampling is the nearest upsampling of our layer maps. pytorch-grad-cam,
  torchcam and MONAI, after per-image min-max at the input size, are min-max of ours within
  1e-4; likewise all four on a small ViT (the token-to-map reading);
- where the model changes the layer's output in place (a functional in-place ReLU after it):
  captum keeps ours ("produced"), torchcam is our ``point="consumed"``, pytorch-grad-cam takes
  the post-ReLU activation with the pre-ReLU gradient (on the CPU), MONAI cannot hook it;
- Grad-CAM++: each library's map is its formula written out here from the same activation
  and gradient, on a case where the denominator 2 g^2 + sum A g^3 is ~1e-6, not 1: torchcam's
  weights are sum g^2 ReLU(g) (it never divides), pytorch-grad-cam's and MONAI's carry their
  eps (1e-6, 1e-7); none is ours there;
- guided backprop: on torchvision's DenseNet-121 captum differs from ours because the
  functional ``F.relu`` after ``features`` is unguided; with that ReLU made a module the two
  agree to 1e-5 (slow);
- occlusion: captum's is ours to float rounding; MONAI's map is the drop of its output, checked
  on a linear model where the drop is known in closed form, with MONAI's sigmoid for
  one-channel inputs;
- a missing library is ``NotApplicable`` naming the install line.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from model_hygiene import SmallGapCNN, changes, snapshot
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable, UnknownNameError, UserError
from cambench.cams import METHODS
from cambench.cams.base import upsample
from cambench.cams.gradient_cams import gradcampp_map, layer_gradient

pytestmark = pytest.mark.methods

PEERS = (
    "gradcam@captum",
    "gradcam@pytorch-grad-cam",
    "gradcam@torchcam",
    "gradcam@monai",
    "gradcampp@pytorch-grad-cam",
    "gradcampp@torchcam",
    "gradcampp@monai",
    "guided_backprop@captum",
    "guided_backprop@pytorch-grad-cam",
    "occlusion@captum",
    "occlusion@monai",
)
LIBRARY_MODULES = {  # the peer's library -> the modules its import needs
    "captum": ("captum", "captum.attr"),
    "pytorch-grad-cam": ("pytorch_grad_cam", "pytorch_grad_cam.utils.model_targets"),
    "torchcam": ("torchcam", "torchcam.methods"),
    "monai": ("monai", "monai.visualize"),
}
PACKAGE = {
    "captum": "captum",
    "pytorch-grad-cam": "grad-cam",
    "torchcam": "torchcam",
    "monai": "monai",
}
TARGET = torch.tensor([0, 1, 2, 0])


def explain(name: str, model: nn.Module, x: torch.Tensor, target, **options):
    return METHODS.get(name).obj(model, x, target, **options)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def torchcam_normalized(maps: torch.Tensor) -> torch.Tensor:
    """torchcam's ``_normalize``: (x - min) / (max of that + 1e-8)."""
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    return shifted / (shifted.amax(dim=(1, 2), keepdim=True) + 1e-8)


def gap_cnn() -> SmallGapCNN:
    """The contract's GAP CNN: module ReLUs, BatchNorm with non-trivial statistics."""
    torch.manual_seed(0)
    model = SmallGapCNN(3, 3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# --- names ------------------------------------------------------------------------------


def test_the_registry_and_a_suite_take_peer_names(tmp_path):
    assert set(PEERS) <= set(METHODS.names("*@*"))
    assert METHODS.names("gradcam@*") == [
        "gradcam@captum",
        "gradcam@monai",
        "gradcam@pytorch-grad-cam",
        "gradcam@torchcam",
    ]
    with pytest.raises(UnknownNameError, match="Did you mean: gradcam@captum"):
        METHODS.get("gradcam@captun")
    from cambench.benchmarks.engine.suite import load_suite

    suite = tmp_path / "peers.toml"
    suite.write_text(
        'name = "peers"\n[models.gapcnn]\n[datasets.synth-lesion]\nimage_size = 32\n'
        '[methods.gradcam]\n[methods."gradcam@captum"]\nrelu_attributions = false\n'
        '[methods.pgc]\nuse = "gradcampp@pytorch-grad-cam"\n[metrics.time]\n'
    )
    methods = {m.label: (m.use, m.options) for m in load_suite(str(suite)).methods}
    assert methods["gradcam@captum"] == ("gradcam@captum", {"relu_attributions": False})
    assert methods["pgc"] == ("gradcampp@pytorch-grad-cam", {})
    suite.write_text(suite.read_text().replace("relu_attributions = false", "window = 3"))
    with pytest.raises(UserError, match="window"):
        load_suite(str(suite))


# --- every peer -------------------------------------------------------------------------


@pytest.mark.parametrize("name", PEERS)
def test_every_peer_gives_finite_maps_and_leaves_the_model_as_it_came(name, x):
    model = gap_cnn()
    model.features[0].requires_grad_(False)
    model.drop.train()
    before = snapshot(model)
    out = explain(name, model, x, TARGET)
    assert out.maps.shape == (4, 32, 32) and out.maps.dtype == torch.float32
    assert out.maps.device == x.device and bool(torch.isfinite(out.maps).all())
    assert bool(out.maps.amax() > out.maps.amin()), "a constant map says nothing"
    if out.layer_maps is not None:
        assert out.layer_maps.shape == (4, 16, 16)
    assert changes(model, before) == []


@pytest.mark.parametrize("name", PEERS)
def test_a_missing_library_is_not_applicable_with_the_install_line(name, x, monkeypatch):
    library = name.split("@")[1]
    for module in LIBRARY_MODULES[library]:
        monkeypatch.setitem(sys.modules, module, None)
    model = gap_cnn()
    before = snapshot(model)
    with pytest.raises(NotApplicable) as info:
        explain(name, model, x, TARGET)
    assert 'pip install -e ".[peers]"' in str(info.value)
    assert PACKAGE[library] in str(info.value)
    assert changes(model, before) == []


# --- Grad-CAM ---------------------------------------------------------------------------


def test_gradcam_peers_agree_with_ours_on_a_gap_cnn(x):
    """captum: the same layer maps (no normalization at all), ours with bilinear upsampling,
    and by default our layer maps upsampled nearest. The others: min-max of theirs at the
    input size equals min-max of ours within 1e-4."""
    model = gap_cnn()
    ours = explain("gradcam", model, x, TARGET)
    scale = float(ours.maps.abs().max())

    captum = explain("gradcam@captum", model, x, TARGET)
    torch.testing.assert_close(captum.layer_maps, ours.layer_maps, rtol=0, atol=1e-6 * scale)
    nearest = F.interpolate(ours.layer_maps[:, None], size=(32, 32), mode="nearest")[:, 0]
    torch.testing.assert_close(captum.maps, nearest, rtol=0, atol=1e-6 * scale)
    bilinear = explain("gradcam@captum", model, x, TARGET, interpolate_mode="bilinear")
    torch.testing.assert_close(bilinear.maps, ours.maps, rtol=0, atol=1e-6 * scale)
    assert float((minmax(captum.maps) - minmax(ours.maps)).abs().max()) > 0.1  # nearest

    for name in ("gradcam@pytorch-grad-cam", "gradcam@torchcam", "gradcam@monai"):
        theirs = explain(name, model, x, TARGET).maps
        gap = float((minmax(theirs) - minmax(ours.maps)).abs().max())
        assert gap <= 1e-4, f"{name}: {gap}"


def test_gradcam_peers_agree_with_ours_on_a_vit():
    """Token layers reach every library as the (B, C, h, w) map cams.hooks reads."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5
    ).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    ours = minmax(explain("gradcam", model, x, target).maps)
    for name in METHODS.names("gradcam@*"):
        options = {"interpolate_mode": "bilinear"} if name == "gradcam@captum" else {}
        theirs = minmax(explain(name, model, x, target, **options).maps)
        assert float((theirs - ours).abs().max()) <= 1e-4, name


class InplaceReluNet(nn.Module):
    """The target layer ``features`` ends in a BatchNorm whose output the forward then
    rectifies in place, as torchvision's DenseNet does (``F.relu(features, inplace=True)``)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.BatchNorm2d(6),
        )
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_where_each_library_takes_a_layer_output_changed_in_place():
    torch.manual_seed(0)
    model = InplaceReluNet().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    pre = layer_gradient(model, x, target, layer="features", point="produced")
    post = layer_gradient(model, x, target, layer="features", point="consumed")
    assert float((pre.activation - post.activation).abs().max()) > 0.1  # the ReLU matters

    def cam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.einsum("bk,bkhw->bhw", g.mean(dim=(2, 3)), a))

    captum = explain("gradcam@captum", model, x, target, layer="features")
    torch.testing.assert_close(captum.layer_maps, cam(pre.activation, pre.gradient))
    torchcam = explain("gradcam@torchcam", model, x, target, layer="features")
    torch.testing.assert_close(
        torchcam.layer_maps, torchcam_normalized(cam(post.activation, post.gradient))
    )

    pgc = explain("gradcam@pytorch-grad-cam", model, x, target, layer="features").maps
    mixed = minmax(upsample(cam(post.activation, pre.gradient), (8, 8)))
    assert float((pgc - mixed).abs().max()) <= 1e-4
    for a, g in ((pre.activation, pre.gradient), (post.activation, post.gradient)):
        assert float((pgc - minmax(upsample(cam(a, g), (8, 8)))).abs().max()) > 1e-2

    before = snapshot(model)
    with pytest.raises(NotApplicable, match="in place"):
        explain("gradcam@monai", model, x, target, layer="features")
    assert changes(model, before) == []


# --- Grad-CAM++ -------------------------------------------------------------------------


def weighted_map(alpha: torch.Tensor, lg) -> torch.Tensor:
    weights = (alpha * torch.relu(lg.gradient)).sum(dim=(2, 3))
    return torch.relu(torch.einsum("bk,bkhw->bhw", weights, lg.activation))


def test_gradcampp_peers_compute_their_own_formulas_not_ours(x):
    """On the GAP CNN the gradient is w_ck / (h w) ~ 1e-3, so the denominator
    2 g^2 + sum A g^3 is ~1e-6, far from 1: dividing by it matters, and so does an eps."""
    model = gap_cnn()
    lg = layer_gradient(model, x, TARGET, layer="features")
    a, g = lg.activation, lg.gradient
    g2, g3 = g * g, g * g * g
    den = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    live = g != 0
    assert bool(live.any()) and float(den[live].abs().max()) < 1e-3  # not 1

    ours = minmax(gradcampp_map(lg)[0])
    size = (32, 32)
    torchcam = explain("gradcampp@torchcam", model, x, TARGET).layer_maps
    undivided = torchcam_normalized(weighted_map(g2, lg))  # torchcam: alpha stays g^2
    assert float((torchcam - undivided).abs().max()) <= 1e-4
    torchcam_den = 2 * g2 + (g3 * a).sum((2, 3), keepdim=True) + 1e-8
    divided = torchcam_normalized(weighted_map(g2 / torchcam_den, lg))  # what its docs say
    assert float((torchcam - divided).abs().max()) > 0.05
    assert float((minmax(torchcam) - ours).abs().max()) > 0.05

    pgc = explain("gradcampp@pytorch-grad-cam", model, x, TARGET).maps
    with_eps = torch.where(live, g2 / (den + 1e-6), torch.zeros_like(g))
    assert float((pgc - minmax(upsample(weighted_map(with_eps, lg), size))).abs().max()) <= 1e-4
    assert float((pgc - minmax(upsample(ours, size))).abs().max()) > 0.05

    monai = explain("gradcampp@monai", model, x, TARGET).maps
    monai_den = 2 * g2 + (a * g3).sum(dim=(2, 3), keepdim=True)
    monai_den = torch.where(monai_den != 0, monai_den, torch.ones_like(monai_den))
    formula = minmax(upsample(weighted_map(g2 / (monai_den + 1e-7), lg), size))
    assert float((monai - formula).abs().max()) <= 1e-4
    assert float((monai - minmax(upsample(ours, size))).abs().max()) > 0.01


# --- guided backprop --------------------------------------------------------------------


def module_relu_densenet121():
    """torchvision's DenseNet-121 whose last ReLU is an ``nn.ReLU`` module, not ``F.relu``."""
    import torchvision

    class ModuleReluDenseNet(torchvision.models.DenseNet):
        def __init__(self, **kwargs):
            super().__init__(32, (6, 12, 24, 16), 64, **kwargs)
            self.final_relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.final_relu(self.features(x))
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))

    return ModuleReluDenseNet


@pytest.mark.slow
def test_captum_guided_backprop_leaves_densenets_functional_relu_unguided():
    import torchvision

    torch.manual_seed(0)
    densenet = torchvision.models.densenet121(num_classes=5).eval()
    variant = module_relu_densenet121()(num_classes=5).eval()
    variant.load_state_dict(densenet.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 3])

    ours = explain("guided_backprop", densenet, x, target).maps
    theirs = explain("guided_backprop@captum", densenet, x, target).maps
    assert float((minmax(ours) - minmax(theirs)).abs().max()) > 1e-3
    assert float((ours - theirs).abs().max()) > 0.05 * float(ours.abs().max())

    ours = explain("guided_backprop", variant, x, target).maps
    theirs = explain("guided_backprop@captum", variant, x, target).maps
    assert float((minmax(ours) - minmax(theirs)).abs().max()) <= 1e-5


def test_pytorch_grad_cams_guided_backprop_hands_back_the_models_own_relus(x):
    """It swaps nn.ReLU modules and would put back fresh ones; the model's own come back,
    also when the call raises, and so does the ``inplace`` flag MONAI clears."""
    model = gap_cnn()
    model.features[2] = nn.ReLU(inplace=True)
    relus = [model.features[2], model.features[6]]
    theirs = explain("guided_backprop@pytorch-grad-cam", model, x, TARGET).maps
    torch.testing.assert_close(
        theirs, explain("guided_backprop", model, x, TARGET).maps, rtol=0, atol=1e-6
    )

    def boom(module, inputs, output):
        raise RuntimeError("failed on purpose")

    handle = model.features[4].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        explain("guided_backprop@pytorch-grad-cam", model, x, TARGET)
    handle.remove()
    assert [model.features[2], model.features[6]] == relus
    assert model.features[2].inplace

    explain("gradcam@monai", model, x, TARGET, layer="features.2")
    assert model.features[2].inplace


# --- occlusion --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"window": 6, "stride": 5, "baseline": 0.5}, {"window": (5, 7), "stride": (4, 3)}],
)
def test_captum_occlusion_is_ours(x, options):
    model, x, target = gap_cnn(), x[:2], TARGET[:2]
    ours = explain("occlusion", model, x, target, **options).maps
    theirs = explain("occlusion@captum", model, x, target, batch_size=7, **options).maps
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)  # float32 rounding of logits


class LinearScore(nn.Module):
    """Logits (sum(W * x), 0, 0): occluding pixels with 0 lowers class 0's logit by the
    sum of W * x over them."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(channels, 8, 8, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (x * self.weight).sum(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit), torch.zeros_like(logit)], dim=1)


@pytest.mark.parametrize("channels", [1, 3])
def test_monai_occlusion_is_the_drop_of_its_activated_output(channels):
    """Disjoint 4 x 4 windows (overlap 0) filled with 0: each pixel's map is the drop of the
    activated class-0 score when its window is blanked. MONAI's activation is sigmoid for a
    one-channel input (whatever the number of classes) and softmax otherwise."""
    model = LinearScore(channels)
    x = torch.rand(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = explain("occlusion@monai", model, x, 0, mask_size=4, overlap=0.0, mode=0.0).maps

    with torch.no_grad():
        contribution = (x * model.weight).sum(dim=1)  # (B, 8, 8)
        window_drop = contribution.unflatten(1, (2, 4)).unflatten(3, (2, 4)).sum(dim=(2, 4))
        drop = window_drop.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
        logit = contribution.sum(dim=(1, 2))[:, None, None]

        def activated(z):
            return torch.sigmoid(z) if channels == 1 else torch.exp(z) / (torch.exp(z) + 2)

        expected = activated(logit) - activated(logit - drop)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)
    logits_drop = explain(
        "occlusion@monai", model, x, 0, mask_size=4, overlap=0.0, mode=0.0, activate=False
    ).maps
    torch.testing.assert_close(logits_drop, drop, rtol=0, atol=1e-5)
