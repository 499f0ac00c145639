"""The handle :func:`liteattn.enable` returns: it patches the processors, and at each transformer call gives every
patched layer the LiteAttention of the current guidance branch with the step's threshold."""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, List, Optional

import torch

from ..calibrate import CalibratingAttention, Profile
from ..module import LiteAttention
from .processor import LiteProcessor
from .registry import ModelFamily
from .schedule import Threshold, ThresholdSchedule
from .stats import RunRecorder, plot_calibration, plot_stats
from .tracker import SamplingTracker, watch_scheduler

logger = logging.getLogger("liteattn")

__all__ = ["LiteAttentionHandle"]


class _Layer:
    """One patched attention module: its liteattn processor, and one LiteAttention per guidance branch."""

    def __init__(self, qualified_name: str, module, processor: LiteProcessor):
        self.qualified_name = qualified_name  # "transformer.blocks.0.attn1"
        self.module = module
        self.processor = processor
        self.attentions: List[LiteAttention] = []  # index = guidance branch
        self.calibrators: List[CalibratingAttention] = []  # index = guidance branch, while calibrating


class _Transformer:
    def __init__(self, name: str, module, family: ModelFamily, timestep_index: Optional[int]):
        self.name = name
        self.module = module
        self.family = family
        self.timestep_index = timestep_index  # position of `timestep` among forward's positional args
        self.layers: List[_Layer] = []
        self.hooks: list = []


class LiteAttentionHandle:
    """What :func:`liteattn.enable` returns: controls and statistics of liteattn on one pipeline or transformer.

    Methods:
        disable(): put the original processors back (the same objects), remove the hooks, free every skip state.
        reset(): forget every skip decision; the next transformer call starts a new sampling run.
        set_threshold(threshold): float, per-step list, or callable(step_index) -> float (log2 units, <= 0).
        stats(): sparsity per denoising step, per layer and per guidance branch of the latest run (plain Python).
        plot(path): a PNG of sparsity per step.
        After a calibration run (``enable(..., target_error=...)``): profile(), save_profile(path),
        calibration_summary(), plot_calibration(path).

    Also a context manager: ``with liteattn.enable(pipe) as handle: ...`` disables on exit.
    """

    def __init__(self, threshold: Threshold, *, warmup_steps: int, tile_q: int, tile_k: int,
                 backend: Optional[str], criterion: str, scheduler=None, profile: Optional[Profile] = None,
                 calibration: Optional[dict] = None):
        self._schedule = ThresholdSchedule(threshold)
        self._profile = profile  # per-layer thresholds to run with (enable(profile=...)), or None
        self._calibration = calibration  # CalibratingAttention's options while calibrating, or None
        self._progress = None
        self.warmup_steps = warmup_steps
        self.tile_q, self.tile_k = tile_q, tile_k
        self.backend, self.criterion = backend, criterion
        self.tracker = SamplingTracker(scheduler)
        self._recorder = RunRecorder()
        self._transformers: List[_Transformer] = []
        self._restore: List[Callable[[], None]] = []
        self._current: dict = {}  # the call in flight: step, branch, timestep, threshold, warmup
        self.enabled = True
        if self.tracker.scheduler is not None:
            self._restore.append(watch_scheduler(scheduler, self.tracker.start_new_run))

    # -- wiring (enable) ---------------------------------------------------------------------------------------
    def _patch(self, name: str, module, family: ModelFamily, layers, joint_text: Optional[str],
               timestep_index: Optional[int]) -> None:
        transformer = _Transformer(name, module, family, timestep_index)
        for layer_name, submodule in layers:
            processor = family.processor(submodule.processor, joint_text)
            transformer.layers.append(_Layer(f"{name}.{layer_name}", submodule, processor))
            submodule.set_processor(processor)
        hooks = (module.register_forward_pre_hook(_eager(functools.partial(_pre_hook, self, transformer)),
                                                  with_kwargs=True),
                 module.register_forward_hook(_eager(functools.partial(_post_hook, self, transformer))))
        transformer.hooks.extend(hooks)
        module._liteattn_handle = self
        self._transformers.append(transformer)

    # -- public API --------------------------------------------------------------------------------------------
    @property
    def layers(self) -> List[str]:
        """Qualified names (``transformer.blocks.0.attn1``) of the patched attention modules."""
        return [layer.qualified_name for t in self._transformers for layer in t.layers]

    @property
    def run(self) -> int:
        """Sampling runs started so far."""
        return self.tracker.run

    @property
    def step(self) -> int:
        """Index of the current denoising step in the current run (-1 before the first call)."""
        return self.tracker.step

    def disable(self) -> None:
        """Restore the original processors (the very objects), remove every hook and free every skip state;
        idempotent."""
        if not self.enabled:
            return
        for transformer in self._transformers:
            for hook in transformer.hooks:
                hook.remove()
            for layer in transformer.layers:
                layer.module.set_processor(layer.processor.original)
                layer.processor.attention = None
                layer.attentions.clear()  # the skip lists go with them
                layer.calibrators.clear()
            if getattr(transformer.module, "_liteattn_handle", None) is self:
                del transformer.module._liteattn_handle
        for restore in reversed(self._restore):
            restore()
        self._recorder.clear()
        self._close_progress()
        self.enabled = False

    def reset(self) -> None:
        """Forget every skip decision and statistic now; the next transformer call is step 0 of a new run."""
        self._start_run()
        self.tracker.begin_run()

    def set_threshold(self, threshold: Threshold) -> None:
        """New threshold (log2 units, <= 0, or -inf): a float, one value per step, or callable(step_index) -> float.

        Takes effect from the next transformer call; the skip lists already marked stay as they are. On a handle
        running a profile or calibrating, this ends that: every layer takes this threshold.
        """
        self._schedule = ThresholdSchedule(threshold)
        self._profile = self._calibration = None
        self._close_progress()

    def threshold_at(self, step: int) -> float:
        """The threshold the schedule gives for ``step`` (a list's last value applies to later steps)."""
        return self._schedule.at(step)

    def stats(self) -> dict:
        """Sparsity of the latest sampling run, as plain Python data (reading it synchronises with the device).

        Sparsity is the fraction of (batch, head, q-tile, k-tile) pairs of the video self-attention not computed.
        Returns a dict with:
            ``steps``: one dict per denoising step: ``step``, ``timestep``, ``threshold``, ``warmup`` (bool),
                ``transformers`` (which ran: Wan 2.2's experts take turns),
                ``sparsity`` (all layers and branches), ``branches`` (list, one sparsity per guidance branch) and
                ``layers`` ({layer name: sparsity over the branches}).
            ``sparsity``: list, the overall sparsity of each step.
            ``layers``: {layer name: list of its sparsity per step}.
            ``mean_sparsity``: over the whole run (tile-weighted).
            ``run``, ``num_steps``, ``num_branches``, ``tile_q``, ``tile_k``, ``warmup_steps``, ``criterion``.
        """
        return self._recorder.stats(self.layers, run=self.run, tile_q=self.tile_q, tile_k=self.tile_k,
                                    warmup_steps=self.warmup_steps, criterion=self.criterion)

    def plot(self, path) -> str:
        """Write a PNG of sparsity per denoising step (each layer thin, each branch dashed, the mean bold).

        Raises ValueError when no call has run since ``enable`` or ``reset``."""
        return plot_stats(self.stats(), path)

    def attention(self, layer: str, branch: int = 0) -> LiteAttention:
        """The :class:`liteattn.LiteAttention` of one patched layer (a name from :attr:`layers`) and guidance branch;
        its ``skip_state``, ``computed_tiles`` and ``sparsity`` are the layer's. Exists once that branch has run."""
        for transformer in self._transformers:
            for candidate in transformer.layers:
                if candidate.qualified_name == layer:
                    if not 0 <= branch < len(candidate.attentions):
                        raise ValueError(f"{layer} has run {len(candidate.attentions)} guidance branches so far; "
                                         f"no branch {branch}")
                    return candidate.attentions[branch]
        raise ValueError(f"no patched layer named {layer!r}; the handle patches {self.layers}")

    def skip_state_bytes(self) -> int:
        """Device memory held by every skip state of every layer and branch (under ring parallelism, every K/V chunk's
        of this rank), in bytes."""
        return sum(a.skip_state.nbytes for t in self._transformers for layer in t.layers
                   for lead in layer.attentions for a in _chunk_group(layer, lead) if a.skip_state is not None)

    def __enter__(self) -> "LiteAttentionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        names = ", ".join(f"{t.name}: {type(t.module).__name__} ({len(t.layers)} layers)" for t in self._transformers)
        return (f"LiteAttentionHandle({names}; threshold={self._schedule!r}, warmup_steps={self.warmup_steps}, "
                f"tile=({self.tile_q}, {self.tile_k}), criterion={self.criterion!r}, clock={self.tracker.clock}, "
                f"enabled={self.enabled}, run={self.run}, step={self.step})")

    # -- per call (eager, outside torch.compile graphs) -----------------------------------------------------------
    def _start_run(self) -> None:
        for transformer in self._transformers:
            for layer in transformer.layers:
                for attention in layer.attentions:
                    attention.reset_skip_state()
                for calibrator in layer.calibrators:
                    calibrator.records.clear()  # a profile describes one run: the latest
        self._recorder.clear()
        self._close_progress()

    # -- calibration -----------------------------------------------------------------------------------------------
    def _advance_progress(self, step: int) -> None:
        from tqdm.auto import tqdm

        if self._progress is None:
            self._progress = tqdm(total=self._total_steps(), desc="liteattn calibration", unit="step", leave=False)
        self._progress.n = step + 1
        self._progress.refresh()

    def _total_steps(self) -> Optional[int]:
        timesteps = getattr(self.tracker.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _calibrated_layers(self):
        layers = [layer for t in self._transformers for layer in t.layers]
        if not any(c.records for layer in layers for c in layer.calibrators):
            raise ValueError("no calibration run has been recorded: enable(..., target_error=...) and run the "
                             "pipeline once before asking for its profile")
        return layers

    def profile(self) -> Profile:
        """The thresholds the latest calibration run chose, per layer, guidance branch and step, as a
        :class:`liteattn.calibrate.Profile` (``save(path)``; load with ``enable(pipe, profile=path)``)."""
        thresholds, refresh = {}, {}
        summary = self.calibration_summary()
        for layer in self._calibrated_layers():
            branches, refreshes = [], []
            for calibrator in layer.calibrators:
                steps = [-math.inf] * (max((r.step for r in calibrator.records), default=-1) + 1)
                for record in calibrator.records:
                    steps[record.step] = record.threshold
                branches.append(steps)
                refreshes.append([r.step for r in calibrator.records if r.refreshed])
            thresholds[layer.qualified_name] = branches
            if any(refreshes):
                refresh[layer.qualified_name] = refreshes
        return Profile(criterion=self.criterion, tile_q=self.tile_q, tile_k=self.tile_k,
                       target_error=self._calibration["target"] if self._calibration else None,
                       warmup_steps=self.warmup_steps, thresholds=thresholds, refresh=refresh,
                       summary={k: summary[k] for k in ("steps", "sparsity", "error", "predicted", "mean_sparsity")})

    def save_profile(self, path) -> str:
        """Write :meth:`profile` as JSON to ``path``; returns the path."""
        return self.profile().save(path)

    def calibration_summary(self) -> dict:
        """The latest calibration run, as plain Python: per step (lists indexed by step) the mean chosen
        threshold, the worst realised error over layers and branches, the worst predicted error, and the tile
        sparsity; per layer its thresholds per step (branch 0) and error per step; and ``table``, a text table."""
        layers = self._calibrated_layers()
        records = [(layer.qualified_name, branch, r) for layer in layers
                   for branch, c in enumerate(layer.calibrators) for r in c.records]
        steps = sorted({r.step for _, _, r in records})

        def per_step(fn, pick):
            return [pick([fn(r) for _, _, r in records if r.step == s]) for s in steps]

        def mean(values):
            finite = [v for v in values if math.isfinite(v)]
            return sum(finite) / len(finite) if finite else -math.inf

        summary = {
            "target_error": self._calibration["target"] if self._calibration else None,
            "steps": steps,
            "threshold": per_step(lambda r: r.threshold, mean),
            "error": per_step(lambda r: r.error, max),
            "predicted": per_step(lambda r: r.predicted, max),
            "sparsity": per_step(lambda r: r.read_sparsity, lambda v: sum(v) / len(v)),
            "refreshes": per_step(lambda r: int(r.refreshed), sum),
            "layers": {layer.qualified_name: {
                "threshold": [r.threshold for r in layer.calibrators[0].records],
                "error": [max(c.records[i].error for c in layer.calibrators if i < len(c.records))
                          for i in range(len(layer.calibrators[0].records))]} for layer in layers},
        }
        summary["mean_sparsity"] = sum(summary["sparsity"]) / len(steps) if steps else 0.0
        lines = ["step | mean threshold | sparsity | worst error | worst predicted | refreshes",
                 "---: | ---: | ---: | ---: | ---: | ---:"]
        for i, s in enumerate(steps):
            lines.append(f"{s} | {summary['threshold'][i]:.2f} | {summary['sparsity'][i]:.3f} | "
                         f"{summary['error'][i]:.4f} | {summary['predicted'][i]:.4f} | {summary['refreshes'][i]}")
        summary["table"] = "\n".join(lines)
        return summary

    def plot_calibration(self, path) -> str:
        """A PNG of the latest calibration run: thresholds per layer, error against the target, and sparsity,
        per step."""
        return plot_calibration(self.calibration_summary(), path)

    def _before_call(self, transformer: _Transformer, args, kwargs) -> None:
        timestep = kwargs.get("timestep")
        if timestep is None and transformer.timestep_index is not None and len(args) > transformer.timestep_index:
            timestep = args[transformer.timestep_index]
        call = self.tracker.observe(transformer.name, timestep)
        if call.new_run:
            self._start_run()
        warmup = call.step < self.warmup_steps
        threshold = self._schedule.at(call.step)
        profile, calibration = self._profile, self._calibration
        for layer in transformer.layers:
            while len(layer.attentions) <= call.branch:
                layer.attentions.append(LiteAttention(threshold=threshold, max_batch_size=1 << 30,
                                                      tile_q=self.tile_q, tile_k=self.tile_k, backend=self.backend,
                                                      criterion=self.criterion))
            attention = layer.attentions[call.branch]
            # Warmup: plain dense attention, the skip state untouched (so nothing is marked).
            attention.enable_skipping = not warmup
            if profile is not None:
                attention.threshold = profile.at(layer.qualified_name, call.branch, call.step)
                state = attention.skip_state
                if profile.refreshes(layer.qualified_name, call.branch, call.step) and state is not None:
                    state.read_everything()
            elif calibration is None or not calibration.get("choose", True):
                attention.threshold = threshold  # a device tensor filled in place, only when the value changes
            if calibration is not None:
                while len(layer.calibrators) <= call.branch:
                    layer.calibrators.append(CalibratingAttention(layer.attentions[len(layer.calibrators)],
                                                                  **calibration))
                attention = layer.calibrators[call.branch]
                attention.step = call.step
                attention.total_steps = self._total_steps()
            layer.processor.attention = attention
        if calibration is not None and calibration.get("choose", True):
            self._advance_progress(call.step)
            threshold = math.nan  # per layer: see calibration_summary()
        elif profile is not None:
            threshold = math.nan  # per layer: the profile's
        self._current = dict(transformer=transformer.name, step=call.step, branch=call.branch,
                             timestep=call.timestep, threshold=threshold, warmup=warmup)

    def _after_call(self, transformer: _Transformer) -> None:
        # Under ring parallelism a layer's call is one call per K/V chunk: count them all.
        groups = [_chunk_group(layer, layer.processor.attention) for layer in transformer.layers]
        counts = [a.computed_tiles for group in groups for a in group if a.computed_tiles is not None]
        # The sums stay on the device until stats() is read (no host sync per call); layers of one shape are summed
        # in one launch, not one per layer.
        if counts and all(c.shape == counts[0].shape and c.device == counts[0].device for c in counts):
            sums = iter(torch.stack(counts).flatten(1).sum(1))
        else:
            sums = iter([c.sum() for c in counts])
        layers = []
        for layer, group in zip(transformer.layers, groups):
            done = [a for a in group if a.computed_tiles is not None]
            if not done:
                layers.append((layer.qualified_name, None, None))  # a dense call: nothing skipped
            else:
                computed = next(sums)
                for _ in done[1:]:
                    computed = computed + next(sums)
                layers.append((layer.qualified_name, computed, sum(a.num_tile_pairs for a in done)))
        self._recorder.record(layers=layers, **self._current)


def _chunk_group(layer: _Layer, attention) -> list:
    """The attentions one patched call ran: under ring parallelism one per K/V chunk (``processor.chunk_attentions``),
    else ``[attention]``."""
    chunks = getattr(layer.processor, "chunk_attentions", None)
    if chunks is None or isinstance(attention, CalibratingAttention):
        return [attention]
    return list(chunks(attention).attns)


def _eager(fn):
    # The hooks keep Python bookkeeping: run them eagerly, outside any graph.
    return torch.compiler.disable(fn)


def _pre_hook(handle: LiteAttentionHandle, transformer: _Transformer, module, args, kwargs):
    handle._before_call(transformer, args, kwargs)
    return None


def _post_hook(handle: LiteAttentionHandle, transformer: _Transformer, module, args, output):
    handle._after_call(transformer)
    return None
