"""Explanation methods and their registry.

Importing the package imports every module in it, which registers its methods, so a new
method file needs no edit here. ``METHODS`` is the registry.
"""

import importlib
import pkgutil

from cambench.benchmarks.core.errors import NotApplicable
from cambench.cams.base import METHODS, Explanation, MethodInfo

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Explanation", "MethodInfo", "NotApplicable"]
