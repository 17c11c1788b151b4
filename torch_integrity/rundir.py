"""A verified, read-only view of a run directory.

Opening a run verifies the ledger's hash chain and indexes the records that matter
for audit: ``run_start``, every ``checkpoint``, ``run_end``. Step records are streamed
on demand (a long run has millions of them).

Run directory layout::

    RUN_DIR/
      ledger.jsonl
      checkpoints/step-00000000.safetensors ...
      batches/ (optional)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torch_integrity.digest import Digest, StateDigest, digest_state_dict
from torch_integrity.errors import DigestMismatchError, MalformedFileError, TamperedError, UsageError
from torch_integrity.fsutil import resolve_inside
from torch_integrity.ledger import LEDGER_FILE, LedgerHead, Record, read_records, verify_ledger
from torch_integrity.store import load_checkpoint_with_metadata

CHECKPOINT_DIR = "checkpoints"
RUN_FORMAT = "torch-integrity-run-v1"


def checkpoint_relative_path(step: int) -> str:
    """Where the checkpoint for ``step`` lives, relative to the run directory."""
    return f"{CHECKPOINT_DIR}/step-{step:09d}.safetensors"


def state_digest_from_json(data: Any, *, what: str) -> StateDigest:
    """Parse ``{"root": ..., "tensors": {name: digest}}`` as recorded in the ledger."""
    if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
        raise TamperedError(f"{what}: malformed state digest")
    tensors = {name: Digest.parse(value) for name, value in data["tensors"].items()}
    root = Digest.parse(data.get("root", ""))
    from torch_integrity.digest import root_of

    if root_of(tensors) != root:
        raise TamperedError(f"{what}: recorded root {root} does not match its own tensor digests")
    return StateDigest(root=root, tensors=dict(sorted(tensors.items())))


def state_digest_to_json(digest: StateDigest) -> dict[str, Any]:
    """The ledger form of a :class:`StateDigest`."""
    return {"root": str(digest.root), "tensors": {name: str(d) for name, d in digest.tensors.items()}}


@dataclass(frozen=True)
class CheckpointEntry:
    """A checkpoint as the ledger records it.

    Attributes:
        seq: the ledger record's seq.
        step: optimizer steps completed when it was taken (0 = initial weights).
        path: file path relative to the run directory.
        file_digest: SHA-256 of the whole file.
        model: digests of the model's state dict (plain parameter names).
        optimizer: digests of the optimizer state tensors.
        body: the full record body.
    """

    seq: int
    step: int
    path: str
    file_digest: Digest
    model: StateDigest
    optimizer: StateDigest
    body: Mapping[str, Any] = field(repr=False)


def _checkpoint_entry(record: Record) -> CheckpointEntry:
    body = record.body
    what = f"ledger record {record.seq} (checkpoint)"
    try:
        step = body["step"]
        path = body["file"]
        if type(step) is not int or step < 0 or not isinstance(path, str):
            raise KeyError
        return CheckpointEntry(
            seq=record.seq,
            step=step,
            path=path,
            file_digest=Digest.parse(body["file_digest"]),
            model=state_digest_from_json(body["model"], what=f"{what} model"),
            optimizer=state_digest_from_json(body.get("optimizer", {"root": _EMPTY_ROOT, "tensors": {}}), what=f"{what} optimizer"),
            body=body,
        )
    except (KeyError, TypeError):
        raise TamperedError(f"{what}: missing or malformed fields") from None
    except MalformedFileError as exc:
        raise TamperedError(f"{what}: {exc}") from None


_EMPTY_ROOT = "sha256-merkle-v1:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass
class RunHistory:
    """What a verified ledger says about a run.

    Attributes:
        run_dir: the run directory.
        head: the ledger head (record count and last hash).
        start: the ``run_start`` record bodies, in order (one more per resume).
        checkpoints: every checkpoint, in ledger order.
        end: the last ``run_end`` body, if the run finished.
        step_count: number of step records.
        last_kind: the kind of the last record.
    """

    run_dir: Path
    head: LedgerHead
    start: list[dict[str, Any]]
    checkpoints: list[CheckpointEntry]
    end: dict[str, Any] | None
    step_count: int
    last_kind: str | None

    @property
    def run_id(self) -> str:
        """The run's identifier, from its first ``run_start`` record."""
        return str(self.start[0]["run_id"])

    @property
    def ledger_path(self) -> Path:
        """Path of ``ledger.jsonl``."""
        return self.run_dir / LEDGER_FILE

    @property
    def finished(self) -> bool:
        """Whether the ledger ends with a ``run_end`` record."""
        return self.last_kind == "run_end"

    def checkpoint_at(self, step: int) -> CheckpointEntry:
        """The last checkpoint recorded for ``step``.

        Raises:
            UsageError: no checkpoint was taken at that step.
        """
        found = [c for c in self.checkpoints if c.step == step]
        if not found:
            steps = sorted({c.step for c in self.checkpoints})
            raise UsageError(f"no checkpoint at step {step}; checkpoints exist at steps {steps}")
        return found[-1]

    def unique_checkpoints(self) -> list[CheckpointEntry]:
        """One checkpoint per step (the last recorded), sorted by step."""
        by_step: dict[int, CheckpointEntry] = {}
        for entry in self.checkpoints:
            by_step[entry.step] = entry
        return [by_step[s] for s in sorted(by_step)]

    def iter_records(self) -> Iterator[Record]:
        """Stream every record, verifying the chain again as it goes."""
        return read_records(self.ledger_path)

    def iter_steps(self) -> Iterator[Record]:
        """Stream the ``step`` records."""
        return (r for r in self.iter_records() if r.kind == "step")

    def load_checkpoint(self, entry: CheckpointEntry) -> tuple[dict[str, Any], dict[str, str]]:
        """Load a checkpoint's full state, verified against its recorded file digest."""
        path = resolve_inside(self.run_dir, entry.path)
        return load_checkpoint_with_metadata(path, expected=entry.file_digest)

    def load_model_state(self, entry: CheckpointEntry) -> dict[str, torch.Tensor]:
        """The model state dict at a checkpoint, verified file and tensor by tensor."""
        state, metadata = self.load_checkpoint(entry)
        recorded_run = metadata.get("torch_integrity.run_id")
        if recorded_run not in (None, self.run_id):
            raise TamperedError(f"{entry.path} belongs to run {recorded_run}, not {self.run_id}")
        # capture stores Lightning's checkpoint dict ("state_dict"); plain stores use "model"
        model = state.get("state_dict", state.get("model"))
        if not isinstance(model, dict) or not all(isinstance(t, torch.Tensor) for t in model.values()):
            raise TamperedError(f"{entry.path}: checkpoint holds no model state dict")
        computed = digest_state_dict(model)
        if computed.root != entry.model.root:
            raise DigestMismatchError(
                f"model weights in {entry.path}", entry.model.root, computed.root,
                differing=tuple(computed.differing(entry.model)),
            )
        return model


def open_run(run_dir: str | os.PathLike[str], *, head: LedgerHead | None = None) -> RunHistory:
    """Verify a run directory's ledger and index it.

    Args:
        run_dir: the run directory.
        head: a trusted head taken earlier (detects truncation and rewrites).

    Returns:
        The :class:`RunHistory`.

    Raises:
        TamperedError, TruncatedError: the ledger does not verify.
        MissingFileError: there is no ledger.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    ledger_path = root / LEDGER_FILE
    verified = verify_ledger(ledger_path, head=head)
    start: list[dict[str, Any]] = []
    checkpoints: list[CheckpointEntry] = []
    end: dict[str, Any] | None = None
    steps = 0
    last_kind: str | None = None
    for record in read_records(ledger_path):
        last_kind = record.kind
        if record.seq >= verified.count:
            raise TamperedError(f"{ledger_path} grew while it was being verified")
        if record.kind == "step":
            steps += 1
        elif record.kind == "run_start":
            if record.body.get("format") != RUN_FORMAT or not isinstance(record.body.get("run_id"), str):
                raise TamperedError(f"ledger record {record.seq}: run_start without a known format or run id")
            if start and record.body["run_id"] != start[0]["run_id"]:
                raise TamperedError(f"ledger record {record.seq}: run_start of another run ({record.body['run_id']})")
            start.append(record.body)
        elif record.kind == "checkpoint":
            checkpoints.append(_checkpoint_entry(record))
        elif record.kind == "run_end":
            end = record.body
        if record.seq == 0 and record.kind != "run_start":
            raise TamperedError(f"{ledger_path}: the first record is {record.kind!r}, not run_start")
    if not start:
        raise TamperedError(f"{ledger_path} holds no run_start record")
    return RunHistory(root, verified, start, checkpoints, end, steps, last_kind)
