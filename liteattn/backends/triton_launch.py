"""Launcher of the Triton kernel: layout checks, descriptors, allocation and grid."""

from __future__ import annotations

import contextlib
import functools
import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .triton_kernel import compact_flags, expand_bits, lite_attn_fwd, pack_flags


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> a (B*S, H*D) view with unit last stride (a copy only when no such view exists): the 2-D
    layout both kernels' TMA descriptors read."""
    B, S, H, D = x.shape
    aligned = x.stride(1) * x.element_size() % 16 == 0 and x.data_ptr() % 16 == 0
    if not (x.stride(3) == 1 and x.stride(2) == D and (B == 1 or x.stride(0) == S * x.stride(1)) and aligned):
        x = x.contiguous()
    return x.as_strided((B * S, H * D), (x.stride(1), 1))


@functools.lru_cache(maxsize=8)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=device)


def triton_attention(q, k, v, read_indices, read_counts, write_indices, write_counts, must_do_k, must_do_q,
                     threshold, criterion: int, scale: float, tile_q: int, tile_k: int, return_lse: bool,
                     out=None, lse=None, lse_state=None, bits=None):
    """Launch the kernel. Lists are contiguous int32; must-do masks bool per tile; ``threshold`` a 0-d float32
    tensor (or None without a write list); ``criterion`` the kernel's id of the keep rule. Returns (out, lse).

    ``out`` (B, Sq, H, Dv) and ``lse`` (B, H, Sq) may be given, contiguous, to be written in place (the tests
    poison them to see that every element is written). ``lse_state`` (B, H, Sq) float32, contiguous: read (the
    previous call's LSE, for the mass rule) and overwritten with this call's. ``bits`` (B, H, Mq, W) int32, a
    SkipState's bitmask: expanded into ``read_indices`` / ``read_counts`` first, and the write flags (in
    ``write_indices``) packed back into it afterwards instead of compacted."""
    B, Sq, H, D = q.shape
    Sk, Dv = k.shape[1], v.shape[-1]
    mq, nk = -(-Sq // tile_q), -(-Sk // tile_k)
    if out is None:
        out = torch.empty(B, Sq, H, Dv, dtype=q.dtype, device=q.device)
    if lse is None and return_lse:
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    int_ph = _placeholder(q.device, torch.int32)
    q2, k2, v2 = rows_view(q), rows_view(k), rows_view(v)
    # Block shapes are set per autotune config by the kernel's pre-hook.
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [tile_q, D])
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [64, D])
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [64, Dv])
    grid = (mq, B * H)
    # Triton launches on the *current* CUDA device and stream: make that the inputs' device, or inputs on cuda:1
    # would be read by a kernel on cuda:0, unordered with cuda:1's stream.
    nk_pow2 = max(32, triton.next_power_of_2(nk))
    rows = B * H * mq
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if bits is not None:
            expand_bits[(rows,)](bits, read_indices, read_counts, nk, bits.shape[-1], NK_POW2=nk_pow2, num_warps=4)
        lite_attn_fwd[grid](
            q_desc, k_desc, v_desc,
            out, lse if lse is not None else _placeholder(q.device, torch.float32),
            lse_state if lse_state is not None else _placeholder(q.device, torch.float32),
            read_indices if read_indices is not None else int_ph,
            read_counts if read_counts is not None else int_ph,
            write_indices if write_indices is not None else int_ph,
            write_counts if write_counts is not None else int_ph,
            must_do_k.view(torch.uint8) if must_do_k is not None else _placeholder(q.device, torch.uint8),
            must_do_q.view(torch.uint8) if must_do_q is not None else _placeholder(q.device, torch.uint8),
            out.stride(0), out.stride(1), out.stride(2),
            Sq, Sk, H, mq, nk,
            scale * 1.4426950408889634,
            threshold if threshold is not None else _placeholder(q.device, torch.float32),
            HEAD_DIM=D, HEAD_DIM_V=Dv, TILE_Q=tile_q, TILE_K=tile_k,
            NK_POW2=triton.next_power_of_2(nk),
            READ_LIST=read_indices is not None, WRITE_LIST=write_indices is not None,
            HAS_MUST_DO_K=must_do_k is not None, HAS_MUST_DO_Q=must_do_q is not None,
            RETURN_LSE=return_lse, MASK_TAIL=Sk % tile_k != 0,
            USE_WHILE=q.device.type == "cpu",
            UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
            CRITERION=criterion, HAS_LSE_STATE=lse_state is not None,
        )
        if bits is not None:
            pack_flags[(rows,)](write_indices, bits, nk, bits.shape[-1], NK_POW2=nk_pow2, num_warps=4)
        elif write_indices is not None:
            compact_flags[(rows,)](write_indices, write_counts, nk, NK_POW2=triton.next_power_of_2(nk), num_warps=4)
    return out, lse
