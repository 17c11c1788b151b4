"""Real 2-process DDP (gloo, CPU) capture, resume and replay, with shuffling, a worker and dropout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_integrity.audit import verify_run
from torch_integrity.replay import Verdict, replay
from torch_integrity.rundir import open_run

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "ddp_script.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def capture(run_dir: Path, ckpt: Path | None = None, **env: str) -> None:
    command = [sys.executable, str(SCRIPT), str(run_dir)] + ([str(ckpt)] if ckpt else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    capture(run_dir)
    return run_dir


def test_every_rank_is_recorded(ddp_run: Path) -> None:
    history = open_run(ddp_run)
    assert history.start[0]["trainer"]["world_size"] == 2
    steps = [r.body for r in history.iter_steps()]
    assert len(steps) == 8  # 64 samples, 2 ranks, batch 8, 2 epochs
    for body in steps:
        ranks = body["ranks"]
        assert len(ranks) == 2
        assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])  # DistributedSampler splits the data
    epoch0 = [i for body in steps if body["epoch"] == 0 for part in body["ranks"] for i in part["indices"]]
    assert sorted(epoch0) == list(range(64))
    state, _ = history.load_checkpoint(history.checkpoint_at(3))
    per_rank = state["callbacks"]["IntegrityCallback"]["rng_per_rank"]
    assert len(per_rank) == 2
    assert all(isinstance(rank["torch"], torch.Tensor) and rank["torch"].dtype == torch.uint8 for rank in per_rank)
    verify_run(ddp_run)


def test_resume_is_bit_exact(ddp_run: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "run"
    shutil.copytree(ddp_run, resumed)
    capture(resumed, resumed / "checkpoints" / "step-000000003.safetensors")  # mid-epoch 0
    original, again = open_run(ddp_run), open_run(resumed)
    for step in (6, 8):
        a, b = original.checkpoint_at(step), again.checkpoint_at(step)
        assert a.model.root == b.model.root and a.optimizer.root == b.optimizer.root


def test_records_written_behind_training_pair_up_across_ranks(ddp_run: Path, tmp_path: Path) -> None:
    """With step records written two steps late (as on CUDA), every rank gathers at the same
    steps: the records and checkpoints are those of the run that wrote them at once."""
    lagged = tmp_path / "run"
    capture(lagged, TI_TEST_RECORD_LAG="2")
    assert [r.body for r in open_run(lagged).iter_steps()] == [r.body for r in open_run(ddp_run).iter_steps()]
    assert [(c.step, c.model.root) for c in open_run(lagged).unique_checkpoints()] == [
        (c.step, c.model.root) for c in open_run(ddp_run).unique_checkpoints()]
    verify_run(lagged)


def test_replay_reproduces_every_segment_bit_for_bit(ddp_run: Path) -> None:
    report = replay(ddp_run, segments=[0, 1])
    assert [s.verdict for s in report.segments] == [Verdict.REPRODUCED, Verdict.REPRODUCED], [s.reason for s in report.segments]


def test_poisoned_sample_seen_by_rank_one_is_named(ddp_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = open_run(ddp_run)
    steps = [r.body for r in history.iter_steps()]
    only_rank1 = next(i for i in steps[3]["ranks"][1]["indices"]
                      if all(i not in body["ranks"][r]["indices"] for body in steps[:3] for r in (0, 1)))
    monkeypatch.setenv("TI_POISON_INDEX", str(only_rank1))
    monkeypatch.syspath_prepend(str(ROOT))
    report = replay(ddp_run, segments=[1], factory="tests.ddp_factories:poisoned")
    result = report.segments[0]
    assert result.verdict is Verdict.DIVERGED
    assert result.divergence is not None
    assert (result.divergence["check"], result.divergence["step"], result.divergence["rank"]) == ("data", 4, 1)
    json.dumps(report.to_json())


def test_data_usage_reads_every_rank(ddp_run: Path) -> None:
    from torch_integrity.lineage import data_usage

    steps = [r.body for r in open_run(ddp_run).iter_steps()]
    index = steps[2]["ranks"][1]["indices"][0]
    expected = [b["step"] for b in steps if any(index in part["indices"] for part in b["ranks"])]
    assert data_usage(ddp_run, index) == expected and 3 in expected
