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


def exact_and_rounded_mass_calls(q, k, v, exact, write, tile, threshold, backend):
    """The mass rule's call twice on the same inputs: stateless, measured against the exact previous LSE ``exact``
    (written into ``write``), and through a ``SkipState`` that holds ``exact`` rounded down (its compact format).
    Returns ``(out, kept, kept_exact, rounded)``: the state call's output, the state's kept tiles after it, the
    stateless call's kept tiles, and the rounded LSE the state call measured against."""
    from liteattn import SkipState, lite_attention

    lite_attention(q, k, v, write=write, threshold=threshold, criterion="mass", lse_state=exact.clone(),
                   backend=backend)
    B, H, S = exact.shape
    state = SkipState(B, H, S, S, tile, tile, device=exact.device, with_lse=True)
    state.set_lse(exact)
    rounded = state.lse
    out = lite_attention(q, k, v, state=state, threshold=threshold, criterion="mass", backend=backend)
    return out, state.to_dense(), write.to_dense(), rounded


def check_rounded_lse_keeps_the_exact_tiles(q, k, v, exact, write, tile, threshold, backend, rows_step):
    """:func:`exact_and_rounded_mass_calls` on inputs whose rows' LSEs spread widely in a q-tile, checked: no row
    clamped (each rounded less than its tile's step ``rows_step`` below the exact LSE), a superset of the exact
    LSE's tiles with at most 3 more, not all tiles, and the state call against the oracle."""
    from oracle import check_call

    out, kept, kept_exact, rounded = exact_and_rounded_mass_calls(q, k, v, exact, write, tile, threshold, backend)
    assert (rounded <= exact).all() and (exact - rounded < rows_step).all()  # no row clamped
    assert not (kept_exact & ~kept).any(), f"threshold {threshold}: the rounded LSE dropped a tile"
    assert int(kept.sum()) <= int(kept_exact.sum()) + 3 < kept.numel(), (threshold, int(kept.sum()),
                                                                           int(kept_exact.sum()))
    check_call(q, k, v, None, out, None, kept, threshold=threshold, tile_q=tile, tile_k=tile, criterion="mass",
               lse_prev=rounded)
