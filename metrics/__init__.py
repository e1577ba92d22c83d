"""Evaluation metrics and their registry. Importing the package registers every metric
module in it; ``METRICS`` is the registry."""

import importlib
import pkgutil

from cambench.metrics.base import METRICS, MetricContext, MetricInfo, Scores

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METRICS", "MetricContext", "MetricInfo", "Scores"]
