"""Every bad input raises ValueError or TypeError whose message names the problem, at every entry point."""

import logging
import math

import pytest
import torch

from liteattn import LiteAttention, SeqParallelLiteAttention, SkipState, lite_attention

from lists import ListPair


def good(b=1, sq=40, sk=50, h=2, d=16, dv=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, sq, h, d, generator=gen).to(dtype), torch.randn(b, sk, h, d, generator=gen).to(dtype),
            torch.randn(b, sk, h, dv, generator=gen).to(dtype))


def call_op(q, k, v, **kw):
    return lite_attention(q, k, v, backend="torch", **kw)


def call_module(q, k, v, **kw):
    return LiteAttention(tile_q=16, tile_k=16, backend="torch")(q, k, v, **kw)


def call_dense_module(q, k, v, **kw):
    return LiteAttention(enable_skipping=False, backend="torch")(q, k, v, **kw)


def call_seq_parallel(q, k, v, **kw):
    return SeqParallelLiteAttention(2, tile_q=16, tile_k=16, backend="torch")(q, k, v, 1, **kw)


ENTRY_POINTS = [call_op, call_module, call_dense_module, call_seq_parallel]


def _replace(which, fn):
    def make():
        q, k, v = good()
        args = {"q": q, "k": k, "v": v}
        args[which] = fn(args[which])
        return args["q"], args["k"], args["v"]
    return make


BAD_QKV = {
    "q 3-D": (_replace("q", lambda t: t[0]), ValueError, r"q must be 4-D \(batch, seq, heads, head_dim\), got shape \(40, 2, 16\)"),
    "k 5-D": (_replace("k", lambda t: t[None]), ValueError, r"k must be 4-D .*got shape \(1, 1, 50, 2, 16\)"),
    "v 2-D": (_replace("v", lambda t: t[0, :, 0]), ValueError, r"v must be 4-D"),
    "batch": (_replace("k", lambda t: t.expand(2, -1, -1, -1)), ValueError, r"batch sizes differ: q 1, k 2, v 1"),
    "heads": (_replace("v", lambda t: t[:, :, :1]), ValueError, r"head counts differ: q 2, k 2, v 1"),
    "head dim": (_replace("k", lambda t: t[..., :8]), ValueError, r"q and k head dims differ: 16 vs 8"),
    "k/v length": (_replace("v", lambda t: t[:, :49]), ValueError, r"k and v lengths differ: 50 vs 49"),
    "int": (_replace("q", lambda t: t.to(torch.int32)), TypeError,
            r"q must be float16, bfloat16, float32 or float64, got torch.int32"),
    "bool": (_replace("v", lambda t: t > 0), TypeError, r"v must be float16, bfloat16, float32 or float64, got torch.bool"),
    "int64 k": (_replace("k", lambda t: t.long()), TypeError, r"k must be float16.*got torch.int64"),
    "mixed": (_replace("k", lambda t: t.half()), TypeError,
              r"q, k and v must share one dtype, got torch.float32, torch.float16, torch.float32"),
    "numpy": (_replace("q", lambda t: t.numpy()), TypeError, r"q must be a torch.Tensor, got ndarray"),
    "list": (_replace("v", lambda t: t.tolist()), TypeError, r"v must be a torch.Tensor, got list"),
    "None": (_replace("k", lambda t: None), TypeError, r"k must be a torch.Tensor, got NoneType"),
    "device": (_replace("k", lambda t: t.to("meta")), ValueError, r"q, k and v must be on one device, got cpu, meta, cpu"),
    "empty": (_replace("q", lambda t: t[:, :0]), ValueError, r"q is empty \(shape \(1, 0, 2, 16\)\)"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", list(BAD_QKV))
def test_bad_qkv(entry, case):
    make, exc, pattern = BAD_QKV[case]
    q, k, v = make()
    with pytest.raises(exc, match=pattern):
        entry(q, k, v)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_good_inputs_pass(entry):
    """The baseline of the table above: the unmodified inputs work at every entry point."""
    q, k, v = good()
    out = entry(q, k, v)
    assert out.shape == (1, 40, 2, 8)
    q, k, v = good(dtype=torch.bfloat16)
    assert entry(q, k, v).dtype == torch.bfloat16


@pytest.mark.parametrize("entry", [call_op, call_module, call_seq_parallel], ids=lambda f: f.__name__)
@pytest.mark.parametrize("ranges,exc,pattern", [
    ([(0, 51)], ValueError, r"range \[0, 51\) lies outside the sequence of length 50"),
    ([(-1, 5)], ValueError, r"outside the sequence"),
    ([(5, 2)], ValueError, r"range \(5, 2\) has start > end"),
    ([1, 2, 3], ValueError, r"flat form .* even number of entries, got 3"),
    ([(1, 2, 3)], ValueError, r"each range must be \(start, end\)"),
    ([(1, 2), 5, 6], TypeError, r"mixes \(start, end\) pairs and plain numbers"),
    ([(1.5, 2)], TypeError, r"must hold integers, got 1.5"),
    ("0-10", TypeError, r"must be a list of \(start, end\) pairs or a flat list"),
    (7, TypeError, r"must be a list of \(start, end\) pairs"),
])
def test_bad_must_do_ranges(entry, ranges, exc, pattern):
    q, k, v = good()
    key = "must_do" if entry is call_op else "must_do_list"
    with pytest.raises(exc, match=r"must_do.*" + pattern if exc is ValueError else pattern):
        entry(q, k, v, **{key: ranges})


@pytest.mark.parametrize("entry", [call_module, call_seq_parallel], ids=lambda f: f.__name__)
def test_bad_must_skip_ranges(entry):
    q, k, v = good()
    with pytest.raises(ValueError, match=r"must_skip_list: range \[40, 60\) lies outside the sequence of length 50"):
        entry(q, k, v, must_skip_list=[(40, 60)])
    with pytest.raises(ValueError, match=r"must_skip_list: the flat form"):
        entry(q, k, v, must_skip_list=[4])


def test_bad_must_do_q_and_must_skip_state():
    q, k, v = good()
    with pytest.raises(ValueError, match=r"must_do_q: range \[0, 41\) lies outside the sequence of length 40"):
        call_op(q, k, v, must_do_q=[(0, 41)])
    with pytest.raises(ValueError, match=r"must_skip: range \[0, 51\) lies outside"):
        SkipState(1, 2, 40, 50, 16, 16, must_skip=[(0, 51)])


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_bad_scale(entry, scale):
    q, k, v = good()
    with pytest.raises(ValueError, match=r"scale must be a positive finite number or None"):
        entry(q, k, v, scale=scale)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", ["0.1", True])
def test_scale_of_wrong_type(entry, scale):
    q, k, v = good()
    with pytest.raises(TypeError, match=r"scale must be a positive finite number or None"):
        entry(q, k, v, scale=scale)


@pytest.mark.parametrize("threshold,exc,pattern", [
    (0.1, ValueError, r"threshold must be <= 0 .*got 0.1"),
    (1e30, ValueError, r"threshold must be <= 0 .*got 1e\+30"),
    (math.nan, ValueError, r"threshold must be <= 0 .*got nan"),
    ("-3", TypeError, r"threshold must be a real number"),
    (None, TypeError, r"threshold must be a real number"),
    (torch.tensor([-3.0, -4.0]), (TypeError, ValueError), r"tensor threshold must"),
])
def test_bad_threshold(threshold, exc, pattern):
    q, k, v = good()
    with pytest.raises(exc, match=pattern):
        call_op(q, k, v, threshold=threshold)
    with pytest.raises(exc, match=pattern):
        LiteAttention().set_threshold(threshold)
    with pytest.raises(exc, match=pattern):
        LiteAttention(threshold=threshold)
    with pytest.raises(exc, match=pattern):
        SeqParallelLiteAttention(2, threshold=threshold)


def test_tensor_thresholds():
    """LiteAttention takes what enable takes: numbers and one-element tensors, checked when set. The core takes a
    0-d float32 tensor on the inputs' device as is (the kernels read it at run time)."""
    attn = LiteAttention(threshold=torch.tensor(-4.0), backend="torch")
    assert attn.threshold == -4.0
    attn.set_threshold(torch.tensor([-6], dtype=torch.int64))
    assert attn.threshold == -6.0
    for bad in (torch.tensor(0.5), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match=r"threshold must be <= 0"):
            attn.set_threshold(bad)
    assert attn.threshold == -6.0  # a refused value changes nothing
    q, k, v = good()
    for bad in (torch.tensor(-3.0, dtype=torch.float64), torch.tensor([-3.0])):
        with pytest.raises(ValueError, match=r"a tensor threshold must be 0-d float32 on cpu"):
            call_op(q, k, v, threshold=bad)


def test_bad_backend_and_tiles():
    q, k, v = good()
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'gluon'\) or None.*got 'cuda'"):
        lite_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'gluon'\) or None.*got 'flash'"):
        LiteAttention(backend="flash")
    for bad in (0, 24, -16, 32.0, True):
        with pytest.raises(ValueError, match=r"tile_q must be a positive multiple of 16"):
            call_op(q, k, v, tile_q=bad)
        with pytest.raises(ValueError, match=r"tile_k must be a positive multiple of 16"):
            LiteAttention(tile_k=bad)


def test_triton_backend_refused_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = good()
    with pytest.raises(ValueError, match=r"backend='triton'"):
        lite_attention(q, k, v, backend="triton")


# -- skip lists given to lite_attention ------------------------------------------------------------------

def lists(b=1, h=2, sq=40, sk=50, tq=16, tk=16, device=None):
    state = ListPair(b, h, sq, sk, tq, tk, device=device)
    return state


@pytest.mark.parametrize("kind,kw", [
    ("batch", dict(b=2)), ("heads", dict(h=3)), ("seq_q", dict(sq=60)), ("seq_k", dict(sk=40)),
    ("seq_k same tiles", dict(sk=48)),
])
@pytest.mark.parametrize("which", ["read", "write"])
def test_skip_list_shape_mismatch(kind, kw, which):
    q, k, v = good()
    state = lists(**kw)
    with pytest.raises(ValueError, match=rf"{which} was built for \(B, H, Mq, Nk\) = .* these inputs need \(1, 2, 3, 4\), "
                                         rf"seq_q=40, seq_k=50"):
        call_op(q, k, v, **{which: state.read})


def test_skip_list_wrong_type_and_device():
    q, k, v = good()
    state = lists()
    with pytest.raises(TypeError, match=r"read must be a liteattn.SkipList .*got Tensor"):
        call_op(q, k, v, read=state.read.to_dense())
    with pytest.raises(TypeError, match=r"write must be a liteattn.SkipList .*got tuple"):
        call_op(q, k, v, write=(state.write.kv_indices, state.write.kv_counts))
    meta = lists(device="meta")
    with pytest.raises(ValueError, match=r"read is on meta but the inputs are on cpu"):
        call_op(q, k, v, read=meta.read)
    with pytest.raises(ValueError, match=r"write is on meta but the inputs are on cpu"):
        call_op(q, k, v, read=state.read, write=meta.write)


def test_skip_list_tile_mismatch():
    q, k, v = good()
    state = lists()
    other = ListPair(1, 2, 40, 50, 32, 32)
    with pytest.raises(ValueError, match=r"tile_q=32 disagrees with the skip list's tile_q=16"):
        call_op(q, k, v, read=state.read, tile_q=32)
    with pytest.raises(ValueError, match=r"read and write lists use different tile sizes"):
        call_op(q, k, v, read=state.read, write=other.write)


def test_state_is_checked():
    q, k, v = good()
    state = SkipState(1, 2, 40, 50, 16, 16)
    with pytest.raises(TypeError, match=r"state must be a liteattn.SkipState, got ListPair"):
        call_op(q, k, v, state=lists())
    with pytest.raises(ValueError, match=r"give either state or read/write/lse_state"):
        call_op(q, k, v, state=state, read=lists().read)
    with pytest.raises(ValueError, match=r"tile_q=32 disagrees with the state's tile_q=16"):
        call_op(q, k, v, state=state, tile_q=32)
    with pytest.raises(ValueError, match=r"the state was built for \(B, H, Sq, Sk\) = \(1, 2, 40, 60\); these inputs "
                                         r"are \(1, 2, 40, 50\)"):
        call_op(q, k, v, state=SkipState(1, 2, 40, 60, 16, 16))
    with pytest.raises(ValueError, match=r"the state is on meta but the inputs are on cpu"):
        call_op(q, k, v, state=SkipState(1, 2, 40, 50, 16, 16, device="meta"))
    before = state.bits.clone()
    with pytest.raises(ValueError, match="scale"):
        call_op(q, k, v, state=state, scale=-1.0)
    assert torch.equal(state.bits, before)  # a refused call leaves the state alone


def test_read_and_write_same_buffer():
    q, k, v = good()
    state = lists()
    before = state.read.to_dense().clone()
    with pytest.raises(ValueError, match=r"read and write must be different buffers"):
        call_op(q, k, v, read=state.read, write=state.read)
    assert torch.equal(state.read.to_dense(), before)
    call_op(q, k, v, read=state.read, write=state.write)  # the right way works


# -- backend choice (liteattn.backends.choose): stand-ins for CUDA tensors, so that it runs without a GPU ---------

def cuda_like(dtype=torch.bfloat16, head_dim=64):
    from types import SimpleNamespace

    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 256, 2, head_dim))


def test_fallback_on_cuda_logs_a_warning_with_its_cause(monkeypatch, caplog):
    """Risk (e): a Triton import error used to be logged at DEBUG only before the O(S^2) fallback."""
    from liteattn import backends

    backends._warn_fallback_once.cache_clear()
    monkeypatch.setattr(backends, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    caplog.set_level(logging.WARNING, logger="liteattn")
    q = cuda_like()
    assert backends.choose(None, q, q, 128, 128) == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No module named 'triton'" in warnings[0] and "PyTorch reference" in warnings[0]
    with pytest.raises(ValueError, match=r"backend='triton' was requested but the Triton kernel does not import "
                                         r"\(ModuleNotFoundError"):
        backends.choose("triton", q, q, 128, 128)
    monkeypatch.undo()
    backends._warn_fallback_once.cache_clear()
    q32 = cuda_like(torch.float32)
    if backends.triton_available():
        assert backends.choose(None, q32, q32, 128, 128) == "torch"
        assert any("float16 or bfloat16, got torch.float32" in r.getMessage() for r in caplog.records)


def test_cuda_refuses_tiles_the_kernel_cannot_run():
    """Risk (e): enable(tile_q=32) on CUDA used to run the PyTorch reference quietly."""
    from liteattn import backends

    q = cuda_like()
    with pytest.raises(ValueError, match=r"tiles of \(64, 128\) tokens, got tile_q=32, tile_k=32 on CUDA.*"
                                         r"backend='torch'"):
        backends.choose(None, q, q, 32, 32)
    assert backends.choose("torch", q, q, 32, 32) == "torch"  # asked for by name: allowed
