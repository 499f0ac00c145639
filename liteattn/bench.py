"""``liteattn bench``: liteattn's kernels against cuDNN / FlashAttention (SDPA) and FlexAttention.

Every backend is timed in the same run on the same inputs (bf16, CUDA events, medians via
``triton.testing.do_bench``). Throughput is counted as dense attention, 4*B*H*S^2*D, so a
sparse run shows as "effective" TFLOP/s. Sparse runs use random skip lists with a fixed seed:
per (b, h, q-tile), ``round((1 - s) * Nk)`` k-tiles (at least one), the same lists for liteattn
and FlexAttention (given as a BlockMask of full 128x128 blocks).

``--kernels`` picks the liteattn kernels (``KERNELS``; default ``auto``: ``gluon,triton`` where
``liteattn.backends.gluon_available`` says the Hopper kernel runs, else ``triton``). Each kernel
gets the rows ``<kernel>-dense``, ``<kernel>-read`` and ``<kernel>-read+write`` (write list,
threshold -10) per sparsity; SDPA, ``flex-dense`` and ``flex-blockmask`` are timed once per shape.
:func:`targets` checks issue 12's targets per shape and kernel.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from typing import Callable, Dict, List, Optional

import torch

SHAPES = {
    # name: (B, H, S, D)
    "wan2.1-1.3b-480p": (1, 12, 32760, 128),
    "wan2.1-14b-720p": (1, 40, 75600, 128),
    "cogvideox-5b": (1, 48, 17776, 64),
}
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)
KERNELS = ("gluon", "triton")  # liteattn backends timed by --kernels, fastest first

# Issue 12's targets.
DENSE_VS_CUDNN = 1.0  # dense >= 1.0x cuDNN SDPA
VS_FLEX = 1.3  # >= 1.3x FlexAttention with the same block mask, at every sparsity, dense included
SCALING_SLACK = 0.03  # time(s)/time(0) <= 1 - s + 0.03 ...
SCALING_UP_TO = 0.9  # ... up to 90 %
WRITE_COST = 0.02  # writing the lists costs <= 2 %
_EPS = 1e-9  # a figure exactly on its bound meets it


def gluon_available(device) -> bool:
    """``liteattn.backends.gluon_available(device)``, False when that function is missing or raises."""
    try:
        from . import backends

        return bool(backends.gluon_available(device))
    except Exception:  # noqa: BLE001 (not registered yet, or the probe itself fails: not available)
        return False


def parse_kernels(text: str, device=None) -> List[str]:
    """``--kernels``: ``auto`` or a comma-separated list from :data:`KERNELS`; SystemExit naming what is accepted."""
    text = (text or "").strip()
    if text == "auto":
        return ["gluon", "triton"] if gluon_available(device) else ["triton"]
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if x not in KERNELS]
    if not text or bad or len(set(names)) != len(names):
        why = f"unknown kernels {bad}" if bad else f"got {text!r}"
        raise SystemExit(f"liteattn bench: --kernels: {why}; give 'auto' or a comma-separated list of distinct "
                         f"names from {list(KERNELS)}")
    return names


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


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"


def run(shapes: List[str], sparsities=SPARSITIES, seed: int = 0, include: str = "all", log=print,
        kernels=("triton",)) -> List[Dict]:
    """Time every backend on each shape; rows in measuring order, each logged as soon as it is measured.
    A kernel that fails on a shape (not registered, cannot compile, refuses the inputs) is logged and skipped
    there; the other backends still run."""
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

        def record(backend: str, sparsity, ms: float, write: bool = False, kernel: Optional[str] = None):
            row = dict(shape=name, B=B, H=H, S=S, D=D, backend=backend, kernel=kernel, sparsity=sparsity,
                       write=write, ms=ms, tflops=flops / ms / 1e9)
            rows.append(row)
            log(f"  {name:18s} {backend:22s} s={sparsity if sparsity is not None else '-':<5} "
                f"{ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s")

        failed = set()  # kernels that failed on this shape

        def lite(kernel: str, label: str, sparsity, fn, write: bool = False):
            if kernel in failed:
                return
            try:
                record(f"{kernel}-{label}", sparsity, _time(fn), write, kernel)
            except Exception as exc:  # noqa: BLE001 (one kernel's failure must not lose the other rows)
                failed.add(kernel)
                log(f"  {name:18s} {kernel}: unavailable, skipped on this shape ({_first_line(exc)})")

        log(f"{name}: B={B} H={H} S={S} D={D}")
        for label, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                    record(label, None, _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)))
            except RuntimeError as exc:
                log(f"  {label}: unavailable ({str(exc).splitlines()[0][:100]})")
        record("flex-dense", None, _time(lambda: flex(qt, kt, vt)))
        for kernel in kernels:
            lite(kernel, "dense", None, lambda: lite_attention(q, k, v, backend=kernel))

        for s in sparsities:
            read = random_lists(B, H, S, 128, s, seed, device)
            write = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), 128, 128, S, S)
            for kernel in kernels:
                lite(kernel, "read", s, lambda: lite_attention(q, k, v, read=read, backend=kernel))
                lite(kernel, "read+write", s, lambda: lite_attention(q, k, v, read=read, write=write, threshold=-10.0,
                                                                     backend=kernel), write=True)
            mask = read.to_block_mask()  # the same tiles, as full blocks
            record("flex-blockmask", s, _time(lambda: flex(qt, kt, vt, block_mask=mask)))
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    return rows


def row_kernel(row: Dict) -> Optional[str]:
    """The liteattn kernel of a row, None for SDPA / FlexAttention. Rows written before ``kernel`` existed
    (``liteattn-dense`` ...: the Triton kernel) count as kernel ``liteattn``."""
    if row.get("kernel"):
        return row["kernel"]
    return "liteattn" if row["backend"].startswith("liteattn-") else None


def table(rows: List[Dict]) -> str:
    """Markdown table: median ms, TFLOP/s (dense-counted) and ratio of time to cuDNN per shape."""
    cudnn = {r["shape"]: r["ms"] for r in rows if r["backend"] == "sdpa-cudnn"}
    lines = ["| shape | backend | sparsity | median ms | TFLOP/s (dense-counted) | speed vs cuDNN |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        s = "-" if r.get("sparsity") is None else f"{r['sparsity']:.0%}"
        ratio = cudnn[r["shape"]] / r["ms"] if r["shape"] in cudnn else float("nan")
        lines.append(f"| {r['shape']} | {r['backend']} | {s} | {r['ms']:.3f} | {r['tflops']:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def target_checks(rows: List[Dict], kernels=()) -> List[Dict]:
    """Issue 12's targets per shape and kernel: dicts (shape, kernel, target, value, measured, met).
    ``value`` is None (and ``met`` False) where a figure the target needs was not measured. ``kernels``: kernels
    that were asked for; one that left no row on a shape (it failed there) gets every target not measured."""
    checks = []

    def ms(shape, backend, sparsity=None):
        found = [r["ms"] for r in rows if r["shape"] == shape and r["backend"] == backend
                 and r.get("sparsity") == sparsity]
        return found[0] if found else None

    def ratio(num, den):
        return num / den if num and den else None

    for shape in dict.fromkeys(r["shape"] for r in rows):
        sparsities = list(dict.fromkeys(r["sparsity"] for r in rows if r["shape"] == shape
                                        and r.get("sparsity") is not None))
        found = [row_kernel(r) for r in rows if r["shape"] == shape and row_kernel(r)]
        for kernel in dict.fromkeys(found + list(kernels)):
            def check(target, value, met, shown):
                checks.append(dict(shape=shape, kernel=kernel, target=target, value=value,
                                   measured="not measured" if value is None else shown,
                                   met=value is not None and met))

            dense = ms(shape, f"{kernel}-dense")
            x = ratio(ms(shape, "sdpa-cudnn"), dense)
            check(f"dense >= {DENSE_VS_CUDNN:.1f}x cuDNN SDPA", x, x is not None and x >= DENSE_VS_CUDNN - _EPS,
                  f"{x:.3f}x" if x else "")
            x = ratio(ms(shape, "flex-dense"), dense)
            check(f"dense >= {VS_FLEX:.1f}x FlexAttention", x, x is not None and x >= VS_FLEX - _EPS,
                  f"{x:.3f}x" if x else "")
            for s in sparsities:
                x = ratio(ms(shape, "flex-blockmask", s), ms(shape, f"{kernel}-read", s))
                check(f"s={s:.0%}: >= {VS_FLEX:.1f}x FlexAttention (same block mask)", x,
                      x is not None and x >= VS_FLEX - _EPS, f"{x:.3f}x" if x else "")
            base = ms(shape, f"{kernel}-read", 0.0)
            for s in sparsities:
                if 0 < s <= SCALING_UP_TO + _EPS:
                    bound = 1 - s + SCALING_SLACK
                    x = ratio(ms(shape, f"{kernel}-read", s), base)
                    check(f"s={s:.0%}: time(s)/time(0) <= {bound:.2f}", x, x is not None and x <= bound + _EPS,
                          f"{x:.3f}" if x else "")
            for s in sparsities:
                x = ratio(ms(shape, f"{kernel}-read+write", s), ms(shape, f"{kernel}-read", s))
                cost = None if x is None else x - 1
                check(f"s={s:.0%}: writing the lists costs <= {WRITE_COST:.0%}", cost,
                      cost is not None and cost <= WRITE_COST + _EPS, f"{cost:+.1%}" if cost is not None else "")
    return checks


def targets(rows: List[Dict], kernels=()) -> str:
    """Issue 12's targets as a markdown table, per shape and kernel, each with its measured figure and met or not;
    then one line per (shape, kernel) counting the targets met."""
    checks = target_checks(rows, kernels)
    lines = ["| shape | kernel | target | measured | met |", "|---|---|---|---|---|"]
    lines += [f"| {c['shape']} | {c['kernel']} | {c['target']} | {c['measured']} | {'yes' if c['met'] else 'no'} |"
              for c in checks]
    groups = dict.fromkeys((c["shape"], c["kernel"]) for c in checks)
    for shape, kernel in groups:
        mine = [c["met"] for c in checks if (c["shape"], c["kernel"]) == (shape, kernel)]
        lines.append(f"| {shape} | {kernel} | all of the above | {sum(mine)} of {len(mine)} met | "
                     f"{'yes' if all(mine) else 'no'} |")
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
    kernels_arg = getattr(args, "kernels", "auto")
    if kernels_arg.strip() != "auto":
        parse_kernels(kernels_arg)  # refuse bad names before looking for a GPU
    if not torch.cuda.is_available():
        raise SystemExit(f"liteattn bench: it times liteattn's kernels on a CUDA GPU, and this torch "
                         f"({torch.__version__}) sees none")
    kernels = parse_kernels(kernels_arg, torch.device("cuda"))
    env = environment()
    print(f"liteattn bench on {env['card']} (torch {env['torch']}, triton {env['triton']}), bf16, "
          f"kernels {','.join(kernels)}")
    rows = run(shapes, sparsities, args.seed, kernels=kernels)
    print()
    print(table(rows))
    print()
    print(targets(rows, kernels))
    configs = {}
    try:
        from .backends.triton_launch import lite_attn_fwd

        configs = {str(key): str(cfg) for key, cfg in lite_attn_fwd.cache.items()}
    except Exception as exc:  # noqa: BLE001
        print(f"no autotuned Triton configs ({_first_line(exc)})")
    for key, cfg in configs.items():
        print(f"autotuned {key}: {cfg}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, kernels=kernels, rows=rows, configs=configs,
                           targets=target_checks(rows, kernels)), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0
