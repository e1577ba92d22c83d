"""Models from outside the zoo, named by import path in a suite: a user's module with its
checkpoint, and an unmodified torchvision DenseNet-121 at 224 px fine-tuned from a weights
file. Checked against captum's LayerGradCam on the same weights loaded by hand, and
against the user's own evaluation of the checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.suite import load_suite
from cambench.benchmarks.models.external import auto_layer
from cambench.benchmarks.run import main
from cambench.datasets import DATASETS

pytestmark = pytest.mark.harness


@pytest.fixture(autouse=True)
def _forget_models_named_by_path():
    """A model named by import path is registered on first use: each test leaves the
    registry as it found it, so later tests (the annotation check of every registered
    entry) see the zoo only."""
    from cambench.benchmarks.models.zoo import MODELS

    before = set(MODELS.names())
    yield
    for name in set(MODELS.names()) - before:
        MODELS.remove(name)


USER_MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


def build(num_classes, in_channels, width=8):
    return Net(num_classes, in_channels, width)
"""

DATA = """
[datasets.synth-lesion]
image_size = 32
n = 64
"""


def run(tmp_path: Path, body: str, name: str = "run") -> Path:
    suite = tmp_path / f"{name}.toml"
    suite.write_text(body)
    out = tmp_path / name
    cache = tmp_path / "cache"
    assert (
        main(["--suite", str(suite), "--out", str(out), "--cache", str(cache), "--no-progress"])
        == 0
    )
    return out


def captum_gradcam(model, x, target, layer, size=None):
    """captum's Grad-CAM at ``layer``, rectified there and upsampled bilinearly to ``size``
    (default: the input's), as the paper's map is."""
    from captum.attr import LayerAttribution, LayerGradCam

    attr = LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=target, relu_attributions=True
    )
    size = size or tuple(x.shape[-2:])
    return LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")[:, 0].detach()


def minmax(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(m.shape)


def test_a_users_model_by_import_path_with_its_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models

    torch.manual_seed(3)
    net = my_models.build(num_classes=2, in_channels=1, width=6)
    ckpt = tmp_path / "mine.pt"
    torch.save(net.state_dict(), ckpt)
    body = (
        'name = "mine"\n[eval]\nmax_images = 8\n'
        f'[models.mine]\nuse = "my_models:build"\nwidth = 6\ncheckpoint = "{ckpt}"\n'
        + DATA
        + "[methods.gradcam]\n[metrics.pointing_game]\n"
    )
    out = run(tmp_path, body)
    report = json.loads(next((out / "groups").glob("*/model.json")).read_text())
    assert report["layer"] == "body"  # "auto": the last spatial map, its outermost module
    # the user's own evaluation of the checkpoint: the same accuracy
    test = DATASETS.get("synth-lesion").obj(split="test", image_size=32, n=64)
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    y = torch.tensor([test[i]["label"] for i in range(len(test))])
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert report["accuracy"] == pytest.approx(acc)
    # Grad-CAM of the run = captum's on the hand-loaded checkpoint
    ex = np.load(next((out / "groups").glob("*/examples.npz")))
    xs = torch.from_numpy(ex["images"])
    with torch.no_grad():
        target = net(xs).argmax(1)
    ref = captum_gradcam(net, xs, target, "body")
    torch.testing.assert_close(
        minmax(torch.from_numpy(ex["maps__gradcam"])), minmax(ref), atol=1e-4, rtol=0
    )


def test_torchvision_densenet121_fine_tuned_from_a_weights_file_at_224_px(tmp_path):
    """Unmodified torchvision DenseNet-121, random weights saved to a file and given as
    ``weights``: fine-tuned (one epoch at a learning rate too small to move them), resized
    to 224 px inside the model, explained at its ``features`` by Grad-CAM, scored by AOPC."""
    import torchvision

    torch.manual_seed(0)
    start = torchvision.models.densenet121(num_classes=1000)
    weights = tmp_path / "dn.pt"
    torch.save(start.state_dict(), weights)
    body = (
        'name = "tv"\n[eval]\nmax_images = 2\nbatch_size = 2\n'
        "[train]\nepochs = 1\nlr = 1e-12\nbatch_size = 32\n"
        f'[models.dn]\nuse = "torchvision:densenet121"\nweights = "{weights}"\n'
        + DATA.replace("n = 64", "n = 32")
        + "[methods.gradcam]\n[metrics.aopc_morf]\nregion = 8\nsteps = 2\n"
    )
    out = run(tmp_path, body)
    cells = json.loads((out / "manifest.json").read_text())
    assert cells["status"] == "finished"
    report = json.loads(next((out / "groups").glob("*/model.json")).read_text())
    assert report["layer"] == "features"
    ckpt = next((tmp_path / "cache" / "models").glob("torchvision_densenet121--*.pt"))
    assert report["checkpoint"] == str(ckpt)  # the run says where the trained weights are
    tuned = torch.load(ckpt, weights_only=True)
    # the file's weights were loaded (all but the 1000-class head, replaced for 2 classes)
    own = start.state_dict()
    torch.testing.assert_close(tuned["features.conv0.weight"], own["features.conv0.weight"])
    assert tuned["classifier.weight"].shape == (2, 1024)
    # Grad-CAM of the run = captum's on the tuned weights, through the same 224-px input
    model = torchvision.models.densenet121(num_classes=2)
    model.load_state_dict(tuned)
    model.eval()
    ex = np.load(next((out / "groups").glob("*/examples.npz")))
    xs = torch.from_numpy(ex["images"])
    big = F.interpolate(xs.expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear")
    with torch.no_grad():
        target = model(big).argmax(1)
    # the 7 x 7 map of the 224-px input, brought to the dataset's 32 px
    ref = captum_gradcam(model, big, target, "features", size=(32, 32))
    ours = torch.from_numpy(ex["maps__gradcam"])
    assert ours.shape == (2, 32, 32)
    torch.testing.assert_close(minmax(ours), minmax(ref), atol=1e-4, rtol=0)


def test_imagenet_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    body = 'name = "x"\n[models.dn]\nuse = "torchvision:resnet18"\nweights = "imagenet"\n' + DATA
    (tmp_path / "s.toml").write_text(body + "[methods.gradcam]\n[metrics.pointing_game]\n")
    with pytest.raises(UserError, match="not in torch's cache .*nothing is downloaded"):
        from cambench.benchmarks.models.zoo import build_model

        build_model("torchvision:resnet18", in_channels=1, num_classes=2, weights="imagenet")


@pytest.mark.parametrize(
    ("use", "message"),
    [
        ("no_such_module_here:build", "cannot import 'no_such_module_here'"),
        ("torchvision:densenet12", "did you mean: densenet121"),
        ("os.path:join", "must accept num_classes and in_channels"),
    ],
)
def test_a_model_that_cannot_be_found_is_refused_when_the_suite_loads(tmp_path, use, message):
    suite = tmp_path / "bad.toml"
    suite.write_text(f'name = "bad"\n[models.m]\nuse = "{use}"\n' + DATA + "[methods.gradcam]\n")
    with pytest.raises(UserError, match=message):
        load_suite(str(suite))


def test_auto_layer_is_the_outermost_module_of_the_last_spatial_map():
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=2)
    assert auto_layer(resnet, torch.rand(1, 3, 64, 64)) == "layer4"
    vgg = torchvision.models.vgg11(num_classes=2)
    assert auto_layer(vgg, torch.rand(1, 3, 64, 64)) == "features"


def test_a_checkpoint_for_other_input_channels_says_why(tmp_path, capsys):
    """A zoo model's checkpoint trained on RGB given for grey-scale data: the error names
    the tensor and both shapes, not only torch's first line."""
    from cambench.benchmarks.models.zoo import build_model

    rgb = tmp_path / "rgb.pt"
    torch.save(build_model("gapcnn", in_channels=3, num_classes=2).state_dict(), rgb)
    body = f'name = "c"\n[models.gapcnn]\ncheckpoint = "{rgb}"\n' + DATA
    suite = tmp_path / "c.toml"
    suite.write_text(body + "[methods.gradcam]\n[metrics.pointing_game]\n")
    out = tmp_path / "c"
    args = ["--suite", str(suite), "--out", str(out), "--cache", str(tmp_path / "k")]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "features.0.weight: [16, 3, 3, 3] in the checkpoint, [16, 1, 3, 3] in the model" in err
    assert "built for 1 input channel(s) and 2 class(es)" in err


EXTERNAL = """
name = "ext"
[eval]
max_images = 16
[train]
epochs = 3
[models.gapcnn]
[models.lesion-model]
use = "gapcnn"
trained_on = "synth-lesion"
classes = { opacity = "lesion" }
[datasets.synth-lesion]
image_size = 32
n = 64
[datasets.synth-cxr]
image_size = 32
n = 64
[methods.gradcam]
[methods.random]
[metrics.pointing_game]
"""


def test_a_model_trained_on_one_dataset_is_explained_on_another(tmp_path):
    """External validation: ``trained_on`` trains (or reuses) the model of synth-lesion and
    explains it on synth-cxr, "opacity" read as its "lesion" class; the report is the
    model's accuracy on synth-cxr, as a hand evaluation of the same weights finds it."""
    from cambench.benchmarks.models.zoo import build_model

    out = run(tmp_path, EXTERNAL)
    groups = out / "groups"
    own = json.loads(next(groups.glob("gapcnn--synth-lesion*/model.json")).read_text())
    ext = json.loads(next(groups.glob("lesion-model--synth-cxr*/model.json")).read_text())
    assert ext["trained_on"]["dataset"] == "synth-lesion"
    assert ext["checkpoint"] == own["checkpoint"]  # one model, trained once
    assert ext["left_out_classes"] == {}
    model = build_model("gapcnn", in_channels=1, num_classes=2)
    model.load_state_dict(torch.load(ext["checkpoint"], weights_only=True))
    model.eval()
    test = DATASETS.get("synth-cxr").obj(split="test", image_size=32, n=64)
    x = torch.stack([test[i]["image"] for i in range(len(test))])
    y = torch.tensor([test[i]["label"] for i in range(len(test))])  # normal 0, opacity 1
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert ext["accuracy"] == pytest.approx(acc)
    assert ext["accuracy"] != pytest.approx(own["accuracy"])  # another dataset's number
    cells = json.loads((out / "manifest.json").read_text())
    assert cells["status"] == "finished"


def test_a_class_mapping_to_an_unknown_class_is_refused_before_training(tmp_path, capsys):
    body = EXTERNAL.replace('classes = { opacity = "lesion" }', 'classes = { opacity = "tumour" }')
    suite = tmp_path / "bad.toml"
    suite.write_text(body)
    code = main(
        ["--suite", str(suite), "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "maps to 'tumour', which the model does not predict; its classes: normal, lesion" in err
    assert not (tmp_path / "c" / "models").exists()  # refused before any training


def test_an_evaluation_only_dataset_needs_no_training_split_under_a_checkpoint(tmp_path):
    """A CSV whose every row is in the test split, explained with a model given by its
    checkpoint: nothing is trained, no training split is asked for."""
    from PIL import Image

    from cambench.benchmarks.models.zoo import build_model

    rng = np.random.default_rng(0)
    rows = ["image,label,split"]
    for i in range(12):
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},test")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    net = build_model("gapcnn", in_channels=1, num_classes=2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    body = (
        f'name = "evalonly"\n[models.gapcnn]\ncheckpoint = "{tmp_path / "w.pt"}"\n'
        f'[datasets.mine]\nuse = "csv"\nmanifest = "{tmp_path / "labels.csv"}"\n'
        'split_col = "split"\nchannels = 1\nimage_size = 32\n'
        "[methods.gradcam]\n[metrics.sparseness]\n"
    )
    out = run(tmp_path, body)
    report = json.loads(next((out / "groups").glob("*/model.json")).read_text())
    assert report["n"] == 12 and "train_seconds" not in report
    assert not (tmp_path / "cache" / "models").exists()


# --- timm and MONAI: the field's standard architectures, unmodified -------------------------


@pytest.mark.slow  # ~11 s: one epoch of ViT-Tiny at 224 px on the CPU
def test_timm_vit_fine_tuned_from_a_weights_file_at_its_native_224_px(tmp_path):
    """timm's ViT-Tiny by name, random weights saved to a file and given as ``weights``:
    built at timm's native 224 px (its ``pretrained_cfg``), fine-tuned one epoch at a learning
    rate too small to move them, explained by Grad-CAM at the layer ``auto`` picks for a ViT
    (the last block's ``norm1``, tokens read as a 14 x 14 map), which equals
    pytorch-grad-cam's Grad-CAM with its ViT reshape transform on the tuned weights."""
    import timm
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    start = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    weights = tmp_path / "vit.pt"
    torch.save(start.state_dict(), weights)
    body = (
        'name = "vit"\n[eval]\nmax_images = 2\nbatch_size = 2\n'
        "[train]\nepochs = 1\nlr = 1e-12\nbatch_size = 32\n"
        f'[models.vit]\nuse = "timm:vit_tiny_patch16_224"\nweights = "{weights}"\n'
        + DATA.replace("n = 64", "n = 32")
        + "[methods.gradcam]\n[metrics.pointing_game]\n"
    )
    out = run(tmp_path, body)
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    report = json.loads(next((out / "groups").glob("*/model.json")).read_text())
    assert report["layer"] == "blocks.11.norm1"
    tuned = torch.load(report["checkpoint"], weights_only=True)
    own = start.state_dict()
    torch.testing.assert_close(tuned["patch_embed.proj.weight"], own["patch_embed.proj.weight"])
    torch.testing.assert_close(tuned["pos_embed"], own["pos_embed"])
    assert tuned["head.weight"].shape == (2, 192)  # the 1000-class head replaced
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2)
    model.load_state_dict(tuned)
    model.eval()
    ex = np.load(next((out / "groups").glob("*/examples.npz")))
    xs = torch.from_numpy(ex["images"])
    big = F.interpolate(xs.expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear")
    with torch.no_grad():
        target = model(big).argmax(1)

    def reshape(t):  # pytorch-grad-cam's ViT transform: class token dropped, 14 x 14 grid
        return t[:, 1:, :].reshape(t.size(0), 14, 14, t.size(2)).permute(0, 3, 1, 2)

    layer = model.blocks[-1].norm1
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        cam(input_tensor=big, targets=[ClassifierOutputTarget(int(t)) for t in target])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        layer_map = np.maximum(cam.get_cam_image(big, layer, None, acts, grads, False), 0)
    # its 14 x 14 map of the 224-px input, brought to the dataset's 32 px
    ref = F.interpolate(torch.from_numpy(layer_map)[:, None], size=(32, 32), mode="bilinear")
    ours = torch.from_numpy(ex["maps__gradcam"])
    assert ours.shape == (2, 32, 32)
    torch.testing.assert_close(minmax(ours), minmax(ref[:, 0]), atol=1e-4, rtol=0)


def test_monai_densenet121_runs_gradcam_at_its_auto_layer(tmp_path):
    """MONAI's DenseNet121 (2-D, the dataset's one channel, two classes) from a checkpoint,
    images resized to 64 px inside the model: ``auto`` is ``features`` (its last map, before
    the in-place ReLU of ``class_layers``) and Grad-CAM there equals captum's on the same
    weights loaded by hand."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    ckpt = tmp_path / "monai.pt"
    torch.save(net.state_dict(), ckpt)
    body = (
        'name = "monai"\n[eval]\nmax_images = 2\nbatch_size = 2\n'
        f'[models.mdn]\nuse = "monai:DenseNet121"\ninput_size = 64\ncheckpoint = "{ckpt}"\n'
        + DATA.replace("n = 64", "n = 32")
        + "[methods.gradcam]\n[metrics.pointing_game]\n"
    )
    out = run(tmp_path, body)
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    report = json.loads(next((out / "groups").glob("*/model.json")).read_text())
    assert report["layer"] == "features"
    net.eval()
    ex = np.load(next((out / "groups").glob("*/examples.npz")))
    xs = torch.from_numpy(ex["images"])
    big = F.interpolate(xs, size=(64, 64), mode="bilinear")
    with torch.no_grad():
        target = net(big).argmax(1)
    ref = captum_gradcam(net, big, target, "features", size=(32, 32))
    ours = torch.from_numpy(ex["maps__gradcam"])
    assert ours.shape == (2, 32, 32) and float(ours.max()) > 0
    torch.testing.assert_close(minmax(ours), minmax(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("use", "message"),
    [
        ("timm:vit_tiny_patch16_22", "timm has no model .*did you mean: vit_tiny_patch16_224"),
        ("timm:vit_tiny_patch16_224.nope", "no weights tagged 'nope'.*augreg_in21k_ft_in1k"),
        ("monai:DenseNet12", "did you mean: DenseNet121"),
    ],
)
def test_an_unknown_timm_or_monai_name_is_refused_when_the_suite_loads(tmp_path, use, message):
    suite = tmp_path / "bad.toml"
    suite.write_text(f'name = "bad"\n[models.m]\nuse = "{use}"\n' + DATA + "[methods.gradcam]\n")
    with pytest.raises(UserError, match=message):
        load_suite(str(suite))


def _no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_timm_imagenet_weights_come_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """``weights = "imagenet"`` for timm reads the file timm itself would fetch from the
    Hugging Face hub, from the local hub cache, with no connection: the weights load, the
    head is replaced, the normalization is the weights' own (timm's ``pretrained_cfg``)."""
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    from cambench.benchmarks.models.zoo import build_model

    cfg = timm.models.get_pretrained_cfg("resnet18")
    torch.manual_seed(0)
    start = timm.create_model("resnet18", pretrained=False)
    snapshot = tmp_path / "hub" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(start.state_dict(), str(snapshot / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    _no_network(monkeypatch)

    net = build_model("timm:resnet18", in_channels=1, num_classes=2, weights="imagenet")
    torch.testing.assert_close(net.conv1.weight, start.conv1.weight)
    torch.testing.assert_close(net.layer4[1].bn2.running_var, start.layer4[1].bn2.running_var)
    assert net.fc.weight.shape == (2, 512)
    assert net.input_mean.flatten().tolist() == pytest.approx(list(cfg.mean))
    assert net.input_std.flatten().tolist() == pytest.approx(list(cfg.std))
    assert net.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 2)  # grey repeated, 224 px

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError) as err:
        build_model("timm:resnet18", in_channels=1, num_classes=2, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "not in the local cache" in message and "nothing is downloaded" in message
    assert "weights = '<file>'" in message and cfg.hf_hub_id in message


def test_timm_weights_file_for_another_input_size_says_so(tmp_path):
    """A ViT's weights at 224 px given to the model built for 64 px: the position
    embedding does not fit, and the error says so instead of leaving it random."""
    import timm

    from cambench.benchmarks.models.zoo import build_model

    file = tmp_path / "vit.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), file)
    net = build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=2, weights=str(file))
    assert net.head.weight.shape == (2, 192)
    with pytest.raises(UserError, match="pos_embed differ in shape.*input_size"):
        build_model(
            "timm:vit_tiny_patch16_224",
            in_channels=3,
            num_classes=2,
            weights=str(file),
            input_size=64,
        )


def test_monai_has_no_imagenet_weights_to_read():
    from cambench.benchmarks.models.zoo import build_model

    with pytest.raises(
        UserError, match="MONAI networks have no ImageNet weights.*weights = '<file>'"
    ):
        build_model("monai:DenseNet121", in_channels=1, num_classes=2, weights="imagenet")
