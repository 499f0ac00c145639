"""The Triton kernel against the PyTorch backend.

Without a GPU the kernel runs in the Triton interpreter (set by conftest.py) on small shapes;
with one, the GPU tests at production-like shapes run too. Each step of a run feeds both
backends the kernel's read list, compares outputs and LSE (DESIGN section 3 tolerance) and
write lists (ignoring decisions whose margin is within 1e-2 of the threshold), then moves on
with the kernel's write list.
"""

import math

import pytest
import torch

from liteattn import LiteAttention, SkipList, SkipState, lite_attention
from liteattn.backends import triton_available
from liteattn.testing import StructuredSequence

LOG2E = 1.4426950408889634
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def plain_attention(q, k, v, read_dense, tile_q, tile_k, scale, dtype, rows_per_chunk=2048):
    """Masked attention computed in ``dtype`` throughout (the baseline error of DESIGN section 3)."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    out = torch.empty(B, Sq, H, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, :, h].to(dtype), v[b, :, h].to(dtype)
            for r0 in range(0, Sq, rows_per_chunk):
                r1 = min(Sq, r0 + rows_per_chunk)
                s = (q[b, r0:r1, h].to(dtype) @ kh.T) * scale
                rows = torch.arange(r0, r1, device=q.device) // tile_q
                mask = read_dense[b, h][rows].repeat_interleave(tile_k, dim=-1)[:, :Sk]
                p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
                out[b, r0:r1, h] = (p @ vh).double()
    return out


def margin(q, k, read_dense, b, h, i, j, tile_q, tile_k, scale, threshold):
    """max_r (tmax_r(j) - mprev_r(j)) * log2(e) - threshold for one tile pair, in float64."""
    Sq, Sk = q.shape[1], k.shape[1]
    qi = q[b, i * tile_q:min(Sq, (i + 1) * tile_q), h].double()
    s = (qi @ k[b, :, h].double().T) * scale
    tiles = [t for t in torch.nonzero(read_dense[b, h, i]).flatten().tolist() if t <= j]
    tmax = {t: s[:, t * tile_k:min(Sk, (t + 1) * tile_k)].amax(dim=1) for t in tiles}
    prev = torch.full((qi.shape[0],), -math.inf, dtype=torch.float64, device=q.device)
    for t in tiles[:-1]:
        prev = torch.maximum(prev, tmax[t])
    return ((tmax[j] - prev) * LOG2E).max().item() - threshold


def check_step(q, k, v, read, threshold, must_do=None, must_do_q=None):
    """One call on both backends with the same read list; returns the kernel's write list."""
    tq, tk = read.tile_q, read.tile_k
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    scale = q.shape[-1] ** -0.5
    w_tri = SkipList(torch.full_like(read.kv_indices, -7), torch.full_like(read.kv_counts, -7), tq, tk, Sq, Sk)
    w_ref = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), tq, tk, Sq, Sk)
    kw = dict(threshold=threshold, must_do=must_do, must_do_q=must_do_q, return_lse=True)
    o_tri, lse_tri = lite_attention(q, k, v, read=read, write=w_tri, backend="triton", **kw)
    o_ref, lse_ref = lite_attention(q.double(), k.double(), v.double(), read=read, write=w_ref, backend="torch", **kw)
    assert o_tri.dtype == q.dtype and o_tri.shape == (B, Sq, H, v.shape[-1])
    assert torch.isfinite(o_tri).all(), "unwritten or non-finite output"

    read_dense = read.to_dense()
    base = plain_attention(q, k, v, read_dense, tq, tk, scale, q.dtype)
    err = (o_tri.double() - o_ref).abs().max().item()
    base_err = (base - o_ref).abs().max().item()
    assert err <= 2 * base_err + 1e-4, f"kernel error {err:.3e} > 2 x plain {q.dtype} error {base_err:.3e}"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse_tri))
    assert (lse_tri.double()[finite] - lse_ref[finite]).abs().max().item() <= 2e-2

    w_tri.check()
    d_tri, d_ref = w_tri.to_dense(), w_ref.to_dense()
    assert not (d_tri & ~read_dense).any(), "the write list holds a tile that was not read"
    diff = torch.nonzero(d_tri != d_ref).tolist()
    assert len(diff) <= max(2, d_ref.numel() // 100), f"{len(diff)} decisions differ"
    for b, h, i, j in diff:
        m = margin(q, k, read_dense, b, h, i, j, tq, tk, scale, threshold)
        assert abs(m) < 1e-2, f"decision on tile ({b},{h},{i},{j}) differs with margin {m:.4f}"
    return w_tri


def run_steps(steps, B, Sq, H, D, tile_q, tile_k, dtype, threshold, seq_k=None, device=DEVICE, **kw):
    seq_k = Sq if seq_k is None else seq_k
    state = SkipState(B, H, Sq, seq_k, tile_q, tile_k, device=device)
    sparsities = []
    for q, k, v in StructuredSequence(steps, B, Sq, H, D, seq_k=seq_k, dtype=dtype, device=device, seed=Sq + D):
        written = check_step(q, k, v, state.read, threshold, **kw)
        state.write.kv_indices.copy_(written.kv_indices)
        state.write.kv_counts.copy_(written.kv_counts)
        state.swap()
        sparsities.append(state.read.sparsity())
    return sparsities


# -- CPU / interpreter (CI) and GPU alike: small shapes ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Sq,Sk,tile_q,tile_k,D", [
    (250, 250, 64, 64, 32),     # tails on both sides
    (300, 200, 128, 64, 64),    # Sq != Sk, mixed tiles
    (256, 384, 64, 128, 16),    # exact multiples, tile_k 128 = two compute blocks
])
def test_kernel_matches_torch_over_steps(dtype, Sq, Sk, tile_q, tile_k, D):
    sparsities = run_steps(3, 2, Sq, 2, D, tile_q, tile_k, dtype, threshold=-5.0, seq_k=Sk)
    assert sparsities[-1] > 0.0, "structured inputs should give some sparsity"
    assert sparsities == sorted(sparsities)


def test_kernel_must_do_and_dense_modes():
    run_steps(2, 1, 200, 2, 32, 64, 64, torch.float16, threshold=0.0, must_do=[(0, 10), (150, 160)],
              must_do_q=[(64, 70)])
    q, k, v = next(iter(StructuredSequence(1, 1, 200, 2, 32, dtype=torch.float16, device=DEVICE)))
    dense = lite_attention(q, k, v, backend="triton", tile_q=64, tile_k=64)
    ref = lite_attention(q, k, v, backend="torch")
    assert (dense.float() - ref.float()).abs().max().item() < 5e-3
    # A read list of nothing gives zeros and lse = -inf, like the PyTorch backend.
    empty = SkipList(torch.zeros(1, 2, 4, 4, dtype=torch.int32, device=DEVICE),
                     torch.zeros(1, 2, 4, dtype=torch.int32, device=DEVICE), 64, 64, 200, 200)
    out, lse = lite_attention(q, k, v, read=empty, backend="triton", return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_kernel_threshold_minus_inf_keeps_everything():
    q, k, v = next(iter(StructuredSequence(1, 1, 190, 2, 32, dtype=torch.float16, device=DEVICE)))
    state = SkipState(1, 2, 190, 190, 64, 64, device=DEVICE)
    lite_attention(q, k, v, read=state.read, write=state.write, threshold=-math.inf, backend="triton")
    assert state.write.to_dense().all()
    lite_attention(q, k, v, read=state.read, write=state.write, threshold=0.0, backend="triton")
    assert not state.write.to_dense().all()


def test_triton_refusals_are_clear():
    q = torch.randn(1, 64, 1, 48, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        lite_attention(q, q, q, backend="triton")
    q = torch.randn(1, 64, 1, 32, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        lite_attention(q, q, q, backend="triton")
    q = q.half()
    with pytest.raises(ValueError, match="tile sizes"):
        lite_attention(q, q, q, backend="triton", tile_q=32, tile_k=32)


# -- GPU: production-like shapes, graphs, compile, no host sync ----------------------------------------

@gpu
@pytest.mark.parametrize("Sq,H,D,tile,dtype", [
    (32760, 2, 128, 128, torch.bfloat16),   # Wan2.1 480p length, ragged tail
    (17776, 2, 64, 128, torch.float16),     # CogVideoX length
    (4000, 3, 128, 64, torch.bfloat16),     # 64-tiles
])
def test_gpu_production_shapes(Sq, H, D, tile, dtype):
    sparsities = run_steps(3, 1, Sq, H, D, tile, tile, dtype, threshold=-8.0, device="cuda")
    assert sparsities[-1] > 0.2


@gpu
def test_gpu_every_output_written_and_no_host_sync():
    q, k, v = next(iter(StructuredSequence(1, 2, 1000, 4, 64, dtype=torch.bfloat16, device="cuda")))
    attn = LiteAttention(threshold=-6.0, backend="triton")
    attn(q, k, v)  # compile / allocate outside the checks
    poison = torch.full((2 * 1000 * 4 * 64,), math.nan, dtype=torch.bfloat16, device="cuda")
    del poison  # the caching allocator hands this NaN block to the next output of the same size
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn(q, k, v)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()


@gpu
def test_gpu_cuda_graph_matches_eager():
    q, k, v = next(iter(StructuredSequence(1, 1, 2000, 4, 128, dtype=torch.bfloat16, device="cuda")))
    state = SkipState(1, 4, 2000, 2000, 128, 128, device="cuda")
    kw = dict(read=state.read, write=state.write, threshold=-6.0, backend="triton")
    eager = lite_attention(q, k, v, **kw)
    eager_written = state.write.to_dense()
    state.write.kv_counts.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lite_attention(q, k, v, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(state.write.to_dense(), eager_written)


@gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v = next(iter(StructuredSequence(1, 1, 1000, 2, 64, dtype=torch.float16, device="cuda")))
    state = SkipState(1, 2, 1000, 1000, 128, 128, device="cuda")

    def f(q, k, v):
        return lite_attention(q, k, v, read=state.read, write=state.write, threshold=-6.0) * 2

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    written = state.write.to_dense()
    state.write.kv_counts.zero_()
    assert torch.allclose(out, f(q, k, v))
    assert torch.equal(written, state.write.to_dense())


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_inputs_on_another_device_than_the_current_one():
    """Triton launches on the current device: inputs on cuda:1 while cuda:0 is current must still run on cuda:1,
    ordered with cuda:1's stream, and give what the same call gives with cuda:1 current."""
    q, k, v = next(iter(StructuredSequence(1, 2, 3000, 4, 128, dtype=torch.bfloat16, device="cuda:1")))
    state = SkipState(2, 4, 3000, 3000, 128, 128, device="cuda:1")
    kw = dict(read=state.read, write=state.write, threshold=-6.0, backend="triton")
    with torch.cuda.device(1):
        expected = lite_attention(q, k, v, **kw)
        expected_written = state.write.to_dense()
    torch.cuda.set_device(0)
    for _ in range(3):  # work queued on cuda:1's stream must be ordered before the kernel reads
        q, k, v = (x * 1.0 for x in (q, k, v))
        state.write.kv_counts.zero_()
        out = lite_attention(q, k, v, **kw)
        assert out.device == torch.device("cuda:1")
        assert torch.equal(out, expected)
        assert torch.equal(state.write.to_dense(), expected_written)
