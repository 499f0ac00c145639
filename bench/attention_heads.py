"""Per-head diagnosis of a demo model's self-attention: which heads are local, which spread over everything.

    python bench/attention_heads.py --checkpoint .ckpt/large1                       # 16 x 128 x 128, CPU: ~1 min
    python bench/attention_heads.py --checkpoint .ckpt/large1 --frames 32 --summary # the same weights on longer clips

One denoising step (``--sigma``, default 0.6) of a procedural training video of the model's own data set, with the
prompt of that video. For every layer and head: the fraction of 128-token tiles whose largest share of any query
row's mass is below 1e-3 (as bench/attention_sparsity.py counts it), the effective number of keys a row attends to
(``exp`` of the softmax entropy, averaged over rows), and the mass that falls within the same frame, within +-1
frame, and within a space-time neighbourhood (+-3 tokens in y and x, +-2 frames). ``--frames`` / ``--size`` run the
weights on other clip shapes (RoPE takes any size), a cheap forecast of what a longer or larger clip would give;
``--regions`` on a patchwork ground (liteattn/demo/textured.py).
The ``qk scale`` column is the head's mean of ``norm_q.weight * norm_k.weight`` (1 at initialisation): its logits
reach +-8 times that at most, and sharp local attention over 16k tokens needs about 2 (bench/LARGE_MODEL.md).

``--rope-ceiling 1,2.25,4`` prints, for each qk scale, the most a purely positional head can reach (q = k, a
constant vector put through the model's 3-D RoPE, its energy on the 1-4 highest frequencies of each axis, split
evenly or 2:1:1 between frames and rows/columns): the ceiling that the q/k norm's scale sets (CPU: ~1 min a scale).

``--binding`` also measures whether the prompt binds words to shapes: the swapped prompts of issue 14 and an
unrelated one, sampled from the same noise, at the model's own size (``--binding-steps``, default 30) and at the
reduced size of tests/test_demo_large.py (4 frames of 64x64, 4 steps, guidance 4; the test asks for > 0.02): the
mean absolute difference of the swapped pair beside that of the unrelated pair. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import attention_sparsity as bench  # noqa: E402  (also makes liteattn.demo importable from a checkout)


def head_stats(q: torch.Tensor, k: torch.Tensor, grid, sample_every: int = 37) -> list:
    """``q``, ``k``: ``(H, N, D)`` of one video; ``grid = (T, Hp, Wp)`` tokens. Returns one dict per head."""
    heads, n, dim = q.shape
    T, Hp, Wp = grid
    index = torch.arange(n, device=q.device)
    t, y, x = index // (Hp * Wp), (index // Wp) % Hp, index % Wp
    rows = index[::sample_every]
    dt = (t[None] - t[rows, None]).abs()
    near = ((y[None] - y[rows, None]).abs() <= 3) & ((x[None] - x[rows, None]).abs() <= 3) & (dt <= 2)
    out = []
    for h in range(heads):
        share = bench.tile_max_share(q[h:h + 1], k[h:h + 1], [128])[128]
        p = torch.softmax(q[h, rows].float() @ k[h].float().T / dim ** 0.5, dim=-1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        out.append(dict(head=h, below_1e3=(share < 1e-3).float().mean().item(),
                        effective_keys=entropy.exp().mean().item(), same_frame=(p * (dt == 0)).sum(-1).mean().item(),
                        within_1_frame=(p * (dt <= 1)).sum(-1).mean().item(), neighbourhood=(p * near).sum(-1).mean().item()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--regions", type=int, default=None,
                   help="textured data: ground regions per clip (default: the model's own data)")
    p.add_argument("--sigma", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--summary", action="store_true", help="only the tile sparsity per layer (faster)")
    p.add_argument("--binding", action="store_true", help="also measure the prompt binding (swapped prompts)")
    p.add_argument("--binding-steps", type=int, default=30)
    p.add_argument("--json", default="")
    p.add_argument("--rope-ceiling", default="", help="comma-separated qk scales: print the positional ceiling, exit")
    p.add_argument("--head-dim", type=int, default=64,
                   help="--rope-ceiling: the head's channels (64: 4 heads of the width 256; 32: 8 heads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.rope_ceiling:
        frames, size = args.frames or 16, args.size or 128
        print(f"| qk scale | max logit | best tiles below 1e-3 (%), pure RoPE head of {args.head_dim}, {frames}x{size}x{size} | "
              f"frequencies per axis | frames:rows:columns |\n|---|---|---|---|---|")
        for scale in (float(v) for v in args.rope_ceiling.split(",")):
            best, top, split = rope_ceiling(scale, frames, size, device, args.head_dim)
            ratio = ":".join(map(str, split))
            print(f"| {scale:g} | {args.head_dim ** 0.5 * scale:.1f} | {100 * best:.1f} | {top} | {ratio} |", flush=True)
        return 0
    model, source = bench.load(args.weights, args.checkpoint, device, torch.float32)
    frames, size = model.video_shape
    frames, size = args.frames or frames, args.size or size
    dataset = model.dataset
    shape_kw = {"size": size} if dataset.__name__.endswith("textured") else {}
    if args.regions:
        shape_kw["regions"] = args.regions
    scenes = dataset.sample_scenes(1, seed=args.seed, **shape_kw)
    x0 = dataset.render(scenes.to(device), frames=frames, size=size)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    x_t = (1 - args.sigma) * x0 + args.sigma * noise
    patch = model.config["patch_size"]
    grid = (frames // patch[0], size // patch[1], size // patch[2])
    rows = []
    from liteattn.demo.train import qk_norm_scale

    scales = qk_norm_scale(model)

    class Probe:
        def __init__(self, inner, layer):
            self.inner, self.layer = inner, layer

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
            with torch.no_grad():
                q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
                k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
                q, k = (bench.RecordingProcessor._rotate(v.float(), *rotary_emb) for v in (q, k))
                q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
                if args.summary:
                    share = bench.tile_max_share(q, k, [128])[128]
                    rows.append(dict(layer=self.layer, head="all", below_1e3=(share < 1e-3).float().mean().item()))
                else:
                    rows.extend(dict(layer=self.layer, qk_scale=scales[self.layer][r["head"]], **r)
                                for r in head_stats(q, k, grid))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)

    blocks = model.transformer.blocks
    originals = [block.attn1.processor for block in blocks]
    for i, block in enumerate(blocks):
        block.attn1.set_processor(Probe(originals[i], i))
    try:
        with torch.no_grad():
            model(x_t, torch.tensor([1000 * args.sigma], device=device), scenes.tokens)
    finally:  # the probes see this one call only (not the binding samples)
        for block, original in zip(blocks, originals):
            block.attn1.set_processor(original)
    tokens = grid[0] * grid[1] * grid[2]
    print(f"\n{source}; {frames}x{size}x{size} ({tokens} tokens), sigma {args.sigma}, '{scenes.prompts()[0]}'\n")
    if args.summary:
        print("| layer | tiles below 1e-3 (%) | qk scale per head |\n|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {100 * r['below_1e3']:.1f} | {' '.join(f'{v:.2f}' for v in scales[r['layer']])} |")
    else:
        print("| layer | head | tiles below 1e-3 (%) | effective keys | same frame | +-1 frame | +-3 tokens, +-2 frames "
              "| qk scale |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['head']} | {100 * r['below_1e3']:.1f} | {r['effective_keys']:.0f} | "
                  f"{r['same_frame']:.2f} | {r['within_1_frame']:.2f} | {r['neighbourhood']:.2f} | "
                  f"{r['qk_scale']:.2f} |")
    mean = sum(r['below_1e3'] for r in rows) / len(rows)
    if args.summary:
        print(f"| **mean** | {100 * mean:.1f} | |")
    else:
        print(f"| **mean** | | {100 * mean:.1f} | | | | | |")
    result = dict(source, frames=frames, size=size, sigma=args.sigma, prompt=scenes.prompts()[0], heads=rows,
                  qk_scale=scales, mean_below_1e3=mean)
    if args.binding:
        result["binding"] = binding(model, args.binding_steps)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def rope_ceiling(scale: float, frames: int = 16, size: int = 128, device="cpu", head_dim: int = 64):
    """The best fraction of 128-token tiles below 1e-3 that a purely positional head reaches at this qk scale (the
    product of the q and k norm weights): ``(fraction, frequencies per axis, split)``."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(head_dim, (1, 4, 4), 64)
    cos, sin = (x.float().to(device) for x in rope(torch.zeros(1, 3, frames, size, size)))
    tokens = cos.shape[1]
    axes = [(0, rope.t_dim // 2), (rope.t_dim // 2, (rope.t_dim + rope.h_dim) // 2), ((rope.t_dim + rope.h_dim) // 2,
                                                                                       head_dim // 2)]
    best = (-1.0, 0, None)
    for top in (1, 2, 3, 4):
        for split in ((1, 1, 1), (2, 1, 1)):
            energy = torch.zeros(head_dim // 2)
            for (a, _), share in zip(axes, split):
                energy[a:a + top] = head_dim * scale * share / sum(split) / top
            c = torch.zeros(head_dim)
            c[0::2] = energy.sqrt()  # |q|^2 = |k|^2 = head_dim scale: the logit at zero offset is sqrt(head_dim) scale
            q = bench.RecordingProcessor._rotate(c.to(device).expand(1, tokens, 1, head_dim), cos, sin)
            q = q[0].transpose(0, 1)
            share = bench.tile_max_share(q, q, [128])[128]
            best = max(best, ((share < 1e-3).float().mean().item(), top, split), key=lambda b: b[0])
    return best


SWAPPED = ("red circle moving right, blue square moving down", "red square moving right, blue circle moving down")
OTHER = "green triangle moving up"


def binding(model, steps: int) -> dict:
    """Mean absolute difference between videos of the swapped prompts (and of an unrelated one), same noise."""
    from liteattn.demo import data
    from liteattn.demo.sample import sample

    out = {}
    for name, kw in (("full", dict(steps=steps)), ("test", dict(steps=4, guidance=4.0, frames=4, size=64))):
        # One prompt a call: the sampler's noise for a video depends on its place in the batch.
        videos = torch.cat([sample(model, data.tokenize([p]), seed=0, **kw) for p in list(SWAPPED) + [OTHER]])
        swapped, other = (videos[0] - videos[1]).abs().mean().item(), (videos[0] - videos[2]).abs().mean().item()
        out[name] = dict(kw, swapped=swapped, unrelated=other, ratio=swapped / max(other, 1e-12))
        print(f"binding ({name}: {kw}): swapped prompts differ by {swapped:.4f} (mean abs), an unrelated prompt by "
              f"{other:.4f}: ratio {swapped / max(other, 1e-12):.3f}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
