"""The ``liteattn`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def _example(args) -> int:
    import torch

    from . import LiteAttention
    from .testing import StructuredSequence

    torch.manual_seed(args.seed)
    attn = LiteAttention(threshold=args.threshold, tile_q=args.tile, tile_k=args.tile, backend=args.backend)
    steps = StructuredSequence(args.steps, batch=1, seq_q=args.seq, heads=args.heads, head_dim=64,
                               seed=args.seed, device=args.device)
    dense = LiteAttention(enable_skipping=False)
    print(f"liteattn example: {args.steps} steps of structured attention, S={args.seq}, H={args.heads}, D=64, "
          f"tile={args.tile}, threshold={args.threshold} (log2)")
    print(f"{'step':>4}  {'sparsity':>8}  {'rel. error vs dense':>19}")
    for n, (q, k, v) in enumerate(steps):
        out = attn(q, k, v)
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
    be = sub.add_parser("bench", help="time the Triton kernel against cuDNN/flash SDPA and FlexAttention (CUDA)")
    be.add_argument("--shapes", default="all", help="comma-separated names from liteattn.bench.SHAPES, or 'all'")
    be.add_argument("--sparsities", default="0,0.25,0.5,0.75,0.9")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--json", default="bench_results.json", help="where to write the rows ('' to skip)")
    be.set_defaults(func=lambda a: __import__("liteattn.bench", fromlist=["main"]).main(a))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args.func(args)
