"""The harness: suites, model zoo and training, runner, store, leaderboard, figures and the
regression gate. ``python -m benchmarks.run --help`` (or the ``cambench`` command) is the
entry point.

Installed, the four packages live under one namespace, ``cambench`` (``cambench.benchmarks``,
``cambench.cams``, ``cambench.metrics``, ``cambench.datasets``), so that they neither
overwrite nor shadow another distribution's top-level ``datasets`` or ``metrics`` (Hugging
Face's, say); the code imports itself by those names only. In a checkout, ``python -m
benchmarks.<command>`` first imports this file as the top-level ``benchmarks``: it then makes
``cambench`` this checkout's root, so the command runs the code beside it (not another
checkout's editable install), installed or not.
"""

if __name__ == "benchmarks":  # imported from a checkout as a top-level package

    def _checkout_as_cambench() -> None:
        import importlib.machinery
        import importlib.util
        import sys
        from pathlib import Path

        root = str(Path(__file__).resolve().parent.parent)
        if "cambench" in sys.modules:  # imported already (by a test runner, say): kept
            return
        spec = importlib.machinery.ModuleSpec("cambench", None, is_package=True)
        spec.submodule_search_locations = [root]
        sys.modules["cambench"] = importlib.util.module_from_spec(spec)

    _checkout_as_cambench()
    del _checkout_as_cambench
