"""The embedded demo: procedural data, the shipped model, `liteattn demo` (CPU, tiny settings)."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("imageio")
pytest.importorskip("matplotlib")

from liteattn.cli import main  # noqa: E402
from liteattn.demo import data  # noqa: E402
from liteattn.demo.model import WEIGHTS, load_model  # noqa: E402
from liteattn.demo.run import run_dense, run_liteattn  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_model()  # the shipped weights, float32 on the CPU


def test_generator_is_deterministic_by_seed():
    a, b, c = data.sample_scenes(6, seed=7), data.sample_scenes(6, seed=7), data.sample_scenes(6, seed=8)
    video_a, video_b, video_c = data.render(a), data.render(b), data.render(c)
    assert video_a.shape == (6, 3, data.FRAMES, data.SIZE, data.SIZE)
    assert torch.equal(video_a, video_b) and a.prompts() == b.prompts()
    assert not torch.equal(video_a, video_c)
    assert video_a.min() >= -1 and video_a.max() <= 1
    # Shapes move: consecutive frames differ, and the prompts round-trip through the token ids.
    assert (video_a[:, :, 1:] - video_a[:, :, :-1]).abs().amax(dim=(1, 2, 3, 4)).min() > 0.1
    assert data.detokenize(a.tokens) == a.prompts()
    assert a.tokens.shape == (6, data.MAX_TOKENS)


def test_tokenize_rejects_unknown_words():
    with pytest.raises(ValueError, match="unknown words"):
        data.tokenize(["purple circle moving left"])


def test_model_loads_offline_from_the_package(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size <= 20e6
    assert "liteattn" in WEIGHTS.parts and "demo" in WEIGHTS.parts
    assert sum(p.numel() for p in model.parameters()) <= 10e6
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "BF16"}
    tokens = data.tokenize(["red circle moving left"])
    out = model(torch.randn(1, 3, data.FRAMES, data.SIZE, data.SIZE), torch.tensor([500.0]), tokens)
    assert out.shape == (1, 3, data.FRAMES, data.SIZE, data.SIZE) and torch.isfinite(out).all()


def test_threshold_minus_inf_reproduces_dense(model):
    tokens = data.tokenize(["blue square moving up"])
    dense = run_dense(model, tokens, steps=2, guidance=1.0, seed=3)
    lite = run_liteattn(model, tokens, -math.inf, steps=2, guidance=1.0, seed=3)
    assert lite["stats"]["mean_sparsity"] == 0.0
    torch.testing.assert_close(lite["videos"], dense["videos"], atol=1e-3, rtol=0)


def test_demo_writes_every_file_and_a_sane_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--num-prompts", "1", "--guidance", "1", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    for name in ("demo.gif", "sparsity.png", "skip_mask.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["threshold"] == -6.0
    assert len(report["sparsity_per_step"]) == 2 and report["sparsity_per_step"][0] == 0.0  # step 0 is dense
    # Every step and layer weighs the same here (one call each): the run's mean is the mean of the steps and the
    # mean of the layers.
    steps, layers = report["sparsity_per_step"], report["sparsity_per_layer"]
    assert len(layers) == 6
    assert report["sparsity_mean"] == pytest.approx(sum(steps) / len(steps), abs=1e-4)
    assert report["sparsity_mean"] == pytest.approx(sum(layers.values()) / len(layers), abs=1e-4)
    assert len(report["psnr_db"]) == len(report["ssim"]) == 1
    assert report["psnr_db"][0] is None or report["psnr_db"][0] > 10
    assert -1.0 <= report["ssim"][0] <= 1.0
    for mode in ("dense", "liteattn"):
        assert 0 < report[mode]["attention_seconds"] <= report[mode]["total_seconds"]
    table = capsys.readouterr().out
    assert "PSNR dB" in table and "sparsity" in table
    # The CPU's default is the small model, and the first line says so.
    assert table.splitlines()[0].startswith("liteattn demo: small model (16 frames of 64x64, 4096 tokens), ")
    assert report["model"] == "small" and report["video"] == {"frames": 16, "size": 64, "tokens": 4096}


@pytest.mark.parametrize("options, named", [
    (["--threshold", "0.5"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--steps", "0"], "--steps"),
    (["--guidance", "-1"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--seed", "-3"], "--seed"),
    (["--tile", "40"], "--tile"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--num-prompts", "99"], "--num-prompts"),
    (["--prompts", "purple hexagon moving left"], "unknown words ['purple', 'hexagon']"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:64"], "--device"),
    (["--weights", "WEIGHTS_MISSING"], "no demo model weights"),
    (["--weights", "WEIGHTS_GARBAGE"], "is not a demo model weights file"),
    (["--out", "OUT_IS_A_FILE"], "is not a folder"),
])
def test_bad_options_exit_with_a_message_that_names_them(options, named, tmp_path):
    """Every bad option stops the command before any sampling, with one line that names it (no traceback)."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    where = {"WEIGHTS_MISSING": str(tmp_path / "missing.safetensors"), "WEIGHTS_GARBAGE": str(garbage),
             "OUT_IS_A_FILE": str(a_file)}
    options = [where.get(o, o) for o in options]
    out = ["--out", str(tmp_path / "never")] if "--out" not in options else []
    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", "cpu", "--quiet", *out, *options] if "--device" not in options
             else ["demo", "--quiet", *out, *options])
    message = str(info.value.code)
    assert message.startswith("liteattn demo: ") and named in message, message
    assert not (tmp_path / "never").exists()  # nothing written


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_bad_device_names_the_option_whatever_torch_raises(error, monkeypatch, tmp_path):
    """torch raises RuntimeError for an unknown device string in some versions and ValueError in others."""
    import argparse

    from liteattn.demo import run

    real = torch.device

    def device(spec=None, *rest):
        if spec == "tpu":
            raise error(f"unknown device {spec!r}")
        return real(spec, *rest)

    args = argparse.Namespace(threshold=-6.0, steps=1, guidance=1.0, seed=0, tile=128, prompts=None, num_prompts=1,
                              device="tpu", out=str(tmp_path / "never"))
    monkeypatch.setattr(run.torch, "device", device)
    with pytest.raises(SystemExit) as info:
        run._checked_arguments(args)
    message = str(info.value.code)
    assert message.startswith("liteattn demo: --device") and "tpu" in message, message


# -- pictures (issue 15, item 5) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, tile", [(4, 128), (4, 64), (1, 128), (0, 128)])
def test_skip_mask_figure_keeps_every_label_inside(heads, tile):
    """skip_mask.png used to cut off its "key tile" axis labels at the bottom."""
    from liteattn.demo.pictures import mask_figure

    mq = data.FRAMES * data.SIZE * data.SIZE // 16 // tile
    mask = torch.rand(heads, mq, mq) > 0.1 if heads else None  # 0: a layer without skip state
    fig = mask_figure(mask, 3, -6.0, tile)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    inside = lambda extent: (box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0
                             and extent.y1 <= box.y1)
    labels = [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title, ax.texts and ax.texts[0])
              if t and t.get_text()] + [fig._suptitle]
    assert sum(t.get_text() == "key tile" for t in labels) == heads
    for text in labels:
        assert inside(text.get_window_extent(renderer)), (text.get_text(), text.get_window_extent(renderer), box)
    for ax in fig.axes:  # everything drawn around each panel: tick labels too
        assert inside(ax.get_tightbbox(renderer)), (ax.get_tightbbox(renderer), box)


def _gif_frames(path):
    import imageio.v2 as imageio
    import numpy as np

    return [np.asarray(frame)[..., :3] for frame in imageio.mimread(str(path))]


def test_gif_rows_are_labelled_with_their_prompts(tmp_path):
    """Each row of demo.gif sits under a band with its prompt's text (wrapped to the row's width)."""
    from liteattn.demo.pictures import LINE_HEIGHT, write_gif

    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 3, 2, 16, 16, generator=gen) * 2 - 1
    lite = dense + 0.01
    write_gif(tmp_path / "plain.gif", dense, lite, -6.0, scale=2)
    prompts = ["red circle moving right", "yellow triangle moving up-left, green circle moving left, white square "
                                          "moving up"]
    write_gif(tmp_path / "labelled.gif", dense, lite, -6.0, scale=2, prompts=prompts)
    plain, labelled = _gif_frames(tmp_path / "plain.gif"), _gif_frames(tmp_path / "labelled.gif")
    assert len(plain) == len(labelled) == 2
    row = 16 * 2  # a row's height: the video upscaled twice
    assert plain[0].shape[0] == LINE_HEIGHT + 2 * row  # the column labels, then the rows
    band = (labelled[0].shape[0] - plain[0].shape[0]) // 2  # one band per row, all the same height
    assert labelled[0].shape[0] == plain[0].shape[0] + 2 * band
    assert band >= 2 * LINE_HEIGHT  # the long prompt wraps: 96 pixels do not hold it on one line
    top = LINE_HEIGHT
    for n in range(2):
        text = labelled[0][top:top + band]
        assert (text.max(axis=2) > 100).mean() > 0.01, f"the band above row {n} is blank"
        video = labelled[0][top + band:top + band + row].astype(int)
        same = plain[0][LINE_HEIGHT + n * row:LINE_HEIGHT + (n + 1) * row].astype(int)
        assert abs(video - same).mean() < 8  # the row itself, under its band (up to each GIF's palette)
        top += band + row
    with pytest.raises(ValueError, match="prompts"):
        write_gif(tmp_path / "x.gif", dense, lite, -6.0, prompts=prompts[:1])


def test_demo_gif_has_one_band_per_prompt(tmp_path):
    """`liteattn demo` writes its prompts above the GIF's rows (one step, one prompt: the cheapest run)."""
    out = tmp_path / "demo"
    prompts = ["red circle moving right"]
    assert main(["demo", "--model", "small", "--steps", "1", "--prompts", *prompts, "--guidance", "1", "--device",
                 "cpu", "--out", str(out), "--quiet"]) == 0
    from liteattn.demo.pictures import LINE_HEIGHT

    frame = _gif_frames(out / "demo.gif")[0]
    assert frame.shape[0] == LINE_HEIGHT + (LINE_HEIGHT + 2) + data.SIZE * 2
    band = frame[LINE_HEIGHT:2 * LINE_HEIGHT + 2]
    assert (band.max(axis=2) > 100).mean() > 0.01


# -- which model: --model small|large, --weights (issue 14, item 2) -----------------------------------------------

def test_default_model_is_large_only_on_cuda_with_its_weights_installed():
    from liteattn.demo.run import default_model

    assert default_model("cuda", True) == "large"
    assert default_model(torch.device("cuda:1"), True) == "large"
    assert default_model("cuda", False) == "small"
    assert default_model("cpu", True) == "small"
    assert default_model(torch.device("cpu"), False) == "small"


def _demo_args(tmp_path, **options):
    import argparse

    values = dict(threshold=-6.0, steps=1, guidance=1.0, seed=0, tile=128, prompts=None, num_prompts=1, device="cpu",
                  out=str(tmp_path / "never"), model=None, weights=None)
    return argparse.Namespace(**{**values, **options})


def test_model_choice_without_the_large_weights(tmp_path, monkeypatch, capsys):
    """Without --model the CPU runs the small model; --model large without its file stops before anything is
    written, with a message that names the file and says how to get it."""
    from liteattn.demo import model as models
    from liteattn.demo import run

    missing = tmp_path / "weights" / "wan_large.safetensors"
    monkeypatch.setattr(models, "WEIGHTS_LARGE", missing)
    assert run._checked_arguments(_demo_args(tmp_path))[3] == ("small", WEIGHTS)
    assert run._checked_arguments(_demo_args(tmp_path, model="small"))[3] == ("small", WEIGHTS)
    with pytest.raises(SystemExit) as info:
        main(["demo", "--model", "large", "--device", "cpu", "--quiet", "--out", str(tmp_path / "never")])
    message = str(info.value.code)
    assert message.startswith("liteattn demo: --model large: ") and str(missing) in message, message
    assert "--export-frames 32" in message and "--weights PATH" in message
    assert not (tmp_path / "never").exists()
    # With the file in place, --model large picks it (on the CPU too; the warning comes once the model is loaded).
    missing.parent.mkdir()
    missing.write_bytes(b"")
    assert run._checked_arguments(_demo_args(tmp_path, model="large"))[3] == ("large", missing)
    assert capsys.readouterr().err == ""


def test_weights_wins_over_model_with_a_note(tmp_path, capsys):
    from liteattn.demo import run

    path = str(tmp_path / "mine.safetensors")
    assert run._checked_arguments(_demo_args(tmp_path, weights=path))[3] == (None, tmp_path / "mine.safetensors")
    assert capsys.readouterr().err == ""
    assert run._checked_arguments(_demo_args(tmp_path, weights=path, model="large"))[3][0] is None
    note = capsys.readouterr().err.strip()
    assert note == f"liteattn demo: --model large ignored: --weights {path} decides the model", note
