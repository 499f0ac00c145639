"""SkipList / SkipState: construction, inspection helpers, validation, and the state's bitmask."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liteattn import SkipList, SkipState
from liteattn.skip import normalize_ranges, tiles_covered, tiles_overlapping
from liteattn.state import LSE_STEP, decode_lse, encode_lse, lse_step
from oracle import covered_tiles, fresh_read, overlapping_tiles


def test_fresh_state_reads_everything():
    state = SkipState(2, 3, 250, 97, tile_q=64, tile_k=32)
    assert state.shape == (2, 3, 4, 4)
    assert state.bits.dtype == torch.int32 and state.bits.shape == (2, 3, 4, 1) and (state.bits == 0b1111).all()
    assert (state.counts == 4).all()
    lst = state.read
    assert lst.kv_indices.dtype == torch.int32 and lst.kv_counts.dtype == torch.int32
    assert lst.kv_indices.shape == (2, 3, 4, 4) and lst.kv_counts.shape == (2, 3, 4)
    assert (lst.kv_counts == 4).all() and (lst.kv_indices == torch.arange(4, dtype=torch.int32)).all()
    lst.check()
    dense = state.to_dense()
    assert dense.dtype == torch.bool and dense.shape == (2, 3, 4, 4) and dense.all()
    assert state.sparsity() == 0.0 and state.read.sparsity() == 0.0


@pytest.mark.parametrize("must_skip,form", [
    ([(0, 40), (100, 130)], "pairs"),
    ([40, 0, 100, 130], "flat"),
    ([(0, 20), (20, 40), (100, 130)], "adjacent pairs"),
    (torch.tensor([[0, 40], [100, 130]]), "tensor"),
])
def test_fresh_state_with_must_skip(must_skip, form):
    # seq_k = 130, tile 32: tiles [0,32) covered, [32,64) partly, [96,128) partly, [128,130) covered.
    state = SkipState(1, 2, 50, 130, 16, 32, must_skip=must_skip)
    expected = fresh_read(1, 2, 50, 130, 16, 32, [(0, 40), (100, 130)])
    assert expected[..., [1, 2, 3]].all() and not expected[..., [0, 4]].any()
    assert torch.equal(state.to_dense(), expected), form
    assert state.sparsity() == pytest.approx(2 / 5)
    assert state.read.kv_counts.eq(3).all()
    assert state.read.kv_indices[..., :3].eq(torch.tensor([1, 2, 3], dtype=torch.int32)).all()
    state.read.check()


def test_must_skip_everything():
    state = SkipState(1, 1, 20, 40, 16, 16, must_skip=[(0, 40)])
    assert state.sparsity() == 1.0 and (state.read.kv_counts == 0).all()
    assert not state.to_dense().any()


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 200), tile=st.sampled_from([16, 32, 48, 64]),
       ranges=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=4))
def test_tile_range_helpers_match_oracle(length, tile, ranges):
    pairs = [(min(a, b, length), min(max(a, b), length)) for a, b in ranges]
    norm = normalize_ranges(pairs, length)
    assert list(norm) == sorted(p for p in pairs if p[0] < p[1])
    assert tiles_overlapping(norm, length, tile).nonzero().flatten().tolist() == overlapping_tiles(pairs, length, tile)
    assert tiles_covered(norm, length, tile).nonzero().flatten().tolist() == covered_tiles(pairs, length, tile)
    flat = [x for p in pairs for x in p]
    assert normalize_ranges(flat, length) == norm


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 9)),
       density=st.floats(0, 1), seed=st.integers(0, 1000))
def test_from_dense_round_trip(shape, density, seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(shape, generator=gen) < density
    b, h, mq, nk = shape
    lst = SkipList.from_dense(dense, 16, 32, mq * 16, nk * 32 - 5)
    lst.check()
    assert torch.equal(lst.to_dense(), dense)
    assert torch.equal(lst.kv_counts, dense.sum(-1).to(torch.int32))
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in shape[:3])).view(-1, 3).tolist():
        count = int(lst.kv_counts[tuple(idx)])
        assert lst.kv_indices[tuple(idx)][:count].tolist() == dense[tuple(idx)].nonzero().flatten().tolist()
    assert lst.sparsity() == pytest.approx(1 - dense.double().mean().item())  # float32 mean: off by 3e-8


@settings(max_examples=30, deadline=None)
@given(nk=st.integers(1, 130), density=st.floats(0, 1), seed=st.integers(0, 1000))
def test_bitmask_round_trip(nk, density, seed):
    """Tile j is bit j % 32 of word j // 32, whatever the number of words (bit 31 is the int32 sign bit)."""
    from liteattn.state import bits_from_dense, dense_from_bits, num_words

    dense = torch.rand(2, 3, nk, generator=torch.Generator().manual_seed(seed)) < density
    bits = bits_from_dense(dense)
    assert bits.dtype == torch.int32 and bits.shape == (2, 3, num_words(nk))
    assert torch.equal(dense_from_bits(bits, nk), dense)
    j = int(torch.randint(nk, (1,), generator=torch.Generator().manual_seed(seed)))
    assert bool((bits[0, 0, j // 32] >> (j % 32)) & 1) == bool(dense[0, 0, j])


def test_set_read_and_a_small_state():
    """The persistent state is one bit per tile pair (the compact list and the flags of a call are transient)."""
    state = SkipState(1, 2, 64, 80, 16, 16)
    drop = torch.ones(1, 2, 4, 5, dtype=torch.bool)
    drop[..., 2] = False
    state.set_read(drop)
    assert torch.equal(state.to_dense(), drop) and torch.equal(state.read.to_dense(), drop)
    assert (state.counts == 4).all() and state.sparsity() == pytest.approx(0.2)
    state.set_read(SkipList.full(1, 2, 64, 80, 16, 16))
    assert state.to_dense().all()
    with pytest.raises(ValueError, match=r"set_read takes a SkipList or a bool mask of shape \(1, 2, 4, 5\)"):
        state.set_read(torch.ones(1, 2, 4, 4, dtype=torch.bool))
    # Wan2.1-14B at 720p: B=1, H=40, S=75600, 128-token tiles.
    big = SkipState(1, 40, 75600, 75600, 128, 128, device="meta")
    assert big.nbytes == 40 * 591 * 19 * 4 + 40 * 591 * 4 <= 6.25 * 2 ** 20  # 1.89 MB
    assert big.lse is None and big.lse_codes is None and big.lse_base is None and big.lse_shift is None


def test_a_wan_14b_720p_state_with_its_lse_fits_issue_11s_budget():
    """Issue 11: a SkipState for B=1, H=40, S=75600, 128-token tiles holds at most 6.25 MiB, the mass rule's LSE
    included, and the 40 layers x 2 guidance branches of Wan2.1-14B at most 0.5 GB (a float32 LSE made it 14.0 MB
    per state, 1.12 GB in all). The LSE: a uint8 code per row, a float32 base and a uint8 step exponent per q-tile."""
    big = SkipState(1, 40, 75600, 75600, 128, 128, device="meta", with_lse=True)
    bits_and_counts = 40 * 591 * 19 * 4 + 40 * 591 * 4
    codes, bases, shifts = 40 * 75600 * 1, 40 * 591 * 4, 40 * 591 * 1
    assert big.lse_codes.dtype == torch.uint8 and big.lse_codes.shape == (1, 40, 75600)
    assert big.lse_base.dtype == torch.float32 and big.lse_base.shape == (1, 40, 591)
    assert big.lse_shift.dtype == torch.uint8 and big.lse_shift.shape == (1, 40, 591)
    assert big.nbytes == bits_and_counts + codes + bases + shifts == 5_033_400 <= 6.25 * 2 ** 20  # 4.80 MiB
    assert 80 * big.nbytes <= 0.5e9  # 0.40 GB
    assert big.nbytes < bits_and_counts + 40 * 75600 * 4  # a float32 LSE: 14.0 MB


def test_reset_after_garbage():
    state = SkipState(1, 2, 64, 80, 16, 16, must_skip=[(0, 16)], with_lse=True)
    fresh = state.to_dense().clone()
    state.bits.fill_(-3)
    state.counts.fill_(99)
    state.lse_codes.fill_(3)
    state.lse_base.fill_(1.0)
    state.lse_shift.fill_(2)
    assert (state.lse == 1.0 + 3 * 4 * LSE_STEP).all()
    state.reset()
    assert torch.equal(state.to_dense(), fresh) and torch.equal(state.counts, fresh.sum(-1, dtype=torch.int32))
    assert torch.isnan(state.lse).all() and (state.lse_codes == 255).all() and torch.isnan(state.lse_base).all()
    assert (state.lse_shift == 0).all()
    state.read.check()


# -- the mass rule's previous LSE, 8 bits per row and a step per q-tile -----------------------------------------

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


def test_check_rejects_bad_lists():
    state = SkipState(1, 1, 32, 64, 16, 16)
    lst = state.read.clone()
    lst.check()
    lst.kv_counts[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"kv_counts must lie in \[0, 4\]"):
        lst.check()
    lst = state.read.clone()
    lst.kv_counts[0, 0, 1] = -1
    with pytest.raises(ValueError, match=r"kv_counts must lie in \[0, 4\]"):
        lst.check()
    lst = state.read.clone()
    lst.kv_indices[0, 0, 0, 1] = 4
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, 4\)"):
        lst.check()
    lst = state.read.clone()
    lst.kv_indices[0, 0, 0, :2] = torch.tensor([1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_indices must ascend strictly"):
        lst.check()
    lst = state.read.clone()
    lst.kv_indices[0, 0, 0, :2] = torch.tensor([1, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"ascend strictly"):
        lst.check()
    # Entries past the count are unspecified: garbage there is fine.
    lst = state.read.clone()
    lst.kv_counts[0, 0, 0] = 2
    lst.kv_indices[0, 0, 0, 2:] = torch.tensor([-9, 0], dtype=torch.int32)
    lst.check()
    assert lst.to_dense()[0, 0, 0].tolist() == [True, True, False, False]


def test_getitem():
    dense = torch.rand(3, 2, 4, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    lst = SkipList.from_dense(dense, 16, 16, 64, 80)
    assert torch.equal(lst[1].to_dense(), dense[1:2])
    assert lst[1].shape == (1, 2, 4, 5)
    assert torch.equal(lst[2, 1].to_dense(), dense[2:3, 1:2])
    assert torch.equal(lst[-1].to_dense(), dense[2:3])
    assert torch.equal(lst[0, -1].to_dense(), dense[0:1, 1:2])
    assert torch.equal(lst[:, 0].to_dense(), dense[:, 0:1])
    assert torch.equal(lst[1:].to_dense(), dense[1:])
    assert lst[1].seq_k == 80 and lst[1].tile_k == 16
    # A view, not a copy: the state's lists can be inspected or edited per batch.
    lst[1].kv_counts.zero_()
    assert (lst.kv_counts[1] == 0).all()
    with pytest.raises(IndexError, match="batch and head only"):
        lst[0, 0, 0]
    with pytest.raises(IndexError, match="out of range"):
        lst[3]
    with pytest.raises(IndexError, match="out of range"):
        lst[0, -3]


def test_repr_and_to_string():
    state = SkipState(2, 3, 250, 97, tile_q=64, tile_k=32, must_skip=[(0, 32)])
    text = repr(state)
    for part in ("SkipState(", "batch=2", "heads=3", "seq_q=250", "seq_k=97", "tile=(64, 32)", "tiles=(4, 4)",
                 "must_skip=[(0, 32)]", "read_sparsity=0.2500", "device=cpu"):
        assert part in text, (part, text)
    text = repr(state.read)
    for part in ("SkipList(", "batch=2", "heads=3", "tiles=(4, 4)", "sparsity=0.2500"):
        assert part in text, (part, text)
    assert "\n" not in text and len(text) < 200
    assert state.read.to_string(1, 2) == "\n".join([".###"] * 4)


def test_to_and_clone():
    state = SkipState(1, 1, 32, 32, 16, 16)
    copy = state.read.clone()
    copy.kv_counts.zero_()
    assert state.read.kv_counts.eq(2).all()  # a snapshot: editing it leaves the state alone
    meta = state.read.to("meta")
    assert meta.device.type == "meta" and meta.shape == state.read.shape


def test_constructor_validation():
    indices = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    counts = torch.zeros(1, 1, 2, dtype=torch.int32)
    SkipList(indices, counts, 16, 16, 32, 48)
    with pytest.raises(TypeError, match=r"kv_indices and kv_counts must be int32, got torch.int64"):
        SkipList(indices.long(), counts, 16, 16, 32, 48)
    with pytest.raises(ValueError, match=r"expected kv_indices \(B, H, Mq, Nk\) and kv_counts \(B, H, Mq\)"):
        SkipList(indices, counts[..., :1], 16, 16, 32, 48)
    with pytest.raises(ValueError, match=r"needs \(Mq, Nk\) = \(2, 4\), got \(2, 3\)"):
        SkipList(indices, counts, 16, 16, 32, 64)
    with pytest.raises(ValueError, match=r"expected a bool \(B, H, Mq, Nk\) mask"):
        SkipList.from_dense(torch.ones(2, 3, dtype=torch.bool), 16, 16, 32, 48)
    for kw, pattern in [(dict(batch=0), "batch must be positive"), (dict(seq_k=-1), "seq_k must be positive"),
                        (dict(tile_q=24), "tile_q must be a positive multiple of 16"),
                        (dict(tile_k=0), "tile_k must be a positive multiple of 16")]:
        args = dict(batch=1, heads=1, seq_q=32, seq_k=32, tile_q=16, tile_k=16)
        args.update(kw)
        with pytest.raises(ValueError, match=pattern):
            SkipState(**args)
    with pytest.raises(TypeError, match="heads must hold integers"):
        SkipState(1, 1.5, 32, 32)


# -- public seams: tuple form, FlexAttention interop ------------------------------------------------------------

def test_as_tuple_and_block_mask_round_trip():
    gen = torch.Generator().manual_seed(3)
    dense = torch.rand(2, 3, 5, 7, generator=gen) < 0.4
    lst = SkipList.from_dense(dense, 32, 64, 150, 420)
    indices, counts = lst.as_tuple()
    assert indices is lst.kv_indices and counts is lst.kv_counts
    mask = lst.to_block_mask()
    assert mask.BLOCK_SIZE == (32, 64) and tuple(mask.seq_lengths) == (150, 420)
    back = SkipList.from_block_mask(mask)
    assert (back.tile_q, back.tile_k, back.seq_q, back.seq_k) == (32, 64, 150, 420)
    assert torch.equal(back.to_dense(), dense)
    # FlexAttention's own view of it: the same tiles, at token level.
    flex = mask.to_dense()[..., :5, :7].bool()
    assert torch.equal(flex, dense)


def test_from_block_mask_counts_partial_blocks_as_computed():
    from torch.nn.attention.flex_attention import create_block_mask

    causal = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=64)
    lst = SkipList.from_block_mask(causal)
    assert torch.equal(lst.to_dense()[0, 0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_a_state_that_would_not_fit_is_refused_before_allocating(monkeypatch):
    """Issue 11: a clear error instead of a CUDA out-of-memory in the middle of a run (the device query is faked,
    so this runs without a GPU)."""
    from liteattn import state as state_module

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 20, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    cuda = torch.device("cuda", 0)
    state_module._check_room(cuda, 2 << 20, 50 << 20)  # fits
    with pytest.raises(ValueError, match=r"a skip state needs 2.0 MiB and its calls 112.0 MiB more .* 100.0 MiB free"):
        state_module._check_room(cuda, 2 << 20, 112 << 20)
    state_module._check_room(torch.device("cpu"), 1 << 50, 1 << 50)  # the CPU is not checked
