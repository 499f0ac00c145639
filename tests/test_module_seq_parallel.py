"""``SeqParallelLiteAttention``: one independent state per K/V shard, merging to full attention, validation,
``must_do_q_list`` reaching the shard, repr and tensor thresholds."""

import math

import pytest
import torch

from liteattn import LiteAttention, SeqParallelLiteAttention
from liteattn.testing import structured_qkv
from oracle import oracle_attention


def test_seq_parallel_independent_states():
    q, k, v = structured_qkv(1, 256, 2, 16, seed=8, sharpness=(1.0, 3.0))
    shards = [(k[:, :160], v[:, :160]), (k[:, 160:], v[:, 160:])]  # unequal shard lengths
    sp = SeqParallelLiteAttention(2, threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    singles = [LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch") for _ in range(2)]
    for step in range(3):
        for idx, (ks, vs) in enumerate(shards):
            out, lse = sp(q, ks, vs, idx, return_softmax_lse=True)
            ref_out, ref_lse = singles[idx](q, ks, vs, return_softmax_lse=True)
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
            assert torch.equal(sp[idx].skip_state.read.to_dense(), singles[idx].skip_state.read.to_dense())
    assert sp[0].skip_state is not sp[1].skip_state
    assert sp[0].skip_state.seq_k == 160 and sp[1].skip_state.seq_k == 96
    assert sp.sparsity == pytest.approx((sp[0].sparsity + sp[1].sparsity) / 2) and sp.sparsity > 0
    sp.reset_skip_state()
    assert sp[0].skip_state.read.to_dense().all() and sp[1].skip_state.read.to_dense().all()


def test_seq_parallel_merge_equals_full_attention():
    q, k, v = structured_qkv(1, 200, 2, 16, seed=9, dtype=torch.float64)
    sp = SeqParallelLiteAttention(2, threshold=-math.inf, tile_q=32, tile_k=32, backend="torch")
    parts = [sp(q, k[:, a:b], v[:, a:b], i, return_softmax_lse=True) for i, (a, b) in enumerate([(0, 120), (120, 200)])]
    lses = torch.stack([lse for _, lse in parts])  # (2, B, H, S)
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).permute(0, 1, 3, 2).unsqueeze(-1).to(torch.float64)  # (2, B, S, H, 1)
    merged = sum(w * o for w, (o, _) in zip(weights, parts))
    full = oracle_attention(q, k, v, None, threshold=-math.inf, tile_q=32, tile_k=32)
    torch.testing.assert_close(merged, full.out, rtol=1e-5, atol=1e-6)


def test_seq_parallel_validation():
    sp = SeqParallelLiteAttention(2, backend="torch")
    q, k, v = structured_qkv(1, 40, 1, 8)
    for bad in (-1, 2, True, 1.0, None):
        with pytest.raises(ValueError, match=r"split_idx must be an int in \[0, 2\)"):
            sp(q, k, v, bad)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_nodes"):
            SeqParallelLiteAttention(bad)
    sp.set_threshold(-4.0)
    assert sp.threshold == -4.0 and all(a.threshold == -4.0 for a in sp.attns)
    with pytest.raises(ValueError, match="threshold"):
        sp.set_threshold(1.0)
    sp.enable_skip_optimization(False)
    assert not any(a.enable_skipping for a in sp.attns)


def test_seq_parallel_must_do_q_reaches_the_shard():
    """`must_do_q_list` goes through to the shard's LiteAttention: the shard computes exactly what a single
    LiteAttention with the same ranges computes, and the must-do q-tile keeps every tile."""
    q, k, v = structured_qkv(1, 300, 2, 16, seed=11, sharpness=(1.0, 3.0))
    shards = [(k[:, :180], v[:, :180]), (k[:, 180:], v[:, 180:])]
    sp = SeqParallelLiteAttention(2, threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    singles = [LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch") for _ in range(2)]
    for step in range(3):
        for idx, (ks, vs) in enumerate(shards):
            out, lse = sp(q, ks, vs, idx, return_softmax_lse=True, must_do_q_list=[(193, 200)])
            ref_out, ref_lse = singles[idx](q, ks, vs, return_softmax_lse=True, must_do_q_list=[(193, 200)])
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
            assert torch.equal(sp[idx].skip_state.read.to_dense(), singles[idx].skip_state.read.to_dense())
    for idx in range(2):
        final = sp[idx].skip_state.read.to_dense()
        assert final[:, :, 6].all() and not final.all()  # q-tile 6 (rows 192..223) never drops a tile


def test_seq_parallel_repr_and_tensor_threshold():
    sp = SeqParallelLiteAttention(2, threshold=-5.0, tile_q=32, tile_k=64, backend="torch")
    assert repr(sp) == ("SeqParallelLiteAttention(num_nodes=2, enable_skipping=True, threshold=-5.0, tile_q=32, "
                        "tile_k=64, backend='torch', criterion='max', states=[none, none])")
    q, k, v = structured_qkv(1, 100, 2, 16, seed=1)
    sp(q, k[:, :70], v[:, :70], 1)
    assert repr(sp).endswith("states=[none, (1, 2, 4, 2)])")
    sp.set_threshold(torch.tensor(-2.0))  # as LiteAttention: a number or a one-element tensor
    assert sp.threshold == -2.0 and all(a.threshold == -2.0 for a in sp.attns)
    assert "threshold=-2.0" in repr(sp)
