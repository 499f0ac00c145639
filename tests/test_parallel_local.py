"""liteattn under sequence parallelism (issue 10), in one process: the checks that refuse what cannot run in
parallel (families without a context-parallel plan, LTX-Video under Ulysses, diffusers outside the tested range,
context with tensor parallelism), the parallel config reaching the processors, and the pieces the distributed runs
(test_parallel_distributed.py) rest on: the K/V chunk attentions and the forward op that diffusers' ring calls."""

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed", allow_module_level=True)

import liteattn  # noqa: E402
from liteattn import LiteAttention  # noqa: E402
from liteattn.testing import StructuredSequence  # noqa: E402
from liteattn.parallel import (KVChunkAttention, _ChunkForwardOp, check_context_parallel,  # noqa: E402
                               check_diffusers_version)

from test_parallel_distributed import LAYERS, REL_TOL, THRESHOLD, TILE, rel_err, tiny_wan  # noqa: E402


# -- one process: the checks, the chunk attentions, the forward op ----------------------------------------------------

def _cp_config(**degrees):
    """A ParallelConfig as enable_parallelism gives it to processors (no process group needed to build one)."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    return ParallelConfig(context_parallel_config=ContextParallelConfig(**(degrees or dict(ulysses_degree=2))))


@pytest.mark.parametrize("name", ["hunyuan", "cogvideox"])
def test_families_without_a_cp_plan_refuse_context_parallelism_in_either_order(name):
    from test_diffusers_models import tiny_cogvideox, tiny_hunyuan

    model, _ = {"hunyuan": tiny_hunyuan, "cogvideox": tiny_cogvideox}[name]()
    expected = type(model).__name__
    # liteattn first, then enable_parallelism (which sets every processor's _parallel_config).
    handle = liteattn.enable(model)
    processor = model.get_submodule(handle.layers[0].split(".", 1)[1]).processor
    with pytest.raises(ValueError, match=f"cannot run {expected} under diffusers context parallelism.*Wan"):
        processor._parallel_config = _cp_config()
    handle.disable()
    # enable_parallelism first: enable refuses before patching anything.
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    for processor in originals.values():
        processor._parallel_config = _cp_config()
    with pytest.raises(ValueError, match=f"cannot run {expected} under diffusers context parallelism"):
        liteattn.enable(model)
    assert all(m.processor is originals[n] for n, m in model.named_modules() if hasattr(m, "set_processor"))


def test_ltx_video_runs_ring_but_refuses_ulysses(monkeypatch, caplog):
    from test_diffusers_models import tiny_ltx

    from liteattn.diffusers import processor as processor_module

    monkeypatch.setattr(processor_module, "_WARNED", set())
    model, _ = tiny_ltx()
    handle = liteattn.enable(model)
    processor = model.get_submodule(handle.layers[0].split(".", 1)[1]).processor
    with caplog.at_level("WARNING", logger="liteattn"):
        processor._parallel_config = _cp_config(ring_degree=2)  # accepted, with diffusers' padded-mask caveat
    assert "slice of the LTX text mask to every K/V chunk" in caplog.text
    for degrees in (dict(ulysses_degree=2), dict(ring_degree=2, ulysses_degree=2)):
        with pytest.raises(ValueError, match="LTXVideoTransformer3DModel under ring context parallelism, not ulysses"
                                             "_degree > 1: diffusers 0.42's LTXVideoAttnProcessor"):
            processor._parallel_config = _cp_config(**degrees)
    handle.disable()


def test_parallel_config_reaches_the_processors_and_survives_disable():
    model = tiny_wan()
    config = _cp_config()
    handle = liteattn.enable(model)  # then "enable_parallelism": it sets _parallel_config on every processor
    for layer in LAYERS:
        processor = model.get_submodule(layer).processor
        assert type(processor).__name__ == "LiteWanAttnProcessor" and processor._parallel_config is None
        processor._parallel_config = config
        assert processor.original._parallel_config is config  # what disable() puts back keeps running in parallel
    handle.disable()
    assert all(model.get_submodule(layer).processor._parallel_config is config for layer in LAYERS)
    handle = liteattn.enable(model)  # parallelism already on: the new processors take the config
    assert all(model.get_submodule(layer).processor._parallel_config is config for layer in LAYERS)
    handle.disable()


def test_diffusers_outside_the_tested_range_is_refused(monkeypatch):
    check_diffusers_version("0.42.1")
    check_diffusers_version("0.42.3.dev0")
    for version in ("0.41.0", "0.43.0", "0.43.0.dev0", "1.0.0"):
        with pytest.raises(ValueError, match=rf"needs diffusers>=0\.42,<0\.43.*found diffusers {version}"):
            check_diffusers_version(version)
    model = tiny_wan()
    for layer in LAYERS:
        model.get_submodule(layer).processor._parallel_config = _cp_config()
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.43.0")
    with pytest.raises(ValueError, match="needs diffusers>=0.42,<0.43"):
        liteattn.enable(model)


def test_context_and_tensor_parallelism_together_is_refused():
    from diffusers import TensorParallelConfig

    config = _cp_config()
    config.tensor_parallel_config = TensorParallelConfig(tp_degree=2)
    with pytest.raises(ValueError, match="not context parallelism combined with tensor parallelism"):
        check_context_parallel(config, "WanTransformer3DModel", ("ulysses", "ring"))
    check_context_parallel(None, "HunyuanVideoTransformer3DModel", ())  # no parallelism: nothing to refuse


def test_only_plain_lite_attention_runs_in_parallel():
    from liteattn.diffusers.models.wan import LiteWanAttnProcessor

    processor = LiteWanAttnProcessor(original=None)
    processor._config = _cp_config()  # as enable_parallelism leaves it (no process group needed to get this far)
    processor.attention = lambda q, k, v: q  # e.g. the handle's calibrating wrapper
    q = torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match="runs plain LiteAttention layers, not function"):
        processor.attend(q, q, q)


def test_ulysses_degree_must_divide_the_heads():
    from types import SimpleNamespace

    from liteattn.parallel import context_parallel_attention

    config = SimpleNamespace(context_parallel_config=SimpleNamespace(
        ring_degree=1, ulysses_degree=3, ulysses_anything=False, _ring_local_rank=0))
    q = torch.randn(1, 32, 4, 16)
    chunks = KVChunkAttention([LiteAttention()])
    with pytest.raises(ValueError, match="ulysses_degree=3 must divide the 4 attention heads"):
        context_parallel_attention(chunks, q, q, q, config)
    with pytest.raises(ValueError, match="1 chunk attentions for ring_degree 2"):
        config.context_parallel_config.ring_degree = 2
        context_parallel_attention(chunks, q, q, q, config)


def test_chunk_attention_ring_is_dense_attention_at_minus_inf_and_keeps_one_state_per_chunk():
    from liteattn import attention_with_lse

    q, k, v = next(iter(StructuredSequence(steps=1, batch=1, seq_q=150, heads=2, head_dim=16, seed=3)))
    bounds = [0, 48, 100, 150]  # unequal chunks, partial tiles
    keys = [k[:, a:b] for a, b in zip(bounds, bounds[1:])]
    values = [v[:, a:b] for a, b in zip(bounds, bounds[1:])]
    ring = KVChunkAttention([LiteAttention(threshold=-math.inf, tile_q=TILE, tile_k=TILE) for _ in range(3)])
    ref_out, ref_lse = attention_with_lse(q, k, v)
    for first in range(3):
        out, lse = ring.ring(q, keys, values, first_chunk=first)
        assert rel_err(out, ref_out) <= REL_TOL and torch.allclose(lse, ref_lse, atol=1e-5)
    ring.set_threshold(THRESHOLD)
    separate = [LiteAttention(threshold=THRESHOLD, tile_q=TILE, tile_k=TILE) for _ in range(3)]
    for q, k, v in StructuredSequence(steps=3, batch=1, seq_q=150, heads=2, head_dim=16, seed=4):
        keys = [k[:, a:b] for a, b in zip(bounds, bounds[1:])]
        values = [v[:, a:b] for a, b in zip(bounds, bounds[1:])]
        ring.ring(q, keys, values, first_chunk=1)
        for attention, key, value in zip(separate, keys, values):
            attention(q, key, value)
    for chunk, attention in enumerate(separate):  # a chunk's decisions are its own: equal to a lone LiteAttention
        assert torch.equal(ring[chunk].skip_state.to_dense(), attention.skip_state.to_dense())
        assert ring[chunk].skip_state.shape == (1, 2, 10, -(-(bounds[chunk + 1] - bounds[chunk]) // TILE))
    assert 0 < ring.sparsity < 1
    assert ring.skip_state_bytes == sum(a.skip_state.nbytes for a in separate)
    with pytest.raises(ValueError, match=r"chunk must be an int in \[0, 3\), got 3"):
        ring(q, k, v, 3)
    with pytest.raises(ValueError, match="ring: 3 chunks, got 2 keys"):
        ring.ring(q, keys[:2], values[:2])
    with pytest.raises(ValueError, match="at least one attention"):
        KVChunkAttention([])


def test_chunk_attentions_follow_their_leader():
    leader = LiteAttention(threshold=THRESHOLD, tile_q=TILE, tile_k=TILE)
    chunks = KVChunkAttention.around(leader, 3, own_chunk=1)
    assert chunks[1] is leader and chunks[0] is not leader and chunks[0].tile_q == TILE
    q, k, v = next(iter(StructuredSequence(steps=1, batch=1, seq_q=96, heads=2, head_dim=16, seed=5)))
    for chunk in range(3):
        chunks(q, k, v, chunk)
    assert all(not a.skip_state.untouched for a in chunks)
    leader.threshold, leader.enable_skipping = -3.0, False
    leader.reset_skip_state()  # what the handle does at a new run
    chunks.follow(leader)
    assert all(a.threshold == -3.0 and not a.enable_skipping and a.skip_state.untouched for a in chunks)
    leader.free_skip_state()
    chunks.follow(leader)
    assert all(a.skip_state is None for a in chunks)
    with pytest.raises(ValueError, match=r"own_chunk must be an int in \[0, 3\)"):
        KVChunkAttention.around(leader, 3, own_chunk=3)


def test_forward_op_knows_the_ring_chunk_and_checks_diffusers_call_order():
    calls = []

    class Recorder:
        def __init__(self, chunk):
            self.chunk = chunk

        def __call__(self, query, key, value, scale=None, return_softmax_lse=False, **kwargs):
            calls.append(self.chunk)
            out = query + self.chunk
            lse = torch.full(query.shape[:1] + query.shape[2:3] + query.shape[1:2], float(self.chunk))
            return (out, lse) if return_softmax_lse else out

    q = torch.randn(1, 5, 2, 4)  # (B, S, H, D)
    op = _ChunkForwardOp(KVChunkAttention([Recorder(c) for c in range(3)]), own_chunk=1)
    for step in range(3):  # rank 1 of a ring of 3: chunks 1, 2, 0; only step 0 saves the context
        out, lse = op(None, q, q, q, None, 0.0, False, None, False, True, _save_ctx=step == 0)
        assert lse.shape == (1, 5, 2)  # diffusers' (B, S, H)
    assert calls == [1, 2, 0]
    with pytest.raises(RuntimeError, match="out of the order"):
        op(None, q, q, q, None, 0.0, False, None, False, True, _save_ctx=False)  # a fourth chunk of three
    op = _ChunkForwardOp(KVChunkAttention([Recorder(c) for c in range(2)]), own_chunk=0)
    with pytest.raises(RuntimeError, match="out of the order"):
        op(None, q, q, q, None, 0.0, False, None, False, True, _save_ctx=False)  # step 0 must save the context
    op = _ChunkForwardOp(KVChunkAttention([Recorder(0)]), own_chunk=0)
    with pytest.raises(ValueError, match="no mask"):
        op(None, q, q, q, torch.ones(5, 5, dtype=torch.bool), 0.0, False, None, False, False)
