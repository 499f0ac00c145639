"""Procedural videos of coloured shapes that move and bounce, with short prompts; generated on the fly.

    from liteattn.demo import data
    batch = data.sample_scenes(64, seed=0)                 # Scenes: the parameters of 64 videos (on the CPU)
    video = data.render(batch.to("cuda"))                  # (64, 3, 16, 64, 64) float32 in [-1, 1]
    batch.prompts()[0]                                     # 'red circle moving left, blue square moving down'
    batch.tokens                                           # (64, MAX_TOKENS) int64 token ids, PAD-padded

Everything is deterministic by seed: scene parameters come from one ``torch.Generator`` on the CPU (cheap: a few
numbers per shape) and rendering is a closed-form, vectorised function of them, so the same seed gives the same
video on any device, up to float rounding. Rendering a batch of 64 videos is one pass of elementwise tensor ops.

A scene: a vertical gradient background of two dark colours; one to three shapes (circle, square, triangle),
each with a colour from ``COLOURS``, a radius, a start position and a velocity along one of eight directions;
positions bounce off the frame edges. The prompt names colour, shape and start direction of each shape in
drawing order (later shapes are drawn on top): ``"<colour> <shape> moving <direction>, ..."``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

__all__ = ["FRAMES", "SIZE", "MAX_SHAPES", "MAX_TOKENS", "COLOURS", "SHAPES", "DIRECTIONS", "VOCAB",
           "Scenes", "sample_scenes", "render", "tokenize", "detokenize"]

FRAMES, SIZE = 16, 64
MAX_SHAPES = 3
# Colour name -> RGB in [0, 1].
COLOURS = {
    "red": (0.92, 0.15, 0.12), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.35, 0.95), "yellow": (0.95, 0.88, 0.15),
    "cyan": (0.10, 0.85, 0.90), "magenta": (0.90, 0.20, 0.85), "white": (0.95, 0.95, 0.95), "orange": (0.98, 0.55, 0.10),
}
SHAPES = ("circle", "square", "triangle")
# Direction name -> unit velocity (dx, dy) in image coordinates (y grows downwards).
_D = 1 / math.sqrt(2)
DIRECTIONS = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-left": (-_D, -_D), "up-right": (_D, -_D), "down-left": (-_D, _D), "down-right": (_D, _D),
}
PAD = "<pad>"
VOCAB = (PAD, ",", "moving") + tuple(COLOURS) + SHAPES + tuple(DIRECTIONS)
_TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
TOKENS_PER_SHAPE = 4  # colour shape moving direction
MAX_TOKENS = 16  # 3 shapes x 4 words + 2 commas = 14, padded to 16; an all-PAD prompt is the unconditional one

_COLOUR_RGB = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (8, 3)
_DIRECTION_XY = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)  # (8, 2)


@dataclass
class Scenes:
    """The parameters of a batch of ``N`` videos; tensors with a leading ``N`` (and ``MAX_SHAPES``) dimension.

    ``active`` bool (N, 3): which shape slots are drawn (the first ``count`` ones); ``shape``, ``colour``,
    ``direction`` int64 (N, 3): indices into SHAPES, COLOURS, DIRECTIONS; ``radius`` (N, 3) and ``start`` (N, 3, 2)
    in pixels; ``speed`` (N, 3) pixels per frame; ``background`` (N, 2, 3): top and bottom RGB in [0, 1].
    """

    active: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    direction: torch.Tensor
    radius: torch.Tensor
    start: torch.Tensor
    speed: torch.Tensor
    background: torch.Tensor

    def to(self, device) -> "Scenes":
        return Scenes(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def __len__(self) -> int:
        return self.active.shape[0]

    def prompts(self) -> List[str]:
        out = []
        for n in range(len(self)):
            parts = [f"{list(COLOURS)[int(self.colour[n, s])]} {SHAPES[int(self.shape[n, s])]} moving "
                     f"{list(DIRECTIONS)[int(self.direction[n, s])]}" for s in range(MAX_SHAPES) if self.active[n, s]]
            out.append(", ".join(parts))
        return out

    @property
    def tokens(self) -> torch.Tensor:
        """(N, MAX_TOKENS) int64 token ids of the prompts, on the CPU."""
        return tokenize(self.prompts())


def sample_scenes(n: int, seed: int, *, max_shapes: int = MAX_SHAPES) -> Scenes:
    """``n`` random scenes, a deterministic function of ``seed`` (and ``n``); tensors on the CPU."""
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be in [1, {MAX_SHAPES}], got {max_shapes}")
    g = torch.Generator().manual_seed(int(seed))
    u = lambda *shape: torch.rand(*shape, generator=g)
    count = torch.randint(1, max_shapes + 1, (n,), generator=g)
    active = torch.arange(MAX_SHAPES)[None, :] < count[:, None]
    shape = torch.randint(0, len(SHAPES), (n, MAX_SHAPES), generator=g)
    # Distinct colours within a video, so that the prompt tells the shapes apart.
    colour = torch.argsort(u(n, len(COLOURS)), dim=1)[:, :MAX_SHAPES]
    direction = torch.randint(0, len(DIRECTIONS), (n, MAX_SHAPES), generator=g)
    radius = 5.0 + 5.0 * u(n, MAX_SHAPES)
    # Start in the half of the frame that the motion leaves, so that most of the video moves as the prompt says
    # (a fast shape still bounces once).
    heading = _DIRECTION_XY[direction]  # (n, 3, 2)
    along = u(n, MAX_SHAPES, 2)
    where = torch.where(heading > 0, 0.5 * along, torch.where(heading < 0, 1 - 0.5 * along, along))
    start = radius[..., None] + (SIZE - 2 * radius[..., None]) * where
    speed = 1.2 + 1.8 * u(n, MAX_SHAPES)
    dark = 0.05 + 0.35 * u(n, 2, 3)  # dark backgrounds keep the shapes' colours readable
    return Scenes(active, shape, colour, direction, radius, start, speed, dark)


def _bounce(position: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Fold an unbounded 1-D trajectory into [low, high] by reflection at both ends (a triangle wave)."""
    span = (high - low).clamp_min(1e-6)
    phase = torch.remainder(position - low, 2 * span)
    return low + span - (phase - span).abs()


def render(scenes: Scenes, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """The videos of ``scenes``, ``(N, 3, frames, size, size)`` float32 in [-1, 1], on ``scenes``' device.

    Anti-aliased edges: coverage is ``clamp(0.5 - signed_distance, 0, 1)`` with the distance in pixels.
    """
    device = scenes.active.device
    n = len(scenes)
    t = torch.arange(frames, dtype=torch.float32, device=device)  # (T,)
    pix = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    # Background: vertical gradient between the two colours. (N, 3, 1, size, 1)
    ramp = (pix / size).view(1, 1, 1, size, 1)
    top = scenes.background[:, 0].view(n, 3, 1, 1, 1)
    bottom = scenes.background[:, 1].view(n, 3, 1, 1, 1)
    video = (top + (bottom - top) * ramp).expand(n, 3, frames, size, size).clone()

    velocity = _DIRECTION_XY.to(device)[scenes.direction] * scenes.speed[..., None]  # (N, S, 2)
    radius = scenes.radius[..., None]  # (N, S, 1)
    free = scenes.start[:, :, None, :] + velocity[:, :, None, :] * t[None, None, :, None]  # (N, S, T, 2)
    centre = _bounce(free, radius[..., None], size - radius[..., None])  # (N, S, T, 2)
    rgb = _COLOUR_RGB.to(device)[scenes.colour]  # (N, S, 3)

    for s in range(MAX_SHAPES):
        dx = pix.view(1, 1, 1, size) - centre[:, s, :, 0].view(n, frames, 1, 1)  # (N, T, 1, W)
        dy = pix.view(1, 1, size, 1) - centre[:, s, :, 1].view(n, frames, 1, 1)  # (N, T, H, 1)
        r = scenes.radius[:, s].view(n, 1, 1, 1)
        circle = torch.sqrt(dx * dx + dy * dy) - r
        square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r  # about the circle's area
        # Upward triangle inscribed in the circle of radius 1.1 r: three half-planes (edge normals at 90, 210,
        # 330 degrees), its signed distance approximated by the largest one.
        rt = 1.1 * r
        triangle = torch.maximum(torch.maximum(dy - 0.5 * rt, -0.866 * dx - 0.5 * dy - 0.5 * rt),
                                 0.866 * dx - 0.5 * dy - 0.5 * rt)
        kind = scenes.shape[:, s].view(n, 1, 1, 1)
        distance = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))  # (N, T, H, W)
        cover = (0.5 - distance).clamp(0.0, 1.0) * scenes.active[:, s].view(n, 1, 1, 1)
        cover = cover[:, None]  # (N, 1, T, H, W)
        video = video * (1 - cover) + rgb[:, s].view(n, 3, 1, 1, 1) * cover
    return video * 2 - 1


def tokenize(prompts: Sequence[str]) -> torch.Tensor:
    """Prompts in the fixed vocabulary -> ``(N, MAX_TOKENS)`` int64 ids, PAD-padded; "" is the unconditional prompt.

    Words are separated by spaces; commas may touch a word. Raises ValueError for an unknown word or a prompt
    longer than MAX_TOKENS tokens.
    """
    ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.int64)  # PAD is 0
    for n, prompt in enumerate(prompts):
        words = prompt.lower().replace(",", " , ").split()
        unknown = [w for w in words if w not in _TOKEN_ID or w == PAD]
        if unknown:
            raise ValueError(f"prompt {prompt!r}: unknown words {unknown}; the vocabulary is {list(VOCAB[1:])}")
        if len(words) > MAX_TOKENS:
            raise ValueError(f"prompt {prompt!r} has {len(words)} tokens; at most {MAX_TOKENS} fit")
        ids[n, :len(words)] = torch.tensor([_TOKEN_ID[w] for w in words], dtype=torch.int64)
    return ids


def detokenize(ids: torch.Tensor) -> List[str]:
    """Inverse of :func:`tokenize` (PAD dropped)."""
    out = []
    for row in ids.tolist():
        words = [VOCAB[i] for i in row if i != 0]
        out.append(" ".join(words).replace(" ,", ","))
    return out

