"""The whole Wan transformer with liteattn (issue 11, item 3): ms per denoising step with guidance, at forced read
sparsity, against the original processors and the bound 1/(1 - share*s); and the -inf overhead targets (item 2).

    python bench/wan_transformer.py                       # CUDA, every stage (bench/wan_transformer.sh on the device)
    python bench/wan_transformer.py --tiny                # CPU check: tiny config, backend torch, wall clock
    python bench/wan_transformer.py --table out.json      # the markdown tables of a JSON
    python bench/wan_transformer.py --plot speedup.png --from out.json   # speed-up vs sparsity, measured vs bound

Stages (each wrapped: a failure is recorded in the JSON and the rest runs; the JSON is rewritten after each):

- ``transformer`` (per shape): diffusers' ``WanTransformer3DModel``, random bf16 weights (norms and embedders fp32,
  as from_pretrained leaves them), 512 text tokens. ``wan14b-720p``: the Wan2.1-14B config with ``--layers-14b`` of
  its 40 blocks (75600 tokens: 81 frames of 720x1280 -> latent 21 x 90 x 160, patch (1, 2, 2)); ``wan1.3b-480p``:
  the 1.3B config with ``--layers-13b`` of its 30 blocks (32760 tokens: 480x832). One step = two transformer calls
  (conditional and unconditional text, the same timestep: the two guidance branches; the handle follows the steps
  from a scheduler stand-in, as in a pipeline, so no host sync per call). Runs, in order: the original
  processors; the original with the video self-attention replaced by a no-op that returns its query (same shape:
  ``share = 1 - T_noop / T_original``, the attention share of the step); liteattn at threshold -inf on untouched
  states (PyTorch's attention; the -inf overhead); liteattn with forced read lists at each sparsity: every state's
  read list (every layer, both branches) is replaced by a random pattern keeping round((1 - s) Nk) tiles of each
  row, always including its first tile, and the threshold stays -inf, so each call reads and writes exactly those
  tiles (checked after the timed steps: ``lists_kept``); the original again (drift check). Also the attention alone
  (PyTorch SDPA on the same shape, x layers x 2 calls: ``share_sdpa``). Per run: median ms per step (CUDA events,
  ``--warmup`` untimed steps then ``--repeats`` timed), peak memory (``torch.cuda.max_memory_allocated``, reset
  before each run), and for forced runs the speed-up over the original and its ratio to ``1 / (1 - share * s)``.
- ``block_inf``: one Wan 1.3B 480p block, liteattn at -inf (untouched states) vs the original processors, alternated
  ``--rounds`` times (target <= 1.02x).
- ``demo_inf``: the shipped demo model's whole sampling (``--demo-prompts`` prompts x ``--demo-steps`` steps,
  guidance, from liteattn/demo) at -inf vs the original processors, alternated (target <= 1.03x).
- ``first_step``: per shape, the attention of a layer's first skipping call (the kernel reading every tile and
  writing its lists: ``lite_attention(state=fresh state, threshold=-10)``) against cuDNN SDPA and PyTorch's default
  SDPA, and the -inf call on an untouched state (``LiteAttention``, PyTorch's attention).
- ``overhead``: bench/call_overhead.py, host µs per ``LiteAttention`` call and per handle hook.

The kernel runs the config the autotuner picks for D=128 on H100/H200 (BLOCK_N=128, 8 warps, 3 stages; see
bench/NOTES.md) unless ``--autotune`` (minutes per shape). JSON: ``$OUT/wan_transformer.json`` (``OUT`` defaults to
/tmp/liteattn_out) or ``--json``.

Files: this one is the command line; ``wan_transformer_setup.py`` the configs, the model and the measuring harness;
``wan_transformer_stages.py`` the stages; ``wan_transformer_report.py`` the tables and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # liteattn from this checkout
_BENCH = os.path.dirname(os.path.abspath(__file__))
if _BENCH not in sys.path:  # the wan_transformer_* modules beside this file (already there when run as a script)
    sys.path.insert(1, _BENCH)

from wan_transformer_report import plot, table  # noqa: E402
from wan_transformer_setup import SHAPES, SPARSITIES, Results, Timer, guarded, pin_kernel_config  # noqa: E402
from wan_transformer_stages import (run_block_inf, run_demo_inf, run_first_step, run_overhead,  # noqa: E402
                                    run_transformer)

STAGES = ("transformer", "block_inf", "demo_inf", "first_step", "overhead")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU check: tiny config, backend torch, wall clock")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--shapes", default="wan1.3b-480p,wan14b-720p")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--layers-14b", type=int, default=4, help="blocks of the 14B config (of 40)")
    p.add_argument("--layers-13b", type=int, default=30, help="blocks of the 1.3B config (of 30)")
    p.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the -inf overhead stages")
    p.add_argument("--demo-prompts", type=int, default=4)
    p.add_argument("--demo-steps", type=int, default=30)
    p.add_argument("--autotune", action="store_true", help="autotune the kernel (minutes per shape)")
    p.add_argument("--json", default=None, help="default $OUT/wan_transformer.json")
    p.add_argument("--table", metavar="JSON", help="print the markdown tables of this JSON and exit")
    p.add_argument("--plot", metavar="PNG", help="draw speed-up vs sparsity (measured vs bound): of --from's JSON "
                   "(and exit), else of this run")
    p.add_argument("--from", dest="from_json", metavar="JSON", help="the JSON --plot reads")
    args = p.parse_args(argv)
    out_dir = os.environ.get("OUT", "/tmp/liteattn_out")
    args.json = args.json or os.path.join(out_dir, "wan_transformer.json")
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return 0
    if args.plot and args.from_json:  # plot only
        with open(args.from_json) as f:
            print(plot(json.load(f), args.plot))
        return 0
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES] + [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown stages or shapes {unknown}; stages: {STAGES}, shapes: {list(SHAPES)}")
    if args.tiny:
        args.shapes = ["tiny"]
        args.demo_prompts, args.demo_steps = 1, 1
        args.repeats = min(args.repeats, 2)
        args.rounds = min(args.rounds, 2)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --tiny for the CPU check")
    if device.type == "cuda" and not args.autotune:
        pin_kernel_config()
    timer = Timer(device)
    results = Results(args.json, args, device)
    start = time.perf_counter()
    for stage in stages:
        print(f"\n=== stage {stage} ({time.perf_counter() - start:.0f} s in)", flush=True)
        if stage == "transformer":
            for shape in args.shapes:
                guarded(results, stage, dict(shape=shape), lambda: run_transformer(results, args, shape, device, timer))
        else:
            fn = dict(block_inf=run_block_inf, demo_inf=run_demo_inf, first_step=run_first_step,
                      overhead=run_overhead)[stage]
            guarded(results, stage, {}, lambda: fn(results, args, device, timer))
    results.data["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    results.save()
    if args.plot:
        try:
            print(plot(results.data, args.plot))
        except Exception as exc:  # the table below matters more
            print(f"no plot: {type(exc).__name__}: {exc}")
    print(f"\nJSON: {args.json} ({results.data['meta']['seconds']} s)\n")
    print(table(results.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
