"""Replay: parallel workers, segment selection, sampling and the report."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest

from tests.lightning_models import SMALL, assert_all_reproduced, capture
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.errors import UsageError
from torch_integrity.replay import SegmentResult, Verdict, replay, replay_segment

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

SEGMENTS = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 18)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 steps (3 epochs of 6 batches), a checkpoint every 4 steps: 5 segments."""
    run_dir = tmp_path_factory.mktemp("replay") / "run"
    capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), max_epochs=3, every=4)
    return run_dir


def _summary(results: list[SegmentResult]) -> list[tuple]:
    return [
        (s.index, s.start_step, s.end_step, s.verdict, s.steps_checked,
         None if s.divergence is None else (s.divergence["step"], s.divergence["check"]))
        for s in results
    ]


def test_all_segments_reproduce_and_report_is_json(run: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = replay(run, progress=lambda result, done, total: seen.append((done, total)))
    assert_all_reproduced(report, len(SEGMENTS))
    assert [(s.start_step, s.end_step) for s in report.segments] == SEGMENTS
    assert [s.steps_checked for s in report.segments] == [4, 4, 4, 4, 2]
    assert seen == [(i, 5) for i in range(1, 6)]
    assert report.detection_probability is None
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is True and data["replayed"] == 5
    assert {s["verdict"] for s in data["segments"]} == {"reproduced"}


def test_parallel_replay_gives_the_same_verdicts(mixed_run: Path) -> None:
    serial = replay(mixed_run, workers=1)
    parallel = replay(mixed_run, workers=2)
    assert _summary(parallel.segments) == _summary(serial.segments)
    assert parallel.ok is serial.ok is False
    # the run really has both verdicts, so the comparison above means something
    assert [s.verdict for s in serial.segments] == [Verdict.REPRODUCED, Verdict.DIVERGED, Verdict.DIVERGED]


def test_select_segments_by_index(run: Path) -> None:
    report = replay(run, segments=[1])
    assert [(s.index, s.start_step, s.end_step) for s in report.segments] == [(1, 4, 8)]
    assert report.total_segments == 5
    assert report.segments[0].verdict is Verdict.REPRODUCED
    report = replay(run, segments=[3, 0, 3])
    assert [s.index for s in report.segments] == [0, 3]
    assert all(s.verdict is Verdict.REPRODUCED for s in report.segments)


def test_select_segments_by_step_range(run: Path) -> None:
    report = replay(run, from_step=5, to_step=12)
    assert [(s.start_step, s.end_step) for s in report.segments] == [(4, 8), (8, 12)]
    assert all(s.verdict is Verdict.REPRODUCED for s in report.segments)
    report = replay(run, from_step=16)
    assert [(s.start_step, s.end_step) for s in report.segments] == [(16, 18)]
    with pytest.raises(UsageError):
        replay(run, from_step=12, to_step=4)


def test_sampled_segments_state_the_detection_probability(run: Path) -> None:
    first = replay(run, sample=2, seed=7)
    again = replay(run, sample=2, seed=7)
    assert len(first.segments) == 2
    assert [s.index for s in first.segments] == [s.index for s in again.segments]  # repeatable choice
    assert first.detection_probability == pytest.approx(2 / 5)
    assert any("2 of 5" in note for note in first.notes)
    assert all(s.verdict is Verdict.REPRODUCED for s in first.segments)
    whole = replay(run, segments=[0], sample=3, seed=1)  # sampling within a selection of 1
    assert len(whole.segments) == 1 and whole.detection_probability == pytest.approx(1 / 5)


def test_bad_selections_are_usage_errors(run: Path) -> None:
    with pytest.raises(UsageError):
        replay(run, segments=[5])
    with pytest.raises(UsageError):
        replay(run, sample=2)  # a sample needs the verifier's seed
    with pytest.raises(UsageError):
        replay(run, sample=0, seed=1)
    with pytest.raises(UsageError):
        replay(run, workers=0)
    with pytest.raises(UsageError):
        replay_segment(run, 5)


def test_replay_of_one_segment_in_process(run: Path) -> None:
    result = replay_segment(run, 2)
    assert (result.index, result.start_step, result.end_step) == (2, 8, 12)
    assert result.verdict is Verdict.REPRODUCED, result.reason
    assert result.steps_checked == 4
    assert result.environment_differences == []
    assert result.code_changed == []


class _StopAt2(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 2:
            raise KeyError("crash")


def test_replay_needs_a_complete_segment(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(KeyError):
        capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), extra_callbacks=[_StopAt2()])
    with pytest.raises(UsageError, match="no complete segment"):
        replay(run_dir)


def test_a_job_refuses_a_ledger_copy_that_does_not_extend_the_verified_head(tmp_path: Path) -> None:
    """Replay jobs on other nodes read their own copy of the run; it must extend the head
    the driver verified, so a shortened or rewritten copy is refused, not trusted."""
    import shutil

    from torch_integrity.errors import TruncatedError
    from torch_integrity.replay import _replay_one
    from torch_integrity.rundir import open_run

    original = tmp_path / "run"
    capture(original, DemoModule, partial(DemoDataModule, **SMALL), every=4, max_epochs=1)
    head = open_run(original).head.to_json()
    copy = tmp_path / "node-copy"
    shutil.copytree(original, copy)
    ledger = copy / "ledger.jsonl"
    ledger.write_bytes(b"".join(ledger.read_bytes().splitlines(keepends=True)[:-1]))  # drop run_end: still a valid chain
    with pytest.raises(TruncatedError):
        _replay_one((str(copy), 0, None, None, False, head))
    assert _replay_one((str(original), 0, None, None, False, head)).verdict is Verdict.REPRODUCED
