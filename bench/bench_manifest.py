"""Benchmark: dataset-manifest build throughput, memory at 100k vs 1M samples, proofs.

    /work/venv/bin/python bench/bench_manifest.py            # 100k and 1M samples (~5 min on 2 cores)
    /work/venv/bin/python bench/bench_manifest.py --quick    # 20k and 100k samples

The dataset is map-style and synthetic: sample ``i`` is ``(uint8 tensor 3x32x32, i % 10)``
computed from ``i`` in ``__getitem__`` (CIFAR-sized, 3,072 bytes of pixels). Each
measurement runs in a fresh process, so peak RSS (``ru_maxrss``) is that build's own:

* ``write``: :func:`write_manifest`, digests streamed to disk (the CLI's path);
* ``build``: :func:`build_manifest`, digests kept in memory (32 bytes a sample);
* ``generate``: ``dataset[i]`` alone, to show what the dataset itself costs.

Memory is reported two ways: the growth of peak RSS over the process's RSS just before
the build (after imports and a warm-up), and the Python-heap peak from ``tracemalloc``
(separate runs, as tracing slows the build down).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, publish, table
from torch_integrity.manifest import build_manifest, load_manifest, write_manifest
from torch_integrity.proofs import prove_inclusion, verify_inclusion

PIXELS = 3 * 32 * 32


class Synthetic:
    """``n`` deterministic CIFAR-sized samples, made from the index alone."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.base = torch.arange(PIXELS, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 32, 32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base.mul((i % 251) + 1).add_((i // 251) % 256), i % 10


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(mode: str, n: int, trace: bool, out: Path) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    dataset = Synthetic(n)
    write_manifest(Synthetic(1000), out, progress=False)  # warm-up: imports, caches, allocator
    build_manifest(Synthetic(1000), progress=False)
    before = _max_rss_bytes()
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    if mode == "write":
        write_manifest(dataset, out, progress=False)
    elif mode == "build":
        manifest = build_manifest(dataset, progress=False)
        assert manifest.count == n
    else:
        for i in range(n):
            dataset[i]
    seconds = time.perf_counter() - started
    heap = tracemalloc.get_traced_memory()[1] if trace else 0
    return {"seconds": seconds, "rss_growth": _max_rss_bytes() - before, "heap_peak": heap, "rss_before": before}


def measure(mode: str, n: int, *, trace: bool = False, out: Path) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", mode, str(n), str(out)] + (["--trace"] if trace else [])
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    measured: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {mode:8} n={n:>9,} trace={trace!s:5} {measured['seconds']:7.1f} s", file=sys.stderr)
    return measured


def mb(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k and 100k samples instead of 100k and 1M")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "N", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, n, out = args.child
        print(json.dumps(child(mode, int(n), args.trace, Path(out))))
        return

    small, large = (20_000, 100_000) if args.quick else (100_000, 1_000_000)
    load_before, started_all = os.getloadavg()[0], time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-manifest-"))
    raw: dict[str, dict[str, dict[str, float]]] = {}
    for mode in ("generate", "write", "build"):
        raw[mode] = {str(n): measure(mode, n, out=work / f"{mode}-{n}.manifest") for n in (small, large)}
    for mode in ("write", "build"):
        raw[f"{mode}-traced"] = {
            str(n): measure(mode, n, trace=True, out=work / f"t-{mode}-{n}.manifest") for n in (small, large)
        }

    rows = []
    for mode, label in (("write", "write_manifest (streamed to disk)"), ("build", "build_manifest (in memory)"),
                        ("generate", "dataset[i] alone (no hashing)")):
        for n in (small, large):
            m = raw[mode][str(n)]
            traced = raw.get(f"{mode}-traced", {}).get(str(n))
            rows.append([
                label, f"{n:,}", f"{m['seconds']:.1f} s", f"{n / m['seconds']:,.0f}",
                f"{n * PIXELS / m['seconds'] / 1e6:,.0f}", mb(m["rss_growth"]),
                mb(traced["heap_peak"]) if traced else "-",
            ])

    # Loading, proving and verifying against the large streamed manifest.
    path = work / f"write-{large}.manifest"
    started = time.perf_counter()
    manifest = load_manifest(path)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    one = prove_inclusion(manifest, large // 3)
    prove_one = time.perf_counter() - started
    started = time.perf_counter()
    hundred = prove_inclusion(manifest, range(0, large, large // 100))
    prove_hundred = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(1000):
        verify_inclusion(one, manifest.root, large)
    verify_seconds = (time.perf_counter() - started) / 1000
    assert len(hundred) == 100
    raw["proofs"] = {"load_s": load_seconds, "prove_1_s": prove_one, "prove_100_s": prove_hundred,
                     "verify_s": verify_seconds, "file_bytes": path.stat().st_size, "path_nodes": len(one.path)}

    minutes = (time.perf_counter() - started_all) / 60
    raw["run"] = {"load_before": load_before, "load_after": os.getloadavg()[0], "minutes": minutes}
    body = "\n\n".join([
        f"Command: `python bench/bench_manifest.py{' --quick' if args.quick else ''}`. Machine: {machine_line()}; "
        f"1-minute load average {load_before:.1f} before and {raw['run']['load_after']:.1f} after "
        f"({raw['run']['minutes']:.0f} minutes in all; the machine is shared, so times vary by tens of percent).",
        "Synthetic map-style dataset: sample `i` = (uint8 tensor 3x32x32 computed from `i`, `i % 10`); "
        "MB/s counts the 3,072 pixel bytes of each sample. Each row is a fresh process. "
        "*Peak RSS growth* is the rise of the process's peak RSS during the build over its RSS just before; "
        "*heap peak* is tracemalloc's peak of Python allocations in a separate, traced run.",
        table(["what", "samples", "time", "samples/s", "MB/s", "peak RSS growth", "heap peak (tracemalloc)"], rows),
        f"`write_manifest` keeps the same memory for {small:,} and {large:,} samples: digests go to a spool "
        "file beside the output and the Merkle root needs one hash per set bit of the count. "
        f"`build_manifest` holds the digests in one buffer, 32 bytes a sample ({mb(32 * large)} at {large:,}), "
        "about twice that at its peak while the file image is assembled, and no Python object per sample.",
        table(["on the streamed manifest of " + f"{large:,} samples", "result"], [
            ["file size", f"{raw['proofs']['file_bytes']:,} bytes"],
            ["load_manifest (read + recompute the root)", f"{load_seconds:.2f} s"],
            ["prove_inclusion, 1 index", f"{prove_one:.2f} s ({len(one.path)} path nodes)"],
            ["prove_inclusion, 100 indices (one pass)", f"{prove_hundred:.2f} s"],
            ["verify_inclusion, 1 proof", f"{verify_seconds * 1e6:.0f} µs"],
        ]),
    ])
    publish("manifest", "Dataset manifests (bench/bench_manifest.py)", body, raw)


if __name__ == "__main__":
    main()
