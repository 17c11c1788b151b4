"""A small, complete training setup used by the README's main command, the examples
and the tests: a classifier with dropout on a synthetic dataset whose ``__getitem__``
draws augmentation noise from torch, NumPy and Python's ``random``.

Run the whole story (train with the callback, verify, replay, roll back, check)::

    python -m torch_integrity.demo --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class NoisyDataset(Dataset):
    """``size`` fixed samples (seeded), each returned with random augmentation noise.

    Each item is ``(features, label, index)``; the index lets tests check which samples
    the model really saw.
    """

    def __init__(self, size: int = 96, features: int = 16, classes: int = 4, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(size, features, generator=generator)
        self.labels = torch.randint(0, classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        noise = torch.randn_like(self.inputs[index]) * 0.05
        noise += float(np.random.uniform(-0.01, 0.01))
        scale = 1.0 + random.uniform(-0.05, 0.05)
        return (self.inputs[index] + noise) * scale, self.labels[index], index


class DemoDataModule(pl.LightningDataModule):
    """Synthetic classification data with configurable loading."""

    def __init__(
        self,
        size: int = 96,
        batch_size: int = 8,
        num_workers: int = 0,
        persistent_workers: bool = False,
        shuffle: bool = True,
        generator_seed: int | None = None,
        features: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        h: Any = self.hparams
        generator = torch.Generator().manual_seed(h.generator_seed) if h.generator_seed is not None else None
        return DataLoader(
            NoisyDataset(h.size, h.features),
            batch_size=h.batch_size,
            shuffle=h.shuffle,
            num_workers=h.num_workers,
            persistent_workers=h.persistent_workers and h.num_workers > 0,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(NoisyDataset(32, int(self.hparams["features"]), seed=1), batch_size=16)


class DemoModule(pl.LightningModule):
    """A two-layer classifier with dropout, Adam and an optional step LR schedule."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4, lr: float = 0.01, scheduler: str = "none") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=float(self.hparams["lr"]))
        if self.hparams["scheduler"] == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.hparams["scheduler"] == "epoch":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        return optimizer


def main(argv: list[str] | None = None) -> int:
    """Train with the callback, then verify, replay, roll back and check the weights."""
    from pathlib import Path

    from torch_integrity.cli import main as cli

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--run-dir", default="runs/demo", help="run directory to create (must not exist yet)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    args = parser.parse_args(argv)

    from torch_integrity import IntegrityCallback
    from torch_integrity.demo import DemoDataModule, DemoModule  # importable path, also under python -m

    run_dir = Path(args.run_dir)
    pl.seed_everything(1234, workers=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        deterministic=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[IntegrityCallback(run_dir, checkpoint_every_n_steps=args.checkpoint_every)],
    )
    trainer.fit(DemoModule(), DemoDataModule(num_workers=args.workers))
    print(f"\n== trained {trainer.global_step} steps into {run_dir}")
    exported = run_dir.parent / f"{run_dir.name}-final.safetensors"
    steps = [
        ["verify", str(run_dir)],
        ["log", str(run_dir)],
        ["replay", str(run_dir)],
        ["rollback", str(run_dir), "--step", str(trainer.global_step), "--out", str(exported)],
        ["check-weights", str(exported), str(run_dir)],
    ]
    for command in steps:
        print(f"\n== torch-integrity {' '.join(command)}")
        code = cli(command)
        if code != 0:
            print(f"command failed with exit code {code}")
            return code
    print("\nAll checks passed.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
