"""Replay factories for the DDP tests (imported by replay processes by name)."""

from __future__ import annotations

import os
from typing import Any

import torch

from torch_integrity.demo import DemoDataModule, DemoModule, NoisyDataset


class PoisonedDataset(NoisyDataset):
    """The demo data with one sample's features changed after the run."""

    def __init__(self, *args: Any, poison: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inputs[poison] += torch.ones_like(self.inputs[poison])


class PoisonedDataModule(DemoDataModule):
    def train_dataloader(self) -> Any:
        h: Any = self.hparams
        poisoned = PoisonedDataset(h.size, h.features, poison=int(os.environ["TI_POISON_INDEX"]))
        return torch.utils.data.DataLoader(poisoned, batch_size=h.batch_size, shuffle=h.shuffle, num_workers=h.num_workers,
                                           persistent_workers=h.persistent_workers and h.num_workers > 0)


def poisoned() -> tuple[Any, Any]:
    """The run's model with data whose sample TI_POISON_INDEX was altered."""
    return DemoModule(), PoisonedDataModule(size=64, num_workers=1, persistent_workers=True)


def poisoned_single_process() -> tuple[Any, Any]:
    """As :func:`poisoned`, for the single-process runs of the manifest tests."""
    return DemoModule(), PoisonedDataModule(size=48)
