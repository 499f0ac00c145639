"""The base of liteattn's attention processors, and the projection helpers the model families share.

A processor reproduces its model's original attention computation, but routes the video-to-video attention through
a :class:`liteattn.LiteAttention`. It holds no step logic: the handle sets ``attention`` (the LiteAttention of the
current layer and guidance branch) before every transformer call, so ``torch.compile`` sees a plain function of its
inputs.

Under diffusers' context parallelism (``transformer.enable_parallelism(...)``, before or after ``liteattn.enable``)
diffusers gives the processor its ``_parallel_config``, and :meth:`LiteProcessor.attend` runs the attention through
diffusers' own Ulysses / ring machinery with liteattn computing each piece (:mod:`liteattn.parallel`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from ..joint import joint_attention
from ..module import LiteAttention
from ..parallel import KVChunkAttention, check_context_parallel, context_parallel_attention

__all__ = ["LiteProcessor", "qkv", "project_heads"]

logger = logging.getLogger("liteattn")
_WARNED: set = set()  # processor classes whose context_parallel_warning was logged


class LiteProcessor:
    """Base of the liteattn processors.

    ``original``: the processor it replaced (put back by ``handle.disable()``, and called for the calls this one
    does not handle, e.g. cross-attention through a shared processor class). ``attention``: the LiteAttention of
    the current guidance branch, set by the handle. ``joint_text``: how joint text+video attention keeps text dense
    (:func:`liteattn.joint.joint_attention`), for families that have text tokens in the sequence.

    ``context_parallel`` (class attribute): the kinds of diffusers context parallelism the family runs under
    (``"ulysses"``, ``"ring"``), empty for none; ``context_parallel_note``: why a kind is missing. Setting
    ``_parallel_config`` (diffusers' ``enable_parallelism`` does) checks it and passes it on to ``original``, so the
    processor ``handle.disable()`` puts back runs in parallel too.
    """

    _attention_backend = None
    context_parallel: tuple = ()
    context_parallel_note = ""
    context_parallel_warning = ""  # logged once per class when a parallel config arrives

    def __init__(self, original, joint_text: Optional[str] = None):
        self.original = original
        self.joint_text = joint_text
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._config = None
        self._parallel_config = getattr(original, "_parallel_config", None)
        self.attention: Optional[LiteAttention] = None  # set by the handle before each call
        # Ring: for each handle-set attention (one per layer and guidance branch), the attentions of the other K/V
        # chunks (None at its own chunk); they go when the handle drops it.
        self._others: "weakref.WeakKeyDictionary[LiteAttention, list]" = weakref.WeakKeyDictionary()

    @property
    def _parallel_config(self):
        """diffusers' ``ParallelConfig`` when context parallelism is enabled on the model, else None."""
        return self._config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        check_context_parallel(config, self.model_name, self.context_parallel, self.context_parallel_note)
        if config is not None and self.context_parallel_warning and type(self) not in _WARNED:
            _WARNED.add(type(self))
            logger.warning("liteattn: %s", self.context_parallel_warning)
        self._config = config
        if hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = config

    @property
    def model_name(self) -> str:
        from .registry import families

        names = [name for name, family in families().items() if family.processor is type(self)]
        return names[0] if names else type(self).__name__

    def check_parallel(self) -> None:
        """ValueError under a context parallelism the family does not run under (called by the families without
        any, in case a config got past ``_parallel_config``'s setter)."""
        check_context_parallel(self._parallel_config, self.model_name, self.context_parallel,
                               self.context_parallel_note)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Video self-attention of ``(B, S, H, D)`` tensors through ``attention``; under context parallelism, of
        this rank's token slice, through diffusers' Ulysses / ring with liteattn computing each piece."""
        if self._parallel_config is None:
            return self.attention(query, key, value)
        if not isinstance(self.attention, LiteAttention):
            raise ValueError(f"under diffusers context parallelism liteattn runs plain LiteAttention layers, not "
                             f"{type(self.attention).__name__} (calibration with target_error measures whole "
                             f"attention rows): calibrate on one GPU, then run its profile in parallel")
        cp = self._parallel_config.context_parallel_config
        return context_parallel_attention(self.chunk_attention(cp.ring_degree, cp._ring_local_rank), query, key,
                                          value, self._parallel_config)

    def chunk_attention(self, num_chunks: int, own_chunk: int) -> KVChunkAttention:
        """The K/V-chunk attentions of the current ``attention``: it serves this rank's own chunk ``own_chunk``; the
        others are created with its settings and follow its threshold, skipping switch and resets."""
        leader = self.attention
        others = self._others.get(leader)
        if others is None or len(others) != num_chunks or others[own_chunk] is not None:
            others = KVChunkAttention.around(leader, num_chunks, own_chunk).attns
            others[own_chunk] = None  # the leader itself: not held here, so the weak key can go with the handle
            self._others[leader] = others
        chunks = KVChunkAttention([leader if a is None else a for a in others])
        chunks.follow(leader)
        return chunks

    def chunk_attentions(self, attention: LiteAttention) -> KVChunkAttention:
        """The K/V-chunk attentions that ``attention`` (``handle.attention(layer, branch)``) leads under ring
        parallelism (``[attention]`` alone without ring); their ``skip_state``s are this rank's decisions."""
        others = self._others.get(attention)
        if others is None:
            return KVChunkAttention([attention])
        return KVChunkAttention([attention if a is None else a for a in others])

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
