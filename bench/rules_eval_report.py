"""The report of bench/rules_eval.py: sparsity at equal quality (:func:`sparsity_at`), the markdown tables
(:func:`markdown`) and the figure (:func:`plot`) of one or more saved JSON documents."""

from __future__ import annotations

import math
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

from rules_eval_common import KINDS, RULES, log

PSNR_CAP = 70.0  # dB: the plot's ceiling


# -- report -----------------------------------------------------------------------------------------------------


def sparsity_at(points: Sequence[Tuple[float, Optional[float]]], level: float) -> Tuple[Optional[float], str]:
    """The largest sparsity at which the piecewise-linear curve through ``points`` ``(sparsity, quality)`` still has
    quality >= ``level`` (quality: higher is better; None = identical, i.e. +inf).

    Returns ``(sparsity, bound)``: bound ``""`` for an interpolated value, ``">="`` when even the sparsest point is
    at or above the level (the curve was not followed far enough), ``"<"`` with the least sparsity measured when no
    point reaches the level, ``(None, "")`` without points."""
    pts = sorted((s, math.inf if q is None else q) for s, q in points if s is not None)
    if not pts:
        return None, ""
    if pts[-1][1] >= level:
        return pts[-1][0], ">="
    best = None
    for s, q in pts:
        if q >= level:
            best = s if best is None else max(best, s)
    for (s0, q0), (s1, q1) in zip(pts, pts[1:]):
        if (q0 >= level) != (q1 >= level):
            if math.isinf(q0) or math.isinf(q1):
                s = s0 if q0 >= level else s1
            else:
                s = s0 + (s1 - s0) * (q0 - level) / (q0 - q1)
            best = s if best is None else max(best, s)
    if best is None:
        return pts[0][0], "<"
    return best, ""


def _fmt_at(value: Tuple[Optional[float], str]) -> str:
    s, bound = value
    return "—" if s is None else f"{bound}{s:.1%}"


def _ratio(num: Tuple[Optional[float], str], den: Tuple[Optional[float], str]) -> str:
    (a, ba), (b, bb) = num, den
    if a is None or b is None or b <= 0 or ba == "<" or bb == "<":
        return "—"
    exact = not ba and not bb
    prefix = "" if exact else (">=" if ba == ">=" and not bb else ("<=" if bb == ">=" and not ba else "~"))
    return f"{prefix}{a / b:.2f}x"


def _label(rule: str, kind: str) -> str:
    return rule if kind == "fixed" else f"{rule} ({kind})"


def _fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _panels(groups: Dict[Tuple, List[dict]]) -> List[Tuple[str, int]]:
    """``(model, tile)`` pairs: models in the order they come, larger tiles first."""
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _, _, _ in groups))}
    return sorted({(m, t) for m, t, _, _ in groups}, key=lambda p: (order[p[0]], -p[1]))


def _synthetic_rows(documents: Sequence[dict]) -> List[dict]:
    """The synthetic rows of the first document that has any (they do not depend on the model)."""
    return next((doc["synthetic"]["rows"] for doc in documents if doc["synthetic"]["rows"]), [])


def curves(rows: Sequence[dict]) -> Dict[Tuple, List[dict]]:
    """Demo rows grouped by ``(model, tile, rule, kind)``, each sorted by sparsity."""
    groups: Dict[Tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["tile"], row["rule"], row["kind"]), []).append(row)
    return {key: sorted(group, key=lambda r: (r["sparsity"] is None, r["sparsity"] or 0.0))
            for key, group in groups.items()}


def markdown(documents: Sequence[dict], levels: Sequence[float], error_levels: Sequence[float]) -> str:
    out: List[str] = []
    demo_rows = [row for doc in documents for row in doc["demo"]]
    groups = curves(demo_rows)
    panels = _panels(groups)
    for doc in documents:
        meta = doc["meta"]
        if not doc["demo"]:
            continue
        source = ", ".join(f"{k} {v}" for k, v in (meta.get("source") or {}).items())
        out.append(f"**{meta.get('model')}** model ({source}): {len(meta.get('prompts') or [])} prompts x "
                   f"{meta.get('steps')} steps, guidance {meta.get('guidance')}, batch {len(meta.get('prompts') or [])},"
                   f" {meta.get('card')} {meta.get('dtype')} (liteattn backend {meta.get('backend')}), torch "
                   f"{meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date')}; dense total "
                   f"{_fmt(doc['dense'].get('total_seconds'), '.2f')} s.")
    for model, tile in panels:
        out.append(f"\n#### {model} model, {tile}-token tiles\n")
        out.append("| rule | threshold / target | sparsity (mean / last step) | PSNR dB (mean / median / min) | "
                   "SSIM (mean / median / min) | total s |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for kind in KINDS:
            for rule in RULES:
                for r in groups.get((model, tile, rule, kind), []):
                    setting = f"{r['threshold']:g}" if kind == "fixed" else f"target {r['target_error']:g}"
                    psnr = ("identical" if r["psnr_db_mean"] is None else
                            f"{r['psnr_db_mean']:.1f} / {r['psnr_db_median']:.1f} / {r['psnr_db_min']:.1f}")
                    out.append(f"| {_label(rule, kind)} | {setting} | "
                               f"{_fmt(r['sparsity'], '.1%')} / {_fmt(r['sparsity_last_step'], '.1%')} | {psnr} | "
                               f"{r['ssim_mean']:.4f} / {r['ssim_median']:.4f} / {r['ssim_min']:.4f} | "
                               f"{r['total_seconds']:.2f} |")
    calibrated_rows = [r for r in demo_rows if r["kind"] != "fixed"]
    if calibrated_rows:
        out.append("\n#### Calibration runs\n")
        out.append("(calibration run: the calibration prompts; realised error: every layer call's attention rel-L2 "
                   "against dense in that run, as multiples of the target; profile run: every prompt, with the "
                   "saved profile)\n")
        out.append("| model | tile | rule | target | calibration run s | plain run s (same batch) | ratio | "
                   "calibration-run sparsity | realised error: worst / median x target, share <= 1.25x | "
                   "profile-run sparsity | profile-run realised error |")
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")

        def realised(x):
            return ("—" if not x else f"{x['worst_over_target']:.2f} / {x['median_over_target']:.2f}, "
                                      f"{x['within_125']:.0%}")

        for r in calibrated_rows:
            c = r["calibration"]
            ratio = f"{c['seconds'] / c['plain_seconds']:.2f}x" if c.get("plain_seconds") else "—"
            out.append(f"| {r['model']} | {r['tile']} | {_label(r['rule'], r['kind'])} | {r['target_error']:g} | "
                       f"{c['seconds']:.2f} | {_fmt(c.get('plain_seconds'), '.2f')} | {ratio} | "
                       f"{_fmt(c.get('sparsity'), '.1%')} | {realised(c.get('realised'))} | "
                       f"{_fmt(r['sparsity'], '.1%')} | {realised(r.get('profile_run_realised'))} |")
    notes = [doc["calibration"].get("note") for doc in documents if doc["calibration"].get("note")]
    if panels:
        out.append("\n#### Sparsity at equal PSNR (mean over prompts; interpolated along each curve)\n")
        present = [(rule, kind) for kind in KINDS for rule in RULES if any(key[2:] == (rule, kind) for key in groups)]
        baseline = ("max", "fixed")
        others = [c for c in present if c != baseline]
        out.append("| model | tile | PSNR dB | " + " | ".join(_label(*c) for c in present) + " | "
                   + " | ".join(f"{_label(*c)} / max" for c in others) + " |")
        out.append("|---|---:|---:|" + "---:|" * (len(present) + len(others)))
        for model, tile in panels:
            at = {c: {level: sparsity_at([(r["sparsity"], r["psnr_db_mean"])
                                          for r in groups.get((model, tile) + c, [])], level) for level in levels}
                  for c in present}
            for level in levels:
                out.append(f"| {model} | {tile} | {level:g} | " + " | ".join(_fmt_at(at[c][level]) for c in present)
                           + " | " + " | ".join(_ratio(at[c][level], at[baseline][level]) if baseline in at else "—"
                                                for c in others) + " |")
        out.append("\n(\">=\": the curve stays above the level up to its sparsest point; \"<\": no point reaches it; "
                   "ratios against the fixed-threshold max rule, today's default.)")
    synthetic_rows = _synthetic_rows(documents)
    if synthetic_rows:
        config = next(doc["synthetic"]["config"] for doc in documents if doc["synthetic"]["rows"])
        out.append(f"\n#### Synthetic structured inputs: sparsity at equal worst attention error\n\n"
                   f"grid {config.get('grid')} ({config.get('tokens')} tokens), {config.get('heads')} heads x "
                   f"{config.get('head_dim')}, {config.get('steps')} steps, drift {config.get('drift')}, "
                   f"{len(config.get('layers', []))} layers (sharpness {config.get('layers')}), "
                   f"{config.get('dtype')}; error: rel-L2 of the output against dense, worst layer, worst step; "
                   f"sparsity: mean over layers and steps.\n")
        tiles = sorted({r["tile"] for r in synthetic_rows}, reverse=True)
        out.append("| tile | worst rel-L2 <= | max | mass | mass / max |")
        out.append("|---:|---:|---:|---:|---:|")
        for tile in tiles:
            for level in error_levels:
                at = {rule: sparsity_at([(r["sparsity"], -r["worst_error"]) for r in synthetic_rows
                                         if r["tile"] == tile and r["rule"] == rule], -level) for rule in RULES}
                out.append(f"| {tile} | {level:g} | {_fmt_at(at['max'])} | {_fmt_at(at['mass'])} | "
                           f"{_ratio(at['mass'], at['max'])} |")
        out.append("\n| tile | rule | threshold | sparsity | worst rel-L2 | rel-L2 per step (worst layer) |")
        out.append("|---:|---|---:|---:|---:|---|")
        for tile in tiles:
            for rule in RULES:
                for r in sorted((r for r in synthetic_rows if r["tile"] == tile and r["rule"] == rule),
                                key=lambda r: r["sparsity"]):
                    steps = " ".join(f"{e:.1e}" for e in r["error_per_step"])
                    out.append(f"| {tile} | {rule} | {r['threshold']:g} | {r['sparsity']:.1%} | "
                               f"{r['worst_error']:.2e} | {steps} |")
    skipped = [s for doc in documents for s in doc.get("skipped", [])]
    errors = [e for doc in documents for e in doc.get("errors", [])]
    for note in notes:
        out.append(f"\nNote: {note}")
    if skipped:
        out.append(f"\nSkipped ({len(skipped)}): " + "; ".join(skipped))
    if errors:
        out.append(f"\nFailed ({len(errors)}): " + "; ".join(f"{e['stage']}: {e['error']}" for e in errors))
    return "\n".join(out)


def plot(documents: Sequence[dict], path: pathlib.Path) -> Optional[pathlib.Path]:
    """PSNR against sparsity (a panel per model and tile: a line per rule, solid for fixed thresholds, dashed for
    calibrated targets, points labelled), then worst synthetic error against sparsity (a panel per tile)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = curves([row for doc in documents for row in doc["demo"]])
    panels = _panels(groups)
    synthetic_rows = _synthetic_rows(documents)
    synthetic_tiles = sorted({r["tile"] for r in synthetic_rows}, reverse=True)
    count = len(panels) + len(synthetic_tiles)
    if not count:
        return None
    fig = Figure(figsize=(4.6 * count, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, count, squeeze=False)[0]
    colours = {"max": "tab:blue", "mass": "tab:orange"}
    for ax, (model, tile) in zip(axes, panels):
        for (m, t, rule, kind), rows in sorted(groups.items()):
            if (m, t) != (model, tile):
                continue
            rows = [r for r in rows if r["sparsity"] is not None and r["psnr_db_mean"] is not None]
            if not rows:
                continue
            # Above PSNR_CAP the videos are practically identical: drawn at the cap, labelled with their value.
            xs, ys = [100 * r["sparsity"] for r in rows], [min(r["psnr_db_mean"], PSNR_CAP) for r in rows]
            style = {"fixed": "o-", "calibrated": "s--"}.get(kind, "^:")
            ax.plot(xs, ys, style, color=colours[rule], markersize=4,
                    label=f"{rule}, " + {"fixed": "fixed threshold", "calibrated": "calibrated target"}.get(
                        kind, "calibrated target + refresh"))
            for x, y, r in zip(xs, ys, rows):
                text = f"{r['threshold']:g}" if kind == "fixed" else f"{r['target_error']:g}"
                if r["psnr_db_mean"] > PSNR_CAP:
                    text += f" ({r['psnr_db_mean']:.0f} dB)"
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=colours[rule])
        ax.set_title(f"{model} demo model, tile {tile}: final videos vs dense", fontsize="small")
        ax.set_xlabel("mean sparsity (%)")
        ax.set_ylabel("PSNR (dB, mean over prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax, tile in zip(axes[len(panels):], synthetic_tiles):
        for rule in RULES:
            rows = sorted((r for r in synthetic_rows if r["tile"] == tile and r["rule"] == rule),
                          key=lambda r: r["sparsity"])
            if not rows:
                continue
            xs, ys = [100 * r["sparsity"] for r in rows], [max(r["worst_error"], 1e-8) for r in rows]
            ax.plot(xs, ys, "o-", color=colours[rule], markersize=4, label=rule)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"{r['threshold']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=colours[rule])
        ax.set_yscale("log")
        ax.set_title(f"synthetic structured inputs, tile {tile}", fontsize="small")
        ax.set_xlabel("mean sparsity (%)")
        ax.set_ylabel("worst rel-L2 of attention output (step, layer)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return path


def report(documents: Sequence[dict], png: pathlib.Path, levels, error_levels) -> None:
    """The plot, then the markdown tables (printed last)."""
    try:
        written = plot(documents, png)
        if written:
            log(f"plot: {written}")
    except Exception as exc:  # noqa: BLE001 -- e.g. no matplotlib on the device: re-render later with --report
        log(f"no plot ({type(exc).__name__}: {exc}); run --report on the JSON where matplotlib is installed")
    print("\n" + markdown(documents, levels, error_levels), flush=True)
