"""The one console script, ``gapcast``, with the sub-commands each part registers.

Every part has a ``cli`` module with ``register(subparsers)``; those modules import nothing heavy at module level
(torch, pandas, onnx) so that ``gapcast edge ...`` runs on a gateway that has neither torch nor pandas.
A part whose optional dependencies are missing still lists its commands; running one says which extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gapcast import GapcastError, __version__

__all__ = ["build_parser", "main"]

# Order is the order of `gapcast --help`.
_PARTS = (
    "gapcast.train.datacli",  # data fetch
    "gapcast.train.cli",  # train, evaluate
    "gapcast.export.cli",  # export, keys
    "gapcast.edge.cli",  # edge run | check | build-engine
    "gapcast.edge.schemas",  # schema [NAME]
    "gapcast.sink.cli",  # sink
    "gapcast.edge.dashboard",  # dashboard
    "gapcast.tools.replay",  # replay
    "gapcast.deploy.cli",  # fleet publish | status | promote | rollback
    "gapcast.tools.demo",  # demo
    "gapcast.bench.cli",  # bench accuracy | ett | runtime | agent
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered sub-command.

    Returns:
        The top-level parser; each sub-parser sets ``func`` (a callable taking the namespace, returning an exit code).
    """
    parser = argparse.ArgumentParser(
        prog="gapcast",
        description="Real-time gap filling and forecasting for sensor-station networks, at the edge.",
    )
    parser.add_argument("--version", action="version", version=f"gapcast {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a broken part is an error with the reason, never a silent omission
            raise GapcastError(
                f"the sub-commands of {name} could not be loaded: {type(exc).__name__}: {exc}"
                " (a part's cli module imports nothing optional at module level; this is a packaging bug)"
            ) from exc
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gapcast`` command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code: 0 on success, 1 on a gapcast error, 2 on a usage error, 130 on Ctrl-C.
    """
    try:
        parser = build_parser()
    except GapcastError as exc:
        print(f"gapcast: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    if getattr(args, "log_info", False):
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GapcastError as exc:
        print(f"gapcast: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        extra = "edge" if args.command == "edge" else "train"
        print(
            f"gapcast: error: {exc.name} is not installed; install the extra: pip install 'gapcast[{extra}]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("gapcast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
