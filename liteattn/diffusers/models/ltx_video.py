"""LTX-Video (``LTXVideoTransformer3DModel``): video self-attention in ``transformer_blocks.*.attn1``; text enters
by cross-attention (``attn2``), which keeps its processor."""

from __future__ import annotations

from typing import Optional

import torch

from ..processor import LiteProcessor
from ..registry import register


def _is_self_attention(name, module) -> bool:
    return name.endswith(".attn1") and name.split(".")[0] == "transformer_blocks"


@register("LTXVideoTransformer3DModel",
          originals=("diffusers.models.transformers.transformer_ltx:LTXVideoAttnProcessor",),
          is_video_self_attention=_is_self_attention,
          layout="video tokens only (text by cross-attention)")
class LiteLTXVideoAttnProcessor(LiteProcessor):
    """``LTXVideoAttnProcessor`` for the self-attention (``attn1``) of LTX-Video blocks."""

    # diffusers' _cp_plan splits the video and the text tokens. Under Ulysses, diffusers 0.42's own cross-attention
    # (LTXVideoAttnProcessor, not liteattn's) fails on the text mask: it views it with every head, a rank has H/N.
    context_parallel = ("ring",)
    context_parallel_note = ("diffusers 0.42's LTXVideoAttnProcessor (the cross-attention, which liteattn leaves "
                             "alone) fails under Ulysses, with or without liteattn, when given the text mask that "
                             "LTX pipelines always pass: it views the mask with all H heads while a rank holds H/N. "
                             "Use ContextParallelConfig(ring_degree=N)")
    context_parallel_warning = (
        "under ring context parallelism diffusers 0.42 passes each rank's own slice of the LTX text mask to every "
        "K/V chunk of the cross-attention (LTXVideoAttnProcessor, not liteattn's): with a padded prompt its output "
        "differs from one GPU's, with or without liteattn")

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        hidden_states = self.attend(query, key, value)  # this rank's slice under context parallelism
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
