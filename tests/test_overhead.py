"""``LiteAttention`` validates once per call signature (issue 11, item 2): the plan cache is used for repeated calls,
invalidated by any change of shape, dtype, device, ranges, settings or state, and never changes a result."""

import math

import pytest
import torch

from liteattn import LiteAttention, module, ops
from liteattn.testing import structured_qkv
from oracle import check_call


def inputs(seq=200, seq_k=None, heads=2, head_dim=16, dtype=torch.float32, batch=1, seed=2):
    return structured_qkv(batch, seq, heads, head_dim, seq_k=seq_k, dtype=dtype, seed=seed, sharpness=(1.0, 3.0))


@pytest.fixture
def plans_made(monkeypatch):
    """Counts the full validations (plan_call) that LiteAttention runs."""
    made = []
    real = ops.plan_call

    def counting(*args, **kwargs):
        made.append(kwargs.get("state") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "plan_call", counting)
    return made


def test_repeated_calls_validate_once(plans_made):
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    for _ in range(5):
        attn(q, k, v)
    assert plans_made == [True]
    assert attn.sparsity > 0  # the cached calls still skip and narrow the state down
    off = LiteAttention(enable_skipping=False, tile_q=32, tile_k=32)
    for _ in range(3):
        off(q, k, v)
    dense = LiteAttention(threshold=-math.inf, tile_q=32, tile_k=32)
    for _ in range(3):
        dense(q, k, v)
    assert plans_made == [True, False, False]


@pytest.mark.parametrize("change", ["seq", "seq_k", "heads", "batch", "head_dim", "dtype", "scale", "lse",
                                    "must_do", "must_do_q", "must_skip", "tile", "criterion", "backend"])
def test_a_change_validates_again(change, plans_made):
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch", max_batch_size=4)
    attn(q, k, v)
    attn(q, k, v)
    kwargs = {}
    if change in ("seq", "seq_k", "heads", "batch", "head_dim", "dtype"):
        q, k, v = inputs(**{"seq": dict(seq=168), "seq_k": dict(seq_k=232), "heads": dict(heads=3),
                            "batch": dict(batch=2), "head_dim": dict(head_dim=32),
                            "dtype": dict(dtype=torch.float64)}[change])
    elif change == "tile":
        attn.tile_q = attn.tile_k = 64
    elif change == "criterion":
        attn.criterion = "mass"
    elif change == "backend":
        attn.backend = None
    else:
        kwargs = {"scale": dict(scale=0.5), "lse": dict(return_softmax_lse=True),
                  "must_do": dict(must_do_list=[(0, 40)]), "must_do_q": dict(must_do_q_list=[(0, 40)]),
                  "must_skip": dict(must_skip_list=[(160, 200)])}[change]
    assert len(plans_made) == 1
    attn(q, k, v, **kwargs)
    assert len(plans_made) == 2, f"a {change} change must be validated"
    attn(q, k, v, **kwargs)
    assert len(plans_made) == 2


def test_bad_inputs_still_raise_after_cached_calls():
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch", max_batch_size=2)
    for _ in range(3):
        attn(q, k, v)
    before = attn.skip_state.bits.clone(), attn.skip_state.counts.clone()
    with pytest.raises(TypeError, match="share one dtype"):
        attn(q, k.half(), v)
    with pytest.raises(ValueError, match="head dims differ"):
        attn(q, k[..., :8], v)
    with pytest.raises(ValueError, match="lengths differ"):
        attn(q, k, v[:, :100])
    with pytest.raises(ValueError, match="head counts differ"):
        attn(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="4-D"):
        attn(q[0], k, v)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attn(q.numpy(), k, v)
    with pytest.raises(ValueError, match="scale"):
        attn(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="scale"):
        attn(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match="must_do"):
        attn(q, k, v, must_do_list=[(0, 500)])
    with pytest.raises(ValueError, match="must_skip"):
        attn(q, k, v, must_skip_list=[(-4, 10)])
    attn.max_batch_size = 1  # a setting changed between calls is seen
    with pytest.raises(ValueError, match="max_batch_size=1"):
        attn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))
    assert torch.equal(before[0], attn.skip_state.bits) and torch.equal(before[1], attn.skip_state.counts)


def test_a_range_list_changed_in_place_is_seen(plans_made):
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    ranges = [(0, 40)]
    attn(q, k, v, must_do_list=ranges)
    attn(q, k, v, must_do_list=ranges)
    assert len(plans_made) == 1
    ranges[0] = (0, 500)  # the cache keeps a copy, not the list
    with pytest.raises(ValueError, match="must_do"):
        attn(q, k, v, must_do_list=ranges)
    ranges[0] = (160, 200)
    read = attn.skip_state.to_dense().clone()
    out = attn(q, k, v, must_do_list=ranges)
    assert len(plans_made) == 3  # the refused call was validated too
    check_call(q, k, v, read, out, None, attn.skip_state.to_dense(), threshold=-3.0, tile_q=32, tile_k=32,
               must_do=[(160, 200)])


def test_tensor_ranges_are_validated_every_call(plans_made):
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    ranges = torch.tensor([0, 40])
    attn(q, k, v, must_do_list=ranges)
    attn(q, k, v, must_do_list=ranges)
    assert len(plans_made) == 2
    ranges[1] = 500  # changed in place: caught
    with pytest.raises(ValueError, match="must_do"):
        attn(q, k, v, must_do_list=ranges)


def test_device_change_validates_and_rebuilds_the_state():
    # The 'meta' device stands in for a second device: shapes flow, no data.
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    attn(q, k, v)
    attn(q, k, v)
    cpu_state = attn.skip_state
    out = attn(q.to("meta"), k.to("meta"), v.to("meta"))
    assert out.device.type == "meta" and attn.skip_state.device.type == "meta"
    out = attn(q, k, v)  # back: the old signature's plan held the old state; a fresh one is built
    assert attn.skip_state is not cpu_state and attn.skip_state.device.type == "cpu" and attn.sparsity == 0.0
    check_call(q, k, v, None, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)


def test_back_to_an_earlier_shape_uses_the_current_state():
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    a, b = inputs(seq=200), inputs(seq=136)
    for _ in range(2):
        attn(*a)
    attn(*b)
    state_b = attn.skip_state
    out = attn(*a)  # a's plan was made for a's first state, which the shape change replaced
    assert attn.skip_state is not state_b and attn.skip_state.seq_q == 200 and attn.sparsity == 0.0
    check_call(*a, None, out, None, attn.skip_state.read.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)


def test_free_and_reset_are_seen():
    q, k, v = inputs()
    attn = LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch")
    for _ in range(3):
        attn(q, k, v)
    assert attn.sparsity > 0
    old = attn.skip_state
    attn.free_skip_state()
    attn(q, k, v)
    assert attn.skip_state is not old and attn.sparsity == 0.0
    attn(q, k, v)
    assert attn.sparsity > 0
    attn.reset_skip_state()
    attn(q, k, v)
    assert attn.sparsity == 0.0


def _run(attn, calls):
    results = []
    for action, arg in calls:
        if action == "threshold":
            attn.threshold = arg
        elif action == "skipping":
            attn.enable_skipping = arg
        elif action == "reset":
            attn.reset_skip_state()
        else:
            (q, k, v), kwargs = arg
            out = attn(q, k, v, **kwargs)
            results.append((out, None if attn.skip_state is None else attn.skip_state.to_dense().clone(),
                            attn.sparsity))
    return results


def test_the_cache_changes_no_result(monkeypatch):
    """A sequence of calls with changing shapes, dtypes, ranges, thresholds and switches gives bit-identical outputs,
    states and sparsities with the cache and with every call validated."""
    a, b = inputs(seq=200, seed=1), inputs(seq=168, seed=2)
    a16 = tuple(t.to(torch.float64) for t in a)
    calls = [("call", (a, {})), ("call", (a, {})), ("threshold", -2.0), ("call", (a, {})),
             ("call", (a, dict(must_do_list=[(0, 40)]))), ("call", (a, dict(must_do_list=[(0, 40)]))),
             ("call", (a16, {})), ("call", (a, {})), ("threshold", -math.inf), ("call", (a, {})),
             ("skipping", False), ("call", (a, {})), ("call", (b, {})), ("skipping", True), ("call", (b, {})),
             ("call", (a, {})), ("call", (a, dict(return_softmax_lse=True))), ("reset", None), ("call", (a, {})),
             ("threshold", -3.0), ("call", (a, dict(must_skip_list=[(0, 32)]))),
             ("call", (a, dict(must_skip_list=[(0, 32)]))), ("call", (a, dict(scale=0.3))), ("call", (a, {}))]
    cached = _run(LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch"), calls)
    monkeypatch.setattr(LiteAttention, "_signature", lambda self, *args: None)  # every call fully validated
    uncached = _run(LiteAttention(threshold=-3.0, tile_q=32, tile_k=32, backend="torch"), calls)
    assert len(cached) == len(uncached)
    for n, ((out, state, sparsity), (ref_out, ref_state, ref_sparsity)) in enumerate(zip(cached, uncached)):
        out, ref_out = (out, ref_out) if isinstance(out, tuple) else ((out,), (ref_out,))
        assert all(torch.equal(x, y) for x, y in zip(out, ref_out)), f"call {n}"
        assert (state is None) == (ref_state is None) and (state is None or torch.equal(state, ref_state)), n
        assert sparsity == ref_sparsity, n
