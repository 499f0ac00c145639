#!/usr/bin/env bash
# Device call: the GPU tests (kernel at production lengths with both keep rules, compile, no-sync, diffusers) and
# `liteattn bench` on the Wan 1.3B shape. Carry .whl (diffusers).   bash bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site
timeout ${TEST_SECONDS:-330} python3 -m pytest -q -p no:cacheprovider -p no:warnings -p no:logging --tb=short \
    tests/test_triton.py tests/test_diffusers_*.py tests/test_compile.py tests/test_joint.py tests/test_reference_compat.py \
    -k "${TESTS:-gpu or kernel or compile or merge or reference}" > $OUT/tests.txt 2>&1
grep -E "^E |passed|failed|FAILED" $OUT/tests.txt | cut -c1-300 | tail -20
[ "${BENCH:-1}" = 1 ] && (cd /tmp && timeout 200 python3 -m liteattn bench --shapes wan2.1-1.3b-480p \
    --sparsities 0,0.5,0.9 --json $OUT/bench.json 2>&1 | grep -v "^autotuned" | tail -24)
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv
