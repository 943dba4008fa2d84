"""Replace a file so that a crash leaves the old bytes or the new ones, never a mix."""

from __future__ import annotations

import os
import time
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to a temp file, fsync it, rename it over path, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def move_aside(path: Path, into: Path) -> Path:
    """Move a file that cannot be trusted into the folder `into` (named with the time, so
    nothing there is overwritten); return where it went. Nothing is deleted: a person may
    want to look at it."""
    into.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dest = into / f"{stamp}-{path.name}"
    n = 1
    while dest.exists():
        dest = into / f"{stamp}-{n}-{path.name}"
        n += 1
    os.replace(path, dest)
    return dest
