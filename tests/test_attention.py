"""``lite_attention`` (PyTorch backend) against the float64 oracle: outputs, LSE and write lists.

Inputs are structured (tokens on a 3-D grid with positional attention) and drift slowly over
consecutive calls, as in a denoising loop; each call is checked against the oracle on the read
list that call actually computed.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liteattn import SkipList, SkipState, lite_attention
from liteattn.state import decode_lse, encode_lse, lse_step
from liteattn.testing import StructuredSequence, structured_qkv
from lists import ListPair, check_rounded_lse_keeps_the_exact_tiles, exact_and_rounded_mass_calls
from oracle import check_call, fresh_read, max_err, oracle_attention, overlapping_tiles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poison(lst: SkipList, seed: int = 0) -> None:
    """Fill a list with garbage (out-of-range indices and counts): a call must overwrite all of it."""
    gen = torch.Generator().manual_seed(seed)
    nk = lst.shape[-1]
    lst.kv_indices.copy_(torch.randint(-7, 3 * nk + 7, lst.kv_indices.shape, generator=gen))
    lst.kv_counts.copy_(torch.randint(-3, nk + 4, lst.kv_counts.shape, generator=gen))


def run_steps(seq, state: ListPair, threshold, *, must_do=(), must_do_q=(), scale=None, criterion="max"):
    """Run ``seq`` through ``lite_attention`` with ping-pong lists, checking every call against the oracle of
    ``criterion`` (the mass rule measures against ``state.lse``, the previous call's LSE: build the state with
    ``with_lse=True``).

    Returns the read lists (bool (B, H, Mq, Nk)) of every call plus the one the last call wrote.
    """
    reads = []
    for n, (q, k, v) in enumerate(seq):
        read = state.read.to_dense().clone()
        reads.append(read)
        poison(state.write, seed=n)
        lse_prev = None if state.lse is None else state.lse.clone()
        out, lse = lite_attention(q, k, v, read=state.read, write=state.write, threshold=threshold, scale=scale,
                                  must_do=must_do, must_do_q=must_do_q, return_lse=True, backend="torch",
                                  criterion=criterion, lse_state=state.lse)
        state.write.check()  # a well-formed compact list, whatever garbage was there
        check_call(q, k, v, read, out, lse, state.write.to_dense(), threshold=threshold,
                   tile_q=state.tile_q, tile_k=state.tile_k, scale=scale, must_do=must_do, must_do_q=must_do_q,
                   criterion=criterion, lse_prev=lse_prev)
        if state.lse is not None:  # the state now holds this call's LSE
            assert torch.equal(state.lse, lse)
        state.swap()
    reads.append(state.read.to_dense().clone())
    return reads


def assert_monotone(reads):
    """Skip sets only grow: every read list is a subset of the one before."""
    for n, (before, after) in enumerate(zip(reads, reads[1:])):
        assert not (after & ~before).any(), f"call {n + 1} reads a tile that call {n} did not"


@pytest.mark.parametrize("criterion", ["max", "mass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_matches_oracle(dtype, criterion):
    seq = StructuredSequence(5, batch=2, seq_q=300, heads=2, head_dim=32, drift=0.3, sharpness=(1.0, 3.0),
                             dtype=dtype, seed=1)
    state = ListPair(2, 2, 300, 300, tile_q=32, tile_k=32, with_lse=criterion == "mass")
    reads = run_steps(seq, state, threshold=-6.0, criterion=criterion)
    assert_monotone(reads)
    sparsity = [1 - r.float().mean().item() for r in reads]
    assert sparsity[0] == 0.0 and sparsity[-1] > 0.1, sparsity  # structured inputs: real sparsity


@pytest.mark.parametrize("seq_q,seq_k", [(97, 250), (250, 97), (300, 300), (250, 300)])
@pytest.mark.parametrize("tile_q,tile_k", [(16, 16), (32, 64), (64, 32), (128, 128)])
def test_lengths_and_tiles(seq_q, seq_k, tile_q, tile_k):
    criterion = ("max", "mass")[(tile_q // 16 + seq_k) % 2]  # about half of the cases each
    seq = StructuredSequence(3, batch=1, seq_q=seq_q, seq_k=seq_k, heads=2, head_dim=16, drift=0.3,
                             sharpness=(1.0, 3.0), seed=seq_q + seq_k + tile_q)
    state = ListPair(1, 2, seq_q, seq_k, tile_q=tile_q, tile_k=tile_k, with_lse=criterion == "mass")
    assert_monotone(run_steps(seq, state, threshold=-4.0, criterion=criterion))


def test_first_call_without_lists_is_dense():
    q, k, v = structured_qkv(1, 250, 2, 16, seed=5)
    out, lse = lite_attention(q, k, v, return_lse=True, backend="torch")  # read=None: every tile
    check_call(q, k, v, None, out, lse, threshold=-math.inf, tile_q=128, tile_k=128)
    # write without read: decides on the full list
    write = SkipList.full(1, 2, 250, 250, 32, 32)
    poison(write)
    out = lite_attention(q, k, v, write=write, threshold=-2.0, backend="torch")
    check_call(q, k, v, None, out, None, write.to_dense(), threshold=-2.0, tile_q=32, tile_k=32)
    assert write.to_dense().sum() < write.to_dense().numel()  # something was dropped


def test_threshold_minus_inf_is_dense():
    seq = StructuredSequence(3, batch=1, seq_q=200, heads=2, head_dim=16, sharpness=(1.0, 3.0), seed=2)
    state = ListPair(1, 2, 200, 200, 32, 32)
    reads = run_steps(seq, state, threshold=-math.inf)
    assert all(r.all() for r in reads)
    q, k, v = next(iter(seq))
    out = lite_attention(q, k, v, read=state.read, write=state.write, threshold=-math.inf, backend="torch")
    check_call(q, k, v, None, out, threshold=-math.inf, tile_q=32, tile_k=32)  # dense attention


def test_first_processed_tile_always_kept():
    # Threshold 0 is the harshest allowed; random read lists start anywhere.
    gen = torch.Generator().manual_seed(0)
    q, k, v = structured_qkv(2, 200, 2, 16, seq_k=300, seed=7)
    read_dense = torch.rand(2, 2, 7, 10, generator=gen) < 0.4
    read = SkipList.from_dense(read_dense, 32, 32, 200, 300)
    write = SkipList.full(2, 2, 200, 300, 32, 32)
    out = lite_attention(q, k, v, read=read, write=write, threshold=0.0, backend="torch")
    written = write.to_dense()
    check_call(q, k, v, read_dense, out, None, written, threshold=0.0, tile_q=32, tile_k=32)
    for idx in read_dense.any(-1).nonzero().tolist():
        first = int(read_dense[tuple(idx)].nonzero()[0])
        assert written[tuple(idx) + (first,)], f"first read tile {first} of {idx} was dropped"
    assert (written.sum(-1) < read_dense.sum(-1)).any()  # threshold 0 drops something


def test_rows_that_read_nothing():
    q, k, v = structured_qkv(1, 100, 2, 16, seed=2)
    read_dense = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    read_dense[0, 1, 2] = False
    read = SkipList.from_dense(read_dense, 32, 32, 100, 100)
    write = SkipList.full(1, 2, 100, 100, 32, 32)
    out, lse = lite_attention(q, k, v, read=read, write=write, threshold=-3.0, return_lse=True, backend="torch")
    assert (out[0, 64:96, 1] == 0).all()
    assert torch.isneginf(lse[0, 1, 64:96]).all()
    assert int(write.kv_counts[0, 1, 2]) == 0
    check_call(q, k, v, read_dense, out, lse, write.to_dense(), threshold=-3.0, tile_q=32, tile_k=32)


def test_custom_scale_and_value_dim():
    q, k, v = structured_qkv(1, 150, 3, 32, seq_k=170, value_dim=8, seed=4)
    state = ListPair(1, 3, 150, 170, 16, 32)
    for _ in range(2):
        read = state.read.to_dense().clone()
        out, lse = lite_attention(q, k, v, read=state.read, write=state.write, threshold=-5.0, scale=0.11,
                                  return_lse=True, backend="torch")
        assert out.shape == (1, 150, 3, 8)
        check_call(q, k, v, read, out, lse, state.write.to_dense(), threshold=-5.0, tile_q=16, tile_k=32,
                   scale=0.11)
        state.swap()


# -- must-do / must-skip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["pairs", "flat"])
def test_must_do_tiles_never_dropped(form):
    # [40, 50) touches k-tile 1 only; [60, 70) straddles k-tiles 1 and 2; [250, 260) straddles 7 and 8.
    ranges = [(40, 50), (60, 70), (250, 260)]
    given_ranges = ranges if form == "pairs" else [50, 40, 60, 70, 250, 260]  # flat, one pair reversed
    seq = StructuredSequence(4, batch=1, seq_q=300, heads=2, head_dim=16, drift=0.3, sharpness=(1.0, 3.0), seed=9)
    state = ListPair(1, 2, 300, 300, 32, 32)
    reads = []
    for q, k, v in seq:
        reads.append(state.read.to_dense().clone())
        out = lite_attention(q, k, v, read=state.read, write=state.write, threshold=-3.0, must_do=given_ranges,
                             backend="torch")
        check_call(q, k, v, reads[-1], out, None, state.write.to_dense(), threshold=-3.0, tile_q=32, tile_k=32,
                   must_do=ranges)
        state.swap()
    final = state.read.to_dense()
    assert overlapping_tiles(ranges, 300, 32) == [1, 2, 7, 8]
    assert final[..., [1, 2, 7, 8]].all(), "a must-do k-tile was dropped"
    assert not final.all(), "nothing was dropped: the test would not see a lost must-do tile"
    # Without the must-do ranges, the same inputs do drop some of those tiles.
    q, k, v = next(iter(seq))
    free = oracle_attention(q, k, v, None, threshold=-3.0, tile_q=32, tile_k=32)
    assert not free.keep[..., [1, 2, 7, 8]].all()


def test_must_do_q_tiles_drop_nothing():
    q, k, v = structured_qkv(1, 300, 2, 16, seed=11, sharpness=(1.0, 3.0))
    state = ListPair(1, 2, 300, 300, 32, 32)
    for _ in range(2):
        read = state.read.to_dense().clone()
        out = lite_attention(q, k, v, read=state.read, write=state.write, threshold=-3.0, must_do_q=[(70, 75)],
                             backend="torch")
        check_call(q, k, v, read, out, None, state.write.to_dense(), threshold=-3.0, tile_q=32, tile_k=32,
                   must_do_q=[(70, 75)])
        state.swap()
    final = state.read.to_dense()
    assert final[:, :, 2].all()  # rows 70..74 live in q-tile 2
    assert not final.all()


def test_must_skip_full_tiles_never_computed_partial_still_computed():
    # k-tile 2 = tokens [64, 96) is covered by [60, 100); tile 3 = [96, 128) only partly.
    must_skip = [(60, 100)]
    q, k, v = structured_qkv(1, 130, 2, 16, seed=12)
    state = ListPair(1, 2, 130, 130, 32, 32, must_skip=must_skip)
    expected = fresh_read(1, 2, 130, 130, 32, 32, must_skip)
    assert torch.equal(state.read.to_dense(), expected)
    assert not expected[..., 2].any() and expected[..., [0, 1, 3, 4]].all()
    out = lite_attention(q, k, v, read=state.read, write=state.write, threshold=-math.inf, backend="torch")
    res = check_call(q, k, v, expected, out, None, state.write.to_dense(), threshold=-math.inf, tile_q=32,
                     tile_k=32)
    # Tile 3 (partly inside the range) was computed: an oracle that dropped it too gives another answer.
    also_3 = expected.clone()
    also_3[..., 3] = False
    other = oracle_attention(q, k, v, also_3, threshold=-math.inf, tile_q=32, tile_k=32)
    assert max_err(other.out, res.out) > 1e-3
    assert max_err(out, res.out) < 1e-5


# -- random read lists (property based) ------------------------------------------------------------------

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 2), seq_q=st.integers(1, 140), seq_k=st.integers(1, 140),
    tile_q=st.sampled_from([16, 32, 64]), tile_k=st.sampled_from([16, 32, 64]),
    threshold=st.sampled_from([-math.inf, -12.0, -4.0, -1.0, 0.0]),
    dtype=st.sampled_from(DTYPES), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
    must_do=st.lists(st.tuples(st.integers(0, 140), st.integers(0, 140)), max_size=2),
)
def test_random_read_lists(batch, heads, seq_q, seq_k, tile_q, tile_k, threshold, dtype, density, seed, must_do):
    q, k, v = structured_qkv(batch, seq_q, heads, 8, seq_k=seq_k, seed=seed, dtype=dtype, sharpness=(0.5, 3.0))
    gen = torch.Generator().manual_seed(seed)
    mq, nk = -(-seq_q // tile_q), -(-seq_k // tile_k)
    read_dense = torch.rand(batch, heads, mq, nk, generator=gen) < density
    must_do = [(min(a, b, seq_k), min(max(a, b), seq_k)) for a, b in must_do]
    read = SkipList.from_dense(read_dense, tile_q, tile_k, seq_q, seq_k)
    write = SkipList.full(batch, heads, seq_q, seq_k, tile_q, tile_k)
    poison(write, seed)
    out, lse = lite_attention(q, k, v, read=read, write=write, threshold=threshold, must_do=must_do,
                              return_lse=True, backend="torch")
    write.check()
    check_call(q, k, v, read_dense, out, lse, write.to_dense(), threshold=threshold, tile_q=tile_q,
               tile_k=tile_k, must_do=must_do)


def test_every_output_element_written(monkeypatch):
    """docs/DESIGN.md section 3: poison every buffer the call allocates with torch.empty; all of it must be overwritten."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(math.nan)
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.fill_(-777)
        return t

    seq = StructuredSequence(3, batch=1, seq_q=250, seq_k=190, heads=2, head_dim=16, drift=0.3,
                             sharpness=(1.0, 3.0), seed=21)
    state = ListPair(1, 2, 250, 190, 32, 32, must_skip=[(0, 64)])
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for q, k, v in seq:
        read = state.read.to_dense().clone()
        poison(state.write)
        out, lse = lite_attention(q, k, v, read=state.read, write=state.write, threshold=-4.0, return_lse=True,
                                  backend="torch")
        assert not out.isnan().any() and not lse.isnan().any()
        check_call(q, k, v, read, out, lse, state.write.to_dense(), threshold=-4.0, tile_q=32, tile_k=32)
        state.swap()


@pytest.mark.parametrize("block", [1, 32 * 320, 3 * 32 * 320, 2 * 10 * 32 * 320],
                         ids=["below-one-tile", "one-tile", "three-tiles", "two-heads"])
def test_score_blocks_smaller_than_the_problem(monkeypatch, block):
    """The PyTorch backend cuts the scores into blocks of heads x whole q-tiles (small ones on the CPU); every cut,
    including a last block of fewer tiles or heads, must give the oracle's outputs, LSE and decisions.
    Here Mq = Nk = 10 tiles of 32 and H = 3, so one q-tile's scores are 32 x 320 elements."""
    from liteattn.backends import torch_ref

    monkeypatch.setattr(torch_ref, "_MAX_BLOCK_ELEMENTS_CPU", block)
    seq = StructuredSequence(3, batch=2, seq_q=300, seq_k=310, heads=3, head_dim=16, drift=0.3,
                             sharpness=(1.0, 3.0), seed=5)
    state = ListPair(2, 3, 300, 310, tile_q=32, tile_k=32, must_skip=[(40, 80)])
    assert_monotone(run_steps(seq, state, threshold=-5.0, must_do=[(300, 310)], must_do_q=[(0, 20)]))


@pytest.mark.parametrize("q_gain", [0.2, 5.0], ids=["no-underflow", "underflow"])  # score spread ~64 vs ~1600
def test_whole_tile_lengths_with_and_without_exp_underflow(q_gain):
    """Lengths that are whole tiles and calls that read every tile take the CPU's short exp path unless some score
    lies more than ~86 (natural log) under its row's max; both paths must match the oracle, over several calls."""
    base = StructuredSequence(3, batch=1, seq_q=256, heads=2, head_dim=16, drift=0.3, sharpness=(1.0, 3.0), seed=9)
    seq = [(q * q_gain, k, v) for q, k, v in base]
    state = ListPair(1, 2, 256, 256, tile_q=32, tile_k=32)
    assert_monotone(run_steps(seq, state, threshold=-6.0))


def test_mass_rule_extremes_and_its_first_call():
    """-inf keeps every tile; 0 keeps only what must be kept (no tile holds more than all of a row's mass); the first
    call of a run (no previous LSE) measures against its running LSE, which can only overstate a tile's share."""
    seq = list(StructuredSequence(2, batch=1, seq_q=256, heads=2, head_dim=32, drift=0.2, sharpness=(1.0, 3.0)))
    q, k, v = seq[0]
    for threshold, expect in ((-math.inf, 8), (0.0, 1)):
        state = ListPair(1, 2, 256, 256, 32, 32, with_lse=True)
        lite_attention(q, k, v, read=state.read, write=state.write, threshold=threshold, criterion="mass",
                       lse_state=state.lse, backend="torch")
        assert (state.write.kv_counts == expect).all(), (threshold, state.write.kv_counts)
        assert (state.write.kv_indices[..., 0] == 0).all()  # the first processed tile
    # Measured against the exact LSE (the second call, same inputs) a tile's share is smaller than against the
    # running LSE: the second call keeps a subset.
    state = ListPair(1, 2, 256, 256, 32, 32, with_lse=True)
    first = SkipList.full(1, 2, 256, 256, 32, 32)
    for write in (state.write, first):
        lite_attention(q, k, v, write=write, threshold=-8.0, criterion="mass", lse_state=state.lse, backend="torch")
    assert not (first.to_dense() & ~state.write.to_dense()).any()
    assert first.to_dense().sum() < state.write.to_dense().sum()


def test_lse_state_is_checked():
    q, k, v = structured_qkv(1, 100, 2, 16)
    for bad, error in ((torch.zeros(1, 2, 99), ValueError), (torch.zeros(1, 2, 100, dtype=torch.float64), ValueError),
                       ("lse", TypeError)):
        with pytest.raises(error, match="lse_state must be"):
            lite_attention(q, k, v, criterion="mass", lse_state=bad)
    with pytest.raises(ValueError, match=r"criterion must be one of \['mass', 'max'\]"):
        lite_attention(q, k, v, criterion="sum")


def test_cpu_worker_pool_equals_one_block_at_a_time_and_restores_threads(monkeypatch):
    """The CPU backend spreads its score blocks over single-threaded workers (robust on busy cores; speed lives in
    bench/cpu_load.py). The result must not depend on it, and the process's thread setting must come back."""
    from liteattn.backends import torch_ref

    q, k, v = structured_qkv(2, 700, 3, 32, seed=11, sharpness=(1.0, 3.0))
    state = ListPair(2, 3, 700, 700, 64, 64)
    lite_attention(q, k, v, read=state.read, write=state.write, threshold=-4.0, backend="torch")
    state.swap()  # a read list with holes: the masked path
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        write_pool = SkipList.full(2, 3, 700, 700, 64, 64)
        pooled = lite_attention(q, k, v, read=state.read, write=write_pool, threshold=-4.0, return_lse=True,
                                backend="torch")
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(torch_ref, "_run_blocks", lambda run, blocks, device: [run(b) for b in blocks])
        write_serial = SkipList.full(2, 3, 700, 700, 64, 64)
        serial = lite_attention(q, k, v, read=state.read, write=write_serial, threshold=-4.0, return_lse=True,
                                backend="torch")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pooled[0], serial[0]) and torch.equal(pooled[1], serial[1])
    assert torch.equal(write_pool.to_dense(), write_serial.to_dense())


@pytest.mark.parametrize("criterion", ["max", "mass"])
def test_skip_state_path_matches_the_oracle(criterion):
    """``lite_attention(state=...)``: the bitmask state expanded, computed, narrowed and packed back, call after call,
    against the oracle on the tiles it marked before each call."""
    from liteattn import SkipState

    seq = StructuredSequence(4, batch=2, seq_q=300, heads=2, head_dim=32, drift=0.3, sharpness=(1.0, 3.0), seed=4)
    state = SkipState(2, 2, 300, 300, tile_q=32, tile_k=64, must_skip=[(0, 64)], with_lse=criterion == "mass")
    # bits, counts, and with the LSE one uint8 code per row, one float32 base and one uint8 shift per q-tile
    assert state.nbytes == 2 * 2 * 10 * 1 * 4 + 2 * 2 * 10 * 4 + (2 * 2 * 300 + 2 * 2 * 10 * (4 + 1)
                                                                  if criterion == "mass" else 0)
    reads = []
    for n, (q, k, v) in enumerate(seq):
        read = state.to_dense().clone()
        lse_prev = None if state.lse is None else state.lse  # the decoded previous LSE: what the call measures against
        if lse_prev is not None:
            assert torch.isnan(lse_prev).all() == (n == 0)
        out, lse = lite_attention(q, k, v, state=state, threshold=-6.0, criterion=criterion, return_lse=True,
                                  backend="torch")
        assert torch.equal(state.counts, read.sum(-1, dtype=torch.int32))  # what this call computed
        check_call(q, k, v, read, out, lse, state.to_dense(), threshold=-6.0, tile_q=32, tile_k=64,
                   criterion=criterion, lse_prev=lse_prev)
        if state.lse is not None:  # this call's LSE, rounded down to its codes
            assert torch.equal(state.lse, decode_lse(*encode_lse(lse, 32), 32))
        reads.append(read)
    reads.append(state.to_dense())
    assert_monotone(reads)
    assert not reads[0][..., 0].any() and state.sparsity() > 0.3
    state.reset()
    assert torch.equal(state.to_dense(), reads[0]) and torch.equal(state.read.to_dense(), reads[0])


def two_calls(inputs: str, dtype=torch.float32):
    """Two consecutive calls' (q, k, v), (1, S, 2, 32). ``structured``: positional attention, whose rows' LSEs
    spread over more than 254 unit steps within most q-tiles (steps 2 to 8 times the unit; without a per-tile step
    35% of the rows were clamped); ``random``: random scores, every row within a few steps of its tile's minimum
    (the unit step) and tile shares near 2^-1.5 (decisions close to these thresholds)."""
    if inputs == "structured":
        return 300, 32, (-4.0, -6.0, -8.0, -10.0), list(StructuredSequence(
            2, batch=1, seq_q=300, heads=2, head_dim=32, drift=0.3, sharpness=(1.0, 3.0), dtype=dtype, seed=6))
    gen = torch.Generator().manual_seed(384)
    first = [torch.randn(1, 384, 2, 32, generator=gen) * gain for gain in (1.5, 1.5, 1.0)]
    second = [x + 0.1 * torch.randn(x.shape, generator=gen) for x in first]
    return 384, 64, (-1.5, -1.0), [tuple(x.to(dtype) for x in first), tuple(x.to(dtype) for x in second)]


@pytest.mark.parametrize("inputs", ["structured", "random"])
def test_a_rounded_down_lse_keeps_a_superset_of_the_exact_lses_tiles(inputs):
    """Issue 11: a SkipState keeps the mass rule's previous LSE rounded down to 8 bits per row. Measured against it
    a tile's share can only be larger: on the same inputs, read list and previous LSE, the state path keeps every
    tile that the exact float32 LSE (the stateless ``lse_state=``) keeps, and exactly what the oracle keeps given
    the rounded LSE."""
    seq_q, tile, thresholds, ((q0, k0, v0), (q, k, v)) = two_calls(inputs)
    _, exact = lite_attention(q0, k0, v0, return_lse=True, backend="torch", tile_q=tile, tile_k=tile)
    extra = 0
    for threshold in thresholds:
        write = SkipList.full(1, 2, seq_q, seq_q, tile, tile)
        poison(write)
        out, kept, kept_exact, rounded = exact_and_rounded_mass_calls(q, k, v, exact, write, tile, threshold,
                                                                      "torch")
        assert (rounded <= exact).all() and (rounded < exact).any()
        assert not (kept_exact & ~kept).any(), f"threshold {threshold}: the rounded LSE dropped a tile"
        extra += int((kept & ~kept_exact).sum())
        check_call(q, k, v, None, out, None, kept, threshold=threshold, tile_q=tile, tile_k=tile, criterion="mass",
                   lse_prev=rounded)
    assert extra > 0  # conservative, and measurably so on these inputs


def test_a_wide_spread_of_lses_in_a_q_tile_keeps_close_to_the_exact_lses_tiles():
    """Positional inputs (512 tokens, 64-token tiles, sharpness (1, 3)) whose rows' LSEs spread over 42 to 58 nats
    within each q-tile of one head, 126 to 175 of the other. Each q-tile's step grows to span it (2 to 8 unit
    steps), so no row is clamped: the state keeps what the exact float32 LSE keeps, give or take a tile or two
    (measured at thresholds -4, -6, -8, -10: 97, 108, 108, 108 of 128 against 95, 108, 108, 108), where the 8-bit
    codes with one step for every tile clamped 60% of the rows, each to 22 nats above its tile's minimum, and kept
    all 128 tiles at every threshold."""
    seq_q, tile = 512, 64
    (q0, k0, v0), (q, k, v) = StructuredSequence(2, batch=1, seq_q=seq_q, heads=2, head_dim=32, drift=0.3,
                                                 sharpness=(1.0, 3.0), seed=0)
    _, exact = lite_attention(q0, k0, v0, return_lse=True, backend="torch", tile_q=tile, tile_k=tile)
    codes, base, shift = encode_lse(exact, tile)
    assert (shift >= 1).all() and shift.max() == 3  # every tile spreads beyond 254 unit steps
    rows_step = lse_step(shift)[..., torch.arange(seq_q) // tile]
    for threshold in (-4.0, -6.0, -8.0, -10.0):
        write = SkipList.full(1, 2, seq_q, seq_q, tile, tile)
        poison(write)
        check_rounded_lse_keeps_the_exact_tiles(q, k, v, exact, write, tile, threshold, "torch", rows_step)
