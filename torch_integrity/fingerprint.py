"""Per-step weight fingerprints: a fast locator of divergence, never a security digest.

For each tensor, its raw bytes are read as little-endian integer words (int32 where the
byte count allows, else int16 or uint8), cut into rows of 1024 words (the last row may
be shorter), and each row is summed to ``R_r``. With 64-bit two's-complement arithmetic::

    s0 = sum(R_r)        s1 = sum(r * R_r)        (mod 2**64)

Integer addition modulo 2**64 is associative and commutative, so the sums do not
depend on reduction order or on the device: CPU (NumPy) and GPU (torch) give the same
bits for the same tensor, and GPU reductions are deterministic. The sums are computed
where the tensor lives: only the two sums of each device tensor cross to the host, in
one copy per device, which :func:`fingerprint_later` starts without waiting for the
GPU. The sums are then combined with the tensor names under a per-run key with XXH3-64. ``s1`` makes the value depend on where in the
tensor a change happened, at row granularity.

The result is *not* collision resistant: a deliberate attacker can make two weight sets
collide. It is recorded per step only to say quickly *where* a replay first diverged;
the SHA-256 checkpoint digests carry every security decision.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
import torch
import xxhash

from torch_integrity.deferred import HostCopy, Later, deferrable

FINGERPRINT_ALGORITHM = "xxh3-intsum-v1"
_ROW = 1024  # words per row


def _words(tensor: torch.Tensor) -> torch.Tensor:
    data = tensor.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    raw = data.reshape(-1).view(torch.uint8)
    if raw.numel() % 4 == 0:
        return raw.view(torch.int32)
    if raw.numel() % 2 == 0:
        return raw.view(torch.int16)
    return raw


def _row_sums(words: torch.Tensor) -> torch.Tensor | np.ndarray:
    """Row sums ``R_r`` as int64, on the tensor's device (NumPy for CPU tensors)."""
    count = words.numel()
    full = count - count % _ROW
    if words.device.type == "cpu":
        array = words.numpy()
        sums = array[:full].reshape(-1, _ROW).sum(axis=1, dtype=np.int64)
        if full < count:
            sums = np.append(sums, array[full:].sum(dtype=np.int64))
        return sums
    sums_t = words[:full].reshape(-1, _ROW).sum(dim=1, dtype=torch.int64)
    if full < count:
        sums_t = torch.cat([sums_t, words[full:].sum(dtype=torch.int64).reshape(1)])
    return sums_t


def _device_sums(tensor: torch.Tensor) -> tuple[int, int] | torch.Tensor:
    """``(s0, s1)``: Python ints for CPU tensors, an int64 device tensor ``[s0, s1]`` otherwise."""
    rows = _row_sums(_words(tensor))
    if isinstance(rows, np.ndarray):
        positions = np.arange(rows.shape[0], dtype=np.int64)
        with np.errstate(over="ignore"):
            return int(rows.sum(dtype=np.int64)), int((rows * positions).sum(dtype=np.int64))
    positions_t = torch.arange(rows.shape[0], dtype=torch.int64, device=rows.device)
    return torch.stack([rows.sum(), (rows * positions_t).sum()])


def tensor_sums(tensor: torch.Tensor) -> tuple[int, int]:
    """``(s0, s1)`` of one tensor as Python ints in ``[-2**63, 2**63)``."""
    sums = _device_sums(tensor)
    if isinstance(sums, torch.Tensor):
        first, second = sums.cpu().tolist()
        return int(first), int(second)
    return sums


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]], *, key: int) -> str:
    """Fingerprint named tensors; returns 16 hex digits.

    Device tensors' sums stay on their device until one copy per device at the end (a
    single host synchronisation per record).

    Args:
        named: ``(name, tensor)`` pairs, on any devices.
        key: the per-run key (a 64-bit int).

    Example:
        >>> import torch
        >>> a = fingerprint_tensors([("w", torch.ones(3))], key=1)
        >>> a == fingerprint_tensors([("w", torch.ones(3))], key=1), a == fingerprint_tensors([("w", torch.ones(3))], key=2)
        (True, False)
    """
    return fingerprint_later(named, key=key).result()


def fingerprint_later(named: Iterable[tuple[str, torch.Tensor]], *, key: int) -> Later[str]:
    """:func:`fingerprint_tensors`, started now and read later.

    The sums of CUDA tensors are computed on the current stream now (so they are of the
    weights as they are now, whatever runs next) and copied to the host asynchronously;
    the host waits only in :meth:`~torch_integrity.deferred.Later.result`.
    """
    items = sorted(named, key=lambda item: item[0])
    sums = [_device_sums(tensor) for _, tensor in items]
    on_device: dict[torch.device, list[int]] = {}
    for position, value in enumerate(sums):
        if isinstance(value, torch.Tensor):
            on_device.setdefault(value.device, []).append(position)
    copies: list[tuple[list[int], HostCopy | list[list[int]]]] = []
    for positions in on_device.values():
        stacked = torch.stack([sums[p] for p in positions])  # type: ignore[misc]
        if deferrable(stacked):
            copies.append((positions, HostCopy(stacked.reshape(-1).view(torch.uint8))))
        else:
            copies.append((positions, stacked.cpu().tolist()))  # other devices: one sync each

    def finish() -> str:
        resolved: list[tuple[int, int]] = [(0, 0)] * len(items)
        for p, value in enumerate(sums):
            if not isinstance(value, torch.Tensor):
                resolved[p] = value
        for positions, copy in copies:
            pairs = np.frombuffer(copy.bytes(), dtype="<i8").reshape(-1, 2).tolist() if isinstance(copy, HostCopy) else copy
            for p, (first, second) in zip(positions, pairs, strict=True):
                resolved[p] = (int(first), int(second))
        hasher = xxhash.xxh3_64(seed=key & 0xFFFFFFFFFFFFFFFF)
        for (name, _), (s0, s1) in zip(items, resolved, strict=True):
            encoded = name.encode("utf-8")
            hasher.update(struct.pack("<Q", len(encoded)) + encoded + struct.pack("<qq", s0, s1))
        return hasher.hexdigest()

    return Later(finish)
