"""Joint attention over text and video tokens, and the log-sum-exp algebra it rests on.

Models such as HunyuanVideo (text after video) and CogVideoX (text before video) attend over one sequence that holds
both. Only video x video is worth skipping; text query rows and text key columns stay dense. Two strategies do that:

- ``"must_do"``: one skipping call over the whole sequence, the text tokens a must-do range on both sides (text rows
  drop no tile, text columns are never dropped). One kernel launch; it cannot take an attention mask.
- ``"split"``: video x video through the skipping attention, video x text dense (with the mask, if any), the two
  merged by their log-sum-exp; text rows attend densely to everything.

:func:`merge_by_lse` is also what merges the shards of sequence-parallel attention (ring), and
:func:`attention_with_lse` is dense attention that returns its log-sum-exp.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .ops import lite_attention

__all__ = ["JOINT_TEXT_STRATEGIES", "merge_by_lse", "attention_with_lse", "joint_attention", "text_and_video"]

JOINT_TEXT_STRATEGIES = ("must_do", "split")
# Rows x keys x heads of one fp32 score block in the masked dense path (bounds its memory: 256 MB).
_MAX_MASKED_BLOCK_ELEMENTS = 1 << 26


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                 out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax attentions of the same queries over disjoint key sets.

    ``out_a``, ``out_b``: ``(B, S, H, Dv)``; ``lse_a``, ``lse_b``: ``(B, H, S)`` natural log, float32. Returns the
    attention over the union of the key sets, ``(out (B, S, H, Dv) in out_dtype (default out_a's), lse (B, H, S)
    float32)``. Rows where one side saw no key (lse -inf) take the other side; rows where neither did give 0 and
    -inf, never NaN. Memory: one float32 buffer of the output's shape besides the result.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"merge_by_lse: shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
                         f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    B, S, H, _ = out_a.shape
    if lse_a.shape != (B, H, S):
        raise ValueError(f"merge_by_lse: lse must be (B, H, S) = {(B, H, S)} for out (B, S, H, Dv), "
                         f"got {tuple(lse_a.shape)}")
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both are -inf, lse is -inf and lse_x - lse would be NaN: subtract 0 there instead (weights exp(-inf) = 0).
    finite_lse = lse.masked_fill(lse == -math.inf, 0.0)
    weight_a = torch.exp(lse_a - finite_lse).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    weight_b = torch.exp(lse_b - finite_lse).transpose(1, 2).unsqueeze(-1)
    merged = out_a.float() * weight_a if out_a.dtype != torch.float64 else out_a * weight_a
    merged.addcmul_(out_b, weight_b)
    return merged.to(out_dtype or out_a.dtype), lse


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention and its log-sum-exp.

    ``query (B, Sq, H, D)``, ``key (B, Sk, H, D)``, ``value (B, Sk, H, Dv)``; ``attn_mask`` broadcastable to
    ``(B, H, Sq, Sk)``, bool (True = attend) or additive float. Returns ``out (B, Sq, H, Dv)`` in the input dtype
    and ``lse (B, H, Sq)`` float32; rows with every key masked give 0 and -inf.

    Without a mask: liteattn's dense core (the Triton kernel on a GPU). With a mask: PyTorch in row blocks, scores
    and softmax in float32 (on CUDA the products run on the tensor cores in the input dtype with float32 output).
    """
    if attn_mask is None:
        return lite_attention(query, key, value, scale=scale, return_lse=True)
    return _masked_attention_with_lse(query, key, value, attn_mask, scale)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a float32 result: fp16/bf16 products on the CUDA tensor cores, else in float32."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a.flatten(0, -3), b.flatten(0, -3), out_dtype=torch.float32).unflatten(0, a.shape[:-2])
    return torch.matmul(a.float(), b.float())


def _masked_attention_with_lse(query, key, value, attn_mask, scale):
    B, Sq, H, D = query.shape
    Sk = key.shape[1]
    scale = D ** -0.5 if scale is None else scale
    key_t = key.permute(0, 2, 3, 1)  # (B, H, D, Sk)
    value_t = value.transpose(1, 2)  # (B, H, Sk, Dv)
    mask = attn_mask.expand(*attn_mask.shape[:-2], attn_mask.shape[-2], Sk)
    rows = max(1, _MAX_MASKED_BLOCK_ELEMENTS // max(1, B * H * Sk))
    out = torch.empty(B, Sq, H, value.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=query.device)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        scores = _matmul_fp32(query[:, r0:r1].transpose(1, 2), key_t.expand(B, H, D, Sk))  # (B, H, rows, Sk)
        scores.mul_(scale)
        block_mask = mask[..., r0:r1, :] if mask.shape[-2] != 1 else mask
        if block_mask.dtype == torch.bool:
            scores.masked_fill_(~block_mask, -math.inf)
        else:
            scores.add_(block_mask.float())
        block_lse = torch.logsumexp(scores, dim=-1)  # (B, H, rows); -inf where every key is masked
        # exp(-inf - finite) = 0 for masked keys; rows with every key masked subtract 0 instead of -inf (no NaN).
        probs = scores.sub_(block_lse.masked_fill(block_lse == -math.inf, 0.0).unsqueeze(-1)).exp_()
        block_out = _matmul_fp32(probs.to(value.dtype) if probs.is_cuda else probs, value_t.expand(B, H, Sk, -1))
        out[:, r0:r1] = block_out.transpose(1, 2).to(query.dtype)
        lse[..., r0:r1] = block_lse
    return out, lse


def text_and_video(n: int, text_len: int, text_first: bool) -> Tuple[slice, slice]:
    """Slices of the text and video tokens in a joint sequence of ``n`` tokens."""
    return (slice(0, text_len), slice(text_len, n)) if text_first else (slice(n - text_len, n), slice(0, n - text_len))


def joint_attention(attention: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                    text_len: int, text_first: bool, strategy: str = "must_do",
                    attn_mask: Optional[torch.Tensor] = None, dense: Optional[Callable] = None) -> torch.Tensor:
    """Joint attention over ``[text, video]`` (``text_first``) or ``[video, text]``, skipping video x video only.

    ``attention`` is a :class:`liteattn.LiteAttention` (or anything with its call signature); ``query``, ``key``,
    ``value`` are ``(B, N, H, D)``. ``strategy``: ``"must_do"`` or ``"split"`` (module docstring); a mask
    (broadcastable to ``(B, H, N, N)``) needs ``"split"``. ``dense(q, k, v, mask)`` computes the text rows of
    ``"split"`` (default: :func:`attention_with_lse`'s output). Returns ``(B, N, H, D)`` in ``query``'s dtype.
    """
    if strategy not in JOINT_TEXT_STRATEGIES:
        raise ValueError(f"joint-text strategy must be one of {JOINT_TEXT_STRATEGIES}, got {strategy!r}")
    text, video = text_and_video(query.shape[1], text_len, text_first)
    if strategy == "must_do":
        if attn_mask is not None:
            raise ValueError("the 'must_do' joint-text strategy cannot take an attention mask; use 'split'")
        text_range = [(text.start, text.stop)]
        return attention(query, key, value, must_do_list=text_range, must_do_q_list=text_range)
    out_vv, lse_vv = attention(query[:, video], key[:, video], value[:, video], return_softmax_lse=True)
    mask_vt = mask_t = attn_mask
    if attn_mask is not None:
        mask_vt = attn_mask[..., text]
        if attn_mask.shape[-2] != 1:
            mask_vt, mask_t = mask_vt[..., video, :], attn_mask[..., text, :]
    out_vt, lse_vt = attention_with_lse(query[:, video], key[:, text], value[:, text], mask_vt)
    out_video, _ = merge_by_lse(out_vv, lse_vv, out_vt, lse_vt, out_dtype=query.dtype)
    if dense is None:
        out_text = attention_with_lse(query[:, text], key, value, mask_t)[0]
    else:
        out_text = dense(query[:, text], key, value, mask_t)
    return torch.cat((out_text, out_video) if text_first else (out_video, out_text), dim=1)
