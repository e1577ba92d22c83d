"""Real-data loaders (datasets/medmnist.py, busi.py, tabular.py, folder.py, pcam.py).

Oracles: the counts in ../shared/data/README.md, the files themselves read with numpy,
PIL, pandas and h5py (independently of the loaders), and closed forms on small files the
tests write (constant images, rectangles as masks, hand-computed split sizes).
"""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cambench.benchmarks.core.errors import DataNotFound, UserError
from cambench.datasets import DATASETS
from cambench.datasets._io import read_image
from cambench.datasets.base import SPLITS

pytestmark = pytest.mark.datasets

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = ("busi", "ph2", "pneumoniamnist", "pneumoniamnist_balanced", "breastmnist", "medmnist")
BUSI_SIZE = 64


def needs(sub: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (DATA / sub).exists(), reason=f"real data {DATA / sub} is absent (see its README)"
    )


def make(dataset: str, split: str, /, **kw):
    return DATASETS.get(dataset).obj(split, **kw)


def all_splits(dataset: str, /, **kw) -> dict[str, object]:
    return {s: make(dataset, s, **kw) for s in SPLITS}


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    # a data root set in the developer's shell must not leak into the tests
    monkeypatch.delenv("CAMBENCH_DATA_ROOT", raising=False)


# --- registry metadata -------------------------------------------------------------------


@pytest.mark.parametrize("name", [*REAL, "folder", "csv", "pcam"])
def test_real_entries_carry_their_metadata(name):
    info = DATASETS.get(name).info
    assert info.source == "real"
    assert info.root_env == "CAMBENCH_DATA_ROOT"
    assert info.how_to_get
    assert info.masks == (name in ("busi", "ph2"))


# --- PneumoniaMNIST (balanced subset in ../shared/data) -----------------------------------


@needs("pneumoniamnist_balanced.npz")
def test_pneumoniamnist_balanced_matches_readme_and_file():
    want = {"train": (1214, 1214), "val": (135, 135), "test": (234, 234)}  # README table
    raw = np.load(DATA / "pneumoniamnist_balanced.npz")
    for split, ds in all_splits("pneumoniamnist_balanced", root=DATA).items():
        assert tuple(torch.bincount(ds.labels, minlength=2).tolist()) == want[split]
        assert ds.class_names == ("normal", "pneumonia") and ds.channels == 1
        assert ds.images.dtype == torch.float32 and ds.images.shape[1:] == (1, 28, 28)
        np.testing.assert_array_equal(ds.images[:, 0].numpy() * 255, raw[f"{split}_images"])
        np.testing.assert_array_equal(ds.labels.numpy(), raw[f"{split}_labels"][:, 0])
        item = ds[0]
        assert set(item) == {"image", "label", "id"} and isinstance(item["label"], int)
        assert len(set(ds.ids)) == len(ds)


@needs("pneumoniamnist_balanced.npz")
def test_pneumoniamnist_wants_the_official_file_and_names_the_balanced_one(tmp_path):
    with pytest.raises(UserError, match=r"pneumoniamnist\.npz.*pneumoniamnist_balanced\.npz"):
        make("pneumoniamnist", "train", root=DATA)
    ds = make("medmnist", "val", root=DATA, name="pneumoniamnist", variant="balanced")
    assert len(ds) == 270
    ds = make("pneumoniamnist", "val", root=DATA / "pneumoniamnist_balanced.npz")
    assert len(ds) == 270  # root may name the file itself


# --- MedMNIST official layout, written here ----------------------------------------------


def write_medmnist(path: Path, *, rgb: bool, n=(6, 3, 4), classes: int = 4) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(SPLITS, n, strict=True):
        shape = (k, 28, 28, 3) if rgb else (k, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        # val holds only class 0 and 1: the class count must come from the whole file
        top = classes if split != "val" else 2
        arrays[f"{split}_labels"] = (np.arange(k) % top).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return arrays


def test_medmnist_official_layout_rgb(tmp_path, monkeypatch):
    arrays = write_medmnist(tmp_path / "toymnist.npz", rgb=True)
    for split in SPLITS:
        ds = make("medmnist", split, root=tmp_path, name="toymnist")
        want = arrays[f"{split}_images"].transpose(0, 3, 1, 2) / 255.0
        np.testing.assert_allclose(ds.images.numpy(), want, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(ds.labels.numpy(), arrays[f"{split}_labels"][:, 0])
        assert ds.class_names == ("0", "1", "2", "3") and ds.channels == 3
    # grey on request: PIL's own RGB -> L conversion is the oracle
    grey = make("medmnist", "test", root=tmp_path, name="toymnist", channels=1)
    want = [np.asarray(Image.fromarray(im).convert("L")) for im in arrays["test_images"]]
    np.testing.assert_array_equal(np.rint(grey.images[:, 0].numpy() * 255), np.stack(want))
    # the data root may come from the environment
    monkeypatch.setenv("CAMBENCH_DATA_ROOT", str(tmp_path))
    assert len(make("medmnist", "val", name="toymnist")) == 3


def test_medmnist_resize_keeps_constant_images_constant(tmp_path):
    levels = np.array([0, 37, 200, 255], np.uint8)
    images = np.broadcast_to(levels[:, None, None], (4, 28, 28)).copy()
    labels = np.array([[0], [1], [0], [1]], np.uint8)
    np.savez(
        tmp_path / "pneumoniamnist.npz",
        **{f"{s}_images": images for s in SPLITS},
        **{f"{s}_labels": labels for s in SPLITS},
    )
    ds = make("pneumoniamnist", "train", root=tmp_path, image_size=12, channels=3)
    assert ds.images.shape == (4, 3, 12, 12) and ds.class_names == ("normal", "pneumonia")
    want = np.broadcast_to(levels[:, None, None, None] / 255.0, (4, 3, 12, 12))
    np.testing.assert_allclose(ds.images.numpy(), want, rtol=0, atol=1e-6)


def test_medmnist_download_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import fails: nothing is fetched
    with pytest.raises(UserError, match="pip install medmnist"):
        make("breastmnist", "train", root=tmp_path, download=True)
    with pytest.raises(UserError, match="breastmnist.npz"):
        make("breastmnist", "train", root=tmp_path)  # no download unless asked


def test_medmnist_bad_files(tmp_path):
    np.savez(tmp_path / "toymnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError, match=r"'train_labels'.*keys found: train_images"):
        make("medmnist", "train", root=tmp_path, name="toymnist")
    arrays = write_medmnist(tmp_path / "emptymnist.npz", rgb=False, n=(4, 2, 0))
    assert arrays["test_images"].shape[0] == 0
    with pytest.raises(UserError, match=r"split 'test'.*emptymnist\.npz.*empty"):
        make("medmnist", "test", root=tmp_path, name="emptymnist")
    (tmp_path / "junkmnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match=r"junkmnist\.npz"):
        make("medmnist", "train", root=tmp_path, name="junkmnist")


# --- BUSI-shaped tree, written here ------------------------------------------------------


def rect(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


def write_mini_busi(base: Path, per_class: int = 8, hw=(40, 50)) -> dict[str, tuple]:
    """A BUSI-layout tree: grey content saved as RGB (one as RGBA), rectangular masks,
    ``benign (2)`` with a second mask file; returns id -> (grey level, mask)."""
    truth = {}
    for c, cls in enumerate(("normal", "benign", "malignant")):
        (base / cls).mkdir(parents=True)
        for k in range(1, per_class + 1):
            level = 20 * c + 10 * k
            grey = np.full(hw, level, np.uint8)
            mode = "RGBA" if (cls, k) == ("malignant", 1) else "RGB"
            Image.fromarray(grey).convert(mode).save(base / cls / f"{cls} ({k}).png")
            mask = rect(*hw, 5, 5 + k, 15, 20 + k) if cls != "normal" else np.zeros(hw, bool)
            Image.fromarray(mask.astype(np.uint8) * 255).save(base / cls / f"{cls} ({k})_mask.png")
            if (cls, k) == ("benign", 2):
                extra = rect(*hw, 25, 30, 35, 45)
                Image.fromarray(extra.astype(np.uint8) * 255).save(
                    base / cls / f"{cls} ({k})_mask_1.png"
                )
                mask = mask | extra
            truth[f"{cls}/{cls} ({k})"] = (level, mask)
    return truth


def test_busi_layout_written_here(tmp_path):
    truth = write_mini_busi(tmp_path / "Dataset_BUSI_with_GT")
    parts = all_splits("busi", root=tmp_path, image_size=(40, 50))
    # 8 per class at 70/15/15: 5.6/1.2/1.2 -> floor 5/1/1, the 1 left goes to train (0.6)
    want_counts = {"train": 6, "val": 1, "test": 1}
    seen = []
    for split, ds in parts.items():
        assert ds.class_names == ("normal", "benign", "malignant") and ds.channels == 1
        assert torch.bincount(ds.labels, minlength=3).tolist() == [want_counts[split]] * 3
        for i, rid in enumerate(ds.ids):
            level, mask = truth[rid]
            assert ds.labels[i] == ("normal", "benign", "malignant").index(rid.split("/")[0])
            assert torch.all(ds.images[i] == level / 255.0)
            np.testing.assert_array_equal(ds.masks[i].numpy(), mask)  # union for benign (2)
        seen += ds.ids
        assert ds.split_ids[split] == ds.ids
    assert sorted(seen) == sorted(truth)  # disjoint, complete, no *_mask file as an image


def test_busi_pad_keeps_aspect_and_pads_mask_with_background(tmp_path):
    truth = write_mini_busi(tmp_path / "b")
    ds = make("busi", "train", root=tmp_path / "b", image_size=50, fit="pad", channels=3)
    assert ds.images.shape[1:] == (3, 50, 50)
    for i, rid in enumerate(ds.ids):
        level, mask = truth[rid]
        # 40x50 into 50x50: no scaling, 5 rows of black above and below
        assert torch.all(ds.images[i, :, :5] == 0) and torch.all(ds.images[i, :, 45:] == 0)
        assert torch.all(ds.images[i, :, 5:45] == level / 255.0)
        np.testing.assert_array_equal(ds.masks[i, 5:45].numpy(), mask)
        assert not ds.masks[i, :5].any() and not ds.masks[i, 45:].any()


def test_busi_bad_inputs(tmp_path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    write_mini_busi(base)
    missing = base / "benign" / "benign (3)_mask.png"
    missing.unlink()
    with pytest.raises(UserError, match=r"benign \(3\)\.png.*has no mask"):
        make("busi", "train", root=tmp_path, image_size=32)
    assert len(make("busi", "train", root=tmp_path, image_size=32, masks=False)) == 18

    shutil.rmtree(base)
    write_mini_busi(base)
    corrupt = base / "malignant" / "malignant (4).png"
    good = corrupt.read_bytes()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(UserError, match=r"malignant \(4\)\.png.*corrupt"):
        make("busi", "train", root=tmp_path, image_size=32)
    corrupt.write_bytes(good)  # the same path, repaired: nothing bad was cached
    assert len(make("busi", "train", root=tmp_path, image_size=32)) == 18

    (base / "benign" / "benign (5)_mask.png").write_bytes(b"nonsense")
    with pytest.raises(UserError, match=r"benign \(5\)_mask\.png"):
        make("busi", "train", root=tmp_path, image_size=32)

    Image.new("L", (20, 20)).save(base / "benign" / "benign (5)_mask.png")  # misaligned
    with pytest.raises(UserError, match=r"benign \(5\)_mask\.png' is 20x20 but its image is 40x50"):
        make("busi", "train", root=tmp_path, image_size=32)

    with pytest.raises(UserError, match=r"Dataset_BUSI_with_GT.*kaggle"):
        make("busi", "train", root=tmp_path / "elsewhere")


# --- BUSI, real ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busi_real():
    return all_splits("busi", root=DATA, image_size=BUSI_SIZE, seed=0)


@pytest.mark.slow  # the first test reads all 780 images and their masks (~4 s)
@needs("Dataset_BUSI_with_GT")
def test_busi_real_counts_stratified_disjoint(busi_real):
    readme = {"normal": 133, "benign": 437, "malignant": 210}
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    total = {c: 0 for c in readme}
    ids = []
    for split, ds in busi_real.items():
        counts = torch.bincount(ds.labels, minlength=3).tolist()
        for c, n in zip(ds.class_names, counts, strict=True):
            assert abs(n - readme[c] * fractions[split]) <= 2, (split, c, n)
            total[c] += n
        ids += ds.ids
        assert ds.masks.shape == (len(ds), BUSI_SIZE, BUSI_SIZE)
        assert ds.images.shape == (len(ds), 1, BUSI_SIZE, BUSI_SIZE)
        assert not ds.masks[ds.labels == 0].any()  # normal images: empty masks
        assert ds.masks[ds.labels > 0].flatten(1).any(1).all()
    assert total == readme and len(ids) == len(set(ids)) == 780


@pytest.mark.slow
@needs("Dataset_BUSI_with_GT")
def test_busi_real_split_is_fixed_by_seed(busi_real):
    again = make("busi", "val", root=DATA, image_size=BUSI_SIZE, seed=0)
    other = make("busi", "val", root=DATA, image_size=BUSI_SIZE, seed=1)
    assert again.ids == busi_real["val"].ids
    assert torch.equal(again.images, busi_real["val"].images)
    assert other.ids != again.ids and len(other) == len(again)
    assert again.provenance["split"] == busi_real["val"].provenance["split"]


@pytest.mark.slow
@needs("Dataset_BUSI_with_GT")
def test_busi_real_images_and_mask_union_match_pil(busi_real):
    ds = next(d for d in busi_real.values() if "benign/benign (100)" in d.ids)
    i = ds.ids.index("benign/benign (100)")
    folder = DATA / "Dataset_BUSI_with_GT" / "benign"
    size = (BUSI_SIZE, BUSI_SIZE)

    def pil_mask(name):
        with Image.open(folder / name) as m:
            return np.asarray(m.resize(size, Image.NEAREST)) > 127

    first, second = pil_mask("benign (100)_mask.png"), pil_mask("benign (100)_mask_1.png")
    assert (second & ~first).any()  # the second file adds lesion pixels
    np.testing.assert_array_equal(ds.masks[i].numpy(), first | second)
    with Image.open(folder / "benign (100).png") as raw:
        img = raw.convert("L").resize(size, Image.BILINEAR)
    np.testing.assert_array_equal(np.rint(ds.images[i, 0].numpy() * 255), np.asarray(img))


@pytest.mark.slow
@needs("Dataset_BUSI_with_GT")
def test_busi_real_masks_sit_on_the_dark_tumours(busi_real):
    # tumours are hypoechoic: darker than a ring just around them, when the mask is aligned
    images = torch.cat([d.images[:, 0] for d in busi_real.values()])
    masks = torch.cat([d.masks for d in busi_real.values()])
    keep = masks.flatten(1).any(1)
    images, masks = images[keep], masks[keep]
    ring = F.max_pool2d(masks.float()[:, None], 9, 1, 4)[:, 0].bool() & ~masks
    inside = (images * masks).sum((1, 2)) / masks.sum((1, 2))
    around = (images * ring).sum((1, 2)) / ring.sum((1, 2)).clamp(min=1)
    assert (inside < around).float().mean() >= 0.9


# --- PH2, real ----------------------------------------------------------------------------


@needs("ph2")
def test_ph2_real_counts_labels_and_mask_alignment():
    parts = all_splits("ph2", root=DATA, image_size=64, seed=0)
    table = pd.read_csv(DATA / "ph2" / "labels.csv", dtype={"image_id": str})
    truth = dict(zip(table.image_id, table.label, strict=True))
    ids = [i for ds in parts.values() for i in ds.ids]
    assert len(ids) == len(set(ids)) == 200 and set(ids) == set(truth)
    labels = torch.cat([ds.labels for ds in parts.values()])
    assert torch.bincount(labels).tolist() == [80, 80, 40]  # README
    for ds in parts.values():
        assert ds.class_names == ("common_nevus", "atypical_nevus", "melanoma")
        assert [truth[i] for i in ds.ids] == ds.labels.tolist()
        assert ds.images.shape[1:] == (3, 64, 64) and ds.masks.shape[1:] == (64, 64)
    images = torch.cat([ds.images.mean(1) for ds in parts.values()])
    masks = torch.cat([ds.masks for ds in parts.values()])
    inside = (images * masks).sum((1, 2)) / masks.sum((1, 2)).clamp(min=1)
    outside = (images * ~masks).sum((1, 2)) / (~masks).sum((1, 2)).clamp(min=1)
    assert (inside < outside).float().mean() >= 0.9  # lesions are darker than skin


# --- image modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_every_image_mode_becomes_the_same_grey_and_rgb(tmp_path, mode):
    level = 100
    if mode == "I;16":
        img = Image.fromarray(np.full((6, 8), level * 257, np.uint16))  # 16-bit grey
    else:  # an adaptive palette holds the grey exactly (the default web palette would not)
        img = Image.new("RGB", (8, 6), (level,) * 3).convert(mode, palette=Image.ADAPTIVE)
    img.save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as saved:
        assert saved.mode == mode
    for channels in (1, 3):
        arr, hw = read_image(tmp_path / "x.png", channels=channels, size=None)
        assert hw == (6, 8) and arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, np.full((channels, 6, 8), level, np.uint8))


# --- folder and csv, written here ----------------------------------------------------------


def write_tree(base: Path, classes=("cat", "dog", "bird"), per_class: int = 12) -> dict:
    truth = {}
    for c, cls in enumerate(classes):
        (base / cls).mkdir(parents=True)
        for k in range(per_class):
            colour = (10 * c, 100 + k, 200)
            Image.new("RGB", (16, 12), colour).save(base / cls / f"{cls}{k:02d}.png")
            truth[f"{cls}/{cls}{k:02d}"] = colour
    return truth


def test_folder_tree_order_split_and_values(tmp_path):
    truth = write_tree(tmp_path / "tree")
    parts = all_splits("folder", root=tmp_path, subdir="tree", seed=3)
    # 12 per class at 70/15/15: 8.4/1.8/1.8 -> floor 8/1/1, the 2 left go to val and test
    for split, n in {"train": 8, "val": 2, "test": 2}.items():
        ds = parts[split]
        assert ds.class_names == ("bird", "cat", "dog")  # sorted
        assert torch.bincount(ds.labels, minlength=3).tolist() == [n] * 3
        assert ds.images.shape[1:] == (3, 12, 16) and ds.masks is None
        for i, rid in enumerate(ds.ids):
            want = np.broadcast_to(np.array(truth[rid])[:, None, None] / 255, (3, 12, 16))
            np.testing.assert_allclose(ds.images[i].numpy(), want, rtol=0, atol=1e-6)
            assert ds.class_names[ds.labels[i]] == rid.split("/")[0]
    ordered = make("folder", "train", root=tmp_path / "tree", classes="dog, cat", seed=3)
    assert ordered.class_names == ("dog", "cat")
    assert {i.split("/")[0] for i in ordered.ids} == {"dog", "cat"}
    with pytest.raises(UserError, match=r"'cow' not found.*available classes: bird, cat, dog"):
        make("folder", "train", root=tmp_path / "tree", classes=["cat", "cow"])


def test_folder_masks_from_a_parallel_tree_and_empty_split(tmp_path):
    write_tree(tmp_path / "img", classes=("a", "b"), per_class=4)
    for cls in ("a", "b"):
        (tmp_path / "lesions" / cls).mkdir(parents=True)
        for k in range(4):
            m = rect(12, 16, k, k, k + 4, k + 6)
            Image.fromarray(m.astype(np.uint8) * 255).save(
                tmp_path / "lesions" / cls / f"{cls}{k:02d}.png"
            )
    ds = make(
        "folder",
        "train",
        root=tmp_path,
        subdir="img",
        masks="folder",
        mask_dir="lesions",
        image_size=(24, 32),
        channels=1,
    )
    for i, rid in enumerate(ds.ids):
        k = int(rid[-2:])
        # nearest-neighbour upscaling by exactly 2 doubles each mask pixel
        want = np.kron(rect(12, 16, k, k, k + 4, k + 6), np.ones((2, 2), bool))
        np.testing.assert_array_equal(ds.masks[i].numpy(), want)
    (tmp_path / "lesions" / "b" / "b03.png").unlink()
    with pytest.raises(UserError, match=r"b03\.png.*has no mask"):
        make("folder", "train", root=tmp_path, subdir="img", masks="folder", mask_dir="lesions")
    write_tree(tmp_path / "tiny", classes=("x", "y"), per_class=1)
    with pytest.raises(UserError, match=r"split 'val' is empty"):
        make("folder", "val", root=tmp_path / "tiny")


def test_csv_table_with_string_labels_masks_and_split_column(tmp_path):
    truth = write_tree(tmp_path / "pics", classes=("benign", "malignant"), per_class=5)
    rows = []
    for n, rid in enumerate(sorted(truth)):
        cls, stem = rid.split("/")
        mask = rect(12, 16, 0, 0, 3 + n % 4, 5)
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "pics" / cls / f"{stem}_m.png")
        split = ("train", "train", "val", "test", "train")[n % 5]
        rows.append(
            {
                "file": f"{cls}/{stem}.png",
                "mask": f"{cls}/{stem}_m.png",
                "dx": cls,
                "split": split,
                "rows": 3 + n % 4,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    opts = dict(
        manifest="table.csv",
        image_col="file",
        label_col="dx",
        mask_col="mask",
        base_dir="pics",
        class_names=["malignant", "benign"],
    )
    for split in SPLITS:
        ds = make("csv", split, root=tmp_path, split_col="split", **opts)
        want = [r for r in rows if r["split"] == split]
        assert ds.ids == [Path(r["file"]).stem for r in want]
        assert ds.class_names == ("malignant", "benign")
        assert ds.labels.tolist() == [ds.class_names.index(r["dx"]) for r in want]
        assert ds.masks.sum((1, 2)).tolist() == [r["rows"] * 5 for r in want]
    # without a split column: seeded split, class names sorted from the labels
    seeded = make(
        "csv",
        "train",
        root=tmp_path / "table.csv",
        image_col="file",
        label_col="dx",
        base_dir="pics",
    )
    # 5 per class: 3.5/0.75/0.75 -> floor 3/0/0, the 2 left go to val and test (0.75 > 0.5)
    assert seeded.class_names == ("benign", "malignant") and len(seeded) == 6
    (tmp_path / "pics" / "malignant" / "malignant03_m.png").unlink()
    with pytest.raises(UserError, match=r"malignant03\.png' has no mask"):
        make("csv", "train", root=tmp_path, split_col="split", **opts)
    with pytest.raises(UserError, match=r"no column 'diagnosis'.*columns are: file, mask, dx"):
        make(
            "csv",
            "train",
            root=tmp_path,
            manifest="table.csv",
            image_col="file",
            label_col="diagnosis",
        )


# --- PCam HDF5 pair, written here --------------------------------------------------------


def write_pcam(folder: Path, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(split) + n)
    x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f["y"] = y
    return x, y


def test_pcam_reads_hdf5_lazily(tmp_path):
    x, y = write_pcam(tmp_path / "pcam", "valid", 10)
    ds = make("pcam", "val", root=tmp_path)  # split 'val' reads the 'valid' files
    assert len(ds) == 10 and ds.class_names == ("normal", "tumor") and ds.channels == 3
    assert ds.labels.tolist() == y.reshape(-1).tolist()
    item = ds[7]
    assert item["id"] == "val_7" and item["label"] == 1
    assert item["image"].dtype == torch.float32
    np.testing.assert_allclose(item["image"].numpy(), x[7].transpose(2, 0, 1) / 255, atol=1e-6)
    clone = pickle.loads(pickle.dumps(ds))  # as a DataLoader worker gets it
    assert torch.equal(clone[3]["image"], ds[3]["image"])
    sub = make("pcam", "val", root=tmp_path / "pcam", max_items=4, seed=1, image_size=32)
    assert len(sub) == 4 and sub[0]["image"].shape == (3, 32, 32)
    rows = [int(i.split("_")[1]) for i in sub.ids]
    assert rows == sorted(rows) and sub.labels.tolist() == [r % 2 for r in rows]
    assert make("pcam", "val", root=tmp_path, max_items=4, seed=1).ids == sub.ids
    ds.close()
    clone.close()


def test_pcam_bad_files(tmp_path):
    write_pcam(tmp_path, "test", 0)
    with pytest.raises(UserError, match=r"split 'test'.*empty"):
        make("pcam", "test", root=tmp_path)
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f["images"] = np.zeros((2, 96, 96, 3), np.uint8)
    with pytest.raises(UserError, match=r"no dataset 'x'; keys found: images"):
        make("pcam", "train", root=tmp_path)
    with pytest.raises(UserError, match=r"camelyonpatch_level_2_split_val"):
        make("pcam", "val", root=tmp_path)  # names the missing valid file via the folder


# --- missing data roots --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("busi", {}),
        ("ph2", {}),
        ("pneumoniamnist", {}),
        ("pneumoniamnist_balanced", {}),
        ("medmnist", {"name": "dermamnist"}),
        ("folder", {}),
        ("csv", {"manifest": "table.csv"}),
        ("pcam", {}),
    ],
)
def test_missing_root_names_path_expectation_and_source(tmp_path, name, options):
    nowhere = tmp_path / "no" / "such" / "dir"
    with pytest.raises(DataNotFound) as err:  # a UserError the runner may skip on
        make(name, "train", root=nowhere, **options)
    message = str(err.value)
    assert str(nowhere) in message and "does not exist" in message
    assert DATASETS.get(name).info.how_to_get.split()[0] in message
    with pytest.raises(DataNotFound, match="CAMBENCH_DATA_ROOT"):
        make(name, "train", **options)  # nothing given, nothing in the environment
