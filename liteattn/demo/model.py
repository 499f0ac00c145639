"""The demo model: a small diffusers ``WanTransformer3DModel`` in pixel space plus a learned prompt-token table.

    from liteattn.demo.model import load_model
    model = load_model()                        # the shipped weights, offline; eval mode, float32 on the CPU
    text = model.embed(tokens)                  # (B, MAX_TOKENS) int64 -> (B, MAX_TOKENS, TEXT_DIM)
    v = model.transformer(video, timestep, text, return_dict=False)[0]   # (B, 3, 16, 64, 64) -> same shape

The transformer works directly on RGB videos in [-1, 1]: patch size (1, 4, 4) turns 16 frames of 64x64 into
16 x 16 x 16 = 4096 tokens of 4 heads x 64 channels. Its "text encoder" is an ``nn.Embedding`` over the fixed
prompt vocabulary of :mod:`liteattn.demo.data`, trained with it and shipped in the same file.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Union

import torch
from torch import nn

from . import data

__all__ = ["CONFIG", "TEXT_DIM", "WEIGHTS", "TinyWan", "build_model", "load_model", "save_weights"]

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


class TinyWan(nn.Module):
    """``transformer`` (diffusers ``WanTransformer3DModel``) and ``token_embedding`` (vocabulary -> TEXT_DIM)."""

    def __init__(self, config: Optional[dict] = None):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.config = dict(CONFIG if config is None else config)
        self.transformer = WanTransformer3DModel(**self.config)
        self.token_embedding = nn.Embedding(len(data.VOCAB), self.config["text_dim"])
        nn.init.normal_(self.token_embedding.weight, std=1.0)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, L)`` int64 -> ``(B, L, text_dim)`` prompt embeddings (the transformer's text input)."""
        return self.token_embedding(tokens.to(self.token_embedding.weight.device))

    def forward(self, video: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``noise - x0`` for ``video (B, 3, T, H, W)`` at ``timestep (B,)`` in [0, 1000]."""
        return self.transformer(video, timestep, self.embed(tokens), return_dict=False)[0]


def build_model(config: Optional[dict] = None) -> TinyWan:
    """A randomly initialised :class:`TinyWan` (float32)."""
    return TinyWan(config)


def save_weights(model: TinyWan, path: Union[str, pathlib.Path], dtype: Optional[torch.dtype] = None,
                 metadata: Optional[dict] = None) -> None:
    """Write the model's state dict as safetensors (optionally cast to ``dtype``), with its config in the metadata."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
             for name, tensor in model.state_dict().items()}
    info = {"config": json.dumps(model.config)}
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
            config = json.loads((f.metadata() or {})["config"])
        config["patch_size"] = tuple(config["patch_size"])
        model = TinyWan(config)
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
