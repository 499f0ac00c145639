#!/usr/bin/env bash
# Device call for the large demo model (issue 14): bash bench/large_gpu.sh [resume-folder]
# Trains the large model for $TRAIN_SECONDS (a fresh run starts from $INIT_FROM: default the small model's weights,
# 'none' for random; with a folder, it resumes from that checkpoint; the cosine schedule spans $PLANNED_SECONDS of
# training in all), writes the checkpoint to $OUT/ck, then measures its attention's oracle tile sparsity
# (bench/attention_sparsity.py: 4 prompts x 30 steps) and, with HEADS=1, its per-head diagnosis and prompt binding
# (bench/attention_heads.py --binding). PROBE_SECONDS=N first trains N seconds, measures the per-layer sparsity of
# that checkpoint (attention_heads.py --summary), then resumes for the rest: the sparsity's trajectory in one call.
# BASELINE=1 also measures the shipped small model first (the issue's 4.1%). Logs, samples and JSON come back in
# $OUT/results.tar. Needs the diffusers wheels in .whl (carry it, and the resume folder); imports only liteattn.demo.
# Learning-rate multipliers (TEXT_LR_MULT, QK_NORM_LR_MULT) default to the resumed checkpoint's, else 1;
# QK_NORM_INIT sets the self-attention q/k norm weights of a fresh run, LOCAL_INIT starts its heads local (see
# liteattn/demo/train.py: --qk-norm-init, --local-init); HEADS_PER_LAYER=8 makes a fresh run's layers 8 heads x 32
# instead of 4 x 64 (--heads; a resume keeps the checkpoint's; not HEADS, which asks for the per-head table); FRAMES, SIZE
# and REGIONS (textured ground regions per clip, liteattn/demo/textured.py) change the data, also on a resume.
# SPARSITY_FRAMES=N measures the sparsity on clips of N frames (default: the training clips').
# SHAPE_WEIGHT=W weights the loss on the shapes' pixels W times the ground's (--shape-weight; kept on resume).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
R=/tmp/results; mkdir -p $R
resume=${1:-}
pack() { tar -C /tmp -cf "$OUT/results.tar" results; }  # after each stage: a timeout keeps the rest
train() {  # train SECONDS OUT [RESUME] [extra args]
    local seconds=$1 out=$2 from=${3:-}; shift 3
    python3 bench/run_demo_module.py liteattn.demo.train --model large ${from:+--resume $from} --out "$out" \
        ${INIT_FROM:+--init-from $INIT_FROM} ${HEADS_PER_LAYER:+--heads $HEADS_PER_LAYER} ${QK_NORM_INIT:+--qk-norm-init $QK_NORM_INIT} ${LOCAL_INIT:+--local-init $LOCAL_INIT} \
        ${FRAMES:+--frames $FRAMES} ${SIZE:+--size $SIZE} ${REGIONS:+--regions $REGIONS} --time-limit "$seconds" \
        --planned-seconds "${PLANNED_SECONDS:-3600}" --batch "${BATCH:-12}" --lr "${LR:-3e-4}" \
        ${TEXT_LR_MULT:+--text-lr-mult $TEXT_LR_MULT} ${QK_NORM_LR_MULT:+--qk-norm-lr-mult $QK_NORM_LR_MULT} \
        ${SHAPE_WEIGHT:+--shape-weight $SHAPE_WEIGHT} \
        --warmup 100 --log-every 50 "$@" 2>&1 | grep -v "Warn\|rms_norm"
}
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v "^WARNING\|^\[notice" | tail -3
export PYTHONPATH=/tmp/site
python3 -c "import torch, diffusers, triton; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
[ "${BASELINE:-0}" = 1 ] && { timeout 90 python3 bench/attention_sparsity.py --steps 30 --num-prompts 4 \
    --weights liteattn/demo/weights/tiny_wan.safetensors --json $R/sparsity_small.json 2>&1 | grep -v Warn | tail -3; pack; }
total=${TRAIN_SECONDS:-330}
if [ -n "${PROBE_SECONDS:-}" ]; then
    train "$PROBE_SECONDS" /tmp/ck_probe "$resume"; cp /tmp/ck_probe/state.json $R/state_probe.json
    timeout 90 python3 bench/attention_heads.py --checkpoint /tmp/ck_probe --summary --json $R/heads_probe.json \
        2>&1 | grep -v Warn; pack
    resume=/tmp/ck_probe; total=$(( total - PROBE_SECONDS ))
fi
train "$total" "$OUT/ck" "$resume" --samples $R/samples.gif; pack
cp "$OUT/ck/state.json" $R/state.json
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw,memory.used --format=csv
timeout "${SPARSITY_SECONDS:-150}" python3 bench/attention_sparsity.py --checkpoint "$OUT/ck" --steps 30 --num-prompts 4 \
    ${SPARSITY_FRAMES:+--frames $SPARSITY_FRAMES} --json $R/sparsity_large.json 2>&1 | grep -v Warn; pack
[ "${HEADS:-0}" = 1 ] && timeout "${HEADS_SECONDS:-120}" python3 bench/attention_heads.py --checkpoint "$OUT/ck" \
    --binding --json $R/heads.json 2>&1 | grep -v Warn
python3 - <<'PY'
import json, pathlib
R = pathlib.Path("/tmp/results")
def load(name):
    f = R / name
    return json.loads(f.read_text()) if f.is_file() else None
st, sp, hp, hd = load("state.json"), load("sparsity_large.json"), load("heads_probe.json"), load("heads.json")
if st:
    log = st["log"]
    print(f"\nsummary: step {st['step']}, {st['train_seconds']:.0f} s trained, loss {log[0]['loss']} -> {log[-1]['loss']}"
          f" (first/last logged), qk scale min/mean/max {log[-1].get('qk_scale')}")
if hp:
    print(f"probe (step {hp.get('step')}): one-step tiles below 1e-3 {100 * hp['mean_below_1e3']:.1f}%")
if sp:
    m = sp["mean"]["128"]
    print(f"sparsity (4 prompts x 30 steps), tile 128 < 1e-2/1e-3/1e-4: " + " / ".join(f"{100 * v:.1f}" for v in m)
          + "; per layer < 1e-3: " + ", ".join(f"{100 * l['128'][1]:.1f}" for l in sp["per_layer"]))
if hd:
    local = sum(r["below_1e3"] > 0.4 for r in hd["heads"])
    print(f"heads: mean {100 * hd['mean_below_1e3']:.1f}%, {local} of {len(hd['heads'])} heads above 40%")
    for k, v in hd.get("binding", {}).items():
        print(f"binding {k}: swapped {v['swapped']:.4f}, unrelated {v['unrelated']:.4f}, ratio {v['ratio']:.3f}")
PY
} 2>&1 | tee $R/log.txt
pack
