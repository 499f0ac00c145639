"""An independent float64 oracle of docs/DESIGN.md section 1, written for the tests.

It shares no code with ``liteattn.backends``: it loops over (batch, head, q-tile), walks the
k-tiles of the read list in ascending order one tile at a time, keeps an online running max
per row, decides keep(j) with the log2(e) rule, and accumulates an online softmax. Slow and
obvious on purpose; use it on small shapes only.

Token ranges here are plain lists of half-open ``(start, end)`` pairs; tests that exercise the
flat form convert it themselves, so that the oracle does not trust the package's parser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

LOG2E = math.log2(math.e)


def n_tiles(length: int, tile: int) -> int:
    return (length + tile - 1) // tile


def tile_bounds(index: int, tile: int, length: int) -> Tuple[int, int]:
    """Token range [start, end) of tile ``index`` (the last one may be partial)."""
    return index * tile, min(length, (index + 1) * tile)


def overlapping_tiles(ranges: Sequence[Tuple[int, int]], length: int, tile: int) -> list:
    """Indices of the tiles that share at least one token with some range."""
    hit = []
    for j in range(n_tiles(length, tile)):
        lo, hi = tile_bounds(j, tile, length)
        if any(s < hi and e > lo and s < e for s, e in ranges):
            hit.append(j)
    return hit


def covered_tiles(ranges: Sequence[Tuple[int, int]], length: int, tile: int) -> list:
    """Indices of the tiles whose every token lies in the union of the ranges."""
    inside = [False] * length
    for s, e in ranges:
        for t in range(s, e):
            inside[t] = True
    out = []
    for j in range(n_tiles(length, tile)):
        lo, hi = tile_bounds(j, tile, length)
        if all(inside[lo:hi]):
            out.append(j)
    return out


def fresh_read(batch: int, heads: int, seq_q: int, seq_k: int, tile_q: int, tile_k: int,
               must_skip: Sequence[Tuple[int, int]] = ()) -> torch.Tensor:
    """bool (B, H, Mq, Nk) of a fresh state: every k-tile except those must-skip covers completely."""
    read = torch.ones(batch, heads, n_tiles(seq_q, tile_q), n_tiles(seq_k, tile_k), dtype=torch.bool)
    for j in covered_tiles(must_skip, seq_k, tile_k):
        read[..., j] = False
    return read


@dataclass
class OracleResult:
    out: torch.Tensor  # float64 (B, Sq, H, Dv)
    lse: torch.Tensor  # float64 (B, H, Sq), natural log; -inf for rows that read nothing
    keep: torch.Tensor  # bool (B, H, Mq, Nk): the write list (read tiles with keep(j))
    margin: torch.Tensor  # float64 (B, H, Mq, Nk): max_r (tmax_r - mprev_r) * log2(e) - threshold; nan if not read
    forced: torch.Tensor  # bool (B, H, Mq, Nk): read tiles kept by a must-do rule regardless of the margin

    def decided(self, tol: float = 1e-2) -> torch.Tensor:
        """bool (B, H, Mq, Nk): read tiles whose decision is not within ``tol`` of the threshold."""
        read = ~torch.isnan(self.margin)
        return read & (self.forced | ~(self.margin.abs() < tol))


def max_rule_gain(s: torch.Tensor, running_max: torch.Tensor, reference_lse: torch.Tensor) -> torch.Tensor:
    """The ``"max"`` rule's per-row gain (log2 units) for tile scores ``s (rows, cols)``: how far the tile raises
    the row's running max. With running_max = -inf it is +inf: the first processed tile is always kept."""
    return (s.max(dim=1).values - running_max) * LOG2E


def mass_rule_gain(s: torch.Tensor, running_max: torch.Tensor, reference_lse: torch.Tensor) -> torch.Tensor:
    """The ``"mass"`` rule's per-row gain (log2 units): log2 of the tile's share of the row's softmax mass,
    ``sum_c exp(s_c - reference_lse)``. The first processed tile (running_max = -inf) is always kept: +inf."""
    share = (torch.logsumexp(s, dim=1) - reference_lse) * LOG2E
    return torch.where(running_max == -math.inf, math.inf, share)


# criterion -> per-row gain; a tile is kept iff some row's gain exceeds the threshold.
RULES = {"max": max_rule_gain, "mass": mass_rule_gain}


def oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, read: Optional[torch.Tensor], *,
                     threshold: float, tile_q: int, tile_k: int, scale: Optional[float] = None,
                     must_do: Sequence[Tuple[int, int]] = (),
                     must_do_q: Sequence[Tuple[int, int]] = (), criterion: str = "max",
                     lse_prev: Optional[torch.Tensor] = None) -> OracleResult:
    """The reference semantics, tile by tile, in float64, for the keep rule ``criterion`` (a key of RULES).

    q (B, Sq, H, D), k (B, Sk, H, D), v (B, Sk, H, Dv), read bool (B, H, Mq, Nk) or None (all tiles).
    ``lse_prev`` (B, H, Sq), natural log: the previous call's LSE that the mass rule measures against; None or NaN
    rows: this call's LSE over the tiles processed so far, this one included.
    """
    gain_of = RULES[criterion]
    B, Sq, H, D = q.shape
    Sk, Dv = k.shape[1], v.shape[-1]
    Mq, Nk = n_tiles(Sq, tile_q), n_tiles(Sk, tile_k)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if read is None:
        read = torch.ones(B, H, Mq, Nk, dtype=torch.bool)
    read = read.cpu()
    assert read.shape == (B, H, Mq, Nk), (read.shape, (B, H, Mq, Nk))
    q64, k64, v64 = (t.detach().cpu().to(torch.float64) for t in (q, k, v))
    must_do_k_tiles = set(overlapping_tiles(must_do, Sk, tile_k))
    must_do_q_tiles = set(overlapping_tiles(must_do_q, Sq, tile_q))

    out = torch.zeros(B, Sq, H, Dv, dtype=torch.float64)
    lse = torch.full((B, H, Sq), -math.inf, dtype=torch.float64)
    keep = torch.zeros(B, H, Mq, Nk, dtype=torch.bool)
    forced = torch.zeros(B, H, Mq, Nk, dtype=torch.bool)
    margin = torch.full((B, H, Mq, Nk), math.nan, dtype=torch.float64)

    for b in range(B):
        for h in range(H):
            for i in range(Mq):
                r0, r1 = tile_bounds(i, tile_q, Sq)
                rows = q64[b, r0:r1, h]  # (rows, D)
                running_max = torch.full((r1 - r0,), -math.inf, dtype=torch.float64)
                row_sum = torch.zeros(r1 - r0, dtype=torch.float64)
                acc = torch.zeros(r1 - r0, Dv, dtype=torch.float64)
                for j in range(Nk):  # ascending order
                    if not read[b, h, i, j]:
                        continue
                    c0, c1 = tile_bounds(j, tile_k, Sk)
                    s = scale * (rows @ k64[b, c0:c1, h].T)  # (rows, cols)
                    tile_max = s.max(dim=1).values
                    running_lse = torch.logaddexp(running_max + torch.log(row_sum), torch.logsumexp(s, dim=1))
                    reference = running_lse
                    if lse_prev is not None:
                        previous = lse_prev[b, h, r0:r1].detach().cpu().double()
                        reference = torch.where(torch.isnan(previous), running_lse, previous)
                    gain = gain_of(s, running_max, reference)
                    best = gain.max().item()
                    margin[b, h, i, j] = math.inf if best == math.inf else best - threshold
                    first = bool((running_max == -math.inf).all())  # the first processed tile: always kept
                    decision = bool((gain > threshold).any()) or first
                    is_forced = j in must_do_k_tiles or i in must_do_q_tiles
                    forced[b, h, i, j] = is_forced
                    keep[b, h, i, j] = decision or is_forced
                    # Online softmax over the read tiles only.
                    new_max = torch.maximum(running_max, tile_max)
                    rescale = torch.exp(running_max - new_max)  # exp(-inf) = 0 before the first tile
                    p = torch.exp(s - new_max[:, None])
                    row_sum = row_sum * rescale + p.sum(dim=1)
                    acc = acc * rescale[:, None] + p @ v64[b, c0:c1, h]
                    running_max = new_max
                has = row_sum > 0
                out[b, r0:r1, h] = torch.where(has[:, None], acc / row_sum.clamp_min(1e-300)[:, None],
                                               torch.zeros_like(acc))
                lse[b, h, r0:r1] = torch.where(has, running_max + torch.log(row_sum.clamp_min(1e-300)),
                                               torch.full_like(row_sum, -math.inf))
    return OracleResult(out, lse, keep, margin, forced)


# -- the tolerance rule of docs/DESIGN.md section 3 -------------------------------------------------------

def token_mask(read: torch.Tensor, seq_q: int, seq_k: int, tile_q: int, tile_k: int) -> torch.Tensor:
    """bool (B, H, Sq, Sk): the (row, column) pairs that the read tiles cover."""
    return (read.repeat_interleave(tile_q, dim=2)[:, :, :seq_q]
            .repeat_interleave(tile_k, dim=3)[:, :, :, :seq_k])


def plain_attention(q, k, v, read: Optional[torch.Tensor], tile_q: int, tile_k: int, scale: Optional[float] = None,
                    rows_per_chunk: int = 4096):
    """Plain PyTorch attention computed *in the input dtype*, masked to the read tiles.

    Returns (out (B, Sq, H, Dv) in the input dtype, lse (B, H, Sq) in the input dtype). Rows
    that read nothing give 0 and -inf, as the contract says. Rows go in chunks, so production
    lengths fit in GPU memory.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out = torch.empty(B, H, Sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=q.dtype, device=q.device)
    for r0 in range(0, Sq, rows_per_chunk):
        r1 = min(Sq, r0 + rows_per_chunk)
        scores = torch.matmul(qt[:, :, r0:r1], kt.transpose(-1, -2)) * scale  # input dtype
        if read is not None:
            rows = torch.arange(r0, r1, device=q.device) // tile_q
            mask = read.to(q.device)[:, :, rows].repeat_interleave(tile_k, dim=3)[..., :Sk]
            scores = scores.masked_fill(~mask, -math.inf)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: NaN -> 0
        out[:, :, r0:r1] = torch.matmul(probs, vt)
        lse[:, :, r0:r1] = torch.logsumexp(scores, dim=-1)
    return out.transpose(1, 2), lse


def tile_margin(q, k, read: torch.Tensor, b: int, h: int, i: int, j: int, *, tile_q: int, tile_k: int,
                threshold: float, scale: Optional[float] = None, criterion: str = "max",
                lse_prev: Optional[torch.Tensor] = None) -> float:
    """One read tile's margin, ``max_r gain_r(j) - threshold`` (RULES), in float64: the tile-by-tile walk of
    :func:`oracle_attention` for one (b, h, i) up to tile j, for shapes too large for the whole oracle."""
    Sq, Sk = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    r0, r1 = tile_bounds(i, tile_q, Sq)
    rows = q[b, r0:r1, h].double()
    running_max = torch.full((r1 - r0,), -math.inf, dtype=torch.float64, device=q.device)
    running_lse = running_max.clone()
    for t in torch.nonzero(read[b, h, i]).flatten().tolist():
        if t > j:
            break
        c0, c1 = tile_bounds(t, tile_k, Sk)
        s = scale * (rows @ k[b, c0:c1, h].double().T)
        running_lse_after = torch.logaddexp(running_lse, torch.logsumexp(s, dim=1))
        if t == j:
            reference = running_lse_after
            if lse_prev is not None:
                previous = lse_prev[b, h, r0:r1].double().to(q.device)
                reference = torch.where(torch.isnan(previous), running_lse_after, previous)
            return RULES[criterion](s, running_max, reference).max().item() - threshold
        running_max = torch.maximum(running_max, s.max(dim=1).values)
        running_lse = running_lse_after
    raise ValueError(f"tile {j} is not in the read list of ({b}, {h}, {i})")


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |a - ref| in float64, with equal infinities (e.g. lse = -inf) counting as 0."""
    a, ref = a.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    same_inf = torch.isinf(a) & torch.isinf(ref) & (torch.sign(a) == torch.sign(ref))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - ref).abs())
    return float(diff.nan_to_num(math.inf).max()) if diff.numel() else 0.0


# Small absolute floors, per input dtype (outputs are O(1); LSE values are O(10 .. 100)).
OUT_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-4, torch.bfloat16: 1e-3}
LSE_FLOOR = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_within_rule(got, baseline, ref, floor: float, what: str) -> None:
    """docs/DESIGN.md section 3: error vs the fp64 reference <= 2x plain PyTorch's error in the input dtype + floor."""
    err, base_err = max_err(got, ref), max_err(baseline, ref)
    assert err <= 2 * base_err + floor, (
        f"{what}: max error {err:.3e} vs fp64 oracle exceeds 2 x plain-PyTorch error {base_err:.3e} + {floor:.0e}"
    )


def assert_write_matches(write_dense: torch.Tensor, result: OracleResult, tol: float = 1e-2) -> int:
    """The write list equals the oracle's keep decisions except on tiles within ``tol`` of the threshold.

    Also: it never holds a tile that was not read. Returns how many tiles were compared.
    """
    write_dense = write_dense.cpu()
    read = ~torch.isnan(result.margin)
    assert not (write_dense & ~read).any(), "the write list holds a tile that was not read"
    decided = result.decided(tol)
    bad = decided & (write_dense != result.keep)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        details = [(tuple(i), bool(write_dense[tuple(i)]), float(result.margin[tuple(i)])) for i in idx]
        raise AssertionError(f"{int(bad.sum())} write-list decisions differ from the oracle "
                             f"(index, got, margin): {details}")
    return int(decided.sum())


def check_call(q, k, v, read: Optional[torch.Tensor], out, lse=None, write_dense: Optional[torch.Tensor] = None, *,
               threshold: float, tile_q: int, tile_k: int, scale: Optional[float] = None,
               must_do=(), must_do_q=(), criterion: str = "max", lse_prev=None) -> OracleResult:
    """Check one call's output, LSE and write list against the oracle on the same read list.

    ``read`` is the bool (B, H, Mq, Nk) list the call computed (None = every tile).
    """
    res = oracle_attention(q, k, v, read, threshold=threshold, tile_q=tile_q, tile_k=tile_k, scale=scale,
                           must_do=must_do, must_do_q=must_do_q, criterion=criterion, lse_prev=lse_prev)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1]), (out.dtype, out.shape)
    assert out.device == q.device
    base_out, base_lse = plain_attention(q, k, v, read, tile_q, tile_k, scale)
    assert_within_rule(out, base_out, res.out, OUT_FLOOR[q.dtype], f"output ({q.dtype})")
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert_within_rule(lse, base_lse, res.lse, LSE_FLOOR[q.dtype], f"lse ({q.dtype})")
    if write_dense is not None:
        assert_write_matches(write_dense, res)
    return res
