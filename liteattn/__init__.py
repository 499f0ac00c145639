"""liteattn: temporal tile-skipping attention for video diffusion transformers (LiteAttention).

    import liteattn
    attn = liteattn.LiteAttention(threshold=-8.0)   # one per attention layer
    out = attn(q, k, v)                              # (B, S, H, D) in, (B, S, H, Dv) out
    attn.sparsity                                    # fraction of tiles skipped by that call

The semantics (which tiles are skipped and when) are specified in DESIGN.md section 1.
"""

from .module import LiteAttention, SeqParallelLiteAttention
from .ops import lite_attention
from .skip import SkipList, SkipState

__version__ = "0.1.0"

__all__ = ["LiteAttention", "SeqParallelLiteAttention", "lite_attention", "SkipList", "SkipState", "__version__"]
