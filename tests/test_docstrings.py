"""The docstring examples of every module of the four packages, run as tests: the docs
cannot drift.

They run by the modules' installed names (``cambench.cams.base``); pytest's
``--doctest-modules`` would import each file a second time under its folder's name
(``cams.base``), registering every method and metric twice.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("cambench.benchmarks", "cambench.cams", "cambench.datasets", "cambench.metrics")


def _modules() -> list[str]:
    names = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        names.append(name)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{name}.")]
    return sorted(names)


def _with_examples() -> list[str]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [
        name
        for name in _modules()
        if any(t.examples for t in finder.find(importlib.import_module(name)))
    ]


def test_every_module_of_the_packages_imports():
    assert len(_modules()) > 40  # the walk found the packages' modules, not an empty folder


@pytest.mark.parametrize("name", _with_examples())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
    assert result.attempted > 0
