"""Callback overhead and replay speed on a GPU, on a model of about 100M parameters.

    python bench/bench_gpu.py                    # CUDA, ~101M-parameter demo Transformer
    python bench/bench_gpu.py --precision bf16-mixed
    python bench/bench_gpu.py --device cpu --width 64 --ffn 128 --heads 2 --vocab 512 \\
        --batch 4 --seq 16 --steps 12 --repeats 1 --replay-steps 8 --replay-every 4   # smoke test

Model: Lightning's demo Transformer (``lightning.pytorch.demos.Transformer``: encoder and
decoder, ``--layers`` each) with vocabulary 33278, width 768, 12 heads, feed-forward 3072, 3 layers and dropout
0.1: 100.8M parameters. Batches of ``--batch`` x ``--seq`` synthetic tokens, SGD with
momentum, ``Trainer(deterministic=True)``.

1. Overhead. Four configurations alternate, ``--repeats`` rounds, in one process: no
   callback; the callback with no checkpoint in the timed window (the per-step cost
   alone); the callback with a checkpoint every ``--checkpoint-every`` steps (written in
   the background); the callback with a weight fingerprint every step. Each run trains
   ``--steps`` steps and is timed from the end of step ``--skip`` to the end of the last
   step, with the device synchronised at both marks (Trainer start-up and the step-0
   checkpoint are outside the window). What one checkpoint costs training comes from the
   second and third rows, with the interval at which checkpoints cost 1%; one
   checkpoint's host time and full write time are also timed apart.
2. Replay. One run of ``--replay-steps`` steps with a checkpoint every ``--replay-every``
   is captured, then every segment is replayed; steady-state steps/s of training (same
   windows) and of replay are compared, and every segment must reproduce bit for bit.

Results go to ``bench/results/gpu.json`` and the ``gpu`` section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch

from bench._report import machine_line, publish, table
from bench.bench_models import LanguageModel, TokenData
from torch_integrity import IntegrityCallback


class StepClock(pl.Callback):
    """Marks the end of every step; synchronises the device at the window's two ends."""

    def __init__(self, skip: int, last: int, sync: bool) -> None:
        self.skip, self.last, self.sync = skip, last, sync
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.sync and step in (self.skip, self.last):
            torch.cuda.synchronize()
        if step >= self.skip:
            self.marks.append(time.perf_counter())


def _trainer(args: argparse.Namespace, steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                      precision=args.precision, deterministic=True, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def _model(args: argparse.Namespace) -> LanguageModel:
    pl.seed_everything(0, verbose=False)
    return LanguageModel(args.vocab, width=args.width, heads=args.heads, ffn=args.ffn, layers=args.layers, dropout=0.1,
                         momentum=0.9)


def _data(args: argparse.Namespace) -> TokenData:
    return TokenData(args.vocab, batch_size=args.batch, length=args.seq)


def timed_run(args: argparse.Namespace, run_dir: Path | None, every: int | None = None, fingerprint: bool = False) -> float:
    """Steady-state steps/s of one training run (with the callback when ``run_dir`` is given)."""
    clock = StepClock(args.skip, args.steps, args.device == "cuda")
    callbacks: list[pl.Callback] = [clock]
    if run_dir is not None:
        callbacks.insert(0, IntegrityCallback(run_dir, checkpoint_every_n_steps=every or args.steps + 1,
                                              fingerprint_every_n_steps=1 if fingerprint else 0))
    _trainer(args, args.steps, callbacks).fit(_model(args), _data(args))
    return (len(clock.marks) - 1) / (clock.marks[-1] - clock.marks[0])


def checkpoint_seconds(args: argparse.Namespace, tmp: Path) -> tuple[float, float]:
    """Time one checkpoint takes from the training loop's side, and the time to write it fully."""

    blocking: list[float] = []
    writing: list[float] = []

    class Probe(IntegrityCallback):
        def _checkpoint(self, trainer: pl.Trainer) -> None:
            began = time.perf_counter()
            super()._checkpoint(trainer)
            if trainer.is_global_zero:
                blocking.append(time.perf_counter() - began)
                self._flush_outbox(block=True)
                writing.append(time.perf_counter() - began)

    probe = Probe(tmp / "ckpt-run", checkpoint_every_n_steps=2)
    _trainer(args, 6, [probe]).fit(_model(args), _data(args))
    return statistics.median(blocking[1:]), statistics.median(writing[1:])  # step 0's includes first-time set-up


def replay_speed(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from torch_integrity.replay import replay

    run_dir = tmp / "replay-run"
    clock = StepClock(0, -1, False)
    _trainer(args, args.replay_steps, [IntegrityCallback(run_dir, checkpoint_every_n_steps=args.replay_every), clock]).fit(
        _model(args), _data(args))
    windows = []
    for start in range(0, args.replay_steps, args.replay_every):
        marks = clock.marks[start : start + args.replay_every]
        windows.append((len(marks) - 1) / (marks[-1] - marks[0]))
    report = replay(run_dir)
    return {
        "train": statistics.median(windows),
        "replay": statistics.median([s.steps_per_second for s in report.segments if s.steps_per_second]),
        "verdicts": sorted({s.verdict.value for s in report.segments}),
        "segment_wall_s": [s.seconds for s in report.segments],
        "environment_differences": sorted({d for s in report.segments for d in s.environment_differences}),
    }


def device_line(device: str) -> str:
    if device != "cuda":
        return "CPU"
    from torch_integrity.environment import describe_environment

    env = describe_environment()
    gpu = env["gpus"][0]
    return (f"{gpu['name']} (compute capability {gpu['capability']}, {gpu['sm_count']} SMs), driver "
            f"{env.get('cuda_driver')}, CUDA {env['cuda']}, cuDNN {env['cudnn']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", default="32-true", help="Lightning precision (e.g. 32-true, bf16-mixed)")
    parser.add_argument("--vocab", type=int, default=33278)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="steps per overhead run")
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps outside the timing window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=25, help="checkpoint interval of the third row")
    parser.add_argument("--replay-steps", type=int, default=60)
    parser.add_argument("--replay-every", type=int, default=20)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (use --device cpu for a smoke test)")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    params = sum(p.numel() for p in _model(args).parameters())
    base: list[float] = []
    ours: list[float] = []
    ours_ckpt: list[float] = []
    ours_fp: list[float] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for repeat in range(args.repeats):
            base.append(timed_run(args, None))
            ours.append(timed_run(args, tmp / f"run-{repeat}"))
            ours_ckpt.append(timed_run(args, tmp / f"run-ckpt-{repeat}", every=args.checkpoint_every))
            ours_fp.append(timed_run(args, tmp / f"run-fp-{repeat}", fingerprint=True))
            print(f"round {repeat + 1}: baseline {base[-1]:.2f} steps/s, callback {ours[-1]:.2f}, with checkpoints "
                  f"{ours_ckpt[-1]:.2f}, with fingerprints {ours_fp[-1]:.2f}", flush=True)
        blocking, writing = checkpoint_seconds(args, tmp)
        speed = replay_speed(args, tmp)
    b, o, c, f = (statistics.median(x) for x in (base, ours, ours_ckpt, ours_fp))
    step_s = 1 / b
    # what a checkpoint costs training, from the throughput rows (extra time per step x steps per checkpoint)
    checkpoint_cost = max(0.0, (1 / c - 1 / o) * args.checkpoint_every)
    interval = checkpoint_cost / (0.01 * step_s)
    rows = [
        ["no callback", f"{b:.2f}", "1.000", "-"],
        ["IntegrityCallback (per-step hooks, no checkpoint in the window)", f"{o:.2f}", f"{o / b:.3f}", f"{(1 - o / b) * 100:.2f}%"],
        [f"IntegrityCallback, a checkpoint every {args.checkpoint_every} steps", f"{c:.2f}", f"{c / b:.3f}",
         f"{(1 - c / b) * 100:.2f}%"],
        ["IntegrityCallback + weight fingerprint every step (on the device)", f"{f:.2f}", f"{f / b:.3f}",
         f"{(1 - f / b) * 100:.2f}%"],
    ]
    replay_rows = [
        ["training with IntegrityCallback", f"{speed['train']:.2f}", "1.000"],
        ["replay (all segments)", f"{speed['replay']:.2f}", f"{speed['replay'] / speed['train']:.3f}"],
    ]
    command = "python bench/bench_gpu.py " + " ".join(sys.argv[1:])
    body = (
        f"Command: `{command.strip()}`  \n"
        f"Device: {device_line(args.device)}  \n"
        f"Host: {machine_line()}  \n"
        f"Model: Lightning demo Transformer, {params / 1e6:.1f}M parameters (width {args.width}, {args.layers}+{args.layers} "
        f"layers, feed-forward {args.ffn}, vocabulary {args.vocab}), batch {args.batch} x {args.seq} tokens, SGD with "
        f"momentum, precision {args.precision}, deterministic. Median of {args.repeats} alternating runs of {args.steps} "
        f"steps, timed from step {args.skip} to the last step.\n\n"
        + table(["configuration", "steps/s", "ratio", "overhead"], rows)
        + f"\n\nOne checkpoint ({params * 4 / 1e6:.0f} MB of fp32 weights, plus momentum): the checkpoint hook takes "
        f"{blocking * 1000:.0f} ms of host time (state dump and host snapshot; on a GPU the copy itself queues on the "
        f"training stream), and the background write and digests finish {writing:.2f} s after it began. From the "
        f"throughput rows, one checkpoint costs training {checkpoint_cost * 1000:.0f} ms; a step takes "
        f"{step_s * 1000:.1f} ms, so checkpoints cost 1% or less at an interval of {interval:.0f} steps or more.\n\n"
        f"Replay: {args.replay_steps} steps in segments of {args.replay_every}; verdicts {', '.join(speed['verdicts'])}; "
        f"environment differences {speed['environment_differences'] or 'none'}.\n\n"
        + table(["what", "steps/s", "ratio to training"], replay_rows) + "\n"
    )
    if args.device != "cuda":  # a smoke test of this script: printed, not recorded
        print(body)
        return
    name = "gpu" if args.precision == "32-true" else f"gpu-{args.precision}"
    publish(name, f"GPU: callback overhead and replay speed ({args.precision})", body,
            {"baseline": base, "callback": ours, "callback_checkpoints": ours_ckpt, "callback_fingerprint": ours_fp,
             "checkpoint_blocking_s": blocking, "checkpoint_written_s": writing,
             "replay": speed, "params": params, "args": vars(args)})


if __name__ == "__main__":
    main()
