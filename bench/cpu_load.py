"""liteattn's PyTorch backend against PyTorch's own attention on the CPU, on an idle machine and on a loaded one.

    python bench/cpu_load.py                 # the demo's self-attention shape: B=2, S=4096, H=4, D=64, fp32

For each condition the script times ``LiteAttention`` (threshold -6, the demo's default, on the backend the demo
uses on a CPU) and ``scaled_dot_product_attention`` on the same inputs, median of ``--reps`` calls after one
warm-up. "loaded" starts ``--burners`` processes that spin on the CPU (each stops by itself after ``--seconds``,
and the script kills them when it is done), so that other work holds the cores, as on a shared CI runner or a
laptop with a browser open. It prints a markdown table (bench/RESULTS.md, "The CPU backend under load").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

BURN = "import time\nt = time.time()\nwhile time.time() - t < {seconds}:\n    pass\n"


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--burners", type=int, default=3, help="CPU-spinning processes while 'loaded'")
    p.add_argument("--seconds", type=float, default=180.0, help="each burner's own time limit")
    args = p.parse_args(argv)

    import liteattn
    from liteattn.testing import structured_qkv

    q, k, v = structured_qkv(args.batch, args.seq, args.heads, args.head_dim, seed=0)
    attn = liteattn.LiteAttention(threshold=-6.0, backend="torch")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    runs = {"liteattn (PyTorch backend)": lambda: attn(q, k, v),
            "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)}
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"B={args.batch} S={args.seq} H={args.heads} D={args.head_dim} fp32, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for condition in ("idle", "loaded"):
        burners = []
        if condition == "loaded":
            burners = [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=args.seconds)])
                       for _ in range(args.burners)]
            time.sleep(1.0)
        try:
            times = {name: timed(fn, args.reps) for name, fn in runs.items()}
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
        rows.append((condition, times))
        print(f"{condition}: " + ", ".join(f"{name} {t * 1e3:.0f} ms" for name, t in times.items()), flush=True)
    print(f"\n| condition | liteattn ms | SDPA ms | liteattn / SDPA |\n|---|---:|---:|---:|")
    for condition, times in rows:
        lite, sdpa = times["liteattn (PyTorch backend)"], times["SDPA"]
        label = condition if condition == "idle" else f"loaded ({args.burners} burners)"
        print(f"| {label} | {lite * 1e3:.0f} | {sdpa * 1e3:.0f} | {lite / sdpa:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
