"""liteattn under sequence parallelism (issue 10): diffusers' context parallelism (Ulysses, ring, unified) on a tiny
Wan transformer in several processes (gloo on the CPU). The pieces it rests on, in one process:
test_parallel_local.py (which imports this file's tiny model and constants).

Distributed checks, each in freshly spawned processes that share a file store:

- **Ulysses** (2 ranks; the "max" and the "mass" rule): at threshold -inf liteattn's output equals diffusers' own context-parallel output and the
  single-process output; at a finite threshold the outputs and the per-head skip sets equal the single-process
  run's, whether ``enable_parallelism`` comes before or after ``liteattn.enable``; ``handle.disable()`` gives back
  processors that still run in parallel.
- **Ring** (2 ranks, Wan and LTX-Video): the same at -inf; at a finite threshold, outputs and per-chunk skip sets
  equal a single-process emulation of the per-chunk rule (:class:`liteattn.parallel.KVChunkAttention` per query chunk,
  merged by :func:`liteattn.merge_by_lse`); :func:`liteattn.parallel.ring_attention` (torch.distributed without
  diffusers) equals one LiteAttention per chunk called and merged by hand.
- **Unified** (ring 2 x Ulysses 2, 4 ranks): the emulation again, per head slice.

A hung collective fails the test: the process group has a timeout, and the spawned processes a deadline after which
they are killed.

Two things in diffusers 0.42.1 stand in the way of context parallelism on a CPU-only host, and are worked around
here, in the test processes only:

1. ``ModelMixin._resolve_parallel_config`` places rank r on ``rank % torch.accelerator.device_count()``, a division
   by zero without an accelerator: ``device_count`` reads 1 while ``enable_parallelism`` runs (the device it
   computes is recorded, not used by the CPU path).
2. No CPU attention backend of diffusers returns the log-sum-exp that its ring needs (``native`` refuses
   ``return_lse``; cuDNN / flash are CUDA backends). For the *reference* ring output, ``native``'s forward op is
   replaced by one that returns PyTorch's CPU flash attention's LSE; the ring itself (all-gather, LSE merge) is
   diffusers' code. liteattn's own path does not use it.
"""

import datetime
import importlib.util
import math
import os
from unittest import mock

import pytest
import torch

# Found, not imported: spawned processes import only what their scenario uses (diffusers, liteattn.diffusers: seconds).
if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed", allow_module_level=True)

import liteattn  # noqa: E402
from liteattn import LiteAttention, merge_by_lse  # noqa: E402
from liteattn.testing import StructuredSequence  # noqa: E402
from liteattn.parallel import KVChunkAttention, ring_attention  # noqa: E402

TILE = 16
HEADS = 4
FRAMES, SIDE = 3, 12  # 108 video tokens: 54 per rank of two, 27 of four; partial tiles everywhere
THRESHOLD = -1.0  # the "max" rule's; liteattn.enable's runs below name their keep rule
THRESHOLDS = {"max": THRESHOLD, "mass": -4.0}  # "mass": drop a tile under 1/16 of every row's attention
TIMESTEPS = (900, 800, 700)
REL_TOL = 1e-5  # fp32 outputs of equal computations, merged in another order
PROCESS_TIMEOUT_S = 300  # a hung collective fails the test after this (generous: CI runners can be loaded)
COLLECTIVE_TIMEOUT_S = 120  # gloo raises in a collective (or the rendezvous) that waits longer


# -- tiny model ----------------------------------------------------------------------------------------------------

def tiny_wan(seed=0):
    """A 2-layer Wan transformer with local (q = k, sharp) self-attention, so that tiles get skipped."""
    torch.manual_seed(seed)
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.to_k.weight.copy_(block.attn1.to_q.weight)
            block.attn1.to_k.bias.copy_(block.attn1.to_q.bias)
            block.attn1.norm_q.weight.fill_(3.0)
            block.attn1.norm_k.weight.fill_(3.0)
    return model


def wan_inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, FRAMES, SIDE, SIDE, generator=gen),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=gen))


@torch.no_grad()
def forward(model, kwargs, t):
    out = model(timestep=torch.tensor([float(t)]), return_dict=False, **kwargs)[0]
    return out.wait() if hasattr(out, "wait") else out  # diffusers' gathered output may be an AsyncCollectiveTensor


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


LAYERS = ("blocks.0.attn1", "blocks.1.attn1")


def video_len():
    return FRAMES * (SIDE // 2) ** 2


# -- in the spawned processes --------------------------------------------------------------------------------------

def _enable_parallelism(model, **degrees):
    from diffusers import ContextParallelConfig

    # Workaround 1 (module docstring): diffusers divides the rank by the accelerator count.
    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        model.enable_parallelism(config=ContextParallelConfig(**degrees))
    return model


def _reference_ring_op():
    """Workaround 2 (module docstring): diffusers' native forward op, with the LSE that its ring needs."""
    from diffusers.models import attention_dispatch

    native = attention_dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                          _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x.transpose(1, 2) for x in (query, key, value)), scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2)

    return mock.patch.object(attention_dispatch, "_native_attention_forward_op", forward_op)


def _enable(model, criterion, threshold=-math.inf):
    return liteattn.enable(model, threshold=threshold, tile_q=TILE, tile_k=TILE, criterion=criterion)


def _run_lite(model, handle, kwargs, layers=LAYERS):
    """The finite-threshold run: outputs per timestep, and every K/V chunk's skip set per layer afterwards."""
    handle.set_threshold(THRESHOLDS[handle.criterion])
    handle.reset()
    outs = [forward(model, kwargs, t) for t in TIMESTEPS]
    states = {}
    for layer in layers:
        processor = model.get_submodule(layer).processor
        chunks = processor.chunk_attentions(handle.attention(f"transformer.{layer}"))
        states[layer] = [a.skip_state.to_dense().clone() for a in chunks]
    return outs, states, handle.skip_state_bytes()


class _Emulation:
    """Ring parallelism in one process: per layer, one KVChunkAttention per query chunk, chunks visited from the
    query chunk's own on, merged by merge_by_lse (what each rank of a ring does)."""

    def __init__(self, ring, criterion, layers=LAYERS):
        self.ring, self.layers = ring, layers
        make = lambda: LiteAttention(threshold=THRESHOLDS[criterion], tile_q=TILE, tile_k=TILE, criterion=criterion)
        self.chunks = {layer: [KVChunkAttention([make() for _ in range(ring)]) for _ in range(ring)]
                       for layer in layers}

    def install(self, model, handle):
        for layer in self.layers:
            processor = model.get_submodule(layer).processor
            processor.attend = lambda q, k, v, layer=layer: self.attend(layer, q, k, v)

    def attend(self, layer, query, key, value):
        n = query.shape[1] // self.ring
        split = lambda x: [x[:, c * n:(c + 1) * n] for c in range(self.ring)]
        keys, values = split(key), split(value)
        outs = [self.chunks[layer][r].ring(q, keys, values, first_chunk=r)[0] for r, q in enumerate(split(query))]
        return torch.cat(outs, dim=1)


def _scenario_ulysses(rank, world):
    kwargs = wan_inputs()
    single = tiny_wan()
    result = dict(stock=forward(single, kwargs, TIMESTEPS[0]))
    for criterion in ("max", "mass"):
        single = tiny_wan()
        result[f"single_{criterion}"] = _run_lite(single, _enable(single, criterion), kwargs)

    stock_cp = _enable_parallelism(tiny_wan(), ulysses_degree=world)
    result["diffusers_cp"] = forward(stock_cp, kwargs, TIMESTEPS[0])

    before = _enable_parallelism(tiny_wan(), ulysses_degree=world)  # parallelism, then liteattn ("mass" rule)
    handle = _enable(before, "mass")
    result["dense"] = forward(before, kwargs, TIMESTEPS[0])
    result["before"] = _run_lite(before, handle, kwargs)
    handle.disable()
    result["before_disabled"] = forward(before, kwargs, TIMESTEPS[0])

    after = tiny_wan()  # liteattn ("max" rule), then parallelism
    handle = _enable(after, "max")
    _enable_parallelism(after, ulysses_degree=world)
    result["after"] = _run_lite(after, handle, kwargs)
    handle.disable()
    result["after_disabled"] = forward(after, kwargs, TIMESTEPS[0])
    return result


def _scenario_ring(rank, world):
    kwargs = wan_inputs()
    single = tiny_wan()
    result = dict(stock=forward(single, kwargs, TIMESTEPS[0]))
    emulation = _Emulation(world, "mass")
    emulation.install(single, _enable(single, "mass"))
    result["emulated"] = ([forward(single, kwargs, t) for t in TIMESTEPS],
                          {layer: [a.skip_state.to_dense() for a in emulation.chunks[layer][rank]]
                           for layer in LAYERS})

    with _reference_ring_op():
        result["diffusers_cp"] = forward(_enable_parallelism(tiny_wan(), ring_degree=world), kwargs, TIMESTEPS[0])

    model = _enable_parallelism(tiny_wan(), ring_degree=world)
    handle = _enable(model, "mass")
    result["dense"] = forward(model, kwargs, TIMESTEPS[0])
    result["ring"] = _run_lite(model, handle, kwargs)
    # The handle counts every K/V chunk's state and computed tiles, not only the rank's own chunk's.
    chunks = [a for layer in LAYERS for a in model.get_submodule(layer).processor.chunk_attentions(
        handle.attention(f"transformer.{layer}")).attns]
    computed = sum(int(a.computed_tiles.sum()) for a in chunks)
    result["ring_accounting"] = dict(
        handle_bytes=handle.skip_state_bytes(), chunk_bytes=sum(a.skip_state.nbytes for a in chunks),
        own_bytes=sum(handle.attention(f"transformer.{layer}").skip_state.nbytes for layer in LAYERS),
        handle_last_step=handle.stats()["sparsity"][-1],
        chunks_last_step=1 - computed / sum(a.num_tile_pairs for a in chunks))

    # torch.distributed without diffusers: the reference API's class on one rank's chunk of raw tensors, against
    # one LiteAttention per K/V chunk called in the ring's order and merged by merge_by_lse.
    n = 54
    mine = slice(rank * n, (rank + 1) * n)
    distributed = liteattn.SeqParallelLiteAttention(world, threshold=THRESHOLD, tile_q=TILE, tile_k=TILE)
    by_hand = [LiteAttention(threshold=THRESHOLD, tile_q=TILE, tile_k=TILE) for _ in range(world)]
    pairs = []
    for q, k, v in StructuredSequence(steps=3, batch=1, seq_q=world * n, heads=HEADS, head_dim=16, seed=7):
        out = lse = None
        for step in range(world):
            chunk = (rank + step) % world
            part = by_hand[chunk](q[:, mine], k[:, chunk * n:(chunk + 1) * n], v[:, chunk * n:(chunk + 1) * n],
                                  return_softmax_lse=True)
            out, lse = part if out is None else merge_by_lse(out, lse, *part)
        pairs.append((ring_attention(distributed, q[:, mine], k[:, mine], v[:, mine]), (out, lse)))
    result["ring_attention"] = (pairs, [a.skip_state.to_dense() for a in distributed.attns],
                                [a.skip_state.to_dense() for a in by_hand])
    return result


LTX_LAYERS = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")


def _scenario_ltx_ring(rank, world):
    """LTX-Video splits its text too (cross-attention, diffusers' processors): ring only (Ulysses: see ltx_video.py)."""
    from test_diffusers_models import make_local, tiny_ltx

    def build():
        model, inputs = tiny_ltx()
        make_local(model)
        return model, inputs

    single, inputs = build()
    kwargs = inputs()
    # A prompt without padding: diffusers' ring hands each rank's slice of the text mask to every K/V chunk of its
    # cross-attention (LTXVideoAttnProcessor, not liteattn's), so a padded mask makes diffusers' own ring output
    # differ from one process (by 9% here), with or without liteattn.
    kwargs["encoder_attention_mask"] = torch.ones_like(kwargs["encoder_attention_mask"])
    result = dict(stock=forward(single, kwargs, TIMESTEPS[0]))
    emulation = _Emulation(world, "max", LTX_LAYERS)
    emulation.install(single, _enable(single, "max"))
    result["emulated"] = ([forward(single, kwargs, t) for t in TIMESTEPS],
                          {layer: [a.skip_state.to_dense() for a in emulation.chunks[layer][rank]]
                           for layer in LTX_LAYERS})
    # The cross-attention keeps diffusers' processor, and runs diffusers' ring: it needs the reference op throughout.
    with _reference_ring_op():
        result["diffusers_cp"] = forward(_enable_parallelism(build()[0], ring_degree=world), kwargs, TIMESTEPS[0])
        model = _enable_parallelism(build()[0], ring_degree=world)
        handle = _enable(model, "max")
        result["dense"] = forward(model, kwargs, TIMESTEPS[0])
        result["ring"] = _run_lite(model, handle, kwargs, LTX_LAYERS)
    return result


def _scenario_unified(rank, world):
    kwargs = wan_inputs()
    single = tiny_wan()
    emulation = _Emulation(2, "mass")
    emulation.install(single, _enable(single, "mass"))
    emulated = [forward(single, kwargs, t) for t in TIMESTEPS]
    model = _enable_parallelism(tiny_wan(), ring_degree=2, ulysses_degree=world // 2)
    cp = model._parallel_config.context_parallel_config
    ring_rank, ulysses_rank = cp._ring_local_rank, cp._ulysses_local_rank
    heads = slice(ulysses_rank * HEADS // cp.ulysses_degree, (ulysses_rank + 1) * HEADS // cp.ulysses_degree)
    handle = _enable(model, "mass")
    outs, states, _ = _run_lite(model, handle, kwargs)
    expected = {layer: [a.skip_state.to_dense()[:, heads] for a in emulation.chunks[layer][ring_rank]]
                for layer in LAYERS}
    return dict(emulated=(emulated, expected), unified=(outs, states))


def _scenario_hang(rank, world):
    """Rank 0 waits in a collective that rank 1 never joins."""
    import time

    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(1))
    else:
        time.sleep(PROCESS_TIMEOUT_S)
    return {}


SCENARIOS = {"ulysses": _scenario_ulysses, "ring": _scenario_ring, "ltx_ring": _scenario_ltx_ring,
             "unified": _scenario_unified, "hang": _scenario_hang}


def _worker(rank, world, scenarios, directory, collective_timeout_s=COLLECTIVE_TIMEOUT_S):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        results = {name: SCENARIOS[name](rank, world) for name in scenarios}
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(scenarios, world, tmp_path, collective_timeout_s=COLLECTIVE_TIMEOUT_S):
    """Run scenarios in ``world`` spawned processes (one spawn: importing diffusers takes seconds); each rank's
    results. A rank that raises (a collective past its timeout included) ends them all with
    ``ProcessRaisedException``; past the deadline they are killed and the test fails. Never hangs."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(world, tuple(scenarios), str(tmp_path), collective_timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{scenarios}: the {world} processes did not finish within {PROCESS_TIMEOUT_S} s "
                        f"(a hung collective?)")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def test_a_hung_collective_fails_instead_of_hanging(tmp_path):
    import time

    from torch.multiprocessing import ProcessRaisedException

    begin = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="(?i)timed out|timeout"):
        run_distributed(("hang",), 2, tmp_path, collective_timeout_s=3)
    assert time.monotonic() - begin < PROCESS_TIMEOUT_S  # rank 1, asleep, was terminated with it


# -- distributed tests ---------------------------------------------------------------------------------------------

def _assert_close_outputs(outs, refs, what):
    for t, out, ref in zip(TIMESTEPS, outs, refs):
        assert rel_err(out, ref) <= REL_TOL, f"{what}: output at t={t} differs: rel err {rel_err(out, ref):.2e}"


def _check_ulysses(rank, result):
    stock = result["stock"]
    assert rel_err(result["diffusers_cp"], stock) <= REL_TOL  # diffusers' own Ulysses, stock processors
    assert rel_err(result["dense"], result["diffusers_cp"]) <= REL_TOL  # liteattn at -inf
    heads = slice(rank * HEADS // 2, (rank + 1) * HEADS // 2)
    for order, criterion in (("before", "mass"), ("after", "max")):
        single_outs, single_states, single_bytes = result[f"single_{criterion}"]
        assert any(s.float().mean() < 0.9 for states in single_states.values() for s in states)  # tiles skipped
        outs, states, state_bytes = result[order]
        _assert_close_outputs(outs, single_outs, f"rank {rank}, enable {order} parallelism ({criterion})")
        for layer in LAYERS:
            (mine,), (whole,) = states[layer], single_states[layer]  # one K/V chunk under Ulysses
            assert torch.equal(mine, whole[:, heads]), f"rank {rank} {order}: {layer} skip sets differ"
        assert state_bytes * 2 == single_bytes  # each rank keeps its half of the heads' state
        assert rel_err(result[f"{order}_disabled"], stock) <= REL_TOL  # disable(): still parallel, exact


def _check_ring(rank, result):
    stock = result["stock"]
    assert rel_err(result["diffusers_cp"], stock) <= REL_TOL  # diffusers' own ring (reference op)
    assert rel_err(result["dense"], result["diffusers_cp"]) <= REL_TOL  # liteattn at -inf
    assert rel_err(result["dense"], stock) <= REL_TOL
    emulated_outs, emulated_states = result["emulated"]
    outs, states, _ = result["ring"]
    _assert_close_outputs(outs, emulated_outs, f"rank {rank}, ring")
    accounting = result["ring_accounting"]
    assert accounting["handle_bytes"] == accounting["chunk_bytes"] > accounting["own_bytes"]
    assert accounting["handle_last_step"] == pytest.approx(accounting["chunks_last_step"], abs=1e-9)
    for layer in LAYERS:
        assert len(states[layer]) == 2  # one state per K/V chunk
        for chunk, (mine, expected) in enumerate(zip(states[layer], emulated_states[layer])):
            assert mine.shape == (1, HEADS, 4, 4)  # 54 queries x 54 keys in 16-token tiles
            assert torch.equal(mine, expected), f"rank {rank}: {layer} chunk {chunk} skip sets differ"
    assert any(s.float().mean() < 0.9 for chunks in states.values() for s in chunks)  # tiles skipped
    pairs, distributed_states, local_states = result["ring_attention"]
    for (out, lse), (ref_out, ref_lse) in pairs:
        assert rel_err(out, ref_out) <= REL_TOL and torch.allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(distributed_states, local_states))
    assert any(s.float().mean() < 0.9 for s in distributed_states)


def _check_ltx_ring(rank, result):
    assert rel_err(result["diffusers_cp"], result["stock"]) <= REL_TOL
    assert rel_err(result["dense"], result["diffusers_cp"]) <= REL_TOL
    emulated_outs, emulated_states = result["emulated"]
    outs, states, _ = result["ring"]
    _assert_close_outputs(outs, emulated_outs, f"rank {rank}, LTX-Video ring")
    for layer in LTX_LAYERS:
        for chunk, (mine, expected) in enumerate(zip(states[layer], emulated_states[layer])):
            assert torch.equal(mine, expected), f"rank {rank}: LTX {layer} chunk {chunk} skip sets differ"
    assert any(s.float().mean() < 0.9 for chunks in states.values() for s in chunks)


def test_wan_ulysses_and_ring_and_ltx_ring_on_two_ranks(tmp_path):
    ranks = run_distributed(("ulysses", "ring", "ltx_ring"), 2, tmp_path)
    for rank, result in enumerate(ranks):
        _check_ulysses(rank, result["ulysses"])
        _check_ring(rank, result["ring"])
        _check_ltx_ring(rank, result["ltx_ring"])


def test_unified_on_four_ranks_matches_its_one_process_emulation(tmp_path):
    ranks = run_distributed(("unified",), 4, tmp_path)
    for rank, result in enumerate(ranks):
        (emulated_outs, expected), (outs, states) = result["unified"]["emulated"], result["unified"]["unified"]
        _assert_close_outputs(outs, emulated_outs, f"rank {rank}, unified")
        for layer in LAYERS:
            assert len(states[layer]) == 2
            for chunk, (mine, ref) in enumerate(zip(states[layer], expected[layer])):
                assert mine.shape == (1, HEADS // 2, 4, 4)
                assert torch.equal(mine, ref), f"rank {rank}: {layer} chunk {chunk} skip sets differ"
