"""``liteattn bench`` without a GPU: ``table`` and ``targets`` (issue 12's targets, met or not) on synthetic rows,
and the ``--kernels`` option."""

import pytest

from liteattn import backends, bench
from liteattn.cli import main

SHAPE = "wan2.1-1.3b-480p"


def make_rows(shape=SHAPE, cudnn=10.0, flex_dense=13.0, flex_mask=None, kernels=None):
    """Rows as ``bench.run`` writes them. ``kernels``: name -> (dense ms, {s: read ms}, {s: read+write ms})."""
    B, H, S, D = bench.SHAPES[shape]
    rows = []

    def add(backend, sparsity, ms, kernel=None, write=False):
        rows.append(dict(shape=shape, B=B, H=H, S=S, D=D, backend=backend, kernel=kernel, sparsity=sparsity,
                         write=write, ms=ms, tflops=4.0 * B * H * S * S * D / ms / 1e9))

    if cudnn is not None:
        add("sdpa-cudnn", None, cudnn)
    add("sdpa-flash", None, 15.0)
    add("flex-dense", None, flex_dense)
    for name, (dense, _, _) in kernels.items():
        add(f"{name}-dense", None, dense, name)
    for s, f in flex_mask.items():
        for name, (_, read, write) in kernels.items():
            add(f"{name}-read", s, read[s], name)
            add(f"{name}-read+write", s, write[s], name, True)
        add("flex-blockmask", s, f)
    return rows


def good_kernel():
    """Every target met with room: 1.25x cuDNN, 1.6x Flex, linear scaling, 1 % for the write lists."""
    read = {0.0: 10.0, 0.5: 5.0, 0.9: 1.0}
    return 8.0, read, {s: 1.01 * t for s, t in read.items()}


FLEX_MASK = {0.0: 16.0, 0.5: 8.0, 0.9: 1.6}


def checks_of(rows, kernel):
    return {c["target"]: c for c in bench.target_checks(rows) if c["kernel"] == kernel}


def test_table_has_every_kernel_row_with_its_speed_against_cudnn():
    rows = make_rows(flex_mask=FLEX_MASK, kernels={"gluon": good_kernel(), "triton": (11.0, *good_kernel()[1:])})
    lines = bench.table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    by_backend = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        by_backend.setdefault(cells[1], []).append(cells)
    assert set(by_backend) == {"sdpa-cudnn", "sdpa-flash", "flex-dense", "flex-blockmask", "gluon-dense",
                               "gluon-read", "gluon-read+write", "triton-dense", "triton-read", "triton-read+write"}
    assert by_backend["gluon-dense"][0][5] == "1.25x" and by_backend["triton-dense"][0][5] == "0.91x"
    assert [c[2] for c in by_backend["triton-read"]] == ["0%", "50%", "90%"]
    assert by_backend["sdpa-cudnn"][0][5] == "1.00x"


def test_targets_all_met_per_kernel_and_the_old_issues_targets_are_gone():
    rows = make_rows(flex_mask=FLEX_MASK, kernels={"gluon": good_kernel()})
    checks = bench.target_checks(rows)
    # dense vs cuDNN, dense vs Flex, Flex with the mask at 3 sparsities, scaling at 2, write cost at 3
    assert len(checks) == 2 + 3 + 2 + 3
    assert all(c["met"] for c in checks), [c for c in checks if not c["met"]]
    text = bench.targets(rows)
    assert "| wan2.1-1.3b-480p | gluon | all of the above | 10 of 10 met | yes |" in text
    assert "0.9x cuDNN" not in text and "<= 3%" not in text and "+ 0.05" not in text and "1.05" not in text
    assert "| wan2.1-1.3b-480p | gluon | dense >= 1.0x cuDNN SDPA | 1.250x | yes |" in text
    assert "| wan2.1-1.3b-480p | gluon | s=50%: time(s)/time(0) <= 0.53 | 0.500 | yes |" in text


def test_targets_each_kernel_judged_on_its_own_rows():
    slow_read = {0.0: 14.0, 0.5: 8.0, 0.9: 2.0}  # Flex 1.14x / 1.0x / 0.8x; scaling 0.571, 0.143
    slow = (11.0, slow_read, {s: 1.05 * t for s, t in slow_read.items()})
    rows = make_rows(flex_mask=FLEX_MASK, kernels={"gluon": good_kernel(), "triton": slow})
    gluon, triton = checks_of(rows, "gluon"), checks_of(rows, "triton")
    assert all(c["met"] for c in gluon.values())
    assert not triton["dense >= 1.0x cuDNN SDPA"]["met"]
    assert not triton["dense >= 1.3x FlexAttention"]["met"]  # 13 / 11 = 1.18
    assert not triton["s=0%: >= 1.3x FlexAttention (same block mask)"]["met"]
    assert not triton["s=50%: time(s)/time(0) <= 0.53"]["met"]  # 8 / 14 = 0.571
    assert triton["s=90%: time(s)/time(0) <= 0.13"]["met"] is False  # 2 / 14 = 0.143
    assert not triton["s=50%: writing the lists costs <= 2%"]["met"]
    assert triton["s=50%: writing the lists costs <= 2%"]["measured"] == "+5.0%"
    assert "| triton | all of the above | 0 of 10 met | no |" in bench.targets(rows)


@pytest.mark.parametrize("just_met", [True, False])
def test_targets_on_the_borderline(just_met):
    """Exactly on each bound is met; a hair beyond it is not."""
    d = 0.0 if just_met else 1e-3
    read = {0.0: 10.0, 0.5: 5.3 + d, 0.9: 1.3 + d}  # time(s)/time(0) = 1 - s + 0.03 exactly when just met
    write = {0.0: 10.2 + d, 0.5: 1.02 * read[0.5] + d, 0.9: 1.02 * read[0.9] + d}  # +2 %
    flex_mask = {0.0: 13.0 - d, 0.5: 1.3 * read[0.5] - d, 0.9: 1.3 * read[0.9] - d}  # 1.3x
    rows = make_rows(cudnn=10.0 - d, flex_dense=13.0 - d, flex_mask=flex_mask,
                     kernels={"gluon": (10.0, read, write)})
    checks = bench.target_checks(rows)
    assert len(checks) == 10
    assert [c["target"] for c in checks if c["met"] != just_met] == []
    if just_met:
        text = bench.targets(rows)
        assert "| dense >= 1.0x cuDNN SDPA | 1.000x | yes |" in text
        assert "| s=90%: writing the lists costs <= 2% | +2.0% | yes |" in text


def test_targets_not_measured_is_not_met_and_scaling_stops_at_90_percent():
    read = {0.0: 10.0, 0.5: 5.0, 0.95: 0.5}
    rows = make_rows(cudnn=None, flex_mask={0.0: 16.0, 0.5: 8.0, 0.95: 0.8},
                     kernels={"triton": (8.0, read, dict(read))})
    checks = checks_of(rows, "triton")
    assert checks["dense >= 1.0x cuDNN SDPA"]["measured"] == "not measured"
    assert checks["dense >= 1.0x cuDNN SDPA"]["met"] is False
    assert "s=50%: time(s)/time(0) <= 0.53" in checks
    assert not any(t.startswith("s=95%: time(s)") for t in checks)  # the target holds up to 90 %
    assert checks["s=95%: >= 1.3x FlexAttention (same block mask)"]["met"]
    assert "| not measured | no |" in bench.targets(rows)


def test_targets_per_shape_and_old_rows_still_read():
    """Rows from JSON written before the kernel field (``liteattn-*``, the Triton kernel) still give targets."""
    rows = make_rows(flex_mask=FLEX_MASK, kernels={"triton": good_kernel()})
    rows += make_rows(shape="cogvideox-5b", cudnn=5.0, flex_mask=FLEX_MASK, kernels={"triton": good_kernel()})
    old = [dict(r, backend=r["backend"].replace("triton", "liteattn")) for r in rows if r["shape"] == SHAPE]
    for r in old:
        del r["kernel"]
    assert {(c["shape"], c["kernel"]) for c in bench.target_checks(rows)} == {(SHAPE, "triton"),
                                                                             ("cogvideox-5b", "triton")}
    assert not checks_of(rows[len(old):], "triton")["dense >= 1.0x cuDNN SDPA"]["met"]  # 5 / 8
    old_checks = checks_of(old, "liteattn")
    assert len(old_checks) == 10 and all(c["met"] for c in old_checks.values())
    assert "| liteattn-dense |" in bench.table(old)


# -- --kernels -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["cuda9", "triton,flash", "", "triton,triton", "auto,triton"])
def test_kernels_option_refuses_unknown_names(value):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--shapes", SHAPE, "--kernels", value])
    message = str(info.value.code)
    assert message.startswith("liteattn bench: --kernels") and "['gluon', 'triton']" in message, message
    assert "'auto'" in message


def test_kernels_option_accepts_the_known_names():
    assert bench.parse_kernels("triton") == ["triton"]
    assert bench.parse_kernels("gluon, triton") == ["gluon", "triton"]
    assert bench.parse_kernels("triton,gluon") == ["triton", "gluon"]


def test_kernels_auto_asks_gluon_available_defensively(monkeypatch):
    seen = []
    monkeypatch.setattr(backends, "gluon_available", lambda device: seen.append(device) or True, raising=False)
    assert bench.parse_kernels("auto", "cuda") == ["gluon", "triton"] and seen == ["cuda"]
    monkeypatch.setattr(backends, "gluon_available", lambda device: False, raising=False)
    assert bench.parse_kernels("auto", "cuda") == ["triton"]

    def broken(device):
        raise RuntimeError("no sm_90 here")

    monkeypatch.setattr(backends, "gluon_available", broken, raising=False)
    assert bench.parse_kernels("auto", "cuda") == ["triton"]
    monkeypatch.delattr(backends, "gluon_available", raising=False)
    assert bench.parse_kernels("auto", "cuda") == ["triton"]


def test_targets_a_kernel_that_left_no_row_is_reported_not_met():
    """A kernel asked for that failed on a shape (logged and skipped by ``run``) still shows, not measured."""
    rows = make_rows(flex_mask=FLEX_MASK, kernels={"triton": good_kernel()})
    gluon = checks_of_asked(rows, ["gluon", "triton"], "gluon")
    assert len(gluon) == 10 and all(c["measured"] == "not measured" and not c["met"] for c in gluon.values())
    assert all(c["met"] for c in checks_of_asked(rows, ["gluon", "triton"], "triton").values())
    assert "| gluon | all of the above | 0 of 10 met | no |" in bench.targets(rows, ["gluon", "triton"])
    assert "gluon" not in bench.targets(rows)


def checks_of_asked(rows, kernels, kernel):
    return {c["target"]: c for c in bench.target_checks(rows, kernels) if c["kernel"] == kernel}
