#!/usr/bin/env bash
# Device call for issue 10 on a machine with 2 GPUs: bash bench/two_gpu.sh   (carry .whl: the diffusers wheel)
# liteattn under diffusers context parallelism (bench/two_gpu.py): Wan 14B config (2 blocks) at 720p, then the
# Wan 1.3B config (4 blocks) at 480p; each shape is its own torchrun launch under a time limit, so a crash or a hang
# in one keeps the other's rows. Rows go to $OUT/two_gpu_*.json after each measurement; the markdown table, made from
# those files, is printed last. About 3 minutes on 2 H100s (a budget of 5). EXTRA_ARGS go to every launch (a CPU dry
# run: PATH=.venv/bin:$PATH EXTRA_ARGS="--device cpu --tiny" bash bench/two_gpu.sh).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING\|^\[notice" | tail -3
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, diffusers, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'triton', triton.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name() if torch.cuda.is_available()
else 'no CUDA')" || exit 1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw,memory.used --format=csv 2>/dev/null
run() {  # run SHAPE SECONDS
    timeout -k 10 "$2" torchrun --standalone --nproc_per_node 2 bench/two_gpu.py --shape "$1" ${EXTRA_ARGS:-} \
        --json "$OUT/two_gpu_$1.json" 2>&1 | grep -v "Warning\|warnings.warn\|experimental feature\|all_gather_tensor" \
        | grep -v "^\s*$" | grep -v "^  kv_buffer\|^  return funcol"
    echo "[$1: exit ${PIPESTATUS[0]}]"
}
run wan14b-720p "${SECONDS_14B:-150}"
run wan1.3b-480p "${SECONDS_13B:-90}"
echo
python3 bench/two_gpu.py --table "$OUT"/two_gpu_wan14b-720p.json "$OUT"/two_gpu_wan1.3b-480p.json
