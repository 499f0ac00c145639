"""``LiteAttention``: one attention layer's skip state, threshold and statistics.

API-compatible with the reference implementation (moonmath-ai/LiteAttention) so its users can
switch: construct one per attention layer, call it at every denoising step with
``(B, S, H, D)`` tensors, and it skips the tiles that the previous calls found negligible.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .ops import _check_inputs, _lite_attention_checked, check_threshold
from .skip import SkipState, check_tile, normalize_ranges

logger = logging.getLogger("liteattn")

__all__ = ["LiteAttention", "SeqParallelLiteAttention"]


class LiteAttention:
    """Attention with temporal tile skipping for one layer.

    Args:
        enable_skipping: when False, every call is plain dense attention and the state is untouched.
        threshold: log2 units, ``<= 0`` (typical -3 ... -12), or ``-inf`` to keep every tile.
        max_batch_size: largest batch accepted (as in the reference implementation).
        tile_q, tile_k: skip-tile sizes in tokens (multiples of 16 on the PyTorch path; 64 or 128 for Triton).
        backend: ``"triton"``, ``"torch"`` or ``None`` (automatic).

    Calling it: ``attn(q, k, v)`` with ``q (B, S, H, D)``, ``k (B, Sk, H, D)``, ``v (B, Sk, H, Dv)`` returns
    ``(B, S, H, Dv)`` in the input dtype, or ``(out, lse)`` with ``lse (B, H, S)`` float32 when
    ``return_softmax_lse=True``.
    """

    def __init__(self, enable_skipping: bool = True, threshold: float = -10.0, max_batch_size: int = 4, *,
                 tile_q: int = 128, tile_k: int = 128, backend: Optional[str] = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        check_tile("tile_q", tile_q)
        check_tile("tile_k", tile_k)
        if backend not in (None, "torch", "triton"):
            raise ValueError(f"backend must be 'triton', 'torch' or None (automatic), got {backend!r}")
        self.enable_skipping = bool(enable_skipping)
        self._threshold = check_threshold(threshold)
        self.max_batch_size = max_batch_size
        self.tile_q, self.tile_k = tile_q, tile_k
        self.backend = backend
        self._state: Optional[SkipState] = None
        self._state_key = None
        self._last_read_counts: Optional[torch.Tensor] = None  # kv_counts the latest call computed

    # -- configuration -------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)

    def set_threshold(self, threshold: float) -> None:
        """Set the skip threshold (log2 units, <= 0, or -inf)."""
        self.threshold = threshold

    def enable_skip_optimization(self, enable: bool = True) -> None:
        """Turn skipping on or off; off means plain dense attention. The skip state is kept either way."""
        self.enable_skipping = bool(enable)

    def reset_skip_state(self) -> None:
        """Forget every decision: the next call computes every tile (except must-skip ones)."""
        if self._state is not None:
            self._state.reset()
        self._last_read_counts = None

    # -- inspection ----------------------------------------------------------------------------
    @property
    def skip_state(self) -> Optional[SkipState]:
        """The :class:`SkipState` (None before the first call with skipping on)."""
        return self._state

    @property
    def sparsity(self) -> float:
        """Fraction of (b, h, q-tile, k-tile) pairs not computed in the most recent call.

        0.0 before any call and after a dense call. Reading it synchronises with the device.
        """
        if self._last_read_counts is None:
            return 0.0
        b, h, mq, nk = self._state.shape
        return 1.0 - self._last_read_counts.sum().item() / (b * h * mq * nk)

    def __repr__(self) -> str:
        return (f"LiteAttention(enable_skipping={self.enable_skipping}, threshold={self.threshold}, "
                f"max_batch_size={self.max_batch_size}, tile_q={self.tile_q}, tile_k={self.tile_k}, "
                f"backend={self.backend!r}, state={'none' if self._state is None else tuple(self._state.shape)})")

    # -- the call ------------------------------------------------------------------------------
    def _ensure_state(self, query, key, value, must_skip) -> SkipState:
        B, Sq, H, D = query.shape
        state_key = dict(batch=B, seq_q=Sq, seq_k=key.shape[1], heads=H, head_dim=D, value_dim=value.shape[-1],
                         dtype=query.dtype, device=query.device, must_skip=must_skip)
        if self._state is not None and state_key == self._state_key:
            return self._state
        if self._state is not None:
            changed = ", ".join(f"{k} {self._state_key[k]} -> {v}" for k, v in state_key.items()
                                if self._state_key[k] != v)
            logger.info("liteattn: re-initialising the skip state (%s)", changed)
        self._state = SkipState(B, H, Sq, key.shape[1], self.tile_q, self.tile_k, must_skip, query.device)
        self._state_key = state_key
        self._last_read_counts = None
        return self._state

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float] = None,
                 return_softmax_lse: bool = False, must_do_list=None, must_skip_list=None, must_do_q_list=None):
        """``must_do_list`` / ``must_skip_list``: key-token ranges; ``must_do_q_list``: query-token ranges whose
        q-tiles never drop a tile (text rows of joint attention). All are half-open ``[(start, end), ...]``."""
        _check_inputs(query, key, value)
        if query.shape[0] > self.max_batch_size:
            raise ValueError(f"batch size {query.shape[0]} exceeds max_batch_size={self.max_batch_size}; "
                             f"construct LiteAttention(max_batch_size={query.shape[0]}) or larger")
        if not self.enable_skipping:
            self._last_read_counts = None
            return _lite_attention_checked(query, key, value, None, None, self._threshold, scale, None, None,
                                           return_softmax_lse, self.backend, self.tile_q, self.tile_k)
        must_skip = normalize_ranges(must_skip_list, key.shape[1], "must_skip_list")
        state = self._ensure_state(query, key, value, must_skip)
        read, write = state.read, state.write
        result = _lite_attention_checked(query, key, value, read, write, self._threshold, scale, must_do_list,
                                         must_do_q_list, return_softmax_lse, self.backend, None, None)
        self._last_read_counts = read.kv_counts
        state.swap()
        return result


class SeqParallelLiteAttention:
    """One independent :class:`LiteAttention` per K/V split (sequence parallelism).

    ``attn(q, k, v, split_idx)`` computes attention of ``q`` over the ``split_idx``-th K/V shard with
    that shard's own skip state; merge the shards' outputs with their LSEs.
    """

    def __init__(self, num_nodes: int, enable_skipping: bool = True, threshold: float = -10.0,
                 max_batch_size: int = 4, **kwargs):
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        self.num_nodes = num_nodes
        self.attns = [LiteAttention(enable_skipping, threshold, max_batch_size, **kwargs) for _ in range(num_nodes)]

    def __call__(self, query, key, value, split_idx: int, scale: Optional[float] = None,
                 return_softmax_lse: bool = False, must_do_list=None, must_skip_list=None):
        if isinstance(split_idx, bool) or not isinstance(split_idx, int) or not 0 <= split_idx < self.num_nodes:
            raise ValueError(f"split_idx must be an int in [0, {self.num_nodes}), got {split_idx!r}")
        return self.attns[split_idx](query, key, value, scale=scale, return_softmax_lse=return_softmax_lse,
                                     must_do_list=must_do_list, must_skip_list=must_skip_list)

    def __getitem__(self, split_idx: int) -> LiteAttention:
        return self.attns[split_idx]

    def set_threshold(self, threshold: float) -> None:
        for attn in self.attns:
            attn.set_threshold(threshold)

    def reset_skip_state(self) -> None:
        for attn in self.attns:
            attn.reset_skip_state()

    def enable_skip_optimization(self, enable: bool = True) -> None:
        for attn in self.attns:
            attn.enable_skip_optimization(enable)

    @property
    def threshold(self) -> float:
        return self.attns[0].threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.set_threshold(value)

    @property
    def sparsity(self) -> float:
        """Mean sparsity of the splits' most recent calls."""
        return sum(a.sparsity for a in self.attns) / self.num_nodes
