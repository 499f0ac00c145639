"""The ``liteattn`` command."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import List, Optional, Sequence

DTYPES = ("float32", "float16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the option: ``liteattn demo: --steps: invalid int value: 'x'``."""

    def error(self, message):
        if message.startswith("argument "):
            message = message[len("argument "):]
        raise SystemExit(f"{self.prog}: {message}")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (none for options without one)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def threshold_value(text: str) -> float:
    """``--threshold``'s type: a number in log2 units, ``<= 0``, or ``-inf`` (keep every tile)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number <= 0 (log2 units) or -inf, got {text!r}") from None
    if math.isnan(value) or value > 0:
        raise argparse.ArgumentTypeError(f"threshold must be <= 0 (log2 units, typical -3 ... -12) or -inf, "
                                         f"got {text!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join_negative_values(argv: Sequence[str]) -> List[str]:
    """``--threshold -inf`` -> ``--threshold=-inf``.

    argparse takes a value that starts with '-' for an option unless it looks like ``-6`` or ``-0.5``, so
    ``-inf`` or ``-1e1`` after an option would fail with "expected one argument". Any ``--name`` followed by a
    negative number (as ``float()`` reads it) is joined into the ``--name=value`` form, which argparse always reads
    as one option and its value. Nothing else changes (``--`` ends the options).
    """
    out: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if (arg.startswith("--") and "=" not in arg and i + 1 < len(args) and args[i + 1].startswith("-")
                and _is_number(args[i + 1])):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def example_dtype(dtype: Optional[str], backend: Optional[str], device_type: str) -> str:
    """``--dtype`` as given, else bfloat16 with ``--backend triton`` (the kernel takes float16/bfloat16) or on
    CUDA, else float32."""
    if dtype is not None:
        return dtype
    return "bfloat16" if backend in ("triton", "gluon") or device_type == "cuda" else "float32"


def _example(args) -> int:
    import torch

    from . import LiteAttention
    from .testing import StructuredSequence

    def fail(message: str):
        raise SystemExit(f"liteattn example: {message}")

    for name in ("steps", "seq", "heads"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch's error type for a bad string varies by version
        fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r} ({exc})")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    dtype = example_dtype(args.dtype, args.backend, device.type)
    if args.backend in ("triton", "gluon") and dtype not in ("float16", "bfloat16"):
        fail(f"--dtype {dtype}: the {args.backend} kernel takes float16 or bfloat16")
    try:
        torch.manual_seed(args.seed)
        attn = LiteAttention(threshold=args.threshold, tile_q=args.tile, tile_k=args.tile, backend=args.backend)
        steps = list(StructuredSequence(args.steps, batch=1, seq_q=args.seq, heads=args.heads, head_dim=64,
                                        seed=args.seed, dtype=getattr(torch, dtype), device=device))
        first = attn(*steps[0])  # a backend that cannot run on this device fails here, in one line
    except (ValueError, TypeError, RuntimeError) as exc:
        raise SystemExit(f"liteattn example: {exc}") from None
    dense = LiteAttention(enable_skipping=False)
    print(f"liteattn example: {args.steps} steps of structured attention, S={args.seq}, H={args.heads}, D=64, "
          f"{dtype}, tile={args.tile}, threshold={args.threshold} (log2)")
    print(f"{'step':>4}  {'sparsity':>8}  {'rel. error vs dense':>19}")
    for n, (q, k, v) in enumerate(steps):
        out = first if n == 0 else attn(q, k, v)
        ref = dense(q, k, v)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"{n:>4}  {attn.sparsity:>8.1%}  {err:>19.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``liteattn`` command's parser (use :func:`parse_args`, which also reads ``--threshold -inf``)."""
    parser = _Parser(prog="liteattn", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="print the sparsity over a few steps of structured attention inputs",
                        formatter_class=_Formatter)
    ex.add_argument("--steps", type=int, default=8, help="denoising steps")
    ex.add_argument("--seq", type=int, default=2000, help="tokens (not a multiple of the tile, on purpose)")
    ex.add_argument("--heads", type=int, default=4, help="attention heads")
    ex.add_argument("--tile", type=int, default=64, help="skip-tile size in tokens (tile_q = tile_k)")
    ex.add_argument("--threshold", type=threshold_value, default=-8.0, help="log2 units, <= 0, or -inf")
    ex.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ex.add_argument("--backend", default=None, choices=["torch", "triton", "gluon"],
                    help="default: automatic (the Gluon kernel on Hopper GPUs with 128-tiles, Triton on other CUDA "
                         "inputs, the PyTorch reference elsewhere)")
    ex.add_argument("--dtype", default=None, choices=DTYPES,
                    help="default: bfloat16 with --backend triton (the kernel takes float16 or bfloat16) or on CUDA, "
                         "else float32")
    ex.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    ex.set_defaults(func=_example)
    from .demo import DEFAULT_NUM_PROMPTS, DEFAULT_STEPS, DEFAULT_THRESHOLD  # constants only: no torch import

    de = sub.add_parser("demo", help="sample a shipped video model with full attention, then with liteattn; "
                                     "write a GIF, sparsity plots and a report", formatter_class=_Formatter)
    de.add_argument("--threshold", type=threshold_value, default=DEFAULT_THRESHOLD, help="log2 units, <= 0, or -inf")
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
    de.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    de.add_argument("--model", choices=("small", "large"), default=None,
                    help="which shipped model: small (16 frames of 64x64, 4096 tokens) or large (frames of 128x128, "
                         "as many as its weights file says: 32 as shipped, 32768 tokens). Default: large on CUDA when "
                         "its weights file is installed, else small (always small on the CPU)")
    de.add_argument("--weights", default=None,
                    help="a demo model's safetensors file instead of a shipped one; its metadata says which model it "
                         "is, so --weights wins and --model is ignored (with a note)")
    de.add_argument("--quiet", action="store_true", help="no progress bar")
    de.add_argument("--verbose", action="store_true", help="liteattn's log messages")
    de.set_defaults(func=lambda a: __import__("liteattn.demo.run", fromlist=["main"]).main(a))
    be = sub.add_parser("bench", help="time liteattn's kernels against cuDNN/flash SDPA and FlexAttention (CUDA), "
                                      "with issue 12's targets met or not",
                        formatter_class=_Formatter)
    be.add_argument("--shapes", default="all", help="comma-separated names from liteattn.bench.SHAPES, or 'all'")
    be.add_argument("--sparsities", default="0,0.25,0.5,0.75,0.9", help="fractions of tiles skipped")
    be.add_argument("--kernels", default="auto",
                    help="comma-separated liteattn kernels from liteattn.bench.KERNELS (gluon, triton), or 'auto': "
                         "gluon,triton where the Gluon (Hopper) kernel is available, else triton")
    be.add_argument("--seed", type=int, default=0, help="random seed")
    be.add_argument("--json", default="bench_results.json", help="where to write the rows ('' to skip)")
    be.set_defaults(func=lambda a: __import__("liteattn.bench", fromlist=["main"]).main(a))
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (default ``sys.argv[1:]``) as a namespace; a bad option exits with one line naming it."""
    args, extra = build_parser().parse_known_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    if extra:  # (argparse reports these from the top-level parser, without the command's name)
        raise SystemExit(f"liteattn {args.command}: unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args.func(args)
