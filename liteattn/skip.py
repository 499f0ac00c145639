"""Skip lists: which k-tiles each (batch, head, q-tile) computes.

A :class:`SkipList` is one compact list in FlexAttention's BlockMask format::

    kv_indices  int32 (B, H, Mq, Nk)   ascending k-tile indices; entries at positions >= count are unspecified
    kv_counts   int32 (B, H, Mq)       how many entries of kv_indices are valid

Lists live on the device of the attention inputs; nothing here synchronises with the host
except the inspection helpers (``to_dense``, ``sparsity``, ``__repr__``, ``check``). A layer's
persistent state between calls is a bitmask instead (:class:`liteattn.state.SkipState`).

Token ranges (must-do / must-skip) are half-open ``[(start, end), ...]``; the flat form
``[a0, b0, a1, b1, ...]`` of the reference implementation is accepted too.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Iterable, Tuple

import torch

Ranges = Tuple[Tuple[int, int], ...]

__all__ = [
    "SkipList",
    "normalize_ranges",
    "tiles_overlapping",
    "tiles_covered",
    "num_tiles",
    "check_tile",
    "fraction_skipped",
]


def num_tiles(length: int, tile: int) -> int:
    """Number of tiles of ``tile`` tokens that cover ``length`` tokens (the last may be partial)."""
    return -(-length // tile)


def check_tile(name: str, value) -> int:
    """``value`` as a tile size (a positive multiple of 16 tokens, a plain int), or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 16:
        raise ValueError(f"{name} must be a positive multiple of 16, got {value!r}")
    return value


def _as_int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
            return int(x.item())
        raise TypeError(f"{what} must hold integers, got {x!r} of type {type(x).__name__}")
    return int(x)


def normalize_ranges(ranges, length: int, name: str = "ranges") -> Ranges:
    """Turn user token ranges into a sorted tuple of half-open ``(start, end)`` pairs.

    Accepts ``None`` / ``[]`` (no ranges), pairs ``[(start, end), ...]`` with ``start <= end``,
    or the flat form ``[a0, b0, a1, b1, ...]`` where each pair means the range between its two
    numbers. Every bound must lie in ``[0, length]``. Empty ranges are dropped.
    """
    if ranges is None:
        return ()
    if isinstance(ranges, torch.Tensor):
        ranges = ranges.tolist()
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Iterable):
        raise TypeError(
            f"{name} must be a list of (start, end) pairs or a flat list [a0, b0, a1, b1, ...], "
            f"got {type(ranges).__name__}"
        )
    items = list(ranges)
    if not items:
        return ()
    pairs = []
    if all(isinstance(x, (tuple, list)) for x in items):
        for item in items:
            if len(item) != 2:
                raise ValueError(f"{name}: each range must be (start, end), got {tuple(item)!r}")
            start, end = _as_int(item[0], name), _as_int(item[1], name)
            if start > end:
                raise ValueError(f"{name}: range ({start}, {end}) has start > end; ranges are half-open [start, end)")
            pairs.append((start, end))
    elif any(isinstance(x, (tuple, list)) for x in items):
        raise TypeError(f"{name} mixes (start, end) pairs and plain numbers: {items!r}")
    else:
        if len(items) % 2:
            raise ValueError(
                f"{name}: the flat form [a0, b0, a1, b1, ...] needs an even number of entries, got {len(items)}"
            )
        flat = [_as_int(x, name) for x in items]
        pairs = [(min(a, b), max(a, b)) for a, b in zip(flat[0::2], flat[1::2])]
    for start, end in pairs:
        if start < 0 or end > length:
            raise ValueError(f"{name}: range [{start}, {end}) lies outside the sequence of length {length} (0..{length})")
    return tuple(sorted(p for p in pairs if p[0] < p[1]))


def _merged(ranges: Ranges) -> Ranges:
    """Sorted ranges with overlapping or touching ones merged (their union, as disjoint ranges)."""
    merged = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def _build_tile_mask(ranges: Ranges, length: int, tile: int, device, covered: bool) -> torch.Tensor:
    # From an iota and the ranges' constant bounds, on ``device``: under torch.compile the graph holds no host
    # tensor to copy.
    first = torch.arange(num_tiles(length, tile), device=device) * tile  # first token of each tile
    last = torch.clamp(first + tile, max=length)  # one past its last token
    mask = torch.zeros_like(first, dtype=torch.bool)
    for start, end in (_merged(ranges) if covered else ranges):
        mask |= (first >= start) & (last <= end) if covered else (first < end) & (last > start)
    return mask


_cached_tile_mask = functools.lru_cache(maxsize=256)(_build_tile_mask)


def _tile_mask(ranges: Ranges, length: int, tile: int, device, covered: bool) -> torch.Tensor:
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return _build_tile_mask(ranges, length, tile, device, covered)
    return _cached_tile_mask(ranges, length, tile, device, covered)  # eager calls reuse one tensor: never write it


def tiles_overlapping(ranges: Ranges, length: int, tile: int, device=None) -> torch.Tensor:
    """bool ``(n_tiles,)`` on ``device``: tiles that share at least one token with the (normalized) ranges.

    The must-do rule: a k-tile that overlaps a must-do key range is never dropped, and a q-tile that overlaps a
    must-do query range drops nothing.
    """
    return _tile_mask(tuple(ranges), length, tile, device, covered=False)


def tiles_covered(ranges: Ranges, length: int, tile: int, device=None) -> torch.Tensor:
    """bool ``(n_tiles,)`` on ``device``: tiles whose every token lies in the union of the (normalized) ranges.

    The must-skip rule: such a k-tile is never computed.
    """
    return _tile_mask(tuple(ranges), length, tile, device, covered=True)


def fraction_skipped(computed, total: int) -> float:
    """Sparsity, the one way liteattn computes it: the fraction of ``total`` tile pairs not among ``computed``.

    ``computed`` is a count (int or a one-element tensor; reading a device tensor synchronises).
    """
    computed = computed.item() if isinstance(computed, torch.Tensor) else computed
    return 1.0 - computed / total if total else 0.0


def compact_from_dense(dense: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor) -> None:
    """Write a bool ``(..., Nk)`` mask into compact ascending lists, in place (no host sync)."""
    nk = dense.shape[-1]
    order = torch.arange(nk, device=dense.device, dtype=torch.int32)
    # Kept tiles sort first, in ascending order; dropped ones are pushed past Nk.
    key = torch.where(dense, order, order + nk)
    kv_indices.copy_(torch.sort(key, dim=-1).values.remainder_(nk))
    kv_counts.copy_(dense.sum(dim=-1, dtype=torch.int32))


def dense_from_compact(kv_indices: torch.Tensor, kv_counts: torch.Tensor) -> torch.Tensor:
    """bool ``(..., Nk)``: True where a tile index appears among the first ``count`` entries."""
    nk = kv_indices.shape[-1]
    valid = torch.arange(nk, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    index = torch.where(valid, kv_indices.long().clamp(0, nk - 1), nk)
    dense = torch.zeros(*kv_indices.shape[:-1], nk + 1, dtype=torch.bool, device=kv_indices.device)
    dense.scatter_(-1, index, True)
    return dense[..., :nk]


def _keepdim_index(i, size: int, name: str):
    if isinstance(i, numbers.Integral) and not isinstance(i, bool):
        if not -size <= i < size:
            raise IndexError(f"{name} index {i} is out of range for size {size}")
        i = int(i) % size
        return slice(i, i + 1)
    return i


class SkipList:
    """One compact skip list (FlexAttention BlockMask format): which k-tiles each (b, h, q-tile) computes.

    Attributes:
        kv_indices: int32 ``(B, H, Mq, Nk)``, ascending k-tile indices; positions ``>= count`` unspecified.
        kv_counts: int32 ``(B, H, Mq)``.
        tile_q, tile_k: tile sizes in tokens.
        seq_q, seq_k: sequence lengths the list was built for.

    ``list[b]`` or ``list[b, h]`` gives a view restricted to those batches/heads.
    """

    def __init__(self, kv_indices: torch.Tensor, kv_counts: torch.Tensor, tile_q: int, tile_k: int,
                 seq_q: int, seq_k: int):
        if kv_indices.dtype != torch.int32 or kv_counts.dtype != torch.int32:
            raise TypeError(
                f"kv_indices and kv_counts must be int32, got {kv_indices.dtype} and {kv_counts.dtype}"
            )
        if kv_indices.dim() != 4 or kv_counts.shape != kv_indices.shape[:-1]:
            raise ValueError(
                f"expected kv_indices (B, H, Mq, Nk) and kv_counts (B, H, Mq), got "
                f"{tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}"
            )
        mq, nk = num_tiles(seq_q, tile_q), num_tiles(seq_k, tile_k)
        if kv_indices.shape[2:] != (mq, nk):
            raise ValueError(
                f"a skip list for seq_q={seq_q}, seq_k={seq_k} with tiles ({tile_q}, {tile_k}) needs "
                f"(Mq, Nk) = ({mq}, {nk}), got {tuple(kv_indices.shape[2:])}"
            )
        self.kv_indices = kv_indices
        self.kv_counts = kv_counts
        self.tile_q, self.tile_k = int(tile_q), int(tile_k)
        self.seq_q, self.seq_k = int(seq_q), int(seq_k)

    @classmethod
    def full(cls, batch: int, heads: int, seq_q: int, seq_k: int, tile_q: int = 128, tile_k: int = 128,
             device=None, must_skip=None) -> "SkipList":
        """Every k-tile, except those that the must-skip key ranges cover completely."""
        mq, nk = num_tiles(seq_q, tile_q), num_tiles(seq_k, tile_k)
        ranges = normalize_ranges(must_skip, seq_k, "must_skip")
        dense = (~tiles_covered(ranges, seq_k, tile_k, device)).expand(batch, heads, mq, nk)
        indices = torch.empty(batch, heads, mq, nk, dtype=torch.int32, device=device)
        counts = torch.empty(batch, heads, mq, dtype=torch.int32, device=device)
        compact_from_dense(dense, indices, counts)
        return cls(indices, counts, tile_q, tile_k, seq_q, seq_k)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, tile_q: int, tile_k: int, seq_q: int, seq_k: int) -> "SkipList":
        """Build from a bool ``(B, H, Mq, Nk)`` mask (True = computed)."""
        if dense.dtype != torch.bool or dense.dim() != 4:
            raise ValueError(f"expected a bool (B, H, Mq, Nk) mask, got {dense.dtype} {tuple(dense.shape)}")
        indices = torch.empty(dense.shape, dtype=torch.int32, device=dense.device)
        counts = torch.empty(dense.shape[:-1], dtype=torch.int32, device=dense.device)
        compact_from_dense(dense, indices, counts)
        return cls(indices, counts, tile_q, tile_k, seq_q, seq_k)

    @property
    def shape(self) -> torch.Size:
        """(B, H, Mq, Nk)."""
        return self.kv_indices.shape

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to_dense(self) -> torch.Tensor:
        """bool ``(B, H, Mq, Nk)``, True where the tile is computed."""
        return dense_from_compact(self.kv_indices, self.kv_counts)

    def sparsity(self) -> float:
        """Fraction of (b, h, q-tile, k-tile) pairs not computed (synchronises with the device)."""
        return fraction_skipped(self.kv_counts.sum(), self.kv_indices.numel())

    def to(self, device) -> "SkipList":
        return SkipList(self.kv_indices.to(device), self.kv_counts.to(device), self.tile_q, self.tile_k,
                        self.seq_q, self.seq_k)

    def clone(self) -> "SkipList":
        return SkipList(self.kv_indices.clone(), self.kv_counts.clone(), self.tile_q, self.tile_k,
                        self.seq_q, self.seq_k)

    def as_tuple(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(kv_indices, kv_counts)``: the two tensors, for code that takes them apart (kernels, FlexAttention)."""
        return self.kv_indices, self.kv_counts

    def to_block_mask(self):
        """A FlexAttention ``BlockMask`` that computes exactly this list's tiles (as full blocks, no mask_mod).

        ``flex_attention(q, k, v, block_mask=lst.to_block_mask())`` with ``(B, H, S, D)`` inputs then attends over
        the same tiles as liteattn with this read list (``liteattn bench`` times the two that way).
        """
        from torch.nn.attention.flex_attention import BlockMask

        return BlockMask.from_kv_blocks(
            kv_num_blocks=torch.zeros_like(self.kv_counts), kv_indices=self.kv_indices,
            full_kv_num_blocks=self.kv_counts, full_kv_indices=self.kv_indices,
            BLOCK_SIZE=(self.tile_q, self.tile_k), seq_lengths=(self.seq_q, self.seq_k))

    @classmethod
    def from_block_mask(cls, block_mask) -> "SkipList":
        """The tiles a FlexAttention ``BlockMask`` computes (its partial and full blocks), as a SkipList.

        Blocks become tiles (``BLOCK_SIZE`` = ``(tile_q, tile_k)``); a ``mask_mod`` that masks tokens *inside*
        partial blocks has no tile-level equivalent, so such a block counts as computed.
        """
        block = block_mask.BLOCK_SIZE
        tile_q, tile_k = (block, block) if isinstance(block, int) else block
        seq_q, seq_k = block_mask.seq_lengths
        dense = dense_from_compact(block_mask.kv_indices, block_mask.kv_num_blocks)
        if block_mask.full_kv_num_blocks is not None:
            dense |= dense_from_compact(block_mask.full_kv_indices, block_mask.full_kv_num_blocks)
        mq, nk = num_tiles(seq_q, tile_q), num_tiles(seq_k, tile_k)
        return cls.from_dense(dense[..., :mq, :nk].contiguous(), tile_q, tile_k, seq_q, seq_k)

    def __getitem__(self, index) -> "SkipList":
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 2:
            raise IndexError("a SkipList can be indexed by batch and head only")
        # Integers keep their dimension (so the result is still (B, H, Mq, Nk)); negative ones count from the end.
        index = tuple(_keepdim_index(i, n, name) for i, n, name in zip(index, self.shape, ("batch", "head")))
        return SkipList(self.kv_indices[index], self.kv_counts[index], self.tile_q, self.tile_k,
                        self.seq_q, self.seq_k)

    def check(self) -> None:
        """Raise ValueError unless counts are in range and the first ``count`` indices ascend strictly."""
        nk = self.shape[-1]
        counts = self.kv_counts
        if ((counts < 0) | (counts > nk)).any():
            raise ValueError(f"kv_counts must lie in [0, {nk}]")
        valid = torch.arange(nk, device=self.device) < counts.unsqueeze(-1)
        idx = self.kv_indices
        if (valid & ((idx < 0) | (idx >= nk))).any():
            raise ValueError(f"kv_indices must lie in [0, {nk}) for the first kv_counts entries")
        ascending = idx[..., 1:] > idx[..., :-1]
        if (valid[..., 1:] & ~ascending).any():
            raise ValueError("kv_indices must ascend strictly within the first kv_counts entries")

    def to_string(self, batch: int = 0, head: int = 0, max_tiles: int = 48) -> str:
        """A picture of one (batch, head): rows are q-tiles, '#' computed, '.' skipped."""
        grid = self.to_dense()[batch, head].cpu()
        lines = ["".join("#" if x else "." for x in row[:max_tiles].tolist()) for row in grid[:max_tiles]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        b, h, mq, nk = self.shape
        return (
            f"SkipList(batch={b}, heads={h}, seq_q={self.seq_q}, seq_k={self.seq_k}, "
            f"tile=({self.tile_q}, {self.tile_k}), tiles=({mq}, {nk}), sparsity={self.sparsity():.4f}, "
            f"device={self.device})"
        )
