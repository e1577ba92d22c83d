"""MedMNIST 2D datasets read from their ``.npz`` files (Yang et al., Scientific Data 10, 41,
2023): ``pneumoniamnist``, ``pneumoniamnist_balanced``, ``breastmnist``, and any other 2D
MedMNIST file through the generic ``medmnist`` dataset (option ``name``).

A MedMNIST npz holds ``train_images`` (N, H, W) or (N, H, W, 3) uint8 and ``train_labels``
(N, 1), and the same for ``val_`` and ``test_``; the split is the file's own, so ``seed``
does not change it. The file is ``<data root>/<name>.npz`` (``<name>_<variant>.npz`` with
``variant``, any name with ``file``), or ``root`` is the file itself. ``download=True``
fetches a missing official file with the ``medmnist`` package (``pip install medmnist``);
nothing is ever downloaded otherwise.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cambench.benchmarks.core.errors import DataNotFound, UserError
from cambench.datasets._io import DATA_ROOT_ENV, Channels, ImageSize, as_size, locate, prepare_image
from cambench.datasets.base import DATASETS, SPLITS, ArrayDataset, check_split

# Class names where MedMNIST's own INFO names them; other files get "0", "1", ...
KNOWN_CLASSES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal_or_benign"),
}
HOW_TO_GET = (
    "Download <name>.npz from https://medmnist.com (Zenodo record 10519652), or pass "
    "download=True with `pip install medmnist`, into DIR."
)


def _npz_file(root: str | Path | None, name: str, file: str | None, download: bool) -> Path:
    """Where the npz is: found under the data root, or fetched there on request."""
    wanted = file or f"{name}.npz"
    expected = f"the MedMNIST file {wanted}"
    how = HOW_TO_GET.replace("<name>", name)
    try:
        return locate(
            root,
            name=name,
            candidates=[wanted],
            is_own=lambda p: p.is_file(),
            expected=expected,
            how_to_get=how,
        )
    except UserError as err:
        given = root if root is not None else os.environ.get(DATA_ROOT_ENV)
        folder = Path(given).expanduser() if given else None
        if folder is None or not folder.is_dir():
            raise
        if download:
            if file is not None:
                raise UserError(
                    f"{name}: download=True fetches the official {name}.npz only; drop "
                    f"file/variant or put {wanted} in {str(folder)!r} yourself"
                ) from None
            return _download(name, folder)
        near = sorted(p.name for p in folder.glob(f"{name}*.npz"))
        hint = (
            f" Found there: {', '.join(near)} (choose one with file=... or variant=...)."
            if near
            else ""
        )
        raise DataNotFound(f"{err}{hint}") from None


def _download(name: str, folder: Path) -> Path:
    try:
        import medmnist  # optional, imported only when a download is asked for
    except ImportError:
        raise UserError(
            f"{name}: download=True needs the medmnist package: pip install medmnist "
            f"(or put {name}.npz in {str(folder)!r} yourself)"
        ) from None
    info = medmnist.INFO.get(name)
    if info is None:
        raise UserError(
            f"{name}: not a MedMNIST dataset; known: {', '.join(sorted(medmnist.INFO))}"
        )
    getattr(medmnist, info["python_class"])(split="test", download=True, root=str(folder))
    return folder / f"{name}.npz"


def _array(data: np.lib.npyio.NpzFile, key: str, path: Path, name: str) -> np.ndarray:
    if key not in data.files:
        raise UserError(
            f"{name}: {str(path)!r} has no array {key!r}; keys found: "
            f"{', '.join(sorted(data.files)) or 'none'}. Expected the MedMNIST layout "
            "train_images/train_labels/val_images/val_labels/test_images/test_labels"
        )
    return data[key]


def _labels(raw: np.ndarray, key: str, path: Path, name: str) -> np.ndarray:
    if raw.ndim == 2 and raw.shape[1] > 1:
        raise UserError(
            f"{name}: {key} in {str(path)!r} has shape {raw.shape}: multi-label MedMNIST "
            "(e.g. chestmnist) is not supported; use a single-label dataset"
        )
    if raw.ndim not in (1, 2):
        raise UserError(f"{name}: {key} in {str(path)!r} has shape {raw.shape}; expected (N, 1)")
    return raw.reshape(-1).astype(np.int64)


def load_npz(
    split: str,
    path: Path,
    *,
    name: str,
    image_size: ImageSize = None,
    channels: Channels | None = None,
    class_names: Sequence[str] | None = None,
    family: str | None = None,
) -> ArrayDataset:
    """One split of a MedMNIST-layout npz as an in-memory dataset.

    ``name`` labels messages and the dataset; ``family`` (the MedMNIST name, default
    ``name``) picks the known class names.
    """
    check_split(split, name)
    size = as_size(image_size, name=name)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{name}: cannot read {str(path)!r} as an npz file ({err})") from None
    with data:
        images = _array(data, f"{split}_images", path, name)
        labels = _labels(_array(data, f"{split}_labels", path, name), f"{split}_labels", path, name)
        # the class count is the file's, not the split's: a split may lack a class
        all_labels = [
            _labels(data[f"{s}_labels"], f"{s}_labels", path, name)
            for s in SPLITS
            if f"{s}_labels" in data.files
        ]
    if images.shape[0] == 0:
        raise UserError(f"{name}: split {split!r} of {str(path)!r} is empty (0 images)")
    if (
        images.dtype != np.uint8
        or images.ndim not in (3, 4)
        or (images.ndim == 4 and images.shape[-1] not in (1, 3))
    ):
        raise UserError(
            f"{name}: {split}_images in {str(path)!r} is {images.dtype} {images.shape}; "
            "expected uint8 (N, H, W) or (N, H, W, 3)"
        )
    if labels.shape[0] != images.shape[0]:
        raise UserError(
            f"{name}: {str(path)!r} has {images.shape[0]} {split} images but "
            f"{labels.shape[0]} labels"
        )
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    native = 1 if images.ndim == 3 else 3
    channels = native if channels is None else channels
    if channels not in (1, 3):
        raise UserError(f"{name}: channels={channels!r}; use 1 (grey) or 3 (RGB)")
    if size is None and channels == native:
        chw = images[:, None] if native == 1 else images.transpose(0, 3, 1, 2)
    else:
        chw = np.stack(
            [prepare_image(Image.fromarray(im), channels=channels, size=size) for im in images]
        )
    n_classes = int(max(lab.max() for lab in all_labels if lab.size)) + 1
    names = (
        tuple(class_names)
        if class_names is not None
        else KNOWN_CLASSES.get(family or name, tuple(str(k) for k in range(n_classes)))
    )
    if labels.min() < 0 or labels.max() >= len(names):
        raise UserError(
            f"{name}: labels in {str(path)!r} span {labels.min()}..{labels.max()} but there are "
            f"{len(names)} class names ({', '.join(names)})"
        )
    ds = ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(chw)).float().div_(255.0),
        torch.from_numpy(labels),
        [f"{split}_{i}" for i in range(len(labels))],
        names,
        name=name,
        provenance={"dataset": name, "source": str(path), "split": {"method": "file"}},
    )
    return ds


def _make(fixed_name: str | None, fixed_variant: str | None) -> Callable[..., ArrayDataset]:
    def make(
        split: str,
        *,
        root: str | Path | None = None,
        image_size: ImageSize = None,
        seed: int = 0,
        name: str | None = None,
        variant: str | None = fixed_variant,
        file: str | None = None,
        channels: Channels | None = None,
        class_names: Sequence[str] | None = None,
        download: bool = False,
    ) -> ArrayDataset:
        del seed  # the split is the file's own
        if fixed_name is not None and name not in (None, fixed_name):
            raise UserError(f"{fixed_name}: name={name!r} conflicts; use the 'medmnist' dataset")
        name = fixed_name or name
        if not name:
            raise UserError("medmnist: pass name=... (e.g. 'pneumoniamnist', 'breastmnist')")
        if file is None and variant is not None:
            file = f"{name}_{variant}.npz"
        path = _npz_file(root, name, file, download)
        label = name if variant is None else f"{name}_{variant}"
        return load_npz(
            split,
            path,
            name=label,
            image_size=image_size,
            channels=channels,
            class_names=class_names,
            family=name,
        )

    return make


def _register(
    key: str, doc: str, *, name: str | None = None, variant: str | None = None, how: str = ""
) -> None:
    make = _make(name, variant)
    make.__name__ = key
    make.__doc__ = doc + (
        "\n\n    Options: variant (reads <name>_<variant>.npz), file (an npz under the data root), "
        "image_size (None keeps 28 x 28), channels (default the file's), class_names, "
        "download (fetch with the medmnist package)."
    )
    DATASETS.add(
        key,
        make,
        source="real",
        masks=False,
        root_env=DATA_ROOT_ENV,
        how_to_get=how or HOW_TO_GET.replace("<name>", name or "<name>"),
    )


_register("medmnist", "Any 2D single-label MedMNIST npz, by name=...; the file's own split.")
_register(
    "pneumoniamnist",
    "PneumoniaMNIST chest X-rays (normal/pneumonia), 28 x 28 grey, official split.",
    name="pneumoniamnist",
)
_register(
    "pneumoniamnist_balanced",
    "PneumoniaMNIST class-balanced subset (pneumoniamnist_balanced.npz), official splits.",
    name="pneumoniamnist",
    variant="balanced",
    how="pneumoniamnist_balanced.npz is a class-balanced subset of PneumoniaMNIST's npz "
    "(same keys); put it in DIR, or use 'pneumoniamnist' with the official file.",
)
_register(
    "breastmnist",
    "BreastMNIST ultrasound (malignant/normal-or-benign), 28 x 28 grey, official split.",
    name="breastmnist",
)
