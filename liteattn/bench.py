"""``liteattn bench``: liteattn's Triton kernel against cuDNN / FlashAttention (SDPA) and FlexAttention.

Every backend is timed in the same run on the same inputs (bf16, CUDA events, medians via
``triton.testing.do_bench``). Throughput is counted as dense attention, 4*B*H*S^2*D, so a
sparse run shows as "effective" TFLOP/s. Sparse runs use random skip lists with a fixed seed:
per (b, h, q-tile), ``round((1 - s) * Nk)`` k-tiles (at least one), the same lists for liteattn
and FlexAttention (given as a BlockMask of full 128x128 blocks).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from typing import Callable, Dict, List

import torch

SHAPES = {
    # name: (B, H, S, D)
    "wan2.1-1.3b-480p": (1, 12, 32760, 128),
    "wan2.1-14b-720p": (1, 40, 75600, 128),
    "cogvideox-5b": (1, 48, 17776, 64),
}
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


def random_lists(B: int, H: int, S: int, tile: int, sparsity: float, seed: int, device):
    """(kv_indices, kv_counts, dense) for random per-q-tile lists keeping round((1-s)*Nk) tiles."""
    from .skip import SkipList

    n = math.ceil(S / tile)
    keep_n = max(1, round((1.0 - sparsity) * n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(B, H, n, n, generator=gen)
    chosen = scores.topk(keep_n, dim=-1).indices
    dense = torch.zeros(B, H, n, n, dtype=torch.bool).scatter_(-1, chosen, True).to(device)
    return SkipList.from_dense(dense, tile, tile, S, S)


def _time(fn: Callable[[], object]) -> float:
    """Median ms over at least ~15 repetitions (CUDA events; L2 flushed between runs by do_bench)."""
    import triton.testing

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end)
    return triton.testing.do_bench(fn, warmup=max(25, 3 * estimate), rep=max(100, 15 * estimate),
                                   return_mode="median")


def run(shapes: List[str], sparsities=SPARSITIES, seed: int = 0, include: str = "all", log=print) -> List[Dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from . import lite_attention
    from .skip import SkipList

    if not torch.cuda.is_available():
        raise SystemExit("liteattn bench needs a CUDA GPU")
    device = torch.device("cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name in shapes:
        B, H, S, D = SHAPES[name]
        flops = 4.0 * B * H * S * S * D
        gen = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, H, S, D) for SDPA / Flex

        def record(backend: str, sparsity, ms: float, write: bool = False):
            row = dict(shape=name, B=B, H=H, S=S, D=D, backend=backend, sparsity=sparsity, write=write, ms=ms,
                       tflops=flops / ms / 1e9)
            rows.append(row)
            log(f"  {name:18s} {backend:22s} s={sparsity if sparsity is not None else '-':<5} "
                f"{ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s")

        log(f"{name}: B={B} H={H} S={S} D={D}")
        for label, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                    record(label, None, _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)))
            except RuntimeError as exc:
                log(f"  {label}: unavailable ({str(exc).splitlines()[0][:100]})")
        record("flex-dense", None, _time(lambda: flex(qt, kt, vt)))
        record("liteattn-dense", None, _time(lambda: lite_attention(q, k, v, backend="triton")))

        for s in sparsities:
            read = random_lists(B, H, S, 128, s, seed, device)
            write = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), 128, 128, S, S)
            record("liteattn-read", s, _time(lambda: lite_attention(q, k, v, read=read, backend="triton")))
            record("liteattn-read+write", s, _time(
                lambda: lite_attention(q, k, v, read=read, write=write, threshold=-10.0, backend="triton")), True)
            mask = read.to_block_mask()  # the same tiles, as full blocks
            record("flex-blockmask", s, _time(lambda: flex(qt, kt, vt, block_mask=mask)))
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    return rows


def table(rows: List[Dict]) -> str:
    """Markdown table: median ms, TFLOP/s (dense-counted) and ratio of time to cuDNN per shape."""
    cudnn = {r["shape"]: r["ms"] for r in rows if r["backend"] == "sdpa-cudnn"}
    lines = ["| shape | backend | sparsity | median ms | TFLOP/s (dense-counted) | speed vs cuDNN |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        s = "-" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        ratio = cudnn[r["shape"]] / r["ms"] if r["shape"] in cudnn else float("nan")
        lines.append(f"| {r['shape']} | {r['backend']} | {s} | {r['ms']:.3f} | {r['tflops']:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def targets(rows: List[Dict]) -> str:
    """The kernel issue's targets, each with its measured figure, per shape."""
    lines = ["| shape | target | measured | met |", "|---|---|---|---|"]

    def ms(shape, backend, sparsity=None):
        found = [r["ms"] for r in rows if r["shape"] == shape and r["backend"] == backend
                 and r["sparsity"] == sparsity]
        return found[0] if found else None

    for shape in dict.fromkeys(r["shape"] for r in rows):
        cudnn, flex, dense = ms(shape, "sdpa-cudnn"), ms(shape, "flex-dense"), ms(shape, "liteattn-dense")
        if cudnn and dense:
            lines.append(f"| {shape} | dense >= 0.9x cuDNN | {cudnn / dense:.2f}x | {'yes' if cudnn / dense >= 0.9 else 'no'} |")
        if flex and dense:
            lines.append(f"| {shape} | dense >= 1.3x FlexAttention | {flex / dense:.2f}x | {'yes' if flex / dense >= 1.3 else 'no'} |")
        base = ms(shape, "liteattn-read", 0.0)
        for r in rows:
            if r["shape"] != shape or r["backend"] != "liteattn-read" or r["sparsity"] is None:
                continue
            s, t = r["sparsity"], r["ms"]
            if s > 0 and base:
                bound = (1 - s + 0.05) * base
                lines.append(f"| {shape} | s={s:.0%}: time <= {1 - s + 0.05:.2f} x time(0) | {t / base:.3f} x | "
                             f"{'yes' if t <= bound else 'no'} |")
            w = ms(shape, "liteattn-read+write", s)
            if w:
                lines.append(f"| {shape} | s={s:.0%}: writing lists costs <= 3% | {w / t - 1:+.1%} | "
                             f"{'yes' if w <= 1.03 * t else 'no'} |")
            f = ms(shape, "flex-blockmask", s)
            if f:
                lines.append(f"| {shape} | s={s:.0%}: >= 1.3x FlexAttention (same mask) | {f / t:.2f}x | "
                             f"{'yes' if f >= 1.3 * t else 'no'} |")
    return "\n".join(lines)


def environment() -> Dict:
    import triton

    return dict(date=datetime.date.today().isoformat(), card=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version())


def main(args) -> int:
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"liteattn bench: unknown shapes {unknown}; choose from {list(SHAPES)} or 'all'")
    try:
        sparsities = tuple(float(x) for x in args.sparsities.split(","))
    except ValueError:
        sparsities = (math.nan,)
    if not all(0.0 <= s < 1.0 for s in sparsities):
        raise SystemExit(f"liteattn bench: --sparsities must be comma-separated fractions of skipped k-tiles in "
                         f"[0, 1), got {args.sparsities!r}")
    if not torch.cuda.is_available():
        raise SystemExit(f"liteattn bench: it times the Triton kernel on a CUDA GPU, and this torch "
                         f"({torch.__version__}) sees none")
    env = environment()
    print(f"liteattn bench on {env['card']} (torch {env['torch']}, triton {env['triton']}), bf16")
    rows = run(shapes, sparsities, args.seed)
    print()
    print(table(rows))
    print()
    print(targets(rows))
    from .backends.triton_launch import lite_attn_fwd

    configs = {str(key): str(cfg) for key, cfg in lite_attn_fwd.cache.items()}
    for key, cfg in configs.items():
        print(f"autotuned {key}: {cfg}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows, configs=configs), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
