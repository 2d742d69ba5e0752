"""Writing files so that a reader, or a process killed mid-write, never sees a partial one. No torch here:
commands that only move text (`rebased data corpus`) use it too."""

from __future__ import annotations

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
