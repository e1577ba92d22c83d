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

    [models.vit]
    use = "timm:vit_tiny_patch16_224"  # timm.create_model(name), unmodified, at 224 px

    [models.monai-densenet]
    use = "monai:DenseNet121"          # monai.networks.nets.DenseNet121(spatial_dims=2, ...)

A name with a colon is resolved on first use (``MODELS.get``) and registered like a zoo
entry, so the suite checks, the model cache, training, checkpoints and every method and
metric treat it as one. Its options are those of the callable (a user's ``build`` and a
MONAI network keep their own keyword options) plus:

- ``mean``, ``std``: per-channel input normalization (default: none, the [0, 1] images as
  they are; with ``weights = "imagenet"``, the weights' own ImageNet statistics: torchvision's
  transforms, timm's ``pretrained_cfg``);
- ``input_size``: the side the network takes; images are resized to it inside the model
  (bilinear), so methods and metrics still work on the dataset's images and maps come out
  at the dataset's size (default: the network's native size, torchvision's 224 and timm's
  ``pretrained_cfg.input_size``, 224 for ``vit_tiny_patch16_224``; a user's model and a
  MONAI network, which have none, take the images as they are). A timm transformer is
  built for another ``input_size`` (its ``img_size``); a CNN takes any size;
- ``weights``: initial weights, "imagenet" or a state-dict file (``torch.save`` or
  ``.safetensors``); the classifier head is replaced for the dataset's classes and the
  model is fine-tuned unless the entry gives a ``checkpoint``. "imagenet" is read from the
  local cache, never downloaded: torch's hub cache for torchvision, the Hugging Face hub
  cache (``timm/<name>.<tag>``, the weights timm itself would fetch) or torch's hub cache for
  timm; where they are missing the error says in one line how to provide the file. MONAI's
  networks have no ImageNet weights of their own (give a file).

The adaptation is a forward pre-hook on the model (``InputAdapter``): the network itself,
its module names (what ``layer`` names) and its state dict (what ``checkpoint`` holds) are
the user's, unchanged. A grey-scale image given to a network that takes 3 channels is
repeated over them, the usual way to give X-rays to ImageNet backbones: torchvision and timm
networks are built with 3 input channels for grey-scale and RGB datasets alike (so ImageNet
weights and files of the standard architecture load as they are; timm's ``in_chans``
follows a dataset of any other channel count), MONAI's with the dataset's own channels.

``layer = "auto"`` (the default for these models) is the last spatial feature map the
network computes: the output of the outermost module that returns the map
``cams.hooks.auto_layer_name`` picks, adaptive pools left out (``features`` for a torchvision
DenseNet, VGG or a MONAI DenseNet, ``layer4`` for a ResNet, ``norm`` for timm's Swin,
``blocks.11.norm1`` for timm's ViT-Tiny). On transformers the CAM family reads token
sequences and channels-last maps as (B, C, h, w) maps, class tokens dropped and the patch
grid restored; ``cams.hooks`` documents that reshape and the transformer ``auto``.
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

from cambench.benchmarks.core.checks import PositiveFloat, PositiveInt
from cambench.benchmarks.core.errors import UserError
from cambench.cams.hooks import auto_layer_name

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
    it under ``"state_dict"`` or ``"model"``; or a ``.safetensors`` file), read on the CPU
    with ``weights_only=True``. Raises what
    ``torch.load`` raises, or TypeError for a file that holds something else; callers say
    which file and what was expected (``load_weights``, ``training.load_checkpoint``)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # a training checkpoint that holds one
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
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
    return load_state(net, state, f"weights file {path!r}", what)


def load_state(net: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> list[str]:
    """``load_weights`` for a state dict already read from ``source`` (named in errors)."""
    own = net.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserError(
            f"model {what!r}: {source} has keys the model lacks "
            f"({', '.join(unknown[:3])}{'...' if len(unknown) > 3 else ''}); it holds "
            "another architecture's weights"
        )
    skipped = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    net.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def _torchvision(name: str, what: str):
    tv = _import("torchvision", what)
    if name not in tv.models.list_models(module=tv.models):
        from cambench.benchmarks.core.registry import close_matches

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


def _timm_cached_weights(cfg: Any) -> Path | None:
    """The file of a timm model's pretrained weights in the local caches, or None; looks, never
    downloads: the Hugging Face hub cache (where timm 1.0 fetches them), then torch's."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in dict.fromkeys(
            f for f in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin") if f
        ):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url and Path(urlparse(cfg.url).path).suffix in (".pth", ".pt", ".bin"):
        file = _hub_file(cfg.url)
        if file.is_file():
            return file
    return None


def _check_fit(skipped: list[str], head: tuple[str, ...], source: str, what: str) -> None:
    """Tensors other than the classifier head that did not fit are an error naming them."""
    body = [k for k in skipped if not any(k == h or k.startswith(h + ".") for h in head)]
    if body:
        raise UserError(
            f"model {what!r}: {source} does not fit the model built here ({', '.join(body[:3])}"
            f"{'...' if len(body) > 3 else ''} differ in shape): it was trained for another "
            "input size or channel count; set input_size (and the data's channels) to the "
            "weights' own"
        )


def _timm(name: str, what: str):
    timm = _import("timm", what)
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        from cambench.benchmarks.core.registry import close_matches

        hint = close_matches(arch, timm.list_models())
        raise UserError(
            f"model {what!r}: timm has no model {arch!r}"
            + (f"; did you mean: {', '.join(hint)}?" if hint else "")
            + " (timm.list_models() lists them)"
        )
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = timm.list_pretrained(f"{arch}.*")
        raise UserError(
            f"model {what!r}: timm has no weights tagged {tag!r} for {arch}; its tags: "
            + (", ".join(t.partition(".")[2] for t in tags) or "none")
        ) from None
    native = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    head = cfg.classifier if cfg is not None and cfg.classifier else ()
    head = (head,) if isinstance(head, str) else tuple(head)

    def build(
        *,
        in_channels: int,
        num_classes: int,
        weights: str | None = None,
        mean: list[float] | None = None,
        std: list[PositiveFloat] | None = None,
        input_size: PositiveInt | None = native,
    ) -> nn.Module:
        chans = 3 if in_channels in (1, 3) else in_channels
        options = {"pretrained": False, "num_classes": num_classes, "in_chans": chans}
        sized = input_size is not None and input_size != native
        try:
            try:  # a transformer's position embedding is built for one size
                net = timm.create_model(
                    name, **options, **({"img_size": input_size} if sized else {})
                )
            except TypeError:  # a CNN takes no img_size, and any size
                if not sized:
                    raise
                net = timm.create_model(name, **options)
        except Exception as exc:
            raise UserError(f"model {what!r}: timm cannot build it ({exc})") from None
        if weights == "imagenet":
            file = _timm_cached_weights(cfg) if cfg is not None else None
            if file is None:
                where = f"repo {cfg.hf_hub_id} in " if cfg is not None and cfg.hf_hub_id else ""
                raise UserError(
                    f"model {what!r}: ImageNet weights are not in the local cache ({where}"
                    f"{_hf_cache()}); nothing is downloaded at run time. Fetch them once where "
                    f"there is network: python -c \"import timm; timm.create_model('{name}', "
                    'pretrained=True)" (then copy that cache folder here), or give '
                    "weights = '<file>'"
                )
            try:
                state = read_state_dict(file)
            except Exception as exc:
                raise UserError(
                    f"model {what!r}: cached weights {file} do not load ({exc})"
                ) from None
            state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in head)}
            _check_fit(
                load_state(net, state, f"ImageNet weights {file}", what), head, str(file), what
            )
            mean = mean if mean is not None else list(cfg.mean)
            std = std if std is not None else list(cfg.std)
        elif weights is not None:
            _check_fit(load_weights(net, weights, what), head, f"weights file {weights!r}", what)
        return adapt(net, channels=chans, size=input_size, mean=mean, std=std)

    return build, f"timm {timm.__version__}"


def _hf_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"
    return str(HF_HUB_CACHE)


# MONAI parameters the harness sets (or refuses: ``pretrained`` downloads).
_MONAI_OWN = ("self", "spatial_dims", "in_channels", "out_channels", "num_classes")
_MONAI_REFUSED = ("pretrained", "progress")


def _monai(name: str, what: str):
    _import("monai", what)
    nets = importlib.import_module("monai.networks.nets")
    cls = getattr(nets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        from cambench.benchmarks.core.registry import close_matches

        known = [
            n for n, c in vars(nets).items() if isinstance(c, type) and issubclass(c, nn.Module)
        ]
        hint = close_matches(name, known)
        raise UserError(
            f"model {what!r}: monai.networks.nets has no network {name!r}"
            + (f"; did you mean: {', '.join(hint)}?" if hint else "")
        )
    own = inspect.signature(cls).parameters
    out = next((k for k in ("out_channels", "num_classes") if k in own), None)
    if out is None or "in_channels" not in own:
        raise UserError(
            f"model {what!r}: MONAI's {name} takes no in_channels and out_channels (or "
            "num_classes): not a classifier the harness can build; wrap it in a function "
            "build(num_classes, in_channels) and name that as <module>:build"
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
        if weights == "imagenet":
            raise UserError(
                f"model {what!r}: MONAI networks have no ImageNet weights the harness reads; "
                "give weights = '<file>' (a state dict of this network), or use "
                "torchvision:densenet121 / timm:<name> with weights = 'imagenet'"
            )
        if "spatial_dims" in own:
            options["spatial_dims"] = 2
        try:
            net = cls(in_channels=in_channels, **{out: num_classes}, **options)
        except (TypeError, ValueError, AssertionError) as exc:
            raise UserError(
                f"model {what!r}: MONAI's {name} cannot be built with these options ({exc}); "
                "give its own options in the entry"
            ) from None
        if weights is not None:
            load_weights(net, weights, what)
        return adapt(net, channels=None, size=input_size, mean=mean, std=std)

    extra = [
        p.replace(kind=p.KEYWORD_ONLY)
        for n, p in own.items()
        if n not in _MONAI_OWN + _MONAI_REFUSED and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    mine = [p for n, p in inspect.signature(build).parameters.items() if n != "options"]
    build.__signature__ = inspect.Signature(mine + extra)
    import monai

    return build, f"monai {monai.__version__}"


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
    """(builder, version text) for a model named by import path or by source (torchvision,
    timm, monai); UserError when it cannot be found. The version text goes into the model
    cache key: a changed source (or library version) retrains."""
    source, _, rest = name.partition(":")
    if not rest:
        raise UserError(
            f"model {name!r}: write <module>:<callable>, torchvision:<name>, timm:<name> or "
            "monai:<Name>"
        )
    if source == "torchvision":
        return _torchvision(rest, name)
    if source == "timm":
        return _timm(rest, name)
    if source == "monai":
        return _monai(rest, name)
    return _callable(name, name)


def auto_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The target layer of ``layer = "auto"``: the outermost module whose output is the map
    ``cams.hooks.auto_layer_name`` picks for ``x`` (the last spatial feature map; on a
    transformer the token layer it documents). A global pool's B x C x 1 x 1 is not a map,
    nor is an adaptive pool's resampling of one (VGG's ``avgpool`` to 7 x 7 follows
    ``features``, its last map). The outermost module names the map as the network's code
    does (``features`` for a DenseNet whose next ReLU is in place, not the ReLU module)."""
    chosen = auto_layer_name(model, x)
    outputs: dict[str, object] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: outputs.setdefault(name, out))
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
    same = [
        n for n, o in outputs.items() if o is outputs[chosen] and not isinstance(modules[n], POOLS)
    ]
    return min(same, key=lambda n: n.count("."))
