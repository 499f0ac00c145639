"""The oracle itself, checked against plain float64 attention and a hand-worked walk.

If the oracle were wrong, every comparison against it would be worthless; these tests pin it
to things that need no tile logic at all.
"""

import math

import pytest
import torch

from liteattn.testing import structured_qkv
from oracle import LOG2E, covered_tiles, fresh_read, oracle_attention, overlapping_tiles, token_mask


def dense_fp64(q, k, v, mask=None, scale=None):
    """softmax(q k^T) v and logsumexp in float64, optionally masked (B, H, Sq, Sk)."""
    q, k, v = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2), lse


@pytest.mark.parametrize("seq_q,seq_k,tile_q,tile_k", [(97, 130, 32, 16), (64, 64, 64, 64), (5, 200, 16, 64)])
def test_oracle_dense_equals_softmax(seq_q, seq_k, tile_q, tile_k):
    q, k, v = structured_qkv(2, seq_q, 2, 16, seq_k=seq_k, value_dim=8, seed=3, dtype=torch.float64)
    res = oracle_attention(q, k, v, None, threshold=-math.inf, tile_q=tile_q, tile_k=tile_k)
    out, lse = dense_fp64(q, k, v)
    torch.testing.assert_close(res.out, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.lse, lse, rtol=1e-12, atol=1e-12)  # natural log
    assert res.keep.all()  # -inf keeps every tile


def test_oracle_masked_equals_masked_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = structured_qkv(1, 100, 2, 16, seq_k=90, seed=1, dtype=torch.float64)
    read = torch.rand(1, 2, 4, 6, generator=gen) < 0.5
    read[0, 0, 1] = False  # a q-tile that reads nothing
    res = oracle_attention(q, k, v, read, threshold=-5.0, tile_q=32, tile_k=16, scale=0.3)
    out, lse = dense_fp64(q, k, v, token_mask(read, 100, 90, 32, 16), scale=0.3)
    torch.testing.assert_close(res.out, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.lse, lse, rtol=1e-12, atol=1e-12)
    assert (res.out[0, 32:64, 0] == 0).all() and torch.isinf(res.lse[0, 0, 32:64]).all()
    assert not (res.keep & ~read).any()


def hand_made(tile_maxima, tile=16):
    """One row, one head: k-tile j has every score equal to tile_maxima[j] (scale 1, D = 1)."""
    nk = len(tile_maxima)
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor(tile_maxima, dtype=torch.float64).repeat_interleave(tile).view(1, nk * tile, 1, 1)
    v = torch.randn(1, nk * tile, 1, 4, dtype=torch.float64)
    return q, k, v


def test_oracle_walks_in_ascending_order_with_running_max():
    # maxima 0, 5, -20, 3 (natural log). Threshold -10 (log2):
    #   tile 0: first -> kept; tile 1: +5 -> kept; tile 2: (-20 - 5) * log2e = -36 -> dropped;
    #   tile 3: (3 - 5) * log2e = -2.9 -> kept.
    q, k, v = hand_made([0.0, 5.0, -20.0, 3.0])
    res = oracle_attention(q, k, v, None, threshold=-10.0, tile_q=16, tile_k=16, scale=1.0)
    assert res.keep[0, 0, 0].tolist() == [True, True, False, True]
    assert res.margin[0, 0, 0, 0] == math.inf
    assert res.margin[0, 0, 0, 2].item() == pytest.approx(-25 * LOG2E + 10)
    assert res.margin[0, 0, 0, 3].item() == pytest.approx(-2 * LOG2E + 10)
    # Without tile 1 in the read list, tile 2 is compared against tile 0 only: -20 * log2e = -28.9, still
    # dropped; tile 3 becomes a new maximum.
    read = torch.tensor([True, False, True, True]).view(1, 1, 1, 4)
    res = oracle_attention(q, k, v, read, threshold=-10.0, tile_q=16, tile_k=16, scale=1.0)
    assert res.keep[0, 0, 0].tolist() == [True, False, False, True]
    assert res.margin[0, 0, 0, 3].item() == pytest.approx(3 * LOG2E + 10)
    # The first *processed* tile is kept however small it is.
    read = torch.tensor([False, False, True, False]).view(1, 1, 1, 4)
    res = oracle_attention(q, k, v, read, threshold=0.0, tile_q=16, tile_k=16, scale=1.0)
    assert res.keep[0, 0, 0].tolist() == [False, False, True, False]
    # Must-do tiles and must-do q-tiles are never dropped.
    res = oracle_attention(q, k, v, None, threshold=-10.0, tile_q=16, tile_k=16, scale=1.0, must_do=[(40, 41)])
    assert res.keep[0, 0, 0].tolist() == [True, True, True, True] and res.forced[0, 0, 0, 2]
    res = oracle_attention(q, k, v, None, threshold=-10.0, tile_q=16, tile_k=16, scale=1.0, must_do_q=[(0, 1)])
    assert res.keep.all()


def test_oracle_tile_range_helpers():
    assert overlapping_tiles([(40, 50)], 100, 32) == [1]
    assert overlapping_tiles([(60, 70)], 100, 32) == [1, 2]
    assert overlapping_tiles([(10, 10)], 100, 32) == []  # empty range
    assert covered_tiles([(32, 64), (64, 100)], 100, 32) == [1, 2, 3]  # partial last tile, union of ranges
    assert covered_tiles([(0, 63)], 100, 32) == [0]
    read = fresh_read(1, 2, 50, 100, 16, 32, [(0, 40)])
    assert read.shape == (1, 2, 4, 4) and read[..., 0].logical_not().all() and read[..., 1:].all()
