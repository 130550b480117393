"""``gapcast bench accuracy --dataset SPEC``: the equal-footing accuracy protocol (issue 19).

(Over 600 lines on purpose: the protocol's options, method runners and resume logic are one
contract with the saved results; the report lives in bench/protocol_report.py.)

Every decision is taken on the validation range; the test range is only scored. Every learned method

* sees the same training windows: the stride-1 windows of the training range that ConFill trains on
  (:func:`gapcast.train.trainer.prepare_data`, at least ``data.min_observed`` of the past observed), drawn uniformly;
* imputers are trained on the same outage generator (:func:`gapcast.train.masking.outage_mask` with ConFill's
  ``[masking]`` config: scattered points, blocks over one channel / several / one outage group / the whole station,
  fresh masks for every draw). The PyPOTS models get them through PyPOTS's own dataset classes
  (``DatasetForSAITS`` / ``DatasetForBRITS`` with ``X`` = the windows with our outages and ``X_ori`` = the windows
  as recorded, so PyPOTS's MIT/ORT losses act on our hidden cells) and its own training loop (``_train_model``,
  one pass over a fresh draw of windows per call);
* is selected on the same validation figure: the normalised MAE on a fixed validation set (the validation range's
  windows with outages drawn once from the run's seed, :func:`gapcast.train.trainer._make_valset`): imputation MAE
  on the hidden cells for imputers, forecast MAE on the observed future for forecasters, their sum for ConFill
  (its trainer's ``val_score``);
* gets the same training budget on this machine (``--budget-min``, default 10 min of wall clock; validation counts;
  ``--budget-clock cpu`` counts the process's CPU seconds instead, fair when other work shares the machine);
* is run for every seed; tables give the mean and the spread (sample standard deviation) over seeds.

Scenarios (test range; masks fixed by ``mask_seed``, the same for every method and seed): point-10%; blocks of
6 / 24 / 72 h over the spec's first outage group and over the whole station, inside the window; blocks of 6 / 24 /
72 h over the whole station ending at the window's newest step (``edge-*``, what the agent faces in real time);
the real missingness pattern of another window. The forecast is H steps from the window's real observed mask.

Results are written per method and seed as they finish (``results/<method>/seed<k>.json``); ``resume`` skips
those already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.bench.protocol_report import aggregate, bar_chart, protocol_markdown, targets

__all__ = [
    "ABLATIONS",
    "FORECASTERS",
    "PYPOTS_SIZES",
    "ProtocolOptions",
    "aggregate",
    "bar_chart",
    "edge_scenarios",
    "protocol_markdown",
    "run_protocol",
    "targets",
]

log = logging.getLogger(__name__)

BLOCKS = ("6h", "24h", "72h")

#: ConFill ablations: name -> overrides of the training config tables. The base config (``beijing.toml``) has no
#: ``interp_source``, so "without the neighbour smoother" is the paper's plain imputation head: one row for both.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "ConFill": {},
    "ConFill w/o neighbour smoother (paper's plain head)": {"model": {"smoother_widths": (), "interp_source": False}},
    "ConFill w/o frequency embedding": {"model": {"freq_embedding": False}},
    "ConFill w/o local branch (global attention only)": {"model": {"local_branch": False}},
    "ConFill w/o contrastive loss": {"loss": {"contrast": 0.0}},
}

#: PyPOTS imputers and their sizes: the papers' / PyPOTS documentation defaults. ``--quick`` shrinks them (stated).
PYPOTS_SIZES: dict[str, dict[str, Any]] = {
    # SAITS paper / PyPOTS README example: 2 layers, d_model 256, d_ffn 128, 4 heads of 64
    "SAITS": {"n_layers": 2, "d_model": 256, "n_heads": 4, "d_k": 64, "d_v": 64, "d_ffn": 128, "dropout": 0.1},
    # BRITS paper: 108 hidden units
    "BRITS": {"rnn_hidden_size": 108},
    # ImputeFormer paper (Nie et al., KDD 2024) defaults
    "ImputeFormer": {"n_layers": 3, "d_input_embed": 32, "d_learnable_embed": 96, "d_proj": 8, "d_ffn": 256,
                     "n_temporal_heads": 4, "dropout": 0.1},
    # TimesNet paper (Wu et al., ICLR 2023) imputation setting: 2 layers, d_model 64, top-k 3, 6 kernels
    "TimesNet": {"n_layers": 2, "top_k": 3, "d_model": 64, "d_ffn": 64, "n_kernels": 6, "dropout": 0.1},
}
QUICK_PYPOTS_SIZES: dict[str, dict[str, Any]] = {
    "SAITS": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_k": 8, "d_v": 8, "d_ffn": 16, "dropout": 0.0},
    "BRITS": {"rnn_hidden_size": 8},
    "ImputeFormer": {"n_layers": 1, "d_input_embed": 8, "d_learnable_embed": 8, "d_proj": 4, "d_ffn": 16,
                     "n_temporal_heads": 2, "dropout": 0.0},
    "TimesNet": {"n_layers": 1, "top_k": 2, "d_model": 8, "d_ffn": 8, "n_kernels": 2, "dropout": 0.0},
}
FORECASTERS = ("DLinear", "iTransformer")
UNTRAINED = ("LOCF", "linear interpolation", "persistence", "seasonal naive (1 d)")


@dataclass(frozen=True)
class ProtocolOptions:
    """What the protocol runs.

    Attributes:
        budget_min: wall-clock training budget of every learned method and seed, minutes.
        seeds: training seeds (each learned method runs once per seed).
        methods: name prefixes to run (None: all); matched case-insensitively against the method names; a
            trailing ``$`` asks for that name exactly (``ConFill$``: ConFill without its ablations).
        stride: steps between test-window starts.
        max_windows: at most this many test windows per station (None: all).
        mask_seed: seed of the test scenario masks (the same for every method and seed).
        stations: stations used (empty: all the spec's).
        threads: torch CPU threads.
        quick: tiny model sizes and budgets (CI); stated in the output.
        pypots_chunk: windows per PyPOTS training pass (a fresh draw each pass; the budget is checked between them).
        holdout: held-out stations: every method is trained (and normalised) without them and scored only on them.
        max_stations: keep only the first this many stations (by name) after ``stations`` (None: all).
        budget_clock: what the budget counts: ``"wall"`` (wall-clock seconds) or ``"cpu"`` (this process's CPU
            seconds, :func:`time.process_time`: on a machine shared with other work every method still gets the same
            compute; with ``threads = 1`` one CPU minute is one minute of one idle core).
    """

    budget_min: float = 10.0
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] | None = None
    stride: int = 24
    max_windows: int | None = None
    mask_seed: int = 0
    stations: tuple[str, ...] = ()
    threads: int = 1
    quick: bool = False
    pypots_chunk: int = 512
    holdout: tuple[str, ...] = ()
    max_stations: int | None = None
    budget_clock: str = "wall"

    def __post_init__(self) -> None:
        if self.budget_clock not in ("wall", "cpu"):
            msg = f"budget_clock must be 'wall' or 'cpu', not {self.budget_clock!r}"
            raise ValueError(msg)

    def clock(self) -> Callable[[], float]:
        """The seconds counter the budget runs on (see ``budget_clock``)."""
        return time.process_time if self.budget_clock == "cpu" else time.perf_counter


def slug(name: str) -> str:
    """A file-name form of a method name (``ConFill w/o local branch`` -> ``confill-w-o-local-branch``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def all_methods() -> list[str]:
    return [*UNTRAINED, *ABLATIONS, *PYPOTS_SIZES, *FORECASTERS]


def _wanted(opts: ProtocolOptions, name: str) -> bool:
    if opts.methods is None:
        return True
    for m in (m.strip().lower() for m in opts.methods):
        if name.lower() == m.removesuffix("$") if m.endswith("$") else name.lower().startswith(m):
            return True
    return False


def edge_scenarios(observed_past: np.ndarray, cadence_s: int):
    """Blocks over the whole station that end at the window's newest step (6 / 24 / 72 h).

    Args:
        observed_past: [N, L, C] bool, the real observed mask of the test windows' past.
        cadence_s: the dataset's cadence.

    Returns:
        A list of :class:`gapcast.train.evaluate.Scenario`, ``edge-6h:station`` ...: the last n steps of every
        channel hidden where observed (n clipped to L - 1, so one step is left to start from).
    """
    from gapcast.duration import steps_of
    from gapcast.train.evaluate import Scenario

    N, L, C = observed_past.shape
    out = []
    for text in BLOCKS:
        n = min(steps_of(text, cadence_s, key="evaluation block"), L - 1)
        block = np.zeros((N, L, C), dtype=bool)
        block[:, L - n :, :] = True
        out.append(Scenario(f"edge-{text}:station", observed_past & block,
                            f"the last {n} steps of every channel hidden: an outage still going on at the newest step"))
    return out


def _scenario_set(series, normalizer, spec, L: int, H: int, opts: ProtocolOptions):
    from gapcast.train.evaluate import build_scenarios

    ss = build_scenarios(series, normalizer, channels=spec.channel_names, lookback=L, horizon=H, stride=opts.stride,
                         max_windows=opts.max_windows, seed=opts.mask_seed, spec=spec)
    keep = {"point-10%", "real-pattern", *(f"block-{b}" for b in BLOCKS), *(f"block-{b}:station" for b in BLOCKS)}
    ss.scenarios = [s for s in ss.scenarios if s.name in keep]
    ss.scenarios += edge_scenarios(ss.windows.observed[:, :L].astype(bool), spec.cadence_s)
    ss.protocol["scenarios"] = {s.name: s.description for s in ss.scenarios}
    return ss


def _summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Scores without the per-channel detail: {part: {all_norm, group_norm}}."""
    return {part: {k: v for k, v in errs.items() if k in ("all_norm", "group_norm")} for part, errs in scores.items()}


# ------------------------------------------------------------------------------------------------ training methods


def _confill(name: str, base_cfg, seed: int, budget_s: float, series, spec, out: Path, opts: ProtocolOptions):
    from gapcast.train.checkpoint import load_checkpoint
    from gapcast.train.trainer import train

    over = ABLATIONS[name]
    tables = {t: dataclasses.replace(getattr(base_cfg, t), **kv) for t, kv in over.items()}
    cfg = dataclasses.replace(base_cfg, **tables)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, seed=seed))
    run = out / "runs" / f"{slug(name)}-seed{seed}"
    clock = opts.clock()
    t0 = clock()
    res = train(cfg, out_dir=run, series=series, dataset=spec, time_budget_min=budget_s / 60.0, progress=False,
                clock=clock)
    train_s = clock() - t0
    model, _ = load_checkpoint(run / "best.pt")
    info = {"steps": res.steps, "stop": res.stop_reason, "best_val_score": res.best_val, "run": str(run),
            "config_overrides": {t: {k: list(v) if isinstance(v, tuple) else v for k, v in kv.items()}
                                 for t, kv in over.items()},
            "sizes": {"d_model": cfg.model.d_model, "layers": cfg.model.n_encoder_layers,
                      "batch_size": cfg.optim.batch_size}}
    return model, train_s, info


def _pypots_model(name: str, L: int, C: int, seed: int, sizes: dict[str, Any], batch_size: int):
    import torch

    from gapcast import GapcastError

    try:
        from pypots.imputation import BRITS, SAITS, ImputeFormer, TimesNet
        from pypots.nn.modules.loss import MAE
    except ImportError as exc:
        msg = f"{name} needs PyPOTS: pip install 'gapcast[bench]' (or leave it out with --methods)"
        raise GapcastError(msg) from exc

    torch.manual_seed(seed)
    np.random.seed(seed)
    cls = {"SAITS": SAITS, "BRITS": BRITS, "ImputeFormer": ImputeFormer, "TimesNet": TimesNet}[name]
    return cls(n_steps=L, n_features=C, batch_size=batch_size, epochs=1, patience=None, device="cpu",
               saving_path=None, model_saving_strategy=None, verbose=False, validation_metric=MAE, **sizes)


def _pypots_dataset(name: str, x: np.ndarray, x_ori: np.ndarray):
    """PyPOTS's own training dataset over our outages: ``X`` with them (NaN), ``X_ori`` as recorded (NaN).

    SAITS-style models (SAITS, ImputeFormer, TimesNet) get both, so their masked-imputation loss acts on our hidden
    cells. BRITS has no masked-imputation term (its loss is the recurrent estimate of each observed value before it
    is read): it gets ``X`` with our outages as missing input, its loss on what remains.
    """
    if name == "BRITS":
        from pypots.imputation.brits.data import DatasetForBRITS

        return DatasetForBRITS({"X": x}, return_X_ori=False, return_y=False, file_type="hdf5")
    from pypots.imputation.saits.data import DatasetForSAITS

    return DatasetForSAITS({"X": x, "X_ori": x_ori}, return_X_ori=True, return_y=False, file_type="hdf5")


def _pypots_impute(model, values: np.ndarray, observed: np.ndarray, batch: int = 256) -> np.ndarray:
    from gapcast.bench.pypots_baselines import pypots_impute

    return pypots_impute(model, values, observed, batch=batch)


def _val_impute_mae(impute: Callable, vs, L: int) -> float:
    """The trainer's ``val_impute_mae`` for any imputer: normalised MAE on the validation set's hidden cells."""
    imp = impute(vs.values.numpy(), vs.observed.numpy())
    hidden = vs.hidden.numpy().astype(bool)
    return float(np.abs(imp - vs.target.numpy()[:, :L])[hidden].mean())


def _val_forecast_mae(forecast: Callable, vs, L: int) -> float:
    """The trainer's ``val_forecast_mae`` for any forecaster (the same inputs, outages hidden)."""
    fc = forecast(vs.values.numpy(), vs.observed.numpy())
    obs = vs.future_obs.numpy().astype(bool)
    return float(np.abs(fc - vs.target.numpy()[:, L:])[obs].mean())


def _pypots(name: str, seed: int, budget_s: float, prepared, cfg, groups, valset, opts: ProtocolOptions):
    import torch
    from torch.utils.data import DataLoader

    from gapcast.train.masking import outage_mask

    L, C = cfg.model.lookback, cfg.model.n_channels
    sizes = (QUICK_PYPOTS_SIZES if opts.quick else PYPOTS_SIZES)[name]
    model = _pypots_model(name, L, C, seed, sizes, cfg.optim.batch_size)
    rng = np.random.default_rng([seed, 19])
    best, best_state, passes, best_pass, history = math.inf, None, 0, 0, []
    clock = opts.clock()
    t0 = clock()
    while True:
        idx = rng.integers(0, len(prepared.train), size=opts.pypots_chunk)
        v, m, _ = prepared.train.batch(idx)
        v, m = v[:, :L], m[:, :L].astype(bool)
        hide = outage_mask(m, rng, cfg.masking, groups)
        x_ori = np.where(m, v, np.nan).astype(np.float32)
        x = np.where(m & ~hide, v, np.nan).astype(np.float32)
        loader = DataLoader(_pypots_dataset(name, x, x_ori), batch_size=cfg.optim.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
        model._train_model(loader, None)  # PyPOTS's own loop: one pass; its optimiser state carries over
        passes += 1
        val = _val_impute_mae(lambda a, b: _pypots_impute(model, a, b), valset, L)
        history.append(round(val, 5))
        if val < best:
            best, best_pass, best_state = val, passes, copy.deepcopy(model.model.state_dict())
        if clock() - t0 >= budget_s:
            break
    model.model.load_state_dict(best_state)
    info = {"passes": passes, "windows_seen": passes * opts.pypots_chunk, "best_pass": best_pass,
            "best_val_impute_mae": best, "val_history": history, "sizes": sizes}
    return model, clock() - t0, info


def _forecaster(name: str, seed: int, budget_s: float, prepared, cfg, valset, opts: ProtocolOptions):
    import torch

    from gapcast.bench.dlinear import DLinear, DLinearConfig, fill_for_dlinear
    from gapcast.bench.itransformer import ITransformer, ITransformerConfig

    L, H = cfg.model.lookback, cfg.model.horizon
    torch.manual_seed(seed)
    if name == "DLinear":
        net, lr, sizes = DLinear(DLinearConfig(lookback=L, horizon=H, channels=cfg.model.n_channels)), 5e-3, {
            "kernel_size": 25, "individual": False}
    else:
        icfg = ITransformerConfig(lookback=L, horizon=H, **({"d_model": 16, "d_ff": 16, "n_heads": 2, "n_layers": 1}
                                                            if opts.quick else {}))
        net, lr, sizes = ITransformer(icfg), 1e-3, dataclasses.asdict(icfg)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng([seed, 23])

    def predict(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
        net.eval()
        x = fill_for_dlinear(values, observed)
        with torch.no_grad():
            out = np.concatenate([net(torch.from_numpy(x[a : a + 512])).numpy() for a in range(0, len(x), 512)])
        net.train()
        return out

    best, best_state, steps, history = math.inf, None, 0, []
    every = 25 if opts.quick else 200  # steps between validations
    clock = opts.clock()
    t0 = clock()
    while True:
        idx = rng.integers(0, len(prepared.train), size=cfg.optim.batch_size)
        v, m, _ = prepared.train.batch(idx)
        x = torch.from_numpy(fill_for_dlinear(v[:, :L], m[:, :L]))
        y, ym = torch.from_numpy(v[:, L:]), torch.from_numpy(m[:, L:])
        loss = (((net(x) - y) ** 2) * ym).sum() / ym.sum().clamp(min=1.0)  # MSE on the observed future
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        out_of_time = clock() - t0 >= budget_s
        if steps % every == 0 or out_of_time:
            val = _val_forecast_mae(predict, valset, L)
            history.append(round(val, 5))
            if val < best:
                best, best_state = val, copy.deepcopy(net.state_dict())
        if out_of_time:
            break
    net.load_state_dict(best_state)
    info = {"steps": steps, "best_val_forecast_mae": best, "val_history": history, "sizes": sizes, "lr": lr,
            "input": "linear interpolation across the window's gaps"}
    return predict, clock() - t0, info


# ------------------------------------------------------------------------------------------------------- the run


def run_protocol(
    *, dataset=None, data=None, out: str | Path, options: ProtocolOptions | None = None, resume: bool = False,
    progress: bool = True, report_only: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the protocol and return its aggregated results.

    Stages: the options stamp (:func:`_check_stamp`), the data and the scenarios (:func:`_prepare`), the untrained
    methods, then every learned method seed by seed (:func:`_run_seed`), each result saved as it finishes
    (:class:`_Results`), and the protocol record (:func:`_protocol_record`).

    Args:
        dataset: a dataset spec, preset name or spec path (default ``beijing``).
        data: data root (None: ``$GAPCAST_DATA`` / cache).
        out: results folder: ``results/<method>/seed<k>.json``, ``runs/`` (ConFill run folders).
        options: :class:`ProtocolOptions`.
        resume: keep results already in ``out`` (same options) and run only the missing ones.
        progress: print one line per finished method and seed.
        report_only: train nothing: aggregate the results already saved in ``out`` (implies ``resume``).

    Returns:
        ``{"protocol": ..., "options": ..., "results": {method: {seed: result}}, "aggregate": ...}``.

    Raises:
        GapcastError subclasses: missing data, bad spec; ``BenchError`` when ``resume`` meets results of other
        options.
    """
    import torch

    opts = options or ProtocolOptions()
    resume = resume or report_only
    torch.set_num_threads(opts.threads)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    _check_stamp(outp, opts, resume)
    prep = _prepare(dataset, data, opts)
    store = _Results(outp, prep.ss, opts.budget_min * 60.0, resume=resume, report_only=report_only, progress=progress)
    _run_untrained(store, prep, opts)
    for seed in opts.seeds:  # seed-outer: an interrupted run has every method of the first seeds
        _run_seed(store, prep, seed, outp, opts)
    results = store.results
    return {"benchmark": "accuracy-protocol", "protocol": _protocol_record(prep, opts), "options": dataclasses.asdict(opts),
            "results": results, "aggregate": aggregate(results, [s.name for s in prep.ss.scenarios])}


def _check_stamp(outp: Path, opts: ProtocolOptions, resume: bool) -> None:
    """Check ``options.json`` against these options on ``resume`` (else clear earlier results), then write it.

    The stamp holds every option but ``methods``, ``threads`` and ``seeds`` (a run may add seeds or methods);
    keys added since a run started take their default.

    Raises:
        GapcastError: ``resume`` meets results of other options.
    """
    from gapcast import GapcastError

    stamp = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("methods", "threads", "seeds")}
    stamp_path = outp / "options.json"
    if resume and stamp_path.is_file():
        # keys added since a run started take their default (the run had that behaviour)
        defaults = {k: v for k, v in dataclasses.asdict(ProtocolOptions()).items() if k in stamp}
        old = json.loads(json.dumps({**defaults, **json.loads(stamp_path.read_text())}))
        if old != json.loads(json.dumps(stamp)):
            msg = (f"--resume: {outp} holds results of other options ({old}); these are {stamp}. Use another --out "
                   "or drop --resume")
            raise GapcastError(msg)
    elif not resume and (outp / "results").is_dir():
        import shutil

        shutil.rmtree(outp / "results")
        log.info("removed the earlier results in %s (no --resume)", outp)
    stamp_path.write_text(json.dumps(stamp, indent=2))


@dataclass
class _Prepared:
    """What every method and seed of one protocol run shares (built by :func:`_prepare`)."""

    spec: Any  # DatasetSpec
    series: dict  # the training stations (held-out ones removed)
    cfg: Any  # the ConFill training config (quick: shrunk)
    ss: Any  # the test ScenarioSet
    prepared: Any  # the trainer's training / validation windows
    groups: list  # the spec's outage groups (channel indices)


def _prepare(dataset, data, opts: ProtocolOptions) -> _Prepared:
    """Load the dataset and the ConFill config, split off the held-out stations, fit the normaliser on the training
    stations' training range, build the test scenarios and the trainer's windows.

    Raises:
        GapcastError: a held-out station not in the data; GapcastError subclasses: missing data, a bad spec.
    """
    from gapcast import GapcastError
    from gapcast.train.config import load_config
    from gapcast.train.data import Normalizer
    from gapcast.train.loader import load_dataset, split_indices
    from gapcast.train.spec import DatasetSpec, load_spec
    from gapcast.train.trainer import prepare_data

    spec = dataset if isinstance(dataset, DatasetSpec) else load_spec(dataset or "beijing")
    series = load_dataset(spec, data, list(opts.stations) or None)
    if opts.max_stations:
        series = {k: series[k] for k in sorted(series)[: opts.max_stations]}
    cfg = load_config(None, spec)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, stations=()))
    if opts.quick:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1),
            data=dataclasses.replace(cfg.data, val_windows=32), optim=dataclasses.replace(cfg.optim, batch_size=16))
    L, H = cfg.model.lookback, cfg.model.horizon
    test_series = series
    if opts.holdout:  # held-out stations: trained without them (normaliser too), scored only on them
        unknown = sorted(set(opts.holdout) - set(series))
        if unknown:
            msg = f"held-out station(s) {unknown} not in the data ({sorted(series)})"
            raise GapcastError(msg)
        test_series = {k: v for k, v in series.items() if k in opts.holdout}
        series = {k: v for k, v in series.items() if k not in opts.holdout}
    normalizer = Normalizer.fit([s.values[split_indices(spec, s).train] for s in series.values()])
    ss = _scenario_set(test_series, normalizer, spec, L, H, opts)
    prepared = prepare_data(series, cfg, spec)
    return _Prepared(spec=spec, series=series, cfg=cfg, ss=ss, prepared=prepared, groups=list(spec.groups.values()))


class _Results:
    """The results of one protocol run: ``results/<slug>/seed<k>.json`` (``untrained.json`` for an untrained
    method), written as each method and seed finishes, and the same in memory (``{method: {seed or -1: result}}``).
    """

    def __init__(self, outp: Path, ss, budget_s: float, *, resume: bool, report_only: bool, progress: bool) -> None:
        self.outp = outp
        self.ss = ss
        self.budget_s = budget_s
        self.resume = resume
        self.report_only = report_only
        self.progress = progress
        self.results: dict[str, dict[int, Any]] = {}

    def path_of(self, method: str, seed: int | None) -> Path:
        """Where the result of ``method`` at ``seed`` (None: untrained) is saved."""
        return self.outp / "results" / slug(method) / ("untrained.json" if seed is None else f"seed{seed}.json")

    def record(self, method: str, seed: int | None, fn, train_s: float, info: dict[str, Any]) -> None:
        """Score ``fn`` on every scenario, save the result and keep it; raises what the imputer raises."""
        from gapcast.train.evaluate import score_imputer

        t = time.perf_counter()
        scores = _summary(score_imputer(fn, self.ss, name=method))
        res = {"method": method, "seed": seed, "train_s": round(train_s, 1), "budget_s": self.budget_s
               if seed is not None else 0.0, "score_s": round(time.perf_counter() - t, 1), "scores": scores, **info}
        p = self.path_of(method, seed)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=2, default=str))
        self.results.setdefault(method, {})[-1 if seed is None else seed] = res
        if self.progress:
            print(f"  {method} seed {seed}: trained {train_s:.0f} s, scored in {res['score_s']:.0f} s", flush=True)

    def done(self, method: str, seed: int | None) -> bool:
        """True when this method and seed need no training: saved (and loaded) or ``report_only``."""
        p = self.path_of(method, seed)
        if self.resume and p.is_file():
            self.results.setdefault(method, {})[-1 if seed is None else seed] = json.loads(p.read_text())
            return True
        return self.report_only


def _run_untrained(store: _Results, prep: _Prepared, opts: ProtocolOptions) -> None:
    """LOCF, linear interpolation, persistence and seasonal naive (1 d): scored once, no seed; raises nothing."""
    from gapcast.train.evaluate import baseline_imputers

    season = max(1, round(86400 / prep.spec.cadence_s))
    base = baseline_imputers(prep.cfg.model.horizon, season=season)

    def locf_imp(v, m, c):
        return base["locf"](v, m, c)[0], None

    def persistence(v, m, c):
        return None, base["locf"](v, m, c)[1]

    untrained = {"LOCF": locf_imp, "linear interpolation": base["linear"], "persistence": persistence,
                 "seasonal naive (1 d)": base["seasonal_naive"]}
    for name, fn in untrained.items():
        if _wanted(opts, name) and not store.done(name, None):
            store.record(name, None, fn, 0.0, {"kind": "untrained"})


def _run_seed(store: _Results, prep: _Prepared, seed: int, outp: Path, opts: ProtocolOptions) -> None:
    """Every learned method at one seed, in order: the ConFill ablations, the PyPOTS imputers, the forecasters;
    each trained at the same budget, selected on the seed's validation set, scored and saved.

    Raises:
        GapcastError: a PyPOTS method without PyPOTS installed; what training raises.
    """
    from gapcast.bench.accuracy import _imputation_only
    from gapcast.train.evaluate import model_imputer
    from gapcast.train.trainer import _make_valset

    budget_s, cfg = store.budget_s, prep.cfg
    valset = _make_valset(prep.prepared.val, cfg, seed, prep.groups)
    for name in ABLATIONS:
        if _wanted(opts, name) and not store.done(name, seed):
            model, train_s, info = _confill(name, cfg, seed, budget_s, prep.series, prep.spec, outp, opts)
            store.record(name, seed, model_imputer(model, progress=False), train_s, {"kind": "confill", **info})
    for name in PYPOTS_SIZES:
        if _wanted(opts, name) and not store.done(name, seed):
            model, train_s, info = _pypots(name, seed, budget_s, prep.prepared, cfg, prep.groups, valset, opts)
            fn = _imputation_only(lambda v, m, fm=model: _pypots_impute(fm, v, m), prep.ss)
            store.record(name, seed, fn, train_s, {"kind": "pypots", **info})
    for name in FORECASTERS:
        if _wanted(opts, name) and not store.done(name, seed):
            predict, train_s, info = _forecaster(name, seed, budget_s, prep.prepared, cfg, valset, opts)
            store.record(name, seed, lambda v, m, c, p=predict: (None, p(v, m)), train_s,
                         {"kind": "forecaster", **info})


def _protocol_record(prep: _Prepared, opts: ProtocolOptions) -> dict[str, Any]:
    """The protocol as run: the scenario set's record plus the rules, budget, seeds, windows, versions and sizes;
    raises nothing (PyPOTS missing: ``"not installed"``)."""
    try:
        import pypots

        pypots_version = pypots.__version__
    except ImportError:
        pypots_version = "not installed"
    return {
        **prep.ss.protocol,
        "rules": " ".join(__doc__.split("\n\n")[1:3]).replace("\n", " "),
        "budget_per_method_and_seed_min": opts.budget_min,
        "budget_clock": opts.budget_clock,
        "seeds": list(opts.seeds),
        "training_windows": f"{len(prep.prepared.train)} stride-1 windows of the training range (drawn uniformly)",
        "validation_windows": f"{min(len(prep.prepared.val), prep.cfg.data.val_windows)} of the validation range, "
                              "outages drawn once per seed",
        "pypots_version": pypots_version,
        "model_sizes": "papers' defaults" if not opts.quick else "QUICK: tiny sizes (CI smoke run, not a result)",
        "held_out_stations": list(opts.holdout),
        "training_stations": sorted(prep.series),
        "confill_config": "gapcast/train/configs/beijing.toml" + (" shrunk (quick)" if opts.quick else ""),
    }
