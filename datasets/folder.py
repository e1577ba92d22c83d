"""Class-per-folder image datasets (``root/<class>/*.png|jpg``), optionally with lesion masks,
split stratified and seeded into train/val/test; the ``folder`` dataset and the builder
that BUSI and other folder layouts register on.

Masks are found one of two ways:

- ``masks="sibling"``: next to the image, ``<stem>_mask.png`` plus any ``<stem>_mask_1.png``,
  ``<stem>_mask_2.png``, ... (the lesion is their union) - the layout of the Kaggle BUSI.
- ``masks="folder"``: in a parallel tree ``mask_dir/<class>/``, named ``<stem>.png`` or
  ``<stem>_mask*.png`` like siblings.

Files whose name ends in ``_mask`` or ``_mask_<k>`` are never taken for images. When masks
are asked for, an image without one is an error naming it: a missing mask is not an empty
lesion. A tree needs at least two class folders.

``mask_dir`` may point anywhere, ``..`` and absolute paths included, with no
``allow_outside_root`` switch: unlike a CSV table's rows (data, possibly written by someone
else), it is a folder the user names in their own suite entry, and the files are found by
listing it, never by names the data supplies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from benchmarks.core.errors import UserError
from datasets._io import (
    DATA_ROOT_ENV,
    Channels,
    Fit,
    Fractions,
    ImageSize,
    Record,
    as_names,
    as_size,
    check_channels,
    check_fit,
    is_image_file,
    locate,
)
from datasets._split import DEFAULT_FRACTIONS, split_dataset
from datasets.base import DATASETS, ArrayDataset

MaskMode = Literal["sibling", "folder"]
_MASK_NAME = re.compile(r"^(?P<stem>.*)_mask(?:_(?P<k>\d+))?$")


def _mask_index(folder: Path) -> dict[str, list[Path]]:
    """Image stem -> its mask files in ``folder`` (``<stem>_mask*``), in a fixed order."""
    index: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            m = _MASK_NAME.match(path.stem)
            if m and is_image_file(path):
                index.setdefault(m["stem"], []).append(path)
    return index


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p) and not _MASK_NAME.match(p.stem))


def _class_folders(base: Path, classes: Sequence[str] | None, *, name: str) -> list[str]:
    available = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not available:
        raise UserError(
            f"{name}: {str(base)!r} has no class folders; expected one folder per class, "
            "e.g. root/<class>/<image>.png"
        )
    classes = as_names(classes, name=name, option="classes")
    if classes is None:
        return available
    for cls in classes:
        if cls not in available:
            raise UserError(
                f"{name}: class folder {cls!r} not found under {str(base)!r}; "
                f"available classes: {', '.join(available)}"
            )
    if len(set(classes)) != len(classes):
        raise UserError(f"{name}: classes={classes!r} names a class twice")
    return classes


def folder_records(
    base: Path,
    *,
    classes: Sequence[str] | None = None,
    masks: MaskMode | None = None,
    mask_dir: Path | None = None,
    name: str = "folder",
) -> tuple[list[Record], tuple[str, ...]]:
    """The images of a class-per-folder tree as records (ids ``<class>/<stem>``), and the
    class names in label order (``classes`` as given, else sorted)."""
    if masks not in (None, "sibling", "folder"):
        raise UserError(f"{name}: masks={masks!r}; use None, 'sibling' or 'folder'")
    if masks == "folder" and (mask_dir is None or not mask_dir.is_dir()):
        raise UserError(
            f"{name}: masks='folder' needs mask_dir, a folder holding <class>/<stem>.png masks; "
            f"got {None if mask_dir is None else str(mask_dir)!r}"
        )
    class_names = _class_folders(base, classes, name=name)
    if len(class_names) < 2:
        raise UserError(
            f"{name}: {str(base)!r} needs at least two classes, found only "
            f"{class_names[0]!r}; add a folder per class (root/<class>/<image>.png)"
            + (" or name more classes in classes=" if classes is not None else "")
        )
    records: list[Record] = []
    for label, cls in enumerate(class_names):
        images = _image_files(base / cls)
        if not images:
            raise UserError(f"{name}: class folder {str(base / cls)!r} holds no images")
        if masks == "sibling":
            index = _mask_index(base / cls)
        elif masks == "folder":
            assert mask_dir is not None
            index = _mask_index(mask_dir / cls)
            for p in _image_files(mask_dir / cls) if (mask_dir / cls).is_dir() else []:
                index.setdefault(p.stem, []).insert(0, p)
        for img in images:
            found: tuple[Path, ...] | None = None
            if masks is not None:
                found = tuple(index.get(img.stem, ()))
                if not found:
                    sibling = masks == "sibling"
                    where = img.parent if sibling else mask_dir / cls  # type: ignore[operator]
                    want = f"{img.stem}_mask.png" if sibling else f"{img.stem}.png (or _mask.png)"
                    raise UserError(
                        f"{name}: image {str(img)!r} has no mask; expected {want} in "
                        f"{str(where)!r}. Add the mask, remove the image, or load without masks"
                    )
            records.append(Record(id=f"{cls}/{img.stem}", label=label, image=img, masks=found))
    return records, tuple(class_names)


def load_folder(
    split: str,
    base: Path,
    *,
    image_size: int | Sequence[int] | None,
    seed: int,
    classes: Sequence[str] | None,
    masks: MaskMode | None,
    mask_dir: Path | None,
    channels: int,
    fit: str,
    fractions: Sequence[float],
    name: str,
) -> ArrayDataset:
    """The shared builder: list a class-per-folder tree, read it once, return one split."""
    records, class_names = folder_records(
        base, classes=classes, masks=masks, mask_dir=mask_dir, name=name
    )
    return split_dataset(
        records,
        split=split,
        class_names=class_names,
        channels=check_channels(channels, name=name),
        size=as_size(image_size, name=name),
        fit=check_fit(fit, name=name),
        seed=seed,
        fractions=fractions,
        name=name,
        source=base,
    )


@DATASETS.register(
    "folder",
    source="real",
    masks=False,
    masks_option="masks",
    root_env=DATA_ROOT_ENV,
    how_to_get="Arrange your images as DIR/<class>/<image>.png (masks optional) and pass DIR.",
)
def folder(
    split: str,
    *,
    root: str | Path | None = None,
    image_size: ImageSize = None,
    seed: int = 0,
    subdir: str | None = None,
    classes: Sequence[str] | None = None,
    channels: Channels = 3,
    masks: MaskMode | None = None,
    mask_dir: str | Path | None = None,
    fit: Fit = "stretch",
    fractions: Fractions = DEFAULT_FRACTIONS,
) -> ArrayDataset:
    """Images in one folder per class (root/<class>/*.png|jpg), split stratified by seed.

    ``root`` (or ``root/subdir``) holds the class folders; classes are sorted unless
    ``classes`` gives them (restricting and ordering them; labels follow that order).
    ``image_size`` None keeps the native size, which must then be the same for every image.
    ``mask_dir`` (for ``masks="folder"``) is relative to ``root`` unless absolute.
    """
    base = locate(
        root,
        name="folder",
        candidates=[subdir] if subdir else [],
        is_own=lambda p: subdir is None and p.is_dir(),
        expected="one folder per class holding its images",
        how_to_get=DATASETS.get("folder").info.how_to_get,
    )
    mdir = None
    if mask_dir is not None:
        mdir = Path(mask_dir).expanduser()
        if not mdir.is_absolute():  # relative to the data root, like subdir
            mdir = Path(root if root is not None else os.environ[DATA_ROOT_ENV]) / mdir
    return load_folder(
        split,
        base,
        image_size=image_size,
        seed=seed,
        classes=classes,
        masks=masks,
        mask_dir=mdir,
        channels=channels,
        fit=fit,
        fractions=fractions,
        name="folder",
    )
