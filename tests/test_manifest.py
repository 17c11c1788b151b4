"""Sample digests, dataset and folder manifests: encoding, building, storing, tampering."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_integrity import merkle
from torch_integrity.canonical import canonical_json, strict_loads
from torch_integrity.errors import (
    DigestMismatchError,
    IntegrityError,
    MalformedFileError,
    TamperedError,
    UnsafePathError,
    UsageError,
)
from torch_integrity.manifest import (
    Manifest,
    ManifestReference,
    Provenance,
    Transform,
    build_manifest,
    load_manifest,
    manifest_reference,
    write_manifest,
)
from torch_integrity.proofs import MerkleAccumulator
from torch_integrity.sample_digest import DOMAIN, digest_file_sample, digest_sample


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


class Squares:
    """A map-style dataset: (tensor, label) built from the index alone."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((2, 3), float(i * i)), i % 3


# --- sample digest ------------------------------------------------------------------------


def test_known_answer_vector_matches_the_documented_encoding() -> None:
    sample = (torch.tensor([1, 2], dtype=torch.int16), 7)
    encoding = (
        b"P" + u64(2)
        + b"X" + u64(5) + b"int16" + u64(1) + u64(2) + u64(4) + b"\x01\x00\x02\x00"
        + b"I" + u64(1) + b"\x07"
    )
    assert digest_sample(sample).hex == hashlib.sha256(DOMAIN + encoding).hexdigest()
    # the same vector as docs/data-provenance.md gives it
    assert str(digest_sample(sample)) == (
        "sha256-sample-v1:52b4fd9aff0816832b3ce35ecf6c2549eed951d27ef95796bb9dbcc6f1bf4997"
    )


def test_scalars_strings_bytes_and_containers_encode_as_documented() -> None:
    def raw(encoding: bytes) -> str:
        return hashlib.sha256(DOMAIN + encoding).hexdigest()

    assert digest_sample(None).hex == raw(b"N")
    assert digest_sample(True).hex == raw(b"T")
    assert digest_sample(False).hex == raw(b"F")
    assert digest_sample(-1).hex == raw(b"I" + u64(1) + b"\xff")
    assert digest_sample(128).hex == raw(b"I" + u64(2) + b"\x80\x00")
    assert digest_sample(1.5).hex == raw(b"D" + struct.pack("<d", 1.5))
    assert digest_sample("é").hex == raw(b"S" + u64(2) + "é".encode())
    assert digest_sample(b"ab").hex == raw(b"Y" + u64(2) + b"ab")
    assert digest_sample([None]).hex == raw(b"L" + u64(1) + b"N")
    assert digest_sample({"b": 1, "a": None}).hex == raw(
        b"M" + u64(2) + b"S" + u64(1) + b"a" + b"N" + b"S" + u64(1) + b"b" + b"I" + u64(1) + b"\x01"
    )
    assert digest_sample(np.array([1, 2], dtype=np.uint8)).hex == raw(
        b"A" + u64(3) + b"|u1" + u64(1) + u64(2) + u64(2) + b"\x01\x02"
    )


def test_large_payloads_hash_the_same_through_the_direct_path() -> None:
    payload = bytes(range(256)) * 400  # over the direct-to-hasher threshold
    expected = hashlib.sha256(DOMAIN + b"P" + u64(2) + b"Y" + u64(len(payload)) + payload + b"N").hexdigest()
    assert digest_sample((payload, None)).hex == expected
    tensor = torch.arange(50_000, dtype=torch.float32)
    head = b"X" + u64(7) + b"float32" + u64(1) + u64(50_000) + u64(200_000)
    assert digest_sample(tensor).hex == hashlib.sha256(DOMAIN + head + tensor.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1, 2], (1, 2)),  # list vs tuple
        (1, 1.0),
        (1, True),
        (1, "1"),
        ("1", b"1"),
        ([b"ab", b"c"], [b"a", b"bc"]),  # length prefixes
        ([[1], [2]], [[1, 2]]),
        ({"a": 1}, [("a", 1)]),
        (torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.float32)),  # same bytes, other dtype
        (torch.zeros(2, 3), torch.zeros(3, 2)),  # same bytes, other shape
        (torch.zeros(2), np.zeros(2, dtype=np.float32)),  # tensor vs array
        (torch.tensor(1), 1),
        (np.float64(1.0), 1.0),  # numpy scalar is an array, not a float
        (-128, 128),
        (2**200, 2**200 + 1),
        ((), []),
    ],
)
def test_different_samples_have_different_digests(a: object, b: object) -> None:
    assert digest_sample(a) != digest_sample(b)


def test_equal_values_hash_equal_whatever_the_layout_or_order() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert digest_sample(base.t()) == digest_sample(base.t().contiguous())
    big_endian = np.arange(5, dtype=">i4")
    assert digest_sample(big_endian) == digest_sample(np.arange(5, dtype="<i4"))
    assert digest_sample({"x": 1, "y": 2}) == digest_sample({"y": 2, "x": 1})
    assert digest_sample(bytearray(b"abc")) == digest_sample(b"abc") == digest_sample(memoryview(b"abc"))


def test_nan_payload_bits_are_hashed_faithfully() -> None:
    quiet = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000))[0]
    other = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    assert digest_sample(quiet) == digest_sample(float("nan"))
    assert digest_sample(quiet) != digest_sample(other)


@pytest.mark.parametrize(
    "sample",
    [
        object(), {1, 2}, np.array([object()]), {torch.zeros(1): 1}, lambda: 0, "\ud800",
        torch.zeros(3).to_sparse(), torch.zeros(2, device="meta"), np.zeros(2, dtype=[("a", "<i4")]),
    ],
)
def test_samples_without_an_encoding_are_refused(sample: object) -> None:
    with pytest.raises(UsageError):
        digest_sample(sample)


def test_a_sample_that_contains_itself_is_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(UsageError, match="deeper"):
        digest_sample(loop)


def test_file_sample_streams_like_the_in_memory_tuple(tmp_path: Path) -> None:
    file = tmp_path / "f.bin"
    file.write_bytes(os.urandom(3 << 20))  # several read chunks
    raw, size = digest_file_sample(file, "dir/f.bin")
    assert size == 3 << 20
    assert raw == digest_sample(("dir/f.bin", file.read_bytes())).raw


# --- streaming root -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 1000, 1025])
def test_streaming_root_equals_the_rfc_6962_root(n: int) -> None:
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    accumulator = MerkleAccumulator()
    for leaf in leaves:
        accumulator.add(leaf)
    assert accumulator.count == n
    assert accumulator.root() == merkle.root_from_leaf_hashes([merkle.leaf_hash(x) for x in leaves])


# --- dataset manifests --------------------------------------------------------------------


def test_build_manifest_records_every_sample_and_the_merkle_root() -> None:
    manifest = build_manifest(Squares(10), progress=False)
    digests = [digest_sample(Squares(10)[i]) for i in range(10)]
    assert manifest.count == len(manifest) == 10
    assert [manifest.sample_digest(i) for i in range(10)] == digests
    assert manifest.root.raw == merkle.merkle_root([d.raw for d in digests])
    assert manifest.root.algorithm == "sha256-merkle-v1" and manifest.kind == "dataset"
    assert manifest.sample_path(3) is None
    with pytest.raises(UsageError):
        manifest.sample_digest(10)


def test_save_load_and_streaming_write_give_the_same_bytes(tmp_path: Path) -> None:
    built = build_manifest(Squares(33), provenance=Provenance(license="MIT"), progress=False)
    built.save(tmp_path / "a.manifest")
    reference = write_manifest(Squares(33), tmp_path / "b.manifest", provenance={"license": "MIT"}, progress=False)
    assert (tmp_path / "a.manifest").read_bytes() == (tmp_path / "b.manifest").read_bytes()
    assert reference == built.reference
    assert reference.file_digest.hex == hashlib.sha256((tmp_path / "a.manifest").read_bytes()).hexdigest()
    loaded = load_manifest(tmp_path / "b.manifest", expected=manifest_reference(built))
    assert bytes(loaded.digests) == bytes(built.digests)
    assert loaded.provenance_of(5) == Provenance(license="MIT")
    assert not list(tmp_path.glob(".tmp-*"))  # no leftovers of the atomic write


def test_empty_dataset_has_the_empty_root() -> None:
    manifest = build_manifest([], progress=False)
    assert manifest.count == 0
    assert manifest.root.raw == hashlib.sha256(b"").digest()


def test_iterable_datasets_are_refused() -> None:
    with pytest.raises(UsageError, match="map-style"):
        build_manifest(iter([1, 2]), progress=False)


def test_manifest_reference_is_what_a_run_records() -> None:
    manifest = build_manifest([1, 2, 3], progress=False)
    ref = manifest_reference(manifest)
    assert ref == {"root": str(manifest.root), "count": 3, "file_digest": str(manifest.file_digest)}
    assert ManifestReference.from_json(ref) == manifest.reference
    for bad in ({**ref, "count": -1}, {**ref, "extra": 1}, {**ref, "root": str(manifest.file_digest)}, [ref]):
        with pytest.raises(MalformedFileError):
            ManifestReference.from_json(bad)


def test_progress_is_drawn_on_stderr_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    build_manifest(Squares(5), progress=True)
    assert "hashing samples: 5/5 (100%)" in capsys.readouterr().err
    build_manifest(Squares(5), progress=False)
    assert capsys.readouterr().err == ""


def test_streaming_write_keeps_no_per_sample_memory(tmp_path: Path) -> None:
    def peak(n: int) -> int:
        tracemalloc.start()
        write_manifest(range(n), tmp_path / f"{n}.manifest", progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1_000), peak(10_000)
    assert large - small < 8 << 10, (small, large)  # 9,000 more digests kept would be 288 kB


# --- provenance and transforms ------------------------------------------------------------


def test_provenance_per_source_range() -> None:
    web = Provenance(source_url="https://example.org/a", retrieved_at="2024-05-01T12:00:00+00:00", license="CC-BY-4.0")
    synthetic = Provenance(generator="diffusion-v2 sha256:abcd", license="proprietary")
    manifest = build_manifest(range(10), provenance=[(range(0, 6), web), (range(6, 10), synthetic)], progress=False)
    assert manifest.provenance_of(5) == web
    assert manifest.provenance_of(6) == synthetic
    assert [r.to_json()["start"] for r in manifest.provenance] == [0, 6]


@pytest.mark.parametrize(
    "provenance",
    [
        [(range(0, 6), Provenance()), (range(5, 10), Provenance())],  # overlap
        [(range(0, 11), Provenance())],  # past the end
        [(range(0, 10, 2), Provenance())],  # stepped range
        {"licence": "MIT"},  # unknown field
        [(range(0, 3), {"retrieved_at": "yesterday"})],  # not ISO 8601
        "MIT",
    ],
)
def test_bad_provenance_is_refused(provenance: object) -> None:
    with pytest.raises(UsageError):
        build_manifest(range(10), provenance=provenance, progress=False)


def test_transform_from_file_digests_the_source_bytes(tmp_path: Path) -> None:
    code = tmp_path / "dedupe.py"
    code.write_text("def keep(ds, threshold):\n    return ds\n")
    transform = Transform.from_file(code, {"threshold": 0.9})
    assert transform.code_digest.hex == hashlib.sha256(code.read_bytes()).hexdigest()
    assert Transform.from_json(transform.to_json()) == transform
    with pytest.raises(UsageError):
        Transform.from_file(code, {"threshold": float("nan")})


# --- folder manifests ---------------------------------------------------------------------


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


TRICKY = {
    "a0": b"1", "a.txt": b"2", "a/b": b"3", "a-b": b"4", "ab": b"5", "a/c/d": b"6", "B": b"7", "é": b"", ".h": b"",
}


def test_folder_manifest_orders_files_by_relative_path(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "data", TRICKY)
    manifest = build_manifest(folder, progress=False)
    paths = [manifest.sample_path(i) for i in range(manifest.count)]
    assert paths == sorted(paths) and len(paths) == len(TRICKY)
    for i, path in enumerate(paths):
        assert manifest.sample_digest(i) == digest_sample((path, (folder / str(path)).read_bytes()))


def test_folder_manifest_round_trips_through_a_file(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "data", {"x/1.png": b"one", "x/2.png": b"two", "y.txt": b"three"})
    reference = write_manifest(folder, tmp_path / "m", provenance=Provenance(license="MIT"), progress=False)
    built = build_manifest(str(folder), provenance=Provenance(license="MIT"), progress=False)
    assert reference == built.reference
    loaded = load_manifest(tmp_path / "m")
    assert [loaded.sample_path(i) for i in range(3)] == ["x/1.png", "x/2.png", "y.txt"]
    assert loaded.kind == "folder"


def test_symlinks_in_a_folder_are_refused(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "data", {"a.txt": b"a", "sub/b.txt": b"b"})
    (folder / "link.txt").symlink_to(folder / "a.txt")
    with pytest.raises(UnsafePathError, match=r"link\.txt"):
        build_manifest(folder, progress=False)
    (folder / "link.txt").unlink()
    (folder / "sub" / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="dirlink"):
        write_manifest(folder, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        build_manifest(tmp_path / "alias", progress=False)


def test_a_manifest_is_not_written_inside_its_own_folder(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "data", {"a": b"a"})
    with pytest.raises(UsageError, match="inside"):
        write_manifest(folder, folder / "m", progress=False)


# --- tampered and malformed files ---------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Manifest]:
    manifest = build_manifest(Squares(7), provenance=Provenance(license="MIT"), progress=False)
    manifest.save(tmp_path / "m")
    return tmp_path / "m", manifest


def _header_and_body(path: Path) -> tuple[dict[str, object], bytes]:
    data = path.read_bytes()
    newline = data.index(b"\n")
    return strict_loads(data[:newline]), data[newline + 1 :]


def _write(path: Path, header: dict[str, object], body: bytes) -> None:
    path.write_bytes(canonical_json(header) + b"\n" + body)


def test_a_changed_digest_is_tampering(saved: tuple[Path, Manifest]) -> None:
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01
    path.write_bytes(data)
    with pytest.raises(TamperedError, match="root"):
        load_manifest(path)


def test_every_bit_flip_is_caught_against_a_trusted_reference(saved: tuple[Path, Manifest]) -> None:
    path, manifest = saved
    original = path.read_bytes()
    header_end = original.index(b"\n") + 1
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 0x80 if position % 2 else 0x01
        path.write_bytes(data)
        with pytest.raises(IntegrityError):
            load_manifest(path, expected=manifest.reference)
        if position >= header_end:  # the digests alone: caught without any reference
            with pytest.raises(TamperedError):
                load_manifest(path)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda h, b: ({**h, "root": "sha256-merkle-v1:" + "0" * 64}, b), TamperedError),
        (lambda h, b: (h, b[:-32]), TamperedError),
        (lambda h, b: (h, b + b"\x00"), TamperedError),
        (lambda h, b: ({**h, "count": 6}, b[:-32]), TamperedError),
        (lambda h, b: ({**h, "count": 8}, b), TamperedError),
        (lambda h, b: ({**h, "format": "torch-integrity-manifest-v0"}, b), MalformedFileError),
        (lambda h, b: ({**h, "extra": 1}, b), MalformedFileError),
        (lambda h, b: ({k: v for k, v in h.items() if k != "transform"}, b), MalformedFileError),
        (lambda h, b: ({**h, "algorithm": "xxh3-sample"}, b), MalformedFileError),
        (lambda h, b: ({**h, "root": "xxh3:" + "0" * 16}, b), MalformedFileError),
        (lambda h, b: ({**h, "count": True}, b), MalformedFileError),
        (lambda h, b: ({**h, "provenance": [{"start": 0, "stop": 99}]}, b), MalformedFileError),
        (lambda h, b: ({**h, "parent": {"root": 1}}, b), MalformedFileError),
    ],
)
def test_edited_headers_and_bodies_are_refused(saved: tuple[Path, Manifest], edit, error) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved
    header, body = _header_and_body(path)
    _write(path, *edit(header, body))
    with pytest.raises(error):
        load_manifest(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x04\x95pickle", b"{}\n", b'{"format": "torch-integrity-manifest-v1"}\n', b"[1,2]\n", b"{" * 100],
)
def test_files_that_are_not_manifests_are_malformed(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "m").write_bytes(content)
    with pytest.raises(MalformedFileError):
        load_manifest(tmp_path / "m")


def test_a_non_canonical_header_is_malformed(saved: tuple[Path, Manifest]) -> None:
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data.replace(b'{"algorithm"', b'{ "algorithm"', 1))
    with pytest.raises(MalformedFileError, match="canonical"):
        load_manifest(path)


def test_a_different_manifest_than_expected_is_a_mismatch(saved: tuple[Path, Manifest], tmp_path: Path) -> None:
    path, _ = saved
    other = build_manifest(Squares(8), progress=False)
    with pytest.raises(DigestMismatchError):
        load_manifest(path, expected=other.reference)


def test_folder_manifest_path_edits_are_caught(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "data", {"a.txt": b"a", "b.txt": b"b"})
    write_manifest(folder, tmp_path / "m", progress=False)
    data = (tmp_path / "m").read_bytes()
    (tmp_path / "m").write_bytes(data.replace(b"b.txt", b"c.txt"))
    with pytest.raises(TamperedError, match="paths"):
        load_manifest(tmp_path / "m")


def test_symlinked_and_missing_manifest_files(saved: tuple[Path, Manifest], tmp_path: Path) -> None:
    path, _ = saved
    (tmp_path / "alias").symlink_to(path)
    with pytest.raises(UnsafePathError):
        load_manifest(tmp_path / "alias")
    with pytest.raises(UsageError):
        load_manifest(tmp_path / "missing")


def test_saved_manifest_bytes_are_stable(tmp_path: Path) -> None:
    # The file is a function of the samples and metadata only: no times, no host names.
    a, b = io.BytesIO(), io.BytesIO()
    for target in (a, b):
        manifest = build_manifest(["x", "y"], provenance={"license": "MIT"}, progress=False)
        manifest.save(tmp_path / "m")
        target.write((tmp_path / "m").read_bytes())
    assert a.getvalue() == b.getvalue()
