"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video self-attention in ``blocks.*.attn1``; text enters by
cross-attention (``attn2``), which keeps its processor."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..processor import LiteProcessor, qkv
from ..registry import register


def _is_self_attention(name, module) -> bool:
    return name.endswith(".attn1") and not module.is_cross_attention


@register("WanTransformer3DModel",
          originals=("diffusers.models.transformers.transformer_wan:WanAttnProcessor",),
          is_video_self_attention=_is_self_attention,
          layout="video tokens only (text by cross-attention)")
class LiteWanAttnProcessor(LiteProcessor):
    """``WanAttnProcessor`` for the self-attention (``attn1``) of Wan 2.1/2.2 blocks, video attention via liteattn."""

    context_parallel = ("ulysses", "ring")  # diffusers' _cp_plan splits the video tokens; text is cross-attention

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        hidden_states = self.attend(query, key, value)  # this rank's slice under context parallelism
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _wan_rotary(hidden_states, freqs_cos, freqs_sin):
    # Verbatim from WanAttnProcessor (a closure there).
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)
