#!/usr/bin/env bash
# One device call: build the CUDA extension, run the GPU tests and the kernel checks, then (STAGE=bench) the
# layer / model benchmarks. Everything lands in $OUT (logs + JSON/markdown results).
# Usage on the device: STAGE=check|bench|all bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGE=${STAGE:-all}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --format='commit %H %cd' 2>/dev/null || true
} | tee "$OUT/env.txt"
t0=$(date +%s)
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 MOEQ_BUILD_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 && echo "build ok in $(( $(date +%s) - t0 ))s" || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; }
python3 -c "import logging; logging.basicConfig(level=logging.INFO); import moeq_kernels; print(moeq_kernels.describe())" 2>&1 | tail -3
if [[ $STAGE == check || $STAGE == all ]]; then
  timeout 240 python3 -m pytest tests/kernels -q -x -p no:cacheprovider -k "cuda or gpu or triton or hadamard" 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  for s in gpu_kernels_check gpu_w4a8_check gpu_hadamard_check gpu_cuda_check; do
    [[ -f benchmarks/$s.py ]] || continue
    to=200; [[ $s == gpu_w4a8_check ]] && to=300  # W4A8: checks on the real shapes + T=2048 timing, unmeasured length
    echo "== $s"; timeout $to python3 benchmarks/$s.py > "$OUT/$s.log" 2>&1; tail -25 "$OUT/$s.log"
  done
fi
if [[ $STAGE == bench || $STAGE == all ]]; then
  echo "== layer_bench"; timeout 420 python3 benchmarks/layer_bench.py --out "$OUT" > "$OUT/layer_bench.log" 2>&1; tail -40 "$OUT/layer_bench.log"
fi
if [[ $STAGE == model ]]; then
  echo "== model_bench"; timeout 540 python3 benchmarks/model_bench.py --out "$OUT" > "$OUT/model_bench.log" 2>&1; tail -30 "$OUT/model_bench.log"
fi
