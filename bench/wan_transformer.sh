#!/usr/bin/env bash
# Device call for the whole-transformer benchmark (issue 11, items 2 and 3): bash bench/wan_transformer.sh
# One H100: about 4 minutes (the python part is capped at $LIMIT s, default 250; what finished stays in the JSON).
# Needs the diffusers wheel in .whl (carry it): diffusers is not on the device image.
# Writes $OUT/wan_transformer.json (every row as it is measured), $OUT/wan_transformer.png (speed-up vs sparsity,
# if matplotlib imports) and $OUT/wan_transformer.log; prints the markdown tables last.
# Env: LAYERS_14B (blocks of the 14B config, default 4 of 40), LAYERS_13B (default 30 of 30), STAGES (default all:
# transformer,block_inf,demo_inf,first_step,overhead), REPEATS (timed steps per run, default 3), EXTRA (more flags).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING\|^\[notice" | tail -3
export PYTHONPATH=/tmp/site
python3 -c "import torch, diffusers, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw,memory.used --format=csv
timeout "${LIMIT:-250}" python3 bench/wan_transformer.py --layers-14b "${LAYERS_14B:-4}" --layers-13b "${LAYERS_13B:-30}" \
    --stages "${STAGES:-transformer,block_inf,demo_inf,first_step,overhead}" --repeats "${REPEATS:-3}" \
    --json "$OUT/wan_transformer.json" ${EXTRA:-} 2>&1 | grep -v "^Warn\|should be kept in float32"
status=${PIPESTATUS[0]}
[ "$status" != 0 ] && echo "wan_transformer.py ended with status $status (124: the time limit); the table of what finished:"
python3 bench/wan_transformer.py --plot "$OUT/wan_transformer.png" --from "$OUT/wan_transformer.json" \
    || echo "(no plot: matplotlib missing? draw it here with --plot PNG --from the JSON)"
[ "$status" != 0 ] && python3 bench/wan_transformer.py --table "$OUT/wan_transformer.json"
} 2>&1 | tee "$OUT/wan_transformer.log"
