"""A strict reader and a streaming writer for the safetensors format.

The files are ordinary safetensors (the ``safetensors`` library reads what we write
and we read what it writes). We keep our own small implementation for three reasons:

* verify-then-parse: the reader parses a buffer that the caller has already hashed,
  and the tensors it returns are views of exactly those bytes (THREATS row 20);
* strict validation before anything is allocated: header bigger than the file,
  offsets out of range, overlapping or with holes, duplicate names, size mismatches;
* the writer streams tensors straight to the file while hashing them, so saving a
  checkpoint costs one pass over the bytes and no second in-memory copy.

Layout: ``u64 little-endian N`` | ``N bytes of JSON header`` | ``data``. The header
maps each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to
the start of the data, plus an optional ``__metadata__`` of string to string.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import BinaryIO

import torch

from torch_integrity.canonical import strict_loads
from torch_integrity.digest import tensor_byte_chunks
from torch_integrity.errors import MalformedFileError, UsageError

MAX_HEADER_BYTES = 100 << 20

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def write_safetensors(
    handle: BinaryIO,
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Stream ``tensors`` to ``handle`` in safetensors format.

    Tensors are laid out largest element size first so every tensor starts at an
    offset aligned to its element size (the header is padded to 8 bytes).

    Args:
        handle: a binary file opened for writing.
        tensors: ``(name, tensor)`` pairs; names must be unique.
        metadata: optional string-to-string metadata stored in the header.

    Returns:
        The SHA-256 hex digest of every byte written.
    """
    import json

    names = [name for name, _ in tensors]
    if len(set(names)) != len(names):
        raise UsageError("duplicate tensor names in a safetensors file")
    ordered = sorted(tensors, key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise UsageError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in ordered:
        if tensor.dtype not in DTYPE_CODES:
            raise UsageError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % 8)
    hasher = hashlib.sha256()
    prefix = struct.pack("<Q", len(encoded)) + encoded
    handle.write(prefix)
    hasher.update(prefix)
    for _, tensor in ordered:
        for chunk in tensor_byte_chunks(tensor):
            handle.write(chunk)
            hasher.update(chunk)
    return hasher.hexdigest()


def parse_header(buffer: bytes | bytearray | memoryview, *, what: str) -> tuple[dict[str, dict[str, object]], dict[str, str], int]:
    """Validate a safetensors header without allocating any tensor.

    Returns:
        ``(entries, metadata, data_start)``.
    """
    size = len(buffer)
    head = bytes(buffer[:8])
    # A safetensors prefix can start like a pickle (a header of 640 bytes is 80 02 00 ...),
    # so the magic bytes only name what the file is once it fails to be safetensors.
    pickled = any(head.startswith(magic) for magic in PICKLE_MAGIC)

    def refuse(reason: str) -> MalformedFileError:
        if pickled:
            return MalformedFileError(f"{what} is a pickle or zip archive, not safetensors; it was not loaded")
        return MalformedFileError(reason)

    if size < 8:
        raise refuse(f"{what} is {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise refuse(f"{what}: header claims {header_len} bytes, over the {MAX_HEADER_BYTES} limit")
    if header_len > size - 8:
        raise refuse(f"{what}: header claims {header_len} bytes but the file has {size - 8} after the prefix")
    raw = bytes(buffer[8 : 8 + header_len])
    if not raw.startswith(b"{"):
        raise refuse(f"{what}: header is not a JSON object")
    header = strict_loads(raw, what=f"{what} header")
    if not isinstance(header, dict):
        raise MalformedFileError(f"{what}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedFileError(f"{what}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise MalformedFileError(f"{what}: entry {name!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in CODE_DTYPES:
            raise MalformedFileError(f"{what}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise MalformedFileError(f"{what}: tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise MalformedFileError(f"{what}: tensor {name!r} has offsets {offsets!r} outside the {data_size}-byte data")
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * CODE_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise MalformedFileError(
                f"{what}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, "
                f"but dtype {dtype} and shape {shape} need {expected}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            raise MalformedFileError(f"{what}: tensor {name!r} overlaps the tensor before it")
        if begin > cursor:
            raise MalformedFileError(f"{what}: {begin - cursor} unaccounted bytes before tensor {name!r}")
        cursor = end
    if cursor != data_size:
        raise MalformedFileError(f"{what}: {data_size - cursor} trailing bytes after the last tensor")
    return header, metadata, data_start


def load_safetensors_buffer(
    buffer: bytearray, *, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a verified buffer; the tensors returned share its memory (no copy).

    Args:
        buffer: the whole file's bytes (already hashed by the caller).
        what: a description for error messages (usually the path).

    Returns:
        ``(tensors, metadata)``.
    """
    header, metadata, data_start = parse_header(buffer, what=what)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        dtype = CODE_DTYPES[entry["dtype"]]  # type: ignore[index]
        shape = list(entry["shape"])  # type: ignore[call-overload]
        offsets: list[int] = entry["data_offsets"]  # type: ignore[assignment]
        begin, end = offsets
        count = end - begin
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count, offset=data_start + begin)
        if (data_start + begin) % dtype.itemsize:
            raw = raw.clone()  # misaligned input from another writer: copy once to align
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, metadata
