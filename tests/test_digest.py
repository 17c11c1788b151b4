"""Tensor and state-dict digests: fixed vectors, layout independence, parallel = serial.

Every known-answer vector is checked twice: against a hex value computed once and
written here, and against an independent recomputation with ``hashlib`` and ``struct``
from the documented byte layout (no torch involved in producing the bytes hashed).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_integrity import digest as digest_module
from torch_integrity import merkle
from torch_integrity.digest import (
    STATE_ALGORITHM,
    TENSOR_ALGORITHM,
    Digest,
    StateDigest,
    digest_state_dict,
    digest_tensor,
    root_of,
    sha256_bytes,
    tensor_byte_chunks,
)
from torch_integrity.errors import InputError, MalformedFileError, UsageError

DOMAIN = b"torch-integrity:tensor:v1\x00"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def reference_tensor_digest(name: str, dtype: str, shape: tuple[int, ...], raw: bytes) -> str:
    """The documented layout, from first principles: tag, u64 LE length, canonical header, bytes."""
    header = json.dumps(
        {"dtype": dtype, "name": name, "nbytes": len(raw), "shape": list(shape)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,  # canonical JSON keeps non-ASCII as UTF-8
    ).encode("utf-8")
    return hashlib.sha256(DOMAIN + struct.pack("<Q", len(header)) + header + raw).hexdigest()


def bfloat16_bytes(values: list[float]) -> bytes:
    # bfloat16 is the high half of a float32 (exact for the values used here).
    return b"".join(struct.pack("<f", v)[2:] for v in values)


# Computed once with digest_tensor("layer.weight", ...) and written down; a change here means
# every digest ever recorded changes, which needs a new algorithm name.
KNOWN = {
    "float32": "ce2c14ee619bf17f4937cd6b068fa4d9546a8add3f1e99e765f7e64358bf8491",
    "float64": "94941952c520d557d8706b7dcbec2d6b9bc905448b291cea0c47ca636d1499aa",
    "float16": "f4b12570c68fe928fc974353bd12acc6c45ab0b61cf275f15a3ec67d170387da",
    "bfloat16": "216f45b13e07ec4822b2390a73a0bbad5eef2ceb49b6786ed6d441baf3caa077",
    "int64": "a972cea5de283cda2c60cf2d48845b93a9838168ba2b0030f8c03aa92f1770f7",
    "int32": "4b673a854264c5e7817850663c87bf19d82952e708d2c990ef8ccba476a97de8",
    "int16": "25efb824e79fad0d09915c20c410c05aa6d678f496eacdec8f70c64ede64f574",
    "int8": "4f0c0dc9a968fdce223a0fdcbda51cd771d0953688014a80801b32948dffe502",
    "uint8": "15530607204b762d31faac4837578fc2270a38fbb6cc5d64e1921e26960efe59",
    "bool": "42ec835e59843ef7c5d2bcddc508d692ec4b07a99db6ea32cfdd7854932c43fe",
}
# (dtype name, torch dtype, struct code (None: bfloat16), values, shape)
VECTORS = [
    ("float32", torch.float32, "f", [1.5, -2.0, 0.0, 3.140625], (2, 2)),
    ("float64", torch.float64, "d", [1.5, -2.0, 1e-300], (3,)),
    ("float16", torch.float16, "e", [1.0, -0.5, 65504.0], (3,)),
    ("bfloat16", torch.bfloat16, None, [1.0, -0.5, 256.0, 0.0078125], (4,)),
    ("int64", torch.int64, "q", [1, -1, 2**62], (3,)),
    ("int32", torch.int32, "i", [1, -1, 2**31 - 1], (3,)),
    ("int16", torch.int16, "h", [1, -1, 32767], (3,)),
    ("int8", torch.int8, "b", [1, -1, -128], (3,)),
    ("uint8", torch.uint8, "B", [0, 1, 255], (3,)),
    ("bool", torch.bool, "?", [True, False, True], (3,)),
]


@pytest.mark.parametrize(("dtype_name", "dtype", "code", "values", "shape"), VECTORS, ids=[v[0] for v in VECTORS])
def test_known_answer_vectors(dtype_name, dtype, code, values, shape):
    known = KNOWN[dtype_name]
    raw = bfloat16_bytes(values) if code is None else struct.pack("<" + code * len(values), *values)
    tensor = torch.tensor(values, dtype=dtype).reshape(shape)
    computed = digest_tensor("layer.weight", tensor)
    assert computed == Digest(TENSOR_ALGORITHM, known)
    assert known == reference_tensor_digest("layer.weight", dtype_name, shape, raw)
    assert str(computed) == f"sha256-tensor-v1:{known}"


def test_zero_dim_tensor_vector():
    known = "83fc84e302f6bb0d72673ffb82a5af98708cc2ec10c109b120ff449a4a6dadd6"
    assert digest_tensor("scalar", torch.tensor(7.0)).hex == known
    assert reference_tensor_digest("scalar", "float32", (), struct.pack("<f", 7.0)) == known
    # shape [] and shape [1] hold the same bytes but are different tensors
    assert digest_tensor("scalar", torch.tensor([7.0])).hex != known


def test_non_ascii_names_are_hashed_as_utf8_not_escapes():
    tensor = torch.tensor([1.0])
    raw = struct.pack("<f", 1.0)
    computed = digest_tensor("poids.é", tensor).hex
    assert computed == reference_tensor_digest("poids.é", "float32", (1,), raw)
    header = json.dumps({"dtype": "float32", "name": "poids.é", "nbytes": 4, "shape": [1]}, sort_keys=True, separators=(",", ":"))
    escaped = header.encode("ascii")  # "\u00e9": same JSON value, other bytes, so another digest
    assert computed != hashlib.sha256(DOMAIN + struct.pack("<Q", len(escaped)) + escaped + raw).hexdigest()


def test_empty_tensor_vector():
    known = "d16fa7271ce277beb24d04a6346657b092e6a3073edbf093a8bd6d3db4a71f2e"
    assert digest_tensor("empty", torch.empty((0, 3))).hex == known
    assert reference_tensor_digest("empty", "float32", (0, 3), b"") == known
    assert digest_tensor("empty", torch.empty((3, 0))).hex != known
    assert list(tensor_byte_chunks(torch.empty((0, 3)))) == []


def test_view_sharing_storage_hashes_only_its_own_elements():
    base = torch.arange(12, dtype=torch.float32)
    view = base[3:7]
    assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert view.storage_offset() == 3
    expected = reference_tensor_digest("v", "float32", (4,), struct.pack("<4f", 3.0, 4.0, 5.0, 6.0))
    assert digest_tensor("v", view).hex == expected
    assert digest_tensor("v", view.clone()).hex == expected


@pytest.mark.parametrize(
    "make_view",
    [
        lambda base: base.reshape(3, 4).t(),  # transposed
        lambda base: base[::3],  # strided
        lambda base: base.reshape(3, 4)[:, 1:3],  # sliced rows
        lambda base: base[:2].expand(5, 2),  # stride 0
        lambda base: base.reshape(2, 2, 3).permute(2, 0, 1),
    ],
    ids=["transpose", "stride", "slice", "expand", "permute"],
)
def test_non_contiguous_view_equals_contiguous_copy(make_view):
    view = make_view(torch.arange(12, dtype=torch.float32))
    assert not view.is_contiguous()
    copy = view.contiguous()
    assert digest_tensor("x", view) == digest_tensor("x", copy)
    assert digest_tensor("x", view).hex == reference_tensor_digest("x", "float32", tuple(copy.shape), copy.numpy().tobytes())


def test_conjugate_and_negative_views_hash_their_values():
    values = torch.tensor([1 + 2j, -3 + 0.5j], dtype=torch.complex64)
    lazy = values.conj()
    assert lazy.is_conj()
    assert digest_tensor("c", lazy) == digest_tensor("c", lazy.resolve_conj())
    assert digest_tensor("c", lazy) != digest_tensor("c", values)


def test_contiguous_cpu_tensor_is_read_in_place():
    tensor = torch.arange(1000, dtype=torch.float64)
    (chunk,) = list(tensor_byte_chunks(tensor))
    assert np.frombuffer(chunk, dtype=np.uint8).ctypes.data == tensor.data_ptr()
    assert len(chunk) == 8000


def test_name_dtype_and_shape_each_change_the_digest():
    base = digest_tensor("a", torch.zeros(4, dtype=torch.int32))
    assert digest_tensor("b", torch.zeros(4, dtype=torch.int32)) != base  # name
    assert digest_tensor("a", torch.zeros(4, dtype=torch.float32)) != base  # dtype, same bytes
    assert digest_tensor("a", torch.zeros(2, 2, dtype=torch.int32)) != base  # shape, same bytes
    assert digest_tensor("a", torch.zeros(4, dtype=torch.int32)) == base


def test_requires_grad_does_not_matter():
    weights = torch.ones(3, requires_grad=True)
    assert digest_tensor("w", weights) == digest_tensor("w", torch.ones(3))


def test_nan_payload_bits_are_hashed_faithfully():
    def floats(*bits: int) -> torch.Tensor:
        return torch.tensor(list(bits), dtype=torch.int64).to(torch.int32).view(torch.float32)

    quiet = floats(0x7FC00000)
    payload = floats(0x7FC00001)
    negative = floats(0xFFC00000 - (1 << 32))
    assert torch.isnan(quiet).all() and torch.isnan(payload).all() and torch.isnan(negative).all()
    digests = {digest_tensor("x", t) for t in (quiet, payload, negative)}
    assert len(digests) == 3
    assert digest_tensor("x", floats(0x7FC00001)) == digest_tensor("x", payload)
    assert digest_tensor("x", torch.tensor([0.0])) != digest_tensor("x", torch.tensor([-0.0]))


def test_empty_state_dict_root_is_sha256_of_nothing():
    state = digest_state_dict({})
    assert state.root == Digest(STATE_ALGORITHM, EMPTY_SHA256)
    assert dict(state.tensors) == {}


def test_state_dict_known_answer_and_order_independence():
    known = "b011cbe01d2cfae5e0ba2a9b6006380430948a90b509514ddd131b1e718adeeb"
    state = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([3], dtype=torch.int64), "c": torch.tensor(True)}
    digest = digest_state_dict(state)
    assert digest.root.hex == known
    assert list(digest.tensors) == ["a", "b", "c"]
    # Independent: leaves are the raw tensor digests in name order, RFC 6962 hashing.
    leaves = [
        reference_tensor_digest("a", "int64", (1,), struct.pack("<q", 3)),
        reference_tensor_digest("b", "float32", (2,), struct.pack("<2f", 1.0, 2.0)),
        reference_tensor_digest("c", "bool", (), b"\x01"),
    ]
    hashed = [hashlib.sha256(b"\x00" + bytes.fromhex(leaf)).digest() for leaf in leaves]
    left = hashlib.sha256(b"\x01" + hashed[0] + hashed[1]).digest()
    assert hashlib.sha256(b"\x01" + left + hashed[2]).hexdigest() == known
    assert digest_state_dict(dict(reversed(list(state.items())))).root.hex == known
    assert str(digest) == f"sha256-merkle-v1:{known}"


def test_every_tensor_has_an_inclusion_proof_in_the_root():
    state = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(7)}
    digest = digest_state_dict(state)
    leaf_hashes = [merkle.leaf_hash(d.raw) for d in digest.tensors.values()]
    for index, _ in enumerate(digest.tensors):
        path = merkle.inclusion_path(leaf_hashes, index)
        assert merkle.root_from_inclusion_path(leaf_hashes[index], index, len(leaf_hashes), path) == digest.root.raw


def test_differing_names_the_changed_added_and_removed_tensors():
    original = {"a": torch.zeros(3), "b": torch.ones(3), "c": torch.ones(2)}
    edited = {"a": torch.zeros(3), "b": torch.tensor([1.0, 1.0, 1.0000001]), "d": torch.ones(2)}
    first, second = digest_state_dict(original), digest_state_dict(edited)
    assert first.root != second.root
    assert first.differing(second) == ["b", "c", "d"]
    assert first.differing(digest_state_dict(dict(original))) == []
    assert root_of(first.tensors) == first.root


def _mixed_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(12):
        values = torch.randn(40_000 + 1_000 * i, generator=generator)
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float64][i % 4]
        state[f"block{i}.weight"] = values.to(dtype)
    state["counter"] = torch.tensor(5)
    state["mask"] = torch.tensor([True, False])
    state["strided"] = torch.arange(100_000, dtype=torch.float32)[::7]
    return state


def test_parallel_hashing_equals_serial(monkeypatch):
    state = _mixed_state(0)
    assert sum(t.numel() * t.element_size() for t in state.values()) > 1 << 20  # the threaded path applies
    serial = digest_state_dict(state, threads=1)
    used_threads: set[str] = set()
    real = digest_module.digest_tensor

    def recording(name: str, tensor: torch.Tensor) -> Digest:
        used_threads.add(threading.current_thread().name)
        return real(name, tensor)

    monkeypatch.setattr(digest_module, "digest_tensor", recording)
    parallel = digest_state_dict(state, threads=4)
    assert any(name.startswith("ti-digest") for name in used_threads)  # really ran in the pool
    assert parallel.root == serial.root
    assert dict(parallel.tensors) == dict(serial.tensors)
    assert digest_state_dict(state).root == serial.root  # default thread count


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=4096),
    dtype=st.sampled_from([torch.uint8, torch.int16, torch.float32, torch.float64, torch.bfloat16]),
    name=st.text(max_size=20),
)
def test_digest_matches_one_shot_reference(data, dtype, name):
    usable = len(data) - len(data) % dtype.itemsize
    tensor = torch.frombuffer(bytearray(data[:usable]), dtype=torch.uint8).view(dtype) if usable else torch.empty(0, dtype=dtype)
    expected = reference_tensor_digest(name, str(dtype).removeprefix("torch."), (usable // dtype.itemsize,), data[:usable])
    assert digest_tensor(name, tensor).hex == expected


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=4), seed=st.integers(0, 2**31))
def test_any_permutation_hashes_like_its_copy(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator)
    order = torch.randperm(len(shape), generator=generator).tolist()
    view = tensor.permute(order)
    assert digest_tensor("p", view) == digest_tensor("p", view.contiguous())


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")
def test_refuses_what_it_cannot_hash():
    with pytest.raises(UsageError, match="not a tensor"):
        digest_tensor("x", [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="names must be strings"):
        digest_tensor(3, torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="layout"):
        digest_tensor("s", torch.ones(2, 2).to_sparse())
    with pytest.raises(UsageError, match="meta"):
        digest_tensor("m", torch.empty(3, device="meta"))
    with pytest.raises(UsageError, match="quantized"):
        digest_tensor("q", torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8))
    with pytest.raises(UsageError, match="not a tensor"):
        digest_state_dict({"a": torch.ones(1), "b": 2.0})  # type: ignore[dict-item]


# --- Digest values (THREATS row 17) --------------------------------------------------------


def test_digest_parse_round_trip():
    text = f"sha256-tensor-v1:{EMPTY_SHA256}"
    parsed = Digest.parse(text)
    assert parsed == Digest(TENSOR_ALGORITHM, EMPTY_SHA256)
    assert str(parsed) == text
    assert parsed.raw == hashlib.sha256(b"").digest()
    assert parsed.is_secure
    assert sha256_bytes(b"") == Digest("sha256", EMPTY_SHA256)


@pytest.mark.parametrize(
    "text",
    [
        "xxh3-64:0123456789abcdef",
        "xxh3:0123456789abcdef",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        f"sha1:{'0' * 40}",
        f"SHA256:{EMPTY_SHA256}",
        f"sha256-tensor-v2:{EMPTY_SHA256}",
        f":{EMPTY_SHA256}",
    ],
)
def test_parse_refuses_non_security_algorithms(text):
    with pytest.raises(MalformedFileError, match="not accepted as a security digest"):
        Digest.parse(text)


def test_non_security_digest_is_accepted_only_when_asked_and_never_secure():
    fingerprint = Digest.parse("xxh3-64:0123456789abcdef", require_secure=False)
    assert fingerprint.algorithm == "xxh3-64"
    assert not fingerprint.is_secure


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{EMPTY_SHA256.upper()}",
        f"sha256:{EMPTY_SHA256[:-2]}",
        f"sha256:{EMPTY_SHA256}00",
        f"sha256:{EMPTY_SHA256[:-1]}g",
        "sha256:" + "ab" * 30 + "    ",  # bytes.fromhex alone would accept this (30 bytes)
        f"sha256: {EMPTY_SHA256[1:]}",
        f"sha256:{EMPTY_SHA256}\n",
        "sha256:",
        EMPTY_SHA256,
        "",
    ],
)
def test_parse_refuses_malformed_values(text):
    with pytest.raises(MalformedFileError):
        Digest.parse(text)


@pytest.mark.parametrize("text", ["xxh3-64:", "xxh3-64:abc", "xxh3-64:ab cd", "xxh3-64:ABCD"])
def test_parse_refuses_malformed_fingerprints(text):
    with pytest.raises(MalformedFileError):
        Digest.parse(text, require_secure=False)


def test_parse_refuses_non_strings():
    with pytest.raises(InputError):
        Digest.parse(None)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        Digest.parse(b"sha256:" + EMPTY_SHA256.encode())  # type: ignore[arg-type]


def test_state_digest_str_is_the_root():
    digest = StateDigest(root=Digest(STATE_ALGORITHM, EMPTY_SHA256))
    assert str(digest) == f"sha256-merkle-v1:{EMPTY_SHA256}"


@pytest.mark.gpu
def test_cuda_tensor_hashes_like_its_cpu_copy(monkeypatch):
    monkeypatch.setattr(digest_module, "_HOST_CHUNK_BYTES", 1 << 16)  # force several bounded host copies
    cpu = torch.randn(100_003, dtype=torch.float32)
    assert digest_tensor("w", cpu.cuda()) == digest_tensor("w", cpu)
    strided = torch.randn(300, 301).cuda().t()
    assert digest_tensor("t", strided) == digest_tensor("t", strided.cpu().contiguous())
