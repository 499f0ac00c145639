"""The mass rule's previous LSE in a SkipState: 8 bits per row and a step per q-tile. ``encode_lse`` /
``decode_lse`` against their contract (liteattn/state.py), and the state's ``lse`` snapshot and ``set_lse``."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liteattn import SkipState
from liteattn.state import LSE_STEP, decode_lse, encode_lse, lse_step


def tile_extrema(lse: torch.Tensor, tile_q: int, largest: bool = False) -> torch.Tensor:
    """Per q-tile, the smallest (or largest) finite value of its rows (NaN: none), one tile at a time."""
    *lead, seq_q = lse.shape
    out = torch.full((*lead, -(-seq_q // tile_q)), math.nan)
    for i in range(out.shape[-1]):
        rows = lse[..., i * tile_q:(i + 1) * tile_q]
        if largest:
            extreme = rows.masked_fill(~torch.isfinite(rows), -math.inf).amax(-1)
        else:
            extreme = rows.masked_fill(~torch.isfinite(rows), math.inf).amin(-1)
        out[..., i] = torch.where(torch.isinf(extreme), math.nan, extreme)
    return out


def tile_minima(lse: torch.Tensor, tile_q: int) -> torch.Tensor:
    return tile_extrema(lse, tile_q)


def tile_spans(lse: torch.Tensor, tile_q: int) -> torch.Tensor:
    """Per q-tile, largest minus smallest finite LSE, in float32 (0: no finite LSE)."""
    span = tile_extrema(lse, tile_q, largest=True) - tile_extrema(lse, tile_q)
    return span.nan_to_num(0.0)


def reference_shifts(lse: torch.Tensor, tile_q: int) -> torch.Tensor:
    """The contract's shift, in float64: the smallest s >= 0 with span <= 254 * LSE_STEP * 2**s (each limit is
    exact in float64, as is the float32 span), i.e. the number of s whose limit the span exceeds."""
    limits = torch.tensor([254 * LSE_STEP * 2.0 ** s for s in range(127)], dtype=torch.float64)
    return (tile_spans(lse, tile_q).double().unsqueeze(-1) > limits).sum(-1)


def per_row(tiles: torch.Tensor, tile_q: int, seq_q: int) -> torch.Tensor:
    return tiles[..., torch.arange(seq_q) // tile_q]


def ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.tensor(math.inf)) - x.abs()


def check_lse_codes(lse: torch.Tensor, tile_q: int) -> None:
    """encode_lse / decode_lse against their contract (liteattn/state.py), from first principles."""
    seq_q = lse.shape[-1]
    codes, base, shift = encode_lse(lse, tile_q)
    decoded = decode_lse(codes, base, shift, tile_q)
    assert codes.dtype == torch.uint8 and codes.shape == lse.shape
    assert base.dtype == torch.float32 and base.shape == (*lse.shape[:-1], -(-seq_q // tile_q))
    assert shift.dtype == torch.uint8 and shift.shape == base.shape
    assert decoded.dtype == torch.float32 and decoded.shape == lse.shape and decoded.is_contiguous()
    assert torch.allclose(base, tile_minima(lse, tile_q), rtol=0, atol=0, equal_nan=True)  # equal, NaN included
    # The step: the smallest power-of-two multiple of LSE_STEP that spans the tile in 254 steps; the unit step where
    # 254 unit steps do (where the format without shifts clamped nothing), and 0 for a tile without a finite LSE.
    assert torch.equal(shift.long(), reference_shifts(lse, tile_q))
    span = tile_spans(lse, tile_q)
    assert (shift[span <= 254 * LSE_STEP] == 0).all() and (shift[span > 254 * LSE_STEP] > 0).all()
    assert (shift[torch.isnan(base)] == 0).all()
    step = lse_step(shift)
    assert step.dtype == torch.float32 and torch.equal(step.double(), LSE_STEP * 2.0 ** shift.double())  # exact
    finite = torch.isfinite(lse)
    assert torch.equal(codes == 255, ~finite) and torch.equal(torch.isnan(decoded), ~finite)
    true, got = lse[finite], decoded[finite]
    row_base, row_step, code = per_row(base, tile_q, seq_q)[finite], per_row(step, tile_q, seq_q)[finite], codes[finite]
    assert (got <= true).all(), "a decoded LSE above the true one"  # never larger: the mass rule stays conservative
    assert (true - got < row_step + ulp(true)).all(), "more than one step of its tile below"  # no row clamped
    # The largest such code: the next one decodes above the LSE (254: the tile's top, never exceeded). Where a step
    # is within a few ulps of the LSE's magnitude, lse - base itself rounds and the code may fall short by more than
    # the one code the encoder corrects (still below the LSE, within a step and an ulp).
    below = (code < 254) & (row_step > 4 * ulp(true))
    next_value = row_base + (code.float() + 1) * row_step
    assert (next_value[below] > true[below]).all(), "a code smaller than the largest not above the LSE"
    # Decoding is lossless from then on: the state's snapshot, given back with set_lse, decodes to itself (its
    # spread is at most the original's, so its step is no larger).
    again = encode_lse(decoded, tile_q)
    assert torch.allclose(decode_lse(*again, tile_q), decoded, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(again[1], base, rtol=0, atol=0, equal_nan=True) and (again[2] <= shift).all()


def test_lse_codes_edge_cases():
    tile, s = 32, LSE_STEP
    lse = torch.full((1, 2, 70), 12.5)  # 3 q-tiles, the last ragged (rows 64 .. 69)
    lse[0, 0, :6] = torch.tensor([-3.0, -3.0 + 3 * s, -3.0 + 3.5 * s, math.nan, -math.inf, -3.0 + 253.5 * s])
    lse[0, 0, 32] = 12.5 + 300 * s  # 300 unit steps above the tile's minimum: the unshifted format clamped it
    lse[0, 0, 33] = 12.5 + 299 * s
    lse[0, 1, 32:64] = math.nan  # a q-tile without any LSE: base NaN, shift 0
    lse[0, 1, 40] = -math.inf
    lse[0, 1, 64:70] = torch.linspace(-40.0, 60.0, 6)  # the ragged tile: 100 nats, 4.5 x 254 unit steps
    codes, base, shift = encode_lse(lse, tile)
    assert shift.tolist() == [[[0, 1, 0], [0, 0, 3]]]
    assert codes[0, 0, :7].tolist() == [0, 3, 3, 255, 255, 253, 178]  # unit step; (12.5 + 3) / s = 178.9
    assert codes[0, 0, 32:35].tolist() == [150, 149, 0]  # step 2 s: 300 / 2, 299 / 2 rounded down
    assert codes[0, 1, 64:70].tolist() == [0] + [math.floor(20 * i / (8 * s)) for i in range(1, 6)]  # step 8 s
    assert codes[0, 1, 64:70].tolist() == [0, 28, 57, 86, 115, 144]
    assert base[0, 0].tolist() == [-3.0, 12.5, 12.5] and base[0, 1, 0] == 12.5 and torch.isnan(base[0, 1, 1])
    assert base[0, 1, 2] == -40.0 and (codes[0, 1, 32:64] == 255).all()
    decoded = decode_lse(codes, base, shift, tile)
    assert torch.isnan(decoded[0, 0, 3:5]).all() and torch.isnan(decoded[0, 1, 32:64]).all()
    assert decoded[0, 0, 5] == torch.tensor(-3.0 + 253 * s) and decoded[0, 0, 32] == lse[0, 0, 32]
    assert decoded[0, 0, 33] == torch.tensor(12.5 + 298 * s)
    assert (lse[0, 1, 64:70] - decoded[0, 1, 64:70]).max() < 8 * s  # was up to 78 nats (clamped at -40 + 22.0)
    check_lse_codes(lse, tile)
    # Written into the given buffers, every element of them (poisoned first).
    out_codes = torch.full_like(codes, 77)
    out_base = torch.full_like(base, 1234.0)
    out_shift = torch.full_like(shift, 99)
    got = encode_lse(lse, tile, out_codes, out_base, out_shift)
    assert got[0] is out_codes and got[1] is out_base and got[2] is out_shift
    assert torch.equal(out_codes, codes) and torch.allclose(out_base, base, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out_shift, shift)
    assert abs(LSE_STEP - math.log(2) / 8) < 1e-6


def test_a_tile_spread_over_100_nats_decodes_every_row_within_one_step_of_its_tile():
    """A q-tile whose rows' LSEs spread over 100 nats gets step 8 * LSE_STEP (0.69 nats: 100 / 254 rounded up to a
    power-of-two multiple) and every row decodes less than that below its LSE; a narrow tile beside it keeps the
    unit step. Without the per-tile step every row more than 22.0 nats above the minimum was clamped there (most of
    this tile, the top row 78 nats low)."""
    gen = torch.Generator().manual_seed(3)
    lse = torch.empty(1, 2, 256)
    lse[..., :128] = torch.linspace(-30.0, 70.0, 128) + 0.01 * torch.randn(1, 2, 128, generator=gen)
    lse[..., 128:] = 5.0 + torch.randn(1, 2, 128, generator=gen)  # spread about 6: the unit step
    lse[0, 0, 0], lse[0, 0, 127] = -30.0, 70.0  # exactly 100 nats in the first tile of head 0
    codes, base, shift = encode_lse(lse, 128)
    assert shift.tolist() == [[[3, 0], [3, 0]]]
    decoded = decode_lse(codes, base, shift, 128)
    error = lse - decoded
    assert (error >= 0).all()
    assert error[..., :128].max() < 8 * LSE_STEP and error[..., 128:].max() < LSE_STEP
    assert error[..., :128].mean() > LSE_STEP  # the step really is the larger one there
    assert (lse[..., :128] - base[..., :1] > 254 * LSE_STEP).float().mean() > 0.7  # rows a unit step clamped
    assert codes[0, 0, 127] == math.floor(100 / (8 * LSE_STEP)) == 144
    check_lse_codes(lse, 128)


def test_lse_step_is_exact_and_the_shift_the_smallest_that_spans_the_tile():
    shifts = torch.arange(127, dtype=torch.uint8)
    assert torch.equal(lse_step(shifts).double(), LSE_STEP * 2.0 ** torch.arange(127, dtype=torch.float64))
    for s in (0, 1, 2, 7, 40, 100, 123):
        top = torch.tensor(254 * LSE_STEP * 2.0 ** s, dtype=torch.float32)  # exactly 254 steps: exact in float32
        assert top.double() == 254 * LSE_STEP * 2.0 ** s
        above = torch.nextafter(top, torch.tensor(math.inf))  # one ulp more: the next step
        for value, expected_shift, expected_code in ((top, s, 254), (above, s + 1, 127)):
            lse = torch.stack([torch.tensor(0.0), value])
            codes, base, shift = encode_lse(lse, 2)
            assert (shift.item(), codes.tolist()) == (expected_shift, [0, expected_code]), (s, value)
            check_lse_codes(lse, 2)
    # The widest finite float32 spread keeps its rows within a step (of 2**124 * LSE_STEP).
    top = torch.finfo(torch.float32).max
    lse = torch.tensor([0.0, top, top / 3, -math.inf, math.nan])
    codes, base, shift = encode_lse(lse, 8)
    assert shift.item() == 124 and codes[3:].tolist() == [255, 255]
    check_lse_codes(lse, 8)


@settings(max_examples=80, deadline=None)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 300)),
       tile=st.sampled_from([16, 32, 64, 128]), spread=st.sampled_from([0.01, 1.0, 4.0, 8.0, 40.0, 1000.0, 1e6]),
       mixed=st.booleans(), centre=st.sampled_from([-50.0, 0.0, 30.0, 2000.0, -1e5]), holes=st.floats(0, 0.5),
       seed=st.integers(0, 1000))
def test_lse_codes_round_down_by_less_than_one_step(shape, tile, spread, mixed, centre, holes, seed):
    """Narrow and wide spreads (1e6: shifts near 18), spreads near 254 unit steps (4 and 8: tiles on either side of
    the unit step), and with ``mixed`` a spread drawn per q-tile over four decades."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    if mixed:
        per_tile = 10.0 ** (4 * torch.rand(*shape[:-1], -(-shape[-1] // tile), generator=gen) - 3)
        noise = noise * per_row(per_tile, tile, shape[-1])
    lse = centre + spread * noise
    hole = torch.rand(shape, generator=gen)
    lse[hole < holes / 2] = math.nan  # no previous call
    lse[(hole >= holes / 2) & (hole < holes)] = -math.inf  # a row that read nothing
    check_lse_codes(lse, tile)


def test_state_lse_snapshot_and_set_lse():
    state = SkipState(1, 2, 70, 80, 32, 16, with_lse=True)
    assert state.lse.shape == (1, 2, 70) and torch.isnan(state.lse).all()
    lse = 10 + torch.randn(1, 2, 70, generator=torch.Generator().manual_seed(0))
    state.set_lse(lse)
    expected = decode_lse(*encode_lse(lse, 32), 32)
    assert torch.equal(state.lse, expected) and (state.lse <= lse).all()
    snapshot = state.lse
    snapshot.fill_(0.0)  # a snapshot: the state is untouched
    assert torch.equal(state.lse, expected)
    state.read_everything()  # re-admission keeps the LSE
    assert torch.equal(state.lse, expected)
    for bad in (lse.double(), lse[..., :69], "lse"):
        with pytest.raises(ValueError, match=r"set_lse takes a float32 tensor of shape \(1, 2, 70\)"):
            state.set_lse(bad)
    with pytest.raises(ValueError, match="with_lse=True"):
        SkipState(1, 2, 70, 80, 32, 16).set_lse(lse)
