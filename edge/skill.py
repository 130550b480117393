"""Online forecast skill and drift: is the model still beating a naive guess on live data? Pure: no I/O, no clock.

For every forecast the agent issues, :meth:`SkillTracker.issue` keeps the model's H steps and what persistence
(the last observed value of each channel at the forecast origin, LOCF) would have said. When the real reading of a
step arrives (:meth:`SkillTracker.observe`), every pending forecast that covered that step is scored: the absolute
error of the model, of persistence and of seasonal naive (the observed value one season earlier, from the same
window) on the channels where all three have a value and the truth was observed — the same steps for every method.

Errors are divided by each channel's scale (the card's normalisation std), so channels add up, and summed per
station x horizon bucket x channel x method into time bins of the rolling span (default 7 days in ``n_bins`` bins
of event time). Memory: the sums are O(stations x buckets x channels x bins); pending forecasts are at most H per
station (float16, H x C each).

Drift: a station's skill ratio is model MAE / min(persistence MAE, seasonal MAE) over the span and all buckets;
when it stays above 1 (worse than the better naive method) for longer than ``drift_after_s`` with at least
``min_count`` scored values, the station is in drift until the ratio comes back under 1.

Real-time fills are scored two ways, neither waiting for a truth that never comes:

- shadow-hidden values (:meth:`SkillTracker.observe_fill`): observed values withheld from the model input only, the
  fill against the actual reading, next to LOCF;
- revisions (:meth:`SkillTracker.note_fill`, :meth:`SkillTracker.observe_revision`): the agent remembers the first
  real-time fill of each imputed value (a ring of the last ``lookback`` steps per station, float32 [lookback, C]);
  when a short outage ends, the ``gap_end`` revision (the re-fill with context on both sides) scores each of them
  once: MAE per channel in the channel's units, and pooled in normalised units.

Skill scores as in forecast verification practice (Murphy 1988, "Skill scores based on the mean square error"):
a skill score of 1 - MAE_model / MAE_reference, reference = the better naive method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gapcast.duration import format_duration

__all__ = ["METHODS", "SkillSettings", "SkillTracker", "horizon_buckets"]

METHODS = ("model", "persistence", "seasonal_naive")


def horizon_buckets(horizon: int, cadence_s: float) -> list[tuple[str, int, int]]:
    """Horizon buckets as ``(label, first_step, last_step)`` (1-based, inclusive), labelled with durations.

    For an hourly 24-step horizon: ``[("1h-6h", 1, 6), ("7h-24h", 7, 24)]``; the first bucket covers the first
    quarter of the horizon (at least one step), the second the rest.

    Args:
        horizon: H, steps (>= 1).
        cadence_s: seconds per step.
    """
    cut = max(1, horizon // 4)
    out = [(_span_label(cadence_s, cut * cadence_s), 1, cut)]
    if horizon > cut:
        out.append((_span_label((cut + 1) * cadence_s, horizon * cadence_s), cut + 1, horizon))
    return out


def _span_label(lo_s: float, hi_s: float) -> str:
    """``"7h-24h"``: both ends in the largest unit that divides both (days only beyond 48 h)."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if (unit != "d" or hi_s > 48 * 3600) and lo_s % size == 0 and hi_s % size == 0:
            return f"{int(lo_s // size)}{unit}-{int(hi_s // size)}{unit}"
    return f"{format_duration(lo_s)}-{format_duration(hi_s)}"


@dataclass(frozen=True)
class SkillSettings:
    """Attributes:
        span_s: the rolling span, seconds of event time (default 7 days).
        n_bins: time bins in the span (the span rolls one bin at a time).
        drift_after_s: how long a station must stay worse than the better naive method before drift is raised.
        min_count: scored values a station needs in the span before its ratio counts.
        season_steps: seasonal naive's season in steps (0 = no seasonal naive: persistence is the reference).
        fill_steps: how many recent steps' real-time fills are kept for scoring against a revision (the lookback:
            a revision never reaches further back); 0 = revision skill off.
    """

    span_s: float = 7 * 86400.0
    n_bins: int = 7
    drift_after_s: float = 86400.0
    min_count: int = 200
    season_steps: int = 0
    fill_steps: int = 0


class _Station:
    __slots__ = ("bin_ids", "counts", "fill_counts", "fill_sums", "pending", "rev_counts", "rev_sums", "rt_fill",
                 "rt_imputed", "rt_step", "sums", "worse_since_s")

    def __init__(self, n_bins: int, n_buckets: int, channels: int, fill_steps: int = 0) -> None:
        self.sums = np.zeros((n_bins, n_buckets, channels, len(METHODS)), dtype=np.float64)
        self.counts = np.zeros((n_bins, n_buckets, channels), dtype=np.int64)
        self.bin_ids = np.full(n_bins, -1, dtype=np.int64)
        # real-time fill skill (shadow-hidden values): [bins, C, (fill, locf)] and [bins, C]
        self.fill_sums = np.zeros((n_bins, channels, 2), dtype=np.float64)
        self.fill_counts = np.zeros((n_bins, channels), dtype=np.int64)
        # real-time fills vs revisions: |fill - revision| in the channel's units, [bins, C], and the counts
        self.rev_sums = np.zeros((n_bins, channels), dtype=np.float64)
        self.rev_counts = np.zeros((n_bins, channels), dtype=np.int64)
        # the first real-time fill of recent steps, a ring indexed by step % fill_steps (rt_step -1 = empty slot)
        self.rt_step = np.full(fill_steps, -1, dtype=np.int64)
        self.rt_fill = np.zeros((fill_steps, channels), dtype=np.float32)
        self.rt_imputed = np.zeros((fill_steps, channels), dtype=bool)
        # origin step -> (model forecast [H, C] float16, persistence [C] float16 with NaN where never observed)
        self.pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.worse_since_s: float | None = None


class SkillTracker:
    """Rolling forecast skill per station against persistence and seasonal naive, and drift detection.

    Args:
        channels: channel names (C).
        scale: [C] float, positive: what an error is divided by (the card's std).
        horizon: H, steps.
        cadence_s: seconds per step.
        settings: :class:`SkillSettings`.

    Raises:
        ValueError: scale not positive or of the wrong length.
    """

    def __init__(
        self, channels: list[str] | tuple[str, ...], scale: np.ndarray, horizon: int, cadence_s: float,
        settings: SkillSettings | None = None,
    ) -> None:
        self.channels = tuple(channels)
        self.scale = np.asarray(scale, dtype=np.float64)
        if self.scale.shape != (len(self.channels),) or not (self.scale > 0).all():
            msg = f"scale must be {len(self.channels)} positive values, got {self.scale!r}"
            raise ValueError(msg)
        self.H, self.cadence_s = int(horizon), float(cadence_s)
        self.settings = settings or SkillSettings()
        self.buckets = horizon_buckets(self.H, self.cadence_s)
        self._bucket_of = np.zeros(self.H + 1, dtype=np.int64)
        for k, (_, lo, hi) in enumerate(self.buckets):
            self._bucket_of[lo : hi + 1] = k
        self.bin_s = self.settings.span_s / self.settings.n_bins
        self.stations: dict[str, _Station] = {}

    def _station(self, name: str) -> _Station:
        st = self.stations.get(name)
        if st is None:
            st = self.stations[name] = self._new_station()
        return st

    def _new_station(self) -> _Station:
        return _Station(self.settings.n_bins, len(self.buckets), len(self.channels), self.settings.fill_steps)

    # -- the two verbs -----------------------------------------------------------------------------------------

    def issue(self, station: str, origin_step: int, forecast: np.ndarray, last_value: np.ndarray) -> None:
        """Remember a forecast issued at ``origin_step`` for steps origin+1 .. origin+H.

        Args:
            station: station name.
            origin_step: the step index (epoch seconds / cadence) of the newest step in the window.
            forecast: [H, C] float, physical units.
            last_value: [C] float, the last observed value of each channel in the window (NaN = never observed).
        """
        st = self._station(station)
        st.pending[int(origin_step)] = (
            np.asarray(forecast, dtype=np.float16), np.asarray(last_value, dtype=np.float16),
        )
        for o in [o for o in st.pending if o <= origin_step - self.H]:
            del st.pending[o]

    def observe(
        self, station: str, step: int, truth: np.ndarray, observed: np.ndarray, seasonal: np.ndarray | None = None,
        seasonal_observed: np.ndarray | None = None,
    ) -> int:
        """Score every pending forecast that covered ``step`` against the reading of that step.

        Args:
            station: station name.
            step: the step index of the closed step.
            truth: [C] float, physical units.
            observed: [C] bool, which channels were really observed at ``step``.
            seasonal: [C] float, the value one season earlier (seasonal naive's prediction); None = not available.
            seasonal_observed: [C] bool for ``seasonal``.

        Returns:
            How many (forecast, channel) values were scored.
        """
        st = self.stations.get(station)
        if st is None or not st.pending:
            return 0
        truth = np.asarray(truth, dtype=np.float64)
        ok_truth = np.asarray(observed, dtype=bool) & np.isfinite(truth)
        if self.settings.season_steps and seasonal is not None and seasonal_observed is not None:
            seas = np.asarray(seasonal, dtype=np.float64)
            ok_seas = np.asarray(seasonal_observed, dtype=bool) & np.isfinite(seas)
        else:
            seas, ok_seas = None, np.ones_like(ok_truth)
        origins = [o for o in st.pending if 1 <= step - o <= self.H]
        if not origins:
            return 0
        # Every pending forecast that covered the step at once: [n, C] (one numpy pass, not one per forecast).
        model = np.stack([st.pending[o][0][step - o - 1] for o in origins]).astype(np.float64)
        pers = np.stack([st.pending[o][1] for o in origins]).astype(np.float64)
        ok = ok_truth & ok_seas & np.isfinite(pers) & np.isfinite(model)
        if not ok.any():
            return 0
        row = self._bin_row(st, step)
        if row is None:
            return 0
        ref = np.broadcast_to(seas, model.shape) if seas is not None else pers
        err = np.stack([np.abs(model - truth), np.abs(pers - truth), np.abs(ref - truth)], axis=-1) / self.scale[:, None]
        err = np.where(ok[..., None], err, 0.0)
        ks = self._bucket_of[np.array([step - o for o in origins])]
        for k in np.unique(ks):
            sel = ks == k
            st.sums[row, k] += err[sel].sum(axis=0)
            st.counts[row, k] += ok[sel].sum(axis=0)
        return int(ok.sum())

    def observe_fill(
        self, station: str, step: int, fill: np.ndarray, truth: np.ndarray, hidden: np.ndarray, locf: np.ndarray,
    ) -> int:
        """Score real-time fills of shadow-hidden values (withheld from the model input, really observed).

        Args:
            station: station name.
            step: the step index of the closed step.
            fill: [C] float, the model's real-time fill of the step (physical units).
            truth: [C] float, the real readings.
            hidden: [C] bool, the channels that were withheld (and observed).
            locf: [C] float, the last observed value before the step (LOCF's fill; NaN = none).

        Returns:
            How many values were scored (channels where fill, truth and LOCF are finite).
        """
        st = self._station(station)
        fill, truth, locf = (np.asarray(a, dtype=np.float64) for a in (fill, truth, locf))
        ok = np.asarray(hidden, dtype=bool) & np.isfinite(fill) & np.isfinite(truth) & np.isfinite(locf)
        if not ok.any():
            return 0
        row = self._bin_row(st, step)
        if row is None:
            return 0
        err = np.stack([np.abs(fill - truth), np.abs(locf - truth)], axis=-1) / self.scale[:, None]
        st.fill_sums[row][ok] += err[ok]
        st.fill_counts[row][ok] += 1
        return int(ok.sum())

    def fill_mae(self, station: str | None = None) -> dict[str, Any]:
        """Rolling real-time fill MAE (normalised units) of the shadow-hidden values: ``{"model", "locf", "n"}``
        for one station, or pooled over the gateway (``station`` None); None where nothing was scored."""
        sts = [self.stations[station]] if station in self.stations else [] if station else list(self.stations.values())
        sums, n = np.zeros(2), 0
        for st in sts:
            if (st.bin_ids < 0).all():
                continue
            live = self._live_rows(st)
            sums += st.fill_sums[live].sum(axis=(0, 1))
            n += int(st.fill_counts[live].sum())
        return {"model": float(sums[0] / n) if n else None, "locf": float(sums[1] / n) if n else None, "n": n}

    def note_fill(self, station: str, step: int, fill: np.ndarray, imputed: np.ndarray) -> None:
        """Remember the first real-time fill of ``step`` (its imputed channels), to score it against a revision.

        Only the first call for a step counts (a real-time fill is published once); the ring holds the last
        ``settings.fill_steps`` steps, so memory is O(fill_steps x C) per station. No-op when ``fill_steps`` is 0.

        Args:
            station: station name.
            step: the step index of the closed step.
            fill: [C] float, the published values of the step (physical units).
            imputed: [C] bool, the channels that were imputed (not observed) in real time.
        """
        K = self.settings.fill_steps
        imputed = np.asarray(imputed, dtype=bool)
        if K <= 0 or not imputed.any():
            return
        st = self._station(station)
        i = int(step) % K
        if st.rt_step[i] == step:
            return
        st.rt_step[i] = int(step)
        st.rt_fill[i] = np.asarray(fill, dtype=np.float32)
        st.rt_imputed[i] = imputed

    def observe_revision(self, station: str, first_step: int, values: np.ndarray) -> int:
        """Score the remembered real-time fills of steps ``first_step ..`` against a revision's values.

        Each real-time fill is scored at most once (its slot is emptied), on the channels imputed in real time.

        Args:
            station: station name.
            first_step: the step index of the revision's first step.
            values: [n, C] float, the revised values (physical units) of ``first_step .. first_step + n - 1``.

        Returns:
            How many values were scored.
        """
        K = self.settings.fill_steps
        st = self.stations.get(station)
        if K <= 0 or st is None:
            return 0
        values = np.asarray(values, dtype=np.float64)
        n = 0
        for k in range(values.shape[0]):
            step = int(first_step) + k
            i = step % K
            if st.rt_step[i] != step:
                continue
            st.rt_step[i] = -1
            ok = st.rt_imputed[i] & np.isfinite(values[k]) & np.isfinite(st.rt_fill[i])
            row = self._bin_row(st, step)
            if row is None or not ok.any():
                continue
            st.rev_sums[row][ok] += np.abs(st.rt_fill[i].astype(np.float64) - values[k])[ok]
            st.rev_counts[row][ok] += 1
            n += int(ok.sum())
        return n

    def revision_mae(self, station: str | None = None) -> dict[str, Any]:
        """Rolling MAE of the real-time fills against the revisions that replaced them, for one station or pooled
        over the gateway (``station`` None).

        Returns:
            ``{"channels": {name: {"mae": .., "n": ..}}, "mae_norm": .., "n": ..}``: ``mae`` in the channel's
            units, ``mae_norm`` pooled over channels in normalised units (error / the card's std); None where
            nothing was scored.
        """
        sts = [self.stations[station]] if station in self.stations else [] if station else list(self.stations.values())
        sums, counts = np.zeros(len(self.channels)), np.zeros(len(self.channels), dtype=np.int64)
        for st in sts:
            if (st.bin_ids < 0).all():
                continue
            live = self._live_rows(st)
            sums += st.rev_sums[live].sum(axis=0)
            counts += st.rev_counts[live].sum(axis=0)
        n = int(counts.sum())
        return {
            "channels": {
                c: {"mae": float(sums[j] / counts[j]) if counts[j] else None, "n": int(counts[j])}
                for j, c in enumerate(self.channels)
            },
            "mae_norm": float((sums / self.scale).sum() / n) if n else None,
            "n": n,
        }

    def _bin_row(self, st: _Station, step: int) -> int | None:
        """The sums' row of ``step``'s time bin (a new bin clears its row); None when the step is older than the
        bin its row holds (out of the span: counted nowhere)."""
        bin_id = int(math.floor(step * self.cadence_s / self.bin_s))
        row = bin_id % self.settings.n_bins
        if st.bin_ids[row] != bin_id:
            if st.bin_ids[row] > bin_id:
                return None
            st.sums[row] = 0.0
            st.counts[row] = 0
            st.fill_sums[row] = 0.0
            st.fill_counts[row] = 0
            st.rev_sums[row] = 0.0
            st.rev_counts[row] = 0
            st.bin_ids[row] = bin_id
        return row

    # -- reading the figures ---------------------------------------------------------------------------------

    def _live_rows(self, st: _Station) -> np.ndarray:
        newest = int(st.bin_ids.max())
        return (st.bin_ids >= 0) & (st.bin_ids > newest - self.settings.n_bins)

    def station_mae(self, station: str) -> dict[str, Any]:
        """Rolling MAE (normalised units) per bucket and method for one station, and the counts.

        Returns:
            ``{"buckets": {label: {"model": .., "persistence": .., "seasonal_naive": .., "n": ..}}, "ratio": ..,
            "n": ..}``; a method with no scored value is None; ``ratio`` = model / better naive (None if no data).
        """
        st = self.stations.get(station)
        out: dict[str, Any] = {"buckets": {}, "ratio": None, "n": 0}
        if st is None:
            return out
        live = self._live_rows(st)
        sums = st.sums[live].sum(axis=(0, 2))  # [buckets, methods]
        counts = st.counts[live].sum(axis=(0, 2))  # [buckets]
        for k, (label, _, _) in enumerate(self.buckets):
            c = int(counts[k])
            out["buckets"][label] = {m: (float(sums[k, i] / c) if c else None) for i, m in enumerate(METHODS)}
            out["buckets"][label]["n"] = c
        total = int(counts.sum())
        out["n"] = total
        if total:
            tot = sums.sum(axis=0)
            ref = tot[1] if not self.settings.season_steps else min(tot[1], tot[2])
            out["ratio"] = float(tot[0] / ref) if ref > 0 else None
        return out

    def check_drift(self, station: str, now_event_s: float) -> dict[str, Any] | None:
        """Update and return the station's drift state at event time ``now_event_s`` (seconds).

        Returns:
            None when the station is not in drift; else the evidence: ``{"station", "ratio", "n", "since_s",
            "for_s", "buckets"}``.
        """
        st = self.stations.get(station)
        if st is None:
            return None
        figs = self.station_mae(station)
        ratio = figs["ratio"]
        if ratio is None or figs["n"] < self.settings.min_count or ratio <= 1.0:
            st.worse_since_s = None
            return None
        if st.worse_since_s is None:
            st.worse_since_s = float(now_event_s)
        held = float(now_event_s) - st.worse_since_s
        if held < self.settings.drift_after_s:
            return None
        return {"station": station, "ratio": ratio, "n": figs["n"], "since_s": st.worse_since_s, "for_s": held,
                "buckets": figs["buckets"]}

    def summary(self) -> dict[str, Any]:
        """Gateway-wide rolling MAE per bucket and method (all stations pooled), for status and metrics."""
        sums = np.zeros((len(self.buckets), len(METHODS)))
        counts = np.zeros(len(self.buckets), dtype=np.int64)
        for st in self.stations.values():
            if (st.bin_ids < 0).all():
                continue
            live = self._live_rows(st)
            sums += st.sums[live].sum(axis=(0, 2))
            counts += st.counts[live].sum(axis=(0, 2))
        out: dict[str, Any] = {"span": format_duration(self.settings.span_s), "buckets": {}}
        for k, (label, _, _) in enumerate(self.buckets):
            c = int(counts[k])
            out["buckets"][label] = {m: (float(sums[k, i] / c) if c else None) for i, m in enumerate(METHODS)}
            out["buckets"][label]["n"] = c
        return out

    # -- snapshots ---------------------------------------------------------------------------------------------

    def export_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Every station's sums, counts, bins and pending forecasts as plain arrays (for the window snapshot)."""
        out = {}
        for name, st in self.stations.items():
            origins = np.array(sorted(st.pending), dtype=np.int64)
            out[name] = {
                "sums": st.sums, "counts": st.counts, "bin_ids": st.bin_ids,
                "origins": origins,
                "fc": np.stack([st.pending[o][0] for o in origins]) if len(origins) else
                np.zeros((0, self.H, len(self.channels)), np.float16),
                "last": np.stack([st.pending[o][1] for o in origins]) if len(origins) else
                np.zeros((0, len(self.channels)), np.float16),
                "worse_since_s": np.array([np.nan if st.worse_since_s is None else st.worse_since_s]),
                "fill_sums": st.fill_sums, "fill_counts": st.fill_counts,
                "rev_sums": st.rev_sums, "rev_counts": st.rev_counts,
                "rt_step": st.rt_step, "rt_fill": st.rt_fill, "rt_imputed": st.rt_imputed,
            }
        return out

    def restore_state(self, state: dict[str, dict[str, np.ndarray]]) -> int:
        """Restore what :meth:`export_state` wrote; a station whose shapes do not fit is skipped. Returns the count."""
        n = 0
        for name, a in state.items():
            st = self._new_station()
            if a["sums"].shape != st.sums.shape or a["fc"].shape[1:] != (self.H, len(self.channels)):
                continue
            st.sums[...] = a["sums"]
            st.counts[...] = a["counts"]
            st.bin_ids[...] = a["bin_ids"]
            st.pending = {int(o): (a["fc"][i], a["last"][i]) for i, o in enumerate(a["origins"])}
            ws = float(a["worse_since_s"][0])
            st.worse_since_s = None if math.isnan(ws) else ws
            if "fill_sums" in a and a["fill_sums"].shape == st.fill_sums.shape:  # absent in older snapshots
                st.fill_sums[...] = a["fill_sums"]
                st.fill_counts[...] = a["fill_counts"]
            if "rev_sums" in a and a["rev_sums"].shape == st.rev_sums.shape:  # absent in older snapshots
                st.rev_sums[...] = a["rev_sums"]
                st.rev_counts[...] = a["rev_counts"]
            if "rt_step" in a and a["rt_fill"].shape == st.rt_fill.shape:  # a lookback change drops the ring
                st.rt_step[...] = a["rt_step"]
                st.rt_fill[...] = a["rt_fill"]
                st.rt_imputed[...] = a["rt_imputed"]
            self.stations[name] = st
            n += 1
        return n
