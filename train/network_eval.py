"""Network scenarios: outages split by what the neighbours see, scored for every method on the same masks.

(Over 600 lines on purpose: the network scenarios and the per-method scoring share the aligned
network arrays and their masks; one file keeps them on the same masks.)

The per-station protocol (:mod:`gapcast.train.evaluate`) treats each window alone. A gateway serves a network, and
the outage users meet most often is one station down while the others report. This module evaluates on the test
range with all stations aligned in time:

* **station-local** ``block-6h / 24h / 72h``: one station's block over a channel group is hidden, the other stations
  keep their real record (the common case: one analyser out);
* **network-wide** ``block-6h / 24h / 72h``: the same block is hidden at every station over the same span (the
  gateway's uplink or a shared power cut); neighbour methods then have nothing to read and fall back to linear
  interpolation, which the table shows.

Each trial is an aligned array of ``lookback_ratio + L`` steps of every station: the model window (the last ``L``
steps; the block lies inside it with at least one step either side, as in :func:`evaluate.build_scenarios`) and the
level window before it that the causal neighbour estimate reads. Methods: linear interpolation and LOCF (the
target's own record), the neighbour estimate (:func:`gapcast.neighbours.neighbour_estimate`), inverse-distance
weighting when station coordinates are given, k-most-correlated-neighbours regression fitted on the training range,
and any per-station :data:`evaluate.Imputer` (ConFill) on the model window. Scored like ``gapcast evaluate``: MAE /
RMSE on values normalised with the training statistics, over the hidden (observed) values only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gapcast.baselines import linear_interpolate, locf
from gapcast.duration import format_duration, steps_of
from gapcast.neighbours import (
    ContextSpec,
    CorrelatedRegression,
    build_context,
    idw_estimate,
    neighbour_estimate,
)
from gapcast.train import TrainError
from gapcast.train.data import Normalizer, StationSeries, time_split

__all__ = [
    "KINDS",
    "AlignedNetwork",
    "NetworkScenario",
    "Trials",
    "align_network",
    "build_network_scenarios",
    "context_model_method",
    "evaluate_network",
    "model_method",
    "network_markdown",
    "network_methods",
    "score_network",
]

log = logging.getLogger(__name__)

KINDS = ("station-local", "network-wide")
BLOCKS = ("6h", "24h", "72h")



@dataclass
class Trials:
    """What a network method sees of one scenario (the hidden values already removed).

    Attributes:
        values: [N, S, W, C] float32, normalised, 0 where unobserved.
        observed: [N, S, W, C] bool.
        gap_start: [N] int64 first hidden step, index into W.
        rows: [R, 2] int64 (trial, station) pairs the method must return.
        epoch_s: [N] int64 UTC start time of each trial's first step.
        cadence_s: step length, seconds.
    """

    values: np.ndarray
    observed: np.ndarray
    gap_start: np.ndarray
    rows: np.ndarray
    epoch_s: np.ndarray
    cadence_s: float

    def pick(self, full: np.ndarray) -> np.ndarray:
        """[N, S, ...] -> [R, ...] at :attr:`rows`."""
        return full[self.rows[:, 0], self.rows[:, 1]]


#: ``fn(trials) -> filled [R, W, C]`` float, normalised (NaN allowed where the method has no estimate: the scorer
#: falls back to linear interpolation there and counts it).
NetworkMethod = Callable[[Trials], np.ndarray]


@dataclass
class AlignedNetwork:
    """Every station on one time grid.

    Attributes:
        stations: S names (sorted).
        epoch_s: [T] int64 step start times (UTC seconds) of the grid.
        values: [S, T, C] float32, physical units, NaN where missing (or where the station has no row).
        cadence_s: step length, seconds.
    """

    stations: list[str]
    epoch_s: np.ndarray
    values: np.ndarray
    cadence_s: float

    @property
    def observed(self) -> np.ndarray:
        """[S, T, C] bool."""
        return ~np.isnan(self.values)


def _default_split(series: StationSeries) -> Any:
    """The calendar-month split of :func:`gapcast.train.data.time_split` over a series' timestamps."""
    return time_split(series.epoch_s)


def align_network(series: Mapping[str, StationSeries], part: str, *,
                  split: Callable[[StationSeries], Any] = _default_split) -> AlignedNetwork:
    """Align the stations' ``part`` range (``train`` / ``val`` / ``test`` of ``split``) on the union of their steps.

    Args:
        series: station name -> series (same channels).
        part: the split attribute to take.
        split: ``series -> object with train/val/test slices`` (the dataset spec's split,
            ``lambda s: loader.split_indices(spec, s)``; default :func:`data.time_split` of its timestamps).

    Returns:
        :class:`AlignedNetwork`.

    Raises:
        TrainError: no station, or stations whose steps are not on one cadence grid.
    """
    names = sorted(series)
    if not names:
        msg = "no station to align"
        raise TrainError(msg)
    parts = {n: getattr(split(series[n]), part) for n in names}
    epochs = [series[n].epoch_s[parts[n]] for n in names]
    steps = np.unique(np.concatenate([np.diff(e) for e in epochs if len(e) > 1]))
    if len(steps) == 0:
        msg = f"the {part} range holds fewer than two steps"
        raise TrainError(msg)
    cadence = int(steps.min())
    grid_start = min(int(e[0]) for e in epochs if len(e))
    grid_end = max(int(e[-1]) for e in epochs if len(e))
    if any(np.any((e - grid_start) % cadence) for e in epochs):
        msg = f"stations' {part} steps are not on one {format_duration(cadence)} grid"
        raise TrainError(msg)
    grid = np.arange(grid_start, grid_end + 1, cadence, dtype=np.int64)
    C = series[names[0]].values.shape[1]
    out = np.full((len(names), len(grid), C), np.nan, dtype=np.float32)
    for k, n in enumerate(names):
        out[k, (epochs[k] - grid_start) // cadence] = series[n].values[parts[n]]
    return AlignedNetwork(stations=names, epoch_s=grid, values=out, cadence_s=float(cadence))


@dataclass
class NetworkScenario:
    """The fixed masks of one network scenario.

    Attributes:
        name: e.g. ``station-local block-72h``.
        kind: ``station-local`` or ``network-wide``.
        block: the block duration (``"72h"``).
        start: [N] int64 row of each trial's first step in the aligned test grid.
        gap_start: [N] int64 first hidden step, index into the trial array.
        target: [N] int64 the hidden station (station-local), -1 (network-wide: all).
        hidden: [N, S, W, C] bool, True where an observed value is hidden (and scored).
    """

    name: str
    kind: str
    block: str
    start: np.ndarray
    gap_start: np.ndarray
    target: np.ndarray
    hidden: np.ndarray

    def rows(self) -> np.ndarray:
        """[R, 2] (trial, station) pairs with at least one hidden value."""
        return np.argwhere(self.hidden.any(axis=(2, 3)))


def _draw_trials(rng: np.random.Generator, kind: str, n: int, *, obs: np.ndarray, csum: np.ndarray, grp: np.ndarray,
                 P: int, lookback: int, trials: int, min_observed: float) -> tuple[list[int], list[int], list[int]]:
    """Rejection-sample up to ``trials`` (start, gap start, target station) triples for one (kind, block) scenario
    of :func:`build_network_scenarios` (at most ``50 * trials`` draws, from ``rng`` in a fixed order).

    A draw is kept when a station (the drawn one for ``station-local``, any for a network-wide kind) has its model
    window at least ``min_observed`` observed and an observed group value under the ``n``-step block.

    Args:
        obs: [S, T, C] observed mask; csum: [S, T+1] cumulative observed share; grp: [C] group channels.
        P, lookback: level window and model window, steps.

    Returns:
        ``(starts, gap_starts, targets)`` (target -1 for a network-wide outage), possibly empty. Raises nothing.
    """
    S, T, _ = obs.shape
    W = P + lookback
    starts, gaps, targets = [], [], []
    attempts = 0
    while len(starts) < trials and attempts < 50 * trials:
        attempts += 1
        s0 = int(rng.integers(0, T - W + 1))
        g = P + int(rng.integers(1, lookback - n))
        ok = (csum[:, s0 + W] - csum[:, s0 + P]) / lookback >= min_observed
        ok &= obs[:, s0 + g : s0 + g + n][:, :, grp].any(axis=(1, 2))
        if kind == "station-local":
            target = int(rng.integers(0, S))
            if not ok[target]:
                continue
        elif not ok.any():
            continue
        else:
            target = -1
        starts.append(s0)
        gaps.append(g)
        targets.append(target)
    return starts, gaps, targets


def build_network_scenarios(
    net: AlignedNetwork,
    *,
    group: Sequence[int],
    lookback: int,
    ratio_lookback: str = "96h",
    blocks: Sequence[str] = BLOCKS,
    kinds: Sequence[str] = KINDS,
    trials: int = 540,
    seed: int = 0,
    min_observed: float = 0.5,
) -> list[NetworkScenario]:
    """Draw the trials of every (kind, block) scenario from one seed.

    A trial: a start row uniformly over the test grid, a block of ``block`` over the ``group`` channels placed
    uniformly inside the model window with at least one step either side, and (station-local) a target station
    uniformly among those whose model window has at least ``min_observed`` of its cells observed and at least one
    observed value under the block; network-wide trials need one such station and hide the block at all.

    Args:
        net: the aligned test range.
        group: channel indices the block hides.
        lookback: L, the model window, steps.
        ratio_lookback: the level window of the neighbour estimate, before the model window, a duration.
        blocks: block durations.
        kinds: which of :data:`KINDS`.
        trials: trials per scenario.
        seed: seed of all masks.
        min_observed: least observed share of a scored station's model window.

    Returns:
        The scenarios, kinds outer, blocks inner.

    Raises:
        TrainError: unknown kind, a test range too short, or no trial found.
    """
    P = steps_of(ratio_lookback, net.cadence_s, key="ratio_lookback")
    W = P + lookback
    obs = net.observed
    S, T, C = obs.shape
    if T < W:
        msg = f"the test range ({T} steps) is shorter than a trial ({W} steps)"
        raise TrainError(msg)
    grp = np.zeros(C, dtype=bool)
    grp[list(group)] = True
    # Observed share of each station's model window by start row: cumulative sums over the grid.
    share = obs.mean(axis=2)  # [S, T]
    csum = np.concatenate([np.zeros((S, 1)), np.cumsum(share, axis=1)], axis=1)
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        if kind not in KINDS:
            msg = f"unknown outage kind {kind!r}; one of {KINDS}"
            raise TrainError(msg)
        for block in blocks:
            n = min(steps_of(block, net.cadence_s, key="block"), lookback - 2)
            starts, gaps, targets = _draw_trials(rng, kind, n, obs=obs, csum=csum, grp=grp, P=P, lookback=lookback,
                                                 trials=trials, min_observed=min_observed)
            if not starts:
                msg = f"no {kind} {block} trial with observed values under the block"
                raise TrainError(msg)
            if len(starts) < trials:
                log.warning("%s %s: only %d of %d trials found", kind, block, len(starts), trials)
            st, gs, tg = (np.asarray(x, dtype=np.int64) for x in (starts, gaps, targets))
            win = obs[:, st[:, None] + np.arange(W)[None, :]].transpose(1, 0, 2, 3)  # [N, S, W, C]
            t = np.arange(W)
            in_block = (t[None, :] >= gs[:, None]) & (t[None, :] < gs[:, None] + n)  # [N, W]
            who = (np.arange(S)[None, :] == tg[:, None]) | (tg[:, None] < 0)  # [N, S]
            ok_rows = ((csum[:, st + W] - csum[:, st + P]) / lookback >= min_observed).T  # [N, S]
            hidden = win & in_block[:, None, :, None] & grp[None, None, None, :] & (who & ok_rows)[:, :, None, None]
            out.append(NetworkScenario(name=f"{kind} block-{block}", kind=kind, block=block, start=st, gap_start=gs,
                                       target=tg, hidden=hidden))
    return out


def _trial_arrays(net: AlignedNetwork, normalizer: Normalizer, sc: NetworkScenario) -> tuple[np.ndarray, np.ndarray]:
    """values [N, S, W, C] float32 normalised (NaN where unobserved), observed [N, S, W, C] bool."""
    W = sc.hidden.shape[2]
    raw = net.values[:, sc.start[:, None] + np.arange(W)[None, :]].transpose(1, 0, 2, 3)
    return normalizer.transform(raw), ~np.isnan(raw)


def network_methods(
    *,
    normalizer: Normalizer,
    cadence_s: float,
    scale: Sequence[str],
    ratio_lookback: str = "96h",
    regression: CorrelatedRegression | None = None,
    coordinates: Sequence[Sequence[float]] | None = None,
) -> dict[str, tuple[NetworkMethod, bool]]:
    """The network baselines as :data:`NetworkMethod` functions, each with whether it is causal (real time).

    Args:
        normalizer: the training normaliser (the neighbour estimate's level ratio needs physical units).
        cadence_s: step length, seconds.
        scale: per channel ``"ratio"`` or ``"offset"`` (see :func:`gapcast.neighbours.neighbour_estimate`).
        ratio_lookback: the level window, a duration.
        regression: a :class:`CorrelatedRegression` fitted on the normalised training range, or None.
        coordinates: [S] (lat, lon) in station order, or None (no IDW).

    Returns:
        ``{label: (fn, causal)}``: ``linear interpolation`` and ``LOCF`` (own record), ``neighbour estimate``,
        ``IDW`` (with coordinates), ``k-correlated regression`` (with a fit).
    """
    mean, std = normalizer.mean.astype(np.float64), normalizer.std.astype(np.float64)

    def linear(tr: Trials) -> np.ndarray:
        return linear_interpolate(tr.pick(tr.values), tr.pick(tr.observed))

    def _locf(tr: Trials) -> np.ndarray:
        return locf(tr.pick(tr.values), tr.pick(tr.observed))

    def nb(tr: Trials) -> np.ndarray:
        est = neighbour_estimate(tr.values * std + mean, tr.observed, tr.gap_start, cadence_s=cadence_s,
                                 lookback=ratio_lookback, scale=scale)
        return (tr.pick(est) - mean) / std

    methods: dict[str, tuple[NetworkMethod, bool]] = {
        "linear interpolation": (linear, False), "LOCF": (_locf, True), "neighbour estimate": (nb, True)}
    if coordinates is not None:
        methods["IDW"] = (lambda tr: tr.pick(idw_estimate(tr.values, tr.observed, coordinates)), True)
    if regression is not None:
        methods["k-correlated regression"] = (lambda tr: tr.pick(regression.predict(tr.values, tr.observed)), True)
    return methods


def _model_window_batches(tr: Trials, calendar: Callable[[np.ndarray], np.ndarray], *, lookback: int,
                          horizon: int, batch: int):
    """Cut the trial rows into batches of model-window inputs (the last L steps of each row's window).

    Args:
        tr: the trials; ``tr.values``/``tr.observed`` are [N, S, W, C].
        calendar: ``epoch_s [L+H] -> [L+H, F]`` calendar features.
        lookback, horizon: L and H, steps.
        batch: rows per batch.

    Yields:
        ``(a, rows, values [R, L, C], observed [R, L, C], calendar [R, L+H, F])`` with ``a`` the first row's index
        and ``rows`` the [R, 2] (trial, station) pairs; float32. Raises nothing of its own.
    """
    W = tr.values.shape[2]
    steps = np.arange(lookback + horizon, dtype=np.int64) * int(tr.cadence_s)
    for a in range(0, len(tr.rows), batch):
        rows = tr.rows[a : a + batch]
        x = np.ascontiguousarray(tr.values[rows[:, 0], rows[:, 1], W - lookback :], dtype=np.float32)
        m = np.ascontiguousarray(tr.observed[rows[:, 0], rows[:, 1], W - lookback :], dtype=np.float32)
        t0 = tr.epoch_s[rows[:, 0]] + (W - lookback) * int(tr.cadence_s)
        cal = np.stack([calendar(t + steps) for t in t0]).astype(np.float32)
        yield a, rows, x, m, cal


def model_method(imputer: Callable, calendar: Callable[[np.ndarray], np.ndarray], *, lookback: int,
                 horizon: int, batch: int = 2048) -> NetworkMethod:
    """A per-station :data:`evaluate.Imputer` (e.g. ConFill) on the model window (the last L steps) of each row.

    Args:
        imputer: ``fn(values [R, L, C], observed [R, L, C], calendar [R, L+H, F]) -> (imputed, forecast)``.
        calendar: ``epoch_s [L+H] -> [L+H, F]`` calendar features.
        lookback, horizon: L and H, steps.
        batch: rows per imputer call (bounds memory).

    Returns:
        A :data:`NetworkMethod` (the level window before the model window is returned as given).
    """

    def fn(tr: Trials) -> np.ndarray:
        W = tr.values.shape[2]
        out = tr.pick(tr.values).astype(np.float32)
        for a, _rows, x, m, cal in _model_window_batches(tr, calendar, lookback=lookback, horizon=horizon,
                                                         batch=batch):
            imputed, _ = imputer(x, m, cal)
            out[a : a + batch, W - lookback :] = imputed
        return out

    return fn


def context_model_method(imputer: Callable, spec: ContextSpec, stations: Sequence[str],
                         calendar: Callable[[np.ndarray], np.ndarray], *, lookback: int, horizon: int,
                         batch: int = 2048) -> NetworkMethod:
    """A ConFill with neighbour context on the model window of each row: the context comes from the OTHER stations'
    input windows of the same trial at the same steps (hidden values removed, as the gateway would see them),
    built by :func:`gapcast.neighbours.build_context`, the function the gateway runs.

    Args:
        imputer: ``fn(values, observed, calendar, context [R, L, G], context_observed [R, L, G]) -> (imputed,
            forecast)`` (:func:`gapcast.train.evaluate.model_imputer` of a context model).
        spec: the checkpoint's :class:`ContextSpec`.
        stations: the S station names of the trials' station axis (a station the spec lacks gets no context).
        calendar, lookback, horizon, batch: as :func:`model_method`.

    Returns:
        A :data:`NetworkMethod`.
    """
    where = {name: j for j, name in enumerate(stations)}
    rows_of_spec = [where.get(name) for name in spec.stations]  # spec row -> trial station index (None: absent)
    spec_row = {j: i for i, j in enumerate(rows_of_spec) if j is not None}

    def fn(tr: Trials) -> np.ndarray:
        W = tr.values.shape[2]
        N, _, _, C = tr.values.shape
        G = len(spec.channels)
        # The trials in the spec's station order; absent stations stay silent.
        sv = np.zeros((N, len(spec.stations), lookback, C), dtype=np.float32)
        so = np.zeros_like(sv)
        for i, j in enumerate(rows_of_spec):
            if j is not None:
                sv[:, i] = tr.values[:, j, W - lookback :]
                so[:, i] = tr.observed[:, j, W - lookback :]
        ctx, cobs = build_context(spec, sv, so)  # [N, S_spec, L, G]
        out = tr.pick(tr.values).astype(np.float32)
        for a, rows, x, m, cal in _model_window_batches(tr, calendar, lookback=lookback, horizon=horizon,
                                                        batch=batch):
            c = np.zeros((len(rows), lookback, G), dtype=np.float32)
            co = np.zeros_like(c)
            for r, (n, j) in enumerate(rows):
                if int(j) in spec_row:
                    c[r], co[r] = ctx[n, spec_row[int(j)]], cobs[n, spec_row[int(j)]]
            imputed, _ = imputer(x, m, cal, c, co)
            out[a : a + batch, W - lookback :] = imputed
        return out

    return fn


def score_network(
    net: AlignedNetwork,
    normalizer: Normalizer,
    scenarios: Sequence[NetworkScenario],
    methods: Mapping[str, tuple[NetworkMethod, bool]],
    *,
    channels: Sequence[str],
) -> dict[str, Any]:
    """Run every method on every scenario's masks and score the hidden values.

    Args:
        net: the aligned test range.
        normalizer: the training normaliser.
        scenarios: from :func:`build_network_scenarios`.
        methods: ``{label: (fn, causal)}``.
        channels: channel names.

    Returns:
        ``{scenario name: {"trials", "hidden", "stations_scored", "methods": {label: {"n", "mae", "rmse",
        "fallback_share", "causal", "seconds", "per_channel": {channel: {"mae", "mae_norm"}}}}}}``; MAE / RMSE on
        normalised values; ``fallback_share`` = share of hidden values the method had no estimate for (filled by
        linear interpolation).

    Raises:
        TrainError: a method returns the wrong shape or non-finite values.
    """
    std = normalizer.std.astype(np.float64)
    out: dict[str, Any] = {}
    for sc in scenarios:
        v, m = _trial_arrays(net, normalizer, sc)
        m_in = m & ~sc.hidden
        v_in = np.where(m_in, v, 0.0).astype(np.float32)
        truth = np.where(m, v, 0.0)
        rows = sc.rows()
        hid = sc.hidden[rows[:, 0], rows[:, 1]]  # [R, W, C]
        tru = truth[rows[:, 0], rows[:, 1]]
        trials = Trials(values=v_in, observed=m_in, gap_start=sc.gap_start, rows=rows,
                        epoch_s=net.epoch_s[sc.start], cadence_s=net.cadence_s)
        fallback = linear_interpolate(trials.pick(v_in), trials.pick(m_in))
        res: dict[str, Any] = {}
        for label, (fn, causal) in methods.items():
            t = time.perf_counter()
            pred = np.asarray(fn(trials), dtype=np.float64)
            if pred.shape != hid.shape:
                msg = f"{label} on {sc.name}: expected {hid.shape}, got {pred.shape}"
                raise TrainError(msg)
            missing = hid & ~np.isfinite(pred)
            pred = np.where(np.isfinite(pred), pred, fallback)
            if not np.all(np.isfinite(pred[hid])):
                msg = f"{label} on {sc.name}: non-finite values where scored"
                raise TrainError(msg)
            err = (pred - tru)[hid]
            per_ch = {}
            for j, name in enumerate(channels):
                e = (pred - tru)[..., j][hid[..., j]]
                if len(e):
                    per_ch[name] = {"n": len(e), "mae_norm": float(np.abs(e).mean()),
                                    "mae": float(np.abs(e).mean() * std[j])}
            res[label] = {"n": int(hid.sum()), "mae": float(np.abs(err).mean()),
                          "rmse": float(np.sqrt((err**2).mean())),
                          "fallback_share": float(missing.sum() / max(hid.sum(), 1)), "causal": causal,
                          "seconds": round(time.perf_counter() - t, 2), "per_channel": per_ch}
            log.info("%s %s: MAE %.4f", label, sc.name, res[label]["mae"])
        out[sc.name] = {"kind": sc.kind, "block": sc.block, "trials": len(sc.start), "hidden": int(hid.sum()),
                        "stations_scored": int(len(rows)), "methods": res}
    return out


def evaluate_network(
    series: Mapping[str, StationSeries],
    normalizer: Normalizer,
    *,
    channels: Sequence[str],
    group: Sequence[int],
    group_name: str = "group",
    lookback: int,
    horizon: int = 0,
    ratio_lookback: str = "96h",
    blocks: Sequence[str] = BLOCKS,
    kinds: Sequence[str] = KINDS,
    trials: int = 540,
    seed: int = 0,
    k: int = 3,
    coordinates: Mapping[str, Sequence[float]] | None = None,
    models: Mapping[str, Callable] | None = None,
    calendar: Callable[[np.ndarray], np.ndarray] | None = None,
    split: Callable[[StationSeries], Any] = _default_split,
    context_models: Mapping[str, tuple[Callable, ContextSpec]] | None = None,
) -> dict[str, Any]:
    """The network section of ``gapcast evaluate`` and ``gapcast bench accuracy``.

    Args:
        series: station name -> series (more than one station).
        normalizer: the training normaliser.
        channels: channel names, in column order.
        group: channel indices the blocks hide (e.g. the pollutants).
        group_name: its name, for the report.
        lookback, horizon: the model's L and H, steps.
        ratio_lookback: the neighbour estimate's level window, a duration.
        blocks: block durations.
        kinds: outage kinds.
        trials: trials per scenario.
        seed: seed of the masks.
        k: neighbours of the correlated regression.
        coordinates: station -> (lat, lon) degrees, for IDW (all stations needed; else IDW is skipped, logged).
        models: label -> per-station :data:`evaluate.Imputer` scored on the model window (e.g. ``{"ConFill": fn}``).
        calendar: ``epoch_s [n] -> [n, F]`` calendar features, needed with ``models``.
        split: the time split (see :func:`align_network`).
        context_models: label -> (context imputer, its :class:`ContextSpec`), scored with the other stations'
            windows as context (:func:`context_model_method`).

    Returns:
        ``{"protocol": {...}, "scenarios": score_network(...)}``.

    Raises:
        TrainError: fewer than two stations, no trial, a method failing.
    """
    if len(series) < 2:
        msg = f"the network evaluation needs more than one station, got {len(series)}"
        raise TrainError(msg)
    t0 = time.perf_counter()
    test = align_network(series, "test", split=split)
    train = align_network(series, "train", split=split)
    methods, scale, coords = _scored_methods(test, train, normalizer, ratio_lookback=ratio_lookback, k=k,
                                             coordinates=coordinates)
    if models or context_models:
        if calendar is None:
            msg = "scoring a model in the network scenarios needs the calendar features"
            raise TrainError(msg)
        for label, fn in (models or {}).items():
            methods[label] = (model_method(fn, calendar, lookback=lookback, horizon=horizon), True)
    for label, (fn, cspec) in (context_models or {}).items():
        methods[label] = (context_model_method(fn, cspec, test.stations, calendar, lookback=lookback,
                                               horizon=horizon), True)
    scenarios = build_network_scenarios(test, group=group, lookback=lookback, ratio_lookback=ratio_lookback,
                                        blocks=blocks, kinds=kinds, trials=trials, seed=seed)
    scores = score_network(test, normalizer, scenarios, methods, channels=channels)
    protocol = _network_protocol(test, channels=channels, group=group, group_name=group_name, lookback=lookback,
                                 ratio_lookback=ratio_lookback, trials=trials, seed=seed, k=k, scale=scale,
                                 idw=bool(coords))
    protocol["seconds"] = round(time.perf_counter() - t0, 1)
    return {"protocol": protocol, "scenarios": scores}


def _scored_methods(test: AlignedNetwork, train: AlignedNetwork, normalizer: Normalizer, *, ratio_lookback: str, k: int,
                    coordinates: Mapping[str, Sequence[float]] | None) -> tuple[dict, list[str], list | None]:
    """The network baselines, fitted on the training range.

    Returns:
        ``(methods, scale, coords)``: label -> (method, causal) from :func:`network_methods`; per channel
        ``"ratio"`` (a non-negative level in the training range: concentrations, rain, wind speed, pressure) or
        ``"offset"`` (it goes negative: temperature, dew point, wind-direction components); the stations'
        (lat, lon) in test order, or None when any is missing (IDW is then skipped, logged).
    """
    tr = normalizer.transform(train.values)
    regression = CorrelatedRegression.fit(np.nan_to_num(tr), ~np.isnan(tr), k=k)
    mins = np.nanmin(train.values.reshape(-1, train.values.shape[-1]), axis=0)
    scale = ["ratio" if lo >= 0 else "offset" for lo in mins]
    coords = None
    if coordinates:
        if all(s in coordinates for s in test.stations):
            coords = [tuple(coordinates[s]) for s in test.stations]
        else:
            log.warning("IDW skipped: coordinates missing for %s",
                        ", ".join(s for s in test.stations if s not in coordinates))
    methods = network_methods(normalizer=normalizer, cadence_s=test.cadence_s, scale=scale,
                              ratio_lookback=ratio_lookback, regression=regression, coordinates=coords)
    return methods, scale, coords


def _network_protocol(test: AlignedNetwork, *, channels: Sequence[str], group: Sequence[int], group_name: str, lookback: int,
                      ratio_lookback: str, trials: int, seed: int, k: int, scale: list[str],
                      idw: bool) -> dict[str, Any]:
    """The ``protocol`` block of the network report: what was hidden, how, and how each baseline estimates.

    ``seconds`` is None here; the caller sets it.
    """
    return {
        "stations": test.stations,
        "test_steps": int(len(test.epoch_s)),
        "cadence": format_duration(test.cadence_s),
        "trials_per_scenario": trials,
        "seed": seed,
        "group": group_name,
        "group_channels": [channels[i] for i in group],
        "lookback_L": lookback,
        "level_window": ratio_lookback,
        "kinds": {"station-local": "one station's block hidden while the others keep their real record",
                  "network-wide": "the same block hidden at every station over the same span"},
        "trial": f"{ratio_lookback} level window + the L = {lookback}-step model window, all stations aligned; "
                 "the block inside the model window with >= 1 step either side",
        "scored_on": "hidden observed values, MAE / RMSE on training-normalised values",
        "neighbour_estimate": "mean of the other stations reporting at the same step x the station's level ratio "
                              f"to it over the {ratio_lookback} before the gap start (offset for channels that go "
                              "negative); nothing after the gap start",
        "k_correlated_regression": f"least squares on the k = {k} neighbours most correlated on the training range, "
                                   "per station and channel; every subset pre-solved for missing neighbours",
        "idw": "inverse distance squared, haversine" if idw else "no station coordinates given: not scored",
        "fallback": "where a method has no estimate (no neighbour reports), linear interpolation; counted",
        "level_scale": dict(zip(channels, scale, strict=True)),
        "seconds": None,
    }


def network_markdown(net: Mapping[str, Any]) -> str:
    """The "network" section of metrics.md / accuracy.md: one row per method, one column per scenario."""
    p, sc = net["protocol"], net["scenarios"]
    names = list(sc)
    methods = list(next(iter(sc.values()))["methods"]) if sc else []
    lines = ["", "## Network: outages by what the neighbours see (MAE, normalised)", "",
             f"{len(p['stations'])} stations aligned on the test range; {p['trials_per_scenario']} trials per scenario "
             f"(seed {p['seed']}), blocks over the {p['group']} channels ({', '.join(p['group_channels'])}). "
             f"station-local: {p['kinds']['station-local']}; network-wide: {p['kinds']['network-wide']}. "
             f"Fallback to linear interpolation where a method has no estimate (share in brackets when > 0). "
             f"IDW: {p['idw']}.", "",
             "| method | causal | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for mth in methods:
        cells = []
        for n in names:
            r = sc[n]["methods"].get(mth)
            if r is None:
                cells.append("–")
                continue
            fb = f" ({100 * r['fallback_share']:.0f} % fb)" if r["fallback_share"] > 0.005 else ""
            cells.append(f"{r['mae']:.4f}{fb}")
        causal = next(iter(sc.values()))["methods"][mth]["causal"]
        lines.append(f"| {mth} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
    lines.append("| hidden values | | " + " | ".join(f"{sc[n]['hidden']:,}" for n in names) + " |")
    lines.append("")
    return "\n".join(lines)
