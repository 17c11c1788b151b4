"""Replay speed vs training speed on the same steps.

    python bench/bench_replay.py [--steps 40] [--every 20] [--vocab 8000]

Trains the demo Transformer with IntegrityCallback, timing steady-state steps/s; then
replays every segment and takes the steady-state steps/s each replay reports (the same
window: from the end of a segment's first step to the end of its last). Start-up costs
(Trainer, restoring the checkpoint) are reported separately as wall time per segment.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl

from bench._report import machine_line, publish, table
from bench.bench_models import LanguageModel, TokenData
from torch_integrity import IntegrityCallback
from torch_integrity.replay import replay


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        self.marks.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        pl.seed_everything(0, verbose=False)
        clock = StepClock()
        trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                             callbacks=[IntegrityCallback(run_dir, checkpoint_every_n_steps=args.every), clock])
        trainer.fit(LanguageModel(args.vocab), TokenData(args.vocab))
        # training throughput over the same windows replay measures (each segment's steps 2..N)
        windows = []
        for start in range(0, args.steps, args.every):
            marks = clock.marks[start : start + args.every]
            windows.append((len(marks) - 1) / (marks[-1] - marks[0]))
        train_rate = statistics.median(windows)
        report = replay(run_dir)
        replay_rates = [s.steps_per_second for s in report.segments if s.steps_per_second]
        replay_rate = statistics.median(replay_rates)
        verdicts = sorted({s.verdict.value for s in report.segments})
        walls = [s.seconds for s in report.segments]
    rows = [
        ["training with IntegrityCallback", f"{train_rate:.3f}", "1.000", "-"],
        ["replay (all segments)", f"{replay_rate:.3f}", f"{replay_rate / train_rate:.3f}",
         f"{statistics.median(walls):.1f} s wall per segment of {args.every} steps"],
    ]
    body = (
        f"Command: `python bench/bench_replay.py --steps {args.steps} --every {args.every} --vocab {args.vocab}`  \n"
        f"Machine: {machine_line()}; load average before the run {load_before}  \n"
        f"Model: Lightning demo Transformer (vocab {args.vocab}), batch 20 x 35 synthetic tokens, SGD, CPU, "
        f"deterministic; {args.steps} steps in segments of {args.every}. Steady-state steps/s, median over segments. "
        f"Replay verdicts: {', '.join(verdicts)}.\n\n"
        + table(["what", "steps/s", "ratio to training", "note"], rows) + "\n"
    )
    publish("replay", "Replay speed vs training speed", body,
            {"train_windows": windows, "replay_rates": replay_rates, "segment_wall_s": walls, "verdicts": verdicts})


if __name__ == "__main__":
    main()
