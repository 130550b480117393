"""From a gapcast output message to the rows of a tidy time-series store. Pure: no I/O, no clock reads.

The store holds one row per (station, channel, ts) of the series, whose ``status`` says where the value comes from:

- ``observed``: the station measured it (the channel is not in the message's ``imputed`` list);
- ``filled``: the gateway imputed it in real time (a ``filled`` message);
- ``revised``: the gateway re-filled it later with context on both sides (a ``revision`` message).

A revision supersedes the filled values of its steps (rank 2 beats rank 1 whatever the arrival order), and the later
of two revisions of one step wins. Forecasts go to their own rows, one per (station, origin, ts) holding every channel: ``origin``
is the step the forecast was issued at, ``lead`` the step count ahead (1..H).

Validation (JSON Schema 2020-12, the schemas of ``gapcast.edge.schemas``) is :class:`Checker`'s job; :func:`decode`
assumes a valid payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gapcast.edge.schemas import load_schema
from gapcast.timefmt import parse_rfc3339

__all__ = ["RANK", "STATUSES", "Checker", "Decoded", "ForecastRow", "ValueRow", "decode"]

#: The statuses a series value can have.
STATUSES = ("observed", "filled", "revised")
#: Which message kind may overwrite which: a higher or equal rank replaces a stored value.
RANK = {"filled": 1, "revision": 2}


class ValueRow(NamedTuple):
    """One value of the series (a tuple in the column order of the ``series`` table: cheap to build by the
    thousand and handed to SQLite as is).

    Attributes:
        station, channel: names as in the payload.
        ts: step start, seconds since the epoch (UTC).
        value: in the channel's ``unit``.
        status: ``observed``, ``filled`` or ``revised``.
        model_version: the model that produced (or passed through) the value.
        rank: 1 from a filled message, 2 from a revision.
        unit: the channel's unit (from the payload's ``units``; "" when absent).
    """

    station: str
    channel: str
    ts: int
    value: float
    status: str
    model_version: int
    rank: int
    unit: str = ""


class ForecastRow(NamedTuple):
    """One forecast step (a tuple in the ``forecasts`` table's column order): ``station``, ``origin`` (the step it
    was issued at, epoch s), ``ts`` (the target step, epoch s), ``lead`` (steps ahead, 1..H), ``values`` (channel ->
    value, the channels' units), ``issued`` (RFC 3339 gateway time), ``method``, ``model_version``.

    One row per step, not per channel: a 24-step, 13-channel forecast is 24 rows, not 312, which is what lets one
    sink keep up with thousands of stations (``gapcast bench sink``); SQLite's ``json_each`` unnests ``values``."""

    station: str
    origin: int
    ts: int
    lead: int
    values: dict[str, float]
    issued: str
    method: str
    model_version: int


@dataclass
class Decoded:
    """What one message writes: its ``kind`` and ``msg_id``, and its value or forecast rows."""

    kind: str
    msg_id: str
    station: str
    values: list[ValueRow] = field(default_factory=list)
    forecasts: list[ForecastRow] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)


def _epoch(ts: str) -> int:
    return int(parse_rfc3339(ts))


def decode(kind: str, body: dict[str, Any]) -> Decoded:
    """The rows of one valid message.

    Args:
        kind: ``filled``, ``revision`` or ``forecast`` (the topic's kind).
        body: the parsed payload, valid against its schema.

    Returns:
        The :class:`Decoded` rows: a filled message gives C value rows, a revision N x C, a forecast H x C forecast
        rows (one per step).

    Raises:
        ValueError: an unknown kind.
    """
    units = body.get("units") or {}
    station, mv = body["station"], int(body["model_version"])
    out = Decoded(kind, body["id"], station)
    if kind == "filled":
        imputed = set(body["imputed"])
        ts = int(body["epoch_s"])
        out.values = [
            ValueRow(station, c, ts, float(v), "filled" if c in imputed else "observed", mv, 1, units.get(c, ""))
            for c, v in body["values"].items()
        ]
    elif kind == "revision":
        for step in body["steps"]:
            imputed = set(step["imputed"])
            ts = int(step["epoch_s"])
            out.values += [
                ValueRow(station, c, ts, float(v), "revised" if c in imputed else "observed", mv, 2, units.get(c, ""))
                for c, v in step["values"].items()
            ]
    elif kind == "forecast":
        origin = _epoch(body["origin"])
        cad = int(body["cadence_s"])
        issued, method = body["issued"], body["method"]
        # Step h starts at origin + h * cadence (the schema's contract; the steps carry it as ts).
        out.forecasts = [
            ForecastRow(station, origin, origin + h * cad, h, step["values"], issued, method, mv)
            for h, step in enumerate(body["steps"], start=1)
        ]
        out.units = dict(units)
    else:
        msg = f"the sink stores filled, revision and forecast messages, not {kind!r}"
        raise ValueError(msg)
    return out


class Checker:
    """Validates payloads against their gapcast schemas with ``jsonschema-rs`` (Rust; Draft 2020-12 from the schemas'
    ``$schema``): about 0.06 ms for a 24-step, 13-channel forecast, where the pure-Python ``jsonschema`` takes
    about 14 ms, which alone would cap the sink near 70 messages/s.

    Raises:
        ModuleNotFoundError: ``jsonschema-rs`` is not installed (``pip install 'gapcast[sink]'``).
    """

    def __init__(self, kinds: tuple[str, ...] = ("filled", "revision", "forecast")) -> None:
        import jsonschema_rs

        self._validators = {k: jsonschema_rs.validator_for(load_schema(k)) for k in kinds}

    def problem(self, kind: str, body: Any) -> str | None:
        """Why ``body`` is not a valid ``kind`` payload (the first error, with its JSON path), or None."""
        v = self._validators.get(kind)
        if v is None:
            return f"no schema for kind {kind!r}"
        if v.is_valid(body):
            return None
        err = next(iter(v.iter_errors(body)))
        where = "/".join(str(p) for p in err.instance_path) or "(root)"
        return f"{where}: {err.message[:200]}"
