"""``liteattn.enable`` under ``torch.compile`` on the CPU (the eager backend, a tiny Wan model from
test_diffusers_models.py): no graph breaks, the eager run's outputs and sparsity, and a handful of graphs for a
scheduled run with warm-up and two guidance branches. Inductor on CUDA: test_diffusers_gpu.py."""

import pytest
import torch

pytest.importorskip("diffusers")

import liteattn  # noqa: E402

from test_diffusers_models import REL_TOL, TILE, cfg_loop, make_local, rel_err, tiny_wan  # noqa: E402
from test_diffusers_models import _one_thread  # noqa: E402,F401  (autouse: one intra-op thread here too)


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
