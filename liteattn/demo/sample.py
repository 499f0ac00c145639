"""Sampling the demo model: diffusers' ``FlowMatchEulerDiscreteScheduler`` with classifier-free guidance.

The loop calls the transformer as diffusers' ``WanPipeline`` does, the conditional prediction and then the
unconditional one at each timestep, so :func:`liteattn.enable` tells the two guidance branches apart by itself.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence

import torch

from . import data

__all__ = ["SHIFT", "GUIDANCE", "DEFAULT_PROMPTS", "initial_noise", "make_scheduler", "sample", "AttentionTimer", "to_uint8",
           "write_sample_gif"]

SHIFT = 3.0  # the flow-matching timestep shift used in training and sampling (Wan uses 3 to 5)
GUIDANCE = 4.0
DEFAULT_PROMPTS = (
    "red circle moving right, blue square moving down",
    "yellow triangle moving up-left, green circle moving left, white square moving up",
    "magenta square moving down-right",
    "cyan circle moving up, orange triangle moving right",
)


def initial_noise(num: int, seed: int, device, dtype=torch.float32, *, frames: int = data.FRAMES,
                  size: int = data.SIZE) -> torch.Tensor:
    """``(num, 3, frames, size, size)`` Gaussian noise; video ``i`` depends only on ``seed + i`` (not on ``num``)."""
    videos = [torch.randn(3, frames, size, size, generator=torch.Generator().manual_seed(seed + i))
              for i in range(num)]
    return torch.stack(videos).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(model, tokens: torch.Tensor, *, steps: int = 30, guidance: float = GUIDANCE, seed: int = 0,
           shift: float = SHIFT, on_step: Optional[Callable[[int], None]] = None, frames: Optional[int] = None,
           size: Optional[int] = None, scheduler=None) -> torch.Tensor:
    """Videos for ``tokens (B, MAX_TOKENS)``: ``(B, 3, frames, size, size)`` float32 in [-1, 1], on the model's device.

    ``model`` is a :class:`liteattn.demo.model.TinyWan`; its dtype and device are used, and its ``video_shape``
    (the small model's: 16 frames of 64x64, the large one's: 16 of 128x128) unless ``frames`` / ``size`` say
    otherwise. ``guidance`` 1.0 makes one transformer call per step (no unconditional branch). ``on_step(i)`` is
    called after each step. ``scheduler``: a :func:`make_scheduler` to step (e.g. the one given to
    ``liteattn.enable(..., scheduler=)``, which then follows the steps without reading the timestep); default a new one.
    """
    weight = model.token_embedding.weight
    device, dtype = weight.device, weight.dtype
    batch = tokens.shape[0]
    scheduler = make_scheduler(shift) if scheduler is None else scheduler
    scheduler.set_timesteps(steps, device=device)
    model_frames, model_size = getattr(model, "video_shape", (data.FRAMES, data.SIZE))
    latents = initial_noise(batch, seed, device, frames=frames or model_frames, size=size or model_size)  # float32
    text = model.embed(tokens)
    empty = model.embed(torch.zeros_like(tokens)) if guidance != 1.0 else None
    for i, t in enumerate(scheduler.timesteps):
        timestep = t.expand(batch)
        x = latents.to(dtype)
        velocity = model.transformer(x, timestep, text, return_dict=False)[0].float()
        if empty is not None:
            unconditional = model.transformer(x, timestep, empty, return_dict=False)[0].float()
            velocity = unconditional + guidance * (velocity - unconditional)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return latents.clamp(-1, 1)


def make_scheduler(shift: float = SHIFT):
    """The flow-matching scheduler the demo samples with (diffusers' ``FlowMatchEulerDiscreteScheduler``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class AttentionTimer:
    """Wall-clock seconds spent inside the video self-attention modules (``blocks.*.attn1``) of a Wan transformer.

    Forward pre/post hooks around each ``attn1`` call (projections, rotary embedding, attention, output
    projection), synchronising the device on CUDA. Use as a context manager; ``seconds`` accumulates.
    """

    def __init__(self, transformer):
        self.modules = [block.attn1 for block in transformer.blocks]
        self.seconds = 0.0
        self.calls = 0
        self._hooks: List = []
        self._start = 0.0

    def _sync(self, module):
        if module.to_q.weight.is_cuda:
            torch.cuda.synchronize(module.to_q.weight.device)

    def _before(self, module, args):
        self._sync(module)
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self._sync(module)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def __enter__(self) -> "AttentionTimer":
        for module in self.modules:
            self._hooks.append(module.register_forward_pre_hook(self._before))
            self._hooks.append(module.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def to_uint8(videos: torch.Tensor) -> torch.Tensor:
    """``(B, 3, T, H, W)`` in [-1, 1] -> ``(B, T, H, W, 3)`` uint8 on the CPU."""
    return ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def write_sample_gif(model, path, prompts: Sequence[str] = DEFAULT_PROMPTS, steps: int = 24, seed: int = 0,
                     device=None) -> None:
    """EMA samples beside procedural videos of random scenes of the same shape: a GIF (and a PNG of four frames from
    the first to the last beside it).

    For training runs: a quick look at what the model draws. Top row: samples for ``prompts``; bottom row: data.
    """
    import imageio.v2 as imageio
    import numpy as np

    tokens = data.tokenize(prompts)
    device = torch.device(device) if device is not None else model.token_embedding.weight.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        videos = sample(model, tokens, steps=steps, seed=seed)
    dataset = getattr(model, "dataset", data)  # the large model draws textured scenes
    length, size = videos.shape[2], videos.shape[-1]  # the model's clips (a resumed run may have changed them)
    scene_kw = {}
    if dataset is not data:  # textured scenes take the frame size and the ground's regions
        scene_kw = {"size": size, "regions": int(getattr(model, "video", {}).get("regions", 1) or 1)}
    scenes = dataset.sample_scenes(len(prompts), seed=12345, **scene_kw).to(videos.device)
    real = dataset.render(scenes, frames=length, size=size)
    frames = torch.cat([torch.cat(list(to_uint8(v)), dim=2) for v in (videos, real)], dim=1)  # (T, 2H, B*W, 3)
    frames = frames.numpy()
    imageio.mimsave(str(path), list(frames), duration=0.1, loop=0)
    still = np.concatenate([frames[i] for i in np.linspace(0, length - 1, 4).round().astype(int)], axis=0)
    imageio.imwrite(str(path).rsplit(".", 1)[0] + ".png", np.kron(still, np.ones((2, 2, 1), dtype=np.uint8)))
