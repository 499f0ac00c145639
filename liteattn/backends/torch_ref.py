"""The PyTorch backend: vectorised reference of docs/DESIGN.md section 1, runs on any device.

Per chunk of heads and q-tiles it forms the full score block, takes tile maxima, and replays
the kernel's left-to-right walk over the read list with a cumulative max, so that the skip
decisions equal those of a tile-by-tile online-softmax loop. It is the oracle for the Triton
kernel and the CPU path.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

LOG2E = 1.4426950408889634

# Elements of one score block (chunk of heads x rows x Sk). On a GPU: 2^25 bounds peak memory at a few hundred MB
# in fp32 while keeping the work vectorised. On a CPU the dozen elementwise passes over a block are memory-bound,
# so a block of 2^20 (4 MB in fp32) that stays in cache is 1.5x faster than 2^25 at the demo's shape (B=2, S=4096,
# H=4, D=64, fp32, two cores: 344 vs 522 ms; SDPA 187 ms).
_MAX_BLOCK_ELEMENTS = 1 << 25
_MAX_BLOCK_ELEMENTS_CPU = 1 << 20


def _run_blocks(run_block: Callable, blocks: list, device: torch.device) -> None:
    """Run the independent score blocks: in order, or, on a CPU with several threads, spread over a pool of
    single-threaded workers.

    PyTorch's own CPU parallelism splits every elementwise op of a block across its OpenMP threads: a dozen short
    parallel regions per block, each ending in a barrier where threads spin. When other processes hold the cores, a
    thread that is descheduled stalls every barrier: one call at the demo's shape took 11 s instead of 0.3 s on a
    busy two-core machine. Whole blocks per worker thread (each op single-threaded, the GIL released inside them)
    have no barriers to stall, and keep the cores busy when the machine is idle (bench/cpu_load.py measures both).
    """
    workers = min(torch.get_num_threads(), len(blocks)) if device.type == "cpu" else 1
    if workers <= 1 or torch.compiler.is_compiling():
        for block in blocks:
            run_block(block)
        return
    threads = torch.get_num_threads()

    def single_threaded(chunk):
        torch.set_num_threads(1)  # this worker's own OpenMP setting
        for block in chunk:
            run_block(block)

    chunks = [blocks[i::workers] for i in range(workers)]
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="liteattn") as pool:
            for future in [pool.submit(single_threaded, chunk) for chunk in chunks]:
                future.result()  # re-raises a worker's exception
    finally:
        torch.set_num_threads(threads)  # what the workers' setting changed process-wide, back as it was


def max_rule_gain(tile_max: torch.Tensor, prev_max: torch.Tensor) -> torch.Tensor:
    """The ``"max"`` criterion's per-row gain (log2 units): how far tile j raises the row's running max.

    ``tile_max``/``prev_max`` are natural-log score maxima; ``prev_max`` is -inf before the first tile (gain +inf).
    A tile is kept when some row's gain exceeds the threshold, and the first processed tile always (also at +inf).
    (The Triton kernel's twin is ``triton_kernel._keep``.)
    """
    return (tile_max - prev_max) * LOG2E


def mass_rule_gain(tile_lse: torch.Tensor, reference_lse: torch.Tensor) -> torch.Tensor:
    """The ``"mass"`` criterion's per-row gain (log2 units): log2 of the tile's share of the row's attention.

    ``tile_lse`` is the log-sum-exp of the row's scores over the tile's columns, ``reference_lse`` the row's
    log-sum-exp it is measured against (the previous call's, or this call's running one); natural log.
    """
    return (tile_lse - reference_lse) * LOG2E


def attention_forward(
    q: torch.Tensor,  # (B, Sq, H, D)
    k: torch.Tensor,  # (B, Sk, H, D)
    v: torch.Tensor,  # (B, Sk, H, Dv)
    read_dense: Optional[torch.Tensor],  # bool (B, H, Mq, Nk) or None = every tile
    keep_out: Optional[torch.Tensor],  # bool (B, H, Mq, Nk) to fill with keep(j), or None
    threshold: Optional[torch.Tensor],  # 0-d float32, log2 units (None when keep_out is None)
    criterion: str,  # "max" or "mass" (liteattn.criteria)
    scale: float,
    tile_q: int,
    tile_k: int,
    must_do_k: Optional[torch.Tensor],  # bool (Nk,) k-tiles never dropped
    must_do_q: Optional[torch.Tensor],  # bool (Mq,) q-tiles that drop nothing
    return_lse: bool,
    lse_state: Optional[torch.Tensor] = None,  # float32 (B, H, Sq): the previous call's LSE (NaN: none), overwritten
    score_out: Optional[torch.Tensor] = None,  # float32 (B, H, Mq, Nk) to fill with the tiles' decision statistic
):
    """Returns ``(out (B, Sq, H, Dv) in q.dtype, lse (B, H, Sq) float32 or None)``.

    ``keep_out`` receives ``keep(j) & read(j)`` (must-do applied), i.e. the next write list. The mass rule measures
    tiles against ``lse_state`` (rows holding NaN: against this call's running LSE), and ``lse_state`` then
    receives this call's LSE. ``score_out`` receives, per tile, the largest gain of the rule over the q-tile's rows
    (log2 units; +inf for tiles kept whatever the threshold, -inf for tiles not read): the tile is kept iff its score
    exceeds the threshold, for any threshold.
    """
    B, Sq, H, D = q.shape
    Sk, Dv = k.shape[1], v.shape[-1]
    Mq, Nk = -(-Sq // tile_q), -(-Sk // tile_k)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device
    out = torch.empty(B, Sq, H, Dv, dtype=q.dtype, device=device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=device) if return_lse or lse_state is not None else None

    # Rows per block: whole q-tiles, so the per-q-tile reduction of the decision stays in one block.
    block = _MAX_BLOCK_ELEMENTS_CPU if device.type == "cpu" else _MAX_BLOCK_ELEMENTS
    tiles_per_block = max(1, min(Mq, block // max(1, tile_q * Nk * tile_k)))
    heads_per_block = max(1, min(H, block // max(1, tiles_per_block * tile_q * Nk * tile_k)))
    pad_k = Nk * tile_k - Sk
    # Below this, exp would leave the normal floats (-86.3 in fp32, -707.4 in fp64).
    exp_floor = math.log(torch.finfo(compute_dtype).tiny) + 1.0
    exp_tiny = math.exp(exp_floor) * 1.001  # exp of a clamped argument lies below this: such a weight becomes 0

    blocks = []  # (b, heads, keys^T, values, first q-tile, last q-tile + 1): independent units of work
    for b in range(B):
        for h0 in range(0, H, heads_per_block):
            hs = slice(h0, min(H, h0 + heads_per_block))
            # Keys padded to whole tiles, so scores view as (h, rows, Nk, tile_k) without copies.
            kb = torch.nn.functional.pad(k[b, :, hs].transpose(0, 1).to(compute_dtype), (0, 0, 0, pad_k))
            vb = torch.nn.functional.pad(v[b, :, hs].transpose(0, 1).to(compute_dtype), (0, 0, 0, pad_k))
            kbt = kb.transpose(1, 2)  # (h, D, Nk*tile_k)
            blocks += [(b, hs, kbt, vb, t0, min(Mq, t0 + tiles_per_block)) for t0 in range(0, Mq, tiles_per_block)]

    def run_block(block) -> None:
        b, hs, kbt, vb, t0, t1 = block
        r0, r1 = t0 * tile_q, min(Sq, t1 * tile_q)
        qb = q[b, r0:r1, hs].transpose(0, 1).to(compute_dtype)  # (h, rows, D)
        scores = torch.baddbmm(qb.new_empty(()), qb, kbt, beta=0.0, alpha=scale)  # (h, rows, Nk*tile_k)
        scores[..., Sk:] = -math.inf  # padding columns never contribute
        tiles = scores.view(scores.shape[0], r1 - r0, Nk, tile_k)

        if read_dense is None:
            read_tiles = torch.ones(scores.shape[0], t1 - t0, Nk, dtype=torch.bool, device=device)
        else:
            read_tiles = read_dense[b, hs, t0:t1]  # (h, mq, Nk)
        row_tile = torch.arange(r1 - r0, device=device) // tile_q  # q-tile of each row, in block
        read_rows = read_tiles[:, row_tile]  # (h, rows, Nk)

        decide = keep_out is not None or score_out is not None
        if decide and criterion == "max":
            tile_max = tiles.amax(-1)  # (h, rows, Nk)
            seen = tile_max.masked_fill(~read_rows, -math.inf).cummax(dim=-1).values
            prev_max = torch.nn.functional.pad(seen[..., :-1], (1, 0), value=-math.inf)
            gain = max_rule_gain(tile_max, prev_max)  # (h, rows, Nk)
        elif decide:  # "mass"
            tile_lse = tiles.logsumexp(-1).masked_fill(~read_rows, -math.inf)  # (h, rows, Nk)
            running = torch.logcumsumexp(tile_lse, dim=-1)  # this call's LSE up to tile j, in read order
            if lse_state is not None:
                previous = lse_state[b, hs, r0:r1].to(compute_dtype).unsqueeze(-1)  # (h, rows, 1)
                running = torch.where(torch.isnan(previous), running, previous)
            gain = mass_rule_gain(tile_lse, running)
        if decide:
            first = read_rows & (read_rows.cumsum(dim=-1) == 1)  # the first processed tile is always kept
            gain = gain.masked_fill(first, math.inf)
            keep_rows = (gain > threshold) | first if keep_out is not None else None
        if score_out is not None:  # the decision statistic: each tile's largest gain over the q-tile's rows
            rows_pad = (t1 - t0) * tile_q - (r1 - r0)
            score = torch.nn.functional.pad(gain, (0, 0, 0, rows_pad), value=-math.inf)
            score = score.unflatten(1, (t1 - t0, tile_q)).amax(dim=2)  # (h, mq, Nk)
            if must_do_k is not None:
                score = score.masked_fill(must_do_k, math.inf)
            if must_do_q is not None:
                score = score.masked_fill(must_do_q[t0:t1, None], math.inf)
            score_out[b, hs, t0:t1] = score.masked_fill(~read_tiles, -math.inf).float()
        if keep_out is not None:
            rows_pad = (t1 - t0) * tile_q - (r1 - r0)
            keep_rows = torch.nn.functional.pad(keep_rows, (0, 0, 0, rows_pad), value=False)
            keep = keep_rows.unflatten(1, (t1 - t0, tile_q)).any(dim=2)  # (h, mq, Nk)
            if must_do_k is not None:
                keep |= must_do_k
            if must_do_q is not None:
                keep |= must_do_q[t0:t1, None]
            keep_out[b, hs, t0:t1] = keep & read_tiles

        # On the CPU a host check is free, and when the block reads every tile it saves the read mask's
        # pass over the scores (and, below, the underflow passes when nothing underflows).
        reads_all = read_dense is None or (device.type == "cpu" and bool(read_tiles.all()))
        if not reads_all:  # (an additive -inf bias broadcasts over the tile's columns 3x faster than masked_fill)
            tiles.add_(torch.zeros_like(read_rows, dtype=compute_dtype).masked_fill_(~read_rows, -math.inf)
                       .unsqueeze(-1))
        # One exp pass: p = exp(s - m), l = sum p, out = p v / l, lse = m + log l.
        row_max = scores.amax(dim=-1, keepdim=True)  # -inf where nothing is read
        shifted = scores.sub_(row_max.clamp_min(torch.finfo(compute_dtype).min))
        if device.type == "cpu" and reads_all and pad_k == 0 and bool(shifted.amin() >= exp_floor):
            probs = shifted.exp_()
        else:
            # exp of arguments that underflow (and of -inf) takes a slow path on CPUs (30x); those terms
            # are below the smallest normal float, so they are clamped, then set to exactly 0 in one pass. (Leaving
            # them at exp_floor is 10x slower still: their products with v are subnormal, and the matmul crawls.)
            probs = torch.nn.functional.threshold_(shifted.clamp_(min=exp_floor).exp_(), exp_tiny, 0.0)
        row_sum = probs.sum(dim=-1, keepdim=True)  # 0 where nothing is read
        ob = torch.matmul(probs, vb).div_(row_sum.clamp_min(torch.finfo(compute_dtype).tiny))
        out[b, r0:r1, hs] = ob.transpose(0, 1).to(q.dtype)
        if lse is not None:
            lse[b, hs, r0:r1] = (row_max + row_sum.log()).squeeze(-1).to(torch.float32)

    _run_blocks(run_block, blocks, device)
    if lse_state is not None:
        lse_state.copy_(lse)
    return out, (lse if return_lse else None)
