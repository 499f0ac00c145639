"""Kernel v2 in Gluon (issue 12, liteattn/backends/gluon_hopper.py), on the CPU: it is compiled for sm_90 here
(Triton's ptxas, no GPU needed) and its structure is checked in the PTX. Its numbers are checked on the GPU by
bench/gluon_check.py."""

import re

import pytest
import torch

triton = pytest.importorskip("triton")
gluon_hopper = pytest.importorskip("liteattn.backends.gluon_hopper")


def _compile(head_dim: int, lists: bool):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    x = torch.zeros(1, 256, 2, head_dim, dtype=torch.bfloat16)
    q_desc, k_desc, v_desc = gluon_hopper.descriptors(x, x, x, 128)
    signature = {"q_desc": mangle_type(q_desc), "k_desc": mangle_type(k_desc), "v_desc": mangle_type(v_desc),
                 "o_ptr": "*bf16", "stride_os": "i32", "stride_oh": "i32", "stride_ob": "i32", "seq_q": "i32",
                 "seq_k": "i32", "num_heads": "i32", "num_q_tiles": "i32", "num_k_tiles": "i32", "qk_scale": "fp32",
                 "read_idx_ptr": "*i32" if lists else "constexpr", "read_cnt_ptr": "*i32" if lists else "constexpr",
                 "STAGES": "constexpr"}
    constants = {"STAGES": 2} if lists else {"STAGES": 2, "read_idx_ptr": None, "read_cnt_ptr": None}
    source = GluonASTSource(gluon_hopper._attn_fwd_ws, signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 168})


@pytest.mark.parametrize("head_dim, lists", [(128, False), (64, False), (128, True)])
def test_compiles_for_hopper_with_a_producer_and_two_independent_consumers(head_dim, lists):
    kernel = _compile(head_dim, lists)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx  # async tensor-core MMAs, TMA loads
    # Registers move from the producer warp to the consumers (FA3's split): some warps give, some take.
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+2\d\d;", ptx)
    # The point of the design: no barrier spans the CTA. Every bar.sync is one warpgroup's (128 threads); the
    # partitions meet only at mbarriers.
    barriers = re.findall(r"bar\.sync\s+([^;]*);", ptx)
    assert barriers and all(b.replace(" ", "").endswith(",128") for b in barriers), barriers
    assert "mbarrier.try_wait" in ptx
    # Shared memory: Q (2 x 64 rows) and two K/V stages of 128 rows.
    assert kernel.metadata.shared >= 2 * 64 * head_dim * 2 + 2 * 2 * 128 * head_dim * 2


def test_launcher_refuses_what_it_cannot_run():
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Hopper"):
        gluon_hopper.attention(q, q, q)
