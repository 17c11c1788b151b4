"""Segments: the steps between two consecutive checkpoints of a run's history.

A resumed run appends a ``run_start`` whose ``resume`` names the checkpoint it resumed
from; the history then continues from that checkpoint, and step records written after
it by the interrupted attempt (with no checkpoint closing them) are reported as an
abandoned tail rather than replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from torch_integrity.errors import TamperedError, UsageError
from torch_integrity.ledger import Record
from torch_integrity.rundir import CheckpointEntry, RunHistory, _checkpoint_entry


@dataclass(frozen=True)
class Segment:
    """One replayable unit.

    Attributes:
        index: position in the run's history (0-based).
        start: the checkpoint replay restores.
        end: the checkpoint whose digests the replay must reach.
        steps: the step records between them, in order.
        run_start: the ``run_start`` body in force when the segment was recorded.
    """

    index: int
    start: CheckpointEntry
    end: CheckpointEntry
    steps: tuple[Record, ...] = field(repr=False)
    run_start: dict[str, Any] = field(repr=False)

    @property
    def start_step(self) -> int:
        return self.start.step

    @property
    def end_step(self) -> int:
        return self.end.step


def rank_view(body: dict[str, Any], rank: int) -> dict[str, Any]:
    """A step record as one rank saw it (distributed runs record per-rank batches)."""
    ranks = body.get("ranks")
    if not isinstance(ranks, list):
        return body
    if not 0 <= rank < len(ranks):
        raise TamperedError(f"step {body.get('step')} records {len(ranks)} ranks; rank {rank} is not among them")
    return {**body, **ranks[rank]}


def plan_segments(history: RunHistory) -> tuple[list[Segment], list[str]]:
    """All segments of a run, and notes about records that belong to none."""
    segments: list[Segment] = []
    notes: list[str] = []
    by_seq: dict[int, CheckpointEntry] = {}
    current: CheckpointEntry | None = None
    steps: list[Record] = []
    run_start: dict[str, Any] = {}
    for record in history.iter_records():
        if record.kind == "run_start":
            run_start = record.body
            resume = record.body.get("resume")
            if resume:
                if steps:
                    notes.append(f"{len(steps)} step records after step {current.step if current else '?'} were "
                                 f"abandoned by an interrupted attempt (resumed at record {record.seq})")
                seq = resume.get("checkpoint_seq")
                if seq not in by_seq:
                    raise TamperedError(f"ledger record {record.seq}: resumes from checkpoint record {seq}, which is not in the ledger")
                current, steps = by_seq[seq], []
        elif record.kind == "checkpoint":
            entry = _checkpoint_entry(record)
            by_seq[record.seq] = entry
            if current is not None and steps:
                if entry.step != steps[-1].body.get("step"):
                    raise TamperedError(
                        f"ledger record {record.seq}: checkpoint at step {entry.step} follows step {steps[-1].body.get('step')}"
                    )
                segments.append(Segment(len(segments), current, entry, tuple(steps), run_start))
            current, steps = entry, []
        elif record.kind == "step":
            steps.append(record)
    if steps:
        notes.append(f"{len(steps)} step records after the last checkpoint (step {current.step if current else '?'}) "
                     "are not closed by a checkpoint; they cannot be replayed")
    return segments, notes


def select_segments(
    segments: list[Segment],
    *,
    indices: list[int] | None = None,
    from_step: int | None = None,
    to_step: int | None = None,
    sample: int | None = None,
    seed: int | None = None,
) -> list[Segment]:
    """Pick segments: all, by index, by step range, or ``sample`` at random with ``seed``."""
    chosen = list(segments)
    if indices:
        bad = [i for i in indices if not 0 <= i < len(segments)]
        if bad:
            raise UsageError(f"segment {bad[0]} does not exist; the run has segments 0..{len(segments) - 1}")
        chosen = [segments[i] for i in sorted(set(indices))]
    if from_step is not None or to_step is not None:
        low = from_step if from_step is not None else 0
        high = to_step if to_step is not None else float("inf")
        if low > high:
            raise UsageError(f"--from-step {low} is after --to-step {high}")
        chosen = [s for s in chosen if s.end_step > low and s.start_step < high]
    if sample is not None:
        if sample < 1:
            raise UsageError("--sample must be at least 1")
        if seed is None:
            raise UsageError("--sample needs --seed: the verifier's own randomness, so the choice can be repeated")
        rng = random.Random(seed)
        chosen = sorted(rng.sample(chosen, min(sample, len(chosen))), key=lambda s: s.index)
    if not chosen:
        raise UsageError("no segment matches the selection")
    return chosen
