"""``liteattn.enable`` on every supported diffusers video transformer (tiny random models, built here, no download).

Every supported model (Wan 2.1/2.2, HunyuanVideo, CogVideoX, LTX-Video) is checked for: exact reproduction of the
original output at ``threshold=-inf``; sparsity that appears under a forced threshold and only grows within a run;
separate skip states per guidance branch (sequential and batched); a fresh state for a new run; ``disable()``
restoring the original processors and outputs. Plus HunyuanVideo's masked text attention against float64.

The tiny models and helpers here are shared: test_diffusers_enable.py, test_diffusers_compile.py,
test_diffusers_gpu.py, test_parallel_*.py and test_calibrate.py import them.
"""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import liteattn  # noqa: E402
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


# -- HunyuanVideo's masked text attention ---------------------------------------------------------------------

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
