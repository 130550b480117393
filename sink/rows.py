"""From a gapcast output message to the rows of a tidy time-series store. Pure: no I/O, no clock reads.

The store holds one row per (station, channel, ts) of the series, whose ``status`` says where the value comes from:

- ``observed``: the station measured it (the channel is not in the message's ``imputed`` list);
- ``filled``: the gateway imputed it in real time (a ``filled`` message);
- ``revised``: the gateway re-filled it later with context on both sides (a ``revision`` message).

A revision supersedes the filled values of its steps (rank 2 beats rank 1 whatever the arrival order), and the later
of two revisions of one step wins. Forecasts go to their own rows, one per (station, origin, channel, ts): ``origin``
is the step the forecast was issued at, ``lead`` the step count ahead (1..H).

Validation (JSON Schema 2020-12, the schemas of ``gapcast.edge.schemas``) is :class:`Checker`'s job; :func:`decode`
assumes a valid payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gapcast.edge.schemas import load_schema
from gapcast.timefmt import parse_rfc3339

__all__ = ["RANK", "STATUSES", "Checker", "Decoded", "ForecastRow", "ValueRow", "decode"]

#: The statuses a series value can have.
STATUSES = ("observed", "filled", "revised")
#: Which message kind may overwrite which: a higher or equal rank replaces a stored value.
RANK = {"filled": 1, "revision": 2}


@dataclass(frozen=True)
class ValueRow:
    """One value of the series.

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


@dataclass(frozen=True)
class ForecastRow:
    """One forecast value: ``station``, ``origin`` (issue step, epoch s), ``channel``, ``ts`` (target step, epoch s),
    ``lead`` (steps ahead, 1..H), ``value`` (channel unit), ``issued`` (RFC 3339 gateway time), ``method``,
    ``model_version``, ``unit``."""

    station: str
    origin: int
    channel: str
    ts: int
    lead: int
    value: float
    issued: str
    method: str
    model_version: int
    unit: str = ""


@dataclass
class Decoded:
    """What one message writes: its ``kind`` and ``msg_id``, and its value or forecast rows."""

    kind: str
    msg_id: str
    station: str
    values: list[ValueRow] = field(default_factory=list)
    forecasts: list[ForecastRow] = field(default_factory=list)


def _epoch(ts: str) -> int:
    return int(parse_rfc3339(ts))


def decode(kind: str, body: dict[str, Any]) -> Decoded:
    """The rows of one valid message.

    Args:
        kind: ``filled``, ``revision`` or ``forecast`` (the topic's kind).
        body: the parsed payload, valid against its schema.

    Returns:
        The :class:`Decoded` rows: a filled message gives C value rows, a revision N x C, a forecast H x C forecast
        rows.

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
        for step in body["steps"]:
            ts = _epoch(step["ts"])
            lead = (ts - origin) // cad
            out.forecasts += [
                ForecastRow(station, origin, c, ts, lead, float(v), issued, method, mv, units.get(c, ""))
                for c, v in step["values"].items()
            ]
    else:
        msg = f"the sink stores filled, revision and forecast messages, not {kind!r}"
        raise ValueError(msg)
    return out


class Checker:
    """Validates payloads against their gapcast schemas (``jsonschema``'s Draft 2020-12 validator, built once).

    Raises:
        ModuleNotFoundError: ``jsonschema`` is not installed (``pip install 'gapcast[sink]'``).
    """

    def __init__(self, kinds: tuple[str, ...] = ("filled", "revision", "forecast")) -> None:
        from jsonschema import Draft202012Validator

        self._validators = {k: Draft202012Validator(load_schema(k)) for k in kinds}

    def problem(self, kind: str, body: Any) -> str | None:
        """Why ``body`` is not a valid ``kind`` payload (the first error, with its JSON path), or None."""
        v = self._validators.get(kind)
        if v is None:
            return f"no schema for kind {kind!r}"
        err = next(iter(v.iter_errors(body)), None)
        if err is None:
            return None
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"{where}: {err.message[:200]}"
