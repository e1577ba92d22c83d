"""Atomic file writes: the one routine every part of the harness writes results with.

A file is written under a hidden temporary name in its own folder and renamed into place,
so a reader (or a run killed mid-write) sees the old file whole or the new one whole,
never half of one. Leftover temporaries are named ``.NAME.*.tmp``.

A write that fails for a reason of the machine (a full disk, a quota, a read-only file
system, no permission) raises ``WriteError``: a ``UserError`` whose one line names the file
and the fix, and still an ``OSError`` for a caller that tolerates a failed write. The
temporary is removed and the old file stays as it was.

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

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cambench.benchmarks.core.errors import UserError

TEMP_GLOB = ".*.tmp"  # what a killed atomic write leaves behind
ELSEWHERE = "write to another folder"  # the fix a write error suggests unless told another


class WriteError(UserError, OSError):
    """A file could not be written (disk full, quota, read-only, no permission): one line
    naming the file and the fix. ``errno``, ``strerror`` and ``filename`` are the cause's."""

    def __init__(self, message: str, cause: OSError | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = cause.errno if cause is not None else None
        self.strerror = cause.strerror if cause is not None else None
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def write_error(exc: OSError, path: str | Path, fix: str = ELSEWHERE) -> WriteError:
    """The ``WriteError`` for ``exc``, raised writing ``path``; ``fix`` says where else to
    write ("use another --out").

    >>> str(write_error(OSError(errno.ENOSPC, "No space left on device"), "r/x.csv", "use another --out"))
    'no space left on device writing r/x.csv; free space or use another --out'
    """
    if isinstance(exc, WriteError):
        return exc
    code = exc.errno
    if code == errno.ENOSPC:
        message = f"no space left on device writing {path}; free space or {fix}"
    elif code == getattr(errno, "EDQUOT", None):
        message = f"disk quota exceeded writing {path}; free space or {fix}"
    elif code == errno.EROFS:
        message = f"read-only file system: cannot write {path}; {fix}"
    elif code in (errno.EACCES, errno.EPERM):
        message = f"permission denied writing {path}; make it writable or {fix}"
    else:
        why = exc.strerror or str(exc) or type(exc).__name__
        message = f"cannot write {path} ({why}); {fix}"
    return WriteError(message, exc, str(path))


def atomic_write(
    path: str | Path, data: str | bytes | Callable[[Path], object], *, fix: str = ELSEWHERE
) -> None:
    """Write ``data`` (text, bytes, or a function that writes the file at the path it is
    given) to ``path`` atomically, creating the folder if needed. An ``OSError`` becomes a
    ``WriteError`` naming ``path`` and ``fix``; the old file, if any, stays whole."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            if isinstance(data, (str, bytes)):
                fh.write(data)
        if callable(data):
            data(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(exc, path, fix) from exc
    finally:
        discard(tmp)


def discard(path: Path | None) -> None:
    """Remove a temporary file if there is one; a failure to remove it is not an error
    (the next run's clean-up of partial writes takes it)."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def check_writable(folder: str | Path, fix: str = ELSEWHERE) -> None:
    """Create ``folder`` if needed and write and remove a probe file in it, so a folder
    that cannot take files fails now (``WriteError`` naming it and ``fix``), not after
    the work meant for it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise write_error(exc, folder, fix) from None


def file_digest(path: str | Path) -> tuple[str, int]:
    """The sha256 (hex) and size in bytes of the file at ``path``."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
