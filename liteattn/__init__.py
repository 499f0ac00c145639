"""liteattn: temporal tile-skipping attention for video diffusion transformers (LiteAttention).

    import liteattn
    attn = liteattn.LiteAttention(threshold=-8.0)   # one per attention layer
    out = attn(q, k, v)                              # (B, S, H, D) in, (B, S, H, Dv) out
    attn.sparsity                                    # fraction of tiles skipped by that call

The semantics (which tiles are skipped and when) are specified in docs/DESIGN.md, section 1.
"""

from .joint import attention_with_lse, merge_by_lse
from .module import LiteAttention, SeqParallelLiteAttention
from .ops import lite_attention
from .skip import SkipList
from .state import SkipState

__version__ = "0.1.0"


def enable(pipe_or_transformer, threshold=None, **options):
    """LiteAttention on a diffusers video pipeline or transformer, in one line; see :func:`liteattn.diffusers.enable`.

    ``handle = liteattn.enable(pipe, threshold=-8)`` (default -10, mass rule), or calibrated to an error budget:
    ``liteattn.enable(pipe, target_error=0.02)``, one run, ``handle.save_profile("p.json")``, then
    ``liteattn.enable(pipe, profile="p.json")``. diffusers is imported only when this is called
    (``pip install liteattn[diffusers]``).
    """
    from .diffusers import enable as _enable  # lazy: `import liteattn` never imports diffusers

    return _enable(pipe_or_transformer, threshold, **options)


__all__ = ["LiteAttention", "SeqParallelLiteAttention", "lite_attention", "SkipList", "SkipState", "merge_by_lse",
           "attention_with_lse", "enable", "__version__"]
