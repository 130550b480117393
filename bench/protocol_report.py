"""The protocol's report (:mod:`gapcast.bench.protocol`): the mean and spread over seeds, the goals, the Markdown
tables and the bar chart, from the results a run saved (pure but for the chart's PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["aggregate", "bar_chart", "protocol_markdown", "targets"]


def aggregate(results: dict[str, dict[int, Any]], scenarios: list[str]) -> dict[str, Any]:
    """Mean and spread over seeds of every method's normalised MAE per scenario and for the forecast.

    Returns:
        ``{method: {part: {"mean": float, "std": float, "n": seeds}}}``; ``std`` is the sample standard deviation
        (0 for one seed or an untrained method).
    """
    out: dict[str, Any] = {}
    for method, by_seed in results.items():
        row = {}
        for part in (*scenarios, "forecast"):
            vals = [r["scores"][part]["all_norm"]["mae"] for r in by_seed.values()
                    if part in r["scores"] and r["scores"][part]["all_norm"]["mae"] is not None]
            if vals:
                row[part] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                             "n": len(vals)}
        row["train_s"] = float(np.mean([r["train_s"] for r in by_seed.values()]))
        out[method] = row
    return out


def targets(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals with measured values; a win counts only when it exceeds both spreads."""
    from gapcast.bench.protocol import PYPOTS_SIZES

    out = []
    key = "block-72h:station"
    ours = agg.get("ConFill", {}).get(key)
    learned = {m: agg[m][key] for m in PYPOTS_SIZES if key in agg.get(m, {})}
    if ours and learned:
        best = min(learned, key=lambda m: learned[m]["mean"])
        b = learned[best]
        rel = (ours["mean"] - b["mean"]) / b["mean"]
        out.append({"target": f"ConFill {key} MAE >= 20% below the best learned baseline ({best})",
                    "measured": rel, "goal": -0.20, "met": rel <= -0.20 and b["mean"] - ours["mean"] > ours["std"] + b["std"]})
    lin = agg.get("linear interpolation", {}).get(key)
    if ours and lin:
        rel = (ours["mean"] - lin["mean"]) / lin["mean"]
        out.append({"target": f"ConFill {key} MAE >= 30% below linear interpolation", "measured": rel, "goal": -0.30,
                    "met": rel <= -0.30 and lin["mean"] - ours["mean"] > ours["std"]})
    ours_f = agg.get("ConFill", {}).get("forecast")
    rivals = {m: agg[m]["forecast"] for m in ("persistence", "seasonal naive (1 d)", "DLinear")
              if "forecast" in agg.get(m, {})}
    if ours_f and rivals:
        best = min(rivals, key=lambda m: rivals[m]["mean"])
        b = rivals[best]
        rel = (ours_f["mean"] - b["mean"]) / b["mean"]
        out.append({"target": f"ConFill 24 h forecast MAE >= 10% below the best of persistence / seasonal naive / "
                              f"DLinear ({best})", "measured": rel, "goal": -0.10,
                    "met": rel <= -0.10 and b["mean"] - ours_f["mean"] > ours_f["std"] + b["std"]})
    return out


def _cell(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    return f"{c['mean']:.4f} ± {c['std']:.4f}" if c["n"] > 1 else f"{c['mean']:.4f}"


def protocol_markdown(res: dict[str, Any]) -> str:
    """The tables: imputation (every imputer), forecast, ablations, targets; mean ± spread over seeds."""
    agg = res["aggregate"]
    scen = list(res["protocol"]["scenarios"])
    p = res["protocol"]
    seeds_run = {m: len([s for s in res["results"][m] if s != -1]) for m in res["results"]}
    lines = [
        "# gapcast bench accuracy (protocol)\n",
        f"{p['dataset']}; {p['eval_windows']} test windows ({len(p['stations'])} stations, stride "
        f"{p['stride_steps']} steps, at most {p['max_windows_per_station']} per station), L = {p['lookback_L']}, "
        f"H = {p['horizon_H']}. Training budget **{p['budget_per_method_and_seed_min']:g} min of "
        f"{'CPU time (one thread)' if p.get('budget_clock') == 'cpu' else 'wall clock'} per "
        f"method and seed** on this machine, seeds {p['seeds']}; PyPOTS {p['pypots_version']}; model sizes: "
        f"{p['model_sizes']}. MAE on normalised values over the hidden values, mean ± sample std over seeds "
        "(no ± : one seed, or untrained).\n",
    ]
    imputers = [m for m in agg if any(s in agg[m] for s in scen) and not m.startswith("ConFill w/o")]
    lines.append("## Imputation\n\n| method | " + " | ".join(scen) + " | seeds | training s |\n|---|"
                 + "---:|" * (len(scen) + 2))
    for m in imputers:
        lines.append(f"| {m} | " + " | ".join(_cell(agg[m].get(s)) for s in scen)
                     + f" | {seeds_run.get(m, 0) or '–'} | {agg[m]['train_s']:.0f} |")
    fc = [m for m in agg if "forecast" in agg[m] and not m.startswith("ConFill w/o")]
    lines.append(f"\n## Forecast, {p['horizon_H']} steps\n\n| method | MAE | seeds | training s |\n|---|---:|---:|---:|")
    for m in fc:
        lines.append(f"| {m} | {_cell(agg[m]['forecast'])} | {seeds_run.get(m, 0) or '–'} | {agg[m]['train_s']:.0f} |")
    abl = [m for m in agg if m.startswith("ConFill")]
    if abl:
        cols = [s for s in ("point-10%", "block-24h", "block-72h", "block-72h:station", "edge-24h:station",
                            "real-pattern", "forecast") if s in scen or s == "forecast"]
        lines.append("\n## ConFill ablations (each retrained at the same budget)\n\n| variant | " + " | ".join(cols)
                     + " |\n|---|" + "---:|" * len(cols))
        for m in abl:
            lines.append(f"| {m} | " + " | ".join(_cell(agg[m].get(s)) for s in cols) + " |")
    tg = targets(agg)
    if tg:
        lines.append("\n## Goals (a win must exceed the spread)\n\n| goal | measured (relative) | goal | met |\n"
                     "|---|---:|---:|---|")
        for t in tg:
            lines.append(f"| {t['target']} | {t['measured']:+.1%} | {t['goal']:+.0%} | {'yes' if t['met'] else 'NO'} |")
    lines.append("\n## Protocol\n\n" + p["rules"] + "\n\nScenarios: " + "; ".join(f"**{k}**: {v}"
                                                                                for k, v in p["scenarios"].items()))
    return "\n".join(lines)


def bar_chart(res: dict[str, Any], path: Path) -> Path:
    """A PNG bar chart: per scenario (and the forecast) every method's mean MAE with the seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = res["aggregate"]
    parts = [*res["protocol"]["scenarios"], "forecast"]
    methods = list(agg)
    ncols = 4
    nrows = math.ceil(len(parts) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(14, 3.6 * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[len(parts):]:
        ax.axis("off")
    for ax, part in zip(flat, parts, strict=False):
        ms = [m for m in methods if part in agg[m]]
        ax.bar(range(len(ms)), [agg[m][part]["mean"] for m in ms], yerr=[agg[m][part]["std"] for m in ms],
               color=[f"C{methods.index(m) % 10}" for m in ms], capsize=2)
        ax.set_title(part, fontsize=8)
        ax.set_xticks(range(len(ms)), [m.replace(" (paper's plain head)", "").replace(" (global attention only)", "")
                                       for m in ms], rotation=90, fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
    for row in axes:
        row[0].set_ylabel("MAE (normalised)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
