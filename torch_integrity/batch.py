"""Content digests of training batches (``sha256-batch-v1``).

A batch is whatever the DataLoader yields: tensors, NumPy arrays, numbers, strings,
bytes, and dicts / lists / tuples / dataclasses / plain objects of these. It is
encoded with type tags and length prefixes (so ``["ab"]`` and ``["a", "b"]`` differ),
dict entries sorted by key, tensors as dtype, shape and raw little-endian bytes:

======== ==========================================================
tag      payload
======== ==========================================================
``T``    u64 header length, JSON ``{"dtype","shape"}``, u64 byte count, raw bytes
``A``    a NumPy array: as ``T`` (via a zero-copy tensor view where possible)
``D``    u64 count, then key, value, key, value ... sorted by the key's encoding
``L``    list: u64 count, items;  ``U`` tuple: same
``O``    object: its type's qualified name (as ``S``), then its fields as ``D``
``S``    u64 length, UTF-8;  ``B`` u64 length, bytes
``I``    int as ``S`` of its decimal form;  ``F`` IEEE-754 double, 8 bytes LE
``?``    one byte 0/1;  ``N`` None
======== ==========================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from torch_integrity.canonical import canonical_json
from torch_integrity.digest import Digest, dtype_name, tensor_byte_chunks
from torch_integrity.errors import UsageError

BATCH_ALGORITHM = "sha256-batch-v1"
_DOMAIN = b"torch-integrity:batch:v1\x00"
_MAX_DEPTH = 64


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


class _Encoder:
    def __init__(self) -> None:
        self.hasher = hashlib.sha256(_DOMAIN)

    def bytes_(self, tag: bytes, data: bytes) -> None:
        self.hasher.update(tag + _u64(len(data)) + data)

    def tensor(self, tag: bytes, tensor: torch.Tensor) -> None:
        header = canonical_json({"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)})
        self.hasher.update(tag + _u64(len(header)) + header + _u64(tensor.numel() * tensor.element_size()))
        for chunk in tensor_byte_chunks(tensor):
            self.hasher.update(chunk)

    def value(self, value: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise UsageError("batch nests deeper than 64 levels")
        if isinstance(value, torch.Tensor):
            self.tensor(b"T", value)
        elif isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            try:
                self.tensor(b"A", torch.from_numpy(array))
            except TypeError:  # dtypes torch cannot view (strings, objects): hash their text
                self.bytes_(b"A", canonical_json({"dtype": str(array.dtype), "shape": list(array.shape), "items": array.tolist()}))
        elif value is None:
            self.hasher.update(b"N")
        elif isinstance(value, bool | np.bool_):
            self.hasher.update(b"?" + (b"\x01" if value else b"\x00"))
        elif isinstance(value, int | np.integer):
            self.bytes_(b"I", str(int(value)).encode())
        elif isinstance(value, float | np.floating):
            self.hasher.update(b"F" + struct.pack("<d", float(value)))
        elif isinstance(value, str):
            self.bytes_(b"S", value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, bytes | bytearray | memoryview):
            self.bytes_(b"B", bytes(value))
        elif isinstance(value, Mapping):
            self._mapping(b"D", value, depth)
        elif isinstance(value, list):
            self.hasher.update(b"L" + _u64(len(value)))
            for item in value:
                self.value(item, depth + 1)
        elif isinstance(value, tuple) and not hasattr(value, "_fields"):
            self.hasher.update(b"U" + _u64(len(value)))
            for item in value:
                self.value(item, depth + 1)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            self._object(value, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, depth)
        elif isinstance(value, tuple):  # namedtuple
            self._object(value, dict(value._asdict()), depth)  # type: ignore[attr-defined]
        elif hasattr(value, "__dict__"):
            self._object(value, dict(vars(value)), depth)
        else:
            raise UsageError(
                f"cannot hash a batch element of type {type(value).__qualname__}; batches may hold "
                "tensors, arrays, numbers, strings, bytes, containers, dataclasses and plain objects"
            )

    def _object(self, value: Any, fields: dict[str, Any], depth: int) -> None:
        kind = type(value)
        self.bytes_(b"O", f"{kind.__module__}.{kind.__qualname__}".encode())
        self._mapping(b"D", fields, depth)

    def _mapping(self, tag: bytes, value: Mapping[Any, Any], depth: int) -> None:
        entries = []
        for key, item in value.items():
            sub = _Encoder()
            sub.value(key, depth + 1)
            entries.append((sub.hasher.digest(), key, item))
        entries.sort(key=lambda entry: entry[0])
        self.hasher.update(tag + _u64(len(entries)))
        for key_digest, _, item in entries:
            self.hasher.update(key_digest)
            self.value(item, depth + 1)


def digest_batch(batch: Any) -> Digest:
    """SHA-256 content digest of a batch.

    Args:
        batch: what the DataLoader yielded.

    Returns:
        A ``sha256-batch-v1`` digest.

    Example:
        >>> import torch
        >>> digest_batch((torch.ones(2), 3)) == digest_batch((torch.ones(2), 3))
        True
    """
    encoder = _Encoder()
    encoder.value(batch)
    return Digest(BATCH_ALGORITHM, encoder.hasher.hexdigest())
