"""MQTT payloads: parsing and validating readings, building the agent's outputs. Pure: no I/O, no clock reads.

Topics (docs/ARCHITECTURE.md, "Contracts"; ``prefix`` defaults to ``gapcast/v1``)::

    {prefix}/stations/{station}/readings    in   {"ts": "2017-01-01T00:00:00Z" | 1483228800, "values": {...}}
    {prefix}/stations/{station}/filled      out  one closed step, every channel filled
    {prefix}/stations/{station}/revisions   out  a run of closed steps re-filled (a gap ended, a late reading)
    {prefix}/stations/{station}/forecast    out  H steps, each ``{"ts", "values"}``, from a closed step
    {prefix}/gateways/{gateway}/status      out  retained; "offline" by Last Will
    {prefix}/deadletter/{gateway}           out  every rejected input with its kind and reason

Parsing never invents a value: a reading is either accepted with an observed mask (``null``, ``NaN``, a sentinel
or a value outside the channel's valid range are unobserved, each counted by kind) or rejected as a whole with a
:class:`Rejection` (kind + reason). JSON's grammar (RFC 8259) has no NaN or Infinity; Python's parser accepts the
literals, so the agent decides: ``NaN`` as a channel value is the conventional "no value" marker and counts as
missing (kind ``nan``); ``Infinity`` / ``-Infinity`` anywhere, or ``NaN`` outside a channel value, reject the reading
(kind ``non_finite``).

Every output carries a stable ``id`` built from (station, step time, kind, model version), so a subscriber can
deduplicate the at-least-once delivery of QoS 1: the same step published twice (a retry, a restart) has the same id.

Every output names its contract, ``"schema": "gapcast/<kind>/1"`` (:data:`SCHEMA_IDS`; the JSON Schemas ship in
``gapcast.edge.schemas`` and ``gapcast schema NAME`` prints them); filled, revision and forecast payloads carry the
card's ``units``. A message the shell flushes from its outbox after a broker outage gets ``"replayed": true``
(:func:`mark_replayed`; after Sparkplug B's ``is_historical``), so a dashboard does not record it at arrival time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from gapcast.timefmt import format_rfc3339

__all__ = [
    "MISSING_KINDS",
    "REJECTION_KINDS",
    "SCHEMA_IDS",
    "OutMessage",
    "Reading",
    "ReadingSchema",
    "Rejection",
    "Topics",
    "deadletter_message",
    "filled_message",
    "forecast_message",
    "iso",
    "mark_replayed",
    "message_id",
    "offline_payload",
    "parse_reading",
    "parse_timestamp",
    "revision_message",
    "status_message",
    "topic_prefix_problem",
]

#: Kinds of missing value counted per channel value (plus ``missing_step``: a step with no reading at all).
MISSING_KINDS = ("null", "nan", "sentinel", "out_of_range", "missing_step")
#: Kinds of rejected input (each goes to the dead-letter topic).
REJECTION_KINDS = (
    "bad_topic",
    "payload_too_large",
    "bad_encoding",
    "bad_json",
    "too_deep",
    "bad_schema",
    "bad_type",
    "non_finite",
    "bad_timestamp",
    "unknown_channel",
    "unknown_station",
    "station_limit",
    "retained",
    "future",
    "too_old",
    "too_late",
)

#: The contract id each payload kind carries in its ``schema`` field (the JSON Schema's ``$id`` ends with it).
SCHEMA_IDS = {
    kind: f"gapcast/{kind}/1"
    for kind in ("reading", "filled", "revision", "forecast", "status", "model", "deadletter", "manifest")
}

_STATION_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)
# Timestamps outside 2000-01-01 .. 2100-01-01 are not sensor readings (epoch milliseconds, zero clocks...).
_TS_MIN = 946_684_800.0
_TS_MAX = 4_102_444_800.0


iso = format_rfc3339  # RFC 3339 UTC text of an epoch time (gapcast.timefmt: the one formatter)


def topic_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be gapcast's MQTT topic prefix, or None when it can.

    A prefix is published under, so it must be non-empty, hold no wildcard (``+``, ``#``; MQTT 3.1.1 section 4.7.1)
    and no NUL, and neither start nor end with ``/`` (topics are ``{prefix}/stations/...``). The one rule for the
    gateway's ``mqtt.topic_prefix``, ``gapcast replay --prefix`` and ``gapcast fleet --prefix``.
    """
    if not prefix:
        return "must not be empty"
    if prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
        return f"{prefix!r} must not start/end with '/' nor hold + # or NUL"
    return None


@dataclass(frozen=True)
class Topics:
    """The topic tree of one gateway: the one place topic strings are built and parsed.

    Args:
        prefix: topic prefix, e.g. ``gapcast/v1``.
        gateway: gateway id; the default ``+`` (a subscriber that serves every gateway) makes ``status`` and
            ``deadletter`` subscription filters.
    """

    prefix: str
    gateway: str = "+"

    #: Station output kinds and their topic level (``{prefix}/stations/{station}/{level}``).
    OUTPUT_LEVELS = {"filled": "filled", "revision": "revisions", "forecast": "forecast"}

    @property
    def readings_filter(self) -> str:
        """The subscription filter for every station's readings."""
        return f"{self.prefix}/stations/+/readings"

    def station_of(self, topic: str) -> str | Rejection:
        """The station name of a readings topic, or a ``bad_topic`` :class:`Rejection`."""
        head = self.prefix + "/stations/"
        if not topic.startswith(head) or not topic.endswith("/readings"):
            return Rejection("bad_topic", f"topic {topic[:200]!r} is not {head}<station>/readings")
        station = topic[len(head) : -len("/readings")]
        if not _STATION_RE.match(station):
            return Rejection("bad_topic", f"station name {station[:80]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        return station

    def filled(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/filled"

    def revisions(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/revisions"

    def forecast(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/forecast"

    def output_filter(self, kind: str) -> str:
        """The subscription filter for one output kind (``filled``, ``revision``, ``forecast``) of every station."""
        return f"{self.prefix}/stations/+/{self.OUTPUT_LEVELS[kind]}"

    def output_of(self, topic: str) -> tuple[str, str] | None:
        """``(kind, station)`` of a station output topic (``filled``, ``revision``, ``forecast``), else None."""
        head = self.prefix + "/stations/"
        if not topic.startswith(head):
            return None
        station, _, level = topic[len(head) :].partition("/")
        for kind, lvl in self.OUTPUT_LEVELS.items():
            if level == lvl and _STATION_RE.match(station):
                return kind, station
        return None

    def readings(self, station: str) -> str:
        return f"{self.prefix}/stations/{station}/readings"

    @property
    def status(self) -> str:
        return f"{self.prefix}/gateways/{self.gateway}/status"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}/deadletter/{self.gateway}"


@dataclass(frozen=True)
class Rejection:
    """A rejected input: ``kind`` (one of ``REJECTION_KINDS``) and a human-readable ``reason``."""

    kind: str
    reason: str


@dataclass(frozen=True)
class Reading:
    """A parsed, validated reading.

    Attributes:
        ts_s: event time, seconds since the epoch (UTC).
        values: [C] float32 in the card's channel order, physical units; NaN where not observed.
        observed: [C] bool, True where the reading holds a valid value.
        missing: counts of unobserved channel values in this reading by kind (``null``, ``nan``, ``sentinel``,
            ``out_of_range``); channels simply absent from a partial reading are not counted.
        ignored: unknown channel names ignored (only with ``unknown_channels = "ignore"``).
    """

    ts_s: float
    values: np.ndarray
    observed: np.ndarray
    missing: dict[str, int] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


class ReadingSchema:
    """What a valid reading looks like for one model: channel names, valid ranges, sentinels and limits.

    Args:
        channels: channel names in model column order.
        valid_min, valid_max: [C] physical ranges; outside counts as missing (``out_of_range``).
        sentinels: values that mean "missing", compared exactly.
        max_payload_bytes: larger payloads are rejected unparsed.
        max_json_depth: deeper nesting is rejected.
        unknown_channels: ``reject`` or ``ignore``.
    """

    def __init__(
        self,
        channels: tuple[str, ...],
        valid_min: np.ndarray,
        valid_max: np.ndarray,
        *,
        sentinels: tuple[float, ...] = (-200.0, -9999.0),
        max_payload_bytes: int = 16384,
        max_json_depth: int = 8,
        unknown_channels: str = "reject",
    ) -> None:
        self.channels = tuple(channels)
        self.index = {name: i for i, name in enumerate(self.channels)}
        self.valid_min = [float(x) for x in valid_min]
        self.valid_max = [float(x) for x in valid_max]
        self.sentinels = frozenset(float(s) for s in sentinels)
        self.max_payload_bytes = int(max_payload_bytes)
        self.max_json_depth = int(max_json_depth)
        self.unknown_channels = unknown_channels


def _depth(obj: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value (scalars 0), counting no further than ``limit + 1``."""
    best = 0
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            d += 1
            best = max(best, d)
            if best > limit:
                return best
            stack.extend((c, d) for c in (o.values() if isinstance(o, dict) else o))
    return best


def _reject_constant(name: str) -> float:
    # json's parse_constant hook: NaN survives as a float marker; +/-Infinity are refused outright.
    if name == "NaN":
        return math.nan
    raise ValueError(f"non-finite literal {name}")


# One decoder for every reading: building a JSONDecoder per call costs more than parsing a small payload.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_timestamp(ts: object) -> float | Rejection:
    """Parse a reading's ``ts``: RFC 3339 text with a UTC offset, or epoch seconds (int or float).

    Returns:
        Seconds since the epoch, or a ``bad_timestamp`` / ``non_finite`` :class:`Rejection` (naive local times,
        booleans, values outside 2000..2100 such as epoch milliseconds).

    Source: RFC 3339 section 5.6 (``Z`` or ``+hh:mm`` offsets required).
    """
    if isinstance(ts, bool):
        return Rejection("bad_timestamp", "ts must be RFC 3339 text or epoch seconds, got a boolean")
    if isinstance(ts, int | float):
        t = float(ts)
        if not math.isfinite(t):
            return Rejection("non_finite", "ts is NaN" if math.isnan(t) else f"ts is not finite ({t})")
    elif isinstance(ts, str):
        m = _RFC3339.match(ts)
        if not m:
            return Rejection("bad_timestamp", f"ts {ts[:64]!r} is not RFC 3339 with a UTC offset (e.g. ...Z)")
        y, mo, d, hh, mm, ss = (int(m.group(i)) for i in range(1, 7))
        frac = float(m.group(7)) if m.group(7) else 0.0
        tz = m.group(8)
        if not (1 <= mo <= 12 and 1 <= d <= 31 and hh <= 23 and mm <= 59 and ss <= 60):
            return Rejection("bad_timestamp", f"ts {ts[:64]!r} has an out-of-range field")
        try:
            import calendar as _cal

            if d > _cal.monthrange(y, mo)[1]:
                return Rejection("bad_timestamp", f"ts {ts[:64]!r}: day {d} does not exist in {y}-{mo:02d}")
            t = float(_cal.timegm((y, mo, d, hh, mm, min(ss, 59), 0, 0, 0))) + frac
        except (ValueError, OverflowError):
            return Rejection("bad_timestamp", f"ts {ts[:64]!r} is not a valid date")
        if tz not in ("Z", "z"):
            sign = 1 if tz[0] == "+" else -1
            t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    else:
        return Rejection("bad_timestamp", f"ts must be RFC 3339 text or epoch seconds, got {type(ts).__name__}")
    if not (_TS_MIN <= t < _TS_MAX):
        return Rejection("bad_timestamp", f"ts {t:.0f} s is outside 2000..2100 (epoch milliseconds?)")
    return t


def parse_reading(payload: bytes, schema: ReadingSchema) -> Reading | Rejection:
    """Parse and validate one reading payload.

    Args:
        payload: the raw MQTT payload, UTF-8 JSON ``{"ts": ..., "values": {"PM2.5": 12.0, ...}}``.
        schema: the model's :class:`ReadingSchema`.

    Returns:
        A :class:`Reading` (missing values are unobserved and counted by kind), or a :class:`Rejection`: payload
        too large, not UTF-8, not JSON, nested deeper than ``max_json_depth``, not an object, ``ts`` or ``values``
        missing or mistyped, a string/boolean/container for a number, ``Infinity``, an unknown channel.
    """
    if len(payload) > schema.max_payload_bytes:
        return Rejection("payload_too_large", f"{len(payload)} bytes > max_payload_bytes {schema.max_payload_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("bad_encoding", f"payload is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        doc = _DECODER.decode(text)
    except RecursionError:
        return Rejection("too_deep", f"JSON nesting deeper than max_json_depth {schema.max_json_depth}")
    except ValueError as exc:
        if "non-finite" in str(exc):
            return Rejection("non_finite", f"{exc} (JSON has no Infinity; send null for a missing value)")
        return Rejection("bad_json", f"payload is not JSON: {str(exc)[:120]}")
    if not isinstance(doc, dict):
        return Rejection("bad_schema", f"payload must be a JSON object, got {type(doc).__name__}")
    if "ts" not in doc or "values" not in doc:
        return Rejection("bad_schema", "payload needs both 'ts' and 'values'")
    vals = doc["values"]
    if not isinstance(vals, dict):
        return Rejection("bad_schema", f"'values' must be an object, got {type(vals).__name__}")
    # Our schema is two levels deep; anything nested deeper is checked against the limit before the type checks.
    for k, v in doc.items():
        if k != "values" and isinstance(v, dict | list) and 1 + _depth(v, schema.max_json_depth) > schema.max_json_depth:
            return Rejection("too_deep", f"key {k[:40]!r} nests deeper than max_json_depth {schema.max_json_depth}")
    ts = parse_timestamp(doc["ts"])
    if isinstance(ts, Rejection):
        return ts
    C = len(schema.channels)
    values = np.full(C, np.nan, dtype=np.float32)
    observed = np.zeros(C, dtype=bool)
    missing: dict[str, int] = {}
    ignored: list[str] = []
    index, sentinels = schema.index, schema.sentinels
    for name, v in vals.items():
        i = index.get(name)
        if i is None:
            if schema.unknown_channels == "ignore":
                ignored.append(name)
                continue
            return Rejection("unknown_channel", f"unknown channel {name[:40]!r} (this model reads {', '.join(schema.channels)})")
        if v is None:
            missing["null"] = missing.get("null", 0) + 1
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            if isinstance(v, dict | list) and 2 + _depth(v, schema.max_json_depth) > schema.max_json_depth:
                return Rejection("too_deep", f"channel {name!r} nests deeper than max_json_depth {schema.max_json_depth}")
            return Rejection("bad_type", f"channel {name!r}: a number or null is required, got {type(v).__name__} {str(v)[:40]!r}")
        try:
            x = float(v)
        except OverflowError:
            missing["out_of_range"] = missing.get("out_of_range", 0) + 1
            continue
        if math.isnan(x):
            missing["nan"] = missing.get("nan", 0) + 1
            continue
        if x in sentinels:
            missing["sentinel"] = missing.get("sentinel", 0) + 1
            continue
        if not (schema.valid_min[i] <= x <= schema.valid_max[i]):
            missing["out_of_range"] = missing.get("out_of_range", 0) + 1
            continue
        values[i] = x
        observed[i] = True
    return Reading(ts_s=ts, values=values, observed=observed, missing=missing, ignored=tuple(ignored))


# -- outputs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutMessage:
    """One message the agent wants published (the outbox stores it until the broker acknowledges it).

    Attributes:
        topic: MQTT topic.
        payload: UTF-8 JSON bytes.
        kind: ``filled``, ``revision``, ``forecast``, ``status`` or ``deadletter`` (the outbox's drop policy).
        msg_id: the stable id (also inside the payload as ``id``).
        qos: 1 for everything the agent publishes.
        retain: True only for the status message.
        created_s: gateway time it was made, seconds since the epoch (0: the outbox stamps it).
    """

    topic: str
    payload: bytes
    kind: str
    msg_id: str
    qos: int = 1
    retain: bool = False
    created_s: float = 0.0


def message_id(station: str, step_s: float, kind: str, model_version: int, extra: str = "") -> str:
    """The stable id of an output: ``{station}:{step RFC 3339}:{kind}[:{extra}]:v{model_version}``.

    Same inputs, same id, across retries and restarts, so subscribers deduplicate by it.
    """
    mid = f"{station}:{iso(step_s)}:{kind}"
    if extra:
        mid += f":{extra}"
    return f"{mid}:v{model_version}"


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _units(channels: tuple[str, ...], units: dict[str, str] | None) -> dict[str, str]:
    units = units or {}
    return {c: str(units[c]) for c in channels if c in units}


_REPLAYED = b',"replayed":true}'


def mark_replayed(payload: bytes) -> bytes:
    """The payload of an output flushed from the outbox after a broker outage, with ``"replayed": true`` added.

    Args:
        payload: a compact JSON object as the builders here make it (ends with ``}``).

    Returns:
        The same object plus ``"replayed": true`` (unchanged when already marked or not a JSON object). The ``id``
        stays the same, so a subscriber that saw the message before the outage still drops the copy.

    Source: Sparkplug B 3.0 ``is_historical`` (a metric sent late, not a current value).
    """
    if payload.endswith(_REPLAYED) or not (payload.startswith(b"{") and payload.endswith(b"}")) or payload == b"{}":
        return payload
    return payload[:-1] + _REPLAYED


def _vals(names: tuple[str, ...], row: np.ndarray) -> dict[str, float]:
    return dict(zip(names, np.round(row.astype(np.float64), 4).tolist()))


def filled_message(
    topics: Topics,
    station: str,
    step_s: int,
    cadence_s: int,
    channels: tuple[str, ...],
    values: np.ndarray,
    imputed: np.ndarray,
    method: str,
    model_version: int,
    created_s: float = 0.0,
    *,
    units: dict[str, str] | None = None,
) -> OutMessage:
    """A closed step with every channel filled.

    Args:
        topics: the topic tree.
        station: station name.
        step_s: step start, seconds since the epoch.
        cadence_s: step length, seconds.
        channels: C names.
        values: [C] float physical units, every channel filled.
        imputed: [C] bool, True where the value was filled in (not observed).
        method: ``model``, ``locf`` or ``interpolation`` (how imputed values were made).
        model_version: the card's model version (0 without a model).
        created_s: gateway time, seconds (stamped into the outbox, not the payload).
        units: channel -> physical unit (the card's); None: ``{}``.

    Returns:
        The :class:`OutMessage` for ``{prefix}/stations/{station}/filled`` (contract ``gapcast/filled/1``).
    """
    mid = message_id(station, step_s, "filled", model_version)
    body = {
        "schema": SCHEMA_IDS["filled"],
        "id": mid,
        "station": station,
        "ts": iso(step_s),
        "epoch_s": int(step_s),
        "cadence_s": int(cadence_s),
        "revision": False,
        "values": _vals(channels, values),
        "imputed": [c for c, f in zip(channels, imputed) if f],
        "method": method if bool(np.any(imputed)) else "observed",
        "model_version": int(model_version),
        "units": _units(channels, units),
    }
    return OutMessage(topics.filled(station), _dumps(body), "filled", mid, created_s=created_s)


def revision_message(
    topics: Topics,
    station: str,
    first_step_s: int,
    cadence_s: int,
    channels: tuple[str, ...],
    values: np.ndarray,
    imputed: np.ndarray,
    method: str,
    model_version: int,
    reason: str,
    created_s: float = 0.0,
    *,
    units: dict[str, str] | None = None,
) -> OutMessage:
    """A revision of several consecutive closed steps (a gap re-filled with context on both sides).

    Args:
        first_step_s: start of the first revised step, seconds since the epoch.
        values: [N, C] physical units, every channel filled.
        imputed: [N, C] bool.
        method: ``model`` or ``interpolation``.
        reason: ``gap_end`` (an outage ended) or ``late_reading`` (a late reading updated a closed step).
        (others as :func:`filled_message`)

    Returns:
        The :class:`OutMessage` for ``{prefix}/stations/{station}/revisions`` (contract ``gapcast/revision/1``;
        ``"revision": true`` is kept for subscribers of the first payloads).
    """
    n = int(values.shape[0])
    last_s = first_step_s + (n - 1) * cadence_s
    # Two revisions of the same range (a gap end, then a late reading) must not share an id, or a deduplicating
    # subscriber drops the newer one; the reason and the imputed pattern tell them apart and are deterministic
    # (a replay after a restart yields the same id).
    pattern = hashlib.sha256(reason.encode() + np.packbits(np.asarray(imputed, dtype=bool)).tobytes()).hexdigest()
    mid = message_id(station, first_step_s, "revision", model_version, extra=f"{iso(last_s)}:{reason}:{pattern[:8]}")
    body = {
        "schema": SCHEMA_IDS["revision"],
        "id": mid,
        "station": station,
        "revision": True,
        "reason": reason,
        "start": iso(first_step_s),
        "end": iso(last_s),
        "cadence_s": int(cadence_s),
        "method": method,
        "model_version": int(model_version),
        "steps": [
            {
                "ts": iso(first_step_s + i * cadence_s),
                "epoch_s": int(first_step_s + i * cadence_s),
                "values": _vals(channels, values[i]),
                "imputed": [c for c, f in zip(channels, imputed[i]) if f],
            }
            for i in range(n)
        ],
        "units": _units(channels, units),
    }
    return OutMessage(topics.revisions(station), _dumps(body), "revision", mid, created_s=created_s)


def forecast_message(
    topics: Topics,
    station: str,
    origin_s: int,
    cadence_s: int,
    channels: tuple[str, ...],
    forecast: np.ndarray,
    imputed_share: float,
    method: str,
    model_version: int,
    issued_s: float,
    *,
    units: dict[str, str] | None = None,
) -> OutMessage:
    """A forecast of H steps after a closed step.

    Args:
        origin_s: start of the last step of the input window, seconds since the epoch.
        forecast: [H, C] physical units; step h starts at ``origin_s + (h + 1) * cadence_s``.
        imputed_share: share of the L x C input window that was not observed, 0..1.
        method: ``model``, ``seasonal_naive`` or ``persistence``.
        issued_s: gateway time the forecast was made, seconds since the epoch.
        (others as :func:`filled_message`)

    Returns:
        The :class:`OutMessage` for ``{prefix}/stations/{station}/forecast`` (contract ``gapcast/forecast/1``):
        ``"steps": [{"ts": RFC 3339, "values": {channel: number}}, ...]``, one object per step. An array of
        objects, not parallel arrays, because Telegraf's json_v2 parser (``[[...object]]`` with ``path = "steps"``
        and ``timestamp_key = "ts"``) and Node-RED's split node take it as it is, one point per step.
    """
    mid = message_id(station, origin_s, "forecast", model_version)
    H = int(forecast.shape[0])
    rows = np.round(forecast.astype(np.float64), 4).tolist()
    body = {
        "schema": SCHEMA_IDS["forecast"],
        "id": mid,
        "station": station,
        "origin": iso(origin_s),
        "start": iso(origin_s + cadence_s),
        "issued": iso(issued_s),
        "cadence_s": int(cadence_s),
        "horizon": H,
        "model_version": int(model_version),
        "method": method,
        "imputed_share": round(float(imputed_share), 4),
        "steps": [
            {"ts": iso(origin_s + (h + 1) * cadence_s), "values": dict(zip(channels, rows[h]))} for h in range(H)
        ],
        "units": _units(channels, units),
    }
    return OutMessage(topics.forecast(station), _dumps(body), "forecast", mid, created_s=issued_s)


def status_message(topics: Topics, body: dict, now_s: float, model_version: int) -> OutMessage:
    """The retained gateway status (``state`` ``online``); ``body`` holds counters, backend, model and reasons."""
    mid = message_id(topics.gateway, now_s, "status", model_version)
    full = {
        "schema": SCHEMA_IDS["status"], "id": mid, "gateway": topics.gateway, "state": "online", "ts": iso(now_s),
        **body,
    }
    return OutMessage(topics.status, _dumps(full), "status", mid, retain=True, created_s=now_s)


def offline_payload(gateway: str, reason: str = "connection lost", *, fleet: str | None = None) -> bytes:
    """The Last Will (and clean-shutdown) status payload: ``{"gateway", "state": "offline", "reason"[, "fleet"]}``.

    ``fleet`` (the gateway's ``gateway.fleet``) keeps an offline gateway listed by ``gapcast fleet status``.
    """
    body = {"schema": SCHEMA_IDS["status"], "gateway": gateway, "state": "offline", "reason": reason}
    if fleet is not None:
        body["fleet"] = fleet
    return _dumps(body)


def deadletter_message(
    topics: Topics, topic: str, payload: bytes, rejection: Rejection, now_s: float, excerpt_bytes: int = 256
) -> OutMessage:
    """A rejected input, for ``{prefix}/deadletter/{gateway}``.

    The id hashes the topic, payload and kind, so the same bad input dead-lettered twice has the same id. The
    payload excerpt is at most ``excerpt_bytes`` (a flood of large bad payloads is not amplified).
    """
    h = hashlib.sha256(topic.encode(errors="replace") + b"\0" + payload).hexdigest()[:16]
    mid = f"{topics.gateway}:deadletter:{rejection.kind}:{h}"
    body = {
        "schema": SCHEMA_IDS["deadletter"],
        "id": mid,
        "gateway": topics.gateway,
        "received": iso(now_s),
        "topic": topic[:256],
        "kind": rejection.kind,
        "reason": rejection.reason,
        "payload_bytes": len(payload),
        "payload_excerpt": payload[:excerpt_bytes].decode("utf-8", errors="replace"),
        "payload_sha256_16": h,
    }
    return OutMessage(topics.deadletter, _dumps(body), "deadletter", mid, created_s=now_s)

