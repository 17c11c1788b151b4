"""Models for the benchmarks: Lightning's demo Transformer on synthetic tokens."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import Transformer
from torch.utils.data import DataLoader, Dataset


class Tokens(Dataset):
    """Synthetic token sequences (no download)."""

    def __init__(self, vocab: int, length: int = 35, count: int = 4096) -> None:
        self.data = torch.randint(0, vocab, (count, length + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.data[index]
        return row[:-1], row[1:]


class TokenData(pl.LightningDataModule):
    def __init__(self, vocab: int = 33278, batch_size: int = 20, length: int = 35) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader[Any]:
        h = self.hparams
        return DataLoader(Tokens(h["vocab"], length=h["length"]), batch_size=h["batch_size"], shuffle=True)


class LanguageModel(pl.LightningModule):
    """The demo Transformer trained with SGD (the defaults are the demo's own sizes, dropout 0.2)."""

    def __init__(self, vocab: int = 33278, width: int = 200, heads: int = 2, ffn: int = 200, layers: int = 2,
                 dropout: float = 0.2, momentum: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Transformer(vocab_size=vocab, ninp=width, nhead=heads, nhid=ffn, nlayers=layers, dropout=dropout)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=float(self.hparams["momentum"]))
