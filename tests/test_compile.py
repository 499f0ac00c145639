"""torch.compile through liteattn: one custom op, no graph breaks, and no recompiles when the threshold changes
or the ping-pong lists swap."""

import pytest
import torch
from torch._dynamo.utils import counters

import liteattn
from liteattn.skip import tiles_covered, tiles_overlapping
from liteattn.testing import structured_qkv

from oracle import covered_tiles, overlapping_tiles

MUST_DO = [(0, 40), (150, 161)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("criterion", ["max", "mass"])
def test_compiled_layer_matches_eager_and_new_thresholds_do_not_recompile(criterion):
    q, k, v = structured_qkv(1, 200, 2, 32)
    compiled_attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32, backend="torch", criterion=criterion)
    eager_attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32, backend="torch", criterion=criterion)

    def step(attn, q, k, v):
        return attn(q, k, v, must_do_list=MUST_DO) * 2

    compiled = torch.compile(step, backend="eager")
    graphs = []
    for threshold in (-6.0, -5.0, -3.0, -1.0, 0.0, -2.0):
        compiled_attn.set_threshold(threshold)
        eager_attn.set_threshold(threshold)
        out = compiled(compiled_attn, q, k, v)
        ref = step(eager_attn, q, k, v)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert torch.equal(compiled_attn.skip_state.read.to_dense(), eager_attn.skip_state.read.to_dense())
        if criterion == "mass":  # the state (built in the compiled graph) keeps the same rounded LSE
            assert torch.equal(compiled_attn.skip_state.lse, eager_attn.skip_state.lse)
        graphs.append(counters["stats"]["unique_graphs"])
    assert eager_attn.sparsity > 0
    # The first call's graph builds the state, the second call's is the steady state; six thresholds and five
    # swaps later nothing more has compiled.
    assert graphs[-1] == graphs[1] == 2, graphs


def test_no_graph_break_in_a_steady_state_call():
    q, k, v = structured_qkv(1, 200, 2, 32)
    attn = liteattn.LiteAttention(threshold=-6.0, tile_q=32, tile_k=32, backend="torch")
    attn(q, k, v, must_do_list=MUST_DO)  # builds the state
    explanation = torch._dynamo.explain(lambda q, k, v: attn(q, k, v, must_do_list=MUST_DO))(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_lse_codes_trace_whole(backend):
    """The skip state's LSE encoder and decoder (liteattn/state.py) compile as one graph, with no host sync or
    data-dependent Python, and give what they give eagerly, bit for bit (ragged last q-tile, NaN and -inf rows, a
    tile of NaN, tiles whose spread needs a larger step: shifts 1 to 3 and a 1e6-nat one). Inductor on the CPU
    once miscompiled the ragged rows of the per-tile broadcast (an expand-flatten-slice, now a gather)."""
    from liteattn.state import decode_lse, encode_lse

    lse = 20 + 6 * torch.randn(2, 3, 150, generator=torch.Generator().manual_seed(0))
    lse[0, 0, :64] = float("nan")
    lse[1, 2, 7] = -float("inf")
    lse[0, 1, 64:128] = torch.linspace(-50.0, 50.0, 64)  # 100 nats: shift 3
    lse[1, 0, 128:] = torch.linspace(0.0, 1e6, 22)  # the ragged tile: shift 16
    lse[1, 1, :64] = torch.linspace(0.0, 30.0, 64)  # shift 1

    def round_trip(lse, codes, base, shift):
        encode_lse(lse, 64, codes, base, shift)
        return decode_lse(codes, base, shift, 64)

    buffers = [(torch.full((2, 3, 150), 7, dtype=torch.uint8), torch.zeros(2, 3, 3),
                torch.full((2, 3, 3), 9, dtype=torch.uint8)) for _ in range(2)]
    got = torch.compile(round_trip, fullgraph=True, backend=backend)(lse, *buffers[0])
    expected = round_trip(lse, *buffers[1])
    assert torch.allclose(got, expected, rtol=0, atol=0, equal_nan=True) and torch.isnan(got[0, 0, :64]).all()
    assert torch.equal(buffers[0][0], buffers[1][0]) and torch.equal(buffers[0][2], buffers[1][2])
    assert torch.allclose(buffers[0][1], buffers[1][1], rtol=0, atol=0, equal_nan=True)
    assert buffers[1][2][0, 1, 1] == 3 and buffers[1][2][1, 0, 2] == 16 and buffers[1][2][1, 1, 0] == 1
    assert buffers[1][2][0, 0, 0] == 0 and torch.isnan(buffers[1][1][0, 0, 0])  # the NaN tile


@pytest.mark.parametrize("ranges, length, tile", [
    (((0, 40), (150, 161)), 200, 32),
    (((0, 1),), 65, 16),
    (((3, 20), (20, 64), (100, 130)), 130, 16),
    (((0, 130),), 130, 64),
])
def test_compiled_tile_masks_equal_the_oracle(ranges, length, tile):
    """Ranges -> tiles, built inside a compiled graph (no host tensors), against the oracle's tile loops."""
    overlap = torch.compile(lambda: tiles_overlapping(ranges, length, tile, "cpu"), fullgraph=True)()
    covered = torch.compile(lambda: tiles_covered(ranges, length, tile, "cpu"), fullgraph=True)()
    assert torch.nonzero(overlap).flatten().tolist() == overlapping_tiles(ranges, length, tile)
    assert torch.nonzero(covered).flatten().tolist() == covered_tiles(ranges, length, tile)
