"""Before/after timing of the skip state (issue 11, item 1): compact int32 lists against the bitmask state.

    python bench/state_path.py --json out.json                  # CUDA; the tree on PYTHONPATH decides the code
    bash bench/state_path.sh                                     # both trees in one device call (see there)

Before the bitmask commit (232b9d1), a layer's state was two compact ``(B, H, Mq, Nk)`` int32 lists; a call read
one and wrote the other (the kernel's flags compacted into the write list), then the two swapped. That is exactly
``lite_attention(read=R, write=W)``, which both trees still have. After it, the state is one bit per tile pair:
``lite_attention(state=S)`` expands the bits into a transient list, runs the same kernel and packs the flags
back into bits. For each shape and sparsity this script times, on the same inputs and the same random tiles:

- ``lists read``: the read-only call on compact lists (``liteattn bench``'s ``liteattn-read`` row);
- ``lists read+write``: the old state path (``liteattn-read+write``);
- ``state read+write`` (bitmask trees only): the new state path.

The writing calls use threshold -100 with the max rule (``--criterion mass``: the mass rule, with the previous LSE
as a float32 ``lse_state`` beside the lists and as the state's own compact LSE): every read tile is kept, so the written set equals the
read set and the state does not drift between timed calls (checked after timing), while the kernel still
evaluates the rule and writes every flag. Medians of CUDA-event timings (``liteattn.bench._time``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys

import torch

from liteattn import lite_attention
from liteattn.bench import SHAPES, _time, environment, random_lists
from liteattn.skip import SkipList

THRESHOLD = -100.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="wan2.1-1.3b-480p,wan2.1-14b-720p")
    p.add_argument("--sparsities", default="0,0.5,0.9")
    p.add_argument("--criterion", default="max", choices=["max", "mass"],
                   help="the keep rule of the writing calls; 'mass' also reads and writes the previous LSE (a float32 "
                        "lse_state beside the lists; the state's own compact LSE)")
    p.add_argument("--label", default="")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/state_path.py times the Triton kernel on a CUDA GPU")
    has_state = "state" in inspect.signature(lite_attention).parameters
    if has_state:
        from liteattn.state import SkipState
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the device machine
        commit = ""
    env = environment()
    label = args.label or ("bitmask" if has_state else "lists")
    print(f"state_path.py [{label}] on {env['card']}, torch {env['torch']}, triton {env['triton']}, bf16", flush=True)
    device = torch.device("cuda")
    rows = []
    for name in args.shapes.split(","):
        B, H, S, D = SHAPES[name]
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        for s in (float(x) for x in args.sparsities.split(",")):
            read = random_lists(B, H, S, 128, s, 0, device)
            write = SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), 128, 128, S, S)
            row = dict(tree=label, commit=commit, shape=name, B=B, H=H, S=S, D=D, sparsity=s, criterion=args.criterion)
            mass = args.criterion == "mass"
            lse = torch.full((B, H, S), float("nan"), device=device) if mass else None
            extra = dict(criterion="mass", lse_state=lse) if mass else {}
            row["lists_read"] = _time(lambda: lite_attention(q, k, v, read=read, backend="triton"))
            row["lists_read_write"] = _time(lambda: lite_attention(q, k, v, read=read, write=write,
                                                                   threshold=THRESHOLD, backend="triton", **extra))
            if not torch.equal(write.to_dense(), read.to_dense()):
                raise SystemExit(f"{name} s={s}: the written list differs from the read one at threshold {THRESHOLD}")
            if has_state:
                state = SkipState(B, H, S, S, 128, 128, device=device, with_lse=mass)
                state.set_read(read.to_dense())
                row["state_bytes"] = state.nbytes
                row["state_read_write"] = _time(lambda: lite_attention(q, k, v, state=state, threshold=THRESHOLD,
                                                                       backend="triton",
                                                                       **({"criterion": "mass"} if mass else {})))
                if not torch.equal(state.to_dense(), read.to_dense()):
                    raise SystemExit(f"{name} s={s}: the state drifted while timed")
                del state
            row["lists_bytes"] = 2 * (read.kv_indices.numel() + read.kv_counts.numel()) * 4 + (lse.numel() * 4 if mass
                                                                                                 else 0)
            rows.append(row)
            print(f"  {name:18s} s={s:<4} lists read {row['lists_read']:8.3f} ms, lists read+write "
                  f"{row['lists_read_write']:8.3f} ms" + (f", state read+write {row['state_read_write']:8.3f} ms"
                                                          if has_state else ""), flush=True)
            del read, write
        del q, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
