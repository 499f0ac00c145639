#!/usr/bin/env bash
# One device call: environment, GPU tests, then the benchmark. Usage: bash bench/gpu_run.sh [shapes] [sparsities]
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 150 python3 -m pytest tests/test_triton.py -q -p no:cacheprovider -W ignore > "$OUT/gpu_tests.log" 2>&1; grep -v DEBUG "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -8
fi
timeout ${BENCH_TIMEOUT:-400} python3 -m liteattn bench --shapes "${1:-all}" --sparsities "${2:-0,0.25,0.5,0.75,0.9}" \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^  "
