"""Files: written so that a reader, or a process killed mid-write, never sees a partial one; hashed in
blocks, so that a multi-gigabyte shard or archive is never read into memory at once; locked, so that
processes on several hosts sharing a folder take turns at a file."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Within: an exclusive lock on `path` (created empty if missing), waiting for any other holder.

    An OS lock (flock) rather than a lock file whose existence is the lock: the kernel drops it when its
    holder dies, so a killed process never leaves a stale lock behind. On NFS the Linux client turns flock
    into the server's byte-range locks, so it holds across hosts (Lustre: with its `flock` mount option).
    The lock belongs to this open of the file: a second `locked(path)` in the same process waits for the
    first, so never nest them. Lock a file that is only ever written in place: a lock on a file that a
    rename replaces guards the old inode, which a newcomer no longer opens."""
    import fcntl

    with open(path, "a") as handle:  # NFS locks need a file opened for writing
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
