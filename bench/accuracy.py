"""``gapcast bench accuracy``: ConFill against what a user would pick instead, on the same hidden values.

The protocol is the README's, built by :func:`gapcast.train.evaluate.build_scenarios` (Beijing test months; point-10%,
block 6 h / 24 h / 72 h over all pollutants of a station, real pattern; forecast H = 24 from L = 96) and scored by
:func:`gapcast.train.evaluate.score_imputer` (MAE / RMSE / MRE on normalised values and per channel in original
units), so every method sees exactly the same windows and masks in one run.

Methods: ConFill fp32 (the torch checkpoint) and every precision variant of its bundle through onnxruntime (the
gateway's backend); LOCF (forecast: persistence), linear interpolation, seasonal naive (24 h, forecast only); SAITS
and BRITS (PyPOTS, imputation only, trained here under the budget rule of :mod:`gapcast.bench.pypots_baselines`);
DLinear (forecast only, trained here on the training months, its input window filled by linear interpolation).
Training time is each method's wall-clock training on this machine (ConFill's from its run folder).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AccuracyOptions", "run_accuracy", "train_dlinear_beijing"]

log = logging.getLogger(__name__)

SCENARIOS = ("point-10%", "block-6h", "block-24h", "block-72h", "real-pattern")
INT8_TOLERANCE = 0.03


@dataclasses.dataclass(frozen=True)
class AccuracyOptions:
    """What the accuracy benchmark runs.

    Attributes:
        stride: steps between test-window starts (24 = one window per day per station).
        max_windows: at most this many test windows per station (None = all).
        seed: seed of the scenario masks and of every trained baseline.
        baseline_budget_s: wall-clock training budget of SAITS and of BRITS each, seconds; None = ConFill's own
            recorded training time (the default rule).
        pypots_max_epochs: epoch cap of SAITS / BRITS.
        pypots_train_windows: training windows for SAITS / BRITS (random subset of stride-``pypots_stride``
            windows), None = all.
        pypots_stride: steps between SAITS / BRITS training-window starts.
        dlinear_epochs: DLinear epoch cap.
        dlinear_stride: steps between DLinear training-window starts.
        methods: methods to run (None = all available).
        threads: torch / onnxruntime CPU threads.
        models_dir: folder where trained SAITS / BRITS are saved, and reused when their config matches (None: no
            saving).
        network_trials: trials per network scenario (station-local / network-wide outages with the neighbour
            baselines, :mod:`gapcast.train.network_eval`); 0 skips them.
    """

    stride: int = 24
    max_windows: int | None = None
    seed: int = 0
    baseline_budget_s: float | None = None
    pypots_max_epochs: int = 100
    pypots_train_windows: int | None = None
    pypots_stride: int = 24
    dlinear_epochs: int = 10
    dlinear_stride: int = 4
    methods: tuple[str, ...] | None = None
    threads: int = 2
    models_dir: str | None = None
    network_trials: int = 540


def _confill_train_s(run_dir: Path) -> float | None:
    """ConFill's wall-clock training time from the run folder's history (seconds), if recorded."""
    hist = run_dir / "history.jsonl"
    if not hist.is_file():
        return None
    lines = [x for x in hist.read_text().splitlines() if x.strip()]
    return float(json.loads(lines[-1]).get("seconds", 0.0)) if lines else None


def _ort_imputer(backend, batch: int = 256) -> Callable:
    def fn(values: np.ndarray, observed: np.ndarray, calendar: np.ndarray):
        imps, fcs = [], []
        for a in range(0, len(values), batch):
            imp, fc = backend.run(values[a : a + batch], observed[a : a + batch], calendar[a : a + batch])
            imps.append(imp)
            fcs.append(fc)
        return np.concatenate(imps), np.concatenate(fcs)

    return fn


def train_dlinear_beijing(train_values, val_values, *, lookback: int, horizon: int, channels: int, stride: int,
                          epochs: int, seed: int):
    """Train DLinear on the Beijing training months (input filled by linear interpolation, loss on observed
    targets), validated on the validation months.

    Args:
        train_values, val_values: per station [T, C] float32 normalised, NaN where missing.
        lookback, horizon, channels: L, H, C.
        stride: steps between training-window starts.
        epochs: epoch cap.
        seed: seed.

    Returns:
        :class:`gapcast.bench.dlinear.DLinearFit`.
    """
    from gapcast.bench.dlinear import DLinearConfig, fill_for_dlinear, train_dlinear

    def cut(series, step):
        xs, ys, ms = [], [], []
        n = lookback + horizon
        for v in series:
            for s in range(0, len(v) - n + 1, step):
                w = v[s : s + n]
                obs = np.isfinite(w)
                if obs[:lookback].mean() < 0.5 or not obs[lookback:].any():
                    continue
                xs.append(np.where(obs[:lookback], w[:lookback], 0.0))
                ms.append(obs)
                ys.append(np.where(obs[lookback:], w[lookback:], 0.0))
        x = np.stack(xs).astype(np.float32)
        m = np.stack(ms)
        x = fill_for_dlinear(x, m[:, :lookback])
        return x, np.stack(ys).astype(np.float32), m[:, lookback:].astype(np.float32)

    xt, yt, mt = cut(train_values, stride)
    xv, yv, mv = cut(val_values, 24)
    cfg = DLinearConfig(lookback=lookback, horizon=horizon, channels=channels, max_epochs=epochs, seed=seed)

    def batches(rng, bs=cfg.batch_size):
        order = rng.permutation(len(xt))
        return [(xt[order[a : a + bs]], yt[order[a : a + bs]], mt[order[a : a + bs]]) for a in range(0, len(xt), bs)]

    val = [(xv[a : a + 512], yv[a : a + 512], mv[a : a + 512]) for a in range(0, len(xv), 512)]
    fit = train_dlinear(cfg, batches, val)
    fit.n_train_windows = len(xt)  # type: ignore[attr-defined]
    return fit


def _imputation_only(impute: Callable, ss) -> Callable:
    """An imputation-only :data:`Imputer` that skips ``score_imputer``'s forecast call.

    ``score_imputer`` calls the imputer once more with the windows' real observed mask, only for the forecast; an
    imputer without a forecast would impute every window again for nothing (minutes for BRITS), so that call, the
    only one whose mask equals the real mask, returns (None, None).
    """
    real = ss.windows.observed[:, : ss.windows.lookback]

    def fn(values: np.ndarray, observed: np.ndarray, calendar: np.ndarray):
        if observed.shape == real.shape and np.array_equal(observed, real):
            return None, None
        return impute(values, observed), None

    return fn


def _dlinear_imputer(model) -> Callable:
    import torch

    from gapcast.bench.dlinear import fill_for_dlinear

    def fn(values: np.ndarray, observed: np.ndarray, calendar: np.ndarray):
        x = fill_for_dlinear(values, observed)
        with torch.no_grad():
            fc = np.concatenate([model(torch.from_numpy(x[a : a + 1024])).numpy() for a in range(0, len(x), 1024)])
        return None, fc

    return fn


def _wanted(opts: AccuracyOptions, name: str) -> bool:
    return opts.methods is None or any(name.lower().startswith(m.lower()) for m in opts.methods)


def run_accuracy(
    *,
    run_dir: str | os.PathLike | None,
    bundle_path: str | os.PathLike | None = None,
    data=None,
    options: AccuracyOptions | None = None,
    progress: bool = True,
    dataset=None,
) -> dict[str, Any]:
    """Run the accuracy benchmark (``dataset``: a spec or preset; default the run's own, else ``beijing``).

    Stages: :func:`_setup` (checkpoint, bundle, data, normaliser, scenarios), then each family of methods scored on
    the same scenarios (:func:`_score_confill`, :func:`_score_untrained`, :func:`_score_pypots`,
    :func:`_score_dlinear`), then the network scenarios (:func:`_network_scores`).

    Args:
        run_dir: ConFill's training run folder (best.pt, history.jsonl); None skips ConFill fp32 (torch).
        bundle_path: the exported bundle whose variants are scored through onnxruntime; None skips them.
        data: data root (None: ``$GAPCAST_DATA`` / cache).
        options: :class:`AccuracyOptions`.
        progress: progress bars.

    Returns:
        A JSON-ready dict: protocol, per-method scores (``score_imputer`` output), training and scoring times,
        targets.

    Raises:
        GapcastError subclasses: missing data, unreadable checkpoint or bundle.
    """
    import torch

    opts = options or AccuracyOptions()
    torch.set_num_threads(opts.threads)
    st = _setup(run_dir, bundle_path, data, dataset, opts)
    table = _MethodTable(st.ss, progress)
    _score_confill(table, st, opts, progress)
    _score_untrained(table, st.H, opts)
    tr, va = _training_sets(st)
    budget_s, budget_rule = _budget_rule(opts, st.confill_train_s)
    _score_pypots(table, st, tr, va, budget_s, opts, progress)
    if _wanted(opts, "DLinear"):
        _score_dlinear(table, st, tr, va, opts)
    network = _network_scores(st, opts)
    methods = table.methods
    return {
        "benchmark": "accuracy",
        "protocol": {**st.ss.protocol, "methods": __doc__.split("\n\n")[2].replace("\n", " "),
                     "baseline_budget_rule": budget_rule},
        "options": dataclasses.asdict(opts),
        "confill_run": str(run_dir) if run_dir else None,
        "bundle": str(st.bundle.path) if st.bundle else None,
        "methods": methods,
        "targets": accuracy_targets(methods),
        "network": network,
    }


@dataclasses.dataclass
class _Setup:
    """What every method of one accuracy run is scored on (built by :func:`_setup`)."""

    spec: Any  # DatasetSpec
    series: dict  # station -> StationSeries
    normalizer: Any  # Normalizer: the checkpoint's, else the bundle's, else fitted on the training months
    L: int
    H: int
    ss: Any  # ScenarioSet
    model: Any  # the ConFill checkpoint (torch) or None
    bundle: Any  # the verified Bundle or None
    confill_train_s: float | None  # ConFill's recorded training time, seconds


def _load_confill(run_dir: str | os.PathLike | None):
    """ConFill's checkpoint, its meta, normaliser and recorded training time, or four Nones without a run.

    Raises:
        CheckpointError (GapcastError): an unreadable checkpoint.
    """
    if run_dir is None:
        return None, None, None, None
    from gapcast.train.checkpoint import load_checkpoint
    from gapcast.train.data import Normalizer

    model, meta = load_checkpoint(run_dir)
    normalizer = Normalizer.from_dict(meta["normalizer"])
    train_s = _confill_train_s(Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent)
    return model, meta, normalizer, train_s


def _setup(run_dir, bundle_path, data, dataset, opts: AccuracyOptions) -> _Setup:
    """Load the checkpoint and the bundle, the dataset, the normaliser and L / H (the checkpoint's, else the
    bundle's, else 4 days / 1 day), and build the test scenarios every method is scored on.

    Raises:
        GapcastError subclasses: missing data, a bad spec, an unreadable checkpoint or bundle.
    """
    from gapcast.duration import steps_of
    from gapcast.train.data import Normalizer
    from gapcast.train.evaluate import build_scenarios, spec_of_run
    from gapcast.train.loader import load_dataset, split_indices

    model, meta, normalizer, confill_train_s = _load_confill(run_dir)
    spec = spec_of_run(meta or {}, dataset)
    series = load_dataset(spec, data)
    L, H = steps_of("4d", spec.cadence_s, key="lookback"), steps_of("1d", spec.cadence_s, key="horizon")
    if meta is not None:
        L, H = int(meta["config"]["lookback"]), int(meta["config"]["horizon"])
    bundle = None
    if bundle_path is not None:
        from gapcast.bench.runtime import verify_local_bundle

        bundle = verify_local_bundle(bundle_path)
        if normalizer is None:
            normalizer = Normalizer(mean=bundle.card.mean, std=bundle.card.std)
            L, H = bundle.card.lookback, bundle.card.horizon
    if normalizer is None:
        normalizer = Normalizer.fit([s.values[split_indices(spec, s).train] for s in series.values()])
    t0 = time.perf_counter()
    ss = build_scenarios(series, normalizer, channels=spec.channel_names, lookback=L, horizon=H,
                         stride=opts.stride, max_windows=opts.max_windows, seed=opts.seed, spec=spec)
    log.info("%d test windows, scenarios built in %.1f s", len(ss.windows), time.perf_counter() - t0)
    return _Setup(spec=spec, series=series, normalizer=normalizer, L=L, H=H, ss=ss, model=model, bundle=bundle,
                  confill_train_s=confill_train_s)


class _MethodTable:
    """The methods scored so far, in the order they ran: name -> scores, times, note (and a method's extras)."""

    def __init__(self, ss, progress: bool) -> None:
        self.ss = ss
        self.progress = progress
        self.methods: dict[str, dict[str, Any]] = {}

    def add(self, name: str, fn: Callable, train_s: float | None, note: str, extra: dict | None = None) -> None:
        """Score ``fn`` on every scenario (``score_imputer``) and record it; raises what the imputer raises."""
        from gapcast.train.evaluate import score_imputer

        t = time.perf_counter()
        scores = score_imputer(fn, self.ss, name=name)
        self.methods[name] = {"scores": scores, "train_s": train_s, "score_s": round(time.perf_counter() - t, 1),
                              "note": note, **(extra or {})}
        if self.progress:
            print(f"  scored {name} in {self.methods[name]['score_s']:.0f} s", flush=True)


def _score_confill(table: _MethodTable, st: _Setup, opts: AccuracyOptions, progress: bool) -> None:
    """ConFill fp32 from the checkpoint (torch eager), then every precision variant of the bundle through
    onnxruntime (the gateway's backend). Raises BackendError when a variant does not load."""
    from gapcast.train.evaluate import model_imputer

    if st.model is not None and _wanted(opts, "ConFill fp32"):
        table.add("ConFill fp32 (torch)", model_imputer(st.model, progress=progress), st.confill_train_s,
                  "the training checkpoint, torch eager")
    if st.bundle is not None and _wanted(opts, "ConFill"):
        from gapcast.edge.backends import OrtBackend

        card = st.bundle.card
        n_cal = len(card.calendar.get("features", [])) or int(card.inputs[2]["shape"][2])
        for variant in card.variants:
            be = OrtBackend(st.bundle.variant_path(variant), lookback=card.lookback, horizon=card.horizon,
                            n_channels=len(card.channels), n_calendar=n_cal,
                            precision=str(card.variants[variant].get("precision", variant)), threads=opts.threads,
                            providers=["CPUExecutionProvider"])
            table.add(f"ConFill {variant} (onnxruntime)", _ort_imputer(be), st.confill_train_s, be.describe())


def _score_untrained(table: _MethodTable, H: int, opts: AccuracyOptions) -> None:
    """LOCF (forecast: persistence), linear interpolation and seasonal naive (24 h); raises nothing."""
    from gapcast.train.evaluate import baseline_imputers

    for name, fn in baseline_imputers(H).items():
        label = {"locf": "LOCF", "linear": "linear interpolation", "seasonal_naive": "seasonal naive (24 h)"}[name]
        if _wanted(opts, label):
            table.add(label, fn, 0.0, {"locf": "imputation: LOCF (leading gap: next observation); forecast: persistence",
                                       "linear": "imputation only", "seasonal_naive": "forecast only"}[name])


def _training_sets(st: _Setup) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training / validation months for the learned baselines, per station (sorted by name) [T, C], normalised
    with the same training statistics; raises nothing."""
    from gapcast.train.loader import split_indices

    tr, va = [], []
    for name in sorted(st.series):
        s = st.series[name]
        sp = split_indices(st.spec, s)
        tr.append(st.normalizer.transform(s.values[sp.train]))
        va.append(st.normalizer.transform(s.values[sp.val]))
    return tr, va


def _budget_rule(opts: AccuracyOptions, confill_train_s: float | None) -> tuple[float, str]:
    """The SAITS / BRITS training budget in seconds (``--baseline-budget-min``, else ConFill's recorded training
    time, else 10 min) and the sentence that states it; raises nothing."""
    budget_s = opts.baseline_budget_s if opts.baseline_budget_s is not None else (confill_train_s or 600.0)
    budget_rule = (
        f"SAITS and BRITS each trained for a wall-clock budget of {budget_s / 60:.1f} min on this machine's CPU "
        + ("(ConFill's own recorded training time)" if opts.baseline_budget_s is None and confill_train_s else
           "(set by --baseline-budget-min" + (f"; ConFill trained {confill_train_s / 60:.1f} min)"
                                              if confill_train_s else ")"))
        + f", epoch by epoch (cap {opts.pypots_max_epochs}), best validation MSE kept"
    )
    return budget_s, budget_rule


def _score_pypots(table: _MethodTable, st: _Setup, tr, va, budget_s: float, opts: AccuracyOptions,
                  progress: bool) -> None:
    """SAITS and BRITS (PyPOTS, imputation only): reused from ``models_dir`` when the config matches, else trained
    here under the budget. Without PyPOTS each is recorded with an ``error`` (not raised)."""
    from gapcast.bench import pypots_baselines as pb

    pyp_sets = None
    models_dir = Path(opts.models_dir) if opts.models_dir else None
    for method in ("SAITS", "BRITS"):
        if not _wanted(opts, method):
            continue
        try:
            import pypots  # noqa: F401
        except ImportError:
            table.methods[method] = {"error": "pypots is not installed: pip install 'gapcast[bench]'"}
            continue
        cfg = pb.PypotsConfig(method=method, lookback=st.L, channels=len(st.spec.channel_names),
                              budget_s=float(budget_s), max_epochs=opts.pypots_max_epochs, seed=opts.seed)
        fit = pb.load_fit(cfg, models_dir) if models_dir else None
        reused = fit is not None
        if fit is None:
            if pyp_sets is None:
                pyp_sets = pb.beijing_pypots_sets(tr, va, lookback=st.L, stride=opts.pypots_stride,
                                                  max_train_windows=opts.pypots_train_windows, seed=opts.seed)
                n_val = len(pyp_sets[1]["X"])
                keep = np.linspace(0, n_val - 1, min(n_val, 512)).round().astype(np.int64)  # all stations
                pyp_sets[1].update({k: v[keep] for k, v in pyp_sets[1].items()})
            fit = pb.train_pypots(cfg, *pyp_sets, progress=progress)
            if models_dir:
                pb.save_fit(fit, models_dir)
        table.add(method, _imputation_only(lambda v, m, fm=fit.model: pb.pypots_impute(fm, v, m), st.ss), fit.train_s,
                  f"PyPOTS {method}, imputation only; " + ("weights reused from an earlier run with the same config"
                                                           if reused else "trained in this run"),
                  {"training": fit.summary()})


def _score_dlinear(table: _MethodTable, st: _Setup, tr, va, opts: AccuracyOptions) -> None:
    """DLinear (forecast only), trained here on the training months; raises what its training raises."""
    fit = train_dlinear_beijing(tr, va, lookback=st.L, horizon=st.H, channels=len(st.spec.channel_names),
                                stride=opts.dlinear_stride, epochs=opts.dlinear_epochs, seed=opts.seed)
    table.add("DLinear", _dlinear_imputer(fit.model), fit.train_s,
              "forecast only; input window filled by linear interpolation; trained on the training months",
              {"training": {"epochs": fit.epochs, "stopped": fit.stopped, "best_val_mse": fit.best_val_mse,
                            "n_train_windows": getattr(fit, "n_train_windows", None)}})


def _network_scores(st: _Setup, opts: AccuracyOptions) -> dict[str, Any] | None:
    """Outages by what the neighbours see (issue 20, :func:`gapcast.train.network_eval.evaluate_network`); None
    for one station or ``network_trials = 0``. A test range shorter than a network trial is logged and recorded as
    ``{"skipped": why}`` (the other tables stand), not raised."""
    if not (len(st.series) > 1 and opts.network_trials > 0):
        return None
    from gapcast.calendar import calendar_features
    from gapcast.train import TrainError
    from gapcast.train.evaluate import model_imputer
    from gapcast.train.loader import split_indices
    from gapcast.train.network_eval import evaluate_network

    spec = st.spec
    nets = {"ConFill fp32 (torch)": model_imputer(st.model, progress=False)} if st.model is not None else None
    try:
        return evaluate_network(st.series, st.normalizer, channels=spec.channel_names, group=st.ss.group,
                                group_name=next(iter(spec.groups), "all channels"), lookback=st.L, horizon=st.H,
                                trials=opts.network_trials, seed=opts.seed, models=nets,
                                coordinates=spec.coordinates(list(st.series)),
                                calendar=lambda e: calendar_features(e, spec.utc_offset_s, timezone=spec.timezone),
                                split=lambda s: split_indices(spec, s, check=False))
    except TrainError as exc:  # a test range shorter than a network trial: the other tables stand
        log.warning("network scenarios skipped: %s", exc)
        return {"skipped": str(exc)}


def _mae(methods: dict, name: str, part: str) -> float | None:
    try:
        return methods[name]["scores"][part]["all_norm"]["mae"]
    except (KeyError, TypeError):
        return None


def accuracy_targets(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's accuracy targets, each with the measured value and the margin (positive = met by that much).

    * ConFill's block-72 h imputation MAE (normalised) below SAITS and below BRITS;
    * each int8 variant's MAE within 3 % of ConFill fp32 (onnxruntime) on every scenario and the forecast.
    """
    out = []
    ours = next((n for n in ("ConFill fp32 (torch)", "ConFill fp32 (onnxruntime)") if _mae(methods, n, "block-72h")),
                None)
    for rival in ("SAITS", "BRITS"):
        a, b = _mae(methods, ours, "block-72h") if ours else None, _mae(methods, rival, "block-72h")
        if a is None or b is None:
            continue
        out.append({"target": f"{ours} block-72h MAE below {rival}", "measured": a, "goal": b, "met": a < b,
                    "margin": (b - a) / b, "margin_text": f"{(b - a) / b:+.1%} relative to {rival}"})
    ref = "ConFill fp32 (onnxruntime)" if "ConFill fp32 (onnxruntime)" in methods else "ConFill fp32 (torch)"
    for name in methods:
        if "int8" not in name:
            continue
        worst, where = 0.0, None
        for part in (*SCENARIOS, "forecast"):
            a, b = _mae(methods, name, part), _mae(methods, ref, part)
            if a is None or b is None:
                continue
            rel = abs(a - b) / b
            if rel >= worst:
                worst, where = rel, part
        if where is None:
            continue
        out.append({"target": f"{name} MAE within {INT8_TOLERANCE:.0%} of {ref} (every scenario and forecast)",
                    "measured": worst, "goal": INT8_TOLERANCE, "met": worst <= INT8_TOLERANCE,
                    "margin": INT8_TOLERANCE - worst, "margin_text": f"worst {worst:.2%} ({where})"})
    return out


def method_order(methods: Sequence[str]) -> list[str]:
    """Report order: ConFill variants first, then the rest as run."""
    return sorted(methods, key=lambda n: (not n.startswith("ConFill"), list(methods).index(n)))
