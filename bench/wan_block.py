"""One Wan2.1-14B transformer block at 720p through `liteattn.enable`: what skipping buys a whole block.

    python bench/wan_block.py        # CUDA, diffusers; about two minutes

A diffusers `WanTransformer3DModel` with the Wan2.1-14B config but one block (random weights, bf16), on a 720p
81-frame latent (21 x 90 x 160 -> 75600 tokens) and a 512-token prompt. Timed (CUDA events, median of 5 calls):
the original processors (cuDNN SDPA), then liteattn with forced skip lists: after one dense call, the self-attention
read list is replaced by random per-q-tile lists of sparsity s (the `liteattn bench` lists) and the threshold set to
-inf, so every later call reads and writes exactly those tiles. Each call gets a smaller timestep, so the handle
sees consecutive denoising steps of one guidance branch. The self-attention share `a` is cuDNN SDPA alone on the
block's (1, 40, 75600, 128) shape over the original block's time; `1/(1 - a*s)` is what skipping could give if
the kernel matched cuDNN.
"""

from __future__ import annotations

import statistics
import sys

import torch

CONFIG_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=1, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT = (1, 16, 21, 90, 160)  # 81 frames of 720x1280 after Wan's VAE (4x temporal, 8x spatial)
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


def timed(fn, calls: int = 5) -> float:
    fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    from diffusers import WanTransformer3DModel

    import liteattn
    from liteattn.bench import random_lists

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = WanTransformer3DModel(**CONFIG_14B).to(device, torch.bfloat16).eval()
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=bfloat16) leaves them
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules or ()):
            module.float()
    latents = torch.randn(LATENT, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    clock = iter(range(999, -1000000, -1))

    @torch.no_grad()
    def call():
        t = torch.tensor([float(next(clock))], device=device)
        return model(latents, t, text, return_dict=False)[0]

    print(f"{torch.cuda.get_device_name()}; Wan2.1-14B config, 1 block, 75600 video tokens, bf16", flush=True)
    rows = [("original (cuDNN SDPA)", None, timed(call))]

    q = torch.randn(1, 40, 75600, 128, device=device, dtype=torch.bfloat16)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    del q

    handle = liteattn.enable(model, threshold=float("-inf"))
    rows.append(("liteattn, threshold -inf (reads all)", 0.0, timed(call)))
    state = handle.attention(handle.layers[0]).skip_state
    for s in SPARSITIES:
        lists = random_lists(1, 40, 75600, 128, s, 0, device)
        state.set_read(lists)
        ms = timed(call)
        measured = state.sparsity()
        rows.append(("liteattn, forced lists", measured, ms))
    handle.disable()

    base = rows[0][2]
    share = sdpa / base
    print(f"\nthe self-attention core (cuDNN SDPA alone, same shape): {sdpa:.1f} of the block's {base:.1f} ms "
          f"(a = {share:.0%})\n")
    print("| block | sparsity | median ms | speed-up vs original | bound 1/(1 - a*s) |")
    print("|---|---:|---:|---:|---:|")
    for label, s, ms in rows:
        bound = "-" if s is None else f"{1 / (1 - share * s):.2f}x"
        print(f"| {label} | {'-' if s is None else f'{s:.0%}'} | {ms:.1f} | {base / ms:.2f}x | {bound} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
