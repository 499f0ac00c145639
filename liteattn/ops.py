"""The stateless core: ``lite_attention(q, k, v, read=..., write=..., threshold=...)``.

It validates, resolves the backend and dispatches; the skip state lives elsewhere
(:class:`liteattn.SkipState`, or a :class:`liteattn.LiteAttention` per layer).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from . import backends
from .backends import torch_ref
from .criteria import DEFAULT_CRITERION, check_criterion, criterion_id, threshold_tensor
from .state import SkipState, bits_from_dense, decode_lse, dense_from_bits, encode_lse
from .skip import (SkipList, check_tile, compact_from_dense, dense_from_compact, normalize_ranges, num_tiles,
                   tiles_overlapping)

__all__ = ["lite_attention", "check_inputs", "plan_call", "run_plan"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q, k, v) -> None:
    """ValueError/TypeError naming what is wrong with q, k, v and what is accepted."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension must be positive")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    (B, _, H, D), (Bk, Sk, Hk, Dk), (Bv, Sv, Hv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv} (shapes are (B, S, H, D))")
    if not (H == Hk == Hv):
        raise ValueError(f"head counts differ: q {H}, k {Hk}, v {Hv} (shapes are (B, S, H, D))")
    if D != Dk:
        raise ValueError(f"q and k head dims differ: {D} vs {Dk}")
    if Sk != Sv:
        raise ValueError(f"k and v lengths differ: {Sk} vs {Sv}; they must have the same sequence length")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


# Whether a dispatch mode, a function mode or a functorch transform is active (private torch functions, stable for
# years; should one go missing, every call takes the custom op).
_WATCHERS = tuple(getattr(torch._C, name, lambda: True) for name in (
    "_len_torch_dispatch_stack", "_is_torch_function_mode_enabled", "_are_functorch_transforms_active"))
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)  # torch.jit.is_tracing without its wrapper


def _through_the_op(q, k, v) -> bool:
    """Whether this call must go through the custom op ``liteattn::attention_fwd`` rather than call the op's
    Python function (the same computation) directly. ``q``, ``k``, ``v`` have been validated (one device).

    Plain eager calls skip the dispatcher: PyTorch wraps a custom op's kernel in a guard that imports
    torch._dynamo on the op's first call in a process (about 1.5 s on a CPU), which an eager sampling loop does not
    need. The op is used whenever something watches or transforms the call: torch.compile, export, jit.trace,
    autograd (a backward must raise "no autograd formula"), autocast, functorch transforms (vmap, grad), dispatch
    and function modes (FakeTensorMode, make_fx, FlopCounterMode, ``with torch.device(...)``), tensor subclasses,
    and devices other than cpu and cuda (meta). It runs on every call (these are states of the caller, not of the
    inputs' shapes), so it reads only flags: about 1 us.
    """
    if torch.compiler.is_compiling() or _is_tracing():
        return True
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return True
    if q.is_cuda:
        device = "cuda"
    elif q.is_cpu:
        device = "cpu"
    else:
        return True
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return True
    return bool(torch.is_autocast_enabled(device) or _WATCHERS[0]() or _WATCHERS[1]() or _WATCHERS[2]())


_DIRECT = {}  # custom op name -> its Python function


def _plain_function(fn):
    """Keeps the custom op's Python function for direct eager calls (:func:`_through_the_op`)."""
    _DIRECT[fn.__name__] = fn
    return fn


def _check_list(name: str, lst, q, k, tile_q: int, tile_k: int) -> None:
    if not isinstance(lst, SkipList):
        raise TypeError(f"{name} must be a liteattn.SkipList (e.g. SkipState.read), got {type(lst).__name__}")
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    expected = (B, H, num_tiles(Sq, tile_q), num_tiles(Sk, tile_k))
    if tuple(lst.shape) != expected or lst.seq_q != Sq or lst.seq_k != Sk:
        raise ValueError(
            f"{name} was built for (B, H, Mq, Nk) = {tuple(lst.shape)}, seq_q={lst.seq_q}, seq_k={lst.seq_k}; "
            f"these inputs need {expected}, seq_q={Sq}, seq_k={Sk}"
        )
    if lst.device != q.device:
        raise ValueError(f"{name} is on {lst.device} but the inputs are on {q.device}")
    if not (lst.kv_indices.is_contiguous() and lst.kv_counts.is_contiguous()):
        raise ValueError(f"{name}.kv_indices and {name}.kv_counts must be contiguous (call .clone() on the list)")


@torch.library.custom_op("liteattn::attention_fwd",
                         mutates_args=("read_counts", "write_indices", "write_counts", "bits", "lse_state",
                                       "lse_codes", "lse_base", "lse_shift"))
@_plain_function
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    read_indices: Optional[torch.Tensor], read_counts: Optional[torch.Tensor],
    write_indices: Optional[torch.Tensor], write_counts: Optional[torch.Tensor],
    must_do_k: Optional[torch.Tensor], must_do_q: Optional[torch.Tensor],
    threshold: Optional[torch.Tensor], criterion: str, lse_state: Optional[torch.Tensor],
    bits: Optional[torch.Tensor], lse_codes: Optional[torch.Tensor], lse_base: Optional[torch.Tensor],
    lse_shift: Optional[torch.Tensor], scale: float, tile_q: int, tile_k: int, return_lse: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op torch.compile sees: inputs validated, backend chosen. lse is empty unless return_lse.

    ``threshold`` is a 0-d float32 tensor (read by the kernels at run time) whenever there is a write list;
    ``lse_state`` (B, H, Sq) float32 is read (the previous call's LSE) and overwritten with this call's.
    With ``bits`` (a SkipState's bitmask; ``read_indices`` and ``write_indices`` then None): the read list is
    expanded from it into a transient compact list and ``read_counts``, the kept tiles are flagged in transient
    flags and packed back into ``bits``. The transient buffers come from (and go back to) PyTorch's caching
    allocator, so consecutive layers reuse one block: no persistent workspace. With ``lse_codes``, ``lse_base`` and
    ``lse_shift`` (a SkipState's compressed LSE; ``lse_state`` then None) the previous LSE is decoded into a
    transient ``lse_state`` and this call's is encoded back into them (:func:`liteattn.state.encode_lse`).
    """
    if backend == "sdpa":  # plain attention (no lists, no decision, no LSE): PyTorch's fastest
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), scale=scale).transpose(1, 2)
        return out.contiguous(), q.new_empty(0, dtype=torch.float32)
    if lse_codes is not None:  # a transient float32 copy, rounded down: never above the exact previous LSE
        lse_state = decode_lse(lse_codes, lse_base, lse_shift, tile_q)
    if backend in ("triton", "gluon") and bits is not None:
        shape = (*bits.shape[:3], -(-k.shape[1] // tile_k))  # (B, H, Mq, Nk)
        read_indices = torch.empty(shape, dtype=torch.int32, device=q.device)
        write_indices = torch.empty(shape, dtype=torch.int32, device=q.device)
    if backend in ("triton", "gluon"):  # one contract, two kernels (liteattn/backends/__init__.py)
        if backend == "triton":
            from .backends.triton_launch import triton_attention as launch
        else:
            from .backends.gluon_launch import gluon_attention as launch

        out, lse = launch(q, k, v, read_indices, read_counts, write_indices, write_counts, must_do_k, must_do_q,
                          threshold, criterion_id(criterion), scale, tile_q, tile_k, return_lse, lse_state=lse_state,
                          bits=bits)
    else:
        nk = -(-k.shape[1] // tile_k)
        if bits is not None:
            read_dense = dense_from_bits(bits, nk)
            read_counts.copy_(read_dense.sum(-1, dtype=torch.int32))
        else:
            read_dense = None if read_indices is None else dense_from_compact(read_indices, read_counts)
        keep = None
        if bits is not None or write_indices is not None:
            keep = torch.empty((*q.shape[:1], q.shape[2], -(-q.shape[1] // tile_q), nk), dtype=torch.bool,
                               device=q.device)
        out, lse = torch_ref.attention_forward(q, k, v, read_dense, keep, threshold, criterion, scale, tile_q, tile_k,
                                               must_do_k, must_do_q, return_lse, lse_state)
        if bits is not None:
            bits.copy_(bits_from_dense(keep))
        elif keep is not None:
            compact_from_dense(keep, write_indices, write_counts)
    if lse_codes is not None:  # lse_state now holds this call's LSE
        encode_lse(lse_state, tile_q, lse_codes, lse_base, lse_shift)
    return out, (lse if lse is not None else q.new_empty(0, dtype=torch.float32))


_attention_fwd_direct = _DIRECT["_attention_fwd"]
_RETURN_LSE = -2  # where a plan (the op's arguments after q, k, v) holds return_lse


@_attention_fwd.register_fake
def _(q, k, v, read_indices, read_counts, write_indices, write_counts, must_do_k, must_do_q, threshold, criterion,
      lse_state, bits, lse_codes, lse_base, lse_shift, scale, tile_q, tile_k, return_lse, backend):
    B, Sq, H, _ = q.shape
    out = q.new_empty(B, Sq, H, v.shape[-1])
    lse = q.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32)
    return out, lse


def _resolve_tiles(read, write, tile_q, tile_k) -> Tuple[int, int]:
    lists = [x for x in (read, write) if isinstance(x, SkipList)]
    for lst in lists:
        for name, given, got in (("tile_q", tile_q, lst.tile_q), ("tile_k", tile_k, lst.tile_k)):
            if given is not None and given != got:
                raise ValueError(f"{name}={given} disagrees with the skip list's {name}={got}")
    if len(lists) == 2 and (lists[0].tile_q, lists[0].tile_k) != (lists[1].tile_q, lists[1].tile_k):
        raise ValueError("read and write lists use different tile sizes")
    if lists:
        return lists[0].tile_q, lists[0].tile_k
    tile_q = 128 if tile_q is None else tile_q
    tile_k = 128 if tile_k is None else tile_k
    return check_tile("tile_q", tile_q), check_tile("tile_k", tile_k)


def lite_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    read: Optional[SkipList] = None,
    write: Optional[SkipList] = None,
    state: Optional[SkipState] = None,
    threshold: Union[float, torch.Tensor] = -10.0,
    criterion: str = DEFAULT_CRITERION,
    lse_state: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    must_do=None,
    must_do_q=None,
    return_lse: bool = False,
    backend: Optional[str] = None,
    tile_q: Optional[int] = None,
    tile_k: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over the k-tiles of ``read``, filling ``write`` with the tiles that still matter; or, with
    ``state``, over the tiles the state marks, narrowing them down to those that still matter.

    The one validated entry point of the core; docs/DESIGN.md section 1 specifies what it computes. It is
    ``run_plan(q, k, v, plan_call(q, k, v, ...))``: :class:`liteattn.LiteAttention` runs the same validation,
    :func:`plan_call`, once per call signature and keeps its plan.

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Sk, H, D)``; v: ``(B, Sk, H, Dv)``; fp16, bf16, fp32 (fp64 on the
            PyTorch backend), one device.
        read: the :class:`SkipList` to compute; ``None`` computes every tile (dense attention).
        write: the :class:`SkipList` to fill with the kept tiles of ``read``; ``None`` decides nothing.
        state: a :class:`liteattn.SkipState` instead of ``read`` and ``write``: the call reads the tiles it marks
            and leaves it marking the tiles kept (and, for the mass rule, holding this call's LSE, rounded down to
            8 bits per row and a step per q-tile: ``state.lse``).
        threshold: log2 units, ``<= 0``; ``-inf`` keeps everything. A float, or a 0-d float32 tensor on the
            inputs' device that the kernel reads at run time (its value is not checked here).
        criterion: the keep rule (:mod:`liteattn.criteria`): ``"max"`` keeps a tile that raises some row's
            running max by more than ``threshold``; ``"mass"`` one on which some row puts more than
            ``2**threshold`` of its attention.
        lse_state: float32 ``(B, H, Sq)`` on the inputs' device, or None: the previous call's log-sum-exp, which
            the ``"mass"`` rule measures against (NaN rows: this call's running one), overwritten with this call's
            (a :class:`liteattn.SkipState` keeps it between calls, compressed).
        scale: softmax scale, default ``1/sqrt(D)``.
        must_do: key-token ranges ``[(start, end), ...]`` (or flat ``[a0, b0, ...]``) whose k-tiles are
            never dropped.
        must_do_q: query-token ranges whose q-tiles never drop a tile (e.g. text rows in joint attention).
        return_lse: also return the log-sum-exp ``(B, H, Sq)`` float32 (natural log).
        backend: ``"triton"``, ``"gluon"`` (Hopper), ``"torch"`` or ``None`` (automatic;
            :func:`liteattn.backends.choose`).
        tile_q, tile_k: tile sizes when no list is given (default 128); must match the lists otherwise.

    Returns:
        ``out (B, Sq, H, Dv)`` in the input dtype, or ``(out, lse)``.
    """
    return run_plan(q, k, v, plan_call(q, k, v, read=read, write=write, state=state, threshold=threshold,
                                       criterion=criterion, lse_state=lse_state, scale=scale, must_do=must_do,
                                       must_do_q=must_do_q, return_lse=return_lse, backend=backend, tile_q=tile_q,
                                       tile_k=tile_k))


def plan_call(q, k, v, *, read=None, write=None, state=None, threshold=-10.0, criterion=DEFAULT_CRITERION,
              lse_state=None, scale=None, must_do=None, must_do_q=None, return_lse=False, backend=None, tile_q=None,
              tile_k=None) -> tuple:
    """Everything :func:`lite_attention` does before computing: validate the arguments (ValueError/TypeError as
    documented there), resolve the backend, turn the ranges into tile tensors. Returns the plan, an opaque tuple
    that :func:`run_plan` runs on these ``q``, ``k``, ``v``, or on any later tensors of the same shapes, dtypes and
    devices: a caller that checks that (``LiteAttention`` keys its plans on it) validates once per shape, not per
    call. The plan holds no reference to ``q``, ``k``, ``v``; it holds the lists' and the state's tensors, the
    threshold tensor and the must-do tile tensors, which the calls read and update in place.
    """
    check_inputs(q, k, v)
    criterion = check_criterion(criterion)
    scale = _check_scale(scale, q.shape[-1])
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    if state is not None:
        _check_state(state, q, k, read, write, lse_state, tile_q, tile_k)
        tile_q, tile_k = state.tile_q, state.tile_k
    else:
        tile_q, tile_k = _resolve_tiles(read, write, tile_q, tile_k)
    for name, lst in (("read", read), ("write", write)):
        if lst is not None:
            _check_list(name, lst, q, k, tile_q, tile_k)
    # (data_ptr is opaque to torch.compile; the check runs in eager mode.)
    if (read is not None and write is not None and not torch.compiler.is_compiling() and q.device.type != "meta"
            and read.kv_indices.data_ptr() == write.kv_indices.data_ptr()):
        raise ValueError("read and write must be different buffers")
    threshold = threshold_tensor(threshold, q.device)  # a float is checked here
    if lse_state is not None:
        _check_lse_state(lse_state, q)
    must_do_k_tiles = _tiles_or_none(normalize_ranges(must_do, Sk, "must_do"), Sk, tile_k, q.device)
    must_do_q_tiles = _tiles_or_none(normalize_ranges(must_do_q, Sq, "must_do_q"), Sq, tile_q, q.device)
    plain = read is None and write is None and state is None and not return_lse and lse_state is None
    name = backends.choose(backend, q, v, tile_q, tile_k, plain=plain)
    if state is not None:  # expanded into a transient list, flagged in transient flags, packed back into the bits
        lists = (None, state.counts, None, None)
    else:
        lists = (None if read is None else read.kv_indices, None if read is None else read.kv_counts,
                 None if write is None else write.kv_indices, None if write is None else write.kv_counts)
    decides = write is not None or state is not None
    return (*lists, must_do_k_tiles, must_do_q_tiles, threshold if decides else None, criterion, lse_state,
            None if state is None else state.bits, None if state is None else state.lse_codes,
            None if state is None else state.lse_base, None if state is None else state.lse_shift, scale, tile_q,
            tile_k, bool(return_lse), name)


def run_plan(q, k, v, plan: tuple):
    """Run a :func:`plan_call` plan on ``q``, ``k``, ``v`` (of the shapes, dtypes and devices it was made for):
    ``out``, or ``(out, lse)`` when the plan returns the LSE. Through the custom op when something watches the call
    (:func:`_through_the_op`), else its function directly."""
    op = torch.ops.liteattn.attention_fwd if _through_the_op(q, k, v) else _attention_fwd_direct
    out, lse = op(q, k, v, *plan)
    return (out, lse) if plan[_RETURN_LSE] else out


def _check_state(state, q, k, read, write, lse_state, tile_q, tile_k) -> None:
    if not isinstance(state, SkipState):
        raise TypeError(f"state must be a liteattn.SkipState, got {type(state).__name__}")
    if read is not None or write is not None or lse_state is not None:
        raise ValueError("give either state or read/write/lse_state: the state holds its own lists and LSE")
    for name, given, got in (("tile_q", tile_q, state.tile_q), ("tile_k", tile_k, state.tile_k)):
        if given is not None and given != got:
            raise ValueError(f"{name}={given} disagrees with the state's {name}={got}")
    B, Sq, H, _ = q.shape
    built = (state.batch, state.heads, state.seq_q, state.seq_k)
    if built != (B, H, Sq, k.shape[1]):
        raise ValueError(f"the state was built for (B, H, Sq, Sk) = {built}; these inputs are {(B, H, Sq, k.shape[1])}")
    if state.device != q.device:
        raise ValueError(f"the state is on {state.device} but the inputs are on {q.device}")


def _check_lse_state(lse_state, q) -> None:
    B, Sq, H, _ = q.shape
    if not isinstance(lse_state, torch.Tensor):
        raise TypeError(f"lse_state must be a float32 tensor (B, H, Sq) or None, got {type(lse_state).__name__}")
    if (lse_state.shape != (B, H, Sq) or lse_state.dtype != torch.float32 or lse_state.device != q.device
            or not lse_state.is_contiguous()):
        raise ValueError(f"lse_state must be a contiguous float32 (B, H, Sq) = {(B, H, Sq)} tensor on {q.device}, "
                         f"got {lse_state.dtype} {tuple(lse_state.shape)} on {lse_state.device}")


def _tiles_or_none(ranges, length: int, tile: int, device) -> Optional[torch.Tensor]:
    return tiles_overlapping(ranges, length, tile, device) if ranges else None
