"""Calibration to an error budget (liteattn/calibrate.py, docs/DESIGN.md section 4.2): the one-pass errors against
attention recomputed with each candidate's tiles, the choice, the profile round trip, and enable(target_error=...)
end to end on a tiny Wan transformer."""

import json
import math

import pytest
import torch

from liteattn import LiteAttention
from liteattn.calibrate import (CANDIDATES, CalibratingAttention, Profile, check_target_error, choose_threshold,
                                threshold_errors)
from liteattn.testing import structured_qkv

from oracle import plain_attention


def rel_l2(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("criterion", ["max", "mass"])
def test_errors_equal_attention_recomputed_with_each_candidates_tiles(criterion):
    # Ragged tails on both axes, a read list with holes, must-do ranges on both axes, a previous LSE for the mass
    # rule: the one-pass error of a candidate equals the error of attention over exactly the tiles it keeps.
    q, k, v = structured_qkv(2, 300, 3, 16, seq_k=270, seed=3)
    gen = torch.Generator().manual_seed(1)
    read = torch.rand(2, 3, 5, 5, generator=gen) > 0.3
    read[..., 0] = True
    lse_prev = None
    if criterion == "mass":
        _, lse_prev = plain_attention(q, k, v, None, 64, 64)
        lse_prev = lse_prev.float() + 0.1 * torch.randn(lse_prev.shape, generator=gen)
        lse_prev[0, 0, :10] = math.nan  # rows with no previous call: this call's running LSE
    dense, _ = plain_attention(q.double(), k.double(), v.double(), None, 64, 64)
    errors, scores = threshold_errors(q, k, v, criterion=criterion, tile_q=64, tile_k=64, read=read,
                                      lse_prev=lse_prev, must_do=[(200, 230)], must_do_q=[(0, 10)])
    assert errors.shape == (len(CANDIDATES),) and scores.shape == (2, 3, 5, 5)
    assert torch.isneginf(scores[~read]).all()  # tiles not read: dropped under every threshold
    assert torch.isposinf(scores[..., 0, :][read[..., 0, :]]).all()  # must-do q-tile 0 keeps all it reads
    assert torch.isposinf(scores[..., 3][read[..., 3]]).all()  # k-tile 3 overlaps the must-do keys
    kept_fractions = set()
    for theta in (-math.inf, -16.0, -10.0, -6.0, -3.0, -1.0, 0.0):
        keep = scores > theta
        kept_fractions.add(round(keep.float().mean().item(), 3))
        out, _ = plain_attention(q.double(), k.double(), v.double(), keep, 64, 64)
        assert errors[CANDIDATES.index(theta)].item() == pytest.approx(rel_l2(out, dense), rel=1e-4, abs=1e-6)
    assert errors[0].item() == pytest.approx(rel_l2(plain_attention(q.double(), k.double(), v.double(), read, 64,
                                                                    64)[0], dense), rel=1e-4)
    assert len(kept_fractions) >= 3  # the thresholds tried really keep different tile sets


@pytest.mark.parametrize("criterion", ["max", "mass"])
def test_scores_decide_as_the_layer_does(criterion):
    # A tile's score is the rule's statistic: the LiteAttention call at any threshold keeps exactly score > threshold.
    q, k, v = structured_qkv(1, 256, 2, 16, seed=5)
    for theta in (-12.0, -5.0, -2.0):
        attention = LiteAttention(threshold=theta, tile_q=32, tile_k=32, backend="torch", criterion=criterion)
        _, scores = threshold_errors(q, k, v, criterion=criterion, tile_q=32, tile_k=32)
        attention(q, k, v)
        assert torch.equal(attention.skip_state.to_dense(), scores > theta)


def test_choose_threshold_takes_the_largest_within_target():
    errors = torch.tensor([0.0, 0.001, 0.01, 0.03, 0.02, 0.5], dtype=torch.float64)
    candidates = (-math.inf, -12.0, -8.0, -6.0, -4.0, 0.0)
    assert choose_threshold(errors, 0.02, candidates) == -4.0  # -6 exceeds, yet -4 does not: the largest that fits
    assert choose_threshold(errors, 0.005, candidates) == -12.0
    assert choose_threshold(torch.full((6,), 0.1, dtype=torch.float64), 0.02, candidates) == -math.inf


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (1.5, ValueError), (-0.1, ValueError), (True, TypeError),
                                        ("0.02", TypeError), (math.nan, ValueError)])
def test_target_error_is_checked(bad, error):
    with pytest.raises(error, match="target_error"):
        check_target_error(bad)


def test_calibrating_attention_keeps_each_call_within_target():
    # Drifting structured inputs over 6 steps: each call's own error stays within the target (refresh on), and the
    # calls do skip.
    attention = LiteAttention(tile_q=32, tile_k=32, backend="torch", criterion="mass")
    calibrating = CalibratingAttention(attention, 0.02, refresh=True)
    dense_calls = 0
    for step in range(6):
        q, k, v = structured_qkv(1, 512, 2, 16, seed=7, grid=(2, 16, 16))
        noise = torch.Generator().manual_seed(step)
        q = q + 0.05 * step * torch.randn(q.shape, generator=noise)
        calibrating.step = step
        out = calibrating(q, k, v)
        dense, _ = plain_attention(q.double(), k.double(), v.double(), None, 32, 32)
        record = calibrating.records[-1]
        assert record.step == step
        assert record.error == pytest.approx(rel_l2(out, dense), rel=0.05, abs=5e-5)  # what it really did (fp32 output)
        assert record.error <= 0.02 + 1e-6
        dense_calls += record.read_sparsity == 0
    assert calibrating.records[-1].read_sparsity > 0.1
    assert calibrating.skip_state is attention.skip_state  # the wrapper shows the layer's own state


def test_profile_round_trip_and_refusals(tmp_path):
    profile = Profile(criterion="mass", tile_q=64, tile_k=128, target_error=0.02,
                      thresholds={"t.blocks.0.attn1": [[-math.inf, -8.5, -7.0], [-math.inf, -9.0]]},
                      refresh={"t.blocks.0.attn1": [[2], []]})
    path = profile.save(tmp_path / "p.json")
    text = json.loads(open(path).read())
    assert text["thresholds"]["t.blocks.0.attn1"][0] == [None, -8.5, -7.0]  # -inf as null: plain JSON
    loaded = Profile.load(path)
    assert loaded.at("t.blocks.0.attn1", 0, 1) == -8.5
    assert loaded.at("t.blocks.0.attn1", 0, 9) == -7.0  # the last step's value goes on
    assert loaded.at("t.blocks.0.attn1", 1, 0) == -math.inf
    assert loaded.at("t.blocks.0.attn1", 3, 2) == -7.0  # a branch it never saw: branch 0's
    assert loaded.refreshes("t.blocks.0.attn1", 0, 2) and not loaded.refreshes("t.blocks.0.attn1", 1, 2)
    with pytest.raises(ValueError, match="does not exist"):
        Profile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{\"liteattn_profile\": 1, \"criterion\": \"mass\"}")
    with pytest.raises(ValueError, match="malformed"):
        Profile.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{\"a\": 1}")
    with pytest.raises(ValueError, match="not a liteattn profile"):
        Profile.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        Profile.load(dict(text, thresholds={"x": [[0.5]]}))
    with pytest.raises(ValueError, match="criterion='max'"):
        loaded.check_matches(["t.blocks.0.attn1"], criterion="max", tile_q=64, tile_k=128)
    with pytest.raises(ValueError, match="no thresholds for 1 patched layer"):
        loaded.check_matches(["t.blocks.1.attn1"], criterion="mass", tile_q=64, tile_k=128)


def test_enable_calibrates_saves_and_runs_the_profile(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import liteattn
    from test_diffusers_models import make_local, tiny_wan

    model, inputs = tiny_wan(layers=2, head_dim=16, frames=4, side=32)
    make_local(model)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)

    @torch.no_grad()
    def run(handle):
        scheduler.set_timesteps(5)
        x = inputs(seed=2)
        latents = x["hidden_states"]
        for t in scheduler.timesteps:
            velocity = model(hidden_states=latents, timestep=t.expand(1),
                             encoder_hidden_states=x["encoder_hidden_states"], return_dict=False)[0]
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents

    with pytest.raises(ValueError, match="one of threshold, target_error and profile"):
        liteattn.enable(model, threshold=-6, target_error=0.02)
    with pytest.raises(ValueError, match="refresh"):
        liteattn.enable(model, refresh=True)
    handle = liteattn.enable(model, target_error=0.03, refresh=True, criterion="mass", tile_q=32, tile_k=32,
                             scheduler=scheduler)
    with pytest.raises(ValueError, match="no calibration run"):
        handle.profile()
    run(handle)
    summary = handle.calibration_summary()
    assert summary["steps"] == [0, 1, 2, 3, 4]
    # Every call's own error within the budget (a list that drifted past it is re-read: a refresh), and skipping.
    assert max(summary["error"]) <= 0.03 + 1e-9
    assert summary["mean_sparsity"] > 0.05 and "worst error" in summary["table"]
    assert handle.stats()["mean_sparsity"] > 0.05
    path = handle.save_profile(tmp_path / "wan.json")
    assert handle.plot_calibration(tmp_path / "cal.png")
    profile = handle.profile()
    assert sorted(profile.thresholds) == sorted(handle.layers)
    handle.disable()

    with pytest.raises(ValueError, match="criterion='mass'"):
        liteattn.enable(model, profile=path, criterion="max", tile_q=32, tile_k=32)
    assert getattr(model, "_liteattn_handle", None) is None  # a refused profile leaves the model as it was
    handle = liteattn.enable(model, profile=path, tile_q=32, tile_k=32, scheduler=scheduler, measure_error=True)
    run(handle)
    replay = handle.calibration_summary()
    # The same inputs and the same thresholds: the same decisions, so the same sparsity and errors.
    assert replay["sparsity"] == pytest.approx(summary["sparsity"], abs=1e-9)
    assert replay["error"] == pytest.approx(summary["error"], rel=1e-3, abs=1e-6)
    handle.disable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("criterion", ["max", "mass"])
def test_scores_match_the_kernels_decisions_on_the_gpu(criterion):
    # The Triton kernel decides in its own fp32 arithmetic: every tile away from the threshold (|score - theta| >
    # 0.05 log2 units) is decided as the PyTorch scores say, at a production-like shape.
    q, k, v = structured_qkv(1, 4096, 4, 128, seed=11, dtype=torch.float16, device="cuda")
    theta = -8.0
    attention = LiteAttention(threshold=theta, backend="triton", criterion=criterion)
    _, scores = threshold_errors(q, k, v, criterion=criterion)
    attention(q, k, v)
    written = attention.skip_state.to_dense()
    clear = (scores - theta).abs() > 0.05
    assert torch.equal(written[clear], (scores > theta)[clear])
    assert clear.float().mean() > 0.95
