"""Kernel variants side by side on one shape (bench/NOTES.md records predictions and outcomes).

python3 bench/variants.py [shape]   (CUDA). Switches are the launcher's module-level experiment flags.
"""
import sys

import torch
import triton.testing

from liteattn import SkipList, lite_attention
from liteattn.backends import triton_launch
from liteattn.bench import SHAPES, random_lists

name = sys.argv[1] if len(sys.argv) > 1 else "wan2.1-1.3b-480p"
B, H, S, D = SHAPES[name]
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
flops = 4.0 * B * H * S * S * D
t = lambda f: triton.testing.do_bench(f, warmup=50, rep=200, return_mode="median")
lists = {s: random_lists(B, H, S, 128, s, 0, "cuda") for s in (0.0, 0.5, 0.9)}
rows = []
dense_ms = t(lambda: lite_attention(q, k, v, backend="triton"))
rows.append(("dense", "-", "-", dense_ms))
for prefetch in (True,):
    for mode in ((1, 2, 3) if prefetch else (1,)):
        triton_launch._PREFETCH, triton_launch._WRITE_MODE = prefetch, mode
        for s, read in lists.items():
            write = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), 128, 128, S, S)
            if mode == 1:
                rows.append((f"read prefetch={int(prefetch)}", s, "-", t(lambda: lite_attention(q, k, v, read=read, backend="triton"))))
            ms = t(lambda: lite_attention(q, k, v, read=read, write=write, threshold=-10.0, backend="triton"))
            rows.append((f"read+write prefetch={int(prefetch)} mode={mode}", s, "-", ms))
            ref = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), 128, 128, S, S)
print(f"{name} B={B} H={H} S={S} D={D} on {torch.cuda.get_device_name()}")
for label, s, _, ms in rows:
    print(f"{label:34s} s={s!s:5s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
for key, cfg in triton_launch.lite_attn_fwd.cache.items():
    print("best config", key[:9], cfg)
