"""Digests of tensors and state dicts.

A :class:`Digest` is a value whose ``str()`` is ``<algorithm>:<hex>``. The algorithm
name records everything that decides the bytes hashed, and changes whenever that does.

* ``sha256-tensor-v1`` (:func:`digest_tensor`): SHA-256 over a domain tag, a
  length-prefixed canonical JSON header ``{"dtype","name","nbytes","shape"}`` and the
  tensor's raw bytes in little-endian element order, row-major. Equal values give equal
  digests whatever the memory layout: a non-contiguous view hashes like its copy.
* ``sha256-merkle-v1`` (:func:`digest_state_dict`): RFC 6962 Merkle root whose leaves
  are the tensor digests, sorted by tensor name. The per-tensor digests are kept, so a
  mismatch names the tensor. Tensors are hashed in parallel threads (``hashlib`` drops
  the GIL while it hashes large buffers).

CPU tensors are read in place (no ``.tobytes()``, no serialisation). CUDA tensors are
copied to the host in bounded chunks, never whole.

Example:
    >>> import torch
    >>> str(digest_tensor("w", torch.zeros(2)))[:17]
    'sha256-tensor-v1:'
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from torch_integrity import merkle
from torch_integrity.canonical import canonical_json
from torch_integrity.errors import MalformedFileError, UsageError

TENSOR_ALGORITHM = "sha256-tensor-v1"
STATE_ALGORITHM = "sha256-merkle-v1"
BYTES_ALGORITHM = "sha256"

#: Algorithms a security decision may rest on. Anything else (xxh3 fingerprints) is a
#: locator only and is refused where a security digest is expected.
SECURE_ALGORITHMS = frozenset(
    {TENSOR_ALGORITHM, STATE_ALGORITHM, BYTES_ALGORITHM, "sha256-batch-v2", "sha256-sample-v1"}
)

_TENSOR_DOMAIN = b"torch-integrity:tensor:v1\x00"
_HOST_CHUNK_BYTES = 64 << 20  # bounded host copies of device tensors
_PARALLEL_MIN_BYTES = 1 << 20

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is LE
    raise ImportError("torch-integrity hashes raw little-endian bytes; big-endian hosts are unsupported")


@dataclass(frozen=True, order=True)
class Digest:
    """A digest with a self-describing algorithm name.

    Attributes:
        algorithm: e.g. ``sha256-tensor-v1``.
        hex: lowercase hexadecimal value.
    """

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def raw(self) -> bytes:
        """The digest value as bytes."""
        return bytes.fromhex(self.hex)

    @property
    def is_secure(self) -> bool:
        """Whether this digest may carry a security decision (collision resistant)."""
        return self.algorithm in SECURE_ALGORITHMS

    @classmethod
    def parse(cls, text: str, *, require_secure: bool = True) -> Digest:
        """Parse ``<algorithm>:<hex>``.

        Args:
            text: the string form.
            require_secure: refuse algorithms that are not collision resistant.

        Returns:
            The digest.

        Raises:
            MalformedFileError: for a malformed string or, with ``require_secure``, an
                algorithm that no security decision may rest on (e.g. ``xxh3``).
        """
        if not isinstance(text, str) or ":" not in text:
            raise MalformedFileError(f"not a digest string: {text!r}")
        algorithm, _, value = text.partition(":")
        if require_secure and algorithm not in SECURE_ALGORITHMS:
            raise MalformedFileError(
                f"digest algorithm {algorithm!r} is not accepted as a security digest "
                f"(expected one of {sorted(SECURE_ALGORITHMS)})"
            )
        # A full match, not bytes.fromhex alone: fromhex skips whitespace, so
        # "ab" * 30 + "    " would pass as a 64-character value of 30 bytes.
        pattern = r"[0-9a-f]{64}" if algorithm in SECURE_ALGORITHMS else r"(?:[0-9a-f]{2})+"
        if re.fullmatch(pattern, value) is None:
            raise MalformedFileError(f"malformed digest value (expected lowercase hex): {text!r}")
        return cls(algorithm, value)


def sha256_bytes(data: bytes | bytearray | memoryview) -> Digest:
    """Plain SHA-256 of a byte string, as a :class:`Digest` named ``sha256``."""
    return Digest(BYTES_ALGORITHM, hashlib.sha256(data).hexdigest())


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat ``uint8`` tensor on its own device, row-major.

    A view when the tensor is contiguous; otherwise (and for conjugate or negative views)
    a contiguous copy. Layouts and dtypes with no raw-byte meaning are refused.
    """
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise UsageError(f"cannot hash a tensor with layout {tensor.layout}")
    if tensor.is_quantized:
        raise UsageError("cannot hash a quantized tensor")
    if tensor.device.type == "meta":
        raise UsageError("cannot hash a meta tensor: it has no data")
    data = tensor.detach()
    if data.is_conj():
        data = data.resolve_conj()
    if data.is_neg():
        data = data.resolve_neg()
    if not data.is_contiguous():
        data = data.contiguous()
    return data.reshape(-1).view(torch.uint8)


def tensor_byte_chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """Yield the tensor's raw bytes, row-major, without copying CPU memory.

    Non-contiguous tensors are made contiguous first (the only copy, and only for
    them). Device tensors are copied to the host ``64 MiB`` at a time.
    """
    flat = flat_bytes(tensor)
    if flat.numel() == 0:
        return
    if flat.device.type == "cpu":
        yield flat.numpy().data.cast("B")
        return
    size = flat.numel()
    host = torch.empty(min(size, _HOST_CHUNK_BYTES), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    for start in range(0, size, _HOST_CHUNK_BYTES):
        piece = flat[start : start + _HOST_CHUNK_BYTES]
        part = host[: piece.numel()]
        part.copy_(piece)
        yield part.numpy().data.cast("B")


def _tensor_header(name: str, tensor: torch.Tensor) -> bytes:
    header = canonical_json(
        {
            "dtype": dtype_name(tensor.dtype),
            "name": name,
            "nbytes": tensor.numel() * tensor.element_size(),
            "shape": list(tensor.shape),
        }
    )
    return _TENSOR_DOMAIN + struct.pack("<Q", len(header)) + header


def digest_tensor(name: str, tensor: torch.Tensor) -> Digest:
    """SHA-256 digest binding a tensor's name, dtype, shape and raw bytes.

    Args:
        name: the tensor's name in its state dict (part of what is hashed).
        tensor: any strided, non-quantized tensor on any device.

    Returns:
        A ``sha256-tensor-v1`` digest.

    Example:
        >>> import torch
        >>> digest_tensor("a", torch.ones(3)) == digest_tensor("a", torch.ones(6)[::2])
        True
    """
    if not isinstance(name, str):
        raise UsageError(f"tensor names must be strings, got {type(name).__name__}")
    if not isinstance(tensor, torch.Tensor):
        raise UsageError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
    hasher = hashlib.sha256(_tensor_header(name, tensor))
    for chunk in tensor_byte_chunks(tensor):
        hasher.update(chunk)
    return Digest(TENSOR_ALGORITHM, hasher.hexdigest())


@dataclass(frozen=True)
class StateDigest:
    """Digest of a state dict: the Merkle root plus every tensor's own digest.

    Attributes:
        root: ``sha256-merkle-v1`` root over the sorted tensor digests.
        tensors: tensor name -> its ``sha256-tensor-v1`` digest, sorted by name.
    """

    root: Digest
    tensors: Mapping[str, Digest] = field(default_factory=dict)

    def __str__(self) -> str:
        return str(self.root)

    def differing(self, other: StateDigest) -> list[str]:
        """Names of tensors that differ from ``other``'s, or exist in only one of them."""
        names = sorted(set(self.tensors) | set(other.tensors))
        return [n for n in names if self.tensors.get(n) != other.tensors.get(n)]


def root_of(tensor_digests: Mapping[str, Digest]) -> Digest:
    """Merkle root over tensor digests, sorted by name."""
    ordered = [tensor_digests[name].raw for name in sorted(tensor_digests)]
    return Digest(STATE_ALGORITHM, merkle.merkle_root(ordered).hex())


def digest_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, threads: int | None = None
) -> StateDigest:
    """Digest every tensor of a state dict and combine them in a Merkle root.

    Args:
        state_dict: tensor name -> tensor.
        threads: worker threads (default: the number of CPUs). ``1`` hashes serially.

    Returns:
        The :class:`StateDigest` (root and per-tensor digests).

    Example:
        >>> import torch
        >>> d = digest_state_dict({"w": torch.ones(2), "b": torch.zeros(1)})
        >>> list(d.tensors)
        ['b', 'w']
    """
    items = sorted(state_dict.items(), key=lambda item: item[0])
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise UsageError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
    workers = threads if threads is not None else (os.cpu_count() or 1)
    total = sum(t.numel() * t.element_size() for _, t in items)
    if workers > 1 and len(items) > 1 and total >= _PARALLEL_MIN_BYTES:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ti-digest") as pool:
            digests = list(pool.map(lambda item: digest_tensor(*item), items))
    else:
        digests = [digest_tensor(name, tensor) for name, tensor in items]
    per_tensor = {name: d for (name, _), d in zip(items, digests, strict=True)}
    return StateDigest(root=root_of(per_tensor), tensors=per_tensor)
