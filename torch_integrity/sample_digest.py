"""Digests of single dataset samples: ``sha256-sample-v1``.

A sample is whatever ``dataset[i]`` returns: tensors, numpy arrays, ``int``,
``float``, ``str``, ``bytes``, ``bool``, ``None``, and tuples, lists and dicts of
these, nested. Its digest is::

    SHA-256(b"torch-integrity:sample:v1\\x00" || encode(sample))

``encode`` writes a one-byte type tag, then lengths as unsigned 64-bit little-endian
integers, then the payload, so no two different samples share an encoding (every
field's extent is known before it is read). Tensors and arrays contribute their
dtype, shape and raw element bytes, little-endian, row-major, read in place. The
encoding is specified byte by byte in ``docs/data-provenance.md``.

A file in a folder manifest is the sample ``(relative_path, file_bytes)``; the file
is streamed through the same encoding by :func:`digest_file_sample`.

Example:
    >>> import torch
    >>> str(digest_sample((torch.zeros(2), 1)))[:17]
    'sha256-sample-v1:'
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import inspect
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torch_integrity.deferred import HostCopy, Later, deferrable
from torch_integrity.digest import Digest, dtype_name, flat_bytes, tensor_byte_chunks
from torch_integrity.errors import MalformedFileError, UsageError
from torch_integrity.fsutil import open_regular_file

SAMPLE_ALGORITHM = "sha256-sample-v1"
DOMAIN = b"torch-integrity:sample:v1\x00"

# Type tags (one ASCII byte each).
TAG_NONE, TAG_TRUE, TAG_FALSE = b"N", b"T", b"F"
TAG_INT, TAG_FLOAT, TAG_STR, TAG_BYTES = b"I", b"D", b"S", b"Y"
TAG_TUPLE, TAG_LIST, TAG_DICT = b"P", b"L", b"M"
TAG_TENSOR, TAG_ARRAY = b"X", b"A"
TAG_OBJECT = b"O"

_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_MAX_DEPTH = 100
_DIRECT_BYTES = 1 << 14  # payloads this large go to the hasher without an extra copy
_FILE_CHUNK = 1 << 20


class _Sink:
    """Collects small pieces in a buffer; hands large payloads to the hasher directly."""

    __slots__ = ("buffer", "hasher")

    def __init__(self, hasher: Any | None) -> None:
        self.hasher = hasher
        self.buffer = bytearray()

    def large(self, payload: memoryview | bytes) -> None:
        if self.hasher is None or len(payload) < _DIRECT_BYTES:
            self.buffer += payload
            return
        if self.buffer:
            self.hasher.update(self.buffer)
            self.buffer.clear()
        self.hasher.update(payload)

    def device_tensor(self, tensor: torch.Tensor) -> None:
        """The bytes of a tensor that is not in CPU memory (copied to the host in chunks)."""
        for chunk in tensor_byte_chunks(tensor):
            self.large(chunk)


class _DeferringSink(_Sink):
    """A sink that leaves CUDA tensors' bytes to arrive later (see :mod:`torch_integrity.deferred`).

    Until the first CUDA tensor, everything goes to the hasher as usual. From then on,
    pieces are kept in order: host bytes copied (the caller may change them before the
    digest is finished) and :class:`~torch_integrity.deferred.HostCopy` handles.
    """

    __slots__ = ("pieces",)

    def __init__(self, hasher: Any) -> None:
        super().__init__(hasher)
        self.pieces: list[bytes | HostCopy] | None = None

    def large(self, payload: memoryview | bytes) -> None:
        if self.pieces is None:
            super().large(payload)
        else:
            self.buffer += payload

    def device_tensor(self, tensor: torch.Tensor) -> None:
        if not deferrable(tensor):
            super().device_tensor(tensor)
            return
        flat = flat_bytes(tensor)
        if self.pieces is None:
            self.pieces = []
            assert self.hasher is not None  # constructed with one
            self.hasher.update(self.buffer)
        else:
            self.pieces.append(bytes(self.buffer))
        self.buffer.clear()
        self.pieces.append(HostCopy(flat))


_TENSOR_HEADERS: dict[tuple[torch.dtype, tuple[int, ...]], bytes] = {}


def _tensor_header(tensor: torch.Tensor) -> bytes:
    """Everything a tensor contributes before its bytes (cached: datasets repeat shapes)."""
    key = (tensor.dtype, tuple(tensor.shape))
    header = _TENSOR_HEADERS.get(key)
    if header is None:
        name = dtype_name(tensor.dtype).encode("ascii")
        shape = key[1]
        header = (
            TAG_TENSOR + _U64.pack(len(name)) + name + _U64.pack(len(shape))
            + struct.pack(f"<{len(shape)}Q", *shape) + _U64.pack(tensor.numel() * tensor.element_size())
        )
        if len(_TENSOR_HEADERS) > 4096:
            _TENSOR_HEADERS.clear()
        _TENSOR_HEADERS[key] = header
    return header


def _encode_tensor(tensor: torch.Tensor, sink: _Sink) -> None:
    sink.buffer += _tensor_header(tensor)
    if (
        tensor.is_cpu
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and not (tensor.is_conj() or tensor.is_neg() or tensor.is_quantized)
    ):
        # Fast path for the common case (small CPU tensors from __getitem__): view the
        # tensor's memory in place; ``tensor`` keeps it alive while it is hashed.
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            sink.large(memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B"))
        return
    if tensor.is_cpu:
        for chunk in tensor_byte_chunks(tensor):
            sink.large(chunk)
    else:
        sink.device_tensor(tensor)


def _encode_array(value: np.ndarray | np.generic, sink: _Sink) -> None:
    array = np.asarray(value)
    if array.dtype.kind in "OV":
        raise UsageError(f"cannot digest a numpy array of dtype {array.dtype} (object and structured dtypes)")
    if array.dtype.byteorder == ">":  # same values, little-endian bytes
        array = array.astype(array.dtype.newbyteorder("<"))
    shape = array.shape
    name = array.dtype.str.encode("ascii")
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    out = sink.buffer
    out += TAG_ARRAY
    out += _U64.pack(len(name))
    out += name
    out += _U64.pack(len(shape))
    out += struct.pack(f"<{len(shape)}Q", *shape)
    out += _U64.pack(flat.size)
    if flat.size:
        sink.large(flat.data)


def _encode_none(value: None, sink: _Sink, depth: int) -> None:
    sink.buffer += TAG_NONE


def _encode_bool(value: bool, sink: _Sink, depth: int) -> None:
    sink.buffer += TAG_TRUE if value else TAG_FALSE


def _encode_int(value: int, sink: _Sink, depth: int) -> None:
    number = int(value)
    size = number.bit_length() // 8 + 1  # room for the sign bit
    sink.buffer += TAG_INT + _U64.pack(size) + number.to_bytes(size, "little", signed=True)


def _encode_float(value: float, sink: _Sink, depth: int) -> None:
    sink.buffer += TAG_FLOAT + _F64.pack(value)


def _encode_str(value: str, sink: _Sink, depth: int) -> None:
    try:
        text = value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("cannot digest a string that is not valid Unicode (lone surrogate)") from None
    sink.buffer += TAG_STR + _U64.pack(len(text)) + text


def _encode_bytes(value: bytes | bytearray | memoryview, sink: _Sink, depth: int) -> None:
    view = memoryview(value)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    view = view.cast("B")
    sink.buffer += TAG_BYTES + _U64.pack(len(view))
    sink.large(view)


def _encode_sequence(value: tuple[Any, ...] | list[Any], sink: _Sink, depth: int) -> None:
    if depth >= _MAX_DEPTH:
        raise UsageError(f"sample nests deeper than {_MAX_DEPTH} levels (or contains itself)")
    sink.buffer += (TAG_TUPLE if isinstance(value, tuple) else TAG_LIST) + _U64.pack(len(value))
    for item in value:
        _encode(item, sink, depth + 1)


def _encode_key(key: Any, depth: int) -> bytes:
    if not (key is None or isinstance(key, bool | int | float | str | bytes | tuple)):
        raise UsageError(f"cannot digest a dict key of type {type(key).__name__}")
    sink = _Sink(None)
    _encode(key, sink, depth)
    return bytes(sink.buffer)


def _encode_mapping(value: Mapping[Any, Any], sink: _Sink, depth: int) -> None:
    if depth >= _MAX_DEPTH:
        raise UsageError(f"sample nests deeper than {_MAX_DEPTH} levels (or contains itself)")
    entries = sorted(((_encode_key(key, depth + 1), item) for key, item in value.items()), key=lambda e: e[0])
    if any(entries[i][0] == entries[i + 1][0] for i in range(len(entries) - 1)):
        raise UsageError("cannot digest a dict with two keys that encode alike (e.g. two NaN keys)")
    sink.buffer += TAG_DICT + _U64.pack(len(entries))
    for key_bytes, item in entries:
        sink.buffer += key_bytes
        _encode(item, sink, depth + 1)


_Encoder = Callable[[Any, _Sink, int], None]

# Exact types, looked up first; subclasses go through _encoder_for.
_ENCODERS: dict[type, _Encoder] = {
    torch.Tensor: lambda value, sink, depth: _encode_tensor(value, sink),
    int: _encode_int,
    tuple: _encode_sequence,
    list: _encode_sequence,
    float: _encode_float,
    str: _encode_str,
    dict: _encode_mapping,
    bytes: _encode_bytes,
    type(None): _encode_none,
    bool: _encode_bool,
    np.ndarray: lambda value, sink, depth: _encode_array(value, sink),
}


def _encoder_for(value: Any) -> _Encoder:
    # Order matters: bool is an int, np.float64 is a float, a Parameter is a Tensor.
    if isinstance(value, torch.Tensor):
        return _ENCODERS[torch.Tensor]
    if isinstance(value, np.ndarray | np.generic):
        return _ENCODERS[np.ndarray]
    for kind in (bool, int, float, str, tuple, list):
        if isinstance(value, kind):
            return _ENCODERS[kind]
    if isinstance(value, bytes | bytearray | memoryview):
        return _encode_bytes
    if isinstance(value, Mapping):
        return _encode_mapping
    if isinstance(value, type) or inspect.isroutine(value) or inspect.ismodule(value):
        pass  # code, not data
    elif dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
        return _encode_object
    raise UsageError(
        f"cannot digest a sample part of type {type(value).__name__}: samples may hold tensors, numpy "
        "arrays, int, float, str, bytes, bool, None, tuples/lists/dicts of these, dataclasses and plain objects"
    )


def _encode_object(value: Any, sink: _Sink, depth: int) -> None:
    """A dataclass or plain object: its qualified type name, then its fields as a dict."""
    kind = type(value)
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    else:
        fields = dict(vars(value))
    sink.buffer += TAG_OBJECT
    _encode_str(f"{kind.__module__}.{kind.__qualname__}", sink, depth)
    _encode_mapping(fields, sink, depth)


def _encode(value: Any, sink: _Sink, depth: int) -> None:
    (_ENCODERS.get(type(value)) or _encoder_for(value))(value, sink, depth)


def encode_into(hasher: Any, value: Any) -> None:
    """Feed the encoding of ``value`` (without a domain tag) to a hashlib-style ``hasher``."""
    sink = _Sink(hasher)
    _encode(value, sink, 0)
    hasher.update(sink.buffer)


def encode_later(hasher: Any, value: Any) -> Later[Any]:
    """Like :func:`encode_into`, but CUDA tensors' bytes are fed once they reach the host.

    The encoding is fixed now (later changes to ``value`` do not reach it); CUDA tensors
    start asynchronous copies. The returned :class:`~torch_integrity.deferred.Later`
    resolves to ``hasher`` with the whole encoding fed (at once when nothing is on a GPU).
    """
    sink = _DeferringSink(hasher)
    _encode(value, sink, 0)
    pieces = sink.pieces
    if pieces is None:
        hasher.update(sink.buffer)
        return Later.ready(hasher)
    pieces.append(bytes(sink.buffer))

    def finish() -> Any:
        for piece in pieces:
            hasher.update(piece if isinstance(piece, bytes) else piece.bytes())
        return hasher

    return Later(finish)


def digest_sample_bytes(sample: Any) -> bytes:
    """The raw 32-byte ``sha256-sample-v1`` digest of ``sample`` (see :func:`digest_sample`)."""
    hasher = hashlib.sha256(DOMAIN)
    encode_into(hasher, sample)
    return hasher.digest()


def digest_sample(sample: Any) -> Digest:
    """Digest one dataset sample.

    Args:
        sample: a tensor, numpy array or scalar, ``int``, ``float``, ``str``, ``bytes``,
            ``bool``, ``None``, or tuples/lists/dicts of these (dict entries are taken in
            order of their encoded keys, so insertion order does not matter).

    Returns:
        A ``sha256-sample-v1`` digest.

    Raises:
        UsageError: the sample holds a type that has no defined encoding.

    Example:
        >>> import torch
        >>> digest_sample([1, "a"]) == digest_sample([1, "a"]), digest_sample([1]) == digest_sample((1,))
        (True, False)
    """
    return Digest(SAMPLE_ALGORITHM, digest_sample_bytes(sample).hex())


def file_sample_prefix(relative_path: str, size: int) -> bytes:
    """Encoding of ``(relative_path, <size bytes>)`` up to where the file's bytes begin."""
    name = relative_path.encode("utf-8")
    return TAG_TUPLE + _U64.pack(2) + TAG_STR + _U64.pack(len(name)) + name + TAG_BYTES + _U64.pack(size)


def digest_file_sample(path: Path, relative_path: str) -> tuple[bytes, int]:
    """Digest a file as the sample ``(relative_path, file_bytes)``, streaming its bytes.

    Equal to ``digest_sample((relative_path, path.read_bytes())).raw`` without holding
    the file in memory. Symlinks are refused, and a file that changes size while it is
    read is an error.

    Args:
        path: the file on disk.
        relative_path: its POSIX path relative to the folder (part of what is hashed).

    Returns:
        ``(raw 32-byte digest, file size in bytes)``.
    """
    fd, size = open_regular_file(path)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        hasher = hashlib.sha256(DOMAIN + file_sample_prefix(relative_path, size))
        buffer = bytearray(min(_FILE_CHUNK, max(size, 1)))
        view = memoryview(buffer)
        done = 0
        while True:
            count = handle.readinto(view)
            if not count:
                break
            done += count
            if done > size:
                break
            hasher.update(view[:count])
        if done != size:
            raise MalformedFileError(f"{path} changed size while it was being hashed ({size} -> {done} bytes)")
    return hasher.digest(), size
