"""Wall time of replaying every segment of one run: local pool (1 and 2 workers) vs Ray tasks.

Run: ``python bench/bench_replay_parallel.py`` (needs ``pip install 'torch-integrity[ray]'``;
without Ray only the local rows are measured). Smaller: ``--segments 4 --steps 10 --repeats 1``.

The run is the demo classifier (``torch_integrity.demo``, hidden width ``--hidden``) trained
for one epoch on CPU with a checkpoint every ``--steps`` steps, so it has ``--segments``
segments of ``--steps`` steps each. Every row replays all of them through
:func:`torch_integrity.replay.replay` and checks that each one reproduced bit for bit:

* ``local, 1 worker``: one after another in this process (the default), once with
  torch's default number of threads (one per core) and once with one thread, as the
  pool's and Ray's workers use (the speed-up column is relative to the one-thread row;
  the default-threads row is measured in the first round only: on a busy machine it is
  by far the slowest);
* ``local, 2 workers``: a spawn process pool of 2 (each process imports torch and
  Lightning first: part of the measured time; one torch thread each);
* ``ray, 2 CPUs``: one Ray task per segment on a Ray head started by this script on
  127.0.0.1 only (``--cpus`` CPUs, no dashboard, no usage stats) before the timings;
  the time includes joining the cluster and starting the task workers (a fresh job each
  time, so each replay starts its own workers, as a verifier's ``torch-integrity replay``
  would), not starting the cluster. Ray gives a 1-CPU task one torch thread
  (``OMP_NUM_THREADS=1``).

Rows are interleaved round by round (``--repeats`` rounds); the table gives the median and
the best wall time, the mean per-segment replay time measured inside the workers, the
start-up overhead (median wall time minus segments x per-segment time / workers) and the
speed-up over one local worker with one thread. The machine's load average is reported
before and after: the numbers are only as good as the cores that were free.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, publish, table
from torch_integrity.replay import ReplayReport, Verdict, replay


def build_run(run_dir: Path, segments: int, steps: int, hidden: int, batch_size: int) -> None:
    """One epoch of the demo classifier, a checkpoint every ``steps`` steps."""
    import lightning.pytorch as pl
    import torch

    from torch_integrity import IntegrityCallback
    from torch_integrity.demo import DemoDataModule, DemoModule

    pl.seed_everything(1234, verbose=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster on a busy machine; the threads do not change the recorded bits here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=1, deterministic=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[IntegrityCallback(run_dir, checkpoint_every_n_steps=steps)])
        trainer.fit(DemoModule(hidden=hidden), DemoDataModule(size=segments * steps * batch_size, batch_size=batch_size))
    torch.set_num_threads(threads)


@contextmanager
def loopback_ray_head(cpus: int) -> Iterator[str]:
    """A Ray head on 127.0.0.1 only, in a process group of its own; yields its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="ti-ray-")
    log = Path(folder) / "head.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false",
               "--disable-usage-stats", f"--temp-dir={folder}"]
    with log.open("wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def one_thread(run: Callable[[], ReplayReport]) -> ReplayReport:
    """``run()`` with one torch thread in this process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def timed(run: Callable[[], ReplayReport], segments: int) -> tuple[float, float]:
    """Wall seconds of one full replay, and the mean per-segment seconds inside the workers."""
    began = time.perf_counter()
    report = run()
    wall = time.perf_counter() - began
    bad = [(s.index, s.verdict.value, s.reason) for s in report.segments if s.verdict is not Verdict.REPRODUCED]
    if bad or len(report.segments) != segments:
        raise SystemExit(f"replay did not reproduce every segment: {bad}")
    return wall, statistics.mean(s.seconds for s in report.segments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400, help="steps per segment")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width of the demo classifier")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray head")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-publish", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    try:
        import ray  # noqa: F401

        have_ray = True
    except ImportError:
        have_ray = False
        print("ray is not installed: measuring the local executor only", file=sys.stderr)

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ti-bench-replay-"))
    try:
        run_dir = work / "run"
        began = time.perf_counter()
        build_run(run_dir, args.segments, args.steps, args.hidden, args.batch_size)
        capture_s = time.perf_counter() - began
        checkpoint_bytes = sorted(p.stat().st_size for p in (run_dir / "checkpoints").glob("*.safetensors"))
        import torch

        default_threads = torch.get_num_threads()
        rows_spec: list[tuple[str, int, Callable[[str | None], ReplayReport]]] = [
            (f"local, 1 worker (in process, {default_threads} torch threads)", 1, lambda _: replay(run_dir, workers=1)),
            ("local, 1 worker (in process, 1 torch thread)", 1, lambda _: one_thread(lambda: replay(run_dir, workers=1))),
            ("local, 2 workers (process pool)", 2, lambda _: replay(run_dir, workers=2)),
        ]
        if have_ray:
            rows_spec.append((f"ray, {args.cpus} CPUs (loopback cluster)", args.cpus,
                              lambda address: replay(run_dir, executor="ray", ray_address=address)))
        walls: dict[str, list[float]] = {name: [] for name, _, _ in rows_spec}
        per_segment: dict[str, list[float]] = {name: [] for name, _, _ in rows_spec}
        with (loopback_ray_head(args.cpus) if have_ray else _nothing()) as address:
            for round_ in range(args.repeats):
                for row, (name, _, run) in enumerate(rows_spec):
                    if row == 0 and round_ > 0:
                        continue
                    wall, segment_s = timed(lambda run=run: run(address), args.segments)  # type: ignore[misc]
                    walls[name].append(wall)
                    per_segment[name].append(segment_s)
                    print(f"{name}: {wall:.2f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    base = statistics.median(walls[rows_spec[1][0]])
    rows = []
    for name, workers, _ in rows_spec:
        median = statistics.median(walls[name])
        segment_s = statistics.mean(per_segment[name])
        rows.append([name, f"{median:.2f}", f"{min(walls[name]):.2f}", f"{segment_s:.2f}",
                     f"{median - args.segments * segment_s / workers:.2f}", f"{base / median:.2f}x"])
    command = "python bench/bench_replay_parallel.py" + "".join(
        f" --{flag.replace('_', '-')} {value}" for flag, value in vars(args).items()
        if flag != "no_publish" and value != parser.get_default(flag))
    body = "\n".join([
        f"Command: `{command}`",
        "",
        f"Run: the demo classifier (hidden width {args.hidden}, batch {args.batch_size}) for one epoch on CPU, "
        f"{args.segments} segments of {args.steps} steps (captured in {capture_s:.1f} s; checkpoints "
        f"{statistics.median(checkpoint_bytes) / 1e6:.2f} MB each). Every row replays all {args.segments} segments, "
        f"each bit for bit, median and best of {args.repeats} interleaved rounds (the first row: one round). "
        "*Per segment* is the mean time one segment's replay took inside its worker (Trainer set-up, checkpoint "
        "restore and verification, the steps); *start-up overhead* is the median wall time less segments x per "
        "segment / workers.",
        f"Machine: {machine_line()}; 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        "",
        table(["executor", "median wall s", "best wall s", "per segment s", "start-up overhead s",
               "speed-up vs 1 local worker, 1 thread"], rows),
        "",
        "The Ray row includes joining the cluster and starting the task workers (each replay is a new Ray job and "
        "imports torch and Lightning in fresh workers), not starting the cluster; the pool row includes starting its "
        "processes. A worker pays that start-up once and then replays segment after segment, so both parallel rows "
        "approach `segments x per-segment time / workers` as runs get longer; see docs/scaling.md for the cost model.",
    ])
    raw: dict[str, Any] = {"args": vars(args), "walls": walls, "per_segment": per_segment, "capture_s": capture_s,
                           "checkpoint_bytes": checkpoint_bytes, "load_before": load_before, "load_after": load_after,
                           "machine": machine_line()}
    if args.no_publish:
        print(body)
    else:
        publish("replay_parallel", "Replaying a run: local pool vs Ray (bench/bench_replay_parallel.py)", body, raw)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
