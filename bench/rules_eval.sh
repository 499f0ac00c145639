#!/usr/bin/env bash
# Device call for the keep-rule evaluation (issue 13, item 5): bash bench/rules_eval.sh [extra rules_eval.py options]
# Runs bench/rules_eval.py on the small demo model (4 prompts x 30 steps, float32, tiles 128 then 64; max x mass x
# fixed thresholds, synthetic structured inputs, calibrated targets when liteattn.enable takes target_error, then
# calibration with re-admission) within a time budget: BUDGET seconds (default 205) for the script, which skips what
# would not fit and says so; LIMIT (default 240) kills it outright, and the tables are then printed from the saved
# JSON. The whole call stays under 4.5 minutes. MEASURE_ERROR=1 adds --measure-error (profile runs measure their
# attention error: slower). Results: $OUT/rules_eval_small.json and .png, and everything (profiles, log) in
# $OUT/results.tar. Needs the diffusers wheel in .whl (carry it): the device image has no diffusers.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
R=/tmp/results; mkdir -p $R
pack() { tar -C /tmp -cf "$OUT/results.tar" results; cp $R/rules_eval_*.json $R/rules_eval_*.png "$OUT"/ 2>/dev/null; }
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING\|^\[notice" | tail -3
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import torch, diffusers, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA: CPU')" || exit 1
extra=""
[ "${MEASURE_ERROR:-0}" = 1 ] && extra=--measure-error
timeout "${LIMIT:-240}" python3 bench/rules_eval.py --budget "${BUDGET:-205}" --out $R --refresh $extra "$@" \
    2>&1 | grep --line-buffered -v "Warn"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then  # killed or failed: the tables of what was saved
    echo "rules_eval.py exited with $rc; the tables of the saved results:"
    for f in $R/rules_eval_*.json; do [ -f "$f" ] && python3 bench/rules_eval.py --report "$f" --out $R 2>&1 | tail -80; done
fi
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw,memory.used --format=csv
} 2>&1 | tee $R/log.txt
pack
