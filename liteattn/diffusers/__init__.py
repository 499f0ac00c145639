"""One line for diffusers video pipelines: ``liteattn.enable(pipe)``.

    import torch, liteattn
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    handle = liteattn.enable(pipe, threshold=-10)   # mass rule: drop tiles under 1/1024 of every row's attention
    video = pipe("a cat surfing a wave", num_frames=81).frames[0]
    handle.stats()["sparsity"]        # fraction of tiles skipped, per denoising step
    handle.disable()                  # the original attention processors, exactly

``enable`` swaps the attention processor of every *video self-attention* of the supported transformers for one
that reproduces the original computation but routes the video-to-video attention through a
:class:`liteattn.LiteAttention` (one per layer and per guidance branch). Cross-attention keeps its processor. In
joint attention (HunyuanVideo: text after video; CogVideoX: text before video) text query rows and text key columns
are never skipped (:mod:`liteattn.joint`).

The package, one concern per file:

- ``registry.py``: the model families and which of their layers to patch; ``models/``: one file per family (its
  processor and its registration); ``processor.py``: what the processors share;
- ``tracker.py``: run / step / branch of each transformer call, from the scheduler or the timestep;
- ``schedule.py``: per-step thresholds; ``stats.py``: statistics and the plot; ``handle.py``: the handle.

diffusers is an optional dependency (``pip install liteattn[diffusers]``); it is imported only when ``enable`` is
called.
"""

from __future__ import annotations

import inspect
import logging
import numbers
from typing import Iterable, Optional, Union

import torch

from .. import backends
from ..calibrate import Profile, check_target_error
from ..criteria import check_criterion
from ..skip import check_tile
from .handle import LiteAttentionHandle
from .registry import find_transformers, layers_to_patch, supported_transformers
from .schedule import Threshold

logger = logging.getLogger("liteattn")

__all__ = ["enable", "LiteAttentionHandle", "supported_transformers"]

_MIN_DIFFUSERS = "0.42"
# enable()'s keep rule (LiteAttention keeps the reference's "max"): on the demo model the mass rule skips 1.44-1.67x
# the max rule's tiles at equal PSNR (30-50 dB, tiles 128 and 64; bench/RESULTS.md, "Keep rules and calibration"),
# and at its default -10 it gives 41.5 dB mean PSNR at 4.3 % sparsity where max -10 skips 0.7 %.
ENABLE_CRITERION = "mass"


def _require_diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(
            f"liteattn.enable needs diffusers >= {_MIN_DIFFUSERS}: pip install liteattn[diffusers]"
        ) from exc
    from packaging.version import Version

    if Version(Version(diffusers.__version__).base_version) < Version(_MIN_DIFFUSERS):
        raise ImportError(
            f"liteattn.enable needs diffusers >= {_MIN_DIFFUSERS}, found {diffusers.__version__}: "
            f"pip install -U liteattn[diffusers]"
        )
    return diffusers


def enable(pipe_or_transformer, threshold: Optional[Threshold] = None, *, warmup_steps: int = 0, tile_q: int = 128,
           tile_k: int = 128, layers: Optional[Iterable[Union[int, str]]] = None, joint_text: Optional[str] = None,
           criterion: Optional[str] = None, backend: Optional[str] = None, scheduler=None,
           target_error: Optional[float] = None, refresh: bool = False, profile=None,
           measure_error: bool = False) -> LiteAttentionHandle:
    """Run the video self-attention of a diffusers video pipeline (or transformer) with LiteAttention.

    Args:
        pipe_or_transformer: a pipeline whose ``transformer`` (and ``transformer_2``, Wan 2.2) is a supported
            transformer (:func:`supported_transformers`), or such a transformer itself. Enable before
            ``torch.compile``.
        threshold: skip threshold in log2 units (<= 0; -inf skips nothing): a float, a list with one value per
            denoising step (the last value applies to later steps), or a callable(step_index) -> float. Lower
            (more negative) skips less. Default -10.
        warmup_steps: the first ``warmup_steps`` denoising steps of each run are computed densely and mark nothing.
        tile_q, tile_k: skip-tile sizes in tokens (multiples of 16; 64 or 128 on CUDA unless ``backend="torch"``).
        layers: which video self-attention layers to patch, as indices in block order (negative counts from the
            end) or module names (``"blocks.0.attn1"``); ``None`` patches all of them.
        joint_text: how models with text tokens in their self-attention keep them dense: ``"must_do"`` (one call,
            text a must-do range) or ``"split"`` (merged by log-sum-exp); ``None`` takes each family's default.
        criterion: the keep rule (:mod:`liteattn.criteria`); default ``"mass"`` (measured: ``ENABLE_CRITERION``),
            or the profile's.
        target_error: calibrate instead of a fixed threshold: during the next run each layer call takes the
            largest threshold whose attention output stays within this relative L2 error of dense attention
            (:mod:`liteattn.calibrate`); then ``handle.save_profile(path)``. The calibration run is slower (one
            extra dense pass per call) and runs eagerly.
        refresh: with ``target_error``, let a layer whose list has drifted past the budget read every tile again
            (re-admission; recorded in the profile).
        profile: a saved profile (path, dict or :class:`liteattn.calibrate.Profile`): per-layer, per-step
            thresholds from a calibration run of this pipeline; excludes ``threshold`` and ``target_error``.
        measure_error: record each layer call's attention error against dense (one extra dense pass per call),
            for any threshold or profile: ``handle.calibration_summary()`` then reports it.
        backend: ``"triton"``, ``"gluon"`` (Hopper), ``"torch"`` or ``None`` (automatic).
        scheduler: for a bare transformer, the scheduler of your sampling loop: steps are then read from it, with
            no host sync per call (a pipeline's own scheduler is used by itself).

    Returns:
        A :class:`LiteAttentionHandle` (``disable()``, ``reset()``, ``set_threshold()``, ``stats()``, ``plot()``).
    """
    diffusers = _require_diffusers()
    given = [name for name, value in (("threshold", threshold), ("target_error", target_error),
                                      ("profile", profile)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one of threshold, target_error and profile, not {' and '.join(given)}")
    if refresh and target_error is None:
        raise ValueError("refresh=True takes effect during calibration: pass target_error too (a profile "
                         "carries its own refresh steps)")
    calibration = None
    if target_error is not None:
        calibration = dict(target=check_target_error(target_error), refresh=bool(refresh))
    elif measure_error:
        calibration = dict(target=None, choose=False)
    if profile is not None:
        profile = Profile.load(profile)
        criterion = profile.criterion if criterion is None else criterion
    criterion = ENABLE_CRITERION if criterion is None else criterion
    threshold = -10.0 if threshold is None else threshold
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    check_tile("tile_q", tile_q)
    check_tile("tile_k", tile_k)
    backends.check_backend(backend)
    check_criterion(criterion)
    if joint_text is not None and not isinstance(joint_text, str):
        raise TypeError(f"joint_text must be 'must_do', 'split' or None, got {joint_text!r}")
    found = find_transformers(pipe_or_transformer, diffusers)
    plans = []
    for name, module, family in found:
        if getattr(module, "_liteattn_handle", None) is not None:
            raise ValueError(f"liteattn is already enabled on {name}; call handle.disable() first")
        _check_tiles_for_device(module, tile_q, tile_k, backend)
        plans.append((name, module, family, layers_to_patch(family, name, module, layers),
                      family.check_joint_text(joint_text)))
    if scheduler is None and not isinstance(pipe_or_transformer, torch.nn.Module):
        scheduler = getattr(pipe_or_transformer, "scheduler", None)
    handle = LiteAttentionHandle(threshold, warmup_steps=int(warmup_steps), tile_q=tile_q, tile_k=tile_k,
                                 backend=backend, criterion=criterion, scheduler=scheduler, profile=profile,
                                 calibration=calibration)
    for name, module, family, chosen, strategy in plans:
        handle._patch(name, module, family, chosen, strategy, _timestep_position(module))
    if profile is not None:
        try:
            profile.check_matches(handle.layers, criterion=criterion, tile_q=tile_q, tile_k=tile_k)
        except ValueError:
            handle.disable()
            raise
    logger.info("liteattn: enabled on %s", handle)
    return handle


def _check_tiles_for_device(module, tile_q: int, tile_k: int, backend: Optional[str]) -> None:
    """On CUDA the kernel runs; refuse tiles it cannot take now rather than at the first call."""
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.is_cuda and backend != "torch":
        error = backends.kernel_tile_error(tile_q, tile_k)
        if error is not None:
            raise ValueError(f"{error}, and {type(module).__name__} is on CUDA; choose tiles of 64 or 128, or "
                             f"backend='torch' to run the PyTorch reference (slow, O(S^2) memory)")


def _timestep_position(module) -> Optional[int]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names.index("timestep") if "timestep" in names else None
