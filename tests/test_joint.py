"""``liteattn.merge_by_lse`` and ``liteattn.attention_with_lse``: the log-sum-exp algebra of joint and
sequence-parallel attention, against float64 softmax over the union of the key sets."""

import math

import pytest
import torch

import liteattn
from liteattn.testing import structured_qkv

from oracle import oracle_attention


def reference(q, k, v):
    """Full softmax attention in float64: out (B, S, H, Dv), lse (B, H, S)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return (torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v.double()),
            torch.logsumexp(scores, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cut", [1, 77, 199])
def test_merge_of_two_key_sets_equals_attention_over_their_union(dtype, cut):
    q, k, v = structured_qkv(2, 120, 3, 16, seq_k=200, seed=cut, dtype=dtype)
    parts = [liteattn.attention_with_lse(q, k[:, a:b], v[:, a:b]) for a, b in ((0, cut), (cut, 200))]
    out, lse = liteattn.merge_by_lse(*parts[0], *parts[1])
    ref_out, ref_lse = reference(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float32: 5e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2}[dtype]  # the LSEs are float32
    assert (out.double() - ref_out).abs().max() < tol
    assert (lse.double() - ref_lse).abs().max() < 1e-4 * (100 if dtype == torch.bfloat16 else 1)


def test_merge_is_nan_free_where_a_side_or_both_saw_nothing():
    """Risk (d): both LSEs -inf used to give NaN. Rows with nothing on one side take the other; rows with nothing
    on either side give 0 and -inf."""
    B, S, H, D = 1, 6, 2, 4
    out_a, out_b = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    lse_a, lse_b = torch.randn(B, H, S), torch.randn(B, H, S)
    lse_a[..., 0] = -math.inf  # row 0: only b
    lse_b[..., 1] = -math.inf  # row 1: only a
    lse_a[..., 2] = lse_b[..., 2] = -math.inf  # row 2: nothing
    out_a[:, 0], out_b[:, 1] = 0.0, 0.0  # what an attention over no key returns
    out_a[:, 2] = out_b[:, 2] = 0.0
    out, lse = liteattn.merge_by_lse(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[:, 0], out_b[:, 0])
    torch.testing.assert_close(out[:, 1], out_a[:, 1])
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2])) and torch.isneginf(lse[..., 2]).all()
    torch.testing.assert_close(lse[..., 3:], torch.logaddexp(lse_a[..., 3:], lse_b[..., 3:]))


def test_merge_refuses_mismatched_shapes():
    out, lse = torch.zeros(1, 5, 2, 4), torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="shapes differ"):
        liteattn.merge_by_lse(out, lse, out[:, :4], lse[..., :4])
    with pytest.raises(ValueError, match=r"lse must be \(B, H, S\)"):
        liteattn.merge_by_lse(out, lse.transpose(1, 2), out, lse.transpose(1, 2))


def test_merge_of_skipping_shards_equals_the_oracle_on_their_read_lists():
    """Sequence-parallel use: each K/V shard through its own LiteAttention, merged; at -inf it is full attention."""
    q, k, v = structured_qkv(1, 200, 2, 16, seed=9, dtype=torch.float64)
    sp = liteattn.SeqParallelLiteAttention(2, threshold=-math.inf, tile_q=32, tile_k=32, backend="torch")
    (o1, l1), (o2, l2) = (sp(q, k[:, a:b], v[:, a:b], i, return_softmax_lse=True)
                          for i, (a, b) in enumerate([(0, 120), (120, 200)]))
    merged, _ = liteattn.merge_by_lse(o1, l1, o2, l2)
    full = oracle_attention(q, k, v, None, threshold=-math.inf, tile_q=32, tile_k=32)
    torch.testing.assert_close(merged, full.out, rtol=1e-5, atol=1e-6)  # the LSEs are float32
