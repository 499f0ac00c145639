"""The whole Wan transformer with liteattn (issue 11, item 3): ms per denoising step with guidance, at forced read
sparsity, against the original processors and the bound 1/(1 - share*s); and the -inf overhead targets (item 2).

    python bench/wan_transformer.py                       # CUDA, every stage (bench/wan_transformer.sh on the device)
    python bench/wan_transformer.py --tiny                # CPU check: tiny config, backend torch, wall clock
    python bench/wan_transformer.py --table out.json      # the markdown tables of a JSON
    python bench/wan_transformer.py --plot speedup.png --from out.json   # speed-up vs sparsity, measured vs bound

Stages (each wrapped: a failure is recorded in the JSON and the rest runs; the JSON is rewritten after each):

- ``transformer`` (per shape): diffusers' ``WanTransformer3DModel``, random bf16 weights (norms and embedders fp32,
  as from_pretrained leaves them), 512 text tokens. ``wan14b-720p``: the Wan2.1-14B config with ``--layers-14b`` of
  its 40 blocks (75600 tokens: 81 frames of 720x1280 -> latent 21 x 90 x 160, patch (1, 2, 2)); ``wan1.3b-480p``:
  the 1.3B config with ``--layers-13b`` of its 30 blocks (32760 tokens: 480x832). One step = two transformer calls
  (conditional and unconditional text, the same timestep: the two guidance branches; the handle follows the steps
  from a scheduler stand-in, as in a pipeline, so no host sync per call). Runs, in order: the original
  processors; the original with the video self-attention replaced by a no-op that returns its query (same shape:
  ``share = 1 - T_noop / T_original``, the attention share of the step); liteattn at threshold -inf on untouched
  states (PyTorch's attention; the -inf overhead); liteattn with forced read lists at each sparsity: every state's
  read list (every layer, both branches) is replaced by a random pattern keeping round((1 - s) Nk) tiles of each
  row, always including its first tile, and the threshold stays -inf, so each call reads and writes exactly those
  tiles (checked after the timed steps: ``lists_kept``); the original again (drift check). Also the attention alone
  (PyTorch SDPA on the same shape, x layers x 2 calls: ``share_sdpa``). Per run: median ms per step (CUDA events,
  ``--warmup`` untimed steps then ``--repeats`` timed), peak memory (``torch.cuda.max_memory_allocated``, reset
  before each run), and for forced runs the speed-up over the original and its ratio to ``1 / (1 - share * s)``.
- ``block_inf``: one Wan 1.3B 480p block, liteattn at -inf (untouched states) vs the original processors, alternated
  ``--rounds`` times (target <= 1.02x).
- ``demo_inf``: the shipped demo model's whole sampling (``--demo-prompts`` prompts x ``--demo-steps`` steps,
  guidance, from liteattn/demo) at -inf vs the original processors, alternated (target <= 1.03x).
- ``first_step``: per shape, the attention of a layer's first skipping call (the kernel reading every tile and
  writing its lists: ``lite_attention(state=fresh state, threshold=-10)``) against cuDNN SDPA and PyTorch's default
  SDPA, and the -inf call on an untouched state (``LiteAttention``, PyTorch's attention).
- ``overhead``: bench/call_overhead.py, host µs per ``LiteAttention`` call and per handle hook.

The kernel runs the config the autotuner picks for D=128 on H100/H200 (BLOCK_N=128, 8 warps, 3 stages; see
bench/NOTES.md) unless ``--autotune`` (minutes per shape). JSON: ``$OUT/wan_transformer.json`` (``OUT`` defaults to
/tmp/liteattn_out) or ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # liteattn from this checkout

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
STAGES = ("transformer", "block_inf", "demo_inf", "first_step", "overhead")


def tokens_of(latent, config) -> int:
    _, _, t, h, w = latent
    pt, ph, pw = config["patch_size"]
    return (t // pt) * (h // ph) * (w // pw)


# -- setup ------------------------------------------------------------------------------------------------------------

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


# -- the whole transformer ------------------------------------------------------------------------------------------

def noop_self_attention(tokens: int):
    """Patch the original Wan processor's attention call: video self-attention (query and key both ``tokens`` long)
    returns its query, shape (B, S, H, D) like the real output; cross-attention to the text runs as before."""
    from diffusers.models.transformers import transformer_wan

    real = transformer_wan.dispatch_attention_fn

    def dispatch(query, key, value, *args, **kwargs):
        if query.shape[1] == tokens and key.shape[1] == tokens:
            return query
        return real(query, key, value, *args, **kwargs)

    return mock.patch.object(transformer_wan, "dispatch_attention_fn", dispatch)


def forced_pattern(shape, sparsity: float, seed: int, device) -> torch.Tensor:
    """bool ``(B, H, Mq, Nk)``: each row keeps round((1 - s) Nk) random tiles, always including tile 0."""
    b, h, mq, nk = shape
    keep_n = max(1, round((1.0 - sparsity) * nk))
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(b, h, mq, nk, generator=gen, device=device)
    scores[..., 0] = 2.0  # the first tile of every row is kept
    chosen = scores.topk(keep_n, dim=-1).indices
    return torch.zeros(b, h, mq, nk, dtype=torch.bool, device=device).scatter_(-1, chosen, True)


def states_of(handle):
    """(layer, branch, SkipState) of every patched layer and guidance branch that has run."""
    for layer in handle.layers:
        branch = 0
        while True:
            try:
                attention = handle.attention(layer, branch)
            except ValueError:
                break
            yield layer, branch, attention.skip_state
            branch += 1


def run_transformer(results: Results, args, shape: str, device, timer: Timer):
    import liteattn

    stage = "transformer"
    config, latent, text_shape, tile = SHAPES[shape]
    config = dict(config)
    full_layers = config["num_layers"]
    if shape == "wan14b-720p":
        config["num_layers"] = min(args.layers_14b, full_layers)
    elif shape == "wan1.3b-480p":
        config["num_layers"] = min(args.layers_13b, full_layers)
    layers = config["num_layers"]
    tokens = tokens_of(latent, config)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    base = dict(shape=shape, tokens=tokens, layers=layers, of_layers=full_layers, heads=config["num_attention_heads"])
    print(f"\n== {shape}: {tokens} video tokens, {layers} of {full_layers} blocks, {timer.device}", flush=True)
    timer.reset_peak()
    model = build_model(config, device, dtype)
    weights_gb = timer.peak_gb()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(latent, generator=gen).to(device, dtype)
    texts = [torch.randn(text_shape, generator=gen).to(device, dtype) for _ in range(2)]  # cond, uncond
    timestep = torch.tensor([500.0], device=device)
    clock = Clock()  # every step is the next step of one run, for the whole benchmark

    @torch.no_grad()
    def step():
        clock.tick()
        outs = [model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
                for text in texts]  # the two guidance branches
        return outs

    rows = {}

    def measure(label, extra=None):
        timer.reset_peak()
        ms = timer(step, args.warmup, args.repeats)
        row = dict(base, run=label, ms_per_step=round(ms, 3), peak_gb=timer.peak_gb(), weights_gb=weights_gb)
        row.update(extra or {})
        rows[label] = row
        return row

    row = guarded(results, stage, dict(base, run="original"), lambda: measure("original"))
    if row is None:
        return
    results.add(stage, row)
    original = row["ms_per_step"]

    def noop():
        with noop_self_attention(tokens):
            return measure("original, self-attention a no-op")

    row = guarded(results, stage, dict(base, run="noop"), noop)
    share = None
    if row is not None:
        share = 1.0 - row["ms_per_step"] / original
        row["share"] = round(share, 4)
        results.add(stage, row)

    def sdpa_alone():
        h, d = config["num_attention_heads"], config["attention_head_dim"]
        # (B, H, S, D) views of (B, S, H, D) tensors, as the Wan processor passes them
        q, k, v = (torch.randn(1, tokens, h, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
        ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.warmup,
                   max(args.repeats, 3))
        del q, k, v
        return dict(base, run="SDPA alone (x layers x 2 calls)", sdpa_ms=round(ms, 3),
                    share_sdpa=round(2 * layers * ms / original, 4))

    row = guarded(results, stage, dict(base, run="sdpa alone"), sdpa_alone)
    if row is not None:
        results.add(stage, row)
    share_sdpa = row["share_sdpa"] if row is not None else None
    bound_share = share if share is not None else share_sdpa

    handle = liteattn.enable(model, threshold=-math.inf, warmup_steps=0, tile_q=tile, tile_k=tile,
                             backend="torch" if device.type == "cpu" else None, scheduler=clock)
    try:
        def inf_untouched():
            row = measure("liteattn -inf (untouched: PyTorch attention)")
            row["vs_original"] = round(row["ms_per_step"] / original, 4)
            row["state_mb"] = round(handle.skip_state_bytes() / 2**20, 2)
            return row

        row = guarded(results, stage, dict(base, run="liteattn -inf"), inf_untouched)
        if row is not None:
            results.add(stage, row)
        states = list(states_of(handle))
        if not states or any(state is None for _, _, state in states):
            results.add(stage, dict(base, run="forced", error=f"no skip states after a step ({len(states)})"))
            return
        for s in args.sparsities:
            def forced():
                patterns, skipped = [], 0.0
                for n, (_, _, state) in enumerate(states):
                    pattern = forced_pattern(state.shape, s, seed=1000 * n + int(100 * s), device=device)
                    state.set_read(pattern)
                    skipped += 1.0 - pattern.float().mean().item()
                    patterns.append(pattern.cpu())  # (off the GPU: the peak below is the model's and liteattn's)
                    del pattern
                measured = skipped / len(states)
                row = measure(f"liteattn forced {s:.0%}")
                kept = all(torch.equal(state.to_dense().cpu(), p) for (_, _, state), p in zip(states, patterns))
                speedup = original / row["ms_per_step"]
                row.update(target_sparsity=s, sparsity=round(measured, 4), lists_kept=kept, states=len(states),
                           speedup=round(speedup, 4))
                if bound_share is not None:
                    bound = 1.0 / (1.0 - bound_share * measured)
                    row.update(bound=round(bound, 4), of_bound=round(speedup / bound, 4))
                del patterns
                return row

            row = guarded(results, stage, dict(base, run=f"forced {s:.0%}", target_sparsity=s), forced)
            if row is not None:
                results.add(stage, row)
    finally:
        handle.disable()
    row = guarded(results, stage, dict(base, run="original again"), lambda: measure("original again"))
    if row is not None:
        row["vs_first"] = round(row["ms_per_step"] / original, 4)
        results.add(stage, row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- -inf overhead targets ----------------------------------------------------------------------------------------

def run_block_inf(results: Results, args, device, timer: Timer):
    """One Wan 1.3B 480p block at -inf (untouched states) vs the original processors, alternated."""
    import liteattn

    shape = "tiny" if args.tiny else "wan1.3b-480p"
    config, latent, text_shape, tile = SHAPES[shape]
    config = dict(config, num_layers=1)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(config, device, dtype)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(latent, generator=gen).to(device, dtype)
    text = torch.randn(text_shape, generator=gen).to(device, dtype)
    timestep = torch.tensor([500.0], device=device)
    clock = Clock()

    @torch.no_grad()
    def call():
        clock.tick()
        return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    original, lite = [], []
    repeats = max(args.repeats, 10)
    for _ in range(args.rounds):
        original.append(timer(call, 2, repeats))
        handle = liteattn.enable(model, threshold=-math.inf, warmup_steps=0, tile_q=tile, tile_k=tile,
                                 backend="torch" if device.type == "cpu" else None, scheduler=clock)
        try:
            lite.append(timer(call, 2, repeats))
        finally:
            handle.disable()
    o, l = statistics.median(original), statistics.median(lite)
    results.add("block_inf", dict(shape=shape, tokens=tokens_of(latent, config), layers=1,
                                  original_ms=[round(x, 3) for x in original], liteattn_inf_ms=[round(x, 3) for x in lite],
                                  ratio=round(l / o, 4), target=1.02))


def run_demo_inf(results: Results, args, device, timer: Timer):
    """The demo model's whole sampling at -inf vs its original processors, alternated."""
    import liteattn
    from liteattn.demo import data
    from liteattn.demo.model import load_model
    from liteattn.demo.sample import make_scheduler, sample

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = load_model(None, device=device, dtype=dtype)
    tokens = data.tokenize(data.sample_scenes(args.demo_prompts, seed=2024).prompts())

    def seconds(lite: bool, steps: int) -> float:
        scheduler = make_scheduler()
        handle = (liteattn.enable(model.transformer, threshold=-math.inf, scheduler=scheduler,
                                  backend="torch" if device.type == "cpu" else None) if lite else None)
        try:
            timer.sync()
            start = time.perf_counter()
            sample(model, tokens, steps=steps, scheduler=scheduler)
            timer.sync()
            return time.perf_counter() - start
        finally:
            if handle is not None:
                handle.disable()

    if device.type == "cuda":
        seconds(False, 2), seconds(True, 2)  # CUDA start-up, kernels
    original, lite = [], []
    for _ in range(args.rounds):
        original.append(seconds(False, args.demo_steps))
        lite.append(seconds(True, args.demo_steps))
    o, l = statistics.median(original), statistics.median(lite)
    results.add("demo_inf", dict(prompts=args.demo_prompts, steps=args.demo_steps,
                                 original_s=[round(x, 4) for x in original], liteattn_inf_s=[round(x, 4) for x in lite],
                                 ratio=round(l / o, 4), target=1.03))


def run_first_step(results: Results, args, device, timer: Timer):
    """Attention of a layer's first skipping call (reads every tile, writes the lists) vs cuDNN SDPA, per shape."""
    import liteattn
    from liteattn import SkipState, lite_attention

    shapes = ["tiny"] if args.tiny else [s for s in ("wan1.3b-480p", "wan14b-720p") if s in args.shapes]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    backend = "torch" if device.type == "cpu" else None
    for shape in shapes:
        config, latent, _, tile = SHAPES[shape]
        h, d, s = config["num_attention_heads"], config["attention_head_dim"], tokens_of(latent, config)
        label = dict(shape=shape, heads=h, tokens=s, head_dim=d)

        def one():
            q, k, v = (torch.randn(1, s, h, d, device=device, dtype=dtype) for _ in range(3))  # (B, S, H, D)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views, as diffusers passes them
            row = dict(label)
            repeats = max(args.repeats, 5)
            row["sdpa_default_ms"] = round(timer(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
                                                 1, repeats), 3)
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    row["cudnn_ms"] = round(timer(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt),
                                                  1, repeats), 3)
            state = SkipState(1, h, s, s, tile, tile, device=device)
            times = []
            for n in range(repeats + 1):  # the first call compiles / warms up
                state.reset()  # a fresh state: the call reads every tile and writes the lists
                times.append(timer(lambda: lite_attention(q, k, v, state=state, threshold=-10.0, backend=backend),
                                   0, 1))
            row["first_skip_ms"] = round(statistics.median(times[1:]), 3)
            row["first_skip_sparsity_written"] = round(state.sparsity(), 4)
            dense = liteattn.LiteAttention(threshold=-math.inf, tile_q=tile, tile_k=tile, backend=backend)
            row["inf_untouched_ms"] = round(timer(lambda: dense(q, k, v), 1, repeats), 3)
            ref = row.get("cudnn_ms", row["sdpa_default_ms"])
            row["first_skip_vs_cudnn"] = round(row["first_skip_ms"] / ref, 4)
            row["inf_vs_cudnn"] = round(row["inf_untouched_ms"] / ref, 4)
            del q, k, v, qt, kt, vt, state
            return row

        row = guarded(results, "first_step", label, one)
        if row is not None:
            results.add("first_step", row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_overhead(results: Results, args, device, timer: Timer):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import call_overhead

    calls = 500 if args.tiny else 3000
    row = dict(device=str(device), routes_stubbed=call_overhead.layer_routes(device, calls, 5))
    try:
        row["handle"] = call_overhead.handle_hooks(device, min(calls, 300), 5)
    except ImportError as exc:
        row["handle"] = f"not timed: {exc}"
    results.add("overhead", row)


# -- reporting ------------------------------------------------------------------------------------------------------

def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def table(data: dict) -> str:
    meta, stages = data["meta"], data["stages"]
    out = [f"{meta['card']}, {meta['date']}, torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, "
           f"triton {meta.get('triton')}; median of {meta['repeats']} steps after {meta['warmup']} "
           f"(kernel config {'autotuned' if meta.get('autotune') else 'pinned: BLOCK_N=128, 8 warps, 3 stages'})", ""]
    rows = stages.get("transformer", [])
    for shape in dict.fromkeys(r["shape"] for r in rows):
        these = [r for r in rows if r["shape"] == shape]
        first = these[0]
        share = next((r.get("share") for r in these if "share" in r), None)
        share_sdpa = next((r.get("share_sdpa") for r in these if "share_sdpa" in r), None)
        out.append(f"**{shape}**: {first['tokens']} video tokens, {first['layers']} of {first['of_layers']} blocks"
                   f"{' (fewer blocks: the step time scales with them)' if first['layers'] < first['of_layers'] else ''}"
                   f", one step = 2 transformer calls (guidance); attention share {fmt(share, '.1%')} (no-op "
                   f"self-attention), {fmt(share_sdpa, '.1%')} (SDPA alone x layers x 2)")
        out.append("")
        out.append("| run | sparsity | ms / step | peak GB | speed-up | bound 1/(1-share*s) | of bound |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in these:
            if "error" in r:
                out.append(f"| {r['run']} | | error: {r['error'][:80]} | | | | |")
                continue
            if "ms_per_step" not in r:
                continue
            note = "" if r.get("lists_kept", True) else " (lists changed!)"
            speedup = r.get("speedup")
            if speedup is None and "vs_original" in r:
                speedup = 1 / r["vs_original"]
            out.append(f"| {r['run']}{note} | {fmt(r.get('sparsity'), '.1%')} | {r['ms_per_step']:.1f} | "
                       f"{fmt(r.get('peak_gb'))} | {fmt(speedup, '.3f')}{'x' if speedup is not None else ''} | {fmt(r.get('bound'), '.3f')} | "
                       f"{fmt(r.get('of_bound'), '.3f')} |")
        out.append("")
    for stage, what, unit in (("block_inf", "one Wan 1.3B 480p block", "ms"), ("demo_inf", "demo sampling", "s")):
        for r in stages.get(stage, []):
            if "error" in r:
                out.append(f"- {what} at -inf: error {r['error'][:120]}")
                continue
            key_o, key_l = ("original_ms", "liteattn_inf_ms") if unit == "ms" else ("original_s", "liteattn_inf_s")
            out.append(f"- {what} at threshold -inf vs original: **{r['ratio']:.3f}x** (target <= {r['target']}x); "
                       f"original {r[key_o]} {unit}, liteattn {r[key_l]} {unit}")
    first = stages.get("first_step", [])
    if first:
        out += ["", "| attention shape | cuDNN ms | SDPA default ms | first skipping call ms (vs cuDNN) | "
                    "-inf untouched ms (vs cuDNN) |", "|---|---:|---:|---:|---:|"]
        for r in first:
            if "error" in r:
                out.append(f"| {r['shape']} | error: {r['error'][:80]} | | | |")
                continue
            out.append(f"| {r['shape']} H={r['heads']} S={r['tokens']} D={r['head_dim']} | {fmt(r.get('cudnn_ms'))} | "
                       f"{r['sdpa_default_ms']:.2f} | {r['first_skip_ms']:.2f} ({r['first_skip_vs_cudnn']:.3f}x) | "
                       f"{r['inf_untouched_ms']:.2f} ({r['inf_vs_cudnn']:.3f}x) |")
    for r in stages.get("overhead", []):
        if "error" in r:
            continue
        routes = ", ".join(f"{k} {v:.1f}" for k, v in r["routes_stubbed"].items())
        out += ["", f"Host µs per LiteAttention call (compute stubbed): {routes}"]
        if isinstance(r.get("handle"), dict):
            h = r["handle"]
            out.append(f"Handle hooks per transformer call ({h['layers']} layers): _before_call "
                       f"{h['_before_call']:.1f} µs, _after_call {h['_after_call']:.1f} µs")
    return "\n".join(out)


def plot(data: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["stages"].get("transformer", []) if "speedup" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        raise ValueError("no forced-sparsity rows in this JSON")
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=130)
    grid = [i / 100 for i in range(0, 96)]
    for n, shape in enumerate(shapes):
        these = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["sparsity"])
        share = next((r.get("share") for r in data["stages"]["transformer"]
                      if r["shape"] == shape and "share" in r), None)
        color = f"C{n}"
        label = f"{shape} ({these[0]['layers']} of {these[0]['of_layers']} blocks)"
        ax.plot([r["sparsity"] for r in these], [r["speedup"] for r in these], "o-", color=color,
                label=f"{label}: measured")
        if share is not None:
            ax.plot(grid, [1 / (1 - share * s) for s in grid], "--", color=color,
                    label=f"bound 1/(1 - {share:.2f} s)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("read sparsity s (forced)")
    ax.set_ylabel("speed-up per denoising step vs original")
    ax.set_title(f"Wan transformer step with guidance, {data['meta']['card']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU check: tiny config, backend torch, wall clock")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--shapes", default="wan1.3b-480p,wan14b-720p")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--layers-14b", type=int, default=4, help="blocks of the 14B config (of 40)")
    p.add_argument("--layers-13b", type=int, default=30, help="blocks of the 1.3B config (of 30)")
    p.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the -inf overhead stages")
    p.add_argument("--demo-prompts", type=int, default=4)
    p.add_argument("--demo-steps", type=int, default=30)
    p.add_argument("--autotune", action="store_true", help="autotune the kernel (minutes per shape)")
    p.add_argument("--json", default=None, help="default $OUT/wan_transformer.json")
    p.add_argument("--table", metavar="JSON", help="print the markdown tables of this JSON and exit")
    p.add_argument("--plot", metavar="PNG", help="draw speed-up vs sparsity (measured vs bound): of --from's JSON "
                   "(and exit), else of this run")
    p.add_argument("--from", dest="from_json", metavar="JSON", help="the JSON --plot reads")
    args = p.parse_args(argv)
    out_dir = os.environ.get("OUT", "/tmp/liteattn_out")
    args.json = args.json or os.path.join(out_dir, "wan_transformer.json")
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return 0
    if args.plot and args.from_json:  # plot only
        with open(args.from_json) as f:
            print(plot(json.load(f), args.plot))
        return 0
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES] + [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown stages or shapes {unknown}; stages: {STAGES}, shapes: {list(SHAPES)}")
    if args.tiny:
        args.shapes = ["tiny"]
        args.demo_prompts, args.demo_steps = 1, 1
        args.repeats = min(args.repeats, 2)
        args.rounds = min(args.rounds, 2)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --tiny for the CPU check")
    if device.type == "cuda" and not args.autotune:
        pin_kernel_config()
    timer = Timer(device)
    results = Results(args.json, args, device)
    start = time.perf_counter()
    for stage in stages:
        print(f"\n=== stage {stage} ({time.perf_counter() - start:.0f} s in)", flush=True)
        if stage == "transformer":
            for shape in args.shapes:
                guarded(results, stage, dict(shape=shape), lambda: run_transformer(results, args, shape, device, timer))
        else:
            fn = dict(block_inf=run_block_inf, demo_inf=run_demo_inf, first_step=run_first_step,
                      overhead=run_overhead)[stage]
            guarded(results, stage, {}, lambda: fn(results, args, device, timer))
    results.data["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    results.save()
    if args.plot:
        try:
            print(plot(results.data, args.plot))
        except Exception as exc:  # the table below matters more
            print(f"no plot: {type(exc).__name__}: {exc}")
    print(f"\nJSON: {args.json} ({results.data['meta']['seconds']} s)\n")
    print(table(results.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
