"""BUSI, breast ultrasound images with radiologist tumour masks (Al-Dhabyani et al., Data in
Brief 28, 2020), in the layout of its widely used Kaggle copy::

    Dataset_BUSI_with_GT/<class>/<class> (N).png       the image (RGB or RGBA, grey content)
    Dataset_BUSI_with_GT/<class>/<class> (N)_mask.png  its tumour mask
    Dataset_BUSI_with_GT/<class>/<class> (N)_mask_1.png, _mask_2.png   more tumours

Classes normal, benign, malignant are labels 0, 1, 2 (normal images have empty masks); the
lesion mask is the union of an image's mask files. BUSI ships without a split: the
train/val/test split is stratified by class and seeded (``datasets._split``), 70/15/15 by
default.
"""

from __future__ import annotations

from pathlib import Path

from cambench.datasets._io import DATA_ROOT_ENV, Channels, Fit, Fractions, ImageSize, locate
from cambench.datasets._split import DEFAULT_FRACTIONS
from cambench.datasets.base import DATASETS, ArrayDataset
from cambench.datasets.folder import load_folder

CLASSES = ("normal", "benign", "malignant")
FOLDER = "Dataset_BUSI_with_GT"
DEFAULT_SIZE = 128
HOW_TO_GET = (
    "Download 'Breast Ultrasound Images Dataset' from Kaggle "
    "(kaggle datasets download aryashah2k/breast-ultrasound-images-dataset) and unzip it so "
    f"DIR/{FOLDER}/benign, malignant and normal exist."
)


@DATASETS.register(
    "busi",
    source="real",
    masks=True,
    masks_option="masks",
    root_env=DATA_ROOT_ENV,
    how_to_get=HOW_TO_GET,
)
def busi(
    split: str,
    *,
    root: str | Path | None = None,
    image_size: ImageSize = None,
    seed: int = 0,
    channels: Channels = 1,
    masks: bool = True,
    fit: Fit = "stretch",
    fractions: Fractions = DEFAULT_FRACTIONS,
) -> ArrayDataset:
    """BUSI breast ultrasound (normal/benign/malignant) with tumour masks, seeded split.

    ``root`` holds ``Dataset_BUSI_with_GT/`` or is that folder. ``image_size`` None means
    128 x 128; with ``fit="stretch"`` (default) the aspect (about 1.2:1) is not kept, with
    ``fit="pad"`` it is and the image is padded with black. ``channels=3`` repeats the grey
    image for RGB models. ``masks=False`` reads no masks (classification only). Ids are
    ``<class>/<class> (N)``. Read once per process and cached.
    """
    base = locate(
        root,
        name="busi",
        candidates=[FOLDER],
        is_own=lambda p: all((p / c).is_dir() for c in CLASSES),
        expected=f"the {FOLDER} folder with benign/, malignant/ and normal/ inside",
        how_to_get=HOW_TO_GET,
    )
    return load_folder(
        split,
        base,
        image_size=DEFAULT_SIZE if image_size is None else image_size,
        seed=seed,
        classes=CLASSES,
        masks="sibling" if masks else None,
        mask_dir=None,
        channels=channels,
        fit=fit,
        fractions=fractions,
        name="busi",
    )
