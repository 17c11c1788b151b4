"""One WeightGuard check on a served model vs raw SHA-256 of the same bytes.

Run: ``python bench/bench_guard.py`` (default: 16 ``Linear(4096, 4096)`` layers of
float32 weights without bias = 16 x 64 MiB = 1 GiB). Smaller:
``python bench/bench_guard.py --layers 4 --width 1024 --repeats 3``.

Measured in one process, interleaved round by round (raw, guard, guard 1 thread), each
reported as the median (and the best) of ``--repeats`` rounds:

* ``raw sha256``: one ``hashlib.sha256`` fed every weight tensor's bytes in turn, as
  zero-copy memoryviews, on one thread. Nothing can hash these bytes with SHA-256 on
  one core faster; it is the floor the target is set against.
* ``WeightGuard.check()``: what a server pays per check: ``model.state_dict()``, every
  tensor hashed in place (``sha256-tensor-v1``, tensors in parallel threads, one per
  CPU), the Merkle root, the comparison.
* ``WeightGuard.check()`` with ``threads=1``: the same on one core, to show the guard's
  own overhead over raw SHA-256 without the help of parallel threads.

Target: the guard at most 1.2x the raw time. GB/s is 10^9 bytes of weights per second.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._report import machine_line, publish, table
from torch_integrity.digest import digest_state_dict
from torch_integrity.guard import WeightGuard


def build_model(layers: int, width: int) -> torch.nn.Module:
    """``layers`` bias-free square Linear layers with random float32 weights."""
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, device="meta") for _ in range(layers)])
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-1, 1, generator=generator)
    return model.eval()


def raw_sha256(model: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for tensor in model.state_dict().values():
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-publish", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    model = build_model(args.layers, args.width)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    expected = digest_state_dict(model.state_dict())
    guard = WeightGuard(model, expected)
    serial_guard = WeightGuard(model, expected, threads=1)
    runs = {"raw": lambda: raw_sha256(model), "guard": guard.check, "guard1": serial_guard.check}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up round: page in, start thread pools
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    load_after = os.getloadavg()[0]

    def row(label: str, name: str) -> list[str]:
        seconds = median[name]
        return [
            label,
            f"{seconds:.3f}",
            f"{nbytes / seconds / 1e9:.2f}",
            f"{seconds / median['raw']:.2f}x",
            f"{best[name]:.3f}",
            f"{best[name] / best['raw']:.2f}x",
        ]

    threads = os.cpu_count() or 1
    rows = [
        row("raw hashlib.sha256 (1 thread, zero-copy)", "raw"),
        row(f"WeightGuard.check() ({threads} threads, default)", "guard"),
        row("WeightGuard.check(), threads=1", "guard1"),
    ]
    ratio = median["guard"] / median["raw"]
    verdict = "meets" if ratio <= 1.2 else "misses"
    body = "\n".join(
        [
            f"Command: `python bench/bench_guard.py --layers {args.layers} --width {args.width} "
            f"--repeats {args.repeats}`",
            "",
            f"Model: {args.layers} x `Linear({args.width}, {args.width}, bias=False)` float32 = "
            f"{nbytes / 2**30:.2f} GiB in {args.layers} tensors, on CPU. Median of {args.repeats} interleaved rounds.",
            f"Machine: {machine_line()}; 1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after (other work on the machine slows the parallel guard most).",
            "",
            table(["what", "median s", "GB/s", "vs raw", "best s", "best vs raw"], rows),
            "",
            f"One guard check takes {ratio:.2f}x the raw SHA-256 time: it {verdict} the 1.2x target. "
            f"With one thread it takes {median['guard1'] / median['raw']:.2f}x: the per-tensor headers, "
            "the Merkle root and `state_dict()` cost next to nothing; the hashing is the cost. "
            "Parallel threads help only where there are cores to spare (this machine has "
            f"{threads}); a server that wants its cores for inference can pass `threads=1`.",
        ]
    )
    raw = {
        "bytes": nbytes,
        "layers": args.layers,
        "width": args.width,
        "repeats": args.repeats,
        "cpus": threads,
        "load_average": [load_before, load_after],
        "seconds": times,
        "median_seconds": median,
        "best_seconds": best,
        "guard_vs_raw": ratio,
        "guard_1_thread_vs_raw": median["guard1"] / median["raw"],
    }
    if args.no_publish:
        print(body)
    else:
        publish("guard", "WeightGuard: one check of a served model vs raw SHA-256", body, raw)


if __name__ == "__main__":
    main()
