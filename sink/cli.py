"""``gapcast sink``: subscribe to the gateways' outputs and keep a tidy time-series store (imports nothing heavy)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading

from gapcast.brokerurl import add_password_argument
from gapcast.sink import SinkError

__all__ = ["register"]

log = logging.getLogger(__name__)


def _cmd_sink(args: argparse.Namespace) -> int:
    from gapcast.brokerurl import resolve_broker_url
    from gapcast.duration import parse_duration
    from gapcast.edge.messages import topic_prefix_problem
    from gapcast.sink.client import SinkClient, SinkOptions
    from gapcast.sink.stores import SQLiteStore, open_target

    try:
        broker = resolve_broker_url(args.broker, password_file=args.password_file)
    except ValueError as exc:
        raise SinkError(str(exc)) from exc
    problem = topic_prefix_problem(args.prefix)
    if problem:
        raise SinkError(f"--prefix {problem}")
    dedup_s = parse_duration(args.dedup_window, key="--dedup-window")
    targets = [open_target(t) for t in (args.to or ["sqlite:///gapcast-sink.db"])]
    stores = [t for t in targets if isinstance(t, SQLiteStore)]
    if len(stores) > 1:
        raise SinkError("give at most one sqlite: target (it is the sink's state)")
    store = stores[0] if stores else SQLiteStore(args.state)
    store.dedup_window_s = dedup_s
    others = [t for t in targets if t is not store]
    opts = SinkOptions(
        prefix=args.prefix,
        client_id=args.client_id or f"gapcast-sink-{socket.gethostname()}",
        mqtt_version=args.mqtt,
        session_expiry_s=int(parse_duration(args.session_expiry, key="--session-expiry")),
        validate=not args.no_validate,
    )
    sink = SinkClient(broker, store, others, opts)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("sink: %s -> %s (client id %s)", broker.host, ", ".join(t.name for t in [store, *others]), opts.client_id)
    sink.run(stop)
    print(f"sink stopped: {dict(sink.counters)}; skipped {dict(sink.rejected)}")
    return 0


def register(sub) -> None:
    """Add ``gapcast sink`` to the top-level sub-commands."""
    p = sub.add_parser(
        "sink",
        help="subscribe to filled, revision and forecast messages and store them (SQLite, InfluxDB, CSV)",
        description=(
            "The reference subscriber: a persistent QoS 1 session on {prefix}/stations/+/filled, .../revisions and "
            ".../forecast; duplicate ids dropped; a revision supersedes the filled values of its steps; one row per "
            "(station, channel, ts) with value, status (observed | filled | revised) and model version; forecasts in "
            "their own table keyed by (station, origin, channel, ts). Messages are acknowledged only after the "
            "write, so a sink killed mid-stream loses nothing when it comes back with the same --client-id."
        ),
        epilog=(
            "examples:\n"
            "  gapcast sink --broker mqtt://broker.lan:1883 --to sqlite:///var/lib/gapcast/sink.db\n"
            "  gapcast sink --broker mqtts://sink@broker.lan:8883 --password-file /etc/gapcast/sink.pw --to sqlite:///sink.db \\\n"
            "      --to influxdb://localhost:8086/gapcast\n"
            "  gapcast sink --broker mqtt://localhost --to csv:exports/ --client-id sink-csv"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--broker", required=True, help="broker URL: mqtt://host:port, mqtts://user@host:8883")
    add_password_argument(p)
    p.add_argument(
        "--to", action="append", metavar="TARGET",
        help="sqlite:///path.db (default sqlite:///gapcast-sink.db), influxdb://[user:pass@]host:8086/db or csv:DIR; "
             "repeatable (one sqlite target at most: it is also the sink's state)",
    )
    p.add_argument("--state", default="gapcast-sink.db",
                   help="the SQLite state (seen ids, tables) when no sqlite: target is given (default gapcast-sink.db)")
    p.add_argument("--prefix", default="gapcast/v1", help="topic prefix (default gapcast/v1)")
    p.add_argument("--client-id", help="fixed MQTT client id naming the persistent session (default gapcast-sink-<host>)")
    p.add_argument("--mqtt", choices=("5", "3.1.1"), default="5", help="MQTT protocol version (default 5)")
    p.add_argument("--session-expiry", default="7d",
                   help="how long the broker keeps the session while the sink is away (MQTT 5; default 7d)")
    p.add_argument("--dedup-window", default="7d", help="how long stored ids are remembered (default 7d)")
    p.add_argument("--no-validate", action="store_true", help="skip the JSON Schema check of each payload")
    p.set_defaults(func=_cmd_sink, log_info=True)
