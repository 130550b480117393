"""MQTT payloads: parsing and validating readings, building the agent's outputs. Pure: no I/O, no clock reads.

Topics (docs/ARCHITECTURE.md, "Contracts"; ``prefix`` defaults to ``gapcast/v1``)::

    {prefix}/stations/{station}/readings    in   {"ts": "2017-01-01T00:00:00Z" | 1483228800, "values": {...}}
                                                 (or any ``input.topic`` template, e.g. ``sensors/{station}/{channel}``
                                                 with a bare number or ``{"value": x, "ts": ...}`` per message)
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

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from gapcast.timefmt import format_rfc3339

__all__ = [
    "MISSING_KINDS",
    "AGGREGATES",
    "DEFAULT_READINGS_TOPIC",
    "REJECTION_KINDS",
    "SCHEMA_IDS",
    "OutMessage",
    "Reading",
    "ReadingSchema",
    "Rejection",
    "RetainedFilter",
    "Topics",
    "deadletter_message",
    "drift_message",
    "skill_message",
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
    "topic_matches",
    "topic_prefix_problem",
    "topic_template_problem",
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
    "too_many_readings",
)
#: Rules for several readings of one channel inside one step (``gapcast.edge.window``).
AGGREGATES = ("mean", "last", "sum")
#: The default readings topic template (``input.topic``).
DEFAULT_READINGS_TOPIC = "{prefix}/stations/{station}/readings"

#: The contract id each payload kind carries in its ``schema`` field (the JSON Schema's ``$id`` ends with it).
SCHEMA_IDS = {
    kind: f"gapcast/{kind}/1"
    for kind in ("reading", "filled", "revision", "forecast", "status", "model", "deadletter", "manifest", "notice",
                 "skill", "drift")
}

# fullmatch, ASCII digits only: "$" would let a trailing newline through, "\d" every Unicode digit.
_STATION_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
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


def topic_matches(filter_: str, topic: str) -> bool:
    """Whether MQTT topic filter ``filter_`` (``+`` one level, ``#`` the rest) matches ``topic``.

    Source: MQTT 3.1.1 section 4.7 (topic names and filters).
    """
    f, t = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _template_levels(template: str, prefix: str) -> list[str]:
    return template.replace("{prefix}", prefix).split("/")


def topic_template_problem(template: str, prefix: str, gateway: str = "gw") -> str | None:
    """Why ``template`` cannot be the readings topic template (``input.topic``), or None when it can.

    A template is a topic whose levels are literals or exactly ``{station}`` (required, once), ``{channel}``
    (optional, once: per-channel topics whose payload is one value) or ``{prefix}`` (the ``mqtt.topic_prefix``
    levels). It must hold no wildcard or NUL, no empty level, and must not match a topic the gateway publishes
    (its own outputs would come back in as readings).
    """
    if not template:
        return "must not be empty"
    if any(c in template for c in "+#\0"):
        return f"{template!r} must not hold + # or NUL (the subscription filter is derived from it)"
    levels = _template_levels(template, prefix)
    if any(not lv for lv in levels):
        return f"{template!r} has an empty level (leading, trailing or double '/')"
    for lv in levels:
        if ("{" in lv or "}" in lv) and lv not in ("{station}", "{channel}"):
            return f"level {lv!r} of {template!r}: placeholders are {{prefix}}, {{station}}, {{channel}}, each a whole level"
    if levels.count("{station}") != 1:
        return f"{template!r} needs {{station}} exactly once"
    if levels.count("{channel}") > 1:
        return f"{template!r} holds {{channel}} more than once"
    flt = "/".join("+" if lv in ("{station}", "{channel}") else lv for lv in levels)
    t = Topics(prefix, gateway)
    for own in (t.filled("X"), t.forecast("X"), f"{prefix}/stations/X/revisions", t.status,
                f"{prefix}/gateways/{gateway}/model", t.deadletter, f"{prefix}/fleet/X/manifest"):
        if topic_matches(flt, own):
            return f"{template!r} also matches the gateway's own output topic {own!r}"
    return None


@dataclass(frozen=True)
class Topics:
    """The topic tree of one gateway: the one place topic strings are built and parsed.

    Args:
        prefix: topic prefix, e.g. ``gapcast/v1``.
        gateway: gateway id; the default ``+`` (a subscriber that serves every gateway) makes ``status`` and
            ``deadletter`` subscription filters.
        readings_template: where readings come in (``input.topic``; checked by :func:`topic_template_problem`):
            ``{prefix}/stations/{station}/readings`` (default, one JSON reading per message) or a template with
            ``{channel}`` (one channel's value per message).
    """

    prefix: str
    gateway: str = "+"
    readings_template: str = DEFAULT_READINGS_TOPIC

    #: Station output kinds and their topic level (``{prefix}/stations/{station}/{level}``).
    OUTPUT_LEVELS = {"filled": "filled", "revision": "revisions", "forecast": "forecast"}

    @property
    def per_channel(self) -> bool:
        """Whether readings come one channel per message (the template holds ``{channel}``)."""
        return "{channel}" in self.readings_template

    @property
    def readings_filter(self) -> str:
        """The subscription filter for every station's readings (``+`` for ``{station}`` and ``{channel}``)."""
        if self.readings_template == DEFAULT_READINGS_TOPIC:
            return f"{self.prefix}/stations/+/readings"
        levels = _template_levels(self.readings_template, self.prefix)
        return "/".join("+" if lv in ("{station}", "{channel}") else lv for lv in levels)

    def station_of(self, topic: str) -> str | Rejection:
        """The station name of a readings topic, or a ``bad_topic`` :class:`Rejection`."""
        parsed = self.parse_topic(topic)
        return parsed if isinstance(parsed, Rejection) else parsed[0]

    def parse_topic(self, topic: str) -> tuple[str, str | None] | Rejection:
        """``(station, channel)`` of a readings topic (channel None unless the template has ``{channel}``), or a
        ``bad_topic`` :class:`Rejection`."""
        if self.readings_template == DEFAULT_READINGS_TOPIC:
            head = self.prefix + "/stations/"
            if not topic.startswith(head) or not topic.endswith("/readings"):
                return Rejection("bad_topic", f"topic {topic[:200]!r} is not {head}<station>/readings")
            station, channel = topic[len(head) : -len("/readings")], None
        else:
            levels = _template_levels(self.readings_template, self.prefix)
            got = topic.split("/")
            if len(got) != len(levels) or any(
                lv != g for lv, g in zip(levels, got) if lv not in ("{station}", "{channel}")
            ):
                return Rejection("bad_topic", f"topic {topic[:200]!r} does not match {self.readings_template!r}")
            station = got[levels.index("{station}")]
            channel = got[levels.index("{channel}")] if "{channel}" in levels else None
            if channel is not None and not 1 <= len(channel) <= 64:
                return Rejection("bad_topic", f"channel level {channel[:80]!r} must be 1-64 characters")
        if not _STATION_RE.fullmatch(station):
            return Rejection("bad_topic", f"station name {station[:80]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        return station, channel

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
            if level == lvl and _STATION_RE.fullmatch(station):
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

    @property
    def skill(self) -> str:
        """Retained rolling forecast skill of the gateway (``gapcast/skill/1``)."""
        return f"{self.prefix}/gateways/{self.gateway}/skill"

    @property
    def drift(self) -> str:
        """Retained drift notice: the stations whose model is worse than the better naive method (``gapcast/drift/1``)."""
        return f"{self.prefix}/gateways/{self.gateway}/drift"


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

    The keyword defaults are the strict rules of the pure parser; the gateway's own defaults come from ``edge.toml``
    (``gapcast.edge.config.InputSettings``: unknown channels ignored, epoch seconds or milliseconds).

    Args:
        channels: channel names in model column order.
        valid_min, valid_max: [C] physical ranges; outside counts as missing (``out_of_range``).
        sentinels: values that mean "missing", compared exactly with the value as sent (before ``scale``).
        max_payload_bytes: larger payloads are rejected unparsed.
        max_json_depth: deeper nesting is rejected.
        unknown_channels: ``reject`` or ``ignore``.
        aliases: name a station sends -> the model channel it feeds (``{"pm25": "PM2.5"}``).
        scale: name as sent (a channel or an alias) -> factor applied to its value, e.g. 1000 for mg/m3 -> ug/m3.
        epoch: numeric ``ts``: ``s`` (epoch seconds), ``ms`` (epoch milliseconds) or ``auto`` (by magnitude, see
            :func:`parse_timestamp`).
        max_keys: most keys one JSON object of a payload may hold (a flood of keys costs time, not bytes).

    Raises:
        ValueError: an alias to a name that is not a channel, an alias that is itself a channel name, a scale for
            an unknown name or a scale that is zero or not finite, an unknown ``epoch`` or ``unknown_channels``.
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
        aliases: dict[str, str] | None = None,
        scale: dict[str, float] | None = None,
        epoch: str = "s",
        max_keys: int = 1024,
    ) -> None:
        self.channels = tuple(channels)
        self.index = {name: i for i, name in enumerate(self.channels)}
        for alias, target in (aliases or {}).items():
            if target not in self.index:
                msg = f"aliases.{alias}: {target!r} is not a channel of the model ({', '.join(self.channels)})"
                raise ValueError(msg)
            if alias in self.channels:
                msg = f"aliases.{alias}: {alias!r} is a model channel itself; an alias must be another name"
                raise ValueError(msg)
            self.index[alias] = self.index[target]
        self.scale: dict[str, float] = {}
        for name, f in (scale or {}).items():
            if name not in self.index:
                msg = f"scale.{name}: {name!r} is neither a channel of the model nor an alias"
                raise ValueError(msg)
            if not (math.isfinite(float(f)) and float(f) != 0.0):
                msg = f"scale.{name}: must be a finite, non-zero number, got {f!r}"
                raise ValueError(msg)
            if float(f) != 1.0:
                self.scale[name] = float(f)
        if epoch not in ("s", "ms", "auto"):
            msg = f"epoch must be s, ms or auto, got {epoch!r}"
            raise ValueError(msg)
        if unknown_channels not in ("reject", "ignore"):
            msg = f"unknown_channels must be reject or ignore, got {unknown_channels!r}"
            raise ValueError(msg)
        self.valid_min = [float(x) for x in valid_min]
        self.valid_max = [float(x) for x in valid_max]
        self.sentinels = frozenset(float(s) for s in sentinels)
        self.max_payload_bytes = int(max_payload_bytes)
        self.max_json_depth = int(max_json_depth)
        self.unknown_channels = unknown_channels
        self.epoch = epoch
        self.max_keys = int(max_keys)
        self.decoder = _decoder(self.max_keys)


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


class _DuplicateKey(ValueError):
    """A JSON object names a key twice (RFC 8259 section 4: names SHOULD be unique; we require it)."""


class _TooManyKeys(ValueError):
    """A JSON object holds more than ``max_keys`` keys."""


def _decoder(max_keys: int) -> json.JSONDecoder:
    """The reading decoder: NaN as a marker, Infinity refused, duplicate keys and key floods refused.

    Built once per schema: building a JSONDecoder per call costs more than parsing a small payload.
    """

    def pairs(items: list[tuple[str, object]]) -> dict:
        if len(items) > max_keys:
            raise _TooManyKeys(f"a JSON object holds {len(items)} keys > max_keys {max_keys}")
        d = dict(items)
        if len(d) != len(items):
            seen: set[str] = set()
            dup = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise _DuplicateKey(f"key {dup[:40]!r} appears more than once (the last one would silently win)")
        return d

    return json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=pairs)


def parse_timestamp(ts: object, *, epoch: str = "s") -> float | Rejection:
    """Parse a reading's ``ts``: RFC 3339 text with a UTC offset, or an epoch number (int or float).

    Args:
        ts: the JSON value.
        epoch: how a number is read: ``s`` epoch seconds, ``ms`` epoch milliseconds, or ``auto`` by magnitude: a
            number in 946,684,800 .. 4,102,444,800 (2000..2100 in seconds) is seconds, one in 946,684,800,000 ..
            4,102,444,800,000 (the same span in milliseconds) is milliseconds. The two spans are three orders of
            magnitude apart, so no sensor time is ambiguous; anything else is rejected.

    Returns:
        Seconds since the epoch, or a ``bad_timestamp`` / ``non_finite`` :class:`Rejection` (naive local times,
        booleans, numbers beyond float range such as 10**400, times outside 2000..2100).

    Source: RFC 3339 section 5.6 (``Z`` or ``+hh:mm`` offsets required).
    """
    if isinstance(ts, bool):
        return Rejection("bad_timestamp", "ts must be RFC 3339 text or epoch seconds, got a boolean")
    if isinstance(ts, int | float):
        try:
            t = float(ts)
        except OverflowError:  # an int beyond float range (10**400): JSON allows it, Python's float does not
            return Rejection("bad_timestamp", f"ts is an integer of {int(ts).bit_length()} bits, beyond float range")
        if not math.isfinite(t):
            return Rejection("non_finite", "ts is NaN" if math.isnan(t) else f"ts is not finite ({t})")
        if epoch == "ms" or (epoch == "auto" and not (_TS_MIN <= t < _TS_MAX) and _TS_MIN <= t / 1000 < _TS_MAX):
            t /= 1000.0
            if not (_TS_MIN <= t < _TS_MAX):
                return Rejection("bad_timestamp", f"ts {t * 1000:.0f} ms is outside 2000..2100")
            return t
    elif isinstance(ts, str):
        if (hit := _TS_TEXT.get(ts)) is not None:  # stations of one network send the same step times
            return hit
        m = _RFC3339.fullmatch(ts)
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
        hint = "as epoch seconds or milliseconds" if epoch == "auto" else "(epoch milliseconds?)"
        return Rejection("bad_timestamp", f"ts {t:.0f} s is outside 2000..2100 {hint}")
    if isinstance(ts, str):  # valid RFC 3339 text -> seconds, whatever ``epoch`` says (it is for numbers)
        if len(_TS_TEXT) >= _TS_TEXT_MAX:
            _TS_TEXT.clear()
        _TS_TEXT[ts] = t
    return t


#: Parsed RFC 3339 texts (issue 17: parsing one took about a third of ingest's CPU); bounded, cleared when full.
_TS_TEXT: dict[str, float] = {}
_TS_TEXT_MAX = 4096


def _decode(payload: bytes, schema: ReadingSchema) -> object | Rejection:
    """Size, UTF-8 and JSON checks shared by both payload formats."""
    if len(payload) > schema.max_payload_bytes:
        return Rejection("payload_too_large", f"{len(payload)} bytes > max_payload_bytes {schema.max_payload_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("bad_encoding", f"payload is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        return schema.decoder.decode(text)
    except RecursionError:
        return Rejection("too_deep", f"JSON nesting deeper than max_json_depth {schema.max_json_depth}")
    except _TooManyKeys as exc:
        return Rejection("bad_schema", str(exc))
    except _DuplicateKey as exc:
        return Rejection("bad_json", f"payload is not valid for us as JSON: {exc}")
    except ValueError as exc:  # JSONDecodeError, the int digit limit (sys.get_int_max_str_digits), Infinity
        if "non-finite" in str(exc):
            return Rejection("non_finite", f"{exc} (JSON has no Infinity; send null for a missing value)")
        return Rejection("bad_json", f"payload is not JSON: {str(exc)[:120]}")


class _Acc:
    """Accumulates one payload's channel values (the shared part of both payload formats)."""

    def __init__(self, schema: ReadingSchema) -> None:
        C = len(schema.channels)
        self.schema = schema
        self.values = np.full(C, np.nan, dtype=np.float32)
        self.observed = np.zeros(C, dtype=bool)
        self.fed = np.zeros(C, dtype=bool)
        self.by: dict[int, str] = {}
        self.missing: dict[str, int] = {}
        self.ignored: list[str] = []

    def add(self, name: str, v: object) -> Rejection | None:
        schema = self.schema
        i = schema.index.get(name)
        if i is None:
            if schema.unknown_channels == "ignore":
                self.ignored.append(name)
                return None
            return Rejection("unknown_channel", f"unknown channel {name[:40]!r} (this model reads {', '.join(schema.channels)})")
        if self.fed[i]:
            return Rejection(
                "bad_schema", f"channels {self.by[i][:40]!r} and {name[:40]!r} both feed {schema.channels[i]!r}"
            )
        self.fed[i] = True
        self.by[i] = name
        if v is None:
            self.missing["null"] = self.missing.get("null", 0) + 1
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            if isinstance(v, dict | list) and 2 + _depth(v, schema.max_json_depth) > schema.max_json_depth:
                return Rejection("too_deep", f"channel {name[:40]!r} nests deeper than max_json_depth {schema.max_json_depth}")
            return Rejection(
                "bad_type", f"channel {name[:40]!r}: a number or null is required, got {type(v).__name__} {str(v)[:40]!r}"
            )
        try:
            x = float(v)
        except OverflowError:
            self.missing["out_of_range"] = self.missing.get("out_of_range", 0) + 1
            return None
        if math.isnan(x):
            self.missing["nan"] = self.missing.get("nan", 0) + 1
            return None
        if x in schema.sentinels:
            self.missing["sentinel"] = self.missing.get("sentinel", 0) + 1
            return None
        x *= schema.scale.get(name, 1.0)
        if not (schema.valid_min[i] <= x <= schema.valid_max[i]):
            self.missing["out_of_range"] = self.missing.get("out_of_range", 0) + 1
            return None
        self.values[i] = x
        self.observed[i] = True
        return None

    def reading(self, ts: float) -> Reading | Rejection:
        if self.ignored and not self.fed.any():
            # Nothing in it is a channel of the model: reported, not merged as an empty reading.
            return Rejection(
                "unknown_channel",
                f"no channel of this model in the reading (unknown: {', '.join(n[:40] for n in self.ignored[:5])}; "
                f"this model reads {', '.join(self.schema.channels)})",
            )
        return Reading(ts_s=ts, values=self.values, observed=self.observed, missing=self.missing, ignored=tuple(self.ignored))


def parse_reading(
    payload: bytes, schema: ReadingSchema, *, channel: str | None = None, arrival_s: float | None = None
) -> Reading | Rejection:
    """Parse and validate one reading payload.

    Args:
        payload: the raw MQTT payload. Without ``channel``: UTF-8 JSON ``{"ts": ..., "values": {"PM2.5": 12.0}}``.
            With ``channel`` (a per-channel topic): a bare JSON number (``12.5``; ``null`` or ``NaN`` = missing),
            or ``{"value": 12.5, "ts": ...}`` where ``ts`` is optional.
        schema: the model's :class:`ReadingSchema`.
        channel: the channel name from the topic (per-channel topics), or None.
        arrival_s: the gateway time the message arrived, seconds since the epoch: the event time of a per-channel
            value that carries no ``ts``.

    Returns:
        A :class:`Reading` (missing values are unobserved and counted by kind), or a :class:`Rejection`: payload
        too large, not UTF-8, not JSON (duplicate keys included), nested deeper than ``max_json_depth``, an object
        with more than ``max_keys`` keys, not an object, ``ts`` or ``values`` missing or mistyped, a
        string/boolean/container for a number, ``Infinity``, an unknown channel (with ``unknown_channels =
        "ignore"``: a reading none of whose channels is known), two names feeding the same channel.
    """
    doc = _decode(payload, schema)
    if isinstance(doc, Rejection):
        return doc
    if channel is not None:
        return _parse_value(doc, channel, schema, arrival_s)
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
    ts = parse_timestamp(doc["ts"], epoch=schema.epoch)
    if isinstance(ts, Rejection):
        return ts
    acc = _Acc(schema)
    for name, v in vals.items():
        rej = acc.add(name, v)
        if rej is not None:
            return rej
    return acc.reading(ts)


def _parse_value(doc: object, channel: str, schema: ReadingSchema, arrival_s: float | None) -> Reading | Rejection:
    """One channel's value from a per-channel topic: a bare number / null, or ``{"value": x[, "ts": t]}``."""
    ts: object = None
    if isinstance(doc, dict):
        extra = sorted(set(doc) - {"value", "ts"})
        if "value" not in doc or extra:
            why = f"unknown key(s) {', '.join(repr(k[:40]) for k in extra[:5])}" if extra else "no 'value'"
            return Rejection("bad_schema", f"a per-channel payload is a number or {{\"value\": x, \"ts\": t}}; {why}")
        if isinstance(doc["value"], dict | list) and 2 + _depth(doc["value"], schema.max_json_depth) > schema.max_json_depth:
            return Rejection("too_deep", f"'value' nests deeper than max_json_depth {schema.max_json_depth}")
        if isinstance(doc.get("ts"), dict | list) and 1 + _depth(doc["ts"], schema.max_json_depth) > schema.max_json_depth:
            return Rejection("too_deep", f"'ts' nests deeper than max_json_depth {schema.max_json_depth}")
        ts, value = doc.get("ts"), doc["value"]
    elif isinstance(doc, list):
        if 1 + _depth(doc, schema.max_json_depth) > schema.max_json_depth:
            return Rejection("too_deep", f"JSON nesting deeper than max_json_depth {schema.max_json_depth}")
        return Rejection("bad_schema", "a per-channel payload is a number or {\"value\": x, \"ts\": t}, got a list")
    else:
        value = doc
    if ts is None:
        if arrival_s is None:
            return Rejection("bad_timestamp", "a per-channel value without 'ts' needs the arrival time")
        t: float | Rejection = float(arrival_s)
    else:
        t = parse_timestamp(ts, epoch=schema.epoch)
    if isinstance(t, Rejection):
        return t
    if isinstance(value, str):
        return Rejection("bad_type", f"channel {channel[:40]!r}: a number or null is required, got str {value[:40]!r}")
    acc = _Acc(schema)
    rej = acc.add(channel, value)
    if rej is not None:
        return rej
    return acc.reading(t)


class RetainedFilter:
    """Remembers retained readings already dead-lettered, so a broker that re-sends them on every reconnect (MQTT
    3.1.1 has no "do not send retained" option) gets each dead-lettered once and the repeats only counted.

    Memory is bounded: at most ``capacity`` (topic, payload) digests of 16 bytes (about 150 bytes each with the
    dict); past that the oldest is forgotten (and would be dead-lettered again if it came back). Pure.

    Args:
        capacity: most digests remembered.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = int(capacity)
        self._seen: dict[bytes, None] = {}
        self.repeats = 0

    def first_time(self, topic: str, payload: bytes) -> bool:
        """True the first time this (topic, payload) is seen (dead-letter it); False for a repeat (count it)."""
        h = hashlib.sha256(topic.encode(errors="replace") + b"\0" + payload).digest()[:16]
        if h in self._seen:
            self.repeats += 1
            return False
        self._seen[h] = None
        if len(self._seen) > self.capacity:
            del self._seen[next(iter(self._seen))]
        return True

    def __len__(self) -> int:
        return len(self._seen)


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


try:  # the step outputs' encoder (issue 17): orjson writes the same compact JSON about 10x faster than json
    import orjson as _orjson
except ImportError:  # pragma: no cover - an edge install without orjson encodes with json, same bytes
    _orjson = None


def _dumps_step(obj: dict) -> bytes:
    """:func:`_dumps` for the filled / revision / forecast bodies, the same bytes, faster (issue 17: encoding was
    about a third of the agent's CPU per step). Their floats are rounded to 4 decimals, where orjson's shortest
    float text equals Python's ``repr``; anything orjson writes differently from ``json.dumps`` (a non-ASCII
    character, which json escapes; ``null``, which orjson also writes for NaN where json raises) goes through
    :func:`_dumps`."""
    if _orjson is not None:
        b = _orjson.dumps(obj)
        if b.isascii() and b"null" not in b:
            return b
    return _dumps(obj)


#: Step timestamps repeat across stations and forecasts: their RFC 3339 text is cached (same text, no gmtime).
_iso_step = functools.lru_cache(maxsize=8192)(format_rfc3339)


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
    return OutMessage(topics.filled(station), _dumps_step(body), "filled", mid, created_s=created_s)


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
    return OutMessage(topics.revisions(station), _dumps_step(body), "revision", mid, created_s=created_s)


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
            {"ts": _iso_step(int(origin_s + (h + 1) * cadence_s)), "values": dict(zip(channels, rows[h]))} for h in range(H)
        ],
        "units": _units(channels, units),
    }
    return OutMessage(topics.forecast(station), _dumps_step(body), "forecast", mid, created_s=issued_s)


def status_message(topics: Topics, body: dict, now_s: float, model_version: int) -> OutMessage:
    """The retained gateway status (``state`` ``online``); ``body`` holds counters, backend, model and reasons."""
    mid = message_id(topics.gateway, now_s, "status", model_version)
    full = {
        "schema": SCHEMA_IDS["status"], "id": mid, "gateway": topics.gateway, "state": "online", "ts": iso(now_s),
        **body,
    }
    return OutMessage(topics.status, _dumps(full), "status", mid, retain=True, created_s=now_s)


def skill_message(topics: Topics, body: dict, now_s: float, model_version: int) -> OutMessage:
    """The retained skill message: ``body`` = ``{"span", "buckets", "fill", "stations": {name: figures}}``."""
    mid = message_id(topics.gateway, now_s, "skill", model_version)
    full = {"schema": SCHEMA_IDS["skill"], "id": mid, "gateway": topics.gateway, "ts": iso(now_s),
            "model_version": int(model_version), **body}
    # kind "status": a full outbox drops it like a status (the next one supersedes it)
    return OutMessage(topics.skill, _dumps(full), "status", mid, retain=True, created_s=now_s)


def drift_message(topics: Topics, stations: list[dict], now_s: float, model_version: int) -> OutMessage:
    """The retained drift notice: ``stations`` = the evidence per station in drift (empty: no drift, cleared)."""
    mid = message_id(topics.gateway, now_s, "drift", model_version)
    full = {"schema": SCHEMA_IDS["drift"], "id": mid, "gateway": topics.gateway, "ts": iso(now_s),
            "model_version": int(model_version), "drift": bool(stations), "stations": stations}
    return OutMessage(topics.drift, _dumps(full), "status", mid, retain=True, created_s=now_s)


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

