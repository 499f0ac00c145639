#!/usr/bin/env bash
# One device call (about 5 minutes on an H200): the first GPU run of kernel v2 in Gluon (issue 12,
# bench/gluon_check.py: correctness, then speed at Wan 1.3B 480p and CogVideoX), the skip state with the mass
# rule's compact LSE against lists with a float32 LSE (issue 11, bench/state_path.py --criterion mass), and the
# GPU tests of the state path (tests/test_triton.py). Nothing to carry. Logs and JSON in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
echo "== 1. kernel v2 (Gluon) =="
timeout ${GLUON_SECONDS:-150} python3 bench/gluon_check.py --quick; echo "gluon_check rc $?"
echo "== 2. state path with the mass rule (compact LSE) =="
timeout 130 python3 bench/state_path.py --criterion mass --label bitmask-mass --shapes wan2.1-1.3b-480p,wan2.1-14b-720p \
    --sparsities 0,0.9 --json "$OUT/state_mass.json"
echo "== 3. GPU tests of the state path =="
timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings --tb=short tests/test_triton.py \
    ${TESTS:+-k "$TESTS"} 2>&1 | grep -E "^E |passed|failed|FAILED|Error" | cut -c1-300 | tail -15
} 2>&1 | tee "$OUT/log.txt"
