"""bench/wan_transformer.py's reporting: the markdown tables of a run's JSON, and the plot of speed-up against
sparsity (measured and the bound 1/(1 - share*s))."""

from __future__ import annotations


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def table(data: dict) -> str:
    meta, stages = data["meta"], data["stages"]
    out = [f"{meta['card']}, {meta['date']}, torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, "
           f"triton {meta.get('triton')}; median of {meta['repeats']} steps after {meta['warmup']} "
           f"(kernel config {'autotuned' if meta.get('autotune') else 'pinned: BLOCK_N=128, 8 warps, 3 stages'})", ""]
    rows = stages.get("transformer", [])
    for shape in dict.fromkeys(r["shape"] for r in rows):
        these = [r for r in rows if r["shape"] == shape]
        first = these[0]
        share = next((r.get("share") for r in these if "share" in r), None)
        share_sdpa = next((r.get("share_sdpa") for r in these if "share_sdpa" in r), None)
        out.append(f"**{shape}**: {first['tokens']} video tokens, {first['layers']} of {first['of_layers']} blocks"
                   f"{' (fewer blocks: the step time scales with them)' if first['layers'] < first['of_layers'] else ''}"
                   f", one step = 2 transformer calls (guidance); attention share {fmt(share, '.1%')} (no-op "
                   f"self-attention), {fmt(share_sdpa, '.1%')} (SDPA alone x layers x 2)")
        out.append("")
        out.append("| run | sparsity | ms / step | peak GB | speed-up | bound 1/(1-share*s) | of bound |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in these:
            if "error" in r:
                out.append(f"| {r['run']} | | error: {r['error'][:80]} | | | | |")
                continue
            if "ms_per_step" not in r:
                continue
            note = "" if r.get("lists_kept", True) else " (lists changed!)"
            speedup = r.get("speedup")
            if speedup is None and "vs_original" in r:
                speedup = 1 / r["vs_original"]
            out.append(f"| {r['run']}{note} | {fmt(r.get('sparsity'), '.1%')} | {r['ms_per_step']:.1f} | "
                       f"{fmt(r.get('peak_gb'))} | {fmt(speedup, '.3f')}{'x' if speedup is not None else ''} | {fmt(r.get('bound'), '.3f')} | "
                       f"{fmt(r.get('of_bound'), '.3f')} |")
        out.append("")
    for stage, what, unit in (("block_inf", "one Wan 1.3B 480p block", "ms"), ("demo_inf", "demo sampling", "s")):
        for r in stages.get(stage, []):
            if "error" in r:
                out.append(f"- {what} at -inf: error {r['error'][:120]}")
                continue
            key_o, key_l = ("original_ms", "liteattn_inf_ms") if unit == "ms" else ("original_s", "liteattn_inf_s")
            out.append(f"- {what} at threshold -inf vs original: **{r['ratio']:.3f}x** (target <= {r['target']}x); "
                       f"original {r[key_o]} {unit}, liteattn {r[key_l]} {unit}")
    first = stages.get("first_step", [])
    if first:
        out += ["", "| attention shape | cuDNN ms | SDPA default ms | first skipping call ms (vs cuDNN) | "
                    "-inf untouched ms (vs cuDNN) |", "|---|---:|---:|---:|---:|"]
        for r in first:
            if "error" in r:
                out.append(f"| {r['shape']} | error: {r['error'][:80]} | | | |")
                continue
            out.append(f"| {r['shape']} H={r['heads']} S={r['tokens']} D={r['head_dim']} | {fmt(r.get('cudnn_ms'))} | "
                       f"{r['sdpa_default_ms']:.2f} | {r['first_skip_ms']:.2f} ({r['first_skip_vs_cudnn']:.3f}x) | "
                       f"{r['inf_untouched_ms']:.2f} ({r['inf_vs_cudnn']:.3f}x) |")
    for r in stages.get("overhead", []):
        if "error" in r:
            continue
        routes = ", ".join(f"{k} {v:.1f}" for k, v in r["routes_stubbed"].items())
        out += ["", f"Host µs per LiteAttention call (compute stubbed): {routes}"]
        if isinstance(r.get("handle"), dict):
            h = r["handle"]
            out.append(f"Handle hooks per transformer call ({h['layers']} layers): _before_call "
                       f"{h['_before_call']:.1f} µs, _after_call {h['_after_call']:.1f} µs")
    return "\n".join(out)


def plot(data: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["stages"].get("transformer", []) if "speedup" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        raise ValueError("no forced-sparsity rows in this JSON")
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=130)
    grid = [i / 100 for i in range(0, 96)]
    for n, shape in enumerate(shapes):
        these = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["sparsity"])
        share = next((r.get("share") for r in data["stages"]["transformer"]
                      if r["shape"] == shape and "share" in r), None)
        color = f"C{n}"
        label = f"{shape} ({these[0]['layers']} of {these[0]['of_layers']} blocks)"
        ax.plot([r["sparsity"] for r in these], [r["speedup"] for r in these], "o-", color=color,
                label=f"{label}: measured")
        if share is not None:
            ax.plot(grid, [1 / (1 - share * s) for s in grid], "--", color=color,
                    label=f"bound 1/(1 - {share:.2f} s)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("read sparsity s (forced)")
    ax.set_ylabel("speed-up per denoising step vs original")
    ax.set_title(f"Wan transformer step with guidance, {data['meta']['card']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path

