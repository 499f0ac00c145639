"""``liteattn demo``: the shipped model sampled twice from the same seeds, full attention then liteattn.

    liteattn demo --out liteattn_demo                 # CPU: a few minutes; CUDA: seconds
    liteattn demo --threshold -6 --steps 30 --prompts "red circle moving left" "blue square moving up"

Writes to ``--out``: ``demo.gif`` (per prompt, under its text: dense | liteattn | |difference| x8),
``sparsity.png`` (per denoising step, each layer and the mean), ``skip_mask.png`` (one layer's computed tiles at
the last step, each head) and ``report.json``; prints the same numbers as a table. :func:`compare` is the
measurement behind both the demo and ``bench/demo_quality.py``.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Dict, Optional, Sequence

import torch

from . import DEFAULT_CRITERION, data
from .metrics import psnr, ssim
from .sample import DEFAULT_PROMPTS, GUIDANCE, AttentionTimer, make_scheduler, sample, to_uint8

__all__ = ["run_dense", "run_liteattn", "compare", "main"]

AMPLIFY = 8  # the difference panel shows |liteattn - dense| times this
LINE_HEIGHT = 14  # pixels per line of text in the GIF (PIL's default font)


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


def _text_band(lines: Sequence[str], width: int, height: int):
    """A black ``(height, width, 3)`` uint8 band with ``lines`` of light text, one under the other."""
    import numpy as np
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for n, line in enumerate(lines):
        draw.text((3, 1 + n * LINE_HEIGHT), line, fill=(255, 214, 120))  # amber: not the column labels
    return np.asarray(band)


def _wrap(text: str, width: int) -> list:
    """``text`` broken at spaces into lines that fit ``width`` pixels in PIL's default font (a word longer than
    the width gets a line of its own)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width - 6:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _labelled(frames, labels: Sequence[str], width: int):
    """``frames (T, H, W, 3)`` uint8 numpy with a header row of ``labels``, one per panel of ``width`` pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    header = Image.new("RGB", (frames.shape[2], LINE_HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(header)
    for i, label in enumerate(labels):
        draw.text((i * width + 3, 1), label, fill=(230, 230, 230))
    header = np.asarray(header)[None].repeat(frames.shape[0], axis=0)
    return np.concatenate([header, frames], axis=1)


def write_gif(path, dense: torch.Tensor, lite: torch.Tensor, threshold: float, scale: int = 2,
              prompts: Optional[Sequence[str]] = None) -> None:
    """Per prompt a row: dense | liteattn | |liteattn - dense| x AMPLIFY, upscaled ``scale`` times, under a band
    with the prompt's text (wrapped to the row's width; every band as tall as the longest)."""
    import imageio.v2 as imageio
    import numpy as np

    difference = ((lite - dense).abs() * AMPLIFY - 1).clamp(-1, 1)  # 0 -> black
    rows = [torch.cat([to_uint8(v[i:i + 1])[0] for v in (dense, lite, difference)], dim=2).numpy()
            for i in range(dense.shape[0])]  # each (T, H, 3W, 3)
    rows = [row.repeat(scale, axis=1).repeat(scale, axis=2) for row in rows]
    if prompts is not None:
        if len(prompts) != len(rows):
            raise ValueError(f"{len(prompts)} prompts for {len(rows)} videos")
        row_width = rows[0].shape[2]
        wrapped = [_wrap(prompt, row_width) for prompt in prompts]
        height = LINE_HEIGHT * max(len(lines) for lines in wrapped) + 2
        bands = [_text_band(lines, row_width, height)[None].repeat(row.shape[0], axis=0)
                 for lines, row in zip(wrapped, rows)]
        rows = [part for band, row in zip(bands, rows) for part in (band, row)]
    frames = np.concatenate(rows, axis=1)
    width = dense.shape[-1] * scale
    frames = _labelled(frames, ["dense", f"liteattn {threshold:g}", f"|diff| x{AMPLIFY}"], width)
    imageio.mimsave(str(path), list(np.ascontiguousarray(frames)), duration=0.125, loop=0)


def mask_figure(mask: Optional[torch.Tensor], layer: int, threshold: float, tile: int):
    """The figure of :func:`write_mask_png` (a matplotlib ``Figure`` on an Agg canvas). Its margins are fixed in
    inches, wide enough for the tick labels, axis labels and titles, so everything lies inside it."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heads = mask.shape[0] if mask is not None else 1
    title = textwrap.wrap(f"blocks.{layer}.attn1 at the last step, threshold {threshold:g}: black = computed "
                          f"({tile}x{tile}-token tiles; orange lines: frames)", width=55 * heads)
    # Margins in inches: left for the y tick labels and "query tile", bottom for the x tick labels and "key tile"
    # (tight_layout with these aspect-locked images cut "key tile" off), top for the panel titles and the title.
    left, right, bottom, top, gap = 0.7, 0.15, 0.6, 0.45 + 0.2 * len(title), 0.25
    width = 3.2 * heads
    side = (width - left - right) / (heads + gap * (heads - 1))  # of each (square) panel
    height = side + bottom + top
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap)
    axes = fig.subplots(1, heads, squeeze=False)[0]
    tiles_per_frame = data.SIZE * data.SIZE // 16 / tile  # 4x4 patches: 256 tokens a frame
    for h, ax in enumerate(axes):
        if mask is None:
            ax.text(0.5, 0.5, "no skip state (dense)", ha="center", va="center")
            ax.set_axis_off()
            continue
        ax.imshow(mask[h].float().numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {h}: {1 - mask[h].float().mean().item():.0%} skipped", fontsize="small")
        ax.set_xlabel("key tile")
        if h == 0:
            ax.set_ylabel("query tile")
        if tiles_per_frame >= 1:  # frame boundaries
            for f in range(1, data.FRAMES):
                ax.axhline(f * tiles_per_frame - 0.5, color="tab:orange", linewidth=0.5)
                ax.axvline(f * tiles_per_frame - 0.5, color="tab:orange", linewidth=0.5)
    fig.suptitle("\n".join(title), fontsize="small", y=1 - 0.08 / height, va="top")
    return fig


def write_mask_png(path, mask: Optional[torch.Tensor], layer: int, threshold: float, tile: int) -> None:
    """Heatmap of the computed tiles (one panel per head) of one layer at the last step."""
    mask_figure(mask, layer, threshold, tile).savefig(str(path), format="png")


def _require_demo_dependencies() -> None:
    import importlib.util

    missing = [name for name in ("diffusers", "safetensors", "matplotlib", "imageio", "PIL", "tqdm")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"liteattn demo needs {', '.join(missing)}: pip install 'liteattn[demo]'")


def _checked_arguments(args):
    """``(device, prompts, out folder)`` from the command's options; a bad option exits with a message naming it."""

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
    return device, prompts, out


def main(args) -> int:
    """The ``liteattn demo`` command (``args`` from :mod:`liteattn.cli`)."""
    import logging

    _require_demo_dependencies()
    from tqdm.auto import tqdm

    from .model import load_model

    device, prompts, out = _checked_arguments(args)  # every bad option fails here, before the model loads
    if not args.verbose:  # the handle's "enabled on ..." line would cut through the progress bar
        logging.getLogger("liteattn").setLevel(logging.WARNING)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        model = load_model(args.weights, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"liteattn demo: --weights: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    print(f"liteattn demo: {len(prompts)} prompts, {args.steps} steps, guidance {args.guidance}, threshold "
          f"{args.threshold:g} (log2), {device} {str(dtype).replace('torch.', '')}, seed {args.seed}")
    started = time.perf_counter()
    calls = 2 if args.guidance != 1.0 else 1
    with tqdm(total=2 * args.steps, unit="step", desc="dense, then liteattn", disable=args.quiet) as bar:
        result = compare(model, prompts, [args.threshold], steps=args.steps, guidance=args.guidance, seed=args.seed,
                         warmup=device.type == "cuda", masks=True, plot_path=out / "sparsity.png",
                         progress=bar, tile_q=args.tile, tile_k=args.tile)
    dense, lite = result["dense"], result["liteattn"][0]
    write_gif(out / "demo.gif", dense["videos"], lite["videos"], args.threshold, prompts=prompts)
    # The heatmap shows the block that skipped most at the last step (a dense one would be a black square).
    last_step = {i: lite["stats"]["steps"][-1]["layers"].get(f"transformer.blocks.{i}.attn1", 0.0)
                 for i in range(len(model.transformer.blocks))}
    mask_layer = max(last_step, key=lambda i: (last_step[i], -i))
    write_mask_png(out / "skip_mask.png", lite["masks"].get(mask_layer), mask_layer, args.threshold, args.tile)
    stats = lite["stats"]
    report = {
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
