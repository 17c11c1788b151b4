"""Training throughput with and without IntegrityCallback on Lightning's demo Transformer.

    python bench/bench_capture.py [--steps 30] [--repeats 3]

Runs are interleaved (baseline, callback, baseline, ...) in one process on CPU with
synthetic tokens; the median of the repeats is reported, and the cost of each part
(batch digest, fingerprint, checkpoint) is timed separately on the same model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from bench._report import machine_line, publish, table
from bench.bench_models import LanguageModel, Tokens
from torch_integrity import IntegrityCallback


class StepClock(pl.Callback):
    """Wall time between the end of warm-up step ``skip`` and the end of the last step."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step >= self.skip:
            self.marks.append(time.perf_counter())


class TimedCallback(IntegrityCallback):
    """IntegrityCallback that adds up the time spent in its per-batch hooks."""

    hook_seconds = 0.0
    hook_steps = 0

    def on_train_batch_start(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super().on_train_batch_start(*args, **kwargs)
        TimedCallback.hook_seconds += time.perf_counter() - start

    def on_before_optimizer_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super().on_before_optimizer_step(*args, **kwargs)
        TimedCallback.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super().on_train_batch_end(trainer, *args, **kwargs)
        if trainer.global_step > 0 and trainer.global_step % self.checkpoint_every_n_steps:  # checkpoints costed apart
            TimedCallback.hook_seconds += time.perf_counter() - start
            TimedCallback.hook_steps += 1


def run(steps: int, callback: IntegrityCallback | None, vocab: int, skip: int = 3) -> float:
    """Steady-state steps per second (Trainer start-up and the first steps excluded)."""
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(vocab)
    loader = DataLoader(Tokens(vocab), batch_size=20, shuffle=True)
    clock = StepClock(skip)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         callbacks=[*([callback] if callback else []), clock])
    trainer.fit(model, loader)
    return (len(clock.marks) - 1) / (clock.marks[-1] - clock.marks[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=33278)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    load_before = " / ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    base, ours, ours_fp = [], [], []
    for _ in range(args.repeats):
        base.append(run(args.steps, None, args.vocab))
        with tempfile.TemporaryDirectory() as tmp:
            ours.append(run(args.steps, IntegrityCallback(Path(tmp) / "run", checkpoint_every_n_steps=args.checkpoint_every), args.vocab))
        with tempfile.TemporaryDirectory() as tmp:
            ours_fp.append(run(args.steps, IntegrityCallback(Path(tmp) / "run", checkpoint_every_n_steps=args.checkpoint_every,
                                                              fingerprint_every_n_steps=1), args.vocab))
    b, o, f = statistics.median(base), statistics.median(ours), statistics.median(ours_fp)
    # parts, timed on the same model
    from torch_integrity.batch import digest_batch
    from torch_integrity.fingerprint import fingerprint_tensors
    from torch_integrity.store import save_checkpoint

    model = LanguageModel(args.vocab)
    batch = next(iter(DataLoader(Tokens(args.vocab), batch_size=20)))
    def timed(fn, n=5):  # type: ignore[no-untyped-def]
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1000
    digest_ms = timed(lambda: digest_batch(batch))
    fp_ms = timed(lambda: fingerprint_tensors(model.state_dict().items(), key=1))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_ms = timed(lambda: save_checkpoint(Path(tmp) / "c.safetensors", {"state_dict": model.state_dict()}), n=3)
    step_ms = 1000 / b
    TimedCallback.hook_seconds, TimedCallback.hook_steps = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        run(min(args.steps, 15), TimedCallback(Path(tmp) / "run", checkpoint_every_n_steps=args.checkpoint_every), args.vocab)
    hooks_ms = TimedCallback.hook_seconds / max(TimedCallback.hook_steps, 1) * 1000
    rows = [
        ["no callback", f"{b:.2f}", "1.000", "-"],
        [f"IntegrityCallback (defaults, checkpoint every {args.checkpoint_every})",
         f"{o:.2f}", f"{o / b:.3f}", f"{(1 - o / b) * 100:.1f}%"],
        ["IntegrityCallback + fingerprint every step", f"{f:.2f}", f"{f / b:.3f}", f"{(1 - f / b) * 100:.1f}%"],
    ]
    parts = [
        ["training step (baseline)", f"{step_ms:.1f}"],
        ["all per-batch callback hooks (indices, batch digest, RNG snapshot, step record), per step", f"{hooks_ms:.3f}"],
        ["  of which batch digest (SHA-256 of 20x35 int64 tokens)", f"{digest_ms:.3f}"],
        ["weight fingerprint (14.6M params)", f"{fp_ms:.2f}"],
        ["checkpoint write (model only, 58 MB), once per checkpoint interval", f"{ckpt_ms:.1f}"],
    ]
    params = sum(p.numel() for p in model.parameters())
    body = (
        f"Command: `python bench/bench_capture.py --steps {args.steps} --repeats {args.repeats}`  \n"
        f"Machine: {machine_line()}; load average before the run {load_before}  \n"
        f"Model: Lightning demo Transformer ({params / 1e6:.1f}M parameters), "
        f"batch 20 x 35 synthetic tokens, SGD, CPU; median of {args.repeats} interleaved runs of {args.steps} steps "
        "(steady state: from the end of step 3 to the end of the last step; Trainer start-up and the step-0 checkpoint "
        "are outside the window, checkpoints are costed separately below).\n\n"
        + table(["configuration", "steps/s", "ratio", "overhead"], rows)
        + "\n\nCost of each part, measured separately (ms):\n\n" + table(["part", "ms"], parts) + "\n\n"
        + f"Accounted overhead with the defaults: hooks {hooks_ms / step_ms * 100:.2f}% + checkpoints "
        f"{ckpt_ms / args.checkpoint_every / step_ms * 100:.2f}% = "
        f"{(hooks_ms + ckpt_ms / args.checkpoint_every) / step_ms * 100:.2f}% of a step; a fingerprint every step adds "
        f"{fp_ms / step_ms * 100:.2f}%. The throughput rows cannot resolve differences of that size on this shared "
        f"machine: the {args.repeats} baseline runs alone ranged from {min(base):.2f} to {max(base):.2f} steps/s "
        f"({(max(base) - min(base)) / b * 100:.0f}% of their median), so the accounted overhead is the figure to use.\n"
    )
    publish("capture", "Capture overhead (IntegrityCallback)", body,
            {"baseline": base, "callback": ours, "callback_fingerprint": ours_fp, "parts_ms": dict(parts)})


if __name__ == "__main__":
    main()
