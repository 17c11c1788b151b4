"""Merkle roots and inclusion proofs over a manifest's sample digests (RFC 6962).

The leaves are the raw 32-byte sample digests in index order; leaf and node hashes
are those of :mod:`torch_integrity.merkle` (``0x00`` / ``0x01`` prefixes).

* :class:`MerkleAccumulator` computes the root of a stream of leaves keeping only
  one hash per set bit of the leaf count (``O(log n)`` memory), so a manifest of any
  size is built without holding its tree.
* :func:`prove_inclusion` makes RFC 6962 audit paths for any number of indices in a
  single pass over the leaves (each leaf hashed once).
* :func:`verify_inclusion` checks a proof against a root and tree size alone: it
  shows that a sample with a given digest sits at a given index of the dataset with
  that root, without the dataset.

Example:
    >>> from torch_integrity import merkle
    >>> acc = MerkleAccumulator()
    >>> for leaf in (b"a", b"b", b"c"):
    ...     acc.add(leaf)
    >>> acc.root() == merkle.merkle_root([b"a", b"b", b"c"])
    True
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from torch_integrity import merkle
from torch_integrity.digest import STATE_ALGORITHM, Digest
from torch_integrity.errors import DigestMismatchError, MalformedFileError, TamperedError, UsageError
from torch_integrity.sample_digest import SAMPLE_ALGORITHM, digest_file_sample, digest_sample

if TYPE_CHECKING:  # pragma: no cover
    from torch_integrity.manifest import Manifest

PROOF_FORMAT = "torch-integrity-inclusion-proof-v1"
ROOT_ALGORITHM = STATE_ALGORITHM  # "sha256-merkle-v1": RFC 6962 tree over SHA-256
DIGEST_SIZE = 32
_UNSET: Any = object()


class MerkleAccumulator:
    """The RFC 6962 root of leaves added one at a time, in ``O(log n)`` memory.

    The stack holds the roots of the perfect subtrees that the leaves so far form,
    largest (leftmost) first, one per set bit of the count. Adding a leaf merges
    equal-sized neighbours like a binary counter's carries; the root folds the
    stack from the right, which is exactly RFC 6962's split at the largest power of
    two below ``n``.
    """

    __slots__ = ("_count", "_stack")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self._count = 0

    @property
    def count(self) -> int:
        """Number of leaves added."""
        return self._count

    def add_leaf_hash(self, leaf_hash: bytes) -> None:
        """Add a leaf that is already hashed (``SHA-256(0x00 || leaf)``)."""
        self._count += 1
        carry, node = self._count, leaf_hash
        while not carry & 1:
            node = merkle.node_hash(self._stack.pop(), node)
            carry >>= 1
        self._stack.append(node)

    def add(self, leaf: bytes) -> None:
        """Add a raw leaf (for manifests: a 32-byte sample digest)."""
        self.add_leaf_hash(merkle.leaf_hash(leaf))

    def root(self) -> bytes:
        """The tree hash of the leaves so far (``SHA-256("")`` when there are none)."""
        if not self._stack:
            return hashlib.sha256(b"").digest()
        node = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            node = merkle.node_hash(left, node)
        return node


def root_of_digests(digests: bytes | bytearray | memoryview, start: int = 0, stop: int | None = None) -> bytes:
    """Root of the tree over 32-byte leaves ``digests[start:stop]`` (counted in leaves)."""
    view = memoryview(digests)
    end = len(view) // DIGEST_SIZE if stop is None else stop
    accumulator = MerkleAccumulator()
    leaf = merkle.leaf_hash
    for offset in range(start * DIGEST_SIZE, end * DIGEST_SIZE, DIGEST_SIZE):
        accumulator.add_leaf_hash(leaf(view[offset : offset + DIGEST_SIZE].tobytes()))
    return accumulator.root()


def audit_paths(
    digests: bytes | bytearray | memoryview, indices: Iterable[int]
) -> tuple[bytes, dict[int, list[bytes]]]:
    """RFC 6962 audit paths for several leaves, hashing every leaf once.

    Args:
        digests: the 32-byte leaves, concatenated in index order.
        indices: leaf indices to prove.

    Returns:
        ``(root, {index: path})``; each path lists sibling hashes from the leaf upwards.
    """
    view = memoryview(digests)
    size = len(view) // DIGEST_SIZE
    targets = sorted(set(indices))
    for index in targets:
        if not 0 <= index < size:
            raise UsageError(f"index {index} is outside a manifest of {size} samples")
    paths: dict[int, list[bytes]] = {index: [] for index in targets}

    def subtree(lo: int, hi: int, t_lo: int, t_hi: int) -> bytes:
        # targets[t_lo:t_hi] are the indices inside [lo, hi)
        if t_lo == t_hi:
            return root_of_digests(view, lo, hi)
        if hi - lo == 1:
            return merkle.leaf_hash(view[lo * DIGEST_SIZE : hi * DIGEST_SIZE].tobytes())
        middle = lo + (1 << ((hi - lo - 1).bit_length() - 1))
        t_middle = bisect_left(targets, middle, t_lo, t_hi)
        left = subtree(lo, middle, t_lo, t_middle)
        right = subtree(middle, hi, t_middle, t_hi)
        for index in targets[t_lo:t_middle]:
            paths[index].append(right)
        for index in targets[t_middle:t_hi]:
            paths[index].append(left)
        return merkle.node_hash(left, right)

    return subtree(0, size, 0, len(targets)), paths


@dataclass(frozen=True)
class InclusionProof:
    """Evidence that one sample is at one index of a manifest with a given root.

    Attributes:
        index: the sample's index in the dataset.
        tree_size: the manifest's sample count.
        sample_digest: the sample's ``sha256-sample-v1`` digest (the leaf).
        path: the audit path, sibling hashes from the leaf upwards.
        root: the root the proof was made against (informational: always verify
            against a root from a trusted source, e.g. the run's ledger).
        sample_path: for folder manifests, the file's relative path (hashed into the leaf).
    """

    index: int
    tree_size: int
    sample_digest: Digest
    path: tuple[bytes, ...]
    root: Digest
    sample_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form written by ``torch-integrity data-prove``."""
        data: dict[str, Any] = {
            "format": PROOF_FORMAT,
            "index": self.index,
            "tree_size": self.tree_size,
            "sample_digest": str(self.sample_digest),
            "path": [node.hex() for node in self.path],
            "root": str(self.root),
        }
        if self.sample_path is not None:
            data["sample_path"] = self.sample_path
        return data

    @classmethod
    def from_json(cls, data: Any) -> InclusionProof:
        """Parse :meth:`to_json`'s form strictly.

        Raises:
            MalformedFileError: anything but exactly that form.
        """
        required = {"format", "index", "tree_size", "sample_digest", "path", "root"}
        if not isinstance(data, dict) or not required <= set(data) or not set(data) <= required | {"sample_path"}:
            raise MalformedFileError(f"not an inclusion proof (expected the keys {sorted(required)})")
        if data["format"] != PROOF_FORMAT:
            raise MalformedFileError(f"unknown proof format {data['format']!r} (expected {PROOF_FORMAT})")
        index, size, path = data["index"], data["tree_size"], data["path"]
        if type(index) is not int or type(size) is not int or index < 0 or size < 1:
            raise MalformedFileError("proof index and tree_size must be integers, index >= 0, tree_size >= 1")
        if not isinstance(path, list) or not all(isinstance(node, str) and len(node) == 64 for node in path):
            raise MalformedFileError("proof path must be a list of 64-character hex hashes")
        try:
            nodes = tuple(bytes.fromhex(node) for node in path)
        except ValueError:
            raise MalformedFileError("proof path holds a node that is not hex") from None
        sample_path = data.get("sample_path")
        if sample_path is not None and not isinstance(sample_path, str):
            raise MalformedFileError("proof sample_path must be a string")
        sample_digest = Digest.parse(data["sample_digest"])
        if sample_digest.algorithm != SAMPLE_ALGORITHM:
            raise MalformedFileError(f"proof leaf is a {sample_digest.algorithm} digest, not {SAMPLE_ALGORITHM}")
        return cls(index, size, sample_digest, nodes, Digest.parse(data["root"]), sample_path)


@overload
def prove_inclusion(manifest: Manifest, indices: int) -> InclusionProof: ...
@overload
def prove_inclusion(manifest: Manifest, indices: Iterable[int]) -> list[InclusionProof]: ...
def prove_inclusion(manifest: Manifest, indices: int | Iterable[int]) -> InclusionProof | list[InclusionProof]:
    """Make RFC 6962 inclusion proofs for samples of a manifest.

    Args:
        manifest: a loaded (hence root-verified) manifest.
        indices: one index, or several (proved in one pass over the leaves).

    Returns:
        One :class:`InclusionProof` for an ``int``, else a list in the order given.

    Example:
        >>> from torch_integrity.manifest import build_manifest
        >>> m = build_manifest([b"x", b"y", b"z"], progress=False)
        >>> verify_inclusion(prove_inclusion(m, 1), m.root, 3, sample=b"y")
    """
    wanted = [indices] if isinstance(indices, int) else list(indices)
    if any(type(i) is not int for i in wanted):
        raise UsageError("sample indices must be integers")
    root, paths = audit_paths(manifest.digests, wanted)
    if root != manifest.root.raw:  # a Manifest verified its root when built or loaded
        raise TamperedError(f"manifest digests give root {root.hex()}, not its recorded {manifest.root}")
    proofs = [
        InclusionProof(
            index=i,
            tree_size=manifest.count,
            sample_digest=manifest.sample_digest(i),
            path=tuple(paths[i]),
            root=manifest.root,
            sample_path=manifest.sample_path(i),
        )
        for i in wanted
    ]
    return proofs[0] if isinstance(indices, int) else proofs


def verify_inclusion(
    proof: InclusionProof,
    root: Digest | str,
    tree_size: int,
    *,
    sample: Any = _UNSET,
    sample_file: str | Path | None = None,
) -> None:
    """Check an inclusion proof against a trusted root and size, without the dataset.

    Args:
        proof: the proof (e.g. ``InclusionProof.from_json(...)``).
        root: the manifest root from a trusted source (the run's ledger, a signed record).
        tree_size: the manifest's sample count from the same source.
        sample: if given, the sample itself; its digest must be the proof's leaf.
        sample_file: for folder manifests, the file; hashed with the proof's
            ``sample_path`` and compared with the proof's leaf.

    Raises:
        DigestMismatchError: the sample is not the proof's leaf, or the path leads to
            another root.
        TamperedError: the proof does not fit the tree (wrong size, index outside it,
            path too long or too short).
        UsageError: bad arguments.
    """
    trusted = Digest.parse(root) if isinstance(root, str) else root
    if trusted.algorithm != ROOT_ALGORITHM:
        raise UsageError(f"a manifest root is a {ROOT_ALGORITHM} digest, not {trusted.algorithm}")
    if type(tree_size) is not int or tree_size < 1:
        raise UsageError(f"tree size must be a positive integer, got {tree_size!r}")
    where = f"inclusion proof for sample {proof.index}"
    if proof.tree_size != tree_size:
        raise TamperedError(f"{where}: made for a manifest of {proof.tree_size} samples, not {tree_size}")
    if not 0 <= proof.index < tree_size:
        raise TamperedError(f"{where}: index outside a manifest of {tree_size} samples")
    if sample is not _UNSET and digest_sample(sample) != proof.sample_digest:
        raise DigestMismatchError(f"sample {proof.index}", proof.sample_digest, digest_sample(sample))
    if sample_file is not None:
        if proof.sample_path is None:
            raise UsageError(f"{where} is for a dataset sample, not a file; pass the sample instead")
        raw, _ = digest_file_sample(Path(sample_file), proof.sample_path)
        computed = Digest(SAMPLE_ALGORITHM, raw.hex())
        if computed != proof.sample_digest:
            raise DigestMismatchError(f"{sample_file} as {proof.sample_path}", proof.sample_digest, computed)
    try:
        computed_root = merkle.root_from_inclusion_path(
            merkle.leaf_hash(proof.sample_digest.raw), proof.index, tree_size, proof.path
        )
    except ValueError as exc:
        raise TamperedError(f"{where}: {exc} ({len(proof.path)} nodes)") from None
    if computed_root != trusted.raw:
        raise DigestMismatchError(f"root from {where}", trusted, Digest(ROOT_ALGORITHM, computed_root.hex()))
