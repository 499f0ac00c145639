"""The README's quick start and .ci/run agree, and ``liteattn example`` runs (``liteattn demo``: tests/test_demo.py)."""

import pathlib
import re

import pytest

from liteattn.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("liteattn demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "the README's test command must appear verbatim in .ci/run"
    assert "set -euo pipefail" in ci


def test_example_prints_sparsity(capsys):
    assert main(["example", "--steps", "3", "--seq", "300", "--heads", "2", "--tile", "32",
                 "--backend", "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if re.match(r"\s+\d+\s", line)]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    sparsity = [float(r[1].rstrip("%")) for r in rows]
    assert sparsity[0] == 0.0 and sparsity[-1] > 0.0  # the first step is dense, later ones skip


@pytest.mark.parametrize("argv, named", [
    (["example", "--steps", "0"], "--steps"),
    (["example", "--seq", "0"], "--seq"),
    (["example", "--tile", "40"], "tile_q must be a positive multiple of 16"),
    (["example", "--threshold", "1"], "threshold must be <= 0"),
    (["example", "--device", "no-such-device"], "no-such-device"),
    (["bench", "--shapes", "wan9"], "unknown shapes ['wan9']"),
    (["bench", "--sparsities", "0,1.5"], "--sparsities"),
    (["bench", "--sparsities", "half"], "--sparsities"),
])
def test_commands_refuse_bad_options_in_one_line(argv, named):
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith(f"liteattn {argv[0]}: ") and named in message, message


# -- liteattn example --dtype, and --threshold in both forms (issue 15, items 2 and 3) -------------------------

def test_example_dtype_defaults_follow_the_backend_and_device():
    from liteattn.cli import example_dtype

    assert example_dtype(None, None, "cpu") == "float32"
    assert example_dtype(None, "torch", "cpu") == "float32"
    assert example_dtype(None, "triton", "cpu") == "bfloat16"  # the kernel takes float16 / bfloat16 only
    assert example_dtype(None, "gluon", "cpu") == "bfloat16"
    assert example_dtype(None, None, "cuda") == "bfloat16"
    assert example_dtype("float16", "triton", "cpu") == "float16"
    assert example_dtype("float32", None, "cuda") == "float32"


def test_example_dtype_option(capsys):
    assert main(["example", "--steps", "2", "--seq", "200", "--heads", "1", "--backend", "torch",
                 "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out.splitlines()[0]


def test_example_runs_the_triton_backend(capsys):
    """`liteattn example --backend triton` used to build float32 inputs, which the kernel refuses."""
    from liteattn import backends

    if not backends.triton_available():
        pytest.skip(f"Triton: {backends.triton_import_error()}")
    import torch

    if not torch.cuda.is_available() and not backends.interpreter_on():
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert main(["example", "--steps", "2", "--seq", "200", "--heads", "1", "--backend", "triton",
                 "--dtype", "float16", "--device", device]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "float16" in lines[0]
    rows = [line.split() for line in lines if re.match(r"\s+\d+\s", line)]
    assert len(rows) == 2 and all(float(r[2]) < 1e-2 for r in rows)  # close to dense


@pytest.mark.parametrize("command", ["example", "demo"])
@pytest.mark.parametrize("value, expected", [("-inf", float("-inf")), ("-6", -6.0), ("-1e1", -10.0),
                                             ("-0.5", -0.5), ("0", 0.0)])
@pytest.mark.parametrize("joined", [False, True])
def test_threshold_accepts_negative_values_in_both_forms(command, value, expected, joined):
    from liteattn.cli import parse_args

    argv = [command, f"--threshold={value}"] if joined else [command, "--threshold", value]
    args = parse_args(argv + ["--seed", "3"])
    assert args.threshold == expected and args.seed == 3


def test_example_runs_with_threshold_minus_inf(capsys):
    assert main(["example", "--steps", "2", "--seq", "200", "--heads", "1", "--threshold", "-inf",
                 "--backend", "torch"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [r[1] for r in rows] == ["0.0%", "0.0%"]  # -inf keeps every tile


@pytest.mark.parametrize("command", ["example", "demo"])
@pytest.mark.parametrize("value", ["inf", "nan", "0.5", "-nan", "abc"])
@pytest.mark.parametrize("joined", [False, True])
def test_threshold_refusals_name_the_option(command, value, joined):
    argv = [command, f"--threshold={value}"] if joined else [command, "--threshold", value]
    with pytest.raises(SystemExit) as info:
        main(argv + ["--device", "cpu"])
    message = str(info.value.code)
    assert message.startswith(f"liteattn {command}: --threshold") and "\n" not in message, message


@pytest.mark.parametrize("argv, named", [
    (["example", "--dtype", "float64"], "--dtype"),
    (["example", "--backend", "triton", "--dtype", "float32"], "--dtype float32"),
    (["example", "--backend", "jax"], "--backend"),
    (["example", "--steps", "many"], "--steps"),
    (["demo", "--steps", "many"], "--steps"),
    (["demo", "--no-such-option"], "--no-such-option"),
])
def test_argparse_errors_are_one_line_naming_the_option(argv, named):
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith(f"liteattn {argv[0]}: ") and named in message and "\n" not in message, message


@pytest.mark.parametrize("command", ["example", "demo", "bench"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    expected = {"example": ["(default: 8)", "(default: 2000)", "(default: -8.0)", "(default: cpu)"],
                "demo": ["(default: -6.0)", "(default: 12)", "(default: 2)", "(default: liteattn_demo)",
                         "(default: 4.0)", "(default: 128)"],
                "bench": ["(default: all)", "(default: bench_results.json)"]}[command]
    for default in expected:
        assert default in text, (default, text)
