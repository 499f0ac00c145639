"""Quality of liteattn on the demo model: sparsity, PSNR, SSIM and attention time per threshold.

    python bench/demo_quality.py --steps 30 --num-prompts 8 --json demo_quality.json

Samples ``--num-prompts`` prompts (drawn from the training distribution, fixed seed) with dense attention and then
through ``liteattn.enable`` at each threshold, from the same noise, and compares each liteattn video with its dense
twin. Prints a markdown table (the one in bench/RESULTS.md, "Demo model quality").
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch


def summarize(psnr_db, ssim) -> dict:
    """Mean / median / min over prompts of per-prompt PSNR (dB) and SSIM, as in the table's columns.

    Identical videos (PSNR inf) are left out of the PSNR statistics (None when every video is identical)."""
    finite = [x for x in psnr_db if math.isfinite(x)]
    return dict(
        psnr_db_mean=statistics.mean(finite) if finite else None,
        psnr_db_median=statistics.median(finite) if finite else None,
        psnr_db_min=min(finite) if finite else None,
        ssim_mean=statistics.mean(ssim),
        ssim_median=statistics.median(ssim),
        ssim_min=min(ssim),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thresholds", default="-12,-10,-8,-6,-4,-2,0")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-seed", type=int, default=2024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", default=None, help="weights file (default: the shipped small model)")
    p.add_argument("--checkpoint", default=None,
                   help="a training checkpoint folder instead (its EMA weights; the large model's runs)")
    p.add_argument("--criterion", default=None, choices=["max", "mass"],
                   help="keep rule (default: the demo's, max)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    from liteattn.demo import data
    from liteattn.demo.model import load_model
    from liteattn.demo.run import compare

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.checkpoint:
        if args.weights:
            raise SystemExit("demo_quality.py: give --weights or --checkpoint, not both")
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from attention_sparsity import load  # the training checkpoint's EMA model, as the sparsity script loads it

        model, _ = load(None, args.checkpoint, device, dtype)
    else:
        model = load_model(args.weights, device=device, dtype=dtype)
    frames, size = getattr(model, "video_shape", (data.FRAMES, data.SIZE))
    enable_kwargs = {"criterion": args.criterion} if args.criterion else {}
    prompts = data.sample_scenes(args.num_prompts, seed=args.prompt_seed).prompts()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    start = time.perf_counter()
    result = compare(model, prompts, thresholds, steps=args.steps, seed=args.seed, warmup=device.type == "cuda",
                     tile_q=args.tile, tile_k=args.tile, **enable_kwargs)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dense = result["dense"]
    rows = []
    for run in result["liteattn"]:
        rows.append(dict(
            threshold=run["threshold"],
            sparsity=run["stats"]["mean_sparsity"],
            sparsity_last_step=run["stats"]["sparsity"][-1],
            **summarize(run["psnr_db"], run["ssim"]),
            attention_seconds=run["attention_seconds"],
            total_seconds=run["total_seconds"],
            psnr_db=[x if math.isfinite(x) else None for x in run["psnr_db"]],
            ssim=run["ssim"],
            sparsity_per_step=run["stats"]["sparsity"],
        ))
    print(f"\n{args.checkpoint or args.weights or 'tiny_wan'}: {frames}x{size}x{size}, rule "
          f"{args.criterion or 'max'}; {len(prompts)} prompts x {args.steps} steps, guidance 4, batch {len(prompts)}, tile {args.tile}, "
          f"{card} {str(dtype).replace('torch.', '')}; dense: self-attention {dense['attention_seconds']:.3f} s, "
          f"total {dense['total_seconds']:.3f} s ({time.perf_counter() - start:.0f} s for the whole table)\n")
    print("| threshold | sparsity (mean / last step) | PSNR dB (mean / min) | SSIM (mean / min) | "
          "self-attention s (dense " f"{dense['attention_seconds']:.3f}) | total s (dense {dense['total_seconds']:.3f}) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        psnr = "identical" if r["psnr_db_mean"] is None else f"{r['psnr_db_mean']:.1f} / {r['psnr_db_min']:.1f}"
        print(f"| {r['threshold']:g} | {r['sparsity']:.1%} / {r['sparsity_last_step']:.1%} | {psnr} | "
              f"{r['ssim_mean']:.4f} / {r['ssim_min']:.4f} | {r['attention_seconds']:.3f} | {r['total_seconds']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=card, dtype=str(dtype), steps=args.steps, prompts=prompts, tile=args.tile,
                           source=args.checkpoint or args.weights, frames=frames, size=size,
                           criterion=args.criterion or "max",
                           dense=dict(attention_seconds=dense["attention_seconds"],
                                      total_seconds=dense["total_seconds"]), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
