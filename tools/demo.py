"""``gapcast demo``: the whole system on real data, end to end, in one command (``make demo``).

Stages, each a real ``gapcast`` sub-command run as a subprocess (so the demo exercises exactly what users run):

1. ``train``     ConFill on the Beijing training months within a CPU time budget (progress bar);
2. ``evaluate``  the evaluation table on the test months of the demo stations;
3. ``keys``      an Ed25519 signing key pair;
4. ``export``    the signed bundle (fp32 + int8);
5. ``verify``    the bundle's signature and hashes (:func:`gapcast.edge.bundle.verify_bundle`), fp32 + int8 present;
6. ``broker``    a private Mosquitto on a free port (:class:`gapcast.tools.localbroker.LocalBroker`);
7. ``agent``     ``gapcast edge check`` on a generated ``edge.toml``, then ``gapcast edge run`` with the bundle and
                 the best backend available (it must be a model backend, not the interpolation fallback);
8. ``replay``    ``gapcast replay`` of a slice of the test months of the demo stations, with their real outages
                 plus one injected 24 h and one injected 72 h outage of all pollutants per station, while a
                 subscriber collects every filled, revision, forecast, status and dead-letter message;
9. ``score``     real-time fill MAE on the injected outages (agent vs linear interpolation vs LOCF, the same hidden
                 values, original units), forecast MAE vs seasonal naive, step-to-forecast latency p50/p99;
                 one printed table, the same as JSON, and a PNG figure.

Everything started is stopped on success, failure, Ctrl-C or SIGTERM (process groups, ``try``/``finally``); the exit
code is non-zero when any stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gapcast import GapcastError

__all__ = [
    "STAGES",
    "Collector",
    "DemoError",
    "DemoOptions",
    "format_table",
    "injected_outages",
    "plot_figure",
    "register",
    "run_demo",
    "score_run",
]

log = logging.getLogger(__name__)

#: The Beijing pollutants (``gapcast.train.data.BEIJING_POLLUTANTS``; not imported: the CLI loads this module).
POLLUTANTS = ("PM2.5", "PM10", "SO2", "NO2", "CO", "O3")
PREFIX = "gapcast/v1"
GATEWAY = "demo-gw"
#: The demo's stages, in order.
STAGES = ("train", "evaluate", "keys", "export", "verify", "broker", "agent", "replay", "score")


class DemoError(GapcastError):
    """A demo stage failed; the message says which and where its log is."""


class _Terminated(Exception):
    """SIGTERM arrived (treated like Ctrl-C: stop everything, exit non-zero)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs.

    Attributes:
        out: output folder (run, keys, bundle, logs, summary, figure).
        data: data root (None: ``$GAPCAST_DATA``, then the cache).
        train_minutes: training time budget, minutes of CPU wall time.
        train_config: training TOML (None: the packaged ``beijing.toml``).
        stations: how many stations to replay (the first N of the data folder, sorted), >= 1.
        days: length of the replayed slice of the test months, days.
        start: first replayed step, ISO 8601 (None: the start of the test months).
        speed: replay speed, simulated seconds per wall second (0: as fast as possible).
        late_share, out_of_order_share: shares of late and out-of-order readings in the replay.
        eval_windows: at most this many test windows per station in ``gapcast evaluate``.
        drain_timeout_s: after the replay, how long to wait for the agent's last messages, seconds.
        seed: seed for the replay's late/out-of-order choice.
        bundle: an existing signed bundle: skips train, evaluate, keys and export (they are reported as skipped).
        trusted_key: the public key that bundle's signature verifies under (required with ``bundle``).
        quick: small export samples (calibration, parity, accuracy gate) and no CPU INT8 variant: for tests, not
            for figures.
        dashboard: ``HOST:PORT``: serve the live dashboard from the broker stage on, print its URL, and after the
            run keep the broker, the agent and the page up until Ctrl-C; empty: off.
    """

    out: Path = Path("demo-out")
    data: str | None = None
    train_minutes: float = 5.0
    train_config: str | None = None
    stations: int = 3
    days: float = 30.0
    start: str | None = None
    speed: float = 72_000.0
    late_share: float = 0.01
    out_of_order_share: float = 0.01
    eval_windows: int = 40
    drain_timeout_s: float = 60.0
    seed: int = 0
    bundle: str | None = None
    trusted_key: str | None = None
    quick: bool = False
    dashboard: str = ""  # HOST:PORT: serve the live dashboard (gapcast.edge.dashboard) and keep it up until Ctrl-C


@dataclass
class StageResult:
    """One stage's outcome: ``ok`` None = not run."""

    name: str
    ok: bool | None = None
    seconds: float = 0.0
    detail: str = ""
    log: str | None = None


# --------------------------------------------------------------------------------------------------- processes


class _Proc:
    """A child process in its own process group (session), so stopping it stops its children too.

    A Ctrl-C in the terminal reaches the demo only; the demo then stops every child group itself.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path | None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed in stop)
        out = self._log if self._log else None
        self.proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            env=env,
        )

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.stop()
            msg = f"{self.name} did not finish within {timeout_s:.0f} s"
            raise DemoError(msg) from exc

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self._log:
            self._log.close()
            self._log = None

    def tail(self, n: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _gapcast(*args: str) -> list[str]:
    return [sys.executable, "-m", "gapcast.cli", *args]


# --------------------------------------------------------------------------------------------------- collector


class Collector:
    """Subscribes to the agent's outputs and keeps every message with its arrival time.

    Threads: paho's network thread runs ``_on_message`` (appends under a lock); readers take :meth:`snapshot`.

    Args:
        host, port: the broker.
        prefix: topic prefix.
    """

    def __init__(self, host: str, port: int, prefix: str = PREFIX) -> None:
        import paho.mqtt.client as mqtt

        self.prefix = prefix
        self.filled: list[tuple[float, dict]] = []
        self.revisions: list[tuple[float, dict]] = []
        self.forecasts: list[tuple[float, dict]] = []
        self.status: list[tuple[float, dict]] = []
        self.deadletter: list[tuple[float, dict]] = []
        self.duplicates = 0
        self.undecodable = 0
        self._ids: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.last_rx = time.monotonic()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"gapcast-demo-collector-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            msg = "the collector could not subscribe to the private broker"
            raise DemoError(msg)

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # paho network thread
        from gapcast.edge.messages import Topics

        t = Topics(self.prefix)
        client.subscribe(
            [
                (t.output_filter("filled"), 1),
                (t.output_filter("revision"), 1),
                (t.output_filter("forecast"), 1),
                (f"{self.prefix}/gateways/+/status", 1),
                (f"{self.prefix}/deadletter/#", 1),
            ]
        )

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

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


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

    from gapcast.baselines import linear_interpolate, locf, seasonal_naive

    chans = plan.channels
    pidx = [chans.index(p) for p in POLLUTANTS]
    std = np.array([channel_std[p] for p in POLLUTANTS], dtype=np.float64)
    cad = plan.cadence_s
    sent = plan.sent
    with collector._lock:
        filled = list(collector.filled)
        revisions = list(collector.revisions)
        forecasts = list(collector.forecasts)

    # --- fills on the injected outages -------------------------------------------------------------------
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

    # --- forecasts ----------------------------------------------------------------------------------------
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

    # --- latency: the reading that closed a step published -> that step's forecast received ----------------
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
    return {"fill": fill, "forecast": fc, "latency_ms": latency}


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
    sc = summary.get("scores", {})
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
            ("neighbours", "neighbour est. (real time)"),
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
    lines.append("-" * w)
    lines.append("* overall: MAE over all six pollutants, each divided by its training std (normalised units)")
    lines.append(f"{'PASSED' if summary['ok'] else 'FAILED'} in {summary['wall_s']:.0f} s")
    return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------------- the demo


def _agent_toml(path: Path, *, port: int, stations: list[str], bundle: Path, pubkey: Path, state: Path) -> None:
    names = ", ".join(json.dumps(s) for s in stations)
    path.write_text(
        f"""# Generated by `gapcast demo`: the agent on a private broker, replaying recorded data.
[gateway]
id = "{GATEWAY}"
fleet = "demo"

[mqtt]
host = "127.0.0.1"
port = {port}
topic_prefix = "{PREFIX}"
client_id = "gapcast-demo-agent"

[stations]
names = [{names}]

[model]
bundle = {json.dumps(str(bundle))}
trusted_keys = [{json.dumps(str(pubkey))}]
backend = "auto"

[input]
# Late readings come 1.5 cadences after their time; the replayed history is years before the gateway clock.
lateness_s = 7200.0

[agent]
# Recorded data: silent stations' steps close when the newest reading of any station passes them.
clock = "readings"
tick_interval_s = 0.2
status_interval_s = 2.0
state_dir = {json.dumps(str(state))}

[outbox]
synchronous = "NORMAL"
rate_per_s = 20000.0
burst = 20000
"""
    )


class _Demo:
    """One run of the demo: its stages, the processes it started, and what it measured."""

    def __init__(self, opts: DemoOptions) -> None:
        self.o = opts
        self.out = Path(opts.out).resolve()
        self.logs = self.out / "logs"
        self.stages: list[StageResult] = []
        self.procs: list[_Proc] = []
        self.broker = None
        self.dashboard = None  # (server, stop) of the live dashboard, with --dashboard
        self.collector: Collector | None = None
        self.summary: dict[str, Any] = {}
        self.artifacts: dict[str, str] = {}
        self.plan = None  # the ReplayPlan that was published (set by the replay stage)
        self.outs: list[tuple[str, int, int]] = []  # the injected outages
        self.replay_journal: list[dict] = []
        self.env = dict(os.environ)
        if opts.data:
            self.env["GAPCAST_DATA"] = str(Path(opts.data).resolve())

    # -- stage plumbing
    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage and record its outcome; any exception (Ctrl-C included) marks it failed and propagates."""
        r = StageResult(name)
        self.stages.append(r)
        t0 = time.monotonic()
        print(f"\n[demo] {name} ...", flush=True)
        try:
            yield r
        except BaseException as exc:
            r.ok = False
            first = str(exc).splitlines()[0] if str(exc) else ""
            r.detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
            raise
        else:
            r.ok = True
        finally:
            r.seconds = time.monotonic() - t0
            print(f"[demo] {name}: {'ok' if r.ok else 'FAILED'} in {r.seconds:.1f} s  {r.detail}", flush=True)

    def run_cmd(self, r: StageResult, name: str, argv: list[str], timeout_s: float, *, show: bool = False) -> None:
        log_path = None if show else self.logs / f"{name}.log"
        p = _Proc(name, argv, log_path, env=self.env)
        self.procs.append(p)
        rc = p.wait(timeout_s)
        p.stop()
        self.procs.remove(p)
        r.log = str(log_path) if log_path else None
        if rc != 0:
            tail = p.tail()
            msg = f"`gapcast {' '.join(argv[3:])}` exited with {rc}" + (f"; log {log_path}:\n{tail}" if tail else "")
            raise DemoError(msg)

    # -- the stages
    def run(self) -> int:
        t_start = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        # A re-run starts fresh: an old window snapshot, outbox or broker session would replay stale state into
        # this run. The signing keys are kept (a release key is never thrown away).
        owned = ("agent-state", "broker", "logs") + (() if self.o.bundle else ("run", "bundle"))
        for name in owned:
            shutil.rmtree(self.out / name, ignore_errors=True)
        self.logs.mkdir(exist_ok=True)
        run_dir, keys_dir, bundle = self.out / "run", self.out / "keys", self.out / "bundle"
        stations: list[str] = []
        ok = True
        try:
            stations = self._stations()
            if self.o.bundle:
                if not self.o.trusted_key:
                    raise DemoError("--bundle needs --trusted-key (the public key its signature verifies under)")
                bundle, pub = Path(self.o.bundle).resolve(), Path(self.o.trusted_key).resolve()
                for n in ("train", "evaluate", "keys", "export"):
                    self.stages.append(StageResult(n, ok=True, detail=f"skipped: --bundle {bundle}"))
            else:
                pub = keys_dir / "gapcast-signing.pub"
                self._build(run_dir, keys_dir, bundle, stations)
            with self.stage("verify") as r:
                card = self._verify(bundle, pub)
                toml = self.out / "edge.toml"
                r.detail = f"signature ok, variants {', '.join(sorted(card.variants))}"
            with self.stage("broker") as r:
                from gapcast.tools.localbroker import LocalBroker

                (self.out / "broker").mkdir(exist_ok=True)
                self.broker = LocalBroker(workdir=self.out / "broker").start()
                r.detail = self.broker.url
                _agent_toml(toml, port=self.broker.port, stations=stations, bundle=bundle,
                            pubkey=pub, state=self.out / "agent-state")  # fmt: skip
                self.artifacts["agent_config"] = str(toml)
                if self.o.dashboard:
                    self._start_dashboard()
            with self.stage("agent") as r:
                self.run_cmd(r, "edge-check", _gapcast("edge", "check", "--config", str(toml)), timeout_s=300)
                self.collector = Collector(self.broker.host, self.broker.port)
                agent = _Proc("agent", _gapcast("-v", "edge", "run", "--config", str(toml)), self.logs / "agent.log", self.env)
                self.procs.append(agent)
                r.log = str(self.logs / "agent.log")
                backend = self.summary["backend"] = self._wait_online(agent, timeout_s=300)
                r.detail = f"online, backend {backend}"
                if backend.startswith("interpolation"):
                    # A model bundle that no backend can run is a failure, not a demo of the model.
                    msg = f"the agent runs the interpolation fallback, not the model: see {self.logs / 'agent.log'}"
                    raise DemoError(msg)
            with self.stage("replay") as r:
                self._replay(r, stations, agent)
            with self.stage("score") as r:
                self._score(r, card)
            self._hold_dashboard()
        except KeyboardInterrupt:
            ok = False
            print("\n[demo] interrupted: stopping everything it started", file=sys.stderr)
        except _Terminated:
            ok = False
            print("\n[demo] SIGTERM: stopping everything it started", file=sys.stderr)
        except (GapcastError, OSError, ValueError, subprocess.SubprocessError) as exc:
            ok = False
            print(f"\n[demo] stopped: {exc}", file=sys.stderr)
        finally:
            self._cleanup()
        ok = ok and [s.name for s in self.stages] == list(STAGES) and all(s.ok for s in self.stages)
        self.summary.update(
            ok=ok,
            wall_s=time.monotonic() - t_start,
            stages=[asdict(s) for s in self.stages],
            options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.o).items()},
            artifacts=self.artifacts,
        )
        names = {s.name for s in self.stages}
        for n in STAGES:
            if n not in names:
                self.summary["stages"].append(asdict(StageResult(n)))
        table = format_table(self.summary)
        js = self.out / "demo-summary.json"
        js.write_text(json.dumps(self.summary, indent=2, default=_json_default) + "\n")
        (self.out / "demo-table.txt").write_text(table + "\n")
        self.artifacts.update(summary_json=str(js), table=str(self.out / "demo-table.txt"))
        print("\n" + table)
        print("\nartifacts:")
        for k, v in {**self.artifacts, "logs": str(self.logs)}.items():
            print(f"  {k:<14} {v}")
        return 0 if ok else 1

    def _start_dashboard(self) -> None:
        from gapcast.edge.dashboard import DashboardServer, DashboardState, mqtt_feed

        state = DashboardState(PREFIX, max_steps=24 * 31)
        server = DashboardServer(state, self.o.dashboard).start()
        client = mqtt_feed(state, self.broker.url, client_id="gapcast-demo-dashboard")

        def stop() -> None:
            client.loop_stop()
            client.disconnect()
            server.stop()

        self.dashboard = (server, stop)
        self.artifacts["dashboard"] = server.url
        print(f"[demo] dashboard: {server.url}", flush=True)

    def _hold_dashboard(self) -> None:
        """With --dashboard: keep the broker, the agent and the page up until Ctrl-C (or SIGTERM)."""
        if self.dashboard is None:
            return
        print(f"\n[demo] dashboard: {self.dashboard[0].url}  (the agent and the broker stay up; Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(0.5)
        except (KeyboardInterrupt, _Terminated):
            print("\n[demo] stopping the dashboard, the agent and the broker", file=sys.stderr)

    def _build(self, run_dir: Path, keys_dir: Path, bundle: Path, stations: list[str]) -> None:
        """train -> evaluate -> keys -> export, each a ``gapcast`` sub-command."""
        with self.stage("train") as r:
            argv = _gapcast("train", "--out", str(run_dir), "--time-budget-min", f"{self.o.train_minutes:g}")
            if self.o.train_config:
                argv += ["--config", str(self.o.train_config)]
            self.run_cmd(r, "train", argv, timeout_s=self.o.train_minutes * 60 + 600, show=True)
            r.detail = f"{self.o.train_minutes:g} min budget -> {run_dir / 'best.pt'}"
            self.artifacts["run"] = str(run_dir)
        with self.stage("evaluate") as r:
            argv = _gapcast("evaluate", str(run_dir), "--stations", *stations,
                            "--max-windows", str(self.o.eval_windows))  # fmt: skip
            self.run_cmd(r, "evaluate", argv, timeout_s=900)
            r.detail = f"{run_dir / 'metrics.json'}"
            self.artifacts["evaluation"] = str(run_dir / "metrics.md")
            with contextlib.suppress(OSError):
                print((run_dir / "metrics.md").read_text())
        with self.stage("keys") as r:
            if not (keys_dir / "gapcast-signing.key").exists():
                self.run_cmd(r, "keys", _gapcast("keys", "generate", "--out", str(keys_dir)), timeout_s=120)
            r.detail = str(keys_dir)
            self.artifacts["keys"] = str(keys_dir)
        with self.stage("export") as r:
            argv = _gapcast("export", str(run_dir), "--out", str(bundle),
                            "--sign-key", str(keys_dir / "gapcast-signing.key"), "--overwrite")  # fmt: skip
            if self.o.quick:
                argv += ["--calib-windows", "16", "--parity-windows", "16", "--gate-windows", "64",
                         "--cpu-variant", "none"]  # fmt: skip
            self.run_cmd(r, "export", argv, timeout_s=900)
            with contextlib.suppress(OSError):
                print((self.logs / "export.log").read_text().strip())
            r.detail = str(bundle)
            self.artifacts["bundle"] = str(bundle)

    def _stations(self) -> list[str]:
        from gapcast.train.data import beijing_dir, list_beijing_stations, resolve_data_dir

        names = list_beijing_stations(beijing_dir(resolve_data_dir(self.o.data)))
        if self.o.stations < 1 or self.o.stations > len(names):
            msg = f"--stations must be 1..{len(names)}, got {self.o.stations}"
            raise DemoError(msg)
        return names[: self.o.stations]

    def _verify(self, bundle: Path, pub: Path):
        from gapcast.edge.bundle import verify_bundle

        b = verify_bundle(bundle, [str(pub)])
        missing = {"fp32"} - set(b.card.variants)
        if missing or not any("int8" in v for v in b.card.variants):
            msg = f"the bundle lacks a variant: has {sorted(b.card.variants)}, the demo needs fp32 and an int8 one"
            raise DemoError(msg)
        return b.card

    def _wait_online(self, agent: _Proc, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.collector.latest_status()
            if st.get("state") == "online" and st.get("gateway") == GATEWAY:
                backend = st.get("backend")
                name = backend if isinstance(backend, str) else json.dumps(backend)
                # The agent's log line says more (provider, precision, variant) than the status' name.
                with contextlib.suppress(OSError):
                    for line in agent.log_path.read_text(errors="replace").splitlines():
                        if "inference backend: " in line:
                            name = line.split("inference backend: ", 1)[1].strip()
                return name
            if not agent.running():
                msg = f"the agent exited with {agent.proc.returncode} before going online:\n{agent.tail()}"
                raise DemoError(msg)
            time.sleep(0.1)
        msg = f"the agent did not publish an online status within {timeout_s:.0f} s:\n{agent.tail()}"
        raise DemoError(msg)

    def _plan(self, stations: list[str]):
        from gapcast.tools.replay import Outage, parse_time, plan_replay
        from gapcast.train.data import load_beijing, time_split

        series = load_beijing(self.o.data, stations)
        first = series[stations[0]]
        start_s = parse_time(self.o.start) if self.o.start else int(first.epoch_s[time_split(first.epoch_s).test.start])
        hours = int(round(self.o.days * 24))
        outs = injected_outages(stations, start_s, hours)
        outages = [Outage(s, t, float(h), POLLUTANTS) for s, t, h in outs]
        plan = plan_replay(
            series,
            start_s=start_s,
            end_s=start_s + hours * 3600,
            outages=outages,
            late_share=self.o.late_share,
            out_of_order_share=self.o.out_of_order_share,
            seed=self.o.seed,
        )
        return plan, outs

    def _replay(self, r: StageResult, stations: list[str], agent: _Proc) -> None:
        from gapcast.tools.replay import format_ts

        plan, outs = self._plan(stations)
        self.plan, self.outs = plan, outs
        journal = self.out / "replay-journal.jsonl"
        rsum = self.out / "replay-summary.json"
        argv = _gapcast(
            "replay", "--broker", self.broker.url, "--stations", *stations,
            "--start", format_ts(plan.start_s), "--end", format_ts(plan.end_s), "--speed", f"{self.o.speed:g}",
            "--late-share", f"{self.o.late_share:g}", "--out-of-order-share", f"{self.o.out_of_order_share:g}",
            "--seed", str(self.o.seed), "--journal", str(journal), "--summary-json", str(rsum), "--no-progress",
        )  # fmt: skip
        for o in plan.outages:
            argv += ["--outage", o.spec()]
        if self.o.data:
            argv += ["--data", str(self.o.data)]
        self.run_cmd(r, "replay", argv, timeout_s=max(600.0, 3 * plan.counts()["messages"] * 0.01))
        rs = json.loads(rsum.read_text())
        self.summary["replay"] = rs
        self.artifacts["replay_journal"] = str(journal)
        if rs["counts"] != plan.counts():
            msg = f"the replay published another plan than the demo scores: {rs['counts']} vs {plan.counts()}"
            raise DemoError(msg)
        # Drain: the agent closes each station's last-but-one step when the last reading arrives.
        want = {s: {int(plan.epoch_s[s][-2])} for s in stations if len(plan.epoch_s[s]) > 1}
        deadline = time.monotonic() + self.o.drain_timeout_s
        while time.monotonic() < deadline:
            got = self.collector.filled_steps()
            if all(want[s] <= got.get(s, set()) for s in want) and time.monotonic() - self.collector.last_rx > 2.0:
                break
            if not agent.running():
                msg = f"the agent died during the replay (exit {agent.proc.returncode}):\n{agent.tail()}"
                raise DemoError(msg)
            time.sleep(0.2)
        else:
            log.warning("drain timeout: the agent's last steps did not all arrive within %.0f s", self.o.drain_timeout_s)
        self.replay_journal = [json.loads(x) for x in journal.read_text().splitlines()]
        r.detail = f"{rs['published']:,} readings in {rs['wall_s']:.1f} s"

    def _score(self, r: StageResult, card) -> None:
        st = self.collector.latest_status()
        counters = st.get("counters", {}) if isinstance(st.get("counters"), dict) else {}
        rejected = st.get("rejected", {})
        self.summary["io"] = {
            "readings_published": self.summary["replay"]["published"],
            "agent_readings": counters.get("readings"),
            "agent_rejected": sum(rejected.values()) if isinstance(rejected, dict) else rejected,
            "messages_out": self.collector.counts(),
        }
        self.summary["agent_status"] = st
        std = {c.name: c.std for c in card.channels}
        scores = score_run(self.plan, self.collector, self.replay_journal, channel_std=std, horizon=card.horizon)
        self.summary["scores"] = scores
        fig = self.out / "demo-figure.png"
        o72 = next(o for o in self.outs if o[2] == 72)
        plot_figure(fig, self.plan, self.collector, o72)
        self.artifacts["figure"] = str(fig)
        fill = scores["fill"]
        if "agent_realtime" not in fill or not scores["forecast"].get("forecasts_scored"):
            msg = f"nothing to score: fills {fill.get('coverage')}, forecasts {scores['forecast'].get('forecasts_scored')}"
            raise DemoError(msg)
        cov = fill["coverage"]
        r.detail = f"{cov['realtime']:,}/{cov['hidden_values']:,} hidden values filled in real time"

    def _cleanup(self) -> None:
        """Stop the dashboard, every child process group, the collector and the broker; each step is logged with
        its duration (DEBUG; WARNING past 5 s), so a slow exit says what it waited on."""

        def step(what: str, fn) -> None:
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                fn()
            took = time.monotonic() - t0
            log.log(logging.WARNING if took > 5.0 else logging.DEBUG, "exit: %s stopped in %.1f s", what, took)

        if self.dashboard is not None:
            step("the dashboard", self.dashboard[1])
            self.dashboard = None
        for p in reversed(self.procs):
            step(f"{p.name} (pid {p.proc.pid})", p.stop)
        self.procs.clear()
        if self.collector is not None:
            step("the collector", self.collector.close)
        if self.broker is not None:
            step("the broker", self.broker.stop)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def run_demo(opts: DemoOptions) -> int:
    """Run the whole demo.

    SIGTERM is handled like Ctrl-C while it runs (everything started is stopped), and Ctrl-C (SIGINT) is handled
    even when the process inherited it ignored; the previous handlers are restored.

    Returns:
        0 when every stage passed, 1 otherwise.
    """

    def _on_term(signum, frame):
        raise _Terminated

    previous = previous_int = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_term)
        # Ctrl-C is set explicitly: a process started as a background job of a non-interactive shell (`make test &`,
        # a CI runner, nohup) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler, so
        # the demo would never stop on SIGINT (and --dashboard would hold forever).
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        if previous_int is signal.SIG_IGN:
            log.debug("SIGINT was inherited ignored; the demo handles it (Ctrl-C stops everything it started)")
    try:
        return _Demo(opts).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gapcast demo``."""
    d = DemoOptions()
    p = subparsers.add_parser(
        "demo",
        help="the whole system on real data: train, evaluate, export, broker, agent, replay, scores",
        description=(
            "Train ConFill within a time budget, evaluate, sign and export the bundle, start a private Mosquitto and "
            "the edge agent, replay real stations with injected outages, and print fill/forecast accuracy against "
            "LOCF, linear interpolation and seasonal naive, with latency. Writes JSON and a PNG."
        ),
    )
    p.add_argument("--out", default=str(d.out), help=f"output folder (default {d.out})")
    p.add_argument("--data", help="data root holding beijing-multisite/ (default: $GAPCAST_DATA, then the cache)")
    p.add_argument("--train-minutes", type=float, default=d.train_minutes, help=f"training time budget, minutes (default {d.train_minutes:g})")
    p.add_argument("--train-config", help="training TOML (default: the packaged beijing.toml)")
    p.add_argument("--stations", type=int, default=d.stations, help=f"number of stations to replay (default {d.stations})")
    p.add_argument("--days", type=float, default=d.days, help=f"days of the test months to replay (default {d.days:g})")
    p.add_argument("--start", help="first replayed step, ISO 8601 (default: the start of the test months)")
    p.add_argument("--speed", type=float, default=d.speed, help=f"replay speed, simulated s per wall s (default {d.speed:g}; 0: as fast as possible)")
    p.add_argument("--late-share", type=float, default=d.late_share, help=f"share of late readings (default {d.late_share:g})")
    p.add_argument("--out-of-order-share", type=float, default=d.out_of_order_share, help=f"share of out-of-order readings (default {d.out_of_order_share:g})")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help=f"test windows per station to evaluate (default {d.eval_windows})")
    p.add_argument("--bundle", help="use this signed bundle: skip train, evaluate, keys and export")
    p.add_argument("--trusted-key", help="public key the --bundle signature verifies under")
    p.add_argument("--quick", action="store_true", help="small export samples (tests; not for reported figures)")
    p.add_argument("--dashboard", nargs="?", const="127.0.0.1:8080", default="", metavar="HOST:PORT",
                   help="serve the live dashboard (default 127.0.0.1:8080), print its URL and keep everything up "
                        "after the run until Ctrl-C")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    opts = DemoOptions(
        out=Path(args.out),
        data=args.data,
        train_minutes=args.train_minutes,
        train_config=args.train_config,
        stations=args.stations,
        days=args.days,
        start=args.start,
        speed=args.speed,
        late_share=args.late_share,
        out_of_order_share=args.out_of_order_share,
        eval_windows=args.eval_windows,
        bundle=args.bundle,
        trusted_key=args.trusted_key,
        quick=args.quick,
        dashboard=args.dashboard,
    )
    return run_demo(opts)

