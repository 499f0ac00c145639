#!/usr/bin/env bash
# The issue-3 evidence in one device call: GPU tests, then `liteattn bench` on every shape.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
timeout 150 python3 -m pytest tests/test_triton.py -q -p no:cacheprovider -W ignore -rA > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/gpu_tests.log" | sed 's/ - .*//' | sort | uniq -c | head -30
python3 -m liteattn bench --shapes wan2.1-1.3b-480p,cogvideox-5b --json "$OUT/bench_small.json" > "$OUT/bench_small.log" 2>&1
python3 -m liteattn bench --shapes wan2.1-14b-720p --json "$OUT/bench_wan14b.json" > "$OUT/bench_wan14b.log" 2>&1
grep -E "^\| .*(cudnn|dense|0%|50%|90%)" "$OUT"/bench_*.log | grep -v "flex-blockmask\|read+write" | cut -c1-200
