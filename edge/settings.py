"""The gateway configuration's value types: frozen dataclasses, one per ``edge.toml`` table.

:mod:`gapcast.edge.config` parses and validates the TOML into these (and re-exports them, so
``from gapcast.edge.config import EdgeConfig`` keeps working); this module holds only the types and their defaults,
so code that passes a configuration around need not import the parser. Every option is shown in
``deploy/edge.example.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gapcast.edge.messages import DEFAULT_READINGS_TOPIC
from gapcast.edge.outbox import OutboxConfig

__all__ = [
    "BACKENDS",
    "VARIANTS",
    "DEFAULT_PREFIX",
    "AgentSettings",
    "BrokerSettings",
    "EdgeConfig",
    "InputSettings",
    "LogSettings",
    "MetricsSettings",
    "ModelSettings",
    "OutboxSettings",
    "SkillConfig",
    "StationSettings",
    "TLSSettings",
    "UpdateSettings",
]


DEFAULT_PREFIX = "gapcast/v1"
#: Backend preferences ``model.backend`` accepts (``auto`` = TensorRT, then onnxruntime, then interpolation).
BACKENDS = ("auto", "tensorrt", "onnxruntime", "interpolation")
#: Values of ``model.variant`` (``auto`` = timed on the gateway; a name pins that bundle variant).
VARIANTS = ("auto", "fp32", "int8_cpu", "int8_qdq")




@dataclass(frozen=True)
class TLSSettings:
    """TLS towards the broker.

    Attributes:
        enabled: use TLS (port 8883 by convention).
        ca_file: CA bundle that signed the broker's certificate (None: the system's trust store).
        cert_file, key_file: client certificate and key for mutual TLS (both or neither).
        insecure: skip certificate and host-name verification. Off by default; logged as a warning when on.
    """

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class BrokerSettings:
    """The MQTT connection.

    Attributes:
        host, port: the broker.
        mqtt_version: ``"5"`` (default) or ``"3.1.1"``.
        client_id: MQTT client id; must be stable across restarts for the persistent session to survive.
        keepalive_s: MQTT keepalive, seconds.
        session_expiry_s: MQTT 5 Session Expiry Interval, seconds: how long the broker keeps this client's
            subscriptions and queued QoS 1 readings while it is away. With 3.1.1, ``clean_session = false``.
        username, password: broker authentication (``password_file`` in TOML reads the password from a file).
        tls: see :class:`TLSSettings`.
        reconnect_min_s, reconnect_max_s: reconnect back-off bounds, seconds (doubling from min up to max).
        max_inflight: QoS 1 messages published and not yet acknowledged at once.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    mqtt_version: str = "5"
    client_id: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSSettings = field(default_factory=TLSSettings)
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    max_inflight: int = 100


@dataclass(frozen=True)
class StationSettings:
    """Which stations the gateway serves.

    Attributes:
        names: the configured stations (empty with ``auto_register``: any station that publishes is served).
        auto_register: accept readings from stations not listed, up to ``max_stations`` in total.
        max_stations: hard cap on the number of station windows (memory bound); readings from more are rejected.
        coordinates: station -> (lat, lon) degrees (``[stations.coordinates] NAME = [lat, lon]``): a station not
            in a context model's neighbour list gets its nearest neighbours by distance (issue 20).
    """

    names: tuple[str, ...] = ()
    auto_register: bool = False
    max_stations: int = 1000
    coordinates: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSettings:
    """The model bundle and the inference backend.

    Attributes:
        bundle: the bundle directory or ``.tar`` (None: no model; the agent fills by interpolation / LOCF).
        trusted_keys: Ed25519 public keys (PEM files or 64 hex characters) the bundle's signature must verify under.
        backend: ``auto``, ``tensorrt``, ``onnxruntime`` or ``interpolation``.
        threads: CPU threads for onnxruntime (0: its default).
        max_batch: most windows per backend call; larger batches are split.
        variant: onnxruntime variant: ``auto`` (time the gated variants on this gateway at start and after an
            update, run the fastest: :mod:`gapcast.edge.variant`) or a variant name that pins it (``fp32``,
            ``int8_cpu``, ...).
        variant_budget_s: time bound of that choice, seconds (loading and timed runs together).
    """

    bundle: Path | None = None
    trusted_keys: tuple[str, ...] = ()
    backend: str = "auto"
    threads: int = 0
    max_batch: int = 64
    variant: str = "auto"
    variant_budget_s: float = 3.0


@dataclass(frozen=True)
class InputSettings:
    """Incoming readings: time rules, missing-value markers and limits.

    Attributes:
        lateness_s: a reading for an already closed step is still accepted (and the step revised) while the
            station's newest time is at most this far past the step's end, seconds. Also the grace after a step's
            end before a silent station's step is closed on the clock.
        max_future_s: readings stamped more than this ahead of the gateway clock are rejected, seconds.
        sentinels: values that mean "missing" (e.g. -200, -9999), compared exactly.
        max_payload_bytes: larger payloads are rejected before parsing.
        max_json_depth: deeper JSON nesting is rejected.
        unknown_channels: ``ignore`` (default: counted per channel in the status, the rest of the reading used; a
            message with no known channel at all is dead-lettered) or ``reject`` (the whole reading).
        topic: the readings topic template: ``{prefix}/stations/{station}/readings`` (one JSON reading per message)
            or one with ``{channel}`` such as ``sensors/{station}/{channel}`` (one value per message: a bare number
            or ``{"value": x, "ts": t}``; without ``ts`` the gateway's arrival time is the event time).
        aliases: name a station sends -> the model channel it feeds (checked against the bundle's card).
        scale: name as sent -> factor its values are multiplied by (unit conversion, e.g. mg/m3 -> ug/m3: 1000).
        epoch: numeric timestamps: ``auto`` (by magnitude: epoch seconds or milliseconds), ``s`` or ``ms``.
        max_keys: most keys one JSON object of a reading may hold.
        aggregate: rule for several readings of one channel inside one step, ``mean``, ``last`` or ``sum``
            (None: the bundle card's rule when it has one, else ``mean``).
        channel_aggregate: model channel -> rule, overriding ``aggregate`` and the card for that channel.
    """

    lateness_s: float = 300.0
    max_future_s: float = 300.0
    sentinels: tuple[float, ...] = (-200.0, -9999.0)
    max_payload_bytes: int = 16384
    max_json_depth: int = 8
    unknown_channels: str = "ignore"
    topic: str = DEFAULT_READINGS_TOPIC
    aliases: dict[str, str] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    epoch: str = "auto"
    max_keys: int = 1024
    aggregate: str | None = None
    channel_aggregate: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentSettings:
    """Policy and housekeeping of the agent core and shell.

    Attributes:
        clock: ``gateway`` (silent stations' steps close on the gateway's monotonic clock) or ``readings`` (they
            close when the newest reading of any station passes them: for replays of recorded data).
        max_missing_share: a window with a larger share of missing values gets no forecast (a status says why).
        tick_interval_s: how often the shell runs the core's clock tick, seconds (monotonic).
        status_interval_s: how often the retained status message is refreshed, seconds.
        state_dir: folder for the outbox database and the window snapshots.
        snapshot_interval_s: window-state snapshot period, seconds (monotonic).
    """

    clock: str = "gateway"
    max_missing_share: float = 0.5
    tick_interval_s: float = 1.0
    status_interval_s: float = 30.0
    state_dir: Path = Path("state")
    snapshot_interval_s: float = 60.0


@dataclass(frozen=True)
class OutboxSettings:
    """The outbox every outgoing message passes through (the SQLite one in ``gapcast.edge.outbox``).

    Attributes:
        kind: ``sqlite`` (durable, default) or ``memory`` (tests, or a gateway without writable storage).
        max_bytes: cap on stored messages, bytes.
        max_age_s: messages older than this are dropped as expired, seconds (0: never).
        drop_order: kinds dropped first when full, oldest first.
        synchronous: SQLite ``PRAGMA synchronous`` (``FULL`` survives power loss).
        rate_per_s, burst: the token bucket that paces a backlog flush, messages/s and messages.
        min_free_bytes: free-space reserve of the state file system, bytes (``gapcast.edge.outbox.OutboxConfig``).
    """

    # The defaults are the outbox's own (one place: gapcast.edge.outbox.OutboxConfig).
    kind: str = "sqlite"
    max_bytes: int = OutboxConfig.max_bytes
    max_age_s: float = OutboxConfig.max_age_s
    drop_order: tuple[str, ...] = OutboxConfig.drop_order
    synchronous: str = OutboxConfig.synchronous
    rate_per_s: float = OutboxConfig.rate_per_s
    burst: int = OutboxConfig.burst
    min_free_bytes: int = OutboxConfig.min_free_bytes


@dataclass(frozen=True)
class UpdateSettings:
    """Fleet model updates (``gapcast.edge.updater``; releases come from ``gapcast fleet publish``).

    Attributes:
        enabled: follow the fleet's signed releases on ``{prefix}/fleet/{gateway.fleet}/...``. The bundle then runs
            from ``state_dir/current``; ``model.bundle`` is only the first one (or a newer one installed by hand).
        state_dir: bundle slots, the ``current`` symlink and the update journal (default ``agent.state_dir/models``).
        health_steps: steps after a switch during which a bad output (exception, NaN, out of range) rolls back.
        max_artifact_bytes: larger release artifacts are refused before download, bytes.
        max_attempts: how often an update interrupted by a restart is retried before it is refused.
        range_slack: tolerated excursion beyond a channel's valid range in the health check, share of its width.
    """

    enabled: bool = False
    state_dir: Path | None = None
    health_steps: int = 3
    max_artifact_bytes: int = 256 * 1024 * 1024
    max_attempts: int = 2
    range_slack: float = 0.25


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint (``gapcast.edge.metrics``).

    Attributes:
        listen: ``HOST:PORT`` to serve ``/metrics`` on (e.g. ``127.0.0.1:9108``); empty: off (the default).
        station_labels: export per-station output counters (one series per registered station and kind).
    """

    listen: str = ""
    station_labels: bool = True


@dataclass(frozen=True)
class SkillConfig:
    """Online forecast skill and drift (``gapcast.edge.skill``).

    Attributes:
        enabled: score every forecast against the readings that arrive (default on).
        span_s: the rolling span, seconds (``span = "7d"``).
        drift_after_s: how long a station must be worse than the better naive method before drift (``"24h"``).
        min_count: scored values a station needs in the span before its ratio counts.
        shadow_share: share (0..1) of the newest step's observed values withheld from the model input only (never
            from the published value) to score real-time fills against the real reading; 0 = off (the default).
        dashboard_listen: ``[dashboard] listen = "HOST:PORT"``: serve the dashboard inside the agent; empty: off.
    """

    enabled: bool = True
    span_s: float = 7 * 86400.0
    drift_after_s: float = 86400.0
    min_count: int = 200
    shadow_share: float = 0.0
    dashboard_listen: str = ""


@dataclass(frozen=True)
class LogSettings:
    """The agent's log output (``gapcast.edge.logs``).

    Attributes:
        format: ``text`` or ``json`` (one object per line); under journald without own timestamps, with ``<N>``
            priority prefixes.
        level: ``debug``, ``info``, ``warning`` or ``error``.
        steps: show the per-station step lines (DEBUG) without turning on DEBUG for everything; by default each
            round logs one INFO summary line.
    """

    format: str = "text"
    level: str = "info"
    steps: bool = False


@dataclass(frozen=True)
class EdgeConfig:
    """The whole gateway configuration.

    Attributes:
        gateway_id: this gateway's name (status and dead-letter topics).
        topic_prefix: MQTT topic prefix, default ``gapcast/v1``.
        fleet: the fleet this gateway belongs to (model updates topic).
        broker, stations, model, input, agent, outbox: the sections.
        source: the file it was loaded from (None when parsed from a dict).
    """

    gateway_id: str
    topic_prefix: str = DEFAULT_PREFIX
    fleet: str = "default"
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    stations: StationSettings = field(default_factory=StationSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    input: InputSettings = field(default_factory=InputSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    update: UpdateSettings = field(default_factory=UpdateSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = None
    skill: SkillConfig = field(default_factory=SkillConfig)

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``broker.client_id`` or ``gapcast-<gateway_id>``."""
        return self.broker.client_id or f"gapcast-{self.gateway_id}"
