"""``SkipState``: one layer's skip decisions between calls, as a bitmask.

The decisions of a call only ever remove tiles from what it read, and the next call needs them only as "which tiles
to read". So the persistent state is one bit per (batch, head, q-tile, k-tile)::

    bits    int32 (B, H, Mq, W)   W = ceil(Nk / 32); bit j % 32 of word j // 32 set = the next call computes tile j
    counts  int32 (B, H, Mq)      how many tiles the latest call computed (before any call: how many the next will)
    lse     float32 (B, H, Sq)    the latest call's log-sum-exp, for keep rules that read it (else None)

A call expands the bits into a compact list (FlexAttention's format, what the kernel walks), computes, flags the
tiles it keeps, and packs the flags back into the bits, in place. The compact list and the flags are transient: they
exist during the call only, and PyTorch's caching allocator hands the same block to the next layer's call. For
Wan2.1-14B at 720p (H=40, 591 x 591 tiles) a state holds 1.9 MB (the ping-pong compact lists it replaced: 112 MB),
and a call 112 MB more while it runs.
"""

from __future__ import annotations

import math

import torch

from .skip import SkipList, _as_int, check_tile, fraction_skipped, normalize_ranges, num_tiles, tiles_covered

__all__ = ["SkipState", "bits_from_dense", "dense_from_bits", "num_words"]

WORD_BITS = 32


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
        _check_room(self.device, batch * heads * mq * (num_words(nk) + 1) * 4 + (batch * heads * seq_q * 4 if with_lse
                                                                                 else 0),
                    2 * batch * heads * mq * nk * 4)
        self.bits = torch.empty(batch, heads, mq, num_words(nk), dtype=torch.int32, device=self.device)
        self.counts = torch.empty(batch, heads, mq, dtype=torch.int32, device=self.device)
        self.device = self.bits.device  # with its index: "cuda" becomes "cuda:0", as the inputs' device reads
        self.lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=self.device) if with_lse else None
        self.reset()

    def reset(self) -> None:
        """Back to the fresh state: every tile not covered by a must-skip range."""
        fresh = self._fresh_dense()
        self.untouched = True  # no call has narrowed it down since the reset (LiteAttention keeps this up to date)
        self.bits.copy_(bits_from_dense(fresh))
        self.counts.copy_(fresh.sum(-1, dtype=torch.int32))
        if self.lse is not None:
            self.lse.fill_(math.nan)  # no previous call

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
    def nbytes(self) -> int:
        """Device memory held by this state, in bytes."""
        tensors = [self.bits, self.counts] + ([self.lse] if self.lse is not None else [])
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
