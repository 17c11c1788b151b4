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
from torch_integrity.fingerprint import fingerprint_later, fingerprint_tensors
from torch_integrity.lightning_glue import loss_bits, loss_bits_later
from torch_integrity.replay import replay
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

    torch.cuda.set_sync_debug_mode("error")  # starting the reads must not wait for the GPU
    try:
        digest = digest_batch_later(batch)
        bits = loss_bits_later({"loss": loss})
        fingerprint = fingerprint_later(weights, key=9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    small.add_(1)  # in-place changes queued after the reads started do not reach them
    large.mul_(2)
    loss.add_(1)
    weights[0][1].add_(1)
    assert digest.result() == digest_batch(on_host).hex
    assert bits.result() == loss_bits(torch.tensor(1.5))
    assert fingerprint.result() == fingerprint_tensors(weights_on_host, key=9)


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
