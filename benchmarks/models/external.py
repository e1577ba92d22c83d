"""Models from outside the zoo, named in a suite by where they come from:

    [models.mine]
    use = "my_package.models:build"    # build(num_classes=, in_channels=, **options) -> nn.Module
    checkpoint = "weights/mine.pt"     # its trained weights (or the harness trains it)
    layer = "backbone.layer4"          # the CAM target layer, or "auto"
    mean = [0.5]
    std = [0.25]                       # the input normalization it was trained with

    [models.densenet]
    use = "torchvision:densenet121"    # torchvision.models.get_model(name), unmodified
    weights = "imagenet"               # or a state-dict file: fine-tuned by the harness

A name with a colon is resolved on first use (``MODELS.get``) and registered like a zoo
entry, so the suite checks, the model cache, training, checkpoints and every method and
metric treat it as one. Its options are those of the callable (a user's ``build`` keeps
its own keyword options) plus:

- ``mean``, ``std``: per-channel input normalization (default: none, the [0, 1] images as
  they are; with ``weights = "imagenet"``, the weights' own ImageNet statistics);
- ``input_size``: the side the network takes; images are resized to it inside the model
  (bilinear), so methods and metrics still work on the dataset's images and maps come out
  at the dataset's size (default: torchvision's 224; a user's model takes the images as
  they are);
- ``weights``: initial weights, "imagenet" (torchvision's, read from torch's hub cache,
  never downloaded) or a state-dict file; the classifier head is replaced for the dataset's
  classes and the model is fine-tuned unless the entry gives a ``checkpoint``.

The adaptation is a forward pre-hook on the model (``InputAdapter``): the network itself,
its module names (what ``layer`` names) and its state dict (what ``checkpoint`` holds) are
the user's, unchanged. A grey-scale image given to a network that takes 3 channels is
repeated over them, the usual way to give X-rays to ImageNet backbones.

``layer = "auto"`` (the default for these models) is the last spatial feature map the
network computes: the output of the outermost module that returns the last 4-D tensor of
a forward, adaptive pools left out (``features`` for a torchvision DenseNet or VGG,
``layer4`` for a ResNet).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.core.checks import PositiveFloat, PositiveInt
from benchmarks.core.errors import UserError

SOURCES = ("torchvision", "timm", "monai")  # "<source>:<name>"; anything else is module:callable
AUTO = "auto"
POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # resample a map; never the target


class InputAdapter:
    """Forward pre-hook: images on the [0, 1] scale at the dataset's size and channels ->
    what the network takes (channels repeated, resized, normalized). Reads its statistics
    from the model's non-persistent buffers, so a deep copy of the model (a randomization
    cascade) carries them along and the state dict stays the network's own."""

    def __init__(self, channels: int | None, size: int | None):
        self.channels = channels
        self.size = size

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.channels and x.shape[1] == 1 and self.channels > 1:
            x = x.expand(-1, self.channels, -1, -1)
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - module.input_mean) / module.input_std
        return (x, *args[1:])


def adapt(
    net: nn.Module,
    *,
    channels: int | None,
    size: int | None,
    mean: list[float] | None,
    std: list[float] | None,
) -> nn.Module:
    """Attach the ``InputAdapter`` and its statistics to ``net`` (in place); returns it."""
    if (mean is None) != (std is None):
        raise UserError("give mean and std together (the normalization the model expects)")
    n = len(mean) if mean is not None else 1
    if std is not None and len(std) != n:
        raise UserError(f"mean has {n} values and std {len(std)}: give one per channel")
    if std is not None and min(std) <= 0:
        raise UserError(f"std must be positive, got {std}")
    shape = (1, n, 1, 1)
    net.register_buffer(
        "input_mean", torch.tensor(mean or [0.0], dtype=torch.float32).reshape(shape), False
    )
    net.register_buffer(
        "input_std", torch.tensor(std or [1.0], dtype=torch.float32).reshape(shape), False
    )
    net.register_forward_pre_hook(InputAdapter(channels, size))
    return net


def _import(source: str, what: str):
    try:
        return importlib.import_module(source)
    except ImportError as exc:
        raise UserError(
            f"model {what!r} needs the {source} package, which is not installed "
            f"({exc}); pip install {source}"
        ) from None


def _replace_head(net: nn.Module, num_classes: int, what: str) -> None:
    """Swap the last linear layer (the ImageNet head) for a fresh one of ``num_classes``."""
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model {what!r}: no linear classifier head to replace")
    name, old = linears[-1]
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Linear(old.in_features, num_classes))


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a file holds (``torch.save(model.state_dict(), path)``, or a dict with
    it under ``"state_dict"``), read on the CPU with ``weights_only=True``. Raises what
    ``torch.load`` raises, or TypeError for a file that holds something else; callers say
    which file and what was expected (``load_weights``, ``training.load_checkpoint``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(net: nn.Module, path: str, what: str) -> list[str]:
    """Load a state dict file into ``net``, leaving out the tensors whose shape differs (the
    classifier head of another number of classes); returns the keys left out. Keys that
    match nothing are an error naming them."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model {what!r}: weights file {path!r} does not exist")
    try:
        state = read_state_dict(file)
    except Exception as exc:
        raise UserError(f"model {what!r}: weights file {path!r} does not load ({exc})") from None
    own = net.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserError(
            f"model {what!r}: weights file {path!r} has keys the model lacks "
            f"({', '.join(unknown[:3])}{'...' if len(unknown) > 3 else ''}); it holds "
            "another architecture's weights"
        )
    skipped = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def _torchvision(name: str, what: str):
    tv = _import("torchvision", what)
    if name not in tv.models.list_models(module=tv.models):
        from benchmarks.core.registry import close_matches

        hint = close_matches(name, tv.models.list_models(module=tv.models))
        raise UserError(
            f"model {what!r}: torchvision has no classification model {name!r}"
            + (f"; did you mean: {', '.join(hint)}?" if hint else "")
        )

    def build(
        *,
        in_channels: int,
        num_classes: int,
        weights: str | None = None,
        mean: list[float] | None = None,
        std: list[PositiveFloat] | None = None,
        input_size: PositiveInt | None = 224,
    ) -> nn.Module:
        if weights == "imagenet":
            w = tv.models.get_model_weights(name).DEFAULT
            file = _hub_file(w.url)
            if not file.is_file():
                raise UserError(
                    f"model {what!r}: ImageNet weights are not in torch's cache ({file}); "
                    "nothing is downloaded at run time. Fetch them once where there is "
                    f'network: python -c "import torchvision; torchvision.models.get_model('
                    f"'{name}', weights='DEFAULT')\" (then copy {file.name} into "
                    f"{file.parent}), or give weights = '<file>'"
                )
            net = tv.models.get_model(name, weights=w)
            _replace_head(net, num_classes, what)
            stats = w.transforms()
            mean = mean if mean is not None else list(stats.mean)
            std = std if std is not None else list(stats.std)
        else:
            net = tv.models.get_model(name, weights=None, num_classes=num_classes)
            if weights is not None:
                load_weights(net, weights, what)
        return adapt(net, channels=3, size=input_size, mean=mean, std=std)

    return build, f"torchvision {tv.__version__}"


def _callable(spec: str, what: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"model {what!r}: cannot import {module_name!r} ({exc}); run from the folder that "
            "holds it or install it (pip install -e <your project>)"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"model {what!r}: {module_name} has no callable {attr!r}")
    own = inspect.signature(fn).parameters
    for needed in ("num_classes", "in_channels"):
        if needed not in own and not any(p.kind is p.VAR_KEYWORD for p in own.values()):
            raise UserError(
                f"model {what!r}: {spec} must accept num_classes and in_channels (keywords); "
                f"it takes ({', '.join(own)})"
            )

    def build(
        *,
        in_channels: int,
        num_classes: int,
        weights: str | None = None,
        mean: list[float] | None = None,
        std: list[PositiveFloat] | None = None,
        input_size: PositiveInt | None = None,
        **options: Any,
    ) -> nn.Module:
        net = fn(num_classes=num_classes, in_channels=in_channels, **options)
        if not isinstance(net, nn.Module):
            raise UserError(f"model {what!r}: {spec} returned {type(net).__name__}, not a module")
        if weights is not None:
            load_weights(net, weights, what)
        return adapt(net, channels=None, size=input_size, mean=mean, std=std)

    # the suite checks a user's options against the callable's own keyword parameters
    extra = [
        p.replace(kind=p.KEYWORD_ONLY)
        for n, p in own.items()
        if n not in ("num_classes", "in_channels") and p.kind is not p.VAR_KEYWORD
    ]
    mine = [p for n, p in inspect.signature(build).parameters.items() if n != "options"]
    build.__signature__ = inspect.Signature(mine + extra)
    source = inspect.getsourcefile(fn)
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:12] if source else "?"
    return build, f"{spec} (source {digest})"


def resolve(name: str):
    """(builder, version text) for a model named by import path; UserError when it cannot be
    found. The version text goes into the model cache key: a changed source retrains."""
    source, _, rest = name.partition(":")
    if not rest:
        raise UserError(f"model {name!r}: write <module>:<callable> or torchvision:<name>")
    if source == "torchvision":
        return _torchvision(rest, name)
    if source in SOURCES:
        raise UserError(
            f"model {name!r}: {source} models are not supported yet; wrap it in a function "
            "build(num_classes, in_channels) and name that as <module>:build"
        )
    return _callable(name, name)


def auto_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The target layer of ``layer = "auto"``: the outermost module whose output is the last
    4-D (B, C, h, w) tensor with more than one position of a forward with ``x``. A global
    pool's B x C x 1 x 1 is not a map, nor is an adaptive pool's resampling of one (VGG's
    ``avgpool`` to 7 x 7 follows ``features``, its last map)."""
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: outputs.append((name, out)))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    spatial = [
        (n, o)
        for n, o in outputs
        if isinstance(o, torch.Tensor)
        and o.dim() == 4
        and o.shape[-1] * o.shape[-2] > 1
        and not isinstance(modules[n], POOLS)
    ]
    if not spatial:
        raise UserError(
            "layer = 'auto' found no module with a 4-D (B, C, h, w) output; name the layer"
        )
    last = spatial[-1][1]
    names = [n for n, o in spatial if o is last]
    return min(names, key=lambda n: n.count("."))
