#!/usr/bin/env bash
# One device call for two measurements (run from the repository root; about 6 minutes on an H200):
# 1. Issue 11, item 1: the skip state before and after the bitmask, in the same run. bench/state_path.py runs on the
#    tree before the bitmask commit (232b9d1^, compact int32 lists) and on this tree (bitmask), then the old tree
#    again to show the drift. Make the old tree first and carry it:
#        mkdir -p .ckpt/old_lists && git archive 232b9d1^ liteattn | tar -x -C .ckpt/old_lists
#        rm -rf .ckpt/old_lists/liteattn/demo/weights          # run(carry=[".ckpt/old_lists"])
# 2. Issue 12, item 2: Nsight Compute (--set full, clocks untouched) on one dense call of liteattn's kernel, cuDNN
#    and FlashAttention-2 at Wan2.1-1.3B 480p and CogVideoX (bench/kernel_profile.py), the table from the report.
# Everything lands in $OUT (JSON, the ncu report, log.txt).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/liteattn_out}; mkdir -p "$OUT"
OLD=${OLD:-.ckpt/old_lists}
{
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. skip state: compact lists (232b9d1^) / bitmask (this tree) / compact lists again =="
PYTHONPATH=$OLD timeout 170 python3 bench/state_path.py --label lists --json "$OUT/state_lists.json"
PYTHONPATH=. timeout 170 python3 bench/state_path.py --label bitmask --json "$OUT/state_bitmask.json"
PYTHONPATH=$OLD timeout 170 python3 bench/state_path.py --label lists-again --json "$OUT/state_lists2.json"
echo "== 2. Nsight Compute =="
which ncu && ncu --version | tail -1
PYTHONPATH=. timeout 240 ncu --clock-control none --nvtx --nvtx-include "profile/" --set full -f -o "$OUT/prof" \
    python3 bench/kernel_profile.py 2>&1 | grep -v "^==PROF== Profiling\|^==PROF== Disconnected" | tail -20
[ -f "$OUT/prof.ncu-rep" ] && PYTHONPATH=. python3 bench/kernel_profile.py --report "$OUT/prof.ncu-rep" | tee "$OUT/profile.txt"
echo "== summary: state path =="
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {n: json.loads((out / f).read_text())["rows"] for n, f in
        (("lists", "state_lists.json"), ("bitmask", "state_bitmask.json"), ("lists2", "state_lists2.json"))
        if (out / f).is_file()}
print("| shape | s | old: lists read | old: lists r+w | new: lists read | new: state r+w | old write cost | new write cost"
      " | time(s)/time(0) old / new (read) | old again: lists read / r+w | state MB old / new |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
base = {}
for i, new in enumerate(runs.get("bitmask", [])):
    old = runs["lists"][i] if "lists" in runs else None
    again = runs["lists2"][i] if "lists2" in runs else None
    key = new["shape"]
    if new["sparsity"] == 0:
        base[key] = (old["lists_read"] if old else float("nan"), new["lists_read"])
    b0, b1 = base.get(key, (float("nan"), float("nan")))
    o = old or {"lists_read": float("nan"), "lists_read_write": float("nan")}
    a = again or {"lists_read": float("nan"), "lists_read_write": float("nan")}
    print(f"| {key} | {new['sparsity']:.0%} | {o['lists_read']:.3f} | {o['lists_read_write']:.3f} | {new['lists_read']:.3f} |"
          f" {new['state_read_write']:.3f} | {o['lists_read_write'] / o['lists_read'] - 1:+.1%} |"
          f" {new['state_read_write'] / new['lists_read'] - 1:+.1%} | {o['lists_read'] / b0:.3f} / {new['lists_read'] / b1:.3f} |"
          f" {a['lists_read']:.3f} / {a['lists_read_write']:.3f} | {new['lists_bytes'] / 1e6:.1f} / {new['state_bytes'] / 1e6:.2f} |")
PY
} 2>&1 | tee "$OUT/log.txt"
