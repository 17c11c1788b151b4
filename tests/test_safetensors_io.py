"""The strict safetensors reader and streaming writer (THREATS rows 10, 11, 20).

Interoperability is checked against the official ``safetensors`` library in both
directions; every malformed file is refused by ``parse_header`` before a tensor exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from torch_integrity import safetensors_io
from torch_integrity.errors import MalformedFileError, UsageError
from torch_integrity.safetensors_io import (
    DTYPE_CODES,
    MAX_HEADER_BYTES,
    load_safetensors_buffer,
    parse_header,
    write_safetensors,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "f32": torch.randn(3, 4, generator=generator),
        "f64": torch.randn(5, generator=generator, dtype=torch.float64),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "i32": torch.tensor([2**31 - 1, -(2**31)], dtype=torch.int32),
        "i16": torch.tensor([-5, 5], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([0, 2**63 - 1], dtype=torch.uint64),
        "bool": torch.tensor([True, False, True]),
        "f8e4m3": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
        "f8e5m2": torch.tensor([0.5, -1.0]).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.arange(20, dtype=torch.float32).reshape(4, 5).t(),
    }


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        a, b = left[name], right[name]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), name
        assert a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist(), name


def write_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[bytes, str]:
    sink = io.BytesIO()
    digest = write_safetensors(sink, list(tensors.items()), metadata=metadata)
    return sink.getvalue(), digest


def test_writer_output_loads_with_the_official_library(tmp_path):
    tensors = sample_tensors()
    data, digest = write_to_bytes(tensors, {"note": "hello", "é": "ü"})
    assert digest == hashlib.sha256(data).hexdigest()  # streaming hash = one-shot hash of the bytes
    path = tmp_path / "ours.safetensors"
    path.write_bytes(data)
    assert_same_tensors(safetensors.torch.load_file(path), tensors)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"note": "hello", "é": "ü"}
    assert_same_tensors(safetensors.torch.load(data), tensors)


def test_official_files_load_with_our_reader(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    path = tmp_path / "official.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    loaded, metadata = load_safetensors_buffer(bytearray(path.read_bytes()), what=str(path))
    assert metadata == {"format": "pt"}
    assert_same_tensors(loaded, tensors)


def test_writer_aligns_every_tensor_to_its_element_size():
    data, _ = write_to_bytes(sample_tensors())
    header, _, data_start = parse_header(data, what="file")
    assert data_start % 8 == 0
    for entry in header.values():
        begin = entry["data_offsets"][0]  # type: ignore[index]
        itemsize = safetensors_io.CODE_DTYPES[entry["dtype"]].itemsize  # type: ignore[index]
        assert (data_start + begin) % itemsize == 0


def test_loaded_tensors_are_views_of_the_buffer():
    data, _ = write_to_bytes({"w": torch.arange(6, dtype=torch.float32)})
    buffer = bytearray(data)
    tensors, _ = load_safetensors_buffer(buffer, what="file")
    _, _, data_start = parse_header(buffer, what="file")
    buffer[data_start : data_start + 4] = struct.pack("<f", 42.0)
    assert tensors["w"][0].item() == 42.0  # no copy was made


def test_misaligned_input_is_copied_once_and_read_correctly():
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    header = {
        "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    buffer = bytearray(struct.pack("<Q", len(encoded)) + encoded + b"\x07" + values.numpy().tobytes())
    tensors, _ = load_safetensors_buffer(buffer, what="file")
    assert tensors["w"].tolist() == values.tolist()
    assert tensors["x"].tolist() == [7]


def test_every_dtype_code_is_known_to_the_official_library(tmp_path):
    path = tmp_path / "all.safetensors"
    for dtype, _code in DTYPE_CODES.items():
        data, _ = write_to_bytes({"t": torch.zeros(2, dtype=dtype)})
        path.write_bytes(data)
        assert safetensors.torch.load_file(path)["t"].dtype == dtype


def test_writer_refuses_duplicates_and_unstorable_tensors():
    with pytest.raises(UsageError, match="duplicate"):
        write_safetensors(io.BytesIO(), [("a", torch.ones(1)), ("a", torch.ones(1))])
    with pytest.raises(UsageError, match="cannot store"):
        write_safetensors(io.BytesIO(), [("c", torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(UsageError, match="strings"):
        write_safetensors(io.BytesIO(), [("a", torch.ones(1))], metadata={"k": 1})  # type: ignore[dict-item]


# --- THREATS row 11: malformed files refused before any tensor is allocated ---------------


def build(header: Any, data: bytes = b"", *, declared_length: int | None = None, raw_header: bytes | None = None) -> bytes:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    length = len(encoded) if declared_length is None else declared_length
    return struct.pack("<Q", length) + encoded + data


def entry(dtype: str, shape: Any, begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


VALID = {"a": entry("F32", [2], 0, 8), "b": entry("U8", [4], 8, 12)}
MALFORMED = {
    "too short": (b"\x10\x00\x00", "too short"),
    "header longer than the file": (
        build(VALID, bytes(12), declared_length=10_000),
        "header claims 10000 bytes but the file has",
    ),
    "absurd header length": (build(VALID, bytes(12), declared_length=2**63 + 5), "over the"),
    "header just over the limit": (build(VALID, bytes(12), declared_length=MAX_HEADER_BYTES + 1), "over the"),
    "overlapping offsets": (
        build({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
        "overlaps",
    ),
    "hole between tensors": (
        build({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
        "unaccounted bytes",
    ),
    "trailing bytes": (build(VALID, bytes(20)), "8 trailing bytes"),
    "offsets past the end": (build({"a": entry("F32", [4], 0, 16)}, bytes(8)), "outside the 8-byte data"),
    "reversed offsets": (build({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)), "offsets"),
    "three offsets": (build({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, bytes(4)), "offsets"),
    "float offsets": (build({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, bytes(4)), "offsets"),
    "negative offsets": (build({"a": entry("F32", [1], -4, 0)}, bytes(4)), "offsets"),
    "duplicate names": (
        build(
            None,
            bytes(8),
            raw_header=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        ),
        "duplicate JSON key 'a'",
    ),
    "wrong byte count": (
        build({"a": entry("F32", [3], 0, 8)}, bytes(8)),
        "spans 8 bytes, but dtype F32 and shape [3] need 12",
    ),
    "wrong byte count for dtype": (build({"a": entry("F64", [2], 0, 8)}, bytes(8)), "need 16"),
    "overflowing shape": (build({"a": entry("F32", [2**40, 2**40], 0, 8)}, bytes(8)), "need"),
    "unknown dtype": (build({"a": entry("F128", [1], 0, 16)}, bytes(16)), "unknown dtype 'F128'"),
    "pickled dtype name": (build({"a": entry("object", [1], 0, 8)}, bytes(8)), "unknown dtype"),
    "negative shape": (build({"a": entry("F32", [-2], 0, 0)}), "invalid shape"),
    "float shape": (build({"a": entry("F32", [2.0], 0, 8)}, bytes(8)), "invalid shape"),
    "bool shape": (build({"a": entry("F32", [True], 0, 4)}, bytes(4)), "invalid shape"),
    "string shape": (build({"a": entry("F32", "2", 0, 8)}, bytes(8)), "invalid shape"),
    "missing key": (build({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "malformed"),
    "extra key": (build({"a": {**entry("F32", [1], 0, 4), "code": "x"}}, bytes(4)), "malformed"),
    "entry not an object": (build({"a": [1, 2]}), "malformed"),
    "header is a list": (build([1, 2]), "not a JSON object"),
    "header not JSON": (build(None, raw_header=b"{not json}"), "not valid JSON"),
    "header not UTF-8": (build(None, raw_header=b'{"\xff":1}'), "not valid UTF-8"),
    "NaN in header": (build(None, raw_header=b'{"a":NaN}'), "non-standard JSON constant"),
    "metadata not strings": (build({"__metadata__": {"k": 1}}), "__metadata__"),
    "metadata a list": (build({"__metadata__": ["k"]}), "__metadata__"),
    "empty header": (build(None, raw_header=b""), "not a JSON object"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_files_are_refused_before_allocation(name, monkeypatch):
    data, text = MALFORMED[name]
    message = re.escape(text)
    with pytest.raises(MalformedFileError, match=message):
        parse_header(data, what="bad.safetensors")

    def no_allocation(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor was allocated for a malformed file")

    monkeypatch.setattr(torch, "frombuffer", no_allocation)
    monkeypatch.setattr(torch, "empty", no_allocation)
    with pytest.raises(MalformedFileError, match=message):
        load_safetensors_buffer(bytearray(data), what="bad.safetensors")


def test_the_valid_base_case_really_is_valid():
    tensors, metadata = load_safetensors_buffer(bytearray(build(VALID, bytes(12))), what="good")
    assert metadata == {}
    assert tensors["a"].tolist() == [0.0, 0.0] and tensors["b"].tolist() == [0, 0, 0, 0]


def test_error_messages_name_the_file():
    with pytest.raises(MalformedFileError, match=r"^checkpoints/step-3\.safetensors: "):
        parse_header(build(VALID, bytes(20)), what="checkpoints/step-3.safetensors")


# --- THREATS row 10: pickles are refused, never loaded -------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))  # creates the marker file when unpickled


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_malicious_pickles_are_refused_without_running(tmp_path, protocol):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof), protocol=protocol)).close()
    assert proof.exists()  # the payload does run when unpickled, so the check below means something

    marker = tmp_path / "marker"
    data = pickle.dumps(_Payload(marker), protocol=protocol)
    with pytest.raises(MalformedFileError):
        parse_header(data, what="evil.safetensors")
    with pytest.raises(MalformedFileError):
        load_safetensors_buffer(bytearray(data), what="evil.safetensors")
    assert not marker.exists()


def test_torch_save_archives_are_named_as_such():
    sink = io.BytesIO()
    torch.save({"w": torch.ones(2)}, sink)
    with pytest.raises(MalformedFileError, match="pickle or zip archive, not safetensors; it was not loaded"):
        parse_header(sink.getvalue(), what="model.pt")
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(MalformedFileError, match="pickle or zip"):
        parse_header(legacy.getvalue(), what="model.pt")


@pytest.mark.parametrize("header_len", [0x280, 0x380, 0x480, 0x580])
def test_headers_whose_length_bytes_look_like_a_pickle_still_load(header_len: int) -> None:
    """A header of 640 bytes starts the file with 80 02, a pickle's first bytes: still safetensors."""
    tensor = torch.arange(4, dtype=torch.float32)
    header = {"__metadata__": {"pad": ""}, "w": entry("F32", [4], 0, 16)}
    header["__metadata__"]["pad"] = "x" * (header_len - len(json.dumps(header).encode()))
    data = build(header, tensor.numpy().tobytes())
    assert data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    assert torch.equal(load_safetensors_buffer(bytearray(data), what="w.safetensors")[0]["w"], tensor)
    assert torch.equal(safetensors.torch.load(data)["w"], tensor)  # the reference library agrees


@settings(max_examples=40, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(sorted(DTYPE_CODES, key=str)),
            st.lists(st.integers(0, 3), max_size=3),
            st.integers(0, 2**31),
        ),
        max_size=6,
    )
)
def test_streaming_digest_equals_one_shot_and_round_trips(specs):
    tensors = {}
    for index, (dtype, shape, seed) in enumerate(specs):
        count = 1
        for size in shape:
            count *= size
        raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        tensors[f"t{index}"] = raw.view(dtype).reshape(shape)
    data, digest = write_to_bytes(tensors)
    assert digest == hashlib.sha256(data).hexdigest()
    loaded, _ = load_safetensors_buffer(bytearray(data), what="file")
    assert_same_tensors(loaded, tensors)
    assert_same_tensors(safetensors.torch.load(data), tensors)
