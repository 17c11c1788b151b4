"""Data lineage: from raw data through filters to the training set, and into training steps.

* :func:`check_dataset` / :func:`diff_manifests`: which samples changed, were added or
  were removed, by index (and by path for folders).
* :func:`verify_lineage`: each manifest in a chain names its parent by root, count and
  file digest, and the filter that produced it by the SHA-256 of its source file;
  given the filter files, a swapped or edited filter is caught.
* :func:`replay_transform`: re-run a filter on the parent dataset and confirm it
  yields exactly the child's samples.
* :func:`data_usage`: the optimizer steps at which a sample was trained, from a run's
  verified ledger.

Example::

    raw = build_manifest(raw_dataset)
    kept = build_manifest(filtered, parent=raw, transform=Transform.from_file("dedupe.py", {"t": 0.9}))
    verify_lineage(raw, kept, code_files=["dedupe.py"])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch_integrity.datasource import iter_sample_digests
from torch_integrity.digest import Digest, sha256_bytes
from torch_integrity.errors import DigestMismatchError, MalformedFileError, UsageError
from torch_integrity.fsutil import read_file_bytes
from torch_integrity.manifest import Manifest, ManifestReference, Transform, iter_digests, load_manifest
from torch_integrity.proofs import DIGEST_SIZE, ROOT_ALGORITHM, MerkleAccumulator
from torch_integrity.rundir import open_run

_SHOWN = 10


@dataclass(frozen=True)
class ManifestDiff:
    """How two manifests differ.

    Attributes:
        changed: indices present in both whose digests differ.
        added: indices only the second manifest has.
        removed: indices only the first manifest has.
        changed_paths, added_paths, removed_paths: for two folder manifests, the same
            by relative path (an inserted file shifts every later index, not its path).
    """

    changed: list[int] = field(default_factory=list)
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    changed_paths: list[str] = field(default_factory=list)
    added_paths: list[str] = field(default_factory=list)
    removed_paths: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Whether the manifests hold the same samples in the same order."""
        return not (self.changed or self.added or self.removed)

    @property
    def indices(self) -> list[int]:
        """Every differing index, sorted."""
        return sorted(self.changed + self.added + self.removed)


def _compare(expected: Manifest, computed: Iterator[bytes]) -> ManifestDiff:
    view, count = expected.digests, expected.count
    changed, seen = [], 0
    for index, raw in enumerate(computed):
        if index < count and view[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] != raw:
            changed.append(index)
        seen = index + 1
    return ManifestDiff(changed, list(range(count, seen)), list(range(seen, count)))


def diff_manifests(a: Manifest, b: Manifest) -> ManifestDiff:
    """Compare two manifests sample by sample (``a`` is the reference).

    Example:
        >>> from torch_integrity.manifest import build_manifest
        >>> d = diff_manifests(build_manifest([1, 2, 3], progress=False), build_manifest([1, 5], progress=False))
        >>> d.changed, d.added, d.removed
        ([1], [], [2])
    """
    diff = _compare(a, iter_digests(b))
    if a.kind == b.kind == "folder":  # both sorted by path: merge them
        i = j = 0
        while i < a.count or j < b.count:
            path_a = a.sample_path(i) if i < a.count else None
            path_b = b.sample_path(j) if j < b.count else None
            if path_b is None or (path_a is not None and path_a < path_b):
                diff.removed_paths.append(str(path_a))
                i += 1
            elif path_a is None or path_b < path_a:
                diff.added_paths.append(path_b)
                j += 1
            else:
                if a.sample_digest(i) != b.sample_digest(j):
                    diff.changed_paths.append(path_a)
                i, j = i + 1, j + 1
    return diff


def check_dataset(
    dataset: Any, manifest: Manifest, *, enforce: bool = False, progress: bool | None = None
) -> list[int]:
    """Check a dataset (or folder) against a manifest, sample by sample.

    Args:
        dataset: a map-style dataset, or a folder path for a folder manifest.
        manifest: the manifest it should match.
        enforce: raise instead of returning differences.
        progress: show progress on stderr (default: when stderr is a terminal).

    Returns:
        The differing indices, sorted: changed samples, then indices only the dataset
        has (added) or only the manifest has (removed). Empty when they match.

    Raises:
        DigestMismatchError: with ``enforce``, naming the first differing indices.
    """
    diff = _compare(manifest, (raw for raw, _ in iter_sample_digests(dataset, progress=progress)))
    indices = diff.indices
    if indices and enforce:
        more = f" and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else ""
        shown = ", ".join(map(str, indices[:_SHOWN])) + more
        raise DigestMismatchError(
            f"dataset against manifest {manifest.root}",
            f"{manifest.count} samples as recorded",
            f"{len(indices)} differing samples (changed {len(diff.changed)}, added {len(diff.added)}, "
            f"removed {len(diff.removed)}) at indices {shown}",
        )
    return indices


@dataclass(frozen=True)
class LineageReport:
    """A verified chain of manifests, from raw data to the training set.

    Attributes:
        manifests: each manifest's reference, in chain order.
        transforms: for each manifest after the first, the recorded filter (or None).
        code_checked: for each manifest after the first, whether a filter file was
            compared with the recorded code digest.
        notes: what the chain does not show (e.g. a first manifest whose parent was
            not given, a link with no recorded filter).
    """

    manifests: tuple[ManifestReference, ...]
    transforms: tuple[Transform | None, ...]
    code_checked: tuple[bool, ...]
    notes: tuple[str, ...]


def _as_manifest(item: Manifest | str | Path) -> Manifest:
    return item if isinstance(item, Manifest) else load_manifest(item)


def verify_lineage(
    *manifests: Manifest | str | Path, code_files: Sequence[str | Path | None] | None = None
) -> LineageReport:
    """Check a chain of manifests from raw data through filters to the training set.

    Args:
        manifests: manifests or their files, in order: the raw data first, each next
            one derived from the one before it.
        code_files: for each manifest after the first, the filter's source file (or
            ``None`` to skip); its SHA-256 must be the recorded code digest.

    Returns:
        A :class:`LineageReport`.

    Raises:
        DigestMismatchError: a manifest does not name the previous one as its parent, or
            a filter file differs from the one recorded (swapped or edited).
        TamperedError: a manifest file does not verify.
    """
    if not manifests:
        raise UsageError("verify_lineage needs at least one manifest")
    chain = [_as_manifest(m) for m in manifests]
    files = list(code_files) if code_files is not None else [None] * (len(chain) - 1)
    if len(files) != len(chain) - 1:
        raise UsageError(f"give one code file (or None) per derived manifest: {len(chain) - 1}, got {len(files)}")
    notes = []
    if chain[0].parent is not None:
        notes.append(f"manifest 0 names a parent ({chain[0].parent.root}) that was not given; the chain starts there")
    checked = []
    for position, (parent, child, code) in enumerate(zip(chain[:-1], chain[1:], files, strict=True), start=1):
        if child.parent != parent.reference:
            recorded = child.parent.to_json() if child.parent else "no parent"
            raise DigestMismatchError(f"parent of manifest {position}", parent.reference.to_json(), recorded)
        if child.transform is None:
            notes.append(f"manifest {position} records no filter; how it was derived is not shown")
        if code is None:
            checked.append(False)
            continue
        computed = sha256_bytes(read_file_bytes(Path(code)))
        recorded_code = child.transform.code_digest if child.transform else "no filter recorded"
        if computed != recorded_code:
            raise DigestMismatchError(f"filter code {code} for manifest {position}", recorded_code, computed)
        checked.append(True)
    return LineageReport(
        tuple(m.reference for m in chain), tuple(m.transform for m in chain[1:]), tuple(checked), tuple(notes)
    )


def replay_transform(
    parent_dataset: Any,
    filter_fn: Callable[..., Any],
    child_manifest: Manifest,
    *,
    check_code: bool = True,
    progress: bool | None = None,
) -> None:
    """Re-run a filter on the parent dataset and confirm it gives the child's samples.

    The filter is called as ``filter_fn(parent_dataset, **params)`` with the recorded
    parameters (a JSON object, or none) and must return a map-style dataset.

    Args:
        parent_dataset: the parent's samples; they must give the child's recorded
            parent root.
        filter_fn: the filter function.
        child_manifest: the manifest of the filtered dataset (with parent and transform).
        check_code: also require that ``filter_fn``'s source file is the recorded one.
        progress: show progress on stderr (default: when stderr is a terminal).

    Raises:
        DigestMismatchError: the filter's code, the parent dataset or the filtered
            samples differ from what the child manifest records.
        UsageError: the child manifest records no parent or no filter.
    """
    transform, parent = child_manifest.transform, child_manifest.parent
    if transform is None or parent is None:
        raise UsageError("the child manifest records no parent and filter to replay")
    if check_code:
        source = inspect.getsourcefile(filter_fn)
        if source is None:
            raise UsageError(f"cannot find the source file of {filter_fn!r}; pass check_code=False")
        computed = sha256_bytes(read_file_bytes(Path(source)))
        if computed != transform.code_digest:
            raise DigestMismatchError(f"filter code {source}", transform.code_digest, computed)
    tree = MerkleAccumulator()
    for raw, _ in iter_sample_digests(parent_dataset, progress=progress):
        tree.add(raw)
    parent_root = Digest(ROOT_ALGORITHM, tree.root().hex())
    if (parent_root, tree.count) != (parent.root, parent.count):
        raise DigestMismatchError(
            "parent dataset", f"{parent.count} samples, root {parent.root}", f"{tree.count} samples, root {parent_root}"
        )
    params = transform.params if transform.params is not None else {}
    if not isinstance(params, dict):
        raise UsageError(f"recorded filter parameters are not a JSON object ({params!r}); call the filter yourself")
    check_dataset(filter_fn(parent_dataset, **params), child_manifest, enforce=True, progress=progress)


@dataclass(frozen=True)
class SampleUsage:
    """Where one sample went in a run.

    Attributes:
        index: the sample index.
        steps: the steps whose batches held it, in ledger order (a step appears once
            per step record, so twice if a resume re-recorded it).
        steps_without_indices: step records that named no indices (iterable datasets);
            whether they used the sample is not known.
        run_id: the run.
        data_manifest: the manifest reference of each run_start record, in order.
    """

    index: int
    steps: list[int]
    steps_without_indices: int
    run_id: str
    data_manifest: list[Any]


def _flatten_indices(value: Any, seq: int) -> Iterator[int]:
    for item in value:
        if isinstance(item, list):
            yield from _flatten_indices(item, seq)
        elif type(item) is int:
            yield item
        else:
            raise MalformedFileError(f"ledger record {seq}: indices hold a {type(item).__name__}, not integers")


def sample_usage(run_dir: str | Path, index: int) -> SampleUsage:
    """Find the steps at which sample ``index`` was trained, from the run's verified ledger."""
    if type(index) is not int or index < 0:
        raise UsageError(f"a sample index is a non-negative integer, not {index!r}")
    history = open_run(run_dir)  # verifies the hash chain first
    steps, unknown = [], 0
    for record in history.iter_steps():
        ranks = record.body.get("ranks")  # distributed runs record each rank's batch
        if isinstance(ranks, list):
            parts = [part.get("indices") if isinstance(part, dict) else None for part in ranks]
            indices = None if any(part is None for part in parts) else parts
        else:
            indices = record.body.get("indices")
        if indices is None:
            unknown += 1
            continue
        if not isinstance(indices, list) or type(record.body.get("step")) is not int:
            raise MalformedFileError(f"ledger record {record.seq}: a step needs an integer step and a list of indices")
        if index in _flatten_indices(indices, record.seq):
            steps.append(record.body["step"])
    return SampleUsage(index, steps, unknown, history.run_id, [body.get("data_manifest") for body in history.start])


def data_usage(run_dir: str | Path, index: int) -> list[int]:
    """The steps at which sample ``index`` was trained (see :func:`sample_usage`).

    Example::

        data_usage("runs/exp1", 4217)  # -> [3, 1566, 3129]
    """
    return sample_usage(run_dir, index).steps


__all__ = [
    "LineageReport",
    "ManifestDiff",
    "SampleUsage",
    "check_dataset",
    "data_usage",
    "diff_manifests",
    "replay_transform",
    "sample_usage",
    "verify_lineage",
]
