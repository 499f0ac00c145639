"""bench/wan_transformer.py's stages: the whole transformer at forced sparsity (``transformer``), the -inf overhead
targets (``block_inf``, ``demo_inf``), the first skipping call (``first_step``) and the host overhead (``overhead``).
Each writes its rows through ``Results.add``; the module docstring of bench/wan_transformer.py says what each measures."""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from unittest import mock

import torch

from wan_transformer_setup import SHAPES, Clock, Results, Timer, build_model, guarded, tokens_of


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

