"""Capture with real Lightning Trainers, each configuration replayed bit for bit.

Every test trains a tiny model on the CPU with ``IntegrityCallback`` and checks what the
ledger recorded; where a replay makes sense, every segment must come back
``Verdict.REPRODUCED``.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.lightning_models import (
    SMALL,
    GanModule,
    IndexRecordingModule,
    SamplerDataModule,
    StreamDataModule,
    assert_all_reproduced,
    capture,
    checkpoint_roots,
    step_bodies,
)
from torch_integrity.demo import DemoDataModule, DemoModule
from torch_integrity.errors import UsageError
from torch_integrity.ledger import LEDGER_FILE
from torch_integrity.replay import Verdict, replay
from torch_integrity.rundir import open_run

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def _replay_all(run_dir: Path) -> None:
    history = open_run(run_dir)
    report = replay(run_dir)
    segments = len(history.unique_checkpoints()) - 1
    assert_all_reproduced(report, segments)
    assert sum(s.steps_checked for s in report.segments) == history.step_count


# ---- automatic optimization, several epochs ----------------------------------------------------


def test_automatic_optimization_records_every_step_and_replays(run_dir: Path) -> None:
    trainer = capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), max_epochs=3)
    assert trainer.global_step == 18
    history = open_run(run_dir)
    assert history.finished
    bodies = step_bodies(run_dir)
    assert [b["step"] for b in bodies] == list(range(1, 19))
    assert [b["epoch"] for b in bodies] == [e for e in range(3) for _ in range(6)]
    assert [b["batch_idx"] for b in bodies] == list(range(6)) * 3
    for body in bodies:
        assert len(body["indices"]) == 8 and "sizes" not in body
        assert isinstance(body["data"], str) and body["loss"].startswith("float32:")
        assert body["lr"] == [[0.01]]
    assert [c.step for c in history.unique_checkpoints()] == [0, 5, 10, 15, 18]
    assert history.start[0]["module"] == "torch_integrity.demo:DemoModule"
    assert history.start[0]["trainer"]["deterministic"] is True
    _replay_all(run_dir)


def test_random_augmentation_changes_data_between_epochs(run_dir: Path) -> None:
    """Same indices in two epochs (no shuffle), different augmentation: different batch digests."""
    capture(run_dir, DemoModule, lambda: DemoDataModule(shuffle=False, **SMALL))
    bodies = step_bodies(run_dir)
    first, second = bodies[:6], bodies[6:]
    assert [b["indices"] for b in first] == [b["indices"] for b in second] == [list(range(i, i + 8)) for i in range(0, 48, 8)]
    assert all(a["data"] != b["data"] for a, b in zip(first, second, strict=True))
    _replay_all(run_dir)


# ---- gradient accumulation -------------------------------------------------------------------------


def test_gradient_accumulation_one_record_per_optimizer_step(run_dir: Path) -> None:
    trainer = capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), accumulate_grad_batches=2, every=2)
    assert trainer.global_step == 6
    bodies = step_bodies(run_dir)
    assert [b["step"] for b in bodies] == list(range(1, 7))
    assert [b["batch_idx"] for b in bodies] == [0, 2, 4] * 2
    for body in bodies:
        assert body["sizes"] == [8, 8]
        assert len(body["indices"]) == 16
        assert isinstance(body["data"], list) and len(body["data"]) == 2
        assert isinstance(body["loss"], list) and len(body["loss"]) == 2
        assert len(body["lr"]) == 1  # one optimizer step
    # a permutation of the dataset per epoch, split over the micro-batches
    assert sorted(i for b in bodies[:3] for i in b["indices"]) == list(range(48))
    _replay_all(run_dir)


# ---- manual optimization with two optimizers ----------------------------------------------------


def test_manual_optimization_two_optimizers(run_dir: Path) -> None:
    trainer = capture(run_dir, GanModule, lambda: DemoDataModule(**SMALL), every=4)
    assert trainer.global_step == 24  # two optimizer steps per batch
    bodies = step_bodies(run_dir)
    assert [b["step"] for b in bodies] == list(range(2, 25, 2))
    for body in bodies:
        assert len(body["lr"]) == 2  # each optimizer's lr, as used
        assert body["loss"] is not None
        assert "skipped_optimizer_steps" not in body
    history = open_run(run_dir)
    assert [c.step for c in history.unique_checkpoints()] == [0, 4, 8, 12, 16, 20, 24]
    _replay_all(run_dir)


# ---- learning-rate schedulers --------------------------------------------------------------------


def test_step_interval_scheduler(run_dir: Path) -> None:
    capture(run_dir, lambda: DemoModule(scheduler="step"), lambda: DemoDataModule(**SMALL))
    lrs = [b["lr"][0][0] for b in step_bodies(run_dir)]
    expected = [0.01 * 0.7 ** ((step - 1) // 3) for step in range(1, 13)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert len(set(lrs)) == 4
    _replay_all(run_dir)


def test_epoch_interval_scheduler(run_dir: Path) -> None:
    capture(run_dir, lambda: DemoModule(scheduler="epoch"), lambda: DemoDataModule(**SMALL), max_epochs=3)
    bodies = step_bodies(run_dir)
    for body in bodies:
        assert body["lr"][0][0] == pytest.approx(0.01 * 0.5 ** body["epoch"], rel=1e-12)
    _replay_all(run_dir)  # segments 5->10 and 10->15 cross epoch ends (scheduler steps)


# ---- clipping, precision ------------------------------------------------------------------------------


def test_gradient_clipping(run_dir: Path, tmp_path: Path) -> None:
    capture(run_dir, lambda: DemoModule(lr=0.1), lambda: DemoDataModule(**SMALL), gradient_clip_val=0.5)
    assert open_run(run_dir).start[0]["trainer"]["gradient_clip_val"] == 0.5
    unclipped = tmp_path / "unclipped"
    capture(unclipped, lambda: DemoModule(lr=0.1), lambda: DemoDataModule(**SMALL))
    # clipping changed the training (same seed, same data), and it is what replay reproduces
    assert [b["data"] for b in step_bodies(run_dir)] == [b["data"] for b in step_bodies(unclipped)]
    assert checkpoint_roots(run_dir)[12] != checkpoint_roots(unclipped)[12]
    _replay_all(run_dir)


def test_bf16_mixed_precision_on_cpu(run_dir: Path) -> None:
    capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), precision="bf16-mixed")
    history = open_run(run_dir)
    assert history.start[0]["trainer"]["precision"] == "bf16-mixed"
    _replay_all(run_dir)


# ---- validation ------------------------------------------------------------------------------------------


def test_mid_epoch_validation_changes_nothing(run_dir: Path, tmp_path: Path) -> None:
    capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), val_check_interval=0.5)
    plain = tmp_path / "no-validation"
    capture(plain, DemoModule, lambda: DemoDataModule(**SMALL), limit_val_batches=0)
    assert open_run(run_dir).start[0]["trainer"]["val_check_interval"] == 0.5
    keys = ("step", "epoch", "batch_idx", "indices", "data", "loss", "lr")
    with_val = [{k: b.get(k) for k in keys} for b in step_bodies(run_dir)]
    without = [{k: b.get(k) for k in keys} for b in step_bodies(plain)]
    assert with_val == without
    assert checkpoint_roots(run_dir) == checkpoint_roots(plain)
    _replay_all(run_dir)


# ---- max_steps mid-epoch -------------------------------------------------------------------------------


def test_max_steps_ending_mid_epoch(run_dir: Path) -> None:
    trainer = capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), max_epochs=5, max_steps=9)
    assert trainer.global_step == 9
    bodies = step_bodies(run_dir)
    assert bodies[-1]["step"] == 9 and bodies[-1]["epoch"] == 1 and bodies[-1]["batch_idx"] == 2
    history = open_run(run_dir)
    assert history.finished
    assert [c.step for c in history.unique_checkpoints()] == [0, 5, 9]  # the last segment is closed
    _replay_all(run_dir)


# ---- shuffling, generators, workers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data_kwargs",
    [
        pytest.param({"shuffle": True}, id="shuffle"),
        pytest.param({"shuffle": True, "generator_seed": 7}, id="shuffle-with-generator"),
        pytest.param({"shuffle": False}, id="no-shuffle"),
    ],
)
def test_shuffling(run_dir: Path, data_kwargs: dict) -> None:
    capture(run_dir, DemoModule, lambda: DemoDataModule(**data_kwargs, **SMALL))
    bodies = step_bodies(run_dir)
    for epoch in range(2):
        order = [i for b in bodies if b["epoch"] == epoch for i in b["indices"]]
        assert sorted(order) == list(range(48))
        if data_kwargs["shuffle"]:
            assert order != list(range(48))
        else:
            assert order == list(range(48))
    epochs = [[i for b in bodies if b["epoch"] == e for i in b["indices"]] for e in range(2)]
    assert (epochs[0] != epochs[1]) == data_kwargs["shuffle"]
    _replay_all(run_dir)


def test_worker_processes_do_not_change_what_is_recorded(tmp_path: Path) -> None:
    """Per-sample randomness travels with the index: 0 workers, 2 workers and persistent
    workers record the same batches, losses and weights."""
    runs = {
        "w0": {"num_workers": 0},
        "w2": {"num_workers": 2},
        "w2-persistent": {"num_workers": 2, "persistent_workers": True},
    }
    for name, data_kwargs in runs.items():
        capture(tmp_path / name, DemoModule, partial(DemoDataModule, **data_kwargs, **SMALL), max_epochs=3)
    keys = ("step", "epoch", "batch_idx", "indices", "data", "loss", "lr")
    reference = [{k: b.get(k) for k in keys} for b in step_bodies(tmp_path / "w0")]
    assert len(reference) == 18
    for name in ("w2", "w2-persistent"):
        assert [{k: b.get(k) for k in keys} for b in step_bodies(tmp_path / name)] == reference, name
        assert checkpoint_roots(tmp_path / name) == checkpoint_roots(tmp_path / "w0"), name
    loaders = open_run(tmp_path / "w2-persistent").start[0]["loaders"]
    assert loaders[0]["num_workers"] == 2 and loaders[0]["persistent_workers"] is True
    _replay_all(tmp_path / "w2-persistent")  # replays with the recorded datamodule: 2 persistent workers


def test_recorded_indices_are_what_the_model_trained_on(run_dir: Path) -> None:
    """With 2 workers prefetching, the ledger's indices are those of the batches training_step got."""
    model = IndexRecordingModule()
    capture(run_dir, model, lambda: DemoDataModule(num_workers=2, **SMALL), max_epochs=2)
    bodies = step_bodies(run_dir)
    assert len(model.seen) == len(bodies) == 12
    assert [b["indices"] for b in bodies] == model.seen


def test_recorded_indices_with_accumulation_and_workers(run_dir: Path) -> None:
    model = IndexRecordingModule()
    capture(run_dir, model, lambda: DemoDataModule(num_workers=2, persistent_workers=True, **SMALL),
            accumulate_grad_batches=3, every=2)
    bodies = step_bodies(run_dir)
    assert len(bodies) == 4 and len(model.seen) == 12
    assert [b["indices"] for b in bodies] == [sum(model.seen[i : i + 3], []) for i in range(0, 12, 3)]
    assert all(b["sizes"] == [8, 8, 8] for b in bodies)


# ---- custom samplers and iterable datasets ---------------------------------------------------------------


def test_custom_sampler(run_dir: Path) -> None:
    capture(run_dir, DemoModule, lambda: SamplerDataModule(kind="sampler"))
    bodies = step_bodies(run_dir)
    assert open_run(run_dir).start[0]["loaders"][0]["sampler"] == "torch.utils.data.sampler:BatchSampler"
    epochs = [[i for b in bodies if b["epoch"] == e for i in b["indices"]] for e in range(2)]
    assert all(sorted(order) == list(range(48)) for order in epochs)
    assert epochs[0] != epochs[1]  # the sampler's global-RNG draws differ per epoch
    _replay_all(run_dir)


def test_custom_batch_sampler(run_dir: Path) -> None:
    capture(run_dir, DemoModule, lambda: SamplerDataModule(kind="batch_sampler"))
    bodies = step_bodies(run_dir)
    assert open_run(run_dir).start[0]["loaders"][0]["sampler"] == "tests.lightning_models:UnevenBatchSampler"
    assert [len(b["indices"]) for b in bodies] == [6, 10, 6, 10, 6, 10] * 2
    epochs = [[i for b in bodies if b["epoch"] == e for i in b["indices"]] for e in range(2)]
    assert all(sorted(order) == list(range(48)) for order in epochs)
    assert epochs[0] != epochs[1]
    _replay_all(run_dir)


def test_iterable_dataset_with_epoch_aligned_checkpoints(run_dir: Path) -> None:
    capture(run_dir, DemoModule, StreamDataModule, every=6)
    bodies = step_bodies(run_dir)
    assert len(bodies) == 12
    assert all(b["indices"] is None and isinstance(b["data"], str) for b in bodies)
    assert len({b["data"] for b in bodies}) == 12  # random augmentation: every batch differs
    assert open_run(run_dir).start[0]["loaders"][0]["indices_recorded"] is False
    _replay_all(run_dir)


def test_iterable_dataset_mid_epoch_segments_diverge_honestly(run_dir: Path) -> None:
    """Lightning restarts an IterableDataset from its beginning when a run resumes mid-epoch,
    so a segment that starts mid-epoch cannot be fed its recorded batches: replay must say
    so (a data divergence at the segment's first step), never claim a reproduction."""
    capture(run_dir, DemoModule, StreamDataModule, every=5)
    report = replay(run_dir)
    assert [(s.start_step, s.end_step) for s in report.segments] == [(0, 5), (5, 10), (10, 12)]
    first, *later = report.segments
    assert first.verdict is Verdict.REPRODUCED, first.reason
    for segment in later:
        assert segment.verdict is Verdict.DIVERGED, segment.reason
        assert segment.divergence is not None
        assert segment.divergence["check"] == "data"
        assert segment.divergence["step"] == segment.start_step + 1


# ---- bad configuration: refused at setup, before any training -------------------------------------------


class _CountingModule(DemoModule):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.batches += 1
        return super().training_step(batch, batch_idx)


def test_unwritable_run_directory_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    model = _CountingModule()
    with pytest.raises(UsageError, match="cannot write to the run directory"):
        capture(blocker / "run", model, lambda: DemoDataModule(**SMALL))
    assert model.batches == 0
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_run_directory_is_refused_before_training(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        model = _CountingModule()
        with pytest.raises(UsageError, match="cannot write to the run directory"):
            capture(locked / "run", model, lambda: DemoDataModule(**SMALL))
        assert model.batches == 0
    finally:
        locked.chmod(0o700)


def test_directory_holding_another_run_is_refused(run_dir: Path) -> None:
    capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), max_epochs=1)
    ledger = (run_dir / LEDGER_FILE).read_bytes()
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    model = _CountingModule()
    with pytest.raises(UsageError, match="already holds a run"):
        capture(run_dir, model, lambda: DemoDataModule(**SMALL), max_epochs=1)
    assert model.batches == 0
    assert (run_dir / LEDGER_FILE).read_bytes() == ledger  # nothing recorded was touched
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == files


def test_directory_with_other_files_is_refused(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    model = _CountingModule()
    with pytest.raises(UsageError, match="already holds a run"):
        capture(run_dir, model, lambda: DemoDataModule(**SMALL), max_epochs=1)
    assert model.batches == 0
    assert not (run_dir / LEDGER_FILE).exists()


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_missing_deterministic_flag_warns_and_is_recorded(run_dir: Path, restore_determinism: None) -> None:
    with pytest.warns(UserWarning, match="bit-exact"):
        capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), max_epochs=1, deterministic=False)
    start = open_run(run_dir).start[0]
    assert start["trainer"]["deterministic"] is False
    assert start["environment"]["deterministic_algorithms"] is False


def test_deterministic_flag_does_not_warn(run_dir: Path) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture(run_dir, DemoModule, lambda: DemoDataModule(**SMALL), max_epochs=1)
    assert not [w for w in caught if "bit-exact" in str(w.message)]
    assert open_run(run_dir).start[0]["trainer"]["deterministic"] is True


def test_fetches_outside_training_leave_the_global_rng_alone(run_dir: Path) -> None:
    """During training the callback restores the training RNG before every batch, so fetches
    skip saving and restoring the global RNGs; outside training they must restore them."""
    import random

    import numpy as np

    trainer = capture(run_dir, DemoModule, partial(DemoDataModule, **SMALL), max_epochs=1)
    loader = trainer.train_dataloader
    assert type(loader.dataset).__name__ == "SeededDataset"  # still instrumented after fit
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    batches = list(loader)
    assert len(batches) == 6
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
