"""Sparsity against quality for the keep rules (issue 13, item 5): max x mass x {fixed thresholds, calibrated targets}.

    python bench/rules_eval.py                                   # GPU: the small demo model, ~3 min (bench/rules_eval.sh)
    python bench/rules_eval.py --quick                           # CPU check: 1 prompt, 3 steps, 2 thresholds per rule
    python bench/rules_eval.py --model large --checkpoint DIR    # the large demo model (or --weights FILE)
    python bench/rules_eval.py --report a.json [b.json ...]      # tables and plot again from saved results

Three measurements, in this order of priority (a ``--budget`` in seconds skips what would not fit, and says so):

1. **Demo model, fixed thresholds.** ``--num-prompts`` prompts (the training distribution, fixed seed) sampled in one
   batch for ``--steps`` steps with classifier-free guidance, densely (the model's own processors) and through
   ``liteattn.enable(criterion=rule, threshold=t)`` from the same noise, for each rule (``max``, ``mass``), tile size
   and threshold. Per run: the handle's ``stats()["mean_sparsity"]`` (all layers, both branches, all steps) and
   PSNR / SSIM of each final video against its dense twin (mean, median, min over prompts;
   :func:`bench.demo_quality.summarize`). float32 by default: in bfloat16 the kernel-vs-SDPA rounding alone keeps
   PSNR under about 38 dB (bench/RESULTS.md, "Demo model quality"), which hides the differences between the rules.
2. **Structured synthetic inputs** (attention error, not PSNR): :class:`liteattn.testing.StructuredSequence` (tokens
   on a frames x height x width grid, attention local in space-time, drifting slowly over the steps), one sequence
   per "layer" (a sharp and a broad one), run through one :class:`liteattn.LiteAttention` per layer over the steps
   (cumulative lists, as in sampling). Per step: rel-L2 of the output against dense attention, the worst layer;
   the table's figure is the worst step.
3. **Calibrated targets** (only when ``liteattn.enable`` takes ``target_error``; otherwise a printed note): per rule
   and target, one calibration run (``enable(target_error=E, criterion=rule)``) on the first prompt (or on all,
   ``--calibrate-on all``), ``handle.save_profile()``, then every prompt sampled with ``enable(profile=...)``. Also
   records the calibration run's time against a plain run of the same batch (dense, and liteattn at a fixed
   threshold).

Outputs under ``--out`` (default ``$OUT``, else /tmp/liteattn_out): ``rules_eval_<model>.json`` (every number,
rewritten after each run, so a timeout keeps what was done), ``rules_eval_<model>.png`` (PSNR against sparsity, one
panel per model and tile, one line per rule and per calibration; then worst attention error against sparsity on the
synthetic inputs, one panel per tile), the calibration profiles, and markdown tables printed last, among them
*sparsity at equal PSNR*: each curve's sparsity interpolated at ``--levels`` dB (the largest sparsity whose
piecewise-linear PSNR is still at or above the level; ">=" when the curve never drops below it) and the ratio to the
max rule's (the issue's target: >= 1.5x).
"""

from __future__ import annotations

# The pieces, one job each: rules_eval_common.py (the JSON document, the time budget, the log), rules_eval_runs.py
# (the measurements: demo model and synthetic inputs), rules_eval_report.py (the tables and the plot); this file:
# the command line and the order of the stages.

import argparse
import datetime
import json
import os
import pathlib
import sys
from typing import List

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT / "bench", ROOT):  # liteattn from this checkout, and the rules_eval_* modules beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from rules_eval_common import RULES, Budget, Results, log  # noqa: E402
from rules_eval_report import report, sparsity_at  # noqa: E402,F401 -- sparsity_at: tests/test_rules_eval.py
from rules_eval_runs import DemoEval, calibration_available, synthetic  # noqa: E402

# Thresholds (log2) from about 1 to 25-40 % sparsity on the small demo model at 128-token tiles (CPU, 1 prompt, 12
# steps, float32: max 0 / -1 / -2 / -3 skip 48 / 23 / 14 / 9 %, at 17 / 23 / 29 / 33 dB; mass -3 / -6 skip 78 / 17 %
# at 12 / 29 dB: -3 drops a tile unless some row puts 1/8 of its attention on it); the same grids for 64-token tiles.
# In the order they run: the range where PSNR is 30-55 dB first, the loose ends last, where a time budget cuts first.
MAX_THRESHOLDS = "-6,-3,-10,-4,-8,-2,-5,-1"
MASS_THRESHOLDS = "-10,-7,-14,-8,-12,-6,-9,-5"
SYNTHETIC_MAX = "0,-1,-2,-3,-4,-6,-8,-10"
SYNTHETIC_MASS = "-2,-4,-6,-8,-10,-12,-14,-16"
TARGETS = "0.01,0.02,0.04,0.08"
LEVELS = "30,35,40,45,50"  # PSNR dB at which to compare sparsity
ERROR_LEVELS = "0.005,0.01,0.015,0.03"  # worst rel-L2 at which to compare sparsity (synthetic)


def floats(text: str) -> List[float]:
    return [float(t) for t in text.split(",") if t.strip()]


# -- main -------------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("small", "large"), default="small")
    p.add_argument("--weights", default=None, help="weights file (small: default the shipped tiny_wan; large: "
                                                    "default the shipped wan_large.safetensors)")
    p.add_argument("--checkpoint", default=None, help="large model: a training checkpoint folder (its EMA weights)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-seed", type=int, default=2024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default the demo's, 4)")
    p.add_argument("--tiles", default="128,64", help="tile sizes, in priority order")
    p.add_argument("--rules", default=",".join(RULES), help="keep rules to measure")
    p.add_argument("--max-thresholds", default=MAX_THRESHOLDS, help="in the order they run (use =, e.g. "
                                                                     "--max-thresholds=-6,-3)")
    p.add_argument("--mass-thresholds", default=MASS_THRESHOLDS, help="in the order they run")
    p.add_argument("--targets", default=TARGETS, help="calibration targets (attention rel-L2 error)")
    p.add_argument("--calibrate-on", choices=("first", "all"), default="first",
                   help="the prompts of the calibration run: the first one, or all")
    p.add_argument("--refresh", action="store_true",
                   help="also calibrate with re-admission (enable(refresh=True)), at the first tile size, last")
    p.add_argument("--measure-error", action="store_true",
                   help="profile runs also measure their attention error against dense (one extra dense pass per "
                        "call): does the profile keep its budget on other prompts?")
    p.add_argument("--levels", default=LEVELS, help="PSNR levels (dB) for sparsity at equal PSNR")
    p.add_argument("--error-levels", default=ERROR_LEVELS, help="synthetic: worst rel-L2 levels")
    p.add_argument("--stages", default="fixed,synthetic,calibrated",
                   help="which measurements: fixed, synthetic, calibrated")
    p.add_argument("--synthetic-grid", default="16,16,16", help="frames,height,width of the synthetic tokens")
    p.add_argument("--synthetic-steps", type=int, default=8)
    p.add_argument("--synthetic-drift", type=float, default=0.2,
                   help="score change per step, in std (0.2: the worst error grows ~1.3-1.5x over 8 steps)")
    p.add_argument("--synthetic-max", default=SYNTHETIC_MAX)
    p.add_argument("--synthetic-mass", default=SYNTHETIC_MASS)
    p.add_argument("--frames", type=int, default=None, help="sample shorter videos (CPU checks)")
    p.add_argument("--size", type=int, default=None, help="sample smaller frames (CPU checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for everything (default 240 on CUDA, no limit on the CPU); 0: no limit")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/liteattn_out")
    p.add_argument("--quick", action="store_true", help="CPU check: 1 prompt, 3 steps, 4 frames, 2 thresholds per "
                                                        "rule, tile 128, a small synthetic grid")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="only print the tables and draw the plot of saved results (several files: one figure)")
    if p.parse_known_args(argv)[0].quick:  # new defaults: options given explicitly still win
        p.set_defaults(steps=3, num_prompts=1, frames=4, tiles="128", max_thresholds="-2,-6", mass_thresholds="-4,-10",
                       targets="0.02,0.08", synthetic_grid="4,16,16", synthetic_steps=4, synthetic_max="-2,-6",
                       synthetic_mass="-4,-10")
    args = p.parse_args(argv)
    args.tiles = [int(t) for t in args.tiles.split(",")]
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not args.rules or set(args.rules) - set(RULES):
        p.error(f"--rules: {args.rules} (accepted: {', '.join(RULES)})")
    for name in ("max_thresholds", "mass_thresholds", "targets", "levels", "error_levels", "synthetic_max",
                 "synthetic_mass"):
        setattr(args, name, floats(getattr(args, name)))
    args.synthetic_grid = [int(x) for x in args.synthetic_grid.split(",")]
    args.stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = args.stages - {"fixed", "synthetic", "calibrated"}
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)} (fixed, synthetic, calibrated)")
    args.out = pathlib.Path(args.out)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    stem = f"rules_eval_{args.model}" + ("_quick" if args.quick else "")
    if args.report:
        documents = [json.loads(pathlib.Path(f).read_text()) for f in args.report]
        report(documents, args.out / f"{pathlib.Path(args.report[0]).stem}.png", args.levels, args.error_levels)
        return 0

    from liteattn.demo.sample import GUIDANCE

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        # float32 means float32: TF32 matmuls and convolutions (the patch embedding) would add their own error.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.guidance = GUIDANCE if args.guidance is None else args.guidance
    args.warmup = device.type == "cuda"
    budget = Budget(args.budget if args.budget is not None else (240.0 if device.type == "cuda" else 0.0))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(model=args.model, card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                dtype=args.dtype, torch=torch.__version__, triton=triton_version,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), steps=args.steps,
                guidance=args.guidance, seed=args.seed, prompt_seed=args.prompt_seed, tiles=args.tiles,
                frames=args.frames, size=args.size, budget_seconds=budget.seconds, quick=args.quick,
                calibrate_on=args.calibrate_on, argv=sys.argv[1:] if argv is None else list(argv))
    results = Results(args.out / f"{stem}.json", meta)
    results.save()
    log(f"rules_eval: {args.model} model, {meta['card']} {args.dtype}, {args.steps} steps, {args.num_prompts} "
        f"prompts, tiles {args.tiles}, stages {sorted(args.stages)}, budget "
        f"{budget.seconds or 'none'} s -> {results.path}")

    demo = None
    if args.stages & {"fixed", "calibrated"}:
        with results.stage(f"{args.model} model: load, dense run"):
            demo = DemoEval(args, results, budget, device, dtype)
            demo.warm_up_and_dense()
        if demo is not None and demo.dense is None:
            demo = None
    calibrate = False
    if "calibrated" in args.stages:
        calibrate, note = calibration_available()
        results.data["calibration"].update(available=calibrate, note="" if calibrate else note)
        log(note)
    for i, tile in enumerate(args.tiles):
        if demo is not None and "fixed" in args.stages:
            demo.fixed(tile)
        if i == 0 and "synthetic" in args.stages:
            with results.stage("synthetic inputs"):
                synthetic(args, results, budget, device)
        if demo is not None and calibrate:
            demo.calibrated(tile)
    if demo is not None and calibrate and args.refresh:  # re-admission (issue 13, item 3): after the rest
        for tile in args.tiles[:1]:
            demo.calibrated(tile, refresh=True)
    results.save()
    log(f"done in {budget.elapsed():.0f} s: {results.path}")
    report([results.data], results.path.with_suffix(".png"), args.levels, args.error_levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
