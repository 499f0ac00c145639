"""Train the demo model by flow matching on procedural videos, in time-limited runs that resume from a checkpoint.

    python -m liteattn.demo.train --out ckpt --time-limit 480                 # a fresh run
    python -m liteattn.demo.train --resume ckpt --out ckpt2 --time-limit 480  # continue it
    python -m liteattn.demo.train --export ckpt2 --weights liteattn/demo/weights/tiny_wan.safetensors
    python -m liteattn.demo.train --model large --out .ckpt/large --time-limit 330   # the large model (GPU)
    python -m liteattn.demo.train --export .ckpt/large --export-frames 32 --weights liteattn/demo/weights/wan_large.safetensors

Flow matching as diffusers' ``FlowMatchEulerDiscreteScheduler`` samples it: ``x_t = (1 - s) x0 + s noise`` at
``timestep = 1000 s``, and the model predicts ``noise - x0``. Training sigmas are logit-normal, warped by the same
``shift`` that sampling uses. Prompts are dropped (all PAD) 10% of the time for classifier-free guidance.

A checkpoint is a folder of safetensors files no larger than 15 MiB each (what a device call can bring back):
``model_*.safetensors`` (float32 weights), ``ema.safetensors`` (float16 EMA weights, also what is shipped),
``adam_sq.safetensors`` (bfloat16 second moments; the first moments restart at zero on resume, which acts as a
short warm-up), and ``state.json`` (step, seconds trained, loss log, arguments).

``--model large`` trains the large model (:func:`liteattn.demo.model.build_large`: 16 x 128 x 128 textured videos,
16384 tokens, a positional prompt encoder). A fresh large run starts from the shipped small model's weights
(``--init-from``; every transformer tensor has the same shape, and the token embedding too) with the new prompt
encoder layers at identity. Its checkpoint is compact, so that it travels to and from the device (64 MiB each way,
with the working tree): instead of float32 weights, ``delta_*.safetensors`` holds float16 ``weights - ema``
(exact to ~1e-3 of that difference), and ``adam_sq8_*.safetensors`` the square root of Adam's second moments in
float8 (e5m2, ~6% steps, with a float32 scale per tensor); 5 bytes a parameter in all, against 8.

Sharp attention needs room in the logits: the transformer's q/k RMS norm fixes every head's ``|q|`` and ``|k|``
to ``8 g`` (``g`` the norm's weight, 1 at initialisation), so that ``q.k / 8`` stays within ``+-8 g^2``. At
``g = 1`` even an ideal, purely positional (RoPE) local head over 16 x 32 x 32 tokens leaves no more than 54% of
its 128-token tiles below 1e-3 of any row's mass; at ``g = 1.5``, 81%; at ``g = 2``, 93% (bench/LARGE_MODEL.md).
``--qk-norm-init`` sets the self-attention norms' weights of a fresh run, and ``--qk-norm-lr-mult`` lets them
move faster than Adam's ``lr`` a step allows (3e-4 a step: +0.3 in 1000 steps at most). (Run 2 gave it that
room, and the model did not use it: its broad heads are broad by choice. ``--local-init`` and ``--regions`` are
the next tries; bench/LARGE_MODEL.md.) ``--heads 8`` splits a fresh large model's width into 8 heads of 32 instead of
4 of 64 (the checkpoint and the exported weights keep the split): with ``--local-init``, 7 local heads a layer and
one global head.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time
from typing import List, Optional

import torch

from . import data
from .checkpoint import export_weights, load_checkpoint, save_checkpoint
from .model import CONFIG, TEXT_LARGE, VIDEO_LARGE, WEIGHTS, TinyWan, build_model, large_config
from .sample import SHIFT

def flow_matching_batch(batch: int, seed: int, device, shift: float = SHIFT, drop_prompt: float = 0.1,
                        dataset=data, frames: Optional[int] = None, size: Optional[int] = None,
                        shape_weight: float = 1.0):
    """One training batch: ``(x_t, timestep, tokens, target)``, a deterministic function of ``seed``.

    ``dataset`` is the procedural data module (:mod:`~liteattn.demo.data` or :mod:`~liteattn.demo.textured`);
    ``frames`` and ``size`` (textured data only) change its clip length and frame size. ``shape_weight`` != 1
    (textured data only) returns a fifth element, the per-pixel loss weight ``(N, 1, T, H, W)``: 1 on the ground,
    ``shape_weight`` where a shape covers the pixel (blended at anti-aliased edges).
    """
    if shape_weight != 1.0 and dataset is data:
        raise ValueError("shape_weight is for the large model's textured data (it needs the shapes' coverage)")
    shape = {} if frames is None and size is None else dict(frames=frames or dataset.FRAMES, size=size or dataset.SIZE)
    scenes = dataset.sample_scenes(batch, seed, **({"size": shape["size"]} if shape else {}))
    tokens = scenes.tokens
    g = torch.Generator().manual_seed(seed + 1)
    tokens[torch.rand(batch, generator=g) < drop_prompt] = 0
    u = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal
    sigma = shift * u / (1 + (shift - 1) * u)  # the scheduler's shift, so training covers what sampling visits
    if shape_weight != 1.0:
        x0, cover = dataset.render(scenes.to(device), **shape, with_cover=True)
    else:
        x0 = dataset.render(scenes.to(device), **shape)
    noise = torch.randn(x0.shape, generator=torch.Generator(device=device).manual_seed(seed + 2), device=device)
    s = sigma.to(device).view(batch, 1, 1, 1, 1)
    out = (1 - s) * x0 + s * noise, sigma.to(device) * 1000, tokens.to(device), noise - x0
    return out if shape_weight == 1.0 else (*out, 1 + (shape_weight - 1) * cover[:, None])


def _init_from(model: TinyWan, path) -> str:
    """Copy every tensor of the weights file at ``path`` whose name and shape match ``model``'s; returns a summary."""
    from safetensors.torch import load_file

    source = load_file(str(path))
    own = model.state_dict()
    match = {k: v.float() for k, v in source.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(match, strict=False)
    return f"{len(match)} of {len(own)} tensors ({len(source) - len(match)} of the file's left out)"


def _is_qk_norm(name: str) -> bool:
    """The self-attention q/k RMS-norm weights (``transformer.blocks.<i>.attn1.norm_q.weight``, ``norm_k``)."""
    return ".attn1.norm_q." in name or ".attn1.norm_k." in name


def _locality_prior(model, scale: float, content: float = 0.25, top: Optional[int] = None, split=(2, 1, 1)) -> str:
    """Start every self-attention head but the last of each layer as a local head: ``to_q`` and ``to_k`` get the
    same bias, a vector on the ``top`` highest rotary frequencies of each axis (default: as many as the row axis has
    at or above 0.15 rad a token, 3 for heads of 64 channels, 2 for heads of 32, whose next frequency is 0.025;
    energy split ``split`` between
    frames, rows and columns), so that ``q.k`` is a separable kernel of the token offset, largest at zero; their
    weights are scaled by ``content`` (the content part, about 2% of the energy at initialisation, starts small),
    and the q/k norm weights are set so that the local heads' qk scale is ``scale`` (bench/attention_heads.py shows
    the norm weights' product, ``scale`` x (heads - 1) / heads: 3/4 with 4 heads, 7/8 with 8; the bias-free head
    takes no share of the norm). The qk scale is ``|q|^2 / head_dim``: the logit at zero offset is ``sqrt(head_dim)
    scale``, 8 x scale with heads of 64, 5.66 x scale with heads of 32 (so 3.2 there gives run 3's 2.25 x 8 = 18).
    The last head of each layer keeps no bias: it starts near uniform, a global head. With ``scale`` 2.25 (heads of
    64) a purely positional head leaves 81% of the 128-token tiles of 16 x 32 x 32 tokens below 1e-3
    (bench/attention_heads.py --rope-ceiling; heads of 32: 77.6% at scale 3.2, top 2); the large model starts at
    58.8% (4 x 64; 8 x 32: bench/LARGE_MODEL.md). Training keeps this only where the loss wants it."""
    rope = model.transformer.rope
    bounds = [(0, rope.t_dim // 2), (rope.t_dim // 2, (rope.t_dim + rope.h_dim) // 2),
              ((rope.t_dim + rope.h_dim) // 2, rope.attention_head_dim // 2)]
    head_dim = rope.attention_head_dim
    if top is None:  # diffusers' rotary frequencies of an axis of d channels: 10000^(-2i/d), i < d/2
        top = max(1, sum(10000.0 ** (-2 * i / rope.h_dim) >= 0.15 for i in range(rope.h_dim // 2)))
    pattern = torch.zeros(head_dim)
    for (start, end), share in zip(bounds, split):  # pairs (2i, 2i+1); frequencies fall along each axis's pairs
        n = min(top, end - start)
        pattern[2 * start:2 * (start + n):2] = (head_dim * share / sum(split) / n) ** 0.5  # |pattern|^2 = head_dim
    with torch.no_grad():
        for block in model.transformer.blocks:
            attn = block.attn1
            local = attn.heads - 1
            bias = torch.cat([pattern] * local + [torch.zeros(head_dim)])
            for proj in (attn.to_q, attn.to_k):
                proj.weight.mul_(content)
                proj.bias.copy_(bias)
            # RMS norm across heads: a local head's part of the normalised vector has |q|^2 = width / local; the
            # norm weight g makes its qk scale g^2 (width / local) / head_dim.
            g = (scale * head_dim / (attn.heads * head_dim / local)) ** 0.5
            attn.norm_q.weight.fill_(g)
            attn.norm_k.weight.fill_(g)
    return (f"{local} of {attn.heads} heads a layer local (top {top} frequencies an axis, split {split}), qk scale "
            f"{scale}, q/k norm weights {g:.3f}, content weights x{content}")


def qk_norm_scale(model) -> List[List[float]]:
    """Per layer and head, the mean over the head's channels of ``norm_q.weight * norm_k.weight``: the factor by
    which the head's logits can exceed those of a fresh model (1 at initialisation)."""
    out = []
    for block in model.transformer.blocks:
        attn = block.attn1
        product = (attn.norm_q.weight * attn.norm_k.weight).detach().float().view(attn.heads, -1)
        out.append([round(v, 3) for v in product.mean(-1).tolist()])
    return out


def _forward_backward(forward, optimizer, x_t, timestep, tokens, target, device, weight=None) -> torch.Tensor:
    """One step's loss and gradients: the mean squared error, or with ``weight`` (``(N, 1, T, H, W)``) the
    weighted mean, sum(w e^2) / sum(w) over each channel's pixels (so the loss keeps its scale)."""
    with torch.autocast(device.type, dtype=torch.bfloat16):
        pred = forward(x_t, timestep, tokens)
    if weight is None:
        loss = torch.nn.functional.mse_loss(pred.float(), target)
    else:
        loss = (weight * (pred.float() - target) ** 2).sum() / (weight.sum() * target.shape[1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m liteattn.demo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("small", "large"), default="small",
                   help="small: 16x64x64 shapes (the shipped tiny_wan); large: 16x128x128 textured, positional prompts")
    p.add_argument("--init-from", default=None,
                   help="weights file to start a fresh run from, where shapes match ('none': random; default for "
                        "--model large: the shipped small model)")
    p.add_argument("--heads", type=int, default=None,
                   help="fresh large runs: self-attention heads a layer at the same width 256 (default 4 x 64; 8: 8 x "
                        "32, every tensor the same shape). Kept in the checkpoint and the exported weights; a resumed "
                        "run keeps its checkpoint's (and refuses another)")
    p.add_argument("--frames", type=int, default=None, help="large model: clip length (default 16; kept on resume)")
    p.add_argument("--size", type=int, default=None, help="large model: frame size in pixels, a multiple of 4 "
                                                           "(default 128; kept on resume)")
    p.add_argument("--regions", type=int, default=None,
                   help="large model: textured ground regions per clip (default 1: one texture; kept on resume)")
    p.add_argument("--out", help="checkpoint folder to write")
    p.add_argument("--resume", help="checkpoint folder to continue from")
    p.add_argument("--export", help="checkpoint folder whose EMA weights to write to --weights, then exit")
    p.add_argument("--weights", help="where --export writes the float16 safetensors")
    p.add_argument("--export-frames", type=int, default=None,
                   help="with --export: the clip length the exported model samples (its metadata; default: the "
                        "checkpoint's). The large model ships at 32 frames, trained on 16")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds of training in this run")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--planned-seconds", type=float, default=960.0,
                   help="training seconds over all runs; the cosine learning-rate schedule spans them")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--text-lr-mult", type=float, default=None,
                   help="learning-rate multiplier for the large model's new prompt-encoder layers and positions "
                        "(default 1; a resumed run keeps its checkpoint's)")
    p.add_argument("--qk-norm-lr-mult", type=float, default=None,
                   help="learning-rate multiplier for the self-attention q/k RMS-norm weights, the attention's "
                        "sharpness (default 1; a resumed run keeps its checkpoint's)")
    p.add_argument("--shape-weight", type=float, default=None,
                   help="large model: weight of the loss on the shapes' pixels against the ground's 1 (default 1; a "
                        "resumed run keeps its checkpoint's). The ground's texture dominates an unweighted loss")
    p.add_argument("--local-init", type=float, default=None,
                   help="fresh runs: start all self-attention heads but the last of each layer as local, purely "
                        "positional (RoPE) heads at this qk scale (e.g. 2.25; sets the q/k norms, so it supersedes "
                        "--qk-norm-init); see _locality_prior")
    p.add_argument("--qk-norm-init", type=float, default=None,
                   help="fresh runs: set the self-attention q/k RMS-norm weights to this value (after --init-from); "
                        "logits reach +-8 x its square")
    p.add_argument("--warmup", type=int, default=300, help="warm-up steps (a resumed run warms up for a third)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--samples", help="write a GIF of EMA samples here at the end")
    args = p.parse_args(argv)

    if args.export_frames is not None and not args.export:
        p.error("--export-frames is for --export")
    if args.export:
        if not args.weights:
            p.error("--export needs --weights (the file to write)")
        if args.export_frames is not None and args.export_frames < 1:
            p.error(f"--export-frames must be at least 1, got {args.export_frames}")
        export_weights(args.export, args.weights, frames=args.export_frames)
        print(f"wrote {args.weights} ({os.path.getsize(args.weights) / 1e6:.1f} MB)")
        return 0
    if not args.out:
        p.error("--out is required for training")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.resume:  # the checkpoint says which model it is, and which learning-rate multipliers it was trained with
        saved = json.loads((pathlib.Path(args.resume) / "state.json").read_text())
        args.model = "large" if saved.get("video", {}) and saved["video"].get("data") == "textured" else "small"
        for key in ("text_lr_mult", "qk_norm_lr_mult", "shape_weight"):
            if getattr(args, key) is None:
                setattr(args, key, saved.get("args", {}).get(key))
    args.text_lr_mult = 1.0 if args.text_lr_mult is None else args.text_lr_mult
    args.shape_weight = 1.0 if args.shape_weight is None else args.shape_weight
    if args.shape_weight <= 0:
        p.error(f"--shape-weight must be positive, got {args.shape_weight}")
    args.qk_norm_lr_mult = 1.0 if args.qk_norm_lr_mult is None else args.qk_norm_lr_mult
    large = args.model == "large"
    if args.heads is not None and not large:
        p.error("--heads is for --model large")
    if args.shape_weight != 1.0 and not large:
        p.error("--shape-weight is for --model large (the small model's data has no textured ground to outweigh)")
    config, text, video = (large_config(args.heads or 4), TEXT_LARGE, dict(VIDEO_LARGE)) if large else (CONFIG, None, None)
    if args.resume:  # the checkpoint's own transformer (its head split) and prompt encoder
        config = saved.get("config") or config
        text = saved.get("text") or text
        video = saved.get("video") or video
        if args.heads is not None and args.heads != config["num_attention_heads"]:
            p.error(f"--heads {args.heads}: {args.resume} has {config['num_attention_heads']} heads a layer")
    if large and (args.frames or args.size or args.regions):  # a resumed run may change them: the weights fit any
        video.update({k: v for k, v in (("frames", args.frames), ("size", args.size), ("regions", args.regions)) if v})
    model = build_model(config, text, video)
    # The small model's weights fit only its own head split (every shape would match, the heads would not).
    init_from = args.init_from if args.init_from is not None else (
        str(WEIGHTS) if large and model.config["num_attention_heads"] == CONFIG["num_attention_heads"] else "none")
    if not args.resume and init_from != "none":
        print(f"initialised from {init_from}: {_init_from(model, init_from)}", flush=True)
    if not args.resume and args.local_init is not None:
        print(f"locality prior: {_locality_prior(model, args.local_init)}", flush=True)
    elif not args.resume and args.qk_norm_init is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if _is_qk_norm(name):
                    param.fill_(args.qk_norm_init)
    model = model.to(device).train()
    decay, no_decay, text_params, qk_norm = [], [], [], []
    for name, param in model.named_parameters():
        if name.startswith(("text_position", "text_blocks")):
            text_params.append(param)
        elif _is_qk_norm(name):
            qk_norm.append(param)
        else:
            (no_decay if param.ndim < 2 or "token_embedding" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.01, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
              {"params": qk_norm, "weight_decay": 0.0, "lr_mult": args.qk_norm_lr_mult}]
    if text_params:
        groups.append({"params": text_params, "weight_decay": 0.0, "lr_mult": args.text_lr_mult})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    state = {"step": 0, "train_seconds": 0.0, "samples": 0, "log": [], "runs": [], "config": model.config, "text": text,
             "video": model.video, "init_from": None if init_from == "none" else pathlib.Path(init_from).name}
    warmup = args.warmup
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if args.resume:
        ema, state = load_checkpoint(args.resume, model, optimizer, device)
        warmup = max(1, args.warmup // 3)
        state["video"] = model.video
        print(f"resumed {args.resume}: step {state['step']}, {state['train_seconds']:.0f} s trained")
    forward = torch.compile(model) if args.compile else model
    shape = dict(frames=model.video_shape[0], size=model.video_shape[1]) if model.dataset is not data else {}

    start_step, start_seconds = state["step"], state["train_seconds"]
    params = [p for p in model.parameters()]
    ema_keys = [k for k, _ in model.named_parameters()]
    ema_params = [ema[k] for k in ema_keys]
    loss_sum, loss_count, t_log = 0.0, 0, time.perf_counter()
    t0 = time.perf_counter()
    run_step = 0
    print(f"model: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {model.config['num_layers']} layers of "
          f"{model.config['num_attention_heads']} heads x {model.config['attention_head_dim']}; batch {args.batch}; device {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})", flush=True)
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > args.time_limit or (args.max_steps and state["step"] >= args.max_steps):
            break
        step = state["step"]
        progress = min(1.0, (start_seconds + elapsed) / args.planned_seconds)
        lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        lr *= min(1.0, (run_step + 1) / warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        x_t, timestep, tokens, target, *weight = flow_matching_batch(
            args.batch, args.seed * 10_000_019 + 3 * step, device, dataset=model.dataset, shape_weight=args.shape_weight,
            **shape)
        weight = weight[0] if weight else None
        try:
            loss = _forward_backward(forward, optimizer, x_t, timestep, tokens, target, device, weight)
        except Exception as exc:  # a compiler failure (forward or backward) must not cost a whole device run
            if forward is model:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
            forward = model
            loss = _forward_backward(forward, optimizer, x_t, timestep, tokens, target, device, weight)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():  # EMA with a ramp, so that early checkpoints are usable too
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - d)
        state["step"] += 1
        run_step += 1
        loss_sum += loss.detach()
        loss_count += 1
        if state["step"] % args.log_every == 0:
            now = time.perf_counter()
            mean = (loss_sum / loss_count).item()
            rate = loss_count * args.batch / (now - t_log)
            scale = [v for layer in qk_norm_scale(model) for v in layer]
            entry = dict(step=state["step"], loss=round(mean, 5), lr=lr, samples_per_s=round(rate, 1),
                         seconds=round(start_seconds + now - t0, 1),
                         qk_scale=[round(min(scale), 2), round(sum(scale) / len(scale), 2), round(max(scale), 2)])
            state["log"].append(entry)
            print(json.dumps(entry), flush=True)
            loss_sum, loss_count, t_log = 0.0, 0, now
    if device.type == "cuda":
        torch.cuda.synchronize()
    run_seconds = time.perf_counter() - t0
    state["train_seconds"] = start_seconds + run_seconds
    state["samples"] += (state["step"] - start_step) * args.batch
    state["runs"].append(dict(steps=state["step"] - start_step, seconds=round(run_seconds, 1), batch=args.batch,
                              device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              compile=args.compile, video=model.video))
    state["args"] = vars(args)
    state["qk_scale"] = qk_norm_scale(model)
    save_checkpoint(args.out, model, ema, optimizer, state, compact=large)
    print(f"saved {args.out}: step {state['step']} ({state['step'] - start_step} this run, "
          f"{(state['step'] - start_step) * args.batch / run_seconds:.0f} samples/s), "
          f"{state['train_seconds']:.0f} s trained", flush=True)
    if args.samples:
        from .sample import write_sample_gif

        ema_model = build_model(config, text, video).to(device)
        ema_model.load_state_dict({k: v for k, v in ema.items()})
        write_sample_gif(ema_model.eval(), args.samples, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
