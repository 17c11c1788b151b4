"""Record a training run with IntegrityCallback, then replay it.

    python examples/train_with_integrity.py runs/example

Uses the small demo module shipped with the package; swap in your own LightningModule
and LightningDataModule (with ``save_hyperparameters()`` so replay can rebuild them).
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl

from torch_integrity import IntegrityCallback, replay, verify_run
from torch_integrity.demo import DemoDataModule, DemoModule


def main(run_dir: str) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=1, deterministic=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[IntegrityCallback(run_dir, checkpoint_every_n_steps=4)])
    trainer.fit(DemoModule(), DemoDataModule())
    print(verify_run(run_dir).to_json())
    report = replay(run_dir)
    for segment in report.segments:
        print(segment.index, segment.start_step, segment.end_step, segment.verdict.value, segment.reason)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
