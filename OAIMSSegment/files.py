"""File safety shared by every writer: one atomic write and one sha256.

Weights, model cards, proposal models and the site store all write through
:func:`atomic_write_bytes`, so every file the engine writes is either the old one or the new
one after a crash, never a mix, and the rename is made durable by an fsync of the folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import time
from pathlib import Path

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "sha256_bytes", "sha256_file", "fsync_dir", "replace",
    "open_nofollow", "read_bytes_nofollow", "is_symlink",
]

#: ``os.open`` flag that refuses a symbolic link as the last path component (0 where the OS has none).
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX only: Windows cannot open folders for fsync)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: Path, dst: Path) -> None:
    """``os.replace``; on Windows a reader holding ``dst`` open makes it fail briefly, so retry."""
    for attempt in range(10 if os.name == "nt" else 1):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 9:
                raise
            time.sleep(0.05 * (attempt + 1))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644, make_parents: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a mix.

    The bytes go to a temporary file in the same folder, which is fsynced, renamed over ``path``
    and made durable by an fsync of the folder. ``mode`` is applied before the rename (``mkstemp``
    creates 0600; shipped and shared files must be readable). A failure removes the temporary file
    and leaves ``path`` as it was.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            # fchmod, not chmod: a name swapped for a symlink meanwhile must not redirect it.
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text (model cards, manifests)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_symlink(path: str | os.PathLike) -> bool:
    """True if ``path`` itself is a symbolic link (or a Windows junction); False if it is absent."""
    try:
        return Path(path).is_symlink() or bool(getattr(Path(path), "is_junction", lambda: False)())
    except OSError:
        return False


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses to follow a symbolic link at ``path`` (``OSError`` ELOOP).

    ``O_NOFOLLOW`` makes the refusal atomic on POSIX; where the OS lacks it (Windows) the link
    is checked with ``lstat`` first. Folders above ``path`` are the caller's to check.
    """
    if not O_NOFOLLOW and is_symlink(path):
        raise OSError(errno.ELOOP, "is a symbolic link", str(path))
    return os.open(path, flags | O_NOFOLLOW | getattr(os, "O_BINARY", 0), mode)


def read_bytes_nofollow(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of ``path``, refusing a symbolic link (see :func:`open_nofollow`); at most
    ``limit + 1`` bytes are read when ``limit`` is given, so callers can tell "too big" apart."""
    fd = open_nofollow(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        return handle.read() if limit is None else handle.read(limit + 1)
