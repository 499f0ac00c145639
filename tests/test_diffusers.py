"""``liteattn.enable`` on diffusers video transformers and pipelines (tiny random models, built here, no download).

Every supported model (Wan 2.1/2.2, HunyuanVideo, CogVideoX, LTX-Video) is checked for: exact reproduction of the
original output at ``threshold=-inf``; sparsity that appears under a forced threshold and only grows within a run;
separate skip states per guidance branch (sequential and batched); a fresh state for a new run; ``disable()``
restoring the original processors and outputs. Plus: unsupported models, threshold schedules and warmup, layer
selection, statistics and plot, the real WanPipeline loop, and ``torch.compile``.
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

TILE = 16  # 192 video tokens -> 12 tiles per side
REL_TOL = 1e-5  # fp32, threshold=-inf vs the original processors


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads only contend (10x slower on a busy 2-core runner).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny models -----------------------------------------------------------------------------------------------
# Each builder returns (model, make_inputs(batch, seed) -> forward kwargs without `timestep`).

def tiny_wan(seed=0, layers=2, head_dim=16, frames=3, side=16):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=layers, rope_max_seq_len=32).eval()

    def inputs(batch=1, seed=1):
        gen = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=gen),
                    encoder_hidden_states=torch.randn(batch, 8, 32, generator=gen))
    return model, inputs


def tiny_hunyuan(seed=0, head_dim=16, frames=3, side=16):
    torch.manual_seed(seed)
    rope_t = head_dim // 4 if head_dim // 4 % 2 == 0 else head_dim // 4 + 1
    rope_hw = (head_dim - rope_t) // 2
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=head_dim, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(rope_t, rope_hw, rope_hw)).eval()

    def inputs(batch=1, seed=1):
        gen = torch.Generator().manual_seed(seed)
        text_mask = torch.ones(batch, 20, dtype=torch.long)
        text_mask[:, 13:] = 0  # a padded prompt: the last 7 text tokens are masked out
        return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=gen),
                    encoder_hidden_states=torch.randn(batch, 20, 16, generator=gen),
                    encoder_attention_mask=text_mask, pooled_projections=torch.randn(batch, 8, generator=gen),
                    guidance=torch.full((batch,), 6000.0))
    return model, inputs


def tiny_cogvideox(seed=0, rope=True, fused=False, head_dim=16, frames=3, side=16):
    torch.manual_seed(seed)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=20, use_rotary_positional_embeddings=rope).eval()
    if fused:
        model.fuse_qkv_projections()

    def inputs(batch=1, seed=1):
        gen = torch.Generator().manual_seed(seed)
        kwargs = dict(hidden_states=torch.randn(batch, frames, 4, side, side, generator=gen),
                      encoder_hidden_states=torch.randn(batch, 20, 16, generator=gen))  # 20 text tokens: unaligned
        if rope:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed

            grid = side // 2
            kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=head_dim, crops_coords=((0, 0), (grid, grid)), grid_size=(grid, grid),
                temporal_size=frames, device="cpu")
        return kwargs
    return model, inputs


def tiny_ltx(seed=0):
    torch.manual_seed(seed)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=16).eval()

    def inputs(batch=1, seed=1):
        gen = torch.Generator().manual_seed(seed)
        text_mask = torch.ones(batch, 10, dtype=torch.long)
        text_mask[:, 7:] = 0
        return dict(hidden_states=torch.randn(batch, 3 * 8 * 8, 4, generator=gen),
                    encoder_hidden_states=torch.randn(batch, 10, 16, generator=gen),
                    encoder_attention_mask=text_mask, num_frames=3, height=8, width=8)
    return model, inputs


MODELS = {
    "wan": tiny_wan,
    "hunyuan": tiny_hunyuan,
    "cogvideox": tiny_cogvideox,
    "ltx": tiny_ltx,
}
# Patched layers per tiny model, and the names of attention modules that must keep their processor.
PATCHED = {"wan": 2, "hunyuan": 2, "cogvideox": 2, "ltx": 2}
UNTOUCHED = {"wan": "blocks.0.attn2", "hunyuan": "context_embedder.token_refiner.refiner_blocks.0.attn",
             "cogvideox": None, "ltx": "transformer_blocks.0.attn2"}


@torch.no_grad()
def make_local(model, sharpness=3.0):
    """Make every self-attention peak on the token itself (q = k, sharp), as real video attention is local;
    random weights alone give flat attention and no sparsity."""
    for module in model.modules():
        if hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "processor"):
            module.to_k.weight.copy_(module.to_q.weight)
            if module.to_q.bias is not None:
                module.to_k.bias.copy_(module.to_q.bias)
            for norm in (getattr(module, "norm_q", None), getattr(module, "norm_k", None)):
                if getattr(norm, "weight", None) is not None:
                    norm.weight.fill_(sharpness)


@torch.no_grad()
def forward(model, kwargs, t):
    latents = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    timestep = torch.full((latents.shape[0],), float(t), device=latents.device)
    return model(timestep=timestep, return_dict=False, **kwargs)[0]


def branch_inputs(kwargs, branch):
    """The unconditional branch: another prompt embedding, same latents."""
    if branch == 0:
        return kwargs
    other = {k: -kwargs[k].flip(1) for k in ("encoder_hidden_states", "pooled_projections") if k in kwargs}
    return dict(kwargs, **other)


def cfg_loop(model, kwargs, timesteps=(900, 800, 700, 600), branches=2):
    """What a pipeline does: per step, one transformer call per guidance branch (cond first)."""
    return [[forward(model, branch_inputs(kwargs, b), t) for b in range(branches)] for t in timesteps]


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def skip_lists(handle, branch):
    return [handle.attention(layer, branch).skip_state.to_dense().clone() for layer in handle.layers]


# -- import behaviour ------------------------------------------------------------------------------------------

def test_import_liteattn_does_not_import_diffusers():
    code = "import sys, liteattn, liteattn.diffusers; assert 'diffusers' not in sys.modules; print(liteattn.enable)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_enable_without_diffusers_raises_clear_importerror(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r"pip install liteattn\[diffusers\]"):
        liteattn.enable(torch.nn.Linear(2, 2))


# -- exactness, sparsity, branches, runs, disable: every supported model -------------------------------------

@pytest.mark.parametrize("name", list(MODELS) + ["cogvideox-fused", "cogvideox-sincos"])
def test_dense_threshold_reproduces_original(name):
    builder = {"cogvideox-fused": lambda: tiny_cogvideox(fused=True),
               "cogvideox-sincos": lambda: tiny_cogvideox(rope=False)}.get(name, MODELS.get(name))
    model, inputs = builder()
    kwargs = inputs(batch=2)
    ref = forward(model, kwargs, 700)
    handle = liteattn.enable(model, threshold=-math.inf, tile_q=TILE, tile_k=TILE)
    base = name.split("-")[0]
    assert len(handle.layers) == PATCHED[base]
    if UNTOUCHED[base]:  # cross-attention (and HunyuanVideo's text refiner) keep their processor
        assert not isinstance(model.get_submodule(UNTOUCHED[base]).processor, LiteProcessor)
    out = forward(model, kwargs, 700)
    assert rel_err(out, ref) <= REL_TOL
    assert handle.stats()["sparsity"] == [0.0]


@pytest.mark.parametrize("joint", ["split", "must_do"])
def test_joint_text_modes_are_exact(joint):
    """Both ways of keeping text dense (bench/joint_text.py compares their speed) reproduce the original, and keep
    every text row and text column."""
    model, inputs = tiny_cogvideox()
    make_local(model)
    kwargs = inputs()
    ref = forward(model, kwargs, 700)
    handle = liteattn.enable(model, threshold=-math.inf, tile_q=TILE, tile_k=TILE, joint_text=joint)
    assert rel_err(forward(model, kwargs, 700), ref) <= REL_TOL
    handle.set_threshold(0.0)
    cfg_loop(model, kwargs, branches=1)
    layer = handle.attention(handle.layers[0])
    read = layer.skip_state.read.to_dense()
    assert not read.all()
    if joint == "must_do":  # 20 text tokens first: q-tiles 0-1 keep every tile, k-tiles 0-1 are never dropped
        assert read[:, :, :2].all() and read[..., :2].all() and read.shape[-1] == 14
    else:  # video x video only
        assert read.shape[-1] == 12


def test_joint_text_option_is_checked():
    model, _ = tiny_hunyuan()
    with pytest.raises(ValueError, match=r"joint_text='must_do': HunyuanVideoTransformer3DModel supports \['split'\]"):
        liteattn.enable(model, joint_text="must_do")
    with pytest.raises(ValueError, match="joint_text='both'"):
        liteattn.enable(tiny_cogvideox()[0], joint_text="both")
    liteattn.enable(tiny_wan()[0], joint_text="split").disable()  # no text tokens: nothing to choose


@pytest.mark.parametrize("name", list(MODELS))
def test_forced_threshold_sparsity_appears_and_only_grows(name):
    model, inputs = MODELS[name]()
    make_local(model)
    handle = liteattn.enable(model, threshold=0.0, tile_q=TILE, tile_k=TILE)
    cfg_loop(model, inputs())
    stats = handle.stats()
    assert stats["num_steps"] == 4 and stats["num_branches"] == 2
    assert stats["sparsity"][0] == 0.0  # the first step computes everything
    assert stats["sparsity"][1] > 0.1
    assert all(b >= a for a, b in zip(stats["sparsity"], stats["sparsity"][1:])), stats["sparsity"]
    # Per layer and branch: replay the run, reading each layer's sparsity after each call.
    handle.reset()
    series = {(layer, branch): [] for layer in handle.layers for branch in range(2)}
    kwargs = inputs()
    for t in (900, 800, 700, 600):
        for branch in range(2):
            forward(model, branch_inputs(kwargs, branch), t)
            for layer in handle.layers:
                series[layer, branch].append(handle.attention(layer, branch).sparsity)
    for values in series.values():  # skip lists only shrink within a run
        assert len(values) == 4 and all(b >= a for a, b in zip(values, values[1:])), values
    assert max(v[-1] for v in series.values()) > 0.1


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_guidance_branches_keep_separate_states(name):
    """Interleaved cond/uncond calls give exactly what two separate single-branch runs give."""
    model, inputs = MODELS[name]()
    make_local(model)
    kwargs = inputs()
    # The max rule at -1 makes branch-dependent decisions on these tiny models (the mass rule at any one threshold
    # need not: its tiles' shares can sit on the same side of it in both branches).
    handle = liteattn.enable(model, threshold=-1.0, tile_q=TILE, tile_k=TILE, criterion="max")
    interleaved = cfg_loop(model, kwargs)
    lists = [skip_lists(handle, b) for b in range(2)]
    assert any(not torch.equal(a, b) for a, b in zip(*lists)), "branches made identical decisions: no test power"
    for branch in range(2):
        handle.reset()
        alone = [forward(model, branch_inputs(kwargs, branch), t) for t in (900, 800, 700, 600)]
        for step, out in enumerate(alone):
            assert torch.equal(out, interleaved[step][branch]), (branch, step)
    assert handle.stats()["num_branches"] == 1


@pytest.mark.parametrize("name", ["cogvideox", "ltx"])
def test_batched_guidance_matches_separate_branches(name):
    """Batched CFG (batch 2 = [uncond, cond]) keeps one state per batch entry: each half equals its own run."""
    model, inputs = MODELS[name]()
    make_local(model)
    kwargs = inputs()
    uncond = branch_inputs(kwargs, 1)
    batched = {k: torch.cat([uncond[k], v]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    handle = liteattn.enable(model, threshold=-1.0, tile_q=TILE, tile_k=TILE)
    together = [forward(model, batched, t) for t in (900, 800, 700, 600)]
    assert handle.stats()["num_branches"] == 1
    for index, branch_kwargs in enumerate((uncond, kwargs)):
        handle.reset()
        for step, t in enumerate((900, 800, 700, 600)):
            alone = forward(model, branch_kwargs, t)
            assert rel_err(together[step][index:index + 1], alone) <= REL_TOL, (index, step)
    assert handle.stats()["sparsity"][-1] > 0.1


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_new_run_starts_fresh(name):
    model, inputs = MODELS[name]()
    make_local(model)
    kwargs = inputs()
    handle = liteattn.enable(model, threshold=0.0, tile_q=TILE, tile_k=TILE)
    first = cfg_loop(model, kwargs, timesteps=(900, 800, 700))
    assert handle.stats()["sparsity"][-1] > 0.1
    second = cfg_loop(model, kwargs, timesteps=(900, 800, 700))  # the timestep jumps back up: a new run
    assert handle.run == 2 and handle.stats()["num_steps"] == 3
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    handle.reset()  # explicit: the next call is step 0 of a new run
    assert handle.run == 3 and handle.stats()["num_steps"] == 0
    assert torch.equal(forward(model, kwargs, 900), first[0][0])


@pytest.mark.parametrize("name", list(MODELS))
def test_disable_restores_original_processors_and_outputs(name):
    model, inputs = MODELS[name]()
    kwargs = inputs()
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    ref = forward(model, kwargs, 800)
    with liteattn.enable(model, threshold=0.0, tile_q=TILE, tile_k=TILE) as handle:
        forward(model, kwargs, 900)
        forward(model, kwargs, 800)
        assert handle.enabled
    assert not handle.enabled
    assert all(m.processor is originals[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(forward(model, kwargs, 800), ref)
    handle.disable()  # idempotent
    liteattn.enable(model).disable()  # and it can be enabled again


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


# -- torch.compile ---------------------------------------------------------------------------------------------

def test_torch_compile_runs_without_graph_breaks():
    from torch._dynamo.utils import counters

    model, inputs = tiny_wan()
    make_local(model)
    kwargs = inputs()
    handle = liteattn.enable(model, threshold=0.0, warmup_steps=1, tile_q=TILE, tile_k=TILE)
    eager = cfg_loop(model, kwargs, timesteps=(900, 800, 700))
    eager_stats = handle.stats()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    out = cfg_loop(compiled, kwargs, timesteps=(900, 800, 700))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert handle.stats()["sparsity"] == eager_stats["sparsity"] and eager_stats["sparsity"][-1] > 0.1
    for a, b in zip(out, eager):
        for x, y in zip(a, b):
            assert rel_err(x, y) <= REL_TOL
    torch._dynamo.reset()


def test_scheduled_run_under_compile_compiles_a_handful_of_graphs():
    """16 steps x 2 guidance branches, 2 warm-up steps and a new threshold every step: the threshold is a device
    tensor and the lists swap as tensor attributes, so nothing recompiles per step, branch or threshold."""
    from torch._dynamo.utils import counters

    model, inputs = tiny_wan()
    make_local(model)
    kwargs = inputs()
    schedule = [-1.0 - 0.25 * step for step in range(16)]
    handle = liteattn.enable(model, threshold=schedule, warmup_steps=2, tile_q=TILE, tile_k=TILE)
    eager = cfg_loop(model, kwargs, timesteps=range(1000, 200, -50))
    eager_sparsity = handle.stats()["sparsity"]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    out = cfg_loop(compiled, kwargs, timesteps=range(1000, 200, -50))
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    # Warm-up (dense), the first skipping call (it builds the skip states), and the steady state.
    assert 1 <= graphs <= 3, graphs
    stats = handle.stats()
    assert stats["num_steps"] == 16 and stats["sparsity"] == eager_sparsity and eager_sparsity[-1] > 0.1
    assert [s["threshold"] for s in stats["steps"]] == schedule
    for a, b in zip(out, eager):
        for x, y in zip(a, b):
            assert rel_err(x, y) <= REL_TOL
    torch._dynamo.reset()


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


def test_masked_text_attention_against_float64():
    """HunyuanVideo's masked text blocks run through public PyTorch only (risk (g)): check them against float64."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=gen) for n in (50, 37, 37))
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., 20:] = False
    mask[1] = False  # every key masked: output 0, lse -inf
    out, lse = liteattn.attention_with_lse(q, k, v, mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4.0
    scores = scores.masked_fill(~mask, -math.inf)
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref_out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores[:1], dim=-1), v[:1].double())
    assert (out[0].double() - ref_out[0]).abs().max() < 1e-5
    assert (lse[0].double() - ref_lse[0]).abs().max() < 1e-4
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()


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
