"""Shared reading helpers for the real-data loaders: where the data is, and how a file
becomes an image or a mask array.

Every real dataset resolves its files under one *data root* (``--data-root``, a suite
entry, or the ``CAMBENCH_DATA_ROOT`` environment variable), e.g. ``root/ph2/`` or
``root/pneumoniamnist.npz``; ``root`` may also point straight at the dataset's own folder or
file. Images are read with PIL and converted to the wanted channels (RGB, RGBA, palette and
16-bit grey all become 8-bit ``L`` or ``RGB``; alpha is dropped, not composited), then
resized (bilinear, antialiased by PIL on downscaling) to ``image_size``; masks are resized
with nearest neighbour so they stay binary and the lesion does not grow or shrink.

How a mask file is read (``binarize_mask``, at the file's native size, before any resize):
a mask must hold at most two distinct values, 0 and one nonzero value ``v``, and *nonzero is
lesion*. So 0/1, 0/255, 0/38 (a palette or colour mask, a colour counting as one value) and
16-bit 0/1 or 0/65535 all read the same, and a mask whose max is nonzero is never read as
empty. An all-zero mask is an empty lesion (a normal image); a mask that is ``v`` everywhere
is a lesion filling the frame. A mask with more distinct values (grey levels: JPEG
compression, anti-aliased edges, soft or probability masks, label maps with several
structures) is refused with a UserError naming the file, the dataset and the first values
found, rather than thresholded: masks are the ground truth of the localization metrics, and
any threshold would be a guess made for the user (half the max would keep JPEG masks about
right but silently drop the 1s of a 0/1/2 organ/lesion label map) that changes scores with
no trace in the results; converting the file once (to a two-valued PNG, thresholded where
the user means the edge) leaves nothing implicit. Alpha is dropped as for images, except
that a mask whose shape lies only in its alpha channel (one colour, alpha varying) is
refused too. Masks given as arrays (an npz or HDF5 loader that carries them) go through
``binarize_mask`` by the same rule; the MedMNIST and PCam files read here carry none.

``fit`` says how a picture of another aspect ratio meets the target size: ``"stretch"``
resizes both sides independently (aspect not kept; no pixel is lost), ``"pad"`` scales the
long side to fit and pads the rest with black (aspect kept; the mask is padded with
background).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from benchmarks.core.checks import Fraction, PositiveInt
from benchmarks.core.errors import DataNotFound, UserError

DATA_ROOT_ENV = "CAMBENCH_DATA_ROOT"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Fit = Literal["stretch", "pad"]
Size = tuple[int, int]
# the types of the options real-data loaders share, checked when a suite loads
ImageSize = PositiveInt | tuple[PositiveInt, PositiveInt] | None  # None: the native size
Channels = Literal[1, 3]
Fractions = tuple[Fraction, Fraction, Fraction]  # train, val, test shares


def as_size(image_size: int | Iterable[int] | None, *, name: str) -> Size | None:
    """``image_size`` as (height, width): an int means a square; None keeps the native size."""
    if image_size is None:
        return None
    if isinstance(image_size, int | np.integer):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(
            f"{name}: image_size={image_size!r} must be a positive int or (height, width)"
        )
    return size  # type: ignore[return-value]


def as_names(
    value: str | Iterable[str] | None, *, name: str, option: str
) -> tuple[str, ...] | None:
    """A list of names from a sequence or a comma-separated string (as a suite may write it)."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(n).strip() for n in names)
    if not names or "" in names:
        raise UserError(f"{name}: {option}={value!r} must name at least one class, none empty")
    return names


def check_fit(fit: str, *, name: str) -> Fit:
    if fit not in ("stretch", "pad"):
        raise UserError(f"{name}: fit={fit!r} is not known; use 'stretch' or 'pad'")
    return fit  # type: ignore[return-value]


def check_channels(channels: int, *, name: str) -> int:
    if channels not in (1, 3):
        raise UserError(f"{name}: channels={channels!r}; use 1 (grey) or 3 (RGB)")
    return channels


def locate(
    root: str | os.PathLike | None,
    *,
    name: str,
    candidates: Iterable[str],
    is_own: Callable[[Path], bool],
    expected: str,
    how_to_get: str,
) -> Path:
    """The dataset's folder or file: ``root/<candidate>`` for the first candidate that exists,
    or ``root`` itself when ``is_own(root)`` says it already is the dataset.

    ``root`` None reads ``$CAMBENCH_DATA_ROOT``. Anything missing raises ``DataNotFound`` (a
    UserError the runner may turn into a skipped dataset) naming the path, what was expected
    there, and how to get the data.
    """
    candidates = list(candidates)
    if root is None or str(root) == "":
        root = os.environ.get(DATA_ROOT_ENV) or None
        if root is None:
            raise DataNotFound(
                f"{name}: no data directory given; pass --data-root DIR (or root=DIR) or set "
                f"{DATA_ROOT_ENV}, where DIR holds {expected}. {how_to_get}"
            )
    path = Path(root).expanduser()
    if not path.exists():
        raise DataNotFound(
            f"{name}: data directory {str(path)!r} does not exist; it should hold {expected}. "
            f"{how_to_get}"
        )
    if is_own(path):
        return path
    for cand in candidates:
        if (path / cand).exists():
            return path / cand
    if not candidates:
        raise DataNotFound(f"{name}: {str(path)!r} is not {expected}. {how_to_get}")
    raise DataNotFound(
        f"{name}: {str(path)!r} holds none of {', '.join(repr(c) for c in candidates)}; "
        f"expected {expected}. {how_to_get}"
    )


def open_image(path: Path) -> Image.Image:
    """Open and decode an image file fully, so a corrupt file fails here with its name."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise UserError(f"image file {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"cannot read image file {str(path)!r} ({type(err).__name__}: {err}); "
            "the file is corrupt or not an image: replace it or remove it"
        ) from None


def _to_8bit(img: Image.Image, path: object) -> Image.Image:
    """Bring 16-bit integer grey to 8-bit ``L`` (0..65535 -> 0..255, rounded); 8-bit modes
    pass unchanged."""
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        # PIL opens 16-bit PNGs as "I;16" or "I": both hold 0..65535
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr)  # 2-D uint8 -> "L"
    if img.mode == "F":
        raise UserError(
            f"image {path}: floating-point images are not supported; save it as 8- or 16-bit PNG"
        )
    return img


def _geometry(src: Size, size: Size | None, fit: Fit) -> tuple[Size, Size]:
    """(resized height, width) and (top, left) offset of the pasted picture on the canvas."""
    if size is None:
        return src, (0, 0)
    if fit == "stretch":
        return size, (0, 0)
    scale = min(size[0] / src[0], size[1] / src[1])
    inner = (max(1, round(src[0] * scale)), max(1, round(src[1] * scale)))
    return inner, ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2)


def _place(img: Image.Image, size: Size | None, fit: Fit, resample: int) -> Image.Image:
    src = (img.height, img.width)
    inner, (top, left) = _geometry(src, size, fit)
    if inner != src:
        img = img.resize((inner[1], inner[0]), resample=resample)
    if size is None or inner == size:
        return img
    canvas = Image.new(img.mode, (size[1], size[0]), 0)
    canvas.paste(img, (left, top))
    return canvas


def prepare_image(
    img: Image.Image, *, channels: int, size: Size | None, fit: Fit = "stretch", path: object = ""
) -> np.ndarray:
    """A PIL image as uint8 (C, H, W) with ``channels`` channels at ``size`` (bilinear)."""
    img = _to_8bit(img, path)
    img = img.convert("L" if channels == 1 else "RGB")
    img = _place(img, size, fit, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


MASK_VALUES_SHOWN = 6


def _show_values(distinct: np.ndarray) -> str:
    """The first few distinct values (rows: colours) of a mask, for a message."""
    shown = [
        str(tuple(v.tolist())) if distinct.ndim == 2 else str(v.item())
        for v in distinct[:MASK_VALUES_SHOWN]
    ]
    return ", ".join(shown) + (", ..." if len(distinct) > MASK_VALUES_SHOWN else "")


def binarize_mask(values: np.ndarray, *, path: object = "", name: str = "dataset") -> np.ndarray:
    """A mask's values (H, W), or colours (H, W, C), as bool (H, W): nonzero is lesion.

    The values must be {0, v} for one v (any dtype; a colour is one value); more distinct
    values, or non-finite ones, are a UserError naming ``path`` and the dataset ``name``
    (the rule and why: this module's docstring).
    """
    arr = np.asarray(values)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise UserError(
            f"{name}: mask {str(path)!r} has shape {arr.shape}; expected (H, W) or (H, W, C)"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UserError(
            f"{name}: mask {str(path)!r} holds NaN or infinite values; save it with 0 for "
            "background and one nonzero value (e.g. 255) for the lesion"
        )
    if arr.dtype == np.bool_:
        return arr.copy() if arr.ndim == 2 else arr.any(axis=-1)
    lesion = arr != 0 if arr.ndim == 2 else (arr != 0).any(axis=-1)
    if not lesion.any():
        return lesion
    # one nonzero value (colour): every lesion pixel equals the first one
    first = arr[np.unravel_index(np.argmax(lesion), lesion.shape)]
    same = arr == first if arr.ndim == 2 else (arr == first).all(axis=-1)
    if np.array_equal(same, lesion):
        return lesion
    flat = arr.reshape(-1) if arr.ndim == 2 else arr.reshape(-1, arr.shape[-1])
    distinct = np.unique(flat, axis=0 if arr.ndim == 3 else None)
    raise UserError(
        f"{name}: mask {str(path)!r} holds {len(distinct)} distinct values "
        f"({_show_values(distinct)}), not two: a mask must be 0 for background and one "
        "nonzero value for the lesion (0/1, 0/255, ...), and grey levels (JPEG, anti-aliasing, "
        "soft or label masks) are not guessed at; re-save it as a two-valued PNG (e.g. 0/255), "
        "thresholded where you mean the lesion edge to be"
    )


def mask_values(img: Image.Image, *, path: object = "", name: str = "dataset") -> np.ndarray:
    """A PIL mask's raw values (H, W), or colours (H, W, C), for ``binarize_mask``: 16-bit
    values are kept (a 16-bit 0/1 mask stays 0/1), palettes become their colours, alpha is
    dropped unless the shape lies only in it (then a UserError)."""
    mode = img.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;"):
        return np.asarray(img)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    elif mode not in ("LA", "RGBA", "La", "RGBa", "RGB"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if img.mode == "RGB":
        return arr
    colour, alpha = arr[..., :-1], arr[..., -1]
    flat = colour.reshape(-1, colour.shape[-1])
    if alpha.min() != alpha.max() and (flat == flat[0]).all():
        raise UserError(
            f"{name}: mask {str(path)!r} is one colour everywhere and draws its shape in the "
            f"alpha channel only (alpha {int(alpha.min())}..{int(alpha.max())}); alpha is not "
            "read: save the mask as a grey PNG, 0 for background and 255 for the lesion"
        )
    return colour


def prepare_mask(
    img: Image.Image,
    *,
    size: Size | None,
    fit: Fit = "stretch",
    path: object = "",
    name: str = "dataset",
) -> np.ndarray:
    """A PIL mask as bool (H, W) at ``size``: nonzero is lesion (``binarize_mask``, at the
    native size), then a nearest-neighbour resize."""
    lesion = binarize_mask(mask_values(img, path=path, name=name), path=path, name=name)
    binary = Image.fromarray(lesion.astype(np.uint8) * 255)
    binary = _place(binary, size, fit, Image.Resampling.NEAREST)
    return np.asarray(binary, dtype=np.uint8) > 127


def read_image(
    path: Path, *, channels: int, size: Size | None, fit: Fit = "stretch"
) -> tuple[np.ndarray, Size]:
    """Read an image file as uint8 (C, H, W) and its native (height, width); a corrupt file
    is a UserError naming it."""
    img = open_image(path)
    arr = prepare_image(img, channels=channels, size=size, fit=fit, path=path)
    return arr, (img.height, img.width)


def read_masks(
    paths: Iterable[Path],
    *,
    size: Size | None,
    fit: Fit = "stretch",
    image_hw: Size,
    name: str = "dataset",
) -> np.ndarray:
    """The union of one image's mask files as bool (H, W) at ``size``; each file is read by
    ``binarize_mask``'s rule (nonzero is lesion, grey levels refused).

    Every mask must have the image's native size (``image_hw``): a mask of another size is
    misaligned, and resizing it would hide the error.
    """
    union: np.ndarray | None = None
    for path in paths:
        img = open_image(path)
        if (img.height, img.width) != tuple(image_hw):
            raise UserError(
                f"{name}: mask {str(path)!r} is {img.height}x{img.width} but its image is "
                f"{image_hw[0]}x{image_hw[1]}; masks must match their image pixel for pixel"
            )
        mask = prepare_mask(img, size=size, fit=fit, path=path, name=name)
        union = mask if union is None else union | mask
    assert union is not None, "read_masks needs at least one path"
    return union


def file_fingerprint(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of each file: a cache key that changes when a file changes."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


@dataclass(frozen=True)
class Record:
    """One labelled image file of a dataset, with its lesion mask files.

    ``masks`` None means masks are not read; a tuple (possibly of several files, whose union
    is the lesion) means they are.
    """

    id: str
    label: int
    image: Path
    masks: tuple[Path, ...] | None = None


def load_records(
    records: Sequence[Record], *, channels: int, size: Size | None, fit: Fit, name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images uint8 (N, C, H, W) and masks bool (N, H, W) (or None) of ``records``.

    Read once per process: the result is cached under the records, the files' sizes and
    modification times, and the reading options, so a changed file is read again and a
    failed read caches nothing.
    """
    records = tuple(records)
    files = [r.image for r in records] + [m for r in records for m in (r.masks or ())]
    return _load_records_cached(records, file_fingerprint(files), channels, size, fit, name)


@functools.lru_cache(maxsize=4)
def _load_records_cached(
    records: tuple[Record, ...],
    fingerprint: tuple[tuple[str, int, int], ...],
    channels: int,
    size: Size | None,
    fit: Fit,
    name: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    del fingerprint  # part of the cache key only

    def read_one(rec: Record) -> tuple[np.ndarray, Size, np.ndarray | None]:
        arr, hw = read_image(rec.image, channels=channels, size=size, fit=fit)
        mask = None
        if rec.masks is not None:
            mask = read_masks(rec.masks, size=size, fit=fit, image_hw=hw, name=name)
        return arr, hw, mask

    assert len({r.masks is None for r in records}) <= 1, "masks for all records or none"
    # PIL decodes without the GIL: a few threads read a folder of PNGs/JPEGs ~2x faster
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        loaded = list(pool.map(read_one, records))
    images = [a for a, _, _ in loaded]
    native = [hw for _, hw, _ in loaded]
    masks = [m for _, _, m in loaded if m is not None]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        sizes = sorted({f"{h}x{w}" for h, w in native})
        raise UserError(
            f"{name}: images have different sizes ({', '.join(sizes[:5])}, ...); pass "
            "image_size=N (or image_size=(H, W)) to resize them to one size"
        )
    stacked = np.stack(images) if images else np.zeros((0, channels, 1, 1), np.uint8)
    stacked.setflags(write=False)  # shared by every caller: nobody may change it in place
    mask_arr = None
    if masks:
        mask_arr = np.stack(masks)
        mask_arr.setflags(write=False)
    return stacked, mask_arr
