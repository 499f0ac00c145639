"""Sequence parallelism: LiteAttention when the tokens of one attention are split over several ranks.

Two ways of splitting meet here (docs/DESIGN.md, section 8):

- **Ulysses** (an all-to-all of heads): each rank computes attention over *all* tokens for ``H/N`` of the heads.
  Heads are independent, so a plain :class:`liteattn.LiteAttention` over the rank's heads takes exactly the
  decisions one GPU takes for those heads, and keeps ``1/N`` of the skip state.
- **Ring** (K/V chunks passed around): each rank holds ``S/N`` queries and visits the ``N`` K/V chunks one after
  another, merging the partial outputs by their log-sum-exp. Each (query chunk, K/V chunk) pair is its own
  attention with its own skip state: :class:`KVChunkAttention` holds one LiteAttention per K/V chunk and is called
  with the chunk's index. A rank keeps ``N`` bitmasks of ``(S/N) x (S/N)`` tiles: about ``1/N`` of one GPU's (the
  ``"mass"`` rule's per-chunk LSE, ``N x (B, H, S/N)``, is one GPU's size: DESIGN.md, section 8).

Unified parallelism (both) is a ring over Ulysses: ``H/N_u`` heads per rank and one state per ring chunk.

Two entry points share :class:`KVChunkAttention`:

- :func:`ring_attention`, for code that splits the sequence itself over ``torch.distributed``
  (:class:`liteattn.SeqParallelLiteAttention`, the reference implementation's class, is a KVChunkAttention);
- :func:`context_parallel_attention`, for diffusers' context parallelism
  (``transformer.enable_parallelism(config=ContextParallelConfig(...))``): diffusers does the communication and the
  merge (``attention_dispatch._templated_context_parallel_attention``) and calls liteattn once per K/V chunk.
  Those helpers are private to diffusers, so the versions they were checked against are pinned
  (:data:`DIFFUSERS_TESTED`, :func:`check_context_parallel`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .joint import merge_by_lse

__all__ = ["KVChunkAttention", "ring_attention", "context_parallel_attention", "check_context_parallel",
           "DIFFUSERS_TESTED"]

# The diffusers versions whose private context-parallel helpers liteattn was checked against: [lower, upper).
DIFFUSERS_TESTED = ("0.42", "0.43")


class KVChunkAttention:
    """One :class:`liteattn.LiteAttention` per K/V chunk of a sequence-parallel attention layer.

    ``attn(q, k, v, chunk)`` computes attention of ``q`` over the ``chunk``-th K/V chunk with that chunk's own skip
    state (``q (B, Sq, H, D)``, ``k``/``v`` the chunk's ``(B, Sk_chunk, H, D)``); :meth:`ring` visits every chunk and
    merges the outputs by their log-sum-exp. A decision therefore means "this tile adds nothing to attention *over
    this chunk*" (DESIGN.md, section 8).

    Args:
        attentions: one LiteAttention (or anything with its call signature) per chunk, in chunk order.
    """

    _count_name = "num_chunks"  # what the repr calls the number of chunks

    def __init__(self, attentions: Sequence):
        if len(attentions) == 0:
            raise ValueError("KVChunkAttention needs at least one attention (one per K/V chunk)")
        self.attns = list(attentions)

    @classmethod
    def around(cls, attention, num_chunks: int, own_chunk: int) -> "KVChunkAttention":
        """Chunk attentions for a layer whose ``attention`` serves chunk ``own_chunk``; the others are new
        LiteAttentions with its settings (threshold, tiles, backend, criterion), kept in step by :meth:`follow`."""
        _check_index("own_chunk", own_chunk, num_chunks)
        return cls([attention if chunk == own_chunk else _like(attention) for chunk in range(num_chunks)])

    @property
    def num_chunks(self) -> int:
        return len(self.attns)

    def __len__(self) -> int:
        return len(self.attns)

    def __getitem__(self, chunk: int):
        return self.attns[chunk]

    def __call__(self, query, key, value, chunk: int, scale: Optional[float] = None,
                 return_softmax_lse: bool = False, must_do_list=None, must_skip_list=None, must_do_q_list=None):
        """As :meth:`LiteAttention.__call__`, over the ``chunk``-th K/V chunk: ``must_do_list`` and
        ``must_skip_list`` are ranges of this chunk's key tokens, ``must_do_q_list`` of the query tokens."""
        _check_index("chunk", chunk, self.num_chunks)
        return self.attns[chunk](query, key, value, scale=scale, return_softmax_lse=return_softmax_lse,
                                 must_do_list=must_do_list, must_skip_list=must_skip_list,
                                 must_do_q_list=must_do_q_list)

    def ring(self, query: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
             first_chunk: int = 0, scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``query (B, Sq, H, D)`` over every chunk (``keys[c]``, ``values[c]``: ``(B, Sk_c, H, D)``),
        visited from ``first_chunk`` on, as a ring does, and merged with :func:`liteattn.merge_by_lse` (NaN-safe).
        Returns ``(out (B, Sq, H, Dv) in the input dtype, lse (B, H, Sq) float32)``."""
        if len(keys) != self.num_chunks or len(values) != self.num_chunks:
            raise ValueError(f"ring: {self.num_chunks} chunks, got {len(keys)} keys and {len(values)} values")
        _check_index("first_chunk", first_chunk, self.num_chunks)
        out = lse = None
        for step in range(self.num_chunks):
            chunk = (first_chunk + step) % self.num_chunks
            chunk_out, chunk_lse = self(query, keys[chunk], values[chunk], chunk, scale=scale,
                                        return_softmax_lse=True)
            if out is None:
                out, lse = chunk_out.float(), chunk_lse
            else:  # float32 between chunks, as diffusers' ring does (convert_to_fp32)
                out, lse = merge_by_lse(out, lse, chunk_out, chunk_lse, out_dtype=torch.float32)
        return out.to(query.dtype), lse

    # -- keeping the chunks in step ------------------------------------------------------------------------------
    def follow(self, leader) -> None:
        """Give every chunk attention ``leader``'s threshold and skipping switch, and forget the other chunks'
        decisions when ``leader``'s were forgotten (its state reset or freed). Used when only ``leader`` is
        driven from outside (the diffusers handle drives one LiteAttention per layer and guidance branch)."""
        state = leader.skip_state
        for attention in self.attns:
            if attention is leader:
                continue
            attention.enable_skipping = leader.enable_skipping
            attention.threshold = leader.threshold  # filled in place, only when the value changes
            if state is None and attention.skip_state is not None:
                attention.free_skip_state()
            elif state is not None and state.untouched and attention.skip_state is not None \
                    and not attention.skip_state.untouched:
                attention.reset_skip_state()

    # -- the reference implementation's controls ----------------------------------------------------------------
    def set_threshold(self, threshold) -> None:
        """Every chunk's threshold (log2 units, <= 0, or -inf): a number or a one-element tensor."""
        for attention in self.attns:
            attention.set_threshold(threshold)

    @property
    def threshold(self) -> float:
        return self.attns[0].threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self.set_threshold(value)

    def reset_skip_state(self) -> None:
        for attention in self.attns:
            attention.reset_skip_state()

    def enable_skip_optimization(self, enable: bool = True) -> None:
        for attention in self.attns:
            attention.enable_skip_optimization(enable)

    # -- inspection ----------------------------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        """Mean sparsity of the chunks' most recent calls."""
        return sum(a.sparsity for a in self.attns) / self.num_chunks

    @property
    def skip_state_bytes(self) -> int:
        """Device memory held by the chunks' skip states, in bytes."""
        return sum(a.skip_state.nbytes for a in self.attns if a.skip_state is not None)

    def __repr__(self) -> str:
        first = self.attns[0]
        states = ", ".join("none" if a.skip_state is None else str(tuple(a.skip_state.shape)) for a in self.attns)
        return (f"{type(self).__name__}({self._count_name}={self.num_chunks}, enable_skipping={first.enable_skipping}, "
                f"threshold={first.threshold}, tile_q={first.tile_q}, tile_k={first.tile_k}, "
                f"backend={first.backend!r}, criterion={first.criterion!r}, states=[{states}])")


def _check_index(name: str, value, count: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise ValueError(f"{name} must be an int in [0, {count}), got {value!r}")


def _like(attention):
    """A new LiteAttention with ``attention``'s settings and no state."""
    return type(attention)(attention.enable_skipping, attention.threshold, attention.max_batch_size,
                           tile_q=attention.tile_q, tile_k=attention.tile_k, backend=attention.backend,
                           criterion=attention.criterion)


# -- torch.distributed, without diffusers ----------------------------------------------------------------------------

def ring_attention(attn: KVChunkAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   group=None, scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over a process group: each rank passes its query, key and value chunk ``(B, S_rank, H, D)``
    (equal shapes on every rank); the K/V chunks are all-gathered and visited from the rank's own, each with its own
    skip state (``attn[c]`` serves the chunk of group rank ``c``). Returns ``(out, lse)`` for the rank's queries,
    as :meth:`KVChunkAttention.ring`. Every rank of ``group`` must call it (it is a collective)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if attn.num_chunks != world:
        raise ValueError(f"ring_attention: attn has {attn.num_chunks} chunks, the process group {world} ranks")
    keys = [torch.empty_like(key) for _ in range(world)]
    values = [torch.empty_like(value) for _ in range(world)]
    dist.all_gather(keys, key.contiguous(), group=group)
    dist.all_gather(values, value.contiguous(), group=group)
    return attn.ring(query, keys, values, first_chunk=rank, scale=scale)


# -- diffusers' context parallelism ----------------------------------------------------------------------------------

def check_context_parallel(parallel_config, model: str, modes: Tuple[str, ...], why: str = "") -> None:
    """ValueError unless liteattn can run ``model``'s attention under this diffusers ``ParallelConfig``.

    ``modes``: the kinds of context parallelism the model family runs under (``"ulysses"``, ``"ring"``: which of
    ``ulysses_degree`` / ``ring_degree`` may exceed 1); empty when it has no context-parallel plan in diffusers.
    ``why``: one line on what keeps a family out of the other mode."""
    if parallel_config is None:
        return
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:  # tensor parallelism alone never reaches the processors
        return
    if not modes:
        raise ValueError(f"liteattn cannot run {model} under diffusers context parallelism (it has no context-"
                         f"parallel plan in diffusers {DIFFUSERS_TESTED[0]}.x); liteattn supports it for "
                         f"WanTransformer3DModel (Ulysses, ring, both) and LTXVideoTransformer3DModel (ring). Run "
                         f"{model} on one GPU per process, or call handle.disable() before enable_parallelism")
    asked = [name for name, degree in (("ulysses", cp.ulysses_degree), ("ring", cp.ring_degree)) if degree > 1]
    refused = [name for name in asked if name not in modes]
    if refused:
        raise ValueError(f"liteattn runs {model} under {' and '.join(modes)} context parallelism, not "
                         f"{' and '.join(refused)}_degree > 1{': ' + why if why else ''}")
    if getattr(parallel_config, "tensor_parallel_config", None) is not None:
        raise ValueError("liteattn supports diffusers context parallelism (ulysses_degree, ring_degree or both), not "
                         "context parallelism combined with tensor parallelism")
    check_diffusers_version()


def check_diffusers_version(version: Optional[str] = None) -> None:
    """ValueError when the installed diffusers (or ``version``) is outside :data:`DIFFUSERS_TESTED`."""
    import diffusers
    from packaging.version import Version

    version = diffusers.__version__ if version is None else version
    lower, upper = DIFFUSERS_TESTED
    found = Version(Version(version).base_version)
    if not Version(lower) <= found < Version(upper):
        raise ValueError(f"liteattn under diffusers context parallelism needs diffusers>={lower},<{upper} (it calls "
                         f"diffusers' private attention_dispatch._templated_context_parallel_attention, checked "
                         f"there); found diffusers {version}. Install diffusers>={lower},<{upper}, or run without "
                         f"enable_parallelism")
    from diffusers.models import attention_dispatch

    if not hasattr(attention_dispatch, "_templated_context_parallel_attention"):
        raise ValueError(f"diffusers {version} has no attention_dispatch._templated_context_parallel_attention; "
                         f"liteattn's context-parallel path needs diffusers>={lower},<{upper}")


class _ChunkForwardOp:
    """The ``forward_op`` that diffusers' context-parallel attention calls: once under Ulysses (every token, the
    rank's heads), once per K/V chunk under ring. One object per attention call, so the call count is the ring step.

    diffusers 0.42's ring (``TemplatedRingAttention``, ``TemplatedRingAnythingAttention``) all-gathers the K/V
    chunks and at step ``i`` of rank ``r`` computes chunk ``(r + i) % N`` (step 0 is the rank's own chunk, and the
    only call with ``_save_ctx=True``): that is the chunk index here, and the order is checked at each call.
    """

    def __init__(self, chunks: KVChunkAttention, own_chunk: int):
        self.chunks = chunks
        self.own_chunk = own_chunk
        self.calls = 0

    def __call__(self, ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        num_chunks = self.chunks.num_chunks
        if self.calls >= num_chunks or (num_chunks > 1 and bool(_save_ctx) != (self.calls == 0)):
            raise RuntimeError(f"liteattn: diffusers' ring attention called its attention op out of the order liteattn "
                               f"relies on (call {self.calls + 1} of {num_chunks}, _save_ctx={_save_ctx}); this "
                               f"diffusers version is not supported (tested: {DIFFUSERS_TESTED})")
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise ValueError("liteattn's context-parallel attention takes no mask, dropout, causal mask or GQA")
        chunk = (self.own_chunk + self.calls) % num_chunks
        self.calls += 1
        if not return_lse:
            return self.chunks(query, key, value, chunk, scale=scale)
        out, lse = self.chunks(query, key, value, chunk, scale=scale, return_softmax_lse=True)
        return out, lse.transpose(1, 2)  # diffusers' layout: (B, S, H)


def _no_backward(ctx, grad_out, *args, **kwargs):
    raise RuntimeError("liteattn's attention is inference only: it has no backward under context parallelism")


def context_parallel_attention(chunks: KVChunkAttention, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, parallel_config, scale: Optional[float] = None) -> torch.Tensor:
    """Attention of this rank's token slice under diffusers context parallelism, computed by liteattn.

    ``query``, ``key``, ``value``: ``(B, S_local, H, D)``, the slice a processor sees once diffusers' hooks have split
    the sequence. ``parallel_config``: the processor's ``_parallel_config``. ``chunks``: one LiteAttention per ring
    chunk (``ring_degree`` of them, index = the chunk's ring rank; one under Ulysses alone). Returns
    ``(B, S_local, H, Dv)`` in the input dtype. diffusers does the all-to-all (Ulysses), the K/V all-gather and the
    LSE merge (ring) through its ``_templated_context_parallel_attention``.
    """
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp = parallel_config.context_parallel_config
    if chunks.num_chunks != cp.ring_degree:
        raise ValueError(f"context_parallel_attention: {chunks.num_chunks} chunk attentions for ring_degree "
                         f"{cp.ring_degree}")
    heads = query.shape[2]
    if cp.ulysses_degree > 1 and not cp.ulysses_anything and heads % cp.ulysses_degree:
        raise ValueError(f"ulysses_degree={cp.ulysses_degree} must divide the {heads} attention heads (or set "
                         f"ContextParallelConfig(ulysses_anything=True))")
    forward_op = _ChunkForwardOp(chunks, cp._ring_local_rank if cp.ring_degree > 1 else 0)
    out = _templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, False, False,
                                                forward_op=forward_op, backward_op=_no_backward,
                                                _parallel_config=parallel_config)
    if forward_op.calls != chunks.num_chunks:
        raise RuntimeError(f"liteattn: diffusers' context-parallel attention visited {forward_op.calls} K/V chunks, "
                           f"expected {chunks.num_chunks}; this diffusers version is not supported (tested: "
                           f"{DIFFUSERS_TESTED})")
    return out
