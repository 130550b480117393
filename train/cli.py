"""``gapcast train`` and ``gapcast evaluate``.

Nothing heavy is imported at module level (torch, pandas): the handlers import what they need.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["RUN_FILES", "prepare_run_dir", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` and ``evaluate`` sub-commands."""
    p = subparsers.add_parser(
        "train",
        help="train ConFill on a dataset's training range",
        description="Train ConFill (masked imputation + reconstruction + forecast + contrastive losses) on the "
        "training range of a dataset spec (channels, groups, cadence, time zone and split come from the spec; the "
        "--config holds only model and optimisation choices). "
        "Launch with torchrun to train with DistributedDataParallel; the command stays the same.",
        epilog="examples:\n  gapcast train --dataset beijing --out runs/beijing --time-budget-min 40 --threads 1\n"
        "  gapcast train --dataset my-city.toml --out runs/my-city --max-steps 2000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="beijing",
                   help="a dataset spec (SPEC.toml) or a preset: beijing, etth1, etth2 (default beijing)")
    p.add_argument("--data", help="data root for {data} in the spec (default: $GAPCAST_DATA, then the cache)")
    p.add_argument("--config", help="TOML training config (default: the packaged beijing.toml, any network)")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, config.toml, normalization.json")
    p.add_argument("--max-steps", type=int, help="override optim.max_steps")
    p.add_argument("--time-budget-min", type=float, help="stop after this many minutes (checkpoints are written)")
    p.add_argument("--seed", type=int, help="override optim.seed")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="RUN_DIR already holds a run: delete its checkpoints, history, metrics and plots; start over")
    p.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune: start from this checkpoint's weights (same [model] config), fresh optimiser")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train, log_info=True)

    e = subparsers.add_parser(
        "evaluate",
        help="score a run on the test range against LOCF, linear interpolation and seasonal naive",
        description="Run the evaluation protocol on the dataset's test range (point-10%, blocks of 6 h / 24 h / 72 h "
        "over each outage group and the whole station, real pattern, forecast over the horizon) and write "
        "RUN_DIR/metrics.json, metrics.md and PNG plots (the first channel of each group).",
        epilog="examples:\n  gapcast evaluate runs/beijing\n  gapcast evaluate runs/my-city --dataset my-city.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("run_dir", help="a training run folder (holds best.pt)")
    e.add_argument("--dataset", help="dataset spec or preset (default: the spec the run was trained on)")
    e.add_argument("--data", help="data root for {data} in the spec")
    e.add_argument("--stations", nargs="+", help="stations to score (default: all)")
    e.add_argument("--max-windows", type=_positive_int, help="at most this many test windows per station")
    e.add_argument("--stride", default="1d", help="duration between test window starts (default 1d)")
    e.add_argument("--seed", type=int, default=0, help="seed of the scenario masks")
    e.add_argument("--checkpoint", default="best.pt", help="checkpoint file in RUN_DIR (default best.pt)")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    e.set_defaults(func=_evaluate, log_info=True)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


#: What a run folder holds from an earlier run: ``--overwrite`` deletes these (the plots are evaluate's PNGs).
RUN_FILES = ("best.pt", "last.pt", "history.jsonl", "metrics.json", "metrics.md")


def prepare_run_dir(
    out: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    rank: int = 0,
    init_from: str | os.PathLike | None = None,
) -> list[str]:
    """Refuse to train into a folder that already holds a run, unless asked to continue it or start over.

    Args:
        out: the run folder (``--out``); it need not exist.
        resume: ``--resume``: the run is continued, nothing is checked or deleted.
        overwrite: ``--overwrite``: the earlier run's :data:`RUN_FILES` and ``plot_*.png`` are deleted (rank 0 only;
            the other ranks of a torchrun launch leave the folder to it).
        rank: this process's rank (``$RANK``).
        init_from: ``--init-from``: with ``overwrite``, it must not be one of the files about to be deleted.

    Returns:
        The names of the files deleted (sorted).

    Raises:
        TrainError: ``out`` holds ``best.pt`` or ``last.pt`` and neither ``resume`` nor ``overwrite`` is set,
            ``out`` is a file, or ``overwrite`` would delete the ``init_from`` checkpoint.
    """
    from pathlib import Path

    from gapcast.train import TrainError

    run = Path(out)
    if resume:
        return []
    if run.exists() and not run.is_dir():
        msg = f"--out {run} is a file, not a run folder"
        raise TrainError(msg)
    if not overwrite:
        if any((run / n).exists() for n in ("best.pt", "last.pt")):
            msg = f"{run} already holds a run (best.pt/last.pt): pass --resume to continue it or --overwrite to start over"
            raise TrainError(msg)
        return []
    if init_from is not None and run.is_dir():
        src = Path(init_from).resolve()
        if src.parent == run.resolve() and src.name in RUN_FILES:
            msg = f"--init-from {init_from} is in {run}, which --overwrite clears: copy it out of the folder first"
            raise TrainError(msg)
    if rank != 0 or not run.is_dir():
        return []
    old = [run / n for n in RUN_FILES if (run / n).is_file()] + sorted(run.glob("plot_*.png"))
    for f in old:
        f.unlink()
    return sorted(f.name for f in old)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    removed = prepare_run_dir(
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        rank=int(os.environ.get("RANK", "0") or 0),
        init_from=args.init_from,
    )
    if removed:
        print(f"--overwrite: deleted {', '.join(removed)} of the earlier run in {args.out}")

    import torch

    from gapcast.train.config import load_config
    from gapcast.train.spec import load_spec
    from gapcast.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(args.dataset)
    cfg = load_config(args.config, spec)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, seed=args.seed))
    result = train(
        cfg,
        out_dir=args.out,
        data=args.data,
        dataset=spec,
        max_steps=args.max_steps,
        time_budget_min=args.time_budget_min,
        resume=args.resume,
        init_from=args.init_from,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(
        f"stopped ({result.stop_reason}) after {result.steps} steps; best validation score "
        f"{result.best_val:.4f}; checkpoints in {result.out_dir}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from gapcast.train.evaluate import evaluate_run

    if args.threads:
        torch.set_num_threads(args.threads)
    stride = int(args.stride) if str(args.stride).isdigit() else args.stride
    report = evaluate_run(
        args.run_dir,
        dataset=args.dataset,
        data=args.data,
        stations=args.stations,
        max_windows=args.max_windows,
        stride=stride,
        seed=args.seed,
        checkpoint=args.checkpoint,
        plots=not args.no_plots,
    )
    print(report.markdown)
    print(f"wrote {report.json_path}, {report.markdown_path}" + "".join(f", {p}" for p in report.plots))
    return 0
