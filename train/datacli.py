"""``gapcast data``: where the real data is, and fetching the Beijing Multi-Site archive for users with internet."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``gapcast data fetch`` and ``gapcast data where``."""
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


def _where(args: argparse.Namespace) -> int:
    from gapcast.train.data import beijing_dir, list_beijing_stations, resolve_data_dir

    root = resolve_data_dir(args.data)
    print(f"data root: {root}")
    print(f"beijing-multisite: {', '.join(list_beijing_stations(beijing_dir(root)))}")
    ett = root / "ett"
    print(f"ett: {', '.join(sorted(p.stem for p in ett.glob('ETTh*.csv'))) if ett.is_dir() else 'absent'}")
    return 0
