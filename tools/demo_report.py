"""The demo's collector, outages, scoring, table and figure (``gapcast demo``'s score stage; :mod:`gapcast.tools.demo`
runs the stages).

Scoring compares, on the same hidden values in original units, the agent's real-time fills against LOCF, linear
interpolation and the causal neighbour estimate, and its forecasts against seasonal naive; the table is printed and
saved as JSON, the figure as PNG.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from gapcast import GapcastError
from gapcast.tools.collector import CollectorError, Recorder

__all__ = ["POLLUTANTS", "PREFIX", "Collector", "DemoError", "format_table", "injected_outages", "plot_figure",
           "score_run"]

#: The Beijing pollutants (``gapcast.train.data.BEIJING_POLLUTANTS``; not imported: the CLI loads this module).
POLLUTANTS = ("PM2.5", "PM10", "SO2", "NO2", "CO", "O3")
PREFIX = "gapcast/v1"


class DemoError(GapcastError):
    """A demo stage failed; the message says which and where its log is."""


# --------------------------------------------------------------------------------------------------- collector


class Collector(Recorder):
    """Subscribes to the agent's outputs (the shared :class:`gapcast.tools.collector.Recorder`) and files every
    message by kind with its arrival time, dropping QoS 1 redeliveries (same id, same payload).

    Threads: paho's network thread runs ``_on_message`` (appends under the recorder's lock); readers take it too.

    Args:
        host, port: the broker.
        prefix: topic prefix.

    Raises:
        DemoError: no SUBACK from the broker.
    """

    def __init__(self, host: str, port: int, prefix: str = PREFIX) -> None:
        from gapcast.edge.topics import Topics

        self.prefix = prefix
        self.filled: list[tuple[float, dict]] = []
        self.revisions: list[tuple[float, dict]] = []
        self.forecasts: list[tuple[float, dict]] = []
        self.status: list[tuple[float, dict]] = []
        self.deadletter: list[tuple[float, dict]] = []
        self.duplicates = 0
        self.undecodable = 0
        self._ids: set[tuple[str, int]] = set()
        self.last_rx = time.monotonic()
        t = Topics(prefix)
        topics = [t.output_filter("filled"), t.output_filter("revision"), t.output_filter("forecast"),
                  f"{prefix}/gateways/+/status", f"{prefix}/deadletter/#"]
        try:
            super().__init__(host, port, topics, client_id=f"gapcast-demo-collector-{os.getpid()}")
        except CollectorError as exc:
            msg = f"the collector could not subscribe to the private broker: {exc}"
            raise DemoError(msg) from exc

    def _on_message(self, client, userdata, msg):  # paho network thread
        now = time.monotonic()
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            with self._lock:
                self.undecodable += 1
            return
        with self._lock:
            if not msg.topic.endswith("/status"):
                self.last_rx = now  # the periodic status does not count as activity
            mid = body.get("id")
            if mid and not msg.topic.endswith("/status"):
                # QoS 1 is at-least-once: a redelivery has the same stable id and the same payload. (The same id
                # with other values is a new message, e.g. a step revised again by a late reading.)
                key = (mid, hash(msg.payload))
                if key in self._ids:
                    self.duplicates += 1
                    return
                self._ids.add(key)
            if msg.topic.endswith("/filled"):
                self.filled.append((now, body))
            elif msg.topic.endswith("/revisions"):
                self.revisions.append((now, body))
            elif msg.topic.endswith("/forecast"):
                self.forecasts.append((now, body))
            elif msg.topic.endswith("/status"):
                self.status.append((now, body))
            else:
                self.deadletter.append((now, body))

    def latest_status(self) -> dict:
        with self._lock:
            return dict(self.status[-1][1]) if self.status else {}

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "filled": len(self.filled),
                "revisions": len(self.revisions),
                "forecast": len(self.forecasts),
                "status": len(self.status),
                "deadletter": len(self.deadletter),
                "duplicates_dropped": self.duplicates,
            }

    def filled_steps(self) -> dict[str, set[int]]:
        with self._lock:
            out: dict[str, set[int]] = {}
            for _, b in self.filled:
                out.setdefault(b["station"], set()).add(int(b["epoch_s"]))
            return out


# --------------------------------------------------------------------------------------------------- outages


def injected_outages(stations: list[str], start_s: int, hours: int) -> list[tuple[str, int, int]]:
    """Where the demo injects its outages: one 24 h and one 72 h outage of all pollutants per station.

    The first outage starts after up to 4 days of context (the model's 96 h lookback), the second after a gap of
    up to 2 days, and up to a day is left after it so the agent re-fills the gap with context on both sides and
    its forecasts can be checked; stations are staggered by a few hours so their outages do not coincide.

    Args:
        stations: replayed station names.
        start_s: first replayed step, epoch seconds.
        hours: length of the replayed slice, hours.

    Returns:
        ``(station, start_s, hours)`` per outage.

    Raises:
        DemoError: when the slice is too short to hold both outages with context (the message gives the minimum).
    """
    def layout(h: int) -> tuple[int, int, int, int]:
        margin, gap, tail = (int(min(hi, max(lo, share * h))) for lo, hi, share in ((12, 96, 0.2), (6, 48, 0.1), (6, 24, 0.05)))
        return margin, gap, tail, margin + 24 + gap + 72 + tail

    margin, gap, tail, need = layout(hours)
    if need > hours:
        shortest = next(h for h in range(hours, 10 * 24 * 30) if layout(h)[3] <= h)
        msg = (
            f"a {hours} h slice cannot hold a 24 h and a 72 h outage with context: "
            f"replay at least {shortest} h ({shortest / 24:.1f} days)"
        )
        raise DemoError(msg)
    slack = hours - need
    stagger = min(13, slack // max(len(stations), 1))
    out = []
    for k, name in enumerate(stations):
        o24 = start_s + (margin + k * stagger) * 3600
        o72 = o24 + (24 + gap) * 3600
        out += [(name, o24, 24), (name, o72, 72)]
    return out


# --------------------------------------------------------------------------------------------------- scoring


def _mae_by_channel(err, mask, names: tuple[str, ...], std) -> dict[str, Any]:
    """MAE per channel (original units) and overall (normalised by each channel's training std)."""
    import numpy as np

    out: dict[str, Any] = {}
    norm_sum, norm_n = 0.0, 0
    for j, name in enumerate(names):
        m = mask[:, j]
        n = int(m.sum())
        out[name] = float(np.abs(err[m, j]).mean()) if n else None
        norm_sum += float(np.abs(err[m, j]).sum() / std[j])
        norm_n += n
    out["overall_norm"] = norm_sum / norm_n if norm_n else None
    out["n"] = norm_n
    return out


def score_run(
    plan,
    collector: Collector,
    journal: list[dict],
    *,
    channel_std: dict[str, float],
    horizon: int,
    season: int = 24,
) -> dict[str, Any]:
    """Score what the agent published against the replayed truth.

    Args:
        plan: the :class:`gapcast.tools.replay.ReplayPlan` that was published (truth, what was sent, hidden masks).
        collector: the messages the agent published.
        journal: the replay journal (one dict per published reading, ``sent_mono`` in CLOCK_MONOTONIC seconds).
        channel_std: channel -> training std (the card's normalisation) for the overall normalised MAE.
        horizon: H, forecast steps.
        season: seasonal-naive season, steps.

    Returns:
        ``fill`` (MAE per pollutant for agent real time, agent revision, LOCF, linear interpolation and the
        neighbour estimate on the same hidden values, with coverage), ``forecast`` (agent vs seasonal naive on the same forecasts and targets),
        ``latency_ms`` (step-closing reading published -> forecast received, p50/p99).
    """
    import numpy as np

    pidx = [plan.channels.index(p) for p in POLLUTANTS]
    std = np.array([channel_std[p] for p in POLLUTANTS], dtype=np.float64)
    with collector._lock:
        filled = list(collector.filled)
        revisions = list(collector.revisions)
        forecasts = list(collector.forecasts)
    return {"fill": _fill_scores(plan, filled, revisions, pidx, std),
            "forecast": _forecast_scores(plan, forecasts, pidx, std, horizon, season),
            "latency_ms": _latency_scores(journal, filled, forecasts)}


def _fill_scores(plan, filled: list, revisions: list, pidx: list[int], std) -> dict[str, Any]:
    """Fills on the injected outages: the agent's real-time fill and its revision against LOCF, linear
    interpolation and the neighbour estimate, on the hidden pollutant values the agent published a step for.

    Args:
        plan: the published :class:`gapcast.tools.replay.ReplayPlan`.
        filled, revisions: the collector's ``(received, payload)`` lists.
        pidx: the pollutants' columns in ``plan.channels``.
        std: [len(POLLUTANTS)] float64, the training std of each pollutant.

    Returns:
        ``{"coverage": {...}, key: _mae_by_channel(...)}`` for each method (none when nothing was scored).
        Raises nothing.
    """
    import numpy as np

    from gapcast.baselines import linear_interpolate, locf

    sent = plan.sent
    realtime: dict[tuple[str, int], dict] = {}
    for _, b in filled:
        realtime.setdefault((b["station"], int(b["epoch_s"])), b["values"])
    revised: dict[tuple[str, int], dict] = {}
    for _, b in sorted(revisions, key=lambda x: x[0]):
        for st in b["steps"]:
            revised[(b["station"], int(st["epoch_s"]))] = st["values"]
    rows_truth, rows_rt, rows_rev, rows_locf, rows_lin, rows_mask = [], [], [], [], [], []
    rows_nb: list = []
    nb_est = _neighbour_estimates(plan)
    cover = {"hidden_values": 0, "realtime": 0, "revision": 0}
    for s in plan.stations:
        ep, vals, hid = plan.epoch_s[s], plan.values[s], plan.hidden[s]
        shown = np.where(sent[s], vals, np.nan)
        lo = locf(np.nan_to_num(shown), sent[s])
        li = linear_interpolate(np.nan_to_num(shown), sent[s])
        nb = np.where(np.isfinite(nb_est[s]), nb_est[s], li)  # no neighbour reporting: linear interpolation
        for i in np.flatnonzero(hid[:, pidx].any(axis=1)):
            m = hid[i, pidx]
            rt = realtime.get((s, int(ep[i])))
            rv = revised.get((s, int(ep[i])), rt)
            cover["hidden_values"] += int(m.sum())
            if rt is None:
                continue  # the agent published nothing for this step (counted in coverage)
            cover["realtime"] += int(m.sum())
            cover["revision"] += int(m.sum()) if (s, int(ep[i])) in revised else 0
            rows_truth.append(vals[i, pidx])
            rows_rt.append([rt.get(p, np.nan) for p in POLLUTANTS])
            rows_rev.append([rv.get(p, np.nan) for p in POLLUTANTS])
            rows_locf.append(lo[i, pidx])
            rows_lin.append(li[i, pidx])
            rows_nb.append(nb[i, pidx])
            rows_mask.append(m)
    fill: dict[str, Any] = {"coverage": cover}
    if rows_truth:
        truth = np.asarray(rows_truth, dtype=np.float64)
        mask = np.asarray(rows_mask, dtype=bool)
        for key, rows in (
            ("agent_realtime", rows_rt),
            ("agent_revision", rows_rev),
            ("locf", rows_locf),
            ("linear", rows_lin),
            ("neighbours", rows_nb),
        ):
            pred = np.asarray(rows, dtype=np.float64)
            fill[key] = _mae_by_channel(pred - truth, mask & np.isfinite(pred), POLLUTANTS, std)
    return fill


def _forecast_scores(plan, forecasts: list, pidx: list[int], std, horizon: int, season: int) -> dict[str, Any]:
    """The agent's forecasts against a seasonal-naive forecast from the same origin, on the observed targets.

    A forecast is scored when its origin has a season of history and its ``horizon`` targets lie inside the
    replayed slice. Returns ``forecasts_scored``, ``by_method`` (counts of the payloads' ``method``) and, when any
    was scored, ``agent`` and ``seasonal_naive`` (:func:`_mae_by_channel`). Raises nothing.
    """
    import numpy as np

    from gapcast.baselines import seasonal_naive

    cad = plan.cadence_s
    sent = plan.sent
    truth_full = plan.values  # real values (hidden ones included: they happened)
    f_pred, f_naive, f_truth, f_mask = [], [], [], []
    methods: dict[str, int] = {}
    for _, b in forecasts:
        s = b["station"]
        methods[b.get("method", "?")] = methods.get(b.get("method", "?"), 0) + 1
        origin = _epoch(b["origin"])
        ep = plan.epoch_s[s]
        k = int((origin - int(ep[0])) // cad)
        if k < season - 1 or k + horizon >= len(ep):
            continue  # not enough history for the naive forecast, or targets beyond the replayed slice
        hist = np.where(sent[s][: k + 1], plan.values[s][: k + 1], 0.0)
        naive = seasonal_naive(hist, sent[s][: k + 1], horizon, season=season)
        tgt = truth_full[s][k + 1 : k + 1 + horizon]
        pred = np.asarray([[st["values"][p] for p in POLLUTANTS] for st in b["steps"][:horizon]], dtype=np.float64)
        f_pred.append(pred)
        f_naive.append(naive[:, pidx])
        f_truth.append(tgt[:, pidx])
        f_mask.append(~np.isnan(tgt[:, pidx]))
    fc: dict[str, Any] = {"forecasts_scored": len(f_pred), "by_method": methods}
    if f_pred:
        truth = np.concatenate(f_truth).astype(np.float64)
        mask = np.concatenate(f_mask)
        fc["agent"] = _mae_by_channel(np.concatenate(f_pred) - np.nan_to_num(truth), mask, POLLUTANTS, std)
        fc["seasonal_naive"] = _mae_by_channel(
            np.concatenate(f_naive).astype(np.float64) - np.nan_to_num(truth), mask, POLLUTANTS, std
        )
    return fc


def _latency_scores(journal: list[dict], filled: list, forecasts: list) -> dict[str, Any]:
    """Step-to-forecast latency: the reading that closed a step published -> that step's forecast received.

    Returns ``n``, ``p50`` / ``p99`` / ``max`` in ms when any forecast was timed, and
    ``agent_done_after_last_reading_s``. Raises nothing.
    """
    import numpy as np

    sends: dict[str, list[tuple[int, float]]] = {}
    for j in journal:
        sends.setdefault(j["station"], []).append((int(j["ts"]), float(j["sent_mono"])))
    lat = []
    for rx, b in forecasts:
        origin = _epoch(b["origin"])
        closing = [t for ts, t in sends.get(b["station"], ()) if ts > origin]
        if closing:
            d = rx - min(closing)
            if d >= 0:
                lat.append(d * 1000.0)
    latency: dict[str, Any] = {"n": len(lat)}
    # How far behind the replay the agent ended: its last output after the last reading was published, seconds.
    outputs = [rx for rx, _ in filled] + [rx for rx, _ in forecasts]
    if journal and outputs:
        latency["agent_done_after_last_reading_s"] = max(outputs) - max(float(j["sent_mono"]) for j in journal)
    if lat:
        a = np.asarray(lat)
        latency.update(p50=float(np.percentile(a, 50)), p99=float(np.percentile(a, 99)), max=float(a.max()))
    return latency


def _neighbour_estimates(plan, lookback: str = "96h") -> dict[str, Any]:
    """The causal neighbour estimate (:func:`gapcast.neighbours.neighbour_estimate`) of every hidden step: the other
    replayed stations' published values at the same step, scaled by the station's level ratio to them over the
    ``lookback`` before the outage start (an offset for channels that go negative). NaN where no neighbour reports.

    Returns:
        station -> [T, C] float64, physical units.
    """
    import numpy as np

    from gapcast.neighbours import neighbour_estimate

    names = list(plan.stations)
    out = {s: np.full(plan.values[s].shape, np.nan) for s in names}
    if len(names) < 2:
        return out
    grid = np.unique(np.concatenate([plan.epoch_s[s] for s in names]))
    C = len(plan.channels)
    vals = np.full((len(names), len(grid), C), np.nan)
    sent = np.zeros(vals.shape, dtype=bool)
    pos = {s: np.searchsorted(grid, plan.epoch_s[s]) for s in names}
    for k, s in enumerate(names):
        vals[k, pos[s]] = plan.values[s]
        sent[k, pos[s]] = plan.sent[s]
    with np.errstate(all="ignore"):
        lo = np.nanmin(np.where(sent, vals, np.nan).reshape(-1, C), axis=0)
    scale = ["offset" if np.isfinite(x) and x < 0 else "ratio" for x in lo]
    for k, s in enumerate(names):
        hid = np.zeros(len(grid), dtype=bool)
        hid[pos[s]] = plan.hidden[s].any(axis=1)
        starts = np.flatnonzero(hid & ~np.concatenate([[False], hid[:-1]]))
        for g in starts:  # one estimate per outage: its level window ends at the outage start
            end = g + int(np.argmin(hid[g:])) if not hid[g:].all() else len(grid)
            est = neighbour_estimate(np.nan_to_num(vals), sent, int(g), cadence_s=plan.cadence_s, lookback=lookback,
                                     scale=scale)[k]
            full = np.full((len(grid), C), np.nan)
            full[g:end] = est[g:end]
            sel = full[pos[s]]
            out[s] = np.where(np.isfinite(sel), sel, out[s])
    return out


def _iso(epoch_s: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(int(epoch_s), timezone.utc).strftime("%Y-%m-%d %H:%MZ")


def _epoch(text: str | int | float) -> int:
    if isinstance(text, int | float):
        return int(text)
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


# --------------------------------------------------------------------------------------------------- report


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{nd}f}"


def _count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "-"


def format_table(summary: dict[str, Any]) -> str:
    """The demo's printed table (plain text)."""
    lines: list[str] = []
    w = 78
    lines.append("=" * w)
    lines.append("gapcast demo: real-time gap filling and forecasting on real Beijing data")
    lines.append("=" * w)
    for st in summary["stages"]:
        mark = {True: "ok", False: "FAILED", None: "not run"}[st["ok"]]
        lines.append(f"  {st['name']:<9} {mark:<7} {st['seconds']:7.1f} s  {st['detail'][:50]}")
    lines.append("-" * w)
    r = summary.get("replay", {})
    if r:
        lines.append(
            f"stations {', '.join(r.get('stations', []))}; {r.get('start', '')} .. {r.get('end', '')} "
            f"at {r.get('speed', 0):g}x"
        )
    io = summary.get("io", {})
    if io:
        lines.append(
            f"readings in      {io.get('readings_published', 0):>8,} published"
            f"  ({_count(io.get('agent_readings'))} counted by the agent, {_count(io.get('agent_rejected'))} rejected)"
        )
        mo = io.get("messages_out", {})
        lines.append(
            f"messages out     {sum(v for k, v in mo.items() if k != 'duplicates_dropped'):>8,}"
            f"  (filled {mo.get('filled', 0):,}, revisions {mo.get('revisions', 0):,}, "
            f"forecasts {mo.get('forecast', 0):,}, status {mo.get('status', 0):,}, "
            f"dead-letter {mo.get('deadletter', 0):,})"
        )
    lines.append(f"backend          {summary.get('backend', '-')}")
    lines += _score_lines(summary.get("scores", {}), w)
    lines.append("-" * w)
    lines.append("* overall: MAE over all six pollutants, each divided by its training std (normalised units)")
    lines.append(f"{'PASSED' if summary['ok'] else 'FAILED'} in {summary['wall_s']:.0f} s")
    return "\n".join(lines)


def _score_lines(sc: dict[str, Any], w: int) -> list[str]:
    """The score part of the demo's table: fill MAE, forecast MAE and latency, each under a rule ``w`` wide
    (a part the scores lack is left out). Raises nothing."""
    lines: list[str] = []
    fill = sc.get("fill", {})
    if "agent_realtime" in fill:
        cov = fill["coverage"]
        lines.append("-" * w)
        lines.append(
            f"fill MAE on the injected 24 h + 72 h outages ({cov['realtime']:,} hidden pollutant values, "
            "original units ug/m3)"
        )
        head = f"  {'method':<24}" + "".join(f"{p:>8}" for p in POLLUTANTS) + f"{'overall*':>10}"
        lines.append(head)
        for key, label in (
            ("agent_realtime", "agent, real time"),
            ("agent_revision", "agent, after gap end"),
            ("locf", "LOCF (real time)"),
            ("linear", "linear interp. (offline)"),
            ("neighbours", "neighbours (real time)"),
        ):
            if key not in fill:
                continue
            row = fill[key]
            lines.append(
                f"  {label:<24}" + "".join(f"{_fmt(row[p]):>8}" for p in POLLUTANTS) + f"{_fmt(row['overall_norm'], 3):>10}"
            )
    fc = sc.get("forecast", {})
    if "agent" in fc:
        lines.append("-" * w)
        lines.append(f"24 h forecast MAE ({fc['forecasts_scored']:,} forecasts, observed targets, ug/m3)")
        lines.append(f"  {'method':<24}" + "".join(f"{p:>8}" for p in POLLUTANTS) + f"{'overall*':>10}")
        for key, label in (("agent", "agent"), ("seasonal_naive", "seasonal naive (24 h)")):
            row = fc[key]
            lines.append(
                f"  {label:<24}" + "".join(f"{_fmt(row[p]):>8}" for p in POLLUTANTS) + f"{_fmt(row['overall_norm'], 3):>10}"
            )
    lat = sc.get("latency_ms", {})
    if lat.get("n"):
        lines.append("-" * w)
        lines.append(
            f"step-to-forecast latency   p50 {lat['p50']:.1f} ms   p99 {lat['p99']:.1f} ms   "
            f"(reading published -> forecast received, {lat['n']:,} forecasts)"
        )
        if "agent_done_after_last_reading_s" in lat:
            lines.append(
                f"agent caught up {lat['agent_done_after_last_reading_s']:.1f} s after the last reading "
                "(latency includes any queueing while the replay outpaced it)"
            )
    return lines


def plot_figure(path: Path, plan, collector: Collector, outage: tuple[str, int, int], channel: str = "PM2.5") -> None:
    """Two panels for one station: an injected outage filled in real time and revised; forecasts vs truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from gapcast.baselines import linear_interpolate, locf

    station, o_start, o_hours = outage
    j = plan.channels.index(channel)
    ep, vals, sent = plan.epoch_s[station], plan.values[station][:, j], plan.sent[station][:, j]
    cad = plan.cadence_s
    k0 = int((o_start - ep[0]) // cad)
    lo_i, hi_i = max(0, k0 - 36), min(len(ep), k0 + o_hours + 36)
    hours = (ep[lo_i:hi_i] - o_start) / 3600.0
    shown = np.where(sent, vals, 0.0)
    lin = linear_interpolate(shown, sent)
    lcf = locf(shown, sent)
    with collector._lock:
        # Real-time fills where the channel was imputed (observed steps are shown as observations).
        rt = {
            int(b["epoch_s"]): b["values"].get(channel)
            for _, b in collector.filled
            if b["station"] == station and channel in b.get("imputed", ())
        }
        rev: dict[int, float] = {}
        for _, b in collector.revisions:
            if b["station"] == station:
                for st in b["steps"]:
                    rev[int(st["epoch_s"])] = st["values"].get(channel)
        fcs = [b for _, b in collector.forecasts if b["station"] == station]

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 8))
    inside = (ep[lo_i:hi_i] >= o_start) & (ep[lo_i:hi_i] < o_start + o_hours * 3600)
    a1.axvspan(0, o_hours, color="0.92", label=f"injected {o_hours} h outage (all pollutants)")
    a1.plot(hours[~inside], np.where(sent[lo_i:hi_i], vals[lo_i:hi_i], np.nan)[~inside], "k.", ms=4, label="observed")
    a1.plot(hours[inside], vals[lo_i:hi_i][inside], "-", color="0.45", lw=1.5, label="hidden truth")
    t_rt = [t for t in ep[lo_i:hi_i] if int(t) in rt]
    a1.plot(
        [(t - o_start) / 3600 for t in t_rt], [rt[int(t)] for t in t_rt], "x", color="tab:orange", ms=5,
        label="agent, real time (first fill)",
    )  # fmt: skip
    o_end = o_start + o_hours * 3600
    t_rev = sorted(t for t in rev if o_start <= t < o_end)
    if t_rev:
        a1.plot([(t - o_start) / 3600 for t in t_rev], [rev[t] for t in t_rev], "-", color="tab:red", lw=2,
                label="agent, revision once the gap ended")  # fmt: skip
    a1.plot(hours, lin[lo_i:hi_i], ":", color="tab:blue", label="linear interpolation (offline)")
    a1.plot(hours, lcf[lo_i:hi_i], "--", color="tab:green", lw=1, label="LOCF")
    a1.set_title(f"{station}: {channel} during an injected {o_hours} h outage, filled in real time")
    a1.set_xlabel("hours from the outage start")
    a1.set_ylabel(f"{channel} (ug/m3)")
    a1.legend(fontsize=7, ncol=3, loc="upper left")

    # Forecasts: one issued every 12 h over 3 days (after the outage when the slice leaves room, else from day 4).
    f_lo = o_end if ep[-1] - o_end >= 3 * 86400 else int(ep[0]) + 4 * 86400
    sel = [b for b in fcs if f_lo <= _epoch(b["origin"]) < f_lo + 3 * 86400][::12][:6]
    span = (ep >= f_lo - 86400) & (ep < f_lo + 4 * 86400)
    a2.plot((ep[span] - f_lo) / 3600, np.where(~np.isnan(vals[span]), vals[span], np.nan), "k-", lw=1, label="what happened")
    for n, b in enumerate(sel):
        o = _epoch(b["origin"])
        fc_path = [st["values"][channel] for st in b["steps"]]
        h = np.arange(1, len(fc_path) + 1)
        a2.plot((o - f_lo) / 3600 + h * cad / 3600, fc_path, "-", lw=1.5, color=plt.cm.viridis(n / max(len(sel), 1)),
                label=f"forecast issued {b['origin'][5:16]}Z")  # fmt: skip
    a2.set_title(f"{station}: 24 h {channel} forecasts against what happened")
    a2.set_xlabel(f"hours from {_iso(f_lo)}")
    a2.set_ylabel(f"{channel} (ug/m3)")
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
