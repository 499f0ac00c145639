#!/usr/bin/env bash
# Device call for the architecture pass (issue 9): GPU tests, then `liteattn bench` on the Wan 1.3B shape for the
# code before the pass (.before/, a `git archive` of 96342a4's liteattn/) and after it, in the same call.
#   bash bench/arch_gpu.sh            (carry .whl and .before)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
{
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import torch, diffusers, triton; print(torch.__version__, diffusers.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout ${TEST_SECONDS:-300} python3 -m pytest -q -x -p no:cacheprovider tests/test_triton.py tests/test_diffusers_*.py \
    tests/test_compile.py tests/test_joint.py -k "gpu or kernel or compile or merge" 2>&1 | tail -25
[ "${BENCH:-1}" = 1 ] && for tree in before after; do
  root=$PWD; [ $tree = before ] && root=$PWD/.before
  echo "== liteattn bench: $tree"
  (cd /tmp && PYTHONPATH=$root:/tmp/site timeout 200 python3 -m liteattn bench --shapes wan2.1-1.3b-480p \
      --sparsities 0,0.5,0.9 --json $OUT/bench_$tree.json 2>&1 | grep -v "^autotuned" | tail -24)
done
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv
} 2>&1 | tee $OUT/log.txt
