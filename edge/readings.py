"""Parsing and validating readings (the gateway's input). Pure: no I/O, no clock reads.

Parsing never invents a value: a reading is either accepted with an observed mask (``null``, ``NaN``, a sentinel
or a value outside the channel's valid range are unobserved, each counted by kind) or rejected as a whole with a
:class:`Rejection` (kind + reason). JSON's grammar (RFC 8259) has no NaN or Infinity; Python's parser accepts the
literals, so the agent decides: ``NaN`` as a channel value is the conventional "no value" marker and counts as
missing (kind ``nan``); ``Infinity`` / ``-Infinity`` anywhere, or ``NaN`` outside a channel value, reject the reading
(kind ``non_finite``). Timestamps: RFC 3339, or epoch seconds / milliseconds (by magnitude, or as configured).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AGGREGATES",
    "MISSING_KINDS",
    "REJECTION_KINDS",
    "Reading",
    "ReadingSchema",
    "Rejection",
    "RetainedFilter",
    "parse_reading",
    "parse_timestamp",
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

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
# Timestamps outside 2000-01-01 .. 2100-01-01 are not sensor readings (epoch milliseconds, zero clocks...).
_TS_MIN = 946_684_800.0
_TS_MAX = 4_102_444_800.0


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
