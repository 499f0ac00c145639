"""The demo model: a small diffusers ``WanTransformer3DModel`` in pixel space plus a learned prompt-token table.

    from liteattn.demo.model import load_model
    model = load_model()                        # the shipped weights, offline; eval mode, float32 on the CPU
    text = model.embed(tokens)                  # (B, MAX_TOKENS) int64 -> (B, MAX_TOKENS, TEXT_DIM)
    v = model.transformer(video, timestep, text, return_dict=False)[0]   # (B, 3, 16, 64, 64) -> same shape

The transformer works directly on RGB videos in [-1, 1]: patch size (1, 4, 4) turns 16 frames of 64x64 into
16 x 16 x 16 = 4096 tokens of 4 heads x 64 channels. Its "text encoder" is an ``nn.Embedding`` over the fixed
prompt vocabulary of :mod:`liteattn.demo.data`, trained with it and shipped in the same file.

The large model (``load_large()``, ``weights/wan_large.safetensors``) is the same transformer class and size,
trained on 16 frames of 128x128 textured videos (:mod:`liteattn.demo.textured`): 16384 tokens. Its weights file
says the clip it samples (``video_shape``): the shipped file is exported at 32 frames, 32768 tokens
(``python -m liteattn.demo.train --export CHECKPOINT --export-frames 32``). Its prompt encoder gives each
token its position: token embedding + learned position embedding, then two small pre-norm transformer layers over
the 16 prompt tokens, so "red circle ..., blue square ..." and "red square ..., blue circle ..." differ::

    from liteattn.demo.model import load_large
    from liteattn.demo.sample import sample
    from liteattn.demo import data
    model = load_large(device="cuda", dtype=torch.bfloat16)
    videos = sample(model, data.tokenize(["red circle moving right, blue square moving down"]), steps=30)
    # (1, 3, frames, 128, 128) in [-1, 1]: model.video_shape

A weights file's safetensors metadata holds ``config`` (the transformer's), and for the large model ``text`` (the
prompt encoder's layers and heads) and ``video`` (frames, size and the data set); files without them are the
small model's.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Union

import torch
from torch import nn

from . import data

__all__ = ["CONFIG", "CONFIG_LARGE", "TEXT_DIM", "TEXT_LARGE", "VIDEO_SMALL", "VIDEO_LARGE", "WEIGHTS",
           "WEIGHTS_LARGE", "TinyWan", "PromptBlock", "build_model", "build_large", "large_config", "load_model",
           "load_large", "save_weights"]

TEXT_DIM = 64
# diffusers WanTransformer3DModel config. 6 layers of width 256 give 7.0M parameters; attention is about 70% of the
# forward FLOPs at 4096 tokens, as in the big video models, so the skip decisions have something to win.
CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights" / "tiny_wan.safetensors"

# The large model: the same transformer (so the small model's weights initialise it), on 16 x 128 x 128 textured
# videos (16 x 32 x 32 = 16384 tokens), with a positional prompt encoder.
CONFIG_LARGE = dict(CONFIG)
TEXT_LARGE = dict(layers=2, heads=4)
VIDEO_SMALL = dict(frames=16, size=64, data="shapes")
VIDEO_LARGE = dict(frames=16, size=128, data="textured")
WEIGHTS_LARGE = WEIGHTS.parent / "wan_large.safetensors"


def large_config(heads: int = 4) -> dict:
    """The large model's transformer config with ``heads`` self-attention heads a layer at the same width (256):
    ``attention_head_dim`` 256 / heads, so every tensor keeps its shape and only the split into heads (and the
    3-D RoPE's split of a head's channels: diffusers gives rows and columns ``2 (head_dim // 6)`` channels each and
    frames the rest, 24:20:20 at 64, 12:10:10 at 32) changes. ``heads=4``: CONFIG_LARGE."""
    width = CONFIG_LARGE["num_attention_heads"] * CONFIG_LARGE["attention_head_dim"]
    if heads < 1 or width % heads or (width // heads) % 2:
        raise ValueError(f"heads must divide the width {width} into heads of an even number of channels: {heads}")
    return dict(CONFIG_LARGE, num_attention_heads=heads, attention_head_dim=width // heads)


class PromptBlock(nn.Module):
    """A pre-norm transformer layer over the prompt tokens (self-attention, then a 4x MLP).

    Its two output projections start at zero, so a new encoder is the identity on token + position embeddings.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        for layer in (self.proj, self.mlp[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # every token sees every token
        x = x + self.proj(mixed.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyWan(nn.Module):
    """``transformer`` (diffusers ``WanTransformer3DModel``) and the prompt encoder.

    The small model's encoder is ``token_embedding`` alone (a bag of words). With ``text`` (``dict(layers, heads)``)
    it also has ``text_position`` (a learned embedding per prompt position) and ``text_blocks``
    (:class:`PromptBlock`). ``video`` (``dict(frames, size, data)``) says what the model draws: ``data`` is
    ``"shapes"`` (:mod:`liteattn.demo.data`) or ``"textured"`` (:mod:`liteattn.demo.textured`; an optional
    ``regions`` makes its ground a patchwork of that many textures).
    """

    def __init__(self, config: Optional[dict] = None, text: Optional[dict] = None, video: Optional[dict] = None):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.config = dict(CONFIG if config is None else config)
        self.config["patch_size"] = tuple(self.config["patch_size"])  # JSON (checkpoints, metadata) gives a list
        self.text = dict(text) if text else None
        self.video = dict(VIDEO_SMALL if video is None else video)
        self.transformer = WanTransformer3DModel(**self.config)
        dim = self.config["text_dim"]
        self.token_embedding = nn.Embedding(len(data.VOCAB), dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        if self.text:
            # Small, so that a new encoder starts near the bag of words it may be initialised from.
            self.text_position = nn.Parameter(0.1 * torch.randn(data.MAX_TOKENS, dim))
            self.text_blocks = nn.ModuleList(PromptBlock(dim, self.text["heads"]) for _ in range(self.text["layers"]))

    @property
    def video_shape(self) -> tuple:
        """``(frames, size)`` of the videos the model draws."""
        return int(self.video["frames"]), int(self.video["size"])

    @property
    def dataset(self):
        """The procedural data module the model was trained on (``sample_scenes``, ``render``); for textured data
        with ``video["regions"]`` > 1, the module with that many ground regions bound into ``sample_scenes``."""
        if self.video.get("data", "shapes") == "textured":
            from . import textured

            regions = int(self.video.get("regions", 1))
            if regions > 1:
                import functools
                import types

                return types.SimpleNamespace(
                    __name__=textured.__name__, FRAMES=textured.FRAMES, SIZE=textured.SIZE, render=textured.render,
                    sample_scenes=functools.partial(textured.sample_scenes, regions=regions))
            return textured
        return data

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, L)`` int64 -> ``(B, L, text_dim)`` prompt embeddings (the transformer's text input)."""
        x = self.token_embedding(tokens.to(self.token_embedding.weight.device))
        if self.text:
            x = x + self.text_position[: x.shape[1]].to(x.dtype)
            for block in self.text_blocks:
                x = block(x)
        return x

    def forward(self, video: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``noise - x0`` for ``video (B, 3, T, H, W)`` at ``timestep (B,)`` in [0, 1000]."""
        return self.transformer(video, timestep, self.embed(tokens), return_dict=False)[0]


def build_model(config: Optional[dict] = None, text: Optional[dict] = None, video: Optional[dict] = None) -> TinyWan:
    """A randomly initialised :class:`TinyWan` (float32); no arguments: the small model."""
    return TinyWan(config, text, video)


def build_large(heads: int = 4) -> TinyWan:
    """A randomly initialised large model (float32): CONFIG_LARGE (with ``heads`` heads a layer at the same width:
    :func:`large_config`), TEXT_LARGE, VIDEO_LARGE. Saved weights and checkpoints carry the config, so
    :func:`load_large` and a resumed run rebuild the same split."""
    return TinyWan(large_config(heads), TEXT_LARGE, VIDEO_LARGE)


def save_weights(model: TinyWan, path: Union[str, pathlib.Path], dtype: Optional[torch.dtype] = None,
                 metadata: Optional[dict] = None) -> None:
    """Write the model's state dict as safetensors (optionally cast to ``dtype``), with its config in the metadata."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
             for name, tensor in model.state_dict().items()}
    info = {"config": json.dumps(model.config)}
    if model.text or model.video != VIDEO_SMALL:
        info.update(text=json.dumps(model.text), video=json.dumps(model.video))
    info.update({k: str(v) for k, v in (metadata or {}).items()})
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=info)


def load_model(path: Union[str, pathlib.Path, None] = None, device="cpu", dtype: torch.dtype = torch.float32) -> TinyWan:
    """The model with the shipped weights (or those at ``path``), in eval mode, on ``device`` in ``dtype``.

    Reads only the local file: nothing is downloaded.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = pathlib.Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no demo model weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        config = json.loads(metadata["config"])
        model = TinyWan(config, json.loads(metadata.get("text", "null")), json.loads(metadata.get("video", "null")))
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:  # not safetensors, no config, or other weights: one clear message, whatever the cause
        raise ValueError(f"{path} is not a demo model weights file (a safetensors file written by "
                         f"liteattn.demo.model.save_weights): {type(exc).__name__}: {exc}") from exc
    # The rotary tables stay in full precision (diffusers keeps `rope` in float32 too): bfloat16 angles would blur
    # positions.
    rope = {name: buffer.clone() for name, buffer in model.transformer.rope.named_buffers()}
    model.to(device=device, dtype=dtype)
    for name, buffer in rope.items():
        setattr(model.transformer.rope, name, buffer.to(device))
    return model.eval().requires_grad_(False)


def load_large(device="cpu", dtype: torch.dtype = torch.float32, path: Union[str, pathlib.Path, None] = None) -> TinyWan:
    """The large model with its shipped weights (``WEIGHTS_LARGE``, or those at ``path``): :func:`load_model`."""
    return load_model(WEIGHTS_LARGE if path is None else path, device=device, dtype=dtype)
