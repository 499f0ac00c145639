"""Per-call Python cost of the integration (issue 11, item 2): what ``LiteAttention.__call__`` and the diffusers
handle's hooks cost on the host, with the attention itself taken out.

    python bench/call_overhead.py                 # CPU, about 20 s
    python bench/call_overhead.py --device cuda   # the same on a GPU (host time: launches are asynchronous)

The op's function is replaced by a stub that returns a preallocated output, so what is timed is the Python work
around it: validation, the state's bookkeeping, the backend choice, building arguments. Each route is timed over
``--calls`` calls of one layer (best of ``--repeats`` runs): the skipping path (``state=``), threshold -inf on an
untouched state (PyTorch's attention), skipping off, and the skipping path with must-do ranges (joint text). With
diffusers installed, the handle's per-transformer-call hooks (``_before_call`` + ``_after_call``) are timed on a
40-layer WanTransformer3DModel of tiny width, two guidance branches per step.

``--real`` also times the calls with the real computation at a tiny shape (the floor a real call adds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch


def _per_call_us(fn, calls: int, repeats: int, sync=lambda: None) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return min(runs)  # the least disturbed run: the machine may be shared


def layer_routes(device, calls: int, repeats: int, stub: bool = True) -> dict:
    """µs per LiteAttention call, per route."""
    from liteattn import ops
    from liteattn.module import LiteAttention

    B, S, H, D = 1, 256, 2, 32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype) for _ in range(3))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    saved = {}
    if stub:
        out, empty = torch.empty_like(q), torch.empty(0, device=device)

        def compute(q, k, v, *args):
            return out, empty

        if hasattr(ops, "_attention_fwd_direct"):  # the direct path's function
            saved["_attention_fwd_direct"] = ops._attention_fwd_direct
            ops._attention_fwd_direct = compute
        saved["_DIRECT"] = ops._DIRECT["_attention_fwd"]
        ops._DIRECT["_attention_fwd"] = compute
    try:
        routes = {}
        with torch.no_grad():
            attn = LiteAttention(threshold=-5.0, tile_q=64, tile_k=64)
            routes["skipping (state)"] = _per_call_us(lambda: attn(q, k, v), calls, repeats, sync)
            routes["skipping, must_do ranges"] = _per_call_us(
                lambda: attn(q, k, v, must_do_list=[(0, 64)], must_do_q_list=[(0, 64)]), calls, repeats, sync)
            dense = LiteAttention(threshold=-math.inf, tile_q=64, tile_k=64)
            routes["threshold -inf, untouched (SDPA)"] = _per_call_us(lambda: dense(q, k, v), calls, repeats, sync)
            off = LiteAttention(enable_skipping=False, tile_q=64, tile_k=64)
            routes["skipping off (SDPA)"] = _per_call_us(lambda: off(q, k, v), calls, repeats, sync)
            routes["lite_attention, stateless dense"] = _per_call_us(
                lambda: ops.lite_attention(q, k, v, tile_q=64, tile_k=64), calls, repeats, sync)
    finally:
        if "_attention_fwd_direct" in saved:
            ops._attention_fwd_direct = saved["_attention_fwd_direct"]
        if "_DIRECT" in saved:
            ops._DIRECT["_attention_fwd"] = saved["_DIRECT"]
    return routes


def handle_hooks(device, calls: int, repeats: int, layers: int = 40) -> dict:
    """µs per transformer call of the handle's hooks, on a ``layers``-layer Wan of tiny width."""
    from diffusers import WanTransformer3DModel

    import liteattn

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    model = WanTransformer3DModel(**cfg).to(device).eval()
    latents = torch.randn(1, 4, 2, 8, 8, device=device)
    text = torch.randn(1, 8, 32, device=device)
    handle = liteattn.enable(model, threshold=-5.0)
    with torch.no_grad():
        for _ in range(2):  # step 0, both branches: the LiteAttentions and their states exist
            model(latents, torch.tensor([999.0], device=device), text, return_dict=False)
    transformer = handle._transformers[0]
    timesteps = [torch.tensor([float(t)]) for t in range(998, 998 - calls - 1, -1)]  # host tensors: no sync
    result = {}
    runs_before, runs_after = [], []
    for _ in range(repeats):
        handle.reset()
        t0 = time.perf_counter()
        for i in range(calls):
            for _branch in range(2):
                handle._before_call(transformer, (latents, timesteps[i], text), {})
        t1 = time.perf_counter()
        for i in range(calls):
            for _branch in range(2):
                handle._after_call(transformer)
        t2 = time.perf_counter()
        runs_before.append((t1 - t0) / (2 * calls) * 1e6)
        runs_after.append((t2 - t1) / (2 * calls) * 1e6)
    handle.disable()
    result["_before_call"] = min(runs_before)
    result["_after_call"] = min(runs_after)
    result["layers"] = layers
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--real", action="store_true", help="also time real calls at a tiny shape")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  routes_stubbed=layer_routes(device, args.calls, args.repeats))
    if args.real:
        result["routes_real"] = layer_routes(device, max(args.calls // 10, 100), args.repeats, stub=False)
    try:
        result["handle"] = handle_hooks(device, min(args.calls, 500), args.repeats)
    except ImportError as exc:
        print(f"(handle hooks not timed: {exc})")
    print(f"per-call host cost, {result['device']} (µs, median of {args.repeats} x {args.calls} calls):")
    for kind in ("routes_stubbed", "routes_real"):
        for route, us in result.get(kind, {}).items():
            print(f"  {route:40s} {'stubbed' if kind == 'routes_stubbed' else 'real':8s} {us:8.1f} µs/call")
    if "handle" in result:
        h = result["handle"]
        print(f"  handle hooks per transformer call ({h['layers']} layers): _before_call {h['_before_call']:.1f} µs, "
              f"_after_call {h['_after_call']:.1f} µs ({(h['_before_call'] + h['_after_call']) / h['layers']:.2f} "
              f"µs per layer)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
