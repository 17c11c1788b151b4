"""The per-step weight fingerprint: a reference implementation, order independence, devices."""

from __future__ import annotations

import random
import struct

import pytest
import torch
import xxhash

from torch_integrity.fingerprint import fingerprint_tensors, tensor_sums

MASK = (1 << 64) - 1


def to_signed(value: int) -> int:
    value &= MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def reference_sums(tensor: torch.Tensor, *, shuffle: int | None = None) -> tuple[int, int]:
    """Straight from the documented definition, in plain Python integers."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if len(raw) % 4 == 0:
        words = list(struct.unpack(f"<{len(raw) // 4}i", raw))
    elif len(raw) % 2 == 0:
        words = list(struct.unpack(f"<{len(raw) // 2}h", raw))
    else:
        words = list(raw)
    rows = [sum(words[i : i + 1024]) for i in range(0, len(words), 1024)]
    order = list(range(len(rows)))
    if shuffle is not None:
        random.Random(shuffle).shuffle(order)  # any summation order must give the same bits
    s0 = s1 = 0
    for r in order:
        s0 += rows[r]
        s1 += r * rows[r]
    return to_signed(s0), to_signed(s1)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3000),
        torch.randn(17, 33).to(torch.bfloat16),  # odd element count of a 2-byte type: int16 words
        torch.arange(1025, dtype=torch.uint8),  # odd byte count: bytes
        torch.tensor([float("nan"), float("inf"), -0.0]),
        torch.randint(-(2**62), 2**62, (5000,), dtype=torch.int64),
        torch.zeros(0),
        torch.tensor(3.5),
    ],
)
def test_matches_the_reference_in_any_summation_order(tensor: torch.Tensor) -> None:
    assert tensor_sums(tensor) == reference_sums(tensor) == reference_sums(tensor, shuffle=7)


def test_layout_does_not_matter_but_values_and_position_do() -> None:
    base = torch.randn(64, 2048)
    assert tensor_sums(base.t().contiguous().t()) == tensor_sums(base)
    moved = base.clone().reshape(-1)
    moved[0], moved[5000] = base.reshape(-1)[5000], base.reshape(-1)[0]  # same values, other rows
    assert tensor_sums(moved.reshape(64, 2048)) != tensor_sums(base)
    flipped = base.clone()
    flipped.view(torch.int32)[3, 7] ^= 1
    assert tensor_sums(flipped) != tensor_sums(base)


def test_fingerprint_combines_names_and_key() -> None:
    weights = {"a": torch.randn(10), "b": torch.randn(4, 4)}
    value = fingerprint_tensors(weights.items(), key=42)
    assert value == fingerprint_tensors(reversed(list(weights.items())), key=42)
    assert value != fingerprint_tensors(weights.items(), key=43)
    assert value != fingerprint_tensors({"a": weights["a"], "c": weights["b"]}.items(), key=42)
    # the documented combination, recomputed here
    hasher = xxhash.xxh3_64(seed=42)
    for name in ("a", "b"):
        s0, s1 = reference_sums(weights[name])
        hasher.update(struct.pack("<Q", len(name)) + name.encode() + struct.pack("<qq", s0, s1))
    assert value == hasher.hexdigest()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_give_the_same_bits() -> None:
    weights = {"w": torch.randn(1000, 513), "h": torch.randn(7).half(), "i": torch.randint(0, 9, (11,))}
    on_gpu = {name: t.cuda() for name, t in weights.items()}
    assert fingerprint_tensors(weights.items(), key=5) == fingerprint_tensors(on_gpu.items(), key=5)
    for name, tensor in weights.items():
        assert tensor_sums(tensor) == tensor_sums(on_gpu[name])
