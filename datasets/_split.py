"""Stratified, seeded train/val/test split for datasets that ship without one.

The split is a pure function of (the sorted item ids with their labels, the seed, the
fractions): the order files are listed in, the machine and the process do not matter, so a
split is fixed once a seed is chosen, and the ids of each split can be recorded next to a
run's results (``split_record``).

Per class, items are sorted by id, shuffled with ``numpy.random.default_rng(seed)`` (classes
in ascending label order share one generator), and cut into train/val/test with counts from
the largest-remainder rule, so every class is within one item of its exact share in every
split.

>>> split = stratified_split(["a", "b", "c", "d"], [0, 0, 1, 1], seed=0, fractions=(0.5, 0.5, 0))
>>> sorted(len(v) for v in split.values())
[0, 2, 2]
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cambench.benchmarks.core.errors import UserError
from cambench.datasets._io import Fit, Record, Size, WindowSpec, load_records
from cambench.datasets.base import ArrayDataset, check_split

SPLIT_METHOD = "stratified-permutation-v1"
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
_NAMES = ("train", "val", "test")


def check_fractions(fractions: Sequence[float], *, name: str) -> tuple[float, float, float]:
    """Three non-negative train/val/test fractions summing to 1."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise UserError(
            f"{name}: fractions={tuple(fractions)!r} must be three non-negative numbers "
            "(train, val, test) summing to 1, e.g. (0.7, 0.15, 0.15)"
        )
    return fr  # type: ignore[return-value]


def allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` into integer counts proportional to ``fractions`` (largest remainder;
    ties go to the earlier split)."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def stratified_split(
    ids: Sequence[str],
    labels: Sequence[int],
    *,
    seed: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, list[int]]:
    """Indices (into ``ids``) of the train, val and test items, each list ascending."""
    assert len(ids) == len(labels), "one label per id"
    assert len(set(ids)) == len(ids), "ids must be unique"
    fractions = check_fractions(fractions, name="split")
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in _NAMES}
    labels_arr = np.asarray(labels)
    for cls in sorted(set(int(v) for v in labels_arr)):
        members = sorted(np.flatnonzero(labels_arr == cls).tolist(), key=lambda i: ids[i])
        shuffled = [members[j] for j in rng.permutation(len(members))]
        start = 0
        for split, count in zip(_NAMES, allocate(len(shuffled), fractions), strict=True):
            out[split].extend(shuffled[start : start + count])
            start += count
    return {s: sorted(v) for s, v in out.items()}


def split_record(
    ids: Sequence[str], split: dict[str, list[int]], *, seed: int, fractions: Sequence[float]
) -> dict[str, object]:
    """What determines a split and a digest of its result, for a run's manifest."""
    record: dict[str, object] = {"method": SPLIT_METHOD, "seed": seed, "fractions": list(fractions)}
    for name, idx in split.items():
        members = sorted(ids[i] for i in idx)
        record[f"{name}_count"] = len(members)
        record[f"{name}_sha256"] = hashlib.sha256("\n".join(members).encode()).hexdigest()
    return record


def split_dataset(
    records: Sequence[Record],
    *,
    split: str,
    class_names: Sequence[str],
    channels: int,
    size: Size | None,
    fit: Fit,
    seed: int,
    fractions: Sequence[float],
    name: str,
    source: Path,
    given_split: Sequence[str] | None = None,
    window: WindowSpec = None,
) -> ArrayDataset:
    """The ``split`` part of ``records`` as an in-memory dataset, split stratified by label
    with ``seed`` (or by ``given_split``, one split name per record, when the data names it).

    Items carry the masks the records name: ``mask`` (lesion), ``organ_mask`` and, as the
    dataset's ``extras``, ``mask_<name>``. ``window`` is the DICOM windowing
    (``datasets._io.check_window``). The dataset carries ``split_ids`` (the ids of every
    split) and ``provenance`` (the source path and what determined the split) for the
    run's manifest.
    """
    check_split(split, name)
    fractions = check_fractions(fractions, name=name)
    ids = [r.id for r in records]
    if not records:
        raise UserError(f"{name}: no images found under {str(source)!r}")
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise UserError(
            f"{name}: duplicate image ids under {str(source)!r}: {dupes[:5]}; ids must be unique"
        )
    if given_split is None:
        parts = stratified_split(ids, [r.label for r in records], seed=seed, fractions=fractions)
        record = split_record(ids, parts, seed=seed, fractions=fractions)
    else:
        parts = {s: [i for i, g in enumerate(given_split) if g == s] for s in _NAMES}
        record = split_record(ids, parts, seed=seed, fractions=())
        record.update(method="given", seed=None, fractions=None)
    chosen = parts[split]
    if not chosen:
        how = "the data's split column" if given_split is not None else f"fractions={fractions}"
        raise UserError(
            f"{name}: split {split!r} is empty ({len(records)} images under {str(source)!r}, "
            f"split by {how}); use more images or give the split a larger fraction"
        )
    images, masks = load_records(
        records, channels=channels, size=size, fit=fit, name=name, window=window
    )
    idx = np.asarray(chosen)
    picked = {key: torch.from_numpy(arr[idx]) for key, arr in masks.items()}
    ds = ArrayDataset(
        torch.from_numpy(images[idx]).float().div_(255.0),
        torch.tensor([records[i].label for i in chosen], dtype=torch.long),
        [ids[i] for i in chosen],
        tuple(class_names),
        masks=picked.pop("mask", None),
        organ_masks=picked.pop("organ_mask", None),
        extras=picked,  # the named extra masks, mask_<name>
        name=name,
        provenance={"dataset": name, "source": str(source), "split": record},
        split_ids={s: [ids[i] for i in v] for s, v in parts.items()},
    )
    return ds
