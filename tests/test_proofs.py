"""Inclusion proofs over manifests: RFC 6962 audit paths, and every way a bad proof fails."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from torch_integrity import merkle
from torch_integrity.digest import Digest
from torch_integrity.errors import DigestMismatchError, MalformedFileError, TamperedError, UsageError
from torch_integrity.manifest import Manifest, build_manifest
from torch_integrity.proofs import InclusionProof, audit_paths, prove_inclusion, verify_inclusion
from torch_integrity.sample_digest import digest_sample

SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100]


def samples(n: int) -> list[tuple[str, int]]:
    return [(f"sample-{i}", i) for i in range(n)]


@pytest.fixture(scope="module")
def manifests() -> dict[int, Manifest]:
    return {n: build_manifest(samples(n), progress=False) for n in SIZES}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 21, 34])
def test_audit_paths_match_the_reference_implementation(n: int) -> None:
    leaves = b"".join(digest_sample(s).raw for s in samples(n))
    leaf_hashes = [merkle.leaf_hash(leaves[i * 32 : (i + 1) * 32]) for i in range(n)]
    root, paths = audit_paths(leaves, range(n))
    assert root == merkle.root_from_leaf_hashes(leaf_hashes)
    for i in range(n):
        assert paths[i] == merkle.inclusion_path(leaf_hashes, i)


@pytest.mark.parametrize("n", SIZES)
def test_every_index_proves_and_verifies(manifests: dict[int, Manifest], n: int) -> None:
    manifest = manifests[n]
    proofs = prove_inclusion(manifest, range(n))
    assert [p.index for p in proofs] == list(range(n))
    for proof, sample in zip(proofs, samples(n), strict=True):
        restored = InclusionProof.from_json(json.loads(json.dumps(proof.to_json())))
        assert restored == proof
        verify_inclusion(restored, manifest.root, n, sample=sample)
        verify_inclusion(restored, str(manifest.root), n)


def test_a_single_index_gives_a_single_proof(manifests: dict[int, Manifest]) -> None:
    proof = prove_inclusion(manifests[9], 4)
    assert isinstance(proof, InclusionProof) and proof.index == 4 and proof.tree_size == 9
    assert prove_inclusion(manifests[9], [8, 4])[1] == proof  # order as given


@pytest.mark.parametrize("bad", [-1, 9, True])
def test_indices_outside_the_manifest_are_refused(manifests: dict[int, Manifest], bad: int) -> None:
    with pytest.raises(UsageError):
        prove_inclusion(manifests[9], [bad])


# --- bad proofs ---------------------------------------------------------------------------


@pytest.fixture
def good(manifests: dict[int, Manifest]) -> tuple[InclusionProof, Manifest]:
    manifest = manifests[17]
    return prove_inclusion(manifest, 6), manifest


def _flip(node: bytes, bit: int) -> bytes:
    data = bytearray(node)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


@pytest.mark.parametrize("level", range(5))
@pytest.mark.parametrize("bit", [0, 77, 255])
def test_a_flipped_bit_in_any_path_node_is_rejected(
    good: tuple[InclusionProof, Manifest], level: int, bit: int
) -> None:
    proof, manifest = good
    path = list(proof.path)
    path[level] = _flip(path[level], bit)
    with pytest.raises(DigestMismatchError):
        verify_inclusion(dataclasses.replace(proof, path=tuple(path)), manifest.root, 17)


@pytest.mark.parametrize(
    "path_edit",
    [
        lambda p: p[:-1],  # truncated
        lambda p: p[1:],  # lowest sibling dropped
        lambda p: (*p, p[-1]),  # padded
        lambda p: (*p, b"\x00" * 32),
        lambda p: (),
    ],
)
def test_truncated_or_padded_paths_are_rejected(good: tuple[InclusionProof, Manifest], path_edit) -> None:  # type: ignore[no-untyped-def]
    proof, manifest = good
    with pytest.raises(TamperedError, match="path"):
        verify_inclusion(dataclasses.replace(proof, path=tuple(path_edit(proof.path))), manifest.root, 17)


def test_a_wrong_root_is_rejected(good: tuple[InclusionProof, Manifest], manifests: dict[int, Manifest]) -> None:
    proof, _ = good
    other = build_manifest([*samples(16), ("intruder", 16)], progress=False)
    with pytest.raises(DigestMismatchError, match="root"):
        verify_inclusion(proof, other.root, 17)


@pytest.mark.parametrize("size", [16, 18])
def test_a_tree_size_off_by_one_is_rejected(good: tuple[InclusionProof, Manifest], size: int) -> None:
    proof, manifest = good
    with pytest.raises(TamperedError, match="17 samples"):
        verify_inclusion(proof, manifest.root, size)


def test_a_proof_edited_to_claim_another_size_fails_where_the_path_shape_changes(
    manifests: dict[int, Manifest],
) -> None:
    # RFC 6962 binds the size through the path's shape only: for index 6 of 17 the path
    # is the same in a tree of 18, so root and size must come from one trusted record
    # (docs/data-provenance.md, "What a proof proves"). Where the shape differs, it fails.
    manifest = manifests[17]
    last = prove_inclusion(manifest, 16)
    for size in (16, 18):
        with pytest.raises(TamperedError):
            verify_inclusion(dataclasses.replace(last, tree_size=size), manifest.root, size)
    inner = prove_inclusion(manifest, 6)
    with pytest.raises(TamperedError):
        verify_inclusion(dataclasses.replace(inner, tree_size=16), manifest.root, 16)


@pytest.mark.parametrize("index", [5, 7])
def test_an_index_off_by_one_is_rejected(good: tuple[InclusionProof, Manifest], index: int) -> None:
    proof, manifest = good
    with pytest.raises((TamperedError, DigestMismatchError)):
        verify_inclusion(dataclasses.replace(proof, index=index), manifest.root, 17)


def test_every_wrong_index_is_rejected_for_every_size(manifests: dict[int, Manifest]) -> None:
    for n, manifest in manifests.items():
        for proof in prove_inclusion(manifest, range(n)):
            for index in range(n):
                if index != proof.index:
                    with pytest.raises((TamperedError, DigestMismatchError)):
                        verify_inclusion(dataclasses.replace(proof, index=index), manifest.root, n)


def test_the_leaf_of_another_sample_is_rejected(good: tuple[InclusionProof, Manifest]) -> None:
    proof, manifest = good
    with pytest.raises(DigestMismatchError):
        verify_inclusion(dataclasses.replace(proof, sample_digest=manifest.sample_digest(7)), manifest.root, 17)
    with pytest.raises(DigestMismatchError, match="sample 6"):
        verify_inclusion(proof, manifest.root, 17, sample=samples(17)[7])


def test_a_proof_for_one_tree_does_not_verify_in_a_tree_with_a_changed_sample(
    good: tuple[InclusionProof, Manifest],
) -> None:
    proof, _ = good
    changed = samples(17)
    changed[12] = ("edited", 12)
    with pytest.raises(DigestMismatchError):
        verify_inclusion(proof, build_manifest(changed, progress=False).root, 17)


def test_a_root_of_another_kind_or_a_bad_size_is_a_usage_error(good: tuple[InclusionProof, Manifest]) -> None:
    proof, manifest = good
    with pytest.raises(UsageError):
        verify_inclusion(proof, Digest("sha256", manifest.root.hex), 17)
    with pytest.raises(UsageError):
        verify_inclusion(proof, manifest.root, 0)
    with pytest.raises(MalformedFileError):
        verify_inclusion(proof, "xxh3:1234", 17)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: {k: v for k, v in d.items() if k != "path"},
        lambda d: {**d, "extra": 1},
        lambda d: {**d, "format": "other-proof"},
        lambda d: {**d, "index": True},
        lambda d: {**d, "index": -1},
        lambda d: {**d, "tree_size": 0},
        lambda d: {**d, "path": ["zz" * 32]},
        lambda d: {**d, "path": ["00" * 31]},
        lambda d: {**d, "path": "00" * 32},
        lambda d: {**d, "sample_digest": "xxh3:" + "0" * 16},
        lambda d: {**d, "sample_digest": "sha256-tensor-v1:" + "0" * 64},
        lambda d: {**d, "sample_path": 5},
        lambda d: [d],
    ],
)
def test_malformed_proof_json_is_refused(good: tuple[InclusionProof, Manifest], edit) -> None:  # type: ignore[no-untyped-def]
    proof, _ = good
    with pytest.raises(MalformedFileError):
        InclusionProof.from_json(edit(proof.to_json()))


def test_folder_proofs_carry_the_path_and_check_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (folder / name).write_text(name)
    manifest = build_manifest(folder, progress=False)
    proof = prove_inclusion(manifest, 2)
    assert proof.sample_path == "sub/c.txt"
    verify_inclusion(proof, manifest.root, 3, sample_file=folder / "sub" / "c.txt")
    with pytest.raises(DigestMismatchError):
        verify_inclusion(proof, manifest.root, 3, sample_file=folder / "a.txt")
    renamed = dataclasses.replace(proof, sample_path="sub/d.txt")  # the path is part of the leaf
    with pytest.raises(DigestMismatchError):
        verify_inclusion(renamed, manifest.root, 3, sample_file=folder / "sub" / "c.txt")
    dataset_proof = prove_inclusion(build_manifest(["x"], progress=False), 0)
    with pytest.raises(UsageError, match="dataset sample"):
        verify_inclusion(dataset_proof, dataset_proof.root, 1, sample_file=folder / "a.txt")
