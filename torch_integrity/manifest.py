"""Dataset manifests: every sample's digest, their Merkle root, provenance and lineage.

A manifest pins a training set down sample by sample. It is built from a map-style
dataset (``dataset[i]`` for ``i < len(dataset)``, each sample hashed with
:func:`digest_sample`) or from the files of a folder (each file is the sample
``(relative_path, file_bytes)``, files sorted by relative path, symlinks refused)::

    torch-integrity data-manifest data/train --out train.manifest --license CC-BY-4.0

File format ``torch-integrity-manifest-v1`` (see docs/data-provenance.md)::

    <canonical JSON header>\\n               format, kind, count, root, algorithm, ...
    <count x 32 bytes>                       raw sample digests, index order
    <count x (u32 LE length, UTF-8 path)>    folder manifests only, sorted

The root is the RFC 6962 Merkle root over the raw sample digests. Building streams:
:func:`write_manifest` spools digests to disk and keeps ``O(log n)`` hashes, so memory
does not grow with the dataset; :func:`build_manifest` keeps the digests in one
``bytearray`` (32 bytes a sample, no per-sample Python objects). Loading re-computes
the root (tampering raises :class:`TamperedError`) and parses the format strictly
(:class:`MalformedFileError`).
"""

from __future__ import annotations

import hashlib
import io
import struct
import tempfile
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.datasource import is_folder_source, iter_sample_digests
from torch_integrity.digest import BYTES_ALGORITHM, Digest, sha256_bytes
from torch_integrity.errors import (
    DigestMismatchError,
    MalformedFileError,
    MissingFileError,
    TamperedError,
    UsageError,
)
from torch_integrity.fsutil import atomic_writer, read_file_bytes
from torch_integrity.proofs import DIGEST_SIZE, ROOT_ALGORITHM, MerkleAccumulator, root_of_digests
from torch_integrity.provenance import ManifestReference, Provenance, SourceRange, Transform, normalize_provenance
from torch_integrity.sample_digest import SAMPLE_ALGORITHM, digest_sample

__all__ = [
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestReference",
    "Provenance",
    "SourceRange",
    "Transform",
    "build_manifest",
    "digest_sample",
    "load_manifest",
    "manifest_reference",
    "write_manifest",
]

MANIFEST_FORMAT = "torch-integrity-manifest-v1"
MAX_HEADER_BYTES = 64 << 20
_U32 = struct.Struct("<I")
_HEADER_KEYS = {"algorithm", "count", "format", "kind", "parent", "provenance", "root", "transform"}


@dataclass(frozen=True, eq=False)
class Manifest:
    """A verified manifest held in memory (32 bytes a sample, plus paths for folders).

    Attributes:
        kind: ``"dataset"`` (built from ``dataset[i]``) or ``"folder"`` (files).
        count: number of samples.
        root: ``sha256-merkle-v1`` root over the raw sample digests in index order.
        file_digest: SHA-256 of the manifest's file bytes (of its serialisation, when
            built in memory and not saved yet: the encoding is canonical).
        provenance: where samples came from, by index range.
        parent: the manifest this one was derived from, if any.
        transform: the filter that derived it from ``parent``, if recorded.
        digests: the raw sample digests, ``count * 32`` bytes, read-only.
    """

    kind: str
    count: int
    root: Digest
    file_digest: Digest
    provenance: tuple[SourceRange, ...] = ()
    parent: ManifestReference | None = None
    transform: Transform | None = None
    digests: memoryview = field(default=memoryview(b""), repr=False)
    header_line: bytes = field(default=b"", repr=False)
    path_section: memoryview | None = field(default=None, repr=False)
    path_offsets: array[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.count

    def _check_index(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self.count:
            raise UsageError(f"sample index {index!r} is outside a manifest of {self.count} samples")

    def sample_digest(self, index: int) -> Digest:
        """The recorded ``sha256-sample-v1`` digest of sample ``index``."""
        self._check_index(index)
        return Digest(SAMPLE_ALGORITHM, self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE].hex())

    def sample_path(self, index: int) -> str | None:
        """For folder manifests, the relative path of file ``index``; else ``None``."""
        self._check_index(index)
        if self.path_section is None or self.path_offsets is None:
            return None
        start = self.path_offsets[index]
        (length,) = _U32.unpack_from(self.path_section, start)
        return bytes(self.path_section[start + 4 : start + 4 + length]).decode("utf-8")

    def provenance_of(self, index: int) -> Provenance | None:
        """The provenance recorded for sample ``index``, if any."""
        self._check_index(index)
        return next((r.provenance for r in self.provenance if r.start <= index < r.stop), None)

    @property
    def reference(self) -> ManifestReference:
        """This manifest's :class:`ManifestReference`."""
        return ManifestReference(self.root, self.count, self.file_digest)

    def save(self, path: str | Path) -> None:
        """Write the manifest file atomically (its bytes hash to :attr:`file_digest`)."""
        with atomic_writer(Path(path)) as handle:
            handle.write(self.header_line)
            handle.write(self.digests)
            if self.path_section is not None:
                handle.write(self.path_section)


def manifest_reference(manifest: Manifest | ManifestReference) -> dict[str, Any]:
    """The dict a run records under ``run_start`` ``data_manifest``.

    Example:
        >>> m = build_manifest([1, 2], progress=False)
        >>> sorted(manifest_reference(m))
        ['count', 'file_digest', 'root']
    """
    reference = manifest.reference if isinstance(manifest, Manifest) else manifest
    return reference.to_json()


# --- building -------------------------------------------------------------------------------


class _Collector:
    """Receives sample digests (and paths) into two writable streams; tracks the root."""

    def __init__(self, digests: IO[bytes], paths: IO[bytes]) -> None:
        self.digests, self.paths = digests, paths
        self.tree = MerkleAccumulator()
        self.paths_hash = hashlib.sha256()

    def collect(self, dataset: Any, progress: bool | None) -> None:
        for raw, relative in iter_sample_digests(dataset, progress=progress):
            self.tree.add(raw)
            self.digests.write(raw)
            if relative is not None:
                encoded = relative.encode("utf-8")
                entry = _U32.pack(len(encoded)) + encoded
                self.paths_hash.update(entry)
                self.paths.write(entry)

    def header_line(self, kind: str, provenance: Any, parent: Any, transform: Transform | None) -> bytes:
        count = self.tree.count
        parent_ref = _as_reference(parent)
        if transform is not None and not isinstance(transform, Transform):
            raise UsageError(f"transform must be a Transform (see Transform.from_file), not {type(transform).__name__}")
        header: dict[str, Any] = {
            "algorithm": SAMPLE_ALGORITHM,
            "count": count,
            "format": MANIFEST_FORMAT,
            "kind": kind,
            "parent": parent_ref.to_json() if parent_ref else None,
            "provenance": [r.to_json() for r in normalize_provenance(provenance, count)],
            "root": str(Digest(ROOT_ALGORITHM, self.tree.root().hex())),
            "transform": transform.to_json() if transform else None,
        }
        if kind == "folder":
            header["paths_digest"] = str(Digest(BYTES_ALGORITHM, self.paths_hash.hexdigest()))
        return canonical_json(header) + b"\n"


def _as_reference(parent: Any) -> ManifestReference | None:
    if parent is None or isinstance(parent, ManifestReference):
        return parent
    if isinstance(parent, Manifest):
        return parent.reference
    if isinstance(parent, Mapping):
        return ManifestReference.from_json(parent)
    raise UsageError(f"parent must be a Manifest, a ManifestReference or its dict, not {type(parent).__name__}")


def build_manifest(
    dataset: Any,
    *,
    provenance: Any = None,
    parent: Manifest | ManifestReference | Mapping[str, Any] | None = None,
    transform: Transform | None = None,
    progress: bool | None = None,
) -> Manifest:
    """Build a manifest in memory.

    Args:
        dataset: a map-style dataset (``len`` and ``dataset[i]``), or a folder path
            (``str``/``Path``): each file is a sample, in relative-path order.
        provenance: a :class:`Provenance` (or its dict) for every sample, or a list of
            ``(range(start, stop), Provenance)`` for parts of the dataset.
        parent: the manifest this dataset was derived from.
        transform: the filter that derived it (:meth:`Transform.from_file`).
        progress: show progress on stderr (default: when stderr is a terminal).

    Returns:
        The :class:`Manifest`, exactly as :func:`load_manifest` would return it from the
        file :meth:`Manifest.save` writes; its digests take 32 bytes a sample in one buffer.

    Example:
        >>> import torch
        >>> m = build_manifest([(torch.ones(2), 0), (torch.zeros(2), 1)], progress=False)
        >>> m.count, m.sample_digest(1) == digest_sample((torch.zeros(2), 1))
        (2, True)
    """
    digests, paths = io.BytesIO(), io.BytesIO()
    collector = _Collector(digests, paths)
    collector.collect(dataset, progress)
    kind = "folder" if is_folder_source(dataset) else "dataset"
    data = bytearray(collector.header_line(kind, provenance, parent, transform))
    data += digests.getbuffer()
    data += paths.getbuffer()
    del digests, paths
    return parse_manifest(data, file_digest=sha256_bytes(data), what="built manifest")


def write_manifest(
    dataset: Any,
    out: str | Path,
    *,
    provenance: Any = None,
    parent: Manifest | ManifestReference | Mapping[str, Any] | None = None,
    transform: Transform | None = None,
    progress: bool | None = None,
) -> ManifestReference:
    """Build a manifest straight to a file, in memory that does not grow with the dataset.

    Digests are spooled to an unnamed temporary file beside ``out`` while they are
    computed; the header (which needs the count and root) is written first, the
    spooled digests copied after it, and the file replaced atomically.

    Args:
        dataset, provenance, parent, transform, progress: as for :func:`build_manifest`.
        out: the manifest file to write (not inside a folder being hashed).

    Returns:
        The new manifest's :class:`ManifestReference`.
    """
    out = Path(out)
    kind = "folder" if is_folder_source(dataset) else "dataset"
    if kind == "folder" and out.resolve().is_relative_to(Path(dataset).resolve()):
        raise UsageError(f"the manifest {out} must not be written inside the folder it describes")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a folder")
    with tempfile.TemporaryFile(dir=out.parent) as digests, tempfile.TemporaryFile(dir=out.parent) as paths:
        collector = _Collector(digests, paths)
        collector.collect(dataset, progress)
        header_line = collector.header_line(kind, provenance, parent, transform)
        file_hash = hashlib.sha256(header_line)
        buffer = bytearray(1 << 16)
        with atomic_writer(out) as handle:
            handle.write(header_line)
            for spool in (digests, paths):
                spool.seek(0)
                while count := spool.readinto(buffer):
                    chunk = memoryview(buffer)[:count]
                    file_hash.update(chunk)
                    handle.write(chunk)
    return ManifestReference(
        Digest(ROOT_ALGORITHM, collector.tree.root().hex()),
        collector.tree.count,
        Digest(BYTES_ALGORITHM, file_hash.hexdigest()),
    )


# --- loading --------------------------------------------------------------------------------


def load_manifest(
    path: str | Path, *, expected: ManifestReference | Mapping[str, Any] | None = None
) -> Manifest:
    """Read a manifest file, verifying its root and, if given, an expected reference.

    Args:
        path: the manifest file (symlinks refused).
        expected: a reference from a trusted record (e.g. the run's ``data_manifest``);
            the file's digest, root and count must match it.

    Returns:
        The verified :class:`Manifest`.

    Raises:
        TamperedError: the digests do not give the recorded root, or the file is cut.
        DigestMismatchError: the file is not the ``expected`` one.
        MalformedFileError: not a manifest, or not in the exact format.
    """
    path = Path(path)
    try:
        data = read_file_bytes(path)
    except MissingFileError:
        raise UsageError(f"no manifest at {path}") from None
    file_digest = sha256_bytes(data)
    reference = _as_reference(expected)
    if reference is not None and reference.file_digest != file_digest:
        raise DigestMismatchError(f"manifest file {path}", reference.file_digest, file_digest)
    manifest = parse_manifest(data, file_digest=file_digest, what=str(path))
    if reference is not None and (reference.root, reference.count) != (manifest.root, manifest.count):
        raise DigestMismatchError(f"manifest {path}", reference.root, manifest.root)
    return manifest


def parse_manifest(data: bytes | bytearray, *, file_digest: Digest, what: str = "manifest") -> Manifest:
    """Parse and verify manifest bytes (see :func:`load_manifest`)."""
    newline = data.find(b"\n", 0, MAX_HEADER_BYTES + 1)
    if newline < 0:
        raise MalformedFileError(f"{what}: no header line within {MAX_HEADER_BYTES} bytes; not a manifest")
    header_line = bytes(data[: newline + 1])
    header = strict_loads(header_line[:-1], what=f"{what} header")
    kind = header.get("kind") if isinstance(header, dict) else None
    keys = _HEADER_KEYS | ({"paths_digest"} if kind == "folder" else set())
    if not isinstance(header, dict) or set(header) != keys or header.get("format") != MANIFEST_FORMAT:
        raise MalformedFileError(f"{what}: not a {MANIFEST_FORMAT} header (expected exactly the keys {sorted(keys)})")
    if canonical_json(header) + b"\n" != header_line:
        raise MalformedFileError(f"{what}: header is not canonical JSON")
    count = header["count"]
    if kind not in ("dataset", "folder") or type(count) is not int or count < 0:
        raise MalformedFileError(f"{what}: kind must be dataset or folder and count a non-negative integer")
    if header["algorithm"] != SAMPLE_ALGORITHM:
        raise MalformedFileError(f"{what}: sample algorithm {header['algorithm']!r} is not {SAMPLE_ALGORITHM}")
    root = Digest.parse(header["root"])
    if root.algorithm != ROOT_ALGORITHM:
        raise MalformedFileError(f"{what}: root is a {root.algorithm} digest, not {ROOT_ALGORITHM}")
    parent = ManifestReference.from_json(header["parent"]) if header["parent"] is not None else None
    transform = Transform.from_json(header["transform"]) if header["transform"] is not None else None

    body = memoryview(data).toreadonly()[newline + 1 :]
    size = count * DIGEST_SIZE
    if len(body) < size or (kind == "dataset" and len(body) != size):
        raise TamperedError(f"{what}: the header says {count} samples ({size} digest bytes), {len(body)} bytes follow")
    digests = body[:size]
    computed = Digest(ROOT_ALGORITHM, root_of_digests(digests).hex())
    if computed != root:
        raise TamperedError(f"{what}: recorded root {root} does not match its sample digests, which give {computed}")
    provenance = normalize_provenance(header["provenance"], count, stored=True)
    manifest = Manifest(kind, count, root, file_digest, provenance, parent, transform, digests, header_line)
    if kind == "dataset":
        return manifest
    paths = body[size:]
    if sha256_bytes(paths) != Digest.parse(header["paths_digest"]):
        raise TamperedError(f"{what}: file paths do not match the recorded paths digest")
    offsets = _path_offsets(paths, count, what)
    return Manifest(kind, count, root, file_digest, provenance, parent, transform, digests, header_line, paths, offsets)


def _path_offsets(paths: memoryview, count: int, what: str) -> array[int]:
    offsets: array[int] = array("Q")
    position, previous = 0, None
    for index in range(count):
        if position + 4 > len(paths):
            raise MalformedFileError(f"{what}: path table ends before entry {index}")
        (length,) = _U32.unpack_from(paths, position)
        if position + 4 + length > len(paths):
            raise MalformedFileError(f"{what}: path {index} runs past the end of the file")
        try:
            name = bytes(paths[position + 4 : position + 4 + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedFileError(f"{what}: path {index} is not UTF-8") from None
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise MalformedFileError(f"{what}: path {index} ({name!r}) is not a relative path inside the folder")
        if previous is not None and name <= previous:
            raise MalformedFileError(f"{what}: paths are not strictly sorted at entry {index} ({name!r})")
        offsets.append(position)
        position, previous = position + 4 + length, name
    if position != len(paths):
        raise MalformedFileError(f"{what}: {len(paths) - position} bytes after the path table")
    return offsets


def iter_digests(manifest: Manifest) -> Iterator[bytes]:
    """The raw sample digests in index order."""
    view = manifest.digests
    for offset in range(0, len(view), DIGEST_SIZE):
        yield view[offset : offset + DIGEST_SIZE].tobytes()
