"""SkipList / SkipState: construction, inspection helpers, validation, the state's bitmask, and the public seams
(tuple form, FlexAttention). The mass rule's compact LSE in the state: test_skip_lse.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from liteattn import SkipList, SkipState
from liteattn.skip import normalize_ranges, tiles_covered, tiles_overlapping
from liteattn.state import LSE_STEP
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
