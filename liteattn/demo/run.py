"""``liteattn demo``: a shipped model sampled twice from the same seeds, full attention then liteattn.

    liteattn demo --out liteattn_demo                 # CPU: a few minutes; CUDA: seconds
    liteattn demo --model large                       # the large model (the default on CUDA when it is installed)
    liteattn demo --threshold -6 --steps 30 --prompts "red circle moving left" "blue square moving up"

Writes to ``--out``: ``demo.gif`` (per prompt, under its text: dense | liteattn | |difference| x8),
``sparsity.png`` (per denoising step, each layer and the mean), ``skip_mask.png`` (one layer's computed tiles at
the last step, each head) and ``report.json``; prints the same numbers as a table. :func:`compare` is the
measurement behind both the demo and ``bench/demo_quality.py``.

Which model: ``--weights PATH`` runs that file (its metadata says what it is; ``--model`` is then ignored, with a
note); else ``--model small|large``, by default :func:`default_model`. The pictures (:mod:`liteattn.demo.pictures`)
and the sampling take the model's own clip shape (``model.video_shape``).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
import time
from typing import Dict, Optional, Sequence

import torch

from . import DEFAULT_CRITERION, data
from .metrics import psnr, ssim
from .pictures import write_gif, write_mask_png
from .sample import DEFAULT_PROMPTS, GUIDANCE, AttentionTimer, make_scheduler, sample

__all__ = ["run_dense", "run_liteattn", "compare", "default_model", "main"]

MODELS = ("small", "large")

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed_sample(model, tokens, **sample_kwargs) -> dict:
    """``videos``, ``attention_seconds`` (inside the self-attention modules) and ``total_seconds`` of one sampling."""
    device = model.token_embedding.weight.device
    _sync(device)
    start = time.perf_counter()
    with AttentionTimer(model.transformer) as timer:
        videos = sample(model, tokens, **sample_kwargs)
    _sync(device)
    return dict(videos=videos, attention_seconds=timer.seconds, total_seconds=time.perf_counter() - start)


def run_dense(model, tokens, *, steps: int, guidance: float = GUIDANCE, seed: int = 0, on_step=None) -> dict:
    """Sample with the model's own attention processors. Returns ``videos``, ``attention_seconds``, ``total_seconds``."""
    return _timed_sample(model, tokens, steps=steps, guidance=guidance, seed=seed, on_step=on_step)


def run_liteattn(model, tokens, threshold: float, *, steps: int, guidance: float = GUIDANCE, seed: int = 0,
                 masks: bool = False, plot_path=None, on_step=None, **enable_kwargs) -> dict:
    """Sample through :func:`liteattn.enable` (disabled again afterwards).

    Returns ``videos``, ``stats`` (the handle's), ``attention_seconds``, ``total_seconds`` and, with ``masks``,
    ``masks``: per block, bool ``(H, Mq, Nk)``, the tiles its self-attention computed for the first video's
    conditional branch at the last step. ``plot_path``: where to write the handle's sparsity plot.
    """
    import liteattn

    scheduler = make_scheduler()  # the handle follows its steps: no host read of the timestep per call
    enable_kwargs.setdefault("criterion", DEFAULT_CRITERION)
    handle = liteattn.enable(model.transformer, threshold=threshold, scheduler=scheduler, **enable_kwargs)
    calls_per_step = 2 if guidance != 1.0 else 1
    seen: Dict[int, int] = {}  # block -> calls so far
    last: Dict[int, Optional[torch.Tensor]] = {}  # block -> read list of its conditional call at the last step
    hooks = []
    if masks:
        def capture(block: int, module, args):
            seen[block] = seen.get(block, 0) + 1
            if seen[block] != (steps - 1) * calls_per_step + 1:  # only the last step's first (conditional) call
                return
            state = getattr(getattr(module.processor, "attention", None), "skip_state", None)
            # The read list is what this call computes (None on a run's very first call: everything).
            last[block] = state.to_dense()[0].cpu() if state is not None else None

        for i, block in enumerate(model.transformer.blocks):
            hooks.append(block.attn1.register_forward_pre_hook(functools.partial(capture, i)))
    try:
        result = _timed_sample(model, tokens, steps=steps, guidance=guidance, seed=seed, on_step=on_step,
                               scheduler=scheduler)
        stats = handle.stats()
        if plot_path is not None:
            handle.plot(plot_path)
    finally:
        for hook in hooks:
            hook.remove()
        handle.disable()
    return dict(result, stats=stats, masks=last)


def _finite(x: float) -> Optional[float]:
    """JSON has no inf: identical videos (PSNR inf) are written as null."""
    return None if math.isinf(x) or math.isnan(x) else round(float(x), 4)


def compare(model, prompts: Sequence[str], thresholds: Sequence[float], *, steps: int, guidance: float = GUIDANCE,
            seed: int = 0, warmup: bool = False, masks: bool = False, plot_path=None, progress=None,
            **enable_kwargs) -> dict:
    """Dense sampling of ``prompts``, then liteattn at each threshold from the same noise; metrics against dense.

    Returns ``{"dense": run, "liteattn": [run per threshold]}`` where each liteattn run also holds ``psnr_db`` and
    ``ssim`` (lists, one per prompt). ``warmup``: run one short untimed pass of each first (Triton autotuning,
    CUDA start-up). ``progress``: a tqdm-like object, advanced once per denoising step.
    """
    tokens = data.tokenize(prompts)
    on_step = (lambda i: progress.update(1)) if progress is not None else None
    if warmup:
        run_dense(model, tokens, steps=2, guidance=guidance, seed=seed)
        run_liteattn(model, tokens, thresholds[0], steps=2, guidance=guidance, seed=seed, **enable_kwargs)
    dense = run_dense(model, tokens, steps=steps, guidance=guidance, seed=seed, on_step=on_step)
    runs = []
    for threshold in thresholds:
        run = run_liteattn(model, tokens, threshold, steps=steps, guidance=guidance, seed=seed, on_step=on_step,
                           masks=masks, plot_path=plot_path, **enable_kwargs)
        run["threshold"] = threshold
        run["psnr_db"] = psnr(run["videos"], dense["videos"]).tolist()
        run["ssim"] = ssim(run["videos"], dense["videos"]).tolist()
        runs.append(run)
    return {"dense": dense, "liteattn": runs}


def default_model(device, large_available: bool) -> str:
    """The model ``liteattn demo`` runs without ``--model`` or ``--weights``: ``"large"`` on CUDA when its weights file
    is installed (``large_available``), else ``"small"``; on the CPU always ``"small"``."""
    return "large" if torch.device(device).type == "cuda" and large_available else "small"


def _chosen_weights(args, device, fail) -> tuple:
    """``(name, path)``: ``name`` is ``"small"``, ``"large"`` or ``None`` for ``--weights`` (which wins over
    ``--model``: a note says so when both are given)."""
    from . import model as models  # (looked up at call time: tests move WEIGHTS_LARGE)

    name, weights = getattr(args, "model", None), getattr(args, "weights", None)
    if weights is not None:
        if name is not None:
            print(f"liteattn demo: --model {name} ignored: --weights {weights} decides the model", file=sys.stderr)
        return None, pathlib.Path(weights)
    large = pathlib.Path(models.WEIGHTS_LARGE)
    name = name or default_model(device, large.is_file())
    if name not in MODELS:
        fail(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
    if name == "large" and not large.is_file():
        fail(f"--model large: the large model's weights file is not installed ({large}). Install a liteattn version "
             f"that ships it, or export it from a training checkpoint: python -m liteattn.demo.train --export "
             f"CHECKPOINT --export-frames 32 --weights {large}; or run any demo weights file with --weights PATH")
    return name, large if name == "large" else pathlib.Path(models.WEIGHTS)


def _clip(model) -> dict:
    """The model's clip: ``frames``, ``size``, ``tokens`` and, after patching, ``latent_frames`` and
    ``tokens_per_frame``."""
    frames, size = model.video_shape
    pt, ph, pw = model.config["patch_size"]
    per_frame = (size // ph) * (size // pw)
    return dict(frames=frames, size=size, latent_frames=frames // pt, tokens_per_frame=per_frame,
                tokens=frames // pt * per_frame)


def _require_demo_dependencies() -> None:
    import importlib.util

    missing = [name for name in ("diffusers", "safetensors", "matplotlib", "imageio", "PIL", "tqdm")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"liteattn demo needs {', '.join(missing)}: pip install 'liteattn[demo]'")


def _checked_arguments(args):
    """``(device, prompts, out folder, (model name, weights path))`` from the command's options (name ``None`` for
    ``--weights``); a bad option exits with a message naming it."""

    def fail(message: str):
        raise SystemExit(f"liteattn demo: {message}")

    from ..criteria import check_threshold
    from ..skip import check_tile

    try:
        threshold = check_threshold(args.threshold)
    except (ValueError, TypeError) as exc:
        fail(f"--threshold: {exc}")
    if math.isnan(threshold) or threshold > 0:  # (+inf too: the demo compares against dense, so it must keep tiles)
        fail(f"--threshold must be <= 0 (log2 units) or -inf, got {args.threshold}")
    if args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        fail(f"--guidance must be a finite number >= 0 (1: no guidance), got {args.guidance}")
    if args.seed < 0:
        fail(f"--seed must be >= 0, got {args.seed}")
    try:
        check_tile("--tile", args.tile)
    except ValueError as exc:
        fail(f"{exc} (the GPU kernel takes 64 or 128)")
    if args.prompts is None and not 1 <= args.num_prompts <= len(DEFAULT_PROMPTS):
        fail(f"--num-prompts must be between 1 and {len(DEFAULT_PROMPTS)} (the built-in prompts), got "
             f"{args.num_prompts}; pass your own with --prompts")
    prompts = list(args.prompts or DEFAULT_PROMPTS[:args.num_prompts])
    try:
        data.tokenize(prompts)
    except ValueError as exc:
        fail(f"--prompts: {exc}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError, TypeError):  # what torch raises for a bad device string varies by version
        fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            fail(f"--device {args.device}: there are {count} CUDA GPUs (cuda:0 ... cuda:{count - 1})")
    elif device.type != "cpu":
        fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    return device, prompts, out, _chosen_weights(args, device, fail)


def main(args) -> int:
    """The ``liteattn demo`` command (``args`` from :mod:`liteattn.cli`)."""
    import logging

    _require_demo_dependencies()
    from tqdm.auto import tqdm

    from .model import load_model

    device, prompts, out, (name, path) = _checked_arguments(args)  # bad options fail here, before the model loads
    if not args.verbose:  # the handle's "enabled on ..." line would cut through the progress bar
        logging.getLogger("liteattn").setLevel(logging.WARNING)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        model = load_model(path, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"liteattn demo: {'--weights' if name is None else '--model ' + name}: {exc}") from None
    kind = name or ("large" if model.text or model.video.get("data") == "textured" else "small")
    clip = _clip(model)
    out.mkdir(parents=True, exist_ok=True)
    print(f"liteattn demo: {kind} model{'' if name else f' from {path}'} ({clip['frames']} frames of {clip['size']}x"
          f"{clip['size']}, {clip['tokens']} tokens), {len(prompts)} prompts, {args.steps} steps, guidance "
          f"{args.guidance}, threshold {args.threshold:g} (log2), {device} {str(dtype).replace('torch.', '')}, "
          f"seed {args.seed}")
    if kind == "large" and device.type == "cpu":
        print(f"liteattn demo: warning: the large model samples {clip['tokens']} tokens a clip, which takes very long "
              f"on a CPU (--model small is the CPU's default)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    calls = 2 if args.guidance != 1.0 else 1
    with tqdm(total=2 * args.steps, unit="step", desc="dense, then liteattn", disable=args.quiet) as bar:
        result = compare(model, prompts, [args.threshold], steps=args.steps, guidance=args.guidance, seed=args.seed,
                         warmup=device.type == "cuda", masks=True, plot_path=out / "sparsity.png",
                         progress=bar, tile_q=args.tile, tile_k=args.tile)
    dense, lite = result["dense"], result["liteattn"][0]
    write_gif(out / "demo.gif", dense["videos"], lite["videos"], args.threshold, prompts=prompts,
              scale=max(1, round(128 / clip["size"])))  # panels of about 128 pixels: the small model's doubled
    # The heatmap shows the block that skipped most at the last step (a dense one would be a black square).
    last_step = {i: lite["stats"]["steps"][-1]["layers"].get(f"transformer.blocks.{i}.attn1", 0.0)
                 for i in range(len(model.transformer.blocks))}
    mask_layer = max(last_step, key=lambda i: (last_step[i], -i))
    write_mask_png(out / "skip_mask.png", lite["masks"].get(mask_layer), mask_layer, args.threshold, args.tile,
                   frames=clip["latent_frames"], tokens_per_frame=clip["tokens_per_frame"])
    stats = lite["stats"]
    report = {
        "model": kind,
        "weights": str(path),
        "video": {key: clip[key] for key in ("frames", "size", "tokens")},
        "threshold": args.threshold if math.isfinite(args.threshold) else str(args.threshold),
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "prompts": prompts,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "tile": args.tile,
        "transformer_calls_per_step": calls,
        "sparsity_per_step": [round(s, 4) for s in stats["sparsity"]],
        "sparsity_mean": round(stats["mean_sparsity"], 4),
        "sparsity_per_layer": {name.split("transformer.", 1)[-1]: round(sum(v) / len(v), 4)
                               for name, v in stats["layers"].items()},
        "psnr_db": [_finite(x) for x in lite["psnr_db"]],
        "ssim": [round(x, 5) for x in lite["ssim"]],
        "dense": {"attention_seconds": round(dense["attention_seconds"], 3),
                  "total_seconds": round(dense["total_seconds"], 3)},
        "liteattn": {"attention_seconds": round(lite["attention_seconds"], 3),
                     "total_seconds": round(lite["total_seconds"], 3)},
        "attention_seconds_note": "wall time inside the video self-attention modules (blocks.*.attn1: projections, "
                                  "rotary embedding, attention); on the CPU liteattn runs its PyTorch reference, "
                                  "which computes every score and is slower than dense; the speed-up needs the "
                                  "Triton kernel (CUDA)",
        "psnr_note": "liteattn vs dense from the same noise; null means identical",
        "files": ["demo.gif", "sparsity.png", "skip_mask.png", "report.json"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    _print_table(report)
    print(f"wrote {out / 'demo.gif'}, {out / 'sparsity.png'}, {out / 'skip_mask.png'}, {out / 'report.json'}")
    return 0


def _print_table(report: dict) -> None:
    width = max(len(p) for p in report["prompts"])
    print(f"\n{'prompt':<{width}}  {'PSNR dB':>8}  {'SSIM':>6}")
    for prompt, p, s in zip(report["prompts"], report["psnr_db"], report["ssim"]):
        print(f"{prompt:<{width}}  {('identical' if p is None else f'{p:.2f}'):>8}  {s:>6.4f}")
    steps = report["sparsity_per_step"]
    shown = ", ".join(f"{s:.0%}" for s in steps[:: max(1, len(steps) // 8)])
    print(f"\nsparsity (mean over layers): {report['sparsity_mean']:.1%} over the run; per step: {shown}")
    print(f"{'':<22}{'dense':>10}{'liteattn':>10}")
    for key, label in (("attention_seconds", "self-attention s"), ("total_seconds", "total s")):
        print(f"{label:<22}{report['dense'][key]:>10.2f}{report['liteattn'][key]:>10.2f}")
