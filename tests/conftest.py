"""Tests import the harness as ``cambench.*`` and must test this checkout, whatever checkout
an editable install points at: importing the top-level ``benchmarks`` (this checkout's root
is on sys.path when pytest runs from it) makes ``cambench`` this checkout's root first."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import benchmarks  # noqa: E402,F401  (its import maps cambench to ROOT)
