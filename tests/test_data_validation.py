"""Validation of what real-data loaders read (datasets/_io.py, tabular.py, folder.py, base.py).

- mask files: nonzero is lesion whatever the encoding (0/1, 0/255, 16-bit, palette, colour),
  an all-zero mask is an empty lesion, grey-level masks are refused naming the file;
- CSV tables: image and mask paths that resolve outside the table's folder (absolute, ``..``,
  symlinks) are refused naming the row and the root unless ``allow_outside_root=True``;
- ``DatasetInfo.declares_masks``: what an entry with given options carries, read from no file;
- a CSV or folder dataset with one class is refused.

Every dataset is written here in ``tmp_path`` with PIL and numpy.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cambench.benchmarks.core.errors import UserError
from cambench.datasets import DATASETS, DatasetInfo
from cambench.datasets._io import binarize_mask, prepare_mask, read_masks

pytestmark = pytest.mark.datasets

H, W = 12, 16


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("CAMBENCH_DATA_ROOT", raising=False)


def make(dataset: str, split: str, /, **kw):
    return DATASETS.get(dataset).obj(split, **kw)


def lesion(top: int = 2, left: int = 3, bottom: int = 7, right: int = 9) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[top:bottom, left:right] = True
    return m


def palette_image(index: np.ndarray, colours: list[int]) -> Image.Image:
    img = Image.new("P", (index.shape[1], index.shape[0]))
    img.putpalette(colours + [0] * (768 - len(colours)))
    img.frombytes(index.astype(np.uint8).tobytes())
    return img


def encodings() -> dict[str, Image.Image]:
    """The same lesion in every binary encoding a mask file is found in."""
    m = lesion()
    u8 = m.astype(np.uint8)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[m] = (200, 0, 0)  # a red lesion: grey level 60, under the old > 127 threshold
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[m] = (255, 255, 255, 255)  # white lesion on a transparent black background
    return {
        "L 0/1": Image.fromarray(u8),
        "L 0/255": Image.fromarray(u8 * 255),
        "L 0/38": Image.fromarray(u8 * 38),
        "16-bit 0/1": Image.fromarray(m.astype(np.uint16)),
        "16-bit 0/65535": Image.fromarray(m.astype(np.uint16) * 65535),
        "1-bit": Image.fromarray(u8 * 255).convert("1"),
        "palette 0/1": palette_image(u8, [0, 0, 0, 128, 0, 0]),
        "RGB red": Image.fromarray(rgb),
        "RGBA": Image.fromarray(rgba),
    }


# --- masks: nonzero is lesion, grey levels refused --------------------------------------


@pytest.mark.parametrize("encoding", list(encodings()))
def test_binary_mask_in_any_encoding_reads_as_its_lesion(tmp_path, encoding):
    path = tmp_path / "m.png"
    encodings()[encoding].save(path)
    got = read_masks([path], size=None, image_hw=(H, W), name="csv")
    np.testing.assert_array_equal(got, lesion())
    # binarized before the nearest-neighbour resize: a 2x upscale doubles every pixel
    up = read_masks([path], size=(2 * H, 2 * W), image_hw=(H, W))
    np.testing.assert_array_equal(up, np.kron(lesion(), np.ones((2, 2), bool)))


def test_low_single_pixel_lesion_is_not_lost():
    # the old rule (grey > 127) read this as an empty mask
    values = np.zeros((H, W), np.uint8)
    values[5, 5] = 1
    got = prepare_mask(Image.fromarray(values), size=None, path="one.png")
    assert got.sum() == 1 and got[5, 5]


def test_all_zero_mask_is_an_empty_lesion_and_one_value_everywhere_a_full_one():
    empty = prepare_mask(Image.fromarray(np.zeros((H, W), np.uint8)), size=(6, 8))
    assert empty.shape == (6, 8) and not empty.any()
    full = prepare_mask(Image.fromarray(np.full((H, W), 255, np.uint8)), size=None)
    assert full.all()


@pytest.mark.parametrize(
    "values, shown",
    [
        (np.array([0, 128, 255]), "0, 128, 255"),  # anti-aliased edge
        (np.array([0, 1, 2]), "0, 1, 2"),  # a label map: organ 1, lesion 2
        (np.array([1, 2]), "1, 2"),  # two nonzero values, no background
    ],
)
def test_multi_level_mask_is_refused_naming_file_dataset_and_values(tmp_path, values, shown):
    grey = np.resize(values, H * W).reshape(H, W).astype(np.uint8)
    path = tmp_path / "grey_mask.png"
    Image.fromarray(grey).save(path)
    with pytest.raises(UserError) as err:
        read_masks([path], size=None, image_hw=(H, W), name="busi")
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and message.startswith("busi: ")
    assert f"{len(values)} distinct values ({shown})" in message
    assert "two-valued PNG" in message


def test_jpeg_mask_is_refused_listing_its_first_values(tmp_path):
    path = tmp_path / "lesion.jpg"
    Image.fromarray(lesion().astype(np.uint8) * 255).save(path, quality=75)
    with Image.open(path) as img:
        distinct = np.unique(np.asarray(img))
    assert len(distinct) > 2  # JPEG ringing made grey levels
    first = ", ".join(str(v) for v in distinct[:6])
    with pytest.raises(UserError) as err:
        read_masks([path], size=None, image_hw=(H, W), name="csv")
    assert f"lesion.jpg' holds {len(distinct)} distinct values ({first}" in str(err.value)


def test_mask_drawn_in_alpha_only_is_refused(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3][lesion()] = 255  # black everywhere, the shape only in alpha
    path = tmp_path / "alpha_mask.png"
    Image.fromarray(rgba).save(path)
    with pytest.raises(UserError, match=r"csv: mask '.*alpha_mask\.png' .*alpha channel only"):
        read_masks([path], size=None, image_hw=(H, W), name="csv")
    rgba[..., 3] = 255  # opaque black everywhere: an empty lesion saved as RGBA
    Image.fromarray(rgba).save(path)
    assert not read_masks([path], size=None, image_hw=(H, W)).any()


def test_array_masks_follow_the_same_rule():
    m = lesion()
    for arr in (m, m.astype(np.uint8), m * 7, m.astype(np.float32) * 0.5, m[..., None] * 3):
        np.testing.assert_array_equal(binarize_mask(arr), m)
    colour = np.zeros((H, W, 3), np.uint8)
    colour[m] = (0, 0, 9)
    np.testing.assert_array_equal(binarize_mask(colour), m)
    assert not binarize_mask(np.zeros((H, W), np.float64)).any()
    with pytest.raises(UserError, match=r"pcam: mask 'x\.npz\[3\]' holds 3 distinct values"):
        binarize_mask(m * 0.5 + lesion(0, 0, 1, 1) * 0.25, path="x.npz[3]", name="pcam")
    with pytest.raises(UserError, match=r"'y' holds NaN"):
        binarize_mask(np.where(m, np.nan, 0.0), path="y")
    colour[0, 0] = (9, 0, 0)
    with pytest.raises(UserError, match=r"\(0, 0, 0\), \(0, 0, 9\), \(9, 0, 0\)"):
        binarize_mask(colour)


def write_table_dataset(root: Path, mask_arrays: list[np.ndarray], *, labels=None) -> Path:
    """``root/table.csv`` over ``root/img/<k>.png`` and ``root/msk/<k>.png``."""
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    rows = []
    for k, mask in enumerate(mask_arrays):
        Image.new("RGB", (W, H), (10 * k, 50, 90)).save(root / "img" / f"{k}.png")
        Image.fromarray(mask).save(root / "msk" / f"{k}.png")
        label = k % 2 if labels is None else labels[k]
        rows.append({"image": f"img/{k}.png", "mask": f"msk/{k}.png", "label": label})
    pd.DataFrame(rows).to_csv(root / "table.csv", index=False)
    return root / "table.csv"


def test_csv_dataset_reads_0_1_masks_and_empty_ones(tmp_path):
    m = lesion().astype(np.uint8)
    arrays = [m if k % 3 else np.zeros_like(m) for k in range(6)]
    write_table_dataset(tmp_path, arrays)
    opts = dict(manifest="table.csv", mask_col="mask", fractions=(1, 0, 0), image_size=(24, 32))
    ds = make("csv", "train", root=tmp_path, **opts)
    want = np.kron(lesion(), np.ones((2, 2), bool))
    for i, rid in enumerate(ds.ids):
        expected = want if int(rid) % 3 else np.zeros_like(want)
        np.testing.assert_array_equal(ds.masks[i].numpy(), expected)
    grey = m * 255
    grey[0, 0] = 128
    Image.fromarray(grey).save(tmp_path / "msk" / "4.png")
    with pytest.raises(UserError, match=r"csv: mask '.*msk/4\.png' holds 3 distinct values"):
        make("csv", "train", root=tmp_path, **opts)


# --- CSV paths stay inside the data root ------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the data root with an image and a mask."""
    out = tmp_path / "elsewhere"
    out.mkdir()
    Image.new("RGB", (W, H), (1, 2, 3)).save(out / "x.png")
    Image.fromarray(lesion().astype(np.uint8)).save(out / "xm.png")
    return out


def table_with_row(root: Path, image: str, mask: str = "msk/0.png") -> Path:
    table = write_table_dataset(root, [lesion().astype(np.uint8)] * 4)
    frame = pd.read_csv(table, dtype=str)
    frame.loc[2, "image"] = image
    frame.loc[3, "mask"] = mask
    frame.to_csv(table, index=False)
    return table


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_csv_image_outside_the_root_is_refused_unless_allowed(tmp_path, outside, how):
    root = tmp_path / "data"
    root.mkdir()
    if how == "absolute":
        rel = str(outside / "x.png")
    elif how == "dotdot":
        rel = "img/../../elsewhere/x.png"
    else:
        os.symlink(outside / "x.png", root / "link.png")
        rel = "link.png"
    table = table_with_row(root, rel)
    opts = dict(manifest="table.csv", fractions=(1, 0, 0))
    with pytest.raises(UserError) as err:
        make("csv", "train", root=root, **opts)
    message = str(err.value)
    assert "\n" not in message
    assert f"image {rel!r} in row 4 of {str(table)!r}" in message
    assert str((outside / "x.png").resolve()) in message  # where it resolves
    assert f"outside the data root {str(root.resolve())!r}" in message
    assert "allow_outside_root = true" in message
    ds = make("csv", "train", root=root, allow_outside_root=True, **opts)
    assert len(ds) == 4 and Path(rel).stem in ds.ids


def test_csv_mask_outside_the_root_is_refused_unless_allowed(tmp_path, outside):
    root = tmp_path / "data"
    root.mkdir()
    table_with_row(root, "img/2.png", mask="../elsewhere/xm.png")
    opts = dict(root=root, manifest="table.csv", mask_col="mask", fractions=(1, 0, 0))
    with pytest.raises(UserError, match=r"mask '\.\./elsewhere/xm\.png' in row 5 of .*table\.csv"):
        make("csv", "train", **opts)
    ds = make("csv", "train", allow_outside_root=True, **opts)
    assert ds.masks is not None and all(bool(m.any()) for m in ds.masks)


def test_csv_paths_inside_the_root_pass_and_base_dir_decides(tmp_path, outside):
    root = tmp_path / "data"
    root.mkdir()
    table = table_with_row(root, "img/../img/2.png")  # '..' that stays inside is fine
    os.symlink(root / "img" / "0.png", root / "inner.png")  # a symlink inside, to inside
    frame = pd.read_csv(table, dtype=str)
    frame.loc[0, "image"] = "inner.png"
    frame.to_csv(table, index=False)
    assert len(make("csv", "train", root=root, manifest="table.csv", fractions=(1, 0, 0))) == 4

    # an absolute base_dir is a folder the user named: files under it are allowed
    pd.DataFrame({"image": ["x.png", "x.png"], "label": [0, 1], "id": ["a", "b"]}).to_csv(
        root / "far.csv", index=False
    )
    far = dict(manifest="far.csv", id_col="id", fractions=(1, 0, 0))
    assert len(make("csv", "train", root=root, base_dir=str(outside), **far)) == 2
    # a relative base_dir is a prefix inside the table's folder: '..' out of it is refused
    with pytest.raises(UserError, match=r"image 'x\.png' in row 2 .*outside the data root"):
        make("csv", "train", root=root, base_dir="../elsewhere", **far)


def test_csv_with_an_absolute_manifest_needs_no_root(tmp_path):
    table = write_table_dataset(tmp_path / "t", [lesion().astype(np.uint8)] * 4)
    ds = make("csv", "train", manifest=str(table), mask_col="mask", fractions=(1, 0, 0))
    assert len(ds) == 4 and ds.masks is not None
    assert ds.provenance["source"] == str(table)


# --- declares_masks: static, from the options ---------------------------------------------


@pytest.mark.parametrize(
    "name, options, want",
    [
        ("csv", {}, False),
        ("csv", {"manifest": "t.csv", "image_col": "file"}, False),
        ("csv", {"mask_col": "mask"}, True),
        ("csv", {"mask_pattern": "masks/{id}.png"}, True),
        ("csv", {"mask_col": None}, False),
        ("folder", {}, False),
        ("folder", {"masks": "sibling"}, True),
        ("folder", {"masks": "folder", "mask_dir": "lesions"}, True),
        ("folder", {"masks": None}, False),
        ("ph2", {}, True),
        ("ph2", {"masks": True}, True),
        ("ph2", {"masks": False}, False),
        ("busi", {}, True),
        ("busi", {"masks": False}, False),
        ("synth-lesion", {}, True),
        ("synth-lesion", {"n": 4}, True),
        ("synth-cxr", {}, True),
        ("pneumoniamnist", {}, False),
        ("pcam", {}, False),
    ],
)
def test_declares_masks(name, options, want):
    assert DATASETS.get(name).info.declares_masks(options) is want


@pytest.mark.parametrize("name", DATASETS.names())
def test_masks_option_names_options_of_the_callable(name):
    entry = DATASETS.get(name)
    option = entry.info.masks_option
    names = (option,) if isinstance(option, str) else option or ()
    params = inspect.signature(entry.obj).parameters
    for key in names:
        assert key in params and params[key].kind is inspect.Parameter.KEYWORD_ONLY, key
    hash(entry.info)  # frozen and hashable, as a registry record
    with pytest.raises(AttributeError):
        entry.info.masks_option = "x"  # type: ignore[misc]


def test_declares_masks_agrees_with_what_loads(tmp_path):
    write_table_dataset(tmp_path / "t", [lesion().astype(np.uint8)] * 4)
    for opts in ({}, {"mask_col": "mask"}, {"mask_pattern": "msk/{label}.png"}):
        full = {"manifest": "table.csv", "fractions": (1, 0, 0), **opts}
        ds = make("csv", "train", root=tmp_path / "t", **full)
        assert DATASETS.get("csv").info.declares_masks(full) is (ds.masks is not None), opts

    ph2 = tmp_path / "ph2"
    (ph2 / "images").mkdir(parents=True)
    (ph2 / "masks").mkdir()
    for k in range(6):
        Image.new("RGB", (W, H), (k, 0, 0)).save(ph2 / "images" / f"IMD{k:03d}.jpg")
        Image.fromarray(lesion().astype(np.uint8) * 255).save(
            ph2 / "masks" / f"IMD{k:03d}_lesion.png"
        )
    pd.DataFrame({"image_id": [f"IMD{k:03d}" for k in range(6)], "label": [0, 1, 2] * 2}).to_csv(
        ph2 / "labels.csv", index=False
    )
    for opts in ({}, {"masks": False}, {"masks": True}):
        full = {"fractions": (1, 0, 0), "image_size": 8, **opts}
        ds = make("ph2", "train", root=tmp_path, **full)
        assert DATASETS.get("ph2").info.declares_masks(full) is (ds.masks is not None), opts


def test_declares_masks_on_a_plain_info():
    assert DatasetInfo().declares_masks({"masks": True}) is False  # no masks option: masks
    assert DatasetInfo(masks=True).declares_masks({"masks": False}) is True
    two = DatasetInfo(masks=False, masks_option=("a", "b"))
    assert [two.declares_masks(o) for o in ({}, {"a": "x"}, {"b": "y"}, {"a": None})] == [
        False,
        True,
        True,
        False,
    ]


# --- at least two classes -------------------------------------------------------------------


def test_csv_with_one_class_is_refused_naming_the_table(tmp_path):
    table = write_table_dataset(tmp_path, [lesion().astype(np.uint8)] * 4, labels=["nevus"] * 4)
    with pytest.raises(UserError) as err:
        make("csv", "train", root=tmp_path, manifest="table.csv")
    message = str(err.value)
    assert str(table) in message and "needs at least two classes, found only 'nevus'" in message
    # class names naming two classes do not help when every row has the same one
    with pytest.raises(
        UserError, match=r"table\.csv' needs at least two classes, found only 'nevus'"
    ):
        make("csv", "train", root=table, class_names=["melanoma", "nevus"])


def test_folder_with_one_class_is_refused_naming_the_folder(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (W, H), (k, 0, 0)).save(tmp_path / "tree" / cls / f"{k}.png")
    with pytest.raises(
        UserError, match=r"tree' needs at least two classes, found only 'a'.*classes="
    ):
        make("folder", "train", root=tmp_path / "tree", classes=["a"])
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (W, H)).save(tmp_path / "one" / "only" / "0.png")
    with pytest.raises(UserError) as err:
        make("folder", "train", root=tmp_path / "one")
    assert str(tmp_path / "one") in str(err.value) and "found only 'only'" in str(err.value)
    assert len(make("folder", "train", root=tmp_path / "tree", fractions=(1, 0, 0))) == 6
