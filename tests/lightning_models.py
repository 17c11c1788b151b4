"""Small Lightning models, data and helpers for the capture / replay / resume / detection tests.

Replay rebuilds models from the import paths recorded in ``run_start``, so everything a
replayed run uses lives here, importable as ``tests.lightning_models`` (the repository
root is on ``sys.path``: ``tests/conftest.py`` puts it there, and replay's worker
processes inherit the parent's ``sys.path``).

Factories (``factory="tests.lightning_models:NAME"``) take no arguments; the ones that
perturb something read what to perturb from environment variables so that they behave
the same in replay worker processes.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from torch_integrity.capture import IntegrityCallback
from torch_integrity.demo import DemoDataModule, DemoModule, NoisyDataset
from torch_integrity.replay import ReplayReport, Verdict
from torch_integrity.rundir import open_run

#: Trainer settings every test run uses unless it overrides them.
TRAINER_DEFAULTS: dict[str, Any] = {
    "deterministic": True,
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}

#: Tiny dataset: 48 samples, batches of 8 -> 6 batches per epoch.
SMALL = {"size": 48, "batch_size": 8}

NOISY_WARNINGS = (
    ".*does not have many workers.*",
    ".*GPU available but not used.*",
    ".*is a very small value.*",
    ".*LightningDataModule.*hparams.*",
    ".*The number of training batches.*",
    ".*`training_step` returned `None`.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
    ".*Total length of.*across ranks is zero.*",
    ".*checkpoint.*was.*saved.*",
    ".*unsupported.*sm_.*",
    ".*torch.cuda.amp.*",
    ".*TF32.*",
)


def quiet() -> None:
    """Silence Lightning's advisory warnings in this process."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def make_trainer(
    run_dir: str | os.PathLike[str],
    *,
    every: int = 5,
    callback_kwargs: dict[str, Any] | None = None,
    extra_callbacks: Sequence[pl.Callback] = (),
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, IntegrityCallback]:
    callback = IntegrityCallback(run_dir, checkpoint_every_n_steps=every, **(callback_kwargs or {}))
    settings = {**TRAINER_DEFAULTS, "max_epochs": 2, **trainer_kwargs}
    trainer = pl.Trainer(callbacks=[callback, *extra_callbacks], **settings)
    return trainer, callback


def capture(
    run_dir: str | os.PathLike[str],
    model: pl.LightningModule | Callable[[], pl.LightningModule],
    data: Any = None,
    *,
    seed: int = 1234,
    every: int = 5,
    ckpt_path: str | os.PathLike[str] | None = None,
    callback_kwargs: dict[str, Any] | None = None,
    extra_callbacks: Sequence[pl.Callback] = (),
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Train ``model`` on ``data`` with the callback recording into ``run_dir``.

    ``model`` and ``data`` may be zero-argument callables: they are called after seeding,
    so two captures with the same seed start from the same initial weights.
    """
    quiet()
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    if not isinstance(model, pl.LightningModule):
        model = model()
    if callable(data) and not isinstance(data, pl.LightningDataModule | DataLoader):
        data = data()
    trainer, _ = make_trainer(run_dir, every=every, callback_kwargs=callback_kwargs,
                              extra_callbacks=extra_callbacks, **trainer_kwargs)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(model, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    else:
        trainer.fit(model, train_dataloaders=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer


def step_bodies(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The bodies of every step record, in ledger order."""
    return [r.body for r in open_run(Path(run_dir)).iter_steps()]


def checkpoint_roots(run_dir: str | os.PathLike[str]) -> dict[int, tuple[str, str]]:
    """``{step: (model root, optimizer root)}`` of the run's checkpoints (last one per step)."""
    return {c.step: (str(c.model.root), str(c.optimizer.root)) for c in open_run(Path(run_dir)).unique_checkpoints()}


def assert_all_reproduced(report: ReplayReport, segments: int | None = None) -> None:
    """Every replayed segment reproduced bit for bit (and, if given, there are ``segments``)."""
    detail = [(s.index, s.start_step, s.end_step, s.verdict.value, s.reason) for s in report.segments]
    assert report.segments, "nothing was replayed"
    assert all(s.verdict is Verdict.REPRODUCED for s in report.segments), detail
    assert all(s.steps_checked > 0 for s in report.segments), detail
    assert report.ok
    if segments is not None:
        assert report.total_segments == segments, detail
        assert len(report.segments) == segments, detail


def flatten_tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state, keyed by its path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        found[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            found.update(flatten_tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.update(flatten_tensors(item, f"{prefix}/{index}"))
    return found


# ---- models -----------------------------------------------------------------------------------


class IndexRecordingModule(DemoModule):
    """DemoModule that remembers the sample indices of every batch it trained on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[2].tolist())
        return super().training_step(batch, batch_idx)


class GanModule(pl.LightningModule):
    """A GAN-like toy with manual optimization and two optimizers (two steps per batch)."""

    def __init__(self, features: int = 16, latent: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(latent, 16), nn.ReLU(), nn.Linear(16, features))
        self.discriminator = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        z = torch.randn(x.shape[0], self.hparams.latent)
        fake = self.generator(z)
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(fake.detach())
        d_loss = bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_logits = self.discriminator(self.generator(z))
        g_loss = bce(g_logits, torch.ones_like(g_logits))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        return (d_loss + g_loss).detach()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr),
            torch.optim.SGD(self.discriminator.parameters(), lr=self.hparams.lr, momentum=0.9),
        )


class HiddenStateModule(DemoModule):
    """Keeps a tensor outside its state dict across steps and lets it change the loss.

    A checkpoint cannot capture ``self.memory``; a replay that starts anywhere but at
    step 0 computes something different, and must say so.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory = torch.zeros(())  # deliberately not a registered buffer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx) * (1.0 + self.memory)
        self.memory = self.memory + 0.125
        return loss


class TaggedModule(DemoModule):
    """DemoModule with a buffer that training changes without touching the loss."""

    def __init__(self, tag_increment: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.register_buffer("tag", torch.zeros(3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.tag += self.hparams.tag_increment
        return super().training_step(batch, batch_idx)


class LossWeightModule(DemoModule):
    """DemoModule with a hyperparameter the checkpoint does not carry: a loss weight."""

    def __init__(self, loss_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * self.hparams.loss_weight


class WarmupModule(DemoModule):
    """Sets its learning rate every batch from its ``lr`` hyperparameter (a hand-written warmup).

    The lr it trains with therefore comes from the hyperparameter, not from the optimizer
    state in the checkpoint.
    """

    def __init__(self, warmup_steps: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        scale = min(1.0, (self.trainer.global_step + 1) / self.hparams.warmup_steps)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.hparams.lr * scale


# ---- data -------------------------------------------------------------------------------------


class ShuffleSampler(Sampler[int]):
    """A custom sampler: a random permutation drawn from torch's and Python's global RNGs."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size).tolist()
        head = order[: self.size // 2]
        random.shuffle(head)
        return iter(head + order[self.size // 2 :])


class UnevenBatchSampler(Sampler[list[int]]):
    """A custom batch sampler: a NumPy-shuffled order cut into batches of 6 and 10."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _cuts(self) -> list[tuple[int, int]]:
        cuts, start, turn = [], 0, 0
        while start < self.size:
            width = (6, 10)[turn % 2]
            cuts.append((start, min(start + width, self.size)))
            start += width
            turn += 1
        return cuts

    def __len__(self) -> int:
        return len(self._cuts())

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.permutation(self.size).tolist()
        for start, end in self._cuts():
            yield order[start:end]


class SamplerDataModule(pl.LightningDataModule):
    """NoisyDataset with a custom sampler (``kind="sampler"``) or batch sampler (``"batch_sampler"``)."""

    def __init__(self, kind: str = "sampler", size: int = 48, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        h = self.hparams
        dataset = NoisyDataset(h.size)
        if h.kind == "batch_sampler":
            return DataLoader(dataset, batch_sampler=UnevenBatchSampler(h.size), num_workers=h.num_workers)
        return DataLoader(dataset, batch_size=8, sampler=ShuffleSampler(h.size), num_workers=h.num_workers)


class NoisyStream(IterableDataset):
    """An iterable dataset: a fixed sequence of samples with torch-random augmentation."""

    def __init__(self, size: int = 48, features: int = 16) -> None:
        generator = torch.Generator().manual_seed(3)
        self.inputs = torch.randn(size, features, generator=generator)
        self.labels = torch.randint(0, 4, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for index in range(len(self.labels)):
            yield self.inputs[index] + 0.05 * torch.randn_like(self.inputs[index]), self.labels[index], index


class StreamDataModule(pl.LightningDataModule):
    def __init__(self, size: int = 48) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(NoisyStream(self.hparams.size), batch_size=8)


class PerturbedDataset(NoisyDataset):
    """NoisyDataset whose sample ``changed`` differs slightly from the original."""

    def __init__(self, size: int, features: int, changed: int) -> None:
        super().__init__(size, features)
        if changed >= 0:
            self.inputs[changed, 0] += 1e-3


class PerturbableDataModule(DemoDataModule):
    """DemoDataModule whose ``changed_sample`` hyperparameter edits one training sample."""

    def __init__(self, changed_sample: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        h = self.hparams
        return DataLoader(PerturbedDataset(h.size, h.features, h.changed_sample), batch_size=h.batch_size,
                          shuffle=h.shuffle, num_workers=h.num_workers)


class SeededDataModule(DemoDataModule):
    """DemoDataModule whose ``data_seed`` hyperparameter decides the samples' contents."""

    def __init__(self, data_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        h = self.hparams
        return DataLoader(NoisyDataset(h.size, h.features, seed=h.data_seed), batch_size=h.batch_size,
                          shuffle=h.shuffle, num_workers=h.num_workers)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed synthetic token sequences (no download): ``(input, target)`` shifted by one."""

    def __init__(self, vocab: int = 64, length: int = 12, count: int = 64) -> None:
        self.data = torch.randint(0, vocab, (count, length + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index, :-1], self.data[index, 1:]


class TokenDataModule(pl.LightningDataModule):
    def __init__(self, vocab: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TokenDataset(int(self.hparams["vocab"])), batch_size=int(self.hparams["batch_size"]), shuffle=True)


class DemoTransformerModule(pl.LightningModule):
    """Lightning's demo Transformer (``lightning.pytorch.demos.Transformer``), small, with dropout and SGD."""

    def __init__(self, vocab: int = 64, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=vocab, ninp=width, nhead=2, nhid=2 * width, nlayers=layers, dropout=0.2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ImageDataset(torch.utils.data.Dataset):
    """Fixed 1x16x16 images with a random flip and noise per fetch (augmentation), and labels."""

    def __init__(self, count: int = 64) -> None:
        generator = torch.Generator().manual_seed(3)
        self.images = torch.randn(count, 1, 16, 16, generator=generator)
        self.labels = torch.randint(0, 10, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image + 0.05 * torch.randn_like(image), self.labels[index]


class ImageDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(ImageDataset(), batch_size=int(self.hparams["batch_size"]), shuffle=True,
                          num_workers=int(self.hparams["num_workers"]))


class SmallConvNet(pl.LightningModule):
    """Two convolutions with batch norm and dropout, then a linear head; Adam."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.1),
            nn.Flatten(), nn.Linear(2 * channels * 8 * 8, 10),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


# ---- replay factories (MODULE:FUNCTION taking no arguments) ------------------------------------


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def perturbed_sample_factory() -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The recorded DemoModule with one training sample changed (``TI_TEST_CHANGED_SAMPLE``)."""
    return DemoModule(), PerturbableDataModule(changed_sample=_env_int("TI_TEST_CHANGED_SAMPLE", -1), **SMALL)


def changed_lr_factory() -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The recorded setup, but the module's learning rate hyperparameter doubled."""
    return DemoModule(lr=0.02), DemoDataModule(**SMALL)


def changed_warmup_lr_factory() -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """WarmupModule with its lr hyperparameter doubled."""
    return WarmupModule(lr=0.02), DemoDataModule(**SMALL)


def changed_loss_weight_factory() -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """LossWeightModule with a different loss weight than recorded."""
    return LossWeightModule(loss_weight=1.5), DemoDataModule(**SMALL)


def changed_data_seed_factory() -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """SeededDataModule with a different data seed than recorded."""
    return DemoModule(), SeededDataModule(data_seed=_env_int("TI_TEST_DATA_SEED", 1), **SMALL)


def changed_tag_factory() -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """TaggedModule whose buffer moves twice as fast as recorded (weights differ, losses do not)."""
    return TaggedModule(tag_increment=2.0), DemoDataModule(**SMALL)
