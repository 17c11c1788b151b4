"""Capture a 2-process DDP run on CPU (gloo); run as a script so Lightning's launcher can
start the second rank by re-running this command line.

    python tests/ddp_script.py RUN_DIR [CKPT_PATH]

``TI_EVERY`` sets the checkpoint interval (default 3); ``TI_TEST_RECORD_LAG`` makes the
callback write step records that many steps behind training on every rank.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl

from torch_integrity import IntegrityCallback
from torch_integrity.demo import DemoDataModule, DemoModule


def main() -> None:
    warnings.filterwarnings("ignore")
    lag = os.environ.get("TI_TEST_RECORD_LAG")
    if lag is not None:  # write step records this many steps late, as on CUDA (test only)
        import torch_integrity.capture

        torch_integrity.capture.record_lag = lambda device: int(lag)
    run_dir = sys.argv[1]
    ckpt = sys.argv[2] if len(sys.argv) > 2 else None
    pl.seed_everything(11, verbose=False)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", deterministic=True, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[IntegrityCallback(run_dir, checkpoint_every_n_steps=int(os.environ.get("TI_EVERY", "3")))],
    )
    trainer.fit(DemoModule(), DemoDataModule(size=64, num_workers=1, persistent_workers=True), ckpt_path=ckpt)


if __name__ == "__main__":
    main()
