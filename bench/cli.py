"""``gapcast bench accuracy | ett | runtime | agent``: run a benchmark, print its tables, save JSON and Markdown.

Nothing heavy is imported at module level (torch, pandas, onnx): each handler imports what it needs. Every command
has defaults that measure the real thing and ``--quick`` for a short run; whatever was trimmed is written into the
output next to the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from gapcast.timefmt import now_rfc3339

__all__ = ["format_table", "register"]

DEFAULT_OUT = "bench-out"
DEFAULT_BUNDLE = "demo-out/bundle"  # the bundle `make demo` exports


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get 4 significant decimals, None shows as ``n/a``."""

    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            if not math.isfinite(v):
                return "n/a"
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        verdict = "met" if t["met"] else "MISSED"
        margin = t.get("margin_text") or (f"{t['margin']:+.4g}" if t.get("margin") is not None else "")
        rows.append([t["target"], t["measured"], t["goal"], verdict, margin])
    return format_table(["target", "measured", "goal", "verdict", "margin (+ = to spare)"], rows)


def _save(out: Path, name: str, result: dict[str, Any], markdown: str, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {**result, "command": command, "finished": now_rfc3339()}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=_json_default))
    (out / f"{name}.md").write_text(f"<!-- {command} -->\n\n" + markdown + "\n")
    print(f"\nsaved {out / (name + '.json')} and {out / (name + '.md')}")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _command(argv_name: str, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> str:
    parts = ["gapcast", "bench", argv_name]
    for k, v in sorted(vars(args).items()):
        if k in ("func", "command", "bench_command", "verbose", "log_info", *skip) or v in (None, False):
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------- accuracy


def _accuracy_protocol(args: argparse.Namespace) -> int:
    """The equal-footing protocol (issue 19): every method trained here at the same budget, several seeds."""
    from gapcast.bench.protocol import ProtocolOptions, bar_chart, protocol_markdown, run_protocol

    seeds = tuple(int(x) for x in str(args.seeds).split(",") if x.strip())
    budget = args.budget_min
    if args.quick:
        budget = budget if budget is not None else 0.04
        seeds = seeds if args.seeds != "0,1,2" else (0,)
        args.max_windows = args.max_windows or 3
    opts = ProtocolOptions(budget_min=budget if budget is not None else 10.0, seeds=seeds,
                           methods=tuple(args.methods.split(",")) if args.methods else None, stride=args.stride,
                           max_windows=args.max_windows, mask_seed=args.seed,
                           max_stations=2 if args.quick else None,
                           threads=args.threads, quick=args.quick, pypots_chunk=64 if args.quick else 512,
                           holdout=tuple(x for x in (args.holdout or "").split(",") if x),
                           budget_clock=args.budget_clock)
    out = Path(args.out) / "accuracy-protocol"
    res = run_protocol(dataset=args.dataset, data=args.data, out=out, options=opts, resume=args.resume,
                       report_only=args.report_only)
    text = protocol_markdown(res)
    print(text)
    png = bar_chart(res, out / "accuracy.png")
    res["chart"] = str(png)
    _save(out, "accuracy", res, text + "\n\n![MAE per scenario, mean and seed spread](accuracy.png)\n",
          _command("accuracy", args))
    return 0


def _accuracy(args: argparse.Namespace) -> int:
    """``gapcast bench accuracy``: the protocol without --run / --bundle, else that model against the baselines.
    Returns 1 when a method asked for could not run (the tables are still saved)."""
    if args.run is None and args.bundle is None:
        return _accuracy_protocol(args)
    from gapcast.bench.accuracy import run_accuracy

    opts, trimmed, run_dir, bundle = _accuracy_options(args)
    if run_dir is None and bundle is None:
        print("note: neither --run nor --bundle: ConFill is not scored, baselines only")
    res = run_accuracy(run_dir=run_dir, bundle_path=bundle, data=args.data, options=opts, progress=True,
                       dataset=args.dataset)
    res["trimmed"] = trimmed
    text, errors = _accuracy_markdown(res, trimmed)
    print(text)
    _save(Path(args.out), "accuracy", res, text, _command("accuracy", args))
    if errors:  # a method that was asked for and could not run fails the command (the tables are still saved)
        print(f"gapcast bench accuracy: {len(errors)} method(s) not run: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


def _accuracy_options(args: argparse.Namespace):
    """The :class:`AccuracyOptions` of the command line (``--quick`` trims, stated), what was trimmed, the run
    folder (default: the run the bundle's card records, when its checkpoint is there) and the bundle (None when
    --bundle does not exist).

    Raises:
        json.JSONDecodeError: the bundle's ``card.json`` is not JSON.
    """
    from gapcast.bench.accuracy import AccuracyOptions

    trimmed = []
    if args.quick:
        args.max_windows = args.max_windows or 8
        args.baseline_budget_min = args.baseline_budget_min or 0.5
        args.pypots_train_windows = args.pypots_train_windows or 512
        args.dlinear_epochs = min(args.dlinear_epochs, 2)
        args.dlinear_stride = max(args.dlinear_stride, 48)
    if args.max_windows:
        trimmed.append(f"at most {args.max_windows} test windows per station")
    if args.baseline_budget_min is not None:
        trimmed.append(f"SAITS/BRITS budget set to {args.baseline_budget_min:g} min each")
    if args.pypots_train_windows:
        trimmed.append(f"SAITS/BRITS trained on {args.pypots_train_windows} windows")
    run_dir = args.run
    bundle = args.bundle if args.bundle and Path(args.bundle).exists() else None
    if run_dir is None and bundle is not None:
        # The run the bundle was exported from, as its card records it.
        card = json.loads((Path(bundle) / "card.json").read_text()) if Path(bundle).is_dir() else {}
        rec = (card.get("export") or {}).get("run") or {}
        if rec.get("dir") and (Path(rec["dir"]) / "best.pt").is_file():
            run_dir = rec["dir"]
            print(f"note: scoring ConFill fp32 (torch) from the run recorded in the bundle's card: {run_dir}")
    opts = AccuracyOptions(
        stride=args.stride, max_windows=args.max_windows, seed=args.seed,
        baseline_budget_s=args.baseline_budget_min * 60 if args.baseline_budget_min is not None else None,
        pypots_max_epochs=args.pypots_max_epochs, pypots_train_windows=args.pypots_train_windows,
        dlinear_epochs=args.dlinear_epochs, dlinear_stride=args.dlinear_stride,
        methods=tuple(args.methods.split(",")) if args.methods else None, threads=args.threads,
        models_dir=str(Path(args.out) / "models") if args.reuse_baselines else None,
        network_trials=60 if args.quick else 540,
    )
    return opts, trimmed, run_dir, bundle


def _accuracy_markdown(res: dict[str, Any], trimmed: list[str]) -> tuple[str, dict[str, str]]:
    """The checkpoint mode's report: MAE / RMSE / MRE tables, times, per-channel MAE, targets and the network
    tables; and the methods that could not run (name -> why). Raises nothing."""
    from gapcast.bench.accuracy import SCENARIOS, method_order

    methods = res["methods"]
    order = [m for m in method_order(list(methods)) if "scores" in methods[m]]
    md = [f"# gapcast bench accuracy\n\n{res['protocol']['eval_windows']} test windows "
          f"({len(res['protocol']['stations'])} stations, stride {res['protocol']['stride_steps']} h), L = "
          f"{res['protocol']['lookback_L']}, H = {res['protocol']['horizon_H']}, seed {res['protocol']['seed']}. "
          f"{res['protocol']['baseline_budget_rule']}."
          + (f" Trimmed: {'; '.join(trimmed)}." if trimmed else "")]
    parts = (*SCENARIOS, "forecast")
    for metric in ("mae", "rmse", "mre"):
        rows = []
        for m in order:
            sc = methods[m]["scores"]
            rows.append([m, *[sc.get(p, {}).get("all_norm", {}).get(metric) for p in parts]])
        md.append(f"\n## {metric.upper()}, normalised units, over the hidden values (forecast: observed targets)\n\n"
                  + format_table(["method", *parts[:-1], "forecast 24 h"], rows))
    rows = [[m, methods[m].get("train_s"), methods[m].get("score_s"), methods[m].get("note", "")] for m in order]
    md.append("\n## Training and scoring time (s, this machine)\n\n"
              + format_table(["method", "training s", "scoring s (all scenarios)", "note"], rows))
    groups = res["protocol"].get("groups") or {}
    pol = next(iter(groups.values()), [])
    for part, title in (("block-72h", "block-72h imputation"), ("forecast", "24 h forecast")):
        rows = []
        for m in order:
            pc = methods[m]["scores"].get(part, {}).get("per_channel")
            if pc:
                rows.append([m, *[pc.get(c, {}).get("mae") for c in pol]])
        if rows:
            md.append(f"\n## Per channel: {title} MAE in original units (ug/m3; CO in ug/m3)\n\n"
                      + format_table(["method", *pol], rows))
    errors = {m: v["error"] for m, v in methods.items() if "error" in v}
    if errors:
        md.append("\nNot run: " + "; ".join(f"{m}: {e}" for m, e in errors.items()))
    md.append("\n## Targets\n\n" + _targets_table(res["targets"]))
    if res.get("network") and "skipped" not in res["network"]:
        from gapcast.train.network_eval import network_markdown

        md.append(network_markdown(res["network"]))
    return "\n".join(md), errors


# ------------------------------------------------------------------------------------------------------------ ett


def _ett(args: argparse.Namespace) -> int:
    from gapcast.bench.ett import ETT_HORIZONS, PUBLISHED_SOURCES, run_ett

    datasets = args.datasets.split(",")
    horizons = [int(h) for h in args.horizons.split(",")] if args.horizons else list(ETT_HORIZONS)
    trimmed = []
    if args.quick:
        datasets = datasets[:1]
        horizons = horizons[:1]
        args.confill_budget_min = min(args.confill_budget_min, 0.5)
        args.dlinear_epochs = min(args.dlinear_epochs, 2)
    if datasets != ["ETTh1", "ETTh2"] or horizons != list(ETT_HORIZONS):
        trimmed.append(f"datasets {datasets}, horizons {horizons}")
    res = run_ett(data=args.data, datasets=datasets, horizons=horizons, confill_budget_s=args.confill_budget_min * 60,
                  dlinear_epochs=args.dlinear_epochs, run_confill=not args.no_confill, seed=args.seed,
                  threads=args.threads)
    res["trimmed"] = trimmed
    pub_models = list(PUBLISHED_SOURCES)
    headers = ["dataset", "H", "ConFill (ours)", "DLinear (ours)", *pub_models]
    rows_mse, rows_mae = [], []
    for r in res["rows"]:
        ours = [r.get("ConFill (ours)"), r.get("DLinear (ours)")]
        rows_mse.append([r["dataset"], r["horizon"], *[o["mse"] if o else None for o in ours],
                         *[r["published"][m]["mse"] for m in pub_models]])
        rows_mae.append([r["dataset"], r["horizon"], *[o["mae"] if o else None for o in ours],
                         *[r["published"][m]["mae"] for m in pub_models]])
    tr = res["training"]["ConFill"]
    md = [f"# gapcast bench ett\n\n{res['protocol']}\n\nBudget: {args.confill_budget_min:g} min of wall clock per "
          "(dataset, horizon) for ConFill and for DLinear alike (DLinear's own schedule may end it first). ConFill: "
          f"trained on this machine's CPU, {tr['threads']} torch threads ({tr['loss']}); DLinear: the paper's settings, trained here. "
          "The last three published columns use a longer input (336 or 512), shown for reference only."
          + (f" Trimmed: {'; '.join(trimmed)}." if trimmed else ""),
          "\n## MSE (normalised)\n\n" + format_table(headers, rows_mse),
          "\n## MAE (normalised)\n\n" + format_table(headers, rows_mae)]
    rows = []
    for r in res["rows"]:
        c, d = r.get("ConFill (ours)") or {}, r.get("DLinear (ours)") or {}
        rows.append([r["dataset"], r["horizon"], r["windows"]["test"], r.get("budget_s"), c.get("train_s"),
                     c.get("steps"), d.get("train_s"), d.get("epochs"), d.get("stopped")])
    md.append("\n## Training (this machine; the same budget per horizon for both)\n\n" + format_table(
        ["dataset", "H", "test windows", "budget s", "ConFill s", "ConFill steps", "DLinear s", "DLinear epochs",
         "DLinear stop"], rows))
    md.append("\n## Sources of the published figures\n\n" + "\n".join(f"- {m}: {s}" for m, s in
                                                                         PUBLISHED_SOURCES.items()))
    text = "\n".join(md)
    print(text)
    _save(Path(args.out), "ett", res, text, _command("ett", args))
    return 0


# -------------------------------------------------------------------------------------------------------- runtime


def _bundle_or_tiny(args: argparse.Namespace, out: Path) -> tuple[Path, str | None, str]:
    """The bundle to measure: --bundle, else the default release path, else a tiny bundle built now."""
    if args.bundle and Path(args.bundle).exists():
        return Path(args.bundle), args.pubkey, f"bundle {args.bundle}"
    from gapcast.export.keys import generate_keypair
    from gapcast.tools.tinybundle import build_tiny_bundle

    where = out / "tiny-bundle"
    kp = generate_keypair(out / "tiny-keys", overwrite=True)
    build_tiny_bundle(where, sign_key=kp.private, data_root=args.data, overwrite=True)
    note = (f"no bundle at {args.bundle}: a TINY untrained bundle (tools/tinybundle.py, d_model 16) was built at "
            f"{where}; its figures do not describe the real model")
    print("note: " + note)
    return where, kp.public_hex, note


def _runtime(args: argparse.Namespace) -> int:
    from gapcast.bench.runtime import RuntimeOptions, run_runtime

    out = Path(args.out)
    batches = tuple(int(b) for b in args.batches.split(","))
    min_time = args.min_time_s
    if args.quick:
        batches = tuple(b for b in batches if b <= 16) or (1,)
        min_time = min(min_time, 0.3)
    bundle, key, note = _bundle_or_tiny(args, out)
    opts = RuntimeOptions(batches=batches, threads=args.threads, min_time_s=min_time)
    res = run_runtime(bundle, run_dir=args.run, trusted_keys=[key] if key else None, data=args.data, options=opts,
                      dataset=args.dataset)
    res["bundle_note"] = note
    md = [f"# gapcast bench runtime\n\n{res['cpu']}, {args.threads} threads; inputs: {res['inputs']}; model "
          f"{res['model']['name']} v{res['model']['version']} (L {res['model']['L']}, H {res['model']['H']}, "
          f"C {res['model']['C']}). {note}."]
    rows = []
    for label, e in res["engines"].items():
        if "error" in e:
            rows.append([label, "error: " + e["error"], *[""] * (2 * len(batches) + 2)])
            continue
        pb = e["per_batch"]
        rows.append([label, *[pb[str(b)]["window_ms"] for b in batches],
                     *[pb[str(b)]["windows_per_s"] for b in batches],
                     round(e["file_bytes"] / 2**20, 2), round(e["peak_rss_mb"], 1)])
    md.append("\n## Latency per window (ms) and throughput (windows/s) by batch size\n\n" + format_table(
        ["engine", *[f"ms/window B={b}" for b in batches], *[f"win/s B={b}" for b in batches], "file MiB",
         "peak RSS MiB"], rows))
    ratio_rows = [[label, *[r.get(str(b)) for b in batches]] for label, r in res["int8_over_fp32_throughput"].items()]
    if ratio_rows:
        md.append("\n## int8 / fp32 throughput (onnxruntime CPU)\n\n"
                  + format_table(["variant", *[f"B={b}" for b in batches]], ratio_rows))
    if res["excluded_variants"]:
        md.append("\nVariants left out by the export: "
                  + "; ".join(f"{k}: {v}" for k, v in res["excluded_variants"].items()))
    md.append("\n## Targets\n\n" + (_targets_table(res["targets"]) if res["targets"] else
                                      "no int8 variant measured at batch 64: target not evaluated"))
    text = "\n".join(md)
    print(text)
    _save(out, "runtime", res, text, _command("runtime", args))
    return 0


# ---------------------------------------------------------------------------------------------------------- agent


def _agent(args: argparse.Namespace) -> int:
    from gapcast.bench.agent import STAGES, AgentBenchOptions, run_agent_bench

    out = Path(args.out)
    stations = tuple(int(s) for s in args.stations.split(","))
    readings, steps, ceiling_s = args.steps_readings, args.latency_steps, 3.0
    at = args.at_stations
    if args.quick:  # CI / a quick look: two small counts, short streams
        stations = (50, 100)
        readings, steps, ceiling_s = min(readings, 400), 1, 1.0
        at = max(stations)
    if at not in stations:
        at = min(stations, key=lambda s: abs(s - at))
    bundle, key, note = _bundle_or_tiny(args, out)
    opts = AgentBenchOptions(stations=stations, steps_readings=readings, latency_steps=steps, threads=args.threads,
                             max_batch=args.max_batch, ingest_stations=at, latency_stations=at, profile_stations=at,
                             variant=args.variant, ceiling_s=ceiling_s)
    res = run_agent_bench(bundle, trusted_key=key, data=args.data, options=opts, workdir=out / "agent-work",
                          dataset=args.dataset, bundle_note=note)
    c = res["backend_ceiling"]
    md = [f"# gapcast bench agent\n\n{note}. Private Mosquitto on loopback; {os.cpu_count()} CPUs shared by the broker, "
          f"the publisher, the subscribers and the agent; onnxruntime {c['variant']}, {args.threads} threads, "
          f"max batch {args.max_batch}; outbox SQLite synchronous FULL (the default), acks after store.",
          f"\n## 1. Backend ceiling\n\n{c['windows_per_s']:,.0f} windows/s at batch {c['batch']} "
          f"({c['batch_ms']:.1f} ms per batch; one batch of 1,000 windows {c['batch_1000_ms']:.0f} ms), {c['windows']}."]
    rows = []
    for r in res["results"]:
        if "error" in r:
            rows.append([r["stations"], "error: " + r["error"], "", "", ""])
            continue
        t = r["throughput"]
        rows.append([r["stations"], t["station_steps"], t["steps_per_s"], t["steps_per_s"] / c["windows_per_s"],
                     r.get("rss_peak_mib")])
    md.append("\n## 2. Step throughput and 5. memory\n\n" + format_table(
        ["stations", "station-steps", "steps/s", "/ ceiling", "peak RSS MiB"], rows))
    if res.get("rss_mib_per_1000_stations") is not None:
        md.append(f"\nRSS slope {res['rss_mib_per_1000_stations']:.1f} MiB per 1,000 stations (least squares over the counts).")
    if res.get("snapshot_write_s") is not None:
        md.append(f"Window snapshot at {res['snapshot_stations']:,} stations: {res['snapshot_write_s'] * 1e3:.0f} ms, "
                  f"{res['snapshot_bytes'] / 2**20:.1f} MiB.")
    if res.get("ingest_ratio") is not None:
        md.append(f"\n## 3. Ingest without inference ({res['ingest_stations']:,} stations, one channel per message)\n\n"
                  f"agent {res['ingest_agent_per_s']:,.0f} msg/s, raw paho {res['ingest_raw_per_s']:,.0f} msg/s: "
                  f"ratio {res['ingest_ratio']:.2f}.")
    if res.get("latency_p99_ms") is not None:
        md.append(f"\n## 4. Latency ({res['latency_stations']:,} stations at the top of the hour)\n\n"
                  f"p50 {res['latency_p50_ms']:.0f} ms, p99 {res['latency_p99_ms']:.0f} ms; the backend's batch of "
                  f"1,000: {res['backend_batch_1000_ms']:.0f} ms.")
    if res.get("cpu_s_per_1000_steps"):
        cpu = res["cpu_s_per_1000_steps"]
        md.append(f"\n## 6. CPU seconds per 1,000 station-steps ({res['cpu_profile_stations']:,} stations, "
                  f"{res['cpu_profile_steps']:,} steps profiled)\n\n" + format_table(
                      [*STAGES, "total"], [[cpu[k] for k in (*STAGES, "total")]]))
    md.append("\n## Targets\n\n" + _targets_table(res["targets"]))
    text = "\n".join(md)
    print(text)
    _save(out, "agent", res, text, _command("agent", args))
    return 0


def _sink(args: argparse.Namespace) -> int:
    from gapcast.bench.sink import run_sink_bench

    stations, steps, paced_s = (100, 5, 20.0) if args.quick else (args.stations, args.steps, args.paced_s)
    res = run_sink_bench(stations=stations, steps=steps, validate=not args.no_validate, paced_s=paced_s)
    rss, pc = res["rss_mb"], res["paced"]
    text = "# gapcast sink\n\n" + format_table(
        ["stations", "steps", "messages", "validate", "ceiling msg/s", "needed (1,000 st. @ 10 s)", "stations @ 10 s",
         "sink CPU ms/msg", "RSS MiB start / 1st quarter / end"],
        [[stations, steps, res["messages"], res["validate"], res["ceiling_msg_per_s"], res["needed_msg_per_s"],
          res["stations_at_10s"], res["sink_cpu_per_msg_ms"],
          f"{rss['start']} / {rss['first_quarter_max']} / {rss['end']}"]],
    )
    if pc:
        text += "\n\n## Paced: a step of every station every 10 s\n\n" + format_table(
            ["msg/s", "seconds", "messages", "stored", "lag after the last (s)", "RSS MiB 1st quarter", "last quarter",
             "max"],
            [[pc["rate_msg_per_s"], pc["seconds"], pc["messages"], pc["stored"], pc["lag_after_last_s"],
              pc["rss_mb_first_quarter_mean"], pc["rss_mb_last_quarter_mean"], pc["rss_mb_max"]]],
        )
    print(text)
    _save(Path(args.out), "sink", res, text, _command("sink", args))
    return 0 if res["complete"] and (not pc or pc["stored"] == pc["messages"]) else 1


# ------------------------------------------------------------------------------------------------------- register


def _common(sp: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: --out, --data, --dataset, --quick, --threads."""
    sp.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT}/)")
    sp.add_argument("--data", help="data root (default: $GAPCAST_DATA, then the cache)")
    sp.add_argument("--dataset", help="dataset spec (SPEC.toml) or preset (default: the run's / bundle's own "
                    "dataset, else beijing)")
    sp.add_argument("--quick", action="store_true", help="a short run (trimmed sizes, stated in the output)")
    sp.add_argument("--threads", type=int, default=2, help="CPU threads for torch / onnxruntime (default 2)")
    sp.set_defaults(log_info=False)


def _add_accuracy(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast bench accuracy`` (the protocol, or a trained model against the baselines)."""
    a = sub.add_parser(
        "accuracy", help="the accuracy protocol: ConFill, ablations, PyPOTS, forecasters, equal budgets, seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Without --run / --bundle: the equal-footing protocol (gapcast.bench.protocol): every learned "
        "method trained here on the same windows and outage generator for the same wall-clock budget, per seed; "
        "results saved per method and seed under OUT/accuracy-protocol/ (--resume continues). With --run or "
        "--bundle: score that trained ConFill (and its bundle's variants) against the baselines.",
        epilog="examples:\n"
        "  gapcast bench accuracy --dataset beijing --budget-min 10 --seeds 0,1,2\n"
        "  gapcast bench accuracy --budget-min 2 --max-windows 60 --resume      # continue an interrupted run\n"
        "  gapcast bench accuracy --methods ConFill,SAITS,linear --seeds 0\n"
        "  gapcast bench accuracy --budget-min 5 --budget-clock cpu --threads 1 --resume   # on a shared machine\n"
        "  gapcast bench accuracy --quick                                       # CI smoke run, tiny sizes\n"
        f"  gapcast bench accuracy --run runs/beijing --bundle {DEFAULT_BUNDLE}   # score a trained model")
    _common(a)
    a.add_argument("--budget-min", type=float, help="protocol: training budget per method and seed, minutes "
                   "(default 10)")
    a.add_argument("--budget-clock", choices=("wall", "cpu"), default="wall",
                   help="protocol: what the budget counts: wall-clock seconds (default) or the process's CPU seconds "
                   "(fair on a machine shared with other work; with --threads 1 one CPU minute = one idle core-minute)")
    a.add_argument("--seeds", default="0,1,2", help="protocol: comma-separated training seeds (default 0,1,2)")
    a.add_argument("--resume", action="store_true", help="protocol: keep finished method/seed results in OUT")
    a.add_argument("--report-only", action="store_true",
                   help="protocol: train nothing, tabulate the results saved in OUT (same options as the run)")
    a.add_argument("--holdout", help="protocol: comma-separated stations left out of training and scored alone "
                   "(use another --out)")
    a.add_argument("--run", help="ConFill training run folder (best.pt) to score (checkpoint mode)")
    a.add_argument("--bundle", help=f"bundle whose variants are scored (checkpoint mode; e.g. {DEFAULT_BUNDLE})")
    a.add_argument("--stride", type=int, default=24, help="steps between test windows (default 24)")
    a.add_argument("--max-windows", type=int, help="at most this many test windows per station")
    a.add_argument("--seed", type=int, default=0, help="seed of the masks and the trained baselines")
    a.add_argument("--baseline-budget-min", type=float,
                   help="SAITS / BRITS wall-clock budget each (default: ConFill's recorded training time)")
    a.add_argument("--pypots-max-epochs", type=int, default=100, help="SAITS / BRITS epoch cap (default 100)")
    a.add_argument("--pypots-train-windows", type=int, help="SAITS / BRITS training windows (default: all)")
    a.add_argument("--dlinear-epochs", type=int, default=10, help="DLinear epoch cap (default 10)")
    a.add_argument("--dlinear-stride", type=int, default=4, help="DLinear training-window stride (default 4)")
    a.add_argument("--methods", help="comma-separated method name prefixes to run (default: all); a trailing $ means that name "
                   "exactly ('ConFill$' leaves out the ablations)")
    a.add_argument("--reuse-baselines", action="store_true",
                   help="save SAITS / BRITS under OUT/models and reuse them when the config matches")
    a.set_defaults(func=_accuracy)


def _add_ett(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast bench ett``."""
    e = sub.add_parser("ett", help="ETTh1/ETTh2 long-horizon forecasting vs DLinear and published figures")
    _common(e)
    e.add_argument("--datasets", default="ETTh1,ETTh2", help="comma-separated (default ETTh1,ETTh2)")
    e.add_argument("--horizons", help="comma-separated (default 96,192,336,720)")
    e.add_argument("--budget-min", "--confill-budget-min", dest="confill_budget_min", type=float, default=3.0,
                   help="training budget per (dataset, horizon) of ConFill and of DLinear alike, minutes (default 3)")
    e.add_argument("--dlinear-epochs", type=int, default=10, help="DLinear epoch cap (default 10, as the paper)")
    e.add_argument("--no-confill", action="store_true", help="DLinear and the published figures only")
    e.add_argument("--seed", type=int, default=0, help="training seed")
    e.set_defaults(func=_ett)


def _add_runtime(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast bench runtime``."""
    r = sub.add_parser("runtime", help="latency, throughput, size and memory: torch vs onnxruntime fp32 / int8")
    _common(r)
    r.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"bundle (default {DEFAULT_BUNDLE}; a tiny one if absent)")
    r.add_argument("--pubkey", help="trusted public key of the bundle (default: the card's own key)")
    r.add_argument("--run", help="training run for torch eager (default: the run recorded in the card)")
    r.add_argument("--batches", default="1,16,64,256", help="batch sizes (default 1,16,64,256)")
    r.add_argument("--min-time-s", type=float, default=3.0, help="seconds measured per engine and batch (default 3)")
    r.set_defaults(func=_runtime)


def _add_agent(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast bench agent``."""
    g = sub.add_parser("agent", help="the agent vs its backend: step throughput, ingest, latency, RSS, CPU split",
                       description="Issue 17's six figures in one run (see gapcast.bench.agent): backend ceiling, "
                       "step throughput at each station count as a ratio to it, ingest without inference vs raw paho, "
                       "p50/p99 latency, peak RSS and its slope, the CPU split per 1,000 station-steps.",
                       epilog="examples:\n  gapcast bench agent --bundle demo-out/bundle\n"
                       "  gapcast bench agent --quick   # CI: 2 small counts, short streams, a tiny bundle if none",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(g)
    g.add_argument("--bundle", default=DEFAULT_BUNDLE, help=f"bundle (default {DEFAULT_BUNDLE}; a tiny one if absent)")
    g.add_argument("--pubkey", help="trusted public key (default: the card's own key)")
    g.add_argument("--stations", default="100,1000,10000", help="station counts (default 100,1000,10000)")
    g.add_argument("--steps-readings", type=int, default=20000,
                   help="whole-step readings in the throughput stream per count (default 20000; >= 2 steps)")
    g.add_argument("--at-stations", type=int, default=1000,
                   help="station count of the ingest, latency and CPU-profile figures (default 1000)")
    g.add_argument("--latency-steps", type=int, default=3, help="paced steps for the latency figures (default 3)")
    g.add_argument("--max-batch", type=int, default=64, help="the agent's model.max_batch (default 64, its default)")
    g.add_argument("--variant", default="auto", help="onnxruntime variant (default auto: timed once, then pinned)")
    g.set_defaults(func=_agent)


def _add_sink(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast bench sink``."""
    k = sub.add_parser("sink", help="gapcast sink: messages stored per second and its memory (private Mosquitto)")
    _common(k)
    k.add_argument("--stations", type=int, default=1000, help="stations in the stream (default 1000)")
    k.add_argument("--steps", type=int, default=20, help="steps per station (default 20: 40,000 messages)")
    k.add_argument("--paced-s", type=float, default=120.0,
                   help="then this long at a step of every station every 10 s, for the memory figure (default 120)")
    k.add_argument("--no-validate", action="store_true", help="run the sink without the schema check")
    k.set_defaults(func=_sink)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gapcast bench`` and its sub-commands."""
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: accuracy, ETT, runtime, agent (print tables, save JSON)",
        description="Benchmarks print tables and save JSON + Markdown under --out. They are never tests.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    _add_accuracy(sub)
    _add_ett(sub)
    _add_runtime(sub)
    _add_agent(sub)
    _add_sink(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
