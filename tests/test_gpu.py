"""GPU capture and bit-exact replay, and the asynchronous device reads behind them.

Tests marked ``gpu`` need a CUDA device and are skipped without one (``conftest.py``).
The capture-and-replay tests are parametrised over devices: their CPU cases run
everywhere (so the test code itself is exercised in CI), their CUDA cases only on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.lightning_models import (
    TRAINER_DEFAULTS,
    DemoTransformerModule,
    ImageDataModule,
    SmallConvNet,
    TokenDataModule,
    assert_all_reproduced,
    capture,
    quiet,
    step_bodies,
)
from torch_integrity import IntegrityCallback
from torch_integrity.batch import digest_batch, digest_batch_later
from torch_integrity.deferred import resolve
from torch_integrity.errors import MalformedFileError
from torch_integrity.fingerprint import fingerprint_later, fingerprint_tensors
from torch_integrity.lightning_glue import loss_bits, loss_bits_later, optimizer_lrs
from torch_integrity.replay import replay
from torch_integrity.rng import capture_global_rng, restore_global_rng
from torch_integrity.rundir import open_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning.*")]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MODELS = [
    pytest.param(DemoTransformerModule, TokenDataModule, id="demo-transformer"),
    pytest.param(SmallConvNet, ImageDataModule, id="conv-net"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("model", "data"), MODELS)
def test_capture_and_bit_exact_replay(tmp_path: Path, device: str, model: Any, data: Any) -> None:
    run_dir = tmp_path / "run"
    capture(run_dir, model, data, every=6, accelerator="gpu" if device == "cuda" else "cpu",
            callback_kwargs={"fingerprint_every_n_steps": 1})
    bodies = step_bodies(run_dir)
    assert [b["step"] for b in bodies] == list(range(1, 17))  # 2 epochs x 8 batches
    start = open_run(run_dir).start[0]
    assert start["trainer"]["accelerator"] == ("CUDAAccelerator" if device == "cuda" else "CPUAccelerator")
    assert start["trainer"]["deterministic"] is True
    if device == "cuda":
        environment = start["environment"]
        assert environment["gpus"] and environment["gpus"][0]["sm_count"] > 0
        assert environment["cuda"] and environment["cudnn"]
    history = open_run(run_dir)
    state, _ = history.load_checkpoint(history.checkpoint_at(6))
    # the RNG of the one CUDA generator the run trained on, none on CPU
    assert len(state["callbacks"]["IntegrityCallback"]["rng"]["cuda"]) == (1 if device == "cuda" else 0)
    report = replay(run_dir)
    assert_all_reproduced(report, segments=3)
    assert all(s.environment_differences == [] for s in report.segments), [s.environment_differences for s in report.segments]
    assert sum(s.steps_checked for s in report.segments) == 16


@pytest.mark.gpu
def test_device_values_are_snapshots_read_later() -> None:
    small = torch.arange(100, device="cuda")  # copied on the current stream
    large = torch.randn(512, 512, device="cuda")  # cloned there, copied on a side stream
    batch = {"tokens": small, "image": large, "view": large.t()[:3], "name": "b", "n": 2}
    on_host = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss = torch.tensor(1.5, device="cuda", dtype=torch.float32)
    weights = [("w", torch.randn(300, 301, device="cuda")), ("b", torch.randn(5, device="cuda"))]
    weights_on_host = [(name, t.cpu()) for name, t in weights]

    lr = torch.tensor(0.0125, device="cuda")  # a capturable optimizer's tensor learning rate
    optimizer = torch.optim.Adam([torch.zeros(2, device="cuda", requires_grad=True)], lr=lr, capturable=True)

    torch.cuda.set_sync_debug_mode("error")  # starting the reads must not wait for the GPU
    try:
        digest = digest_batch_later(batch)
        bits = loss_bits_later({"loss": loss})
        fingerprint = fingerprint_later(weights, key=9)
        rates = optimizer_lrs(optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    small.add_(1)  # in-place changes queued after the reads started do not reach them
    large.mul_(2)
    loss.add_(1)
    weights[0][1].add_(1)
    assert digest.result() == digest_batch(on_host).hex
    assert bits.result() == loss_bits(torch.tensor(1.5))
    assert fingerprint.result() == fingerprint_tensors(weights_on_host, key=9)
    assert resolve(rates) == [lr.item()]


class _NoWaitCallback(IntegrityCallback):
    """Fails if starting a batch's record (indices, batch digest) synchronises the device."""

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            super().on_train_batch_start(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_batch_digests_do_not_stall_the_training_stream(tmp_path: Path) -> None:
    quiet()
    pl.seed_everything(0, verbose=False)
    callback = _NoWaitCallback(tmp_path / "run", checkpoint_every_n_steps=100)
    trainer = pl.Trainer(callbacks=[callback], **{**TRAINER_DEFAULTS, "accelerator": "gpu", "max_steps": 6})
    trainer.fit(SmallConvNet(), datamodule=ImageDataModule())
    assert [b["step"] for b in step_bodies(tmp_path / "run")] == list(range(1, 7))
    assert_all_reproduced(replay(tmp_path / "run"), segments=1)


def test_a_gpu_runs_rng_state_restores_on_cpu() -> None:
    """Replaying a GPU run on CPU (with --tolerance) restores the CPU RNGs and leaves the
    recorded CUDA state unused, instead of demanding a GPU."""
    state = capture_global_rng()
    expected = torch.rand(3)
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as recorded on a GPU
    torch.rand(5)
    restore_global_rng(state)
    assert torch.equal(torch.rand(3), expected)
    state["cuda"] = ["not a tensor"]
    with pytest.raises(MalformedFileError, match="RNG state"):
        restore_global_rng(state)


@pytest.mark.gpu
def test_recorded_cuda_rng_goes_to_the_device_in_use() -> None:
    torch.cuda.manual_seed(11)
    state = capture_global_rng(cuda_device=0)
    assert len(state["cuda"]) == 1
    expected = torch.rand(4, device="cuda")
    restore_global_rng(state, cuda_device=0)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
