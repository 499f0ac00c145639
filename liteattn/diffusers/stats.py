"""Statistics of a sampling run: what each transformer call computed, turned into sparsity per step, layer and
guidance branch, and a plot of it.

Recording a call keeps each layer's count of computed tiles as a device tensor (no host sync per call); the counts
are read when :meth:`RunRecorder.stats` is asked for.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from ..skip import fraction_skipped

__all__ = ["RunRecorder", "plot_stats", "plot_calibration"]

# (layer name, tiles computed: 0-d device tensor or None for a dense call, tile pairs of the call or None)
LayerRecord = Tuple[str, Optional[torch.Tensor], Optional[int]]


class RunRecorder:
    """One record per transformer call of the current run; ``stats()`` summarises them."""

    def __init__(self):
        self.records: List[dict] = []

    def clear(self) -> None:
        self.records = []

    def record(self, *, transformer: str, step: int, branch: int, timestep, threshold: float, warmup: bool,
               layers: List[LayerRecord]) -> None:
        self.records.append(dict(transformer=transformer, step=step, branch=branch, timestep=timestep,
                                 threshold=threshold, warmup=warmup, layers=layers))

    def stats(self, layer_names: List[str], **info) -> dict:
        """Plain Python data; see ``LiteAttentionHandle.stats``. ``info`` is merged into the result."""
        # Tile counts of dense (warmup) calls are unknown to them: take the layer's count from a skipping call.
        known_totals = {name: total for record in self.records for name, _, total in record["layers"]
                        if total is not None}
        computed_all = [c for record in self.records for _, c, _ in record["layers"] if c is not None]
        computed_iter = iter(torch.stack(computed_all).cpu().tolist() if computed_all else [])  # one host read
        steps: Dict[int, dict] = {}
        skipped_all = tiles_all = 0
        for record in self.records:
            timestep = record["timestep"]
            if isinstance(timestep, torch.Tensor):
                timestep = float(timestep.max())
            entry = steps.setdefault(record["step"], {
                "step": record["step"], "timestep": timestep, "threshold": record["threshold"],
                "warmup": record["warmup"], "transformers": [], "_branches": {}, "_layers": {}})
            if record["transformer"] not in entry["transformers"]:
                entry["transformers"].append(record["transformer"])
            branch = entry["_branches"].setdefault(record["branch"], [0, 0])
            for name, computed, total in record["layers"]:
                if computed is None:
                    total, done = known_totals.get(name, 0), known_totals.get(name, 0)
                else:
                    done = next(computed_iter)
                for pair in (branch, entry["_layers"].setdefault(name, [0, 0])):
                    pair[0] += done
                    pair[1] += total
                skipped_all += total - done
                tiles_all += total
        skipped = lambda pair: fraction_skipped(pair[0], pair[1])  # pair = [computed, total]
        ordered = [steps[i] for i in sorted(steps)]
        for entry in ordered:
            branches, layers = entry.pop("_branches"), entry.pop("_layers")
            entry["sparsity"] = skipped([sum(p[0] for p in layers.values()), sum(p[1] for p in layers.values())])
            entry["branches"] = [skipped(branches[b]) for b in sorted(branches)]
            entry["layers"] = {name: skipped(pair) for name, pair in layers.items()}
        return dict(info, **{
            "num_steps": len(ordered),
            "num_branches": max((len(e["branches"]) for e in ordered), default=0),
            "steps": ordered,
            "sparsity": [e["sparsity"] for e in ordered],
            "layers": {name: [e["layers"].get(name, 0.0) for e in ordered] for name in layer_names
                       if any(name in e["layers"] for e in ordered)},
            "mean_sparsity": fraction_skipped(tiles_all - skipped_all, tiles_all),
        })


def plot_stats(stats: dict, path) -> str:
    """Write a PNG of sparsity per denoising step (each layer thin, each branch dashed, the mean bold)."""
    if not stats["steps"]:
        raise ValueError("nothing to plot: no transformer call has run since the handle was enabled or reset")
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install liteattn[diffusers]") from exc
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [e["step"] for e in stats["steps"]]
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    for n, values in enumerate(stats["layers"].values()):
        ax.plot(steps, values, color="0.75", linewidth=0.6, label="each layer" if n == 0 else None)
    ax.plot(steps, stats["sparsity"], color="black", linewidth=2.5, label="all layers")
    for branch in range(stats["num_branches"]):  # on top: the branches often follow the mean closely
        values = [e["branches"][branch] if branch < len(e["branches"]) else math.nan for e in stats["steps"]]
        ax.plot(steps, values, linestyle="--", linewidth=1.2, label=f"guidance branch {branch}")
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("sparsity (fraction of tiles skipped)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"liteattn: mean sparsity {stats['mean_sparsity']:.1%} over {len(steps)} steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path = str(path)
    fig.savefig(path, format="png")
    return path


def plot_calibration(summary: dict, path) -> str:
    """Write a PNG of a calibration run (``LiteAttentionHandle.calibration_summary()``): the threshold each layer
    chose per step, the realised error per layer against the target, and the sparsity per step."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install liteattn[diffusers]") from exc
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = summary["steps"]
    fig = Figure(figsize=(12, 3.8), dpi=120)
    ax_t, ax_e, ax_s = fig.subplots(1, 3)
    for name, layer in summary["layers"].items():
        xs = steps[:len(layer["threshold"])]
        ax_t.plot(xs, [t if math.isfinite(t) else math.nan for t in layer["threshold"]], linewidth=0.8)
        ax_e.plot(xs, layer["error"], color="0.6", linewidth=0.6)
    ax_t.set_title("threshold chosen per layer (branch 0)")
    ax_t.set_ylabel("log2 units")
    ax_e.plot(steps, summary["error"], color="black", linewidth=2, label="worst layer")
    if summary.get("target_error"):
        ax_e.axhline(summary["target_error"], color="tab:red", linestyle="--", label="target")
    ax_e.set_title("attention error (rel. L2) per layer")
    ax_e.legend(fontsize="small")
    ax_s.plot(steps, summary["sparsity"], color="black", linewidth=2)
    ax_s.set_ylim(-0.02, 1.02)
    ax_s.set_title(f"sparsity per step (mean {summary['mean_sparsity']:.1%})")
    for ax in (ax_t, ax_e, ax_s):
        ax.set_xlabel("denoising step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = str(path)
    fig.savefig(path, format="png")
    return path
