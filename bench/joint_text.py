"""Joint attention with dense text tokens: one LiteAttention call with must-do ranges vs. parts merged by LSE.

HunyuanVideo puts its text tokens after the video tokens, CogVideoX before; text query rows and text key
columns must never be skipped. Two ways (liteattn/joint.py has both; `liteattn.enable(..., joint_text=...)` picks one):

  must_do : one call over all N tokens, the text range is must-do for keys (must_do) and queries (must_do_q)
  split   : LiteAttention over video x video (with LSE) + dense video x text (with LSE), merged;
            text rows: dense SDPA over all keys
  split+mask : split with a padding mask on the last third of the text keys (HunyuanVideo's padded prompt;
            one call with must-do ranges cannot take a mask)

Each mode runs `--steps` denoising steps on one LiteAttention (so skipping takes effect after the first) and
reports the median time of a call over the steps after the first two. Times are wall-clock (CUDA-synchronised on
a GPU).

    python bench/joint_text.py                       # CPU, small shapes (PyTorch backend)
    python bench/joint_text.py --device cuda --preset gpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from liteattn import LiteAttention
from liteattn.joint import joint_attention
from liteattn.testing import structured_qkv

PRESETS = {
    # name: list of (label, heads, head_dim, video tokens, text tokens)
    "cpu": [
        ("CogVideoX-like, small", 4, 64, 2048, 226),
        ("CogVideoX-like, 2x", 4, 64, 4096, 226),
        ("HunyuanVideo-like, small", 4, 128, 2048, 256),
    ],
    "gpu": [
        ("CogVideoX-5B 480p 49f", 48, 64, 17550, 226),
        ("HunyuanVideo 544p 61f", 24, 128, 16 * 34 * 60, 256),
    ],
}


def _dense(q, k, v, mask):
    # (B, S, H, D) in and out, as diffusers' native backend.
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


def _inputs(heads, head_dim, video, text, text_first, dtype, device, seed=0):
    q, k, v = structured_qkv(1, video, heads, head_dim, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    scale = q.std().item()
    tq, tk, tv = (torch.randn(1, text, heads, head_dim, generator=gen) * s for s in (scale, scale, 1.0))
    cat = (lambda t, x: torch.cat([t, x], 1)) if text_first else (lambda t, x: torch.cat([x, t], 1))
    return [cat(t, x).to(dtype=dtype, device=device) for t, x in ((tq, q), (tk, k), (tv, v))]


def _time(fn, device, steps):
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) if len(times) > 2 else times[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu, or gpu on cuda")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--threshold", type=float, default=-6.0)
    parser.add_argument("--tile", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    torch.manual_seed(0)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, dtype={dtype}, threshold={args.threshold}, tile={args.tile}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'shape':<26} {'layout':<11} {'dense SDPA':>11} {'must_do':>11} {'split':>11} {'split+mask':>11} "
          f"{'split/must_do':>13} {'sparsity m/s':>13}")
    for label, heads, head_dim, video, text in PRESETS[preset]:
        for text_first in (True, False):
            q, k, v = _inputs(heads, head_dim, video, text, text_first, dtype, device)
            attn = {mode: LiteAttention(threshold=args.threshold, tile_q=args.tile, tile_k=args.tile)
                    for mode in ("must_do", "split", "split_mask")}
            # The padded prompt: the last third of the text tokens is masked out.
            index = torch.arange(q.shape[1], device=device)
            text_end = text if text_first else q.shape[1]
            mask = ~((index >= text_end - text // 3) & (index < text_end)).view(1, 1, 1, -1)
            runs = {
                "dense": lambda: _dense(q, k, v, None),
                "must_do": lambda: joint_attention(attn["must_do"], q, k, v, text_len=text, text_first=text_first,
                                                   strategy="must_do"),
                "split": lambda: joint_attention(attn["split"], q, k, v, text_len=text, text_first=text_first,
                                                 strategy="split", dense=_dense),
                "split_mask": lambda: joint_attention(attn["split_mask"], q, k, v, text_len=text,
                                                      text_first=text_first, strategy="split", attn_mask=mask,
                                                      dense=_dense),
            }
            ms = {name: 1e3 * _time(fn, device, args.steps) for name, fn in runs.items()}
            layout = "text first" if text_first else "text last"
            print(f"{label:<26} {layout:<11} {ms['dense']:>9.1f}ms {ms['must_do']:>9.1f}ms {ms['split']:>9.1f}ms "
                  f"{ms['split_mask']:>9.1f}ms {ms['split'] / ms['must_do']:>13.2f} "
                  f"{attn['must_do'].sparsity:>6.1%}/{attn['split'].sparsity:.1%}")


if __name__ == "__main__":
    main()
