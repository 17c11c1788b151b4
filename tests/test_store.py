"""The pickle-free checkpoint store and the safe file helpers (THREATS rows 1, 10, 13, 16, 17, 20)."""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_integrity import fsutil, store
from torch_integrity.digest import Digest, digest_state_dict
from torch_integrity.errors import (
    DigestMismatchError,
    MalformedFileError,
    MissingFileError,
    UnsafePathError,
    UsageError,
)
from torch_integrity.fsutil import TEMP_PREFIX, atomic_write_bytes, read_file_bytes, resolve_inside
from torch_integrity.safetensors_io import write_safetensors
from torch_integrity.store import (
    FORMAT,
    FORMAT_KEY,
    STATE_KEY,
    load_checkpoint,
    load_checkpoint_with_metadata,
    save_checkpoint,
)


def float_bits(*bits: int) -> torch.Tensor:
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def training_state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(4, 3, generator=generator)
    return {
        "model": {
            "encoder.weight": weight,
            "encoder.bias": torch.zeros(4, dtype=torch.bfloat16),
            "head/odd~name": torch.ones(2),
        },
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=generator)},
                1: {"step": torch.tensor(3.0)},
            },
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False, "foreach": None}],
        },
        "floats": [math.nan, math.inf, -math.inf, -0.0, 1e-308],
        "nan_bits": float_bits(0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(5, dtype=torch.int64),
        "empty": torch.empty(0, 7),
        "strided": torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),
        "text": "héllo\nworld",
        "$marker-looking": {"$tensor": "not a tensor"},
        "nested": ((1, 2), [3, (4,)], {"x": None}),
        "big_int": 2**62,
    }


def assert_same(left: Any, right: Any, where: str = "state") -> None:
    """Structural equality that compares tensors bit for bit and NaN as NaN."""
    assert type(left) is type(right), where
    if isinstance(left, torch.Tensor):
        assert (left.dtype, tuple(left.shape)) == (right.dtype, tuple(right.shape)), where
        assert left.reshape(-1).view(torch.uint8).tolist() == right.reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(left, dict):
        # Key order is not kept: the structure is stored as canonical JSON (sorted keys).
        assert set(left) == set(right), where
        for key in left:
            assert_same(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, list | tuple):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_same(a, b, f"{where}/{index}")
    elif isinstance(left, float) and math.isnan(left):
        assert math.isnan(right), where
    else:
        assert left == right, where
        if isinstance(left, float):
            assert math.copysign(1.0, left) == math.copysign(1.0, right), where


def test_round_trip_of_a_nested_training_state(tmp_path):
    state = training_state()
    path = tmp_path / "step-1.safetensors"
    saved = save_checkpoint(path, state, metadata={"step": "1"})
    assert saved.path == path
    assert saved.file_digest == Digest("sha256", hashlib.sha256(path.read_bytes()).hexdigest())
    loaded, metadata = load_checkpoint_with_metadata(path, expected=saved.file_digest)
    assert_same(loaded, state)
    assert metadata["step"] == "1" and metadata[FORMAT_KEY] == FORMAT
    assert isinstance(loaded["optimizer"]["state"], dict) and set(loaded["optimizer"]["state"]) == {0, 1}
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert load_checkpoint(path, expected=str(saved.file_digest))["scalar"].item() == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_saved_tensor_digests_match_the_tensors(tmp_path):
    saved = save_checkpoint(tmp_path / "c.safetensors", training_state(), threads=1)
    official = safetensors.torch.load_file(tmp_path / "c.safetensors")
    assert digest_state_dict(official, threads=1) == saved.tensors
    assert "model/encoder.weight" in saved.tensors.tensors
    assert "model/head~1odd~0name" in saved.tensors.tensors  # '/' and '~' escaped
    assert save_checkpoint(tmp_path / "d.safetensors", training_state(), threads=4).tensors == saved.tensors


def test_checkpoints_are_plain_safetensors_for_the_official_library(tmp_path):
    state = training_state()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state)
    official = safetensors.torch.load_file(path)
    assert torch.equal(official["model/encoder.weight"], state["model"]["encoder.weight"])
    assert official["nan_bits"].view(torch.int32).tolist() == state["nan_bits"].view(torch.int32).tolist()
    assert official["empty"].shape == (0, 7)


def test_official_safetensors_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(MalformedFileError, match="not a torch-integrity checkpoint"):
        load_checkpoint(path, expected=f"sha256:{digest}")


def test_saving_is_deterministic(tmp_path):
    first = save_checkpoint(tmp_path / "a.safetensors", training_state())
    second = save_checkpoint(tmp_path / "b.safetensors", training_state())
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert first.file_digest == second.file_digest


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_subnormal=True)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10)
)
small_tensors = st.builds(
    lambda values, dtype: torch.tensor(values, dtype=torch.float64).to(dtype),
    st.lists(st.floats(-1e3, 1e3), max_size=5),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int16, torch.bool]),
)
keys = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=6)
structures = st.recursive(
    scalars | small_tensors,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(keys, inner, max_size=3)
        | st.dictionaries(st.integers(-5, 5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=30, deadline=None)
@given(state=st.dictionaries(keys, structures, max_size=4))
def test_any_supported_state_round_trips(state):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.safetensors"
        try:
            saved = save_checkpoint(path, state)
        except UsageError as exc:  # distinct dict keys can map to one tensor path ("1" and 1)
            assert "same key" in str(exc)
            return
        assert_same(load_checkpoint(path, expected=saved.file_digest), state)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"x": {1, 2}}, "cannot store a set"),
        ({"x": object()}, "cannot store a object"),
        ({"x": {(1, 2): 3}}, "dict key of type tuple"),
        ({"x": torch.ones(2, dtype=torch.complex64)}, "safetensors cannot store"),
        ({"a": {1: torch.ones(1), "1": torch.ones(1)}}, "same key"),
    ],
)
def test_unsupported_states_are_refused_and_leave_nothing_behind(tmp_path, state, message):
    with pytest.raises(UsageError, match=message):
        save_checkpoint(tmp_path / "c.safetensors", state)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(UsageError, match="reserved"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": 1}, metadata={STATE_KEY: "{}"})


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "c.safetensors"
    saved = save_checkpoint(path, {"w": torch.ones(3)})
    with pytest.raises(UsageError):
        save_checkpoint(path, {"w": torch.ones(3, dtype=torch.complex64)})
    assert load_checkpoint(path, expected=saved.file_digest)["w"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_save_reports_an_unwritable_folder_clearly(tmp_path):
    with pytest.raises(UsageError, match=r"cannot write checkpoint .*c\.safetensors: No such file or directory"):
        save_checkpoint(tmp_path / "missing-folder" / "c.safetensors", {"w": torch.ones(1)})


# --- THREATS row 1: one flipped bit --------------------------------------------------------


def test_every_flipped_byte_of_a_checkpoint_is_detected_naming_the_file(tmp_path):
    path = tmp_path / "step-7.safetensors"
    saved = save_checkpoint(path, {"model": {"w": torch.arange(8, dtype=torch.float32)}, "step": 7})
    original = path.read_bytes()
    for position in range(len(original)):
        tampered = bytearray(original)
        tampered[position] ^= 1 << (position % 8)
        path.write_bytes(bytes(tampered))
        with pytest.raises(DigestMismatchError) as caught:
            load_checkpoint(path, expected=saved.file_digest)
        assert str(path) in str(caught.value)
        assert caught.value.expected == saved.file_digest and caught.value.computed != saved.file_digest
    path.write_bytes(original)
    assert load_checkpoint(path, expected=saved.file_digest)["step"] == 7


# --- THREATS row 10: pickles ---------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))  # creates the marker when unpickled


def test_pickled_checkpoints_are_never_unpickled(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.is_dir()  # the payload is live

    marker = tmp_path / "marker"
    good = save_checkpoint(tmp_path / "good.safetensors", {"w": torch.ones(1)})
    evil = tmp_path / "step-1.safetensors"
    for data in (pickle.dumps(_Payload(marker)), pickle.dumps(_Payload(marker), protocol=0)):
        evil.write_bytes(data)
        with pytest.raises(MalformedFileError, match=str(evil)):
            load_checkpoint(evil, expected=None)
        with pytest.raises(DigestMismatchError, match=str(evil)):
            load_checkpoint(evil, expected=good.file_digest)
    sink = io.BytesIO()
    torch.save({"payload": _Payload(marker)}, sink)
    evil.write_bytes(sink.getvalue())
    with pytest.raises(MalformedFileError, match="pickle or zip archive"):
        load_checkpoint(evil, expected=None)
    with pytest.raises(DigestMismatchError):
        load_checkpoint(evil, expected=good.file_digest)
    assert not marker.exists()


# --- THREATS row 13: paths -----------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    save_checkpoint(root / "checkpoints" / "step-1.safetensors", {"w": torch.ones(1)})
    return root


def test_resolve_inside_accepts_real_files(run_dir):
    assert resolve_inside(run_dir, "checkpoints/step-1.safetensors") == run_dir / "checkpoints" / "step-1.safetensors"


def test_symlinked_files_and_folders_are_refused(run_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_checkpoint(outside, {"w": torch.zeros(1)})
    (run_dir / "checkpoints" / "link.safetensors").symlink_to(outside)
    (run_dir / "linked").symlink_to(run_dir / "checkpoints")
    (run_dir / "inner.safetensors").symlink_to(run_dir / "checkpoints" / "step-1.safetensors")  # even inside
    for relative in ("checkpoints/link.safetensors", "linked/step-1.safetensors", "inner.safetensors"):
        with pytest.raises(UnsafePathError, match="symlink"):
            resolve_inside(run_dir, relative)
    with pytest.raises(UnsafePathError, match="symlink"):
        read_file_bytes(run_dir / "checkpoints" / "link.safetensors")
    with pytest.raises(UnsafePathError, match="symlink"):
        load_checkpoint(run_dir / "checkpoints" / "link.safetensors", expected=None)


@pytest.mark.parametrize(
    "relative",
    [
        "../outside.safetensors",
        "checkpoints/../../x",
        "/etc/passwd",
        "",
        ".",
        "./checkpoints/step-1.safetensors",
        "checkpoints//step-1.safetensors",
        "checkpoints/",
        "checkpoints\\step-1.safetensors",
    ],
)
def test_escaping_paths_are_refused(run_dir, relative):
    with pytest.raises(UnsafePathError):
        resolve_inside(run_dir, relative)


def test_non_string_paths_are_refused(run_dir):
    with pytest.raises(UnsafePathError):
        resolve_inside(run_dir, None)  # type: ignore[arg-type]


def test_missing_files_are_reported(run_dir):
    with pytest.raises(MissingFileError, match=r"checkpoints/step-2\.safetensors is recorded but missing"):
        resolve_inside(run_dir, "checkpoints/step-2.safetensors")
    with pytest.raises(MissingFileError, match="does not exist"):
        read_file_bytes(run_dir / "checkpoints" / "step-2.safetensors")
    with pytest.raises(MissingFileError):
        load_checkpoint(run_dir / "nope.safetensors", expected=None)


def test_read_file_bytes_refuses_folders_and_oversized_files(run_dir):
    with pytest.raises(MalformedFileError, match="not a regular file"):
        read_file_bytes(run_dir / "checkpoints")
    path = run_dir / "checkpoints" / "step-1.safetensors"
    size = path.stat().st_size
    assert bytes(read_file_bytes(path, max_bytes=size)) == path.read_bytes()
    with pytest.raises(MalformedFileError, match=f"{size} bytes, more than the {size - 1} allowed"):
        read_file_bytes(path, max_bytes=size - 1)


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(RuntimeError), fsutil.atomic_writer(path) as handle:
        handle.write(b"partial")
        raise RuntimeError("crash in the middle")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


# --- THREATS row 16: NaN and Inf kept bit for bit -------------------------------------------


def test_nan_payloads_round_trip_and_hash_faithfully(tmp_path):
    patterns = {
        "f32": float_bits(0x7FC00000, 0x7FC00001, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000),
        "f16": torch.tensor([0x7E00, 0x7E01, 0xFE00 - 0x10000, 0x7C00], dtype=torch.int16).view(torch.float16),
        "bf16": torch.tensor([0x7FC0, 0x7FC1, -0x40, 0x7F80], dtype=torch.int16).view(torch.bfloat16),
        "f64": torch.tensor([0x7FF8000000000000, 0x7FF8000000000001], dtype=torch.int64).view(torch.float64),
    }
    path = tmp_path / "nan.safetensors"
    saved = save_checkpoint(path, {"model": patterns})
    loaded = load_checkpoint(path, expected=saved.file_digest)["model"]
    for name, tensor in patterns.items():
        assert_same(loaded[name], tensor, name)
    first, second = float_bits(0x7FC00000), float_bits(0x7FC00001)
    assert torch.isnan(first).all() and torch.isnan(second).all()
    assert digest_state_dict({"w": first}).root != digest_state_dict({"w": second}).root
    assert digest_state_dict({"w": first}).root == digest_state_dict({"w": float_bits(0x7FC00000)}).root


# --- THREATS row 17: expected digests must be SHA-256 ----------------------------------------


@pytest.mark.parametrize(
    "expected",
    ["xxh3-64:0123456789abcdef", f"sha256-tensor-v1:{'0' * 64}", Digest("xxh3-64", "0123456789abcdef"), "sha256:abc"],
)
def test_non_sha256_expected_digests_are_refused(run_dir, expected):
    with pytest.raises(MalformedFileError):
        load_checkpoint(run_dir / "checkpoints" / "step-1.safetensors", expected=expected)


# --- THREATS row 20: the bytes verified are the bytes loaded ---------------------------------


def test_the_bytes_verified_are_the_bytes_loaded(tmp_path, monkeypatch):
    """Proves: the loader reads the file once, verifies that buffer and builds the tensors
    on that same buffer. A file replaced right after the read cannot leak into the result.
    It does not prove anything about a file that changes during the read itself (that
    would give bytes that fail the digest check, tested last)."""
    path = tmp_path / "c.safetensors"
    saved = save_checkpoint(path, {"model": {"w": torch.full((64,), 1.0)}})
    replacement = tmp_path / "other.safetensors"
    save_checkpoint(replacement, {"model": {"w": torch.full((64,), 666.0)}})

    buffers: list[bytearray] = []
    real_read = store.read_file_bytes

    def read_then_swap(target: Path, **kwargs: Any) -> bytearray:
        buffer = real_read(target, **kwargs)
        buffers.append(buffer)
        os.replace(replacement, target)  # an attacker swaps the file right after our read
        return buffer

    monkeypatch.setattr(store, "read_file_bytes", read_then_swap)
    state, _ = load_checkpoint_with_metadata(path, expected=saved.file_digest)
    weights = state["model"]["w"]
    assert len(buffers) == 1  # read exactly once
    assert weights.tolist() == [1.0] * 64  # the verified content, not the swapped-in one
    assert safetensors.torch.load_file(path)["model/w"][0].item() == 666.0  # the swap did happen
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffers[0]))
    assert start <= weights.data_ptr() < start + len(buffers[0])  # a view of the verified buffer

    def read_modified(target: Path, **kwargs: Any) -> bytearray:
        buffer = real_read(target, **kwargs)
        buffer[-1] ^= 0x40  # bytes that changed while being read
        return buffer

    save_checkpoint(path, {"model": {"w": torch.full((64,), 1.0)}})
    monkeypatch.setattr(store, "read_file_bytes", read_modified)
    with pytest.raises(DigestMismatchError):
        load_checkpoint(path, expected=saved.file_digest)


# --- malformed checkpoint state --------------------------------------------------------------


def _write_raw_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state_json: str) -> str:
    with path.open("wb") as handle:
        return write_safetensors(handle, list(tensors.items()), metadata={FORMAT_KEY: FORMAT, STATE_KEY: state_json})


@pytest.mark.parametrize(
    ("tensors", "state_json", "message"),
    [
        ({"a": torch.ones(1), "b": torch.ones(1)}, '{"a":{"$tensor":"a"}}', "never refers to"),
        ({}, '{"a":{"$tensor":"a"}}', "does not hold"),
        ({}, '{"a":{"$pickle":"x"}}', "unknown marker"),
        ({}, '{"a":{"$items":[[1]]}}', "malformed \\$items"),
        ({}, '{"a":{"$items":[[[1],2]]}}', "unhashable"),
        ({}, "[1,2]", "not an object"),
        ({}, '{"a":NaN}', "non-standard JSON constant"),
        ({}, '{"a":1,"a":2}', "duplicate JSON key"),
    ],
)
def test_malformed_checkpoint_state_is_refused(tmp_path, tensors, state_json, message):
    path = tmp_path / "c.safetensors"
    digest = _write_raw_checkpoint(path, tensors, state_json)
    with pytest.raises(MalformedFileError, match=message):
        load_checkpoint(path, expected=f"sha256:{digest}")
