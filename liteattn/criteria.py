"""The keep rule (``criterion``) and its ``threshold``, as data the backends read.

A call with a write list decides, for every k-tile it computes, whether the next call computes it again
(docs/DESIGN.md section 4). *How* it decides is the criterion; each backend implements each criterion in one
small function (``torch_ref.max_rule_gain`` / ``mass_rule_gain`` and the Triton kernel's ``_keep``), selected by
name here:

- ``"max"`` (the reference implementation's rule, the default of ``LiteAttention``): keep tile j iff it raises some
  query row's running score maximum by more than ``threshold`` (log2 units).
- ``"mass"``: keep tile j iff some query row puts more than ``2**threshold`` of its attention on it, measured
  against that row's log-sum-exp in the previous call of the layer (kept in the ``SkipState``, rounded down by less
  than its q-tile's step: 1/8 of a log2 unit where the tile's LSEs lie within 22 nats, a power-of-two multiple
  beyond; rounding down can only keep more); ``-10`` drops a tile when no row puts more than 1/1024 of its attention
  on it. A row with no previous call measures against this call's running log-sum-exp, which can only overstate a
  tile's share, so the first call of a run keeps more than later ones. The first processed tile of each q-tile is
  always kept, as with ``"max"``, so no list runs empty.

The threshold reaches the kernels as a 0-d float32 tensor on the inputs' device, loaded at run time, so a new value
never recompiles anything (``torch.compile`` sees a tensor, not a constant). Values are checked once, on the
host, when they are set.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Dict

import torch

__all__ = ["CRITERIA", "DEFAULT_CRITERION", "check_criterion", "criterion_id", "needs_lse", "check_threshold",
           "threshold_tensor"]

# name -> the integer the Triton kernel takes as its CRITERION constexpr.
CRITERIA: Dict[str, int] = {"max": 0, "mass": 1}
DEFAULT_CRITERION = "max"
# Rules that measure against the previous call's log-sum-exp, which the skip state keeps for them.
_NEEDS_LSE = ("mass",)


def check_criterion(criterion) -> str:
    """``criterion`` if it names a keep rule, else ValueError listing the accepted names."""
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    return criterion


def criterion_id(criterion: str) -> int:
    """The kernel's constexpr for ``criterion``."""
    return CRITERIA[criterion]


def needs_lse(criterion: str) -> bool:
    """Whether ``criterion`` reads the previous call's log-sum-exp (``SkipState(with_lse=True)``)."""
    return criterion in _NEEDS_LSE


def check_threshold(threshold) -> float:
    """The skip threshold in log2 units as a float: a real number <= 0, -inf (keep every tile) or +inf (keep only
    what must be kept: the first processed tile of each q-tile and the must-do tiles, as the reference
    implementation's attribute allows).

    Accepts Python numbers and one-element tensors (read on the host: call it when the value is set, not per call).
    """
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1 or not (threshold.is_floating_point() or threshold.dtype == torch.int64):
            raise TypeError(f"a tensor threshold must hold one real number, got {threshold.dtype} "
                            f"of shape {tuple(threshold.shape)}")
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number <= 0 (log2 units) or -inf, got {threshold!r}")
    threshold = float(threshold)
    if math.isnan(threshold) or (threshold > 0 and threshold != math.inf):
        raise ValueError(f"threshold must be <= 0 (log2 units, typical -3 ... -12), -inf (keep everything) or +inf "
                         f"(keep only what must be kept), got {threshold}")
    return threshold


@functools.lru_cache(maxsize=64)
def _constant_threshold(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def threshold_tensor(threshold, device) -> torch.Tensor:
    """The 0-d float32 tensor on ``device`` that the kernels read.

    A float is checked and turned into a cached constant tensor (one per value and device: never written to). A
    tensor must already be 0-d float32 on ``device``; it is used as is, unchecked (whoever fills it checks its
    values, as :class:`liteattn.LiteAttention` does).
    """
    device = torch.device(device)
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() != 0 or threshold.dtype != torch.float32 or threshold.device != device:
            raise ValueError(f"a tensor threshold must be 0-d float32 on {device}, got {threshold.dtype} of shape "
                             f"{tuple(threshold.shape)} on {threshold.device}")
        return threshold
    if torch.compiler.is_compiling():  # a constant in the graph; the host check ran when it was set
        return torch.tensor(float(threshold), dtype=torch.float32, device=device)
    return _constant_threshold(check_threshold(threshold), device)
