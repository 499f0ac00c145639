"""Sparsity against quality for the keep rules (issue 13, item 5): max x mass x {fixed thresholds, calibrated targets}.

    python bench/rules_eval.py                                   # GPU: the small demo model, ~3 min (bench/rules_eval.sh)
    python bench/rules_eval.py --quick                           # CPU check: 1 prompt, 3 steps, 2 thresholds per rule
    python bench/rules_eval.py --model large --checkpoint DIR    # the large demo model (or --weights FILE)
    python bench/rules_eval.py --report a.json [b.json ...]      # tables and plot again from saved results

Three measurements, in this order of priority (a ``--budget`` in seconds skips what would not fit, and says so):

1. **Demo model, fixed thresholds.** ``--num-prompts`` prompts (the training distribution, fixed seed) sampled in one
   batch for ``--steps`` steps with classifier-free guidance, densely (the model's own processors) and through
   ``liteattn.enable(criterion=rule, threshold=t)`` from the same noise, for each rule (``max``, ``mass``), tile size
   and threshold. Per run: the handle's ``stats()["mean_sparsity"]`` (all layers, both branches, all steps) and
   PSNR / SSIM of each final video against its dense twin (mean, median, min over prompts;
   :func:`bench.demo_quality.summarize`). float32 by default: in bfloat16 the kernel-vs-SDPA rounding alone keeps
   PSNR under about 38 dB (bench/RESULTS.md, "Demo model quality"), which hides the differences between the rules.
2. **Structured synthetic inputs** (attention error, not PSNR): :class:`liteattn.testing.StructuredSequence` (tokens
   on a frames x height x width grid, attention local in space-time, drifting slowly over the steps), one sequence
   per "layer" (a sharp and a broad one), run through one :class:`liteattn.LiteAttention` per layer over the steps
   (cumulative lists, as in sampling). Per step: rel-L2 of the output against dense attention, the worst layer;
   the table's figure is the worst step.
3. **Calibrated targets** (only when ``liteattn.enable`` takes ``target_error``; otherwise a printed note): per rule
   and target, one calibration run (``enable(target_error=E, criterion=rule)``) on the first prompt (or on all,
   ``--calibrate-on all``), ``handle.save_profile()``, then every prompt sampled with ``enable(profile=...)``. Also
   records the calibration run's time against a plain run of the same batch (dense, and liteattn at a fixed
   threshold).

Outputs under ``--out`` (default ``$OUT``, else /tmp/liteattn_out): ``rules_eval_<model>.json`` (every number,
rewritten after each run, so a timeout keeps what was done), ``rules_eval_<model>.png`` (PSNR against sparsity, one
panel per model and tile, one line per rule and per calibration; then worst attention error against sparsity on the
synthetic inputs, one panel per tile), the calibration profiles, and markdown tables printed last, among them
*sparsity at equal PSNR*: each curve's sparsity interpolated at ``--levels`` dB (the largest sparsity whose
piecewise-linear PSNR is still at or above the level; ">=" when the curve never drops below it) and the ratio to the
max rule's (the issue's target: >= 1.5x).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import pathlib
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT / "bench", ROOT):  # liteattn from this checkout, and bench/demo_quality.py beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

from demo_quality import summarize  # noqa: E402

RULES = ("max", "mass")
KINDS = ("fixed", "calibrated", "calibrated+refresh")  # fixed thresholds; calibrated targets (without, with re-admission)
# Thresholds (log2) from about 1 to 25-40 % sparsity on the small demo model at 128-token tiles (CPU, 1 prompt, 12
# steps, float32: max 0 / -1 / -2 / -3 skip 48 / 23 / 14 / 9 %, at 17 / 23 / 29 / 33 dB; mass -3 / -6 skip 78 / 17 %
# at 12 / 29 dB: -3 drops a tile unless some row puts 1/8 of its attention on it); the same grids for 64-token tiles.
# In the order they run: the range where PSNR is 30-55 dB first, the loose ends last, where a time budget cuts first.
MAX_THRESHOLDS = "-6,-3,-10,-4,-8,-2,-5,-1"
MASS_THRESHOLDS = "-10,-7,-14,-8,-12,-6,-9,-5"
SYNTHETIC_MAX = "0,-1,-2,-3,-4,-6,-8,-10"
SYNTHETIC_MASS = "-2,-4,-6,-8,-10,-12,-14,-16"
TARGETS = "0.01,0.02,0.04,0.08"
LEVELS = "30,35,40,45,50"  # PSNR dB at which to compare sparsity
ERROR_LEVELS = "0.005,0.01,0.015,0.03"  # worst rel-L2 at which to compare sparsity (synthetic)
PSNR_CAP = 70.0  # dB: the plot's ceiling
SYNTHETIC_LAYERS = ((0.3, 3.0), (0.03, 0.3))  # sharpness ranges over heads: a local "layer" and a broad one


# -- bookkeeping ------------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock seconds for the whole evaluation; 0 = no limit. ``allows(estimate)`` says whether a piece of work
    of about ``estimate`` seconds still fits (unknown estimates always do)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: Optional[float]) -> bool:
        return not self.seconds or estimate is None or self.elapsed() + estimate <= self.seconds


class Results:
    """The JSON document, rewritten after every change."""

    def __init__(self, path: pathlib.Path, meta: dict):
        self.path = path
        self.data = dict(meta=meta, dense={}, demo=[], calibration=dict(available=None, note="", timing=[]),
                         synthetic=dict(config={}, rows=[]), skipped=[], errors=[])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=1))
        tmp.replace(self.path)

    def skip(self, what: str, why: str) -> None:
        log(f"skipped {what}: {why}")
        self.data["skipped"].append(f"{what}: {why}")
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str):
        """A failure inside is recorded and printed; the evaluation goes on with the next piece."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 -- one failed run must not lose the others
            log(f"FAILED {name}: {type(exc).__name__}: {exc}")
            self.data["errors"].append(dict(stage=name, error=f"{type(exc).__name__}: {exc}",
                                            traceback=traceback.format_exc()))
        finally:
            self.save()


def _jsonable(x):
    """JSON has no inf or nan: they become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", flush=True)


def floats(text: str) -> List[float]:
    return [float(t) for t in text.split(",") if t.strip()]


# -- sampling ---------------------------------------------------------------------------------------------------


def calibration_available() -> Tuple[bool, str]:
    """Whether ``liteattn.enable`` (or ``liteattn.diffusers.enable`` behind it) takes ``target_error``."""
    import liteattn

    if "target_error" in inspect.signature(liteattn.enable).parameters:
        return True, "liteattn.enable takes target_error"
    try:
        from liteattn.diffusers import enable as diffusers_enable
    except Exception as exc:  # noqa: BLE001
        return False, f"liteattn.diffusers does not import ({type(exc).__name__}: {exc})"
    if "target_error" in inspect.signature(diffusers_enable).parameters:
        return True, "liteattn.diffusers.enable takes target_error"
    return False, "liteattn.enable has no target_error parameter yet (issue 13, item 2): calibrated targets skipped"


def sample_run(model, tokens, *, steps: int, seed: int, sample_kwargs: dict, enable_kwargs: Optional[dict] = None,
               save_profile: Optional[pathlib.Path] = None) -> dict:
    """One sampling of ``tokens`` (liteattn.demo.run's timed sampler): dense without ``enable_kwargs``, else through
    ``liteattn.enable(model.transformer, scheduler=..., **enable_kwargs)``, disabled again afterwards.

    Returns ``videos``, ``attention_seconds``, ``total_seconds`` and, through liteattn, ``stats`` (the handle's) and,
    for a calibration run or one with ``measure_error``, ``calibration_summary`` (the handle's, without its text
    table); ``save_profile``: write the handle's profile there after the run (a calibration run)."""
    from liteattn.demo.run import _timed_sample
    from liteattn.demo.sample import make_scheduler

    if enable_kwargs is None:
        return _timed_sample(model, tokens, steps=steps, seed=seed, **sample_kwargs)
    import liteattn

    scheduler = make_scheduler()  # the handle follows its steps: no host read of the timestep per call
    handle = liteattn.enable(model.transformer, scheduler=scheduler, **enable_kwargs)
    try:
        result = _timed_sample(model, tokens, steps=steps, seed=seed, scheduler=scheduler, **sample_kwargs)
        result["stats"] = handle.stats()
        if enable_kwargs.get("target_error") is not None or enable_kwargs.get("measure_error"):
            try:
                summary = handle.calibration_summary()
                result["calibration_summary"] = {k: v for k, v in summary.items() if k != "table"}
            except Exception as exc:  # noqa: BLE001 -- the numbers matter more than the summary
                log(f"no calibration summary ({type(exc).__name__}: {exc})")
        if save_profile is not None:
            save_profile.parent.mkdir(parents=True, exist_ok=True)
            handle.save_profile(str(save_profile))
    finally:
        handle.disable()
    return result


def quality_row(run: dict, dense_videos: torch.Tensor, **fields) -> dict:
    """The JSON row of one liteattn run: ``fields``, sparsity, PSNR / SSIM against dense (per prompt and summarised)."""
    from liteattn.demo.metrics import psnr, ssim

    psnr_db = psnr(run["videos"], dense_videos).tolist()
    ssim_values = ssim(run["videos"], dense_videos).tolist()
    stats = run.get("stats") or {}
    per_step = stats.get("sparsity") or []
    return dict(fields, sparsity=stats.get("mean_sparsity"), sparsity_last_step=per_step[-1] if per_step else None,
                **summarize(psnr_db, ssim_values), psnr_db=psnr_db, ssim=ssim_values, sparsity_per_step=per_step,
                attention_seconds=run["attention_seconds"], total_seconds=run["total_seconds"])


def realised_error(summary: Optional[dict], target: float) -> Optional[dict]:
    """From a calibration summary: the realised attention error of every (layer, step) against ``target``: the worst
    and the median as multiples of the target, and the share within 1.25x of it (issue 13: within +-25 % or below)."""
    layers = (summary or {}).get("layers") or {}
    errors = [e for layer in layers.values() for e in layer.get("error", [])
              if isinstance(e, (int, float)) and math.isfinite(e)]
    if not errors:
        return None
    errors.sort()
    return dict(worst_over_target=errors[-1] / target, median_over_target=errors[len(errors) // 2] / target,
                within_125=sum(e <= 1.25 * target for e in errors) / len(errors), calls=len(errors))


def _describe(row: dict) -> str:
    psnr = ("identical" if row["psnr_db_mean"] is None
            else f"{row['psnr_db_mean']:.2f} / {row['psnr_db_median']:.2f} / {row['psnr_db_min']:.2f} dB")
    sparsity = "?" if row["sparsity"] is None else f"{row['sparsity']:.1%}"
    return f"sparsity {sparsity}, PSNR {psnr}, SSIM {row['ssim_mean']:.4f}, {row['total_seconds']:.1f} s"


def load_demo_model(args, device, dtype):
    """``(model, source)``: the small model (``--weights`` or the shipped file) or the large one (``--checkpoint``:
    a training checkpoint's EMA; ``--weights``; else the shipped ``wan_large.safetensors``)."""
    from liteattn.demo import model as demo_model

    if args.model == "small":
        path = args.weights or demo_model.WEIGHTS
        return demo_model.load_model(path, device=device, dtype=dtype), dict(weights=str(path))
    from attention_sparsity import load  # bench/attention_sparsity.py: weights or a checkpoint folder

    return load(args.weights, args.checkpoint, device, dtype)


class DemoEval:
    """The demo-model measurements of one model: dense once, then fixed thresholds and calibrated targets."""

    def __init__(self, args, results: Results, budget: Budget, device, dtype):
        from liteattn.demo import data

        self.args, self.results, self.budget = args, results, budget
        self.model, source = load_demo_model(args, device, dtype)
        results.data["meta"]["source"] = source
        self.prompts = data.sample_scenes(args.num_prompts, seed=args.prompt_seed).prompts()
        self.tokens = data.tokenize(self.prompts)
        results.data["meta"]["prompts"] = self.prompts
        self.sample_kwargs = dict(guidance=args.guidance)
        if args.frames:
            self.sample_kwargs["frames"] = args.frames
        if args.size:
            self.sample_kwargs["size"] = args.size
        self.backend = "torch" if (device.type == "cuda" and dtype == torch.float32) else None  # the kernel: 16-bit
        results.data["meta"]["backend"] = self.backend or "automatic"
        self.run_seconds: Dict[int, float] = {}  # tile -> seconds of the latest liteattn run (the budget's estimate)
        self.plain_calibration_runs: Dict[Tuple[int, str], dict] = {}  # (tile, rule) -> plain run, calibration batch
        self.dense_calibration_seconds: Optional[float] = None
        self.calibration_seconds: Dict[int, float] = {}  # tile -> seconds of a calibration and a profile run
        self.dense = None

    def _run(self, tokens=None, enable_kwargs=None, save_profile=None) -> dict:
        return sample_run(self.model, self.tokens if tokens is None else tokens, steps=self.args.steps,
                          seed=self.args.seed, sample_kwargs=self.sample_kwargs, enable_kwargs=enable_kwargs,
                          save_profile=save_profile)

    def _enable_kwargs(self, tile: int, **kwargs) -> dict:
        return dict(kwargs, tile_q=tile, tile_k=tile, backend=self.backend)

    def estimate(self, tile: int) -> Optional[float]:
        seconds = self.run_seconds.get(tile) or max(self.run_seconds.values(), default=None)
        if seconds is None and self.dense is not None:
            seconds = 3 * self.dense["total_seconds"]
        return None if seconds is None else 1.15 * seconds

    def warm_up_and_dense(self) -> None:
        args = self.args
        if args.warmup:  # CUDA start-up, cuDNN / Triton autotuning: untimed
            log("warm-up (2 steps, dense and liteattn)")
            sample_run(self.model, self.tokens, steps=2, seed=args.seed, sample_kwargs=self.sample_kwargs)
            for rule in args.rules:
                sample_run(self.model, self.tokens, steps=2, seed=args.seed, sample_kwargs=self.sample_kwargs,
                           enable_kwargs=self._enable_kwargs(args.tiles[0], threshold=-6.0, criterion=rule))
        self.dense = self._run()
        self.results.data["dense"] = dict(model=args.model, total_seconds=self.dense["total_seconds"],
                                          attention_seconds=self.dense["attention_seconds"])
        log(f"dense: {len(self.prompts)} prompts x {args.steps} steps, {self.dense['total_seconds']:.2f} s "
            f"(self-attention {self.dense['attention_seconds']:.2f} s)")

    def fixed(self, tile: int) -> None:
        """Every threshold of both rules at ``tile``, in the grids' order, the rules interleaved, so that a budget cut
        drops the last thresholds of both curves."""
        grids = {"max": self.args.max_thresholds, "mass": self.args.mass_thresholds}
        order = [(rule, t) for i in range(max(map(len, grids.values())))
                 for rule in self.args.rules if i < len(grids[rule]) for t in [grids[rule][i]]]
        for rule, threshold in order:
            what = f"{self.args.model} tile {tile} {rule} {threshold:g}"
            if not self.budget.allows(self.estimate(tile)):
                self.results.skip(what, f"time budget ({self.budget.elapsed():.0f} of {self.budget.seconds:.0f} s "
                                        f"used, a run takes ~{self.estimate(tile):.0f} s)")
                continue
            with self.results.stage(what):
                run = self._run(enable_kwargs=self._enable_kwargs(tile, threshold=threshold, criterion=rule))
                self.run_seconds[tile] = run["total_seconds"]
                row = quality_row(run, self.dense["videos"], model=self.args.model, tile=tile, rule=rule,
                                  kind="fixed", threshold=threshold)
                self.results.data["demo"].append(row)
                log(f"{what}: {_describe(row)}")

    def calibrated(self, tile: int, refresh: bool = False) -> None:
        """Per rule and target: a calibration run, its profile saved, then every prompt sampled with the profile.
        ``refresh``: calibrate with re-admission (``enable(refresh=True)``), rows of kind ``calibrated+refresh``."""
        args, results = self.args, self.results
        kind = "calibrated+refresh" if refresh else "calibrated"
        calibration_prompts = self.prompts[:1] if args.calibrate_on == "first" else self.prompts
        from liteattn.demo import data

        tokens = data.tokenize(calibration_prompts)
        dense_videos = self.dense["videos"][:len(calibration_prompts)]
        estimate = self.estimate(tile)
        for rule in args.rules:
            # A plain run of the calibration batch, for the calibration run's time: liteattn at a fixed threshold.
            plain = self.plain_calibration_runs.get((tile, rule))
            if plain is None and self.budget.allows(estimate):
                with results.stage(f"{args.model} tile {tile} {rule}: plain run of the calibration batch"):
                    if self.dense_calibration_seconds is None:
                        self.dense_calibration_seconds = self._run(tokens=tokens)["total_seconds"]
                    plain = self._run(tokens=tokens, enable_kwargs=self._enable_kwargs(tile, threshold=-8.0,
                                                                                       criterion=rule))
                    self.plain_calibration_runs[tile, rule] = plain
                    results.data["calibration"]["timing"].append(dict(
                        model=args.model, tile=tile, rule=rule, prompts=len(calibration_prompts),
                        dense_seconds=self.dense_calibration_seconds,
                        plain_seconds=plain["total_seconds"], plain_threshold=-8.0))
            for target in args.targets:
                what = f"{args.model} tile {tile} {rule} target {target:g}{' refresh' if refresh else ''}"
                # A calibration run and a run with its profile: as measured, else 3 plain runs (1 for the profile
                # run, up to 2 for the calibration run's extra dense pass).
                cost = self.calibration_seconds.get(tile) or (None if estimate is None else 3 * estimate)
                if not self.budget.allows(cost):
                    results.skip(what, f"time budget ({self.budget.elapsed():.0f} of {self.budget.seconds:.0f} s "
                                       f"used, a calibration and a run take ~{cost:.0f} s)")
                    continue
                with results.stage(what):
                    start = time.perf_counter()
                    name = f"{args.model}_tile{tile}_{rule}_{target:g}{'_refresh' if refresh else ''}"
                    profile = args.out / "profiles" / f"{name}.json"
                    calibrate = dict(target_error=target, criterion=rule)
                    if refresh:
                        calibrate["refresh"] = True
                    calibration = self._run(tokens=tokens, save_profile=profile,
                                            enable_kwargs=self._enable_kwargs(tile, **calibrate))
                    calibration_row = quality_row(calibration, dense_videos)
                    summary = calibration.get("calibration_summary")
                    run = self._run_profile(tile, rule, profile)
                    self.run_seconds.setdefault(tile, run["total_seconds"])
                    row = quality_row(
                        run, self.dense["videos"], model=args.model, tile=tile, rule=rule, kind=kind,
                        target_error=target, profile=str(profile),
                        calibration=dict(prompts=len(calibration_prompts), seconds=calibration["total_seconds"],
                                         plain_seconds=plain["total_seconds"] if plain else None,
                                         sparsity=calibration_row["sparsity"],
                                         psnr_db_mean=calibration_row["psnr_db_mean"],
                                         sparsity_per_step=calibration_row["sparsity_per_step"],
                                         realised=realised_error(summary, target), summary=summary))
                    if run.get("calibration_summary") is not None:  # --measure-error: the profile on new prompts
                        row["profile_run_realised"] = realised_error(run["calibration_summary"], target)
                        row["profile_run_summary"] = run["calibration_summary"]
                    results.data["demo"].append(row)
                    self.calibration_seconds[tile] = 1.1 * (time.perf_counter() - start)
                    ratio = f" ({calibration['total_seconds'] / plain['total_seconds']:.2f}x a plain run)" if plain else ""
                    realised = row["calibration"]["realised"]
                    within = (f", realised error: worst {realised['worst_over_target']:.2f}x the target, "
                              f"{realised['within_125']:.0%} of calls within 1.25x" if realised else "")
                    log(f"{what}: calibration {calibration['total_seconds']:.1f} s{ratio}, sparsity "
                        f"{calibration_row['sparsity'] or 0:.1%}{within}; with the profile: {_describe(row)}")

    def _run_profile(self, tile: int, rule: str, profile: pathlib.Path) -> dict:
        """Sample every prompt with a saved profile. The profile may carry its own rule: if ``enable`` refuses the
        criterion beside it, try once without."""
        extra = dict(measure_error=True) if self.args.measure_error else {}
        try:
            return self._run(enable_kwargs=self._enable_kwargs(tile, profile=str(profile), criterion=rule, **extra))
        except (TypeError, ValueError) as first:
            log(f"enable(profile=..., criterion={rule!r}) refused ({first}); once more without criterion")
            try:
                return self._run(enable_kwargs=self._enable_kwargs(tile, profile=str(profile), **extra))
            except Exception:
                raise first


# -- synthetic inputs -------------------------------------------------------------------------------------------


def synthetic(args, results: Results, budget: Budget, device) -> None:
    """Cumulative skipping over drifting structured inputs: per layer one LiteAttention, per step the rel-L2 of its
    output against dense attention. Rows: ``tile``, ``rule``, ``threshold``, ``sparsity`` (mean over layers and
    steps, the first, dense-reading, step included as in ``stats()``), ``worst_error`` (the worst step of the worst
    layer), ``error_per_step`` (worst layer), ``sparsity_per_step``."""
    from liteattn import LiteAttention
    from liteattn.testing import StructuredSequence

    grid = tuple(args.synthetic_grid)
    seq = math.prod(grid)
    config = dict(grid=grid, tokens=seq, heads=4, head_dim=64, steps=args.synthetic_steps, drift=args.synthetic_drift,
                  layers=[list(s) for s in SYNTHETIC_LAYERS], content=0.5, dtype="float32", seed=args.seed,
                  backend="torch")
    results.data["synthetic"]["config"] = config
    layers = []
    for n, sharpness in enumerate(SYNTHETIC_LAYERS):
        inputs = list(StructuredSequence(args.synthetic_steps, batch=1, seq_q=seq, heads=4, head_dim=64,
                                         drift=args.synthetic_drift, seed=args.seed + 100 * n, grid=grid,
                                         sharpness=sharpness, content=0.5, device=device))
        dense = [torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in qkv)).transpose(1, 2)
                 for qkv in inputs]
        layers.append((inputs, dense))
    grids = {"max": args.synthetic_max, "mass": args.synthetic_mass}
    estimate = None
    for tile in args.tiles:
        for rule in args.rules:
            for threshold in grids[rule]:
                what = f"synthetic tile {tile} {rule} {threshold:g}"
                if not budget.allows(estimate):
                    results.skip(what, "time budget")
                    continue
                with results.stage(what):
                    start = time.perf_counter()
                    errors = [[0.0] * len(layers) for _ in range(args.synthetic_steps)]
                    sparsity = [[0.0] * len(layers) for _ in range(args.synthetic_steps)]
                    for n, (inputs, dense) in enumerate(layers):
                        # backend "torch": float32 runs on the PyTorch reference (the kernel takes 16-bit), same rule
                        attention = LiteAttention(threshold=threshold, tile_q=tile, tile_k=tile, criterion=rule,
                                                  backend="torch")
                        for step, ((q, k, v), reference) in enumerate(zip(inputs, dense)):
                            out = attention(q, k, v)
                            errors[step][n] = ((out - reference).norm() / reference.norm()).item()
                            sparsity[step][n] = attention.sparsity
                    error_per_step = [max(e) for e in errors]
                    sparsity_per_step = [sum(s) / len(s) for s in sparsity]
                    row = dict(tile=tile, rule=rule, threshold=threshold,
                               sparsity=sum(sparsity_per_step) / len(sparsity_per_step),
                               worst_error=max(error_per_step), error_per_step=error_per_step,
                               sparsity_per_step=sparsity_per_step, error_per_layer_step=errors)
                    results.data["synthetic"]["rows"].append(row)
                    estimate = 1.2 * (time.perf_counter() - start)
                    log(f"{what}: sparsity {row['sparsity']:.1%}, worst rel-L2 {row['worst_error']:.2e}")


# -- report -----------------------------------------------------------------------------------------------------


def sparsity_at(points: Sequence[Tuple[float, Optional[float]]], level: float) -> Tuple[Optional[float], str]:
    """The largest sparsity at which the piecewise-linear curve through ``points`` ``(sparsity, quality)`` still has
    quality >= ``level`` (quality: higher is better; None = identical, i.e. +inf).

    Returns ``(sparsity, bound)``: bound ``""`` for an interpolated value, ``">="`` when even the sparsest point is
    at or above the level (the curve was not followed far enough), ``"<"`` with the least sparsity measured when no
    point reaches the level, ``(None, "")`` without points."""
    pts = sorted((s, math.inf if q is None else q) for s, q in points if s is not None)
    if not pts:
        return None, ""
    if pts[-1][1] >= level:
        return pts[-1][0], ">="
    best = None
    for s, q in pts:
        if q >= level:
            best = s if best is None else max(best, s)
    for (s0, q0), (s1, q1) in zip(pts, pts[1:]):
        if (q0 >= level) != (q1 >= level):
            if math.isinf(q0) or math.isinf(q1):
                s = s0 if q0 >= level else s1
            else:
                s = s0 + (s1 - s0) * (q0 - level) / (q0 - q1)
            best = s if best is None else max(best, s)
    if best is None:
        return pts[0][0], "<"
    return best, ""


def _fmt_at(value: Tuple[Optional[float], str]) -> str:
    s, bound = value
    return "—" if s is None else f"{bound}{s:.1%}"


def _ratio(num: Tuple[Optional[float], str], den: Tuple[Optional[float], str]) -> str:
    (a, ba), (b, bb) = num, den
    if a is None or b is None or b <= 0 or ba == "<" or bb == "<":
        return "—"
    exact = not ba and not bb
    prefix = "" if exact else (">=" if ba == ">=" and not bb else ("<=" if bb == ">=" and not ba else "~"))
    return f"{prefix}{a / b:.2f}x"


def _label(rule: str, kind: str) -> str:
    return rule if kind == "fixed" else f"{rule} ({kind})"


def _fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _panels(groups: Dict[Tuple, List[dict]]) -> List[Tuple[str, int]]:
    """``(model, tile)`` pairs: models in the order they come, larger tiles first."""
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _, _, _ in groups))}
    return sorted({(m, t) for m, t, _, _ in groups}, key=lambda p: (order[p[0]], -p[1]))


def _synthetic_rows(documents: Sequence[dict]) -> List[dict]:
    """The synthetic rows of the first document that has any (they do not depend on the model)."""
    return next((doc["synthetic"]["rows"] for doc in documents if doc["synthetic"]["rows"]), [])


def curves(rows: Sequence[dict]) -> Dict[Tuple, List[dict]]:
    """Demo rows grouped by ``(model, tile, rule, kind)``, each sorted by sparsity."""
    groups: Dict[Tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["tile"], row["rule"], row["kind"]), []).append(row)
    return {key: sorted(group, key=lambda r: (r["sparsity"] is None, r["sparsity"] or 0.0))
            for key, group in groups.items()}


def markdown(documents: Sequence[dict], levels: Sequence[float], error_levels: Sequence[float]) -> str:
    out: List[str] = []
    demo_rows = [row for doc in documents for row in doc["demo"]]
    groups = curves(demo_rows)
    panels = _panels(groups)
    for doc in documents:
        meta = doc["meta"]
        if not doc["demo"]:
            continue
        source = ", ".join(f"{k} {v}" for k, v in (meta.get("source") or {}).items())
        out.append(f"**{meta.get('model')}** model ({source}): {len(meta.get('prompts') or [])} prompts x "
                   f"{meta.get('steps')} steps, guidance {meta.get('guidance')}, batch {len(meta.get('prompts') or [])},"
                   f" {meta.get('card')} {meta.get('dtype')} (liteattn backend {meta.get('backend')}), torch "
                   f"{meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date')}; dense total "
                   f"{_fmt(doc['dense'].get('total_seconds'), '.2f')} s.")
    for model, tile in panels:
        out.append(f"\n#### {model} model, {tile}-token tiles\n")
        out.append("| rule | threshold / target | sparsity (mean / last step) | PSNR dB (mean / median / min) | "
                   "SSIM (mean / median / min) | total s |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for kind in KINDS:
            for rule in RULES:
                for r in groups.get((model, tile, rule, kind), []):
                    setting = f"{r['threshold']:g}" if kind == "fixed" else f"target {r['target_error']:g}"
                    psnr = ("identical" if r["psnr_db_mean"] is None else
                            f"{r['psnr_db_mean']:.1f} / {r['psnr_db_median']:.1f} / {r['psnr_db_min']:.1f}")
                    out.append(f"| {_label(rule, kind)} | {setting} | "
                               f"{_fmt(r['sparsity'], '.1%')} / {_fmt(r['sparsity_last_step'], '.1%')} | {psnr} | "
                               f"{r['ssim_mean']:.4f} / {r['ssim_median']:.4f} / {r['ssim_min']:.4f} | "
                               f"{r['total_seconds']:.2f} |")
    calibrated_rows = [r for r in demo_rows if r["kind"] != "fixed"]
    if calibrated_rows:
        out.append("\n#### Calibration runs\n")
        out.append("(calibration run: the calibration prompts; realised error: every layer call's attention rel-L2 "
                   "against dense in that run, as multiples of the target; profile run: every prompt, with the "
                   "saved profile)\n")
        out.append("| model | tile | rule | target | calibration run s | plain run s (same batch) | ratio | "
                   "calibration-run sparsity | realised error: worst / median x target, share <= 1.25x | "
                   "profile-run sparsity | profile-run realised error |")
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")

        def realised(x):
            return ("—" if not x else f"{x['worst_over_target']:.2f} / {x['median_over_target']:.2f}, "
                                      f"{x['within_125']:.0%}")

        for r in calibrated_rows:
            c = r["calibration"]
            ratio = f"{c['seconds'] / c['plain_seconds']:.2f}x" if c.get("plain_seconds") else "—"
            out.append(f"| {r['model']} | {r['tile']} | {_label(r['rule'], r['kind'])} | {r['target_error']:g} | "
                       f"{c['seconds']:.2f} | {_fmt(c.get('plain_seconds'), '.2f')} | {ratio} | "
                       f"{_fmt(c.get('sparsity'), '.1%')} | {realised(c.get('realised'))} | "
                       f"{_fmt(r['sparsity'], '.1%')} | {realised(r.get('profile_run_realised'))} |")
    notes = [doc["calibration"].get("note") for doc in documents if doc["calibration"].get("note")]
    if panels:
        out.append("\n#### Sparsity at equal PSNR (mean over prompts; interpolated along each curve)\n")
        present = [(rule, kind) for kind in KINDS for rule in RULES if any(key[2:] == (rule, kind) for key in groups)]
        baseline = ("max", "fixed")
        others = [c for c in present if c != baseline]
        out.append("| model | tile | PSNR dB | " + " | ".join(_label(*c) for c in present) + " | "
                   + " | ".join(f"{_label(*c)} / max" for c in others) + " |")
        out.append("|---|---:|---:|" + "---:|" * (len(present) + len(others)))
        for model, tile in panels:
            at = {c: {level: sparsity_at([(r["sparsity"], r["psnr_db_mean"])
                                          for r in groups.get((model, tile) + c, [])], level) for level in levels}
                  for c in present}
            for level in levels:
                out.append(f"| {model} | {tile} | {level:g} | " + " | ".join(_fmt_at(at[c][level]) for c in present)
                           + " | " + " | ".join(_ratio(at[c][level], at[baseline][level]) if baseline in at else "—"
                                                for c in others) + " |")
        out.append("\n(\">=\": the curve stays above the level up to its sparsest point; \"<\": no point reaches it; "
                   "ratios against the fixed-threshold max rule, today's default.)")
    synthetic_rows = _synthetic_rows(documents)
    if synthetic_rows:
        config = next(doc["synthetic"]["config"] for doc in documents if doc["synthetic"]["rows"])
        out.append(f"\n#### Synthetic structured inputs: sparsity at equal worst attention error\n\n"
                   f"grid {config.get('grid')} ({config.get('tokens')} tokens), {config.get('heads')} heads x "
                   f"{config.get('head_dim')}, {config.get('steps')} steps, drift {config.get('drift')}, "
                   f"{len(config.get('layers', []))} layers (sharpness {config.get('layers')}), "
                   f"{config.get('dtype')}; error: rel-L2 of the output against dense, worst layer, worst step; "
                   f"sparsity: mean over layers and steps.\n")
        tiles = sorted({r["tile"] for r in synthetic_rows}, reverse=True)
        out.append("| tile | worst rel-L2 <= | max | mass | mass / max |")
        out.append("|---:|---:|---:|---:|---:|")
        for tile in tiles:
            for level in error_levels:
                at = {rule: sparsity_at([(r["sparsity"], -r["worst_error"]) for r in synthetic_rows
                                         if r["tile"] == tile and r["rule"] == rule], -level) for rule in RULES}
                out.append(f"| {tile} | {level:g} | {_fmt_at(at['max'])} | {_fmt_at(at['mass'])} | "
                           f"{_ratio(at['mass'], at['max'])} |")
        out.append("\n| tile | rule | threshold | sparsity | worst rel-L2 | rel-L2 per step (worst layer) |")
        out.append("|---:|---|---:|---:|---:|---|")
        for tile in tiles:
            for rule in RULES:
                for r in sorted((r for r in synthetic_rows if r["tile"] == tile and r["rule"] == rule),
                                key=lambda r: r["sparsity"]):
                    steps = " ".join(f"{e:.1e}" for e in r["error_per_step"])
                    out.append(f"| {tile} | {rule} | {r['threshold']:g} | {r['sparsity']:.1%} | "
                               f"{r['worst_error']:.2e} | {steps} |")
    skipped = [s for doc in documents for s in doc.get("skipped", [])]
    errors = [e for doc in documents for e in doc.get("errors", [])]
    for note in notes:
        out.append(f"\nNote: {note}")
    if skipped:
        out.append(f"\nSkipped ({len(skipped)}): " + "; ".join(skipped))
    if errors:
        out.append(f"\nFailed ({len(errors)}): " + "; ".join(f"{e['stage']}: {e['error']}" for e in errors))
    return "\n".join(out)


def plot(documents: Sequence[dict], path: pathlib.Path) -> Optional[pathlib.Path]:
    """PSNR against sparsity (a panel per model and tile: a line per rule, solid for fixed thresholds, dashed for
    calibrated targets, points labelled), then worst synthetic error against sparsity (a panel per tile)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = curves([row for doc in documents for row in doc["demo"]])
    panels = _panels(groups)
    synthetic_rows = _synthetic_rows(documents)
    synthetic_tiles = sorted({r["tile"] for r in synthetic_rows}, reverse=True)
    count = len(panels) + len(synthetic_tiles)
    if not count:
        return None
    fig = Figure(figsize=(4.6 * count, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, count, squeeze=False)[0]
    colours = {"max": "tab:blue", "mass": "tab:orange"}
    for ax, (model, tile) in zip(axes, panels):
        for (m, t, rule, kind), rows in sorted(groups.items()):
            if (m, t) != (model, tile):
                continue
            rows = [r for r in rows if r["sparsity"] is not None and r["psnr_db_mean"] is not None]
            if not rows:
                continue
            # Above PSNR_CAP the videos are practically identical: drawn at the cap, labelled with their value.
            xs, ys = [100 * r["sparsity"] for r in rows], [min(r["psnr_db_mean"], PSNR_CAP) for r in rows]
            style = {"fixed": "o-", "calibrated": "s--"}.get(kind, "^:")
            ax.plot(xs, ys, style, color=colours[rule], markersize=4,
                    label=f"{rule}, " + {"fixed": "fixed threshold", "calibrated": "calibrated target"}.get(
                        kind, "calibrated target + refresh"))
            for x, y, r in zip(xs, ys, rows):
                text = f"{r['threshold']:g}" if kind == "fixed" else f"{r['target_error']:g}"
                if r["psnr_db_mean"] > PSNR_CAP:
                    text += f" ({r['psnr_db_mean']:.0f} dB)"
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=colours[rule])
        ax.set_title(f"{model} demo model, tile {tile}: final videos vs dense", fontsize="small")
        ax.set_xlabel("mean sparsity (%)")
        ax.set_ylabel("PSNR (dB, mean over prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax, tile in zip(axes[len(panels):], synthetic_tiles):
        for rule in RULES:
            rows = sorted((r for r in synthetic_rows if r["tile"] == tile and r["rule"] == rule),
                          key=lambda r: r["sparsity"])
            if not rows:
                continue
            xs, ys = [100 * r["sparsity"] for r in rows], [max(r["worst_error"], 1e-8) for r in rows]
            ax.plot(xs, ys, "o-", color=colours[rule], markersize=4, label=rule)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"{r['threshold']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=colours[rule])
        ax.set_yscale("log")
        ax.set_title(f"synthetic structured inputs, tile {tile}", fontsize="small")
        ax.set_xlabel("mean sparsity (%)")
        ax.set_ylabel("worst rel-L2 of attention output (step, layer)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return path


def report(documents: Sequence[dict], png: pathlib.Path, levels, error_levels) -> None:
    """The plot, then the markdown tables (printed last)."""
    try:
        written = plot(documents, png)
        if written:
            log(f"plot: {written}")
    except Exception as exc:  # noqa: BLE001 -- e.g. no matplotlib on the device: re-render later with --report
        log(f"no plot ({type(exc).__name__}: {exc}); run --report on the JSON where matplotlib is installed")
    print("\n" + markdown(documents, levels, error_levels), flush=True)


# -- main -------------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("small", "large"), default="small")
    p.add_argument("--weights", default=None, help="weights file (small: default the shipped tiny_wan; large: "
                                                    "default the shipped wan_large.safetensors)")
    p.add_argument("--checkpoint", default=None, help="large model: a training checkpoint folder (its EMA weights)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-seed", type=int, default=2024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default the demo's, 4)")
    p.add_argument("--tiles", default="128,64", help="tile sizes, in priority order")
    p.add_argument("--rules", default=",".join(RULES), help="keep rules to measure")
    p.add_argument("--max-thresholds", default=MAX_THRESHOLDS, help="in the order they run (use =, e.g. "
                                                                     "--max-thresholds=-6,-3)")
    p.add_argument("--mass-thresholds", default=MASS_THRESHOLDS, help="in the order they run")
    p.add_argument("--targets", default=TARGETS, help="calibration targets (attention rel-L2 error)")
    p.add_argument("--calibrate-on", choices=("first", "all"), default="first",
                   help="the prompts of the calibration run: the first one, or all")
    p.add_argument("--refresh", action="store_true",
                   help="also calibrate with re-admission (enable(refresh=True)), at the first tile size, last")
    p.add_argument("--measure-error", action="store_true",
                   help="profile runs also measure their attention error against dense (one extra dense pass per "
                        "call): does the profile keep its budget on other prompts?")
    p.add_argument("--levels", default=LEVELS, help="PSNR levels (dB) for sparsity at equal PSNR")
    p.add_argument("--error-levels", default=ERROR_LEVELS, help="synthetic: worst rel-L2 levels")
    p.add_argument("--stages", default="fixed,synthetic,calibrated",
                   help="which measurements: fixed, synthetic, calibrated")
    p.add_argument("--synthetic-grid", default="16,16,16", help="frames,height,width of the synthetic tokens")
    p.add_argument("--synthetic-steps", type=int, default=8)
    p.add_argument("--synthetic-drift", type=float, default=0.2,
                   help="score change per step, in std (0.2: the worst error grows ~1.3-1.5x over 8 steps)")
    p.add_argument("--synthetic-max", default=SYNTHETIC_MAX)
    p.add_argument("--synthetic-mass", default=SYNTHETIC_MASS)
    p.add_argument("--frames", type=int, default=None, help="sample shorter videos (CPU checks)")
    p.add_argument("--size", type=int, default=None, help="sample smaller frames (CPU checks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for everything (default 240 on CUDA, no limit on the CPU); 0: no limit")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/liteattn_out")
    p.add_argument("--quick", action="store_true", help="CPU check: 1 prompt, 3 steps, 4 frames, 2 thresholds per "
                                                        "rule, tile 128, a small synthetic grid")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="only print the tables and draw the plot of saved results (several files: one figure)")
    if p.parse_known_args(argv)[0].quick:  # new defaults: options given explicitly still win
        p.set_defaults(steps=3, num_prompts=1, frames=4, tiles="128", max_thresholds="-2,-6", mass_thresholds="-4,-10",
                       targets="0.02,0.08", synthetic_grid="4,16,16", synthetic_steps=4, synthetic_max="-2,-6",
                       synthetic_mass="-4,-10")
    args = p.parse_args(argv)
    args.tiles = [int(t) for t in args.tiles.split(",")]
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not args.rules or set(args.rules) - set(RULES):
        p.error(f"--rules: {args.rules} (accepted: {', '.join(RULES)})")
    for name in ("max_thresholds", "mass_thresholds", "targets", "levels", "error_levels", "synthetic_max",
                 "synthetic_mass"):
        setattr(args, name, floats(getattr(args, name)))
    args.synthetic_grid = [int(x) for x in args.synthetic_grid.split(",")]
    args.stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = args.stages - {"fixed", "synthetic", "calibrated"}
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)} (fixed, synthetic, calibrated)")
    args.out = pathlib.Path(args.out)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    stem = f"rules_eval_{args.model}" + ("_quick" if args.quick else "")
    if args.report:
        documents = [json.loads(pathlib.Path(f).read_text()) for f in args.report]
        report(documents, args.out / f"{pathlib.Path(args.report[0]).stem}.png", args.levels, args.error_levels)
        return 0

    from liteattn.demo.sample import GUIDANCE

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        # float32 means float32: TF32 matmuls and convolutions (the patch embedding) would add their own error.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.guidance = GUIDANCE if args.guidance is None else args.guidance
    args.warmup = device.type == "cuda"
    budget = Budget(args.budget if args.budget is not None else (240.0 if device.type == "cuda" else 0.0))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(model=args.model, card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                dtype=args.dtype, torch=torch.__version__, triton=triton_version,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), steps=args.steps,
                guidance=args.guidance, seed=args.seed, prompt_seed=args.prompt_seed, tiles=args.tiles,
                frames=args.frames, size=args.size, budget_seconds=budget.seconds, quick=args.quick,
                calibrate_on=args.calibrate_on, argv=sys.argv[1:] if argv is None else list(argv))
    results = Results(args.out / f"{stem}.json", meta)
    results.save()
    log(f"rules_eval: {args.model} model, {meta['card']} {args.dtype}, {args.steps} steps, {args.num_prompts} "
        f"prompts, tiles {args.tiles}, stages {sorted(args.stages)}, budget "
        f"{budget.seconds or 'none'} s -> {results.path}")

    demo = None
    if args.stages & {"fixed", "calibrated"}:
        with results.stage(f"{args.model} model: load, dense run"):
            demo = DemoEval(args, results, budget, device, dtype)
            demo.warm_up_and_dense()
        if demo is not None and demo.dense is None:
            demo = None
    calibrate = False
    if "calibrated" in args.stages:
        calibrate, note = calibration_available()
        results.data["calibration"].update(available=calibrate, note="" if calibrate else note)
        log(note)
    for i, tile in enumerate(args.tiles):
        if demo is not None and "fixed" in args.stages:
            demo.fixed(tile)
        if i == 0 and "synthetic" in args.stages:
            with results.stage("synthetic inputs"):
                synthetic(args, results, budget, device)
        if demo is not None and calibrate:
            demo.calibrated(tile)
    if demo is not None and calibrate and args.refresh:  # re-admission (issue 13, item 3): after the rest
        for tile in args.tiles[:1]:
            demo.calibrated(tile, refresh=True)
    results.save()
    log(f"done in {budget.elapsed():.0f} s: {results.path}")
    report([results.data], results.path.with_suffix(".png"), args.levels, args.error_levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
