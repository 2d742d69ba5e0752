"""Files: written so that a reader, or a process killed mid-write, never sees a partial one; hashed in
blocks, so that a multi-gigabyte shard or archive is never read into memory at once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable) -> None:
    """Write through a hidden temporary file beside `path` (`.NAME.tmp`, which folder readers such as
    `rebased data prepare` skip), then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as sha256sum prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
