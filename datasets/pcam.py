"""PatchCamelyon (Veeling et al., MICCAI 2018): 96 x 96 RGB patches of lymph-node sections,
labelled 1 when the central 32 x 32 region holds tumour tissue, read lazily from its HDF5
files (262,144 training patches do not fit comfortably in memory)::

    <data root>/pcam/camelyonpatch_level_2_split_<train|valid|test>_x.h5   key 'x' (N,96,96,3) uint8
    <data root>/pcam/camelyonpatch_level_2_split_<train|valid|test>_y.h5   key 'y' (N,1,1,1)

(``root`` may also be the folder holding the files.) Split ``val`` reads the ``valid``
files; the split is the files' own. The labels are read when the dataset is made (they are
small); images are read one by one, each worker process opening the file itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from cambench.benchmarks.core.checks import PositiveInt
from cambench.benchmarks.core.errors import DataNotFound, UserError
from cambench.datasets._io import (
    DATA_ROOT_ENV,
    Channels,
    ImageSize,
    as_size,
    check_channels,
    locate,
    prepare_image,
)
from cambench.datasets.base import DATASETS, ImageDataset, check_split

if TYPE_CHECKING:
    import h5py

FILE = "camelyonpatch_level_2_split_{split}_{part}.h5"
CLASSES = ("normal", "tumor")
HOW_TO_GET = (
    "Download the PCam HDF5 files from https://github.com/basveeling/pcam (Zenodo record "
    "2546921), gunzip them, and put them in DIR/pcam/."
)


def _open(path: Path, key: str, *, name: str) -> tuple[h5py.File, h5py.Dataset]:
    """An HDF5 file and its ``key`` dataset; a missing, corrupt or keyless file is a
    UserError naming it."""
    import h5py  # imported on use: `import datasets` stays light

    if not path.is_file():
        hint = " (it is gzipped: gunzip it first)" if path.with_suffix(".h5.gz").is_file() else ""
        raise DataNotFound(f"{name}: {str(path)!r} does not exist{hint}. {HOW_TO_GET}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{name}: cannot read {str(path)!r} as HDF5 ({err})") from None
    if key not in handle:
        found = ", ".join(sorted(handle.keys())) or "none"
        handle.close()
        raise UserError(f"{name}: {str(path)!r} has no dataset {key!r}; keys found: {found}")
    return handle, handle[key]


class PCamDataset(ImageDataset):
    """One PCam split, read lazily from its HDF5 pair; items as the dataset contract says.

    ``indices`` are the rows of the files this dataset serves, in order (all rows, or
    ``max_items`` of them drawn with ``seed``); ``labels`` (N,) and ``ids``
    (``<split>_<row>``) are in memory.
    """

    class_names = CLASSES

    def __init__(
        self,
        x_path: Path,
        y_path: Path,
        *,
        split: str,
        max_items: PositiveInt | None = None,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        channels: Channels = 3,
        name: str = "pcam",
    ):
        self.x_path, self.y_path, self.name = Path(x_path), Path(y_path), name
        self.size, self.channels = size, channels
        xf, x = _open(self.x_path, "x", name=name)
        with xf:
            n, shape, dtype = x.shape[0], x.shape, x.dtype
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            raise UserError(
                f"{name}: 'x' in {str(x_path)!r} is {dtype} {shape}; expected uint8 (N, H, W, 3)"
            )
        yf, y = _open(self.y_path, "y", name=name)
        with yf:
            labels = np.asarray(y[()]).reshape(-1)
        if labels.shape[0] != n:
            raise UserError(
                f"{name}: {str(x_path)!r} has {n} images but {str(y_path)!r} has "
                f"{labels.shape[0]} labels; the pair must come from the same split"
            )
        if n == 0:
            raise UserError(f"{name}: split {split!r} in {str(x_path)!r} is empty (0 images)")
        if not np.isin(labels, (0, 1)).all():
            raise UserError(f"{name}: labels in {str(y_path)!r} must be 0 or 1")
        self.indices = np.arange(n)
        if max_items is not None:
            if max_items < 1:
                raise UserError(f"{name}: max_items={max_items!r} must be a positive number")
            if max_items < n:
                rng = np.random.default_rng(seed)
                self.indices = np.sort(rng.choice(n, size=max_items, replace=False))
        self.labels = torch.from_numpy(labels[self.indices].astype(np.int64))
        self.ids = [f"{split}_{i}" for i in self.indices]
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def _images(self) -> h5py.Dataset:
        # an HDF5 handle must not cross a fork: each process opens its own
        if self._file is None or self._pid != os.getpid():
            self._file, _ = _open(self.x_path, "x", name=self.name)
            self._pid = os.getpid()
        return self._file["x"]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw = self._images()[int(self.indices[i])]
        if self.size is None and self.channels == 3:
            chw = np.ascontiguousarray(raw.transpose(2, 0, 1))
        else:
            chw = prepare_image(Image.fromarray(raw), channels=self.channels, size=self.size)
        image = torch.from_numpy(chw).float().div_(255.0)
        return {"image": image, "label": int(self.labels[i]), "id": self.ids[i]}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state


@DATASETS.register(
    "pcam", source="real", masks=False, root_env=DATA_ROOT_ENV, how_to_get=HOW_TO_GET
)
def pcam(
    split: str,
    *,
    root: str | Path | None = None,
    image_size: ImageSize = None,
    seed: int = 0,
    channels: Channels = 3,
    max_items: PositiveInt | None = None,
) -> PCamDataset:
    """PatchCamelyon tumour patches (normal/tumor), 96 x 96 RGB, read lazily from HDF5.

    ``max_items`` keeps a random subset of that many patches, drawn with ``seed`` and kept in
    file order (the files may be sorted by label, so the first N would not do).
    ``image_size`` None keeps 96 x 96.
    """
    check_split(split, "pcam")
    fsplit = "valid" if split == "val" else split
    x_name = FILE.format(split=fsplit, part="x")
    folder = locate(
        root,
        name="pcam",
        candidates=["pcam"],
        is_own=lambda p: (p / x_name).is_file() or (p / f"{x_name}.gz").is_file(),
        expected=f"the pcam folder with {x_name} and its _y.h5",
        how_to_get=HOW_TO_GET,
    )
    ds = PCamDataset(
        folder / x_name,
        folder / FILE.format(split=fsplit, part="y"),
        split=split,
        size=as_size(image_size, name="pcam"),
        channels=check_channels(channels, name="pcam"),
        max_items=max_items,
        seed=seed,
    )
    ds.provenance = {"dataset": "pcam", "source": str(folder), "split": {"method": "file"}}
    return ds
