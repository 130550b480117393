"""The general loader: a :class:`~gapcast.train.spec.DatasetSpec` -> aligned per-station arrays on a UTC epoch grid.

Steps, each counted and logged (nothing is dropped silently, nothing is shifted):

1. read every file (csv, csv.gz, parquet) with the spec's missing tokens; numeric sentinels become missing;
2. the station comes from a column, the file name or the spec; the time from one column or several
   (``year, month, day, hour``); naive times are in the spec's time zone (IANA zones with DST: the repeated autumn
   hour is resolved by the order of the readings, a reading in the skipped spring hour is dropped and counted);
3. readings outside a channel's ``valid_range`` become missing; repeated (station, time, channel) readings keep the
   first; angles become sin/cos, cumulative counters become per-step amounts;
4. readings finer than the cadence are aggregated into their step (mean | last | sum, per channel); at the
   cadence or coarser, a reading off the cadence grid is dropped and counted (never moved to the nearest step);
5. each station's grid runs from its first to its last step; absent steps are all-missing (counted).

The grid is aligned so that a day's first step starts at local (standard-time) midnight.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gapcast.train.data import Channel, Split, StationSeries, resolve_data_dir
from gapcast.train.spec import DatasetSpec, SpecError, local_epoch, resolve_timezone

__all__ = ["LoadReport", "load_dataset", "resolve_files", "spec_channels", "split_indices"]

log = logging.getLogger(__name__)

# 16-point compass rose, clockwise from north; direction the wind blows FROM, in degrees.
_COMPASS = ("N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW")
_COMPASS_DEG = {name: 22.5 * i for i, name in enumerate(_COMPASS)}


@dataclass
class LoadReport:
    """What the loader counted (per station, summed over channels where it applies)."""

    files: int = 0
    rows: int = 0
    duplicates: int = 0
    off_grid: int = 0
    out_of_range: int = 0
    unparseable_values: int = 0
    unknown_channel_rows: int = 0
    nonexistent_local: int = 0
    ambiguous_local: int = 0
    aggregated_readings: int = 0


def spec_channels(spec: DatasetSpec) -> tuple[Channel, ...]:
    """The model channels of a spec as :class:`gapcast.train.data.Channel` (name, unit, valid range)."""
    return tuple(Channel(c.name, c.unit, c.valid_min, c.valid_max) for c in spec.model_channels)


def resolve_files(spec: DatasetSpec, data: str | os.PathLike | None = None) -> list[Path]:
    """The files the spec's globs match, sorted. ``{data}`` resolves to the data root (flag > env > cache).

    Raises:
        SpecError: a pattern matches nothing (the message names source.files and the spec file).
    """
    out: list[Path] = []
    for pattern in spec.source.files:
        pat = pattern
        if "{data}" in pat:
            sub = pat.split("{data}", 1)[1].strip("/").split("/")[0] or "beijing-multisite"
            pat = pat.replace("{data}", str(resolve_data_dir(data, dataset=sub)))
        p = Path(pat).expanduser()
        if not p.is_absolute():
            p = spec.folder / p
        found = sorted(Path(f) for f in glob.glob(str(p)))
        if not found:
            msg = f"{spec.path}: source.files pattern {pattern!r} matches no file (looked for {p})"
            raise SpecError(msg)
        out.extend(f for f in found if f not in out)
    return out


def _read(path: Path, spec: DatasetSpec):
    import pandas as pd

    tokens = [str(m) for m in spec.source.missing]
    try:
        if spec.source.format == "parquet":
            try:
                return pd.read_parquet(path)
            except ImportError as exc:
                msg = f"{spec.path}: source.format = \"parquet\" needs pyarrow: pip install pyarrow"
                raise SpecError(msg) from exc
        return pd.read_csv(path, na_values=tokens, keep_default_na=False, low_memory=False)
    except (OSError, ValueError) as exc:
        msg = f"cannot read {path} (named by {spec.path}): {exc}"
        raise SpecError(msg) from exc


def _naive_epoch(df, spec: DatasetSpec, path: Path):
    """Parse the time column(s): (epoch seconds as if UTC for naive times, whether they were naive)."""
    import pandas as pd

    cols = list(spec.source.time)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        msg = f"{spec.path}: source.time column {missing[0]!r} is not in {path.name} (columns: {', '.join(map(str, df.columns[:20]))})"
        raise SpecError(msg)
    fmt = spec.source.time_format
    try:
        if fmt in ("epoch_s", "epoch_ms"):
            raw = pd.to_numeric(df[cols[0]], errors="raise").to_numpy(dtype=np.float64)
            return (raw / (1000.0 if fmt == "epoch_ms" else 1.0)).round().astype(np.int64), False
        if len(cols) > 1:
            t = pd.to_datetime(df[cols], errors="raise")
        else:
            kw = {} if fmt == "auto" else {"format": fmt}
            try:
                t = pd.to_datetime(df[cols[0]], errors="raise", **kw)
            except ValueError as exc:
                if "utc=True" not in str(exc) and "Mixed timezones" not in str(exc) and "mixed" not in str(exc):
                    raise
                t = pd.to_datetime(df[cols[0]], errors="raise", utc=True, **kw)
    except (ValueError, TypeError, OverflowError) as exc:
        bad = _first_bad_time(df, cols)
        msg = f"{spec.path}: source.time: {path.name} has a timestamp that does not parse ({bad}): {exc}"
        raise SpecError(msg) from exc
    if t.isna().any():
        row = int(np.flatnonzero(t.isna().to_numpy())[0])
        msg = f"{spec.path}: source.time: {path.name} row {row + 2} has no timestamp"
        raise SpecError(msg)
    naive = t.dt.tz is None
    if not naive:
        t = t.dt.tz_convert("UTC").dt.tz_localize(None)
    return t.to_numpy().astype("datetime64[s]").astype(np.int64), naive


def _first_bad_time(df, cols) -> str:
    import pandas as pd

    for c in cols[:1]:
        bad = pd.to_datetime(df[c], errors="coerce").isna().to_numpy() if len(cols) == 1 else None
        if bad is not None and bad.any():
            i = int(np.flatnonzero(bad)[0])
            return f"row {i + 2}: {df[c].iloc[i]!r}"
    return "see the error"


def _localise(naive_s: np.ndarray, keys: np.ndarray | None, spec: DatasetSpec, rep: LoadReport) -> np.ndarray:
    """Naive local epoch -> UTC epoch (int64); -1 marks a time that does not exist locally (spring gap)."""
    import datetime as dt

    import pandas as pd

    tz = resolve_timezone(spec.timezone, where=str(spec.path))
    if isinstance(tz, dt.timezone):
        off = tz.utcoffset(None)
        return naive_s - int(off.total_seconds())
    out = np.empty_like(naive_s)
    groups = [np.arange(len(naive_s))] if keys is None else _group_rows(keys)
    for rows in groups:
        idx = pd.DatetimeIndex(naive_s[rows].astype("datetime64[s]"))
        try:
            loc = idx.tz_localize(tz, ambiguous="infer", nonexistent="NaT")
        except (ValueError, Exception):  # pytz/pandas AmbiguousTimeError: the order does not tell the two apart
            loc = idx.tz_localize(tz, ambiguous="NaT", nonexistent="NaT")
            amb = idx.tz_localize(tz, ambiguous=np.ones(len(idx), dtype=bool), nonexistent="NaT").isna()
            rep.ambiguous_local += int(np.sum(loc.isna() & ~amb))
        na = np.asarray(loc.isna())
        secs = loc.as_unit("s").asi8
        out[rows] = np.where(na, -1, secs)
    return out


def _group_rows(keys: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
    return np.split(order, cuts)


def station_names(spec: DatasetSpec, data: str | os.PathLike | None = None) -> list[str]:
    """The stations a spec's files hold, sorted; cheap where the names are in the file names or fixed.

    Raises:
        SpecError: no file matches the spec's patterns. DataError: a ``column`` source whose files hold no rows.
    """
    src = spec.source
    if src.station_from == "fixed":
        return [src.station_name]
    if src.station_from == "filename":
        pat = re.compile(src.station_pattern)
        return sorted({m.group(1) for p in resolve_files(spec, data) if (m := pat.search(p.name))})
    return sorted(load_dataset(spec, data))


def load_dataset(
    spec: DatasetSpec,
    data: str | os.PathLike | None = None,
    stations: Sequence[str] | None = None,
    *,
    report: LoadReport | None = None,
) -> dict[str, StationSeries]:
    """Load every station of a spec onto its UTC epoch grid.

    Args:
        spec: the dataset spec.
        data: the data root for ``{data}`` in the spec's file patterns.
        stations: only these stations (default: all found).
        report: filled with the counts when given.

    Returns:
        Station name -> :class:`StationSeries` (``values [T, C]`` in physical units, NaN where missing,
        ``epoch_s [T]`` step starts ``cadence_s`` apart, channels = the spec's model channels).

    Raises:
        SpecError: a file without a channel's column, an unparseable timestamp, unknown stations.
    """
    rep = report if report is not None else LoadReport()
    src = spec.source
    files = resolve_files(spec, data)
    rep.files = len(files)
    defs = spec.channels
    seen_cols: set[str] = set()
    frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # station, epoch, channel, value
    import pandas as pd

    wanted = set(stations) if stations else None
    codes_of: dict[str, int] = {}
    pat = re.compile(src.station_pattern) if src.station_pattern else None
    for path in files:
        if src.station_from == "filename":
            m = pat.search(path.name)
            if not m:
                log.warning("%s: file name does not match source.station_pattern %r; skipped", path.name, src.station_pattern)
                continue
            if wanted is not None and m.group(1) not in wanted:
                continue
        df = _read(path, spec)
        rep.rows += len(df)
        if src.station_from == "column":
            if src.station not in df.columns:
                msg = f"{spec.path}: source.station column {src.station!r} is not in {path.name}"
                raise SpecError(msg)
            codes, uniq = pd.factorize(df[src.station].astype(str))
            lut = np.array([codes_of.setdefault(u, len(codes_of)) for u in uniq], dtype=np.int64)
            st = lut[codes] if len(lut) else np.zeros(0, dtype=np.int64)
        else:
            name = m.group(1) if src.station_from == "filename" else src.station_name
            st = np.full(len(df), codes_of.setdefault(name, len(codes_of)), dtype=np.int64)
        naive, is_naive = _naive_epoch(df, spec, path)
        if src.layout == "wide":
            frames += _wide_frames(df, path, st, naive, is_naive, spec, rep, seen_cols)
        else:
            wanted_codes = None if wanted is None else [codes_of[w] for w in wanted if w in codes_of]
            frames += _long_frames(df, path, st, naive, is_naive, spec, rep, seen_cols, wanted_codes)
    if src.layout == "long":
        for i, c in enumerate(defs):
            if c.column not in seen_cols:
                msg = f"{spec.path}: channels[{i}].column = {c.column!r} never appears in source.channel {src.channel!r} of the files"
                raise SpecError(msg)
    if not frames:
        msg = f"{spec.path}: no readings found" + (f" for stations {sorted(wanted)}" if wanted else "")
        raise SpecError(msg)
    out = _by_station(frames, codes_of, wanted, spec, rep)
    if wanted is None and (stray := sorted({d.name for d in spec.stations} - set(out))):
        log.warning("%s: [[stations]] names %s that the files do not hold (a typo leaves a station without a position, "
                    "and IDW off)", spec.path, ", ".join(stray))
    return out


def _long_frames(df, path: Path, st: np.ndarray, naive: np.ndarray, is_naive: bool, spec: DatasetSpec,
                 rep: LoadReport, seen_cols: set[str], wanted_codes: list[int] | None
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """One long-layout file (a row per station, time and channel) -> frames (station code, epoch, channel index,
    value) per spec channel; rows of channels the spec does not name are counted and ignored.

    Raises:
        SpecError: the file lacks the source's channel or value column.
    """
    src, defs = spec.source, spec.channels
    col_index = {c.column: i for i, c in enumerate(defs)}
    frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for key in (src.channel, src.value):
        if key not in df.columns:
            msg = f"{spec.path}: source.{'channel' if key == src.channel else 'value'} column {key!r} is not in {path.name}"
            raise SpecError(msg)
    chan_names = df[src.channel].astype(str).to_numpy()
    j = np.array([col_index.get(n, -1) for n in chan_names], dtype=np.int64)
    unknown = j < 0
    if unknown.any():
        rep.unknown_channel_rows += int(unknown.sum())
        names = sorted(set(chan_names[unknown]))[:5]
        log.info("%s: %d rows of channels the spec does not name (%s) ignored", path.name, int(unknown.sum()),
                 ", ".join(names))
    seen_cols.update(set(chan_names[~unknown]))
    keep = ~unknown
    if wanted_codes is not None:
        keep &= np.isin(st, wanted_codes)
    keys = st * (len(defs) + 1) + j if is_naive else None
    epoch = _localise(naive, keys, spec, rep) if is_naive else naive
    vcol = df[src.value]
    for jj, c in enumerate(defs):
        sel = keep & (j == jj)
        if not sel.any():
            continue
        num = _values(vcol[sel], c.kind, spec, rep)
        frames.append((st[sel], epoch[sel], np.full(int(sel.sum()), jj, dtype=np.int64), num))
    return frames


def _by_station(frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], codes_of: dict[str, int],
                wanted: set[str] | None, spec: DatasetSpec, rep: LoadReport) -> dict[str, StationSeries]:
    """The readings of every file (per frame: station code, epoch, channel index, value), dropped where the local
    time does not exist, split by station and aligned on the cadence grid (:func:`_align`).

    Raises:
        SpecError: a station asked for that the files do not hold.
    """
    st_all = np.concatenate([f[0] for f in frames])
    ep_all = np.concatenate([f[1] for f in frames])
    ch_all = np.concatenate([f[2] for f in frames])
    val_all = np.concatenate([f[3] for f in frames])
    bad_local = ep_all == -1
    if bad_local.any():
        n = int(bad_local.sum())
        rep.nonexistent_local += n
        log.warning("%d readings at local times that do not exist or cannot be told apart in %s (DST change) dropped",
                    n, spec.timezone)
        st_all, ep_all, ch_all, val_all = st_all[~bad_local], ep_all[~bad_local], ch_all[~bad_local], val_all[~bad_local]
    name_of = {v: k for k, v in codes_of.items()}
    present = np.unique(st_all)
    names = sorted(name_of[int(c)] for c in present)
    if wanted is not None and (unknown_st := sorted(wanted - set(names))):
        msg = (f"unknown station(s) {unknown_st} asked for (--stations or the training config's stations); "
               f"the files of {spec.path} hold {names}")
        raise SpecError(msg)
    if wanted is not None:
        names = [n for n in names if n in wanted]
    out: dict[str, StationSeries] = {}
    channels = spec_channels(spec)
    order = np.argsort(st_all, kind="stable")
    cuts = np.flatnonzero(np.diff(st_all[order])) + 1
    rows_of = {name_of[int(st_all[g[0]])]: g for g in np.split(order, cuts) if len(g)}
    for name in names:
        sel = rows_of[name]
        out[name] = _align(name, ep_all[sel], ch_all[sel], val_all[sel], spec, channels, rep)
    return out


def _values(col, kind: str, spec: DatasetSpec, rep: LoadReport) -> np.ndarray:
    """A column -> float64 readings (angles in degrees; compass names mapped), sentinels -> NaN."""
    import pandas as pd

    if kind == "angle_compass":
        s = col.astype("string").str.strip()
        deg = s.map(_COMPASS_DEG, na_action="ignore").to_numpy(dtype=np.float64, na_value=np.nan)
        unknown = s.notna().to_numpy() & np.isnan(deg)
        if unknown.any():
            log.warning("%d unknown compass directions treated as missing", int(unknown.sum()))
            rep.unparseable_values += int(unknown.sum())
        return deg
    num = np.array(pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
    bad = np.isnan(num) & col.notna().to_numpy()
    if bad.any():
        rep.unparseable_values += int(bad.sum())
        log.warning("%d values that are not numbers treated as missing (e.g. %r)", int(bad.sum()),
                    col[bad].iloc[0] if hasattr(col, "iloc") else "?")
    for m in spec.source.missing:
        if isinstance(m, int | float):
            num[num == float(m)] = np.nan
    return num


def _wide_frames(df, path: Path, st: np.ndarray, naive: np.ndarray, is_naive: bool, spec: DatasetSpec,
                 rep: LoadReport, seen_cols: set[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """One wide-layout file (a column per channel) as long (station, epoch, channel, value) frames, one per channel;
    naive local timestamps are localised (:func:`_localise`) and the channel columns added to ``seen_cols``.

    Raises:
        SpecError: a channel's column is not in the file (or an unparseable value, from :func:`_values`).
    """
    defs = spec.channels
    for c in defs:
        if c.column not in df.columns:
            i = defs.index(c)
            msg = f"{spec.path}: channels[{i}].column = {c.column!r} is not a column of {path.name}"
            raise SpecError(msg)
    seen_cols.update(c.column for c in defs)
    keys = st if is_naive else None
    epoch = _localise(naive, keys, spec, rep) if is_naive else naive
    frames = []
    for j, c in enumerate(defs):
        col = df[c.column]
        num = _values(col, c.kind, spec, rep)
        frames.append((st, epoch, np.full(len(df), j, dtype=np.int64), num))
    return frames


def _align(station: str, epoch: np.ndarray, chan: np.ndarray, vals: np.ndarray, spec: DatasetSpec,
           channels: tuple[Channel, ...], rep: LoadReport) -> StationSeries:
    """Put one station's long-format readings on the cadence grid, counting what is dropped into ``rep``.

    Stages: out-of-range values -> missing, duplicate (time, channel) readings dropped, off-grid readings dropped,
    then each channel aggregated into its step (:func:`_aggregate_channels`).

    Raises:
        SpecError: the station has no reading on the cadence grid.
    """
    cad = spec.cadence_s
    defs = spec.channels
    phase = (-spec.utc_offset_s) % cad
    vals, n_oor = _drop_out_of_range(station, chan, vals, defs)
    epoch, chan, vals, n_rows_dup = _drop_duplicates(station, epoch, chan, vals, spec)
    # 3. finer than the cadence -> aggregate into the step; otherwise off-grid readings are dropped
    times = np.unique(epoch)
    native = int(np.median(np.diff(times))) if len(times) > 1 else cad
    rel = epoch - phase
    step = rel // cad
    off = rel % cad != 0
    n_off = 0
    if native >= cad and off.any():
        n_off = int(len(np.unique(epoch[off])))
        log.warning("%s: %d timestamps off the %ds cadence grid dropped (not moved to a step)", station, n_off, cad)
        epoch, chan, vals, step = epoch[~off], chan[~off], vals[~off], step[~off]
    if len(step) == 0:
        msg = f"{spec.path}: station {station} has no reading on the cadence grid"
        raise SpecError(msg)
    first, last = int(step.min()), int(step.max())
    T = last - first + 1
    rows = step - first
    values, n_agg = _aggregate_channels(station, rows, chan, vals, T, len(channels), spec)
    if n_agg:
        log.info("%s: %d readings finer than the cadence aggregated into their step", station, n_agg)
    present = np.zeros(T, dtype=bool)
    present[np.unique(rows)] = True
    filled = int((~present).sum())
    if filled:
        log.warning("%s: %d absent steps inserted as missing", station, filled)
    rep.duplicates += n_rows_dup
    rep.off_grid += n_off
    rep.out_of_range += n_oor
    rep.aggregated_readings += n_agg
    values32 = values.astype(np.float32)
    epoch_grid = (np.arange(first, last + 1, dtype=np.int64) * cad + phase).astype(np.int64)
    s = StationSeries(station=station, epoch_s=epoch_grid, values=values32, observed=~np.isnan(values32),
                      channels=channels, duplicates=n_rows_dup, filled_rows=filled)
    s.off_grid = n_off
    s.out_of_range = n_oor
    s.native_cadence_s = native
    return s


def _drop_out_of_range(station: str, chan: np.ndarray, vals: np.ndarray, defs) -> tuple[np.ndarray, int]:
    """Stage 1 of :func:`_align`: values outside their channel's valid range become NaN (angles in degrees, before
    sin/cos); logs a warning with the count.

    Returns:
        ``(vals, n_out_of_range)`` (``vals`` copied only when something changed). Raises nothing.
    """
    lo = np.array([c.valid_range[0] for c in defs])[chan]
    hi = np.array([c.valid_range[1] for c in defs])[chan]
    with np.errstate(invalid="ignore"):
        oor = ~np.isnan(vals) & ((vals < lo) | (vals > hi))
    n_oor = int(oor.sum())
    if n_oor:
        log.warning("%s: %d values outside the valid range treated as missing", station, n_oor)
        vals = vals.copy()
        vals[oor] = np.nan
    return vals, n_oor


def _drop_duplicates(station: str, epoch: np.ndarray, chan: np.ndarray, vals: np.ndarray, spec: DatasetSpec):
    """Stage 2 of :func:`_align`: sort by (time, channel) and drop a repeated (time, channel) reading, keeping the
    first in file order; logs a warning with the count (rows for a wide layout, see :func:`_row_duplicates`).

    Returns:
        ``(epoch, chan, vals, n_duplicates)``, sorted. Raises nothing.
    """
    order = np.lexsort((chan, epoch))  # stable: file order within equal keys
    epoch, chan, vals = epoch[order], chan[order], vals[order]
    dup = np.zeros(len(epoch), dtype=bool)
    dup[1:] = (epoch[1:] == epoch[:-1]) & (chan[1:] == chan[:-1])
    n_rows_dup = _row_duplicates(epoch, chan, dup, len(spec.channels), spec.source.layout)
    if dup.any():
        log.warning("%s: %d duplicate timestamps dropped (first row kept)", station, n_rows_dup)
        epoch, chan, vals = epoch[~dup], chan[~dup], vals[~dup]
    return epoch, chan, vals, n_rows_dup


def _aggregate_channels(station: str, rows: np.ndarray, chan: np.ndarray, vals: np.ndarray, T: int, C: int,
                        spec: DatasetSpec) -> tuple[np.ndarray, int]:
    """Stage 4 of :func:`_align`: each channel's readings aggregated into their grid step (angles as sin/cos
    columns, cumulative counters as per-step differences with resets made missing and logged).

    Args:
        rows: [n] step index of each reading, 0..T-1; chan: [n] channel index into ``spec.channels``.
        T, C: grid steps and output columns.

    Returns:
        ``(values [T, C] float64 with NaN where missing, n_aggregated_readings)``. Raises nothing of its own.
    """
    values = np.full((T, C), np.nan, dtype=np.float64)
    col = 0
    n_agg = 0
    for j, c in enumerate(spec.channels):
        sel = chan == j
        r, v = rows[sel], vals[sel]
        how = c.aggregate or spec.source.aggregate
        if c.kind == "cumulative":
            how = "last"
        width = 2 if c.kind in ("angle_deg", "angle_compass") else 1
        if c.kind in ("angle_deg", "angle_compass"):
            rad = np.deg2rad(v)
            parts = [np.sin(rad), np.cos(rad)]
            how = "last" if how == "last" else "mean"
        else:
            parts = [v]
        for k, p in enumerate(parts):
            agg, n_extra = _aggregate(r, p, T, how)
            n_agg += n_extra
            values[:, col + k] = agg
        if c.kind == "cumulative":
            cum = values[:, col].copy()
            diff = np.full(T, np.nan)
            diff[1:] = cum[1:] - cum[:-1]
            reset = diff < 0
            if reset.any():
                log.warning("%s: %s counter reset %d times (those steps missing)", station, c.name, int(reset.sum()))
                diff[reset] = np.nan
            values[:, col] = diff
        col += width
    return values, n_agg


def _row_duplicates(epoch: np.ndarray, chan: np.ndarray, dup: np.ndarray, n_defs: int, layout: str) -> int:
    """Duplicate count as rows for the wide layout (one row = every channel), readings for the long one."""
    n = int(dup.sum())
    return n // n_defs if layout == "wide" else n


def _aggregate(rows: np.ndarray, v: np.ndarray, T: int, how: str) -> tuple[np.ndarray, int]:
    """Readings at step ``rows`` -> [T] (NaN where none observed); also the number of readings folded in."""
    ok = ~np.isnan(v)
    r, v = rows[ok], v[ok]
    out = np.full(T, np.nan)
    if len(r) == 0:
        return out, 0
    counts = np.bincount(r, minlength=T)
    extra = int(np.sum(np.maximum(counts - 1, 0)))
    if how == "last":
        out[r] = v  # rows are time-ordered: the last assignment wins
    else:
        sums = np.bincount(r, weights=v, minlength=T)
        has = counts > 0
        out[has] = sums[has] / counts[has] if how == "mean" else sums[has]
    return out, extra


def split_indices(spec: DatasetSpec, series: StationSeries, *, check: bool = True) -> Split:
    """The spec's split of one station as row slices (dates: local, end exclusive; shares: of the station's span).

    Raises:
        SpecError: a part holds no observed value for the station (naming the split key and the station).
    """
    t = series.epoch_s
    if spec.split.shares is not None:
        T = len(t)
        a, b, c = spec.split.shares
        i1, i2 = int(round(T * a)), int(round(T * (a + b)))
        i3 = int(round(T * (a + b + c)))
        sp = Split(train=slice(0, i1), val=slice(i1, i2), test=slice(i2, i3))
    else:
        tz = resolve_timezone(spec.timezone)
        where = str(spec.path)
        idx = {}
        for key in ("train", "validation", "test"):
            lo, hi = (local_epoch(x, tz, key=f"split.{key}", where=where) for x in getattr(spec.split, key))
            idx[key] = slice(int(np.searchsorted(t, lo)), int(np.searchsorted(t, hi)))
        sp = Split(train=idx["train"], val=idx["validation"], test=idx["test"])
    if check:
        for key, sl in (("train", sp.train), ("validation", sp.val), ("test", sp.test)):
            if not series.observed[sl].any():
                msg = f"{spec.path}: split.{key} holds no data for station {series.station}"
                raise SpecError(msg)
    return sp

