"""``gapcast data``: where the real data is, and fetching the Beijing Multi-Site archive for users with internet."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast data fetch``, ``gapcast data inspect`` and ``gapcast data where``."""
    p = sub.add_parser(
        "data",
        help="find or download the real datasets",
        description="Data is looked up in: --data DIR, then $GAPCAST_DATA, then the user cache folder.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser(
        "fetch",
        help="download the UCI Beijing Multi-Site zip, verify it and unpack it into the cache",
        description="Downloads the UCI archive (needs internet), checks it, unpacks the station CSVs into the cache "
        "folder (or --dest). Use --zip to unpack a copy you already have.",
    )
    f.add_argument("dataset", choices=["beijing"], help="the dataset to fetch")
    f.add_argument("--dest", help="data root to unpack into (default: the user cache folder)")
    f.add_argument("--zip", dest="zip_path", help="use this local zip instead of downloading")
    f.add_argument("--sha256", help="expected sha256 of the zip")
    f.set_defaults(func=_fetch)
    i = dsub.add_parser(
        "inspect",
        help="per station: span, cadence found vs declared, missing share and longest outage per channel, mask PNG",
        description="Load a dataset spec as training would and report what an operator checks before training. "
        "Writes OUT/summary.json and OUT/observed_mask.png (stations x time).",
        epilog="examples:\n  gapcast data inspect --dataset my-city.toml --out inspect/\n"
        "  gapcast data inspect --dataset beijing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--dataset", required=True, help="a dataset spec (SPEC.toml) or a preset (beijing, etth1, etth2)")
    i.add_argument("--data", help="data root for {data} in the spec (default: $GAPCAST_DATA, then the cache)")
    i.add_argument("--out", default="inspect", help="folder for summary.json and observed_mask.png (default inspect/)")
    i.set_defaults(func=_inspect)
    w = dsub.add_parser("where", help="print the data root that would be used and what it holds")
    w.add_argument("--data", help="data root (default: $GAPCAST_DATA, then the cache)")
    w.set_defaults(func=_where)


def _fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gapcast.train.data import fetch_beijing, list_beijing_stations

    out = fetch_beijing(
        Path(args.dest) if args.dest else None,
        zip_path=Path(args.zip_path) if args.zip_path else None,
        sha256=args.sha256,
    )
    print(f"Beijing Multi-Site: {len(list_beijing_stations(out))} stations in {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from gapcast.train.inspection import inspect_dataset, mask_plot, summary_table
    from gapcast.train.loader import LoadReport, load_dataset
    from gapcast.train.spec import load_spec

    spec = load_spec(args.dataset)
    report = LoadReport()
    series = load_dataset(spec, args.data, report=report)
    rows = inspect_dataset(spec, series)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = mask_plot(spec, series, out / "observed_mask.png")
    (out / "summary.json").write_text(json.dumps({"dataset": spec.name, "cadence": spec.cadence,
                                                  "timezone": spec.timezone, "load": dataclasses.asdict(report),
                                                  "stations": [dataclasses.asdict(r) for r in rows]}, indent=2))
    print(summary_table(spec, rows))
    print(f"\nread {report.files} files, {report.rows} rows; duplicates {report.duplicates}, off-grid {report.off_grid}, "
          f"out of range {report.out_of_range}, not numbers {report.unparseable_values}, rows of other channels "
          f"{report.unknown_channel_rows}, local times dropped at DST changes {report.nonexistent_local}")
    print(f"wrote {out / 'summary.json'}, {png}")
    return 0


def _where(args: argparse.Namespace) -> int:
    from gapcast.train.data import beijing_dir, list_beijing_stations, resolve_data_dir

    root = resolve_data_dir(args.data)
    print(f"data root: {root}")
    print(f"beijing-multisite: {', '.join(list_beijing_stations(beijing_dir(root)))}")
    ett = root / "ett"
    print(f"ett: {', '.join(sorted(p.stem for p in ett.glob('ETTh*.csv'))) if ett.is_dir() else 'absent'}")
    return 0
