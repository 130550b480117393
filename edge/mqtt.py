"""The MQTT shell around the pure agent core: paho-mqtt 2.x, VERSION2 callbacks, QoS 1 in and out.

(Over 600 lines on purpose: one class whose paho callbacks (network thread) and step loop (main thread) share the
session, the in-flight window and the held readings; topics, parsing, payloads, the outbox, the clock watch and the
updater wiring live in their own modules.)

What it does (issue 5, docs/ARCHITECTURE.md "Contracts"):

- connects with MQTT 5 by default (3.1.1 selectable), a stable client id and a persistent session
  (MQTT 5: ``clean_start = False`` + Session Expiry Interval; 3.1.1: ``clean_session = False``), so QoS 1
  readings queued at the broker while the gateway was away are delivered after a reconnect;
- subscribes to ``{prefix}/stations/+/readings`` with QoS 1; inbound messages are acknowledged (manual PUBACK) only
  after the core has ingested them. Under MQTT 5 the subscription sets Retain Handling 2 ("do not send retained
  messages at subscribe"), so a reading a station published with the retain flag is never delivered to the agent
  from the broker's retained store: it is neither ingested nor dead-lettered (only readings published while the
  agent is subscribed, or queued in its persistent session, arrive). Under 3.1.1 retained readings are delivered and
  the core dead-letters them, each (topic, payload) once per run: the broker's re-sends after every reconnect are
  only counted (``retained_repeats``; :class:`~gapcast.edge.messages.RetainedFilter`, bounded memory);
- subscribes to the filter derived from ``input.topic`` (``Topics.readings_filter``) when a template is set;
- keeps a retained status on ``{prefix}/gateways/{gateway}/status`` with a Last Will that turns it ``offline``;
- reconnects with exponential back-off (``reconnect_min_s`` .. ``reconnect_max_s``), TLS with verification on by
  default, username/password; a failed connection attempt is logged as ONE warning naming ``host:port`` and the OS
  error, on attempts 1, 2, 4, 8... (:class:`ConnectFailureLog`; an attempt that TCP accepts but that never gets a
  CONNACK, a half-open link, counts as a failed attempt too), and paho's own per-loop "Client is not connected"
  error line is filtered out of the ``gapcast.edge.paho`` logger;
- every outgoing message goes through an outbox and leaves it only on the broker's PUBACK (``on_publish``);
- ticks run on ``time.monotonic()``, mapped to event time (:class:`EventClock`); a wall-clock correction beyond
  ``clock_step_s`` re-anchors it once, and a wall clock that is not believable (a sync probe says "not yet", or it
  reads earlier than the newest reading held) puts the agent in ``clock: unsynced``: readings are held, not rejected
  (``gapcast.edge.clock``, issue 18);
- a full disk (``gapcast.edge.outbox.OutboxFull``) never stops the agent: the outputs wait in memory, readings stay
  unacknowledged (the broker keeps them: QoS 1 back-pressure), no snapshot is taken, and everything is stored and
  acknowledged when space returns; a full disk at start-up starts the same way (status ``disk_full``);
- a broker that reports no session although this agent had one (a broker restarted with lost persistence) is a
  WARNING, a counter, a status field and a notice on ``{prefix}/gateways/{gateway}/notice``
  (``"schema": "gapcast/notice/1"``) with the time span whose readings are at risk.

Threads: paho's network thread (``loop_start``) runs every ``_on_*`` callback; they only put items on queues. The
main thread (:meth:`MqttAgent.run`) owns the core, the outbox writes and the publishing: the core is never touched
from two threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gapcast.edge.agent import AgentCore
from gapcast.edge.clock import DEFAULT_STEP_S, ClockWatch, EventClock, timesyncd_synced
from gapcast.edge.config import EdgeConfig
from gapcast.edge.messages import RetainedFilter, mark_replayed, offline_payload
from gapcast.edge.outbox import Outbox, OutboxFull
from gapcast.timefmt import format_rfc3339

__all__ = ["NOTICE_SCHEMA", "ConnectFailureLog", "EventClock", "MqttAgent", "make_outbox", "notice_topic"]

log = logging.getLogger(__name__)

#: The logger paho's own log lines are bridged to (``Client.enable_logger``).
PAHO_LOGGER = "gapcast.edge.paho"


class _PahoNoise(logging.Filter):
    """Drops paho's "Client is not connected" error, logged on every network-loop pass while the broker is away
    (the agent logs each failed attempt itself, with host, port and reason: :class:`ConnectFailureLog`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


class ConnectFailureLog:
    """Logs failed connection attempts as one WARNING with ``host:port`` and the OS error, at most once per back-off
    step: on the 1st, 2nd, 4th, 8th... consecutive failure (and whenever the error changes), so an outage of a day
    at ``reconnect_max_s = 60`` writes about 11 lines, not 1440. A successful connection resets it.

    Args:
        host, port: the broker, for the message.
        logger: where the warnings go.
    """

    def __init__(self, host: str, port: int, logger: logging.Logger = log) -> None:
        self.host = host
        self.port = port
        self.logger = logger
        self.failures = 0
        self._last_error = ""

    def failed(self, error: BaseException | str | None) -> bool:
        """One more failed attempt; returns whether it was logged."""
        self.failures += 1
        err = str(error) if error is not None else "unknown error"
        n = self.failures
        if n & (n - 1) == 0 or err != self._last_error:
            self._last_error = err
            self.logger.warning(
                "cannot connect to the broker %s:%d: %s (%d failed attempt(s); retrying with back-off)",
                self.host, self.port, err, n,
            )
            return True
        return False

    def connected(self) -> None:
        """The broker answered: the next outage starts counting from one again."""
        self.failures = 0
        self._last_error = ""


@dataclass
class _Inbound:
    topic: str
    payload: bytes
    retain: bool
    mid: int
    qos: int
    epoch: int


#: The schema of gateway notices (``{prefix}/gateways/{gateway}/notice``).
NOTICE_SCHEMA = "gapcast/notice/1"

#: While the outbox cannot store (full disk), a retry at most this often, seconds (monotonic).
_STORE_RETRY_S = 1.0


def notice_topic(status_topic: str) -> str:
    """The gateway's notice topic, beside its status topic: ``{prefix}/gateways/{gateway}/notice``."""
    return status_topic.rsplit("/", 1)[0] + "/notice"


@dataclass(frozen=True)
class _Notice:
    """A notice for the operator, stored in the outbox like any output (kind ``notice``: never dropped first)."""

    topic: str
    payload: bytes
    kind: str = "notice"
    qos: int = 1
    retain: bool = False
    msg_id: str = ""
    created_s: float = 0.0


def make_outbox(cfg: EdgeConfig) -> Outbox:
    """The outbox the config asks for: the durable SQLite one (``gapcast.edge.outbox``) or :class:`MemoryOutbox`.

    Raises:
        gapcast.edge.EdgeError: the SQLite outbox cannot be opened (a full disk does not raise: it starts degraded).
    """
    o = cfg.outbox
    if o.kind == "sqlite":
        from gapcast.edge.outbox import OutboxConfig, SQLiteOutbox

        path = cfg.agent.state_dir / "outbox.sqlite"
        return SQLiteOutbox(
            OutboxConfig(
                path=path,
                max_bytes=o.max_bytes,
                max_age_s=o.max_age_s,
                drop_order=o.drop_order,
                synchronous=o.synchronous,
                rate_per_s=o.rate_per_s,
                burst=o.burst,
                min_free_bytes=o.min_free_bytes,
            )
        )
    from gapcast.edge.outbox_memory import MemoryOutbox

    return MemoryOutbox(max_bytes=o.max_bytes, drop_order=o.drop_order)


class MqttAgent:
    """The gateway process: the core, an outbox and a paho client.

    Args:
        cfg: the gateway configuration.
        core: the pure agent core (built from the verified bundle's card).
        outbox: where outgoing messages wait for their PUBACK (:class:`gapcast.edge.outbox.Outbox`).
        wall: wall clock (seconds since the epoch): anchors :class:`EventClock` and is watched for corrections
            (:class:`gapcast.edge.clock.ClockWatch`); injectable in tests.
        mono: monotonic clock, seconds; injectable in tests.
        snapshot_path: where window snapshots go (None: ``state_dir/windows.npz``; "" disables them).
        update_link: fleet model updates (``gapcast.edge.guard.UpdateLink``), or None.
        metrics: the Prometheus exporter (``gapcast.edge.metrics.Metrics``); None: built from ``[metrics]`` when
            ``metrics.listen`` is set.
        notifier: systemd notification (``gapcast.edge.sdnotify.Notifier``); None: from ``NOTIFY_SOCKET``, a no-op
            without it. READY once the step loop runs, WATCHDOG from the step loop, STATUS on (dis)connects.
        clock_probe: a sync probe, True/False/None (unknown); default: systemd-timesyncd's flag file.
        clock_step_s: a wall/event difference beyond this is a wall-clock correction, seconds.
    """

    def __init__(
        self,
        cfg: EdgeConfig,
        core: AgentCore,
        outbox: Outbox,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        snapshot_path: str | None = None,
        update_link: Any = None,
        metrics: Any = None,
        notifier: Any = None,
        clock_probe: Callable[[], bool | None] = timesyncd_synced,
        clock_step_s: float = DEFAULT_STEP_S,
    ) -> None:
        self.cfg = cfg
        if metrics is None and cfg.metrics.listen:
            from gapcast.edge.metrics import Metrics

            metrics = Metrics(
                cfg.metrics.listen, gateway=cfg.gateway_id, fleet=cfg.fleet, station_labels=cfg.metrics.station_labels
            )
        self.metrics = metrics
        if notifier is None:
            from gapcast.edge.sdnotify import Notifier

            notifier = Notifier()
        self.notifier = notifier
        self._round_s = 0.0  # seconds spent closing steps since the last round line (main thread)
        #: Passes of the step loop so far (main thread writes; a test or a watchdog reads it to know the loop ran).
        self.loop_passes = 0
        self.update_link = update_link
        self.core = core
        self.outbox = outbox
        self.mono = mono
        self.wall = wall
        self.clock = EventClock(wall(), mono())
        self.clock_watch = ClockWatch(self.clock, clock_step_s)
        self._clock_probe = clock_probe
        self._probe_cache: tuple[float, bool | None] = (-float("inf"), None)
        self.started_mono = mono()
        self._inbound: queue.SimpleQueue[_Inbound] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[tuple[int, bool, str]] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[str | tuple[str, dict]] = queue.SimpleQueue()
        self._pending: dict[int, int] = {}  # paho mid -> outbox id, owned by the main thread
        self._pending_lock = threading.Lock()
        self.connected = threading.Event()
        self.epoch = 0  # connection counter; written by the network thread, read by the main thread
        # Outputs created before the last CONNACK (event time, s) are a backlog: flushed with "replayed": true.
        self.replay_before_s = float("-inf")  # written by the network thread, read by the main thread
        self.counters: Counter = Counter()
        self._retained = RetainedFilter()  # 3.1.1 re-sends retained readings on every reconnect: dead-letter once
        self._retained_logged_epoch = -1
        self._connack = False  # the current connection got a CONNACK (network thread)
        # Outputs (and journal entries) the outbox could not store (full disk) and the readings behind them, which
        # are acknowledged only once those are stored. Main thread only.
        self._unstored: list = []
        self._unjournaled: list[tuple] = []
        self._unacked: list[_Inbound] = []
        self._store_retry_mono = -float("inf")
        # Broker sessions (network thread writes, main thread reads): lost ones are told (issue 18).
        self._had_session = False
        self._last_up_wall: float | None = None  # wall clock when the connection was last known good
        self._session: dict[str, Any] = {"lost": 0, "last_lost": None}
        self.client = self._build_client()
        self.snapshots = None
        self.snapshots_state = "off"  # "on", "off" (disabled), or "off: <why>" (shown in the status)
        # A durable outbox also journals the core's inputs (issue 6): replayed after a crash on top of the snapshot.
        self._journal = bool(outbox.durable)
        path = snapshot_path if snapshot_path is not None else str(cfg.agent.state_dir / "windows.npz")
        self._deferred_snapshot_path: str | None = None
        if path:
            if outbox.ready:
                self._setup_snapshots(path)
            else:  # a full disk at start-up: restore the windows and replay the journal once the outbox opens
                self._deferred_snapshot_path = path
                self.snapshots_state = "off: waiting for the outbox (disk full)"

    # -- set-up ----------------------------------------------------------------------------------------------

    def _build_client(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        b = self.cfg.broker
        v5 = b.mqtt_version == "5"
        kwargs: dict[str, Any] = {
            "client_id": self.cfg.client_id,
            "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            "manual_ack": True,
        }
        if not v5:
            kwargs["clean_session"] = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        paho_log = logging.getLogger(PAHO_LOGGER)
        if not any(isinstance(f, _PahoNoise) for f in paho_log.filters):
            paho_log.addFilter(_PahoNoise())
        client.enable_logger(paho_log)
        self._connect_failures = ConnectFailureLog(b.host, b.port)
        client.on_connect_fail = self._on_connect_fail
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.will_set(
            self.core.topics.status,
            offline_payload(self.cfg.gateway_id, "connection lost", fleet=self.cfg.fleet),
            qos=1,
            retain=True,
        )
        if b.username:
            client.username_pw_set(b.username, b.password)
        if b.tls.enabled:
            client.tls_set(
                ca_certs=str(b.tls.ca_file) if b.tls.ca_file else None,
                certfile=str(b.tls.cert_file) if b.tls.cert_file else None,
                keyfile=str(b.tls.key_file) if b.tls.key_file else None,
                cert_reqs=ssl.CERT_NONE if b.tls.insecure else ssl.CERT_REQUIRED,
            )
            if b.tls.insecure:
                client.tls_insecure_set(True)
                log.warning("TLS verification of the broker %s:%d is OFF (mqtt.tls.tls_insecure = true)", b.host, b.port)
        client.reconnect_delay_set(min_delay=b.reconnect_min_s, max_delay=b.reconnect_max_s)
        client.max_inflight_messages_set(b.max_inflight)
        if self.update_link is not None:
            self.update_link.attach(client)
        return client

    def _setup_snapshots(self, path: str) -> None:
        try:
            from gapcast.edge.state import SnapshotScheduler, StationState, load_snapshot, replay_journal
        except ImportError as exc:  # numpy-only module: missing only in a broken install; said, never silent
            self.snapshots_state = f"off: gapcast.edge.state cannot be imported ({exc})"
            self.counters["snapshot_import_errors"] += 1
            log.error("window snapshots are OFF: gapcast.edge.state cannot be imported: %s", exc)
            return
        snap = load_snapshot(path, expect_meta=self.core.state_meta())
        if snap is not None:
            n = self.core.restore_state({k: (s.arrays, s.meta) for k, s in snap.stations.items()})
            log.info("restored %d station window(s) from %s", n, path)
        if self._journal:
            since = int(snap.meta.get("journal_seq", 0)) if snap is not None else 0
            replay_journal(self.core, self.outbox.journal_entries(since))

        def collect():
            st = {k: StationState(arrays=a, meta=m) for k, (a, m) in self.core.export_state().items()}
            meta = self.core.state_meta()
            if self._journal:
                meta["journal_seq"] = self.outbox.journal_seq()
            return st, meta

        def saved(meta):
            if self._journal:
                self.outbox.journal_truncate(int(meta["journal_seq"]))

        self.snapshots = SnapshotScheduler(
            path, collect, interval_s=self.cfg.agent.snapshot_interval_s, on_saved=saved
        )
        self.snapshots_state = "on"

    def _store(self, out: list, journal: list[tuple]) -> None:
        """Put outputs in the outbox; a journaling outbox also records, in the same transaction, the core inputs
        ``(op, now_s, topic, payload, retained)`` that produced them (main thread).

        Raises:
            OutboxFull: nothing was stored (the caller keeps them: :meth:`_store_or_hold`).
        """
        if self._journal and self.snapshots is not None:
            self.outbox.put_many(out, journal=journal)
        elif out:
            self.outbox.put_many(out)
        if self.metrics is not None and out:
            self.metrics.count_outputs(out)

    def _store_or_hold(self, out: list, journal: list[tuple], items: list[_Inbound]) -> bool:
        """Store outputs and acknowledge the readings behind them; on a full disk keep all three in memory (the
        readings unacknowledged, so the broker keeps them) and retry with :meth:`_retry_unstored`. Main thread.

        Returns:
            Whether everything (held ones included) is stored now.
        """
        if self._unstored or self._unjournaled or self._unacked:
            self._unstored += out
            self._unjournaled += journal
            self._unacked += items
            return self._retry_unstored(force=True)
        try:
            self._store(out, journal)
        except OutboxFull as exc:
            self._unstored, self._unjournaled, self._unacked = list(out), list(journal), list(items)
            self._store_retry_mono = self.mono()
            self.counters["store_blocked"] += 1
            log.error(
                "outbox full (%s): holding %d output(s) in memory and NOT acknowledging %d reading(s) (the broker keeps "
                "them); no step closes until space returns", exc, len(out), len(items),
            )
            return False
        self._ack_inbound(items)
        return True

    def _retry_unstored(self, force: bool = False) -> bool:
        """Try again to store what a full disk held back (at most every second unless ``force``)."""
        if not (self._unstored or self._unjournaled or self._unacked):
            return True
        mono = self.mono()
        if not force and mono - self._store_retry_mono < _STORE_RETRY_S:
            return False
        self._store_retry_mono = mono
        try:
            self._store(self._unstored, self._unjournaled)
        except OutboxFull:
            return False
        n_out, items = len(self._unstored), self._unacked
        self._unstored, self._unjournaled, self._unacked = [], [], []
        self._ack_inbound(items)
        log.warning("outbox writable again: stored %d held output(s), acknowledged %d reading(s)", n_out, len(items))
        return True

    def _ack_inbound(self, items: list[_Inbound]) -> None:
        """PUBACK readings whose outputs are stored (those of an earlier connection are re-sent by the broker)."""
        epoch = self.epoch
        for it in items:
            if it.qos > 0 and it.epoch == epoch:
                self.client.ack(it.mid, it.qos)

    def _blocked(self) -> str:
        """Why the core must not take inputs now ("" when it may): the clock is not believable, or the outbox
        cannot store (full disk). Readings then stay queued and unacknowledged. Main thread."""
        if self._deferred_snapshot_path is not None:
            if not self.outbox.ready:
                return "disk_full"
            path, self._deferred_snapshot_path = self._deferred_snapshot_path, None
            log.warning("outbox opened: restoring the windows and replaying the journal now")
            self._setup_snapshots(path)
        if not self._retry_unstored():
            return "disk_full"
        if not self.clock_watch.synced:
            return "clock_unsynced"
        return ""

    def _watch_clock(self) -> None:
        """Compare the wall clock with the event clock (:class:`ClockWatch`): re-anchor on a correction, turn
        ``unsynced`` when it is not believable. Main thread, every loop."""
        m0 = self.mono()
        wall = self.wall()
        m1 = self.mono()
        if m1 - m0 > self.clock_watch.step_s / 4:  # the reading pair was interrupted: not comparable
            return
        real = time.monotonic()  # the probe reads a file: at most once a second of real time
        if real - self._probe_cache[0] >= 1.0 or real < self._probe_cache[0]:
            self._probe_cache = (real, self._clock_probe() if self._clock_probe is not None else None)
        wm = self.core.watermark_s
        floor = wm - self.cfg.input.max_future_s if wm is not None else None
        verdict = self.clock_watch.observe(wall, (m0 + m1) / 2, probe=self._probe_cache[1], floor_s=floor)
        if verdict.shift_s:
            self.counters["clock_corrections"] += 1

    def _put_status(self) -> None:
        """The status through the outbox; straight to paho when the outbox cannot store it (full disk)."""
        msg = self._status()
        try:
            self.outbox.put(msg)
        except OutboxFull:
            self._publish_direct(msg)

    def _publish_direct(self, msg: Any) -> None:
        """Hand a message to paho without the outbox (QoS 1; lost if the process dies first). Main thread."""
        if self.connected.is_set():
            self.client.publish(msg.topic, msg.payload, qos=1, retain=bool(msg.retain))
            self.counters["published_direct"] += 1

    # -- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        """CONNACK arrived. Runs on paho's network thread: subscribes and tells the main thread."""
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self.epoch += 1
        self._connack = True
        self.replay_before_s = self.now()
        self._connect_failures.connected()
        self.connected.set()
        present = bool(flags.session_present)
        log.info("connected to %s:%d (session present: %s)", self.cfg.broker.host, self.cfg.broker.port, present)
        now_wall = self.wall()
        if self._had_session and not present:
            since = self._last_up_wall if self._last_up_wall is not None else now_wall
            lost = {"from": format_rfc3339(since), "to": format_rfc3339(now_wall), "epoch_from_s": round(since, 3),
                    "epoch_to_s": round(now_wall, 3)}
            log.warning(
                "broker %s:%d has NO session for this agent although it had one (persistence lost?): readings it "
                "acknowledged between %s and %s may be lost; re-send them from the stations or the cloud",
                self.cfg.broker.host, self.cfg.broker.port, lost["from"], lost["to"],
            )
            self._events.put(("session_lost", lost))
        self._had_session = True
        self._last_up_wall = None
        if self.cfg.broker.mqtt_version == "5":
            from paho.mqtt.subscribeoptions import SubscribeOptions

            opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            client.subscribe(self.core.topics.readings_filter, options=opts)
        else:
            client.subscribe(self.core.topics.readings_filter, qos=1)
        if self.update_link is not None:  # the fleet's retained release manifest comes with this subscription
            self.update_link.on_connect(client)
        self._events.put("connected")

    def _on_connect_fail(self, client, userdata) -> None:
        """A connection attempt failed before CONNACK (refused, unreachable, DNS, TLS). Runs on paho's network thread
        inside paho's ``except OSError``, so the error is the one being handled."""
        import sys

        self._connect_failures.failed(sys.exc_info()[1])

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        """SUBACK arrived. Runs on paho's network thread: logs a refused subscription."""
        for rc in reason_code_list:
            if rc.is_failure:
                log.error("subscription to %s refused: %s", self.core.topics.readings_filter, rc)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """The connection dropped or was closed. Runs on paho's network thread; paho reconnects with back-off."""
        if self.connected.is_set():  # a dead link is noticed up to 1.5 keep-alives late: the span starts earlier
            self._last_up_wall = self.wall() - 1.5 * self.cfg.broker.keepalive_s
        self.connected.clear()
        if self._connack:
            self._connack = False
            log.warning("disconnected from the broker: %s (reconnecting with back-off)", reason_code)
        else:  # a half-open link: TCP connected, no CONNACK within keepalive; rate-limited like a refused attempt
            self._connect_failures.failed(
                f"closed before an accepted CONNACK ({reason_code}; keepalive {self.cfg.broker.keepalive_s} s)"
            )
        self._events.put("disconnected")

    def _on_message(self, client, userdata, msg) -> None:
        """A reading arrived. Runs on paho's network thread: queued for the main thread (acked after ingest).
        Fleet release messages go to the updater (which only collects and hash-checks them on this thread)."""
        if self.update_link is not None and self.update_link.handles(msg.topic):
            self.update_link.on_message(client, msg, manual_ack=True)
            return
        self._inbound.put(_Inbound(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos, self.epoch))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """PUBACK (or local completion) of an outgoing message. Runs on paho's network thread: queued for the
        main thread, which acks the outbox (MQTT 5 failure reason codes are counted and logged there)."""
        self._acks.put((mid, bool(reason_code.is_failure), str(reason_code)))

    # -- main thread -----------------------------------------------------------------------------------------

    def now(self) -> float:
        """Event time from the monotonic clock."""
        return self.clock.now(self.mono())

    def start(self) -> None:
        """Connect (asynchronously; paho retries until the broker answers) and start the network thread."""
        b = self.cfg.broker
        kw: dict[str, Any] = {}
        if b.mqtt_version == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry_s
            kw = {"clean_start": False, "properties": props}
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive_s, **kw)
        self.client.loop_start()

    def _handle_events(self) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            if ev == "connected":
                self.counters["connects"] += 1
                self._put_status()
            elif isinstance(ev, tuple) and ev[0] == "session_lost":
                self._session_lost(ev[1])
                continue
            b = self.cfg.broker
            self.notifier.status(
                f"{'connected to' if ev == 'connected' else 'disconnected from'} {b.host}:{b.port}; "
                f"{len(self.core.windows)} stations; {self.core.counters['filled']:,} steps filled; backend {self.core.backend.name}"
            )


    def _session_lost(self, span: dict) -> None:
        """The broker forgot this agent's session: count it, show it in the status and tell the operator on the
        notice topic which span of readings is at risk (main thread)."""
        self.counters["sessions_lost"] += 1
        self._session["lost"] += 1
        self._session["last_lost"] = span
        body = {
            "schema": NOTICE_SCHEMA,
            "gateway": self.cfg.gateway_id,
            "kind": "session_lost",
            "reason": "the broker reported no session for this agent although it had one (its persistence was lost): "
            "readings it acknowledged to the stations in this span and had not delivered may be gone; re-send them",
            "at_risk": {"from": span["from"], "to": span["to"]},
            "broker": f"{self.cfg.broker.host}:{self.cfg.broker.port}",
            "ts": format_rfc3339(self.wall()),
        }
        note = _Notice(notice_topic(self.core.topics.status), json.dumps(body, sort_keys=True).encode(),
                       msg_id=f"{self.cfg.gateway_id}/session_lost/{span['epoch_to_s']}")
        try:
            self.outbox.put(note)
        except OutboxFull:
            self._publish_direct(note)
        self._put_status()

    def _status_extra(self) -> dict[str, Any]:
        ob = self.outbox.stats()
        clk = self.clock_watch.status()
        extra = {
            "connected": self.connected.is_set(),
            "uptime_s": round(self.mono() - self.started_mono, 1),
            "shell": dict(self.counters),
            "outbox": ob,
            "wall_clock": clk,
            "disk_full": bool(ob.get("disk_full")) or bool(self._unstored or self._unjournaled or self._unacked),
            "free_bytes": ob.get("free_bytes"),
            "held": {"outputs": len(self._unstored), "readings": len(self._unacked) + self._inbound.qsize()},
            "session": dict(self._session),
            "snapshots": self.snapshots_state,
        }
        if clk["state"] == "unsynced":
            extra["clock"] = "unsynced"  # over the core's closing-clock mode while the wall clock is not believable
        if self.update_link is not None:
            extra["update"] = self.update_link.updater.status()
        if self.metrics is not None:
            extra["metrics"] = self.metrics.status()
        return extra

    def _status(self):
        return self.core.status(self.now(), self._status_extra())

    def _update_metrics(self) -> None:
        """Hand the status figures to the Prometheus exporter (main thread; scrapes read only this copy)."""
        if self.metrics is not None:
            body = self.core.status_body()
            body.update(self._status_extra())
            self.metrics.update(body)

    def _log_round(self) -> None:
        """The round's one INFO line (the per-station lines are DEBUG on ``gapcast.edge.steps``)."""
        r = self.core.take_round()
        if r["steps"] or r["revisions"]:
            rev = f", {r['revisions']:,} revision(s)" if r["revisions"] else ""
            log.info(
                "closed %s steps for %s stations in %.2f s, %s imputed, %s fallback%s",
                f"{r['steps']:,}", f"{r['stations']:,}", self._round_s, f"{r['imputed']:,}", f"{r['fallback']:,}", rev,
            )
        self._round_s = 0.0

    def _drain(self, timeout_s: float, max_n: int = 5000) -> int:
        """Ingest up to ``max_n`` queued readings (waiting at most ``timeout_s`` for the first). While
        :meth:`_blocked` (clock not believable, full disk) nothing is taken: the readings stay queued, unacknowledged.

        Group commit: every reading drained here, the tick they make due and all their outputs go into ONE outbox
        transaction (one fsync); the readings are acknowledged after it committed."""
        if self._blocked():
            time.sleep(max(min(timeout_s, 0.05), 0.0))
            return 0
        items: list[_Inbound] = []
        try:
            items.append(self._inbound.get(timeout=max(timeout_s, 0.0)) if timeout_s > 0 else self._inbound.get_nowait())
            while len(items) < max_n:
                items.append(self._inbound.get_nowait())
        except queue.Empty:
            pass
        if not items:
            return 0
        t0 = time.perf_counter()
        out = []
        now = self.now()
        journal = []
        for it in items:
            if it.retain and not self._retained.first_time(it.topic, it.payload):
                self.counters["retained_repeats"] += 1  # dead-lettered once already; acked below, not ingested
                if self._retained_logged_epoch != it.epoch:
                    self._retained_logged_epoch = it.epoch
                    log.info("the broker re-sent retained readings already dead-lettered: counted as retained_repeats")
                continue
            try:
                out += self.core.ingest(it.topic, it.payload, now, retained=it.retain)
            except Exception:  # a bug must not kill the gateway on one message: log it, count it, go on
                self.counters["internal_errors"] += 1
                log.exception("ingest failed on a message from %s (%d bytes)", it.topic[:120], len(it.payload))
            journal.append(("ingest", now, it.topic, it.payload, it.retain))
            # A full-speed burst can make steps due many times over: close them as we go, batched per drain.
        if self.core.has_due:
            out += self.core.tick(now)
            journal.append(("tick", now, "", b"", False))
        self._round_s += time.perf_counter() - t0
        # Inbound PUBACKs only after the outputs are stored: a crash before this re-delivers the readings.
        self._store_or_hold(out, journal, items)
        self.counters["inbound"] += len(items)
        return len(items)

    def _process_acks(self) -> None:
        while True:
            try:
                mid, failed, rc = self._acks.get_nowait()
            except queue.Empty:
                return
            with self._pending_lock:
                oid = self._pending.pop(mid, None)
            if oid is None:
                continue
            if failed:
                self.counters["publish_refused"] += 1
                log.error("broker refused an outgoing message (reason %s); dropped from the outbox", rc)
            self.outbox.ack(oid)

    def _pump(self) -> int:
        """Hand outbox messages to paho while there is room in the in-flight window."""
        if not self.connected.is_set():
            return 0
        room = self.cfg.broker.max_inflight - len(self._pending)
        if room <= 0:
            return 0
        bucket = self.outbox.bucket
        if bucket is not None:
            room = bucket.take(room, self.mono())
            if room <= 0:
                return 0
        batch = self.outbox.next_batch(room)
        import paho.mqtt.client as mqtt

        sent = 0
        cutoff = self.replay_before_s
        for oid, m in batch:
            payload = m.payload
            # A backlog from an outage (or the previous run) is marked, the status (a current state) is not.
            if m.kind != "status" and 0 < getattr(m, "created_s", 0.0) < cutoff:
                payload = mark_replayed(payload)
                self.counters["replayed"] += 1
            info = self.client.publish(m.topic, payload, qos=m.qos, retain=m.retain)
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho queued it for reconnect
                with self._pending_lock:
                    self._pending[info.mid] = oid
                sent += 1
            else:
                self.outbox.release([oid])
                self.counters["publish_errors"] += 1
                log.error("publish of %s failed locally (%s); will retry", m.topic, mqtt.error_string(info.rc))
        self.counters["published"] += sent
        return sent

    def run(self, stop: threading.Event, *, drain_timeout_s: float = 5.0) -> int:
        """Run until ``stop`` is set; then publish a clean "offline" status, snapshot and close.

        Args:
            stop: set it (e.g. from a SIGTERM handler) to stop.
            drain_timeout_s: how long shutdown waits for outstanding PUBACKs, seconds.

        Returns:
            0.
        """
        a = self.cfg.agent
        if self.metrics is not None:
            self.metrics.start()
            self.metrics.wrap_backend(self.core)
        self.start()
        next_tick = self.mono()
        next_status = self.mono() + a.status_interval_s
        b = self.cfg.broker
        self.notifier.ready(f"serving {len(self.core.windows)} stations; connecting to {b.host}:{b.port}")
        try:
            while not stop.is_set():
                self._watch_clock()
                mono = self.mono()
                # From the step loop only: a hung step (a stuck backend call) stops the pings and systemd restarts us.
                self.notifier.watchdog(mono)
                wait = min(max(next_tick - mono, 0.0), 0.05)
                self._drain(wait)
                self._handle_events()
                mono = self.mono()
                blocked = self._blocked()
                if mono >= next_tick and not blocked:  # no step closes on a clock that is not believable
                    now = self.clock.now(mono)
                    t0 = time.perf_counter()
                    out = self.core.tick(now)
                    self._round_s += time.perf_counter() - t0
                    if out:
                        self._store_or_hold(out, [("tick", now, "", b"", False)], [])
                    next_tick = mono + a.tick_interval_s
                    self._update_metrics()
                self._log_round()
                if mono >= next_status:
                    self._put_status()
                    if (skill := self.core.skill_message(self.now())) is not None:  # retained rolling skill
                        try:
                            self.outbox.put(skill)
                        except OutboxFull:  # full disk: the status says so; the skill waits for the next interval
                            self.counters["skill_unstored"] += 1
                    next_status = mono + a.status_interval_s
                self._process_acks()
                self._pump()
                if self.snapshots is not None and not blocked:  # never a snapshot ahead of what is stored
                    self.snapshots.maybe_save(mono)
                self.loop_passes += 1
        finally:
            self.shutdown(drain_timeout_s)
        return 0

    def shutdown(self, drain_timeout_s: float = 5.0) -> None:
        """Flush what the broker will take within ``drain_timeout_s``, publish ``offline`` (retained), disconnect,
        snapshot the windows and close the outbox."""
        self.notifier.stopping("stopping: flushing the outbox")
        deadline = self.mono() + drain_timeout_s
        while self.connected.is_set() and self.mono() < deadline and (len(self.outbox) or self._pending):
            self._process_acks()
            self._pump()
            time.sleep(0.02)
        if self.connected.is_set():
            info = self.client.publish(
                self.core.topics.status,
                offline_payload(self.cfg.gateway_id, "shutdown", fleet=self.cfg.fleet),
                qos=1,
                retain=True,
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=max(deadline - self.mono(), 1.0))
        self.client.disconnect()
        self.client.loop_stop()
        if self.update_link is not None and self.update_link.updater is not None:
            self.update_link.updater.close(timeout_s=0)  # stop the chunk re-request timer; a staging worker is a daemon
        if not self._retry_unstored(force=True):
            # Not stored: no snapshot either, so after the restart the journal on disk and the broker's re-delivery
            # of the unacknowledged readings rebuild exactly these outputs.
            log.error(
                "stopping with %d output(s) not stored (disk full): %d reading(s) stay unacknowledged at the broker "
                "and are processed again after the restart", len(self._unstored), len(self._unacked),
            )
        elif self.snapshots is not None:
            self.snapshots.save_now()
        self.outbox.close()
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()
        log.info("stopped: %s", dict(self.core.counters))
