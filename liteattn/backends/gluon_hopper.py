"""Kernel v2 for Hopper (issue 12), in Gluon: the sm_90 backend ("gluon", chosen by ``backends.choose``); its
launcher is ``gluon_launch.py``. The Triton kernel stays the portable path (other GPUs, the interpreter in CI).

Measured (H100, ``bench/gluon_check.py``, bench/results/gluon_check_h100_2026-11-28.txt): dense 1.098x cuDNN SDPA at
Wan 1.3B 480p and 1.099x at CogVideoX; bit-identical to the Triton kernel over read lists, and the same write
lists and LSE under both keep rules. bench/NOTES.md ("Where the dense core's time goes") has the plan and the
explanation per step.

- one CTA per (128-row q-tile, batch*head), 12 warps in three partitions:
  a **producer** (1 warp, 24 registers) walks the q-tile's read list (or every k-tile) and issues the K and V TMA
  loads into a ring of ``STAGES`` shared-memory stages, each with a "ready" mbarrier (TMA bytes) and an "empty"
  mbarrier (two arrivals: one per consumer);
- two **consumers** (4 warps = one warpgroup each: the default partition and a worker) each own 64 of the 128 rows,
  with the online softmax of ``triton_kernel.py`` (exp2, scale folded in, the ragged last k-tile masked) on
  asynchronous ``warpgroup_mma``. They meet only at mbarriers, never at a CTA-wide barrier.
- :func:`_consumer` (step 1, ``PINGPONG=False``): S = Q K^T, softmax, O += P V, in turn. Kept for the step-by-step
  measurement; it takes no write list.
- :func:`_consumer_pingpong` (steps 2 and 3, what the backend runs, 3 stages, 224 KB of shared memory at D=128):
  the two warpgroups take turns at the tensor cores through a pair of "turn" mbarriers, and each issues
  S_i = Q K_i^T together with the lagged O += P_(i-1) V_(i-1) before it hands the turn over and runs its softmax.
  Each row that keeps a tile under the keep rule sets its flag (the launcher zeroes the flags and compacts them, or
  packs them into a state's bitmask), it reads and writes the previous LSE and keeps must-do tiles.
"""

from __future__ import annotations

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
    3 stages."""
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
