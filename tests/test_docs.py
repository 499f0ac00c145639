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
