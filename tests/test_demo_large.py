"""The large demo model: textured data, the positional prompt encoder (words bind to shapes), its weights file and
compact checkpoints, and bench/attention_sparsity.py (CPU, tiny settings)."""

import importlib.util
import json
import pathlib

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn  # noqa: E402,F401  (the real package, before the bench script is loaded)
from liteattn.demo import data, textured  # noqa: E402
from liteattn.demo.model import build_model, load_large, load_model, save_weights  # noqa: E402
from liteattn.demo.sample import sample  # noqa: E402
from liteattn.demo.checkpoint import _load_split, load_checkpoint, save_checkpoint  # noqa: E402

SWAPPED = ("red circle moving right, blue square moving down", "red square moving right, blue circle moving down")
# A tiny Wan transformer (2 heads x 12, 1 layer) for the structural tests: 2 frames of 16x16 are 32 tokens.
TINY = dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
TINY_VIDEO = dict(frames=2, size=16, data="textured")


def _tiny(positional: bool, seed: int = 0):
    torch.manual_seed(seed)
    text = dict(layers=1, heads=2) if positional else None
    return build_model(TINY, text, TINY_VIDEO if positional else None).eval()


def _load_bench_script():
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "attention_sparsity.py"
    spec = importlib.util.spec_from_file_location("attention_sparsity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_textured_generator_is_deterministic_and_moves():
    a, b, c = textured.sample_scenes(2, seed=3), textured.sample_scenes(2, seed=3), textured.sample_scenes(2, seed=4)
    va, vb, vc = textured.render(a), textured.render(b), textured.render(c)
    assert va.shape == (2, 3, textured.FRAMES, textured.SIZE, textured.SIZE)
    assert torch.equal(va, vb) and not torch.equal(va, vc)
    assert va.min() >= -1 and va.max() <= 1
    # Same shapes and prompts as the small model's data for the same seed; the vocabulary is shared.
    assert a.prompts() == data.sample_scenes(2, seed=3).prompts() and torch.equal(a.tokens, data.sample_scenes(2, 3).tokens)
    # Texture: neighbouring pixels differ (no flat regions), and the camera moves the whole frame.
    assert (va[..., 1:] - va[..., :-1]).abs().mean() > 0.03
    assert ((va[:, :, 1:] - va[:, :, :-1]).abs().mean(dim=(1, 3, 4)) > 0.01).all()


def test_textured_regions_make_a_patchwork_ground_and_keep_the_rest():
    plain, one, many = (textured.sample_scenes(2, seed=5, size=32, regions=k) for k in (1, 1, 6))
    assert plain.region is None and many.region.shape == (2, 6, 12)
    a, b = textured.render(plain, frames=2, size=32), textured.render(one, frames=2, size=32)
    c, d = (textured.render(textured.sample_scenes(2, seed=5, size=32, regions=6), frames=2, size=32) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c)  # regions=1 is the default ground
    assert many.prompts() == plain.prompts() and c.min() >= -1 and c.max() <= 1
    # The model's video settings bind the regions into its data set (training, samples and the bench scripts).
    model = build_model(TINY, dict(layers=1, heads=2), dict(TINY_VIDEO, regions=6))
    assert model.dataset.sample_scenes(1, seed=0, size=16).region.shape == (1, 6, 12)
    assert model.dataset.__name__ == textured.__name__ and _tiny(positional=True).dataset is textured


def test_positional_prompts_bind_words_to_shapes():
    """Swapping two words between shapes changes a positional model's prediction; a bag of words cannot see it."""
    tokens = data.tokenize(list(SWAPPED) + ["green triangle moving up"])
    assert sorted(tokens[0].tolist()) == sorted(tokens[1].tolist())  # the same words, differently bound
    x = torch.randn(1, 3, 2, 16, 16).expand(3, -1, -1, -1, -1)
    t = torch.full((3,), 700.0)
    with torch.no_grad():
        bag = _tiny(positional=False)(x, t, tokens)
        positional = _tiny(positional=True)
        positional.text_position.normal_(std=1.0)  # at the token embeddings' scale, as training leaves them
        out = positional(x, t, tokens)
        text = positional.embed(tokens)
    torch.testing.assert_close(bag[0], bag[1], atol=1e-5, rtol=1e-5)  # the failure issue 14 describes
    assert (text[0] - text[1]).abs().amax() > 0.1
    # An untrained model's prompt moves its output little; the swap moves it a good part of what another prompt does.
    swapped, other = (out[0] - out[1]).abs().mean(), (out[0] - out[2]).abs().mean()
    assert swapped > 0.1 * other > 0


def test_large_weights_file_round_trips_its_config(tmp_path):
    model = _tiny(positional=True, seed=1)
    path = tmp_path / "w.safetensors"
    save_weights(model, path, dtype=torch.float16)
    loaded = load_model(path)
    assert loaded.text == model.text and loaded.video == TINY_VIDEO and loaded.video_shape == (2, 16)
    assert loaded.dataset is textured
    tokens = data.tokenize(list(SWAPPED))
    torch.testing.assert_close(loaded.embed(tokens), model.embed(tokens), atol=2e-2, rtol=1e-2)
    assert load_model().video_shape == (data.FRAMES, data.SIZE) and load_model().dataset is data


def test_compact_checkpoint_resumes_weights_and_adam(tmp_path):
    model = _tiny(positional=True, seed=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, tokens = torch.randn(2, 3, 2, 16, 16), torch.tensor([300.0, 800.0]), data.tokenize(list(SWAPPED))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        optimizer.zero_grad()
        model(x, t, tokens).square().mean().backward()
        optimizer.step()
    state = {"step": 3, "train_seconds": 1.0}
    save_checkpoint(tmp_path, model, ema, optimizer, state, compact=True)
    assert {p.name for p in tmp_path.glob("*.safetensors")} == {"delta_0.safetensors", "ema_0.safetensors",
                                                                 "adam_sq8_0.safetensors"}
    other = _tiny(positional=True, seed=3)
    fresh = torch.optim.AdamW(other.parameters(), lr=1e-3)
    ema2, state2 = load_checkpoint(tmp_path, other, fresh, "cpu")
    assert state2["step"] == 3
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        scale = (a - ema[name]).abs().amax().item() + 1e-12
        assert (a - b).abs().amax().item() <= 2e-3 * scale + 1e-6, name  # exact up to fp16 of the EMA delta
        torch.testing.assert_close(ema2[name], ema[name].half().float())
    for p, q in zip(model.parameters(), other.parameters()):
        v, w = optimizer.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"]
        big = v > 1e-20
        assert ((w[big] / v[big]).sqrt() - 1).abs().max() < 0.15  # float8 square roots: ~6% steps


def test_tile_max_share_matches_a_float64_reference():
    bench = _load_bench_script()
    g = torch.Generator().manual_seed(0)
    q, k = 2 * torch.randn(2, 256, 16, generator=g), 2 * torch.randn(2, 256, 16, generator=g)
    out = bench.tile_max_share(q, k, [64, 32], rows=64)
    p = torch.softmax(q.double() @ k.double().transpose(1, 2) / 4, dim=-1)
    for t in (64, 32):
        ref = p.view(2, 256, 256 // t, t).sum(-1).view(2, 256 // t, t, 256 // t).amax(2)
        torch.testing.assert_close(out[t].double(), ref, atol=1e-6, rtol=1e-4)


def test_attention_sparsity_records_every_layer_and_step_without_changing_the_video():
    bench = _load_bench_script()
    model = _tiny(positional=True, seed=4)
    prompts = list(SWAPPED)
    recorder = bench.measure(model, prompts, steps=2, tiles=[16, 8])
    assert len(recorder.records) == 2 * 2 * len(model.transformer.blocks)  # steps x guidance branches x layers
    assert {(r["step"], r["branch"]) for r in recorder.records} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for fractions in (recorder.fractions(), recorder.fractions(layer=0, step=1)):
        for t in (16, 8):
            assert len(fractions[t]) == 3 and all(0.0 <= f <= 1.0 for f in fractions[t])
            assert fractions[t][0] >= fractions[t][1] >= fractions[t][2]  # looser bounds skip more
    # The recording processor hands every call to the original: the same video as a plain run.
    plain = sample(model, data.tokenize(prompts), steps=2, seed=0)
    recorded = []
    blocks = model.transformer.blocks
    originals = [b.attn1.processor for b in blocks]
    for i, b in enumerate(blocks):
        b.attn1.set_processor(bench.RecordingProcessor(originals[i], i, bench.SparsityRecorder(len(blocks), [16])))
    try:
        recorded = sample(model, data.tokenize(prompts), steps=2, seed=0)
    finally:
        for b, o in zip(blocks, originals):
            b.attn1.set_processor(o)
    assert torch.equal(plain, recorded)


def test_qk_norm_options_set_the_attention_scale_and_survive_a_resume(tmp_path):
    """--qk-norm-init sets every self-attention q/k norm weight of a fresh run (and only those); the learning-rate
    multipliers are kept in the checkpoint and a resumed run uses them unless told otherwise."""
    from liteattn.demo import train

    model = _tiny(positional=True)
    names = [n for n, _ in model.named_parameters() if train._is_qk_norm(n)]
    assert names == ["transformer.blocks.0.attn1.norm_q.weight", "transformer.blocks.0.attn1.norm_k.weight"]
    assert train.qk_norm_scale(model) == [[1.0, 1.0]]
    common = ["--frames", "2", "--size", "16", "--batch", "1", "--time-limit", "60", "--device", "cpu", "--warmup", "1"]
    first, second = tmp_path / "a", tmp_path / "b"
    train.main(["--model", "large", "--init-from", "none", "--qk-norm-init", "1.5", "--qk-norm-lr-mult", "10",
                "--text-lr-mult", "5", "--max-steps", "1", "--out", str(first)] + common)
    state = json.loads((first / "state.json").read_text())
    scale = [v for layer in state["qk_scale"] for v in layer]
    assert len(scale) == 24 and all(abs(v - 2.25) < 0.05 for v in scale)
    ema = _load_split(first, "ema")
    # One Adam step moves a weight by about its learning rate (default 4e-4): ten times that for the q/k norms,
    # which start at 1.5; the cross-attention's norms keep the plain rate and their initial 1.
    moved = (ema["transformer.blocks.0.attn1.norm_q.weight"].float() - 1.5).abs().amax().item()
    assert 2e-3 < moved < 6e-3
    assert (ema["transformer.blocks.0.attn2.norm_q.weight"].float() - 1.0).abs().amax().item() < 1.5e-3
    train.main(["--resume", str(first), "--max-steps", "2", "--out", str(second)] + common)
    state = json.loads((second / "state.json").read_text())
    assert state["step"] == 2 and state["args"]["qk_norm_lr_mult"] == 10 and state["args"]["text_lr_mult"] == 5


def test_locality_prior_starts_heads_local_but_the_last():
    """--local-init: the same q and k bias on the highest rotary frequencies makes each head's positional logits
    largest at zero offset (every token attends most to itself); the last head of a layer has no bias."""
    from liteattn.demo import train

    model = _tiny(positional=True)
    train._locality_prior(model, 2.25)
    attn = model.transformer.blocks[0].attn1
    head_dim = 12
    bias = attn.to_q.bias.detach().view(2, head_dim)
    assert torch.equal(attn.to_q.bias, attn.to_k.bias) and not bias[1].any()
    assert abs(bias[0].square().sum().item() - head_dim) < 1e-4
    # q/k norm weights: the local head's share of the normalised vector is 256/local of the width, so its scale is
    # g^2 x heads / local = 2.25 with 2 heads and 1 local.
    assert abs(attn.norm_q.weight[0].item() ** 2 * 2 - 2.25) < 1e-5
    cos, sin = model.transformer.rope(torch.zeros(1, 3, 2, 16, 16))
    bench = _load_bench_script()
    q = bench.RecordingProcessor._rotate(bias[0].expand(1, cos.shape[1], 1, head_dim), cos.float(), sin.float())
    q = q[0, :, 0]
    logits = q @ q.T
    assert torch.equal(logits.argmax(-1), torch.arange(cos.shape[1]))


def test_large_head_split_keeps_every_shape_and_round_trips(tmp_path):
    """--heads 8: 8 heads x 32 at the same width (every tensor the shape of 4 x 64); the config travels in the
    weights file's metadata, so load_large rebuilds the 8-head model; the 3-D RoPE keeps channels on every axis."""
    from liteattn.demo.model import CONFIG_LARGE, build_large, large_config

    assert large_config() == CONFIG_LARGE and large_config(8)["attention_head_dim"] == 32
    with pytest.raises(ValueError):
        large_config(3)
    four, eight = build_large(), build_large(8)
    assert {k: v.shape for k, v in four.state_dict().items()} == {k: v.shape for k, v in eight.state_dict().items()}
    rope = eight.transformer.rope
    assert (rope.t_dim, rope.h_dim, rope.w_dim) == (12, 10, 10)
    assert eight.transformer.blocks[0].attn1.heads == 8
    path = tmp_path / "w.safetensors"
    save_weights(eight, path, dtype=torch.float16)
    loaded = load_large(path=path)
    assert loaded.config["num_attention_heads"] == 8 and loaded.config["attention_head_dim"] == 32
    assert loaded.transformer.blocks[0].attn1.heads == 8 and loaded.config["patch_size"] == (1, 4, 4)


def test_heads_option_survives_resume_and_export_and_local_init_makes_7_of_8_local(tmp_path):
    """A fresh --heads 8 --local-init run: heads 0-6 of every layer get the positional bias, head 7 none; the
    checkpoint, a resumed run and the exported weights keep 8 heads; a resume refuses another split."""
    from liteattn.demo import train

    common = ["--frames", "2", "--size", "16", "--batch", "1", "--time-limit", "60", "--device", "cpu", "--warmup", "1"]
    first, second, weights = tmp_path / "a", tmp_path / "b", tmp_path / "w.safetensors"
    train.main(["--model", "large", "--heads", "8", "--init-from", "none", "--local-init", "3.2", "--max-steps", "1",
                "--out", str(first)] + common)
    state = json.loads((first / "state.json").read_text())
    assert state["config"]["num_attention_heads"] == 8 and state["config"]["attention_head_dim"] == 32
    ema = _load_split(first, "ema")
    for layer in range(6):
        bias = ema[f"transformer.blocks.{layer}.attn1.to_q.bias"].float().view(8, 32)
        norms = bias.square().sum(-1)
        assert (norms[:7] > 25).all() and norms[7] < 0.1, norms  # |pattern|^2 = 32, one Adam step off
    scale = [v for layer in state["qk_scale"] for v in layer]
    assert len(scale) == 48 and all(abs(v - 3.2 * 7 / 8) < 0.05 for v in scale)
    # The resume rebuilds the 8-head model from the checkpoint (no step: the test stays fast; loading is the point).
    train.main(["--resume", str(first), "--max-steps", "1", "--out", str(second)] + common)
    state = json.loads((second / "state.json").read_text())
    assert state["step"] == 1 and state["config"]["num_attention_heads"] == 8 and len(state["runs"]) == 2
    with pytest.raises(SystemExit):
        train.main(["--resume", str(second), "--heads", "4", "--max-steps", "3", "--out", str(tmp_path / "c")] + common)
    train.main(["--export", str(second), "--weights", str(weights)])
    model = load_model(weights)
    assert model.transformer.blocks[0].attn1.heads == 8 and model.video_shape == (2, 16)


def test_sample_gif_reference_row_has_the_models_clip_shape(tmp_path):
    """write_sample_gif (the training runs' samples) draws its data row at the model's own clip length, frame size
    and ground regions: a run resumed at 32 frames crashed here when the data row kept 16 frames."""
    pytest.importorskip("imageio")
    import imageio.v2 as imageio

    from liteattn.demo.sample import write_sample_gif

    torch.manual_seed(0)
    model = build_model(TINY, dict(layers=1, heads=2), dict(TINY_VIDEO, frames=6, regions=3)).eval()
    path = tmp_path / "s.gif"
    write_sample_gif(model, path, prompts=["red circle moving left"], steps=1)
    frames = imageio.mimread(str(path))
    assert len(frames) == 6 and frames[0].shape[:2] == (2 * 16, 16)  # samples above data, one prompt wide
    still = imageio.imread(str(path).rsplit(".", 1)[0] + ".png")
    assert still.shape[:2] == (4 * 2 * 16 * 2, 16 * 2)  # four frames, each doubled in size


def test_render_cover_marks_the_shapes_and_leaves_the_video_unchanged():
    scenes = textured.sample_scenes(3, seed=5, size=32, regions=2)
    plain = textured.render(scenes, frames=3, size=32)
    video, cover = textured.render(scenes, frames=3, size=32, with_cover=True)
    assert torch.equal(video, plain) and cover.shape == (3, 3, 32, 32)
    assert 0 <= cover.min() and cover.max() <= 1 and (cover == 1).any() and (cover == 0).any()
    # Where a shape covers a pixel fully, the pixel is the shape's colour (shaded): not the ground's.
    bare = textured.render(textured.TexturedScenes(**{**scenes.__dict__, "shapes": scenes.shapes.__class__(
        **{**scenes.shapes.__dict__, "active": torch.zeros_like(scenes.shapes.active)})}), frames=3, size=32)
    full = cover == 1
    assert ((video - bare).abs().amax(1)[full] > 0).float().mean() > 0.9
    assert torch.equal(video.permute(0, 2, 3, 4, 1)[cover == 0], bare.permute(0, 2, 3, 4, 1)[cover == 0])


def test_shape_weighted_loss_weights_the_shapes_pixels_and_keeps_its_scale():
    from liteattn.demo import train

    model = _tiny(positional=True)
    dataset = model.dataset
    plain = train.flow_matching_batch(2, 7, "cpu", dataset=dataset, frames=2, size=16)
    weighted = train.flow_matching_batch(2, 7, "cpu", dataset=dataset, frames=2, size=16, shape_weight=5.0)
    assert len(plain) == 4 and len(weighted) == 5
    for a, b in zip(plain, weighted[:4]):
        assert torch.equal(a, b)  # the same batch, plus its weight
    weight = weighted[4]
    assert weight.shape == (2, 1, 2, 16, 16) and weight.min() >= 1 and weight.max() <= 5
    with pytest.raises(ValueError, match="textured"):
        train.flow_matching_batch(2, 7, "cpu", shape_weight=5.0)
    # Weighted MSE: uniform weights give the plain MSE; heavier shape pixels move the loss towards their error.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    x_t, t, tok, target = plain
    err = target ** 2  # the error of a model that predicts zeros
    fake = lambda *a: torch.zeros_like(x_t, requires_grad=True)  # noqa: E731
    uniform = train._forward_backward(fake, opt, x_t, t, tok, target, torch.device("cpu"), torch.ones_like(weight))
    assert torch.allclose(uniform, err.mean())
    heavy = train._forward_backward(fake, opt, x_t, t, tok, target, torch.device("cpu"), weight)
    expected = (weight * err).sum() / (weight.sum() * 3)
    assert torch.allclose(heavy, expected) and not torch.allclose(heavy, err.mean())


def test_shape_weight_option_is_kept_on_resume_and_refused_for_the_small_model(tmp_path):
    from liteattn.demo import train

    common = ["--frames", "2", "--size", "16", "--batch", "1", "--max-steps", "1", "--device", "cpu", "--warmup", "1"]
    first = tmp_path / "a"
    train.main(["--model", "large", "--init-from", "none", "--shape-weight", "4", "--out", str(first), *common])
    saved = json.loads((first / "state.json").read_text())
    assert saved["args"]["shape_weight"] == 4.0
    second = tmp_path / "b"
    train.main(["--resume", str(first), "--out", str(second), "--frames", "2", "--size", "16", "--batch", "1",
                "--max-steps", "2", "--device", "cpu"])
    assert json.loads((second / "state.json").read_text())["args"]["shape_weight"] == 4.0
    with pytest.raises(SystemExit):
        train.main(["--model", "small", "--shape-weight", "4", "--out", str(tmp_path / "c"), *common])
