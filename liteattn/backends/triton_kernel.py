"""Triton forward kernel of LiteAttention: online-softmax attention over a skip list.

One program per (q-tile, batch*head). It walks the k-tiles of its read list in ascending
order (jumping straight from one listed tile to the next), computes exact online-softmax
attention over them, and records in the write list the tiles that the keep rule keeps
(docs/DESIGN.md section 1). Scores are kept in log2 units (``qk_scale = scale * log2(e)``), so
the decision needs no conversion; the threshold is read from a tensor at run time.

Only ``@triton.jit`` code and its autotune configs live here; liteattn/backends/triton_launch.py
owns allocation, descriptors and the grid.
"""

import os

import triton
import triton.language as tl

# Compute tiles: BLOCK_M is the skip tile's q extent (one decision per program); BLOCK_N divides
# the skip tile's k extent. Configs are generated and pruned here, nowhere else.
PINNED_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=2)


def _configs():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or os.environ.get("LITEATTN_PIN_CONFIG"):
        pinned = dict(PINNED_CONFIG)
        return [triton.Config({"BLOCK_N": pinned.pop("BLOCK_N")}, **pinned, pre_hook=_set_block_shapes)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
        for bn, w, s in [(64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3), (64, 8, 4),
                         (128, 4, 2), (128, 8, 2), (128, 8, 3)]
    ]


def _prune(configs, named_args, **kwargs):
    tile_k = named_args["TILE_K"] if "TILE_K" in named_args else kwargs["TILE_K"]
    kept = [c for c in configs if tile_k % c.kwargs["BLOCK_N"] == 0]
    return kept or configs[:1]


def _set_block_shapes(nargs):
    block_n = nargs["BLOCK_N"]
    nargs["q_desc"].block_shape = [nargs["TILE_Q"], nargs["HEAD_DIM"]]
    nargs["k_desc"].block_shape = [block_n, nargs["HEAD_DIM"]]
    nargs["v_desc"].block_shape = [block_n, nargs["HEAD_DIM_V"]]


@triton.jit
def _attend_k_tile(acc, l_i, m_i, q, k_desc, v_desc, kv_row, k_col, v_col, start_n, seq_k, qk_scale,
                   TILE_Q: tl.constexpr, TILE_K: tl.constexpr, BLOCK_N: tl.constexpr, MASK_COLS: tl.constexpr,
                   TRACK_MAX: tl.constexpr, TRACK_MASS: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Online softmax over the TILE_K keys from ``start_n``. Also returns, per row, the tile's max score (log2
    units, with TRACK_MAX) and its sum of ``2**(s - m_i)`` relative to the running max ``m_i`` it returns (with
    TRACK_MASS: the tile's share of the row's mass, at no extra exponential)."""
    tile_max = tl.full([TILE_Q], float("-inf"), tl.float32)
    tile_l = tl.zeros([TILE_Q], tl.float32)
    for sub in tl.static_range(TILE_K // BLOCK_N):
        n0 = start_n + sub * BLOCK_N
        k = k_desc.load([kv_row + n0, k_col])
        if UPCAST_DOT:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        if MASK_COLS:  # only the last k-tile of a ragged sequence; rows past seq_k belong to the next batch
            cols = n0 + tl.arange(0, BLOCK_N)
            qk = tl.where(cols[None, :] < seq_k, qk, float("-inf"))
        block_max = tl.max(qk, 1) * qk_scale
        if TRACK_MAX:
            tile_max = tl.maximum(tile_max, block_max)
        m_new = tl.maximum(m_i, block_max)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        if TRACK_MASS:
            tile_l = tile_l * alpha + p_sum
        acc = acc * alpha[:, None]
        v = v_desc.load([kv_row + n0, v_col])
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i, tile_max, tile_l


@triton.jit
def _keep(tile_max, m_prev, tile_l, m_i, l_i, lse_prev, threshold, CRITERION: tl.constexpr):
    """The keep rule (docs/DESIGN.md section 4), per row, selected by ``CRITERION`` (liteattn.criteria.CRITERIA);
    everything in log2 units. ``m_prev`` is -inf before the first tile, which is always kept (also at +inf).

    0, ``"max"``: does this tile raise the running max by more than ``threshold``?
    1, ``"mass"``: does this tile hold more than ``2**threshold`` of the row's mass, measured against the previous
    call's log-sum-exp ``lse_prev`` (NaN: against this call's running one, ``m_i + log2(l_i)``)?
    (The PyTorch backend's twins are ``torch_ref.max_rule_gain`` and ``mass_rule_gain``.)"""
    tl.static_assert((CRITERION == 0) | (CRITERION == 1), "unknown criterion")
    if CRITERION == 0:
        keep = ((tile_max - m_prev) > threshold) | (m_prev == float("-inf"))
    else:
        reference = tl.where(lse_prev == lse_prev, lse_prev, m_i + tl.math.log2(l_i))
        # A share that underflowed to 0 in float32 counts as the smallest float, so that -inf keeps everything.
        mass = tl.maximum(tl.math.log2(tile_l) + m_i - reference, -3.0e38)
        keep = (mass > threshold) | (m_prev == float("-inf"))
    return keep


@triton.jit
def _step(acc, l_i, m_i, j, q, k_desc, v_desc, kv_row, k_col, v_col, seq_k, qk_scale, threshold,
          write_row_ptr, must_do_k_ptr, keep_all, row_valid, lse_prev,
          TILE_Q: tl.constexpr, TILE_K: tl.constexpr, BLOCK_N: tl.constexpr, MASK_COLS: tl.constexpr,
          WRITE_LIST: tl.constexpr, HAS_MUST_DO_K: tl.constexpr, UPCAST_DOT: tl.constexpr, CRITERION: tl.constexpr):
    """Process k-tile ``j`` and flag it in the write row if it is kept."""
    m_prev = m_i
    acc, l_i, m_i, tile_max, tile_l = _attend_k_tile(
        acc, l_i, m_i, q, k_desc, v_desc, kv_row, k_col, v_col, j * TILE_K, seq_k, qk_scale, TILE_Q, TILE_K, BLOCK_N,
        MASK_COLS, WRITE_LIST and CRITERION == 0, WRITE_LIST and CRITERION == 1, UPCAST_DOT)
    if WRITE_LIST:
        # Keep iff the rule holds for some valid row. Each such row sets the tile's flag in the write row: no
        # cross-warp reduction, no barrier per tile (every writer stores the same 1).
        keep_row = _keep(tile_max, m_prev, tile_l, m_i, l_i, lse_prev, threshold, CRITERION) & row_valid
        tl.store(write_row_ptr + j + tl.zeros([TILE_Q], tl.int32), 1, mask=keep_row)
        must = keep_all
        if HAS_MUST_DO_K:
            must = must | (tl.load(must_do_k_ptr + j) != 0)
        tl.store(write_row_ptr + j, 1, mask=must)
    return acc, l_i, m_i


@triton.jit
def _compact_row(row_ptr, count_ptr, num_k_tiles, NK_POW2: tl.constexpr):
    """Turn a row of 0/1 flags into ascending tile indices, in place, and store their count."""
    tiles = tl.arange(0, NK_POW2)
    keep = tl.load(row_ptr + tiles, mask=tiles < num_k_tiles, other=0) != 0
    position = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.debug_barrier()  # every flag is loaded before any is overwritten
    tl.store(row_ptr + position, tiles, mask=keep)
    tl.store(count_ptr, tl.sum(keep.to(tl.int32), 0))


@triton.jit
def compact_flags(write_idx_ptr, write_cnt_ptr, num_k_tiles, NK_POW2: tl.constexpr):
    """Second pass after the attention kernel: one program per (b, h, q-tile) row of the write list.

    (Compacting inside the attention kernel costs a barrier-bound epilogue per program: +5% at 90%
    sparsity against +2.5% for this separate pass; bench/NOTES.md.)"""
    row = tl.program_id(0).to(tl.int64)
    _compact_row(write_idx_ptr + row * num_k_tiles, write_cnt_ptr + row, num_k_tiles, NK_POW2)


@triton.jit
def expand_bits(bits_ptr, indices_ptr, counts_ptr, num_k_tiles, num_words, NK_POW2: tl.constexpr):
    """Before the attention kernel, with a SkipState: one program per (b, h, q-tile) row turns the row's bitmask
    (tile j = bit j % 32 of word j // 32) into the ascending compact list the kernel walks, and its count."""
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.arange(0, NK_POW2)
    words = tl.load(bits_ptr + row * num_words + tiles // 32, mask=tiles < num_k_tiles, other=0)
    keep = ((words >> (tiles % 32)) & 1) != 0
    position = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(indices_ptr + row * num_k_tiles + position, tiles, mask=keep)
    tl.store(counts_ptr + row, tl.sum(keep.to(tl.int32), 0))


@triton.jit
def pack_flags(flags_ptr, bits_ptr, num_k_tiles, num_words, NK_POW2: tl.constexpr):
    """After the attention kernel, with a SkipState: one program per row packs the row's 0/1 write flags into its
    bitmask words, in place of the read bits (the kept tiles are a subset of the read ones)."""
    row = tl.program_id(0).to(tl.int64)
    tiles = tl.arange(0, NK_POW2)
    flags = tl.load(flags_ptr + row * num_k_tiles + tiles, mask=tiles < num_k_tiles, other=0)
    lanes = (flags != 0).to(tl.int32) << (tiles % 32)
    words = tl.sum(tl.reshape(lanes, (NK_POW2 // 32, 32)), 1)  # distinct bits: the sum is their OR
    w = tl.arange(0, NK_POW2 // 32)
    tl.store(bits_ptr + row * num_words + w, words, mask=w < num_words)


@triton.jit
def _lite_attn_fwd(
    q_desc, k_desc, v_desc,  # 2-D descriptors over (B*S, H*D) views
    o_ptr, lse_ptr, lse_state_ptr,
    read_idx_ptr, read_cnt_ptr, write_idx_ptr, write_cnt_ptr,
    must_do_k_ptr, must_do_q_ptr,
    stride_ob, stride_os, stride_oh,
    seq_q, seq_k, num_heads, num_q_tiles, num_k_tiles,
    qk_scale, threshold_ptr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, TILE_Q: tl.constexpr, TILE_K: tl.constexpr,
    BLOCK_N: tl.constexpr, NK_POW2: tl.constexpr,
    READ_LIST: tl.constexpr, WRITE_LIST: tl.constexpr, HAS_MUST_DO_K: tl.constexpr, HAS_MUST_DO_Q: tl.constexpr,
    RETURN_LSE: tl.constexpr, MASK_TAIL: tl.constexpr, USE_WHILE: tl.constexpr, UPCAST_DOT: tl.constexpr,
    CRITERION: tl.constexpr, HAS_LSE_STATE: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share K/V in L2
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    q_row = b * seq_q + pid_m * TILE_Q
    kv_row = b * seq_k
    rows = pid_m * TILE_Q + tl.arange(0, TILE_Q)
    row_valid = rows < seq_q
    cnt_off = (pid_bh.to(tl.int64) * num_q_tiles + pid_m)
    list_off = cnt_off * num_k_tiles
    read_row_ptr = read_idx_ptr + list_off
    write_row_ptr = write_idx_ptr + list_off
    threshold = 0.0
    if WRITE_LIST:  # flags, turned into the compact list by compact_flags after this kernel
        tiles = tl.arange(0, NK_POW2)
        tl.store(write_row_ptr + tiles, 0, mask=tiles < num_k_tiles)
        # The zeros above and the flags set below may come from different threads: order them.
        tl.debug_barrier()
        threshold = tl.load(threshold_ptr)  # a tensor read at run time: a new value never recompiles
    lse_prev = tl.full([TILE_Q], float("nan"), tl.float32)
    if HAS_LSE_STATE:  # the previous call's LSE of these rows (NaN: none), natural log -> log2 units
        lse_prev = tl.load(lse_state_ptr + pid_bh.to(tl.int64) * seq_q + rows, mask=row_valid,
                           other=float("nan")) * 1.4426950408889634

    q = q_desc.load([q_row, h * HEAD_DIM])
    if UPCAST_DOT:  # the interpreter's bf16 dot is wrong (triton 3.6); do it in fp32 there
        q = q.to(tl.float32)
    m_i = tl.full([TILE_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([TILE_Q], tl.float32)
    acc = tl.zeros([TILE_Q, HEAD_DIM_V], tl.float32)
    keep_all = False
    if HAS_MUST_DO_Q:
        keep_all = tl.load(must_do_q_ptr + pid_m) != 0

    if READ_LIST:
        count = tl.load(read_cnt_ptr + cnt_off)
    else:
        count = num_k_tiles
    n_main = count
    if MASK_TAIL:
        # The ragged last k-tile can only come last in an ascending list; it alone gets the column mask.
        if READ_LIST:
            last = tl.load(read_row_ptr + tl.maximum(count - 1, 0), mask=count > 0, other=-1)
        else:
            last = num_k_tiles - 1
        n_main = count - (last == num_k_tiles - 1).to(tl.int32)
    k_col = h * HEAD_DIM
    v_col = h * HEAD_DIM_V

    if USE_WHILE:  # the interpreter cannot run a for-loop whose bound was loaded from memory
        idx = 0
        while idx < n_main:
            if READ_LIST:
                j = tl.load(read_row_ptr + idx)
            else:
                j = idx
            acc, l_i, m_i = _step(
                acc, l_i, m_i, j, q, k_desc, v_desc, kv_row, k_col, v_col, seq_k, qk_scale, threshold,
                write_row_ptr, must_do_k_ptr, keep_all, row_valid, lse_prev,
                TILE_Q, TILE_K, BLOCK_N, False, WRITE_LIST, HAS_MUST_DO_K, UPCAST_DOT, CRITERION)
            idx += 1
    elif READ_LIST:
        # The next tile index is loaded one iteration ahead, so no K/V load waits on it.
        j_next = tl.load(read_row_ptr, mask=n_main > 0, other=0)
        for idx in tl.range(0, n_main):
            j = j_next
            j_next = tl.load(read_row_ptr + idx + 1, mask=idx + 1 < n_main, other=0)
            acc, l_i, m_i = _step(
                acc, l_i, m_i, j, q, k_desc, v_desc, kv_row, k_col, v_col, seq_k, qk_scale, threshold,
                write_row_ptr, must_do_k_ptr, keep_all, row_valid, lse_prev,
                TILE_Q, TILE_K, BLOCK_N, False, WRITE_LIST, HAS_MUST_DO_K, UPCAST_DOT, CRITERION)
    else:
        for j in tl.range(0, n_main):
            acc, l_i, m_i = _step(
                acc, l_i, m_i, j, q, k_desc, v_desc, kv_row, k_col, v_col, seq_k, qk_scale, threshold,
                write_row_ptr, must_do_k_ptr, keep_all, row_valid, lse_prev,
                TILE_Q, TILE_K, BLOCK_N, False, WRITE_LIST, HAS_MUST_DO_K, UPCAST_DOT, CRITERION)
    if MASK_TAIL:
        if n_main < count:
            acc, l_i, m_i = _step(
                acc, l_i, m_i, num_k_tiles - 1, q, k_desc, v_desc, kv_row, k_col, v_col, seq_k, qk_scale,
                threshold, write_row_ptr, must_do_k_ptr, keep_all, row_valid, lse_prev,
                TILE_Q, TILE_K, BLOCK_N, True, WRITE_LIST, HAS_MUST_DO_K, UPCAST_DOT, CRITERION)

    # Rows that read no tile (l = 0) give 0 and lse = -inf, as the PyTorch backend does.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    cols_v = tl.arange(0, HEAD_DIM_V)
    o_offs = (b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + rows.to(tl.int64)[:, None] * stride_os + cols_v[None, :])
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None])
    if RETURN_LSE or HAS_LSE_STATE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 units back to natural log
        if RETURN_LSE:
            tl.store(lse_ptr + pid_bh.to(tl.int64) * seq_q + rows, lse, mask=row_valid)
        if HAS_LSE_STATE:  # read above by this program only: overwriting it now is safe
            tl.store(lse_state_ptr + pid_bh.to(tl.int64) * seq_q + rows, lse, mask=row_valid)


lite_attn_fwd = triton.autotune(
    configs=_configs(),
    key=["seq_q", "seq_k", "HEAD_DIM", "HEAD_DIM_V", "TILE_Q", "TILE_K", "READ_LIST", "WRITE_LIST", "MASK_TAIL",
         "CRITERION"],
    prune_configs_by={"early_config_prune": _prune},
)(_lite_attn_fwd)
