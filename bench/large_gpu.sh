#!/usr/bin/env bash
# Device call for the large demo model (issue 14): bash bench/large_gpu.sh [resume-folder]
# Trains the large model for $TRAIN_SECONDS (a fresh run starts from the small model's weights; with a folder, it
# resumes from that checkpoint; the cosine schedule spans $PLANNED_SECONDS of training in all), writes the checkpoint
# to $OUT/ck, then measures its attention's oracle tile sparsity (bench/attention_sparsity.py: 4 prompts x 30 steps).
# BASELINE=1 also measures the shipped small model first (the 4.1%). Logs, samples and JSON come back in
# $OUT/results.tar. Needs the diffusers wheels in .whl (carry it, and the resume folder); imports only liteattn.demo.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
R=/tmp/results; mkdir -p $R
resume=${1:-}
pack() { tar -C /tmp -cf "$OUT/results.tar" results; }  # after each stage: a timeout keeps the rest
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING\|^\[notice" | tail -3
export PYTHONPATH=/tmp/site
python3 -c "import torch, diffusers, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
[ "${BASELINE:-0}" = 1 ] && { timeout 90 python3 bench/attention_sparsity.py --steps 30 --num-prompts 4 \
    --weights liteattn/demo/weights/tiny_wan.safetensors --json $R/sparsity_small.json 2>&1 | grep -v Warn | tail -3; pack; }
# FRAMES / SIZE change the large model's clip (kept in the checkpoint); TEXT_LR_MULT speeds up the prompt encoder.
python3 bench/run_demo_module.py liteattn.demo.train --model large ${resume:+--resume $resume} --out "$OUT/ck" \
    ${FRAMES:+--frames $FRAMES} ${SIZE:+--size $SIZE} --time-limit "${TRAIN_SECONDS:-330}" \
    --planned-seconds "${PLANNED_SECONDS:-3600}" --batch "${BATCH:-12}" --lr "${LR:-3e-4}" \
    --text-lr-mult "${TEXT_LR_MULT:-1}" --warmup 100 --log-every 50 --samples $R/samples.gif 2>&1 \
    | grep -v "Warn\|rms_norm"; pack
cp "$OUT/ck/state.json" $R/state.json
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw,memory.used --format=csv
timeout "${SPARSITY_SECONDS:-150}" python3 bench/attention_sparsity.py --checkpoint "$OUT/ck" --steps 30 --num-prompts 4 \
    --json $R/sparsity_large.json 2>&1 | grep -v Warn
} 2>&1 | tee $R/log.txt
pack
