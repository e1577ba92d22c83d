"""Vision transformers through the CAM family: the token-to-map reshape of ``cams.hooks``.

- timm ViT-Tiny (``vit_tiny_patch16_224``, random init, seeded) through our Grad-CAM at
  ``blocks[-1].norm1`` against pytorch-grad-cam's ``GradCAM`` with its documented ViT
  ``reshape_transform`` (class token dropped, 14 x 14 grid restored, channels first): the
  same activation and gradient to the bit, and maps within 1e-4 after min-max at the input
  size (pytorch-grad-cam min-max scales, then resizes with cv2 bilinear, half-pixel
  centres, as our ``align_corners=False`` upsampling); likewise XGrad-CAM, HiResCAM and
  LayerCAM. Grad-CAM++ is not compared map to map: pytorch-grad-cam adds eps = 1e-6 to its
  denominator, which outweighs g^2 ~ 1e-8 of a random-init ViT; it gets the same tensors.
- ``auto`` on timm's ViT is ``blocks.11.norm1``, where pytorch-grad-cam's docs put the
  target; on the block's output the patch tokens get no gradient (the head reads the class
  token only), which is why; with average pooling it is ``blocks``.
- Prefix tokens are read from the model's ``num_prefix_tokens`` (register tokens too).
- timm's Swin (channels-last stages, ``output_fmt = "NHWC"``): ``auto`` is the final
  ``norm``; Grad-CAM at ``layers[-1].blocks[-1].norm1`` against pytorch-grad-cam with a
  channels-last permute as its reshape.
- Every method that needs a target layer runs on a small ViT and leaves it as it came.

Nothing is downloaded: ``pretrained=False`` throughout.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from model_hygiene import changes, snapshot
from torch import nn

from cambench.benchmarks.core.errors import NotApplicable, UserError
from cambench.benchmarks.models.external import auto_layer
from cambench.cams import METHODS
from cambench.cams.gradient_cams import VARIANTS, LayerGrad, layer_gradient
from cambench.cams.hooks import auto_layer_name

timm = pytest.importorskip("timm")
pytest.importorskip("pytorch_grad_cam")

pytestmark = pytest.mark.methods

TARGET = torch.tensor([1, 3])


@functools.cache
def vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()


@functools.cache
def small_vit(**options) -> nn.Module:
    """A 2-block ViT on 32 px images, 8 px patches: a 4 x 4 grid, 16 channels."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5, **options
    )
    return net.eval()


@pytest.fixture(scope="module")
def x224() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vit_reshape(tensor: torch.Tensor, height: int = 14, width: int = 14, prefix: int = 1):
    """pytorch-grad-cam's ``reshape_transform`` for ViT (its tutorial ``vit_example.py``)."""
    result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def nhwc_reshape(tensor: torch.Tensor) -> torch.Tensor:
    """The same for timm 1.0's Swin, whose blocks keep (B, H, W, C)."""
    return tensor.permute(0, 3, 1, 2)


def minmax(maps) -> torch.Tensor:
    """Per-image min-max to [0, 1] in float64."""
    flat = torch.as_tensor(np.asarray(maps)).double().flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return flat / flat.max(dim=1, keepdim=True).values.clamp_min(1e-300)


def pytorch_grad_cam(name, model, layer, x, target, reshape):
    """pytorch-grad-cam's maps at input size and its captured (activation, gradient)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {
        "gradcam": GradCAM,
        "gradcampp": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
        "hirescam": HiResCAM,
        "layercam": LayerCAM,
    }[name]
    module = model.get_submodule(layer)
    with cls(model=model, target_layers=[module], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])
        activation = cam.activations_and_grads.activations[0]
        gradient = cam.activations_and_grads.gradients[0]
    model.zero_grad(set_to_none=True)  # it calls loss.backward()
    return maps, activation, gradient


@pytest.mark.parametrize("name", ["gradcam", "xgradcam", "hirescam", "layercam"])
def test_vit_tiny_matches_pytorch_grad_cam_with_its_reshape_transform(x224, name):
    model = vit_tiny()
    ours = METHODS.get(name).obj(model, x224, TARGET, layer="blocks.11.norm1")
    theirs, _, _ = pytorch_grad_cam(name, model, "blocks.11.norm1", x224, TARGET, vit_reshape)
    assert ours.maps.shape == (2, 224, 224) and ours.layer_maps.shape == (2, 14, 14)
    assert float(ours.layer_maps.amax()) > 0  # not a degenerate all-zero comparison
    # Measured: 3.7e-7 (Grad-CAM), 5.6e-6 (XGrad-CAM, its 1e-7 eps on signed sums).
    diff = float((minmax(ours.maps) - minmax(theirs)).abs().max())
    assert diff <= 1e-4, f"{name} vs pytorch-grad-cam on ViT-Tiny: max |diff| = {diff:.2e}"


def test_vit_tiny_captures_pytorch_grad_cams_activation_and_gradient(x224):
    """The reshape is the same: activation and gradient equal pytorch-grad-cam's reshaped
    ones, so every variant (Grad-CAM++ included) computes on the same tensors."""
    model = vit_tiny()
    lg = layer_gradient(model, x224, TARGET, layer="blocks.11.norm1")
    _, act, grad = pytorch_grad_cam("gradcam", model, "blocks.11.norm1", x224, TARGET, vit_reshape)
    assert lg.activation.shape == (2, 192, 14, 14)
    torch.testing.assert_close(lg.activation, act, rtol=0, atol=1e-6)
    torch.testing.assert_close(lg.gradient, grad, rtol=0, atol=1e-6 * float(grad.abs().max()))
    theirs = LayerGrad(act, grad, lg.logits)
    ours = METHODS.get("gradcampp").obj(model, x224, TARGET, layer="blocks.11.norm1")
    torch.testing.assert_close(ours.layer_maps, VARIANTS["gradcampp"](theirs)[0])


def test_auto_on_vit_is_the_last_blocks_norm1(x224):
    model = vit_tiny()
    assert auto_layer_name(model, x224) == "blocks.11.norm1"
    assert auto_layer(model, x224[:1]) == "blocks.11.norm1"  # the harness names it alike
    auto = METHODS.get("gradcam").obj(model, x224, TARGET)
    named = METHODS.get("gradcam").obj(model, x224, TARGET, layer="blocks.11.norm1")
    torch.testing.assert_close(auto.maps, named.maps, rtol=0, atol=0)
    # Why not the last block's output: its patch tokens do not reach the class token's head.
    lg = layer_gradient(model, x224, TARGET, layer="blocks.11")
    assert float(lg.gradient.abs().max()) == 0.0
    assert float(METHODS.get("gradcam").obj(model, x224, TARGET, layer="blocks.11").maps.max()) == 0


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "blocks.1.norm1"),
        ({"reg_tokens": 3}, "blocks.1.norm1"),
        # the head averages the patch tokens: the map it pools, as for a CNN
        ({"global_pool": "avg", "class_token": False}, "blocks"),
    ],
)
def test_auto_on_small_vits(x32, options, expected):
    model = small_vit(**options)
    assert auto_layer_name(model, x32) == expected
    out = METHODS.get("gradcam").obj(model, x32, TARGET)
    assert out.layer_maps.shape == (2, 4, 4) and bool(out.layer_maps.amax() > 0)


def test_prefix_tokens_are_read_from_the_model(x32):
    """Register tokens: 1 class + 3 register tokens before the 4 x 4 patches; the reshape
    drops the model's ``num_prefix_tokens`` of them, as a transform dropping 4 does."""
    model = small_vit(reg_tokens=3)
    assert model.num_prefix_tokens == 4
    layer = "blocks.1.norm1"
    ours = METHODS.get("gradcam").obj(model, x32, TARGET, layer=layer)

    def reshape(t):
        return vit_reshape(t, 4, 4, prefix=4)

    theirs, _, _ = pytorch_grad_cam("gradcam", model, layer, x32, TARGET, reshape)
    assert float((minmax(ours.maps) - minmax(theirs)).abs().max()) <= 1e-4


class Sequence(nn.Module):
    """Seven tokens of 4 channels: no square grid, and no ``num_prefix_tokens`` to say so."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        tokens = self.embed(x.flatten(2)[..., :7].transpose(1, 2))
        return self.head(tokens.mean(1))


def test_a_token_layer_without_a_grid_is_refused_by_name():
    model = Sequence().eval()
    with pytest.raises(UserError, match="target layer 'embed' returns \\(2, 7, 4\\).*no square"):
        METHODS.get("gradcam").obj(model, torch.rand(2, 3, 8, 8), 0, layer="embed")
    assert not model.embed._forward_hooks


def test_capture_points_agree_on_token_layers(x32):
    """The tokens handed on are rebuilt from the tap's copy: no in-place change to see."""
    model = small_vit()
    produced = METHODS.get("gradcam").obj(model, x32, TARGET, layer="blocks.1.norm1")
    consumed = METHODS.get("gradcam").obj(
        model, x32, TARGET, layer="blocks.1.norm1", point="consumed"
    )
    torch.testing.assert_close(produced.maps, consumed.maps, rtol=0, atol=0)


LAYER_METHODS = [n for n in METHODS.names() if "layer" in METHODS.get(n).info.needs]


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_every_layer_method_runs_on_a_vit_and_leaves_it_as_it_came(x32, name):
    model = small_vit()
    before = snapshot(model)
    try:
        out = METHODS.get(name).obj(model, x32, TARGET)
    except NotApplicable as exc:  # CAM needs a GAP head, guided Grad-CAM ReLUs
        assert name in ("cam", "guided_gradcam"), f"{name}: {exc}"
    else:
        assert out.maps.shape == (2, 32, 32) and out.maps.dtype == torch.float32
        assert bool(torch.isfinite(out.maps).all())
        if out.layer_maps is not None:
            assert out.layer_maps.shape == (2, 4, 4)
    assert changes(model, before) == []


@functools.cache
def swin_tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5).eval()


def test_swin_tiny_gradcam_matches_pytorch_grad_cam_on_its_channels_last_stage(x224):
    model = swin_tiny()
    assert model.output_fmt == "NHWC"
    layer = (
        "layers.3.blocks.1.norm1"  # pytorch-grad-cam's Swin example: layers[-1].blocks[-1].norm1
    )
    ours = METHODS.get("gradcam").obj(model, x224, TARGET, layer=layer)
    theirs, act, _ = pytorch_grad_cam("gradcam", model, layer, x224, TARGET, nhwc_reshape)
    assert ours.layer_maps.shape == (2, 7, 7) and act.shape == (2, 768, 7, 7)
    assert float((minmax(ours.maps) - minmax(theirs)).abs().max()) <= 1e-4


def test_swin_auto_is_its_final_norm_and_gives_a_finite_map_of_the_input_size(x224):
    model = swin_tiny()
    assert auto_layer_name(model, x224) == "norm"
    out = METHODS.get("gradcam").obj(model, x224, TARGET)
    assert out.maps.shape == (2, 224, 224) and out.layer_maps.shape == (2, 7, 7)
    assert bool(torch.isfinite(out.maps).all()) and bool(out.maps.amax() > 0)
    # the head average-pools that map (CAM applies): Grad-CAM there is the rectified CAM,
    # its weights the head's / 49, as on a CNN's last map
    cam = METHODS.get("cam").obj(model, x224, TARGET)
    torch.testing.assert_close(
        out.layer_maps,
        torch.relu(cam.layer_maps) / 49,
        rtol=0,
        atol=1e-6 * float(cam.layer_maps.abs().max()),
    )
