"""Two compact skip lists that the tests ping-pong by hand, for the stateless ``read=`` / ``write=`` API of
``lite_attention`` (a layer's own state between calls is ``liteattn.SkipState``, a bitmask)."""

import math

import torch

from liteattn import SkipList


class ListPair:
    """``read`` (what the next call computes), ``write`` (what it fills), ``swap()``, and an ``lse`` buffer for the
    mass rule (NaN: no previous call) when ``with_lse``."""

    def __init__(self, batch, heads, seq_q, seq_k, tile_q=128, tile_k=128, must_skip=None, device=None, *,
                 with_lse=False):
        self.tile_q, self.tile_k = tile_q, tile_k
        self.read, self.write = (SkipList.full(batch, heads, seq_q, seq_k, tile_q, tile_k, device, must_skip)
                                 for _ in range(2))
        self.lse = torch.full((batch, heads, seq_q), math.nan, device=device) if with_lse else None

    def swap(self):
        self.read, self.write = self.write, self.read
