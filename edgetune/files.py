"""Files written whole or not at all: checkpoints, weights, schemes, caches, reports.

A crash, a kill or a full disk while writing leaves the previous file or the new one, never
half of one: the data go to a temporary file in the same folder, are flushed to the disk,
and the temporary file is renamed over the target (an atomic step on POSIX file systems).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """write(tmp_path) then rename over `path`. The file is left readable by others (0644),
    as a plain open() would leave it, not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".edgetune-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _flush_to_disk(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _flush_to_disk(folder)  # the rename itself


def write_json(path: str, data: Any, indent: int = 1) -> None:
    """`data` as indented JSON, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")

    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    """`text` as a file, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def _flush_to_disk(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)
