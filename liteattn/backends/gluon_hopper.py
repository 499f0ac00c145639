"""Kernel v2 for Hopper (issue 12), in Gluon: work in progress, not registered as a backend, used by no path.

Status (2026-11-28): compile-checked on the CPU for sm_90 (tests/test_gluon_hopper.py builds the cubin with ptxas),
and **correct on its first GPU run** (H200, `bench/gluon_check.py`): dense against float64 SDPA (D 64 and 128,
fp16 and bf16, ragged lengths, Sq != Sk) and over random read lists against the Triton kernel (bit-identical at
D=128, within bf16 rounding at D=64). **Its speed is not measured yet**: the call's time budget ran out while it
was timed. bench/NOTES.md ("Where the dense core's time goes") says why it exists and
what each step should recover. This first version is step 1 of that plan:

- one CTA per (128-row q-tile, batch*head), 12 warps in three partitions:
  a **producer** (1 warp, 24 registers) walks the q-tile's read list (or every k-tile) and issues the K and V TMA
  loads into a ring of ``STAGES`` shared-memory stages, each with a "ready" mbarrier (TMA bytes) and an "empty"
  mbarrier (two arrivals: one per consumer);
- two **consumers** (4 warps = one warpgroup each: the default partition and a worker) each own 64 of the 128 rows.
  Each runs the online softmax of ``liteattn/backends/triton_kernel.py`` (exp2, scale folded in, the ragged last
  k-tile masked) with asynchronous ``warpgroup_mma``: S = Q K^T from shared memory, then O += P V with P in
  registers. A consumer waits only on the ring's barriers. No CTA-wide barrier sits in the loop, so each
  warpgroup's softmax can run while the other issues its GEMMs.
- ``pingpong=True`` (steps 2 and 3, :func:`_consumer_pingpong`; compiled, **not yet run on a GPU**): the two
  warpgroups take turns at the tensor cores through a pair of "turn" mbarriers, and each issues S_i = Q K_i^T
  together with the lagged O += P_(i-1) V_(i-1) before it hands the turn over and runs its softmax. Three stages
  (224 KB of shared memory at D=128).

The ping-pong consumers also write the next list (each row that keeps a tile sets its flag, as in the Triton
kernel; the launcher zeroes the flags and compacts them with the Triton kernel's ``compact_flags``) under either
keep rule, read and write the previous LSE (``lse_state``) and return the LSE: compiled, not yet run on a GPU
(``bench/gluon_check.py`` compares them with the Triton kernel), and keep must-do tiles (per k-tile and per
q-tile masks). Not in yet: the bitmask state path. The launcher refuses what is missing (ValueError). Once it is checked against the oracle on the GPU and measured against cuDNN, it joins the backend
registry as the sm_90 path; the Triton kernel stays the portable one.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

ROWS_PER_CONSUMER = gl.constexpr(64)  # one warpgroup's wgmma M
TILE_Q = 2 * ROWS_PER_CONSUMER.value


@gluon.constexpr_function
def _mma_layout(n):
    """One warpgroup's wgmma accumulator layout for an output ``n`` columns wide."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _q_tile(num_heads, num_q_tiles, num_k_tiles, read_cnt_ptr):
    """This program's (q-tile, batch, head), its row of the lists and how many k-tiles it reads."""
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    row = pid_bh.to(gl.int64) * num_q_tiles + pid_m
    count = num_k_tiles
    if read_cnt_ptr is not None:
        count = gl.load(read_cnt_ptr + row)
    return pid_m, pid_bh, pid_bh // num_heads, pid_bh % num_heads, row, count


@gluon.jit
def _store_out(acc, l_i, o_ptr, stride_os, stride_oh, stride_ob, seq_q, pid_m, b, h, which: gl.constexpr,
               M: gl.constexpr):
    """O / l into the output rows of this warpgroup; rows that read no tile (l = 0) give 0, as the other backends."""
    o_layout: gl.constexpr = acc.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
    rows = pid_m * (2 * M) + which * M + gl.arange(0, M, layout=row_o)
    dims = gl.arange(0, acc.type.shape[1], layout=gl.SliceLayout(0, o_layout))
    offs = (b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
            + gl.expand_dims(rows.to(gl.int64) * stride_os, 1) + gl.expand_dims(dims, 0))
    gl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(rows < seq_q, 1))


@gluon.jit
def _masked_scores(scores, j, seq_k, cols, BLOCK_N: gl.constexpr):
    """The ragged last k-tile: columns past seq_k (the next batch's rows) get -inf."""
    if (j + 1) * BLOCK_N > seq_k:
        scores = gl.where(gl.expand_dims(j * BLOCK_N + cols < seq_k, 0), scores, float("-inf"))
    return scores


@gluon.jit
def _producer(p, which: gl.constexpr):
    """1 warp: the K/V loads of the q-tile's k-tiles, in list order, into the ring."""
    (q_desc, k_desc, v_desc, o_ptr, stride_os, stride_oh, stride_ob, seq_q, seq_k, num_heads, num_q_tiles,
     num_k_tiles, qk_scale, read_idx_ptr, read_cnt_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn,
     flags_ptr, threshold_ptr, lse_ptr, lse_state_ptr, must_k_ptr, must_q_ptr, CRITERION) = p
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    pid_m, pid_bh, b, h, row, count = _q_tile(num_heads, num_q_tiles, num_k_tiles, read_cnt_ptr)
    kv_row = b * seq_k
    for i in range(count):
        j = i
        if read_idx_ptr is not None:
            j = gl.load(read_idx_ptr + row * num_k_tiles + i)
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(empty.index(s), phase ^ 1)  # a fresh barrier counts as completed phase 1
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, h * HEAD_DIM], ready.index(s), k_smem.index(s))
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, h * HEAD_DIM], ready.index(s), v_smem.index(s))


@gluon.jit
def _consumer(p, which: gl.constexpr):
    """One warpgroup: rows ``which * 64 ... + 63`` of the q-tile, online softmax over the ring's k-tiles."""
    (q_desc, k_desc, v_desc, o_ptr, stride_os, stride_oh, stride_ob, seq_q, seq_k, num_heads, num_q_tiles,
     num_k_tiles, qk_scale, read_idx_ptr, read_cnt_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn,
     flags_ptr, threshold_ptr, lse_ptr, lse_state_ptr, must_k_ptr, must_q_ptr, CRITERION) = p
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    M: gl.constexpr = ROWS_PER_CONSUMER
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    pid_m, pid_bh, b, h, row, count = _q_tile(num_heads, num_q_tiles, num_k_tiles, read_cnt_ptr)

    q_half = q_smem.index(which)
    mbarrier.wait(q_bar.index(which), 0)

    m_i = gl.full([M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([M], 0.0, gl.float32, row_s)
    acc = gl.zeros([M, HEAD_DIM], gl.float32, o_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    for i in range(count):
        j = i
        if read_idx_ptr is not None:
            j = gl.load(read_idx_ptr + row * num_k_tiles + i)
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        k_tile = k_smem.index(s)
        v_tile = v_smem.index(s)
        scores = gl.zeros([M, BLOCK_N], gl.float32, s_layout)
        scores = warpgroup_mma(q_half, k_tile.permute((1, 0)), scores, use_acc=False, is_async=True)
        scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores,))
        scores = _masked_scores(scores, j, seq_k, cols, BLOCK_N)
        m_new = gl.maximum(m_i, gl.max(scores, axis=1) * qk_scale)
        probs = gl.exp2(scores * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(probs, axis=1)
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(probs.to(v_desc.dtype), p_layout)
        acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(s), count=1)

    _store_out(acc, l_i, o_ptr, stride_os, stride_oh, stride_ob, seq_q, pid_m, b, h, which, M)


@gluon.jit
def _keep_rows(tile_max, m_prev, tile_l, m_new, l_new, lse_prev, threshold, CRITERION: gl.constexpr):
    """The keep rule per row, as ``triton_kernel._keep`` (docs/DESIGN.md section 4; log2 units): 0 "max", does the
    tile raise the running max by more than ``threshold``; 1 "mass", does it hold more than 2**threshold of the
    row's mass, against the previous call's LSE (NaN: this call's running one). A row's first tile is kept."""
    if CRITERION == 0:
        keep = ((tile_max - m_prev) > threshold) | (m_prev == float("-inf"))
    else:
        reference = gl.where(lse_prev == lse_prev, lse_prev, m_new + gl.log2(l_new))
        mass = gl.maximum(gl.log2(tile_l) + m_new - reference, -3.0e38)
        keep = (mass > threshold) | (m_prev == float("-inf"))
    return keep


@gluon.jit
def _consumer_pingpong(p, which: gl.constexpr):
    """Steps 2 and 3 of bench/NOTES.md: as :func:`_consumer`, but the two warpgroups take turns at the tensor
    cores and each overlaps its softmax with the other's GEMMs (FA3's ping-pong). Per k-tile ``i`` a warpgroup
    waits for its turn, issues S_i = Q K_i^T and O += P_(i-1) V_(i-1) back to back, hands the turn over, waits
    for both, releases stage ``i-1`` (its V was the last use), then runs the softmax of S_i and rescales O. The
    P V product lags one k-tile (intra-warpgroup overlap), so a stage stays in use for two iterations: run it with
    3 stages. Not yet run on a GPU."""
    (q_desc, k_desc, v_desc, o_ptr, stride_os, stride_oh, stride_ob, seq_q, seq_k, num_heads, num_q_tiles,
     num_k_tiles, qk_scale, read_idx_ptr, read_cnt_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn,
     flags_ptr, threshold_ptr, lse_ptr, lse_state_ptr, must_k_ptr, must_q_ptr, CRITERION) = p
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    M: gl.constexpr = ROWS_PER_CONSUMER
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    pid_m, pid_bh, b, h, row, count = _q_tile(num_heads, num_q_tiles, num_k_tiles, read_cnt_ptr)

    q_half = q_smem.index(which)
    rows_s = pid_m * (2 * M) + which * M + gl.arange(0, M, layout=row_s)
    valid_s = rows_s < seq_q
    threshold = 0.0
    if flags_ptr is not None:
        threshold = gl.load(threshold_ptr)
    lse_prev = gl.full([M], float("nan"), gl.float32, row_s)
    if lse_state_ptr is not None:  # the previous call's LSE of these rows (NaN: none), natural log -> log2 units
        lse_prev = gl.load(lse_state_ptr + pid_bh.to(gl.int64) * seq_q + rows_s, mask=valid_s,
                           other=float("nan")) * 1.4426950408889634
    ones = gl.full([M], 1, gl.int32, row_s)
    keep_all = False  # must-do queries: this q-tile keeps every tile it reads
    if must_q_ptr is not None:
        keep_all = gl.load(must_q_ptr + pid_m) != 0
    mbarrier.wait(q_bar.index(which), 0)
    if which == 0:  # warpgroup 0 takes the first turn
        mbarrier.arrive(turn.index(0), count=1)

    m_i = gl.full([M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([M], 0.0, gl.float32, row_s)
    acc = gl.zeros([M, HEAD_DIM], gl.float32, o_layout)
    p_op = gl.zeros([M, BLOCK_N], v_desc.dtype, p_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    if count > 0:  # k-tile 0: S only (there is no P V to lag yet)
        j = 0
        if read_idx_ptr is not None:
            j = gl.load(read_idx_ptr + row * num_k_tiles)
        mbarrier.wait(ready.index(0), 0)
        mbarrier.wait(turn.index(which), 0)
        scores = gl.zeros([M, BLOCK_N], gl.float32, s_layout)
        scores = warpgroup_mma(q_half, k_smem.index(0).permute((1, 0)), scores, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - which), count=1)
        scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores,))
        scores = _masked_scores(scores, j, seq_k, cols, BLOCK_N)
        m_i = gl.max(scores, axis=1) * qk_scale
        probs = gl.exp2(scores * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(probs, axis=1)
        p_op = gl.convert_layout(probs.to(v_desc.dtype), p_layout)
        if flags_ptr is not None:  # a row's first tile is always kept
            gl.store(flags_ptr + row * num_k_tiles + j + gl.zeros([M], gl.int64, row_s), ones, mask=valid_s)
    for i in range(1, count):
        j = i
        if read_idx_ptr is not None:
            j = gl.load(read_idx_ptr + row * num_k_tiles + i)
        s = i % STAGES
        prev = (i + STAGES - 1) % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        mbarrier.wait(turn.index(which), i & 1)
        scores = gl.zeros([M, BLOCK_N], gl.float32, s_layout)
        scores = warpgroup_mma(q_half, k_smem.index(s).permute((1, 0)), scores, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)  # O += P_(i-1) V_(i-1)
        mbarrier.arrive(turn.index(1 - which), count=1)
        scores, acc = warpgroup_mma_wait(num_outstanding=0, deps=(scores, acc))
        mbarrier.arrive(empty.index(prev), count=1)  # K_(i-1) and V_(i-1) are done with
        scores = _masked_scores(scores, j, seq_k, cols, BLOCK_N)
        tile_max = gl.max(scores, axis=1) * qk_scale
        m_new = gl.maximum(m_i, tile_max)
        probs = gl.exp2(scores * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        tile_l = gl.sum(probs, axis=1)
        l_new = l_i * alpha + tile_l
        if flags_ptr is not None:  # each row that keeps the tile sets its flag: no cross-row reduction
            keep = _keep_rows(tile_max, m_i, tile_l, m_new, l_new, lse_prev, threshold, CRITERION) & valid_s
            must = keep_all
            if must_k_ptr is not None:  # must-do keys: their tiles are always kept
                must = must | (gl.load(must_k_ptr + j) != 0)
            gl.store(flags_ptr + row * num_k_tiles + j + gl.zeros([M], gl.int64, row_s), ones,
                     mask=keep | (valid_s & must))
        l_i = l_new
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(probs.to(v_desc.dtype), p_layout)
    if count > 0:  # the last tile's P V, and its stage back to the producer
        last = (count - 1) % STAGES
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(last), count=1)

    _store_out(acc, l_i, o_ptr, stride_os, stride_oh, stride_ob, seq_q, pid_m, b, h, which, M)
    if (lse_ptr is not None) or (lse_state_ptr is not None):
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453  # log2 units back to natural log; -inf for empty rows
        lse_offs = pid_bh.to(gl.int64) * seq_q + rows_s
        if lse_ptr is not None:
            gl.store(lse_ptr + lse_offs, lse, mask=valid_s)
        if lse_state_ptr is not None:  # read above by this warpgroup only: overwriting it now is safe
            gl.store(lse_state_ptr + lse_offs, lse, mask=valid_s)


@gluon.jit
def _attn_fwd_ws(q_desc, k_desc, v_desc, o_ptr, stride_os, stride_oh, stride_ob, seq_q, seq_k, num_heads,
                 num_q_tiles, num_k_tiles, qk_scale, read_idx_ptr, read_cnt_ptr, flags_ptr, threshold_ptr, lse_ptr,
                 lse_state_ptr, must_k_ptr, must_q_ptr, STAGES: gl.constexpr, PINGPONG: gl.constexpr = False,
                 CRITERION: gl.constexpr = 0):
    M: gl.constexpr = ROWS_PER_CONSUMER
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong: whose GEMMs are next
    for c in gl.static_range(2):
        mbarrier.init(q_bar.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # both consumers release a stage

    # Q: each consumer's 64 rows, loaded once before the partitions split.
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    q_row = (pid_bh // num_heads) * seq_q + pid_m * (2 * M)
    q_col = (pid_bh % num_heads) * HEAD_DIM
    for c in gl.static_range(2):
        mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + c * M, q_col], q_bar.index(c), q_smem.index(c))

    p = (q_desc, k_desc, v_desc, o_ptr, stride_os, stride_oh, stride_ob, seq_q, seq_k, num_heads, num_q_tiles,
         num_k_tiles, qk_scale, read_idx_ptr, read_cnt_ptr, q_smem, k_smem, v_smem, q_bar, ready, empty, turn,
         flags_ptr, threshold_ptr, lse_ptr, lse_state_ptr, must_k_ptr, must_q_ptr, CRITERION)
    if PINGPONG:
        gl.warp_specialize([
            (_consumer_pingpong, (p, 0)),
            (_consumer_pingpong, (p, 1)),
            (_producer, (p, 0)),
        ], [4, 1], [240, 24])
    else:
        gl.warp_specialize([
            (_consumer, (p, 0)),
            (_consumer, (p, 1)),
            (_producer, (p, 0)),
        ], [4, 1], [240, 24])


def descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int):
    """Host TMA descriptors over the (B*S, H*D) views of (B, S, H, D) inputs (contiguous rows, 16-byte aligned)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]
    out = []
    for x, block in ((q, [ROWS_PER_CONSUMER.value, q.shape[-1]]), (k, [block_n, k.shape[-1]]), (v, [block_n, v.shape[-1]])):
        B, S, H, D = x.shape
        view = x.as_strided((B * S, H * D), (x.stride(1), 1))
        out.append(TensorDescriptor(view, list(view.shape), list(view.stride()), block,
                                    gl.NVMMASharedLayout.get_default_for(block, dtype)))
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, read=None, write=None, *, threshold: float = -10.0,
              criterion: str = "max", lse_state=None, return_lse: bool = False, must_do_k=None, must_do_q=None,
              scale=None, block_n: int = 128, stages: int = 2, pingpong: bool = False, out=None):
    """``out (B, Sq, H, D)`` of dense attention, or over a read list (``SkipList`` with 128-row q-tiles and
    ``block_n``-wide k-tiles). CUDA, sm_90, fp16/bf16, contiguous (B, S, H, D), D = V's D in {64, 128}. ``out``:
    a contiguous buffer like ``q`` to write into (checks poison it first). ``pingpong``: the consumers of
    :func:`_consumer_pingpong` (steps 2-3; use ``stages=3``).

    With ``pingpong`` only (not yet run on a GPU): ``write`` (a ``SkipList`` of the read list's shape) receives the
    tiles the keep rule ``criterion`` ("max" or "mass") keeps at ``threshold`` (flags, compacted by the Triton
    kernel's ``compact_flags``); ``lse_state`` (float32 (B, H, Sq)) is read as the previous call's LSE and
    overwritten with this call's; ``return_lse`` returns ``(out, lse)``; ``must_do_k`` / ``must_do_q``: bool masks
    per k-tile / q-tile (as ``lite_attention`` builds them from token ranges) whose tiles the write list always
    keeps."""
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
    if not all(x.is_contiguous() for x in (q, k, v)):
        raise ValueError("the Gluon kernel takes contiguous q, k, v")
    num_q_tiles, num_k_tiles = triton.cdiv(Sq, TILE_Q), triton.cdiv(Sk, block_n)
    idx = cnt = None
    if read is not None:
        if (read.tile_q, read.tile_k) != (TILE_Q, block_n) or tuple(read.shape) != (B, H, num_q_tiles, num_k_tiles):
            raise ValueError(f"read list of tiles ({read.tile_q}, {read.tile_k}) and shape {tuple(read.shape)}; "
                             f"this call needs tiles ({TILE_Q}, {block_n}) and shape "
                             f"{(B, H, num_q_tiles, num_k_tiles)}")
        idx, cnt = read.kv_indices, read.kv_counts
    if (write is not None or lse_state is not None or return_lse or must_do_k is not None or must_do_q is not None
            ) and not pingpong:
        raise ValueError("write lists, must-do tiles and LSEs are in the ping-pong consumers only: pass pingpong=True")
    for name, mask, n in (("must_do_k", must_do_k, num_k_tiles), ("must_do_q", must_do_q, num_q_tiles)):
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (n,) or mask.device != q.device):
            raise ValueError(f"{name} must be a bool tensor of shape ({n},) on {q.device}, one entry per tile")
    if criterion not in ("max", "mass"):
        raise ValueError(f"criterion must be 'max' or 'mass', got {criterion!r}")
    flags = thr = lse = None
    if write is not None:
        if (write.tile_q, write.tile_k) != (TILE_Q, block_n) or tuple(write.shape) != (B, H, num_q_tiles, num_k_tiles):
            raise ValueError(f"write list of tiles ({write.tile_q}, {write.tile_k}) and shape {tuple(write.shape)}; "
                             f"this call needs tiles ({TILE_Q}, {block_n}) and shape "
                             f"{(B, H, num_q_tiles, num_k_tiles)}")
        flags = write.kv_indices
        flags.zero_()  # both consumers set flags in one row: zeroed before the launch, not by a program
        thr = torch.tensor(float(threshold), dtype=torch.float32, device=q.device)
    if lse_state is not None and (lse_state.shape != (B, H, Sq) or lse_state.dtype != torch.float32
                                  or not lse_state.is_contiguous() or lse_state.device != q.device):
        raise ValueError(f"lse_state must be a contiguous float32 (B, H, Sq) = {(B, H, Sq)} tensor on {q.device}")
    if return_lse:
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    q_desc, k_desc, v_desc = descriptors(q, k, v, block_n)
    scale = D ** -0.5 if scale is None else scale
    _attn_fwd_ws[(num_q_tiles, B * H)](
        q_desc, k_desc, v_desc, out, out.stride(1), out.stride(2), out.stride(0), Sq, Sk, H, num_q_tiles,
        num_k_tiles, scale * 1.4426950408889634, idx, cnt, flags, thr, lse, lse_state,
        None if must_do_k is None else must_do_k.view(torch.uint8),
        None if must_do_q is None else must_do_q.view(torch.uint8), STAGES=stages,
        PINGPONG=bool(pingpong), CRITERION=0 if criterion == "max" else 1, num_warps=4, maxnreg=168)
    if write is not None:
        from .triton_kernel import compact_flags

        compact_flags[(B * H * num_q_tiles,)](write.kv_indices, write.kv_counts, num_k_tiles,
                                              NK_POW2=triton.next_power_of_2(num_k_tiles), num_warps=4)
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
    q_desc, k_desc, v_desc = descriptors(x, x, x, 128)
    signature = {"q_desc": mangle_type(q_desc), "k_desc": mangle_type(k_desc), "v_desc": mangle_type(v_desc),
                 "o_ptr": "*bf16", "stride_os": "i32", "stride_oh": "i32", "stride_ob": "i32", "seq_q": "i32",
                 "seq_k": "i32", "num_heads": "i32", "num_q_tiles": "i32", "num_k_tiles": "i32", "qk_scale": "fp32",
                 "read_idx_ptr": "*i32" if lists else "constexpr", "read_cnt_ptr": "*i32" if lists else "constexpr",
                 "flags_ptr": "*i32" if write else "constexpr", "threshold_ptr": "*fp32" if write else "constexpr",
                 "lse_ptr": "*fp32" if lse else "constexpr", "lse_state_ptr": "*fp32" if lse else "constexpr",
                 "must_k_ptr": "*u8" if must_do else "constexpr", "must_q_ptr": "*u8" if must_do else "constexpr",
                 "STAGES": "constexpr", "PINGPONG": "constexpr", "CRITERION": "constexpr"}
    constants = {"STAGES": stages or (3 if pingpong else 2), "PINGPONG": bool(pingpong), "CRITERION": criterion}
    for name, given in (("read_idx_ptr", lists), ("read_cnt_ptr", lists), ("flags_ptr", write),
                        ("threshold_ptr", write), ("lse_ptr", lse), ("lse_state_ptr", lse), ("must_k_ptr", must_do),
                        ("must_q_ptr", must_do)):
        if not given:
            constants[name] = None
    source = GluonASTSource(_attn_fwd_ws, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 168})
