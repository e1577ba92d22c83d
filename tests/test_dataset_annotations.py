"""Several masks and bounding boxes in the ``csv`` and ``folder`` datasets (tabular.py,
folder.py, _io.py): lesion, organ and named extra masks, and boxes rasterized as the lesion
mask.

Oracles: rectangles drawn here with numpy slicing (at the native size, then doubled with
``np.kron`` for an exact 2x nearest-neighbour upscale, or padded by hand for ``fit="pad"``),
and box masks written out pixel by pixel from the box convention (max edges exclusive,
floats rounded outward, clipped), never with the loader's own code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cambench.benchmarks.core.checks import check_options
from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.plan import needs_reason
from cambench.benchmarks.engine.suite import Component
from cambench.datasets import DATASETS

pytestmark = pytest.mark.datasets

H, W = 12, 16  # native size of the images written here
TWICE = (2 * H, 2 * W)


def make(dataset: str, split: str, /, **kw):
    return DATASETS.get(dataset).obj(split, **kw)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("CAMBENCH_DATA_ROOT", raising=False)


def rect(top: int, left: int, bottom: int, right: int, hw=(H, W)) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[top:bottom, left:right] = True
    return m


def doubled(mask: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscaling by exactly 2: each pixel becomes a 2x2 block."""
    return np.kron(mask, np.ones((2, 2), bool))


def save_mask(path: Path, mask: np.ndarray, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * value).save(path)


def every_item(**kw) -> dict[str, dict]:
    """id -> item of a csv dataset loaded whole (every image in the train split)."""
    ds = make("csv", "train", fractions=(1, 0, 0), **kw)
    return {ds[i]["id"]: ds[i] for i in range(len(ds))}


# --- csv: lesion, organ and named masks ---------------------------------------------------


def write_masked_table(base: Path, n: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """``n`` grey images with lesion, organ, lung and heart masks; returns id -> masks."""
    truth, rows = {}, []
    for k in range(n):
        rid = f"case{k:02d}"
        (base / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W), 10 * k, np.uint8)).save(base / "img" / f"{rid}.png")
        masks = {
            "mask": rect(k % 4, 1 + k % 5, 4 + k % 4, 7 + k % 5),
            "organ_mask": rect(1, 2, 11, 14 - k % 3),
            "mask_lungs": rect(2, 1 + k % 2, 9, 7) | rect(2, 9, 9, 15 - k % 2),
            "mask_heart": rect(5, 6, 8 + k % 3, 10),
        }
        if k == 0:
            masks["mask"] = np.zeros((H, W), bool)  # a normal image: an all-zero mask file
        save_mask(base / "lesion" / f"{rid}.png", masks["mask"])
        # the organ masks are 0/1, the lungs 0/38: nonzero is the structure in every encoding
        save_mask(base / "organ" / f"{rid}.png", masks["organ_mask"], value=1)
        save_mask(base / "lungs" / f"{rid}_lungs.png", masks["mask_lungs"], value=38)
        save_mask(base / "heart" / f"{rid}.png", masks["mask_heart"])
        rows.append(
            {
                "image_id": rid,
                "file": f"img/{rid}.png",
                "label": k % 2,
                "lesion": f"lesion/{rid}.png",
                "organ": f"organ/{rid}.png",
                "lung_mask": f"lungs/{rid}_lungs.png",
            }
        )
        truth[rid] = masks
    pd.DataFrame(rows).to_csv(base / "table.csv", index=False)
    return truth


MASKED = dict(
    manifest="table.csv",
    image_col="file",
    id_col="image_id",
    mask_col="lesion",
    organ_mask_col="organ",
    extra_masks={"lungs": "lung_mask", "heart": "heart/{image_id}.png"},
)


def test_csv_lesion_organ_and_named_masks_are_the_drawn_shapes(tmp_path):
    truth = write_masked_table(tmp_path)
    items = every_item(root=tmp_path, image_size=TWICE, channels=1, **MASKED)
    assert sorted(items) == sorted(truth)
    keys = ("mask", "organ_mask", "mask_lungs", "mask_heart")
    for rid, item in items.items():
        assert set(item) == {"image", "label", "id", *keys}
        for key in keys:
            assert item[key].dtype == torch_bool() and tuple(item[key].shape) == TWICE
            np.testing.assert_array_equal(item[key].numpy(), doubled(truth[rid][key]), rid + key)
    ds = make("csv", "train", root=tmp_path, image_size=TWICE, **MASKED)
    assert set(ds.extras) == {"mask_lungs", "mask_heart"}
    assert ds.organ_masks is not None and ds.organ_masks.shape == (len(ds), *TWICE)


def torch_bool():
    import torch

    return torch.bool


def test_csv_masks_are_padded_like_their_image(tmp_path):
    truth = write_masked_table(tmp_path)
    # 12x16 into 32x32: scale 2 to 24x32, then (32 - 24) // 2 = 4 background rows on top
    items = every_item(root=tmp_path, image_size=32, fit="pad", channels=1, **MASKED)
    for rid, item in items.items():
        for key in ("mask", "organ_mask", "mask_lungs"):
            want = np.zeros((32, 32), bool)
            want[4:28] = doubled(truth[rid][key])
            np.testing.assert_array_equal(item[key].numpy(), want, rid + key)


def test_csv_masks_at_the_native_size_and_by_pattern(tmp_path):
    truth = write_masked_table(tmp_path)
    items = every_item(
        root=tmp_path,
        manifest="table.csv",
        image_col="file",
        organ_mask_pattern="organ/{image_id}.png",
        id_col="image_id",
    )
    for rid, item in items.items():
        assert "mask" not in item and "mask_lungs" not in item
        np.testing.assert_array_equal(item["organ_mask"].numpy(), truth[rid]["organ_mask"])


def test_csv_mask_errors_name_the_column_row_and_file(tmp_path):
    write_masked_table(tmp_path)
    base = dict(root=tmp_path, manifest="table.csv", image_col="file", id_col="image_id")
    with pytest.raises(UserError, match=r"no column 'organs'.*columns are: image_id, file"):
        make("csv", "train", **base, organ_mask_col="organs")
    with pytest.raises(UserError, match=r"no column 'lung'"):
        make("csv", "train", **base, extra_masks={"lungs": "lung"})
    with pytest.raises(UserError, match=r"either organ_mask_col or organ_mask_pattern"):
        make("csv", "train", **base, organ_mask_col="organ", organ_mask_pattern="o/{file}")
    with pytest.raises(UserError, match=r"extra_masks name 'left lung'.*letters, digits"):
        make("csv", "train", **base, extra_masks={"left lung": "lung_mask"})
    with pytest.raises(UserError, match=r"extra_masks lungs = 3"):
        make("csv", "train", **base, extra_masks={"lungs": 3})
    (tmp_path / "organ" / "case05.png").unlink()
    with pytest.raises(UserError, match=r"case05\.png' has no organ mask.*row 7 of"):
        make("csv", "train", **base, organ_mask_col="organ")
    save_mask(tmp_path / "organ" / "case05.png", rect(0, 0, 3, 3, hw=(H, W + 1)))
    with pytest.raises(UserError, match=r"case05\.png' is 12x17 but its image is 12x16"):
        make("csv", "train", **base, organ_mask_col="organ", fractions=(1, 0, 0))
    grey = np.zeros((H, W), np.uint8)
    grey[2:5, 2:5], grey[6:8, 6:9] = 255, 128  # two structures in one label map
    Image.fromarray(grey).save(tmp_path / "lungs" / "case03_lungs.png")
    with pytest.raises(UserError, match=r"case03_lungs\.png' holds 3 distinct values"):
        make("csv", "train", **base, extra_masks={"lungs": "lung_mask"}, fractions=(1, 0, 0))
    with pytest.raises(UserError, match=r"lungs mask '\.\./x\.png' in row 2.*outside the data"):
        pd.DataFrame({"file": ["img/case00.png", "img/case01.png"], "label": [0, 1]}).assign(
            image_id=["case00", "case01"], lung=["../x.png", "../x.png"]
        ).to_csv(tmp_path / "t2.csv", index=False)
        make("csv", "train", **{**base, "manifest": "t2.csv"}, extra_masks={"lungs": "lung"})


def test_a_changed_organ_mask_is_read_again(tmp_path):
    truth = write_masked_table(tmp_path)
    opts = dict(root=tmp_path, fractions=(1, 0, 0), **MASKED)
    first = make("csv", "train", **opts)
    k = first.ids.index("case02")
    np.testing.assert_array_equal(first.organ_masks[k].numpy(), truth["case02"]["organ_mask"])
    path = tmp_path / "organ" / "case02.png"
    stamp = path.stat().st_mtime_ns
    save_mask(path, rect(0, 0, 2, 2), value=1)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a new mtime even on coarse clocks
    again = make("csv", "train", **opts)
    np.testing.assert_array_equal(again.organ_masks[k].numpy(), rect(0, 0, 2, 2))
    save_mask(tmp_path / "heart" / "case02.png", rect(0, 0, 1, 1))
    hp = tmp_path / "heart" / "case02.png"
    os.utime(hp, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))
    third = make("csv", "train", **opts)
    np.testing.assert_array_equal(third.extras["mask_heart"][k].numpy(), rect(0, 0, 1, 1))


# --- csv: bounding boxes --------------------------------------------------------------------

# id -> (x_min, y_min, x_max, y_max) rows, and the native mask each gives, written out by
# hand from the convention: pixel (r, c) covers [c, c+1) x [r, r+1), max edges exclusive,
# a box covers every pixel it touches, clipped to the 12x16 image
BOXES = {
    "case00": [],  # no row: no finding
    "case01": [(2, 3, 5, 7)],  # columns 2..4, rows 3..6
    "case02": [(0, 0, 1, 1), (10, 8, 16, 12)],  # one pixel, and a box on the corner
    "case03": [(1.5, 2.2, 3.5, 4.0), (2.0, 3.0, 6.0, 4.0)],  # floats, overlapping
    "case04": [(-3, -2, 2, 1), (14.5, 10.5, 30, 20)],  # clipped at every side
    "case05": [(7, 0, 8, 12)],  # one column, full height
}
BOX_TRUTH = {
    "case00": [],
    "case01": [(slice(3, 7), slice(2, 5))],
    "case02": [(slice(0, 1), slice(0, 1)), (slice(8, 12), slice(10, 16))],
    "case03": [(slice(2, 4), slice(1, 4)), (slice(3, 4), slice(2, 6))],
    "case04": [(slice(0, 1), slice(0, 2)), (slice(10, 12), slice(14, 16))],
    "case05": [(slice(0, 12), slice(7, 8))],
}


def box_truth(rid: str) -> np.ndarray:
    m = np.zeros((H, W), bool)
    for rows, cols in BOX_TRUTH[rid]:
        m[rows, cols] = True
    return m


def write_box_table(base: Path, *, id_col: str = "image_id", empty_row: bool = True) -> None:
    rows, boxes = [], []
    for k, rid in enumerate(BOXES):
        (base / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W), 20 * k, np.uint8)).save(base / "img" / f"{rid}.png")
        rows.append({"image_id": rid, "file": f"img/{rid}.png", "label": k % 2})
        for x0, y0, x1, y1 in BOXES[rid]:
            boxes.append({id_col: rid, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1})
    if empty_row:  # an image listed with four empty coordinates: no finding either
        boxes.append({id_col: "case00", "x_min": "", "y_min": "", "x_max": "", "y_max": ""})
    pd.DataFrame(rows).to_csv(base / "table.csv", index=False)
    pd.DataFrame(boxes).to_csv(base / "boxes.csv", index=False)


def test_boxes_become_the_lesion_mask(tmp_path):
    write_box_table(tmp_path)
    opts = dict(root=tmp_path, manifest="table.csv", image_col="file", boxes="boxes.csv")
    native = every_item(id_col="image_id", **opts)
    assert sorted(native) == sorted(BOXES)
    for rid, item in native.items():
        np.testing.assert_array_equal(item["mask"].numpy(), box_truth(rid), rid)
    assert not native["case00"]["mask"].any()
    resized = every_item(id_col="image_id", image_size=TWICE, **opts)
    for rid, item in resized.items():
        np.testing.assert_array_equal(item["mask"].numpy(), doubled(box_truth(rid)), rid)
    padded = every_item(id_col="image_id", image_size=32, fit="pad", **opts)
    for rid, item in padded.items():
        want = np.zeros((32, 32), bool)
        want[4:28] = doubled(box_truth(rid))
        np.testing.assert_array_equal(item["mask"].numpy(), want, rid)


def test_box_ids_default_to_the_image_stem_or_a_named_column(tmp_path):
    write_box_table(tmp_path / "a", id_col="id")  # no id_col: ids are stems, column "id"
    items = every_item(
        root=tmp_path / "a", manifest="table.csv", image_col="file", boxes="boxes.csv"
    )
    for rid, item in items.items():
        np.testing.assert_array_equal(item["mask"].numpy(), box_truth(rid), rid)
    write_box_table(tmp_path / "b", id_col="study")
    items = every_item(
        root=tmp_path / "b",
        manifest="table.csv",
        image_col="file",
        id_col="image_id",
        boxes="boxes.csv",
        boxes_id_col="study",
    )
    for rid, item in items.items():
        np.testing.assert_array_equal(item["mask"].numpy(), box_truth(rid), rid)


def test_boxes_with_organ_and_named_masks(tmp_path):
    write_box_table(tmp_path)
    table = pd.read_csv(tmp_path / "table.csv", dtype=str)
    for rid in table["image_id"]:
        save_mask(tmp_path / "organ" / f"{rid}.png", rect(1, 1, 11, 15))
    table.assign(organ=[f"organ/{r}.png" for r in table["image_id"]]).to_csv(
        tmp_path / "table.csv", index=False
    )
    items = every_item(
        root=tmp_path,
        manifest="table.csv",
        image_col="file",
        id_col="image_id",
        boxes="boxes.csv",
        organ_mask_col="organ",
        extra_masks={"body": "organ"},
    )
    for rid, item in items.items():
        np.testing.assert_array_equal(item["mask"].numpy(), box_truth(rid))
        np.testing.assert_array_equal(item["organ_mask"].numpy(), rect(1, 1, 11, 15))
        np.testing.assert_array_equal(item["mask_body"].numpy(), rect(1, 1, 11, 15))


def box_error(tmp_path: Path, rows: list[dict], **kw) -> str:
    pd.DataFrame(rows).to_csv(tmp_path / "bad.csv", index=False)
    opts = dict(root=tmp_path, manifest="table.csv", image_col="file", id_col="image_id")
    with pytest.raises(UserError) as err:
        make("csv", "train", **{**opts, "boxes": "bad.csv", "fractions": (1, 0, 0), **kw})
    return str(err.value)


def box(rid="case01", x0=1, y0=1, x1=3, y1=3) -> dict:
    return {"image_id": rid, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}


def test_box_errors_name_the_row_and_the_fix(tmp_path):
    write_box_table(tmp_path)
    message = box_error(tmp_path, [box(), box(x0=16, x1=20)])
    assert "lies wholly outside its image (12x16" in message and "row 3 of" in message
    assert "bad.csv" in message
    message = box_error(tmp_path, [box(), box(y0=-5, y1=0)])
    assert "wholly outside" in message and "row 3" in message
    message = box_error(tmp_path, [box(x0=5, x1=5)])
    assert "row 2 of" in message and "x_max must exceed x_min" in message
    message = box_error(tmp_path, [box(y0=4, y1=2)])
    assert "y_max exceed y_min" in message
    message = box_error(tmp_path, [box(), box(rid="case99"), box(rid="scan7")])
    assert "match no image: 'case99', 'scan7'" in message
    message = box_error(tmp_path, [box(x0="left")])
    assert "row 2" in message and "each must be a number" in message
    message = box_error(tmp_path, [box(x0="")])
    assert "row 2" in message and "each must be a number" in message
    message = box_error(tmp_path, [{"image_id": "case01", "x": 1, "y": 1, "w": 2, "h": 2}])
    assert "no column 'x_min', 'y_min', 'x_max', 'y_max'" in message
    message = box_error(tmp_path, [box()], mask_col="file")
    assert "either boxes" in message and "mask_col/mask_pattern" in message
    message = box_error(tmp_path, [box()], boxes="nowhere.csv")
    assert "boxes='nowhere.csv'" in message and "does not exist" in message
    message = box_error(tmp_path, [box()], boxes="../boxes.csv")
    assert "outside the data root" in message and "allow_outside_root" in message
    message = box_error(tmp_path, [box()], boxes=None, boxes_id_col="study")
    assert "boxes_id_col='study' is given without boxes" in message


# --- folder: organ and named mask trees ------------------------------------------------------


def test_folder_organ_and_named_mask_trees(tmp_path):
    truth = {}
    for cls in ("a", "b"):
        for k in range(4):
            stem = f"{cls}{k}"
            (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W), 30 * k, np.uint8)).save(
                tmp_path / "img" / cls / f"{stem}.png"
            )
            lesion, organ, lungs = (
                rect(k, k, k + 3, k + 5),
                rect(1, 1, 10, 10 + k),
                rect(2, 3, 6, 12),
            )
            save_mask(tmp_path / "lesions" / cls / f"{stem}.png", lesion)
            save_mask(tmp_path / "organs" / cls / f"{stem}_mask.png", organ)  # _mask names too
            save_mask(tmp_path / "lungs" / cls / f"{stem}.png", lungs)
            truth[f"{cls}/{stem}"] = {"mask": lesion, "organ_mask": organ, "mask_lungs": lungs}
    opts = dict(
        root=tmp_path,
        subdir="img",
        masks="folder",
        mask_dir="lesions",
        organ_mask_dir="organs",
        extra_mask_dirs={"lungs": str(tmp_path / "lungs")},  # absolute works too
        image_size=TWICE,
        channels=1,
        fractions=(1, 0, 0),
    )
    ds = make("folder", "train", **opts)
    assert sorted(ds.ids) == sorted(truth) and set(ds.extras) == {"mask_lungs"}
    for i in range(len(ds)):
        item = ds[i]
        for key, want in truth[item["id"]].items():
            np.testing.assert_array_equal(item[key].numpy(), doubled(want), item["id"] + key)
    only_organs = make("folder", "train", **{**opts, "masks": None, "extra_mask_dirs": None})
    assert only_organs.masks is None and only_organs.extras == {}
    assert only_organs.organ_masks is not None
    (tmp_path / "organs" / "b" / "b2_mask.png").unlink()
    with pytest.raises(UserError, match=r"b2\.png' has no organ mask; expected b2\.png"):
        make("folder", "train", **opts)
    with pytest.raises(UserError, match=r"organ_mask_dir must be a folder.*nowhere"):
        make("folder", "train", **{**opts, "organ_mask_dir": "nowhere"})
    (tmp_path / "lungs" / "a" / "a1.png").unlink()
    with pytest.raises(UserError, match=r"a1\.png' has no lungs mask"):
        make("folder", "train", **{**opts, "organ_mask_dir": None})


# --- what an entry declares, and the suite's type check ----------------------------------------


@pytest.mark.parametrize(
    "name, options, masks, organ",
    [
        ("csv", {}, False, False),
        ("csv", {"boxes": "boxes.csv"}, True, False),
        ("csv", {"organ_mask_col": "organ"}, False, True),
        ("csv", {"organ_mask_pattern": "o/{id}.png", "mask_col": "m"}, True, True),
        ("csv", {"organ_mask_col": None}, False, False),
        ("csv", {"extra_masks": {"lungs": "l"}}, False, False),
        ("folder", {"organ_mask_dir": "organs"}, False, True),
        ("folder", {"masks": "sibling"}, True, False),
        ("ph2", {}, True, False),
        ("synth-cxr", {}, True, True),
    ],
)
def test_declared_masks_follow_the_options(name, options, masks, organ):
    info = DATASETS.get(name).info
    assert info.declares_masks(options) is masks
    assert info.declares_organ_masks(options) is organ


def test_organ_mass_applies_to_a_csv_entry_with_organ_masks():
    organ_mass = Component(label="organ_mass", use="organ_mass")
    with_organs = Component(label="d", use="csv", options={"organ_mask_col": "organ"})
    without = Component(label="d", use="csv", options={"mask_col": "m"})
    assert needs_reason(organ_mass, with_organs) == ""
    assert "needs organ_masks" in needs_reason(organ_mass, without)


@pytest.mark.parametrize("name", ["csv", "folder"])
def test_organ_masks_option_names_options_of_the_callable(name):
    import inspect

    entry = DATASETS.get(name)
    option = entry.info.organ_masks_option
    names = (option,) if isinstance(option, str) else option
    assert names
    params = inspect.signature(entry.obj).parameters
    for key in names:
        assert key in params and params[key].kind is inspect.Parameter.KEYWORD_ONLY, key


def test_suite_option_types_of_the_new_options():
    csv_fn, folder_fn = DATASETS.get("csv").obj, DATASETS.get("folder").obj
    good = {
        "window": [40, 400],
        "extra_masks": {"lungs": "lung_mask"},
        "boxes": "boxes.csv",
        "boxes_id_col": "study",
        "organ_mask_col": "organ",
    }
    check_options(csv_fn, good, "dataset d")
    check_options(csv_fn, {"window": "minmax"}, "dataset d")
    check_options(csv_fn, {"window": [-600.5, 1500.0]}, "dataset d")
    check_options(folder_fn, {"window": [40, 400], "organ_mask_dir": "o"}, "dataset d")
    check_options(folder_fn, {"extra_mask_dirs": {"lungs": "l"}}, "dataset d")
    for bad in ([40, 0], [40], "auto", 40, [40, "400"]):
        with pytest.raises(UserError, match=r"dataset d window = "):
            check_options(csv_fn, {"window": bad}, "dataset d")
    with pytest.raises(UserError, match=r"extra_masks = 'lungs': expected a table"):
        check_options(csv_fn, {"extra_masks": "lungs"}, "dataset d")
