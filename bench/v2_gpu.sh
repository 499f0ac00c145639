#!/usr/bin/env bash
# One device call for issue 12's evidence (about 8 minutes on an H100): the GPU tests of both kernels (the Gluon
# kernel v2 and the Triton kernel through the same oracle checks, the state path, no host sync, CUDA graphs,
# torch.compile), then `liteattn bench` with issue 12's target table, one shape per invocation so that each
# finished shape's table prints even if a later one runs out of time. Nothing to carry. Logs and JSON in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
echo "== 1. GPU tests, both kernels =="
timeout ${TEST_SECONDS:-200} python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short \
    tests/test_gluon_hopper.py tests/test_triton.py -k "gpu or gluon" 2>&1 | grep -E "^E |passed|failed|FAILED|Error" \
    | cut -c1-300 | tail -20
echo "== 2. liteattn bench (issue 12 targets) =="
for shape in ${SHAPES:-wan2.1-1.3b-480p cogvideox-5b wan2.1-14b-720p}; do
    timeout ${BENCH_SECONDS:-200} python3 -m liteattn bench --shapes $shape --kernels ${KERNELS:-gluon,triton} \
        --json "$OUT/bench_$shape.json" 2>&1 | grep -v "^autotuned\|Warn"
done
} 2>&1 | tee "$OUT/log.txt"
