#!/usr/bin/env bash
# One-shot GPU check (issue 8), for a machine with a CUDA GPU and a CUDA build of torch:
#   bash bench/gpu_check.sh [tests] [fp32] [bf16]      (default: all three, in that order)
# tests: the tests marked `gpu`; fp32 / bf16: bench/bench_gpu.py at 32-true / bf16-mixed.
# It uses that machine's python3 (override with PYTHON=...): the CPU-only pins of
# requirements-dev.txt are for CI, so no venv is built. Needs torch, lightning, safetensors,
# numpy, xxhash and pytest there. Logs and results go to $OUT (or bench/results/gpu-check);
# the benchmark also rewrites its sections of docs/benchmarks.md, copied to $OUT too.
# Each part has its own time limit (150 s, 240 s, 200 s): at most about 10 minutes in all,
# so on a device with a 10-minute command limit run the parts in two calls if needed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-bench/results/gpu-check}
mkdir -p "$out"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests fp32 bf16)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c 'import torch, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "lightning", lightning.__version__)'
} 2>&1 | tee -a "$out/env.txt"
for part in "${parts[@]}"; do
  case $part in
    tests) timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu \
             tests/test_gpu.py tests/test_fingerprint.py tests/test_digest.py tests/test_guard.py 2>&1 | tee "$out/gpu-tests.log" ;;
    fp32) timeout 240 $PY bench/bench_gpu.py 2>&1 | tee "$out/bench-fp32.log" ;;
    bf16) timeout 200 $PY bench/bench_gpu.py --precision bf16-mixed 2>&1 | tee "$out/bench-bf16.log" ;;
    *) echo "unknown part: $part (expected tests, fp32 or bf16)" >&2; exit 2 ;;
  esac
done
cp docs/benchmarks.md "$out/" 2>/dev/null
cp bench/results/gpu*.json "$out/" 2>/dev/null
exit 0
