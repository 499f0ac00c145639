"""Kernel v2 in Gluon (issue 12, liteattn/backends/gluon_hopper.py, launcher gluon_launch.py). On the CPU it is
compiled for sm_90 (Triton's ptxas, no GPU needed) and its structure is checked in the PTX, and the backend
registry's choice and refusals are checked. On a Hopper GPU its numbers are checked here and in test_triton.py
(every GPU test there runs both kernels), and by bench/gluon_check.py.

The compile runs in a subprocess with Triton's interpreter off: tests/conftest.py turns it on for this process, and
Gluon cannot call interpreted functions."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
gluon_launch = pytest.importorskip("liteattn.backends.gluon_launch")

from liteattn import backends, lite_attention  # noqa: E402
from liteattn.testing import StructuredSequence  # noqa: E402

HOPPER = torch.cuda.is_available() and backends.gluon_available("cuda")

# (head_dim, read list, ping-pong, write list + keep rule: None / 0 "max" / 1 "mass" with the LSE in and out and
# must-do tiles)
VARIANTS = [(128, False, False, None), (64, False, False, None), (128, True, False, None), (128, True, True, None),
            (64, False, True, None), (128, True, True, 0), (128, True, True, 1), (64, True, True, 1)]

_SCRIPT = """
import json, sys
from liteattn.backends.gluon_launch import compile_for_sm90
out = {}
for head_dim, lists, pingpong, rule in json.loads(sys.argv[1]):
    kernel = compile_for_sm90(head_dim, lists, pingpong, write=rule is not None, criterion=rule or 0,
                              lse=rule == 1, must_do=rule == 1)
    out[f"{head_dim}-{lists}-{pingpong}-{rule}"] = dict(ptx=kernel.asm["ptx"], shared=kernel.metadata.shared)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(VARIANTS)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("head_dim, lists, pingpong, rule", VARIANTS)
def test_compiles_for_hopper_with_a_producer_and_two_independent_consumers(compiled, head_dim, lists, pingpong, rule):
    kernel = compiled[f"{head_dim}-{lists}-{pingpong}-{rule}"]
    ptx = kernel["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx  # async tensor-core MMAs, TMA loads
    # Registers move from the producer warp to the consumers (FA3's split): some warps give, some take.
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+2\d\d;", ptx)
    # The point of the design: no barrier spans the CTA. Every bar.sync is one warpgroup's (128 threads); the
    # partitions meet only at mbarriers.
    barriers = re.findall(r"bar\.sync\s+([^;]*);", ptx)
    assert barriers and all(b.replace(" ", "").endswith(",128") for b in barriers), barriers
    assert "mbarrier.try_wait" in ptx
    # Shared memory: Q (2 x 64 rows) and two (ping-pong: three) K/V stages of 128 rows, within Hopper's 227 KB.
    stages = 3 if pingpong else 2
    assert 2 * 64 * head_dim * 2 + stages * 2 * 128 * head_dim * 2 <= kernel["shared"] <= 227 * 1024
    if rule is not None:  # the flags are plain global stores of each keeping row
        assert "st.global" in ptx


def test_the_keep_rule_and_the_write_list_change_the_code(compiled):
    """The constexpr switches are live: without a write list no flag is stored, and the two rules compile apart."""
    plain, max_rule, mass_rule = (compiled[f"128-True-True-{r}"]["ptx"] for r in (None, 0, 1))
    assert len({plain, max_rule, mass_rule}) == 3
    assert plain.count("st.global") < max_rule.count("st.global")


def test_launcher_refuses_what_it_cannot_run():
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Hopper"):
        gluon_launch.attention(q, q, q)


def test_registry_refuses_gluon_where_it_cannot_run_and_never_picks_it_off_hopper():
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    assert "gluon" in backends.BACKENDS
    assert not backends.gluon_available("cpu")
    with pytest.raises(ValueError, match="Hopper"):
        lite_attention(q, q, q, backend="gluon")
    assert backends.choose(None, q, q, 128, 128) != "gluon"  # on the CPU: the reference (or Triton interpreted)
    # What it takes, named in the message.
    assert "tiles of 128" in backends.gluon_input_error(q, q, 64, 64)
    assert "float16 or bfloat16" in backends.gluon_input_error(q.float(), q.float(), 128, 128)
    assert "D = Dv" in backends.gluon_input_error(q[..., :32], q[..., :32], 128, 128)
    assert backends.gluon_input_error(q, q, 128, 128) is None


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_gpu_automatic_choice_on_hopper():
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert backends.choose(None, q, q, 128, 128) == "gluon"
    assert backends.choose(None, q, q, 64, 64) == "triton"  # 64-tiles: the portable kernel
    assert backends.choose(None, q[..., :32], q[..., :32], 128, 128) == "triton"
    assert backends.choose("triton", q, q, 128, 128) == "triton"
    with pytest.raises(ValueError, match="tiles of 128"):
        backends.choose("gluon", q, q, 64, 64)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("criterion", [0, 1])
def test_gpu_launcher_writes_every_output_element(criterion):
    """NaN-poisoned ``out`` and ``lse``, garbage in the write list: every element must be overwritten, and the
    call must equal the Triton kernel's (ragged lengths, B=2, a non-contiguous q view)."""
    from liteattn.backends.triton_launch import triton_attention
    from lists import ListPair

    q, k, v = next(iter(StructuredSequence(1, 2, 1000, 2, 128, seq_k=777, dtype=torch.bfloat16, device="cuda")))
    q = torch.cat([q, q], dim=-1)[..., :128]  # strided rows: the launcher's row view copies it
    results = []
    for launch in (gluon_launch.gluon_attention, triton_attention):
        state = ListPair(2, 2, 1000, 777, 128, 128, device="cuda", with_lse=criterion == 1)
        write = state.write
        write.kv_indices.fill_(-7)
        write.kv_counts.fill_(-7)
        out = torch.full((2, 1000, 2, 128), float("nan"), dtype=q.dtype, device="cuda")
        lse = torch.full((2, 2, 1000), float("nan"), dtype=torch.float32, device="cuda")
        threshold = torch.tensor(-4.0, device="cuda")
        launch(q, k, v, *state.read.as_tuple(), *write.as_tuple(), None, None, threshold, criterion, 128 ** -0.5,
               128, 128, True, out=out, lse=lse, lse_state=state.lse)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        write.check()
        results.append((out, lse, write.to_dense()))
    (out, lse, kept), (out_t, lse_t, kept_t) = results
    assert (out.float() - out_t.float()).abs().max() < 2e-2 and (lse - lse_t).abs().max() < 1e-3
    assert (kept != kept_t).sum() <= 2
