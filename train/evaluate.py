"""The evaluation protocol on a dataset spec's test range, reusable with any imputer.

(Over 600 lines on purpose: the scenarios, their masks and their scoring must stay in one place so every
method is provably scored on the same windows and hidden cells.)

Two steps, kept apart so benchmarks can score other imputers on exactly the same hidden values:

1. :func:`build_scenarios` cuts the test months into windows and draws the fixed masks of every scenario
   (point-10%, blocks of 6 h / 24 h / 72 h over each outage group and the whole station, real pattern) from one
   seed;
2. :func:`score_imputer` runs an imputer ``fn(values, observed, calendar) -> (imputed, forecast)`` on every scenario
   and on the forecast task and returns MAE / RMSE / MRE per channel in original units and on normalised values.

Each scenario is scored only on values that were observed and then hidden. :func:`evaluate_run` does both for a
training run, adds LOCF, linear interpolation and seasonal naive, and writes metrics.json, metrics.md and plots.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gapcast.baselines import linear_interpolate, locf, seasonal_naive
from gapcast.duration import format_duration, steps_of
from gapcast.train import TrainError
from gapcast.train.data import (
    Normalizer,
    StationSeries,
    make_windows,
)
from gapcast.train.spec import DatasetSpec, load_spec

__all__ = [
    "EvalReport",
    "Imputer",
    "Scenario",
    "ScenarioSet",
    "EvalWindows",
    "baseline_imputers",
    "build_scenarios",
    "evaluate_run",
    "model_imputer",
    "score_imputer",
    "eval_windows",
]

log = logging.getLogger(__name__)

#: ``fn(values [N, L, C], observed [N, L, C], calendar [N, L+H, F]) -> (imputed [N, L, C], forecast [N, H, C] or
#: None)``, numpy float32, normalised; ``values`` is 0 where ``observed`` is 0.
Imputer = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray | None, np.ndarray | None]]

#: Outage block lengths of the block scenarios (durations, converted with the dataset's cadence).
BLOCKS = ("6h", "24h", "72h")
POINT_RATE = 0.1


def _spec_or_default(spec: DatasetSpec | None) -> DatasetSpec:
    return spec if spec is not None else load_spec("beijing")


@dataclass
class EvalWindows:
    """Test windows of L + H steps.

    Attributes:
        values: [N, L+H, C] float32, normalised, 0 where unobserved.
        observed: [N, L+H, C] float32 0/1 (the real sensor record).
        calendar: [N, L+H, F] float32.
        station: [N] int64 index into ``stations``.
        start_epoch_s: [N] int64 UTC start time of each window.
        stations: station names.
        lookback: L.
        horizon: H.
    """

    values: np.ndarray
    observed: np.ndarray
    calendar: np.ndarray
    station: np.ndarray
    start_epoch_s: np.ndarray
    stations: list[str]
    lookback: int
    horizon: int

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Scenario:
    """One imputation scenario: which observed past values are hidden.

    Attributes:
        name: ``point-10%``, ``block-6h``, ``block-24h``, ``block-72h``, ``real-pattern``.
        hidden: [N, L, C] bool, True where an observed value is hidden (and scored).
        description: how the mask was drawn (goes into metrics.json).
    """

    name: str
    hidden: np.ndarray
    description: str


@dataclass
class ScenarioSet:
    """Windows, fixed masks and what is needed to score in original units.

    Attributes:
        windows: the :class:`EvalWindows`.
        scenarios: the imputation scenarios, in report order.
        normalizer: the training normaliser (to go back to original units).
        channels: channel names.
        group: indices of the first outage group of the spec (the headline ``group_norm`` figures and the plain
            ``block-6h`` / ``block-24h`` / ``block-72h`` scenarios are over it; all channels when the spec has none).
        protocol: the protocol as written into metrics.json (split, stride, seeds, ...).
        groups: every outage group, name -> channel indices.
    """

    windows: EvalWindows
    scenarios: list[Scenario]
    normalizer: Normalizer
    channels: tuple[str, ...]
    group: tuple[int, ...] = ()
    protocol: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)


def eval_windows(
    series: dict[str, StationSeries],
    normalizer: Normalizer,
    *,
    lookback: int,
    horizon: int,
    utc_offset_s: int = 0,
    stride: int = 24,
    max_windows: int | None = None,
    min_observed: float = 0.5,
    spec: DatasetSpec | None = None,
) -> EvalWindows:
    """Windows over the test range of each station (the spec's split).

    Args:
        series: station name -> series.
        normalizer: the training normaliser.
        lookback, horizon: L and H, steps.
        utc_offset_s: local time of the calendar features, seconds (the spec's time zone when ``spec`` is given).
        spec: the dataset spec (split, time zone); the ``beijing`` preset when None.
        stride: steps between window starts.
        max_windows: at most this many windows per station (evenly spaced), None for all.
        min_observed: keep windows whose past has at least this share of cells observed.

    Returns:
        :class:`EvalWindows`.

    Raises:
        TrainError: if no window survives.
    """
    from gapcast.train.loader import split_indices

    spec = _spec_or_default(spec)
    names = sorted(series)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("v", "m", "c", "s", "t")}
    for k, name in enumerate(names):
        s = series[name]
        sp = split_indices(spec, s)
        ws = make_windows(
            [normalizer.transform(s.values[sp.test])], [s.epoch_s[sp.test]], lookback=lookback, horizon=horizon,
            stride=stride, min_observed=min_observed, utc_offset_s=spec.utc_offset_s, timezone=spec.timezone,
        )
        idx = np.arange(len(ws))
        if max_windows is not None and len(idx) > max_windows:
            idx = np.linspace(0, len(ws) - 1, max_windows).round().astype(np.int64)
        if len(idx) == 0:
            continue
        v, m, c = ws.batch(idx)
        parts["v"].append(v)
        parts["m"].append(m)
        parts["c"].append(c)
        parts["s"].append(np.full(len(idx), k, dtype=np.int64))
        parts["t"].append(s.epoch_s[sp.test][ws.starts[idx, 1]])
    if not parts["v"]:
        msg = "no test window has enough observed values"
        raise TrainError(msg)
    return EvalWindows(
        values=np.concatenate(parts["v"]), observed=np.concatenate(parts["m"]), calendar=np.concatenate(parts["c"]),
        station=np.concatenate(parts["s"]), start_epoch_s=np.concatenate(parts["t"]), stations=names,
        lookback=lookback, horizon=horizon,
    )


def _donor_masks(series: dict[str, StationSeries], lookback: int, rng: np.random.Generator,
                 spec: DatasetSpec | None = None) -> np.ndarray:
    """Real missing patterns: [D, L, C] bool observed masks of training/validation windows that have gaps."""
    from gapcast.train.loader import split_indices

    spec = _spec_or_default(spec)
    donors = []
    for name in sorted(series):
        s = series[name]
        sp = split_indices(spec, s)
        obs = s.observed[: sp.val.stop]
        starts = np.arange(0, len(obs) - lookback + 1, lookback // 2)
        for t0 in starts:
            w = obs[t0 : t0 + lookback]
            missing = 1.0 - w.mean()
            if 0.02 <= missing <= 0.6:
                donors.append(w)
    if not donors:
        msg = "no real outage pattern found in the training/validation months"
        raise TrainError(msg)
    out = np.stack(donors)
    return out[rng.permutation(len(out))]


def build_scenarios(
    series: dict[str, StationSeries],
    normalizer: Normalizer,
    *,
    channels: Sequence[str],
    lookback: int | None = None,
    horizon: int | None = None,
    utc_offset_s: int = 0,
    stride: int = 24,
    max_windows: int | None = None,
    seed: int = 0,
    spec: DatasetSpec | None = None,
) -> ScenarioSet:
    """Test windows and the fixed masks of every scenario (README, "Measured figures").

    * point-10%: each observed value of the past window is hidden with probability 0.1 (all channels);
    * block-6h / 24h / 72h: one block over the spec's first outage group at once, uniformly placed inside the past
      window with at least one step before and after it (so interpolation has both sides);
    * real-pattern: the observed mask of a window from the training/validation range (any station) that really
      had gaps is transplanted: observed test values that the donor lacks are hidden;
    * block-6h:GROUP / ... for every further group, and block-6h:station / ... over the whole station (drawn after
      the others, so the masks above do not depend on how many groups a spec has).

    Args:
        series: station name -> series (the whole history; only the test range is scored).
        normalizer: the training normaliser.
        channels: channel names, in column order.
        lookback, horizon: L and H, steps (default 4 days / 1 day of the spec's cadence).
        utc_offset_s: unused (the spec's time zone gives the calendar features); kept for old callers.
        stride: steps between window starts.
        max_windows: cap per station.
        seed: seed of every mask (same seed, same masks).
        spec: the dataset spec (split, time zone, groups, cadence); the ``beijing`` preset when None.

    Returns:
        :class:`ScenarioSet`.
    """
    spec = _spec_or_default(spec)
    lookback = lookback or steps_of("4d", spec.cadence_s, key="lookback")
    horizon = horizon or steps_of("1d", spec.cadence_s, key="horizon")
    tw = eval_windows(series, normalizer, lookback=lookback, horizon=horizon, stride=stride,
                      max_windows=max_windows, spec=spec)
    L = lookback
    obs = tw.observed[:, :L].astype(bool)
    N, _, C = obs.shape
    rng = np.random.default_rng(seed)
    scenarios = [Scenario("point-10%", obs & (rng.random(obs.shape) < POINT_RATE),
                          f"each observed past value hidden with probability {POINT_RATE}")]
    groups = dict(spec.groups)
    first_name, first = next(iter(groups.items())) if groups else ("station", tuple(range(C)))

    def blocks(chan_idx: tuple[int, ...], label: str, suffix: str) -> None:
        sel = np.zeros(C, dtype=bool)
        sel[list(chan_idx)] = True
        for text in BLOCKS:
            n = min(steps_of(text, spec.cadence_s, key="evaluation block"), L - 2)
            t0 = rng.integers(1, L - n, size=N)  # block [t0, t0 + n) with >= 1 step either side
            t = np.arange(L)
            in_block = (t[None, :] >= t0[:, None]) & (t[None, :] < t0[:, None] + n)  # [N, L]
            scenarios.append(Scenario(f"block-{text}{suffix}", obs & in_block[:, :, None] & sel[None, None, :],
                                      f"{n} consecutive steps of {label} hidden, inside the window"))

    blocks(first, f"every channel of the group {first_name!r}", "")
    donors = _donor_masks(series, L, rng, spec)
    pick = rng.integers(0, len(donors), size=N)
    scenarios.append(Scenario("real-pattern", obs & ~donors[pick],
                              "the observed mask of a training/validation window with 2-60% missing transplanted"))
    for gname, gidx in list(groups.items())[1:]:
        blocks(gidx, f"every channel of the group {gname!r}", f":{gname}")
    if groups:
        blocks(tuple(range(C)), "every channel (the whole station)", ":station")
    protocol = _protocol(spec, channels, groups, first_name, scenarios, eval_windows=int(N), stations=tw.stations,
                         lookback=L, horizon=horizon, stride=stride, max_windows=max_windows, seed=seed)
    return ScenarioSet(windows=tw, scenarios=scenarios, normalizer=normalizer, channels=tuple(channels),
                       group=tuple(first), protocol=protocol, groups=groups)


def _protocol(spec, channels: Sequence[str], groups: dict, first_name: str, scenarios: list[Scenario], *,
              eval_windows: int, stations, lookback: int, horizon: int, stride: int, max_windows, seed: int
              ) -> dict[str, Any]:
    """The ``protocol`` record of :func:`build_scenarios`: dataset, split, windows and scenario descriptions, written
    into the evaluation report. Raises nothing.
    """
    N, L = eval_windows, lookback
    split = (f"shares {list(spec.split.shares)} of each station's span" if spec.split.shares else
             f"train {list(spec.split.train)}, validation {list(spec.split.validation)}, test {list(spec.split.test)}"
             f" ({spec.timezone}, end exclusive)")
    return {
        "dataset": f"{spec.name}, cadence {spec.cadence}, time zone {spec.timezone}",
        "split": f"by time: {split}; normalisation fitted on train",
        "cadence_s": spec.cadence_s,
        "groups": {k: [channels[i] for i in v] for k, v in groups.items()},
        "headline_group": first_name,
        "eval_windows": N,
        "stations": stations,
        "lookback_L": L,
        "horizon_H": horizon,
        "stride_steps": stride,
        "max_windows_per_station": max_windows,
        "min_observed_share": 0.5,
        "seed": seed,
        "scored_on": "only values that were observed and then hidden; forecast on observed future values",
        "scenarios": {s.name: s.description for s in scenarios},
        "forecast": f"H = {horizon} from L = {L}, the window's real observed mask only",
        "headline": f"MAE on normalised values over the hidden values (blocks: the group {first_name!r})",
    }


def _errors(pred: np.ndarray, truth: np.ndarray, sel: np.ndarray, ss: ScenarioSet) -> dict[str, Any]:
    """MAE / RMSE / MRE over the selected cells: overall and over the first group (normalised), per channel."""
    sel = sel.astype(bool)
    err = pred - truth
    std = ss.normalizer.std.astype(np.float64)
    mean = ss.normalizer.mean.astype(np.float64)
    truth_orig = truth * std + mean

    def agg(mask: np.ndarray) -> dict[str, float]:
        n = int(mask.sum())
        if n == 0:
            return {"n": 0, "mae": None, "rmse": None, "mre": None}
        e = err[mask].astype(np.float64)
        return {"n": n, "mae": float(np.abs(e).mean()), "rmse": float(np.sqrt((e**2).mean())),
                "mre": float(np.abs(e).sum() / max(np.abs(truth[mask]).sum(), 1e-12))}

    grp = np.zeros(sel.shape[-1], dtype=bool)
    grp[list(ss.group) if ss.group else slice(None)] = True
    per_channel = {}
    for j, name in enumerate(ss.channels):
        mj = sel[..., j]
        n = int(mj.sum())
        if n == 0:
            per_channel[name] = {"n": 0}
            continue
        e_n = err[..., j][mj].astype(np.float64)
        e_o = e_n * std[j]
        per_channel[name] = {
            "n": n,
            "mae": float(np.abs(e_o).mean()),
            "rmse": float(np.sqrt((e_o**2).mean())),
            "mre": float(np.abs(e_o).sum() / max(np.abs(truth_orig[..., j][mj]).sum(), 1e-12)),
            "mae_norm": float(np.abs(e_n).mean()),
            "rmse_norm": float(np.sqrt((e_n**2).mean())),
        }
    return {"all_norm": agg(sel), "group_norm": agg(sel & grp), "per_channel": per_channel}


def score_imputer(fn: Imputer, ss: ScenarioSet, *, name: str = "imputer") -> dict[str, Any]:
    """Score one imputer on every scenario and on the forecast task.

    Args:
        fn: the :data:`Imputer`; it may return None for a part it does not do (e.g. no forecast).
        ss: the scenarios (same masks for every imputer).
        name: label for logs.

    Returns:
        ``{scenario name: errors, ..., "forecast": errors}``; errors hold ``all_norm`` and ``group_norm``
        ({n, mae, rmse, mre} on normalised values) and ``per_channel`` ({n, mae, rmse, mre} in original units plus
        mae_norm, rmse_norm). A part the imputer does not do is absent.

    Raises:
        TrainError: if the imputer returns the wrong shape or non-finite values where scored.
    """
    tw = ss.windows
    L = tw.lookback
    truth = tw.values[:, :L]
    out: dict[str, Any] = {}
    for sc in ss.scenarios:
        obs_in = tw.observed[:, :L] * (~sc.hidden)
        imputed, _ = fn(truth * obs_in, obs_in.astype(np.float32), tw.calendar)
        if imputed is None:
            continue
        _check(imputed, truth.shape, sc.hidden, f"{name}/{sc.name}")
        out[sc.name] = _errors(imputed, truth, sc.hidden, ss)
        log.info("%s %s: MAE %.4f", name, sc.name, out[sc.name]["all_norm"]["mae"])
    _, forecast = fn(truth * tw.observed[:, :L], tw.observed[:, :L], tw.calendar)
    if forecast is not None:
        target_obs = tw.observed[:, L:].astype(bool)
        _check(forecast, tw.values[:, L:].shape, target_obs, f"{name}/forecast")
        out["forecast"] = _errors(forecast, tw.values[:, L:], target_obs, ss)
    return out


def _check(pred: np.ndarray, shape: tuple[int, ...], sel: np.ndarray, what: str) -> None:
    if pred.shape != shape:
        msg = f"{what}: expected shape {shape}, got {pred.shape}"
        raise TrainError(msg)
    if not np.all(np.isfinite(pred[sel.astype(bool)])):
        msg = f"{what}: non-finite values where scored"
        raise TrainError(msg)


def baseline_imputers(horizon: int, season: int = 24) -> dict[str, Imputer]:
    """The simple baselines as :data:`Imputer` functions (``gapcast.baselines``).

    Returns:
        ``locf`` (imputation: LOCF; forecast: persistence of the last LOCF value), ``linear`` (imputation only),
        ``seasonal_naive`` (forecast only: the value ``season`` steps earlier).
    """

    def _locf(v, m, c):
        filled = locf(v, m)
        return filled, np.repeat(filled[:, -1:], horizon, axis=1)

    def _linear(v, m, c):
        return linear_interpolate(v, m), None

    def _seasonal(v, m, c):
        return None, seasonal_naive(v, m, horizon, season=season)

    return {"locf": _locf, "linear": _linear, "seasonal_naive": _seasonal}


def model_imputer(model, *, batch_size: int = 256, progress: bool = True) -> Imputer:
    """Wrap a ConFill model (eval mode, no gradients, batched) as an :data:`Imputer`.

    The returned function also takes ``context, context_observed`` ([N, L, G] float32, keyword or positional) for
    a model with neighbour context; without them a context model runs with empty context (no neighbour)."""
    import torch
    from tqdm.auto import tqdm

    model.eval()

    def fn(values: np.ndarray, observed: np.ndarray, calendar: np.ndarray, context=None, context_observed=None):
        imps, fcs = [], []

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

        with torch.no_grad():
            for a in tqdm(range(0, len(values), batch_size), desc="confill", disable=not progress, leave=False):
                sl = slice(a, a + batch_size)
                ctx = (t(context[sl]), t(context_observed[sl])) if context is not None else ()
                imp, fc = model(t(values[sl]), t(observed[sl]), t(calendar[sl]), *ctx)
                imps.append(imp.numpy())
                fcs.append(fc.numpy())
        return np.concatenate(imps), np.concatenate(fcs)

    return fn


@dataclass
class EvalReport:
    """What :func:`evaluate_run` wrote."""

    metrics: dict[str, Any]
    markdown: str
    json_path: Path
    markdown_path: Path
    plots: list[Path]


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.4f}"


def _markdown(metrics: dict[str, Any], ss: ScenarioSet) -> str:
    res = metrics["results"]
    lines = [f"# ConFill evaluation ({ss.protocol['dataset']}, test range)", ""]
    p = ss.protocol
    lines += [f"Protocol: {p['split']}. {p['eval_windows']} windows of L={p['lookback_L']} (+H={p['horizon_H']}) "
              f"steps, stride {p['stride_steps']}, {len(p['stations'])} stations, mask seed {p['seed']}. "
              f"Scored {p['scored_on']}.", ""]
    lines += [f"## Imputation: MAE on normalised values (block-*: the group {p['headline_group']!r}; "
              "block-*:GROUP: that group; :station: every channel)", "",
              "| scenario | hidden values | ConFill | LOCF | linear | ConFill vs best baseline |",
              "|---|---:|---:|---:|---:|---:|"]
    for sc in ss.scenarios:
        key = "all_norm"
        ours = res["confill"][sc.name][key]["mae"]
        lo, li = res["locf"][sc.name][key]["mae"], res["linear"][sc.name][key]["mae"]
        best = min(lo, li)
        rel = f"{100 * (ours - best) / best:+.1f}%" if best > 0 else "n/a"
        lines.append(f"| {sc.name} | {res['confill'][sc.name][key]['n']} | {_fmt(ours)} | {_fmt(lo)} | {_fmt(li)} "
                     f"| {rel} |")
    lines += ["", "## Imputation: RMSE on normalised values", "",
              "| scenario | ConFill | LOCF | linear |", "|---|---:|---:|---:|"]
    for sc in ss.scenarios:
        key = "all_norm"
        lines.append("| " + sc.name + " | " + " | ".join(_fmt(res[m][sc.name][key]["rmse"])
                                                        for m in ("confill", "locf", "linear")) + " |")
    lines += ["", f"## Forecast: H = {p['horizon_H']} from L = {p['lookback_L']}, observed targets, normalised", "",
              "| channels | ConFill MAE | seasonal naive MAE | persistence MAE | ConFill RMSE | seasonal naive RMSE "
              "| ConFill vs seasonal naive |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("all_norm", "all"), ("group_norm", p["headline_group"])):
        o, s, pe = (res[m]["forecast"][key] for m in ("confill", "seasonal_naive", "locf"))
        rel = f"{100 * (o['mae'] - s['mae']) / s['mae']:+.1f}%"
        lines.append(f"| {label} | {_fmt(o['mae'])} | {_fmt(s['mae'])} | {_fmt(pe['mae'])} | {_fmt(o['rmse'])} "
                     f"| {_fmt(s['rmse'])} | {rel} |")
    lines += ["", "## Per channel, original units: MAE (ConFill / linear) on block-24h and block-72h (station "
              "blocks where the spec has groups); forecast MAE (ConFill / seasonal naive)", "",
              "| channel | block-24h | block-72h | point-10% | forecast |", "|---|---:|---:|---:|---:|"]
    for ch in ss.channels:
        cells = []
        suffix = ":station" if "block-24h:station" in res["confill"] else ""
        for sc, base in ((f"block-24h{suffix}", "linear"), (f"block-72h{suffix}", "linear"), ("point-10%", "linear"),
                         ("forecast", "seasonal_naive")):
            o = res["confill"].get(sc, {}).get("per_channel", {}).get(ch, {})
            b = res[base].get(sc, {}).get("per_channel", {}).get(ch, {})
            cells.append(f"{o['mae']:.2f} / {b['mae']:.2f}" if o.get("n") else "-")
        lines.append(f"| {ch} | " + " | ".join(cells) + " |")
    t = metrics["targets"]
    lines += ["", "## Targets (issue 3)", ""]
    lines += [f"- {k}: {'met' if v['met'] else 'MISSED'} ({v['detail']})" for k, v in t.items()]
    lines.append("")
    return "\n".join(lines)


def _targets(res: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for sc in ("block-24h", "block-72h"):
        o = res["confill"][sc]["all_norm"]["mae"]
        b = min(res["linear"][sc]["all_norm"]["mae"], res["locf"][sc]["all_norm"]["mae"])
        out[f"{sc} MAE >= 20% below linear and LOCF"] = {
            "met": bool(o <= 0.8 * b), "detail": f"{100 * (o - b) / b:+.1f}% vs the better of the two"}
    o, b = res["confill"]["point-10%"]["all_norm"]["mae"], res["linear"]["point-10%"]["all_norm"]["mae"]
    out["point-10% MAE no worse than linear"] = {"met": bool(o <= b), "detail": f"{100 * (o - b) / b:+.1f}%"}
    o, b = res["confill"]["forecast"]["all_norm"]["mae"], res["seasonal_naive"]["forecast"]["all_norm"]["mae"]
    out["forecast MAE >= 15% below seasonal naive"] = {"met": bool(o <= 0.85 * b),
                                                      "detail": f"{100 * (o - b) / b:+.1f}%"}
    return out


def _plots(run_dir: Path, ss: ScenarioSet, preds: dict[str, dict[str, np.ndarray]],
           units: Sequence[str] | None, cadence_s: int) -> list[Path]:
    """For the first channel of each outage group: the median window through the longest block of that group,
    and the median forecast window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tw = ss.windows
    L, H = tw.lookback, tw.horizon
    paths = []
    longest = BLOCKS[-1]
    step_h = cadence_s / 3600.0
    targets = [(g, idx[0], f"block-{longest}" + ("" if k == 0 else f":{g}")) for k, (g, idx) in
               enumerate(ss.groups.items())] or [("station", 0, f"block-{longest}")]
    for gname, ch, sc_name in targets:
        name = ss.channels[ch]
        unit = units[ch] if units else ""
        std, mean = float(ss.normalizer.std[ch]), float(ss.normalizer.mean[ch])
        sc = next(s for s in ss.scenarios if s.name == sc_name)
        if sc.hidden[:, :, ch].any():
            i = _median_window(preds["confill"][sc_name][:, :, ch], tw.values[:, :L, ch], sc.hidden[:, :, ch])
            hours = np.arange(L) * step_h
            obs = tw.observed[i, :L, ch].astype(bool)
            truth = np.where(obs, tw.values[i, :L, ch] * std + mean, np.nan)
            hid = sc.hidden[i, :, ch]
            fig, ax = plt.subplots(figsize=(10, 4))
            ax.plot(hours, truth, "k.-", lw=1, ms=3, label="truth (observed)")
            for key, style, label in (("confill", "C1-", "ConFill"), ("linear", "C0--", "linear interpolation")):
                series = preds[key][sc_name][i, :, ch] * std + mean
                ax.plot(hours[hid], series[hid], style, lw=2, label=label)
            if hid.any():
                ax.axvspan(hours[hid].min() - step_h / 2, hours[hid].max() + step_h / 2, color="0.9",
                           label=f"{longest} outage (group {gname})")
            start = np.datetime64(int(tw.start_epoch_s[i]), "s")
            ax.set(title=f"{tw.stations[tw.station[i]]}: {name} through a {longest} outage, window from {start} UTC "
                   "(the median window by ConFill error)", xlabel="hours in window", ylabel=f"{name} ({unit})")
            ax.legend(loc="upper left", fontsize=8)
            fig.tight_layout()
            paths.append(run_dir / f"plot_block{longest}_{name}.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)

        sel = tw.observed[:, L:, ch] > 0
        if not sel.any():
            continue
        i = _median_window(preds["confill"]["forecast"][:, :, ch], tw.values[:, L:, ch], sel)
        t = np.arange(-L, H) * step_h
        hist = np.where(tw.observed[i, :L, ch] > 0, tw.values[i, :L, ch] * std + mean, np.nan)
        fut = np.where(tw.observed[i, L:, ch] > 0, tw.values[i, L:, ch] * std + mean, np.nan)
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(t[:L], hist, "k.-", lw=1, ms=3, label="history (observed)")
        ax.plot(t[L:], fut, "ko-", lw=1, ms=3, label="truth")
        ax.plot(t[L:], preds["confill"]["forecast"][i, :, ch] * std + mean, "C1-", lw=2, label="ConFill")
        ax.plot(t[L:], preds["seasonal_naive"]["forecast"][i, :, ch] * std + mean, "C2--", lw=1.5,
                label="seasonal naive (1 day)")
        ax.axvline(-step_h / 2, color="0.6", lw=1)
        horizon = format_duration(H * cadence_s)
        ax.set(title=f"{tw.stations[tw.station[i]]}: {horizon} {name} forecast (the median window by ConFill error)",
               xlabel="hours from issue time", ylabel=f"{name} ({unit})")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        paths.append(run_dir / f"plot_forecast{horizon}_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _median_window(pred: np.ndarray, truth: np.ndarray, sel: np.ndarray) -> int:
    """Index of the window with the median MAE among those where every step is scored (any scored, if none is
    complete): a typical case for the plots, not a chosen one. Arrays are [N, T] for one channel."""
    sel = sel.astype(bool)
    counts = sel.sum(axis=1)
    cand = np.flatnonzero(counts == counts.max()) if counts.max() > 0 else np.arange(len(sel))
    mae = np.array([np.abs(pred[i] - truth[i])[sel[i]].mean() if sel[i].any() else 0.0 for i in cand])
    return int(cand[np.argsort(mae)[len(mae) // 2]])


def _recording(fn: Imputer, ss: ScenarioSet, store: dict[str, np.ndarray]) -> Imputer:
    """Wrap ``fn`` so the plots can reuse its outputs (keyed by scenario; the forecast call is the last)."""
    names = iter([s.name for s in ss.scenarios] + ["forecast"])

    def wrapped(v, m, c):
        imp, fc = fn(v, m, c)
        key = next(names)
        store[key] = fc if key == "forecast" else imp
        return imp, fc

    return wrapped


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    dataset: DatasetSpec | str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    series: dict[str, StationSeries] | None = None,
    stations: Sequence[str] | None = None,
    max_windows: int | None = None,
    stride: int | str = "1d",
    seed: int = 0,
    checkpoint: str = "best.pt",
    plots: bool = True,
    progress: bool = True,
    network_trials: int = 540,
) -> EvalReport:
    """Evaluate a training run on the test months and write metrics.json, metrics.md and the plots.

    Args:
        run_dir: the run folder.
        dataset: the dataset spec (or preset name / path); None: the spec the checkpoint carries (the ``beijing``
            preset for checkpoints from before dataset specs).
        data: data root (ignored when ``series`` is given).
        series: already loaded stations (tests).
        stations: restrict to these stations.
        max_windows: cap of test windows per station.
        stride: between test window starts: steps (int) or a duration (``"1d"``).
        seed: seed of the scenario masks.
        checkpoint: checkpoint file name in ``run_dir``.
        plots: write the PNG plots.
        progress: tqdm bars.
        network_trials: trials per network scenario (station-local and network-wide outages, scored when there is
            more than one station; :mod:`gapcast.train.network_eval`); 0 skips them.

    Returns:
        :class:`EvalReport`.

    Raises:
        TrainError: missing checkpoint or no test data.
    """
    from gapcast.train.checkpoint import load_checkpoint

    run = Path(run_dir)
    model, meta = load_checkpoint(run / checkpoint)
    cfg = model.cfg
    spec = spec_of_run(meta, dataset)
    series, normalizer, channels = _eval_inputs(spec, meta, data, series, stations)
    stride_steps = stride if isinstance(stride, int) else steps_of(stride, spec.cadence_s, key="--stride")
    ss = build_scenarios(series, normalizer, channels=channels, lookback=cfg.lookback, horizon=cfg.horizon,
                         stride=stride_steps, max_windows=max_windows, seed=seed, spec=spec)
    imputers = {"confill": model_imputer(model, progress=progress), **baseline_imputers(cfg.horizon)}
    results, preds = {}, {}
    for name, fn in imputers.items():
        preds[name] = {}
        results[name] = score_imputer(_recording(fn, ss, preds[name]), ss, name=name)
    metrics = {
        "protocol": ss.protocol,
        "checkpoint": {"file": str(run / checkpoint), "step": meta.get("step"), "val": meta.get("val")},
        "model_config": meta["config"],
        "results": results,
    }
    metrics["targets"] = _targets(results)
    md = _markdown(metrics, ss)
    if len(series) > 1 and network_trials > 0:  # outages by what the neighbours see (issue 20)
        metrics["network"], network_md = _network_section(series, normalizer, spec, ss, model, meta,
                                                          trials=network_trials, seed=seed)
        md += network_md
    json_path, md_path = run / "metrics.json", run / "metrics.md"
    json_path.write_text(json.dumps(metrics, indent=2, default=_json_default))
    md_path.write_text(md)
    units = [str(c.get("unit", "")) for c in meta["channels"]]
    plot_paths = _plots(run, ss, preds, units, spec.cadence_s) if plots else []
    return EvalReport(metrics=metrics, markdown=md, json_path=json_path, markdown_path=md_path, plots=plot_paths)


def _eval_inputs(spec: DatasetSpec, meta: dict[str, Any], data, series, stations
                 ) -> tuple[dict[str, StationSeries], Normalizer, list[str]]:
    """The stations to score (loaded, or the given ones kept to ``stations``), the run's normaliser and channels.

    Raises:
        TrainError: the run's channels are not the dataset spec's.
        GapcastError: what loading the dataset raises.
    """
    from gapcast.train.loader import load_dataset

    if series is None:
        series = load_dataset(spec, data, stations or None)
    elif stations:
        series = {k: v for k, v in series.items() if k in stations}
    normalizer = Normalizer.from_dict(meta["normalizer"])
    channels = [c["name"] for c in meta["channels"]]
    if tuple(channels) != spec.channel_names:
        msg = f"the run's channels {channels} are not the dataset {spec.name}'s {list(spec.channel_names)}"
        raise TrainError(msg)
    return series, normalizer, channels


def _network_section(series: dict[str, StationSeries], normalizer: Normalizer, spec: DatasetSpec, ss: ScenarioSet,
                     model, meta: dict[str, Any], *, trials: int, seed: int) -> tuple[dict[str, Any], str]:
    """The network scenarios of a run (station-local and network-wide outages; issue 20) and their markdown.

    A :class:`TrainError` from the network evaluation (e.g. a test range shorter than one network trial) is logged
    and reported as ``{"skipped": reason}``: the rest of the report stands.
    """
    from gapcast.calendar import calendar_features
    from gapcast.train.loader import split_indices
    from gapcast.train.network_eval import evaluate_network, network_markdown

    cfg = model.cfg
    channels = [c["name"] for c in meta["channels"]]
    group_name = next(iter(spec.groups), "all channels")
    try:
        net = evaluate_network(
            series, normalizer, channels=channels, group=ss.group, group_name=group_name,
            lookback=cfg.lookback, horizon=cfg.horizon, trials=trials, seed=seed,
            coordinates=spec.coordinates(list(series)),  # IDW where the spec's [[stations]] has them all
            models={"ConFill (no context)" if cfg.n_context else "ConFill": model_imputer(model, progress=False)},
            calendar=lambda e: calendar_features(e, spec.utc_offset_s, timezone=spec.timezone),
            split=lambda s: split_indices(spec, s, check=False),
            context_models=_context_models(model, meta))
        return net, network_markdown(net)
    except TrainError as exc:
        log.warning("network scenarios skipped: %s", exc)
        return {"skipped": str(exc)}, f"\n## Network scenarios\n\nskipped: {exc}\n"


def _context_models(model, meta: dict[str, Any]) -> dict[str, Any] | None:
    """``{"ConFill + neighbours": (imputer, ContextSpec)}`` for a checkpoint with neighbour context, else None."""
    if not model.cfg.n_context or "context" not in meta:
        return None
    from gapcast.neighbours import ContextSpec

    return {"ConFill + neighbours": (model_imputer(model, progress=False), ContextSpec.from_dict(meta["context"]))}


def spec_of_run(meta: dict[str, Any], dataset: DatasetSpec | str | os.PathLike | None = None) -> DatasetSpec:
    """The dataset spec for a run: the one given, else the one its checkpoint carries, else the ``beijing``
    preset (checkpoints from before dataset specs were Beijing runs)."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    if dataset is not None:
        return load_spec(dataset)
    if meta.get("dataset"):
        return DatasetSpec.from_dict(meta["dataset"])
    return load_spec("beijing")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)

