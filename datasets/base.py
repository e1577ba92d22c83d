"""The dataset contract: the registry, the metadata each entry carries, and the in-memory
dataset most loaders return.

A dataset is a registered factory::

    make(split, *, root=None, image_size=None, seed=0, **options) -> ImageDataset

yielding dicts with ``image`` (C, H, W float32 in [0, 1]), ``label`` (int), ``id`` (str)
and, where the data has them, ``mask`` (lesion, H x W bool) and ``organ_mask``. Images stay
on the [0, 1] scale: each model normalizes its input itself, so perturbations and attacks
are defined on the image scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch.utils.data import Dataset

from cambench.benchmarks.core.checks import Range
from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.registry import Registry

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
# the image side of the synthetic datasets: their lesions, blobs and textures need room
SynthSize = Annotated[int, Range(16)]


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a registered dataset.

    source: "synthetic" (generated from a seed, always available) or "real" (read from a
        directory the user names: ``--data-root``, a suite entry, or ``root_env``).
    masks: the items carry lesion masks (``mask``) - by default, when ``masks_option``
        names options that switch them; organ_masks: they carry ``organ_mask``.
    masks_option: the option (or options) of the dataset callable that decide whether its
        items carry lesion masks, for entries whose masks depend on the suite's options
        (``folder``'s ``masks``, ``csv``'s ``mask_col`` and ``mask_pattern``). Masks are
        declared when any named option is set to something other than None or False; an
        option the entry leaves out counts as ``masks`` (the registration's default). None:
        ``masks`` alone decides. See ``declares_masks``.
    organ_masks_option: the same for organ masks (``csv``'s ``organ_mask_col`` and
        ``organ_mask_pattern``, ``folder``'s ``organ_mask_dir``), with ``organ_masks`` as
        the default. See ``declares_organ_masks``.
    extra_masks_option: the option naming the entry's further masks, a table of name ->
        where they are (``csv``'s ``extra_masks``, ``folder``'s ``extra_mask_dirs``); items
        carry each as ``mask_<name>``, which a localization metric reads with ``mask =
        "<name>"`` on its suite entry. See ``declares_extra_masks``.
    root_env: environment variable naming the data directory, for real data.
    root_option: an option whose absolute path stands for the data root (``csv``'s
        ``manifest``): an entry that gives one needs no ``--data-root``.
    how_to_get: one line telling a user how to obtain the data.
    """

    source: Literal["synthetic", "real"] = "synthetic"
    masks: bool = False
    organ_masks: bool = False
    masks_option: str | tuple[str, ...] | None = None
    organ_masks_option: str | tuple[str, ...] | None = None
    extra_masks_option: str | None = None
    root_env: str | None = None
    root_option: str | None = None
    how_to_get: str = ""
    version: int = 1

    def declares_masks(self, options: dict[str, Any]) -> bool:
        """Whether an entry of this dataset with these suite ``options`` carries lesion
        masks; pure (reads no file), for the plan and the dry run.

        >>> DatasetInfo(masks=True).declares_masks({})
        True
        >>> info = DatasetInfo(masks=False, masks_option=("mask_col", "mask_pattern"))
        >>> info.declares_masks({}), info.declares_masks({"mask_pattern": "m/{id}.png"})
        (False, True)
        >>> DatasetInfo(masks=True, masks_option="masks").declares_masks({"masks": False})
        False
        """
        return _declares(self.masks_option, self.masks, options)

    def declares_organ_masks(self, options: dict[str, Any]) -> bool:
        """Whether an entry with these suite ``options`` carries organ masks, by the rule
        of ``declares_masks`` over ``organ_masks_option``.

        >>> DatasetInfo(organ_masks=True).declares_organ_masks({})
        True
        >>> info = DatasetInfo(organ_masks_option=("organ_mask_col", "organ_mask_pattern"))
        >>> info.declares_organ_masks({}), info.declares_organ_masks({"organ_mask_col": "o"})
        (False, True)
        """
        return _declares(self.organ_masks_option, self.organ_masks, options)

    def declares_extra_masks(self, options: dict[str, Any]) -> tuple[str, ...]:
        """The names of the further masks an entry with these suite ``options`` carries.

        >>> info = DatasetInfo(extra_masks_option="extra_masks")
        >>> info.declares_extra_masks({"extra_masks": {"lungs": "lung", "heart": "h"}})
        ('heart', 'lungs')
        >>> info.declares_extra_masks({}), DatasetInfo().declares_extra_masks({"x": 1})
        ((), ())
        """
        table = options.get(self.extra_masks_option) if self.extra_masks_option else None
        return tuple(sorted(table or ()))


def _declares(option: str | tuple[str, ...] | None, default: bool, options: dict[str, Any]) -> bool:
    """Any of the ``option`` names set to something other than None or False (a name left
    out counts as ``default``); no names: ``default``."""
    names = (option,) if isinstance(option, str) else option
    if not names:
        return default
    return any(options.get(n, default) not in (None, False) for n in names)


DATASETS: Registry[DatasetInfo] = Registry("dataset", DatasetInfo)


class ImageDataset(Dataset):
    """A labelled image dataset with the attributes the harness reads.

    Subclasses set ``class_names``, ``channels`` and implement ``__len__``/``__getitem__``;
    ``provenance`` (source, split method) goes to the run manifest, ``split_ids`` lists every
    split's ids where the loader made the split itself.
    """

    class_names: tuple[str, ...] = ()
    channels: int = 1
    provenance: dict[str, Any] | None = None
    split_ids: dict[str, list[str]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ArrayDataset(ImageDataset):
    """An in-memory dataset: images (N, C, H, W) float32 in [0, 1], labels (N,), ids, masks.

    extras: further per-item tensors (first dimension N) that items carry under their key,
        e.g. synth-cxr's ``confounder`` and ``confounder_mask``; 0-d values become Python
        scalars.
    provenance: where the data came from and how the split was made (source, method,
        seed, counts), recorded in the run manifest.
    split_ids: the ids of every split, for loaders that split the data themselves.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        ids: list[str],
        class_names: tuple[str, ...],
        *,
        masks: torch.Tensor | None = None,
        organ_masks: torch.Tensor | None = None,
        name: str = "dataset",
        extras: dict[str, torch.Tensor] | None = None,
        provenance: dict[str, Any] | None = None,
        split_ids: dict[str, list[str]] | None = None,
    ):
        n = images.shape[0]
        if n == 0:
            raise UserError(f"{name}: the split is empty; check the data directory and split name")
        assert images.dim() == 4 and labels.shape == (n,) and len(ids) == n
        assert masks is None or masks.shape == (n, *images.shape[-2:])
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.ids = list(ids)
        self.masks = None if masks is None else masks.bool()
        self.organ_masks = None if organ_masks is None else organ_masks.bool()
        self.class_names = tuple(class_names)
        self.channels = images.shape[1]
        self.name = name
        self.extras = dict(extras or {})
        for key, value in self.extras.items():
            assert value.shape[0] == n, f"extra {key!r} has {value.shape[0]} rows for {n} items"
        self.provenance = dict(provenance or {"dataset": name})
        self.split_ids = split_ids

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "image": self.images[i],
            "label": int(self.labels[i]),
            "id": self.ids[i],
        }
        if self.masks is not None:
            item["mask"] = self.masks[i]
        if self.organ_masks is not None:
            item["organ_mask"] = self.organ_masks[i]
        for key, value in self.extras.items():
            item[key] = value[i].item() if value.dim() == 1 else value[i]
        return item


def check_split(split: str, name: str) -> str:
    if split not in SPLITS:
        raise UserError(f"{name}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split
