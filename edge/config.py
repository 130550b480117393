"""The gateway configuration: one TOML file (``edge.toml``) loaded into frozen dataclasses.

Every option, its default and its meaning is shown in ``deploy/edge.example.toml``. Loading validates types and
ranges and raises :class:`~gapcast.edge.ConfigError` with the dotted key that is wrong (``mqtt.port: must be an
integer in 1..65535, got 'abc'``). Unknown keys are errors too, so a typo never silently falls back to a default.
Relative paths are resolved against the config file's folder.

Security default: TLS, when enabled, verifies the broker's certificate and host name. Turning verification off needs
an explicit ``tls_insecure = true``, which the agent logs as a warning at every start.
"""

from __future__ import annotations

import logging
import math
import re

try:  # Python 3.11+; JetPack 6's TensorRT bindings are for Python 3.10, which needs the tomli backport
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gapcast.edge import ConfigError
from gapcast.edge.messages import (
    AGGREGATES,
    DEFAULT_READINGS_TOPIC,
    topic_prefix_problem,
    topic_template_problem,
)
from gapcast.edge.outbox import OutboxConfig

__all__ = [
    "BACKENDS",
    "VARIANTS",
    "DEFAULT_PREFIX",
    "DROPPABLE_KINDS",
    "AgentSettings",
    "BrokerSettings",
    "EdgeConfig",
    "InputSettings",
    "LogSettings",
    "MetricsSettings",
    "ModelSettings",
    "OutboxSettings",
    "StationSettings",
    "TLSSettings",
    "UpdateSettings",
    "load_config",
    "parse_config",
]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "gapcast/v1"
#: Backend preferences ``model.backend`` accepts (``auto`` = TensorRT, then onnxruntime, then interpolation).
BACKENDS = ("auto", "tensorrt", "onnxruntime", "interpolation")
#: Values of ``model.variant`` (``auto`` = timed on the gateway; a name pins that bundle variant).
VARIANTS = ("auto", "fp32", "int8_cpu", "int8_qdq")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


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


# -- parsing helpers -------------------------------------------------------------------------------------------


class _Section:
    """Typed reads from one TOML table; every error names the dotted key; leftovers are unknown keys."""

    def __init__(self, data: Any, name: str, base: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: must be a table, got {type(data).__name__}")
        self.data = dict(data)
        self.name = name
        self.base = base
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}" if self.name else k

    def _get(self, k: str) -> Any:
        self.used.add(k)
        return self.data.get(k)

    def has(self, k: str) -> bool:
        return k in self.data

    def str_(self, k: str, default: str | None, *, choices: tuple[str, ...] | None = None) -> str | None:
        v = self._get(k)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ConfigError(f"{self.key(k)}: must be a string, got {v!r}")
        if choices is not None and v not in choices:
            raise ConfigError(f"{self.key(k)}: must be one of {', '.join(choices)}; got {v!r}")
        return v

    def bool_(self, k: str, default: bool) -> bool:
        v = self._get(k)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"{self.key(k)}: must be true or false, got {v!r}")
        return v

    def int_(self, k: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self._get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.key(k)}: must be an integer, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{self.key(k)}: must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")
        return v

    def float_(self, k: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        v = self._get(k)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{self.key(k)}: must be a finite number, got {v!r}")
        v = float(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{self.key(k)}: must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
        return v

    def path(self, k: str, default: Path | None) -> Path | None:
        v = self.str_(k, None)
        if v is None or v == "":
            return default
        p = Path(v).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def list_(self, k: str, kind: type | tuple[type, ...]) -> tuple | None:
        v = self._get(k)
        if v is None:
            return None
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, kind) for x in v):
            name = kind.__name__ if isinstance(kind, type) else "number"
            raise ConfigError(f"{self.key(k)}: must be a list of {name}s, got {v!r}")
        return tuple(v)

    def table(self, k: str) -> _Section:
        self.used.add(k)
        return _Section(self.data.get(k), self.key(k), self.base)

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            where = f"[{self.name}]" if self.name else "the top level"
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(self.key(e) for e in extra)}")


def _name(sec: _Section, k: str, value: str) -> str:
    if not _NAME_RE.match(value):
        raise ConfigError(f"{sec.key(k)}: {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def _readings_topic(sec: _Section, prefix: str, gateway: str) -> str:
    t = sec.str_("topic", DEFAULT_READINGS_TOPIC) or DEFAULT_READINGS_TOPIC
    if why := topic_template_problem(t, prefix, gateway):
        raise ConfigError(f"{sec.key('topic')}: {why} (default {DEFAULT_READINGS_TOPIC!r})")
    return t


def _wire_name(sec: _Section, k: str, value: str | None) -> str:
    """A channel name as stations send it, or as the model calls it: 1-64 characters, no '/', '+', '#' or NUL."""
    for name, where in ((k, f"{sec.key(k)}: the name"), (value, sec.key(k))):
        if name is None or not 1 <= len(name) <= 64 or any(c in name for c in "/+#\0"):
            raise ConfigError(f"{where} {name!r} must be 1-64 characters without / + # or NUL")
    return value  # type: ignore[return-value]


def _scale_value(sec: _Section, k: str) -> float:
    _wire_name(sec, k, k)
    v = sec.float_(k, 1.0)
    if v == 0.0:
        raise ConfigError(f"{sec.key(k)}: must not be 0 (a factor the value as sent is multiplied by)")
    return v


def _lat_lon(sec: _Section, k: str) -> tuple[float, float]:
    """``NAME = [lat, lon]`` in degrees, |lat| <= 90, |lon| <= 180."""
    _name(sec, k, k)
    v = sec.list_(k, (int, float))
    if v is None or len(v) != 2 or not (abs(v[0]) <= 90 and abs(v[1]) <= 180):
        raise ConfigError(f"{sec.key(k)}: must be [lat, lon] in degrees (|lat| <= 90, |lon| <= 180), got {v!r}")
    return float(v[0]), float(v[1])


def _name_map(sec: _Section, read) -> dict:
    """Every key of a table read by ``read(section, key)``; the table's keys are names, so none is unknown."""
    out = {k: read(sec, k) for k in list(sec.data)}
    sec.done()
    return out


#: Outgoing message kinds ``outbox.drop_order`` may name. Filled values (``filled`` and their ``revision``) are not:
#: they are dropped only last, when nothing else is left, never by policy.
DROPPABLE_KINDS = ("forecast", "deadletter", "status")


def _duration(sec: _Section, k: str, default: str) -> float:
    """A duration key (``"7d"``, ``"24h"``) in seconds, > 0; the error names the key."""
    from gapcast.duration import parse_duration

    raw = sec._get(k)
    if raw is None:
        raw = default
    try:
        v = parse_duration(raw, key=sec.key(k))
    except Exception as exc:  # parse_duration's error names the key
        raise ConfigError(str(exc)) from exc
    if v <= 0:
        raise ConfigError(f"{sec.key(k)}: must be > 0, got {raw!r}")
    return v


def _drop_order(sec: _Section) -> tuple[str, ...]:
    order = sec.list_("drop_order", str)
    if order is None:
        return ("forecast", "deadletter", "status")
    if "filled" in order or "revision" in order:
        raise ConfigError(
            "outbox.drop_order: must not hold 'filled' or 'revision' (filled values are only dropped last, when nothing else is "
            "left, never by policy)"
        )
    bad = [k for k in order if k not in DROPPABLE_KINDS]
    if bad:
        raise ConfigError(f"outbox.drop_order: unknown kind(s) {bad}; choose from {', '.join(DROPPABLE_KINDS)}")
    if len(set(order)) != len(order):
        raise ConfigError("outbox.drop_order: holds duplicates")
    return tuple(order)


def parse_config(data: dict[str, Any], *, base: Path | None = None, source: Path | None = None) -> EdgeConfig:
    """Build an :class:`EdgeConfig` from a parsed TOML document.

    Args:
        data: the TOML document as a dict.
        base: folder that relative paths are resolved against (default: the current folder).
        source: the file it came from, kept for messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: a missing, mistyped, out-of-range or unknown key; the message names it.
    """
    base = base or Path.cwd()
    top = _Section(data, "", base)

    gw = top.table("gateway")
    gateway_id = gw.str_("id", None)
    if not gateway_id:
        raise ConfigError("gateway.id: required (this gateway's name, e.g. \"gw-01\")")
    _name(gw, "id", gateway_id)
    fleet = _name(gw, "fleet", gw.str_("fleet", "default") or "default")
    gw.done()

    m = top.table("mqtt")
    prefix = m.str_("topic_prefix", DEFAULT_PREFIX)
    if why := topic_prefix_problem(prefix):
        raise ConfigError(f"mqtt.topic_prefix: {why} (default {DEFAULT_PREFIX!r})")
    password = m.str_("password", None)
    pw_file = m.path("password_file", None)
    if password is not None and pw_file is not None:
        raise ConfigError("mqtt.password and mqtt.password_file: set at most one")
    if pw_file is not None:
        try:
            password = pw_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {pw_file}: {exc}") from exc
    username = m.str_("username", None)
    if password is not None and not username:
        raise ConfigError("mqtt.password: given without mqtt.username")
    t = m.table("tls")
    tls = TLSSettings(
        enabled=t.bool_("enabled", False),
        ca_file=t.path("ca_file", None),
        cert_file=t.path("cert_file", None),
        key_file=t.path("key_file", None),
        insecure=t.bool_("tls_insecure", False),
    )
    t.done()
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("mqtt.tls.cert_file and mqtt.tls.key_file: give both (mutual TLS) or neither")
    if not tls.enabled and (tls.ca_file or tls.cert_file or tls.insecure):
        raise ConfigError("mqtt.tls: ca_file/cert_file/tls_insecure are set but mqtt.tls.enabled is false")
    for k in ("ca_file", "cert_file", "key_file"):
        p = getattr(tls, k)
        if p is not None and not p.is_file():
            raise ConfigError(f"mqtt.tls.{k}: {p} does not exist")
    rmin = m.int_("reconnect_min_s", 1, 1, 3600)
    rmax = m.int_("reconnect_max_s", 60, 1, 86400)
    if rmax < rmin:
        raise ConfigError(f"mqtt.reconnect_max_s: must be >= reconnect_min_s ({rmin}), got {rmax}")
    client_id = m.str_("client_id", "") or ""
    if len(client_id) > 128:
        raise ConfigError("mqtt.client_id: at most 128 characters")
    host = m.str_("host", "127.0.0.1")
    if not host or not host.strip():
        raise ConfigError("mqtt.host: must not be empty (the broker's host name or IP address)")
    broker = BrokerSettings(
        host=host,
        port=m.int_("port", 8883 if tls.enabled else 1883, 1, 65535),
        mqtt_version=m.str_("version", "5", choices=("5", "3.1.1")) or "5",
        client_id=client_id,
        keepalive_s=m.int_("keepalive_s", 30, 5, 65535),
        session_expiry_s=m.int_("session_expiry_s", 7 * 24 * 3600, 0, 0xFFFFFFFF),
        username=username,
        password=password,
        tls=tls,
        reconnect_min_s=rmin,
        reconnect_max_s=rmax,
        max_inflight=m.int_("max_inflight", 100, 1, 65535),
    )
    m.done()

    s = top.table("stations")
    names = s.list_("names", str) or ()
    for n in names:
        _name(s, "names", n)
    if len(set(names)) != len(names):
        raise ConfigError("stations.names: holds duplicates")
    auto = s.bool_("auto_register", False)
    max_stations = s.int_("max_stations", max(1000, len(names)), 1, 1_000_000)
    if not names and not auto:
        raise ConfigError("stations: list stations.names or set stations.auto_register = true")
    if len(names) > max_stations:
        raise ConfigError(f"stations.max_stations: {max_stations} is fewer than the {len(names)} listed stations")
    coords = _name_map(s.table("coordinates"), _lat_lon) if s.has("coordinates") else {}
    if not auto and (stray := sorted(set(coords) - set(names))):  # a typo would silently leave a station without
        raise ConfigError(f"stations.coordinates.{stray[0]}: not in stations.names (and auto_register is off)")
    stations = StationSettings(names=tuple(names), auto_register=auto, max_stations=max_stations, coordinates=coords)
    s.done()

    md = top.table("model")
    bundle = md.path("bundle", None)
    keys = md.list_("trusted_keys", str) or ()
    resolved_keys = []
    for k in keys:
        if len(k) == 64 and all(ch in "0123456789abcdefABCDEF" for ch in k):
            resolved_keys.append(k)
        else:
            p = Path(k).expanduser()
            resolved_keys.append(str(p if p.is_absolute() else base / p))
    model = ModelSettings(
        bundle=bundle,
        trusted_keys=tuple(resolved_keys),
        backend=md.str_("backend", "auto", choices=BACKENDS) or "auto",
        threads=md.int_("threads", 0, 0, 1024),
        max_batch=md.int_("max_batch", 64, 1, 65536),
        variant=md.str_("variant", "auto", choices=VARIANTS) or "auto",
        variant_budget_s=md.float_("variant_budget_s", 3.0, 0.0, 60.0),
    )
    if model.bundle is not None and not model.trusted_keys:
        raise ConfigError("model.trusted_keys: required when model.bundle is set (bundles must be signed)")
    md.done()

    i = top.table("input")
    sentinels = i.list_("sentinels", (int, float))
    inp = InputSettings(
        lateness_s=i.float_("lateness_s", 300.0, 0.0),
        max_future_s=i.float_("max_future_s", 300.0, 0.0),
        sentinels=tuple(float(x) for x in sentinels) if sentinels is not None else (-200.0, -9999.0),
        max_payload_bytes=i.int_("max_payload_bytes", 16384, 64, 16 * 1024 * 1024),
        max_json_depth=i.int_("max_json_depth", 8, 2, 256),
        unknown_channels=i.str_("unknown_channels", "ignore", choices=("ignore", "reject")) or "ignore",
        topic=_readings_topic(i, prefix, gateway_id),
        aliases=_name_map(i.table("aliases"), lambda sec, k: _wire_name(sec, k, sec.str_(k, None))),
        scale=_name_map(i.table("scale"), _scale_value),
        epoch=i.str_("epoch", "auto", choices=("auto", "s", "ms")) or "auto",
        max_keys=i.int_("max_keys", 1024, 2, 1_000_000),
        aggregate=i.str_("aggregate", None, choices=AGGREGATES),
        channel_aggregate=_name_map(i.table("channel_aggregate"), lambda sec, k: sec.str_(k, None, choices=AGGREGATES)),
    )
    i.done()

    a = top.table("agent")
    agent = AgentSettings(
        clock=a.str_("clock", "gateway", choices=("gateway", "readings")) or "gateway",
        max_missing_share=a.float_("max_missing_share", 0.5, 0.0, 1.0),
        tick_interval_s=a.float_("tick_interval_s", 1.0, 0.01, 3600.0),
        status_interval_s=a.float_("status_interval_s", 30.0, 0.1, 86400.0),
        state_dir=a.path("state_dir", base / "state") or base / "state",
        snapshot_interval_s=a.float_("snapshot_interval_s", 60.0, 0.1, 86400.0),
    )
    a.done()
    for key, d in (("agent.state_dir", agent.state_dir),):
        if d.exists() and not d.is_dir():
            raise ConfigError(f"{key}: {d} exists and is not a directory (the agent keeps its outbox and snapshots there)")

    o = top.table("outbox")
    outbox = OutboxSettings(
        kind=o.str_("kind", "sqlite", choices=("sqlite", "memory")) or "sqlite",
        max_bytes=o.int_("max_bytes", 64 * 1024 * 1024, 1024),
        max_age_s=o.float_("max_age_s", 7 * 24 * 3600.0, 0.0),
        drop_order=_drop_order(o),
        synchronous=(o.str_("synchronous", "FULL", choices=("FULL", "NORMAL", "EXTRA")) or "FULL"),
        rate_per_s=o.float_("rate_per_s", 200.0, 0.001),
        burst=o.int_("burst", 500, 1),
        min_free_bytes=o.int_("min_free_bytes", 64 * 1024 * 1024, 0),
    )
    o.done()

    u = top.table("update")
    update = UpdateSettings(
        enabled=u.bool_("enabled", False),
        state_dir=u.path("state_dir", agent.state_dir / "models"),
        health_steps=u.int_("health_steps", 3, 1, 100_000),
        max_artifact_bytes=u.int_("max_artifact_bytes", 256 * 1024 * 1024, 1024, 4 * 1024**3),
        max_attempts=u.int_("max_attempts", 2, 1, 100),
        range_slack=u.float_("range_slack", 0.25, 0.0, 100.0),
    )
    u.done()
    if update.state_dir is not None and update.state_dir.exists() and not update.state_dir.is_dir():
        raise ConfigError(f"update.state_dir: {update.state_dir} exists and is not a directory")
    if update.enabled and not model.trusted_keys:
        raise ConfigError("update.enabled: needs model.trusted_keys (releases and bundles must be signed)")

    mt = top.table("metrics")
    metrics = MetricsSettings(listen=mt.str_("listen", "") or "", station_labels=mt.bool_("station_labels", True))
    if metrics.listen:
        from gapcast.edge.metrics import parse_listen

        try:
            parse_listen(metrics.listen)
        except ValueError as exc:
            raise ConfigError(f"metrics.listen: {exc}") from exc
    mt.done()

    lg = top.table("log")
    log_settings = LogSettings(
        format=lg.str_("format", "text", choices=("text", "json")) or "text",
        level=lg.str_("level", "info", choices=("debug", "info", "warning", "error")) or "info",
        steps=lg.bool_("steps", False),
    )
    lg.done()

    sk = top.table("skill")
    skill = SkillConfig(
        enabled=sk.bool_("enabled", True),
        span_s=_duration(sk, "span", "7d"),
        drift_after_s=_duration(sk, "drift_after", "24h"),
        min_count=sk.int_("min_count", 200, 1),
        shadow_share=sk.float_("shadow_share", 0.0, 0.0, 1.0),
    )
    sk.done()
    db = top.table("dashboard")
    skill = SkillConfig(**{**skill.__dict__, "dashboard_listen": db.str_("listen", "") or ""})
    db.done()
    top.done()

    cfg = EdgeConfig(
        gateway_id=gateway_id,
        topic_prefix=prefix,
        fleet=fleet,
        broker=broker,
        stations=stations,
        model=model,
        input=inp,
        agent=agent,
        outbox=outbox,
        update=update,
        metrics=metrics,
        log=log_settings,
        source=source,
        skill=skill,
    )
    if cfg.broker.tls.insecure:
        log.warning(
            "mqtt.tls.tls_insecure = true: the broker's certificate and host name are NOT verified "
            "(anyone on the path can impersonate the broker)"
        )
    return cfg


def load_config(path: str | Path) -> EdgeConfig:
    """Load and validate ``edge.toml``.

    Args:
        path: the TOML file; relative paths inside it are resolved against its folder.

    Returns:
        The validated :class:`EdgeConfig`.

    Raises:
        ConfigError: the file is missing, not UTF-8, not valid TOML, or a key is wrong (the message names it).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {p} is not UTF-8 text (byte {exc.start}: {exc.reason}); is it a TOML file?") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    try:
        return parse_config(data, base=p.resolve().parent, source=p)
    except ConfigError as exc:  # the key is named; the file too, so a user with several configs finds it
        if str(p) in str(exc):
            raise
        raise ConfigError(f"{p}: {exc}") from exc
