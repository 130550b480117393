"""The dataset spec: one TOML file that describes a station network's history (README, "Your own stations").

Every command takes it as ``--dataset SPEC.toml``, or a packaged preset by name (``beijing``, ``etth1``, ``etth2``:
the files in ``gapcast/train/presets``). The spec is validated up front: an error names the key and the file.
Paths inside a spec resolve against the spec's folder; ``{data}`` in a path stands for the data root
(``--data``, then ``$GAPCAST_DATA``, then the user cache), which is how the presets find the public datasets.

Channel kinds: ``value`` (default), ``angle_deg`` (degrees, becomes ``<name>_sin``/``<name>_cos``),
``angle_compass`` (16-point compass names N, NNE, ... also becomes sin/cos), ``cumulative`` (a running total such as
a rain gauge counter: the loader differences it into the amount per step; a negative step is a counter reset and
counts as missing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from gapcast.duration import DurationError, format_duration, parse_duration
from gapcast.train import DataError

__all__ = [
    "AGGREGATES",
    "KINDS",
    "ChannelDef",
    "DatasetSpec",
    "ModelChannel",
    "SourceSpec",
    "SpecError",
    "SplitSpec",
    "StationDef",
    "list_presets",
    "load_spec",
    "preset_path",
    "resolve_timezone",
]

KINDS = ("value", "angle_deg", "angle_compass", "cumulative")
AGGREGATES = ("mean", "last", "sum")
_DAY_S = 86_400


class SpecError(DataError, ValueError):
    """A dataset spec that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class ModelChannel:
    """One model input column (an angle channel gives two: ``<name>_sin``, ``<name>_cos``).

    Attributes:
        name: name on the wire and in outputs.
        unit: physical unit (``1`` for sin/cos).
        valid_min, valid_max: physical range in ``unit``; values outside count as missing.
        group: the outage group (evaluation blocks, training masks), or ``""``.
        source: the spec channel it comes from.
    """

    name: str
    unit: str
    valid_min: float
    valid_max: float
    group: str = ""
    source: str = ""


@dataclass(frozen=True)
class ChannelDef:
    """One ``[[channels]]`` entry of the spec.

    Attributes:
        name: name on the wire (an angle channel's model columns are ``name_sin``/``name_cos``).
        column: name in the files (long layout: the channel value; wide: the column).
        unit: physical unit.
        valid_range: ``(lo, hi)`` in ``unit``, readings outside are missing (angles: in degrees, before sin/cos).
        group: outage group name, ``""`` for none.
        kind: one of :data:`KINDS`.
        aggregate: per-channel override of ``[source] aggregate``, or None.
    """

    name: str
    column: str
    unit: str = ""
    valid_range: tuple[float, float] = (-1e30, 1e30)
    group: str = ""
    kind: str = "value"
    aggregate: str | None = None

    def model_channels(self) -> tuple[ModelChannel, ...]:
        """The model columns this channel gives (two for angles)."""
        if self.kind in ("angle_deg", "angle_compass"):
            return tuple(ModelChannel(f"{self.name}_{p}", "1", -1.0, 1.0, self.group, self.name) for p in ("sin", "cos"))
        lo, hi = self.valid_range
        return (ModelChannel(self.name, self.unit, float(lo), float(hi), self.group, self.name),)


@dataclass(frozen=True)
class SourceSpec:
    """The ``[source]`` table: where the files are and how to read them.

    Attributes:
        format: ``csv`` (``.csv.gz`` too) or ``parquet``.
        layout: ``long`` (time, station, channel, value rows) or ``wide`` (a column per channel).
        files: glob patterns (relative to the spec's folder; ``{data}`` = the data root).
        time: the time column, or several (``["year", "month", "day", "hour"]``) assembled into one.
        time_format: ``auto`` (ISO 8601 / anything pandas parses), ``epoch_s``, ``epoch_ms`` or a strftime format.
        station: the station column, or None.
        station_from: ``column``, ``filename`` (``station_pattern`` on the file name) or ``fixed``
            (``station_name`` for every row).
        station_pattern: regular expression with one group, applied to the file name.
        station_name: the station of a single-station dataset (``station_from = "fixed"``).
        channel: long layout: the column naming the channel.
        value: long layout: the column holding the value.
        missing: tokens (strings) and sentinels (numbers) that mean "not measured".
        aggregate: how readings finer than the cadence become one step: ``mean``, ``last`` or ``sum``.
    """

    format: str = "csv"
    layout: str = "wide"
    files: tuple[str, ...] = ()
    time: tuple[str, ...] = ("time",)
    time_format: str = "auto"
    station: str | None = None
    station_from: str = "column"
    station_pattern: str | None = None
    station_name: str | None = None
    channel: str | None = None
    value: str | None = None
    missing: tuple[Any, ...] = ("",)
    aggregate: str = "mean"


@dataclass(frozen=True)
class SplitSpec:
    """The ``[split]`` table: by dates (local, end exclusive) or by shares of each station's span.

    Attributes:
        train, validation, test: ``(start, end)`` date strings, or None when ``shares`` is used.
        shares: ``(train, validation, test)`` shares of each station's span (sum <= 1), or None.
    """

    train: tuple[str, str] | None = None
    validation: tuple[str, str] | None = None
    test: tuple[str, str] | None = None
    shares: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class StationDef:
    """A station's position (``[[stations]]`` in the spec; optional).

    Attributes:
        name: the station name, as the data names it.
        lat, lon: WGS 84 degrees.
    """

    name: str
    lat: float
    lon: float


@dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset spec.

    Attributes:
        name: the network's name.
        cadence: the step as written (``"10min"``).
        cadence_s: the step, seconds (divides a day).
        timezone: ``UTC``, a fixed offset ``+08:00`` or an IANA name (``Europe/Berlin``): the clock of naive
            timestamps and of the calendar features.
        source: the :class:`SourceSpec`.
        channels: the spec channels in order.
        split: the :class:`SplitSpec`.
        path: the spec file (None when built from a dict, e.g. out of a checkpoint).
        description: free text.
        raw: the parsed TOML (what a checkpoint stores).
        stations: station positions from ``[[stations]]`` (may be empty, or list only some stations).
    """

    name: str
    cadence: str
    cadence_s: int
    timezone: str
    source: SourceSpec
    channels: tuple[ChannelDef, ...]
    split: SplitSpec
    path: Path | None = None
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    stations: tuple[StationDef, ...] = ()

    def coordinates(self, names: Sequence[str] | None = None) -> dict[str, tuple[float, float]] | None:
        """Station -> (lat, lon) degrees for ``names`` (default: every station in ``[[stations]]``); None unless
        each of them has a position (inverse-distance weighting needs all of them)."""
        pos = {d.name: (d.lat, d.lon) for d in self.stations}
        wanted = list(names) if names is not None else list(pos)
        if not wanted or any(n not in pos for n in wanted):
            return None
        return {n: pos[n] for n in wanted}

    @property
    def folder(self) -> Path:
        """Where relative paths resolve."""
        return self.path.parent if self.path else Path.cwd()

    @property
    def model_channels(self) -> tuple[ModelChannel, ...]:
        """The C model columns in order (angles expanded to sin/cos)."""
        return tuple(mc for c in self.channels for mc in c.model_channels())

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.model_channels)

    @property
    def groups(self) -> dict[str, tuple[int, ...]]:
        """Group name -> model column indices, in first-appearance order."""
        out: dict[str, list[int]] = {}
        for j, c in enumerate(self.model_channels):
            if c.group:
                out.setdefault(c.group, []).append(j)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def utc_offset_s(self) -> int:
        """The standard (winter) offset of the time zone, seconds: what a gateway that knows only a fixed offset
        uses for the calendar features (exact for UTC and fixed offsets)."""
        return standard_offset_s(self.timezone)

    def describe_source(self) -> str:
        return f"{self.name} ({self.path or 'spec from a checkpoint'})"

    def to_dict(self) -> dict[str, Any]:
        """The whole spec as plain data (channels with units, ranges, groups; cadence; time zone; source; split),
        for checkpoints and bundle cards. :func:`DatasetSpec.from_dict` rebuilds it."""
        return {**self.raw, "_path": str(self.path) if self.path else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "the checkpoint") -> DatasetSpec:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            SpecError: as :func:`load_spec`.
        """
        raw = {k: v for k, v in d.items() if k != "_path"}
        path = Path(d["_path"]) if d.get("_path") else None
        return _parse(raw, where if path is None else str(path), path)


def resolve_timezone(name: str, *, key: str = "dataset.timezone", where: str = "spec"):
    """``"UTC"``, ``"+08:00"``/``"-05:30"`` or an IANA name -> a ``datetime.tzinfo``.

    Raises:
        SpecError: an unknown zone, naming the key and the file.
    """
    import datetime as dt
    import zoneinfo

    text = str(name).strip()
    if text.upper() in ("UTC", "Z", "GMT"):
        return dt.UTC
    m = re.fullmatch(r"(?:UTC)?([+-])(\d{2}):?(\d{2})", text)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        return dt.timezone(sign * dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        msg = f"{where}: {key} = {name!r} is not a time zone (use \"UTC\", an offset like \"+08:00\" or an IANA name like \"Europe/Berlin\")"
        raise SpecError(msg) from exc


def standard_offset_s(timezone: str) -> int:
    """The zone's offset on 1 January 2021, seconds (standard time in the northern hemisphere)."""
    import datetime as dt

    tz = resolve_timezone(timezone)
    off = dt.datetime(2021, 1, 1, 12, tzinfo=tz).utcoffset()
    return int(off.total_seconds()) if off is not None else 0


def presets_dir() -> Path:
    return Path(str(resources.files("gapcast.train") / "presets"))


def list_presets() -> list[str]:
    """Names of the packaged presets."""
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def preset_path(name: str) -> Path:
    """The file of a packaged preset. Raises SpecError for an unknown name."""
    p = presets_dir() / f"{name}.toml"
    if not p.is_file():
        msg = f"no dataset preset {name!r} (presets: {', '.join(list_presets())}); or pass a path to a SPEC.toml"
        raise SpecError(msg)
    return p


def load_spec(dataset: str | os.PathLike) -> DatasetSpec:
    """Read and validate a dataset spec: a preset name (``beijing``) or a path to a TOML file.

    Raises:
        SpecError: a missing/unreadable file or an invalid key; the message names the key and the file.
    """
    text = str(dataset)
    path = Path(text).expanduser()
    if not path.suffix and not path.exists() and re.fullmatch(r"[A-Za-z0-9_-]+", text):
        path = preset_path(text.lower())
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        msg = f"dataset spec {path} not found (presets: {', '.join(list_presets())})"
        raise SpecError(msg) from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        msg = f"cannot read the dataset spec {path}: {exc}"
        raise SpecError(msg) from exc
    return _parse(raw, str(path), path.resolve())


_TOP = {"dataset", "source", "channels", "split", "stations"}
_DATASET_KEYS = {"name", "cadence", "timezone", "description"}
_SOURCE_KEYS = {"format", "layout", "files", "time", "time_format", "station", "station_from", "station_pattern",
                "station_name", "channel", "value", "missing", "aggregate"}
_CHANNEL_KEYS = {"name", "column", "unit", "valid_range", "group", "kind", "aggregate"}
_SPLIT_KEYS = {"train", "validation", "test", "shares"}
_STATION_KEYS = {"name", "lat", "lon"}


def _unknown(table: dict, known: set[str], where: str, prefix: str) -> None:
    bad = sorted(set(table) - known)
    if bad:
        msg = f"{where}: unknown key {prefix}{bad[0]} (known in this table: {', '.join(sorted(known))})"
        raise SpecError(msg)


def _str(table: dict, key: str, where: str, prefix: str, default: str | None = None, *,
         choices: tuple[str, ...] | None = None) -> str | None:
    v = table.get(key, default)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        msg = f"{where}: {prefix}{key} must be a non-empty string, got {v!r}"
        raise SpecError(msg)
    if choices and v not in choices:
        msg = f"{where}: {prefix}{key} = {v!r}; choose one of {', '.join(choices)}"
        raise SpecError(msg)
    return v


def _parse(raw: dict[str, Any], where: str, path: Path | None) -> DatasetSpec:
    _unknown(raw, _TOP, where, "")
    name, cadence, cadence_s, tz = _parse_dataset(raw, where)
    source = _parse_source(raw, where, name)
    chans = _parse_channels(raw, where)
    stations = _parse_stations(raw, where)
    sp = raw.get("split", {"shares": [0.7, 0.15, 0.15]})
    if not isinstance(sp, dict):
        msg = f"{where}: [split] must be a table"
        raise SpecError(msg)
    _unknown(sp, _SPLIT_KEYS, where, "split.")
    split = _parse_split(sp, where, resolve_timezone(tz))
    return DatasetSpec(name=name, cadence=cadence, cadence_s=cadence_s, timezone=tz, source=source,
                       channels=tuple(chans), split=split, path=path,
                       description=str(raw["dataset"].get("description", "")), raw=raw, stations=stations)



def _parse_dataset(raw: dict[str, Any], where: str) -> tuple[str, str, int, str]:
    """``[dataset]``: name, cadence as written, cadence in seconds, time zone."""
    ds = raw.get("dataset")
    if not isinstance(ds, dict):
        msg = f"{where}: the [dataset] table is missing"
        raise SpecError(msg)
    _unknown(ds, _DATASET_KEYS, where, "dataset.")
    name = _str(ds, "name", where, "dataset.")
    if name is None:
        msg = f"{where}: dataset.name is missing"
        raise SpecError(msg)
    cadence = _str(ds, "cadence", where, "dataset.")
    if cadence is None:
        msg = f"{where}: dataset.cadence is missing (e.g. \"10min\", \"1h\")"
        raise SpecError(msg)
    try:
        cadence_f = parse_duration(cadence, key="dataset.cadence")
    except DurationError as exc:
        msg = f"{where}: {exc}"
        raise SpecError(msg) from exc
    if cadence_f != int(cadence_f) or _DAY_S % int(cadence_f):
        msg = f"{where}: dataset.cadence = {cadence!r} does not divide a day into whole steps (1min .. 1d, e.g. 10min, 1h)"
        raise SpecError(msg)
    tz = _str(ds, "timezone", where, "dataset.", "UTC")
    resolve_timezone(tz, where=where)

    return name, cadence, int(cadence_f), tz


def _parse_source(raw: dict[str, Any], where: str, name: str) -> SourceSpec:
    """``[source]``: where the files are and how to read them."""
    src = raw.get("source")
    if not isinstance(src, dict):
        msg = f"{where}: the [source] table is missing"
        raise SpecError(msg)
    _unknown(src, _SOURCE_KEYS, where, "source.")
    files = src.get("files")
    if isinstance(files, str):
        files = [files]
    if not files or not all(isinstance(f, str) and f for f in files):
        msg = f"{where}: source.files must be a list of glob patterns, got {files!r}"
        raise SpecError(msg)
    time = src.get("time", "time")
    time_t = (time,) if isinstance(time, str) else tuple(time) if isinstance(time, list) else None
    if not time_t or not all(isinstance(t, str) and t for t in time_t):
        msg = f"{where}: source.time must be a column name or a list of them, got {time!r}"
        raise SpecError(msg)
    layout = _str(src, "layout", where, "source.", "wide", choices=("long", "wide"))
    station = _str(src, "station", where, "source.")
    default_from = "column" if station else ("filename" if src.get("station_pattern") else "fixed")
    station_from = _str(src, "station_from", where, "source.", default_from, choices=("column", "filename", "fixed"))
    pattern = _str(src, "station_pattern", where, "source.")
    if station_from == "column" and not station:
        msg = f"{where}: source.station names the station column (or set station_from = \"filename\" / \"fixed\")"
        raise SpecError(msg)
    if station_from == "filename":
        if not pattern:
            msg = f"{where}: source.station_from = \"filename\" needs source.station_pattern (e.g. \"PRSA_Data_(.+?)_\")"
            raise SpecError(msg)
        try:
            if re.compile(pattern).groups != 1:
                raise re.error("needs exactly one group")
        except re.error as exc:
            msg = f"{where}: source.station_pattern = {pattern!r} is not a regular expression with one group: {exc}"
            raise SpecError(msg) from exc
    station_name = _str(src, "station_name", where, "source.", name)
    channel_col = value_col = None
    if layout == "long":
        channel_col = _str(src, "channel", where, "source.")
        value_col = _str(src, "value", where, "source.")
        if not channel_col or not value_col:
            msg = f"{where}: source.layout = \"long\" needs source.channel and source.value (column names)"
            raise SpecError(msg)
    elif "channel" in src or "value" in src:
        msg = f"{where}: source.channel / source.value are for layout = \"long\" only"
        raise SpecError(msg)
    missing = src.get("missing", [""])
    if not isinstance(missing, list) or not all(isinstance(m, str | int | float) and not isinstance(m, bool)
                                                for m in missing):
        msg = f"{where}: source.missing must be a list of strings and numbers, got {missing!r}"
        raise SpecError(msg)
    return SourceSpec(
        format=_str(src, "format", where, "source.", "csv", choices=("csv", "parquet")),
        layout=layout,
        files=tuple(files),
        time=time_t,
        time_format=_str(src, "time_format", where, "source.", "auto"),
        station=station,
        station_from=station_from,
        station_pattern=pattern,
        station_name=station_name,
        channel=channel_col,
        value=value_col,
        missing=tuple(missing),
        aggregate=_str(src, "aggregate", where, "source.", "mean", choices=AGGREGATES),
    )



def _named_tables(items: list, array: str, known: set[str], where: str):
    """``(prefix, table, name)`` for each table of a TOML array of tables that must have a ``name``."""
    for i, t in enumerate(items):
        pre = f"{array}[{i}]."
        if not isinstance(t, dict):
            msg = f"{where}: {array}[{i}] must be a table"
            raise SpecError(msg)
        _unknown(t, known, where, pre)
        name = _str(t, "name", where, pre)
        if name is None:
            msg = f"{where}: {pre}name is missing"
            raise SpecError(msg)
        yield pre, t, name


def _parse_channels(raw: dict[str, Any], where: str) -> list[ChannelDef]:
    """``[[channels]]``: names, columns, units, valid ranges, groups, kinds (model names unique)."""
    chans_raw = raw.get("channels")
    if not isinstance(chans_raw, list) or not chans_raw:
        msg = f"{where}: at least one [[channels]] entry is needed"
        raise SpecError(msg)
    chans: list[ChannelDef] = []
    for pre, c, cname in _named_tables(chans_raw, "channels", _CHANNEL_KEYS, where):
        kind = _str(c, "kind", where, pre, "value", choices=KINDS)
        vr = c.get("valid_range", [-1e30, 1e30])
        if (not isinstance(vr, list) or len(vr) != 2 or not all(isinstance(x, int | float) for x in vr)
                or not vr[0] < vr[1]):
            msg = f"{where}: {pre}valid_range must be [low, high] with low < high, got {vr!r}"
            raise SpecError(msg)
        chans.append(ChannelDef(
            name=cname, column=_str(c, "column", where, pre, cname), unit=str(c.get("unit", "")),
            valid_range=(float(vr[0]), float(vr[1])), group=str(c.get("group", "")), kind=kind,
            aggregate=_str(c, "aggregate", where, pre, None, choices=AGGREGATES),
        ))
    names = [mc.name for ch in chans for mc in ch.model_channels()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        msg = f"{where}: channel name {dup[0]!r} appears twice (angle channels add _sin/_cos)"
        raise SpecError(msg)
    return chans


def _parse_stations(raw: dict[str, Any], where: str) -> tuple[StationDef, ...]:
    """``[[stations]]`` (optional): ``name``, ``lat``, ``lon`` in degrees (WGS 84), for inverse-distance weighting
    and for choosing a new station's neighbours."""
    st_raw = raw.get("stations", [])
    if not isinstance(st_raw, list):
        msg = f"{where}: [[stations]] must be an array of tables (name, lat, lon)"
        raise SpecError(msg)
    out: list[StationDef] = []
    for pre, st, sname in _named_tables(st_raw, "stations", _STATION_KEYS, where):
        for key, lim in (("lat", 90.0), ("lon", 180.0)):
            v = st.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not -lim <= v <= lim:
                msg = f"{where}: {pre}{key} must be degrees in [-{lim:g}, {lim:g}], got {v!r}"
                raise SpecError(msg)
        out.append(StationDef(sname, float(st["lat"]), float(st["lon"])))
    names = [d.name for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        msg = f"{where}: station {dup[0]!r} appears twice in [[stations]]"
        raise SpecError(msg)
    return tuple(out)


def _parse_split(sp: dict, where: str, tz) -> SplitSpec:
    if "shares" in sp:
        if set(sp) - {"shares"}:
            msg = f"{where}: split.shares and split dates ({', '.join(sorted(set(sp) - {'shares'}))}) exclude each other"
            raise SpecError(msg)
        sh = sp["shares"]
        if (not isinstance(sh, list) or len(sh) != 3 or not all(isinstance(x, int | float) and x >= 0 for x in sh)
                or sum(sh) > 1 + 1e-9 or min(sh) <= 0):
            msg = f"{where}: split.shares must be three positive shares (train, validation, test) summing to <= 1, got {sh!r}"
            raise SpecError(msg)
        return SplitSpec(shares=(float(sh[0]), float(sh[1]), float(sh[2])))
    parts = {}
    for key in ("train", "validation", "test"):
        rng = sp.get(key)
        if not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, str) for x in rng):
            msg = f"{where}: split.{key} must be [\"start\", \"end\"] dates (end exclusive), or use split.shares"
            raise SpecError(msg)
        a, b = (local_epoch(x, tz, key=f"split.{key}", where=where) for x in rng)
        if a >= b:
            msg = f"{where}: split.{key} = {rng!r} ends before it starts"
            raise SpecError(msg)
        parts[key] = (a, b, tuple(rng))
    order = sorted(parts.items(), key=lambda kv: kv[1][0])
    for (k1, r1), (k2, r2) in zip(order, order[1:], strict=False):
        if r2[0] < r1[1]:
            msg = f"{where}: split.{k1} {list(r1[2])} and split.{k2} {list(r2[2])} overlap"
            raise SpecError(msg)
    return SplitSpec(train=parts["train"][2], validation=parts["validation"][2], test=parts["test"][2])


def local_epoch(text: str, tz, *, key: str, where: str) -> int:
    """A date or date-time in the spec's time zone (or with its own offset) -> epoch seconds.

    Raises:
        SpecError: a string that is not an ISO 8601 date, naming the key and the file.
    """
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        msg = f"{where}: {key}: {text!r} is not a date (YYYY-MM-DD or an ISO 8601 date-time)"
        raise SpecError(msg) from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=tz)
    return int(t.timestamp())


def cadence_text(spec: DatasetSpec) -> str:
    return format_duration(spec.cadence_s)
