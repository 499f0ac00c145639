"""Launcher of the Hopper kernel (``gluon_hopper.py``): descriptors, the list passes around it, the grid.

- :func:`gluon_attention` has the contract of :func:`.triton_launch.triton_attention` (the op in ``liteattn/ops.py``
  calls one or the other): read list or dense, write flags compacted by the Triton kernel's ``compact_flags``, or a
  ``SkipState``'s bitmask expanded before and packed after (``expand_bits`` / ``pack_flags``), ``lse_state``, the
  LSE, must-do tiles. It always runs the ping-pong consumers (3 stages).
- :func:`attention` is the direct entry for checks and benchmarks (``SkipList`` in and out; the step-1 consumers
  with ``pingpong=False``).
- :func:`compile_for_sm90` compiles the kernel for sm_90 without a GPU (Triton's own ptxas), for the CPU tests.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
from triton.experimental.gluon import language as gl

from .gluon_hopper import ROWS_PER_CONSUMER, TILE_Q, _attn_fwd_ws
from .triton_kernel import compact_flags, expand_bits, pack_flags
from .triton_launch import rows_view

TILE_K = 128
PINGPONG_STAGES = 3
_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def _shared_layout(rows: int, cols: int, dtype: torch.dtype):
    """The swizzled shared-memory layout of a TMA block (~11 us to build: once per block shape, not per call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], {torch.bfloat16: gl.bfloat16,
                                                              torch.float16: gl.float16}[dtype])


def descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int):
    """Host TMA descriptors over the (B*S, H*D) row views of (B, S, H, D) inputs (a copy only when the layout has
    no such view; the descriptor keeps it alive)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    out = []
    for x, rows in ((q, ROWS_PER_CONSUMER.value), (k, block_n), (v, block_n)):
        view = rows_view(x)
        out.append(TensorDescriptor(view, list(view.shape), list(view.stride()), [rows, x.shape[-1]],
                                    _shared_layout(rows, x.shape[-1], q.dtype)))
    return out


def gluon_attention(q, k, v, read_indices, read_counts, write_indices, write_counts, must_do_k, must_do_q,
                    threshold, criterion: int, scale: float, tile_q: int, tile_k: int, return_lse: bool,
                    out=None, lse=None, lse_state=None, bits=None, pingpong: bool = True, stages: int = None):
    """Launch the Hopper kernel; the arguments are :func:`.triton_launch.triton_attention`'s (its docstring).
    ``tile_q`` must be 128 and ``tile_k`` the K/V block (128 from the backend registry). Returns (out, lse)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if tile_q != TILE_Q:
        raise ValueError(f"the Hopper kernel's q-tile is {TILE_Q} rows, got tile_q={tile_q}")
    mq, nk = triton.cdiv(Sq, tile_q), triton.cdiv(Sk, tile_k)
    if out is None:
        out = torch.empty(B, Sq, H, v.shape[-1], dtype=q.dtype, device=q.device)
    if lse is None and return_lse:
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    q_desc, k_desc, v_desc = descriptors(q, k, v, tile_k)
    rows, nk_pow2 = B * H * mq, max(32, triton.next_power_of_2(nk))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if bits is not None:
            expand_bits[(rows,)](bits, read_indices, read_counts, nk, bits.shape[-1], NK_POW2=nk_pow2, num_warps=4)
        if write_indices is not None:
            write_indices.zero_()  # both consumers set flags in one row: zeroed before the launch, not by a program
        _attn_fwd_ws[(mq, B * H)](
            q_desc, k_desc, v_desc, out, out.stride(1), out.stride(2), out.stride(0), Sq, Sk, H, mq, nk,
            scale * _LOG2E, read_indices, read_counts, write_indices,
            threshold if write_indices is not None else None, lse, lse_state,
            None if must_do_k is None else must_do_k.view(torch.uint8),
            None if must_do_q is None else must_do_q.view(torch.uint8),
            STAGES=stages or (PINGPONG_STAGES if pingpong else 2), PINGPONG=bool(pingpong), CRITERION=criterion,
            num_warps=4, maxnreg=168)
        if bits is not None:
            pack_flags[(rows,)](write_indices, bits, nk, bits.shape[-1], NK_POW2=nk_pow2, num_warps=4)
        elif write_indices is not None:
            compact_flags[(rows,)](write_indices, write_counts, nk, NK_POW2=triton.next_power_of_2(nk), num_warps=4)
    return out, lse


def _check_list(name, lst, shape, block_n):
    if (lst.tile_q, lst.tile_k) != (TILE_Q, block_n) or tuple(lst.shape) != shape:
        raise ValueError(f"{name} list of tiles ({lst.tile_q}, {lst.tile_k}) and shape {tuple(lst.shape)}; this call "
                         f"needs tiles ({TILE_Q}, {block_n}) and shape {shape}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, read=None, write=None, *, threshold: float = -10.0,
              criterion: str = "max", lse_state=None, return_lse: bool = False, must_do_k=None, must_do_q=None,
              scale=None, block_n: int = TILE_K, stages: int = 2, pingpong: bool = False, out=None):
    """``out (B, Sq, H, D)`` of dense attention, or over a read list (``SkipList`` with 128-row q-tiles and
    ``block_n``-wide k-tiles). CUDA sm_90, fp16/bf16 (B, S, H, D), D = V's D in {64, 128}. ``out``: a contiguous
    buffer like ``q`` to write into (checks poison it first). ``pingpong``: the consumers of steps 2-3 (use
    ``stages=3``), the ones the backend registry runs; only they take ``write`` (a ``SkipList`` that receives the
    tiles the keep rule ``criterion``, "max" or "mass", keeps at ``threshold``), ``lse_state`` (float32 (B, H, Sq):
    read as the previous call's LSE, overwritten with this call's), ``return_lse`` (returns ``(out, lse)``) and
    ``must_do_k`` / ``must_do_q`` (bool masks per k-tile / q-tile whose tiles the write list always keeps)."""
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        raise ValueError("the Gluon kernel runs on Hopper (sm_90) CUDA devices only")
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"the Gluon kernel takes float16 or bfloat16 q, k, v of one dtype, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if D not in (64, 128) or v.shape[-1] != D or k.shape != (B, Sk, H, D) or v.shape != k.shape:
        raise ValueError(f"the Gluon kernel takes q (B, Sq, H, D), k and v (B, Sk, H, D) with D in (64, 128), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    shape = (B, H, triton.cdiv(Sq, TILE_Q), triton.cdiv(Sk, block_n))
    if (write is not None or lse_state is not None or return_lse or must_do_k is not None or must_do_q is not None
            ) and not pingpong:
        raise ValueError("write lists, must-do tiles and LSEs are in the ping-pong consumers only: pass pingpong=True")
    for name, mask, n in (("must_do_k", must_do_k, shape[3]), ("must_do_q", must_do_q, shape[2])):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (n,) or mask.device != q.device):
            raise ValueError(f"{name} must be a bool tensor of shape ({n},) on {q.device}, one entry per tile")
    if criterion not in ("max", "mass"):
        raise ValueError(f"criterion must be 'max' or 'mass', got {criterion!r}")
    for name, lst in (("read", read), ("write", write)):
        if lst is not None:
            _check_list(name, lst, shape, block_n)
    if lse_state is not None and (lse_state.shape != (B, H, Sq) or lse_state.dtype != torch.float32
                                  or not lse_state.is_contiguous() or lse_state.device != q.device):
        raise ValueError(f"lse_state must be a contiguous float32 (B, H, Sq) = {(B, H, Sq)} tensor on {q.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    thr = None if write is None else torch.tensor(float(threshold), dtype=torch.float32, device=q.device)
    out, lse = gluon_attention(
        q, k, v, None if read is None else read.kv_indices, None if read is None else read.kv_counts,
        None if write is None else write.kv_indices, None if write is None else write.kv_counts, must_do_k,
        must_do_q, thr, 0 if criterion == "max" else 1, D ** -0.5 if scale is None else scale, TILE_Q, block_n,
        return_lse, out=out, lse_state=lse_state, pingpong=pingpong, stages=stages)
    return (out, lse) if return_lse else out


def compile_for_sm90(head_dim: int = 128, lists: bool = False, pingpong: bool = False, stages: int = None,
                     write: bool = False, criterion: int = 0, lse: bool = False, must_do: bool = False):
    """Compile the kernel for sm_90 without a GPU (Triton's own ptxas), for checks and register/shared-memory
    reports: returns the ``CompiledKernel`` (``.asm["ptx"]``, ``.metadata.shared``). Triton's interpreter must be
    off in this process (``TRITON_INTERPRET`` unset when triton was imported), or Gluon cannot call Triton's
    standard functions."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    x = torch.zeros(1, 256, 2, head_dim, dtype=torch.bfloat16)
    q_desc, k_desc, v_desc = descriptors(x, x, x, TILE_K)
    signature = {"q_desc": mangle_type(q_desc), "k_desc": mangle_type(k_desc), "v_desc": mangle_type(v_desc),
                 "o_ptr": "*bf16", "stride_os": "i32", "stride_oh": "i32", "stride_ob": "i32", "seq_q": "i32",
                 "seq_k": "i32", "num_heads": "i32", "num_q_tiles": "i32", "num_k_tiles": "i32", "qk_scale": "fp32",
                 "STAGES": "constexpr", "PINGPONG": "constexpr", "CRITERION": "constexpr"}
    constants = {"STAGES": stages or (PINGPONG_STAGES if pingpong else 2), "PINGPONG": bool(pingpong),
                 "CRITERION": criterion}
    for name, given, kind in (("read_idx_ptr", lists, "*i32"), ("read_cnt_ptr", lists, "*i32"),
                              ("flags_ptr", write, "*i32"), ("threshold_ptr", write, "*fp32"),
                              ("lse_ptr", lse, "*fp32"), ("lse_state_ptr", lse, "*fp32"),
                              ("must_k_ptr", must_do, "*u8"), ("must_q_ptr", must_do, "*u8")):
        signature[name] = kind if given else "constexpr"
        if not given:
            constants[name] = None
    source = GluonASTSource(_attn_fwd_ws, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 168})
