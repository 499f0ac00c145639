"""``LiteAttention``: state handling over consecutive calls (both keep rules). ``SeqParallelLiteAttention``:
test_module_seq_parallel.py; how a call is dispatched: test_module_dispatch.py."""

import logging
import math

import pytest
import torch

from liteattn import LiteAttention
from liteattn.state import decode_lse, encode_lse
from liteattn.testing import StructuredSequence, structured_qkv
from oracle import check_call, fresh_read

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
