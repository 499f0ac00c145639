#!/usr/bin/env bash
# Device call for the demo model (issue 5): bash bench/demo_gpu.sh [resume-folder]
# Trains for $TRAIN_SECONDS (resuming from the folder if given; the cosine schedule spans $PLANNED_SECONDS of
# training in all), writes the checkpoint to $OUT/ck, exports the EMA weights, then measures the quality table
# (bench/demo_quality.py: 8 prompts x 30 steps) and runs `liteattn demo` on CUDA. Everything but the checkpoint
# comes back in $OUT/results.tar (a call brings back at most 8 files).
# Needs the wheels in .whl (carry it): diffusers and imageio are not on the device image.
# EVAL=0 skips everything after the export (for a training-only call); LR sets the peak learning rate.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
R=/tmp/results; mkdir -p $R
resume=${1:-}
pack() { tar -C /tmp -cf "$OUT/results.tar" --exclude=tiny_wan.safetensors results; }  # after each stage: a timeout keeps the rest
{
python3 -m pip install -q --no-index --find-links .whl diffusers imageio 2>&1 | grep -v "^WARNING\|^\[notice" | tail -3
python3 -c "import torch, diffusers, imageio, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
python3 -m liteattn.demo.train ${resume:+--resume $resume} --out "$OUT/ck" --time-limit "${TRAIN_SECONDS:-340}" \
    --planned-seconds "${PLANNED_SECONDS:-340}" --batch 32 --lr "${LR:-4e-4}" --compile --samples $R/samples.gif 2>&1 | grep -v Warn; pack
python3 -m liteattn.demo.train --export "$OUT/ck" --weights $R/tiny_wan.safetensors
[ "${EVAL:-1}" = 1 ] && {
timeout 120 python3 bench/demo_quality.py --weights $R/tiny_wan.safetensors --steps 30 --num-prompts 8 \
    --thresholds=-inf,-12,-10,-8,-6,-4,-2,0 --json $R/demo_quality.json 2>&1 | grep -v Warn | tail -14; pack
timeout 60 python3 bench/demo_quality.py --weights $R/tiny_wan.safetensors --steps 30 --num-prompts 8 --tile 64 \
    --thresholds=-10,-8,-6,-4 --json $R/demo_quality_tile64.json 2>&1 | grep -v Warn | tail -8; pack
timeout 75 python3 -m liteattn demo --weights $R/tiny_wan.safetensors --steps 30 --num-prompts 4 --out $R/demo \
    --quiet 2>&1 | tail -16
}
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw,memory.used --format=csv
} 2>&1 | tee $R/log.txt
pack  # tiny_wan.safetensors stays behind: the same numbers as $OUT/ck/ema_0 (keeps $OUT under 64 MiB)
