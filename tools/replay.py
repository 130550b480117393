"""``gapcast replay``: a station simulator that publishes real station history over MQTT.

It is the tool to try a broker and a gateway before real stations exist, and the load generator of the demo and the
benchmarks. Each station's history (Beijing Multi-Site by default: the test months) becomes readings on the contract
topic ``{prefix}/stations/{station}/readings`` with the payload ``{"ts": ..., "values": {...}}`` (docs/ARCHITECTURE.md,
"Contracts"). What the data lacks stays lacking: a real ``NA`` is an absent channel, never a sentinel; a step with no
channel at all sends no message (the station was silent). On top of the real outages it can inject:

- outages: no message for a whole station, or the listed channels dropped from its readings, for a time range;
- late readings: published ``late_delay_s`` after their own timestamp (simulated time), so later steps arrive first;
- out-of-order readings: published right after the station's next reading.

The replay runs on simulated time: a reading is due at its own timestamp (a late one later), and ``speed`` X
publishes X simulated seconds per wall second (``speed = 0``: as fast as the broker acknowledges).

Two layers: :func:`plan_replay` is pure (series in, a sorted list of :class:`PlannedReading` and the exact masks of
what was hidden out) so tests and the demo can check every value; :func:`replay` publishes a plan with paho-mqtt 2.x
(VERSION2 callback API, MQTT 5 by default, QoS 1 with a bounded number of unacknowledged messages).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gapcast import GapcastError
from gapcast.brokerurl import BrokerURL, add_password_argument, resolve_broker_url
from gapcast.brokerurl import parse_broker_url as _parse_broker_url
from gapcast.timefmt import format_rfc3339

if TYPE_CHECKING:
    from gapcast.train.data import StationSeries

__all__ = [
    "DEFAULT_PREFIX",
    "BrokerURL",
    "Outage",
    "PlannedReading",
    "ReplayError",
    "ReplayOptions",
    "ReplayPlan",
    "ReplaySummary",
    "format_ts",
    "parse_broker_url",
    "parse_outage",
    "parse_time",
    "plan_replay",
    "readings_topic",
    "register",
    "replay",
    "topic_prefix_arg",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "gapcast/v1"
#: Keywords accepted in an outage's channel list.
_POLLUTANTS_KEYWORD = "pollutants"
_ALL_KEYWORD = "all"


class ReplayError(GapcastError):
    """A replay cannot be planned (bad outage, empty time range) or published (broker unreachable)."""


# --------------------------------------------------------------------------------------------------- time parsing


_ISO_RE = (
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::?\d{2}(?::?\d{2})?)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?"
    r"|\+\d+(?:\.\d+)?[hd]"
)
_OUTAGE_RE = re.compile(
    rf"^(?P<station>[^:]+):(?P<start>{_ISO_RE}):(?P<hours>\d+(?:\.\d+)?)(?::(?P<channels>[^:]+))?$"
)


def parse_time(text: str, *, relative_to: int | None = None) -> int:
    """Parse a time given on the command line.

    Args:
        text: ISO 8601 (``2016-06-01``, ``2016-06-01T06``, ``2016-06-01T06:00``, ``2016-06-01T06:00:00+08:00``;
            UTC when no offset is given), or an offset ``+36h`` / ``+3d`` from ``relative_to``.
        relative_to: epoch seconds an offset counts from.

    Returns:
        Epoch seconds (timezone.utc).

    Raises:
        ReplayError: if the text is neither form, or an offset is given without a reference.
    """
    s = text.strip()
    if s.startswith("+"):
        if relative_to is None:
            msg = f"relative time {text!r} needs a reference (the replay start)"
            raise ReplayError(msg)
        unit = 3600 if s.endswith("h") else 86400
        try:
            return int(relative_to + round(float(s[1:-1]) * unit))
        except ValueError as exc:
            msg = f"bad relative time {text!r} (use +36h or +3d)"
            raise ReplayError(msg) from exc
    s = s.replace("Z", "+00:00")
    if re.fullmatch(r".*T\d{2}", s) or re.fullmatch(r".*T\d{2}[+-]\d{2}(:?\d{2})?", s):
        # "2016-06-01T06" (hours only) is valid ISO 8601 but not for fromisoformat before 3.11's extension.
        s = re.sub(r"T(\d{2})(?=$|[+-])", r"T\1:00", s)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as exc:
        msg = f"bad time {text!r}: use ISO 8601 like 2016-06-01T06:00 (UTC unless an offset is given) or +3d"
        raise ReplayError(msg) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


format_ts = format_rfc3339  # epoch seconds -> RFC 3339 UTC (gapcast.timefmt)


# --------------------------------------------------------------------------------------------------- outages


@dataclass(frozen=True)
class Outage:
    """An injected outage: during ``[start_s, start_s + hours * 3600)`` the station sends nothing for ``channels``.

    Attributes:
        station: station name.
        start_s: first affected step, epoch seconds (timezone.utc), inclusive.
        hours: length, hours (> 0).
        channels: the channels withheld; None = the whole station is silent (no message at all).
    """

    station: str
    start_s: int
    hours: float
    channels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.hours > 0:
            msg = f"outage of {self.station} must last > 0 hours (got {self.hours})"
            raise ReplayError(msg)

    @property
    def end_s(self) -> int:
        """First step after the outage, epoch seconds (exclusive end)."""
        return int(self.start_s + round(self.hours * 3600))

    def spec(self) -> str:
        """The command-line form of this outage (``STATION:START:HOURS[:CHANNELS]``)."""
        chans = "" if self.channels is None else ":" + ",".join(self.channels)
        hours = f"{self.hours:g}"
        return f"{self.station}:{format_ts(self.start_s)}:{hours}{chans}"


def parse_outage(
    spec: str,
    *,
    channels: Sequence[str],
    pollutants: Sequence[str] = (),
    relative_to: int | None = None,
) -> Outage:
    """Parse ``STATION:START:HOURS[:CHANNELS]``.

    Args:
        spec: e.g. ``Aotizhongxin:2016-06-01T00:00:72`` (whole station silent 72 h),
            ``Tiantan:+10d:24:pollutants`` (all pollutants, 24 h from 10 days after the replay start),
            ``Tiantan:2016-07-01:6:PM2.5,PM10``. START is :func:`parse_time`'s format; CHANNELS is a comma list of
            channel names, ``pollutants``, or ``all`` (= the whole station).
        channels: the channel names of the data, to validate CHANNELS.
        pollutants: the names ``pollutants`` stands for.
        relative_to: reference for a relative START (the replay start), epoch seconds.

    Returns:
        The :class:`Outage`.

    Raises:
        ReplayError: malformed spec, unknown channel, or non-positive length.
    """
    m = _OUTAGE_RE.match(spec.strip())
    if not m:
        msg = f"bad outage {spec!r}: use STATION:START:HOURS[:CHANNELS], e.g. Aotizhongxin:2016-06-01T00:00:72:pollutants"
        raise ReplayError(msg)
    start_s = parse_time(m["start"], relative_to=relative_to)
    chans: tuple[str, ...] | None = None
    if m["channels"]:
        names: list[str] = []
        for name in (c.strip() for c in m["channels"].split(",")):
            if name == _ALL_KEYWORD:
                names = []
                chans = None
                break
            if name == _POLLUTANTS_KEYWORD:
                names.extend(pollutants)
            elif name in channels:
                names.append(name)
            else:
                msg = f"outage {spec!r}: unknown channel {name!r} (known: {', '.join(channels)}, pollutants, all)"
                raise ReplayError(msg)
        else:
            chans = tuple(dict.fromkeys(names))  # de-duplicated, order kept
    return Outage(station=m["station"], start_s=start_s, hours=float(m["hours"]), channels=chans)


# --------------------------------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class PlannedReading:
    """One message of the replay.

    Attributes:
        send_s: when it is due, simulated epoch seconds (its own ``ts``; later for a late reading).
        order: tie-break among messages due at the same simulated second (publication order).
        station: station name.
        ts: the reading's own timestamp (event time, step start), epoch seconds.
        values: channel -> value in the channel's unit; absent channels are missing (real NA or injected outage).
        late: published ``late_delay_s`` after ``ts``.
        out_of_order: published right after the station's next reading.
    """

    send_s: float
    order: float
    station: str
    ts: int
    values: dict[str, float]
    late: bool = False
    out_of_order: bool = False


@dataclass
class ReplayPlan:
    """Everything a replay will publish, and what it withheld.

    Attributes:
        readings: the messages, sorted by publication order.
        stations: replayed stations.
        channels: channel names, in data column order.
        cadence_s: step length of the data, seconds.
        start_s, end_s: the replayed range ``[start_s, end_s)``, epoch seconds.
        outages: the injected outages.
        epoch_s: station -> [T] int64 step times of the replayed range.
        values: station -> [T, C] float32 true values of the range in physical units (NaN = real NA).
        hidden: station -> [T, C] bool, True where a really observed value was withheld by an injected outage.
        late_delay_s: how much later than its timestamp a late reading is published, seconds.
    """

    readings: list[PlannedReading]
    stations: tuple[str, ...]
    channels: tuple[str, ...]
    cadence_s: int
    start_s: int
    end_s: int
    outages: tuple[Outage, ...]
    epoch_s: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    hidden: dict[str, np.ndarray]
    late_delay_s: float = 0.0

    @property
    def sent(self) -> dict[str, np.ndarray]:
        """station -> [T, C] bool, True where the replay publishes a value (observed and not withheld)."""
        return {s: ~np.isnan(self.values[s]) & ~self.hidden[s] for s in self.stations}

    def counts(self) -> dict[str, int]:
        """Totals: steps, messages, values sent, real NA, hidden values, silent steps, late, out of order."""
        steps = sum(len(e) for e in self.epoch_s.values())
        real_na = sum(int(np.isnan(v).sum()) for v in self.values.values())
        hidden = sum(int(h.sum()) for h in self.hidden.values())
        return {
            "steps": steps,
            "messages": len(self.readings),
            "values_sent": sum(len(r.values) for r in self.readings),
            "real_missing_values": real_na,
            "hidden_values": hidden,
            "silent_steps": steps - len(self.readings),
            "late": sum(r.late for r in self.readings),
            "out_of_order": sum(r.out_of_order for r in self.readings),
        }


def _round(v: float) -> float:
    # float32 data printed as float64 carries noise digits (0.38268343 -> 0.3826834261417389); 6 significant digits
    # keep every digit the source file had.
    return float(f"{v:.6g}")


def plan_replay(
    series: Mapping[str, StationSeries],
    *,
    start_s: int | None = None,
    end_s: int | None = None,
    outages: Sequence[Outage] = (),
    late_share: float = 0.0,
    out_of_order_share: float = 0.0,
    late_delay_s: float | None = None,
    seed: int = 0,
) -> ReplayPlan:
    """Plan a replay: which message goes out when, with which channels. Pure and deterministic for a seed.

    Args:
        series: station -> :class:`gapcast.train.data.StationSeries` (physical units, NaN = real missing).
        start_s: first step replayed, epoch seconds (default: the first step of the data).
        end_s: end of the range, exclusive, epoch seconds (default: after the last step).
        outages: injected outages; their stations must be in ``series``.
        late_share: share of the messages published late, in [0, 1].
        out_of_order_share: share of the messages swapped with the station's next message, in [0, 1]
            (a late message, or the partner of a swap, is never swapped again).
        late_delay_s: delay of a late message after its own timestamp, seconds (default 1.5 cadences: it arrives
            after the next step's reading, within a lateness of two cadences).
        seed: random seed for choosing late and out-of-order messages.

    Returns:
        The :class:`ReplayPlan`.

    Raises:
        ReplayError: empty range, unknown outage station, shares outside [0, 1], or series of different cadence
            or channels.
    """
    if not series:
        msg = "no station to replay"
        raise ReplayError(msg)
    for name, share in (("late_share", late_share), ("out_of_order_share", out_of_order_share)):
        if not 0.0 <= share <= 1.0:
            msg = f"{name} must lie in [0, 1], got {share}"
            raise ReplayError(msg)
    stations = tuple(series)
    first = series[stations[0]]
    channels = tuple(c.name for c in first.channels)
    cadence_s = int(first.epoch_s[1] - first.epoch_s[0]) if len(first.epoch_s) > 1 else 3600
    for s in series.values():
        if tuple(c.name for c in s.channels) != channels:
            msg = f"station {s.station} has other channels than {stations[0]}"
            raise ReplayError(msg)
        if len(s.epoch_s) > 1 and np.any(np.diff(s.epoch_s) != cadence_s):
            msg = f"station {s.station} is not on a regular {cadence_s} s cadence"
            raise ReplayError(msg)
    unknown = sorted({o.station for o in outages} - set(stations))
    if unknown:
        msg = f"outage for station(s) {unknown} that are not replayed ({', '.join(stations)})"
        raise ReplayError(msg)
    lo = min(int(s.epoch_s[0]) for s in series.values()) if start_s is None else int(start_s)
    hi = max(int(s.epoch_s[-1]) for s in series.values()) + cadence_s if end_s is None else int(end_s)
    if hi <= lo:
        msg = f"empty replay range: start {format_ts(lo)} is not before end {format_ts(hi)}"
        raise ReplayError(msg)
    delay = 1.5 * cadence_s if late_delay_s is None else float(late_delay_s)
    if delay <= 0:
        msg = f"late_delay_s must be > 0, got {delay}"
        raise ReplayError(msg)

    rng = np.random.default_rng(seed)
    col = {name: j for j, name in enumerate(channels)}
    epochs: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    hidden: dict[str, np.ndarray] = {}
    per_station: dict[str, list[PlannedReading]] = {}
    for name in stations:
        s = series[name]
        rows = (s.epoch_s >= lo) & (s.epoch_s < hi)
        ep = s.epoch_s[rows].astype(np.int64)
        vals = s.values[rows].astype(np.float32)
        withheld = np.zeros(vals.shape, dtype=bool)
        for o in outages:
            if o.station != name:
                continue
            t = (ep >= o.start_s) & (ep < o.end_s)
            if o.channels is None:
                withheld[t, :] = True
            else:
                withheld[np.ix_(t, [col[c] for c in o.channels])] = True
        observed = ~np.isnan(vals)
        send = observed & ~withheld
        msgs = []
        for i in np.flatnonzero(send.any(axis=1)):
            v = {channels[j]: _round(float(vals[i, j])) for j in np.flatnonzero(send[i])}
            msgs.append(PlannedReading(send_s=float(ep[i]), order=0.0, station=name, ts=int(ep[i]), values=v))
        epochs[name], values[name], hidden[name] = ep, vals, withheld & observed
        per_station[name] = msgs

    # Late and out-of-order messages: exact counts (round(share * n)) chosen at random, per station, so every
    # station sees the same disorder whatever its size.
    for name in stations:
        msgs = per_station[name]
        n = len(msgs)
        n_late = round(late_share * n)
        for i in rng.choice(n, size=n_late, replace=False) if n_late else ():
            msgs[i].late = True
            msgs[i].send_s = msgs[i].ts + delay
        n_ooo = round(out_of_order_share * n)
        partner = np.zeros(n, dtype=bool)
        swapped = 0
        for i in rng.permutation(max(n - 1, 0)):
            if swapped >= n_ooo:
                break
            a, b = msgs[i], msgs[i + 1]
            if a.late or b.late or a.out_of_order or b.out_of_order or partner[i] or partner[i + 1]:
                continue
            a.out_of_order = True
            partner[i + 1] = True
            a.send_s = b.send_s
            swapped += 1
        if swapped < n_ooo:
            log.warning("%s: only %d of %d out-of-order swaps possible", name, swapped, n_ooo)

    # Publication order: by due time; at equal times stations interleave in a fixed order and a swapped message
    # goes right after its partner.
    readings: list[PlannedReading] = []
    for k, name in enumerate(stations):
        for msg in per_station[name]:
            msg.order = k + (0.5 if msg.out_of_order else 0.0)
            readings.append(msg)
    readings.sort(key=lambda r: (r.send_s, r.order))
    return ReplayPlan(
        readings=readings,
        stations=stations,
        channels=channels,
        cadence_s=cadence_s,
        start_s=lo,
        end_s=hi,
        outages=tuple(outages),
        epoch_s=epochs,
        values=values,
        hidden=hidden,
        late_delay_s=delay,
    )


# --------------------------------------------------------------------------------------------------- publishing


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL (:func:`gapcast.brokerurl.parse_broker_url`).

    Raises:
        ReplayError: another scheme, no host, or a bad port.
    """
    try:
        return _parse_broker_url(url)
    except ValueError as exc:
        raise ReplayError(str(exc)) from exc


def readings_topic(prefix: str, station: str) -> str:
    """``{prefix}/stations/{station}/readings`` (built by :class:`gapcast.edge.messages.Topics`)."""
    from gapcast.edge.messages import Topics

    return Topics(prefix.rstrip("/")).readings(station)


@dataclass(frozen=True)
class ReplayOptions:
    """How a plan is published.

    Attributes:
        speed: simulated seconds per wall second (3600 = one hour of history per second); 0 = as fast as possible.
        prefix: topic prefix.
        qos: MQTT QoS of the readings (0, 1 or 2).
        mqtt_version: ``"5"`` or ``"3.1.1"``.
        client_id: MQTT client id (default ``gapcast-replay-<pid>``).
        max_inflight: unacknowledged QoS > 0 messages allowed before publishing waits, messages.
        ts_format: ``"rfc3339"`` (``2016-05-01T00:00:00Z``) or ``"epoch"`` (integer seconds).
        ca_file: CA bundle for ``mqtts://`` (default: the system's).
        connect_timeout_s: how long to wait for the broker's CONNACK, seconds.
        drain_timeout_s: how long to wait at the end for outstanding acknowledgements, seconds.
    """

    speed: float = 0.0
    prefix: str = DEFAULT_PREFIX
    qos: int = 1
    mqtt_version: str = "5"
    client_id: str | None = None
    max_inflight: int = 200
    ts_format: str = "rfc3339"
    ca_file: str | None = None
    connect_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.speed < 0 or not math.isfinite(self.speed):
            msg = f"speed must be >= 0 (0 = as fast as possible), got {self.speed}"
            raise ReplayError(msg)
        if self.qos not in (0, 1, 2):
            msg = f"qos must be 0, 1 or 2, got {self.qos}"
            raise ReplayError(msg)
        if self.mqtt_version not in ("5", "3.1.1"):
            msg = f"mqtt_version must be '5' or '3.1.1', got {self.mqtt_version!r}"
            raise ReplayError(msg)
        if self.ts_format not in ("rfc3339", "epoch"):
            msg = f"ts_format must be 'rfc3339' or 'epoch', got {self.ts_format!r}"
            raise ReplayError(msg)
        if self.max_inflight < 1:
            msg = "max_inflight must be >= 1"
            raise ReplayError(msg)


@dataclass
class ReplaySummary:
    """What a replay did.

    Attributes:
        broker: the broker URL (without credentials).
        stations: replayed stations.
        start, end: the replayed range, RFC 3339.
        speed: simulated seconds per wall second (0 = as fast as possible).
        published: messages handed to the broker.
        acknowledged: messages the broker acknowledged (QoS > 0) or sent (QoS 0).
        per_station: station -> messages published.
        counts: :meth:`ReplayPlan.counts` of the plan (late, out of order, hidden values, silent steps...).
        outages: the injected outages, command-line form.
        wall_s: wall time of the publishing, seconds.
        interrupted: True when stopped before the end (Ctrl-C or a stop request).
    """

    broker: str
    stations: tuple[str, ...]
    start: str
    end: str
    speed: float
    published: int = 0
    acknowledged: int = 0
    per_station: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    outages: tuple[str, ...] = ()
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def rate_per_s(self) -> float:
        """Messages published per wall second."""
        return self.published / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "stations": list(self.stations),
            "start": self.start,
            "end": self.end,
            "speed": self.speed,
            "published": self.published,
            "acknowledged": self.acknowledged,
            "per_station": self.per_station,
            "counts": self.counts,
            "outages": list(self.outages),
            "wall_s": round(self.wall_s, 3),
            "rate_per_s": round(self.rate_per_s, 1),
            "interrupted": self.interrupted,
        }

    def format(self, *, dry_run: bool = False) -> str:
        """A short human-readable report (``dry_run``: the plan only, nothing was published)."""
        c = self.counts
        speed = "as fast as possible" if self.speed == 0 else f"{self.speed:g}x"
        if dry_run:
            head = f"replay plan (dry run, nothing published): {c.get('messages', 0):,} readings for {self.broker}"
        else:
            head = (
                f"replay {'INTERRUPTED' if self.interrupted else 'done'}: {self.published:,} readings "
                f"({self.acknowledged:,} acknowledged) to {self.broker} in {self.wall_s:.1f} s "
                f"({self.rate_per_s:,.0f} msg/s, speed {speed})"
            )
        lines = [
            head,
            f"  range     {self.start} .. {self.end}, {len(self.stations)} station(s): "
            + ", ".join(f"{s} {n:,}" for s, n in self.per_station.items()),
            f"  missing   {c.get('real_missing_values', 0):,} real NA values kept absent, "
            f"{c.get('silent_steps', 0):,} silent steps (no message)",
            f"  injected  {len(self.outages)} outage(s) hiding {c.get('hidden_values', 0):,} observed values; "
            f"{c.get('late', 0):,} late, {c.get('out_of_order', 0):,} out-of-order readings",
        ]
        lines += [f"            outage {o}" for o in self.outages]
        return "\n".join(lines)


def _payload(r: PlannedReading, ts_format: str) -> bytes:
    ts: str | int = format_ts(r.ts) if ts_format == "rfc3339" else int(r.ts)
    return json.dumps({"ts": ts, "values": r.values}, separators=(",", ":")).encode()


def _make_client(opts: ReplayOptions, broker: BrokerURL):
    import paho.mqtt.client as mqtt

    client_id = opts.client_id or f"gapcast-replay-{os.getpid()}"
    if opts.mqtt_version == "5":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=opts.ca_file)
    client.max_inflight_messages_set(opts.max_inflight)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    return client


def replay(
    plan: ReplayPlan,
    broker_url: str,
    options: ReplayOptions | None = None,
    *,
    progress: bool = True,
    journal: str | Path | None = None,
    stop: threading.Event | None = None,
) -> ReplaySummary:
    """Publish a plan to a broker, paced on simulated time.

    Threads: the caller's thread publishes and sleeps; paho's network thread (``loop_start``) runs the
    callbacks, which only count acknowledgements and set events.

    Args:
        plan: from :func:`plan_replay`.
        broker_url: ``mqtt://host:port`` or ``mqtts://...`` (see :func:`parse_broker_url`).
        options: publishing options (default :class:`ReplayOptions`).
        progress: show a tqdm progress bar on stderr.
        journal: a JSON-lines file to write one line per published message:
            ``{"station", "ts", "sent_mono", "late", "out_of_order", "n"}`` where ``sent_mono`` is
            ``time.monotonic()`` at publication (CLOCK_MONOTONIC: comparable across processes on one Linux host)
            and ``n`` the number of channels. The demo uses it to time step-to-forecast latency.
        stop: an event that ends the replay early when set (the summary says interrupted).

    Returns:
        The :class:`ReplaySummary`.

    Raises:
        ReplayError: the broker refuses the connection or does not answer within ``connect_timeout_s``.
    """
    import paho.mqtt.client as mqtt
    from tqdm import tqdm

    opts = options or ReplayOptions()
    broker = parse_broker_url(broker_url)
    client = _make_client(opts, broker)
    connected = threading.Event()
    refused: list[str] = []
    window = threading.Semaphore(opts.max_inflight)
    acked = [0]
    lock = threading.Lock()

    def on_connect(client, userdata, flags, reason_code, properties):  # paho network thread
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    def on_publish(client, userdata, mid, reason_code, properties):  # paho network thread
        with lock:
            acked[0] += 1
        window.release()

    def on_disconnect(client, userdata, flags, reason_code, properties):  # paho network thread
        if reason_code.is_failure:
            log.warning("replay: disconnected from %s:%d (%s); paho reconnects", broker.host, broker.port, reason_code)

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    summary = ReplaySummary(
        broker=f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}",
        stations=plan.stations,
        start=format_ts(plan.start_s),
        end=format_ts(plan.end_s),
        speed=opts.speed,
        per_station=dict.fromkeys(plan.stations, 0),
        counts=plan.counts(),
        outages=tuple(o.spec() for o in plan.outages),
    )
    try:
        client.connect_async(broker.host, broker.port, keepalive=30)
        client.loop_start()
    except (OSError, ValueError) as exc:
        msg = f"cannot connect to {summary.broker}: {exc}"
        raise ReplayError(msg) from exc
    # Line-buffered: a reader (the demo, `tail -f`) sees each message as soon as it is published.
    jf = open(journal, "w", buffering=1) if journal else None  # noqa: SIM115 (closed in finally)
    bar = tqdm(total=len(plan.readings), unit="msg", desc="replay", disable=not progress, mininterval=0.5)
    t_start = time.monotonic()
    try:
        if not connected.wait(opts.connect_timeout_s):
            msg = f"no answer from the broker at {summary.broker} within {opts.connect_timeout_s:g} s"
            raise ReplayError(msg)
        if refused:
            msg = f"the broker at {summary.broker} refused the connection: {refused[0]}"
            raise ReplayError(msg)
        sim0 = plan.readings[0].send_s if plan.readings else 0.0
        t0 = time.monotonic()
        for k, r in enumerate(plan.readings):
            if opts.speed > 0:
                due = t0 + (r.send_s - sim0) / opts.speed
                while (wait := due - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
                    if stop is not None:
                        stop.wait(min(wait, 0.5))
                    else:
                        time.sleep(min(wait, 0.5))
            if opts.qos > 0:
                # Bounded in-flight window: never more than max_inflight unacknowledged messages.
                while not window.acquire(timeout=0.5):
                    if stop is not None and stop.is_set():
                        break
                else:
                    if stop is not None and stop.is_set():
                        window.release()
            if stop is not None and stop.is_set():
                summary.interrupted = True
                break
            info = client.publish(readings_topic(opts.prefix, r.station), _payload(r, opts.ts_format), qos=opts.qos)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("replay: publish of %s %s failed: %s", r.station, r.ts, mqtt.error_string(info.rc))
            summary.published += 1
            summary.per_station[r.station] += 1
            if jf is not None:
                jf.write(
                    json.dumps(
                        {
                            "station": r.station,
                            "ts": r.ts,
                            "sent_mono": round(time.monotonic(), 6),
                            "late": r.late,
                            "out_of_order": r.out_of_order,
                            "n": len(r.values),
                        }
                    )
                    + "\n"
                )
            if k % 64 == 0:
                bar.set_postfix_str(format_ts(int(r.send_s))[:13], refresh=False)
            bar.update(1)
        # Drain: wait for the broker to acknowledge what is still in flight.
        deadline = time.monotonic() + (2.0 if summary.interrupted else opts.drain_timeout_s)
        while time.monotonic() < deadline:
            with lock:
                if acked[0] >= summary.published:
                    break
            time.sleep(0.02)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        summary.wall_s = time.monotonic() - t_start
        with lock:
            summary.acknowledged = acked[0]
        bar.close()
        if jf is not None:
            jf.close()
        client.disconnect()
        client.loop_stop()
    if summary.acknowledged < summary.published and not summary.interrupted:
        log.warning(
            "replay: %d of %d messages not acknowledged by the broker",
            summary.published - summary.acknowledged,
            summary.published,
        )
    return summary


# --------------------------------------------------------------------------------------------------- CLI


def topic_prefix_arg(text: str) -> str:
    """argparse type for ``--prefix``: an MQTT topic prefix we can publish under.

    The same rule as the gateway's ``mqtt.topic_prefix`` (:mod:`gapcast.edge.config`): not empty, no leading or
    trailing ``/``, no wildcard (``+``, ``#``, MQTT 3.1.1 section 4.7.1) and no NUL.

    Raises:
        argparse.ArgumentTypeError: the prefix breaks one of those rules (argparse prints it as a usage error).
    """
    from gapcast.edge.messages import topic_prefix_problem

    if why := topic_prefix_problem(text):
        raise argparse.ArgumentTypeError(why)
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gapcast replay`` to the top-level CLI."""
    p = subparsers.add_parser(
        "replay",
        help="publish real station history to an MQTT broker (a station simulator)",
        description=(
            "Publish each station's real history as readings on {prefix}/stations/{station}/readings, at a chosen "
            "speed, with the data's real outages kept as absent channels, plus injected outages and late or "
            "out-of-order readings. By default: the Beijing test months (2016-05..2017-02) of every station."
        ),
    )
    p.add_argument("--dataset", default="beijing",
                   help="dataset spec (SPEC.toml) or preset: beijing, etth1, etth2 (default beijing)")
    p.add_argument("--data", help="data root for {data} in the spec (default: $GAPCAST_DATA, then the cache)")
    p.add_argument("--broker", required=True, help="broker URL: mqtt://host:port, mqtts://user@host:8883")
    add_password_argument(p)
    p.add_argument("--stations", nargs="+", metavar="NAME", help="stations to replay (default: all in the data)")
    p.add_argument("--start", help="first step, ISO 8601 (UTC unless an offset is given); default: the start of the "
                   "dataset's test range")
    end = p.add_mutually_exclusive_group()
    end.add_argument("--end", help="end of the range, exclusive, ISO 8601 or +Nd/+Nh from --start (default: data end)")
    end.add_argument("--days", type=float, help="replay this many days from --start")
    p.add_argument(
        "--speed",
        type=float,
        default=3600.0,
        help="simulated seconds per wall second (default 3600: one hour of history per second); 0 = as fast as possible",
    )
    p.add_argument(
        "--outage",
        action="append",
        default=[],
        metavar="STATION:START:HOURS[:CHANNELS]",
        help=(
            "inject an outage (repeatable): no message for the whole station, or for CHANNELS (comma list of "
            "channels or group names of the dataset spec, or 'all'); START is ISO 8601 or +Nd/+Nh from --start. "
            "E.g. Aotizhongxin:2016-06-01T00:72:pollutants"
        ),
    )
    p.add_argument("--late-share", type=float, default=0.0, metavar="P", help="share of readings published late (default 0)")
    p.add_argument(
        "--late-delay-s", type=float, default=None, help="delay of a late reading, seconds (default 1.5 cadences)"
    )
    p.add_argument(
        "--out-of-order-share",
        type=float,
        default=0.0,
        metavar="P",
        help="share of readings published right after the station's next reading (default 0)",
    )
    p.add_argument("--prefix", type=topic_prefix_arg, default=DEFAULT_PREFIX,
                   help=f"topic prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="QoS of the readings (default 1)")
    p.add_argument("--mqtt", choices=("5", "3.1.1"), default="5", help="MQTT protocol version (default 5)")
    p.add_argument("--ts-format", choices=("rfc3339", "epoch"), default="rfc3339", help="form of the 'ts' field (default rfc3339)")
    p.add_argument("--ca-file", help="CA bundle for mqtts:// (default: the system's)")
    p.add_argument("--client-id", help="MQTT client id (default gapcast-replay-<pid>)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing late and out-of-order readings (default 0)")
    p.add_argument("--journal", help="write one JSON line per published message (station, ts, sent_mono) here")
    p.add_argument("--summary-json", help="write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="plan and print the summary, publish nothing")
    p.set_defaults(func=_cmd_replay)


def _broker_with_password(args: argparse.Namespace) -> BrokerURL:
    """``--broker`` with its password from ``--password-file`` or ``$GAPCAST_MQTT_PASSWORD``."""
    try:
        return resolve_broker_url(args.broker, password_file=args.password_file)
    except ValueError as exc:
        raise ReplayError(str(exc)) from exc


def _expand_groups(text: str, groups: dict[str, list[str]]) -> str:
    """``STATION:START:HOURS:air,temp`` -> the group names in the CHANNELS part replaced by their channels (only
    names that are group names change, so a spec without CHANNELS passes unchanged)."""
    head, sep, chans = text.rpartition(":")
    if not sep:
        return text
    parts = []
    for name in chans.split(","):
        parts.extend(groups.get(name, [name]))
    return f"{head}:{','.join(parts)}"


def _cmd_replay(args: argparse.Namespace) -> int:
    from gapcast.train.loader import load_dataset, split_indices
    from gapcast.train.spec import load_spec

    spec = load_spec(args.dataset)
    series = load_dataset(spec, args.data, args.stations)
    first = next(iter(series.values()))
    start_s = (
        parse_time(args.start) if args.start else int(first.epoch_s[split_indices(spec, first, check=False).test.start])
    )
    if args.days is not None:
        end_s: int | None = start_s + round(args.days * 86400)
    elif args.end:
        end_s = parse_time(args.end, relative_to=start_s)
    else:
        end_s = None
    names = list(spec.channel_names)
    groups = {g: [names[i] for i in idx] for g, idx in spec.groups.items()}
    first_group = next(iter(groups.values()), [])
    outages = [parse_outage(_expand_groups(o, groups), channels=names, pollutants=first_group, relative_to=start_s)
               for o in args.outage]
    plan = plan_replay(
        series,
        start_s=start_s,
        end_s=end_s,
        outages=outages,
        late_share=args.late_share,
        out_of_order_share=args.out_of_order_share,
        late_delay_s=args.late_delay_s,
        seed=args.seed,
    )
    options = ReplayOptions(
        speed=args.speed,
        prefix=args.prefix,
        qos=args.qos,
        mqtt_version=args.mqtt,
        client_id=args.client_id,
        ts_format=args.ts_format,
        ca_file=args.ca_file,
    )
    if args.dry_run:
        summary = ReplaySummary(
            broker=args.broker,
            stations=plan.stations,
            start=format_ts(plan.start_s),
            end=format_ts(plan.end_s),
            speed=args.speed,
            per_station={s: sum(r.station == s for r in plan.readings) for s in plan.stations},
            counts=plan.counts(),
            outages=tuple(o.spec() for o in plan.outages),
        )
        print(summary.format(dry_run=True))
    else:
        # Ctrl-C ends the replay cleanly: the summary of what was published is still printed (exit 130).
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        try:
            summary = replay(plan, _broker_with_password(args), options, progress=not args.no_progress, journal=args.journal, stop=stop)
        finally:
            signal.signal(signal.SIGINT, previous)
        print(summary.format())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return 130 if summary.interrupted else 0

