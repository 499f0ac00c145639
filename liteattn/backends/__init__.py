"""Backends, and the choice between them, in one place.

``torch``  : the vectorised PyTorch reference (any device, any float dtype, any tile multiple of 16).
``triton`` : the fused Triton kernel (CUDA; or the CPU under ``TRITON_INTERPRET=1``): fp16/bf16, head dims
             16/32/64/128, tiles of 64 or 128. The portable kernel.
``gluon``  : kernel v2 for Hopper (sm_90: H100, H200) in Gluon (``gluon_hopper.py``, ``gluon_launch.py``): the
             same contract, FlashAttention-3's structure; fp16/bf16, D = Dv in {64, 128}, tiles of 128.

:func:`choose` turns a request (``"torch"``, ``"triton"`` or ``None`` = automatic) into the backend that runs:

- an explicit request that cannot run raises ValueError naming why;
- automatic on a Hopper GPU runs ``gluon`` when it can take the inputs (else ``triton``, silently: same results,
  slower); pass ``backend="triton"`` to run the portable kernel there;
- automatic on other CUDA GPUs runs Triton; when the kernel cannot take the inputs (Triton missing, a dtype or head dim it
  does not support) it falls back to the PyTorch reference, with a WARNING that says why, logged once per cause.
  Tile sizes are the caller's choice, so a tile the kernel cannot run is refused (ValueError), never quietly
  computed by the O(S^2)-memory reference;
- automatic elsewhere runs the PyTorch reference (no GPU or no Triton is not an error there);
- automatic for a call that reads every tile, decides nothing and needs no LSE (skipping off, warm-up steps) runs
  ``sdpa``, PyTorch's ``scaled_dot_product_attention`` (cuDNN / FlashAttention on CUDA): such a call is plain
  attention, and never slower than what the model ran before liteattn.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("liteattn")

__all__ = ["BACKENDS", "SUPPORTED_HEAD_DIMS", "SUPPORTED_TILES", "choose", "check_backend", "triton_available",
           "triton_import_error", "kernel_tile_error", "interpreter_on", "gluon_available", "gluon_import_error",
           "gluon_input_error"]

BACKENDS = ("torch", "triton", "gluon")

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_TILES = (64, 128)


def check_backend(name) -> Optional[str]:
    """``name`` if it is a backend name or None (automatic), else ValueError."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic), got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    """Why the Triton kernel module does not import (``"ModuleNotFoundError: ..."``), or None when it does."""
    try:
        from . import triton_kernel  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton too old for the kernel
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True when the Triton kernel module imports (Triton installed, kernel present)."""
    return triton_import_error() is None


@functools.lru_cache(maxsize=None)
def gluon_import_error() -> Optional[str]:
    """Why the Hopper kernel's launcher does not import (no Gluon in this Triton, ...), or None when it does."""
    try:
        from . import gluon_launch  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def gluon_available(device) -> bool:
    """True when the Hopper kernel can run on ``device``: a CUDA sm_90 GPU (H100, H200), Gluon importable, the
    interpreter off."""
    device = torch.device(device)
    if device.type != "cuda" or interpreter_on() or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9 and gluon_import_error() is None


def gluon_input_error(q: torch.Tensor, v: torch.Tensor, tile_q: int, tile_k: int) -> Optional[str]:
    """Why the Hopper kernel cannot take these inputs and tiles, or None."""
    if (tile_q, tile_k) != (128, 128):
        return f"the Hopper kernel takes tiles of 128, got tile_q={tile_q}, tile_k={tile_k}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Hopper kernel takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in (64, 128) or v.shape[-1] != q.shape[-1]:
        return f"the Hopper kernel takes D = Dv in (64, 128), got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_tile_error(tile_q: int, tile_k: int) -> Optional[str]:
    """Why the kernel cannot run these tile sizes, or None."""
    if tile_q not in SUPPORTED_TILES or tile_k not in SUPPORTED_TILES:
        return f"the Triton kernel takes tiles of {SUPPORTED_TILES} tokens, got tile_q={tile_q}, tile_k={tile_k}"
    return None


def _input_error(q: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Triton kernel takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"the Triton kernel takes head dims {SUPPORTED_HEAD_DIMS}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    return None


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(reason: str) -> None:
    logger.warning("liteattn: running the PyTorch reference backend on CUDA (O(S^2) memory, much slower than the "
                   "kernel) because %s", reason)


def choose(requested: Optional[str], q: torch.Tensor, v: torch.Tensor, tile_q: int, tile_k: int,
           plain: bool = False) -> str:
    """The backend that runs these inputs: ``"torch"``, ``"triton"``, ``"gluon"`` or ``"sdpa"`` (module docstring). ``plain``:
    the call reads every tile, decides nothing and returns no LSE."""
    check_backend(requested)
    if requested == "torch":
        return "torch"
    if requested is None and plain:
        return "sdpa"
    device = q.device
    runnable = device.type == "cuda" or (device.type == "cpu" and interpreter_on())
    if requested == "gluon":
        if gluon_import_error() is not None:
            raise ValueError(f"backend='gluon' was requested but its launcher does not import "
                             f"({gluon_import_error()}); use backend='triton', 'torch' or None")
        if not gluon_available(device):
            raise ValueError(f"backend='gluon' runs on Hopper (sm_90) CUDA GPUs with Triton's interpreter off, got "
                             f"tensors on {device}; use backend='triton', 'torch' or None")
        reason = gluon_input_error(q, v, tile_q, tile_k)
        if reason is not None:
            raise ValueError(f"backend='gluon': {reason}; use backend='triton' or None")
        return "gluon"
    if requested == "triton":
        if not triton_available():
            raise ValueError(f"backend='triton' was requested but the Triton kernel does not import "
                             f"({triton_import_error()}); use backend='torch' or None")
        if not runnable:
            raise ValueError(f"backend='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
                             f"got tensors on {device}")
        reason = kernel_tile_error(tile_q, tile_k) or _input_error(q, v)
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}; use backend='torch' or None")
        return "triton"
    if device.type != "cuda":
        return "torch"
    reason = kernel_tile_error(tile_q, tile_k)
    if reason is not None:
        raise ValueError(f"{reason} on CUDA; choose tiles of 64 or 128, or pass backend='torch' to run the "
                         f"PyTorch reference (slow, O(S^2) memory) with these tiles")
    if not triton_available():
        _warn_fallback_once(f"the Triton kernel does not import ({triton_import_error()})")
        return "torch"
    reason = _input_error(q, v)
    if reason is not None:
        _warn_fallback_once(reason)
        return "torch"
    if gluon_available(device) and gluon_input_error(q, v, tile_q, tile_k) is None:
        return "gluon"
    return "triton"
