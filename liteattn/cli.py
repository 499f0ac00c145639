"""The ``liteattn`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def _example(args) -> int:
    import torch

    from . import LiteAttention
    from .testing import StructuredSequence

    for name in ("steps", "seq", "heads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"liteattn example: --{name} must be at least 1, got {getattr(args, name)}")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"liteattn example: --device {args.device}: this torch ({torch.__version__}) sees no "
                             f"CUDA GPU; use --device cpu")
        torch.manual_seed(args.seed)
        attn = LiteAttention(threshold=args.threshold, tile_q=args.tile, tile_k=args.tile, backend=args.backend)
        steps = list(StructuredSequence(args.steps, batch=1, seq_q=args.seq, heads=args.heads, head_dim=64,
                                        seed=args.seed, device=device))
        first = attn(*steps[0])  # a backend that cannot run on this device fails here, in one line
    except (ValueError, TypeError, RuntimeError) as exc:
        raise SystemExit(f"liteattn example: {exc}") from None
    dense = LiteAttention(enable_skipping=False)
    print(f"liteattn example: {args.steps} steps of structured attention, S={args.seq}, H={args.heads}, D=64, "
          f"tile={args.tile}, threshold={args.threshold} (log2)")
    print(f"{'step':>4}  {'sparsity':>8}  {'rel. error vs dense':>19}")
    for n, (q, k, v) in enumerate(steps):
        out = first if n == 0 else attn(q, k, v)
        ref = dense(q, k, v)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"{n:>4}  {attn.sparsity:>8.1%}  {err:>19.2e}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="liteattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="print the sparsity over a few steps of structured attention inputs")
    ex.add_argument("--steps", type=int, default=8)
    ex.add_argument("--seq", type=int, default=2000, help="tokens (not a multiple of the tile, on purpose)")
    ex.add_argument("--heads", type=int, default=4)
    ex.add_argument("--tile", type=int, default=64)
    ex.add_argument("--threshold", type=float, default=-8.0, help="log2 units, <= 0")
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--backend", default=None, choices=["torch", "triton"])
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_example)
    from .demo import DEFAULT_NUM_PROMPTS, DEFAULT_STEPS, DEFAULT_THRESHOLD  # constants only: no torch import

    de = sub.add_parser("demo", help="sample the shipped tiny video model with full attention, then with liteattn; "
                                     "write a GIF, sparsity plots and a report")
    de.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="log2 units, <= 0, or -inf")
    de.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    de.add_argument("--prompts", nargs="+", metavar="PROMPT",
                    help='e.g. "red circle moving left, blue square moving up" (colours: red green blue yellow cyan '
                         'magenta white orange; shapes: circle square triangle; directions: left right up down '
                         'up-left up-right down-left down-right)')
    de.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS,
                    help="how many of the built-in prompts, without --prompts")
    de.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    de.add_argument("--out", default="liteattn_demo", help="output folder")
    de.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (1: none)")
    de.add_argument("--tile", type=int, default=128, help="skip-tile size in tokens (tile_q = tile_k)")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--weights", default=None, help="safetensors file (default: the shipped model)")
    de.add_argument("--quiet", action="store_true", help="no progress bar")
    de.add_argument("--verbose", action="store_true", help="liteattn's log messages")
    de.set_defaults(func=lambda a: __import__("liteattn.demo.run", fromlist=["main"]).main(a))
    be = sub.add_parser("bench", help="time the Triton kernel against cuDNN/flash SDPA and FlexAttention (CUDA)")
    be.add_argument("--shapes", default="all", help="comma-separated names from liteattn.bench.SHAPES, or 'all'")
    be.add_argument("--sparsities", default="0,0.25,0.5,0.75,0.9")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--json", default="bench_results.json", help="where to write the rows ('' to skip)")
    be.set_defaults(func=lambda a: __import__("liteattn.bench", fromlist=["main"]).main(a))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args.func(args)
