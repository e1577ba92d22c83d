"""The gradient-weighted CAM family (cams/gradient_cams.py) against independent oracles.

- Grad-CAM vs captum ``LayerGradCam`` (relu, bilinear interpolation to the input size) on
  torchvision ResNet18 and DenseNet121 (issue 2 acceptance: 1e-5 after per-image min-max).
- Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM vs pytorch-grad-cam, both at the
  layer's resolution (its own captured activations and gradients through its own
  ``get_cam_image``) and at input size (its min-max + cv2 resize).
- XGrad-CAM, LayerCAM (and Grad-CAM) vs torchcam, unnormalized layer maps.
- Grad-CAM++ and the other four on a toy 2-channel 3x3 layer, computed by hand.
- The one-pass ``gradient_cams`` equals every single-method call exactly; a batch gives the
  maps of its images one at a time; degenerate inputs give finite zero or constant maps.

Where the libraries' notions of "the layer's activation" differ (DESIGN.md: DenseNet's
``features`` is followed by an in-place ReLU), each comparison names the capture point that
matches the oracle, and one test shows the other point does not match.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn
from torchvision.models import densenet121, resnet18

from cambench.cams import METHODS
from cambench.cams.gradient_cams import VARIANTS, gradient_cams

pytestmark = pytest.mark.methods

SIZE = 64
TARGETS = torch.tensor([1, 5, 7, 999])
CAM_NAMES = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam")


def explain(name: str, model: nn.Module, x: torch.Tensor, target, **options):
    return METHODS.get(name).obj(model, x, target, **options)


def minmax(maps) -> torch.Tensor:
    """Per-image min-max to [0, 1] in float64; a flat map becomes 0."""
    flat = torch.as_tensor(np.asarray(maps)).double().flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    top = flat.max(dim=1, keepdim=True).values
    return flat / torch.where(top > 0, top, torch.ones_like(top))


def assert_rel_close(actual, expected, rtol: float = 1e-5) -> None:
    """Agreement to ``rtol`` of the expected map's largest value (float32 sums over K channels)."""
    actual = torch.as_tensor(np.asarray(actual)).double()
    expected = torch.as_tensor(np.asarray(expected)).double()
    scale = float(expected.abs().max())
    assert scale > 0, "degenerate oracle: the expected map is all zero"
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


def _seeded(build) -> nn.Module:
    torch.manual_seed(0)
    return build(weights=None).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {"resnet18": _seeded(resnet18), "densenet121": _seeded(densenet121)}


@pytest.fixture(scope="module")
def scaled_models(models) -> dict[str, nn.Module]:
    """Copies with the classifier weights x 1e4, for pytorch-grad-cam's Grad-CAM++.

    pytorch-grad-cam adds eps = 1e-6 to Grad-CAM++'s denominator 2 g^2 + S g^3: an entry
    with g^2 << 1e-6 gets a ~ 0 there and a ~ 1/2 in the closed form. Random-init heads give
    g ~ 1e-2, and the eps alone moves the maps by ~2 % (measured). Scaling the head scales g
    (the activations do not change), and both implementations then compute the same function
    of the same model with the eps negligible: measured <= 7e-7 relative at x 1e4 (1.8e-5
    at x 1e3). At x 1e4 the median S g is ~7 on DenseNet, so the 2 g^2 term still weighs.
    """
    out = {}
    for name, model in models.items():
        scaled = copy.deepcopy(model)
        head = scaled.fc if name == "resnet18" else scaled.classifier
        with torch.no_grad():
            head.weight.mul_(1e4)
        out[name] = scaled
    return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# --- captum: Grad-CAM --------------------------------------------------------------------


def captum_gradcam(model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor):
    module = dict(model.named_modules())[layer]
    attr = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
    up = LayerAttribution.interpolate(attr, (SIZE, SIZE), interpolate_mode="bilinear")
    return attr[:, 0].detach(), up[:, 0].detach()


@pytest.mark.parametrize(
    ("arch", "layer"),
    [
        ("resnet18", "layer4"),
        # captum's hook hands a clone downstream and keeps the layer's own output, so its
        # activation and gradient are both before DenseNet's in-place F.relu: point="produced".
        ("densenet121", "features"),
    ],
)
def test_gradcam_matches_captum(models, x, arch, layer):
    model = models[arch]
    ours = explain("gradcam", model, x, TARGETS, layer=layer, point="produced")
    layer_attr, up_attr = captum_gradcam(model, layer, x, TARGETS)
    assert_rel_close(ours.layer_maps, layer_attr)
    diff = (minmax(ours.maps) - minmax(up_attr)).abs().max()
    assert float(diff) <= 1e-5, f"Grad-CAM vs captum after min-max: max |diff| = {float(diff):.2e}"


def test_densenet_consumed_point_differs_from_captum(models, x):
    """The capture point matters on DenseNet ``features`` (post in-place ReLU differs)."""
    model = models["densenet121"]
    consumed = explain("gradcam", model, x, TARGETS, layer="features", point="consumed")
    _, up_attr = captum_gradcam(model, "features", x, TARGETS)
    diff = (minmax(consumed.maps) - minmax(up_attr)).abs().max()
    assert float(diff) > 1e-2, "post-ReLU capture should not match captum's pre-ReLU semantics"


# --- pytorch-grad-cam: all five ------------------------------------------------------------


def _pgc_classes() -> dict[str, type]:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    return {
        "gradcam": GradCAM,
        "gradcampp": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
        "hirescam": HiResCAM,
        "layercam": LayerCAM,
    }


# DenseNet layers where pytorch-grad-cam's capture agrees with ours: it keeps the layer's
# output tensor itself (so in-place changes show in its activation) and hooks the gradient
# of that tensor before any in-place change. After ``features`` (in-place ReLU next) the two
# disagree; ``features.denseblock4`` feeds norm5, out of place. Grad-CAM++ and XGrad-CAM
# divide by a channel's activation sum S (2 g^2 + S g^3, resp. S). The block's output is
# signed, so S comes near 0 and the libraries' eps (1e-6, 1e-7; we have none) and float32
# rounding are amplified: measured 2e-5 relative for XGrad-CAM and 7e-4 for Grad-CAM++ (head
# x 1e3). Both formulas are derived for post-ReLU activations (S >= 0), where they are well
# conditioned, so those two are compared on the last dense layer's relu2.
DENSE_BLOCK = "features.denseblock4"
DENSE_RELU = "features.denseblock4.denselayer16.relu2"
PGC_CASES = [("resnet18", "layer4", name) for name in CAM_NAMES]
PGC_CASES += [("densenet121", DENSE_BLOCK, name) for name in ("gradcam", "hirescam", "layercam")]
PGC_CASES += [("densenet121", DENSE_RELU, name) for name in ("gradcampp", "xgradcam")]


@pytest.mark.parametrize(("arch", "layer", "name"), PGC_CASES)
def test_matches_pytorch_grad_cam(scaled_models, x, arch, layer, name):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = scaled_models[arch]
    module = dict(model.named_modules())[layer]
    ours = explain(name, model, x, TARGETS, layer=layer)
    with _pgc_classes()[name](model, [module]) as cam:
        upsampled = cam(x, [ClassifierOutputTarget(int(t)) for t in TARGETS])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        # Its own captured activation and gradient through its own formula, before its
        # min-max and resize: the layer map, to compare at the layer's resolution.
        layer_map = np.maximum(cam.get_cam_image(x, module, None, acts, grads, False), 0)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam calls loss.backward()

    assert_rel_close(ours.layer_maps, layer_map)
    # At input size it min-max scales then resizes with cv2 (bilinear, half-pixel centres
    # like torch's align_corners=False); bilinear interpolation commutes with that affine
    # scaling, so only float32 rounding and its 1e-7 eps in the scaling remain. Measured:
    # <= 1.1e-5 (DenseNet LayerCAM); 1e-4 leaves room for other BLAS builds.
    diff = (minmax(ours.maps) - minmax(upsampled)).abs().max()
    assert float(diff) <= 1e-4, (
        f"{name} vs pytorch-grad-cam at input size: max |diff| = {float(diff):.2e}"
    )


# --- torchcam: XGrad-CAM, LayerCAM (and Grad-CAM) ---------------------------------------------


@pytest.mark.parametrize("name", ["gradcam", "xgradcam", "layercam"])
@pytest.mark.parametrize(
    ("arch", "layer", "point"),
    [
        ("resnet18", "layer4", "produced"),
        # torchcam detaches the hooked output without copying and differentiates the
        # tensor the forward left behind: both post in-place ReLU, our point="consumed".
        ("densenet121", "features", "consumed"),
    ],
)
def test_matches_torchcam(models, x, arch, layer, point, name):
    from torchcam.methods import GradCAM, LayerCAM, XGradCAM

    extractor_cls = {"gradcam": GradCAM, "xgradcam": XGradCAM, "layercam": LayerCAM}[name]
    model = models[arch]
    ours = explain(name, model, x, TARGETS, layer=layer, point=point)
    with extractor_cls(model, target_layer=layer, input_shape=(3, SIZE, SIZE)) as extractor:
        scores = model(x)
        (theirs,) = extractor(class_idx=TARGETS.tolist(), scores=scores, normalized=False)
    assert_rel_close(ours.layer_maps, theirs.detach())


# --- hand computation on a toy layer -------------------------------------------------------


class FixedGradient(nn.Module):
    """logit_c = sum_kij A_kij G[c, k, i, j] with A = the input, seen through ``tap``.

    The gradient of logit c with respect to A is G[c] wherever A is, so activation and
    gradient of the target layer ``tap`` are both chosen by hand.
    """

    def __init__(self, gradients: torch.Tensor):
        super().__init__()
        self.tap = nn.Identity()
        self.register_buffer("gradients", gradients)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkhw,ckhw->bc", self.tap(x), self.gradients)


A0 = [[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]  # sum S0 = 6
G0 = [[1.0, 0.5, 0.0], [-0.25, 1.0, 0.0], [0.5, 0.0, 0.0]]
A1 = [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]  # sum S1 = 4
# -0.5 = -2 / S1: there 2 g^2 + S1 g^3 = 0.5 - 0.5 = 0 exactly, the singular case.
G1 = [[0.25, -0.5, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -0.5]]


@pytest.fixture(scope="module")
def toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gradients = torch.stack([torch.tensor([G0, G1]), torch.zeros(2, 3, 3)])  # class 1 is dead
    x = torch.tensor([A0, A1])[None].repeat(2, 1, 1, 1)
    return FixedGradient(gradients).eval(), x, torch.tensor([0, 1])


def test_gradcampp_by_hand(toy):
    """Grad-CAM++ weights w_k = sum_ij a_kij ReLU(g_kij), a = g^2 / (2 g^2 + S_k g^3) = 1 / (2 + S_k g).

    Channel 0 (S = 6): g = 1 at two positions (a = 1/8), g = 1/2 at two (a = 1/5), the
    negative g = -1/4 has weight ReLU(g) = 0: w0 = 2 * 1/8 + 2 * 1/5 * 1/2 = 9/20.
    Channel 1 (S = 4): g = 1/4 (a = 1/3), g = 2 (a = 1/10), g = -1/2 makes the
    denominator 0 (a := 0, no NaN): w1 = 1/3 * 1/4 + 1/10 * 2 = 17/60.
    """
    model, x, target = toy
    w = [Fraction(9, 20), Fraction(17, 60)]
    out = explain("gradcampp", model, x, target, layer="tap")
    expected_w = torch.tensor([[float(w[0]), float(w[1])], [0.0, 0.0]])
    torch.testing.assert_close(out.extras["alpha"].float(), expected_w, rtol=1e-6, atol=1e-7)
    expected_map = torch.relu(float(w[0]) * torch.tensor(A0) + float(w[1]) * torch.tensor(A1))
    torch.testing.assert_close(out.layer_maps[0], expected_map, rtol=1e-6, atol=1e-7)
    assert torch.equal(out.layer_maps[1], torch.zeros(3, 3)), "a dead target gives a zero map"
    assert out.maps.shape == (2, 3, 3) and bool(torch.isfinite(out.maps).all())


def test_other_variants_by_hand(toy):
    """Grad-CAM, XGrad-CAM, HiResCAM, LayerCAM on the same toy, written out in numpy."""
    model, x, target = toy
    a, g = np.array([A0, A1]), np.array([G0, G1])
    s = a.sum(axis=(1, 2))  # [6, 4]
    expected = {
        "gradcam": np.maximum(np.einsum("k,kij->ij", g.mean(axis=(1, 2)), a), 0),
        "xgradcam": np.maximum(np.einsum("k,kij->ij", (a * g).sum(axis=(1, 2)) / s, a), 0),
        "hirescam": np.maximum((g * a).sum(axis=0), 0),
        "layercam": np.maximum((np.maximum(g, 0) * a).sum(axis=0), 0),
    }
    # Spot values: Grad-CAM alpha = (2.75 / 9, 1.25 / 9); XGrad-CAM w = (2.5 / 6, -1 / 4).
    np.testing.assert_allclose(g.mean(axis=(1, 2)), [2.75 / 9, 1.25 / 9])
    np.testing.assert_allclose((a * g).sum(axis=(1, 2)) / s, [2.5 / 6, -1 / 4])
    for name, want in expected.items():
        out = explain(name, model, x, target, layer="tap")
        torch.testing.assert_close(
            out.layer_maps[0].double(), torch.from_numpy(want), rtol=1e-6, atol=1e-7
        )
        assert torch.equal(out.layer_maps[1], torch.zeros(3, 3)), (
            f"{name}: a dead target gives a zero map"
        )


# --- one pass, batch invariance, degenerate inputs ------------------------------------------


def test_one_pass_equals_single_calls(models, x):
    model = models["resnet18"]
    together = gradient_cams(model, x, TARGETS, variants=tuple(VARIANTS), layer="layer4")
    assert set(together) == set(CAM_NAMES)
    for name in CAM_NAMES:
        alone = explain(name, model, x, TARGETS, layer="layer4")
        assert torch.equal(together[name].maps, alone.maps), name
        assert torch.equal(together[name].layer_maps, alone.layer_maps), name


@pytest.mark.parametrize("name", [*CAM_NAMES, "cam"])
def test_batch_invariance(models, x, name):
    """A batch of 4 gives the maps of its images explained one at a time (eval-mode BN)."""
    model = models["resnet18"]
    batched = explain(name, model, x, TARGETS, layer="layer4").maps
    single = torch.cat(
        [
            explain(name, model, x[i : i + 1], TARGETS[i : i + 1], layer="layer4").maps
            for i in range(4)
        ]
    )
    assert_rel_close(batched, single, rtol=1e-5)


class TinyNet(nn.Module):
    """conv(bias-free) -> ReLU -> 1x1 conv (bias-free) -> ReLU -> GAP -> Linear."""

    def __init__(self, kernel: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, kernel, padding=kernel // 2, bias=False),
            nn.ReLU(),
            nn.Conv2d(4, 4, 1, bias=False),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _positive_tiny(kernel: int) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet(kernel).eval()
    with torch.no_grad():  # positive weights: the features are alive and the map is not all zero
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
    return model


def _assert_finite(out, shape) -> None:
    assert out.maps.dtype == torch.float32 and tuple(out.maps.shape) == shape
    for tensor in (out.maps, out.layer_maps, *out.extras.values()):
        assert bool(torch.isfinite(tensor).all()), "NaN or inf in the explanation"


@pytest.mark.parametrize("name", [*CAM_NAMES, "cam"])
def test_all_zero_image_gives_zero_map(name):
    """Bias-free features of a black image are 0: every channel sums to 0 (XGrad-CAM's and
    Grad-CAM++'s denominators vanish) and the map is 0, not NaN."""
    model = _positive_tiny(3)
    out = explain(name, model, torch.zeros(2, 1, 16, 16), torch.tensor([0, 1]), layer="features")
    _assert_finite(out, (2, 16, 16))
    assert torch.equal(out.maps, torch.zeros_like(out.maps))


@pytest.mark.parametrize("name", [*CAM_NAMES, "cam"])
def test_constant_map(name):
    """1x1 convolutions of a constant image give spatially constant features, so a constant
    map (which a min-max would divide by zero) comes out finite and constant."""
    model = _positive_tiny(1)
    out = explain(
        name, model, torch.full((2, 1, 16, 16), 0.7), torch.tensor([0, 1]), layer="features"
    )
    _assert_finite(out, (2, 16, 16))
    flat = out.maps.flatten(1)
    assert torch.equal(flat.min(dim=1).values, flat.max(dim=1).values)


@pytest.mark.parametrize("name", [*CAM_NAMES, "cam"])
def test_dead_target_gives_zero_map(name):
    """Class 1's weights are zero: its gradient is 0 everywhere and every map is 0."""
    model = _positive_tiny(3)
    with torch.no_grad():
        model.fc.weight[1].zero_()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    out = explain(name, model, x, torch.tensor([1, 1]), layer="features")
    _assert_finite(out, (2, 16, 16))
    assert torch.equal(out.maps, torch.zeros_like(out.maps))
    alive = explain(name, model, x, torch.tensor([0, 0]), layer="features")
    assert float(alive.maps.abs().max()) > 0, "control: class 0 must give a non-zero map"


def test_bilinear_upsampling_is_captums(models, x):
    """Input-size maps are the layer maps upsampled bilinearly with align_corners=False."""
    out = explain("gradcam", models["resnet18"], x, TARGETS, layer="layer3")
    want = F.interpolate(
        out.layer_maps[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False
    )[:, 0]
    torch.testing.assert_close(out.maps, want, rtol=0, atol=0)


def test_shared_pass_gives_each_method_its_maps_from_one_pass(models, x):
    """What the runner does: five gradient CAMs of one batch from one forward + backward,
    each equal to the method called alone."""
    from cambench.cams import METHODS
    from cambench.cams.gradient_cams import SharedPass
    from cambench.metrics.cost import PassCounter

    model = models["resnet18"]
    target = torch.tensor([0, 1, 2, 3])
    shared = SharedPass(model, x, target, layer="layer4")
    options = {"gradcampp": {"normalize_alpha": True}, "gradcam": {"score": "logit"}}
    with PassCounter(model) as count:
        got = {name: shared.explain(name, options.get(name, {})) for name in SharedPass.SHAREABLE}
    assert count.forwards == len(x) and count.backwards == len(x)
    for name, explanation in got.items():
        alone = METHODS.get(name).obj(model, x, target, layer="layer4", **options.get(name, {}))
        torch.testing.assert_close(explanation.maps, alone.maps, rtol=0, atol=0)
    assert shared.explain("gradcam", {"unknown_option": 1}) is None  # not shared: run alone
    assert shared.explain("scorecam", {}) is None
