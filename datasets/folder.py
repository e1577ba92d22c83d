"""Class-per-folder image datasets (``root/<class>/*.png|jpg|dcm``), optionally with lesion,
organ and named masks, split stratified and seeded into train/val/test; the ``folder``
dataset and the builder that BUSI and other folder layouts register on.

Lesion masks (item ``mask``) are found one of two ways:

- ``masks="sibling"``: next to the image, ``<stem>_mask.png`` plus any ``<stem>_mask_1.png``,
  ``<stem>_mask_2.png``, ... (the lesion is their union) - the layout of the Kaggle BUSI.
- ``masks="folder"``: in a parallel tree ``mask_dir/<class>/``, named ``<stem>.png`` or
  ``<stem>_mask*.png`` like siblings.

Organ masks (item ``organ_mask``, read by the ``organ_mass`` metric) come from their own
parallel tree ``organ_mask_dir/<class>/``, and named extra masks (item ``mask_<name>``, the
dataset's ``extras``) from ``extra_mask_dirs = { lungs = "lung_masks" }``, one parallel tree
per name (letters, digits and ``_``); both are found as ``masks="folder"`` finds lesion
masks, independently of ``masks``. Every mask is read by the rule of ``datasets/_io.py``
(two values, nonzero is the structure, the image's native size, nearest-neighbour resize).

Files whose name ends in ``_mask`` or ``_mask_<k>`` are never taken for images. When masks
of a kind are asked for, an image without one is an error naming it: a missing mask is not
an empty one (an image without the structure needs an all-zero mask). A tree needs at least
two class folders. Images may be DICOM (``.dcm``); ``window`` sets their windowing
(``[center, width]``, ``"minmax"``, or None for the window stored in each file; the steps
are in ``datasets/_io.py``).

``mask_dir``, ``organ_mask_dir`` and ``extra_mask_dirs`` (relative to ``root`` unless
absolute) may point anywhere, ``..`` and absolute paths included, with no
``allow_outside_root`` switch: unlike a CSV table's rows (data, possibly written by someone
else), they are folders the user names in their own suite entry, and the files are found by
listing them, never by names the data supplies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from cambench.benchmarks.core.errors import UserError
from cambench.datasets._io import (
    DATA_ROOT_ENV,
    Channels,
    Fit,
    Fractions,
    ImageSize,
    Record,
    Window,
    as_names,
    as_size,
    check_channels,
    check_fit,
    check_window,
    extra_mask_specs,
    is_image_file,
    locate,
)
from cambench.datasets._split import DEFAULT_FRACTIONS, split_dataset
from cambench.datasets.base import DATASETS, ArrayDataset

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


def _tree_index(mask_dir: Path, cls: str) -> dict[str, list[Path]]:
    """Image stem -> its mask files in the parallel tree ``mask_dir/<cls>/``: ``<stem>.png``
    first, then ``<stem>_mask*``."""
    index = _mask_index(mask_dir / cls)
    for p in _image_files(mask_dir / cls) if (mask_dir / cls).is_dir() else []:
        index.setdefault(p.stem, []).insert(0, p)
    return index


def _need_dir(folder: Path | None, *, option: str, name: str) -> Path:
    if folder is None or not folder.is_dir():
        raise UserError(
            f"{name}: {option} must be a folder holding <class>/<stem>.png masks; got "
            f"{None if folder is None else str(folder)!r}"
        )
    return folder


def _found(
    index: dict[str, list[Path]], img: Path, *, where: Path, want: str, what: str, name: str
) -> tuple[Path, ...]:
    """The mask files of ``img`` in ``index``; none is a UserError (a missing mask is not an
    empty one)."""
    found = tuple(index.get(img.stem, ()))
    if not found:
        raise UserError(
            f"{name}: image {str(img)!r} has no {what}; expected {want} in {str(where)!r}. "
            "Add the mask, remove the image, or load without masks"
        )
    return found


def folder_records(
    base: Path,
    *,
    classes: Sequence[str] | None = None,
    masks: MaskMode | None = None,
    mask_dir: Path | None = None,
    organ_mask_dir: Path | None = None,
    extra_mask_dirs: Mapping[str, Path] | None = None,
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
    if organ_mask_dir is not None:
        _need_dir(organ_mask_dir, option="organ_mask_dir", name=name)
    extras = [
        (key, _need_dir(Path(d), option=f"extra_mask_dirs {key}", name=name))
        for key, d in extra_mask_specs(extra_mask_dirs, option="extra_mask_dirs", name=name)
    ]
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
            index = _tree_index(mask_dir, cls)
        organ_index = None if organ_mask_dir is None else _tree_index(organ_mask_dir, cls)
        extra_index = [(key, d / cls, _tree_index(d, cls)) for key, d in extras]
        for img in images:
            in_tree = f"{img.stem}.png (or {img.stem}_mask.png)"
            found: tuple[Path, ...] | None = None
            if masks == "sibling":
                want = f"{img.stem}_mask.png"
                found = _found(index, img, where=img.parent, want=want, what="mask", name=name)
            elif masks == "folder":
                where = mask_dir / cls  # type: ignore[operator]
                found = _found(index, img, where=where, want=in_tree, what="mask", name=name)
            organ = None
            if organ_index is not None:
                where = organ_mask_dir / cls  # type: ignore[operator]
                organ = _found(
                    organ_index, img, where=where, want=in_tree, what="organ mask", name=name
                )
            extra = tuple(
                (key, _found(idx, img, where=d, want=in_tree, what=f"{key} mask", name=name))
                for key, d, idx in extra_index
            )
            records.append(
                Record(
                    id=f"{cls}/{img.stem}",
                    label=label,
                    image=img,
                    masks=found,
                    organ_masks=organ,
                    extra_masks=extra,
                )
            )
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
    organ_mask_dir: Path | None = None,
    extra_mask_dirs: Mapping[str, Path] | None = None,
    window: Window = None,
) -> ArrayDataset:
    """The shared builder: list a class-per-folder tree, read it once, return one split."""
    window = check_window(window, name=name)
    records, class_names = folder_records(
        base,
        classes=classes,
        masks=masks,
        mask_dir=mask_dir,
        organ_mask_dir=organ_mask_dir,
        extra_mask_dirs=extra_mask_dirs,
        name=name,
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
        window=window,
    )


@DATASETS.register(
    "folder",
    source="real",
    masks=False,
    masks_option="masks",
    organ_masks_option="organ_mask_dir",
    extra_masks_option="extra_mask_dirs",
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
    organ_mask_dir: str | Path | None = None,
    extra_mask_dirs: dict[str, str] | None = None,
    fit: Fit = "stretch",
    fractions: Fractions = DEFAULT_FRACTIONS,
    window: Window = None,
) -> ArrayDataset:
    """Images in one folder per class (root/<class>/*.png|jpg|dcm), split stratified by seed.

    ``root`` (or ``root/subdir``) holds the class folders; classes are sorted unless
    ``classes`` gives them (restricting and ordering them; labels follow that order).
    ``image_size`` None keeps the native size, which must then be the same for every image.
    ``mask_dir`` (for ``masks="folder"``), ``organ_mask_dir`` (organ masks) and the folders
    of ``extra_mask_dirs`` (name -> folder: masks carried as ``mask_<name>``) are parallel
    trees ``<dir>/<class>/<stem>.png``, relative to ``root`` unless absolute. ``window``
    windows DICOM images: ``[center, width]``, ``"minmax"``, or None for each file's
    stored window.
    """
    base = locate(
        root,
        name="folder",
        candidates=[subdir] if subdir else [],
        is_own=lambda p: subdir is None and p.is_dir(),
        expected="one folder per class holding its images",
        how_to_get=DATASETS.get("folder").info.how_to_get,
    )

    def under_root(folder: str | Path | None) -> Path | None:
        if folder is None:
            return None
        path = Path(folder).expanduser()
        if path.is_absolute():
            return path
        # relative to the data root, like subdir
        return Path(root if root is not None else os.environ[DATA_ROOT_ENV]) / path

    extra = {
        key: under_root(d)
        for key, d in extra_mask_specs(extra_mask_dirs, option="extra_mask_dirs", name="folder")
    }
    return load_folder(
        split,
        base,
        image_size=image_size,
        seed=seed,
        classes=classes,
        masks=masks,
        mask_dir=under_root(mask_dir),
        organ_mask_dir=under_root(organ_mask_dir),
        extra_mask_dirs=extra,  # type: ignore[arg-type]
        channels=channels,
        fit=fit,
        fractions=fractions,
        window=window,
        name="folder",
    )
