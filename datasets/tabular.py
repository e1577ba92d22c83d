"""Image datasets listed in a CSV table (one row per image: its file, label and optional
masks), split stratified and seeded unless the table names the split; the ``csv`` dataset
and ``ph2``, a thin registration on top of it.

Image and mask paths come from a column (``image_col``, ``mask_col``) or from a pattern
over the row's columns (``image_pattern="images/{image_id}.jpg"``), relative to
``base_dir`` (default: the table's folder). Labels are integers (class names ``"0"``,
``"1"``, ... unless ``class_names`` are given) or strings (class names sorted, or in the
order ``class_names`` gives). Every cell is read as text, so ids like ``007`` keep their
zeros. A table needs at least two classes among its labels. Images may be DICOM (``.dcm``):
``window`` sets their windowing (``[center, width]``, ``"minmax"``, or None for the window
stored in each file; the steps are in ``datasets/_io.py``).

Masks. Each kind is read by the rule of ``datasets/_io.py`` (two values, nonzero is the
structure, the image's native size, resized with nearest neighbour); a row whose mask cell
is empty or names a missing file is a UserError naming the image and the row (a missing
mask is not an empty one: an image without the structure needs an all-zero mask file).

- lesion, item ``mask``: ``mask_col`` or ``mask_pattern``, or ``boxes`` (below);
- organ, item ``organ_mask`` (read by the ``organ_mass`` metric): ``organ_mask_col`` or
  ``organ_mask_pattern``;
- any named structure, item ``mask_<name>`` (the dataset's ``extras``): ``extra_masks``, a
  table of name -> column or pattern (a value holding ``{`` is a pattern, else a column),
  e.g. ``extra_masks = { lungs = "lung_mask", heart = "heart/{image_id}.png" }``; names are
  letters, digits and ``_``. A localization metric scores against one when its suite entry
  says ``mask = "lungs"``.

Bounding boxes. ``boxes = "boxes.csv"`` (relative to the table's folder) gives the lesion
mask as rectangles instead of mask files: a table with an id column (``boxes_id_col``;
default ``id_col`` when given, else ``id``), matched against the images' ids (``id_col``'s
values, else the image file's stem), and the columns ``x_min, y_min, x_max, y_max`` in
pixels of the native image (x the column, y the row; ``x_max`` and ``y_max`` are exclusive
edges, floats allowed and rounded outward, so a box covers every pixel it touches; clipped
to the image). Several rows for one image: the mask is their union. An image with no row,
or only a row whose four coordinates are all empty, has no finding: an empty mask. A row
with ``x_max <= x_min`` or ``y_max <= y_min``, a non-numeric coordinate, a box wholly
outside its image, or an id matching no image is a UserError naming the row. ``boxes``
cannot be combined with ``mask_col``/``mask_pattern``.

Every image and mask path (and the ``boxes`` table) must resolve (``Path.resolve()``:
``..`` and symlinks followed) inside the *data root* of the table: the folder holding the
table, which the user named, plus ``base_dir`` when it is given as an absolute path (naming
a folder explicitly counts as allowing it). A relative ``base_dir`` is only a prefix inside
the table's folder: reaching out of it with ``..`` is refused like any other path. A table
is data and may come from elsewhere, so a path that leaves the root (``/etc/...``,
``../../x``, a symlink to another disk) is a UserError naming the row and the root;
``allow_outside_root=True`` (in a suite: ``allow_outside_root = true`` on the entry)
accepts such files.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cambench.benchmarks.core.errors import UserError
from cambench.datasets._io import (
    DATA_ROOT_ENV,
    Box,
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
    locate,
)
from cambench.datasets._split import DEFAULT_FRACTIONS, split_dataset
from cambench.datasets.base import DATASETS, SPLITS, ArrayDataset

if TYPE_CHECKING:
    import pandas as pd


def read_table(path: Path, *, name: str) -> pd.DataFrame:
    """The CSV at ``path`` with every cell as a string; an unreadable or empty table is a
    UserError naming it."""
    import pandas as pd  # imported on use: `import datasets` stays light

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{name}: cannot read the table {str(path)!r} ({err})") from None
    if table.empty:
        raise UserError(f"{name}: the table {str(path)!r} has no rows; expected one row per image")
    return table


def _need_columns(table: pd.DataFrame, columns: Sequence[str], *, path: Path, name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(
            f"{name}: the table {str(path)!r} has no column {', '.join(map(repr, missing))}; "
            f"its columns are: {', '.join(table.columns)}"
        )


def _pattern_fields(pattern: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(pattern) if f]


def _paths(
    table: pd.DataFrame, col: str | None, pattern: str | None, *, what: str, path: Path, name: str
) -> list[str] | None:
    """One path per row from a column or a ``str.format`` pattern over the row."""
    if col is not None and pattern is not None:
        raise UserError(f"{name}: give either {what}_col or {what}_pattern, not both")
    if col is not None:
        _need_columns(table, [col], path=path, name=name)
        return table[col].tolist()
    if pattern is not None:
        _need_columns(table, _pattern_fields(pattern), path=path, name=name)
        return [pattern.format(**row) for row in table.to_dict("records")]
    return None


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root) for root in roots)


def _table_file(
    base: Path,
    rel: str,
    *,
    what: str,
    row: int,
    manifest: Path,
    roots: Sequence[Path],
    allow_outside_root: bool,
    name: str,
) -> Path:
    """``base / rel``, refused when it resolves outside ``roots`` (unless allowed)."""
    path = base / rel
    if rel and not allow_outside_root and not _inside(path, roots):
        where = " or ".join(repr(str(r)) for r in roots)
        raise UserError(
            f"{name}: {what} {rel!r} in row {row} of {str(manifest)!r} resolves to "
            f"{str(path.resolve())!r}, outside the data root {where}; move the file under "
            "the root, or set allow_outside_root = true in the suite entry to allow it"
        )
    return path


def _mask_files(
    table: pd.DataFrame,
    col: str | None,
    pattern: str | None,
    *,
    what: str,
    base: Path,
    images: Sequence[Path],
    where: dict,
) -> list[tuple[Path, ...]] | None:
    """One mask file per row (as a one-file tuple) from a column or pattern; an empty cell
    or a missing file is a UserError naming the image and the row."""
    manifest, name = where["manifest"], where["name"]
    rels = _paths(table, col, pattern, what=what, path=manifest, name=name)
    if rels is None:
        return None
    out = []
    for k, (rel, image) in enumerate(zip(rels, images, strict=True)):
        label = what.replace("_", " ")
        mask = _table_file(base, rel, what=label, row=k + 2, **where)
        if not rel or not mask.is_file():
            raise UserError(
                f"{name}: image {str(image)!r} has no {label}: {str(mask)!r} does not exist "
                f"(row {k + 2} of {str(manifest)!r}); add the file (all zero where the image "
                "has none of the structure) or fix the row"
            )
        out.append((mask,))
    return out


BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def read_boxes(
    path: Path, *, id_col: str, ids: Sequence[str], name: str
) -> dict[str, tuple[Box, ...]]:
    """Every image id's boxes (possibly none) from the box table at ``path`` (the rules:
    this module's docstring); an id of the table matching no image is a UserError."""
    table = read_table(path, name=name)
    _need_columns(table, [id_col, *BOX_COLUMNS], path=path, name=name)
    boxes: dict[str, list[Box]] = {i: [] for i in ids}
    unknown: list[str] = []
    for k, row in enumerate(table.to_dict("records")):
        where = f"(row {k + 2} of {str(path)!r})"
        rid, cells = row[id_col], [row[c].strip() for c in BOX_COLUMNS]
        if rid not in boxes:
            unknown.append(rid)
            continue
        if not any(cells):
            continue  # an image listed with no box: no finding
        try:
            x0, y0, x1, y1 = (float(c) for c in cells)
        except ValueError:
            x0 = y0 = x1 = y1 = math.nan
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise UserError(
                f"{name}: box {where} has coordinates {', '.join(map(repr, cells))} for "
                f"{', '.join(BOX_COLUMNS)}; each must be a number (pixels of the native image), "
                "or all four empty for an image with no finding"
            )
        if x1 <= x0 or y1 <= y0:
            raise UserError(
                f"{name}: box {where} has x_min={x0:g}, x_max={x1:g}, y_min={y0:g}, "
                f"y_max={y1:g}; x_max must exceed x_min and y_max exceed y_min (max edges are "
                "exclusive: a one-pixel box at column c is x_min=c, x_max=c+1)"
            )
        boxes[rid].append(Box(x0, y0, x1, y1, where=where))
    if unknown:
        shown = ", ".join(map(repr, sorted(set(unknown))[:5]))
        raise UserError(
            f"{name}: the box table {str(path)!r} names ids that match no image: {shown}"
            f"{', ...' if len(set(unknown)) > 5 else ''} (column {id_col!r}, matched against "
            "the images' ids: id_col's values, else the image file's stem); fix the ids, set "
            "boxes_id_col, or remove the rows"
        )
    return {i: tuple(b) for i, b in boxes.items()}


def _option_file(
    folder: Path,
    rel: str | Path,
    *,
    option: str,
    manifest: Path,
    roots: Sequence[Path],
    allow_outside_root: bool,
    name: str,
) -> Path:
    """A file an option names, relative to ``folder``: it must exist and resolve inside
    ``roots`` (unless allowed)."""
    path = folder / Path(rel).expanduser()
    if not allow_outside_root and not _inside(path, roots):
        where = " or ".join(repr(str(r)) for r in roots)
        raise UserError(
            f"{name}: {option}={str(rel)!r} resolves to {str(path.resolve())!r}, outside the "
            f"data root {where} of {str(manifest)!r}; move the file under the root, or set "
            "allow_outside_root = true in the suite entry to allow it"
        )
    if not path.is_file():
        raise UserError(
            f"{name}: {option}={str(rel)!r} names {str(path)!r}, which does not exist (it is "
            f"read relative to the table's folder {str(folder)!r})"
        )
    return path


def _labels(
    values: list[str], class_names: Sequence[str] | None, *, path: Path, name: str
) -> tuple[list[int], tuple[str, ...]]:
    """Integer labels and class names from a label column's text."""
    if all(v.strip().lstrip("-").isdigit() for v in values):
        labels = [int(v) for v in values]
        names = (
            tuple(class_names)
            if class_names is not None
            else tuple(str(k) for k in range(max(labels) + 1))
        )
        bad = sorted({v for v in labels if not 0 <= v < len(names)})
        if bad:
            raise UserError(
                f"{name}: labels {bad} in {str(path)!r} are outside 0..{len(names) - 1} "
                f"(class names: {', '.join(names)})"
            )
        return labels, names
    names = tuple(class_names) if class_names is not None else tuple(sorted(set(values)))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(
            f"{name}: labels {unknown} in {str(path)!r} are not among class_names "
            f"{', '.join(names)}"
        )
    return [names.index(v) for v in values], names


def load_table(
    split: str,
    manifest: Path,
    *,
    image_size: int | Sequence[int] | None,
    seed: int,
    image_col: str | None = None,
    image_pattern: str | None = None,
    label_col: str = "label",
    mask_col: str | None = None,
    mask_pattern: str | None = None,
    organ_mask_col: str | None = None,
    organ_mask_pattern: str | None = None,
    extra_masks: Mapping[str, str] | None = None,
    boxes: str | Path | None = None,
    boxes_id_col: str | None = None,
    id_col: str | None = None,
    split_col: str | None = None,
    base_dir: Path | None = None,
    class_names: Sequence[str] | None = None,
    channels: Channels = 3,
    fit: Fit = "stretch",
    fractions: Fractions = DEFAULT_FRACTIONS,
    allow_outside_root: bool = False,
    window: Window = None,
    name: str = "csv",
) -> ArrayDataset:
    """The shared builder: read the table, resolve every file, read them once, return one
    split.

    ``base_dir`` is relative to the table's folder unless absolute; files must resolve
    inside the table's folder or an absolute ``base_dir`` unless ``allow_outside_root``.
    ``boxes`` is relative to the table's folder.
    """
    window = check_window(window, name=name)
    table = read_table(manifest, name=name)
    class_names = as_names(class_names, name=name, option="class_names")
    base = manifest.parent if base_dir is None else manifest.parent / base_dir
    roots = [manifest.parent.resolve()]
    if base_dir is not None and base_dir.is_absolute():
        roots.append(base_dir.resolve())
    images = _paths(table, image_col, image_pattern, what="image", path=manifest, name=name)
    if images is None:
        raise UserError(f"{name}: give image_col (a column of image paths) or image_pattern")
    if boxes is not None and (mask_col is not None or mask_pattern is not None):
        raise UserError(
            f"{name}: give either boxes (a table of rectangles) or mask_col/mask_pattern (mask "
            "files) for the lesion mask, not both; extra_masks may carry the other one"
        )
    if boxes_id_col is not None and boxes is None:
        raise UserError(f"{name}: boxes_id_col={boxes_id_col!r} is given without boxes=...")
    extras = extra_mask_specs(extra_masks, option="extra_masks", name=name)
    _need_columns(table, [label_col, *([id_col] if id_col else [])], path=manifest, name=name)
    labels, names = _labels(table[label_col].tolist(), class_names, path=manifest, name=name)
    present = sorted(set(labels))
    if len(present) < 2:
        raise UserError(
            f"{name}: the table {str(manifest)!r} needs at least two classes, found only "
            f"{names[present[0]]!r} in column {label_col!r} ({len(labels)} rows); add images "
            "of another class or check label_col"
        )
    ids = table[id_col].tolist() if id_col else [Path(p).stem for p in images]
    where = dict(manifest=manifest, roots=roots, allow_outside_root=allow_outside_root, name=name)
    image_files = []
    for k, rel in enumerate(images):
        image = _table_file(base, rel, what="image", row=k + 2, **where)
        if not rel or not image.is_file():
            raise UserError(
                f"{name}: image {str(image)!r} (row {k + 2} of {str(manifest)!r}) does not exist"
            )
        image_files.append(image)
    files = dict(base=base, images=image_files, where=where)
    lesion = _mask_files(table, mask_col, mask_pattern, what="mask", **files)
    organ = _mask_files(table, organ_mask_col, organ_mask_pattern, what="organ_mask", **files)
    named = []
    for key, spec in extras:  # a value holding "{" is a pattern, else a column
        col, pattern = (None, spec) if "{" in spec else (spec, None)
        found = _mask_files(table, col, pattern, what=f"{key}_mask", **files)
        assert found is not None, "a column or a pattern is given"
        named.append((key, found))
    box_map = None
    if boxes is not None:
        box_path = _option_file(manifest.parent, boxes, option="boxes", **where)
        box_map = read_boxes(box_path, id_col=boxes_id_col or id_col or "id", ids=ids, name=name)
    records = []
    for k, (rid, label, image) in enumerate(zip(ids, labels, image_files, strict=True)):
        records.append(
            Record(
                id=rid,
                label=label,
                image=image,
                masks=None if lesion is None else lesion[k],
                organ_masks=None if organ is None else organ[k],
                extra_masks=tuple((key, found[k]) for key, found in named),
                boxes=None if box_map is None else box_map[rid],
            )
        )
    given = None
    if split_col is not None:
        _need_columns(table, [split_col], path=manifest, name=name)
        given = table[split_col].tolist()
        odd = sorted(set(given) - set(SPLITS))
        if odd:
            raise UserError(
                f"{name}: split column {split_col!r} of {str(manifest)!r} holds {odd}; "
                f"use {', '.join(SPLITS)}"
            )
    return split_dataset(
        records,
        split=split,
        class_names=names,
        channels=check_channels(channels, name=name),
        size=as_size(image_size, name=name),
        fit=check_fit(fit, name=name),
        seed=seed,
        fractions=fractions,
        name=name,
        source=manifest,
        given_split=given,
        window=window,
    )


@DATASETS.register(
    "csv",
    source="real",
    masks=False,
    masks_option=("mask_col", "mask_pattern", "boxes"),
    organ_masks_option=("organ_mask_col", "organ_mask_pattern"),
    extra_masks_option="extra_masks",
    root_env=DATA_ROOT_ENV,
    root_option="manifest",
    how_to_get="Write a CSV with one row per image (path, label, optional mask) and pass it.",
)
def csv(
    split: str,
    *,
    root: str | Path | None = None,
    image_size: ImageSize = None,
    seed: int = 0,
    manifest: str | Path | None = None,
    image_col: str | None = "image",
    image_pattern: str | None = None,
    label_col: str = "label",
    mask_col: str | None = None,
    mask_pattern: str | None = None,
    organ_mask_col: str | None = None,
    organ_mask_pattern: str | None = None,
    extra_masks: dict[str, str] | None = None,
    boxes: str | Path | None = None,
    boxes_id_col: str | None = None,
    id_col: str | None = None,
    split_col: str | None = None,
    base_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    channels: Channels = 3,
    fit: Fit = "stretch",
    fractions: Fractions = DEFAULT_FRACTIONS,
    allow_outside_root: bool = False,
    window: Window = None,
) -> ArrayDataset:
    """Images listed in a CSV (path, label, optional masks), split by seed or a split column.

    ``manifest`` is the table, relative to ``root`` unless absolute (then ``root`` may be
    left out); ``root`` may also be the table itself. Paths in the table are relative to
    ``base_dir`` (relative to the table's folder; default that folder). ``image_pattern``
    replaces ``image_col`` (set ``image_col=None``) to build paths from other columns. Ids
    are ``id_col`` or the image file's stem. ``image_size`` None keeps the native size,
    which must then be one size. Files must lie inside the table's folder (or an absolute
    ``base_dir``) unless ``allow_outside_root=True``.

    Masks (rules: the module docstring): lesion from ``mask_col``/``mask_pattern`` or from
    the box table ``boxes`` (ids in ``boxes_id_col``: default ``id_col``, else ``id``);
    organ from ``organ_mask_col``/``organ_mask_pattern``; ``extra_masks`` maps names to
    columns or patterns, carried as ``mask_<name>``. ``window`` windows DICOM images:
    ``[center, width]``, ``"minmax"``, or None for each file's stored window.
    """
    if image_pattern is not None:
        image_col = None
    if manifest is not None and Path(manifest).expanduser().is_absolute():
        root, manifest = Path(manifest).expanduser(), None
    path = locate(
        root,
        name="csv",
        candidates=[str(manifest)] if manifest is not None else [],
        is_own=lambda p: p.is_file(),
        expected="the CSV table named by manifest=..." if manifest else "a CSV table",
        how_to_get=DATASETS.get("csv").info.how_to_get,
    )
    return load_table(
        split,
        path,
        image_size=image_size,
        seed=seed,
        image_col=image_col,
        image_pattern=image_pattern,
        label_col=label_col,
        mask_col=mask_col,
        mask_pattern=mask_pattern,
        organ_mask_col=organ_mask_col,
        organ_mask_pattern=organ_mask_pattern,
        extra_masks=extra_masks,
        boxes=boxes,
        boxes_id_col=boxes_id_col,
        id_col=id_col,
        split_col=split_col,
        base_dir=None if base_dir is None else Path(base_dir).expanduser(),
        class_names=class_names,
        channels=channels,
        fit=fit,
        fractions=fractions,
        allow_outside_root=allow_outside_root,
        window=window,
    )


PH2_CLASSES = ("common_nevus", "atypical_nevus", "melanoma")
PH2_SIZE = 128
PH2_HOW_TO_GET = (
    "Request PH2 from https://www.fc.up.pt/addi/ph2%20database.html (free for research) and "
    "arrange it as DIR/ph2/labels.csv (image_id,label), DIR/ph2/images/<id>.jpg and "
    "DIR/ph2/masks/<id>_lesion.png."
)


@DATASETS.register(
    "ph2",
    source="real",
    masks=True,
    masks_option="masks",
    root_env=DATA_ROOT_ENV,
    how_to_get=PH2_HOW_TO_GET,
)
def ph2(
    split: str,
    *,
    root: str | Path | None = None,
    image_size: ImageSize = None,
    seed: int = 0,
    channels: Channels = 3,
    masks: bool = True,
    fit: Fit = "stretch",
    fractions: Fractions = DEFAULT_FRACTIONS,
    allow_outside_root: bool = False,
) -> ArrayDataset:
    """PH2 dermoscopy (common nevus/atypical nevus/melanoma) with lesion masks, seeded split.

    ``root`` holds ``ph2/`` or is that folder (``labels.csv``, ``images/<id>.jpg``,
    ``masks/<id>_lesion.png``). ``image_size`` None means 128 x 128 (the 4:3 frame is
    stretched unless ``fit="pad"``). Ids are the image ids (``IMD002``).
    ``allow_outside_root=True`` accepts images/ or masks/ that are symlinks out of the folder.
    """
    folder = locate(
        root,
        name="ph2",
        candidates=["ph2"],
        is_own=lambda p: (p / "labels.csv").is_file(),
        expected="the ph2 folder with labels.csv, images/ and masks/",
        how_to_get=PH2_HOW_TO_GET,
    )
    return load_table(
        split,
        folder / "labels.csv",
        image_size=PH2_SIZE if image_size is None else image_size,
        seed=seed,
        image_pattern="images/{image_id}.jpg",
        label_col="label",
        mask_pattern="masks/{image_id}_lesion.png" if masks else None,
        id_col="image_id",
        class_names=PH2_CLASSES,
        channels=channels,
        fit=fit,
        fractions=fractions,
        allow_outside_root=allow_outside_root,
        name="ph2",
    )
