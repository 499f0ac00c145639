"""``liteattn.enable`` on a CUDA GPU (skipped without one): the Triton kernel in bf16 on the tiny models of
test_diffusers_models.py, inductor from the first call, a pipeline step without a host sync, tiles the kernel cannot
run, and the masked text path against float64."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import liteattn  # noqa: E402

from test_diffusers_models import MODELS, branch_inputs, cfg_loop, forward, make_local, rel_err, tiny_wan  # noqa: E402
from test_diffusers_models import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread here too)


# -- GPU (skipped without CUDA) --------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox", "cogvideox-split"])
def test_gpu_bf16(name):
    """The GPU path (Triton kernel, bf16, tiles of 64): as accurate as the original bf16 processors against an
    fp32 reference, sparsity under a forced threshold, and torch.compile (inductor)."""
    joint_text = "split" if name.endswith("split") else None
    model, inputs = MODELS[name.split("-")[0]](head_dim=64, frames=4, side=32)  # 1024 video tokens, 16 tiles a side
    make_local(model, sharpness=2.0)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs().items()}
    if "image_rotary_emb" in kwargs:
        kwargs["image_rotary_emb"] = tuple(x.cuda() for x in kwargs["image_rotary_emb"])
    reference = forward(model.cuda(), kwargs, 700)  # fp32, original processors
    model = model.to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    original = forward(model, kwargs, 700).float()
    handle = liteattn.enable(model, threshold=-math.inf, tile_q=64, tile_k=64, joint_text=joint_text)
    lite = forward(model, kwargs, 700).float()
    assert rel_err(lite, reference) <= 2 * rel_err(original, reference) + 1e-3
    handle.set_threshold(-2.0)
    cfg_loop(model, kwargs, timesteps=(900, 800, 700))
    assert handle.stats()["sparsity"][-1] > 0.05
    eager = cfg_loop(model, kwargs, timesteps=(900, 800, 700))
    compiled = torch.compile(model)
    out = cfg_loop(compiled, kwargs, timesteps=(900, 800, 700))
    assert handle.stats()["sparsity"][-1] > 0.05
    for a, b in zip(out, eager):
        for x, y in zip(a, b):
            assert rel_err(x.float(), y.float()) <= 2e-2
    handle.disable()
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_inductor_from_the_first_call_and_a_handful_of_graphs():
    """Risk (c): the first skipping call builds the skip state inside the compiled graph (a graph break there would
    sit in the model's loop over blocks, where dynamo gives up on the whole frame); under inductor on CUDA the
    compiled run must equal the eager one. A 16-step scheduled run with warm-up and 2 branches compiles a handful
    of graphs, as with the eager backend."""
    from torch._dynamo.utils import counters

    def run(model):
        model, inputs = tiny_wan(head_dim=64, frames=4, side=32)
        make_local(model, sharpness=2.0)
        model = model.cuda().to(torch.bfloat16)
        kwargs = {k: v.cuda().to(torch.bfloat16) for k, v in inputs().items()}
        return model, kwargs

    results = []
    for compile_it in (False, True):
        model, kwargs = run(None)
        handle = liteattn.enable(model, threshold=[-1.0 - 0.25 * s for s in range(16)], warmup_steps=2,
                                 tile_q=64, tile_k=64)
        torch._dynamo.reset()
        counters.clear()
        target = torch.compile(model) if compile_it else model
        outs = cfg_loop(target, kwargs, timesteps=range(1000, 200, -50))
        results.append((outs, handle.stats()["sparsity"], counters["stats"]["unique_graphs"]))
        handle.disable()
    (eager, eager_sparsity, _), (compiled, compiled_sparsity, graphs) = results
    assert 1 <= graphs <= 3, graphs
    assert eager_sparsity[-1] > 0.05
    assert max(abs(a - b) for a, b in zip(eager_sparsity, compiled_sparsity)) <= 0.02
    for a, b in zip(compiled, eager):
        for x, y in zip(a, b):
            assert rel_err(x.float(), y.float()) <= 3e-2
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_step_does_not_sync():
    """Risk (a): one whole denoising step of an enabled pipeline loop (two guidance branches through the patched
    transformer, then the scheduler step) under ``torch.cuda.set_sync_debug_mode("error")``."""
    model, inputs = tiny_wan(head_dim=64, frames=4, side=32)
    make_local(model, sharpness=2.0)
    model = model.cuda().to(torch.bfloat16)
    kwargs = {k: v.cuda().to(torch.bfloat16) for k, v in inputs().items()}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4, device="cuda")
    handle = liteattn.enable(model, threshold=-2.0, tile_q=64, tile_k=64, scheduler=scheduler)
    latents = kwargs.pop("hidden_states")
    uncond = branch_inputs(kwargs, 1)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(latents.shape[0])
            if i == 2:  # after the first step (the scheduler itself syncs once to find its index) and autotuning
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                cond = model(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]
                free = model(hidden_states=latents, timestep=timestep, return_dict=False, **uncond)[0]
                latents = scheduler.step(free + 5.0 * (cond - free), t, latents, return_dict=False)[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
    stats = handle.stats()
    assert stats["num_steps"] == 4 and stats["num_branches"] == 2 and stats["sparsity"][-1] > 0.05
    handle.disable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_enable_refuses_tiles_the_kernel_cannot_run():
    model, _ = tiny_wan(head_dim=64)
    model = model.cuda()
    with pytest.raises(ValueError, match=r"tiles of \(64, 128\).*tile_q=32"):
        liteattn.enable(model, tile_q=32, tile_k=32)
    liteattn.enable(model, tile_q=32, tile_k=32, backend="torch").disable()  # the reference, asked for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_masked_text_attention_matches_float64():
    """The masked path on CUDA (bf16 products with float32 results) against float64."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 64, generator=gen).cuda().to(torch.bfloat16) for n in (300, 37, 37))
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool, device="cuda")
    mask[0, ..., 20:] = False
    mask[1] = False  # every key masked: output 0, lse -inf
    out, lse = liteattn.attention_with_lse(q, k, v, mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 8.0
    scores = scores.masked_fill(~mask, -math.inf)
    ref_out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores[:1], dim=-1), v[:1].double())
    assert rel_err(out[0].double(), ref_out[0]) <= 1e-2
    assert (lse[0].double() - torch.logsumexp(scores[0], dim=-1)).abs().max() <= 1e-2
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
