"""Where a dataset's samples came from and how it was derived: the values a manifest records.

* :class:`Provenance`: source URL, retrieval time, license and, for synthetic data,
  the generating model; recorded for the whole dataset or for index ranges
  (:class:`SourceRange`), down to single samples.
* :class:`Transform`: the filter that derived a dataset from its parent: the SHA-256
  of the filter's source file and its parameters as canonical JSON.
* :class:`ManifestReference`: how a child manifest names its parent, and a run its
  training set: Merkle root, sample count and the manifest file's SHA-256.

Example:
    >>> Provenance(source_url="https://example.org/cifar", license="MIT").to_json()
    {'source_url': 'https://example.org/cifar', 'license': 'MIT'}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from torch_integrity.canonical import canonical_json
from torch_integrity.digest import BYTES_ALGORITHM, STATE_ALGORITHM, Digest, sha256_bytes
from torch_integrity.errors import MalformedFileError, UsageError
from torch_integrity.fsutil import read_file_bytes


@dataclass(frozen=True)
class Provenance:
    """Where samples came from. Every field is optional free text, except the time.

    Attributes:
        source_url: where the data was downloaded from.
        retrieved_at: when, as ISO 8601 (e.g. ``2024-05-01T12:00:00Z``).
        license: the data's license (an SPDX identifier where one exists).
        generator: for synthetic data, the generating model (name, version, digest).
    """

    source_url: str | None = None
    retrieved_at: str | None = None
    license: str | None = None
    generator: str | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and not isinstance(value, str):
                raise UsageError(f"provenance {item.name} must be a string, not {type(value).__name__}")
        if self.retrieved_at is not None:
            try:
                datetime.fromisoformat(self.retrieved_at)
            except ValueError:
                raise UsageError(f"retrieved_at {self.retrieved_at!r} is not an ISO 8601 time") from None

    def to_json(self) -> dict[str, str]:
        """The fields that are set."""
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}

    @classmethod
    def from_json(cls, data: Any) -> Provenance:
        """Parse :meth:`to_json`'s form; unknown keys are refused."""
        names = {item.name for item in fields(cls)}
        if not isinstance(data, Mapping) or not set(data) <= names:
            raise UsageError(f"provenance may hold only {sorted(names)}, got {data!r}")
        return cls(**data)


@dataclass(frozen=True)
class SourceRange:
    """Provenance of samples ``start`` to ``stop - 1``."""

    start: int
    stop: int
    provenance: Provenance

    def to_json(self) -> dict[str, Any]:
        """``{"start", "stop", **provenance}``."""
        return {"start": self.start, "stop": self.stop, **self.provenance.to_json()}


def normalize_provenance(value: Any, count: int, *, stored: bool = False) -> tuple[SourceRange, ...]:
    """Turn the ways provenance can be given into sorted, disjoint :class:`SourceRange` values.

    Args:
        value: ``None``; a :class:`Provenance` or its dict (every sample); a sequence of
            ``(range(start, stop), Provenance)`` pairs or :class:`SourceRange` values;
            or (``stored``) the list a manifest header holds.
        count: the number of samples.
        stored: parse a header's list, raising ``MalformedFileError`` on errors.
    """
    try:
        ranges = _ranges(value, count, stored)
        ranges.sort(key=lambda r: r.start)
        for before, after in pairwise(ranges):
            if after.start < before.stop:
                raise UsageError(f"provenance ranges overlap at sample {after.start}")
        for r in ranges:
            if type(r.start) is not int or type(r.stop) is not int or not 0 <= r.start < r.stop <= count:
                raise UsageError(f"provenance range [{r.start}, {r.stop}) is not inside the {count} samples")
        return tuple(ranges)
    except UsageError as exc:
        if stored:
            raise MalformedFileError(f"manifest provenance: {exc}") from None
        raise


def _ranges(value: Any, count: int, stored: bool) -> list[SourceRange]:
    if value is None:
        return []
    if stored:
        if not isinstance(value, list):
            raise UsageError("must be a list of ranges")
        ranges = []
        for entry in value:
            if not isinstance(entry, dict) or "start" not in entry or "stop" not in entry:
                raise UsageError(f"every range is an object with start and stop, got {entry!r}")
            rest = {key: item for key, item in entry.items() if key not in ("start", "stop")}
            ranges.append(SourceRange(entry["start"], entry["stop"], Provenance.from_json(rest)))
        return ranges
    if isinstance(value, Provenance | Mapping):
        provenance = value if isinstance(value, Provenance) else Provenance.from_json(value)
        return [SourceRange(0, count, provenance)] if count else []
    if isinstance(value, Sequence) and not isinstance(value, str):
        ranges = []
        for item in value:
            if isinstance(item, SourceRange):
                ranges.append(item)
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], range) and item[0].step == 1:
                provenance = item[1] if isinstance(item[1], Provenance) else Provenance.from_json(item[1])
                ranges.append(SourceRange(item[0].start, item[0].stop, provenance))
            else:
                raise UsageError(f"provenance entries must be (range(start, stop), Provenance) pairs, got {item!r}")
        return ranges
    raise UsageError(f"provenance must be a Provenance, a dict or a list of ranges, not {type(value).__name__}")


@dataclass(frozen=True)
class Transform:
    """The filter that produced a dataset from its parent.

    Attributes:
        code_digest: SHA-256 of the filter's source file bytes.
        code_name: the file's name (informational; the digest is what is checked).
        params: the filter's parameters (JSON; stored as canonical JSON).
    """

    code_digest: Digest
    code_name: str
    params: Any = None

    def __post_init__(self) -> None:
        if self.code_digest.algorithm != BYTES_ALGORITHM:
            raise UsageError(f"a transform's code digest is a plain {BYTES_ALGORITHM} of its source file")
        try:
            canonical_json(self.params)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"transform parameters must be JSON (no NaN): {exc}") from None

    @classmethod
    def from_file(cls, code_file: str | Path, params: Any = None) -> Transform:
        """Describe a filter by its source file and parameters.

        Example:
            >>> import tempfile, pathlib
            >>> f = pathlib.Path(tempfile.mkdtemp()) / "dedupe.py"
            >>> _ = f.write_text("def keep(ds): return ds\\n")
            >>> Transform.from_file(f, {"threshold": 0.9}).code_name
            'dedupe.py'
        """
        path = Path(code_file)
        return cls(sha256_bytes(read_file_bytes(path)), path.name, params)

    def to_json(self) -> dict[str, Any]:
        """``{"code_digest", "code_name", "params"}``."""
        return {"code_digest": str(self.code_digest), "code_name": self.code_name, "params": self.params}

    @classmethod
    def from_json(cls, data: Any) -> Transform:
        """Parse :meth:`to_json`'s form (``MalformedFileError`` otherwise)."""
        if not isinstance(data, Mapping) or set(data) != {"code_digest", "code_name", "params"}:
            raise MalformedFileError(f"not a transform record (code_digest, code_name, params): {data!r}")
        if not isinstance(data["code_name"], str):
            raise MalformedFileError("transform code_name must be a string")
        try:
            return cls(Digest.parse(data["code_digest"]), data["code_name"], data["params"])
        except UsageError as exc:
            raise MalformedFileError(f"transform record: {exc}") from None


@dataclass(frozen=True)
class ManifestReference:
    """How a run or a child manifest names a manifest.

    Attributes:
        root: the Merkle root over the sample digests.
        count: number of samples.
        file_digest: SHA-256 of the manifest file (covers header, provenance, lineage).
    """

    root: Digest
    count: int
    file_digest: Digest

    def to_json(self) -> dict[str, Any]:
        """``{"root", "count", "file_digest"}``, as recorded under ``data_manifest``."""
        return {"root": str(self.root), "count": self.count, "file_digest": str(self.file_digest)}

    @classmethod
    def from_json(cls, data: Any) -> ManifestReference:
        """Parse :meth:`to_json`'s form (``MalformedFileError`` otherwise)."""
        if not isinstance(data, Mapping) or set(data) != {"root", "count", "file_digest"}:
            raise MalformedFileError(f"not a manifest reference (root, count, file_digest): {data!r}")
        count = data["count"]
        if type(count) is not int or count < 0:
            raise MalformedFileError(f"manifest reference count must be a non-negative integer: {count!r}")
        root, file_digest = Digest.parse(data["root"]), Digest.parse(data["file_digest"])
        if root.algorithm != STATE_ALGORITHM or file_digest.algorithm != BYTES_ALGORITHM:
            raise MalformedFileError(f"manifest reference has the wrong digest kinds: {data!r}")
        return cls(root, count, file_digest)
