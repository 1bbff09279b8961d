#!/usr/bin/env bash
# The GPU checks, run from the repository root on a CUDA machine: `bash scripts/gpu_check.sh`.
# Prints the machine and library versions, then runs the CUDA tests (tests/test_cuda.py and the CUDA
# cases of tests/test_engram.py), the FP8 tests (tests/test_fp8_training.py: the Hopper GEMM;
# tests/test_fp8_triton.py: the fused Triton quantisation) and
# scripts/nccl_check.sh (torchrun with NCCL on one GPU against one process).
# Everything goes to stdout and, when $OUT is set, to $OUT/gpu_tests.log.
# Exits non-zero when CUDA is not visible (the tests would only skip) or when any test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
log=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    log="$OUT/gpu_tests.log"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    nvidia-smi -L || echo "nvidia-smi not available"
    "$python" - <<'PY'
import sys

import torch
import transformers

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("CUDA is not available: the CUDA tests would all be skipped")
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB")
PY
} 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    exit "$status"
fi

timeout=()  # pytest-timeout: a hung kernel fails its test instead of eating the machine's time
if "$python" -c "import pytest_timeout" 2>/dev/null; then
    timeout=(--timeout 300)
fi
"$python" -m pytest -p no:cacheprovider -q -rs --durations=15 ${timeout[@]+"${timeout[@]}"} \
    tests/test_cuda.py tests/test_engram.py -k "cuda" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
# FP8: the block-scaled GEMM on Hopper (skips on other GPUs), the fused quantisation kernels (sm89+)
# and the recipe's CPU tests
"$python" -m pytest -p no:cacheprovider -q -rs ${timeout[@]+"${timeout[@]}"} tests/test_fp8_training.py \
    tests/test_fp8_triton.py 2>&1 | tee -a "$log"
fp8_status=${PIPESTATUS[0]}
# data parallel over NCCL: torchrun on one GPU against one plain process
bash scripts/nccl_check.sh 2>&1 | tee -a "$log"
nccl_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] && exit "$status"
[ "$fp8_status" -ne 0 ] && exit "$fp8_status"
exit "$nccl_status"
