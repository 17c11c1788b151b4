"""How fast the ledger is written, verified and read, and how big a step record is.

Run: ``python bench/bench_ledger.py`` (default: 1,000,000 step records per variant).
Smaller: ``python bench/bench_ledger.py --records 100000``.

Two ledgers of realistic ``step`` records are written with :class:`LedgerWriter`
(buffered, as the capture callback writes them) into a temporary folder:

* ``plain``: ``{"batch_idx", "data" (64-hex SHA-256 of the batch), "epoch",
  "loss" ("float32:<8 hex bits>"), "lr": [..], "step"}``;
* ``indices``: the same plus ``"indices"``, the ``--batch-size`` sample indices of the batch.

For each: append throughput, :func:`verify_ledger` throughput (chain check, no JSON
decoding; median of ``--repeats`` passes, wall clock and per CPU-second),
:func:`read_records` throughput (chain check and JSON decoding), and bytes per record
on disk. Targets: verify >= 200k records/s; <= 300 bytes per step record
without sample indices.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, publish, table
from torch_integrity.ledger import LedgerWriter, read_records, verify_ledger


def step_body(step: int, rng: random.Random, batch_size: int, with_indices: bool, dataset_size: int) -> dict[str, Any]:
    """A step record as the capture callback writes one (values vary like a real run's)."""
    steps_per_epoch = 1563  # e.g. CIFAR-10 at batch size 32
    loss = 2.3 * (0.9995**step) + rng.random() * 0.05
    body: dict[str, Any] = {
        "batch_idx": step % steps_per_epoch,
        "data": hashlib.sha256(step.to_bytes(8, "little")).hexdigest(),
        "epoch": step // steps_per_epoch,
        "loss": "float32:" + struct.pack(">f", loss).hex(),
        "lr": [round(0.001 * (0.99 ** (step // 1000)), 12)],
        "step": step,
    }
    if with_indices:
        body["indices"] = rng.sample(range(dataset_size), batch_size)
    return body


def measure(
    folder: Path, name: str, records: int, batch_size: int, with_indices: bool, repeats: int
) -> dict[str, float]:
    path = folder / f"{name}.jsonl"
    rng = random.Random(0)
    appending = 0.0
    with LedgerWriter(path) as writer:
        writer.append("run_start", {"run_id": "bench"}, durable=True)
        for step in range(1, records + 1):
            body = step_body(step, rng, batch_size, with_indices, dataset_size=50_000)
            start = time.perf_counter()
            writer.append("step", body)
            appending += time.perf_counter() - start
    size = path.stat().st_size
    walls, cpus = [], []
    for _ in range(repeats):  # the file is in the page cache: this measures the code, not the disk
        start, start_cpu = time.perf_counter(), time.process_time()
        head = verify_ledger(path)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        assert head.count == records + 1
    verifying, verifying_cpu = statistics.median(walls), statistics.median(cpus)
    start = time.perf_counter()
    count = sum(1 for _ in read_records(path))
    reading = time.perf_counter() - start
    assert count == records + 1
    return {
        "records": records,
        "bytes": size,
        "bytes_per_record": size / (records + 1),
        "append_per_s": records / appending,
        "verify_per_s": (records + 1) / verifying,
        "verify_per_cpu_s": (records + 1) / verifying_cpu,
        "read_per_s": (records + 1) / reading,
        "verify_mb_per_s": size / verifying / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="step records per variant (default 1,000,000)")
    parser.add_argument("--batch-size", type=int, default=32, help="sample indices per record in the indices variant")
    parser.add_argument("--repeats", type=int, default=3, help="verify passes; the median is reported (default 3)")
    parser.add_argument("--no-publish", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, with_indices in (("plain", False), ("indices", True)):
            results[name] = measure(Path(folder), name, args.records, args.batch_size, with_indices, args.repeats)
            print(f"  {name}: {results[name]}", file=sys.stderr)
    load_after = os.getloadavg()[0]

    sample = step_body(123_456, random.Random(1), args.batch_size, False, 50_000)
    rows = []
    for name, label in (("plain", "step records"), ("indices", f"step records + {args.batch_size} sample indices")):
        r = results[name]
        rows.append([
            label,
            f"{r['records']:,}",
            f"{r['bytes_per_record']:.0f}",
            f"{r['append_per_s'] / 1e3:,.0f}k",
            f"{r['verify_per_s'] / 1e3:,.0f}k ({r['verify_mb_per_s']:.0f} MB/s)",
            f"{r['verify_per_cpu_s'] / 1e3:,.0f}k",
            f"{r['read_per_s'] / 1e3:,.0f}k",
        ])
    body = (
        f"`python bench/bench_ledger.py --records {args.records} --batch-size {args.batch_size} "
        f"--repeats {args.repeats}`; verify is the median of {args.repeats} passes, the rest one pass. "
        f"Machine: {machine_line()}; 1-minute load average {load_before:.2f} before, {load_after:.2f} after.\n\n"
        + table(
            [
                "ledger",
                "records",
                "bytes/record",
                "append/s",
                "verify_ledger records/s (wall)",
                "verify_ledger records per CPU-second",
                "read_records records/s",
            ],
            rows,
        )
        + f"\n\nA step record's body: `{json.dumps(sample, separators=(',', ':'))}`. "
        "Bytes per record are averages over the file (the line, its chain hash and the newline). "
        "`verify_ledger` checks the chain without decoding JSON; "
        "`read_records` also decodes and re-encodes every record to check it is canonical. "
        "Records per CPU-second counts only the time the process was on a CPU (other processes shared this "
        "machine while it ran; see the load average). "
        "Targets: verify >= 200k records/s; <= 300 bytes per step record without sample indices."
    )
    raw = {"results": results, "machine": machine_line(), "load_average": {"before": load_before, "after": load_after}}
    if args.no_publish:
        print(body)
    else:
        publish("ledger", "Ledger throughput and size (`bench/bench_ledger.py`)", body, raw)


if __name__ == "__main__":
    main()
