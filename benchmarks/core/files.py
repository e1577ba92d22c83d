"""Atomic file writes: the one routine every part of the harness writes results with.

A file is written under a hidden temporary name in its own folder and renamed into place,
so a reader (or a run killed mid-write) sees the old file whole or the new one whole,
never half of one. Leftover temporaries are named ``.NAME.*.tmp``.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a" / "note.txt"
>>> atomic_write(path, "hello")
>>> path.read_text()
'hello'
>>> atomic_write(path, lambda tmp: tmp.write_bytes(b"bye"))
>>> path.read_text()
'bye'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_GLOB = ".*.tmp"  # what a killed atomic write leaves behind


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object]) -> None:
    """Write ``data`` (text, bytes, or a function that writes the file at the path it is
    given) to ``path`` atomically, creating the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            if isinstance(data, (str, bytes)):
                fh.write(data)
        if callable(data):
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
