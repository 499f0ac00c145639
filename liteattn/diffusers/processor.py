"""The base of liteattn's attention processors, and the projection helpers the model families share.

A processor reproduces its model's original attention computation, but routes the video-to-video attention through
a :class:`liteattn.LiteAttention`. It holds no step logic: the handle sets ``attention`` (the LiteAttention of the
current layer and guidance branch) before every transformer call, so ``torch.compile`` sees a plain function of its
inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..joint import joint_attention
from ..module import LiteAttention

__all__ = ["LiteProcessor", "qkv", "project_heads"]


class LiteProcessor:
    """Base of the liteattn processors.

    ``original``: the processor it replaced (put back by ``handle.disable()``, and called for the calls this one
    does not handle, e.g. cross-attention through a shared processor class). ``attention``: the LiteAttention of
    the current guidance branch, set by the handle. ``joint_text``: how joint text+video attention keeps text dense
    (:func:`liteattn.joint.joint_attention`), for families that have text tokens in the sequence.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original, joint_text: Optional[str] = None):
        self.original = original
        self.joint_text = joint_text
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.attention: Optional[LiteAttention] = None  # set by the handle before each call

    def check_parallel(self) -> None:
        if self._parallel_config is not None:
            raise NotImplementedError(
                "liteattn does not support diffusers context parallelism yet: the skip state of a sharded sequence "
                "would be per shard. Call handle.disable() before enabling parallelism."
            )

    def joint(self, query, key, value, text_len: int, text_first: bool, attn_mask=None) -> torch.Tensor:
        """Joint attention of ``(B, N, H, D)`` tensors with this processor's strategy; a mask forces ``"split"``."""
        strategy = "split" if attn_mask is not None else self.joint_text
        return joint_attention(self.attention, query, key, value, text_len=text_len, text_first=text_first,
                               strategy=strategy, attn_mask=attn_mask, dense=self.dense)

    def dense(self, query, key, value, attn_mask) -> torch.Tensor:
        """Dense attention of ``(B, S, H, D)`` tensors through the model's own attention backend."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend)


def qkv(attn, x):
    """q, k, v projections of ``x`` (B, S, H*D), through the fused ``to_qkv`` after ``fuse_qkv_projections()``."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def project_heads(x, heads, to_q, to_k, to_v, norm_q, norm_k):
    """q, k, v of ``x`` as (B, S, H, D), with the optional per-head q/k norms (HunyuanVideo's layout)."""
    query, key, value = (proj(x).unflatten(2, (heads, -1)) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value
