"""The checks of the reference implementation's own test file (moonmath-ai/LiteAttention,
hopper/tests/test_lite_attention.py), ported: what its users rely on holds for liteattn too.

The reference sets ``attn.threshold = float('inf')`` to drop every tile but one per q-tile (its ``set_threshold``
refuses positive values, its attribute does not); liteattn takes +inf as "keep only what must be kept" (the first
processed tile, and must-do tiles). Ranges use the reference's flat form ``[start0, end0, start1, end1, ...]``.
Each check runs on the PyTorch backend and on the Triton kernel (the interpreter without a GPU).
"""

import math

import pytest
import torch

from liteattn import LiteAttention
from liteattn.backends import triton_available
from liteattn.testing import structured_qkv

from oracle import covered_tiles, n_tiles, oracle_attention, overlapping_tiles

TILE = 64
LENGTH = {"torch": 1000, "triton": 400}  # 16 / 7 k-tiles, the last one partial (the interpreter is slow)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # the reference's cases, as functions of the length
    "begin_and_end": lambda s: [0, s // 10, s * 6 // 10, s - 1],
    "first_half": lambda s: [0, s // 2],
    "middle_quarter": lambda s: [s // 4, s // 2],
    "first_last_10pct": lambda s: [0, s // 10, s * 9 // 10, s - 1],
    "multi_small": lambda s: [0, s * 12 // 100, s * 3 // 10, s * 42 // 100, s * 6 // 10, s - 1],
}


def inputs(backend, seed=0):
    """q, k, v of LENGTH[backend] tokens; on the kernel's side fp16, one batch entry and two heads."""
    if backend == "triton":
        return [t.to(DEVICE) for t in structured_qkv(1, LENGTH[backend], 2, 32, dtype=torch.float16, seed=seed)]
    return structured_qkv(2, LENGTH[backend], 3, 32, seed=seed)


def pairs(flat):
    return [(min(a, b), max(a, b)) for a, b in zip(flat[0::2], flat[1::2])]


def computed_fraction(attn):
    return 1.0 - attn.skip_state.sparsity()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_all_keeps_one_tile_per_q_tile(backend):
    S = LENGTH[backend]
    attn = LiteAttention(tile_q=TILE, tile_k=TILE, backend=backend)
    attn.threshold = float("inf")  # as the reference's test does: through the attribute
    q, k, v = inputs(backend)
    attn(q, k, v)
    read = attn.skip_state.read
    assert (read.kv_counts == 1).all() and (read.kv_indices[..., 0] == 0).all()
    out = attn(q, k, v)  # the next call computes the one tile: finite output, nothing unwritten
    assert torch.isfinite(out).all()
    assert (attn.skip_state.read.kv_counts == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nothing_at_minus_inf(backend):
    S = LENGTH[backend]
    attn = LiteAttention(threshold=-math.inf, tile_q=TILE, tile_k=TILE, backend=backend)
    q, k, v = inputs(backend)
    for _ in range(2):
        attn(q, k, v)
        assert attn.skip_state.read.to_dense().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_must_do_over_everything_with_the_flat_reversed_pair(backend):
    """``must_do_list=[S - 1, 0]``: a reversed flat pair is the range [0, S - 1), which touches every k-tile, so even
    +inf keeps everything."""
    S = LENGTH[backend]
    attn = LiteAttention(threshold=math.inf, tile_q=TILE, tile_k=TILE, backend=backend)
    q, k, v = inputs(backend)
    for _ in range(3):
        attn(q, k, v, must_do_list=[S - 1, 0])
        assert attn.skip_state.read.to_dense().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_must_do_list_with_skip_all(backend, case):
    """At +inf only must-do tiles (and each q-tile's first tile) stay, over many calls."""
    S = LENGTH[backend]
    must_do = CASES[case](S)
    attn = LiteAttention(threshold=math.inf, tile_q=TILE, tile_k=TILE, backend=backend)
    q, k, v = inputs(backend)
    expected = sorted(set(overlapping_tiles(pairs(must_do), S, TILE)) | {0})
    for _ in range(4):
        attn(q, k, v, must_do_list=must_do)
        dense = attn.skip_state.read.to_dense()
        assert (dense == torch.isin(torch.arange(n_tiles(S, TILE), device=dense.device),
                                    torch.tensor(expected, device=dense.device))).all()
    assert computed_fraction(attn) == pytest.approx(len(expected) / n_tiles(S, TILE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_must_skip_list_with_skip_nothing(backend, case):
    S = LENGTH[backend]
    must_skip = CASES[case](S)
    attn = LiteAttention(threshold=-math.inf, tile_q=TILE, tile_k=TILE, backend=backend)
    q, k, v = inputs(backend)
    attn(q, k, v, must_skip_list=must_skip)
    skipped = covered_tiles(pairs(must_skip), S, TILE)
    assert computed_fraction(attn) == pytest.approx(1 - len(skipped) / n_tiles(S, TILE))
    assert not attn.skip_state.read.to_dense()[..., skipped].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_lse_matches_the_reference(backend):
    S = LENGTH[backend]
    q, k, v = inputs(backend, seed=3)
    attn = LiteAttention(threshold=0.0, tile_q=TILE, tile_k=TILE, backend=backend)
    _, lse = attn(q, k, v, return_softmax_lse=True)
    full = oracle_attention(q, k, v, None, threshold=0.0, tile_q=TILE, tile_k=TILE)
    tol = dict(rtol=2e-3, atol=1e-2) if backend == "triton" else dict(rtol=1e-5, atol=1e-4)  # LSEs reach 300 here
    torch.testing.assert_close(lse.double().cpu(), full.lse, **tol)
