"""``liteattn.enable``'s entry and handle on diffusers (tiny random models from test_diffusers_models.py).

Import behaviour, unsupported models and bad arguments, threshold schedules and warmup, layer selection, statistics
and plot, ``disable()`` freeing every skip state, and the real WanPipeline loop (Wan 2.1 and 2.2's two experts; steps
read from the scheduler, not from the timestep).
"""

import json
import math
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import liteattn  # noqa: E402
from liteattn.diffusers import supported_transformers  # noqa: E402
from liteattn.diffusers.processor import LiteProcessor  # noqa: E402

from test_diffusers_models import REL_TOL, TILE, cfg_loop, make_local, rel_err, tiny_hunyuan, tiny_wan  # noqa: E402
from test_diffusers_models import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread here too)


# -- import behaviour ------------------------------------------------------------------------------------------

def test_import_liteattn_does_not_import_diffusers():
    code = "import sys, liteattn, liteattn.diffusers; assert 'diffusers' not in sys.modules; print(liteattn.enable)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_enable_without_diffusers_raises_clear_importerror(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r"pip install liteattn\[diffusers\]"):
        liteattn.enable(torch.nn.Linear(2, 2))


# -- arguments -------------------------------------------------------------------------------------------------

def test_unsupported_models_raise():
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    for obj in (flux, torch.nn.Linear(2, 2), type("Pipe", (), {"transformer": flux})(), object()):
        with pytest.raises(ValueError) as info:
            liteattn.enable(obj)
        for cls in supported_transformers():
            assert cls in str(info.value)
    model, _ = tiny_wan()
    with pytest.raises(ValueError, match="threshold"):
        liteattn.enable(model, threshold=1.0)
    with pytest.raises(ValueError, match="tile_q"):
        liteattn.enable(model, tile_q=20)
    with pytest.raises(ValueError, match="warmup_steps"):
        liteattn.enable(model, warmup_steps=-1)
    handle = liteattn.enable(model)
    with pytest.raises(ValueError, match="already enabled"):
        liteattn.enable(model)
    handle.disable()


def test_threshold_schedule_and_warmup():
    model, inputs = tiny_wan()
    make_local(model)
    kwargs = inputs()
    dense = cfg_loop(model, kwargs, timesteps=(900, 800))
    schedule = [0.0, 0.0, 0.0, -1.0, -2.0]
    handle = liteattn.enable(model, threshold=schedule, warmup_steps=2, tile_q=TILE, tile_k=TILE)
    out = cfg_loop(model, kwargs, timesteps=(900, 800, 700, 600, 500, 400))
    for step in range(2):  # warmup: dense, the skip state untouched
        for branch in range(2):
            assert rel_err(out[step][branch], dense[step][branch]) <= REL_TOL
    stats = handle.stats()
    assert [s["warmup"] for s in stats["steps"]] == [True, True, False, False, False, False]
    assert [s["threshold"] for s in stats["steps"]] == [0.0, 0.0, 0.0, -1.0, -2.0, -2.0]  # last value repeats
    assert stats["sparsity"][:3] == [0.0, 0.0, 0.0] and stats["sparsity"][3] > 0.1
    assert all(handle.attention(layer, branch).threshold == -2.0 for layer in handle.layers for branch in (0, 1))

    handle.set_threshold(lambda step: -3.0 if step % 2 else 0.0)
    cfg_loop(model, kwargs, timesteps=(900, 800, 700))
    assert [s["threshold"] for s in handle.stats()["steps"]] == [0.0, -3.0, 0.0]
    handle.set_threshold(lambda step: 5.0)
    with pytest.raises(ValueError, match="threshold"):
        cfg_loop(model, kwargs, timesteps=(900,))
    for bad in ([], [0.0, 1.0], "x"):
        with pytest.raises((ValueError, TypeError)):
            handle.set_threshold(bad)


def test_layer_selection():
    model, inputs = tiny_wan(layers=3)
    handle = liteattn.enable(model, layers=[0, -1], tile_q=TILE, tile_k=TILE)
    assert handle.layers == ["transformer.blocks.0.attn1", "transformer.blocks.2.attn1"]
    assert not isinstance(model.blocks[1].attn1.processor, LiteProcessor)
    handle.disable()
    assert liteattn.enable(model, layers=["blocks.1.attn1"]).layers == ["transformer.blocks.1.attn1"]
    for bad in ([3], ["blocks.1.attn2"], [True]):
        model, _ = tiny_wan(layers=3)
        with pytest.raises((ValueError, TypeError)):
            liteattn.enable(model, layers=bad)


def test_stats_and_plot(tmp_path):
    model, inputs = tiny_hunyuan()
    make_local(model)
    handle = liteattn.enable(model, threshold=0.0, warmup_steps=1, tile_q=TILE, tile_k=TILE)
    cfg_loop(model, inputs())
    stats = handle.stats()
    json.dumps(stats)  # plain Python data
    assert stats["num_steps"] == 4 and len(stats["steps"][2]["branches"]) == 2
    assert set(stats["layers"]) == set(handle.layers) == {"transformer.transformer_blocks.0.attn",
                                                          "transformer.single_transformer_blocks.0.attn"}
    assert all(len(v) == 4 for v in stats["layers"].values())
    assert 0.0 < stats["mean_sparsity"] < max(stats["sparsity"])  # the warmup step weighs in with 0
    assert [s["timestep"] for s in stats["steps"]] == [900.0, 800.0, 700.0, 600.0]
    pytest.importorskip("matplotlib")
    path = handle.plot(tmp_path / "sparsity.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "LiteAttentionHandle(transformer: HunyuanVideoTransformer3DModel" in repr(handle)



def test_plot_after_reset_raises_instead_of_writing_an_empty_plot(tmp_path):
    """Issue 15: `handle.plot()` after `reset()` must not silently write an empty picture."""
    pytest.importorskip("matplotlib")
    model, inputs = tiny_wan()
    handle = liteattn.enable(model, threshold=0.0, tile_q=TILE, tile_k=TILE)
    with pytest.raises(ValueError, match="nothing to plot"):
        handle.plot(tmp_path / "before.png")  # nothing has run since enable
    cfg_loop(model, inputs(), timesteps=(900, 800))
    assert handle.plot(tmp_path / "run.png")
    handle.reset()
    with pytest.raises(ValueError, match="nothing to plot.*reset"):
        handle.plot(tmp_path / "after_reset.png")
    assert not (tmp_path / "before.png").exists() and not (tmp_path / "after_reset.png").exists()
    handle.disable()


# -- disable: every skip state freed ------------------------------------------------------------------------------

def test_disable_frees_every_skip_state():
    import gc
    import weakref

    model, inputs = tiny_wan()
    make_local(model)
    handle = liteattn.enable(model, threshold=0.0, tile_q=TILE, tile_k=TILE)
    cfg_loop(model, inputs(), timesteps=(900, 800))
    lists = [handle.attention(layer, branch).skip_state for layer in handle.layers for branch in (0, 1)]
    tensors = [t for state in lists for t in (state.bits, state.counts)]
    refs = [weakref.ref(t) for t in tensors]
    assert handle.skip_state_bytes() == sum(state.nbytes for state in lists) > 0
    del lists, tensors
    handle.disable()
    gc.collect()
    assert all(r() is None for r in refs), "a skip state tensor is still referenced after disable()"
    assert handle.skip_state_bytes() == 0


# -- the real pipeline loop ------------------------------------------------------------------------------------

def tiny_wan_pipeline(two_stage=False):
    """WanPipeline from tiny components. The prompt is given as embeddings, so no tokenizer or text encoder (which
    would need a download) is involved; the denoising loop, the CFG calls and the scheduler are diffusers' own."""
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    transformer, _ = tiny_wan(seed=0)
    extra = {}
    if two_stage:  # Wan 2.2: a high-noise and a low-noise expert
        extra = dict(transformer_2=tiny_wan(seed=1)[0], boundary_ratio=0.75)
    for t in [transformer] + list(extra.values())[:1]:
        make_local(t)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                                 transformer=transformer, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, steps=4):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 8, 32, generator=gen)
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=-prompt, height=128, width=128, num_frames=9,
                num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(1)).frames


def test_wan_pipeline():
    pipe = tiny_wan_pipeline()
    ref = run_pipe(pipe)
    handle = liteattn.enable(pipe, threshold=-math.inf, tile_q=TILE, tile_k=TILE)
    assert rel_err(run_pipe(pipe), ref) <= REL_TOL
    stats = handle.stats()
    assert stats["num_steps"] == 4 and stats["num_branches"] == 2  # WanPipeline: cond, then uncond

    handle.set_threshold(0.0)
    first = run_pipe(pipe)
    stats = handle.stats()
    assert stats["sparsity"][0] == 0.0 and stats["sparsity"][-1] > 0.1
    assert torch.equal(run_pipe(pipe), first)  # the second video does not inherit the first one's lists
    one_step = run_pipe(pipe, steps=1)  # a run that does not lower the timestep: seen via scheduler.set_timesteps
    assert torch.equal(run_pipe(pipe, steps=1), one_step)
    assert handle.stats()["num_branches"] == 2

    handle.disable()
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(run_pipe(pipe), ref)


def test_wan22_pipeline_patches_both_experts():
    pipe = tiny_wan_pipeline(two_stage=True)
    handle = liteattn.enable(pipe, threshold=0.0, tile_q=TILE, tile_k=TILE)
    assert {name.split(".")[0] for name in handle.layers} == {"transformer", "transformer_2"}
    run_pipe(pipe, steps=6)
    stats = handle.stats()
    assert stats["num_steps"] == 6 and stats["num_branches"] == 2
    experts = [step["transformers"] for step in stats["steps"]]
    assert all(len(e) == 1 for e in experts) and {e[0] for e in experts} == {"transformer", "transformer_2"}
    # Each expert keeps its own lists: its first step computes everything, its later steps skip.
    for expert in ("transformer", "transformer_2"):
        sparsity = [step["sparsity"] for step in stats["steps"] if step["transformers"] == [expert]]
        assert len(sparsity) >= 2 and sparsity[0] == 0.0 and min(sparsity[1:]) > 0.05, (expert, sparsity)


def test_pipeline_steps_come_from_the_scheduler_without_reading_the_timestep(monkeypatch):
    """Risk (a) of the architecture issue: reading a CUDA timestep every call is a host sync. With a pipeline the
    tracker reads the scheduler's step index instead; the timestep is never read during the run."""
    from liteattn.diffusers import tracker

    def refuse(timestep):
        raise AssertionError("the timestep was read on the host")

    pipe = tiny_wan_pipeline()
    handle = liteattn.enable(pipe, threshold=0.0, tile_q=TILE, tile_k=TILE)
    assert handle.tracker.clock == "scheduler"
    monkeypatch.setattr(tracker, "read_timestep", refuse)
    run_pipe(pipe, steps=3)
    monkeypatch.undo()
    stats = handle.stats()
    assert stats["num_steps"] == 3 and stats["num_branches"] == 2 and stats["sparsity"][-1] > 0.1
    timesteps = [s["timestep"] for s in stats["steps"]]
    assert timesteps == sorted(timesteps, reverse=True) and timesteps[0] > 500
