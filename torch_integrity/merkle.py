"""RFC 6962 Merkle trees: roots, inclusion (audit) paths and their verification.

Leaves are hashed as ``SHA-256(0x00 || leaf)`` and interior nodes as
``SHA-256(0x01 || left || right)``; the different prefixes keep a leaf from ever
being mistaken for an interior node (second-preimage resistance). The tree over
``n`` leaves splits at ``k``, the largest power of two smaller than ``n``
(RFC 6962 section 2.1). The root of an empty tree is ``SHA-256("")``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"


def leaf_hash(leaf: bytes) -> bytes:
    """Hash one leaf: ``SHA-256(0x00 || leaf)``."""
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash an interior node: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash over already-hashed leaves (MTH of RFC 6962)."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    level = list(hashes)
    # Bottom-up pairing gives the same tree as the RFC's recursive split: at every
    # level, pair neighbours and carry an odd last node up unchanged.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash over raw leaves.

    Example:
        >>> merkle_root([]).hex()[:16]
        'e3b0c44298fc1c14'
    """
    return root_from_leaf_hashes([leaf_hash(leaf) for leaf in leaves])


def inclusion_path(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path for leaf ``index`` in the tree over leaf hashes ``hashes`` (RFC 6962 2.1.1)."""
    n = len(hashes)
    if not 0 <= index < n:
        raise IndexError(f"leaf index {index} outside a tree of {n} leaves")
    path: list[bytes] = []
    lo, hi = 0, n
    # Walk down from the root, collecting the sibling subtree's root at each split.
    stack: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            stack.append(root_from_leaf_hashes(hashes[lo + k : hi]))
            hi = lo + k
        else:
            stack.append(root_from_leaf_hashes(hashes[lo : lo + k]))
            lo = lo + k
    path = stack[::-1]  # RFC order: from the leaf upwards
    return path


def root_from_inclusion_path(
    leaf_hash_value: bytes, index: int, tree_size: int, path: Sequence[bytes]
) -> bytes:
    """Recompute the root from a leaf hash and its audit path (RFC 9162 2.1.3.2).

    Raises:
        ValueError: if the path has the wrong length for ``index`` and ``tree_size``.
    """
    if not 0 <= index < tree_size:
        raise ValueError(f"leaf index {index} outside a tree of {tree_size} leaves")
    fn, sn = index, tree_size - 1
    result = leaf_hash_value
    for sibling in path:
        if sn == 0:
            raise ValueError("inclusion path is longer than the tree allows")
        if fn % 2 == 1 or fn == sn:
            result = node_hash(sibling, result)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("inclusion path is shorter than the tree requires")
    return result
