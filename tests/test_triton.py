"""The GPU kernels against the float64 oracle (tests/oracle.py): the Triton kernel everywhere, and on a Hopper GPU
also the Gluon kernel (backend "gluon"), through the same checks.

Without a GPU the kernel runs in the Triton interpreter (set by conftest.py) on small shapes, and every call is
checked against the tile-by-tile oracle: output and LSE by the tolerance rule of docs/DESIGN.md section 3, write
lists equal except within 1e-2 of the threshold. With a GPU the production-length tests run too; there the oracle's
tile loop is too slow, so the reference is the PyTorch backend in float64 (itself checked against the oracle in
test_attention.py), with the oracle's tolerance rule and its per-tile margins.
"""

import math

import pytest
import torch

from liteattn import LiteAttention, SkipList, lite_attention
from liteattn.backends import gluon_available, triton_available
from liteattn.state import decode_lse, encode_lse
from liteattn.testing import StructuredSequence

from lists import ListPair, check_rounded_lse_keeps_the_exact_tiles, exact_and_rounded_mass_calls
from oracle import LSE_FLOOR, OUT_FLOOR, assert_within_rule, check_call, plain_attention, tile_margin

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
HOPPER = CUDA and gluon_available("cuda")
# The GPU tests run every kernel the card has: the Gluon one only on Hopper (skipped elsewhere, and in CI).
KERNELS = ["triton", pytest.param("gluon", marks=pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU"))]


def poisoned_write(read: SkipList) -> SkipList:
    """A write list whose every entry is garbage, so that what the call does not write shows."""
    return SkipList(torch.full_like(read.kv_indices, -7), torch.full_like(read.kv_counts, -7), read.tile_q,
                    read.tile_k, read.seq_q, read.seq_k)


def check_step(q, k, v, read, threshold, must_do=None, must_do_q=None, criterion="max", lse_state=None,
               backend="triton"):
    """One kernel call on ``read`` with the keep rule ``criterion`` (the mass rule reads and rewrites
    ``lse_state``), checked against the oracle (small shapes) or the float64 PyTorch backend with the oracle's rule
    (production shapes); returns the kernel's write list."""
    write = poisoned_write(read)
    lse_prev = None if lse_state is None else lse_state.clone()
    kw = dict(threshold=threshold, must_do=must_do, must_do_q=must_do_q, return_lse=True, criterion=criterion)
    out, lse = lite_attention(q, k, v, read=read, write=write, backend=backend, lse_state=lse_state, **kw)
    if lse_state is not None:
        assert torch.equal(lse_state, lse)
    write.check()
    read_dense, written = read.to_dense(), write.to_dense()
    tq, tk = read.tile_q, read.tile_k
    if q.shape[1] * k.shape[1] <= 1 << 20:
        check_call(q, k, v, read_dense, out, lse, written, threshold=threshold, tile_q=tq, tile_k=tk,
                   must_do=must_do or (), must_do_q=must_do_q or (), criterion=criterion, lse_prev=lse_prev)
        return write
    ref = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), tq, tk, read.seq_q,
                   read.seq_k)
    ref_out, ref_lse = lite_attention(q.double(), k.double(), v.double(), read=read, write=ref, backend="torch",
                                      lse_state=None if lse_prev is None else lse_prev.clone(), **kw)
    base_out, base_lse = plain_attention(q, k, v, read_dense, tq, tk)
    assert_within_rule(out, base_out, ref_out, OUT_FLOOR[q.dtype], f"output ({q.dtype})")
    assert_within_rule(lse, base_lse, ref_lse, LSE_FLOOR[q.dtype], f"lse ({q.dtype})")
    assert not (written & ~read_dense).any(), "the write list holds a tile that was not read"
    diff = torch.nonzero(written != ref.to_dense()).tolist()
    assert len(diff) <= max(2, written.numel() // 100), f"{len(diff)} decisions differ"
    for b, h, i, j in diff:
        m = tile_margin(q, k, read_dense, b, h, i, j, tile_q=tq, tile_k=tk, threshold=threshold,
                        criterion=criterion, lse_prev=lse_prev)
        assert abs(m) < 1e-2, f"decision on tile ({b},{h},{i},{j}) differs with margin {m:.4f}"
    return write


def run_steps(steps, B, Sq, H, D, tile_q, tile_k, dtype, threshold, seq_k=None, device=DEVICE, criterion="max",
              backend="triton", **kw):
    seq_k = Sq if seq_k is None else seq_k
    state = ListPair(B, H, Sq, seq_k, tile_q, tile_k, device=device, with_lse=criterion == "mass")
    sparsities = []
    for q, k, v in StructuredSequence(steps, B, Sq, H, D, seq_k=seq_k, dtype=dtype, device=device, seed=Sq + D):
        written = check_step(q, k, v, state.read, threshold, criterion=criterion, lse_state=state.lse,
                             backend=backend, **kw)
        state.write.kv_indices.copy_(written.kv_indices)
        state.write.kv_counts.copy_(written.kv_counts)
        state.swap()
        sparsities.append(state.read.sparsity())
    return sparsities


# -- CPU / interpreter (CI) and GPU alike: small shapes ------------------------------------------------

@pytest.mark.parametrize("criterion", ["max", "mass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Sq,Sk,tile_q,tile_k,D", [
    (250, 250, 64, 64, 32),     # tails on both sides
    (300, 200, 128, 64, 64),    # Sq != Sk, mixed tiles
    (256, 384, 64, 128, 16),    # exact multiples, tile_k 128 = two compute blocks
])
def test_kernel_matches_the_oracle_over_steps(dtype, Sq, Sk, tile_q, tile_k, D, criterion):
    sparsities = run_steps(3, 2, Sq, 2, D, tile_q, tile_k, dtype, threshold=-5.0, seq_k=Sk, criterion=criterion)
    assert sparsities[-1] > 0.0, "structured inputs should give some sparsity"
    assert sparsities == sorted(sparsities)


@pytest.mark.parametrize("criterion", ["max", "mass"])
@pytest.mark.parametrize("Sq,Sk,tile,H", [(250, 250, 64, 2), (200, 2200, 64, 1)])
def test_kernel_on_a_skip_state_matches_the_oracle(Sq, Sk, tile, H, criterion):
    """The SkipState path: bits expanded into the shared workspace, the kernel, the flags packed back into the bits
    (more than 32 k-tiles: several words per row)."""
    from liteattn import SkipState

    state = SkipState(1, H, Sq, Sk, tile, tile, device=DEVICE, with_lse=criterion == "mass")
    for q, k, v in StructuredSequence(3, 1, Sq, H, 32, seq_k=Sk, dtype=torch.float16, device=DEVICE, seed=Sk):
        read = state.to_dense().clone()
        lse_prev = state.lse  # None, or decoded from the state's codes: what the kernel measures against
        out, lse = lite_attention(q, k, v, state=state, threshold=-5.0, criterion=criterion, return_lse=True,
                                  backend="triton")
        assert torch.equal(state.counts, read.sum(-1, dtype=torch.int32))
        written = state.to_dense()
        check_call(q, k, v, read, out, lse, written, threshold=-5.0, tile_q=tile, tile_k=tile, criterion=criterion,
                   lse_prev=lse_prev)
        if state.lse is not None:  # this call's LSE, rounded down to 8 bits a row
            assert torch.equal(state.lse, decode_lse(*encode_lse(lse, tile), tile))
    assert state.sparsity() > 0.0


@pytest.mark.parametrize("S,gain,threshold", [(256, 1.0, -1.5), (384, 1.5, -1.0)])
def test_kernel_rounded_down_lse_keeps_a_superset_of_the_exact_lses_tiles(S, gain, threshold):
    """The kernel on a SkipState whose previous LSE is rounded down to 8 bits per row keeps every tile that the
    exact float32 LSE keeps (the stateless ``lse_state=``), on the same inputs and read list, and what the oracle
    keeps given the rounded LSE. Random scores: tile shares near the threshold, so that an LSE rounded the wrong
    way (0.1 above) drops tiles here."""
    gen = torch.Generator().manual_seed(S)
    first = [torch.randn(1, S, 2, 32, generator=gen) * g for g in (gain, gain, 1.0)]
    second = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in first]
    (q0, k0, v0), (q, k, v) = ([x.to(DEVICE, torch.float16) for x in xs] for xs in (first, second))
    _, exact = lite_attention(q0, k0, v0, return_lse=True, backend="triton", tile_q=64, tile_k=64)
    write = poisoned_write(SkipList.full(1, 2, S, S, 64, 64, DEVICE))
    out, kept, kept_exact, rounded = exact_and_rounded_mass_calls(q, k, v, exact, write, 64, threshold,
                                                                  "triton")
    assert (rounded <= exact).all() and (rounded < exact).any()
    assert not (kept_exact & ~kept).any(), "the rounded LSE dropped a tile"
    assert (kept & ~kept_exact).any()  # conservative, and measurably so here
    check_call(q, k, v, None, out, None, kept, threshold=threshold, tile_q=64, tile_k=64, criterion="mass",
               lse_prev=rounded)


def test_kernel_with_a_wide_spread_of_lses_in_a_q_tile_keeps_close_to_the_exact_lses_tiles():
    """As tests/test_attention.py's test of that name, on the kernel (float16): positional inputs whose rows' LSEs
    spread over 42 to 175 nats within a q-tile. Each q-tile's step grows to span it (no row clamped), and the state
    keeps a superset of the exact LSE's tiles with at most 3 more per threshold (the codes with one step for every
    tile kept all 128 at each)."""
    from liteattn.state import lse_step

    seq_q, tile = 512, 64
    (q0, k0, v0), (q, k, v) = StructuredSequence(2, batch=1, seq_q=seq_q, heads=2, head_dim=32, drift=0.3,
                                                 sharpness=(1.0, 3.0), dtype=torch.float16, device=DEVICE, seed=0)
    _, exact = lite_attention(q0, k0, v0, return_lse=True, backend="triton", tile_q=tile, tile_k=tile)
    _, _, shift = encode_lse(exact, tile)
    assert (shift >= 1).all()
    rows_step = lse_step(shift)[..., torch.arange(seq_q, device=DEVICE) // tile]
    for threshold in (-4.0, -8.0):
        write = poisoned_write(SkipList.full(1, 2, seq_q, seq_q, tile, tile, DEVICE))
        check_rounded_lse_keeps_the_exact_tiles(q, k, v, exact, write, tile, threshold, "triton", rows_step)


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
    state = ListPair(1, 2, 190, 190, 64, 64, device=DEVICE)
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
    with pytest.raises(ValueError, match="tiles of"):
        lite_attention(q, q, q, backend="triton", tile_q=32, tile_k=32)


# -- GPU: production-like shapes, graphs, compile, no host sync ----------------------------------------

@gpu
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("Sq,H,D,tile,dtype,criterion", [
    (32760, 2, 128, 128, torch.bfloat16, "max"),   # Wan2.1 480p length, ragged tail
    (32760, 2, 128, 128, torch.bfloat16, "mass"),
    (17776, 2, 64, 128, torch.float16, "max"),     # CogVideoX length
    (4000, 3, 128, 64, torch.bfloat16, "mass"),    # 64-tiles
])
def test_gpu_production_shapes(Sq, H, D, tile, dtype, criterion, backend):
    if backend == "gluon" and tile != 128:
        pytest.skip("the Gluon kernel takes tiles of 128")
    sparsities = run_steps(3, 1, Sq, H, D, tile, tile, dtype, threshold=-8.0, device="cuda", criterion=criterion,
                           backend=backend)
    assert sparsities[-1] > 0.2


@gpu
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("criterion", ["max", "mass"])
@pytest.mark.parametrize("Sq,Sk,D", [(700, 1300, 128), (1000, 1000, 64)])
def test_gpu_skip_state_matches_the_oracle(Sq, Sk, D, criterion, backend):
    """The SkipState path with 128-tiles on the GPU (bits expanded, the kernel, flags packed back), with must-do
    keys, against the oracle, and the Gluon kernel's state after three steps equal to the Triton kernel's."""
    from liteattn import SkipState

    states = {name: SkipState(2, 2, Sq, Sk, 128, 128, device="cuda", with_lse=criterion == "mass")
              for name in ("triton", backend)}
    for q, k, v in StructuredSequence(3, 2, Sq, 2, D, seq_k=Sk, dtype=torch.bfloat16, device="cuda", seed=Sk + D):
        state = states[backend]
        read, lse_prev = state.to_dense().clone(), state.lse
        out, lse = lite_attention(q, k, v, state=state, threshold=-5.0, criterion=criterion, return_lse=True,
                                  must_do=[(200, 230)], backend=backend)
        assert torch.equal(state.counts, read.sum(-1, dtype=torch.int32))
        check_call(q, k, v, read, out, lse, state.to_dense(), threshold=-5.0, tile_q=128, tile_k=128,
                   criterion=criterion, lse_prev=lse_prev, must_do=[(200, 230)])
        if backend != "triton":
            lite_attention(q, k, v, state=states["triton"], threshold=-5.0, criterion=criterion,
                           must_do=[(200, 230)], backend="triton")
    assert states[backend].sparsity() > 0.0
    flips = (states[backend].to_dense() != states["triton"].to_dense()).sum().item()
    assert flips <= 2, f"{flips} tiles differ from the Triton kernel's state"


def test_kernel_writes_every_output_element():
    """The launcher writes into NaN-poisoned ``out`` and ``lse`` buffers: every element must be overwritten."""
    from liteattn.backends.triton_launch import triton_attention  # the buffers' owner: the point of the test

    q, k, v = next(iter(StructuredSequence(1, 2, 200, 2, 32, dtype=torch.float16, device=DEVICE)))
    state = ListPair(2, 2, 200, 200, 64, 64, device=DEVICE)
    read, write = state.read, poisoned_write(state.read)
    out = torch.full((2, 200, 2, 32), math.nan, dtype=torch.float16, device=DEVICE)
    lse = torch.full((2, 2, 200), math.nan, dtype=torch.float32, device=DEVICE)
    threshold = torch.tensor(-3.0, device=DEVICE)
    triton_attention(q, k, v, *read.as_tuple(), *write.as_tuple(), None, None, threshold, 0, 32 ** -0.5, 64, 64,
                     True, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    write.check()
    check_call(q, k, v, read.to_dense(), out, lse, write.to_dense(), threshold=-3.0, tile_q=64, tile_k=64)


@gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_gpu_no_host_sync(backend):
    q, k, v = next(iter(StructuredSequence(1, 2, 1000, 4, 64, dtype=torch.bfloat16, device="cuda")))
    attn = LiteAttention(threshold=-6.0, backend=backend)
    attn(q, k, v)  # compile / allocate / autotune outside the check
    attn(q, k, v)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn(q, k, v)
        attn.set_threshold(-4.0)  # a new threshold is an in-place fill: no sync either
        attn(q, k, v)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()


@gpu
@pytest.mark.parametrize("backend", KERNELS)
def test_gpu_cuda_graph_matches_eager(backend):
    q, k, v = next(iter(StructuredSequence(1, 1, 2000, 4, 128, dtype=torch.bfloat16, device="cuda")))
    state = ListPair(1, 4, 2000, 2000, 128, 128, device="cuda")
    kw = dict(read=state.read, write=state.write, threshold=-6.0, backend=backend)
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
@pytest.mark.parametrize("backend", KERNELS)
def test_gpu_torch_compile_fullgraph(backend):
    q, k, v = next(iter(StructuredSequence(1, 1, 1000, 2, 64, dtype=torch.float16, device="cuda")))
    state = ListPair(1, 2, 1000, 1000, 128, 128, device="cuda")

    def f(q, k, v):
        return lite_attention(q, k, v, read=state.read, write=state.write, threshold=-6.0, backend=backend) * 2

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
    state = ListPair(2, 4, 3000, 3000, 128, 128, device="cuda:1")
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
