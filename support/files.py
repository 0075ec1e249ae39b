"""Atomic writes of one file, a lock file that keeps two processes from doing the same work at once, and a
file's SHA-256 (several files written atomically as a set: lora/files.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lora.files import current_umask, naming_failures, temporary_beside


@contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if need be) for the block; yields whether it was taken.

    The kernel releases the lock when its holder exits, however it exits, so a lock left by a killed
    process never blocks anyone. With blocking=False the block runs at once, told False if another
    process holds the lock.
    """
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        with naming_failures(path):
            write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: others could not read the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
