"""The dataset spec and the general loader: validation errors name the key and the file; the loader's counts and
time zones against hand-made files; the Beijing preset against an independent reading of the CSV."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from gapcast.calendar import calendar_features, utc_offsets
from gapcast.train.loader import LoadReport, load_dataset, split_indices
from gapcast.train.spec import SpecError, list_presets, load_spec

WIDE = """\
[dataset]
name = "t"
cadence = "1h"
timezone = "UTC"

[source]
layout = "wide"
files = ["data.csv"]
time = "time"
station = "site"
missing = ["NA", -999]

[[channels]]
name = "a"
valid_range = [0, 100]
group = "g"

[[channels]]
name = "b"
column = "bee"

[split]
shares = [0.5, 0.25, 0.25]
"""


def _write(tmp_path, spec: str, csv: str):
    (tmp_path / "data.csv").write_text(csv)
    (tmp_path / "spec.toml").write_text(spec)
    return load_spec(tmp_path / "spec.toml")


def _csv(rows: list[str]) -> str:
    return "time,site,a,bee\n" + "\n".join(rows) + "\n"


def test_presets_ship_and_load():
    assert {"beijing", "etth1", "etth2"} <= set(list_presets())
    b = load_spec("beijing")
    assert b.cadence_s == 3600 and b.utc_offset_s == 28_800 and len(b.channel_names) == 13
    assert b.groups["pollutants"] == (0, 1, 2, 3, 4, 5) and b.channel_names[-2:] == ("wd_sin", "wd_cos")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda s: s.replace('name = "t"', 'name = "t"\ncolour = "red"'), "unknown key dataset.colour"),
        (lambda s: s.replace('cadence = "1h"', 'cadence = "7min"'), "dataset.cadence = '7min' does not divide a day"),
        (lambda s: s.replace('cadence = "1h"', "cadence = 3600"), "dataset.cadence"),
        (lambda s: s.replace('timezone = "UTC"', 'timezone = "Mars/Olympus"'), "dataset.timezone"),
        (lambda s: s.replace('group = "g"', 'group = "g"\nscale = 2'), "unknown key channels[0].scale"),
        (lambda s: s.replace("shares = [0.5, 0.25, 0.25]",
                             'train = ["2024-01-01", "2024-01-03"]\nvalidation = ["2024-01-02", "2024-01-04"]\n'
                             'test = ["2024-01-04", "2024-01-05"]'), "split.train ['2024-01-01', '2024-01-03'] and "
                                                                       "split.validation"),
    ],
)
def test_spec_errors_name_the_key_and_the_file(tmp_path, edit, needle):
    (tmp_path / "spec.toml").write_text(edit(WIDE))
    with pytest.raises(SpecError) as exc:
        load_spec(tmp_path / "spec.toml")
    assert needle in str(exc.value) and str(tmp_path / "spec.toml") in str(exc.value)


STATIONS = '\n[[stations]]\nname = "s1"\nlat = 52.5\nlon = 13.4\n\n[[stations]]\nname = "s2"\nlat = -33.9\nlon = 151.2\n'


def test_station_positions_are_optional_and_checked(tmp_path):
    (tmp_path / "spec.toml").write_text(WIDE + STATIONS)
    spec = load_spec(tmp_path / "spec.toml")
    assert [(d.name, d.lat, d.lon) for d in spec.stations] == [("s1", 52.5, 13.4), ("s2", -33.9, 151.2)]
    assert spec.coordinates(["s2", "s1"]) == {"s2": (-33.9, 151.2), "s1": (52.5, 13.4)}
    assert spec.coordinates(["s1", "s3"]) is None  # IDW needs every station's position
    assert load_spec("beijing").stations == () and load_spec("beijing").coordinates() is None
    for bad, needle in (
        (STATIONS.replace("lat = 52.5", "lat = 95.0"), "stations[0].lat must be degrees in [-90, 90], got 95.0"),
        (STATIONS.replace("lon = 151.2", 'lon = "151E"'), "stations[1].lon must be degrees in [-180, 180]"),
        (STATIONS.replace('name = "s2"', 'name = "s1"'), "station 's1' appears twice in [[stations]]"),
        (STATIONS.replace("lon = 13.4", "lon = 13.4\nalt = 30"), "unknown key stations[0].alt"),
    ):
        (tmp_path / "spec.toml").write_text(WIDE + bad)
        with pytest.raises(SpecError, match=re.escape(needle)):
            load_spec(tmp_path / "spec.toml")


def test_loader_errors_name_the_key_and_the_file(tmp_path):
    spec = _write(tmp_path, WIDE, "time,site,a\n2024-01-01 00:00,s,1\n")
    with pytest.raises(SpecError, match=r"channels\[1\]\.column = 'bee' is not a column of data.csv"):
        load_dataset(spec)
    spec = _write(tmp_path, WIDE, _csv(["2024-01-01 00:00,s,1,2", "yesterday,s,1,2"]))
    with pytest.raises(SpecError, match=r"source.time: data.csv has a timestamp that does not parse"):
        load_dataset(spec)
    # A split with no data for a station.
    spec = _write(tmp_path, WIDE.replace("shares = [0.5, 0.25, 0.25]",
                                         'train = ["2024-01-01", "2024-01-02"]\nvalidation = ["2024-01-02", '
                                         '"2024-01-03"]\ntest = ["2024-02-01", "2024-02-02"]'),
                  _csv([f"2024-01-01 {h:02d}:00,s,1,2" for h in range(24)] + ["2024-01-02 00:00,s,1,2"]))
    s = load_dataset(spec)["s"]
    with pytest.raises(SpecError, match=r"split.test holds no data for station s"):
        split_indices(spec, s)


def test_loader_counts_and_never_shifts(tmp_path):
    rows = [
        "2024-01-01 00:00,s,1,10",
        "2024-01-01 01:00,s,NA,11",  # missing token
        "2024-01-01 01:00,s,5,99",  # duplicate: the first row is kept
        "2024-01-01 02:30,s,7,12",  # off the hourly grid: dropped, not moved
        "2024-01-01 03:00,s,-999,13",  # sentinel
        "2024-01-01 04:00,s,150,14",  # outside [0, 100]
        "2024-01-01 06:00,s,3,15",  # 05:00 absent
    ]
    spec = _write(tmp_path, WIDE, _csv(rows))
    rep = LoadReport()
    s = load_dataset(spec, report=rep)["s"]
    assert rep.duplicates == 1 and rep.off_grid == 1 and rep.out_of_range == 1
    assert s.filled_rows == 2  # 02:00 (only an off-grid reading) and 05:00
    assert s.epoch_s[0] == pd.Timestamp("2024-01-01", tz="UTC").value // 10**9
    np.testing.assert_array_equal(np.diff(s.epoch_s), 3600)
    np.testing.assert_array_equal(s.values[:, 0], [1, np.nan, np.nan, np.nan, np.nan, np.nan, 3])
    np.testing.assert_array_equal(s.values[:, 1], [10, 11, np.nan, 13, 14, np.nan, 15])


LONG = """\
[dataset]
name = "l"
cadence = "{cadence}"
timezone = "Europe/Berlin"

[source]
layout = "long"
files = ["data.csv"]
time = "t"
station = "st"
channel = "var"
value = "val"
aggregate = "mean"

[[channels]]
name = "x"
aggregate = "{agg}"

[[channels]]
name = "wd"
column = "dir"
kind = "angle_deg"

[[channels]]
name = "rain"
kind = "cumulative"

[split]
shares = [0.5, 0.25, 0.25]
"""


def test_long_layout_dst_and_aggregation(tmp_path):
    # Naive Berlin times across the end of summer time (2024-10-27: 02:00-03:00 happens twice), every 30 min.
    utc = pd.date_range("2024-10-26T22:00Z", "2024-10-27T04:00Z", freq="30min")
    local = utc.tz_convert("Europe/Berlin").tz_localize(None).strftime("%Y-%m-%d %H:%M")
    rows = []
    for i, t in enumerate(local):
        rows += [f"{t},A,x,{i}", f"{t},A,dir,{90 if i % 2 else 0}", f"{t},A,rain,{i * 0.5}", f"{t},A,other,1"]
    (tmp_path / "data.csv").write_text("t,st,var,val\n" + "\n".join(rows) + "\n")
    (tmp_path / "spec.toml").write_text(LONG.format(cadence="1h", agg="sum"))
    rep = LoadReport()
    s = load_dataset(load_spec(tmp_path / "spec.toml"), report=rep)["A"]
    assert rep.unknown_channel_rows == len(utc) and rep.nonexistent_local == 0
    # 13 half-hours = 7 UTC hours (the last one holds one reading); no step lost or doubled at the clock change.
    assert len(s.epoch_s) == 7 and s.epoch_s[0] == utc[0].value // 10**9 and s.filled_rows == 0
    assert s.channels[1].name == "wd_sin" and s.channels[2].name == "wd_cos"
    np.testing.assert_allclose(s.values[:, 0], [0 + 1, 2 + 3, 4 + 5, 6 + 7, 8 + 9, 10 + 11, 12])  # sum
    # Wind: vector mean of 0 and 90 degrees -> sin = cos = 0.5.
    np.testing.assert_allclose(s.values[:6, 1], 0.5, atol=1e-6)
    np.testing.assert_allclose(s.values[:6, 2], 0.5, atol=1e-6)
    # Rain counter: the last reading per hour, differenced (1 mm per hour), first step unknown.
    np.testing.assert_allclose(s.values[1:, 3], [1.0] * 5 + [0.5])  # the last hour holds its first reading only
    assert np.isnan(s.values[0, 3])


def test_calendar_follows_the_clock_change():
    t = np.array([pd.Timestamp("2024-10-27T00:30Z").value // 10**9, pd.Timestamp("2024-10-27T01:30Z").value // 10**9])
    np.testing.assert_array_equal(utc_offsets(t, "Europe/Berlin"), [7200, 3600])
    cal = calendar_features(t, timezone="Europe/Berlin")
    # Both are 02:30 local (summer, then winter time): the same hour of day.
    np.testing.assert_allclose(cal[0, :2], cal[1, :2], atol=1e-6)
    np.testing.assert_allclose(calendar_features(t, 28_800), calendar_features(t, timezone="+08:00"))


def test_beijing_preset_matches_an_independent_reading(beijing):
    """The preset through the general loader against the CSV read directly (the loader of before dataset specs:
    local CST time - 8 h, compass -> sin/cos, values outside the preset ranges missing)."""
    from gapcast.train.data import beijing_dir, resolve_data_dir

    path = next(beijing_dir(resolve_data_dir(None)).glob("PRSA_Data_Dingling_*.csv"))
    df = pd.read_csv(path, na_values=["NA"], keep_default_na=False)
    epoch = pd.to_datetime(df[["year", "month", "day", "hour"]]).to_numpy().astype("datetime64[s]").astype(np.int64)
    s = beijing["Dingling"]
    np.testing.assert_array_equal(s.epoch_s, epoch - 28_800)
    names = ["PM2.5", "PM10", "SO2", "NO2", "CO", "O3", "TEMP", "PRES", "DEWP", "RAIN", "WSPM"]
    ref = df[names].to_numpy(dtype=np.float32)
    deg = df["wd"].map({n: 22.5 * i for i, n in enumerate(
        ("N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW"))})
    ref = np.concatenate([ref, np.sin(np.deg2rad(deg.to_numpy(dtype=float)))[:, None].astype(np.float32),
                          np.cos(np.deg2rad(deg.to_numpy(dtype=float)))[:, None].astype(np.float32)], axis=1)
    lo = np.array([c.valid_min for c in s.channels], dtype=np.float32)
    hi = np.array([c.valid_max for c in s.channels], dtype=np.float32)
    with np.errstate(invalid="ignore"):
        ref[(ref < lo) | (ref > hi)] = np.nan
    np.testing.assert_array_equal(s.values, ref)
    np.testing.assert_array_equal(s.observed, ~np.isnan(ref))


@pytest.mark.parametrize("name", ["etth1", "etth2"])
def test_ett_presets_give_the_standard_split(name, data_root):
    spec = load_spec(name)
    s = load_dataset(spec, data_root)[spec.source.station_name]
    sp = split_indices(spec, s)
    assert len(s.epoch_s) == 17_420 and s.duplicates == 0 and s.filled_rows == 0
    assert (sp.train.stop, sp.val.stop - sp.val.start, sp.test.stop - sp.test.start) == (8_640, 2_880, 2_880)
