"""How much of a demo model's self-attention there is to skip: oracle tile sparsity, per layer and per step.

    python bench/attention_sparsity.py --steps 30 --num-prompts 4 --json sparsity.json          # the large model
    python bench/attention_sparsity.py --weights liteattn/demo/weights/tiny_wan.safetensors      # the small one
    python bench/attention_sparsity.py --checkpoint .ckpt/large                                  # a checkpoint's EMA

Samples ``--num-prompts`` prompts (drawn from the training distribution, fixed seed) for ``--steps`` steps with
dense attention and classifier-free guidance. A recording attention processor on every video self-attention layer
(``blocks.*.attn1``) recomputes q and k as diffusers' ``WanAttnProcessor`` does (projections, RMS norm across heads,
rotary embedding), then hands the call to the original processor, so the video is the dense one.

For every call (layer, step, guidance branch, video, head) it computes the softmax of ``q k^T / sqrt(d)`` in chunks
of query rows (16k tokens fit), sums each row's probability over each key tile, and takes, for each
(q-tile, k-tile), the largest share of any query row's mass that falls on that key tile. A tile whose largest
share is below a bound (1e-2, 1e-3, 1e-4) could be skipped with at most that much of any row's mass lost: the
oracle sparsity that a skip rule can hope for. Tiles are square (``--tiles``, default 128 and 64 tokens).

Prints markdown tables (the mean over all layers and steps; per layer; per step) and writes every number as JSON.
Needs only torch, diffusers and the demo model (nothing of liteattn's attention code).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Dict, List, Sequence

import torch

if __package__ in (None, ""):  # run as a script from a checkout: import liteattn.demo without the top package
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    if "liteattn" not in sys.modules:
        import types

        package = types.ModuleType("liteattn")
        package.__path__ = [str(root / "liteattn")]
        sys.modules["liteattn"] = package

BOUNDS = (1e-2, 1e-3, 1e-4)


def tile_max_share(q: torch.Tensor, k: torch.Tensor, tiles: Sequence[int], rows: int = 2048) -> Dict[int, torch.Tensor]:
    """For ``q``, ``k`` of shape ``(H, S, D)``: ``{tile: (H, S/tile, S/tile)}`` float32, the largest share of any
    query row's softmax mass (scale ``1/sqrt(D)``) that falls on each key tile, per (head, q-tile, k-tile).

    Exact (float32 softmax over all keys), in chunks of ``rows`` query rows; ``S`` must be a multiple of each tile.
    """
    heads, length, dim = q.shape
    fine = min(tiles)
    if any(length % t or t % fine for t in tiles):
        raise ValueError(f"sequence length {length} must be a multiple of every tile in {tiles}, each of the smallest")
    rows = max(max(tiles), rows // max(tiles) * max(tiles))
    q, k = q.float() / math.sqrt(dim), k.float()
    out = {t: torch.empty(heads, length // t, length // t, device=q.device) for t in tiles}
    for r0 in range(0, length, rows):
        r1 = min(length, r0 + rows)
        p = torch.softmax(q[:, r0:r1] @ k.transpose(1, 2), dim=-1)  # (H, rows, S)
        mass = p.view(heads, r1 - r0, length // fine, fine).sum(-1)  # (H, rows, S/fine)
        del p
        for t in tiles:
            per_tile = mass.view(heads, r1 - r0, length // t, t // fine).sum(-1)  # (H, rows, S/t)
            out[t][:, r0 // t:r1 // t] = per_tile.view(heads, (r1 - r0) // t, t, length // t).amax(2)
    return out


class SparsityRecorder:
    """Counts, per (step, layer, branch), the (video, head, q-tile, k-tile) tiles whose largest share is below each
    bound. ``step`` and the per-step call counter are advanced by :meth:`next_step` (the sampler's ``on_step``)."""

    def __init__(self, num_layers: int, tiles: Sequence[int], bounds: Sequence[float] = BOUNDS):
        self.tiles, self.bounds, self.num_layers = list(tiles), list(bounds), num_layers
        self.step = 0
        self.calls = [0] * num_layers  # calls of each layer in the current step: 0 conditional, 1 unconditional
        self.records: List[dict] = []

    def next_step(self, _i: int = 0) -> None:
        self.step += 1
        self.calls = [0] * self.num_layers

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """``q``, ``k``: ``(B, S, H, D)`` after norm and rotary embedding."""
        branch = self.calls[layer]
        self.calls[layer] += 1
        below = {t: [0] * len(self.bounds) for t in self.tiles}
        total = {t: 0 for t in self.tiles}
        for b in range(q.shape[0]):
            shares = tile_max_share(q[b].transpose(0, 1), k[b].transpose(0, 1), self.tiles)
            for t, share in shares.items():
                total[t] += share.numel()
                for i, bound in enumerate(self.bounds):
                    below[t][i] += int((share < bound).sum())
        self.records.append(dict(step=self.step, layer=layer, branch=branch, tokens=q.shape[1], below=below,
                                 total=total))

    def fractions(self, **where) -> Dict[int, List[float]]:
        """``{tile: [fraction below each bound]}`` over the records matching ``where`` (e.g. ``layer=0``)."""
        chosen = [r for r in self.records if all(r[key] == value for key, value in where.items())]
        out = {}
        for t in self.tiles:
            total = sum(r["total"][t] for r in chosen)
            out[t] = [sum(r["below"][t][i] for r in chosen) / total if total else float("nan")
                      for i in range(len(self.bounds))]
        return out


class RecordingProcessor:
    """Wraps a Wan self-attention processor: records q/k statistics, then returns the wrapped processor's output."""

    def __init__(self, inner, layer: int, recorder: SparsityRecorder):
        self.inner, self.layer, self.recorder = inner, layer, recorder

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # as diffusers' WanAttnProcessor (interleaved pairs)
        cos, sin = cos[..., 0::2], sin[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        with torch.no_grad():
            q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q, k = (self._rotate(x.float(), *rotary_emb) for x in (q, k))
            self.recorder.record(self.layer, q, k)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


def load(weights, checkpoint, device, dtype):
    from liteattn.demo import model as demo_model

    if checkpoint:
        from liteattn.demo.checkpoint import _load_split

        folder = pathlib.Path(checkpoint)
        state = json.loads((folder / "state.json").read_text())
        config = dict(state["config"], patch_size=tuple(state["config"]["patch_size"]))
        model = demo_model.build_model(config, state.get("text"), state.get("video"))
        model.load_state_dict({k: v.float() for k, v in _load_split(folder, "ema").items()})
        rope = {n: b.clone() for n, b in model.transformer.rope.named_buffers()}
        model.to(device=device, dtype=dtype)
        for n, b in rope.items():
            setattr(model.transformer.rope, n, b.to(device))
        return model.eval().requires_grad_(False), dict(checkpoint=str(folder), step=state["step"],
                                                        train_seconds=round(state["train_seconds"], 1))
    path = weights or demo_model.WEIGHTS_LARGE
    return demo_model.load_model(path, device=device, dtype=dtype), dict(weights=str(path))


def measure(model, prompts: Sequence[str], *, steps: int, tiles: Sequence[int], bounds=BOUNDS, seed: int = 0,
            guidance: float = None, frames: int = None) -> SparsityRecorder:
    """Sample ``prompts`` densely with a recorder on every ``attn1``; returns the recorder. ``frames``: clips of
    that many frames instead of the model's own (a longer clip than it was trained on)."""
    from liteattn.demo import data
    from liteattn.demo.sample import GUIDANCE, sample

    blocks = model.transformer.blocks
    recorder = SparsityRecorder(len(blocks), tiles, bounds)
    originals = [block.attn1.processor for block in blocks]
    for i, block in enumerate(blocks):
        block.attn1.set_processor(RecordingProcessor(originals[i], i, recorder))
    try:
        sample(model, data.tokenize(list(prompts)), steps=steps, seed=seed,
               guidance=GUIDANCE if guidance is None else guidance, on_step=recorder.next_step, frames=frames)
    finally:
        for block, original in zip(blocks, originals):
            block.attn1.set_processor(original)
    return recorder


def _row(name, fractions, tiles, bounds) -> str:
    return f"| {name} | " + " | ".join(f"{100 * fractions[t][i]:.1f}" for t in tiles for i in range(len(bounds))) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="weights file (default: the shipped large model)")
    p.add_argument("--checkpoint", default=None, help="a training checkpoint folder: its EMA weights")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-seed", type=int, default=2024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--tiles", default="128,64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=None, help="sample clips of this many frames (default: the model's)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.frames is not None and args.frames <= 0:
        raise SystemExit(f"--frames must be positive, got {args.frames}")

    from liteattn.demo import data

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, source = load(args.weights, args.checkpoint, device, dtype)
    tiles = [int(t) for t in args.tiles.split(",")]
    prompts = data.sample_scenes(args.num_prompts, seed=args.prompt_seed).prompts()
    start = time.perf_counter()
    recorder = measure(model, prompts, steps=args.steps, tiles=tiles, seed=args.seed, guidance=args.guidance,
                       frames=args.frames)
    seconds = time.perf_counter() - start
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    frames, size = model.video_shape
    frames = args.frames or frames
    tokens = recorder.records[0]["tokens"]
    layers = recorder.num_layers
    bounds = recorder.bounds

    mean = recorder.fractions()
    per_layer = [recorder.fractions(layer=i) for i in range(layers)]
    per_step = [recorder.fractions(step=s) for s in range(args.steps)]
    per_branch = [recorder.fractions(branch=b) for b in sorted({r["branch"] for r in recorder.records})]
    result = dict(source, card=card, dtype=str(dtype), steps=args.steps, prompts=prompts, frames=frames, size=size,
                  tokens=tokens, tiles=tiles, bounds=bounds, seconds=round(seconds, 1),
                  mean={t: mean[t] for t in tiles}, per_layer=per_layer, per_step=per_step, per_branch=per_branch,
                  records=recorder.records)

    head = "| | " + " | ".join(f"tile {t}: < {b:g}" for t in tiles for b in bounds) + " |"
    rule = "|---" * (1 + len(tiles) * len(bounds)) + "|"
    print(f"\nAttention tiles below a share of every query row's mass, % of (head, q-tile, k-tile); "
          f"{tokens} tokens ({frames}x{size}x{size}), {len(prompts)} prompts, {args.steps} steps, both guidance "
          f"branches, {card}, {source}; {seconds:.0f} s\n")
    print(head + "\n" + rule)
    for s in range(args.steps):
        print(_row(f"step {s}", per_step[s], tiles, bounds))
    print("\n" + head + "\n" + rule)
    for i in range(layers):
        print(_row(f"layer {i}", per_layer[i], tiles, bounds))
    for b, fr in enumerate(per_branch):
        print(_row(["conditional", "unconditional"][b] if b < 2 else f"branch {b}", fr, tiles, bounds))
    print(_row("**mean**", mean, tiles, bounds))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
