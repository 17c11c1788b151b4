"""Audit a run directory without training: verify it, roll back, check served weights.

* :func:`verify_run`: the ledger chain (optionally against a trusted head), every
  checkpoint file against its recorded digests (file, model tensors, optimizer
  tensors), missing and symlinked files refused, extra files reported.
* :func:`rollback`: export the verified model weights at a step as safetensors.
* :func:`check_weights`: say which checkpoint of a run a weights file equals, or which
  tensors differ from the closest one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch_integrity.digest import digest_state_dict
from torch_integrity.errors import DigestMismatchError, TamperedError, UnsafePathError, UsageError
from torch_integrity.fsutil import TEMP_PREFIX, atomic_writer, read_file_bytes
from torch_integrity.ledger import LEDGER_FILE, LedgerHead
from torch_integrity.lightning_glue import state_digests
from torch_integrity.rundir import CHECKPOINT_DIR, CheckpointEntry, RunHistory, open_run
from torch_integrity.safetensors_io import load_safetensors_buffer, write_safetensors

#: Folders other tools of ours write into a run directory.
KNOWN_FOLDERS = frozenset({CHECKPOINT_DIR, "seals", "approvals", "replays", "batches"})


@dataclass
class VerifyReport:
    """What :func:`verify_run` checked and found (it raises on any integrity failure)."""

    run_dir: str
    run_id: str
    head: LedgerHead
    records: int
    steps: int
    checkpoints_verified: list[int]
    finished: bool
    extra_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "run_dir": self.run_dir,
            "run_id": self.run_id,
            "head": self.head.to_json(),
            "records": self.records,
            "steps": self.steps,
            "checkpoints_verified": self.checkpoints_verified,
            "finished": self.finished,
            "extra_files": self.extra_files,
            "notes": self.notes,
        }


def _walk(run_dir: Path) -> list[str]:
    """Every entry under the run directory (relative paths); symlinks refused."""
    found = []
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise UnsafePathError(f"{path} is a symlink; run directories must hold real files")
            if name in files:
                found.append(path.relative_to(run_dir).as_posix())
    return found


def verify_checkpoint(history: RunHistory, entry: CheckpointEntry) -> dict[str, Any]:
    """Verify one checkpoint file (whole-file digest, run id, model and optimizer tensors).

    Returns:
        The checkpoint's state, parsed from exactly the verified bytes.
    """
    state, metadata = history.load_checkpoint(entry)
    if metadata.get("torch_integrity.run_id") not in (None, history.run_id):
        raise TamperedError(f"{entry.path} belongs to run {metadata.get('torch_integrity.run_id')}, not {history.run_id}")
    model, optimizer = state_digests(state)
    if model.root != entry.model.root:
        raise DigestMismatchError(f"model weights in {entry.path}", entry.model.root, model.root,
                                  differing=tuple(model.differing(entry.model)))
    if optimizer.root != entry.optimizer.root:
        raise DigestMismatchError(f"optimizer state in {entry.path}", entry.optimizer.root, optimizer.root,
                                  differing=tuple(optimizer.differing(entry.optimizer)))
    return state


def verify_run(run_dir: str | os.PathLike[str], *, head: LedgerHead | None = None) -> VerifyReport:
    """Verify a run directory without training.

    Args:
        run_dir: the run directory.
        head: a head copied elsewhere earlier (or from a seal): the ledger must extend it.

    Returns:
        A :class:`VerifyReport` (extra files and caveats are listed, not fatal).

    Raises:
        TamperedError, TruncatedError, DigestMismatchError, MissingFileError, UnsafePathError.
    """
    root = Path(run_dir)
    files = _walk(root) if root.is_dir() else []
    history = open_run(root, head=head)
    recorded = set()
    verified = []
    for entry in history.checkpoints:
        verify_checkpoint(history, entry)
        recorded.add(entry.path)
        verified.append(entry.step)
    if not any(c.step == 0 for c in history.checkpoints):
        raise TamperedError(f"{root}: the ledger records no step-0 checkpoint (initial weights are always captured)")
    extra = sorted(
        f for f in files
        if f != LEDGER_FILE and f not in recorded and f.split("/")[0] not in KNOWN_FOLDERS - {CHECKPOINT_DIR}
    )
    notes = []
    leftovers = [f for f in extra if Path(f).name.startswith(TEMP_PREFIX)]
    if leftovers:
        notes.append(f"{len(leftovers)} temporary file(s) from an interrupted write (never recorded): {leftovers[:3]}")
    if not history.finished:
        notes.append(
            "the ledger does not end with run_end (the run is still going, crashed, or the ledger was truncated)"
            + ("" if head else "; no trusted head or seal was given, so truncation cannot be ruled out")
        )
    return VerifyReport(str(root), history.run_id, history.head, history.head.count, history.step_count,
                        verified, history.finished, extra, notes)


def rollback(run_dir: str | os.PathLike[str], step: int, out: str | os.PathLike[str]) -> Path:
    """Export the verified model weights at ``step`` to a safetensors file.

    The file's metadata carries the run id, the step and the model digest, so
    :func:`check_weights` and people can tell where it came from.

    Returns:
        The path written.
    """
    history = open_run(run_dir)
    entry = history.checkpoint_at(step)
    model_state = history.load_model_state(entry)  # file digest, run id, then the weights' Merkle root
    destination = Path(out)
    if not destination.parent.is_dir():
        raise UsageError(f"{destination.parent} is not a directory")
    metadata = {
        "torch_integrity.run_id": history.run_id,
        "torch_integrity.step": str(step),
        "torch_integrity.model_digest": str(entry.model.root),
        "format": "pt",
    }
    with atomic_writer(destination) as handle:
        write_safetensors(handle, sorted(model_state.items()), metadata=metadata)
    return destination


@dataclass
class WeightsMatch:
    """The checkpoint a weights file equals."""

    step: int
    checkpoint: str
    model_digest: str
    run_id: str


def check_weights(file: str | os.PathLike[str], run_dir: str | os.PathLike[str]) -> WeightsMatch:
    """Find the checkpoint of a run whose model weights equal those in ``file``.

    Raises:
        DigestMismatchError: no checkpoint matches; names the closest checkpoint and the
            tensors that differ from it.
    """
    buffer = read_file_bytes(Path(file))
    tensors, _ = load_safetensors_buffer(buffer, what=str(file))
    digest = digest_state_dict(tensors)
    history = open_run(run_dir)
    entries = history.unique_checkpoints()
    for entry in entries:
        if entry.model.root == digest.root:
            return WeightsMatch(entry.step, entry.path, str(entry.model.root), history.run_id)
    if not entries:
        raise UsageError(f"{run_dir} records no checkpoint")
    closest = max(entries, key=lambda e: sum(1 for n, d in digest.tensors.items() if e.model.tensors.get(n) == d))
    raise DigestMismatchError(
        f"{file} equals no checkpoint of run {history.run_id}; closest is step {closest.step}",
        closest.model.root, digest.root, differing=tuple(digest.differing(closest.model)),
    )
