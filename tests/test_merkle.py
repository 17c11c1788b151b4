"""RFC 6962 Merkle trees: roots, inclusion paths, and refusal of bad paths.

The reference functions below follow RFC 6962 section 2.1 literally (recursive split at
the largest power of two smaller than n); the implementation under test builds the tree
bottom-up, so agreement is a real cross-check.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_integrity import merkle


def reference_mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) of RFC 6962 section 2.1."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + reference_mth(leaves[:k]) + reference_mth(leaves[k:])).digest()


def reference_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 section 2.1.1."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*reference_path(m, leaves[:k]), reference_mth(leaves[k:])]
    return [*reference_path(m - k, leaves[k:]), reference_mth(leaves[:k])]


def leaves_of(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() * (i % 3 + 1) for i in range(n)]


# Test vectors of the certificate-transparency reference implementation (merkle_tree_test):
# the first n of these eight leaves have these roots.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("n", range(1, 9))
def test_certificate_transparency_vectors(n):
    assert merkle.merkle_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]
    assert reference_mth(CT_LEAVES[:n]).hex() == CT_ROOTS[n - 1]


def test_empty_tree_root():
    assert merkle.merkle_root([]) == hashlib.sha256(b"").digest()
    assert merkle.root_from_leaf_hashes([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_leaf_and_node_hash_layout():
    assert merkle.leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = b"L" * 32, b"R" * 32
    assert merkle.node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert merkle.node_hash(left, right) != merkle.node_hash(right, left)


@pytest.mark.parametrize("n", range(41))
def test_root_matches_recursive_reference(n):
    leaves = leaves_of(n)
    assert merkle.merkle_root(leaves) == reference_mth(leaves)
    assert merkle.root_from_leaf_hashes([merkle.leaf_hash(leaf) for leaf in leaves]) == reference_mth(leaves)


@pytest.mark.parametrize("n", range(1, 34))
def test_inclusion_paths_for_every_index(n):
    leaves = leaves_of(n)
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    root = reference_mth(leaves)
    for index in range(n):
        path = merkle.inclusion_path(hashes, index)
        assert path == reference_path(index, leaves)
        assert merkle.root_from_inclusion_path(hashes[index], index, n, path) == root


def _rejected(leaf: bytes, index: int, size: int, path: list[bytes], trusted_root: bytes) -> bool:
    """A proof is rejected if verification raises ValueError or yields another root."""
    try:
        return merkle.root_from_inclusion_path(leaf, index, size, path) != trusted_root
    except ValueError:
        return True


@pytest.mark.parametrize("n", range(1, 34))
def test_bad_inclusion_paths_are_rejected(n):
    leaves = leaves_of(n + 1)
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    root = merkle.root_from_leaf_hashes(hashes[:n])
    for index in range(n):
        leaf = hashes[index]
        path = merkle.inclusion_path(hashes[:n], index)
        # another index in the same tree
        for other in range(n):
            if other != index:
                assert _rejected(leaf, other, n, path, root), (n, index, other)
        # another leaf at this index
        assert _rejected(merkle.leaf_hash(b"forged"), index, n, path, root)
        # another tree size: the verifier then trusts that size's root, which the proof must not reach
        for size in (n - 1, n + 1):
            if index < size:
                size_root = merkle.root_from_leaf_hashes(hashes[:size])
                assert _rejected(leaf, index, size, path, size_root), (n, index, size)
        # one flipped bit anywhere in the path
        for position, sibling in enumerate(path):
            for bit in (0, 7, 8 * 31 + 3):
                flipped = bytearray(sibling)
                flipped[bit // 8] ^= 1 << (bit % 8)
                changed = [*path[:position], bytes(flipped), *path[position + 1 :]]
                assert _rejected(leaf, index, n, changed, root)
        # truncated and padded paths
        if path:
            assert _rejected(leaf, index, n, path[:-1], root)
            assert _rejected(leaf, index, n, path[1:], root)
        assert _rejected(leaf, index, n, [*path, hashes[0]], root)
        assert _rejected(leaf, index, n, [hashes[0], *path], root)


def test_structural_errors_raise_value_error():
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves_of(5)]
    path = merkle.inclusion_path(hashes, 2)
    with pytest.raises(ValueError, match="outside"):
        merkle.root_from_inclusion_path(hashes[2], 5, 5, path)
    with pytest.raises(ValueError, match="outside"):
        merkle.root_from_inclusion_path(hashes[2], -1, 5, path)
    with pytest.raises(ValueError, match="longer"):
        merkle.root_from_inclusion_path(hashes[0], 0, 1, [hashes[1]])
    with pytest.raises(ValueError, match="shorter"):
        merkle.root_from_inclusion_path(hashes[2], 2, 5, path[:-1])
    with pytest.raises(IndexError):
        merkle.inclusion_path(hashes, 5)
    with pytest.raises(IndexError):
        merkle.inclusion_path([], 0)


def test_leaf_equal_to_an_internal_node_input_hashes_differently():
    """THREATS row 4: domain separation stops a second-preimage on the tree."""
    leaves = leaves_of(4)
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    left = merkle.node_hash(hashes[0], hashes[1])
    right = merkle.node_hash(hashes[2], hashes[3])
    root = merkle.merkle_root(leaves)
    assert merkle.root_from_leaf_hashes([left, right]) == root  # the forgery's target
    # A "leaf" made of an interior node's input, with or without the node prefix:
    for forged in (hashes[0] + hashes[1], merkle.NODE_PREFIX + hashes[0] + hashes[1]):
        assert merkle.leaf_hash(forged) != left
    # Presenting the level-one node inputs as two leaves does not reproduce the root.
    assert merkle.merkle_root([hashes[0] + hashes[1], hashes[2] + hashes[3]]) != root
    assert merkle.merkle_root([left, right]) != root

    # Without the prefixes the same forgery would succeed, so the check above is not vacuous.
    def unprefixed_root(items: list[bytes]) -> bytes:
        level = [hashlib.sha256(item).digest() for item in items]
        while len(level) > 1:
            level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
        return level[0]

    plain = [hashlib.sha256(leaf).digest() for leaf in leaves]
    assert unprefixed_root([plain[0] + plain[1], plain[2] + plain[3]]) == unprefixed_root(leaves)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=70), st.data())
def test_random_trees_prove_every_leaf(leaves, data):
    index = data.draw(st.integers(0, len(leaves) - 1))
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    root = merkle.merkle_root(leaves)
    assert root == reference_mth(leaves)
    path = merkle.inclusion_path(hashes, index)
    assert merkle.root_from_inclusion_path(hashes[index], index, len(leaves), path) == root
