"""The demo's pictures: ``demo.gif`` (per prompt, under its text: dense | liteattn | |difference| x8) and
``skip_mask.png`` (one layer's computed tiles at the last step, each head). Both take their clip shape from what
they are given (the videos' frames and size; the mask figure's ``frames`` and ``tokens_per_frame``), so the small
and the large demo model draw through the same code."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import data
from .sample import to_uint8

__all__ = ["AMPLIFY", "LINE_HEIGHT", "write_gif", "mask_figure", "write_mask_png"]

AMPLIFY = 8  # the difference panel shows |liteattn - dense| times this
LINE_HEIGHT = 14  # pixels per line of text in the GIF (PIL's default font)

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


def mask_figure(mask: Optional[torch.Tensor], layer: int, threshold: float, tile: int, *,
                frames: int = data.FRAMES, tokens_per_frame: int = data.SIZE * data.SIZE // 16):
    """The figure of :func:`write_mask_png` (a matplotlib ``Figure`` on an Agg canvas). Its margins are fixed in
    inches, wide enough for the tick labels, axis labels and titles, so everything lies inside it. ``frames`` and
    ``tokens_per_frame`` (default: the small model's 16 frames of 256 tokens) place the frame boundaries."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heads = mask.shape[0] if mask is not None else 1
    every = -(-frames // 16)  # at most 16 frame lines an axis (the large model's 32 frames: every second one)
    lines = "frames" if every == 1 else f"every {every} frames"
    title = textwrap.wrap(f"blocks.{layer}.attn1 at the last step, threshold {threshold:g}: black = computed "
                          f"({tile}x{tile}-token tiles; orange lines: {lines})", width=55 * heads)
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
    tiles_per_frame = tokens_per_frame / tile
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
            for f in range(every, frames, every):
                ax.axhline(f * tiles_per_frame - 0.5, color="tab:orange", linewidth=0.5)
                ax.axvline(f * tiles_per_frame - 0.5, color="tab:orange", linewidth=0.5)
    fig.suptitle("\n".join(title), fontsize="small", y=1 - 0.08 / height, va="top")
    return fig


def write_mask_png(path, mask: Optional[torch.Tensor], layer: int, threshold: float, tile: int,
                   **clip) -> None:
    """Heatmap of the computed tiles (one panel per head) of one layer at the last step (``clip``: ``frames`` and
    ``tokens_per_frame`` of :func:`mask_figure`)."""
    mask_figure(mask, layer, threshold, tile, **clip).savefig(str(path), format="png")
