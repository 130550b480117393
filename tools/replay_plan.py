"""The pure half of ``gapcast replay``: time and outage parsing and the replay plan (no MQTT, no I/O).

:func:`plan_replay` turns station series into a sorted list of :class:`PlannedReading` and the exact masks of what
was withheld, so tests and the demo can check every value; :mod:`gapcast.tools.replay` publishes a plan.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from gapcast import GapcastError
from gapcast.duration import parse_duration
from gapcast.timefmt import format_rfc3339

if TYPE_CHECKING:
    from gapcast.train.data import StationSeries

__all__ = [
    "Outage",
    "PlannedReading",
    "ReplayError",
    "ReplayPlan",
    "format_ts",
    "parse_outage",
    "parse_time",
    "plan_replay",
]

log = logging.getLogger(__name__)

#: The keyword for "every channel" in an outage's channel list.
_ALL_KEYWORD = "all"


class ReplayError(GapcastError):
    """A replay cannot be planned (bad outage, empty time range) or published (broker unreachable)."""


# --------------------------------------------------------------------------------------------------- time parsing


_ISO_RE = (
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::?\d{2}(?::?\d{2})?)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?"
    r"|\+\d+(?:\.\d+)?[hd]"
)
_OUTAGE_RE = re.compile(
    rf"^(?P<station>[^:]+):(?P<start>{_ISO_RE}):(?P<length>\d+(?:\.\d+)?(?:[a-z]+(?:\d+(?:\.\d+)?[a-z]+)*)?)(?::(?P<channels>[^:]+))?$"
)


def parse_time(text: str, *, relative_to: int | None = None) -> int:
    """Parse a time given on the command line.

    Args:
        text: ISO 8601 (``2016-06-01``, ``2016-06-01T06``, ``2016-06-01T06:00``, ``2016-06-01T06:00:00+08:00``;
            UTC when no offset is given), or an offset ``+36h`` / ``+3d`` from ``relative_to``.
        relative_to: epoch seconds an offset counts from.

    Returns:
        Epoch seconds (timezone.utc).

    Raises:
        ReplayError: if the text is neither form, or an offset is given without a reference.
    """
    s = text.strip()
    if s.startswith("+"):
        if relative_to is None:
            msg = f"relative time {text!r} needs a reference (the replay start)"
            raise ReplayError(msg)
        unit = 3600 if s.endswith("h") else 86400
        try:
            return int(relative_to + round(float(s[1:-1]) * unit))
        except ValueError as exc:
            msg = f"bad relative time {text!r} (use +36h or +3d)"
            raise ReplayError(msg) from exc
    s = s.replace("Z", "+00:00")
    if re.fullmatch(r".*T\d{2}", s) or re.fullmatch(r".*T\d{2}[+-]\d{2}(:?\d{2})?", s):
        # "2016-06-01T06" (hours only) is valid ISO 8601 but not for fromisoformat before 3.11's extension.
        s = re.sub(r"T(\d{2})(?=$|[+-])", r"T\1:00", s)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as exc:
        msg = f"bad time {text!r}: use ISO 8601 like 2016-06-01T06:00 (UTC unless an offset is given) or +3d"
        raise ReplayError(msg) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


format_ts = format_rfc3339  # epoch seconds -> RFC 3339 UTC (gapcast.timefmt)


# --------------------------------------------------------------------------------------------------- outages


@dataclass(frozen=True)
class Outage:
    """An injected outage: during ``[start_s, start_s + hours * 3600)`` the station sends nothing for ``channels``.

    Attributes:
        station: station name.
        start_s: first affected step, epoch seconds (timezone.utc), inclusive.
        hours: length, hours (> 0).
        channels: the channels withheld; None = the whole station is silent (no message at all).
    """

    station: str
    start_s: int
    hours: float
    channels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.hours > 0:
            msg = f"outage of {self.station} must last > 0 hours (got {self.hours})"
            raise ReplayError(msg)

    @property
    def end_s(self) -> int:
        """First step after the outage, epoch seconds (exclusive end)."""
        return int(self.start_s + round(self.hours * 3600))

    def spec(self) -> str:
        """The command-line form of this outage (``STATION:START:HOURS[:CHANNELS]``)."""
        chans = "" if self.channels is None else ":" + ",".join(self.channels)
        hours = f"{self.hours:g}"
        return f"{self.station}:{format_ts(self.start_s)}:{hours}{chans}"


def parse_outage(
    spec: str,
    *,
    channels: Sequence[str],
    groups: Mapping[str, Sequence[str]] | None = None,
    relative_to: int | None = None,
) -> Outage:
    """Parse ``STATION:START:LENGTH[:CHANNELS]``.

    Args:
        spec: e.g. ``site-B:2016-06-01T00:00:72`` (whole station silent 72 h),
            ``site-B:+10d:24h:air`` (the channels of the spec's group ``air``, 24 h from 10 days after the
            replay start), ``site-B:2016-07-01:90min:pm25,temp``. START is :func:`parse_time`'s format; LENGTH is
            hours as a bare number or a duration with a unit (``90min``, ``3d``); CHANNELS is a comma list of
            channel names, group names of the dataset spec, or ``all`` (= the whole station).
        channels: the channel names of the data, to validate CHANNELS.
        groups: group name -> its channel names (the dataset spec's groups).
        relative_to: reference for a relative START (the replay start), epoch seconds.

    Returns:
        The :class:`Outage`.

    Raises:
        ReplayError: malformed spec, unknown channel, or non-positive length.
    """
    m = _OUTAGE_RE.match(spec.strip())
    if not m:
        msg = f"bad outage {spec!r}: use STATION:START:LENGTH[:CHANNELS], e.g. site-B:2016-06-01T00:00:72h:all"
        raise ReplayError(msg)
    start_s = parse_time(m["start"], relative_to=relative_to)
    length = m["length"]
    try:
        hours = float(length) if length[-1].isdigit() else parse_duration(length, key="outage length") / 3600.0
    except ValueError as exc:
        msg = f"outage {spec!r}: bad length {length!r} ({exc})"
        raise ReplayError(msg) from exc
    groups = groups or {}
    chans: tuple[str, ...] | None = None
    if m["channels"]:
        names: list[str] = []
        for name in (c.strip() for c in m["channels"].split(",")):
            if name == _ALL_KEYWORD:
                names = []
                chans = None
                break
            if name in groups:
                names.extend(groups[name])
            elif name in channels:
                names.append(name)
            else:
                msg = f"outage {spec!r}: unknown channel {name!r} (known: {', '.join(channels)}; groups: {', '.join(groups) or 'none'}; all)"
                raise ReplayError(msg)
        else:
            chans = tuple(dict.fromkeys(names))  # de-duplicated, order kept
    return Outage(station=m["station"], start_s=start_s, hours=hours, channels=chans)


# --------------------------------------------------------------------------------------------------- the plan


@dataclass(slots=True)
class PlannedReading:
    """One message of the replay.

    Attributes:
        send_s: when it is due, simulated epoch seconds (its own ``ts``; later for a late reading).
        order: tie-break among messages due at the same simulated second (publication order).
        station: station name.
        ts: the reading's own timestamp (event time, step start), epoch seconds.
        values: channel -> value in the channel's unit; absent channels are missing (real NA or injected outage).
        late: published ``late_delay_s`` after ``ts``.
        out_of_order: published right after the station's next reading.
    """

    send_s: float
    order: float
    station: str
    ts: int
    values: dict[str, float]
    late: bool = False
    out_of_order: bool = False


@dataclass
class ReplayPlan:
    """Everything a replay will publish, and what it withheld.

    Attributes:
        readings: the messages, sorted by publication order.
        stations: replayed stations.
        channels: channel names, in data column order.
        cadence_s: step length of the data, seconds.
        start_s, end_s: the replayed range ``[start_s, end_s)``, epoch seconds.
        outages: the injected outages.
        epoch_s: station -> [T] int64 step times of the replayed range.
        values: station -> [T, C] float32 true values of the range in physical units (NaN = real NA).
        hidden: station -> [T, C] bool, True where a really observed value was withheld by an injected outage.
        late_delay_s: how much later than its timestamp a late reading is published, seconds.
    """

    readings: list[PlannedReading]
    stations: tuple[str, ...]
    channels: tuple[str, ...]
    cadence_s: int
    start_s: int
    end_s: int
    outages: tuple[Outage, ...]
    epoch_s: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    hidden: dict[str, np.ndarray]
    late_delay_s: float = 0.0

    @property
    def sent(self) -> dict[str, np.ndarray]:
        """station -> [T, C] bool, True where the replay publishes a value (observed and not withheld)."""
        return {s: ~np.isnan(self.values[s]) & ~self.hidden[s] for s in self.stations}

    def counts(self) -> dict[str, int]:
        """Totals: steps, messages, values sent, real NA, hidden values, silent steps, late, out of order."""
        steps = sum(len(e) for e in self.epoch_s.values())
        real_na = sum(int(np.isnan(v).sum()) for v in self.values.values())
        hidden = sum(int(h.sum()) for h in self.hidden.values())
        return {
            "steps": steps,
            "messages": len(self.readings),
            "values_sent": sum(len(r.values) for r in self.readings),
            "real_missing_values": real_na,
            "hidden_values": hidden,
            "silent_steps": steps - len(self.readings),
            "late": sum(r.late for r in self.readings),
            "out_of_order": sum(r.out_of_order for r in self.readings),
        }


def _round(v: float) -> float:
    # float32 data printed as float64 carries noise digits (0.38268343 -> 0.3826834261417389); 6 significant digits
    # keep every digit the source file had.
    return float(f"{v:.6g}")


def _check_series(
    series: Mapping[str, StationSeries],
    outages: Sequence[Outage],
    late_share: float,
    out_of_order_share: float,
    cadence_s: int | None,
) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Stations, channels and cadence of a replay; :class:`ReplayError` where :func:`plan_replay` says."""
    if not series:
        msg = "no station to replay"
        raise ReplayError(msg)
    for name, share in (("late_share", late_share), ("out_of_order_share", out_of_order_share)):
        if not 0.0 <= share <= 1.0:
            msg = f"{name} must lie in [0, 1], got {share}"
            raise ReplayError(msg)
    stations = tuple(series)
    first = series[stations[0]]
    channels = tuple(c.name for c in first.channels)
    if cadence_s is None:
        if len(first.epoch_s) < 2:
            msg = f"station {stations[0]} has a single row: pass cadence_s (the dataset spec's cadence)"
            raise ReplayError(msg)
        cadence_s = int(first.epoch_s[1] - first.epoch_s[0])
    for s in series.values():
        if tuple(c.name for c in s.channels) != channels:
            msg = f"station {s.station} has other channels than {stations[0]}"
            raise ReplayError(msg)
        if len(s.epoch_s) > 1 and np.any(np.diff(s.epoch_s) != cadence_s):
            msg = f"station {s.station} is not on a regular {cadence_s} s cadence"
            raise ReplayError(msg)
    unknown = sorted({o.station for o in outages} - set(stations))
    if unknown:
        msg = f"outage for station(s) {unknown} that are not replayed ({', '.join(stations)})"
        raise ReplayError(msg)
    return stations, channels, int(cadence_s)


def _station_readings(
    s: StationSeries, lo: int, hi: int, outages: Sequence[Outage], channels: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[PlannedReading]]:
    """One station's steps in ``[lo, hi)``: epochs [T], values [T, C], hidden [T, C] (observed and withheld by
    ``outages``) and one :class:`PlannedReading` per step with at least one value sent (in time order)."""
    col = {name: j for j, name in enumerate(channels)}
    rows = (s.epoch_s >= lo) & (s.epoch_s < hi)
    ep = s.epoch_s[rows].astype(np.int64)
    vals = s.values[rows].astype(np.float32)
    withheld = np.zeros(vals.shape, dtype=bool)
    for o in outages:
        t = (ep >= o.start_s) & (ep < o.end_s)
        if o.channels is None:
            withheld[t, :] = True
        else:
            withheld[np.ix_(t, [col[c] for c in o.channels])] = True
    observed = ~np.isnan(vals)
    send = observed & ~withheld
    msgs = []
    for i in np.flatnonzero(send.any(axis=1)):
        v = {channels[j]: _round(float(vals[i, j])) for j in np.flatnonzero(send[i])}
        msgs.append(PlannedReading(send_s=float(ep[i]), order=0.0, station=s.station, ts=int(ep[i]), values=v))
    return ep, vals, withheld & observed, msgs


def _add_disorder(
    msgs: list[PlannedReading],
    rng: np.random.Generator,
    late_share: float,
    out_of_order_share: float,
    delay: float,
    name: str,
) -> None:
    """Mark ``round(share * n)`` messages late (due ``delay`` s after their ts) and swap as many out of order with
    the next message (never a late one or a partner of a swap again), in place."""
    n = len(msgs)
    n_late = round(late_share * n)
    for i in rng.choice(n, size=n_late, replace=False) if n_late else ():
        msgs[i].late = True
        msgs[i].send_s = msgs[i].ts + delay
    n_ooo = round(out_of_order_share * n)
    partner = np.zeros(n, dtype=bool)
    swapped = 0
    for i in rng.permutation(max(n - 1, 0)):
        if swapped >= n_ooo:
            break
        a, b = msgs[i], msgs[i + 1]
        if a.late or b.late or a.out_of_order or b.out_of_order or partner[i] or partner[i + 1]:
            continue
        a.out_of_order = True
        partner[i + 1] = True
        a.send_s = b.send_s
        swapped += 1
    if swapped < n_ooo:
        log.warning("%s: only %d of %d out-of-order swaps possible", name, swapped, n_ooo)


def _replay_range(series: Mapping[str, StationSeries], outages: Sequence[Outage], start_s: int | None,
                  end_s: int | None, cadence_s: int) -> tuple[int, int]:
    """The replayed range ``[lo, hi)`` in epoch seconds: the data's own by default (its last step included).

    Raises:
        ReplayError: an empty range, or an outage that ends before it or starts after it (it would hide nothing).
    """
    lo = min(int(s.epoch_s[0]) for s in series.values()) if start_s is None else int(start_s)
    hi = max(int(s.epoch_s[-1]) for s in series.values()) + cadence_s if end_s is None else int(end_s)
    if hi <= lo:
        msg = f"empty replay range: start {format_ts(lo)} is not before end {format_ts(hi)}"
        raise ReplayError(msg)
    outside = [o.spec() for o in outages if o.end_s <= lo or o.start_s >= hi]
    if outside:
        msg = (f"outage(s) {', '.join(outside)} outside the replayed range {format_ts(lo)} .. {format_ts(hi)} "
               "(they would hide nothing)")
        raise ReplayError(msg)
    return lo, hi


def _publication_order(stations: list[str], per_station: dict[str, list[PlannedReading]]) -> list[PlannedReading]:
    """Every station's readings in publication order: by due time; at equal times stations interleave in a fixed
    order and a swapped message goes right after its partner. Sets each reading's ``order``; raises nothing."""
    readings: list[PlannedReading] = []
    for k, name in enumerate(stations):
        for msg in per_station[name]:
            msg.order = k + (0.5 if msg.out_of_order else 0.0)
            readings.append(msg)
    readings.sort(key=lambda r: (r.send_s, r.order))
    return readings


def plan_replay(
    series: Mapping[str, StationSeries],
    *,
    start_s: int | None = None,
    end_s: int | None = None,
    outages: Sequence[Outage] = (),
    late_share: float = 0.0,
    out_of_order_share: float = 0.0,
    late_delay_s: float | None = None,
    seed: int = 0,
    cadence_s: int | None = None,
) -> ReplayPlan:
    """Plan a replay: which message goes out when, with which channels. Pure and deterministic for a seed.

    Args:
        series: station -> :class:`gapcast.train.data.StationSeries` (physical units, NaN = real missing).
        start_s: first step replayed, epoch seconds (default: the first step of the data).
        end_s: end of the range, exclusive, epoch seconds (default: after the last step).
        outages: injected outages; their stations must be in ``series``.
        late_share: share of the messages published late, in [0, 1].
        out_of_order_share: share of the messages swapped with the station's next message, in [0, 1]
            (a late message, or the partner of a swap, is never swapped again).
        late_delay_s: delay of a late message after its own timestamp, seconds (default 1.5 cadences: it arrives
            after the next step's reading, within a lateness of two cadences).
        seed: random seed for choosing late and out-of-order messages.
        cadence_s: the step, seconds (default: the step between the first station's first two rows; required when
            that station has a single row).

    Returns:
        The :class:`ReplayPlan`.

    Raises:
        ReplayError: empty range, unknown outage station, an outage outside the range, shares outside [0, 1], or
            series of different cadence
            or channels, or a one-row series without ``cadence_s``.
    """
    stations, channels, cadence_s = _check_series(series, outages, late_share, out_of_order_share, cadence_s)
    lo, hi = _replay_range(series, outages, start_s, end_s, cadence_s)
    delay = 1.5 * cadence_s if late_delay_s is None else float(late_delay_s)
    if delay <= 0:
        msg = f"late_delay_s must be > 0, got {delay}"
        raise ReplayError(msg)

    rng = np.random.default_rng(seed)
    epochs: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    hidden: dict[str, np.ndarray] = {}
    per_station: dict[str, list[PlannedReading]] = {}
    for name in stations:
        epochs[name], values[name], hidden[name], per_station[name] = _station_readings(
            series[name], lo, hi, [o for o in outages if o.station == name], channels
        )
    # Late and out-of-order messages: exact counts (round(share * n)) chosen at random, per station, so every
    # station sees the same disorder whatever its size.
    for name in stations:
        _add_disorder(per_station[name], rng, late_share, out_of_order_share, delay, name)

    return ReplayPlan(
        readings=_publication_order(stations, per_station),
        stations=stations,
        channels=channels,
        cadence_s=cadence_s,
        start_s=lo,
        end_s=hi,
        outages=tuple(outages),
        epoch_s=epochs,
        values=values,
        hidden=hidden,
        late_delay_s=delay,
    )
