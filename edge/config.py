"""The gateway configuration: one TOML file (``edge.toml``) loaded into frozen dataclasses.

Every option, its default and its meaning is shown in ``deploy/edge.example.toml``. Loading validates types and
ranges and raises :class:`~gapcast.edge.ConfigError` with the dotted key that is wrong (``mqtt.port: must be an
integer in 1..65535, got 'abc'``). Unknown keys are errors too, so a typo never silently falls back to a default.
Relative paths are resolved against the config file's folder.

Security default: TLS, when enabled, verifies the broker's certificate and host name. Turning verification off needs
an explicit ``tls_insecure = true``, which the agent logs as a warning at every start.

The value types are in :mod:`gapcast.edge.settings` (re-exported here) and the typed, key-naming table reader in
:mod:`gapcast.edge.tomltable`; this module holds the parser, one stage per TOML table, and :func:`load_config`.
"""

from __future__ import annotations

import logging
import re

try:  # Python 3.11+; JetPack 6's TensorRT bindings are for Python 3.10, which needs the tomli backport
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib
from pathlib import Path
from typing import Any

from gapcast.edge import ConfigError
from gapcast.edge.messages import (
    AGGREGATES,
    DEFAULT_READINGS_TOPIC,
    topic_prefix_problem,
    topic_template_problem,
)
from gapcast.edge.settings import (  # the value types live there; re-exported so every import keeps working
    BACKENDS,
    DEFAULT_PREFIX,
    VARIANTS,
    AgentSettings,
    BrokerSettings,
    EdgeConfig,
    InputSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    OutboxSettings,
    SkillConfig,
    StationSettings,
    TLSSettings,
    UpdateSettings,
)
from gapcast.edge.tomltable import TomlTable as _Section

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

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


# -- parsing helpers -------------------------------------------------------------------------------------------


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


def _parse_gateway(top: _Section) -> tuple[str, str]:
    """Read ``[gateway]``: this gateway's id (required) and its fleet.

    Returns:
        ``(gateway_id, fleet)``.

    Raises:
        ConfigError: ``gateway.id`` missing, a name outside 1-64 of ``A-Z a-z 0-9 _ . -``, or an unknown key.
    """
    gw = top.table("gateway")
    gateway_id = gw.str_("id", None)
    if not gateway_id:
        raise ConfigError("gateway.id: required (this gateway's name, e.g. \"gw-01\")")
    _name(gw, "id", gateway_id)
    fleet = _name(gw, "fleet", gw.str_("fleet", "default") or "default")
    gw.done()
    return gateway_id, fleet


def _parse_password(m: _Section) -> tuple[str | None, str | None]:
    """Read ``mqtt.username`` and the password, given inline or in ``mqtt.password_file``.

    Returns:
        ``(username, password)``; either may be None.

    Raises:
        ConfigError: both password keys set, the password file unreadable, or a password without a username.
    """
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
    return username, password


def _parse_tls(m: _Section) -> TLSSettings:
    """Read ``[mqtt.tls]``.

    Raises:
        ConfigError: only one of cert/key given, TLS files set while TLS is off, a file that does not exist, or an
            unknown key.
    """
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
    return tls


def _parse_mqtt(top: _Section) -> tuple[str, BrokerSettings]:
    """Read ``[mqtt]`` (with ``[mqtt.tls]``): the topic prefix and the broker connection.

    Returns:
        ``(topic_prefix, broker)``.

    Raises:
        ConfigError: a bad topic prefix, password, TLS setting or range (``reconnect_max_s < reconnect_min_s``, a
            client id over 128 characters, an empty host), or an unknown key.
    """
    m = top.table("mqtt")
    prefix = m.str_("topic_prefix", DEFAULT_PREFIX)
    if why := topic_prefix_problem(prefix):
        raise ConfigError(f"mqtt.topic_prefix: {why} (default {DEFAULT_PREFIX!r})")
    username, password = _parse_password(m)
    tls = _parse_tls(m)
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
    return prefix, broker


def _parse_stations(top: _Section) -> StationSettings:
    """Read ``[stations]`` (with ``[stations.coordinates]``).

    Raises:
        ConfigError: a bad or duplicate name, no stations and no auto-registration, ``max_stations`` below the
            listed count, coordinates for an unlisted station while auto-registration is off, or an unknown key.
    """
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
    return stations


def _parse_model(top: _Section, base: Path) -> ModelSettings:
    """Read ``[model]``; a trusted key is a 64-hex public key or a key file path (resolved against ``base``).

    Raises:
        ConfigError: a bad choice or range, a bundle without trusted keys, or an unknown key.
    """
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
    return model


def _parse_input(top: _Section, prefix: str, gateway_id: str) -> InputSettings:
    """Read ``[input]`` (with ``aliases``, ``scale`` and ``channel_aggregate``); the readings topic is checked
    against ``prefix`` and ``gateway_id``.

    Raises:
        ConfigError: a bad type, range, choice, topic template or channel name, a zero scale, or an unknown key.
    """
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
    return inp


def _parse_agent(top: _Section, base: Path) -> AgentSettings:
    """Read ``[agent]``; ``state_dir`` defaults to ``base / "state"``.

    Raises:
        ConfigError: a bad type, range or choice, an unknown key, or a ``state_dir`` that exists and is not a
            folder.
    """
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
    return agent


def _parse_outbox(top: _Section) -> OutboxSettings:
    """Read ``[outbox]``.

    Raises:
        ConfigError: a bad type, range or choice, a bad ``drop_order``, or an unknown key.
    """
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
    return outbox


def _parse_update(top: _Section, agent: AgentSettings, model: ModelSettings) -> UpdateSettings:
    """Read ``[update]``; ``state_dir`` defaults to ``agent.state_dir / "models"``.

    Raises:
        ConfigError: a bad type or range, an unknown key, a ``state_dir`` that is not a folder, or updates enabled
            without ``model.trusted_keys``.
    """
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
    return update


def _parse_metrics(top: _Section) -> MetricsSettings:
    """Read ``[metrics]``; ``listen`` must parse as ``HOST:PORT``.

    Raises:
        ConfigError: a bad type, a ``listen`` address that does not parse, or an unknown key.
    """
    mt = top.table("metrics")
    metrics = MetricsSettings(listen=mt.str_("listen", "") or "", station_labels=mt.bool_("station_labels", True))
    if metrics.listen:
        from gapcast.edge.metrics import parse_listen

        try:
            parse_listen(metrics.listen)
        except ValueError as exc:
            raise ConfigError(f"metrics.listen: {exc}") from exc
    mt.done()
    return metrics


def _parse_log(top: _Section) -> LogSettings:
    """Read ``[log]``.

    Raises:
        ConfigError: a bad type or choice, or an unknown key.
    """
    lg = top.table("log")
    log_settings = LogSettings(
        format=lg.str_("format", "text", choices=("text", "json")) or "text",
        level=lg.str_("level", "info", choices=("debug", "info", "warning", "error")) or "info",
        steps=lg.bool_("steps", False),
    )
    lg.done()
    return log_settings


def _parse_skill(top: _Section) -> SkillConfig:
    """Read ``[skill]`` and ``[dashboard]`` (its ``listen`` travels in the skill settings).

    Raises:
        ConfigError: a bad type, range or duration, or an unknown key in either table.
    """
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
    return skill


def parse_config(data: dict[str, Any], *, base: Path | None = None, source: Path | None = None) -> EdgeConfig:
    """Build an :class:`EdgeConfig` from a parsed TOML document.

    One stage per TOML table, in the order the tables are checked (so the first wrong key is the one reported):
    gateway, mqtt, stations, model, input, agent, outbox, update, metrics, log, skill (+ dashboard), then the
    top level's unknown keys.

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
    gateway_id, fleet = _parse_gateway(top)
    prefix, broker = _parse_mqtt(top)
    stations = _parse_stations(top)
    model = _parse_model(top, base)
    inp = _parse_input(top, prefix, gateway_id)
    agent = _parse_agent(top, base)
    outbox = _parse_outbox(top)
    update = _parse_update(top, agent, model)
    metrics = _parse_metrics(top)
    log_settings = _parse_log(top)
    skill = _parse_skill(top)
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
