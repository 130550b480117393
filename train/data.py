"""Station series, normalisation and sliding windows with calendar features; the Beijing Multi-Site and ETT
wrappers of before dataset specs (``load_beijing``, ``time_split``, ``load_ett``), kept for their callers.

Any network loads through a dataset spec (:mod:`gapcast.train.spec`, :func:`gapcast.train.loader.load_dataset`);
``load_beijing`` is the ``beijing`` preset through that path (its layout, time zone and channels live in
``presets/beijing.toml``). Source: Zhang et al. (2017), Proc. R. Soc. A 473: 20170457.
ETT: Zhou et al., "Informer" (AAAI 2021); the standard split is 12/4/4 months of 30 days (8,640/2,880/2,880 rows).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gapcast.calendar import calendar_features
from gapcast.train import DataError

__all__ = [
    "BEIJING_CHANNELS",
    "BEIJING_POLLUTANTS",
    "BEIJING_UTC_OFFSET_S",
    "Channel",
    "Normalizer",
    "Split",
    "StationSeries",
    "WindowSet",
    "beijing_dir",
    "fetch_beijing",
    "list_beijing_stations",
    "load_beijing",
    "load_ett",
    "make_windows",
    "resolve_data_dir",
    "time_split",
]

log = logging.getLogger(__name__)

BEIJING_URL = "https://archive.ics.uci.edu/static/public/501/beijing+multi+site+air+quality+data.zip"
ENV_VAR = "GAPCAST_DATA"


@dataclass(frozen=True)
class Channel:
    """One measured channel.

    Attributes:
        name: channel name as in the MQTT payloads (``PM2.5``, ``TEMP``, ...).
        unit: physical unit (``ug/m3``, ``degC``, ``hPa``, ``mm``, ``m/s``, ``1`` for sin/cos).
        valid_min: lowest physically plausible value, in ``unit``; values below count as missing.
        valid_max: highest physically plausible value, in ``unit``; values above count as missing.
    """

    name: str
    unit: str
    valid_min: float
    valid_max: float


def _beijing_preset():
    from gapcast.train.spec import load_spec

    return load_spec("beijing")


# The Beijing specifics live in the preset (gapcast/train/presets/beijing.toml); these names stay for the code that
# imported them before dataset specs existed.
_PRESET = _beijing_preset()
BEIJING_CHANNELS: tuple[Channel, ...] = tuple(
    Channel(c.name, c.unit, c.valid_min, c.valid_max) for c in _PRESET.model_channels
)
#: Indices of the preset's first outage group (the channels block outages hide together).
BEIJING_POLLUTANTS: tuple[int, ...] = next(iter(_PRESET.groups.values()))
#: The preset's local time offset, seconds.
BEIJING_UTC_OFFSET_S: int = _PRESET.utc_offset_s


@dataclass
class StationSeries:
    """One station's aligned history on its cadence grid.

    Attributes:
        station: station name (from the file name).
        epoch_s: [T] int64, step start times, seconds since the epoch (UTC); strictly increasing, one cadence apart.
        values: [T, C] float32, physical units, NaN where missing.
        observed: [T, C] bool, True where ``values`` holds a measurement.
        channels: the C channels, in column order.
        duplicates: rows dropped because their timestamp repeated an earlier row (first kept).
        filled_rows: steps absent from the file, inserted as all-missing.
        off_grid: timestamps off the cadence grid, dropped (never moved).
        out_of_range: readings outside their valid range, treated as missing.
        native_cadence_s: the most common step between readings in the files (the cadence found).
    """

    station: str
    epoch_s: np.ndarray
    values: np.ndarray
    observed: np.ndarray
    channels: tuple[Channel, ...]
    duplicates: int = 0
    filled_rows: int = 0
    off_grid: int = 0
    out_of_range: int = 0
    native_cadence_s: int = 0

    @property
    def timestamps(self) -> np.ndarray:
        """[T] datetime64[s], UTC."""
        return self.epoch_s.astype("datetime64[s]")


def resolve_data_dir(flag: str | os.PathLike | None = None, *, dataset: str = "beijing-multisite") -> Path:
    """Find the data root: ``--data`` flag, then ``$GAPCAST_DATA``, then the user cache folder.

    The returned root holds ``beijing-multisite/`` and/or ``ett/``. A flag that points straight at a dataset folder
    (one holding ``PRSA_Data_*.csv`` or ``ETTh1.csv``) is accepted too; its parent is returned.

    Args:
        flag: the ``--data`` argument, or None.
        dataset: the folder wanted under the root (``beijing-multisite`` or ``ett``).

    Returns:
        The data root directory.

    Raises:
        DataError: if none of the places holds the dataset; the message says how to get it.
    """
    candidates: list[tuple[str, Path]] = []
    if flag:
        candidates.append(("--data", Path(flag).expanduser()))
    if os.environ.get(ENV_VAR):
        candidates.append((ENV_VAR, Path(os.environ[ENV_VAR]).expanduser()))
    candidates.append(("cache", _cache_dir()))
    for _, root in candidates:
        if (root / dataset).is_dir() and any((root / dataset).iterdir()):
            return root
        if root.is_dir() and root.name == dataset and any(root.iterdir()):
            return root.parent
    tried = ", ".join(f"{src}={path}" for src, path in candidates)
    msg = (
        f"no '{dataset}' data found (tried {tried}). Point --data or ${ENV_VAR} at a folder holding "
        f"'{dataset}/', or run `gapcast data fetch beijing` (needs internet) to download it into the cache."
    )
    raise DataError(msg)


def _cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("gapcast")) / "data"


def beijing_dir(root: Path) -> Path:
    """The Beijing folder under a data root (or the root itself if it already is one)."""
    return root / "beijing-multisite" if (root / "beijing-multisite").is_dir() else root


def list_beijing_stations(folder: Path) -> list[str]:
    """Station names found in a Beijing Multi-Site folder, sorted."""
    return sorted(p.name.split("_")[2] for p in folder.glob("PRSA_Data_*_*.csv"))


def _verify_sums(folder: Path, files: Iterable[Path]) -> None:
    """Check files against a SHA256SUMS beside them (in ``folder`` or its parent), when one exists."""
    for sums_path in (folder / "SHA256SUMS", folder.parent / "SHA256SUMS"):
        if sums_path.is_file():
            break
    else:
        return
    expected: dict[str, str] = {}
    for line in sums_path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            expected[Path(parts[1]).name] = parts[0]
    for path in files:
        want = expected.get(path.name)
        if want is None:
            continue
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            msg = f"{path} does not match {sums_path} (sha256 {got[:12]}..., expected {want[:12]}...)"
            raise DataError(msg)


def load_beijing(
    data: str | os.PathLike | None = None,
    stations: Sequence[str] | None = None,
    *,
    verify: bool = True,
) -> dict[str, StationSeries]:
    """Load Beijing Multi-Site stations into aligned hourly UTC arrays: the ``beijing`` preset through the general
    loader (:func:`gapcast.train.loader.load_dataset`).

    Wind direction (16 compass points) becomes ``wd_sin``/``wd_cos`` (missing when ``wd`` is NA). Duplicate
    timestamps keep the first row and are counted; absent hours are inserted as all-missing and counted; nothing is
    shifted.

    Args:
        data: a data root, a ``beijing-multisite`` folder, or None to resolve (flag > env > cache).
        stations: station names to load (default: all in the folder).
        verify: check the files against ``SHA256SUMS`` when it is beside them.

    Returns:
        Station name -> :class:`StationSeries` with the preset's ``BEIJING_CHANNELS``.

    Raises:
        DataError: missing folder, unknown station, checksum mismatch or a malformed file.
    """
    from gapcast.train.loader import load_dataset

    folder = beijing_dir(resolve_data_dir(data, dataset="beijing-multisite"))
    available = list_beijing_stations(folder)
    if not available:
        msg = f"no PRSA_Data_*.csv files in {folder}"
        raise DataError(msg)
    wanted = list(stations) if stations else available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        msg = f"unknown station(s) {unknown}; {folder} has {available}"
        raise DataError(msg)
    if verify:
        _verify_sums(folder, [next(folder.glob(f"PRSA_Data_{s}_*.csv")) for s in wanted])
    return load_dataset(_PRESET, folder.parent, wanted)


@dataclass(frozen=True)
class Split:
    """Index ranges of the time split (half-open ``[start, stop)`` row indices into a series)."""

    train: slice
    val: slice
    test: slice


def _month_start(epoch_s: int, months_after: int, utc_offset_s: int) -> int:
    """Epoch seconds of the local month start ``months_after`` months after the month holding ``epoch_s``."""
    t = np.datetime64(int(epoch_s + utc_offset_s), "s").astype("datetime64[M]") + months_after
    return int(t.astype("datetime64[s]").astype(np.int64)) - utc_offset_s


def time_split(
    epoch_s: np.ndarray,
    *,
    train_months: int = 28,
    val_months: int = 10,
    test_months: int = 10,
    utc_offset_s: int = BEIJING_UTC_OFFSET_S,
) -> Split:
    """Split a series by calendar months (local time): first ``train_months`` train, then validation, then test.

    The evaluation protocol for Beijing: 28 / 10 / 10 months (2013-03..2015-06, 2015-07..2016-04, 2016-05..2017-02).

    Args:
        epoch_s: [T] int64 step start times (UTC seconds), increasing.
        train_months, val_months, test_months: lengths of the three parts, months.
        utc_offset_s: the local time the months are counted in.

    Returns:
        The :class:`Split` of row indices; the parts do not overlap and follow each other.

    Raises:
        ValueError: if the series is shorter than the three parts together.
    """
    t0 = int(epoch_s[0])
    b1 = _month_start(t0, train_months, utc_offset_s)
    b2 = _month_start(t0, train_months + val_months, utc_offset_s)
    b3 = _month_start(t0, train_months + val_months + test_months, utc_offset_s)
    step_s = int(epoch_s[1] - epoch_s[0]) if len(epoch_s) > 1 else 0
    if int(epoch_s[-1]) < b3 - step_s:
        msg = f"series ends before the {train_months + val_months + test_months} months the split needs"
        raise ValueError(msg)
    i1, i2, i3 = (int(np.searchsorted(epoch_s, b)) for b in (b1, b2, b3))
    return Split(train=slice(0, i1), val=slice(i1, i2), test=slice(i2, i3))


@dataclass(frozen=True)
class Normalizer:
    """Per-channel z-score normalisation, fitted on training rows only.

    Attributes:
        mean: [C] float32, physical units.
        std: [C] float32, physical units, > 0.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, arrays: Iterable[np.ndarray]) -> Normalizer:
        """Fit on the observed values of one or more [T, C] arrays (NaN = missing).

        Raises:
            DataError: if a channel has no observed value.
        """
        stacked = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays], axis=0)
        count = np.sum(~np.isnan(stacked), axis=0)
        if np.any(count == 0):
            msg = "cannot fit normalisation: a channel has no observed training value"
            raise DataError(msg)
        mean = np.nanmean(stacked, axis=0)
        std = np.nanstd(stacked, axis=0)
        std = np.where(std < 1e-6, 1.0, std)
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Physical units -> normalised; NaN stays NaN. Shape [..., C] float32."""
        return ((values - self.mean) / self.std).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Normalised -> physical units. Shape [..., C] float32."""
        return (values * self.std + self.mean).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(mean=np.asarray(d["mean"], dtype=np.float32), std=np.asarray(d["std"], dtype=np.float32))


def fit_beijing_normalizer(series: dict[str, StationSeries], split_kw: dict | None = None) -> Normalizer:
    """Fit the normaliser on the training months of every given station."""
    parts = []
    for s in series.values():
        sp = time_split(s.epoch_s, **(split_kw or {}))
        parts.append(s.values[sp.train])
    return Normalizer.fit(parts)


@dataclass
class WindowSet:
    """Sliding windows over one or more series, built lazily by index.

    Each item is a window of ``lookback`` past steps and ``horizon`` future steps:
    ``values [L+H, C]`` float32 normalised with 0 where unobserved, ``observed [L+H, C]`` float32 0/1 and
    ``calendar [L+H, F]`` float32. Only starts where the past part has at least ``min_observed`` share observed
    are kept.

    Attributes:
        values: list of [T_k, C] float32 normalised arrays (NaN where missing), one per series.
        epoch_s: list of [T_k] int64 arrays.
        starts: [N, 2] int64 (series index, start row).
        lookback: L, steps.
        horizon: H, steps.
        utc_offset_s: for calendar features (when ``timezone`` is None).
        station_names: name of each series.
        timezone: the stations' time zone for calendar features (daylight saving time included), or None.
    """

    values: list[np.ndarray]
    epoch_s: list[np.ndarray]
    starts: np.ndarray
    lookback: int
    horizon: int
    utc_offset_s: int = 0
    station_names: list[str] = field(default_factory=list)
    timezone: str | None = None
    _calendar: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.starts)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window ``i`` as (values [L+H, C], observed [L+H, C], calendar [L+H, F]), all float32."""
        k, s = (int(v) for v in self.starts[i])
        return self.window_at(k, s)

    def window_at(self, k: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window of series ``k`` starting at row ``s`` (same layout as :meth:`get`)."""
        n = self.lookback + self.horizon
        raw = self.values[k][s : s + n]
        obs = ~np.isnan(raw)
        vals = np.where(obs, raw, 0.0).astype(np.float32)
        if k not in self._calendar:  # once per series: a time-zone lookup per window would dominate a batch
            self._calendar[k] = calendar_features(self.epoch_s[k], self.utc_offset_s, self.timezone)
        cal = self._calendar[k][s : s + n]
        return vals, obs.astype(np.float32), cal

    def batch(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stack windows: values [B, L+H, C], observed [B, L+H, C], calendar [B, L+H, F]."""
        items = [self.get(i) for i in idx]
        return tuple(np.stack(parts) for parts in zip(*items, strict=True))  # type: ignore[return-value]


def make_windows(
    values: Sequence[np.ndarray],
    epoch_s: Sequence[np.ndarray],
    *,
    lookback: int,
    horizon: int,
    stride: int = 1,
    min_observed: float = 0.0,
    utc_offset_s: int = 0,
    station_names: Sequence[str] | None = None,
    timezone: str | None = None,
) -> WindowSet:
    """Index sliding windows over normalised series.

    Args:
        values: per series [T_k, C] float32, normalised, NaN where missing.
        epoch_s: per series [T_k] int64 step start times.
        lookback: L, past steps per window.
        horizon: H, future steps per window.
        stride: steps between window starts.
        min_observed: keep a window only if at least this share of its past [L, C] cells is observed.
        utc_offset_s: local time offset for calendar features, seconds.
        station_names: names for reporting.
        timezone: time zone of the calendar features (overrides ``utc_offset_s``; DST included).

    Returns:
        A :class:`WindowSet`.

    Raises:
        ValueError: on non-positive lookback/horizon/stride.
    """
    if lookback <= 0 or horizon < 0 or stride <= 0:
        msg = f"lookback, stride must be > 0 and horizon >= 0 (got {lookback}, {horizon}, {stride})"
        raise ValueError(msg)
    n = lookback + horizon
    rows = []
    for k, v in enumerate(values):
        T = len(v)
        if T < n:
            continue
        starts = np.arange(0, T - n + 1, stride)
        if min_observed > 0:
            obs = (~np.isnan(v[:, :])).astype(np.float32).mean(axis=1)
            csum = np.concatenate([[0.0], np.cumsum(obs)])
            share = (csum[starts + lookback] - csum[starts]) / lookback
            starts = starts[share >= min_observed]
        rows.append(np.stack([np.full(len(starts), k), starts], axis=1))
    starts_arr = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), dtype=np.int64)
    return WindowSet(
        values=list(values),
        epoch_s=list(epoch_s),
        starts=starts_arr,
        lookback=lookback,
        horizon=horizon,
        utc_offset_s=utc_offset_s,
        station_names=list(station_names or [f"series{k}" for k in range(len(values))]),
        timezone=timezone,
    )


@dataclass
class ETTData:
    """One ETT file with the standard split (Zhou et al., Informer, AAAI 2021).

    Attributes:
        name: ``ETTh1`` or ``ETTh2``.
        columns: the 7 channel names (OT last).
        epoch_s: [T] int64.
        values: [T, 7] float32, raw units.
        train, val, test: row slices; val and test start ``lookback`` rows early to fill the first input window.
        normalizer: z-score fitted on the training rows.
    """

    name: str
    columns: tuple[str, ...]
    epoch_s: np.ndarray
    values: np.ndarray
    train: slice
    val: slice
    test: slice
    normalizer: Normalizer


def load_ett(name: str, data: str | os.PathLike | None = None, *, lookback: int = 96, verify: bool = True) -> ETTData:
    """Load ETTh1/ETTh2 with the standard 12/4/4-month split (8,640 / 2,880 / 2,880 rows).

    Args:
        name: ``ETTh1`` or ``ETTh2``.
        data: data root or ``ett`` folder (resolved like :func:`resolve_data_dir`).
        lookback: the input length the later splits start early by (96 in the standard protocol).
        verify: check against SHA256SUMS when present.

    Returns:
        :class:`ETTData`.

    Raises:
        DataError: unknown name or missing file.
    """
    import pandas as pd

    if name not in ("ETTh1", "ETTh2"):
        msg = f"unknown ETT file {name!r} (ETTh1 or ETTh2)"
        raise DataError(msg)
    root = resolve_data_dir(data, dataset="ett")
    path = root / "ett" / f"{name}.csv"
    if not path.is_file():
        msg = f"{path} not found"
        raise DataError(msg)
    if verify:
        _verify_sums(path.parent, [path])
    df = pd.read_csv(path)
    columns = tuple(c for c in df.columns if c != "date")
    epoch = pd.to_datetime(df["date"]).to_numpy().astype("datetime64[s]").astype(np.int64)
    values = df[list(columns)].to_numpy(dtype=np.float32)
    n_train, n_val, n_test = 12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24
    train = slice(0, n_train)
    val = slice(n_train - lookback, n_train + n_val)
    test = slice(n_train + n_val - lookback, n_train + n_val + n_test)
    return ETTData(
        name=name,
        columns=columns,
        epoch_s=epoch,
        values=values,
        train=train,
        val=val,
        test=test,
        normalizer=Normalizer.fit([values[train]]),
    )


def fetch_beijing(dest: Path | None = None, *, url: str = BEIJING_URL, zip_path: Path | None = None,
                  sha256: str | None = None) -> Path:
    """Download (or take a local copy of) the UCI zip, verify it and unpack the station CSVs.

    The UCI archive nests a second zip (``PRSA2017_Data_20130301-20170228.zip``) holding a folder of CSVs; both
    layouts (nested or flat) are handled.

    Args:
        dest: data root to unpack into (default: the user cache folder); CSVs land in ``dest/beijing-multisite``.
        url: where to download from when ``zip_path`` is None.
        zip_path: a zip already on disk (used by tests, and by users behind a proxy).
        sha256: expected sha256 of the zip; checked when given.

    Returns:
        The ``beijing-multisite`` folder.

    Raises:
        DataError: download failure, a ``zip_path`` that is missing or unreadable, checksum mismatch, or no station
            CSV in the archive.
    """
    import io
    import urllib.request
    import zipfile

    root = Path(dest) if dest else _cache_dir()
    out = root / "beijing-multisite"
    if zip_path is None:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed https URL)
                blob = resp.read()
        except OSError as exc:
            msg = f"download of {url} failed: {exc}"
            raise DataError(msg) from exc
    else:
        try:
            blob = Path(zip_path).read_bytes()
        except FileNotFoundError as exc:
            msg = f"zip not found: {zip_path}"
            raise DataError(msg) from exc
        except OSError as exc:  # a folder, no permission
            msg = f"cannot read the zip {zip_path}: {exc}"
            raise DataError(msg) from exc
    if sha256 is not None:
        got = hashlib.sha256(blob).hexdigest()
        if got != sha256:
            msg = f"zip checksum mismatch: got {got}, expected {sha256}"
            raise DataError(msg)

    written = 0

    def _walk(zf: zipfile.ZipFile) -> None:
        nonlocal written
        for info in zf.infolist():
            base = Path(info.filename).name
            if base.endswith(".zip"):
                _walk(zipfile.ZipFile(io.BytesIO(zf.read(info))))
            elif base.startswith("PRSA_Data_") and base.endswith(".csv"):
                out.mkdir(parents=True, exist_ok=True)
                (out / base).write_bytes(zf.read(info))
                written += 1

    try:
        _walk(zipfile.ZipFile(io.BytesIO(blob)))
    except zipfile.BadZipFile as exc:
        msg = f"not a zip archive: {exc}"
        raise DataError(msg) from exc
    if written == 0:
        msg = "the archive holds no PRSA_Data_*.csv file"
        raise DataError(msg)
    log.info("unpacked %d station files into %s", written, out)
    return out
