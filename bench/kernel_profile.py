"""Where the dense core's time goes against cuDNN (issue 12, item 2): the launches for Nsight Compute.

    ncu --clock-control none --nvtx --nvtx-include "profile/" --set full -o prof python bench/kernel_profile.py
    python bench/kernel_profile.py --report prof.ncu-rep      # the comparison table from the report

Without ``--report``: for each shape, warms up (the autotuner settles outside the profiled range), then runs one
liteattn dense call (Triton, no lists), one cuDNN SDPA call and one FlashAttention-2 SDPA call inside an NVTX range
named ``profile``, in that order (the report lists kernels in launch order). Outside ncu it also prints CUDA-event
medians of the three, so the profiled run carries its own timings.

With ``--report``: reads the report through ``ncu --import ... --page raw --csv`` and prints one table per
kernel: duration, tensor-pipe and issue-slot utilisation, achieved occupancy, registers, shared memory, and the
warp-stall reasons (cycles per issued instruction), largest first.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys

import torch

SHAPES = {"wan2.1-1.3b-480p": (1, 12, 32760, 128), "cogvideox-5b": (1, 48, 17776, 64)}

# ncu raw metric names (Hopper) -> the table's labels; missing ones are skipped.
METRICS = [
    ("gpu__time_duration.sum", "duration"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM throughput %"),
    ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "tensor pipe (gmma) active %"),
    ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "tensor pipe (hmma) active %"),
    ("sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active", "XU (MUFU) pipe %"),
    ("sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active", "FMA pipe %"),
    ("sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active", "ALU pipe %"),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue slots busy %"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "achieved occupancy %"),
    ("launch__registers_per_thread", "registers/thread"),
    ("launch__shared_mem_per_block", "shared mem/block"),
    ("launch__block_size", "block size"),
    ("launch__grid_size", "grid size"),
    ("smsp__inst_executed.sum", "instructions"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM throughput %"),
    ("lts__t_sector_hit_rate.pct", "L2 hit %"),
]
STALL_PREFIX = "smsp__average_warp_latency_issue_stalled_"
STALL_PREFIX2 = "smsp__average_warps_issue_stalled_"


def launch(shapes) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from liteattn import lite_attention
    from liteattn.bench import _time

    device = torch.device("cuda")
    nvtx = torch.cuda.nvtx
    for name in shapes:
        B, H, S, D = SHAPES[name]
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        calls = {"liteattn": lambda: lite_attention(q, k, v, backend="triton")}
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
            def call(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
            calls[label] = call
        times = {label: _time(fn) for label, fn in calls.items()}  # also the autotuner's warm-up
        print(f"{name} (B={B} H={H} S={S} D={D}): " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
              + f"; liteattn/cudnn time {times['liteattn'] / times['cudnn']:.3f}", flush=True)
        torch.cuda.synchronize()
        nvtx.range_push("profile")
        for fn in calls.values():  # in this order: liteattn, cudnn, flash2 (no nested ranges: ncu filters on one)
            fn()
        nvtx.range_pop()
        torch.cuda.synchronize()


def report(path: str) -> None:
    raw = subprocess.run(["ncu", "--import", path, "--page", "raw", "--csv"], capture_output=True, text=True,
                         check=True).stdout
    rows = list(csv.reader(io.StringIO(raw)))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    for r in data:
        kernel = r[col["Kernel Name"]][:90]
        print(f"\n### {kernel}")
        for metric, label in METRICS:
            if metric in col and r[col[metric]] != "":
                print(f"  {label:32s} {r[col[metric]]:>14s} {units[col[metric]]}")
        stalls = []
        for name, i in col.items():
            for prefix in (STALL_PREFIX, STALL_PREFIX2):
                if name.startswith(prefix) and name.endswith(".ratio") and "not_issued" not in name:
                    try:
                        stalls.append((float(r[i].replace(",", "")), prefix[:-1] + ":" + name[len(prefix):-6]))
                    except ValueError:
                        pass
        for value, name in sorted(stalls, reverse=True)[:12]:
            print(f"  stall {name:60s} {value:8.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--report", default="")
    args = p.parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_profile.py needs a CUDA GPU")
    launch(args.shapes.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
