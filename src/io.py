"""Atomic file writes: the one way attnlab writes a file that a reader (or a resumed run) opens later.

``atomic_write(path, data)`` writes ``<path>.<pid>.tmp`` beside the target, flushes and fsyncs it, renames it over
``path`` with ``os.replace`` and fsyncs the directory. A kill at any moment leaves the previous file whole (or no file),
never a 0-byte or partial one. The temp file is never in the system temp dir: that may be another filesystem, where a
rename is a copy and not atomic. A failed write removes the temp file and raises ``AtomicWriteError`` naming the path.
The temp name is fixed (``TMP_NAME`` parses it) so that ``checkpointing.remove_stale_tmp`` can tell the leftovers of
a killed writer by their pid.
"""
from __future__ import annotations

import os
import re
from typing import BinaryIO, Callable

TMP_NAME = re.compile(r"^(?P<target>.+)\.(?P<pid>\d+)\.tmp$")


class AtomicWriteError(OSError):
    """A file could not be written; the message names it and the folder to fix."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes; str, as UTF-8; or a callable that fills the binary file it is given, for writers that
    stream: ``torch.save``, ``savefig``) to ``path`` atomically, creating its folder. On any failure the temp file is
    removed and the old ``path`` (if any) is untouched; an OSError becomes ``AtomicWriteError``, others pass through."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, AtomicWriteError):
            msg = f"could not write {path}: {e.strerror or e}. Fix: make {directory} writable."
            raise AtomicWriteError(msg) from e
        raise
