"""The agent's outputs: building filled, revision, forecast, status, skill, drift and dead-letter messages. Pure: no
I/O, no clock reads.

Every output carries a stable ``id`` built from (station, step time, kind, model version), so a subscriber can
deduplicate the at-least-once delivery of QoS 1: the same step published twice (a retry, a restart) has the same id.

Every output names its contract, ``"schema": "gapcast/<kind>/1"`` (:data:`SCHEMA_IDS`; the JSON Schemas ship in
``gapcast.edge.schemas`` and ``gapcast schema NAME`` prints them); filled, revision and forecast payloads carry the
card's ``units``. A message the shell flushes from its outbox after a broker outage gets ``"replayed": true``
(:func:`mark_replayed`; after Sparkplug B's ``is_historical``), so a dashboard does not record it at arrival time.

The contract's other halves live next to it: :mod:`gapcast.edge.topics` (the topic layout) and
:mod:`gapcast.edge.readings` (parsing the input). Their public names are re-exported here, so
``from gapcast.edge.messages import Topics, parse_reading`` keeps working for code written against one module.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from gapcast.edge.readings import (
    AGGREGATES,
    MISSING_KINDS,
    REJECTION_KINDS,
    Reading,
    ReadingSchema,
    Rejection,
    RetainedFilter,
    parse_reading,
    parse_timestamp,
)
from gapcast.edge.topics import (
    DEFAULT_READINGS_TOPIC,
    Topics,
    topic_matches,
    topic_prefix_problem,
    topic_template_problem,
)
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

#: The contract id each payload kind carries in its ``schema`` field (the JSON Schema's ``$id`` ends with it).
SCHEMA_IDS = {
    kind: f"gapcast/{kind}/1"
    for kind in ("reading", "filled", "revision", "forecast", "status", "model", "deadletter", "manifest", "notice",
                 "skill", "drift")
}

iso = format_rfc3339  # RFC 3339 UTC text of an epoch time (gapcast.timefmt: the one formatter)


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
    context: str | None = None,
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
        context: ``neighbours`` when the model read neighbour stations' values, ``none`` when not (the agent
            always says; None leaves the key out).

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
        **({"context": context} if context is not None else {}),
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
    context: str | None = None,
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
        **({"context": context} if context is not None else {}),
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
    context: str | None = None,
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
        **({"context": context} if context is not None else {}),
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
