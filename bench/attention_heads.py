"""Per-head diagnosis of a demo model's self-attention: which heads are local, which spread over everything.

    python bench/attention_heads.py --checkpoint .ckpt/large1                       # 16 x 128 x 128, CPU: ~1 min
    python bench/attention_heads.py --checkpoint .ckpt/large1 --frames 32 --summary # the same weights on longer clips

One denoising step (``--sigma``, default 0.6) of a procedural training video of the model's own data set, with the
prompt of that video. For every layer and head: the fraction of 128-token tiles whose largest share of any query
row's mass is below 1e-3 (as bench/attention_sparsity.py counts it), the effective number of keys a row attends to
(``exp`` of the softmax entropy, averaged over rows), and the mass that falls within the same frame, within +-1
frame, and within a space-time neighbourhood (+-3 tokens in y and x, +-2 frames). ``--frames`` / ``--size`` run the
weights on other clip shapes (RoPE takes any size), a cheap forecast of what a longer or larger clip would give.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--sigma", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=77)
    p.add_argument("--summary", action="store_true", help="only the tile sparsity per layer (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    model, source = bench.load(args.weights, args.checkpoint, device, torch.float32)
    frames, size = model.video_shape
    frames, size = args.frames or frames, args.size or size
    dataset = model.dataset
    shape_kw = {"size": size} if dataset.__name__.endswith("textured") else {}
    scenes = dataset.sample_scenes(1, seed=args.seed, **shape_kw)
    x0 = dataset.render(scenes.to(device), frames=frames, size=size)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    x_t = (1 - args.sigma) * x0 + args.sigma * noise
    patch = model.config["patch_size"]
    grid = (frames // patch[0], size // patch[1], size // patch[2])
    rows = []

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
                    rows.extend(dict(layer=self.layer, **r) for r in head_stats(q, k, grid))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)

    blocks = model.transformer.blocks
    for i, block in enumerate(blocks):
        block.attn1.set_processor(Probe(block.attn1.processor, i))
    with torch.no_grad():
        model(x_t, torch.tensor([1000 * args.sigma], device=device), scenes.tokens)
    tokens = grid[0] * grid[1] * grid[2]
    print(f"\n{source}; {frames}x{size}x{size} ({tokens} tokens), sigma {args.sigma}, '{scenes.prompts()[0]}'\n")
    if args.summary:
        print("| layer | tiles below 1e-3 (%) |\n|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {100 * r['below_1e3']:.1f} |")
    else:
        print("| layer | head | tiles below 1e-3 (%) | effective keys | same frame | +-1 frame | +-3 tokens, +-2 frames |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['head']} | {100 * r['below_1e3']:.1f} | {r['effective_keys']:.0f} | "
                  f"{r['same_frame']:.2f} | {r['within_1_frame']:.2f} | {r['neighbourhood']:.2f} |")
    print(f"| **mean** | | {100 * sum(r['below_1e3'] for r in rows) / len(rows):.1f} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
