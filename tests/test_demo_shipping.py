"""Shipping the large demo model (issue 14, item 2): the weights file in package data, what it draws, its export
at the shipped clip length and `liteattn demo --model large`."""

import json
import pathlib

import pytest
import torch

pytest.importorskip("diffusers")

from liteattn.demo import data  # noqa: E402
from liteattn.demo.checkpoint import save_checkpoint  # noqa: E402
from liteattn.demo.model import (VIDEO_LARGE, WEIGHTS, WEIGHTS_LARGE, build_model, load_large,  # noqa: E402
                                 load_model, save_weights)
from liteattn.demo.sample import sample  # noqa: E402

from test_demo_large import SWAPPED, TINY, TINY_VIDEO, _tiny  # noqa: E402


def _draw(model, prompt):
    """4 steps at a reduced size (4 frames of 64x64: seconds on a CPU), the same noise for every prompt."""
    return sample(model, data.tokenize([prompt]), steps=4, guidance=4.0, seed=0, frames=4, size=64)[0]


@pytest.mark.skipif(not WEIGHTS_LARGE.is_file(), reason="the large model's weights are not shipped")
def test_shipped_large_model_samples_and_the_small_models_bag_of_words_cannot_bind():
    model = load_large()
    assert model.video_shape[1] == VIDEO_LARGE["size"] and model.text  # (its clip length: the file's, 32 as shipped)
    a = _draw(model, SWAPPED[0])
    assert a.shape == (3, 4, 64, 64) and torch.isfinite(a).all()
    assert (a - _draw(model, "green triangle moving up")).abs().mean() > 0.05  # the prompt moves the video
    small = load_model()
    assert (_draw(small, SWAPPED[0]) - _draw(small, SWAPPED[1])).abs().amax() < 1e-3


@pytest.mark.skipif(not WEIGHTS_LARGE.is_file(), reason="the large model's weights are not shipped")
@pytest.mark.xfail(strict=True, reason="issue 14, open: the shipped large model draws colour blobs, not shapes, so "
                   "the swapped prompts differ by ~0.004 (mean abs) here, below the 0.02 bar (bench/LARGE_MODEL.md, "
                   "run 8); strict, so a model that binds turns this into a failure to remove the mark")
def test_shipped_large_model_draws_swapped_prompts_differently():
    """Swapping the shape words between two colours must change the video (the positional prompt encoder); the
    first run's checkpoint differed by 0.004 only."""
    model = load_large()
    a, b = (_draw(model, p) for p in SWAPPED)
    assert (a - b).abs().mean() > 0.02


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {}, dtypes=sorted({f.get_slice(k).get_dtype() for k in f.keys()}))


@pytest.mark.skipif(not WEIGHTS_LARGE.is_file(), reason="the large model's weights are not shipped yet")
def test_shipped_large_weights_file_is_fp16_within_40_mb_and_loads_at_its_clip_shape():
    assert WEIGHTS_LARGE.stat().st_size <= 40e6  # issue 14: <= 40 MB in package data
    metadata = _metadata(WEIGHTS_LARGE)
    video = json.loads(metadata["video"])
    assert metadata["dtypes"] == ["F16"] and video["data"] == "textured" and video["size"] == VIDEO_LARGE["size"]
    model = load_large()
    assert model.video_shape == (video["frames"], video["size"]) and model.text


def test_package_data_ships_both_weights_files():
    """pyproject's package data takes the files by a glob: the large file's name must match it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from fnmatch import fnmatch

    root = pathlib.Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "liteattn" / "demo"
    for path in (WEIGHTS, WEIGHTS_LARGE):
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns["liteattn.demo"]), relative


def _tiny_checkpoint(folder, seed: int = 5):
    model = _tiny(positional=True, seed=seed)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {"step": 7, "train_seconds": 12.34, "config": model.config, "text": model.text, "video": model.video}
    save_checkpoint(folder, model, ema, torch.optim.AdamW(model.parameters()), state, compact=True)
    return ema


def test_export_frames_sets_the_shipped_clip_length(tmp_path):
    """--export --export-frames 4: float16 weights (the EMA) whose metadata says 4 frames (trained on 2), and
    load_model / the demo sample 4-frame clips; without it the checkpoint's length."""
    from liteattn.demo import train

    ema = _tiny_checkpoint(tmp_path / "ckpt")
    longer, plain = tmp_path / "w4.safetensors", tmp_path / "w.safetensors"
    assert train.main(["--export", str(tmp_path / "ckpt"), "--export-frames", "4", "--weights", str(longer)]) == 0
    assert train.main(["--export", str(tmp_path / "ckpt"), "--weights", str(plain)]) == 0
    metadata = _metadata(longer)
    assert metadata["dtypes"] == ["F16"] and metadata["trained_frames"] == "2" and metadata["step"] == "7"
    assert json.loads(metadata["video"]) == dict(TINY_VIDEO, frames=4)
    assert "trained_frames" not in _metadata(plain) and load_model(plain).video_shape == (2, 16)
    model = load_model(longer)
    assert model.video_shape == (4, 16)
    for name, tensor in model.state_dict().items():
        if name in ema:
            torch.testing.assert_close(tensor, ema[name].half().float(), msg=name)
    assert sample(model, data.tokenize(["red circle moving left"]), steps=1, guidance=1.0).shape == (1, 3, 4, 16, 16)
    for bad in (["--export-frames", "0", "--export", str(tmp_path / "ckpt"), "--weights", str(tmp_path / "x")],
                ["--export-frames", "4", "--out", str(tmp_path / "y")],
                ["--export", str(tmp_path / "ckpt")]):
        with pytest.raises(SystemExit):
            train.main(bad)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_demo_runs_the_large_model_at_its_own_clip_shape(tmp_path, monkeypatch, capsys):
    """`liteattn demo --model large` on the CPU (a tiny stand-in for the large file: 3 frames of 16x16, 48 tokens):
    a one-line warning, the model named in the first line, and the GIF, mask and report at the model's clip shape,
    not the small model's 16 frames of 64x64."""
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("matplotlib")

    from liteattn.cli import main
    from liteattn.demo import model as models
    from liteattn.demo.pictures import LINE_HEIGHT

    torch.manual_seed(0)
    path = tmp_path / "wan_large.safetensors"
    save_weights(build_model(TINY, dict(layers=1, heads=2), dict(TINY_VIDEO, frames=3)), path, dtype=torch.float16)
    monkeypatch.setattr(models, "WEIGHTS_LARGE", path)
    out = tmp_path / "demo"
    assert main(["demo", "--model", "large", "--device", "cpu", "--steps", "2", "--num-prompts", "1", "--guidance",
                 "1", "--tile", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()  # the first line names the model; one warning line
    assert printed.out.splitlines()[0].startswith("liteattn demo: large model (3 frames of 16x16, 48 tokens), ")
    warnings = [line for line in printed.err.splitlines() if "warning" in line]
    assert warnings == ["liteattn demo: warning: the large model samples 48 tokens a clip, which takes very long on "
                        "a CPU (--model small is the CPU's default)"], printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "large" and report["weights"] == str(path)
    assert report["video"] == {"frames": 3, "size": 16, "tokens": 48} and len(report["sparsity_per_step"]) == 2
    frames = imageio.mimread(str(out / "demo.gif"))  # 3 frames; panels of 128 pixels (16 x 8)
    assert len(frames) == 3 and frames[0].shape[1] == 3 * 128 and frames[0].shape[0] > LINE_HEIGHT + 128
    assert (out / "skip_mask.png").stat().st_size > 0
