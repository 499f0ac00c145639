"""The measurements of bench/rules_eval.py: the demo model sampled densely and through ``liteattn.enable`` (fixed
thresholds, calibrated targets; :class:`DemoEval`), and the structured synthetic inputs (:func:`synthetic`). Each
appends its rows to a :class:`rules_eval_common.Results` within a :class:`rules_eval_common.Budget`."""

from __future__ import annotations

import inspect
import math
import pathlib
import time
from typing import Dict, Optional, Tuple

import torch

from demo_quality import summarize
from rules_eval_common import Budget, Results, log

SYNTHETIC_LAYERS = ((0.3, 3.0), (0.03, 0.3))  # sharpness ranges over heads: a local "layer" and a broad one


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
