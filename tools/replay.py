"""``gapcast replay``: a station simulator that publishes real station history over MQTT.

(Over 600 lines on purpose: the simulator's plan, clock and MQTT publisher are one loop; the plan
parsing lives in tools/replay_plan.py.)

It is the tool to try a broker and a gateway before real stations exist, and the load generator of the demo and the
benchmarks. Each station's history (of any dataset spec; by default its test range) becomes readings on the contract
topic ``{prefix}/stations/{station}/readings`` with the payload ``{"ts": ..., "values": {...}}`` (docs/ARCHITECTURE.md,
"Contracts"). What the data lacks stays lacking: a real ``NA`` is an absent channel, never a sentinel; a step with no
channel at all sends no message (the station was silent). On top of the real outages it can inject:

- outages: no message for a whole station, or the listed channels dropped from its readings, for a time range;
- late readings: published ``late_delay_s`` after their own timestamp (simulated time), so later steps arrive first;
- out-of-order readings: published right after the station's next reading.

The replay runs on simulated time: a reading is due at its own timestamp (a late one later), and ``speed`` X
publishes X simulated seconds per wall second (``speed = 0``: as fast as the broker acknowledges).

Two layers: :func:`plan_replay` (:mod:`gapcast.tools.replay_plan`, re-exported here) is pure (series in, a sorted
list of :class:`PlannedReading` and the exact masks of what was hidden out) so tests and the demo can check every
value; :func:`replay` publishes a plan with paho-mqtt 2.x
(VERSION2 callback API, MQTT 5 by default, QoS 1 with a bounded number of unacknowledged messages).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gapcast.brokerurl import BrokerURL, add_password_argument, resolve_broker_url
from gapcast.brokerurl import parse_broker_url as _parse_broker_url
from gapcast.tools.replay_plan import (
    Outage,
    PlannedReading,
    ReplayError,
    ReplayPlan,
    format_ts,
    parse_outage,
    parse_time,
    plan_replay,
)

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
        speed: simulated seconds per wall second (e.g. the cadence: one step of history per second); 0 = as fast as
            possible.
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

    @classmethod
    def of_plan(cls, plan: ReplayPlan, *, broker: str, speed: float, per_station: dict[str, int]) -> ReplaySummary:
        """A summary of ``plan`` (its stations, range, counts and outages) with nothing published yet."""
        return cls(
            broker=broker,
            stations=plan.stations,
            start=format_ts(plan.start_s),
            end=format_ts(plan.end_s),
            speed=speed,
            per_station=per_station,
            counts=plan.counts(),
            outages=tuple(o.spec() for o in plan.outages),
        )

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


def _wait_until_due(due_mono: float, stop: threading.Event) -> None:
    """Sleep until ``time.monotonic()`` reaches ``due_mono`` or ``stop`` is set (checked at least every 0.5 s)."""
    while (wait := due_mono - time.monotonic()) > 0 and not stop.is_set():
        stop.wait(min(wait, 0.5))


def _acquire_slot(window: threading.Semaphore, stop: threading.Event) -> None:
    """Take one slot of the bounded in-flight window (never more than max_inflight unacknowledged messages);
    gives up, holding nothing, when ``stop`` is set."""
    while not window.acquire(timeout=0.5):
        if stop.is_set():
            return
    if stop.is_set():
        window.release()


def _journal_line(r: PlannedReading) -> str:
    """One JSON line of the publication journal (see :func:`replay`)."""
    rec = {"station": r.station, "ts": r.ts, "sent_mono": round(time.monotonic(), 6), "late": r.late,
           "out_of_order": r.out_of_order, "n": len(r.values)}
    return json.dumps(rec) + "\n"


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
    from tqdm import tqdm

    opts = options or ReplayOptions()
    broker = parse_broker_url(broker_url)
    client = _make_client(opts, broker)
    acks = _Acks(opts.max_inflight, broker)
    acks.attach(client)
    summary = ReplaySummary.of_plan(plan, broker=f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}",
                                    speed=opts.speed, per_station=dict.fromkeys(plan.stations, 0))
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
        acks.wait_connected(opts.connect_timeout_s, summary.broker)
        _publish_plan(plan, client, opts, acks, summary, jf, bar, stop or threading.Event())
        acks.drain(summary.published, 2.0 if summary.interrupted else opts.drain_timeout_s)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        summary.wall_s = time.monotonic() - t_start
        summary.acknowledged = acks.count()
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


class _Acks:
    """The replay's view of the broker: the CONNACK, the acknowledgements and the bounded in-flight window.

    The ``on_*`` callbacks run on paho's network thread; they only count, release a window slot and set events.
    """

    def __init__(self, max_inflight: int, broker: BrokerURL) -> None:
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.window = threading.Semaphore(max_inflight)
        self._acked = 0
        self._lock = threading.Lock()
        self._broker = broker

    def attach(self, client) -> None:
        """Set the client's connect, publish and disconnect callbacks to this object's."""
        client.on_connect = self.on_connect
        client.on_publish = self.on_publish
        client.on_disconnect = self.on_disconnect

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # paho network thread
        if reason_code.is_failure:
            self.refused.append(str(reason_code))
        self.connected.set()

    def on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # paho network thread
        with self._lock:
            self._acked += 1
        self.window.release()

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # paho network thread
        if reason_code.is_failure:
            log.warning("replay: disconnected from %s:%d (%s); paho reconnects", self._broker.host, self._broker.port,
                        reason_code)

    def count(self) -> int:
        """Messages acknowledged so far."""
        with self._lock:
            return self._acked

    def wait_connected(self, timeout_s: float, where: str) -> None:
        """Wait for the broker's CONNACK.

        Raises:
            ReplayError: no answer within ``timeout_s`` seconds, or the broker refused the connection.
        """
        if not self.connected.wait(timeout_s):
            msg = f"no answer from the broker at {where} within {timeout_s:g} s"
            raise ReplayError(msg)
        if self.refused:
            msg = f"the broker at {where} refused the connection: {self.refused[0]}"
            raise ReplayError(msg)

    def drain(self, published: int, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` seconds for the broker to acknowledge what is still in flight; raises nothing."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.count() >= published:
                break
            time.sleep(0.02)


def _publish_plan(plan: ReplayPlan, client, opts: ReplayOptions, acks: _Acks, summary: ReplaySummary, jf, bar,
                  stop: threading.Event) -> None:
    """Publish the plan's readings in order, each when it is due on simulated time, at most ``max_inflight``
    unacknowledged (QoS > 0); counts into ``summary``, one journal line per message to ``jf`` (None: no journal).
    Stops early (``summary.interrupted``) when ``stop`` is set. A failed publish is logged, not raised."""
    import paho.mqtt.client as mqtt

    sim0 = plan.readings[0].send_s if plan.readings else 0.0
    t0 = time.monotonic()
    for k, r in enumerate(plan.readings):
        if opts.speed > 0:
            _wait_until_due(t0 + (r.send_s - sim0) / opts.speed, stop)
        if opts.qos > 0:
            _acquire_slot(acks.window, stop)
        if stop.is_set():
            summary.interrupted = True
            break
        info = client.publish(readings_topic(opts.prefix, r.station), _payload(r, opts.ts_format), qos=opts.qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("replay: publish of %s %s failed: %s", r.station, r.ts, mqtt.error_string(info.rc))
        summary.published += 1
        summary.per_station[r.station] += 1
        if jf is not None:
            jf.write(_journal_line(r))
        if k % 64 == 0:
            bar.set_postfix_str(format_ts(int(r.send_s))[:13], refresh=False)
        bar.update(1)


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Publish each station's real history as readings on {prefix}/stations/{station}/readings, at a chosen "
            "speed, with the data's real outages kept as absent channels, plus injected outages and late or "
            "out-of-order readings. By default: the dataset's test range, every station.\n\n"
            "examples:\n"
            "  gapcast replay --dataset riverside.toml --broker mqtt://127.0.0.1:1883 --days 2 --speed 0\n"
            "  gapcast replay --dataset riverside.toml --broker mqtt://127.0.0.1:1883 --stations site-B \\\n"
            "      --outage site-B:+1d:72h:air --late-share 0.05"
        ),
    )
    p.add_argument("--dataset", default="beijing",
                   help="dataset spec (SPEC.toml) or preset: beijing, etth1, etth2 (default: the beijing preset)")
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
        default=None,
        help="simulated seconds per wall second (default: one cadence of history per second, e.g. 600 for a "
        "10-minute spec); 0 = as fast as possible",
    )
    p.add_argument(
        "--outage",
        action="append",
        default=[],
        metavar="STATION:START:LENGTH[:CHANNELS]",
        help=(
            "inject an outage (repeatable): no message for the whole station, or for CHANNELS (comma list of "
            "channels or group names of the dataset spec, or 'all'); START is ISO 8601 or +Nd/+Nh from --start; "
            "LENGTH is hours or a duration (90min, 3d). E.g. site-B:2016-06-01T00:72h:air"
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
    # A spec channel that becomes several model channels (an angle -> _sin, _cos) is named as in the spec too.
    for c in spec.channels:
        derived = [mc.name for mc in c.model_channels()]
        if derived != [c.name]:
            groups.setdefault(c.name, derived)
    outages = [parse_outage(o, channels=names, groups=groups, relative_to=start_s) for o in args.outage]
    plan = plan_replay(
        series,
        start_s=start_s,
        end_s=end_s,
        outages=outages,
        late_share=args.late_share,
        out_of_order_share=args.out_of_order_share,
        late_delay_s=args.late_delay_s,
        seed=args.seed,
        cadence_s=spec.cadence_s,
    )
    speed = float(spec.cadence_s) if args.speed is None else args.speed
    options = ReplayOptions(
        speed=speed,
        prefix=args.prefix,
        qos=args.qos,
        mqtt_version=args.mqtt,
        client_id=args.client_id,
        ts_format=args.ts_format,
        ca_file=args.ca_file,
    )
    if args.dry_run:
        summary = ReplaySummary.of_plan(plan, broker=args.broker, speed=speed,
                                        per_station={s: sum(r.station == s for r in plan.readings) for s in plan.stations})
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

