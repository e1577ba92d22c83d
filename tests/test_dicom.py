"""DICOM images in the ``folder`` and ``csv`` datasets (datasets/_io.py ``read_dicom``).

Files are written here with pydicom (explicit VR little endian, 12 bits stored in 16
allocated, signed and unsigned, 16-bit, rescale slope/intercept, stored windows, MONOCHROME1
and MONOCHROME2). Oracles: the VOI LUT formula of PS3.3 C.11.2.1.2 written out in this file,
checked in turn against pydicom's own ``apply_modality_lut`` + ``apply_windowing`` (scaled
from its output range to 0..255); the min-max stretch by hand; and, for resizing, the same
8-bit picture saved as a PNG and read by the PNG path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cambench.benchmarks.core.errors import UserError
from cambench.datasets import DATASETS

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_windowing  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

pytestmark = pytest.mark.datasets

H, W = 6, 8


def make(dataset: str, split: str, /, **kw):
    return DATASETS.get(dataset).obj(split, **kw)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("CAMBENCH_DATA_ROOT", raising=False)


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple | None = None,
    voi_function: str | None = None,
) -> Path:
    """One grey DICOM file holding ``stored`` (the stored values) and the given tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_voi(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2, output 0..255, unrounded: written out here, case by case."""
    out = np.empty_like(x, dtype=np.float64)
    for i, v in np.ndenumerate(x):
        if v <= c - 0.5 - (w - 1) / 2:
            out[i] = 0.0
        elif v > c - 0.5 + (w - 1) / 2:
            out[i] = 255.0
        else:
            out[i] = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return out


def pydicom_voi(path: Path) -> np.ndarray:
    """pydicom's modality LUT and stored window, scaled from its output range to 0..255."""
    ds = pydicom.dcmread(path)
    bits = int(ds.BitsStored)
    lo, hi = (
        (0, 2**bits - 1)
        if ds.PixelRepresentation == 0
        else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    )
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    lo, hi = lo * slope + intercept, hi * slope + intercept
    y = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    return (y - lo) / (hi - lo) * 255.0


def minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min()) * 255.0


def to8(y: np.ndarray, monochrome1: bool = False) -> np.ndarray:
    out = np.rint(y).astype(np.uint8)
    return 255 - out if monochrome1 else out


# A CT-like 12-bit picture: stored 0..4095, rescaled by intercept -1024; window 40/400 puts
# the edges at x = -160 (stored 864: the last 0) and x = 239.5 (stored 1263: 255, and 1264)
CT = np.array(
    [0, 500, 863, 864, 865, 866, 900, 1000, 1024, 1063, 1064, 1100, 1200, 1262, 1263, 1264]
    + list(range(1270, 4095, 80))[: H * W - 17]
    + [4095],
    dtype=np.uint16,
).reshape(H, W)
# a signed 16-bit picture spanning the full range
SIGNED = np.linspace(-32768, 32767, H * W).round().astype(np.int16).reshape(H, W)
# signed 12-bit: -2048..2047 stored in 16 bits
SIGNED12 = np.linspace(-2048, 2047, H * W).round().astype(np.int16).reshape(H, W)
# unsigned 16-bit, no window stored: min-max
WIDE = np.linspace(100, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def write_tree(base: Path) -> dict[str, dict]:
    """A class-per-folder tree of DICOM files; returns id -> (file, expected uint8 (H, W))."""
    ct = CT.astype(np.float64) - 1024
    signed = SIGNED.astype(np.float64) * 2 - 100
    files = {
        "ct/ct_m2": (
            dict(rescale=(1, -1024), window=(40, 400)),
            CT,
            to8(linear_voi(ct, 40, 400)),
        ),
        "ct/ct_m1": (
            dict(rescale=(1, -1024), window=(40, 400), photometric="MONOCHROME1"),
            CT,
            to8(linear_voi(ct, 40, 400), monochrome1=True),
        ),
        "ct/ct_nowindow": (dict(rescale=(1, -1024)), CT, to8(minmax(ct))),
        "xr/signed16": (
            # several stored windows: the first is used
            dict(bits_stored=16, signed=True, rescale=(2, -100), window=([0, 5000], [30000, 10])),
            SIGNED,
            to8(linear_voi(signed, 0, 30000)),
        ),
        "xr/signed12_m1": (
            dict(signed=True, window=(100, 1001), photometric="MONOCHROME1"),
            SIGNED12,
            to8(linear_voi(SIGNED12.astype(np.float64), 100, 1001), monochrome1=True),
        ),
        "xr/wide16_m1": (
            dict(bits_stored=16, photometric="MONOCHROME1"),
            WIDE,
            to8(minmax(WIDE), monochrome1=True),
        ),
    }
    out = {}
    for rid, (tags, stored, want) in files.items():
        path = write_dicom(base / f"{rid}.dcm", stored, **tags)
        out[rid] = {"path": path, "want": want, "stored": stored, "tags": tags}
    return out


def items_by_id(ds) -> dict[str, np.ndarray]:
    """id -> the item's grey image as uint8 (H, W) (images are uint8 / 255)."""
    out = {}
    for i in range(len(ds)):
        item = ds[i]
        out[item["id"]] = np.rint(item["image"][0].numpy() * 255).astype(np.uint8)
    return out


def test_the_oracle_agrees_with_pydicom(tmp_path):
    truth = write_tree(tmp_path / "tree")
    for rid, t in truth.items():
        if "window" not in t["tags"]:
            continue
        mono1 = t["tags"].get("photometric") == "MONOCHROME1"
        ref = pydicom_voi(t["path"])
        np.testing.assert_allclose(
            to8(ref, mono1).astype(int), t["want"].astype(int), atol=0, rtol=0, err_msg=rid
        )
    # the boundaries of the CT window, by hand: x = -160 -> 0, -159 -> 0.64 -> 1, 239 -> 255
    np.testing.assert_allclose(
        linear_voi(np.array([-160.0, -159.0, 39.5, 239.0, 240.0]), 40, 400),
        [0, 0.6390977443609, 127.5, 255, 255],
    )


def test_a_dicom_folder_is_read_with_windowing_and_monochrome1(tmp_path):
    truth = write_tree(tmp_path / "tree")
    ds = make("folder", "train", root=tmp_path / "tree", channels=1, fractions=(1, 0, 0))
    assert ds.class_names == ("ct", "xr") and ds.images.shape[1:] == (1, H, W)
    got = items_by_id(ds)
    assert sorted(got) == sorted(truth)
    for rid, t in truth.items():
        np.testing.assert_array_equal(got[rid], t["want"], err_msg=rid)
    # MONOCHROME1 is the inverse of the same picture as MONOCHROME2
    np.testing.assert_array_equal(got["ct/ct_m1"], 255 - got["ct/ct_m2"])
    rgb = make("folder", "train", root=tmp_path / "tree", channels=3, fractions=(1, 0, 0))
    for i in range(len(rgb)):
        image = rgb[i]["image"]
        assert image.shape == (3, H, W) and (image == image[:1]).all()  # grey repeated


def test_the_window_option_overrides_the_stored_one(tmp_path):
    truth = write_tree(tmp_path / "tree")
    opts = dict(root=tmp_path / "tree", channels=1, fractions=(1, 0, 0))
    got = items_by_id(make("folder", "train", window=[500, 2000], **opts))
    for rid, t in truth.items():
        slope, intercept = t["tags"].get("rescale", (1, 0))
        x = t["stored"].astype(np.float64) * slope + intercept
        mono1 = t["tags"].get("photometric") == "MONOCHROME1"
        np.testing.assert_array_equal(got[rid], to8(linear_voi(x, 500, 2000), mono1), rid)
    got = items_by_id(make("folder", "train", window="minmax", **opts))
    for rid, t in truth.items():
        mono1 = t["tags"].get("photometric") == "MONOCHROME1"
        np.testing.assert_array_equal(got[rid], to8(minmax(t["stored"]), mono1), rid)
    # a window of width 1 is a threshold at c - 0.5
    got = items_by_id(make("folder", "train", window=(1064.5 - 1024, 1), **opts))
    np.testing.assert_array_equal(got["ct/ct_m2"], np.where(CT > 1064, 255, 0).astype(np.uint8))


def test_other_stored_voi_functions(tmp_path):
    x = CT.astype(np.float64) - 1024
    exact = write_dicom(
        tmp_path / "a" / "exact.dcm",
        CT,
        rescale=(1, -1024),
        window=(40, 400),
        voi_function="LINEAR_EXACT",
    )
    sigmoid = write_dicom(
        tmp_path / "b" / "sigmoid.dcm",
        CT,
        rescale=(1, -1024),
        window=(40, 400),
        voi_function="SIGMOID",
    )
    got = items_by_id(make("folder", "train", root=tmp_path, channels=1, fractions=(1, 0, 0)))
    want_exact = np.clip(((x - 40) / 400 + 0.5) * 255, 0, 255)
    np.testing.assert_array_equal(got["a/exact"], to8(want_exact))
    np.testing.assert_array_equal(got["a/exact"], to8(pydicom_voi(exact)))
    want_sigmoid = 255 / (1 + np.exp(-4 * (x - 40) / 400))
    np.testing.assert_array_equal(got["b/sigmoid"], to8(want_sigmoid))
    np.testing.assert_array_equal(got["b/sigmoid"], to8(pydicom_voi(sigmoid)))


def test_dicom_resizes_as_the_same_picture_saved_as_png(tmp_path):
    truth = write_tree(tmp_path / "dcm")
    for rid, t in truth.items():
        (tmp_path / "png" / rid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(t["want"]).save(tmp_path / "png" / f"{rid}.png")
    for fit, size in (("stretch", (15, 11)), ("pad", 20)):
        kw = dict(channels=1, fractions=(1, 0, 0), image_size=size, fit=fit)
        a = make("folder", "train", root=tmp_path / "dcm", **kw)
        b = make("folder", "train", root=tmp_path / "png", **kw)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.images.numpy(), b.images.numpy())


def test_a_csv_of_dicom_files_with_masks_and_a_window(tmp_path):
    truth = write_tree(tmp_path / "tree")
    rows = []
    for k, rid in enumerate(sorted(truth)):
        mask = np.zeros((H, W), np.uint8)
        mask[1 : 2 + k % 4, 2:5] = 255
        Image.fromarray(mask).save(tmp_path / "tree" / f"{rid}_lesion.png")
        rows.append({"file": f"{rid}.dcm", "mask": f"{rid}_lesion.png", "label": rid.split("/")[0]})
    pd.DataFrame(rows).to_csv(tmp_path / "tree" / "table.csv", index=False)
    opts = dict(root=tmp_path / "tree", manifest="table.csv", image_col="file", channels=1)
    ds = make("csv", "train", mask_col="mask", fractions=(1, 0, 0), **opts)
    got = items_by_id(ds)
    for rid, t in truth.items():
        stem = rid.split("/")[1]
        np.testing.assert_array_equal(got[stem], t["want"], err_msg=rid)
        k = sorted(truth).index(rid)
        assert int(ds.masks[ds.ids.index(stem)].sum()) == (1 + k % 4) * 3
    windowed = items_by_id(make("csv", "train", window=[0, 100], fractions=(1, 0, 0), **opts))
    x = CT.astype(np.float64) - 1024
    np.testing.assert_array_equal(windowed["ct_m2"], to8(linear_voi(x, 0, 100)))


def test_rgb_dicom_is_read_as_colour(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, np.arange(W) * 20, 7
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("c.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = H, W, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        ds.save_as(tmp_path / cls / "c.DCM", enforce_file_format=True)  # any case of .dcm
    got = make("folder", "train", root=tmp_path, fractions=(1, 0, 0))
    np.testing.assert_array_equal(
        np.rint(got.images[0].numpy() * 255).astype(np.uint8), rgb.transpose(2, 0, 1)
    )


def test_dicom_errors_name_the_file_and_the_fix(tmp_path, monkeypatch):
    truth = write_tree(tmp_path / "tree")
    opts = dict(root=tmp_path / "tree", fractions=(1, 0, 0))
    (tmp_path / "tree" / "xr" / "broken.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(UserError, match=r"cannot read DICOM file '.*broken\.dcm'"):
        make("folder", "train", **opts)
    (tmp_path / "tree" / "xr" / "broken.dcm").unlink()

    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(UserError, match=r"needs pydicom: pip install pydicom"):
        make("folder", "train", **opts)
    monkeypatch.delitem(sys.modules, "pydicom")

    bad = write_dicom(tmp_path / "tree" / "xr" / "zero.dcm", CT, window=(40, 0))
    with pytest.raises(UserError, match=r"zero\.dcm.*stored window.*not usable.*window ="):
        make("folder", "train", **opts)
    ok = items_by_id(make("folder", "train", window="minmax", channels=1, **opts))
    np.testing.assert_array_equal(ok["xr/zero"], to8(minmax(CT)))  # the option overrides it
    bad.unlink()

    frames = write_dicom(tmp_path / "tree" / "xr" / "cine.dcm", np.concatenate([CT, CT]))
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames, ds.Rows = 2, H
    ds.save_as(frames)
    with pytest.raises(UserError, match=r"cine\.dcm' holds 2 frames"):
        make("folder", "train", **opts)
    frames.unlink()

    for bad_window in ([40], [40, 0.5], "auto", [float("nan"), 10]):
        with pytest.raises(UserError, match=r"folder: window=.*give \[center, width\]"):
            make("folder", "train", window=bad_window, **opts)

    for rid in truth:  # masks stay image files: a DICOM mask is refused, not windowed
        write_dicom(tmp_path / "masks" / f"{rid}.dcm", np.where(CT > 2000, 1, 0))
    with pytest.raises(UserError, match=r"ct_m\d\.dcm' is a DICOM file; masks are read from"):
        make("folder", "train", masks="folder", mask_dir=tmp_path / "masks", **opts)
