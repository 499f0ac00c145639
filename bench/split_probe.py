"""Probe for issue 12 (bench/NOTES.md, "Where the dense core's time goes"): would smaller programs, two per SM, hide
the barrier stalls that one 8-warp program per SM cannot?

    python bench/split_probe.py            # CUDA; about a minute

The production kernel runs one program of BLOCK_M = tile_q = 128 rows and 8 warps (two warpgroups) per q-tile, and
uses ~230 KB of shared memory, so one program fills an SM and its two warpgroups stall together at the pipeline's
barriers (ncu: 2.86 cycles per issued instruction). A program of 64 rows and 4 warps (one warpgroup) with smaller
K/V stages fits twice on an SM: while one program runs its softmax the other can issue its GEMMs, the overlap that
FA3 gets from ping-pong. The skip decisions need no cross-row reduction (each row sets the tile's flag), so two
programs can share one 128-row q-tile of the skip lists.

This script times only the dense core: the same online softmax as `liteattn/backends/triton_kernel.py`
(`_attend_k_tile`: exp2, the scale folded in, TMA descriptors over the (B*S, H*D) view), with no lists, for each
(BLOCK_M, BLOCK_N, warps, stages), beside the production kernel and cuDNN SDPA in the same process, and checks each
probe's output against SDPA. It changes nothing in the package.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SHAPES = {"wan2.1-1.3b-480p": (1, 12, 32760, 128), "wan2.1-14b-720p": (1, 40, 75600, 128),
          "cogvideox-5b": (1, 48, 17776, 64)}
CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages)
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3),
    (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4),
]


@triton.jit
def _block(acc, l_i, m_i, q, k_desc, v_desc, kv_row, n0, h, seq, qk_scale, HEAD_DIM: tl.constexpr,
           BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Online softmax over the BLOCK_N keys from ``n0``; MASK: the ragged tail (columns past ``seq``)."""
    k = k_desc.load([kv_row + n0, h * HEAD_DIM])
    qk = tl.dot(q, tl.trans(k))
    if MASK:
        qk = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < seq, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = v_desc.load([kv_row + n0, h * HEAD_DIM])
    return tl.dot(p.to(v.dtype), v, acc), l_i, m_new


@triton.jit
def _dense_probe(q_desc, k_desc, v_desc, o_ptr, stride_ob, stride_os, stride_oh, seq, num_heads, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_row = b * seq + pid_m * BLOCK_M
    kv_row = b * seq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = q_desc.load([q_row, h * HEAD_DIM])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = seq // BLOCK_N
    for j in tl.range(0, n_full, num_stages=STAGES):
        acc, l_i, m_i = _block(acc, l_i, m_i, q, k_desc, v_desc, kv_row, j * BLOCK_N, h, seq, qk_scale, HEAD_DIM,
                               BLOCK_N, False)
    if n_full * BLOCK_N < seq:  # the ragged tail, masked
        acc, l_i, m_i = _block(acc, l_i, m_i, q, k_desc, v_desc, kv_row, n_full * BLOCK_N, h, seq, qk_scale,
                               HEAD_DIM, BLOCK_N, True)
    out = acc / l_i[:, None]
    cols_v = tl.arange(0, HEAD_DIM)
    offs = (b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows.to(tl.int64)[:, None] * stride_os
            + cols_v[None, :])
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=(rows < seq)[:, None])


def probe(q, k, v, block_m, block_n, warps, stages):
    B, S, H, D = q.shape
    out = torch.full_like(q, float("nan"))
    views = [x.as_strided((B * S, H * D), (x.stride(1), 1)) for x in (q, k, v)]
    qd = TensorDescriptor(views[0], list(views[0].shape), list(views[0].stride()), [block_m, D])
    kd = TensorDescriptor(views[1], list(views[1].shape), list(views[1].stride()), [block_n, D])
    vd = TensorDescriptor(views[2], list(views[2].shape), list(views[2].stride()), [block_n, D])
    grid = (triton.cdiv(S, block_m), B * H)
    _dense_probe[grid](qd, kd, vd, out, out.stride(0), out.stride(1), out.stride(2), S, H,
                       D ** -0.5 * 1.4426950408889634, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                       num_warps=warps, num_stages=stages)
    return out


def main(argv=None) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from liteattn import lite_attention
    from liteattn.bench import _time

    if not torch.cuda.is_available():
        raise SystemExit("bench/split_probe.py needs a CUDA GPU")
    names = (argv or sys.argv[1:]) or ["wan2.1-1.3b-480p", "cogvideox-5b", "wan2.1-14b-720p"]
    print(f"split_probe on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | kernel | BLOCK_M | BLOCK_N | warps | stages | ms | vs cuDNN (time ratio cuDNN/this) | max abs err vs SDPA |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        B, H, S, D = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            cudnn = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        prod = _time(lambda: lite_attention(q, k, v, backend="triton"))
        print(f"| {name} | cuDNN SDPA | | | | | {cudnn:.3f} | 1.000 | |")
        print(f"| {name} | liteattn (autotuned) | 128 | | | | {prod:.3f} | {cudnn / prod:.3f} | |", flush=True)
        configs = CONFIGS if name != "wan2.1-14b-720p" else [c for c in CONFIGS if c[2] == 8][:1] + [
            c for c in CONFIGS if c[2] == 4][:3]
        for bm, bn, w, st in configs:
            try:
                out = probe(q, k, v, bm, bn, w, st)
                err = (out.float() - ref.float()).abs().max().item()
                ms = _time(lambda: probe(q, k, v, bm, bn, w, st))
            except Exception as exc:  # out of shared memory, etc.: report and go on
                print(f"| {name} | probe | {bm} | {bn} | {w} | {st} | failed: {str(exc).splitlines()[0][:60]} | | |")
                continue
            print(f"| {name} | probe | {bm} | {bn} | {w} | {st} | {ms:.3f} | {cudnn / ms:.3f} | {err:.2e} |",
                  flush=True)
        del q, k, v, qt, kt, vt, ref
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
