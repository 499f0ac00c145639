#!/usr/bin/env bash
# One device call for the shipped large demo model (issue 14), about 5 minutes: `liteattn demo --model large`
# (its GIF gives the README's frames), the oracle attention sparsity of the shipped file at its 32-frame clips
# (bench/attention_sparsity.py), then the quality table (bench/demo_quality.py, 8 prompts x 30 steps, the mass
# rule). Carry .whl (diffusers, imageio). Each stage writes into $OUT as it goes, so a timeout keeps the rest.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
W=liteattn/demo/weights/wan_large.safetensors
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 \
    | grep -v "^WARNING\|^\[notice" | tail -3
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
echo "== 1. liteattn demo --model large =="
timeout ${DEMO_SECONDS:-50} python3 -m liteattn demo --model large --steps 30 --num-prompts 2 --out "$OUT/demo" --quiet \
    2>&1 | grep -v Warn | tail -12
echo "== 2. oracle sparsity of the shipped file (32 frames) =="
timeout ${SPARSITY_SECONDS:-90} python3 bench/attention_sparsity.py --weights $W --steps 30 \
    --num-prompts ${SPARSITY_PROMPTS:-2} --json "$OUT/sparsity.json" 2>&1 | grep -v Warn | tail -12
echo "== 3. quality table =="
timeout ${QUALITY_SECONDS:-130} python3 bench/demo_quality.py --weights $W --steps 30 --num-prompts 8 --criterion mass \
    --thresholds=${THRESHOLDS:--10,-8,-6} --json "$OUT/quality.json" 2>&1 | grep -v Warn | tail -8
} 2>&1 | tee "$OUT/log.txt"
