"""The dataset contract, generated from the registry, so every dataset is covered the day it
is registered (timm ``tests/test_models.py``; the item layout of ``datasets/base.py``).

For every entry of ``datasets.DATASETS``: synthetic ones at 32 px with a few items per split,
real ones from ``../shared/data`` (the root ``tests/test_real_datasets.py`` reads; skipped
with the reason when that directory or the entry's files are absent):

- an item's ``image`` is a finite float (C, H, W) tensor on the [0, 1] scale, C the
  dataset's ``channels``, H = W the size asked for; ``mask`` (on every item when
  ``info.masks`` says so) and ``organ_mask`` (likewise ``info.organ_masks``) are bool
  (H, W); ``label`` is an int in range(len(class_names)); ``id`` a str;
- ids are unique within a split, and the train, val and test splits share none;
- a build is a function of its seed: two builds with one seed give identical images,
  labels, ids and masks; for synthetic data another seed gives other images, and a larger
  ``n`` keeps the earlier items (item i depends only on the seed, the split and i).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import torch

from cambench.benchmarks.core.errors import DataNotFound, UserError
from cambench.datasets import DATASETS
from cambench.datasets.base import SPLITS

pytestmark = pytest.mark.datasets

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE = 32
N_PER_SPLIT = 6
SEED = 0
OTHER_SEED = 1

# How to point each real entry at the files in DATA; an entry not listed is built with
# ``root=DATA`` alone. None: the entry takes no root (its table is the manifest).
REAL_OPTIONS: dict[str, dict] = {
    "medmnist": {"name": "pneumoniamnist", "variant": "balanced"},
    "folder": {
        "root": DATA / "Dataset_BUSI_with_GT",
        "classes": ("normal", "benign", "malignant"),
        "masks": "sibling",
        "channels": 1,
    },
    "csv": {
        "root": None,
        "manifest": DATA / "ph2" / "labels.csv",
        "image_pattern": "images/{image_id}.jpg",
        "mask_pattern": "masks/{image_id}_lesion.png",
        "id_col": "image_id",
    },
}

NAMES = DATASETS.names()
SYNTHETIC = [n for n in NAMES if DATASETS.get(n).info.source == "synthetic"]


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    # a data root set in the developer's shell must not leak into the tests
    monkeypatch.delenv("CAMBENCH_DATA_ROOT", raising=False)


def options(name: str, seed: int) -> dict:
    entry = DATASETS.get(name)
    opts = {"image_size": SIZE, "seed": seed}
    if entry.info.source == "synthetic":
        if "n" in inspect.signature(entry.obj).parameters:
            opts["n"] = N_PER_SPLIT
        return opts
    if not DATA.is_dir():
        pytest.skip(f"real data directory {DATA} is absent")
    return {"root": DATA, **opts, **REAL_OPTIONS.get(name, {})}


def build(name: str, split: str, seed: int = SEED, **extra):
    """One split of the entry; a missing split is None; missing real data skips."""
    opts = {**options(name, seed), **extra}
    try:
        return DATASETS.get(name).obj(split, **opts)
    except DataNotFound as exc:
        pytest.skip(f"{name}: no data under {DATA}: {str(exc).splitlines()[0]}")
    except UserError as exc:
        if split == "val" and "val" in str(exc):
            return None  # a dataset without a validation split
        if DATASETS.get(name).info.source == "real" and name not in REAL_OPTIONS:
            pytest.skip(f"{name} needs options to read {DATA}; add them to REAL_OPTIONS: {exc}")
        raise


@functools.cache
def _splits(name: str) -> dict:
    return {split: build(name, split) for split in SPLITS}


def splits(name: str) -> dict:
    built = {s: ds for s, ds in _splits(name).items() if ds is not None}
    assert {"train", "test"} <= set(built), f"{name}: no train or test split"
    return built


def items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("name", NAMES)
def test_items_follow_the_layout(name):
    info = DATASETS.get(name).info
    for split, ds in splits(name).items():
        n_classes = len(ds.class_names)
        assert n_classes >= 2, f"{name}/{split}: class_names {ds.class_names}"
        assert len(ds) >= 1
        for item in items(ds):
            where = f"{name}/{split}/{item.get('id')}"
            image = item["image"]
            assert isinstance(image, torch.Tensor) and image.dtype.is_floating_point, where
            assert tuple(image.shape) == (ds.channels, SIZE, SIZE), (
                f"{where}: image {tuple(image.shape)}, want ({ds.channels}, {SIZE}, {SIZE})"
            )
            assert bool(torch.isfinite(image).all()), f"{where}: image not finite"
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0, (
                f"{where}: image outside [0, 1]: [{float(image.min())}, {float(image.max())}]"
            )
            label = item["label"]
            assert isinstance(label, int) and not isinstance(label, bool), f"{where}: {label!r}"
            assert 0 <= label < n_classes, f"{where}: label {label} not in range({n_classes})"
            assert isinstance(item["id"], str) and item["id"], where
            for key, promised in (("mask", info.masks), ("organ_mask", info.organ_masks)):
                if promised:
                    assert key in item, f"{where}: info.{key}s is True but the item has no {key}"
                if key in item:
                    mask = item[key]
                    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, (
                        f"{where}: {key} dtype {getattr(mask, 'dtype', type(mask))}"
                    )
                    assert tuple(mask.shape) == tuple(image.shape[-2:]), (
                        f"{where}: {key} {tuple(mask.shape)} vs image {tuple(image.shape)}"
                    )


@pytest.mark.parametrize("name", NAMES)
def test_ids_unique_and_splits_disjoint(name):
    ids = {split: [it["id"] for it in items(ds)] for split, ds in splits(name).items()}
    for split, these in ids.items():
        assert len(set(these)) == len(these), f"{name}/{split}: duplicate ids"
    names = sorted(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(ids[a]) & set(ids[b])
            assert not shared, f"{name}: {a} and {b} share ids {sorted(shared)[:5]}"


def assert_same_items(a, b, where: str) -> None:
    assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
    for x, y in zip(items(a), items(b), strict=True):
        assert x.keys() == y.keys(), where
        assert x["id"] == y["id"] and x["label"] == y["label"], f"{where}: {x['id']}"
        for key in ("image", "mask", "organ_mask"):
            if key in x:
                assert torch.equal(x[key], y[key]), f"{where}/{x['id']}: {key} differs"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_data(name):
    for split, ds in splits(name).items():
        assert_same_items(build(name, split), ds, f"{name}/{split}")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_other_seed_other_images(name):
    for split, ds in splits(name).items():
        other = build(name, split, seed=OTHER_SEED)
        assert len(other) == len(ds)
        differ = [
            not torch.equal(a["image"], b["image"])
            for a, b in zip(items(ds), items(other), strict=True)
        ]
        assert all(differ), f"{name}/{split}: seeds {SEED} and {OTHER_SEED} share images"


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_larger_n_keeps_earlier_items(name):
    if "n" not in inspect.signature(DATASETS.get(name).obj).parameters:
        pytest.skip(f"{name} takes no n")
    for split, ds in splits(name).items():
        fewer = build(name, split, n=N_PER_SPLIT // 2)
        prefix = [ds[i] for i in range(len(fewer))]
        for x, y in zip(items(fewer), prefix, strict=True):
            assert x["id"] == y["id"] and x["label"] == y["label"]
            assert torch.equal(x["image"], y["image"]), f"{name}/{split}/{x['id']}"
