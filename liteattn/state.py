"""``SkipState``: one layer's skip decisions between calls, as a bitmask.

The decisions of a call only ever remove tiles from what it read, and the next call needs them only as "which tiles
to read". So the persistent state is one bit per (batch, head, q-tile, k-tile)::

    bits       int32 (B, H, Mq, W)   W = ceil(Nk / 32); bit j % 32 of word j // 32 set = the next call computes tile j
    counts     int32 (B, H, Mq)      how many tiles the latest call computed (before any call: how many the next will)
    lse_base   float32 (B, H, Mq)    keep rules that read the previous call's log-sum-exp (else None): per q-tile, the
    lse_shift  uint8 (B, H, Mq)      smallest finite LSE of its rows and a step exponent (the tile's step is
    lse_codes  uint8 (B, H, Sq)      ``LSE_STEP * 2**shift``), and per row ``(lse - base) / step``, rounded down (255:
                                     no LSE)

A call expands the bits into a compact list (FlexAttention's format, what the kernel walks), computes, flags the
tiles it keeps, and packs the flags back into the bits, in place. It decodes the LSE into a float32 ``(B, H, Sq)``
buffer the same way, and encodes the new one back. The compact list, the flags and the decoded LSE are transient:
they exist during the call only, and PyTorch's caching allocator hands the same block to the next layer's call.

The LSE is kept in 8 bits per row, rounded down (:func:`encode_lse`): the decoded value is never larger than the
true one, and less than one step of its q-tile below it (up to one float32 rounding). The step is ``LSE_STEP`` (1/8
of a log2 unit) in every q-tile whose finite LSEs lie within 254 * LSE_STEP (22.0) of each other, and the smallest
power-of-two multiple of it that spans the tile where they spread further: no row is ever clamped. The mass rule
measures a tile's share against it, so a rounded LSE can only overstate a share: the call keeps a superset of the
tiles the exact LSE would keep.

For Wan2.1-14B at 720p (B=1, H=40, 75600 tokens, 591 x 591 tiles) a state holds 1.9 MB, 5.03 MB with the LSE (the
ping-pong compact lists it replaced: 112 MB; a float32 LSE alone: 12.1 MB), and a call 112 MB more while it runs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .skip import SkipList, _as_int, check_tile, fraction_skipped, normalize_ranges, num_tiles, tiles_covered

__all__ = ["SkipState", "bits_from_dense", "dense_from_bits", "num_words", "encode_lse", "decode_lse", "lse_step",
           "LSE_STEP"]

WORD_BITS = 32

# The LSE's code unit: ln(2) / 8 (natural log, 1/8 of a log2 unit), rounded to 15 significant bits so that
# code * LSE_STEP * 2**shift (8 bits x 15 bits, times a power of two) is exact in float32 and a decoded value is one
# rounding of base + code * step, whatever a compiler fuses.
LSE_STEP = 22713 / 2 ** 18  # 0.0866432; ln(2) / 8 = 0.0866434
LSE_NONE = 255  # the code of a row without a finite LSE
LSE_MAX_CODE = 254
# A q-tile's step is LSE_STEP * 2**shift, shift uint8 in [0, 126] (2**126 is still a normal float32); 124 already
# spans any finite float32 spread in 254 steps.
LSE_MAX_SHIFT = 126


def num_words(num_k_tiles: int) -> int:
    """int32 words per (b, h, q-tile) row of a bitmask over ``num_k_tiles`` k-tiles."""
    return -(-num_k_tiles // WORD_BITS)


def bits_from_dense(dense: torch.Tensor) -> torch.Tensor:
    """bool ``(..., Nk)`` -> int32 ``(..., ceil(Nk / 32))`` words, tile j in bit j % 32 of word j // 32."""
    nk = dense.shape[-1]
    padded = torch.nn.functional.pad(dense, (0, num_words(nk) * WORD_BITS - nk), value=False)
    lanes = torch.arange(WORD_BITS, device=dense.device, dtype=torch.int64)
    words = (padded.unflatten(-1, (-1, WORD_BITS)).to(torch.int64) << lanes).sum(-1)
    return words.to(torch.int32)  # bit 31 wraps to the sign bit, as int32 words hold it


def dense_from_bits(bits: torch.Tensor, num_k_tiles: int) -> torch.Tensor:
    """int32 ``(..., W)`` words -> bool ``(..., num_k_tiles)``."""
    lanes = torch.arange(WORD_BITS, device=bits.device, dtype=torch.int32)
    dense = ((bits.unsqueeze(-1) >> lanes) & 1).bool().flatten(-2)
    return dense[..., :num_k_tiles]


def _tile_rows(base: torch.Tensor, tile_q: int, seq_q: int) -> torch.Tensor:
    """``(..., Mq)`` per q-tile -> ``(..., seq_q)`` per row (the last q-tile may be ragged). A gather: inductor
    (torch 2.13, CPU) miscompiles the ragged end of ``expand(..., tile_q).flatten(-2)[..., :seq_q]`` and of
    ``repeat_interleave``."""
    return base[..., torch.arange(seq_q, device=base.device) // tile_q]


def lse_step(shift: torch.Tensor) -> torch.Tensor:
    """uint8 (or any integer) step exponents ``(..., Mq)`` in [0, LSE_MAX_SHIFT] -> float32 steps ``LSE_STEP *
    2**shift``, exact: the power of two is built from its exponent bits, not by ``exp2`` or ``pow`` (whose results
    a device library need not round exactly)."""
    exponent = (shift.to(torch.int32).clamp(0, LSE_MAX_SHIFT) + 127) << 23  # the float32 bits of 2**shift
    return exponent.view(torch.float32) * LSE_STEP  # times a power of two: exact


def _decoded(rows_base: torch.Tensor, codes: torch.Tensor, rows_step: torch.Tensor) -> torch.Tensor:
    return rows_base + codes.to(torch.float32) * rows_step  # the product is exact: one rounding in all


def _smallest_shift(span: torch.Tensor) -> torch.Tensor:
    """float32 spans (max - min finite LSE of a q-tile; 0 for a tile without one) -> float32 integer shifts: the
    smallest ``s >= 0`` with ``span <= 254 * LSE_STEP * 2**s`` (``LSE_MAX_SHIFT`` if even that is too small: a span
    that overflows float32)."""
    span = torch.where(torch.isnan(span), 0.0, span)
    ratio = (span / (LSE_MAX_CODE * LSE_STEP)).clamp(1.0, 2.0 ** 126)
    shift = ratio.log2().ceil().clamp(0, LSE_MAX_SHIFT)
    # log2 may be a little off either way near a power of two: one step up where the step is too small, one step
    # down where the next smaller one suffices (254 * step is exact, so these comparisons are the definition).
    too_small = span > LSE_MAX_CODE * lse_step(shift)
    shift = torch.where(too_small & (shift < LSE_MAX_SHIFT), shift + 1, shift)
    smaller_fits = (shift > 0) & (span <= LSE_MAX_CODE * lse_step((shift - 1).clamp_min(0)))
    return torch.where(smaller_fits, shift - 1, shift)


def encode_lse(lse: torch.Tensor, tile_q: int, codes: Optional[torch.Tensor] = None,
               base: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``(..., Sq)`` LSE (natural log) -> ``(codes uint8 (..., Sq), base float32 (..., Mq), shift uint8
    (..., Mq))``, written into ``codes``, ``base`` and ``shift`` when they are given.

    Per q-tile of ``tile_q`` rows: ``base`` is the smallest finite LSE of its rows (NaN: none); ``shift`` the
    smallest integer ``s >= 0`` such that the tile's spread (its largest finite LSE minus ``base``, in float32) is at
    most 254 steps of ``step = LSE_STEP * 2**s`` (0 for a tile without a finite LSE). So a tile whose rows lie within
    254 * LSE_STEP (22.0) of each other keeps the unit step, and no row is ever clamped. A row's code is the largest
    ``c`` in [0, 254] whose decoded value ``base + c * step`` is not above its LSE: ``floor((lse - base) / step)``,
    checked against float32 rounding (only where the step is within a few ulps of the LSE itself, so that ``lse -
    base`` rounds, may it be lower: still not above, and within a step and an ulp). Decoded values are never above
    the LSE and less than the tile's step below it, up to one float32 rounding. Rows whose LSE is not finite (NaN: no
    previous call, -inf: a row that read nothing) get 255. Vectorised, no host sync, no data-dependent Python: runs
    on any device and under torch.compile (fullgraph).
    """
    seq_q = lse.shape[-1]
    mq = -(-seq_q // tile_q)
    finite = torch.isfinite(lse)
    pad = (0, mq * tile_q - seq_q)
    padded = torch.nn.functional.pad(lse.masked_fill(~finite, math.inf), pad, value=math.inf)
    tile_min = padded.unflatten(-1, (mq, tile_q)).amin(-1)
    tile_min = tile_min.masked_fill(torch.isinf(tile_min), math.nan)  # a q-tile without a finite LSE
    padded = torch.nn.functional.pad(lse.masked_fill(~finite, -math.inf), pad, value=-math.inf)
    tile_max = padded.unflatten(-1, (mq, tile_q)).amax(-1)
    tile_shift = _smallest_shift(tile_max - tile_min)  # NaN (no finite LSE) -> 0
    step = lse_step(tile_shift)
    rows = _tile_rows(tile_min, tile_q, seq_q)  # finite wherever lse is
    rows_step = _tile_rows(step, tile_q, seq_q)
    code = ((lse - rows) / rows_step).floor().clamp(0, LSE_MAX_CODE)  # the clamp only meets float32 rounding
    code = torch.where(finite, code, 0.0)
    # The float32 division may be one off either way: step down where it decodes above the LSE, then up while the
    # next code would not; code 0 decodes to the tile's minimum, never above a row of the tile.
    code = torch.where(_decoded(rows, code, rows_step) > lse, code - 1, code).clamp_min(0)
    code = torch.where((code < LSE_MAX_CODE) & (_decoded(rows, code + 1, rows_step) <= lse), code + 1, code)
    code = torch.where(_decoded(rows, code, rows_step) > lse, 0.0, code)  # (only where the step is below an ulp)
    code = torch.where(finite, code, float(LSE_NONE)).to(torch.uint8)
    tile_shift = tile_shift.to(torch.uint8)
    if codes is not None:
        codes.copy_(code)
        code = codes
    if base is not None:
        base.copy_(tile_min)
        tile_min = base
    if shift is not None:
        shift.copy_(tile_shift)
        tile_shift = shift
    return code, tile_min, tile_shift


def decode_lse(codes: torch.Tensor, base: torch.Tensor, shift: torch.Tensor, tile_q: int) -> torch.Tensor:
    """uint8 ``codes (..., Sq)``, float32 ``base (..., Mq)`` and uint8 ``shift (..., Mq)`` (:func:`encode_lse`) ->
    float32 ``(..., Sq)``: NaN where the code is 255, else ``base + code * LSE_STEP * 2**shift``; never above the LSE
    that was encoded, and less than its tile's step below it."""
    seq_q = codes.shape[-1]
    value = _decoded(_tile_rows(base, tile_q, seq_q), codes, _tile_rows(lse_step(shift), tile_q, seq_q))
    return value.masked_fill(codes == LSE_NONE, math.nan).contiguous()


def _check_room(device: torch.device, state_bytes: int, call_bytes: int) -> None:
    """ValueError before allocating, when a state and the transient buffers of its calls would not fit in the free
    memory of a CUDA device (a clear message instead of an out-of-memory error in the middle of a run)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return
    free, _ = torch.cuda.mem_get_info(device)
    reserved_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's cache
    if state_bytes + call_bytes > free + reserved_free:
        raise ValueError(f"a skip state needs {state_bytes / 2**20:.1f} MiB and its calls {call_bytes / 2**20:.1f} MiB "
                         f"more while they run, but {device} has {(free + reserved_free) / 2**20:.1f} MiB free; use "
                         f"larger tiles, fewer layers (enable(layers=...)), or a smaller batch or video")


class SkipState:
    """One attention layer's skip decisions between calls (module docstring): pass it as
    ``lite_attention(q, k, v, state=state, ...)``, which reads the tiles it marks and narrows them down.

    ``state.read`` is the list the next call computes, as a :class:`SkipList` (a snapshot: ``to_dense``,
    ``sparsity``, ``to_string``, ``[b, h]``); :meth:`set_read` replaces it.
    """

    def __init__(self, batch: int, heads: int, seq_q: int, seq_k: int, tile_q: int = 128, tile_k: int = 128,
                 must_skip=None, device=None, *, with_lse: bool = False):
        for name, value in (("batch", batch), ("heads", heads), ("seq_q", seq_q), ("seq_k", seq_k)):
            if _as_int(value, name) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name, value in (("tile_q", tile_q), ("tile_k", tile_k)):
            check_tile(name, _as_int(value, name))
        self.batch, self.heads, self.seq_q, self.seq_k = batch, heads, seq_q, seq_k
        self.tile_q, self.tile_k = tile_q, tile_k
        self.must_skip = normalize_ranges(must_skip, seq_k, "must_skip")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        mq, nk = num_tiles(seq_q, tile_q), num_tiles(seq_k, tile_k)
        rows = batch * heads * seq_q
        # A call: the compact list and the flags (int32 per tile pair); with the LSE, its decoded float32 copy and
        # the encoder's temporaries (a few float32 per row, a few per q-tile).
        tiles = batch * heads * mq
        _check_room(self.device, tiles * (num_words(nk) + 1) * 4 + (rows + tiles * (4 + 1) if with_lse else 0),
                    2 * tiles * nk * 4 + (6 * rows * 4 + 8 * tiles * 4 if with_lse else 0))
        self.bits = torch.empty(batch, heads, mq, num_words(nk), dtype=torch.int32, device=self.device)
        self.counts = torch.empty(batch, heads, mq, dtype=torch.int32, device=self.device)
        self.device = self.bits.device  # with its index: "cuda" becomes "cuda:0", as the inputs' device reads
        self.lse_codes = self.lse_base = self.lse_shift = None  # the previous call's LSE, compressed (module doc)
        if with_lse:
            self.lse_codes = torch.empty(batch, heads, seq_q, dtype=torch.uint8, device=self.device)
            self.lse_base = torch.empty(batch, heads, mq, dtype=torch.float32, device=self.device)
            self.lse_shift = torch.empty(batch, heads, mq, dtype=torch.uint8, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Back to the fresh state: every tile not covered by a must-skip range."""
        fresh = self._fresh_dense()
        self.untouched = True  # no call has narrowed it down since the reset (LiteAttention keeps this up to date)
        self.bits.copy_(bits_from_dense(fresh))
        self.counts.copy_(fresh.sum(-1, dtype=torch.int32))
        if self.lse_codes is not None:  # no previous call
            self.lse_codes.fill_(LSE_NONE)
            self.lse_base.fill_(math.nan)
            self.lse_shift.fill_(0)

    def read_everything(self) -> None:
        """Re-admission: the next call reads every tile again (must-skip ones aside) and rebuilds the list by its
        own decisions; unlike :meth:`reset`, the mass rule's previous LSE is kept."""
        self.set_read(self._fresh_dense())

    def _fresh_dense(self) -> torch.Tensor:
        b, h, mq, nk = self.shape
        return (~tiles_covered(self.must_skip, self.seq_k, self.tile_k, self.device)).expand(b, h, mq, nk)

    def set_read(self, tiles) -> None:
        """Make ``tiles`` (a :class:`SkipList` or a bool ``(B, H, Mq, Nk)`` mask, True = computed) the list the next
        call reads."""
        dense = tiles.to_dense() if isinstance(tiles, SkipList) else tiles
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool or tuple(dense.shape) != tuple(self.shape):
            raise ValueError(f"set_read takes a SkipList or a bool mask of shape {tuple(self.shape)}")
        dense = dense.to(self.device)
        self.untouched = False
        self.bits.copy_(bits_from_dense(dense))
        self.counts.copy_(dense.sum(-1, dtype=torch.int32))

    def matches(self, batch: int, heads: int, seq_q: int, seq_k: int, device, must_skip) -> bool:
        """Whether this state serves inputs of these sizes, on this device, with these (normalized) must-skip
        ranges. (The decisions depend on neither the dtype nor the head dims.)"""
        return ((self.batch, self.heads, self.seq_q, self.seq_k, self.device, self.must_skip)
                == (batch, heads, seq_q, seq_k, device, must_skip))

    @property
    def shape(self) -> torch.Size:
        """(B, H, Mq, Nk)."""
        b, h, mq, _ = self.bits.shape
        return torch.Size((b, h, mq, num_tiles(self.seq_k, self.tile_k)))

    @property
    def lse(self) -> Optional[torch.Tensor]:
        """The previous call's log-sum-exp as the next call's keep rule reads it: float32 ``(B, H, Sq)``, natural log,
        NaN where there is none (a snapshot decoded from the codes: never above the exact one, less than its q-tile's
        step below it, module docstring); None for a state built without ``with_lse``."""
        if self.lse_codes is None:
            return None
        return decode_lse(self.lse_codes, self.lse_base, self.lse_shift, self.tile_q)

    def set_lse(self, lse: torch.Tensor) -> None:
        """Make ``lse`` (float32 ``(B, H, Sq)``, natural log; NaN: none) the previous LSE the next call reads,
        rounded down as a call's own (:func:`encode_lse`)."""
        if self.lse_codes is None:
            raise ValueError("this state keeps no LSE; build it with with_lse=True")
        expected = tuple(self.lse_codes.shape)
        if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != expected:
            raise ValueError(f"set_lse takes a float32 tensor of shape {expected}")
        encode_lse(lse.to(self.device), self.tile_q, self.lse_codes, self.lse_base, self.lse_shift)

    @property
    def nbytes(self) -> int:
        """Device memory held by this state, in bytes."""
        tensors = [self.bits, self.counts]
        if self.lse_codes is not None:
            tensors += [self.lse_codes, self.lse_base, self.lse_shift]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_dense(self) -> torch.Tensor:
        """bool ``(B, H, Mq, Nk)``: True where the next call computes the tile."""
        return dense_from_bits(self.bits, self.shape[-1])

    @property
    def read(self) -> SkipList:
        """The list the next call computes, as a compact :class:`SkipList` (a snapshot, decoded from the bits)."""
        return SkipList.from_dense(self.to_dense(), self.tile_q, self.tile_k, self.seq_q, self.seq_k)

    def sparsity(self) -> float:
        """The fraction of tile pairs the next call skips (synchronises with the device)."""
        return fraction_skipped(self.to_dense().sum(), math.prod(self.shape))

    def __repr__(self) -> str:
        b, h, mq, nk = self.shape
        return (
            f"SkipState(batch={b}, heads={h}, seq_q={self.seq_q}, seq_k={self.seq_k}, "
            f"tile=({self.tile_q}, {self.tile_k}), tiles=({mq}, {nk}), must_skip={list(self.must_skip)}, "
            f"read_sparsity={self.sparsity():.4f}, device={self.device})"
        )
