"""Backend selection, in one place.

``torch``  : the vectorised PyTorch reference (any device).
``triton`` : the fused Triton kernel (CUDA; or the CPU under ``TRITON_INTERPRET=1``).

``backend=None`` picks Triton on CUDA when it is importable, else PyTorch; a fallback on a
CUDA device is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

logger = logging.getLogger("liteattn")

BACKENDS = ("torch", "triton")

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_TILES = (64, 128)


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, tile_q: int, tile_k: int) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None when it can."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Triton kernel takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"the Triton kernel supports head dims {SUPPORTED_HEAD_DIMS}, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if tile_q not in SUPPORTED_TILES or tile_k not in SUPPORTED_TILES:
        return f"the Triton kernel supports tile sizes {SUPPORTED_TILES}, got tile_q={tile_q}, tile_k={tile_k}"
    return None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the Triton kernel module imports (Triton installed, kernel present)."""
    try:
        from . import triton_kernel  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton too old for the kernel
        logger.debug("liteattn: Triton backend unavailable: %s", exc)
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _log_fallback_once(device_type: str, reason: str) -> None:
    logger.warning("liteattn: using the PyTorch backend on %s: %s", device_type, reason)


def resolve_backend(name, device: torch.device) -> str:
    """Return the backend name that will run on ``device``; raise ValueError for an impossible request."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic), got {name!r}")
    if name == "torch":
        return "torch"
    runnable = device.type == "cuda" or (device.type == "cpu" and interpreter_on())
    if name == "triton":
        if not triton_available():
            raise ValueError("backend='triton' was requested but the Triton kernel is not available "
                             "(is the 'triton' package installed?); use backend='torch' or None")
        if not runnable:
            raise ValueError(f"backend='triton' runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
                             f"got tensors on {device}")
        return "triton"
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _log_fallback_once("cuda", "the Triton kernel is not available")
    return "torch"
