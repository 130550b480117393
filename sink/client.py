"""The sink's MQTT shell: a persistent QoS 1 subscription whose messages are acknowledged only after the write.

- subscribes to ``{prefix}/stations/+/filled``, ``.../revisions`` and ``.../forecast`` with QoS 1, a fixed client id
  and a persistent session (MQTT 5: ``clean_start = False`` + Session Expiry Interval; 3.1.1: ``clean_session =
  False``), so what the gateways publish while the sink is away waits at the broker;
- acknowledges (manual PUBACK, in arrival order) only after the batch is committed: a sink killed mid-stream gets
  every unacknowledged message again from the broker at its next start, and the stored ids drop what it had already
  written;
- a message that is not JSON, not valid against its schema or on an unknown topic is counted by reason, logged and
  acknowledged (it would come back forever otherwise); a store that refuses a write is retried with back-off, and
  nothing is acknowledged meanwhile.

Threads: paho's network thread runs the ``_on_*`` callbacks, which only queue; the caller's thread
(:meth:`SinkClient.run`) decodes, writes and acknowledges.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from gapcast.brokerurl import BrokerURL
from gapcast.edge.messages import Topics
from gapcast.sink import SinkError
from gapcast.sink.rows import Checker, Decoded, decode
from gapcast.sink.stores import SQLiteStore, Target

__all__ = ["SinkClient", "SinkOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SinkOptions:
    """How the sink subscribes and batches.

    Attributes:
        prefix: topic prefix (``gapcast/v1``).
        client_id: the fixed MQTT client id that names the persistent session (one per sink instance).
        mqtt_version: ``"5"`` or ``"3.1.1"``.
        session_expiry_s: MQTT 5 Session Expiry Interval, seconds: how long the broker keeps the session (and
            queues QoS 1 messages) while the sink is away.
        keepalive_s: MQTT keep-alive, seconds.
        batch_max: most messages per write transaction.
        receive_maximum: MQTT 5 Receive Maximum: the most unacknowledged QoS 1 messages the broker may send at
            once, which bounds the sink's memory when a backlog arrives (3.1.1 relies on the broker's own limit,
            Mosquitto's ``max_inflight_messages``).
        batch_wait_s: how long a batch waits for more messages after the first, seconds.
        validate: check every payload against its schema (``jsonschema``).
    """

    prefix: str = "gapcast/v1"
    client_id: str = "gapcast-sink"
    mqtt_version: str = "5"
    session_expiry_s: int = 7 * 86400
    keepalive_s: int = 30
    batch_max: int = 1000
    receive_maximum: int = 1000
    batch_wait_s: float = 0.05
    validate: bool = True


@dataclass
class _In:
    topic: str
    payload: bytes
    mid: int
    qos: int
    epoch: int


class SinkClient:
    """Subscribe, decode, store, acknowledge.

    Args:
        broker: where the broker is (``gapcast.brokerurl.parse_broker_url``).
        store: the SQLite state and store.
        targets: other targets written inside the same transaction (InfluxDB, CSV).
        options: :class:`SinkOptions`.
        wall: wall clock, seconds since the epoch (stamps stored ids); injectable in tests.
    """

    def __init__(
        self,
        broker: BrokerURL,
        store: SQLiteStore,
        targets: list[Target] | None = None,
        options: SinkOptions | None = None,
        *,
        wall=time.time,
    ) -> None:
        self.broker = broker
        self.store = store
        self.targets = list(targets or [])
        self.opt = options or SinkOptions()
        self.topics = Topics(self.opt.prefix)
        self.checker = Checker() if self.opt.validate else None
        self.wall = wall
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.epoch = 0  # connection counter: written by the network thread, read by the run thread
        self._q: queue.SimpleQueue[_In] = queue.SimpleQueue()
        self.client = self._build()

    def _build(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self.opt.mqtt_version == "5"
        kw: dict[str, Any] = {"client_id": self.opt.client_id, "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                              "manual_ack": True}
        if not v5:
            kw["clean_session"] = False
        c = mqtt.Client(CallbackAPIVersion.VERSION2, **kw)
        c.enable_logger(logging.getLogger("gapcast.sink.paho"))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            c.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(1, 30)
        return c

    @property
    def filters(self) -> list[str]:
        """The three subscription filters."""
        return [self.topics.output_filter(k) for k in ("filled", "revision", "forecast")]

    # -- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        """CONNACK. Runs on paho's network thread: subscribes (the session may already hold the subscription)."""
        if reason_code.is_failure:
            log.error("broker %s:%d refused the sink: %s", self.broker.host, self.broker.port, reason_code)
            return
        self.epoch += 1
        self.connected.set()
        log.info("sink connected to %s:%d (session present: %s)", self.broker.host, self.broker.port,
                 bool(getattr(flags, "session_present", False)))
        client.subscribe([(f, 1) for f in self.filters])

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        """SUBACK. Runs on paho's network thread."""
        bad = [str(rc) for rc in reason_code_list if rc.is_failure]
        if bad:
            log.error("subscriptions %s refused: %s", self.filters, bad)
        else:
            log.info("sink subscribed to %s (QoS 1)", ", ".join(self.filters))
            self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """Runs on paho's network thread; paho reconnects with back-off."""
        self.connected.clear()
        log.warning("sink disconnected from the broker: %s (reconnecting)", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        """Runs on paho's network thread: queued for the run thread, acknowledged there after the write."""
        self._q.put(_In(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self.epoch))

    # -- run thread ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect asynchronously (paho retries until the broker answers) and start the network thread."""
        kw: dict[str, Any] = {}
        if self.opt.mqtt_version == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(self.opt.session_expiry_s)
            props.ReceiveMaximum = int(self.opt.receive_maximum)
            kw = {"clean_start": False, "properties": props}
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.opt.keepalive_s, **kw)
        self.client.loop_start()

    def _reject(self, kind: str, why: str, topic: str) -> None:
        self.rejected[kind] += 1
        n = self.rejected[kind]
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th... of each kind
            log.warning("skipped a message on %s (%s: %s); %d of this kind so far", topic[:120], kind, why, n)

    def _decode(self, it: _In) -> Decoded | None:
        parsed = self.topics.output_of(it.topic)
        if parsed is None:
            self._reject("bad_topic", "not a filled/revisions/forecast topic", it.topic)
            return None
        kind = parsed[0]
        try:
            body = json.loads(it.payload)
        except (UnicodeDecodeError, ValueError) as exc:
            self._reject("bad_json", str(exc)[:120], it.topic)
            return None
        if self.checker is not None:
            problem = self.checker.problem(kind, body)
            if problem is not None:
                self._reject("bad_schema", problem, it.topic)
                return None
        try:
            return decode(kind, body)
        except (KeyError, TypeError, ValueError) as exc:
            self._reject("bad_schema", f"{type(exc).__name__}: {exc}", it.topic)
            return None

    def process(self, items: list[_In], batch: list[Decoded] | None = None) -> dict[str, int]:
        """Decode, store and acknowledge one batch (the run thread).

        Args:
            items: the received messages, in arrival order.
            batch: their decoded rows when a failed write is retried (decoded and counted once).

        Raises:
            SinkError: the store refused the batch (nothing acknowledged).
        """
        if batch is None:
            batch = self.decode_all(items)
        counts = self.store.apply(batch, self.wall(), self.targets) if batch else {}
        epoch = self.epoch
        for it in items:
            if it.qos > 0 and it.epoch == epoch:  # older deliveries come again after the reconnect
                self.client.ack(it.mid, it.qos)
        self.counters["received"] += len(items)
        self.counters.update(counts)
        return counts

    def decode_all(self, items: list[_In]) -> list[Decoded]:
        """The rows of every valid message (invalid ones are counted and logged here, once)."""
        return [d for d in (self._decode(it) for it in items) if d is not None]

    def _take(self, timeout_s: float) -> list[_In]:
        items: list[_In] = []
        try:
            items.append(self._q.get(timeout=timeout_s))
            deadline = time.monotonic() + self.opt.batch_wait_s
            while len(items) < self.opt.batch_max:
                left = deadline - time.monotonic()
                items.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
        except queue.Empty:
            pass
        return items

    def run(self, stop: threading.Event, *, idle_s: float = 0.2) -> int:
        """Run until ``stop`` is set, then disconnect (the session stays at the broker).

        Returns:
            0.
        """
        self.start()
        backoff = 1.0
        pending: list[_In] = []
        decoded: list[Decoded] = []
        try:
            while not stop.is_set():
                if not pending:
                    pending = self._take(idle_s)
                    decoded = self.decode_all(pending)
                if not pending:
                    continue
                try:
                    self.process(pending, decoded)
                    pending = []
                    backoff = 1.0
                except SinkError as exc:
                    self.counters["write_errors"] += 1
                    log.error("write of %d message(s) failed: %s; retrying in %.0f s (nothing acknowledged)",
                              len(pending), exc, backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            self.client.disconnect()
            self.client.loop_stop()
            for t in self.targets:
                t.close()
            self.store.close()
            log.info("sink stopped: %s; skipped %s", dict(self.counters), dict(self.rejected))
        return 0
