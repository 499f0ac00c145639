"""Kernel v2 (Gluon, issue 12; backends/gluon_hopper.py, gluon_launch.py) on the GPU: correctness, then speed.

    timeout 240 python bench/gluon_check.py [--quick]        # CUDA sm_90; run under a timeout (a wrong mbarrier
                                                              # phase hangs the kernel instead of failing)

1. Correctness on fresh inputs with local structure (``liteattn.testing.structured_qkv``, sharp and broad heads):
   dense against float64 SDPA, ragged lengths (Sq, Sk not multiples of 128, Sq != Sk), D=64 and 128, fp16 and
   bf16; over random read lists against the production Triton kernel on the same lists. Output buffers are filled
   with NaN before each call, so an element the kernel never writes fails the check.
2. Speed (CUDA-event medians, ``liteattn.bench._time``), each backend in the same run: cuDNN SDPA, the production
   Triton kernel and the Gluon kernel, dense and at 50 % / 90 % random read lists, at Wan 1.3B 480p, CogVideoX
   (and Wan 14B 720p unless --quick). Prints each table row as soon as it is measured.
"""

from __future__ import annotations

import argparse
import sys

import torch


def check_correctness(log=print) -> bool:
    from liteattn import lite_attention
    from liteattn.backends import gluon_launch as gh
    from liteattn.bench import random_lists
    from liteattn.testing import structured_qkv

    ok = True  # "differ <= 2" below: a tile at the threshold's edge may fall either way in bf16
    cases = [(1, 2, 1000, 1000, 64, torch.bfloat16), (2, 3, 640, 640, 128, torch.float16),
             (1, 2, 1000, 777, 128, torch.bfloat16), (1, 1, 4096, 4096, 128, torch.bfloat16)]
    for B, H, Sq, Sk, D, dtype in cases:
        q, k, v = (x.to("cuda", dtype) for x in structured_qkv(B, Sq, H, D, seq_k=Sk, seed=B * 1000 + Sq + D))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double()).transpose(1, 2)
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        for variant, kw in (("step 1", {}), ("ping-pong", dict(pingpong=True, stages=3))):
            out = gh.attention(q, k, v, out=torch.full_like(q, float("nan")), **kw)
            torch.cuda.synchronize()
            err = (out.double() - ref).abs().max().item()
            good = bool(torch.isfinite(out).all()) and err < tol
            ok &= good
            log(f"  {variant} dense B={B} H={H} Sq={Sq} Sk={Sk} D={D} {dtype}: max abs err vs float64 {err:.2e} "
                f"(< {tol}) {'ok' if good else 'FAIL'}")
        if Sq == Sk:
            for s in (0.5, 0.9):
                read = random_lists(B, H, Sq, 128, s, 0, "cuda")
                want = lite_attention(q, k, v, read=read, backend="triton")
                for variant, kw in (("step 1", {}), ("ping-pong", dict(pingpong=True, stages=3))):
                    got = gh.attention(q, k, v, read=read, out=torch.full_like(q, float("nan")), **kw)
                    torch.cuda.synchronize()
                    err = (got.float() - want.float()).abs().max().item()
                    good = bool(torch.isfinite(got).all()) and err < tol
                    ok &= good
                    log(f"  {variant} lists s={s} B={B} H={H} S={Sq} D={D}: max abs diff vs the Triton kernel "
                        f"{err:.2e} {'ok' if good else 'FAIL'}")
    # Write lists and LSEs (ping-pong consumers): against the Triton kernel on the same inputs, lists and threshold.
    from liteattn.skip import SkipList

    for criterion in ("max", "mass"):
        B, H, S, D = 1, 4, 2000, 128
        q, k, v = (x.to("cuda", torch.bfloat16) for x in structured_qkv(B, S, H, D, seed=7))
        read = random_lists(B, H, S, 128, 0.3, 1, "cuda")
        lists = [SkipList(torch.empty_like(read.kv_indices), torch.empty_like(read.kv_counts), 128, 128, S, S)
                 for _ in range(2)]
        lse_prev = None
        if criterion == "mass":  # a previous call's LSE, as a skip state would hold it
            lse_prev = lite_attention(q, k, v, read=read, backend="triton", return_lse=True)[1].contiguous()
        states = [None if lse_prev is None else lse_prev.clone() for _ in range(2)]
        # The max rule's call also keeps must-do tiles: keys 0-127 (k-tile 0) and queries 256-383 (q-tile 2).
        must = dict(must_do=[(0, 128)], must_do_q=[(256, 384)]) if criterion == "max" else {}
        nt = -(-S // 128)
        tiles = dict(must_do_k=torch.arange(nt, device="cuda") == 0, must_do_q=torch.arange(nt, device="cuda") == 2
                     ) if must else {}
        want_out, want_lse = lite_attention(q, k, v, read=read, write=lists[0], threshold=-8.0, criterion=criterion,
                                            lse_state=states[0], return_lse=True, backend="triton", **must)
        got_out, got_lse = gh.attention(q, k, v, read=read, write=lists[1], threshold=-8.0, criterion=criterion,
                                        lse_state=states[1], return_lse=True, pingpong=True, stages=3,
                                        out=torch.full_like(q, float("nan")), **tiles)
        torch.cuda.synchronize()
        same_lists = torch.equal(lists[0].to_dense(), lists[1].to_dense())
        differ = (lists[0].to_dense() != lists[1].to_dense()).sum().item()
        lse_err = (got_lse - want_lse).abs().max().item()
        out_err = (got_out.float() - want_out.float()).abs().max().item()
        state_err = 0.0 if lse_prev is None else (states[1] - states[0]).abs().max().item()
        good = differ <= 2 and lse_err < 1e-3 and out_err < 2e-2 and state_err < 1e-3
        ok &= good
        log(f"  ping-pong write list ({criterion}{', must-do tiles' if must else ''}, threshold -8, read 70 %): kept {lists[1].to_dense().float().mean():.1%}"
            f" of tiles, {'identical to' if same_lists else f'{differ} tiles differ from'} the Triton kernel's; "
            f"lse max diff {lse_err:.1e}, out {out_err:.1e}, lse_state {state_err:.1e} {'ok' if good else 'FAIL'}")
    return ok


def bench(shapes, log=print):
    """Time each backend; every row is printed (as a table row) as soon as it is measured, so that a timeout keeps
    what was done."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from liteattn import lite_attention
    from liteattn.backends import gluon_launch as gh
    from liteattn.bench import SHAPES, _time, random_lists

    rows = []

    def add(name, kernel, sparsity, ms, cudnn):
        rows.append((name, kernel, sparsity, ms, cudnn))
        log(f"| {name} | {kernel} | {sparsity} | {ms:.3f} | {cudnn / ms:.3f}x |", flush=True)

    log("| shape | kernel | read sparsity | median ms | time vs cuDNN's (cuDNN ms / this) |\n|---|---|---:|---:|---:|",
        flush=True)
    for name in shapes:
        B, H, S, D = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        add(name, "cuDNN SDPA", "-", cudnn, cudnn)
        add(name, "triton (production)", "0 %", _time(lambda: lite_attention(q, k, v, backend="triton")), cudnn)
        add(name, "gluon v2 step 1 (2 stages)", "0 %", _time(lambda: gh.attention(q, k, v)), cudnn)
        add(name, "gluon v2 ping-pong (3 stages)", "0 %",
            _time(lambda: gh.attention(q, k, v, pingpong=True, stages=3)), cudnn)
        for s in (0.5, 0.9):
            read = random_lists(B, H, S, 128, s, 0, "cuda")
            add(name, "gluon v2 step 1", f"{s:.0%}", _time(lambda: gh.attention(q, k, v, read=read)), cudnn)
            add(name, "gluon v2 ping-pong", f"{s:.0%}",
                _time(lambda: gh.attention(q, k, v, read=read, pingpong=True, stages=3)), cudnn)
            add(name, "triton (production)", f"{s:.0%}",
                _time(lambda: lite_attention(q, k, v, read=read, backend="triton")), cudnn)
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("bench/gluon_check.py needs a Hopper (sm_90) GPU")
    print(f"gluon_check on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok = check_correctness(lambda *a, **k: print(*a, flush=True))
    if not ok:
        print("correctness FAILED: no timings")
        return 1
    shapes = ["wan2.1-1.3b-480p", "cogvideox-5b"] + ([] if args.quick else ["wan2.1-14b-720p"])
    bench(shapes, lambda *a, **k: print(*a, **k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
