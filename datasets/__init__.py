"""Dataset loaders, synthetic ground-truth datasets, and their registry.

This package shadows Hugging Face's ``datasets`` when both are importable; the harness
never imports that package. Importing it registers every dataset module in it.
"""

import importlib
import pkgutil

from cambench.datasets.base import DATASETS, ArrayDataset, DatasetInfo, ImageDataset

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "ImageDataset"]
