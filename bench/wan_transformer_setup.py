"""bench/wan_transformer.py's setup: the Wan configs and shapes, the model with random weights, the pinned kernel
config, and the measuring harness (the scheduler stand-in, the timer, the JSON rows, the guard around each stage)."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
import traceback

import torch

CONFIG_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CONFIG_14B = dict(CONFIG_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # 5120 wide
CONFIG_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                   text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
SHAPES = {  # config, latent (B, C, T, H, W), text (B, L, D), skip tile
    "wan1.3b-480p": (CONFIG_13B, (1, 16, 21, 60, 104), (1, 512, 4096), 128),
    "wan14b-720p": (CONFIG_14B, (1, 16, 21, 90, 160), (1, 512, 4096), 128),
    "tiny": (CONFIG_TINY, (1, 4, 3, 24, 24), (1, 8, 32), 32),  # 432 tokens, 14 tiles of 32 (the last partial)
}
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


def tokens_of(latent, config) -> int:
    _, _, t, h, w = latent
    pt, ph, pw = config["patch_size"]
    return (t // pt) * (h // ph) * (w // pw)




def build_model(config, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not minutes of CPU init for 14B blocks
        model = WanTransformer3DModel(**config)
    model = model.to(device, dtype).eval()
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=bfloat16) leaves them
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules or ()):
            module.float()
    return model


def pin_kernel_config() -> None:
    """The config the autotuner picks for D=128 in every mode on H100/H200 (bench/NOTES.md): no minutes of tuning."""
    from liteattn.backends import triton_kernel

    chosen = [c for c in triton_kernel.lite_attn_fwd.configs
              if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == (128, 8, 3)]
    triton_kernel.lite_attn_fwd.configs = chosen or triton_kernel.lite_attn_fwd.configs


class Clock:
    """A scheduler stand-in for ``liteattn.enable(scheduler=...)``, as a pipeline passes its own: the handle reads the
    step from the host (``step_index``), not from the timestep tensor (no host sync per transformer call)."""

    step_index = None

    def set_timesteps(self, *args, **kwargs):
        self.step_index = None

    def tick(self):
        self.step_index = 0 if self.step_index is None else self.step_index + 1


class Timer:
    """Median ms of a callable: CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - begin))
        return statistics.median(times)

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)


class Results:
    """Rows per stage, written to JSON after every change."""

    def __init__(self, path, args, device):
        self.path = path
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.data = dict(meta=dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                   card=card, device=str(device), torch=torch.__version__, tiny=args.tiny,
                                   warmup=args.warmup, repeats=args.repeats, autotune=args.autotune),
                         stages={})
        try:
            import diffusers
            import triton

            self.data["meta"].update(diffusers=diffusers.__version__, triton=triton.__version__)
        except ImportError:
            pass

    def add(self, stage: str, row: dict):
        self.data["stages"].setdefault(stage, []).append(row)
        print(f"[{stage}] {json.dumps(row)}", flush=True)
        self.save()

    def save(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def guarded(results: Results, stage: str, label: dict, fn):
    """Run one measurement; an exception becomes an ``error`` row instead of ending the script."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        results.add(stage, dict(label, error=f"{type(exc).__name__}: {exc}"[:400]))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

