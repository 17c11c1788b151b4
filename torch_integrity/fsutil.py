"""Durable, atomic file writes and symlink-safe reads inside a run directory.

An atomic write goes to a temporary file in the destination folder, is fsynced,
renamed over the destination and the folder is fsynced, so a crash leaves either
the old file or the new one, never a mix. Temporary files carry :data:`TEMP_PREFIX`
so a later run can recognise (and report) leftovers of a killed writer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from torch_integrity.errors import MalformedFileError, MissingFileError, UnsafePathError, UsageError

TEMP_PREFIX = ".tmp-"


def fsync_directory(path: Path) -> None:
    """Flush a directory entry change (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(destination: Path) -> Iterator[BinaryIO]:
    """Open a temporary file that replaces ``destination`` durably on success.

    On any exception the temporary file is removed and ``destination`` is untouched.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> with atomic_writer(p) as f:
        ...     _ = f.write(b"hello")
        >>> p.read_bytes()
        b'hello'
    """
    folder = destination.parent
    temp = folder / f"{TEMP_PREFIX}{destination.name}.{secrets.token_hex(6)}"
    handle = open(temp, "xb")  # noqa: SIM115 - closed below on every path
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temp, destination)
        fsync_directory(folder)
    except BaseException:
        handle.close()
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def atomic_write_bytes(destination: Path, data: bytes) -> None:
    """Write ``data`` to ``destination`` atomically and durably."""
    with atomic_writer(destination) as handle:
        handle.write(data)


def resolve_inside(root: Path, relative: str) -> Path:
    """Resolve a relative path recorded in a run directory, refusing escapes and symlinks.

    Args:
        root: the run directory.
        relative: a POSIX relative path as recorded (e.g. ``checkpoints/step-1.safetensors``).

    Returns:
        The absolute path, guaranteed to lie inside ``root`` with no symlink on the way.

    Raises:
        UnsafePathError: absolute paths, ``..``, or any symlink component.
        MissingFileError: the file does not exist.
    """
    if not isinstance(relative, str) or not relative or relative.startswith("/") or "\\" in relative:
        raise UnsafePathError(f"recorded path {relative!r} is not a relative POSIX path")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePathError(f"recorded path {relative!r} leaves the run directory")
    current = root
    for part in parts:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise MissingFileError(f"{relative} is recorded but missing from {root}") from None
        if stat.S_ISLNK(info.st_mode):
            raise UnsafePathError(f"{current} is a symlink; run directories must hold real files")
    return current


def open_regular_file(path: Path) -> tuple[int, int]:
    """Open a regular file for reading without following a final symlink.

    Returns:
        ``(file descriptor, size in bytes)``; the caller closes the descriptor.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise MissingFileError(f"{path} does not exist") from None
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(f"{path} is a symlink; refusing to follow it") from None
        raise UsageError(f"cannot open {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise MalformedFileError(f"{path} is not a regular file")
    return fd, info.st_size


def read_file_bytes(path: Path, *, max_bytes: int | None = None) -> bytearray:
    """Read a regular file into memory without following a final symlink.

    The returned buffer is what callers hash and then parse, so the bytes verified are
    the bytes used even if the file changes on disk afterwards.
    """
    fd, size = open_regular_file(path)
    try:
        if max_bytes is not None and size > max_bytes:
            raise MalformedFileError(f"{path} is {size} bytes, more than the {max_bytes} allowed")
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            count = os.readv(fd, [view[filled:]])
            if count == 0:
                raise MalformedFileError(f"{path} shrank while it was being read")
            filled += count
        return buffer
    finally:
        os.close(fd)
