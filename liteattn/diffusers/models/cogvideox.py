"""CogVideoX (``CogVideoXTransformer3DModel``): joint attention in ``transformer_blocks.*.attn1`` with the text
tokens before the video tokens, no mask."""

from __future__ import annotations

from typing import Optional

import torch

from ..processor import LiteProcessor, qkv
from ..registry import register


def _is_joint_attention(name, module) -> bool:
    return name.endswith(".attn1") and name.split(".")[0] == "transformer_blocks"


# "must_do" first (the default): one kernel call, 1.2x faster than "split" at equal sparsity on an H200
# (bench/joint_text.py, CogVideoX-5B shape), and it compiles on CUDA.
@register("CogVideoXTransformer3DModel",
          originals=("diffusers.models.attention_processor:CogVideoXAttnProcessor2_0",
                     "diffusers.models.attention_processor:FusedCogVideoXAttnProcessor2_0"),
          is_video_self_attention=_is_joint_attention,
          joint_text=("must_do", "split"),
          layout="[text, video], no mask")
class LiteCogVideoXAttnProcessor(LiteProcessor):
    """``CogVideoXAttnProcessor2_0`` (and its fused variant): joint attention with the text tokens before the
    video tokens. Text rows and text columns are computed densely."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_parallel()
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = qkv(attn, hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, H, S, D) as in the original, so that norms and rotary embeddings see the same layout.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D)
        hidden_states = self.joint(query, key, value, text_len, text_first=True)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_len, hidden_states.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states
