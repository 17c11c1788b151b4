"""The pickle-free checkpoint store.

A checkpoint is one safetensors file. Its tensors are the tensors of a training state
(a nested structure of dicts, lists, tuples, tensors and JSON scalars); the structure
itself is canonical JSON in the header metadata under ``torch_integrity.state``, with
``{"$tensor": "<key>"}`` where a tensor was. Nothing is ever unpickled: loading parses
JSON and builds tensors from raw bytes, and runs no code.

Encoding of values JSON cannot hold as-is:

* dicts whose keys are not all strings (optimizer state uses ints), or a string key
  starting with ``$``: ``{"$items": [[key, value], ...]}``
* tuples: ``{"$tuple": [...]}``; non-finite floats: ``{"$float": "nan" | "inf" | "-inf"}``

Tensor keys are paths such as ``model/encoder.weight``; ``~`` and ``/`` inside a key
part are escaped as ``~0`` and ``~1`` (as in JSON Pointer).

Writes are atomic and durable (see :mod:`torch_integrity.fsutil`). Loading verifies the
whole file against an expected SHA-256 first and then parses those same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.digest import BYTES_ALGORITHM, Digest, StateDigest, digest_state_dict, root_of, sha256_bytes
from torch_integrity.errors import DigestMismatchError, MalformedFileError, UsageError
from torch_integrity.fsutil import atomic_writer, read_file_bytes
from torch_integrity.safetensors_io import load_safetensors_buffer, write_safetensors

FORMAT = "torch-integrity-checkpoint-v1"
STATE_KEY = "torch_integrity.state"
FORMAT_KEY = "torch_integrity.format"


@dataclass(frozen=True)
class SavedCheckpoint:
    """What saving a checkpoint produced.

    Attributes:
        path: where the file now is.
        file_digest: SHA-256 of the whole file.
        tensors: digests of every tensor, keyed by its path in the state.
    """

    path: Path
    file_digest: Digest
    tensors: StateDigest


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "root"
        if key in tensors:
            raise UsageError(f"two tensors map to the same key {key!r}")
        tensors[key] = value
        return {"$tensor": key}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("$") for k in value)
        if plain:
            return {k: _flatten(v, f"{path}/{_escape(k)}" if path else _escape(k), tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, str | int | float | bool) and k is not None:
                raise UsageError(f"cannot store a dict key of type {type(k).__name__} at {path or 'the root'}")
            items.append([_flatten(k, "", {}), _flatten(v, f"{path}/{_escape(str(k))}" if path else _escape(str(k)), tensors)])
        return {"$items": items}
    if isinstance(value, tuple):
        return {"$tuple": [_flatten(v, f"{path}/{i}" if path else str(i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{path}/{i}" if path else str(i), tensors) for i, v in enumerate(value)]
    raise UsageError(
        f"cannot store a {type(value).__name__} at {path or 'the root'}: checkpoints hold only "
        "tensors, dicts, lists, tuples and JSON scalars"
    )


def _unflatten(value: Any, tensors: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, inner), = value.items()
        if marker == "$tensor":
            if not isinstance(inner, str) or inner not in tensors:
                raise MalformedFileError(f"state refers to a tensor {inner!r} that the file does not hold")
            used.add(inner)
            return tensors[inner]
        if marker == "$tuple" and isinstance(inner, list):
            return tuple(_unflatten(v, tensors, used) for v in inner)
        if marker == "$float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
        if marker == "$items" and isinstance(inner, list):
            result = {}
            for pair in inner:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise MalformedFileError("malformed $items entry in checkpoint state")
                key = _unflatten(pair[0], tensors, used)
                if isinstance(key, dict | list):
                    raise MalformedFileError("checkpoint state has an unhashable dict key")
                result[key] = _unflatten(pair[1], tensors, used)
            return result
    if any(isinstance(k, str) and k.startswith("$") for k in value):
        raise MalformedFileError(f"unknown marker in checkpoint state: {sorted(value)[:3]}")
    return {k: _unflatten(v, tensors, used) for k, v in value.items()}


def save_checkpoint(
    path: Path,
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
    threads: int | None = None,
    digest_tensors: bool = True,
) -> SavedCheckpoint:
    """Save a training state atomically and durably, without pickle.

    Args:
        path: destination ``.safetensors`` file (its folder must exist).
        state: nested dicts/lists/tuples of tensors and JSON scalars.
        metadata: extra string metadata for the header (run id, step, ...).
        threads: threads for hashing the tensors.
        digest_tensors: also digest every tensor (skip when the caller digests them itself).

    Returns:
        The file's digest and every tensor's digest.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.safetensors"
        >>> saved = save_checkpoint(p, {"model": {"w": torch.ones(2)}, "step": 3})
        >>> load_checkpoint(p, expected=saved.file_digest)["step"]
        3
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(dict(state), "", tensors)
    cpu_tensors = {k: (t.detach().cpu() if t.device.type != "cpu" else t.detach()) for k, t in tensors.items()}
    header = {FORMAT_KEY: FORMAT, STATE_KEY: canonical_json(skeleton).decode("utf-8")}
    for key, text in (metadata or {}).items():
        if key in header:
            raise UsageError(f"metadata key {key!r} is reserved")
        header[key] = text
    digests = digest_state_dict(cpu_tensors, threads=threads) if digest_tensors else StateDigest(root_of({}))
    try:
        with atomic_writer(path) as handle:
            file_hex = write_safetensors(handle, list(cpu_tensors.items()), metadata=header)
    except OSError as exc:
        raise UsageError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc
    return SavedCheckpoint(path=path, file_digest=Digest(BYTES_ALGORITHM, file_hex), tensors=digests)


def load_checkpoint_with_metadata(
    path: Path, *, expected: Digest | str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a checkpoint's state and header metadata, verifying its bytes first.

    Args:
        path: the ``.safetensors`` file.
        expected: the file's recorded SHA-256 digest; ``None`` only for files that have
            no recorded digest (the caller then trusts nothing in them).

    Raises:
        DigestMismatchError: the bytes are not the recorded ones.
        MalformedFileError: not a checkpoint (pickles included), or malformed.
    """
    buffer = read_file_bytes(path)
    if expected is not None:
        want = expected if isinstance(expected, Digest) else Digest.parse(expected)
        if want.algorithm != BYTES_ALGORITHM:
            raise MalformedFileError(f"a checkpoint file digest must be {BYTES_ALGORITHM}, got {want.algorithm}")
        got = sha256_bytes(buffer)
        if got != want:
            raise DigestMismatchError(f"checkpoint file {path}", want, got)
    tensors, metadata = load_safetensors_buffer(buffer, what=str(path))
    if metadata.get(FORMAT_KEY) != FORMAT or STATE_KEY not in metadata:
        raise MalformedFileError(f"{path} is a safetensors file but not a torch-integrity checkpoint")
    skeleton = strict_loads(metadata[STATE_KEY], what=f"{path} state")
    used: set[str] = set()
    state = _unflatten(skeleton, tensors, used)
    if not isinstance(state, dict):
        raise MalformedFileError(f"{path}: checkpoint state is not an object")
    if used != set(tensors):
        extra = sorted(set(tensors) - used)[:5]
        raise MalformedFileError(f"{path} holds tensors the state never refers to: {extra}")
    return state, metadata


def load_checkpoint(path: Path, *, expected: Digest | str | None) -> dict[str, Any]:
    """Load a checkpoint's state (see :func:`load_checkpoint_with_metadata`)."""
    return load_checkpoint_with_metadata(path, expected=expected)[0]
