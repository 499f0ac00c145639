"""One line for diffusers video pipelines: ``liteattn.enable(pipe)``.

    import torch, liteattn
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    handle = liteattn.enable(pipe, threshold=-6)
    video = pipe("a cat surfing a wave", num_frames=81).frames[0]
    handle.stats()["sparsity"]        # fraction of tiles skipped, per denoising step
    handle.disable()                  # the original attention processors, exactly

``enable`` swaps the attention processor of every *video self-attention* of the supported transformers for one
that reproduces the original computation but routes the video-to-video attention through a
:class:`liteattn.LiteAttention` (one per layer and per guidance branch). Cross-attention keeps its processor. In
joint attention (HunyuanVideo: text after video; CogVideoX: text before video) text query rows and text key columns
are never skipped.

A forward pre-hook on each transformer reads ``timestep`` to follow the sampling loop: consecutive calls with one
timestep are the guidance branches of one step (diffusers' Wan and HunyuanVideo pipelines call the transformer for
the conditional and then the unconditional prediction), a new timestep is the next step, and a timestep that goes
back up (or the pipeline's ``scheduler.set_timesteps``) starts a new sampling run from a fresh skip state.

diffusers is an optional dependency (``pip install liteattn[diffusers]``); this module imports it only when
``enable`` is called.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .module import LiteAttention
from .ops import check_threshold, lite_attention
from .skip import check_tile

logger = logging.getLogger("liteattn")

__all__ = ["enable", "LiteAttentionHandle", "SUPPORTED_TRANSFORMERS"]

SUPPORTED_TRANSFORMERS = (
    "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "CogVideoXTransformer3DModel",
    "LTXVideoTransformer3DModel",
)
_MIN_DIFFUSERS = "0.42"
# Pipeline attributes that may hold a denoiser (Wan 2.2 has two: high-noise and low-noise experts).
_PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")
# How joint attention keeps its text tokens dense when there is no mask: "must_do" (one LiteAttention call with
# must-do ranges) or "split" (video x video through LiteAttention, the text parts dense, merged by LSE). A mask
# (HunyuanVideo's padded prompt) always takes "split". bench/joint_text.py: on an H200 "must_do" is 1.2-1.3x faster
# at equal sparsity (CogVideoX-5B, HunyuanVideo shapes); on the CPU "split" is 0.8-1.05x of "must_do". "split" stays
# the default while must-do ranges break torch.compile with inductor on CUDA (the core builds their tile masks on
# the host inside the graph: inductor cannot lower the CPU reduction + device_put).
_JOINT_TEXT = "split"
# Rows x keys x heads of one fp32 score block in the dense text part of joint attention (bounds its memory).
_MAX_TEXT_BLOCK_ELEMENTS = 1 << 26

Threshold = Union[float, Sequence[float], Callable[[int], float]]


def _require_diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(
            f"liteattn.enable needs diffusers >= {_MIN_DIFFUSERS}: pip install liteattn[diffusers]"
        ) from exc
    from packaging.version import Version

    if Version(Version(diffusers.__version__).base_version) < Version(_MIN_DIFFUSERS):
        raise ImportError(
            f"liteattn.enable needs diffusers >= {_MIN_DIFFUSERS}, found {diffusers.__version__}: "
            f"pip install -U liteattn[diffusers]"
        )
    return diffusers


def _qkv(attn, x):
    """q, k, v projections of ``x`` (B, S, H*D), through the fused ``to_qkv`` after ``fuse_qkv_projections()``."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def _project_heads(x, heads, to_q, to_k, to_v, norm_q, norm_k):
    """q, k, v of ``x`` as (B, S, H, D), with the optional per-head q/k norms (HunyuanVideo's layout)."""
    query, key, value = (proj(x).unflatten(2, (heads, -1)) for proj in (to_q, to_k, to_v))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


# ---------------------------------------------------------------------------------------------------------------
# Attention math shared by the processors
# ---------------------------------------------------------------------------------------------------------------

def _attention_with_lse(query, key, value, attn_mask=None):
    """Dense softmax attention and its log-sum-exp, for the small text blocks of joint attention.

    ``query (B, Sq, H, D)``, ``key``/``value (B, Sk, H, D)``; ``attn_mask`` broadcastable to ``(B, H, Sq, Sk)``,
    bool (True = attend) or additive float. Returns ``out (B, Sq, H, D)`` and ``lse (B, H, Sq)`` float32.

    Without a mask it is the core's dense ``lite_attention`` (the Triton kernel on a GPU). With a mask: on CUDA,
    PyTorch's memory-efficient attention kernel, which returns the LSE (8x faster than the fallback at
    HunyuanVideo sizes); elsewhere, float32 PyTorch in row chunks.
    """
    if attn_mask is None:
        return lite_attention(query, key, value, return_lse=True)
    if query.is_cuda and query.shape[-1] % 8 == 0:
        return _efficient_attention_with_lse(query, key, value, attn_mask)
    return _masked_attention_with_lse(query, key, value, attn_mask)


def _efficient_attention_with_lse(query, key, value, attn_mask):
    B, Sq, H, _ = query.shape
    Sk = key.shape[1]
    # The kernel wants the bias rows 16-byte aligned: pad the key dimension to a multiple of 8, then view it back.
    bias = torch.zeros(*attn_mask.shape[:-1], Sk + (-Sk % 8), dtype=query.dtype, device=query.device)[..., :Sk]
    any_key = None
    if attn_mask.dtype == torch.bool:
        bias.masked_fill_(~attn_mask, -math.inf)
        any_key = attn_mask.any(dim=-1)  # rows with every key masked: lse -inf and output 0, as the fallback
    else:
        bias.copy_(attn_mask)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bias.expand(B, H, Sq, Sk), True)[:2]
    out, lse = out.transpose(1, 2), lse[..., :Sq]  # the kernel pads its LSE rows to a multiple of 32
    if any_key is not None:
        any_key = any_key.expand(B, H, Sq)
        lse = lse.masked_fill(~any_key, -math.inf)
        out = out.masked_fill(~any_key.transpose(1, 2).unsqueeze(-1), 0.0)
    return out, lse


def _masked_attention_with_lse(query, key, value, attn_mask):
    B, Sq, H, _ = query.shape
    Sk = key.shape[1]
    scale = query.shape[-1] ** -0.5
    key_t = key.float().permute(0, 2, 3, 1)  # (B, H, D, Sk)
    value_t = value.float().transpose(1, 2)  # (B, H, Sk, D)
    rows = max(1, _MAX_TEXT_BLOCK_ELEMENTS // max(1, B * H * Sk))
    outs, lses = [], []
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        scores = torch.matmul(query[:, r0:r1].float().transpose(1, 2), key_t) * scale  # (B, H, rows, Sk)
        mask = attn_mask[..., r0:r1, :] if attn_mask.shape[-2] != 1 else attn_mask
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask.float()
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, rows); -inf where every key is masked
        # Clamping keeps fully masked rows at exp(-inf) = 0 instead of NaN.
        probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
        outs.append(torch.matmul(probs, value_t).transpose(1, 2))  # (B, rows, H, D)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=-1)


def _merge_by_lse(out_a, lse_a, out_b, lse_b):
    """Combine two softmax attentions over disjoint key sets: ``out (B, S, H, D)``, ``lse (B, H, S)`` natural log.

    Returns the float32 output over the union of the key sets.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    weight_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    return out_a.float() * weight_a + out_b.float() * weight_b


def _text_and_video(n: int, text_len: int, text_first: bool) -> Tuple[slice, slice]:
    return (slice(0, text_len), slice(text_len, n)) if text_first else (slice(n - text_len, n), slice(0, n - text_len))


def joint_attention_must_do(attention: LiteAttention, query, key, value, text_len: int, text_first: bool):
    """Joint attention over ``[text, video]`` or ``[video, text]`` as one LiteAttention call: the text tokens are a
    must-do range on both sides, so text rows drop no tile and text columns are never dropped.

    ``query``/``key``/``value (B, N, H, D)``; no mask. Returns ``(B, N, H, D)`` in ``query``'s dtype.
    """
    text, _ = _text_and_video(query.shape[1], text_len, text_first)
    text_range = [(text.start, text.stop)]
    return attention(query, key, value, must_do_list=text_range, must_do_q_list=text_range)


def joint_attention_split(attention: LiteAttention, query, key, value, text_len: int, text_first: bool,
                          dense: Callable, attn_mask=None):
    """Joint attention over ``[text, video]`` or ``[video, text]`` split in parts, only video x video skippable.

    Video rows: ``attention`` over the video keys, merged by LSE with dense attention over the text keys (which
    carry the mask, if any). Text rows: ``dense(q, k, v, mask)`` over every key. ``query``/``key``/``value
    (B, N, H, D)``; ``attn_mask`` broadcastable to ``(B, H, N, N)`` or None. Returns ``(B, N, H, D)`` in
    ``query``'s dtype.
    """
    text, video = _text_and_video(query.shape[1], text_len, text_first)
    out_vv, lse_vv = attention(query[:, video], key[:, video], value[:, video], return_softmax_lse=True)
    mask_vt = mask_t = attn_mask
    if attn_mask is not None:
        mask_vt = attn_mask[..., text]
        if attn_mask.shape[-2] != 1:
            mask_vt, mask_t = mask_vt[..., video, :], attn_mask[..., text, :]
    out_vt, lse_vt = _attention_with_lse(query[:, video], key[:, text], value[:, text], mask_vt)
    out_video = _merge_by_lse(out_vv, lse_vv, out_vt, lse_vt).to(query.dtype)
    out_text = dense(query[:, text], key, value, mask_t)
    return torch.cat((out_text, out_video) if text_first else (out_video, out_text), dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------------------------

class _LiteProcessor:
    """Base of the liteattn processors: the original processor (kept for :meth:`LiteAttentionHandle.disable` and
    for calls this processor does not handle) and the :class:`LiteAttention` of the current guidance branch.

    ``attention`` is set by the handle's forward pre-hook before every transformer call; the processor itself
    holds no step logic, so ``torch.compile`` sees a plain function of its inputs.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, original):
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.attention: Optional[LiteAttention] = None  # set by the handle before each call

    def _check_parallel(self):
        if self._parallel_config is not None:
            raise NotImplementedError(
                "liteattn does not support diffusers context parallelism yet: the skip state of a sharded sequence "
                "would be per shard. Call handle.disable() before enabling parallelism."
            )

    def _joint_attention(self, query, key, value, text_len: int, text_first: bool, attn_mask=None):
        if attn_mask is None and _JOINT_TEXT == "must_do":
            return joint_attention_must_do(self.attention, query, key, value, text_len, text_first)
        return joint_attention_split(self.attention, query, key, value, text_len, text_first, self._dense, attn_mask)

    def _dense(self, query, key, value, attn_mask):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend)


class LiteWanAttnProcessor(_LiteProcessor):
    """``WanAttnProcessor`` for the self-attention (``attn1``) of Wan 2.1/2.2 blocks, video attention via liteattn."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        self._check_parallel()
        query, key, value = _qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        hidden_states = self.attention(query, key, value)
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


class LiteLTXVideoAttnProcessor(_LiteProcessor):
    """``LTXVideoAttnProcessor`` for the self-attention (``attn1``) of LTX-Video blocks."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check_parallel()
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
        hidden_states = self.attention(query, key, value)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class LiteHunyuanVideoAttnProcessor(_LiteProcessor):
    """``HunyuanVideoAttnProcessor2_0`` for the dual- and single-stream blocks: joint attention with the text
    tokens after the video tokens. Text rows and text columns are computed densely (with the padding mask)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None):
        if encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check_parallel()
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.shape[1]
        if attn.add_q_proj is None:  # single-stream block: one projection for [video, text]
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = _project_heads(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v,
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
            encoder_query, encoder_key, encoder_value = _project_heads(
                encoder_hidden_states, attn.heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # HunyuanVideo's mask (B, 1, 1, N) hides padded text tokens only (it is built as index >= video + text
        # length), so the video x video block is unmasked and the mask applies to the dense text parts.
        hidden_states = self._joint_attention(query, key, value, text_len, text_first=False, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class LiteCogVideoXAttnProcessor(_LiteProcessor):
    """``CogVideoXAttnProcessor2_0`` (and its fused variant): joint attention with the text tokens before the
    video tokens. Text rows and text columns are computed densely."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[torch.Tensor] = None):
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self._check_parallel()
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query, key, value = _qkv(attn, hidden_states)
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
        hidden_states = self._joint_attention(query, key, value, text_len, text_first=True)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_len, hidden_states.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


def _model_specs(diffusers) -> Dict[type, Tuple[type, Tuple[type, ...], Callable[[str, Any], bool]]]:
    """transformer class -> (liteattn processor, original processor classes, is-video-self-attention(name, module))."""
    from diffusers.models import attention_processor as ap
    from diffusers.models.transformers import transformer_hunyuan_video as hunyuan
    from diffusers.models.transformers import transformer_ltx as ltx
    from diffusers.models.transformers import transformer_wan as wan

    def under(*prefixes):
        return lambda name, module: name.split(".")[0] in prefixes

    return {
        diffusers.WanTransformer3DModel: (
            LiteWanAttnProcessor, (wan.WanAttnProcessor,),
            lambda name, module: name.endswith(".attn1") and not module.is_cross_attention),
        diffusers.HunyuanVideoTransformer3DModel: (
            LiteHunyuanVideoAttnProcessor, (hunyuan.HunyuanVideoAttnProcessor2_0,),
            under("transformer_blocks", "single_transformer_blocks")),
        diffusers.CogVideoXTransformer3DModel: (
            LiteCogVideoXAttnProcessor, (ap.CogVideoXAttnProcessor2_0, ap.FusedCogVideoXAttnProcessor2_0),
            lambda name, module: name.endswith(".attn1") and under("transformer_blocks")(name, module)),
        diffusers.LTXVideoTransformer3DModel: (
            LiteLTXVideoAttnProcessor, (ltx.LTXVideoAttnProcessor,),
            lambda name, module: name.endswith(".attn1") and under("transformer_blocks")(name, module)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Handle
# ---------------------------------------------------------------------------------------------------------------

class _Layer:
    """One patched attention module: its original processor, its liteattn processor, one LiteAttention per branch."""

    def __init__(self, transformer_name: str, name: str, module, processor: _LiteProcessor):
        self.transformer_name = transformer_name
        self.name = name
        self.module = module
        self.processor = processor
        self.attentions: List[LiteAttention] = []  # index = guidance branch

    @property
    def qualified_name(self) -> str:
        return f"{self.transformer_name}.{self.name}"


class _Transformer:
    def __init__(self, name: str, module, timestep_index: Optional[int]):
        self.name = name
        self.module = module
        self.timestep_index = timestep_index  # position of `timestep` among forward's positional args
        self.layers: List[_Layer] = []
        self.hooks: list = []
        self.calls_this_step = 0  # calls at the current timestep so far: the next call's guidance branch


class LiteAttentionHandle:
    """What :func:`enable` returns: controls and statistics of liteattn on one pipeline or transformer.

    Methods:
        disable(): put the original processors back (the same objects) and remove the hooks.
        reset(): forget every skip decision; the next transformer call starts a new sampling run.
        set_threshold(threshold): float, per-step list, or callable(step_index) -> float (log2 units, <= 0).
        stats(): sparsity per denoising step, per layer and per guidance branch of the latest run (plain Python).
        plot(path): a PNG of sparsity per step.

    Also a context manager: ``with liteattn.enable(pipe) as handle: ...`` disables on exit.
    """

    def __init__(self, threshold: Threshold, warmup_steps: int, tile_q: int, tile_k: int):
        self._threshold = _check_schedule(threshold)
        self.warmup_steps = warmup_steps
        self.tile_q, self.tile_k = tile_q, tile_k
        self._transformers: List[_Transformer] = []
        self._restore: List[Callable[[], None]] = []
        self.enabled = True
        self._last_timestep: Optional[float] = None
        self._new_run_pending = True
        self.step = -1  # index of the current denoising step in the current run
        self.run = 0  # number of sampling runs started
        self._records: List[dict] = []  # one per transformer call of the current run
        self._warned: set = set()
        self._current: dict = {}  # step, timestep, threshold, warmup, branch of the call in flight

    # -- public API --------------------------------------------------------------------------------------------
    @property
    def layers(self) -> List[str]:
        """Qualified names (``transformer.blocks.0.attn1``) of the patched attention modules."""
        return [layer.qualified_name for t in self._transformers for layer in t.layers]

    def disable(self) -> None:
        """Restore the original processors (the very objects) and remove every hook; idempotent."""
        if not self.enabled:
            return
        for transformer in self._transformers:
            for hook in transformer.hooks:
                hook.remove()
            for layer in transformer.layers:
                layer.module.set_processor(layer.processor.original)
            if getattr(transformer.module, "_liteattn_handle", None) is self:
                del transformer.module._liteattn_handle
        for restore in reversed(self._restore):
            restore()
        self.enabled = False

    def reset(self) -> None:
        """Forget every skip decision and statistic now; the next transformer call is step 0 of a new run."""
        self._start_run()

    def set_threshold(self, threshold: Threshold) -> None:
        """New threshold (log2 units, <= 0, or -inf): a float, one value per step, or callable(step_index) -> float.

        Takes effect from the next transformer call; the skip lists already marked stay as they are.
        """
        self._threshold = _check_schedule(threshold)

    def threshold_at(self, step: int) -> float:
        """The threshold the schedule gives for ``step`` (a list's last value applies to later steps)."""
        if callable(self._threshold):
            return check_threshold(self._threshold(step))
        if isinstance(self._threshold, tuple):
            return self._threshold[min(step, len(self._threshold) - 1)]
        return self._threshold

    def stats(self) -> dict:
        """Sparsity of the latest sampling run, as plain Python data.

        Sparsity is the fraction of (batch, head, q-tile, k-tile) pairs of the video self-attention not computed.
        Returns a dict with:
            ``steps``: one dict per denoising step: ``step``, ``timestep``, ``threshold``, ``warmup`` (bool),
                ``sparsity`` (all layers and branches), ``branches`` (list, one sparsity per guidance branch) and
                ``layers`` ({layer name: sparsity over the branches}).
            ``sparsity``: list, the overall sparsity of each step.
            ``layers``: {layer name: list of its sparsity per step}.
            ``mean_sparsity``: over the whole run (tile-weighted).
            ``run``, ``num_steps``, ``num_branches``, ``tile_q``, ``tile_k``, ``warmup_steps``.
        """
        # Tile counts of dense (warmup) calls are unknown to them: take the layer's count from a skipping call.
        known_totals = {name: total for record in self._records for name, _, total in record["layers"]
                        if total is not None}
        steps: Dict[int, dict] = {}
        total_skipped = total_tiles = 0
        layer_names = self.layers
        for record in self._records:
            computed = [c for _, c, _ in record["layers"] if c is not None]
            computed = iter(torch.stack(computed).cpu().tolist() if computed else [])
            entry = steps.setdefault(record["step"], {
                "step": record["step"], "timestep": record["timestep"], "threshold": record["threshold"],
                "warmup": record["warmup"], "_branches": {}, "_layers": {}})
            branch = entry["_branches"].setdefault(record["branch"], [0, 0])
            for name, done, total in record["layers"]:
                if done is None:
                    total = known_totals.get(name, 0)
                    skipped = 0
                else:
                    skipped = total - next(computed)
                branch[0] += skipped
                branch[1] += total
                layer = entry["_layers"].setdefault(name, [0, 0])
                layer[0] += skipped
                layer[1] += total
                total_skipped += skipped
                total_tiles += total
        ratio = lambda pair: pair[0] / pair[1] if pair[1] else 0.0
        ordered = [steps[i] for i in sorted(steps)]
        for entry in ordered:
            branches = entry.pop("_branches")
            layers = entry.pop("_layers")
            entry["sparsity"] = ratio([sum(p[0] for p in layers.values()), sum(p[1] for p in layers.values())])
            entry["branches"] = [ratio(branches[b]) for b in sorted(branches)]
            entry["layers"] = {name: ratio(pair) for name, pair in layers.items()}
        return {
            "run": self.run,
            "num_steps": len(ordered),
            "num_branches": max((len(e["branches"]) for e in ordered), default=0),
            "tile_q": self.tile_q,
            "tile_k": self.tile_k,
            "warmup_steps": self.warmup_steps,
            "steps": ordered,
            "sparsity": [e["sparsity"] for e in ordered],
            "layers": {name: [e["layers"].get(name, 0.0) for e in ordered] for name in layer_names
                       if any(name in e["layers"] for e in ordered)},
            "mean_sparsity": total_skipped / total_tiles if total_tiles else 0.0,
        }

    def plot(self, path) -> str:
        """Write a PNG of sparsity per denoising step (each layer thin, each branch dashed, the mean bold)."""
        try:
            import matplotlib
        except ImportError as exc:
            raise ImportError("LiteAttentionHandle.plot needs matplotlib: pip install liteattn[diffusers]") from exc
        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        stats = self.stats()
        steps = [e["step"] for e in stats["steps"]]
        fig = Figure(figsize=(7, 4), dpi=120)
        ax = fig.subplots()
        for n, values in enumerate(stats["layers"].values()):
            ax.plot(steps, values, color="0.75", linewidth=0.6, label="each layer" if n == 0 else None)
        ax.plot(steps, stats["sparsity"], color="black", linewidth=2.5, label="all layers")
        for branch in range(stats["num_branches"]):  # on top: the branches often follow the mean closely
            values = [e["branches"][branch] if branch < len(e["branches"]) else math.nan for e in stats["steps"]]
            ax.plot(steps, values, linestyle="--", linewidth=1.2, label=f"guidance branch {branch}")
        ax.set_xlabel("denoising step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("sparsity (fraction of tiles skipped)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"liteattn: mean sparsity {stats['mean_sparsity']:.1%} over {len(steps)} steps")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        path = str(path)
        fig.savefig(path, format="png")
        return path

    def __enter__(self) -> "LiteAttentionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        names = ", ".join(f"{t.name}: {type(t.module).__name__} ({len(t.layers)} layers)" for t in self._transformers)
        threshold = self._threshold if not callable(self._threshold) else getattr(self._threshold, "__name__", "fn")
        return (f"LiteAttentionHandle({names}; threshold={threshold}, warmup_steps={self.warmup_steps}, "
                f"tile=({self.tile_q}, {self.tile_k}), enabled={self.enabled}, run={self.run}, step={self.step})")

    # -- sampling-loop tracking (runs eagerly, outside torch.compile graphs) -----------------------------------
    def _start_run(self) -> None:
        for transformer in self._transformers:
            transformer.calls_this_step = 0
            for layer in transformer.layers:
                for attention in layer.attentions:
                    attention.reset_skip_state()
        self._records = []
        self._last_timestep = None
        self._new_run_pending = False
        self.step = -1
        self.run += 1

    def _before_call(self, transformer: _Transformer, args, kwargs) -> None:
        timestep = _read_timestep(transformer, args, kwargs)
        if timestep is None and "no-timestep" not in self._warned:
            self._warned.add("no-timestep")
            logger.warning("liteattn: %s was called without a timestep; every call is taken as a new denoising "
                           "step of one guidance branch", transformer.name)
        if self._new_run_pending or (timestep is not None and self._last_timestep is not None
                                     and timestep > self._last_timestep):
            self._start_run()
        if timestep is None or timestep != self._last_timestep:
            self.step += 1
            for other in self._transformers:
                other.calls_this_step = 0
        self._last_timestep = timestep
        branch = transformer.calls_this_step
        transformer.calls_this_step += 1

        warmup = self.step < self.warmup_steps
        threshold = self.threshold_at(self.step)
        for layer in transformer.layers:
            while len(layer.attentions) <= branch:
                layer.attentions.append(LiteAttention(threshold=threshold, max_batch_size=1 << 30,
                                                      tile_q=self.tile_q, tile_k=self.tile_k))
            attention = layer.attentions[branch]
            # Warmup: plain dense attention, the skip state untouched (so nothing is marked). Toggling the flag
            # rather than the threshold keeps the threshold a constant for torch.compile.
            attention.enable_skipping = not warmup
            if attention.threshold != threshold:
                attention.threshold = threshold
            layer.processor.attention = attention
        self._current = dict(step=self.step, timestep=timestep, threshold=threshold, warmup=warmup, branch=branch)

    def _after_call(self, transformer: _Transformer) -> None:
        layers = []  # (name, tiles computed: 0-d tensor or None if dense, tiles in all or None if unknown)
        for layer in transformer.layers:
            attention = layer.processor.attention
            counts, state = attention._last_read_counts, attention.skip_state
            if not attention.enable_skipping or counts is None or state is None:
                layers.append((layer.qualified_name, None, None))  # a dense call: nothing skipped
            else:
                # The sum stays on the device until stats() is read: no host sync per call.
                layers.append((layer.qualified_name, counts.sum(), math.prod(state.shape)))
        self._records.append(dict(self._current, transformer=transformer.name, layers=layers))


def _read_timestep(transformer: _Transformer, args, kwargs) -> Optional[float]:
    timestep = kwargs.get("timestep")
    if timestep is None and transformer.timestep_index is not None and len(args) > transformer.timestep_index:
        timestep = args[transformer.timestep_index]
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        # The largest entry: per-token timesteps (Wan 2.2 TI2V, LTX conditioning) hold 0 on the clean tokens.
        return float(timestep.detach().max())
    return float(timestep)


def _check_schedule(threshold: Threshold):
    if callable(threshold):
        return threshold
    if isinstance(threshold, (list, tuple)):
        if not threshold:
            raise ValueError("threshold list is empty; give one value per denoising step")
        return tuple(check_threshold(t) for t in threshold)
    if isinstance(threshold, torch.Tensor) and threshold.numel() > 1:
        return tuple(check_threshold(t) for t in threshold.tolist())
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.item()
    return check_threshold(threshold)


def _find_transformers(obj, diffusers) -> List[Tuple[str, Any]]:
    specs = _model_specs(diffusers)
    supported = ", ".join(SUPPORTED_TRANSFORMERS)
    if isinstance(obj, torch.nn.Module):
        module = getattr(obj, "_orig_mod", obj)  # a torch.compile'd module
        if not isinstance(module, tuple(specs)):
            raise ValueError(f"liteattn.enable supports {supported}; got {type(module).__name__}")
        return [("transformer", module)]
    found, others = [], []
    for name in _PIPELINE_TRANSFORMERS:
        module = getattr(obj, name, None)
        if module is None:
            continue
        module = getattr(module, "_orig_mod", module)
        if isinstance(module, tuple(specs)):
            found.append((name, module))
        else:
            others.append(f"{name}: {type(module).__name__}")
    if not found:
        got = "; ".join(others) if others else f"{type(obj).__name__} without a `transformer`"
        raise ValueError(f"liteattn.enable supports pipelines or transformers of {supported}; got {got}")
    if others:
        raise ValueError(f"liteattn.enable supports {supported}; got {'; '.join(others)}")
    return found


def _select_layers(candidates: List[Tuple[str, Any]], layers, transformer_name: str):
    if layers is None:
        return candidates
    if isinstance(layers, (str, int)):
        layers = [layers]
    chosen = []
    names = [name for name, _ in candidates]
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (numbers.Integral, str)):
            raise TypeError(f"layers must hold layer indices or module names, got {item!r}")
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"layers: {transformer_name} has no video self-attention named {item!r}; "
                                 f"it has {names[:3]}...{names[-1:]}")
            index = names.index(item)
        else:
            index = int(item)
            if not -len(names) <= index < len(names):
                raise ValueError(f"layers: index {index} is out of range; {transformer_name} has {len(names)} "
                                 f"video self-attention layers")
            index %= len(names)
        if candidates[index] not in chosen:
            chosen.append(candidates[index])
    return sorted(chosen, key=lambda c: names.index(c[0]))


def enable(pipe_or_transformer, threshold: Threshold = -10.0, *, warmup_steps: int = 0, tile_q: int = 128,
           tile_k: int = 128, layers: Optional[Iterable[Union[int, str]]] = None) -> LiteAttentionHandle:
    """Run the video self-attention of a diffusers video pipeline (or transformer) with LiteAttention.

    Args:
        pipe_or_transformer: a pipeline whose ``transformer`` (and ``transformer_2``, Wan 2.2) is one of
            ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``, ``CogVideoXTransformer3DModel``,
            ``LTXVideoTransformer3DModel``, or such a transformer itself. Enable before ``torch.compile``.
        threshold: skip threshold in log2 units (<= 0; -inf skips nothing): a float, a list with one value per
            denoising step (the last value applies to later steps), or a callable(step_index) -> float. Lower
            (more negative) skips less.
        warmup_steps: the first ``warmup_steps`` denoising steps of each run are computed densely and mark nothing.
        tile_q, tile_k: skip-tile sizes in tokens (multiples of 16; 128 for the GPU kernel).
        layers: which video self-attention layers to patch, as indices in block order (negative counts from the
            end) or module names (``"blocks.0.attn1"``); ``None`` patches all of them.

    Returns:
        A :class:`LiteAttentionHandle` (``disable()``, ``reset()``, ``set_threshold()``, ``stats()``, ``plot()``).
    """
    diffusers = _require_diffusers()
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    check_tile("tile_q", tile_q)
    check_tile("tile_k", tile_k)
    found = _find_transformers(pipe_or_transformer, diffusers)
    specs = _model_specs(diffusers)
    handle = LiteAttentionHandle(threshold, int(warmup_steps), tile_q, tile_k)

    plans = []
    for transformer_name, module in found:
        if getattr(module, "_liteattn_handle", None) is not None:
            raise ValueError(f"liteattn is already enabled on {transformer_name}; call handle.disable() first")
        processor_cls, original_classes, is_video_self_attention = next(
            spec for cls, spec in specs.items() if isinstance(module, cls))
        candidates = []
        for name, submodule in module.named_modules():
            processor = getattr(submodule, "processor", None)
            if processor is None or not hasattr(submodule, "set_processor"):
                continue
            if not is_video_self_attention(name, submodule):
                continue
            if not isinstance(processor, original_classes):
                logger.warning("liteattn: leaving %s.%s alone: its processor is %s, not one of %s",
                               transformer_name, name, type(processor).__name__,
                               [c.__name__ for c in original_classes])
                continue
            if getattr(processor, "_parallel_config", None) is not None:
                raise NotImplementedError("liteattn does not support diffusers context parallelism yet")
            candidates.append((name, submodule))
        if not candidates:
            raise ValueError(f"{transformer_name} ({type(module).__name__}) has no video self-attention with its "
                             f"original diffusers processor to patch")
        plans.append((transformer_name, module, processor_cls, _select_layers(candidates, layers, transformer_name)))

    for transformer_name, module, processor_cls, chosen in plans:
        transformer = _Transformer(transformer_name, module, _timestep_position(module))
        for name, submodule in chosen:
            processor = processor_cls(submodule.processor)
            transformer.layers.append(_Layer(transformer_name, name, submodule, processor))
            submodule.set_processor(processor)
        transformer.hooks.append(module.register_forward_pre_hook(
            _disable_dynamo(functools.partial(_pre_hook, handle, transformer)), with_kwargs=True))
        transformer.hooks.append(module.register_forward_hook(
            _disable_dynamo(functools.partial(_post_hook, handle, transformer))))
        module._liteattn_handle = handle
        handle._transformers.append(transformer)

    scheduler = getattr(pipe_or_transformer, "scheduler", None)
    if not isinstance(pipe_or_transformer, torch.nn.Module) and callable(getattr(scheduler, "set_timesteps", None)):
        _watch_scheduler(handle, scheduler)
    logger.info("liteattn: enabled on %s", handle)
    return handle


def _timestep_position(module) -> Optional[int]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names.index("timestep") if "timestep" in names else None


def _watch_scheduler(handle: LiteAttentionHandle, scheduler) -> None:
    """A pipeline call starts with ``scheduler.set_timesteps``: take it as the start of a new sampling run."""
    original = scheduler.set_timesteps

    @functools.wraps(original)  # keeps the signature, which retrieve_timesteps inspects
    def set_timesteps(*args, **kwargs):
        handle._new_run_pending = True
        return original(*args, **kwargs)

    had_instance_attr = "set_timesteps" in vars(scheduler)
    scheduler.set_timesteps = set_timesteps

    def restore():
        if vars(scheduler).get("set_timesteps") is set_timesteps:
            if had_instance_attr:
                scheduler.set_timesteps = original
            else:
                del scheduler.set_timesteps

    handle._restore.append(restore)


def _disable_dynamo(fn):
    # The hooks read the timestep on the host and keep Python bookkeeping: run them eagerly, outside any graph.
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _pre_hook(handle: LiteAttentionHandle, transformer: _Transformer, module, args, kwargs):
    handle._before_call(transformer, args, kwargs)
    return None


def _post_hook(handle: LiteAttentionHandle, transformer: _Transformer, module, args, output):
    handle._after_call(transformer)
    return None
