"""Threshold schedules: one threshold per denoising step, from a float, a per-step list or a callable."""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from ..criteria import check_threshold

__all__ = ["Threshold", "ThresholdSchedule"]

Threshold = Union[float, Sequence[float], Callable[[int], float], torch.Tensor]


class ThresholdSchedule:
    """``schedule.at(step)`` -> the threshold (log2 units, <= 0, or -inf) for denoising step ``step``.

    Built from a float (every step), a list or tuple (one value per step; the last applies to later steps), a
    1-element or 1-D tensor (the same), or a callable ``step -> float`` (checked each time it is evaluated).
    """

    def __init__(self, threshold: Threshold):
        self.callable = None
        if callable(threshold):
            self.callable = threshold
            self.values = ()
        elif isinstance(threshold, torch.Tensor) and threshold.numel() > 1:
            self.values = tuple(check_threshold(t) for t in threshold.flatten().tolist())
        elif isinstance(threshold, (list, tuple)):
            if not threshold:
                raise ValueError("threshold list is empty; give one value per denoising step")
            self.values = tuple(check_threshold(t) for t in threshold)
        else:
            self.values = (check_threshold(threshold),)

    def at(self, step: int) -> float:
        if self.callable is not None:
            return check_threshold(self.callable(step))
        return self.values[min(step, len(self.values) - 1)]

    def __repr__(self) -> str:
        if self.callable is not None:
            return getattr(self.callable, "__name__", "callable")
        return repr(self.values[0]) if len(self.values) == 1 else repr(list(self.values))
