"""bench/rules_eval.py (issue 13, item 5) end to end on tiny inputs: the interpolation behind "sparsity at equal PSNR",
the synthetic stage, and the demo stages (fixed thresholds and, through a stand-in calibration API, calibrated
targets) on 2-frame 32x32 videos."""

import json
import math
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import rules_eval  # noqa: E402


def test_sparsity_at_interpolates_the_largest_sparsity_at_or_above_the_level():
    points = [(0.01, 50.0), (0.05, 40.0), (0.10, 30.0)]
    assert rules_eval.sparsity_at(points, 45.0) == (pytest.approx(0.03), "")
    assert rules_eval.sparsity_at(points, 40.0) == (pytest.approx(0.05), "")
    assert rules_eval.sparsity_at(points, 20.0) == (0.10, ">=")  # never below: a lower bound
    assert rules_eval.sparsity_at(points, 60.0) == (0.01, "<")  # never reached
    assert rules_eval.sparsity_at([], 40.0) == (None, "")
    # Not monotone: the last crossing counts (largest sparsity still at the level); None = identical videos.
    wiggly = [(0.0, None), (0.02, 38.0), (0.04, 42.0), (0.08, 34.0)]
    assert rules_eval.sparsity_at(wiggly, 40.0) == (pytest.approx(0.05), "")
    # Errors (lower is better) through negated quality, as the synthetic table does.
    errors = [(0.05, -0.005), (0.15, -0.02)]
    assert rules_eval.sparsity_at(errors, -0.01)[0] == pytest.approx(0.05 + 0.1 / 3)


def test_synthetic_stage_and_report(tmp_path, capsys):
    assert rules_eval.main(["--stages", "synthetic", "--tiles", "32", "--synthetic-grid", "2,8,16",
                            "--synthetic-steps", "3", "--synthetic-max=-1,-8", "--synthetic-mass=-2,-12",
                            "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "rules_eval_small.json").read_text())
    rows = doc["synthetic"]["rows"]
    assert [(r["rule"], r["threshold"]) for r in rows] == [("max", -1), ("max", -8), ("mass", -2), ("mass", -12)]
    for r in rows:
        assert len(r["error_per_step"]) == 3 and r["error_per_step"][0] < 1e-5  # the first step reads everything
        assert 0 <= r["sparsity"] < 1 and r["worst_error"] == max(r["error_per_step"])
    by = {(r["rule"], r["threshold"]): r for r in rows}
    for rule, loose, strict in (("max", -1, -8), ("mass", -2, -12)):  # a looser threshold skips more, errs more
        assert by[rule, loose]["sparsity"] > by[rule, strict]["sparsity"]
        assert by[rule, loose]["worst_error"] > by[rule, strict]["worst_error"]
    assert doc["errors"] == []
    out = capsys.readouterr().out
    assert "sparsity at equal worst attention error" in out and "| 32 | mass | -2 |" in out


def test_demo_stages_with_a_stand_in_calibration(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    import liteattn

    real_enable = liteattn.enable

    def enable(pipe, threshold=-10.0, *, target_error=None, profile=None, **options):
        """The calibration API's shape: a target picks a threshold, the profile remembers it."""
        if target_error is not None:
            threshold = -2.0 if target_error > 0.05 else -8.0
        if profile is not None:
            threshold = json.loads(pathlib.Path(profile).read_text())["threshold"]
        handle = real_enable(pipe, threshold, **options)
        handle.save_profile = lambda path: pathlib.Path(path).write_text(json.dumps({"threshold": threshold}))
        return handle

    monkeypatch.setattr(liteattn, "enable", enable)
    assert rules_eval.main(["--quick", "--stages", "fixed,calibrated", "--rules", "mass", "--frames", "2",
                            "--size", "32", "--tiles", "32", "--steps", "2", "--mass-thresholds=-2", "--targets", "0.08",
                            "--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "rules_eval_small_quick.json").read_text())
    assert doc["errors"] == [] and doc["calibration"]["available"] is True
    fixed = [r for r in doc["demo"] if r["kind"] == "fixed"]
    calibrated = [r for r in doc["demo"] if r["kind"] == "calibrated"]
    assert [(r["rule"], r["threshold"]) for r in fixed] == [("mass", -2)]
    assert [(r["rule"], r["target_error"]) for r in calibrated] == [("mass", 0.08)]
    for r in fixed + calibrated:  # the stand-in calibrates 0.08 to the fixed run's threshold: the same video
        assert 0 < r["sparsity"] < 1 and len(r["psnr_db"]) == 1 and math.isfinite(r["psnr_db_mean"])
    assert calibrated[0]["sparsity"] == fixed[0]["sparsity"]
    for r in calibrated:
        assert pathlib.Path(r["profile"]).is_file() and r["calibration"]["seconds"] > 0
    out = capsys.readouterr().out
    assert "Sparsity at equal PSNR" in out and "Calibration runs" in out and "mass (calibrated)" in out
    assert (tmp_path / "rules_eval_small_quick.png").is_file() or "no plot" in out
