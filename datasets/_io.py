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

Several masks per image. A ``Record`` may name lesion mask files (``masks``: item key
``mask``), organ mask files (``organ_masks``: ``organ_mask``, read by the ``organ_mass``
metric) and named extra masks (``extra_masks``: ``mask_<name>``, carried as the dataset's
``extras``). Each is read by the rule above (several files: their union), must have its
image's native size, and is resized or padded like the lesion mask (nearest neighbour).

Bounding boxes (``Box``) stand for a lesion mask: pixel coordinates in the native image,
``x`` the column and ``y`` the row, with pixel ``(r, c)`` covering ``[c, c+1) x [r, r+1)``;
``x_max`` and ``y_max`` are exclusive edges. A box covers every pixel it touches (floats
rounded outward: columns ``floor(x_min)`` to ``ceil(x_max) - 1``), is clipped to the image,
and the image's mask is the union of its boxes; a box wholly outside its image is a
UserError naming where the box came from. An image with no box has an empty mask.

DICOM (``.dcm``, read with pydicom, imported on first use: ``pip install pydicom``).
One frame; grey (MONOCHROME1/2, any BitsStored up to 16 in 8 or 16 allocated bits, signed
or unsigned, or float pixel data) or 8-bit colour (RGB, or YBR converted to RGB by pydicom;
used as stored, no windowing). A grey picture becomes 8-bit in four steps (``dicom_to_8bit``):

1. the Modality LUT's linear form: ``x = stored * RescaleSlope + RescaleIntercept``
   (1 and 0 when absent; a Modality LUT Sequence is not read);
2. a window ``(c, w)``: the loader's ``window`` option ``[center, width]`` when given,
   else the file's stored WindowCenter/WindowWidth (the first value when several),
   applied with the file's VOILUTFunction (LINEAR when absent; LINEAR_EXACT and SIGMOID
   too; a user's window is always LINEAR). LINEAR is PS3.3 C.11.2.1.2 with output range
   0..255: ``x <= c - 0.5 - (w-1)/2`` gives 0, ``x > c - 0.5 + (w-1)/2`` gives 255, and
   between, ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``. With no window (none stored and
   none given, or ``window="minmax"``) the image's own range is stretched:
   ``(x - min) / (max - min) * 255`` (a constant image gives 0). A VOI LUT Sequence is
   not read;
3. quantization to uint8: rounded to the nearest integer (``numpy.rint``, ties to even),
   so 256 grey levels remain of a 12- or 16-bit picture;
4. MONOCHROME1 (low values drawn white) is inverted, ``255 - y``, so that high always
   means bright as in MONOCHROME2.

The 8-bit picture then goes the way of any grey image (``channels=3`` repeats it).
Masks stay ordinary image files: a ``.dcm`` mask is refused.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from cambench.benchmarks.core.checks import Fraction, OneOf, PositiveInt, Range
from cambench.benchmarks.core.errors import DataNotFound, UserError

DATA_ROOT_ENV = "CAMBENCH_DATA_ROOT"
DICOM_SUFFIX = ".dcm"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", DICOM_SUFFIX)

Fit = Literal["stretch", "pad"]
Size = tuple[int, int]
# the types of the options real-data loaders share, checked when a suite loads
ImageSize = PositiveInt | tuple[PositiveInt, PositiveInt] | None  # None: the native size
Channels = Literal[1, 3]
Fractions = tuple[Fraction, Fraction, Fraction]  # train, val, test shares
# DICOM windowing: [center, width], "minmax" (the image's own range), None (the file's
# stored window, else its range); see the module docstring
Window = tuple[float, Annotated[float, Range(1)]] | Annotated[str, OneOf(("minmax",))] | None
WindowSpec = tuple[float, float] | Literal["minmax"] | None


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


def check_window(window: object, *, name: str) -> WindowSpec:
    """The ``window`` option as ``(center, width)``, ``"minmax"`` or None.

    >>> check_window([40, 400], name="csv"), check_window("minmax", name="csv")
    ((40.0, 400.0), 'minmax')
    >>> check_window([40, 0], name="csv")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cambench.benchmarks.core.errors.UserError: csv: window=[40, 0]: give [center, width] with ...
    """
    if window is None or window == "minmax":
        return window  # type: ignore[return-value]
    ok = isinstance(window, list | tuple) and len(window) == 2
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in window)
    if ok:
        center, width = float(window[0]), float(window[1])  # type: ignore[index]
        if np.isfinite(center) and np.isfinite(width) and width >= 1:
            return center, width
    raise UserError(
        f"{name}: window={window!r}: give [center, width] with a finite center and width >= 1 "
        "(DICOM's linear window), \"minmax\" for each image's own range, or leave it out for "
        "the window stored in each file"
    )


_EXTRA_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def extra_mask_specs(value: object, *, option: str, name: str) -> list[tuple[str, str]]:
    """A table of extra masks (``name -> where``: a column, pattern or folder) as pairs, in
    the order given; names are letters, digits and ``_`` (items carry ``mask_<name>``).

    >>> extra_mask_specs({"lungs": "lung_mask"}, option="extra_masks", name="csv")
    [('lungs', 'lung_mask')]
    """
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise UserError(
            f"{name}: {option}={value!r} must be a table of name -> where, e.g. "
            f'{option} = {{ lungs = "lungs" }}'
        )
    specs = []
    for key, where in value.items():
        if not isinstance(key, str) or not _EXTRA_NAME.match(key):
            raise UserError(
                f"{name}: {option} name {key!r} must be letters, digits and _ (items carry it "
                "as mask_<name>)"
            )
        if not isinstance(where, str | os.PathLike) or not str(where):
            raise UserError(f"{name}: {option} {key} = {where!r} must be a non-empty string")
        specs.append((key, str(where)))
    return specs


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


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() == DICOM_SUFFIX


def voi_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM's VOI window (PS3.3 C.11.2.1.2-3) on ``values`` with output range 0..255, as
    float64 (not rounded): LINEAR (width >= 1), LINEAR_EXACT or SIGMOID (width > 0).

    >>> np.rint(voi_window(np.array([-500.0, 0, 40, 239, 240]), 40, 400)).tolist()
    [0.0, 102.0, 128.0, 255.0, 255.0]
    >>> voi_window(np.array([9.0, 10, 11]), 10, 1).tolist()  # width 1: a threshold at c - 0.5
    [0.0, 255.0, 255.0]
    """
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # far below the centre: exp -> inf, output -> 0
            return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    elif function != "LINEAR_EXACT":
        raise ValueError(f"unknown VOI LUT function {function!r}")
    out = np.where(x > center + width / 2, 255.0, 0.0)
    between = (x > center - width / 2) & (x <= center + width / 2)
    if width > 0 and between.any():  # LINEAR with width 1 leaves no pixel between
        out[between] = ((x[between] - center) / width + 0.5) * 255.0
    return out


def _number(ds: Any, keyword: str, path: Path) -> float | None:
    """A numeric DICOM element's (first) value; None when absent or empty (DICOM's "no
    value"); a value that is not a number is a UserError naming the file."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]  # WindowCenter/WindowWidth may hold several: the first is used
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"DICOM file {str(path)!r}: {keyword} {value!r} is not a finite number")
    return number


def dicom_to_8bit(
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    function: str = "LINEAR",
    monochrome1: bool = False,
) -> np.ndarray:
    """A grey DICOM picture's stored values (H, W) as uint8 (H, W): rescale, window (or the
    image's min-max range when ``window`` is None), round, invert for MONOCHROME1 (the
    steps and formulas: this module's docstring).

    >>> stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    >>> dicom_to_8bit(stored, slope=1, intercept=-1024, window=(40, 400)).tolist()
    [[0, 87], [255, 255]]
    >>> dicom_to_8bit(stored, monochrome1=True).tolist()  # min-max, then inverted
    [[255, 193], [130, 0]]
    """
    x = np.asarray(stored, dtype=np.float64) * float(slope) + float(intercept)
    if window is not None:
        y = voi_window(x, window[0], window[1], function)
    else:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        y = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    y = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return 255 - y if monochrome1 else y


def _pydicom():
    try:
        import pydicom  # imported on use: only DICOM data needs it
    except ImportError:
        raise UserError("reading DICOM (.dcm) files needs pydicom: pip install pydicom") from None
    return pydicom


def read_dicom(path: Path, *, window: WindowSpec = None) -> Image.Image:
    """A DICOM file's picture as an 8-bit PIL image (``L`` for grey, ``RGB`` for colour);
    ``window`` as ``check_window`` returns it (the steps: this module's docstring)."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except FileNotFoundError:
        raise UserError(f"image file {str(path)!r} does not exist") from None
    except Exception as err:  # pydicom raises many kinds (no pixel data, no decoder, ...)
        raise UserError(
            f"cannot read DICOM file {str(path)!r} ({type(err).__name__}: {err}); the file is "
            "corrupt, not DICOM, holds no pixel data, or needs a decoder for its compression "
            "(see pydicom's pixel data handlers, e.g. pip install pylibjpeg): convert it to an "
            "uncompressed DICOM or a PNG, or remove it"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UserError(
            f"DICOM file {str(path)!r} holds {frames} frames; one picture per file is read: "
            "save each frame (slice) as its own file"
        )
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UserError(f"DICOM file {str(path)!r}: grey pixel data of shape {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"DICOM file {str(path)!r} holds NaN or infinite pixel values")
        chosen, function = None, "LINEAR"
        center, width = _number(ds, "WindowCenter", path), _number(ds, "WindowWidth", path)
        if isinstance(window, tuple):
            chosen = window
        elif window is None and center is not None and width is not None:
            chosen = (center, width)
            function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                raise UserError(
                    f"DICOM file {str(path)!r}: VOILUTFunction {function!r} is not known "
                    "(LINEAR, LINEAR_EXACT, SIGMOID); set window = [center, width] in the "
                    "suite entry to use a linear window instead"
                )
            if (width < 1) if function == "LINEAR" else (width <= 0):
                raise UserError(
                    f"DICOM file {str(path)!r}: stored window (center {center:g}, width "
                    f"{width:g}) is not usable (a {function} window needs a width > 0, and "
                    '>= 1 for LINEAR); set window = [center, width] or window = "minmax" in '
                    "the suite entry"
                )
        slope, intercept = _number(ds, "RescaleSlope", path), _number(ds, "RescaleIntercept", path)
        out = dicom_to_8bit(
            arr,
            slope=1.0 if slope is None else slope,
            intercept=0.0 if intercept is None else intercept,
            window=chosen,
            function=function,
            monochrome1=photometric == "MONOCHROME1",
        )
        return Image.fromarray(out)  # 2-D uint8 -> "L"
    # pydicom converts YBR colour to RGB when it decodes
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr))  # (H, W, 3) uint8 -> "RGB"
    raise UserError(
        f"DICOM file {str(path)!r} has PhotometricInterpretation {photometric!r} with "
        f"{ds.get('BitsAllocated', '?')}-bit samples; grey (MONOCHROME1/2) and 8-bit colour "
        "(RGB) are read: convert the file to one of these or to a PNG"
    )


def open_image(path: Path, *, window: WindowSpec = None) -> Image.Image:
    """Open and decode an image file fully, so a corrupt file fails here with its name;
    DICOM (``.dcm``) is read by ``read_dicom`` with ``window``."""
    if is_dicom(path):
        return read_dicom(path, window=window)
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
    return place_mask(lesion, size=size, fit=fit)


def place_mask(mask: np.ndarray, *, size: Size | None, fit: Fit = "stretch") -> np.ndarray:
    """A bool (H, W) mask at ``size``: resized with nearest neighbour (or padded with
    background) exactly as its image is."""
    binary = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    binary = _place(binary, size, fit, Image.Resampling.NEAREST)
    return np.asarray(binary, dtype=np.uint8) > 127


@dataclass(frozen=True)
class Box:
    """A bounding box in its image's native pixel coordinates (x: column, y: row; the max
    edges exclusive, floats allowed; the convention: this module's docstring); ``where``
    says where it was read, for messages."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    where: str = ""


def rasterize_boxes(boxes: Iterable[Box], hw: Size, *, name: str = "dataset") -> np.ndarray:
    """The union of ``boxes`` as a bool (H, W) mask of an image of native size ``hw``: each
    box covers rows ``floor(y_min)..ceil(y_max) - 1`` and columns ``floor(x_min)..ceil(x_max)
    - 1``, clipped to the image; a box wholly outside the image is a UserError.

    >>> rasterize_boxes([Box(1, 0, 3, 2), Box(2.5, 1.2, 4, 2.1)], (3, 5)).astype(int)
    array([[0, 1, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 1, 0]])
    """
    h, w = hw
    mask = np.zeros((h, w), dtype=bool)
    for box in boxes:
        r0, r1 = max(0, math.floor(box.y_min)), min(h, math.ceil(box.y_max))
        c0, c1 = max(0, math.floor(box.x_min)), min(w, math.ceil(box.x_max))
        if r1 <= r0 or c1 <= c0:
            raise UserError(
                f"{name}: box (x_min={box.x_min:g}, y_min={box.y_min:g}, x_max={box.x_max:g}, "
                f"y_max={box.y_max:g}) {box.where} lies wholly outside its image ({h}x{w}: x in "
                f"0..{w}, y in 0..{h}); check the coordinates (pixels of the native image, "
                "x the column) or remove the row"
            )
        mask[r0:r1, c0:c1] = True
    return mask


def read_image(
    path: Path,
    *,
    channels: int,
    size: Size | None,
    fit: Fit = "stretch",
    window: WindowSpec = None,
) -> tuple[np.ndarray, Size]:
    """Read an image file as uint8 (C, H, W) and its native (height, width); a corrupt file
    is a UserError naming it; ``window`` applies to DICOM files only."""
    img = open_image(path, window=window)
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
        if is_dicom(path):
            raise UserError(
                f"{name}: mask {str(path)!r} is a DICOM file; masks are read from image files "
                "(PNG): save it as a two-valued PNG (0 background, 255 lesion)"
            )
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
    """One labelled image file of a dataset, with its mask files.

    ``masks`` None means lesion masks are not read; a tuple (possibly of several files,
    whose union is the lesion) means they are. ``boxes`` (a tuple, possibly empty: no
    finding) gives the lesion mask as rectangles instead of files. ``organ_masks`` likewise
    for the organ mask; ``extra_masks`` pairs a name with its files, carried as
    ``mask_<name>``. Every record of one dataset reads the same kinds of mask.
    """

    id: str
    label: int
    image: Path
    masks: tuple[Path, ...] | None = None
    organ_masks: tuple[Path, ...] | None = None
    extra_masks: tuple[tuple[str, tuple[Path, ...]], ...] = ()
    boxes: tuple[Box, ...] | None = None

    def mask_files(self) -> list[Path]:
        """Every mask file the record reads."""
        extra = [p for _, paths in self.extra_masks for p in paths]
        return [*(self.masks or ()), *(self.organ_masks or ()), *extra]

    def kinds(self) -> tuple[str, ...]:
        """The item keys of the masks this record carries."""
        lesion = self.masks is not None or self.boxes is not None
        return (
            *(("mask",) if lesion else ()),
            *(("organ_mask",) if self.organ_masks is not None else ()),
            *(f"mask_{k}" for k, _ in self.extra_masks),
        )


def load_records(
    records: Sequence[Record],
    *,
    channels: int,
    size: Size | None,
    fit: Fit,
    name: str,
    window: WindowSpec = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images uint8 (N, C, H, W) and masks bool (N, H, W) of ``records``, keyed as items
    carry them: ``mask`` (lesion, from files or boxes), ``organ_mask``, ``mask_<name>``.

    Read once per process: the result is cached under the records (boxes included), the
    sizes and modification times of every image and mask file, and the reading options, so
    a changed file is read again and a failed read caches nothing.
    """
    records = tuple(records)
    files = [r.image for r in records] + [m for r in records for m in r.mask_files()]
    images, masks = _load_records_cached(
        records, file_fingerprint(files), channels, size, fit, name, window
    )
    return images, dict(masks)


@functools.lru_cache(maxsize=4)
def _load_records_cached(
    records: tuple[Record, ...],
    fingerprint: tuple[tuple[str, int, int], ...],
    channels: int,
    size: Size | None,
    fit: Fit,
    name: str,
    window: WindowSpec,
) -> tuple[np.ndarray, tuple[tuple[str, np.ndarray], ...]]:
    del fingerprint  # part of the cache key only

    def read_one(rec: Record) -> tuple[np.ndarray, Size, dict[str, np.ndarray]]:
        arr, hw = read_image(rec.image, channels=channels, size=size, fit=fit, window=window)
        where = dict(size=size, fit=fit, image_hw=hw, name=name)
        masks: dict[str, np.ndarray] = {}
        if rec.masks is not None:
            masks["mask"] = read_masks(rec.masks, **where)
        if rec.boxes is not None:
            boxes = rasterize_boxes(rec.boxes, hw, name=name)
            masks["mask"] = place_mask(boxes, size=size, fit=fit)
        if rec.organ_masks is not None:
            masks["organ_mask"] = read_masks(rec.organ_masks, **where)
        for key, paths in rec.extra_masks:
            masks[f"mask_{key}"] = read_masks(paths, **where)
        return arr, hw, masks

    assert all(r.masks is None or r.boxes is None for r in records), "mask files or boxes"
    assert len({r.kinds() for r in records}) <= 1, "the same kinds of mask for every record"
    # PIL decodes without the GIL: a few threads read a folder of PNGs/JPEGs ~2x faster
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        loaded = list(pool.map(read_one, records))
    images = [a for a, _, _ in loaded]
    native = [hw for _, hw, _ in loaded]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        sizes = sorted({f"{h}x{w}" for h, w in native})
        raise UserError(
            f"{name}: images have different sizes ({', '.join(sizes[:5])}, ...); pass "
            "image_size=N (or image_size=(H, W)) to resize them to one size"
        )
    stacked = np.stack(images) if images else np.zeros((0, channels, 1, 1), np.uint8)
    stacked.setflags(write=False)  # shared by every caller: nobody may change it in place
    masks = []
    for key in records[0].kinds() if records else ():
        arr = np.stack([m[key] for _, _, m in loaded])
        arr.setflags(write=False)
        masks.append((key, arr))
    return stacked, tuple(masks)
