"""Textured procedural videos for the large demo model: camera-moved textured ground, textured shapes, lighting.

    from liteattn.demo import textured
    scenes = textured.sample_scenes(16, seed=0)            # TexturedScenes: the parameters of 16 videos (CPU)
    video = textured.render(scenes.to("cuda"))              # (16, 3, 16, 128, 128) float32 in [-1, 1]
    scenes.prompts()[0]                                     # 'red circle moving left, blue square moving down'
    scenes.tokens                                           # (16, data.MAX_TOKENS) int64, the small model's vocabulary

Why textures: attention in a video diffusion transformer is local in space-time when the content is: a token of a
sharp texture is best denoised from the same texture point in the neighbouring frames, which a camera pan, zoom or
roll keeps within a few tokens. Flat colours (the small model's data) give near-identical keys over large regions, so
its attention spreads over them (issue 14). Everything here has detail at the scale of a 4x4 patch:

- **Ground.** A texture fixed in world coordinates, one of three kinds: blotches (a random lattice, bilinearly
  interpolated and pushed through a steep sigmoid), tiles (a rotated checkerboard with dark joints) or wavy stripes;
  two dark palette colours, and fine grain on top. A camera pans (up to 2.5 px per frame), zooms (up to 3.5% per
  frame, in or out) and rolls (up to 1.2 degrees per frame) over it, so every frame samples the same world.
- **Shapes.** As in :mod:`liteattn.demo.data` (same prompts, same vocabulary, the same scene for the same seed), at
  twice the size: circles, squares and triangles of radius 10-20 px, moving 2.4-6 px per frame and bouncing off the
  frame edges; later shapes occlude earlier ones. Each carries its own pattern (stripes or checks, moving with it)
  and a soft shading, in its prompted colour.
- **Light.** A directional gradient whose direction turns over the clip scales the ground (+-10-35%) and, at half
  strength, the shapes.

- **Regions** (``regions=K`` > 1; default 1, the ground above). The ground is a patchwork: K region centres in world
  coordinates (a Voronoi partition that the camera moves over like the rest of the world), each region with its
  own texture kind, palette, orientation, period and grain. With one texture and palette per clip, a third of a
  token's colour variance is the clip's mean (bench/LARGE_MODEL.md), which rewards attention heads that average
  the whole clip; with regions, far tokens tell less about a token than its neighbours do.

Deterministic by seed: the shapes come from ``data.sample_scenes(n, seed)`` and everything else from a second CPU
generator seeded from ``seed``; rendering is a closed-form, vectorised function of the parameters (one
``grid_sample`` for the lattice noise), so the same seed draws the same video on any device, up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import data

__all__ = ["FRAMES", "SIZE", "LATTICE", "TexturedScenes", "sample_scenes", "render"]

FRAMES, SIZE = 16, 128
LATTICE = 128  # cells per side of the ground's random lattice (it covers what any camera path sees)
_SECOND_STREAM = 0x5EED_7E47  # the texture generator's seed is seed ^ this, kept apart from the shapes' stream
_THIRD_STREAM = 0x7E61_0A5  # the regions' generator (regions > 1 only: the default scenes draw nothing from it)
# Columns of TexturedScenes.region: world centre x, y; texture kind; palette low RGB, high RGB; angle; period; grain.
_REGION_COLUMNS = 12


@dataclass
class TexturedScenes:
    """The parameters of ``N`` textured videos: ``shapes`` (a :class:`data.Scenes`, sizes in this module's pixels)
    and tensors with a leading ``N``.

    Ground: ``ground_kind`` int64 (N,) 0 blotches, 1 tiles, 2 stripes; ``palette`` (N, 2, 3) RGB; ``lattice``
    (N, 2, LATTICE, LATTICE) uniform noise (channel 0 fine, 1 coarse); ``cell`` (N,) lattice cell size in world px;
    ``period`` (N,) tile / stripe period in px; ``angle`` (N,) pattern orientation; ``grain`` (N,) fine-grain
    strength. Camera: ``origin`` (N, 2) world point at the frame centre at t=0; ``pan`` (N, 2) px per frame;
    ``zoom`` (N,) log zoom per frame; ``roll`` (N,) radians per frame. Light: ``light`` (N, 3): strength, start
    angle, angular speed. Shapes: ``pattern`` int64 (N, 3) 0 stripes, 1 checks; ``pattern_period`` (N, 3) px;
    ``pattern_angle`` (N, 3); ``pattern_contrast`` (N, 3). Regions: ``region`` (N, K, 12) or None (one ground):
    per region its world centre (x, y), texture kind, palette (low RGB, high RGB), angle, period and grain.
    """

    shapes: data.Scenes
    ground_kind: torch.Tensor
    palette: torch.Tensor
    lattice: torch.Tensor
    cell: torch.Tensor
    period: torch.Tensor
    angle: torch.Tensor
    grain: torch.Tensor
    origin: torch.Tensor
    pan: torch.Tensor
    zoom: torch.Tensor
    roll: torch.Tensor
    light: torch.Tensor
    pattern: torch.Tensor
    pattern_period: torch.Tensor
    pattern_angle: torch.Tensor
    pattern_contrast: torch.Tensor
    region: Optional[torch.Tensor] = None

    def to(self, device) -> "TexturedScenes":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({k: v.to(device) for k, v in moved.items() if v is not None})
        return TexturedScenes(**moved)

    def __len__(self) -> int:
        return len(self.shapes)

    def prompts(self) -> List[str]:
        return self.shapes.prompts()

    @property
    def tokens(self) -> torch.Tensor:
        """(N, data.MAX_TOKENS) int64 token ids of the prompts, on the CPU."""
        return self.shapes.tokens


def _palette(u, *lead) -> torch.Tensor:
    """Two dark, mostly grey palette colours (a little tint), far enough apart in brightness to make edges:
    ``(*lead, 2, 3)``."""
    grey = 0.06 + 0.26 * u(*lead, 2, 1)
    grey[..., 1, :] = (grey[..., 0, :] + 0.10 + 0.15 * u(*lead, 1)).clamp(max=0.5)
    return (grey * (0.8 + 0.4 * u(*lead, 2, 3))).clamp(0.02, 0.55)


def sample_scenes(n: int, seed: int, *, max_shapes: int = data.MAX_SHAPES, size: int = SIZE,
                  regions: int = 1) -> TexturedScenes:
    """``n`` random textured scenes, a deterministic function of ``seed`` (and ``n``); tensors on the CPU.

    The shapes and prompts are those of ``data.sample_scenes(n, seed)``, scaled from its frame size to ``size``
    (render them at that size); the ground, camera and light do not depend on ``size``. ``regions`` > 1 makes the
    ground a patchwork of that many textured regions (the rest of the scene is the same as with one).
    """
    shapes = data.sample_scenes(n, seed, max_shapes=max_shapes)
    scale = size / data.SIZE
    shapes.radius = shapes.radius * scale
    shapes.start = shapes.start * scale
    shapes.speed = shapes.speed * scale
    g = torch.Generator().manual_seed(int(seed) ^ _SECOND_STREAM)
    u = lambda *shape: torch.rand(*shape, generator=g)
    S = data.MAX_SHAPES
    ground_kind = torch.randint(0, 3, (n,), generator=g)
    palette = _palette(u, n)
    lattice = u(n, 2, LATTICE, LATTICE)
    cell = 3.0 + 3.0 * u(n)
    period = 8.0 + 10.0 * u(n)
    angle = math.pi * u(n)
    grain = 0.10 + 0.25 * u(n)
    origin = (u(n, 2) - 0.5) * 0.2 * LATTICE * cell[:, None]
    pan_speed, pan_angle = 2.5 * u(n).sqrt(), 2 * math.pi * u(n)
    pan = torch.stack([pan_speed * torch.cos(pan_angle), pan_speed * torch.sin(pan_angle)], dim=1)
    zoom = 0.035 * (2 * u(n) - 1)
    roll = 0.021 * (2 * u(n) - 1)
    light = torch.stack([0.10 + 0.25 * u(n), 2 * math.pi * u(n), 0.06 * (2 * u(n) - 1)], dim=1)
    pattern = torch.randint(0, 2, (n, S), generator=g)
    pattern_period = 5.0 + 5.0 * u(n, S)
    pattern_angle = math.pi * u(n, S)
    pattern_contrast = 0.15 + 0.25 * u(n, S)
    region = None
    if regions > 1:  # centres spread over 1.5 frames around where the camera starts: about 5 of 12 in view
        g3 = torch.Generator().manual_seed(int(seed) ^ _THIRD_STREAM)
        w = lambda *shape: torch.rand(*shape, generator=g3)
        centre = origin[:, None] + (w(n, regions, 2) - 0.5) * 1.5 * size
        region = torch.cat([centre, torch.randint(0, 3, (n, regions, 1), generator=g3).float(),
                            _palette(w, n, regions).flatten(2), math.pi * w(n, regions, 1),
                            8.0 + 10.0 * w(n, regions, 1), 0.10 + 0.25 * w(n, regions, 1)], dim=2)
    return TexturedScenes(shapes, ground_kind, palette, lattice, cell, period, angle, grain, origin, pan, zoom, roll,
                          light, pattern, pattern_period, pattern_angle, pattern_contrast, region)


def _smooth_edge(signed: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """1 inside (signed < 0) to 0 outside, over about ``width`` pixels: an anti-aliased edge."""
    return (0.5 - signed / width).clamp(0.0, 1.0)


def render(scenes: TexturedScenes, frames: int = FRAMES, size: int = SIZE, *, with_cover: bool = False):
    """The videos of ``scenes``, ``(N, 3, frames, size, size)`` float32 in [-1, 1], on ``scenes``' device.

    ``with_cover``: also return how much of each pixel the shapes cover, ``(N, frames, size, size)`` in [0, 1] (the
    largest anti-aliased coverage of any shape there), for a loss that weights the shapes' pixels."""
    device = scenes.palette.device
    n = len(scenes)
    col = lambda x: x.view(n, 1, 1, 1)  # (N,) -> (N, 1, 1, 1), broadcast over (T, H, W)
    t = torch.arange(frames, dtype=torch.float32, device=device).view(1, frames, 1, 1)
    pix = torch.arange(size, dtype=torch.float32, device=device) + 0.5 - size / 2
    px, py = pix.view(1, 1, 1, size), pix.view(1, 1, size, 1)

    # Camera: screen offset p from the centre -> world = origin + pan t + R(roll t) p / exp(zoom t).
    scale = torch.exp(-col(scenes.zoom) * t)  # world px per screen px, (N, T, 1, 1)
    theta = col(scenes.roll) * t
    cos, sin = torch.cos(theta) * scale, torch.sin(theta) * scale
    wx = col(scenes.origin[:, 0]) + col(scenes.pan[:, 0]) * t + cos * px - sin * py  # (N, T, H, W)
    wy = col(scenes.origin[:, 1]) + col(scenes.pan[:, 1]) * t + sin * px + cos * py
    aa = scale.clamp(min=0.5)  # one screen pixel in world px: the anti-aliasing width

    # Lattice noise at world points: channel 0 at the cell size, channel 1 four times coarser.
    extent = LATTICE * col(scenes.cell)
    fine_grid = torch.stack([wx / extent * 2, wy / extent * 2], dim=-1)  # lattice spans [-extent/2, extent/2]
    grid = torch.cat([fine_grid, fine_grid / 4], dim=1).view(n, 2 * frames * size, size, 2)
    noise = F.grid_sample(scenes.lattice, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    fine = noise[:, 0].view(n, 2, frames, size, size)[:, 0]  # channel 0 read at the fine coordinates
    coarse = noise[:, 1].view(n, 2, frames, size, size)[:, 1]  # channel 1 read at the coarse ones

    # The ground's parameters: one per clip, or per pixel from the region it falls in (the nearest centre).
    kind, angle, period, grain = (col(x) for x in (scenes.ground_kind, scenes.angle, scenes.period, scenes.grain))
    lo, hi = (scenes.palette[:, i].view(n, 3, 1, 1, 1) for i in (0, 1))
    if scenes.region is not None:
        centre = scenes.region[:, :, :2]  # (N, K, 2)
        cx, cy = (centre[:, :, i, None, None, None] for i in (0, 1))
        dist = (wx[:, None] - cx) ** 2 + (wy[:, None] - cy) ** 2  # (N, K, T, H, W)
        index = dist.argmin(1)  # (N, T, H, W)
        at = lambda c: torch.gather(scenes.region[:, :, c], 1, index.view(n, -1)).view_as(index)
        kind, angle, period, grain = at(2).round().long(), at(9), at(10), at(11)
        lo, hi = (torch.stack([at(c) for c in range(3 + 3 * i, 6 + 3 * i)], dim=1) for i in (0, 1))

    # Pattern coordinates, rotated by the ground's angle, in periods.
    ca, sa = torch.cos(angle), torch.sin(angle)
    u_, v_ = (ca * wx + sa * wy) / period, (-sa * wx + ca * wy) / period
    edge = aa / period  # anti-aliasing width in periods
    blotch = torch.sigmoid((fine - 0.5) * 14.0)
    # Tiles: alternate colours, a dark joint of 8% of the period along each tile edge.
    parity = torch.remainder(torch.floor(u_) + torch.floor(v_), 2.0)
    to_joint = torch.minimum((u_ - torch.round(u_)).abs(), (v_ - torch.round(v_)).abs())
    joint = _smooth_edge(to_joint - 0.04, edge)
    tiles = (0.15 + 0.7 * parity + 0.3 * (coarse - 0.5)).clamp(0, 1)
    # Stripes, warped by the coarse noise.
    wave = torch.sin(2 * math.pi * (u_ + 0.8 * coarse))
    stripes = _smooth_edge(-wave, 2 * math.pi * edge)
    mix = torch.where(kind == 0, blotch, torch.where(kind == 1, tiles, stripes))
    ground = lo + (hi - lo) * mix[:, None]
    ground = ground * (1 + grain[:, None] * (2 * fine[:, None] - 1) * (kind != 0)[:, None])
    ground = ground * torch.where(kind == 1, 1 - 0.7 * joint, torch.ones_like(joint))[:, None]

    # Light: a directional gradient across the frame whose direction turns over the clip.
    strength, start, turn = (scenes.light[:, i] for i in range(3))
    phi = col(start) + col(turn) * t
    gradient = (torch.cos(phi) * px + torch.sin(phi) * py) / (size / 2)  # [-1.4, 1.4]
    light = col(strength) * gradient  # (N, T, H, W)
    video = ground * (1 + light[:, None])

    # Shapes, in drawing order (later ones on top), each with its pattern and shading, lit at half strength.
    sh = scenes.shapes
    velocity = data._DIRECTION_XY.to(device)[sh.direction] * sh.speed[..., None]  # (N, S, 2)
    radius = sh.radius[..., None]
    tt = torch.arange(frames, dtype=torch.float32, device=device)
    free = sh.start[:, :, None, :] + velocity[:, :, None, :] * tt[None, None, :, None]  # (N, S, T, 2)
    centre = data._bounce(free, radius[..., None], size - radius[..., None])  # (N, S, T, 2) in screen px
    rgb = data._COLOUR_RGB.to(device)[sh.colour]  # (N, S, 3)
    covered = torch.zeros(n, frames, size, size, device=device) if with_cover else None
    for s in range(data.MAX_SHAPES):
        dx = pix.view(1, 1, 1, size) + size / 2 - centre[:, s, :, 0].view(n, frames, 1, 1)  # (N, T, 1, W)
        dy = pix.view(1, 1, size, 1) + size / 2 - centre[:, s, :, 1].view(n, frames, 1, 1)  # (N, T, H, 1)
        r = col(sh.radius[:, s])
        circle = torch.sqrt(dx * dx + dy * dy) - r
        square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
        rt = 1.1 * r
        triangle = torch.maximum(torch.maximum(dy - 0.5 * rt, -0.866 * dx - 0.5 * dy - 0.5 * rt),
                                 0.866 * dx - 0.5 * dy - 0.5 * rt)
        k = col(sh.shape[:, s])
        distance = torch.where(k == 0, circle, torch.where(k == 1, square, triangle))  # (N, T, H, W)
        cover = _smooth_edge(distance, torch.ones_like(r)) * col(sh.active[:, s].float())
        # Pattern in the shape's own frame (it moves with the shape): stripes or checks.
        pa = col(scenes.pattern_angle[:, s])
        pp = col(scenes.pattern_period[:, s])
        su, sv = (torch.cos(pa) * dx + torch.sin(pa) * dy) / pp, (-torch.sin(pa) * dx + torch.cos(pa) * dy) / pp
        stripe = _smooth_edge(-torch.sin(2 * math.pi * su), 2 * math.pi / pp)
        check = _smooth_edge(-torch.sin(2 * math.pi * su) * torch.sin(2 * math.pi * sv), 2 * math.pi / pp)
        mark = torch.where(col(scenes.pattern[:, s]) == 0, stripe, check)
        shade = 1 - col(scenes.pattern_contrast[:, s]) * mark - 0.25 * ((dx - 0.4 * r) ** 2 + (dy + 0.4 * r) ** 2
                                                                         ).sqrt().div(2 * r).clamp(max=1)
        colour = rgb[:, s].view(n, 3, 1, 1, 1) * (shade * (1 + 0.5 * light))[:, None]
        video = video * (1 - cover[:, None]) + colour * cover[:, None]
        if with_cover:
            covered = torch.maximum(covered, cover)
    video = video.clamp(0, 1) * 2 - 1
    return (video, covered) if with_cover else video
