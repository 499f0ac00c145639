"""Following the sampling loop from the transformer calls: which run, which denoising step, which guidance branch.

Pipelines call the transformer once per guidance branch at each timestep (diffusers' Wan and HunyuanVideo: the
conditional, then the unconditional prediction), then step their scheduler. The tracker turns each call into
``(new run?, step, branch)`` from one of two clocks:

- **scheduler** (``enable`` on a pipeline, or ``enable(..., scheduler=...)``): the step is the scheduler's own
  ``step_index``, a host integer that ``scheduler.step`` advances, and ``scheduler.set_timesteps`` (every pipeline
  call) starts a new run. Nothing is read from the device: no host sync per call.
- **timestep** (a bare transformer): the step changes when the ``timestep`` argument's value changes, and a timestep
  that goes back up starts a new run. Reading a CUDA timestep synchronises with the device once per call.

Calls within one step are the guidance branches, counted per transformer (Wan 2.2's two experts each count their
own). Forward hooks on the transformer call :meth:`SamplingTracker.observe`; they run eagerly, outside any compiled
graph.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch

logger = logging.getLogger("liteattn")

__all__ = ["Call", "SamplingTracker", "read_timestep"]


@dataclass(frozen=True)
class Call:
    """One transformer call as the tracker sees it."""

    new_run: bool  # this call starts a new sampling run (forget every skip decision)
    step: int  # denoising step within the run, from 0
    branch: int  # guidance branch within the step, from 0
    timestep: Union[float, torch.Tensor, None]  # a float, or a device tensor read only when stats are asked for


class SamplingTracker:
    """Run / step / branch of each transformer call (module docstring). ``scheduler``: the pipeline's, or None."""

    def __init__(self, scheduler=None):
        self.scheduler = scheduler if hasattr(scheduler, "step_index") else None
        self.run = 0  # sampling runs started
        self.step = -1  # current step of the current run
        self._clock: Any = None  # the value that identifies the current step
        self._calls: Dict[str, int] = {}  # transformer -> calls at the current step
        self._new_run_pending = True
        self._warned = False

    @property
    def clock(self) -> str:
        return "scheduler" if self.scheduler is not None else "timestep"

    def start_new_run(self) -> None:
        """The next call starts a new run (the pipeline's ``scheduler.set_timesteps``)."""
        self._new_run_pending = True

    def begin_run(self) -> None:
        """A new run starts now (``handle.reset()``); the next call is its step 0."""
        self.run += 1
        self.step = -1
        self._clock = None
        self._calls.clear()
        self._new_run_pending = False

    def observe(self, transformer: str, timestep) -> Call:
        """Account for one call of ``transformer`` with the ``timestep`` argument it got (tensor, number or None)."""
        if self.scheduler is not None:
            index = self.scheduler.step_index  # None until the first scheduler.step of a run
            clock = -1 if index is None else index
            went_back = self._clock is not None and clock < self._clock
            recorded = None if timestep is None else (timestep.detach() if isinstance(timestep, torch.Tensor)
                                                      else float(timestep))
        else:
            clock = read_timestep(timestep)
            if clock is None and not self._warned:
                self._warned = True
                logger.warning("liteattn: %s was called without a timestep; every call is taken as a new denoising "
                               "step of one guidance branch", transformer)
            went_back = clock is not None and self._clock is not None and clock > self._clock
            recorded = clock
        new_run = self._new_run_pending or went_back
        if new_run:
            self.begin_run()
        if clock is None or clock != self._clock:
            self.step += 1
            self._calls.clear()
        self._clock = clock
        branch = self._calls.get(transformer, 0)
        self._calls[transformer] = branch + 1
        return Call(new_run, self.step, branch, recorded)


def read_timestep(timestep) -> Optional[float]:
    """The timestep as a float (the largest entry of a tensor: per-token timesteps hold 0 on clean tokens)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max())
    return float(timestep)


def watch_scheduler(scheduler, on_set_timesteps: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_set_timesteps`` whenever ``scheduler.set_timesteps`` runs; returns the function that undoes it."""
    original = scheduler.set_timesteps

    @functools.wraps(original)  # keeps the signature, which retrieve_timesteps inspects
    def set_timesteps(*args, **kwargs):
        on_set_timesteps()
        return original(*args, **kwargs)

    had_instance_attr = "set_timesteps" in vars(scheduler)
    scheduler.set_timesteps = set_timesteps

    def restore():
        if vars(scheduler).get("set_timesteps") is set_timesteps:
            if had_instance_attr:
                scheduler.set_timesteps = original
            else:
                del scheduler.set_timesteps

    return restore
