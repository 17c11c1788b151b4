#!/usr/bin/env bash
# One-shot GPU check (issue 8), for a machine with a CUDA GPU and a CUDA build of torch:
# the tests marked `gpu`, then bench/bench_gpu.py in fp32 and in bf16-mixed. It uses that
# machine's python3 (override with PYTHON=...): the CPU-only pins of requirements-dev.txt
# are for CI, so no venv is built here. Needs torch, lightning, safetensors, numpy, xxhash
# and pytest there. Logs and results go to $OUT (or bench/results/gpu-check); the
# benchmark also rewrites its sections of docs/benchmarks.md, copied to $OUT too.
# Takes about 8 minutes at most (each part has its own time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-bench/results/gpu-check}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c 'import torch, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "lightning", lightning.__version__)'
} 2>&1 | tee "$out/env.txt"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gpu.py tests/test_fingerprint.py tests/test_digest.py tests/test_guard.py 2>&1 | tee "$out/gpu-tests.log"
timeout 180 $PY bench/bench_gpu.py 2>&1 | tee "$out/bench-fp32.log"
timeout 150 $PY bench/bench_gpu.py --precision bf16-mixed 2>&1 | tee "$out/bench-bf16.log"
cp docs/benchmarks.md "$out/" 2>/dev/null
cp bench/results/gpu*.json "$out/" 2>/dev/null
exit 0
