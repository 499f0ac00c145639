"""``LiteAttention``: one attention layer's skip state, threshold and statistics.

API-compatible with the reference implementation (moonmath-ai/LiteAttention) so its users can
switch: construct one per attention layer, call it at every denoising step with
``(B, S, H, D)`` tensors, and it skips the tiles that the previous calls found negligible.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from . import backends
from .criteria import DEFAULT_CRITERION, check_criterion, check_threshold, needs_lse
from .ops import check_inputs, plan_call, run_plan
from .parallel import KVChunkAttention
from .skip import check_tile, fraction_skipped, normalize_ranges
from .state import SkipState

logger = logging.getLogger("liteattn")

_MINUS_INF = -math.inf
_MAX_PLANS = 16  # signatures a layer remembers (a run has one or two: warm-up and skipping)
_UNCACHEABLE = object()  # a range argument the plan cache does not key on (a tensor, a user type): validate each call

__all__ = ["LiteAttention", "SeqParallelLiteAttention"]


class LiteAttention:
    """Attention with temporal tile skipping for one layer.

    Args:
        enable_skipping: when False, every call is plain dense attention and the state is untouched.
        threshold: log2 units, ``<= 0`` (typical -3 ... -12), or ``-inf`` to keep every tile; a number or a
            one-element tensor.
        max_batch_size: largest batch accepted (as in the reference implementation).
        tile_q, tile_k: skip-tile sizes in tokens (multiples of 16; 64 or 128 on CUDA unless ``backend="torch"``).
        backend: ``"triton"``, ``"gluon"`` (Hopper), ``"torch"`` or ``None`` (automatic).
        criterion: the keep rule (:mod:`liteattn.criteria`), default ``"max"`` as in the reference; ``"mass"``
            keeps a tile on which some query row put more than ``2**threshold`` of its attention in the previous
            call.

    Calling it: ``attn(q, k, v)`` with ``q (B, S, H, D)``, ``k (B, Sk, H, D)``, ``v (B, Sk, H, Dv)`` returns
    ``(B, S, H, Dv)`` in the input dtype, or ``(out, lse)`` with ``lse (B, H, S)`` float32 when
    ``return_softmax_lse=True``.

    Under ``torch.compile`` the call is one custom op without graph breaks. The threshold is a 0-d device tensor
    updated in place and the skip state is updated in place, so neither a new threshold nor the next step
    recompiles. The first skipping call builds the state (in its graph, when compiled); the next call
    compiles the steady state.
    """

    def __init__(self, enable_skipping: bool = True, threshold: float = -10.0, max_batch_size: int = 4, *,
                 tile_q: int = 128, tile_k: int = 128, backend: Optional[str] = None,
                 criterion: str = DEFAULT_CRITERION):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        check_tile("tile_q", tile_q)
        check_tile("tile_k", tile_k)
        self.backend = backends.check_backend(backend)
        self.criterion = check_criterion(criterion)
        self.enable_skipping = bool(enable_skipping)
        self._threshold = check_threshold(threshold)
        self._threshold_tensor = torch.tensor(self._threshold, dtype=torch.float32)  # moves to the inputs' device
        self.max_batch_size = max_batch_size
        self.tile_q, self.tile_k = tile_q, tile_k
        self._state: Optional[SkipState] = None
        self.computed_tiles: Optional[torch.Tensor] = None
        self._plans: dict = {}  # call signature -> _Plans (validated once per signature; see __call__)

    # -- configuration -------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        if type(value) is float and value == self._threshold:  # the handle sets it per layer and call: no work
            return
        value = check_threshold(value)
        if value != self._threshold:
            self._threshold_tensor.fill_(value)  # in place: compiled graphs read the new value, no recompile
            self._threshold = value

    def set_threshold(self, threshold) -> None:
        """Set the skip threshold (log2 units, <= 0, or -inf): a number or a one-element tensor."""
        self.threshold = threshold

    def enable_skip_optimization(self, enable: bool = True) -> None:
        """Turn skipping on or off; off means plain dense attention. The skip state is kept either way."""
        self.enable_skipping = bool(enable)

    def reset_skip_state(self) -> None:
        """Forget every decision: the next call computes every tile (except must-skip ones)."""
        if self._state is not None:
            self._state.reset()
        self.computed_tiles = None
        self._plans.clear()  # a new run validates its first call again (once per run and layer)

    def free_skip_state(self) -> None:
        """Drop the skip state and its device memory; the next skipping call starts from a fresh one."""
        self._state = None
        self.computed_tiles = None
        self._plans.clear()

    # -- inspection ----------------------------------------------------------------------------
    @property
    def skip_state(self) -> Optional[SkipState]:
        """The :class:`SkipState` (None before the first call with skipping on)."""
        return self._state

    @property
    def num_tile_pairs(self) -> int:
        """(b, h, q-tile, k-tile) pairs of one call on the current state's shape (0 without a state)."""
        return math.prod(self._state.shape) if self._state is not None else 0

    @property
    def sparsity(self) -> float:
        """Fraction of (b, h, q-tile, k-tile) pairs not computed in the most recent call.

        0.0 before any call and after a dense call. Reading it synchronises with the device.
        ``computed_tiles``, the int32 ``(B, H, Mq)`` tile counts that call computed (None after a dense call), is
        the device tensor behind it.
        """
        if self.computed_tiles is None:
            return 0.0
        return fraction_skipped(self.computed_tiles.sum(), self.num_tile_pairs)

    def __repr__(self) -> str:
        return (f"LiteAttention(enable_skipping={self.enable_skipping}, threshold={self.threshold}, "
                f"max_batch_size={self.max_batch_size}, tile_q={self.tile_q}, tile_k={self.tile_k}, "
                f"backend={self.backend!r}, criterion={self.criterion!r}, "
                f"state={'none' if self._state is None else tuple(self._state.shape)})")

    # -- the call ------------------------------------------------------------------------------
    def _new_state(self, query, key, must_skip) -> SkipState:
        """A fresh state for these inputs. Under torch.compile it is traced into the first skipping call's graph
        (a graph break here would sit inside the model's loop over blocks, where dynamo gives up on the whole
        frame); the next call, guarded on the state's existence, compiles the steady-state graph."""
        B, Sq, H, _ = query.shape
        if self._state is not None and not torch.compiler.is_compiling():  # (a log call would break the graph)
            old = self._state
            before = dict(batch=old.batch, seq_q=old.seq_q, seq_k=old.seq_k, heads=old.heads, device=old.device,
                          must_skip=old.must_skip)
            after = dict(batch=B, seq_q=Sq, seq_k=key.shape[1], heads=H, device=query.device, must_skip=must_skip)
            changed = ", ".join(f"{name} {before[name]} -> {after[name]}" for name in before
                                if before[name] != after[name])
            logger.info("liteattn: re-initialising the skip state (%s)", changed)
        self._state = SkipState(B, H, Sq, key.shape[1], self.tile_q, self.tile_k, must_skip, query.device,
                                with_lse=needs_lse(self.criterion))
        self._threshold_tensor = torch.tensor(self._threshold, dtype=torch.float32, device=query.device)
        self.computed_tiles = None
        self._plans.clear()  # they hold the old state's tensors and threshold tensor
        return self._state

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float] = None,
                 return_softmax_lse: bool = False, must_do_list=None, must_skip_list=None, must_do_q_list=None):
        """``must_do_list`` / ``must_skip_list``: key-token ranges; ``must_do_q_list``: query-token ranges whose
        q-tiles never drop a tile (text rows of joint attention). All are half-open ``[(start, end), ...]``.

        Validation runs once per signature: the shapes, dtypes and devices of q, k, v, the scale, the ranges and this
        layer's settings. A call whose signature was validated before, with the same skip state, reuses that
        validation's plan (:func:`liteattn.ops.plan_call`) and costs a few µs of Python; any change (or a tensor
        subclass, tensor-valued ranges or scale, torch.compile) takes the fully validated path.
        """
        signature = None
        if not torch.compiler.is_compiling():
            signature = self._signature(query, key, value, scale, return_softmax_lse, must_do_list, must_skip_list,
                                        must_do_q_list)
            plans = self._plans.get(signature) if signature is not None else None
            if plans is not None and not self.enable_skipping:  # (the signature holds enable_skipping)
                self.computed_tiles = None
                return run_plan(query, key, value, plans.dense)
            if plans is not None and plans.state is self._state:
                plain = self._plain(plans.state, plans.must_skip)
                plan = plans.dense if plain else plans.skipping
                if plan is not None:
                    return self._run(query, key, value, plan, plans.state, plain)
        return self._validated_call(query, key, value, scale, return_softmax_lse, must_do_list, must_skip_list,
                                    must_do_q_list, signature)

    def _signature(self, query, key, value, scale, return_lse, must_do, must_skip, must_do_q) -> Optional[tuple]:
        """What a call's validation depends on, hashable; None when the call is not to be cached."""
        if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(value) is not torch.Tensor:
            return None  # not tensors (the validation names them), or subclasses: validated every call
        if not (scale is None or type(scale) is float or type(scale) is int) or type(return_lse) is not bool:
            return None
        ranges = (_frozen(must_do), _frozen(must_skip), _frozen(must_do_q))
        if _UNCACHEABLE in ranges:
            return None
        signature = (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
                     key.device, value.device, scale, return_lse, ranges, self.enable_skipping, self.max_batch_size,
                     self.backend, self.criterion, self.tile_q, self.tile_k)
        if self.backend == "triton":  # runs on the CPU only under the interpreter
            signature += (backends.interpreter_on(),)
        return signature

    def _validated_call(self, query, key, value, scale, return_softmax_lse, must_do_list, must_skip_list,
                        must_do_q_list, signature):
        check_inputs(query, key, value)
        if query.shape[0] > self.max_batch_size:
            raise ValueError(f"batch size {query.shape[0]} exceeds max_batch_size={self.max_batch_size}; "
                             f"construct LiteAttention(max_batch_size={query.shape[0]}) or larger")
        dense_args = dict(scale=scale, return_lse=return_softmax_lse, backend=self.backend, tile_q=self.tile_q,
                          tile_k=self.tile_k)
        if not self.enable_skipping:
            plan = plan_call(query, key, value, **dense_args)
            self._remember(signature, None, (), dense=plan)
            self.computed_tiles = None
            return run_plan(query, key, value, plan)
        B, Sq, H, _ = query.shape
        must_skip = normalize_ranges(must_skip_list, key.shape[1], "must_skip_list")
        state = self._state
        if state is None or not state.matches(B, H, Sq, key.shape[1], query.device, must_skip):
            state = self._new_state(query, key, must_skip)
        plain = not torch.compiler.is_compiling() and self._plain(state, bool(must_skip))
        if plain:
            plan = plan_call(query, key, value, **dense_args)
            self._remember(signature, state, must_skip, dense=plan)
        else:
            plan = plan_call(query, key, value, state=state, threshold=self._threshold_tensor,
                             criterion=self.criterion, scale=scale, must_do=must_do_list, must_do_q=must_do_q_list,
                             return_lse=return_softmax_lse, backend=self.backend)
            self._remember(signature, state, must_skip, skipping=plan)
        return self._run(query, key, value, plan, state, plain)

    def _plain(self, state: SkipState, must_skip: bool) -> bool:
        """Threshold -inf on a state no call has narrowed, without must-skip ranges: nothing can be dropped and
        nothing has been, so the call is plain attention, the fastest path there is (eager only: a compiled graph
        must not specialise on the threshold's value)."""
        return self._threshold == _MINUS_INF and state.untouched and not must_skip

    def _run(self, query, key, value, plan: tuple, state: SkipState, plain: bool):
        """Run a validated plan with skipping on; ``plain``: the dense plan of :meth:`_plain`."""
        if not plain and (torch.compiler.is_compiling() or self._threshold != _MINUS_INF):
            state.untouched = False
        result = run_plan(query, key, value, plan)
        self.computed_tiles = state.counts  # what this call computed, until this layer's next call
        return result

    def _remember(self, signature, state, must_skip, *, dense=None, skipping=None) -> None:
        """Keep a validated plan for later calls with this signature (eager mode only)."""
        if signature is None or torch.compiler.is_compiling():
            return
        plans = self._plans.get(signature)
        if plans is None or plans.state is not state:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plans = self._plans[signature] = _Plans(state, bool(must_skip))
        if dense is not None:
            plans.dense = dense
        if skipping is not None:
            plans.skipping = skipping


class _Plans:
    """A layer's validated plans for one call signature: ``dense`` (plain attention: skipping off, or -inf on an
    untouched state) and ``skipping`` (through ``state``), each made on first use."""

    __slots__ = ("state", "must_skip", "dense", "skipping")

    def __init__(self, state: Optional[SkipState], must_skip: bool):
        self.state = state  # the skip state the plans were made for (None with skipping off)
        self.must_skip = must_skip  # whether the signature has must-skip ranges (then -inf is not plain attention)
        self.dense = None
        self.skipping = None


def _frozen(ranges):
    """A hashable copy of a range argument as given (pairs or the flat form; normalised only when validated), or
    ``_UNCACHEABLE`` for anything but lists and tuples of Python ints (tensors could change in place)."""
    if ranges is None:
        return None
    if type(ranges) is not list and type(ranges) is not tuple:
        return _UNCACHEABLE
    frozen = []
    for item in ranges:
        if type(item) is int:
            frozen.append(item)
        elif (type(item) is tuple or type(item) is list) and all(type(x) is int for x in item):
            frozen.append(tuple(item))
        else:
            return _UNCACHEABLE
    return tuple(frozen)


class SeqParallelLiteAttention(KVChunkAttention):
    """One independent :class:`LiteAttention` per K/V split (sequence parallelism), the reference implementation's
    class. It is a :class:`liteattn.parallel.KVChunkAttention`, the code liteattn's diffusers context parallelism
    runs too (docs/DESIGN.md, section 8: what a decision means per K/V chunk).

    ``attn(q, k, v, split_idx)`` computes attention of ``q`` over the ``split_idx``-th K/V shard with that shard's
    own skip state; merge the shards' outputs with their LSEs (:func:`liteattn.merge_by_lse`, or :meth:`ring`).

    Under ``torch.distributed`` (``torchrun --nproc_per_node N``), each rank holding its chunk of the queries, keys
    and values ``(B, S/N, H, D)``, equal shapes on every rank::

        import torch.distributed as dist
        import liteattn
        from liteattn.parallel import ring_attention

        dist.init_process_group("nccl")
        attn = liteattn.SeqParallelLiteAttention(dist.get_world_size(), threshold=-6.0)  # one per layer
        out, lse = ring_attention(attn, q_chunk, k_chunk, v_chunk)  # every step; attn[c] serves rank c's K/V

        # ring_attention all-gathers K and V over the group, then does what you may do by hand with chunks you hold:
        rank, n = dist.get_rank(), dist.get_world_size()
        out = lse = None
        for step in range(n):
            c = (rank + step) % n
            o, l = attn(q_chunk, k_chunks[c], v_chunks[c], c, return_softmax_lse=True)
            out, lse = (o, l) if out is None else liteattn.merge_by_lse(out, lse, o, l)
    """

    _count_name = "num_nodes"

    def __init__(self, num_nodes: int, enable_skipping: bool = True, threshold: float = -10.0,
                 max_batch_size: int = 4, **kwargs):
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes <= 0:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        super().__init__([LiteAttention(enable_skipping, threshold, max_batch_size, **kwargs)
                          for _ in range(num_nodes)])
        self.num_nodes = num_nodes

    def __call__(self, query, key, value, split_idx: int, scale: Optional[float] = None,
                 return_softmax_lse: bool = False, must_do_list=None, must_skip_list=None, must_do_q_list=None):
        """As :meth:`LiteAttention.__call__`, on the ``split_idx``-th K/V shard: ``must_do_list`` and
        ``must_skip_list`` are ranges of this shard's key tokens, ``must_do_q_list`` of the query tokens."""
        if isinstance(split_idx, bool) or not isinstance(split_idx, int) or not 0 <= split_idx < self.num_nodes:
            raise ValueError(f"split_idx must be an int in [0, {self.num_nodes}), got {split_idx!r}")
        return super().__call__(query, key, value, split_idx, scale=scale, return_softmax_lse=return_softmax_lse,
                                must_do_list=must_do_list, must_skip_list=must_skip_list,
                                must_do_q_list=must_do_q_list)
