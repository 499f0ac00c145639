"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint attention in the dual- and single-stream blocks, with
the text tokens after the video tokens and a mask over padded text tokens."""

from __future__ import annotations

from typing import Optional

import torch

from ..processor import LiteProcessor, project_heads
from ..registry import register


def _is_joint_attention(name, module) -> bool:
    return name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")


# The transformer always builds a mask over its padded prompt, so only "split" applies (its text x text and
# video x text parts take the mask; "must_do" cannot).
@register("HunyuanVideoTransformer3DModel",
          originals=("diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",),
          is_video_self_attention=_is_joint_attention,
          joint_text=("split",),
          layout="[video, text], text masked where the prompt is padded")
class LiteHunyuanVideoAttnProcessor(LiteProcessor):
    """``HunyuanVideoAttnProcessor2_0`` for the dual- and single-stream blocks: joint attention with the text
    tokens after the video tokens. Text rows and text columns are computed densely (with the padding mask)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None):
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.check_parallel()
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.shape[1]
        if attn.add_q_proj is None:  # single-stream block: one projection for [video, text]
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = project_heads(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v,
                                          attn.norm_q, attn.norm_k)  # (B, S, H, D)

        if image_rotary_emb is not None:  # on the video tokens only
            if attn.add_q_proj is None:
                query = torch.cat([apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                   query[:, -text_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                 key[:, -text_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None:  # dual-stream block: separate projections for the text tokens
            encoder_query, encoder_key, encoder_value = project_heads(
                encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # HunyuanVideo's mask (B, 1, 1, N) hides padded text tokens only (it is built as index >= video + text
        # length), so the video x video block is unmasked and the mask applies to the dense text parts.
        hidden_states = self.joint(query, key, value, text_len, text_first=False, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
