"""Compact, resumable training checkpoints of the demo models (``python -m liteattn.demo.train`` writes and reads
them): the EMA weights in float16, the weights as a float16 delta from them, Adam's second moments as float8
square roots (scaled per tensor), in safetensors files of at most 15 MB each, and ``state.json``. ``export_weights``
turns a checkpoint into the shipped float16 weights file."""

from __future__ import annotations

import json
import pathlib
from typing import Dict, List, Optional

import torch

from .model import CONFIG, TinyWan, build_model, save_weights

_FILE_BYTES = 15 << 20


def _save_split(tensors: Dict[str, torch.Tensor], folder: pathlib.Path, stem: str) -> List[str]:
    """Write ``tensors`` as ``stem_<i>.safetensors`` files of at most 15 MiB each; returns the file names."""
    from safetensors.torch import save_file

    groups, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > _FILE_BYTES:
            groups.append(current)
            current, size = {}, 0
        current[name] = tensor.detach().cpu().contiguous()
        size += nbytes
    groups.append(current)
    names = []
    for i, group in enumerate(groups):
        names.append(f"{stem}_{i}.safetensors")
        save_file(group, str(folder / names[-1]))
    return names


def _load_split(folder: pathlib.Path, stem: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob(f"{stem}_*.safetensors")):
        out.update(load_file(str(path)))
    return out


def save_checkpoint(folder, model: TinyWan, ema: Dict[str, torch.Tensor], optimizer, state: dict,
                    compact: bool = False) -> None:
    """Write the checkpoint folder; ``compact`` stores weights as a float16 delta from the float16 EMA and Adam's
    second moments as float8 square roots (5 bytes a parameter instead of 8)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    ema16 = {k: v.half() for k, v in ema.items()}
    if compact:
        _save_split({k: (v.float() - ema16[k].float()).half() for k, v in model.state_dict().items()}, folder, "delta")
    else:
        _save_split({k: v.float() for k, v in model.state_dict().items()}, folder, "model")
    _save_split(ema16, folder, "ema")
    names = {id(p): n for n, p in model.named_parameters()}
    squares = {names[id(p)]: s["exp_avg_sq"] for group in optimizer.param_groups for p in group["params"]
               if (s := optimizer.state.get(p)) and "exp_avg_sq" in s}
    if squares and compact:  # float8 e5m2 spans 2^-16 .. 57344: scaled per tensor so that its largest is 2^15
        packed = {}
        for k, v in squares.items():
            root = v.float().sqrt()
            scale = root.amax().clamp_min(1e-30) / 2.0 ** 15
            packed[k] = (root / scale).clamp(2.0 ** -16, 2.0 ** 15).to(torch.float8_e5m2)
            packed[k + ".scale"] = scale.reshape(1)
        _save_split(packed, folder, "adam_sq8")
    elif squares:
        _save_split({k: v.to(torch.bfloat16) for k, v in squares.items()}, folder, "adam_sq")
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(folder, model: TinyWan, optimizer, device) -> tuple:
    """Restore weights and Adam's second moments; returns ``(ema, state)``."""
    folder = pathlib.Path(folder)
    state = json.loads((folder / "state.json").read_text())
    ema = {k: v.to(device, torch.float32) for k, v in _load_split(folder, "ema").items()}
    delta = _load_split(folder, "delta")
    if delta:  # compact: weights = ema16 + delta16
        model.load_state_dict({k: ema[k] + v.to(device, torch.float32) for k, v in delta.items()})
    else:
        model.load_state_dict(_load_split(folder, "model"))
    squares = _load_split(folder, "adam_sq")
    packed = _load_split(folder, "adam_sq8")
    squares.update({k: (v.float() * packed[k + ".scale"].float()).square()
                    for k, v in packed.items() if not k.endswith(".scale")})
    for name, p in model.named_parameters():
        if name in squares:
            fused = optimizer.defaults.get("fused")  # fused Adam keeps its step count on the device
            optimizer.state[p] = {"step": torch.tensor(float(state["step"]), device=device if fused else "cpu"),
                                  "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": squares[name].to(device, torch.float32)}
    return ema, state


def export_weights(checkpoint, weights_path, frames: Optional[int] = None) -> None:
    """The checkpoint's EMA weights as the shipped float16 safetensors file.

    ``frames``: the clip length the exported model samples (its ``video`` metadata, which ``load_model`` and
    ``liteattn demo`` follow) instead of the one it was trained on; the weights fit any length (3-D RoPE). The
    large model trains on 16-frame clips and ships at 32, where its attention is sparser. The metadata keeps the
    training length as ``trained_frames``.
    """
    checkpoint = pathlib.Path(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    model = build_model(state.get("config", CONFIG), state.get("text"), state.get("video"))
    model.load_state_dict({k: v.float() for k, v in _load_split(checkpoint, "ema").items()})
    metadata = {"step": state["step"], "train_seconds": round(state["train_seconds"], 1)}
    if frames is not None:
        if frames < 1 or frames % model.config["patch_size"][0]:
            raise ValueError(f"frames must be a positive multiple of the temporal patch "
                             f"{model.config['patch_size'][0]}, got {frames}")
        metadata["trained_frames"] = model.video_shape[0]
        model.video["frames"] = int(frames)
    save_weights(model, weights_path, dtype=torch.float16, metadata=metadata)
