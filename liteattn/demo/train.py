"""Train the demo model by flow matching on procedural videos, in time-limited runs that resume from a checkpoint.

    python -m liteattn.demo.train --out ckpt --time-limit 480                 # a fresh run
    python -m liteattn.demo.train --resume ckpt --out ckpt2 --time-limit 480  # continue it
    python -m liteattn.demo.train --export ckpt2 --weights liteattn/demo/weights/tiny_wan.safetensors

Flow matching as diffusers' ``FlowMatchEulerDiscreteScheduler`` samples it: ``x_t = (1 - s) x0 + s noise`` at
``timestep = 1000 s``, and the model predicts ``noise - x0``. Training sigmas are logit-normal, warped by the same
``shift`` that sampling uses. Prompts are dropped (all PAD) 10% of the time for classifier-free guidance.

A checkpoint is a folder of safetensors files no larger than 15 MiB each (what a device call can bring back):
``model_*.safetensors`` (float32 weights), ``ema.safetensors`` (float16 EMA weights, also what is shipped),
``adam_sq.safetensors`` (bfloat16 second moments; the first moments restart at zero on resume, which acts as a
short warm-up), and ``state.json`` (step, seconds trained, loss log, arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time
from typing import Dict, List

import torch

from . import data
from .model import CONFIG, TinyWan, build_model, save_weights
from .sample import SHIFT

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


def save_checkpoint(folder, model: TinyWan, ema: Dict[str, torch.Tensor], optimizer, state: dict) -> None:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    _save_split({k: v.float() for k, v in model.state_dict().items()}, folder, "model")
    _save_split({k: v.half() for k, v in ema.items()}, folder, "ema")
    names = {id(p): n for n, p in model.named_parameters()}
    squares = {names[id(p)]: s["exp_avg_sq"].to(torch.bfloat16)
               for group in optimizer.param_groups for p in group["params"]
               if (s := optimizer.state.get(p)) and "exp_avg_sq" in s}
    if squares:
        _save_split(squares, folder, "adam_sq")
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(folder, model: TinyWan, optimizer, device) -> tuple:
    """Restore weights and Adam's second moments; returns ``(ema, state)``."""
    folder = pathlib.Path(folder)
    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict(_load_split(folder, "model"))
    ema = {k: v.to(device, torch.float32) for k, v in _load_split(folder, "ema").items()}
    squares = _load_split(folder, "adam_sq")
    for name, p in model.named_parameters():
        if name in squares:
            fused = optimizer.defaults.get("fused")  # fused Adam keeps its step count on the device
            optimizer.state[p] = {"step": torch.tensor(float(state["step"]), device=device if fused else "cpu"),
                                  "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": squares[name].to(device, torch.float32)}
    return ema, state


def export_weights(checkpoint, weights_path) -> None:
    """The checkpoint's EMA weights as the shipped float16 safetensors file."""
    checkpoint = pathlib.Path(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    model = build_model(state.get("config", CONFIG))
    model.load_state_dict({k: v.float() for k, v in _load_split(checkpoint, "ema").items()})
    save_weights(model, weights_path, dtype=torch.float16,
                 metadata={"step": state["step"], "train_seconds": round(state["train_seconds"], 1)})


def flow_matching_batch(batch: int, seed: int, device, shift: float = SHIFT, drop_prompt: float = 0.1):
    """One training batch: ``(x_t, timestep, tokens, target)``, a deterministic function of ``seed``."""
    scenes = data.sample_scenes(batch, seed)
    tokens = scenes.tokens
    g = torch.Generator().manual_seed(seed + 1)
    tokens[torch.rand(batch, generator=g) < drop_prompt] = 0
    u = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal
    sigma = shift * u / (1 + (shift - 1) * u)  # the scheduler's shift, so training covers what sampling visits
    x0 = data.render(scenes.to(device))
    noise = torch.randn(x0.shape, generator=torch.Generator(device=device).manual_seed(seed + 2), device=device)
    s = sigma.to(device).view(batch, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma.to(device) * 1000, tokens.to(device), noise - x0


def _forward_backward(forward, optimizer, x_t, timestep, tokens, target, device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        pred = forward(x_t, timestep, tokens)
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m liteattn.demo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="checkpoint folder to write")
    p.add_argument("--resume", help="checkpoint folder to continue from")
    p.add_argument("--export", help="checkpoint folder whose EMA weights to write to --weights, then exit")
    p.add_argument("--weights", help="where --export writes the float16 safetensors")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds of training in this run")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--planned-seconds", type=float, default=960.0,
                   help="training seconds over all runs; the cosine learning-rate schedule spans them")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=300, help="warm-up steps (a resumed run warms up for a third)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--samples", help="write a GIF of EMA samples here at the end")
    args = p.parse_args(argv)

    if args.export:
        export_weights(args.export, args.weights)
        print(f"wrote {args.weights} ({os.path.getsize(args.weights) / 1e6:.1f} MB)")
        return 0
    if not args.out:
        p.error("--out is required for training")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = build_model().to(device).train()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "token_embedding" in name else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    state = {"step": 0, "train_seconds": 0.0, "samples": 0, "log": [], "runs": [], "config": CONFIG}
    warmup = args.warmup
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    if args.resume:
        ema, state = load_checkpoint(args.resume, model, optimizer, device)
        warmup = max(1, args.warmup // 3)
        print(f"resumed {args.resume}: step {state['step']}, {state['train_seconds']:.0f} s trained")
    forward = torch.compile(model) if args.compile else model

    start_step, start_seconds = state["step"], state["train_seconds"]
    params = [p for p in model.parameters()]
    ema_keys = [k for k, _ in model.named_parameters()]
    ema_params = [ema[k] for k in ema_keys]
    loss_sum, loss_count, t_log = 0.0, 0, time.perf_counter()
    t0 = time.perf_counter()
    run_step = 0
    print(f"model: {sum(p.numel() for p in params) / 1e6:.2f}M parameters; batch {args.batch}; device {device}"
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
            group["lr"] = lr
        x_t, timestep, tokens, target = flow_matching_batch(args.batch, args.seed * 10_000_019 + 3 * step, device)
        try:
            loss = _forward_backward(forward, optimizer, x_t, timestep, tokens, target, device)
        except Exception as exc:  # a compiler failure (forward or backward) must not cost a whole device run
            if forward is model:
                raise
            print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
            forward = model
            loss = _forward_backward(forward, optimizer, x_t, timestep, tokens, target, device)
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
            entry = dict(step=state["step"], loss=round(mean, 5), lr=lr, samples_per_s=round(rate, 1),
                         seconds=round(start_seconds + now - t0, 1))
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
                              compile=args.compile))
    state["args"] = vars(args)
    save_checkpoint(args.out, model, ema, optimizer, state)
    print(f"saved {args.out}: step {state['step']} ({state['step'] - start_step} this run, "
          f"{(state['step'] - start_step) * args.batch / run_seconds:.0f} samples/s), "
          f"{state['train_seconds']:.0f} s trained", flush=True)
    if args.samples:
        from .sample import write_sample_gif

        ema_model = build_model().to(device)
        ema_model.load_state_dict({k: v for k, v in ema.items()})
        write_sample_gif(ema_model.eval(), args.samples, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
