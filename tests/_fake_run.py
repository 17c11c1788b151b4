"""Build a small, valid run directory by hand, without Lightning.

Uses only the foundation APIs (ledger, store, rundir, digest), so tests of anything
that reads run directories can run fast and without the capture callback::

    run = build_fake_run(tmp_path / "run", steps=(0, 2, 4))
    open_run(run.run_dir).checkpoint_at(2).model.root == run.model_digests[2].root

Each checkpoint's model is a tiny two-layer MLP whose weights depend on the step.
Step records carry a ``data`` field with a ``sha256-batch-v2`` digest (bare hex, the
algorithm named in ``run_start.digests.data``, as the capture callback writes them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torch_integrity import rundir
from torch_integrity.digest import StateDigest, digest_state_dict
from torch_integrity.ledger import LedgerHead, LedgerWriter
from torch_integrity.store import save_checkpoint


@dataclass
class FakeRun:
    """What :func:`build_fake_run` made.

    Attributes:
        run_dir: the run directory.
        run_id: its run id.
        model_states: step -> the model state dict saved at that step.
        model_digests: step -> its digest.
        head: the ledger head after the last record.
    """

    run_dir: Path
    run_id: str
    model_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    model_digests: dict[int, StateDigest] = field(default_factory=dict)
    head: LedgerHead = field(default_factory=lambda: LedgerHead(0, "0" * 64))


def model_state(step: int, *, seed: int = 0, width: int = 8) -> dict[str, torch.Tensor]:
    """Deterministic small MLP weights for ``step``."""
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return {
        "0.weight": torch.randn(width, 4, generator=generator),
        "0.bias": torch.randn(width, generator=generator),
        "2.weight": torch.randn(2, width, generator=generator),
        "2.bias": torch.randn(2, generator=generator),
    }


def build_fake_run(
    run_dir: Path,
    *,
    steps: Sequence[int] = (0, 2, 4),
    run_id: str | None = None,
    seed: int = 0,
    finished: bool = True,
    settings: dict[str, Any] | None = None,
) -> FakeRun:
    """Write a run directory: run_start, checkpoints at ``steps`` with step records between, run_end.

    Args:
        run_dir: where to create it (created if missing).
        steps: checkpoint steps, increasing; step records are written for every step between.
        run_id: the run id (default: derived from ``seed``).
        seed: varies the weights and the default run id.
        finished: write a final ``run_end`` record.
        settings: extra ``run_start`` fields (default: a seed, hyperparameters, trainer, environment).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rundir.CHECKPOINT_DIR).mkdir(exist_ok=True)
    rid = run_id or hashlib.sha256(f"fake-run-{seed}".encode()).hexdigest()[:32]
    run = FakeRun(run_dir=run_dir, run_id=rid)
    start = {
        "format": rundir.RUN_FORMAT,
        "run_id": rid,
        **(
            settings
            if settings is not None
            else {
                "seed": seed,
                "hyperparameters": {"lr": 0.1, "hidden": 8},
                "trainer": {"max_steps": max(steps), "deterministic": True},
                "environment": {"python": "3.11", "torch": torch.__version__},
                "digests": {"data": "sha256-batch-v2"},
            }
        ),
    }
    empty_optimizer = rundir.state_digest_to_json(digest_state_dict({}))
    with LedgerWriter(run_dir / "ledger.jsonl") as ledger:
        ledger.append("run_start", start, durable=True)
        previous = -1
        for step in steps:
            for trained in range(previous + 1, step + 1):
                if trained == 0:
                    continue
                batch = hashlib.sha256(f"{rid}:batch:{trained}".encode()).hexdigest()
                ledger.append("step", {"step": trained, "data": batch, "loss": "float32:00000000"})
            previous = step
            state = model_state(step, seed=seed)
            relative = rundir.checkpoint_relative_path(step)
            saved = save_checkpoint(run_dir / relative, {"model": state})
            digest = digest_state_dict(state)
            ledger.append(
                "checkpoint",
                {
                    "step": step,
                    "file": relative,
                    "file_digest": str(saved.file_digest),
                    "model": rundir.state_digest_to_json(digest),
                    "optimizer": empty_optimizer,
                },
                durable=True,
            )
            run.model_states[step] = state
            run.model_digests[step] = digest
        if finished:
            ledger.append("run_end", {"steps": max(steps)}, durable=True)
        run.head = ledger.head
    return run


def append_records(run_dir: Path, count: int) -> LedgerHead:
    """Append ``count`` harmless note records (e.g. to make a ledger longer than a seal)."""
    with LedgerWriter(run_dir / "ledger.jsonl") as ledger:
        for index in range(count):
            ledger.append("note", {"index": index}, durable=True)
        return ledger.head


def drop_last_records(run_dir: Path, count: int) -> None:
    """Truncate the ledger by ``count`` whole records (a valid but shorter chain)."""
    path = run_dir / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: len(lines) - count]))
