"""The adapter files' writing and reading: files written atomically as a set (a crash mid-write leaves the old
files, or none, never a half-written one), and JSON read so that any malformed text is one JSONDecodeError."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_beside(path: Path) -> str:
    """An empty temporary file in `path`'s directory (so that renaming it over `path` is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


@contextmanager
def naming_failures(path: Path) -> Iterator[None]:
    """An OSError from a write (a full disk: EFBIG, ENOSPC) names no file; give it the one being written."""
    try:
        yield
    except OSError as err:
        if err.filename is None or str(err.filename).endswith(".tmp"):
            err.filename = str(path)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_all(contents: dict[Path, bytes | str]) -> None:
    """Write several files that belong together (text as UTF-8): each is written in full beside its place
    before the first replaces anything, so a failed write (a full disk) leaves all the old files, never a mix."""
    staged = {}
    try:
        for path, content in contents.items():
            tmp = temporary_beside(path)
            staged[tmp] = path
            with naming_failures(path):
                Path(tmp).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            os.chmod(tmp, 0o666 & ~current_umask())
        for tmp, path in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            Path(tmp).unlink(missing_ok=True)


def loads_json(text: str, **options):
    """json.loads, where an integer past Python's 4,300-digit limit or nesting too deep to parse is a
    JSONDecodeError like any other malformed text (json.loads raises ValueError and RecursionError there)."""
    try:
        return json.loads(text, **options)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as err:
        reason = "it nests too deeply to parse" if isinstance(err, RecursionError) else str(err).split(";")[0]
        raise json.JSONDecodeError(reason, text, 0) from None
