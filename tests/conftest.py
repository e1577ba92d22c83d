"""Tests import the harness as ``cambench.*`` and must test this checkout, whatever checkout
an editable install points at: importing the top-level ``benchmarks`` (this checkout's root
is on sys.path when pytest runs from it) makes ``cambench`` this checkout's root first."""

import contextlib
import io
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import benchmarks  # noqa: E402,F401  (its import maps cambench to ROOT)


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory):
    """The smoke suite run as the README's first command runs it, with ``--report``: its
    run folder and what it printed on stdout (the headline table)."""
    from cambench.benchmarks.run import main

    root = tmp_path_factory.mktemp("smoke-report")
    out, printed = root / "run", io.StringIO()
    args = ["--suite", "smoke", "--out", str(out), "--cache", str(root / "cache")]
    with contextlib.redirect_stdout(printed):
        assert main([*args, "--no-progress", "--report"]) == 0
    return out, printed.getvalue()
