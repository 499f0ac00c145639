"""``LiteAttention`` and ``SeqParallelLiteAttention``: state handling over consecutive calls."""

import logging
import math

import pytest
import torch

from liteattn import LiteAttention, SeqParallelLiteAttention
from liteattn.state import decode_lse, encode_lse
from liteattn.testing import StructuredSequence, structured_qkv
from oracle import check_call, fresh_read, oracle_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_seq(steps=4, seq=300, heads=2, head_dim=16, dtype=torch.float32, seed=0, **kw):
    return StructuredSequence(steps, batch=1, seq_q=seq, heads=heads, head_dim=head_dim, drift=0.3,
                              sharpness=(1.0, 3.0), dtype=dtype, seed=seed, **kw)


def state_snapshot(attn: LiteAttention):
    """What the next call will read, and what the latest call computed."""
    s = attn.skip_state
    return s.bits.clone(), s.counts.clone()


def same_state(before, after) -> bool:
    return torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_calls_match_oracle(dtype):
    attn = LiteAttention(threshold=-5.0, tile_q=32, tile_k=32, backend="torch")
    assert attn.sparsity == 0.0 and attn.skip_state is None
    reads = []
    for n, (q, k, v) in enumerate(make_seq(dtype=dtype, seed=3)):
        if attn.skip_state is None:
            read = fresh_read(1, 2, 300, 300, 32, 32)
        else:
            read = attn.skip_state.read.to_dense().clone()
        reads.append(read)
        out, lse = attn(q, k, v, return_softmax_lse=True)
        written = attn.skip_state.read.to_dense()  # what this call narrowed the state down to
        attn.skip_state.read.check()
        check_call(q, k, v, read, out, lse, written, threshold=-5.0, tile_q=32, tile_k=32)
        # sparsity = 1 - computed / total of this call's read list
        assert attn.sparsity == pytest.approx(1 - read.float().mean().item(), abs=1e-6)
    reads.append(attn.skip_state.read.to_dense())
    for before, after in zip(reads, reads[1:]):
        assert not (after & ~before).any()  # skip sets only grow
    assert attn.sparsity > 0.1


def test_return_softmax_lse_shapes_and_dtypes():
    q, k, v = structured_qkv(2, 97, 3, 16, seq_k=130, value_dim=8, dtype=torch.bfloat16, seed=1)
    for enable in (True, False):
        attn = LiteAttention(enable_skipping=enable, tile_q=32, tile_k=64, backend="torch")
        out = attn(q, k, v)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 97, 3, 8) and out.dtype == torch.bfloat16
        out, lse = attn(q, k, v, return_softmax_lse=True)
        assert out.shape == (2, 97, 3, 8) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 3, 97) and lse.dtype == torch.float32


def test_threshold_minus_inf_keeps_everything():
    attn = LiteAttention(threshold=-math.inf, tile_q=32, tile_k=32, backend="torch")
    for q, k, v in make_seq(steps=3):
        out = attn(q, k, v)
        assert attn.sparsity == 0.0
        check_call(q, k, v, None, out, threshold=-math.inf, tile_q=32, tile_k=32)
    assert attn.skip_state.read.to_dense().all()


def test_reset_skip_state():
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    steps = list(make_seq(steps=3, seed=4))
    for q, k, v in steps:
        attn(q, k, v)
    assert attn.sparsity > 0 and not attn.skip_state.read.to_dense().all()
    attn.reset_skip_state()
    assert attn.sparsity == 0.0
    assert attn.skip_state.read.to_dense().all() and attn.skip_state.to_dense().all()
    q, k, v = steps[-1]
    out = attn(q, k, v)
    assert attn.sparsity == 0.0
    check_call(q, k, v, None, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)


def test_reset_restores_must_skip():
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    q, k, v = structured_qkv(1, 300, 2, 16, seed=4, sharpness=(1.0, 3.0))
    for _ in range(2):
        attn(q, k, v, must_skip_list=[(0, 64)])
    assert attn.sparsity > 0.2
    attn.reset_skip_state()
    assert attn.sparsity == 0.0  # fresh state: no call yet
    assert torch.equal(attn.skip_state.read.to_dense(), fresh_read(1, 2, 300, 300, 32, 32, [(0, 64)]))


def test_disable_gives_dense_and_leaves_state_untouched():
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    steps = list(make_seq(steps=4, seed=5))
    for q, k, v in steps[:2]:
        attn(q, k, v)
    before = state_snapshot(attn)
    sparsity_before = attn.sparsity
    assert sparsity_before > 0
    attn.enable_skip_optimization(False)
    q, k, v = steps[2]
    out, lse = attn(q, k, v, return_softmax_lse=True)
    check_call(q, k, v, None, out, lse, threshold=-math.inf, tile_q=32, tile_k=32)  # dense
    assert attn.sparsity == 0.0
    assert same_state(before, state_snapshot(attn))
    # Back on: it resumes from the same read list.
    attn.enable_skip_optimization()
    read = attn.skip_state.read.to_dense().clone()
    out = attn(q, k, v)
    check_call(q, k, v, read, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)
    assert attn.sparsity == pytest.approx(1 - read.float().mean().item())


def test_sparsity_with_must_skip():
    attn = LiteAttention(threshold=-math.inf, tile_q=32, tile_k=32, backend="torch")
    q, k, v = structured_qkv(1, 100, 2, 16, seed=1)
    attn(q, k, v, must_skip_list=[(0, 64)])  # k-tiles 0 and 1 of 4
    assert attn.sparsity == pytest.approx(0.5)


CHANGES = {
    "batch": (dict(batch=2), "batch"),
    "seq_q": (dict(seq_q=97), "seq_q"),
    "seq_k": (dict(seq_k=130), "seq_k"),
    "heads": (dict(heads=3), "heads"),
}
# The lists depend on neither: a dtype change mid-run (or another head dim) keeps the state.
KEPT = {"head_dim": dict(head_dim=32), "dtype": dict(dtype=torch.float16)}


@pytest.mark.parametrize("change", list(CHANGES))
def test_reinit_on_change_logs_one_line(change, caplog):
    base = dict(batch=1, seq_q=200, seq_k=200, heads=2, head_dim=16, dtype=torch.float32)
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    caplog.set_level(logging.INFO, logger="liteattn")

    def inputs(batch, seq_q, seq_k, heads, head_dim, dtype):
        return structured_qkv(batch, seq_q, heads, head_dim, seq_k=seq_k, dtype=dtype, seed=2,
                              sharpness=(1.0, 3.0))

    for _ in range(2):
        attn(*inputs(**base))
    assert attn.sparsity > 0
    assert not [r for r in caplog.records if r.name == "liteattn"], "no log line without a change"
    old_state = attn.skip_state
    kw, word = CHANGES[change]
    new = dict(base, **kw)
    q, k, v = inputs(**new)
    out = attn(q, k, v)
    records = [r for r in caplog.records if r.name == "liteattn"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "re-initialising" in records[0].getMessage() and word in records[0].getMessage()
    assert attn.skip_state is not old_state
    assert attn.sparsity == 0.0  # the new state is fresh: this call computed every tile
    check_call(q, k, v, None, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)
    attn(q, k, v)  # same shapes again: no further line
    assert len([r for r in caplog.records if r.name == "liteattn"]) == 1


@pytest.mark.parametrize("change", list(KEPT))
def test_dtype_or_head_dim_change_keeps_the_state(change, caplog):
    """Risk (f) of the architecture issue: a dtype change mid-run used to restart the skip state."""
    base = dict(batch=1, seq_q=200, seq_k=200, heads=2, head_dim=16, dtype=torch.float32)
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    caplog.set_level(logging.INFO, logger="liteattn")

    def inputs(**kw):
        p = dict(base, **kw)
        return structured_qkv(p["batch"], p["seq_q"], p["heads"], p["head_dim"], seq_k=p["seq_k"], dtype=p["dtype"],
                              seed=2, sharpness=(1.0, 3.0))

    for _ in range(2):
        attn(*inputs())
    state, read = attn.skip_state, attn.skip_state.read.to_dense().clone()
    assert not read.all()
    q, k, v = inputs(**KEPT[change])
    out = attn(q, k, v)
    assert attn.skip_state is state and not [r for r in caplog.records if r.name == "liteattn"]
    assert attn.sparsity == pytest.approx(1 - read.float().mean().item())  # it read the list the last call wrote
    check_call(q, k, v, read, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)


def test_reinit_on_device_change(caplog):
    # The 'meta' device stands in for a second device: shapes flow, no data.
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    q, k, v = structured_qkv(1, 100, 2, 16, seed=1)
    attn(q, k, v)
    caplog.set_level(logging.INFO, logger="liteattn")
    out = attn(q.to("meta"), k.to("meta"), v.to("meta"))
    assert out.device.type == "meta" and attn.skip_state.device.type == "meta"
    records = [r.getMessage() for r in caplog.records if r.name == "liteattn"]
    assert len(records) == 1 and "device cpu -> meta" in records[0], records
    attn(q, k, v)
    assert attn.skip_state.device.type == "cpu" and attn.sparsity == 0.0


def test_max_batch_size():
    attn = LiteAttention(max_batch_size=2, backend="torch")
    q, k, v = structured_qkv(3, 40, 1, 8)
    with pytest.raises(ValueError, match=r"batch size 3 exceeds max_batch_size=2"):
        attn(q, k, v)
    attn(q[:2], k[:2], v[:2])  # within the limit
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch_size"):
            LiteAttention(max_batch_size=bad)


def test_set_threshold_validation():
    attn = LiteAttention(threshold=-10.0, backend="torch")
    attn.set_threshold(-3)
    assert attn.threshold == -3.0
    attn.set_threshold(0.0)
    attn.set_threshold(-math.inf)
    assert attn.threshold == -math.inf
    with pytest.raises(ValueError, match=r"threshold must be <= 0.*got 0.5"):
        attn.set_threshold(0.5)
    with pytest.raises(ValueError, match=r"threshold must be <= 0.*got nan"):
        attn.set_threshold(float("nan"))
    with pytest.raises(TypeError, match="threshold must be a real number"):
        attn.set_threshold("-3")
    with pytest.raises(TypeError, match="threshold must be a real number"):
        attn.set_threshold(None)
    assert attn.threshold == -math.inf  # failed sets change nothing
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        LiteAttention(threshold=1.0)
    assert LiteAttention(threshold=math.inf).threshold == math.inf  # the reference's "keep only what must be kept"


def test_threshold_change_applies_to_next_call():
    q, k, v = structured_qkv(1, 300, 2, 16, seed=4, sharpness=(1.0, 3.0))
    attn = LiteAttention(threshold=-math.inf, tile_q=32, tile_k=32, backend="torch")
    attn(q, k, v)
    attn(q, k, v)
    assert attn.sparsity == 0.0
    attn.set_threshold(-2.0)
    read = attn.skip_state.read.to_dense().clone()
    out = attn(q, k, v)
    check_call(q, k, v, read, out, None, attn.skip_state.read.to_dense(), threshold=-2.0, tile_q=32, tile_k=32)
    attn(q, k, v)
    assert attn.sparsity > 0


@pytest.mark.parametrize("form", ["pairs", "flat"])
def test_module_must_do_and_must_skip(form):
    must_do = [(40, 70)] if form == "pairs" else [70, 40]  # k-tiles 1 and 2
    must_skip = [(256, 300)] if form == "pairs" else [256, 300]  # covers tile 8 = [256, 288) and 9 = [288, 300)
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    for n, (q, k, v) in enumerate(make_seq(seed=6)):
        read = (fresh_read(1, 2, 300, 300, 32, 32, [(256, 300)]) if n == 0
                else attn.skip_state.read.to_dense().clone())
        out = attn(q, k, v, must_do_list=must_do, must_skip_list=must_skip)
        check_call(q, k, v, read, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32,
                   tile_k=32, must_do=[(40, 70)])
    final = attn.skip_state.read.to_dense()
    assert final[..., [1, 2]].all()
    assert not final[..., [8, 9]].any()
    assert not final.all()


def test_module_must_do_q():
    q, k, v = structured_qkv(1, 300, 2, 16, seed=11, sharpness=(1.0, 3.0))
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    for n in range(3):
        read = fresh_read(1, 2, 300, 300, 32, 32) if n == 0 else attn.skip_state.read.to_dense().clone()
        out = attn(q, k, v, must_do_q_list=[200, 193])  # flat form: rows 193..199, q-tile 6
        check_call(q, k, v, read, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32,
                   tile_k=32, must_do_q=[(193, 200)])
    final = attn.skip_state.read.to_dense()
    assert final[:, :, 6].all() and not final.all()


def test_failed_call_leaves_state_untouched():
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    q, k, v = structured_qkv(1, 200, 2, 16, seed=4, sharpness=(1.0, 3.0))
    attn(q, k, v)
    before = state_snapshot(attn)
    with pytest.raises(ValueError, match="must_do"):
        attn(q, k, v, must_do_list=[(0, 500)])
    with pytest.raises(ValueError, match="scale"):
        attn(q, k, v, scale=-1.0)
    assert same_state(before, state_snapshot(attn))


# -- sequence parallel ------------------------------------------------------------------------------

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


def test_mass_criterion_keeps_the_previous_lse_in_the_state():
    attn = LiteAttention(threshold=-8.0, tile_q=32, tile_k=32, backend="torch", criterion="mass")
    assert "criterion='mass'" in repr(attn)
    reads = []
    for n, (q, k, v) in enumerate(make_seq(seed=7)):
        state = attn.skip_state
        read = fresh_read(1, 2, 300, 300, 32, 32) if state is None else state.read.to_dense().clone()
        lse_prev = None if state is None else state.lse  # decoded: what the call measures against
        if state is not None and n == 1:
            assert torch.isfinite(lse_prev).all()  # the first call left its LSE
        out, lse = attn(q, k, v, return_softmax_lse=True)
        assert torch.equal(attn.skip_state.lse, decode_lse(*encode_lse(lse, 32), 32))  # rounded down, 8 bits a row
        check_call(q, k, v, read, out, lse, attn.skip_state.read.to_dense(), threshold=-8.0, tile_q=32, tile_k=32,
                   criterion="mass", lse_prev=lse_prev)
        reads.append(read)
    assert attn.sparsity > 0.1
    attn.reset_skip_state()
    assert torch.isnan(attn.skip_state.lse).all()  # a new run has no previous call
    with pytest.raises(ValueError, match="criterion"):
        LiteAttention(criterion="sum")


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


# -- the eager path's imports (issue 15, item 6) -------------------------------------------------------------

def test_eager_calls_do_not_import_dynamo():
    """A plain eager call skips the custom op's dispatcher, whose kernel guard imports torch._dynamo (and sympy,
    triton, ...: ~1.5 s) on the op's first call in a process. The module set is asserted, not the time."""
    import subprocess
    import sys

    code = ("import sys, torch, liteattn\n"
            "q = torch.randn(1, 100, 2, 16)\n"
            "attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32)\n"
            "for _ in range(2): out, lse = attn(q, q, q, return_softmax_lse=True, must_do_list=[(0, 10)])\n"
            "sp = liteattn.SeqParallelLiteAttention(2, tile_q=32, tile_k=32)\n"
            "sp(q, q[:, :50], q[:, :50], 0, must_do_q_list=[(0, 16)])\n"
            "liteattn.lite_attention(q, q, q, tile_q=32, tile_k=32)\n"
            "heavy = ('torch._dynamo', 'torch._inductor', 'sympy')\n"
            "print(sorted(p for p in heavy if any(m == p or m.startswith(p + '.') for m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_custom_op_still_runs_when_something_watches_the_call():
    """Autograd (backward raises), dispatch modes (the op is one node) and the direct path agree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    q, k, v = structured_qkv(1, 100, 2, 16, seed=2)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    direct, watched = (LiteAttention(threshold=-2.0, tile_q=32, tile_k=32, backend="torch") for _ in range(2))
    for step in range(3):
        out = direct(q, k, v)
        with Ops() as ops:
            ref = watched(q, k, v)
        assert "liteattn.attention_fwd.default" in ops.seen
        assert torch.equal(out, ref)
        assert torch.equal(direct.skip_state.read.to_dense(), watched.skip_state.read.to_dense())
    assert direct.sparsity > 0
    qg = q.clone().requires_grad_()
    out = LiteAttention(tile_q=32, tile_k=32, backend="torch")(qg, k, v)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


def test_dense_calls_take_pytorchs_attention(monkeypatch):
    """Issue 11: a call that reads every tile and decides nothing (skipping off, or -inf on an untouched state) is
    plain attention, and runs PyTorch's scaled_dot_product_attention (cuDNN / FlashAttention on a GPU)."""
    from liteattn import backends

    chosen = []
    real_choose = backends.choose
    monkeypatch.setattr(backends, "choose", lambda *a, **kw: chosen.append(real_choose(*a, **kw)) or chosen[-1])
    q, k, v = structured_qkv(1, 200, 2, 16, seed=3, sharpness=(1.0, 3.0))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2)).transpose(1, 2)
    off = LiteAttention(enable_skipping=False, tile_q=32, tile_k=32)
    assert torch.equal(off(q, k, v), sdpa) and chosen[-1] == "sdpa"
    attn = LiteAttention(threshold=-math.inf, tile_q=32, tile_k=32)
    for _ in range(2):
        assert torch.equal(attn(q, k, v), sdpa) and chosen[-1] == "sdpa"
        assert attn.skip_state.untouched and attn.sparsity == 0.0
    attn(q, k, v, return_softmax_lse=True)  # an LSE is asked for: the core's dense path
    assert chosen[-1] == "torch"
    attn.set_threshold(-2.0)
    attn(q, k, v)
    assert chosen[-1] == "torch" and not attn.skip_state.untouched and attn.skip_state.sparsity() > 0
    attn.set_threshold(-math.inf)  # tiles were dropped: the state path, on the narrowed list
    attn(q, k, v)
    assert chosen[-1] == "torch" and attn.sparsity > 0
    attn.reset_skip_state()
    attn(q, k, v)
    assert chosen[-1] == "sdpa"
