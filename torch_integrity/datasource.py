"""Where samples come from when a manifest is built: map-style datasets and folders of files.

Both sources yield ``(raw sample digest, relative path or None)`` in index order:

* a map-style dataset: ``digest_sample(dataset[i])`` for ``i`` in ``range(len(dataset))``;
* a folder: every regular file as the sample ``(relative_path, file_bytes)``, in
  code-point order of the relative paths, streamed from disk; symlinks and special
  files are refused.

Long builds draw a one-line progress report on stderr when it is a terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch_integrity.errors import UnsafePathError, UsageError
from torch_integrity.rng import derive_seed, forked_rng
from torch_integrity.sample_digest import digest_file_sample, digest_sample_bytes


class _Progress:
    """A one-line progress report on stderr, redrawn at most twice a second."""

    def __init__(self, enabled: bool | None, total: int | None, what: str) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.what = total, what
        self.started = self.shown = time.monotonic()

    def update(self, done: int, nbytes: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.shown < 0.5:
            return
        self.shown = now
        self._draw(done, nbytes, now, "\r")

    def close(self, done: int, nbytes: int) -> None:
        if self.enabled:
            self._draw(done, nbytes, time.monotonic(), "\r")
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self, done: int, nbytes: int, now: float, start: str) -> None:
        elapsed = max(now - self.started, 1e-9)
        of = f"/{self.total:,} ({100 * done / self.total:.0f}%)" if self.total else ""
        mb = f", {nbytes / 1e6:,.0f} MB" if nbytes else ""
        sys.stderr.write(f"{start}{self.what}: {done:,}{of}{mb}, {done / elapsed:,.0f}/s ")
        sys.stderr.flush()


def iter_folder(folder: Path) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, relative_path)`` for every file under ``folder``, sorted by relative path.

    Directories are visited with entries ordered by ``name`` for files and ``name + "/"``
    for folders, which yields exactly the code-point order of the full relative paths
    without holding them all. Symlinks and special files are refused.
    """
    if folder.is_symlink():
        raise UnsafePathError(f"{folder} is a symlink; give the real folder")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")

    def visit(directory: Path, prefix: str) -> Iterator[tuple[Path, str]]:
        with os.scandir(directory) as scan:
            entries = []
            for entry in scan:
                relative = prefix + entry.name
                try:
                    relative.encode("utf-8")
                except UnicodeEncodeError:
                    raise UsageError(f"{directory}: a file name is not valid UTF-8 ({relative!r})") from None
                if entry.is_symlink():
                    raise UnsafePathError(f"{relative} in {folder} is a symlink; data folders must hold real files")
                if entry.is_dir(follow_symlinks=False):
                    entries.append((entry.name + "/", relative, True))
                elif entry.is_file(follow_symlinks=False):
                    entries.append((entry.name, relative, False))
                else:
                    raise UsageError(f"{relative} in {folder} is neither a regular file nor a folder")
        entries.sort()
        for _, relative, is_dir in entries:
            if is_dir:
                yield from visit(folder / relative, relative + "/")
            else:
                yield folder / relative, relative

    return visit(folder, "")


def is_folder_source(source: Any) -> bool:
    """Whether ``source`` names a folder (a ``str`` or path) rather than a dataset."""
    return isinstance(source, str | os.PathLike)


def fetch_for_manifest(dataset: Any, index: int) -> Any:
    """``dataset[index]`` as a manifest hashes it: under an RNG seeded from the index alone.

    A dataset whose ``__getitem__`` draws random augmentation then gives the same sample
    every time it is hashed, here and when a replay checks the samples it feeds.
    """
    if type(dataset) in (range, list, tuple):  # plain containers run no code of their own
        return dataset[index]
    with forked_rng(derive_seed("torch-integrity:manifest-fetch", index)):
        return dataset[index]


def iter_sample_digests(source: Any, *, progress: bool | None = None) -> Iterator[tuple[bytes, str | None]]:
    """Yield ``(raw digest, relative path or None)`` for every sample of a dataset or folder."""
    if is_folder_source(source):
        folder = Path(source)
        bar = _Progress(progress, None, f"hashing files in {folder}")
        count = nbytes = 0
        for path, relative in iter_folder(folder):
            raw, size = digest_file_sample(path, relative)
            yield raw, relative
            count, nbytes = count + 1, nbytes + size
            bar.update(count, nbytes)
        bar.close(count, nbytes)
        return
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise UsageError(
            f"{type(source).__name__} is not a map-style dataset (needs __len__ and __getitem__); "
            "iterable datasets have no stable sample order to pin"
        )
    total = len(source)
    bar = _Progress(progress, total, "hashing samples")
    for index in range(total):
        yield digest_sample_bytes(fetch_for_manifest(source, index)), None
        if not index & 1023:
            bar.update(index, 0)
    bar.close(total, 0)
