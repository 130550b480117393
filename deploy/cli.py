"""``gapcast fleet publish | status | promote | rollback``: model releases for a fleet of gateways over MQTT.

Imports nothing heavy at module level (no torch, pandas or onnx); paho-mqtt and cryptography load in the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys

from gapcast.brokerurl import add_password_argument

__all__ = ["register"]

_PREFIX = "gapcast/v1"
#: ``message_size_limit`` of the production Mosquitto config (deploy/mosquitto/mosquitto.conf), bytes.
PRODUCTION_MESSAGE_LIMIT_BYTES = 1024 * 1024


def _prefix(text: str) -> str:
    """argparse type for ``--prefix``: the gateway's topic-prefix rule (:func:`gapcast.edge.messages.topic_prefix_problem`)."""
    import argparse

    from gapcast.edge.messages import topic_prefix_problem

    if why := topic_prefix_problem(text):
        raise argparse.ArgumentTypeError(why)
    return text


def _chunk_bytes(text: str) -> int:
    """argparse type for ``--chunk-bytes``: 1 .. MAX_CHUNK_BYTES (8 MiB)."""
    from gapcast.edge.release import MAX_CHUNK_BYTES

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= n <= MAX_CHUNK_BYTES:
        msg = f"must be within 1..{MAX_CHUNK_BYTES} bytes (8 MiB), got {n}"
        raise argparse.ArgumentTypeError(msg)
    return n


def _common(p: argparse.ArgumentParser, *, key: bool) -> None:
    p.add_argument("--fleet", required=True, help="fleet name (one MQTT topic level)")
    p.add_argument("--broker", required=True, help="broker URL, mqtt://[user@]host[:port] or mqtts://...")
    add_password_argument(p)
    p.add_argument("--prefix", type=_prefix, default=_PREFIX, help=f"MQTT topic prefix (default {_PREFIX})")
    p.add_argument("--ca-file", default=None, help="CA bundle for mqtts:// (default: the system's)")
    p.add_argument("--timeout", type=float, default=15.0, help="broker acknowledgement timeout, seconds")
    p.add_argument("--mqtt", choices=("5", "3.1.1"), default="5",
                   help="MQTT protocol version (default 5; 3.1.1 for brokers without MQTT 5)")
    if key:
        p.add_argument("--sign-key", required=True, help="Ed25519 private key (PEM) that signs release manifests")


def register(subparsers) -> None:
    """Add ``gapcast fleet ...`` to the top-level sub-parsers."""
    fleet = subparsers.add_parser("fleet", help="publish, promote and roll back model releases for a gateway fleet")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)

    p = sub.add_parser("publish", help="publish a signed bundle as the fleet's new release (retained, chunked)")
    p.add_argument("bundle", help="bundle folder (from `gapcast export`, signed)")
    _common(p, key=True)
    p.add_argument("--canary", default=None, help="comma-separated gateway ids that get the release first")
    p.add_argument("--percent", type=float, default=None, help="share of the fleet, 0..100 (deterministic ring)")
    p.add_argument("--chunk-bytes", type=_chunk_bytes, default=None,
                   help="artifact chunk size, bytes: 1..8388608 (default 98304); the production Mosquitto config "
                   "drops messages above 1 MiB (message_size_limit)")
    p.set_defaults(func=_publish)

    p = sub.add_parser("status", help="which gateway runs which model version and backend, and its last update")
    _common(p, key=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_status)

    p = sub.add_parser("promote", help="re-issue the current (canary) release for every gateway of the fleet")
    _common(p, key=True)
    p.set_defaults(func=_promote)

    p = sub.add_parser("rollback", help="issue a signed rollback to an earlier release, for every gateway")
    _common(p, key=True)
    p.add_argument("--to", type=int, required=True, dest="to_version", metavar="VERSION", help="model version")
    p.set_defaults(func=_rollback)


def _client(args):
    from gapcast.brokerurl import resolve_broker_url
    from gapcast.deploy.fleet import FleetClient, FleetError

    try:
        broker = resolve_broker_url(args.broker, password_file=args.password_file)
    except ValueError as exc:
        raise FleetError(str(exc)) from exc
    return FleetClient(broker, ca_file=args.ca_file, timeout_s=args.timeout, mqtt_version=args.mqtt)


def _topics(args):
    from gapcast.edge.release import FleetTopics

    try:
        return FleetTopics(args.prefix, args.fleet)
    except ValueError as exc:
        from gapcast.deploy.fleet import FleetError

        raise FleetError(str(exc)) from exc


def _say(release, action: str) -> None:
    m = release.manifest
    print(
        f"{action} {m.kind} v{m.model_version} of {m.model_name} to fleet {m.fleet} "
        f"({m.targets.describe()}): sequence {m.sequence}, artifact {m.artifact_id} "
        f"({m.artifact_bytes} bytes, {len(m.chunk_sha256)} chunk(s)) on {release.topics.manifest}"
    )


def _publish(args) -> int:
    from gapcast.deploy.fleet import FleetError, load_private_key, publish_release
    from gapcast.edge.release import DEFAULT_CHUNK_BYTES, Targets

    topics = _topics(args)  # a bad fleet name fails before the key is read or the broker reached
    if args.chunk_bytes is not None and args.chunk_bytes > PRODUCTION_MESSAGE_LIMIT_BYTES:
        print(
            f"gapcast: WARNING: --chunk-bytes {args.chunk_bytes} is above 1 MiB: the production Mosquitto config "
            f"(message_size_limit {PRODUCTION_MESSAGE_LIMIT_BYTES}) would drop these chunks",
            file=sys.stderr,
        )
    canary = tuple(g.strip() for g in (args.canary or "").split(",") if g.strip())
    try:
        targets = Targets(canary=canary, percent=args.percent, everyone=not canary and args.percent is None)
    except ValueError as exc:
        raise FleetError(str(exc)) from exc
    key = load_private_key(args.sign_key)
    with _client(args) as client:
        rel = publish_release(
            client, topics, args.bundle, key, targets,
            chunk_bytes=DEFAULT_CHUNK_BYTES if args.chunk_bytes is None else args.chunk_bytes,
        )  # fmt: skip
    _say(rel, "published")
    return 0


def _status(args) -> int:
    from gapcast.deploy.fleet import fleet_status, format_status

    _topics(args)  # a bad fleet name is a FleetError, before the broker is reached
    with _client(args) as client:
        rows = fleet_status(client, args.prefix, args.fleet)
    if args.json:
        print(json.dumps([{k: v for k, v in r.__dict__.items()} for r in rows], indent=1))
    elif not rows:
        print(f"no gateway of fleet {args.fleet} has reported on {args.prefix}/gateways/+/status|model")
    else:
        print(format_status(rows))
    return 0


def _promote(args) -> int:
    from gapcast.deploy.fleet import load_private_key, promote

    topics = _topics(args)
    key = load_private_key(args.sign_key)
    with _client(args) as client:
        rel = promote(client, topics, key)
    _say(rel, "promoted")
    return 0


def _rollback(args) -> int:
    from gapcast.deploy.fleet import load_private_key, rollback

    topics = _topics(args)
    key = load_private_key(args.sign_key)
    with _client(args) as client:
        rel = rollback(client, topics, key, args.to_version)
    _say(rel, "issued")
    return 0
