"""Neighbour stations: spatial gap-filling baselines and the neighbour context of a model (numpy only).

(Over 600 lines on purpose: the model's neighbour context is built from the very primitives of the spatial baselines
(correlations, the top-k choice, inverse-distance weights, the weighted neighbour mean), and training, export and the
gateway must run one implementation of each; cut apart, the context would import the baselines' private helpers.)

A gateway serves a network; when one station's analyser is out, its neighbours usually report. Everything here reads
the other stations at the SAME steps (available in real time) and, for the level ratio, the target station before
the gap start only, so each estimate can run live on the gateway (the edge imports this module; numpy only).

Array layout everywhere: ``values [..., S, T, C]`` (S stations in a fixed order, T steps, C channels; any value where
unobserved), ``observed [..., S, T, C]`` bool or 0/1. The leading ``...`` axes are batches of aligned windows.

Estimators:

* :func:`neighbour_estimate`: the mean of the other stations at the same steps, scaled by the station's level ratio
  to that mean over a lookback before the gap start (an offset instead of a ratio for channels that go negative);
* :func:`idw_estimate`: inverse-distance weighting (Shepard 1968) with great-circle distances from coordinates;
* :class:`CorrelatedRegression`: per station and channel, least squares on the ``k`` neighbours most correlated on
  the training range (every subset of them pre-solved, so a missing neighbour never blocks an estimate).

Context (:class:`ContextSpec`, :func:`fit_context`, :func:`build_context`, :func:`context_for_windows`): for each
station and each channel of a chosen group, a weighted neighbour value per step and its observed mask, with the
neighbour list and weights fixed from the training range and serialisable as JSON (checkpoint, bundle card).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gapcast import GapcastError
from gapcast.duration import steps_of

__all__ = [
    "ContextSpec",
    "CorrelatedRegression",
    "NeighbourError",
    "build_context",
    "context_for_windows",
    "correlations",
    "extend_by_coordinates",
    "fit_context",
    "haversine_km",
    "idw_estimate",
    "idw_weights",
    "neighbour_estimate",
    "weighted_neighbours",
]

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
CONTEXT_SCHEMA = "gapcast/neighbour-context/1"


class NeighbourError(GapcastError, ValueError):
    """Mismatched station arrays, unknown stations, a malformed context spec or coordinates."""


def _check(values: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    m = np.asarray(observed).astype(bool)
    if v.shape != m.shape or v.ndim < 3:
        msg = f"values {v.shape} and observed {m.shape} must have the same shape [..., S, T, C]"
        raise NeighbourError(msg)
    return np.where(m, v, 0.0), m


def weighted_neighbours(
    values: np.ndarray, observed: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the OTHER stations at each step, over those that report at that step.

    Args:
        values: [..., S, T, C] float, any value where unobserved.
        observed: [..., S, T, C] bool or 0/1.
        weights: [S, S] or [S, S, C] float >= 0, ``weights[s, j]`` = weight of station j for station s (the diagonal
            is ignored: a station is never its own neighbour); None = equal weights (the plain mean).

    Returns:
        ``(value, weight_sum)``, both [..., S, T, C] float64: the weighted mean (0 where no neighbour with a
        positive weight reports) and the sum of the weights of the reporting neighbours (0 = no neighbour).

    Raises:
        NeighbourError: on mismatched shapes.
    """
    v, m = _check(values, observed)
    S, C = v.shape[-3], v.shape[-1]
    w = np.ones((S, S, C)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.ndim == 2:
        w = np.repeat(w[:, :, None], C, axis=2)
    if w.shape != (S, S, C) or np.any(w < 0) or not np.all(np.isfinite(w)):
        msg = f"weights must be finite, >= 0, of shape [{S}, {S}] or [{S}, {S}, {C}], got {w.shape}"
        raise NeighbourError(msg)
    w = w * (1.0 - np.eye(S))[:, :, None]
    mf = m.astype(np.float64)
    num = np.einsum("sjc,...jtc->...stc", w, v * mf)
    den = np.einsum("sjc,...jtc->...stc", w, mf)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return mean, den


def neighbour_estimate(
    values: np.ndarray,
    observed: np.ndarray,
    gap_start: np.ndarray | int,
    *,
    cadence_s: float,
    lookback: str = "96h",
    scale: Sequence[str] | str = "ratio",
    weights: np.ndarray | None = None,
    max_ratio: float = 10.0,
) -> np.ndarray:
    """The causal neighbour estimate: the other stations' mean at the same steps, scaled to the station's level.

    For station s, channel c and step t: ``est = r * nb(t)`` with ``nb`` the (weighted) mean of the other stations
    reporting at t and ``r = sum(x_s) / sum(nb)`` over the steps of ``[gap_start - lookback, gap_start)`` where both
    are observed (the level ratio of means over common steps). With ``scale = "offset"`` the estimate is
    ``nb(t) + mean(x_s - nb)`` over those steps (for channels that can be negative, e.g. temperature); ``"none"``
    uses ``nb`` as it is. Nothing of station s at or after ``gap_start`` is read, and nothing of any station after
    step t: the estimate can run in real time.

    Args:
        values: [..., S, T, C] float in PHYSICAL units (a ratio of levels needs them), any value where unobserved.
        observed: [..., S, T, C] bool or 0/1.
        gap_start: int, or [...] / [..., S] int step index of each gap start (the level window ends there).
        cadence_s: step length, seconds.
        lookback: the level window before the gap start, a duration (``"96h"``).
        scale: ``"ratio"``, ``"offset"`` or ``"none"``, one for all channels or one per channel.
        weights: neighbour weights (see :func:`weighted_neighbours`); None = the plain mean of the others.
        max_ratio: the level ratio is clipped to ``[1 / max_ratio, max_ratio]`` (a near-zero neighbour mean in the
            level window must not blow the estimate up).

    Returns:
        [..., S, T, C] float64: the estimate for every station and step; NaN where no neighbour reports. Where the
        level window has no common observed step, the ratio is 1 (the offset 0).

    Raises:
        NeighbourError: on mismatched shapes, an unknown scale, or a gap start outside the steps.
        DurationError: if ``lookback`` is not a multiple of the cadence.
    """
    v, m = _check(values, observed)
    S, T, C = v.shape[-3:]
    lb = steps_of(lookback, cadence_s, key="lookback")
    modes = [scale] * C if isinstance(scale, str) else list(scale)
    if len(modes) != C or any(s not in ("ratio", "offset", "none") for s in modes):
        msg = f"scale must be 'ratio', 'offset' or 'none', once or per channel ({C}), got {scale!r}"
        raise NeighbourError(msg)
    gs = np.asarray(gap_start, dtype=np.int64)
    if gs.shape == v.shape[:-3]:
        gs = np.repeat(gs[..., None], S, axis=-1)
    gs = np.broadcast_to(gs, v.shape[:-2])  # [..., S]
    if np.any(gs < 0) or np.any(gs > T):
        msg = f"gap_start must lie in [0, {T}]"
        raise NeighbourError(msg)
    nb, den = weighted_neighbours(v, m, weights)
    t = np.arange(T)
    pre = (t >= gs[..., None] - lb) & (t < gs[..., None])  # [..., S, T]
    both = m & (den > 0) & pre[..., None]
    n = both.sum(axis=-2)  # [..., S, C]
    sx = np.where(both, v, 0.0).sum(axis=-2)
    snb = np.where(both, nb, 0.0).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where((n > 0) & (snb > 0), sx / np.where(snb > 0, snb, 1.0), 1.0)
        offset = np.where(n > 0, (sx - snb) / np.maximum(n, 1), 0.0)
    ratio = np.clip(ratio, 1.0 / max_ratio, max_ratio)
    kind = np.array(modes)
    est = np.where(kind == "ratio", ratio[..., None, :] * nb,
                   np.where(kind == "offset", nb + offset[..., None, :], nb))
    return np.where(den > 0, est, np.nan)


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray:
    """Great-circle distance on a sphere of the mean Earth radius (the haversine formula).

    Args:
        lat1, lon1, lat2, lon2: degrees (scalars or broadcastable arrays).

    Returns:
        Distance, km (float64 array).
    """
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _coords(coordinates: Sequence[Sequence[float]]) -> np.ndarray:
    xy = np.asarray(coordinates, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.all(np.isfinite(xy)) or np.any(np.abs(xy[:, 0]) > 90) \
            or np.any(np.abs(xy[:, 1]) > 180):
        msg = "coordinates must be (lat, lon) pairs in degrees, |lat| <= 90, |lon| <= 180, one per station"
        raise NeighbourError(msg)
    return xy


def idw_weights(coordinates: Sequence[Sequence[float]], *, power: float = 2.0, min_distance_km: float = 0.1
                ) -> np.ndarray:
    """Inverse-distance weights ``1 / d**power`` between stations (Shepard, 1968), zero on the diagonal.

    Args:
        coordinates: [S] (lat, lon) in degrees.
        power: the distance exponent (2 is Shepard's).
        min_distance_km: distances below this count as this (two sensors at one site).

    Returns:
        [S, S] float64 weights.

    Raises:
        NeighbourError: malformed coordinates.
    """
    xy = _coords(coordinates)
    d = haversine_km(xy[:, None, 0], xy[:, None, 1], xy[None, :, 0], xy[None, :, 1])
    w = 1.0 / np.maximum(d, min_distance_km) ** power
    np.fill_diagonal(w, 0.0)
    return w


def idw_estimate(values: np.ndarray, observed: np.ndarray, coordinates: Sequence[Sequence[float]], *,
                 power: float = 2.0) -> np.ndarray:
    """Inverse-distance-weighted mean of the other stations reporting at each step.

    Args:
        values: [..., S, T, C] float, any value where unobserved.
        observed: [..., S, T, C] bool or 0/1.
        coordinates: [S] (lat, lon), degrees.
        power: distance exponent.

    Returns:
        [..., S, T, C] float64; NaN where no other station reports.

    Raises:
        NeighbourError: mismatched shapes or coordinates.
    """
    if len(coordinates) != np.shape(values)[-3]:
        msg = f"{len(coordinates)} coordinates for {np.shape(values)[-3]} stations"
        raise NeighbourError(msg)
    est, den = weighted_neighbours(values, observed, idw_weights(coordinates, power=power))
    return np.where(den > 0, est, np.nan)


def correlations(values: np.ndarray, observed: np.ndarray, *, min_overlap: int = 48) -> np.ndarray:
    """Pearson correlation between every pair of stations, per channel, over their co-observed steps.

    Args:
        values: [S, T, C] float (e.g. the training range), any value where unobserved.
        observed: [S, T, C] bool or 0/1.
        min_overlap: pairs with fewer co-observed steps get NaN.

    Returns:
        [S, S, C] float64, NaN on the diagonal and where undefined (too few steps, a constant series).

    Raises:
        NeighbourError: if the arrays are not [S, T, C].
    """
    v, m = _check(values, observed)
    if v.ndim != 3:
        msg = f"correlations need [S, T, C] arrays, got {v.shape}"
        raise NeighbourError(msg)
    S, _, C = v.shape
    r = np.full((S, S, C), np.nan)
    for s in range(S):
        for j in range(s + 1, S):
            both = m[s] & m[j]  # [T, C]
            n = both.sum(axis=0)
            a, b = np.where(both, v[s], 0.0), np.where(both, v[j], 0.0)
            nn = np.maximum(n, 1)
            ma, mb = a.sum(0) / nn, b.sum(0) / nn
            da, db = np.where(both, a - ma, 0.0), np.where(both, b - mb, 0.0)
            cov, va, vb = (da * db).sum(0), (da**2).sum(0), (db**2).sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                rr = cov / np.sqrt(va * vb)
            rr = np.where((n >= min_overlap) & (va > 0) & (vb > 0), rr, np.nan)
            r[s, j] = r[j, s] = rr
    return r


def _top_k(r: np.ndarray, k: int) -> list[list[list[int]]]:
    """[S][C] -> the indices of up to k neighbours with the highest positive correlation, best first."""
    S, _, C = r.shape
    out = []
    for s in range(S):
        row = []
        for c in range(C):
            rc = np.where(np.isfinite(r[s, :, c]) & (r[s, :, c] > 0), r[s, :, c], -np.inf)
            order = [int(j) for j in np.argsort(-rc, kind="stable") if np.isfinite(rc[j]) and j != s]
            row.append(order[:k])
        out.append(row)
    return out


@dataclass
class CorrelatedRegression:
    """k-most-correlated-neighbours regression, per station and channel, fitted on the training range.

    For station s and channel c, the k neighbours with the highest positive correlation on the training range are
    chosen and ``x_s = a + sum_j b_j x_j`` is fitted by least squares on the steps where s and all k are observed.
    Every non-empty subset of the k is solved from the same normal equations, so at a step where some neighbours
    are missing the fit of the ones reporting is used; with none reporting the estimate is NaN. Causal: a step's
    estimate reads the neighbours at that step only.

    Attributes:
        k: neighbours per station and channel.
        neighbours: [S][C] lists of neighbour station indices (best first; may be shorter than k).
        coefficients: [S][C] dicts ``{subset bitmask: [a, b_1, ..., b_n]}`` (bit i = the i-th neighbour; the b
            follow the set bits in order).
        n_fit: [S][C] number of training steps of each fit.
    """

    k: int
    neighbours: list[list[list[int]]]
    coefficients: list[list[dict[int, list[float]]]]
    n_fit: list[list[int]]

    @classmethod
    def fit(cls, values: np.ndarray, observed: np.ndarray, *, k: int = 3, min_overlap: int = 48,
            ridge: float = 1e-6) -> CorrelatedRegression:
        """Fit on training arrays.

        Args:
            values: [S, T, C] float (the training range, any units; the estimate comes back in them).
            observed: [S, T, C] bool or 0/1.
            k: neighbours per station and channel (1..8).
            min_overlap: fewest co-observed steps for a correlation and for a fit.
            ridge: relative ridge on the normal equations (keeps nearly collinear neighbours solvable).

        Returns:
            The fitted :class:`CorrelatedRegression`.

        Raises:
            NeighbourError: bad k or arrays.
        """
        if not 1 <= k <= 8:
            msg = f"k must be in 1..8, got {k}"
            raise NeighbourError(msg)
        v, m = _check(values, observed)
        S, _, C = v.shape
        nbrs = _top_k(correlations(v, m, min_overlap=min_overlap), k)
        coefs: list[list[dict[int, list[float]]]] = []
        n_fit: list[list[int]] = []
        for s in range(S):
            crow, nrow = [], []
            for c in range(C):
                js = nbrs[s][c]
                rows = m[s, :, c].copy()
                for j in js:
                    rows &= m[j, :, c]
                n = int(rows.sum())
                if not js or n < min_overlap:
                    nbrs[s][c] = []
                    crow.append({})
                    nrow.append(n)
                    continue
                X = np.column_stack([np.ones(n)] + [v[j, rows, c] for j in js])  # [n, 1 + k]
                y = v[s, rows, c]
                G, b = X.T @ X, X.T @ y
                lam = ridge * np.trace(G) / len(G)
                sub = {}
                for mask in range(1, 2 ** len(js)):
                    idx = [0] + [i + 1 for i in range(len(js)) if mask >> i & 1]
                    Gs = G[np.ix_(idx, idx)] + lam * np.diag([0.0] + [1.0] * (len(idx) - 1))
                    sub[mask] = [float(x) for x in np.linalg.solve(Gs, b[idx])]
                crow.append(sub)
                nrow.append(n)
            coefs.append(crow)
            n_fit.append(nrow)
        return cls(k=k, neighbours=nbrs, coefficients=coefs, n_fit=n_fit)

    def predict(self, values: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """Estimate every station and step from its chosen neighbours at the same step.

        Args:
            values: [..., S, T, C] float in the units of the fit, any value where unobserved.
            observed: [..., S, T, C] bool or 0/1.

        Returns:
            [..., S, T, C] float64; NaN where none of the chosen neighbours reports (or no fit exists).

        Raises:
            NeighbourError: if S or C differ from the fit.
        """
        v, m = _check(values, observed)
        S, C = len(self.neighbours), len(self.neighbours[0]) if self.neighbours else 0
        if v.shape[-3] != S or v.shape[-1] != C:
            msg = f"fitted on {S} stations x {C} channels, got {v.shape}"
            raise NeighbourError(msg)
        out = np.full(v.shape, np.nan)
        for s in range(S):
            for c in range(C):
                js = self.neighbours[s][c]
                if not js:
                    continue
                pattern = np.zeros(v.shape[:-3] + v.shape[-2:-1], dtype=np.int64)  # [..., T]
                for i, j in enumerate(js):
                    pattern |= m[..., j, :, c].astype(np.int64) << i
                est = out[..., s, :, c]
                for mask, co in self.coefficients[s][c].items():
                    sel = pattern == mask
                    if not sel.any():
                        continue
                    acc = np.full(pattern.shape, co[0])
                    used = [j for i, j in enumerate(js) if mask >> i & 1]
                    for b, j in zip(co[1:], used, strict=True):
                        acc = acc + b * v[..., j, :, c]
                    est[sel] = acc[sel]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (bitmask keys as strings)."""
        return {"k": self.k, "neighbours": self.neighbours, "n_fit": self.n_fit,
                "coefficients": [[{str(k): v for k, v in d.items()} for d in row] for row in self.coefficients]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CorrelatedRegression:
        """Inverse of :meth:`to_dict`.

        Raises:
            NeighbourError: a malformed dict.
        """
        try:
            return cls(k=int(d["k"]), neighbours=[[list(map(int, x)) for x in row] for row in d["neighbours"]],
                       coefficients=[[{int(k): [float(x) for x in v] for k, v in c.items()} for c in row]
                                     for row in d["coefficients"]],
                       n_fit=[[int(x) for x in row] for row in d["n_fit"]])
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"malformed correlated-regression dict: {exc}"
            raise NeighbourError(msg) from exc


# ----------------------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ContextSpec:
    """Which neighbours feed each station's context, with which weights, fixed from the training range.

    Attributes:
        stations: the S station names, in the row order of :func:`build_context`'s arrays.
        channels: the G channel names of the context group.
        channel_index: the G column indices of those channels in the model's channel order.
        weights: [S, S, G] float64, ``weights[s, j, g]`` >= 0, zero on the diagonal and for non-neighbours.
        method: ``"correlation"`` (k most correlated, weights = correlation) or ``"distance"`` (k nearest,
            weights = 1 / d**2).
        k: neighbours per station and channel.
    """

    stations: tuple[str, ...]
    channels: tuple[str, ...]
    channel_index: tuple[int, ...]
    weights: np.ndarray
    method: str
    k: int

    def __post_init__(self) -> None:
        S, G = len(self.stations), len(self.channels)
        w = np.asarray(self.weights, dtype=np.float64)
        if w.shape != (S, S, G) or len(self.channel_index) != G or np.any(w < 0) or not np.all(np.isfinite(w)):
            msg = f"context weights must be finite, >= 0, [{S}, {S}, {G}]; got {w.shape}"
            raise NeighbourError(msg)
        if len(set(self.stations)) != S:
            msg = "context stations must be unique"
            raise NeighbourError(msg)
        object.__setattr__(self, "weights", w)

    def neighbours_of(self, station: str) -> dict[str, list[str]]:
        """Channel -> the neighbours with a positive weight for ``station``, highest weight first."""
        s = self.stations.index(station)
        return {ch: [self.stations[j] for j in np.argsort(-self.weights[s, :, g], kind="stable")
                     if self.weights[s, j, g] > 0] for g, ch in enumerate(self.channels)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the checkpoint and the bundle card: neighbours as ``{station: {channel: {neighbour:
        weight}}}``, only positive weights."""
        nb = {}
        for s, name in enumerate(self.stations):
            nb[name] = {ch: {self.stations[j]: round(float(self.weights[s, j, g]), 6)
                             for j in np.argsort(-self.weights[s, :, g], kind="stable") if self.weights[s, j, g] > 0}
                        for g, ch in enumerate(self.channels)}
        return {"schema": CONTEXT_SCHEMA, "method": self.method, "k": self.k, "stations": list(self.stations),
                "channels": list(self.channels), "channel_index": list(self.channel_index), "neighbours": nb}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ContextSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            NeighbourError: wrong schema, unknown stations or channels in the neighbour lists, negative weights.
        """
        if d.get("schema") != CONTEXT_SCHEMA:
            msg = f"context spec schema {d.get('schema')!r}, expected {CONTEXT_SCHEMA!r}"
            raise NeighbourError(msg)
        try:
            stations = tuple(str(s) for s in d["stations"])
            channels = tuple(str(c) for c in d["channels"])
            w = np.zeros((len(stations), len(stations), len(channels)))
            for name, per_ch in d["neighbours"].items():
                for ch, nbs in per_ch.items():
                    for nb, weight in nbs.items():
                        w[stations.index(name), stations.index(nb), channels.index(ch)] = float(weight)
            return cls(stations=stations, channels=channels, channel_index=tuple(int(i) for i in d["channel_index"]),
                       weights=w, method=str(d["method"]), k=int(d["k"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"malformed context spec: {exc}"
            raise NeighbourError(msg) from exc


def fit_context(
    values: np.ndarray,
    observed: np.ndarray,
    *,
    stations: Sequence[str],
    channels: Sequence[str],
    channel_index: Sequence[int],
    k: int = 3,
    coordinates: Sequence[Sequence[float]] | None = None,
    min_overlap: int = 48,
) -> ContextSpec:
    """Choose each station's neighbours and weights from the training range.

    With ``coordinates``: the k nearest stations, weights ``1 / d**2`` (normalised per station and channel).
    Without: per channel, the k stations with the highest positive correlation on the co-observed training steps,
    weights proportional to the correlation. A station with no eligible neighbour gets none (its context is always
    unobserved); that is logged.

    Args:
        values: [S, T, C] float, training range (any units), any value where unobserved.
        observed: [S, T, C] bool or 0/1.
        stations: the S names, in row order.
        channels: the G names of the context group.
        channel_index: their G column indices in ``values``.
        k: neighbours per station and channel.
        coordinates: [S] (lat, lon) degrees, or None.
        min_overlap: fewest co-observed steps for a correlation.

    Returns:
        :class:`ContextSpec`.

    Raises:
        NeighbourError: mismatched arguments.
    """
    v, m = _check(values, observed)
    S = v.shape[0]
    if len(stations) != S or len(channels) != len(channel_index) or v.ndim != 3:
        msg = f"{len(stations)} stations / {len(channels)} channels for arrays {v.shape} and {len(channel_index)} " \
              "indices"
        raise NeighbourError(msg)
    idx = list(channel_index)
    G = len(idx)
    w = np.zeros((S, S, G))
    if coordinates is not None:
        if len(coordinates) != S:
            msg = f"{len(coordinates)} coordinates for {S} stations"
            raise NeighbourError(msg)
        base = idw_weights(coordinates)
        for s in range(S):
            near = [int(j) for j in np.argsort(-base[s], kind="stable") if j != s][:k]
            w[s, near, :] = base[s, near, None]
        method = "distance"
    else:
        r = correlations(v[:, :, idx], m[:, :, idx], min_overlap=min_overlap)
        for s, row in enumerate(_top_k(r, k)):
            for g, js in enumerate(row):
                w[s, js, g] = r[s, js, g]
        method = "correlation"
    tot = w.sum(axis=1, keepdims=True)
    w = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 0.0)
    lonely = [stations[s] for s in range(S) if not np.any(w[s] > 0)]
    if lonely:
        log.warning("%d station(s) have no neighbour for context: %s", len(lonely), ", ".join(lonely))
    return ContextSpec(stations=tuple(stations), channels=tuple(channels), channel_index=tuple(idx), weights=w,
                       method=method, k=k)


def build_context(spec: ContextSpec, values: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour context of every station window: one weighted neighbour value per step and group channel.

    ``context[..., s, t, g] = sum_j w[s, j, g] * m_j(t) * x_j(t) / sum_j w[s, j, g] * m_j(t)`` over the stations
    j of the spec reporting channel g at step t (the weights renormalised over those that report), 0 where none
    reports; ``context_observed`` is 1 where at least one neighbour reported. The same function serves training
    (slices of aligned training arrays), evaluation and the gateway (:func:`context_for_windows`).

    Args:
        spec: the :class:`ContextSpec`.
        values: [..., S, L, C] float32 windows of the spec's stations in its order (normalised, as the model sees
            them), any value where unobserved.
        observed: [..., S, L, C] bool or 0/1.

    Returns:
        ``(context [..., S, L, G] float32, context_observed [..., S, L, G] float32 0/1)``.

    Raises:
        NeighbourError: if S differs from the spec or a group channel index is out of range.
    """
    if np.shape(values)[-3] != len(spec.stations) or max(spec.channel_index, default=-1) >= np.shape(values)[-1]:
        msg = f"context for {len(spec.stations)} stations and channels {list(spec.channel_index)}, got windows " \
              f"{np.shape(values)}"
        raise NeighbourError(msg)
    idx = list(spec.channel_index)
    ctx, den = weighted_neighbours(np.asarray(values)[..., idx], np.asarray(observed)[..., idx], spec.weights)
    return ctx.astype(np.float32), (den > 0).astype(np.float32)


def context_for_windows(
    spec: ContextSpec, windows: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """The context of live station windows (the gateway's round): stations by name, in any order.

    Stations of the spec absent from ``windows`` count as silent; a window of a station the spec does not know
    (new, auto-registered) gets None: it runs without context.

    Args:
        spec: the :class:`ContextSpec`.
        windows: station name -> ``(values [L, C], observed [L, C])``, same L and C for all, aligned to the same
            steps (the round's end step).

    Returns:
        Station name -> ``(context [L, G], context_observed [L, G])`` float32, or None for an unknown station.

    Raises:
        NeighbourError: windows of different shapes.
    """
    if not windows:
        return {}
    shapes = {np.shape(v) for v, _ in windows.values()} | {np.shape(m) for _, m in windows.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        msg = f"live windows must all be [L, C] of one shape, got {sorted(shapes)}"
        raise NeighbourError(msg)
    L, C = next(iter(shapes))
    S = len(spec.stations)
    vals = np.zeros((S, L, C), dtype=np.float32)
    obs = np.zeros((S, L, C), dtype=np.float32)
    row = {name: s for s, name in enumerate(spec.stations)}
    for name, (v, m) in windows.items():
        if name in row:
            mm = np.asarray(m, dtype=np.float32)
            vals[row[name]] = np.where(mm > 0, v, 0.0)
            obs[row[name]] = mm
    ctx, cobs = build_context(spec, vals, obs)
    return {name: ((ctx[row[name]], cobs[row[name]]) if name in row else None) for name in windows}



def extend_by_coordinates(
    spec: ContextSpec, station: str, coordinates: Mapping[str, Sequence[float]], *, k: int | None = None
) -> ContextSpec | None:
    """A station the spec does not know (new, auto-registered) gets the k nearest spec stations as neighbours.

    The weights are ``1 / d**2`` (great-circle distance), normalised to sum 1, the same for every context channel;
    the new station is nobody's neighbour (the others' context is unchanged). The gateway calls this once when
    the station registers.

    Args:
        spec: the card's :class:`ContextSpec`.
        station: the new station's name.
        coordinates: station name -> (lat, lon) in degrees; needs the new station and at least one spec station.
        k: neighbours (default: the spec's k).

    Returns:
        The extended :class:`ContextSpec`, or None when coordinates are missing (the station runs without
        context) or the station is already in the spec (nothing to extend).

    Raises:
        NeighbourError: malformed coordinates.
    """
    if station in spec.stations or station not in coordinates:
        return None
    known = [j for j, name in enumerate(spec.stations) if name in coordinates]
    if not known:
        return None
    xy = _coords([coordinates[station]] + [coordinates[spec.stations[j]] for j in known])
    d = haversine_km(xy[0, 0], xy[0, 1], xy[1:, 0], xy[1:, 1])
    order = np.argsort(d, kind="stable")[: k or spec.k]
    S, G = len(spec.stations), len(spec.channels)
    w = np.zeros((S + 1, S + 1, G))
    w[:S, :S] = spec.weights
    inv = 1.0 / np.maximum(d[order], 0.1) ** 2
    for i, o in enumerate(order):
        w[S, known[int(o)], :] = inv[i] / inv.sum()
    return ContextSpec(stations=spec.stations + (station,), channels=spec.channels, channel_index=spec.channel_index,
                       weights=w, method=spec.method, k=spec.k)
