"""Resume an interrupted run mid-epoch and continue bit for bit.

A run that crashes after step 12 is resumed from its step-10 checkpoint (mid-epoch:
6 batches per epoch) with the callback on the same run directory. Every tensor of the
later checkpoints must equal, bit for bit, those of the same run trained without
interruption; the resumed ledger verifies and records the resume.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.lightning_models import (
    SMALL,
    StreamDataModule,
    assert_all_reproduced,
    capture,
    flatten_tensors,
    step_bodies,
)
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.errors import UsageError
from torch_integrity.ledger import LEDGER_FILE, verify_ledger
from torch_integrity.replay import replay
from torch_integrity.rundir import open_run

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


class Crash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Simulates a crash right after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash after step {self.step}")


def _checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    history = open_run(run_dir)
    state, _ = history.load_checkpoint(history.checkpoint_at(step))
    tensors = {f"state_dict{k}": v for k, v in flatten_tensors(state["state_dict"]).items()}
    tensors.update({f"optimizer_states{k}": v for k, v in flatten_tensors(state["optimizer_states"]).items()})
    rng = state["callbacks"]["IntegrityCallback"]["rng"]
    tensors.update({f"rng{k}": v for k, v in flatten_tensors(rng).items()})
    return tensors


@pytest.mark.parametrize(
    "data_kwargs",
    [
        pytest.param({"num_workers": 0}, id="workers-0"),
        pytest.param({"num_workers": 2, "persistent_workers": True}, id="workers-2-persistent"),
    ],
)
def test_mid_epoch_resume_is_bit_exact(tmp_path: Path, data_kwargs: dict[str, Any]) -> None:
    make_data = partial(DemoDataModule, **data_kwargs, **SMALL)
    reference = tmp_path / "uninterrupted"
    capture(reference, DemoModule, make_data, max_epochs=3)

    run_dir = tmp_path / "resumed"
    with pytest.raises(Crash):
        capture(run_dir, DemoModule, make_data, max_epochs=3, extra_callbacks=[CrashAt(12)])
    interrupted = open_run(run_dir)
    assert not interrupted.finished
    assert [c.step for c in interrupted.unique_checkpoints()] == [0, 5, 10]
    assert interrupted.step_count == 12  # steps 11 and 12 are recorded but not closed by a checkpoint

    # resume in a fresh "process": new model (other initial weights), other global seed
    checkpoint = run_dir / "checkpoints" / "step-000000010.safetensors"
    trainer = capture(run_dir, DemoModule, make_data, seed=999, max_epochs=3, ckpt_path=checkpoint)
    assert trainer.global_step == 18

    verify_ledger(run_dir / LEDGER_FILE)
    history = open_run(run_dir)
    assert history.finished
    assert len(history.start) == 2
    assert history.start[0]["resume"] is None
    resume = history.start[1]["resume"]
    assert resume["step"] == 10
    assert resume["file"] == "checkpoints/step-000000010.safetensors"
    assert resume["checkpoint_seq"] == interrupted.checkpoint_at(10).seq
    assert history.start[1]["run_id"] == history.start[0]["run_id"]
    assert [c.step for c in history.unique_checkpoints()] == [0, 5, 10, 15, 18]

    # every tensor of the later checkpoints equals the uninterrupted run's, bit for bit
    for step in (15, 18):
        expected = _checkpoint_tensors(reference, step)
        got = _checkpoint_tensors(run_dir, step)
        assert set(got) == set(expected)
        assert any(name.startswith("optimizer_states") for name in got)
        different = [n for n in expected if not (got[n].dtype == expected[n].dtype and torch.equal(got[n], expected[n]))]
        assert different == [], f"step {step}: {different}"
        assert history.checkpoint_at(step).model.root == open_run(reference).checkpoint_at(step).model.root

    # the step records after the resume are the uninterrupted run's (abandoned 11, 12 stay in the ledger)
    keys = ("step", "epoch", "batch_idx", "indices", "data", "loss", "lr")
    resumed_steps = [{k: b.get(k) for k in keys} for b in step_bodies(run_dir)]
    reference_steps = [{k: b.get(k) for k in keys} for b in step_bodies(reference)]
    assert resumed_steps[:12] == reference_steps[:12]
    assert resumed_steps[12:] == reference_steps[10:]

    # and the resumed history replays: the abandoned tail is reported, not replayed
    report = replay(run_dir, from_step=10)
    assert_all_reproduced(report)
    assert [(s.start_step, s.end_step) for s in report.segments] == [(10, 15), (15, 18)]
    assert any("abandoned" in note for note in report.notes)


def test_resume_at_an_epoch_boundary(tmp_path: Path) -> None:
    make_data = partial(DemoDataModule, **SMALL)
    reference = tmp_path / "uninterrupted"
    capture(reference, DemoModule, make_data, max_epochs=2, every=6)
    run_dir = tmp_path / "resumed"
    with pytest.raises(Crash):
        capture(run_dir, DemoModule, make_data, max_epochs=2, every=6, extra_callbacks=[CrashAt(8)])
    capture(run_dir, DemoModule, make_data, seed=5, max_epochs=2, every=6,
            ckpt_path=run_dir / "checkpoints" / "step-000000006.safetensors")
    assert open_run(run_dir).checkpoint_at(12).model.root == open_run(reference).checkpoint_at(12).model.root
    expected, got = _checkpoint_tensors(reference, 12), _checkpoint_tensors(run_dir, 12)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_iterable_dataset_resume_at_an_epoch_boundary(tmp_path: Path) -> None:
    """An IterableDataset draws its augmentation from the global RNG while Lightning prefetches:
    the resumed run must hand the prefetch the checkpointed RNG stream, as the run did."""
    reference = tmp_path / "uninterrupted"
    capture(reference, DemoModule, StreamDataModule, max_epochs=2, every=6)
    run_dir = tmp_path / "resumed"
    with pytest.raises(Crash):
        capture(run_dir, DemoModule, StreamDataModule, max_epochs=2, every=6, extra_callbacks=[CrashAt(8)])
    capture(run_dir, DemoModule, StreamDataModule, seed=5, max_epochs=2, every=6,
            ckpt_path=run_dir / "checkpoints" / "step-000000006.safetensors")
    keys = ("step", "data", "loss")
    assert [{k: b[k] for k in keys} for b in step_bodies(run_dir)][8:] == [
        {k: b[k] for k in keys} for b in step_bodies(reference)][6:]
    expected, got = _checkpoint_tensors(reference, 12), _checkpoint_tensors(run_dir, 12)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_resume_from_a_checkpoint_the_ledger_does_not_record_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), max_epochs=1)
    ledger = (run_dir / LEDGER_FILE).read_bytes()
    stray = run_dir / "checkpoints" / "step-000000003.safetensors"
    stray.write_bytes((run_dir / "checkpoints" / "step-000000005.safetensors").read_bytes())
    with pytest.raises(UsageError, match="not recorded in the ledger"):
        capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), max_epochs=2, ckpt_path=stray)
    assert (run_dir / LEDGER_FILE).read_bytes() == ledger
