"""liteattn under diffusers context parallelism on 2 GPUs (issue 10): ms per step on 1 vs 2 GPUs, Ulysses and ring,
dense and at forced 50% read sparsity, with correctness against 1 GPU and the skip-state memory per rank.

    torchrun --nproc_per_node 2 bench/two_gpu.py --shape wan14b-720p --json out/wan14b.json   # one shape per launch
    python bench/two_gpu.py --table out/wan14b.json out/wan13b.json                           # the markdown table
    torchrun --nproc_per_node 2 bench/two_gpu.py --tiny --device cpu                           # CPU check (gloo)

bench/two_gpu.sh runs both shapes on the device and prints the table last. Models: diffusers' WanTransformer3DModel
with random weights in bf16 (norms and embedders in fp32, as from_pretrained leaves them):

- ``wan1.3b-480p``: the Wan2.1-1.3B config with 4 of its 30 blocks, 81 frames of 480x832 (21 x 60 x 104 latent,
  32760 video tokens), 512 prompt tokens;
- ``wan14b-720p``: the Wan2.1-14B config with 2 of its 40 blocks, 81 frames of 720x1280 (75600 tokens).

Every rank first runs the whole model on its own GPU (the 1-GPU rows: rank 0's numbers), then with
``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` and, on a second copy of the model (same seed, same
weights), ``ring_degree=2``. Rows per mode: diffusers' own attention (the stock processors: SDPA, and cuDNN for the
ring, which needs the LSE), liteattn at threshold -inf (reads every tile), and liteattn with forced read lists: after
one call, every skip state's read list is replaced by a random pattern that keeps each tile with probability 1/2 and
always the first tile of each row, and the threshold stays -inf, so each later call reads and writes exactly those
tiles. Under Ulysses each rank forces its heads' slice of the 1-GPU pattern, so its output must equal the 1-GPU
forced output; under ring each K/V chunk has its own state and pattern (the rows' rel. error there is against the
1-GPU dense output and only shows that nothing broke). Timing: CUDA events, median of ``--iters`` calls after
``--warmup``; one call = one denoising step of one guidance branch.

Autotuning the kernel for every shape and mode would take minutes; the kernel is given the config the autotuner picks
for D=128 in every mode on H100/H200 (BLOCK_N=128, 8 warps, 3 stages; bench/NOTES.md) unless ``--autotune``.
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
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CONFIG_14B = dict(CONFIG_13B, num_attention_heads=40, ffn_dim=13824, num_layers=2)
CONFIG_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                   text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
SHAPES = {  # config, latent (B, C, T, H, W), text (B, L, D), skip tile
    "wan1.3b-480p": (CONFIG_13B, (1, 16, 21, 60, 104), (1, 512, 4096), 128),
    "wan14b-720p": (CONFIG_14B, (1, 16, 21, 90, 160), (1, 512, 4096), 128),
    "tiny": (CONFIG_TINY, (1, 4, 3, 24, 24), (1, 8, 32), 16),  # 432 tokens: 216 per rank, partial tiles
}
DENSITY = 0.5  # forced read lists keep each tile with this probability (and the first tile of each row)


# -- setup ------------------------------------------------------------------------------------------------------------

def init_distributed(device_type: str):
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    # A collective that hangs (one rank failed inside a forward) ends the process after this, instead of the job.
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120),
                            **({"device_id": device} if device_type == "cuda" else {}))
    return rank, world, device


def build_model(config, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU init for the 14B blocks
        model = WanTransformer3DModel(**config).eval()
    keep = model._keep_in_fp32_modules or ()
    # bf16 except the fp32 modules and parameters, as from_pretrained(torch_dtype=bfloat16) leaves them
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.to(dtype)
    return model


def enable_parallelism(model, device, **degrees):
    from diffusers import ContextParallelConfig

    # diffusers 0.42.1 divides the rank by the accelerator count (tests/test_parallel_distributed.py)
    if device.type == "cpu":
        with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
            model.enable_parallelism(config=ContextParallelConfig(**degrees))
    else:
        model.enable_parallelism(config=ContextParallelConfig(**degrees))


class Clock:
    """A scheduler stand-in for ``liteattn.enable(scheduler=...)``: each call is the next step of one run, read from
    the host (no sync per call)."""

    step_index = None

    def set_timesteps(self, *args, **kwargs):
        self.step_index = None

    def tick(self):
        self.step_index = 0 if self.step_index is None else self.step_index + 1


# -- measuring ------------------------------------------------------------------------------------------------------

def timed(fn, warmup: int, iters: int, device) -> tuple:
    """(median ms, the last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            out = fn()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times), out


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def keep_pattern(shape, seed: int) -> torch.Tensor:
    """bool ``(B, H, Mq, Nk)``: each tile kept with probability DENSITY, the first tile of each row always."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(tuple(shape), generator=gen) < DENSITY
    keep[..., 0] = True
    return keep


def lite_layers(model, handle):
    """(layer index, the K/V-chunk attentions) of every patched layer: one attention, or one per ring chunk."""
    for index, name in enumerate(handle.layers):
        processor = model.get_submodule(name.split(".", 1)[1]).processor
        yield index, processor.chunk_attentions(handle.attention(name))


def state_bytes(model, handle) -> int:
    return sum(chunks.skip_state_bytes for _, chunks in lite_layers(model, handle))


def force_lists(model, handle, mode: str, rank: int, world: int, heads: int):
    """Replace every skip state's read list by its forced pattern; returns the fraction of tiles they skip."""
    kept = total = 0
    for layer, chunks in lite_layers(model, handle):
        for chunk, attention in enumerate(chunks):
            state = attention.skip_state
            b, h, mq, nk = state.shape
            if mode == "ulysses":  # this rank's heads of the 1-GPU pattern
                pattern = keep_pattern((b, heads, mq, nk), seed=1000 + layer)[:, rank * h:(rank + 1) * h]
            elif mode == "ring":
                pattern = keep_pattern((b, h, mq, nk), seed=2000 + 100 * layer + 10 * rank + chunk)
            else:
                pattern = keep_pattern((b, h, mq, nk), seed=1000 + layer)
            state.set_read(pattern)
            kept, total = kept + int(pattern.sum()), total + pattern.numel()
    return 1.0 - kept / total


class Bench:
    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.rows = []
        config, latent, text, self.tile = SHAPES[args.shape]
        self.config = config
        self.dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        gen = torch.Generator().manual_seed(1)  # the same inputs on every rank
        self.latents = torch.randn(latent, generator=gen).to(device, self.dtype)
        self.text = torch.randn(text, generator=gen).to(device, self.dtype)
        self.timestep = torch.tensor([500.0], device=device)
        self.tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
        self.refs = {}

    def log(self, *parts):
        if self.rank == 0:
            print(*parts, flush=True)

    def record(self, **row):
        row = dict(shape=self.args.shape, tokens=self.tokens, heads=self.config["num_attention_heads"],
                   layers=self.config["num_layers"], **row)
        self.rows.append(row)
        if self.device.type == "cuda":
            row["peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(self.device)
        shown = {k: v for k, v in row.items() if k not in ("shape", "tokens", "heads", "layers")}
        self.log(f"[{self.args.shape}] {shown}")
        self.save()

    def save(self):
        if self.rank != 0 or not self.args.json:
            return
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    world_size=self.world, device=str(self.device), torch=torch.__version__,
                    card=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                    warmup=self.args.warmup, iters=self.args.iters, density=DENSITY, tile=self.tile,
                    autotune=self.args.autotune)
        try:
            import diffusers
            import triton

            meta.update(diffusers=diffusers.__version__, triton=triton.__version__)
        except ImportError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
        with open(self.args.json, "w") as f:
            json.dump(dict(meta=meta, rows=self.rows), f, indent=1)

    def call(self, model, clock=None):
        @torch.no_grad()
        def fn():
            if clock is not None:
                clock.tick()
            out = model(hidden_states=self.latents, timestep=self.timestep, encoder_hidden_states=self.text,
                        return_dict=False)[0]
            return out.wait() if hasattr(out, "wait") else out  # a gathered output may be an AsyncCollectiveTensor
        return fn

    def measure(self, label: dict, fn, ref_key=None, keep_as=None):
        """One row: time ``fn``, compare its output with a kept reference; an error is recorded, not raised."""
        try:
            ms, out = timed(fn, self.args.warmup, self.args.iters, self.device)
            row = dict(label, ms=round(ms, 2))
            if ref_key is not None and ref_key in self.refs:
                row["rel_err"] = rel_err(out, self.refs[ref_key])
                row["vs"] = ref_key
            if keep_as is not None:
                self.refs[keep_as] = out
            return row
        except Exception as exc:  # one failure must not lose the rest of the table
            traceback.print_exc()
            return dict(label, error=f"{type(exc).__name__}: {exc}"[:300])

    def run_mode(self, mode: str):
        """mode: '1gpu' (each rank alone), 'ulysses' or 'ring' (both ranks)."""
        import liteattn

        gpus = 1 if mode == "1gpu" else self.world
        model = build_model(self.config, self.device, self.dtype)
        heads = self.config["num_attention_heads"]
        if mode == "ring" and self.device.type == "cuda":
            model.set_attention_backend("_native_cudnn")  # diffusers' ring needs a backend that returns the LSE
        if mode != "1gpu":
            enable_parallelism(model, self.device, **{f"{mode}_degree": self.world})
        base = dict(gpus=gpus, parallel=mode if mode != "1gpu" else "-")
        if mode == "ring" and self.device.type == "cpu":
            self.record(**base, attention="diffusers", sparsity=0.0,
                        error="skipped: diffusers 0.42 has no CPU attention backend that returns the ring's LSE")
        else:
            self.record(**self.measure(dict(base, attention="diffusers", sparsity=0.0), self.call(model),
                                       ref_key="1gpu-diffusers", keep_as="1gpu-diffusers" if mode == "1gpu" else None))
        clock = Clock()
        handle = liteattn.enable(model, threshold=-math.inf, tile_q=self.tile, tile_k=self.tile, scheduler=clock)
        try:
            base = dict(base, criterion=handle.criterion)  # enable()'s default keep rule
            row = self.measure(dict(base, attention="liteattn", sparsity=0.0), self.call(model, clock),
                               ref_key="1gpu-diffusers")
            if "error" in row:
                self.record(**row)
                return
            row["state_bytes_per_rank"] = state_bytes(model, handle)
            self.record(**row)
            sparsity = force_lists(model, handle, mode, self.rank, self.world, heads)
            ref = "1gpu-forced" if mode in ("1gpu", "ulysses") else "1gpu-diffusers"
            row = self.measure(dict(base, attention="liteattn", sparsity=round(sparsity, 4)), self.call(model, clock),
                               ref_key=ref, keep_as="1gpu-forced" if mode == "1gpu" else None)
            row["forced"] = True
            if "error" not in row:
                row["state_bytes_per_rank"] = state_bytes(model, handle)
            self.record(**row)
        finally:
            handle.disable()
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="wan14b-720p")
    parser.add_argument("--tiny", action="store_true", help="--shape tiny --warmup 1 --iters 2 (a CPU check)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--modes", default="1gpu,ulysses,ring", help="comma-separated, in order")
    parser.add_argument("--autotune", action="store_true", help="autotune the kernel (minutes per shape)")
    parser.add_argument("--json", default=None, help="where rank 0 writes the rows (after each row)")
    parser.add_argument("--table", nargs="*", metavar="JSON", help="print the markdown table of these files, exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(args.table))
        return 0
    if args.tiny:
        args.shape, args.warmup, args.iters = "tiny", 1, 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("1gpu", "ulysses", "ring")]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from 1gpu, ulysses, ring")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device (use --device cpu for the CPU check)")
    if args.device == "cuda" and not args.autotune:
        from liteattn.backends import triton_kernel

        chosen = [c for c in triton_kernel.lite_attn_fwd.configs
                  if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == (128, 8, 3)]
        triton_kernel.lite_attn_fwd.configs = chosen or triton_kernel.lite_attn_fwd.configs
    if args.device == "cpu":
        torch.set_num_threads(1)
    rank, world, device = init_distributed(args.device)
    bench = Bench(args, rank, world, device)
    bench.log(f"{args.shape}: {bench.tokens} video tokens, {world} ranks, "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    import torch.distributed as dist

    for mode in modes:
        try:
            bench.run_mode(mode)
        except Exception as exc:  # e.g. the model does not fit: record it, go on with the next mode
            traceback.print_exc()
            bench.record(gpus=1 if mode == "1gpu" else world, parallel=mode, attention="-", sparsity=0.0,
                         error=f"{type(exc).__name__}: {exc}"[:300])
        dist.barrier()
    if rank == 0:
        print()
        print(table_of(bench.rows))
    dist.destroy_process_group()
    return 0


# -- the table ------------------------------------------------------------------------------------------------------

def table_of(rows) -> str:
    one_gpu = {(r["shape"], r["attention"], r.get("forced", False)): r for r in rows
               if r["gpus"] == 1 and "ms" in r}
    lines = ["| shape | GPUs | parallel | attention | read sparsity | ms/step | speed-up vs 1 GPU (same row) | "
             "vs 1 GPU diffusers | rel. err (vs) | skip state MB/rank |",
             "|---|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        label = f"{r['shape']} ({r['tokens']} tok, {r['layers']} blk)"
        if "error" in r:
            lines.append(f"| {label} | {r['gpus']} | {r['parallel']} | {r['attention']} | - | error | - | - | "
                         f"{r['error'][:80]} | - |")
            continue
        base = one_gpu.get((r["shape"], r["attention"], r.get("forced", False)))
        speedup = f"{base['ms'] / r['ms']:.2f}x" if base is not None else "-"
        stock = one_gpu.get((r["shape"], "diffusers", False))
        vs_stock = f"{stock['ms'] / r['ms']:.2f}x" if stock is not None else "-"
        err = f"{r['rel_err']:.1e} ({r['vs']})" if "rel_err" in r else "-"
        state = f"{r['state_bytes_per_rank'] / 2**20:.3g}" if "state_bytes_per_rank" in r else "-"
        lines.append(f"| {label} | {r['gpus']} | {r['parallel']} | {r['attention']} | {r['sparsity']:.0%} | "
                     f"{r['ms']:.1f} | {speedup} | {vs_stock} | {err} | {state} |")
    return "\n".join(lines)


def table(paths) -> str:
    rows, metas = [], []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            metas.append(f"{path}: not read ({exc})")
            continue
        rows.extend(data["rows"])
        m = data["meta"]
        metas.append(f"{m['card']} x{m['world_size']}, {m['date']}, torch {m['torch']}, triton {m.get('triton')}, "
                     f"diffusers {m.get('diffusers')}, median of {m['iters']} after {m['warmup']}, tile {m['tile']}")
    return "\n".join(sorted(set(metas))) + "\n\n" + table_of(rows)


if __name__ == "__main__":
    sys.exit(main())
