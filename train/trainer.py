"""ConFill training on a dataset spec's training range, validated on its validation range.

(Over 600 lines on purpose: the training loop, its budget and stop decision and the DDP all-reduces
are one protocol across ranks; split, a rank-order bug would hide between modules.)

One step: draw a batch of training windows, hide artificial outages in their past part, run the model once on the
batch together with the contrastive views of a share of it (anchors, positives, negatives in one pass), and add the
weighted losses. An "epoch" is a fixed number of steps; after each one the model is scored on a fixed validation
set, checkpoints are written (``last.pt`` always, ``best.pt`` when the validation score improves) and early
stopping is checked.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the same command runs DistributedDataParallel (NCCL
with the model and batches on ``cuda:LOCAL_RANK`` when CUDA is present, gloo on the CPU otherwise): every rank draws
its own batches and gradients are averaged. So that the replicas never drift, everything that decides the loop comes
from one place: the clock that drives the learning-rate cosine and the ``--time-budget-min`` stop is rank 0's,
broadcast every step; the validation set is sharded across the ranks and its error sums all-reduced, so every rank
sees the same score and takes the same early-stopping decision. Rank 0 writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gapcast.train import TrainError
from gapcast.train.checkpoint import build_meta, read_checkpoint, save_checkpoint
from gapcast.train.config import (  # re-exported: the config lived here before train/config.py
    DataConfig,
    OptimConfig,
    TrainConfig,
    default_config_path,
    dump_toml,
    load_config,
)
from gapcast.train.data import (
    Normalizer,
    StationSeries,
    WindowSet,
    make_windows,
)
from gapcast.train.losses import ProjectionHead, info_nce, masked_mae
from gapcast.train.masking import ContrastiveSampler, outage_mask
from gapcast.train.model import ConFill
from gapcast.train.spec import DatasetSpec, load_spec

__all__ = [
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "default_config_path",
    "dump_toml",
    "load_config",
    "prepare_data",
    "train",
]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Training and validation windows with the normaliser fitted on the training months."""

    normalizer: Normalizer
    train: WindowSet
    val: WindowSet
    stations: list[str]
    context: Any = None  # gapcast.neighbours.ContextSpec with [model] context = "neighbours"
    train_context: Any = None  # gapcast.train.context.ContextSeries on the training rows
    val_context: Any = None


def prepare_data(series: dict[str, StationSeries], cfg: TrainConfig, spec: DatasetSpec | None = None) -> PreparedData:
    """Normalise the stations and index training / validation windows (the spec's split).

    Args:
        series: station name -> series (``load_dataset``).
        cfg: the training config (lookback, horizon, window filters).
        spec: the dataset spec (split, time zone); the ``beijing`` preset when None.

    Returns:
        :class:`PreparedData`.

    Raises:
        TrainError: if no training or validation window survives the filters.
    """
    from gapcast.train.loader import split_indices

    spec = spec if spec is not None else load_spec("beijing")
    names = sorted(series)
    splits = {name: split_indices(spec, series[name]) for name in names}
    normalizer = Normalizer.fit([series[n].values[splits[n].train] for n in names])
    tr_v, tr_t, va_v, va_t = [], [], [], []
    for name in names:
        s = series[name]
        sp = splits[name]
        tr_v.append(normalizer.transform(s.values[sp.train]))
        tr_t.append(s.epoch_s[sp.train])
        va_v.append(normalizer.transform(s.values[sp.val]))
        va_t.append(s.epoch_s[sp.val])
    L, H = cfg.model.lookback, cfg.model.horizon
    common = {"lookback": L, "horizon": H, "utc_offset_s": spec.utc_offset_s, "timezone": spec.timezone,
              "station_names": names}
    train_ws = make_windows(tr_v, tr_t, stride=1, min_observed=cfg.data.min_observed, **common)
    val_ws = make_windows(va_v, va_t, stride=cfg.data.val_stride, min_observed=cfg.data.min_observed, **common)
    if len(train_ws) == 0 or len(val_ws) == 0:
        shortest = min((len(t) for t in (tr_t if len(train_ws) == 0 else va_t)), default=0)
        part = "training" if len(train_ws) == 0 else "validation"
        msg = (f"no windows left (train {len(train_ws)}, val {len(val_ws)}): a window needs lookback + horizon = "
               f"{L + H} steps with at least data.min_observed = {cfg.data.min_observed} of it observed; the longest "
               f"{part} range of a station has {max((len(t) for t in (tr_t if part == 'training' else va_t)), default=0)} "
               f"steps (shortest {shortest}). Lengthen that split, shorten [model] lookback/horizon, or lower "
               "data.min_observed")
        raise TrainError(msg)
    prepared = PreparedData(normalizer=normalizer, train=train_ws, val=val_ws, stations=names)
    if cfg.model.n_context:
        from gapcast.train.context import fit_training_context, series_context

        prepared.context = fit_training_context(names, tr_v, tr_t, channel_names=spec.channel_names,
                                                channel_index=cfg.model.context_index, k=cfg.model.context_k)
        prepared.train_context = series_context(prepared.context, tr_v, tr_t)
        prepared.val_context = series_context(prepared.context, va_v, va_t)
    return prepared


class _TrainNet(nn.Module):
    """The model plus the contrastive projection head, run in one forward so DDP sees a single call."""

    def __init__(self, model: ConFill, *, view_grad: bool = True) -> None:
        super().__init__()
        self.model = model
        self.proj = ProjectionHead(model.cfg.d_model)
        self.view_grad = view_grad

    def forward(self, values, observed, calendar, n_anchor: int, extra=None, context=None):
        x_hat, forecast, memory = self.model.compute(values, observed, calendar, *(context or ()))
        if extra is None:
            return x_hat, forecast, None, None
        ev, eo, ec = extra
        # Without view gradients the positives/negatives are fixed targets for this step (the anchor carries the
        # gradient): a third of the cost of back-propagating through four extra encodings.
        with torch.set_grad_enabled(self.view_grad and torch.is_grad_enabled()):
            extra_memory, _ = self.model.encode(ev, eo, ec)
        return x_hat, forecast, self.proj(memory[:n_anchor]), self.proj(extra_memory)


@dataclass
class TrainResult:
    """What a run ended with.

    Attributes:
        out_dir: the run folder.
        steps: optimiser steps done (including resumed ones).
        best_val: the best validation score (normalised MAE, imputation + forecast).
        stop_reason: ``max_steps``, ``time_budget`` or ``early_stopping``.
        history: one dict per epoch (step, train losses, validation figures, seconds).
        model: the model in its final state (this rank's replica; ``best.pt`` holds the best one).
    """

    out_dir: Path
    steps: int
    best_val: float
    stop_reason: str
    history: list[dict[str, float]]
    model: ConFill | None = None


def _lr_at(step: int, elapsed_s: float, cfg: OptimConfig, budget_s: float | None) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if budget_s:
        progress = max(progress, elapsed_s / budget_s)
    progress = min(1.0, progress)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _to_t(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]


@dataclass
class _ValSet:
    values: torch.Tensor  # [N, L, C] input (artificially hidden cells zeroed)
    observed: torch.Tensor  # [N, L, C] input mask
    calendar: torch.Tensor  # [N, L+H, F]
    target: torch.Tensor  # [N, L+H, C]
    hidden: torch.Tensor  # [N, L, C] 1 = observed then hidden
    future_obs: torch.Tensor  # [N, H, C]
    context: tuple | None = None  # ([N, L, G], [N, L, G]) neighbour context, for context models


def _make_valset(ws: WindowSet, cfg: TrainConfig, seed: int, groups: list[tuple[int, ...]], context=None) -> _ValSet:
    """A fixed validation set: evenly spaced windows with outages drawn once from a fixed seed."""
    n = min(len(ws), cfg.data.val_windows)
    idx = np.linspace(0, len(ws) - 1, n).round().astype(np.int64)
    v, m, c = ws.batch(idx)
    L = cfg.model.lookback
    rng = np.random.default_rng(seed + 7919)
    hide = outage_mask(m[:, :L], rng, cfg.masking, groups).astype(np.float32)
    m_in = m[:, :L] * (1.0 - hide)
    ctx = tuple(_to_t(*context.batch(ws.starts[idx], L))) if context is not None else None
    return _ValSet(*_to_t(v[:, :L] * m_in, m_in, c, v, hide, m[:, L:]), context=ctx)


@torch.no_grad()
def _validate(model: ConFill, vs: _ValSet, batch: int = 256, *, rank: int = 0, world: int = 1,
              device: torch.device | None = None) -> dict[str, float]:
    """Normalised validation MAE (imputation of the hidden cells, forecast of the observed future) and their sum.

    Under DDP each rank scores the windows ``rank::world`` and the four error / count sums are all-reduced, so every
    rank returns the same figures (those of the whole set) and takes the same early-stopping decision.
    """
    model.eval()
    L = model.cfg.lookback
    device = device or torch.device("cpu")
    shard = torch.arange(rank, len(vs.values), world)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # err_i, cnt_i, err_f, cnt_f
    for a in range(0, len(shard), batch):
        ix = shard[a : a + batch]
        v, o, c, t, h, f = (x[ix].to(device) for x in (vs.values, vs.observed, vs.calendar, vs.target, vs.hidden,
                                                        vs.future_obs))
        ctx = (vs.context[0][ix].to(device), vs.context[1][ix].to(device)) if vs.context is not None else ()
        x_hat, fc, _ = model.compute(v, o, c, *ctx)
        sums += torch.stack([(torch.abs(x_hat - t[:, :L]) * h).sum(), h.sum(),
                             (torch.abs(fc - t[:, L:]) * f).sum(), f.sum()]).to(torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    model.train()
    err_i, cnt_i, err_f, cnt_f = (float(x) for x in sums.cpu())
    mae_i, mae_f = err_i / max(cnt_i, 1.0), err_f / max(cnt_f, 1.0)
    return {"val_impute_mae": mae_i, "val_forecast_mae": mae_f, "val_score": mae_i + mae_f}


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def _train_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _shared_clock(seconds: float, *, distributed: bool, device: torch.device) -> float:
    """Rank 0's clock reading, broadcast to every rank (this rank's own reading without DDP)."""
    if not distributed:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def _rank0_decides(flag: bool, *, distributed: bool, device: torch.device) -> bool:
    """Rank 0's decision, broadcast (every rank computes the same one; this makes the agreement structural)."""
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item() > 0)


def _model_config(state: dict[str, Any]) -> dict[str, Any]:
    """The model config saved in a checkpoint, with the defaults of keys added since (``interp_source``)."""
    return {"interp_source": False, "level_norm": False, "freq_embedding": True, "local_branch": True,
            **dict(state.get("config") or {})}


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"numpy": json.dumps(rng.bit_generator.state), "torch": torch.get_rng_state()}


def train(
    cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    series: dict[str, StationSeries] | None = None,
    dataset: DatasetSpec | str | os.PathLike | None = None,
    max_steps: int | None = None,
    time_budget_min: float | None = None,
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> TrainResult:
    """Train ConFill and write the run folder.

    Args:
        cfg: the training config (``optim.seed`` is the run's seed).
        out_dir: the run folder: best.pt, last.pt, config.toml, normalization.json, history.jsonl.
        data: data root for ``{data}`` in the spec's file patterns (ignored when ``series`` is given).
        series: already loaded stations (tests pass a subset).
        dataset: the dataset spec (or a preset name / spec path); the ``beijing`` preset when None. Channels,
            groups, cadence, time zone and split come from it; the checkpoint carries it whole.
        max_steps: overrides ``optim.max_steps``.
        time_budget_min: stop (validate, write checkpoints) once this many minutes of this invocation have
            passed; the learning-rate cosine then ends with the budget (whichever of steps and time runs out first).
            With a budget the number of steps depends on the machine, so only ``max_steps`` runs repeat exactly.
        resume: continue from ``out_dir/last.pt`` (model, optimiser, RNG state, step, early-stopping state).
        init_from: fine-tune: start from the weights of this checkpoint (``best.pt`` / ``last.pt`` of another
            run, whose model config must equal ``cfg.model``, or differ only by ``interp_source`` switched on here:
            see :meth:`ConFill.load_without_interp`; its projection head too when saved) with a fresh optimiser,
            step 0 and this config's schedule and masks. Ignored with ``resume``.
        progress: show a tqdm progress bar (rank 0 only).
        clock: seconds counter for ``time_budget_min`` and the schedule: wall clock by default;
            ``time.process_time`` counts this process's CPU seconds instead, so runs on a shared machine get the same
            compute (``gapcast bench accuracy --budget-clock cpu``).

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainError: bad config, no data, ``resume`` without a ``last.pt``, or an ``init_from`` checkpoint that
            is missing or has a different model config.
    """
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=int(max_steps)))
    out = Path(out_dir)
    dist_ = _start_distributed()
    if dist_.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    spec = dataset if isinstance(dataset, DatasetSpec) else load_spec(dataset or "beijing")
    run = _build_run(cfg, out, dist_, spec, data, series)
    if init_from is not None and not resume:
        _init_weights(run, init_from)
    if resume:
        _resume(run)
    if dist_.rank == 0:
        _write_run_files(run)
    _place(run, resumed=resume)
    stop_reason = _loop(run, time_budget_min=time_budget_min, progress=progress, clock=clock)
    _stop_distributed(dist_)
    p = run.progress
    log.info("training stopped (%s) at step %d, best validation score %.4f", stop_reason, p.step, p.best)
    return TrainResult(out_dir=out, steps=p.step, best_val=p.best, stop_reason=stop_reason, history=p.history,
                       model=run.model)


@dataclass
class _Dist:
    """Where this process trains: its rank, the world size, its device, and whether it opened the process group."""

    rank: int
    world: int
    device: torch.device
    own_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _start_distributed() -> _Dist:
    """This process's rank, world and device; joins torchrun's process group when ``WORLD_SIZE`` > 1.

    The group is NCCL between GPUs, gloo on the CPU (env:// rendezvous, as torchrun sets it up).
    """
    rank, world = _dist_info()
    d = _Dist(rank, world, _train_device())
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    if d.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo")
            d.own_group = True
    return d


def _stop_distributed(d: _Dist) -> None:
    """Wait for every rank, and close the process group when this run opened it."""
    if d.distributed:
        torch.distributed.barrier()
        if d.own_group:
            torch.distributed.destroy_process_group()


@dataclass
class _Progress:
    """The loop state a checkpoint saves and ``resume`` restores; ``elapsed_before`` is seconds of earlier parts."""

    step: int = 0
    epoch: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_before: float = 0.0


@dataclass
class _Run:
    """Everything one training run holds: its data, model, optimiser, sampler, validation set and progress."""

    cfg: TrainConfig
    out: Path
    dist: _Dist
    spec: DatasetSpec
    prepared: PreparedData
    meta: dict[str, Any]
    model: ConFill
    net: _TrainNet
    opt: torch.optim.Optimizer
    sampler: ContrastiveSampler
    valset: _ValSet
    rng: np.random.Generator
    progress: _Progress = field(default_factory=_Progress)
    runner: nn.Module | None = None  # the net, or its DDP wrapper (set by _place)
    groups: list[tuple[int, ...]] = field(init=False)  # channel groups the outage masks hide together
    n_anchor: int = field(init=False)  # windows per batch that get contrastive views (0 without the loss)

    def __post_init__(self) -> None:
        self.groups = list(self.spec.groups.values())
        c = self.cfg
        self.n_anchor = int(round(c.optim.batch_size * c.contrast.fraction)) if c.loss.contrast > 0 else 0


def _load_prepared(cfg: TrainConfig, spec: DatasetSpec, data, series) -> tuple[dict[str, StationSeries], PreparedData]:
    """Load the stations (or keep ``cfg.data.stations`` of the given ones) and cut the windows.

    Raises:
        TrainError: ``model.n_channels`` differs from the spec's channel count, or what :func:`prepare_data` raises.
        GapcastError: what loading the dataset raises (missing files, bad spec).
    """
    from gapcast.train.loader import load_dataset

    if series is None:
        series = load_dataset(spec, data, cfg.data.stations or None)
    elif cfg.data.stations:
        series = {k: v for k, v in series.items() if k in cfg.data.stations}
    prepared = prepare_data(series, cfg, spec)
    n_ch = len(spec.model_channels)
    if cfg.model.n_channels != n_ch:
        msg = f"model.n_channels is {cfg.model.n_channels}, the dataset {spec.name} has {n_ch} channels"
        raise TrainError(msg)
    return series, prepared


def _run_meta(cfg: TrainConfig, spec: DatasetSpec, series: dict[str, StationSeries],
              prepared: PreparedData) -> dict[str, Any]:
    """The checkpoint's metadata: normaliser, channels with units and groups, cadence, time zone, the whole
    dataset spec, the training config, the stations and (context models) the neighbour lists."""
    meta = build_meta(
        cfg.model,
        normalizer=prepared.normalizer.to_dict(),
        channels=[{**dataclasses.asdict(c), "group": mc.group}
                  for c, mc in zip(series[prepared.stations[0]].channels, spec.model_channels, strict=True)],
        cadence_s=spec.cadence_s,
        utc_offset_s=spec.utc_offset_s,
    )
    meta["timezone"] = spec.timezone
    meta["groups"] = {k: list(v) for k, v in spec.groups.items()}
    meta["dataset"] = spec.to_dict()
    meta["train_config"] = cfg.to_dict()
    meta["stations"] = prepared.stations
    if prepared.context is not None:
        meta["context"] = prepared.context.to_dict()  # neighbour lists and weights, fixed from the training range
    return meta


def _build_run(cfg: TrainConfig, out: Path, d: _Dist, spec: DatasetSpec, data, series) -> _Run:
    """Data, metadata, a fresh model and optimiser, the contrastive sampler and the fixed validation set.

    The seeding order (torch seed, then the numpy generator of ``[seed, rank]``) is what makes ``max_steps`` runs
    repeat exactly.

    Raises:
        TrainError: see :func:`_load_prepared`; or a training range shorter than the sampler's distances.
    """
    series, prepared = _load_prepared(cfg, spec, data, series)
    meta = _run_meta(cfg, spec, series, prepared)
    oc = cfg.optim
    torch.manual_seed(oc.seed)
    rng = np.random.default_rng([oc.seed, d.rank])
    model = ConFill(cfg.model)
    net = _TrainNet(model, view_grad=cfg.contrast.view_grad)
    opt = torch.optim.AdamW(net.parameters(), lr=oc.lr, weight_decay=oc.weight_decay)
    try:
        sampler = ContrastiveSampler(prepared.train, cfg.contrast)
    except ValueError as exc:  # a training range shorter than the contrastive sampler's distances
        msg = (f"{exc}: the training range is too short for [contrast] of the training config; lower "
               "contrast.distant_min (a duration, e.g. \"3d\"), or set loss.contrast = 0, or train on a longer range")
        raise TrainError(msg) from exc
    valset = _make_valset(prepared.val, cfg, oc.seed, list(spec.groups.values()), prepared.val_context)
    return _Run(cfg, out, d, spec, prepared, meta, model, net, opt, sampler, valset, rng)


def _init_weights(run: _Run, init_from: str | os.PathLike) -> None:
    """Fine-tuning: load another run's weights (and projection head) into the fresh model.

    Raises:
        TrainError: the checkpoint is missing or its model config differs from this run's (other than
            ``interp_source`` switched on here).
    """
    init = read_checkpoint(init_from)
    want, had = dataclasses.asdict(run.cfg.model), _model_config(init)
    if had == want:
        run.model.load_state_dict(init["state_dict"])
    elif had == {**want, "interp_source": False}:
        run.model.load_without_interp(init["state_dict"])
    else:
        msg = f"{init_from} was trained with a different model config than this run's [model]"
        raise TrainError(msg)
    if "proj_state_dict" in init:
        run.net.proj.load_state_dict(init["proj_state_dict"])
    run.meta["init_from"] = {"path": str(init_from), "step": int(init.get("step", 0))}
    log.info("initialised from %s (step %s)", init_from, init.get("step"))


def _resume(run: _Run) -> None:
    """Restore model, projection head, optimiser, progress and RNG state from ``out/last.pt``.

    Only rank 0's numpy stream is saved: the other ranks draw fresh, distinct streams of ``[seed, rank, step]``.

    Raises:
        TrainError: no ``last.pt``, or it was trained with a different model config.
    """
    path = run.out / "last.pt"
    state = read_checkpoint(path)
    if _model_config(state) != dataclasses.asdict(run.cfg.model):
        msg = f"{path} was trained with a different model config"
        raise TrainError(msg)
    run.model.load_state_dict(state["state_dict"])
    run.net.proj.load_state_dict(state["proj_state_dict"])
    run.opt.load_state_dict(state["optimizer"])
    p = run.progress
    p.step, p.epoch, p.best = int(state["step"]), int(state["epoch"]), float(state["best_val"])
    p.bad_epochs, p.history = int(state["bad_epochs"]), list(state.get("history", []))
    p.elapsed_before = float(state.get("elapsed_s", 0.0))
    if run.dist.rank == 0:
        run.rng.bit_generator.state = json.loads(state["rng"]["numpy"])
    else:
        run.rng = np.random.default_rng([run.cfg.optim.seed, run.dist.rank, p.step])
    torch.set_rng_state(state["rng"]["torch"])
    log.info("resumed from %s at step %d", path, p.step)


def _write_run_files(run: _Run) -> None:
    """``config.toml`` (the config as run) and ``normalization.json`` (per-channel mean/std and channel names)."""
    (run.out / "config.toml").write_text(dump_toml(run.cfg.to_dict()))
    (run.out / "normalization.json").write_text(
        json.dumps({**run.prepared.normalizer.to_dict(), "channels": list(run.spec.channel_names)}, indent=2)
    )


def _place(run: _Run, *, resumed: bool) -> None:
    """Move the net to the run's device (and a loaded optimiser state next to it); wrap it in DDP across ranks."""
    d = run.dist
    run.net.to(d.device)
    if resumed:  # the optimiser state was loaded onto the CPU; move it next to its parameters
        for st in run.opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(d.device)
    run.runner = run.net
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel

        run.runner = DistributedDataParallel(run.net, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                             find_unused_parameters=run.cfg.loss.contrast == 0)


def _loop(run: _Run, *, time_budget_min: float | None, progress: bool, clock: Callable[[], float]) -> str:
    """Optimiser steps until ``max_steps``, the time budget or early stopping; returns which one stopped it.

    The budget counts this invocation; the learning-rate cosine runs over the whole run (resumed parts too). Rank
    0's clock drives every rank's learning rate and budget stop, so replicas never drift.
    """
    from tqdm.auto import tqdm

    oc, p, d = run.cfg.optim, run.progress, run.dist
    budget_s = time_budget_min * 60.0 if time_budget_min else None
    t_start = clock()
    schedule_s = p.elapsed_before + budget_s if budget_s else None
    bar = tqdm(total=oc.max_steps, initial=p.step, desc="train", disable=not progress or d.rank != 0, unit="step")
    stop_reason = "max_steps"
    sums: dict[str, float] = {}
    n_sum = 0
    run.net.train()
    while p.step < oc.max_steps:
        run_s = _shared_clock(clock() - t_start, distributed=d.distributed, device=d.device)
        for g in run.opt.param_groups:
            g["lr"] = _lr_at(p.step, p.elapsed_before + run_s, oc, schedule_s)
        parts = _train_step(run)
        p.step += 1
        bar.update(1)
        for k, val in parts.items():
            sums[k] = sums.get(k, 0.0) + val
        n_sum += 1
        if p.step % 10 == 0:
            bar.set_postfix({k: f"{s / n_sum:.3f}" for k, s in sums.items()})
        # The step just done counts against the budget by rank 0's clock (the reading before the step plus its time
        # on rank 0), one broadcast decides for all.
        out_of_time = _rank0_decides(budget_s is not None and clock() - t_start >= budget_s,
                                     distributed=d.distributed, device=d.device)
        if not (p.step % oc.steps_per_epoch == 0 or p.step >= oc.max_steps or out_of_time):
            continue
        train_means = {f"train_{k}": s / max(n_sum, 1) for k, s in sums.items()}
        _end_epoch(run, train_means, seconds=lambda: p.elapsed_before + clock() - t_start, bar=bar)
        sums, n_sum = {}, 0
        if out_of_time:
            stop_reason = "time_budget"
            break
        # Every rank holds the same all-reduced score, hence the same bad_epochs; rank 0 still decides for all.
        if _rank0_decides(p.bad_epochs >= oc.patience, distributed=d.distributed, device=d.device):
            stop_reason = "early_stopping"
            break
    bar.close()
    return stop_reason


def _train_step(run: _Run) -> dict[str, float]:
    """One optimiser step on a fresh batch: hide outages in the lookback, add neighbour context (dropped out at
    ``context_dropout``) and the contrastive views, and descend on the weighted losses.

    Returns:
        the step's loss parts (``impute``, ``recon``, ``forecast``, and ``contrast`` when views were drawn).
    """
    cfg, prep, rng, dev = run.cfg, run.prepared, run.rng, run.dist.device
    L, w, oc, n_anchor = cfg.model.lookback, cfg.loss, cfg.optim, run.n_anchor
    idx = rng.integers(0, len(prep.train), size=oc.batch_size)
    v, m, c = prep.train.batch(idx)
    hide = outage_mask(m[:, :L], rng, cfg.masking, run.groups).astype(np.float32)
    m_in = m[:, :L] * (1.0 - hide)
    extra = None
    if n_anchor:
        views = run.sampler.sample(prep.train.starts[idx[:n_anchor]], rng)
        extra = tuple(t.to(dev) for t in _to_t(*views.stacked()))
    tv, tm_in, tc, thide, tm = (t.to(dev) for t in _to_t(v, m_in, c, hide, m))
    ctx = None
    if prep.train_context is not None:
        from gapcast.train.context import drop_context

        cv, co = prep.train_context.batch(prep.train.starts[idx], L)
        co = drop_context(co, hide, cfg.model.context_index, cfg.model.context_dropout, rng)
        ctx = tuple(t.to(dev) for t in _to_t(cv * co, co))
    x_hat, fc, z_a, z_x = run.runner(tv[:, :L] * tm_in, tm_in, tc, n_anchor, extra, ctx)
    l_imp = masked_mae(x_hat, tv[:, :L], thide)
    l_rec = masked_mae(x_hat, tv[:, :L], tm_in)
    l_fc = masked_mae(fc, tv[:, L:], tm[:, L:])
    loss = w.impute * l_imp + w.recon * l_rec + w.forecast * l_fc
    parts = {"impute": l_imp.item(), "recon": l_rec.item(), "forecast": l_fc.item()}
    if z_a is not None:
        n = n_anchor
        l_con = info_nce(z_a, [z_x[:n], z_x[n : 2 * n]], z_x[2 * n :], cfg.contrast.temperature)
        loss = loss + w.contrast * l_con
        parts["contrast"] = l_con.item()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if oc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), oc.grad_clip)
    run.opt.step()
    return parts


def _end_epoch(run: _Run, train_means: dict[str, float], *, seconds: Callable[[], float], bar) -> None:
    """Validate, record the epoch, update the early-stopping state; rank 0 writes ``best.pt`` (when the score
    improved), ``last.pt`` (with optimiser and RNG state, for ``resume``) and a line of ``history.jsonl``.

    ``seconds`` reads the run's elapsed seconds (earlier parts included); it is read after the validation, once for
    the record and again for the checkpoint's ``elapsed_s``, so both count the validation time."""
    p, out = run.progress, run.out
    p.epoch += 1
    figures = _validate(run.model, run.valset, rank=run.dist.rank, world=run.dist.world, device=run.dist.device)
    record = {"epoch": p.epoch, "step": p.step, "seconds": round(seconds(), 1),
              "lr": run.opt.param_groups[0]["lr"], **train_means, **figures}
    p.history.append(record)
    improved = figures["val_score"] < p.best - 1e-6
    if improved:
        p.best, p.bad_epochs = figures["val_score"], 0
    else:
        p.bad_epochs += 1
    if run.dist.rank != 0:
        return
    train_state = {"step": p.step, "epoch": p.epoch, "best_val": p.best, "bad_epochs": p.bad_epochs,
                   "history": p.history, "elapsed_s": seconds()}
    if improved:
        save_checkpoint(out / "best.pt", run.model, run.meta, **train_state, val=figures)
    save_checkpoint(out / "last.pt", run.model, run.meta, **train_state, val=figures,
                    proj_state_dict=run.net.proj.state_dict(), optimizer=run.opt.state_dict(),
                    rng=_rng_state(run.rng))
    with (out / "history.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    bar.write(f"epoch {p.epoch} step {p.step}: val impute MAE {figures['val_impute_mae']:.4f}, "
              f"forecast MAE {figures['val_forecast_mae']:.4f}" + (" (best)" if improved else ""))
