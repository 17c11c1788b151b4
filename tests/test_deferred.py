"""Records written behind training: step records (the CUDA path) and background checkpoints, on CPU.

On CUDA the callback queues each step record and writes it ``CUDA_RECORD_LAG`` steps
later, so that reading device values never waits for the GPU; replay runs its
comparisons equally late. Here the lag is forced on CPU (``capture.record_lag`` is
replaced), so the queueing, ordering, draining and first-divergence logic run for real
without a GPU. What only a GPU can show (the asynchronous copies themselves) is in
``test_gpu.py``.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.lightning_models import (
    SMALL,
    LossWeightModule,
    assert_all_reproduced,
    capture,
    checkpoint_roots,
    step_bodies,
)
from tests.test_resume import Crash, CrashAt
from torch_integrity import capture as capture_module
from torch_integrity.audit import verify_run
from torch_integrity.batch import digest_batch, digest_batch_later
from torch_integrity.deferred import Later, resolve
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.errors import UsageError
from torch_integrity.fingerprint import fingerprint_later, fingerprint_tensors
from torch_integrity.lightning_glue import loss_bits, loss_bits_later, optimizer_lrs
from torch_integrity.replay import Verdict, replay
from torch_integrity.rundir import open_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"), pytest.mark.filterwarnings("ignore:.*LeafSpec.*")]
MODELS = "tests.lightning_models"


@pytest.fixture
def lag(monkeypatch: pytest.MonkeyPatch) -> int:
    """Records (and replay checks) run 3 steps behind training, as on CUDA with a longer lag."""
    monkeypatch.setattr(capture_module, "record_lag", lambda device: 3)
    return 3


def test_later_computes_once_and_resolve_reaches_nested_values() -> None:
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return "x"

    value = Later(compute)
    assert calls == []
    nested = {"a": [value, Later.ready(2)], "b": {"c": value}, "d": 3}
    assert resolve(nested) == {"a": ["x", 2], "b": {"c": "x"}, "d": 3}
    assert calls == [1]


def test_deferred_cpu_values_equal_the_immediate_ones() -> None:
    batch = {"x": torch.randn(4, 3), "y": [torch.arange(4), "tag", 7]}
    later = digest_batch_later(batch)
    expected = digest_batch(batch).hex
    batch["x"].add_(1)  # a CPU batch is hashed at once: later in-place changes do not count
    assert later.result() == expected
    loss = torch.tensor(0.25, dtype=torch.bfloat16)
    assert loss_bits_later({"loss": loss}).result() == loss_bits(loss) == "bfloat16:3e80"
    weights = [("w", torch.randn(50, 30)), ("b", torch.randn(7))]
    assert fingerprint_later(weights, key=5).result() == fingerprint_tensors(weights, key=5)
    tensor_lr = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=torch.tensor(0.0125))
    assert optimizer_lrs(tensor_lr) == [float(torch.tensor(0.0125))]  # a CPU tensor lr is read at once


def _ledger_order(run_dir: Path) -> list[tuple[str, int | None]]:
    return [(r.kind, r.body.get("step")) for r in open_run(run_dir).iter_records()]


def _without_fingerprints(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in body.items() if k != "fp"} for body in bodies]


def test_lagged_records_equal_immediate_records_and_keep_ledger_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings: dict[str, Any] = {"accumulate_grad_batches": 2, "max_epochs": 3,
                                "callback_kwargs": {"fingerprint_every_n_steps": 1}}
    immediate = tmp_path / "immediate"
    capture(immediate, DemoModule, partial(DemoDataModule, **SMALL), every=4, **settings)
    monkeypatch.setattr(capture_module, "record_lag", lambda device: 3)
    lagged = tmp_path / "lagged"
    capture(lagged, DemoModule, partial(DemoDataModule, **SMALL), every=4, **settings)

    expected_bodies = step_bodies(immediate)
    assert len(expected_bodies) == 9  # 3 epochs x 6 batches / 2 micro-batches per step
    assert _without_fingerprints(step_bodies(lagged)) == _without_fingerprints(expected_bodies)
    assert all(isinstance(body["fp"], str) and len(body["fp"]) == 16 for body in step_bodies(lagged))
    # every step record still precedes the checkpoint that closes its segment, and run_end comes last
    assert _ledger_order(lagged) == _ledger_order(immediate)
    order = _ledger_order(lagged)
    assert order[-1][0] == "run_end"
    for position, (kind, step) in enumerate(order):
        if kind == "checkpoint":
            assert [s for k, s in order[:position] if k == "step"] == list(range(1, step + 1))
    verified = verify_run(lagged)  # raises on any integrity failure
    assert verified.finished and verified.steps == 9
    report = replay(lagged)  # replay checks lagged too (the patch is still in place)
    assert_all_reproduced(report, segments=3)
    assert sum(s.steps_checked for s in report.segments) == 9


def test_lagged_replay_names_the_same_first_divergence(tmp_path: Path, lag: int) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, LossWeightModule, partial(DemoDataModule, **SMALL), every=5)
    report = replay(run_dir, factory=f"{MODELS}:changed_loss_weight_factory")
    found = [(s.start_step, s.end_step, s.verdict, s.divergence["step"], s.divergence["check"])
             for s in report.segments if s.divergence is not None]
    assert found == [(a, b, Verdict.DIVERGED, a + 1, "loss") for a, b in [(0, 5), (5, 10), (10, 12)]]


def test_records_queued_at_a_crash_are_written(tmp_path: Path, lag: int) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), every=5, extra_callbacks=[CrashAt(8)])
    assert [body["step"] for body in step_bodies(run_dir)] == list(range(1, 9))
    assert verify_run(run_dir).steps == 8  # raises on any integrity failure


# ---- checkpoints written in the background ------------------------------------------------------------


class _StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append(time.perf_counter())


def test_checkpoints_are_written_while_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[str, float, float]] = []
    real_save = capture_module.save_checkpoint

    def slow_save(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        time.sleep(0.3)  # a slow disk: training must not wait for it
        saved = real_save(*args, **kwargs)
        writes.append((threading.current_thread().name, began, time.perf_counter()))
        return saved

    monkeypatch.setattr(capture_module, "save_checkpoint", slow_save)
    clock = _StepTimes()
    run_dir = tmp_path / "run"
    capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), every=5, extra_callbacks=[clock])
    assert len(writes) == 4  # steps 0, 5, 10, 12
    assert all(name.startswith("torch-integrity-checkpoint") for name, _, _ in writes)
    overlapped = [sum(began < end < done for end in clock.ends) for _, began, done in writes]
    assert max(overlapped) >= 3, overlapped  # steps ran while a checkpoint was being written
    order = _ledger_order(run_dir)
    for position, (kind, step) in enumerate(order):
        if kind == "checkpoint":
            assert [s for k, s in order[:position] if k == "step"] == list(range(1, step + 1)), order
    assert order[-1][0] == "run_end"
    # each file holds the state of its own step, not of a later one (the snapshot is private)
    verify_run(run_dir)
    assert_all_reproduced(replay(run_dir), segments=3)


def test_background_and_inline_checkpoints_hold_the_same_state(tmp_path: Path) -> None:
    capture(tmp_path / "background", DemoModule, partial(DemoDataModule, **SMALL), every=5)
    capture(tmp_path / "inline", DemoModule, partial(DemoDataModule, **SMALL), every=5,
            callback_kwargs={"background_checkpoints": False})
    assert checkpoint_roots(tmp_path / "background") == checkpoint_roots(tmp_path / "inline")
    assert len(checkpoint_roots(tmp_path / "inline")) == 4


def test_a_failed_background_write_stops_training_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = capture_module.save_checkpoint

    def failing_save(path: Path, *args: Any, **kwargs: Any) -> Any:
        if "step-000000005" in path.name:
            raise UsageError(f"cannot write checkpoint {path}: No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(capture_module, "save_checkpoint", failing_save)
    run_dir = tmp_path / "run"
    with pytest.raises(UsageError, match="No space left"):
        capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), every=5)
    history = open_run(run_dir)
    assert [c.step for c in history.unique_checkpoints()] == [0]
    assert not history.finished
    verify_run(run_dir)  # what was recorded still verifies
